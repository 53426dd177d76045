//! Interop with QEMU in both directions: images qemu-img creates and qemu-io writes read back
//! exactly here; images the engine writes pass `qemu-img check` and `qemu-img compare` equal
//! to a raw file that received the same operations.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;

use common::*;
use qcow2_async::{CreateOptions, Image, OpenOptions};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Reads the whole guest view through the engine and compares it with what QEMU reads
/// (`qemu-img convert -O raw`).
async fn assert_reads_like_qemu(img_path: &Path) {
    let raw = img_path.with_extension("expected.raw");
    qemu_ok("qemu-img", &["convert", "-O", "raw", s(img_path), s(&raw)]);
    let expected = std::fs::read(&raw).unwrap();
    let img = Image::open(img_path, &OpenOptions::read_only())
        .await
        .unwrap();
    assert_eq!(img.virtual_size(), expected.len() as u64);
    let mut got = vec![0u8; expected.len()];
    img.read_at(&mut got, 0).await.unwrap();
    let bad = got.iter().zip(&expected).position(|(a, b)| a != b);
    assert!(
        bad.is_none(),
        "{img_path:?}: byte {:#x} differs from QEMU",
        bad.unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_qemu_writes_read_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let io_cmds = [
        "write -P 0x11 0 64k",
        "write -P 0x22 100k 3k",
        "write -P 0x33 1M 256k",
        "write -z 1088k 64k",
        "write -P 0x44 2M 64k",
        "write -z -u 2M 64k",
        "write -P 0x55 3M 64k",
        "discard 3M 64k",
        "write -P 0x66 5000k 12k",
    ];
    for (name, opts) in [
        ("v3.qcow2", "cluster_size=65536"),
        ("v2.qcow2", "compat=0.10"),
        ("small.qcow2", "cluster_size=512"),
        ("rc1.qcow2", "cluster_size=4096,refcount_bits=1"),
        ("big.qcow2", "cluster_size=2M"),
        ("zstd.qcow2", "compression_type=zstd"),
    ] {
        let p = d.join(name);
        qemu_ok(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", opts, s(&p), "8M"],
        );
        for c in io_cmds {
            qemu_ok("qemu-io", &["-f", "qcow2", "-c", c, s(&p)]);
        }
        assert_reads_like_qemu(&p).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backing_chains_qemu_made_read_back_and_cow_correctly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = d.join("base.raw");
    std::fs::write(
        &raw,
        (0..6u32 << 20).map(|i| (i % 253) as u8).collect::<Vec<_>>(),
    )
    .unwrap();
    let mid = d.join("mid.qcow2");
    let top = d.join("top.qcow2");
    // Relative names resolve against the image's folder.
    qemu_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            s(&mid),
            "8M",
        ],
    );
    qemu_ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x77 64k 64k",
            "-c",
            "write -z 256k 64k",
            s(&mid),
        ],
    );
    qemu_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            s(&top),
            "8M",
        ],
    );
    qemu_ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x88 100k 8k", s(&top)],
    );
    assert_reads_like_qemu(&top).await;

    // Partial writes copy the rest of the cluster from the chain.
    let img = Image::open(&top, &OpenOptions::default()).await.unwrap();
    img.write_at(&[0x99; 1000], 70_000).await.unwrap();
    img.write_at(&[0x9a; 3000], 5_000_000).await.unwrap();
    img.write_at(&[0x9b; 10], (7 << 20) + 5).await.unwrap(); // past the backing's end
    img.close().await.unwrap();
    assert_check_clean(&top);
    let expect = d.join("expect.raw");
    qemu_ok("qemu-img", &["convert", "-O", "raw", s(&top), s(&expect)]);
    let mut want = std::fs::read(&expect).unwrap();
    assert_eq!(&want[70_000..71_000], &[0x99; 1000][..]);
    let img = Image::open(&top, &OpenOptions::read_only()).await.unwrap();
    let mut got = vec![0u8; want.len()];
    img.read_at(&mut got, 0).await.unwrap();
    assert!(got == want);
    // And QEMU sees what we wrote on top of its chain.
    want[(7 << 20) + 5..(7 << 20) + 15].copy_from_slice(&[0x9b; 10]);
    assert!(got == want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_the_engine_writes_pass_check_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (i, (cluster, refbits, v3)) in [
        (65536u64, 16u32, true),
        (512, 16, true),
        (4096, 64, true),
        (65536, 16, false),
        (1 << 21, 8, true),
    ]
    .into_iter()
    .enumerate()
    {
        let p = d.join(format!("e{i}.qcow2"));
        let raw_path = d.join(format!("e{i}.raw"));
        let size = 12u64 << 20;
        let mut o = CreateOptions::new(size);
        o.cluster_size = cluster;
        o.refcount_bits = refbits;
        o.version3 = v3;
        let img = Image::create(&p, &o, &OpenOptions::default())
            .await
            .unwrap();
        let mut raw = vec![0u8; size as usize];
        let mut r = rng(i as u64);
        for _ in 0..200 {
            match random_op(&mut r, size, cluster) {
                Op::Write { off, data } => {
                    img.write_at(&data, off).await.unwrap();
                    raw[off as usize..off as usize + data.len()].copy_from_slice(&data);
                }
                Op::Zeroes { off, len, unmap } => {
                    img.write_zeroes(off, len, unmap).await.unwrap();
                    raw[off as usize..(off + len) as usize].fill(0);
                }
                Op::Discard { off, len } => {
                    img.discard(off, len).await.unwrap();
                    let (first, end) = (
                        off.div_ceil(cluster) * cluster,
                        (off + len) / cluster * cluster,
                    );
                    if end > first {
                        raw[first as usize..end as usize].fill(0);
                    }
                }
                Op::Flush | Op::Reopen => img.flush().await.unwrap(),
                Op::Read { .. } => {}
            }
        }
        img.close().await.unwrap();
        std::fs::write(&raw_path, &raw).unwrap();
        assert_check_clean(&p);
        let out = qemu(
            "qemu-img",
            &["compare", "-f", "qcow2", "-F", "raw", s(&p), s(&raw_path)],
        );
        assert!(
            out.status.success(),
            "{p:?}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// A fresh image is laid out byte for byte as `qemu-img create` lays it out.
#[tokio::test]
async fn fresh_images_match_qemu_img_create_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (cluster, size, extra) in [
        (65536u64, 1u64 << 30, ""),
        (512, 1 << 30, ""),
        (4096, 1 << 30, ""),
        (1 << 21, 1 << 30, ""),
        (65536, 100 << 20, "compat=0.10"),
    ] {
        let ours = d.join("ours.qcow2");
        let theirs = d.join("theirs.qcow2");
        let mut o = CreateOptions::new(size);
        o.cluster_size = cluster;
        o.version3 = extra.is_empty();
        Image::create(&ours, &o, &OpenOptions::default())
            .await
            .unwrap()
            .close()
            .await
            .unwrap();
        let mut opts = format!("cluster_size={cluster}");
        if !extra.is_empty() {
            opts = format!("{opts},{extra}");
        }
        qemu_ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &opts,
                s(&theirs),
                &size.to_string(),
            ],
        );
        let (a, b) = (
            std::fs::read(&ours).unwrap(),
            std::fs::read(&theirs).unwrap(),
        );
        assert_eq!(a.len(), b.len(), "cluster {cluster}: file length");
        assert!(
            a == b,
            "cluster {cluster} {extra}: bytes differ at {:#x}",
            a.iter().zip(&b).position(|(x, y)| x != y).unwrap()
        );
    }
}

