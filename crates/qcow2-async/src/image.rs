//! The public `Image` handle and the guest data path.
//!
//! Every request is split at cluster boundaries. For each cluster the path is:
//! **lease → mapping → data I/O → (barrier-ordered) metadata update**:
//!
//! * reads and in-place overwrites of clusters the image owns alone (COPIED) hold a shared
//!   lease, so the mapping they use cannot change under them;
//! * anything that changes a mapping — allocation, copy-on-write from a backing file, a
//!   shared (snapshot) cluster or a compressed one, write-zeroes, discard — holds the
//!   cluster's exclusive lease from lookup to L2 update (invariants 2 and 5);
//! * the L2 update is made only after the data write completed, and reaches the disk only
//!   after a barrier (see [`crate::meta`]) — metadata never points at data that is not there.

mod amend;
mod cursor;
mod encrypted;
mod map;
mod owned;
mod remote;
mod resize;
mod subcluster;
pub use cursor::Cursor;

pub use amend::AmendOptions;
pub(crate) use map::refine_by_holes;
pub use map::MapExtent;
use owned::HoleLog;
pub use resize::ResizeOptions;

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use qcow2_format::{
    AutoclearFeatures, CompatibleFeatures, CompressionType, CryptMethod, Geometry, Header,
    ImageHeader, IncompatibleFeatures, L2Entry, Limits, RefcountOrder, SubclusterBitmap,
    SubclusterState, Version,
};
use tokio::sync::Mutex;
use tracing::instrument;

use crate::alloc::Pool;
use crate::backing::Disk;
use crate::barrier::{Barrier, BarrierMode};
use crate::bitmaps::{BitmapInfo, BitmapOptions};
use crate::check::{CheckReport, RepairMode};
use crate::error::{Error, Result};
use crate::io::{open_file, BlockFile, FileOptions, IoBuf};
use crate::lease::ClusterLeases;
use crate::meta::Meta;
use crate::options::{
    BackingFormat, BackingPolicy, CreateOptions, DataFilePolicy, OpenOptions, Preallocation,
};
use crate::snapshot::SnapshotInfo;

/// An open qcow2 image. Cheap to clone; every clone is the same image, and any number of
/// tasks may call it at once. Every future it returns is `Send`; what dropping one does is
/// stated on each method (writes and metadata changes run to completion, reads stop).
///
/// # Common tasks
///
/// **Create, open, close.** Options come from their constructors ([`CreateOptions::new`],
/// [`OpenOptions::default`], [`OpenOptions::read_only`]) with fields set as needed.
/// [`Image::close`] writes everything back, stores bitmaps and clears the dirty bit;
/// dropping the last handle without it leaves what a crash would (the image stays
/// consistent, QEMU's `check` may find leaks).
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use qcow2_async::{CreateOptions, Image, OpenOptions};
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("disk.qcow2");
/// let mut create = CreateOptions::new(64 << 20);
/// create.cluster_size = 65536;
/// let img = Image::create(&path, &create, &OpenOptions::default()).await?;
/// assert_eq!(img.virtual_size(), 64 << 20);
/// img.close().await?;
///
/// let img = Image::open(&path, &OpenOptions::read_only()).await?;
/// assert!(img.is_read_only());
/// img.close().await?;
/// # Ok::<(), Box<dyn std::error::Error>>(()) }).unwrap();
/// ```
///
/// **Read and write** with slices, or with owned buffers (`Vec<u8>`, `bytes::BytesMut`,
/// `bytes::Bytes`) that go to the kernel without a copy where the request maps to one run
/// of data; [`Image::flush`] makes completed writes durable. [`Image::cursor`] is the same
/// disk as `tokio::io::AsyncRead + AsyncSeek + AsyncWrite`.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// # use qcow2_async::{CreateOptions, Image, OpenOptions};
/// # let dir = tempfile::tempdir()?;
/// # let img = Image::create(dir.path().join("d.qcow2"), &CreateOptions::new(1 << 20),
/// #                         &OpenOptions::default()).await?;
/// use bytes::{Bytes, BytesMut};
/// img.write_at(b"hello", 4096).await?;
/// let mut buf = [0u8; 5];
/// img.read_at(&mut buf, 4096).await?;
/// assert_eq!(&buf, b"hello");
///
/// img.write_buf(Bytes::from_static(&[7; 65536]).into(), 65536).await?;
/// let got = img.read_buf(BytesMut::zeroed(65536).into(), 65536).await?;
/// let got: Bytes = got.freeze();
/// assert!(got.iter().all(|&b| b == 7));
/// img.flush().await?;
/// # img.close().await?;
/// # Ok::<(), Box<dyn std::error::Error>>(()) }).unwrap();
/// ```
///
/// **Many tasks at once**: clone the handle into each.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// # use qcow2_async::{CreateOptions, Image, OpenOptions};
/// # let dir = tempfile::tempdir()?;
/// # let img = Image::create(dir.path().join("d.qcow2"), &CreateOptions::new(1 << 20),
/// #                         &OpenOptions::default()).await?;
/// let tasks: Vec<_> = (0..8u64)
///     .map(|i| {
///         let img = img.clone();
///         tokio::spawn(async move { img.write_at(&[i as u8; 4096], i * 65536).await })
///     })
///     .collect();
/// for t in tasks {
///     t.await??;
/// }
/// # img.close().await?;
/// # Ok::<(), Box<dyn std::error::Error>>(()) }).unwrap();
/// ```
///
/// **Snapshots** are instants: requests that completed before
/// [`Image::create_snapshot`] are in it, later ones are not.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// # use qcow2_async::{CreateOptions, Image, OpenOptions};
/// # let dir = tempfile::tempdir()?;
/// # let img = Image::create(dir.path().join("d.qcow2"), &CreateOptions::new(1 << 20),
/// #                         &OpenOptions::default()).await?;
/// img.write_at(&[1; 512], 0).await?;
/// img.create_snapshot("before").await?;
/// img.write_at(&[2; 512], 0).await?;
/// let mut old = [0u8; 512];
/// img.read_snapshot_at("before", &mut old, 0).await?;
/// assert_eq!(old, [1; 512]);
/// assert_eq!(img.list_snapshots().await?.len(), 1);
/// img.apply_snapshot("before").await?;
/// img.delete_snapshot("before").await?;
/// # img.close().await?;
/// # Ok::<(), Box<dyn std::error::Error>>(()) }).unwrap();
/// ```
///
/// **Persistent dirty bitmaps** record what changed since they were added (QEMU reads
/// them too, e.g. for incremental backups).
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// # use qcow2_async::{CreateOptions, Image, OpenOptions};
/// # let dir = tempfile::tempdir()?;
/// # let img = Image::create(dir.path().join("d.qcow2"), &CreateOptions::new(1 << 20),
/// #                         &OpenOptions::default()).await?;
/// img.add_bitmap("backup", &Default::default()).await?;
/// img.write_at(&[3; 100], 70000).await?;
/// // 64 KiB granularity: the whole second block is dirty.
/// assert_eq!(img.dirty_ranges("backup", 0..1 << 20).await?, vec![65536..131072]);
/// # img.close().await?;
/// # Ok::<(), Box<dyn std::error::Error>>(()) }).unwrap();
/// ```
///
/// **Check and repair**, as `qemu-img check [-r]`:
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// # use qcow2_async::{CreateOptions, Image, OpenOptions};
/// # let dir = tempfile::tempdir()?;
/// # let img = Image::create(dir.path().join("d.qcow2"), &CreateOptions::new(1 << 20),
/// #                         &OpenOptions::default()).await?;
/// use qcow2_async::RepairMode;
/// let report = img.check(None).await?;
/// assert_eq!((report.corruptions, report.leaks), (0, 0));
/// let repaired = img.check(Some(RepairMode::Leaks)).await?;
/// assert_eq!(repaired.leaks_fixed, 0);
/// # img.close().await?;
/// # Ok::<(), Box<dyn std::error::Error>>(()) }).unwrap();
/// ```
#[derive(Clone)]
pub struct Image {
    inner: Arc<Inner>,
}

struct Inner {
    path: Option<PathBuf>,
    file: Arc<dyn BlockFile>,
    /// Where guest data lives: the qcow2 file itself, or the external data file.
    data: Arc<dyn BlockFile>,
    /// How far the qcow2 file has ever been written (`io/highwater.rs`).
    written: Arc<crate::io::HighWater>,
    /// Guest data is in an external data file (host offset == guest offset, no refcounts).
    external: bool,
    /// The external data file is a valid raw image (`data_file_raw`).
    data_raw: bool,
    meta: Mutex<Meta>,
    /// Cached mappings of the active L1, looked up without the metadata lock.
    mapping: Arc<crate::mapping::MappingIndex>,
    /// Where metadata lies and whether the image is corrupt, for overwrites checked without
    /// the metadata lock.
    regions: Arc<crate::overlap::Regions>,
    leases: ClusterLeases,
    backing: Option<Disk>,
    geo: Geometry,
    /// Virtual size; changes only under the exclusive snapshot lock (`resize`).
    size: std::sync::atomic::AtomicU64,
    read_only: bool,
    barrier: BarrierMode,
    compression: CompressionType,
    version3: bool,
    /// Block size the file needs for O_DIRECT (1 without).
    direct_align: u64,
    /// Guest requests hold it shared, snapshot and bitmap operations exclusive: a snapshot
    /// (or a bitmap clear) is one instant between requests.
    snap_lock: crate::sharded::ShardedRwLock,
    /// Some enabled persistent bitmap records writes (a cheap test on the write path).
    tracking: std::sync::atomic::AtomicBool,
    /// Recently decompressed clusters (shared with `Meta`, which invalidates them).
    decompressed: Arc<crate::compress::DecompressedCache>,
    /// Serialises compressed payload writes on O_DIRECT files: payloads of different guest
    /// clusters share blocks, and the byte-granular O_DIRECT view writes whole blocks.
    payload_lock: Mutex<()>,
    /// Encryption of guest data (see `image/encrypted.rs`).
    crypto: crate::crypto::Encryption,
    /// Whether the image looks metadata-preallocated, decided once on the first block
    /// status query as QEMU does (`image/map.rs`).
    metadata_prealloc: tokio::sync::OnceCell<bool>,
    /// QEMU-compatible locks of the image file and its data file (`lock.rs`), held until
    /// the last handle goes. Backing images hold their own.
    _locks: Vec<crate::lock::FileLock>,
    /// Operations dropped by their callers and still finishing (`detach.rs`).
    detached: Arc<crate::detach::Detached>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("path", &self.inner.path)
            .field("size", &self.virtual_size())
            .field("cluster_size", &self.inner.geo.cluster_size())
            .field("read_only", &self.inner.read_only)
            .finish()
    }
}

/// Where one piece of a cluster reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Data(u64),
    Zero,
    Disk,
}

