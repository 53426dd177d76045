//! Golden tests for the format crate against QEMU itself.
//!
//! Every image here is made at test time by `qemu-img` (and `qemu-io` for a few writes) in a
//! temporary directory, then read back with nothing but `qcow2-format` and compared with what
//! QEMU reports about it:
//!
//! * every field of `qemu-img info --output=json` (top level and qcow2 format-specific data,
//!   including LUKS parameters, bitmaps and snapshots); keys this test does not know make it
//!   fail, so a new QEMU field cannot slip by unnoticed;
//! * header values `info` does not show, against the fresh-image layout QEMU is known to
//!   produce (reference §1.3, §1.4);
//! * the snapshot list printed by `qemu-img snapshot -l`;
//! * `qemu-img check --output=json`: the refcount of *every* host cluster, read through the
//!   decoded refcount table and blocks, must equal the number of references found by walking
//!   the decoded metadata (header, refcount structures, L1/L2 trees of the active image and of
//!   every snapshot, snapshot table, LUKS region, bitmap directory/tables/data), and the
//!   allocation counters must match QEMU's;
//! * L2 entries written by `qemu-io`.
//!
//! There is no skipping: without `qemu-img` the test panics and says how to install it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use qcow2_format::bitmap::{
    bitmap_bits, bitmap_table_size, decode_bitmap_table, test_bit, BitmapDirectory,
    BitmapTableEntry,
};
use qcow2_format::header::qemu_feature_table;
use qcow2_format::l2::decode_extended;
use qcow2_format::luks::LuksHeader;
use qcow2_format::snapshot::{SnapshotEntry, SnapshotTable};
use qcow2_format::{
    AutoclearFeatures, CompatibleFeatures, CompressionType, CryptMethod, HostOffset, ImageHeader,
    IncompatibleFeatures, L1Entry, L2Entry, L2Format, Limits, ReftableEntry, SubclusterState,
    Version,
};
use serde_json::{Map, Value};

// ------------------------------------------------------------------------------------------
// Running QEMU

const INSTALL_HINT: &str = "install qemu-utils (bash scripts/test.sh does it)";

fn run(tool: &str, dir: &Path, args: &[&str]) -> Output {
    match Command::new(tool)
        .args(args)
        .current_dir(dir)
        // `snapshot -l` prints local time; pin it so the test can format dates itself.
        .env("TZ", "UTC")
        .output()
    {
        Ok(out) => {
            assert!(
                out.status.success(),
                "{tool} {args:?} failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            out
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("{tool} not found: {INSTALL_HINT}")
        }
        Err(e) => panic!("cannot run {tool}: {e}"),
    }
}

/// Runs `qemu-img` in `dir`; panics if it is missing or fails.
fn qemu_img(dir: &Path, args: &[&str]) -> Output {
    run("qemu-img", dir, args)
}

/// Runs `qemu-io` in `dir`; panics if it is missing or fails.
fn qemu_io(dir: &Path, args: &[&str]) -> Output {
    run("qemu-io", dir, args)
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).expect("qemu-img printed invalid JSON")
}

// ------------------------------------------------------------------------------------------
// The matrix

const SECRET: &str = "secret,id=sec0,data=pass";
const BASE: &str = "base.qcow2";

