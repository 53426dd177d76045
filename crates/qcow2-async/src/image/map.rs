//! Block status: where each guest byte comes from, as `qemu-img map --output=json` reports
//! it. `convert` and the NBD export use it to skip zeros and unallocated ranges.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use qcow2_format::{L2Entry, SubclusterState};

use super::Image;
use crate::backing::Disk;
use crate::error::Result;
use crate::io::BlockFile;

/// One run of guest bytes with the same status (the fields of `qemu-img map`'s JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct MapExtent {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Which layer answers: 0 is this image, 1 its backing file, and so on.
    pub depth: u32,
    /// Some layer allocates the range (false: it reads zeros because nothing does).
    pub present: bool,
    /// The range reads as zeros.
    pub zero: bool,
    /// The range has data in the layer at `depth`.
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Host offset in the layer's data file, where there is one.
    pub offset: Option<u64>,
    /// For a range no layer allocates: the depth of a backing layer that ends before it,
    /// whose synthesized zeros QEMU counts as allocated there (`qemu:allocation-depth`
    /// reports that layer). `None` where every layer covers the range.
    pub short_layer: Option<u32>,
}

impl MapExtent {
    fn unallocated(start: u64, length: u64, depth: u32) -> MapExtent {
        MapExtent {
            start,
            length,
            depth,
            present: false,
            zero: true,
            data: false,
            compressed: false,
            offset: None,
            short_layer: None,
        }
    }

    /// Whether `next` continues this extent (same status, contiguous host offsets).
    fn continues(&self, next: &MapExtent) -> bool {
        self.start + self.length == next.start
            && (
                self.depth,
                self.present,
                self.zero,
                self.data,
                self.compressed,
                self.short_layer,
            ) == (
                next.depth,
                next.present,
                next.zero,
                next.data,
                next.compressed,
                next.short_layer,
            )
            && match (self.offset, next.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + self.length == b,
                _ => false,
            }
    }
}

fn push(out: &mut Vec<MapExtent>, e: MapExtent) {
    match out.last_mut() {
        Some(last) if last.continues(&e) => last.length += e.length,
        _ => out.push(e),
    }
}

impl Image {
    /// The status of every byte of `[offset, offset + len)`, merged into maximal extents,
    /// through the whole backing chain.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// # use qcow2_async::{CreateOptions, Image, OpenOptions};
    /// # let dir = tempfile::tempdir()?;
    /// # let img = Image::create(dir.path().join("d.qcow2"), &CreateOptions::new(4 << 20),
    /// #                         &OpenOptions::default()).await?;
    /// img.write_at(&[1; 65536], 1 << 20).await?;
    /// let data: Vec<_> = img
    ///     .map(0, img.virtual_size())
    ///     .await?
    ///     .into_iter()
    ///     .filter(|e| e.data)
    ///     .map(|e| (e.start, e.length))
    ///     .collect();
    /// assert_eq!(data, vec![(1 << 20, 65536)]);
    /// # img.close().await?;
    /// # Ok::<(), Box<dyn std::error::Error>>(()) }).unwrap();
    /// ```
    pub fn map(
        &self,
        offset: u64,
        len: u64,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<MapExtent>>> + Send + '_>> {
        Box::pin(async move {
            self.check_range(offset, len)?;
            let _instant = self.inner.snap_lock.read().await;
            self.map_mapping(offset, len, None).await
        })
    }

