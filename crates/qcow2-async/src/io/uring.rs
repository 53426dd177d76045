//! The io_uring backend: one ring per opened file, reaped by a task on the Tokio reactor (or,
//! as a fallback, by a thread of its own).
//!
//! # Design
//!
//! A request (read, write or fdatasync) takes a slot and pushes its SQE under the ring's
//! lock. Who then calls `io_uring_enter`, and who reaps, depends on the completion mode
//! ([`Completion`]):
//!
//! * **Reactor** (the default inside a Tokio runtime). The ring's descriptor is registered
//!   with the runtime's reactor (`AsyncFd`; the kernel reports it readable when the completion
//!   queue is not empty) and a task of that runtime reaps: the worker thread that epoll wakes
//!   completes the waiting tasks itself, so a completion costs no wake-up of another thread
//!   (the thread design before it paid one per request, see `BENCHMARKS.md`). Each task
//!   submits its own request and then reaps whatever has completed already, so a read served
//!   from the page cache is answered before its future first returns. While the reaper task
//!   is answering, arriving requests are left for it: after answering it yields until the
//!   tasks it woke have queued their next requests (a few scheduler passes at most), and then
//!   submits them all in one call. At queue depth 32 that is one `io_uring_enter`
//!   per round of completions, as QEMU's submission batching, instead of one per request
//!   (each also a doorbell exit on a virtual disk). Completions are only ever drained under
//!   the ring's lock, so the reaper task and
//!   inline reaping cannot both hold the completion queue. Should the runtime shut down while
//!   the file is still in use, the task's drop hands the ring to a thread (below).
//! * **Thread**. A thread of the ring's own sleeps in `io_uring_enter(GETEVENTS)` without the
//!   lock, reaps every completion when it wakes, continues short transfers, starts queued
//!   requests, submits, and answers callers outside the lock. A lone request is submitted by
//!   its own task; one that joins others in flight wakes the thread (through an eventfd the
//!   ring polls), which submits everything that arrived meanwhile in one call.
//!
//! Callers are answered through `tokio::sync::oneshot` channels. At the in-flight cap a
//! request waits in a queue that the reaper drains as room frees up.
//!
//! The ring owns every in-flight request, including its [`IoBuf`], in a slot table indexed by
//! `user_data`. Only a completion removes an entry, so a caller dropping its future merely
//! drops the receiving end of the oneshot: the kernel keeps writing into memory that is still
//! owned, and the buffer is freed when its completion arrives. For the same reason the reaper
//! outlives the last [`UringFile`] handle until everything in flight has completed; the last
//! handle tells it so.
//!
//! Short transfers (signals, EOF, transfers over the per-SQE size limit) are continued by
//! resubmitting the remainder; a read reaching EOF zero-fills the rest of the buffer.
//!
//! A ring per file keeps the design simple and isolates files from each other; the cost is one
//! small ring (256 entries, a few pages) per open image, and a thread in the fallback mode.
//!
//! Metadata operations (length, truncation, fallocate) are rare and not latency critical; they
//! go through [`ThreadFile`]'s blocking pool rather than the ring.

use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use io_uring::{opcode, squeue, types, IoUring, Probe};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{oneshot, Notify};

use super::buf::{check_aligned, checked_end};
use super::open::{open_std, Completion, FileOptions, RingOptions, DIRECT_ALIGNMENT};
use super::threads::sys::is_direct;
use super::{BlockFile, IoBuf, IoFuture, ThreadFile};

/// Submission queue size; the completion queue gets twice as many entries.
const RING_ENTRIES: u32 = 256;

/// `user_data` of the eventfd poll; request slots use small indices.
const WAKE: u64 = u64::MAX;

/// Largest transfer per SQE (an SQE length is a `u32`); larger buffers are split like short
/// transfers. A multiple of any O_DIRECT alignment. Small in tests so that the continuation
/// path runs all the time.
#[cfg(not(test))]
const MAX_CHUNK: usize = 1 << 30;
#[cfg(test)]
const MAX_CHUNK: usize = 64 << 10;

/// A file driven by its own io_uring ring.
///
/// Reads, writes and flushes go through the ring; `len`, `set_len`, `allocate`, `punch_hole`
/// and `zero_range` use the blocking pool (see [`ThreadFile`]). Clones share the ring; the
/// completion thread exits once the last clone is dropped and everything in flight has
/// completed.
///
/// Futures are runtime-agnostic (they only await a oneshot), except for the blocking-pool
/// operations, which need a Tokio runtime.
#[derive(Clone)]
pub struct UringFile {
    handle: Arc<Handle>,
    /// Shares the descriptor; used for the operations that bypass the ring.
    meta: ThreadFile,
    align: usize,
}

/// What the handles share. Dropping it (with the last `UringFile` clone) tells the
/// completion thread to finish up.
struct Handle {
    ring: Arc<Ring>,
}

/// Counters shared with the completion thread. The thread holds a reference until it exits,
/// which tests use to observe the exit.
#[derive(Debug, Default)]
struct Stats {
    /// Requests accepted and not yet answered, including abandoned ones.
    outstanding: AtomicUsize,
}

/// The ring and everything about its requests.
struct Ring {
    uring: IoUring,
    /// Slot table, queue and flags. Whoever holds this lock may use the submission queue;
    /// the completion queue belongs to the completion thread alone.
    core: Mutex<Core>,
    /// Keeps the descriptor open for as long as requests may reference it.
    file: Arc<File>,
    /// Polled by the ring so that the last handle's drop wakes the completion thread.
    wake_fd: OwnedFd,
    stats: Arc<Stats>,
    align: usize,
    /// Cap on requests in the kernel so that completions can never overflow the CQ.
    max_in_flight: usize,
    /// The file is registered with the ring at index 0 (`IORING_REGISTER_FILES`).
    fixed_file: bool,
    /// Wakes the reaper task without a completion: the last handle is gone, or a task's own
    /// submission failed. The thread uses `wake_fd`.
    nudge: Notify,
    /// Reads try the page cache first (`preadv2(RWF_NOWAIT)`); see [`Ring::try_inline`].
    nowait_reads: bool,
    /// The file lives on a memory file system; see [`Ring::try_inline`].
    memory_backed: bool,
    /// Per thread shard, the file opened again for the inline path: descriptors of one open
    /// file share its reference count, which every `pread` of a multi-threaded process bumps,
    /// so one descriptor for all cores made that cache line the limit (as fio, which opens
    /// the file per job, shows it need not be). Empty until first used; `None` inside when
    /// reopening failed (the ring's descriptor serves then).
    inline_fds: Box<[std::sync::OnceLock<Option<OwnedFd>>]>,
    /// Page-cache attempts that failed in a row; many mean the data is not cached, and the
    /// attempts are then mostly skipped.
    nowait_misses: AtomicUsize,
    /// Live [`RingClaim`]s: threads that watch the descriptor and reap it themselves. While
    /// there are any, the reaper task keeps the descriptor out of the reactor, so that a
    /// completion wakes the claimant's thread only, not a runtime worker as well (measured:
    /// the second wake-up cost a third of a vhost-user QD1 request's rate, `BENCHMARKS.md`).
    /// Invariant: a claimant reaps whenever the descriptor is readable, until it drops its
    /// claim; the drop returns the descriptor to the reactor.
    claims: AtomicUsize,
}

/// After this many misses in a row, only every [`NOWAIT_PROBE`]th read tries the page cache.
const NOWAIT_MISSES: usize = 8;
const NOWAIT_PROBE: usize = 64;

/// Who reaps the completion queue now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reaper {
    /// A task on the Tokio reactor; submitters reap inline too, under the lock.
    Task,
    /// The ring's own thread.
    Thread,
}

struct Core {
    /// In-flight requests by `user_data`; `None` entries are listed in `free`.
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    in_flight: usize,
    /// Requests waiting for room under `max_in_flight`.
    queued: VecDeque<Op>,
    /// The eventfd poll is in the kernel (thread mode).
    wake_armed: bool,
    /// The reaper is awake and will submit whatever is queued before it sleeps again, so a
    /// task need not make its own `io_uring_enter` call: requests arriving while completions
    /// are being handled go to the kernel together.
    reaper_awake: bool,
    /// Who reaps.
    reaper: Reaper,
    /// Requests queued since `reaper_awake` was last cleared, left for the reaper to submit.
    left_for_reaper: usize,
    /// All handles are gone: finish what is in flight, then exit.
    disconnected: bool,
    /// The completion thread has stopped (why, when it failed): nothing is accepted.
    stopped: Option<Option<String>>,
}

/// A request and where its answer goes. Buffers move with the request, so whoever holds an
/// `Op` owns the memory the kernel may be using.
enum Op {
    Read {
        buf: IoBuf,
        offset: u64,
        reply: oneshot::Sender<io::Result<IoBuf>>,
    },
    Write {
        buf: IoBuf,
        offset: u64,
        reply: oneshot::Sender<io::Result<IoBuf>>,
    },
    /// A vectored read or write (`IORING_OP_READV`/`WRITEV`).
    Vectored {
        bufs: Vec<IoBuf>,
        /// The iovecs of the SQE in flight, rebuilt (for the remainder) before each push.
        iov: Iovecs,
        offset: u64,
        write: bool,
        reply: oneshot::Sender<io::Result<Vec<IoBuf>>>,
    },
    Fsync {
        reply: oneshot::Sender<io::Result<()>>,
    },
}

/// The iovec array of a vectored request: pointers into the request's own buffers.
#[derive(Default)]
struct Iovecs(Vec<libc::iovec>);

// SAFETY: the pointers refer to the `IoBuf`s of the same `Op`, which are `Send`; the array is
// only read by the kernel and rebuilt by whoever holds the ring's lock.
unsafe impl Send for Iovecs {}

/// Most iovecs per SQE (the kernel's `UIO_MAXIOV`); longer lists continue like short
/// transfers.
const MAX_IOVECS: usize = 1024;

