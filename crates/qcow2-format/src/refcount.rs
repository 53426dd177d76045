//! Refcount table entries and refcount block codec for every width (reference §3.1).
//!
//! Entries of 8 bits and more are big-endian; narrower ones are packed LSB first within each
//! byte (1-bit refcounts of clusters 0..6 in use give byte 0 = `0x3f`).

use crate::error::{Error, Result};

const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
const REFT_RESERVED_MASK: u64 = 0x1ff;

/// `refcount_order`: refcounts are `1 << order` bits wide (0..=6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RefcountOrder(u32);

impl RefcountOrder {
    /// 16-bit refcounts, the default and the only width v2 knows.
    pub const DEFAULT: RefcountOrder = RefcountOrder(4);

    /// Validates `order` (0..=6).
    pub fn new(order: u32) -> Result<Self> {
        if order > 6 {
            return Err(Error::invalid(
                "refcount_order",
                order.into(),
                "refcount width may not exceed 64 bits",
            ));
        }
        Ok(RefcountOrder(order))
    }

    /// From a width in bits (1, 2, 4, ..., 64).
    pub fn from_bits(bits: u32) -> Result<Self> {
        if !bits.is_power_of_two() || bits > 64 {
            return Err(Error::invalid(
                "refcount_bits",
                bits.into(),
                "must be a power of two up to 64",
            ));
        }
        Ok(RefcountOrder(bits.trailing_zeros()))
    }

    /// The order value stored in the header.
    pub const fn order(self) -> u32 {
        self.0
    }
    /// Width in bits.
    pub const fn bits(self) -> u32 {
        1 << self.0
    }
    /// Largest representable refcount.
    pub const fn max(self) -> u64 {
        if self.0 == 6 {
            u64::MAX
        } else {
            (1u64 << self.bits()) - 1
        }
    }
    /// log2 of entries per refcount block.
    pub const fn block_bits(self, cluster_bits: u32) -> u32 {
        cluster_bits + 3 - self.0
    }
    /// Entries per refcount block.
    pub const fn entries_per_block(self, cluster_bits: u32) -> u64 {
        1 << self.block_bits(cluster_bits)
    }

    /// Reads entry `index` of a refcount block. `block` must be one cluster long and
    /// `index < entries_per_block`; otherwise an error, never a panic.
    pub fn get(self, block: &[u8], index: u64) -> Result<u64> {
        let bits = u64::from(self.bits());
        let bit = index
            .checked_mul(bits)
            .ok_or_else(|| Error::overflow("refcount index"))?;
        let byte = (bit / 8) as usize;
        let width = (bits as usize).div_ceil(8);
        if byte.saturating_add(width) > block.len() {
            return Err(Error::truncated(
                "refcount block",
                byte.saturating_add(width),
                block.len(),
            ));
        }
        Ok(if bits < 8 {
            (u64::from(block[byte]) >> (bit % 8)) & self.max()
        } else {
            let mut v = 0u64;
            for b in &block[byte..byte + width] {
                v = (v << 8) | u64::from(*b);
            }
            v
        })
    }

    /// Writes entry `index` of a refcount block.
    pub fn set(self, block: &mut [u8], index: u64, value: u64) -> Result<()> {
        if value > self.max() {
            return Err(Error::limit("refcount", value, self.max()));
        }
        let bits = u64::from(self.bits());
        let bit = index
            .checked_mul(bits)
            .ok_or_else(|| Error::overflow("refcount index"))?;
        let byte = (bit / 8) as usize;
        let width = (bits as usize).div_ceil(8);
        if byte.saturating_add(width) > block.len() {
            return Err(Error::truncated(
                "refcount block",
                byte.saturating_add(width),
                block.len(),
            ));
        }
        if bits < 8 {
            let shift = bit % 8;
            let mask = (self.max() as u8) << shift;
            block[byte] = (block[byte] & !mask) | ((value as u8) << shift);
        } else {
            let be = value.to_be_bytes();
            block[byte..byte + width].copy_from_slice(&be[8 - width..]);
        }
        Ok(())
    }
}

