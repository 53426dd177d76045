//! Sans-I/O codecs and algorithms for QEMU's qcow2 image format.
//!
//! This crate knows what the bytes of a qcow2 image mean and nothing about how to get them:
//! no files, no async runtime. Every decoder takes untrusted bytes and returns a typed
//! [`Error`] instead of panicking; every number that sizes an allocation is checked against
//! [`Limits`] first. The engine (`qcow2-async`) drives these codecs with real I/O.
//!

#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

//! ```
//! use qcow2_format::{Geometry, GuestOffset, L2Entry, L2Format};
//!
//! let geo = Geometry::new(16, false).unwrap(); // 64 KiB clusters, standard L2 entries
//! let pos = geo.locate(GuestOffset(0x1_2345_6789));
//! assert_eq!(pos.l1_index, 9);
//! let entry = L2Entry::decode(0x8000_0000_0005_0000, L2Format::default()).unwrap();
//! assert!(matches!(entry, L2Entry::Normal { copied: true, .. }));
//! ```

pub mod accumulate;
pub mod bitmap;
mod codec;
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

pub use bitmap::{BitmapDirectory, BitmapDirectoryEntry, BitmapTableEntry};
pub use compressed::CompressedDescriptor;
pub use error::{Error, Result};
pub use features::{AutoclearFeatures, CompatibleFeatures, IncompatibleFeatures};
pub use geometry::{Geometry, L2Position};
pub use header::{
    BitmapsExtension, CompressionType, CryptMethod, EncryptionExtension, FeatureName, FeatureType,
    Header, HeaderExtension, ImageHeader, Version,
};
pub use l1::L1Entry;
pub use l2::{L2Entry, L2Format, SubclusterBitmap, SubclusterState};
pub use limits::Limits;
pub use luks::{KeySlot, LuksHeader};
pub use offset::{GuestOffset, HostOffset};
pub use refcount::{RefcountOrder, ReftableEntry};
pub use snapshot::{SnapshotEntry, SnapshotTable};
