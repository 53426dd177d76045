//! Base images in object storage, against real servers started here: nginx (HTTP with
//! ranges), moto's S3 server and Azurite (Azure Blob Storage). Images made by qemu-img are read remotely by every
//! read-only verb and compared with their local copies; QEMU's curl driver reads the same
//! HTTP objects and agrees; an overlay on a remote base is written through `qcow2 serve`
//! and compared with the same writes made locally (QEMU reads the HTTP one through its own
//! backing chain). Faults: a server killed mid-read, a silent and a slow server, objects
//! replaced while in use — each a typed error or a success, never a hang.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/servers.rs"]
mod servers;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{qemu, qemu_ok, wait_for};
use qcow2_async::io::{BlockFile, IoBuf};
use qcow2_remote::{ObjectStoreOpener, RemoteError, RemoteFile, RemoteOptions};
use servers::{Azurite, Moto, Nginx, Silent};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn qcow2_env(args: &[&str], env: &[(&str, String)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qcow2"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("qcow2 binary")
}

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "failed ({}): {}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn qcow2(args: &[&str]) -> String {
    ok(qcow2_env(args, &[]))
}

/// Whether this QEMU has its curl block driver (Debian: qemu-block-extra).
fn qemu_has_curl() -> bool {
    let out = qemu("qemu-img", &["--help"]);
    String::from_utf8_lossy(&out.stdout).contains(" http ")
}

/// A qcow2 image made by qemu-img with data, a zero cluster and a compressed cluster,
/// and its raw copy.
fn make_base(dir: &Path) -> (PathBuf, PathBuf) {
    let (qc, raw) = (dir.join("base.qcow2"), dir.join("base.raw"));
    common::qemu_create(&qc, &[], "64M");
    qemu_ok(
        "qemu-io",
        &[
            "-c",
            "write -P 0x11 0 3M",
            "-c",
            "write -P 0x22 10M 1M",
            "-c",
            "write -c -P 0x33 20M 64k",
            "-c",
            "write -z 1M 64k",
            "-c",
            "write -P 0x44 63M 1M",
            s(&qc),
        ],
    );
    qemu_ok("qemu-img", &["convert", "-O", "raw", s(&qc), s(&raw)]);
    (qc, raw)
}

