//! The vhost-user backend of one frontend connection: what the device offers, and how a
//! kick becomes engine tasks whose completions go back on the used ring.
//!
//! Threads: `vhost-user-backend` runs the protocol on one thread and each queue's event
//! loop on a thread of its own (one queue per thread, so queues never wait for each
//! other). A kick pops every available chain, parses it ([`Layout`]) and spawns one Tokio
//! task per request on the engine's runtime; the vring lock is held only to pop chains and
//! to add used entries, never across I/O. A completion sets the status byte, adds the used
//! entry and signals the call eventfd if the driver asked for it (`needs_notification`,
//! which with `EVENT_IDX` suppresses the signals a busy driver would not look at: the
//! batching the spec intends).
//!
//! Request buffers are guest RAM handed to the engine as [`IoBuf`]s over the mapped region
//! (no copy); they are dropped before the used entry is added, which is when the driver may
//! touch them again.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use qcow2_async::io::IoBuf;
use qcow2_async::Image;
use tracing::{debug, warn};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueOwnedT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::config::{device_features, BlkConfig, MAX_DISCARD_SECTORS};
use crate::memory::GuestView;
use crate::request::{
    byte_range, Desc, Header, Kind, Layout, Segment, Status, HEADER_LEN, ID_LEN, SECTOR,
    SEGMENT_LEN,
};

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;
type Vring = VringRwLock<Mem>;

/// Most discard / write-zeroes segments read from one request (16 bytes each); more is an
/// I/O error. Bounds the buffer a request can make the device allocate.
const MAX_SEGMENTS: u64 = 256;

/// What is exported: the parts of an export that outlive connections.
pub(crate) struct Device {
    pub(crate) image: Image,
    /// `Some(id)` to serve an internal snapshot (read-only) instead of the live disk.
    pub(crate) snapshot: Option<String>,
    pub(crate) read_only: bool,
    pub(crate) config: BlkConfig,
    pub(crate) queue_size: u16,
    pub(crate) serial: Vec<u8>,
    pub(crate) runtime: tokio::runtime::Handle,
}

impl Device {
    fn num_queues(&self) -> usize {
        usize::from(self.config.num_queues)
    }
}

/// Requests of one queue that have been popped but not yet returned on the used ring.
#[derive(Default)]
struct InFlight {
    count: Mutex<usize>,
    idle: Condvar,
}

impl InFlight {
    fn begin(&self) {
        *self.count.lock().expect("in-flight lock") += 1;
    }
    fn end(&self) {
        let mut n = self.count.lock().expect("in-flight lock");
        *n -= 1;
        if *n == 0 {
            self.idle.notify_all();
        }
    }
    /// Blocks until no request is in flight (the calling thread is not a runtime thread).
    fn wait_idle(&self) {
        let mut n = self.count.lock().expect("in-flight lock");
        while *n > 0 {
            n = self.idle.wait(n).expect("in-flight lock");
        }
    }
}

/// The backend of one connection. A new one is made for each frontend, so nothing a
/// frontend negotiated (features, memory, queue state) leaks into the next.
pub(crate) struct BlkBackend {
    device: Arc<Device>,
    mem: RwLock<Option<Mem>>,
    event_idx: AtomicBool,
    /// Per queue: the memory view the last kick used (rebuilt when the map changes).
    views: Vec<Mutex<Option<Arc<GuestView>>>>,
    in_flight: Vec<Arc<InFlight>>,
}

impl BlkBackend {
    pub(crate) fn new(device: Arc<Device>) -> BlkBackend {
        let n = device.num_queues();
        BlkBackend {
            device,
            mem: RwLock::new(None),
            event_idx: AtomicBool::new(false),
            views: (0..n).map(|_| Mutex::new(None)).collect(),
            in_flight: (0..n).map(|_| Arc::default()).collect(),
        }
    }

    /// Blocks until every request of this connection has completed.
    pub(crate) fn drain(&self) {
        for q in &self.in_flight {
            q.wait_idle();
        }
    }

    /// The current memory view for queue `q`.
    fn view(&self, q: usize) -> Option<(Arc<GuestMemoryMmap>, Arc<GuestView>)> {
        let mem = self
            .mem
            .read()
            .expect("memory lock")
            .as_ref()?
            .memory()
            .into_inner();
        let mut cached = self.views[q].lock().expect("view lock");
        let view = match &*cached {
            Some(v) if v.is_of(&mem) => v.clone(),
            _ => {
                let v = Arc::new(GuestView::new(mem.clone()));
                *cached = Some(v.clone());
                v
            }
        };
        Some((mem, view))
    }

