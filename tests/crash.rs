//! Crash consistency, proven by enumeration (issue 4, items 7 and 8).
//!
//! Each workload runs once on [`FaultFile`]s, which log every write and flush. Because the
//! engine does the same thing up to a crash point whether or not power is cut there, the log
//! of one run gives every crash point: for crash point `n` (power cut before event `n`) the
//! fault file builds the files a disk with a volatile cache could hold — everything flushed,
//! plus a seeded selection of subsets of the unflushed writes, each possibly torn per
//! 512-byte sector. For every such state the harness proves:
//!
//! 1. a read-write open succeeds (a dirty lazy-refcount image is repaired by it);
//! 2. `check` finds no corruption (leaked clusters are allowed) and no L1 or L2 entry points
//!    at a cluster whose refcount is 0 (also walked independently of `check`);
//! 3. the disk reads exactly what the guest saw at the last `flush` (or `close`) that
//!    completed before the crash, except where a request issued after that flush touched
//!    it — there each byte holds its old value or one a later request wrote;
//! 4. snapshots created before that flush exist and read as they did;
//! 5. `repair(Leaks)` leaves the image clean.
//!
//! Write errors (`EIO` once, `ENOSPC` from a write on) are injected the same way: the run is
//! repeated with write `k` failing; the error must reach the caller as `Error::Io` with that
//! errno, and the files as they are then (and after a power cut there) must pass 1–5.
//!
//! Adding a workload (later features should): write an `async fn(&mut Guest) -> Result<()>`
//! that drives the image through `Guest` (`write`, `zeroes`, `discard`, `flush`, `snapshot`,
//! `delete_snapshot`, `repair_leaks`, `reopen`; `g.img()` for anything else), and add one `Workload` entry
//! to `workloads()` with the creation options it needs. The harness runs it with lazy
//! refcounts on and off, at every sampled crash point and under injected write errors.
//!
//! The default run samples crash points and survivor subsets with fixed seeds (the
//! interesting points — around every flush — first) to stay well under a minute in debug
//! builds. `QCOW2_CRASH_LONG=1` enumerates every crash point, more survivor subsets, and a
//! write error at every write.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use qcow2_async::io::{BlockFile, FaultErrno, FaultFile, MemFile, WriteFailure};
use qcow2_async::qcow2_format::l2::decode_extended;
use qcow2_async::qcow2_format::{ImageHeader, L1Entry, L2Entry, L2Format, Limits};
use qcow2_async::{
    BackingFormat, CreateOptions, Disk, EncryptionOptions, Error, Image, KdfIterations,
    OpenOptions, RepairMode, Result, Secret, Verdict,
};
use rand::seq::SliceRandom;
use rand::Rng;

type StepsFuture<'a> = Pin<Box<dyn Future<Output = Result<()>> + Send + 'a>>;
type Steps = for<'a> fn(&'a mut Guest) -> StepsFuture<'a>;

/// A guest workload and the image it runs on.
struct Workload {
    name: &'static str,
    /// Creation options (lazy refcounts are set by the harness).
    create: fn() -> CreateOptions,
    /// Run on a raw backing file of the disk's size (see `backing_bytes`).
    backing: bool,
    /// Keep guest data in an external data file (a second fault file, same power domain).
    data_file: bool,
    steps: Steps,
}

