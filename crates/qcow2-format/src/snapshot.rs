//! Internal snapshot table (reference §4).
//!
//! The table is a packed sequence of variable-length entries, each starting 8-byte aligned
//! relative to the table start (which is cluster aligned in the image, so relative and
//! absolute alignment agree). Decoding follows QEMU's `qcow2_do_read_snapshots`; encoding
//! follows `qcow2_write_snapshots`, so a table rewritten here is byte-identical to the one
//! QEMU would write for the same in-memory state.
//!
//! Because the table's byte length is not stored anywhere, a caller that does not know it can
//! decode a prefix and, on [`Error::Truncated`], read `needed` bytes and retry: `needed` never
//! exceeds [`Limits::max_snapshot_table_bytes`] because the size limit is checked before an
//! entry's variable part is requested.

use crate::codec::{be64_at, Reader, Writer};
use crate::error::{Error, Result};
use crate::limits::Limits;

/// Size of the fixed part of an entry, before the extra data.
pub const SNAPSHOT_HEADER_SIZE: usize = 40;

/// Extra data QEMU knows and always writes: `vm_state_size_large`, `disk_size`, `icount`.
pub const SNAPSHOT_KNOWN_EXTRA_SIZE: usize = 24;

/// Offset of the end of `vm_state_size_large` inside the extra data.
const EXTRA_END_VM_STATE: usize = 8;
/// Offset of the end of `disk_size` inside the extra data; v3 requires at least this much.
const EXTRA_END_DISK_SIZE: usize = 16;
/// Offset of the end of `icount` inside the extra data.
const EXTRA_END_ICOUNT: usize = 24;

/// The icount value meaning "not recorded" (QEMU's default when the field is absent).
pub const ICOUNT_NOT_RECORDED: i64 = -1;

/// One internal snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotEntry {
    /// Host offset of the snapshot's L1 table (must be cluster aligned; see [`Self::validate`]).
    pub l1_table_offset: u64,
    /// Number of entries in the snapshot's L1 table.
    pub l1_size: u32,
    /// Unique ID string (QEMU generates decimal numbers, see [`SnapshotTable::next_id`]).
    pub id: String,
    /// User-visible name.
    pub name: String,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest VM clock at creation, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Size of the saved VM state. Taken from the 64-bit extra field when the entry has one,
    /// since that field exists precisely because the legacy 32-bit field can overflow.
    pub vm_state_size: u64,
    /// Virtual disk size at snapshot time; `None` when the entry's extra data is too short to
    /// hold it. QEMU substitutes the current image size in that case, which only the caller
    /// knows: see [`SnapshotTable::resolve_defaults`].
    pub disk_size: Option<u64>,
    /// Instruction count for record/replay; `None` when absent from the extra data. A present
    /// value of [`ICOUNT_NOT_RECORDED`] (−1) is kept as `Some(-1)` so it re-encodes unchanged;
    /// note that `qemu-img snapshot -c` writes 0, not −1.
    pub icount: Option<i64>,
    /// Extra data beyond the 24 bytes QEMU understands; preserved verbatim as QEMU does, so a
    /// newer writer's fields survive a rewrite.
    pub unknown_extra: Vec<u8>,
}

/// The whole snapshot table, in on-disk order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotTable {
    /// Entries in table order.
    pub entries: Vec<SnapshotEntry>,
}

fn check_version(version: u32) -> Result<()> {
    if version == 2 || version == 3 {
        Ok(())
    } else {
        Err(Error::invalid(
            "qcow2 version",
            version.into(),
            "must be 2 or 3",
        ))
    }
}

/// Converts a stored string field as QEMU sees it: QEMU reads the stored bytes into a C
/// string, so the field ends at its first NUL (qemu-img's repair of an oversized table can
/// leave such names, and QEMU writes back only what precedes the NUL). The entry still takes
/// its stored length on disk; only the string is shorter.
fn decode_string(bytes: &[u8], what: &'static str) -> Result<String> {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8(bytes[..end].to_vec()).map_err(|_| Error::BadString { what })
}

/// Checks that a string can be written as a QEMU snapshot string field and returns its length.
fn encodable_len(s: &str, what: &'static str) -> Result<u16> {
    if s.as_bytes().contains(&0) {
        return Err(Error::BadString { what });
    }
    u16::try_from(s.len()).map_err(|_| Error::limit(what, s.len() as u64, u16::MAX.into()))
}

