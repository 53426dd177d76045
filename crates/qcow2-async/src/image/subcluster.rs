//! Writes to extended-L2 images (reference §2.4), at subcluster granularity.
//!
//! A write touches only the subclusters it covers: it allocates the host cluster once, writes
//! those subclusters (completing partial ones from their previous contents), and sets only
//! their allocation bits. Untouched subclusters keep reading from the backing file or as
//! zeros — no copy of them is made, which is the point of the feature. Entries are always
//! written with their bitmap (invariant 7: never as standard entries).

use qcow2_format::{L2Entry, SubclusterBitmap};

use super::Image;
use crate::alloc::Pool;
use crate::error::Result;

const ALL: u32 = u32::MAX;

impl Image {
    fn sub_mask(&self, inc: u64, len: u64) -> (u64, u64, u32) {
        let sc = self.inner.geo.subcluster_size();
        let first = inc / sc;
        let last = (inc + len - 1) / sc;
        let mask = SubclusterBitmap::range_mask(first as u32, (last - first + 1) as u32);
        (first * sc, (last + 1) * sc, mask)
    }

    pub(super) async fn write_subclusters(&self, gc: u64, inc: u64, data: &[u8]) -> Result<()> {
        let (span_start, span_end, mask) = self.sub_mask(inc, data.len() as u64);
        {
            let _shared = self.inner.leases.shared(gc).await;
            let mut meta = self.inner.meta.lock().await;
            let (entry, bm) = meta.lookup(gc).await?;
            // An unaligned write to an encrypted image rewrites whole sectors: it takes the
            // exclusive lease below.
            let a = self.write_align();
            let aligned = inc % a == 0 && data.len() as u64 % a == 0;
            if let L2Entry::Normal { host, copied: true } = entry {
                if aligned && bm.alloc() & mask == mask {
                    if !self.inner.external {
                        meta.check_data_target(host.0).await?;
                    }
                    drop(meta);
                    return self.write_in_place(host.0 + inc, data).await;
                }
            }
        }
        let _lease = self.inner.leases.exclusive(gc).await;
        let mut meta = self.inner.meta.lock().await;
        let (entry, bm) = meta.lookup(gc).await?;
        let cs = self.cluster_size();
        // Which host cluster, and which part of the cluster gets written.
        let (host, fresh, whole) = match entry {
            L2Entry::Normal { host, copied: true } => {
                if bm.alloc() & mask == mask {
                    drop(meta);
                    return self.write_in_place(host.0 + inc, data).await;
                }
                (host.0, false, false)
            }
            L2Entry::Unallocated | L2Entry::Zero { .. } if self.inner.external => {
                (gc << self.inner.geo.cluster_bits(), false, false)
            }
            L2Entry::Unallocated | L2Entry::Zero { .. } => {
                (meta.alloc(1, Pool::Data).await?, true, false)
            }
            // Shared or compressed: the data that stays must move to the new cluster too.
            L2Entry::Normal { .. } | L2Entry::Compressed(_) => {
                (meta.alloc(1, Pool::Data).await?, true, true)
            }
        };
        if !self.inner.external {
            if let Err(e) = meta.check_data_target(host).await {
                if fresh {
                    meta.free_now(host, cs).await?;
                }
                return Err(e);
            }
        }
        drop(meta);
        let (start, end) = if whole {
            (0, cs)
        } else {
            (span_start, span_end)
        };
        let result = async {
            let mut buf = vec![0u8; (end - start) as usize];
            if inc != start || data.len() as u64 != end - start {
                self.read_mapped(gc, entry, bm, start, &mut buf).await?;
            }
            let at = (inc - start) as usize;
            buf[at..at + data.len()].copy_from_slice(data);
            self.write_in_place(host + start, &buf).await
        }
        .await;
        let mut meta = self.inner.meta.lock().await;
        if let Err(e) = result {
            if fresh {
                meta.free_now(host, cs).await?;
            }
            return Err(e);
        }
        let mut new_bm = match entry {
            // A decompressed cluster is fully allocated, as QEMU does.
            L2Entry::Compressed(_) => SubclusterBitmap::new(ALL, 0),
            _ => bm,
        };
        new_bm.set_allocated(mask);
        meta.set_entry(
            gc,
            L2Entry::Normal {
                host: qcow2_format::HostOffset(host),
                copied: true,
            },
            new_bm,
        )
        .await?;
        if fresh {
            self.release(&mut meta, entry);
        }
        Ok(())
    }

