//! L2 table entries, standard (64-bit) and extended (128-bit with subcluster bitmaps).
//!
//! Decoding follows QEMU's `qcow2_get_cluster_type` / `qcow2_get_subcluster_type` in the same
//! order (reference §2.3, §2.4). Encoders refuse states the spec does not allow, so the engine
//! cannot write, say, a zero flag into a v2 image or a standard entry into an extended-L2
//! table.

use crate::compressed::CompressedDescriptor;
use crate::error::{Error, Result};
use crate::geometry::Geometry;
use crate::offset::HostOffset;

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
const ZERO: u64 = 1;

/// How L2 entries of one image are laid out and interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L2Format {
    /// log2 of the cluster size (sets the compressed descriptor's field widths).
    pub cluster_bits: u32,
    /// 128-bit entries with subcluster bitmaps.
    pub extended_l2: bool,
    /// Data lives in an external data file: offset 0 with COPIED is a real mapping.
    pub external_data_file: bool,
    /// The standard zero flag may be used (v3 images).
    pub zero_flag: bool,
}

impl Default for L2Format {
    /// 64 KiB clusters, standard entries, v3, no data file: what `qemu-img create` makes.
    fn default() -> Self {
        L2Format {
            cluster_bits: 16,
            extended_l2: false,
            external_data_file: false,
            zero_flag: true,
        }
    }
}

impl L2Format {
    /// `cluster_size - 1`, refusing cluster sizes QEMU does not support (and shifts that
    /// would overflow): the fields are public, so they are as untrusted as the entries.
    fn cluster_mask(&self) -> Result<u64> {
        Ok(Geometry::new(self.cluster_bits, false)?.cluster_size() - 1)
    }
}

/// What one L2 entry says about a guest cluster (ignoring subclusters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum L2Entry {
    /// No host cluster: read from the backing file, or zeros.
    Unallocated,
    /// Reads as zeros (standard entries only). `host` is a preallocated cluster QEMU keeps
    /// for a later write (ZERO_ALLOC), `None` for ZERO_PLAIN.
    Zero {
        /// Preallocated host cluster, if any.
        host: Option<HostOffset>,
        /// COPIED flag of the preallocated cluster.
        copied: bool,
    },
    /// Data at a host cluster.
    Normal {
        /// Host cluster offset (cluster aligned; 0 only with an external data file).
        host: HostOffset,
        /// The cluster's refcount is exactly 1, so it may be written in place.
        copied: bool,
    },
    /// Compressed data somewhere in the file.
    Compressed(CompressedDescriptor),
}

impl L2Entry {
    /// Decodes the first (or only) 64-bit word of an entry.
    pub fn decode(raw: u64, fmt: L2Format) -> Result<Self> {
        let cluster_mask = fmt.cluster_mask()?;
        if raw & COMPRESSED != 0 {
            if raw & COPIED != 0 {
                return Err(Error::invalid(
                    "L2 entry",
                    raw,
                    "compressed cluster with COPIED flag",
                ));
            }
            if fmt.external_data_file {
                return Err(Error::invalid(
                    "L2 entry",
                    raw,
                    "compressed cluster with an external data file",
                ));
            }
            return CompressedDescriptor::decode(raw & !(COPIED | COMPRESSED), fmt.cluster_bits)
                .map(L2Entry::Compressed);
        }
        // Bit 0 is outside the reserved mask: it is the zero flag, or ignored with extended L2.
        if raw & STD_RESERVED_MASK != 0 {
            return Err(Error::ReservedBits {
                what: "L2 entry",
                value: raw,
            });
        }
        let off = raw & OFFSET_MASK;
        let copied = raw & COPIED != 0;
        if off & cluster_mask != 0 {
            return Err(Error::Unaligned {
                what: "L2 entry host offset",
                offset: off,
                alignment: cluster_mask + 1,
            });
        }
        if raw & ZERO != 0 && !fmt.extended_l2 {
            if !fmt.zero_flag {
                return Err(Error::invalid(
                    "L2 entry",
                    raw,
                    "zero cluster entry in a pre-v3 image",
                ));
            }
            // COPIED describes the preallocated cluster; without one it means nothing (QEMU's
            // check ignores it on ZERO_PLAIN) and `encode` drops it, so drop it here too.
            return Ok(L2Entry::Zero {
                host: (off != 0).then_some(HostOffset(off)),
                copied: copied && off != 0,
            });
        }
        if off == 0 && !(fmt.external_data_file && copied) {
            return Ok(L2Entry::Unallocated);
        }
        Ok(L2Entry::Normal {
            host: HostOffset(off),
            copied,
        })
    }

