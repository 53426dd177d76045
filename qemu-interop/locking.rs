//! Image locking against QEMU as the other holder, both ways: qemu-nbd and qemu-io hold an
//! image (read-write, read-only, through a backing chain, with a data file) while the engine
//! opens it, and the engine holds one while qemu-io and qemu-img open it. Each pair must
//! agree exactly as two QEMU processes do, and the engine's lock bytes must be QEMU's.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../crates/qcow2-async/src/lock/proc_locks.rs"]
mod proc_locks;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{qemu, qemu_create, qemu_ok};
use qcow2_async::{CreateOptions, Error, Image, OpenOptions, Permission};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A QEMU process holding an image until dropped.
struct Holder {
    child: Child,
}

/// Whether `ready` turns true within `tries` polls 20 ms apart.
fn eventually(tries: u32, mut ready: impl FnMut() -> bool) -> bool {
    (0..tries).any(|_| {
        ready() || {
            std::thread::sleep(Duration::from_millis(20));
            false
        }
    })
}

impl Holder {
    /// `qemu-nbd` serving `img` (extra args e.g. `-r`), waiting until the image is open.
    fn nbd(img: &Path, extra: &[&str]) -> Holder {
        let sock = img.with_extension("sock");
        let _ = std::fs::remove_file(&sock);
        let mut args = vec!["-f", "qcow2", "-k", s(&sock)];
        args.extend_from_slice(extra);
        args.push(s(img));
        let mut child = Command::new("qemu-nbd")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("qemu-nbd");
        // Serving once the socket is there and the image locked.
        if eventually(250, || sock.exists() && !lock_bytes(img).is_empty()) {
            return Holder { child };
        }
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        panic!(
            "qemu-nbd did not start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `qemu-io` (interactive, so it keeps the image open) on `img`.
    fn io(img: &Path, extra: &[&str]) -> Holder {
        let mut args = extra.to_vec();
        args.push(s(img));
        let child = Command::new("qemu-io")
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-io");
        let h = Holder { child };
        assert!(
            eventually(100, || !lock_bytes(img).is_empty()),
            "qemu-io did not open {}",
            img.display()
        );
        h
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every byte any process holds an OFD lock on in `path` (from `/proc/locks`).
fn lock_bytes(path: &Path) -> BTreeSet<i64> {
    proc_locks::ofd_lock_bytes(path).into_iter().collect()
}

/// Waits until some process holds a lock on `path` (QEMU opens a chain's files in turn)
/// and returns the bytes, once two reads 20 ms apart agree: QEMU changes a file's bytes
/// as it settles the permissions of a chain, and one read right after the first lock
/// appeared once saw none at all (CI).
fn wait_locked(path: &Path) -> BTreeSet<i64> {
    let mut last = BTreeSet::new();
    assert!(
        eventually(250, || {
            let now = lock_bytes(path);
            let settled = !now.is_empty() && now == last;
            last = now;
            settled
        }),
        "nobody locked {}",
        path.display()
    );
    last
}

fn ro() -> OpenOptions {
    OpenOptions::read_only()
}

fn shared() -> OpenOptions {
    {
        let mut o = OpenOptions::read_only();
        o.force_share = true;
        o
    }
}

fn refused(e: Error, permission: Permission, shared: bool) {
    match &e {
        Error::Locked {
            permission: p,
            shared: s,
            ..
        } => assert_eq!((*p, *s), (permission, shared), "{e}"),
        _ => panic!("expected a lock refusal, got {e}"),
    }
    assert!(
        e.to_string().contains("Is another process using the image"),
        "{e}"
    );
}

fn make(d: &Path, name: &str, opts: &[&str]) -> PathBuf {
    let p = d.join(name);
    qemu_create(&p, opts, "4M");
    p
}

#[tokio::test]
async fn qemu_holders_keep_the_engine_out_as_they_keep_each_other_out() {
    let dir = tempfile::tempdir().unwrap();
    let img = make(dir.path(), "a.qcow2", &[]);
    qemu_ok("qemu-io", &["-c", "write -P 0x5a 0 64k", s(&img)]);

    // qemu-nbd read-write: neither a writer nor a plain reader gets in; -U reads.
    {
        let _h = Holder::nbd(&img, &[]);
        refused(
            Image::open(&img, &OpenOptions::default())
                .await
                .unwrap_err(),
            Permission::Write,
            false,
        );
        refused(
            Image::open(&img, &ro()).await.unwrap_err(),
            Permission::Write,
            true,
        );
        let i = Image::open(&img, &shared()).await.unwrap();
        let mut b = vec![0u8; 4096];
        i.read_at(&mut b, 0).await.unwrap();
        assert!(b.iter().all(|&x| x == 0x5a));
        // Exactly what a second QEMU process gets (qemu-img's message, our wording).
        let out = qemu("qemu-img", &["info", s(&img)]);
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Failed to get shared \"write\" lock")
        );
    }
    // qemu-nbd read-only: readers share, writers stay out.
    {
        let _h = Holder::nbd(&img, &["-r"]);
        refused(
            Image::open(&img, &OpenOptions::default())
                .await
                .unwrap_err(),
            Permission::Write,
            false,
        );
        Image::open(&img, &ro()).await.unwrap();
    }
    // qemu-io read-write, then gone: the image is free again.
    {
        let _h = Holder::io(&img, &["-f", "qcow2"]);
        refused(
            Image::open(&img, &OpenOptions::default())
                .await
                .unwrap_err(),
            Permission::Write,
            false,
        );
    }
    Image::open(&img, &OpenOptions::default())
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
}

#[tokio::test]
async fn the_engine_keeps_qemu_out_with_qemus_own_lock_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = make(d, "b.qcow2", &[]);

    // What QEMU holds for each kind of open, and then what we hold for the same one.
    let mut qemu_bytes = Vec::new();
    for extra in [
        &["-f", "qcow2"][..],
        &["-r", "-f", "qcow2"],
        &["-r", "-U", "-f", "qcow2"],
    ] {
        let h = Holder::io(&img, extra);
        qemu_bytes.push(lock_bytes(&img));
        drop(h);
    }
    let mut ours = Vec::new();
    for o in [OpenOptions::default(), ro(), shared()] {
        let i = Image::open(&img, &o).await.unwrap();
        ours.push(lock_bytes(&img));
        drop(i);
    }
    assert_eq!(ours, qemu_bytes);

    // Our writer keeps qemu-io's writer and qemu-img's reader out; -U gets in.
    let w = Image::open(&img, &OpenOptions::default()).await.unwrap();
    let out = qemu("qemu-io", &["-c", "write 0 4k", s(&img)]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Failed to get \"write\" lock"), "{err}");
    let out = qemu("qemu-img", &["info", s(&img)]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Failed to get shared \"write\" lock"));
    qemu_ok("qemu-img", &["info", "-U", s(&img)]);
    w.close().await.unwrap();

    // Our reader lets QEMU readers in, not writers.
    let r = Image::open(&img, &ro()).await.unwrap();
    qemu_ok("qemu-img", &["info", s(&img)]);
    let out = qemu("qemu-io", &["-c", "write 0 4k", s(&img)]);
    assert!(!out.status.success());
    drop(r);
    qemu_ok("qemu-io", &["-c", "write 0 4k", s(&img)]);
}

