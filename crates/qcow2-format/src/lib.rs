//! Sans-I/O codecs and algorithms for QEMU's qcow2 image format.
//!
//! This crate knows what the bytes of a qcow2 image mean and nothing about how to get them:
//! no files, no async runtime. Every decoder takes untrusted bytes and returns a typed
//! [`Error`] instead of panicking; every number that sizes an allocation is checked against
//! [`Limits`] first. The engine (`qcow2-async`) drives these codecs with real I/O.
//!

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod codec;
pub mod accumulate;
pub mod bitmap;
pub mod compressed;
pub mod error;
pub mod features;
pub mod geometry;
pub mod growth;
pub mod header;
pub mod l1;
pub mod l2;
pub mod limits;
pub mod luks;
pub mod offset;
pub mod refcount;
pub mod snapshot;

pub use error::{Error, Result};
pub use limits::Limits;
pub use compressed::CompressedDescriptor;
pub use features::{AutoclearFeatures, CompatibleFeatures, IncompatibleFeatures};
pub use geometry::{Geometry, L2Position};
pub use header::{
    BitmapsExtension, CompressionType, CryptMethod, EncryptionExtension, FeatureName,
    FeatureType, Header, HeaderExtension, ImageHeader, Version,
};
pub use l1::L1Entry;
pub use l2::{L2Entry, L2Format, SubclusterBitmap, SubclusterState};
pub use offset::{GuestOffset, HostOffset};
pub use refcount::{RefcountOrder, ReftableEntry};