fn workloads() -> Vec<Workload> {
    vec![
        Workload {
            name: "refcount-table-growth-512",
            create: || {
                let mut o = CreateOptions::new(4 << 20);
                o.cluster_size = 512;
                o.refcount_bits = 64;
                o
            },
            backing: false,
            data_file: false,
            steps: |g| Box::pin(refcount_growth(g)),
        },
        Workload {
            name: "cow-from-backing",
            create: || {
                let mut o = CreateOptions::new(1 << 20);
                o.cluster_size = 4096;
                o
            },
            backing: true,
            data_file: false,
            steps: |g| Box::pin(cow_from_backing(g)),
        },
        Workload {
            name: "snapshot-shared-overwrite",
            create: || {
                let mut o = CreateOptions::new(1 << 20);
                o.cluster_size = 4096;
                o
            },
            backing: false,
            data_file: false,
            steps: |g| Box::pin(snapshot_shared(g)),
        },
        Workload {
            name: "discard-and-zeroes",
            create: || {
                let mut o = CreateOptions::new(1 << 20);
                o.cluster_size = 4096;
                o
            },
            backing: false,
            data_file: false,
            steps: |g| Box::pin(discard_and_zeroes(g)),
        },
        Workload {
            name: "extended-l2-subclusters",
            create: || {
                let mut o = CreateOptions::new(1 << 20);
                o.cluster_size = 16384;
                o.extended_l2 = true;
                o
            },
            backing: true,
            data_file: false,
            steps: |g| Box::pin(subclusters(g)),
        },
        Workload {
            name: "external-data-file",
            create: || {
                let mut o = CreateOptions::new(1 << 20);
                o.cluster_size = 4096;
                o.data_file = Some("data.raw".into());
                o
            },
            backing: false,
            data_file: true,
            steps: |g| Box::pin(external_data(g)),
        },
        Workload {
            name: "compressed-writes",
            create: || {
                let mut o = CreateOptions::new(1 << 20);
                o.cluster_size = 4096;
                o
            },
            backing: false,
            data_file: false,
            steps: |g| Box::pin(compressed_writes(g)),
        },
        Workload {
            name: "compressed-overwrite",
            create: || {
                let mut o = CreateOptions::new(1 << 20);
                o.cluster_size = 4096;
                o.zstd = true;
                o
            },
            backing: false,
            data_file: false,
            steps: |g| Box::pin(compressed_overwrite(g)),
        },
        Workload {
            name: "persistent-bitmaps",
            create: || {
                let mut o = CreateOptions::new(1 << 20);
                o.cluster_size = 4096;
                o
            },
            backing: false,
            data_file: false,
            steps: |g| Box::pin(bitmap_store(g)),
        },
        Workload {
            name: "luks-encrypted",
            create: || {
                let mut e = EncryptionOptions::luks(Secret::new(PASSPHRASE));
                e.iterations = KdfIterations::Count(1000);
                let mut o = CreateOptions::new(1 << 20);
                o.cluster_size = 4096;
                o.encryption = Some(e);
                o
            },
            backing: false,
            data_file: false,
            steps: |g| Box::pin(encrypted(g)),
        },
    ]
}

/// Passphrase of the encrypted workload; handed to every open (plain images ignore it).
const PASSPHRASE: &str = "crash-passphrase";

fn open_opts() -> OpenOptions {
    {
        let mut o = OpenOptions::default();
        o.secret = Some(Secret::new(PASSPHRASE));
        o
    }
}

/// Compressible cluster contents: runs of one byte.
fn runs(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 700) as u8))
        .collect()
}

/// (g) Compressed writes packed into shared host clusters (deflate), one spilling into the
/// next cluster, an incompressible fallback, then flushes.
async fn compressed_writes(g: &mut Guest) -> Result<()> {
    for i in 0..5u64 {
        g.compressed(i * 4096, &runs(40 + i as u8, 4096)).await?;
    }
    g.flush().await?;
    g.compressed(8 * 4096, &pattern(50, 4096)).await?; // does not shrink: a normal write
    g.compressed(9 * 4096, &runs(51, 4096)).await?;
    g.write(20 * 4096, &pattern(52, 4096)).await?;
    g.flush().await?;
    g.compressed(10 * 4096, &runs(53, 4096)).await?;
    Ok(())
}

/// (h) Rewrites of compressed clusters (zstd): a partial write decompresses into a normal
/// cluster, whole-cluster zeroes and discards drop the payload, a compressed write replaces
/// a compressed one, while a snapshot still shares some payloads.
async fn compressed_overwrite(g: &mut Guest) -> Result<()> {
    for i in 0..6u64 {
        g.compressed(i * 4096, &runs(60 + i as u8, 4096)).await?;
    }
    g.flush().await?;
    g.snapshot("s").await?;
    g.write(4096 + 100, &pattern(70, 300)).await?;
    g.zeroes(2 * 4096, 4096, true).await?;
    g.flush().await?;
    g.discard(3 * 4096, 4096).await?;
    g.compressed(4 * 4096, &runs(71, 4096)).await?;
    g.flush().await?;
    g.write(5 * 4096, &pattern(72, 4096)).await?;
    Ok(())
}

/// (i) Persistent bitmaps: add (new directory and tables), writes while they are flagged in
/// use, a clean close that stores them copy-on-write, more writes after the reopen.
async fn bitmap_store(g: &mut Guest) -> Result<()> {
    g.write(0, &pattern(80, 4096)).await?;
    g.flush().await?;
    g.add_bitmap("b1").await?;
    g.write(3 * 4096, &pattern(81, 4096)).await?;
    g.zeroes(5 * 4096, 4096, true).await?;
    g.flush().await?;
    g.add_bitmap("b2").await?;
    g.reopen().await?;
    g.write(7 * 4096, &pattern(82, 100)).await?;
    g.flush().await?;
    g.write(9 * 4096, &pattern(83, 4096)).await?;
    Ok(())
}

