//! A vhost-user-blk export of qcow2-async images: the way VMs reach a userspace block
//! backend at high queue depth (QEMU's `vhost-user-blk-pci`, cloud-hypervisor, crosvm,
//! libblkio's `virtio-blk-vhost-user` driver), like `qemu-storage-daemon --export
//! type=vhost-user-blk`.
//!
//! Built on the rust-vmm crates (`vhost`, `vhost-user-backend`, `virtio-queue`,
//! `vm-memory`): the virtqueues live in guest memory shared over the socket, request data
//! goes between guest RAM and the image without a copy ([`qcow2_async::io::IoBuf`] over
//! the mapped region), and each request runs as a Tokio task on the engine.
//!
//! Device: `VIRTIO_F_VERSION_1`, `VIRTIO_RING_F_EVENT_IDX`, `VIRTIO_RING_F_INDIRECT_DESC`,
//! `VIRTIO_BLK_F_{SIZE_MAX, SEG_MAX, BLK_SIZE, FLUSH, TOPOLOGY, MQ, DISCARD, WRITE_ZEROES}`
//! and `RO` for read-only exports; requests `IN`, `OUT`, `FLUSH`, `GET_ID`, `DISCARD`,
//! `WRITE_ZEROES` (with unmap). Out-of-range, misaligned or refused requests get
//! `VIRTIO_BLK_S_IOERR`, unknown ones `VIRTIO_BLK_S_UNSUPP`; a chain too malformed to carry
//! a status is returned unwritten. The optimal I/O size is the image's cluster size.
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use qcow2_async::{Image, OpenOptions};
//! use qcow2_vhost::{Export, ExportOptions};
//!
//! let img = Image::open("disk.qcow2", &OpenOptions::default()).await?;
//! let export = Export::new(img.clone(), ExportOptions::new()).await?;
//! let e = export.clone();
//! let serving = tokio::spawn(async move { e.serve("/run/disk.sock").await });
//! // ... on SIGTERM:
//! export.shutdown();
//! serving.await??;
//! img.close().await?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod backend;
pub mod config;
mod error;
mod export;
mod memory;
pub mod request;
mod task;

pub use error::{ConfigError, Error, Result};
pub use export::{Export, ExportOptions};
