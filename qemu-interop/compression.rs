//! Compressed clusters against QEMU, both ways (reference §2.6, §2.7): images `qemu-img
//! convert -c` writes read back exactly; images the engine compresses pass `qemu-img check`
//! and `qemu-img compare`; rewrites of compressed clusters never touch the shared payload
//! cluster; compressed backing files read and copy-on-write correctly; many tasks may
//! compress at once.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;

use common::*;
use qcow2_async::io::Aio;
use qcow2_async::{BackingFormat, CheckReport, CreateOptions, Image, OpenOptions};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

const TYPES: [&str; 2] = ["zlib", "zstd"];

/// Guest data whose clusters are, in turn: incompressible noise, zeros, and three kinds of
/// compressible patterns. Returns the bytes and how many clusters are noise.
fn source(size: u64, cs: u64) -> (Vec<u8>, u64) {
    let mut x = 0x9e37_79b9u32;
    let mut noise = 0;
    let mut out = Vec::with_capacity(size as usize);
    for (i, c) in (0..size).step_by(cs as usize).enumerate() {
        let n = cs.min(size - c) as usize;
        match i % 5 {
            0 => {
                noise += 1;
                out.extend((0..n).map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                }));
            }
            1 => out.resize(out.len() + n, 0),
            k => out.extend((0..n).map(|p| ((p / (16 * k)) ^ (i * 7)) as u8 | 1)),
        }
    }
    (out, noise)
}

fn count(v: &serde_json::Value, key: &str) -> u64 {
    v.get(key).and_then(|x| x.as_u64()).unwrap_or(0)
}

/// Our check and `qemu-img check` agree on the image: clean, and the same allocation,
/// fragmentation and compression counts.
async fn assert_checks_agree(path: &Path) -> CheckReport {
    let (code, q) = qemu_check(path);
    assert_eq!(code, 0, "qemu-img check: {q:#}");
    let img = Image::open(path, &OpenOptions::read_only()).await.unwrap();
    let ours = img.check(None).await.unwrap();
    assert_eq!(ours.exit_code(), 0, "{path:?}: {:?}", ours.messages);
    let got = [
        ours.allocated_clusters,
        ours.fragmented_clusters,
        ours.compressed_clusters,
        ours.image_end_offset,
        ours.total_clusters,
    ];
    let want = [
        count(&q, "allocated-clusters"),
        count(&q, "fragmented-clusters"),
        count(&q, "compressed-clusters"),
        count(&q, "image-end-offset"),
        count(&q, "total-clusters"),
    ];
    assert_eq!(
        got, want,
        "{path:?}: [allocated, fragmented, compressed, end, total] differ from qemu-img check"
    );
    ours
}

async fn read_all(path: &Path) -> Vec<u8> {
    let img = Image::open(path, &OpenOptions::read_only()).await.unwrap();
    let mut got = vec![0u8; img.virtual_size() as usize];
    img.read_at(&mut got, 0).await.unwrap();
    got
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: size");
    let bad = got.iter().zip(want).position(|(a, b)| a != b);
    assert!(bad.is_none(), "{what}: byte {:#x} differs", bad.unwrap());
}