/// (j) LUKS-encrypted data: allocating and partial-sector writes (read-modify-write of
/// encrypted sectors), COW of encrypted clusters under a snapshot.
async fn encrypted(g: &mut Guest) -> Result<()> {
    g.write(0, &pattern(90, 4096)).await?;
    g.write(4096 + 7, &pattern(91, 100)).await?;
    g.flush().await?;
    g.snapshot("e").await?;
    g.write(200, &pattern(92, 1000)).await?;
    g.flush().await?;
    g.write(3 * 4096, &pattern(93, 5000)).await?;
    Ok(())
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add(i as u8) | 1)
        .collect()
}

/// (a) 512-byte clusters with 64-bit refcounts: a refcount block covers 64 clusters and the
/// first refcount table 4096, so ~2.3 MiB of data creates dozens of blocks and grows the
/// table.
async fn refcount_growth(g: &mut Guest) -> Result<()> {
    for i in 0..36u64 {
        g.write(i * 65536, &pattern(i as u8, 65536)).await?;
        if i % 6 == 5 {
            g.flush().await?;
        }
    }
    // Overwrites in place and across cluster boundaries.
    g.write(1000, &pattern(99, 3000)).await?;
    g.flush().await?;
    g.write(70000, &pattern(98, 512)).await?;
    Ok(())
}

/// (b) Partial writes over a backing file copy the rest of the cluster from it.
async fn cow_from_backing(g: &mut Guest) -> Result<()> {
    g.write(100, &pattern(1, 200)).await?;
    g.write(4096 * 3 + 4000, &pattern(2, 200)).await?; // spans two clusters
    g.write(8 * 4096, &pattern(3, 4096)).await?; // whole cluster, no COW
    g.flush().await?;
    g.write(300, &pattern(4, 100)).await?; // in place now
    g.write(20 * 4096 + 512, &pattern(5, 1024)).await?;
    g.zeroes(30 * 4096 + 100, 500, false).await?; // zeroes inside a cluster: COW too
    g.flush().await?;
    g.reopen().await?;
    g.write(40 * 4096 + 7, &pattern(6, 9000)).await?;
    g.discard(8 * 4096, 4096).await?;
    g.write(8 * 4096 + 10, &pattern(7, 10)).await?; // COW of a discarded cluster
    g.flush().await?;
    g.write(50 * 4096, &pattern(8, 100)).await?;
    Ok(())
}

/// (c) Snapshot-shared clusters (and L2 tables) are copied on write and the old ones
/// released; deleting a snapshot frees what only it used.
async fn snapshot_shared(g: &mut Guest) -> Result<()> {
    for i in 0..6u64 {
        g.write(i * 4096, &pattern(10 + i as u8, 4096)).await?;
    }
    g.write(600 << 10, &pattern(16, 8192)).await?;
    g.flush().await?;
    g.snapshot("s1").await?;
    g.write(100, &pattern(20, 50)).await?; // COW of a shared cluster and of its L2 table
    g.write(2 * 4096, &pattern(21, 4096)).await?;
    g.flush().await?;
    g.write(600 << 10, &pattern(22, 100)).await?;
    g.snapshot("s2").await?;
    g.write(3 * 4096 + 5, &pattern(23, 5000)).await?;
    g.discard(4 * 4096, 4096).await?;
    g.flush().await?;
    g.delete_snapshot("s1").await?;
    g.write(5 * 4096, &pattern(24, 300)).await?;
    g.flush().await?;
    g.write(0, &pattern(25, 4096)).await?;
    Ok(())
}

/// (d) Discards and write-zeroes free clusters (deferred until the unmapping is durable)
/// that later writes reuse; zero-alloc clusters are written in place.
async fn discard_and_zeroes(g: &mut Guest) -> Result<()> {
    for i in 0..12u64 {
        g.write(i * 4096, &pattern(30 + i as u8, 4096)).await?;
    }
    g.flush().await?;
    // A repair while open (it writes refcounts and clears a lazy image's dirty bit, which
    // the next allocation must set again).
    g.repair_leaks().await?;
    g.discard(2 * 4096, 3 * 4096).await?;
    g.zeroes(6 * 4096, 2 * 4096, true).await?;
    g.zeroes(9 * 4096, 4096, false).await?; // keeps its host cluster (zero-alloc)
    g.write(100 * 4096, &pattern(50, 3 * 4096)).await?; // may reuse freed clusters
    g.flush().await?;
    g.write(9 * 4096 + 100, &pattern(51, 100)).await?; // into the zero-alloc cluster
    g.zeroes(10 * 4096 + 10, 100, true).await?; // partial: written as zeros
    g.discard(0, 4096).await?;
    g.flush().await?;
    g.reopen().await?;
    g.write(4096 * 2, &pattern(52, 4096)).await?;
    g.zeroes(0, 12 * 4096, false).await?;
    g.flush().await?;
    g.write(4096, &pattern(53, 4096)).await?;
    Ok(())
}

