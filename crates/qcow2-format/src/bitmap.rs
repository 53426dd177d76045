//! Persistent dirty bitmaps: directory, bitmap tables and bitmap data (reference §5).
//!
//! Decoding here is format-level and lossless (any flags, extra data, type are kept), so that
//! a directory can be inspected or rewritten. Whether QEMU would open an image with a given
//! entry is a separate question answered by [`BitmapDirectoryEntry::validate_qemu`]: QEMU is
//! stricter than the spec (flag bit 2 and any extra data are refused) and a single failing
//! entry makes the whole image unopenable.

use crate::codec::{be64_at, Reader, Writer};
use crate::error::{Error, Result};
use crate::limits::Limits;

/// Size of the fixed part of a directory entry, before extra data and name.
pub const BITMAP_DIR_ENTRY_HEADER_SIZE: usize = 24;

/// The only bitmap type defined: dirty tracking.
pub const BITMAP_TYPE_DIRTY_TRACKING: u8 = 1;

/// Smallest granularity QEMU accepts (512 bytes).
pub const QEMU_MIN_GRANULARITY_BITS: u8 = 9;
/// Largest granularity QEMU accepts (2 GiB).
pub const QEMU_MAX_GRANULARITY_BITS: u8 = 31;
/// Largest bitmap data QEMU accepts (`BME_MAX_PHYS_SIZE`), bounding its in-RAM bitmap.
pub const QEMU_MAX_BITMAP_PHYS_SIZE: u64 = 512 * 1024 * 1024;

/// Directory entry flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct BitmapFlags(pub u32);

impl BitmapFlags {
    /// The bitmap may be inconsistent (a writer had it loaded and did not store it).
    pub const IN_USE: BitmapFlags = BitmapFlags(1);
    /// The bitmap tracks writes (is enabled) whenever the image is opened.
    pub const AUTO: BitmapFlags = BitmapFlags(2);
    /// Readers that do not understand the extra data may still use the bitmap.
    pub const EXTRA_DATA_COMPATIBLE: BitmapFlags = BitmapFlags(4);
    /// Bits the spec reserves.
    pub const SPEC_RESERVED: u32 = 0xffff_fff8;
    /// Bits QEMU refuses (`BME_RESERVED_FLAGS`): the spec's reserved bits plus bit 2.
    pub const QEMU_RESERVED: u32 = 0xffff_fffc;

    /// The raw flag word.
    pub fn bits(self) -> u32 {
        self.0
    }

    /// True if every bit of `other` is set.
    pub fn contains(self, other: BitmapFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// True if [`Self::IN_USE`] is set.
    pub fn in_use(self) -> bool {
        self.contains(Self::IN_USE)
    }

    /// True if [`Self::AUTO`] is set.
    pub fn auto(self) -> bool {
        self.contains(Self::AUTO)
    }

    /// True if [`Self::EXTRA_DATA_COMPATIBLE`] is set.
    pub fn extra_data_compatible(self) -> bool {
        self.contains(Self::EXTRA_DATA_COMPATIBLE)
    }

    /// These flags with `other`'s bits set (`on`) or cleared.
    #[must_use]
    pub fn with(self, other: BitmapFlags, on: bool) -> BitmapFlags {
        if on {
            BitmapFlags(self.0 | other.0)
        } else {
            BitmapFlags(self.0 & !other.0)
        }
    }
}

impl std::ops::BitOr for BitmapFlags {
    type Output = BitmapFlags;
    fn bitor(self, rhs: BitmapFlags) -> BitmapFlags {
        BitmapFlags(self.0 | rhs.0)
    }
}

/// One bitmap directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapDirectoryEntry {
    /// Host offset of the bitmap table (cluster aligned, non-zero).
    pub bitmap_table_offset: u64,
    /// Number of entries in the bitmap table.
    pub bitmap_table_size: u32,
    /// Flags, kept raw so that unknown bits survive a rewrite.
    pub flags: BitmapFlags,
    /// Bitmap type; only [`BITMAP_TYPE_DIRTY_TRACKING`] is defined.
    pub bitmap_type: u8,
    /// log2 of the number of guest bytes one bit covers.
    pub granularity_bits: u8,
    /// Bitmap name (unique per image).
    pub name: String,
    /// Extra data, kept opaque; QEMU refuses entries that have any.
    pub extra_data: Vec<u8>,
}

