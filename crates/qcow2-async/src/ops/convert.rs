//! `qemu-img convert` between qcow2 and raw, with compression and a backing file for the
//! target.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tracing::instrument;

use super::{chunks, disk_map, read_disk, run_parallel, Progress};
use crate::backing::Backing;
use crate::error::{Error, Result};
use crate::image::Image;
use crate::io::{open_file, BlockFile, FileOptions, IoBuf};
use crate::options::{BackingFormat, CreateOptions, OpenOptions};

/// How [`convert`] writes the target.
#[derive(Clone)]
pub struct ConvertOptions {
    /// Target format (`-O`).
    pub format: BackingFormat,
    /// For a qcow2 target: its creation options (`-o`, `-B` as `backing_file`); the size
    /// is taken from the source.
    pub create: CreateOptions,
    /// Write every data cluster compressed (`-c`, qcow2 only).
    pub compress: bool,
    /// Requests in flight (`-m`).
    pub parallel: usize,
    /// Called as bytes are done.
    pub progress: Option<Progress>,
}

impl std::fmt::Debug for ConvertOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConvertOptions")
            .field("format", &self.format)
            .field("compress", &self.compress)
            .field("parallel", &self.parallel)
            .finish()
    }
}

impl ConvertOptions {
    /// qcow2 with default options, 8 requests in flight.
    pub fn new(format: BackingFormat) -> Self {
        ConvertOptions {
            format,
            create: CreateOptions::new(0),
            compress: false,
            parallel: 8,
            progress: None,
        }
    }
}

/// Where data goes.
#[derive(Clone)]
enum Target {
    Qcow2(Image),
    Raw(Arc<dyn BlockFile>),
}

