//! Engine behaviour through the public API: a model-based test over random operations, a
//! concurrent stress test, and regression tests for the bugs that sank the Go implementation.
//! QEMU-facing checks (`qemu-img check`) run here too where they prove the on-disk result.

mod common;

use std::sync::Arc;

use common::*;
use qcow2_async::io::{Aio, BlockFile, IoBuf, MemFile};
use qcow2_async::{CreateOptions, Disk, Image, OpenOptions};
use rand::Rng;

struct Case {
    extended: bool,
    cluster: u64,
    refcount_bits: u32,
    v3: bool,
    backing: bool,
    size: u64,
}

impl Case {
    /// A v3 image with 64 KiB clusters, 16-bit refcounts, no backing file, no subclusters.
    fn plain(size: u64) -> Case {
        Case {
            extended: false,
            cluster: 65536,
            refcount_bits: 16,
            v3: true,
            backing: false,
            size,
        }
    }
}

fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    for (cluster, refcount_bits, v3) in [
        (512, 16, true),
        (512, 64, true),
        (4096, 1, true),
        (4096, 16, false),
        (65536, 8, true),
        (65536, 16, true),
        (1 << 21, 16, true),
    ] {
        for backing in [false, true] {
            v.push(Case {
                extended: false,
                cluster,
                refcount_bits,
                v3,
                backing,
                size: (cluster * 40).min(64 << 20) + 1536,
            });
        }
    }
    for (cluster, backing) in [
        (65536, false),
        (65536, true),
        (16384, true),
        (1 << 21, true),
    ] {
        v.push(Case {
            extended: true,
            cluster,
            refcount_bits: 16,
            v3: true,
            backing,
            size: cluster * 20 + 1536,
        });
    }
    v
}

fn mem() -> Arc<dyn BlockFile> {
    Arc::new(MemFile::from_bytes(Vec::new()))
}

async fn make(case: &Case, file: Arc<dyn BlockFile>, backing: Option<&Disk>) -> Image {
    let mut o = CreateOptions::new(case.size);
    o.cluster_size = case.cluster;
    o.refcount_bits = case.refcount_bits;
    o.version3 = case.v3;
    o.extended_l2 = case.extended;
    if backing.is_some() {
        // The name is recorded but the backing image is handed in directly.
        o.backing_file = Some("backing.raw".into());
        o.backing_format = Some(qcow2_async::BackingFormat::Raw);
    }
    Image::format_file(file.clone(), &o).await.unwrap();
    Image::open_file(file, None, &OpenOptions::default(), backing.cloned())
        .await
        .unwrap()
}

/// Applies `op` to both the image and the model; checks reads against the model.
async fn apply(
    img: &mut Image,
    model: &mut Model,
    op: &Op,
    case: &Case,
    file: &Arc<dyn BlockFile>,
    backing: Option<&Disk>,
    backing_bytes: &[u8],
) {
    let cs = case.cluster;
    match op {
        Op::Write { off, data } => {
            // Every write path: slices, owned `Bytes`, and a gather list of three pieces.
            match off % 3 {
                0 => img.write_at(data, *off).await.unwrap(),
                1 => {
                    let buf = IoBuf::from(bytes::Bytes::from(data.clone()));
                    let back = img.write_buf(buf, *off).await.unwrap();
                    assert!(back[..] == data[..], "write_buf returns the buffer");
                }
                _ => {
                    let (a, rest) = data.split_at(data.len() / 3);
                    let (b, c) = rest.split_at(rest.len() / 2);
                    let bufs = [a, b, c].map(|p| IoBuf::from_vec(p.to_vec())).to_vec();
                    img.write_vectored(bufs, *off).await.unwrap();
                }
            }
            model.data[*off as usize..*off as usize + data.len()].copy_from_slice(data);
        }
        Op::Zeroes { off, len, unmap } => {
            img.write_zeroes(*off, *len, *unmap).await.unwrap();
            model.data[*off as usize..(*off + *len) as usize].fill(0);
        }
        Op::Discard { off, len } => {
            img.discard(*off, *len).await.unwrap();
            // Whole clusters (and the partial tail cluster when covered to the end of the
            // disk) are discarded; then v3 reads zeros, v2 falls through to the backing file.
            let mut c = off / cs * cs;
            while c < off + len {
                let e = (c + cs).min(case.size);
                if c >= *off && e <= off + len {
                    for p in c..e {
                        model.data[p as usize] = if case.v3 {
                            0
                        } else {
                            backing_bytes.get(p as usize).copied().unwrap_or(0)
                        };
                    }
                }
                c += cs;
            }
        }
        Op::Read { off, len } => {
            // Every read path: slices, an owned `BytesMut`, a scatter list, and the sparse
            // read (whose holes must read as zeros in the model, within the request).
            let buf: Vec<u8> = match (off + len) % 4 {
                3 => {
                    let buf = IoBuf::from_vec(vec![0xee; *len as usize]);
                    let (back, holes) = img.read_buf_sparse(buf, *off).await.unwrap();
                    for (i, h) in holes.iter().enumerate() {
                        assert!(*off <= h.start && h.start < h.end && h.end <= off + len);
                        assert!(i == 0 || holes[i - 1].end < h.start, "sorted, merged");
                        let r = h.start as usize..h.end as usize;
                        assert!(model.data[r].iter().all(|&b| b == 0), "hole {h:?} is data");
                    }
                    back.into_vec()
                }
                0 => {
                    let mut buf = vec![0u8; *len as usize];
                    img.read_at(&mut buf, *off).await.unwrap();
                    buf
                }
                1 => {
                    let buf = IoBuf::from(bytes::BytesMut::from(&vec![0xeeu8; *len as usize][..]));
                    let back = img.read_buf(buf, *off).await.unwrap();
                    back.into_bytes_mut().to_vec()
                }
                _ => {
                    let first = (*len as usize).min(4096);
                    let bufs = vec![
                        IoBuf::from_vec(vec![0xee; first]),
                        IoBuf::from_vec(vec![0xee; *len as usize - first]),
                    ];
                    let back = img.read_vectored(bufs, *off).await.unwrap();
                    back.iter().flat_map(|b| b.iter().copied()).collect()
                }
            };
            assert!(
                buf == model.data[*off as usize..(*off + *len) as usize],
                "read {off:#x}+{len:#x} differs from the model"
            );
        }
        Op::Flush => img.flush().await.unwrap(),
        Op::Reopen => {
            img.clone().close().await.unwrap();
            *img = Image::open_file(
                file.clone(),
                None,
                &OpenOptions::default(),
                backing.cloned(),
            )
            .await
            .unwrap();
        }
    }
}