#[derive(Clone, Copy)]
enum Step {
    /// `qemu-img snapshot -c NAME`.
    Snapshot(&'static str),
    /// `qemu-img bitmap --add [ARGS...] img NAME`: (name, extra args).
    Bitmap(&'static str, &'static [&'static str]),
    /// One `qemu-io` run with these `-c` commands.
    Io(&'static [&'static str]),
}

#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    size: &'static str,
    /// `-o` options (without encryption, which `encrypt` adds).
    opts: &'static str,
    /// `Some("luks")` / `Some("aes")`.
    encrypt: Option<&'static str>,
    backing: bool,
    steps: &'static [Step],
    /// Whether the reftable, refblock 0 and L1 sit where a plain `qemu-img create` puts them
    /// (clusters 1, 2, 3) and the reftable is one cluster.
    default_layout: bool,
}

const DEFAULT: Case = Case {
    name: "",
    size: "64M",
    opts: "",
    encrypt: None,
    backing: false,
    steps: &[],
    default_layout: true,
};

const SNAPSHOTS: &[Step] = &[Step::Snapshot("s1"), Step::Snapshot("s2")];
const BITMAPS: &[Step] = &[
    Step::Bitmap("b0", &[]),
    Step::Bitmap("b1", &["--granularity", "128k"]),
    Step::Bitmap("b2", &["--disable"]),
];
const SNAPSHOTS_AND_BITMAPS: &[Step] = &[
    Step::Snapshot("s1"),
    Step::Snapshot("s2"),
    Step::Bitmap("b0", &[]),
    Step::Bitmap("b1", &["--granularity", "1M"]),
    Step::Bitmap("b2", &["--disable", "--granularity", "4k"]),
];

fn matrix() -> Vec<Case> {
    vec![
        // One axis at a time.
        Case {
            name: "cluster512",
            opts: "cluster_size=512",
            ..DEFAULT
        },
        Case {
            name: "cluster4k",
            opts: "cluster_size=4096",
            ..DEFAULT
        },
        Case {
            name: "cluster64k",
            size: "1G",
            ..DEFAULT
        },
        Case {
            name: "cluster2m",
            opts: "cluster_size=2M",
            ..DEFAULT
        },
        Case {
            name: "refcount1",
            opts: "refcount_bits=1",
            ..DEFAULT
        },
        Case {
            name: "refcount8",
            opts: "refcount_bits=8",
            ..DEFAULT
        },
        Case {
            name: "refcount16",
            opts: "refcount_bits=16",
            ..DEFAULT
        },
        Case {
            name: "refcount64",
            opts: "refcount_bits=64",
            ..DEFAULT
        },
        Case {
            name: "compat010",
            opts: "compat=0.10",
            ..DEFAULT
        },
        Case {
            name: "compat11",
            opts: "compat=1.1",
            ..DEFAULT
        },
        Case {
            name: "lazy",
            opts: "lazy_refcounts=on",
            ..DEFAULT
        },
        Case {
            name: "extl2",
            opts: "extended_l2=on,cluster_size=64k",
            ..DEFAULT
        },
        Case {
            name: "zstd",
            opts: "compression_type=zstd",
            ..DEFAULT
        },
        Case {
            name: "luks",
            encrypt: Some("luks"),
            ..DEFAULT
        },
        Case {
            name: "aes",
            encrypt: Some("aes"),
            ..DEFAULT
        },
        Case {
            name: "datafile",
            opts: "data_file=datafile.raw",
            ..DEFAULT
        },
        Case {
            name: "datafile_raw",
            opts: "data_file=datafile_raw.raw,data_file_raw=on",
            ..DEFAULT
        },
        Case {
            name: "backing",
            backing: true,
            ..DEFAULT
        },
        Case {
            name: "snapshots",
            steps: SNAPSHOTS,
            ..DEFAULT
        },
        Case {
            name: "bitmaps",
            steps: BITMAPS,
            ..DEFAULT
        },
        // Writes with enabled bitmaps: QEMU stores bitmap data clusters on close.
        Case {
            name: "bitmaps_written",
            steps: &[
                Step::Bitmap("b0", &[]),
                Step::Bitmap("b1", &["--granularity", "4k"]),
                Step::Bitmap("b2", &["--disable"]),
                Step::Io(&["write -P 1 0 64k", "write -P 2 32M 64k"]),
            ],
            ..DEFAULT
        },
        // A few combinations.
        Case {
            name: "v2_4k_backing_snapshots",
            opts: "compat=0.10,cluster_size=4096",
            backing: true,
            steps: SNAPSHOTS,
            ..DEFAULT
        },
        // 64 refcounts per refblock: the snapshot L1 copies need a second refblock.
        Case {
            name: "c512_rc64_snapshots_bitmaps",
            opts: "cluster_size=512,refcount_bits=64",
            steps: SNAPSHOTS_AND_BITMAPS,
            ..DEFAULT
        },
        Case {
            name: "extl2_16k_zstd_lazy_rc8_bitmaps",
            opts: "extended_l2=on,cluster_size=16k,compression_type=zstd,lazy_refcounts=on,\
                   refcount_bits=8",
            steps: BITMAPS,
            ..DEFAULT
        },
        Case {
            name: "luks_4k_rc1",
            opts: "cluster_size=4096,refcount_bits=1",
            encrypt: Some("luks"),
            ..DEFAULT
        },
        Case {
            name: "c2m_zstd_backing_bitmaps",
            opts: "cluster_size=2M,compression_type=zstd",
            backing: true,
            steps: BITMAPS,
            ..DEFAULT
        },
        Case {
            name: "datafile_lazy_rc64_bitmaps",
            opts: "data_file=datafile2.raw,lazy_refcounts=on,refcount_bits=64",
            steps: BITMAPS,
            ..DEFAULT
        },
        // Written images (the L2 entries are checked in `written_l2_entries`).
        Case {
            name: "written",
            steps: &[Step::Io(&["write -P 0xab 0 64k", "write -z 1M 64k"])],
            ..DEFAULT
        },
        Case {
            name: "written_snapshot",
            steps: &[
                Step::Io(&["write -P 0xab 0 64k", "write -c -P 0xcd 256k 64k"]),
                Step::Snapshot("s1"),
                Step::Io(&["write -P 0xef 128k 64k"]),
            ],
            ..DEFAULT
        },
        Case {
            name: "written_extl2",
            opts: "extended_l2=on,cluster_size=64k",
            steps: &[Step::Io(&[
                "write -P 0xab 0 4k",
                "write -z 8k 2k",
                "write -z 2M 64k",
            ])],
            ..DEFAULT
        },
        Case {
            name: "written_zstd_rc1",
            opts: "compression_type=zstd,refcount_bits=1",
            steps: &[Step::Io(&[
                "write -c -P 0x11 0 64k",
                "write -c -P 0x22 64k 64k",
            ])],
            ..DEFAULT
        },
        Case {
            name: "written_datafile",
            opts: "data_file=datafile3.raw",
            steps: &[Step::Io(&["write -P 0xab 0 64k", "write -z 1M 64k"])],
            ..DEFAULT
        },
    ]
}

fn image_name(case: &Case) -> String {
    format!("{}.qcow2", case.name)
}

/// Builds one image in `dir` and returns its path.
fn build(dir: &Path, case: &Case) -> PathBuf {
    let img = image_name(case);
    let mut opts = case.opts.to_string();
    if let Some(fmt) = case.encrypt {
        if !opts.is_empty() {
            opts.push(',');
        }
        opts.push_str(&format!("encrypt.format={fmt},encrypt.key-secret=sec0"));
        if fmt == "luks" {
            opts.push_str(",encrypt.iter-time=10");
        }
    }
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if case.encrypt.is_some() {
        args.extend(["--object", SECRET]);
    }
    if !opts.is_empty() {
        args.extend(["-o", &opts]);
    }
    if case.backing {
        args.extend(["-b", BASE, "-F", "qcow2"]);
    }
    args.extend([img.as_str(), case.size]);
    qemu_img(dir, &args);
    for step in case.steps {
        match *step {
            Step::Snapshot(name) => {
                qemu_img(dir, &["snapshot", "-c", name, &img]);
            }
            Step::Bitmap(name, extra) => {
                let mut args = vec!["bitmap", "--add"];
                args.extend(extra);
                args.extend([img.as_str(), name]);
                qemu_img(dir, &args);
            }
            Step::Io(cmds) => {
                let mut args = Vec::new();
                for c in cmds {
                    args.extend(["-c", *c]);
                }
                args.push(img.as_str());
                qemu_io(dir, &args);
            }
        }
    }
    dir.join(img)
}

/// `qemu-img <cmd> [--object] <image or --image-opts>` with the secret when encrypted.
fn img_cmd<'a>(case: &Case, cmd: &'a str, img: &'a str, opts: &'a mut String) -> Vec<&'a str> {
    let mut args = vec![cmd];
    if case.encrypt.is_some() {
        *opts = format!("driver=qcow2,file.filename={img},encrypt.key-secret=sec0");
        args.extend(["--object", SECRET, "--image-opts", opts.as_str()]);
    } else {
        args.push(img);
    }
    args
}

// ------------------------------------------------------------------------------------------
// Reading the file

/// `len` bytes at `off`, zero-filled past the end of the file as QEMU reads them.
fn read_at(file: &[u8], off: u64, len: u64) -> Vec<u8> {
    let mut out = vec![0u8; len as usize];
    let start = (off as usize).min(file.len());
    let end = (off as usize).saturating_add(len as usize).min(file.len());
    out[..end - start].copy_from_slice(&file[start..end]);
    out
}

fn be64s(bytes: &[u8]) -> impl Iterator<Item = u64> + '_ {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
}

fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().unwrap())
}

/// Everything decoded from one image.
struct Decoded {
    file: Vec<u8>,
    hdr: ImageHeader,
    cs: u64,
    l2fmt: L2Format,
    /// Raw active L1 entries.
    l1: Vec<L1Entry>,
    /// Refcount blocks by reftable index.
    refblocks: BTreeMap<u64, Vec<u8>>,
    snapshots: Vec<SnapshotEntry>,
    snapshot_table_len: u64,
    bitmaps: BitmapDirectory,
}

