//! `qcow2 snapshot` and `qcow2 bitmap`.

use std::path::PathBuf;

use clap::Args;
use qcow2_async::{BackingPolicy, BitmapOptions, Image, SnapshotInfo};
use serde_json::json;

use crate::opts::{parse_size, Result};

#[derive(Args)]
#[command(group(clap::ArgGroup::new("action").required(true).args(["list", "create", "apply", "delete"])))]
pub struct SnapshotArgs {
    /// List snapshots.
    #[arg(short = 'l')]
    list: bool,
    /// Create a snapshot.
    #[arg(short = 'c', value_name = "NAME")]
    create: Option<String>,
    /// Revert the disk to a snapshot.
    #[arg(short = 'a', value_name = "NAME")]
    apply: Option<String>,
    /// Delete a snapshot.
    #[arg(short = 'd', value_name = "NAME")]
    delete: Option<String>,
    /// Image format (only qcow2).
    #[arg(short = 'f', default_value = "qcow2")]
    format: String,
    /// `human` or `json` (for -l).
    #[arg(long = "output", default_value = "human")]
    output: String,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    filename: PathBuf,
}

pub async fn snapshot(a: SnapshotArgs) -> Result<u8> {
    if a.format != "qcow2" {
        return Err("snapshots need a qcow2 image".into());
    }
    let opts = {
        let mut o = crate::opts::rw();
        o.backing = BackingPolicy::Ignore;
        o.read_only = a.list;
        o
    };
    let img = crate::opts::open_image(&a.filename, &opts).await?;
    if a.list {
        let list = img.list_snapshots().await?;
        if a.output == "json" {
            let v: Vec<_> = list.iter().map(snapshot_json).collect();
            outln!("{}", serde_json::to_string_pretty(&v)?);
        } else if !list.is_empty() {
            print_list(&list);
        }
        return Ok(0);
    }
    if let Some(n) = &a.create {
        img.create_snapshot(n).await?;
    } else if let Some(n) = &a.apply {
        img.apply_snapshot(n).await?;
    } else if let Some(n) = &a.delete {
        img.delete_snapshot(n).await?;
    }
    img.close().await?;
    Ok(0)
}

/// The fields of a snapshot in `qemu-img info --output=json`.
pub fn snapshot_json(s: &SnapshotInfo) -> serde_json::Value {
    let mut v = json!({
        "id": s.id,
        "name": s.name,
        "vm-state-size": s.vm_state_size,
        "date-sec": s.date_sec,
        "date-nsec": s.date_nsec,
        "vm-clock-sec": s.vm_clock_nsec / 1_000_000_000,
        "vm-clock-nsec": s.vm_clock_nsec % 1_000_000_000,
    });
    if let Some(i) = s.icount {
        v["icount"] = json!(i);
    }
    v
}

pub fn print_list(list: &[SnapshotInfo]) {
    outln!("Snapshot list:");
    outln!(
        "{:<7} {:<17} {:>7} {:>19} {:>15} {:>10}",
        "ID",
        "TAG",
        "VM_SIZE",
        "DATE",
        "VM_CLOCK",
        "ICOUNT"
    );
    for s in list {
        let secs = s.vm_clock_nsec / 1_000_000_000;
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            secs / 3600,
            secs / 60 % 60,
            secs % 60,
            s.vm_clock_nsec / 1_000_000 % 1000
        );
        outln!(
            "{:<7} {:<17} {:>7} {:>19} {:>15} {:>10}",
            s.id,
            s.name,
            format!("{} B", s.vm_state_size),
            date(s.date_sec),
            clock,
            s.icount
                .filter(|&i| i >= 0)
                .map(|i| i.to_string())
                .unwrap_or_else(|| "--".into())
        );
    }
}

/// `YYYY-MM-DD HH:MM:SS` in UTC (qemu-img prints local time; the machines here run UTC).
fn date(secs: u32) -> String {
    let days = i64::from(secs) / 86400;
    let rem = i64::from(secs) % 86400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("op").required(true).multiple(true).args(["add", "remove", "clear", "enable", "disable", "merge"])))]
pub struct BitmapArgs {
    /// Add a new, empty bitmap.
    #[arg(long)]
    add: bool,
    /// Remove the bitmap.
    #[arg(long)]
    remove: bool,
    /// Clear every bit.
    #[arg(long)]
    clear: bool,
    /// Start recording writes.
    #[arg(long)]
    enable: bool,
    /// Stop recording writes (with --add: create it disabled).
    #[arg(long)]
    disable: bool,
    /// Merge the named bitmap into this one.
    #[arg(long, value_name = "SOURCE")]
    merge: Option<String>,
    /// Granularity for --add (bytes, with an optional suffix).
    #[arg(short = 'g')]
    granularity: Option<String>,
    /// Image holding the --merge source (only the same image is supported).
    #[arg(short = 'b')]
    source_file: Option<PathBuf>,
    /// Image format (only qcow2).
    #[arg(short = 'f', default_value = "qcow2")]
    format: String,
    filename: PathBuf,
    bitmap: String,
}

/// `qemu-img bitmap`: operations run in qemu-img's order (add, clear, enable/disable,
/// merge, remove).
pub async fn bitmap(a: BitmapArgs) -> Result<u8> {
    if a.format != "qcow2" {
        return Err("bitmaps need a qcow2 image".into());
    }
    if let Some(src) = &a.source_file {
        if std::fs::canonicalize(src)? != std::fs::canonicalize(&a.filename)? {
            return Err("merging from another image is not supported yet".into());
        }
    }
    let opts = {
        let mut o = crate::opts::rw();
        o.backing = BackingPolicy::Ignore;
        o
    };
    let img = Image::open(&a.filename, &opts).await?;
    let run = async {
        if a.add {
            let o = {
                let mut o = BitmapOptions::default();
                o.granularity = a.granularity.as_deref().map(parse_size).transpose()?;
                o.disabled = a.disable;
                o
            };
            img.add_bitmap(&a.bitmap, &o).await?;
        }
        if a.clear {
            img.clear_bitmap(&a.bitmap).await?;
        }
        if a.enable {
            img.enable_bitmap(&a.bitmap, true).await?;
        }
        if a.disable && !a.add {
            img.enable_bitmap(&a.bitmap, false).await?;
        }
        if let Some(src) = &a.merge {
            img.merge_bitmaps(&a.bitmap, &[src]).await?;
        }
        if a.remove {
            img.remove_bitmap(&a.bitmap).await?;
        }
        Ok::<(), Box<dyn std::error::Error>>(())
    }
    .await;
    img.close().await?;
    run?;
    Ok(0)
}
