//! The engine's error type.

use std::io;
use std::path::PathBuf;

/// Result alias for the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O operation failed.
    #[error("I/O error while {context}: {source}")]
    Io {
        /// What the engine was doing.
        context: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Image metadata is malformed.
    #[error("invalid image metadata ({context}): {source}")]
    Format {
        /// Which structure.
        context: &'static str,
        /// What was wrong with it.
        #[source]
        source: qcow2_format::Error,
    },
    /// The image uses a feature this engine does not implement (yet): it refuses instead of
    /// guessing.
    #[error("unsupported feature: {feature}{}", if detail.is_empty() { String::new() } else { format!(" ({detail})") })]
    Unsupported {
        /// The feature.
        feature: &'static str,
        /// More context.
        detail: String,
    },
    /// A write was attempted on a read-only image.
    #[error("image is opened read-only")]
    ReadOnly,
    /// The image is corrupt; further writes were stopped.
    #[error("image is corrupt: {0}")]
    Corrupt(String),
    /// A request lies outside the virtual disk.
    #[error("request [{offset:#x}, +{len:#x}) is beyond the virtual size {size:#x}")]
    OutOfRange {
        /// Request offset.
        offset: u64,
        /// Request length.
        len: u64,
        /// Virtual disk size.
        size: u64,
    },
    /// An argument was invalid.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A backing chain problem (loop, depth, missing format, policy).
    #[error("backing file {path:?}: {reason}")]
    Backing {
        /// The backing file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// No key slot of the encrypted image accepts the passphrase.
    #[error("invalid password: cannot unlock any key slot")]
    WrongPassphrase,
    /// The image is encrypted and no passphrase was given (only a read-only open, for
    /// metadata, works without one).
    #[error("the image is encrypted: a passphrase is required")]
    PassphraseRequired,
    /// A metadata write failed after the engine's view of the image had moved ahead of the
    /// disk in a way it cannot undo: writes are stopped (the disk keeps its last consistent
    /// state, at worst with leaked clusters) until the image is reopened.
    #[error("writes stopped after a failed metadata update ({0}); reopen the image")]
    Halted(String),
    /// Another user of the file holds a permission this open needs, or needs one this open
    /// does not share (QEMU's image locking, `lock.rs`); the message is QEMU's.
    #[error(
        "Failed to get {}\"{}\" lock\nIs another process using the image [{}]?",
        if *shared { "shared " } else { "" },
        permission.name(),
        path.display()
    )]
    Locked {
        /// The file whose lock byte is taken.
        path: PathBuf,
        /// The permission in question.
        permission: crate::lock::Permission,
        /// `false`: another user refuses to share this permission, which this open needs;
        /// `true`: another user holds it, and this open does not share it.
        shared: bool,
    },
    /// The image ran out of addressable space or a table would exceed its limit.
    #[error("no space: {0}")]
    NoSpace(String),
}

impl Error {
    pub(crate) fn io(context: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Io { context, source }
    }
    pub(crate) fn format(context: &'static str) -> impl FnOnce(qcow2_format::Error) -> Error {
        move |source| Error::Format { context, source }
    }
    pub(crate) fn unsupported(feature: &'static str, detail: impl Into<String>) -> Error {
        Error::Unsupported {
            feature,
            detail: detail.into(),
        }
    }
}
