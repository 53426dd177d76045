//! The refcount structures of an open image as memory holds them: the refcount table, a
//! bounded cache of refcount blocks, and the decrements deferred until the metadata that
//! held a reference is durable.
//!
//! No I/O happens here. The owner (`Meta`, under the metadata lock) reads a block from disk
//! when [`Refcounts::block_for`] names one that is not [cached](Refcounts::is_cached), writes
//! [dirty](Refcounts::dirty_blocks) blocks back, and decides when. Invariants, and who keeps
//! them:
//!
//! - A dirty block is never dropped from the cache: [`Refcounts::evict_clean`] drops clean
//!   blocks only, so a change can reach memory before the disk but is never lost.
//! - A block is written as a whole and marked clean only once that write succeeded
//!   ([`Refcounts::mark_written`] is called by the owner after the write), so no later L2
//!   write can get ahead of the refcounts it relies on.
//! - A table entry names a block only once the block is on disk: the owner calls
//!   [`Refcounts::set_table_entry`] after the block's write and barrier.
//! - Invariant 1 (a refcount decreases only after the last reference to the cluster is gone
//!   on disk): frees of clusters that durable metadata may still reference are
//!   [deferred](Refcounts::defer_free), and the owner takes them
//!   ([`Refcounts::take_deferred`]) only after the write-back's final barrier.

use qcow2_format::{RefcountOrder, ReftableEntry};

use crate::cache::MetadataCache;
use crate::error::{Error, Result};

pub(crate) struct Refcounts {
    order: RefcountOrder,
    cluster_bits: u32,
    /// The refcount table: host offsets of refcount blocks (0: none), entries not
    /// validated (like QEMU, a bad entry fails when used, and `check` reports it).
    table: Vec<u64>,
    blocks: MetadataCache<Box<[u8]>>,
    /// One host cluster offset per reference to drop after the next durable write-back.
    deferred: Vec<u64>,
}

impl Refcounts {
    pub(crate) fn new(
        order: RefcountOrder,
        cluster_bits: u32,
        table: Vec<u64>,
        cache_blocks: usize,
    ) -> Self {
        Refcounts {
            order,
            cluster_bits,
            table,
            blocks: MetadataCache::new(cache_blocks),
            deferred: Vec::new(),
        }
    }

    pub(crate) fn order(&self) -> RefcountOrder {
        self.order
    }

    /// log2 of the refcount entries in one block.
    pub(crate) fn block_bits(&self) -> u32 {
        self.order.block_bits(self.cluster_bits)
    }

    /// The refcount table entry covering `cluster`.
    pub(crate) fn table_index(&self, cluster: u64) -> u64 {
        cluster >> self.block_bits()
    }

    pub(crate) fn table(&self) -> &[u64] {
        &self.table
    }

    /// The host offsets of all refcount blocks (for overlap checks).
    pub(crate) fn block_offsets(&self) -> std::collections::HashSet<u64> {
        self.table.iter().copied().filter(|&o| o != 0).collect()
    }

    /// Switches to another table (a grown or rebuilt one); returns the old one.
    pub(crate) fn replace_table(&mut self, table: Vec<u64>) -> Vec<u64> {
        std::mem::replace(&mut self.table, table)
    }

    /// Points entry `rt` at the block at `block`; the entry must exist (growing the table is
    /// [`Refcounts::replace_table`]).
    pub(crate) fn set_table_entry(&mut self, rt: u64, block: u64) {
        self.table[rt as usize] = block;
    }

    /// Whether the table has an entry for `rt` (else it must grow first).
    pub(crate) fn table_has(&self, rt: u64) -> bool {
        rt < self.table.len() as u64
    }

    /// The raw host offset of the block covering `cluster`, if it has one.
    pub(crate) fn block_for(&self, cluster: u64) -> Option<u64> {
        self.table
            .get(usize::try_from(self.table_index(cluster)).ok()?)
            .copied()
            .filter(|&o| o != 0)
    }

    /// [`Refcounts::block_for`] after validating the table entry, as QEMU does before
    /// reading a block: an unaligned or reserved-bit entry is corruption, reported as the
    /// message for the owner to signal.
    pub(crate) fn valid_block_for(&self, cluster: u64) -> std::result::Result<Option<u64>, String> {
        let Some(raw) = self.block_for(cluster) else {
            return Ok(None);
        };
        ReftableEntry::decode(raw, self.cluster_bits)
            .map(|_| Some(raw))
            .map_err(|e| format!("refcount table entry {}: {e}", self.table_index(cluster)))
    }

    pub(crate) fn is_cached(&self, block: u64) -> bool {
        self.blocks.contains(block)
    }