/// Writes into a cluster QEMU left as ZERO_ALLOC with COPIED set become visible to QEMU too.
#[tokio::test]
async fn a_write_to_a_qemu_zero_alloc_cluster_is_visible_to_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("z.qcow2");
    qemu_ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&p), "4M"]);
    qemu_ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0xcc 0 64k",
            "-c",
            "write -z 0 64k",
            s(&p),
        ],
    );
    let img = Image::open(&p, &OpenOptions::default()).await.unwrap();
    img.write_at(&[0xdd; 512], 1024).await.unwrap();
    img.close().await.unwrap();
    assert_check_clean(&p);
    let out = qemu_ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "read -P 0xdd 1024 512",
            "-c",
            "read -P 0 0 1024",
            "-c",
            "read -P 0 1536 63k",
            s(&p),
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

fn patch(path: &Path, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

/// Backing files: the format must be known (recorded or given), probing happens only on
/// request, policies can forbid or override, and loops and deep chains are typed errors.
#[tokio::test]
async fn backing_policies_and_chain_limits() {
    use qcow2_async::{BackingFormat, BackingPolicy, Error};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.qcow2");
    let top = d.join("top.qcow2");
    qemu_ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&base), "1M"]);
    qemu_ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x42 0 4k", s(&base)],
    );
    qemu_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            s(&top),
            "1M",
        ],
    );
    // qemu-img no longer writes a backing name without a format; older tools did. Drop the
    // backing-format extension to make such an image.
    let mut bytes = std::fs::read(&top).unwrap();
    let mut h =
        qcow2_async::qcow2_format::ImageHeader::decode(&bytes[..65536], &Default::default())
            .unwrap();
    h.backing_format = None;
    bytes[..65536].copy_from_slice(&h.encode().unwrap());
    std::fs::write(&top, &bytes).unwrap();
    let err = Image::open(&top, &OpenOptions::read_only())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Backing { .. }), "{err}");
    let probed = Image::open(&top, &{
        let mut o = OpenOptions::read_only();
        o.probe_backing_format = true;
        o
    })
    .await
    .unwrap();
    let mut b = [0u8; 4];
    probed.read_at(&mut b, 0).await.unwrap();
    assert_eq!(b, [0x42; 4]);
    let err = Image::open(&top, &{
        let mut o = OpenOptions::read_only();
        o.backing = BackingPolicy::Forbid;
        o
    })
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Backing { .. }));
    let ignored = Image::open(&top, &{
        let mut o = OpenOptions::read_only();
        o.backing = BackingPolicy::Ignore;
        o
    })
    .await
    .unwrap();
    ignored.read_at(&mut b, 0).await.unwrap();
    assert_eq!(b, [0; 4]);
    let raw = d.join("other.raw");
    std::fs::write(&raw, vec![0x17u8; 1 << 20]).unwrap();
    let over = Image::open(&top, &{
        let mut o = OpenOptions::read_only();
        o.backing = BackingPolicy::Override(raw, BackingFormat::Raw);
        o
    })
    .await
    .unwrap();
    over.read_at(&mut b, 0).await.unwrap();
    assert_eq!(b, [0x17; 4]);

    // A loop: a -> b -> a.
    let a = d.join("a.qcow2");
    let bq = d.join("b.qcow2");
    qemu_ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&a), "1M"]);
    qemu_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "a.qcow2",
            "-F",
            "qcow2",
            s(&bq),
            "1M",
        ],
    );
    qemu_ok(
        "qemu-img",
        &["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", s(&a)],
    );
    let err = Image::open(&bq, &OpenOptions::read_only())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("loop"), "{err}");

    // Depth: a chain of 5 with a limit of 3.
    let mut prev = d.join("c0.qcow2");
    qemu_ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&prev), "1M"]);
    for i in 1..5 {
        let next = d.join(format!("c{i}.qcow2"));
        let name = prev.file_name().unwrap().to_str().unwrap().to_string();
        qemu_ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                &name,
                "-F",
                "qcow2",
                s(&next),
                "1M",
            ],
        );
        prev = next;
    }
    assert!(Image::open(&prev, &OpenOptions::read_only()).await.is_ok());
    let err = Image::open(&prev, &{
        let mut o = OpenOptions::read_only();
        o.max_backing_depth = 3;
        o
    })
    .await
    .unwrap_err();
    assert!(err.to_string().contains("deeper"), "{err}");
}

/// Features the engine does not implement yet are refused with a typed error (read-write),
/// or opened read-only; unknown incompatible bits are refused; unknown autoclear bits are
/// cleared on a read-write open and unknown compatible bits preserved.
#[tokio::test]
async fn unsupported_features_are_refused_and_feature_bits_handled_like_qemu() {
    use qcow2_async::Error;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mk = |name: &str, opts: &[&str]| {
        let p = d.join(name);
        qemu_create(&p, opts, "4M");
        p
    };
    let luks = mk(
        "luks.qcow2",
        &[
            "--object",
            "secret,id=s0,data=x",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        ],
    );
    // Without a passphrase an encrypted image opens only read-only, for its metadata.
    let locked = Image::open(&luks, &OpenOptions::read_only()).await.unwrap();
    assert!(matches!(
        locked.read_at(&mut [0u8; 512], 0).await.unwrap_err(),
        Error::PassphraseRequired
    ));
    drop(locked); // a reader keeps writers out (image locking)
    assert!(matches!(
        Image::open(&luks, &OpenOptions::default())
            .await
            .unwrap_err(),
        Error::PassphraseRequired
    ));
    let datafile = d.join("data.raw");
    let df = mk("df.qcow2", &["-o", &format!("data_file={}", s(&datafile))]);
    assert!(
        Image::open(&df, &OpenOptions::read_only()).await.is_ok(),
        "external data files are supported"
    );

    // A dirty image opens read-only as it is, and read-write after a repair that clears the
    // bit; a corrupt one only read-only.
    let dirty = mk("dirty.qcow2", &["-o", "lazy_refcounts=on"]);
    patch(&dirty, 72, &1u64.to_be_bytes());
    assert!(Image::open(&dirty, &OpenOptions::read_only()).await.is_ok());
    assert_eq!(
        std::fs::read(&dirty).unwrap()[79] & 1,
        1,
        "a read-only open does not repair"
    );
    Image::open(&dirty, &OpenOptions::default())
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(&dirty).unwrap()[79] & 1,
        0,
        "repaired and marked clean"
    );
    let corrupt = mk("corrupt.qcow2", &[]);
    patch(&corrupt, 72, &2u64.to_be_bytes());
    assert!(matches!(
        Image::open(&corrupt, &OpenOptions::default())
            .await
            .unwrap_err(),
        Error::Corrupt(_)
    ));
    assert!(Image::open(&corrupt, &OpenOptions::read_only())
        .await
        .is_ok());

    // Unknown incompatible bit: refused even read-only.
    let unk = mk("unk.qcow2", &[]);
    patch(&unk, 72, &0x20u64.to_be_bytes());
    assert!(Image::open(&unk, &OpenOptions::read_only()).await.is_err());

    // Unknown autoclear bit cleared on RW open, unknown compatible bit kept (as QEMU does).
    let bits = mk("bits.qcow2", &[]);
    patch(&bits, 80, &0x80u64.to_be_bytes());
    patch(&bits, 88, &0x20u64.to_be_bytes());
    let img = Image::open(&bits, &OpenOptions::default()).await.unwrap();
    img.write_at(&[1; 512], 0).await.unwrap();
    img.close().await.unwrap();
    let b = std::fs::read(&bits).unwrap();
    assert_eq!(u64::from_be_bytes(b[80..88].try_into().unwrap()), 0x80);
    assert_eq!(u64::from_be_bytes(b[88..96].try_into().unwrap()), 0);
    assert_check_clean(&bits);
}