/// The bitmap directory, in on-disk order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BitmapDirectory {
    /// Entries in directory order.
    pub entries: Vec<BitmapDirectoryEntry>,
}

fn cluster_size_ok(cluster_size: u64) -> Result<()> {
    if cluster_size == 0 || !cluster_size.is_power_of_two() {
        return Err(Error::invalid(
            "cluster size",
            cluster_size,
            "must be a power of two",
        ));
    }
    Ok(())
}

impl BitmapDirectoryEntry {
    /// Bytes this entry occupies in the directory, including its padding to 8.
    pub fn encoded_len(&self) -> u64 {
        let raw = (BITMAP_DIR_ENTRY_HEADER_SIZE as u64)
            .saturating_add(self.extra_data.len() as u64)
            .saturating_add(self.name.len() as u64);
        raw.saturating_add(7) & !7
    }

    /// Checks the constraints QEMU's `check_dir_entry` (and the directory loader) impose, in
    /// QEMU's order, for an image with the given cluster size and virtual size.
    ///
    /// QEMU refuses to open the whole image if any entry fails, so the engine should do the
    /// same. The one check QEMU does not make but the spec requires, a non-empty name, is made
    /// here too.
    pub fn validate_qemu(
        &self,
        cluster_size: u64,
        virtual_size: u64,
        limits: &Limits,
    ) -> Result<()> {
        cluster_size_ok(cluster_size)?;
        if !self.extra_data.is_empty() {
            return Err(Error::Unsupported {
                what: "bitmap extra data",
                detail: format!("bitmap {:?} has {} bytes", self.name, self.extra_data.len()),
            });
        }
        if self.bitmap_table_size == 0 {
            return Err(Error::invalid("bitmap table size", 0, "must be non-zero"));
        }
        if self.bitmap_table_offset == 0 {
            return Err(Error::invalid("bitmap table offset", 0, "must be non-zero"));
        }
        if self.bitmap_table_offset % cluster_size != 0 {
            return Err(Error::Unaligned {
                what: "bitmap table",
                offset: self.bitmap_table_offset,
                alignment: cluster_size,
            });
        }
        if self.bitmap_table_size > limits.max_bitmap_table_entries {
            return Err(Error::limit(
                "bitmap table size",
                self.bitmap_table_size.into(),
                limits.max_bitmap_table_entries.into(),
            ));
        }
        if !(QEMU_MIN_GRANULARITY_BITS..=QEMU_MAX_GRANULARITY_BITS).contains(&self.granularity_bits)
        {
            return Err(Error::invalid(
                "bitmap granularity bits",
                self.granularity_bits.into(),
                "QEMU requires 9..=31",
            ));
        }
        if self.flags.0 & BitmapFlags::QEMU_RESERVED != 0 {
            return Err(Error::ReservedBits {
                what: "bitmap flags",
                value: self.flags.0.into(),
            });
        }
        if self.name.len() > usize::from(limits.max_bitmap_name) {
            return Err(Error::limit(
                "bitmap name size",
                self.name.len() as u64,
                limits.max_bitmap_name.into(),
            ));
        }
        if self.name.is_empty() {
            return Err(Error::invalid("bitmap name size", 0, "must be non-zero"));
        }
        if self.bitmap_type != BITMAP_TYPE_DIRTY_TRACKING {
            return Err(Error::invalid(
                "bitmap type",
                self.bitmap_type.into(),
                "only 1 (dirty tracking) is defined",
            ));
        }
        let phys = u64::from(self.bitmap_table_size)
            .checked_mul(cluster_size)
            .ok_or_else(|| Error::overflow("bitmap data size"))?;
        if phys > QEMU_MAX_BITMAP_PHYS_SIZE {
            return Err(Error::limit(
                "bitmap data size",
                phys,
                QEMU_MAX_BITMAP_PHYS_SIZE,
            ));
        }
        // An in-use bitmap may legitimately be too small: it was not stored after a resize
        // and will be discarded anyway.
        if !self.flags.in_use() {
            // Bounded by the checks above (phys <= 2^29, granularity <= 31), and u128 makes
            // that bound irrelevant for correctness.
            let covered = (u128::from(phys) * 8) << self.granularity_bits;
            if u128::from(virtual_size) > covered {
                return Err(Error::invalid(
                    "bitmap table size",
                    self.bitmap_table_size.into(),
                    "too small for the virtual disk size",
                ));
            }
        }
        Ok(())
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        let bitmap_table_offset = r.u64()?;
        let bitmap_table_size = r.u32()?;
        let flags = BitmapFlags(r.u32()?);
        let bitmap_type = r.u8()?;
        let granularity_bits = r.u8()?;
        let name_size = usize::from(r.u16()?);
        let extra_size =
            usize::try_from(r.u32()?).map_err(|_| Error::overflow("bitmap extra data size"))?;
        // Copies below come out of the caller's buffer, whose size the directory limit bounds.
        let extra_data = r.bytes(extra_size)?.to_vec();
        let name_bytes = r.bytes(name_size)?;
        // QEMU's names are C strings; an embedded NUL would make its view differ from the
        // stored size, so refuse it rather than decode something QEMU sees differently.
        if name_bytes.contains(&0) {
            return Err(Error::BadString {
                what: "bitmap name",
            });
        }
        let name = String::from_utf8(name_bytes.to_vec()).map_err(|_| Error::BadString {
            what: "bitmap name",
        })?;
        // Padding must be inside the directory (QEMU: "broken directory" otherwise); its
        // content is not checked, like QEMU.
        r.align_to(8)?;
        Ok(BitmapDirectoryEntry {
            bitmap_table_offset,
            bitmap_table_size,
            flags,
            bitmap_type,
            granularity_bits,
            name,
            extra_data,
        })
    }

