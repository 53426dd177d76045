//! Telling a sequential reader from a random one, and how far ahead to fetch for it.

use std::ops::Range;

/// The recent history of reads, in blocks.
#[derive(Debug, Default)]
pub(crate) struct Sequential {
    /// One past the last block of the furthest recent read.
    end: u64,
    /// Reads in a row that continued the previous ones.
    streak: u32,
    /// The first block of the current stream.
    start: u64,
    /// One past the last block already asked for by read-ahead.
    frontier: u64,
}

impl Sequential {
    /// Records a read of blocks `[first, end)` and returns the blocks to fetch ahead of it
    /// (`window` blocks at most, none past `total`), once the stream is `min_stream` blocks
    /// long.
    ///
    /// A read continues the stream if it starts at or before where the stream got to, and
    /// no further back than one window: parallel readers of one stream (convert's workers)
    /// arrive slightly out of order. Read-ahead starts from the second such read in a row
    /// and once the stream is `min_stream` blocks long, so that a random reader never pays
    /// for it — not even one whose large reads arrive as one read per qcow2 cluster, which
    /// look sequential over a few blocks — and is topped up only once half a window is
    /// used, so that each top-up is one large request rather than a block at a time.
    pub(crate) fn observe(
        &mut self,
        first: u64,
        end: u64,
        window: u64,
        min_stream: u64,
        total: u64,
    ) -> Option<Range<u64>> {
        let continues = first <= self.end && first + window >= self.end;
        if continues {
            self.streak = self.streak.saturating_add(1);
            self.end = self.end.max(end);
        } else {
            self.streak = 0;
            self.start = first;
            self.end = end;
            self.frontier = 0;
        }
        if window == 0 || self.streak < 2 || self.end - self.start < min_stream {
            return None;
        }
        let want = (self.end + window).min(total);
        let from = self.frontier.max(self.end);
        let short = want - from.min(want);
        if short == 0 || (short < window / 2 && want < total) {
            return None;
        }
        self.frontier = want;
        Some(from..want)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sequential_reader_gets_read_ahead_in_large_pieces() {
        let mut s = Sequential::default();
        assert_eq!(s.observe(0, 1, 8, 0, 100), None); // first read: not yet a stream
        assert_eq!(s.observe(1, 2, 8, 0, 100), Some(2..10));
        // Within the window already asked for: nothing new until half of it is used.
        assert_eq!(s.observe(2, 3, 8, 0, 100), None);
        assert_eq!(s.observe(3, 4, 8, 0, 100), None);
        assert_eq!(s.observe(4, 5, 8, 0, 100), None);
        assert_eq!(s.observe(5, 6, 8, 0, 100), Some(10..14));
        // Near the end of the object: whatever is left, even if short.
        let mut s = Sequential::default();
        s.observe(94, 95, 8, 0, 100);
        s.observe(95, 96, 8, 0, 100);
        assert_eq!(s.observe(96, 97, 8, 0, 100), Some(97..100));
    }

    #[test]
    fn a_short_stream_gets_none() {
        // A large random read, cluster by cluster: 16 blocks in order, then elsewhere.
        let mut s = Sequential::default();
        for b in 0..16 {
            assert_eq!(s.observe(b, b + 1, 256, 64, 10_000), None);
        }
        for b in 5000..5070 {
            let r = s.observe(b, b + 1, 256, 64, 10_000);
            assert_eq!(r.is_some(), b == 5063, "{b}");
        }
    }

    #[test]
    fn random_reads_get_none_and_out_of_order_neighbours_still_count() {
        let mut s = Sequential::default();
        for (a, b) in [(50, 51), (10, 11), (70, 71), (3, 4), (90, 91)] {
            assert_eq!(s.observe(a, b, 8, 0, 100), None);
        }
        let mut s = Sequential::default();
        s.observe(0, 2, 8, 0, 100);
        s.observe(4, 6, 8, 0, 100); // a gap: a new stream
        assert_eq!(s.observe(2, 4, 8, 0, 100), None); // the worker that was behind: continues
        assert_eq!(s.observe(6, 8, 8, 0, 100), Some(8..16));
    }
}
