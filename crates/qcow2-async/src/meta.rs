//! Metadata state of an open image and the I/O that keeps it: the header (its one owner),
//! the L1 table and L2 cache (`mapping.rs`), the refcounts (`refcounts.rs`) and the two
//! allocators (`alloc.rs`). Those types hold the state and its invariants without I/O;
//! `Meta` reads what they lack, writes what they changed, and orders the writes.
//!
//! Everything here runs under the image's metadata lock (a Tokio mutex), which is never held
//! during guest data I/O. Changes are made in memory and written back in phases
//! ([`Meta::writeback`]):
//!
//! 1. refcount blocks (they only ever carry increments, or decrements for clusters nothing
//!    durable references any more, so writing them early is always safe);
//! 2. barrier — data and refcounts are durable;
//! 3. L2 tables; barrier; then the L1 entries pointing at new L2 tables; barrier;
//! 4. deferred frees: refcount decrements of clusters whose last reference was just removed
//!    on disk (invariant 1: decreases only after the reference is gone).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use qcow2_format::growth::{growth_area_start, plan_refcount_area, refblock_covers_itself};
use qcow2_format::l2::encode_extended;
use qcow2_format::{
    Geometry, ImageHeader, L1Entry, L2Entry, L2Format, Limits, RefcountOrder, SubclusterBitmap,
};

use crate::alloc::{Allocators, PayloadCursor, Pool};
use crate::barrier::Barrier;
use crate::compress::DecompressedCache;
use crate::error::{Error, Result};
use crate::io::{BlockFile, IoBuf};
use crate::l1::L1Table;
use crate::mapping::{L2Cache, L2Table, MappingIndex};
use crate::refcounts::Refcounts;

pub(crate) struct Meta {
    pub(crate) file: Arc<dyn BlockFile>,
    pub(crate) barrier: Barrier,
    pub(crate) hdr: ImageHeader,
    pub(crate) geo: Geometry,
    pub(crate) fmt: L2Format,
    pub(crate) limits: Limits,
    pub(crate) l1: L1Table,
    /// L2 tables; the ones the active L1 points at are published to lookups that do not
    /// take the metadata lock (`mapping.rs`).
    l2: L2Cache,
    pub(crate) refcounts: Refcounts,
    alloc: Allocators,
    /// Decompressed clusters by payload location; invalidated here when locations are freed
    /// or handed out for a new payload.
    pub(crate) decompressed: Arc<DecompressedCache>,
    pub(crate) discard_passthrough: bool,
    pub(crate) corrupt: Option<String>,
    /// Set when a metadata write failed after memory had moved ahead of the disk in a way
    /// that cannot be undone (a refcount table growth): every later write and write-back is
    /// refused with [`Error::Halted`], so the diverged state never reaches the disk, which
    /// keeps its last consistent state (at worst with leaked clusters).
    pub(crate) halted: Option<String>,
    /// Opened read-write: corruption then sets the header's corrupt bit.
    pub(crate) writable: bool,
    /// Lazy refcounts in use: refcount blocks may stay unwritten while the dirty bit is set.
    pub(crate) lazy: bool,
    /// The dirty bit is set on disk.
    pub(crate) marked_dirty: bool,
    /// Where metadata lies, for overlap checks, shared with the request path (the set of
    /// refcount blocks lives there).
    pub(crate) regions: Arc<crate::overlap::Regions>,
    /// Persistent dirty bitmaps (`bitmaps.rs`).
    pub(crate) bitmaps: crate::bitmaps::Bitmaps,
    /// Reserve file space ahead of data allocations (O_DIRECT on a growing file): writes
    /// then land inside the file, where ext4 and XFS run direct writes concurrently instead
    /// of serialising every file-extending one.
    pub(crate) preallocate: bool,
    /// The file is reserved up to here.
    prealloc_end: u64,
}

/// Memory for recently decompressed clusters (at least two clusters, at most 64).
const DECOMPRESSED_CACHE_BYTES: u64 = 8 << 20;

type BoxFut<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

