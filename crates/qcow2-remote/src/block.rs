//! A block of the object: one slot of the [`BlockPool`], filled from the response body.
//!
//! Blocks used to keep the body's own pieces (no copy on arrival), but those are fresh
//! memory for every response, and a cache that keeps them faults in every page it grows by:
//! 256 of the 264 page faults per MiB measured on first-touch 1 MiB reads, half of their
//! time. Copying into pooled slots costs one memcpy; the pool's memory is allocated in
//! large chunks backed by huge pages where the kernel allows it, and a slot goes back to
//! the pool when its block is dropped (evicted and no longer read), so a full cache turns
//! over without faulting anything in.

use std::sync::{Arc, Mutex, MutexGuard};

use bytes::BytesMut;

/// A filled (or filling) slot. Shared (`Arc`) between the cache and the readers; its
/// slot returns to the pool when the last of them lets go.
#[derive(Debug)]
pub(crate) struct Block {
    /// Length = bytes filled so far; capacity = the pool's block size, never exceeded
    /// (so filling never reallocates away from the pool's memory).
    data: BytesMut,
    pool: Arc<BlockPool>,
}

/// What the cache and the in-flight table hold.
pub(crate) type SharedBlock = Arc<Block>;

impl Block {
    pub(crate) fn len(&self) -> usize {
        self.data.len()
    }

    /// Appends `part`, which must fit in the slot.
    pub(crate) fn push(&mut self, part: &[u8]) {
        debug_assert!(self.data.len() + part.len() <= self.pool.block_size);
        self.data.extend_from_slice(part);
    }

    /// Fills the block with `len` bytes (at most the block size) that `read` puts into the
    /// slice it is given.
    pub(crate) fn fill_with(
        &mut self,
        len: usize,
        read: impl FnOnce(&mut [u8]) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        debug_assert!(len <= self.pool.block_size);
        self.data.clear();
        self.data.resize(len, 0);
        read(&mut self.data[..])
    }

    /// The block's bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.data
    }

    /// Copies the block's bytes from `from` on into all of `dst` (which the caller sized to
    /// fit within the block).
    pub(crate) fn copy_to(&self, from: usize, dst: &mut [u8]) {
        dst.copy_from_slice(&self.data[from..from + dst.len()]);
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.data));
    }
}

/// Where blocks' memory comes from: slots of one block size, carved from large chunks and
/// reused once their blocks are dropped. Has its own lock, never held while allocating.
///
/// Bound: the pool holds as many slots as were ever alive at once (cached, in flight, or
/// still being copied out by a reader), rounded up to a chunk; it never shrinks while the
/// file is open.
#[derive(Debug)]
pub(crate) struct BlockPool {
    block_size: usize,
    /// Slots per chunk.
    chunk_blocks: usize,
    /// Chunks are advised to be backed by huge pages.
    huge: bool,
    free: Mutex<Vec<BytesMut>>,
}

/// glibc's largest mmap threshold (`DEFAULT_MMAP_THRESHOLD_MAX` on 64-bit): a larger
/// allocation is always a mapping of its own, returned to the kernel when freed.
pub(crate) const OWN_MAPPING: usize = 32 << 20;

/// Huge page size on x86-64 and arm64 (4 KiB base pages): the granule of the advice.
const HUGE_PAGE: usize = 2 << 20;

impl BlockPool {
    /// A pool of `block_size` slots, allocated `chunk_bytes` at a time (at least one slot),
    /// backed by huge pages if `huge`.
    ///
    /// Only chunks larger than [`OWN_MAPPING`] should be `huge`: the allocator maps those
    /// on their own, while a smaller chunk may come from a heap that other allocations
    /// reuse after it is freed, and the advice would stay with that memory, making every
    /// later fault there zero 2 MiB (measured: a third slower than no advice at all with
    /// 32 MiB chunks, a quarter faster with 64 MiB ones).
    pub(crate) fn new(block_size: usize, chunk_bytes: usize, huge: bool) -> Arc<BlockPool> {
        Arc::new(BlockPool {
            block_size,
            huge,
            chunk_blocks: (chunk_bytes / block_size).max(1),
            free: Mutex::new(Vec::new()),
        })
    }

