//! Opening image files and choosing a backend.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use super::{BlockFile, ThreadFile};

/// Alignment enforced on files opened with O_DIRECT.
///
/// 4096 satisfies every common device and file system (512-byte and 4K-sector disks, ext4,
/// XFS, btrfs with 4K pages); querying the real minimum (`STATX_DIOALIGN`) could relax it to 512
/// on some setups, which the engine does not need: qcow2 clusters are at least 512 bytes and
/// normally 64 KiB.
pub(crate) const DIRECT_ALIGNMENT: usize = 4096;

/// Which asynchronous I/O backend to use, spelled like qemu's `aio=` option.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Aio {
    /// A dedicated io_uring per file (`aio=io_uring`).
    #[default]
    IoUring,
    /// Blocking syscalls on Tokio's blocking thread pool (`aio=threads`).
    Threads,
}

impl Aio {
    /// The qemu spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Aio::IoUring => "io_uring",
            Aio::Threads => "threads",
        }
    }
}

impl fmt::Display for Aio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An `aio=` value this crate does not implement (e.g. qemu's `native`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown aio backend {0:?} (expected \"io_uring\" or \"threads\")")]
pub struct ParseAioError(String);

impl FromStr for Aio {
    type Err = ParseAioError;

    fn from_str(s: &str) -> Result<Aio, ParseAioError> {
        match s {
            "io_uring" => Ok(Aio::IoUring),
            "threads" => Ok(Aio::Threads),
            other => Err(ParseAioError(other.to_owned())),
        }
    }
}

/// How to open an image file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FileOptions {
    /// The backend; `None` means io_uring, falling back to threads when the kernel or a seccomp
    /// filter refuses io_uring. An explicit choice never falls back.
    pub aio: Option<Aio>,
    /// Bypass the page cache (O_DIRECT). Reads and writes must then use offsets, lengths and
    /// buffer addresses aligned to [`BlockFile::alignment`] (build buffers with
    /// `IoBuf::zeroed(len, file.alignment())`); the backends reject anything else with
    /// `InvalidInput` instead of letting the kernel fail it.
    pub direct: bool,
    /// Open for reading only; writes then fail with the OS error (EBADF).
    pub read_only: bool,
    /// Create the file if missing (needs `!read_only`).
    pub create: bool,
    /// Truncate the file to zero length (needs `!read_only`).
    pub truncate: bool,
    /// How the io_uring backend sets up its ring (ignored by the other backends).
    pub ring: RingOptions,
}

/// Who reaps the io_uring completion queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Completion {
    /// [`Completion::Reactor`] when the file is opened inside a Tokio runtime with its I/O
    /// driver enabled, [`Completion::Thread`] otherwise.
    #[default]
    Auto,
    /// The ring's descriptor is registered with the Tokio reactor of the runtime that opens
    /// the file, and a task of that runtime reaps: the worker that epoll wakes completes the
    /// waiting tasks directly, without a hop through another thread. Requests whose data is
    /// already in the page cache are reaped by the submitting task itself. If that runtime
    /// shuts down while the file is still in use, a ring thread takes over. Opening fails
    /// outside a runtime with an I/O driver.
    Reactor,
    /// A thread of the ring's own sleeps in `io_uring_enter` and answers the tasks: works on
    /// any runtime (or none), at the price of one cross-thread wake-up per completion.
    Thread,
}