/// (e) Extended L2: subcluster writes allocate once and set only touched subclusters; zeroes
/// and discards per subcluster.
async fn subclusters(g: &mut Guest) -> Result<()> {
    g.write(512, &pattern(60, 512)).await?;
    g.write(16384 + 1000, &pattern(61, 3000)).await?;
    g.flush().await?;
    g.write(2048, &pattern(62, 512)).await?; // same cluster, another subcluster
    g.zeroes(16384 + 512, 1024, false).await?;
    g.write(5 * 16384, &pattern(63, 16384)).await?;
    g.flush().await?;
    g.discard(5 * 16384, 16384).await?;
    g.write(7 * 16384 + 100, &pattern(64, 20000)).await?;
    g.zeroes(0, 16384, true).await?;
    g.flush().await?;
    g.write(300, &pattern(65, 10)).await?;
    Ok(())
}

/// (f) External data file: data goes to the second file in place; the L2 entry that maps it
/// must not reach the qcow2 file before the data reaches the data file.
async fn external_data(g: &mut Guest) -> Result<()> {
    g.write(0, &pattern(70, 4096)).await?;
    g.write(10 * 4096 + 100, &pattern(71, 5000)).await?;
    g.flush().await?;
    g.write(200, &pattern(72, 100)).await?;
    g.zeroes(10 * 4096, 4096, false).await?;
    g.write(200 * 4096, &pattern(73, 8192)).await?;
    g.flush().await?;
    g.discard(0, 4096).await?;
    g.write(4096 * 3, &pattern(74, 4096)).await?;
    g.flush().await?;
    g.write(100, &pattern(75, 100)).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------- guest

/// What a guest request changes.
#[derive(Debug, Clone)]
enum Change {
    /// `new`: what the range reads after the request (`None`: unknown, the request failed
    /// and its result may be anything).
    Data {
        off: u64,
        len: u64,
        new: Option<Vec<u8>>,
    },
    SnapshotDeleted(String),
    /// Nothing the guest reads changes (close, snapshot creation).
    None,
}

#[derive(Debug, Clone)]
struct GuestOp {
    /// Event count of the power domain when the request started and when it returned.
    start: usize,
    change: Change,
}

/// The guest's view at a completed flush (or close): guaranteed to survive a later crash.
#[derive(Debug, Clone)]
struct Durable {
    /// Event count when the flush returned.
    end: usize,
    /// Requests issued before it (a prefix of `Guest::ops`).
    ops_before: usize,
    disk: Arc<Vec<u8>>,
    snapshots: Vec<(String, Arc<Vec<u8>>)>,
}

/// Drives an image and records, for every request, where in the event log it ran and what it
/// changed.
struct Guest {
    img: Option<Image>,
    qcow: Arc<FaultFile>,
    data: Option<Arc<FaultFile>>,
    backing: Option<Vec<u8>>,
    disk: Vec<u8>,
    snapshots: Vec<(String, Arc<Vec<u8>>)>,
    ops: Vec<GuestOp>,
    durable: Vec<Durable>,
}

fn backing_of(bytes: &Option<Vec<u8>>) -> Option<Disk> {
    bytes.as_ref().map(|b| {
        let f: Arc<dyn BlockFile> = Arc::new(MemFile::from_bytes(b.clone()));
        Disk::Raw(f, b.len() as u64)
    })
}

async fn open_on(
    qcow: Arc<dyn BlockFile>,
    data: Option<Arc<dyn BlockFile>>,
    backing: &Option<Vec<u8>>,
    opts: &OpenOptions,
) -> Result<Image> {
    Image::open_with_data_file(qcow, data, None, opts, backing_of(backing)).await
}

impl Guest {
    fn img(&self) -> &Image {
        self.img.as_ref().expect("image open")
    }

    fn events(&self) -> usize {
        self.qcow.events()
    }

    async fn open(&mut self) -> Result<()> {
        let data = self.data.clone().map(|d| d as Arc<dyn BlockFile>);
        self.img = Some(open_on(self.qcow.clone(), data, &self.backing, &open_opts()).await?);
        Ok(())
    }

    async fn read_back(&self, off: u64, len: u64) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        self.img().read_at(&mut buf, off).await?;
        Ok(buf)
    }

    /// Records a request before it runs, with what its range may hold if it fails part-way
    /// (`None`: anything).
    fn begin(&mut self, off: u64, len: u64, maybe: Option<Vec<u8>>) -> usize {
        let start = self.events();
        self.ops.push(GuestOp {
            start,
            change: Change::Data {
                off,
                len,
                new: maybe,
            },
        });
        self.ops.len() - 1
    }

    /// The request completed: its range reads `new` now.
    fn done(&mut self, op: usize, new: Vec<u8>) {
        if let Change::Data { off, new: n, .. } = &mut self.ops[op].change {
            let off = *off as usize;
            self.disk[off..off + new.len()].copy_from_slice(&new);
            *n = Some(new);
        }
    }

    async fn write(&mut self, off: u64, data: &[u8]) -> Result<()> {
        let op = self.begin(off, data.len() as u64, Some(data.to_vec()));
        self.img().write_at(data, off).await?;
        self.done(op, data.to_vec());
        Ok(())
    }

    async fn compressed(&mut self, off: u64, data: &[u8]) -> Result<()> {
        let op = self.begin(off, data.len() as u64, Some(data.to_vec()));
        self.img().write_compressed(off, data).await?;
        self.done(op, data.to_vec());
        Ok(())
    }

    async fn add_bitmap(&mut self, name: &str) -> Result<()> {
        let start = self.events();
        self.ops.push(GuestOp {
            start,
            change: Change::None,
        });
        self.img()
            .add_bitmap(name, &qcow2_async::BitmapOptions::default())
            .await
    }

    async fn zeroes(&mut self, off: u64, len: u64, unmap: bool) -> Result<()> {
        let op = self.begin(off, len, Some(vec![0; len as usize]));
        self.img().write_zeroes(off, len, unmap).await?;
        let new = self.read_back(off, len).await?;
        assert!(new.iter().all(|&b| b == 0), "write_zeroes left data");
        self.done(op, new);
        Ok(())
    }

    async fn discard(&mut self, off: u64, len: u64) -> Result<()> {
        let op = self.begin(off, len, None);
        self.img().discard(off, len).await?;
        // What a discarded range reads as depends on the format (zeros, or the backing
        // file) and on alignment; the live image says what the guest saw.
        let new = self.read_back(off, len).await?;
        self.done(op, new);
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        self.img().flush().await?;
        self.durable_point().await
    }

    async fn durable_point(&mut self) -> Result<()> {
        if let Some(img) = &self.img {
            // The live image must agree with the model before its state is relied on.
            let mut all = vec![0u8; self.disk.len()];
            img.read_at(&mut all, 0).await?;
            assert!(all == self.disk, "live image differs from the model");
        }
        self.durable.push(Durable {
            end: self.events(),
            ops_before: self.ops.len(),
            disk: Arc::new(self.disk.clone()),
            snapshots: self.snapshots.clone(),
        });
        Ok(())
    }

    async fn snapshot(&mut self, name: &str) -> Result<()> {
        let start = self.events();
        self.ops.push(GuestOp {
            start,
            change: Change::None,
        });
        self.img().create_snapshot(name).await?;
        self.snapshots
            .push((name.into(), Arc::new(self.disk.clone())));
        Ok(())
    }

    async fn delete_snapshot(&mut self, name: &str) -> Result<()> {
        let start = self.events();
        self.ops.push(GuestOp {
            start,
            change: Change::SnapshotDeleted(name.into()),
        });
        self.img().delete_snapshot(name).await?;
        self.snapshots.retain(|(n, _)| n != name);
        Ok(())
    }

    /// `check` with leak repair on the open image (it writes refcounts and may clear the
    /// dirty bit, which must then be set again before the next mapping change).
    async fn repair_leaks(&mut self) -> Result<()> {
        let start = self.events();
        self.ops.push(GuestOp {
            start,
            change: Change::None,
        });
        let r = self.img().check(Some(RepairMode::Leaks)).await?;
        assert_eq!(r.verdict(), Verdict::Clean, "live image: {r:#?}");
        Ok(())
    }

    /// Closes (a durable point) and opens again.
    async fn reopen(&mut self) -> Result<()> {
        self.close().await?;
        self.open().await
    }

    async fn close(&mut self) -> Result<()> {
        let start = self.events();
        self.ops.push(GuestOp {
            start,
            change: Change::None,
        });
        if let Some(img) = self.img.take() {
            img.close().await?;
        }
        self.durable_point().await
    }
}