/// Preallocation modes allocate every cluster; the image is check-clean and reads zeros.
#[tokio::test]
async fn preallocation_modes_match_qemu_semantics() {
    use qcow2_async::Preallocation;
    let dir = tempfile::tempdir().unwrap();
    for mode in [
        Preallocation::Metadata,
        Preallocation::Falloc,
        Preallocation::Full,
    ] {
        let p = dir.path().join(format!("{mode:?}.qcow2"));
        let mut o = CreateOptions::new(3 << 20);
        o.preallocation = mode;
        let img = Image::create(&p, &o, &OpenOptions::default())
            .await
            .unwrap();
        img.write_at(&[3; 100], 70_000).await.unwrap();
        img.close().await.unwrap();
        assert_check_clean(&p);
        let map = qemu_ok("qemu-img", &["map", "--output=json", s(&p)]);
        assert!(
            !map.contains("\"data\": false"),
            "{mode:?}: every cluster is allocated: {map}"
        );
        let out = qemu_ok(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "read -P 0 0 70000",
                "-c",
                "read -P 3 70000 100",
                s(&p),
            ],
        );
        assert!(!out.contains("Pattern verification failed"), "{out}");
    }
}

/// Every barrier mode produces the same, check-clean image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barrier_modes_all_produce_consistent_images() {
    use qcow2_async::BarrierMode;
    let dir = tempfile::tempdir().unwrap();
    for mode in [BarrierMode::None, BarrierMode::Ordered, BarrierMode::Full] {
        let p = dir.path().join(format!("{mode:?}.qcow2"));
        let opts = {
            let mut o = OpenOptions::default();
            o.barrier = mode;
            o
        };
        let img = Image::create(&p, &CreateOptions::new(8 << 20), &opts)
            .await
            .unwrap();
        for i in 0..64u64 {
            img.write_at(&[i as u8; 3000], i * 100_000).await.unwrap();
        }
        img.close().await.unwrap();
        assert_check_clean(&p);
        let out = qemu_ok(
            "qemu-io",
            &["-f", "qcow2", "-c", "read -P 7 700000 3000", s(&p)],
        );
        assert!(
            !out.contains("Pattern verification failed"),
            "{mode:?}: {out}"
        );
    }
}

/// Clusters shared with an internal snapshot (refcount 2, no COPIED) are copied on write,
/// never written in place: reverting to the snapshot with qemu-img brings the old data back,
/// and the image is check-clean before and after.
#[tokio::test]
async fn writes_to_snapshot_shared_clusters_copy_on_write() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("snap.qcow2");
    qemu_ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&p), "4M"]);
    qemu_ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x31 0 1M", s(&p)],
    );
    qemu_ok("qemu-img", &["snapshot", "-c", "s1", s(&p)]);
    let img = Image::open(&p, &OpenOptions::default()).await.unwrap();
    img.write_at(&[0x32; 5000], 70_000).await.unwrap();
    img.write_zeroes(196_608, 65536, true).await.unwrap();
    img.discard(262_144, 65536).await.unwrap();
    img.close().await.unwrap();
    assert_check_clean(&p);
    let out = qemu_ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "read -P 0x32 70000 5000",
            "-c",
            "read -P 0 196608 128k",
            "-c",
            "read -P 0x31 0 70000",
            s(&p),
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    qemu_ok("qemu-img", &["snapshot", "-a", "s1", s(&p)]);
    assert_check_clean(&p);
    let out = qemu_ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "read -P 0x31 0 1M", s(&p)],
    );
    assert!(
        !out.contains("Pattern verification failed"),
        "snapshot data was modified: {out}"
    );
}

/// Our check agrees with `qemu-img check` on clean images, leaked clusters and corruptions,
/// and repair leaves images that qemu-img finds clean with the guest data intact.
#[tokio::test]
async fn check_and_repair_agree_with_qemu_img() {
    use qcow2_async::{RepairMode, Verdict};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("c.qcow2");
    qemu_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            s(&base),
            "4M",
        ],
    );
    qemu_ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 0 64k",
            "-c",
            "write -P 0x5b 1M 4k",
            s(&base),
        ],
    );
    qemu_ok("qemu-img", &["snapshot", "-c", "s1", s(&base)]);
    qemu_ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x5c 0 4k", s(&base)],
    );

    let rc_block = |p: &Path| {
        let b = std::fs::read(p).unwrap();
        let rt = u64::from_be_bytes(b[48..56].try_into().unwrap()) as usize;
        u64::from_be_bytes(b[rt..rt + 8].try_into().unwrap())
    };
    // (name, how to damage, expected verdict)
    let leak = d.join("leak.qcow2");
    std::fs::copy(&base, &leak).unwrap();
    // Refcount 1 for a cluster nobody references (cluster 900 of the file range).
    let blk = rc_block(&leak);
    let len = std::fs::metadata(&leak).unwrap().len();
    let free_cluster = len / 4096 + 2;
    patch(&leak, blk + free_cluster * 2, &1u16.to_be_bytes());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&leak)
        .unwrap()
        .set_len((free_cluster + 1) * 4096)
        .unwrap();
    let corrupt = d.join("corrupt.qcow2");
    std::fs::copy(&base, &corrupt).unwrap();
    // Refcount of the L1 table's cluster set to 0 while referenced.
    let b = std::fs::read(&corrupt).unwrap();
    let l1 = u64::from_be_bytes(b[40..48].try_into().unwrap());
    patch(
        &corrupt,
        rc_block(&corrupt) + (l1 / 4096) * 2,
        &0u16.to_be_bytes(),
    );

    for (p, want) in [
        (&base, Verdict::Clean),
        (&leak, Verdict::Leaks),
        (&corrupt, Verdict::Corrupt),
    ] {
        let (code, _) = qemu_check(p);
        let img = Image::open(p, &OpenOptions::read_only()).await.unwrap();
        let report = img.check(None).await.unwrap();
        println!(
            "{}: qemu-img check exit {code}, ours {:?} (exit {})",
            p.display(),
            report.verdict(),
            report.exit_code()
        );
        assert_eq!(report.verdict(), want, "{p:?}: {report:#?}");
        assert_eq!(report.exit_code(), code, "{p:?}: {report:#?}");
    }
    // Counters match QEMU's JSON for the clean image.
    let (_, v) = qemu_check(&base);
    let img = Image::open(&base, &OpenOptions::read_only()).await.unwrap();
    let r = img.check(None).await.unwrap();
    assert_eq!(v["image-end-offset"].as_u64().unwrap(), r.image_end_offset);
    assert_eq!(v["total-clusters"].as_u64().unwrap(), r.total_clusters);
    assert_eq!(
        v["allocated-clusters"].as_u64().unwrap(),
        r.allocated_clusters
    );
    assert_eq!(
        v["fragmented-clusters"].as_u64().unwrap_or(0),
        r.fragmented_clusters
    );

    // Repair: leaks with Leaks; corruption with All. Data survives.
    let img = Image::open(&leak, &OpenOptions::default()).await.unwrap();
    let r = img.check(Some(RepairMode::Leaks)).await.unwrap();
    assert_eq!((r.leaks_fixed, r.verdict()), (1, Verdict::Clean), "{r:#?}");
    img.close().await.unwrap();
    assert_check_clean(&leak);
    // A corrupt image cannot be opened read-write when marked corrupt; this one is not
    // marked (the damage was made behind the engine's back), so repair runs on a RW open.
    let img = Image::open(&corrupt, &OpenOptions::default())
        .await
        .unwrap();
    let r = img.check(Some(RepairMode::Leaks)).await.unwrap();
    assert_eq!(
        r.verdict(),
        Verdict::Corrupt,
        "-r leaks does not fix corruptions"
    );
    let r = img.check(Some(RepairMode::All)).await.unwrap();
    assert_eq!(r.verdict(), Verdict::Clean, "{r:#?}");
    assert!(r.corruptions_fixed >= 1);
    img.close().await.unwrap();
    assert_check_clean(&corrupt);
    let out = qemu_ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "read -P 0x5c 0 4k",
            "-c",
            "read -P 0x5a 4k 60k",
            "-c",
            "read -P 0x5b 1M 4k",
            s(&corrupt),
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    qemu_ok("qemu-img", &["snapshot", "-a", "s1", s(&corrupt)]);
    let out = qemu_ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "read -P 0x5a 0 64k", s(&corrupt)],
    );
    assert!(
        !out.contains("Pattern verification failed"),
        "snapshot data lost by repair: {out}"
    );
}

