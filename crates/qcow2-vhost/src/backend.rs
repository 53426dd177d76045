//! The vhost-user backend of one frontend connection: what the device offers, and how a
//! kick becomes engine tasks whose completions go back on the used ring.
//!
//! Threads: `vhost-user-backend` runs the protocol on one thread and each queue's event
//! loop on a thread of its own (one queue per thread, so queues never wait for each
//! other). A kick pops every available chain, parses it ([`Layout`]) and starts one
//! [`Task`] per request: polled first on the queue's thread (so the I/O is submitted with no
//! thread hop). The queue thread also claims the io_uring rings its requests went to
//! ([`RingClaim`]) and reaps them itself, so a request answered there continues there
//! (`run_here`). While claimed, a ring is out of the runtime's reactor: a completion wakes
//! the queue thread alone. Claims are the thread's own (`WATCHED`) and go when it stops. The vring lock is held only to pop chains and to add used entries, never
//! across I/O. A completion sets the status byte, adds the used
//! entry and signals the call eventfd if the driver asked for it (`needs_notification`,
//! which with `EVENT_IDX` suppresses the signals a busy driver would not look at: the
//! batching the spec intends).
//!
//! Request buffers are guest RAM handed to the engine as [`IoBuf`]s over the mapped region
//! (no copy); they are dropped before the used entry is added, which is when the driver may
//! touch them again.

use std::cell::RefCell;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock, Weak};

use qcow2_async::io::{IoBuf, RingClaim, RingWatch};
use qcow2_async::Image;
use tracing::{debug, warn};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock, VringT};
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
use crate::task::{run_here, Task};

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
    /// `k` requests have been returned on the used ring and their driver signalled.
    fn end(&self, k: usize) {
        let mut n = self.count.lock().expect("in-flight lock");
        *n -= k;
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
    /// Each queue thread's event loop, to watch rings in (set once the daemon exists; weak,
    /// since the loops hold this backend).
    loops: OnceLock<Vec<Weak<VringEpollHandler<Arc<BlkBackend>>>>>,
}

thread_local! {
    /// The rings this queue thread's requests were submitted to, watched in its event loop
    /// (event `ring_event(i)` is ring `i`) and claimed while it does (`None` once a thread of
    /// the ring's own reaps it). See `handle_event`.
    ///
    /// Thread-local because a claim must not outlive the thread that reaps: every request on
    /// a claimed ring waits for this thread. However the thread ends (the connection's end,
    /// an error that stops its event loop, a panic), its thread-locals are dropped with it,
    /// and with them the claims, so the rings go back to the runtime's reactor. (A queue
    /// thread serves one queue of one connection: `vhost-user-backend` starts new ones for
    /// each.)
    static WATCHED: RefCell<Vec<(RingWatch, Option<RingClaim>)>> = const { RefCell::new(Vec::new()) };
}

