//! TLS on the NBD server against QEMU's client (qemu-io and qemu-img with
//! `--object tls-creds-x509`), and the option haggling around `NBD_OPT_STARTTLS` spoken as
//! raw bytes. Certificates are made by the test with rcgen. Fails loudly without QEMU.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/tls.rs"]
mod tls_creds;
#[path = "../crates/qcow2-nbd/tests/support/wire.rs"]
mod wire;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{assert_check_clean, qemu_ok};
use qcow2_async::{CreateOptions, Image, OpenOptions};
use qcow2_nbd::proto::{self, opt, rep};
use qcow2_nbd::{ExportConfig, Listener, Server, ServerOptions, TlsCredentials};
use tls_creds::creds;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wire::{go_payload, option_reply, read_n, send_option};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

struct Running {
    server: Server,
    task: tokio::task::JoinHandle<qcow2_nbd::Result<()>>,
    sock: PathBuf,
}

impl Running {
    async fn stop(self) {
        self.server.shutdown();
        self.task.await.unwrap().unwrap();
    }

    /// qemu-io / qemu-img arguments that open the export, over TLS with the client
    /// credentials in `client` (`None`: plaintext).
    fn open_args(&self, client: Option<&Path>) -> Vec<String> {
        let server = format!("server.type=unix,server.path={}", s(&self.sock));
        tls_creds::nbd_open_args(&server, client, Some("localhost"))
    }
}

async fn start(img: &Image, dir: &Path, tls: Option<TlsCredentials>) -> Running {
    let mut opts = ServerOptions::default();
    opts.tls = tls;
    let server = Server::new(img.clone(), vec![ExportConfig::live("")], opts)
        .await
        .unwrap();
    let sock = dir.join("nbd.sock");
    let listener = Listener::bind_unix(&sock).unwrap();
    let srv = server.clone();
    let task = tokio::spawn(async move { srv.serve(listener).await });
    Running { server, task, sock }
}

/// qemu-io with `cmds` against the export; returns (success, stdout + stderr).
async fn qemu_io(srv: &Running, client: Option<&Path>, cmds: &[&str]) -> (bool, String) {
    let mut a = srv.open_args(client);
    for c in cmds {
        a.push("-c".into());
        a.push(c.to_string());
    }
    tokio::task::spawn_blocking(move || {
        let out = common::qemu("qemu-io", &a.iter().map(String::as_str).collect::<Vec<_>>());
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // qemu-io exits 0 after a failed read verification: count that as failure too.
        let ok = out.status.success() && !text.contains("failed") && !text.contains("error");
        (ok, text)
    })
    .await
    .unwrap()
}

async fn new_image(path: &Path) -> Image {
    Image::create(path, &CreateOptions::new(8 << 20), &OpenOptions::default())
        .await
        .unwrap()
}