/// A `qcow2 serve` process, killed if the test fails before stopping it.
struct Served(Option<Child>);

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn_serve(args: &[&str], env: &[(&str, String)]) -> Served {
    Served(Some(
        Command::new(env!("CARGO_BIN_EXE_qcow2"))
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("QCOW2_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("qcow2 binary"),
    ))
}

/// SIGTERM, wait (bounded), and what the server printed.
fn terminate(mut served: Served) -> String {
    let mut child = served.0.take().unwrap();
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("qcow2 serve did not exit on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    err
}

/// The same guest writes through NBD and on a local copy.
const WRITES: [&str; 3] = [
    "write -P 0x5a 512k 128k",
    "write -P 0x6b 10M 4k",
    "write -z 63M 64k",
];

fn write_via_nbd(sock: &Path) {
    let url = format!("nbd+unix:///?socket={}", s(sock));
    let mut args = vec!["-f", "raw"];
    for w in WRITES {
        args.extend(["-c", w]);
    }
    args.push(&url);
    qemu_ok("qemu-io", &args);
}

fn expected_copy(base: &Path, dir: &Path) -> PathBuf {
    let exp = dir.join("expected.qcow2");
    std::fs::copy(base, &exp).unwrap();
    let mut args = vec![];
    for w in WRITES {
        args.extend(["-c", w]);
    }
    args.push(s(&exp));
    qemu_ok("qemu-io", &args);
    exp
}

/// The backing file name `top` records, as qemu-img reads it.
fn recorded_backing(top: &Path) -> serde_json::Value {
    let info: serde_json::Value =
        serde_json::from_str(&qemu_ok("qemu-img", &["info", "--output=json", s(top)])).unwrap();
    info["backing-filename"].clone()
}

/// Serves the overlay `top` (on a remote copy of `base`) over NBD, writes WRITES through
/// it, stops the server, and checks that the overlay reads as the same writes made on a
/// local copy of `base`, which it returns.
fn write_overlay_through_serve(top: &Path, base: &Path, env: &[(&str, String)]) -> PathBuf {
    let dir = top.parent().unwrap();
    let sock = dir.join("nbd.sock");
    let server = spawn_serve(
        &[
            "serve",
            "--allow-remote-backing",
            s(top),
            "--socket",
            s(&sock),
        ],
        env,
    );
    wait_for("the socket", || sock.exists());
    write_via_nbd(&sock);
    let err = terminate(server);
    assert!(err.contains("closed cleanly"), "{err}");
    let expected = expected_copy(base, dir);
    let same = ok(qcow2_env(
        &["--allow-remote-backing", "compare", s(top), s(&expected)],
        env,
    ));
    assert!(same.contains("identical"), "{same}");
    expected
}

#[test]
fn http_images_read_like_their_local_copies_and_like_qemus_curl_driver() {
    let dir = tempfile::tempdir().unwrap();
    let (qc, raw) = make_base(dir.path());
    let web = Nginx::start(dir.path());
    let (url, raw_url) = (web.url("base.qcow2"), web.url("base.raw"));

    // info, map and check read the remote image as qemu-img reads the local one.
    let info: serde_json::Value =
        serde_json::from_str(&qcow2(&["info", "--output", "json", &url])).unwrap();
    assert_eq!(info["virtual-size"], 64 << 20);
    assert_eq!(info["filename"], url.as_str());
    let ours: serde_json::Value =
        serde_json::from_str(&qcow2(&["map", "--output", "json", &url])).unwrap();
    let theirs: serde_json::Value =
        serde_json::from_str(&qemu_ok("qemu-img", &["map", "--output=json", s(&qc)])).unwrap();
    assert_eq!(ours, theirs);
    assert!(qcow2(&["check", &url]).contains("No errors were found"));

    // compare (probed and given formats) and convert to local files.
    for (remote, args) in [(&url, vec![]), (&raw_url, vec!["-f", "raw"])] {
        let mut a = vec!["compare"];
        a.extend(&args);
        a.extend([remote.as_str(), s(&qc)]);
        assert!(qcow2(&a).contains("identical"), "{remote}");
    }
    assert!(qcow2(&["compare", &raw_url, s(&raw)]).contains("identical"));
    let out = dir.path().join("copy.qcow2");
    qcow2(&["convert", "-O", "qcow2", &url, s(&out)]);
    qemu_ok("qemu-img", &["compare", s(&out), s(&raw)]);
    let out_raw = dir.path().join("copy.raw");
    qcow2(&["convert", "-f", "raw", "-O", "raw", &raw_url, s(&out_raw)]);
    assert!(std::fs::read(&out_raw).unwrap() == std::fs::read(&raw).unwrap());

    // A remote image is read-only.
    let o = qcow2_env(&["check", "-r", "all", &url], &[]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("read-only"));

    // QEMU's curl driver reads the same objects and agrees.
    if !qemu_has_curl() {
        eprintln!(
            "SKIPPED: qemu-img has no curl block driver (Debian: apt install qemu-block-extra); \
             the curl-driver comparison did not run"
        );
        return;
    }
    for (u, fmt) in [(&url, "qcow2"), (&raw_url, "raw")] {
        let json = format!(r#"json:{{"driver":"{fmt}","file.driver":"http","file.url":"{u}"}}"#);
        qemu_ok("qemu-img", &["compare", &json, s(&qc)]);
    }
}

#[test]
fn an_overlay_on_an_http_base_is_written_through_serve_and_qemu_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let (qc, _) = make_base(dir.path());
    let web_root = tempfile::tempdir().unwrap();
    std::fs::copy(&qc, web_root.path().join("base.qcow2")).unwrap();
    let web = Nginx::start(web_root.path());
    let url = web.url("base.qcow2");

    // Created on the URL without a size: the base's, and the URL recorded as QEMU would.
    let top = dir.path().join("top.qcow2");
    qcow2(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        &url,
        "-F",
        "qcow2",
        s(&top),
    ]);
    assert_eq!(recorded_backing(&top), url.as_str());
    assert!(qcow2(&["info", s(&top)]).contains("virtual size: 64 MiB"));

    // An image naming a URL is refused unless the user allows remote backing files.
    let o = qcow2_env(&["compare", s(&top), s(&qc)], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("refused by the open policy"));

    let expected = write_overlay_through_serve(&top, &qc, &[]);
    common::assert_check_clean(&top);
    if qemu_has_curl() {
        // QEMU follows the URL backing name itself, through its curl driver.
        qemu_ok("qemu-img", &["compare", s(&top), s(&expected)]);
    } else {
        eprintln!("SKIPPED: qemu-img has no curl block driver; QEMU did not read the overlay");
    }
}

/// What every store must do with the remote copies (`qcow2_url`, `raw_url`) of `qc` and
/// `raw`, reached with `env`: compare equal to them, convert to a local image equal to `qc`,
/// and back an overlay (recording the URL) that `qcow2 serve` writes. Returns the
/// converted copy and the overlay, beside `qc`.
fn reads_like_local(
    env: &[(&str, String)],
    qcow2_url: &str,
    raw_url: &str,
    qc: &Path,
    raw: &Path,
) -> (PathBuf, PathBuf) {
    let dir = qc.parent().unwrap();
    let run = |args: &[&str]| ok(qcow2_env(args, env));
    assert!(run(&["compare", qcow2_url, s(qc)]).contains("identical"));
    assert!(run(&["compare", "-f", "raw", raw_url, s(raw)]).contains("identical"));
    let copy = dir.join("copy.qcow2");
    run(&["convert", "-O", "qcow2", qcow2_url, s(&copy)]);
    qemu_ok("qemu-img", &["compare", s(&copy), s(qc)]);
    let top = dir.join("top.qcow2");
    run(&["create", "-q", "-b", qcow2_url, "-F", "qcow2", s(&top)]);
    assert_eq!(recorded_backing(&top), qcow2_url);
    write_overlay_through_serve(&top, qc, env);
    (copy, top)
}

#[test]
fn s3_bases_overlay_convert_and_an_object_replaced_under_a_server() {
    let dir = tempfile::tempdir().unwrap();
    let (qc, raw) = make_base(dir.path());
    let s3 = Moto::start();
    let env = s3.env();
    s3.create_bucket("images");
    s3.upload(&qc, "images", "base.qcow2");
    s3.upload(&raw, "images", "base.raw");
    // The overlay-on-S3 recipe of the README, among the rest.
    let (copy, top) = reads_like_local(
        &env,
        "s3://images/base.qcow2",
        "s3://images/base.raw",
        &qc,
        &raw,
    );
    let sock = dir.path().join("nbd.sock");

    // The base replaced while a server reads through it: what was read stays, a block not
    // read yet fails as an I/O error, and the server says why.
    let server = spawn_serve(
        &[
            "serve",
            "--allow-remote-backing",
            "--read-only",
            "--remote-block-size",
            "64k",
            "--remote-read-ahead",
            "0",
            s(&top),
            "--socket",
            s(&sock),
        ],
        &env,
    );
    wait_for("the socket", || sock.exists());
    let nbd = format!("nbd+unix:///?socket={}", s(&sock));
    qemu_ok(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x11 0 64k", &nbd],
    );
    s3.upload(&copy, "images", "base.qcow2"); // same contents, a new object (ETag)
                                              // The compressed cluster at 20M: not written in the overlay, not read before.
    let o = qemu(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x33 20M 64k", &nbd],
    );
    let said = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(said.contains("read failed"), "{said}");
    let log = terminate(server);
    assert!(log.contains("changed since it was opened"), "{log}");
}

#[test]
fn azure_bases_read_convert_and_carry_an_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let (qc, raw) = make_base(dir.path());
    let az = Azurite::start();
    let env = az.env();
    az.create_container("images");
    az.upload(&qc, "images", "golden/base.qcow2");
    az.upload(&raw, "images", "golden/base.raw");
    let url = "az://images/golden/base.qcow2";
    reads_like_local(&env, url, "az://images/golden/base.raw", &qc, &raw);
    let info: serde_json::Value =
        serde_json::from_str(&ok(qcow2_env(&["info", "--output", "json", url], &env))).unwrap();
    assert_eq!(info["virtual-size"], 64 << 20, "{info}");
    // A blob that is not there is a clear error naming it.
    let o = qcow2_env(&["info", "az://images/golden/missing.qcow2"], &env);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("missing.qcow2"), "{err}");
}

