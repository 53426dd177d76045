//! Guest I/O with owned buffers: the zero-copy way in and out of the engine.
//!
//! The slice API (`read_at(&mut [u8])`, `write_at(&[u8])`) cannot hand the caller's memory
//! to the kernel: an io_uring request may outlive the future that issued it, so a borrowed
//! slice could be written after the caller got it back. The methods here take the buffer by
//! value ([`IoBuf`], which wraps `Vec<u8>`, `BytesMut`, `Bytes`, aligned memory or a range of
//! shared guest memory without copying) and return it when the I/O is done. When a request
//! maps to one contiguous run of host data (a request within one cluster whose data is
//! allocated, the common case), the buffer itself goes to the kernel: no bounce buffer, no
//! copy, no zero-fill, and with O_DIRECT no aligned copy either if the buffer is aligned.
//! Everything else (clusters that read as zeros or from the backing file, compressed or
//! encrypted clusters, allocating writes, requests spanning clusters) takes the slice path
//! on the buffer's memory, which is correct for every case and costs the copies it always did.

use std::ops::Range;
use std::sync::Mutex;

use qcow2_format::L2Entry;
use tracing::instrument;

use super::Image;
use crate::barrier::BarrierMode;
use crate::error::{Error, Result};
use crate::io::IoBuf;

impl Image {
    /// Reads `buf.len()` bytes at guest `offset` into `buf` and returns it.
    ///
    /// Cancellation: dropping the future is safe at any point; the buffer is then freed once
    /// the kernel is done with it.
    #[instrument(level = "debug", skip(self, buf), fields(len = buf.len()))]
    pub async fn read_buf(&self, buf: IoBuf, offset: u64) -> Result<IoBuf> {
        self.read_buf_noting(buf, offset, None).await
    }

    /// [`Image::read_buf`] that also says which parts of the range read as zeros without
    /// being stored anywhere: zero clusters and subclusters, and unallocated ones where the
    /// image has no backing file. The buffer holds those zeros too. Sorted, merged guest
    /// ranges; a read of allocated data finds none at no extra cost. (Ranges that come from
    /// the backing chain count as data, even where it reads zeros.)
    ///
    /// An NBD server uses it to send zeros as holes (`NBD_REPLY_TYPE_OFFSET_HOLE`).
    ///
    /// Cancellation: as for [`Image::read_buf`].
    #[instrument(level = "debug", skip(self, buf), fields(len = buf.len()))]
    pub async fn read_buf_sparse(
        &self,
        buf: IoBuf,
        offset: u64,
    ) -> Result<(IoBuf, Vec<Range<u64>>)> {
        let holes = HoleLog::default();
        let buf = self.read_buf_noting(buf, offset, Some(&holes)).await?;
        Ok((buf, holes.into_ranges()))
    }

    async fn read_buf_noting(
        &self,
        mut buf: IoBuf,
        offset: u64,
        holes: Option<&HoleLog>,
    ) -> Result<IoBuf> {
        if let Some(gc) = self.direct_candidate(offset, buf.len() as u64) {
            let _instant = self.inner.snap_lock.read().await;
            self.check_range(offset, buf.len() as u64)?;
            let _lease = self.inner.leases.shared(gc).await;
            let (entry, bm) = self.lookup(gc).await?;
            let inc = offset & (self.cluster_size() - 1);
            if let L2Entry::Normal { host, .. } = entry {
                return self
                    .inner
                    .data
                    .read_at(buf, host.0 + inc)
                    .await
                    .map_err(Error::io("reading guest data"));
            }
            self.read_mapped_noting(gc, entry, bm, inc, &mut buf, holes)
                .await?;
            return Ok(buf);
        }
        let mut buf = match self.read_run(buf, offset).await? {
            Ok(done) => return Ok(done),
            Err(buf) => buf,
        };
        self.read_at_noting(&mut buf, offset, holes).await?;
        Ok(buf)
    }