/// qemu-io writes and reads back patterns over TLS, qemu-img converts the export over TLS,
/// and the bytes are in the image afterwards; a plaintext qemu-io is refused and changed
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_reads_and_writes_over_tls_and_plaintext_is_refused() {
    let c = creds();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    let img = new_image(&path).await;
    let tls = TlsCredentials::from_dir(&c.server, false).unwrap();
    let srv = start(&img, dir.path(), Some(tls)).await;

    let (ok, out) = qemu_io(
        &srv,
        Some(&c.client),
        &["write -P 0xa5 0 1M", "write -P 0x5a 3M 64k", "flush"],
    )
    .await;
    assert!(ok, "qemu-io over TLS failed:\n{out}");
    // No client certificate is needed without verify-peer.
    let (ok, out) = qemu_io(
        &srv,
        Some(&c.anonymous),
        &[
            "read -P 0xa5 0 1M",
            "read -P 0x5a 3M 64k",
            "read -P 0 4M 1M",
        ],
    )
    .await;
    assert!(ok, "qemu-io over TLS failed:\n{out}");
    assert_eq!(out.matches("read ").count(), 3, "{out}");

    let (ok, out) = qemu_io(&srv, None, &["write -P 0xff 0 64k"]).await;
    assert!(!ok, "a plaintext client was served:\n{out}");
    assert!(
        out.contains("TLS negotiation required"),
        "plaintext not refused with NBD_REP_ERR_TLS_REQD:\n{out}"
    );

    let raw = dir.path().join("copy.raw");
    let mut a = vec!["convert".to_string()];
    a.extend(srv.open_args(Some(&c.client)));
    a.extend(["-O".into(), "raw".into(), s(&raw).into()]);
    tokio::task::spawn_blocking(move || {
        qemu_ok(
            "qemu-img",
            &a.iter().map(String::as_str).collect::<Vec<_>>(),
        )
    })
    .await
    .unwrap();
    let copy = std::fs::read(&raw).unwrap();
    assert_eq!(copy.len(), 8 << 20);
    assert!(copy[..1 << 20].iter().all(|&b| b == 0xa5));
    assert!(copy[3 << 20..(3 << 20) + (64 << 10)]
        .iter()
        .all(|&b| b == 0x5a));
    assert!(copy[4 << 20..].iter().all(|&b| b == 0));

    srv.stop().await;
    let mut head = vec![0u8; 64 << 10];
    img.read_at(&mut head, 0).await.unwrap();
    assert!(head.iter().all(|&b| b == 0xa5), "plaintext write landed");
    img.close().await.unwrap();
    assert_check_clean(&path);
}

/// Under verify-peer a client certificate from the server's CA gets in; one from another
/// CA, or none, is refused by the TLS handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_peer_admits_only_certificates_of_the_ca() {
    let c = creds();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    let img = new_image(&path).await;
    let tls = TlsCredentials::from_dir(&c.server, true).unwrap();
    assert!(tls.verify_peer());
    let srv = start(&img, dir.path(), Some(tls)).await;

    let (ok, out) = qemu_io(&srv, Some(&c.client), &["write -P 0x3c 0 64k"]).await;
    assert!(ok, "trusted client refused:\n{out}");
    let (ok, out) = qemu_io(&srv, Some(&c.client), &["read -P 0x3c 0 64k"]).await;
    assert!(ok, "trusted client refused:\n{out}");
    for (who, d) in [("no certificate", &c.anonymous), ("other CA", &c.stranger)] {
        let (ok, out) = qemu_io(&srv, Some(d), &["write -P 0xee 0 64k"]).await;
        assert!(!ok, "client with {who} was served:\n{out}");
        // Refused by the server's TLS handshake, not by QEMU's checks of its own files.
        assert!(
            // (How the refusal reads depends on when the alert overtakes the client: a
            // fatal alert, or a broken pipe under its first option.)
            out.contains("can't open") && !out.contains("own certificate"),
            "client with {who} not refused by the server:\n{out}"
        );
    }
    srv.stop().await;
    let mut head = vec![0u8; 64 << 10];
    img.read_at(&mut head, 0).await.unwrap();
    assert!(head.iter().all(|&b| b == 0x3c), "a refused client wrote");
    img.close().await.unwrap();
    assert_check_clean(&path);
}