fn compare_equal(image: &Path, raw: &Path) {
    let out = qemu(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "raw", s(image), s(raw)],
    );
    assert!(
        out.status.success(),
        "{image:?} differs from {raw:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sizes that give each cluster size several clusters and a partial last one (QEMU
/// compresses it zero-padded).
fn size_for(cs: u64) -> u64 {
    match cs {
        512 => (512 << 10) + 512,
        65536 => (2 << 20) + 1536,
        _ => (3 * cs) + 1536,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_compressed_images_read_back_identical() {
    let dir = tempfile::tempdir().unwrap();
    for ctype in TYPES {
        for cs in [512u64, 65536, 2 << 20] {
            let size = size_for(cs);
            let (src, noise) = source(size, cs);
            let raw = dir.path().join(format!("src-{cs}.raw"));
            std::fs::write(&raw, &src).unwrap();
            let img = dir.path().join(format!("q-{ctype}-{cs}.qcow2"));
            let o = format!("cluster_size={cs},compression_type={ctype}");
            qemu_ok(
                "qemu-img",
                &["convert", "-c", "-O", "qcow2", "-o", &o, s(&raw), s(&img)],
            );
            let what = format!("{ctype}, {cs}-byte clusters");
            assert_same(&read_all(&img).await, &src, &what);
            let report = assert_checks_agree(&img).await;
            // Zero clusters are skipped, noise stays uncompressed, the rest is compressed:
            // the read above really went through both decoders.
            let clusters = size.div_ceil(cs);
            let zero = (clusters + 3) / 5;
            assert_eq!(
                report.compressed_clusters,
                clusters - zero - noise,
                "{what}"
            );
        }
    }
}

/// Compresses every cluster of `src` into a new image through the engine.
async fn compress_into(path: &Path, src: &[u8], cs: u64, zstd: bool, opts: &OpenOptions) {
    let mut o = CreateOptions::new(src.len() as u64);
    o.cluster_size = cs;
    o.zstd = zstd;
    let img = Image::create(path, &o, opts).await.unwrap();
    for off in (0..src.len() as u64).step_by(cs as usize) {
        let end = (off + cs).min(src.len() as u64);
        img.write_compressed(off, &src[off as usize..end as usize])
            .await
            .unwrap();
    }
    img.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_we_compress_pass_check_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    for ctype in TYPES {
        for cs in [512u64, 65536, 2 << 20] {
            let size = size_for(cs);
            let (src, noise) = source(size, cs);
            let raw = dir.path().join(format!("src-{cs}.raw"));
            std::fs::write(&raw, &src).unwrap();
            let ours = dir.path().join(format!("e-{ctype}-{cs}.qcow2"));
            compress_into(&ours, &src, cs, ctype == "zstd", &OpenOptions::default()).await;
            let what = format!("{ctype}, {cs}-byte clusters");
            compare_equal(&ours, &raw);
            let info = qemu_ok("qemu-img", &["info", "--output=json", s(&ours)]);
            assert!(
                info.contains(&format!("\"compression-type\": \"{ctype}\"")),
                "{what}: {info}"
            );
            let report = assert_checks_agree(&ours).await;
            // Zeros compress too (QEMU's convert skips them instead); noise does not shrink
            // and falls back to a normal cluster.
            let clusters = size.div_ceil(cs);
            assert_eq!(report.compressed_clusters, clusters - noise, "{what}");
            // Packing byte by byte: the file is about as small as QEMU's own compressed copy
            // (encoders differ, so only roughly), far below one cluster per compressed one.
            let twin = dir.path().join(format!("t-{ctype}-{cs}.qcow2"));
            let o = format!("cluster_size={cs},compression_type={ctype}");
            qemu_ok(
                "qemu-img",
                &["convert", "-c", "-O", "qcow2", "-o", &o, s(&raw), s(&twin)],
            );
            let ours_len = std::fs::metadata(&ours).unwrap().len();
            let twin_len = std::fs::metadata(&twin).unwrap().len();
            assert!(
                ours_len <= twin_len + twin_len / 4 + 4 * cs,
                "{what}: {ours_len} bytes, QEMU {twin_len}"
            );
            // QEMU reads what we wrote through its own decoders too.
            let back = dir.path().join(format!("e-{ctype}-{cs}.raw"));
            qemu_ok("qemu-img", &["convert", "-O", "raw", s(&ours), s(&back)]);
            assert_same(&std::fs::read(&back).unwrap(), &src, &what);
        }
    }
}

/// Regression: a rewrite of a compressed cluster must decompress it into a fresh cluster.
/// Writing "in place" at the descriptor's host offset would land inside a host cluster that
/// other compressed clusters share, destroying their payloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrites_of_compressed_clusters_never_touch_the_shared_payload_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let cs = 65536u64;
    for zstd in [false, true] {
        let p = dir.path().join(format!("rw-{zstd}.qcow2"));
        let size = 8 * cs;
        let mut model: Vec<u8> = (0..size).map(|i| (i / 1000 % 13) as u8 + 1).collect();
        compress_into(&p, &model, cs, zstd, &OpenOptions::default()).await;
        let img = Image::open(&p, &OpenOptions::default()).await.unwrap();
        // All eight payloads are small: they share the first data cluster after the
        // metadata, which therefore has refcount 8.
        let payloads = std::fs::read(&p).unwrap();
        let first_data = (payloads.len() as u64 - 1) / cs;
        assert_eq!(img.refcount(first_data).await.unwrap(), 8);
        let before = payloads[(first_data * cs) as usize..].to_vec();

        // Partial write, partial zeroes, partial discard (a no-op), whole-cluster zeroes,
        // whole discard, and a full overwrite: one of each kind of rewrite.
        img.write_at(&[0xee; 3000], cs + 100).await.unwrap();
        model[(cs + 100) as usize..(cs + 3100) as usize].fill(0xee);
        img.write_zeroes(2 * cs + 512, 4096, false).await.unwrap();
        model[(2 * cs + 512) as usize..(2 * cs + 4608) as usize].fill(0);
        img.discard(3 * cs + 512, 4096).await.unwrap();
        img.write_zeroes(4 * cs, cs, true).await.unwrap();
        model[(4 * cs) as usize..(5 * cs) as usize].fill(0);
        img.discard(5 * cs, cs).await.unwrap();
        model[(5 * cs) as usize..(6 * cs) as usize].fill(0);
        img.write_at(&vec![0x77; cs as usize], 6 * cs)
            .await
            .unwrap();
        model[(6 * cs) as usize..(7 * cs) as usize].fill(0x77);
        img.flush().await.unwrap();

        // Five of eight payloads were released, each exactly once.
        assert_eq!(img.refcount(first_data).await.unwrap(), 3);
        let mut all = vec![0u8; size as usize];
        img.read_at(&mut all, 0).await.unwrap();
        assert_same(&all, &model, "engine read-back");
        img.close().await.unwrap();

        let after = std::fs::read(&p).unwrap();
        let start = (first_data * cs) as usize;
        assert_eq!(
            &after[start..start + before.len()],
            &before[..],
            "the shared payload cluster changed"
        );
        let raw = dir.path().join("rw.raw");
        std::fs::write(&raw, &model).unwrap();
        compare_equal(&p, &raw);
        assert_checks_agree(&p).await;

        // Releasing the last three frees the cluster; a new payload may then reuse it and
        // must not be served from a stale cached decompression.
        let img = Image::open(&p, &OpenOptions::default()).await.unwrap();
        let mut warm = vec![0u8; 16];
        img.read_at(&mut warm, 0).await.unwrap();
        for gc in [0u64, 3, 7] {
            img.write_zeroes(gc * cs, cs, true).await.unwrap();
        }
        img.flush().await.unwrap();
        assert_eq!(img.refcount(first_data).await.unwrap(), 0);
        let fresh = vec![0x42u8; cs as usize];
        img.write_compressed(0, &fresh).await.unwrap();
        img.read_at(&mut warm, 0).await.unwrap();
        assert_eq!(warm, [0x42; 16]);
        img.close().await.unwrap();
        model[..cs as usize].fill(0x42);
        model[(3 * cs) as usize..(4 * cs) as usize].fill(0);
        model[(7 * cs) as usize..].fill(0);
        std::fs::write(&raw, &model).unwrap();
        compare_equal(&p, &raw);
        assert_check_clean(&p);
    }
}

/// A qcow2 backing file with compressed clusters (of the other compression type): the
/// overlay reads through it and copies on write from the decompressed cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_backing_files_read_and_copy_on_write() {
    let dir = tempfile::tempdir().unwrap();
    let cs = 65536u64;
    for base_type in TYPES {
        let size = 16 * cs + 1536;
        let (src, _) = source(size, cs);
        let raw = dir.path().join("base.raw");
        std::fs::write(&raw, &src).unwrap();
        let base = dir.path().join(format!("base-{base_type}.qcow2"));
        let o = format!("compression_type={base_type}");
        qemu_ok(
            "qemu-img",
            &["convert", "-c", "-O", "qcow2", "-o", &o, s(&raw), s(&base)],
        );
        let top = dir.path().join(format!("top-{base_type}.qcow2"));
        let mut co = CreateOptions::new(size);
        co.backing_file = Some(base.file_name().unwrap().to_str().unwrap().into());
        co.backing_format = Some(BackingFormat::Qcow2);
        co.zstd = base_type == "zlib";
        let img = Image::create(&top, &co, &OpenOptions::default())
            .await
            .unwrap();
        let mut model = src.clone();
        assert_same(
            &{
                let mut b = vec![0u8; size as usize];
                img.read_at(&mut b, 0).await.unwrap();
                b
            },
            &model,
            "overlay over the compressed base",
        );
        // Partial writes into clusters compressed in the base: the rest comes from there.
        for gc in [2u64, 3, 7, 16] {
            let off = gc * cs + 700;
            let n = 2000.min(size - off) as usize;
            img.write_at(&vec![0xab; n], off).await.unwrap();
            model[off as usize..off as usize + n].fill(0xab);
        }
        // A compressed cluster in the overlay, and a partial zeroing over the base.
        let c4: Vec<u8> = model[(4 * cs) as usize..(5 * cs) as usize]
            .iter()
            .map(|b| b ^ 0x5a)
            .collect();
        img.write_compressed(4 * cs, &c4).await.unwrap();
        model[(4 * cs) as usize..(5 * cs) as usize].copy_from_slice(&c4);
        img.write_zeroes(8 * cs + 4096, 8192, false).await.unwrap();
        model[(8 * cs + 4096) as usize..(8 * cs + 12288) as usize].fill(0);
        let mut all = vec![0u8; size as usize];
        img.read_at(&mut all, 0).await.unwrap();
        assert_same(&all, &model, "overlay after writes");
        img.close().await.unwrap();

        let expect = dir.path().join("top.raw");
        std::fs::write(&expect, &model).unwrap();
        compare_equal(&top, &expect);
        assert_check_clean(&top);
        assert_check_clean(&base);
    }
}

/// `write_compressed` from 16 tasks at once, on both I/O backends and with O_DIRECT (where
/// payloads sharing a block must not be lost to read-modify-write): the packed image is
/// check-clean and holds exactly the data.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_tasks_compress_concurrently() {
    // O_DIRECT needs a real disk (tmpfs refuses it).
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let cs = 16384u64;
    let clusters = 256u64;
    let size = cs * clusters;
    let (src, noise) = source(size, cs);
    let raw = dir.path().join("src.raw");
    std::fs::write(&raw, &src).unwrap();
    for (aio, direct, zstd) in [
        (Aio::Threads, false, false),
        (Aio::IoUring, false, true),
        (Aio::Threads, true, false),
    ] {
        let p = dir.path().join(format!("c-{aio:?}-{direct}.qcow2"));
        let opts = {
            let mut o = OpenOptions::default();
            o.aio = Some(aio);
            o.direct = direct;
            o
        };
        let mut o = CreateOptions::new(size);
        o.cluster_size = cs;
        o.zstd = zstd;
        let img = Image::create(&p, &o, &opts).await.unwrap();
        let src = std::sync::Arc::new(src.clone());
        let mut tasks = Vec::new();
        for t in 0..16u64 {
            let (img, src) = (img.clone(), src.clone());
            tasks.push(tokio::spawn(async move {
                for gc in (t..clusters).step_by(16) {
                    let r = (gc * cs) as usize..((gc + 1) * cs) as usize;
                    img.write_compressed(gc * cs, &src[r]).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let mut all = vec![0u8; size as usize];
        img.read_at(&mut all, 0).await.unwrap();
        assert_same(&all, &src, &format!("{aio:?} direct={direct}"));
        img.close().await.unwrap();
        compare_equal(&p, &raw);
        let report = assert_checks_agree(&p).await;
        assert_eq!(report.compressed_clusters, clusters - noise);
    }
}

/// QEMU refuses compressed clusters in images with an external data file; so do we.
#[tokio::test]
async fn compressed_writes_are_refused_with_an_external_data_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ext.qcow2");
    let mut o = CreateOptions::new(1 << 20);
    o.data_file = Some("ext.raw".into());
    let img = Image::create(&p, &o, &OpenOptions::default())
        .await
        .unwrap();
    let e = img
        .write_compressed(0, &vec![0u8; 65536])
        .await
        .unwrap_err();
    assert!(matches!(e, qcow2_async::Error::Unsupported { .. }), "{e:?}");
    // Misaligned or partial clusters are refused too (QEMU: -EINVAL).
    let p = dir.path().join("plain.qcow2");
    let img = Image::create(&p, &CreateOptions::new(1 << 20), &OpenOptions::default())
        .await
        .unwrap();
    for (off, len) in [(512u64, 65536usize), (0, 4096), (0, 0)] {
        let e = img
            .write_compressed(off, &vec![1u8; len])
            .await
            .unwrap_err();
        assert!(matches!(e, qcow2_async::Error::InvalidArgument(_)), "{e:?}");
    }
    img.close().await.unwrap();
    assert_check_clean(&p);
}

/// Compressed clusters with extended L2 entries (no subcluster bitmap, as QEMU writes them)
/// and with internal snapshots (a payload shared by a snapshot is counted once per
/// reference and survives rewrites in the active image).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_clusters_with_extended_l2_and_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let cs = 65536u64;
    let size = 12 * cs;
    for extended in [false, true] {
        let p = dir.path().join(format!("xs-{extended}.qcow2"));
        let mut o = CreateOptions::new(size);
        o.extended_l2 = extended;
        let img = Image::create(&p, &o, &OpenOptions::default())
            .await
            .unwrap();
        let mut model: Vec<u8> = (0..size).map(|i| (i / 777 % 11) as u8 + 1).collect();
        // Normal data first, then compressed over half of it (the old clusters are released).
        img.write_at(&model, 0).await.unwrap();
        for gc in (0..12u64).step_by(2) {
            let r = (gc * cs) as usize..((gc + 1) * cs) as usize;
            img.write_compressed(gc * cs, &model[r]).await.unwrap();
        }
        img.create_snapshot("packed").await.unwrap();
        let snap = model.clone();
        // Rewrites in the active image: partial write, sub-cluster zeroes, whole zeroes,
        // discard, and a compressed write over a compressed cluster.
        img.write_at(&[0xcd; 5000], 100).await.unwrap();
        model[100..5100].fill(0xcd);
        img.write_zeroes(2 * cs + 4096, 8192, false).await.unwrap();
        model[(2 * cs + 4096) as usize..(2 * cs + 12288) as usize].fill(0);
        img.write_zeroes(4 * cs, cs, false).await.unwrap();
        model[(4 * cs) as usize..(5 * cs) as usize].fill(0);
        img.discard(6 * cs, cs).await.unwrap();
        model[(6 * cs) as usize..(7 * cs) as usize].fill(0);
        let c8 = vec![0x31u8; cs as usize];
        img.write_compressed(8 * cs, &c8).await.unwrap();
        model[(8 * cs) as usize..(9 * cs) as usize].copy_from_slice(&c8);
        let mut all = vec![0u8; size as usize];
        img.read_at(&mut all, 0).await.unwrap();
        assert_same(&all, &model, "active image");
        img.read_snapshot_at("packed", &mut all, 0).await.unwrap();
        assert_same(&all, &snap, "snapshot");
        img.close().await.unwrap();

        // Of the six compressed clusters only 8 (rewritten compressed) and 10 are left.
        let report = assert_checks_agree(&p).await;
        assert_eq!(report.compressed_clusters, 2);
        let raw = dir.path().join("xs.raw");
        std::fs::write(&raw, &model).unwrap();
        compare_equal(&p, &raw);
        let snap_raw = dir.path().join("xs-snap.raw");
        qemu_ok(
            "qemu-img",
            &["convert", "-l", "packed", "-O", "raw", s(&p), s(&snap_raw)],
        );
        assert_same(
            &std::fs::read(&snap_raw).unwrap(),
            &snap,
            "snapshot via QEMU",
        );
        // Deleting the snapshot drops its references; still clean.
        let img = Image::open(&p, &OpenOptions::default()).await.unwrap();
        img.delete_snapshot("packed").await.unwrap();
        img.close().await.unwrap();
        assert_checks_agree(&p).await;
        compare_equal(&p, &raw);
    }
}

/// QEMU 10.0.2 keeps its packing cursor in a host cluster after the cluster was freed; when
/// the cluster is then reused for normal data, the next compressed payload is packed into
/// it, overwriting guest data (`qemu-io -c "write -c -P 1 0 64k" -c "write -P 2 0 64k"
/// -c "write -P 3 128k 64k" -c "write -c -P 4 64k 64k"` leaves 128k unreadable and
/// `qemu-img check` reporting refcount 2 on a COPIED cluster). The engine drops the cursor
/// when its cluster is freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freed_packing_cluster_is_not_packed_into_after_reuse() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("reuse.qcow2");
    let cs = 65536usize;
    let img = Image::create(&p, &CreateOptions::new(1 << 20), &OpenOptions::default())
        .await
        .unwrap();
    img.write_compressed(0, &vec![1u8; cs]).await.unwrap();
    img.write_at(&vec![2u8; cs], 0).await.unwrap();
    img.flush().await.unwrap(); // the payload's cluster is freed here
    img.write_at(&vec![3u8; cs], 2 * cs as u64).await.unwrap();
    img.write_compressed(cs as u64, &vec![4u8; cs])
        .await
        .unwrap();
    let mut all = vec![0u8; 3 * cs];
    img.read_at(&mut all, 0).await.unwrap();
    for (i, want) in [2u8, 4, 3].into_iter().enumerate() {
        assert!(
            all[i * cs..(i + 1) * cs].iter().all(|&b| b == want),
            "cluster {i}"
        );
    }
    img.close().await.unwrap();
    assert_check_clean(&p);
    let mut model = vec![0u8; 1 << 20];
    model[..3 * cs].copy_from_slice(&all);
    let raw = dir.path().join("reuse.raw");
    std::fs::write(&raw, &model).unwrap();
    compare_equal(&p, &raw);
}
