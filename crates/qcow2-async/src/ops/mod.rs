//! Whole-image operations built on the public [`Image`](crate::Image) API, one per
//! `qemu-img` verb: `convert`, `compare`, `commit`, `rebase`, `measure`.
//!
//! Every operation that copies data walks [`Image::map`](crate::Image::map) so that
//! unallocated and zero ranges cost nothing, and keeps several requests in flight.

mod commit;
mod compare;
mod convert;
mod measure;
mod rebase;

use std::path::Path;
use std::sync::Arc;

pub use commit::{commit, CommitOptions};
pub use compare::{compare, CompareResult};
pub use convert::{convert, CacheMode, ConvertOptions};
pub use measure::{measure, Measure};
pub use rebase::{rebase, RebaseOptions};

use crate::backing::Disk;
use crate::error::Result;
use crate::image::MapExtent;
use crate::options::{BackingFormat, OpenOptions};

/// Progress reports: `(bytes done, bytes total)`.
pub type Progress = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// Opens any supported disk read-only as a [`Disk`] (the read interface shared by qcow2
/// and raw images).
///
/// Cancellation: as [`Disk::open`].
pub async fn open_disk(path: &Path, format: BackingFormat, opts: &OpenOptions) -> Result<Disk> {
    Disk::open(path, format, opts).await
}

/// The status of a whole disk; a raw file is data except where it has holes.
pub(crate) async fn disk_map(d: &Disk) -> Result<Vec<MapExtent>> {
    match d {
        Disk::Qcow2(img) => img.map(0, img.virtual_size()).await,
        Disk::Raw(_, n) if *n == 0 => Ok(vec![]),
        Disk::Raw(file, n) => {
            let whole = MapExtent {
                start: 0,
                length: *n,
                depth: 0,
                present: true,
                zero: false,
                data: true,
                compressed: false,
                offset: Some(0),
                short_layer: None,
            };
            Ok(crate::image::refine_by_holes(file, vec![whole], |_| true, true).await)
        }
    }
}

/// Reads `buf.len()` bytes at `off` from any disk (zeros past its end).
pub(crate) async fn read_disk(d: &Disk, buf: &mut [u8], off: u64) -> Result<()> {
    d.read(buf, off).await
}

/// Splits `[start, start + len)` at multiples of `chunk`.
pub(crate) fn chunks(start: u64, len: u64, chunk: u64) -> impl Iterator<Item = (u64, u64)> {
    let end = start + len;
    let mut pos = start;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let next = ((pos / chunk + 1) * chunk).min(end);
        let r = (pos, next - pos);
        pos = next;
        Some(r)
    })
}

/// Runs `jobs` with at most `parallel` in flight, stopping at the first error.
pub(crate) async fn run_parallel<F>(
    jobs: impl IntoIterator<Item = F>,
    parallel: usize,
) -> Result<()>
where
    F: std::future::Future<Output = Result<()>> + Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    for job in jobs {
        while set.len() >= parallel.max(1) {
            join_one(&mut set).await?;
        }
        set.spawn(job);
    }
    while !set.is_empty() {
        join_one(&mut set).await?;
    }
    Ok(())
}

async fn join_one(set: &mut tokio::task::JoinSet<Result<()>>) -> Result<()> {
    match set.join_next().await {
        Some(Ok(r)) => r,
        Some(Err(e)) => Err(crate::Error::InvalidArgument(format!(
            "a worker task failed: {e}"
        ))),
        None => Ok(()),
    }
}
