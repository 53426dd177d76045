//! A fault-injecting in-memory [`BlockFile`] for crash-consistency and error-path tests.
//!
//! A [`FaultFile`] is an in-memory file that records every mutating operation (write, flush,
//! truncate, zero range, ...) in one log shared by all the files of a *power domain*: files
//! created with [`FaultFile::sibling`] share it, so the order between, say, a qcow2 file and
//! its external data file is recorded too. Each logged operation is an *event*; event `n` is
//! crash point `n` ("power cut just before event `n`").
//!
//! After a power cut before event `n`, what a file holds is modelled as a disk with a
//! volatile write cache would leave it:
//!
//! * every operation on that file logged before its last flush that precedes `n` is durable;
//! * of the operations after that flush (the *unflushed* ones), any subset survives, applied
//!   in their original order, and a surviving write may be *torn*: only some of its 512-byte
//!   sectors (aligned to the file, as a disk sees them) reach the media. A sector itself is
//!   atomic. Truncations, zeroings and preallocations survive whole or not at all.
//!
//! [`FaultFile::crash_states`] enumerates a bounded, deterministic (seeded) selection of
//! those states for a crash point; [`FaultFile::crash_state`] builds one chosen explicitly.
//! Because the engine behaves identically up to the crash point whether or not power is cut
//! there, a test can record a whole workload once and examine every crash point afterwards;
//! [`FaultFile::cut_power_before`] cuts power for real (every later operation fails) for
//! tests that want the engine to see it.
//!
//! [`FaultFile::fail_writes`] makes a chosen write (or every write from it on) fail with
//! `EIO` or `ENOSPC` without changing the file, to test that errors reach the caller and
//! leave the image consistent.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use super::buf::checked_end;
use super::{BlockFile, IoBuf, IoFuture};

/// Sector size at which unflushed writes may be torn.
pub const SECTOR: u64 = 512;

/// A mutating operation on one file of a power domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultOp {
    /// `write_at(data, offset)`.
    Write {
        /// File offset.
        offset: u64,
        /// The bytes written.
        data: Arc<[u8]>,
    },
    /// `flush()`: everything logged on this file before it is durable.
    Flush,
    /// `set_len(len)`.
    SetLen(u64),
    /// `zero_range` (`grow`: the file is extended to cover it) or `punch_hole` (no growth).
    Zero {
        /// File offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Whether the file grows to cover the range.
        grow: bool,
    },
    /// `allocate(offset, len)`: only grows the file.
    Allocate {
        /// File offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
}

impl FaultOp {
    /// Whether this is a flush.
    pub fn is_flush(&self) -> bool {
        matches!(self, FaultOp::Flush)
    }

    fn sectors(&self) -> u64 {
        match self {
            FaultOp::Write { offset, data } if !data.is_empty() => {
                let end = offset + data.len() as u64;
                (end - 1) / SECTOR - offset / SECTOR + 1
            }
            _ => 1,
        }
    }
}

/// One logged event: which file of the domain, and what happened to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultEvent {
    /// The file's id within its power domain ([`FaultFile::id`]).
    pub file: usize,
    /// The operation.
    pub op: FaultOp,
}

/// The error an injected write failure reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultErrno {
    /// `EIO`: the device failed.
    Eio,
    /// `ENOSPC`: the file system is full.
    Enospc,
}

impl FaultErrno {
    /// The raw OS error number.
    pub fn raw(self) -> i32 {
        match self {
            FaultErrno::Eio => libc::EIO,
            FaultErrno::Enospc => libc::ENOSPC,
        }
    }
}

/// Which writes fail: counted over `write_at` calls of the whole power domain, from 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteFailure {
    /// Index of the first write that fails.
    pub nth: u64,
    /// The error it fails with.
    pub errno: FaultErrno,
    /// Every write from `nth` on fails (a full disk), not just that one (a transient error).
    pub sticky: bool,
}

/// What happens to one unflushed operation in a crash state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Survival {
    /// Never reached the media.
    Lost,
    /// Reached the media completely.
    Whole,
    /// Only the sectors marked `true` reached the media (writes only; one flag per 512-byte
    /// sector the write touches, in order). Other operations treat this as `Whole` if any
    /// flag is set.
    Torn(Vec<bool>),
}