// -------------------------------------------------------------------------------- harness

fn long_mode() -> bool {
    std::env::var("QCOW2_CRASH_LONG").is_ok_and(|v| v == "1")
}

/// `QCOW2_CRASH_ONLY=<part of a name>` runs only the matching workloads (handy with the long
/// mode).
fn selected() -> Vec<Workload> {
    let only = std::env::var("QCOW2_CRASH_ONLY").unwrap_or_default();
    workloads()
        .into_iter()
        .filter(|w| w.name.contains(&only))
        .collect()
}

fn backing_bytes(size: u64) -> Vec<u8> {
    // Shorter than the disk: past its end the guest reads zeros.
    (0..size - 8192).map(|i| (i % 253) as u8 + 1).collect()
}

/// Creates the image for `w` and returns the guest, opened on fresh fault files.
async fn start(w: &Workload, lazy: bool) -> Guest {
    let mut o = (w.create)();
    o.lazy_refcounts = lazy;
    let backing = w.backing.then(|| backing_bytes(o.size));
    if w.backing {
        // Recorded in the header; the bytes are handed to the open directly.
        o.backing_file = Some("backing.raw".into());
        o.backing_format = Some(BackingFormat::Raw);
    }
    let mem = Arc::new(MemFile::new());
    Image::format_file(mem.clone(), &o).await.unwrap();
    let qcow = FaultFile::new(mem.snapshot());
    let data = w
        .data_file
        .then(|| qcow.sibling(vec![0u8; o.size as usize]));
    let mut disk = vec![0u8; o.size as usize];
    if let Some(b) = &backing {
        disk[..b.len()].copy_from_slice(b);
    }
    let mut g = Guest {
        img: None,
        qcow,
        data,
        backing,
        disk,
        snapshots: Vec::new(),
        ops: Vec::new(),
        durable: Vec::new(),
    };
    // The fresh files are durable as they are.
    g.durable_point().await.unwrap();
    g.open().await.unwrap();
    g
}

