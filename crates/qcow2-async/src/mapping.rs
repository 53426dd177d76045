//! The L2 table cache, shared between the metadata owner and lock-free-of-`Meta` lookups.
//!
//! Two views of one set of tables:
//!
//! * [`L2Cache`] is the owner's view, held inside `Meta` (so under the metadata lock): a
//!   bounded LRU of [`L2Table`]s by host offset, with dirty tracking and write-back left to
//!   `Meta`, exactly as before the split.
//! * [`MappingIndex`] is the readers' view, shared with every request as an `Arc`: the
//!   cached tables that the *active* L1 table points at, keyed by L1 index. A lookup of a
//!   cached mapping takes only this index's read lock, held for a hash lookup and two atomic
//!   loads, never across I/O; the metadata lock, which L2 loads, refcount loads, allocation
//!   and write-back hold, is not involved (invariant 11).
//!
//! Invariants, kept by [`L2Cache`] alone (it is the only writer of the index):
//!
//! * the index holds a table only while that table is in the cache, and only under the L1
//!   index whose *current* active L1 entry points at it: every L1 change goes through
//!   [`L2Cache::unlink`] before it is made, and every removal from the cache drops the
//!   table's index entry in the same step;
//! * entries are atomic words, changed only by the owner. A reader holds the guest
//!   cluster's lease, and an entry changes only under the exclusive lease of its cluster
//!   (invariant 2), so the entry a reader loads is the current one; neighbouring entries of
//!   the same table may change meanwhile, which is why each word is its own atomic.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use qcow2_format::l2::decode_extended;
use qcow2_format::{Geometry, GuestOffset, L2Entry, L2Format, SubclusterBitmap};

use crate::cache::MetadataCache;
use crate::sharded::ReadMostly;

/// One L2 table: its entries as native-endian words (two per entry on extended-L2 images).
#[derive(Debug)]
pub(crate) struct L2Table {
    words: Box<[AtomicU64]>,
}

impl L2Table {
    /// A table decoded from its on-disk (big-endian) bytes.
    pub(crate) fn from_bytes(bytes: &[u8]) -> L2Table {
        L2Table {
            words: bytes
                .chunks_exact(8)
                .map(|c| AtomicU64::new(u64::from_be_bytes(c.try_into().expect("8 bytes"))))
                .collect(),
        }
    }

    /// An empty table of `bytes` bytes (one cluster).
    pub(crate) fn zeroed(bytes: usize) -> L2Table {
        L2Table {
            words: (0..bytes / 8).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The table as it goes to disk.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.words.len() * 8);
        for w in self.words.iter() {
            out.extend_from_slice(&w.load(Ordering::Acquire).to_be_bytes());
        }
        out
    }

    /// Replaces every entry with the big-endian `bytes` (one cluster).
    pub(crate) fn store_bytes(&self, bytes: &[u8]) {
        for (w, c) in self.words.iter().zip(bytes.chunks_exact(8)) {
            w.store(
                u64::from_be_bytes(c.try_into().expect("8 bytes")),
                Ordering::Release,
            );
        }
    }

    /// Word `i` (an entry's first word is at `l2_index * entry_size / 8`).
    pub(crate) fn word(&self, i: usize) -> u64 {
        self.words[i].load(Ordering::Acquire)
    }

    pub(crate) fn set_word(&self, i: usize, v: u64) {
        self.words[i].store(v, Ordering::Release);
    }

    /// The decoded entry at `l2_index` (its subcluster bitmap on extended-L2 images).
    pub(crate) fn entry(
        &self,
        l2_index: usize,
        fmt: L2Format,
    ) -> qcow2_format::Result<(L2Entry, SubclusterBitmap)> {
        if fmt.extended_l2 {
            decode_extended(self.word(2 * l2_index), self.word(2 * l2_index + 1), fmt)
        } else {
            L2Entry::decode(self.word(l2_index), fmt).map(|e| (e, SubclusterBitmap::default()))
        }
    }

    /// A copy with its own words (copy-on-write of a table shared with a snapshot).
    pub(crate) fn duplicate(&self) -> L2Table {
        L2Table {
            words: self
                .words
                .iter()
                .map(|w| AtomicU64::new(w.load(Ordering::Acquire)))
                .collect(),
        }
    }
}

/// The readers' view: cached L2 tables of the active L1, by L1 index.
#[derive(Debug)]
pub(crate) struct MappingIndex {
    geo: Geometry,
    fmt: L2Format,
    /// One replica per thread shard (`sharded.rs`): lookups on different cores share no
    /// lock word.
    tables: ReadMostly<Tables>,
}