    /// A read over several clusters whose data lies in one contiguous run of the data file
    /// (an image written sequentially, a converted one) goes to the kernel as one request
    /// for the whole buffer, as QEMU merges contiguous host ranges; cluster by cluster it
    /// would be a request, a completion and a task per cluster. The shared leases are taken
    /// in ascending cluster order, as multi-cluster writers take their exclusive ones, so
    /// the two cannot deadlock. `Ok(Err(buf))`: not one allocated run (or not a candidate);
    /// the caller reads piece by piece.
    async fn read_run(&self, buf: IoBuf, offset: u64) -> Result<std::result::Result<IoBuf, IoBuf>> {
        /// Longer reads are rare and would hold many leases at once.
        const MAX_RUN: u64 = 256;
        let (len, cs) = (buf.len() as u64, self.cluster_size());
        let bits = self.inner.geo.cluster_bits();
        let candidate = len > 0
            && !self.inner.crypto.is_encrypted()
            && !self.inner.geo.extended_l2()
            && ((offset & (cs - 1)) + len).div_ceil(cs) <= MAX_RUN;
        if !candidate {
            return Ok(Err(buf));
        }
        let _instant = self.inner.snap_lock.read().await;
        self.check_range(offset, len)?;
        let (gc0, last) = (offset >> bits, (offset + len - 1) >> bits);
        let mut leases = Vec::with_capacity((last - gc0 + 1) as usize);
        let mut start = 0;
        for gc in gc0..=last {
            leases.push(self.inner.leases.shared(gc).await);
            match self.lookup(gc).await?.0 {
                L2Entry::Normal { host, .. } if gc == gc0 => start = host.0,
                L2Entry::Normal { host, .. } if host.0 == start + ((gc - gc0) << bits) => {}
                _ => return Ok(Err(buf)),
            }
        }
        self.inner
            .data
            .read_at(buf, start + (offset & (cs - 1)))
            .await
            .map(Ok)
            .map_err(Error::io("reading guest data"))
    }

    /// Writes all of `buf` at guest `offset` and returns the buffer.
    ///
    /// Cancellation: once polled, the write runs to completion even if this future is
    /// dropped (on the runtime, and [`Image::close`] waits for it); the buffer is then freed
    /// when it is done.
    #[instrument(level = "debug", skip(self, buf), fields(len = buf.len()))]
    pub async fn write_buf(&self, buf: IoBuf, offset: u64) -> Result<IoBuf> {
        self.to_completion(move |img| async move { img.write_buf_now(buf, offset).await })
            .await
    }

    /// [`Image::write_buf`] in place: dropping this future stops it where it is.
    pub(crate) async fn write_buf_now(&self, buf: IoBuf, offset: u64) -> Result<IoBuf> {
        let len = buf.len() as u64;
        let align = self.write_align();
        let inc = offset & (self.cluster_size() - 1);
        let aligned = align <= 1 || (inc % align == 0 && len % align == 0);
        if let Some(gc) = self.direct_candidate(offset, len).filter(|_| aligned) {
            let instant = self.inner.snap_lock.read().await;
            self.check_writable().await?;
            self.check_range(offset, len)?;
            let lease = self.inner.leases.shared(gc).await;
            let (entry, _) = self.lookup(gc).await?;
            if let L2Entry::Normal { host, copied: true } = entry {
                self.mark_bitmaps(offset, len).await?;
                if !self.inner.external {
                    self.check_data_target(host.0).await?;
                }
                let buf = self
                    .inner
                    .data
                    .write_at(buf, host.0 + inc)
                    .await
                    .map_err(Error::io("writing guest data"))?;
                drop(lease);
                drop(instant);
                if self.inner.barrier == BarrierMode::Full {
                    self.flush_now().await?;
                }
                return Ok(buf);
            }
        }
        if self.whole_clusters_run(offset, len) {
            return self.write_whole_clusters_buf(buf, offset).await;
        }
        self.write_at_now(&buf, offset).await?;
        Ok(buf)
    }

    /// Reads consecutive guest bytes from `offset` into the buffers in order (a scatter list,
    /// like `preadv`: e.g. the segments of a virtio request) and returns them.
    ///
    /// When the whole request maps to one run of host data, the list goes to the kernel as one
    /// vectored request; otherwise each buffer is read as by [`Image::read_buf`].
    ///
    /// Cancellation: as for [`Image::read_buf`].
    #[instrument(level = "debug", skip(self, bufs), fields(segments = bufs.len()))]
    pub async fn read_vectored(&self, mut bufs: Vec<IoBuf>, offset: u64) -> Result<Vec<IoBuf>> {
        let len = total_len(&bufs)?;
        if let Some(gc) = self.direct_candidate(offset, len) {
            let _instant = self.inner.snap_lock.read().await;
            self.check_range(offset, len)?;
            let _lease = self.inner.leases.shared(gc).await;
            let (entry, _) = self.lookup(gc).await?;
            if let L2Entry::Normal { host, .. } = entry {
                let inc = offset & (self.cluster_size() - 1);
                return self
                    .inner
                    .data
                    .read_vectored_at(bufs, host.0 + inc)
                    .await
                    .map_err(Error::io("reading guest data"));
            }
        }
        let mut at = offset;
        for buf in &mut bufs {
            let b = std::mem::replace(buf, IoBuf::from_vec(Vec::new()));
            let n = b.len() as u64;
            *buf = self.read_buf(b, at).await?;
            at += n;
        }
        Ok(bufs)
    }