impl Meta {
    pub(crate) async fn load(
        file: Arc<dyn BlockFile>,
        barrier: Barrier,
        hdr: ImageHeader,
        limits: Limits,
        cache_clusters: usize,
    ) -> Result<Meta> {
        let h = &hdr.header;
        let geo = h.geometry().map_err(Error::format("header"))?;
        let fmt = L2Format {
            cluster_bits: geo.cluster_bits(),
            extended_l2: geo.extended_l2(),
            external_data_file: h
                .incompatible
                .contains(qcow2_format::IncompatibleFeatures::EXTERNAL_DATA_FILE),
            zero_flag: h.version == qcow2_format::Version::V3,
        };
        let l1_bytes = read_exact(&file, h.l1_table_offset, u64::from(h.l1_size) * 8).await?;
        // Entries are not validated here: like QEMU, an image with a bad entry opens, `check`
        // reports it, and using the entry fails (`l1_entry`, `refcount`).
        let l1 = L1Table::new(be64s(&l1_bytes));
        let rt_bytes = read_exact(
            &file,
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * geo.cluster_size(),
        )
        .await?;
        let refcounts = Refcounts::new(
            h.refcount_order,
            geo.cluster_bits(),
            be64s(&rt_bytes),
            cache_clusters,
        );
        let regions = Arc::new(crate::overlap::Regions::default());
        regions.set_refblocks(refcounts.block_offsets());
        regions.set_header(crate::overlap::HeaderRanges::of(&hdr, geo.cluster_size()));
        Ok(Meta {
            file,
            barrier,
            geo,
            fmt,
            limits,
            l1,
            l2: L2Cache::new(cache_clusters, Arc::new(MappingIndex::new(geo, fmt))),
            refcounts,
            alloc: Allocators::default(),
            decompressed: Arc::new(DecompressedCache::new(
                geo.cluster_size(),
                DECOMPRESSED_CACHE_BYTES,
            )),
            discard_passthrough: false,
            corrupt: None,
            halted: None,
            writable: false,
            lazy: false,
            marked_dirty: false,
            regions,
            bitmaps: Default::default(),
            preallocate: false,
            prealloc_end: 0,
            hdr,
        })
    }

    /// The lookup view of the L2 cache, for the request path.
    pub(crate) fn mapping_index(&self) -> Arc<MappingIndex> {
        self.l2.index().clone()
    }

    pub(crate) fn cs(&self) -> u64 {
        self.geo.cluster_size()
    }

    pub(crate) async fn read_cluster(&self, off: u64) -> Result<Box<[u8]>> {
        Ok(read_exact(&self.file, off, self.cs())
            .await?
            .into_boxed_slice())
    }

    /// Writes metadata after QEMU's "cached" overlap check (invariant 9): a write that would
    /// land on a different kind of metadata marks the image corrupt and fails.
    pub(crate) async fn write(&mut self, off: u64, data: &[u8], what: &'static str) -> Result<()> {
        self.overlap_check(off, data.len() as u64, crate::overlap::Kind::of(what))
            .await?;
        self.file
            .write_at(IoBuf::from_slice(data, 1), off)
            .await
            .map(|_| ())
            .map_err(Error::io(what))
    }

    pub(crate) async fn write_header(&mut self) -> Result<()> {
        // The one place header changes reach the disk, so the one place they are published.
        self.regions
            .set_header(crate::overlap::HeaderRanges::of(&self.hdr, self.cs()));
        let bytes = self.hdr.encode().map_err(Error::format("header"))?;
        self.write(0, &bytes, "header").await
    }

    // ---------------------------------------------------------------- refcounts

    pub(crate) fn order(&self) -> RefcountOrder {
        self.refcounts.order()
    }

    async fn load_block(&mut self, off: u64) -> Result<()> {
        if !self.refcounts.is_cached(off) {
            self.evict_blocks().await?;
            let data = self.read_cluster(off).await?;
            self.refcounts.cache_block(off, data, false);
        }
        Ok(())
    }

    /// The refcount block covering `cluster`, after validating its table entry (QEMU
    /// signals corruption for an unaligned or reserved-bit entry rather than reading it).
    async fn valid_block_offset(&mut self, cluster: u64) -> Result<Option<u64>> {
        match self.refcounts.valid_block_for(cluster) {
            Ok(off) => Ok(off),
            Err(msg) => Err(self.signal_corruption(msg).await),
        }
    }

    pub(crate) async fn refcount(&mut self, cluster: u64) -> Result<u64> {
        let Some(off) = self.valid_block_offset(cluster).await? else {
            return Ok(0);
        };
        self.load_block(off).await?;
        self.refcounts.get(off, cluster)
    }

    /// Sets the refcount of a cluster whose refcount block exists.
    pub(crate) async fn set_refcount(&mut self, cluster: u64, value: u64) -> Result<()> {
        let off = self
            .valid_block_offset(cluster)
            .await?
            .ok_or_else(|| Error::Corrupt(format!("no refcount block for cluster {cluster}")))?;
        self.load_block(off).await?;
        self.refcounts.set(off, cluster, value)
    }

