//! The two cluster allocators, metadata and data (invariant 3: their free-space views are
//! separate), and the cursor that packs compressed payloads into shared clusters.
//!
//! An allocator is a view of free space, not a second copy of the refcounts: it remembers
//! where its next search starts. The owner (`Meta::alloc`, under the metadata lock) scans
//! refcounts from [`Allocator::search_from`], marks what it found as used, and reports the
//! run back with [`Allocator::took`]; a freed cluster moves every view back to it
//! ([`Allocators::freed`]). Keeping the cursors apart is what lets sequential guest writes
//! get contiguous data clusters while L2 tables and refcount blocks come from their own
//! region, as QEMU lays them out; keeping them here, with no I/O, is what makes the policy
//! testable on its own.

/// Which allocator a cluster comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pool {
    /// L2 tables, refcount blocks, tables; always in the qcow2 file.
    Metadata,
    /// Guest data clusters (and the clusters compressed payloads are packed into);
    /// sequential writes get contiguous clusters from its own cursor.
    Data,
}

/// One pool's free-space view: the cluster index its next search starts at.
#[derive(Debug, Default)]
pub(crate) struct Allocator {
    next: u64,
}

impl Allocator {
    /// Where the next search for free clusters starts. Never cluster 0: the header is
    /// there, whatever its refcount says.
    pub(crate) fn search_from(&self) -> u64 {
        self.next.max(1)
    }

    /// The run `[start, start + n)` was taken: the next search starts after it.
    pub(crate) fn took(&mut self, start: u64, n: u64) {
        self.next = start + n;
    }

    /// The run at `start` must be chosen again: a refcount block created for it may have
    /// landed inside it (QEMU's -EAGAIN), so the search repeats from there.
    pub(crate) fn retry_from(&mut self, start: u64) {
        self.next = start;
    }

    fn freed(&mut self, cluster: u64) {
        self.next = self.next.min(cluster);
    }
}

/// Where the next compressed payload may start: QEMU's `free_byte_offset`, a byte offset
/// inside a partly filled data cluster, in memory only (a reopened image starts a fresh
/// cluster, as QEMU's does).
#[derive(Debug, Default)]
pub(crate) struct PayloadCursor {
    /// 0: no partly filled cluster.
    next: u64,
}

impl PayloadCursor {
    /// The partly filled cluster's next free byte and the bytes left in that cluster.
    pub(crate) fn open(&self, cluster_size: u64) -> Option<(u64, u64)> {
        (self.next != 0).then(|| (self.next, cluster_size - (self.next & (cluster_size - 1))))
    }

    /// Stops packing into the current cluster (its refcount is at the maximum).
    pub(crate) fn close(&mut self) {
        self.next = 0;
    }

    /// Where a payload goes that does not fit the `open` room, given a free data cluster at
    /// host offset `fresh`: it continues from the open cluster into `fresh` when `fresh` is
    /// the very next cluster (QEMU's spill rule), otherwise it starts at `fresh`. Returns the
    /// payload's start and the room from there.
    pub(crate) fn spill_or_start(
        open: Option<(u64, u64)>,
        fresh: u64,
        cluster_size: u64,
    ) -> (u64, u64) {
        match open {
            Some((at, room)) if at.div_ceil(cluster_size) * cluster_size == fresh => {
                (at, room + cluster_size)
            }
            _ => (fresh, cluster_size),
        }
    }

    /// A payload ending at byte `end` was placed: the next one packs in behind it, unless
    /// it ended on a cluster boundary.
    pub(crate) fn placed(&mut self, end: u64, cluster_size: u64) {
        self.next = if end & (cluster_size - 1) == 0 {
            0
        } else {
            end
        };
    }

    fn freed(&mut self, cluster: u64, cluster_bits: u32) {
        // The cluster may come back as anything: packing more payloads into it is wrong.
        if self.next != 0 && self.next >> cluster_bits == cluster {
            self.next = 0;
        }
    }
}

