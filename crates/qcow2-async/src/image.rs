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

use std::path::{Path, PathBuf};
use std::sync::Arc;

use qcow2_format::{
    AutoclearFeatures, CompatibleFeatures, CompressionType, CryptMethod, Geometry, Header,
    ImageHeader, IncompatibleFeatures, L2Entry, Limits, RefcountOrder, SubclusterBitmap,
    SubclusterState, Version,
};
use tokio::sync::Mutex;
use tracing::instrument;

use crate::backing::Backing;
use crate::barrier::{Barrier, BarrierMode};
use crate::check::{CheckReport, RepairMode};
use crate::error::{Error, Result};
use crate::io::{open_file, BlockFile, FileOptions, IoBuf};
use crate::lease::ClusterLeases;
use crate::meta::{Meta, Pool};
use crate::options::{BackingFormat, BackingPolicy, CreateOptions, OpenOptions, Preallocation};

/// An open qcow2 image. Cheap to clone; every clone is the same image, and any number of
/// tasks may call it at once.
///
/// ```no_run
/// # async fn demo() -> qcow2_async::Result<()> {
/// use qcow2_async::{CreateOptions, Image, OpenOptions};
/// let img = Image::create("disk.qcow2", &CreateOptions::new(1 << 30), &OpenOptions::default()).await?;
/// img.write_at(b"hello", 4096).await?;
/// let mut buf = [0u8; 5];
/// img.read_at(&mut buf, 4096).await?;
/// assert_eq!(&buf, b"hello");
/// img.close().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Image {
    inner: Arc<Inner>,
}

struct Inner {
    path: Option<PathBuf>,
    file: Arc<dyn BlockFile>,
    meta: Mutex<Meta>,
    leases: ClusterLeases,
    backing: Option<Backing>,
    geo: Geometry,
    size: u64,
    read_only: bool,
    barrier: BarrierMode,
    compression: CompressionType,
    version3: bool,
    /// Block size the file needs for O_DIRECT (1 without).
    direct_align: u64,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("path", &self.inner.path)
            .field("size", &self.inner.size)
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
    Backing,
}

impl Image {
    /// Creates an image at `path` (replacing any file there) and opens it.
    #[instrument(skip_all, fields(path = %path.as_ref().display(), size = create.size))]
    pub async fn create(
        path: impl AsRef<Path>,
        create: &CreateOptions,
        open: &OpenOptions,
    ) -> Result<Image> {
        let path = path.as_ref();
        let file = open_file(
            path,
            &FileOptions {
                aio: open.aio,
                direct: open.direct,
                read_only: false,
                create: true,
                truncate: true,
            },
        )
        .map_err(Error::io("creating the image file"))?;
        let file = wrap_direct(file);
        Self::format_file(file.clone(), create).await?;
        Self::open_handle(file, Some(path.to_path_buf()), open, None).await
    }

