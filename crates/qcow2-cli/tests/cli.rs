//! The `qcow2` binary against `qemu-img` on the same inputs: every verb's output, JSON
//! fields and exit codes, and its error paths.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn qcow2(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qcow2"))
        .args(args)
        .output()
        .expect("run qcow2")
}

/// Runs a QEMU tool; a missing QEMU fails the test loudly, never skips it.
fn qemu(tool: &str, args: &[&str]) -> Output {
    Command::new(tool).args(args).output().unwrap_or_else(|e| {
        panic!("{tool} is required for these tests (apt install qemu-utils): {e}")
    })
}

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn json(o: Output) -> Value {
    serde_json::from_str(&ok(o)).unwrap()
}

struct Dir(tempfile::TempDir);

impl Dir {
    fn new() -> Dir {
        Dir(tempfile::tempdir().unwrap())
    }
    fn p(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }
}

/// A small chain: base (data), top (data over it, a zero cluster), both qcow2.
fn chain(d: &Dir) -> (PathBuf, PathBuf) {
    let (base, top) = (d.p("base.qcow2"), d.p("top.qcow2"));
    ok(qcow2(&["create", "-q", "-f", "qcow2", s(&base), "4M"]));
    ok(qemu(
        "qemu-io",
        &["-c", "write -P 1 0 1M", "-c", "write -P 3 3M 64k", s(&base)],
    ));
    ok(qcow2(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&top),
        "4M",
    ]));
    ok(qemu(
        "qemu-io",
        &["-c", "write -P 2 512k 1M", "-c", "write -z 2M 64k", s(&top)],
    ));
    (base, top)
}

#[test]
fn info_json_matches_qemu_img() {
    let d = Dir::new();
    let (_, top) = chain(&d);
    ok(qemu("qemu-img", &["snapshot", "-c", "snap1", s(&top)]));
    ok(qemu(
        "qemu-img",
        &["bitmap", "--add", "-g", "16k", s(&top), "bm"],
    ));
    let ours = json(qcow2(&["info", "--output", "json", s(&top)]));
    let theirs = json(qemu("qemu-img", &["info", "--output=json", s(&top)]));
    for k in [
        "virtual-size",
        "cluster-size",
        "format",
        "backing-filename",
        "backing-filename-format",
        "snapshots",
    ] {
        assert_eq!(ours[k], theirs[k], "{k}");
    }
    for k in [
        "compat",
        "compression-type",
        "lazy-refcounts",
        "refcount-bits",
        "corrupt",
        "extended-l2",
        "bitmaps",
    ] {
        assert_eq!(
            ours["format-specific"]["data"][k], theirs["format-specific"]["data"][k],
            "format-specific {k}"
        );
    }
}

#[test]
fn map_matches_qemu_img_in_json_and_human_form() {
    let d = Dir::new();
    let (_, top) = chain(&d);
    let ours = json(qcow2(&["map", "--output", "json", s(&top)]));
    let theirs = json(qemu("qemu-img", &["map", "--output=json", s(&top)]));
    assert_eq!(ours, theirs);
    let human = |o: Output| {
        ok(o)
            .lines()
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        human(qcow2(&["map", s(&top)])),
        human(qemu("qemu-img", &["map", s(&top)]))
    );
}

/// Flips the refcount of host cluster `c` (16-bit refcounts, first refcount block).
fn set_refcount(img: &Path, c: u64, v: u16) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .unwrap();
    let mut h = [0u8; 56];
    f.read_exact(&mut h).unwrap();
    let rt = u64::from_be_bytes(h[48..56].try_into().unwrap());
    let mut e = [0u8; 8];
    f.seek(SeekFrom::Start(rt)).unwrap();
    f.read_exact(&mut e).unwrap();
    let block = u64::from_be_bytes(e);
    f.seek(SeekFrom::Start(block + 2 * c)).unwrap();
    f.write_all(&v.to_be_bytes()).unwrap();
}

