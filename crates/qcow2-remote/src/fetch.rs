//! Requests to the store: the HEAD that pins the object at open, range GETs that must
//! find the same object, and the retry rule for transient failures.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectMeta, ObjectStore};

use crate::error::RemoteError;
use crate::options::RemoteOptions;

/// The object a file reads, as it was when the file was opened.
#[derive(Debug)]
pub(crate) struct Object {
    pub store: Arc<dyn ObjectStore>,
    pub path: Path,
    pub url: String,
    /// From the HEAD at open: size, ETag, version, modification time.
    pub meta: ObjectMeta,
}

/// A failure worth another attempt.
#[derive(Debug)]
pub(crate) enum Transient {
    /// No answer within the timeout.
    TimedOut,
    /// The store failed (connection refused or reset, a server error).
    Failed(Arc<object_store::Error>),
    /// The body ended early, after this many bytes of the attempt's range.
    Short(u64),
}

/// What one attempt ran into.
#[derive(Debug)]
pub(crate) enum Failure {
    Transient(Transient),
    Fatal(RemoteError),
}

/// Sorts a store error into worth retrying or not. `reading`: the object was pinned
/// already, so a missing object means it was deleted under us.
pub(crate) fn classify(url: &str, e: object_store::Error, reading: bool) -> Failure {
    use object_store::Error as E;
    let url = url.to_string();
    Failure::Fatal(match e {
        E::Generic { .. } => return Failure::Transient(Transient::Failed(Arc::new(e))),
        E::Precondition { .. } => RemoteError::Changed {
            url,
            detail: "the store no longer has the ETag or version pinned at open".into(),
        },
        E::NotFound { .. } if reading => RemoteError::Changed {
            url,
            detail: "the object is gone".into(),
        },
        E::NotFound { .. } => RemoteError::NotFound { url },
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => RemoteError::Denied {
            url,
            source: Arc::new(e),
        },
        _ => RemoteError::Store {
            url,
            source: Arc::new(e),
        },
    })
}

/// Attempts at one range: counts failures since the last progress, and says how long to
/// wait before the next attempt or which error to give up with.
#[derive(Debug)]
pub(crate) struct Retry<'a> {
    url: &'a str,
    range: Range<u64>,
    opts: &'a RemoteOptions,
    failures: u32,
}

impl<'a> Retry<'a> {
    pub(crate) fn new(url: &'a str, range: Range<u64>, opts: &'a RemoteOptions) -> Retry<'a> {
        Retry {
            url,
            range,
            opts,
            failures: 0,
        }
    }

    /// Data arrived: a long transfer that fails now and then is not a dead store.
    pub(crate) fn progress(&mut self) {
        self.failures = 0;
    }

    /// After a transient failure: the backoff before the next attempt (doubling, up to
    /// 8 times the first), or the error once the retries are used up.
    pub(crate) fn after(&mut self, t: Transient) -> Result<Duration, RemoteError> {
        self.failures += 1;
        if self.failures <= self.opts.retries {
            let doubling = (self.failures - 1).min(3);
            tracing::debug!(url = self.url, failure = ?t, attempt = self.failures, "retrying");
            return Ok(self.opts.backoff * (1u32 << doubling));
        }
        let (url, offset, end, attempts) = (
            self.url.to_string(),
            self.range.start,
            self.range.end,
            self.failures,
        );
        Err(match t {
            Transient::TimedOut => RemoteError::Timeout {
                url,
                offset,
                end,
                timeout: self.opts.timeout,
                attempts,
            },
            Transient::Failed(source) => RemoteError::Unreachable {
                url,
                offset,
                end,
                attempts,
                source,
            },
            Transient::Short(got) => RemoteError::ShortBody {
                url,
                offset,
                end,
                got,
            },
        })
    }
}

/// Pins the object: its size and identity, retried like a read.
pub(crate) async fn head(
    store: &Arc<dyn ObjectStore>,
    path: &Path,
    url: &str,
    opts: &RemoteOptions,
) -> Result<ObjectMeta, RemoteError> {
    let mut retry = Retry::new(url, 0..0, opts);
    loop {
        let failure = match tokio::time::timeout(opts.timeout, store.head(path)).await {
            Ok(Ok(meta)) => return Ok(meta),
            Ok(Err(e)) => classify(url, e, false),
            Err(_) => Failure::Transient(Transient::TimedOut),
        };
        match failure {
            Failure::Fatal(e) => return Err(e),
            Failure::Transient(t) => tokio::time::sleep(retry.after(t)?).await,
        }
    }
}

/// Starts a GET of `range` of the pinned object (one attempt, no timeout: the caller
/// bounds it) and returns its body. The store checks the pinned ETag (`If-Match`) or
/// version; the answer's own identity is checked again here, for servers that ignore
/// `If-Match`.
pub(crate) async fn get(
    obj: &Object,
    range: Range<u64>,
) -> Result<BoxStream<'static, object_store::Result<Bytes>>, Failure> {
    let options = GetOptions {
        if_match: obj.meta.e_tag.clone(),
        version: obj.meta.version.clone(),
        range: Some(GetRange::Bounded(range)),
        ..GetOptions::default()
    };
    let got = obj
        .store
        .get_opts(&obj.path, options)
        .await
        .map_err(|e| classify(&obj.url, e, true))?;
    let pinned = &obj.meta;
    let changed = match (&pinned.e_tag, &got.meta.e_tag) {
        (Some(a), Some(b)) if a != b => Some(format!("ETag {a} at open, {b} now")),
        (Some(_), _) => None,
        // Without an ETag the modification time is all there is to tell objects apart.
        (None, _) if got.meta.last_modified != pinned.last_modified => Some(format!(
            "modified {} at open, {} now",
            pinned.last_modified, got.meta.last_modified
        )),
        (None, _) => None,
    };
    if let Some(detail) = changed {
        return Err(Failure::Fatal(RemoteError::Changed {
            url: obj.url.clone(),
            detail,
        }));
    }
    Ok(got.into_stream())
}