/// Contents of every file of a power domain after a power cut, indexed by file id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashState {
    /// A short description of which unflushed operations survived (for failure messages).
    pub label: String,
    /// File contents, indexed by [`FaultFile::id`].
    pub files: Vec<Vec<u8>>,
}

#[derive(Debug, Default)]
struct Domain {
    initial: Vec<Vec<u8>>,
    current: Vec<Vec<u8>>,
    log: Vec<FaultEvent>,
    /// Events with this index or later fail: power is cut before them.
    cut_before: Option<usize>,
    powered_off: bool,
    failure: Option<WriteFailure>,
    writes_attempted: u64,
    failed_writes: u64,
}

/// An in-memory file that records its writes and flushes and injects crashes and errors.
/// See the module documentation.
#[derive(Debug)]
pub struct FaultFile {
    id: usize,
    domain: Arc<Mutex<Domain>>,
}

fn power_cut() -> io::Error {
    io::Error::other("power cut (fault injection)")
}

impl FaultFile {
    /// A file with these initial contents, which count as durable, in a power domain of its
    /// own.
    pub fn new(initial: Vec<u8>) -> Arc<FaultFile> {
        let domain = Arc::new(Mutex::new(Domain::default()));
        Self::join(domain, initial)
    }

    /// Another file in the same power domain (same log, same power cut, same write
    /// counter), e.g. an external data file next to the qcow2 file.
    pub fn sibling(&self, initial: Vec<u8>) -> Arc<FaultFile> {
        Self::join(self.domain.clone(), initial)
    }

    fn join(domain: Arc<Mutex<Domain>>, initial: Vec<u8>) -> Arc<FaultFile> {
        let id = {
            let mut d = lock(&domain);
            d.initial.push(initial.clone());
            d.current.push(initial);
            d.current.len() - 1
        };
        Arc::new(FaultFile { id, domain })
    }

    /// This file's index in its power domain (and in [`CrashState::files`]).
    pub fn id(&self) -> usize {
        self.id
    }

