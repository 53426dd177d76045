//! The bounded block cache: aligned blocks of the object, least recently used evicted
//! first, bounded in bytes.

use std::collections::{BTreeMap, HashMap};

use crate::block::SharedBlock;

/// Blocks by index. Not synchronised: the file keeps it under its state lock, which is
/// never held across an await.
#[derive(Debug, Default)]
pub(crate) struct BlockCache {
    capacity: u64,
    used: u64,
    /// Bumped on every use; a block's last use orders eviction.
    clock: u64,
    blocks: HashMap<u64, (SharedBlock, u64)>,
    /// Last use → block, oldest first.
    by_use: BTreeMap<u64, u64>,
}

impl BlockCache {
    pub(crate) fn new(capacity: u64) -> BlockCache {
        BlockCache {
            capacity,
            ..BlockCache::default()
        }
    }

    /// The block, marked as just used.
    pub(crate) fn get(&mut self, block: u64) -> Option<SharedBlock> {
        self.clock += 1;
        let (bytes, used) = self.blocks.get_mut(&block)?;
        self.by_use.remove(used);
        *used = self.clock;
        self.by_use.insert(self.clock, block);
        Some(bytes.clone())
    }

    pub(crate) fn contains(&self, block: u64) -> bool {
        self.blocks.contains_key(&block)
    }

    /// Keeps `bytes` as `block`, evicting the least recently used blocks to stay within
    /// the capacity (a block larger than the whole capacity is not kept).
    pub(crate) fn insert(&mut self, block: u64, bytes: SharedBlock) {
        let len = bytes.len() as u64;
        if len > self.capacity {
            return;
        }
        self.remove(block);
        while self.used + len > self.capacity {
            let Some((_, oldest)) = self.by_use.pop_first() else {
                break;
            };
            if let Some((b, _)) = self.blocks.remove(&oldest) {
                self.used -= b.len() as u64;
            }
        }
        self.clock += 1;
        self.used += len;
        self.blocks.insert(block, (bytes, self.clock));
        self.by_use.insert(self.clock, block);
    }

    fn remove(&mut self, block: u64) {
        if let Some((b, used)) = self.blocks.remove(&block) {
            self.by_use.remove(&used);
            self.used -= b.len() as u64;
        }
    }

    /// Bytes held.
    pub(crate) fn used(&self) -> u64 {
        self.used
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::BlockPool;

    fn block(n: usize) -> SharedBlock {
        let pool = BlockPool::new(512, 512, false);
        let mut b = pool.take();
        b.push(&vec![0u8; n]);
        std::sync::Arc::new(b)
    }

    #[test]
    fn least_recently_used_goes_first_and_the_bound_holds() {
        let mut c = BlockCache::new(300);
        c.insert(1, block(100));
        c.insert(2, block(100));
        c.insert(3, block(100));
        assert!(c.get(1).is_some()); // 2 is now the oldest
        c.insert(4, block(100));
        assert!(!c.contains(2));
        assert!(c.contains(1) && c.contains(3) && c.contains(4));
        assert_eq!(c.used(), 300);
        // Replacing a block does not count it twice.
        c.insert(4, block(50));
        assert_eq!(c.used(), 250);
        // Too large for the cache: not kept, nothing evicted for it.
        c.insert(5, block(301));
        assert!(!c.contains(5));
        assert_eq!(c.used(), 250);
    }

    #[test]
    fn zero_capacity_keeps_nothing() {
        let mut c = BlockCache::new(0);
        c.insert(1, block(10));
        assert!(c.get(1).is_none());
        assert_eq!(c.used(), 0);
    }
}
