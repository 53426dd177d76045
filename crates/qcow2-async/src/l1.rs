//! The active L1 table as memory holds it: raw entries and which 512-byte sectors of the
//! on-disk copy are behind.
//!
//! No I/O happens here: `Meta` writes the [dirty sectors](L1Table::dirty_sectors) in
//! write-back's L1 phase, after the L2 tables they point at are durable (invariant 1), and
//! reports each one written. Sector granularity is QEMU's: an L1 update rewrites the 512
//! bytes holding the entry, never the whole table. Entries are kept raw, as on disk, and
//! decoded where used: an image with a bad entry opens, like QEMU's, and using the entry
//! fails.

use std::collections::BTreeSet;

const SECTOR: u64 = 512;
const ENTRIES_PER_SECTOR: u64 = SECTOR / 8;

#[derive(Debug, Default)]
pub(crate) struct L1Table {
    entries: Vec<u64>,
    /// Sectors changed in memory and not yet written.
    dirty: BTreeSet<u64>,
}

impl L1Table {
    /// A table as read from disk (nothing dirty).
    pub(crate) fn new(entries: Vec<u64>) -> Self {
        L1Table {
            entries,
            dirty: BTreeSet::new(),
        }
    }

    pub(crate) fn len(&self) -> u64 {
        self.entries.len() as u64
    }

    /// The raw entry at `idx`; 0 (no L2 table) past the end, as for a guest offset the
    /// table does not reach yet.
    pub(crate) fn get(&self, idx: u64) -> u64 {
        usize::try_from(idx)
            .ok()
            .and_then(|i| self.entries.get(i))
            .copied()
            .unwrap_or(0)
    }

    pub(crate) fn entries(&self) -> &[u64] {
        &self.entries
    }

    /// Changes entry `idx` (which must exist) in memory; its sector is written at the next
    /// write-back.
    pub(crate) fn set(&mut self, idx: u64, raw: u64) {
        self.entries[idx as usize] = raw;
        self.mark_dirty(idx);
    }

    /// Records entry `idx` as the disk already has it (a repair wrote it directly).
    pub(crate) fn store_written(&mut self, idx: u64, raw: u64) {
        self.entries[idx as usize] = raw;
    }

    /// Queues entry `idx`'s sector for the next write-back without changing it.
    pub(crate) fn mark_dirty(&mut self, idx: u64) {
        self.dirty.insert(idx / ENTRIES_PER_SECTOR);
    }

    /// Switches to another table and returns the old one. `on_disk`: the new table is
    /// already where the header points (a grown table, a new image), so nothing is dirty;
    /// otherwise every sector is written at the next write-back (a snapshot revert copies
    /// the snapshot's table over the active one).
    pub(crate) fn replace(&mut self, entries: Vec<u64>, on_disk: bool) -> Vec<u64> {
        let old = std::mem::replace(&mut self.entries, entries);
        self.dirty.clear();
        if !on_disk {
            self.dirty = (0..self.len().div_ceil(ENTRIES_PER_SECTOR)).collect();
        }
        old
    }

    pub(crate) fn is_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Sectors to write, ascending.
    pub(crate) fn dirty_sectors(&self) -> Vec<u64> {
        self.dirty.iter().copied().collect()
    }

    /// Where sector `sector` lies in the table (a byte offset from its start) and its bytes
    /// as on disk; the last sector of a table that ends mid-sector is short.
    pub(crate) fn sector_bytes(&self, sector: u64) -> (u64, Vec<u8>) {
        let first = (sector * ENTRIES_PER_SECTOR).min(self.len());
        let end = (first + ENTRIES_PER_SECTOR).min(self.len());
        let bytes = self.entries[first as usize..end as usize]
            .iter()
            .flat_map(|e| e.to_be_bytes())
            .collect();
        (sector * SECTOR, bytes)
    }

    /// Sector `sector` as last read by [`L1Table::sector_bytes`] is on disk. The metadata
    /// lock keeps entries from changing between the two.
    pub(crate) fn sector_written(&mut self, sector: u64) {
        self.dirty.remove(&sector);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_update_dirties_the_sector_holding_its_entry() {
        let mut t = L1Table::new(vec![0; 130]);
        assert!(!t.is_dirty());
        t.set(63, 0x1_0000);
        t.set(64, 0x2_0000);
        t.mark_dirty(129);
        assert_eq!(t.dirty_sectors(), vec![0, 1, 2]);
        assert_eq!(t.get(63), 0x1_0000);
        assert_eq!(t.get(1 << 40), 0, "past the end: no table");
    }

    #[test]
    fn sectors_are_encoded_big_endian_and_the_last_one_is_short() {
        let mut t = L1Table::new(vec![0; 66]);
        t.set(65, 0x8000_0000_0003_0000);
        let (at, bytes) = t.sector_bytes(1);
        assert_eq!(at, 512);
        assert_eq!(bytes.len(), 16, "two entries in the last sector");
        assert_eq!(&bytes[8..], &0x8000_0000_0003_0000u64.to_be_bytes());
        assert_eq!(t.sector_bytes(0).1.len(), 512);
        t.sector_written(1);
        assert!(!t.is_dirty());
    }

    #[test]
    fn a_replaced_table_is_clean_if_on_disk_and_wholly_dirty_if_not() {
        let mut t = L1Table::new(vec![1; 10]);
        t.set(0, 5);
        let old = t.replace(vec![0; 200], true);
        assert_eq!(old[0], 5);
        assert!(!t.is_dirty(), "a grown table was written whole");
        t.replace(vec![7; 200], false);
        assert_eq!(t.dirty_sectors(), vec![0, 1, 2, 3]);
        assert_eq!(t.entries().len(), 200);
    }

    #[test]
    fn a_repaired_entry_is_not_written_again() {
        let mut t = L1Table::new(vec![0; 4]);
        t.store_written(2, 9);
        assert_eq!(t.get(2), 9);
        assert!(!t.is_dirty());
    }
}