    fn lock(&self) -> MutexGuard<'_, Domain> {
        lock(&self.domain)
    }

    /// Number of events logged so far in the power domain (the next event's index).
    pub fn events(&self) -> usize {
        self.lock().log.len()
    }

    /// The log of the whole power domain.
    pub fn log(&self) -> Vec<FaultEvent> {
        self.lock().log.clone()
    }

    /// `write_at` calls attempted so far in the power domain (failed ones included).
    pub fn writes_attempted(&self) -> u64 {
        self.lock().writes_attempted
    }

    /// Writes that failed because of [`FaultFile::fail_writes`].
    pub fn failed_writes(&self) -> u64 {
        self.lock().failed_writes
    }

    /// This file's current contents: every completed operation applied, as if all of them
    /// had reached the media.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().current[self.id].clone()
    }

    /// Cuts power before event `n`: that operation and every later one (reads included) on
    /// any file of the domain fail, and nothing more is logged.
    pub fn cut_power_before(&self, n: usize) {
        let mut d = self.lock();
        d.cut_before = Some(n);
        if d.log.len() >= n {
            d.powered_off = true;
        }
    }

    /// Injects write failures (see [`WriteFailure`]); `None` stops injecting.
    pub fn fail_writes(&self, failure: Option<WriteFailure>) {
        self.lock().failure = failure;
    }

    /// Number of unflushed operations at crash point `at`, per file id.
    pub fn unflushed_at(&self, at: usize) -> Vec<usize> {
        let d = self.lock();
        (0..d.initial.len())
            .map(|f| split_at_crash(&d.log, f, at).1.len())
            .collect()
    }

    /// The contents of every file after a power cut before event `at`, where
    /// `survival(file, k)` decides the fate of the `k`-th unflushed operation of `file`.
    pub fn crash_state(
        &self,
        at: usize,
        label: impl Into<String>,
        mut survival: impl FnMut(usize, usize, &FaultOp) -> Survival,
    ) -> CrashState {
        let d = self.lock();
        let at = at.min(d.log.len());
        let files = (0..d.initial.len())
            .map(|f| {
                let (durable, unflushed) = split_at_crash(&d.log, f, at);
                let mut bytes = d.initial[f].clone();
                for e in &d.log[..durable] {
                    if e.file == f {
                        apply(&mut bytes, &e.op, &Survival::Whole);
                    }
                }
                for (k, &i) in unflushed.iter().enumerate() {
                    let op = &d.log[i].op;
                    apply(&mut bytes, op, &survival(f, k, op));
                }
                bytes
            })
            .collect();
        CrashState {
            label: label.into(),
            files,
        }
    }

    /// Up to `max` distinct crash states for a power cut before event `at`, chosen
    /// deterministically from `seed`: nothing unflushed survives; everything survives; a
    /// prefix survives (a cache that drains in order); then random subsets, each surviving
    /// write whole or torn at sector granularity.
    pub fn crash_states(&self, at: usize, max: usize, seed: u64) -> Vec<CrashState> {
        let pending = self.unflushed_at(at);
        let total: usize = pending.iter().sum();
        let mut out: Vec<CrashState> = Vec::new();
        let push = |s: CrashState, out: &mut Vec<CrashState>| {
            if out.len() < max && !out.iter().any(|o| o.files == s.files) {
                out.push(s);
            }
        };
        push(
            self.crash_state(at, "none", |_, _, _| Survival::Lost),
            &mut out,
        );
        if total == 0 {
            return out;
        }
        push(
            self.crash_state(at, "all", |_, _, _| Survival::Whole),
            &mut out,
        );
        let mut rng = SplitMix(seed ^ (at as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        // A prefix of each file's unflushed operations (different lengths per file).
        let cuts: Vec<usize> = pending
            .iter()
            .map(|&n| rng.below(n as u64 + 1) as usize)
            .collect();
        push(
            self.crash_state(at, format!("prefix {cuts:?}"), |f, k, _| {
                if k < cuts[f] {
                    Survival::Whole
                } else {
                    Survival::Lost
                }
            }),
            &mut out,
        );
        // Random subsets with tears; a few more attempts than needed, since small logs
        // repeat states.
        for attempt in 0..max.saturating_mul(4) {
            if out.len() >= max {
                break;
            }
            let mut torn = 0;
            let mut lost = 0;
            let s = self.crash_state(at, String::new(), |_, _, op| match rng.below(3) {
                0 => {
                    lost += 1;
                    Survival::Lost
                }
                1 if op.sectors() > 1 => {
                    torn += 1;
                    Survival::Torn((0..op.sectors()).map(|_| rng.below(2) == 1).collect())
                }
                _ => Survival::Whole,
            });
            let s = CrashState {
                label: format!("random #{attempt}: {lost} of {total} lost, {torn} torn"),
                ..s
            };
            push(s, &mut out);
        }
        out
    }

    fn gate(&self, d: &mut Domain) -> io::Result<()> {
        if d.powered_off {
            return Err(power_cut());
        }
        if d.cut_before.is_some_and(|n| d.log.len() >= n) {
            d.powered_off = true;
            return Err(power_cut());
        }
        Ok(())
    }

    fn record(&self, op: FaultOp) -> io::Result<()> {
        let mut d = self.lock();
        self.gate(&mut d)?;
        if let FaultOp::Write { .. } = op {
            let n = d.writes_attempted;
            d.writes_attempted += 1;
            if let Some(f) = d.failure {
                if n == f.nth || (f.sticky && n > f.nth) {
                    d.failed_writes += 1;
                    return Err(io::Error::from_raw_os_error(f.errno.raw()));
                }
            }
        }
        let f = self.id;
        apply(&mut d.current[f], &op, &Survival::Whole);
        d.log.push(FaultEvent { file: f, op });
        Ok(())
    }
}

fn lock(d: &Mutex<Domain>) -> MutexGuard<'_, Domain> {
    // A panicking test thread cannot leave the vectors unsafe to use.
    d.lock().unwrap_or_else(|e| e.into_inner())
}

/// For file `f` and a crash before event `at`: how many log entries are durable (everything
/// before `f`'s last flush), and the indices of `f`'s unflushed operations.
fn split_at_crash(log: &[FaultEvent], f: usize, at: usize) -> (usize, Vec<usize>) {
    let at = at.min(log.len());
    let durable = log[..at]
        .iter()
        .rposition(|e| e.file == f && e.op.is_flush())
        .unwrap_or(0);
    let unflushed = (durable..at)
        .filter(|&i| log[i].file == f && !log[i].op.is_flush())
        .collect();
    (durable, unflushed)
}

fn to_usize(v: u64) -> usize {
    // Offsets were validated when the operation was accepted.
    usize::try_from(v).expect("offset fits in memory")
}

