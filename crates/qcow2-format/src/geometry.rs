//! Cluster geometry: how guest offsets split into L1 index, L2 index and in-cluster offset.

use crate::error::{Error, Result};
use crate::offset::GuestOffset;

/// Smallest cluster size QEMU accepts (512 B).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster size QEMU accepts (2 MiB).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS_PER_CLUSTER: u32 = 32;

/// Derived sizes for one image. Construct with [`Geometry::new`], which validates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    cluster_bits: u32,
    extended_l2: bool,
}

/// Where a guest offset lives in the two-level table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L2Position {
    /// Index into the L1 table.
    pub l1_index: u64,
    /// Index of the entry within its L2 table.
    pub l2_index: usize,
    /// Byte offset within the cluster.
    pub in_cluster: u64,
}

impl Geometry {
    /// Validates `cluster_bits` (9..=21) and, for extended L2, that subclusters are at
    /// least 512 bytes (QEMU: "Unsupported subcluster size").
    pub fn new(cluster_bits: u32, extended_l2: bool) -> Result<Self> {
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Error::invalid(
                "cluster_bits",
                cluster_bits.into(),
                "QEMU supports 9..=21",
            ));
        }
        if extended_l2 && (1u64 << cluster_bits) / u64::from(SUBCLUSTERS_PER_CLUSTER) < 512 {
            return Err(Error::invalid(
                "subcluster size",
                (1u64 << cluster_bits) / u64::from(SUBCLUSTERS_PER_CLUSTER),
                "must be at least 512 bytes",
            ));
        }
        Ok(Geometry {
            cluster_bits,
            extended_l2,
        })
    }

    /// log2 of the cluster size.
    pub const fn cluster_bits(&self) -> u32 {
        self.cluster_bits
    }
    /// Cluster size in bytes.
    pub const fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// Whether L2 entries are 128 bits with subcluster bitmaps.
    pub const fn extended_l2(&self) -> bool {
        self.extended_l2
    }
    /// Size of one L2 entry in bytes (8 or 16).
    pub const fn l2_entry_size(&self) -> u64 {
        if self.extended_l2 {
            16
        } else {
            8
        }
    }
    /// log2 of entries per L2 table.
    pub const fn l2_bits(&self) -> u32 {
        self.cluster_bits - if self.extended_l2 { 4 } else { 3 }
    }
    /// Entries per L2 table.
    pub const fn l2_entries(&self) -> usize {
        1 << self.l2_bits()
    }
    /// Guest bytes covered by one L2 table.
    pub const fn l2_coverage(&self) -> u64 {
        1 << (self.cluster_bits + self.l2_bits())
    }
    /// Subcluster size in bytes (cluster size without extended L2).
    pub const fn subcluster_size(&self) -> u64 {
        if self.extended_l2 {
            self.cluster_size() / SUBCLUSTERS_PER_CLUSTER as u64
        } else {
            self.cluster_size()
        }
    }
    /// Offset of `off` within its cluster.
    pub const fn offset_in_cluster(&self, off: u64) -> u64 {
        off & (self.cluster_size() - 1)
    }
    /// Rounds `off` down to its cluster start.
    pub const fn cluster_start(&self, off: u64) -> u64 {
        off & !(self.cluster_size() - 1)
    }
    /// Index of the cluster containing `off`.
    pub const fn cluster_index(&self, off: u64) -> u64 {
        off >> self.cluster_bits
    }
    /// Whether `off` is cluster aligned.
    pub const fn is_aligned(&self, off: u64) -> bool {
        self.offset_in_cluster(off) == 0
    }
    /// Number of clusters needed for `bytes` (rounded up).
    pub const fn clusters_for(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.cluster_size())
    }

    /// Splits a guest offset into table indices.
    pub fn locate(&self, off: GuestOffset) -> L2Position {
        let off = off.0;
        L2Position {
            l1_index: off >> (self.cluster_bits + self.l2_bits()),
            l2_index: ((off >> self.cluster_bits) & (self.l2_entries() as u64 - 1)) as usize,
            in_cluster: self.offset_in_cluster(off),
        }
    }

    /// Smallest L1 table (in entries) that maps `virtual_size` bytes.
    pub fn l1_entries_for(&self, virtual_size: u64) -> u64 {
        virtual_size.div_ceil(self.l2_coverage())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_geometry_matches_qemu() {
        let g = Geometry::new(16, false).unwrap();
        assert_eq!(g.l2_entries(), 8192);
        assert_eq!(g.l2_coverage(), 512 << 20);
        // qemu-img create 1G: l1_size 2
        assert_eq!(g.l1_entries_for(1 << 30), 2);
        // Reference §1.4: 512 B clusters, 1 GiB -> l1_size 0x8000; 4 KiB -> 0x200; 2 MiB -> 1.
        assert_eq!(
            Geometry::new(9, false).unwrap().l1_entries_for(1 << 30),
            0x8000
        );
        assert_eq!(
            Geometry::new(12, false).unwrap().l1_entries_for(1 << 30),
            0x200
        );
        assert_eq!(Geometry::new(21, false).unwrap().l1_entries_for(1 << 30), 1);
    }

    #[test]
    fn extended_l2_needs_16k_clusters() {
        assert!(Geometry::new(13, true).is_err());
        let g = Geometry::new(14, true).unwrap();
        assert_eq!(g.subcluster_size(), 512);
        assert_eq!(g.l2_entries(), 1024);
    }

    #[test]
    fn rejects_out_of_range_cluster_bits_without_overflow() {
        for bits in [0, 8, 22, 63, 64, 200, u32::MAX] {
            assert!(Geometry::new(bits, false).is_err());
        }
    }

    #[test]
    fn locate_splits_offsets() {
        let g = Geometry::new(16, false).unwrap();
        let p = g.locate(GuestOffset((3 << 29) + (5 << 16) + 123));
        assert_eq!(
            p,
            L2Position {
                l1_index: 3,
                l2_index: 5,
                in_cluster: 123
            }
        );
    }
}