/// The event-loop id of watched ring `i` (ids up to the number of queues are the loop's).
fn ring_event(num_queues: usize, i: usize) -> u64 {
    (num_queues + 1 + i) as u64
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
            loops: OnceLock::new(),
        }
    }

    /// Lets each queue thread watch the rings its requests go to (see `handle_event`).
    pub(crate) fn set_event_loops(&self, loops: &[Arc<VringEpollHandler<Arc<BlkBackend>>>]) {
        let _ = self.loops.set(loops.iter().map(Arc::downgrade).collect());
    }

    /// Queue `q`'s event loop, while the daemon lives.
    fn event_loop(&self, q: usize) -> Option<Arc<VringEpollHandler<Arc<BlkBackend>>>> {
        self.loops.get()?.get(q)?.upgrade()
    }

    /// Starts watching and claiming, on queue `q`'s thread, the rings it has not watched
    /// yet.
    fn watch(&self, q: usize, submitted: Vec<RingWatch>) {
        if submitted.is_empty() {
            return;
        }
        let Some(lp) = self.event_loop(q) else {
            return;
        };
        WATCHED.with(|watched| {
            let mut rings = watched.borrow_mut();
            for ring in submitted {
                if rings.iter().any(|(r, _)| r.same(&ring)) {
                    continue;
                }
                let id = ring_event(self.device.num_queues(), rings.len());
                match lp.register_listener(ring.as_raw_fd(), EventSet::IN, id) {
                    Ok(()) => {
                        let claim = ring.clone().claim();
                        rings.push((ring, Some(claim)));
                    }
                    Err(e) => debug!(queue = q, error = %e, "cannot watch an io_uring ring"),
                }
            }
        });
    }

    /// Reaps watched ring `i` of queue `q` on this thread.
    fn reap(&self, q: usize, i: usize) {
        let ring = WATCHED.with(|w| match w.borrow().get(i) {
            Some((r, Some(_))) => Some(r.clone()),
            _ => None,
        });
        let Some(ring) = ring else {
            return;
        };
        if ring.reap() {
            return;
        }
        // Reaped by a thread of its own: its descriptor would stay readable here.
        if let Some(lp) = self.event_loop(q) {
            let id = ring_event(self.device.num_queues(), i);
            let _ = lp.unregister_listener(ring.as_raw_fd(), EventSet::IN, id);
        }
        WATCHED.with(|w| {
            if let Some(entry) = w.borrow_mut().get_mut(i) {
                entry.1 = None;
            }
        });
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
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        loop {
            if event_idx {
                vring.disable_notification().map_err(io::Error::other)?;
            }
            // The memory table is read again on every round, right before popping: a
            // frontend may add a region (libblkio maps its buffers after the queues start)
            // while this loop runs, and the requests it posts after the region was
            // acknowledged must see it. A view taken once per kick missed it.
            let Some((mem, view)) = self.view(q) else {
                return Ok(());
            };
            // Pop under the vring lock, start outside it: completions take the same lock.
            let chains: Vec<_> = vring
                .get_mut()
                .get_queue_mut()
                .iter(mem.clone())
                .map_err(io::Error::other)?
                .collect();
            // Every request of the round is first polled right here (`Task::start`), under
            // the plug `handle_event` holds, so their reads and writes reach the kernel in
            // one submission per ring instead of one system call (and doorbell) each.
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
                        complete(q, vring, head, 0, None);
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
            complete(q, vring, head, 0, None);
            return;
        }
        let header = Header::decode(&h);
        let in_flight = self.in_flight[q].clone();
        in_flight.begin();
        let device = self.device.clone();
        let view = view.clone();
        let vring = vring.clone();
        Task::start(&self.device.runtime, async move {
            let (status, written) = execute(&device, &view, &layout, header).await;
            // The used length counts every byte the device wrote, the status included.
            let used = if view.write_status(layout.status(), status as u8).is_ok() {
                written + 1
            } else {
                written
            };
            complete(q, &vring, head, used, Some(&in_flight));
        });
    }
}

/// Used entries added during a queue thread's round and not signalled yet, per queue.
struct Unsignalled {
    q: usize,
    vring: Vring,
    /// Requests to end (`InFlight::end`) once signalled.
    ended: Option<(Arc<InFlight>, usize)>,
}

thread_local! {
    /// `Some` while this queue thread handles an event (`handle_event`): the queues whose
    /// used rings it added to meanwhile, to be signalled once at the end of the round
    /// (`signal_deferred`).
    static DEFERRED: RefCell<Option<Vec<Unsignalled>>> = const { RefCell::new(None) };
}

/// Returns a chain of queue `q` on the used ring, signals the driver if it wants to know,
/// and then ends the request in `in_flight` (if it was counted there); on a queue thread in
/// the middle of a round, the signal and the end come at the end of the round.
///
/// Why defer: the first completion of a round would wake the driver at once (with
/// `EVENT_IDX` it asks for exactly that), and on a machine with few cores the woken driver
/// preempts this thread before it has added the round's other completions, sees one
/// answer, submits one request and sleeps again: a ping-pong of rounds of one (measured:
/// 27 k involuntary context switches per second of this thread at QD32). QEMU defers its
/// virtio notifications to the end of a batch the same way (`defer_call`).
///
/// Why the end waits for the signal: `stop_vring` (GET_VRING_BASE) waits for the queue's
/// requests to end, and then the frontend takes the call eventfd away; a signal still owed
/// then would be lost, and with `EVENT_IDX` later entries would not be signalled either.
fn complete(q: usize, vring: &Vring, head: u16, len: u32, in_flight: Option<&Arc<InFlight>>) {
    let added = vring.get_mut().add_used(head, len);
    if let Err(e) = added {
        warn!(head, error = %e, "cannot add used descriptor");
    }
    let deferred = DEFERRED.with(|d| {
        let mut d = d.borrow_mut();
        let Some(queues) = d.as_mut() else {
            return false;
        };
        let i = match queues.iter().position(|u| u.q == q) {
            Some(i) => i,
            None => {
                queues.push(Unsignalled {
                    q,
                    vring: vring.clone(),
                    ended: None,
                });
                queues.len() - 1
            }
        };
        if let Some(f) = in_flight {
            queues[i].ended.get_or_insert_with(|| (f.clone(), 0)).1 += 1;
        }
        true
    });
    if !deferred {
        notify(vring);
        if let Some(f) = in_flight {
            f.end(1);
        }
    }
}

