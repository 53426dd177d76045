//! The compressed cluster descriptor (reference §2.6).
//!
//! Its field widths depend on the cluster size: with `x = 70 - cluster_bits`, bits `0..x`
//! hold the host byte offset of the payload and bits `x..62` the number of 512-byte sectors
//! the payload spans beyond the first.

use crate::error::{Error, Result};

/// Highest host offset QEMU allows for anything (2^56).
const MAX_HOST_OFFSET: u64 = 1 << 56;

/// A decoded compressed cluster descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CompressedDescriptor {
    host_offset: u64,
    /// Additional 512-byte sectors beyond the one containing `host_offset`.
    extra_sectors: u32,
}

impl CompressedDescriptor {
    fn shift(cluster_bits: u32) -> u32 {
        70 - cluster_bits
    }
    fn size_mask(cluster_bits: u32) -> u64 {
        (1u64 << (cluster_bits - 8)) - 1
    }

    /// Describes a payload of `len` bytes at `host_offset`, as QEMU's
    /// `qcow2_alloc_compressed_cluster_offset` does.
    pub fn new(host_offset: u64, len: u64, cluster_bits: u32) -> Result<Self> {
        check_bits(cluster_bits)?;
        if len == 0 {
            return Err(Error::invalid("compressed length", 0, "must be non-zero"));
        }
        let end = host_offset
            .checked_add(len - 1)
            .ok_or_else(|| Error::overflow("compressed descriptor"))?;
        let offset_limit = MAX_HOST_OFFSET.min(1u64 << Self::shift(cluster_bits));
        if end >= offset_limit {
            return Err(Error::limit("compressed payload end", end, offset_limit));
        }
        let extra = end / 512 - host_offset / 512;
        if extra > Self::size_mask(cluster_bits) {
            return Err(Error::limit(
                "compressed payload sectors",
                extra + 1,
                Self::size_mask(cluster_bits) + 1,
            ));
        }
        Ok(CompressedDescriptor {
            host_offset,
            extra_sectors: extra as u32,
        })
    }

    /// Decodes the 62-bit descriptor (bits 62/63 of the L2 entry are ignored here).
    pub fn decode(raw: u64, cluster_bits: u32) -> Result<Self> {
        check_bits(cluster_bits)?;
        let shift = Self::shift(cluster_bits);
        let host_offset = raw & ((1u64 << shift) - 1);
        if host_offset >= MAX_HOST_OFFSET {
            return Err(Error::limit(
                "compressed cluster offset",
                host_offset,
                MAX_HOST_OFFSET,
            ));
        }
        let extra = (raw >> shift) & Self::size_mask(cluster_bits);
        Ok(CompressedDescriptor {
            host_offset,
            extra_sectors: extra as u32,
        })
    }

    /// Encodes the descriptor bits (without the compressed flag).
    pub fn encode(&self, cluster_bits: u32) -> u64 {
        self.host_offset | (u64::from(self.extra_sectors) << Self::shift(cluster_bits))
    }

    /// Host byte offset of the compressed payload.
    pub fn host_offset(&self) -> u64 {
        self.host_offset
    }
    /// Sectors the payload touches (at least 1).
    pub fn sectors(&self) -> u64 {
        u64::from(self.extra_sectors) + 1
    }
    /// Bytes to read from `host_offset`: to the end of the last sector (QEMU's `csize`).
    pub fn read_len(&self) -> u64 {
        self.sectors() * 512 - (self.host_offset & 511)
    }
    /// The sector-aligned host range that holds a reference (QEMU frees exactly this).
    pub fn host_range(&self) -> (u64, u64) {
        (self.host_offset & !511, self.sectors() * 512)
    }
}

fn check_bits(cluster_bits: u32) -> Result<()> {
    if !(9..=21).contains(&cluster_bits) {
        return Err(Error::invalid(
            "cluster_bits",
            cluster_bits.into(),
            "QEMU supports 9..=21",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn decodes_the_verified_qemu_entry() {
        // Reference §2.6: 64 KiB clusters, entry 0x4340000000050000.
        let raw = 0x4340_0000_0005_0000u64 & !(3 << 62);
        let d = CompressedDescriptor::decode(raw, 16).unwrap();
        assert_eq!(d.host_offset(), 0x50000);
        assert_eq!(d.sectors(), 14);
        assert_eq!(d.read_len(), 7168);
        assert_eq!(d.encode(16), raw);
    }

    #[test]
    fn field_widths_follow_cluster_size() {
        // 512 B clusters: one bit of sector count at bit 61.
        let d = CompressedDescriptor::new(0x13f0, 300, 9).unwrap();
        assert_eq!(d.encode(9) >> 61, 1);
        // 2 MiB clusters: 13 bits of count from bit 49.
        let d = CompressedDescriptor::new(0x600001, 2 << 20, 21).unwrap();
        assert_eq!(d.encode(21) >> 49, 4096);
        assert!(CompressedDescriptor::new(1 << 49, 10, 21).is_err());
    }

    proptest! {
        #[test]
        fn round_trips(bits in 9u32..=21, off in 0u64..(1 << 40), len in 1u64..(1 << 21)) {
            let off = off & ((1u64 << (70 - bits)) - 1);
            if let Ok(d) = CompressedDescriptor::new(off, len, bits) {
                let back = CompressedDescriptor::decode(d.encode(bits), bits).unwrap();
                prop_assert_eq!(back, d);
                prop_assert!(back.read_len() >= len);
                let (start, n) = back.host_range();
                prop_assert!(start <= off && start + n >= off + len);
            }
        }

        #[test]
        fn decode_never_panics(raw in any::<u64>(), bits in any::<u32>()) {
            let _ = CompressedDescriptor::decode(raw, bits);
        }
    }
}
