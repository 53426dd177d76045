//! The metadata cache for L2 tables and refcount blocks.
//!
//! Our own rather than a generic cache crate: an entry that is dirty must never be dropped
//! (moka may evict a freshly inserted entry), and the engine decides when dirty entries may be
//! written, because ordering between refcount blocks and L2 tables is what crash consistency
//! rests on. Eviction only ever removes clean entries; the owner writes dirty ones back first.
//! All access happens under the engine's metadata lock, so entries cannot move while in use.

use std::collections::HashMap;

/// One cached cluster of metadata.
#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) data: Box<[u8]>,
    pub(crate) dirty: bool,
    used: u64,
}

/// A bounded map from host offset to metadata cluster with LRU eviction of clean entries.
#[derive(Debug)]
pub(crate) struct MetadataCache {
    capacity: usize,
    slots: HashMap<u64, Slot>,
    tick: u64,
}

impl MetadataCache {
    pub(crate) fn new(capacity: usize) -> Self {
        MetadataCache {
            capacity: capacity.max(4),
            slots: HashMap::new(),
            tick: 0,
        }
    }

    pub(crate) fn get_mut(&mut self, off: u64) -> Option<&mut Slot> {
        self.tick += 1;
        let tick = self.tick;
        let slot = self.slots.get_mut(&off)?;
        slot.used = tick;
        Some(slot)
    }

    pub(crate) fn contains(&self, off: u64) -> bool {
        self.slots.contains_key(&off)
    }

    pub(crate) fn insert(&mut self, off: u64, data: Box<[u8]>, dirty: bool) -> &mut Slot {
        self.tick += 1;
        let used = self.tick;
        self.slots.insert(off, Slot { data, dirty, used });
        self.slots.get_mut(&off).expect("just inserted")
    }

    pub(crate) fn remove(&mut self, off: u64) -> Option<Slot> {
        self.slots.remove(&off)
    }

    /// Offsets of dirty entries, in ascending order (sequential write-back).
    pub(crate) fn dirty(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .slots
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(o, _)| *o)
            .collect();
        v.sort_unstable();
        v
    }

    /// Whether the cache holds more than its capacity.
    pub(crate) fn over_capacity(&self) -> bool {
        self.slots.len() > self.capacity
    }

    /// Drops least recently used clean entries until within capacity. Returns whether the
    /// cache is now within capacity (false: the rest is dirty and must be written first).
    pub(crate) fn evict_clean(&mut self) -> bool {
        if !self.over_capacity() {
            return true;
        }
        let mut clean: Vec<(u64, u64)> = self
            .slots
            .iter()
            .filter(|(_, s)| !s.dirty)
            .map(|(o, s)| (s.used, *o))
            .collect();
        clean.sort_unstable();
        let excess = self.slots.len() - self.capacity;
        for (_, off) in clean.into_iter().take(excess) {
            self.slots.remove(&off);
        }
        !self.over_capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_evicts_dirty_entries() {
        let mut c = MetadataCache::new(4);
        for i in 0..6 {
            c.insert(i, vec![0u8; 8].into(), true);
        }
        assert!(!c.evict_clean());
        assert_eq!(c.dirty().len(), 6);
        for i in 0..6 {
            c.get_mut(i).unwrap().dirty = false;
        }
        c.get_mut(0); // recently used survives
        assert!(c.evict_clean());
        assert!(c.contains(0));
        assert!(!c.contains(1));
    }
}
