//! A `tokio::io` view of the guest disk: [`Image::cursor`] gives a [`Cursor`] that is
//! `AsyncRead + AsyncSeek + AsyncWrite`, so that an image streams into an HTTP body, a hash
//! or `tokio::io::copy` without hand-written offset loops.
//!
//! One operation is in flight at a time, as with `tokio::fs::File`. Reads fetch ahead up
//! to [`READ_AHEAD`] bytes and serve later reads from what was fetched; writes are written
//! behind: `poll_write` takes the bytes and returns at once, and the next operation (or
//! `flush`) waits for the write and reports its error. `shutdown` flushes; it does not
//! close the image, which other handles may still use.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

use crate::error::Error;
use crate::image::Image;

/// Most bytes one guest read fetches for a cursor.
pub(crate) const READ_AHEAD: usize = 1 << 20;
/// Least bytes a read fetches, so that small reads of a stream do not each cost a request.
const MIN_FETCH: usize = 64 << 10;
/// Most bytes one `poll_write` takes.
const MAX_WRITE: usize = 1 << 20;

type Op<T> = Pin<Box<dyn Future<Output = Result<T, Error>> + Send>>;

enum State {
    Idle,
    Reading(Op<Vec<u8>>),
    Writing(Op<()>),
    Flushing(Op<()>),
}

/// A position in the guest disk of an [`Image`] with `tokio::io` traits; see
/// [`Image::cursor`].
///
/// Reading stops at the virtual size (end of file). Writing past it fails with
/// `InvalidInput`; writing to a read-only image fails with `PermissionDenied`. Dropping a
/// cursor with a write in flight lets the write finish (the engine completes every started
/// write, see `Image::write_at`) but nobody learns its result: call `flush` first.
pub struct Cursor {
    img: Image,
    /// The position the caller sees.
    pos: u64,
    /// Bytes fetched ahead: `ahead[taken..]` are the guest bytes at `pos`.
    ahead: Vec<u8>,
    taken: usize,
    state: State,
    /// Where a seek goes once `poll_complete` runs.
    seek_to: Option<u64>,
}

impl std::fmt::Debug for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cursor")
            .field("pos", &self.pos)
            .field("buffered", &(self.ahead.len() - self.taken))
            .finish_non_exhaustive()
    }
}

impl Image {
    /// A cursor over the guest disk at offset 0: `tokio::io::AsyncRead`, `AsyncSeek` and
    /// `AsyncWrite` (writes fail on read-only images). The cursor holds a handle of its own:
    /// like any handle it keeps the image open (and locked) until it is dropped.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use qcow2_async::{CreateOptions, Image, OpenOptions};
    /// use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let img = Image::create(dir.path().join("disk.qcow2"), &CreateOptions::new(1 << 20),
    ///                         &OpenOptions::default()).await?;
    /// let mut disk = img.cursor();
    /// disk.seek(std::io::SeekFrom::Start(4096)).await?;
    /// disk.write_all(b"hello").await?;
    /// disk.flush().await?;
    /// let mut whole = Vec::new();
    /// disk.rewind().await?;
    /// disk.read_to_end(&mut whole).await?;
    /// assert_eq!(whole.len(), 1 << 20);
    /// assert_eq!(&whole[4096..4101], b"hello");
    /// img.close().await?;
    /// # Ok::<(), Box<dyn std::error::Error>>(()) }).unwrap();
    /// ```
    pub fn cursor(&self) -> Cursor {
        Cursor {
            img: self.clone(),
            pos: 0,
            ahead: Vec::new(),
            taken: 0,
            state: State::Idle,
            seek_to: None,
        }
    }
}