#[derive(Debug, Default, Clone)]
struct Tables {
    /// Published tables by active L1 index.
    by_l1: HashMap<u64, Arc<L2Table>>,
    /// Host offsets of every cached L2 table, published or not (the overlap check of a
    /// guest data write must not land on one).
    cached: HashSet<u64>,
}

impl MappingIndex {
    pub(crate) fn new(geo: Geometry, fmt: L2Format) -> MappingIndex {
        MappingIndex {
            geo,
            fmt,
            tables: ReadMostly::new(Tables::default()),
        }
    }

    /// The mapping of guest cluster `gc` if its L2 table is cached, or `None`: then the
    /// caller asks `Meta`, which loads the table (or reports a bad entry as corruption).
    ///
    /// The caller must hold a lease on `gc`, which is what keeps the answer current.
    pub(crate) fn lookup(&self, gc: u64) -> Option<(L2Entry, SubclusterBitmap)> {
        let pos = self.geo.locate(GuestOffset(gc << self.geo.cluster_bits()));
        // The entry is read while the replica is locked: see `ReadMostly` for why a table
        // withdrawn meanwhile from other replicas still answers correctly.
        self.tables.read(|tables| {
            let t = tables.by_l1.get(&pos.l1_index)?;
            t.entry(pos.l2_index, self.fmt).ok()
        })
    }

    /// Whether an L2 table at host offset `host` is cached.
    pub(crate) fn is_cached(&self, host: u64) -> bool {
        self.tables.read(|tables| tables.cached.contains(&host))
    }

    fn update<R>(&self, f: impl FnMut(&mut Tables) -> R) -> R {
        self.tables.update(f)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.tables.read(|t| t.by_l1.len())
    }
}

/// The owner's view: the bounded cache of L2 tables by host offset, publishing the tables
/// of the active L1 to its [`MappingIndex`].
#[derive(Debug)]
pub(crate) struct L2Cache {
    cache: MetadataCache<Arc<L2Table>>,
    /// Which L1 index links each published table (host offset -> L1 index).
    linked: HashMap<u64, u64>,
    index: Arc<MappingIndex>,
    /// Tables being read outside the metadata lock (host offset -> readers, generation).
    /// The generation moves whenever the table enters the cache (or the cache is cleared):
    /// a table's bytes on disk change only through its cached copy, so bytes read while the
    /// generation stood still are the table's current contents if it is still not cached.
    loading: HashMap<u64, (usize, u64)>,
}

/// A read of an L2 table begun outside the metadata lock ([`L2Cache::begin_load`]).
#[derive(Debug)]
pub(crate) struct LoadToken {
    host: u64,
    generation: u64,
}

impl L2Cache {
    pub(crate) fn new(capacity: usize, index: Arc<MappingIndex>) -> L2Cache {
        L2Cache {
            cache: MetadataCache::new(capacity),
            linked: HashMap::new(),
            index,
            loading: HashMap::new(),
        }
    }

    /// Records that the table at `host`, not cached, is being read without the lock.
    pub(crate) fn begin_load(&mut self, host: u64) -> LoadToken {
        let e = self.loading.entry(host).or_insert((0, 0));
        e.0 += 1;
        LoadToken {
            host,
            generation: e.1,
        }
    }

    /// Ends a read begun by [`Self::begin_load`]: whether its bytes may be cached, that is,
    /// the table is still not cached and did not enter the cache meanwhile. (A reader whose
    /// future was dropped never ends its read; its count stays, harmlessly.)
    pub(crate) fn finish_load(&mut self, t: LoadToken) -> bool {
        let Some(e) = self.loading.get_mut(&t.host) else {
            return false;
        };
        e.0 -= 1;
        let valid = e.1 == t.generation;
        if e.0 == 0 {
            self.loading.remove(&t.host);
        }
        valid && !self.cache.contains(t.host)
    }

    pub(crate) fn index(&self) -> &Arc<MappingIndex> {
        &self.index
    }

    pub(crate) fn contains(&self, host: u64) -> bool {
        self.cache.contains(host)
    }

    /// The cached table at `host` (marking it recently used).
    pub(crate) fn get(&mut self, host: u64) -> Option<&Arc<L2Table>> {
        self.cache.get_mut(host).map(|s| &s.data)
    }

    pub(crate) fn insert(&mut self, host: u64, table: L2Table, dirty: bool) {
        if let Some(e) = self.loading.get_mut(&host) {
            e.1 += 1;
        }
        self.remove(host);
        self.cache.insert(host, Arc::new(table), dirty);
        self.index.update(|t| t.cached.insert(host));
    }