async fn run_model(case: &Case, seed: u64, ops: usize) {
    let mut r = rng(seed);
    let backing_bytes: Vec<u8> = if case.backing {
        // A backing file shorter than the image: past its end the guest reads zeros.
        (0..case.size - case.cluster * 2)
            .map(|i| (i % 251) as u8 + 1)
            .collect()
    } else {
        vec![]
    };
    let backing = case.backing.then(|| {
        let f: Arc<dyn BlockFile> = Arc::new(MemFile::from_bytes(backing_bytes.clone()));
        Disk::Raw(f, backing_bytes.len() as u64)
    });
    let file = mem();
    let mut img = make(case, file.clone(), backing.as_ref()).await;
    let mut model = Model::new(
        case.size as usize,
        case.backing.then_some(&backing_bytes[..]),
    );
    // Half the v3 runs track every change in a persistent bitmap of 512-byte granularity,
    // carried across every reopen; it must end up naming exactly the touched bytes' blocks.
    let tracked = case.v3 && seed % 2 == 0;
    let mut touched = vec![false; case.size.div_ceil(512) as usize];
    if tracked {
        let o = {
            let mut o = qcow2_async::BitmapOptions::default();
            o.granularity = Some(512);
            o.disabled = false;
            o
        };
        img.add_bitmap("m", &o).await.unwrap();
    }
    for _ in 0..ops {
        if r.gen_ratio(1, 8) {
            let (off, data) = compressible_cluster(&mut r, case);
            img.write_compressed(off, &data).await.unwrap();
            model.data[off as usize..off as usize + data.len()].copy_from_slice(&data);
            touched[(off / 512) as usize..=((off + data.len() as u64 - 1) / 512) as usize]
                .fill(true);
            continue;
        }
        let op = random_op(&mut r, case.size, case.cluster);
        let range = match &op {
            Op::Write { off, data } => Some((*off, data.len() as u64)),
            Op::Zeroes { off, len, .. } | Op::Discard { off, len } => Some((*off, *len)),
            _ => None,
        };
        if let Some((off, len)) = range {
            touched[(off / 512) as usize..=((off + len - 1) / 512) as usize].fill(true);
        }
        apply(
            &mut img,
            &mut model,
            &op,
            case,
            &file,
            backing.as_ref(),
            &backing_bytes,
        )
        .await;
    }
    img.flush().await.unwrap();
    let mut all = vec![0u8; case.size as usize];
    img.read_at(&mut all, 0).await.unwrap();
    assert!(all == model.data, "final image differs from the model");
    if tracked {
        let mut want: Vec<std::ops::Range<u64>> = Vec::new();
        for (i, _) in touched.iter().enumerate().filter(|(_, t)| **t) {
            let (s, e) = (i as u64 * 512, ((i as u64 + 1) * 512).min(case.size));
            match want.last_mut() {
                Some(r) if r.end == s => r.end = e,
                _ => want.push(s..e),
            }
        }
        let got = img.dirty_ranges("m", 0..case.size).await.unwrap();
        assert_eq!(got, want, "the bitmap names exactly the touched blocks");
    }
    // Refcounts match the references: compressed payloads sharing a host cluster count once
    // per compressed cluster, released payloads were dropped exactly once.
    img.clone().close().await.unwrap();
    let report = img.check(None).await.unwrap();
    assert_eq!(report.exit_code(), 0, "{:?}", report.messages);
}

/// One whole cluster (or the partial last one) for `write_compressed`: mostly compressible
/// runs, sometimes noise, which falls back to a normal write.
fn compressible_cluster(r: &mut rand::rngs::SmallRng, case: &Case) -> (u64, Vec<u8>) {
    let cs = case.cluster;
    let gc = r.gen_range(0..case.size.div_ceil(cs));
    let off = gc * cs;
    let len = cs.min(case.size - off) as usize;
    let data = if r.gen_ratio(1, 5) {
        (0..len).map(|_| r.gen()).collect()
    } else {
        let (seed, run): (u8, usize) = (r.gen(), r.gen_range(1..200));
        (0..len)
            .map(|i| seed.wrapping_add((i / run) as u8))
            .collect()
    };
    (off, data)
}

/// Random write / compressed write / write-zeroes / discard / read / flush / reopen sequences
/// against a model, over cluster sizes, refcount widths, v2 and v3, with and without a
/// backing file; the image is check-clean at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_random_operations_match() {
    for (i, case) in cases().iter().enumerate() {
        for seed in 0..3 {
            run_model(case, seed * 100 + i as u64, 120).await;
        }
    }
}

/// The discard model above treats the image tail specially; this pins the rule it encodes.
#[tokio::test]
async fn discard_of_a_partial_cluster_changes_nothing() {
    let case = Case::plain(1 << 20);
    let img = make(&case, mem(), None).await;
    img.write_at(&[7u8; 65536], 0).await.unwrap();
    img.discard(512, 65536 - 1024).await.unwrap();
    let mut b = vec![0u8; 65536];
    img.read_at(&mut b, 0).await.unwrap();
    assert!(b.iter().all(|&x| x == 7));
    img.discard(0, 65536).await.unwrap();
    img.read_at(&mut b, 0).await.unwrap();
    assert!(b.iter().all(|&x| x == 0));
}

