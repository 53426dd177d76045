//! A portable backend: blocking positional syscalls on Tokio's blocking thread pool.
//!
//! This is the fallback when io_uring is unavailable (seccomp filters in containers, old
//! kernels, `kernel.io_uring_disabled`), and the io_uring backend also borrows it for the
//! metadata operations (length, truncation, fallocate) that are rare and not worth a ring
//! opcode each.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use super::buf::{check_aligned, checked_end};
use super::open::{open_std, FileOptions, DIRECT_ALIGNMENT};
use super::{BlockFile, IoBuf, IoFuture};

/// Largest chunk written when zeroes must be written out by hand (no FALLOC_FL_ZERO_RANGE nor
/// hole punching): big enough to be efficient, small enough not to hog memory.
const ZERO_CHUNK: usize = 1 << 20;

/// A file whose I/O runs as `pread`/`pwrite`/`fdatasync`/`fallocate` calls inside
/// [`tokio::task::spawn_blocking`], so the runtime's worker threads never block.
///
/// Concurrency is bounded by Tokio's blocking pool (512 threads by default), one thread per
/// outstanding request. A dropped future does not cancel its syscall: the blocking task owns
/// the buffer and frees it when the call returns.
///
/// Futures must be polled inside a Tokio runtime (any flavour).
#[derive(Debug, Clone)]
pub struct ThreadFile {
    file: Arc<File>,
    align: usize,
}

impl ThreadFile {
    /// Opens `path` with `opts` (`opts.aio` is ignored).
    pub fn open(path: &Path, opts: &FileOptions) -> io::Result<ThreadFile> {
        open_std(path, opts).map(ThreadFile::from_file)
    }

    /// Wraps an open file. If it was opened with O_DIRECT (detected from its status flags),
    /// reads and writes must be aligned to [`BlockFile::alignment`].
    pub fn from_file(file: File) -> ThreadFile {
        let align = if sys::is_direct(&file) {
            DIRECT_ALIGNMENT
        } else {
            1
        };
        ThreadFile {
            file: Arc::new(file),
            align,
        }
    }

    /// Shares an already opened file (the io_uring backend uses this for metadata operations).
    pub(crate) fn from_shared(file: Arc<File>, align: usize) -> ThreadFile {
        ThreadFile { file, align }
    }

    /// Runs `f` on the blocking pool with a handle to the file.
    async fn blocking<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&File, usize) -> io::Result<T> + Send + 'static,
    {
        let file = Arc::clone(&self.file);
        let align = self.align;
        tokio::task::spawn_blocking(move || f(&file, align))
            .await
            .map_err(|e| io::Error::other(format!("blocking I/O task failed: {e}")))?
    }
}

/// Fills `buf` from `offset`, zero-filling whatever lies past EOF.
pub(crate) fn read_full(file: &File, buf: &mut [u8], offset: u64, align: usize) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                // With O_DIRECT the kernel transfers whole blocks, so a short read that ends
                // off a block boundary can only mean EOF, and asking for the rest would be an
                // unaligned request (EINVAL).
                if done % align != 0 {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf[done..].fill(0);
    Ok(())
}

/// Writes all of `buf` at `offset`, continuing after short writes.
pub(crate) fn write_full(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.write_at(&buf[done..], offset + done as u64) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("pwrite at {} wrote nothing", offset + done as u64),
                ))
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn is_unsupported(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EOPNOTSUPP) || e.kind() == io::ErrorKind::Unsupported
}

