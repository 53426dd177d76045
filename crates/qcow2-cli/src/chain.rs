//! `qcow2 resize`, `qcow2 commit`, `qcow2 rebase`, `qcow2 amend`.

use std::path::PathBuf;

use clap::Args;
use qcow2_async::ops::{self, CommitOptions, RebaseOptions};
use qcow2_async::{AmendOptions, BackingPolicy, Image, ResizeOptions};

use crate::opts::{format_of, parse_format, parse_size, Result};

#[derive(Args)]
pub struct ResizeArgs {
    /// Allow shrinking; refused if it would cut data unless --discard-data is given too.
    #[arg(long)]
    shrink: bool,
    /// With --shrink: drop the data past the new end (qemu-img does so silently).
    #[arg(long = "discard-data")]
    discard_data: bool,
    /// Image format (only qcow2).
    #[arg(short = 'f', default_value = "qcow2")]
    format: String,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    filename: PathBuf,
    /// New size, or `+N` / `-N` relative to the current one.
    #[arg(allow_hyphen_values = true)]
    size: String,
}

pub async fn resize(a: ResizeArgs) -> Result<u8> {
    if a.format != "qcow2" {
        return Err("only qcow2 images are resized by this tool".into());
    }
    let img = Image::open(&a.filename, &{
        let mut o = crate::opts::rw();
        o.backing = BackingPolicy::FromImage;
        o
    })
    .await?;
    let cur = img.virtual_size();
    let new = if let Some(d) = a.size.strip_prefix('+') {
        cur.checked_add(parse_size(d)?).ok_or("size overflow")?
    } else if let Some(d) = a.size.strip_prefix('-') {
        cur.checked_sub(parse_size(d)?)
            .ok_or("Image size cannot be negative")?
    } else {
        parse_size(&a.size)?
    };
    let r = img
        .resize(new, {
            let mut o = ResizeOptions::default();
            o.shrink = a.shrink;
            o.discard_data = a.discard_data;
            o
        })
        .await;
    img.close().await?;
    r?;
    if !a.quiet {
        outln!("Image resized.");
    }
    Ok(0)
}

#[derive(Args)]
pub struct CommitArgs {
    /// Keep the top image's data (do not empty it).
    #[arg(short = 'd')]
    keep: bool,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Image format (only qcow2).
    #[arg(short = 'f', default_value = "qcow2")]
    format: String,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    filename: PathBuf,
}

pub async fn commit(a: CommitArgs) -> Result<u8> {
    if a.format != "qcow2" {
        return Err("only qcow2 images can be committed".into());
    }
    let (bar, cb) = crate::progress::bar(a.progress && !a.quiet);
    let o = {
        let mut o = CommitOptions::default();
        o.keep_top = a.keep;
        o.parallel = 8;
        o.progress = cb;
        o.open = crate::opts::rw();
        o
    };
    ops::commit(&a.filename, &o).await?;
    if let Some(b) = bar {
        b.finish();
    }
    if !a.quiet {
        outln!("Image committed.");
    }
    Ok(0)
}

#[derive(Args)]
pub struct RebaseArgs {
    /// Only rewrite the backing file name (unsafe).
    #[arg(short = 'u')]
    unsafe_: bool,
    /// New backing file ("" for none).
    #[arg(short = 'b')]
    backing: String,
    /// Format of the new backing file.
    #[arg(short = 'F')]
    backing_fmt: Option<String>,
    /// Image format (only qcow2).
    #[arg(short = 'f', default_value = "qcow2")]
    format: String,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    filename: PathBuf,
}

pub async fn rebase(a: RebaseArgs) -> Result<u8> {
    if a.format != "qcow2" {
        return Err("only qcow2 images can be rebased".into());
    }
    let backing = if a.backing.is_empty() {
        None
    } else {
        let fmt = match &a.backing_fmt {
            Some(f) => parse_format(f)?,
            None => {
                let p = std::path::Path::new(&a.backing);
                let full = if p.is_absolute() || crate::opts::url_of(p).is_some() {
                    p.to_path_buf()
                } else {
                    a.filename
                        .parent()
                        .unwrap_or(std::path::Path::new("."))
                        .join(p)
                };
                format_of(&full, None).await?
            }
        };
        Some((a.backing.as_str(), fmt))
    };
    let (bar, cb) = crate::progress::bar(a.progress && !a.quiet);
    let o = {
        let mut o = RebaseOptions::default();
        o.unsafe_names_only = a.unsafe_;
        o.open = crate::opts::rw();
        o.progress = cb;
        o
    };
    ops::rebase(&a.filename, backing, &o).await?;
    if let Some(b) = bar {
        b.finish();
    }
    Ok(0)
}

#[derive(Args)]
pub struct AmendArgs {
    /// Options to change (qemu-img's names).
    #[arg(short = 'o')]
    options: String,
    /// Image format (only qcow2).
    #[arg(short = 'f', default_value = "qcow2")]
    format: String,
    /// Show progress (accepted for compatibility).
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    filename: PathBuf,
}

pub async fn amend(a: AmendArgs) -> Result<u8> {
    if a.format != "qcow2" {
        return Err("only qcow2 images can be amended".into());
    }
    let mut o = AmendOptions::default();
    for kv in a.options.split(',').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, "on"));
        match k {
            "compat" => {
                o.version3 = Some(match v {
                    "1.1" | "v3" => true,
                    "0.10" | "v2" => false,
                    _ => return Err(format!("invalid compat level '{v}'").into()),
                })
            }
            "lazy_refcounts" => o.lazy_refcounts = Some(matches!(v, "on" | "true" | "yes")),
            "backing_file" => o.backing_file = Some(v.to_string()),
            "backing_fmt" => o.backing_format = Some(v.to_string()),
            "refcount_bits" => o.refcount_bits = Some(v.parse()?),
            _ => {
                return Err(format!("Changing the option '{k}' is not supported").into());
            }
        }
    }
    let img = Image::open(&a.filename, &{
        let mut o = crate::opts::rw();
        o.backing = BackingPolicy::Ignore;
        o
    })
    .await?;
    let r = img.amend(&o).await;
    img.close().await?;
    r?;
    Ok(0)
}