/// Copies the guest view of `src` into a new image at `dst`, like `qemu-img convert`.
/// The target is written under a temporary name in the same folder and renamed into
/// place only when complete, so a failure leaves nothing half-written at `dst`.
///
/// Zero and unallocated ranges are skipped (a fresh target reads zeros), as are runs of
/// 4 KiB or more of zeros inside data (qemu-img's default `-S 4k`). With a backing file
/// for the target, only what the source's top layer holds is copied.
#[instrument(skip_all, fields(dst = %dst.display()))]
pub async fn convert(src: &Backing, dst: &Path, o: &ConvertOptions) -> Result<()> {
    if o.compress && o.format != BackingFormat::Qcow2 {
        return Err(Error::InvalidArgument(
            "compression needs a qcow2 target".into(),
        ));
    }
    let tmp = temp_name(dst);
    let result = convert_into(src, &tmp, o).await;
    match result {
        Ok(()) => std::fs::rename(&tmp, dst).map_err(Error::io("renaming the converted image")),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn temp_name(dst: &Path) -> PathBuf {
    let name = dst
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    dst.with_file_name(format!(".{name}.convert-{}", std::process::id()))
}

async fn convert_into(src: &Backing, tmp: &Path, o: &ConvertOptions) -> Result<()> {
    let size = src.size();
    let with_backing = o.format == BackingFormat::Qcow2 && o.create.backing_file.is_some();
    let target = match o.format {
        BackingFormat::Qcow2 => {
            let mut c = o.create.clone();
            c.size = size;
            Target::Qcow2(Image::create(tmp, &c, &OpenOptions::default()).await?)
        }
        BackingFormat::Raw => {
            let f = open_file(
                tmp,
                &FileOptions {
                    create: true,
                    truncate: true,
                    ..FileOptions::default()
                },
            )
            .map_err(Error::io("creating the target"))?;
            f.set_len(size)
                .await
                .map_err(Error::io("sizing the target"))?;
            Target::Raw(f)
        }
    };
    // Which ranges to copy, and which to zero explicitly.
    let mut copy = Vec::new();
    let mut zero = Vec::new();
    for e in disk_map(src).await? {
        if with_backing {
            // Only the top layer: the rest is the target's backing file's business.
            if e.depth != 0 || !e.present {
                continue;
            }
            if e.zero {
                zero.push((e.start, e.length));
                continue;
            }
        } else if e.zero {
            continue;
        }
        copy.push((e.start, e.length));
    }
    let cs = match &target {
        Target::Qcow2(img) => img.cluster_size(),
        Target::Raw(_) => 65536,
    };
    let chunk = if o.compress { cs } else { (2 << 20).max(cs) };
    let total: u64 = copy.iter().map(|c| c.1).sum::<u64>() + zero.iter().map(|z| z.1).sum::<u64>();
    let done = Arc::new(AtomicU64::new(0));
    let report = |n: u64| {
        let d = done.fetch_add(n, Ordering::Relaxed) + n;
        if let Some(p) = &o.progress {
            p(d, total);
        }
    };
    if let Target::Qcow2(img) = &target {
        for &(s, l) in &zero {
            img.write_zeroes(s, l, false).await?;
            report(l);
        }
    }
    // Whole clusters for compression: extend each piece to its cluster.
    let pieces: Vec<(u64, u64)> = if o.compress {
        let mut v: Vec<(u64, u64)> = Vec::new();
        for &(s, l) in &copy {
            let (a, b) = (s / cs * cs, ((s + l).div_ceil(cs) * cs).min(size));
            for (p, n) in chunks(a, b - a, cs) {
                if v.last().is_some_and(|&(q, _)| q == p) {
                    continue;
                }
                v.push((p, n));
            }
        }
        v
    } else {
        copy.iter()
            .flat_map(|&(s, l)| chunks(s, l, chunk))
            .collect()
    };
    let src = Arc::new(src.clone());
    let compress = o.compress;
    let jobs = pieces.into_iter().map(|(off, len)| {
        let src = src.clone();
        let target = target.clone();
        let report = {
            let done = done.clone();
            let progress = o.progress.clone();
            move |n: u64| {
                let d = done.fetch_add(n, Ordering::Relaxed) + n;
                if let Some(p) = &progress {
                    p(d, total);
                }
            }
        };
        async move {
            let mut buf = vec![0u8; len as usize];
            read_disk(&src, &mut buf, off).await?;
            if compress {
                if buf.iter().any(|&b| b != 0) {
                    let Target::Qcow2(img) = &target else {
                        unreachable!("checked above")
                    };
                    img.write_compressed(off, &buf).await?;
                }
            } else {
                write_sparse(&target, &buf, off).await?;
            }
            report(len);
            Ok(())
        }
    });
    run_parallel(jobs, o.parallel).await?;
    match target {
        Target::Qcow2(img) => img.close().await,
        Target::Raw(f) => f.flush().await.map_err(Error::io("syncing the target")),
    }
}

/// Writes `buf` at `off`, skipping 4 KiB-aligned runs of zeros (qemu-img's `-S 4k`).
async fn write_sparse(target: &Target, buf: &[u8], off: u64) -> Result<()> {
    const MIN: u64 = 4096;
    let mut pos = 0usize;
    while pos < buf.len() {
        // The run of data (or zeros) that starts here, in 4 KiB-aligned steps.
        let step = |p: usize| (((off + p as u64) / MIN + 1) * MIN - off) as usize;
        let is_zero = |p: usize| buf[p..step(p).min(buf.len())].iter().all(|&b| b == 0);
        let z = is_zero(pos);
        let mut end = step(pos).min(buf.len());
        while end < buf.len() && is_zero(end) == z {
            end = step(end).min(buf.len());
        }
        if !z {
            let piece = &buf[pos..end];
            let at = off + pos as u64;
            match target {
                Target::Qcow2(img) => img.write_at(piece, at).await?,
                Target::Raw(f) => {
                    f.write_at(IoBuf::from_slice(piece, 1), at)
                        .await
                        .map_err(Error::io("writing the target"))?;
                }
            }
        }
        pos = end;
    }
    Ok(())
}
