//! X.509 credentials for the TLS tests of the NBD export, made with rcgen and laid out as
//! QEMU's `tls-creds-x509` wants them. Included (`#[path]`) by the library's and the CLI's
//! TLS tests, whose crates both have rcgen as a dev-dependency; not part of `common`, which
//! binaries without rcgen include.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

/// A certificate authority that signs server and client certificates.
pub struct Ca {
    pub cert: rcgen::Certificate,
    pub key: KeyPair,
}

fn validity(p: &mut CertificateParams) {
    p.not_before = rcgen::date_time_ymd(2020, 1, 1);
    p.not_after = rcgen::date_time_ymd(2099, 1, 1);
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut p);
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// (certificate PEM, key PEM) for `localhost` / 127.0.0.1, as a server or a client.
    pub fn leaf(&self, server: bool) -> (String, String) {
        let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        p.distinguished_name.push(DnType::CommonName, "localhost");
        // What QEMU's sanity checks of its own certificates want to see.
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        validity(&mut p);
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// Credential directories laid out as QEMU's tls-creds-x509 wants them.
pub struct Creds {
    _dir: tempfile::TempDir,
    pub ca: Ca,
    /// `ca-cert.pem`, `server-cert.pem`, `server-key.pem`.
    pub server: PathBuf,
    /// `ca-cert.pem` and a client certificate signed by the same CA.
    pub client: PathBuf,
    /// `ca-cert.pem` only: trusts the server, has no certificate of its own.
    pub anonymous: PathBuf,
    /// A client certificate from another CA; `ca-cert.pem` holds both CAs (QEMU checks its
    /// own certificate against it before connecting, and must trust the server).
    pub stranger: PathBuf,
}

fn write(dir: &Path, files: &[(&str, &str)]) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
}

pub fn creds() -> Creds {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("qcow2-nbd test CA");
    let ca_pem = ca.cert.pem();
    let (scert, skey) = ca.leaf(true);
    let server = dir.path().join("server");
    write(
        &server,
        &[
            ("ca-cert.pem", &ca_pem),
            ("server-cert.pem", &scert),
            ("server-key.pem", &skey),
        ],
    );
    let (ccert, ckey) = ca.leaf(false);
    let client = dir.path().join("client");
    write(
        &client,
        &[
            ("ca-cert.pem", &ca_pem),
            ("client-cert.pem", &ccert),
            ("client-key.pem", &ckey),
        ],
    );
    let anonymous = dir.path().join("anonymous");
    write(&anonymous, &[("ca-cert.pem", &ca_pem)]);
    let other = Ca::new("some other CA");
    let (ocert, okey) = other.leaf(false);
    let stranger = dir.path().join("stranger");
    let both = format!("{ca_pem}{}", other.cert.pem());
    write(
        &stranger,
        &[
            ("ca-cert.pem", &both),
            ("client-cert.pem", &ocert),
            ("client-key.pem", &okey),
        ],
    );
    Creds {
        _dir: dir,
        ca,
        server,
        client,
        anonymous,
        stranger,
    }
}

/// qemu-io / qemu-img arguments (`--object ... --image-opts ...`) that open the NBD export
/// at `server` (its `server.*` image options), over TLS with the client credentials in
/// `client` (`None`: plaintext). `hostname` is what QEMU checks the server's certificate
/// against where the address has no host name (a Unix socket).
pub fn nbd_open_args(server: &str, client: Option<&Path>, hostname: Option<&str>) -> Vec<String> {
    let mut a = Vec::new();
    let mut opts = format!("driver=nbd,{server}");
    if let Some(dir) = client {
        a.push("--object".to_string());
        a.push(format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            dir.display()
        ));
        opts.push_str(",tls-creds=tls0");
        if let Some(h) = hostname {
            opts.push_str(&format!(",tls-hostname={h}"));
        }
    }
    a.push("--image-opts".to_string());
    a.push(opts);
    a
}
