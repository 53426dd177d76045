//! The one error type of the format crate.
//!
//! Every decoder in this crate returns [`Error`] on malformed input. The variants are
//! deliberately structural (what was wrong, with the offending value) rather than one per
//! field, so that the engine can wrap them with I/O context and tests can match on the kind.

/// Result alias for the format crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can be wrong with bytes that claim to be qcow2 metadata.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The input ended before a structure was complete.
    #[error("{what}: truncated, need {needed} bytes, have {available}")]
    Truncated {
        /// Which structure or field.
        what: &'static str,
        /// Bytes required.
        needed: u64,
        /// Bytes present.
        available: u64,
    },
    /// A magic number did not match.
    #[error("{what}: bad magic {found:#x}")]
    BadMagic {
        /// Which structure.
        what: &'static str,
        /// The magic found.
        found: u64,
    },
    /// A field holds a value the format (or QEMU) does not allow.
    #[error("{what}: invalid value {value:#x}{}", detail_suffix(detail))]
    InvalidField {
        /// Which structure or field.
        what: &'static str,
        /// The offending value.
        value: u64,
        /// Why it is invalid.
        detail: &'static str,
    },
    /// A value exceeds a sanity limit from [`crate::Limits`].
    #[error("{what}: {value} exceeds the limit of {limit}")]
    LimitExceeded {
        /// Which structure or field.
        what: &'static str,
        /// The offending value.
        value: u64,
        /// The limit.
        limit: u64,
    },
    /// An offset that must be cluster (or sector) aligned is not.
    #[error("{what}: offset {offset:#x} is not aligned to {alignment}")]
    Unaligned {
        /// Which structure or field.
        what: &'static str,
        /// The offset.
        offset: u64,
        /// Required alignment.
        alignment: u64,
    },
    /// Arithmetic on values read from the image would overflow.
    #[error("{what}: arithmetic overflow")]
    Overflow {
        /// Which computation.
        what: &'static str,
    },
    /// Reserved bits are set where the format requires zeros.
    #[error("{what}: reserved bits set in {value:#x}")]
    ReservedBits {
        /// Which structure.
        what: &'static str,
        /// The raw value.
        value: u64,
    },
    /// The image uses a feature this crate does not understand (e.g. unknown incompatible
    /// feature bits), so it must not be interpreted.
    #[error("unsupported: {what}{}", detail_suffix(detail))]
    Unsupported {
        /// Which structure or field.
        what: &'static str,
        /// Why it is invalid.
        detail: String,
    },
    /// A string field is not valid UTF-8 (or contains forbidden bytes).
    #[error("{what}: not a valid string")]
    BadString {
        /// Which field.
        what: &'static str,
    },
    /// Two structures that must not overlap do.
    #[error("{what}: overlaps {other}")]
    Overlap {
        /// Which structure or field.
        what: &'static str,
        /// The structure it overlaps.
        other: &'static str,
    },
}

fn detail_suffix<S: AsRef<str>>(detail: S) -> String {
    let d = detail.as_ref();
    if d.is_empty() {
        String::new()
    } else {
        format!(" ({d})")
    }
}

impl Error {
    pub(crate) fn truncated(what: &'static str, needed: usize, available: usize) -> Self {
        Error::Truncated {
            what,
            needed: needed as u64,
            available: available as u64,
        }
    }

    pub(crate) fn invalid(what: &'static str, value: u64, detail: &'static str) -> Self {
        Error::InvalidField {
            what,
            value,
            detail,
        }
    }

    pub(crate) fn limit(what: &'static str, value: u64, limit: u64) -> Self {
        Error::LimitExceeded { what, value, limit }
    }

    pub(crate) fn overflow(what: &'static str) -> Self {
        Error::Overflow { what }
    }
}
