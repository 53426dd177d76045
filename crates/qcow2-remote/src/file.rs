//! [`RemoteFile`]: a read-only [`BlockFile`] over one object, read in aligned blocks.
//!
//! A read is served from the block cache where it can; the blocks it lacks are fetched in
//! runs, one range GET per run of neighbouring missing blocks (split at
//! `max_request`), including those that concurrent reads of the same task queued (see
//! `Inner::dispatch`). Every block being fetched is registered as in flight, so a concurrent
//! reader of the same block waits for that request instead of sending its own, and the
//! fetch runs as a task of its own: a reader that gives up (a dropped future) does not
//! cancel what others wait for. Blocks are handed out as the body streams in, so the
//! first reader of a long run waits only for its own blocks.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::future::{FutureExt, Shared};
use futures::StreamExt;
use object_store::path::Path;
use object_store::ObjectStore;
use qcow2_async::io::{holes_past_end, BlockFile, IoBuf, IoFuture};
use tokio::sync::oneshot;
use tracing::Instrument;

use crate::block::{Block, BlockPool, SharedBlock, OWN_MAPPING};
use crate::cache::BlockCache;
use crate::cache_file::CacheFile;
use crate::error::RemoteError;
use crate::fetch::{self, Failure, Object, Retry, Transient};
use crate::options::RemoteOptions;
use crate::readahead::Sequential;

type BlockResult = Result<SharedBlock, RemoteError>;
/// A block in flight: every reader waiting for it holds a clone.
type Pending = Shared<oneshot::Receiver<BlockResult>>;

/// A read-only file over an object in an object store (S3, GCS, Azure, HTTP, memory).
///
/// The object's size and identity (ETag, version) are pinned when the file is opened;
/// every request asks the store for that same object, and a replaced or deleted object
/// fails reads with [`RemoteError::Changed`] instead of mixing two objects' bytes. Writes,
/// truncation and allocation fail with [`RemoteError::ReadOnly`].
#[derive(Debug, Clone)]
pub struct RemoteFile {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    obj: Object,
    opts: RemoteOptions,
    /// Memory of the blocks (cached, in flight, being read).
    pool: Arc<BlockPool>,
    /// The local cache file, if configured and usable: read before the store, written
    /// after it.
    cache_file: Option<Arc<CacheFile>>,
    /// Bytes of fetched blocks waiting to be written to the cache file (bounded by
    /// [`MAX_PENDING_LOCAL`], so a slow local disk cannot hold blocks past the cache bound).
    pending_local: Arc<AtomicU64>,
    state: Mutex<State>,
    requests: AtomicU64,
    bytes_fetched: AtomicU64,
    block_hits: AtomicU64,
    file_hits: AtomicU64,
}

/// Held only for bookkeeping, never across an await.
#[derive(Debug)]
struct State {
    cache: BlockCache,
    in_flight: HashMap<u64, Pending>,
    /// Blocks in flight whose request is not sent yet, for `Inner::dispatch`.
    queued: BTreeMap<u64, oneshot::Sender<BlockResult>>,
    /// A dispatch task is scheduled.
    dispatching: bool,
    sequential: Sequential,
}

/// Counters of a [`RemoteFile`], for tests and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RemoteStats {
    /// Range GETs sent (retries included).
    pub requests: u64,
    /// Bytes received in their bodies.
    pub bytes_fetched: u64,
    /// Blocks served from the cache.
    pub block_hits: u64,
    /// Bytes the cache holds now.
    pub cached_bytes: u64,
    /// Blocks read from the local cache file (not from the store).
    pub file_hits: u64,
    /// Blocks the local cache file holds now (0 without one).
    pub file_blocks: u64,
}

/// Where a block of a read comes from.
enum Source {
    Cached(SharedBlock),
    Wait(Pending),
}

/// How far a run got: the next block to hand out and the senders from there on.
struct Progress {
    next: u64,
    senders: std::vec::IntoIter<oneshot::Sender<BlockResult>>,
    /// Blocks fetched so far, for the cache file (empty without one).
    fetched: Vec<(u64, SharedBlock)>,
}

/// Missing blocks to read with one request: the first block and one sender per block.
struct Run {
    first: u64,
    senders: Vec<oneshot::Sender<BlockResult>>,
    /// From the local cache file rather than the store.
    local: bool,
}