fn apply(bytes: &mut Vec<u8>, op: &FaultOp, how: &Survival) {
    if *how == Survival::Lost {
        return;
    }
    if let Survival::Torn(flags) = how {
        if !flags.iter().any(|&f| f) {
            return;
        }
    }
    match op {
        FaultOp::Write { offset, data } => {
            let end = to_usize(offset + data.len() as u64);
            let start = to_usize(*offset);
            let mut put = |from: usize, to: usize| {
                if bytes.len() < to {
                    bytes.resize(to, 0);
                }
                bytes[from..to].copy_from_slice(&data[from - start..to - start]);
            };
            match how {
                Survival::Torn(flags) => {
                    let first = start as u64 / SECTOR;
                    for (k, &keep) in flags.iter().enumerate() {
                        if keep {
                            let s = (first + k as u64) * SECTOR;
                            let from = to_usize(s).max(start);
                            let to = to_usize(s + SECTOR).min(end);
                            if from < to {
                                put(from, to);
                            }
                        }
                    }
                }
                _ => put(start, end),
            }
        }
        FaultOp::Flush => {}
        FaultOp::SetLen(len) => bytes.resize(to_usize(*len), 0),
        FaultOp::Zero { offset, len, grow } => {
            let start = to_usize(*offset);
            let mut end = to_usize(offset + len);
            if *grow && bytes.len() < end {
                bytes.resize(end, 0);
            }
            end = end.min(bytes.len());
            if start < end {
                bytes[start..end].fill(0);
            }
        }
        FaultOp::Allocate { offset, len } => {
            let end = to_usize(offset + len);
            if bytes.len() < end {
                bytes.resize(end, 0);
            }
        }
    }
}

/// `[offset, offset + len)` must fit in memory.
fn check_range(offset: u64, len: u64) -> io::Result<()> {
    let end = checked_end(offset, len)?;
    usize::try_from(end).map(|_| ()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("range {offset}+{len} does not fit in memory"),
        )
    })
}

/// A tiny deterministic generator (SplitMix64): enough to pick subsets reproducibly without
/// a dependency.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

