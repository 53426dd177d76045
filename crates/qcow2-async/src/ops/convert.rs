//! `qemu-img convert` between qcow2 and raw, with compression and a backing file for the
//! target.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tracing::instrument;

use super::{chunks, disk_map, read_disk, run_parallel, Progress};
use crate::backing::Disk;
use crate::barrier::BarrierMode;
use crate::error::{Error, Result};
use crate::image::Image;
use crate::io::{open_file, BlockFile, FileOptions, IoBuf};
use crate::options::{BackingFormat, CreateOptions, OpenOptions};

/// How [`convert`] writes the target.
#[derive(Clone)]
#[non_exhaustive]
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
    /// How the target is written (`-t`); [`CacheMode::Writeback`] unless set.
    pub target_cache: CacheMode,
}

/// qemu-img's cache modes (`-t` / `-T`): whether the page cache is bypassed, and when writes
/// are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum CacheMode {
    /// O_DIRECT; durable at the end (and at write-back barriers).
    None,
    /// Page cache; durable at the end (and at write-back barriers).
    #[default]
    Writeback,
    /// Page cache; every write durable when it completes.
    Writethrough,
    /// O_DIRECT; every write durable when it completes.
    Directsync,
    /// Page cache, no syncs at all: a crash may lose or corrupt the target (qemu-img
    /// convert's default target mode).
    Unsafe,
}

impl CacheMode {
    /// Whether files are opened with O_DIRECT.
    pub fn direct(self) -> bool {
        matches!(self, CacheMode::None | CacheMode::Directsync)
    }

    /// The write ordering that gives this mode's durability.
    pub fn barrier(self) -> BarrierMode {
        match self {
            CacheMode::None | CacheMode::Writeback => BarrierMode::Ordered,
            CacheMode::Writethrough | CacheMode::Directsync => BarrierMode::Full,
            CacheMode::Unsafe => BarrierMode::None,
        }
    }
}

impl std::str::FromStr for CacheMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<CacheMode> {
        Ok(match s {
            "none" | "off" => CacheMode::None,
            "writeback" => CacheMode::Writeback,
            "writethrough" => CacheMode::Writethrough,
            "directsync" => CacheMode::Directsync,
            "unsafe" => CacheMode::Unsafe,
            other => {
                return Err(Error::InvalidArgument(format!(
                "invalid cache mode '{other}' (none, writeback, writethrough, directsync, unsafe)"
            )))
            }
        })
    }
}

impl std::fmt::Debug for ConvertOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConvertOptions")
            .field("format", &self.format)
            .field("compress", &self.compress)
            .field("parallel", &self.parallel)
            .field("target_cache", &self.target_cache)
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
            target_cache: CacheMode::Writeback,
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
///
/// Cancellation: dropped before it returns, the conversion stops and its temporary file
/// is removed, as on a failure: `dst` is untouched (writes already handed to the target
/// finish on the runtime, into the removed file).
#[instrument(skip_all, fields(dst = %dst.display()))]
pub async fn convert(src: &Disk, dst: &Path, o: &ConvertOptions) -> Result<()> {
    if o.compress && o.format != BackingFormat::Qcow2 {
        return Err(Error::InvalidArgument(
            "compression needs a qcow2 target".into(),
        ));
    }
    let tmp = TempFile(Some(temp_name(dst)));
    convert_into(src, tmp.path(), o).await?;
    let done = tmp.keep();
    std::fs::rename(&done, dst).map_err(|e| {
        let _ = std::fs::remove_file(&done);
        Error::io("renaming the converted image")(e)
    })
}

/// The target under its temporary name: removed when dropped (a failure, or the caller
/// dropping the conversion) unless kept.
struct TempFile(Option<PathBuf>);

impl TempFile {
    fn path(&self) -> &Path {
        self.0.as_deref().expect("kept temporary file")
    }