#[test]
fn check_verdicts_exit_codes_and_json_match_qemu_img() {
    let d = Dir::new();
    let (base, _) = chain(&d);
    let code = |o: &Output| o.status.code().unwrap();
    // Clean.
    let o = qcow2(&["check", s(&base)]);
    assert_eq!(code(&o), 0);
    assert!(String::from_utf8_lossy(&o.stdout).contains("No errors were found on the image."));
    let ours = json(qcow2(&["check", "--output", "json", s(&base)]));
    let theirs = json(qemu("qemu-img", &["check", "--output=json", s(&base)]));
    for k in [
        "image-end-offset",
        "total-clusters",
        "allocated-clusters",
        "check-errors",
        "fragmented-clusters",
        "compressed-clusters",
    ] {
        assert_eq!(ours[k], theirs[k], "{k}");
    }
    // A leak: one more cluster in the file, counted but referenced by nothing.
    let leak = d.p("leak.qcow2");
    std::fs::copy(&base, &leak).unwrap();
    let end = std::fs::metadata(&leak).unwrap().len() / 65536;
    let f = std::fs::OpenOptions::new().write(true).open(&leak).unwrap();
    f.set_len((end + 1) * 65536).unwrap();
    set_refcount(&leak, end, 1);
    let o = qcow2(&["check", s(&leak)]);
    assert_eq!(code(&o), 3);
    assert_eq!(code(&qemu("qemu-img", &["check", s(&leak)])), 3);
    let any = |o: Output| serde_json::from_slice::<Value>(&o.stdout).unwrap();
    let ours = any(qcow2(&["check", "--output", "json", s(&leak)]));
    let theirs = any(qemu("qemu-img", &["check", "--output=json", s(&leak)]));
    assert_eq!(ours["leaks"], 1);
    for k in [
        "leaks",
        "allocated-clusters",
        "total-clusters",
        "image-end-offset",
    ] {
        assert_eq!(ours[k], theirs[k], "{k}");
    }
    // A corruption: a data cluster's refcount dropped to zero.
    let bad = d.p("bad.qcow2");
    std::fs::copy(&base, &bad).unwrap();
    let map = json(qemu("qemu-img", &["map", "--output=json", s(&bad)]));
    let host = map[0]["offset"].as_u64().unwrap();
    set_refcount(&bad, host / 65536, 0);
    assert_eq!(code(&qcow2(&["check", s(&bad)])), 2);
    assert_eq!(code(&qemu("qemu-img", &["check", s(&bad)])), 2);
    // Repair.
    assert_eq!(code(&qcow2(&["check", "-r", "leaks", s(&leak)])), 0);
    assert_eq!(code(&qcow2(&["check", "-r", "all", s(&bad)])), 0);
    for p in [&leak, &bad] {
        assert_eq!(code(&qemu("qemu-img", &["check", s(p)])), 0);
    }
    // Errors: a missing file, a bad -r value.
    assert_eq!(code(&qcow2(&["check", s(&d.p("nope"))])), 1);
    assert_eq!(code(&qcow2(&["check", "-r", "some", s(&base)])), 1);
}

