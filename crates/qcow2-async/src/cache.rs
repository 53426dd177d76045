//! The metadata cache for L2 tables and refcount blocks.
//!
//! Our own rather than a generic cache crate: an entry that is dirty must never be dropped
//! (moka may evict a freshly inserted entry), and the engine decides when dirty entries may be
//! written, because ordering between refcount blocks and L2 tables is what crash consistency
//! rests on. Eviction only ever removes clean entries; the owner writes dirty ones back first.
//! All access happens under the engine's metadata lock, so entries cannot move while in use.
//! The payload is generic: refcount blocks are plain bytes, L2 tables are shared atomic
//! tables (`mapping.rs`), which lookups read without that lock.

use std::collections::HashMap;

/// One cached cluster of metadata.
#[derive(Debug)]
pub(crate) struct Slot<T> {
    pub(crate) data: T,
    pub(crate) dirty: bool,
    used: u64,
}

/// A bounded map from host offset to metadata cluster with LRU eviction of clean entries.
#[derive(Debug)]
pub(crate) struct MetadataCache<T> {
    capacity: usize,
    slots: HashMap<u64, Slot<T>>,
    tick: u64,
}

impl<T> MetadataCache<T> {
    pub(crate) fn new(capacity: usize) -> Self {
        MetadataCache {
            capacity: capacity.max(4),
            slots: HashMap::new(),
            tick: 0,
        }
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    pub(crate) fn get_mut(&mut self, off: u64) -> Option<&mut Slot<T>> {
        self.tick += 1;
        let tick = self.tick;
        let slot = self.slots.get_mut(&off)?;
        slot.used = tick;
        Some(slot)
    }

    pub(crate) fn contains(&self, off: u64) -> bool {
        self.slots.contains_key(&off)
    }

    pub(crate) fn insert(&mut self, off: u64, data: T, dirty: bool) -> &mut Slot<T> {
        self.tick += 1;
        let used = self.tick;
        self.slots.insert(off, Slot { data, dirty, used });
        self.slots.get_mut(&off).expect("just inserted")
    }

    pub(crate) fn remove(&mut self, off: u64) -> Option<Slot<T>> {
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
    /// cache is now within capacity (false: the rest is dirty and must be written first),
    /// and the offsets dropped.
    pub(crate) fn evict_clean(&mut self) -> (bool, Vec<u64>) {
        if !self.over_capacity() {
            return (true, Vec::new());
        }
        let mut clean: Vec<(u64, u64)> = self
            .slots
            .iter()
            .filter(|(_, s)| !s.dirty)
            .map(|(o, s)| (s.used, *o))
            .collect();
        clean.sort_unstable();
        let excess = self.slots.len() - self.capacity;
        let evicted: Vec<u64> = clean.into_iter().take(excess).map(|(_, o)| o).collect();
        for off in &evicted {
            self.slots.remove(off);
        }
        (!self.over_capacity(), evicted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_evicts_dirty_entries() {
        let mut c = MetadataCache::new(4);
        for i in 0..6 {
            c.insert(i, vec![0u8; 8].into_boxed_slice(), true);
        }
        assert!(!c.evict_clean().0);
        assert_eq!(c.dirty().len(), 6);
        for i in 0..6 {
            c.get_mut(i).unwrap().dirty = false;
        }
        c.get_mut(0); // recently used survives
        assert_eq!(c.evict_clean(), (true, vec![1, 2]));
        assert!(c.contains(0));
        assert!(!c.contains(1));
    }
}