impl Decoded {
    fn read(path: &Path) -> Decoded {
        let file = std::fs::read(path).unwrap();
        let cs = ImageHeader::cluster_size_hint(&file[..24]).unwrap();
        let hdr = ImageHeader::decode(&file[..(cs as usize).min(file.len())], &Limits::QEMU)
            .unwrap_or_else(|e| panic!("{}: header does not decode: {e}", path.display()));
        let h = &hdr.header;
        assert_eq!(h.cluster_size(), cs);
        let l2fmt = L2Format {
            cluster_bits: h.cluster_bits,
            extended_l2: h.incompatible.contains(IncompatibleFeatures::EXTENDED_L2),
            external_data_file: h
                .incompatible
                .contains(IncompatibleFeatures::EXTERNAL_DATA_FILE),
            zero_flag: h.version == Version::V3,
        };
        let l1 = decode_l1(&file, h.l1_table_offset, h.l1_size, h.cluster_bits);

        // Refcounts, through the decoded reftable and refblocks.
        let rt = read_at(
            &file,
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * cs,
        );
        let mut refblocks = BTreeMap::new();
        for (i, raw) in be64s(&rt).enumerate() {
            let e = ReftableEntry::decode(raw, h.cluster_bits)
                .unwrap_or_else(|e| panic!("reftable[{i}] = {raw:#x}: {e}"));
            if let Some(off) = e.0 {
                refblocks.insert(i as u64, read_at(&file, off, cs));
            }
        }
        let (snapshots, snapshot_table_len) = decode_snapshots(&file, &hdr, cs);
        let bitmaps = match &hdr.bitmaps {
            Some(b) => {
                let bytes = read_at(&file, b.directory_offset, b.directory_size);
                let dir = BitmapDirectory::decode(&bytes, b.nb_bitmaps, &Limits::QEMU)
                    .unwrap_or_else(|e| panic!("bitmap directory does not decode: {e}"));
                dir.validate_qemu(cs, h.size, &Limits::QEMU)
                    .unwrap_or_else(|(i, e)| panic!("bitmap {i} fails QEMU's checks: {e}"));
                assert!(
                    dir.encode().unwrap() == bytes,
                    "bitmap directory re-encodes differently"
                );
                dir
            }
            None => BitmapDirectory::default(),
        };
        Decoded {
            file,
            hdr,
            cs,
            l2fmt,
            l1,
            refblocks,
            snapshots,
            snapshot_table_len,
            bitmaps,
        }
    }

    /// On-disk refcount of the cluster containing `host`.
    fn refcount(&self, host: u64) -> u64 {
        let h = &self.hdr.header;
        let bits = h.refcount_order.block_bits(h.cluster_bits);
        let c = host / self.cs;
        match self.refblocks.get(&(c >> bits)) {
            Some(block) => h.refcount_order.get(block, c & ((1 << bits) - 1)).unwrap(),
            None => 0,
        }
    }

    /// Clusters with a non-zero refcount.
    fn used_clusters(&self) -> Vec<u64> {
        let h = &self.hdr.header;
        let order = h.refcount_order;
        let per_block = order.entries_per_block(h.cluster_bits);
        let mut out = Vec::new();
        for (i, block) in &self.refblocks {
            for j in 0..per_block {
                if order.get(block, j).unwrap() != 0 {
                    out.push(i * per_block + j);
                }
            }
        }
        out
    }

    /// The L2 table at `off`: (first word, bitmap or 0) per entry, decoded.
    fn l2_table(&self, off: u64) -> Vec<(L2Entry, u64)> {
        let bytes = read_at(&self.file, off, self.cs);
        let step = if self.l2fmt.extended_l2 { 16 } else { 8 };
        bytes
            .chunks_exact(step)
            .enumerate()
            .map(|(i, c)| {
                let raw = be64(c, 0);
                if self.l2fmt.extended_l2 {
                    let bm = be64(c, 8);
                    let (e, _) = decode_extended(raw, bm, self.l2fmt)
                        .unwrap_or_else(|e| panic!("L2 @{off:#x}[{i}] = {raw:#x}/{bm:#x}: {e}"));
                    (e, bm)
                } else {
                    let e = L2Entry::decode(raw, self.l2fmt)
                        .unwrap_or_else(|e| panic!("L2 @{off:#x}[{i}] = {raw:#x}: {e}"));
                    (e, 0)
                }
            })
            .collect()
    }
}

fn decode_l1(file: &[u8], off: u64, size: u32, cluster_bits: u32) -> Vec<L1Entry> {
    be64s(&read_at(file, off, u64::from(size) * 8))
        .enumerate()
        .map(|(i, raw)| {
            L1Entry::decode(raw, cluster_bits)
                .unwrap_or_else(|e| panic!("L1 @{off:#x}[{i}] = {raw:#x}: {e}"))
        })
        .collect()
}

/// The snapshot table through `SnapshotTable`, checked against QEMU's rules and re-encoded
/// byte for byte. Returns the entries and the table's length in bytes.
fn decode_snapshots(file: &[u8], hdr: &ImageHeader, cs: u64) -> (Vec<SnapshotEntry>, u64) {
    let h = &hdr.header;
    if h.nb_snapshots == 0 {
        return (vec![], 0);
    }
    // The table's length is not stored: hand the decoder the rest of the file.
    let rest = read_at(
        file,
        h.snapshots_offset,
        file.len() as u64 - h.snapshots_offset,
    );
    let (table, len) =
        SnapshotTable::decode(&rest, h.nb_snapshots, h.version.number(), &Limits::QEMU)
            .unwrap_or_else(|e| panic!("snapshot table does not decode: {e}"));
    for e in &table.entries {
        e.validate(cs, &Limits::QEMU)
            .unwrap_or_else(|err| panic!("snapshot {}: {err}", e.name));
    }
    assert!(
        table.encode(h.version.number()).unwrap() == rest[..len],
        "snapshot table re-encodes differently"
    );
    (table.entries, len as u64)
}

// ------------------------------------------------------------------------------------------
// Comparing with `qemu-img info`

/// Takes `key` out of `obj`, panicking if absent: whatever is left at the end was not compared.
fn take(obj: &mut Map<String, Value>, key: &str, ctx: &str) -> Value {
    obj.remove(key)
        .unwrap_or_else(|| panic!("{ctx}: qemu-img info has no {key:?}: {obj:?}"))
}

fn assert_consumed(obj: &Map<String, Value>, ctx: &str) {
    assert!(
        obj.is_empty(),
        "{ctx}: fields of qemu-img info not compared: {obj:?}"
    );
}

