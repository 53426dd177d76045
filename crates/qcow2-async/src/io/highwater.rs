//! A [`BlockFile`] wrapper that remembers how far anything has ever been written.
//!
//! A cluster allocated past that mark has never held data since the file was opened (the
//! file ends before it, or it lies in a hole of a sparse tail), so it reads as zeros: a
//! partial write into it needs no zero fill of the rest of the cluster. That turns a small
//! allocating write on a growing image from a whole-cluster write into just the guest's
//! bytes — what QEMU gets from a `fallocate` zero-range, without the extra syscall.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{BlockFile, IoBuf, IoFuture};

#[derive(Debug)]
pub(crate) struct HighWater {
    inner: Arc<dyn BlockFile>,
    mark: AtomicU64,
}

impl HighWater {
    /// Wraps `inner`, whose current length is the starting mark.
    pub(crate) async fn new(inner: Arc<dyn BlockFile>) -> std::io::Result<HighWater> {
        let len = inner.len().await?;
        Ok(HighWater {
            inner,
            mark: AtomicU64::new(len),
        })
    }

    /// Everything at or past this offset has never been written through this handle and
    /// lay past the end of the file when it was opened.
    pub(crate) fn mark(&self) -> u64 {
        self.mark.load(Ordering::Acquire)
    }

    fn raise(&self, end: u64) {
        self.mark.fetch_max(end, Ordering::AcqRel);
    }
}

impl BlockFile for HighWater {
    fn read_at(&self, buf: IoBuf, offset: u64) -> IoFuture<'_, IoBuf> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: IoBuf, offset: u64) -> IoFuture<'_, IoBuf> {
        // Raised before the write is issued: a concurrent allocation must never believe a
        // region is untouched while bytes are on their way to it.
        self.raise(offset.saturating_add(buf.len() as u64));
        self.inner.write_at(buf, offset)
    }
    fn read_vectored_at(&self, bufs: Vec<IoBuf>, offset: u64) -> IoFuture<'_, Vec<IoBuf>> {
        self.inner.read_vectored_at(bufs, offset)
    }
    fn write_vectored_at(&self, bufs: Vec<IoBuf>, offset: u64) -> IoFuture<'_, Vec<IoBuf>> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        // As in `write_at`.
        self.raise(offset.saturating_add(len));
        self.inner.write_vectored_at(bufs, offset)
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        self.inner.flush()
    }
    fn len(&self) -> IoFuture<'_, u64> {
        self.inner.len()
    }
    // Growing the file, reserving space and zeroing leave regions that read as zeros, so
    // they do not raise the mark (an allocation there may still skip the zero fill).
    fn set_len(&self, len: u64) -> IoFuture<'_, ()> {
        self.inner.set_len(len)
    }
    fn allocate(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.inner.allocate(offset, len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.inner.punch_hole(offset, len)
    }
    fn zero_range(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.inner.zero_range(offset, len)
    }
    fn holes(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<(u64, u64)>> {
        self.inner.holes(offset, len)
    }
    fn allocated_bytes(&self) -> IoFuture<'_, u64> {
        self.inner.allocated_bytes()
    }
    fn alignment(&self) -> usize {
        self.inner.alignment()
    }
}