impl SnapshotEntry {
    /// Bytes this entry occupies when encoded, excluding alignment padding before it.
    ///
    /// Uses the layout QEMU writes: at least the 24 known extra bytes.
    pub fn encoded_len(&self) -> u64 {
        (SNAPSHOT_HEADER_SIZE as u64)
            .saturating_add(SNAPSHOT_KNOWN_EXTRA_SIZE as u64)
            .saturating_add(self.unknown_extra.len() as u64)
            .saturating_add(self.id.len() as u64)
            .saturating_add(self.name.len() as u64)
    }

    /// Checks the snapshot's L1 table location as QEMU's `qcow2_validate_table` does before
    /// using it (goto, delete, check): size within the L1 limit, offset cluster aligned, and
    /// the table ending below `i64::MAX`. The table decoder cannot do this because it does
    /// not know the cluster size.
    pub fn validate(&self, cluster_size: u64, limits: &Limits) -> Result<()> {
        if cluster_size == 0 || !cluster_size.is_power_of_two() {
            return Err(Error::invalid(
                "cluster size",
                cluster_size,
                "must be a power of two",
            ));
        }
        let max_entries = limits.max_l1_bytes / 8;
        if u64::from(self.l1_size) > max_entries {
            return Err(Error::limit(
                "snapshot L1 table entries",
                self.l1_size.into(),
                max_entries,
            ));
        }
        if self.l1_table_offset % cluster_size != 0 {
            return Err(Error::Unaligned {
                what: "snapshot L1 table",
                offset: self.l1_table_offset,
                alignment: cluster_size,
            });
        }
        // QEMU uses INT64_MAX because offsets end up in signed 64-bit arguments.
        let end = u64::from(self.l1_size)
            .checked_mul(8)
            .and_then(|b| b.checked_add(self.l1_table_offset))
            .ok_or_else(|| Error::overflow("snapshot L1 table"))?;
        if end > i64::MAX as u64 {
            return Err(Error::invalid(
                "snapshot L1 table offset",
                self.l1_table_offset,
                "table ends beyond INT64_MAX",
            ));
        }
        Ok(())
    }

    /// True if a version-`version` image requires more extra data than this entry was read
    /// with: v3 demands `disk_size` in every entry, and QEMU's `check` reports such entries as
    /// "incomplete" (open accepts them; a rewrite completes them).
    pub fn is_incomplete(&self, version: u32) -> bool {
        version >= 3 && self.disk_size.is_none()
    }

    fn decode(r: &mut Reader<'_>, limits: &Limits) -> Result<Self> {
        let l1_table_offset = r.u64()?;
        let l1_size = r.u32()?;
        let id_len = usize::from(r.u16()?);
        let name_len = usize::from(r.u16()?);
        let date_sec = r.u32()?;
        let date_nsec = r.u32()?;
        let vm_clock_nsec = r.u64()?;
        let vm_state_size_32 = r.u32()?;
        let extra_size = r.u32()?;

        if extra_size > limits.max_snapshot_extra_data {
            return Err(Error::limit(
                "snapshot extra data size",
                extra_size.into(),
                limits.max_snapshot_extra_data.into(),
            ));
        }
        let extra_size =
            usize::try_from(extra_size).map_err(|_| Error::overflow("snapshot extra data"))?;

        // Check the table limit before asking for the variable part, so that a caller reading
        // incrementally is never told to fetch more than the limit allows.
        let end = r
            .pos()
            .checked_add(extra_size)
            .and_then(|e| e.checked_add(id_len))
            .and_then(|e| e.checked_add(name_len))
            .ok_or_else(|| Error::overflow("snapshot table"))?;
        if end as u64 > limits.max_snapshot_table_bytes {
            return Err(Error::limit(
                "snapshot table size",
                end as u64,
                limits.max_snapshot_table_bytes,
            ));
        }

        let extra = r.bytes(extra_size)?;
        // `extra.len() == extra_size`, so each field read below is in bounds.
        let vm_state_size = if extra_size >= EXTRA_END_VM_STATE {
            be64_at(extra, 0)
        } else {
            vm_state_size_32.into()
        };
        let disk_size = (extra_size >= EXTRA_END_DISK_SIZE).then(|| be64_at(extra, 8));
        let icount = (extra_size >= EXTRA_END_ICOUNT).then(|| be64_at(extra, 16) as i64);
        // Known-field bytes of a partial icount (17..23 bytes of extra) are dropped, as QEMU
        // does; only bytes past the 24 known ones are "unknown".
        let unknown_extra = extra
            .get(SNAPSHOT_KNOWN_EXTRA_SIZE..)
            .unwrap_or_default()
            .to_vec();

        let id = decode_string(r.bytes(id_len)?, "snapshot id")?;
        let name = decode_string(r.bytes(name_len)?, "snapshot name")?;

        Ok(SnapshotEntry {
            l1_table_offset,
            l1_size,
            id,
            name,
            date_sec,
            date_nsec,
            vm_clock_nsec,
            vm_state_size,
            disk_size,
            icount,
            unknown_extra,
        })
    }