/// After the engine writes, its own check agrees the image is clean, and so does qemu-img.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_check_is_clean_after_our_writes() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.qcow2");
    let mut o = CreateOptions::new(8 << 20);
    o.cluster_size = 512;
    let img = Image::create(&p, &o, &OpenOptions::default())
        .await
        .unwrap();
    let mut r = rng(3);
    for _ in 0..300 {
        if let Op::Write { off, data } = random_op(&mut r, 8 << 20, 512) {
            img.write_at(&data, off).await.unwrap();
        }
    }
    let report = img.check(None).await.unwrap();
    assert_eq!(report.verdict(), qcow2_async::Verdict::Clean, "{report:#?}");
    img.close().await.unwrap();
    let (_, v) = qemu_check(&p);
    assert_eq!(
        v["image-end-offset"].as_u64().unwrap(),
        report.image_end_offset
    );
    assert_check_clean(&p);
}

/// Lazy refcounts: while open the image is marked dirty and refcounts may be stale on disk
/// (qemu-img check then reports corruption, as it does for QEMU's own dirty images); a clean
/// close clears the bit; a read-write open of a dirty image repairs it first.
#[tokio::test]
async fn lazy_refcounts_dirty_bit_and_repair_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("lazy.qcow2");
    let crashed = dir.path().join("crashed.qcow2");
    let mut o = CreateOptions::new(4 << 20);
    o.lazy_refcounts = true;
    let img = Image::create(&p, &o, &OpenOptions::default())
        .await
        .unwrap();
    img.write_at(&[0x61; 65536], 0).await.unwrap();
    img.write_at(&[0x62; 65536], 1 << 20).await.unwrap();
    img.flush().await.unwrap();
    // "Crash": copy the file while the image is open and dirty.
    std::fs::copy(&p, &crashed).unwrap();
    let b = std::fs::read(&crashed).unwrap();
    assert_eq!(
        u64::from_be_bytes(b[72..80].try_into().unwrap()) & 1,
        1,
        "dirty bit set while open"
    );
    img.close().await.unwrap();
    let b = std::fs::read(&p).unwrap();
    assert_eq!(
        u64::from_be_bytes(b[72..80].try_into().unwrap()) & 1,
        0,
        "clean close clears it"
    );
    assert_check_clean(&p);

    let (code, _) = qemu_check(&crashed);
    assert_eq!(
        code, 2,
        "stale refcounts of a dirty image are corruptions to qemu-img check"
    );
    // Read-only opens work without repair and see the data.
    let ro = Image::open(&crashed, &OpenOptions::read_only())
        .await
        .unwrap();
    let mut buf = vec![0u8; 65536];
    ro.read_at(&mut buf, 1 << 20).await.unwrap();
    assert!(buf.iter().all(|&x| x == 0x62));
    drop(ro);
    let rw = Image::open(&crashed, &OpenOptions::default())
        .await
        .unwrap();
    rw.close().await.unwrap();
    assert_check_clean(&crashed);
    let out = qemu_ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "read -P 0x61 0 64k",
            "-c",
            "read -P 0x62 1M 64k",
            s(&crashed),
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

/// An L2 entry pointing into the refcount table: a write there is refused, the image is
/// marked corrupt (QEMU sees the bit), read-write opens are refused, read-only works, and a
/// repair clears it (reference experiment 12).
#[tokio::test]
async fn corruption_found_at_run_time_sets_the_corrupt_bit() {
    use qcow2_async::{Error, RepairMode, Verdict};
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.qcow2");
    qemu_ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&p), "4M"]);
    qemu_ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x71 0 64k", s(&p)],
    );
    let b = std::fs::read(&p).unwrap();
    let l1 = u64::from_be_bytes(b[40..48].try_into().unwrap()) as usize;
    let l2 = u64::from_be_bytes(b[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00;
    let reftable = u64::from_be_bytes(b[48..56].try_into().unwrap());
    patch(&p, l2, &((1u64 << 63) | reftable).to_be_bytes());
    let img = Image::open(&p, &OpenOptions::default()).await.unwrap();
    let err = img.write_at(&[1; 512], 0).await.unwrap_err();
    assert!(matches!(err, Error::Corrupt(_)), "{err}");
    assert!(
        matches!(
            img.write_at(&[1; 512], 1 << 20).await.unwrap_err(),
            Error::Corrupt(_)
        ),
        "all writes stop"
    );
    drop(img);
    let info = qemu_ok("qemu-img", &["info", "--output=json", s(&p)]);
    assert!(info.contains("\"corrupt\": true"), "{info}");
    assert!(matches!(
        Image::open(&p, &OpenOptions::default()).await.unwrap_err(),
        Error::Corrupt(_)
    ));
    assert!(Image::open(&p, &OpenOptions::read_only()).await.is_ok());
    let img = Image::open(&p, &{
        let mut o = OpenOptions::default();
        o.open_for_repair = true;
        o
    })
    .await
    .unwrap();
    let r = img.check(Some(RepairMode::All)).await.unwrap();
    assert_eq!(r.verdict(), Verdict::Clean, "{r:#?}");
    img.close().await.unwrap();
    let info = qemu_ok("qemu-img", &["info", "--output=json", s(&p)]);
    assert!(info.contains("\"corrupt\": false"), "{info}");
    assert_check_clean(&p);
}

/// Snapshots we make are listed, applied and deleted by qemu-img; snapshots qemu-img makes
/// are applied, read and deleted by us; every step is check-clean.
#[tokio::test]
async fn snapshots_interoperate_with_qemu_img_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Ours → QEMU.
    let p = d.join("ours.qcow2");
    let img = Image::create(&p, &CreateOptions::new(4 << 20), &OpenOptions::default())
        .await
        .unwrap();
    img.write_at(&[0x11; 100_000], 0).await.unwrap();
    let s1 = img.create_snapshot("first").await.unwrap();
    assert_eq!(s1.id, "1");
    img.write_at(&[0x22; 50_000], 30_000).await.unwrap();
    img.write_zeroes(2 << 20, 65536, true).await.unwrap();
    let s2 = img.create_snapshot("second").await.unwrap();
    assert_eq!(s2.id, "2");
    img.write_at(&[0x33; 4096], 0).await.unwrap();
    let mut b = vec![0u8; 4096];
    img.read_snapshot_at("first", &mut b, 30_000).await.unwrap();
    assert!(
        b.iter().all(|&x| x == 0x11),
        "snapshot content unchanged by later writes"
    );
    img.close().await.unwrap();
    assert_check_clean(&p);
    let list = qemu_ok("qemu-img", &["snapshot", "-l", s(&p)]);
    assert!(list.contains("first") && list.contains("second"), "{list}");
    qemu_ok("qemu-img", &["snapshot", "-a", "first", s(&p)]);
    assert_check_clean(&p);
    let out = qemu_ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "read -P 0x11 0 100000", s(&p)],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    qemu_ok("qemu-img", &["snapshot", "-d", "second", s(&p)]);
    qemu_ok("qemu-img", &["snapshot", "-d", "first", s(&p)]);
    assert_check_clean(&p);

    // QEMU → ours.
    let q = d.join("theirs.qcow2");
    qemu_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            s(&q),
            "4M",
        ],
    );
    qemu_ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x44 0 256k", s(&q)],
    );
    qemu_ok("qemu-img", &["snapshot", "-c", "a", s(&q)]);
    qemu_ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x55 64k 64k", s(&q)],
    );
    qemu_ok("qemu-img", &["snapshot", "-c", "b", s(&q)]);
    qemu_ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x66 0 4k", s(&q)],
    );
    let img = Image::open(&q, &OpenOptions::default()).await.unwrap();
    let names: Vec<String> = img
        .list_snapshots()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["a", "b"]);
    let mut b = vec![0u8; 65536];
    img.read_snapshot_at("b", &mut b, 65536).await.unwrap();
    assert!(b.iter().all(|&x| x == 0x55));
    img.apply_snapshot("a").await.unwrap();
    img.read_at(&mut b, 65536).await.unwrap();
    assert!(b.iter().all(|&x| x == 0x44), "applied snapshot a");
    img.write_at(&[0x77; 512], 65536).await.unwrap();
    img.delete_snapshot("b").await.unwrap();
    img.close().await.unwrap();
    assert_check_clean(&q);
    let out = qemu_ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "read -P 0x77 64k 512",
            "-c",
            "read -P 0x44 0 64k",
            s(&q),
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    qemu_ok("qemu-img", &["snapshot", "-a", "a", s(&q)]);
    let out = qemu_ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "read -P 0x44 0 256k", s(&q)],
    );
    assert!(
        !out.contains("Pattern verification failed"),
        "snapshot a intact: {out}"
    );
    assert_check_clean(&q);
    // Deleting the last snapshot restores COPIED everywhere.
    let img = Image::open(&q, &OpenOptions::default()).await.unwrap();
    img.delete_snapshot("1").await.unwrap();
    assert!(img.list_snapshots().await.unwrap().is_empty());
    img.close().await.unwrap();
    assert_check_clean(&q);
    // 2-bit refcounts allow two snapshots, and the third fails cleanly.
    let r = d.join("rc2.qcow2");
    let mut o = CreateOptions::new(1 << 20);
    o.refcount_bits = 2;
    let img = Image::create(&r, &o, &OpenOptions::default())
        .await
        .unwrap();
    img.write_at(&[1; 4096], 0).await.unwrap();
    img.create_snapshot("x").await.unwrap();
    img.create_snapshot("y").await.unwrap();
    assert!(img.create_snapshot("z").await.is_err());
    img.close().await.unwrap();
    assert_check_clean(&r);
}

