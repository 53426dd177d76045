//! `qcow2-nbd` against QEMU's own NBD client: qemu-io, qemu-img convert / compare / map,
//! and qemu-nbd as the reference server for block status and for errors on a full file
//! system; and against libnbd's clients (nbdinfo, nbdcopy with multi-conn, the Python
//! binding). Fails loudly without QEMU or libnbd (`bash scripts/test.sh` installs both);
//! only the full-file-system test skips, with the reason printed, where it cannot mount.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};

use common::{assert_check_clean, qemu, qemu_ok, QemuNbdOnce, Tmpfs};
use qcow2_async::{BitmapOptions, CreateOptions, Image, OpenOptions};
use qcow2_nbd::{ExportConfig, Listener, Server, ServerOptions, Source};
use serde_json::Value;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A server running in the test's runtime.
struct Running {
    server: Server,
    task: tokio::task::JoinHandle<qcow2_nbd::Result<()>>,
    /// `nbd+unix:///?socket=` or `nbd://127.0.0.1:PORT/` prefix; append the export name.
    uri: String,
    sock: Option<PathBuf>,
}

impl Running {
    fn url(&self, export: &str) -> String {
        match &self.sock {
            Some(p) => format!("nbd+unix:///{export}?socket={}", s(p)),
            None => format!("{}{export}", self.uri),
        }
    }

    /// `--image-opts` spelling, to add `x-dirty-bitmap`.
    fn opts(&self, extra: &str) -> String {
        let p = self.sock.as_ref().expect("unix socket");
        format!("driver=nbd,server.type=unix,server.path={}{extra}", s(p))
    }

    async fn stop(self) {
        self.server.shutdown();
        self.task.await.unwrap().unwrap();
    }
}

async fn start(img: &Image, exports: Vec<ExportConfig>, unix_dir: Option<&Path>) -> Running {
    let server = Server::new(img.clone(), exports, ServerOptions::default())
        .await
        .unwrap();
    let (listener, uri, sock) = match unix_dir {
        Some(d) => {
            let p = d.join("nbd.sock");
            (Listener::bind_unix(&p).unwrap(), String::new(), Some(p))
        }
        None => {
            let l = Listener::bind_tcp("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            (l, format!("nbd://{addr}/"), None)
        }
    };
    let srv = server.clone();
    let task = tokio::spawn(async move { srv.serve(listener).await });
    Running {
        server,
        task,
        uri,
        sock,
    }
}

/// Runs a QEMU tool off the runtime's threads (the server needs them meanwhile).
async fn run_ok(tool: &'static str, args: Vec<String>) -> String {
    tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        qemu_ok(tool, &a)
    })
    .await
    .unwrap()
}

async fn run(tool: &'static str, args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        qemu(tool, &a)
    })
    .await
    .unwrap()
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// qemu-io command list: `-c CMD` for each.
fn io_cmds(target: &str, raw: bool, cmds: &[String]) -> Vec<String> {
    let mut v = Vec::new();
    if raw {
        v.extend(args(&["-f", "raw"]));
    }
    for c in cmds {
        v.push("-c".into());
        v.push(c.clone());
    }
    v.push(target.into());
    v
}

/// Fails if any qemu-io command reported a verification failure (qemu-io exits 0 anyway).
fn assert_io_clean(out: &str) {
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("failed"),
        "qemu-io reported a failure:\n{out}"
    );
}

async fn new_image(path: &Path, size: u64) -> Image {
    Image::create(path, &CreateOptions::new(size), &OpenOptions::default())
        .await
        .unwrap()
}

