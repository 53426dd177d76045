//! The engine's hook: opening URLs as [`RemoteFile`]s.

use std::sync::Arc;

use qcow2_async::io::{BlockFile, IoFuture};
use qcow2_async::RemoteOpener;

use crate::file::RemoteFile;
use crate::options::RemoteOptions;
use crate::store::store_for_url;

/// Opens `s3://`, `gs://`, `az://`, `http(s)://` URLs (see [`store_for_url`]) as
/// [`RemoteFile`]s with these options. Install it in `OpenOptions::remote`.
#[derive(Debug, Clone, Default)]
pub struct ObjectStoreOpener {
    /// Options of every file it opens.
    pub options: RemoteOptions,
}

impl ObjectStoreOpener {
    /// An opener whose files use `options`.
    pub fn new(options: RemoteOptions) -> ObjectStoreOpener {
        ObjectStoreOpener { options }
    }

    /// Opens `url` as a [`RemoteFile`].
    pub async fn open_file(&self, url: &str) -> Result<RemoteFile, crate::RemoteError> {
        let (store, path) = store_for_url(url)?;
        RemoteFile::open(store, path, url, self.options.clone()).await
    }
}

impl RemoteOpener for ObjectStoreOpener {
    fn open<'a>(&'a self, url: &'a str) -> IoFuture<'a, Arc<dyn BlockFile>> {
        Box::pin(async move {
            let file = self.open_file(url).await?;
            Ok(Arc::new(file) as Arc<dyn BlockFile>)
        })
    }
}
