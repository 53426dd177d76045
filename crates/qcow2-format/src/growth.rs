//! Pure planning for refcount structure growth (reference §3.3, §3.4).
//!
//! When a refcount block must be created for a range the refcount table does not cover, QEMU
//! builds a new self-covering area: new refcount blocks and a larger table placed past all
//! used space, with every cluster of the area itself counted. Getting this wrong leaks or
//! double-uses clusters (invariant 4); keeping it pure makes it testable on its own.

use crate::error::{Error, Result};
use crate::limits::Limits;
use crate::refcount::RefcountOrder;

/// QEMU's `qcow2_refcount_metadata_size`: how many refcount blocks (and table clusters) are
/// needed to describe `clusters` clusters plus the refcount metadata itself. With
/// `generous`, room for half the table again is added once. Returns `(blocks, table_clusters)`.
pub fn refcount_metadata_size(
    clusters: u64,
    cluster_bits: u32,
    order: RefcountOrder,
    generous: bool,
) -> Result<(u64, u64)> {
    let per_table_cluster = (1u64 << cluster_bits) / 8;
    let per_block = order.entries_per_block(cluster_bits);
    let (mut clusters, mut generous) = (clusters, generous);
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    // Converges in a handful of rounds: each round's growth is at most 1/per_block of the
    // previous. The bound only guards against a logic error.
    for _ in 0..64 {
        let last = n;
        let sum = clusters
            .checked_add(table)
            .and_then(|s| s.checked_add(blocks))
            .ok_or_else(|| Error::overflow("refcount metadata size"))?;
        blocks = sum.div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            if generous {
                clusters += table.div_ceil(2);
                n = 0;
                generous = false;
            } else {
                return Ok((blocks, table));
            }
        }
    }
    Err(Error::overflow("refcount metadata size did not converge"))
}

/// Whether a refcount block placed at `block_offset` covers itself when it becomes block
/// number `reftable_index` (QEMU's "self-describing" case).
pub fn refblock_covers_itself(
    block_offset: u64,
    reftable_index: u64,
    cluster_bits: u32,
    order: RefcountOrder,
) -> bool {
    block_offset >> (cluster_bits + order.block_bits(cluster_bits)) == reftable_index
}

/// Where QEMU starts a new refcount area when the table must grow: the first refcount-block
/// range strictly beyond both the cluster being counted and the new block.
pub fn growth_area_start(
    cluster_index: u64,
    new_block_offset: u64,
    cluster_bits: u32,
    order: RefcountOrder,
) -> Result<u64> {
    let per_block = order.entries_per_block(cluster_bits);
    let used = (cluster_index + 1).max((new_block_offset >> cluster_bits) + 1);
    used.div_ceil(per_block)
        .checked_mul(per_block)
        .and_then(|c| c.checked_mul(1 << cluster_bits))
        .ok_or_else(|| Error::overflow("refcount area start"))
}

/// A new refcount area, as `qcow2_refcount_area` would lay it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefcountAreaPlan {
    /// The complete new refcount table (block offsets, 0 = none), `table_clusters` long.
    pub table: Vec<u64>,
    /// Host offset of the new table.
    pub table_offset: u64,
    /// Clusters the new table occupies.
    pub table_clusters: u64,
    /// Refcount blocks to create zeroed: `(reftable index, host offset)`, in index order.
    pub new_blocks: Vec<(u64, u64)>,
    /// Every cluster in `[start, end_offset)` must get refcount 1.
    pub start_offset: u64,
    /// End of the area; `additional_clusters` may be placed here.
    pub end_offset: u64,
}