impl Image {
    /// Creates an image at `path` (replacing any file there) and opens it.
    ///
    /// Cancellation: dropped before the image is formatted, `path` may hold an empty or
    /// partly written file that is not an image (create it again); after that, the rest is
    /// [`Image::open`]'s.
    #[instrument(skip_all, fields(path = %path.as_ref().display(), size = create.size))]
    pub async fn create(
        path: impl AsRef<Path>,
        create: &CreateOptions,
        open: &OpenOptions,
    ) -> Result<Image> {
        let path = path.as_ref();
        // Locked before it is truncated: an image in use is refused, not emptied (as
        // qemu-img create). The lock goes before the reopen below, which takes its own.
        let create_lock = crate::lock::FileLock::acquire(
            path,
            crate::lock::Access::qcow2(false, false)?,
            open.locking,
            true,
        )?;
        let file = open_file(
            path,
            &FileOptions {
                aio: open.aio,
                direct: open.direct,
                read_only: false,
                create: true,
                truncate: true,
                ring: open.ring,
            },
        )
        .map_err(Error::io("creating the image file"))?;
        let file = wrap_direct(file);
        if let Some(name) = &create.data_file {
            // The data file is created (or truncated) to the disk size, as qemu-img does.
            let p = relative_to(path, name);
            let d = std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(&p)
                .map_err(Error::io("creating the external data file"))?;
            d.set_len(create.size.div_ceil(512) * 512)
                .map_err(Error::io("sizing the external data file"))?;
        }
        Self::format_file(file.clone(), create).await?;
        drop(file);
        drop(create_lock);
        // Reopen by path so that backing and data files are resolved as for any image; a new
        // encrypted image opens with the passphrase it was created with unless told otherwise.
        // A remote backing file the caller names here is the caller's choice, not a name
        // found in an image from elsewhere.
        let allowed;
        let open = match &create.backing_file {
            Some(name) if crate::remote::is_url(name) => {
                allowed = OpenOptions {
                    remote_backing: crate::RemoteBacking::Allow,
                    ..open.clone()
                };
                &allowed
            }
            _ => open,
        };
        match (&open.secret, &create.encryption) {
            (None, Some(e)) => {
                let open = OpenOptions {
                    secret: Some(e.secret.clone()),
                    ..open.clone()
                };
                Self::open(path, &open).await
            }
            _ => Self::open(path, open).await,
        }
    }

    /// Writes a fresh image into `file` exactly as `qemu-img create` lays it out (reference
    /// §1.4): header, refcount table, one refcount block, L1 table.
    ///
    /// Cancellation: dropped before it returns, `file` may hold part of an image; format it
    /// again.
    pub async fn format_file(file: Arc<dyn BlockFile>, o: &CreateOptions) -> Result<()> {
        let cs = o.cluster_size;
        if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
            return Err(Error::InvalidArgument(format!(
                "cluster size {cs} must be a power of two between 512 and 2M"
            )));
        }
        let bits = cs.trailing_zeros();
        let order = RefcountOrder::from_bits(o.refcount_bits)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        if !o.version3 && o.refcount_bits != 16 {
            return Err(Error::InvalidArgument(
                "compat=0.10 images only support refcount_bits=16".into(),
            ));
        }
        if !o.version3 && (o.lazy_refcounts || o.zstd) {
            return Err(Error::InvalidArgument(
                "lazy refcounts and zstd compression need compat=1.1".into(),
            ));
        }
        if o.extended_l2 && !o.version3 {
            return Err(Error::InvalidArgument(
                "extended L2 entries need compat=1.1".into(),
            ));
        }
        if o.extended_l2 && cs < 16384 {
            return Err(Error::InvalidArgument(
                "extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
                    .into(),
            ));
        }
        if o.backing_file.is_some() && o.backing_format.is_none() {
            return Err(Error::InvalidArgument(
                "backing file specified without backing format".into(),
            ));
        }
        let size = o.size.div_ceil(512) * 512;
        if let Some(e) = &o.encryption {
            e.algorithms.check()?;
        }
        if o.data_file_raw && o.data_file.is_none() {
            return Err(Error::InvalidArgument(
                "data_file_raw requires a data_file".into(),
            ));
        }
        if o.data_file.is_some() && !o.version3 {
            return Err(Error::InvalidArgument(
                "external data files need compat=1.1".into(),
            ));
        }
        if o.data_file_raw && o.backing_file.is_some() {
            return Err(Error::InvalidArgument(
                "a raw external data file cannot have a backing file".into(),
            ));
        }
        // A raw data file is the guest disk itself: every cluster is mapped (QEMU forces
        // preallocation=metadata).
        let mut o = o.clone();
        if o.data_file_raw && o.preallocation == Preallocation::Off {
            o.preallocation = Preallocation::Metadata;
        }
        let o = &o;
        let mut compatible = CompatibleFeatures::empty();
        compatible.set(CompatibleFeatures::LAZY_REFCOUNTS, o.lazy_refcounts);
        let mut incompatible = IncompatibleFeatures::empty();
        incompatible.set(IncompatibleFeatures::COMPRESSION_TYPE, o.zstd);
        incompatible.set(IncompatibleFeatures::EXTENDED_L2, o.extended_l2);
        incompatible.set(
            IncompatibleFeatures::EXTERNAL_DATA_FILE,
            o.data_file.is_some(),
        );
        let mut autoclear = AutoclearFeatures::empty();
        autoclear.set(AutoclearFeatures::DATA_FILE_RAW, o.data_file_raw);
        let hdr = ImageHeader {
            header: Header {
                version: if o.version3 { Version::V3 } else { Version::V2 },
                backing_file_offset: 0,
                backing_file_size: 0,
                cluster_bits: bits,
                size: 0,
                crypt_method: CryptMethod::None,
                l1_size: 0,
                l1_table_offset: 0,
                refcount_table_offset: cs,
                refcount_table_clusters: 1,
                nb_snapshots: 0,
                snapshots_offset: 0,
                incompatible,
                compatible,
                autoclear,
                refcount_order: order,
                header_length: if o.version3 { 112 } else { 72 },
                compression_type: if o.zstd {
                    CompressionType::Zstd
                } else {
                    CompressionType::Deflate
                },
            },
            unknown_header_fields: vec![],
            backing_file: o.backing_file.clone(),
            backing_format: o.backing_format.map(|f| f.name().to_string()),
            data_file: o.data_file.clone(),
            encryption: None,
            bitmaps: None,
            feature_names: vec![],
            unknown_extensions: vec![],
        };
        let write = |buf: Vec<u8>, off: u64| {
            let file = file.clone();
            async move {
                file.write_at(IoBuf::from_vec(buf), off)
                    .await
                    .map_err(Error::io("writing a new image"))
            }
        };
        file.set_len(0).await.map_err(Error::io("truncating"))?;
        write(hdr.encode().map_err(Error::format("header"))?, 0).await?;
        let mut reftable = vec![0u8; cs as usize];
        reftable[..8].copy_from_slice(&(2 * cs).to_be_bytes());
        write(reftable, cs).await?;
        write(vec![0u8; cs as usize], 2 * cs).await?;