    fn encode(&self, w: &mut Writer) -> Result<()> {
        if self.name.as_bytes().contains(&0) {
            return Err(Error::BadString {
                what: "bitmap name",
            });
        }
        let name_size = u16::try_from(self.name.len()).map_err(|_| {
            Error::limit("bitmap name size", self.name.len() as u64, u16::MAX.into())
        })?;
        let extra_size = u32::try_from(self.extra_data.len())
            .map_err(|_| Error::overflow("bitmap extra data size"))?;
        w.u64(self.bitmap_table_offset);
        w.u32(self.bitmap_table_size);
        w.u32(self.flags.0);
        w.u8(self.bitmap_type);
        w.u8(self.granularity_bits);
        w.u16(name_size);
        w.u32(extra_size);
        w.bytes(&self.extra_data);
        w.bytes(self.name.as_bytes());
        w.pad_to(8);
        Ok(())
    }
}

impl BitmapDirectory {
    /// Decodes a directory of `nb_bitmaps` entries that must exactly fill `bytes` (the
    /// extension's `bitmap_directory_size` bytes at `bitmap_directory_offset`), as QEMU
    /// requires. Fields are not judged here; see [`Self::validate_qemu`].
    pub fn decode(bytes: &[u8], nb_bitmaps: u32, limits: &Limits) -> Result<BitmapDirectory> {
        if nb_bitmaps > limits.max_bitmaps {
            return Err(Error::limit(
                "bitmap count",
                nb_bitmaps.into(),
                limits.max_bitmaps.into(),
            ));
        }
        if bytes.len() as u64 > limits.max_bitmap_directory_bytes {
            return Err(Error::limit(
                "bitmap directory size",
                bytes.len() as u64,
                limits.max_bitmap_directory_bytes,
            ));
        }
        let count = usize::try_from(nb_bitmaps).unwrap_or(usize::MAX);
        let mut entries = Vec::with_capacity(count.min(bytes.len() / BITMAP_DIR_ENTRY_HEADER_SIZE));
        let mut r = Reader::new(bytes, "bitmap directory");
        for _ in 0..count {
            entries.push(BitmapDirectoryEntry::decode(&mut r)?);
        }
        if r.remaining() != 0 {
            return Err(Error::invalid(
                "bitmap directory",
                r.remaining() as u64,
                "bytes left over after the last entry",
            ));
        }
        Ok(BitmapDirectory { entries })
    }

