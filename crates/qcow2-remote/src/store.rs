//! From a URL to an object store and the object's path in it, configured the standard
//! way: `AWS_*`, `GOOGLE_*` and `AZURE_*` environment variables through `object_store`'s
//! builders (`AWS_ENDPOINT`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
//! `AWS_ALLOW_HTTP`, ...).

use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::http::HttpBuilder;
use object_store::path::Path;
use object_store::{ClientOptions, ObjectStore, ObjectStoreScheme, RetryConfig};
use url::Url;

use crate::error::RemoteError;

/// The URL schemes [`store_for_url`] opens.
pub const SCHEMES: &[&str] = &[
    "s3", "s3a", "gs", "az", "azure", "abfs", "abfss", "http", "https",
];

/// The store behind `url` and the object's path in it.
///
/// `s3://bucket/key` (and `s3a://`), `gs://bucket/object`, `az://container/blob` (and
/// `azure://`, `abfs(s)://`) take their credentials and endpoint from the environment;
/// `http://` and `https://` URLs are plain HTTP servers with range support (nginx, a CDN,
/// a presigned URL), read like QEMU's curl driver reads them.
pub fn store_for_url(url: &str) -> Result<(Arc<dyn ObjectStore>, Path), RemoteError> {
    let invalid = |reason: String| RemoteError::InvalidUrl {
        url: url.to_string(),
        reason,
    };
    let parsed = Url::parse(url).map_err(|e| invalid(e.to_string()))?;
    let config = |source| RemoteError::Config {
        url: url.to_string(),
        source: Arc::new(source),
    };
    // The file retries itself, with its own timeout and typed errors (fetch.rs); a second
    // layer of retries inside the store would multiply the time to give up.
    let no_retry = RetryConfig {
        max_retries: 0,
        ..RetryConfig::default()
    };
    let (scheme, path) = scheme_and_path(&parsed).map_err(invalid)?;
    let store: Arc<dyn ObjectStore> = match (parsed.scheme(), scheme) {
        // Plain HTTP(S) stays plain HTTP, whatever the host: the URL says how to read it.
        ("http" | "https", _) => {
            let origin = parsed.origin().ascii_serialization();
            let path = Path::from_url_path(parsed.path()).map_err(|e| invalid(e.to_string()))?;
            let store = HttpBuilder::new()
                .with_url(origin)
                .with_client_options(ClientOptions::new().with_allow_http(true))
                .with_retry(no_retry)
                .build()
                .map_err(config)?;
            return Ok((Arc::new(store), path));
        }
        (_, ObjectStoreScheme::AmazonS3) => Arc::new(
            AmazonS3Builder::from_env()
                .with_url(url)
                .with_retry(no_retry)
                .build()
                .map_err(config)?,
        ),
        (_, ObjectStoreScheme::GoogleCloudStorage) => Arc::new(
            GoogleCloudStorageBuilder::from_env()
                .with_url(url)
                .with_retry(no_retry)
                .build()
                .map_err(config)?,
        ),
        (_, ObjectStoreScheme::MicrosoftAzure) => Arc::new(
            MicrosoftAzureBuilder::from_env()
                .with_url(url)
                .with_retry(no_retry)
                .build()
                .map_err(config)?,
        ),
        (s, _) => {
            return Err(invalid(format!(
                "unsupported scheme '{s}' (expected one of {})",
                SCHEMES.join(", ")
            )))
        }
    };
    if path.as_ref().is_empty() {
        return Err(invalid("the URL names a bucket but no object".into()));
    }
    Ok((store, path))
}

/// The kind of store `url` names and the object's path in it.
fn scheme_and_path(url: &Url) -> Result<(ObjectStoreScheme, Path), String> {
    let (scheme, path) = ObjectStoreScheme::parse(url).map_err(|e| e.to_string())?;
    if matches!(url.scheme(), "az" | "adl" | "azure" | "abfs" | "abfss") {
        // The builder takes the host as the container (`az://container/path`, or
        // `abfs://container@account.dfs.core.windows.net/path`), so the object's path is
        // the whole URL path. `ObjectStoreScheme::parse` (object_store 0.12) drops the
        // first segment of an `az://` path, which named no object for `az://c/blob` and
        // the wrong one for `az://c/dir/blob` (found against Azurite).
        let path = Path::from_url_path(url.path()).map_err(|e| e.to_string())?;
        return Ok((scheme, path));
    }
    Ok((scheme, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_and_paths() {
        let (_, p) = store_for_url("http://127.0.0.1:8080/images/base%20x.qcow2").unwrap();
        assert_eq!(p.as_ref(), "images/base x.qcow2");
        let (_, p) = store_for_url("s3://bucket/dir/base.qcow2").unwrap();
        assert_eq!(p.as_ref(), "dir/base.qcow2");
        // Azure: the host is the container, the path the blob's. (Checked without building
        // a store, which needs an account from the environment.)
        for (url, blob) in [
            ("az://images/base.qcow2", "base.qcow2"),
            ("az://images/dir/base.qcow2", "dir/base.qcow2"),
            ("azure://images/dir/base.qcow2", "dir/base.qcow2"),
            ("abfs://images/dir/base.qcow2", "dir/base.qcow2"),
            ("az://images", ""),
        ] {
            let (scheme, p) = scheme_and_path(&Url::parse(url).unwrap()).unwrap();
            assert_eq!(scheme, ObjectStoreScheme::MicrosoftAzure, "{url}");
            assert_eq!(p.as_ref(), blob, "{url}");
        }
        for bad in [
            "ftp://h/x",
            "not a url",
            "s3://bucket",
            "file:///etc/passwd",
        ] {
            assert!(
                matches!(store_for_url(bad), Err(RemoteError::InvalidUrl { .. })),
                "{bad}"
            );
        }
    }
}