    pub(crate) fn mark_dirty(&mut self, host: u64) {
        if let Some(s) = self.cache.get_mut(host) {
            s.dirty = true;
        }
    }

    pub(crate) fn mark_clean(&mut self, host: u64) {
        if let Some(s) = self.cache.get_mut(host) {
            s.dirty = false;
        }
    }

    /// Offsets of dirty tables, ascending.
    pub(crate) fn dirty(&self) -> Vec<u64> {
        self.cache.dirty()
    }

    /// Publishes the cached table at `host` as the one active L1 entry `l1_index` points
    /// at. The caller has just read that L1 entry under the metadata lock.
    pub(crate) fn link(&mut self, l1_index: u64, host: u64) {
        // Already published there (the common case on the slow path): the index's write
        // lock, which readers would wait for, is not taken.
        if self.linked.get(&host) == Some(&l1_index) {
            return;
        }
        let Some(slot) = self.cache.get_mut(host) else {
            return;
        };
        let table = slot.data.clone();
        let moved_from = self
            .linked
            .insert(host, l1_index)
            .filter(|&old| old != l1_index);
        let replaced = self.index.update(|t| {
            if let Some(old) = moved_from {
                t.by_l1.remove(&old);
            }
            t.by_l1.insert(l1_index, table.clone()).is_some()
        });
        if replaced {
            // Another table was published there: forget which index it had.
            self.linked.retain(|&h, &mut i| i != l1_index || h == host);
        }
    }

    /// Withdraws whatever is published for `l1_index`: call before changing that L1 entry.
    pub(crate) fn unlink(&mut self, l1_index: u64) {
        if self.index.update(|t| t.by_l1.remove(&l1_index).is_some()) {
            self.linked.retain(|_, &mut i| i != l1_index);
        }
    }

    /// Drops the table at `host` from the cache and the index.
    pub(crate) fn remove(&mut self, host: u64) {
        withdraw(&self.index, &mut self.linked, &[host]);
        self.cache.remove(host);
    }

    /// Evicts least recently used clean tables until within capacity; false when the rest
    /// is dirty and must be written first.
    pub(crate) fn evict_clean(&mut self) -> bool {
        let (ok, evicted) = self.cache.evict_clean();
        if !evicted.is_empty() {
            withdraw(&self.index, &mut self.linked, &evicted);
        }
        ok
    }

    /// Forgets every table (after tables or the L1 were replaced on disk).
    pub(crate) fn clear(&mut self) {
        self.index.update(|t| {
            t.by_l1.clear();
            t.cached.clear();
        });
        self.linked.clear();
        for e in self.loading.values_mut() {
            e.1 += 1;
        }
        self.cache = MetadataCache::new(self.cache.capacity());
    }
}