#[test]
fn convert_both_ways_compressed_and_with_a_backing_file() {
    let d = Dir::new();
    let (base, top) = chain(&d);
    let same = |a: &Path, b: &Path| {
        ok(qemu("qemu-img", &["compare", "-q", s(a), s(b)]));
    };
    let raw = d.p("top.raw");
    ok(qcow2(&["convert", "-O", "raw", s(&top), s(&raw)]));
    same(&top, &raw);
    for (name, opts) in [
        ("plain.qcow2", None),
        ("zlib.qcow2", Some("compression_type=zlib")),
        ("zstd.qcow2", Some("compression_type=zstd,cluster_size=4k")),
    ] {
        let out = d.p(name);
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        if let Some(o) = opts {
            args.extend(["-c", "-o", o]);
        }
        args.extend([s(&raw), s(&out)]);
        ok(qcow2(&args));
        same(&raw, &out);
        ok(qemu("qemu-img", &["check", "-q", s(&out)]));
        if opts.is_some() {
            let c = json(qemu("qemu-img", &["check", "--output=json", s(&out)]));
            assert!(
                c["compressed-clusters"].as_u64().unwrap() > 0,
                "{name}: {c}"
            );
        }
    }
    // With a backing file for the target: only what the top holds is copied.
    let over = d.p("over.qcow2");
    ok(qcow2(&[
        "convert",
        "-O",
        "qcow2",
        "-B",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&top),
        s(&over),
    ]));
    same(&top, &over);
    let m = json(qemu("qemu-img", &["map", "--output=json", s(&over)]));
    let in_top: u64 = m
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(in_top, 1 << 20, "only the top's own megabyte is copied");
    let _ = base;
    // Failure leaves nothing behind.
    let o = qcow2(&[
        "convert",
        "-O",
        "qcow2",
        s(&d.p("missing")),
        s(&d.p("x.qcow2")),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(!d.p("x.qcow2").exists());
    let leftovers: Vec<_> = std::fs::read_dir(d.0.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".convert-"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn compare_reports_like_qemu_img() {
    let d = Dir::new();
    let (base, top) = chain(&d);
    let o = qcow2(&["compare", s(&top), s(&top)]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "Images are identical.\n"
    );
    let ours = qcow2(&["compare", s(&base), s(&top)]);
    let theirs = qemu("qemu-img", &["compare", s(&base), s(&top)]);
    assert_eq!(ours.status.code(), Some(1));
    assert_eq!(theirs.status.code(), Some(1));
    assert_eq!(ours.stdout, theirs.stdout);
    let o = qcow2(&["compare", s(&top), s(&d.p("missing"))]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn snapshots_made_here_are_listed_alike_and_applied_by_both() {
    let d = Dir::new();
    let (_, top) = chain(&d);
    ok(qcow2(&["snapshot", "-c", "one", s(&top)]));
    ok(qemu("qemu-io", &["-c", "write -P 7 0 64k", s(&top)]));
    ok(qemu("qemu-img", &["snapshot", "-c", "two", s(&top)]));
    assert_eq!(
        ok(qcow2(&["snapshot", "-l", s(&top)])),
        ok(qemu("qemu-img", &["snapshot", "-l", s(&top)]))
    );
    let list = json(qcow2(&["snapshot", "-l", "--output", "json", s(&top)]));
    assert_eq!(list.as_array().unwrap().len(), 2);
    ok(qcow2(&["snapshot", "-a", "one", s(&top)]));
    ok(qemu("qemu-io", &["-c", "read -P 2 512k 64k", s(&top)]));
    ok(qcow2(&["snapshot", "-d", "two", s(&top)]));
    ok(qemu("qemu-img", &["check", "-q", s(&top)]));
    assert_eq!(
        qcow2(&["snapshot", "-d", "nope", s(&top)]).status.code(),
        Some(1)
    );
}

#[test]
fn bitmap_verbs_are_seen_by_qemu_img() {
    let d = Dir::new();
    let (base, _) = chain(&d);
    ok(qcow2(&["bitmap", "--add", "-g", "64k", s(&base), "a"]));
    ok(qcow2(&["bitmap", "--add", "--disable", s(&base), "b"]));
    ok(qemu("qemu-io", &["-c", "write 0 4k", s(&base)]));
    ok(qcow2(&["bitmap", "--merge", "a", s(&base), "b"]));
    ok(qcow2(&["bitmap", "--enable", s(&base), "b"]));
    ok(qcow2(&["bitmap", "--clear", s(&base), "a"]));
    ok(qcow2(&["bitmap", "--add", s(&base), "c"]));
    ok(qcow2(&["bitmap", "--remove", s(&base), "c"]));
    let info = json(qemu("qemu-img", &["info", "--output=json", s(&base)]));
    let bms = &info["format-specific"]["data"]["bitmaps"];
    assert_eq!(bms.as_array().unwrap().len(), 2, "{bms}");
    assert_eq!(bms[1]["name"], "b");
    assert_eq!(bms[1]["flags"], serde_json::json!(["auto"]));
    ok(qemu("qemu-img", &["check", "-q", s(&base)]));
    assert_eq!(
        qcow2(&["bitmap", "--add", s(&base), "a"]).status.code(),
        Some(1),
        "duplicate names are refused"
    );
}

#[test]
fn resize_commit_rebase_amend_leave_check_clean_images() {
    let d = Dir::new();
    let (base, top) = chain(&d);
    let clean = |p: &Path| ok(qemu("qemu-img", &["check", "-q", s(p)]));
    let want = d.p("want.raw");
    ok(qemu(
        "qemu-img",
        &["convert", "-O", "raw", s(&top), s(&want)],
    ));
    // rebase onto a different file (safe), then unsafe back.
    let other = d.p("other.qcow2");
    ok(qcow2(&["create", "-q", "-f", "qcow2", s(&other), "4M"]));
    ok(qemu("qemu-io", &["-c", "write -P 9 0 4M", s(&other)]));
    ok(qcow2(&[
        "rebase",
        "-b",
        "other.qcow2",
        "-F",
        "qcow2",
        s(&top),
    ]));
    ok(qemu(
        "qemu-img",
        &["compare", "-q", "-F", "qcow2", s(&want), s(&top)],
    ));
    clean(&top);
    // commit into the new base.
    ok(qcow2(&["commit", s(&top)]));
    ok(qemu(
        "qemu-img",
        &["compare", "-q", "-f", "raw", s(&want), s(&other)],
    ));
    clean(&other);
    clean(&top);
    ok(qcow2(&[
        "rebase",
        "-u",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&top),
    ]));
    let info = json(qemu("qemu-img", &["info", "--output=json", s(&top)]));
    assert_eq!(info["backing-filename"], "base.qcow2");
    // resize.
    ok(qcow2(&["resize", s(&base), "+64M"]));
    clean(&base);
    let info = json(qemu("qemu-img", &["info", "--output=json", s(&base)]));
    assert_eq!(info["virtual-size"], 68 << 20);
    assert_eq!(qcow2(&["resize", s(&base), "1M"]).status.code(), Some(1));
    assert_eq!(
        qcow2(&["resize", "--shrink", s(&base), "512k"])
            .status
            .code(),
        Some(1),
        "data past the new end is not cut without --discard-data"
    );
    ok(qcow2(&[
        "resize",
        "--shrink",
        "--discard-data",
        s(&base),
        "512k",
    ]));
    clean(&base);
    // amend.
    ok(qcow2(&["amend", "-o", "lazy_refcounts=on", s(&base)]));
    let info = json(qemu("qemu-img", &["info", "--output=json", s(&base)]));
    assert_eq!(info["format-specific"]["data"]["lazy-refcounts"], true);
    ok(qcow2(&[
        "amend",
        "-o",
        "lazy_refcounts=off,compat=0.10",
        s(&base),
    ]));
    let info = json(qemu("qemu-img", &["info", "--output=json", s(&base)]));
    assert_eq!(info["format-specific"]["data"]["compat"], "0.10");
    clean(&base);
    assert_eq!(
        qcow2(&["amend", "-o", "cluster_size=4k", s(&base)])
            .status
            .code(),
        Some(1)
    );
}

#[test]
fn measure_matches_qemu_img() {
    let d = Dir::new();
    let (_, top) = chain(&d);
    for args in [
        vec!["--size", "1G"],
        vec!["-o", "cluster_size=512,refcount_bits=64", "--size", "100M"],
        vec!["-o", "cluster_size=16k,extended_l2=on", "--size", "7G"],
        vec!["-o", "preallocation=full", "--size", "5G"],
        vec![s(&top)],
        vec!["-o", "cluster_size=4k", s(&top)],
    ] {
        let mut a = vec!["measure", "--output", "json", "-O", "qcow2"];
        a.extend(args.iter().copied());
        let ours = json(qcow2(&a));
        a[1] = "--output=json";
        a.remove(2);
        let theirs = json(qemu("qemu-img", &a));
        assert_eq!(ours, theirs, "{args:?}");
    }
}

/// `create -b BASE -F FMT TOP` without a size takes the backing file's virtual size, as
/// qemu-img does (relative to TOP's folder, qcow2 and raw); without a backing file or its
/// format it refuses as qemu-img does.
#[test]
fn create_without_a_size_takes_the_backing_files() {
    let d = Dir::new();
    let base = d.p("base.qcow2");
    ok(qemu(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&base), "3M"],
    ));
    std::fs::create_dir(d.p("sub")).unwrap();
    let raw = d.p("base.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(5 << 20)
        .unwrap();
    for (name, fmt, top, size) in [
        ("base.qcow2", "qcow2", d.p("top.qcow2"), 3u64 << 20),
        ("../base.qcow2", "qcow2", d.p("sub/top.qcow2"), 3 << 20),
        ("base.raw", "raw", d.p("top-raw.qcow2"), 5 << 20),
    ] {
        ok(qcow2(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            name,
            "-F",
            fmt,
            s(&top),
        ]));
        let twin = top.with_extension("qemu.qcow2");
        ok(qemu(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                name,
                "-F",
                fmt,
                s(&twin),
            ],
        ));
        for p in [&top, &twin] {
            let v = json(qemu("qemu-img", &["info", "--output=json", s(p)]));
            assert_eq!(v["virtual-size"], size, "{}: {v:#}", p.display());
            assert_eq!(v["backing-filename"], name);
        }
        ok(qemu("qemu-img", &["check", s(&top)]));
    }
    for (args, theirs) in [
        (
            vec!["-b", "base.qcow2"],
            "Backing file specified without backing format",
        ),
        (vec![], "Image creation needs a size parameter"),
    ] {
        let top = d.p("refused.qcow2");
        let mut a = vec!["create", "-f", "qcow2"];
        a.extend(&args);
        a.push(s(&top));
        let o = qcow2(&a);
        assert_eq!(o.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&o.stderr).contains(theirs));
        let q = qemu("qemu-img", &a);
        assert!(
            String::from_utf8_lossy(&q.stderr).contains(theirs),
            "qemu-img says so too"
        );
        assert!(!top.exists(), "nothing is created");
    }
    let o = qcow2(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "gone.qcow2",
        "-F",
        "qcow2",
        s(&d.p("t.qcow2")),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("Could not open backing image"));
}

