//! Read-only disks: what an image's unallocated clusters read from (its backing file), and
//! what `convert`, `compare` and `measure` read.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::image::Image;
use crate::io::{BlockFile, IoBuf};

/// A read-only guest disk, qcow2 or raw: an image's backing file ([`Image::backing`]), or
/// a source opened with [`Disk::open`] for [`crate::ops`].
#[derive(Debug, Clone)]
pub enum Disk {
    /// A qcow2 image (itself possibly with a backing file).
    Qcow2(Image),
    /// A raw image of the given size.
    Raw(Arc<dyn BlockFile>, u64),
}

/// The old name of [`Disk`], from when it only meant a backing file.
#[deprecated(since = "0.2.0", note = "renamed to `Disk`: it is any read-only disk")]
pub type Backing = Disk;

impl Disk {
    /// Size of the backing image; reads beyond it return zeros.
    pub fn size(&self) -> u64 {
        match self {
            Disk::Qcow2(i) => i.virtual_size(),
            Disk::Raw(_, n) => *n,
        }
    }

    /// Fills `buf` from guest offset `off`; past the backing file's end it reads zeros.
    pub(crate) fn read<'a>(
        &'a self,
        buf: &'a mut [u8],
        off: u64,
    ) -> Pin<Box<dyn Future<Output = Result<()>> + Send + 'a>> {
        Box::pin(async move {
            let size = self.size();
            let n = if off >= size {
                0
            } else {
                (size - off).min(buf.len() as u64) as usize
            };
            buf[n..].fill(0);
            if n == 0 {
                return Ok(());
            }
            match self {
                Disk::Qcow2(img) => img.read_at(&mut buf[..n], off).await,
                Disk::Raw(f, _) => {
                    let b = f
                        .read_at(IoBuf::zeroed(n, f.alignment()), off)
                        .await
                        .map_err(Error::io("reading the backing file"))?;
                    buf[..n].copy_from_slice(&b[..n]);
                    Ok(())
                }
            }
        })
    }
}