    /// [`Image::map`] of an internal snapshot (by id or name) instead of the live disk: its
    /// own L1 table, its size; unallocated ranges come from the backing chain as they read
    /// today, as [`Image::read_snapshot_at`] reads them.
    ///
    /// Cancellation: safe to drop at any point; it only reads.
    pub async fn map_snapshot(
        &self,
        id_or_name: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<MapExtent>> {
        let _instant = self.inner.snap_lock.read().await;
        let l1 = self.snapshot_l1(id_or_name, offset, len).await?;
        self.map_mapping(offset, len, Some(&l1)).await
    }

    /// The extents of `[offset, offset + len)` through the active L1 table (`None`) or a
    /// snapshot's; the caller holds the instant lock and checked the range.
    async fn map_mapping(
        &self,
        offset: u64,
        len: u64,
        snapshot_l1: Option<&[u64]>,
    ) -> Result<Vec<MapExtent>> {
        let mut out = Vec::new();
        let step = self.inner.geo.subcluster_size();
        let bits = self.inner.geo.cluster_bits();
        for (gc, inc, r) in self.pieces(offset, len) {
            let (entry, bm) = match snapshot_l1 {
                None => self.inner.meta.lock().await.lookup(gc).await?,
                Some(l1) => {
                    let mut meta = self.inner.meta.lock().await;
                    meta.snapshot_lookup(l1, gc).await?
                }
            };
            let base = gc << bits;
            let mut pos = inc;
            let end = inc + (r.end - r.start) as u64;
            while pos < end {
                let n = ((pos / step + 1) * step).min(end) - pos;
                let here = |data, zero, offset| MapExtent {
                    start: base + pos,
                    length: n,
                    depth: 0,
                    present: true,
                    zero,
                    data,
                    compressed: false,
                    offset,
                    short_layer: None,
                };
                let sub = (pos / step) as u32;
                let ext = self.inner.geo.extended_l2();
                match entry {
                    L2Entry::Normal { .. } | L2Entry::Compressed(_)
                        if self.inner.crypto.is_encrypted()
                            && (!ext || bm.state(sub) == SubclusterState::Allocated) =>
                    {
                        // QEMU shows no host offset for encrypted data (the bytes there
                        // are ciphertext), and so never asks the file about holes.
                        push(&mut out, here(true, false, None))
                    }
                    L2Entry::Compressed(_) => push(
                        &mut out,
                        MapExtent {
                            compressed: true,
                            ..here(true, false, None)
                        },
                    ),
                    L2Entry::Normal { host, .. }
                        if !ext || bm.state(sub) == SubclusterState::Allocated =>
                    {
                        push(&mut out, here(true, false, Some(host.0 + pos)))
                    }
                    L2Entry::Normal { host, .. } if bm.state(sub) == SubclusterState::Zero => {
                        push(&mut out, here(false, true, Some(host.0 + pos)))
                    }
                    L2Entry::Zero { host, .. } => {
                        push(&mut out, here(false, true, host.map(|h| h.0 + pos)))
                    }
                    L2Entry::Unallocated if ext && bm.state(sub) == SubclusterState::Zero => {
                        push(&mut out, here(false, true, None))
                    }
                    _ => {
                        for e in self.backing_map(base + pos, n).await? {
                            push(&mut out, e);
                        }
                    }
                }
                pos += n;
            }
        }
        if !self.metadata_preallocated().await {
            return Ok(out);
        }
        Ok(refine_by_holes(&self.inner.data, out, |e| e.depth == 0, false).await)
    }

    /// QEMU asks the host file about holes under data clusters only when the image looks
    /// metadata-preallocated: more clusters have a refcount than the file really occupies
    /// (at least `max(real * 10 / 9, real + 2)`, `real` being its allocated bytes in
    /// clusters; `qcow2_detect_metadata_preallocation`). Decided once per open, on first
    /// use, like QEMU; a failed query means no.
    async fn metadata_preallocated(&self) -> bool {
        *self
            .inner
            .metadata_prealloc
            .get_or_init(|| async {
                match self.detect_metadata_preallocation().await {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::debug!("metadata preallocation detection failed: {e}");
                        false
                    }
                }
            })
            .await
    }

    async fn detect_metadata_preallocation(&self) -> Result<bool> {
        let io = || crate::error::Error::io("sizing the image file");
        let file_len = self.inner.file.len().await.map_err(io())?;
        let real = self.inner.file.allocated_bytes().await.map_err(io())?;
        let cs = self.inner.geo.cluster_size();
        let real_clusters = real / cs;
        let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
        let end = file_len.div_ceil(cs);
        let mut count = 0;
        let mut i = 0;
        // The lock is taken in bounded rounds so that guest requests are not held off by a
        // long scan of a big image.
        while i < end && count < threshold {
            let mut meta = self.inner.meta.lock().await;
            let stop = end.min(i + 4096);
            while i < stop && count < threshold {
                count += u64::from(meta.refcount(i).await? != 0);
                i += 1;
            }
        }
        Ok(count >= threshold)
    }