#[test]
fn errors_are_one_line_and_exit_1() {
    let d = Dir::new();
    let o = qcow2(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "bogus=1",
        s(&d.p("x.qcow2")),
        "1M",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("qcow2: "), "{err}");
    let o = qcow2(&["info", s(&d.p("missing.qcow2"))]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn demo_verifies_its_own_workload() {
    let d = Dir::new();
    let o = qcow2(&[
        "demo",
        "--tasks",
        "8",
        "--writes",
        "20",
        "--dir",
        s(&d.p("demo")),
    ]);
    let out = ok(o);
    for what in ["verified", "bitmap", "snapshot", "compressed copy", "check"] {
        assert!(out.contains(what), "{what} missing in:\n{out}");
    }
    assert!(!out.contains("FAILED"), "{out}");
}

#[test]
fn bench_reports_rates_latencies_and_leaves_a_clean_image() {
    let d = Dir::new();
    let img = d.p("b.qcow2");
    ok(qcow2(&["create", "-q", "-f", "qcow2", s(&img), "64M"]));
    // Allocating writes with a cluster-sized stride, then random reads and a mix.
    let w = json(qcow2(&[
        "bench",
        "--output",
        "json",
        "-w",
        "-c",
        "500",
        "-d",
        "8",
        "-s",
        "4k",
        "-S",
        "64k",
        "--pattern",
        "0x5a",
        s(&img),
    ]));
    assert_eq!(w["requests"], 500);
    assert!(w["iops"].as_f64().unwrap() > 0.0);
    assert!(w["latency-us"]["p99"].as_f64().unwrap() >= w["latency-us"]["p50"].as_f64().unwrap());
    ok(qemu("qemu-img", &["check", "-q", s(&img)]));
    ok(qemu("qemu-io", &["-c", "read -P 0x5a 64k 4k", s(&img)]));
    let m = json(qcow2(&[
        "bench",
        "--output",
        "json",
        "--random",
        "--read-percent",
        "50",
        "-c",
        "300",
        "-t",
        "none",
        "-i",
        "threads",
        s(&img),
    ]));
    assert_eq!(m["requests"], 300);
    ok(qemu("qemu-img", &["check", "-q", s(&img)]));
    let o = qcow2(&["bench", "-i", "posix", s(&img)]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn encrypted_images_take_the_passphrase_from_a_file_or_the_environment() {
    let d = Dir::new();
    let img = d.p("enc.qcow2");
    let key = d.p("key");
    std::fs::write(&key, "s3cret\n").unwrap();
    let with_env = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_qcow2"))
            .args(args)
            .env("QCOW2_TEST_KEY", "s3cret")
            .output()
            .unwrap()
    };
    ok(with_env(&[
        "--key-env",
        "QCOW2_TEST_KEY",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.iter-time=10,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv",
        s(&img),
        "4M",
    ]));
    let opts = format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=k",
        s(&img)
    );
    ok(qemu(
        "qemu-io",
        &[
            "--object",
            "secret,id=k,data=s3cret",
            "--image-opts",
            "-c",
            "write -P 0x61 64k 128k",
            &opts,
        ],
    ));
    let raw = d.p("plain.raw");
    ok(qcow2(&[
        "--key-file",
        s(&key),
        "convert",
        "-O",
        "raw",
        s(&img),
        s(&raw),
    ]));
    let data = std::fs::read(&raw).unwrap();
    assert!(data[65536..196608].iter().all(|&b| b == 0x61));
    assert!(data[..65536].iter().all(|&b| b == 0));
    std::fs::write(&key, "wrong").unwrap();
    let o = qcow2(&[
        "--key-file",
        s(&key),
        "convert",
        "-O",
        "raw",
        s(&img),
        s(&d.p("x.raw")),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("cannot unlock"), "{err}");
    // Metadata needs no key.
    ok(qcow2(&["info", s(&img)]));
    ok(qcow2(&["check", s(&img)]));
}

/// While qemu-nbd serves an image read-write, our verbs are refused with QEMU's message, as
/// qemu-img's are; `-U` inspects it anyway, and is refused for writes.
#[test]
fn images_in_use_are_refused_and_force_share_inspects_them() {
    let d = Dir::new();
    let img = d.p("busy.qcow2");
    ok(qemu(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&img), "1M"],
    ));
    let sock = d.p("busy.sock");
    let mut nbd = Command::new("qemu-nbd")
        .args(["-f", "qcow2", "-k", s(&sock), s(&img)])
        .spawn()
        .expect("qemu-nbd is required for these tests");
    for _ in 0..250 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Both refuse alike while the image is in use...
    let ours = qcow2(&["info", s(&img)]);
    let theirs = qemu("qemu-img", &["info", s(&img)]);
    assert!(!ours.status.success() && !theirs.status.success());
    let (e, q) = (
        String::from_utf8_lossy(&ours.stderr),
        String::from_utf8_lossy(&theirs.stderr),
    );
    assert!(e.contains("Failed to get shared \"write\" lock"), "{e}");
    assert!(q.contains("Failed to get shared \"write\" lock"), "{q}");
    assert!(e.contains("Is another process using the image"), "{e}");
    let w = qcow2(&["resize", s(&img), "2M"]);
    assert!(!w.status.success());
    assert!(String::from_utf8_lossy(&w.stderr).contains("Failed to get \"write\" lock"));
    // ...and read with -U.
    let v = json(qcow2(&["info", "-U", "--output", "json", s(&img)]));
    assert_eq!(v["virtual-size"], 1 << 20);
    ok(qcow2(&["check", "-U", s(&img)]));
    let r = qcow2(&["check", "-U", "-r", "all", s(&img)]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("force-share"));
    let _ = nbd.kill();
    let _ = nbd.wait();
    ok(qcow2(&["resize", s(&img), "2M"]));
}

/// Output into a pipe its reader closed (`qcow2 snapshot -l … | head -1`) ends the tool
/// quietly, as SIGPIPE ends qemu-img, instead of a panic.
#[test]
fn a_closed_stdout_ends_the_tool_without_a_panic() {
    use std::io::Read;
    let d = Dir::new();
    let img = d.p("many.qcow2");
    ok(qemu(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&img), "64M"],
    ));
    // 65536 snapshot entries that read as zeros past the end (iotest 080-7): a long listing.
    let mut b = std::fs::read(&img).unwrap();
    b[60..64].copy_from_slice(&0x10000u32.to_be_bytes());
    b[64..72].copy_from_slice(&0x100_0000u64.to_be_bytes());
    std::fs::write(&img, b).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_qcow2"))
        .args(["snapshot", "-l", s(&img)])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 16];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut first)
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(141), "{err}");
}