/// Writes, unaligned writes, FUA writes, zeroes (unmapping and not) and discards from
/// qemu-io through the export read back with the right patterns, both over NBD and from
/// the image opened directly afterwards; the image is check-clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_patterns_over_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    let img = new_image(&path, 16 << 20).await;
    let srv = start(&img, vec![ExportConfig::live("")], Some(dir.path())).await;
    let url = srv.url("");
    let writes: Vec<String> = [
        "write -P 0xa1 0 1M",
        "write -P 0xb2 1052673 12345",
        "write -f -P 0xc3 4M 192k",
        "write -P 0xd4 6M 1M",
        "write -z 6M 64k",
        "write -z -u 6324224 128k",
        "write -P 0xe5 9M 1M",
        "discard 9M 512k",
        "aio_write -P 0x11 12M 64k",
        "aio_write -P 0x12 13M 4k",
        "aio_flush",
        "flush",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = run_ok("qemu-io", io_cmds(&url, true, &writes)).await;
    assert_io_clean(&out);
    let reads: Vec<String> = [
        "read -P 0xa1 0 1M",
        "read -P 0xb2 1052673 12345",
        "read -P 0 1069056 4096",
        "read -P 0xc3 4M 192k",
        "read -P 0 6M 160k",
        "read -P 0xd4 6455296 884736",
        "read -P 0xe5 9961472 512k",
        "read -P 0x11 12M 64k",
        "read -P 0x12 13M 4k",
        "read -P 0 15M 1M",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = run_ok("qemu-io", io_cmds(&url, true, &reads)).await;
    assert_io_clean(&out);
    assert!(out.matches("read ").count() >= reads.len(), "{out}");
    srv.stop().await;
    img.close().await.unwrap();
    assert_check_clean(&path);
    let out = run_ok(
        "qemu-io",
        io_cmds(s(&path), false, &reads[..reads.len() - 1]),
    )
    .await;
    assert_io_clean(&out);
}

fn map_json(out: &str) -> Vec<Value> {
    serde_json::from_str::<Value>(out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// Writes a mix of data, zero clusters (allocated and not), a discard and untouched space,
/// with an enabled bitmap recording them.
async fn mixed_image(path: &Path) -> Image {
    let img = new_image(path, 8 << 20).await;
    img.add_bitmap("bm", &BitmapOptions::default())
        .await
        .unwrap();
    img.write_at(&vec![0x5a; 256 << 10], 0).await.unwrap();
    img.write_at(&vec![0x6b; 5000], (1 << 20) + 100)
        .await
        .unwrap();
    img.write_at(&vec![0x7c; 128 << 10], 2 << 20).await.unwrap();
    img.write_zeroes(2 << 20, 64 << 10, false).await.unwrap();
    img.write_zeroes(3 << 20, 128 << 10, true).await.unwrap();
    img.write_at(&vec![0x01; 192 << 10], 5 << 20).await.unwrap();
    img.discard(5 << 20, 64 << 10).await.unwrap();
    img.write_at(&[0x02; 512], (8 << 20) - 512).await.unwrap();
    img
}

/// `qemu-img map` through our export equals `qemu-img map` through qemu-nbd serving the
/// same image, for `base:allocation` and for `qemu:dirty-bitmap:bm`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_status_matches_qemu_nbd_for_allocation_and_dirty_bitmap() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    let img = mixed_image(&path).await;
    let export = {
        let mut o = ExportConfig::live("");
        o.bitmaps = vec!["bm".into()];
        o
    };
    let srv = start(&img, vec![export], Some(dir.path())).await;
    let alloc = run_ok(
        "qemu-img",
        args(&["map", "--output=json", "--image-opts", &srv.opts("")]),
    )
    .await;
    let dirty_opts = srv.opts(",x-dirty-bitmap=qemu:dirty-bitmap:bm");
    let dirty = run_ok(
        "qemu-img",
        args(&["map", "--output=json", "--image-opts", &dirty_opts]),
    )
    .await;
    srv.stop().await;
    img.close().await.unwrap();
    assert_check_clean(&path);

    let qsock = dir.path().join("qemu-nbd.sock");
    let reference = |extra: &str| {
        let opts = format!(
            "driver=nbd,server.type=unix,server.path={}{extra}",
            s(&qsock)
        );
        let path = path.clone();
        let qsock = qsock.clone();
        async move {
            // Without --persistent qemu-nbd serves one client and exits.
            let server = QemuNbdOnce::bitmap_export(&path, "bm", &qsock);
            let map = run_ok(
                "qemu-img",
                args(&["map", "--output=json", "--image-opts", &opts]),
            )
            .await;
            tokio::task::spawn_blocking(move || server.wait_exit())
                .await
                .unwrap();
            map
        }
    };
    let q_alloc = reference("").await;
    let q_dirty = reference(",x-dirty-bitmap=qemu:dirty-bitmap:bm").await;
    let (ours, theirs) = (map_json(&alloc), map_json(&q_alloc));
    assert!(ours.len() > 4, "a mixed image has many extents: {ours:?}");
    assert_eq!(ours, theirs, "base:allocation differs from qemu-nbd");
    let (ours, theirs) = (map_json(&dirty), map_json(&q_dirty));
    assert!(
        ours.iter().any(|e| e["data"] == false) && ours.iter().any(|e| e["data"] == true),
        "the bitmap has dirty and clean parts: {ours:?}"
    );
    assert_eq!(ours, theirs, "qemu:dirty-bitmap:bm differs from qemu-nbd");
}

/// `qemu-img convert` from and to the export over TCP, and `qemu-img compare` of the export
/// against the image itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn convert_from_and_to_the_export_over_tcp_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    let img = mixed_image(&path).await;
    let srv = start(&img, vec![ExportConfig::live("disk")], None).await;
    let url = srv.url("disk");
    // qemu-img reads the file itself too: the engine's write-back metadata must be there.
    img.flush().await.unwrap();
    let copy = dir.path().join("copy.qcow2");
    run_ok(
        "qemu-img",
        args(&["convert", "-f", "raw", "-O", "qcow2", &url, s(&copy)]),
    )
    .await;
    run_ok(
        "qemu-img",
        args(&["compare", "-U", "-f", "raw", "-F", "qcow2", &url, s(&path)]),
    )
    .await;
    run_ok("qemu-img", args(&["compare", "-U", s(&copy), s(&path)])).await;

    // Into the export: a different image replaces the contents.
    let src = dir.path().join("src.qcow2");
    run_ok(
        "qemu-img",
        args(&["create", "-q", "-f", "qcow2", s(&src), "8M"]),
    )
    .await;
    run_ok(
        "qemu-io",
        io_cmds(
            s(&src),
            false,
            &args(&["write -P 0x33 64k 1M", "write -P 0x44 7M 4k"]),
        ),
    )
    .await;
    run_ok(
        "qemu-img",
        args(&["convert", "-n", "-f", "qcow2", "-O", "raw", s(&src), &url]),
    )
    .await;
    run_ok(
        "qemu-img",
        args(&["compare", "-U", "-f", "raw", "-F", "qcow2", &url, s(&src)]),
    )
    .await;
    srv.stop().await;
    img.close().await.unwrap();
    assert_check_clean(&path);
    run_ok("qemu-img", args(&["compare", s(&path), s(&src)])).await;
}

/// Two clients at once on one image: each sees the other's completed writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_connections_share_one_image() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    let img = new_image(&path, 8 << 20).await;
    let srv = start(&img, vec![ExportConfig::live("")], Some(dir.path())).await;
    let url = srv.url("");
    let a = run_ok(
        "qemu-io",
        io_cmds(&url, true, &args(&["write -P 0x61 0 2M", "flush"])),
    );
    let b = run_ok(
        "qemu-io",
        io_cmds(&url, true, &args(&["write -P 0x62 4M 2M", "flush"])),
    );
    let (a, b) = tokio::join!(a, b);
    assert_io_clean(&a);
    assert_io_clean(&b);
    let out = run_ok(
        "qemu-io",
        io_cmds(
            &url,
            true,
            &args(&["read -P 0x61 0 2M", "read -P 0x62 4M 2M", "read -P 0 2M 2M"]),
        ),
    )
    .await;
    assert_io_clean(&out);
    srv.stop().await;
    img.close().await.unwrap();
    assert_check_clean(&path);
}