fn compare_info(case: &Case, d: &Decoded, info: Value) {
    let ctx = case.name;
    let h = &d.hdr.header;
    let Value::Object(mut top) = info else {
        panic!("{ctx}: info is not an object")
    };

    // Not about the image format: the protocol layer, our own path, st_blocks.
    top.remove("children");
    assert_eq!(take(&mut top, "filename", ctx), image_name(case).as_str());
    assert_eq!(take(&mut top, "format", ctx), "qcow2");
    assert!(take(&mut top, "actual-size", ctx).is_u64());

    assert_eq!(
        take(&mut top, "virtual-size", ctx),
        h.size,
        "{ctx}: virtual-size"
    );
    assert_eq!(
        take(&mut top, "cluster-size", ctx),
        d.cs,
        "{ctx}: cluster-size"
    );
    assert_eq!(
        take(&mut top, "dirty-flag", ctx),
        h.incompatible.contains(IncompatibleFeatures::DIRTY),
        "{ctx}: dirty-flag"
    );
    match top.remove("encrypted") {
        Some(v) => assert_eq!(v, true, "{ctx}: encrypted"),
        None => assert_eq!(h.crypt_method, CryptMethod::None, "{ctx}: encrypted"),
    }
    assert_eq!(
        top.remove("backing-filename")
            .as_ref()
            .and_then(Value::as_str),
        d.hdr.backing_file.as_deref(),
        "{ctx}: backing-filename"
    );
    assert_eq!(
        top.remove("backing-filename-format")
            .as_ref()
            .and_then(Value::as_str),
        d.hdr.backing_format.as_deref(),
        "{ctx}: backing-filename-format"
    );
    if let Some(full) = top.remove("full-backing-filename") {
        let name = d
            .hdr
            .backing_file
            .as_deref()
            .expect("full-backing-filename without backing");
        assert!(
            full.as_str().unwrap().ends_with(name),
            "{ctx}: full-backing-filename {full}"
        );
    }
    compare_snapshots_info(ctx, d, top.remove("snapshots"));

    let mut fs = match take(&mut top, "format-specific", ctx) {
        Value::Object(o) => o,
        v => panic!("{ctx}: format-specific {v}"),
    };
    assert_eq!(take(&mut fs, "type", ctx), "qcow2");
    let Value::Object(mut data) = take(&mut fs, "data", ctx) else {
        panic!("{ctx}: data")
    };
    assert_consumed(&fs, ctx);
    compare_format_specific(ctx, d, &mut data);
    assert_consumed(&data, ctx);
    assert_consumed(&top, ctx);
}

fn compare_format_specific(ctx: &str, d: &Decoded, data: &mut Map<String, Value>) {
    let h = &d.hdr.header;
    let compat = match h.version {
        Version::V2 => "0.10",
        Version::V3 => "1.1",
    };
    assert_eq!(take(data, "compat", ctx), compat, "{ctx}: compat");
    let ct = match h.compression_type {
        CompressionType::Deflate => "zlib",
        CompressionType::Zstd => "zstd",
    };
    assert_eq!(
        take(data, "compression-type", ctx),
        ct,
        "{ctx}: compression-type"
    );
    assert_eq!(
        take(data, "refcount-bits", ctx),
        h.refcount_order.bits(),
        "{ctx}: refcount-bits"
    );
    if h.version == Version::V3 {
        // QEMU shows these only for compat=1.1.
        assert_eq!(
            take(data, "lazy-refcounts", ctx),
            h.compatible.contains(CompatibleFeatures::LAZY_REFCOUNTS),
            "{ctx}: lazy-refcounts"
        );
        assert_eq!(
            take(data, "corrupt", ctx),
            h.incompatible.contains(IncompatibleFeatures::CORRUPT),
            "{ctx}: corrupt"
        );
        assert_eq!(
            take(data, "extended-l2", ctx),
            h.incompatible.contains(IncompatibleFeatures::EXTENDED_L2),
            "{ctx}: extended-l2"
        );
    }
    let ext_data = h
        .incompatible
        .contains(IncompatibleFeatures::EXTERNAL_DATA_FILE);
    assert_eq!(
        data.remove("data-file").as_ref().and_then(Value::as_str),
        d.hdr.data_file.as_deref(),
        "{ctx}: data-file"
    );
    assert_eq!(
        ext_data,
        d.hdr.data_file.is_some(),
        "{ctx}: data file bit vs name"
    );
    match data.remove("data-file-raw") {
        Some(v) => assert_eq!(
            v,
            h.autoclear.contains(AutoclearFeatures::DATA_FILE_RAW),
            "{ctx}: data-file-raw"
        ),
        None => assert!(!ext_data, "{ctx}: data-file-raw missing"),
    }
    compare_encryption(ctx, d, data.remove("encrypt"));
    compare_bitmaps_info(ctx, d, data.remove("bitmaps"));
}