/// Runs the workload to completion (then closes the image), returning the recording.
async fn record(w: &Workload, lazy: bool) -> Guest {
    let mut g = start(w, lazy).await;
    (w.steps)(&mut g)
        .await
        .unwrap_or_else(|e| panic!("{}: workload failed without faults: {e}", w.name));
    g.close().await.unwrap();
    g
}

/// Crash points to examine: all in long mode; otherwise the ones around flushes (where
/// ordering matters most) plus some others, sampled with a fixed seed.
fn crash_points(g: &Guest, seed: u64, budget: usize) -> Vec<usize> {
    let total = g.events();
    if long_mode() || total < budget * 4 {
        return (0..=total).collect();
    }
    let log = g.qcow.log();
    let mut near: Vec<usize> = log
        .iter()
        .enumerate()
        .filter(|(_, e)| e.op.is_flush())
        .flat_map(|(i, _)| [i.saturating_sub(1), i, i + 1])
        .filter(|&i| i <= total)
        .collect();
    near.sort_unstable();
    near.dedup();
    let mut r = common::rng(seed);
    near.shuffle(&mut r);
    near.truncate(budget * 3 / 4);
    while near.len() < budget.min(total + 1) {
        let p = r.gen_range(0..=total);
        if !near.contains(&p) {
            near.push(p);
        }
    }
    if !near.contains(&total) {
        near.push(total);
    }
    near.sort_unstable();
    near
}