    /// Encodes the directory as QEMU lays it out: entries back to back, each padded with
    /// zeros to a multiple of 8 (so the directory size includes the last entry's padding).
    /// Fails only for names longer than 65535 bytes or containing NUL, or extra data longer
    /// than 4 GiB.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let len = usize::try_from(self.encoded_len())
            .map_err(|_| Error::overflow("bitmap directory size"))?;
        let mut w = Writer::with_capacity(len);
        for e in &self.entries {
            e.encode(&mut w)?;
        }
        Ok(w.into_inner())
    }

    /// Size of [`Self::encode`]'s output (the extension's `bitmap_directory_size`).
    pub fn encoded_len(&self) -> u64 {
        self.entries
            .iter()
            .fold(0u64, |n, e| n.saturating_add(e.encoded_len()))
    }

    /// Runs [`BitmapDirectoryEntry::validate_qemu`] on every entry; the first failure is
    /// returned with the entry's index, because QEMU fails the whole open on it.
    pub fn validate_qemu(
        &self,
        cluster_size: u64,
        virtual_size: u64,
        limits: &Limits,
    ) -> std::result::Result<(), (usize, Error)> {
        for (i, e) in self.entries.iter().enumerate() {
            e.validate_qemu(cluster_size, virtual_size, limits)
                .map_err(|err| (i, err))?;
        }
        Ok(())
    }
}

/// One bitmap table entry: where a cluster's worth of bitmap data lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BitmapTableEntry {
    /// No data cluster; the bits read as all zeros.
    Zeros,
    /// No data cluster; the bits read as all ones. QEMU reads this but never writes it.
    Ones,
    /// Data cluster at this host offset (non-zero, bits 9..=55 only).
    Data(u64),
}

impl BitmapTableEntry {
    /// Bits that must be zero (`BME_TABLE_ENTRY_RESERVED_MASK`).
    pub const RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
    /// Bits holding the data cluster offset.
    pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
    /// With a zero offset: the cluster reads as all ones.
    pub const FLAG_ALL_ONES: u64 = 1;

    /// Decodes a raw (host-endian) entry as QEMU's `check_table_entry` does, except for the
    /// cluster alignment of the offset, which needs the cluster size: see [`Self::validate`].
    pub fn decode(raw: u64) -> Result<Self> {
        if raw & Self::RESERVED_MASK != 0 {
            return Err(Error::ReservedBits {
                what: "bitmap table entry",
                value: raw,
            });
        }
        let offset = raw & Self::OFFSET_MASK;
        let ones = raw & Self::FLAG_ALL_ONES != 0;
        match (offset, ones) {
            (0, false) => Ok(Self::Zeros),
            (0, true) => Ok(Self::Ones),
            // Bit 0 is only meaningful without an offset; with one, QEMU treats it as reserved.
            (_, true) => Err(Error::ReservedBits {
                what: "bitmap table entry",
                value: raw,
            }),
            (off, false) => Ok(Self::Data(off)),
        }
    }

    /// A data entry, checking that `offset` is representable (non-zero, 512-byte aligned,
    /// below 2^56) so that [`Self::encode`] is exact.
    pub fn data(offset: u64) -> Result<Self> {
        if offset == 0 || offset & !Self::OFFSET_MASK != 0 {
            return Err(Error::invalid(
                "bitmap data cluster offset",
                offset,
                "not representable in a bitmap table entry",
            ));
        }
        Ok(Self::Data(offset))
    }

    /// The raw (host-endian) entry. A hand-built `Data` offset outside the offset bits is
    /// masked; [`Self::decode`] and [`Self::data`] never produce one.
    pub fn encode(self) -> u64 {
        match self {
            Self::Zeros => 0,
            Self::Ones => Self::FLAG_ALL_ONES,
            Self::Data(off) => off & Self::OFFSET_MASK,
        }
    }

    /// Checks that a data cluster offset is cluster aligned.
    pub fn validate(&self, cluster_size: u64) -> Result<()> {
        cluster_size_ok(cluster_size)?;
        match *self {
            Self::Data(off) if off % cluster_size != 0 => Err(Error::Unaligned {
                what: "bitmap data cluster",
                offset: off,
                alignment: cluster_size,
            }),
            _ => Ok(()),
        }
    }
}

