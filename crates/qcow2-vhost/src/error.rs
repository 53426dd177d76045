//! The export's error type.

/// Result alias for the export.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can refuse an export or end serving.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The vhost-user library failed outside a connection (its error type implements only
    /// `Display`, so its message is kept).
    #[error("vhost-user error while {context}: {message}")]
    Vhost {
        /// What the export was doing.
        context: &'static str,
        /// The library's message.
        message: String,
    },
    /// The engine failed.
    #[error(transparent)]
    Engine(#[from] qcow2_async::Error),
    /// The options do not fit the image or the protocol.
    #[error("invalid export configuration: {0}")]
    Config(ConfigError),
}

/// Why export options are refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// `num_queues` must be 1..=64 (one event-loop thread each).
    #[error("{0} queues (1 to 64 supported)")]
    Queues(u16),
    /// `queue_size` must be a power of two, 1..=32768.
    #[error("queue size {0} (a power of two up to 32768)")]
    QueueSize(u16),
    /// The logical block size must be a power of two of at least 512.
    #[error("logical block size {0} (a power of two of at least 512)")]
    BlockSize(u32),
    /// No internal snapshot has this id or name.
    #[error("no snapshot {0:?}")]
    NoSnapshot(String),
    /// A writable export of a read-only image or of a snapshot.
    #[error("a writable export needs a writable image and the live disk")]
    NotWritable,
}

impl Error {
    pub(crate) fn vhost(context: &'static str) -> impl Fn(vhost_user_backend::Error) -> Error {
        move |e| Error::Vhost {
            context,
            message: e.to_string(),
        }
    }
}