/// Runs `f` with this thread's used-ring signals (and the ends of the requests they answer)
/// deferred, then sends them, once per queue; also when `f` panics, so that no request
/// stays counted in flight (a drain would wait for it forever).
fn signal_deferred<R>(f: impl FnOnce() -> R) -> R {
    let outer = DEFERRED.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_some() {
            return false;
        }
        *d = Some(Vec::new());
        true
    });
    let _round = Round { outer };
    f()
}

/// The end of a round of `signal_deferred`: sends what it deferred.
struct Round {
    outer: bool,
}

impl Drop for Round {
    fn drop(&mut self) {
        if !self.outer {
            return;
        }
        let queues = DEFERRED.with(|d| d.borrow_mut().take()).unwrap_or_default();
        for u in queues {
            // While unwinding, the vring's lock may be poisoned; the connection is lost then
            // anyway, but its requests must still end.
            if !std::thread::panicking() {
                notify(&u.vring);
            }
            if let Some((f, n)) = u.ended {
                f.end(n);
            }
        }
    }
}

/// Signals the driver if it wants to know of the used entries added so far.
fn notify(vring: &Vring) {
    let mut state = vring.get_mut();
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
                            .map_err(failed("write")),
                    }
                }
            }
        }
        Kind::Flush => device
            .image
            .flush()
            .await
            .map(|()| 0)
            .map_err(failed("flush")),
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

/// An engine error as the driver sees it (virtio-blk has one error status), logged.
fn failed(request: &'static str) -> impl Fn(qcow2_async::Error) -> Status {
    move |e| {
        warn!(request, error = %e, "request failed");
        Status::IoErr
    }
}

async fn read(
    device: &Device,
    view: &GuestView,
    layout: &Layout,
    offset: u64,
    len: u64,
) -> Result<u32, Status> {
    if let Some(snapshot) = &device.snapshot {
        // Snapshot reads go through a bounce buffer: the engine reads snapshots into slices.
        let mut buf = vec![0u8; len as usize];
        device
            .image
            .read_snapshot_at(snapshot, &mut buf, offset)
            .await
            .map_err(failed("read"))?;
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
        .map_err(failed("read"))?;
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
        r.map_err(failed(if kind == Kind::Discard {
            "discard"
        } else {
            "write-zeroes"
        }))?;
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
        //
        // This thread also reaps the io_uring completions of what it submitted. It claims
        // each ring its requests went to and watches its descriptor (readable while
        // completions wait), and requests answered here continue here (`run_here`). A
        // request otherwise costs three thread wake-ups: this thread for the kick, this
        // thread again (io_uring runs the completion as task work of the submitter), and the
        // runtime worker that watches the ring; the claim takes the ring out of the
        // runtime's reactor (measured: +50 % IOPS at QD1, BENCHMARKS.md). Every request on a
        // claimed ring depends on this thread, so the claims live in its thread-locals
        // (`WATCHED`) and go when it stops, however it stops.
        let q = thread_id;
        signal_deferred(|| {
            run_here(|| {
                let plug = qcow2_async::io::plug();
                let n = self.device.num_queues();
                let result = match usize::from(device_event) {
                    e if e < n => match vrings.get(e) {
                        Some(vring) => self.process_queue(q, vring),
                        None => Ok(()),
                    },
                    e if e > n => {
                        self.reap(q, e - n - 1);
                        Ok(())
                    }
                    _ => Ok(()),
                };
                self.watch(q, plug.finish());
                if result.is_err() {
                    // The event loop ends on an error: give the claims up now (the
                    // thread's end would drop them too).
                    WATCHED.with(|w| w.borrow_mut().clear());
                }
                result
            })
        })
    }
}

