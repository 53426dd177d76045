//! The remote file against `object_store`'s in-memory store: contents, requests counted
//! through a wrapper (cached reads cost none, neighbours and concurrent readers share
//! one), read-ahead, the cache bound, and the typed errors (replaced object, dead store,
//! stalled store, writes).

mod support;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::path::Path;
use object_store::ObjectStore;
use qcow2_async::io::{BlockFile, IoBuf};
use qcow2_remote::{RemoteError, RemoteFile, RemoteOptions};
use support::{pattern, Counting};

const BLOCK: u64 = 64 << 10;

fn opts() -> RemoteOptions {
    let mut o = RemoteOptions::default();
    o.block_size = BLOCK;
    o.max_request = 4 * BLOCK;
    o.read_ahead = 8 * BLOCK;
    o.retries = 2;
    o.backoff = Duration::from_millis(10);
    o.timeout = Duration::from_millis(300);
    o
}

async fn setup(len: usize, o: RemoteOptions) -> (Arc<Counting>, RemoteFile, Vec<u8>) {
    let store = Counting::new();
    let data = pattern(len, 7);
    store.put_bytes("img/base.raw", data.clone()).await;
    let file = reopen(&store, &o).await;
    (store, file, data)
}

async fn read(f: &RemoteFile, off: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let read = f.read_at(IoBuf::zeroed(len, 1), off);
    match tokio::time::timeout(Duration::from_secs(20), read).await {
        Ok(r) => Ok(r?.to_vec()),
        Err(_) => panic!("a read of {off}+{len} hangs: {:?}", f.stats()),
    }
}