fn compare_encryption(ctx: &str, d: &Decoded, info: Option<Value>) {
    let h = &d.hdr.header;
    let Some(Value::Object(mut enc)) = info else {
        assert_eq!(h.crypt_method, CryptMethod::None, "{ctx}: encrypt missing");
        assert!(d.hdr.encryption.is_none());
        return;
    };
    let format = take(&mut enc, "format", ctx);
    match h.crypt_method {
        CryptMethod::None => panic!("{ctx}: info says encrypted, header does not"),
        CryptMethod::Aes => {
            assert_eq!(format, "aes", "{ctx}");
            assert!(
                d.hdr.encryption.is_none(),
                "{ctx}: AES has no crypto extension"
            );
        }
        CryptMethod::Luks => {
            assert_eq!(format, "luks", "{ctx}");
            let ext = d.hdr.encryption.expect("LUKS without crypto extension");
            assert_eq!(ext.offset % d.cs, 0);
            let bytes = read_at(&d.file, ext.offset, 592);
            let luks = LuksHeader::decode(&bytes)
                .unwrap_or_else(|e| panic!("{ctx}: LUKS header does not decode: {e}"));
            luks.validate_qemu()
                .unwrap_or_else(|e| panic!("{ctx}: LUKS header fails QEMU's checks: {e}"));
            assert!(
                luks.encode().unwrap()[..] == bytes[..],
                "{ctx}: LUKS header re-encodes"
            );
            let cm = luks.parsed_cipher_mode().unwrap();
            let (mode, ivgen, ivhash) = (cm.mode, cm.ivgen, cm.ivhash);
            // cipher name + key size → "aes-256" (XTS keys are two cipher keys).
            let key_bits = if mode == "xts" {
                luks.key_bytes * 4
            } else {
                luks.key_bytes * 8
            };
            let alg = format!("{}-{key_bits}", luks.cipher_name);
            assert_eq!(
                take(&mut enc, "cipher-alg", ctx),
                alg.as_str(),
                "{ctx}: cipher-alg"
            );
            assert_eq!(
                take(&mut enc, "cipher-mode", ctx),
                mode,
                "{ctx}: cipher-mode"
            );
            assert_eq!(take(&mut enc, "ivgen-alg", ctx), ivgen, "{ctx}: ivgen-alg");
            assert_eq!(
                enc.remove("ivgen-hash-alg")
                    .as_ref()
                    .and_then(Value::as_str),
                ivhash,
                "{ctx}: ivgen-hash-alg"
            );
            assert_eq!(
                take(&mut enc, "hash-alg", ctx),
                luks.hash_spec.as_str(),
                "{ctx}"
            );
            let payload = u64::from(luks.payload_offset_sectors) * 512;
            assert_eq!(
                take(&mut enc, "payload-offset", ctx),
                payload,
                "{ctx}: payload"
            );
            // The crypto extension covers the header and key material (reference §6.1).
            assert_eq!(ext.length, payload, "{ctx}: crypto extension length");
            assert_eq!(
                take(&mut enc, "master-key-iters", ctx),
                luks.mk_digest_iterations,
                "{ctx}: master-key-iters"
            );
            assert_eq!(
                take(&mut enc, "uuid", ctx),
                luks.uuid.as_str(),
                "{ctx}: uuid"
            );
            assert_eq!(take(&mut enc, "detached-header", ctx), false, "{ctx}");
            let Value::Array(slots) = take(&mut enc, "slots", ctx) else {
                panic!()
            };
            assert_eq!(slots.len(), luks.key_slots.len(), "{ctx}: slot count");
            for (i, (info, slot)) in slots.into_iter().zip(&luks.key_slots).enumerate() {
                let Value::Object(mut info) = info else {
                    panic!()
                };
                let sctx = format!("{ctx} slot {i}");
                assert_eq!(take(&mut info, "active", &sctx), slot.active, "{sctx}");
                assert_eq!(
                    take(&mut info, "key-offset", &sctx),
                    u64::from(slot.key_material_offset_sectors) * 512,
                    "{sctx}: key-offset"
                );
                // QEMU 10 prints iterations and stripes for active slots only.
                if slot.active {
                    assert_eq!(take(&mut info, "iters", &sctx), slot.iterations, "{sctx}");
                    assert_eq!(take(&mut info, "stripes", &sctx), slot.stripes, "{sctx}");
                }
                assert_eq!(slot.stripes, 4000, "{sctx}: stripes");
                assert_consumed(&info, &sctx);
            }
            // Reference §6.1 defaults: slot i at sector 8 + 504 i, payload at 4040.
            assert_eq!((luks.cipher_name.as_str(), luks.key_bytes), ("aes", 64));
            assert_eq!(luks.cipher_mode, "xts-plain64");
            assert_eq!(luks.payload_offset_sectors, 4040);
            let layout = LuksHeader::qemu_layout(luks.key_bytes).unwrap();
            assert_eq!(layout.region_bytes(), ext.length, "{ctx}: LUKS region");
            for (i, s) in luks.key_slots.iter().enumerate() {
                assert_eq!(s.key_material_offset_sectors, 8 + 504 * i as u32);
                assert_eq!(s.key_material_offset_sectors, layout.key_slot_offsets[i]);
                assert_eq!(s.active, i == 0);
            }
        }
    }
    assert_consumed(&enc, ctx);
}

fn compare_bitmaps_info(ctx: &str, d: &Decoded, info: Option<Value>) {
    let h = &d.hdr.header;
    let Some(Value::Array(list)) = info else {
        assert!(d.hdr.bitmaps.is_none(), "{ctx}: bitmaps missing from info");
        assert!(!h.autoclear.contains(AutoclearFeatures::BITMAPS));
        return;
    };
    let ext = d
        .hdr
        .bitmaps
        .expect("info shows bitmaps, header has no extension");
    assert!(
        h.autoclear.contains(AutoclearFeatures::BITMAPS),
        "{ctx}: autoclear bit"
    );
    assert_eq!(ext.nb_bitmaps as usize, list.len(), "{ctx}: nb_bitmaps");
    assert_eq!(ext.directory_offset % d.cs, 0);
    for (info, bm) in list.into_iter().zip(&d.bitmaps.entries) {
        let Value::Object(mut info) = info else {
            panic!()
        };
        let bctx = format!("{ctx} bitmap {}", bm.name);
        assert_eq!(take(&mut info, "name", &bctx), bm.name.as_str());
        assert_eq!(
            take(&mut info, "granularity", &bctx),
            1u64 << bm.granularity_bits,
            "{bctx}"
        );
        let mut flags = Vec::new();
        if bm.flags.in_use() {
            flags.push("in-use");
        }
        if bm.flags.auto() {
            flags.push("auto");
        }
        assert_eq!(
            take(&mut info, "flags", &bctx),
            serde_json::json!(flags),
            "{bctx}: flags"
        );
        assert_eq!(bm.bitmap_type, 1, "{bctx}: type");
        assert!(bm.extra_data.is_empty(), "{bctx}: extra data");
        assert_eq!(bm.flags.bits() & !3, 0, "{bctx}: flags {:?}", bm.flags);
        let table = u64::from(bm.bitmap_table_size);
        assert_eq!(
            table,
            bitmap_table_size(h.size, bm.granularity_bits, d.cs),
            "{bctx}"
        );
        assert_consumed(&info, &bctx);
    }
}

fn compare_snapshots_info(ctx: &str, d: &Decoded, info: Option<Value>) {
    let h = &d.hdr.header;
    let list = match info {
        Some(Value::Array(l)) => l,
        None => vec![],
        Some(v) => panic!("{ctx}: snapshots {v}"),
    };
    assert_eq!(h.nb_snapshots as usize, list.len(), "{ctx}: nb_snapshots");
    assert_eq!(d.snapshots.len(), list.len());
    for (info, sn) in list.into_iter().zip(&d.snapshots) {
        let Value::Object(mut info) = info else {
            panic!()
        };
        let sctx = format!("{ctx} snapshot {}", sn.name);
        assert_eq!(take(&mut info, "id", &sctx), sn.id.as_str(), "{sctx}: id");
        assert_eq!(
            take(&mut info, "name", &sctx),
            sn.name.as_str(),
            "{sctx}: name"
        );
        assert_eq!(
            take(&mut info, "vm-state-size", &sctx),
            sn.vm_state_size,
            "{sctx}"
        );
        assert_eq!(
            take(&mut info, "date-sec", &sctx),
            sn.date_sec,
            "{sctx}: date-sec"
        );
        assert_eq!(
            take(&mut info, "date-nsec", &sctx),
            sn.date_nsec,
            "{sctx}: date-nsec"
        );
        assert_eq!(
            take(&mut info, "vm-clock-sec", &sctx),
            sn.vm_clock_nsec / 1_000_000_000,
            "{sctx}: vm-clock-sec"
        );
        assert_eq!(
            take(&mut info, "vm-clock-nsec", &sctx),
            sn.vm_clock_nsec % 1_000_000_000,
            "{sctx}: vm-clock-nsec"
        );
        // -1 (or no field) means "not recorded" and is not shown.
        let icount = sn.icount.filter(|&i| i != -1);
        assert_eq!(
            info.remove("icount").and_then(|v| v.as_i64()),
            icount,
            "{sctx}: icount"
        );
        assert_consumed(&info, &sctx);
        // What `qemu-img snapshot -c` writes (reference §4.1).
        assert!(sn.unknown_extra.is_empty(), "{sctx}: extra data size");
        assert_eq!(sn.disk_size, Some(h.size), "{sctx}: disk size");
        assert_eq!(sn.icount, Some(0), "{sctx}: icount");
        assert_eq!(sn.date_nsec % 1000, 0, "{sctx}: microsecond resolution");
        assert_eq!(sn.l1_size, h.l1_size, "{sctx}: L1 size");
    }
}

