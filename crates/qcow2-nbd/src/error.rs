//! The server's error type.

use std::io;
use std::path::PathBuf;

/// Result alias for the server.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can end a connection or refuse a configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Socket I/O failed.
    #[error("I/O error while {context}: {source}")]
    Io {
        /// What the server was doing.
        context: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The client broke the protocol in a way that ends the connection.
    #[error("protocol violation: {0}")]
    Protocol(#[from] crate::proto::ProtoError),
    /// The engine failed.
    #[error(transparent)]
    Engine(#[from] qcow2_async::Error),
    /// The exports do not fit the image (unknown snapshot or bitmap, duplicate names).
    #[error("invalid export configuration: {0}")]
    Config(String),
    /// A TLS credentials file could not be read.
    #[error("cannot read TLS credentials {}: {source}", path.display())]
    TlsCredsUnreadable {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A TLS credentials file was read but is not usable (bad PEM, no certificate, a key
    /// that does not match the certificate).
    #[error("invalid TLS credentials {}: {reason}", path.display())]
    TlsCredsInvalid {
        /// The file (or the directory, for problems of the set as a whole).
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// With TLS required, the client did what can only be answered by hanging up: sent
    /// `NBD_OPT_EXPORT_NAME` (which has no error reply) or a `NBD_OPT_STARTTLS` carrying
    /// data before the TLS handshake, or bytes behind `NBD_OPT_STARTTLS` before the
    /// server's acknowledgement (as qemu-nbd, the connection is dropped).
    #[error("TLS is required: {0}")]
    TlsRequired(&'static str),
}

impl Error {
    pub(crate) fn io(context: &'static str) -> impl Fn(io::Error) -> Error {
        move |source| Error::Io { context, source }
    }
}