/// io_uring setup options (`qcow2 bench --ring ...`); see `BENCHMARKS.md` for what each
/// measured.
///
/// `SINGLE_ISSUER` and `DEFER_TASKRUN` (which needs it) are not offered: a ring belongs to a
/// file, any worker thread of the runtime submits to it, and the kernel refuses submissions
/// from a second thread of a single-issuer ring. Registered buffers are not offered either:
/// every buffer is the caller's (slices, `bytes` buffers, mapped guest memory), and a
/// registered pool would need the copy that the owned-buffer API exists to avoid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct RingOptions {
    /// Who reaps completions.
    pub completion: Completion,
    /// `IORING_SETUP_SQPOLL` with this idle time in milliseconds: a kernel thread polls the
    /// submission queue, so submitting costs no system call while it is awake (it keeps a
    /// core busy meanwhile).
    pub sqpoll_idle_ms: Option<u32>,
    /// Registers the file with the ring (`IORING_REGISTER_FILES`) and submits with a fixed
    /// file index, which saves the kernel a descriptor lookup and reference per request.
    pub register_file: bool,
    /// `IORING_SETUP_COOP_TASKRUN` (with `TASKRUN_FLAG`): a completion that needs the
    /// submitting thread's context (every O_DIRECT read and write does) no longer interrupts
    /// that thread with an IPI while it runs in user space; it is finished at the thread's
    /// next system call, when it sleeps, or at its next interrupt at the latest (a few
    /// milliseconds). Fewer interrupts under load, at the price of that possible delay.
    pub coop_taskrun: bool,
    /// Buffered (not O_DIRECT) reads first try the page cache with `preadv2(RWF_NOWAIT)`,
    /// which never blocks, and only go through the ring when that cannot serve all of the
    /// read. On by default; after a run of misses the attempts become rare.
    pub nowait_reads: bool,
}

impl Default for RingOptions {
    fn default() -> RingOptions {
        RingOptions {
            completion: Completion::Auto,
            sqpoll_idle_ms: None,
            register_file: false,
            coop_taskrun: false,
            nowait_reads: true,
        }
    }
}

impl RingOptions {
    /// The defaults: automatic completion mode, no SQPOLL, no registered file.
    pub fn new() -> RingOptions {
        RingOptions::default()
    }

    /// Sets who reaps completions.
    pub fn completion(mut self, completion: Completion) -> RingOptions {
        self.completion = completion;
        self
    }

    /// Enables SQPOLL with the given idle time (`None` disables it).
    pub fn sqpoll(mut self, idle_ms: Option<u32>) -> RingOptions {
        self.sqpoll_idle_ms = idle_ms;
        self
    }

    /// Registers the file with the ring.
    pub fn register_file(mut self, yes: bool) -> RingOptions {
        self.register_file = yes;
        self
    }

    /// Sets `IORING_SETUP_COOP_TASKRUN` (see [`RingOptions::coop_taskrun`]).
    pub fn coop_taskrun(mut self, yes: bool) -> RingOptions {
        self.coop_taskrun = yes;
        self
    }

    /// Whether buffered reads try the page cache first.
    pub fn nowait_reads(mut self, yes: bool) -> RingOptions {
        self.nowait_reads = yes;
        self
    }
}

impl FromStr for RingOptions {
    type Err = ParseRingError;

    /// Parses a comma-separated list as `qcow2 bench --ring` takes it: `reactor`, `thread`,
    /// `sqpoll` (1000 ms idle) or `sqpoll=MS`, `fixed-file`, `coop-taskrun`, `nowait` /
    /// `no-nowait`;
    /// `default` for the defaults.
    fn from_str(s: &str) -> Result<RingOptions, ParseRingError> {
        let mut opts = RingOptions::default();
        for word in s.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            match word {
                "default" => {}
                "reactor" => opts.completion = Completion::Reactor,
                "thread" => opts.completion = Completion::Thread,
                "sqpoll" => opts.sqpoll_idle_ms = Some(1000),
                "fixed-file" => opts.register_file = true,
                "coop-taskrun" => opts.coop_taskrun = true,
                "nowait" => opts.nowait_reads = true,
                "no-nowait" => opts.nowait_reads = false,
                other => match other.strip_prefix("sqpoll=").map(str::parse::<u32>) {
                    Some(Ok(ms)) => opts.sqpoll_idle_ms = Some(ms),
                    _ => return Err(ParseRingError(other.to_owned())),
                },
            }
        }
        Ok(opts)
    }
}

/// A `--ring` word this crate does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown ring option {0:?} (expected reactor, thread, sqpoll, sqpoll=MS, fixed-file, coop-taskrun, nowait, no-nowait or default)"
)]
pub struct ParseRingError(String);

