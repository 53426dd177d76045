//! The io_uring backend: one ring, and one thread that reaps it, per opened file.
//!
//! # Design
//!
//! A request (read, write or fdatasync) takes a slot and pushes its SQE under the ring's
//! lock. When nothing else is in flight, its task then calls `io_uring_enter` itself: one
//! syscall and no hop to another thread before the I/O starts. (The first design sent every
//! request over a channel to the ring thread and woke it with an eventfd; at queue depth 1
//! that wake-up of a sleeping thread was a third of the latency on a virtual machine, see
//! `BENCHMARKS.md`.) When requests are already in flight, the task wakes the ring thread
//! instead (through the eventfd it keeps polled, and only if it is not awake anyway), which
//! submits everything that arrived meanwhile in one call: at depth 32 that batching measured
//! better than every task entering the kernel alone. At the in-flight cap a request waits in
//! a queue that the thread drains as room frees up.
//!
//! The ring thread sleeps in `io_uring_enter(GETEVENTS)` without the lock, reaps every
//! completion when it wakes, continues short transfers, starts queued requests, submits, and
//! answers callers through `tokio::sync::oneshot` channels outside the lock. Only it reads
//! the completion queue; the submission queue is only written under the lock.
//!
//! The ring owns every in-flight request, including its [`IoBuf`], in a slot table indexed by
//! `user_data`. Only a completion removes an entry, so a caller dropping its future merely
//! drops the receiving end of the oneshot: the kernel keeps writing into memory that is still
//! owned, and the buffer is freed when its completion arrives. For the same reason the thread
//! outlives the last [`UringFile`] handle until everything in flight has completed; the last
//! handle wakes it through an eventfd it keeps polled, so that it notices.
//!
//! Short transfers (signals, EOF, transfers over the per-SQE size limit) are continued by
//! resubmitting the remainder; a read reaching EOF zero-fills the rest of the buffer.
//!
//! A ring per file keeps the design simple and isolates files from each other; the cost is one
//! thread and one small ring (256 entries, a few pages) per open image, which is fine for the
//! handful of files (an image and its backing chain) a process normally has open.
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
use tokio::sync::oneshot;

use super::buf::{check_aligned, checked_end};
use super::open::{open_std, FileOptions, DIRECT_ALIGNMENT};
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
}

struct Core {
    /// In-flight requests by `user_data`; `None` entries are listed in `free`.
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    in_flight: usize,
    /// Requests waiting for room under `max_in_flight`.
    queued: VecDeque<Op>,
    /// The eventfd poll is in the kernel.
    wake_armed: bool,
    /// The completion thread is awake and will submit whatever is queued before it sleeps
    /// again, so a task need not make its own `io_uring_enter` call: requests arriving while
    /// completions are being handled go to the kernel together.
    thread_awake: bool,
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
    Fsync {
        reply: oneshot::Sender<io::Result<()>>,
    },
}

impl Op {
    /// Answers the caller. If the caller has gone away, the buffer is dropped (freed) here.
    fn finish(self, result: io::Result<()>) {
        match self {
            Op::Read { buf, reply, .. } | Op::Write { buf, reply, .. } => {
                let _ = reply.send(result.map(|()| buf));
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
            Op::Fsync { reply } => {
                let _ = reply.send(Err(err));
            }
        }
    }
}

fn thread_gone() -> io::Error {
    io::Error::other("the io_uring thread has stopped")
}

impl UringFile {
    /// Opens `path` with `opts` (`opts.aio` is ignored) on a new ring.
    ///
    /// Fails (rather than falling back) if io_uring is unavailable; [`super::open_file`] is the
    /// entry point that falls back to threads.
    pub fn open(path: &Path, opts: &FileOptions) -> io::Result<UringFile> {
        UringFile::from_file(open_std(path, opts)?)
    }