    /// Zeroes `[inc, inc + n)` of an extended-L2 cluster: whole subclusters get their zero
    /// bit (whole clusters as QEMU's `zero_in_l2_slice`), partial ones explicit zeros.
    pub(super) async fn zero_subclusters(
        &self,
        gc: u64,
        inc: u64,
        n: u64,
        unmap: bool,
    ) -> Result<()> {
        let sc = self.inner.geo.subcluster_size();
        let whole_cluster = self.is_whole(gc, inc, n);
        let first_full = inc.div_ceil(sc) * sc;
        let end_full = ((inc + n) / sc * sc).max(first_full);
        let end_full = if whole_cluster {
            self.cluster_size()
        } else {
            end_full
        };
        // Partial subclusters at either end.
        if inc < first_full.min(inc + n) {
            let e = first_full.min(inc + n);
            self.write_subclusters(gc, inc, &vec![0u8; (e - inc) as usize])
                .await?;
        }
        if end_full < inc + n && end_full >= first_full {
            self.write_subclusters(gc, end_full, &vec![0u8; (inc + n - end_full) as usize])
                .await?;
        }
        if end_full <= first_full {
            return Ok(());
        }
        let mask = SubclusterBitmap::range_mask(
            (first_full / sc) as u32,
            ((end_full - first_full) / sc) as u32,
        );
        let _lease = self.inner.leases.exclusive(gc).await;
        let mut meta = self.inner.meta.lock().await;
        let (entry, bm) = meta.lookup(gc).await?;
        let (new, mut new_bm, drop_old) = match entry {
            L2Entry::Normal { .. } if whole_cluster && unmap => {
                (L2Entry::Unallocated, SubclusterBitmap::default(), true)
            }
            L2Entry::Normal { .. } => (entry, bm, false),
            L2Entry::Compressed(_) if whole_cluster => {
                (L2Entry::Unallocated, SubclusterBitmap::default(), true)
            }
            L2Entry::Compressed(_) => {
                // Part of a compressed cluster: decompress it into a normal one first.
                drop(meta);
                drop(_lease);
                let zeros = vec![0u8; (end_full - first_full) as usize];
                return self.write_subclusters(gc, first_full, &zeros).await;
            }
            _ => (L2Entry::Unallocated, bm, false),
        };
        new_bm.set_zero(mask);
        if new != entry || new_bm != bm {
            meta.set_entry(gc, new, new_bm).await?;
            if drop_old {
                self.release(&mut meta, entry);
            }
        }
        Ok(())
    }

    /// Discards a whole extended-L2 cluster: QEMU leaves entry 0 with every subcluster
    /// reading zeros.
    pub(super) async fn discard_extended(&self, gc: u64) -> Result<()> {
        let _lease = self.inner.leases.exclusive(gc).await;
        let mut meta = self.inner.meta.lock().await;
        let (entry, bm) = meta.lookup(gc).await?;
        let allocated = !matches!(entry, L2Entry::Unallocated);
        if !(allocated || self.inner.backing.is_some()) {
            return Ok(());
        }
        let new_bm = SubclusterBitmap::new(0, ALL);
        if entry != L2Entry::Unallocated || bm != new_bm {
            meta.set_entry(gc, L2Entry::Unallocated, new_bm).await?;
            self.release(&mut meta, entry);
        }
        Ok(())
    }
}
