//! Options for creating and opening images.

use std::path::PathBuf;
use std::sync::Arc;

use crate::barrier::BarrierMode;
use crate::crypto::{EncryptionOptions, Secret};
use crate::io::{Aio, RingOptions};
use crate::remote::{RemoteBacking, RemoteOpener};

/// How much of the image `create` allocates up front (qemu-img's `preallocation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Nothing beyond the header, refcount structures and L1 table.
    #[default]
    Off,
    /// L2 tables and data clusters are allocated, data is not written.
    Metadata,
    /// As `Metadata`, and the data area is reserved with fallocate.
    Falloc,
    /// As `Metadata`, and the data area is written with zeros.
    Full,
}

impl std::str::FromStr for Preallocation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "off" => Preallocation::Off,
            "metadata" => Preallocation::Metadata,
            "falloc" => Preallocation::Falloc,
            "full" => Preallocation::Full,
            _ => return Err(format!("invalid preallocation mode '{s}'")),
        })
    }
}

/// Format of a backing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingFormat {
    /// A qcow2 image.
    Qcow2,
    /// A raw image.
    Raw,
}

impl BackingFormat {
    /// The name qemu-img uses.
    pub fn name(self) -> &'static str {
        match self {
            BackingFormat::Qcow2 => "qcow2",
            BackingFormat::Raw => "raw",
        }
    }
}

impl std::str::FromStr for BackingFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "qcow2" => Ok(BackingFormat::Qcow2),
            "raw" | "file" => Ok(BackingFormat::Raw),
            _ => Err(format!("unsupported backing format '{s}'")),
        }
    }
}

/// Parameters of a new image (qemu-img `-o` option names in the docs).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CreateOptions {
    /// Virtual size in bytes (rounded up to 512 as qemu-img does).
    pub size: u64,
    /// `cluster_size` (512 B ..= 2 MiB, power of two).
    pub cluster_size: u64,
    /// `compat`: version 3 (`1.1`) or 2 (`0.10`).
    pub version3: bool,
    /// `refcount_bits` (1, 2, 4, ..., 64; v2 needs 16).
    pub refcount_bits: u32,
    /// `lazy_refcounts` (v3 only).
    pub lazy_refcounts: bool,
    /// `backing_file`.
    pub backing_file: Option<String>,
    /// `backing_fmt`.
    pub backing_format: Option<BackingFormat>,
    /// `preallocation`.
    pub preallocation: Preallocation,
    /// `compression_type` zstd instead of deflate.
    pub zstd: bool,
    /// `extended_l2`: refused until extended-L2 writes are implemented.
    pub extended_l2: bool,
    /// `data_file`: guest data goes to this file (relative to the image's folder).
    pub data_file: Option<String>,
    /// `data_file_raw`: keep the data file a valid raw image of the guest disk.
    pub data_file_raw: bool,
    /// `encrypt.format=luks` and its settings; `None` for a plain image.
    pub encryption: Option<EncryptionOptions>,
}

impl CreateOptions {
    /// qemu-img's defaults for a disk of `size` bytes: v3, 64 KiB clusters, 16-bit refcounts.
    pub fn new(size: u64) -> Self {
        CreateOptions {
            size,
            cluster_size: 65536,
            version3: true,
            refcount_bits: 16,
            lazy_refcounts: false,
            backing_file: None,
            backing_format: None,
            preallocation: Preallocation::Off,
            zstd: false,
            extended_l2: false,
            data_file: None,
            data_file_raw: false,
            encryption: None,
        }
    }
}

/// What to do about an image's backing file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum BackingPolicy {
    /// Follow the backing file the image names, relative to the image's folder.
    #[default]
    FromImage,
    /// Refuse to open an image that has a backing file.
    Forbid,
    /// Open without the backing file: unallocated clusters read as zeros (qemu-img's
    /// `backing=null`).
    Ignore,
    /// Use this file and format instead of the one the image names.
    Override(PathBuf, BackingFormat),
}

/// Where an image's external data file is taken from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum DataFilePolicy {
    /// The name the image records, relative to the image's folder; absolute names are
    /// followed (QEMU's behaviour — only for images you trust).
    #[default]
    FromImage,
    /// The recorded name only if it stays inside the image's folder (no absolute path, no
    /// `..`): the safe choice for images from elsewhere.
    BesideImage,
    /// This file, whatever the image says (qemu's `data-file=` option).
    Override(PathBuf),
}

/// Parameters for opening an image.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct OpenOptions {
    /// Open without write access.
    pub read_only: bool,
    /// I/O backend; `None` picks io_uring and falls back to threads.
    pub aio: Option<Aio>,
    /// How io_uring rings are set up (completion mode, SQPOLL, registered files).
    pub ring: RingOptions,
    /// Open with O_DIRECT (`cache=none`).
    pub direct: bool,
    /// Ordering between data and metadata writes.
    pub barrier: BarrierMode,
    /// Backing file policy.
    pub backing: BackingPolicy,
    /// Allow probing a backing file's format from its content when the image does not name
    /// one. Off by default: a raw guest can write a qcow2 header (CVE-2023-32684).
    pub probe_backing_format: bool,
    /// Deepest backing chain accepted.
    pub max_backing_depth: u32,
    /// Punch holes in the file when clusters are freed (`discard=unmap`).
    pub discard_passthrough: bool,
    /// Metadata cache capacity, in clusters, for L2 tables and for refcount blocks each.
    pub cache_clusters: usize,
    /// Open an image marked corrupt read-write so that `check(Some(RepairMode::All))` can
    /// repair it (what `qemu-img check -r` does); refused otherwise.
    pub open_for_repair: bool,
    /// External data file policy.
    pub data_file: DataFilePolicy,
    /// Passphrase of an encrypted image (`encrypt.key-secret`), also used for encrypted
    /// backing files. Without it an encrypted image opens only read-only, for its metadata.
    pub secret: Option<Secret>,
    /// Lock the image, its data file and its backing files against other users, as QEMU
    /// does (`file.locking`; see `lock.rs` for the bytes). A refused open fails with
    /// [`crate::Error::Locked`].
    pub locking: crate::Locking,
    /// Share every permission with other users (QEMU's `force-share`, qemu-img `-U`): for
    /// inspecting an image another process writes. Read-only opens only.
    pub force_share: bool,
    /// Opens URLs (`s3://`, `https://`, ...) as read-only files: needed for remote
    /// backing files and [`crate::Image::open_url`]. Without one, a URL is refused with
    /// [`crate::Error::Unsupported`].
    pub remote: Option<Arc<dyn RemoteOpener>>,
    /// Whether an image may name a remote backing file; refused by default (see
    /// [`RemoteBacking`]).
    pub remote_backing: RemoteBacking,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            read_only: false,
            aio: None,
            ring: RingOptions::default(),
            direct: false,
            barrier: BarrierMode::Ordered,
            backing: BackingPolicy::FromImage,
            probe_backing_format: false,
            max_backing_depth: 16,
            discard_passthrough: false,
            cache_clusters: 512,
            open_for_repair: false,
            data_file: DataFilePolicy::FromImage,
            secret: None,
            locking: crate::Locking::Auto,
            force_share: false,
            remote: None,
            remote_backing: RemoteBacking::Refuse,
        }
    }
}

impl OpenOptions {
    /// Default options, read-only.
    pub fn read_only() -> Self {
        OpenOptions {
            read_only: true,
            ..Default::default()
        }
    }
}