    /// Adds `delta` to the refcount of every cluster overlapping `[off, off + len)`.
    pub(crate) async fn update_refcount(&mut self, off: u64, len: u64, delta: i64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let first = off >> self.geo.cluster_bits();
        let last = (off + len - 1) >> self.geo.cluster_bits();
        for c in first..=last {
            if delta > 0 {
                while self.ensure_block(c).await? {}
            }
            let old = self.refcount(c).await?;
            let new = if delta >= 0 {
                old.checked_add(delta as u64)
                    .filter(|&v| v <= self.order().max())
                    .ok_or_else(|| {
                        Error::NoSpace(format!("refcount overflow for cluster {c} ({old}+{delta})"))
                    })?
            } else {
                old.checked_sub(delta.unsigned_abs()).ok_or_else(|| {
                    Error::Corrupt(format!("refcount underflow for cluster {c} ({old}{delta})"))
                })?
            };
            self.set_refcount(c, new).await?;
            if new == 0 {
                self.cluster_freed(c).await?;
            }
        }
        Ok(())
    }

    async fn cluster_freed(&mut self, c: u64) -> Result<()> {
        let off = c << self.geo.cluster_bits();
        // A freed cluster may be reused for anything: stale cached copies must not be
        // written over its new contents.
        self.l2.remove(off);
        self.refcounts.forget_block(off);
        self.alloc.freed(c, self.geo.cluster_bits());
        // Payloads there are gone: serving the cluster's old contents is wrong too.
        self.decompressed.invalidate(off, self.cs());
        if self.discard_passthrough {
            let _ = self.file.punch_hole(off, self.cs()).await;
        }
        Ok(())
    }

