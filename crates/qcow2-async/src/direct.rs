//! Byte-granular I/O on top of an O_DIRECT file.
//!
//! O_DIRECT wants offsets, lengths and buffers aligned to the device block; the engine writes
//! 8-byte refcount table entries, 512-byte L1 sectors and unaligned guest data. This wrapper
//! turns unaligned requests into aligned ones (read-modify-write for writes).
//!
//! Read-modify-write is only safe when no other write touches the same block meanwhile. The
//! engine guarantees that without locks here: clusters are at least one block (checked at
//! open), so data and metadata never share a block; metadata is written under the metadata
//! lock; and an unaligned guest write holds its cluster's *exclusive* lease, which excludes
//! every other writer of that cluster.

use std::sync::Arc;

use crate::io::{BlockFile, IoBuf, IoFuture};

#[derive(Debug)]
pub(crate) struct AlignedFile {
    inner: Arc<dyn BlockFile>,
    align: u64,
}

impl AlignedFile {
    pub(crate) fn new(inner: Arc<dyn BlockFile>) -> Self {
        let align = inner.alignment().max(1) as u64;
        AlignedFile { inner, align }
    }

    fn span(&self, off: u64, len: u64) -> (u64, u64) {
        let start = off / self.align * self.align;
        let end = (off + len).div_ceil(self.align) * self.align;
        (start, end)
    }

    fn is_aligned(&self, off: u64, len: usize) -> bool {
        off % self.align == 0 && len as u64 % self.align == 0
    }

    /// Whether a vectored request can go to the kernel as it is: an aligned offset and every
    /// buffer aligned in address and length.
    fn all_aligned(&self, bufs: &[IoBuf], offset: u64) -> bool {
        offset % self.align == 0 && bufs.iter().all(|b| b.is_aligned_to(self.align as usize))
    }
}

impl BlockFile for AlignedFile {
    fn read_at(&self, mut buf: IoBuf, offset: u64) -> IoFuture<'_, IoBuf> {
        Box::pin(async move {
            let a = self.align as usize;
            if self.is_aligned(offset, buf.len()) && buf.as_ptr() as usize % a == 0 {
                return self.inner.read_at(buf, offset).await;
            }
            let (start, end) = self.span(offset, buf.len() as u64);
            let tmp = self
                .inner
                .read_at(IoBuf::zeroed((end - start) as usize, a), start)
                .await?;
            let at = (offset - start) as usize;
            let n = buf.len();
            buf.copy_from_slice(&tmp[at..at + n]);
            Ok(buf)
        })
    }

    fn write_at(&self, buf: IoBuf, offset: u64) -> IoFuture<'_, IoBuf> {
        Box::pin(async move {
            let a = self.align as usize;
            if self.is_aligned(offset, buf.len()) {
                if buf.as_ptr() as usize % a == 0 {
                    return self.inner.write_at(buf, offset).await;
                }
                self.inner
                    .write_at(IoBuf::from_slice(&buf, a), offset)
                    .await?;
                return Ok(buf);
            }
            let (start, end) = self.span(offset, buf.len() as u64);
            let mut tmp = self
                .inner
                .read_at(IoBuf::zeroed((end - start) as usize, a), start)
                .await?;
            let at = (offset - start) as usize;
            tmp[at..at + buf.len()].copy_from_slice(&buf);
            self.inner.write_at(tmp, start).await?;
            Ok(buf)
        })
    }

    fn read_vectored_at(&self, bufs: Vec<IoBuf>, offset: u64) -> IoFuture<'_, Vec<IoBuf>> {
        if self.all_aligned(&bufs, offset) {
            return self.inner.read_vectored_at(bufs, offset);
        }
        // One buffer at a time through this wrapper's `read_at`, which bounces as needed.
        Box::pin(async move {
            let mut out = Vec::with_capacity(bufs.len());
            let mut at = offset;
            for buf in bufs {
                let n = buf.len() as u64;
                out.push(self.read_at(buf, at).await?);
                at += n;
            }
            Ok(out)
        })
    }
    fn write_vectored_at(&self, bufs: Vec<IoBuf>, offset: u64) -> IoFuture<'_, Vec<IoBuf>> {
        if self.all_aligned(&bufs, offset) {
            return self.inner.write_vectored_at(bufs, offset);
        }
        Box::pin(async move {
            let mut out = Vec::with_capacity(bufs.len());
            let mut at = offset;
            for buf in bufs {
                let n = buf.len() as u64;
                out.push(self.write_at(buf, at).await?);
                at += n;
            }
            Ok(out)
        })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        self.inner.flush()
    }
    fn len(&self) -> IoFuture<'_, u64> {
        self.inner.len()
    }
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
    // Forwarded, not left to the trait's defaults: those would hide the file's holes from
    // `map` and misjudge metadata preallocation on O_DIRECT opens.
    fn holes(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<(u64, u64)>> {
        self.inner.holes(offset, len)
    }
    fn allocated_bytes(&self) -> IoFuture<'_, u64> {
        self.inner.allocated_bytes()
    }
    /// Not forwarded: making any offset, length and buffer acceptable is this view's job.
    fn alignment(&self) -> usize {
        1
    }
}
