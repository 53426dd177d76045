//! Image locking, byte for byte as QEMU's file driver does it (`block/file-posix.c`), so that
//! QEMU and this engine keep each other out of an image exactly as two QEMU processes do.
//!
//! QEMU expresses what a user of a file does and tolerates as permissions: *consistent
//! read*, *write*, *write unchanged* and *resize* (bits 0–3). For each permission it holds,
//! a user takes a shared OFD lock on byte `100 + bit`; for each permission it does **not**
//! share with others, on byte `200 + bit`. Only shared (read) locks are ever set, so setting
//! them never fails because of someone else; the exclusion comes from the checks after it:
//! for each permission held, byte `200 + bit` must be unlocked by everyone else (nobody
//! refuses it), and for each permission not shared, byte `100 + bit` must be (nobody holds
//! it). `F_OFD_GETLK` with a write lock answers "would this conflict with another open file
//! description", which ignores our own locks.
//!
//! OFD locks belong to an open file description, not to a process: two opens of one image in
//! the same process exclude each other as two processes do, and closing some *other*
//! descriptor of the file (the per-thread descriptors of the inline path) releases nothing.
//! The lock lives on a descriptor of its own, opened on the path before the image itself, and
//! is released when [`FileLock`] drops (all of an image's handles are gone, or it is closed).
//!
//! Where the kernel has no OFD locks, [`Locking::Auto`] (QEMU's `locking=auto`) opens without
//! locks and [`Locking::On`] refuses with a typed error (QEMU would fall back to POSIX locks,
//! which any `close` of the file in the process drops: not a lock worth having). A file
//! system that refuses locks fails the open, as in QEMU (`locking=off` opens it).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::io::{BlockFile, IoBuf, IoFuture};

/// Whether images are locked against other users (QEMU's `file.locking`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Locking {
    /// Lock where the kernel has OFD locks; open without locks where it has none.
    #[default]
    Auto,
    /// Always lock; refuse to open where OFD locks are unavailable.
    On,
    /// Never lock (and never check others' locks).
    Off,
}

impl FromStr for Locking {
    type Err = Error;

    fn from_str(s: &str) -> Result<Locking> {
        match s {
            "auto" => Ok(Locking::Auto),
            "on" => Ok(Locking::On),
            "off" => Ok(Locking::Off),
            other => Err(Error::InvalidArgument(format!(
                "invalid locking mode '{other}' (auto, on, off)"
            ))),
        }
    }
}

/// One of QEMU's block permissions, with its bit number in QEMU's `BLK_PERM_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Permission {
    /// `BLK_PERM_CONSISTENT_READ`: reads see what was last written.
    ConsistentRead = 0,
    /// `BLK_PERM_WRITE`: may change the contents.
    Write = 1,
    /// `BLK_PERM_WRITE_UNCHANGED`: may write data that does not change what a reader sees.
    WriteUnchanged = 2,
    /// `BLK_PERM_RESIZE`: may change the size.
    Resize = 3,
}

impl Permission {
    const ALL: [Permission; 4] = [
        Permission::ConsistentRead,
        Permission::Write,
        Permission::WriteUnchanged,
        Permission::Resize,
    ];

    /// QEMU's name for it, as its error messages spell it.
    pub fn name(self) -> &'static str {
        match self {
            Permission::ConsistentRead => "consistent read",
            Permission::Write => "write",
            Permission::WriteUnchanged => "write unchanged",
            Permission::Resize => "resize",
        }
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// Byte of the permission lock for permission bit `b` (`RAW_LOCK_PERM_BASE`).
const PERM_BASE: i64 = 100;
/// Byte of the "not shared" lock for permission bit `b` (`RAW_LOCK_SHARED_BASE`).
const SHARED_BASE: i64 = 200;

/// What a user of a file holds and what it lets others hold: the permissions QEMU's drivers
/// ask of a file, read off `/proc/locks` while QEMU 10.0 held each kind of file (the lock
/// bytes each constructor gives are in its comment, `1xx` held, `2xx` not shared).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Access {
    perm: u8,
    shared: u8,
}

const READ: u8 = 1 << Permission::ConsistentRead as u8;
const WRITE: u8 = 1 << Permission::Write as u8;
const UNCHANGED: u8 = 1 << Permission::WriteUnchanged as u8;
const RESIZE: u8 = 1 << Permission::Resize as u8;
const ALL: u8 = READ | WRITE | UNCHANGED | RESIZE;

