//! `qcow2 serve` as a process: QEMU's client writes through it, SIGTERM shuts it down
//! gracefully, and the image is left closed cleanly (dirty bit cleared, bitmaps stored and
//! no longer in use, check-clean); with `--tls-creds` over TCP, QEMU's TLS client (which
//! checks the server's certificate against 127.0.0.1) with rcgen-made certificates. Fails
//! loudly without QEMU.

#[path = "../../../tests/common/mod.rs"]
mod common;
#[path = "../../../tests/common/tls.rs"]
mod tls_creds;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{assert_check_clean, qemu_ok, wait_for};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn spawn_serve(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_qcow2"))
        .arg("serve")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qcow2 binary")
}

/// Signals `child` and waits for it to exit successfully, having closed the image cleanly;
/// returns what it printed on stderr.
fn terminate(mut child: Child, signal: &str) -> String {
    let pid = child.id().to_string();
    let st = Command::new("kill").args([signal, &pid]).status().unwrap();
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "qcow2 serve did not exit on {signal}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(status.success(), "qcow2 serve failed on {signal}: {err}");
    assert!(err.contains("closed cleanly"), "{err}");
    err
}

/// A free TCP address on the loopback (bound, then released for the server to take).
fn free_bind() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

fn info(path: &Path) -> serde_json::Value {
    let out = qemu_ok("qemu-img", &["info", "-U", "--output=json", s(path)]);
    serde_json::from_str(&out).unwrap()
}

/// A 4 MiB image whose first MiB holds 0x11 in snapshot `snap1` and 0x22 live.
fn image_with_snapshot(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("img.qcow2");
    qemu_ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "4M"]);
    qemu_ok("qemu-io", &["-c", "write -P 0x11 0 1M", s(&img)]);
    qemu_ok("qemu-img", &["snapshot", "-c", "snap1", s(&img)]);
    qemu_ok("qemu-io", &["-c", "write -P 0x22 0 1M", s(&img)]);
    img
}

/// An 8 MiB image with lazy refcounts (so the dirty bit is used) and a bitmap `bm`.
fn create_with_bitmap(img: &Path) {
    qemu_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            s(img),
            "8M",
        ],
    );
    qemu_ok("qemu-img", &["bitmap", "--add", s(img), "bm"]);
}

/// What a clean close leaves: dirty bit clear, bitmap `bm` stored and no longer in use, and
/// `qemu-img check` clean.
fn assert_closed_cleanly(img: &Path) {
    let v = info(img);
    assert_eq!(v["dirty-flag"], false, "{v:#}");
    let bm = &v["format-specific"]["data"]["bitmaps"][0];
    assert_eq!(bm["name"], "bm");
    assert!(!bm["flags"].to_string().contains("in-use"), "{bm}");
    assert_check_clean(img);
}

#[test]
fn serve_shuts_down_on_sigterm_and_sigint_leaving_the_image_clean() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    let sock = dir.path().join("nbd.sock");
    create_with_bitmap(&img);

    for signal in ["-TERM", "-INT"] {
        let child = spawn_serve(&[s(&img), "--socket", s(&sock), "--bitmap", "bm"]);
        wait_for("the socket", || sock.exists());
        let url = format!("nbd+unix:///?socket={}", s(&sock));
        qemu_ok(
            "qemu-io",
            &["-f", "raw", "-c", "write -P 0x3c 1M 192k", &url],
        );
        // While serving, the image is open read-write: the bitmap is flagged in use.
        let flags = &info(&img)["format-specific"]["data"]["bitmaps"][0]["flags"];
        assert!(flags.to_string().contains("in-use"), "{flags}");
        terminate(child, signal);
        assert!(!sock.exists(), "the socket is removed on exit");
        assert_closed_cleanly(&img);
    }
    qemu_ok("qemu-io", &["-c", "read -P 0x3c 1M 192k", s(&img)]);
    // The bitmap recorded the write (64 KiB granularity: exactly [1M, 1M+192k)).
    let server = common::QemuNbdOnce::bitmap_export(&img, "bm", &sock);
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:bm",
        s(&sock)
    );
    let map = qemu_ok("qemu-img", &["map", "--output=json", "--image-opts", &opts]);
    server.wait_exit();
    let v: serde_json::Value = serde_json::from_str(&map).unwrap();
    let dirty: Vec<(u64, u64)> = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == false)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(dirty, vec![(1 << 20, 192 << 10)]);
}

#[test]
fn serve_exports_a_snapshot_read_only_over_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let img = image_with_snapshot(dir.path());
    let bind = free_bind();
    let child = spawn_serve(&[
        s(&img),
        "--bind",
        &bind,
        "--snapshot",
        "snap1",
        "--export-name",
        "old",
    ]);
    wait_for("the port", || std::net::TcpStream::connect(&bind).is_ok());
    let url = format!("nbd://{bind}/old");
    qemu_ok(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x11 0 1M", &url],
    );
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x33 0 4k", &url])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() || text.contains("read-only") || text.contains("not permitted"),
        "a snapshot export refuses writes: {text}"
    );
    terminate(child, "-TERM");
    qemu_ok("qemu-io", &["-c", "read -P 0x22 0 1M", s(&img)]);
    assert_check_clean(&img);
}

