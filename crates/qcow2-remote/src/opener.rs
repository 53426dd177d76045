//! The engine's hook: opening URLs as [`RemoteFile`]s.

use std::path::PathBuf;
use std::sync::Arc;

use qcow2_async::io::{BlockFile, IoFuture};
use qcow2_async::RemoteOpener;

use crate::file::RemoteFile;
use crate::options::RemoteOptions;
use crate::store::store_for_url;

/// Opens `s3://`, `gs://`, `az://`, `http(s)://` URLs (see [`store_for_url`]) as
/// [`RemoteFile`]s with these options. Install it in `OpenOptions::remote`.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct ObjectStoreOpener {
    /// Options of every file it opens.
    pub options: RemoteOptions,
    /// A folder for local cache files (see [`RemoteOptions::cache_file`]), one per URL,
    /// named after a hash of the URL; `None`: none (unless `options` names one file).
    pub cache_dir: Option<PathBuf>,
}

impl ObjectStoreOpener {
    /// An opener whose files use `options`.
    pub fn new(options: RemoteOptions) -> ObjectStoreOpener {
        ObjectStoreOpener {
            options,
            cache_dir: None,
        }
    }

    /// Opens `url` as a [`RemoteFile`].
    pub async fn open_file(&self, url: &str) -> Result<RemoteFile, crate::RemoteError> {
        let (store, path) = store_for_url(url)?;
        let mut options = self.options.clone();
        if let (None, Some(dir)) = (&options.cache_file, &self.cache_dir) {
            options.cache_file = Some(dir.join(cache_file_name(url)));
        }
        RemoteFile::open(store, path, url, options).await
    }
}

/// The cache file of `url` in a cache folder: the SHA-256 of the URL, so that any URL
/// gives one short, safe file name (what the file holds is still checked against the
/// object's identity, URL included, when it is opened).
pub fn cache_file_name(url: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(url.as_bytes());
    let mut name = String::with_capacity(70);
    for b in digest {
        name.push_str(&format!("{b:02x}"));
    }
    name.push_str(".cache");
    name
}

impl RemoteOpener for ObjectStoreOpener {
    fn open<'a>(&'a self, url: &'a str) -> IoFuture<'a, Arc<dyn BlockFile>> {
        Box::pin(async move {
            let file = self.open_file(url).await?;
            Ok(Arc::new(file) as Arc<dyn BlockFile>)
        })
    }
}
