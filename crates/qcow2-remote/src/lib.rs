//! Read-only qcow2 and raw disks in object storage, for the `qcow2-async` engine.
//!
//! [`RemoteFile`] is a [`qcow2_async::io::BlockFile`] over one object of an
//! [`object_store`] store (S3, GCS, Azure Blob, plain HTTP(S) with range requests):
//! positional reads become range GETs of aligned blocks, neighbouring missing blocks are
//! fetched with one request and concurrent readers of a block share one, a bounded LRU
//! cache keeps what was read, sequential readers get read-ahead, transient failures are
//! retried with backoff, every wait has a timeout, and the object is pinned by its ETag
//! (or version) at open so that a replaced object fails reads instead of corrupting them.
//!
//! [`ObjectStoreOpener`] is the engine's [`qcow2_async::RemoteOpener`]: installed in
//! `OpenOptions::remote`, it lets an image name a backing file such as
//! `s3://bucket/base.qcow2` (if `OpenOptions::remote_backing` allows) and lets
//! `Image::open_url` / `Disk::open_url` open one directly.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use qcow2_async::{Image, OpenOptions, RemoteBacking};
//! use qcow2_remote::ObjectStoreOpener;
//!
//! let mut opts = OpenOptions::default();
//! opts.remote = Some(Arc::new(ObjectStoreOpener::default()));
//! opts.remote_backing = RemoteBacking::Allow; // top.qcow2 is ours; its base is in S3
//! let top = Image::open("top.qcow2", &opts).await?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod block;
mod cache;
mod cache_file;
mod error;
mod fetch;
mod file;
mod opener;
mod options;
mod readahead;
mod store;

pub use error::RemoteError;
pub use file::{RemoteFile, RemoteStats};
pub use opener::{cache_file_name, ObjectStoreOpener};
pub use options::RemoteOptions;
pub use store::{store_for_url, SCHEMES};