impl RemoteFile {
    /// Opens the object at `path` of `store`, pinning its size and identity with a HEAD
    /// request; `url` names it in errors and logs.
    #[tracing::instrument(skip(store, opts), fields(size))]
    pub async fn open(
        store: Arc<dyn ObjectStore>,
        path: Path,
        url: &str,
        opts: RemoteOptions,
    ) -> Result<RemoteFile, RemoteError> {
        if let Some(reason) = opts.invalid() {
            return Err(RemoteError::InvalidUrl {
                url: url.to_string(),
                reason: format!("options: {reason}"),
            });
        }
        let meta = fetch::head(&store, &path, url, &opts).await?;
        tracing::Span::current().record("size", meta.size);
        let cache_file = match &opts.cache_file {
            None => None,
            Some(p) => {
                let (p, bs, size) = (p.clone(), opts.block_size, meta.size);
                let identity = format!(
                    "{url}\n{size}\n{:?}\n{:?}\n{}",
                    meta.e_tag, meta.version, meta.last_modified
                );
                tokio::task::spawn_blocking(move || CacheFile::shared(&p, &identity, bs, size))
                    .await
                    .map_err(|_| RemoteError::Abandoned {
                        url: url.to_string(),
                    })?
            }
        };
        Ok(RemoteFile {
            inner: Arc::new(Inner {
                obj: Object {
                    store,
                    path,
                    url: url.to_string(),
                    meta,
                },
                pending_local: Arc::default(),
                state: Mutex::new(State {
                    cache: BlockCache::new(opts.cache_bytes),
                    in_flight: HashMap::new(),
                    queued: BTreeMap::new(),
                    dispatching: false,
                    sequential: Sequential::default(),
                }),
                pool: pool_for(&opts),
                cache_file,
                opts,
                requests: AtomicU64::new(0),
                bytes_fetched: AtomicU64::new(0),
                block_hits: AtomicU64::new(0),
                file_hits: AtomicU64::new(0),
            }),
        })
    }

    /// The URL the file was opened with.
    pub fn url(&self) -> &str {
        &self.inner.obj.url
    }

    /// The object's size, as pinned at open.
    pub fn size(&self) -> u64 {
        self.inner.obj.meta.size
    }

    /// The object's ETag, as pinned at open (`None` if the store has none).
    pub fn e_tag(&self) -> Option<&str> {
        self.inner.obj.meta.e_tag.as_deref()
    }

    /// Requests, bytes and cache hits so far.
    pub fn stats(&self) -> RemoteStats {
        let i = &self.inner;
        RemoteStats {
            requests: i.requests.load(Ordering::Relaxed),
            bytes_fetched: i.bytes_fetched.load(Ordering::Relaxed),
            block_hits: i.block_hits.load(Ordering::Relaxed),
            cached_bytes: i.lock().cache.used(),
            file_hits: i.file_hits.load(Ordering::Relaxed),
            file_blocks: i.cache_file.as_ref().map_or(0, |c| c.blocks()),
        }
    }

    /// Fills `buf` from `offset`; past the end of the object with zeros.
    async fn read_into(&self, buf: &mut [u8], offset: u64) -> Result<(), RemoteError> {
        let size = self.size();
        let bs = self.inner.opts.block_size;
        let end = offset.saturating_add(buf.len() as u64).min(size);
        if offset >= end {
            buf.fill(0);
            return Ok(());
        }
        buf[(end - offset) as usize..].fill(0);
        let (first, last) = (offset / bs, (end - 1) / bs);
        let sources = self.plan(first, last);
        for (block, source) in (first..=last).zip(sources) {
            let bytes = match source {
                Source::Cached(b) => b,
                Source::Wait(p) => p.await.map_err(|_| RemoteError::Abandoned {
                    url: self.url().to_string(),
                })??,
            };
            // The part of this block that the read covers.
            let block_start = block * bs;
            let from = offset.max(block_start);
            let to = end.min(block_start + bytes.len() as u64);
            let dst = (from - offset) as usize..(to - offset) as usize;
            bytes.copy_to((from - block_start) as usize, &mut buf[dst]);
        }
        Ok(())
    }