impl Access {
    /// The file of a qcow2 image. Read-write: it reads, writes and grows the file and lets
    /// nobody else write or resize it, its metadata being there (100, 101, 103, 201, 203).
    /// Read-only, and as a backing file: reads, and still lets nobody write or resize
    /// (100, 201, 203). `force_share` (qemu-img `-U`) shares everything (100), for
    /// inspecting an image in use; it refuses writes.
    pub(crate) fn qcow2(read_only: bool, force_share: bool) -> Result<Access> {
        Ok(match (read_only, force_share) {
            (false, true) => return Err(Access::force_share_writable()),
            (false, false) => Access {
                perm: READ | WRITE | RESIZE,
                shared: READ | UNCHANGED,
            },
            (true, false) => Access {
                perm: READ,
                shared: READ | UNCHANGED,
            },
            (true, true) => Access::read_shared(),
        })
    }

    /// An external data file: as the image's file, but writes by others are shared (guest
    /// data, no metadata): 100, 101, 103, 203 read-write; 100, 203 read-only.
    pub(crate) fn data_file(read_only: bool, force_share: bool) -> Result<Access> {
        Ok(match (read_only, force_share) {
            (false, true) => return Err(Access::force_share_writable()),
            (false, false) => Access {
                perm: READ | WRITE | RESIZE,
                shared: ALL & !RESIZE,
            },
            (true, false) => Access {
                perm: READ,
                shared: ALL & !RESIZE,
            },
            (true, true) => Access::read_shared(),
        })
    }

    /// A raw image, or a raw backing file: QEMU's raw driver keeps no metadata and shares
    /// everything; it holds reads (100) and, read-write, writes (100, 101).
    pub(crate) fn raw(read_only: bool) -> Access {
        Access {
            perm: if read_only { READ } else { READ | WRITE },
            shared: ALL,
        }
    }

    fn read_shared() -> Access {
        Access {
            perm: READ,
            shared: ALL,
        }
    }

    fn force_share_writable() -> Error {
        Error::InvalidArgument("force-share can only be used with read-only images".into())
    }

    fn holds(self, p: Permission) -> bool {
        self.perm & p.bit() != 0
    }

    fn shares(self, p: Permission) -> bool {
        self.shared & p.bit() != 0
    }
}

/// The locks of one file, held for as long as this value lives.
///
/// Invariant: `fd` is an open file description of the locked file on which every lock byte
/// of `access` is set, and the checks of [`FileLock::acquire`] passed after they were set.
#[derive(Debug)]
pub(crate) struct FileLock {
    fd: File,
    path: PathBuf,
    access: Access,
}

impl FileLock {
    /// Locks `path` for `access`. `create` creates a missing file (never truncates: an image
    /// in use must not be emptied by an open that is then refused). `Ok(None)` when locking
    /// is off, or `Auto` on a kernel without OFD locks.
    pub(crate) fn acquire(
        path: &Path,
        access: Access,
        locking: Locking,
        create: bool,
    ) -> Result<Option<FileLock>> {
        if locking == Locking::Off {
            return Ok(None);
        }
        let fd = std::fs::OpenOptions::new()
            .read(true)
            .write(create)
            .create(create)
            .open(path)
            .map_err(Error::io("opening the image for locking"))?;
        let lock = FileLock {
            fd,
            path: path.to_path_buf(),
            access,
        };
        match lock.apply() {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && locking == Locking::Auto => {
                // No OFD locks in this kernel (before 3.15): QEMU's locking=auto opens
                // without locks.
                tracing::debug!(path = %path.display(), "no OFD locks: opening unlocked");
                return Ok(None);
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                return Err(Error::Unsupported {
                    feature: "image locking",
                    detail: "the kernel has no OFD locks (locking=off opens without them)".into(),
                })
            }
            Err(e) => return Err(Error::io("locking the image")(e)),
        }
        lock.check()?;
        Ok(Some(lock))
    }

    /// Sets the shared lock bytes of `access` (and clears the others, for a later change).
    fn apply(&self) -> io::Result<()> {
        for p in Permission::ALL {
            let b = p as i64;
            set_lock(&self.fd, PERM_BASE + b, self.access.holds(p))?;
            set_lock(&self.fd, SHARED_BASE + b, !self.access.shares(p))?;
        }
        Ok(())
    }

    /// Fails if another user refuses a permission we hold or holds one we do not share.
    fn check(&self) -> Result<()> {
        let conflict = |byte: i64| {
            locked_by_others(&self.fd, byte).map_err(Error::io("testing the image's locks"))
        };
        for p in Permission::ALL {
            if self.access.holds(p) && conflict(SHARED_BASE + p as i64)? {
                return Err(self.locked(p, false));
            }
        }
        for p in Permission::ALL {
            if !self.access.shares(p) && conflict(PERM_BASE + p as i64)? {
                return Err(self.locked(p, true));
            }
        }
        Ok(())
    }