/// Missing and malformed credential files are typed errors naming the file.
#[test]
fn bad_credentials_are_typed_errors() {
    let c = creds();
    let empty = tempfile::tempdir().unwrap();
    match TlsCredentials::from_dir(empty.path(), false) {
        Err(qcow2_nbd::Error::TlsCredsUnreadable { path, .. }) => {
            assert!(path.ends_with("server-cert.pem"), "{path:?}")
        }
        other => panic!("missing files accepted: {other:?}"),
    }
    // verify-peer needs ca-cert.pem; without it the server credentials alone do.
    let no_ca = tempfile::tempdir().unwrap();
    for f in ["server-cert.pem", "server-key.pem"] {
        std::fs::copy(c.server.join(f), no_ca.path().join(f)).unwrap();
    }
    TlsCredentials::from_dir(no_ca.path(), false).unwrap();
    match TlsCredentials::from_dir(no_ca.path(), true) {
        Err(qcow2_nbd::Error::TlsCredsUnreadable { path, .. }) => {
            assert!(path.ends_with("ca-cert.pem"), "{path:?}")
        }
        other => panic!("verify-peer without a CA accepted: {other:?}"),
    }
    std::fs::write(no_ca.path().join("server-cert.pem"), "not a certificate").unwrap();
    match TlsCredentials::from_dir(no_ca.path(), false) {
        Err(qcow2_nbd::Error::TlsCredsInvalid { path, .. }) => {
            assert!(path.ends_with("server-cert.pem"), "{path:?}")
        }
        other => panic!("garbage certificate accepted: {other:?}"),
    }
    // A file far larger than any certificate (a wrong path) is refused, not read whole.
    std::fs::write(
        no_ca.path().join("server-cert.pem"),
        vec![b'A'; (1 << 20) + 1],
    )
    .unwrap();
    match TlsCredentials::from_dir(no_ca.path(), false) {
        Err(qcow2_nbd::Error::TlsCredsInvalid { path, reason }) => {
            assert!(
                path.ends_with("server-cert.pem") && reason.contains("larger"),
                "{reason}"
            )
        }
        other => panic!("a huge certificate file accepted: {other:?}"),
    }
    // A key that is not the certificate's.
    let (cert, _) = c.ca.leaf(true);
    std::fs::write(no_ca.path().join("server-cert.pem"), cert).unwrap();
    match TlsCredentials::from_dir(no_ca.path(), false) {
        Err(qcow2_nbd::Error::TlsCredsInvalid { .. }) => {}
        other => panic!("mismatched key accepted: {other:?}"),
    }
}

/// With TLS configured, options before STARTTLS get `NBD_REP_ERR_TLS_REQD` and change
/// nothing; STARTTLS gets an ACK, the TLS handshake follows, and haggling goes on over TLS
/// (a second STARTTLS is invalid) up to a read in the transmission phase. Then:
/// `NBD_OPT_EXPORT_NAME` before STARTTLS is answered by a disconnect, and `ABORT` by its ACK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_haggling_as_qemu_nbd() {
    let c = creds();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    let img = new_image(&path).await;
    img.write_at(&[0x77; 512], 0).await.unwrap();
    let tls = TlsCredentials::from_dir(&c.server, false).unwrap();
    let srv = start(&img, dir.path(), Some(tls)).await;
    let connect = || async {
        let mut s = tokio::net::UnixStream::connect(&srv.sock).await.unwrap();
        let greeting = read_n(&mut s, 18).await;
        assert_eq!(greeting[..], proto::greeting()[..]);
        s.write_all(&proto::CLIENT_FIXED_NEWSTYLE.to_be_bytes())
            .await
            .unwrap();
        s
    };

    let mut s = connect().await;
    for (o, data) in [
        (opt::LIST, vec![]),
        (opt::STRUCTURED_REPLY, vec![]),
        (opt::GO, go_payload("")),
        (opt::INFO, go_payload("")),
        (77, vec![1, 2]),
    ] {
        send_option(&mut s, o, &data).await;
        let (ro, kind, _) = option_reply(&mut s).await;
        assert_eq!((ro, kind), (o, rep::ERR_TLS_REQD), "option {o}");
    }
    send_option(&mut s, opt::STARTTLS, &[]).await;
    assert_eq!(
        option_reply(&mut s).await,
        (opt::STARTTLS, rep::ACK, vec![])
    );

    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(c.ca.cert.der().clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut t = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("localhost".try_into().unwrap(), s)
        .await
        .expect("TLS handshake");
    send_option(&mut t, opt::STARTTLS, &[]).await;
    assert_eq!(option_reply(&mut t).await.1, rep::ERR_INVALID);
    send_option(&mut t, opt::LIST, &[]).await;
    assert_eq!(option_reply(&mut t).await.1, rep::SERVER);
    assert_eq!(option_reply(&mut t).await.1, rep::ACK);
    send_option(&mut t, opt::GO, &go_payload("")).await;
    loop {
        let (_, kind, _) = option_reply(&mut t).await;
        if kind == rep::ACK {
            break;
        }
        assert_eq!(kind, rep::INFO);
    }
    // A simple-reply READ of the first 512 bytes.
    let mut req = Vec::new();
    req.extend_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&proto::cmd::READ.to_be_bytes());
    req.extend_from_slice(&9u64.to_be_bytes());
    req.extend_from_slice(&0u64.to_be_bytes());
    req.extend_from_slice(&512u32.to_be_bytes());
    t.write_all(&req).await.unwrap();
    t.flush().await.unwrap();
    let head = read_n(&mut t, 16).await;
    assert_eq!(head[..4], proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
    assert_eq!(head[4..8], [0, 0, 0, 0], "read failed");
    assert_eq!(read_n(&mut t, 512).await, vec![0x77; 512]);

    // EXPORT_NAME has no error reply: the server hangs up.
    let mut s = connect().await;
    send_option(&mut s, opt::EXPORT_NAME, b"").await;
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "EXPORT_NAME before STARTTLS was answered");
    // ABORT still gets its ACK.
    let mut s = connect().await;
    send_option(&mut s, opt::ABORT, &[]).await;
    assert_eq!(option_reply(&mut s).await.1, rep::ACK);

    drop(t);
    srv.stop().await;
    img.close().await.unwrap();
}