    /// Caches the block at host offset `block`: read from disk (`dirty` false) or made in
    /// memory and not yet written (`dirty` true). Make room with
    /// [`Refcounts::evict_clean`] first.
    pub(crate) fn cache_block(&mut self, block: u64, data: Box<[u8]>, dirty: bool) {
        self.blocks.insert(block, data, dirty);
    }

    /// Forgets a cached block, dirty or not: the cluster it was in was freed, or it never
    /// made it to disk and the cluster is about to be reused.
    pub(crate) fn forget_block(&mut self, block: u64) {
        self.blocks.remove(block);
    }

    /// Forgets every cached block (after the structures were replaced on disk).
    pub(crate) fn clear_cache(&mut self) {
        self.blocks = MetadataCache::new(self.blocks.capacity());
    }

    fn slot_index(&self, cluster: u64) -> u64 {
        cluster & ((1 << self.block_bits()) - 1)
    }

    /// The refcount of `cluster` from its cached block at `block`.
    pub(crate) fn get(&mut self, block: u64, cluster: u64) -> Result<u64> {
        let idx = self.slot_index(cluster);
        let slot = self.blocks.get_mut(block).ok_or(Error::Corrupt(format!(
            "refcount block {block:#x} is not loaded"
        )))?;
        self.order
            .get(&slot.data, idx)
            .map_err(Error::format("refcount block"))
    }

    /// Sets the refcount of `cluster` in its cached block at `block`, which becomes dirty.
    pub(crate) fn set(&mut self, block: u64, cluster: u64, value: u64) -> Result<()> {
        let idx = self.slot_index(cluster);
        let order = self.order;
        let slot = self.blocks.get_mut(block).ok_or(Error::Corrupt(format!(
            "refcount block {block:#x} is not loaded"
        )))?;
        order
            .set(&mut slot.data, idx, value)
            .map_err(Error::format("refcount block"))?;
        slot.dirty = true;
        Ok(())
    }

    /// Offsets of blocks changed in memory and not yet written, ascending.
    pub(crate) fn dirty_blocks(&self) -> Vec<u64> {
        self.blocks.dirty()
    }

    /// A copy of a cached block's bytes, to write while the cache stays usable.
    pub(crate) fn block_bytes(&mut self, block: u64) -> Option<Box<[u8]>> {
        self.blocks.get_mut(block).map(|s| s.data.clone())
    }

    /// Records that `block`'s bytes as last copied are on disk. A change made since the
    /// copy would be lost, which the metadata lock rules out: copy, write and mark happen
    /// under it.
    pub(crate) fn mark_written(&mut self, block: u64) {
        if let Some(s) = self.blocks.get_mut(block) {
            s.dirty = false;
        }
    }

    /// Drops least recently used clean blocks down to the cache's capacity. False: the rest
    /// is dirty, to be written before trying again.
    pub(crate) fn evict_clean(&mut self) -> bool {
        self.blocks.evict_clean().0
    }

    /// Drops one reference per cluster of `[off, off + len)` once the metadata that held it
    /// is durable (invariant 1).
    pub(crate) fn defer_free(&mut self, off: u64, len: u64) {
        // One entry per cluster, so that a failed write-back can retry exactly what is left.
        if len == 0 {
            return;
        }
        let bits = self.cluster_bits;
        for c in (off >> bits)..=((off + len - 1) >> bits) {
            self.deferred.push(c << bits);
        }
    }