/// Proves properties 1–5 of the module docs for one crash state of recording `g`, where
/// power was cut before event `at`.
async fn verify(g: &Guest, at: usize, qcow: Vec<u8>, data: Option<Vec<u8>>, ctx: &str) {
    let qcow_file = Arc::new(MemFile::from_bytes(qcow));
    let data_file = data.map(|d| Arc::new(MemFile::from_bytes(d)) as Arc<dyn BlockFile>);
    let img = open_on(qcow_file.clone(), data_file, &g.backing, &open_opts())
        .await
        .unwrap_or_else(|e| panic!("{ctx}: open after the crash failed: {e}"));
    let report = img.check(None).await.unwrap();
    assert!(
        report.corruptions == 0 && report.check_errors == 0,
        "{ctx}: corrupt after the crash: {report:#?}"
    );
    assert_no_reference_to_free_clusters(&img, &qcow_file.snapshot(), ctx).await;

    // The last durable point before the crash, and the requests that may have changed
    // things since.
    let d = g
        .durable
        .iter()
        .rev()
        .find(|d| d.end <= at)
        .expect("the initial state is durable");
    let later: Vec<&GuestOp> = g.ops[d.ops_before..]
        .iter()
        .filter(|o| o.start < at)
        .collect();
    let mut now = vec![0u8; d.disk.len()];
    img.read_at(&mut now, 0).await.unwrap();
    check_bytes(&d.disk, &now, &later, ctx);
    let listed = img.list_snapshots().await.unwrap();
    for (name, content) in &d.snapshots {
        let deleted_later = later
            .iter()
            .any(|o| matches!(&o.change, Change::SnapshotDeleted(n) if n == name));
        if deleted_later {
            continue;
        }
        assert!(
            listed.iter().any(|s| &s.name == name),
            "{ctx}: snapshot {name} created before the flush is gone"
        );
        let mut buf = vec![0u8; content.len()];
        img.read_snapshot_at(name, &mut buf, 0).await.unwrap();
        assert!(buf == **content, "{ctx}: snapshot {name} reads differently");
    }
    let r = img.check(Some(RepairMode::Leaks)).await.unwrap();
    assert_eq!(r.verdict(), Verdict::Clean, "{ctx}: after repair: {r:#?}");
    img.close().await.unwrap();
}

/// Every byte equals the durable view, or a value a later request put there.
fn check_bytes(durable: &[u8], now: &[u8], later: &[&GuestOp], ctx: &str) {
    for (sector, (want, got)) in durable.chunks(512).zip(now.chunks(512)).enumerate() {
        if want == got {
            continue;
        }
        for (i, (&w, &b)) in want.iter().zip(got).enumerate() {
            if w == b {
                continue;
            }
            let pos = sector * 512 + i;
            let explained = later.iter().any(|o| match &o.change {
                Change::Data { off, len, new } => {
                    let (off, len) = (*off as usize, *len as usize);
                    (off..off + len).contains(&pos)
                        && new.as_ref().map_or(true, |n| n[pos - off] == b)
                }
                _ => false,
            });
            assert!(
                explained,
                "{ctx}: byte {pos:#x} reads {b:#04x}; the last flush promised {w:#04x} and no \
                 later request wrote that"
            );
        }
    }
}

/// Walks the active L1 and L2 tables as they are in the file (independently of `check`):
/// every table and data cluster they reference has a refcount above 0.
async fn assert_no_reference_to_free_clusters(img: &Image, file: &[u8], ctx: &str) {
    let hdr = ImageHeader::decode(&file[..file.len().min(1 << 16)], &Limits::QEMU).unwrap();
    let h = &hdr.header;
    let bits = h.cluster_bits;
    let cs = 1u64 << bits;
    let ext_data = h
        .incompatible
        .contains(qcow2_async::qcow2_format::IncompatibleFeatures::EXTERNAL_DATA_FILE);
    let fmt = L2Format {
        cluster_bits: bits,
        extended_l2: h
            .incompatible
            .contains(qcow2_async::qcow2_format::IncompatibleFeatures::EXTENDED_L2),
        external_data_file: ext_data,
        zero_flag: true,
    };
    let l1 = be64s(file, h.l1_table_offset, u64::from(h.l1_size));
    let es = if fmt.extended_l2 { 16 } else { 8 };
    for (i, raw) in l1.iter().enumerate() {
        let e = L1Entry::decode(*raw, bits).unwrap();
        let Some(l2) = e.l2_offset else { continue };
        let rc = img.refcount(l2.0 >> bits).await.unwrap();
        assert!(
            rc > 0,
            "{ctx}: L1 entry {i} points at L2 {:#x} with refcount 0",
            l2.0
        );
        let table = be64s(file, l2.0, cs / 8);
        for j in 0..(cs / es) as usize {
            let raw = table[j * (es / 8) as usize];
            let entry = if fmt.extended_l2 {
                decode_extended(raw, table[j * 2 + 1], fmt).map(|(e, _)| e)
            } else {
                L2Entry::decode(raw, fmt)
            }
            .unwrap();
            if ext_data {
                continue;
            }
            if let Some(host) = entry.host_cluster() {
                let rc = img.refcount(host.0 >> bits).await.unwrap();
                assert!(
                    rc > 0,
                    "{ctx}: L2 {:#x} index {j} points at {:#x} with refcount 0",
                    l2.0,
                    host.0
                );
            }
        }
    }
}