    /// Finds each block of `[first, last]` in the cache or in flight, queues requests for
    /// the others and for read-ahead, and says where each block will come from.
    fn plan(&self, first: u64, last: u64) -> Vec<Source> {
        let opts = &self.inner.opts;
        let bs = opts.block_size;
        let total = self.size().div_ceil(bs);
        let mut sources = Vec::with_capacity((last - first + 1) as usize);
        let mut st = self.inner.lock();
        let mut hits = 0;
        for block in first..=last {
            sources.push(if let Some(b) = st.cache.get(block) {
                hits += 1;
                Source::Cached(b)
            } else if let Some(p) = st.in_flight.get(&block) {
                Source::Wait(p.clone())
            } else {
                Source::Wait(st.queue(block))
            });
        }
        let window = opts.read_ahead / bs;
        let min_stream = opts.max_request / bs;
        if let Some(ahead) = st
            .sequential
            .observe(first, last + 1, window, min_stream, total)
        {
            for block in ahead {
                if !st.cache.contains(block) && !st.in_flight.contains_key(&block) {
                    // Nobody waits yet: the receiver stays in the in-flight table only.
                    drop(st.queue(block));
                }
            }
        }
        let dispatch = !st.queued.is_empty() && !std::mem::replace(&mut st.dispatching, true);
        drop(st);
        self.inner.block_hits.fetch_add(hits, Ordering::Relaxed);
        if dispatch {
            tokio::spawn(self.inner.clone().dispatch());
        }
        sources
    }
}

impl State {
    /// Registers `block` as in flight and queues its request.
    fn queue(&mut self, block: u64) -> Pending {
        let (tx, rx) = oneshot::channel();
        let pending = rx.shared();
        self.in_flight.insert(block, pending.clone());
        self.queued.insert(block, tx);
        pending
    }
}

impl Inner {
    /// Sends the queued requests, neighbouring blocks together (up to `max_request`).
    ///
    /// Requests are not sent by the reader that queues them but by this task, which runs
    /// once that reader's task yields: the engine reads the clusters of one large request
    /// concurrently within one task, and so all of them are queued by then and travel in
    /// one GET instead of one per cluster.
    async fn dispatch(self: Arc<Self>) {
        // If another worker took this task at once, the reader may still be queueing.
        tokio::task::yield_now().await;
        let max_run = (self.opts.max_request / self.opts.block_size) as usize;
        let runs = {
            let mut st = self.lock();
            st.dispatching = false;
            let mut runs: Vec<Run> = Vec::new();
            for (block, tx) in std::mem::take(&mut st.queued) {
                let local = self.cache_file.as_ref().is_some_and(|c| c.has(block));
                match runs.last_mut() {
                    Some(r)
                        if r.first + r.senders.len() as u64 == block
                            && r.senders.len() < max_run
                            && r.local == local =>
                    {
                        r.senders.push(tx)
                    }
                    _ => runs.push(Run {
                        first: block,
                        senders: vec![tx],
                        local,
                    }),
                }
            }
            // A run right behind a block still being fetched (or loaded from the cache file)
            // waits for that to end (it dispatches again): the engine reads a large request a few clusters at a
            // time, starting the next as each completes, and without this every later
            // cluster would be a request of its own. Decided under the lock that
            // `fetch_run`'s end takes too, so no run is left waiting for a fetch that ended.
            let (held, send): (Vec<Run>, Vec<Run>) = runs.into_iter().partition(|r| {
                !r.local && r.first > 0 && st.in_flight.contains_key(&(r.first - 1))
            });
            for run in held {
                for (i, tx) in run.senders.into_iter().enumerate() {
                    st.queued.insert(run.first + i as u64, tx);
                }
            }
            send
        };
        for run in runs {
            if run.local {
                tokio::spawn(self.clone().load_run(run));
                continue;
            }
            let span = tracing::debug_span!(
                "remote_get",
                url = %self.obj.url,
                first_block = run.first,
                blocks = run.senders.len()
            );
            tokio::spawn(self.clone().fetch_run(run).instrument(span));
        }
    }