/// Opens `path` as a std file according to `opts` (the backend choice is the caller's).
///
/// File systems without O_DIRECT support (older tmpfs, some FUSE and network file systems)
/// refuse the open with EINVAL; that is reported as [`io::ErrorKind::Unsupported`] naming the
/// path, because a bare "Invalid argument" from an open call is baffling.
pub(crate) fn open_std(path: &Path, opts: &FileOptions) -> io::Result<File> {
    let mut oo = OpenOptions::new();
    oo.read(true)
        .write(!opts.read_only)
        .create(opts.create)
        .truncate(opts.truncate);
    if opts.direct {
        oo.custom_flags(libc::O_DIRECT);
    }
    oo.open(path).map_err(|e| {
        if opts.direct && e.raw_os_error() == Some(libc::EINVAL) {
            io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "{}: the file system does not support O_DIRECT (open failed: {e})",
                    path.display()
                ),
            )
        } else {
            e
        }
    })
}

/// Opens an image file with the requested backend.
///
/// With `opts.aio == None`, an io_uring that cannot be set up (ENOSYS, EPERM from seccomp or
/// `kernel.io_uring_disabled`, missing opcodes on old kernels, ENOMEM from a small memlock
/// limit) silently degrades to [`ThreadFile`]; the reason is logged at debug level.
pub fn open_file(path: &Path, opts: &FileOptions) -> io::Result<Arc<dyn BlockFile>> {
    let file = open_std(path, opts)?;
    let chosen: Arc<dyn BlockFile> = match opts.aio {
        Some(Aio::Threads) => Arc::new(ThreadFile::from_file(file)),
        Some(Aio::IoUring) => uring(file, &opts.ring)?,
        None => match try_uring(file, &opts.ring) {
            Ok(f) => f,
            Err((e, file)) => {
                tracing::debug!(
                    path = %path.display(),
                    "io_uring unavailable ({e}), using the thread pool backend"
                );
                Arc::new(ThreadFile::from_file(file))
            }
        },
    };
    tracing::debug!(path = %path.display(), backend = ?chosen, "opened image file");
    Ok(chosen)
}

#[cfg(target_os = "linux")]
fn uring(file: File, ring: &RingOptions) -> io::Result<Arc<dyn BlockFile>> {
    Ok(Arc::new(super::UringFile::with_options(file, ring)?))
}

/// Tries io_uring on a duplicate of the descriptor so that the original is still at hand for
/// the fallback (one extra `dup` per open is cheaper than threading the file back out of every
/// failure path of the ring setup).
#[cfg(target_os = "linux")]
fn try_uring(file: File, ring: &RingOptions) -> Result<Arc<dyn BlockFile>, (io::Error, File)> {
    match file
        .try_clone()
        .and_then(|dup| super::UringFile::with_options(dup, ring))
    {
        Ok(f) => Ok(Arc::new(f)),
        Err(e) => Err((e, file)),
    }
}

#[cfg(not(target_os = "linux"))]
fn uring(file: File, ring: &RingOptions) -> io::Result<Arc<dyn BlockFile>> {
    try_uring(file, ring).map_err(|(e, _)| e)
}