#[tokio::test]
async fn backing_files_are_held_shared_read_only_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = make(d, "base.qcow2", &[]);
    let top = make(d, "top.qcow2", &["-b", "base.qcow2", "-F", "qcow2"]);

    // QEMU serves the top: we may read the base, not write it.
    {
        let h = Holder::nbd(&top, &[]);
        let qemu_base = wait_locked(&base);
        refused(
            Image::open(&base, &OpenOptions::default())
                .await
                .unwrap_err(),
            Permission::Write,
            false,
        );
        Image::open(&base, &ro()).await.unwrap();
        drop(h);
        // We hold the top: the base gets the bytes QEMU gave it.
        let t = Image::open(&top, &OpenOptions::default()).await.unwrap();
        assert_eq!(lock_bytes(&base), qemu_base);
        let out = qemu("qemu-io", &["-c", "write 0 4k", s(&base)]);
        assert!(
            !out.status.success(),
            "QEMU wrote the backing file of an image we serve"
        );
        qemu_ok("qemu-img", &["info", s(&base)]);
        t.close().await.unwrap();
    }

    // A raw backing file: QEMU's raw driver shares it with writers, so do we.
    let raw = d.join("base.raw");
    std::fs::write(&raw, vec![0u8; 4 << 20]).unwrap();
    let top2 = make(d, "top2.qcow2", &["-b", "base.raw", "-F", "raw"]);
    let h = Holder::nbd(&top2, &[]);
    let qemu_raw = wait_locked(&raw);
    drop(h);
    let t = Image::open(&top2, &OpenOptions::default()).await.unwrap();
    assert_eq!(lock_bytes(&raw), qemu_raw);
    qemu_ok("qemu-io", &["-f", "raw", "-c", "write 0 4k", s(&raw)]);
    drop(t);
}

