//! qcow2-async: a Tokio-native engine for QEMU's qcow2 image format.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use qcow2_async::{CreateOptions, Image, OpenOptions};
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("disk.qcow2");
//! let img = Image::create(&path, &CreateOptions::new(1 << 30), &OpenOptions::default()).await?;
//! let tasks: Vec<_> = (0..8u64)
//!     .map(|i| {
//!         let img = img.clone();
//!         tokio::spawn(async move { img.write_at(&[i as u8; 4096], i * 65536).await })
//!     })
//!     .collect();
//! for t in tasks {
//!     t.await??;
//! }
//! img.close().await?;
//! # Ok::<(), Box<dyn std::error::Error>>(()) }).unwrap();
//! ```
//!
//! [`Image`]'s page shows the common tasks (open, read and write with slices and `bytes`
//! buffers, flush and close, snapshots, bitmaps, check); [`Image::cursor`] is the disk as
//! `tokio::io` traits. Fault injection for tests of code built on the engine is behind the
//! `test-util` feature (`io::FaultFile`).
//!
//! See `docs/architecture.md` for the data path and the invariants each module enforces.
#![warn(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![cfg_attr(docsrs, feature(doc_cfg))]

/// The README's example program, compiled with the doctests so that it stays true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
mod readme {}

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
pub mod remote;
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
pub use remote::{RemoteBacking, RemoteOpener};
pub use snapshot::SnapshotInfo;

/// Internals exposed only for the criterion benchmarks in `benches/`; not a stable API.
#[doc(hidden)]
pub mod __bench {
    pub use crate::lease::ClusterLeases;
}