/// A snapshot exported by name reads the snapshot's contents, refuses writes, and shows up
/// in `qemu-nbd --list` next to the live export with its metadata contexts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_export_is_read_only_and_listed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    let img = new_image(&path, 4 << 20).await;
    img.add_bitmap("bm", &BitmapOptions::default())
        .await
        .unwrap();
    img.write_at(&vec![0xaa; 1 << 20], 0).await.unwrap();
    img.create_snapshot("before").await.unwrap();
    img.write_at(&vec![0xbb; 1 << 20], 0).await.unwrap();
    let exports = vec![
        {
            let mut o = ExportConfig::live("live");
            o.bitmaps = vec!["bm".into()];
            o
        },
        {
            let mut o = ExportConfig::live("snap");
            o.source = Source::Snapshot("before".into());
            o.read_only = true;
            o
        },
    ];
    let srv = start(&img, exports, Some(dir.path())).await;
    let out = run_ok(
        "qemu-io",
        args(&[
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0xaa 0 1M",
            "-c",
            "read -P 0 1M 3M",
            &srv.url("snap"),
        ]),
    )
    .await;
    assert_io_clean(&out);
    let out = run_ok(
        "qemu-io",
        io_cmds(&srv.url("live"), true, &args(&["read -P 0xbb 0 1M"])),
    )
    .await;
    assert_io_clean(&out);
    // Opening the snapshot read-write fails: the export says it is read-only.
    let rw = run(
        "qemu-io",
        io_cmds(&srv.url("snap"), true, &args(&["write -P 1 0 4k"])),
    )
    .await;
    let text =
        String::from_utf8_lossy(&rw.stdout).to_string() + &String::from_utf8_lossy(&rw.stderr);
    assert!(
        !rw.status.success()
            || text.contains("read-only")
            || text.contains("Operation not permitted"),
        "a write to the snapshot export must fail: {text}"
    );
    let list = run_ok(
        "qemu-nbd",
        args(&["--list", "-k", s(srv.sock.as_ref().unwrap())]),
    )
    .await;
    for want in [
        "export: 'live'",
        "export: 'snap'",
        "size:  4194304",
        "base:allocation",
        "qemu:dirty-bitmap:bm",
        "df multi",
        "readonly",
        "fast-zero",
    ] {
        assert!(
            list.contains(want),
            "qemu-nbd --list lacks {want:?}:\n{list}"
        );
    }
    srv.stop().await;
    img.close().await.unwrap();
    assert_check_clean(&path);
    // Serving the snapshot left both it and the live disk as they were.
    run_ok("qemu-io", args(&["-c", "read -P 0xbb 0 1M", s(&path)])).await;
    let list = run_ok("qemu-img", args(&["snapshot", "-l", s(&path)])).await;
    assert!(list.contains("before"), "{list}");
}

fn text(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
}

/// Which server a full-file-system session runs against.
#[derive(Clone, Copy, Debug)]
enum Serving {
    Ours,
    QemuNbd,
}