/// Writes zeros over `[offset, offset + len)` in bounded chunks (aligned ones under O_DIRECT).
fn write_zeros(file: &File, offset: u64, len: u64, align: usize) -> io::Result<()> {
    if offset % align as u64 != 0 || len % align as u64 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "cannot write zeros over unaligned range {offset}+{len} of an O_DIRECT file \
                 (alignment {align})"
            ),
        ));
    }
    let chunk = IoBuf::zeroed(ZERO_CHUNK.min(len as usize), align);
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let n = chunk.len().min((end - pos) as usize);
        write_full(file, &chunk[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

/// Deallocates a range (reads as zeros, size kept). Without hole punching support the bytes
/// inside the file are overwritten with zeros instead, which keeps the read semantics.
pub(crate) fn punch_hole(file: &File, offset: u64, len: u64, align: usize) -> io::Result<()> {
    match sys::fallocate(file, sys::PUNCH_HOLE, offset, len) {
        Err(e) if is_unsupported(&e) => {
            tracing::debug!("punch_hole unsupported ({e}), writing zeros instead");
            let size = file.metadata()?.len();
            let end = checked_end(offset, len)?.min(size);
            if offset < end {
                write_zeros(file, offset, end - offset, align)?;
            }
            Ok(())
        }
        res => res,
    }
}

/// Makes a range read as zeros, growing the file if needed, trying in turn: ZERO_RANGE (keeps
/// the blocks allocated), a hole punch followed by a plain fallocate (re-allocates unwritten
/// extents, as qemu does), and finally writing zeros.
pub(crate) fn zero_range(file: &File, offset: u64, len: u64, align: usize) -> io::Result<()> {
    match sys::fallocate(file, sys::ZERO_RANGE, offset, len) {
        Err(e) if is_unsupported(&e) => {}
        res => return res,
    }
    match sys::fallocate(file, sys::PUNCH_HOLE, offset, len) {
        Ok(()) => return sys::fallocate(file, 0, offset, len),
        Err(e) if is_unsupported(&e) => {}
        Err(e) => return Err(e),
    }
    tracing::debug!("no fallocate support, zeroing {offset}+{len} by writing");
    write_zeros(file, offset, len, align)
}

/// Holes of `[offset, offset + len)` by `SEEK_DATA`/`SEEK_HOLE`, with everything past the
/// end of the file as one more. Where the file system cannot tell, the file has no holes.
pub(crate) fn holes(file: &File, offset: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
    let end = checked_end(offset, len)?;
    let size = file.metadata()?.len();
    let stored = end.min(size);
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut pos = offset;
    while pos < stored {
        let data = match sys::seek(file, pos, libc::SEEK_DATA) {
            Ok(d) => d,
            // No data at or after `pos`: the rest of the file is one hole.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => size,
            Err(e) if is_unsupported(&e) => {
                out.clear();
                break;
            }
            Err(e) => return Err(e),
        };
        if data > pos {
            out.push((pos, data.min(stored)));
        }
        if data >= stored {
            break;
        }
        pos = sys::seek(file, data, libc::SEEK_HOLE)?;
    }
    let tail = offset.max(size);
    if tail < end {
        match out.last_mut() {
            Some(last) if last.1 == tail => last.1 = end,
            _ => out.push((tail, end)),
        }
    }
    Ok(out)
}

/// Reserves space, growing the file if needed. Where fallocate is unsupported, growing the file
/// with `set_len` at least gives the same size (space is then not guaranteed).
pub(crate) fn allocate(file: &File, offset: u64, len: u64) -> io::Result<()> {
    match sys::fallocate(file, 0, offset, len) {
        Err(e) if is_unsupported(&e) => {
            let end = checked_end(offset, len)?;
            if file.metadata()?.len() < end {
                file.set_len(end)?;
            }
            Ok(())
        }
        res => res,
    }
}

impl BlockFile for ThreadFile {
    fn read_at(&self, mut buf: IoBuf, offset: u64) -> IoFuture<'_, IoBuf> {
        Box::pin(async move {
            check_aligned(self.align, &buf, offset)?;
            checked_end(offset, buf.len() as u64)?;
            if buf.is_empty() {
                return Ok(buf);
            }
            self.blocking(move |file, align| {
                read_full(file, &mut buf, offset, align)?;
                Ok(buf)
            })
            .await
        })
    }

    fn write_at(&self, buf: IoBuf, offset: u64) -> IoFuture<'_, IoBuf> {
        Box::pin(async move {
            check_aligned(self.align, &buf, offset)?;
            checked_end(offset, buf.len() as u64)?;
            if buf.is_empty() {
                return Ok(buf);
            }
            self.blocking(move |file, _| {
                write_full(file, &buf, offset)?;
                Ok(buf)
            })
            .await
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(self.blocking(|file, _| file.sync_data()))
    }

    fn len(&self) -> IoFuture<'_, u64> {
        Box::pin(self.blocking(|file, _| Ok(file.metadata()?.len())))
    }

    fn set_len(&self, len: u64) -> IoFuture<'_, ()> {
        Box::pin(self.blocking(move |file, _| file.set_len(len)))
    }

    fn allocate(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(self.blocking(move |file, _| allocate(file, offset, len)))
    }

    fn punch_hole(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(self.blocking(move |file, align| punch_hole(file, offset, len, align)))
    }

    fn zero_range(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(self.blocking(move |file, align| zero_range(file, offset, len, align)))
    }

    fn holes(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<(u64, u64)>> {
        Box::pin(self.blocking(move |file, _| holes(file, offset, len)))
    }

    fn allocated_bytes(&self) -> IoFuture<'_, u64> {
        use std::os::unix::fs::MetadataExt;
        Box::pin(self.blocking(|file, _| Ok(file.metadata()?.blocks() * 512)))
    }

    fn alignment(&self) -> usize {
        self.align
    }
}

