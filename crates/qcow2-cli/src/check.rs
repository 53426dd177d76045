//! `qcow2 check` and `qcow2 map`.

use std::path::PathBuf;

use clap::Args;
use qcow2_async::{BackingPolicy, CheckReport, Image, RepairMode};
use serde_json::{json, Value};

use crate::opts::Result;

#[derive(Args)]
pub struct CheckArgs {
    /// Image format (only qcow2 can be checked).
    #[arg(short = 'f', default_value = "qcow2")]
    format: String,
    /// `human` or `json`.
    #[arg(long = "output", default_value = "human")]
    output: String,
    /// Repair: `leaks` or `all`.
    #[arg(short = 'r')]
    repair: Option<String>,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    filename: PathBuf,
}

/// Exit codes as qemu-img's: 0 clean, 1 check failed, 2 corruptions, 3 leaks only.
pub async fn check(a: CheckArgs) -> Result<u8> {
    if a.format != "qcow2" {
        return Err(format!("'{}' images cannot be checked", a.format).into());
    }
    let repair = match a.repair.as_deref() {
        None => None,
        Some("leaks") => Some(RepairMode::Leaks),
        Some("all") => Some(RepairMode::All),
        Some(m) => {
            return Err(
                format!("Unknown option value for -r (expecting 'leaks' or 'all'): {m}").into(),
            )
        }
    };
    let opts = {
        let mut o = crate::opts::rw();
        o.backing = BackingPolicy::Ignore;
        o.read_only = repair.is_none();
        o.open_for_repair = repair.is_some();
        o
    };
    let img = crate::opts::open_image(&a.filename, &opts).await?;
    let report = img.check(repair).await?;
    if repair.is_some() {
        img.close().await?;
    }
    if a.output == "json" {
        outln!(
            "{}",
            serde_json::to_string_pretty(&check_json(&report, &a.filename))?
        );
    } else if !a.quiet {
        print_human(&report, repair.is_some());
    }
    Ok(report.exit_code() as u8)
}

fn check_json(r: &CheckReport, filename: &std::path::Path) -> Value {
    let mut v = json!({
        "filename": filename,
        "format": "qcow2",
        "check-errors": r.check_errors,
    });
    // qemu-img leaves out counters that are zero.
    for (k, n) in [
        ("image-end-offset", r.image_end_offset),
        ("total-clusters", r.total_clusters),
        ("allocated-clusters", r.allocated_clusters),
        ("fragmented-clusters", r.fragmented_clusters),
        ("compressed-clusters", r.compressed_clusters),
        ("leaks", r.leaks),
        ("corruptions", r.corruptions),
        ("leaks-fixed", r.leaks_fixed),
        ("corruptions-fixed", r.corruptions_fixed),
    ] {
        if n != 0 {
            v[k] = json!(n);
        }
    }
    v
}

fn print_human(r: &CheckReport, repaired: bool) {
    for m in &r.messages {
        eprintln!("{m}");
    }
    if repaired && (r.leaks_fixed > 0 || r.corruptions_fixed > 0) {
        outln!("The following inconsistencies were found and repaired:\n");
        outln!("    {} leaked clusters", r.leaks_fixed);
        outln!("    {} corruptions\n", r.corruptions_fixed);
        outln!("Double checking the fixed image now...");
    }
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        outln!("No errors were found on the image.");
    }
    if r.corruptions > 0 {
        outln!(
            "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.",
            r.corruptions
        );
    }
    if r.leaks > 0 {
        outln!(
            "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.",
            r.leaks
        );
    }
    if r.check_errors > 0 {
        outln!(
            "\n{} internal errors have occurred during the check.",
            r.check_errors
        );
    }
    if r.total_clusters > 0 && r.allocated_clusters > 0 {
        let pct = |n: u64| n as f64 * 100.0 / r.total_clusters as f64;
        let frag = |n: u64| n as f64 * 100.0 / r.allocated_clusters as f64;
        outln!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
            r.allocated_clusters,
            r.total_clusters,
            pct(r.allocated_clusters),
            frag(r.fragmented_clusters),
            frag(r.compressed_clusters)
        );
    }
    if r.image_end_offset > 0 {
        outln!("Image end offset: {}", r.image_end_offset);
    }
}

#[derive(Args)]
pub struct MapArgs {
    /// Image format.
    #[arg(short = 'f')]
    format: Option<String>,
    /// `human` or `json`.
    #[arg(long = "output", default_value = "human")]
    output: String,
    /// First byte to report.
    #[arg(long = "start-offset", default_value_t = 0)]
    start: u64,
    /// Bytes to report (default: to the end).
    #[arg(long = "max-length")]
    max_length: Option<u64>,
    filename: PathBuf,
}

/// Prints the block status of every guest byte (`qemu-img map`).
pub async fn map(a: MapArgs) -> Result<u8> {
    let fmt = crate::opts::format_of(&a.filename, a.format.as_deref()).await?;
    if fmt != qcow2_async::BackingFormat::Qcow2 {
        return Err("map is implemented for qcow2 images".into());
    }
    let img = crate::opts::open_image(&a.filename, &crate::opts::ro()).await?;
    let size = img.virtual_size();
    let start = a.start.min(size);
    let len = a.max_length.unwrap_or(size).min(size - start);
    let extents = img.map(start, len).await?;
    if a.output == "json" {
        let lines: Vec<String> = extents
            .iter()
            .map(|e| {
                let mut s = format!(
                    "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
                    e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
                );
                if let Some(o) = e.offset {
                    s.push_str(&format!(", \"offset\": {o}"));
                }
                s.push('}');
                s
            })
            .collect();
        outln!("[{}]", lines.join(",\n"));
    } else {
        // The human format lists only data with a host offset, per file.
        outln!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
        let names = chain_names(&img, &a.filename);
        for e in extents.iter().filter(|e| e.data && e.offset.is_some()) {
            outln!(
                "{:<16}{:<16}{:<16}{}",
                hex(e.start),
                hex(e.length),
                hex(e.offset.unwrap_or(0)),
                names
                    .get(e.depth as usize)
                    .map(String::as_str)
                    .unwrap_or("?")
            );
        }
    }
    Ok(0)
}

/// C's `%#x`: no prefix for zero.
fn hex(n: u64) -> String {
    if n == 0 {
        "0".into()
    } else {
        format!("{n:#x}")
    }
}

/// File names of the chain, top first, as qemu-img prints them.
fn chain_names(img: &Image, top: &std::path::Path) -> Vec<String> {
    let mut names = vec![top.display().to_string()];
    let mut cur = img.backing().cloned();
    while let Some(b) = cur {
        match b {
            qcow2_async::Disk::Qcow2(i) => {
                names.push(
                    i.path()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                );
                cur = i.backing().cloned();
            }
            qcow2_async::Disk::Raw(..) => {
                names.push("(raw backing file)".into());
                cur = None;
            }
        }
    }
    names
}