/// On an 8 MiB tmpfs holding a 2 MiB filler file and a 64 MiB image: qemu-io writes 16 MiB
/// (does not fit) and then 1 MiB more through `server`; the filler is deleted and a third
/// qemu-io writes and reads back 1 MiB. Returns the three qemu-io transcripts and the
/// image's `qemu-img check` exit code.
async fn full_file_system_session(server: Serving) -> Option<(String, String, String, i32)> {
    let fs = Tmpfs::mount("8m")?;
    let filler = fs.path().join("filler");
    std::fs::write(&filler, vec![0xffu8; 2 << 20]).unwrap();
    let path = fs.path().join("img.qcow2");
    qemu_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&path), "64M"],
    );
    let sock = fs.path().join("nbd.sock");
    let url = format!("nbd+unix:///?socket={}", s(&sock));
    let full = args(&["write -P 0x5a 0 16M"]);
    let more = args(&["write -P 0x5b 32M 1M"]);
    let after = args(&["write -P 0x5c 40M 1M", "read -P 0x5c 40M 1M"]);
    let (t_full, t_more, t_after);
    match server {
        Serving::Ours => {
            let img = Image::open(&path, &OpenOptions::default()).await.unwrap();
            let srv = start(&img, vec![ExportConfig::live("")], Some(fs.path())).await;
            t_full = text(&run("qemu-io", io_cmds(&url, true, &full)).await);
            t_more = text(&run("qemu-io", io_cmds(&url, true, &more)).await);
            std::fs::remove_file(&filler).unwrap();
            t_after = text(&run("qemu-io", io_cmds(&url, true, &after)).await);
            srv.stop().await;
            img.close().await.unwrap();
        }
        Serving::QemuNbd => {
            let once = |cmds: Vec<String>| {
                let (path, sock, url) = (path.clone(), sock.clone(), url.clone());
                async move {
                    let server = QemuNbdOnce::export(&path, &sock, &[]);
                    let out = text(&run("qemu-io", io_cmds(&url, true, &cmds)).await);
                    tokio::task::spawn_blocking(move || server.wait_exit())
                        .await
                        .unwrap();
                    out
                }
            };
            t_full = once(full).await;
            t_more = once(more).await;
            std::fs::remove_file(&filler).unwrap();
            t_after = once(after).await;
        }
    }
    let (code, _) = common::qemu_check(&path);
    Some((t_full, t_more, t_after, code))
}

/// A write that does not fit on the host file system reaches qemu-io as "No space left on
/// device" (NBD_ENOSPC), as it does through qemu-nbd on the same setup, not as an I/O
/// error; a later write fails the same way or fits, and once space is freed writes succeed
/// and the image has no corruption.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_file_system_is_reported_as_enospc_like_qemu_nbd() {
    let Some(ours) = full_file_system_session(Serving::Ours).await else {
        return;
    };
    let theirs = full_file_system_session(Serving::QemuNbd).await.unwrap();
    for (who, (full, more, after, check)) in [("qcow2-nbd", &ours), ("qemu-nbd", &theirs)] {
        eprintln!("{who}:\n{full}{more}{after}check exit {check}");
        assert!(
            full.contains("write failed: No space left on device"),
            "{who}: a write on a full file system is ENOSPC: {full}"
        );
        // What is left after the failed write differs (qemu-nbd's 1 MiB fits, ours not
        // always), but a failure is ENOSPC, never EIO.
        for t in [full, more] {
            assert!(!t.contains("Input/output error"), "{who}: {t}");
            assert!(
                !t.contains("failed") || t.contains("No space left on device"),
                "{who}: {t}"
            );
        }
        assert_io_clean(after);
        assert!(after.contains("read 1048576/1048576"), "{who}: {after}");
        // 0 clean, 3 leaked clusters only; 2 would be corruption.
        assert!(matches!(check, 0 | 3), "{who}: qemu-img check exit {check}");
    }
}

// ------------------------------------------------------------------ libnbd as the client

/// Runs a libnbd tool off the runtime's threads, failing loudly when it is missing: these
/// tests must never pass by skipping.
async fn libnbd_ok(tool: &'static str, args: Vec<String>) -> String {
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(tool)
            .args(&args)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "{tool} not found ({e}): install libnbd-bin (`bash scripts/test.sh` does it)"
                )
            });
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}",
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
    .await
    .unwrap()
}

/// `nbdcopy --connections=4 --threads=4 -v SRC DST` (nbdcopy opens no more connections
/// than threads, which default to the CPU count), checking that it used 4 connections.
async fn nbdcopy4(src: &str, dst: &str) {
    let a = args(&[
        "-v",
        "--connections=4",
        "--threads=4",
        "--requests=16",
        src,
        dst,
    ]);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("nbdcopy")
            .args(&a)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "nbdcopy not found ({e}): install libnbd-bin (`bash scripts/test.sh` does it)"
                )
            })
    })
    .await
    .unwrap();
    let t = text(&out);
    let summary = t
        .lines()
        .filter(|l| l.starts_with("nbdcopy: "))
        .collect::<Vec<_>>();
    assert!(out.status.success(), "nbdcopy failed: {summary:#?}");
    assert!(
        summary.iter().any(|l| l.contains("connections=4 ")),
        "nbdcopy used multi-conn with 4 connections: {summary:#?}"
    );
}

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// `nbdinfo --json` and `nbdinfo --map --json` through our export agree with qemu-nbd
/// serving the same image: size, `base:allocation` offered, and the same extents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_shows_size_and_allocation_like_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    let img = mixed_image(&path).await;
    let srv = start(&img, vec![ExportConfig::live("")], Some(dir.path())).await;
    let url = srv.url("");
    let info = json(&libnbd_ok("nbdinfo", args(&["--json", &url])).await);
    let map = json(&libnbd_ok("nbdinfo", args(&["--map", "--json", &url])).await);
    srv.stop().await;
    img.close().await.unwrap();

    let qsock = dir.path().join("qemu-nbd.sock");
    let qurl = format!("nbd+unix:///?socket={}", s(&qsock));
    let mut theirs = Vec::new();
    for extra in [&["--json"][..], &["--map", "--json"][..]] {
        let server = QemuNbdOnce::export(&path, &qsock, &["-r"]);
        let mut a = args(extra);
        a.push(qurl.clone());
        theirs.push(json(&libnbd_ok("nbdinfo", a).await));
        tokio::task::spawn_blocking(move || server.wait_exit())
            .await
            .unwrap();
    }
    let (ours, q) = (&info["exports"][0], &theirs[0]["exports"][0]);
    assert_eq!(ours["export-size"], 8 << 20, "{info:#}");
    assert_eq!(ours["export-size"], q["export-size"]);
    assert!(ours["contexts"]
        .as_array()
        .unwrap()
        .contains(&Value::from("base:allocation")));
    assert_eq!(info["structured"], true);
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
    ] {
        assert_eq!(ours[flag], true, "{flag}: {ours:#}");
    }
    assert!(
        map.as_array().unwrap().len() > 4,
        "a mixed image has many extents: {map:#}"
    );
    assert_eq!(map, theirs[1], "nbdinfo --map differs from qemu-nbd");
}

