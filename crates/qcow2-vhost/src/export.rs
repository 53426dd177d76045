//! The public face of the export: options, the serving loop over frontend connections,
//! and shutdown.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use qcow2_async::Image;
use tracing::{info, instrument, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::backend::{BlkBackend, Device};
use crate::config::BlkConfig;
use crate::error::{ConfigError, Error, Result};
use crate::request::ID_LEN;

/// How an image is exported.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExportOptions {
    /// Offer `VIRTIO_BLK_F_RO` and refuse writes, discards and write-zeroes with
    /// `VIRTIO_BLK_S_IOERR` (as qemu-storage-daemon's `writable=off`).
    pub read_only: bool,
    /// Request queues (`VIRTIO_BLK_F_MQ`), each served by its own thread; 1 to 64.
    pub num_queues: u16,
    /// Largest queue the frontend may set up (a power of two).
    pub queue_size: u16,
    /// Serve this internal snapshot (id or name) read-only instead of the live disk.
    pub snapshot: Option<String>,
    /// The device serial `GET_ID` answers (at most 20 bytes are used).
    pub serial: String,
    /// Logical block size the guest sees (512 or a larger power of two).
    pub logical_block_size: u32,
}

impl ExportOptions {
    /// A writable export of the live disk with one queue per available CPU, queues of up to
    /// 1024 entries, 512-byte blocks and an empty serial.
    pub fn new() -> ExportOptions {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        ExportOptions {
            read_only: false,
            num_queues: cpus.clamp(1, 64) as u16,
            queue_size: 1024,
            snapshot: None,
            serial: String::new(),
            logical_block_size: 512,
        }
    }
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions::new()
    }
}

/// A vhost-user-blk export of an image, served on a Unix socket to one frontend at a time
/// (QEMU's `vhost-user-blk-pci`, cloud-hypervisor, crosvm, libblkio), as
/// `qemu-storage-daemon --export type=vhost-user-blk` does.
///
/// When a frontend disconnects the export keeps the image open and accepts the next one.
/// The image stays the caller's: close it after [`Export::serve`] returns.
#[derive(Clone)]
pub struct Export {
    device: Arc<Device>,
    control: Arc<Control>,
}

/// What [`Export::shutdown`] needs to reach a running [`Export::serve`].
#[derive(Default)]
struct Control {
    stop: AtomicBool,
    /// The connection being served, if any.
    connection: Mutex<Option<ShutdownHandle>>,
    /// The socket being listened on, to wake a blocked accept.
    socket: Mutex<Option<PathBuf>>,
}

impl Export {
    /// Prepares an export of `image`. Must be called within a Tokio runtime: requests run
    /// as tasks on it.
    pub async fn new(image: Image, opts: ExportOptions) -> Result<Export> {
        if !(1..=64).contains(&opts.num_queues) {
            return Err(Error::Config(ConfigError::Queues(opts.num_queues)));
        }
        if !opts.queue_size.is_power_of_two() {
            return Err(Error::Config(ConfigError::QueueSize(opts.queue_size)));
        }
        let bs = opts.logical_block_size;
        if bs < 512 || !bs.is_power_of_two() {
            return Err(Error::Config(ConfigError::BlockSize(bs)));
        }
        let read_only = opts.read_only || opts.snapshot.is_some();
        if !opts.read_only && (image.is_read_only() || opts.snapshot.is_some()) {
            return Err(Error::Config(ConfigError::NotWritable));
        }
        let capacity = match &opts.snapshot {
            None => image.virtual_size(),
            Some(id) => {
                let snaps = image.list_snapshots().await?;
                let s = snaps
                    .iter()
                    .find(|s| &s.id == id)
                    .or_else(|| snaps.iter().find(|s| &s.name == id))
                    .ok_or_else(|| Error::Config(ConfigError::NoSnapshot(id.clone())))?;
                s.disk_size
            }
        };
        let mut serial = opts.serial.clone().into_bytes();
        serial.resize(ID_LEN, 0);
        serial.truncate(ID_LEN);
        let config = BlkConfig {
            capacity,
            blk_size: bs,
            opt_io_size: u32::try_from(image.cluster_size()).unwrap_or(u32::MAX),
            num_queues: opts.num_queues,
        };
        Ok(Export {
            device: Arc::new(Device {
                image,
                snapshot: opts.snapshot,
                read_only,
                config,
                queue_size: opts.queue_size,
                serial,
                runtime: tokio::runtime::Handle::current(),
            }),
            control: Arc::default(),
        })
    }

    /// Listens on `socket` (replacing a stale socket file) and serves frontends one after
    /// another until [`Export::shutdown`]; requests still running then finish and are
    /// answered first. Removes the socket file when it returns.
    ///
    /// Cancellation: dropping the future does not stop serving (the protocol runs on
    /// threads of its own); call [`Export::shutdown`].
    #[instrument(skip(self, socket), fields(socket = %socket.as_ref().display()))]
    pub async fn serve(&self, socket: impl AsRef<Path>) -> Result<()> {
        let path = socket.as_ref().to_owned();
        let listener = Listener::new(&path, true).map_err(|e| Error::Vhost {
            context: "binding the socket",
            message: e.to_string(),
        })?;
        *self.control.socket.lock().expect("socket lock") = Some(path);
        let export = self.clone();
        let served = tokio::task::spawn_blocking(move || export.serve_blocking(listener)).await;
        *self.control.socket.lock().expect("socket lock") = None;
        match served {
            Ok(r) => r,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    fn serve_blocking(&self, mut listener: Listener) -> Result<()> {
        while !self.control.stop.load(Ordering::Acquire) {
            let backend = Arc::new(BlkBackend::new(self.device.clone()));
            let mut daemon = VhostUserDaemon::new(
                "qcow2-vhost-user-blk".into(),
                backend.clone(),
                GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            )
            .map_err(Error::vhost("setting up a connection"))?;
            backend.set_event_loops(&daemon.get_epoll_handlers());
            if let Err(e) = daemon.start(&mut listener) {
                // A frontend that goes away during the handshake does not end the export.
                warn!(error = %e, "vhost-user connection failed to start");
                continue;
            }
            {
                let mut conn = self.control.connection.lock().expect("connection lock");
                if self.control.stop.load(Ordering::Acquire) {
                    daemon.request_shutdown();
                } else {
                    *conn = daemon.shutdown_handle();
                    info!("vhost-user frontend connected");
                }
            }
            let ended = daemon.wait();
            self.control
                .connection
                .lock()
                .expect("connection lock")
                .take();
            // Dropping the daemon stops (joins) the queue threads; running requests still
            // finish, reaped by the runtime: the threads' ring claims went with them.
            drop(daemon);
            backend.drain();
            match ended {
                Ok(()) => info!("vhost-user frontend disconnected"),
                Err(e) => warn!(error = %e, "vhost-user connection ended with an error"),
            }
        }
        Ok(())
    }

    /// Stops [`Export::serve`]: the current frontend is disconnected (after its running
    /// requests complete) and no other is accepted.
    pub fn shutdown(&self) {
        self.control.stop.store(true, Ordering::Release);
        let conn = self
            .control
            .connection
            .lock()
            .expect("connection lock")
            .take();
        match conn {
            Some(handle) => handle.shutdown(),
            None => {
                // Wake an accept blocked on the socket; the loop then sees `stop`.
                if let Some(p) = self.control.socket.lock().expect("socket lock").as_ref() {
                    let _ = UnixStream::connect(p);
                }
            }
        }
    }

    /// The image being exported.
    pub fn image(&self) -> &Image {
        &self.device.image
    }
}