impl Op {
    /// The SQE for the part of the request from `done` on, against `fd` (a descriptor or the
    /// registered file). Pointers into the buffer: see the caller's safety argument.
    fn sqe(&mut self, fd: impl FileTarget, done: usize) -> squeue::Entry {
        match self {
            Op::Read { buf, offset, .. } => {
                let n = (buf.len() - done).min(MAX_CHUNK) as u32;
                fd.read(
                    buf.as_mut_ptr().wrapping_add(done),
                    n,
                    *offset + done as u64,
                )
            }
            Op::Write { buf, offset, .. } => {
                let n = (buf.len() - done).min(MAX_CHUNK) as u32;
                fd.write(buf.as_ptr().wrapping_add(done), n, *offset + done as u64)
            }
            Op::Vectored {
                bufs,
                iov,
                offset,
                write,
                ..
            } => {
                iov.0.clear();
                let mut skip = done;
                let mut total = 0usize;
                for buf in bufs.iter_mut() {
                    if skip >= buf.len() {
                        skip -= buf.len();
                        continue;
                    }
                    if iov.0.len() == MAX_IOVECS || total >= MAX_CHUNK {
                        break;
                    }
                    let n = (buf.len() - skip).min(MAX_CHUNK - total);
                    let base = if *write {
                        buf.as_ptr().wrapping_add(skip) as *mut u8
                    } else {
                        buf.as_mut_ptr().wrapping_add(skip)
                    };
                    iov.0.push(libc::iovec {
                        iov_base: base.cast(),
                        iov_len: n,
                    });
                    total += n;
                    skip = 0;
                }
                let at = *offset + done as u64;
                if *write {
                    fd.writev(iov.0.as_ptr(), iov.0.len() as u32, at)
                } else {
                    fd.readv(iov.0.as_ptr(), iov.0.len() as u32, at)
                }
            }
            Op::Fsync { .. } => fd.fsync(),
        }
    }

    /// Zero-fills a read's buffers from byte `from` on (the part past EOF).
    fn zero_from(&mut self, from: usize) {
        match self {
            Op::Read { buf, .. } => buf[from..].fill(0),
            Op::Vectored { bufs, .. } => {
                let mut skip = from;
                for buf in bufs {
                    let n = buf.len();
                    if skip < n {
                        buf[skip..].fill(0);
                    }
                    skip = skip.saturating_sub(n);
                }
            }
            Op::Write { .. } | Op::Fsync { .. } => {}
        }
    }

    /// Bytes the request transfers in all.
    fn len(&self) -> usize {
        match self {
            Op::Read { buf, .. } | Op::Write { buf, .. } => buf.len(),
            Op::Vectored { bufs, .. } => bufs.iter().map(|b| b.len()).sum(),
            Op::Fsync { .. } => 0,
        }
    }

    /// Answers the caller. If the caller has gone away, the buffer is dropped (freed) here.
    fn finish(self, result: io::Result<()>) {
        match self {
            Op::Read { buf, reply, .. } | Op::Write { buf, reply, .. } => {
                let _ = reply.send(result.map(|()| buf));
            }
            Op::Vectored { bufs, reply, .. } => {
                let _ = reply.send(result.map(|()| bufs));
            }
            Op::Fsync { reply } => {
                let _ = reply.send(result);
            }
        }
    }

    /// Answers with an error while deliberately leaking the buffer: used only when the ring is
    /// torn down with this request possibly still in the kernel's hands, where freeing the
    /// memory could let the kernel write into someone else's allocation.
    fn fail_leaking_buffer(self, err: io::Error) {
        match self {
            Op::Read { buf, reply, .. } | Op::Write { buf, reply, .. } => {
                std::mem::forget(buf);
                let _ = reply.send(Err(err));
            }
            Op::Vectored { bufs, reply, .. } => {
                std::mem::forget(bufs);
                let _ = reply.send(Err(err));
            }
            Op::Fsync { reply } => {
                let _ = reply.send(Err(err));
            }
        }
    }
}

/// A plain descriptor or the registered file: the io-uring crate's opcode builders take
/// either, through a sealed trait of their own, hence this small shim.
trait FileTarget: Copy {
    fn read(self, ptr: *mut u8, len: u32, offset: u64) -> squeue::Entry;
    fn write(self, ptr: *const u8, len: u32, offset: u64) -> squeue::Entry;
    fn readv(self, iov: *const libc::iovec, n: u32, offset: u64) -> squeue::Entry;
    fn writev(self, iov: *const libc::iovec, n: u32, offset: u64) -> squeue::Entry;
    fn fsync(self) -> squeue::Entry;
}

macro_rules! file_target {
    ($ty:ty) => {
        impl FileTarget for $ty {
            fn read(self, ptr: *mut u8, len: u32, offset: u64) -> squeue::Entry {
                opcode::Read::new(self, ptr, len).offset(offset).build()
            }
            fn write(self, ptr: *const u8, len: u32, offset: u64) -> squeue::Entry {
                opcode::Write::new(self, ptr, len).offset(offset).build()
            }
            fn readv(self, iov: *const libc::iovec, n: u32, offset: u64) -> squeue::Entry {
                opcode::Readv::new(self, iov, n).offset(offset).build()
            }
            fn writev(self, iov: *const libc::iovec, n: u32, offset: u64) -> squeue::Entry {
                opcode::Writev::new(self, iov, n).offset(offset).build()
            }
            fn fsync(self) -> squeue::Entry {
                opcode::Fsync::new(self)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build()
            }
        }
    };
}
file_target!(types::Fd);
file_target!(types::Fixed);

fn thread_gone() -> io::Error {
    io::Error::other("the io_uring thread has stopped")
}

impl UringFile {
    /// Opens `path` with `opts` (`opts.aio` is ignored) on a new ring set up as
    /// `opts.ring` says.
    ///
    /// Fails (rather than falling back) if io_uring is unavailable; [`super::open_file`] is the
    /// entry point that falls back to threads.
    pub fn open(path: &Path, opts: &FileOptions) -> io::Result<UringFile> {
        UringFile::with_options(open_std(path, opts)?, &opts.ring)
    }

    /// [`UringFile::with_options`] with the default ring options.
    pub fn from_file(file: File) -> io::Result<UringFile> {
        UringFile::with_options(file, &RingOptions::default())
    }

    /// Starts a ring for an open file, reaped as `opts.completion` says. If the file was
    /// opened with O_DIRECT (detected from its status flags), reads and writes must be aligned
    /// to [`BlockFile::alignment`].
    ///
    /// Returns an error, never panics, when io_uring is unavailable: ENOSYS (old kernel or
    /// seccomp), EPERM (seccomp, `kernel.io_uring_disabled`), ENOMEM (memlock limit on kernels
    /// before 5.12), `Unsupported` when the kernel lacks an opcode this backend needs (< 5.6),
    /// or when [`Completion::Reactor`] was asked for outside a runtime with an I/O driver.
    pub fn with_options(file: File, opts: &RingOptions) -> io::Result<UringFile> {
        #[cfg(test)]
        if tests::SIMULATE_SECCOMP.get() {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        let mut builder = IoUring::builder();
        if let Some(idle) = opts.sqpoll_idle_ms {
            builder.setup_sqpoll(idle);
        }
        if opts.coop_taskrun {
            // COOP_TASKRUN came with Linux 5.19; an older kernel refuses the setup with
            // EINVAL, which the caller sees (and `open_file` falls back from).
            builder.setup_coop_taskrun().setup_taskrun_flag();
        }
        let uring = builder.build(RING_ENTRIES)?;
        check_opcodes(&uring)?;
        if opts.register_file {
            uring.submitter().register_files(&[file.as_raw_fd()])?;
        }
        let align = if is_direct(&file) {
            DIRECT_ALIGNMENT
        } else {
            1
        };
        let file = Arc::new(file);
        let max_in_flight = (uring.params().sq_entries() as usize)
            .min(uring.params().cq_entries() as usize)
            // Room for the eventfd poll.
            .saturating_sub(2)
            .max(1);
        let reactor = match opts.completion {
            Completion::Thread => None,
            Completion::Auto => reactor_handle(),
            Completion::Reactor => Some(reactor_handle().ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::Unsupported,
                    "io_uring completions on the reactor need a Tokio runtime with its I/O driver",
                )
            })?),
        };
        let ring = Arc::new(Ring {
            uring,
            core: Mutex::new(Core {
                slots: Vec::new(),
                free: Vec::new(),
                in_flight: 0,
                queued: VecDeque::new(),
                wake_armed: false,
                reaper_awake: false,
                reaper: if reactor.is_some() {
                    Reaper::Task
                } else {
                    Reaper::Thread
                },
                left_for_reaper: 0,
                disconnected: false,
                stopped: None,
            }),
            file: Arc::clone(&file),
            wake_fd: new_eventfd()?,
            stats: Arc::new(Stats::default()),
            align,
            max_in_flight,
            fixed_file: opts.register_file,
            nudge: Notify::new(),
            nowait_reads: opts.nowait_reads && align == 1,
            memory_backed: opts.nowait_reads && align == 1 && is_memory_backed(&file),
            inline_fds: (0..crate::sharded::SHARDS)
                .map(|_| std::sync::OnceLock::new())
                .collect(),
            nowait_misses: AtomicUsize::new(0),
            claims: AtomicUsize::new(0),
        });
        match reactor {
            Some(runtime) => {
                let fd = {
                    // Registration needs the runtime's context.
                    let _enter = runtime.enter();
                    // SAFETY: `RingFd` keeps the ring, which owns the descriptor, alive for as
                    // long as the `AsyncFd` exists, and always returns that one descriptor.
                    unsafe {
                        AsyncFd::register_with_interest(
                            RingFd(Arc::clone(&ring)),
                            Interest::READABLE,
                        )
                    }
                    .map_err(io::Error::from)?
                };
                let guard = HandOver {
                    ring: Arc::clone(&ring),
                    defused: false,
                };
                runtime.spawn(guard.reap(fd));
            }
            None => {
                {
                    let mut core = ring.lock();
                    ring.arm_wake(&mut core)?;
                }
                ring.submit()?;
                spawn_thread(Arc::clone(&ring))?;
            }
        }
        Ok(UringFile {
            handle: Arc::new(Handle { ring }),
            meta: ThreadFile::from_shared(file, align),
            align,
        })
    }

    /// Requests handed to the ring and not completed yet, including those whose futures
    /// were dropped (their buffers are still owned by the ring).
    pub fn in_flight(&self) -> usize {
        self.handle.ring.stats.outstanding.load(Ordering::Acquire)
    }

    fn send(&self, op: Op) -> io::Result<()> {
        self.handle.ring.accept(op)
    }

    async fn transfer(&self, mut buf: IoBuf, offset: u64, write: bool) -> io::Result<IoBuf> {
        check_aligned(self.align, &buf, offset)?;
        checked_end(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(buf);
        }
        if self.handle.ring.try_inline(&mut buf, offset, write) {
            return Ok(buf);
        }
        let (reply, rx) = oneshot::channel();
        self.send(if write {
            Op::Write { buf, offset, reply }
        } else {
            Op::Read { buf, offset, reply }
        })?;
        rx.await.map_err(|_| thread_gone())?
    }

    async fn transfer_vectored(
        &self,
        bufs: Vec<IoBuf>,
        offset: u64,
        write: bool,
    ) -> io::Result<Vec<IoBuf>> {
        let mut len = 0u64;
        let mut at = offset;
        for buf in &bufs {
            // Each segment must be aligned for O_DIRECT, in address and length.
            check_aligned(self.align, buf, at)?;
            len += buf.len() as u64;
            at = checked_end(at, buf.len() as u64)?;
        }
        if len == 0 {
            return Ok(bufs);
        }
        let (reply, rx) = oneshot::channel();
        self.send(Op::Vectored {
            bufs,
            iov: Iovecs::default(),
            offset,
            write,
            reply,
        })?;
        rx.await.map_err(|_| thread_gone())?
    }

    #[cfg(test)]
    fn stats_weak(&self) -> std::sync::Weak<Stats> {
        Arc::downgrade(&self.handle.ring.stats)
    }
}