/// A snapshot table entry with less extra data than QEMU writes (v2 allows none; QEMU
/// before 5.0 wrote 16 bytes) grows when the table is rewritten. Replacing the table must
/// free the clusters the old one takes on disk: here it fills its cluster exactly and the
/// next cluster is an L2 table in use. Sized by its rewrite, the old table was leaked when an
/// entry lacked the disk size (its rewrite could not be sized), and with 16 bytes of extra
/// data it took the L2 table's refcount with it.
#[tokio::test]
async fn a_rewritten_snapshot_table_frees_only_the_old_tables_clusters() {
    for extra in [0usize, 16] {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("v2.qcow2");
        qemu_create(&p, &["-o", "compat=0.10"], "64M");
        qemu_ok("qemu-img", &["snapshot", "-c", "s1", s(&p)]);
        qemu_ok(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 0x5a 0 64k", s(&p)],
        );
        let b = std::fs::read(&p).unwrap();
        let be = |at: usize, n: usize| {
            b[at..at + n]
                .iter()
                .fold(0u64, |v, &x| v << 8 | u64::from(x))
        };
        let table = be(64, 8) as usize;
        let l2 = be(be(40, 8) as usize, 8) & 0x00ff_ffff_ffff_fe00;
        assert_eq!(
            l2 as usize,
            table + 65536,
            "layout: the L2 table follows the snapshot table"
        );
        // One entry of exactly 65536 bytes: the fixed part, `extra` bytes of extra data
        // (the VM state and disk sizes qemu-img wrote), ID "1", a long name.
        let mut entry = b[table..table + 40 + extra].to_vec();
        entry[12..14].copy_from_slice(&1u16.to_be_bytes());
        let name_len = 65536 - 40 - extra - 1;
        entry[14..16].copy_from_slice(&(name_len as u16).to_be_bytes());
        entry[36..40].copy_from_slice(&(extra as u32).to_be_bytes());
        entry.push(b'1');
        entry.resize(65536, b'n');
        patch(&p, table as u64, &entry);
        assert_check_clean(&p);

        let img = Image::open(&p, &OpenOptions::default()).await.unwrap();
        img.create_snapshot("s2").await.unwrap();
        img.close().await.unwrap();
        assert_check_clean(&p);
        let list = qemu_ok("qemu-img", &["snapshot", "-l", s(&p)]);
        assert!(
            list.contains("s2") && list.contains(&"n".repeat(100)),
            "{list}"
        );
        qemu_ok(
            "qemu-io",
            &["-f", "qcow2", "-c", "read -P 0x5a 0 64k", s(&p)],
        );
    }
}

/// External data files, with and without data_file_raw: metadata only in the qcow2 file,
/// guest data at guest offsets in the data file, QEMU reads what we write and we read what
/// QEMU writes; with raw, the data file *is* the guest disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_data_files_interoperate() {
    use qcow2_async::{DataFilePolicy, Error};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for raw in [false, true] {
        // Ours → QEMU.
        let p = d.join(format!("ours-{raw}.qcow2"));
        let data = d.join(format!("ours-{raw}.data"));
        let size = 6u64 << 20;
        let mut o = CreateOptions::new(size);
        // QEMU resolves a relative data-file name against its working directory, we against
        // the image's folder: an absolute name means the same to both.
        o.data_file = Some(s(&data).to_string());
        o.data_file_raw = raw;
        let img = Image::create(&p, &o, &OpenOptions::default())
            .await
            .unwrap();
        let mut model = vec![0u8; size as usize];
        let mut r = rng(raw as u64);
        for _ in 0..150 {
            match random_op(&mut r, size, 65536) {
                Op::Write { off, data } => {
                    img.write_at(&data, off).await.unwrap();
                    model[off as usize..off as usize + data.len()].copy_from_slice(&data);
                }
                Op::Zeroes { off, len, unmap } => {
                    img.write_zeroes(off, len, unmap).await.unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                }
                Op::Discard { off, len } => {
                    img.discard(off, len).await.unwrap();
                    let (first, end) = (off.div_ceil(65536) * 65536, (off + len) / 65536 * 65536);
                    if end > first {
                        model[first as usize..end as usize].fill(0);
                    }
                }
                _ => {}
            }
        }
        img.close().await.unwrap();
        assert_check_clean(&p);
        let expect = d.join(format!("model-{raw}.raw"));
        std::fs::write(&expect, &model).unwrap();
        let out = qemu(
            "qemu-img",
            &["compare", "-f", "qcow2", "-F", "raw", s(&p), s(&expect)],
        );
        assert!(
            out.status.success(),
            "raw={raw}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        if raw {
            assert!(
                std::fs::read(&data).unwrap() == model,
                "the raw data file is the guest disk"
            );
        }
        // No metadata in the data file: every byte of it is guest data (or, without raw,
        // stale guest data / zeros), so it can never contain a qcow2 table of ours. The qcow2
        // file in turn holds no guest data: it stays small.
        assert!(std::fs::metadata(&p).unwrap().len() < 1 << 20);
        let info = qemu_ok("qemu-img", &["info", "--output=json", s(&p)]);
        assert!(info.contains("\"data-file\""), "{info}");

        // QEMU → ours.
        let q = d.join(format!("theirs-{raw}.qcow2"));
        let qd = d.join(format!("theirs-{raw}.data"));
        let opt = format!(
            "data_file={},data_file_raw={}",
            s(&qd),
            if raw { "on" } else { "off" }
        );
        qemu_ok(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", &opt, s(&q), "4M"],
        );
        qemu_ok(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "write -P 0x21 0 100k",
                "-c",
                "write -z 64k 64k",
                "-c",
                "write -P 0x22 1M 4k",
                s(&q),
            ],
        );
        assert_reads_like_qemu(&q).await;
        // The safe policy refuses an absolute data file name; the default follows it.
        let err = Image::open(&q, &{
            let mut o = OpenOptions::read_only();
            o.data_file = DataFilePolicy::BesideImage;
            o
        })
        .await
        .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        let img = Image::open(&q, &{
            let mut o = OpenOptions::default();
            o.data_file = DataFilePolicy::Override(qd.clone());
            o
        })
        .await
        .unwrap();
        img.write_at(&[0x23; 1000], 2 << 20).await.unwrap();
        assert!(matches!(
            img.create_snapshot("x").await.unwrap_err(),
            Error::Unsupported { .. }
        ));
        img.close().await.unwrap();
        assert_check_clean(&q);
        let out = qemu_ok(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "read -P 0x23 2M 1000",
                "-c",
                "read -P 0x21 0 64k",
                s(&q),
            ],
        );
        assert!(!out.contains("Pattern verification failed"), "{out}");
    }
}