        let barrier = Barrier::new(BarrierMode::Ordered, vec![file.clone()]);
        let mut meta = Meta::load(file.clone(), barrier.clone(), hdr, Limits::QEMU, 64).await?;
        meta.update_refcount(0, 3 * cs, 1).await?;
        let geo = meta.geo;
        let l1_entries = geo.l1_entries_for(size);
        if l1_entries * 8 > Limits::QEMU.max_l1_bytes {
            return Err(Error::InvalidArgument(format!(
                "image size {size} is too large"
            )));
        }
        let mut l1_off = 0;
        if l1_entries > 0 {
            l1_off = meta
                .alloc(geo.clusters_for(l1_entries * 8), Pool::Metadata)
                .await?;
            write(vec![0u8; (l1_entries * 8) as usize], l1_off).await?;
        }
        meta.l1.replace(vec![0; l1_entries as usize], true);
        meta.hdr.header.size = size;
        meta.hdr.header.l1_size = l1_entries as u32;
        meta.hdr.header.l1_table_offset = l1_off;
        meta.write_header().await?;
        if o.preallocation != Preallocation::Off {
            let mut end = 0;
            for gc in 0..geo.clusters_for(size) {
                let host = if o.data_file.is_some() {
                    gc * cs
                } else {
                    meta.alloc(1, Pool::Data).await?
                };
                let bm = if o.extended_l2 {
                    SubclusterBitmap::new(u32::MAX, 0)
                } else {
                    SubclusterBitmap::default()
                };
                meta.set_entry(
                    gc,
                    L2Entry::Normal {
                        host: qcow2_format::HostOffset(host),
                        copied: true,
                    },
                    bm,
                )
                .await?;
                match o.preallocation {
                    // The data file is the caller's to preallocate; metadata is mapped.
                    _ if o.data_file.is_some() => Ok(()),
                    Preallocation::Falloc => file.allocate(host, cs).await,
                    Preallocation::Full => file.zero_range(host, cs).await,
                    _ => Ok(()),
                }
                .map_err(Error::io("preallocating"))?;
                if o.data_file.is_none() {
                    end = end.max(host + cs);
                }
            }
            meta.writeback().await?;
            let len = file.len().await.map_err(Error::io("sizing"))?;
            if len < end {
                file.set_len(end)
                    .await
                    .map_err(Error::io("preallocating"))?;
            }
        }
        if let Some(e) = &o.encryption {
            // After preallocation, as QEMU: its LUKS region follows preallocated data.
            let region = crate::crypto::new_region(e).await?;
            let clusters = geo.clusters_for(region.length);
            let off = meta.alloc(clusters, Pool::Metadata).await?;
            // QEMU zero-fills the whole cluster-rounded region before writing the header.
            write(vec![0u8; (clusters * cs) as usize], off).await?;
            write(region.bytes, off).await?;
            meta.hdr.header.crypt_method = CryptMethod::Luks;
            meta.hdr.encryption = Some(qcow2_format::EncryptionExtension {
                offset: off,
                length: region.length,
            });
            meta.writeback().await?;
            barrier.order().await?;
            meta.write_header().await?;
        }
        meta.writeback().await?;
        barrier.sync().await
    }

    /// Opens the image at `path`.
    ///
    /// Cancellation: dropped before it returns, every file it opened is closed and its lock
    /// released. A read-only open writes nothing. A read-write open may have started what
    /// it writes before returning (clearing autoclear bits it does not know, repairing a
    /// dirty image, flagging persistent bitmaps in use); stopped anywhere in that, the image
    /// is as a crash of a writer there leaves it: an unfinished repair is done again by the
    /// next read-write open, and bitmaps already flagged in use are inconsistent.
    #[instrument(skip_all, fields(path = %path.as_ref().display(), read_only = opts.read_only))]
    pub async fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Image> {
        Self::open_path(path.as_ref(), opts, 0, &mut Vec::new()).await
    }

    async fn open_path(
        path: &Path,
        opts: &OpenOptions,
        depth: u32,
        chain: &mut Vec<PathBuf>,
    ) -> Result<Image> {
        let access = crate::lock::Access::qcow2(opts.read_only, opts.force_share)?;
        let mut locks = Vec::new();
        locks.extend(crate::lock::FileLock::acquire(
            path,
            access,
            opts.locking,
            false,
        )?);
        let file = open_file(
            path,
            &FileOptions {
                aio: opts.aio,
                direct: opts.direct,
                read_only: opts.read_only,
                create: false,
                truncate: false,
                ring: opts.ring,
            },
        )
        .map_err(Error::io("opening the image"))?;
        let direct_align = file.alignment() as u64;
        let file = wrap_direct(file);
        let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        chain.push(canon);
        let hdr = read_header(&file).await?;
        let backing = open_backing(&hdr, path, opts, depth, chain).await?;
        let data = if hdr
            .header
            .incompatible
            .contains(IncompatibleFeatures::EXTERNAL_DATA_FILE)
        {
            let dpath = resolve_data_file(&hdr, path, &opts.data_file)?;
            locks.extend(crate::lock::FileLock::acquire(
                &dpath,
                crate::lock::Access::data_file(opts.read_only, opts.force_share)?,
                opts.locking,
                false,
            )?);
            let f = open_file(
                &dpath,
                &FileOptions {
                    aio: opts.aio,
                    direct: opts.direct,
                    read_only: opts.read_only,
                    create: false,
                    truncate: false,
                    ring: opts.ring,
                },
            )
            .map_err(Error::io("opening the external data file"))?;
            Some(wrap_direct(f))
        } else {
            None
        };
        let img =
            Self::open_locked(file, data, Some(path.to_path_buf()), opts, backing, locks).await?;
        if direct_align > img.cluster_size() {
            return Err(Error::unsupported(
                "O_DIRECT with clusters smaller than the device block",
                format!("cluster size {}, block {direct_align}", img.cluster_size()),
            ));
        }
        Ok(img)
    }

    /// Opens an image on an already open file (for example an in-memory one), with the
    /// given backing image. The `backing` policy of `opts` is not consulted.
    ///
    /// Cancellation: as [`Image::open`].
    pub async fn open_file(
        file: Arc<dyn BlockFile>,
        path: Option<PathBuf>,
        opts: &OpenOptions,
        backing: Option<Disk>,
    ) -> Result<Image> {
        Self::open_with_data_file(file, None, path, opts, backing).await
    }

    /// As [`Image::open_file`], with the external data file for images that have one.
    ///
    /// Nothing is locked: the caller opened the files and answers for who else uses them.
    ///
    /// Cancellation: as [`Image::open`].
    pub async fn open_with_data_file(
        file: Arc<dyn BlockFile>,
        data_file: Option<Arc<dyn BlockFile>>,
        path: Option<PathBuf>,
        opts: &OpenOptions,
        backing: Option<Disk>,
    ) -> Result<Image> {
        Self::open_locked(file, data_file, path, opts, backing, Vec::new()).await
    }

    async fn open_locked(
        file: Arc<dyn BlockFile>,
        data_file: Option<Arc<dyn BlockFile>>,
        path: Option<PathBuf>,
        opts: &OpenOptions,
        backing: Option<Disk>,
        locks: Vec<crate::lock::FileLock>,
    ) -> Result<Image> {
        let written = Arc::new(
            crate::io::HighWater::new(file)
                .await
                .map_err(Error::io("sizing the image"))?,
        );
        let file: Arc<dyn BlockFile> = written.clone();
        let mut hdr = read_header(&file).await?;
        let external = hdr
            .header
            .incompatible
            .contains(IncompatibleFeatures::EXTERNAL_DATA_FILE);
        let data_raw = external
            && hdr
                .header
                .autoclear
                .contains(AutoclearFeatures::DATA_FILE_RAW);
        let data = match (external, data_file) {
            (true, Some(d)) => d,
            (true, None) => {
                return Err(Error::InvalidArgument(
                    "'data-file' is required for this image".into(),
                ))
            }
            (false, Some(_)) => {
                return Err(Error::InvalidArgument(
                    "a data file was given for an image without an external data file".into(),
                ))
            }
            (false, None) => file.clone(),
        };
        check_features(&hdr, opts.read_only, opts.open_for_repair)?;
        let crypto = crate::crypto::open(&file, &hdr, opts.secret.as_ref(), opts.read_only).await?;
        let h = &hdr.header;
        let geo = h.geometry().map_err(Error::format("header"))?;
        let size = h.size;
        let compression = h.compression_type;
        let version3 = h.version == Version::V3;
        let mut synced = vec![file.clone()];
        if external {
            // Data must be durable before metadata that points at it: sync both files.
            synced.insert(0, data.clone());
        }
        let barrier = Barrier::new(opts.barrier, synced);
        // A writer must clear autoclear bits it does not understand (reference §1.2).
        let rewrite = !opts.read_only && h.autoclear.unknown() != 0;
        if rewrite {
            hdr.header.autoclear =
                AutoclearFeatures(hdr.header.autoclear.0 & AutoclearFeatures::KNOWN.0);
        }
        let mut meta = Meta::load(
            file.clone(),
            barrier,
            hdr,
            Limits::QEMU,
            opts.cache_clusters,
        )
        .await?;
        meta.discard_passthrough = opts.discard_passthrough;
        meta.preallocate = opts.direct && !opts.read_only;
        meta.writable = !opts.read_only;
        let hh = &meta.hdr.header;
        meta.lazy = !opts.read_only
            && version3
            && hh.compatible.contains(CompatibleFeatures::LAZY_REFCOUNTS);
        meta.marked_dirty = hh.incompatible.contains(IncompatibleFeatures::DIRTY);
        if rewrite {
            meta.write_header().await?;
            meta.barrier.order().await?;
        }
        if meta.marked_dirty && !opts.read_only {
            // Refcounts may be stale (a crash with lazy refcounts): rebuild them before the
            // first write, as QEMU does on a read-write open.
            let report = meta
                .check(size, Some(crate::check::RepairMode::All))
                .await?;
            if report.verdict() != crate::check::Verdict::Clean {
                return Err(Error::Corrupt(format!(
                    "could not repair dirty image: {} corruptions, {} leaks remain ({})",
                    report.corruptions,
                    report.leaks,
                    report.messages.join("; ")
                )));
            }
            tracing::info!(
                leaks_fixed = report.leaks_fixed,
                corruptions_fixed = report.corruptions_fixed,
                "repaired a dirty image on open"
            );
        }
        if meta.load_bitmaps(size).await? {
            // Bitmaps dropped because their autoclear bit was cleared: reclaim what they held
            // (QEMU leaks them until `check -r leaks`; nothing else can reference them).
            meta.check(size, Some(crate::check::RepairMode::Leaks))
                .await?;
        }
        let tracking = meta.bitmaps.tracking();
        let decompressed = meta.decompressed.clone();
        let mapping = meta.mapping_index();
        let regions = meta.regions.clone();
        Ok(Image {
            inner: Arc::new(Inner {
                path,
                file,
                data,
                written,
                external,
                data_raw,
                meta: Mutex::new(meta),
                mapping,
                regions,
                leases: ClusterLeases::default(),
                backing,
                geo,
                size: size.into(),
                read_only: opts.read_only,
                barrier: opts.barrier,
                compression,
                version3,
                direct_align: if opts.direct { 4096 } else { 1 },
                snap_lock: crate::sharded::ShardedRwLock::new(),
                tracking: tracking.into(),
                decompressed,
                payload_lock: Mutex::new(()),
                metadata_prealloc: tokio::sync::OnceCell::new(),
                _locks: locks,
                detached: Arc::default(),
                crypto,
            }),
        })
    }

    /// Runs `op` on a clone of this handle so that it finishes even if the returned future
    /// is dropped (`detach.rs`).
    fn to_completion<T, F>(
        &self,
        op: impl FnOnce(Image) -> F,
    ) -> crate::detach::ToCompletion<'_, Result<T>>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T>> + Send + 'static,
    {
        crate::detach::ToCompletion::new(&self.inner.detached, op(self.clone()))
    }

    /// The path the image was opened from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.inner.path.as_deref()
    }

    /// Virtual disk size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.inner.size.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.inner.geo.cluster_size()
    }

    /// Whether the image was opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.inner.read_only
    }

    /// The backing image, if any.
    pub fn backing(&self) -> Option<&Disk> {
        self.inner.backing.as_ref()
    }

    /// A copy of the current header (fields, extensions, backing name).
    ///
    /// Cancellation: safe to drop at any point; it only reads (see [`Image::read_at`]).
    pub async fn header(&self) -> ImageHeader {
        self.inner.meta.lock().await.hdr.clone()
    }

    /// The on-disk refcount of host cluster `index` as the engine sees it (for tests and
    /// diagnostics).
    ///
    /// Cancellation: safe to drop at any point; it only reads (see [`Image::read_at`]).
    pub async fn refcount(&self, index: u64) -> Result<u64> {
        self.inner.meta.lock().await.refcount(index).await
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.virtual_size() => Ok(()),
            _ => Err(Error::OutOfRange {
                offset,
                len,
                size: self.virtual_size(),
            }),
        }
    }

    async fn check_writable(&self) -> Result<()> {
        if self.inner.read_only {
            return Err(Error::ReadOnly);
        }
        // The flag is published so that a write need not take the metadata lock; the
        // message is there too once it is set.
        if self.inner.regions.is_corrupt() {
            let meta = self.inner.meta.lock().await;
            if let Some(c) = &meta.corrupt {
                return Err(Error::Corrupt(c.clone()));
            }
            if let Some(h) = &meta.halted {
                return Err(Error::Halted(h.clone()));
            }
        }
        Ok(())
    }

    /// Calls `f(guest cluster, offset in cluster, range in request)` for each cluster piece.
    fn pieces(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Iterator<Item = (u64, u64, std::ops::Range<usize>)> {
        let cs = self.cluster_size();
        let bits = self.inner.geo.cluster_bits();
        let mut done = 0u64;
        std::iter::from_fn(move || {
            if done >= len {
                return None;
            }
            let off = offset + done;
            let inc = off & (cs - 1);
            let n = (cs - inc).min(len - done);
            let r = done as usize..(done + n) as usize;
            done += n;
            Some((off >> bits, inc, r))
        })
    }

    /// Whether a piece covers its whole cluster, or the whole partial cluster at the end of
    /// a disk whose size is not cluster aligned (QEMU treats both alike).
    fn is_whole(&self, gc: u64, inc: u64, n: u64) -> bool {
        let cs = self.cluster_size();
        n == cs || (inc == 0 && (gc << self.inner.geo.cluster_bits()) + n == self.virtual_size())
    }

    // ------------------------------------------------------------------ reads

    /// Reads `buf.len()` bytes at guest `offset`.
    ///
    /// Cancellation: safe to drop at any point; nothing is left half done (a metadata table
    /// it was loading is just not cached). The same holds for every method that only reads:
    /// [`Image::read_buf`], [`Image::read_vectored`], [`Image::read_snapshot_at`],
    /// [`Image::map`], the listings and queries.
    #[instrument(level = "debug", skip(self, buf), fields(len = buf.len()))]
    pub async fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_at_noting(buf, offset, None).await
    }

    /// [`Image::read_at`], noting in `holes` the ranges filled with zeros without I/O.
    pub(crate) async fn read_at_noting(
        &self,
        buf: &mut [u8],
        offset: u64,
        holes: Option<&HoleLog>,
    ) -> Result<()> {
        let _instant = self.inner.snap_lock.read().await;
        self.check_range(offset, buf.len() as u64)?;
        // A locked encrypted image refuses every read, not only of allocated clusters.
        self.inner.crypto.data()?;
        let mut pieces = self.pieces(offset, buf.len() as u64);
        let mut rest = buf;
        // Clusters of one request are read concurrently, a few at a time, so that compressed
        // ones decompress in parallel on the blocking pool (and plain ones overlap their I/O).
        // Each piece holds only its own cluster's lease and never waits for another lease
        // while holding it, so concurrent pieces cannot deadlock with writers.
        let reads = std::iter::from_fn(move || {
            let (gc, inc, r) = pieces.next()?;
            let (piece, tail) = std::mem::take(&mut rest).split_at_mut(r.len());
            rest = tail;
            let piece = self.read_piece(gc, inc, piece, holes);
            Some(Box::pin(piece) as BoxFuture<'_, Result<()>>)
        });
        join_bounded(reads, READ_PARALLELISM).await
    }

    async fn read_piece(
        &self,
        gc: u64,
        inc: u64,
        out: &mut [u8],
        holes: Option<&HoleLog>,
    ) -> Result<()> {
        let _lease = self.inner.leases.shared(gc).await;
        let (entry, bm) = self.lookup(gc).await?;
        self.read_mapped_noting(gc, entry, bm, inc, out, holes)
            .await
    }

    /// The mapping of guest cluster `gc`, whose lease the caller holds: from the published
    /// L2 tables when cached (no metadata lock), else through `Meta`, which loads the table.
    async fn lookup(&self, gc: u64) -> Result<(L2Entry, SubclusterBitmap)> {
        if let Some(hit) = self.inner.mapping.lookup(gc) {
            return Ok(hit);
        }
        // A miss reads its table without the metadata lock, so that misses of different
        // tables (and everything else that needs the lock) do not wait for each other's I/O.
        let (l2, token) = match self.inner.meta.lock().await.probe(gc).await? {
            crate::meta::Probe::Found(entry) => return Ok(entry),
            crate::meta::Probe::Load { l2, token } => (l2, token),
        };
        let bytes = crate::meta::read_exact(&self.inner.file, l2, self.cluster_size()).await?;
        self.inner
            .meta
            .lock()
            .await
            .lookup_loaded(gc, l2, token, &bytes)
            .await
    }

    /// Whether guest data may be written into host cluster `host`: checked against the
    /// published metadata regions without the metadata lock; only a suspected overlap goes
    /// to `Meta`, which checks against its own state and marks the image corrupt.
    async fn check_data_target(&self, host: u64) -> Result<()> {
        let mapping = &self.inner.mapping;
        if self
            .inner
            .regions
            .data_target_ok(host, |c| mapping.is_cached(c))
        {
            return Ok(());
        }
        self.inner.meta.lock().await.check_data_target(host).await
    }

    fn source(&self, entry: L2Entry, bm: SubclusterBitmap, inc: u64) -> Source {
        let ext = self.inner.geo.extended_l2();
        let sub = (inc / self.inner.geo.subcluster_size()) as u32;
        match entry {
            L2Entry::Normal { host, .. } => {
                if ext {
                    match bm.state(sub) {
                        SubclusterState::Allocated => Source::Data(host.0 + inc),
                        SubclusterState::Zero => Source::Zero,
                        SubclusterState::Unallocated => Source::Disk,
                    }
                } else {
                    Source::Data(host.0 + inc)
                }
            }
            L2Entry::Zero { .. } => Source::Zero,
            L2Entry::Unallocated if ext && bm.state(sub) == SubclusterState::Zero => Source::Zero,
            L2Entry::Unallocated => Source::Disk,
            L2Entry::Compressed(_) => unreachable!("handled by the caller"),
        }
    }

    async fn read_mapped(
        &self,
        gc: u64,
        entry: L2Entry,
        bm: SubclusterBitmap,
        inc: u64,
        out: &mut [u8],
    ) -> Result<()> {
        self.read_mapped_noting(gc, entry, bm, inc, out, None).await
    }

    /// Reads `out` from guest cluster `gc` at `inc` through its mapping; ranges that read as
    /// zeros without I/O (zero clusters and subclusters, unallocated ones with no backing
    /// file) are noted in `holes`.
    async fn read_mapped_noting(
        &self,
        gc: u64,
        entry: L2Entry,
        bm: SubclusterBitmap,
        inc: u64,
        out: &mut [u8],
        holes: Option<&HoleLog>,
    ) -> Result<()> {
        if let L2Entry::Compressed(d) = entry {
            let data = self.decompress(d).await?;
            out.copy_from_slice(&data[inc as usize..inc as usize + out.len()]);
            return Ok(());
        }
        let step = self.inner.geo.subcluster_size();
        let mut done = 0usize;
        while done < out.len() {
            let pos = inc + done as u64;
            let src = self.source(entry, bm, pos);
            // Extend the run while the source continues contiguously.
            let mut end = ((pos / step) + 1) * step;
            while end < inc + out.len() as u64 {
                let next = self.source(entry, bm, end);
                let contiguous = match (src, next) {
                    (Source::Data(a), Source::Data(b)) => b == a + (end - pos),
                    (a, b) => a == b,
                };
                if !contiguous {
                    break;
                }
                end += step;
            }
            let n = (end.min(inc + out.len() as u64) - pos) as usize;
            let piece = &mut out[done..done + n];
            let guest = (gc << self.inner.geo.cluster_bits()) + pos;
            let zeros = |piece: &mut [u8]| {
                piece.fill(0);
                if let Some(h) = holes {
                    h.note(guest..guest + n as u64);
                }
            };
            match src {
                Source::Zero => zeros(piece),
                Source::Disk => match &self.inner.backing {
                    Some(b) => b.read(piece, guest).await?,
                    None => zeros(piece),
                },
                Source::Data(host) => self.read_data(host, guest, piece).await?,
            }
            done += n;
        }
        Ok(())
    }

    /// The contents of a compressed cluster: from the cache, or read and decompressed on the
    /// blocking pool (so that many clusters decompress in parallel and the async workers keep
    /// serving I/O). The caller holds a lease on a cluster that references the payload (or
    /// the snapshot lock, for snapshot reads), so the payload cannot be freed and rewritten
    /// meanwhile and the cache entry made here is not stale.
    async fn decompress(&self, d: qcow2_format::CompressedDescriptor) -> Result<Arc<Vec<u8>>> {
        let cache = &self.inner.decompressed;
        if let Some(hit) = cache.get(d.host_offset(), d.sectors()) {
            return Ok(hit);
        }
        let raw = self
            .inner
            .file
            .read_at(IoBuf::zeroed(d.read_len() as usize, 1), d.host_offset())
            .await
            .map_err(Error::io("reading a compressed cluster"))?;
        let kind = self.inner.compression;
        let cs = self.cluster_size() as usize;
        let data = Arc::new(
            blocking(
                move || crate::compress::decompress(kind, &raw, cs),
                "decompressing",
            )
            .await?,
        );
        cache.insert(d.host_offset(), d.sectors(), data.clone());
        Ok(data)
    }

    /// The guest view of a whole cluster (for copy-on-write).
    async fn cluster_content(&self, gc: u64, entry: L2Entry) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; self.cluster_size() as usize];
        self.read_mapped(gc, entry, SubclusterBitmap::default(), 0, &mut buf)
            .await?;
        Ok(buf)
    }

    // ------------------------------------------------------------------ writes

    /// Writes one whole cluster compressed, as `qemu-img convert -c` / `qemu-io write -c`
    /// do. `offset` must be cluster aligned and `buf` one cluster long, or reach exactly to
    /// the end of a disk whose size is not cluster aligned (the rest is compressed as zeros).
    ///
    /// Compression runs on the blocking pool, so many tasks may compress different clusters
    /// at once. Data that does not shrink is written as a normal cluster, as QEMU does.
    /// Payloads are packed byte by byte into shared host clusters (reference §2.7).
    ///
    /// Unlike QEMU, which fails with EIO when the cluster is already allocated, an existing
    /// mapping is replaced and its old cluster released like on any overwrite. Images with
    /// an external data file cannot hold compressed clusters (QEMU: -ENOTSUP).
    ///
    /// Cancellation: once polled, the operation runs to completion even if this future is
    /// dropped (on the runtime, and [`Image::close`] waits for it); only its result is lost.
    #[instrument(level = "debug", skip(self, buf), fields(len = buf.len()))]
    pub async fn write_compressed(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let buf = buf.to_vec();
        self.to_completion(move |img| async move { img.write_compressed_now(offset, &buf).await })
            .await
    }

    /// [`Image::write_compressed`] in place: dropping this future stops it where it is.
    pub(crate) async fn write_compressed_now(&self, offset: u64, buf: &[u8]) -> Result<()> {
        if self.inner.crypto.is_encrypted() {
            // QEMU refuses too: a compressed payload has no sector layout to encrypt.
            return Err(Error::unsupported(
                "compressed clusters",
                "the image is encrypted",
            ));
        }
        if self.inner.external {
            return Err(Error::unsupported(
                "compressed clusters",
                "the image has an external data file",
            ));
        }
        let _instant = self.inner.snap_lock.read().await;
        self.check_writable().await?;
        self.check_range(offset, buf.len() as u64)?;
        let cs = self.cluster_size();
        let gc = offset >> self.inner.geo.cluster_bits();
        if offset % cs != 0 || buf.is_empty() || !self.is_whole(gc, 0, buf.len() as u64) {
            return Err(Error::InvalidArgument(format!(
                "compressed writes take one whole cluster ({cs} bytes at a multiple of {cs}), \
                 got {} bytes at {offset:#x}",
                buf.len()
            )));
        }
        self.mark_bitmaps(offset, buf.len() as u64).await?;
        let mut input = buf.to_vec();
        input.resize(cs as usize, 0);
        let kind = self.inner.compression;
        let packed = blocking(
            move || crate::compress::compress(kind, &input),
            "compressing",
        )
        .await?;
        match packed {
            Some(payload) => self.write_payload(gc, payload).await?,
            None => self.write_cluster(gc, 0, buf).await?,
        }
        if self.inner.barrier == BarrierMode::Full {
            self.flush_now().await?;
        }
        Ok(())
    }

    /// Stores a compressed payload for guest cluster `gc` and points the cluster at it.
    async fn write_payload(&self, gc: u64, payload: Vec<u8>) -> Result<()> {
        let len = payload.len() as u64;
        let bits = self.inner.geo.cluster_bits();
        let _lease = self.inner.leases.exclusive(gc).await;
        let mut meta = self.inner.meta.lock().await;
        let (old, _) = meta.lookup(gc).await?;
        // The L2 table first, then the payload: QEMU's allocation order, so that sequential
        // compressed writes lay the file out as `qemu-img convert -c` does.
        meta.active_l2(gc).await?;
        let host = meta.alloc_bytes(len).await?;
        let desc = match qcow2_format::CompressedDescriptor::new(host, len, bits) {
            Ok(d) => d,
            Err(e) => {
                meta.free_now(host, len).await?;
                return Err(Error::NoSpace(format!(
                    "compressed cluster at {host:#x}: {e}"
                )));
            }
        };
        if let Err(e) = meta
            .overlap_check(host, len, crate::overlap::Kind::Other)
            .await
        {
            meta.free_now(host, len).await?;
            return Err(e);
        }
        drop(meta);
        let written = {
            let _serial = if self.inner.direct_align > 1 {
                Some(self.inner.payload_lock.lock().await)
            } else {
                None
            };
            self.inner
                .file
                .write_at(IoBuf::from_vec(payload), host)
                .await
                .map_err(Error::io("writing a compressed cluster"))
        };
        let mut meta = self.inner.meta.lock().await;
        if let Err(e) = written {
            // Nothing references the payload yet: give its bytes back at once.
            meta.free_now(host, len).await?;
            return Err(e);
        }
        // The payload is written; the L2 entry reaches the disk only after the next barrier
        // (write-back phase order), like every other data write.
        meta.set_entry(gc, L2Entry::Compressed(desc), SubclusterBitmap::default())
            .await?;
        self.release(&mut meta, old);
        Ok(())
    }

    /// Writes `buf` at guest `offset`.
    ///
    /// Cancellation: once polled, the operation runs to completion even if this future is
    /// dropped (on the runtime, and [`Image::close`] waits for it); only its result is lost.
    #[instrument(level = "debug", skip(self, buf), fields(len = buf.len()))]
    pub async fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let buf = buf.to_vec();
        self.to_completion(move |img| async move { img.write_at_now(&buf, offset).await })
            .await
    }

    /// [`Image::write_at`] in place: dropping this future stops it where it is.
    pub(crate) async fn write_at_now(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.guarded_write(offset, buf.len() as u64, async {
            // The clusters of one request are written concurrently (each under its own
            // lease), so a large request keeps several I/Os in flight. On an error the
            // others still finish, so nothing is left half-mapped.
            let writes = self.write_jobs(offset, buf);
            join_all_bounded(writes.into_iter(), WRITE_PARALLELISM).await
        })
        .await
    }

    /// What every guest write of `[offset, offset + len)` does around its data: inside one
    /// snapshot instant, refused on a read-only or corrupt image or out of range, bitmaps
    /// marked before the data moves (invariant 6), and a flush after it with
    /// `BarrierMode::Full`.
    async fn guarded_write<T>(
        &self,
        offset: u64,
        len: u64,
        write: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let _instant = self.inner.snap_lock.read().await;
        self.check_writable().await?;
        self.check_range(offset, len)?;
        self.mark_bitmaps(offset, len).await?;
        let done = write.await?;
        if self.inner.barrier == BarrierMode::Full {
            self.flush_now().await?;
        }
        Ok(done)
    }

    /// The jobs of one write: a cluster each, except that whole clusters in the middle go
    /// in runs of up to [`MAX_RUN`], which get one contiguous allocation and one data write
    /// when none of them is already allocated in place (as QEMU allocates a request's
    /// clusters together); a sequential writer then costs one I/O per request, not one per
    /// cluster.
    fn write_jobs<'a>(&'a self, offset: u64, buf: &'a [u8]) -> Vec<BoxFuture<'a, Result<()>>> {
        let cs = self.cluster_size();
        let mut jobs: Vec<BoxFuture<'a, Result<()>>> = Vec::new();
        let mut run: Option<(u64, std::ops::Range<usize>)> = None;
        let runs_ok = !self.inner.geo.extended_l2() && !self.inner.external;
        for (gc, inc, r) in self.pieces(offset, buf.len() as u64) {
            let whole = runs_ok && inc == 0 && r.len() as u64 == cs;
            match &mut run {
                Some((_, rr)) if whole && (rr.len() as u64) < MAX_RUN * cs => rr.end = r.end,
                _ => {
                    if let Some((g, rr)) = run.take() {
                        jobs.push(Box::pin(self.write_run(g, &buf[rr])));
                    }
                    if whole {
                        run = Some((gc, r));
                    } else {
                        jobs.push(Box::pin(self.write_cluster(gc, inc, &buf[r])));
                    }
                }
            }
        }
        if let Some((g, rr)) = run {
            jobs.push(Box::pin(self.write_run(g, &buf[rr])));
        }
        jobs
    }

    /// Writes whole clusters `gc0..` (all of `data`). When none of them is mapped in place
    /// (unallocated, zero without a cluster of its own, compressed, or shared with a
    /// snapshot) they get one contiguous allocation and a single data write; otherwise each
    /// goes its own way through [`Self::write_cluster`]. The leases are taken in ascending
    /// order, and every other path holds one lease at a time, so runs cannot deadlock.
    async fn write_run(&self, gc0: u64, data: &[u8]) -> Result<()> {
        self.write_run_data(gc0, RunData::Slice(data))
            .await
            .map(|_| ())
    }

    /// Whole clusters one by one, each under its own lease.
    async fn write_clusters(&self, gc0: u64, data: &[u8]) -> Result<()> {
        let cs = self.cluster_size();
        let jobs = data.chunks(cs as usize).enumerate().map(|(i, d)| {
            Box::pin(self.write_cluster(gc0 + i as u64, 0, d)) as BoxFuture<'_, Result<()>>
        });
        join_all_bounded(jobs, WRITE_PARALLELISM).await
    }

    /// [`Image::write_run`] on borrowed or owned bytes; an owned buffer goes to the kernel
    /// as it is when the run is allocated in one piece, and comes back.
    async fn write_run_data(&self, gc0: u64, data: RunData<'_>) -> Result<Option<IoBuf>> {
        let cs = self.cluster_size();
        let n = data.bytes().len() as u64 / cs;
        if n < 2 {
            self.write_clusters(gc0, data.bytes()).await?;
            return Ok(data.into_owned());
        }
        let mut leases = Vec::with_capacity(n as usize);
        for gc in gc0..gc0 + n {
            leases.push(self.inner.leases.exclusive(gc).await);
        }
        let mut meta = self.inner.meta.lock().await;
        let mut old = Vec::with_capacity(n as usize);
        for gc in gc0..gc0 + n {
            let (entry, _) = meta.lookup(gc).await?;
            match entry {
                L2Entry::Normal { copied: true, .. }
                | L2Entry::Zero {
                    host: Some(_),
                    copied: true,
                } => {
                    drop(meta);
                    drop(leases);
                    self.write_clusters(gc0, data.bytes()).await?;
                    return Ok(data.into_owned());
                }
                _ => old.push(entry),
            }
        }
        let host = meta.alloc(n, Pool::Data).await?;
        for i in 0..n {
            if let Err(e) = meta.check_data_target(host + i * cs).await {
                meta.free_now(host, n * cs).await?;
                return Err(e);
            }
        }
        drop(meta);
        let (result, back) = match data {
            RunData::Slice(d) => (self.write_in_place(host, d).await, None),
            // Only for plain images (`write_whole_clusters_buf`): no cipher to apply.
            RunData::Owned(b) => match self.inner.data.write_at(b, host).await {
                Ok(b) => (Ok(()), Some(b)),
                Err(e) => (Err(Error::io("writing guest data")(e)), None),
            },
        };
        let mut meta = self.inner.meta.lock().await;
        if let Err(e) = result {
            // Nothing references the new clusters yet: give them back at once.
            meta.free_now(host, n * cs).await?;
            return Err(e);
        }
        for (i, entry) in old.into_iter().enumerate() {
            let i = i as u64;
            meta.set_entry(
                gc0 + i,
                L2Entry::Normal {
                    host: qcow2_format::HostOffset(host + i * cs),
                    copied: true,
                },
                SubclusterBitmap::default(),
            )
            .await?;
            self.release(&mut meta, entry);
        }
        Ok(back)
    }

    /// [`Image::write_at_now`] for an owned buffer of whole clusters at a cluster boundary
    /// (a run of at most [`MAX_RUN`], standard L2 entries, no data file, no encryption; the
    /// caller checks): a run that allocates writes the caller's buffer without a copy.
    pub(crate) async fn write_whole_clusters_buf(&self, buf: IoBuf, offset: u64) -> Result<IoBuf> {
        let gc0 = offset >> self.inner.geo.cluster_bits();
        let back = self
            .guarded_write(offset, buf.len() as u64, async {
                self.write_run_data(gc0, RunData::Owned(buf)).await
            })
            .await?;
        Ok(back.expect("an owned run gives its buffer back"))
    }

    /// Whether [`Image::write_whole_clusters_buf`] takes a request.
    pub(crate) fn whole_clusters_run(&self, offset: u64, len: u64) -> bool {
        let cs = self.cluster_size();
        offset % cs == 0
            && len % cs == 0
            && len >= 2 * cs
            && len <= MAX_RUN * cs
            && !self.inner.geo.extended_l2()
            && !self.inner.external
            && !self.inner.crypto.is_encrypted()
    }

    async fn write_in_place(&self, host: u64, data: &[u8]) -> Result<()> {
        self.write_data(host, data).await
    }

    async fn write_cluster(&self, gc: u64, inc: u64, data: &[u8]) -> Result<()> {
        if self.inner.geo.extended_l2() {
            return self.write_subclusters(gc, inc, data).await;
        }
        // With O_DIRECT or encryption an unaligned write is a read-modify-write of whole
        // blocks or sectors: it must not run beside another writer of the same cluster (see
        // `direct.rs`, `image/encrypted.rs`).
        let a = self.write_align();
        if a <= 1 || (inc % a == 0 && data.len() as u64 % a == 0) {
            let _shared = self.inner.leases.shared(gc).await;
            let (entry, _) = self.lookup(gc).await?;
            if let L2Entry::Normal { host, copied: true } = entry {
                if !self.inner.external {
                    self.check_data_target(host.0).await?;
                }
                return self.write_in_place(host.0 + inc, data).await;
            }
        }
        let _lease = self.inner.leases.exclusive(gc).await;
        let mut meta = self.inner.meta.lock().await;
        let (entry, _) = meta.lookup(gc).await?;
        let cs = self.cluster_size();
        let (host, fresh) = match entry {
            L2Entry::Normal { host, copied: true } => {
                if !self.inner.external {
                    meta.check_data_target(host.0).await?;
                }
                drop(meta);
                return self.write_in_place(host.0 + inc, data).await;
            }
            // QEMU's zero-alloc: a preallocated cluster we own alone is reused.
            L2Entry::Zero {
                host: Some(h),
                copied: true,
            } => (h.0, false),
            // With an external data file, guest offset == host offset and nothing is counted.
            _ if self.inner.external => (gc << self.inner.geo.cluster_bits(), false),
            _ => (meta.alloc(1, Pool::Data).await?, true),
        };
        // Decided under the metadata lock, before any later allocation can be written: a
        // fresh cluster past everything ever written reads as zeros already.
        let untouched = fresh && !self.inner.external && host >= self.inner.written.mark();
        if self.inner.external {
            // Writes to the data file need no metadata overlap check (QEMU skips it too).
        } else if let Err(e) = meta.check_data_target(host).await {
            if fresh {
                meta.free_now(host, cs).await?;
            }
            return Err(e);
        }
        drop(meta);
        let result = async {
            let buf = if inc == 0 && data.len() as u64 == cs {
                data.to_vec()
            } else if untouched
                && !self.inner.crypto.is_encrypted()
                && self.rest_reads_zero(gc, entry)
            {
                // Only the guest's bytes: the rest of the cluster is already zeros.
                return self.write_in_place(host + inc, data).await;
            } else {
                let mut c = self.cluster_content(gc, entry).await?;
                c[inc as usize..inc as usize + data.len()].copy_from_slice(data);
                c
            };
            self.write_in_place(host, &buf).await
        }
        .await;
        let mut meta = self.inner.meta.lock().await;
        if let Err(e) = result {
            if fresh {
                // Nothing references the new cluster yet: give it back at once.
                meta.free_now(host, cs).await?;
            }
            return Err(e);
        }
        meta.set_entry(
            gc,
            L2Entry::Normal {
                host: qcow2_format::HostOffset(host),
                copied: true,
            },
            SubclusterBitmap::default(),
        )
        .await?;
        if fresh {
            self.release(&mut meta, entry);
        }
        Ok(())
    }

    /// Makes `[offset, offset + len)` read as zeros. With `unmap`, whole clusters are
    /// deallocated; without it they keep their host cluster (v3 "zero-alloc"). On v2 images,
    /// which have no zero flag, zeros are written where the range would not read as zeros.
    ///
    /// Cancellation: once polled, the operation runs to completion even if this future is
    /// dropped (on the runtime, and [`Image::close`] waits for it); only its result is lost.
    #[instrument(level = "debug", skip(self))]
    pub async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.to_completion(move |img| async move { img.write_zeroes_now(offset, len, unmap).await })
            .await
    }

    /// [`Image::write_zeroes`] in place: dropping this future stops it where it is.
    pub(crate) async fn write_zeroes_now(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let _instant = self.inner.snap_lock.read().await;
        self.check_writable().await?;
        self.check_range(offset, len)?;
        self.mark_bitmaps(offset, len).await?;
        for (gc, inc, r) in self.pieces(offset, len) {
            let n = (r.end - r.start) as u64;
            if self.inner.geo.extended_l2() {
                self.zero_subclusters(gc, inc, n, unmap).await?;
                self.raw_data_reads_zero(gc, n, false).await?;
                continue;
            }
            if self.is_whole(gc, inc, n) && self.inner.version3 {
                let _lease = self.inner.leases.exclusive(gc).await;
                let mut meta = self.inner.meta.lock().await;
                let (entry, _) = meta.lookup(gc).await?;
                let new = match entry {
                    L2Entry::Normal { host, copied } if !unmap => L2Entry::Zero {
                        host: Some(host),
                        copied,
                    },
                    L2Entry::Zero { host: Some(_), .. } if !unmap => entry,
                    _ => L2Entry::Zero {
                        host: None,
                        copied: false,
                    },
                };
                if new != entry {
                    meta.set_entry(gc, new, SubclusterBitmap::default()).await?;
                    if new.host_cluster().is_none() {
                        self.release(&mut meta, entry);
                    }
                }
                drop(meta);
                self.raw_data_reads_zero(gc, n, false).await?;
                continue;
            }
            let reads_zero = {
                let _lease = self.inner.leases.shared(gc).await;
                let (entry, _) = self.inner.meta.lock().await.lookup(gc).await?;
                matches!(entry, L2Entry::Zero { .. })
                    || (entry == L2Entry::Unallocated && self.inner.backing.is_none())
            };
            if !reads_zero {
                self.write_cluster(gc, inc, &vec![0u8; n as usize]).await?;
            }
        }
        if self.inner.barrier == BarrierMode::Full {
            self.flush_now().await?;
        }
        Ok(())
    }

    /// Discards whole clusters in the range (partial clusters are left alone, as QEMU does).
    /// On v3 they then read as zeros; on v2 they fall through to the backing file.
    ///
    /// Cancellation: once polled, the operation runs to completion even if this future is
    /// dropped (on the runtime, and [`Image::close`] waits for it); only its result is lost.
    #[instrument(level = "debug", skip(self))]
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.to_completion(move |img| async move { img.discard_now(offset, len).await })
            .await
    }

    /// [`Image::discard`] in place: dropping this future stops it where it is.
    pub(crate) async fn discard_now(&self, offset: u64, len: u64) -> Result<()> {
        let _instant = self.inner.snap_lock.read().await;
        self.check_writable().await?;
        self.check_range(offset, len)?;
        self.mark_bitmaps(offset, len).await?;
        let cs = self.cluster_size();
        for (gc, inc, r) in self.pieces(offset, len) {
            if !self.is_whole(gc, inc, (r.end - r.start) as u64) {
                continue;
            }
            if self.inner.geo.extended_l2() {
                self.discard_extended(gc).await?;
                self.raw_data_reads_zero(gc, cs, true).await?;
                continue;
            }
            let _lease = self.inner.leases.exclusive(gc).await;
            let mut meta = self.inner.meta.lock().await;
            let (entry, _) = meta.lookup(gc).await?;
            let allocated = !matches!(
                entry,
                L2Entry::Unallocated | L2Entry::Zero { host: None, .. }
            );
            if !(allocated || self.inner.backing.is_some()) {
                continue;
            }
            let new = if self.inner.version3 {
                L2Entry::Zero {
                    host: None,
                    copied: false,
                }
            } else {
                L2Entry::Unallocated
            };
            if new != entry {
                meta.set_entry(gc, new, SubclusterBitmap::default()).await?;
                self.release(&mut meta, entry);
            }
            drop(meta);
            self.raw_data_reads_zero(gc, cs, true).await?;
        }
        Ok(())
    }

    /// Recounts every reference and compares with the on-disk refcounts, like
    /// `qemu-img check`. With `repair`, fixes what the mode allows (like `-r leaks|all`) and
    /// reports the state afterwards. Guest I/O waits while a check runs.
    ///
    /// Cancellation: once polled, the operation runs to completion even if this future is
    /// dropped (on the runtime, and [`Image::close`] waits for it); only its result is lost.
    #[instrument(skip(self))]
    pub async fn check(&self, repair: Option<RepairMode>) -> Result<CheckReport> {
        self.to_completion(move |img| async move { img.check_now(repair).await })
            .await
    }

    /// [`Image::check`] in place: dropping this future stops it where it is.
    pub(crate) async fn check_now(&self, repair: Option<RepairMode>) -> Result<CheckReport> {
        if repair.is_some() && self.inner.read_only {
            return Err(Error::ReadOnly);
        }
        let mut meta = self.inner.meta.lock().await;
        meta.check(self.virtual_size(), repair).await
    }

    /// Creates an internal snapshot of the disk as it is now (like `qemu-img snapshot -c`).
    /// Requests that completed before the call are in it; requests that start after it
    /// returns are not.
    ///
    /// Cancellation: once polled, the operation runs to completion even if this future is
    /// dropped (on the runtime, and [`Image::close`] waits for it); only its result is lost.
    #[instrument(skip(self))]
    pub async fn create_snapshot(&self, name: &str) -> Result<SnapshotInfo> {
        let name = name.to_owned();
        self.to_completion(move |img| async move { img.create_snapshot_now(&name).await })
            .await
    }

    /// [`Image::create_snapshot`] in place: dropping this future stops it where it is.
    pub(crate) async fn create_snapshot_now(&self, name: &str) -> Result<SnapshotInfo> {
        self.check_writable().await?;
        let _all = self.inner.snap_lock.write().await;
        self.inner.meta.lock().await.create_snapshot(name).await
    }

    /// Lists internal snapshots (like `qemu-img snapshot -l`).
    ///
    /// Cancellation: safe to drop at any point; it only reads (see [`Image::read_at`]).
    #[instrument(skip(self))]
    pub async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        self.inner.meta.lock().await.list_snapshots().await
    }

    /// Reverts the disk to a snapshot, found by id or else by name (`qemu-img snapshot -a`).
    ///
    /// Cancellation: once polled, the operation runs to completion even if this future is
    /// dropped (on the runtime, and [`Image::close`] waits for it); only its result is lost.
    #[instrument(skip(self))]
    pub async fn apply_snapshot(&self, id_or_name: &str) -> Result<()> {
        let id_or_name = id_or_name.to_owned();
        self.to_completion(move |img| async move { img.apply_snapshot_now(&id_or_name).await })
            .await
    }

    /// [`Image::apply_snapshot`] in place: dropping this future stops it where it is.
    pub(crate) async fn apply_snapshot_now(&self, id_or_name: &str) -> Result<()> {
        self.check_writable().await?;
        let _all = self.inner.snap_lock.write().await;
        let mut meta = self.inner.meta.lock().await;
        meta.apply_snapshot(id_or_name).await?;
        let size = meta.hdr.header.size;
        if size != self.virtual_size() {
            meta.bitmaps.resize(size);
            self.inner
                .size
                .store(size, std::sync::atomic::Ordering::Release);
        }
        // The whole disk may have changed: enabled bitmaps must say so.
        if meta.bitmaps.tracking() {
            meta.bitmaps_before_write().await?;
            meta.bitmaps.set_dirty(0, self.virtual_size());
        }
        Ok(())
    }

    /// Deletes a snapshot, found by id or else by name (`qemu-img snapshot -d`).
    ///
    /// Cancellation: once polled, the operation runs to completion even if this future is
    /// dropped (on the runtime, and [`Image::close`] waits for it); only its result is lost.
    #[instrument(skip(self))]
    pub async fn delete_snapshot(&self, id_or_name: &str) -> Result<()> {
        let id_or_name = id_or_name.to_owned();
        self.to_completion(move |img| async move { img.delete_snapshot_now(&id_or_name).await })
            .await
    }

    /// [`Image::delete_snapshot`] in place: dropping this future stops it where it is.
    pub(crate) async fn delete_snapshot_now(&self, id_or_name: &str) -> Result<()> {
        self.check_writable().await?;
        let _all = self.inner.snap_lock.write().await;
        self.inner
            .meta
            .lock()
            .await
            .delete_snapshot(id_or_name)
            .await
    }

    /// Reads a snapshot's contents without applying it. Unallocated clusters read from the
    /// backing file, as they did when the snapshot was taken.
    ///
    /// Cancellation: safe to drop at any point; it only reads (see [`Image::read_at`]).
    #[instrument(level = "debug", skip(self, buf), fields(len = buf.len()))]
    pub async fn read_snapshot_at(
        &self,
        id_or_name: &str,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<()> {
        let _instant = self.inner.snap_lock.read().await;
        self.inner.crypto.data()?;
        let l1 = self
            .snapshot_l1(id_or_name, offset, buf.len() as u64)
            .await?;
        for (gc, inc, r) in self.pieces(offset, buf.len() as u64) {
            let (entry, bm) = self
                .inner
                .meta
                .lock()
                .await
                .snapshot_lookup(&l1, gc)
                .await?;
            self.read_mapped(gc, entry, bm, inc, &mut buf[r]).await?;
        }
        Ok(())
    }

    /// The L1 table of a snapshot (by id or name), after checking `[offset, offset + len)`
    /// against the snapshot's size. The caller holds the instant lock.
    pub(crate) async fn snapshot_l1(
        &self,
        id_or_name: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u64>> {
        let mut meta = self.inner.meta.lock().await;
        let snap = meta.find_snapshot(id_or_name).await?;
        let size = snap.disk_size.unwrap_or(self.virtual_size());
        if !matches!(offset.checked_add(len), Some(end) if end <= size) {
            return Err(Error::OutOfRange { offset, len, size });
        }
        meta.read_l1(&snap).await
    }

    /// With `data_file_raw` the data file must stay a valid raw image of the guest: zeroed or
    /// discarded clusters are zeroed (or punched) there too. Called under the cluster's
    /// exclusive lease.
    async fn raw_data_reads_zero(&self, gc: u64, len: u64, punch: bool) -> Result<()> {
        if !self.inner.data_raw {
            return Ok(());
        }
        let off = gc << self.inner.geo.cluster_bits();
        let r = if punch {
            self.inner.data.punch_hole(off, len).await
        } else {
            self.inner.data.zero_range(off, len).await
        };
        r.map_err(Error::io("zeroing the raw data file"))
    }

    /// Makes every write that completed before the call durable (invariant 10).
    ///
    /// Cancellation: once polled, the operation runs to completion even if this future is
    /// dropped (on the runtime, and [`Image::close`] waits for it); only its result is lost.
    #[instrument(level = "debug", skip(self))]
    pub async fn flush(&self) -> Result<()> {
        self.to_completion(move |img| async move { img.flush_now().await })
            .await
    }

    /// [`Image::flush`] in place: dropping this future stops it where it is.
    pub(crate) async fn flush_now(&self) -> Result<()> {
        if self.inner.read_only {
            return Ok(());
        }
        let mut meta = self.inner.meta.lock().await;
        meta.writeback().await?;
        meta.barrier.sync().await
    }

    /// Flushes and closes this handle: refcounts are written and, with lazy refcounts, the
    /// dirty bit is cleared. Other clones stay usable (their next write marks the image
    /// dirty again).
    ///
    /// Operations whose futures were dropped before they completed still finish in the
    /// background (see "Cancellation" on each method); `close` waits for them first, so
    /// that what it writes back includes them.
    ///
    /// Cancellation: dropping `close` itself leaves the image as after a `flush` that may
    /// or may not have happened: consistent, possibly still marked dirty (lazy refcounts)
    /// or with bitmaps in use, which the next open handles as after a crash.
    #[instrument(skip(self))]
    pub async fn close(self) -> Result<()> {
        self.inner.detached.wait_idle().await;
        if self.inner.read_only {
            return Ok(());
        }
        let mut meta = self.inner.meta.lock().await;
        if meta.corrupt.is_some() {
            // Writing back could spread the damage; what was flushed before stays.
            return Ok(());
        }
        if let Some(h) = &meta.halted {
            return Err(Error::Halted(h.clone()));
        }
        if meta.bitmaps.has_consistent() {
            meta.store_bitmaps(false).await?;
        }
        meta.mark_clean().await
    }

    // ------------------------------------------------------------------ bitmaps

    /// Sets the bits of `[offset, offset + len)` in every enabled bitmap before the data
    /// moves (invariant 6), flagging the bitmaps `in_use` on disk first if a clean close of
    /// another handle stored them meanwhile.
    async fn mark_bitmaps(&self, offset: u64, len: u64) -> Result<()> {
        use std::sync::atomic::Ordering;
        if !self.inner.tracking.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut meta = self.inner.meta.lock().await;
        meta.bitmaps_before_write().await?;
        meta.bitmaps.set_dirty(offset, len);
        Ok(())
    }

    /// Runs a bitmap management operation as one instant between guest requests.
    async fn manage_bitmaps<T>(
        &self,
        f: impl for<'a> FnOnce(
            &'a mut Meta,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T>> + Send + 'a>,
        >,
    ) -> Result<T> {
        self.check_writable().await?;
        let _all = self.inner.snap_lock.write().await;
        let mut meta = self.inner.meta.lock().await;
        let r = f(&mut meta).await;
        self.inner.tracking.store(
            meta.bitmaps.tracking(),
            std::sync::atomic::Ordering::Release,
        );
        r
    }

    /// The image's persistent dirty bitmaps (like the bitmap list of `qemu-img info`).
    ///
    /// Cancellation: safe to drop at any point; it only reads (see [`Image::read_at`]).
    pub async fn bitmaps(&self) -> Vec<BitmapInfo> {
        self.inner.meta.lock().await.bitmap_infos()
    }

    /// Guest byte ranges that bitmap `name` marks dirty within `range`, merged and clipped.
    /// Fails for an unknown or inconsistent bitmap.
    ///
    /// Cancellation: safe to drop at any point; it only reads (see [`Image::read_at`]).
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// # use qcow2_async::{CreateOptions, Image, OpenOptions};
    /// # let dir = tempfile::tempdir()?;
    /// # let img = Image::create(dir.path().join("d.qcow2"), &CreateOptions::new(4 << 20),
    /// #                         &OpenOptions::default()).await?;
    /// img.add_bitmap("backup", &Default::default()).await?;
    /// img.write_at(&[1; 4096], 1 << 20).await?;
    /// let size = img.virtual_size();
    /// let changed = img.dirty_ranges("backup", 0..size).await?;
    /// assert_eq!(changed, vec![(1 << 20)..(1 << 20) + 65536]);
    /// # img.close().await?;
    /// # Ok::<(), Box<dyn std::error::Error>>(()) }).unwrap();
    /// ```
    pub async fn dirty_ranges(&self, name: &str, range: Range<u64>) -> Result<Vec<Range<u64>>> {
        self.inner
            .meta
            .lock()
            .await
            .bitmap_dirty_ranges(name, range)
    }

    /// Adds an empty persistent bitmap (`qemu-img bitmap --add`).
    ///
    /// Cancellation: once polled, the operation runs to completion even if this future is
    /// dropped (on the runtime, and [`Image::close`] waits for it); only its result is lost.
    #[instrument(skip(self, opts))]
    pub async fn add_bitmap(&self, name: &str, opts: &BitmapOptions) -> Result<()> {
        let (name, opts) = (name.to_owned(), opts.clone());
        self.to_completion(move |img| async move { img.add_bitmap_now(&name, &opts).await })
            .await
    }

    /// [`Image::add_bitmap`] in place: dropping this future stops it where it is.
    pub(crate) async fn add_bitmap_now(&self, name: &str, opts: &BitmapOptions) -> Result<()> {
        let opts = opts.clone();
        let name = name.to_string();
        self.manage_bitmaps(move |m| Box::pin(async move { m.add_bitmap(&name, &opts).await }))
            .await
    }

    /// Removes a bitmap and frees its clusters (`--remove`); inconsistent ones too.
    ///
    /// Cancellation: once polled, the operation runs to completion even if this future is
    /// dropped (on the runtime, and [`Image::close`] waits for it); only its result is lost.
    #[instrument(skip(self))]
    pub async fn remove_bitmap(&self, name: &str) -> Result<()> {
        let name = name.to_owned();
        self.to_completion(move |img| async move { img.remove_bitmap_now(&name).await })
            .await
    }

    /// [`Image::remove_bitmap`] in place: dropping this future stops it where it is.
    pub(crate) async fn remove_bitmap_now(&self, name: &str) -> Result<()> {
        let name = name.to_string();
        self.manage_bitmaps(move |m| Box::pin(async move { m.remove_bitmap(&name).await }))
            .await
    }

    /// Clears every bit of a bitmap (`--clear`).
    ///
    /// Cancellation: once polled, the operation runs to completion even if this future is
    /// dropped (on the runtime, and [`Image::close`] waits for it); only its result is lost.
    #[instrument(skip(self))]
    pub async fn clear_bitmap(&self, name: &str) -> Result<()> {
        let name = name.to_owned();
        self.to_completion(move |img| async move { img.clear_bitmap_now(&name).await })
            .await
    }

    /// [`Image::clear_bitmap`] in place: dropping this future stops it where it is.
    pub(crate) async fn clear_bitmap_now(&self, name: &str) -> Result<()> {
        let name = name.to_string();
        self.manage_bitmaps(move |m| Box::pin(async move { m.clear_bitmap(&name).await }))
            .await
    }

    /// Starts (`true`, `--enable`) or stops (`--disable`) recording writes in a bitmap.
    ///
    /// Cancellation: once polled, the operation runs to completion even if this future is
    /// dropped (on the runtime, and [`Image::close`] waits for it); only its result is lost.
    #[instrument(skip(self))]
    pub async fn enable_bitmap(&self, name: &str, enabled: bool) -> Result<()> {
        let name = name.to_owned();
        self.to_completion(move |img| async move { img.enable_bitmap_now(&name, enabled).await })
            .await
    }

    /// [`Image::enable_bitmap`] in place: dropping this future stops it where it is.
    pub(crate) async fn enable_bitmap_now(&self, name: &str, enabled: bool) -> Result<()> {
        let name = name.to_string();
        self.manage_bitmaps(move |m| Box::pin(async move { m.enable_bitmap(&name, enabled).await }))
            .await
    }

    /// Adds the dirty bits of every bitmap in `sources` to `target` (`--merge`).
    ///
    /// Cancellation: once polled, the operation runs to completion even if this future is
    /// dropped (on the runtime, and [`Image::close`] waits for it); only its result is lost.
    #[instrument(skip(self))]
    pub async fn merge_bitmaps(&self, target: &str, sources: &[&str]) -> Result<()> {
        let target = target.to_owned();
        let sources: Vec<String> = sources.iter().map(|s| s.to_string()).collect();
        self.to_completion(move |img| async move {
            img.merge_bitmaps_now(
                &target,
                &sources.iter().map(String::as_str).collect::<Vec<_>>(),
            )
            .await
        })
        .await
    }

    /// [`Image::merge_bitmaps`] in place: dropping this future stops it where it is.
    pub(crate) async fn merge_bitmaps_now(&self, target: &str, sources: &[&str]) -> Result<()> {
        let target = target.to_string();
        let sources: Vec<String> = sources.iter().map(|s| s.to_string()).collect();
        self.manage_bitmaps(move |m| {
            Box::pin(async move {
                let s: Vec<&str> = sources.iter().map(String::as_str).collect();
                m.merge_bitmaps(&target, &s).await
            })
        })
        .await
    }
}

impl Image {
    /// Whether a cluster with this old mapping reads as zeros (nothing to copy on write).
    fn rest_reads_zero(&self, gc: u64, entry: L2Entry) -> bool {
        match entry {
            L2Entry::Zero { .. } => true,
            L2Entry::Unallocated => self
                .inner
                .backing
                .as_ref()
                .map_or(true, |b| gc << self.inner.geo.cluster_bits() >= b.size()),
            _ => false,
        }
    }

    /// Drops the reference an old mapping held, once the new mapping is durable. Clusters
    /// of an external data file are not reference counted.
    fn release(&self, meta: &mut Meta, old: L2Entry) {
        if !self.inner.external {
            release(meta, old, self.cluster_size());
        }
    }
}

/// Drops the reference an old mapping held, once the new mapping is durable.
fn release(meta: &mut Meta, old: L2Entry, cs: u64) {
    match old {
        L2Entry::Normal { host, .. }
        | L2Entry::Zero {
            host: Some(host), ..
        } => meta.free_later(host.0, cs),
        L2Entry::Compressed(d) => {
            let (start, len) = d.host_range();
            meta.free_later(start, len);
        }
        _ => {}
    }
}

/// Clusters of one read in flight at once.
const READ_PARALLELISM: usize = 8;
/// Clusters of one write in flight at once.
const WRITE_PARALLELISM: usize = 8;
/// Most whole clusters allocated and written together by one job of a write.
const MAX_RUN: u64 = 32;

/// Runs every future of `futs`, at most `limit` at a time, to completion, and returns the
/// first error. Unlike [`join_bounded`] nothing is dropped half-way: a write that already
/// allocated finishes its mapping (or gives its cluster back) before the error is reported.
async fn join_all_bounded<'a>(
    mut futs: impl Iterator<Item = BoxFuture<'a, Result<()>>>,
    limit: usize,
) -> Result<()> {
    let mut active: Vec<BoxFuture<'a, Result<()>>> = Vec::with_capacity(limit);
    let mut first_err = None;
    let mut exhausted = false;
    std::future::poll_fn(|cx| loop {
        while !exhausted && first_err.is_none() && active.len() < limit {
            match futs.next() {
                Some(f) => active.push(f),
                None => exhausted = true,
            }
        }
        let before = active.len();
        let mut i = 0;
        while i < active.len() {
            match active[i].as_mut().poll(cx) {
                std::task::Poll::Ready(r) => {
                    drop(active.swap_remove(i));
                    if let Err(e) = r {
                        first_err.get_or_insert(e);
                    }
                }
                std::task::Poll::Pending => i += 1,
            }
        }
        if active.is_empty() && (exhausted || first_err.is_some()) {
            return std::task::Poll::Ready(match first_err.take() {
                Some(e) => Err(e),
                None => Ok(()),
            });
        }
        if active.len() == before {
            return std::task::Poll::Pending;
        }
    })
    .await
}

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Runs the futures of `futs`, at most `limit` at a time, in the calling task; stops at the
/// first error (the rest are dropped, which is harmless for reads).
async fn join_bounded<'a>(
    mut futs: impl Iterator<Item = BoxFuture<'a, Result<()>>>,
    limit: usize,
) -> Result<()> {
    let mut active: Vec<BoxFuture<'a, Result<()>>> = Vec::with_capacity(limit);
    let mut exhausted = false;
    std::future::poll_fn(|cx| loop {
        while !exhausted && active.len() < limit {
            match futs.next() {
                Some(f) => active.push(f),
                None => exhausted = true,
            }
        }
        let before = active.len();
        let mut i = 0;
        while i < active.len() {
            match active[i].as_mut().poll(cx) {
                std::task::Poll::Ready(Ok(())) => {
                    drop(active.swap_remove(i));
                }
                std::task::Poll::Ready(Err(e)) => return std::task::Poll::Ready(Err(e)),
                std::task::Poll::Pending => i += 1,
            }
        }
        if exhausted && active.is_empty() {
            return std::task::Poll::Ready(Ok(()));
        }
        if active.len() == before {
            return std::task::Poll::Pending;
        }
    })
    .await
}