    /// Writes the buffers in order as consecutive guest bytes from `offset` (a gather list,
    /// like `pwritev`) and returns them.
    ///
    /// When the whole request overwrites one run of allocated host data, the list goes to the
    /// kernel as one vectored request; otherwise each buffer is written as by
    /// [`Image::write_buf`].
    ///
    /// Cancellation: as for [`Image::write_buf`].
    #[instrument(level = "debug", skip(self, bufs), fields(segments = bufs.len()))]
    pub async fn write_vectored(&self, bufs: Vec<IoBuf>, offset: u64) -> Result<Vec<IoBuf>> {
        self.to_completion(move |img| async move { img.write_vectored_now(bufs, offset).await })
            .await
    }

    /// [`Image::write_vectored`] in place: dropping this future stops it where it is.
    pub(crate) async fn write_vectored_now(
        &self,
        mut bufs: Vec<IoBuf>,
        offset: u64,
    ) -> Result<Vec<IoBuf>> {
        let len = total_len(&bufs)?;
        let align = self.write_align();
        let inc = offset & (self.cluster_size() - 1);
        // Every segment must be aligned for O_DIRECT, not only the total.
        let aligned = align <= 1
            || (inc % align == 0
                && bufs
                    .iter()
                    .all(|b| b.is_aligned_to(align as usize) || b.is_empty()));
        if let Some(gc) = self.direct_candidate(offset, len).filter(|_| aligned) {
            let instant = self.inner.snap_lock.read().await;
            self.check_writable().await?;
            self.check_range(offset, len)?;
            let lease = self.inner.leases.shared(gc).await;
            let (entry, _) = self.lookup(gc).await?;
            if let L2Entry::Normal { host, copied: true } = entry {
                self.mark_bitmaps(offset, len).await?;
                if !self.inner.external {
                    self.check_data_target(host.0).await?;
                }
                let bufs = self
                    .inner
                    .data
                    .write_vectored_at(bufs, host.0 + inc)
                    .await
                    .map_err(Error::io("writing guest data"))?;
                drop(lease);
                drop(instant);
                if self.inner.barrier == BarrierMode::Full {
                    self.flush_now().await?;
                }
                return Ok(bufs);
            }
        }
        let mut at = offset;
        for buf in &mut bufs {
            let b = std::mem::replace(buf, IoBuf::from_vec(Vec::new()));
            let n = b.len() as u64;
            *buf = self.write_buf_now(b, at).await?;
            at += n;
        }
        Ok(bufs)
    }

    /// The guest cluster of a request that may go to the kernel as it is: non-empty, within
    /// one cluster, on an image whose data is neither encrypted nor tracked per subcluster.
    /// Whether it does then depends on the cluster's mapping.
    fn direct_candidate(&self, offset: u64, len: u64) -> Option<u64> {
        let cs = self.cluster_size();
        let inc = offset & (cs - 1);
        let simple = len > 0
            && inc + len <= cs
            && !self.inner.crypto.is_encrypted()
            && !self.inner.geo.extended_l2();
        simple.then(|| offset >> self.inner.geo.cluster_bits())
    }
}

/// The bytes in a scatter/gather list.
fn total_len(bufs: &[IoBuf]) -> Result<u64> {
    bufs.iter()
        .try_fold(0u64, |n, b| n.checked_add(b.len() as u64))
        .ok_or(Error::OutOfRange {
            offset: 0,
            len: u64::MAX,
            size: 0,
        })
}

/// Guest ranges a read filled with zeros without I/O, noted by the concurrent pieces of one
/// read (each piece notes its own ranges, in any order).
#[derive(Debug, Default)]
pub(crate) struct HoleLog(Mutex<Vec<Range<u64>>>);

impl HoleLog {
    pub(crate) fn note(&self, r: Range<u64>) {
        // Poisoning needs a panic while the lock is held; the push cannot panic.
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(r);
    }

    /// The noted ranges, sorted and with touching ones merged.
    pub(crate) fn into_ranges(self) -> Vec<Range<u64>> {
        let mut v = self.0.into_inner().unwrap_or_else(|p| p.into_inner());
        v.sort_by_key(|r| r.start);
        let mut out: Vec<Range<u64>> = Vec::with_capacity(v.len());
        for r in v {
            match out.last_mut() {
                Some(last) if last.end >= r.start => last.end = last.end.max(r.end),
                _ => out.push(r),
            }
        }
        out
    }
}