impl BlockFile for FaultFile {
    fn read_at(&self, mut buf: IoBuf, offset: u64) -> IoFuture<'_, IoBuf> {
        Box::pin(async move {
            checked_end(offset, buf.len() as u64)?;
            let mut d = self.lock();
            self.gate(&mut d)?;
            let data = &d.current[self.id];
            let n = match usize::try_from(offset) {
                Ok(start) if start < data.len() => {
                    let n = buf.len().min(data.len() - start);
                    buf[..n].copy_from_slice(&data[start..start + n]);
                    n
                }
                _ => 0,
            };
            buf[n..].fill(0);
            Ok(buf)
        })
    }

    fn write_at(&self, buf: IoBuf, offset: u64) -> IoFuture<'_, IoBuf> {
        Box::pin(async move {
            check_range(offset, buf.len() as u64)?;
            if buf.is_empty() {
                return Ok(buf);
            }
            self.record(FaultOp::Write {
                offset,
                data: Arc::from(&buf[..]),
            })?;
            Ok(buf)
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move { self.record(FaultOp::Flush) })
    }

    fn len(&self) -> IoFuture<'_, u64> {
        Box::pin(async move {
            let mut d = self.lock();
            self.gate(&mut d)?;
            Ok(d.current[self.id].len() as u64)
        })
    }

    fn set_len(&self, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            check_range(0, len)?;
            self.record(FaultOp::SetLen(len))
        })
    }

    fn allocate(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            check_range(offset, len)?;
            self.record(FaultOp::Allocate { offset, len })
        })
    }

    fn punch_hole(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            check_range(offset, len)?;
            self.record(FaultOp::Zero {
                offset,
                len,
                grow: false,
            })
        })
    }

    fn zero_range(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            check_range(offset, len)?;
            self.record(FaultOp::Zero {
                offset,
                len,
                grow: true,
            })
        })
    }

    fn holes(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<(u64, u64)>> {
        // The simulated disk stores every byte below its length.
        Box::pin(async move { Ok(super::holes_past_end(self.len().await?, offset, len)) })
    }

    fn allocated_bytes(&self) -> IoFuture<'_, u64> {
        self.len()
    }

    fn alignment(&self) -> usize {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::testsuite::{block_file_suite, Fixture};

    async fn fixture() -> Option<Fixture> {
        Some(Fixture::new(FaultFile::new(Vec::new())))
    }

    block_file_suite!(fixture);

    async fn w(f: &FaultFile, data: &[u8], off: u64) -> io::Result<()> {
        f.write_at(IoBuf::from_vec(data.to_vec()), off)
            .await
            .map(|_| ())
    }

    #[tokio::test]
    async fn flushed_writes_are_durable_and_unflushed_ones_are_optional() {
        let f = FaultFile::new(vec![0; 1024]);
        w(&f, &[1; 512], 0).await.unwrap(); // event 0
        f.flush().await.unwrap(); // event 1
        w(&f, &[2; 1024], 0).await.unwrap(); // event 2
        assert_eq!(f.events(), 3);
        // Before the flush, even the first write may be lost.
        let s = f.crash_state(1, "", |_, _, _| Survival::Lost);
        assert_eq!(s.files[0], vec![0; 1024]);
        // After it, the first write is durable, the second optional and tearable.
        let none = f.crash_state(3, "", |_, _, _| Survival::Lost);
        assert_eq!(&none.files[0][..512], &[1; 512][..]);
        assert_eq!(&none.files[0][512..], &[0; 512][..]);
        let torn = f.crash_state(3, "", |_, _, _| Survival::Torn(vec![false, true]));
        assert_eq!(&torn.files[0][..512], &[1; 512][..]);
        assert_eq!(&torn.files[0][512..], &[2; 512][..]);
        let states = f.crash_states(3, 10, 7);
        assert!(states.len() >= 3, "none, all, torn variants: {states:?}");
        assert!(states.iter().any(|s| s.files[0] == vec![2; 1024]));
        assert_eq!(f.crash_states(3, 10, 7), states, "deterministic");
    }

    #[tokio::test]
    async fn tears_follow_absolute_sector_boundaries() {
        let f = FaultFile::new(vec![0; 2048]);
        w(&f, &[9; 600], 300).await.unwrap(); // sectors 0 and 1
        let s = f.crash_state(1, "", |_, _, op| {
            assert_eq!(op.sectors(), 2);
            Survival::Torn(vec![true, false])
        });
        assert!(s.files[0][300..512].iter().all(|&b| b == 9));
        assert!(s.files[0][512..900].iter().all(|&b| b == 0));
    }

    #[tokio::test]
    async fn siblings_flush_independently() {
        let a = FaultFile::new(Vec::new());
        let b = a.sibling(Vec::new());
        w(&a, &[1; 512], 0).await.unwrap(); // 0
        w(&b, &[2; 512], 0).await.unwrap(); // 1
        b.flush().await.unwrap(); // 2
        let s = a.crash_state(3, "", |_, _, _| Survival::Lost);
        assert_eq!(s.files[0], Vec::<u8>::new(), "a was never flushed");
        assert_eq!(s.files[1], vec![2; 512]);
        assert_eq!(a.unflushed_at(3), vec![1, 0]);
    }

    #[tokio::test]
    async fn power_cut_fails_everything_after_it() {
        let f = FaultFile::new(Vec::new());
        f.cut_power_before(1);
        w(&f, &[1; 10], 0).await.unwrap();
        assert!(w(&f, &[2; 10], 0).await.is_err());
        assert!(f.flush().await.is_err());
        assert!(f.read_at(IoBuf::zeroed(1, 1), 0).await.is_err());
        assert_eq!(f.events(), 1);
    }

    #[tokio::test]
    async fn injected_write_errors() {
        let f = FaultFile::new(Vec::new());
        f.fail_writes(Some(WriteFailure {
            nth: 1,
            errno: FaultErrno::Enospc,
            sticky: false,
        }));
        w(&f, &[1; 4], 0).await.unwrap();
        let e = w(&f, &[2; 4], 0).await.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        w(&f, &[3; 4], 4).await.unwrap();
        assert_eq!(f.contents(), [1, 1, 1, 1, 3, 3, 3, 3]);
        f.fail_writes(Some(WriteFailure {
            nth: 3,
            errno: FaultErrno::Eio,
            sticky: true,
        }));
        for _ in 0..3 {
            let e = w(&f, &[4; 4], 0).await.unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EIO));
        }
        assert_eq!(f.failed_writes(), 4);
        assert_eq!(f.writes_attempted(), 6);
    }
}