/// Several exports from one server: the live disk as the default export, a snapshot and a
/// second name for the live disk; `nbdinfo --list` (libnbd, NBD_OPT_LIST and INFO) lists all
/// three with their sizes and contexts, and each reads what it should.
#[test]
fn serve_offers_several_exports_listed_by_nbdinfo() {
    let dir = tempfile::tempdir().unwrap();
    let img = image_with_snapshot(dir.path());
    let bind = free_bind();
    let child = spawn_serve(&[
        s(&img),
        "--bind",
        &bind,
        "--export",
        "old=snap1",
        "--export",
        "alias",
    ]);
    wait_for("the port", || std::net::TcpStream::connect(&bind).is_ok());
    let out = Command::new("nbdinfo")
        .args(["--list", "--json", &format!("nbd://{bind}")])
        .output()
        .expect("nbdinfo (libnbd-bin; `bash scripts/test.sh` installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let exports = list["exports"].as_array().unwrap();
    let names: Vec<&str> = exports
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["", "old", "alias"], "{list:#}");
    for e in exports {
        assert_eq!(e["export-size"], 4 << 20);
        let ro = e["is_read_only"].as_bool().unwrap();
        assert_eq!(ro, e["export-name"] == "old", "{e:#}");
        let contexts = e["contexts"].as_array().unwrap();
        for c in ["base:allocation", "qemu:allocation-depth"] {
            assert!(contexts.contains(&c.into()), "{e:#}");
        }
    }
    for (name, pattern) in [("", "0x22"), ("old", "0x11"), ("alias", "0x22")] {
        let url = format!("nbd://{bind}/{name}");
        let cmd = format!("read -P {pattern} 0 1M");
        let out = qemu_ok("qemu-io", &["-r", "-f", "raw", "-c", &cmd, &url]);
        assert!(!out.contains("failed"), "{name}: {out}");
    }
    let err = terminate(child, "-TERM");
    assert!(err.contains(r#"exports "", "old", "alias""#), "{err}");
    assert_check_clean(&img);
}

/// Issue 19's report: a write through `qcow2 serve` that does not fit on the host file
/// system reaches qemu-io as "No space left on device" (NBD_ENOSPC, which lets a VMM pause
/// the guest), not as an I/O error. Once space is freed writes work again, and SIGTERM
/// still closes the image cleanly.
#[test]
fn serve_reports_a_full_file_system_as_enospc() {
    let Some(fs) = common::Tmpfs::mount("8m") else {
        return;
    };
    let filler = fs.path().join("filler");
    std::fs::write(&filler, vec![0xffu8; 2 << 20]).unwrap();
    let img = fs.path().join("img.qcow2");
    qemu_ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "64M"]);
    let sock = fs.path().join("nbd.sock");
    // Dropped before `fs`: a failing assertion must not leave the server holding the mount.
    let mut child = KillOnDrop(Some(spawn_serve(&[s(&img), "--socket", s(&sock)])));
    wait_for("the socket", || sock.exists());
    let url = format!("nbd+unix:///?socket={}", s(&sock));
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x5a 0 16M", &url])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("write failed: No space left on device"),
        "a full file system is ENOSPC: {text}"
    );
    std::fs::remove_file(&filler).unwrap();
    let out = qemu_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5c 40M 1M",
            "-c",
            "read -P 0x5c 40M 1M",
            &url,
        ],
    );
    assert!(!out.contains("failed"), "{out}");
    terminate(child.0.take().unwrap(), "-TERM");
    assert_check_clean(&img);
}

/// Kills the server process (if still held) when a test fails.
struct KillOnDrop(Option<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Writes `pattern` to `len` bytes at `offset` through libblkio's vhost-user-blk driver,
/// flushes, and reads them back; returns the client so that it can stay connected.
fn blkio_write_read(sock: &Path, offset: u64, len: usize, pattern: u8) -> blkio::Blkio {
    use std::mem::MaybeUninit;
    let mut b = blkio::Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", s(sock)).unwrap();
    b.connect().unwrap();
    b.set_i32("num-queues", 2).unwrap();
    let mut q = b.start().unwrap().queues.remove(1);
    let region = b.alloc_mem_region(len).unwrap();
    b.map_mem_region(&region).unwrap();
    // SAFETY: the region is mapped until the end of this function and only one request
    // uses it at a time.
    let buf = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, len) };
    let wait = |q: &mut blkio::Blkioq| {
        let mut c = [MaybeUninit::uninit()];
        let mut t = Duration::from_secs(20);
        assert_eq!(q.do_io(&mut c, 1, Some(&mut t), None).unwrap(), 1);
        // SAFETY: do_io initialised one completion.
        assert_eq!(unsafe { c[0].assume_init_read() }.ret, 0);
    };
    buf.fill(pattern);
    q.write(offset, buf.as_ptr(), len, 0, blkio::ReqFlags::empty());
    wait(&mut q);
    q.flush(0, blkio::ReqFlags::empty());
    wait(&mut q);
    buf.fill(0);
    q.read(offset, buf.as_mut_ptr(), len, 0, blkio::ReqFlags::empty());
    wait(&mut q);
    assert!(buf.iter().all(|&x| x == pattern));
    b.unmap_mem_region(&region);
    b.free_mem_region(&region);
    b
}