    fn encode(&self, w: &mut Writer) -> Result<()> {
        let id_len = encodable_len(&self.id, "snapshot id length")?;
        let name_len = encodable_len(&self.name, "snapshot name length")?;
        let disk_size = self.disk_size.ok_or(Error::InvalidField {
            what: "snapshot disk size",
            value: 0,
            detail: "unknown; call SnapshotTable::resolve_defaults before encoding",
        })?;
        let extra_size = self
            .unknown_extra
            .len()
            .checked_add(SNAPSHOT_KNOWN_EXTRA_SIZE)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| Error::overflow("snapshot extra data size"))?;

        w.u64(self.l1_table_offset);
        w.u32(self.l1_size);
        w.u16(id_len);
        w.u16(name_len);
        w.u32(self.date_sec);
        w.u32(self.date_nsec);
        w.u64(self.vm_clock_nsec);
        // A truncated size would make older readers restore a partial VM state; 0 makes them
        // treat the snapshot as disk-only instead (QEMU's reasoning).
        w.u32(u32::try_from(self.vm_state_size).unwrap_or(0));
        w.u32(extra_size);
        w.u64(self.vm_state_size);
        w.u64(disk_size);
        w.u64(self.icount.unwrap_or(ICOUNT_NOT_RECORDED) as u64);
        w.bytes(&self.unknown_extra);
        w.bytes(self.id.as_bytes());
        w.bytes(self.name.as_bytes());
        Ok(())
    }
}

impl SnapshotTable {
    /// Decodes `nb_snapshots` entries from the start of `bytes` (the table as it sits at
    /// `snapshots_offset`). Returns the table and the number of bytes it occupies, which is
    /// QEMU's `snapshots_size` (no padding after the last entry).
    ///
    /// Short extra data is accepted for both versions, as QEMU's open does; `version` is
    /// validated so that [`SnapshotEntry::is_incomplete`] can be asked meaningfully later.
    /// Alignment padding between entries is skipped without checking its contents, like QEMU.
    pub fn decode(
        bytes: &[u8],
        nb_snapshots: u32,
        version: u32,
        limits: &Limits,
    ) -> Result<(SnapshotTable, usize)> {
        check_version(version)?;
        if nb_snapshots > limits.max_snapshots {
            return Err(Error::limit(
                "snapshot count",
                nb_snapshots.into(),
                limits.max_snapshots.into(),
            ));
        }
        // Every entry needs at least a fixed header, so the input bounds the real count even
        // when the header's count is a large lie.
        let count = usize::try_from(nb_snapshots).unwrap_or(usize::MAX);
        let mut entries = Vec::with_capacity(count.min(bytes.len() / SNAPSHOT_HEADER_SIZE));
        let mut r = Reader::new(bytes, "snapshot table");
        for _ in 0..count {
            r.align_to(8)?;
            entries.push(SnapshotEntry::decode(&mut r, limits)?);
        }
        Ok((SnapshotTable { entries }, r.pos()))
    }

    /// Encodes the table exactly as QEMU's `qcow2_write_snapshots` does: every entry gets
    /// `extra_data_size = 24 + unknown_extra.len()` with all three known fields, entries are
    /// 8-byte aligned with zero padding, and there is no padding after the last entry.
    ///
    /// Fails if an entry cannot be represented: an id or name longer than 65535 bytes or
    /// containing NUL, an unknown `disk_size` (QEMU always has one; see
    /// [`Self::resolve_defaults`]), or extra data whose size overflows 32 bits. An absent
    /// `icount` is written as −1, QEMU's default. `version` must be 2 or 3; the layout is the
    /// same for both because QEMU writes v3-compliant entries either way.
    pub fn encode(&self, version: u32) -> Result<Vec<u8>> {
        check_version(version)?;
        let len = usize::try_from(self.encoded_len())
            .map_err(|_| Error::overflow("snapshot table size"))?;
        let mut w = Writer::with_capacity(len);
        for entry in &self.entries {
            w.pad_to(8);
            entry.encode(&mut w)?;
        }
        Ok(w.into_inner())
    }