/// Plans a self-covering refcount area at `start_offset` (which must be cluster aligned and
/// past everything in use). `old_table` is the current refcount table; `new_block` an
/// optional `(index, offset)` to insert first (the block the caller just placed).
// The parameters are QEMU's `qcow2_refcount_area` plus the state it reads from `s`.
#[allow(clippy::too_many_arguments)]
pub fn plan_refcount_area(
    start_offset: u64,
    additional_clusters: u64,
    exact: bool,
    cluster_bits: u32,
    order: RefcountOrder,
    old_table: &[u64],
    new_block: Option<(u64, u64)>,
    limits: &Limits,
) -> Result<RefcountAreaPlan> {
    let cs = 1u64 << cluster_bits;
    if start_offset % cs != 0 {
        return Err(Error::Unaligned {
            what: "refcount area",
            offset: start_offset,
            alignment: cs,
        });
    }
    let max_entries = limits.max_refcount_table_bytes / 8;
    let (total_blocks, _) = refcount_metadata_size(
        start_offset / cs + additional_clusters,
        cluster_bits,
        order,
        !exact,
    )?;
    if total_blocks > max_entries {
        return Err(Error::limit(
            "refcount table",
            total_blocks * 8,
            max_entries * 8,
        ));
    }
    let per_block = order.entries_per_block(cluster_bits);
    let area_index = (start_offset / cs) / per_block;
    let mut table_size = if exact {
        total_blocks
    } else {
        total_blocks + total_blocks.div_ceil(2)
    };
    table_size = table_size.div_ceil(cs / 8) * (cs / 8);
    if table_size > max_entries {
        return Err(Error::limit(
            "refcount table",
            table_size * 8,
            max_entries * 8,
        ));
    }
    let table_clusters = table_size * 8 / cs;
    let mut table = vec![0u64; table_size as usize];
    let keep = old_table.len().min(table.len());
    table[..keep].copy_from_slice(&old_table[..keep]);
    if let Some((idx, off)) = new_block {
        if idx >= total_blocks {
            return Err(Error::invalid(
                "new refcount block index",
                idx,
                "beyond the planned table",
            ));
        }
        table[idx as usize] = off;
    }
    let mut new_blocks = Vec::new();
    let mut block_offset = start_offset;
    for i in area_index..total_blocks {
        if table[i as usize] == 0 {
            table[i as usize] = block_offset;
            new_blocks.push((i, block_offset));
            block_offset += cs;
        }
    }
    let table_offset = block_offset;
    let end_offset = table_offset + table_clusters * cs;
    Ok(RefcountAreaPlan {
        table,
        table_offset,
        table_clusters,
        new_blocks,
        start_offset,
        end_offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_verified_qemu_growth() {
        // Reference §3.4 worked example: 512 B clusters, 64-bit refcounts, refblock #64
        // needed for cluster 4096, new block placed at 0x201000.
        let order = RefcountOrder::new(6).unwrap();
        assert!(refblock_covers_itself(0x201000, 64, 9, order));
        let start = growth_area_start(4096, 0x201000, 9, order).unwrap();
        assert_eq!(start, 0x208000);
        assert_eq!(refcount_metadata_size(4160, 9, order, true).unwrap().0, 67);
        let mut old = vec![0u64; 64];
        old[0] = 0x400;
        let plan = plan_refcount_area(
            start,
            0,
            false,
            9,
            order,
            &old,
            Some((64, 0x201000)),
            &Limits::QEMU,
        )
        .unwrap();
        assert_eq!(plan.table.len(), 128);
        assert_eq!(plan.table_clusters, 2);
        assert_eq!(plan.new_blocks, vec![(65, 0x208000), (66, 0x208200)]);
        assert_eq!(plan.table_offset, 0x208400);
        assert_eq!(plan.end_offset, 0x208800);
        assert_eq!(plan.table[64], 0x201000);
        assert_eq!(plan.table[0], 0x400);
    }

    #[test]
    fn metadata_size_covers_itself() {
        for bits in [9u32, 12, 16, 21] {
            for order in 0..=6 {
                let o = RefcountOrder::new(order).unwrap();
                for clusters in [1u64, 100, 65536, 1 << 24] {
                    let (blocks, table) = refcount_metadata_size(clusters, bits, o, false).unwrap();
                    let total = clusters + blocks + table;
                    assert!(blocks * o.entries_per_block(bits) >= total);
                    assert!(table * ((1 << bits) / 8) >= blocks);
                }
            }
        }
    }

    #[test]
    fn refuses_tables_beyond_the_limit() {
        let o = RefcountOrder::new(6).unwrap();
        assert!(plan_refcount_area(1 << 50, 0, true, 9, o, &[], None, &Limits::QEMU).is_err());
    }
}