/// Extended L2: QEMU's subcluster writes over a backing file read back here; the same
/// workload through the engine passes check, compares equal to QEMU's twin, and
/// `qemu-img map` shows the same allocation (extents, zero and data flags).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_l2_matches_a_qemu_written_twin() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.raw");
    std::fs::write(
        &base,
        (0..8u32 << 20)
            .map(|i| (i % 241) as u8 + 1)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let theirs = d.join("theirs.qcow2");
    let ours = d.join("ours.qcow2");
    qemu_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=64k",
            "-b",
            "base.raw",
            "-F",
            "raw",
            s(&theirs),
            "8M",
        ],
    );
    let mut o = CreateOptions::new(8 << 20);
    o.extended_l2 = true;
    o.backing_file = Some("base.raw".into());
    o.backing_format = Some(qcow2_async::BackingFormat::Raw);
    let img = Image::create(&ours, &o, &OpenOptions::default())
        .await
        .unwrap();
    // (qemu-io command, engine operation)
    enum W {
        Data(u64, u64, u8),
        Zero(u64, u64, bool),
        Discard(u64, u64),
    }
    let ops = [
        W::Data(0, 4096, 0x31),
        W::Zero(8192, 2048, false),
        W::Data(1 << 20, 65536, 0x32),
        W::Zero(2 << 20, 65536, false),
        W::Data(4 << 20, 4096, 0x33),
        W::Zero(4 << 20, 65536, true),
        W::Data(5_000_000, 3000, 0x34),
        W::Data(6 << 20, 8192, 0x35),
        W::Discard(6 << 20, 65536),
        W::Data(7 << 20, 2048, 0x36),
        W::Zero((7 << 20) + 4096, 2048, false),
    ];
    for w in &ops {
        let cmd = match *w {
            W::Data(off, len, p) => {
                img.write_at(&vec![p; len as usize], off).await.unwrap();
                format!("write -P {p} {off} {len}")
            }
            W::Zero(off, len, unmap) => {
                img.write_zeroes(off, len, unmap).await.unwrap();
                format!("write -z {} {off} {len}", if unmap { "-u" } else { "" })
            }
            W::Discard(off, len) => {
                img.discard(off, len).await.unwrap();
                format!("discard {off} {len}")
            }
        };
        qemu_ok("qemu-io", &["-f", "qcow2", "-c", &cmd, s(&theirs)]);
    }
    img.close().await.unwrap();
    assert_check_clean(&ours);
    assert_check_clean(&theirs);
    assert_reads_like_qemu(&theirs).await;
    let out = qemu("qemu-img", &["compare", s(&theirs), s(&ours)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let map = |p: &Path| -> Vec<serde_json::Value> {
        let v: Vec<serde_json::Value> =
            serde_json::from_str(&qemu_ok("qemu-img", &["map", "--output=json", s(p)])).unwrap();
        v.into_iter()
            .map(|mut e| {
                e.as_object_mut().unwrap().remove("offset");
                e
            })
            .collect()
    };
    assert_eq!(
        map(&theirs),
        map(&ours),
        "qemu-img map differs from the QEMU-written twin"
    );
}

/// The dirty extents of bitmap `name` as QEMU sees them: `qemu-nbd -B` exports it and
/// `qemu-img map` reads it through `x-dirty-bitmap` (dirty extents show as `"data": false`).
fn qemu_dirty_extents(image: &Path, name: &str) -> Vec<(u64, u64)> {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    // Without --persistent the server exits after our one client.
    let server = common::QemuNbdOnce::bitmap_export(image, name, &sock);
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:{name}",
        s(&sock)
    );
    let out = qemu_ok("qemu-img", &["map", "--output=json", "--image-opts", &opts]);
    server.wait_exit();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut dirty: Vec<(u64, u64)> = Vec::new();
    for e in v.as_array().unwrap() {
        if e["data"].as_bool() == Some(false) {
            let (st, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            match dirty.last_mut() {
                Some(l) if l.0 + l.1 == st => l.1 += len,
                _ => dirty.push((st, len)),
            }
        }
    }
    dirty
}

fn qemu_bitmaps(image: &Path) -> Vec<serde_json::Value> {
    let out = qemu_ok("qemu-img", &["info", "--output=json", "-U", s(image)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

async fn our_dirty_extents(image: &Path, name: &str) -> Vec<(u64, u64)> {
    let img = Image::open(image, &OpenOptions::read_only()).await.unwrap();
    let size = img.virtual_size();
    img.dirty_ranges(name, 0..size)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.start, r.end - r.start))
        .collect()
}

/// Persistent bitmaps stay true: the engine's writes, zeroes and discards land in every
/// enabled bitmap exactly as QEMU's own would (a QEMU-written twin, read through
/// `qemu-nbd -B`), disabled ones stay untouched, bitmaps are flagged in use while open, and
/// the image stays check-clean.
#[tokio::test]
async fn persistent_bitmaps_track_writes_exactly_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let mk = |name: &str| {
        let p = dir.path().join(name);
        qemu_ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&p), "8M"]);
        qemu_ok("qemu-io", &["-c", "write -P 7 0 2M", s(&p)]);
        qemu_ok("qemu-img", &["bitmap", "--add", s(&p), "b64k"]);
        qemu_ok("qemu-img", &["bitmap", "--add", "-g", "4096", s(&p), "b4k"]);
        qemu_ok("qemu-img", &["bitmap", "--add", "--disable", s(&p), "off"]);
        p
    };
    let ours = mk("ours.qcow2");
    let twin = mk("twin.qcow2");
    // write, unaligned write, zeroes (with and without unmap), discard, write at the end.
    let ops: &[(&str, u64, u64)] = &[
        ("write", 65536 + 100, 5000),
        ("write", 3 << 20, 256 << 10),
        ("zero", 1 << 20, 128 << 10),
        ("zero-unmap", (5 << 20) + 4096, 4096),
        ("discard", 6 << 20, 192 << 10),
        ("write", (8 << 20) - 512, 512),
    ];
    let img = Image::open(&ours, &OpenOptions::default()).await.unwrap();
    let flags: Vec<_> = qemu_bitmaps(&ours)
        .iter()
        .map(|b| b["flags"].clone())
        .collect();
    assert!(
        flags
            .iter()
            .all(|f| f.as_array().unwrap().iter().any(|x| x == "in-use")),
        "bitmaps are flagged in use while the image is open read-write: {flags:?}"
    );
    for &(op, off, len) in ops {
        match op {
            "write" => img.write_at(&vec![0x5a; len as usize], off).await.unwrap(),
            "zero" => img.write_zeroes(off, len, false).await.unwrap(),
            "zero-unmap" => img.write_zeroes(off, len, true).await.unwrap(),
            _ => img.discard(off, len).await.unwrap(),
        }
        let cmd = match op {
            "write" => format!("write -P 0x5a {off} {len}"),
            "zero" => format!("write -z {off} {len}"),
            "zero-unmap" => format!("write -z -u {off} {len}"),
            _ => format!("discard {off} {len}"),
        };
        qemu_ok("qemu-io", &["-c", &cmd, s(&twin)]);
    }
    img.close().await.unwrap();
    assert_check_clean(&ours);
    assert_eq!(
        qemu_bitmaps(&ours),
        qemu_bitmaps(&twin),
        "same list and flags"
    );
    for name in ["b64k", "b4k", "off"] {
        let q = qemu_dirty_extents(&ours, name);
        assert_eq!(q, qemu_dirty_extents(&twin, name), "bitmap {name}");
        assert_eq!(
            our_dirty_extents(&twin, name).await,
            q,
            "we read QEMU's {name}"
        );
    }
    assert!(qemu_dirty_extents(&ours, "off").is_empty());
    assert_eq!(
        qemu_dirty_extents(&ours, "b4k")[0],
        (65536, 8192),
        "4 KiB granularity: bytes 65636..70636 dirty two bits"
    );
    // The guest data is right too.
    qemu_ok("qemu-img", &["compare", "-q", s(&ours), s(&twin)]);
}

