//! Locks whose readers on different threads touch different cache lines.
//!
//! Every guest request takes the image's "instant" lock shared, and every cached lookup reads
//! the published mapping index. One lock word for all of them is written by every request
//! (a reader count, and in Tokio's lock a waiter-list mutex on release), so on two or more
//! cores that cache line moves between them on every request: measured, the request rate
//! on two workers stayed far below twice that of one. Here each thread reads its own shard
//! (or replica), padded to its own cache line; writers, which are rare (snapshots, bitmap
//! management, an L2 table entering or leaving the cache), take every shard in order.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::RwLock;

/// Shards per lock: enough that the threads of a machine of a few dozen cores rarely share.
pub(crate) const SHARDS: usize = 16;

/// The shard of the calling thread: threads are numbered on first use, round robin.
pub(crate) fn my_shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|s| *s)
}

/// A value on a cache line of its own (two lines: adjacent-line prefetch pairs them).
#[repr(align(128))]
#[derive(Debug, Default)]
struct Padded<T>(T);

/// An async reader-writer lock with a shard per thread: `read` takes the calling thread's
/// shard, `write` takes all of them in ascending order, so a writer excludes every reader and
/// two writers serialise on shard 0. Fair like Tokio's lock: a waiting writer holds back new
/// readers of the shards it has reached. A reader must not take a second read guard while it
/// holds one (it may land on another shard behind a waiting writer), as with any fair lock.
#[derive(Debug)]
pub(crate) struct ShardedRwLock {
    shards: Box<[Padded<tokio::sync::RwLock<()>>]>,
}

/// Shared access; releases its shard when dropped.
pub(crate) type ReadGuard<'a> = tokio::sync::RwLockReadGuard<'a, ()>;

/// Exclusive access: every shard, released when dropped.
#[must_use = "the lock is released when the guard is dropped"]
pub(crate) struct WriteGuard<'a> {
    _shards: Vec<tokio::sync::RwLockWriteGuard<'a, ()>>,
}

impl ShardedRwLock {
    pub(crate) fn new() -> ShardedRwLock {
        ShardedRwLock {
            shards: (0..SHARDS).map(|_| Padded::default()).collect(),
        }
    }

    pub(crate) async fn read(&self) -> ReadGuard<'_> {
        self.shards[my_shard()].0.read().await
    }

    pub(crate) async fn write(&self) -> WriteGuard<'_> {
        let mut guards = Vec::with_capacity(self.shards.len());
        for shard in self.shards.iter() {
            guards.push(shard.0.write().await);
        }
        WriteGuard { _shards: guards }
    }
}

/// A value that is read on every request and changed rarely, kept as one replica per shard:
/// a reader locks its thread's replica only, an update applies the same change to every
/// replica in turn. Between two replicas' updates a reader on another thread may still see
/// the old value; users update only what no concurrent reader depends on (for the mapping
/// index: a table is published before any lookup needs it, and withdrawn only when no lease
/// holder can be using it).
#[derive(Debug)]
pub(crate) struct ReadMostly<T> {
    replicas: Box<[Padded<RwLock<T>>]>,
}

impl<T: Clone> ReadMostly<T> {
    pub(crate) fn new(value: T) -> ReadMostly<T> {
        ReadMostly {
            replicas: (0..SHARDS)
                .map(|_| Padded(RwLock::new(value.clone())))
                .collect(),
        }
    }

    /// Runs `f` on the calling thread's replica.
    pub(crate) fn read<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        let replica = self.replicas[my_shard()]
            .0
            .read()
            .unwrap_or_else(|p| p.into_inner());
        f(replica.deref())
    }

    /// Applies `f` to every replica, one after the other; `f` must make the same change to
    /// each. Returns what it returned for the last one.
    pub(crate) fn update<R>(&self, mut f: impl FnMut(&mut T) -> R) -> R {
        let mut last = None;
        for replica in self.replicas.iter() {
            let mut guard = replica.0.write().unwrap_or_else(|p| p.into_inner());
            last = Some(f(guard.deref_mut()));
        }
        last.expect("there is at least one replica")
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn replicas_agree_after_every_update() {
        let v = Arc::new(ReadMostly::new(Vec::<u32>::new()));
        v.update(|x| x.push(1));
        v.update(|x| x.push(2));
        let seen: Vec<Vec<u32>> = (0..2 * SHARDS)
            .map(|_| {
                let v = v.clone();
                std::thread::spawn(move || v.read(|x| x.clone()))
                    .join()
                    .unwrap()
            })
            .collect();
        assert!(seen.iter().all(|x| x == &[1, 2]), "{seen:?}");
        assert_eq!(v.update(|x| x.len()), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_writer_excludes_readers_on_every_thread() {
        let lock = Arc::new(ShardedRwLock::new());
        let inside = Arc::new(AtomicUsize::new(0));
        let writing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let (lock, inside, writing) = (lock.clone(), inside.clone(), writing.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..50 {
                    let _r = lock.read().await;
                    assert!(
                        !writing.load(Ordering::SeqCst),
                        "a reader beside the writer"
                    );
                    inside.fetch_add(1, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                }
            }));
        }
        for _ in 0..20 {
            let _w = lock.write().await;
            writing.store(true, Ordering::SeqCst);
            assert_eq!(
                inside.load(Ordering::SeqCst),
                0,
                "the writer beside a reader"
            );
            tokio::time::sleep(Duration::from_micros(200)).await;
            writing.store(false, Ordering::SeqCst);
        }
        for t in tasks {
            t.await.unwrap();
        }
    }
}