fn fast_fail() -> RemoteOptions {
    let mut o = RemoteOptions::default();
    o.retries = 2;
    o.backoff = Duration::from_millis(50);
    o.timeout = Duration::from_millis(700);
    o
}

async fn read(f: &RemoteFile, off: u64, len: usize) -> std::io::Result<IoBuf> {
    f.read_at(IoBuf::zeroed(len, 1), off).await
}

fn remote_error(e: &std::io::Error) -> &RemoteError {
    RemoteError::from_io(e).unwrap_or_else(|| panic!("not a RemoteError: {e:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_read_is_a_typed_error_not_a_hang() {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("big.raw"), vec![0x5c; 24 << 20]).unwrap();
    let mut web = Nginx::start(root.path());
    // The rate-limited view: a 16 MiB read takes seconds.
    let url = web.url("slow/big.raw");
    let f = ObjectStoreOpener::new(fast_fail())
        .open_file(&url)
        .await
        .unwrap();
    let reader = {
        let f = f.clone();
        tokio::spawn(async move { read(&f, 0, 16 << 20).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    web.kill();
    let t = Instant::now();
    let e = tokio::time::timeout(Duration::from_secs(20), reader)
        .await
        .expect("the read hung")
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(
            remote_error(&e),
            RemoteError::Unreachable { .. } | RemoteError::ShortBody { .. }
        ),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(10));
    // And through the tool: a quick exit 2 with the reason.
    let o = qcow2_env(
        &[
            "--remote-timeout",
            "1",
            "--remote-retries",
            "1",
            "compare",
            &url,
            &url,
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unreachable"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_times_out_and_a_slow_one_is_waited_for() {
    let silent = Silent::start();
    let t = Instant::now();
    let e = ObjectStoreOpener::new(fast_fail())
        .open_file(&format!("http://127.0.0.1:{}/x.qcow2", silent.port))
        .await
        .unwrap_err();
    assert!(matches!(e, RemoteError::Timeout { attempts: 3, .. }), "{e}");
    // Three attempts of 0.7 s and 50 + 100 ms of backoff.
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

    // Slow but steady (2 MiB/s, in bursts at most a second apart): 6 MiB take longer
    // than the timeout, which bounds each wait, not the transfer; they arrive.
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("x.raw"), vec![0x7e; 6 << 20]).unwrap();
    let web = Nginx::start(root.path());
    let mut o = fast_fail();
    o.retries = 0;
    o.timeout = Duration::from_secs(2);
    o.max_request = 8 << 20;
    let f = ObjectStoreOpener::new(o)
        .open_file(&web.url("slow/x.raw"))
        .await
        .unwrap();
    let t = Instant::now();
    let b = read(&f, 0, 6 << 20).await.unwrap();
    assert!(b.iter().all(|&x| x == 0x7e));
    assert!(t.elapsed() > Duration::from_secs(2), "{:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_object_replaced_in_use_fails_reads_as_changed() {
    let root = tempfile::tempdir().unwrap();
    let path = root.path().join("base.raw");
    std::fs::write(&path, vec![1u8; 4 << 20]).unwrap();
    let web = Nginx::start(root.path());
    let mut o = fast_fail();
    o.read_ahead = 0;
    let f = ObjectStoreOpener::new(o)
        .open_file(&web.url("base.raw"))
        .await
        .unwrap();
    assert!(f.e_tag().is_some());
    assert!(read(&f, 0, 4096).await.unwrap().iter().all(|&b| b == 1));
    // Replaced as a deployment would: a new file renamed over the old one.
    let new = root.path().join("new.raw");
    std::fs::write(&new, vec![2u8; (4 << 20) + 4096]).unwrap();
    std::fs::rename(&new, &path).unwrap();
    let e = read(&f, 3 << 20, 4096).await.unwrap_err();
    assert!(
        matches!(remote_error(&e), RemoteError::Changed { .. }),
        "{e}"
    );
    // What was cached stays readable: it is the object that was opened.
    assert!(read(&f, 0, 4096).await.unwrap().iter().all(|&b| b == 1));
}

/// A local cache folder (`--remote-cache-dir`, `ObjectStoreOpener::cache_dir`) against
/// nginx: a second process reads the blocks the first one fetched from its cache file and
/// asks the server for none of them; a replaced object is fetched afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_dir_serves_a_later_process_and_notices_a_replaced_object() {
    let dir = tempfile::tempdir().unwrap();
    let (qc, raw) = make_base(dir.path());
    let web = Nginx::start(dir.path());
    let url = web.url("base.qcow2");
    let cache = dir.path().join("cache");

    // The tool, twice: the same bytes each time, and the cache file has been filled.
    let dir_arg = ["--remote-cache-dir", s(&cache)];
    for i in 0..2 {
        let out = dir.path().join(format!("copy{i}.raw"));
        let mut args = dir_arg.to_vec();
        args.extend(["convert", "-O", "raw", url.as_str(), s(&out)]);
        qcow2(&args);
        assert!(std::fs::read(&out).unwrap() == std::fs::read(&raw).unwrap());
    }
    let file = cache.join(qcow2_remote::cache_file_name(&url));
    let mut state = file.clone().into_os_string();
    state.push(".state");
    assert!(std::path::Path::new(&state).exists());
    let image_len = std::fs::metadata(&qc).unwrap().len();
    assert_eq!(std::fs::metadata(&file).unwrap().len(), image_len);

    // The library finds what the tool fetched (convert reads the metadata and data it
    // needs, not every block), reads the rest, and a later open asks nginx for nothing.
    let mut opener = ObjectStoreOpener::new(RemoteOptions::default());
    opener.cache_dir = Some(cache.clone());
    let open = || async { opener.open_file(&url).await.unwrap() };
    let f = open().await;
    let blocks = image_len.div_ceil(64 << 10);
    assert!(f.stats().file_blocks > blocks / 2, "{:?}", f.stats());
    let all = read(&f, 0, image_len as usize).await.unwrap();
    assert!(all[..] == std::fs::read(&qc).unwrap()[..]);
    assert!(f.stats().file_hits > 0, "{:?}", f.stats());
    let deadline = Instant::now() + Duration::from_secs(10);
    while f.stats().file_blocks < blocks {
        assert!(Instant::now() < deadline, "{:?}", f.stats());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(f);
    let f = open().await;
    let all = read(&f, 0, image_len as usize).await.unwrap();
    assert!(all[..] == std::fs::read(&qc).unwrap()[..]);
    let st = f.stats();
    assert_eq!(st.requests, 0, "{st:?}");
    assert_eq!(st.file_hits, blocks, "{st:?}");
    drop(f);

    // Replaced (a new file renamed over it, as a deployment would): new bytes, fetched.
    let new = dir.path().join("new.qcow2");
    common::qemu_create(&new, &[], "64M");
    qemu_ok("qemu-io", &["-c", "write -P 0x33 0 1M", s(&new)]);
    std::fs::rename(&new, &qc).unwrap();
    let f = open().await;
    assert_eq!(f.stats().file_blocks, 0);
    let len = f.size() as usize;
    let all = read(&f, 0, len).await.unwrap();
    assert!(all[..] == std::fs::read(&qc).unwrap()[..]);
    assert!(f.stats().requests > 0);
}