/// Regression (Go implementation): two writers to one unallocated cluster both allocated;
/// one write was lost and a cluster leaked. Here they allocate once and both land.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_writers_on_one_unallocated_cluster_allocate_once() {
    // A real file: its I/O yields, so the two writers really interleave (an in-memory file
    // completes synchronously and would hide the race).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("race.qcow2");
    let opts = {
        let mut o = OpenOptions::default();
        o.aio = Some(Aio::Threads);
        o
    };
    let img = Image::create(&path, &CreateOptions::new(64 << 20), &opts)
        .await
        .unwrap();
    let clusters = 256u64;
    let mut tasks = Vec::new();
    for half in 0..2u64 {
        let img = img.clone();
        tasks.push(tokio::spawn(async move {
            for c in 0..clusters {
                let off = c * 65536 + half * 32768;
                img.write_at(&[half as u8 + 1; 32768], off).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    img.flush().await.unwrap();
    for c in 0..clusters {
        let mut b = vec![0u8; 65536];
        img.read_at(&mut b, c * 65536).await.unwrap();
        assert!(
            b[..32768].iter().all(|&x| x == 1),
            "cluster {c}: first half lost"
        );
        assert!(
            b[32768..].iter().all(|&x| x == 2),
            "cluster {c}: second half lost"
        );
    }
    // header, reftable, refblock, L1, one L2 table and exactly one data cluster per guest
    // cluster: nothing leaked.
    let mut used = 0;
    for i in 0..clusters + 16 {
        used += img.refcount(i).await.unwrap();
    }
    assert_eq!(used, 5 + clusters);
    img.close().await.unwrap();
    assert_check_clean(&path);
}

/// Regression (Go implementation): writes to zero-flagged clusters stayed invisible. A
/// preallocated zero cluster we own alone (ZERO_ALLOC with COPIED) is written in place and
/// turns into a normal cluster holding the new bytes and zeros around them.
#[tokio::test]
async fn a_write_to_a_zero_alloc_cluster_is_visible() {
    let case = Case::plain(1 << 20);
    let img = make(&case, mem(), None).await;
    img.write_at(&[9u8; 65536], 0).await.unwrap();
    img.write_zeroes(0, 65536, false).await.unwrap(); // keeps the host cluster
    img.write_at(&[5u8; 4096], 8192).await.unwrap();
    let mut b = vec![1u8; 65536];
    img.read_at(&mut b, 0).await.unwrap();
    assert!(b[..8192].iter().all(|&x| x == 0));
    assert!(b[8192..12288].iter().all(|&x| x == 5));
    assert!(b[12288..].iter().all(|&x| x == 0));
}

/// Reads and writes outside the disk are typed errors, and a read-only image refuses writes.
#[tokio::test]
async fn out_of_range_and_read_only_are_refused() {
    let case = Case::plain(1 << 20);
    let file = mem();
    let img = make(&case, file.clone(), None).await;
    let mut b = [0u8; 2];
    assert!(matches!(
        img.read_at(&mut b, (1 << 20) - 1).await,
        Err(qcow2_async::Error::OutOfRange { .. })
    ));
    img.close().await.unwrap();
    let ro = Image::open_file(file, None, &OpenOptions::read_only(), None)
        .await
        .unwrap();
    assert!(matches!(
        ro.write_at(&[1], 0).await,
        Err(qcow2_async::Error::ReadOnly)
    ));
}

/// The model test again on real files through both I/O backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_on_real_files_with_both_backends() {
    for aio in [Aio::Threads, Aio::IoUring] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.qcow2");
        let size = 8 << 20;
        let opts = {
            let mut o = OpenOptions::default();
            o.aio = Some(aio);
            o
        };
        let mut o = CreateOptions::new(size);
        o.cluster_size = 4096;
        let mut img = Image::create(&path, &o, &opts).await.unwrap();
        let mut model = Model::new(size as usize, None);
        let mut r = rng(7);
        for _ in 0..300 {
            match random_op(&mut r, size, 4096) {
                Op::Reopen => {
                    // The last handle goes first: its lock would refuse the reopen.
                    img.close().await.unwrap();
                    img = Image::open(&path, &opts).await.unwrap();
                }
                Op::Write { off, data } => {
                    img.write_at(&data, off).await.unwrap();
                    model.data[off as usize..off as usize + data.len()].copy_from_slice(&data);
                }
                Op::Zeroes { off, len, unmap } => {
                    img.write_zeroes(off, len, unmap).await.unwrap();
                    model.data[off as usize..(off + len) as usize].fill(0);
                }
                Op::Discard { off, len } => {
                    // Whole clusters only: v3 without backing reads zeros there.
                    img.discard(off, len).await.unwrap();
                    let (first, end) = (off.div_ceil(4096) * 4096, (off + len) / 4096 * 4096);
                    if end > first {
                        model.data[first as usize..end as usize].fill(0);
                    }
                }
                Op::Read { off, len } => {
                    let mut b = vec![0u8; len as usize];
                    img.read_at(&mut b, off).await.unwrap();
                    assert!(
                        b == model.data[off as usize..(off + len) as usize],
                        "{aio:?}: read {off:#x}+{len:#x}"
                    );
                }
                Op::Flush => img.flush().await.unwrap(),
            }
        }
        img.close().await.unwrap();
        assert_check_clean(&path);
        let img = Image::open(&path, &OpenOptions::read_only()).await.unwrap();
        let mut all = vec![0u8; size as usize];
        img.read_at(&mut all, 0).await.unwrap();
        assert!(all == model.data, "{aio:?}: reopened image differs");
    }
}

/// ≥ 64 tasks write overlapping random ranges. Within a round every task writes the same
/// position-derived bytes, so the result is order independent and any lost write (two
/// allocations of one cluster, a write into a leaked cluster) shows up as a wrong byte.
/// Afterwards `qemu-img check` must report no leaks and no corruptions.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stress_64_tasks_overlapping_writes_stay_consistent() {
    for (aio, extended) in [
        (Aio::Threads, false),
        (Aio::IoUring, false),
        (Aio::IoUring, true),
    ] {
        stress(aio, extended).await;
    }
}

async fn stress(aio: Aio, extended: bool) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stress.qcow2");
    let size: u64 = 32 << 20;
    let mut o = CreateOptions::new(size);
    o.cluster_size = 16384;
    o.extended_l2 = extended;
    let opts = {
        let mut o = OpenOptions::default();
        o.aio = Some(aio);
        o
    };
    let img = Image::create(&path, &o, &opts).await.unwrap();
    let fill = |round: u64, pos: u64| {
        ((pos / 7).wrapping_mul(31).wrapping_add(round * 13) % 255 + 1) as u8
    };
    let mut model = vec![0u8; size as usize];
    for round in 0..3u64 {
        let mut tasks = Vec::new();
        for t in 0..64u64 {
            let img = img.clone();
            tasks.push(tokio::spawn(async move {
                let mut r = rng(round * 1000 + t);
                let mut written = Vec::new();
                for _ in 0..24 {
                    use rand::Rng;
                    // Ranges cluster around a few hot spots so that writers collide.
                    let hot = r.gen_range(0..8u64) * (size / 8);
                    let off = (hot + r.gen_range(0..(1u64 << 20))).min(size - 1);
                    let len = r.gen_range(1..=(64u64 << 10)).min(size - off);
                    let data: Vec<u8> = (off..off + len).map(|p| fill(round, p)).collect();
                    img.write_at(&data, off).await.unwrap();
                    written.push((off, len));
                }
                written
            }));
        }
        for t in tasks {
            for (off, len) in t.await.unwrap() {
                for p in off..off + len {
                    model[p as usize] = fill(round, p);
                }
            }
        }
        let mut all = vec![0u8; size as usize];
        img.read_at(&mut all, 0).await.unwrap();
        let bad = all.iter().zip(&model).position(|(a, b)| a != b);
        assert!(
            bad.is_none(),
            "{aio:?} round {round}: byte {:#x} differs",
            bad.unwrap()
        );
    }
    img.close().await.unwrap();
    assert_check_clean(&path);
}

/// Regression (Go implementation): new refcount blocks were never counted. At 512-byte
/// clusters with 64-bit refcounts one block covers only 64 clusters, so writing a few MiB
/// creates many blocks and grows the refcount table twice; every block must count itself
/// and the image must stay check-clean (reference §3.4 worked example).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refcount_growth_at_512_byte_clusters_with_64_bit_refcounts_is_check_clean() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grow.qcow2");
    let mut o = CreateOptions::new(16 << 20);
    o.cluster_size = 512;
    o.refcount_bits = 64;
    let img = Image::create(&path, &o, &OpenOptions::default())
        .await
        .unwrap();
    let chunk = vec![0x5au8; 64 << 10];
    for i in 0..48u64 {
        img.write_at(&chunk, i * chunk.len() as u64).await.unwrap();
    }
    let hdr = img.header().await;
    assert!(
        hdr.header.refcount_table_clusters > 1,
        "the refcount table grew"
    );
    // Every refcount block the table points at is counted exactly once.
    let rt_off = hdr.header.refcount_table_offset;
    img.close().await.unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let entries = hdr.header.refcount_table_clusters as usize * 512 / 8;
    let img = Image::open(&path, &OpenOptions::read_only()).await.unwrap();
    let mut blocks = 0;
    for i in 0..entries {
        let at = rt_off as usize + i * 8;
        let off = u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
        if off != 0 {
            blocks += 1;
            assert_eq!(
                img.refcount(off / 512).await.unwrap(),
                1,
                "refcount block at {off:#x}"
            );
        }
    }
    assert!(blocks > 60);
    assert_check_clean(&path);
    let mut b = vec![0u8; chunk.len()];
    img.read_at(&mut b, 47 * chunk.len() as u64).await.unwrap();
    assert!(b == chunk);
}