/// `nbdcopy` with 4 connections (multi-conn) copies the export out to a raw file equal to the image, and
/// copies a raw file (data, zeroes, holes) into the export: the image is then check-clean
/// and equal to the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_with_four_connections_copies_out_and_in() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    let img = mixed_image(&path).await;
    // qemu-img compare reads the file itself.
    img.flush().await.unwrap();
    let srv = start(&img, vec![ExportConfig::live("")], Some(dir.path())).await;
    let url = srv.url("");
    let out = dir.path().join("out.raw");
    nbdcopy4(&url, s(&out)).await;
    run_ok(
        "qemu-img",
        args(&[
            "compare",
            "-U",
            "-f",
            "raw",
            "-F",
            "qcow2",
            s(&out),
            s(&path),
        ]),
    )
    .await;

    // Into the export: 8 MiB of patterns, zeroes and holes over an image that has data
    // where the file has zeroes (so the copy must zero it).
    img.write_at(&vec![0x77; 256 << 10], 6 << 20).await.unwrap();
    img.write_at(&vec![0x78; 64 << 10], 4 << 20).await.unwrap();
    let src = dir.path().join("src.raw");
    run_ok(
        "qemu-img",
        args(&["create", "-q", "-f", "raw", s(&src), "8M"]),
    )
    .await;
    let writes = args(&[
        "write -P 0x21 0 3M",
        "write -P 0x22 3200k 700k",
        "write -P 0x23 5M 1M",
        "write -z 5376k 64k",
        "write -P 0x24 8380416 8192",
    ]);
    run_ok("qemu-io", io_cmds(s(&src), true, &writes)).await;
    nbdcopy4(s(&src), &url).await;
    srv.stop().await;
    img.close().await.unwrap();
    assert_check_clean(&path);
    run_ok(
        "qemu-img",
        args(&["compare", "-f", "raw", "-F", "qcow2", s(&src), s(&path)]),
    )
    .await;
}

/// A Python interpreter with libnbd's binding (`python3-libnbd` installs it for the
/// system's python3, which may not be the first on PATH).
fn python_with_nbd() -> &'static str {
    for py in ["python3", "/usr/bin/python3"] {
        let ok = std::process::Command::new(py)
            .args(["-c", "import nbd"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return py;
        }
    }
    panic!("no python3 with libnbd's `nbd` module: install python3-libnbd (`bash scripts/test.sh` does it)");
}