impl fmt::Debug for UringFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UringFile")
            .field("file", &self.meta)
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // Mark first, then wake the reaper so that it observes the disconnection.
        self.ring.lock().disconnected = true;
        self.ring.nudge.notify_one();
        wake(&self.ring.wake_fd);
    }
}

/// The runtime whose reactor should watch the ring, if the caller runs in one with an I/O
/// driver.
fn reactor_handle() -> Option<tokio::runtime::Handle> {
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    // Tokio offers no query for "is the I/O driver enabled" and panics instead when it is not;
    // probing with a descriptor that is never used (an eventfd) keeps that panic out of the
    // caller's way.
    let probe = new_eventfd().ok()?;
    let enabled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _enter = runtime.enter();
        // SAFETY: the `AsyncFd` owns the eventfd, which therefore stays open (and the same) for
        // the `AsyncFd`'s whole life.
        unsafe { AsyncFd::register_with_interest(probe, Interest::READABLE) }.is_ok()
    }))
    .unwrap_or(false);
    enabled.then_some(runtime)
}

/// The ring's descriptor as the reactor sees it: holding the ring keeps the descriptor open.
struct RingFd(Arc<Ring>);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.uring.as_raw_fd()
    }
}

/// Whether `file` lives on tmpfs or ramfs, where no request can wait for a device.
fn is_memory_backed(file: &File) -> bool {
    const TMPFS_MAGIC: libc::c_long = 0x0102_1994;
    const RAMFS_MAGIC: libc::c_long = 0x8584_58f6;
    // SAFETY: `statfs` is plain data, for which all zeros is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a live, writable `statfs`; the descriptor is open for the call.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return false;
    }
    #[allow(clippy::unnecessary_cast)] // `f_type`'s integer type differs between targets.
    let kind = st.f_type as libc::c_long;
    kind == TMPFS_MAGIC || kind == RAMFS_MAGIC
}

/// Opens the file behind `file` again, with the same access mode: a new open file of the same
/// inode (through `/proc/self/fd`, which works for unlinked files too). `None` if that fails.
fn reopen(file: &File) -> Option<OwnedFd> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL takes no pointer; the descriptor is open.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return None;
    }
    let path = std::ffi::CString::new(format!("/proc/self/fd/{fd}")).ok()?;
    // SAFETY: `path` is a NUL-terminated string that outlives the call.
    let new = unsafe { libc::open(path.as_ptr(), (flags & libc::O_ACCMODE) | libc::O_CLOEXEC) };
    if new < 0 {
        return None;
    }
    // SAFETY: `new` was just opened and is owned by nothing else.
    Some(unsafe { OwnedFd::from_raw_fd(new) })
}

fn spawn_thread(ring: Arc<Ring>) -> io::Result<()> {
    std::thread::Builder::new()
        .name("qcow2-io-uring".into())
        .spawn(move || ring.run())
        .map(drop)
}

/// The reaper task's hold on the ring. If the task is dropped before it finishes (its runtime
/// shut down, or it panicked) while the file may still be in use, the ring is handed to a
/// thread so that in-flight and later requests are still answered.
struct HandOver {
    ring: Arc<Ring>,
    defused: bool,
}

impl HandOver {
    async fn reap(mut self, fd: AsyncFd<RingFd>) {
        // The loop deregisters the descriptor (dropping `fd`) before it returns.
        let result = self.ring.task_loop(Some(fd)).await;
        self.defused = true;
        match result {
            Ok(Exit::Done) => tracing::debug!("io_uring reaper task exiting"),
            Ok(Exit::Unwatchable(e)) => {
                tracing::warn!("io_uring ring cannot rejoin the reactor ({e}); a thread reaps it");
                self.ring.hand_to_thread();
            }
            Err(e) => {
                tracing::error!("io_uring reaper failed, failing all its requests: {e}");
                self.ring.shut_down(Some(e.to_string()));
            }
        }
    }
}

impl Drop for HandOver {
    fn drop(&mut self) {
        if !self.defused {
            self.ring.hand_to_thread();
        }
    }
}

/// Why the reaper task's loop ended without an error.
enum Exit {
    /// Every handle is gone and nothing is in flight.
    Done,
    /// The descriptor could not be registered with the reactor again after the last claim
    /// went: a thread must reap from now on.
    Unwatchable(io::Error),
}

impl BlockFile for UringFile {
    fn read_at(&self, buf: IoBuf, offset: u64) -> IoFuture<'_, IoBuf> {
        Box::pin(self.transfer(buf, offset, false))
    }

    fn write_at(&self, buf: IoBuf, offset: u64) -> IoFuture<'_, IoBuf> {
        Box::pin(self.transfer(buf, offset, true))
    }

    fn read_vectored_at(&self, bufs: Vec<IoBuf>, offset: u64) -> IoFuture<'_, Vec<IoBuf>> {
        Box::pin(self.transfer_vectored(bufs, offset, false))
    }

    fn write_vectored_at(&self, bufs: Vec<IoBuf>, offset: u64) -> IoFuture<'_, Vec<IoBuf>> {
        Box::pin(self.transfer_vectored(bufs, offset, true))
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let (reply, rx) = oneshot::channel();
            self.send(Op::Fsync { reply })?;
            rx.await.map_err(|_| thread_gone())?
        })
    }

    fn len(&self) -> IoFuture<'_, u64> {
        self.meta.len()
    }

    fn set_len(&self, len: u64) -> IoFuture<'_, ()> {
        self.meta.set_len(len)
    }

    fn allocate(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.meta.allocate(offset, len)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.meta.punch_hole(offset, len)
    }

    fn zero_range(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.meta.zero_range(offset, len)
    }

    fn holes(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<(u64, u64)>> {
        self.meta.holes(offset, len)
    }

    fn allocated_bytes(&self) -> IoFuture<'_, u64> {
        self.meta.allocated_bytes()
    }

    fn alignment(&self) -> usize {
        self.align
    }
}

/// Fails early on kernels that have io_uring but not the opcodes used here, instead of failing
/// every request with EINVAL later.
fn check_opcodes(ring: &IoUring) -> io::Result<()> {
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe).map_err(|e| {
        io::Error::new(
            io::ErrorKind::Unsupported,
            format!("io_uring opcode probe failed (kernel older than 5.6?): {e}"),
        )
    })?;
    let needed = [
        (opcode::Read::CODE, "READ"),
        (opcode::Write::CODE, "WRITE"),
        (opcode::Readv::CODE, "READV"),
        (opcode::Writev::CODE, "WRITEV"),
        (opcode::Fsync::CODE, "FSYNC"),
        (opcode::PollAdd::CODE, "POLL_ADD"),
    ];
    for (code, name) in needed {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("io_uring does not support IORING_OP_{name}"),
            ));
        }
    }
    Ok(())
}

fn new_eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a descriptor that was just created and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Bumps the eventfd the ring thread polls. Never blocks: the descriptor is non-blocking and
/// the counter cannot realistically reach its 2^64 - 2 limit.
fn wake(fd: &OwnedFd) {
    let one: u64 = 1;
    loop {
        // SAFETY: writes the 8 bytes of a live local; `fd` keeps the eventfd open.
        let ret = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        if ret == 8 {
            return;
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => continue,
            // A saturated counter already guarantees a wake-up.
            io::ErrorKind::WouldBlock => return,
            _ => {
                tracing::error!("cannot wake the io_uring thread: {err}");
                return;
            }
        }
    }
}

/// A request the kernel is working on, with how much of its buffer is done.
struct InFlight {
    op: Op,
    done: usize,
}

enum Progress {
    /// Submit the rest (or retry after EINTR/EAGAIN).
    Continue,
    Done(io::Result<()>),
}