/// Runs CPU-bound work (compression) on Tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
    context: &'static str,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Io {
            context,
            source: std::io::Error::other(e),
        })?
}

/// Where the backing file `name` recorded in `image` is (relative names are relative to
/// the image's folder, as in QEMU).
pub(crate) fn backing_path(image: &Path, name: &str) -> PathBuf {
    relative_to(image, name)
}

/// `name` relative to the folder of `image`, unless absolute.
fn relative_to(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        image.parent().unwrap_or(Path::new(".")).join(p)
    }
}

/// Where the external data file is, per the caller's policy. The safe policy refuses names
/// that leave the image's folder: an image from an untrusted source must not make us read
/// or write an arbitrary host file (cf. CVE-style data-file disclosure in lima #5441).
fn resolve_data_file(hdr: &ImageHeader, image: &Path, policy: &DataFilePolicy) -> Result<PathBuf> {
    let named = || {
        hdr.data_file
            .clone()
            .ok_or_else(|| Error::InvalidArgument("'data-file' is required for this image".into()))
    };
    match policy {
        DataFilePolicy::Override(p) => Ok(p.clone()),
        DataFilePolicy::FromImage => Ok(relative_to(image, &named()?)),
        DataFilePolicy::BesideImage => {
            let name = named()?;
            let p = Path::new(&name);
            let escapes = p.is_absolute()
                || p.components().any(|c| {
                    !matches!(
                        c,
                        std::path::Component::Normal(_) | std::path::Component::CurDir
                    )
                });
            if escapes {
                return Err(Error::InvalidArgument(format!(
                    "refusing data file name '{name}': it leaves the image's folder"
                )));
            }
            Ok(relative_to(image, &name))
        }
    }
}

