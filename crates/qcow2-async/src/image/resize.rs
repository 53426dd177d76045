//! Changing the virtual size (`qemu-img resize`).

use std::sync::atomic::Ordering;

use qcow2_format::{L1Entry, L2Entry, SubclusterBitmap};
use tracing::instrument;

use super::Image;
use crate::error::{Error, Result};

/// How [`Image::resize`] may change the disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResizeOptions {
    /// Allow a smaller size (`qemu-img resize --shrink`).
    pub shrink: bool,
    /// When shrinking, drop data this image holds past the new end. Without it a shrink
    /// that would cut allocated data is refused.
    pub discard_data: bool,
}

impl Image {
    /// Grows or shrinks the virtual disk, as `qemu-img resize` does: every header field,
    /// the compression type and the snapshots are kept; the L1 table grows to exactly the
    /// size needed; on growth over a longer backing file the new area reads as zeros, not
    /// as backing data; shrinking frees the clusters past the new end. Enabled bitmaps are
    /// resized with the disk.
    ///
    /// Cancellation: once polled, the operation runs to completion even if this future is
    /// dropped (on the runtime, and [`Image::close`] waits for it); only its result is lost.
    #[instrument(skip(self))]
    pub async fn resize(&self, new_size: u64, opts: ResizeOptions) -> Result<()> {
        self.to_completion(move |img| async move { img.resize_now(new_size, opts).await })
            .await
    }

    /// [`Image::resize`] in place: dropping this future stops it where it is.
    pub(crate) async fn resize_now(&self, new_size: u64, opts: ResizeOptions) -> Result<()> {
        self.check_writable().await?;
        let cs = self.cluster_size();
        if new_size % 512 != 0 {
            return Err(Error::InvalidArgument(format!(
                "size {new_size} is not a multiple of 512"
            )));
        }
        let old = self.virtual_size();
        if new_size < old && !opts.shrink {
            return Err(Error::InvalidArgument(
                "shrinking needs the shrink option (qemu-img resize --shrink)".into(),
            ));
        }
        if new_size < old && !opts.discard_data {
            let cut = self.map(new_size, old - new_size).await?;
            if let Some(e) = cut.iter().find(|e| e.depth == 0 && e.data) {
                return Err(Error::InvalidArgument(format!(
                    "shrinking to {new_size} would discard data at {:#x} (allow it explicitly)",
                    e.start
                )));
            }
        }
        let _all = self.inner.snap_lock.write().await;
        let mut meta = self.inner.meta.lock().await;
        if meta.bitmaps.has_inconsistent() {
            return Err(Error::InvalidArgument(
                "cannot resize an image with inconsistent bitmaps; remove them first".into(),
            ));
        }
        let per_l2 = self.inner.geo.l2_entries() as u64;
        let l1_needed = new_size.div_ceil(cs).div_ceil(per_l2);
        meta.grow_l1(l1_needed).await?;
        if new_size < old {
            let bits = self.inner.geo.cluster_bits();
            let first = new_size.div_ceil(cs);
            for gc in first..old.div_ceil(cs) {
                let (entry, bm) = meta.lookup(gc).await?;
                if entry == L2Entry::Unallocated && bm == SubclusterBitmap::default() {
                    continue;
                }
                meta.set_entry(gc, L2Entry::Unallocated, SubclusterBitmap::default())
                    .await?;
                if !self.inner.external {
                    super::release(&mut meta, entry, cs);
                }
            }
            // L2 tables wholly past the end go too (QEMU keeps the L1 size).
            for idx in l1_needed..meta.l1.len() {
                let e = L1Entry::decode(meta.l1.get(idx), bits)
                    .map_err(|e| Error::Corrupt(format!("L1 entry {idx}: {e}")))?;
                if let Some(l2) = e.l2_offset {
                    meta.writeback().await?;
                    meta.set_l1_entry(
                        idx,
                        L1Entry {
                            l2_offset: None,
                            copied: false,
                        },
                    );
                    meta.free_later(l2.0, cs);
                }
            }
            meta.writeback().await?;
            meta.drop_l2_cache();
        }
        meta.hdr.header.size = new_size;
        meta.write_header().await?;
        meta.barrier.sync().await?;
        meta.bitmaps.resize(new_size);
        self.inner.size.store(new_size, Ordering::Release);
        if self.inner.external {
            self.inner
                .data
                .set_len(new_size)
                .await
                .map_err(Error::io("resizing the data file"))?;
        }
        drop(meta);
        drop(_all);
        if new_size > old {
            // A backing file longer than the old disk would show through the new area;
            // QEMU zero-writes it (BDRV_REQ_ZERO_WRITE). Likewise stale bytes in the old
            // last cluster past the old end.
            let backing_end = self.backing().map_or(0, |b| b.size()).min(new_size);
            let tail_end = (old.div_ceil(cs) * cs).min(new_size);
            let end = backing_end.max(tail_end);
            if end > old {
                self.write_zeroes_now(old, end - old, false).await?;
            }
        }
        self.flush_now().await
    }
}
