//! Encrypted images against QEMU, both ways (reference §6): LUKS images qemu-img creates and
//! qemu-io writes read back here; LUKS images the engine creates and writes are read back
//! exactly by QEMU with the passphrase and pass `qemu-img check`; legacy AES images QEMU
//! writes read back here (read-only).

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;

use common::*;
use qcow2_async::{
    BackingFormat, CipherAlg, CipherMode, CreateOptions, EncryptionOptions, Error, HashAlg, Image,
    IvGenAlg, KdfIterations, LuksAlgorithms, OpenOptions, Secret,
};

const PASS: &str = "correct horse battery";

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn secret_object() -> String {
    format!("secret,id=s0,data={PASS}")
}

/// `--image-opts` for an encrypted qcow2 keyed by secret `s0` (for its backing file too,
/// when `backing` says so).
fn image_opts(p: &Path, backing: bool) -> String {
    let mut o = format!("driver=qcow2,file.filename={},encrypt.key-secret=s0", s(p));
    if backing {
        o.push_str(",backing.encrypt.key-secret=s0");
    }
    o
}

/// Runs qemu-io commands on an encrypted image, failing on any error or pattern mismatch.
fn qemu_io(p: &Path, cmds: &[&str]) -> String {
    let obj = secret_object();
    let opts = image_opts(p, false);
    let mut args = vec!["--object", &obj, "--image-opts", &opts];
    for c in cmds {
        args.extend_from_slice(&["-c", c]);
    }
    let out = qemu_ok("qemu-io", &args);
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("failed"),
        "qemu-io {cmds:?} on {p:?}: {out}"
    );
    out
}

/// The guest view as QEMU decrypts it (`qemu-img convert -O raw`).
fn qemu_raw(p: &Path, backing: bool) -> Vec<u8> {
    let raw = p.with_extension("qemu.raw");
    let obj = secret_object();
    let opts = image_opts(p, backing);
    qemu_ok(
        "qemu-img",
        &[
            "convert",
            "--object",
            &obj,
            "--image-opts",
            &opts,
            "-O",
            "raw",
            s(&raw),
        ],
    );
    std::fs::read(raw).unwrap()
}