impl Default for RefcountOrder {
    fn default() -> Self {
        RefcountOrder::DEFAULT
    }
}

/// One refcount table entry: the offset of a refcount block, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ReftableEntry(pub Option<u64>);

impl ReftableEntry {
    /// Decodes an entry; reserved bits and unaligned offsets are corruption.
    pub fn decode(raw: u64, cluster_bits: u32) -> Result<Self> {
        if raw & REFT_RESERVED_MASK != 0 {
            return Err(Error::ReservedBits {
                what: "refcount table entry",
                value: raw,
            });
        }
        let off = raw & REFT_OFFSET_MASK;
        let mask = 1u64
            .checked_shl(cluster_bits)
            .ok_or_else(|| Error::overflow("cluster size"))?
            - 1;
        if off & mask != 0 {
            return Err(Error::Unaligned {
                what: "refcount block offset",
                offset: off,
                alignment: mask + 1,
            });
        }
        Ok(ReftableEntry((off != 0).then_some(off)))
    }

    /// Encodes the entry.
    pub fn encode(&self) -> u64 {
        self.0.unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn block_with_first(n: u64, order: u32) -> Vec<u8> {
        let o = RefcountOrder::new(order).unwrap();
        let mut b = vec![0u8; 512];
        for i in 0..n {
            o.set(&mut b, i, 1).unwrap();
        }
        b
    }

    #[test]
    fn sub_byte_widths_pack_lsb_first() {
        // Reference §3.1, experiment 18: clusters 0..6 in use.
        assert_eq!(block_with_first(6, 0)[0], 0x3f);
        assert_eq!(&block_with_first(6, 1)[..2], &[0x55, 0x05]);
        assert_eq!(&block_with_first(6, 2)[..3], &[0x11, 0x11, 0x11]);
        assert_eq!(&block_with_first(4, 3)[..4], &[1, 1, 1, 1]);
        assert_eq!(&block_with_first(1, 4)[..2], &[0, 1]);
    }

    #[test]
    fn limits_and_bounds() {
        let o = RefcountOrder::new(0).unwrap();
        let mut b = vec![0u8; 512];
        assert!(o.set(&mut b, 0, 2).is_err());
        assert!(o.set(&mut b, 4096, 1).is_err());
        assert!(o.get(&b, u64::MAX).is_err());
        assert!(RefcountOrder::new(7).is_err());
        assert_eq!(RefcountOrder::new(6).unwrap().max(), u64::MAX);
        assert_eq!(RefcountOrder::DEFAULT.entries_per_block(16), 32768);
        assert_eq!(RefcountOrder::new(6).unwrap().entries_per_block(9), 64);
    }

    #[test]
    fn reftable_entries() {
        assert_eq!(
            ReftableEntry::decode(0x20000, 16).unwrap(),
            ReftableEntry(Some(0x20000))
        );
        assert!(ReftableEntry::decode(0x20001, 16).is_err());
        assert!(ReftableEntry::decode(0x20200, 16).is_err());
        assert_eq!(ReftableEntry::decode(0, 16).unwrap(), ReftableEntry(None));
    }

    proptest! {
        #[test]
        fn every_width_round_trips(order in 0u32..=6, vals in proptest::collection::vec(any::<u64>(), 1..64)) {
            let o = RefcountOrder::new(order).unwrap();
            let mut block = vec![0u8; 4096];
            let vals: Vec<u64> = vals.iter().map(|v| v & o.max()).collect();
            for (i, v) in vals.iter().enumerate() {
                o.set(&mut block, i as u64 * 3, *v).unwrap();
            }
            for (i, v) in vals.iter().enumerate() {
                prop_assert_eq!(o.get(&block, i as u64 * 3).unwrap(), *v);
            }
        }
    }
}