/// O_DIRECT (`cache=none`): unaligned guest and metadata writes become read-modify-writes of
/// whole blocks, serialised per cluster; the result matches the model and is check-clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn o_direct_images_behave_like_buffered_ones() {
    // The target folder is on a real disk (tmpfs refuses O_DIRECT).
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    for aio in [Aio::Threads, Aio::IoUring] {
        let path = dir.path().join(format!("direct-{aio:?}.qcow2"));
        let opts = {
            let mut o = OpenOptions::default();
            o.direct = true;
            o.aio = Some(aio);
            o
        };
        let size = 4u64 << 20;
        let img = Image::create(&path, &CreateOptions::new(size), &opts)
            .await
            .unwrap();
        let mut model = vec![0u8; size as usize];
        let mut tasks = Vec::new();
        for t in 0..16u64 {
            let img = img.clone();
            tasks.push(tokio::spawn(async move {
                // Unaligned, overlapping-cluster but disjoint-byte writes from many tasks.
                for i in 0..20u64 {
                    let off = (i * 16 + t) * 977;
                    img.write_at(&[t as u8 + 1; 900], off).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        for t in 0..16u64 {
            for i in 0..20u64 {
                let off = ((i * 16 + t) * 977) as usize;
                model[off..off + 900].fill(t as u8 + 1);
            }
        }
        img.close().await.unwrap();
        let img = Image::open(&path, &opts).await.unwrap();
        let mut all = vec![0u8; size as usize];
        img.read_at(&mut all, 0).await.unwrap();
        assert!(
            all == model,
            "{aio:?}: O_DIRECT image differs from the model"
        );
        img.close().await.unwrap();
        assert_check_clean(&path);
    }
}

#[derive(Debug)]
struct SlowWrites(Arc<dyn BlockFile>);

impl BlockFile for SlowWrites {
    fn read_at(
        &self,
        buf: qcow2_async::io::IoBuf,
        off: u64,
    ) -> qcow2_async::io::IoFuture<'_, qcow2_async::io::IoBuf> {
        self.0.read_at(buf, off)
    }
    fn write_at(
        &self,
        buf: qcow2_async::io::IoBuf,
        off: u64,
    ) -> qcow2_async::io::IoFuture<'_, qcow2_async::io::IoBuf> {
        Box::pin(async move {
            // Only the 4 KiB in-place guest writes (metadata and COW writes are whole
            // clusters or small entries), long enough to outlast a snapshot's creation.
            if buf.len() == 4096 {
                tokio::time::sleep(std::time::Duration::from_millis(30)).await;
            }
            self.0.write_at(buf, off).await
        })
    }
    fn flush(&self) -> qcow2_async::io::IoFuture<'_, ()> {
        self.0.flush()
    }
    fn len(&self) -> qcow2_async::io::IoFuture<'_, u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> qcow2_async::io::IoFuture<'_, ()> {
        self.0.set_len(len)
    }
    fn allocate(&self, o: u64, l: u64) -> qcow2_async::io::IoFuture<'_, ()> {
        self.0.allocate(o, l)
    }
    fn punch_hole(&self, o: u64, l: u64) -> qcow2_async::io::IoFuture<'_, ()> {
        self.0.punch_hole(o, l)
    }
    fn zero_range(&self, o: u64, l: u64) -> qcow2_async::io::IoFuture<'_, ()> {
        self.0.zero_range(o, l)
    }
    fn holes(&self, o: u64, l: u64) -> qcow2_async::io::IoFuture<'_, Vec<(u64, u64)>> {
        self.0.holes(o, l)
    }
    fn allocated_bytes(&self) -> qcow2_async::io::IoFuture<'_, u64> {
        self.0.allocated_bytes()
    }
    fn alignment(&self) -> usize {
        self.0.alignment()
    }
}

/// ≥ 32 writers hammer the image while snapshots are created, read and deleted. Each
/// snapshot holds, for every block, a version no older than the last write that completed
/// before `create_snapshot` began and no newer than the last write that started before it
/// returned. The image ends check-clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshots_are_consistent_under_concurrent_writers() {
    use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
    use std::sync::Mutex;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snaps.qcow2");
    const BLOCK: u64 = 4096;
    const BLOCKS: u64 = 2048;
    const TASKS: u64 = 32;
    Image::create(
        &path,
        &CreateOptions::new(BLOCK * BLOCKS),
        &OpenOptions::default(),
    )
    .await
    .unwrap()
    .close()
    .await
    .unwrap();
    // Slow writes keep guest writes in flight while snapshots are taken, so a snapshot
    // that did not wait for them would change after it was taken.
    let file = qcow2_async::io::open_file(&path, &Default::default()).unwrap();
    let slow: Arc<dyn BlockFile> = Arc::new(SlowWrites(file));
    let img = Image::open_file(slow, None, &OpenOptions::default(), None)
        .await
        .unwrap();
    let clock = Arc::new(AtomicU64::new(1));
    // Per block: (version, start tick, end tick) of every write, in order.
    let log = Arc::new(Mutex::new(vec![
        Vec::<(u32, u64, u64)>::new();
        BLOCKS as usize
    ]));
    let content = |block: u64, version: u32| -> Vec<u8> {
        (0..BLOCK)
            .map(|i| ((block as u32 * 7 + version * 13 + i as u32 / 512) % 251) as u8 + 1)
            .collect()
    };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for t in 0..TASKS {
        let (img, clock, log, stop) = (img.clone(), clock.clone(), log.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut r = rng(t);
            while !stop.load(SeqCst) {
                use rand::Rng;
                let block = r.gen_range(0..BLOCKS / TASKS) * TASKS + t;
                let version = log.lock().unwrap()[block as usize].len() as u32 + 1;
                let start = clock.fetch_add(1, SeqCst);
                img.write_at(&content(block, version), block * BLOCK)
                    .await
                    .unwrap();
                let end = clock.fetch_add(1, SeqCst);
                log.lock().unwrap()[block as usize].push((version, start, end));
            }
        }));
    }
    let mut snaps = Vec::new();
    for i in 0..6 {
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        let s0 = clock.fetch_add(1, SeqCst);
        let info = img.create_snapshot(&format!("s{i}")).await.unwrap();
        let s1 = clock.fetch_add(1, SeqCst);
        // Read it at once, while writers run: a later read must see exactly the same.
        let mut first = vec![0u8; (BLOCK * BLOCKS) as usize];
        img.read_snapshot_at(&info.id, &mut first, 0).await.unwrap();
        snaps.push((info.id, s0, s1, first));
        if i == 3 {
            // Delete one while the writers keep going.
            img.delete_snapshot(&snaps.remove(1).0).await.unwrap();
        }
    }
    stop.store(true, SeqCst);
    for w in writers {
        w.await.unwrap();
    }
    let log = log.lock().unwrap().clone();
    let total: usize = log.iter().map(|w| w.len()).sum();
    let during = snaps.last().unwrap().2;
    assert!(
        log.iter().flatten().filter(|w| w.1 < during).count() > 100 && total > 300,
        "writers ran alongside the snapshots ({total} writes)"
    );
    for (id, s0, s1, first) in &snaps {
        let mut buf = vec![0u8; (BLOCK * BLOCKS) as usize];
        img.read_snapshot_at(id, &mut buf, 0).await.unwrap();
        assert!(&buf == first, "snapshot {id} changed after it was taken");
        for b in 0..BLOCKS {
            let got = &buf[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize];
            let writes = &log[b as usize];
            let lo = writes
                .iter()
                .filter(|w| w.2 < *s0)
                .map(|w| w.0)
                .max()
                .unwrap_or(0);
            let hi = writes
                .iter()
                .filter(|w| w.1 < *s1)
                .map(|w| w.0)
                .max()
                .unwrap_or(0);
            let ok = (lo..=hi).any(|v| {
                if v == 0 {
                    got.iter().all(|&x| x == 0)
                } else {
                    got == content(b, v)
                }
            });
            assert!(ok, "snapshot {id}, block {b}: not a version in {lo}..={hi}");
        }
    }
    assert_eq!(img.list_snapshots().await.unwrap().len(), 5);
    img.close().await.unwrap();
    assert_check_clean(&path);
}

