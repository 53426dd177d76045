//! `qcow2-vhost` against a vhost-user-blk frontend nobody here wrote: libblkio's
//! `virtio-blk-vhost-user` driver (crate `blkio`). Random reads, writes, discards,
//! write-zeroes and flushes at queue depths 1..64 on several queues, checked against a
//! model; then `qemu-img check` and `qemu-img compare` against the model.

#[path = "../tests/common/mod.rs"]
mod common;

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use common::{assert_check_clean, qemu_create, qemu_ok};
use qcow2_async::{Image, OpenOptions};
use qcow2_vhost::{Export, ExportOptions};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const MIB: u64 = 1 << 20;
const CLUSTER: u64 = 64 << 10;

/// An export served by a runtime of its own while the test thread is the client.
struct Served {
    rt: Option<tokio::runtime::Runtime>,
    export: Export,
    task: tokio::task::JoinHandle<qcow2_vhost::Result<()>>,
    image: Image,
    sock: PathBuf,
}

fn serve(path: &Path, sock: &Path, opts: ExportOptions, open: OpenOptions) -> Served {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (export, image, task) = rt.block_on(async {
        let image = Image::open(path, &open).await.unwrap();
        let export = Export::new(image.clone(), opts).await.unwrap();
        let e = export.clone();
        let s = sock.to_owned();
        let task = tokio::spawn(async move { e.serve(s).await });
        (export, image, task)
    });
    for _ in 0..500 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Served {
        rt: Some(rt),
        export,
        task,
        image,
        sock: sock.to_owned(),
    }
}

impl Served {
    /// Shuts the export down and closes the image cleanly.
    fn finish(mut self) {
        self.export.shutdown();
        let rt = self.rt.take().unwrap();
        let task = std::mem::replace(&mut self.task, rt.spawn(async { Ok(()) }));
        let image = self.image.clone();
        rt.block_on(async {
            task.await.unwrap().unwrap();
            image.close().await.unwrap();
        });
        assert!(!self.sock.exists(), "the socket file is removed");
    }
}

impl Drop for Served {
    /// A failed test still stops the export, so that the runtime's blocking serving thread
    /// does not keep the test process alive.
    fn drop(&mut self) {
        self.export.shutdown();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

/// A libblkio client with one memory region for its buffers.
struct Client {
    b: Blkio,
    queues: Vec<Blkioq>,
    region: MemoryRegion,
}

fn connect(sock: &Path, queues: i32, read_only: bool) -> blkio::Result<Client> {
    // `serve` returns once the socket file exists, which a listener creates before it
    // listens: a connection in between is refused (seen once in CI), so that is retried.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut b = loop {
        let mut b = Blkio::new("virtio-blk-vhost-user")?;
        b.set_str("path", sock.to_str().unwrap())?;
        b.set_bool("read-only", read_only)?;
        match b.connect() {
            Err(e)
                if e.errno() == blkio::Errno::CONNREFUSED
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            r => break r.map(|()| b)?,
        }
    };
    b.set_i32("num-queues", queues)?;
    let started = b.start()?;
    let region = b.alloc_mem_region(64 * (256 << 10))?;
    b.map_mem_region(&region)?;
    Ok(Client {
        b,
        queues: started.queues,
        region,
    })
}

impl Client {
    fn buf(&mut self, slot: usize, len: usize) -> &mut [u8] {
        let off = slot * (256 << 10);
        assert!(off + len <= self.region.len);
        // SAFETY: the region is mapped for the client's lifetime, slots do not overlap, and a
        // slot is touched only while no request on it is in flight.
        unsafe { std::slice::from_raw_parts_mut((self.region.addr + off) as *mut u8, len) }
    }