impl Cursor {
    /// The position the next read or write uses.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Drives the operation in flight to its end; a write's or flush's error is returned
    /// here, to whichever call comes next.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.state {
            State::Idle => Poll::Ready(Ok(())),
            State::Reading(op) => {
                let got = ready!(op.as_mut().poll(cx));
                self.state = State::Idle;
                self.ahead = got.map_err(to_io)?;
                self.taken = 0;
                Poll::Ready(Ok(()))
            }
            State::Writing(op) | State::Flushing(op) => {
                let done = ready!(op.as_mut().poll(cx));
                self.state = State::Idle;
                Poll::Ready(done.map_err(to_io))
            }
        }
    }

    fn forget_ahead(&mut self) {
        self.ahead.clear();
        self.taken = 0;
    }
}

impl AsyncRead for Cursor {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            ready!(this.poll_idle(cx))?;
            let have = &this.ahead[this.taken..];
            if !have.is_empty() {
                let n = have.len().min(buf.remaining());
                buf.put_slice(&have[..n]);
                this.taken += n;
                this.pos += n as u64;
                return Poll::Ready(Ok(()));
            }
            let left = this.img.virtual_size().saturating_sub(this.pos);
            let want = buf.remaining().clamp(MIN_FETCH, READ_AHEAD) as u64;
            let n = want.min(left) as usize;
            if n == 0 || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            let (img, at) = (this.img.clone(), this.pos);
            this.state = State::Reading(Box::pin(async move {
                let mut v = vec![0u8; n];
                img.read_at(&mut v, at).await.map(|()| v)
            }));
        }
    }
}

impl AsyncWrite for Cursor {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_idle(cx))?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.img.is_read_only() {
            return Poll::Ready(Err(to_io(Error::ReadOnly)));
        }
        let left = this.img.virtual_size().saturating_sub(this.pos);
        if left == 0 {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "write past the end of the disk",
            )));
        }
        let n = buf.len().min(MAX_WRITE).min(left as usize);
        // Bytes fetched ahead may be the ones being replaced.
        this.forget_ahead();
        let (img, at, data) = (this.img.clone(), this.pos, buf[..n].to_vec());
        this.state = State::Writing(Box::pin(async move { img.write_at(&data, at).await }));
        this.pos += n as u64;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !matches!(this.state, State::Flushing(_)) {
            ready!(this.poll_idle(cx))?;
            if this.img.is_read_only() {
                return Poll::Ready(Ok(()));
            }
            let img = this.img.clone();
            this.state = State::Flushing(Box::pin(async move { img.flush().await }));
        }
        this.poll_idle(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_flush(cx)
    }
}

impl AsyncSeek for Cursor {
    fn start_seek(self: Pin<&mut Self>, position: io::SeekFrom) -> io::Result<()> {
        let this = self.get_mut();
        let size = this.img.virtual_size();
        let to = match position {
            io::SeekFrom::Start(n) => Some(n),
            io::SeekFrom::End(d) => size.checked_add_signed(d),
            io::SeekFrom::Current(d) => this.pos.checked_add_signed(d),
        };
        let to = to.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the disk",
            )
        })?;
        this.seek_to = Some(to);
        Ok(())
    }

    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        let this = self.get_mut();
        ready!(this.poll_idle(cx))?;
        if let Some(to) = this.seek_to.take() {
            // Keep what was fetched if the seek stays inside it (`Current(0)`, short skips).
            let start = this.pos - this.taken as u64;
            let end = start + this.ahead.len() as u64;
            if (start..=end).contains(&to) {
                this.taken = (to - start) as usize;
            } else {
                this.forget_ahead();
            }
            this.pos = to;
        }
        Poll::Ready(Ok(this.pos))
    }
}

/// The `io::Error` a `tokio::io` caller expects for an engine error, with the engine error
/// kept as its source.
fn to_io(e: Error) -> io::Error {
    let kind = match &e {
        Error::Io { source, .. } => source.kind(),
        Error::ReadOnly => io::ErrorKind::PermissionDenied,
        Error::OutOfRange { .. } | Error::InvalidArgument(_) => io::ErrorKind::InvalidInput,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e)
}