    /// Encodes the first 64-bit word. Refuses what `fmt` does not allow.
    pub fn encode(&self, fmt: L2Format) -> Result<u64> {
        let cluster_mask = fmt.cluster_mask()?;
        let host_bits = |h: HostOffset, what| {
            if h.0 & !OFFSET_MASK != 0 || h.0 & cluster_mask != 0 {
                Err(Error::Unaligned {
                    what,
                    offset: h.0,
                    alignment: cluster_mask + 1,
                })
            } else {
                Ok(h.0)
            }
        };
        Ok(match *self {
            L2Entry::Unallocated => 0,
            L2Entry::Zero { host, copied } => {
                if fmt.extended_l2 {
                    return Err(Error::invalid(
                        "L2 entry",
                        1,
                        "extended L2 tables express zeros in the subcluster bitmap",
                    ));
                }
                if !fmt.zero_flag {
                    return Err(Error::invalid("L2 entry", 1, "v2 images have no zero flag"));
                }
                let off = match host {
                    Some(h) => host_bits(h, "preallocated zero cluster")?,
                    None => 0,
                };
                off | ZERO | if copied && off != 0 { COPIED } else { 0 }
            }
            L2Entry::Normal { host, copied } => {
                let off = host_bits(host, "data cluster")?;
                if off == 0 && !fmt.external_data_file {
                    return Err(Error::invalid(
                        "L2 entry",
                        0,
                        "a data cluster at host offset 0 (the header)",
                    ));
                }
                if off == 0 && !copied {
                    return Err(Error::invalid(
                        "L2 entry",
                        0,
                        "external data at offset 0 needs COPIED",
                    ));
                }
                off | if copied { COPIED } else { 0 }
            }
            L2Entry::Compressed(d) => {
                if fmt.external_data_file {
                    return Err(Error::invalid(
                        "L2 entry",
                        0,
                        "compressed clusters with an external data file",
                    ));
                }
                d.encode(fmt.cluster_bits) | COMPRESSED
            }
        })
    }

    /// The host cluster this entry occupies, if any (not for compressed entries).
    pub fn host_cluster(&self) -> Option<HostOffset> {
        match *self {
            L2Entry::Normal { host, .. } => Some(host),
            L2Entry::Zero { host, .. } => host,
            _ => None,
        }
    }

    /// Whether this entry's cluster may be written in place (refcount exactly 1).
    pub fn is_copied(&self) -> bool {
        matches!(
            self,
            L2Entry::Normal { copied: true, .. } | L2Entry::Zero { copied: true, .. }
        )
    }
}

/// What one subcluster reads as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SubclusterState {
    /// Data at the host cluster.
    Allocated,
    /// Reads as zeros.
    Zero,
    /// Falls through to the backing file (or zeros).
    Unallocated,
}

/// The second word of an extended L2 entry: bits 0..32 allocated, bits 32..64 zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SubclusterBitmap(pub u64);