/// `qemu-img check` with the passphrase: clean, no leaks.
fn assert_qemu_check_clean(p: &Path) {
    let obj = secret_object();
    let opts = image_opts(p, false);
    let out = qemu(
        "qemu-img",
        &[
            "check",
            "--output=json",
            "--object",
            &obj,
            "--image-opts",
            &opts,
        ],
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "qemu-img check printed no JSON: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(out.status.code(), Some(0), "{p:?}: {v:#}");
    assert!(
        v.get("leaks").is_none() && v.get("corruptions").is_none(),
        "{v:#}"
    );
}

/// The host offset of guest offset `guest`, read straight from the L1 and L2 tables of a
/// standard-L2 image (`qemu-img map` hides offsets of encrypted images).
fn host_offset(p: &Path, guest: u64) -> u64 {
    let f = std::fs::read(p).unwrap();
    let be64 = |at: usize| u64::from_be_bytes(f[at..at + 8].try_into().unwrap());
    let bits = u32::from_be_bytes(f[20..24].try_into().unwrap());
    let l1 = be64(40) as usize;
    let cs = 1u64 << bits;
    let per_l2 = cs / 8;
    let mask = 0x00ff_ffff_ffff_fe00u64;
    let l2 = (be64(l1 + 8 * (guest / cs / per_l2) as usize) & mask) as usize;
    let entry = be64(l2 + 8 * (guest / cs % per_l2) as usize);
    let host = entry & mask;
    assert!(
        host != 0 && entry & 1 == 0,
        "{guest:#x} is not allocated in {p:?}"
    );
    host + guest % cs
}

fn info(p: &Path) -> serde_json::Value {
    let out = qemu_ok("qemu-img", &["info", "--output=json", s(p)]);
    serde_json::from_str(&out).unwrap()
}

fn with_secret(read_only: bool, pass: &str) -> OpenOptions {
    {
        let mut o = OpenOptions::default();
        o.read_only = read_only;
        o.secret = Some(Secret::new(pass));
        o
    }
}

async fn read_all(img: &Image) -> Vec<u8> {
    let mut buf = vec![0u8; img.virtual_size() as usize];
    img.read_at(&mut buf, 0).await.unwrap();
    buf
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

fn luks_create_opts(extra: &str) -> String {
    let mut o = "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10".to_string();
    if !extra.is_empty() {
        o.push(',');
        o.push_str(extra);
    }
    o
}

fn qemu_create(p: &Path, opts: &str, size: &str) {
    let obj = secret_object();
    qemu_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            &obj,
            "-o",
            opts,
            s(p),
            size,
        ],
    );
}

/// The cipher settings exercised in both directions: QEMU's default and the CBC variants
/// with ESSIV and plain64 IVs, plus 128-bit XTS with the 32-bit plain IV and sha1.
fn cipher_settings() -> Vec<(&'static str, LuksAlgorithms)> {
    vec![
        ("", LuksAlgorithms::default()),
        (
            "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256",
            {
                let mut o = LuksAlgorithms::default();
                o.cipher_alg = CipherAlg::Aes128;
                o.cipher_mode = CipherMode::Cbc;
                o.ivgen = IvGenAlg::Essiv(HashAlg::Sha256);
                o.hash = HashAlg::Sha256;
                o
            },
        ),
        (
            "encrypt.cipher-alg=aes-256,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain64",
            {
                let mut o = LuksAlgorithms::default();
                o.cipher_alg = CipherAlg::Aes256;
                o.cipher_mode = CipherMode::Cbc;
                o.ivgen = IvGenAlg::Plain64;
                o.hash = HashAlg::Sha256;
                o
            },
        ),
        (
            "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=xts,encrypt.ivgen-alg=plain,encrypt.hash-alg=sha1",
            {
                let mut o = LuksAlgorithms::default();
                o.cipher_alg = CipherAlg::Aes128;
                o.cipher_mode = CipherMode::Xts;
                o.ivgen = IvGenAlg::Plain;
                o.hash = HashAlg::Sha1;
                o
            },
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn luks_images_qemu_writes_read_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cmds = [
        "write -P 0x5a 0 64k",
        "write -P 0x22 100k 3k",
        "write -P 0x33 1000 100",
        "write -P 0x44 1M 192k",
        "write -z 1088k 64k",
        "write -P 0x55 3M 64k",
        "discard 3M 64k",
        "write -P 0x66 4000k 12k",
    ];
    for (i, (opts, alg)) in cipher_settings().into_iter().enumerate() {
        let p = d.join(format!("qemu{i}.qcow2"));
        qemu_create(&p, &luks_create_opts(opts), "5M");
        // qemu-img create is slow for LUKS (it times PBKDF2 for a second): its fresh image
        // also serves as the layout twin of ours.
        let fresh = d.join(format!("fresh{i}.qcow2"));
        std::fs::copy(&p, &fresh).unwrap();
        let co = luks_create_options(
            5 << 20,
            alg,
            KdfIterations::Time(std::time::Duration::from_millis(10)),
        );
        assert_created_like_qemu(&fresh, &co, opts).await;
        qemu_io(&p, &cmds);
        let expected = qemu_raw(&p, false);
        let img = Image::open(&p, &with_secret(true, PASS)).await.unwrap();
        let got = read_all(&img).await;
        assert_eq!(
            first_difference(&got, &expected),
            None,
            "{opts}: differs from QEMU"
        );
        assert!(got[4096..65536].iter().all(|&b| b == 0x5a), "{opts}");
        // The algorithms we parsed are the ones asked of qemu-img.
        let v = info(&p);
        let enc = &v["format-specific"]["data"]["encrypt"];
        assert_eq!(enc["cipher-alg"], alg.cipher_alg.name(), "{opts}");
        assert_eq!(enc["cipher-mode"], alg.cipher_mode.name(), "{opts}");
        assert_eq!(enc["hash-alg"], alg.hash.name(), "{opts}");
        // Our read-only handle would keep the read-write opens below out (image locking).
        drop(img);

        // A wrong passphrase is a typed error, read-only or not (checked once: each try
        // costs a slot's PBKDF2).
        if i > 0 {
            continue;
        }
        for ro in [true, false] {
            let e = Image::open(&p, &with_secret(ro, "correct horse battery!"))
                .await
                .unwrap_err();
            assert!(matches!(e, Error::WrongPassphrase), "{e}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn luks_images_we_create_and_write_read_back_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size = 5u64 << 20;
    // Every cipher setting with 64 KiB clusters; then the default one with extended L2
    // entries (subcluster writes) and with 2 MiB clusters (whole-cluster buffers the cipher
    // splits across cores).
    let mut cases: Vec<_> = cipher_settings()
        .into_iter()
        .map(|(_, alg)| (alg, false, 65536u64))
        .collect();
    cases.push((LuksAlgorithms::default(), true, 65536));
    cases.push((LuksAlgorithms::default(), false, 2 << 20));
    for (i, (alg, extended_l2, cluster_size)) in cases.into_iter().enumerate() {
        let p = d.join(format!("ours{i}.qcow2"));
        let mut co = luks_create_options(size, alg, KdfIterations::Count(2000));
        co.extended_l2 = extended_l2;
        co.cluster_size = cluster_size;
        // The create passphrase also opens the new image.
        let img = Image::create(&p, &co, &OpenOptions::default())
            .await
            .unwrap();
        let mut model = vec![0u8; size as usize];
        let mut put = |off: usize, data: &[u8]| model[off..off + data.len()].copy_from_slice(data);
        // Whole cluster, sub-sector pieces (read-modify-write of a sector), a write across
        // a cluster boundary, and one that leaves most of a fresh cluster unwritten.
        for (off, len, byte) in [
            (0usize, 65536usize, 0x5au8),
            (100 << 10, 3 << 10, 0x22),
            (1000, 100, 0x33),
            (1001, 1, 0x34),
            ((1 << 20) - 700, 1400, 0x44),
            (4000 << 10, 512, 0x66),
        ] {
            let data = vec![byte; len];
            img.write_at(&data, off as u64).await.unwrap();
            put(off, &data);
        }
        img.write_zeroes(2 << 20, 64 << 10, false).await.unwrap();
        assert!(
            read_all(&img).await == model,
            "{alg:?}: reads back differently"
        );
        img.close().await.unwrap();

        let got = qemu_raw(&p, false);
        assert_eq!(
            first_difference(&got, &model),
            None,
            "{alg:?}: QEMU reads something else"
        );
        qemu_io(&p, &["read -P 0x5a 4k 60k", "read -P 0x66 4000k 512"]);
        // The rest of the cluster written at 4000k is stored as encrypted zeros (or left
        // unallocated, with subclusters): QEMU reads zeros, the file holds ciphertext.
        qemu_io(&p, &["read -P 0 3968k 32k", "read -P 0 4000.5k 63.5k"]);
        if !extended_l2 {
            let host = host_offset(&p, 3968 << 10) as usize;
            let file = std::fs::read(&p).unwrap();
            assert!(
                file[host..host + (32 << 10)].iter().any(|&b| b != 0),
                "{alg:?}: unwritten part of a new cluster stored as raw zeros"
            );
        }
        assert_qemu_check_clean(&p);
        let v = info(&p);
        let enc = &v["format-specific"]["data"]["encrypt"];
        assert_eq!(enc["format"], "luks");
        assert_eq!(enc["cipher-alg"], alg.cipher_alg.name());
        assert_eq!(enc["cipher-mode"], alg.cipher_mode.name());
        assert_eq!(enc["ivgen-alg"], alg.ivgen.name());
        assert_eq!(enc["slots"][0]["iters"], 2000);

        // QEMU writes, we read: both keep working on the same image.
        qemu_io(&p, &["write -P 0x77 192k 64k"]);
        let img = Image::open(&p, &with_secret(true, PASS)).await.unwrap();
        let mut buf = vec![0u8; 65536];
        img.read_at(&mut buf, 192 << 10).await.unwrap();
        assert!(buf.iter().all(|&b| b == 0x77));
    }
}

/// Creates with the engine an image like `theirs` (made by qemu-img with the same settings)
/// and asserts QEMU's layout: the LUKS region right after the L1 table (after preallocated
/// data), cluster-rounded and zero-filled, the same header extension, key-slot layout and
/// file length; and a clean `qemu-img check`.
async fn assert_created_like_qemu(theirs: &Path, co: &CreateOptions, what: &str) {
    let ours = theirs.with_extension("ours.qcow2");
    Image::create(&ours, co, &with_secret(false, PASS))
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
    let (a, b) = (info(theirs), info(&ours));
    let (ea, eb) = (
        &a["format-specific"]["data"]["encrypt"],
        &b["format-specific"]["data"]["encrypt"],
    );
    for k in [
        "format",
        "cipher-alg",
        "cipher-mode",
        "ivgen-alg",
        "ivgen-hash-alg",
        "hash-alg",
        "payload-offset",
    ] {
        assert_eq!(ea[k], eb[k], "{what}: {k}");
    }
    for slot in 0..8 {
        for k in ["key-offset", "active", "stripes"] {
            assert_eq!(
                ea["slots"][slot][k], eb["slots"][slot][k],
                "{what}: slot {slot} {k}"
            );
        }
    }
    assert_eq!(a["encrypted"], true);
    assert_eq!(b["encrypted"], true);
    let header = |p: &Path| {
        let p = p.to_path_buf();
        async move {
            Image::open(&p, &OpenOptions::read_only())
                .await
                .unwrap()
                .header()
                .await
        }
    };
    let (ha, hb) = (header(theirs).await, header(&ours).await);
    assert_eq!(ha.encryption, hb.encryption, "{what}: crypto extension");
    assert_eq!(ha.header.crypt_method, hb.header.crypt_method);
    assert_eq!(ha.header.l1_table_offset, hb.header.l1_table_offset);
    assert_eq!(
        std::fs::metadata(theirs).unwrap().len(),
        std::fs::metadata(&ours).unwrap().len(),
        "{what}: file length"
    );
    assert_qemu_check_clean(&ours);
    // A preallocated cluster of an encrypted image decrypts raw zeros: QEMU and we read the
    // same (non-zero) bytes.
    if co.preallocation != qcow2_async::Preallocation::Off {
        let img = Image::open(&ours, &with_secret(true, PASS)).await.unwrap();
        let (x, y) = (read_all(&img).await, qemu_raw(&ours, false));
        assert_eq!(first_difference(&x, &y), None, "{what}");
        assert!(
            x.iter().any(|&v| v != 0),
            "decrypted raw zeros are not zeros"
        );
    }
}

fn luks_create_options(
    size: u64,
    algorithms: LuksAlgorithms,
    iterations: KdfIterations,
) -> CreateOptions {
    let mut co = CreateOptions::new(size);
    co.encryption = Some({
        let mut o = EncryptionOptions::luks(Secret::new(PASS));
        o.algorithms = algorithms;
        o.iterations = iterations;
        o
    });
    co
}

/// Layouts beyond the cipher settings (which `luks_images_qemu_writes_read_back_exactly`
/// compares): 512-byte clusters, and preallocation, where QEMU puts the LUKS region after
/// the preallocated data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_luks_layout_matches_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let timed = KdfIterations::Time(std::time::Duration::from_millis(10));
    let p = d.join("c512.qcow2");
    qemu_create(&p, &luks_create_opts("cluster_size=512"), "4M");
    let mut co = luks_create_options(4 << 20, LuksAlgorithms::default(), timed);
    co.cluster_size = 512;
    assert_created_like_qemu(&p, &co, "cluster_size=512").await;

    let p = d.join("prealloc.qcow2");
    qemu_create(&p, &luks_create_opts("preallocation=metadata"), "4M");
    let mut co = luks_create_options(4 << 20, LuksAlgorithms::default(), timed);
    co.preallocation = qcow2_async::Preallocation::Metadata;
    assert_created_like_qemu(&p, &co, "preallocation=metadata").await;
}

/// Encrypted images over plain backing files copy on write correctly in both directions,
/// and a plain image over an encrypted backing file reads through it with the passphrase.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_backing_chains_work_as_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.qcow2");
    qemu_ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&base), "2M"]);
    qemu_ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0xb0 0 2M", s(&base)],
    );
    // Encrypted top over a plain base, written by us: partial writes COW base data.
    let top = d.join("top.qcow2");
    let mut co = CreateOptions::new(2 << 20);
    co.backing_file = Some("base.qcow2".into());
    co.backing_format = Some(BackingFormat::Qcow2);
    co.encryption = Some({
        let mut o = EncryptionOptions::luks(Secret::new(PASS));
        o.algorithms = LuksAlgorithms::default();
        o.iterations = KdfIterations::Count(1000);
        o
    });
    let img = Image::create(&top, &co, &with_secret(false, PASS))
        .await
        .unwrap();
    img.write_at(&[0x11; 4096], 8192).await.unwrap();
    img.write_at(&[0x12; 10], 70000).await.unwrap();
    img.close().await.unwrap();
    let mut model = vec![0xb0u8; 2 << 20];
    model[8192..8192 + 4096].fill(0x11);
    model[70000..70010].fill(0x12);
    assert_eq!(first_difference(&qemu_raw(&top, false), &model), None);
    assert_qemu_check_clean(&top);

    // Plain top over an encrypted base, both made by QEMU: we read the base decrypted.
    let ebase = d.join("ebase.qcow2");
    qemu_create(&ebase, &luks_create_opts(""), "2M");
    qemu_io(&ebase, &["write -P 0xc0 0 1M"]);
    let ptop = d.join("ptop.qcow2");
    qemu_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "ebase.qcow2",
            "-F",
            "qcow2",
            s(&ptop),
        ],
    );
    let img = Image::open(&ptop, &with_secret(false, PASS)).await.unwrap();
    img.write_at(&[0x21; 512], 512).await.unwrap();
    img.close().await.unwrap();
    let mut model = vec![0u8; 2 << 20];
    model[..1 << 20].fill(0xc0);
    model[512..1024].fill(0x21);
    let img = Image::open(&ptop, &with_secret(true, PASS)).await.unwrap();
    assert_eq!(first_difference(&read_all(&img).await, &model), None);
    let obj = secret_object();
    let opts = format!(
        "driver=qcow2,file.filename={},backing.encrypt.key-secret=s0",
        s(&ptop)
    );
    let raw = d.join("ptop.raw");
    qemu_ok(
        "qemu-img",
        &[
            "convert",
            "--object",
            &obj,
            "--image-opts",
            &opts,
            "-O",
            "raw",
            s(&raw),
        ],
    );
    assert_eq!(first_difference(&std::fs::read(raw).unwrap(), &model), None);
}

