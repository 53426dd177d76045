//! A block of the object as the response body delivered it: the body's pieces, shared,
//! not copied into one buffer. Copying each block once more on arrival cost as much as
//! the rest of a read (fresh memory for every block: a page fault per 4 KiB), and the
//! reader copies out of the pieces anyway.

use std::sync::Arc;

use bytes::Bytes;

/// A block: its pieces in order. Shared (`Arc`) between the cache and the readers.
#[derive(Debug, Default)]
pub(crate) struct Block {
    parts: Vec<Bytes>,
    len: usize,
}

/// What the cache and the in-flight table hold.
pub(crate) type SharedBlock = Arc<Block>;

impl Block {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn push(&mut self, part: Bytes) {
        self.len += part.len();
        self.parts.push(part);
    }

    /// Copies the block's bytes from `from` on into all of `dst` (which the caller sized to
    /// fit within the block).
    pub(crate) fn copy_to(&self, mut from: usize, dst: &mut [u8]) {
        let mut done = 0;
        for part in &self.parts {
            if done == dst.len() {
                break;
            }
            if from >= part.len() {
                from -= part.len();
                continue;
            }
            let n = (part.len() - from).min(dst.len() - done);
            dst[done..done + n].copy_from_slice(&part[from..from + n]);
            done += n;
            from = 0;
        }
        debug_assert_eq!(done, dst.len(), "copy past the end of a block");
    }
}

impl From<Bytes> for Block {
    fn from(b: Bytes) -> Block {
        let mut block = Block::default();
        block.push(b);
        block
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_across_pieces() {
        let mut b = Block::default();
        for piece in [&b"abc"[..], b"", b"defgh", b"ij"] {
            b.push(Bytes::copy_from_slice(piece));
        }
        assert_eq!(b.len(), 10);
        for from in 0..10 {
            for n in 0..=10 - from {
                let mut dst = vec![0; n];
                b.copy_to(from, &mut dst);
                assert_eq!(dst, &b"abcdefghij"[from..from + n]);
            }
        }
    }
}