/// Decodes and checks a bitmap table of `table_size` entries from the start of `bytes`, as
/// QEMU's `bitmap_table_load` does (every entry checked, including alignment).
pub fn decode_bitmap_table(
    bytes: &[u8],
    table_size: u32,
    cluster_size: u64,
    limits: &Limits,
) -> Result<Vec<BitmapTableEntry>> {
    if table_size > limits.max_bitmap_table_entries {
        return Err(Error::limit(
            "bitmap table size",
            table_size.into(),
            limits.max_bitmap_table_entries.into(),
        ));
    }
    let count = usize::try_from(table_size).map_err(|_| Error::overflow("bitmap table"))?;
    let len = count
        .checked_mul(8)
        .ok_or_else(|| Error::overflow("bitmap table"))?;
    let raw = bytes
        .get(..len)
        .ok_or_else(|| Error::truncated("bitmap table", len, bytes.len()))?;
    raw.chunks_exact(8)
        .map(|c| {
            let e = BitmapTableEntry::decode(be64_at(c, 0))?;
            e.validate(cluster_size)?;
            Ok(e)
        })
        .collect()
}

/// Encodes a bitmap table (big-endian entries, no padding).
pub fn encode_bitmap_table(entries: &[BitmapTableEntry]) -> Vec<u8> {
    let mut w = Writer::with_capacity(entries.len().saturating_mul(8));
    for e in entries {
        w.u64(e.encode());
    }
    w.into_inner()
}

/// Number of bits a bitmap over `virtual_size` bytes needs: ceil(size / granularity).
/// Granularities of 2^64 or more (not valid, but representable) need one bit for any
/// non-empty disk.
pub fn bitmap_bits(virtual_size: u64, granularity_bits: u8) -> u64 {
    let g = u32::from(granularity_bits);
    match virtual_size.checked_shr(g) {
        Some(whole) if g < 64 => {
            let rem = virtual_size & ((1u64 << g) - 1);
            whole + u64::from(rem != 0)
        }
        _ => u64::from(virtual_size != 0),
    }
}

/// Bytes of bitmap data for a disk of `virtual_size`: ceil(ceil(size / gran) / 8).
pub fn bitmap_data_size(virtual_size: u64, granularity_bits: u8) -> u64 {
    bitmap_bits(virtual_size, granularity_bits).div_ceil(8)
}

/// Entries the bitmap table needs: ceil(data size / cluster size). A zero cluster size (never
/// valid) is treated as 1 to keep this total; callers validate cluster sizes elsewhere.
pub fn bitmap_table_size(virtual_size: u64, granularity_bits: u8, cluster_size: u64) -> u64 {
    bitmap_data_size(virtual_size, granularity_bits).div_ceil(cluster_size.max(1))
}

/// Reads bit `n` of bitmap data (bit `n % 8`, LSB first, of byte `n / 8`); `None` if the data
/// is too short.
pub fn test_bit(data: &[u8], n: u64) -> Option<bool> {
    let byte = data.get(usize::try_from(n / 8).ok()?)?;
    Some(byte & (1 << (n % 8)) != 0)
}

