//! Accumulating the refcounts an image's metadata implies, for `check`.
//!
//! The checker walks every structure that references host clusters and adds one reference
//! per use; comparing the result with the on-disk refcounts yields leaks (on disk > expected)
//! and corruptions (on disk < expected). The array grows with the highest referenced cluster,
//! but never beyond a caller-chosen bound: a crafted entry pointing at 2^55 must produce an
//! error, not a multi-terabyte allocation (qemu-iotests 138).

use crate::error::{Error, Result};

/// Expected refcounts per host cluster.
#[derive(Debug, Clone)]
pub struct RefcountAccumulator {
    cluster_bits: u32,
    max_clusters: u64,
    counts: Vec<u64>,
}

impl RefcountAccumulator {
    /// An empty accumulator that refuses to track more than `max_clusters` clusters.
    pub fn new(cluster_bits: u32, max_clusters: u64) -> Self {
        RefcountAccumulator {
            cluster_bits,
            max_clusters,
            counts: Vec::new(),
        }
    }

    /// Adds one reference to every cluster overlapping `[offset, offset + len)`.
    pub fn add(&mut self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let last = offset
            .checked_add(len - 1)
            .ok_or_else(|| Error::overflow("reference range"))?;
        let (first, last) = (offset >> self.cluster_bits, last >> self.cluster_bits);
        if last >= self.max_clusters {
            return Err(Error::limit(
                "referenced cluster index",
                last,
                self.max_clusters,
            ));
        }
        if last as usize >= self.counts.len() {
            self.counts.resize(last as usize + 1, 0);
        }
        for c in &mut self.counts[first as usize..=last as usize] {
            *c = c.saturating_add(1);
        }
        Ok(())
    }

    /// Expected refcount of cluster `index`.
    pub fn get(&self, index: u64) -> u64 {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.counts.get(i))
            .copied()
            .unwrap_or(0)
    }

    /// One past the highest cluster with a reference.
    pub fn len(&self) -> u64 {
        self.counts.len() as u64
    }

    /// Whether nothing was referenced.
    pub fn is_empty(&self) -> bool {
        self.counts.iter().all(|&c| c == 0)
    }
}

/// One difference between expected and on-disk refcounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefcountMismatch {
    /// More on disk than references: harmless, space is wasted.
    Leak {
        /// Cluster index.
        cluster: u64,
        /// On-disk refcount.
        on_disk: u64,
        /// References found.
        expected: u64,
    },
    /// Fewer on disk than references: a later free would corrupt data.
    Corruption {
        /// Cluster index.
        cluster: u64,
        /// On-disk refcount.
        on_disk: u64,
        /// References found.
        expected: u64,
    },
}

/// Compares cluster `index`'s on-disk refcount with the accumulated one.
pub fn compare(index: u64, on_disk: u64, acc: &RefcountAccumulator) -> Option<RefcountMismatch> {
    let expected = acc.get(index);
    match on_disk.cmp(&expected) {
        std::cmp::Ordering::Equal => None,
        std::cmp::Ordering::Greater => Some(RefcountMismatch::Leak {
            cluster: index,
            on_disk,
            expected,
        }),
        std::cmp::Ordering::Less => Some(RefcountMismatch::Corruption {
            cluster: index,
            on_disk,
            expected,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_every_overlapped_cluster() {
        let mut a = RefcountAccumulator::new(16, 1 << 20);
        a.add(0, 1).unwrap();
        a.add(0x1ffff, 2).unwrap(); // compressed payload spanning two clusters
        assert_eq!((a.get(0), a.get(1), a.get(2), a.get(99)), (1, 1, 1, 0));
        a.add(0x10000, 1).unwrap();
        assert_eq!(
            compare(1, 1, &a),
            Some(RefcountMismatch::Corruption {
                cluster: 1,
                on_disk: 1,
                expected: 2
            })
        );
        assert_eq!(
            compare(5, 1, &a),
            Some(RefcountMismatch::Leak {
                cluster: 5,
                on_disk: 1,
                expected: 0
            })
        );
        assert_eq!(compare(0, 1, &a), None);
    }

    #[test]
    fn huge_offsets_are_refused_not_allocated() {
        let mut a = RefcountAccumulator::new(9, 1 << 24);
        assert!(a.add(1 << 55, 512).is_err());
        assert!(a.add(u64::MAX, 2).is_err());
        assert!(a.is_empty());
    }
}