/// Regression (Go implementation): extended-L2 images were written with standard entries.
/// Here a 4 KiB write allocates the cluster once and sets exactly the two 2 KiB subclusters
/// it covers, like QEMU (reference §2.4: entry 0x8000000000050000, bitmap 0x3).
#[tokio::test]
async fn extended_l2_writes_set_subcluster_bitmaps_not_standard_entries() {
    let file = mem();
    let mut o = CreateOptions::new(1 << 30);
    o.extended_l2 = true;
    Image::format_file(file.clone(), &o).await.unwrap();
    let img = Image::open_file(file.clone(), None, &OpenOptions::default(), None)
        .await
        .unwrap();
    img.write_at(&[0xee; 4096], 0).await.unwrap();
    img.write_zeroes(8192, 2048, false).await.unwrap();
    img.close().await.unwrap();
    let mut bytes = vec![0u8; 1 << 20];
    let b = file
        .read_at(qcow2_async::io::IoBuf::zeroed(1 << 20, 1), 0)
        .await
        .unwrap();
    bytes.copy_from_slice(&b);
    let l1 = u64::from_be_bytes(bytes[40..48].try_into().unwrap()) as usize;
    let l2 = (u64::from_be_bytes(bytes[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00)
        as usize;
    let entry = u64::from_be_bytes(bytes[l2..l2 + 8].try_into().unwrap());
    let bitmap = u64::from_be_bytes(bytes[l2 + 8..l2 + 16].try_into().unwrap());
    assert_eq!(entry >> 63, 1, "COPIED");
    assert_eq!(
        bitmap, 0x0000_0010_0000_0003,
        "subclusters 0 and 1 allocated, 4 zero"
    );
}

/// The point of subclusters: a 4 KiB allocating write over a backing file writes 4 KiB of
/// data, not a 64 KiB cluster (measured by the file's write counter before any metadata is
/// written back).
#[tokio::test]
async fn extended_l2_small_writes_over_a_backing_file_copy_no_whole_cluster() {
    for extended in [true, false] {
        let backing: Arc<dyn BlockFile> = Arc::new(MemFile::from_bytes(vec![7u8; 8 << 20]));
        let file = Arc::new(MemFile::from_bytes(Vec::new()));
        let mut o = CreateOptions::new(8 << 20);
        o.extended_l2 = extended;
        o.backing_file = Some("b.raw".into());
        o.backing_format = Some(qcow2_async::BackingFormat::Raw);
        let dynfile: Arc<dyn BlockFile> = file.clone();
        Image::format_file(dynfile.clone(), &o).await.unwrap();
        let img = Image::open_file(
            dynfile,
            None,
            &OpenOptions::default(),
            Some(Disk::Raw(backing, 8 << 20)),
        )
        .await
        .unwrap();
        let before = file.bytes_written();
        let n = 64u64;
        for i in 0..n {
            img.write_at(&[1; 4096], i * 65536 + 8192).await.unwrap();
        }
        let per_write = (file.bytes_written() - before) / n;
        if extended {
            assert!(
                per_write <= 8192,
                "extended L2: {per_write} bytes per 4 KiB write"
            );
        } else {
            assert_eq!(per_write, 65536, "standard L2 copies the whole cluster");
        }
        let mut b = vec![0u8; 65536];
        img.read_at(&mut b, 65536).await.unwrap();
        assert!(
            b[..8192].iter().all(|&x| x == 7)
                && b[8192..12288].iter().all(|&x| x == 1)
                && b[12288..].iter().all(|&x| x == 7)
        );
    }
}

/// Invariant 6 (the Go implementation's bitmaps went stale on the first write): every write,
/// write-zeroes and discard lands in each enabled bitmap, across a clean close; and a handle
/// that goes away without closing leaves the bitmaps flagged in use, never stale-but-trusted.
#[tokio::test]
async fn enabled_bitmaps_record_every_write_and_never_go_stale() {
    use qcow2_async::BitmapOptions;
    let file = mem();
    let mut o = CreateOptions::new(16 << 20);
    o.cluster_size = 65536;
    Image::format_file(file.clone(), &o).await.unwrap();
    let rw = OpenOptions::default();
    let open = || Image::open_file(file.clone(), None, &rw, None);
    let img = open().await.unwrap();
    img.add_bitmap("on", &BitmapOptions::default())
        .await
        .unwrap();
    let off = {
        let mut o = BitmapOptions::default();
        o.granularity = None;
        o.disabled = true;
        o
    };
    img.add_bitmap("off", &off).await.unwrap();
    img.write_at(&[1; 10], 65536 * 3 + 7).await.unwrap();
    img.write_zeroes(65536 * 5, 65536, true).await.unwrap();
    img.discard(65536 * 9, 65536).await.unwrap();
    img.close().await.unwrap();

    let img = open().await.unwrap();
    let all = 0..16 << 20;
    let c = |i: u64| i * 65536..(i + 1) * 65536;
    assert_eq!(
        img.dirty_ranges("on", all.clone()).await.unwrap(),
        vec![c(3), c(5), c(9)]
    );
    assert!(img
        .dirty_ranges("off", all.clone())
        .await
        .unwrap()
        .is_empty());
    // Another write, then the handle is dropped without close (a crash).
    img.write_at(&[2; 1], 65536 * 12).await.unwrap();
    img.flush().await.unwrap();
    drop(img);
    let img = Image::open_file(file.clone(), None, &OpenOptions::read_only(), None)
        .await
        .unwrap();
    let list = img.bitmaps().await;
    assert!(list.iter().all(|b| b.inconsistent), "{list:?}");
    assert!(img.dirty_ranges("on", all).await.is_err());
}

/// Reading a compressed cluster in small sequential pieces decompresses it once: the
/// payload is read from the file for the first piece only, then served from the cache of
/// decompressed clusters. A rewrite of the cluster is seen at once.
#[tokio::test]
async fn sequential_reads_of_a_compressed_cluster_decompress_it_once() {
    let case = Case::plain(1 << 20);
    let mem = Arc::new(MemFile::new());
    let img = make(&case, mem.clone(), None).await;
    let data: Vec<u8> = (0..65536u32).map(|i| (i / 300) as u8).collect();
    img.write_compressed(65536, &data).await.unwrap();
    img.write_compressed(0, &data[..]).await.unwrap();
    let before = mem.reads();
    let mut got = vec![0u8; 65536];
    for (i, c) in got.chunks_mut(4096).enumerate() {
        img.read_at(c, 65536 + i as u64 * 4096).await.unwrap();
    }
    assert_eq!(got, data);
    assert_eq!(mem.reads() - before, 1, "one payload read for 16 pieces");
    img.write_at(&[0xff; 100], 65536 + 50).await.unwrap();
    let mut b = [0u8; 200];
    img.read_at(&mut b, 65536).await.unwrap();
    assert_eq!(&b[..50], &data[..50]);
    assert!(b[50..150].iter().all(|&x| x == 0xff));
    assert_eq!(&b[150..], &data[150..200]);
}

/// A write covering several whole clusters allocates them together: the fresh ones of one
/// request are contiguous on the host and written once, while clusters in other states
/// (compressed, shared with a snapshot, zero with a cluster of their own, allocated) keep
/// their own semantics, and the image stays check-clean and reads back what was written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_cluster_writes_allocate_contiguously_over_any_cluster_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.qcow2");
    let cs = 65536u64;
    let mut o = CreateOptions::new(16 << 20);
    o.cluster_size = cs;
    let img = Image::create(&path, &o, &OpenOptions::default())
        .await
        .unwrap();
    // Clusters 0..16 fresh, in one request.
    img.write_at(&vec![1u8; 16 * cs as usize], 0).await.unwrap();
    let map = img.map(0, 16 * cs).await.unwrap();
    assert_eq!(map.len(), 1, "one contiguous host extent: {map:?}");
    // Cluster 20 compressed, 21 allocated, 22 zero-alloc, 23 shared with a snapshot, 24
    // unallocated; then one request over 19..26 (partial at both ends).
    img.write_compressed(20 * cs, &vec![2u8; cs as usize])
        .await
        .unwrap();
    img.write_at(&vec![3u8; cs as usize], 21 * cs)
        .await
        .unwrap();
    img.write_at(&vec![4u8; cs as usize], 22 * cs)
        .await
        .unwrap();
    img.write_zeroes(22 * cs, cs, false).await.unwrap();
    img.write_at(&vec![5u8; cs as usize], 23 * cs)
        .await
        .unwrap();
    img.create_snapshot("s").await.unwrap();
    let (off, len) = (19 * cs + 100, 6 * cs);
    img.write_at(&vec![6u8; len as usize], off).await.unwrap();
    let mut all = vec![0u8; (28 * cs) as usize];
    img.read_at(&mut all, 0).await.unwrap();
    for (i, &b) in all.iter().enumerate() {
        let i = i as u64;
        let want = if i < 16 * cs {
            1
        } else if (off..off + len).contains(&i) {
            6
        } else {
            0
        };
        assert_eq!(b, want, "byte {i:#x}");
    }
    img.close().await.unwrap();
    assert_check_clean(&path);
    // The snapshot still sees cluster 23's old contents.
    let img = Image::open(&path, &OpenOptions::default()).await.unwrap();
    img.apply_snapshot("s").await.unwrap();
    let mut c = vec![0u8; cs as usize];
    img.read_at(&mut c, 23 * cs).await.unwrap();
    assert!(c.iter().all(|&b| b == 5));
    img.close().await.unwrap();
    assert_check_clean(&path);
}

/// A file that can hold its next read or its next flush pending until released, to show
/// which requests wait for an operation in progress.
#[derive(Debug)]
struct GateFile {
    inner: Arc<dyn BlockFile>,
    hold_read: std::sync::atomic::AtomicBool,
    hold_flush: std::sync::atomic::AtomicBool,
    /// Signalled when an operation is being held.
    holding: tokio::sync::Notify,
    release: tokio::sync::Semaphore,
}

impl GateFile {
    fn new(inner: Arc<dyn BlockFile>) -> Arc<GateFile> {
        Arc::new(GateFile {
            inner,
            hold_read: false.into(),
            hold_flush: false.into(),
            holding: tokio::sync::Notify::new(),
            release: tokio::sync::Semaphore::new(0),
        })
    }

    /// Waits while `armed` was set, after telling the test it is holding.
    async fn gate(&self, armed: &std::sync::atomic::AtomicBool) {
        if armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            self.holding.notify_one();
            self.release.acquire().await.unwrap().forget();
        }
    }
}

