//! What can go wrong with a remote object, with the object and the range as data.

use std::io;
use std::sync::Arc;
use std::time::Duration;

/// Why a remote file could not be opened or read.
///
/// Cloneable because one failed range request answers every reader waiting on it. Reaches
/// the engine inside an [`io::Error`] (see the `From` impl); get it back with
/// [`RemoteError::from_io`].
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum RemoteError {
    /// The name is not a URL this crate opens.
    #[error("{url}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The store for the URL could not be configured (credentials, endpoint, options).
    #[error("{url}: cannot configure the object store: {source}")]
    Config {
        /// The URL.
        url: String,
        /// The store's complaint.
        #[source]
        source: Arc<object_store::Error>,
    },
    /// There is no object at the URL.
    #[error("{url}: no such object")]
    NotFound {
        /// The URL.
        url: String,
    },
    /// The store refused our credentials (or has none for us).
    #[error("{url}: access denied: {source}")]
    Denied {
        /// The URL.
        url: String,
        /// The store's answer.
        #[source]
        source: Arc<object_store::Error>,
    },
    /// The object is not the one that was opened: its ETag (or version, or size and
    /// modification time where the store has no ETag) changed, or it was deleted. Data
    /// from the new object would silently mix with data already read from the old one.
    #[error("{url}: the object changed since it was opened ({detail})")]
    Changed {
        /// The URL.
        url: String,
        /// What differs.
        detail: String,
    },
    /// No answer within the timeout, on every attempt.
    #[error(
        "{url}: bytes {offset}..{end}: no answer within {timeout:?} after {attempts} attempts"
    )]
    Timeout {
        /// The URL.
        url: String,
        /// First byte of the range that was being read.
        offset: u64,
        /// End of that range.
        end: u64,
        /// The per-attempt timeout.
        timeout: Duration,
        /// How many attempts were made.
        attempts: u32,
    },
    /// The store failed on every attempt (connection refused or reset, server errors).
    #[error("{url}: bytes {offset}..{end}: store unreachable after {attempts} attempts: {source}")]
    Unreachable {
        /// The URL.
        url: String,
        /// First byte of the range that was being read.
        offset: u64,
        /// End of that range.
        end: u64,
        /// How many attempts were made.
        attempts: u32,
        /// The last failure.
        #[source]
        source: Arc<object_store::Error>,
    },
    /// The store answered a range request with fewer bytes than the object holds there.
    #[error("{url}: bytes {offset}..{end}: the body ended after {got} bytes")]
    ShortBody {
        /// The URL.
        url: String,
        /// First byte requested.
        offset: u64,
        /// End of the request.
        end: u64,
        /// Bytes received.
        got: u64,
    },
    /// Any other failure of the store.
    #[error("{url}: {source}")]
    Store {
        /// The URL.
        url: String,
        /// The store's error.
        #[source]
        source: Arc<object_store::Error>,
    },
    /// A write, truncation or allocation on a remote file, which is read-only.
    #[error("{url}: remote files are read-only ({op} refused)")]
    ReadOnly {
        /// The URL.
        url: String,
        /// The refused operation.
        op: &'static str,
    },
    /// The task fetching a range stopped without an answer (its runtime shut down).
    #[error("{url}: the fetch of this range was abandoned")]
    Abandoned {
        /// The URL.
        url: String,
    },
}

impl RemoteError {
    /// The `RemoteError` inside an I/O error returned by a remote file (or by the engine's
    /// `Error::Io`, whose source it is), if there is one.
    pub fn from_io(e: &io::Error) -> Option<&RemoteError> {
        e.get_ref()?.downcast_ref::<RemoteError>()
    }

    fn kind(&self) -> io::ErrorKind {
        match self {
            RemoteError::InvalidUrl { .. } | RemoteError::Config { .. } => {
                io::ErrorKind::InvalidInput
            }
            RemoteError::NotFound { .. } => io::ErrorKind::NotFound,
            RemoteError::Denied { .. } | RemoteError::ReadOnly { .. } => {
                io::ErrorKind::PermissionDenied
            }
            RemoteError::Timeout { .. } => io::ErrorKind::TimedOut,
            RemoteError::ShortBody { .. } => io::ErrorKind::UnexpectedEof,
            RemoteError::Changed { .. }
            | RemoteError::Unreachable { .. }
            | RemoteError::Store { .. }
            | RemoteError::Abandoned { .. } => io::ErrorKind::Other,
        }
    }
}

impl From<RemoteError> for io::Error {
    fn from(e: RemoteError) -> io::Error {
        io::Error::new(e.kind(), e)
    }
}