    /// An empty block with room for one block size.
    pub(crate) fn take(self: &Arc<Self>) -> Block {
        // (Popped in a statement of its own: a guard in the `match` would live through the
        // arms, which lock again.)
        let reused = self.lock().pop();
        let data = match reused {
            Some(slot) => slot,
            None => {
                let mut slots = self.chunk();
                let first = slots.pop().expect("a chunk has a slot");
                self.lock().append(&mut slots);
                first
            }
        };
        Block {
            data,
            pool: self.clone(),
        }
    }

    /// Slots free now (for tests).
    #[cfg(test)]
    fn free_slots(&self) -> usize {
        self.lock().len()
    }

    fn give(&self, mut slot: BytesMut) {
        // A slot that is not the pool's (an empty one taken by `mem::take`) is dropped.
        if slot.capacity() == self.block_size {
            slot.clear();
            self.lock().push(slot);
        }
    }

    /// A new chunk, split into empty slots.
    fn chunk(&self) -> Vec<BytesMut> {
        // calloc: fresh pages that nobody has touched yet, so the advice below applies
        // before the first fault.
        let mut chunk = BytesMut::zeroed(self.block_size * self.chunk_blocks);
        if self.huge {
            advise_huge_pages(&mut chunk);
        }
        (0..self.chunk_blocks)
            .map(|_| {
                let mut slot = chunk.split_to(self.block_size);
                slot.clear();
                slot
            })
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<BytesMut>> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Asks the kernel to back the huge-page-aligned part of `buf` with transparent huge
/// pages: one fault per 2 MiB instead of 512 (`madvise` mode of THP, Debian's default).
/// Advice only; where it is refused (THP disabled, another OS) pages are small.
fn advise_huge_pages(buf: &mut [u8]) {
    let start = buf.as_mut_ptr() as usize;
    let first = start.next_multiple_of(HUGE_PAGE);
    let end = (start + buf.len()) / HUGE_PAGE * HUGE_PAGE;
    if first >= end {
        return;
    }
    #[cfg(target_os = "linux")]
    // SAFETY: `first..end` lies inside `buf`, memory this function borrows exclusively;
    // MADV_HUGEPAGE changes only how the kernel backs those pages, never their contents or
    // whether they are mapped, so no reference into them is affected.
    unsafe {
        libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_fill_copy_out_and_return_their_slot() {
        let pool = BlockPool::new(16, 64, false);
        let mut b = pool.take();
        assert_eq!(pool.free_slots(), 3, "one chunk of four slots, one taken");
        for piece in [&b"abc"[..], b"", b"defgh", b"ij"] {
            b.push(piece);
        }
        assert_eq!(b.len(), 10);
        for from in 0..10 {
            for n in 0..=10 - from {
                let mut dst = vec![0; n];
                b.copy_to(from, &mut dst);
                assert_eq!(dst, &b"abcdefghij"[from..from + n]);
            }
        }
        let shared = Arc::new(b);
        let reader = shared.clone();
        drop(shared);
        assert_eq!(pool.free_slots(), 3, "still read");
        drop(reader);
        assert_eq!(pool.free_slots(), 4, "back in the pool");
        let again = pool.take();
        assert_eq!(again.len(), 0, "a reused slot starts empty");
    }

    #[test]
    fn slots_are_disjoint_and_never_outgrow_the_block_size() {
        let pool = BlockPool::new(4096, 4 * 4096, false);
        let mut blocks: Vec<Block> = (0..10).map(|_| pool.take()).collect();
        for (i, b) in blocks.iter_mut().enumerate() {
            b.push(&vec![i as u8; 4096]);
        }
        for (i, b) in blocks.iter().enumerate() {
            let mut out = vec![0; 4096];
            b.copy_to(0, &mut out);
            assert!(out.iter().all(|&x| x == i as u8), "slot {i} overwritten");
            assert_eq!(b.data.capacity(), 4096);
        }
        drop(blocks);
        assert_eq!(pool.free_slots(), 12, "three chunks of four");
    }
}