impl SubclusterBitmap {
    /// Bitmap with the allocation bits of `alloc` and zero bits of `zero` (32-bit masks).
    pub fn new(alloc: u32, zero: u32) -> Self {
        SubclusterBitmap(u64::from(alloc) | (u64::from(zero) << 32))
    }
    /// Allocation mask.
    pub fn alloc(&self) -> u32 {
        self.0 as u32
    }
    /// Zero mask.
    pub fn zero(&self) -> u32 {
        (self.0 >> 32) as u32
    }
    /// Whether some subcluster is both allocated and zero (invalid).
    pub fn is_conflicting(&self) -> bool {
        self.alloc() & self.zero() != 0
    }
    /// State of subcluster `i` (0..32).
    pub fn state(&self, i: u32) -> SubclusterState {
        let bit = 1u32 << (i & 31);
        if self.zero() & bit != 0 {
            SubclusterState::Zero
        } else if self.alloc() & bit != 0 {
            SubclusterState::Allocated
        } else {
            SubclusterState::Unallocated
        }
    }
    /// Mask of subclusters `first..first+count` (clamped to 32).
    pub fn range_mask(first: u32, count: u32) -> u32 {
        let end = (first + count).min(32);
        if first >= 32 || end <= first {
            return 0;
        }
        let hi = if end == 32 {
            u32::MAX
        } else {
            (1u32 << end) - 1
        };
        hi & !((1u32 << first) - 1)
    }
    /// Marks `mask` allocated (clearing their zero bits).
    pub fn set_allocated(&mut self, mask: u32) {
        *self = SubclusterBitmap::new(self.alloc() | mask, self.zero() & !mask);
    }
    /// Marks `mask` as reading zeros (clearing their allocation bits).
    pub fn set_zero(&mut self, mask: u32) {
        *self = SubclusterBitmap::new(self.alloc() & !mask, self.zero() | mask);
    }
    /// Marks `mask` unallocated (neither bit).
    pub fn set_unallocated(&mut self, mask: u32) {
        *self = SubclusterBitmap::new(self.alloc() & !mask, self.zero() & !mask);
    }
}

/// Decodes a 128-bit extended entry, validating the bitmap as QEMU does.
pub fn decode_extended(
    raw: u64,
    bitmap: u64,
    fmt: L2Format,
) -> Result<(L2Entry, SubclusterBitmap)> {
    debug_assert!(fmt.extended_l2);
    // Bit 0 of a standard descriptor is ignored with extended L2; of a compressed one it is
    // part of the payload offset.
    let raw = if raw & COMPRESSED == 0 {
        raw & !ZERO
    } else {
        raw
    };
    let entry = L2Entry::decode(raw, fmt)?;
    let bm = SubclusterBitmap(bitmap);
    match entry {
        L2Entry::Compressed(_) if bitmap != 0 => Err(Error::invalid(
            "extended L2 entry",
            bitmap,
            "compressed cluster with non-zero subcluster bitmap",
        )),
        L2Entry::Unallocated if bm.alloc() != 0 => Err(Error::invalid(
            "extended L2 entry",
            bitmap,
            "allocated subclusters without a host cluster",
        )),
        L2Entry::Normal { .. } if bm.is_conflicting() => Err(Error::invalid(
            "extended L2 entry",
            bitmap,
            "subclusters both allocated and zero",
        )),
        _ => Ok((entry, bm)),
    }
}