/// Sets or clears bit `n` of bitmap data (LSB first within each byte). Returns false, changing
/// nothing, if the data is too short.
#[must_use]
pub fn set_bit(data: &mut [u8], n: u64, value: bool) -> bool {
    let Some(byte) = usize::try_from(n / 8).ok().and_then(|i| data.get_mut(i)) else {
        return false;
    };
    let mask = 1u8 << (n % 8);
    if value {
        *byte |= mask;
    } else {
        *byte &= !mask;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GIB: u64 = 1 << 30;

    fn entry() -> BitmapDirectoryEntry {
        BitmapDirectoryEntry {
            bitmap_table_offset: 0x50000,
            bitmap_table_size: 1,
            flags: BitmapFlags::AUTO,
            bitmap_type: 1,
            granularity_bits: 16,
            name: "bm0".into(),
            extra_data: vec![],
        }
    }

    #[test]
    fn directory_layout() {
        let d = BitmapDirectory {
            entries: vec![
                entry(),
                BitmapDirectoryEntry {
                    name: "bitmap-1".into(),
                    flags: BitmapFlags::IN_USE | BitmapFlags::AUTO,
                    ..entry()
                },
            ],
        };
        let b = d.encode().unwrap();
        // 24 + 3 -> 32; 24 + 8 -> 32.
        assert_eq!(b.len(), 64);
        assert_eq!(d.encoded_len(), 64);
        assert_eq!(
            &b[..32],
            &[
                0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2, 1, 16, 0, 3, 0, 0, 0, 0, b'b',
                b'm', b'0', 0, 0, 0, 0, 0
            ]
        );
        assert_eq!(BitmapDirectory::decode(&b, 2, &Limits::QEMU).unwrap(), d);
        assert!(d.entries[1].flags.in_use() && d.entries[1].flags.auto());
        assert!(!d.entries[0].flags.in_use());
    }

    #[test]
    fn directory_must_be_exactly_filled() {
        let d = BitmapDirectory {
            entries: vec![entry()],
        };
        let mut b = d.encode().unwrap();
        // Missing padding of the last entry: broken directory.
        assert!(matches!(
            BitmapDirectory::decode(&b[..27], 1, &Limits::QEMU),
            Err(Error::Truncated { .. })
        ));
        // Fewer entries than claimed.
        assert!(BitmapDirectory::decode(&b, 2, &Limits::QEMU).is_err());
        // More entries than claimed (left-over bytes).
        b.extend_from_slice(&b.clone());
        assert!(matches!(
            BitmapDirectory::decode(&b, 1, &Limits::QEMU),
            Err(Error::InvalidField { .. })
        ));
        assert_eq!(
            BitmapDirectory::decode(&b, 2, &Limits::QEMU)
                .unwrap()
                .entries
                .len(),
            2
        );
        assert_eq!(
            BitmapDirectory::decode(&[], 0, &Limits::QEMU).unwrap(),
            BitmapDirectory::default()
        );
    }

    #[test]
    fn directory_limits() {
        assert_eq!(
            BitmapDirectory::decode(&[], 65536, &Limits::QEMU),
            Err(Error::limit("bitmap count", 65536, 65535))
        );
        let small = Limits {
            max_bitmap_directory_bytes: 16,
            ..Limits::QEMU
        };
        assert!(matches!(
            BitmapDirectory::decode(&[0; 24], 1, &small),
            Err(Error::LimitExceeded { .. })
        ));
        // Huge claimed count with little input: truncated, no big allocation.
        assert!(matches!(
            BitmapDirectory::decode(&[0; 8], 65535, &Limits::QEMU),
            Err(Error::Truncated { .. })
        ));
    }

    #[test]
    fn bad_names() {
        let mut e = entry();
        e.name = "a\0".into();
        assert!(BitmapDirectory { entries: vec![e] }.encode().is_err());
        let mut b = BitmapDirectory {
            entries: vec![entry()],
        }
        .encode()
        .unwrap();
        b[24] = 0xff;
        assert_eq!(
            BitmapDirectory::decode(&b, 1, &Limits::QEMU),
            Err(Error::BadString {
                what: "bitmap name"
            })
        );
        b[24] = 0;
        assert!(BitmapDirectory::decode(&b, 1, &Limits::QEMU).is_err());
    }

    #[test]
    fn qemu_constraints() {
        let l = Limits::QEMU;
        let c = 65536;
        let ok = entry();
        ok.validate_qemu(c, GIB, &l).unwrap();

        let bad = |f: &dyn Fn(&mut BitmapDirectoryEntry)| {
            let mut e = entry();
            f(&mut e);
            e.validate_qemu(c, GIB, &l)
        };
        assert!(matches!(
            bad(&|e| e.extra_data = vec![0; 8]),
            Err(Error::Unsupported { .. })
        ));
        assert!(bad(&|e| e.bitmap_table_size = 0).is_err());
        assert!(bad(&|e| e.bitmap_table_offset = 0).is_err());
        assert!(matches!(
            bad(&|e| e.bitmap_table_offset = 0x50200),
            Err(Error::Unaligned { .. })
        ));
        assert!(matches!(
            bad(&|e| e.bitmap_table_size = 0x0800_0001),
            Err(Error::LimitExceeded { .. })
        ));
        // Reference §5.2 [EXP]: granularity_bits = 8 and flags = 6 are both refused.
        assert!(bad(&|e| e.granularity_bits = 8).is_err());
        assert!(bad(&|e| e.granularity_bits = 32).is_err());
        assert!(bad(&|e| e.granularity_bits = 9).is_err()); // 1 GiB at 512 B needs 32 clusters
        assert!(matches!(
            bad(&|e| e.flags = BitmapFlags(6)),
            Err(Error::ReservedBits { .. })
        ));
        assert!(bad(&|e| e.flags = BitmapFlags(0x8000_0000)).is_err());
        assert!(bad(&|e| e.name = String::new()).is_err());
        assert!(bad(&|e| e.name = "x".repeat(1023)).is_ok());
        assert!(matches!(
            bad(&|e| e.name = "x".repeat(1024)),
            Err(Error::LimitExceeded { .. })
        ));
        assert!(bad(&|e| e.bitmap_type = 2).is_err());
        // 512 MiB of bitmap data is the most QEMU accepts.
        assert!(bad(&|e| e.bitmap_table_size = 8192).is_ok());
        assert!(matches!(
            bad(&|e| e.bitmap_table_size = 8193),
            Err(Error::LimitExceeded { .. })
        ));
        assert!(entry().validate_qemu(0, GIB, &l).is_err());

        // Table too small for the disk, unless in use.
        let mut e = entry();
        e.granularity_bits = 9;
        assert!(e.validate_qemu(c, 256 * 1024 * 1024, &l).is_ok());
        assert!(e.validate_qemu(c, 256 * 1024 * 1024 + 1, &l).is_err());
        e.flags = BitmapFlags::IN_USE;
        assert!(e.validate_qemu(c, 256 * 1024 * 1024 + 1, &l).is_ok());

        let d = BitmapDirectory {
            entries: vec![
                entry(),
                BitmapDirectoryEntry {
                    bitmap_type: 0,
                    ..entry()
                },
            ],
        };
        assert_eq!(d.validate_qemu(c, GIB, &l).unwrap_err().0, 1);
    }

    #[test]
    fn table_entries() {
        use BitmapTableEntry::*;
        assert_eq!(BitmapTableEntry::decode(0), Ok(Zeros));
        assert_eq!(BitmapTableEntry::decode(1), Ok(Ones));
        assert_eq!(BitmapTableEntry::decode(0x60000), Ok(Data(0x60000)));
        for raw in [2, 0x100, 1 << 56, 1 << 63, 0x60001] {
            assert!(
                matches!(
                    BitmapTableEntry::decode(raw),
                    Err(Error::ReservedBits { .. })
                ),
                "{raw:#x}"
            );
        }
        assert_eq!(Data(0x60000).encode(), 0x60000);
        assert_eq!(Ones.encode(), 1);
        assert!(Data(0x60200).validate(65536).is_err());
        assert!(Data(0x60200).validate(512).is_ok());
        assert!(BitmapTableEntry::data(0).is_err());
        assert!(BitmapTableEntry::data(0x100).is_err());
        assert!(BitmapTableEntry::data(1 << 56).is_err());

        let t = vec![Zeros, Data(0x70000), Ones];
        let b = encode_bitmap_table(&t);
        assert_eq!(b.len(), 24);
        assert_eq!(decode_bitmap_table(&b, 3, 65536, &Limits::QEMU).unwrap(), t);
        assert!(decode_bitmap_table(&b, 4, 65536, &Limits::QEMU).is_err());
        assert!(decode_bitmap_table(&b, 3, 1 << 20, &Limits::QEMU).is_err());
        assert!(matches!(
            decode_bitmap_table(&b, 0x0800_0001, 65536, &Limits::QEMU),
            Err(Error::LimitExceeded { .. })
        ));
    }

    #[test]
    fn sizes_and_bits() {
        // Reference §5.3: 1 GiB at 64 KiB granularity = 16384 bits = 2048 bytes, 1 cluster.
        assert_eq!(bitmap_data_size(GIB, 16), 2048);
        assert_eq!(bitmap_table_size(GIB, 16, 65536), 1);
        assert_eq!(bitmap_data_size(GIB + 1, 16), 2049);
        assert_eq!(bitmap_data_size(0, 16), 0);
        assert_eq!(bitmap_data_size(1, 16), 1);
        assert_eq!(bitmap_data_size(u64::MAX, 0), 1 << 61);
        assert_eq!(bitmap_data_size(u64::MAX, 63), 1);
        assert_eq!(bitmap_data_size(u64::MAX, 64), 1);
        assert_eq!(bitmap_data_size(u64::MAX, 255), 1);
        assert_eq!(bitmap_table_size(GIB, 9, 65536), 4);
        assert_eq!(bitmap_table_size(GIB, 9, 0), 262144);

        // Reference §5.3 [EXP]: writes at 0..128 KiB with 64 KiB granularity -> byte 0 = 0x03.
        let mut data = vec![0u8; 2048];
        assert!(set_bit(&mut data, 0, true));
        assert!(set_bit(&mut data, 1, true));
        assert_eq!(data[0], 0x03);
        assert!(set_bit(&mut data, 9, true));
        assert_eq!(data[1], 0x02);
        assert_eq!(test_bit(&data, 9), Some(true));
        assert_eq!(test_bit(&data, 10), Some(false));
        assert!(set_bit(&mut data, 9, false));
        assert_eq!(data[1], 0);
        assert_eq!(test_bit(&data, 2048 * 8), None);
        assert!(!set_bit(&mut data, u64::MAX, true));
    }

    fn arb_entry() -> impl Strategy<Value = BitmapDirectoryEntry> {
        (
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            any::<u8>(),
            any::<u8>(),
            "[^\u{0}]{0,20}",
            proptest::collection::vec(any::<u8>(), 0..40),
        )
            .prop_map(|(o, s, f, t, g, name, extra_data)| BitmapDirectoryEntry {
                bitmap_table_offset: o,
                bitmap_table_size: s,
                flags: BitmapFlags(f),
                bitmap_type: t,
                granularity_bits: g,
                name,
                extra_data,
            })
    }

    fn arb_table_entry() -> impl Strategy<Value = BitmapTableEntry> {
        prop_oneof![
            Just(BitmapTableEntry::Zeros),
            Just(BitmapTableEntry::Ones),
            (1u64..(1 << 47)).prop_map(|c| BitmapTableEntry::Data(c << 9)),
        ]
    }

    proptest! {
        #[test]
        fn directory_round_trip(entries in proptest::collection::vec(arb_entry(), 0..6)) {
            let d = BitmapDirectory { entries };
            let b = d.encode().unwrap();
            prop_assert_eq!(b.len() as u64, d.encoded_len());
            prop_assert_eq!(b.len() % 8, 0);
            let back = BitmapDirectory::decode(&b, d.entries.len() as u32, &Limits::QEMU).unwrap();
            prop_assert_eq!(back, d);
        }

        #[test]
        fn table_round_trip(t in proptest::collection::vec(arb_table_entry(), 0..32)) {
            let b = encode_bitmap_table(&t);
            let back = decode_bitmap_table(&b, t.len() as u32, 512, &Limits::QEMU).unwrap();
            prop_assert_eq!(back, t);
        }

        #[test]
        fn table_entry_raw_round_trip(raw in any::<u64>()) {
            if let Ok(e) = BitmapTableEntry::decode(raw) {
                prop_assert_eq!(e.encode(), raw);
                let _ = e.validate(65536);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
            nb in 0u32..6,
            cluster_bits in 0u32..70,
            size in any::<u64>(),
        ) {
            let cluster = 1u64.checked_shl(cluster_bits).unwrap_or(0);
            if let Ok(d) = BitmapDirectory::decode(&bytes, nb, &Limits::QEMU) {
                prop_assert_eq!(d.entries.len(), nb as usize);
                let _ = d.validate_qemu(cluster, size, &Limits::QEMU);
                prop_assert_eq!(d.encode().unwrap().len(), bytes.len());
            }
            let _ = decode_bitmap_table(&bytes, nb, cluster, &Limits::QEMU);
        }

        #[test]
        fn sizes_are_total(size in any::<u64>(), g in any::<u8>(), cluster in any::<u64>()) {
            let bits = bitmap_bits(size, g);
            if g < 64 {
                // bits * 2^g covers size, and (bits - 1) * 2^g does not.
                prop_assert!(u128::from(bits) << g >= u128::from(size));
                prop_assert!(bits == 0 || (u128::from(bits - 1) << g) < u128::from(size));
            }
            let _ = bitmap_table_size(size, g, cluster);
        }

        #[test]
        fn set_then_test(n in 0u64..4096, len in 0usize..600) {
            let mut data = vec![0u8; len];
            let in_range = set_bit(&mut data, n, true);
            prop_assert_eq!(in_range, n / 8 < len as u64);
            prop_assert_eq!(test_bit(&data, n), in_range.then_some(true));
            prop_assert_eq!(data.iter().map(|b| b.count_ones()).sum::<u32>(), u32::from(in_range));
        }
    }
}