/// Takes the table at `host` out of the index: its publication, if linked, and its place
/// among the cached tables.
fn withdraw(index: &MappingIndex, linked: &mut HashMap<u64, u64>, hosts: &[u64]) {
    let unpublish: Vec<u64> = hosts.iter().filter_map(|h| linked.remove(h)).collect();
    index.update(|t| {
        for i in &unpublish {
            t.by_l1.remove(i);
        }
        for h in hosts {
            t.cached.remove(h);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use qcow2_format::HostOffset;

    fn setup(capacity: usize) -> (Geometry, L2Format, L2Cache) {
        let geo = Geometry::new(16, false).unwrap();
        let fmt = L2Format {
            cluster_bits: 16,
            extended_l2: false,
            external_data_file: false,
            zero_flag: true,
        };
        let index = Arc::new(MappingIndex::new(geo, fmt));
        (geo, fmt, L2Cache::new(capacity, index))
    }

    fn normal(host: u64, fmt: L2Format) -> u64 {
        L2Entry::Normal {
            host: HostOffset(host),
            copied: true,
        }
        .encode(fmt)
        .unwrap()
    }

    #[test]
    fn bytes_round_trip() {
        let mut bytes = vec![0u8; 65536];
        bytes[8..16].copy_from_slice(&0x8000_0000_0005_0000u64.to_be_bytes());
        let t = L2Table::from_bytes(&bytes);
        assert_eq!(t.word(1), 0x8000_0000_0005_0000);
        assert_eq!(t.to_bytes(), bytes);
        let d = t.duplicate();
        t.set_word(1, 0);
        assert_eq!(d.word(1), 0x8000_0000_0005_0000);
    }

    #[test]
    fn lookups_see_only_linked_tables_and_their_updates() {
        let (geo, fmt, mut c) = setup(8);
        let gc = geo.l2_entries() as u64 + 3; // L1 index 1, L2 index 3
        let idx = c.index().clone();
        c.insert(0x30000, L2Table::zeroed(65536), false);
        assert!(idx.lookup(gc).is_none(), "cached but not linked");
        assert!(idx.is_cached(0x30000));
        c.link(1, 0x30000);
        assert_eq!(idx.lookup(gc).unwrap().0, L2Entry::Unallocated);
        c.get(0x30000).unwrap().set_word(3, normal(0x50000, fmt));
        assert_eq!(
            idx.lookup(gc).unwrap().0,
            L2Entry::Normal {
                host: HostOffset(0x50000),
                copied: true
            }
        );
        c.unlink(1);
        assert!(idx.lookup(gc).is_none());
        assert!(c.contains(0x30000), "unlinking keeps the table cached");
    }

    #[test]
    fn removal_and_eviction_withdraw_published_tables() {
        let (geo, _, mut c) = setup(4);
        let idx = c.index().clone();
        for i in 0..4u64 {
            c.insert(0x10000 * (i + 2), L2Table::zeroed(65536), false);
            c.link(i, 0x10000 * (i + 2));
        }
        assert_eq!(idx.len(), 4);
        c.remove(0x20000);
        assert!(idx.lookup(0).is_none());
        assert!(!idx.is_cached(0x20000));
        assert_eq!(idx.len(), 3);
        // Over capacity: the least recently used clean tables go, and their entries too.
        for i in 4..8u64 {
            c.insert(0x10000 * (i + 2), L2Table::zeroed(65536), i == 7);
            c.link(i, 0x10000 * (i + 2));
        }
        assert!(c.evict_clean());
        let per_table = geo.l2_entries() as u64;
        let published = (0..8)
            .filter(|&i| idx.lookup(i * per_table).is_some())
            .count();
        assert_eq!(published, idx.len());
        assert_eq!(idx.len(), 4);
        assert!(idx.lookup(7 * per_table).is_some(), "dirty table kept");
        c.clear();
        assert_eq!(idx.len(), 0);
        assert!(!idx.is_cached(0x90000));
    }

    #[test]
    fn relinking_an_index_replaces_the_old_table() {
        let (_, _, mut c) = setup(8);
        let idx = c.index().clone();
        c.insert(0x20000, L2Table::zeroed(65536), false);
        c.insert(0x30000, L2Table::zeroed(65536), false);
        c.link(0, 0x20000);
        c.link(0, 0x30000);
        // Removing the first table must not withdraw the second one's publication.
        c.remove(0x20000);
        assert!(idx.lookup(0).is_some());
        c.remove(0x30000);
        assert!(idx.lookup(0).is_none());
    }

    #[test]
    fn a_bad_entry_is_left_to_the_slow_path() {
        let (_, _, mut c) = setup(8);
        let idx = c.index().clone();
        c.insert(0x20000, L2Table::zeroed(65536), false);
        c.link(0, 0x20000);
        // Reserved bits set: the slow path reports the corruption.
        c.get(0x20000).unwrap().set_word(0, 0x0000_0000_0000_00ff);
        assert!(idx.lookup(0).is_none());
    }

    #[test]
    fn a_table_read_without_the_lock_is_cached_only_if_nothing_cached_it_meanwhile() {
        let (_, _, mut c) = setup(4);
        // Nothing happened meanwhile: the bytes are current.
        let t = c.begin_load(0x10000);
        assert!(c.finish_load(t));
        // Someone else cached (and may have changed) the table meanwhile.
        let t = c.begin_load(0x10000);
        c.insert(0x10000, L2Table::zeroed(65536), true);
        assert!(!c.finish_load(t));
        // ...even if it was evicted again before the reader came back.
        c.remove(0x10000);
        let t = c.begin_load(0x10000);
        c.insert(0x10000, L2Table::zeroed(65536), false);
        c.remove(0x10000);
        assert!(!c.finish_load(t));
        // The cache was cleared (tables or the L1 replaced on disk).
        let t = c.begin_load(0x20000);
        c.clear();
        assert!(!c.finish_load(t));
        // Two readers of one table: each is judged on its own, and other tables do not count.
        let (a, b) = (c.begin_load(0x30000), c.begin_load(0x30000));
        c.insert(0x40000, L2Table::zeroed(65536), false);
        assert!(c.finish_load(a));
        assert!(c.finish_load(b));
        assert!(c.loading.is_empty());
    }
}