#[test]
fn serve_vhost_user_blk_closes_the_image_cleanly_on_sigterm_with_a_frontend_connected() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    let sock = dir.path().join("vhost.sock");
    create_with_bitmap(&img);
    let child = spawn_serve(&[s(&img), "--vhost-user-blk", s(&sock), "--num-queues", "2"]);
    wait_for("the socket", || sock.exists());
    drop(blkio_write_read(&sock, 1 << 20, 128 << 10, 0x4d));
    // A second frontend after the first one left, still connected at SIGTERM.
    let _connected = blkio_write_read(&sock, 3 << 20, 64 << 10, 0x4e);
    terminate(child, "-TERM");
    assert!(!sock.exists(), "the socket is removed on exit");
    assert_closed_cleanly(&img);
    qemu_ok("qemu-io", &["-c", "read -P 0x4d 1M 128k", s(&img)]);
    qemu_ok("qemu-io", &["-c", "read -P 0x4e 3M 64k", s(&img)]);
}

/// qemu-io against `bind` over TLS with the credentials in `client` (`None`: plaintext).
fn qemu_io(bind: &str, client: Option<&Path>, cmd: &str) -> (bool, String) {
    let (host, port) = bind.split_once(':').unwrap();
    let server = format!("server.type=inet,server.host={host},server.port={port}");
    let mut args = tls_creds::nbd_open_args(&server, client, None);
    args.extend(["-c".into(), cmd.into()]);
    let out = common::qemu(
        "qemu-io",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let ok = out.status.success() && !text.contains("failed") && !text.contains("can't open");
    (ok, text)
}

#[test]
fn serve_with_tls_creds_and_verify_peer_over_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let creds = tls_creds::creds();
    let img = dir.path().join("img.qcow2");
    qemu_ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "4M"]);
    let bind = free_bind();
    let child = spawn_serve(&[
        s(&img),
        "--bind",
        &bind,
        "--tls-creds",
        s(&creds.server),
        "--tls-verify-peer",
    ]);
    wait_for("the port", || std::net::TcpStream::connect(&bind).is_ok());

    let client = &creds.client;
    let (ok, out) = qemu_io(&bind, Some(client), "write -P 0x42 0 1M");
    assert!(ok, "TLS client with a certificate refused:\n{out}");
    let (ok, out) = qemu_io(&bind, Some(client), "read -P 0x42 0 1M");
    assert!(ok, "TLS client with a certificate refused:\n{out}");
    let (ok, out) = qemu_io(&bind, None, "write -P 0x66 0 4k");
    assert!(!ok, "plaintext client served:\n{out}");
    assert!(out.contains("TLS negotiation required"), "{out}");
    let (ok, out) = qemu_io(&bind, Some(&creds.anonymous), "write -P 0x66 0 4k");
    assert!(
        !ok,
        "client without a certificate served under verify-peer:\n{out}"
    );

    let err = terminate(child, "-TERM");
    assert!(
        err.contains("TLS required, client certificates verified"),
        "{err}"
    );
    qemu_ok(
        "qemu-io",
        &["-c", "read -P 0x42 0 1M", "-c", "read -P 0 1M 3M", s(&img)],
    );
    assert_check_clean(&img);
}

/// Unreadable credentials stop `serve` before it listens, naming the missing file;
/// `--tls-verify-peer` alone is a usage error.
#[test]
fn serve_refuses_bad_tls_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    qemu_ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "1M"]);
    let sock = dir.path().join("nbd.sock");
    let out = Command::new(env!("CARGO_BIN_EXE_qcow2"))
        .args(["serve", s(&img), "--socket", s(&sock), "--tls-creds"])
        .arg(dir.path().join("nowhere"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "served without credentials: {err}");
    assert!(err.contains("server-cert.pem"), "{err}");
    assert!(!sock.exists(), "listened anyway");
    let out = Command::new(env!("CARGO_BIN_EXE_qcow2"))
        .args(["serve", s(&img), "--socket", s(&sock), "--tls-verify-peer"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-creds"));
    assert_check_clean(&img);
}
