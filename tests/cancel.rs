//! Cancellation: every operation that changes an image may be dropped at any await point.
//!
//! The enumeration runs each kind of operation once to count its I/Os, then again for every
//! k, on a file that holds the k-th I/O pending: the caller drops the operation right there
//! (as a timeout would), the I/O is released, and afterwards the image must close check-clean
//! with zero leaks, hold the data flushed before, and serve later requests (no lease or lock
//! left behind). The randomized test does what an impatient async service does: many
//! concurrent writers under short timeouts, then `qemu-img check` must find nothing.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use qcow2_async::io::{BlockFile, IoBuf, IoFuture, MemFile};
use qcow2_async::{BitmapOptions, CreateOptions, Image, OpenOptions, ResizeOptions, Verdict};
use rand::{Rng, SeedableRng};

/// Counts I/Os and can hold the n-th one pending until released.
#[derive(Debug)]
struct HoldFile {
    inner: Arc<dyn BlockFile>,
    count: AtomicU64,
    /// 1-based index of the I/O to hold; 0 holds nothing.
    hold_at: AtomicU64,
    held: tokio::sync::Notify,
    holding: AtomicBool,
    release: tokio::sync::Semaphore,
}

impl HoldFile {
    fn new(inner: Arc<dyn BlockFile>) -> Arc<HoldFile> {
        Arc::new(HoldFile {
            inner,
            count: AtomicU64::new(0),
            hold_at: AtomicU64::new(0),
            held: tokio::sync::Notify::new(),
            holding: AtomicBool::new(false),
            release: tokio::sync::Semaphore::new(0),
        })
    }

    async fn gate(&self) {
        let n = self.count.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.hold_at.load(Ordering::SeqCst) {
            self.holding.store(true, Ordering::SeqCst);
            self.held.notify_one();
            self.release.acquire().await.unwrap().forget();
        }
    }

    fn wrap<'a, T: Send + 'a>(&'a self, io: IoFuture<'a, T>) -> IoFuture<'a, T> {
        Box::pin(async move {
            self.gate().await;
            io.await
        })
    }
}

impl BlockFile for HoldFile {
    fn read_at(&self, buf: IoBuf, off: u64) -> IoFuture<'_, IoBuf> {
        self.wrap(self.inner.read_at(buf, off))
    }
    fn write_at(&self, buf: IoBuf, off: u64) -> IoFuture<'_, IoBuf> {
        self.wrap(self.inner.write_at(buf, off))
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        self.wrap(self.inner.flush())
    }
    fn len(&self) -> IoFuture<'_, u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> IoFuture<'_, ()> {
        self.wrap(self.inner.set_len(len))
    }
    fn allocate(&self, o: u64, l: u64) -> IoFuture<'_, ()> {
        self.wrap(self.inner.allocate(o, l))
    }
    fn punch_hole(&self, o: u64, l: u64) -> IoFuture<'_, ()> {
        self.wrap(self.inner.punch_hole(o, l))
    }
    fn zero_range(&self, o: u64, l: u64) -> IoFuture<'_, ()> {
        self.wrap(self.inner.zero_range(o, l))
    }
    fn holes(&self, o: u64, l: u64) -> qcow2_async::io::IoFuture<'_, Vec<(u64, u64)>> {
        self.inner.holes(o, l)
    }
    fn allocated_bytes(&self) -> qcow2_async::io::IoFuture<'_, u64> {
        self.inner.allocated_bytes()
    }
    fn alignment(&self) -> usize {
        self.inner.alignment()
    }
}

type Op = fn(Image) -> Pin<Box<dyn Future<Output = ()> + Send>>;