impl InFlight {
    /// Accounts for a completion with result `res` (bytes or `-errno`).
    fn advance(&mut self, res: i32, align: usize) -> Progress {
        if res < 0 {
            let errno = -res;
            if errno == libc::EINTR || errno == libc::EAGAIN {
                return Progress::Continue;
            }
            return Progress::Done(Err(io::Error::from_raw_os_error(errno)));
        }
        let n = res as usize;
        let total = self.op.len();
        match &mut self.op {
            Op::Read { .. } | Op::Vectored { write: false, .. } => {
                self.done += n;
                // EOF: nothing more to read, or (O_DIRECT) a short read ending off a block
                // boundary, which only EOF causes and which could not be continued anyway.
                let eof = n == 0 || self.done % align != 0;
                if self.done >= total {
                    Progress::Done(Ok(()))
                } else if eof {
                    self.op.zero_from(self.done);
                    Progress::Done(Ok(()))
                } else {
                    Progress::Continue
                }
            }
            Op::Write { offset, .. } | Op::Vectored { offset, .. } => {
                if n == 0 {
                    return Progress::Done(Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!("write at {} wrote nothing", *offset + self.done as u64),
                    )));
                }
                self.done += n;
                if self.done >= total {
                    Progress::Done(Ok(()))
                } else {
                    Progress::Continue
                }
            }
            Op::Fsync { .. } => Progress::Done(Ok(())),
        }
    }
}

/// Below this many requests in flight a task submits its own request; from it on, the
/// completion thread batches submissions (see `Ring::accept`).
const INLINE_DEPTH: usize = 2;

/// Who hands a newly queued SQE to the kernel.
enum Then {
    /// The completion thread is awake and will.
    Nothing,
    /// The task, right away.
    Submit,
    /// The completion thread, woken for it.
    Wake,
    /// The task, right away, and then it reaps what is ready (reaper-task mode).
    SubmitAndReap,
    /// Whoever drops the calling thread's [`plug::Plug`], together with what else it held.
    Plugged,
}

pub use plug::{plug, Plug, RingClaim, RingWatch};

/// Holding submissions back on a thread, so that requests started together reach the kernel
/// in one `io_uring_enter` (QEMU's `blk_io_plug`).
mod plug {
    use std::cell::RefCell;
    use std::marker::PhantomData;
    use std::os::fd::AsRawFd;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    use super::Ring;

    /// The rings with SQEs held back by a thread's plug, each once, with how many it holds.
    type Held = Vec<(Arc<Ring>, usize)>;

    thread_local! {
        /// `Some` while this thread holds a plug.
        static HELD: RefCell<Option<Held>> = const { RefCell::new(None) };
    }

    /// A plug submits a ring's held requests once it holds this many, and goes on holding.
    /// Requests wait for the ones started after them in the same submission, so an unbounded
    /// batch trades latency (and, at a fixed queue depth, IOPS) for system calls; see
    /// `BENCHMARKS.md` for what this bound measured.
    pub(super) const FLUSH_AT: usize = 8;

    /// Holds back the io_uring submissions of requests started on this thread until it is
    /// dropped, and then submits each ring's requests with one system call. A server that
    /// takes several requests off a queue at once starts them under a plug (the vhost-user-blk
    /// export does so for every round of popped descriptor chains): instead of a system call
    /// and a doorbell per request, one per round.
    ///
    /// Only requests whose futures are first polled on this thread while the plug lives are
    /// held; a plug taken while another is held is a no-op (the outer one submits). Files
    /// that do not use io_uring ignore it. Do not hold a plug across an `.await` of those
    /// requests: they would wait for their own submission. It is not `Send`, so an async
    /// block holding it across an await point is not `Send` either, which catches most such
    /// mistakes at compile time.
    #[must_use = "the plug submits when dropped; dropping it at once holds nothing back"]
    pub struct Plug {
        outer: bool,
        _not_send: PhantomData<*const ()>,
    }

    impl std::fmt::Debug for Plug {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Plug").field("outer", &self.outer).finish()
        }
    }

    /// Starts holding back this thread's io_uring submissions; see [`Plug`].
    pub fn plug() -> Plug {
        let outer = HELD.with(|held| {
            let mut held = held.borrow_mut();
            if held.is_some() {
                return false;
            }
            *held = Some(Vec::new());
            true
        });
        Plug {
            outer,
            _not_send: PhantomData,
        }
    }

    pub(super) fn is_plugged() -> bool {
        HELD.with(|held| held.borrow().is_some())
    }

    /// Remembers that `ring` has SQEs held back by this thread's plug.
    pub(super) fn defer(ring: &Arc<Ring>) {
        // Decided under the borrow, submitted after it: submitting answers requests, and a
        // waker that polls its task right there may start another request on this thread.
        let held = HELD.with(|held| {
            let mut held = held.borrow_mut();
            let rings = held.as_mut()?;
            Some(match rings.iter_mut().find(|(r, _)| Arc::ptr_eq(r, ring)) {
                Some((_, n)) if *n + 1 >= FLUSH_AT => {
                    *n = 0;
                    false
                }
                Some((_, n)) => {
                    *n += 1;
                    true
                }
                None => {
                    rings.push((Arc::clone(ring), 1));
                    true
                }
            })
        });
        // `None` is unreachable (the plug was seen a moment ago on this same thread), but a
        // lost submission would hang its caller: submit then too.
        if held != Some(true) {
            ring.unplug();
        }
    }

    impl Plug {
        /// Submits what the plug held, as dropping it does, and returns the rings that
        /// requests started under it went to (none for an inner plug, which held nothing).
        ///
        /// For a thread that reaps its own completions: it watches each ring's descriptor
        /// (readable while completions wait) and calls [`RingWatch::reap`], so that a
        /// request it submitted is answered on this thread, without waking the runtime's
        /// worker that would otherwise reap it (which still may: whoever comes first).
        pub fn finish(self) -> Vec<RingWatch> {
            self.release().into_iter().map(RingWatch).collect()
        }

        /// Submits what the plug held and returns the rings it held for (all of them, also
        /// those with nothing left to submit); empty for an inner plug, and once released.
        fn release(&self) -> Vec<Arc<Ring>> {
            if !self.outer {
                return Vec::new();
            }
            let rings = HELD
                .with(|held| held.borrow_mut().take())
                .unwrap_or_default();
            rings
                .into_iter()
                .map(|(ring, n)| {
                    if n > 0 {
                        ring.unplug();
                    }
                    ring
                })
                .collect()
        }
    }

    impl Drop for Plug {
        fn drop(&mut self) {
            // (Nothing left after `finish`.)
            self.release();
        }
    }

    /// A ring that a [`Plug`] submitted to, for a thread that reaps its completions itself
    /// (see [`Plug::finish`]). Holding it keeps the ring's descriptor open.
    #[derive(Clone)]
    pub struct RingWatch(Arc<Ring>);

    impl RingWatch {
        /// Answers the requests that have completed, on this thread; returns whether this
        /// ring can be reaped this way at all (false: a thread of its own reaps it; stop
        /// watching it, or its descriptor would stay readable).
        pub fn reap(&self) -> bool {
            if let Err(e) = self.0.reap_inline() {
                self.0.hand_over_submission(&e);
            }
            self.0.lock().reaper == super::Reaper::Task
        }

        /// Whether both watch the same ring.
        pub fn same(&self, other: &RingWatch) -> bool {
            Arc::ptr_eq(&self.0, &other.0)
        }

        /// Makes the calling thread this ring's reaper while the claim lives: the runtime's
        /// reactor stops watching the descriptor, so a completion wakes this thread only
        /// (instead of this thread and a runtime worker, one of which then finds nothing).
        ///
        /// The holder must watch the descriptor and call [`RingClaim::reap`] whenever it is
        /// readable, until it drops the claim: every request on the ring, whoever started
        /// it, waits for that. Drop the claim before the watching thread stops (or blocks on
        /// requests to this file). Several claims may coexist (several queue threads on one
        /// ring); the descriptor returns to the reactor when the last one goes.
        pub fn claim(self) -> RingClaim {
            if self.0.claims.fetch_add(1, Ordering::AcqRel) == 0 {
                // The reaper task deregisters at its next pass; until then both may reap.
                self.0.nudge.notify_one();
            }
            RingClaim(self)
        }
    }

    /// A thread's claim to reap a ring; see [`RingWatch::claim`].
    #[derive(Debug)]
    pub struct RingClaim(RingWatch);

    impl RingClaim {
        /// Answers the requests that have completed, on this thread; returns whether this
        /// ring can be reaped this way at all (false: a thread of its own reaps it now, after
        /// the runtime shut down; drop the claim and stop watching the descriptor, or it
        /// would stay readable).
        pub fn reap(&self) -> bool {
            self.0.reap()
        }

        /// The ring claimed.
        pub fn ring(&self) -> &RingWatch {
            &self.0
        }
    }

    impl AsRawFd for RingClaim {
        fn as_raw_fd(&self) -> std::os::fd::RawFd {
            self.0.as_raw_fd()
        }
    }

    impl Drop for RingClaim {
        fn drop(&mut self) {
            let ring = &(self.0).0;
            if ring.claims.fetch_sub(1, Ordering::AcqRel) == 1 {
                // The reaper task registers the descriptor again and reaps what is waiting.
                ring.nudge.notify_one();
            }
        }
    }

    impl AsRawFd for RingWatch {
        fn as_raw_fd(&self) -> std::os::fd::RawFd {
            self.0.uring.as_raw_fd()
        }
    }

    impl std::fmt::Debug for RingWatch {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_tuple("RingWatch").field(&self.as_raw_fd()).finish()
        }
    }
}

/// `IORING_ENTER_GETEVENTS` (linux/io_uring.h): wait for completions.
const ENTER_GETEVENTS: u32 = 1;