// ------------------------------------------------------------------------------------------
// `qemu-img snapshot -l`

/// `YYYY-MM-DD HH:MM:SS` in UTC (Howard Hinnant's civil_from_days).
fn utc(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn compare_snapshot_list(case: &Case, dir: &Path, d: &Decoded) {
    let img = image_name(case);
    let out = qemu_img(dir, &["snapshot", "-l", &img]);
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    if d.snapshots.is_empty() {
        assert!(
            text.trim().is_empty(),
            "{}: unexpected snapshot list {text}",
            case.name
        );
        return;
    }
    assert_eq!(lines.next(), Some("Snapshot list:"));
    let head: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(head, ["ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"]);
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows.len(), d.snapshots.len(), "{}: {text}", case.name);
    for (row, sn) in rows.iter().zip(&d.snapshots) {
        let ctx = format!("{} snapshot -l {}", case.name, sn.name);
        assert_eq!(row[0], sn.id, "{ctx}");
        assert_eq!(row[1], sn.name, "{ctx}");
        assert_eq!(
            sn.vm_state_size, 0,
            "{ctx}: only empty VM state is formatted here"
        );
        assert_eq!(&row[2..4], ["0", "B"], "{ctx}");
        assert_eq!(
            format!("{} {}", row[4], row[5]),
            utc(sn.date_sec.into()),
            "{ctx}: date"
        );
        let clock = sn.vm_clock_nsec;
        let secs = clock / 1_000_000_000;
        let want = format!(
            "{:04}:{:02}:{:02}.{:03}",
            secs / 3600,
            secs / 60 % 60,
            secs % 60,
            clock / 1_000_000 % 1000
        );
        assert_eq!(row[6], want, "{ctx}: vm clock");
        let icount = sn.icount.filter(|&i| i != -1).map(|i| i.to_string());
        assert_eq!(row.get(7).map(|s| s.to_string()), icount, "{ctx}: icount");
        assert_eq!(row.len(), 7 + usize::from(icount.is_some()), "{ctx}");
    }
}

// ------------------------------------------------------------------------------------------
// Header fields `info` does not show

fn check_layout(case: &Case, dir: &Path, d: &Decoded) {
    let ctx = case.name;
    let h = &d.hdr.header;
    let cs = d.cs;
    match h.version {
        Version::V2 => assert_eq!(h.header_length, 72, "{ctx}"),
        Version::V3 => assert_eq!(h.header_length, 112, "{ctx}"),
    }
    assert!(d.hdr.unknown_header_fields.is_empty(), "{ctx}");
    assert!(d.hdr.unknown_extensions.is_empty(), "{ctx}");
    // Feature name table iff v3 and clusters > 4 KiB (reference §1.3).
    if h.version == Version::V3 && cs > 4096 {
        assert_eq!(
            d.hdr.feature_names,
            qemu_feature_table(),
            "{ctx}: feature table"
        );
    } else {
        assert!(d.hdr.feature_names.is_empty(), "{ctx}: feature table");
    }
    // The backing file name follows the END marker directly.
    if let Some(name) = &d.hdr.backing_file {
        assert_eq!(name, BASE, "{ctx}");
        assert_eq!(h.backing_file_size as usize, name.len());
        let off = h.backing_file_offset as usize;
        assert_eq!(
            &d.file[off - 8..off],
            &[0u8; 8],
            "{ctx}: END before the backing name"
        );
    } else {
        assert_eq!(
            (h.backing_file_offset, h.backing_file_size),
            (0, 0),
            "{ctx}"
        );
    }
    // The encoder writes cluster 0 exactly as QEMU does.
    let encoded = d.hdr.encode().unwrap();
    let first = read_at(&d.file, 0, cs);
    assert!(
        encoded == first,
        "{ctx}: re-encoded cluster 0 differs from QEMU's"
    );

    // Minimal L1 size for the virtual size; crypt method; snapshots offset iff snapshots.
    let geo = h.geometry().unwrap();
    assert_eq!(
        u64::from(h.l1_size),
        geo.l1_entries_for(h.size),
        "{ctx}: l1_size"
    );
    assert_eq!(
        h.nb_snapshots == 0,
        h.snapshots_offset == 0,
        "{ctx}: snapshots_offset"
    );
    if case.default_layout {
        assert_eq!(h.refcount_table_offset, cs, "{ctx}: reftable at cluster 1");
        assert_eq!(h.refcount_table_clusters, 1, "{ctx}: reftable size");
        assert_eq!(h.l1_table_offset, 3 * cs, "{ctx}: L1 at cluster 3");
        let rt0 = ReftableEntry::decode(be64(&d.file, cs as usize), h.cluster_bits).unwrap();
        assert_eq!(rt0.0, Some(2 * cs), "{ctx}: refblock 0 at cluster 2");
    }
    if case.name == "cluster64k" {
        // Reference §1.4, byte for byte: 1 GiB, 64 KiB clusters.
        assert_eq!(
            d.file.len(),
            0x30010,
            "{ctx}: file ends right after the L1 table"
        );
        assert_eq!(h.l1_size, 2);
        let rc: Vec<u64> = (0..5).map(|c| d.refcount(c * cs)).collect();
        assert_eq!(rc, [1, 1, 1, 1, 0]);
    }
    if case.encrypt == Some("luks") {
        let ext = d.hdr.encryption.unwrap();
        // Allocated right after the L1 table (reference §1.4).
        let l1_end = (h.l1_table_offset + u64::from(h.l1_size) * 8).next_multiple_of(cs);
        assert_eq!(ext.offset, l1_end, "{ctx}: LUKS header after the L1");
    }
    if let Some(name) = &d.hdr.data_file {
        assert!(dir.join(name).exists(), "{ctx}: data file {name} missing");
    }
}

// ------------------------------------------------------------------------------------------
// Refcounts vs. references, and `qemu-img check`

fn add_range(refs: &mut BTreeMap<u64, u64>, cs: u64, off: u64, len: u64) {
    if len == 0 {
        return;
    }
    for c in off / cs..=(off + len - 1) / cs {
        *refs.entry(c).or_default() += 1;
    }
}

/// Counters QEMU's check keeps for the active L1 (`bfi`).
#[derive(Default, Debug)]
struct Alloc {
    allocated: u64,
    compressed: u64,
}