#[cfg(test)]
mod tests {
    //! `execute` on requests no well-behaved frontend sends: each gets the status QEMU's
    //! virtio-blk device gives it, and nothing reaches the image.

    use super::*;
    use crate::request::Piece;
    use qcow2_async::{CreateOptions, OpenOptions};
    use vm_memory::{Bytes, GuestAddress};

    const DISK: u64 = 1 << 20;

    struct Bench {
        device: Device,
        view: GuestView,
        _dir: tempfile::TempDir,
    }

    async fn bench(read_only: bool) -> Bench {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.qcow2");
        Image::create(&path, &CreateOptions::new(DISK), &OpenOptions::default())
            .await
            .unwrap()
            .close()
            .await
            .unwrap();
        let image = Image::open(&path, &OpenOptions::default()).await.unwrap();
        image.write_at(&[0xaa; 4096], 0).await.unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut serial = b"disk-7".to_vec();
        serial.resize(ID_LEN, 0);
        Bench {
            device: Device {
                image,
                snapshot: None,
                read_only,
                config: BlkConfig {
                    capacity: DISK,
                    blk_size: 512,
                    opt_io_size: 65536,
                    num_queues: 1,
                },
                queue_size: 128,
                serial,
                runtime: tokio::runtime::Handle::current(),
            },
            view: GuestView::new(Arc::new(mem)),
            _dir: dir,
        }
    }

    /// A layout with `readable` data bytes at 0x1000 and `writable` ones at 0x8000.
    fn layout(readable: u32, writable: u32) -> Layout {
        let mut d = vec![Desc {
            addr: 0,
            len: 16,
            writable: false,
        }];
        if readable > 0 {
            d.push(Desc {
                addr: 0x1000,
                len: readable,
                writable: false,
            });
        }
        d.push(Desc {
            addr: 0x8000,
            len: writable + 1,
            writable: true,
        });
        Layout::parse(d).unwrap()
    }

    fn h(kind: Kind, sector: u64) -> Header {
        Header { kind, sector }
    }

    fn segment(b: &Bench, sector: u64, n: u32, flags: u32) {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&n.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        b.view
            .write(
                &[Piece {
                    addr: 0x1000,
                    len: 16,
                }],
                &s,
            )
            .unwrap();
    }

    async fn first_byte(b: &Bench) -> u8 {
        let mut x = [0u8; 1];
        b.device.image.read_at(&mut x, 0).await.unwrap();
        x[0]
    }

    #[tokio::test]
    async fn bad_requests_get_qemus_statuses_and_leave_the_image_alone() {
        let b = bench(false).await;
        let run = |l: Layout, hd: Header| {
            let b = &b;
            async move { execute(&b.device, &b.view, &l, hd).await }
        };
        // Past the end, straddling it, and not a whole number of sectors.
        assert_eq!(
            run(layout(0, 512), h(Kind::In, DISK / 512)).await.0,
            Status::IoErr
        );
        assert_eq!(
            run(layout(1024, 0), h(Kind::Out, DISK / 512 - 1)).await.0,
            Status::IoErr
        );
        assert_eq!(run(layout(100, 0), h(Kind::Out, 0)).await.0, Status::IoErr);
        assert_eq!(
            run(layout(0, 0), h(Kind::In, u64::MAX)).await.0,
            Status::IoErr
        );
        // Unknown types, and a flag discard does not have.
        assert_eq!(
            run(layout(0, 0), h(Kind::Other(2), 0)).await.0,
            Status::Unsupp
        );
        segment(&b, 0, 8, 1);
        assert_eq!(
            run(layout(16, 0), h(Kind::Discard, 0)).await.0,
            Status::Unsupp
        );
        segment(&b, 0, 8, 2);
        assert_eq!(
            run(layout(16, 0), h(Kind::WriteZeroes, 0)).await.0,
            Status::Unsupp
        );
        // Segment lists of a wrong length, and ranges too long or past the end.
        assert_eq!(
            run(layout(8, 0), h(Kind::Discard, 0)).await.0,
            Status::IoErr
        );
        segment(&b, 0, MAX_DISCARD_SECTORS + 1, 0);
        assert_eq!(
            run(layout(16, 0), h(Kind::WriteZeroes, 0)).await.0,
            Status::IoErr
        );
        segment(&b, DISK / 512 - 1, 2, 0);
        assert_eq!(
            run(layout(16, 0), h(Kind::Discard, 0)).await.0,
            Status::IoErr
        );
        assert_eq!(
            first_byte(&b).await,
            0xaa,
            "nothing refused reached the image"
        );
        // A proper write-zeroes does.
        segment(&b, 0, 8, 1);
        assert_eq!(
            run(layout(16, 0), h(Kind::WriteZeroes, 0)).await.0,
            Status::Ok
        );
        assert_eq!(first_byte(&b).await, 0);
    }