/// O_DIRECT files get a byte-granular view (see `direct.rs`); others are used as they are.
fn wrap_direct(file: Arc<dyn BlockFile>) -> Arc<dyn BlockFile> {
    if file.alignment() > 1 {
        Arc::new(crate::direct::AlignedFile::new(file))
    } else {
        file
    }
}

async fn read_header(file: &Arc<dyn BlockFile>) -> Result<ImageHeader> {
    let prefix = file
        .read_at(IoBuf::zeroed(512, 1), 0)
        .await
        .map_err(Error::io("reading the header"))?;
    let cs = ImageHeader::cluster_size_hint(&prefix).map_err(Error::format("header"))?;
    let len = file.len().await.map_err(Error::io("sizing the image"))?;
    let n = cs.min(len.max(512)) as usize;
    let bytes = file
        .read_at(IoBuf::zeroed(n, 1), 0)
        .await
        .map_err(Error::io("reading the header"))?;
    ImageHeader::decode(&bytes, &Limits::QEMU).map_err(Error::format("header"))
}

/// Refuses, with a typed error, what this engine cannot do correctly yet (invariant 8).
fn check_features(hdr: &ImageHeader, read_only: bool, for_repair: bool) -> Result<()> {
    let h = &hdr.header;
    if h.crypt_method == CryptMethod::Aes && !read_only {
        return Err(Error::unsupported(
            "writing legacy AES-encrypted images (crypt_method 1)",
            "AES-CBC keyed directly by the passphrase with predictable IVs is insecure and \
             deprecated by QEMU; open read-only, or convert to LUKS",
        ));
    }
    if h.incompatible
        .contains(IncompatibleFeatures::EXTERNAL_DATA_FILE)
        && h.nb_snapshots > 0
    {
        return Err(Error::Corrupt(
            "internal snapshots in an image with an external data file".into(),
        ));
    }
    if read_only {
        return Ok(());
    }
    if h.incompatible.contains(IncompatibleFeatures::CORRUPT) && !for_repair {
        return Err(Error::Corrupt(
            "image is corrupt; cannot be opened read/write".into(),
        ));
    }
    if h.nb_snapshots > 0 && h.refcount_order.bits() < 2 {
        // Shared clusters cannot be counted with 1-bit refcounts.
        return Err(Error::unsupported("snapshots with 1-bit refcounts", ""));
    }
    Ok(())
}