/// The two raw syscalls std does not wrap. They live here rather than in a module of their own
/// because this backend is their main user.
pub(crate) mod sys {
    use std::fs::File;
    use std::io;
    use std::os::fd::AsRawFd;

    use crate::io::buf::checked_end;

    /// `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE` (the kernel requires both together).
    pub const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    /// `FALLOC_FL_ZERO_RANGE` without `KEEP_SIZE`, so that the file grows to cover the range.
    pub const ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE;

    /// `fallocate(2)`, retried on EINTR. An empty range is a no-op (the kernel would say
    /// EINVAL).
    pub fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        checked_end(offset, len)?;
        let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("fallocate range {offset}+{len} out of range"),
            ));
        };
        loop {
            // SAFETY: fallocate takes no pointers; `file` keeps the descriptor open for the
            // duration of the call.
            let ret = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, n) };
            if ret == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// `lseek(2)` for `SEEK_DATA` / `SEEK_HOLE` (the file position is not used by anything
    /// else: all other I/O is positional).
    pub fn seek(file: &File, offset: u64, whence: i32) -> io::Result<u64> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "seek offset out of range"))?;
        // SAFETY: lseek takes no pointers; `file` keeps the descriptor open for the call.
        let ret = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ret as u64)
    }

    /// Whether the descriptor has O_DIRECT set, which decides the alignment a backend enforces.
    pub fn is_direct(file: &File) -> bool {
        // SAFETY: F_GETFL takes no argument and only reads the descriptor's flags; `file`
        // keeps the descriptor open for the duration of the call.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        flags != -1 && flags & libc::O_DIRECT != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::testsuite::{block_file_suite, direct_file, Fixture};

    async fn fixture() -> Option<Fixture> {
        let file = tempfile::tempfile().expect("temporary file");
        Some(Fixture::new(Arc::new(ThreadFile::from_file(file))))
    }

    block_file_suite!(fixture);

    #[tokio::test(flavor = "multi_thread")]
    async fn direct_io() {
        let fixture = direct_file(|path, opts| {
            ThreadFile::open(path, opts).map(|f| Arc::new(f) as Arc<dyn BlockFile>)
        });
        crate::io::testsuite::direct_io(fixture).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn zero_fallback_writes_aligned_chunks() {
        let file = tempfile::tempfile().unwrap();
        write_full(&file, &[0xff; 3 << 20], 0).unwrap();
        write_zeros(&file, 4096, (2 << 20) + 4096, 1).unwrap();
        let mut back = vec![0xa5; 3 << 20];
        read_full(&file, &mut back, 0, 1).unwrap();
        for (i, &b) in back.iter().enumerate() {
            let zeroed = (4096..(2 << 20) + 8192).contains(&i);
            assert_eq!(b, if zeroed { 0 } else { 0xff }, "byte {i}");
        }
        let err = write_zeros(&file, 100, 4096, 4096).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn errors_are_returned_not_panics() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let opts = FileOptions {
            read_only: true,
            ..FileOptions::default()
        };
        let file = ThreadFile::open(tmp.path(), &opts).unwrap();
        assert!(file.write_at(IoBuf::zeroed(10, 1), 0).await.is_err());
        assert!(file.zero_range(0, 10).await.is_err());
        let err = file
            .read_at(IoBuf::zeroed(10, 1), u64::MAX - 5)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