    /// Pops and starts every available request of queue `q`.
    fn process_queue(&self, q: usize, vring: &Vring) -> io::Result<()> {
        let Some((mem, view)) = self.view(q) else {
            return Ok(());
        };
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        loop {
            if event_idx {
                vring.disable_notification().map_err(io::Error::other)?;
            }
            // Pop under the vring lock, start outside it: completions take the same lock.
            let chains: Vec<_> = vring
                .get_mut()
                .get_queue_mut()
                .iter(mem.clone())
                .map_err(io::Error::other)?
                .collect();
            for chain in chains {
                let head = chain.head_index();
                let descs = chain.map(|d| Desc {
                    addr: d.addr().0,
                    len: d.len(),
                    writable: d.is_write_only(),
                });
                match Layout::parse(descs) {
                    Ok(layout) => self.start(q, vring, &view, head, layout),
                    Err(e) => {
                        // Nothing can carry a status: return the chain untouched, as QEMU
                        // does for requests it cannot parse (minus marking the device broken).
                        warn!(queue = q, head, error = %e, "malformed virtio-blk request");
                        complete(vring, head, 0);
                    }
                }
            }
            if !event_idx || !vring.enable_notification().map_err(io::Error::other)? {
                return Ok(());
            }
        }
    }

    fn start(&self, q: usize, vring: &Vring, view: &Arc<GuestView>, head: u16, layout: Layout) {
        let mut h = [0u8; HEADER_LEN];
        if view.read(layout.header(), &mut h).is_err() {
            warn!(queue = q, head, "request header outside guest memory");
            complete(vring, head, 0);
            return;
        }
        let header = Header::decode(&h);
        let in_flight = self.in_flight[q].clone();
        in_flight.begin();
        let device = self.device.clone();
        let view = view.clone();
        let vring = vring.clone();
        self.device.runtime.spawn(async move {
            let (status, written) = execute(&device, &view, &layout, header).await;
            // The used length counts every byte the device wrote, the status included.
            let used = if view.write_status(layout.status(), status as u8).is_ok() {
                written + 1
            } else {
                written
            };
            complete(&vring, head, used);
            in_flight.end();
        });
    }
}

/// Returns a chain on the used ring and signals the driver if it wants to know.
fn complete(vring: &Vring, head: u16, len: u32) {
    let mut state = vring.get_mut();
    if let Err(e) = state.add_used(head, len) {
        warn!(head, error = %e, "cannot add used descriptor");
        return;
    }
    match state.needs_notification() {
        Ok(false) => {}
        Ok(true) | Err(_) => {
            if let Err(e) = state.signal_used_queue() {
                debug!(error = %e, "cannot signal the driver (gone?)");
            }
        }
    }
}

/// Runs one request; returns its status and the bytes written into the writable data.
async fn execute(device: &Device, view: &GuestView, layout: &Layout, h: Header) -> (Status, u32) {
    let capacity = device.config.capacity;
    let writes = matches!(h.kind, Kind::Out | Kind::Discard | Kind::WriteZeroes);
    if writes && device.read_only {
        return (Status::IoErr, 0);
    }
    let engine = |what: &'static str| {
        move |e: qcow2_async::Error| {
            warn!(request = what, error = %e, "request failed");
            Status::IoErr
        }
    };
    let result: Result<u32, Status> = match h.kind {
        Kind::In => {
            let len = layout.writable_len();
            match byte_range(h.sector, len, capacity) {
                None => Err(Status::IoErr),
                Some(offset) => read(device, view, layout, offset, len).await,
            }
        }
        Kind::Out => {
            let len = layout.readable_len();
            match byte_range(h.sector, len, capacity) {
                None => Err(Status::IoErr),
                Some(offset) => {
                    let mut bufs = Vec::with_capacity(layout.readable().len());
                    // SAFETY: these pieces are this request's data, and the buffers are
                    // dropped before the request goes back on the used ring.
                    match unsafe { view.bufs(layout.readable(), &mut bufs) } {
                        Err(_) => Err(Status::IoErr),
                        Ok(()) => device
                            .image
                            .write_vectored(bufs, offset)
                            .await
                            .map(|_| 0)
                            .map_err(engine("write")),
                    }
                }
            }
        }
        Kind::Flush => device
            .image
            .flush()
            .await
            .map(|()| 0)
            .map_err(engine("flush")),
        Kind::GetId => view
            .write(
                layout.writable(),
                &device.serial[..device.serial.len().min(ID_LEN)],
            )
            .map(|n| n as u32)
            .map_err(|_| Status::IoErr),
        Kind::Discard | Kind::WriteZeroes => segments(device, view, layout, h.kind).await,
        Kind::Other(_) => Err(Status::Unsupp),
    };
    match result {
        Ok(written) => (Status::Ok, written),
        Err(s) => (s, 0),
    }
}