    // A panic while holding the lock leaves plain bookkeeping behind, still consistent
    // enough to use: the worst case is a block fetched twice.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads a run of blocks from the local cache file. Should that fail, the run is
    /// fetched from the store instead (and written to the file again).
    async fn load_run(self: Arc<Self>, mut run: Run) {
        let Some(file) = self.cache_file.clone() else {
            run.local = false;
            return self.fetch_run(run).await;
        };
        let bs = self.opts.block_size;
        let size = self.obj.meta.size;
        let lens: Vec<usize> = (run.first..run.first + run.senders.len() as u64)
            .map(|b| (size - b * bs).min(bs) as usize)
            .collect();
        let pool = self.pool.clone();
        let first = run.first;
        let read =
            tokio::task::spawn_blocking(move || file.read_run(first, &lens, || pool.take())).await;
        match read {
            Ok(Ok(blocks)) => {
                self.file_hits
                    .fetch_add(blocks.len() as u64, Ordering::Relaxed);
                for (i, (block, tx)) in blocks.into_iter().zip(run.senders).enumerate() {
                    self.deliver(run.first + i as u64, Ok(Arc::new(block)), Some(tx));
                }
            }
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "the read was abandoned".to_string(),
                };
                tracing::warn!(url = %self.obj.url, error = %why, "cache file read failed; fetching");
                run.local = false;
                return self.fetch_run(run).await;
            }
        }
        // Runs held behind these blocks (see `dispatch`) go now.
        self.dispatch_held();
    }

    /// Fetches a run of blocks, handing each to its waiters (and the cache) as soon as it
    /// is complete. A failed attempt resumes from the first block not yet handed out.
    async fn fetch_run(self: Arc<Self>, run: Run) {
        let bs = self.opts.block_size;
        let end = ((run.first + run.senders.len() as u64) * bs).min(self.obj.meta.size);
        let mut at = Progress {
            next: run.first,
            senders: run.senders.into_iter(),
            fetched: Vec::new(),
        };
        let mut retry = Retry::new(&self.obj.url, run.first * bs..end, &self.opts);
        let failure = loop {
            match self.attempt(end, &mut at, &mut retry).await {
                Ok(()) => break None,
                Err(Failure::Fatal(e)) => break Some(e),
                Err(Failure::Transient(t)) => match retry.after(t) {
                    Ok(wait) => tokio::time::sleep(wait).await,
                    Err(e) => break Some(e),
                },
            }
        };
        self.keep_locally(std::mem::take(&mut at.fetched));
        if let Some(failure) = failure {
            tracing::warn!(url = %self.obj.url, error = %failure, "remote read failed");
            for tx in at.senders {
                self.deliver(at.next, Err(failure.clone()), Some(tx));
                at.next += 1;
            }
        }
        self.dispatch_held();
    }

    /// Writes fetched blocks to the local cache file, in the background. A failed write
    /// only costs a later fetch.
    fn keep_locally(&self, fetched: Vec<(u64, SharedBlock)>) {
        let Some(file) = self.cache_file.clone() else {
            return;
        };
        let bytes: u64 = fetched.iter().map(|(_, b)| b.len() as u64).sum();
        if bytes == 0 {
            return;
        }
        let pending = self.pending_local.fetch_add(bytes, Ordering::AcqRel);
        if pending + bytes > MAX_PENDING_LOCAL {
            // The disk is behind: these blocks are not kept (a later open fetches them).
            self.pending_local.fetch_sub(bytes, Ordering::AcqRel);
            tracing::debug!(path = %file.path().display(), bytes, "cache file behind; not kept");
            return;
        }
        let pending_local = self.pending_local.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = file.write(&fetched) {
                tracing::warn!(path = %file.path().display(), error = %e, "cache file write failed");
            }
            drop(fetched);
            pending_local.fetch_sub(bytes, Ordering::AcqRel);
        });
    }

    /// After a fetch ended: sends what waited for it (see `dispatch`).
    fn dispatch_held(self: &Arc<Self>) {
        let mut st = self.lock();
        if !st.queued.is_empty() && !std::mem::replace(&mut st.dispatching, true) {
            drop(st);
            tokio::spawn(self.clone().dispatch());
        }
    }

    /// One GET of the run's blocks from `at.next` to `end`, each handed out as its last
    /// byte arrives. Every wait is bounded by the timeout.
    async fn attempt(
        &self,
        end: u64,
        at: &mut Progress,
        retry: &mut Retry<'_>,
    ) -> Result<(), Failure> {
        let bs = self.opts.block_size;
        let timeout = self.opts.timeout;
        let from = at.next * bs;
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut body = tokio::time::timeout(timeout, fetch::get(&self.obj, from..end))
            .await
            .map_err(|_| Failure::Transient(Transient::TimedOut))??;
        let mut block: Option<Block> = None;
        loop {
            let chunk = match tokio::time::timeout(timeout, body.next()).await {
                Err(_) => return Err(Failure::Transient(Transient::TimedOut)),
                Ok(None) => {
                    let partial = block.as_ref().map_or(0, Block::len);
                    let got = at.next * bs - from + partial as u64;
                    return Err(Failure::Transient(Transient::Short(got)));
                }
                Ok(Some(Err(e))) => return Err(fetch::classify(&self.obj.url, e, true)),
                Ok(Some(Ok(chunk))) => chunk,
            };
            self.bytes_fetched
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            let mut rest = &chunk[..];
            while !rest.is_empty() {
                let want = bs.min(end - at.next * bs) as usize;
                let filling = block.get_or_insert_with(|| self.pool.take());
                let take = (want - filling.len()).min(rest.len());
                filling.push(&rest[..take]);
                rest = &rest[take..];
                if filling.len() < want {
                    break;
                }
                let done = Arc::new(block.take().expect("a block was being filled"));
                if self.cache_file.is_some() {
                    at.fetched.push((at.next, done.clone()));
                }
                self.deliver(at.next, Ok(done), at.senders.next());
                at.next += 1;
                retry.progress();
                if at.next * bs >= end {
                    return Ok(());
                }
            }
        }
    }

    fn deliver(&self, block: u64, result: BlockResult, tx: Option<oneshot::Sender<BlockResult>>) {
        {
            let mut st = self.lock();
            st.in_flight.remove(&block);
            if let Ok(bytes) = &result {
                st.cache.insert(block, bytes.clone());
            }
        }
        if let Some(tx) = tx {
            // Nobody left waiting (read-ahead, or readers that gave up) is fine.
            let _ = tx.send(result);
        }
    }

    fn read_only(&self, op: &'static str) -> std::io::Error {
        RemoteError::ReadOnly {
            url: self.obj.url.clone(),
            op,
        }
        .into()
    }
}