    /// Waits for `n` completions on queue `q`.
    fn wait(&mut self, q: usize, n: usize) -> Vec<Completion> {
        let mut done = Vec::new();
        while done.len() < n {
            let mut c: Vec<MaybeUninit<Completion>> =
                (0..n - done.len()).map(|_| MaybeUninit::uninit()).collect();
            let mut timeout = Duration::from_secs(30);
            let got = self.queues[q]
                .do_io(&mut c, 1, Some(&mut timeout), None)
                .expect("do_io");
            assert!(got > 0, "no completion within 30 s");
            // SAFETY: do_io initialised the first `got` entries.
            done.extend(c[..got].iter().map(|c| unsafe { c.assume_init_read() }));
        }
        done
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.b.unmap_mem_region(&self.region);
        self.b.free_mem_region(&self.region);
    }
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Read,
    Write,
    Discard,
    Zeroes { unmap: bool },
    Flush,
}

/// Random requests on disjoint ranges, many in flight at once, checked against a model.
fn random_batches(c: &mut Client, model: &mut [u8], rng: &mut SmallRng, batches: usize) {
    let size = model.len() as u64;
    let nq = c.queues.len();
    for _ in 0..batches {
        let qd = [1usize, 4, 16, 32, 64][rng.gen_range(0..5)];
        let mut taken: Vec<(u64, u64)> = Vec::new();
        let mut ops = Vec::new();
        for slot in 0..qd {
            let op = match rng.gen_range(0..20) {
                0..=7 => Op::Read,
                8..=15 => Op::Write,
                16 => Op::Discard,
                17 | 18 => Op::Zeroes { unmap: rng.gen() },
                _ => Op::Flush,
            };
            let (start, len) = match op {
                Op::Flush => (0, 0),
                // Discard only whole clusters: QEMU (and the engine) keep the data of a
                // partial one, so the model could not tell.
                Op::Discard => {
                    let n = rng.gen_range(1..=4);
                    (rng.gen_range(0..size / CLUSTER - n) * CLUSTER, n * CLUSTER)
                }
                _ => {
                    let len = rng.gen_range(1..=512u64) * 512;
                    (rng.gen_range(0..(size - len) / 512) * 512, len)
                }
            };
            if len > 0 && taken.iter().any(|&(s, l)| start < s + l && s < start + len) {
                continue;
            }
            taken.push((start, len));
            let q = slot % nq;
            let flags = ReqFlags::empty();
            match op {
                Op::Read => {
                    let p = c.buf(slot, len as usize).as_mut_ptr();
                    c.queues[q].read(start, p, len as usize, slot, flags);
                }
                Op::Write => {
                    let b = c.buf(slot, len as usize);
                    rng.fill(b);
                    let p = b.as_ptr();
                    c.queues[q].write(start, p, len as usize, slot, flags);
                }
                Op::Discard => c.queues[q].discard(start, len, slot, flags),
                Op::Zeroes { unmap } => {
                    let f = if unmap { flags } else { ReqFlags::NO_UNMAP };
                    c.queues[q].write_zeroes(start, len, slot, f)
                }
                Op::Flush => c.queues[q].flush(slot, flags),
            }
            ops.push((slot, q, op, start, len));
        }
        for q in 0..nq {
            let n = ops.iter().filter(|o| o.1 == q).count();
            for done in c.wait(q, n) {
                assert_eq!(done.ret, 0, "request {} failed", done.user_data);
            }
        }
        for &(slot, _, op, start, len) in &ops {
            let r = start as usize..(start + len) as usize;
            match op {
                Op::Read => assert!(
                    c.buf(slot, len as usize) == &model[r.clone()],
                    "read of {len} bytes at {start} differs from the model"
                ),
                Op::Write => model[r].copy_from_slice(c.buf(slot, len as usize)),
                Op::Discard | Op::Zeroes { .. } => model[r].fill(0),
                Op::Flush => {}
            }
        }
    }
}

/// Reads the whole disk through the client and compares it with the model.
fn verify_all(c: &mut Client, model: &[u8]) {
    let chunk = 256 << 10;
    for (i, want) in model.chunks(chunk).enumerate() {
        let p = c.buf(0, want.len()).as_mut_ptr();
        c.queues[0].read((i * chunk) as u64, p, want.len(), 0, ReqFlags::empty());
        assert_eq!(c.wait(0, 1)[0].ret, 0);
        assert!(c.buf(0, want.len()) == want, "chunk {i} differs");
    }
}

fn compare_with_model(img: &Path, model: &[u8], dir: &Path) {
    let raw = dir.join("model.raw");
    std::fs::write(&raw, model).unwrap();
    qemu_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            raw.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    );
}

#[test]
fn libblkio_random_io_on_several_queues_matches_a_model_and_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let sock = dir.path().join("vhost.sock");
    let size = 64 * MIB;
    qemu_create(&img, &[], &size.to_string());
    let mut opts = ExportOptions::new();
    opts.num_queues = 2;
    let served = serve(&img, &sock, opts, OpenOptions::default());
    let mut model = vec![0u8; size as usize];
    let mut rng = SmallRng::seed_from_u64(0x7605);
    {
        let mut c = connect(&sock, 2, false).expect("libblkio connects");
        assert_eq!(c.b.get_u64("capacity").unwrap(), size);
        assert_eq!(c.queues.len(), 2);
        assert_eq!(c.b.get_i32("optimal-io-size").unwrap() as u64, CLUSTER);
        random_batches(&mut c, &mut model, &mut rng, 120);
        verify_all(&mut c, &model);
    }
    served.finish();
    assert_check_clean(&img);
    compare_with_model(&img, &model, dir.path());
}