/// Runs the libnbd Python `script` (a file) with `url` as its argument, off the runtime's
/// threads; fails the test if it fails.
async fn run_python(script: &Path, url: String) -> String {
    let py = python_with_nbd();
    let script = script.to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(py)
            .args([s(&script), &url])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "python libnbd client: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What a scripted pipeline does with libnbd's Python binding: writes (one FUA), flush,
/// zeroes, trim, cache, reads back, block status, and out-of-range reads and cache requests
/// refused with EINVAL.
const PY_CLIENT: &str = r#"
import nbd, sys
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(sys.argv[1])
assert h.get_size() == 4 << 20, h.get_size()
assert h.can_flush() and h.can_fua() and h.can_zero() and h.can_trim()
assert h.can_cache()
assert h.can_meta_context("base:allocation")
h.pwrite(b"\xab" * (1 << 20), 0)
h.pwrite(b"\xcd" * 4096, 2 << 20, nbd.CMD_FLAG_FUA)
h.flush()
# libnbd's argument order: count, then offset.
h.zero(128 << 10, 64 << 10)
h.trim(1 << 20, 2 << 20)
h.pwrite(b"\xef" * 512, (3 << 20) + 512)
# NBD_CMD_CACHE: the whole disk, then past its end (EINVAL, as qemu-nbd).
h.cache(4 << 20, 0)
try:
    h.cache(4096, 4 << 20)
    sys.exit("a cache request past the end succeeded")
except nbd.Error as e:
    assert e.errno == "EINVAL", (e.errno, e.string)
data = h.pread(1 << 20, 0)
assert data[: 64 << 10] == b"\xab" * (64 << 10)
assert data[64 << 10 : 192 << 10] == bytes(128 << 10)
assert data[192 << 10 :] == b"\xab" * ((1 << 20) - (192 << 10))
assert h.pread(4096, 2 << 20) == bytes(4096), "trimmed"
assert h.pread(1024, 3 << 20) == bytes(512) + b"\xef" * 512
extents = []
def got(ctx, offset, entries, err):
    assert ctx == "base:allocation"
    extents.extend(zip(entries[0::2], entries[1::2]))
    return 0
h.block_status(4 << 20, 0, got)
assert sum(l for l, _ in extents) == 4 << 20, extents
assert extents[0] == (64 << 10, 0), extents
try:
    h.pread(4096, 4 << 20)
    sys.exit("a read past the end succeeded")
except nbd.Error as e:
    assert e.errno == "EINVAL", (e.errno, e.string)
h.flush()
h.shutdown()
print("python ok", extents)
"#;

/// libnbd's Python binding as a client: the script's reads, zeroes and block status hold,
/// and the image holds the script's writes afterwards, check-clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_libnbd_reads_writes_flushes_and_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    let img = new_image(&path, 4 << 20).await;
    let srv = start(&img, vec![ExportConfig::live("")], Some(dir.path())).await;
    let script = dir.path().join("client.py");
    std::fs::write(&script, PY_CLIENT).unwrap();
    let out = run_python(&script, srv.url("")).await;
    assert!(out.contains("python ok"), "{out}");
    srv.stop().await;
    img.close().await.unwrap();
    assert_check_clean(&path);
    let reads = args(&[
        "read -P 0xab 0 64k",
        "read -P 0 64k 128k",
        "read -P 0xab 192k 832k",
        "read -P 0 1M 2M",
        "read -P 0xef 3146240 512",
    ]);
    let out = run_ok("qemu-io", io_cmds(s(&path), false, &reads)).await;
    assert_io_clean(&out);
}

/// Points the first L2 entry of `path` (a cluster written at guest offset 0) half a sector
/// into its cluster: an unaligned host offset, which both QEMU and the engine treat as
/// corruption.
fn corrupt_first_l2_entry(path: &Path) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let be = |f: &mut std::fs::File, at: u64| {
        let mut b = [0u8; 8];
        f.seek(SeekFrom::Start(at)).unwrap();
        f.read_exact(&mut b).unwrap();
        u64::from_be_bytes(b)
    };
    let l1 = be(&mut f, 40);
    let l2 = be(&mut f, l1) & 0x00ff_ffff_ffff_fe00;
    let entry = be(&mut f, l2);
    assert_ne!(entry & 0x00ff_ffff_ffff_fe00, 0, "cluster 0 is allocated");
    f.seek(SeekFrom::Start(l2)).unwrap();
    f.write_all(&(entry + 512).to_be_bytes()).unwrap();
}

/// A read that hits a corrupt L2 entry is EIO ("Input/output error" in qemu-io) through
/// our export as through qemu-nbd serving the same file, and the rest of the disk still
/// reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_cluster_reads_as_eio_like_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    qemu_ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&path), "4M"]);
    let w = args(&["write -P 0x11 0 64k", "write -P 0x22 1M 64k"]);
    run_ok("qemu-io", io_cmds(s(&path), false, &w)).await;
    corrupt_first_l2_entry(&path);
    let reads = args(&["read -P 0x11 0 64k", "read -P 0x22 1M 64k"]);
    let ro = |url: &str| [args(&["-r"]), io_cmds(url, true, &reads)].concat();

    let qsock = dir.path().join("qemu-nbd.sock");
    let server = QemuNbdOnce::export(&path, &qsock, &["-r"]);
    let qurl = format!("nbd+unix:///?socket={}", s(&qsock));
    let theirs = text(&run("qemu-io", ro(&qurl)).await);
    tokio::task::spawn_blocking(move || server.wait_exit())
        .await
        .unwrap();

    let mut opts = OpenOptions::default();
    opts.read_only = true;
    let img = Image::open(&path, &opts).await.unwrap();
    let mut export = ExportConfig::live("");
    export.read_only = true;
    let srv = start(&img, vec![export], Some(dir.path())).await;
    let ours = text(&run("qemu-io", ro(&srv.url(""))).await);
    srv.stop().await;
    img.close().await.unwrap();
    for (who, t) in [("qemu-nbd", &theirs), ("qcow2-nbd", &ours)] {
        assert!(
            t.starts_with("read failed: Input/output error"),
            "{who}: a corrupt cluster is EIO: {t}"
        );
        assert!(
            t.contains("read 65536/65536 bytes at offset 1048576"),
            "{who}: {t}"
        );
    }
}

/// A socket path in `dir` that no earlier qemu-nbd of this test used: a qemu-nbd that
/// served its one client may still hold its pid file for a moment after `wait_exit` saw it
/// go (seen once as "Cannot lock pid file" when the next one reused the name).
fn fresh_sock(dir: &Path) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    dir.join(format!("qemu-nbd-{n}.sock"))
}