    /// Makes sure the refcount block covering `cluster` exists. Returns true when it had to
    /// create one, in which case allocation must restart: the new block (and a grown table)
    /// may occupy the clusters the caller was about to take (QEMU's -EAGAIN).
    fn ensure_block(&mut self, cluster: u64) -> BoxFut<'_, bool> {
        Box::pin(async move {
            if self.refcounts.block_for(cluster).is_some() {
                return Ok(false);
            }
            let cs = self.cs();
            let order = self.order();
            let rt = self.refcounts.table_index(cluster);
            let from = self.alloc.pool(Pool::Metadata).search_from();
            let new_block = self.find_free(from, 1).await?;
            self.alloc.pool(Pool::Metadata).took(new_block, 1);
            if new_block == 0 {
                return Err(Error::Corrupt(
                    "preventing invalid allocation of refcount block at offset 0".into(),
                ));
            }
            let new_off = new_block * cs;
            let covers_itself = refblock_covers_itself(new_off, rt, self.geo.cluster_bits(), order);
            if covers_itself {
                self.evict_blocks().await?;
                self.refcounts.cache_block(
                    new_off,
                    vec![0u8; cs as usize].into_boxed_slice(),
                    true,
                );
                self.refcounts.set(new_off, new_block, 1)?;
            } else {
                // The new block lives in a range some other (maybe new) block covers.
                while self.ensure_block(new_block).await? {}
                if self.refcount(new_block).await? != 0 {
                    // Taken by the block created just now: start over.
                    return Ok(true);
                }
                self.set_refcount(new_block, 1).await?;
                self.evict_blocks().await?;
                self.refcounts.cache_block(
                    new_off,
                    vec![0u8; cs as usize].into_boxed_slice(),
                    true,
                );
            }
            // The block must be on disk before anything points at it, and memory points at
            // it only once the disk does: a failed write leaves both as they were.
            let in_table = self.refcounts.table_has(rt);
            let placed: Result<()> = async {
                self.write_blocks().await?;
                self.barrier.order().await?;
                if in_table {
                    let entry_off = self.hdr.header.refcount_table_offset + rt * 8;
                    self.write(entry_off, &new_off.to_be_bytes(), "refcount table entry")
                        .await?;
                    self.barrier.order().await?;
                }
                Ok(())
            }
            .await;
            if let Err(e) = placed {
                // Unreferenced on disk (at worst referenced by an entry whose sync failed:
                // a leak), so the cached copy must go before the cluster is reused.
                self.refcounts.forget_block(new_off);
                if !covers_itself {
                    self.set_refcount(new_block, 0).await?;
                }
                return Err(e);
            }
            if in_table {
                self.refcounts.set_table_entry(rt, new_off);
                self.regions.add_refblock(new_off);
                return Ok(true);
            }
            if let Err(e) = self.grow_reftable(cluster, rt, new_off).await {
                if self.halted.is_none() {
                    // Not grown: the new block is as unreferenced as after a failed entry.
                    self.refcounts.forget_block(new_off);
                    if !covers_itself {
                        self.set_refcount(new_block, 0).await?;
                    }
                }
                return Err(e);
            }
            Ok(true)
        })
    }

    /// Stops all further writes after a failed metadata update that memory already reflects
    /// (see `halted`). Returns `e` itself, for the request that hit it; later ones get
    /// [`Error::Halted`].
    pub(crate) fn halt(&mut self, what: &'static str, e: Error) -> Error {
        let msg = format!("{what}: {e}");
        tracing::error!("qcow2: stopping writes: {msg}");
        if self.halted.is_none() {
            self.halted = Some(msg);
        }
        // The flag that makes writers look here (`Image::check_writable`).
        self.regions.set_corrupt(true);
        e
    }

    /// QEMU's reftable growth (reference §3.3 step 6 and §3.4).
    ///
    /// Until the header points at the new table, the disk still uses the old one: a failed
    /// write before that puts memory back as it was (old table, no new blocks), so the image
    /// goes on as if the growth had not been tried. Only a header write whose sync failed
    /// leaves the disk undecided between the tables; then writes halt (`Meta::halt`).
    async fn grow_reftable(&mut self, cluster: u64, rt: u64, new_off: u64) -> Result<()> {
        let cs = self.cs();
        let bits = self.geo.cluster_bits();
        let start = growth_area_start(cluster, new_off, bits, self.order())
            .map_err(Error::format("refcount growth"))?;
        let plan = plan_refcount_area(
            start,
            0,
            false,
            bits,
            self.order(),
            self.refcounts.table(),
            Some((rt, new_off)),
            &self.limits,
        )
        .map_err(|e| Error::NoSpace(format!("refcount table cannot grow: {e}")))?;
        let old_off = self.hdr.header.refcount_table_offset;
        let old_clusters = self.hdr.header.refcount_table_clusters;
        let mut old_table = None;
        let prepared: Result<()> = async {
            for &(_, off) in &plan.new_blocks {
                self.evict_blocks().await?;
                self.refcounts
                    .cache_block(off, vec![0u8; cs as usize].into_boxed_slice(), true);
            }
            old_table = Some(self.refcounts.replace_table(plan.table.clone()));
            self.regions.set_refblocks(self.refcounts.block_offsets());
            for c in plan.start_offset / cs..plan.end_offset / cs {
                self.set_refcount(c, 1).await?;
            }
            self.write_blocks().await?;
            self.barrier.order().await?;
            let mut bytes = Vec::with_capacity(plan.table.len() * 8);
            for e in &plan.table {
                bytes.extend_from_slice(&e.to_be_bytes());
            }
            self.write(plan.table_offset, &bytes, "refcount table")
                .await?;
            self.barrier.order().await?;
            self.hdr.header.refcount_table_offset = plan.table_offset;
            self.hdr.header.refcount_table_clusters = plan.table_clusters as u32;
            self.write_header().await
        }
        .await;
        if let Err(e) = prepared {
            // The header was not written: the disk uses the old table. Undo.
            self.hdr.header.refcount_table_offset = old_off;
            self.hdr.header.refcount_table_clusters = old_clusters;
            if let Some(old) = old_table {
                self.refcounts.replace_table(old);
            }
            self.regions.set_refblocks(self.refcounts.block_offsets());
            for &(_, off) in &plan.new_blocks {
                self.refcounts.forget_block(off);
            }
            return Err(e);
        }
        if let Err(e) = self.barrier.order().await {
            return Err(self.halt("switching to the grown refcount table", e));
        }
        // The header no longer points at the old table: free it now (or at the next
        // write-back, if a refcount block cannot be loaded or evicted now: only a leak).
        // Cluster by cluster, so that exactly the ones not yet freed are deferred.
        for c in 0..u64::from(old_clusters) {
            let off = old_off + c * cs;
            if self.update_refcount(off, cs, -1).await.is_err() {
                self.free_later(off, cs);
            }
        }
        Ok(())
    }

    /// First run of `n` clusters with refcount 0 at or after `from`.
    async fn find_free(&mut self, from: u64, n: u64) -> Result<u64> {
        let max = self.limits.max_host_offset >> self.geo.cluster_bits();
        let mut start = from.max(1);
        let mut c = start;
        while c < start + n {
            if c >= max {
                return Err(Error::NoSpace("host offsets exhausted".into()));
            }
            if self.refcount(c).await? != 0 {
                start = c + 1;
            }
            c += 1;
        }
        Ok(start)
    }

    /// Allocates `n` contiguous clusters with refcount 1 and returns the host offset.
    ///
    /// Mirrors QEMU's `qcow2_alloc_clusters` so that layouts match `qemu-img`: the pool's
    /// cursor moves past the run *before* missing refcount blocks are created (they land
    /// after it), and when a block had to be created the search restarts from the run's
    /// start (QEMU's -EAGAIN).
    pub(crate) async fn alloc(&mut self, n: u64, pool: Pool) -> Result<u64> {
        loop {
            let from = self.alloc.pool(pool).search_from();
            let start = self.find_free(from, n).await?;
            self.alloc.pool(pool).took(start, n);
            let mut restart = false;
            for c in start..start + n {
                if self.ensure_block(c).await? {
                    restart = true;
                    break;
                }
            }
            if restart {
                self.alloc.pool(pool).retry_from(start);
                continue;
            }
            for c in start..start + n {
                self.set_refcount(c, 1).await?;
            }
            if pool == Pool::Data && self.preallocate {
                self.reserve_ahead((start + n) << self.geo.cluster_bits())
                    .await;
            }
            return Ok(start << self.geo.cluster_bits());
        }
    }

    /// Allocates `size` bytes (at most a cluster) for a compressed payload, as QEMU's
    /// `qcow2_alloc_bytes` does (reference §2.7): payloads are packed back to back from an
    /// in-memory cursor; each host cluster the payload touches gains one reference, so a
    /// cluster shared by N payloads has refcount N. A cluster whose refcount is already at
    /// the maximum is not packed further; a payload that does not fit spills into the next
    /// cluster only if the data allocator's next free cluster is the adjacent one.
    pub(crate) async fn alloc_bytes(&mut self, size: u64) -> Result<u64> {
        let cs = self.cs();
        let bits = self.geo.cluster_bits();
        if size == 0 || size > cs {
            return Err(Error::InvalidArgument(format!(
                "compressed payload of {size} bytes for {cs}-byte clusters"
            )));
        }
        // The descriptor addresses less than 2^56 with clusters above 16 KiB.
        let limit = self.limits.max_host_offset.min(1u64 << (70 - bits));
        let mut open = self.alloc.payloads().open(cs);
        if let Some((at, _)) = open {
            if self.refcount(at >> bits).await? >= self.order().max() {
                self.alloc.payloads().close();
                open = None;
            }
        }
        let offset = loop {
            let (offset, _room) = match open {
                Some((at, room)) if room >= size => (at, room),
                _ => {
                    let from = self.alloc.pool(Pool::Data).search_from();
                    let idx = self.find_free(from, 1).await?;
                    self.alloc.pool(Pool::Data).took(idx, 1);
                    let fresh = idx << bits;
                    if fresh + cs > limit {
                        return Err(Error::NoSpace(format!(
                            "compressed cluster offsets end at {limit:#x}"
                        )));
                    }
                    PayloadCursor::spill_or_start(open, fresh, cs)
                }
            };
            // A refcount block created now may land on the clusters chosen (QEMU's -EAGAIN):
            // choose again.
            let mut restart = false;
            for c in (offset >> bits)..=((offset + size - 1) >> bits) {
                if self.ensure_block(c).await? {
                    restart = true;
                    break;
                }
            }
            if restart {
                open = None;
                continue;
            }
            self.update_refcount(offset, size, 1).await?;
            break offset;
        };
        self.alloc.payloads().placed(offset + size, cs);
        self.decompressed.invalidate(offset, size);
        Ok(offset)
    }

    /// Makes sure the file is reserved up to `end`, in chunks of 1/8 of the file (at least
    /// 64 MiB, at most 1 GiB). A file system that cannot reserve simply stops preallocation:
    /// it only ever costs speed.
    async fn reserve_ahead(&mut self, end: u64) {
        if end <= self.prealloc_end {
            return;
        }
        if self.prealloc_end == 0 {
            self.prealloc_end = self.file.len().await.unwrap_or(0);
            if end <= self.prealloc_end {
                return;
            }
        }
        let chunk = (self.prealloc_end / 8).clamp(64 << 20, 1 << 30);
        let cs = self.cs();
        let new_end = (end.max(self.prealloc_end) + chunk).div_ceil(cs) * cs;
        match self
            .file
            .allocate(self.prealloc_end, new_end - self.prealloc_end)
            .await
        {
            Ok(()) => self.prealloc_end = new_end,
            Err(e) => {
                tracing::debug!("preallocation stopped: {e}");
                self.preallocate = false;
            }
        }
    }

    /// Releases a reference once the metadata that held it is durable (invariant 1).
    pub(crate) fn free_later(&mut self, off: u64, len: u64) {
        self.refcounts.defer_free(off, len);
    }

    /// Releases a reference nothing on disk has seen yet (e.g. after a failed data write).
    pub(crate) async fn free_now(&mut self, off: u64, len: u64) -> Result<()> {
        self.update_refcount(off, len, -1).await
    }

    // ---------------------------------------------------------------- mapping

    async fn load_l2(&mut self, off: u64) -> Result<()> {
        if !self.l2.contains(off) {
            self.evict_l2().await?;
            let data = self.read_cluster(off).await?;
            self.l2.insert(off, L2Table::from_bytes(&data), false);
        }
        Ok(())
    }

    fn l1_entry(&self, l1_index: u64) -> Result<L1Entry> {
        let raw = self.l1.get(l1_index);
        L1Entry::decode(raw, self.geo.cluster_bits())
            .map_err(|e| Error::Corrupt(format!("L1 entry {l1_index}: {e}")))
    }

    /// The L2 entry of guest cluster `gc` if its table is cached (or there is none);
    /// otherwise where the table is, for the caller to read without the metadata lock and
    /// hand to [`Meta::lookup_loaded`], so that misses of different tables overlap.
    pub(crate) async fn probe(&mut self, gc: u64) -> Result<Probe> {
        let pos = self
            .geo
            .locate(qcow2_format::GuestOffset(gc << self.geo.cluster_bits()));
        match self.l1_entry(pos.l1_index)?.l2_offset {
            Some(l2) if !self.l2.contains(l2.0) => Ok(Probe::Load {
                l2: l2.0,
                token: self.l2.begin_load(l2.0),
            }),
            _ => Ok(Probe::Found(self.lookup(gc).await?)),
        }
    }

    /// [`Meta::lookup`] with the table's bytes read since [`Meta::probe`]: they are cached
    /// if they are still current (see `L2Cache::loading`) and the L1 entry still points at
    /// them; otherwise they are dropped and the table is read again under the lock.
    pub(crate) async fn lookup_loaded(
        &mut self,
        gc: u64,
        l2: u64,
        token: crate::mapping::LoadToken,
        bytes: &[u8],
    ) -> Result<(L2Entry, SubclusterBitmap)> {
        let pos = self
            .geo
            .locate(qcow2_format::GuestOffset(gc << self.geo.cluster_bits()));
        let current = self.l2.finish_load(token);
        let same = self.l1_entry(pos.l1_index)?.l2_offset.map(|o| o.0) == Some(l2);
        if current && same && bytes.len() as u64 == self.cs() {
            self.evict_l2().await?;
            if !self.l2.contains(l2) {
                self.l2.insert(l2, L2Table::from_bytes(bytes), false);
            }
        }
        self.lookup(gc).await
    }

    /// The L2 entry (and subcluster bitmap) of guest cluster `gc`.
    pub(crate) async fn lookup(&mut self, gc: u64) -> Result<(L2Entry, SubclusterBitmap)> {
        let pos = self
            .geo
            .locate(qcow2_format::GuestOffset(gc << self.geo.cluster_bits()));
        let Some(l2) = self.l1_entry(pos.l1_index)?.l2_offset else {
            return Ok((L2Entry::Unallocated, SubclusterBitmap::default()));
        };
        self.load_l2(l2.0).await?;
        // From now on lookups of this table's clusters need not come here.
        self.l2.link(pos.l1_index, l2.0);
        let fmt = self.fmt;
        let decoded = self.l2.get(l2.0).expect("loaded").entry(pos.l2_index, fmt);
        match decoded {
            Ok(d) => Ok(d),
            Err(e) => {
                let msg = format!(
                    "invalid cluster entry found (L2 offset: {:#x}, L2 index: {:#x}): {e}",
                    l2.0, pos.l2_index
                );
                Err(self.signal_corruption(msg).await)
            }
        }
    }

    /// Points guest cluster `gc` at `entry`, allocating or copying its L2 table as needed.
    pub(crate) async fn set_entry(
        &mut self,
        gc: u64,
        entry: L2Entry,
        bm: SubclusterBitmap,
    ) -> Result<()> {
        let (w0, w1) = if self.fmt.extended_l2 {
            encode_extended(&entry, bm, self.fmt)
        } else {
            entry.encode(self.fmt).map(|w| (w, 0))
        }
        .map_err(Error::format("L2 entry"))?;
        let l2_off = self.active_l2(gc).await?;
        let pos = self
            .geo
            .locate(qcow2_format::GuestOffset(gc << self.geo.cluster_bits()));
        let words = self.geo.l2_entry_size() as usize / 8;
        let table = self.l2.get(l2_off).expect("loaded");
        let at = pos.l2_index * words;
        table.set_word(at, w0);
        if words == 2 {
            table.set_word(at + 1, w1);
        }
        self.l2.mark_dirty(l2_off);
        Ok(())
    }

    /// The offset of the L2 table holding `gc`'s entry, loaded and owned by the active image
    /// alone: allocated if missing, copied if shared with a snapshot.
    pub(crate) async fn active_l2(&mut self, gc: u64) -> Result<u64> {
        let pos = self
            .geo
            .locate(qcow2_format::GuestOffset(gc << self.geo.cluster_bits()));
        let l1e = self.l1_entry(pos.l1_index)?;
        Ok(match l1e.l2_offset {
            Some(o) if l1e.copied => {
                self.load_l2(o.0).await?;
                o.0
            }
            old => {
                // No table yet, or one shared with a snapshot: the active image gets its own.
                let new = self.alloc(1, Pool::Metadata).await?;
                let data = match old {
                    Some(o) => {
                        self.load_l2(o.0).await?;
                        let copy = self.l2.get(o.0).expect("loaded").duplicate();
                        self.free_later(o.0, self.cs());
                        copy
                    }
                    None => L2Table::zeroed(self.cs() as usize),
                };
                self.evict_l2().await?;
                self.l2.insert(new, data, true);
                self.set_l1(
                    pos.l1_index,
                    L1Entry::new(qcow2_format::HostOffset(new), true),
                );
                self.l2.link(pos.l1_index, new);
                new
            }
        })
    }

    /// Forgets every cached refcount block (after the structures were replaced on disk).
    pub(crate) fn reset_refcount_cache(&mut self) {
        self.refcounts.clear_cache();
        self.alloc.reset();
    }

    /// Forgets every cached L2 table (after tables were patched on disk). Call only when
    /// nothing is dirty.
    pub(crate) fn drop_l2_cache(&mut self) {
        self.l2.clear();
    }

    pub(crate) fn l2_cached(&self, off: u64) -> bool {
        self.l2.contains(off)
    }

    /// An L2 table's current contents (cached, possibly dirty, or from disk).
    pub(crate) async fn l2_contents(&mut self, off: u64) -> Result<Vec<u8>> {
        self.load_l2(off).await?;
        Ok(self.l2.get(off).expect("loaded").to_bytes())
    }

    /// Replaces a cached L2 table's contents (dirty until the next write-back).
    pub(crate) async fn put_l2(&mut self, off: u64, data: Box<[u8]>) -> Result<()> {
        self.load_l2(off).await?;
        self.l2.get(off).expect("loaded").store_bytes(&data);
        self.l2.mark_dirty(off);
        Ok(())
    }

    pub(crate) fn set_l1_entry(&mut self, idx: u64, e: L1Entry) {
        self.set_l1(idx, e);
    }

    /// Moves the active L1 table to fresh clusters with room for `entries` (QEMU's
    /// `qcow2_grow_l1_table` with an exact size): everything pending is written first so
    /// the copy never points at an L2 table that is not on disk; the header switch is one
    /// synced write; the old table is freed after it.
    pub(crate) async fn grow_l1(&mut self, entries: u64) -> Result<()> {
        if entries <= self.l1.len() {
            return Ok(());
        }
        let bytes = entries * 8;
        if bytes > self.limits.max_l1_bytes || entries > u64::from(u32::MAX) {
            return Err(Error::NoSpace(format!(
                "an L1 table of {entries} entries exceeds the limit of {} bytes",
                self.limits.max_l1_bytes
            )));
        }
        self.writeback().await?;
        let cs = self.cs();
        let clusters = bytes.div_ceil(cs);
        let off = self.alloc(clusters, Pool::Metadata).await?;
        let mut l1 = self.l1.entries().to_vec();
        l1.resize(entries as usize, 0);
        let mut buf: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        buf.resize((clusters * cs) as usize, 0);
        self.write(off, &buf, "new L1 table").await?;
        self.write_blocks().await?;
        self.barrier.sync().await?;
        let h = &mut self.hdr.header;
        let old = (h.l1_table_offset, u64::from(h.l1_size) * 8);
        h.l1_table_offset = off;
        h.l1_size = entries as u32;
        self.write_header().await?;
        self.barrier.sync().await?;
        self.l1.replace(l1, true);
        if old.1 > 0 {
            self.free_later(old.0, old.1);
        }
        self.writeback().await
    }

    fn set_l1(&mut self, idx: u64, e: L1Entry) {
        // Lookups must not keep using the table the entry pointed at.
        self.l2.unlink(idx);
        self.l1.set(idx, e.encode());
    }

    // ---------------------------------------------------------------- write-back

    pub(crate) async fn write_blocks(&mut self) -> Result<()> {
        for off in self.refcounts.dirty_blocks() {
            let Some(data) = self.refcounts.block_bytes(off) else {
                continue;
            };
            // Clean only once written: after a failed write the block stays dirty and is
            // never evicted, so no later L2 write can get ahead of its refcounts.
            self.write(off, &data, "refcount block").await?;
            self.refcounts.mark_written(off);
        }
        Ok(())
    }

    async fn evict_blocks(&mut self) -> Result<()> {
        if self.refcounts.evict_clean() {
            return Ok(());
        }
        // Refcount blocks may be written at any time (see the module docs).
        self.write_blocks().await?;
        self.refcounts.evict_clean();
        Ok(())
    }

    async fn evict_l2(&mut self) -> Result<()> {
        if self.l2.evict_clean() {
            return Ok(());
        }
        Box::pin(self.writeback()).await?;
        self.l2.evict_clean();
        Ok(())
    }

    /// Writes all dirty metadata in crash-safe order, then applies deferred frees.
    pub(crate) async fn writeback(&mut self) -> Result<()> {
        if let Some(m) = &self.halted {
            return Err(Error::Halted(m.clone()));
        }
        let dirty_l2 = self.l2.dirty();
        let mapping_changes = !dirty_l2.is_empty() || self.l1.is_dirty();
        if self.lazy {
            // Lazy refcounts (reference §3.5): mark the image dirty before the first mapping
            // change reaches the disk, then leave refcount blocks in memory until close.
            if mapping_changes && !self.marked_dirty {
                self.set_dirty_bit(true).await?;
            }
        } else {
            self.write_blocks().await?;
        }
        if mapping_changes {
            self.barrier.order().await?;
            for off in dirty_l2 {
                let data = self.l2.get(off).expect("dirty entry").to_bytes();
                self.write(off, &data, "L2 table").await?;
                self.l2.mark_clean(off);
            }
            if self.l1.is_dirty() {
                self.barrier.order().await?;
                for sector in self.l1.dirty_sectors() {
                    let (start, bytes) = self.l1.sector_bytes(sector);
                    self.write(self.hdr.header.l1_table_offset + start, &bytes, "L1 table")
                        .await?;
                    self.l1.sector_written(sector);
                }
            }
            self.barrier.order().await?;
        }
        while let Some(off) = self.refcounts.take_deferred() {
            // (With lazy refcounts the decrement stays in memory like every other change.)
            if let Err(e) = self.update_refcount(off, 1, -1).await {
                // Keep it for the next write-back; a lost free is only a leak anyway.
                self.refcounts.defer_free(off, 1);
                return Err(e);
            }
        }
        if !self.lazy {
            self.write_blocks().await?;
        }
        Ok(())
    }

    /// Sets or clears the dirty bit with a synced header write.
    pub(crate) async fn set_dirty_bit(&mut self, dirty: bool) -> Result<()> {
        let f = &mut self.hdr.header.incompatible;
        f.set(qcow2_format::IncompatibleFeatures::DIRTY, dirty);
        self.write_header().await?;
        self.barrier.sync().await?;
        self.marked_dirty = dirty;
        Ok(())
    }

    /// Writes everything, refcounts included, and clears the dirty bit (clean close).
    pub(crate) async fn mark_clean(&mut self) -> Result<()> {
        self.writeback().await?;
        self.write_blocks().await?;
        self.barrier.sync().await?;
        if self.marked_dirty {
            self.set_dirty_bit(false).await?;
        }
        Ok(())
    }
}

pub(crate) async fn read_exact(file: &Arc<dyn BlockFile>, off: u64, len: u64) -> Result<Vec<u8>> {
    let len = usize::try_from(len).map_err(|_| Error::InvalidArgument("read too large".into()))?;
    let buf = file
        .read_at(IoBuf::zeroed(len, 1), off)
        .await
        .map_err(Error::io("reading metadata"))?;
    Ok(buf.into_vec())
}

/// What [`Meta::probe`] found.
pub(crate) enum Probe {
    /// The entry, from a cached table (or unallocated: no table).
    Found((L2Entry, SubclusterBitmap)),
    /// The table at host offset `l2` must be read first.
    Load {
        l2: u64,
        token: crate::mapping::LoadToken,
    },
}

pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn be64s(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
        .collect()
}