/// Both allocators and the payload cursor: the one place a freed cluster has to reach.
#[derive(Debug, Default)]
pub(crate) struct Allocators {
    metadata: Allocator,
    data: Allocator,
    payloads: PayloadCursor,
}

impl Allocators {
    pub(crate) fn pool(&mut self, pool: Pool) -> &mut Allocator {
        match pool {
            Pool::Metadata => &mut self.metadata,
            Pool::Data => &mut self.data,
        }
    }

    pub(crate) fn payloads(&mut self) -> &mut PayloadCursor {
        &mut self.payloads
    }

    /// Cluster `cluster` (an index) got refcount 0: every view may hand it out again.
    pub(crate) fn freed(&mut self, cluster: u64, cluster_bits: u32) {
        self.metadata.freed(cluster);
        self.data.freed(cluster);
        self.payloads.freed(cluster, cluster_bits);
    }

    /// Forgets everything (after the refcount structures were rebuilt).
    pub(crate) fn reset(&mut self) {
        *self = Allocators::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CS: u64 = 65536;
    const BITS: u32 = 16;

    #[test]
    fn the_pools_move_independently() {
        let mut a = Allocators::default();
        assert_eq!(
            a.pool(Pool::Data).search_from(),
            1,
            "never the header's cluster"
        );
        a.pool(Pool::Data).took(10, 4);
        assert_eq!(a.pool(Pool::Data).search_from(), 14);
        assert_eq!(
            a.pool(Pool::Metadata).search_from(),
            1,
            "data did not move metadata"
        );
        a.pool(Pool::Metadata).took(3, 1);
        assert_eq!(a.pool(Pool::Metadata).search_from(), 4);
        assert_eq!(a.pool(Pool::Data).search_from(), 14);
    }

    #[test]
    fn a_retried_run_is_searched_again_from_its_start() {
        let mut a = Allocator::default();
        a.took(5, 3);
        a.retry_from(5);
        assert_eq!(a.search_from(), 5);
    }

    #[test]
    fn a_freed_cluster_moves_every_view_back_but_never_forward() {
        let mut a = Allocators::default();
        a.pool(Pool::Data).took(100, 1);
        a.pool(Pool::Metadata).took(50, 1);
        a.payloads().placed((100 << BITS) + 300, CS);
        a.freed(70, BITS);
        assert_eq!(a.pool(Pool::Data).search_from(), 70);
        assert_eq!(
            a.pool(Pool::Metadata).search_from(),
            51,
            "behind 70 already"
        );
        assert!(a.payloads().open(CS).is_some(), "another cluster was freed");
        a.freed(100, BITS);
        assert_eq!(a.payloads().open(CS), None, "its own cluster was freed");
        a.reset();
        assert_eq!(a.pool(Pool::Data).search_from(), 1);
    }

    #[test]
    fn payloads_pack_back_to_back_until_a_boundary() {
        let mut p = PayloadCursor::default();
        assert_eq!(p.open(CS), None);
        p.placed(CS * 7 + 1000, CS);
        assert_eq!(p.open(CS), Some((CS * 7 + 1000, CS - 1000)));
        p.placed(CS * 8, CS);
        assert_eq!(p.open(CS), None, "ended on a boundary");
        p.placed(CS * 8 + 1, CS);
        p.close();
        assert_eq!(p.open(CS), None);
    }

    #[test]
    fn a_payload_spills_only_into_the_adjacent_cluster() {
        let open = Some((CS * 7 + 60000, CS - 60000));
        assert_eq!(
            PayloadCursor::spill_or_start(open, CS * 8, CS),
            (CS * 7 + 60000, CS - 60000 + CS)
        );
        assert_eq!(
            PayloadCursor::spill_or_start(open, CS * 9, CS),
            (CS * 9, CS)
        );
        assert_eq!(
            PayloadCursor::spill_or_start(None, CS * 8, CS),
            (CS * 8, CS)
        );
    }
}
