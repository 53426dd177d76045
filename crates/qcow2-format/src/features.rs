//! Feature bit sets of the v3 header (reference §1.2).

use std::fmt;

macro_rules! feature_set {
    ($(#[$doc:meta])* $name:ident, known = $known:expr, { $($(#[$cdoc:meta])* $c:ident = $v:expr),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub struct $name(pub u64);

        impl $name {
            $($(#[$cdoc])* pub const $c: $name = $name($v);)*
            /// Every bit this implementation understands.
            pub const KNOWN: $name = $name($known);
            /// No bits.
            pub const fn empty() -> Self { $name(0) }
            /// Whether every bit of `other` is set.
            pub const fn contains(self, other: Self) -> bool { self.0 & other.0 == other.0 }
            /// Sets or clears the bits of `other`.
            pub fn set(&mut self, other: Self, on: bool) {
                if on { self.0 |= other.0 } else { self.0 &= !other.0 }
            }
            /// The same set with `other` added.
            pub const fn with(self, other: Self) -> Self { $name(self.0 | other.0) }
            /// The same set with `other` removed.
            pub const fn without(self, other: Self) -> Self { $name(self.0 & !other.0) }
            /// Bits set here that this implementation does not know.
            pub const fn unknown(self) -> u64 { self.0 & !$known }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:#x})"), self.0)
            }
        }
    };
}

feature_set!(
    /// Incompatible features: an implementation that does not know a set bit must not open
    /// the image.
    IncompatibleFeatures, known = 0x1f, {
        /// Refcounts may be stale (lazy refcounts were in use when the image was not closed).
        DIRTY = 1 << 0,
        /// The image is known to be corrupt.
        CORRUPT = 1 << 1,
        /// Guest data lives in an external data file.
        EXTERNAL_DATA_FILE = 1 << 2,
        /// The compression type field is non-zero.
        COMPRESSION_TYPE = 1 << 3,
        /// L2 entries are 128 bits with subcluster bitmaps.
        EXTENDED_L2 = 1 << 4,
    }
);

feature_set!(
    /// Compatible features: unknown bits are ignored and preserved.
    CompatibleFeatures, known = 0x1, {
        /// Refcount updates may be deferred while the dirty bit is set.
        LAZY_REFCOUNTS = 1 << 0,
    }
);

feature_set!(
    /// Autoclear features: a writer that does not know a bit clears it.
    AutoclearFeatures, known = 0x3, {
        /// The bitmaps extension is consistent.
        BITMAPS = 1 << 0,
        /// The external data file is a valid raw image.
        DATA_FILE_RAW = 1 << 1,
    }
);