    fn keep(mut self) -> PathBuf {
        self.0.take().expect("kept temporary file")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
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

async fn convert_into(src: &Disk, tmp: &Path, o: &ConvertOptions) -> Result<()> {
    let size = src.size();
    let with_backing = o.format == BackingFormat::Qcow2 && o.create.backing_file.is_some();
    let target = match o.format {
        BackingFormat::Qcow2 => {
            let mut c = o.create.clone();
            c.size = size;
            let open = OpenOptions {
                direct: o.target_cache.direct(),
                barrier: o.target_cache.barrier(),
                ..OpenOptions::default()
            };
            Target::Qcow2(Image::create(tmp, &c, &open).await?)
        }
        BackingFormat::Raw => {
            let f = open_file(
                tmp,
                &FileOptions {
                    create: true,
                    truncate: true,
                    direct: o.target_cache.direct(),
                    ..FileOptions::default()
                },
            )
            .map_err(Error::io("creating the target"))?;
            // O_DIRECT wants aligned buffers; the copy loop's are not.
            let f: Arc<dyn BlockFile> = if o.target_cache.direct() {
                Arc::new(crate::direct::AlignedFile::new(f))
            } else {
                f
            };
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
    let pool = BufPool::default();
    let compress = o.compress;
    let write_through = o.target_cache.barrier() == BarrierMode::Full;
    let jobs = pieces.into_iter().map(|(off, len)| {
        let src = src.clone();
        let target = target.clone();
        let pool = pool.clone();
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
            let mut buf = pool.take(len as usize);
            read_disk(&src, &mut buf, off).await?;
            if compress {
                if !all_zero(&buf) {
                    let Target::Qcow2(img) = &target else {
                        unreachable!("checked above")
                    };
                    img.write_compressed(off, &buf).await?;
                }
                pool.give(buf);
            } else {
                let buf = buf.freeze();
                write_sparse(&target, &buf, off).await?;
                if let (true, Target::Raw(f)) = (write_through, &target) {
                    // qcow2 targets are made durable per write by their barrier mode.
                    f.flush().await.map_err(Error::io("syncing the target"))?;
                }
                // Every piece written has been returned, so the buffer is ours alone again.
                if let Ok(buf) = buf.try_into_mut() {
                    pool.give(buf);
                }
            }
            report(len);
            Ok(())
        }
    });
    run_parallel(jobs, o.parallel).await?;
    match target {
        Target::Qcow2(img) => img.close().await,
        Target::Raw(_) if o.target_cache == CacheMode::Unsafe => Ok(()),
        Target::Raw(f) => f.flush().await.map_err(Error::io("syncing the target")),
    }
}

/// Whether every byte is zero, a word at a time: the byte-wise loop was the largest share of
/// a plain convert's CPU time (it scans every byte read).
fn all_zero(buf: &[u8]) -> bool {
    let mut words = buf.chunks_exact(16);
    let body = words
        .by_ref()
        .all(|w| u128::from_ne_bytes(w.try_into().expect("16 bytes")) == 0);
    body && words.remainder().iter().all(|&b| b == 0)
}

/// The copy loop's buffers, used again job after job: a fresh 2 MiB buffer per job cost more
/// in page faults and zero-filling than its copy (a third of a plain convert's CPU, perf).
/// It holds at most as many buffers as jobs ran at once.
#[derive(Clone, Default)]
struct BufPool(Arc<std::sync::Mutex<Vec<BytesMut>>>);

impl BufPool {
    /// A buffer of `len` bytes (their values are whatever a previous job left: every job
    /// overwrites its whole buffer before it reads any of it).
    fn take(&self, len: usize) -> BytesMut {
        let reused = self.0.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut buf = reused.unwrap_or_default();
        buf.resize(len, 0);
        buf
    }

    fn give(&self, buf: BytesMut) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(buf);
    }
}

/// Writes `buf` at `off`, skipping 4 KiB-aligned runs of zeros (qemu-img's `-S 4k`). Each
/// run of data is handed over as a slice of `buf`'s memory, without a copy.
async fn write_sparse(target: &Target, buf: &Bytes, off: u64) -> Result<()> {
    const MIN: u64 = 4096;
    let mut pos = 0usize;
    while pos < buf.len() {
        // The run of data (or zeros) that starts here, in 4 KiB-aligned steps.
        let step = |p: usize| (((off + p as u64) / MIN + 1) * MIN - off) as usize;
        let is_zero = |p: usize| all_zero(&buf[p..step(p).min(buf.len())]);
        let z = is_zero(pos);
        let mut end = step(pos).min(buf.len());
        while end < buf.len() && is_zero(end) == z {
            end = step(end).min(buf.len());
        }
        if !z {
            let piece = IoBuf::from_bytes(buf.slice(pos..end));
            let at = off + pos as u64;
            match target {
                Target::Qcow2(img) => drop(img.write_buf(piece, at).await?),
                Target::Raw(f) => {
                    f.write_at(piece, at)
                        .await
                        .map_err(Error::io("writing the target"))?;
                }
            }
        }
        pos = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn all_zero_sees_every_byte() {
        for len in [0usize, 1, 15, 16, 17, 4096, 4099] {
            let mut v = vec![0u8; len];
            assert!(super::all_zero(&v));
            for i in 0..len {
                v[i] = 1;
                assert!(!super::all_zero(&v), "len {len}, byte {i}");
                v[i] = 0;
            }
        }
    }

    #[test]
    fn cache_modes_parse_like_qemu_img() {
        use super::CacheMode;
        use crate::barrier::BarrierMode;
        let m = |s: &str| s.parse::<CacheMode>().unwrap();
        assert!(m("none").direct() && m("directsync").direct() && !m("writeback").direct());
        assert_eq!(m("unsafe").barrier(), BarrierMode::None);
        assert_eq!(m("writethrough").barrier(), BarrierMode::Full);
        assert_eq!(m("writeback").barrier(), BarrierMode::Ordered);
        assert!("native".parse::<CacheMode>().is_err());
    }
}