async fn open_backing(
    hdr: &ImageHeader,
    image: &Path,
    opts: &OpenOptions,
    depth: u32,
    chain: &mut Vec<PathBuf>,
) -> Result<Option<Disk>> {
    let (path, format) = match (&opts.backing, &hdr.backing_file) {
        (BackingPolicy::Ignore, _) | (_, None) => return Ok(None),
        (BackingPolicy::Forbid, Some(name)) => {
            return Err(Error::Backing {
                path: name.into(),
                reason: "backing files are forbidden by the open policy".into(),
            })
        }
        (BackingPolicy::Override(p, f), Some(_)) => {
            if let Some(url) = p.to_str().filter(|p| crate::remote::is_url(p)) {
                // The caller's own choice of a URL: no policy to consult.
                return remote::open_remote(url, Some(*f), opts, depth + 1, chain)
                    .await
                    .map(Some);
            }
            (p.clone(), *f)
        }
        (BackingPolicy::FromImage, Some(name)) => {
            if name.starts_with("json:") {
                return Err(Error::unsupported("backing file protocol", name.clone()));
            }
            if let Some(url) = remote::backing_url(image, name, opts)? {
                let format = hdr
                    .backing_format
                    .as_deref()
                    .map(|f| {
                        f.parse::<BackingFormat>().map_err(|reason| Error::Backing {
                            path: url.clone().into(),
                            reason,
                        })
                    })
                    .transpose()?;
                return remote::open_remote(&url, format, opts, depth + 1, chain)
                    .await
                    .map(Some);
            }
            let p = Path::new(name);
            let path = if p.is_absolute() {
                p.to_path_buf()
            } else {
                image.parent().unwrap_or(Path::new(".")).join(p)
            };
            let format = match &hdr.backing_format {
                Some(f) => f.parse::<BackingFormat>().map_err(|reason| Error::Backing {
                    path: path.clone(),
                    reason,
                })?,
                None if opts.probe_backing_format => probe_format(&path)?,
                None => {
                    return Err(Error::Backing {
                        path,
                        reason: "the image names no backing format; pass one (BackingPolicy::Override) or allow probing".into(),
                    })
                }
            };
            (path, format)
        }
    };
    if depth + 1 > opts.max_backing_depth {
        return Err(Error::Backing {
            path,
            reason: format!("backing chain deeper than {}", opts.max_backing_depth),
        });
    }
    let canon = std::fs::canonicalize(&path).map_err(|e| Error::Backing {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    if chain.contains(&canon) {
        return Err(Error::Backing {
            path,
            reason: "backing chain loop".into(),
        });
    }
    let sub = OpenOptions {
        read_only: true,
        backing: BackingPolicy::FromImage,
        ..opts.clone()
    };
    Ok(Some(match format {
        BackingFormat::Qcow2 => {
            Disk::Qcow2(Box::pin(Image::open_path(&path, &sub, depth + 1, chain)).await?)
        }
        BackingFormat::Raw => {
            let lock = crate::lock::FileLock::acquire(
                &path,
                crate::lock::Access::raw(true),
                opts.locking,
                false,
            )?;
            let f = open_file(
                &path,
                &FileOptions {
                    aio: opts.aio,
                    direct: false,
                    read_only: true,
                    create: false,
                    truncate: false,
                    ring: opts.ring,
                },
            )
            .map_err(Error::io("opening the backing file"))?;
            let f = crate::lock::LockedFile::wrap(f, lock);
            let len = f
                .len()
                .await
                .map_err(Error::io("sizing the backing file"))?;
            Disk::Raw(f, len)
        }
    }))
}

pub(crate) fn probe_format(path: &Path) -> Result<BackingFormat> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut magic))
        .map_err(|e| Error::Backing {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    Ok(if n == 4 && &magic == b"QFI\xfb" {
        BackingFormat::Qcow2
    } else {
        BackingFormat::Raw
    })
}

impl Disk {
    /// Opens a disk read-only for use as a backing file, or as the source of `convert` and
    /// `compare`: a qcow2 image (with its own backing chain, per `opts`) or a raw file.
    ///
    /// Cancellation: safe to drop at any point; it only reads, and drops the locks it took.
    pub async fn open(path: &Path, format: BackingFormat, opts: &OpenOptions) -> Result<Disk> {
        let ro = OpenOptions {
            read_only: true,
            ..opts.clone()
        };
        match format {
            BackingFormat::Qcow2 => Ok(Disk::Qcow2(Image::open(path, &ro).await?)),
            BackingFormat::Raw => {
                let lock = crate::lock::FileLock::acquire(
                    path,
                    crate::lock::Access::raw(true),
                    opts.locking,
                    false,
                )?;
                let f = open_file(
                    path,
                    &FileOptions {
                        aio: opts.aio,
                        direct: false,
                        read_only: true,
                        create: false,
                        truncate: false,
                        ring: opts.ring,
                    },
                )
                .map_err(Error::io("opening a raw image"))?;
                let f = crate::lock::LockedFile::wrap(f, lock);
                let len = f.len().await.map_err(Error::io("sizing a raw image"))?;
                Ok(Disk::Raw(f, len))
            }
        }
    }
}

/// The bytes of a run write: the caller's slice, or its owned buffer (given back).
enum RunData<'a> {
    Slice(&'a [u8]),
    Owned(IoBuf),
}

impl RunData<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            RunData::Slice(s) => s,
            RunData::Owned(b) => b,
        }
    }

    fn into_owned(self) -> Option<IoBuf> {
        match self {
            RunData::Slice(_) => None,
            RunData::Owned(b) => Some(b),
        }
    }
}