    /// Status of a range this image leaves unallocated: the backing chain's, one level
    /// deeper; past the backing file's end (or without one) unallocated at depth 0, as QEMU
    /// reports it.
    async fn backing_map(&self, start: u64, len: u64) -> Result<Vec<MapExtent>> {
        let Some(b) = &self.inner.backing else {
            return Ok(vec![MapExtent::unallocated(start, len, 0)]);
        };
        // QEMU sizes a raw file in whole sectors; the tail past EOF reads as zeros.
        let bsize = match b {
            Disk::Raw(_, n) => n.div_ceil(512) * 512,
            Disk::Qcow2(_) => b.size(),
        };
        let inside = bsize.saturating_sub(start).min(len);
        let mut out = Vec::new();
        if inside > 0 {
            match b {
                Disk::Qcow2(img) => {
                    for mut e in img.map(start, inside).await? {
                        e.depth += 1;
                        e.short_layer = e.short_layer.map(|d| d + 1);
                        push(&mut out, e);
                    }
                }
                Disk::Raw(file, eof) => {
                    let data = eof.saturating_sub(start).min(inside);
                    let raw = |start, length, data: bool| MapExtent {
                        start,
                        length,
                        depth: 1,
                        present: true,
                        zero: !data,
                        data,
                        compressed: false,
                        offset: Some(start),
                        short_layer: None,
                    };
                    let mut raw_out = Vec::new();
                    if data > 0 {
                        push(&mut raw_out, raw(start, data, true));
                    }
                    if data < inside {
                        push(&mut raw_out, raw(start + data, inside - data, false));
                    }
                    for e in refine_by_holes(file, raw_out, |_| true, true).await {
                        push(&mut out, e);
                    }
                }
            }
        }
        if inside < len {
            let past = MapExtent::unallocated(start + inside, len - inside, 0);
            push(
                &mut out,
                MapExtent {
                    short_layer: Some(1),
                    ..past
                },
            );
        }
        Ok(out)
    }
}

/// Marks the parts of data extents that the host file does not store (holes, the range past
/// its end) as reading zeros, as QEMU's block status does by asking the file driver under
/// every data extent with a host offset. For a qcow2 layer the range keeps `data` (it is
/// allocated in the image); for a raw file (`hole_is_unallocated`) the file is the layer,
/// and a hole has no data. Errors only cost the extra precision, as in QEMU.
pub(crate) async fn refine_by_holes(
    file: &Arc<dyn BlockFile>,
    extents: Vec<MapExtent>,
    layer: impl Fn(&MapExtent) -> bool,
    hole_is_unallocated: bool,
) -> Vec<MapExtent> {
    let mut out = Vec::with_capacity(extents.len());
    for e in extents {
        let Some(host) = e.offset.filter(|_| e.data && !e.zero && layer(&e)) else {
            push(&mut out, e);
            continue;
        };
        let holes = match file.holes(host, e.length).await {
            Ok(h) => h,
            Err(err) => {
                tracing::debug!("hole query at {host:#x} failed ({err}); reporting data");
                Vec::new()
            }
        };
        let mut at = host;
        let piece = |from: u64, to: u64, hole: bool| MapExtent {
            start: e.start + (from - host),
            length: to - from,
            zero: hole,
            data: !(hole && hole_is_unallocated),
            offset: Some(from),
            ..e
        };
        for (hs, he) in holes {
            let (hs, he) = (hs.max(at), he.min(host + e.length));
            if hs >= he {
                continue;
            }
            if hs > at {
                push(&mut out, piece(at, hs, false));
            }
            push(&mut out, piece(hs, he, true));
            at = he;
        }
        if at < host + e.length {
            push(&mut out, piece(at, host + e.length, false));
        }
    }
    out
}