    fn locked(&self, permission: Permission, shared: bool) -> Error {
        Error::Locked {
            path: self.path.clone(),
            permission,
            shared,
        }
    }
}

/// A file opened outside an [`crate::Image`] (a raw backing file, a raw source or target of
/// an operation) together with its locks, which last as long as the file.
#[derive(Debug)]
pub(crate) struct LockedFile {
    file: Arc<dyn BlockFile>,
    _lock: FileLock,
}

impl LockedFile {
    /// `file` itself when nothing was locked, else the file wrapped with its lock.
    pub(crate) fn wrap(file: Arc<dyn BlockFile>, lock: Option<FileLock>) -> Arc<dyn BlockFile> {
        match lock {
            None => file,
            Some(lock) => Arc::new(LockedFile { file, _lock: lock }),
        }
    }
}

impl BlockFile for LockedFile {
    fn read_at(&self, buf: IoBuf, offset: u64) -> IoFuture<'_, IoBuf> {
        self.file.read_at(buf, offset)
    }
    fn write_at(&self, buf: IoBuf, offset: u64) -> IoFuture<'_, IoBuf> {
        self.file.write_at(buf, offset)
    }
    fn read_vectored_at(&self, bufs: Vec<IoBuf>, offset: u64) -> IoFuture<'_, Vec<IoBuf>> {
        self.file.read_vectored_at(bufs, offset)
    }
    fn write_vectored_at(&self, bufs: Vec<IoBuf>, offset: u64) -> IoFuture<'_, Vec<IoBuf>> {
        self.file.write_vectored_at(bufs, offset)
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        self.file.flush()
    }
    fn len(&self) -> IoFuture<'_, u64> {
        self.file.len()
    }
    fn set_len(&self, len: u64) -> IoFuture<'_, ()> {
        self.file.set_len(len)
    }
    fn allocate(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.file.allocate(offset, len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.file.punch_hole(offset, len)
    }
    fn zero_range(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.file.zero_range(offset, len)
    }
    fn holes(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<(u64, u64)>> {
        self.file.holes(offset, len)
    }
    fn allocated_bytes(&self) -> IoFuture<'_, u64> {
        self.file.allocated_bytes()
    }
    fn alignment(&self) -> usize {
        self.file.alignment()
    }
}

/// Releases every lock byte before the descriptor closes. Closing alone is not enough: a
/// child forked by another thread of this process holds a copy of the descriptor until it
/// execs (`O_CLOEXEC` acts only then), and an OFD lock lives as long as any descriptor of
/// its open file description. Unlocking acts on the description itself, so a reopen right
/// after the drop never finds our own lock in the way.
impl Drop for FileLock {
    fn drop(&mut self) {
        let mut fl = flock(libc::F_UNLCK, 0);
        fl.l_len = 0; // to the end of the file and beyond: every byte we may hold
                      // SAFETY: as in `set_lock`.
        let r = unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
        if r == -1 {
            // Closing still releases it once no copy of the descriptor remains.
            tracing::debug!(path = %self.path.display(), error = %io::Error::last_os_error(), "unlocking");
        }
    }
}

fn flock(kind: libc::c_int, byte: i64) -> libc::flock {
    // SAFETY: `flock` is a plain C struct of integers, for which all zeroes is a valid value
    // (and the value F_OFD_* requires for `l_pid`).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    fl
}

fn set_lock(fd: &File, byte: i64, on: bool) -> io::Result<()> {
    let fl = flock(if on { libc::F_RDLCK } else { libc::F_UNLCK }, byte);
    // SAFETY: `fd` is an open descriptor for the duration of the call and `fl` a valid
    // `struct flock` that the kernel only reads for F_OFD_SETLK.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether another open file description holds a lock on `byte` that a write lock would
/// conflict with (QEMU's `qemu_lock_fd_test`).
fn locked_by_others(fd: &File, byte: i64) -> io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK, byte);
    // SAFETY: as in `set_lock`; for F_OFD_GETLK the kernel writes the answer into `fl`,
    // which is a valid, exclusively borrowed `struct flock`.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

#[cfg(test)]
mod proc_locks;

#[cfg(test)]
mod tests {
    use super::*;

    fn lock(path: &Path, read_only: bool, force_share: bool) -> Result<Option<FileLock>> {
        FileLock::acquire(
            path,
            Access::qcow2(read_only, force_share)?,
            Locking::On,
            false,
        )
    }