    /// Starts a ring and its completion thread for an open file. If the file was opened with
    /// O_DIRECT (detected from its status flags), reads and writes must be aligned to
    /// [`BlockFile::alignment`].
    ///
    /// Returns an error, never panics, when io_uring is unavailable: ENOSYS (old kernel or
    /// seccomp), EPERM (seccomp, `kernel.io_uring_disabled`), ENOMEM (memlock limit on kernels
    /// before 5.12), or `Unsupported` when the kernel lacks an opcode this backend needs (< 5.6).
    pub fn from_file(file: File) -> io::Result<UringFile> {
        #[cfg(test)]
        if tests::SIMULATE_SECCOMP.get() {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        let uring = IoUring::new(RING_ENTRIES)?;
        check_opcodes(&uring)?;
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
        let ring = Arc::new(Ring {
            uring,
            core: Mutex::new(Core {
                slots: Vec::new(),
                free: Vec::new(),
                in_flight: 0,
                queued: VecDeque::new(),
                wake_armed: false,
                thread_awake: false,
                disconnected: false,
                stopped: None,
            }),
            file: Arc::clone(&file),
            wake_fd: new_eventfd()?,
            stats: Arc::new(Stats::default()),
            align,
            max_in_flight,
        });
        {
            let mut core = ring.lock();
            ring.arm_wake(&mut core)?;
        }
        ring.submit()?;
        let worker = Arc::clone(&ring);
        std::thread::Builder::new()
            .name("qcow2-io-uring".into())
            .spawn(move || worker.run())?;
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

    async fn transfer(&self, buf: IoBuf, offset: u64, write: bool) -> io::Result<IoBuf> {
        check_aligned(self.align, &buf, offset)?;
        checked_end(offset, buf.len() as u64)?;
        if buf.is_empty() {
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
        // Mark first, then wake the thread so that it observes the disconnection.
        self.ring.lock().disconnected = true;
        wake(&self.ring.wake_fd);
    }
}

impl BlockFile for UringFile {
    fn read_at(&self, buf: IoBuf, offset: u64) -> IoFuture<'_, IoBuf> {
        Box::pin(self.transfer(buf, offset, false))
    }

    fn write_at(&self, buf: IoBuf, offset: u64) -> IoFuture<'_, IoBuf> {
        Box::pin(self.transfer(buf, offset, true))
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
        match &mut self.op {
            Op::Read { buf, .. } => {
                self.done += n;
                // EOF: nothing more to read, or (O_DIRECT) a short read ending off a block
                // boundary, which only EOF causes and which could not be continued anyway.
                let eof = n == 0 || self.done % align != 0;
                if self.done >= buf.len() {
                    Progress::Done(Ok(()))
                } else if eof {
                    buf[self.done..].fill(0);
                    Progress::Done(Ok(()))
                } else {
                    Progress::Continue
                }
            }
            Op::Write { buf, offset, .. } => {
                if n == 0 {
                    return Progress::Done(Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!("write at {} wrote nothing", *offset + self.done as u64),
                    )));
                }
                self.done += n;
                if self.done >= buf.len() {
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
}

/// `IORING_ENTER_GETEVENTS` (linux/io_uring.h): wait for completions.
const ENTER_GETEVENTS: u32 = 1;

impl Ring {
    fn lock(&self) -> MutexGuard<'_, Core> {
        // Nothing below panics while holding the lock; should it, the tables are still
        // consistent enough to answer every request with an error.
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a request from a task: submits it at once when there is room in the ring,
    /// otherwise queues it for the completion thread.
    fn accept(&self, op: Op) -> io::Result<()> {
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
        // A request arriving while the completion thread is awake is submitted by it,
        // together with the others, before it sleeps again. Otherwise a lone request is
        // submitted by its own task (no thread hop before the I/O starts), and one that
        // joins others in flight wakes the thread, which submits everything that arrives
        // meanwhile in one call (one doorbell for many requests, as a dedicated submitter).
        let then = if core.thread_awake {
            Then::Nothing
        } else if core.in_flight < INLINE_DEPTH {
            Then::Submit
        } else {
            core.thread_awake = true;
            Then::Wake
        };
        let started = self.start(&mut core, op);
        drop(core);
        let submitted = match (started, then) {
            (Err(e), _) => Err(e),
            (Ok(()), Then::Submit) => self.submit(),
            (Ok(()), Then::Wake) => {
                wake(&self.wake_fd);
                Ok(())
            }
            (Ok(()), Then::Nothing) => Ok(()),
        };
        if let Err(e) = submitted {
            // The request is in its slot either way; the completion thread retries the
            // submission (and fails every request if the ring is broken).
            tracing::debug!("io_uring submission from a task failed ({e}); handing over");
            wake(&self.wake_fd);
        }
        Ok(())
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
        let fd = types::Fd(self.file.as_raw_fd());
        let Some(entry) = core.slots.get_mut(slot).and_then(Option::as_mut) else {
            return Ok(());
        };
        let done = entry.done;
        let sqe = match &mut entry.op {
            Op::Read { buf, offset, .. } => {
                let n = (buf.len() - done).min(MAX_CHUNK) as u32;
                opcode::Read::new(fd, buf.as_mut_ptr().wrapping_add(done), n)
                    .offset(*offset + done as u64)
                    .build()
            }
            Op::Write { buf, offset, .. } => {
                let n = (buf.len() - done).min(MAX_CHUNK) as u32;
                opcode::Write::new(fd, buf.as_ptr().wrapping_add(done), n)
                    .offset(*offset + done as u64)
                    .build()
            }
            Op::Fsync { .. } => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        };
        // SAFETY: the SQE points at `buf[done..done + n]`, which is in bounds (`done` is less
        // than the length, otherwise the request would have completed). That memory is owned by
        // `core.slots[slot]`, whose entry is neither read, written nor removed until this SQE's
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
                core.thread_awake = false;
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
            core.thread_awake = true;
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
}
