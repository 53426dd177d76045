//! `qcow2 info` and `qcow2 create`.

use std::path::PathBuf;

use clap::Args;
use qcow2_async::qcow2_format::{
    CompatibleFeatures, CompressionType, IncompatibleFeatures, Version,
};
use qcow2_async::{BackingFormat, CreateOptions, Image};
use serde_json::json;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

#[derive(Args)]
pub struct InfoArgs {
    /// Image file.
    filename: PathBuf,
    /// Image format (only qcow2).
    #[arg(short = 'f', long = "format", default_value = "qcow2")]
    format: String,
    /// `human` or `json`.
    #[arg(long = "output", default_value = "human")]
    output: String,
}

pub async fn info(a: InfoArgs) -> Result<u8> {
    if a.format != "qcow2" {
        return Err(format!("unsupported format '{}'", a.format).into());
    }
    let opts = {
        let mut o = crate::opts::ro();
        o.backing = qcow2_async::BackingPolicy::Ignore;
        o
    };
    let img = crate::opts::open_image(&a.filename, &opts).await?;
    let h = img.header().await;
    let hd = &h.header;
    // What an object occupies in its store is not known (qemu-img: "unavailable").
    let disk = match crate::opts::url_of(&a.filename) {
        Some(_) => None,
        None => Some(std::fs::metadata(&a.filename).map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.blocks() * 512
        })?),
    };
    let compat = if hd.version == Version::V3 {
        "1.1"
    } else {
        "0.10"
    };
    let ctype = match hd.compression_type {
        CompressionType::Deflate => "zlib",
        CompressionType::Zstd => "zstd",
    };
    let lazy = hd.compatible.contains(CompatibleFeatures::LAZY_REFCOUNTS);
    let snaps = img.list_snapshots().await?;
    let bitmaps = img.bitmaps().await;
    let corrupt = hd.incompatible.contains(IncompatibleFeatures::CORRUPT);
    let ext_l2 = hd.incompatible.contains(IncompatibleFeatures::EXTENDED_L2);
    if a.output == "json" {
        let mut data = json!({
            "compat": compat,
            "compression-type": ctype,
            "refcount-bits": hd.refcount_order.bits(),
        });
        if !bitmaps.is_empty() {
            data["bitmaps"] = json!(bitmaps
                .iter()
                .map(|b| json!({"flags": flags(b), "name": b.name, "granularity": b.granularity}))
                .collect::<Vec<_>>());
        }
        if hd.version == Version::V3 {
            data["lazy-refcounts"] = json!(lazy);
            data["corrupt"] = json!(corrupt);
            data["extended-l2"] = json!(ext_l2);
        }
        let mut v = json!({
            "virtual-size": img.virtual_size(),
            "filename": a.filename,
            "cluster-size": img.cluster_size(),
            "format": "qcow2",
            "format-specific": {"type": "qcow2", "data": data},
            "dirty-flag": false,
        });
        if let Some(d) = disk {
            v["actual-size"] = json!(d);
        }
        if let Some(b) = &h.backing_file {
            v["backing-filename"] = json!(b);
        }
        if !snaps.is_empty() {
            v["snapshots"] = json!(snaps
                .iter()
                .map(crate::snapshot::snapshot_json)
                .collect::<Vec<_>>());
        }
        if let Some(f) = &h.backing_format {
            v["backing-filename-format"] = json!(f);
        }
        outln!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        outln!("image: {}", a.filename.display());
        outln!("file format: qcow2");
        outln!(
            "virtual size: {} ({} bytes)",
            human(img.virtual_size()),
            img.virtual_size()
        );
        match disk {
            Some(d) => outln!("disk size: {}", human(d)),
            None => outln!("disk size: unavailable"),
        }
        outln!("cluster_size: {}", img.cluster_size());
        if let Some(b) = &h.backing_file {
            outln!("backing file: {b}");
        }
        if let Some(f) = &h.backing_format {
            outln!("backing file format: {f}");
        }
        if !snaps.is_empty() {
            crate::snapshot::print_list(&snaps);
        }
        outln!("Format specific information:");
        outln!("    compat: {compat}");
        outln!("    compression type: {ctype}");
        if hd.version == Version::V3 {
            outln!("    lazy refcounts: {lazy}");
        }
        if !bitmaps.is_empty() {
            outln!("    bitmaps:");
            for (i, b) in bitmaps.iter().enumerate() {
                outln!("        [{i}]:");
                outln!("            flags:");
                for (j, f) in flags(b).iter().enumerate() {
                    outln!("                [{j}]: {f}");
                }
                outln!("            name: {}", b.name);
                outln!("            granularity: {}", b.granularity);
            }
        }
        outln!("    refcount bits: {}", hd.refcount_order.bits());
        if hd.version == Version::V3 {
            outln!("    corrupt: {corrupt}");
            outln!("    extended l2: {ext_l2}");
        }
    }
    Ok(0)
}

