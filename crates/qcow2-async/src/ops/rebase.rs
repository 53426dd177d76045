//! `qemu-img rebase`: give an image a different backing file.

use std::path::Path;

use tracing::instrument;

use super::{open_disk, read_disk};
use crate::error::Result;
use crate::image::Image;
use crate::options::{BackingFormat, BackingPolicy, OpenOptions};

/// Options for [`rebase`].
#[derive(Clone, Default)]
#[non_exhaustive]
pub struct RebaseOptions {
    /// Only rewrite the name (`-u`): the caller promises the new backing file has the same
    /// content where it matters.
    pub unsafe_names_only: bool,
    /// How the image and its current backing chain are opened.
    pub open: OpenOptions,
    /// Called as the ranges the image does not hold itself are compared.
    pub progress: Option<super::Progress>,
}

impl std::fmt::Debug for RebaseOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RebaseOptions")
            .field("unsafe_names_only", &self.unsafe_names_only)
            .finish()
    }
}

/// Points `image` at `backing` (a name as stored in the header, resolved relative to the
/// image; `None` removes the backing file). In safe mode every range the image does not
/// hold itself and where the old and new backing views differ is first copied into the
/// image from the old view, so the guest sees the same disk afterwards.
///
/// Cancellation: dropped before it returns, the image still points at its old backing
/// file and reads as before: only copies of the old view were written into it, left as a
/// crash of a writer there leaves them (possibly leaked clusters, `check -r leaks`). Once
/// started, the switch of the name runs to its end. Rebasing again finishes the job.
#[instrument(skip(o))]
pub async fn rebase(
    image: &Path,
    backing: Option<(&str, BackingFormat)>,
    o: &RebaseOptions,
) -> Result<()> {
    if o.unsafe_names_only {
        let open = OpenOptions {
            backing: BackingPolicy::Ignore,
            ..o.open.clone()
        };
        let img = Image::open(image, &open).await?;
        img.set_backing_name(backing.map(|b| b.0), backing.map(|b| b.1.name()))
            .await?;
        return img.close().await;
    }
    let img = Image::open(image, &o.open).await?;
    let new = match backing {
        Some((name, fmt)) => Some(
            open_disk(
                &crate::image::backing_path(image, name),
                fmt,
                &OpenOptions::read_only(),
            )
            .await?,
        ),
        None => None,
    };
    let size = img.virtual_size();
    let step = img.cluster_size().max(65536);
    let (mut old_buf, mut new_buf) = (vec![0u8; step as usize], vec![0u8; step as usize]);
    let todo: Vec<_> = img
        .map(0, size)
        .await?
        .into_iter()
        .filter(|e| !(e.depth == 0 && e.present))
        .collect();
    let total: u64 = todo.iter().map(|e| e.length).sum();
    let mut done = 0u64;
    for e in todo {
        for (off, len) in super::chunks(e.start, e.length, step) {
            let (a, b) = (&mut old_buf[..len as usize], &mut new_buf[..len as usize]);
            img.read_at(a, off).await?;
            match &new {
                Some(d) => read_disk(d, b, off).await?,
                None => b.fill(0),
            }
            // Copy only the 512-byte sectors that differ, as qemu-img does.
            let mut i = 0usize;
            while i < a.len() {
                let sec = |k: usize| a[k..(k + 512).min(a.len())] != b[k..(k + 512).min(b.len())];
                if !sec(i) {
                    i += 512;
                    continue;
                }
                let mut j = i;
                while j < a.len() && sec(j) {
                    j += 512;
                }
                let j = j.min(a.len());
                img.write_at(&a[i..j], off + i as u64).await?;
                i = j;
            }
            done += len;
            if let Some(p) = &o.progress {
                p(done, total);
            }
        }
    }
    img.set_backing_name(backing.map(|b| b.0), backing.map(|b| b.1.name()))
        .await?;
    img.close().await
}
