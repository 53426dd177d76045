//! An in-memory [`BlockFile`] for tests and for images that never touch a disk.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::buf::{check_aligned, checked_end};
use super::{BlockFile, IoBuf, IoFuture};

impl Default for MemFile {
    fn default() -> MemFile {
        MemFile::new()
    }
}

/// A growable byte vector behind a mutex, with counters so tests can assert how much the engine
/// wrote and how often it flushed (e.g. "a barrier costs exactly one flush").
///
/// Every operation completes on its first poll. Holes are not tracked: `punch_hole` simply
/// zeroes bytes, so the file "allocates" everything.
#[derive(Debug)]
pub struct MemFile {
    data: Mutex<Vec<u8>>,
    align: usize,
    bytes_written: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    reads: AtomicU64,
}

impl MemFile {
    /// An empty file.
    pub fn new() -> MemFile {
        MemFile::from_bytes(Vec::new())
    }

    /// A file with these contents (e.g. an image built by a test or a snapshot of another file).
    pub fn from_bytes(bytes: Vec<u8>) -> MemFile {
        MemFile {
            data: Mutex::new(bytes),
            align: 1,
            bytes_written: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            reads: AtomicU64::new(0),
        }
    }

    /// Makes the file enforce an O_DIRECT-style alignment on reads and writes, so engine code
    /// paths for direct I/O can be tested without a file system that supports it.
    ///
    /// # Panics
    ///
    /// If `align` is not a power of two.
    pub fn with_alignment(mut self, align: usize) -> MemFile {
        assert!(align.is_power_of_two(), "alignment must be a power of two");
        self.align = align;
        self
    }

    /// A copy of the current contents.
    pub fn snapshot(&self) -> Vec<u8> {
        self.lock().clone()
    }

    /// Total bytes passed to successful `write_at` calls (not counting `zero_range`).
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written.load(Ordering::Relaxed)
    }

    /// Number of successful `write_at` calls.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Number of `read_at` calls.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// Number of `flush` calls.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    // A panic while holding the lock cannot leave the vector in an unsafe state, so a poisoned
    // mutex is simply used as is rather than turning every later call into a panic.
    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn read_sync(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        checked_end(offset, buf.len() as u64)?;
        self.reads.fetch_add(1, Ordering::Relaxed);
        let data = self.lock();
        let n = match usize::try_from(offset) {
            Ok(start) if start < data.len() => {
                let n = buf.len().min(data.len() - start);
                buf[..n].copy_from_slice(&data[start..start + n]);
                n
            }
            _ => 0,
        };
        buf[n..].fill(0);
        Ok(())
    }

    fn write_sync(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let (start, end) = usize_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            // Like pwrite(2): an empty write does not extend the file.
            return Ok(());
        }
        let mut data = self.lock();
        if data.len() < end {
            data.resize(end, 0);
        }
        data[start..end].copy_from_slice(buf);
        Ok(())
    }

    /// Zeroes `[offset, offset + len)` within the current length; grows the file to cover the
    /// range if `grow`.
    fn zero_sync(&self, offset: u64, len: u64, grow: bool) -> io::Result<()> {
        let (start, end) = usize_range(offset, len)?;
        let mut data = self.lock();
        if grow && data.len() < end {
            data.resize(end, 0);
        }
        let end = end.min(data.len());
        if start < end {
            data[start..end].fill(0);
        }
        Ok(())
    }
}

/// `[offset, offset + len)` as indices into a vector, which must fit in memory.
fn usize_range(offset: u64, len: u64) -> io::Result<(usize, usize)> {
    let end = checked_end(offset, len)?;
    match (usize::try_from(offset), usize::try_from(end)) {
        (Ok(start), Ok(end)) => Ok((start, end)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("range {offset}+{len} does not fit in memory"),
        )),
    }
}

impl BlockFile for MemFile {
    fn read_at(&self, mut buf: IoBuf, offset: u64) -> IoFuture<'_, IoBuf> {
        Box::pin(async move {
            check_aligned(self.align, &buf, offset)?;
            self.read_sync(&mut buf, offset)?;
            Ok(buf)
        })
    }

    fn write_at(&self, buf: IoBuf, offset: u64) -> IoFuture<'_, IoBuf> {
        Box::pin(async move {
            check_aligned(self.align, &buf, offset)?;
            self.write_sync(&buf, offset)?;
            self.writes.fetch_add(1, Ordering::Relaxed);
            self.bytes_written
                .fetch_add(buf.len() as u64, Ordering::Relaxed);
            Ok(buf)
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.flushes.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
    }

    fn len(&self) -> IoFuture<'_, u64> {
        Box::pin(async move { Ok(self.lock().len() as u64) })
    }

    fn set_len(&self, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let (_, len) = usize_range(0, len)?;
            self.lock().resize(len, 0);
            Ok(())
        })
    }

    fn allocate(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let (_, end) = usize_range(offset, len)?;
            let mut data = self.lock();
            if data.len() < end {
                data.resize(end, 0);
            }
            Ok(())
        })
    }

    fn punch_hole(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move { self.zero_sync(offset, len, false) })
    }

    fn zero_range(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move { self.zero_sync(offset, len, true) })
    }

    fn holes(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<(u64, u64)>> {
        // Memory stores every byte below the length.
        Box::pin(async move { Ok(super::holes_past_end(self.lock().len() as u64, offset, len)) })
    }

    fn allocated_bytes(&self) -> IoFuture<'_, u64> {
        self.len()
    }

    fn alignment(&self) -> usize {
        self.align
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::io::testsuite::{block_file_suite, Fixture};

    async fn fixture() -> Option<Fixture> {
        Some(Fixture::new(Arc::new(MemFile::new())))
    }

    block_file_suite!(fixture);

    async fn direct_fixture() -> Option<Fixture> {
        Some(Fixture::new(Arc::new(MemFile::new().with_alignment(4096))))
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn emulated_direct_io() {
        crate::io::testsuite::direct_io(direct_fixture().await).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn counters_and_snapshot() {
        let file = MemFile::from_bytes(vec![1, 2, 3]);
        file.write_at(IoBuf::from_vec(vec![9; 4]), 2).await.unwrap();
        file.write_at(IoBuf::from_vec(vec![7; 2]), 0).await.unwrap();
        file.flush().await.unwrap();
        assert_eq!(file.snapshot(), [7, 7, 9, 9, 9, 9]);
        assert_eq!(file.writes(), 2);
        assert_eq!(file.bytes_written(), 6);
        assert_eq!(file.flushes(), 1);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn absurd_ranges_are_errors_not_panics() {
        let file = MemFile::new();
        let err = file.zero_range(u64::MAX, 2).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let err = file
            .read_at(IoBuf::zeroed(2, 1), u64::MAX)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        // Reading far past EOF is fine: it is all zeros.
        let buf = file.read_at(IoBuf::zeroed(2, 1), 1 << 62).await.unwrap();
        assert_eq!(&buf[..], [0, 0]);
    }
}