impl BlockFile for GateFile {
    fn read_at(
        &self,
        buf: qcow2_async::io::IoBuf,
        off: u64,
    ) -> qcow2_async::io::IoFuture<'_, qcow2_async::io::IoBuf> {
        Box::pin(async move {
            self.gate(&self.hold_read).await;
            self.inner.read_at(buf, off).await
        })
    }
    fn write_at(
        &self,
        buf: qcow2_async::io::IoBuf,
        off: u64,
    ) -> qcow2_async::io::IoFuture<'_, qcow2_async::io::IoBuf> {
        self.inner.write_at(buf, off)
    }
    fn flush(&self) -> qcow2_async::io::IoFuture<'_, ()> {
        Box::pin(async move {
            self.gate(&self.hold_flush).await;
            self.inner.flush().await
        })
    }
    fn len(&self) -> qcow2_async::io::IoFuture<'_, u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> qcow2_async::io::IoFuture<'_, ()> {
        self.inner.set_len(len)
    }
    fn allocate(&self, o: u64, l: u64) -> qcow2_async::io::IoFuture<'_, ()> {
        self.inner.allocate(o, l)
    }
    fn punch_hole(&self, o: u64, l: u64) -> qcow2_async::io::IoFuture<'_, ()> {
        self.inner.punch_hole(o, l)
    }
    fn zero_range(&self, o: u64, l: u64) -> qcow2_async::io::IoFuture<'_, ()> {
        self.inner.zero_range(o, l)
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

/// A 4 GiB image holding 1s at 0 and 2s at 3 GiB, two clusters whose L2 tables differ (one
/// table maps 512 MiB at 64 KiB clusters), reopened on a `GateFile` with nothing cached.
async fn two_tables_behind_a_gate() -> (Arc<dyn BlockFile>, Arc<GateFile>, Image) {
    const GIB: u64 = 1 << 30;
    let mem = mem();
    Image::format_file(mem.clone(), &CreateOptions::new(4 * GIB))
        .await
        .unwrap();
    let img = Image::open_file(mem.clone(), None, &OpenOptions::default(), None)
        .await
        .unwrap();
    img.write_at(&[1; 4096], 0).await.unwrap();
    img.write_at(&[2; 4096], 3 * GIB).await.unwrap();
    img.close().await.unwrap();
    let gate = GateFile::new(mem.clone());
    let img = Image::open_file(gate.clone(), None, &OpenOptions::default(), None)
        .await
        .unwrap();
    (mem, gate, img)
}