impl Ring {
    /// Serves a buffered request in the caller's task when that cannot block on device I/O,
    /// and returns whether it did (false: the ring does the whole request as usual).
    ///
    /// * On a memory file system (tmpfs, ramfs: `memory_backed`), reads and writes are plain
    ///   `pread`/`pwrite`: there is no device to wait for, while the ring would hand every
    ///   request to a kernel worker thread (these file systems do not support non-blocking
    ///   attempts) whose completion then interrupts the submitter.
    /// * Elsewhere, a read first tries the page cache with `preadv2(RWF_NOWAIT)`, which the
    ///   kernel refuses with EAGAIN instead of blocking; a cached read through the ring costs
    ///   a reactor wake-up on top. After a run of misses the attempts become rare.
    fn try_inline(&self, buf: &mut IoBuf, offset: u64, write: bool) -> bool {
        if offset > i64::MAX as u64 {
            return false;
        }
        if self.memory_backed {
            return self.inline_memory(buf, offset, write);
        }
        if write || !self.nowait_reads {
            return false;
        }
        let misses = self.nowait_misses.load(Ordering::Relaxed);
        if misses >= NOWAIT_MISSES && misses % NOWAIT_PROBE != 0 {
            self.nowait_misses.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: the iovec describes the buffer, which `&mut` gives this call alone for its
        // whole length; the call is synchronous, so nothing uses the memory after it returns.
        // The descriptor stays open because the ring holds it (`file` or `inline_fds`).
        let n = unsafe {
            libc::preadv2(
                self.inline_fd(),
                &iov,
                1,
                offset as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        if n >= 0 && n as usize == buf.len() {
            self.nowait_misses.store(0, Ordering::Relaxed);
            return true;
        }
        if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP) {
            // The file system has no non-blocking reads: stop asking.
            self.nowait_misses.store(usize::MAX / 2, Ordering::Relaxed);
        } else {
            self.nowait_misses.fetch_add(1, Ordering::Relaxed);
        }
        false
    }

    /// `pread`/`pwrite` of the whole buffer on a memory file system; a read that reaches EOF
    /// zero-fills the rest. Any error returns false, and the ring then repeats the request
    /// and reports its own result.
    fn inline_memory(&self, buf: &mut IoBuf, offset: u64, write: bool) -> bool {
        let fd = self.inline_fd();
        let mut done = 0usize;
        while done < buf.len() {
            let at = (offset + done as u64) as libc::off_t;
            let rest = buf.len() - done;
            // SAFETY: the pointer and length describe the unfinished part of the buffer, which
            // `&mut` gives this call alone; the call is synchronous. The descriptor stays open
            // because the ring holds it (`file` or `inline_fds`).
            let n = unsafe {
                if write {
                    libc::pwrite(fd, buf.as_ptr().add(done).cast(), rest, at)
                } else {
                    libc::pread(fd, buf.as_mut_ptr().add(done).cast(), rest, at)
                }
            };
            match n {
                n if n > 0 => done += n as usize,
                0 if !write => {
                    buf[done..].fill(0);
                    return true;
                }
                _ if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
                _ => return false,
            }
        }
        true
    }

    /// The calling thread's descriptor for inline requests (see `inline_fds`).
    fn inline_fd(&self) -> std::os::fd::RawFd {
        let slot = &self.inline_fds[crate::sharded::my_shard()];
        match slot.get_or_init(|| reopen(&self.file)) {
            Some(fd) => fd.as_raw_fd(),
            None => self.file.as_raw_fd(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Core> {
        // Nothing below panics while holding the lock; should it, the tables are still
        // consistent enough to answer every request with an error.
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a request from a task: submits it at once when there is room in the ring,
    /// otherwise queues it for the completion thread.
    fn accept(self: &Arc<Self>, op: Op) -> io::Result<()> {
        let mut core = self.lock();
        if let Some(reason) = &core.stopped {
            // Dropping `op` here is fine: it never reached the kernel.
            return Err(stopped_error(reason.as_deref()));
        }
        self.stats.outstanding.fetch_add(1, Ordering::AcqRel);
        if core.in_flight >= self.max_in_flight || !core.queued.is_empty() {
            core.queued.push_back(op);
            return Ok(());
        }
        // A request arriving while the reaper is awake is submitted by it, together with the
        // others, before it sleeps again. Otherwise, with a reaper task, the task submits its
        // own request and reaps what is ready; with a reaper thread, a lone request is
        // submitted by its own task (no thread hop before the I/O starts), and one that joins
        // others in flight wakes the thread, which submits everything that arrives meanwhile
        // in one call (one doorbell for many requests, as a dedicated submitter).
        // A plugged thread submits its requests itself when it unplugs, even while the reaper
        // is awake: waiting for the reaper would hold them up until the tasks it woke have
        // run, which have nothing to do with them (a second submission of an entry is
        // harmless: the kernel takes each published entry once).
        let then = if plug::is_plugged() {
            Then::Plugged
        } else if core.reaper_awake {
            core.left_for_reaper += 1;
            Then::Nothing
        } else if core.reaper == Reaper::Task {
            Then::SubmitAndReap
        } else if core.in_flight < INLINE_DEPTH {
            Then::Submit
        } else {
            core.reaper_awake = true;
            Then::Wake
        };
        let started = self.start(&mut core, op);
        drop(core);
        let submitted = match (started, then) {
            (Err(e), _) => Err(e),
            (Ok(()), Then::Submit) => self.submit(),
            (Ok(()), Then::SubmitAndReap) => self.submit().and_then(|()| self.reap_inline()),
            (Ok(()), Then::Wake) => {
                wake(&self.wake_fd);
                Ok(())
            }
            (Ok(()), Then::Nothing) => Ok(()),
            (Ok(()), Then::Plugged) => {
                plug::defer(self);
                Ok(())
            }
        };
        if let Err(e) = submitted {
            self.hand_over_submission(&e);
        }
        Ok(())
    }

    /// Makes the ring's own thread the reaper, from a reaper task that is gone (its runtime
    /// shut down, or it panicked) or cannot watch the descriptor any more, so that in-flight
    /// and later requests are still answered. Claimants see the change in
    /// [`RingClaim::reap`]'s result.
    fn hand_to_thread(self: &Arc<Self>) {
        {
            let mut core = self.lock();
            core.reaper = Reaper::Thread;
            core.reaper_awake = false;
            core.left_for_reaper = 0;
            if core.disconnected && core.in_flight == 0 && core.queued.is_empty() {
                return;
            }
        }
        tracing::debug!("io_uring reaper task gone with the file in use; a thread takes over");
        if let Err(e) = spawn_thread(Arc::clone(self)) {
            self.shut_down(Some(format!("no thread to take over the ring: {e}")));
        }
    }

    /// A task could not submit (`e`): the request is in its slot either way, so the reaper
    /// retries the submission (and fails every request if the ring is broken).
    fn hand_over_submission(&self, e: &io::Error) {
        tracing::debug!("io_uring submission from a task failed ({e}); handing over");
        self.lock().reaper_awake = true;
        self.nudge.notify_one();
        wake(&self.wake_fd);
    }

    /// Submits what a [`plug::Plug`] held back, and reaps what is ready (as a task that
    /// submits its own request does).
    fn unplug(&self) {
        if let Err(e) = self.submit().and_then(|()| self.reap_inline()) {
            self.hand_over_submission(&e);
        }
    }

    /// Reaps what has completed already, from a submitting task (reaper-task mode): a read the
    /// page cache served is answered before its task waits, with no reactor round trip.
    fn reap_inline(&self) -> io::Result<()> {
        let mut answers = Vec::new();
        let pushed = {
            let mut core = self.lock();
            if core.reaper != Reaper::Task {
                return Ok(());
            }
            self.reap_locked(&mut core, &mut answers)?
        };
        for (op, result) in answers {
            op.finish(result);
        }
        if pushed {
            self.submit()?;
        }
        Ok(())
    }

    /// Drains the completion queue and handles each completion, then starts queued requests
    /// while there is room. Returns whether SQEs were queued (continuations or started
    /// requests), which the caller then submits. Only called with the lock held and while a
    /// task reaps (`core` proves the former), so nobody else holds the completion queue.
    fn reap_locked(
        &self,
        core: &mut Core,
        answers: &mut Vec<(Op, io::Result<()>)>,
    ) -> io::Result<bool> {
        debug_assert_eq!(core.reaper, Reaper::Task);
        let mut pushed = false;
        loop {
            // SAFETY: in task mode completions are only drained here, under the lock, so no
            // other `CompletionQueue` exists; the thread, which drains without the lock, only
            // starts once the mode is `Thread`, which this function is never called in.
            let cq = unsafe { self.uring.completion_shared() };
            let mut any = false;
            for cqe in cq {
                any = true;
                let (user_data, res) = (cqe.user_data(), cqe.result());
                if user_data == WAKE {
                    continue;
                }
                let before = answers.len();
                self.complete(core, user_data as usize, res, answers)?;
                pushed |= answers.len() == before;
            }
            if !any {
                break;
            }
        }
        while core.in_flight < self.max_in_flight {
            let Some(op) = core.queued.pop_front() else {
                break;
            };
            self.start(core, op)?;
            pushed = true;
        }
        Ok(pushed)
    }

    /// The reaper task: waits for the reactor to report completions (or for the last handle
    /// to go away), reaps them, answers, lets the woken tasks queue their next requests, and
    /// submits. Returns when the last handle is gone and nothing is in flight.
    ///
    /// While threads hold [`RingClaim`]s, the descriptor is out of the reactor (`fd` is
    /// `None`) and the task waits for nudges only: a claim's coming and going, a failed
    /// submission, the last handle's drop. The claimants reap the completions.
    async fn task_loop(self: &Arc<Self>, mut fd: Option<AsyncFd<RingFd>>) -> io::Result<Exit> {
        let mut answers = Vec::new();
        loop {
            if self.claims.load(Ordering::Acquire) > 0 {
                // Deregisters: the reactor would wake a worker for every completion that a
                // claimant's thread reaps anyway.
                fd = None;
            } else if fd.is_none() {
                // The last claim went; registering reports a completion that is already
                // waiting (epoll checks readiness when a descriptor is added), and the pass
                // below reaps anything posted before that.
                // SAFETY: `RingFd` keeps the ring, which owns the descriptor, alive for as long
                // as the `AsyncFd` exists, and always returns that one descriptor.
                let registered = unsafe {
                    AsyncFd::register_with_interest(RingFd(Arc::clone(self)), Interest::READABLE)
                };
                match registered {
                    Ok(registered) => fd = Some(registered),
                    Err(e) => return Ok(Exit::Unwatchable(e.into())),
                }
            }
            let ready = match &fd {
                Some(fd) => tokio::select! {
                    ready = fd.readable() => Some(ready?),
                    () = self.nudge.notified() => None,
                },
                None => {
                    self.nudge.notified().await;
                    None
                }
            };
            loop {
                let (pushed, left_before) = {
                    let mut core = self.lock();
                    let pushed = self.reap_locked(&mut core, &mut answers)?;
                    if answers.is_empty() && !pushed && !core.reaper_awake {
                        if core.disconnected && core.in_flight == 0 && core.queued.is_empty() {
                            return Ok(Exit::Done);
                        }
                        break;
                    }
                    core.reaper_awake = true;
                    (pushed, core.left_for_reaper)
                };
                let answered = answers.len();
                for (op, result) in answers.drain(..) {
                    op.finish(result);
                }
                if !pushed {
                    self.let_woken_tasks_queue(answered, left_before).await;
                }
                let unsubmitted = {
                    let mut core = self.lock();
                    core.reaper_awake = false;
                    core.left_for_reaper = 0;
                    self.unsubmitted(&mut core)
                };
                // The tasks woken need not have started anything (a server's requests end
                // with their answer): then there is no system call to make.
                if unsubmitted {
                    loop {
                        match self.submit() {
                            Ok(()) => break,
                            Err(e) if is_transient(&e) => tokio::task::yield_now().await,
                            Err(e) => return Err(e),
                        }
                    }
                }
            }
            // The queue was empty under the lock; a completion posted since then raises a new
            // readiness event, which this does not clear (Tokio compares event ticks).
            if let Some(mut ready) = ready {
                ready.clear_ready();
            }
        }
    }

    /// Yields until the `answered` tasks just woken have queued their next requests (which
    /// they leave to the reaper while `reaper_awake` is set), so that one submission starts
    /// them together.
    ///
    /// One yield is not always enough: the scheduler resumes a yielded task at its next
    /// driver poll, which a busy worker makes every few dozen tasks, so the reaper may run
    /// again while some of the tasks it woke still wait in the run queue; each of those would
    /// then submit alone (measured: a quarter of all requests at queue depth 32, each a system
    /// call and a doorbell of its own). So it yields again while the last pass brought new
    /// requests and not all of the woken tasks have been heard from, a few times at most
    /// (a woken task need not issue another request at all).
    async fn let_woken_tasks_queue(&self, answered: usize, left_before: usize) {
        const MAX_PASSES: usize = 4;
        let mut seen = left_before;
        for _ in 0..MAX_PASSES {
            tokio::task::yield_now().await;
            let now = self.lock().left_for_reaper;
            if now.saturating_sub(left_before) >= answered || now == seen {
                break;
            }
            seen = now;
        }
    }

    /// Gives `op` a slot and queues its SQE (not yet submitted).
    fn start(&self, core: &mut Core, op: Op) -> io::Result<()> {
        let slot = match core.free.pop() {
            Some(slot) => slot,
            None => {
                core.slots.push(None);
                core.slots.len() - 1
            }
        };
        core.slots[slot] = Some(InFlight { op, done: 0 });
        core.in_flight += 1;
        self.push_slot(core, slot)
    }

    /// Queues the SQE for the remaining part of the request in `slot`.
    fn push_slot(&self, core: &mut Core, slot: usize) -> io::Result<()> {
        let Some(entry) = core.slots.get_mut(slot).and_then(Option::as_mut) else {
            return Ok(());
        };
        let done = entry.done;
        let sqe = if self.fixed_file {
            entry.op.sqe(types::Fixed(0), done)
        } else {
            entry.op.sqe(types::Fd(self.file.as_raw_fd()), done)
        };
        // SAFETY: the SQE points at `buf[done..done + n]`, which is in bounds (`done` is less
        // than the length, otherwise the request would have completed), or for a vectored
        // request at its iovec array, whose entries point at in-bounds remainders of its
        // buffers and which is only rebuilt here, while no SQE of the request is in flight.
        // That memory (the buffers and the array) is owned by `core.slots[slot]`, whose entry is neither read, written nor removed until this SQE's
        // completion has been reaped (`complete` is the only place that takes it, and
        // `shut_down` leaks it instead if the ring dies first); growing `slots` moves the
        // `IoBuf` but not its heap allocation. The descriptor stays open because `self.file`
        // lives as long as the ring.
        unsafe { self.push(core, &sqe.user_data(slot as u64)) }
    }

    /// Arms the eventfd poll through which the last handle wakes the completion thread.
    fn arm_wake(&self, core: &mut Core) -> io::Result<()> {
        let sqe = opcode::PollAdd::new(types::Fd(self.wake_fd.as_raw_fd()), libc::POLLIN as u32)
            .build()
            .user_data(WAKE);
        // SAFETY: POLL_ADD references no memory; the eventfd stays open because
        // `self.wake_fd` lives as long as the ring (and the kernel takes its own reference on
        // submission).
        unsafe { self.push(core, &sqe)? };
        core.wake_armed = true;
        Ok(())
    }

    /// Pushes an SQE, submitting first if the queue is full. `_core` proves the lock is held.
    ///
    /// # Safety
    ///
    /// Every buffer and descriptor the entry references must stay valid until its completion
    /// has been reaped.
    unsafe fn push(&self, _core: &mut Core, sqe: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the lock is held, so no other `SubmissionQueue` exists (this is the only
            // place that makes one); the caller guarantees the entry's references stay valid.
            // The queue syncs its tail when the temporary is dropped.
            if unsafe { self.uring.submission_shared().push(sqe) }.is_ok() {
                return Ok(());
            }
            // Unreachable with `max_in_flight` below the SQ size, but cheap to handle: hand
            // the full queue to the kernel and retry.
            match self.uring.submit() {
                Ok(_) => {}
                Err(e) if is_transient(&e) => std::thread::yield_now(),
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether SQEs wait in the submission queue. `_core` proves the lock is held.
    fn unsubmitted(&self, _core: &mut Core) -> bool {
        // SAFETY: the lock is held, so no other `SubmissionQueue` exists (see `push`).
        !unsafe { self.uring.submission_shared() }.is_empty()
    }

    /// Hands every queued SQE to the kernel. Needs no lock: `io_uring_enter` may be called
    /// from several threads at once, and the kernel takes only entries whose tail has been
    /// published (after they were written, under the lock).
    fn submit(&self) -> io::Result<()> {
        loop {
            match self.uring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The completion thread.
    fn run(self: Arc<Self>) {
        tracing::debug!(fd = self.file.as_raw_fd(), "io_uring thread started");
        // A panic must still answer every caller (and leak in-flight buffers), not leave
        // them waiting forever.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.event_loop()))
            .unwrap_or_else(|_| Err(io::Error::other("the io_uring thread panicked")));
        let reason = match result {
            Ok(()) => {
                tracing::debug!(fd = self.file.as_raw_fd(), "io_uring thread exiting");
                None
            }
            Err(e) => {
                tracing::error!("io_uring thread failed, failing all its requests: {e}");
                Some(e.to_string())
            }
        };
        self.shut_down(reason);
    }

    fn event_loop(&self) -> io::Result<()> {
        let mut cqes: Vec<(u64, i32)> = Vec::new();
        let mut answers = Vec::new();
        loop {
            {
                let mut core = self.lock();
                if core.disconnected && core.in_flight == 0 && core.queued.is_empty() {
                    return Ok(());
                }
                if !core.wake_armed && !core.disconnected {
                    self.arm_wake(&mut core)?;
                }
                // From here on tasks submit (or wake this thread) themselves; everything
                // pushed before is covered by the submission below.
                core.reaper_awake = false;
                core.left_for_reaper = 0;
            }
            // Continuations, started queued requests, a re-armed poll, requests that
            // arrived while this thread was awake, or what a task could not submit.
            match self.submit() {
                Ok(()) => {}
                // EAGAIN/EBUSY: the kernel is short of memory; try again shortly rather
                // than sleep with entries it has not taken.
                Err(e) if is_transient(&e) => {
                    std::thread::yield_now();
                    continue;
                }
                Err(e) => return Err(e),
            }
            // Something is always pending here (the poll, or in-flight requests after
            // disconnection), so waiting for one completion cannot hang.
            // SAFETY: no submission and no argument: the call references no memory.
            match unsafe {
                self.uring
                    .submitter()
                    .enter::<libc::sigset_t>(0, 1, ENTER_GETEVENTS, None)
            } {
                Ok(_) => {}
                Err(e) if is_transient(&e) => {}
                Err(e) => return Err(e),
            }
            // SAFETY: only this thread ever makes a `CompletionQueue`.
            cqes.extend(
                unsafe { self.uring.completion_shared() }.map(|c| (c.user_data(), c.result())),
            );
            let mut core = self.lock();
            core.reaper_awake = true;
            for &(user_data, res) in &cqes {
                if user_data == WAKE {
                    core.wake_armed = false;
                    if res < 0 {
                        tracing::warn!(
                            "io_uring eventfd poll failed: {}",
                            io::Error::from_raw_os_error(-res)
                        );
                    }
                    self.clear_wakeups();
                } else {
                    self.complete(&mut core, user_data as usize, res, &mut answers)?;
                }
            }
            cqes.clear();
            while core.in_flight < self.max_in_flight {
                let Some(op) = core.queued.pop_front() else {
                    break;
                };
                self.start(&mut core, op)?;
            }
            drop(core);
            // Answered outside the lock: waking a task can take a syscall, and the task may
            // submit its next request right away.
            for (op, result) in answers.drain(..) {
                op.finish(result);
            }
        }
    }

    fn complete(
        &self,
        core: &mut Core,
        slot: usize,
        res: i32,
        answers: &mut Vec<(Op, io::Result<()>)>,
    ) -> io::Result<()> {
        let Some(entry) = core.slots.get_mut(slot).and_then(Option::as_mut) else {
            tracing::error!(slot, res, "completion for an unknown io_uring request");
            return Ok(());
        };
        match entry.advance(res, self.align) {
            Progress::Continue => self.push_slot(core, slot),
            Progress::Done(result) => {
                if let Some(entry) = core.slots[slot].take() {
                    core.free.push(slot);
                    core.in_flight -= 1;
                    // Before answering, so a caller that sees its answer never sees itself
                    // counted as outstanding.
                    self.stats.outstanding.fetch_sub(1, Ordering::AcqRel);
                    answers.push((entry.op, result));
                }
                Ok(())
            }
        }
    }

    /// Resets the eventfd counter; wake-ups that arrive later complete the next poll.
    fn clear_wakeups(&self) {
        let mut count = 0u64;
        // SAFETY: reads at most 8 bytes into a live local; `self.wake_fd` keeps the eventfd
        // open. A non-blocking eventfd reports EAGAIN when already clear, which is fine.
        let _ = unsafe { libc::read(self.wake_fd.as_raw_fd(), (&mut count as *mut u64).cast(), 8) };
    }

    /// Runs when the completion thread ends: normally (nothing left), on a ring error, or
    /// on a panic. Anything still in a slot may be in the kernel's hands, so its buffer is
    /// leaked rather than freed; everything else is answered with an error, and later
    /// requests are refused.
    fn shut_down(&self, reason: Option<String>) {
        let mut core = self.lock();
        let error = || stopped_error(reason.as_deref());
        let mut answered = 0;
        for entry in core.slots.drain(..).flatten() {
            self.stats.outstanding.fetch_sub(1, Ordering::AcqRel);
            entry.op.fail_leaking_buffer(error());
            answered += 1;
        }
        for op in core.queued.drain(..) {
            self.stats.outstanding.fetch_sub(1, Ordering::AcqRel);
            op.finish(Err(error()));
            answered += 1;
        }
        core.in_flight = 0;
        core.free.clear();
        core.stopped = Some(reason.clone());
        if answered > 0 {
            tracing::warn!(answered, "io_uring thread stopped with requests pending");
        }
    }
}

fn stopped_error(reason: Option<&str>) -> io::Error {
    match reason {
        Some(msg) => io::Error::other(format!("the io_uring thread failed: {msg}")),
        None => thread_gone(),
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::io::testsuite::{block_file_suite, direct_file, poll_once, Fixture};

    thread_local! {
        /// Makes `from_file` fail like a seccomp filter would, on this thread only (tests run
        /// in parallel).
        pub(crate) static SIMULATE_SECCOMP: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// `None` (with the reason printed) where io_uring is unavailable.
    fn uring_file(file: File) -> Option<UringFile> {
        match UringFile::from_file(file) {
            Ok(f) => Some(f),
            Err(e) => {
                println!("skipping io_uring test: io_uring unavailable: {e}");
                None
            }
        }
    }

    async fn fixture() -> Option<Fixture> {
        let file = uring_file(tempfile::tempfile().expect("temporary file"))?;
        Some(Fixture::new(Arc::new(file)))
    }

    block_file_suite!(fixture);

    /// The same suite with each completion mode and ring option forced (the default above
    /// reaps on the reactor, as every test runtime here has an I/O driver).
    macro_rules! suite_with {
        ($name:ident, $opts:expr) => {
            mod $name {
                use super::*;

                async fn fixture() -> Option<Fixture> {
                    let file = tempfile::tempfile().expect("temporary file");
                    match UringFile::with_options(file, &$opts) {
                        Ok(f) => Some(Fixture::new(Arc::new(f))),
                        Err(e) => {
                            println!("skipping io_uring test: {e}");
                            None
                        }
                    }
                }

                block_file_suite!(fixture);
            }
        };
    }
    suite_with!(
        thread_mode,
        RingOptions::new().completion(Completion::Thread)
    );
    suite_with!(
        fixed_file,
        RingOptions::new()
            .completion(Completion::Reactor)
            .register_file(true)
    );
    suite_with!(sqpoll, RingOptions::new().sqpoll(Some(10)));
    // Completions wait for the submitting thread's next kernel entry instead of an IPI.
    suite_with!(coop_taskrun, RingOptions::new().coop_taskrun(true));
    // Every request through the ring, none served inline from the page cache.
    suite_with!(ring_only, RingOptions::new().nowait_reads(false));

    /// The suite on a memory file system, where requests are served inline with
    /// `pread`/`pwrite` (skipped where `/dev/shm` is missing).
    mod memory_backed {
        use super::*;

        async fn fixture() -> Option<Fixture> {
            let file = tempfile::tempfile_in("/dev/shm").ok()?;
            assert!(is_memory_backed(&file), "/dev/shm is tmpfs");
            let f = uring_file(file)?;
            assert!(f.handle.ring.memory_backed);
            Some(Fixture::new(Arc::new(f)))
        }

        block_file_suite!(fixture);
    }

    #[test]
    fn a_runtime_without_io_driver_reaps_with_a_thread() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let reactor = RingOptions::new().completion(Completion::Reactor);
            match UringFile::with_options(tempfile::tempfile().unwrap(), &reactor) {
                Err(e) => assert_eq!(e.kind(), io::ErrorKind::Unsupported, "{e}"),
                Ok(_) => panic!("reactor completions without an I/O driver"),
            }
            let Some(file) = uring_file(tempfile::tempfile().unwrap()) else {
                return;
            };
            assert_eq!(file.handle.ring.lock().reaper, Reaper::Thread);
            file.write_at(IoBuf::from_vec(vec![3; 8192]), 0)
                .await
                .unwrap();
            let back = file.read_at(IoBuf::zeroed(8192, 1), 0).await.unwrap();
            assert!(back.iter().all(|&b| b == 3));
        });
    }

    /// A file opened on one runtime keeps working after that runtime is gone, requests it
    /// left in flight included: the reaper task's drop hands the ring to a thread.
    #[test]
    fn the_ring_outlives_the_runtime_that_opened_it() {
        let first = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let Some(file) = first.block_on(async { uring_file(tempfile::tempfile().unwrap()) }) else {
            return;
        };
        assert_eq!(file.handle.ring.lock().reaper, Reaper::Task);
        first.block_on(async {
            file.write_at(IoBuf::from_vec(vec![5; 1 << 20]), 0)
                .await
                .unwrap();
            for i in 0..8u64 {
                let mut fut = file.write_at(IoBuf::from_vec(vec![6; 1 << 20]), (i + 1) << 20);
                poll_once(&mut fut).await;
                drop(fut);
            }
        });
        drop(first);
        assert_eq!(file.handle.ring.lock().reaper, Reaper::Thread);
        let second = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        second.block_on(async {
            wait_until("the abandoned writes", || file.in_flight() == 0).await;
            let back = file.read_at(IoBuf::zeroed(1 << 20, 1), 0).await.unwrap();
            assert!(back.iter().all(|&b| b == 5));
            let back = file.read_at(IoBuf::zeroed(4096, 1), 8 << 20).await.unwrap();
            assert!(back.iter().all(|&b| b == 6));
            file.flush().await.unwrap();
        });
        let stats = file.stats_weak();
        drop(file);
        let deadline = Instant::now() + Duration::from_secs(10);
        while stats.upgrade().is_some() {
            assert!(Instant::now() < deadline, "the ring thread did not exit");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn direct_io() {
        if uring_file(tempfile::tempfile().unwrap()).is_none() {
            return;
        }
        let fixture = direct_file(|path, opts| {
            UringFile::open(path, opts).map(|f| Arc::new(f) as Arc<dyn BlockFile>)
        });
        crate::io::testsuite::direct_io(fixture).await;
    }

    async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn abandoned_requests_complete_and_release_buffers() {
        let Some(file) = uring_file(tempfile::tempfile().unwrap()) else {
            return;
        };
        file.write_at(IoBuf::from_vec(vec![7; 4 << 20]), 0)
            .await
            .unwrap();
        for _ in 0..32 {
            let mut fut = file.read_at(IoBuf::zeroed(4 << 20, 4096), 0);
            // Poll once so that the request reaches the ring, then abandon it.
            poll_once(&mut fut).await;
        }
        wait_until("abandoned reads to complete", || file.in_flight() == 0).await;
        let buf = file.read_at(IoBuf::zeroed(10, 1), 100).await.unwrap();
        assert_eq!(&buf[..], &[7; 10]);
        assert_eq!(file.in_flight(), 0);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn ring_thread_exits_after_last_handle_and_in_flight_ops() {
        let Some(file) = uring_file(tempfile::tempfile().unwrap()) else {
            return;
        };
        let stats = file.stats_weak();
        let clone = file.clone();
        drop(file);
        // Still usable through the clone.
        clone
            .write_at(IoBuf::from_vec(vec![1; 4096]), 0)
            .await
            .unwrap();
        // Leave requests in flight as the last handle goes away.
        let mut futs: Vec<_> = (0..16u64)
            .map(|i| clone.write_at(IoBuf::from_vec(vec![2; 1 << 20]), i << 20))
            .collect();
        for fut in &mut futs {
            poll_once(fut).await;
        }
        drop(futs);
        drop(clone);
        wait_until("the ring thread to exit", || stats.upgrade().is_none()).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn large_and_huge_offsets() {
        let Some(file) = uring_file(tempfile::tempfile().unwrap()) else {
            return;
        };
        // Spans many MAX_CHUNK pieces, at an offset beyond 4 GiB (sparse).
        let data: Vec<u8> = (0..(1 << 20) + 123).map(|i| (i % 251) as u8).collect();
        let offset = (5 << 30) + 7;
        file.write_at(IoBuf::from_vec(data.clone()), offset)
            .await
            .unwrap();
        let back = file
            .read_at(IoBuf::zeroed(data.len() + 1000, 1), offset)
            .await
            .unwrap();
        assert_eq!(&back[..data.len()], &data[..]);
        assert!(back[data.len()..].iter().all(|&b| b == 0));
        // The kernel rejects offsets beyond i64::MAX; that is an error, not a crash.
        assert!(file
            .read_at(IoBuf::zeroed(10, 1), u64::MAX - 100)
            .await
            .is_err());
        file.flush().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn io_errors_reach_the_caller() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let opts = FileOptions {
            read_only: true,
            ..FileOptions::default()
        };
        let file = match UringFile::open(tmp.path(), &opts) {
            Ok(f) => f,
            Err(e) => return println!("skipping: {e}"),
        };
        let err = file.write_at(IoBuf::zeroed(10, 1), 0).await.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF), "{err}");
        // And the ring keeps working.
        assert_eq!(file.read_at(IoBuf::zeroed(4, 1), 0).await.unwrap().len(), 4);
    }

    /// Two files on rings of their own whose writes (and reads: no page-cache attempt)
    /// always go through the ring; `None` without io_uring.
    fn two_ring_files() -> Option<(UringFile, UringFile)> {
        let opts = RingOptions::new().nowait_reads(false);
        let open = || UringFile::with_options(tempfile::tempfile().unwrap(), &opts).ok();
        Some((open()?, open()?))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_plug_holds_submissions_until_the_outer_one_is_dropped() {
        let Some((a, b)) = two_ring_files() else {
            return println!("skipping: io_uring unavailable");
        };
        let outer = plug();
        let mut wa = a.write_at(IoBuf::from(vec![0xa1; 4096]), 0);
        let mut wb = b.write_at(IoBuf::from(vec![0xb2; 4096]), 4096);
        assert!(!poll_once(&mut wa).await);
        let inner = plug();
        assert!(!poll_once(&mut wb).await);
        drop(inner);
        // Neither request reached the kernel: a 4 KiB write would long be done.
        std::thread::sleep(Duration::from_millis(100));
        assert!(!poll_once(&mut wa).await, "submitted under a plug");
        assert!(!poll_once(&mut wb).await, "the inner plug submitted");
        drop(outer);
        assert_eq!(wa.await.unwrap().len(), 4096);
        assert_eq!(wb.await.unwrap().len(), 4096);
        let ra = a.read_at(IoBuf::zeroed(4096, 1), 0).await.unwrap();
        let rb = b.read_at(IoBuf::zeroed(4096, 1), 4096).await.unwrap();
        assert!(ra.iter().all(|&x| x == 0xa1) && rb.iter().all(|&x| x == 0xb2));
        // A plug holding `FLUSH_AT` requests of one ring submits them and goes on holding.
        // (What it holds after that is not observable here: the reaper, answering the flushed
        // requests, submits whatever the shared queue holds, held entries included.)
        let outer = plug();
        let mut pending = Vec::new();
        for i in 0..2 * plug::FLUSH_AT + 3 {
            let mut w = a.write_at(IoBuf::from(vec![i as u8; 512]), 512 * i as u64);
            // A flush reaps what is ready, so the request that triggers one (a buffered
            // write may complete during its submission) can be answered at once.
            if !poll_once(&mut w).await {
                pending.push(w);
            }
        }
        wait_until("the flushed batches", || a.in_flight() <= 3).await;
        drop(outer);
        for w in pending {
            assert_eq!(w.await.unwrap().len(), 512);
        }
        // Without a plug a request goes at once.
        let mut w = a.write_at(IoBuf::from(vec![1; 512]), 0);
        if !poll_once(&mut w).await {
            wait_until("an unplugged write", || a.in_flight() == 0).await;
            assert!(poll_once(&mut w).await);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_finished_plug_names_its_rings_and_their_completions_can_be_reaped_here() {
        let Some((a, b)) = two_ring_files() else {
            return println!("skipping: io_uring unavailable");
        };
        let outer = plug();
        let mut wa = a.write_at(IoBuf::from(vec![0xa1; 4096]), 0);
        let mut wb = b.write_at(IoBuf::from(vec![0xb2; 4096]), 0);
        assert!(!poll_once(&mut wa).await);
        assert!(!poll_once(&mut wb).await);
        // An inner plug held nothing and names nothing.
        assert!(plug().finish().is_empty());
        let rings = outer.finish();
        assert_eq!(rings.len(), 2, "{rings:?}");
        assert!(!rings[0].same(&rings[1]));
        assert!(rings[0].as_raw_fd() >= 0);
        // Submitted by finish: reaping here (or by the runtime's reaper, whichever comes
        // first) answers them; both rings are reaped by tasks, so watching them works.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while a.in_flight() + b.in_flight() > 0 {
            assert!(std::time::Instant::now() < deadline, "never answered");
            for r in &rings {
                assert!(r.reap());
            }
            std::thread::yield_now();
        }
        assert_eq!(wa.await.unwrap().len(), 4096);
        assert_eq!(wb.await.unwrap().len(), 4096);
        // No plug held now: a plain request goes at once, and finish of a fresh plug with
        // nothing started names no ring.
        assert!(plug().finish().is_empty());
    }

    /// A ring's strong count: the handle, each `RingWatch` and claim, and one more while the
    /// reaper task has the descriptor registered with the reactor (the `AsyncFd` holds it).
    fn registrations(file: &UringFile) -> usize {
        Arc::strong_count(&file.handle.ring)
    }

    /// Waits, blocking, until the ring's descriptor reports a completion.
    fn wait_readable(fd: &impl AsRawFd) {
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live, writable `pollfd` for the call.
        let n = unsafe { libc::poll(&mut p, 1, 10_000) };
        assert_eq!(n, 1, "no completion within 10 s");
    }

    /// `file`'s ring as a plug names it: a write of `len` bytes at 0 started under the plug,
    /// then awaited.
    async fn watch_of(file: &UringFile, len: usize) -> RingWatch {
        let outer = plug();
        let mut w = file.write_at(IoBuf::from(vec![1; len]), 0);
        let _ = poll_once(&mut w).await;
        let mut rings = outer.finish();
        assert_eq!(rings.len(), 1);
        w.await.unwrap();
        rings.pop().unwrap()
    }

    /// Claims `file`'s ring and waits until the reaper task has let go of the descriptor (and
    /// of its hold on the ring); returns the claim and the ring's count before the claim.
    async fn claimed(file: &UringFile) -> (RingClaim, usize) {
        let ring = watch_of(file, 4096).await;
        let registered = registrations(file);
        let claim = ring.claim();
        wait_until("the reactor to let go", || registrations(file) < registered).await;
        (claim, registered)
    }

    /// An fdatasync that is still in flight after its first poll: a write first dirties the
    /// file, so the sync has work to do (io_uring hands it to a worker, and it cannot
    /// complete during its submission); retried should it complete before the inline reap.
    /// The write bypasses the ring: with a claim held, a ring request awaited here would
    /// wait for this very thread to reap it.
    async fn pending_flush(file: &UringFile) -> IoFuture<'_, ()> {
        use std::os::unix::fs::FileExt;
        for i in 0..20u64 {
            file.handle
                .ring
                .file
                .write_all_at(&[i as u8; 65536], i * 65536)
                .unwrap();
            let mut sync = file.flush();
            if !poll_once(&mut sync).await {
                return sync;
            }
        }
        panic!("every fdatasync completed during its submission");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_claimed_ring_is_reaped_by_its_claimant_alone_until_the_claim_goes() {
        let Some((a, _b)) = two_ring_files() else {
            return println!("skipping: io_uring unavailable");
        };
        let (claim, registered) = claimed(&a).await;
        // The sync's completion waits in the queue: nobody but the claimant reaps it.
        let sync = pending_flush(&a).await;
        wait_readable(&claim);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(a.in_flight(), 1, "reaped by someone else than the claimant");
        assert!(claim.reap());
        assert_eq!(a.in_flight(), 0);
        sync.await.unwrap();
        // Once the claim goes, the reaper task answers a completion that was waiting when
        // it went (its nudge makes it reap once)...
        let sync = pending_flush(&a).await;
        wait_readable(&claim);
        drop(claim);
        tokio::time::timeout(Duration::from_secs(10), sync)
            .await
            .expect("the reaper task reaps again")
            .unwrap();
        // ...and the reactor watches the descriptor again (the claim's own hold on the
        // ring went with it): a later completion is reaped with no claimant and no nudge.
        wait_until("the reactor to register again", || {
            registrations(&a) == registered - 1
        })
        .await;
        let sync = pending_flush(&a).await;
        tokio::time::timeout(Duration::from_secs(10), sync)
            .await
            .expect("the reactor reaps again")
            .unwrap();
    }

    /// The runtime goes while a thread holds a claim: the ring's own thread takes over, the
    /// claim says so, and requests are still answered.
    #[test]
    fn a_claimed_ring_outlives_its_runtime_on_a_thread_of_its_own() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let Some((file, claim)) = rt.block_on(async {
            let (a, _b) = two_ring_files()?;
            let (claim, _) = claimed(&a).await;
            Some((a, claim))
        }) else {
            return println!("skipping: io_uring unavailable");
        };
        drop(rt);
        assert!(!claim.reap(), "a thread reaps now");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let w = file.write_at(IoBuf::from(vec![2; 4096]), 4096);
            tokio::time::timeout(Duration::from_secs(10), w)
                .await
                .expect("answered by the thread")
                .unwrap();
            let r = file.read_at(IoBuf::zeroed(8192, 1), 0).await.unwrap();
            assert!(r[..4096].iter().all(|&x| x == 1) && r[4096..].iter().all(|&x| x == 2));
        });
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_claim_on_a_ring_a_thread_reaps_says_so() {
        let opts = RingOptions::new().completion(Completion::Thread);
        let Ok(file) = UringFile::with_options(tempfile::tempfile().unwrap(), &opts) else {
            return println!("skipping: io_uring unavailable");
        };
        assert!(!watch_of(&file, 512).await.claim().reap());
    }
}