#[cfg(not(target_os = "linux"))]
fn try_uring(file: File, _ring: &RingOptions) -> Result<Arc<dyn BlockFile>, (io::Error, File)> {
    let e = io::Error::new(
        io::ErrorKind::Unsupported,
        "io_uring is only available on Linux",
    );
    Err((e, file))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::IoBuf;

    #[test]
    fn aio_parses_like_qemu() {
        assert_eq!("io_uring".parse::<Aio>(), Ok(Aio::IoUring));
        assert_eq!("threads".parse::<Aio>(), Ok(Aio::Threads));
        assert!("native".parse::<Aio>().is_err());
        assert!("io-uring".parse::<Aio>().is_err());
        assert_eq!(Aio::default(), Aio::IoUring);
        for aio in [Aio::IoUring, Aio::Threads] {
            assert_eq!(aio.to_string().parse::<Aio>(), Ok(aio));
        }
    }

    #[test]
    fn ring_options_parse_as_bench_takes_them() {
        assert_eq!("default".parse::<RingOptions>(), Ok(RingOptions::new()));
        assert_eq!("".parse::<RingOptions>(), Ok(RingOptions::new()));
        let all: RingOptions = "thread, sqpoll=5,fixed-file,coop-taskrun,no-nowait"
            .parse()
            .unwrap();
        assert_eq!(
            all,
            RingOptions::new()
                .completion(Completion::Thread)
                .sqpoll(Some(5))
                .register_file(true)
                .coop_taskrun(true)
                .nowait_reads(false)
        );
        assert_eq!(
            "sqpoll".parse::<RingOptions>().unwrap().sqpoll_idle_ms,
            Some(1000)
        );
        assert_eq!(
            "reactor".parse::<RingOptions>().unwrap().completion,
            Completion::Reactor
        );
        for bad in ["sqpoll=x", "single-issuer", "defer-taskrun", "coop"] {
            let err = bad.parse::<RingOptions>().unwrap_err();
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn open_file_creates_and_round_trips_with_every_choice() {
        let dir = tempfile::tempdir().unwrap();
        for aio in [None, Some(Aio::Threads), Some(Aio::IoUring)] {
            let path = dir.path().join(format!("{aio:?}.img"));
            let opts = FileOptions {
                aio,
                create: true,
                ..FileOptions::default()
            };
            let file = match open_file(&path, &opts) {
                Ok(f) => f,
                Err(e) if aio == Some(Aio::IoUring) => {
                    println!("skipping explicit io_uring: {e}");
                    continue;
                }
                Err(e) => panic!("{aio:?}: {e}"),
            };
            assert_eq!(file.alignment(), 1);
            file.write_at(IoBuf::from_vec(b"qcow2".to_vec()), 0)
                .await
                .unwrap();
            file.flush().await.unwrap();
            drop(file);
            let ro = FileOptions {
                aio,
                read_only: true,
                ..FileOptions::default()
            };
            let file = open_file(&path, &ro).unwrap();
            let buf = file.read_at(IoBuf::zeroed(5, 1), 0).await.unwrap();
            assert_eq!(&buf[..], b"qcow2");
            assert!(file.write_at(IoBuf::zeroed(1, 1), 0).await.is_err());
        }
    }

    #[test]
    fn auto_falls_back_to_threads_when_io_uring_is_refused() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        crate::io::uring::tests::SIMULATE_SECCOMP.set(true);
        let auto = open_file(tmp.path(), &FileOptions::default());
        let explicit = open_file(
            tmp.path(),
            &FileOptions {
                aio: Some(Aio::IoUring),
                ..FileOptions::default()
            },
        );
        crate::io::uring::tests::SIMULATE_SECCOMP.set(false);
        let auto = auto.unwrap();
        assert!(format!("{auto:?}").starts_with("ThreadFile"), "{auto:?}");
        let err = explicit.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    }

    #[test]
    fn open_errors_are_plain_io_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let err = open_file(&missing, &FileOptions::default()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        let opts = FileOptions {
            read_only: true,
            create: true,
            ..FileOptions::default()
        };
        assert!(open_file(&missing, &opts).is_err());
    }

    #[test]
    fn direct_open_reports_alignment() {
        let dir = tempfile::tempdir_in(crate::io::testsuite::direct_io_dir()).unwrap();
        let path = dir.path().join("direct.img");
        for aio in [Aio::Threads, Aio::IoUring] {
            let opts = FileOptions {
                aio: Some(aio),
                direct: true,
                create: true,
                ..FileOptions::default()
            };
            match open_file(&path, &opts) {
                Ok(file) => assert_eq!(file.alignment(), DIRECT_ALIGNMENT, "{aio}"),
                Err(e) => println!("skipping O_DIRECT with {aio}: {e}"),
            }
        }
    }
}
