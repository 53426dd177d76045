//! Opening disks named by URL through the caller's [`RemoteOpener`](crate::RemoteOpener)
//! (see `crate::remote`): a remote image is always read-only, has no lock (no other
//! process's lock bytes can be seen on an object) and no external data file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use qcow2_format::IncompatibleFeatures;
use tracing::instrument;

use super::{open_backing, read_header, Image};
use crate::backing::Disk;
use crate::error::{Error, Result};
use crate::io::{BlockFile, IoBuf};
use crate::options::{BackingFormat, OpenOptions};
use crate::remote::{is_url, join_url, RemoteBacking};

impl Image {
    /// Opens the qcow2 image at `url` (`s3://bucket/key`, `https://...`) read-only,
    /// through the opener in `opts.remote`. Its backing chain follows `opts`: names
    /// relative to the URL's folder are URLs too, and URLs are followed only if
    /// `opts.remote_backing` allows.
    ///
    /// Cancellation: safe to drop at any point; it only reads.
    #[instrument(skip_all, fields(url))]
    pub async fn open_url(url: &str, opts: &OpenOptions) -> Result<Image> {
        match Disk::open_url(url, BackingFormat::Qcow2, opts).await? {
            Disk::Qcow2(img) => Ok(img),
            Disk::Raw(..) => unreachable!("opened as qcow2"),
        }
    }
}

impl Disk {
    /// As [`Disk::open`], for a disk at `url`, through the opener in `opts.remote`
    /// (see [`Image::open_url`]).
    ///
    /// Cancellation: safe to drop at any point; it only reads.
    pub async fn open_url(url: &str, format: BackingFormat, opts: &OpenOptions) -> Result<Disk> {
        if !opts.read_only {
            return Err(Error::InvalidArgument(format!(
                "{url}: remote disks open read-only"
            )));
        }
        open_remote(url, Some(format), opts, 0, &mut Vec::new()).await
    }
}

/// The URL that the backing name `name` of the image at `image` stands for, or `None`
/// for a local file. Refuses what the policy refuses: a URL without an opener to open it
/// (as before openers existed), a URL the caller did not allow images to name, and an
/// absolute path named by a remote image.
pub(super) fn backing_url(image: &Path, name: &str, opts: &OpenOptions) -> Result<Option<String>> {
    let parent = image.to_str().filter(|p| is_url(p));
    let url = match parent {
        Some(base) => join_url(base, name).ok_or_else(|| Error::Backing {
            path: name.into(),
            reason: format!("the remote image {base} names a local file by absolute path"),
        })?,
        None if is_url(name) => name.to_string(),
        None => return Ok(None),
    };
    if opts.remote.is_none() {
        return Err(Error::unsupported(
            "backing file protocol",
            format!("{url}: no remote opener installed (OpenOptions::remote)"),
        ));
    }
    if opts.remote_backing == RemoteBacking::Refuse {
        return Err(Error::Backing {
            path: url.into(),
            reason: "remote backing files are refused by the open policy \
                     (OpenOptions::remote_backing)"
                .into(),
        });
    }
    Ok(Some(url))
}

/// Opens the disk at `url` as the `depth`-th layer of a chain (0: the caller's own).
pub(super) async fn open_remote(
    url: &str,
    format: Option<BackingFormat>,
    opts: &OpenOptions,
    depth: u32,
    chain: &mut Vec<PathBuf>,
) -> Result<Disk> {
    let Some(opener) = &opts.remote else {
        return Err(Error::unsupported(
            "backing file protocol",
            format!("{url}: no remote opener installed (OpenOptions::remote)"),
        ));
    };
    if depth > opts.max_backing_depth {
        return Err(Error::Backing {
            path: url.into(),
            reason: format!("backing chain deeper than {}", opts.max_backing_depth),
        });
    }
    let key = PathBuf::from(url);
    if chain.contains(&key) {
        return Err(Error::Backing {
            path: key,
            reason: "backing chain loop".into(),
        });
    }
    chain.push(key);
    let file = opener
        .open(url)
        .await
        .map_err(Error::io("opening a remote file"))?;
    let format = match format {
        Some(f) => f,
        None if opts.probe_backing_format => probe(&file).await?,
        None => {
            return Err(Error::Backing {
                path: url.into(),
                reason: "the image names no backing format; pass one \
                         (BackingPolicy::Override) or allow probing"
                    .into(),
            })
        }
    };
    let ro = OpenOptions {
        read_only: true,
        direct: false,
        ..opts.clone()
    };
    match format {
        BackingFormat::Raw => {
            let len = file
                .len()
                .await
                .map_err(Error::io("sizing a remote file"))?;
            Ok(Disk::Raw(file, len))
        }
        BackingFormat::Qcow2 => {
            let hdr = read_header(&file).await?;
            if hdr
                .header
                .incompatible
                .contains(IncompatibleFeatures::EXTERNAL_DATA_FILE)
            {
                return Err(Error::unsupported(
                    "external data file of a remote image",
                    url.to_string(),
                ));
            }
            // The caller's backing policy is for the disk it opens; the layers below
            // follow their names, as local ones do.
            let sub = if depth == 0 {
                ro.clone()
            } else {
                OpenOptions {
                    backing: crate::BackingPolicy::FromImage,
                    ..ro.clone()
                }
            };
            let backing = Box::pin(open_backing(&hdr, Path::new(url), &sub, depth, chain)).await?;
            let img = Image::open_locked(
                file,
                None,
                Some(PathBuf::from(url)),
                &ro,
                backing,
                Vec::new(),
            )
            .await?;
            Ok(Disk::Qcow2(img))
        }
    }
}

/// qcow2 if the file starts with qcow2's magic, raw otherwise (only when the caller
/// allowed probing: a raw guest can write that magic).
async fn probe(file: &Arc<dyn BlockFile>) -> Result<BackingFormat> {
    let magic = file
        .read_at(IoBuf::zeroed(4, 1), 0)
        .await
        .map_err(Error::io("probing a remote file"))?;
    Ok(if &magic[..] == b"QFI\xfb" {
        BackingFormat::Qcow2
    } else {
        BackingFormat::Raw
    })
}