/// The queries the allocation contexts are compared by: `nbdinfo --map` for
/// `base:allocation` and `qemu:allocation-depth` (libnbd, compact headers), and
/// `qemu-img map` with `x-dirty-bitmap=qemu:allocation-depth` (QEMU's client, extended
/// headers).
fn allocation_queries() -> Vec<(&'static str, Vec<String>)> {
    vec![
        ("nbdinfo", args(&["--map", "--json"])),
        ("nbdinfo", args(&["--map=qemu:allocation-depth", "--json"])),
        ("qemu-img", args(&["map", "--output=json", "--image-opts"])),
    ]
}

/// Runs one of [`allocation_queries`] against a server on `sock` (its `export`): qemu-img
/// gets NBD options naming the depth context, libnbd tools a URL.
async fn allocation_query(
    tool: &'static str,
    mut a: Vec<String>,
    sock: &Path,
    export: &str,
) -> String {
    if tool == "qemu-img" {
        a.push(format!(
            "driver=nbd,server.type=unix,server.path={},export={export},x-dirty-bitmap=qemu:allocation-depth",
            s(sock)
        ));
        run_ok(tool, a).await
    } else {
        a.push(format!("nbd+unix:///{export}?socket={}", s(sock)));
        libnbd_ok(tool, a).await
    }
}

/// [`allocation_query`] once against qemu-nbd serving `path` (`-f qcow2 EXTRA`) on a fresh
/// socket in `dir`; qemu-nbd serves that one client and exits.
async fn qemu_nbd_query(
    path: &Path,
    dir: &Path,
    extra: &[&str],
    tool: &'static str,
    a: Vec<String>,
) -> String {
    let sock = fresh_sock(dir);
    let server = QemuNbdOnce::export(path, &sock, extra);
    let out = allocation_query(tool, a, &sock, "").await;
    tokio::task::spawn_blocking(move || server.wait_exit())
        .await
        .unwrap();
    out
}

/// `qemu:allocation-depth` and `base:allocation` of an overlay whose backing file is shorter
/// than it, with data, zeroes and unallocated ranges in both layers: the same through our
/// export as through qemu-nbd -A.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocation_depth_on_a_backing_chain_matches_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let (base, top) = (dir.path().join("base.qcow2"), dir.path().join("top.qcow2"));
    qemu_ok("qemu-img", &["create", "-f", "qcow2", s(&base), "4M"]);
    let base_io = ["write -P 1 0 1M", "write -z 2M 512k", "write -P 4 3M 64k"];
    assert_io_clean(&run_ok("qemu-io", io_cmds(s(&base), false, &args(&base_io))).await);
    let backing = ["-b", s(&base), "-F", "qcow2"];
    qemu_ok(
        "qemu-img",
        &[&["create", "-f", "qcow2"], &backing[..], &[s(&top), "8M"]].concat(),
    );
    let top_io = [
        "write -P 2 512k 128k",
        "write -z 1536k 64k",
        "write -z 3M 64k",
        "write -P 3 6M 64k",
    ];
    assert_io_clean(&run_ok("qemu-io", io_cmds(s(&top), false, &args(&top_io))).await);

    let img = Image::open(&top, &OpenOptions::read_only()).await.unwrap();
    let srv = start(&img, vec![ExportConfig::live("")], Some(dir.path())).await;
    let sock = srv.sock.clone().unwrap();
    let mut ours = Vec::new();
    for (tool, a) in allocation_queries() {
        ours.push(allocation_query(tool, a, &sock, "").await);
    }
    srv.stop().await;
    img.close().await.unwrap();

    for (i, (tool, a)) in allocation_queries().into_iter().enumerate() {
        let theirs = qemu_nbd_query(&top, dir.path(), &["-r", "-A"], tool, a).await;
        let (o, t) = (json(&ours[i]), json(&theirs));
        assert!(
            o.as_array().unwrap().len() >= 4,
            "query {i}: a chain with holes, zeroes and two layers: {o:#}"
        );
        assert_eq!(o, t, "query {i} ({tool}) differs from qemu-nbd -A");
    }
    // The depths themselves: 0 absent, 1 the overlay, 2 its backing file.
    let depth = json(&ours[1]);
    let depths: Vec<u64> = depth
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_u64().unwrap())
        .collect();
    for d in [0, 1, 2] {
        assert!(depths.contains(&d), "depth {d} in {depth:#}");
    }
}