/// Each kind of operation that allocates, frees or rewrites metadata, and the image it runs
/// on.
fn ops() -> Vec<(&'static str, Layout, Op)> {
    let mut v: Vec<(&'static str, Layout, Op)> = small_cluster_ops()
        .into_iter()
        .map(|(label, op)| (label, Layout::SmallClusters, op))
        .collect();
    v.extend(
        subcluster_ops()
            .into_iter()
            .map(|(label, op)| (label, Layout::Subclusters, op)),
    );
    v
}

/// Subclusters (extended L2 entries): partial writes set allocation bits, zeroes set zero
/// bits, without touching the rest of the cluster. (A partial discard does nothing, as in
/// QEMU, so it has no I/O to drop at.)
fn subcluster_ops() -> Vec<(&'static str, Op)> {
    vec![
        ("subcluster write into an unallocated cluster", |i| {
            Box::pin(async move { i.write_at(&[7; 4096], 3 << 20).await.unwrap() })
        }),
        ("subcluster write-zeroes in an allocated cluster", |i| {
            Box::pin(async move { i.write_zeroes(4 << 10, 8 << 10, false).await.unwrap() })
        }),
        ("subcluster write beside allocated subclusters", |i| {
            Box::pin(async move {
                i.write_at(&[7; 4096], 3 << 20).await.unwrap();
                i.write_at(&[8; 2048], (3 << 20) + (8 << 10)).await.unwrap();
            })
        }),
        (
            "subcluster write-zeroes with unmap in an allocated cluster",
            |i| Box::pin(async move { i.write_zeroes(36 << 10, 4 << 10, true).await.unwrap() }),
        ),
        (
            "write-zeroes with unmap over whole and partial clusters",
            |i| Box::pin(async move { i.write_zeroes(0, 40 << 10, true).await.unwrap() }),
        ),
    ]
}

fn small_cluster_ops() -> Vec<(&'static str, Op)> {
    vec![
        ("allocating 4 KiB write", |i| {
            Box::pin(async move { i.write_at(&[7; 4096], 3 << 20).await.unwrap() })
        }),
        (
            "192 KiB write over many clusters and refcount blocks",
            |i| Box::pin(async move { i.write_at(&[8; 192 << 10], 5 << 20).await.unwrap() }),
        ),
        ("partial overwrite of a compressed cluster", |i| {
            Box::pin(async move { i.write_at(&[9; 1000], 1 << 20).await.unwrap() })
        }),
        ("compressed write", |i| {
            Box::pin(async move { i.write_compressed(6 << 20, &[3; 512]).await.unwrap() })
        }),
        ("write-zeroes with unmap", |i| {
            Box::pin(async move { i.write_zeroes(8 << 10, 32 << 10, true).await.unwrap() })
        }),
        ("discard", |i| {
            Box::pin(async move { i.discard(0, 32 << 10).await.unwrap() })
        }),
        ("owned-buffer write", |i| {
            Box::pin(async move {
                i.write_buf(IoBuf::from_vec(vec![4; 4096]), 7 << 20)
                    .await
                    .unwrap();
            })
        }),
        ("flush", |i| {
            Box::pin(async move {
                i.write_at(&[1; 512], 2 << 20).await.unwrap();
                i.flush().await.unwrap()
            })
        }),
        ("create snapshot", |i| {
            Box::pin(async move {
                i.create_snapshot("s").await.unwrap();
            })
        }),
        ("add bitmap", |i| {
            Box::pin(async move {
                i.add_bitmap("b", &BitmapOptions::default()).await.unwrap();
            })
        }),
        ("resize", |i| {
            Box::pin(async move { i.resize(32 << 20, ResizeOptions::default()).await.unwrap() })
        }),
        ("delete snapshot (after creating it)", |i| {
            Box::pin(async move {
                i.create_snapshot("s").await.unwrap();
                i.delete_snapshot("s").await.unwrap();
            })
        }),
        ("apply snapshot (after creating it and writing)", |i| {
            Box::pin(async move {
                i.create_snapshot("s").await.unwrap();
                i.write_at(&[5; 4096], 3 << 20).await.unwrap();
                i.apply_snapshot("s").await.unwrap();
            })
        }),
        ("remove bitmap (after adding it)", |i| {
            Box::pin(async move {
                i.add_bitmap("b", &BitmapOptions::default()).await.unwrap();
                i.write_at(&[6; 4096], 4 << 20).await.unwrap();
                i.remove_bitmap("b").await.unwrap();
            })
        }),
    ]
}

/// The image an operation is enumerated on.
#[derive(Debug, Clone, Copy)]
enum Layout {
    /// 512-byte clusters: refcount blocks cover 128 KiB, so writes create blocks and grow
    /// the table.
    SmallClusters,
    /// 16 KiB clusters with extended L2 entries (2 KiB subclusters).
    Subclusters,
}

const SIZE: u64 = 16 << 20;

/// An image of `layout` with flushed data (and a compressed cluster), on a `HoldFile`.
async fn setup(layout: Layout) -> (Arc<MemFile>, Arc<HoldFile>, Image) {
    let mem = Arc::new(MemFile::from_bytes(Vec::new()));
    let mut c = CreateOptions::new(SIZE);
    match layout {
        Layout::SmallClusters => c.cluster_size = 512,
        Layout::Subclusters => {
            c.cluster_size = 16 << 10;
            c.extended_l2 = true;
        }
    }
    Image::format_file(mem.clone(), &c).await.unwrap();
    let img = Image::open_file(mem.clone(), None, &OpenOptions::default(), None)
        .await
        .unwrap();
    img.write_at(&[0x5a; 64 << 10], 0).await.unwrap();
    img.write_compressed(1 << 20, &vec![6; c.cluster_size as usize])
        .await
        .unwrap();
    img.close().await.unwrap();
    // Reopened with nothing cached, so that every operation loads the tables it touches:
    // even one that only changes metadata in memory has I/Os to be dropped at.
    let hold = HoldFile::new(mem.clone());
    let img = Image::open_file(hold.clone(), None, &OpenOptions::default(), None)
        .await
        .unwrap();
    (mem, hold, img)
}

async fn verify(mem: Arc<MemFile>, label: &str) {
    let img = Image::open_file(mem, None, &OpenOptions::default(), None)
        .await
        .unwrap();
    let r = img.check(None).await.unwrap();
    assert_eq!(r.verdict(), Verdict::Clean, "{label}: {r:?}");
    assert_eq!(r.leaks, 0, "{label}");
    // Data flushed before the operation is intact where the operation did not touch it.
    let mut b = vec![0u8; 4096];
    img.read_at(&mut b, 60 << 10).await.unwrap();
    assert!(
        b.iter().all(|&x| x == 0x5a),
        "{label}: flushed data changed"
    );
    img.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_dropped_at_every_io_leaves_a_clean_image() {
    let mut cases = 0;
    for (label, layout, op) in ops() {
        // Count the operation's I/Os when it runs to the end.
        let (_, hold, img) = setup(layout).await;
        let before = hold.count.load(Ordering::SeqCst);
        op(img.clone()).await;
        let n = hold.count.load(Ordering::SeqCst) - before;
        img.close().await.unwrap();
        assert!(n > 0, "{label} does no I/O?");
        for k in 1..=n {
            let (mem, hold, img) = setup(layout).await;
            let at = hold.count.load(Ordering::SeqCst) + k;
            hold.hold_at.store(at, Ordering::SeqCst);
            let held = hold.held.notified();
            tokio::select! {
                _ = op(img.clone()) => panic!("{label}: finished without reaching I/O {k}"),
                _ = held => {}
            }
            // The caller is gone; the held I/O completes now.
            assert!(hold.holding.load(Ordering::SeqCst));
            hold.release.add_permits(1);
            // Later requests are not blocked by anything the dropped one held.
            tokio::time::timeout(Duration::from_secs(10), async {
                img.write_at(&[2; 4096], 9 << 20).await.unwrap();
                let mut b = vec![0u8; 4096];
                img.read_at(&mut b, 9 << 20).await.unwrap();
                assert!(b.iter().all(|&x| x == 2));
            })
            .await
            .unwrap_or_else(|_| panic!("{label}, dropped at I/O {k}: later requests hang"));
            tokio::time::timeout(Duration::from_secs(10), img.close())
                .await
                .unwrap_or_else(|_| panic!("{label}, dropped at I/O {k}: close hangs"))
                .unwrap();
            verify(mem, &format!("{label}, dropped at I/O {k} of {n}")).await;
            cases += 1;
        }
    }
    assert!(cases > 50, "only {cases} cases");
}

/// The measurement of the issue, as a test: 48 tasks of mixed writes, each abandoned after
/// a random 0–400 µs, 40 rounds, on a real file with io_uring; then `qemu-img check` must
/// report no leak and no corruption.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_abandoned_by_timeouts_leak_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.qcow2");
    let img = Image::create(
        &path,
        &CreateOptions::new(256 << 20),
        &OpenOptions::default(),
    )
    .await
    .unwrap();
    // QCOW2_CANCEL_SEED runs another schedule of delays (the test's own is fixed).
    let seed = std::env::var("QCOW2_CANCEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut abandoned = 0u32;
    const ROUNDS: u32 = 40;
    const TASKS: u64 = 48;
    for _round in 0..ROUNDS {
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let img = img.clone();
            let delay = Duration::from_micros(rng.gen_range(0..400));
            let kind = rng.gen_range(0..5u32);
            let off = rng.gen_range(0..(256u64 << 20) / 4096 - 48) * 4096;
            tasks.push(tokio::spawn(async move {
                let work = async {
                    match kind {
                        0 => img.write_at(&[t as u8; 4096], off).await,
                        1 => img.write_at(&vec![t as u8; 192 << 10], off & !0xffff).await,
                        2 => img.write_zeroes(off, 64 << 10, t % 2 == 0).await,
                        3 => img.discard(off & !0xffff, 128 << 10).await,
                        _ => {
                            img.write_compressed(off & !0xffff, &vec![t as u8; 65536])
                                .await
                        }
                    }
                };
                tokio::time::timeout(delay, work).await.is_err()
            }));
        }
        for t in tasks {
            if t.await.unwrap() {
                abandoned += 1;
            }
        }
    }
    assert!(
        abandoned > 100,
        "only {abandoned} operations were abandoned"
    );
    img.close().await.unwrap();
    let (code, report) = common::qemu_check(&path);
    println!(
        "seed {seed:#x}: {abandoned} of {} operations abandoned; qemu-img check: {} leaks, {} corruptions",
        u64::from(ROUNDS) * TASKS,
        report["leaks"].as_u64().unwrap_or(0),
        report["corruptions"].as_u64().unwrap_or(0)
    );
    assert_eq!(code, 0, "qemu-img check: {report}");
    assert_eq!(report["leaks"].as_u64().unwrap_or(0), 0, "{report}");
    assert_eq!(report["corruptions"].as_u64().unwrap_or(0), 0, "{report}");
}

/// `ops::convert` dropped part-way (as a timeout would) removes the target it was writing
/// under a temporary name, and leaves nothing at the destination.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_convert_leaves_no_file_behind() {
    use qcow2_async::ops::{convert, open_disk, ConvertOptions};
    use qcow2_async::BackingFormat;
    let dir = tempfile::tempdir().unwrap();
    let src_path = dir.path().join("src.qcow2");
    let src = Image::create(
        &src_path,
        &CreateOptions::new(64 << 20),
        &OpenOptions::default(),
    )
    .await
    .unwrap();
    for i in 0..16u64 {
        src.write_at(&vec![i as u8 + 1; 1 << 20], i << 20)
            .await
            .unwrap();
    }
    src.close().await.unwrap();
    let disk = open_disk(&src_path, BackingFormat::Qcow2, &OpenOptions::read_only())
        .await
        .unwrap();
    let listing = {
        let dir = dir.path().to_path_buf();
        move || {
            let mut v: Vec<String> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        }
    };
    let started = Arc::new(tokio::sync::Notify::new());
    let saw_temp = Arc::new(AtomicBool::new(false));
    let mut o = ConvertOptions::new(BackingFormat::Qcow2);
    o.parallel = 1;
    o.progress = Some({
        let (started, saw_temp, listing) = (started.clone(), saw_temp.clone(), listing.clone());
        Arc::new(move |_, _| {
            if listing().iter().any(|n| n.contains(".convert-")) {
                saw_temp.store(true, Ordering::SeqCst);
            }
            started.notify_one();
        })
    });
    let dst = dir.path().join("dst.qcow2");
    tokio::select! {
        biased;
        _ = started.notified() => {}
        r = convert(&disk, &dst, &o) => panic!("finished before its first progress report: {r:?}"),
    }
    assert!(
        saw_temp.load(Ordering::SeqCst),
        "no temporary file while converting"
    );
    assert_eq!(listing(), vec!["src.qcow2".to_string()]);
}

/// Every public async function of the crate states its cancellation contract in its rustdoc
/// (a paragraph starting "Cancellation:"), so that a new one cannot be added without one.
#[test]
fn every_public_async_fn_documents_its_cancellation() {
    fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    let (mut seen, mut missing) = (0, Vec::new());
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let Some(rest) = line.trim_start().strip_prefix("pub async fn ") else {
                continue;
            };
            seen += 1;
            let documented = lines[..i]
                .iter()
                .rev()
                .map(|l| l.trim_start())
                .skip_while(|l| l.starts_with("#["))
                .take_while(|l| l.starts_with("///"))
                .any(|l| l.starts_with("/// Cancellation:"));
            if !documented {
                let name = rest.split(['(', '<']).next().unwrap_or(rest);
                missing.push(format!("{}:{} {name}", f.display(), i + 1));
            }
        }
    }
    assert!(
        seen >= 40,
        "only {seen} public async fns found: is the scan broken?"
    );
    assert!(
        missing.is_empty(),
        "no Cancellation paragraph:\n{}",
        missing.join("\n")
    );
}