/// libnbd's clients over TLS (`nbds+unix`), as a user of `nbdcopy` and `nbdinfo` would run
/// them, under verify-peer with the server's certificate checked too: the client's
/// credentials directory and the name to check come in the URI (`tls-certificates`,
/// `tls-hostname`; libnbd's tools allow local paths there). `nbdinfo` reports TLS, `nbdcopy`
/// writes a file into the export and copies it back out unchanged; a client with no
/// certificate is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libnbd_clients_copy_in_and_out_over_tls() {
    let c = creds();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    let img = new_image(&path).await;
    let tls = TlsCredentials::from_dir(&c.server, true).unwrap();
    let srv = start(&img, dir.path(), Some(tls)).await;
    let url = |creds: &Path| {
        format!(
            "nbds+unix:///?socket={}&tls-certificates={}&tls-hostname=localhost",
            s(&srv.sock),
            s(creds)
        )
    };
    let src = dir.path().join("src.raw");
    let data: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(&src, &data).unwrap();
    let back = dir.path().join("back.raw");
    let run = |tool: &'static str, args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(tool)
                .args(&args)
                .output()
                .unwrap_or_else(|e| {
                    panic!("{tool} ({e}): `bash scripts/test.sh` installs libnbd-bin")
                })
        })
    };
    let ok = |out: std::process::Output| {
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}");
        text
    };
    let info = ok(run("nbdinfo", vec!["--json".into(), url(&c.client)])
        .await
        .unwrap());
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["TLS"], true, "{info:#}");
    assert_eq!(info["exports"][0]["export-size"], 8 << 20);
    ok(run("nbdcopy", vec![s(&src).into(), url(&c.client)])
        .await
        .unwrap());
    ok(run("nbdcopy", vec![url(&c.client), s(&back).into()])
        .await
        .unwrap());
    assert!(
        std::fs::read(&back).unwrap() == data,
        "the copy out differs"
    );
    let refused = run("nbdinfo", vec![url(&c.anonymous)]).await.unwrap();
    assert!(
        !refused.status.success(),
        "a client without a certificate got in"
    );
    srv.stop().await;
    img.close().await.unwrap();
    assert_check_clean(&path);
}