/// Bitmap management through the engine is what qemu-img sees: add (granularity,
/// disabled), clear, enable/disable, merge, remove; an unclean close leaves the bitmaps in
/// use, and QEMU and we both treat them as inconsistent; an image written by a program
/// without bitmap support (autoclear bit cleared) loses its bitmaps without leaking.
#[tokio::test]
async fn bitmap_management_and_unclean_states_match_qemu() {
    use qcow2_async::BitmapOptions;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.qcow2");
    let img = Image::create(&p, &CreateOptions::new(4 << 20), &OpenOptions::default())
        .await
        .unwrap();
    img.add_bitmap("a", &BitmapOptions::default())
        .await
        .unwrap();
    img.add_bitmap("fine", &{
        let mut o = BitmapOptions::default();
        o.granularity = Some(512);
        o.disabled = true;
        o
    })
    .await
    .unwrap();
    assert!(img
        .add_bitmap("a", &BitmapOptions::default())
        .await
        .is_err());
    img.write_at(&[1; 1024], 1 << 20).await.unwrap();
    img.enable_bitmap("fine", true).await.unwrap();
    img.write_at(&[2; 512], 2 << 20).await.unwrap();
    img.add_bitmap("m", &BitmapOptions::default())
        .await
        .unwrap();
    img.merge_bitmaps("m", &["a", "fine"]).await.unwrap();
    img.enable_bitmap("a", false).await.unwrap();
    img.write_at(&[3; 512], 3 << 20).await.unwrap();
    img.add_bitmap("gone", &BitmapOptions::default())
        .await
        .unwrap();
    img.remove_bitmap("gone").await.unwrap();
    img.close().await.unwrap();
    assert_check_clean(&p);
    let listed: Vec<(String, u64, Vec<String>)> = qemu_bitmaps(&p)
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_string(),
                b["granularity"].as_u64().unwrap(),
                b["flags"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| f.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        vec![
            ("a".into(), 65536, vec![]),
            ("fine".into(), 512, vec!["auto".into()]),
            ("m".into(), 65536, vec!["auto".into()]),
        ]
    );
    assert_eq!(
        qemu_dirty_extents(&p, "a"),
        vec![(1 << 20, 65536), (2 << 20, 65536)],
        "disabled only after the second write"
    );
    assert_eq!(
        qemu_dirty_extents(&p, "fine"),
        vec![(2 << 20, 512), (3 << 20, 512)]
    );
    assert_eq!(
        qemu_dirty_extents(&p, "m"),
        vec![(1 << 20, 65536), (2 << 20, 65536), (3 << 20, 65536)]
    );
    // qemu-img can use what we made.
    qemu_ok("qemu-img", &["bitmap", "--clear", s(&p), "m"]);
    assert!(qemu_dirty_extents(&p, "m").is_empty());
    let img = Image::open(&p, &OpenOptions::default()).await.unwrap();
    img.clear_bitmap("fine").await.unwrap();
    img.close().await.unwrap();
    assert!(qemu_dirty_extents(&p, "fine").is_empty());

    // Unclean close: the handle is dropped without close, as a crash would leave it.
    let img = Image::open(&p, &OpenOptions::default()).await.unwrap();
    img.write_at(&[4; 512], 0).await.unwrap();
    img.flush().await.unwrap();
    drop(img);
    assert!(qemu_bitmaps(&p).iter().all(|b| b["flags"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f == "in-use")));
    assert_check_clean(&p);
    let img = Image::open(&p, &OpenOptions::default()).await.unwrap();
    assert!(img.bitmaps().await.iter().all(|b| b.inconsistent));
    assert!(
        img.dirty_ranges("a", 0..4096).await.is_err(),
        "stale bits are never served"
    );
    img.remove_bitmap("a").await.unwrap();
    img.close().await.unwrap();
    assert_check_clean(&p);
    let names: Vec<_> = qemu_bitmaps(&p).iter().map(|b| b["name"].clone()).collect();
    assert_eq!(
        names,
        ["fine", "m"],
        "inconsistent bitmaps stay until removed"
    );

    // A program without bitmap support wrote the image: autoclear bit 0 is clear.
    let mut hdr = std::fs::read(&p).unwrap()[88..96].to_vec();
    hdr[7] &= !1;
    patch(&p, 88, &hdr);
    let img = Image::open(&p, &OpenOptions::default()).await.unwrap();
    assert!(img.bitmaps().await.is_empty());
    img.close().await.unwrap();
    assert!(qemu_bitmaps(&p).is_empty());
    assert_check_clean(&p);
}

fn qemu_map(image: &Path) -> Vec<serde_json::Value> {
    let out = qemu_ok("qemu-img", &["map", "--output=json", s(image)]);
    serde_json::from_str(&out).unwrap()
}

/// Extents as `qemu-img map --output=json` prints them.
fn extents_json(extents: &[qcow2_async::MapExtent]) -> Vec<serde_json::Value> {
    extents
        .iter()
        .map(|e| {
            let mut v = serde_json::json!({
                "start": e.start, "length": e.length, "depth": e.depth,
                "present": e.present, "zero": e.zero, "data": e.data,
                "compressed": e.compressed,
            });
            if let Some(o) = e.offset {
                v["offset"] = o.into();
            }
            v
        })
        .collect()
}

/// `Image::map` reports what `qemu-img map --output=json` reports, field for field: data,
/// zero and zero-alloc clusters, compressed clusters, backing layers (qcow2 and raw, a
/// shorter backing file), and extended-L2 subclusters.
#[tokio::test]
async fn map_matches_qemu_img_map() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n);
    let io = |img: &Path, cmds: &[&str]| {
        let mut args = Vec::new();
        for c in cmds {
            args.push("-c");
            args.push(c);
        }
        args.push(s(img));
        qemu_ok("qemu-io", &args);
    };
    // A compressed base, a qcow2 middle layer, a top with every kind of entry.
    let raw = d("base.raw");
    std::fs::write(&raw, vec![0x11u8; 3 << 20]).unwrap();
    qemu_ok(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            s(&raw),
            s(&d("base.qcow2")),
        ],
    );
    qemu_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            s(&d("mid.qcow2")),
            "4M",
        ],
    );
    io(
        &d("mid.qcow2"),
        &["write -P 2 0 64k", "write -z 64k 64k", "write -P 3 2M 128k"],
    );
    for (name, opts) in [
        ("top.qcow2", "cluster_size=65536"),
        ("ext.qcow2", "extended_l2=on"),
    ] {
        let top = d(name);
        qemu_ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                opts,
                "-b",
                "mid.qcow2",
                "-F",
                "qcow2",
                s(&top),
                "5M",
            ],
        );
        io(
            &top,
            &[
                "write -P 4 128k 4k",
                "write -P 5 256k 64k",
                "write -z 256k 64k",
                "write -z 512k 64k",
                "write -z -u 640k 64k",
                "write -P 6 4M 64k",
            ],
        );
        let img = Image::open(&top, &OpenOptions::read_only()).await.unwrap();
        let ours = img.map(0, img.virtual_size()).await.unwrap();
        assert_eq!(extents_json(&ours), qemu_map(&top), "{name}");
    }
    // A raw backing file shorter than the image.
    let rt = d("rt.qcow2");
    std::fs::write(d("short.raw"), vec![9u8; 100_000]).unwrap();
    qemu_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "short.raw",
            "-F",
            "raw",
            s(&rt),
            "1M",
        ],
    );
    io(&rt, &["write -P 1 512k 64k"]);
    let img = Image::open(&rt, &OpenOptions::read_only()).await.unwrap();
    assert_eq!(
        extents_json(&img.map(0, 1 << 20).await.unwrap()),
        qemu_map(&rt)
    );
}