/// qemu-img's flag names: `in-use` for a bitmap left inconsistent, `auto` for enabled.
fn flags(b: &qcow2_async::BitmapInfo) -> Vec<&'static str> {
    let mut f = Vec::new();
    if b.inconsistent {
        f.push("in-use");
    }
    if b.enabled {
        f.push("auto");
    }
    f
}

fn human(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.3} {}", UNITS[u]).replace(".000", "")
    }
}

#[derive(Args)]
pub struct CreateArgs {
    /// Image format (only qcow2).
    #[arg(short = 'f', default_value = "qcow2")]
    format: String,
    /// Options: cluster_size, compat, refcount_bits, lazy_refcounts, preallocation,
    /// compression_type, backing_file, backing_fmt.
    #[arg(short = 'o')]
    options: Option<String>,
    /// Backing file.
    #[arg(short = 'b')]
    backing: Option<String>,
    /// Backing file format.
    #[arg(short = 'F')]
    backing_fmt: Option<String>,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    filename: PathBuf,
    /// Size with an optional suffix (k, M, G, T); the backing file's size when omitted.
    size: Option<String>,
}

use crate::opts::parse_size;

/// The virtual size of the backing file `o` names, for `create` without a size (as
/// qemu-img: the name is relative to the new image's folder, the backing file is opened
/// read-only, shared, without its own backing chain).
async fn backing_size(image: &std::path::Path, o: &CreateOptions) -> Result<u64> {
    let Some(name) = &o.backing_file else {
        return Err(format!("{}: Image creation needs a size parameter", image.display()).into());
    };
    let Some(format) = o.backing_format else {
        return Err(format!(
            "{}: Backing file specified without backing format",
            image.display()
        )
        .into());
    };
    let p = std::path::Path::new(name);
    let path = if p.is_absolute() || crate::opts::url_of(p).is_some() {
        p.to_path_buf()
    } else {
        image.parent().unwrap_or(std::path::Path::new(".")).join(p)
    };
    let opts = {
        let mut o = crate::opts::ro();
        o.force_share = true;
        o.backing = qcow2_async::BackingPolicy::Ignore;
        o
    };
    let backing = crate::opts::open_disk(&path, format, &opts)
        .await
        .map_err(|e| format!("Could not open backing image '{name}': {e}"))?;
    Ok(backing.size())
}

pub async fn create(a: CreateArgs) -> Result<u8> {
    if a.format != "qcow2" {
        return Err(format!("unsupported format '{}'", a.format).into());
    }
    let mut o = CreateOptions::new(a.size.as_deref().map(parse_size).transpose()?.unwrap_or(0));
    o.backing_file = a.backing.clone();
    o.backing_format = a
        .backing_fmt
        .as_deref()
        .map(str::parse::<BackingFormat>)
        .transpose()?;
    crate::opts::apply_create_options(&mut o, a.options.as_deref().unwrap_or(""))?;
    if a.size.is_none() {
        o.size = backing_size(&a.filename, &o).await?;
    }
    let img = Image::create(&a.filename, &o, &crate::opts::rw()).await?;
    img.close().await?;
    if !a.quiet {
        outln!(
            "Formatting '{}', fmt=qcow2 cluster_size={} size={}",
            a.filename.display(),
            o.cluster_size,
            o.size
        );
    }
    Ok(0)
}