/// Walks an L1 table's tree, adding references; returns allocation counters.
fn walk_l1(d: &Decoded, l1: &[L1Entry], refs: &mut BTreeMap<u64, u64>) -> Alloc {
    let cs = d.cs;
    let mut alloc = Alloc::default();
    for e in l1 {
        let Some(l2) = e.l2_offset else { continue };
        add_range(refs, cs, l2.get(), cs);
        for (entry, _) in d.l2_table(l2.get()) {
            match entry {
                L2Entry::Unallocated | L2Entry::Zero { host: None, .. } => {}
                L2Entry::Normal { host, .. }
                | L2Entry::Zero {
                    host: Some(host), ..
                } => {
                    alloc.allocated += 1;
                    if !d.l2fmt.external_data_file {
                        add_range(refs, cs, host.get(), cs);
                    }
                }
                L2Entry::Compressed(c) => {
                    alloc.allocated += 1;
                    alloc.compressed += 1;
                    let (start, len) = c.host_range();
                    add_range(refs, cs, start, len);
                }
            }
        }
    }
    alloc
}

fn check_refcounts(case: &Case, dir: &Path, d: &Decoded) {
    let ctx = case.name;
    let h = &d.hdr.header;
    let cs = d.cs;
    let mut refs = BTreeMap::new();
    add_range(&mut refs, cs, 0, cs);
    add_range(
        &mut refs,
        cs,
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * cs,
    );
    let rt = read_at(
        &d.file,
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * cs,
    );
    for raw in be64s(&rt) {
        if let Some(off) = ReftableEntry::decode(raw, h.cluster_bits).unwrap().0 {
            add_range(&mut refs, cs, off, cs);
        }
    }
    add_range(&mut refs, cs, h.l1_table_offset, u64::from(h.l1_size) * 8);
    let alloc = walk_l1(d, &d.l1, &mut refs);
    add_range(&mut refs, cs, h.snapshots_offset, d.snapshot_table_len);
    for sn in &d.snapshots {
        add_range(&mut refs, cs, sn.l1_table_offset, u64::from(sn.l1_size) * 8);
        let l1 = decode_l1(&d.file, sn.l1_table_offset, sn.l1_size, h.cluster_bits);
        walk_l1(d, &l1, &mut refs);
    }
    if let Some(e) = &d.hdr.encryption {
        add_range(&mut refs, cs, e.offset, e.length);
    }
    if let Some(b) = &d.hdr.bitmaps {
        add_range(&mut refs, cs, b.directory_offset, b.directory_size);
        for bm in &d.bitmaps.entries {
            let len = u64::from(bm.bitmap_table_size) * 8;
            add_range(&mut refs, cs, bm.bitmap_table_offset, len);
            let bytes = read_at(&d.file, bm.bitmap_table_offset, len);
            let table = decode_bitmap_table(&bytes, bm.bitmap_table_size, cs, &Limits::QEMU)
                .unwrap_or_else(|e| panic!("{ctx}: bitmap table of {}: {e}", bm.name));
            for e in table {
                match e {
                    BitmapTableEntry::Data(off) => add_range(&mut refs, cs, off, cs),
                    BitmapTableEntry::Zeros => {}
                    // QEMU never writes all-ones entries.
                    BitmapTableEntry::Ones => panic!("{ctx}: all-ones bitmap table entry"),
                }
            }
        }
    }

    // Every cluster: on-disk refcount == references found.
    let last = refs.keys().next_back().copied().unwrap_or(0);
    let mut clusters: Vec<u64> = refs.keys().copied().collect();
    clusters.extend(d.used_clusters());
    clusters.extend(0..(d.file.len() as u64).div_ceil(cs));
    clusters.sort_unstable();
    clusters.dedup();
    for c in clusters {
        let want = refs.get(&c).copied().unwrap_or(0);
        let have = d.refcount(c * cs);
        assert_eq!(
            have,
            want,
            "{ctx}: cluster {c} ({:#x}) refcount {have}, {want} refs",
            c * cs
        );
    }
    // Refcount of cluster 0 is 1 at every width, and reftable entry 0 is set.
    assert_eq!(d.refcount(0), 1, "{ctx}");
    assert!(ReftableEntry::decode(be64(&rt, 0), h.cluster_bits)
        .unwrap()
        .0
        .is_some());

    // COPIED flags in the active tree are exactly "refcount == 1" (QEMU's check_oflag_copied).
    for (i, e) in d.l1.iter().enumerate() {
        let Some(l2) = e.l2_offset else { continue };
        assert_eq!(e.copied, d.refcount(l2.get()) == 1, "{ctx}: L1[{i}] COPIED");
        for (j, (entry, _)) in d.l2_table(l2.get()).iter().enumerate() {
            if d.l2fmt.external_data_file {
                if let Some(host) = entry.host_cluster() {
                    assert!(
                        entry.is_copied(),
                        "{ctx}: data file entry {j} @{host} not COPIED"
                    );
                }
            } else if let Some(host) = entry.host_cluster() {
                let rc = d.refcount(host.get());
                assert_eq!(
                    entry.is_copied(),
                    rc == 1,
                    "{ctx}: L2[{i}][{j}] COPIED, rc {rc}"
                );
            }
        }
    }

    // qemu-img check agrees and finds nothing wrong.
    let img = image_name(case);
    let mut opts = String::new();
    let mut args = img_cmd(case, "check", &img, &mut opts);
    args.push("--output=json");
    let Value::Object(mut chk) = json(&qemu_img(dir, &args)) else {
        panic!()
    };
    chk.remove("filename");
    assert_eq!(chk.remove("format").unwrap(), "qcow2");
    let mut num = |k: &str| chk.remove(k).map_or(0, |v| v.as_u64().unwrap());
    assert_eq!(num("check-errors"), 0, "{ctx}");
    assert_eq!(num("corruptions"), 0, "{ctx}");
    assert_eq!(num("leaks"), 0, "{ctx}");
    assert_eq!(
        num("image-end-offset"),
        (last + 1) * cs,
        "{ctx}: image-end-offset"
    );
    assert_eq!(
        num("total-clusters"),
        h.size.div_ceil(cs),
        "{ctx}: total-clusters"
    );
    assert_eq!(
        num("allocated-clusters"),
        alloc.allocated,
        "{ctx}: allocated-clusters"
    );
    assert_eq!(
        num("compressed-clusters"),
        alloc.compressed,
        "{ctx}: compressed-clusters"
    );
    // Depends on QEMU's traversal order; only bounded here.
    assert!(num("fragmented-clusters") <= alloc.allocated, "{ctx}");
    assert!(chk.is_empty(), "{ctx}: check fields not compared: {chk:?}");
}

// ------------------------------------------------------------------------------------------
// L2 entries after qemu-io writes

