//! TLS for the handshake: X.509 credentials laid out as QEMU's `tls-creds-x509` object
//! expects them, and the rustls acceptor built from them.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::error::{Error, Result};

/// The CA certificate(s) client certificates must chain to (QEMU's file name).
pub const CA_CERT: &str = "ca-cert.pem";
/// The server's certificate, optionally followed by its intermediate CAs.
pub const SERVER_CERT: &str = "server-cert.pem";
/// The server's private key (PKCS#8, PKCS#1 or SEC1 PEM, unencrypted).
pub const SERVER_KEY: &str = "server-key.pem";

/// TLS credentials of the server: with them set in [`ServerOptions::tls`], a client must
/// send `NBD_OPT_STARTTLS` before any other option (every other option gets
/// `NBD_REP_ERR_TLS_REQD`, as qemu-nbd answers), and the rest of the handshake and the
/// transmission phase run over TLS 1.2 or 1.3.
///
/// [`ServerOptions::tls`]: crate::ServerOptions::tls
#[derive(Clone)]
pub struct TlsCredentials {
    pub(crate) acceptor: TlsAcceptor,
    dir: PathBuf,
    verify_peer: bool,
}

impl fmt::Debug for TlsCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsCredentials")
            .field("dir", &self.dir)
            .field("verify_peer", &self.verify_peer)
            .finish_non_exhaustive()
    }
}

impl TlsCredentials {
    /// Loads `server-cert.pem` and `server-key.pem` from `dir` (the directory given to
    /// QEMU's `--object tls-creds-x509,endpoint=server,dir=DIR`). With `verify_peer`, every
    /// client must present a certificate that chains to `ca-cert.pem` in the same
    /// directory, or the TLS handshake fails; without it `ca-cert.pem` is not read.
    pub fn from_dir(dir: impl AsRef<Path>, verify_peer: bool) -> Result<Self> {
        let dir = dir.as_ref();
        // ring builds without cmake or NASM; it lacks only the post-quantum key exchange,
        // which QEMU's GnuTLS client does not offer here anyway (X25519/ECDHE are used).
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cert_path = dir.join(SERVER_CERT);
        let certs = read_certs(&cert_path)?;
        let key_path = dir.join(SERVER_KEY);
        let key = PrivateKeyDer::from_pem_slice(&read(&key_path)?)
            .map_err(|e| invalid(&key_path, format!("no usable private key: {e}")))?;
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(dir, e.to_string()))?;
        let builder = if verify_peer {
            let ca_path = dir.join(CA_CERT);
            let mut roots = RootCertStore::empty();
            for c in read_certs(&ca_path)? {
                roots
                    .add(c)
                    .map_err(|e| invalid(&ca_path, format!("unusable CA certificate: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| invalid(&ca_path, e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder
            .with_single_cert(certs, key)
            .map_err(|e| invalid(&cert_path, format!("certificate and key do not fit: {e}")))?;
        Ok(TlsCredentials {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            dir: dir.to_path_buf(),
            verify_peer,
        })
    }

    /// The directory the credentials came from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether clients must present a certificate signed by `ca-cert.pem`.
    pub fn verify_peer(&self) -> bool {
        self.verify_peer
    }
}

fn invalid(path: &Path, reason: String) -> Error {
    Error::TlsCredsInvalid {
        path: path.to_path_buf(),
        reason,
    }
}

/// Credential files are a few KiB; a larger one is a wrong path (a disk image, a device),
/// which must not be read into memory whole.
const MAX_PEM: u64 = 1 << 20;

fn read(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let unreadable = |source| Error::TlsCredsUnreadable {
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_PEM + 1).read_to_end(&mut bytes))
        .map_err(unreadable)?;
    if bytes.len() as u64 > MAX_PEM {
        return Err(invalid(path, format!("larger than {MAX_PEM} bytes")));
    }
    Ok(bytes)
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| invalid(path, format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(path, "no CERTIFICATE in the file".into()));
    }
    Ok(certs)
}
