//! `qemu-img commit`: merge an image into its backing file.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tracing::instrument;

use super::{chunks, run_parallel, Progress};
use crate::error::{Error, Result};
use crate::image::{Image, ResizeOptions};
use crate::io::{open_file, BlockFile, FileOptions, IoBuf};
use crate::options::{BackingFormat, OpenOptions};

/// Options for [`commit`].
#[derive(Clone, Default)]
#[non_exhaustive]
pub struct CommitOptions {
    /// Leave the top image as it is (`-d`); by default it is emptied afterwards.
    pub keep_top: bool,
    /// Requests in flight.
    pub parallel: usize,
    /// Called as bytes are done.
    pub progress: Option<Progress>,
    /// How the top image is opened (its backing policy applies to finding the base).
    pub open: OpenOptions,
}

impl std::fmt::Debug for CommitOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommitOptions")
            .field("keep_top", &self.keep_top)
            .finish()
    }
}

#[derive(Clone)]
enum Base {
    Qcow2(Image),
    Raw(Arc<dyn BlockFile>),
}

/// Writes everything the image at `top` holds itself into its backing file, then empties
/// the top image unless told to keep it (like `qemu-img commit [-d]`). A base smaller than
/// the top image is grown first.
///
/// Cancellation: dropped before it returns, the commit stops where it is. The top keeps
/// its data unless the base was already complete and closed (then [`Image::make_empty`]
/// runs to its end). The base holds what was copied so far, as a crash of a writer there
/// leaves it: consistent, with writes since its last flush possibly missing and clusters
/// possibly leaked (`check -r leaks`). Committing again finishes the job.
#[instrument(skip(o))]
pub async fn commit(top: &Path, o: &CommitOptions) -> Result<()> {
    // The top's own data is all commit reads, so its backing chain stays closed: opened, it
    // would hold the base's read-only lock, which refuses the writer commit needs.
    let img = Image::open(
        top,
        &OpenOptions {
            backing: crate::options::BackingPolicy::Ignore,
            ..o.open.clone()
        },
    )
    .await?;
    let h = img.header().await;
    let Some(name) = h.backing_file.clone() else {
        return Err(Error::InvalidArgument(
            "Image does not have a backing file".into(),
        ));
    };
    let bpath = crate::image::backing_path(top, &name);
    let fmt = match &h.backing_format {
        Some(f) => f.parse::<BackingFormat>().map_err(Error::InvalidArgument)?,
        None => crate::image::probe_format(&bpath)?,
    };
    let size = img.virtual_size();
    let base = match fmt {
        BackingFormat::Qcow2 => {
            let b = Image::open(
                &bpath,
                &OpenOptions {
                    locking: o.open.locking,
                    ..OpenOptions::default()
                },
            )
            .await?;
            if b.virtual_size() < size {
                b.resize(size.div_ceil(512) * 512, ResizeOptions::default())
                    .await?;
            }
            Base::Qcow2(b)
        }
        BackingFormat::Raw => {
            let lock = crate::lock::FileLock::acquire(
                &bpath,
                crate::lock::Access::raw(false),
                o.open.locking,
                false,
            )?;
            let f = open_file(&bpath, &FileOptions::default())
                .map_err(Error::io("opening the backing file"))?;
            let f = crate::lock::LockedFile::wrap(f, lock);
            if f.len().await.map_err(Error::io("sizing the base"))? < size {
                f.set_len(size)
                    .await
                    .map_err(Error::io("growing the base"))?;
            }
            Base::Raw(f)
        }
    };
    let extents: Vec<_> = img
        .map(0, size)
        .await?
        .into_iter()
        .filter(|e| e.depth == 0 && e.present)
        .collect();
    let total: u64 = extents.iter().map(|e| e.length).sum();
    let done = Arc::new(AtomicU64::new(0));
    let mut jobs = Vec::new();
    for e in extents {
        for (off, len) in chunks(e.start, e.length, 2 << 20) {
            let (img, base, done, progress) =
                (img.clone(), base.clone(), done.clone(), o.progress.clone());
            let zero = e.zero;
            jobs.push(async move {
                match (&base, zero) {
                    (Base::Qcow2(b), true) => b.write_zeroes(off, len, false).await?,
                    (Base::Raw(f), true) => f
                        .zero_range(off, len)
                        .await
                        .map_err(Error::io("zeroing the base"))?,
                    (_, false) => {
                        let mut buf = vec![0u8; len as usize];
                        img.read_at(&mut buf, off).await?;
                        match &base {
                            Base::Qcow2(b) => b.write_at(&buf, off).await?,
                            Base::Raw(f) => {
                                f.write_at(IoBuf::from_vec(buf), off)
                                    .await
                                    .map_err(Error::io("writing the base"))?;
                            }
                        }
                    }
                }
                let d = done.fetch_add(len, Ordering::Relaxed) + len;
                if let Some(p) = &progress {
                    p(d, total);
                }
                Ok(())
            });
        }
    }
    run_parallel(jobs, o.parallel.max(1)).await?;
    match base {
        Base::Qcow2(b) => b.close().await?,
        Base::Raw(f) => f.flush().await.map_err(Error::io("syncing the base"))?,
    }
    if !o.keep_top {
        img.make_empty().await?;
    }
    img.close().await
}