    fn file() -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        std::fs::write(&p, b"x").unwrap();
        (d, p)
    }

    #[test]
    fn two_writers_exclude_each_other_within_one_process() {
        let (_d, p) = file();
        let a = lock(&p, false, false).unwrap().expect("OFD locks on Linux");
        let e = lock(&p, false, false).unwrap_err();
        // The second writer finds the first one's "write is not shared" byte.
        assert!(
            matches!(
                &e,
                Error::Locked {
                    permission: Permission::ConsistentRead | Permission::Write,
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string().contains("Is another process using the image"),
            "{e}"
        );
        drop(a);
        lock(&p, false, false).unwrap().unwrap();
    }

    #[test]
    fn a_dropped_lock_is_gone_while_a_copy_of_its_descriptor_lives() {
        // A duplicate of the descriptor is what a child forked by another thread holds until
        // it execs (the CI failure of 2026-12-03: a reopen right after a drop was refused).
        let (_d, p) = file();
        let a = lock(&p, false, false).unwrap().unwrap();
        let copy = a.fd.try_clone().unwrap();
        drop(a);
        let _b = lock(&p, false, false).unwrap().unwrap();
        drop(copy);
    }

    #[test]
    fn readers_share_and_keep_writers_out() {
        let (_d, p) = file();
        let r1 = lock(&p, true, false).unwrap().unwrap();
        let _r2 = lock(&p, true, false).unwrap().unwrap();
        let e = lock(&p, false, false).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Locked {
                    permission: Permission::Write,
                    shared: false,
                    ..
                }
            ),
            "{e}"
        );
        drop(r1);
        drop(_r2);
        let _w = lock(&p, false, false).unwrap().unwrap();
        let e = lock(&p, true, false).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Locked {
                    permission: Permission::Write,
                    shared: true,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(
            e.to_string().lines().next().unwrap(),
            "Failed to get shared \"write\" lock"
        );
    }

    #[test]
    fn force_share_reads_beside_a_writer_and_is_read_only() {
        let (_d, p) = file();
        let _w = lock(&p, false, false).unwrap().unwrap();
        let _r = lock(&p, true, true).unwrap().unwrap();
        assert!(matches!(
            lock(&p, false, true),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn locking_off_neither_takes_nor_checks() {
        let (_d, p) = file();
        let _w = lock(&p, false, false).unwrap().unwrap();
        let none = FileLock::acquire(
            &p,
            Access::qcow2(false, false).unwrap(),
            Locking::Off,
            false,
        )
        .unwrap();
        assert!(none.is_none());
    }

    #[test]
    fn a_refused_create_does_not_truncate() {
        let (_d, p) = file();
        let _w = lock(&p, false, false).unwrap().unwrap();
        assert!(
            FileLock::acquire(&p, Access::qcow2(false, false).unwrap(), Locking::On, true).is_err()
        );
        assert_eq!(std::fs::read(&p).unwrap(), b"x");
    }

    /// The bytes QEMU 10.0 holds for each kind of file, read off `/proc/locks` while
    /// qemu-nbd, qemu-io and qemu-img held them (`qemu-interop/locking.rs` compares live).
    #[test]
    fn lock_bytes_are_qemus() {
        let cases: [(Access, &[i64]); 7] = [
            (
                Access::qcow2(false, false).unwrap(),
                &[100, 101, 103, 201, 203],
            ),
            (Access::qcow2(true, false).unwrap(), &[100, 201, 203]),
            (Access::qcow2(true, true).unwrap(), &[100]),
            (
                Access::data_file(false, false).unwrap(),
                &[100, 101, 103, 203],
            ),
            (Access::data_file(true, false).unwrap(), &[100, 203]),
            (Access::raw(true), &[100]),
            (Access::raw(false), &[100, 101]),
        ];
        for (access, bytes) in cases {
            let (_d, p) = file();
            let l = FileLock::acquire(&p, access, Locking::On, false)
                .unwrap()
                .unwrap();
            assert_eq!(proc_locks::ofd_lock_bytes(&p), bytes, "{access:?}");
            drop(l);
            assert_eq!(proc_locks::ofd_lock_bytes(&p), Vec::<i64>::new());
        }
    }

    #[test]
    fn a_data_file_lets_raw_writers_in_but_not_another_image() {
        let (_d, p) = file();
        let on = |a: Access| FileLock::acquire(&p, a, Locking::On, false);
        let _img = on(Access::data_file(false, false).unwrap())
            .unwrap()
            .unwrap();
        let _raw = on(Access::raw(false)).unwrap().unwrap();
        let e = on(Access::qcow2(false, false).unwrap()).unwrap_err();
        assert!(matches!(e, Error::Locked { .. }), "{e}");
    }

    #[test]
    fn parses_qemu_spellings() {
        assert_eq!("auto".parse::<Locking>().unwrap(), Locking::Auto);
        assert_eq!("on".parse::<Locking>().unwrap(), Locking::On);
        assert_eq!("off".parse::<Locking>().unwrap(), Locking::Off);
        assert!("yes".parse::<Locking>().is_err());
    }
}