/// Encodes a 128-bit extended entry; refuses combinations QEMU treats as corruption.
pub fn encode_extended(
    entry: &L2Entry,
    bitmap: SubclusterBitmap,
    fmt: L2Format,
) -> Result<(u64, u64)> {
    if !fmt.extended_l2 {
        return Err(Error::invalid("L2 entry", 0, "not an extended-L2 image"));
    }
    let check = match entry {
        L2Entry::Compressed(_) => bitmap.0 == 0,
        L2Entry::Unallocated => bitmap.alloc() == 0,
        L2Entry::Normal { .. } => !bitmap.is_conflicting(),
        L2Entry::Zero { .. } => false,
    };
    if !check {
        return Err(Error::invalid(
            "extended L2 entry",
            bitmap.0,
            "subcluster bitmap does not fit the cluster type",
        ));
    }
    Ok((entry.encode(fmt)?, bitmap.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const STD: L2Format = L2Format {
        cluster_bits: 16,
        extended_l2: false,
        external_data_file: false,
        zero_flag: true,
    };
    const EXT: L2Format = L2Format {
        extended_l2: true,
        ..STD
    };

    #[test]
    fn decodes_what_qemu_writes() {
        // Reference §2.5.
        assert_eq!(
            L2Entry::decode(0x8000_0000_0005_0000, STD).unwrap(),
            L2Entry::Normal {
                host: HostOffset(0x50000),
                copied: true
            }
        );
        assert_eq!(
            L2Entry::decode(1, STD).unwrap(),
            L2Entry::Zero {
                host: None,
                copied: false
            }
        );
        assert_eq!(
            L2Entry::decode(0x8000_0000_0005_0001, STD).unwrap(),
            L2Entry::Zero {
                host: Some(HostOffset(0x50000)),
                copied: true
            }
        );
        assert_eq!(L2Entry::decode(0, STD).unwrap(), L2Entry::Unallocated);
        assert!(matches!(
            L2Entry::decode(0x4340_0000_0005_0000, STD).unwrap(),
            L2Entry::Compressed(_)
        ));
    }

    #[test]
    fn copied_without_a_preallocated_cluster_is_dropped() {
        // Fuzz regression (target `l2_table`): 0x8000000000000001 decoded as a plain zero
        // cluster with COPIED, which re-encoded as 0x1 and claimed `is_copied()`.
        let e = L2Entry::decode(0x8000_0000_0000_0001, STD).unwrap();
        assert_eq!(
            e,
            L2Entry::Zero {
                host: None,
                copied: false
            }
        );
        assert!(!e.is_copied());
        assert_eq!(L2Entry::decode(e.encode(STD).unwrap(), STD).unwrap(), e);
    }

    #[test]
    fn zero_flag_in_v2_is_corruption() {
        let v2 = L2Format {
            zero_flag: false,
            ..STD
        };
        assert!(L2Entry::decode(1, v2).is_err());
        assert!(L2Entry::Zero {
            host: None,
            copied: false
        }
        .encode(v2)
        .is_err());
    }

    #[test]
    fn external_data_file_maps_offset_zero_with_copied() {
        let ext = L2Format {
            external_data_file: true,
            ..STD
        };
        assert_eq!(
            L2Entry::decode(0x8000_0000_0000_0000, ext).unwrap(),
            L2Entry::Normal {
                host: HostOffset(0),
                copied: true
            }
        );
        assert_eq!(
            L2Entry::decode(0x8000_0000_0000_0000, STD).unwrap(),
            L2Entry::Unallocated
        );
    }

    #[test]
    fn extended_entries_follow_qemu_experiments() {
        // Reference §2.4 table.
        let (e, bm) = decode_extended(0x8000_0000_0005_0000, 0x3, EXT).unwrap();
        assert_eq!(
            e,
            L2Entry::Normal {
                host: HostOffset(0x50000),
                copied: true
            }
        );
        assert_eq!(bm.state(0), SubclusterState::Allocated);
        assert_eq!(bm.state(2), SubclusterState::Unallocated);
        let (_, bm) = decode_extended(0x8000_0000_0005_0000, 0x0000_0010_0000_0003, EXT).unwrap();
        assert_eq!(bm.state(4), SubclusterState::Zero);
        let (e, bm) = decode_extended(0, 0xffff_ffff_0000_0000, EXT).unwrap();
        assert_eq!(e, L2Entry::Unallocated);
        assert_eq!(bm.state(31), SubclusterState::Zero);
        // Descriptor bit 0 is ignored with extended L2.
        assert!(decode_extended(1, 0, EXT).is_ok());
        // Invalid combinations.
        assert!(decode_extended(0, 1, EXT).is_err());
        assert!(decode_extended(0x8000_0000_0005_0000, 0x1_0000_0001, EXT).is_err());
        assert!(decode_extended(0x4340_0000_0005_0000, 1, EXT).is_err());
    }

    #[test]
    fn encoders_refuse_illegal_states() {
        assert!(L2Entry::Normal {
            host: HostOffset(0x50200),
            copied: true
        }
        .encode(STD)
        .is_err());
        assert!(L2Entry::Normal {
            host: HostOffset(0),
            copied: true
        }
        .encode(STD)
        .is_err());
        assert!(L2Entry::Zero {
            host: None,
            copied: false
        }
        .encode(EXT)
        .is_err());
        assert!(encode_extended(&L2Entry::Unallocated, SubclusterBitmap::new(1, 0), EXT).is_err());
        assert!(encode_extended(&L2Entry::Unallocated, SubclusterBitmap(0), STD).is_err());
    }

    #[test]
    fn unsupported_cluster_sizes_are_errors_not_panics() {
        // Fuzz regression (target `l2_table`, input d4 00 + eight zero bytes: cluster_bits 84,
        // raw 0): `1 << cluster_bits` overflowed for 64 and more.
        for bits in [0, 8, 22, 63, 64, 65, 84, 127, u32::MAX] {
            let fmt = L2Format {
                cluster_bits: bits,
                ..STD
            };
            for raw in [0, 1, 0x8000_0000_0005_0000, 0x4340_0000_0005_0000] {
                assert!(
                    L2Entry::decode(raw, fmt).is_err(),
                    "bits {bits} raw {raw:#x}"
                );
            }
            assert!(L2Entry::Unallocated.encode(fmt).is_err());
            let ext = L2Format {
                extended_l2: true,
                ..fmt
            };
            assert!(decode_extended(0, 0, ext).is_err());
        }
    }

    #[test]
    fn range_masks() {
        assert_eq!(SubclusterBitmap::range_mask(0, 32), u32::MAX);
        assert_eq!(SubclusterBitmap::range_mask(0, 2), 3);
        assert_eq!(SubclusterBitmap::range_mask(30, 5), 0xc000_0000);
        assert_eq!(SubclusterBitmap::range_mask(32, 1), 0);
    }

    fn arb_entry() -> impl Strategy<Value = L2Entry> {
        prop_oneof![
            Just(L2Entry::Unallocated),
            (0u64..1 << 20, any::<bool>()).prop_map(|(c, copied)| L2Entry::Zero {
                host: (c != 0).then_some(HostOffset(c << 16)),
                copied: copied && c != 0,
            }),
            (1u64..1 << 30, any::<bool>()).prop_map(|(c, copied)| L2Entry::Normal {
                host: HostOffset(c << 16),
                copied
            }),
            (0u64..1 << 40, 1u64..65536).prop_map(|(o, l)| L2Entry::Compressed(
                CompressedDescriptor::new(o, l, 16).unwrap()
            )),
        ]
    }

    proptest! {
        #[test]
        fn standard_round_trip(e in arb_entry()) {
            let raw = e.encode(STD).unwrap();
            prop_assert_eq!(L2Entry::decode(raw, STD).unwrap(), e);
        }

        #[test]
        fn extended_round_trip(e in arb_entry(), alloc: u32, zero: u32) {
            let (e, bm) = match e {
                L2Entry::Zero { .. } => (L2Entry::Unallocated, SubclusterBitmap::new(0, zero)),
                L2Entry::Unallocated => (e, SubclusterBitmap::new(0, zero)),
                L2Entry::Compressed(_) => (e, SubclusterBitmap(0)),
                L2Entry::Normal { .. } => (e, SubclusterBitmap::new(alloc, zero & !alloc)),
            };
            let (a, b) = encode_extended(&e, bm, EXT).unwrap();
            prop_assert_eq!(decode_extended(a, b, EXT).unwrap(), (e, bm));
        }

        #[test]
        fn decode_never_panics(raw: u64, bm: u64, bits in 9u32..=21, ext: bool, data: bool, zf: bool) {
            let fmt = L2Format { cluster_bits: bits, extended_l2: ext, external_data_file: data, zero_flag: zf };
            let _ = L2Entry::decode(raw, fmt);
            if ext { let _ = decode_extended(raw, bm, fmt); }
        }
    }
}