fn remote_error(e: &std::io::Error) -> &RemoteError {
    RemoteError::from_io(e).unwrap_or_else(|| panic!("not a RemoteError: {e:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_match_the_object_and_zero_fill_past_its_end() {
    let len = 5 * BLOCK as usize + 1234;
    let (_, f, data) = setup(len, opts()).await;
    assert_eq!(f.len().await.unwrap(), len as u64);
    let mut seed = 12345u64;
    for _ in 0..200 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let off = (seed >> 33) % (len as u64 + 1000);
        let n = ((seed >> 11) % (3 * BLOCK)) as usize;
        let got = read(&f, off, n).await.unwrap();
        for (i, b) in got.iter().enumerate() {
            let at = off as usize + i;
            let want = data.get(at).copied().unwrap_or(0);
            assert_eq!(*b, want, "byte {at} of a read at {off}+{n}");
        }
    }
    // Far past the end: zeros, no request.
    assert!(read(&f, 1 << 40, 100)
        .await
        .unwrap()
        .iter()
        .all(|&b| b == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_reads_cost_no_request_and_neighbours_share_one() {
    let mut o = opts();
    o.read_ahead = 0;
    let (store, f, data) = setup(16 * BLOCK as usize, o).await;
    // Three neighbouring missing blocks: one GET.
    let got = read(&f, BLOCK + 100, 2 * BLOCK as usize).await.unwrap();
    assert_eq!(got, data[BLOCK as usize + 100..3 * BLOCK as usize + 100]);
    assert_eq!(store.gets(), 1);
    // Everything inside them again, in pieces: no request at all.
    for off in (BLOCK..4 * BLOCK).step_by(4096) {
        read(&f, off, 4096).await.unwrap();
    }
    assert_eq!(store.gets(), 1, "cached reads went to the store");
    assert_eq!(f.stats().requests, 1);
    assert!(f.stats().block_hits >= 48);
    // A run longer than max_request (4 blocks) is split: 8 blocks, 2 GETs.
    read(&f, 8 * BLOCK, 8 * BLOCK as usize).await.unwrap();
    assert_eq!(store.gets(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_readers_of_a_block_share_one_request() {
    let mut o = opts();
    o.read_ahead = 0;
    let (store, f, data) = setup(4 * BLOCK as usize, o).await;
    store.delay_ms.store(100, Ordering::SeqCst);
    let readers: Vec<_> = (0..16u64)
        .map(|i| {
            let f = f.clone();
            tokio::spawn(async move { read(&f, BLOCK + i * 4096, 4096).await.unwrap() })
        })
        .collect();
    for (i, r) in readers.into_iter().enumerate() {
        let off = BLOCK as usize + i * 4096;
        assert_eq!(r.await.unwrap(), data[off..off + 4096]);
    }
    assert_eq!(store.gets(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn neighbouring_reads_of_one_task_share_a_request() {
    // As the engine reads the clusters of one large request: concurrently, in one task.
    let mut o = opts();
    o.read_ahead = 0;
    let (store, f, data) = setup(16 * BLOCK as usize, o).await;
    let reader = f.clone();
    let got = tokio::spawn(async move {
        let reads = (0..8u64).map(|b| read(&reader, (4 + b) * BLOCK, BLOCK as usize));
        futures::future::join_all(reads).await
    })
    .await
    .unwrap();
    for (b, r) in got.into_iter().enumerate() {
        let off = (4 + b) * BLOCK as usize;
        assert!(r.unwrap() == data[off..off + BLOCK as usize]);
    }
    // 8 blocks, requests of at most 4.
    assert_eq!(store.gets(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequential_reader_is_read_ahead_in_large_requests() {
    let (store, f, data) = setup(64 * BLOCK as usize, opts()).await;
    let mut got = Vec::new();
    for off in (0..32 * BLOCK).step_by(16 << 10) {
        got.extend(read(&f, off, 16 << 10).await.unwrap());
    }
    assert_eq!(got, data[..32 * BLOCK as usize]);
    // 32 blocks without read-ahead would be 32 GETs; ahead (from the fourth block on, the
    // shortest stream that counts), in requests of up to 4 blocks, about a third of that.
    let gets = store.gets();
    assert!(gets <= 14, "{gets} GETs for 32 blocks read in order");
    // Random reads get no read-ahead: one GET each (counted once the read-ahead of the
    // sequential reads, sent by a task of its own, has all been sent).
    let mut before = store.gets();
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = store.gets();
        if now == before {
            break;
        }
        before = now;
    }
    for b in [60u64, 45, 55, 50] {
        read(&f, b * BLOCK, 4096).await.unwrap();
    }
    assert_eq!(store.gets() - before, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_stays_within_its_bound() {
    let mut o = opts();
    o.cache_bytes = 4 * BLOCK;
    o.read_ahead = 0;
    let (store, f, _) = setup(32 * BLOCK as usize, o).await;
    for b in 0..20 {
        read(&f, b * BLOCK, 100).await.unwrap();
        assert!(f.stats().cached_bytes <= 4 * BLOCK);
    }
    // The last four are cached, the first is not any more.
    let gets = store.gets();
    read(&f, 19 * BLOCK, 100).await.unwrap();
    read(&f, 16 * BLOCK, 100).await.unwrap();
    assert_eq!(store.gets(), gets);
    read(&f, 0, 100).await.unwrap();
    assert_eq!(store.gets(), gets + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_or_deleted_object_fails_reads_as_changed() {
    let mut o = opts();
    o.read_ahead = 0;
    let (store, f, data) = setup(8 * BLOCK as usize, o).await;
    assert_eq!(read(&f, 0, 10).await.unwrap(), data[..10]);
    store
        .put_bytes("img/base.raw", pattern(8 * BLOCK as usize, 9))
        .await;
    // Cached: still the old object's bytes (consistent with what was read before).
    assert_eq!(read(&f, 0, 10).await.unwrap(), data[..10]);
    let e = read(&f, 4 * BLOCK, 10).await.unwrap_err();
    assert!(
        matches!(remote_error(&e), RemoteError::Changed { .. }),
        "{e}"
    );
    store
        .inner
        .delete(&Path::from("img/base.raw"))
        .await
        .unwrap();
    let e = read(&f, 6 * BLOCK, 10).await.unwrap_err();
    assert!(
        matches!(remote_error(&e), RemoteError::Changed { .. }),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_store_is_a_typed_error_after_the_retries() {
    let (store, f, _) = setup(8 * BLOCK as usize, opts()).await;
    store.fail.store(true, Ordering::SeqCst);
    let t = Instant::now();
    let e = read(&f, 0, 10).await.unwrap_err();
    match remote_error(&e) {
        RemoteError::Unreachable { attempts, .. } => assert_eq!(*attempts, 3),
        other => panic!("{other}"),
    }
    assert!(t.elapsed() < Duration::from_secs(5));
    // Nothing is left in flight: the store comes back, the read works.
    store.fail.store(false, Ordering::SeqCst);
    read(&f, 0, 10).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_never_answers_times_out() {
    let (store, f, _) = setup(8 * BLOCK as usize, opts()).await;
    store.hang.store(true, Ordering::SeqCst);
    let t = Instant::now();
    let e = read(&f, 0, 10).await.unwrap_err();
    assert!(
        matches!(remote_error(&e), RemoteError::Timeout { .. }),
        "{e}"
    );
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
    // 3 attempts of 300 ms and 10 + 20 ms of backoff.
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_a_missing_object_and_writing_are_refused() {
    let store = Counting::new();
    let e = RemoteFile::open(
        store.clone() as Arc<dyn ObjectStore>,
        Path::from("nope"),
        "mem://nope",
        opts(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, RemoteError::NotFound { .. }), "{e}");
    let (_, f, _) = setup(BLOCK as usize, opts()).await;
    let e = f.write_at(IoBuf::zeroed(1, 1), 0).await.unwrap_err();
    assert!(matches!(remote_error(&e), RemoteError::ReadOnly { .. }));
    assert!(f.set_len(0).await.is_err());
    assert!(f.flush().await.is_err());
    assert!(f.punch_hole(0, 1).await.is_err());
    assert_eq!(
        f.holes(0, 2 * BLOCK).await.unwrap(),
        vec![(BLOCK, 2 * BLOCK)]
    );
}

/// Opens `img/base.raw` of `store` with `o`.
async fn reopen(store: &Arc<Counting>, o: &RemoteOptions) -> RemoteFile {
    RemoteFile::open(
        store.clone() as Arc<dyn ObjectStore>,
        Path::from("img/base.raw"),
        "mem://img/base.raw",
        o.clone(),
    )
    .await
    .unwrap()
}

async fn wait_for_file_blocks(f: &RemoteFile, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while f.stats().file_blocks < n {
        assert!(Instant::now() < deadline, "{:?}", f.stats());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_file_serves_later_opens_without_requests_until_the_object_changes() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts();
    o.read_ahead = 0;
    o.cache_bytes = 0; // every read past the first goes to the file or the store
    o.cache_file = Some(dir.path().join("base.cache"));
    let len = 6 * BLOCK as usize + 777; // a short last block
    let (store, f, data) = setup(len, o.clone()).await;
    let ranges = [
        (0, 10),
        (BLOCK - 5, 20),
        (3 * BLOCK, 2 * BLOCK as usize),
        (6 * BLOCK, 777),
    ];
    for &(off, n) in &ranges {
        assert_eq!(read(&f, off, n).await.unwrap(), data[off as usize..][..n]);
    }
    wait_for_file_blocks(&f, 5).await; // blocks 0, 1, 3, 4 and 6
    let gets = store.gets();
    drop(f);

    // A new open of the same object: the file answers, the store is not asked.
    let f = reopen(&store, &o).await;
    assert_eq!(f.stats().file_blocks, 5);
    for _ in 0..2 {
        for &(off, n) in &ranges {
            assert_eq!(read(&f, off, n).await.unwrap(), data[off as usize..][..n]);
        }
    }
    assert_eq!(store.gets(), gets, "{:?}", f.stats());
    assert!(f.stats().file_hits >= 12, "{:?}", f.stats());
    // A block the file lacks is fetched, and kept too.
    assert_eq!(
        read(&f, 2 * BLOCK, 10).await.unwrap(),
        data[2 * BLOCK as usize..][..10]
    );
    assert_eq!(store.gets(), gets + 1);
    wait_for_file_blocks(&f, 6).await;
    drop(f);

    // The object is replaced: the file's blocks belong to the old one and are not used.
    let new = pattern(len, 99);
    store.put_bytes("img/base.raw", new.clone()).await;
    let f = reopen(&store, &o).await;
    assert_eq!(f.stats().file_blocks, 0);
    for &(off, n) in &ranges {
        assert_eq!(read(&f, off, n).await.unwrap(), new[off as usize..][..n]);
    }
    // Blocks 0, 1, 3-4 and 6 came from the store (block 0 again only if its write to the
    // file had not finished when the second read wanted it).
    assert!(store.gets() >= gets + 1 + 4, "{:?}", f.stats());
}