/// Invariant 11: a lookup of a cached mapping takes no lock that an L2 load or a write-back
/// holds. While the load of another L2 table is held pending, and again while a flush's
/// write-back is held in its sync, reads of a cached cluster and overwrites of an allocated
/// one complete; the held operations then finish and the data is right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_reads_and_overwrites_do_not_wait_for_metadata_io() {
    use std::time::Duration;
    const GIB: u64 = 1 << 30;
    let (mem, gate, img) = two_tables_behind_a_gate().await;
    let mut buf = vec![0u8; 4096];
    img.read_at(&mut buf, 0).await.unwrap(); // caches the first table
    let quick = Duration::from_secs(10);

    // 1. The second table's load is held.
    gate.hold_read
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let held = gate.holding.notified();
    let miss = {
        let img = img.clone();
        tokio::spawn(async move {
            let mut b = vec![0u8; 4096];
            img.read_at(&mut b, 3 * GIB).await.unwrap();
            b
        })
    };
    tokio::time::timeout(quick, held)
        .await
        .expect("the L2 load is held");
    tokio::time::timeout(quick, img.read_at(&mut buf, 0))
        .await
        .expect("a cached read waited for another table's load")
        .unwrap();
    assert_eq!(buf, [1; 4096]);
    tokio::time::timeout(quick, img.write_at(&[3; 4096], 4096))
        .await
        .expect("an overwrite waited for another table's load")
        .unwrap();
    gate.release.add_permits(1);
    assert_eq!(miss.await.unwrap(), vec![2; 4096]);

    // 2. A flush is held in its write-back (a new cluster makes an L2 table dirty).
    img.write_at(&[4; 4096], GIB).await.unwrap();
    gate.hold_flush
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let held = gate.holding.notified();
    let flush = {
        let img = img.clone();
        tokio::spawn(async move { img.flush().await })
    };
    tokio::time::timeout(quick, held)
        .await
        .expect("the flush is held");
    tokio::time::timeout(quick, img.read_at(&mut buf, 0))
        .await
        .expect("a cached read waited for a write-back")
        .unwrap();
    tokio::time::timeout(quick, img.write_at(&[5; 4096], 0))
        .await
        .expect("an overwrite waited for a write-back")
        .unwrap();
    gate.release.add_permits(1);
    flush.await.unwrap().unwrap();

    let mut all = vec![0u8; 8192];
    img.read_at(&mut all, 0).await.unwrap();
    assert_eq!(&all[..4096], &[5; 4096]);
    assert_eq!(&all[4096..], &[3; 4096]);
    img.read_at(&mut buf, GIB).await.unwrap();
    assert_eq!(buf, [4; 4096]);
    img.close().await.unwrap();
    let img = Image::open_file(mem, None, &OpenOptions::default(), None)
        .await
        .unwrap();
    let report = img.check(None).await.unwrap();
    assert_eq!(report.verdict(), qcow2_async::Verdict::Clean, "{report:?}");
    img.close().await.unwrap();
}

/// Remembers the address of every buffer handed to it, to prove what reaches the file.
#[derive(Debug)]
struct AddressFile {
    inner: Arc<dyn BlockFile>,
    seen: std::sync::Mutex<Vec<usize>>,
}

impl BlockFile for AddressFile {
    fn read_at(&self, buf: IoBuf, off: u64) -> qcow2_async::io::IoFuture<'_, IoBuf> {
        self.seen.lock().unwrap().push(buf.as_ptr() as usize);
        self.inner.read_at(buf, off)
    }
    fn write_at(&self, buf: IoBuf, off: u64) -> qcow2_async::io::IoFuture<'_, IoBuf> {
        self.seen.lock().unwrap().push(buf.as_ptr() as usize);
        self.inner.write_at(buf, off)
    }
    fn read_vectored_at(
        &self,
        bufs: Vec<IoBuf>,
        off: u64,
    ) -> qcow2_async::io::IoFuture<'_, Vec<IoBuf>> {
        self.seen
            .lock()
            .unwrap()
            .extend(bufs.iter().map(|b| b.as_ptr() as usize));
        self.inner.read_vectored_at(bufs, off)
    }
    fn write_vectored_at(
        &self,
        bufs: Vec<IoBuf>,
        off: u64,
    ) -> qcow2_async::io::IoFuture<'_, Vec<IoBuf>> {
        self.seen
            .lock()
            .unwrap()
            .extend(bufs.iter().map(|b| b.as_ptr() as usize));
        self.inner.write_vectored_at(bufs, off)
    }
    fn flush(&self) -> qcow2_async::io::IoFuture<'_, ()> {
        self.inner.flush()
    }
    fn len(&self) -> qcow2_async::io::IoFuture<'_, u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> qcow2_async::io::IoFuture<'_, ()> {
        self.inner.set_len(len)
    }
    fn allocate(&self, off: u64, len: u64) -> qcow2_async::io::IoFuture<'_, ()> {
        self.inner.allocate(off, len)
    }
    fn punch_hole(&self, off: u64, len: u64) -> qcow2_async::io::IoFuture<'_, ()> {
        self.inner.punch_hole(off, len)
    }
    fn zero_range(&self, off: u64, len: u64) -> qcow2_async::io::IoFuture<'_, ()> {
        self.inner.zero_range(off, len)
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