    /// Size of [`Self::encode`]'s output: QEMU's `snapshots_size` for this table.
    pub fn encoded_len(&self) -> u64 {
        self.entries.iter().fold(0u64, |off, e| {
            (off.saturating_add(7) & !7).saturating_add(e.encoded_len())
        })
    }

    /// Fills in what QEMU assumes for fields an entry's short extra data lacked: the current
    /// virtual disk size and an unrecorded icount (−1). QEMU does this while reading, so its
    /// next rewrite stores these values; call this before [`Self::encode`] to match.
    pub fn resolve_defaults(&mut self, current_disk_size: u64) {
        for e in &mut self.entries {
            e.disk_size.get_or_insert(current_disk_size);
            e.icount.get_or_insert(ICOUNT_NOT_RECORDED);
        }
    }

    /// Indices of entries a version-`version` image considers incomplete (see
    /// [`SnapshotEntry::is_incomplete`]).
    pub fn incomplete_entries(&self, version: u32) -> Vec<usize> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.is_incomplete(version))
            .map(|(i, _)| i)
            .collect()
    }

    /// The ID QEMU gives the next snapshot: one more than the largest ID read as a number.
    ///
    /// Mirrors `find_new_snapshot_id`, including its use of C `strtoul` on a 64-bit host, so
    /// non-numeric IDs count as 0, "12abc" counts as 12, and an overflowing ID saturates
    /// (making the next ID wrap to "0", as in QEMU).
    pub fn next_id(&self) -> String {
        let max = self
            .entries
            .iter()
            .map(|e| strtoul10(&e.id))
            .max()
            .unwrap_or(0);
        max.wrapping_add(1).to_string()
    }
}