/// Entry `index` of the active L2 table covering guest offset `guest`.
fn active_l2(d: &Decoded, guest: u64) -> (L2Entry, u64) {
    let geo = d.hdr.header.geometry().unwrap();
    let pos = geo.locate(qcow2_format::GuestOffset(guest));
    let l2 = d.l1[pos.l1_index as usize].l2_offset.expect("no L2 table");
    d.l2_table(l2.get())[pos.l2_index]
}

fn check_written(case: &Case, d: &Decoded) {
    let ctx = case.name;
    let cs = d.cs;
    match case.name {
        "written" | "written_datafile" => {
            let (e, _) = active_l2(d, 0);
            let L2Entry::Normal { host, copied: true } = e else {
                panic!("{ctx}: {e:?}")
            };
            if case.name == "written" {
                // Reference §2.5: L2 table first, then the data cluster.
                let l2 = d.l1[0].l2_offset.unwrap().get();
                assert_eq!(
                    host.get(),
                    l2 + cs,
                    "{ctx}: data cluster after the L2 table"
                );
                assert!(read_at(&d.file, host.get(), cs).iter().all(|&b| b == 0xab));
                assert!(d.l1[0].copied);
            } else {
                // Guest offset == host offset in the data file.
                assert_eq!(host, HostOffset(0));
            }
            assert_eq!(
                active_l2(d, 1 << 20).0,
                L2Entry::Zero {
                    host: None,
                    copied: false
                }
            );
            assert_eq!(active_l2(d, 64 << 10).0, L2Entry::Unallocated);
        }
        "written_snapshot" => {
            // Cluster 0 is shared with s1 (no COPIED), cluster 2 was written afterwards into
            // a copied L2 table, cluster 4 is compressed.
            let (e0, _) = active_l2(d, 0);
            assert!(
                matches!(e0, L2Entry::Normal { copied: false, .. }),
                "{ctx}: {e0:?}"
            );
            let (e2, _) = active_l2(d, 128 << 10);
            assert!(
                matches!(e2, L2Entry::Normal { copied: true, .. }),
                "{ctx}: {e2:?}"
            );
            assert!(d.l1[0].copied, "{ctx}: the active L2 was copied on write");
            let (e4, _) = active_l2(d, 256 << 10);
            assert!(matches!(e4, L2Entry::Compressed(_)), "{ctx}: {e4:?}");
            let sn_l1 = decode_l1(
                &d.file,
                d.snapshots[0].l1_table_offset,
                1,
                d.hdr.header.cluster_bits,
            );
            // The snapshot's L1 is a verbatim copy taken before the refcounts were raised, so
            // it keeps a stale COPIED flag (only meaningful in the active L1, reference §2.2).
            assert!(sn_l1[0].copied);
            assert_eq!(d.refcount(sn_l1[0].l2_offset.unwrap().get()), 1);
            assert_ne!(sn_l1[0].l2_offset, d.l1[0].l2_offset);
        }
        "written_extl2" => {
            // Reference §2.4 table.
            let (e, bm) = active_l2(d, 0);
            assert!(
                matches!(e, L2Entry::Normal { copied: true, .. }),
                "{ctx}: {e:?}"
            );
            assert_eq!(bm, 0x0000_0010_0000_0003, "{ctx}");
            let sub = qcow2_format::SubclusterBitmap(bm);
            let states: Vec<_> = (0..6).map(|i| sub.state(i)).collect();
            use SubclusterState::*;
            assert_eq!(
                states,
                [
                    Allocated,
                    Allocated,
                    Unallocated,
                    Unallocated,
                    Zero,
                    Unallocated
                ]
            );
            let (e, bm) = active_l2(d, 2 << 20);
            assert_eq!(
                (e, bm),
                (L2Entry::Unallocated, 0xffff_ffff_0000_0000),
                "{ctx}"
            );
        }
        "bitmaps_written" => {
            // Enabled bitmaps have data clusters with the written ranges set; b2 is disabled.
            for bm in &d.bitmaps.entries {
                let len = u64::from(bm.bitmap_table_size) * 8;
                let bytes = read_at(&d.file, bm.bitmap_table_offset, len);
                let table =
                    decode_bitmap_table(&bytes, bm.bitmap_table_size, cs, &Limits::QEMU).unwrap();
                let gran = 1u64 << bm.granularity_bits;
                let data: Vec<u8> = table
                    .iter()
                    .flat_map(|e| match e {
                        BitmapTableEntry::Data(off) => read_at(&d.file, *off, cs),
                        _ => vec![0; cs as usize],
                    })
                    .collect();
                let set: Vec<u64> = (0..bitmap_bits(d.hdr.header.size, bm.granularity_bits))
                    .filter(|&n| test_bit(&data, n) == Some(true))
                    .collect();
                let want: Vec<u64> = if bm.name == "b2" {
                    vec![]
                } else {
                    (0..(64 << 10) / gran)
                        .chain((32 << 20) / gran..((32 << 20) + (64 << 10)) / gran)
                        .collect()
                };
                assert_eq!(set, want, "{ctx}: bits of bitmap {}", bm.name);
            }
        }
        "written_zstd_rc1" => {
            // 1-bit refcounts: every compressed cluster gets its own host cluster (§2.7).
            let (a, _) = active_l2(d, 0);
            let (b, _) = active_l2(d, 64 << 10);
            let (L2Entry::Compressed(a), L2Entry::Compressed(b)) = (a, b) else {
                panic!("{ctx}: {a:?} {b:?}")
            };
            assert_ne!(a.host_offset() / cs, b.host_offset() / cs, "{ctx}");
            for c in [a, b] {
                let at = read_at(&d.file, c.host_offset(), 4);
                assert_eq!(at, [0x28, 0xb5, 0x2f, 0xfd], "{ctx}: zstd frame magic");
            }
        }
        _ => {}
    }
}

// ------------------------------------------------------------------------------------------

#[test]
fn qemu_img_is_installed() {
    let dir = tempfile::tempdir().unwrap();
    let out = qemu_img(dir.path(), &["--version"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("qemu-img version"));
}

#[test]
fn golden_matrix() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    qemu_img(dir, &["create", "-q", "-f", "qcow2", BASE, "64M"]);
    let mut failures = Vec::new();
    for case in matrix() {
        let path = build(dir, &case);
        // One failing image should not hide the others.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let d = Decoded::read(&path);
            // `info` reads encrypted images without the secret.
            let info = json(&qemu_img(
                dir,
                &["info", "--output=json", &image_name(&case)],
            ));
            compare_info(&case, &d, info);
            if case.encrypt.is_none() {
                compare_snapshot_list(&case, dir, &d);
            }
            check_layout(&case, dir, &d);
            check_refcounts(&case, dir, &d);
            check_written(&case, &d);
        }));
        if let Err(e) = r {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(format!("{}: {msg}", case.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} images differ from QEMU:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