/// Most bytes of fetched blocks waiting for their write to the local cache file.
const MAX_PENDING_LOCAL: u64 = 64 << 20;

/// The pool of block memory: for a cache of 256 MiB or more, 64 MiB chunks backed by
/// huge pages (a growing cache then faults once per 2 MiB, not per 4 KiB); for a smaller
/// one, chunks of an eighth of it (at least 2 MiB) without the advice (see
/// [`BlockPool::new`]).
fn pool_for(opts: &RemoteOptions) -> Arc<BlockPool> {
    let bs = opts.block_size as usize;
    if opts.cache_bytes >= 256 << 20 {
        return BlockPool::new(bs, 2 * OWN_MAPPING, true);
    }
    let eighth = usize::try_from(opts.cache_bytes / 8).unwrap_or(usize::MAX);
    BlockPool::new(bs, eighth.clamp(2 << 20, OWN_MAPPING), false)
}

impl BlockFile for RemoteFile {
    fn read_at(&self, mut buf: IoBuf, offset: u64) -> IoFuture<'_, IoBuf> {
        Box::pin(async move {
            if offset.checked_add(buf.len() as u64).is_none() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("range {offset}+{} overflows", buf.len()),
                ));
            }
            self.read_into(&mut buf, offset).await?;
            Ok(buf)
        })
    }

    fn write_at(&self, _buf: IoBuf, _offset: u64) -> IoFuture<'_, IoBuf> {
        Box::pin(async move { Err(self.inner.read_only("write")) })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move { Err(self.inner.read_only("flush")) })
    }

    fn len(&self) -> IoFuture<'_, u64> {
        Box::pin(async move { Ok(self.size()) })
    }

    fn set_len(&self, _len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move { Err(self.inner.read_only("truncate")) })
    }

    fn allocate(&self, _offset: u64, _len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move { Err(self.inner.read_only("allocate")) })
    }

    fn punch_hole(&self, _offset: u64, _len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move { Err(self.inner.read_only("punch hole")) })
    }

    fn zero_range(&self, _offset: u64, _len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move { Err(self.inner.read_only("zero range")) })
    }

    fn holes(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<(u64, u64)>> {
        // An object stores every byte below its size.
        Box::pin(async move { Ok(holes_past_end(self.size(), offset, len)) })
    }

    fn allocated_bytes(&self) -> IoFuture<'_, u64> {
        self.len()
    }

    fn alignment(&self) -> usize {
        1
    }
}