    #[tokio::test]
    async fn read_only_exports_refuse_every_write_on_the_device_side() {
        let b = bench(true).await;
        let run = |l: Layout, hd: Header| {
            let b = &b;
            async move { execute(&b.device, &b.view, &l, hd).await }
        };
        b.view
            .mem_for_tests()
            .write_slice(&[0x11; 512], GuestAddress(0x1000))
            .unwrap();
        assert_eq!(run(layout(512, 0), h(Kind::Out, 0)).await.0, Status::IoErr);
        segment(&b, 0, 8, 0);
        assert_eq!(
            run(layout(16, 0), h(Kind::Discard, 0)).await.0,
            Status::IoErr
        );
        assert_eq!(
            run(layout(16, 0), h(Kind::WriteZeroes, 0)).await.0,
            Status::IoErr
        );
        assert_eq!(first_byte(&b).await, 0xaa);
        // Reads and flushes still work.
        assert_eq!(run(layout(0, 512), h(Kind::In, 0)).await, (Status::Ok, 512));
        let mut back = [0u8; 512];
        b.view
            .read(
                &[Piece {
                    addr: 0x8000,
                    len: 512,
                }],
                &mut back,
            )
            .unwrap();
        assert!(back.iter().all(|&x| x == 0xaa));
        assert_eq!(run(layout(0, 0), h(Kind::Flush, 0)).await.0, Status::Ok);
    }

    #[tokio::test]
    async fn get_id_answers_the_serial_as_far_as_the_buffer_reaches() {
        let b = bench(false).await;
        let (s, n) = execute(&b.device, &b.view, &layout(0, 20), h(Kind::GetId, 0)).await;
        assert_eq!((s, n), (Status::Ok, 20));
        let mut id = [0xffu8; 20];
        b.view
            .read(
                &[Piece {
                    addr: 0x8000,
                    len: 20,
                }],
                &mut id,
            )
            .unwrap();
        assert_eq!(&id[..6], b"disk-7");
        assert!(id[6..].iter().all(|&x| x == 0));
        let (s, n) = execute(&b.device, &b.view, &layout(0, 4), h(Kind::GetId, 0)).await;
        assert_eq!((s, n), (Status::Ok, 4));
    }

    /// A queue thread's ring claims are its own: however it ends (here, a panic), they go
    /// with it, and the runtime's reactor reaps the ring again. A claim that outlived its
    /// thread would leave every later request on the ring unanswered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_queue_threads_claims_go_with_it() {
        use qcow2_async::io::BlockFile;
        use std::os::unix::fs::FileExt;
        let tmp = tempfile::tempfile().unwrap();
        let dirty = tmp.try_clone().unwrap();
        let Ok(file) = qcow2_async::io::UringFile::from_file(tmp) else {
            return println!("skipping: io_uring unavailable");
        };
        let outer = qcow2_async::io::plug();
        let mut w = file.write_at(IoBuf::from(vec![1; 4096]), 0);
        tokio::select! {
            biased;
            r = &mut w => { r.unwrap(); }
            () = std::future::ready(()) => {}
        }
        let rings = outer.finish();
        assert_eq!(rings.len(), 1);
        let thread = std::thread::spawn(move || {
            WATCHED.with(|w| {
                for ring in rings {
                    let claim = ring.clone().claim();
                    w.borrow_mut().push((ring, Some(claim)));
                }
            });
            panic!("a queue thread dies");
        });
        assert!(thread.join().is_err());
        // An fdatasync with work to do completes after its submission, so only a reaper
        // answers it: the reactor, once the dead thread's claim is gone.
        for i in 0..3u64 {
            dirty.write_all_at(&vec![2; 1 << 20], i << 20).unwrap();
            tokio::time::timeout(std::time::Duration::from_secs(10), file.flush())
                .await
                .expect("the ring is reaped again")
                .unwrap();
        }
        drop(w);
    }
}