/// `Image::map` as a list of `qemu-img map --output=json` objects, the image opened
/// read-only with `opts`.
async fn our_map_json(p: &Path, opts: &OpenOptions) -> Vec<serde_json::Value> {
    let opts = {
        let mut o = opts.clone();
        o.read_only = true;
        o
    };
    let img = Image::open(p, &opts).await.unwrap();
    let out = extents_json(&img.map(0, img.virtual_size()).await.unwrap());
    img.close().await.unwrap();
    out
}

/// Block status looks through to the host file as QEMU's does: the parts of a data cluster
/// the file does not store (a fresh cluster that got only the guest's bytes, metadata
/// preallocation, fallocated space, a raw backing file's holes) read as zeros, and `map`
/// says so exactly where `qemu-img map` does — opened buffered and with O_DIRECT on both
/// backends alike (the O_DIRECT view once hid the file's holes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_sees_host_file_holes_like_qemu_img() {
    // The target folder is on a real disk (tmpfs may refuse O_DIRECT).
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path();
    let ours = d.join("ours.qcow2");
    let img = Image::create(&ours, &CreateOptions::new(8 << 20), &OpenOptions::default())
        .await
        .unwrap();
    img.write_at(&[1; 8192], 1 << 20).await.unwrap();
    img.write_at(&[2; 4096], (2 << 20) + 61440).await.unwrap();
    img.write_at(&[3; 65536], 3 << 20).await.unwrap();
    img.write_at(&[4; 512], (8 << 20) - 512).await.unwrap();
    img.close().await.unwrap();

    let meta = d.join("meta.qcow2");
    qemu_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            s(&meta),
            "4M",
        ],
    );
    qemu_ok("qemu-io", &["-c", "write -P 9 64k 4k", s(&meta)]);
    let falloc = d.join("falloc.qcow2");
    qemu_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "preallocation=falloc",
            s(&falloc),
            "2M",
        ],
    );

    let raw = d.join("base.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(4 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&[7; 65536], 1 << 20).unwrap();
    drop(f);
    let top = d.join("top.qcow2");
    qemu_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            s(&top),
            "4M",
        ],
    );
    qemu_ok("qemu-io", &["-c", "write -P 5 3M 4k", s(&top)]);

    // Whether fallocated space reads as a hole depends on the file system; the others have
    // real holes under data everywhere.
    for (p, holes) in [(&ours, true), (&meta, true), (&falloc, false), (&top, true)] {
        let theirs: Vec<serde_json::Value> =
            serde_json::from_str(&qemu_ok("qemu-img", &["map", "--output=json", s(p)])).unwrap();
        assert!(
            !holes
                || theirs
                    .iter()
                    .any(|e| e["data"] == true && e["zero"] == true)
                || theirs.iter().any(|e| e["depth"] == 1 && e["zero"] == true),
            "{}: the case must have holes under data to be meaningful: {theirs:?}",
            p.display()
        );
        let buffered = OpenOptions::default();
        assert_eq!(our_map_json(p, &buffered).await, theirs, "{}", p.display());
        for aio in [qcow2_async::io::Aio::Threads, qcow2_async::io::Aio::IoUring] {
            let direct = {
                let mut o = OpenOptions::default();
                o.direct = true;
                o.aio = Some(aio);
                o
            };
            assert_eq!(
                our_map_json(p, &direct).await,
                theirs,
                "{} with O_DIRECT ({aio:?})",
                p.display()
            );
        }
    }
}

/// `Image::cursor` as `tokio::io` sees it: an image QEMU made (a backing chain, compressed,
/// zero and unallocated clusters) streamed with `tokio::io::copy` is byte for byte what
/// `qemu-img convert -O raw` writes, also when read in odd-sized pieces with seeks in
/// between; a raw disk copied *into* a new image through the cursor `qemu-img compare`s
/// equal to it; a read-only image refuses writes with `PermissionDenied`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_streams_the_guest_disk_like_qemu_img_convert() {
    use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n);
    qemu_create(&d("base.qcow2"), &[], "3M");
    qemu_ok(
        "qemu-io",
        &[
            "-c",
            "write -P 1 0 1M",
            "-c",
            "write -c -P 2 2M 64k",
            s(&d("base.qcow2")),
        ],
    );
    qemu_create(
        &d("top.qcow2"),
        &["-b", "base.qcow2", "-F", "qcow2", "-o", "cluster_size=4096"],
        "3M",
    );
    qemu_ok(
        "qemu-io",
        &[
            "-c",
            "write -P 3 512k 10k",
            "-c",
            "write -z 0 4k",
            "-c",
            "write -P 4 3140000 5000",
            s(&d("top.qcow2")),
        ],
    );
    qemu_ok(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            s(&d("top.qcow2")),
            s(&d("theirs.raw")),
        ],
    );
    let theirs = std::fs::read(d("theirs.raw")).unwrap();

    let img = Image::open(&d("top.qcow2"), &OpenOptions::read_only())
        .await
        .unwrap();
    let mut out = tokio::fs::File::create(d("ours.raw")).await.unwrap();
    let n = tokio::io::copy(&mut img.cursor(), &mut out).await.unwrap();
    out.flush().await.unwrap();
    assert_eq!(n, 3 << 20);
    assert!(
        std::fs::read(d("ours.raw")).unwrap() == theirs,
        "copy differs from qemu-img convert"
    );

    // Odd pieces, seeks forwards, backwards and from the end.
    let mut c = img.cursor();
    let mut got = vec![0u8; theirs.len()];
    let mut at = 0usize;
    while at < got.len() {
        let n = c
            .read(&mut got[at..(at + 4097).min(theirs.len())])
            .await
            .unwrap();
        assert!(n > 0);
        at += n;
    }
    assert!(got == theirs);
    assert_eq!(c.read(&mut [0u8; 10]).await.unwrap(), 0, "end of the disk");
    for (to, want) in [
        (std::io::SeekFrom::End(-5000), theirs.len() - 5000),
        (std::io::SeekFrom::Start(512 << 10), 512 << 10),
        (std::io::SeekFrom::Current(-7), (512 << 10) + 100 - 7),
    ] {
        assert_eq!(c.seek(to).await.unwrap(), want as u64);
        let mut b = vec![0u8; 100];
        c.read_exact(&mut b).await.unwrap();
        assert!(b[..] == theirs[want..want + 100], "at {want}");
    }
    assert!(c
        .seek(std::io::SeekFrom::Current(-(4 << 20)))
        .await
        .is_err());
    let e = c.write_all(b"x").await.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
    drop(c);
    img.close().await.unwrap();

    // Into a new image, through the cursor.
    let img = Image::create(
        d("copy.qcow2"),
        &CreateOptions::new(theirs.len() as u64),
        &OpenOptions::default(),
    )
    .await
    .unwrap();
    let mut w = img.cursor();
    let mut src = tokio::fs::File::open(d("theirs.raw")).await.unwrap();
    assert_eq!(tokio::io::copy(&mut src, &mut w).await.unwrap(), 3 << 20);
    w.shutdown().await.unwrap();
    let e = w.write_all(b"past the end").await.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
    // The cursor is a handle of its own: the image (and its lock) lives until it goes too.
    drop(w);
    img.close().await.unwrap();
    assert_check_clean(&d("copy.qcow2"));
    qemu_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            s(&d("copy.qcow2")),
            s(&d("theirs.raw")),
        ],
    );
}
