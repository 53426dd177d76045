//! Positional, asynchronous file I/O: the only way the engine touches bytes.
//!
//! [`BlockFile`] is object safe so that the backend is chosen at run time (io_uring, a
//! thread pool, memory, or — with the `test-util` feature — a fault injector for tests). Buffers are owned ([`IoBuf`]) so that a
//! backend like io_uring can keep them alive until the kernel is done with them, even when the
//! caller's future is dropped.

use std::fmt::Debug;
use std::future::Future;
use std::io;
use std::pin::Pin;

mod buf;
#[cfg(feature = "test-util")]
mod fault;
mod highwater;
mod mem;
mod open;
#[cfg(test)]
mod testsuite;
mod threads;
#[cfg(target_os = "linux")]
mod uring;

pub use buf::{IoBuf, SharedRegion};
#[cfg(feature = "test-util")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub use fault::{
    CrashState, FaultErrno, FaultEvent, FaultFile, FaultOp, Survival, WriteFailure, SECTOR,
};
pub(crate) use highwater::HighWater;
pub use mem::MemFile;
pub use open::{open_file, Aio, Completion, FileOptions, ParseRingError, RingOptions};
pub use threads::ThreadFile;
#[cfg(target_os = "linux")]
pub use uring::{plug, Plug, RingClaim, RingWatch, UringFile};

/// A boxed I/O future.
pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send + 'a>>;

/// Async positional I/O on one file.
///
/// Reads past the end of the file return zeros for the missing part (qcow2 images routinely
/// end before the last byte of their last cluster). Writes extend the file.
// `len` is an asynchronous query of the file size, not a container length; an `is_empty`
// companion would be noise.
#[allow(clippy::len_without_is_empty)]
pub trait BlockFile: Send + Sync + Debug + 'static {
    /// Fills `buf` from `offset`; bytes past EOF read as zeros. Returns the buffer.
    fn read_at(&self, buf: IoBuf, offset: u64) -> IoFuture<'_, IoBuf>;
    /// Writes all of `buf` at `offset`. Returns the buffer for reuse.
    fn write_at(&self, buf: IoBuf, offset: u64) -> IoFuture<'_, IoBuf>;
    /// Fills the buffers in order from consecutive bytes at `offset` (like `preadv`); bytes
    /// past EOF read as zeros. Returns the buffers.
    ///
    /// The default reads one buffer after the other through [`BlockFile::read_at`], which is
    /// correct for every wrapper; backends with a vectored system call override it.
    fn read_vectored_at(&self, bufs: Vec<IoBuf>, offset: u64) -> IoFuture<'_, Vec<IoBuf>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(bufs.len());
            let mut at = offset;
            for buf in bufs {
                let n = buf.len() as u64;
                out.push(self.read_at(buf, at).await?);
                at = buf::checked_end(at, n)?;
            }
            Ok(out)
        })
    }
    /// Writes the buffers in order as consecutive bytes at `offset` (like `pwritev`). Returns
    /// the buffers. The default writes one after the other (see `read_vectored_at`).
    fn write_vectored_at(&self, bufs: Vec<IoBuf>, offset: u64) -> IoFuture<'_, Vec<IoBuf>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(bufs.len());
            let mut at = offset;
            for buf in bufs {
                let n = buf.len() as u64;
                out.push(self.write_at(buf, at).await?);
                at = buf::checked_end(at, n)?;
            }
            Ok(out)
        })
    }
    /// Makes every completed write durable (fdatasync).
    fn flush(&self) -> IoFuture<'_, ()>;
    /// Current length of the file in bytes.
    fn len(&self) -> IoFuture<'_, u64>;
    /// Truncates or extends the file.
    fn set_len(&self, len: u64) -> IoFuture<'_, ()>;
    /// Reserves space (fallocate mode 0); the file grows if needed.
    fn allocate(&self, offset: u64, len: u64) -> IoFuture<'_, ()>;
    /// Deallocates a range, which then reads as zeros (FALLOC_FL_PUNCH_HOLE | KEEP_SIZE).
    fn punch_hole(&self, offset: u64, len: u64) -> IoFuture<'_, ()>;
    /// Makes a range read as zeros, keeping it allocated where the file system can
    /// (FALLOC_FL_ZERO_RANGE, falling back to writing zeros). The file grows if needed.
    fn zero_range(&self, offset: u64, len: u64) -> IoFuture<'_, ()>;
    /// The parts of `[offset, offset + len)` the file does not store (holes, and everything
    /// past its end), as sorted `(start, end)` pairs. They read as zeros; block status reports
    /// them as such, as QEMU's file driver does. Backends that do not track holes report
    /// only the part past the end ([`holes_past_end`]).
    ///
    /// Required, like [`BlockFile::allocated_bytes`] and [`BlockFile::alignment`], although
    /// most backends have an obvious answer: a default would be the wrong answer for every
    /// wrapper that forgets to forward it (an O_DIRECT wrapper once hid the file's holes from
    /// `map` that way). The vectored methods keep defaults because theirs are right for every
    /// implementation: they go through the implementation's own `read_at` / `write_at`.
    fn holes(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<(u64, u64)>>;
    /// Bytes the file occupies on its storage (`st_blocks * 512`; the length where the
    /// backend cannot tell).
    fn allocated_bytes(&self) -> IoFuture<'_, u64>;
    /// Required alignment of offsets, lengths and buffers (1 unless opened with O_DIRECT).
    ///
    /// The backends reject misaligned reads and writes with `InvalidInput` rather than passing
    /// them to the kernel, so an engine using O_DIRECT must build its buffers with
    /// `IoBuf::zeroed(len, file.alignment())` and keep offsets and lengths aligned.
    fn alignment(&self) -> usize;
}

/// [`BlockFile::holes`] for a backend that stores every byte below its length `size`: the
/// part of `[offset, offset + len)` past the end, if any.
pub fn holes_past_end(size: u64, offset: u64, len: u64) -> Vec<(u64, u64)> {
    let end = offset.saturating_add(len);
    let from = offset.max(size);
    if from < end {
        vec![(from, end)]
    } else {
        vec![]
    }
}