async fn read(
    device: &Device,
    view: &GuestView,
    layout: &Layout,
    offset: u64,
    len: u64,
) -> Result<u32, Status> {
    let failed = |e: qcow2_async::Error| {
        warn!(request = "read", error = %e, "request failed");
        Status::IoErr
    };
    if let Some(snapshot) = &device.snapshot {
        // Snapshot reads go through a bounce buffer: the engine reads snapshots into slices.
        let mut buf = vec![0u8; len as usize];
        device
            .image
            .read_snapshot_at(snapshot, &mut buf, offset)
            .await
            .map_err(failed)?;
        view.write(layout.writable(), &buf)
            .map_err(|_| Status::IoErr)?;
        return Ok(len as u32);
    }
    let mut bufs: Vec<IoBuf> = Vec::with_capacity(layout.writable().len());
    // SAFETY: these pieces are this request's data, and the buffers are dropped before the
    // request goes back on the used ring.
    unsafe { view.bufs(layout.writable(), &mut bufs) }.map_err(|_| Status::IoErr)?;
    device
        .image
        .read_vectored(bufs, offset)
        .await
        .map_err(failed)?;
    Ok(len as u32)
}

/// DISCARD and WRITE_ZEROES: each 16-byte segment is one range.
async fn segments(
    device: &Device,
    view: &GuestView,
    layout: &Layout,
    kind: Kind,
) -> Result<u32, Status> {
    let len = layout.readable_len();
    if len == 0 || len % SEGMENT_LEN as u64 != 0 || len / SEGMENT_LEN as u64 > MAX_SEGMENTS {
        return Err(Status::IoErr);
    }
    let mut raw = vec![0u8; len as usize];
    view.read(layout.readable(), &mut raw)
        .map_err(|_| Status::IoErr)?;
    for chunk in raw.chunks_exact(SEGMENT_LEN) {
        let seg = Segment::decode(chunk.try_into().expect("16 bytes"));
        // Only the unmap flag exists, and only for write-zeroes (VIRTIO 1.2, 5.2.6.2).
        let allowed = if kind == Kind::WriteZeroes {
            virtio_bindings::virtio_blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        } else {
            0
        };
        if seg.flags & !allowed != 0 {
            return Err(Status::Unsupp);
        }
        if seg.num_sectors > MAX_DISCARD_SECTORS {
            return Err(Status::IoErr);
        }
        let bytes = u64::from(seg.num_sectors) * SECTOR;
        let offset = byte_range(seg.sector, bytes, device.config.capacity).ok_or(Status::IoErr)?;
        let r = if kind == Kind::Discard {
            device.image.discard(offset, bytes).await
        } else {
            device.image.write_zeroes(offset, bytes, seg.unmap()).await
        };
        r.map_err(|e| {
            warn!(request = ?kind, error = %e, "request failed");
            Status::IoErr
        })?;
    }
    Ok(0)
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.device.num_queues()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.device.queue_size)
    }

    fn features(&self) -> u64 {
        device_features(self.device.read_only)
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // libblkio requires REPLY_ACK, CONFIG and CONFIGURE_MEM_SLOTS; MQ lets the
        // frontend ask how many queues there are.
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.device.config.read(offset, size)
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        *self.mem.write().expect("memory lock") = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One queue per event-loop thread.
        (0..self.device.num_queues()).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without one, the queue threads of a finished connection would never exit.
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE must see every accepted request on the used ring.
        if let Some(q) = self.in_flight.get(queue_index as usize) {
            q.wait_idle();
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Ok(());
        }
        // One queue per thread: the thread's only vring is queue `thread_id`.
        match vrings.get(usize::from(device_event)) {
            Some(vring) => self.process_queue(thread_id, vring),
            None => Ok(()),
        }
    }
}