/// Owned buffers reach the file as they are on the mapped path: a `BytesMut` read, a `Bytes`
/// overwrite, and both halves of a vectored request hand the caller's own memory over (no
/// bounce buffer, no copy), on a buffered and on an O_DIRECT image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owned_buffers_reach_the_file_without_a_copy() {
    let record = Arc::new(AddressFile {
        inner: mem(),
        seen: Default::default(),
    });
    let file: Arc<dyn BlockFile> = record.clone();
    let mut o = CreateOptions::new(4 << 20);
    o.cluster_size = 65536;
    Image::format_file(file.clone(), &o).await.unwrap();
    let img = Image::open_file(file, None, &OpenOptions::default(), None)
        .await
        .unwrap();
    img.write_at(&vec![1u8; 65536], 65536).await.unwrap();
    let reached = |p: *const u8| record.seen.lock().unwrap().contains(&(p as usize));

    let buf = IoBuf::from(bytes::BytesMut::from(&[0u8; 4096][..]));
    let p = buf.as_ptr();
    let back = img.read_buf(buf, 65536 + 8192).await.unwrap();
    assert!(back.iter().all(|&b| b == 1));
    assert!(reached(p), "read_buf bounced the caller's buffer");

    let data = bytes::Bytes::from(vec![2u8; 4096]);
    let p = data.as_ptr();
    img.write_buf(IoBuf::from(data), 65536 + 4096)
        .await
        .unwrap();
    assert!(reached(p), "write_buf copied the caller's Bytes");

    let segs = vec![
        IoBuf::from_vec(vec![3u8; 512]),
        IoBuf::from_vec(vec![4u8; 1536]),
    ];
    let ps: Vec<_> = segs.iter().map(|b| b.as_ptr()).collect();
    img.write_vectored(segs, 65536).await.unwrap();
    assert!(
        ps.iter().all(|&p| reached(p)),
        "write_vectored copied a segment"
    );
    let segs = vec![
        IoBuf::from_vec(vec![0u8; 1000]),
        IoBuf::from_vec(vec![0u8; 1048]),
    ];
    let ps: Vec<_> = segs.iter().map(|b| b.as_ptr()).collect();
    let back = img.read_vectored(segs, 65536).await.unwrap();
    assert!(
        ps.iter().all(|&p| reached(p)),
        "read_vectored bounced a segment"
    );
    let flat: Vec<u8> = back.iter().flat_map(|b| b.iter().copied()).collect();
    assert!(flat[..512].iter().all(|&b| b == 3) && flat[512..].iter().all(|&b| b == 4));

    // A run of whole clusters that allocates: the caller's buffer is the one written.
    let data = bytes::Bytes::from(vec![5u8; 4 * 65536]);
    let p = data.as_ptr();
    let back = img.write_buf(IoBuf::from(data), 1 << 20).await.unwrap();
    assert_eq!(back.as_ptr(), p, "the buffer comes back");
    assert!(reached(p), "write_buf copied a run of whole clusters");
    let mut run = vec![0u8; 4 * 65536 + 4096];
    img.read_at(&mut run, (1 << 20) - 4096).await.unwrap();
    assert!(run[..4096].iter().all(|&b| b == 0) && run[4096..].iter().all(|&b| b == 5));
    // Over those clusters again (allocated now): written per cluster, same bytes out.
    img.write_buf(IoBuf::from_vec(vec![6u8; 2 * 65536]), 1 << 20)
        .await
        .unwrap();
    img.read_at(&mut run[..2 * 65536], 1 << 20).await.unwrap();
    assert!(run[..2 * 65536].iter().all(|&b| b == 6));
    assert_eq!(
        img.check(None).await.unwrap().verdict(),
        qcow2_async::Verdict::Clean
    );
    img.close().await.unwrap();

    // O_DIRECT: an aligned buffer goes to the kernel without the aligned bounce copy; the
    // data comes back right either way.
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("d.qcow2");
    let mut o = CreateOptions::new(4 << 20);
    o.cluster_size = 65536;
    let direct = {
        let mut o = OpenOptions::default();
        o.direct = true;
        o
    };
    let img = match Image::create(&path, &o, &direct).await {
        Ok(img) => img,
        Err(e) => return println!("skipping the O_DIRECT half: {e}"),
    };
    img.write_at(&vec![5u8; 65536], 0).await.unwrap();
    let buf = IoBuf::zeroed(8192, 4096);
    let back = img.read_buf(buf, 4096).await.unwrap();
    assert!(back.iter().all(|&b| b == 5));
    let mut w = IoBuf::zeroed(4096, 4096);
    w.fill(6);
    img.write_buf(w, 8192).await.unwrap();
    // Unaligned buffers still work, through the bounce path.
    let back = img
        .read_buf(IoBuf::from_vec(vec![0; 100]), 8192 - 50)
        .await
        .unwrap();
    assert!(back[..50].iter().all(|&b| b == 5) && back[50..].iter().all(|&b| b == 6));
    img.close().await.unwrap();
}

/// Misses of different L2 tables do not wait for each other: while the load of one table
/// is held pending, a read that needs another uncached table loads it and completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misses_of_different_tables_do_not_wait_for_each_other() {
    use std::time::Duration;
    const GIB: u64 = 1 << 30;
    let (_, gate, img) = two_tables_behind_a_gate().await;
    gate.hold_read
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let held = gate.holding.notified();
    let first = {
        let img = img.clone();
        tokio::spawn(async move {
            let mut b = vec![0u8; 4096];
            img.read_at(&mut b, 0).await.unwrap();
            b
        })
    };
    tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("the first table's load is held");
    let mut b = vec![0u8; 4096];
    tokio::time::timeout(Duration::from_secs(10), img.read_at(&mut b, 3 * GIB))
        .await
        .expect("a miss of another table waited for the held load")
        .unwrap();
    assert_eq!(b, vec![2; 4096]);
    gate.release.add_permits(1);
    assert_eq!(first.await.unwrap(), vec![1; 4096]);
    img.close().await.unwrap();
}

/// `map_snapshot` describes the snapshot as it was taken, whatever the live disk did since,
/// and refuses ranges past the snapshot's size and unknown snapshots.
#[tokio::test]
async fn map_snapshot_shows_the_snapshot_not_the_live_disk() {
    let case = Case::plain(1 << 20);
    let img = make(&case, mem(), None).await;
    img.write_at(&[7; 65536], 0).await.unwrap();
    img.write_zeroes(131072, 65536, false).await.unwrap();
    let before = img.map(0, case.size).await.unwrap();
    img.create_snapshot("s").await.unwrap();
    img.write_at(&[8; 65536], 262144).await.unwrap();
    img.discard(0, 65536).await.unwrap();
    assert_ne!(img.map(0, case.size).await.unwrap(), before);
    let snap = img.map_snapshot("s", 0, case.size).await.unwrap();
    let strip = |v: Vec<qcow2_async::MapExtent>| {
        v.into_iter()
            .map(|e| (e.start, e.length, e.data, e.zero, e.present))
            .collect::<Vec<_>>()
    };
    // Host offsets may differ (the live disk's clusters moved on); the status may not.
    assert_eq!(strip(snap), strip(before));
    assert!(img.map_snapshot("s", 1, case.size).await.is_err());
    assert!(img.map_snapshot("nope", 0, 4096).await.is_err());
    img.close().await.unwrap();
}

/// A read over clusters allocated back to back in the file is one read of the file, as QEMU
/// merges contiguous host ranges; over clusters that are not, it is still correct.
#[tokio::test]
async fn a_read_over_contiguous_clusters_is_one_file_read() {
    let case = Case::plain(1 << 20);
    let file = Arc::new(MemFile::new());
    let img = make(&case, file.clone(), None).await;
    let data: Vec<u8> = (0..262144u32).map(|i| (i % 251) as u8).collect();
    img.write_at(&data, 0).await.unwrap();
    let before = file.reads();
    let buf = IoBuf::from_vec(vec![0; 200_000]);
    let back = img.read_buf(buf, 10_000).await.unwrap();
    assert!(back[..] == data[10_000..210_000]);
    assert_eq!(file.reads() - before, 1, "four clusters, one run, one read");
    // Allocate cluster 5 before cluster 4: the run breaks, the read goes piece by piece.
    img.write_at(&[5; 65536], 5 << 16).await.unwrap();
    img.write_at(&[4; 65536], 4 << 16).await.unwrap();
    let back = img
        .read_buf(IoBuf::from_vec(vec![0; 131072]), 4 << 16)
        .await
        .unwrap();
    assert!(back[..65536].iter().all(|&b| b == 4) && back[65536..].iter().all(|&b| b == 5));
    img.close().await.unwrap();
}
