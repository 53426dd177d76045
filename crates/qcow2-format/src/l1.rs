//! L1 table entries (reference §2.2).

use crate::error::{Error, Result};
use crate::offset::HostOffset;

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
const COPIED: u64 = 1 << 63;

/// One L1 entry: a pointer to an L2 table, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct L1Entry {
    /// The L2 table's host offset, `None` when the range has no L2 table.
    pub l2_offset: Option<HostOffset>,
    /// The L2 table's refcount is exactly 1 (meaningful in the active L1 only).
    pub copied: bool,
}

impl L1Entry {
    /// An entry pointing at `l2` with its COPIED flag.
    pub fn new(l2: HostOffset, copied: bool) -> Self {
        L1Entry {
            l2_offset: Some(l2),
            copied,
        }
    }

    /// Decodes an entry; reserved bits and unaligned offsets are corruption.
    pub fn decode(raw: u64, cluster_bits: u32) -> Result<Self> {
        if raw & RESERVED_MASK != 0 {
            return Err(Error::ReservedBits {
                what: "L1 entry",
                value: raw,
            });
        }
        let off = raw & OFFSET_MASK;
        let cluster_size = 1u64.checked_shl(cluster_bits).unwrap_or(0);
        if cluster_size == 0 || off & (cluster_size - 1) != 0 {
            return Err(Error::Unaligned {
                what: "L2 table offset",
                offset: off,
                alignment: cluster_size,
            });
        }
        Ok(L1Entry {
            l2_offset: (off != 0).then_some(HostOffset(off)),
            copied: raw & COPIED != 0,
        })
    }

    /// Encodes the entry. An entry without an L2 table is always 0.
    pub fn encode(&self) -> u64 {
        match self.l2_offset {
            None => 0,
            Some(o) => (o.0 & OFFSET_MASK) | if self.copied { COPIED } else { 0 },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn decodes_qemu_entry() {
        let e = L1Entry::decode(0x8000_0000_0004_0000, 16).unwrap();
        assert_eq!(e, L1Entry::new(HostOffset(0x40000), true));
        assert!(L1Entry::decode(0x8000_0000_0004_0200, 16).is_err());
        assert!(L1Entry::decode(0x0100_0000_0004_0000, 16).is_err());
        assert_eq!(L1Entry::decode(0, 16).unwrap(), L1Entry::default());
    }

    proptest! {
        #[test]
        fn round_trips(cl in 0u64..(1 << 30), copied: bool) {
            let e = L1Entry::new(HostOffset(cl << 16), copied);
            let d = L1Entry::decode(e.encode(), 16).unwrap();
            if cl == 0 { prop_assert_eq!(d.l2_offset, None) } else { prop_assert_eq!(d, e) }
        }
        #[test]
        fn never_panics(raw: u64, bits: u32) { let _ = L1Entry::decode(raw, bits); }
    }
}
