//! An NBD server for qcow2-async images, on Tokio.
//!
//! Speaks the fixed newstyle handshake (`NBD_OPT_GO`, `INFO`, `LIST`, `EXPORT_NAME`,
//! `ABORT`, `STARTTLS`, `STRUCTURED_REPLY`, `EXTENDED_HEADERS`, `LIST_META_CONTEXT`,
//! `SET_META_CONTEXT`) and the commands `READ` (sparse: zero ranges go out as
//! `OFFSET_HOLE` chunks unless the client sets `DF`), `WRITE` (with `FUA`), `FLUSH`, `TRIM`,
//! `CACHE`, `WRITE_ZEROES` (with `NO_HOLE` and `FAST_ZERO`), `BLOCK_STATUS` (with a context
//! filter under extended headers) and `DISC`, over TCP or Unix sockets. Metadata contexts:
//! `base:allocation` (from [`qcow2_async::Image::map`]), `qemu:allocation-depth` (which
//! layer of the backing chain answers) and `qemu:dirty-bitmap:NAME` (from the image's
//! persistent bitmaps, bit 0 = dirty, as qemu-nbd). One server offers several exports of
//! the image: the live disk and internal snapshots (read-only, with the same allocation
//! contexts), all listed by `NBD_OPT_LIST`.
//!
//! Requests are pipelined: each runs in its own task and replies go out in completion
//! order. Choices where the protocol leaves room:
//!
//! - The maximum READ/WRITE payload is [`proto::MAX_REQUEST`] (32 MiB), advertised through
//!   `NBD_INFO_BLOCK_SIZE`; larger reads get `EOVERFLOW`, larger writes `EOVERFLOW` and a
//!   hard disconnect (their payload is not read).
//! - Requests past the end: `ENOSPC` for WRITE and WRITE_ZEROES, `EINVAL` otherwise (as
//!   qemu-nbd). A bad request magic, a bad option magic or an option payload over 64 KiB
//!   ends the connection; running requests still finish, so the image stays consistent.
//! - `FAST_ZERO` succeeds only for cluster-aligned ranges of v3 images (metadata-only in
//!   the engine); anything else gets `ENOTSUP`, as the protocol asks.
//! - Clients must set `NBD_FLAG_C_FIXED_NEWSTYLE`; others are disconnected after the
//!   greeting.
//! - TLS ([`ServerOptions::tls`], credentials from a QEMU `tls-creds-x509` directory via
//!   [`TlsCredentials::from_dir`]) is mandatory once configured, as with qemu-nbd
//!   `--tls-creds`: before `NBD_OPT_STARTTLS` every option gets `NBD_REP_ERR_TLS_REQD`
//!   (`NBD_OPT_ABORT` gets its `NBD_REP_ACK`, `NBD_OPT_EXPORT_NAME` a disconnect). Without
//!   TLS configured `NBD_OPT_STARTTLS` gets `NBD_REP_ERR_POLICY`, as from qemu-nbd.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use qcow2_async::{CreateOptions, Image, OpenOptions};
//! use qcow2_nbd::{ExportConfig, Listener, Server, ServerOptions};
//! # let dir = tempfile::tempdir()?;
//! # let path = dir.path().join("disk.qcow2");
//! # Image::create(&path, &CreateOptions::new(1 << 20), &OpenOptions::default()).await?.close().await?;
//! let img = Image::open(&path, &OpenOptions::default()).await?;
//! let server = Server::new(img.clone(), vec![ExportConfig::live("")], ServerOptions::default()).await?;
//! // Port 0 for the example; qemu-nbd's default is 10809.
//! let listener = Listener::bind_tcp("127.0.0.1:0").await?;
//! let s = server.clone();
//! let task = tokio::spawn(async move { s.serve(listener).await });
//! // ... later:
//! server.shutdown();
//! task.await.unwrap()?;
//! img.close().await?;
//! # Ok::<(), Box<dyn std::error::Error>>(()) }).unwrap();
//! ```
#![warn(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod errno_map;
mod error;
pub mod proto;
pub mod reply;
mod server;
mod tls;

pub use error::{Error, Result};
pub use server::{ExportConfig, Listener, Server, ServerOptions, Source};
pub use tls::{TlsCredentials, CA_CERT, SERVER_CERT, SERVER_KEY};
