//! The OFD lock bytes `/proc/locks` shows on a file, for the locking tests: `lock.rs`'s unit
//! tests, and `qemu-interop/locking.rs`, which includes this file with `#[path]`. Test code
//! only; it lives in the crate so that the packaged crate's tests build.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Every byte any process holds an OFD lock on in `path`, sorted, one entry per lock
/// ("1: OFDLCK ADVISORY READ -1 fe:00:INODE START END").
///
/// `/proc/locks` names a file as MAJOR:MINOR:INODE (device numbers in hex). The device
/// matters: other tests lock files on other file systems (a tmpfs they mount, /dev/shm)
/// whose inode numbers can equal this one's, and matching the inode alone read their locks
/// as this file's (a flaky failure under the parallel suite).
pub fn ofd_lock_bytes(path: &Path) -> Vec<i64> {
    let meta = std::fs::metadata(path).unwrap();
    let dev = meta.dev();
    let (major, minor) = (
        ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff),
        (dev & 0xff) | ((dev >> 12) & !0xff),
    );
    let id = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    let mut v = Vec::new();
    for l in std::fs::read_to_string("/proc/locks").unwrap().lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() >= 8 && f[1] == "OFDLCK" && f[5] == id {
            let (a, b): (i64, i64) = (f[6].parse().unwrap(), f[7].parse().unwrap());
            v.extend(a..=b);
        }
    }
    v.sort_unstable();
    v
}