/// C `strtoul(s, NULL, 10)` for a 64-bit `unsigned long` (glibc semantics).
fn strtoul10(s: &str) -> u64 {
    let b = s.as_bytes();
    let mut i = 0;
    // C isspace in the "C" locale.
    while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r') {
        i += 1;
    }
    let mut negative = false;
    if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
        negative = b[i] == b'-';
        i += 1;
    }
    let mut value: u64 = 0;
    let mut overflow = false;
    while i < b.len() && b[i].is_ascii_digit() {
        match value
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(b[i] - b'0')))
        {
            Some(v) => value = v,
            None => overflow = true,
        }
        i += 1;
    }
    if overflow {
        u64::MAX
    } else if negative {
        value.wrapping_neg()
    } else {
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Reference §4.1 "Verified raw entry" (qemu-img snapshot -c, 64 KiB clusters).
    fn verified_entry_bytes() -> Vec<u8> {
        let mut b = hex("0000000000060000 00000002 0001 0005 6b065269
             1b88b0d8 0000000000000000 00000000 00000018 0000000000000000 0000000040000000
             0000000000000000");
        b.extend_from_slice(b"1snapA");
        b
    }

    fn verified_entry() -> SnapshotEntry {
        SnapshotEntry {
            l1_table_offset: 0x60000,
            l1_size: 2,
            id: "1".into(),
            name: "snapA".into(),
            date_sec: 0x6b06_5269,
            date_nsec: 0x1b88_b0d8,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(1 << 30),
            icount: Some(0),
            unknown_extra: vec![],
        }
    }

    /// Builds a raw entry with the given extra data so short/long extra cases can be tested.
    fn raw_entry(vm32: u32, extra: &[u8], id: &[u8], name: &[u8]) -> Vec<u8> {
        let mut w = Writer::default();
        w.u64(0x70000);
        w.u32(1);
        w.u16(id.len() as u16);
        w.u16(name.len() as u16);
        w.u32(1);
        w.u32(2);
        w.u64(3);
        w.u32(vm32);
        w.u32(extra.len() as u32);
        w.bytes(extra);
        w.bytes(id);
        w.bytes(name);
        w.into_inner()
    }

    #[test]
    fn verified_raw_entry_decodes_and_reencodes() {
        let bytes = verified_entry_bytes();
        assert_eq!(bytes.len(), 70);
        let (t, used) = SnapshotTable::decode(&bytes, 1, 3, &Limits::QEMU).unwrap();
        assert_eq!(used, 70);
        assert_eq!(t.entries, vec![verified_entry()]);
        assert!(t.incomplete_entries(3).is_empty());
        assert_eq!(t.encode(3).unwrap(), bytes);
        assert_eq!(t.encoded_len(), 70);
        assert_eq!(t.next_id(), "2");
    }

    #[test]
    fn second_entry_starts_aligned() {
        let mut second = verified_entry();
        second.id = "2".into();
        second.name = "snapB".into();
        let t = SnapshotTable {
            entries: vec![verified_entry(), second],
        };
        let bytes = t.encode(3).unwrap();
        assert_eq!(bytes.len(), 72 + 70);
        assert_eq!(&bytes[70..72], &[0, 0]);
        assert_eq!(&bytes[72..142][..8], &0x60000u64.to_be_bytes());
        assert_eq!(t.encoded_len(), 142);
        // Padding content is not checked on read, like QEMU.
        let mut dirty = bytes.clone();
        dirty[70] = 0xff;
        let (back, used) = SnapshotTable::decode(&dirty, 2, 3, &Limits::QEMU).unwrap();
        assert_eq!(used, 142);
        assert_eq!(back, t);
        assert_eq!(back.next_id(), "3");
    }

    #[test]
    fn short_extra_data_uses_defaults() {
        // No extra data: 32-bit VM state size, disk size and icount unknown.
        let b = raw_entry(0x1234, &[], b"1", b"a");
        let (t, used) = SnapshotTable::decode(&b, 1, 3, &Limits::QEMU).unwrap();
        assert_eq!(used, b.len());
        let e = &t.entries[0];
        assert_eq!(
            (e.vm_state_size, e.disk_size, e.icount),
            (0x1234, None, None)
        );
        assert_eq!(t.incomplete_entries(3), vec![0]);
        assert!(t.incomplete_entries(2).is_empty());
        assert!(matches!(
            t.encode(3),
            Err(Error::InvalidField {
                what: "snapshot disk size",
                ..
            })
        ));

        // 8 bytes: the large field overrides the 32-bit one.
        let b = raw_entry(0x1234, &(5u64 << 32).to_be_bytes(), b"1", b"a");
        let (t, _) = SnapshotTable::decode(&b, 1, 2, &Limits::QEMU).unwrap();
        assert_eq!(t.entries[0].vm_state_size, 5 << 32);
        assert_eq!(t.entries[0].disk_size, None);

        // 20 bytes: disk size present, the partial icount is ignored.
        let mut extra = vec![0u8; 20];
        extra[8..16].copy_from_slice(&4096u64.to_be_bytes());
        extra[16..20].copy_from_slice(&[0xaa; 4]);
        let b = raw_entry(0, &extra, b"1", b"a");
        let (mut t, _) = SnapshotTable::decode(&b, 1, 3, &Limits::QEMU).unwrap();
        let e = &t.entries[0];
        assert_eq!((e.disk_size, e.icount), (Some(4096), None));
        assert!(e.unknown_extra.is_empty());

        // Rewriting completes the entry as QEMU would.
        t.resolve_defaults(1 << 20);
        assert_eq!(t.entries[0].icount, Some(-1));
        let out = t.encode(3).unwrap();
        assert_eq!(&out[36..40], &24u32.to_be_bytes());
        assert_eq!(&out[48..56], &4096u64.to_be_bytes());
        assert_eq!(&out[56..64], &u64::MAX.to_be_bytes());
    }

    #[test]
    fn unknown_extra_is_preserved() {
        let mut extra = vec![0u8; 40];
        extra[8..16].copy_from_slice(&7u64.to_be_bytes());
        extra[16..24].copy_from_slice(&u64::MAX.to_be_bytes());
        extra[24..].copy_from_slice(&[0x5a; 16]);
        let b = raw_entry(0, &extra, b"10", b"x");
        let (t, used) = SnapshotTable::decode(&b, 1, 3, &Limits::QEMU).unwrap();
        assert_eq!(used, b.len());
        assert_eq!(t.entries[0].unknown_extra, vec![0x5a; 16]);
        assert_eq!(t.entries[0].icount, Some(-1));
        assert_eq!(t.encode(3).unwrap(), b);
    }

    #[test]
    fn big_vm_state_writes_zero_legacy_field() {
        let mut e = verified_entry();
        e.vm_state_size = 1 << 32;
        let t = SnapshotTable { entries: vec![e] };
        let out = t.encode(2).unwrap();
        assert_eq!(&out[32..36], &[0; 4]);
        assert_eq!(&out[40..48], &(1u64 << 32).to_be_bytes());
        let (back, _) = SnapshotTable::decode(&out, 1, 2, &Limits::QEMU).unwrap();
        assert_eq!(back, t);
    }

    #[test]
    fn limits_are_enforced_before_allocating() {
        assert_eq!(
            SnapshotTable::decode(&[], 65537, 3, &Limits::QEMU),
            Err(Error::limit("snapshot count", 65537, 65536))
        );
        assert!(SnapshotTable::decode(&[], 0, 3, &Limits::QEMU).is_ok());
        // A huge claimed count with tiny input fails as truncated, not by allocating.
        assert!(matches!(
            SnapshotTable::decode(&[0; 8], 65536, 3, &Limits::QEMU),
            Err(Error::Truncated { .. })
        ));

        let b = raw_entry(0, &[0; 1025], b"1", b"a");
        assert_eq!(
            SnapshotTable::decode(&b, 1, 3, &Limits::QEMU),
            Err(Error::limit("snapshot extra data size", 1025, 1024))
        );
        let b = raw_entry(0, &[0; 1024], b"1", b"a");
        assert!(SnapshotTable::decode(&b, 1, 3, &Limits::QEMU).is_ok());

        let small = Limits {
            max_snapshot_table_bytes: 100,
            ..Limits::QEMU
        };
        let t = SnapshotTable {
            entries: vec![verified_entry(), verified_entry()],
        };
        let bytes = t.encode(3).unwrap();
        assert_eq!(
            SnapshotTable::decode(&bytes, 2, 3, &small),
            Err(Error::limit("snapshot table size", 142, 100))
        );
        // The limit is checked before the variable part is needed: 72 + 40 header bytes
        // suffice to learn the entry would end at 142.
        assert_eq!(
            SnapshotTable::decode(&bytes[..112], 2, 3, &small),
            Err(Error::limit("snapshot table size", 142, 100))
        );
    }

    #[test]
    fn truncation_reports_needed_bytes() {
        let bytes = verified_entry_bytes();
        let err = SnapshotTable::decode(&bytes[..50], 1, 3, &Limits::QEMU).unwrap_err();
        assert!(
            matches!(err, Error::Truncated { needed: 64, .. }),
            "{err:?}"
        );
        let err = SnapshotTable::decode(&bytes[..69], 1, 3, &Limits::QEMU).unwrap_err();
        assert!(
            matches!(err, Error::Truncated { needed: 70, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn bad_strings_and_versions() {
        let b = raw_entry(0, &[0; 24], &[0xff], b"a");
        assert_eq!(
            SnapshotTable::decode(&b, 1, 3, &Limits::QEMU),
            Err(Error::BadString {
                what: "snapshot id"
            })
        );
        // A NUL ends the string, as in QEMU's C-string view; the entry keeps its stored size.
        let b = raw_entry(0, &[0; 24], b"1\0\0", b"a\0b");
        let (t, used) = SnapshotTable::decode(&b, 1, 3, &Limits::QEMU).unwrap();
        assert_eq!(
            (t.entries[0].id.as_str(), t.entries[0].name.as_str()),
            ("1", "a")
        );
        assert_eq!(used, b.len());
        assert!(SnapshotTable::decode(&[], 0, 4, &Limits::QEMU).is_err());
        assert!(SnapshotTable::default().encode(1).is_err());

        let mut e = verified_entry();
        e.name = "x".repeat(65536);
        assert!(matches!(
            SnapshotTable { entries: vec![e] }.encode(3),
            Err(Error::LimitExceeded { .. })
        ));
        let mut e = verified_entry();
        e.id = "a\0".into();
        assert!(SnapshotTable { entries: vec![e] }.encode(3).is_err());
    }

    #[test]
    fn validate_checks_l1() {
        let l = Limits::QEMU;
        let mut e = verified_entry();
        assert!(e.validate(65536, &l).is_ok());
        assert!(matches!(
            e.validate(1 << 20, &l),
            Err(Error::Unaligned { .. })
        ));
        assert!(e.validate(0, &l).is_err());
        assert!(e.validate(3, &l).is_err());
        e.l1_size = 4 * 1024 * 1024;
        assert!(e.validate(65536, &l).is_ok());
        e.l1_size += 1;
        assert!(matches!(
            e.validate(65536, &l),
            Err(Error::LimitExceeded { .. })
        ));
        // 0x2000 entries end exactly at 2^63 - 2^16 + 2^16 = 2^63, one past INT64_MAX.
        e.l1_table_offset = (i64::MAX as u64) & !0xffff;
        e.l1_size = 0x1fff;
        assert!(e.validate(65536, &l).is_ok());
        e.l1_size = 0x2000;
        assert!(matches!(
            e.validate(65536, &l),
            Err(Error::InvalidField { .. })
        ));
        e.l1_table_offset = !0xffff;
        assert!(e.validate(65536, &l).is_err());
    }

    #[test]
    fn next_id_follows_strtoul() {
        let with_ids = |ids: &[&str]| SnapshotTable {
            entries: ids
                .iter()
                .map(|id| SnapshotEntry {
                    id: (*id).into(),
                    ..verified_entry()
                })
                .collect(),
        };
        assert_eq!(SnapshotTable::default().next_id(), "1");
        assert_eq!(with_ids(&["1", "2"]).next_id(), "3");
        assert_eq!(with_ids(&["10", "abc", "3"]).next_id(), "11");
        assert_eq!(with_ids(&[" +7x"]).next_id(), "8");
        assert_eq!(with_ids(&["99999999999999999999999"]).next_id(), "0");
        assert_eq!(with_ids(&["-1"]).next_id(), "0");
        assert_eq!(with_ids(&["-2"]).next_id(), u64::MAX.to_string());
    }

    fn arb_entry() -> impl Strategy<Value = SnapshotEntry> {
        (
            (
                any::<u64>(),
                any::<u32>(),
                "[^\u{0}]{0,12}",
                "[^\u{0}]{0,12}",
            ),
            (any::<u32>(), any::<u32>(), any::<u64>(), any::<u64>()),
            (
                any::<u64>(),
                any::<i64>(),
                proptest::collection::vec(any::<u8>(), 0..64),
            ),
        )
            .prop_map(
                |(
                    (l1_table_offset, l1_size, id, name),
                    (date_sec, date_nsec, vm_clock_nsec, vm_state_size),
                    (disk_size, icount, unknown_extra),
                )| SnapshotEntry {
                    l1_table_offset,
                    l1_size,
                    id,
                    name,
                    date_sec,
                    date_nsec,
                    vm_clock_nsec,
                    vm_state_size,
                    disk_size: Some(disk_size),
                    icount: Some(icount),
                    unknown_extra,
                },
            )
    }

    proptest! {
        #[test]
        fn round_trip(entries in proptest::collection::vec(arb_entry(), 0..6), v in 2u32..=3) {
            let t = SnapshotTable { entries };
            let bytes = t.encode(v).unwrap();
            prop_assert_eq!(bytes.len() as u64, t.encoded_len());
            let (back, used) =
                SnapshotTable::decode(&bytes, t.entries.len() as u32, v, &Limits::QEMU).unwrap();
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(&back, &t);
            prop_assert_eq!(back.encode(v).unwrap(), bytes);
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..400),
            nb in 0u32..8,
            v in 0u32..5,
        ) {
            if let Ok((t, used)) = SnapshotTable::decode(&bytes, nb, v, &Limits::QEMU) {
                prop_assert!(used <= bytes.len());
                prop_assert_eq!(t.entries.len(), nb as usize);
                let _ = t.next_id();
            }
        }

        #[test]
        fn mutated_tables_never_panic(
            entries in proptest::collection::vec(arb_entry(), 1..4),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let t = SnapshotTable { entries };
            let mut bytes = t.encode(3).unwrap();
            for (i, x) in flips {
                let i = i.index(bytes.len());
                bytes[i] ^= x;
            }
            let end = cut.index(bytes.len() + 1);
            let _ = SnapshotTable::decode(&bytes[..end], t.entries.len() as u32, 3, &Limits::QEMU);
        }
    }
}