/// Legacy AES (crypt_method 1): what QEMU writes reads back here (AES-128-CBC, the key from
/// the passphrase's first 16 bytes, IV from the guest sector), read-only; a read-write open
/// is refused naming the reason. Without a key check, a wrong passphrase reads garbage, as
/// in QEMU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_aes_images_read_back_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = d.join("aes.qcow2");
    qemu_create(&p, "encrypt.format=aes,encrypt.key-secret=s0", "3M");
    qemu_io(
        &p,
        &[
            "write -P 0x5a 64k 64k",
            "write -P 0x21 1000 100",
            "write -P 0x6b 2M 4k",
        ],
    );
    let expected = qemu_raw(&p, false);
    assert!(expected[65536..131072].iter().all(|&b| b == 0x5a));
    let img = Image::open(&p, &with_secret(true, PASS)).await.unwrap();
    assert_eq!(first_difference(&read_all(&img).await, &expected), None);
    // A reader keeps writers out (image locking): the refusal below must be the cipher's.
    drop(img);

    match Image::open(&p, &with_secret(false, PASS))
        .await
        .unwrap_err()
    {
        Error::Unsupported { feature, .. } => assert!(feature.contains("legacy AES"), "{feature}"),
        e => panic!("unexpected {e}"),
    }
    let wrong = Image::open(&p, &with_secret(true, "not the passphrase"))
        .await
        .unwrap();
    let mut buf = vec![0u8; 65536];
    wrong.read_at(&mut buf, 65536).await.unwrap();
    assert!(buf.iter().any(|&b| b != 0x5a));
    // Only the first 16 bytes of the passphrase count.
    let long = Image::open(&p, &with_secret(true, &format!("{PASS}-and more")))
        .await
        .unwrap();
    long.read_at(&mut buf, 65536).await.unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
}
