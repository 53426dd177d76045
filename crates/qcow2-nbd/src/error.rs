//! The server's error type.

use std::io;

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
}

impl Error {
    pub(crate) fn io(context: &'static str) -> impl Fn(io::Error) -> Error {
        move |source| Error::Io { context, source }
    }
}