/// `n` big-endian u64s at `off`; past the end of the file they read as 0.
fn be64s(file: &[u8], off: u64, n: u64) -> Vec<u64> {
    (0..n)
        .map(|i| {
            let at = (off + i * 8) as usize;
            file.get(at..at + 8)
                .map_or(0, |c| u64::from_be_bytes(c.try_into().unwrap()))
        })
        .collect()
}

/// Records `w` once, then examines sampled crash points and survivor subsets.
async fn enumerate(w: &Workload, lazy: bool, budget: usize) -> (usize, usize) {
    let g = record(w, lazy).await;
    let seed = w.name.len() as u64 * 1000 + lazy as u64;
    let points = crash_points(&g, seed, budget);
    let subsets = if long_mode() { 8 } else { 4 };
    let mut states = 0;
    for &at in &points {
        for s in g.qcow.crash_states(at, subsets, seed) {
            let ctx = format!(
                "{} (lazy={lazy}) crash before event {at}/{} [{}]",
                w.name,
                g.events(),
                s.label
            );
            let qcow = s.files[g.qcow.id()].clone();
            let data = g.data.as_ref().map(|d| s.files[d.id()].clone());
            verify(&g, at, qcow, data, &ctx).await;
            states += 1;
        }
    }
    (points.len(), states)
}

/// Items 7: every workload, lazy refcounts on and off, at every sampled crash point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_crash_point_leaves_a_consistent_image_that_keeps_flushed_data() {
    for w in selected() {
        for lazy in [false, true] {
            let budget = if w.name.starts_with("refcount") {
                20
            } else {
                40
            };
            let t = std::time::Instant::now();
            let (points, states) = enumerate(&w, lazy, budget).await;
            eprintln!(
                "{} lazy={lazy}: {points} crash points, {states} crash states in {:?}",
                w.name,
                t.elapsed()
            );
        }
    }
}

fn io_errno(e: &Error) -> Option<i32> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return io.raw_os_error();
        }
        cur = err.source();
    }
    None
}

/// Item 8: a write that fails with EIO (once) or ENOSPC (from then on) reaches the caller as
/// that error; the files as they are then, and after a power cut there, pass the crash
/// checks (no reference to a free cluster, flushed data intact).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_errors_reach_the_caller_and_leave_the_image_consistent() {
    for w in selected() {
        for lazy in [false, true] {
            let clean = record(&w, lazy).await;
            let writes = clean.qcow.writes_attempted();
            let mut picks: Vec<u64> = (0..writes).collect();
            if !long_mode() {
                let mut r = common::rng(w.name.len() as u64 + lazy as u64);
                picks.shuffle(&mut r);
                picks.truncate(if w.name.starts_with("refcount") { 3 } else { 6 });
                picks.sort_unstable();
            }
            for (k, &nth) in picks.iter().enumerate() {
                let (errno, sticky) = if k % 2 == 0 {
                    (FaultErrno::Eio, false)
                } else {
                    (FaultErrno::Enospc, true)
                };
                let mut g = start(&w, lazy).await;
                g.qcow
                    .fail_writes(Some(WriteFailure { nth, errno, sticky }));
                let ctx = format!(
                    "{} (lazy={lazy}) write {nth}/{writes} fails with {errno:?}",
                    w.name
                );
                let mut result = (w.steps)(&mut g).await;
                if result.is_ok() {
                    result = g.close().await;
                }
                let err = match result {
                    Ok(()) => panic!("{ctx}: no request reported the failure"),
                    Err(e) => e,
                };
                assert!(g.qcow.failed_writes() > 0, "{ctx}");
                assert_eq!(
                    io_errno(&err),
                    Some(errno.raw()),
                    "{ctx}: the caller got {err:?}"
                );
                // A transient error: the image keeps working and is consistent.
                if !sticky {
                    if let Some(img) = &g.img {
                        img.flush().await.unwrap_or_else(|e| {
                            panic!("{ctx}: flush after a transient error failed: {e}")
                        });
                        let r = img.check(None).await.unwrap();
                        assert_eq!(r.corruptions, 0, "{ctx}: live image: {r:#?}");
                    }
                }
                let at = g.events();
                drop(g.img.take());
                for s in g.qcow.crash_states(at, 3, nth) {
                    let c = format!("{ctx}, then power cut [{}]", s.label);
                    let qcow = s.files[g.qcow.id()].clone();
                    let data = g.data.as_ref().map(|d| s.files[d.id()].clone());
                    verify(&g, at, qcow, data, &c).await;
                }
            }
        }
    }
}
