//! Shared helpers for the engine's integration tests: an in-memory model of a disk and
//! random workloads.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// What the guest should see: plain bytes.
#[derive(Debug, Clone)]
pub struct Model {
    pub data: Vec<u8>,
}

impl Model {
    pub fn new(size: usize, backing: Option<&[u8]>) -> Self {
        let mut data = vec![0u8; size];
        if let Some(b) = backing {
            let n = b.len().min(size);
            data[..n].copy_from_slice(&b[..n]);
        }
        Model { data }
    }
}

/// One guest operation.
#[derive(Debug, Clone)]
pub enum Op {
    Write { off: u64, data: Vec<u8> },
    Zeroes { off: u64, len: u64, unmap: bool },
    Discard { off: u64, len: u64 },
    Read { off: u64, len: u64 },
    Flush,
    Reopen,
}

/// A random operation biased towards cluster-boundary edge cases.
pub fn random_op(rng: &mut SmallRng, size: u64, cluster: u64) -> Op {
    let pick_off = |rng: &mut SmallRng| -> u64 {
        match rng.gen_range(0..4) {
            0 => rng.gen_range(0..size / cluster) * cluster,
            1 => (rng.gen_range(0..size / cluster) * cluster + cluster - 1).min(size - 1),
            _ => rng.gen_range(0..size),
        }
    };
    let off = pick_off(rng);
    let max = (size - off).min(cluster * 3);
    let len = match rng.gen_range(0..3) {
        0 => rng.gen_range(1..=max.min(512)),
        1 => max.min(cluster),
        _ => rng.gen_range(1..=max),
    };
    match rng.gen_range(0..20) {
        0..=8 => {
            let seed: u8 = rng.gen();
            Op::Write {
                off,
                data: (0..len).map(|i| seed.wrapping_add(i as u8) | 1).collect(),
            }
        }
        9..=10 => Op::Zeroes {
            off,
            len,
            unmap: rng.gen(),
        },
        11..=12 => Op::Discard { off, len },
        13..=17 => Op::Read { off, len },
        18 => Op::Flush,
        _ => Op::Reopen,
    }
}

pub fn rng(seed: u64) -> SmallRng {
    SmallRng::seed_from_u64(seed)
}

/// Runs `qemu-img` (or another QEMU tool), failing loudly when it is not installed: these
/// tests must never pass by skipping.
pub fn qemu(tool: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(tool).args(args).output().unwrap_or_else(|e| {
        panic!("{tool} not found ({e}): install qemu-utils (`bash scripts/test.sh` does it)")
    });
    out
}

pub fn qemu_ok(tool: &str, args: &[&str]) -> String {
    let out = qemu(tool, args);
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `ready` every 20 ms until it holds, failing the test after 20 s (a server's socket
/// appearing, a process exiting).
pub fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !ready() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `qemu-img create -q -f qcow2 OPTS PATH SIZE` (`opts` e.g. `["-o", "cluster_size=512"]`).
pub fn qemu_create(path: &Path, opts: &[&str], size: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(opts);
    args.push(path.to_str().expect("UTF-8 test path"));
    args.push(size);
    qemu_ok("qemu-img", &args);
}

/// `qemu-img check --output=json`: (exit code, parsed report).
pub fn qemu_check(path: &Path) -> (i32, serde_json::Value) {
    let out = qemu(
        "qemu-img",
        &["check", "--output=json", path.to_str().unwrap()],
    );
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "qemu-img check printed no JSON: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), v)
}

/// Asserts `qemu-img check` finds no leaks and no corruptions.
pub fn assert_check_clean(path: &Path) {
    let (code, v) = qemu_check(path);
    assert_eq!(code, 0, "qemu-img check is not clean for {path:?}: {v:#}");
    assert!(
        v.get("leaks").is_none() && v.get("corruptions").is_none(),
        "{v:#}"
    );
}

/// A `qemu-nbd --fork` export that serves one client and then exits.
///
/// The server keeps its image locks (read, and write unshared) until its process exits, a
/// moment after the client disconnects: whoever opens the image for writing next must call
/// [`QemuNbdOnce::wait_exit`] first, or it races the exit and is refused as `Locked`.
pub struct QemuNbdOnce {
    pid_file: std::path::PathBuf,
}

impl QemuNbdOnce {
    /// `qemu-nbd --fork -r -f qcow2 -B BITMAP -k SOCK IMAGE`: the export is ready when this
    /// returns.
    pub fn bitmap_export(image: &Path, bitmap: &str, sock: &Path) -> Self {
        let pid_file = sock.with_extension("pid");
        let s = |p: &Path| p.to_str().expect("UTF-8 test path").to_owned();
        let (pid, sock, image) = (s(&pid_file), s(sock), s(image));
        qemu_ok(
            "qemu-nbd",
            &[
                "--fork",
                "--pid-file",
                &pid,
                "-r",
                "-f",
                "qcow2",
                "-B",
                bitmap,
                "-k",
                &sock,
                &image,
            ],
        );
        QemuNbdOnce { pid_file }
    }

    /// `qemu-nbd --fork -f qcow2 [EXTRA...] -k SOCK IMAGE`: a writable export (unless
    /// `extra` says `-r`), ready when this returns.
    pub fn export(image: &Path, sock: &Path, extra: &[&str]) -> Self {
        let pid_file = sock.with_extension("pid");
        let s = |p: &Path| p.to_str().expect("UTF-8 test path").to_owned();
        let (pid, sock, image) = (s(&pid_file), s(sock), s(image));
        let mut args = vec!["--fork", "--pid-file", &pid, "-f", "qcow2"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["-k", &sock, &image]);
        qemu_ok("qemu-nbd", &args);
        QemuNbdOnce { pid_file }
    }

    /// Waits (at most 30 s) until the server process has exited and so dropped its locks. A
    /// zombie counts as exited once it is the last of its threads (the container's init may
    /// never reap it): the main thread of a multi-threaded qemu-nbd turns zombie while its
    /// other threads still hold the process's files, pid-file lock included (seen as "Cannot
    /// lock pid file" from the next qemu-nbd on the same pid file).
    pub fn wait_exit(self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let pid = loop {
            if let Ok(text) = std::fs::read_to_string(&self.pid_file) {
                if let Ok(pid) = text.trim().parse::<u32>() {
                    break pid;
                }
            }
            assert!(std::time::Instant::now() < deadline, "no qemu-nbd pid file");
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        loop {
            match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                Err(_) => return,
                // The state follows the parenthesised command name.
                Ok(stat) if stat.rsplit(") ").next().is_some_and(|r| r.starts_with('Z')) => {
                    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
                        .map(|d| d.count())
                        .unwrap_or(0);
                    if threads <= 1 {
                        return;
                    }
                }
                Ok(_) => {}
            }
            assert!(
                std::time::Instant::now() < deadline,
                "qemu-nbd {pid} did not exit after its client"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

/// A tmpfs mounted on a temporary directory for the test, unmounted on drop: a real file
/// system that fills up.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` (with the reason printed) where mounting is not permitted (not root).
    pub fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let opt = format!("size={size}");
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &opt,
                "tmpfs",
                dir.path().to_str().expect("UTF-8 test path"),
            ])
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs { dir }),
            Ok(o) => {
                eprintln!(
                    "SKIPPED: cannot mount a tmpfs (run as root, as CI does): {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: cannot run mount: {e}");
                None
            }
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let st = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
        if !matches!(st, Ok(s) if s.success()) {
            eprintln!("could not unmount {:?}: {st:?}", self.dir.path());
        }
    }
}