#[tokio::test]
async fn external_data_files_are_locked_as_qemu_locks_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("x.qcow2");
    let data = d.join("x.raw");
    let mut c = CreateOptions::new(4 << 20);
    // Absolute: QEMU resolves a relative data file name against its working directory.
    c.data_file = Some(s(&data).to_owned());
    Image::create(&img, &c, &OpenOptions::default())
        .await
        .unwrap()
        .close()
        .await
        .unwrap();

    let h = Holder::nbd(&img, &[]);
    let qemu_data = wait_locked(&data);
    drop(h);
    let i = Image::open(&img, &OpenOptions::default()).await.unwrap();
    assert_eq!(lock_bytes(&data), qemu_data);
    // QEMU shares a data file's writes (guest data, no metadata): a raw writer gets in
    // beside us, as beside qemu-nbd; a resizer does not.
    qemu_ok("qemu-io", &["-f", "raw", "-c", "write -P 0 0 4k", s(&data)]);
    let out = qemu("qemu-img", &["resize", "-f", "raw", s(&data), "8M"]);
    assert!(
        !out.status.success(),
        "QEMU resized the data file of an image we hold"
    );
    drop(i);
    // ...and by us, when QEMU holds it.
    let _h = Holder::nbd(&img, &[]);
    assert!(matches!(
        Image::open(&img, &OpenOptions::default())
            .await
            .unwrap_err(),
        Error::Locked { .. }
    ));
}

#[tokio::test]
async fn two_handles_of_the_engine_exclude_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let img = make(dir.path(), "c.qcow2", &[]);
    let a = Image::open(&img, &OpenOptions::default()).await.unwrap();
    refused(
        Image::open(&img, &OpenOptions::default())
            .await
            .unwrap_err(),
        Permission::Write,
        false,
    );
    // Clones are one handle: the lock goes with the last of them.
    let b = a.clone();
    drop(a);
    refused(
        Image::open(&img, &ro()).await.unwrap_err(),
        Permission::Write,
        true,
    );
    drop(b);
    let _r1 = Image::open(&img, &ro()).await.unwrap();
    let _r2 = Image::open(&img, &ro()).await.unwrap();
    // `create` over an image in use is refused before it truncates anything.
    let before = std::fs::read(&img).unwrap();
    assert!(matches!(
        Image::create(&img, &CreateOptions::new(1 << 20), &OpenOptions::default())
            .await
            .unwrap_err(),
        Error::Locked { .. }
    ));
    assert_eq!(std::fs::read(&img).unwrap(), before);
    // Writes with force-share are refused outright, as in QEMU.
    assert!(matches!(
        Image::open(&img, &{
            let mut o = OpenOptions::default();
            o.force_share = true;
            o
        })
        .await
        .unwrap_err(),
        Error::InvalidArgument(_)
    ));
}