#[test]
fn frontends_reconnect_and_find_what_the_last_one_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let sock = dir.path().join("vhost.sock");
    let size = 16 * MIB;
    qemu_create(&img, &["-o", "cluster_size=4096"], &size.to_string());
    let mut opts = ExportOptions::new();
    opts.num_queues = 1;
    let served = serve(&img, &sock, opts, OpenOptions::default());
    let mut model = vec![0u8; size as usize];
    let mut rng = SmallRng::seed_from_u64(7);
    for _ in 0..3 {
        let mut c = connect(&sock, 1, false).expect("libblkio connects again");
        verify_all(&mut c, &model);
        random_batches(&mut c, &mut model, &mut rng, 30);
    }
    served.finish();
    assert_check_clean(&img);
    compare_with_model(&img, &model, dir.path());
}

#[test]
fn read_only_exports_offer_ro_and_still_read() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let sock = dir.path().join("vhost.sock");
    qemu_create(&img, &[], "4M");
    qemu_ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 64k 128k",
            img.to_str().unwrap(),
        ],
    );
    let mut opts = ExportOptions::new();
    opts.num_queues = 1;
    opts.read_only = true;
    let served = serve(&img, &sock, opts, OpenOptions::read_only());
    // A writable client is refused: the device offers VIRTIO_BLK_F_RO.
    let e = connect(&sock, 1, false)
        .err()
        .expect("a writable client is refused");
    assert_eq!(e.errno(), blkio::Errno::ROFS, "{}", e.message());
    let mut c = connect(&sock, 1, true).expect("a read-only client connects");
    let p = c.buf(0, 256 << 10).as_mut_ptr();
    c.queues[0].read(0, p, 256 << 10, 0, ReqFlags::empty());
    assert_eq!(c.wait(0, 1)[0].ret, 0);
    let b = c.buf(0, 256 << 10);
    assert!(b[..64 << 10].iter().all(|&x| x == 0));
    assert!(b[64 << 10..192 << 10].iter().all(|&x| x == 0x5a));
    drop(c);
    served.finish();
    assert_check_clean(&img);
}

/// A frontend that goes away with requests in flight: the export finishes them (the queue
/// threads' io_uring claims are given up when the threads stop, so the runtime reaps what
/// is left), serves the next frontend, and shuts down cleanly; a hang here fails the test
/// instead of stalling the suite.
#[test]
fn a_frontend_leaving_with_requests_in_flight_does_not_stall_the_export() {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.qcow2");
        let sock = dir.path().join("vhost.sock");
        let size = 32 * MIB;
        qemu_create(&img, &[], &size.to_string());
        let mut opts = ExportOptions::new();
        opts.num_queues = 2;
        let served = serve(&img, &sock, opts, OpenOptions::default());
        for round in 0..3u64 {
            let mut c = connect(&sock, 2, false).expect("libblkio connects");
            for slot in 0..64usize {
                let q = slot % 2;
                let b = c.buf(slot, 64 << 10);
                b.fill(round as u8 + 1);
                let p = b.as_ptr();
                let offset = (slot as u64 * 4 + round) * (64 << 10);
                c.queues[q].write(offset, p, 64 << 10, slot, ReqFlags::empty());
            }
            c.queues[0].flush(64, ReqFlags::empty());
            for q in 0..2 {
                let mut none: [MaybeUninit<Completion>; 0] = [];
                c.queues[q].do_io(&mut none, 0, None, None).expect("submit");
            }
            // Gone without waiting for a single answer.
        }
        let mut c = connect(&sock, 2, false).expect("the next frontend is served");
        let want = vec![0x3c; 128 << 10];
        c.buf(0, want.len()).copy_from_slice(&want);
        let p = c.buf(0, want.len()).as_ptr();
        c.queues[1].write(size - (1 << 20), p, want.len(), 0, ReqFlags::empty());
        assert_eq!(c.wait(1, 1)[0].ret, 0);
        c.buf(1, want.len()).fill(0);
        let p = c.buf(1, want.len()).as_mut_ptr();
        c.queues[0].read(size - (1 << 20), p, want.len(), 1, ReqFlags::empty());
        assert_eq!(c.wait(0, 1)[0].ret, 0);
        assert!(c.buf(1, want.len()) == &want[..]);
        drop(c);
        served.finish();
        assert_check_clean(&img);
        done.send(()).unwrap();
    });
    finished
        .recv_timeout(Duration::from_secs(120))
        .expect("the export stalled (or the test thread failed; see its panic above)");
}
