//! qcow2-async: a Tokio-native engine for QEMU's qcow2 image format.
//!
//! ```no_run
//! # async fn demo() -> qcow2_async::Result<()> {
//! use qcow2_async::{CreateOptions, Image, OpenOptions};
//! let img = Image::create("disk.qcow2", &CreateOptions::new(1 << 30), &OpenOptions::default()).await?;
//! let tasks: Vec<_> = (0..8u64)
//!     .map(|i| {
//!         let img = img.clone();
//!         tokio::spawn(async move { img.write_at(&[i as u8; 4096], i * 65536).await })
//!     })
//!     .collect();
//! for t in tasks {
//!     t.await.unwrap()?;
//! }
//! img.close().await?;
//! # Ok(()) }
//! ```
//!
//! See `docs/architecture.md` for the data path and the invariants each module enforces.
#![warn(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod alloc;
mod backing;
mod barrier;
mod bitmaps;
mod cache;
mod check;
mod compress;
mod crypto;
mod detach;
mod direct;
mod error;
mod image;
pub mod io;
mod l1;
mod lease;
mod lock;
mod mapping;
mod meta;
pub mod ops;
mod options;
mod overlap;
mod refcounts;
mod sharded;
mod snapshot;

#[allow(deprecated)]
pub use backing::{Backing, Disk};
pub use barrier::BarrierMode;
pub use bitmaps::{BitmapInfo, BitmapOptions};
pub use check::{CheckReport, RepairMode, Verdict};
pub use crypto::cipher::{CipherAlg, CipherMode, HashAlg, IvGenAlg};
pub use crypto::luks::{KdfIterations, LuksAlgorithms};
pub use crypto::{EncryptionOptions, Secret};
pub use error::{Error, Result};
pub use image::{AmendOptions, Cursor, Image, MapExtent, ResizeOptions};
pub use lock::{Locking, Permission};
pub use options::{
    BackingFormat, BackingPolicy, CreateOptions, DataFilePolicy, OpenOptions, Preallocation,
};
pub use qcow2_format;
pub use snapshot::SnapshotInfo;

/// Internals exposed only for the criterion benchmarks in `benches/`; not a stable API.
#[doc(hidden)]
pub mod __bench {
    pub use crate::lease::ClusterLeases;
}