    /// The next deferred free, for the owner to apply now that nothing durable refers to
    /// it; [`Refcounts::defer_free`] puts it back if applying it failed.
    pub(crate) fn take_deferred(&mut self) -> Option<u64> {
        self.deferred.pop()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BITS: u32 = 9; // 512-byte clusters: small blocks, many of them

    fn rc(order: u32, table: Vec<u64>) -> Refcounts {
        Refcounts::new(RefcountOrder::new(order).unwrap(), BITS, table, 4)
    }

    #[test]
    fn a_cluster_maps_to_its_block_by_width() {
        // 16-bit refcounts: 256 entries per 512-byte block.
        let r = rc(4, vec![0, 0x1000, 0]);
        assert_eq!(r.block_bits(), 8);
        assert_eq!(r.block_for(255), None);
        assert_eq!(r.block_for(256), Some(0x1000));
        assert_eq!(r.block_for(511), Some(0x1000));
        assert_eq!(r.block_for(512), None, "zero entry");
        assert_eq!(r.block_for(1 << 40), None, "beyond the table");
        assert!(r.table_has(2) && !r.table_has(3));
        // 1-bit refcounts: 4096 entries per block.
        assert_eq!(rc(0, vec![0x200]).block_bits(), 12);
        assert_eq!(rc(0, vec![0x200]).block_for(4095), Some(0x200));
    }

    #[test]
    fn a_bad_table_entry_is_reported_not_used() {
        let r = rc(4, vec![0x1001, 0x200]);
        let e = r.valid_block_for(3).unwrap_err();
        assert!(e.contains("refcount table entry 0"), "{e}");
        assert_eq!(r.valid_block_for(300), Ok(Some(0x200)));
        assert_eq!(r.block_offsets(), [0x1001, 0x200].into());
    }

    #[test]
    fn every_width_round_trips_and_overflow_is_an_error() {
        for order in 0..=6u32 {
            let mut r = rc(order, vec![0x400]);
            r.cache_block(0x400, vec![0u8; 512].into_boxed_slice(), false);
            let max = r.order().max();
            r.set(0x400, 7, max).unwrap();
            r.set(0x400, 8, 1).unwrap();
            assert_eq!(r.get(0x400, 7).unwrap(), max, "order {order}");
            assert_eq!(r.get(0x400, 8).unwrap(), 1);
            assert_eq!(r.get(0x400, 6).unwrap(), 0, "neighbours untouched");
            if order < 6 {
                assert!(r.set(0x400, 7, max + 1).is_err(), "order {order}");
            }
        }
    }

    #[test]
    fn an_uncached_block_is_an_error_not_a_panic() {
        let mut r = rc(4, vec![0x400]);
        assert!(r.get(0x400, 1).is_err());
        assert!(r.set(0x400, 1, 1).is_err());
    }

    #[test]
    fn changes_stay_dirty_until_written_and_dirty_blocks_are_never_evicted() {
        let mut r = rc(4, vec![]);
        for b in 0..4u64 {
            r.cache_block(0x1000 + b * 512, vec![0u8; 512].into_boxed_slice(), false);
        }
        r.set(0x1000, 0, 2).unwrap();
        r.cache_block(0x9000, vec![0u8; 512].into_boxed_slice(), true);
        assert_eq!(r.dirty_blocks(), vec![0x1000, 0x9000]);
        // Over capacity by one: a clean block goes, the dirty ones stay.
        assert!(r.evict_clean());
        assert!(r.is_cached(0x1000) && r.is_cached(0x9000));
        // Fill up with dirty blocks: nothing clean is left to evict.
        for b in 1..4u64 {
            if r.is_cached(0x1000 + b * 512) {
                r.set(0x1000 + b * 512, 0, 1).unwrap();
            }
        }
        r.cache_block(0xa000, vec![0u8; 512].into_boxed_slice(), true);
        assert!(!r.evict_clean(), "all dirty: must be written first");
        let bytes = r.block_bytes(0x1000).unwrap();
        assert_eq!(RefcountOrder::new(4).unwrap().get(&bytes, 0).unwrap(), 2);
        for b in r.dirty_blocks() {
            r.mark_written(b);
        }
        assert!(r.dirty_blocks().is_empty());
        assert!(r.evict_clean());
        r.clear_cache();
        assert!(!r.is_cached(0x1000));
    }

    #[test]
    fn a_forgotten_block_loses_its_unwritten_changes() {
        let mut r = rc(4, vec![0x400]);
        r.cache_block(0x400, vec![0u8; 512].into_boxed_slice(), true);
        r.forget_block(0x400);
        assert!(!r.is_cached(0x400) && r.dirty_blocks().is_empty());
    }

    #[test]
    fn table_switches_and_entries() {
        let mut r = rc(4, vec![0x400]);
        let old = r.replace_table(vec![0x400, 0, 0]);
        assert_eq!(old, vec![0x400]);
        r.set_table_entry(2, 0x800);
        assert_eq!(r.table(), &[0x400, 0, 0x800]);
        assert_eq!(r.block_for(2 * 256), Some(0x800));
    }

    #[test]
    fn deferred_frees_come_back_one_cluster_at_a_time() {
        let mut r = rc(4, vec![]);
        r.defer_free(0x200, 0);
        assert_eq!(r.take_deferred(), None, "an empty range frees nothing");
        // Two clusters' worth starting mid-cluster touch three clusters.
        r.defer_free(0x300, 0x400);
        let mut got = Vec::new();
        while let Some(c) = r.take_deferred() {
            got.push(c);
        }
        got.sort_unstable();
        assert_eq!(got, vec![0x200, 0x400, 0x600]);
        // A free that failed to apply is retried later.
        r.defer_free(0x400, 1);
        let c = r.take_deferred().unwrap();
        r.defer_free(c, 1);
        assert_eq!(r.take_deferred(), Some(0x400));
    }
}