/// An internal snapshot exported read-only offers the same allocation contexts as
/// `qemu-nbd -l`, describing the snapshot rather than the live disk; the live export beside
/// it (several exports from one server) still describes the live disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_export_allocation_matches_qemu_nbd_l() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    qemu_ok("qemu-img", &["create", "-f", "qcow2", s(&path), "4M"]);
    let io = ["write -P 1 0 1M", "write -z 2M 64k"];
    assert_io_clean(&run_ok("qemu-io", io_cmds(s(&path), false, &args(&io))).await);
    qemu_ok("qemu-img", &["snapshot", "-c", "s1", s(&path)]);
    let io = ["write -P 2 3M 64k", "discard 0 64k"];
    assert_io_clean(&run_ok("qemu-io", io_cmds(s(&path), false, &args(&io))).await);

    let img = Image::open(&path, &OpenOptions::read_only()).await.unwrap();
    let mut snap = ExportConfig::live("s1");
    snap.source = Source::Snapshot("s1".into());
    snap.read_only = true;
    let srv = start(&img, vec![ExportConfig::live(""), snap], Some(dir.path())).await;
    let sock = srv.sock.clone().unwrap();
    let mut ours = Vec::new();
    for export in ["s1", ""] {
        for (tool, a) in allocation_queries() {
            ours.push(allocation_query(tool, a, &sock, export).await);
        }
    }
    srv.stop().await;
    img.close().await.unwrap();
    let (d, n) = (dir.path(), allocation_queries().len());
    for (i, (tool, a)) in allocation_queries().into_iter().enumerate() {
        let theirs = qemu_nbd_query(&path, d, &["-r", "-A", "-l", "s1"], tool, a.clone()).await;
        let snapshot = json(&ours[i]);
        assert_eq!(
            snapshot,
            json(&theirs),
            "snapshot query {i} differs from qemu-nbd -l"
        );
        let live = json(&qemu_nbd_query(&path, d, &["-r", "-A"], tool, a).await);
        assert_eq!(
            json(&ours[n + i]),
            live,
            "live query {i} differs from qemu-nbd"
        );
        assert_ne!(snapshot, live, "the snapshot differs from the live disk");
    }
}

/// Chunks of one structured read through libnbd's Python binding, merged where neighbours
/// have the same kind: `[(offset, length, "data"|"hole"), ...]` as JSON.
const PY_SPARSE: &str = r#"
import json, nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
size = h.get_size()
chunks = []
def chunk(buf, offset, status, err):
    kind = {nbd.READ_DATA: "data", nbd.READ_HOLE: "hole"}[status]
    if kind == "hole":
        assert buf == bytes(len(buf))
    chunks.append([offset, len(buf), kind])
    return 0
step = 2 << 20
for off in range(0, size, step):
    h.pread_structured(min(step, size - off), off, chunk)
chunks.sort()
merged = []
for c in chunks:
    if merged and merged[-1][2] == c[2] and merged[-1][0] + merged[-1][1] == c[0]:
        merged[-1][1] += c[1]
    else:
        merged.append(c)
print(json.dumps(merged))
"#;

/// Sparse reads: what reads as zeros without being stored goes out as `OFFSET_HOLE` chunks.
/// On an image written in whole clusters the chunks cover exactly qemu-nbd's ranges (chunk
/// boundaries inside a run may differ; runs are compared). On one with partly written
/// clusters qemu-nbd also sends holes where the host file has holes inside an allocated
/// cluster (it asks the file when the image looks metadata-preallocated); the engine does
/// not ask the file on reads, so those bytes go out as data: ours are a subset of its holes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_reads_send_the_holes_qemu_nbd_sends() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("sparse.py");
    std::fs::write(&script, PY_SPARSE).unwrap();
    let read = |url: String| {
        let script = script.clone();
        async move {
            let v = json(&run_python(&script, url).await);
            v.as_array()
                .unwrap()
                .iter()
                .map(|c| {
                    let n = |i: usize| c[i].as_u64().unwrap();
                    (n(0), n(1), c[2].as_str().unwrap() == "hole")
                })
                .collect::<Vec<(u64, u64, bool)>>()
        }
    };
    let aligned = dir.path().join("aligned.qcow2");
    qemu_ok("qemu-img", &["create", "-f", "qcow2", s(&aligned), "8M"]);
    let io = [
        "write -P 1 0 256k",
        "write -z 1M 64k",
        "write -P 2 2M 64k",
        "write -z -u 3M 128k",
        "write -P 3 5M 192k",
        "discard 5M 64k",
        "write -P 4 8128k 64k",
    ];
    assert_io_clean(&run_ok("qemu-io", io_cmds(s(&aligned), false, &args(&io))).await);
    let mixed = dir.path().join("mixed.qcow2");
    mixed_image(&mixed).await.close().await.unwrap();
    let mut runs = Vec::new();
    for path in [&aligned, &mixed] {
        let img = Image::open(path, &OpenOptions::read_only()).await.unwrap();
        let sub = tempfile::tempdir_in(dir.path()).unwrap();
        let srv = start(&img, vec![ExportConfig::live("")], Some(sub.path())).await;
        let ours = read(srv.url("")).await;
        srv.stop().await;
        img.close().await.unwrap();
        let qsock = fresh_sock(dir.path());
        let server = QemuNbdOnce::export(path, &qsock, &["-r"]);
        let theirs = read(format!("nbd+unix:///?socket={}", s(&qsock))).await;
        tokio::task::spawn_blocking(move || server.wait_exit())
            .await
            .unwrap();
        assert!(
            ours.iter().any(|c| c.2) && ours.iter().any(|c| !c.2),
            "holes and data: {ours:?}"
        );
        runs.push((ours, theirs));
    }
    let (ours, theirs) = &runs[0];
    assert_eq!(ours, theirs, "read chunks differ from qemu-nbd's");
    let (ours, theirs) = &runs[1];
    for &(off, len, _) in ours.iter().filter(|c| c.2) {
        assert!(
            theirs
                .iter()
                .any(|&(o, l, hole)| hole && o <= off && off + len <= o + l),
            "our hole {off}+{len} is not a hole of qemu-nbd's: {theirs:?}"
        );
    }
}
