//! `qcow2 convert`, `qcow2 compare`, `qcow2 measure`.

use std::path::PathBuf;

use clap::Args;
use qcow2_async::ops::{self, CacheMode, CompareResult, ConvertOptions};
use qcow2_async::{BackingFormat, CreateOptions};
use serde_json::json;

use crate::opts::{
    apply_create_options, format_of, open_disk, parse_format, parse_size, url_of, Result,
};

#[derive(Args)]
pub struct ConvertArgs {
    /// Source format (probed when absent).
    #[arg(short = 'f')]
    src_format: Option<String>,
    /// Target format.
    #[arg(short = 'O', default_value = "raw")]
    format: String,
    /// Compress every data cluster (qcow2 targets).
    #[arg(short = 'c')]
    compress: bool,
    /// Target creation options (qemu-img's names).
    #[arg(short = 'o')]
    options: Option<String>,
    /// Backing file for the target.
    #[arg(short = 'B')]
    backing: Option<String>,
    /// Format of the target's backing file.
    #[arg(short = 'F')]
    backing_fmt: Option<String>,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Requests in flight.
    #[arg(short = 'm', default_value_t = 8)]
    parallel: usize,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Target cache mode: none, writeback, writethrough, directsync or unsafe (qemu-img's
    /// default: unsafe, no final sync).
    #[arg(short = 't', default_value = "unsafe")]
    cache: String,
    /// Source cache mode: none (O_DIRECT) or writeback; the others read like writeback.
    #[arg(short = 'T', default_value = "writeback")]
    src_cache: String,
    source: PathBuf,
    target: PathBuf,
}

pub async fn convert(a: ConvertArgs) -> Result<u8> {
    let sfmt = format_of(&a.source, a.src_format.as_deref()).await?;
    let src_cache: CacheMode = a.src_cache.parse()?;
    let src_opts = {
        let mut o = crate::opts::ro();
        o.direct = src_cache.direct();
        o
    };
    let src = open_disk(&a.source, sfmt, &src_opts).await?;
    let mut o = ConvertOptions::new(parse_format(&a.format)?);
    o.target_cache = a.cache.parse()?;
    o.compress = a.compress;
    o.parallel = a.parallel.max(1);
    let mut c = CreateOptions::new(src.size());
    apply_create_options(&mut c, a.options.as_deref().unwrap_or(""))?;
    if let Some(b) = &a.backing {
        c.backing_file = Some(b.clone());
        c.backing_format = Some(match &a.backing_fmt {
            Some(f) => parse_format(f)?,
            None => format_of(&qcow2_async_path(&a.target, b), None).await?,
        });
    }
    if o.format == BackingFormat::Raw && (c.backing_file.is_some() || a.compress) {
        return Err("raw targets have no backing file and no compression".into());
    }
    o.create = c;
    let (bar, cb) = crate::progress::bar(a.progress && !a.quiet);
    o.progress = cb;
    ops::convert(&src, &a.target, &o).await?;
    if let Some(b) = bar {
        b.finish();
    }
    Ok(0)
}

/// A backing name as qemu-img resolves it: relative to the target's folder.
fn qcow2_async_path(target: &std::path::Path, name: &str) -> PathBuf {
    let p = std::path::Path::new(name);
    if p.is_absolute() || url_of(p).is_some() {
        p.to_path_buf()
    } else {
        target.parent().unwrap_or(std::path::Path::new(".")).join(p)
    }
}

#[derive(Args)]
pub struct CompareArgs {
    /// Format of the first image.
    #[arg(short = 'f')]
    format1: Option<String>,
    /// Format of the second image.
    #[arg(short = 'F')]
    format2: Option<String>,
    /// Strict: sizes must match too.
    #[arg(short = 's')]
    strict: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Show progress (accepted for compatibility).
    #[arg(short = 'p')]
    progress: bool,
    image1: PathBuf,
    image2: PathBuf,
}

/// Exit codes as qemu-img's: 0 identical, 1 different, 2 error (from `main`... see below).
pub async fn compare(a: CompareArgs) -> Result<u8> {
    let open = |p: &PathBuf, f: Option<&str>| {
        let p = p.clone();
        let f = f.map(str::to_string);
        async move {
            let fmt = format_of(&p, f.as_deref()).await?;
            open_disk(&p, fmt, &crate::opts::ro()).await
        }
    };
    let (x, y) = match (
        open(&a.image1, a.format1.as_deref()).await,
        open(&a.image2, a.format2.as_deref()).await,
    ) {
        (Ok(x), Ok(y)) => (x, y),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("qcow2: {e}");
            return Ok(2);
        }
    };
    let r = match ops::compare(&x, &y, a.strict).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("qcow2: {e}");
            return Ok(2);
        }
    };
    if !a.quiet {
        match r {
            CompareResult::Identical => outln!("Images are identical."),
            CompareResult::Mismatch(off) => outln!("Content mismatch at offset {off}!"),
            CompareResult::SizeMismatch => outln!("Image size mismatch!"),
        }
    }
    Ok(r.exit_code())
}

#[derive(Args)]
pub struct MeasureArgs {
    /// `human` or `json`.
    #[arg(long = "output", default_value = "human")]
    output: String,
    /// Target format (only qcow2 is measured in detail; raw is its size).
    #[arg(short = 'O', default_value = "qcow2")]
    format: String,
    /// Target creation options.
    #[arg(short = 'o')]
    options: Option<String>,
    /// Source format.
    #[arg(short = 'f')]
    src_format: Option<String>,
    /// Measure a new image of this size instead of a source image.
    #[arg(long = "size")]
    size: Option<String>,
    filename: Option<PathBuf>,
}

pub async fn measure(a: MeasureArgs) -> Result<u8> {
    let src = match (&a.filename, &a.size) {
        (Some(p), None) => {
            let f = format_of(p, a.src_format.as_deref()).await?;
            Some(open_disk(p, f, &crate::opts::ro()).await?)
        }
        (None, Some(_)) => None,
        _ => return Err("either --size N or a filename must be given (not both)".into()),
    };
    let mut c = CreateOptions::new(a.size.as_deref().map(parse_size).transpose()?.unwrap_or(0));
    apply_create_options(&mut c, a.options.as_deref().unwrap_or(""))?;
    let (required, fully_allocated, bitmaps) = match parse_format(&a.format)? {
        BackingFormat::Qcow2 => {
            let m = ops::measure(src.as_ref(), &c).await?;
            (m.required, m.fully_allocated, m.bitmaps)
        }
        BackingFormat::Raw => {
            let n = src.as_ref().map_or(c.size, |s| s.size()).div_ceil(512) * 512;
            (n, n, None)
        }
    };
    if a.output == "json" {
        let mut v = json!({"required": required, "fully-allocated": fully_allocated});
        if let Some(b) = bitmaps {
            v["bitmaps"] = json!(b);
        }
        outln!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        outln!("required size: {required}");
        outln!("fully allocated size: {fully_allocated}");
        if let Some(b) = bitmaps {
            outln!("bitmaps size: {b}");
        }
    }
    Ok(0)
}
