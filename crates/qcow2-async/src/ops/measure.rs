//! `qemu-img measure`: how large a qcow2 file would be.

use qcow2_format::bitmap::bitmap_data_size;
use qcow2_format::growth::refcount_metadata_size;
use qcow2_format::RefcountOrder;
use tracing::instrument;

use super::disk_map;
use crate::backing::Disk;
use crate::error::{Error, Result};
use crate::options::{CreateOptions, Preallocation};

/// Sizes in bytes, with `qemu-img measure`'s meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Measure {
    /// File size a conversion (or a fresh image) needs now.
    pub required: u64,
    /// File size once every cluster is allocated.
    pub fully_allocated: u64,
    /// Extra bytes to copy the source's persistent bitmaps (qcow2 sources only).
    pub bitmaps: Option<u64>,
}

/// Measures a qcow2 image created with `o` (its `size`, or the size of `src` when given),
/// using QEMU's formula (`qcow2_measure`): metadata for a fully allocated disk, and data
/// for the clusters the source actually holds.
///
/// Cancellation: safe to drop at any point; it only reads.
#[instrument(skip_all)]
pub async fn measure(src: Option<&Disk>, o: &CreateOptions) -> Result<Measure> {
    let cs = o.cluster_size;
    if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
        return Err(Error::InvalidArgument(format!("bad cluster size {cs}")));
    }
    if o.extended_l2 && cs < 16384 {
        return Err(Error::InvalidArgument(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
                .into(),
        ));
    }
    let order = RefcountOrder::from_bits(o.refcount_bits)
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
    let size = src.map_or(o.size, |s| s.size());
    let virtual_size = size.div_ceil(cs) * cs;
    let l2e = if o.extended_l2 { 16 } else { 8 };
    let l2_tables = (virtual_size / cs).div_ceil(cs / l2e);
    if l2_tables * 8 > 32 << 20 {
        return Err(Error::InvalidArgument(
            "The image size is too large (try using a larger cluster size)".into(),
        ));
    }
    // A new empty image needs no data clusters; a conversion needs what the source holds
    // (all of it when the target gets a backing file QEMU cannot compare against).
    let mut required = 0;
    let mut bitmaps = None;
    if let Some(src) = src {
        if o.backing_file.is_some() {
            required = virtual_size;
        } else {
            let mut covered = 0u64; // end of the last counted cluster
            for e in disk_map(src).await? {
                if e.zero || !e.data {
                    continue;
                }
                // QEMU counts from the cluster the extent starts in to the end of the one it
                // ends in, and resumes after that.
                let start = e.start.max(covered) / cs * cs;
                let end = (e.start + e.length).div_ceil(cs) * cs;
                if end > start {
                    required += end - start;
                    covered = end;
                }
            }
        }
        if let Disk::Qcow2(img) = src {
            if o.version3 {
                let mut n = 0u64;
                let mut dir = 0u64;
                for b in img.bitmaps().await {
                    let bits = b.granularity.trailing_zeros() as u8;
                    let clusters = bitmap_data_size(size, bits).div_ceil(cs);
                    n += clusters * cs + (clusters * 8).div_ceil(cs) * cs;
                    dir += (24 + b.name.len() as u64).div_ceil(8) * 8;
                }
                bitmaps = Some(n + dir.div_ceil(cs) * cs);
            }
        }
    }
    if matches!(o.preallocation, Preallocation::Full | Preallocation::Falloc) {
        required = virtual_size;
    }
    let fully_allocated = prealloc_size(virtual_size, cs, order, l2e)?;
    Ok(Measure {
        required: fully_allocated - virtual_size + required,
        fully_allocated,
        bitmaps,
    })
}

/// QEMU's `qcow2_calc_prealloc_size`: header, L2 and L1 tables, refcount structures for
/// all of it, plus the data.
fn prealloc_size(total: u64, cs: u64, order: RefcountOrder, l2e: u64) -> Result<u64> {
    let aligned = total.div_ceil(cs) * cs;
    let mut meta = cs;
    let nl2e = (aligned / cs).div_ceil(cs / l2e) * (cs / l2e);
    meta += nl2e * l2e;
    let nl1e = (nl2e * l2e / cs).div_ceil(cs / 8) * (cs / 8);
    meta += nl1e * 8;
    let (blocks, table) =
        refcount_metadata_size((meta + aligned) / cs, cs.trailing_zeros(), order, false)
            .map_err(Error::format("refcount sizing"))?;
    Ok(meta + (blocks + table) * cs + aligned)
}
