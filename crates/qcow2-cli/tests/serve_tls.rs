//! `qcow2 serve --tls-creds DIR [--tls-verify-peer]` as a process over TCP, with QEMU's
//! client (which checks the server's certificate against the host name 127.0.0.1).
//! Certificates are made by the test with rcgen. Fails loudly without QEMU.

#[path = "../../../tests/common/mod.rs"]
mod common;
#[path = "../../../tests/common/tls.rs"]
mod tls_creds;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{assert_check_clean, qemu_ok, wait_for};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// qemu-io against `bind` over TLS with the credentials in `client` (`None`: plaintext).
fn qemu_io(bind: &str, client: Option<&Path>, cmd: &str) -> (bool, String) {
    let (host, port) = bind.split_once(':').unwrap();
    let mut opts = format!("driver=nbd,server.type=inet,server.host={host},server.port={port}");
    let mut args: Vec<String> = Vec::new();
    if let Some(d) = client {
        args.push("--object".into());
        args.push(format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            s(d)
        ));
        opts.push_str(",tls-creds=tls0");
    }
    args.extend(["--image-opts".into(), opts, "-c".into(), cmd.into()]);
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
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let bind = format!("127.0.0.1:{port}");
    let server = &creds.server;
    let mut child = Command::new(env!("CARGO_BIN_EXE_qcow2"))
        .args(["serve", s(&img), "--bind", &bind, "--tls-creds", s(server)])
        .arg("--tls-verify-peer")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qcow2 binary");
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

    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "qcow2 serve did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(status.success(), "{err}");
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