    /// Writes a fresh image into `file` exactly as `qemu-img create` lays it out (reference
    /// §1.4): header, refcount table, one refcount block, L1 table.
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
        if o.extended_l2 {
            return Err(Error::unsupported(
                "extended L2 entries",
                "creating extended-L2 images lands with subcluster writes",
            ));
        }
        if o.backing_file.is_some() && o.backing_format.is_none() {
            return Err(Error::InvalidArgument(
                "backing file specified without backing format".into(),
            ));
        }
        let size = o.size.div_ceil(512) * 512;
        let mut compatible = CompatibleFeatures::empty();
        compatible.set(CompatibleFeatures::LAZY_REFCOUNTS, o.lazy_refcounts);
        let mut incompatible = IncompatibleFeatures::empty();
        incompatible.set(IncompatibleFeatures::COMPRESSION_TYPE, o.zstd);
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
                autoclear: AutoclearFeatures::empty(),
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
            data_file: None,
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
        meta.l1 = vec![0; l1_entries as usize];
        meta.hdr.header.size = size;
        meta.hdr.header.l1_size = l1_entries as u32;
        meta.hdr.header.l1_table_offset = l1_off;
        meta.write_header().await?;
        if o.preallocation != Preallocation::Off {
            let mut end = 0;
            for gc in 0..geo.clusters_for(size) {
                let host = meta.alloc(1, Pool::Data).await?;
                meta.set_entry(
                    gc,
                    L2Entry::Normal {
                        host: qcow2_format::HostOffset(host),
                        copied: true,
                    },
                    SubclusterBitmap::default(),
                )
                .await?;
                match o.preallocation {
                    Preallocation::Falloc => file.allocate(host, cs).await,
                    Preallocation::Full => file.zero_range(host, cs).await,
                    _ => Ok(()),
                }
                .map_err(Error::io("preallocating"))?;
                end = end.max(host + cs);
            }
            meta.writeback().await?;
            let len = file.len().await.map_err(Error::io("sizing"))?;
            if len < end {
                file.set_len(end)
                    .await
                    .map_err(Error::io("preallocating"))?;
            }
        }
        meta.writeback().await?;
        barrier.sync().await
    }

    /// Opens the image at `path`.
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
        let file = open_file(
            path,
            &FileOptions {
                aio: opts.aio,
                direct: opts.direct,
                read_only: opts.read_only,
                create: false,
                truncate: false,
            },
        )
        .map_err(Error::io("opening the image"))?;
        let direct_align = file.alignment() as u64;
        let file = wrap_direct(file);
        let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        chain.push(canon);
        let hdr = read_header(&file).await?;
        let backing = open_backing(&hdr, path, opts, depth, chain).await?;
        let img = Self::open_handle(file, Some(path.to_path_buf()), opts, backing).await?;
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
    pub async fn open_handle(
        file: Arc<dyn BlockFile>,
        path: Option<PathBuf>,
        opts: &OpenOptions,
        backing: Option<Backing>,
    ) -> Result<Image> {
        let mut hdr = read_header(&file).await?;
        check_features(&hdr, opts.read_only)?;
        let h = &hdr.header;
        let geo = h.geometry().map_err(Error::format("header"))?;
        let size = h.size;
        let compression = h.compression_type;
        let version3 = h.version == Version::V3;
        let barrier = Barrier::new(opts.barrier, vec![file.clone()]);
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
        if rewrite {
            meta.write_header().await?;
            meta.barrier.order().await?;
        }
        Ok(Image {
            inner: Arc::new(Inner {
                path,
                file,
                meta: Mutex::new(meta),
                leases: ClusterLeases::default(),
                backing,
                geo,
                size,
                read_only: opts.read_only,
                barrier: opts.barrier,
                compression,
                version3,
                direct_align: if opts.direct { 4096 } else { 1 },
            }),
        })
    }

    /// Virtual disk size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.inner.size
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
    pub fn backing(&self) -> Option<&Backing> {
        self.inner.backing.as_ref()
    }

    /// A copy of the current header (fields, extensions, backing name).
    pub async fn header(&self) -> ImageHeader {
        self.inner.meta.lock().await.hdr.clone()
    }

    /// The on-disk refcount of host cluster `index` as the engine sees it (for tests and
    /// diagnostics).
    pub async fn refcount(&self, index: u64) -> Result<u64> {
        self.inner.meta.lock().await.refcount(index).await
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.inner.size => Ok(()),
            _ => Err(Error::OutOfRange {
                offset,
                len,
                size: self.inner.size,
            }),
        }
    }

    async fn check_writable(&self) -> Result<()> {
        if self.inner.read_only {
            return Err(Error::ReadOnly);
        }
        if let Some(c) = &self.inner.meta.lock().await.corrupt {
            return Err(Error::Corrupt(c.clone()));
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
        n == cs || (inc == 0 && (gc << self.inner.geo.cluster_bits()) + n == self.inner.size)
    }

    // ------------------------------------------------------------------ reads

    /// Reads `buf.len()` bytes at guest `offset`.
    #[instrument(level = "debug", skip(self, buf), fields(len = buf.len()))]
    pub async fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        for (gc, inc, r) in self.pieces(offset, buf.len() as u64) {
            let _lease = self.inner.leases.shared(gc).await;
            let (entry, bm) = self.inner.meta.lock().await.lookup(gc).await?;
            self.read_mapped(gc, entry, bm, inc, &mut buf[r]).await?;
        }
        Ok(())
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
                        SubclusterState::Unallocated => Source::Backing,
                    }
                } else {
                    Source::Data(host.0 + inc)
                }
            }
            L2Entry::Zero { .. } => Source::Zero,
            L2Entry::Unallocated if ext && bm.state(sub) == SubclusterState::Zero => Source::Zero,
            L2Entry::Unallocated => Source::Backing,
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
            match src {
                Source::Zero => piece.fill(0),
                Source::Backing => match &self.inner.backing {
                    Some(b) => {
                        b.read(piece, (gc << self.inner.geo.cluster_bits()) + pos)
                            .await?
                    }
                    None => piece.fill(0),
                },
                Source::Data(host) => {
                    let b = self
                        .inner
                        .file
                        .read_at(IoBuf::zeroed(n, 1), host)
                        .await
                        .map_err(Error::io("reading guest data"))?;
                    piece.copy_from_slice(&b);
                }
            }
            done += n;
        }
        Ok(())
    }

    async fn decompress(&self, d: qcow2_format::CompressedDescriptor) -> Result<Vec<u8>> {
        let raw = self
            .inner
            .file
            .read_at(IoBuf::zeroed(d.read_len() as usize, 1), d.host_offset())
            .await
            .map_err(Error::io("reading a compressed cluster"))?;
        let kind = self.inner.compression;
        let cs = self.cluster_size() as usize;
        tokio::task::spawn_blocking(move || crate::compress::decompress(kind, &raw, cs))
            .await
            .map_err(|e| Error::Io {
                context: "decompressing",
                source: std::io::Error::other(e),
            })?
    }

    /// The guest view of a whole cluster (for copy-on-write).
    async fn cluster_content(&self, gc: u64, entry: L2Entry) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; self.cluster_size() as usize];
        self.read_mapped(gc, entry, SubclusterBitmap::default(), 0, &mut buf)
            .await?;
        Ok(buf)
    }

    // ------------------------------------------------------------------ writes

    /// Writes `buf` at guest `offset`.
    #[instrument(level = "debug", skip(self, buf), fields(len = buf.len()))]
    pub async fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable().await?;
        self.check_range(offset, buf.len() as u64)?;
        for (gc, inc, r) in self.pieces(offset, buf.len() as u64) {
            self.write_cluster(gc, inc, &buf[r]).await?;
        }
        if self.inner.barrier == BarrierMode::Full {
            self.flush().await?;
        }
        Ok(())
    }

    async fn write_in_place(&self, host: u64, data: &[u8]) -> Result<()> {
        self.inner
            .file
            .write_at(IoBuf::from_slice(data, 1), host)
            .await
            .map(|_| ())
            .map_err(Error::io("writing guest data"))
    }

    async fn write_cluster(&self, gc: u64, inc: u64, data: &[u8]) -> Result<()> {
        // With O_DIRECT an unaligned write is a read-modify-write of whole blocks: it must
        // not run beside another writer of the same cluster (see `direct.rs`).
        let a = self.inner.direct_align;
        if a <= 1 || (inc % a == 0 && data.len() as u64 % a == 0) {
            let _shared = self.inner.leases.shared(gc).await;
            let (entry, _) = self.inner.meta.lock().await.lookup(gc).await?;
            if let L2Entry::Normal { host, copied: true } = entry {
                return self.write_in_place(host.0 + inc, data).await;
            }
        }
        let _lease = self.inner.leases.exclusive(gc).await;
        let (entry, _) = self.inner.meta.lock().await.lookup(gc).await?;
        let cs = self.cluster_size();
        let (host, fresh) = match entry {
            L2Entry::Normal { host, copied: true } => {
                return self.write_in_place(host.0 + inc, data).await;
            }
            // QEMU's zero-alloc: a preallocated cluster we own alone is reused.
            L2Entry::Zero {
                host: Some(h),
                copied: true,
            } => (h.0, false),
            _ => (
                self.inner.meta.lock().await.alloc(1, Pool::Data).await?,
                true,
            ),
        };
        let result = async {
            let buf = if inc == 0 && data.len() as u64 == cs {
                data.to_vec()
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
            release(&mut meta, entry, cs);
        }
        Ok(())
    }

    /// Makes `[offset, offset + len)` read as zeros. With `unmap`, whole clusters are
    /// deallocated; without it they keep their host cluster (v3 "zero-alloc"). On v2 images,
    /// which have no zero flag, zeros are written where the range would not read as zeros.
    #[instrument(level = "debug", skip(self))]
    pub async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.check_writable().await?;
        self.check_range(offset, len)?;
        let cs = self.cluster_size();
        for (gc, inc, r) in self.pieces(offset, len) {
            let n = (r.end - r.start) as u64;
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
                        release(&mut meta, entry, cs);
                    }
                }
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
            self.flush().await?;
        }
        Ok(())
    }

    /// Discards whole clusters in the range (partial clusters are left alone, as QEMU does).
    /// On v3 they then read as zeros; on v2 they fall through to the backing file.
    #[instrument(level = "debug", skip(self))]
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable().await?;
        self.check_range(offset, len)?;
        let cs = self.cluster_size();
        for (gc, inc, r) in self.pieces(offset, len) {
            if !self.is_whole(gc, inc, (r.end - r.start) as u64) {
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
                release(&mut meta, entry, cs);
            }
        }
        Ok(())
    }

    /// Recounts every reference and compares with the on-disk refcounts, like
    /// `qemu-img check`. With `repair`, fixes what the mode allows (like `-r leaks|all`) and
    /// reports the state afterwards. Guest I/O waits while a check runs.
    #[instrument(skip(self))]
    pub async fn check(&self, repair: Option<RepairMode>) -> Result<CheckReport> {
        if repair.is_some() && self.inner.read_only {
            return Err(Error::ReadOnly);
        }
        let mut meta = self.inner.meta.lock().await;
        meta.check(self.inner.size, repair).await
    }

    /// Makes every write that completed before the call durable (invariant 10).
    #[instrument(level = "debug", skip(self))]
    pub async fn flush(&self) -> Result<()> {
        if self.inner.read_only {
            return Ok(());
        }
        let mut meta = self.inner.meta.lock().await;
        meta.writeback().await?;
        meta.barrier.sync().await
    }

    /// Flushes and closes this handle. Other clones stay usable.
    #[instrument(skip(self))]
    pub async fn close(self) -> Result<()> {
        self.flush().await
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
fn check_features(hdr: &ImageHeader, read_only: bool) -> Result<()> {
    let h = &hdr.header;
    if h.crypt_method != CryptMethod::None {
        return Err(Error::unsupported(
            "encryption",
            format!("{:?}", h.crypt_method),
        ));
    }
    if h.incompatible
        .contains(IncompatibleFeatures::EXTERNAL_DATA_FILE)
    {
        return Err(Error::unsupported("external data file", ""));
    }
    if read_only {
        return Ok(());
    }
    if h.incompatible.contains(IncompatibleFeatures::CORRUPT) {
        return Err(Error::Corrupt(
            "image is corrupt; cannot be opened read/write".into(),
        ));
    }
    if h.incompatible.contains(IncompatibleFeatures::DIRTY) {
        return Err(Error::unsupported(
            "dirty image (lazy refcounts)",
            "refcounts must be repaired before writing; open read-only",
        ));
    }
    if h.incompatible.contains(IncompatibleFeatures::EXTENDED_L2) {
        return Err(Error::unsupported(
            "writing extended L2 entries",
            "open read-only",
        ));
    }
    if hdr.bitmaps.is_some() {
        return Err(Error::unsupported(
            "writing images with persistent dirty bitmaps",
            "open read-only",
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
) -> Result<Option<Backing>> {
    let (path, format) = match (&opts.backing, &hdr.backing_file) {
        (BackingPolicy::Ignore, _) | (_, None) => return Ok(None),
        (BackingPolicy::Forbid, Some(name)) => {
            return Err(Error::Backing {
                path: name.into(),
                reason: "backing files are forbidden by the open policy".into(),
            })
        }
        (BackingPolicy::Override(p, f), Some(_)) => (p.clone(), *f),
        (BackingPolicy::FromImage, Some(name)) => {
            if name.starts_with("json:") || name.contains("://") {
                return Err(Error::unsupported("backing file protocol", name.clone()));
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
            Backing::Qcow2(Box::pin(Image::open_path(&path, &sub, depth + 1, chain)).await?)
        }
        BackingFormat::Raw => {
            let f = open_file(
                &path,
                &FileOptions {
                    aio: opts.aio,
                    direct: false,
                    read_only: true,
                    create: false,
                    truncate: false,
                },
            )
            .map_err(Error::io("opening the backing file"))?;
            let len = f
                .len()
                .await
                .map_err(Error::io("sizing the backing file"))?;
            Backing::Raw(f, len)
        }
    }))
}

fn probe_format(path: &Path) -> Result<BackingFormat> {
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
