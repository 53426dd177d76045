//! Per-guest-cluster leases.
//!
//! A guest cluster's mapping (its L2 entry) changes only under an exclusive lease; reads and
//! in-place overwrites hold a shared one, so the host cluster they use cannot be released and
//! reused under them. This is what makes two writers to one unallocated cluster allocate once
//! (invariant 2 of the engine): the second waits, then finds the cluster allocated.
//!
//! Every request takes a lease, so the uncontended path is kept cheap: no heap allocation and no
//! image-wide lock. The table is split into `SHARDS` shards chosen by a hash of the cluster
//! number, each a `std::sync::Mutex` around a map from cluster to `State`. A shard lock is held
//! only for a few instructions and never across an `.await`. A shard's map keeps its capacity
//! when entries are removed, so once warmed up, taking and dropping an uncontended lease
//! touches one shard lock and allocates nothing; the wait queue allocates only under contention.
//!
//! Invariants (all of them hold whenever a shard lock is free, except where noted):
//!
//! 1. **Exclusion.** For each cluster, either `writer` is set and `readers == 0`, or `writer` is
//!    clear. `readers`/`writer` count grants, whether or not the grantee has observed them yet.
//! 2. **Queued means not granted.** A waiter is in its cluster's queue exactly while it waits;
//!    granting it removes it from the queue (and counts it in `readers`/`writer`). So a future
//!    that no longer finds its id in the queue knows it has been granted.
//! 3. **Fair FIFO.** A new arrival is granted at once only if it is compatible with the holders
//!    *and the queue is empty*; otherwise it queues at the back. Grants are handed out from the
//!    head only, in order: all leading shared waiters, or one exclusive waiter. A stream of
//!    readers therefore cannot starve a writer (Tokio's `RwLock`, used before, was fair too).
//! 4. **No needless waiting.** The head of a non-empty queue is incompatible with the holders.
//!    Every change that could make it compatible (a release, an abandoned wait) re-examines the
//!    queue before it lets go of the shard lock. (Only while a release is handing out more
//!    grants than one wake batch does it briefly drop the lock with the head still grantable;
//!    it then re-locks and goes on, and new arrivals meanwhile queue behind, per 3.)
//! 5. **Bounded memory.** A cluster has a `State` only while someone holds or waits for it; the
//!    entry is removed when the last holder leaves and no one waits, so memory is proportional
//!    to clusters in flight, not to the disk size.
//! 6. **Cancel safety.** Any [`Acquire`] may be dropped at any point. Before its first poll it
//!    holds nothing. Queued, it removes itself and the queue is re-examined (4). Granted but not
//!    yet observed (invariant 2), it gives the grant back exactly as a [`Lease`] drop would.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasherDefault, Hasher};
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

/// Number of shards. More shards mean less contention between requests to different
/// clusters; 64 is far more than the cores that can contend, at a fixed cost of 64 small maps.
const SHARDS: usize = 64;
const _: () = assert!(SHARDS.is_power_of_two());

/// How many wakers a release collects before it drops the shard lock to wake them.
///
/// Why batch at all: wakers are called outside the shard lock (a woken task on another worker
/// would otherwise run straight into the lock we hold, and a waker is foreign code that must
/// not run under our lock), and collecting them in a fixed array keeps the release path free of
/// heap allocation even when it grants many readers at once.
const WAKE_BATCH: usize = 16;

/// The lease table of one image.
pub struct ClusterLeases {
    shards: [PaddedShard; SHARDS],
}

/// A shard on cache lines of its own: neighbouring shards are taken by requests on other
/// cores, and sharing a line would make their uncontended locks contend after all.
#[repr(align(128))]
#[derive(Default)]
struct PaddedShard(Mutex<Shard>);

#[derive(Default)]
struct Shard {
    clusters: ClusterMap,
    /// Ids for waiters in this shard. Why per shard: unique within the shard is all a waiter
    /// needs to find itself again, and a global atomic would be image-wide contention again.
    next_id: u64,
}

/// Lease states by cluster number. The keys are trusted (our own cluster numbers), so the
/// DoS-resistant default hasher buys nothing and cost a visible share of every request: a
/// multiplicative hash spreads them over the table's buckets well enough.
type ClusterMap = HashMap<u64, State, BuildHasherDefault<ClusterHasher>>;

#[derive(Default)]
struct ClusterHasher(u64);

impl Hasher for ClusterHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        // Fibonacci hashing; the rotation brings the well-mixed high bits down to where the
        // table takes its bucket index, the high bits stay for its control bytes.
        self.0 = (self.0 ^ n)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(29);
    }
}

/// The lease state of one cluster; present only while held or waited for (invariant 5).
#[derive(Default)]
struct State {
    readers: u32,
    writer: bool,
    waiters: VecDeque<Waiter>,
}

struct Waiter {
    id: u64,
    exclusive: bool,
    waker: Waker,
}

impl State {
    fn compatible(&self, exclusive: bool) -> bool {
        if exclusive {
            self.readers == 0 && !self.writer
        } else {
            !self.writer
        }
    }

    fn grant(&mut self, exclusive: bool) {
        debug_assert!(self.compatible(exclusive));
        if exclusive {
            self.writer = true;
        } else {
            self.readers += 1;
        }
    }

    fn give_back(&mut self, exclusive: bool) {
        if exclusive {
            debug_assert!(self.writer && self.readers == 0);
            self.writer = false;
        } else {
            debug_assert!(self.readers > 0 && !self.writer);
            self.readers -= 1;
        }
    }

    fn idle(&self) -> bool {
        self.readers == 0 && !self.writer && self.waiters.is_empty()
    }
}

/// Wakers collected under the shard lock, to be woken after it is released.
#[derive(Default)]
struct WakeBatch {
    wakers: [Option<Waker>; WAKE_BATCH],
    len: usize,
}

impl WakeBatch {
    fn is_full(&self) -> bool {
        self.len == WAKE_BATCH
    }

    fn push(&mut self, w: Waker) {
        self.wakers[self.len] = Some(w);
        self.len += 1;
    }

    fn wake_all(&mut self) {
        for w in &mut self.wakers[..self.len] {
            if let Some(w) = w.take() {
                w.wake();
            }
        }
        self.len = 0;
    }
}

/// Grants to the head of `cluster`'s queue as far as invariant 3 allows and removes the state
/// if it has become idle. Returns true if it stopped only because `batch` is full, i.e. the
/// caller must wake the batch and call again.
fn hand_off(clusters: &mut ClusterMap, cluster: u64, batch: &mut WakeBatch) -> bool {
    let Some(st) = clusters.get_mut(&cluster) else {
        return false;
    };
    while let Some(head) = st.waiters.front() {
        if !st.compatible(head.exclusive) {
            break;
        }
        if batch.is_full() {
            return true;
        }
        let w = st.waiters.pop_front().expect("head exists");
        st.grant(w.exclusive);
        batch.push(w.waker);
    }
    if st.idle() {
        clusters.remove(&cluster);
    }
    false
}

/// Which shard `cluster` lives in. Fibonacci hashing (multiply, take the top bits) spreads
/// both sequential and strided cluster numbers evenly over the shards at the cost of one
/// multiplication.
fn shard_of(cluster: u64) -> usize {
    (cluster.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - SHARDS.trailing_zeros())) as usize
}

impl Default for ClusterLeases {
    fn default() -> Self {
        ClusterLeases {
            shards: std::array::from_fn(|_| PaddedShard::default()),
        }
    }
}

impl fmt::Debug for ClusterLeases {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterLeases")
            .field("clusters", &self.clusters())
            .finish_non_exhaustive()
    }
}

impl ClusterLeases {
    /// A shared lease: the mapping of `cluster` stays as it is while held.
    pub fn shared(&self, cluster: u64) -> Acquire<'_> {
        self.acquire(cluster, false)
    }

    /// An exclusive lease: only the holder may look at or change the mapping of `cluster`.
    pub fn exclusive(&self, cluster: u64) -> Acquire<'_> {
        self.acquire(cluster, true)
    }

    fn acquire(&self, cluster: u64, exclusive: bool) -> Acquire<'_> {
        Acquire {
            table: self,
            cluster,
            exclusive,
            step: Step::Start,
        }
    }

    fn lock(&self, cluster: u64) -> MutexGuard<'_, Shard> {
        // Why poisoning is ignored: no critical section here calls foreign code or can leave a
        // State half-updated, so a panic elsewhere while holding the lock says nothing about it.
        self.shards[shard_of(cluster)]
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Gives back a grant of `cluster` (`waiter == None`, or a waiter that turns out to have
    /// been granted), or removes a still-queued waiter; then hands off to the queue.
    fn leave(&self, cluster: u64, exclusive: bool, waiter: Option<u64>) {
        let mut batch = WakeBatch::default();
        let mut shard = self.lock(cluster);
        let st = shard
            .clusters
            .get_mut(&cluster)
            .expect("a cluster has state while it is held or waited for");
        let queued = waiter
            .and_then(|id| st.waiters.iter().position(|w| w.id == id))
            .and_then(|i| st.waiters.remove(i));
        if queued.is_none() {
            // Not (or no longer) in the queue: it holds a grant (invariant 2).
            st.give_back(exclusive);
        }
        loop {
            let more = hand_off(&mut shard.clusters, cluster, &mut batch);
            drop(shard);
            batch.wake_all();
            if !more {
                break;
            }
            shard = self.lock(cluster);
        }
        // `queued` (and its waker) is dropped here, outside the lock.
    }

    /// How many clusters have state (are held or waited for).
    fn clusters(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.0.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clusters
                    .len()
            })
            .sum()
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.clusters()
    }
}

/// The future returned by [`ClusterLeases::shared`] and [`ClusterLeases::exclusive`]; resolves
/// to the [`Lease`]. Cancel safe: dropping it at any point takes or keeps nothing.
#[must_use = "futures do nothing unless you `.await` or poll them"]
#[derive(Debug)]
pub struct Acquire<'a> {
    table: &'a ClusterLeases,
    cluster: u64,
    exclusive: bool,
    step: Step,
}

#[derive(Debug, Clone, Copy)]
enum Step {
    /// Not polled yet; holds and waits for nothing.
    Start,
    /// Queued under this id, or granted but not yet observed (invariant 2 tells which).
    Queued(u64),
    /// The lease has been handed out; the `Lease` now owns the grant.
    Done,
}

impl<'a> Future for Acquire<'a> {
    type Output = Lease<'a>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Lease<'a>> {
        let this = self.get_mut();
        let table = this.table;
        let mut shard = table.lock(this.cluster);
        let shard = &mut *shard;
        match this.step {
            Step::Start => {
                let st = shard.clusters.entry(this.cluster).or_default();
                // Invariant 3: even a compatible arrival waits if anyone is queued.
                if st.waiters.is_empty() && st.compatible(this.exclusive) {
                    st.grant(this.exclusive);
                    this.step = Step::Done;
                    return Poll::Ready(this.lease());
                }
                let id = shard.next_id;
                shard.next_id += 1;
                st.waiters.push_back(Waiter {
                    id,
                    exclusive: this.exclusive,
                    waker: cx.waker().clone(),
                });
                this.step = Step::Queued(id);
                Poll::Pending
            }
            Step::Queued(id) => {
                let queued = shard
                    .clusters
                    .get_mut(&this.cluster)
                    .and_then(|st| st.waiters.iter_mut().find(|w| w.id == id));
                match queued {
                    Some(w) => {
                        // Why: the task may have moved to another waker since it queued.
                        if !w.waker.will_wake(cx.waker()) {
                            w.waker.clone_from(cx.waker());
                        }
                        Poll::Pending
                    }
                    None => {
                        // Granted by a releaser (invariant 2).
                        this.step = Step::Done;
                        Poll::Ready(this.lease())
                    }
                }
            }
            Step::Done => panic!("`Acquire` polled after completion"),
        }
    }
}

impl<'a> Acquire<'a> {
    fn lease(&self) -> Lease<'a> {
        Lease {
            table: self.table,
            cluster: self.cluster,
            exclusive: self.exclusive,
        }
    }
}

impl Drop for Acquire<'_> {
    fn drop(&mut self) {
        // Invariant 6: Start and Done own nothing; Queued owns either a queue slot or a grant,
        // and `leave` finds out which under the shard lock.
        if let Step::Queued(id) = self.step {
            self.table.leave(self.cluster, self.exclusive, Some(id));
        }
    }
}

/// A held lease; released on drop.
#[must_use = "a lease is released as soon as it is dropped"]
#[derive(Debug)]
pub struct Lease<'a> {
    table: &'a ClusterLeases,
    cluster: u64,
    exclusive: bool,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        self.table.leave(self.cluster, self.exclusive, None);
    }
}

// Why: leases and their futures are held across awaits in `Send` futures on the multi-thread
// runtime; this fails to compile if that ever stops being true.
const _: () = {
    fn send_sync<T: Send + Sync>() {}
    fn check() {
        send_sync::<ClusterLeases>();
        send_sync::<Acquire<'static>>();
        send_sync::<Lease<'static>>();
    }
    let _ = check;
};

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};
    use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;
    use std::time::Duration;

    /// A waker that records whether it was woken.
    #[derive(Default)]
    struct Flag(AtomicBool);

    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    impl Flag {
        /// Whether it was woken since the last call.
        fn take(&self) -> bool {
            self.0.swap(false, Ordering::SeqCst)
        }
    }

    /// Polls `f` once with a fresh recording waker.
    fn poll_once<'a>(f: &mut Acquire<'a>) -> (Poll<Lease<'a>>, Arc<Flag>) {
        let flag = Arc::new(Flag::default());
        let waker = Waker::from(flag.clone());
        let p = Pin::new(f).poll(&mut Context::from_waker(&waker));
        (p, flag)
    }

    fn ready<'a>(f: &mut Acquire<'a>) -> Lease<'a> {
        match poll_once(f).0 {
            Poll::Ready(l) => l,
            Poll::Pending => panic!("lease expected to be granted"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn exclusive_leases_serialize_and_are_cleaned_up() {
        let t = Arc::new(ClusterLeases::default());
        let inside = Arc::new(AtomicUsize::new(0));
        let mut tasks = vec![];
        for _ in 0..16 {
            let (t, inside) = (t.clone(), inside.clone());
            tasks.push(tokio::spawn(async move {
                let _l = t.exclusive(7).await;
                assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                tokio::time::sleep(Duration::from_millis(1)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(t.len(), 0);
    }

    #[tokio::test]
    async fn shared_leases_coexist() {
        let t = ClusterLeases::default();
        let a = t.shared(1).await;
        let b = t.shared(1).await;
        let other = t.exclusive(2).await;
        drop((a, b, other));
        assert_eq!(t.len(), 0);
    }

    #[tokio::test]
    async fn queued_writer_blocks_later_readers_and_gets_the_lease_when_readers_leave() {
        let t = ClusterLeases::default();
        let r1 = t.shared(5).await;
        let mut w = t.exclusive(5);
        let (p, w_woken) = poll_once(&mut w);
        assert!(p.is_pending());
        // Compatible with the holder (a reader), but a writer is queued: it must queue behind.
        let mut r2 = t.shared(5);
        let (p, r2_woken) = poll_once(&mut r2);
        assert!(p.is_pending(), "a later reader overtook a queued writer");
        drop(r1);
        assert!(w_woken.take());
        let wl = ready(&mut w);
        assert!(!r2_woken.take());
        let (p, r2_woken) = poll_once(&mut r2);
        assert!(p.is_pending());
        drop(wl);
        assert!(r2_woken.take());
        let r2l = ready(&mut r2);
        drop((r2l, w, r2));
        assert_eq!(t.len(), 0);
    }

    #[tokio::test]
    async fn all_leading_readers_are_granted_together_even_beyond_one_wake_batch() {
        let t = ClusterLeases::default();
        let w = t.exclusive(3).await;
        let mut readers: Vec<_> = (0..WAKE_BATCH * 2 + 3).map(|_| t.shared(3)).collect();
        let mut flags = vec![];
        for r in &mut readers {
            let (p, f) = poll_once(r);
            assert!(p.is_pending());
            flags.push(f);
        }
        let mut w2 = t.exclusive(3);
        let (p, w2_woken) = poll_once(&mut w2);
        assert!(p.is_pending());
        drop(w);
        assert!(
            flags.iter().all(|f| f.take()),
            "a leading reader was not woken"
        );
        let leases: Vec<_> = readers.iter_mut().map(ready).collect();
        assert!(!w2_woken.take());
        drop(leases);
        assert!(w2_woken.take());
        drop(ready(&mut w2));
        drop((readers, w2));
        assert_eq!(t.len(), 0);
    }

    #[tokio::test]
    async fn dropping_a_queued_waiter_lets_those_behind_it_proceed() {
        let t = ClusterLeases::default();
        // Never polled: holds and waits for nothing.
        drop(t.exclusive(9));
        assert_eq!(t.len(), 0);

        let r1 = t.shared(9).await;
        let mut w = t.exclusive(9);
        assert!(poll_once(&mut w).0.is_pending());
        let mut r2 = t.shared(9);
        let (p, r2_woken) = poll_once(&mut r2);
        assert!(p.is_pending());
        // The writer gives up; the reader behind it is now compatible and must be granted
        // without waiting for r1 to leave.
        drop(w);
        assert!(r2_woken.take());
        let r2l = ready(&mut r2);
        drop((r1, r2l, r2));
        assert_eq!(t.len(), 0);

        // The same through a timeout, with a real task waiting behind.
        let t = Arc::new(ClusterLeases::default());
        let x = t.exclusive(9).await;
        assert!(
            tokio::time::timeout(Duration::from_millis(5), t.exclusive(9))
                .await
                .is_err()
        );
        let t2 = t.clone();
        let behind = tokio::spawn(async move { drop(t2.shared(9).await) });
        tokio::task::yield_now().await;
        drop(x);
        behind.await.unwrap();
        assert_eq!(t.len(), 0);
    }

    #[tokio::test]
    async fn a_granted_but_unobserved_waiter_releases_its_grant_when_dropped() {
        let t = ClusterLeases::default();
        let x1 = t.exclusive(4).await;
        let mut x2 = t.exclusive(4);
        let (p, x2_woken) = poll_once(&mut x2);
        assert!(p.is_pending());
        drop(x1);
        assert!(x2_woken.take(), "the releaser did not hand off");
        // x2 now holds the grant without having seen it: a reader must wait.
        let mut r = t.shared(4);
        let (p, r_woken) = poll_once(&mut r);
        assert!(p.is_pending());
        drop(x2);
        assert!(r_woken.take(), "the dropped grantee kept its grant");
        drop(ready(&mut r));
        drop(r);
        assert_eq!(t.len(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn random_leases_with_abandoned_waits_keep_exclusion_and_clean_up() {
        const CLUSTERS: usize = 3;
        let t = Arc::new(ClusterLeases::default());
        // Per cluster: -1 while a writer is inside, else the number of readers inside.
        let inside: Arc<Vec<AtomicI32>> = Arc::new((0..CLUSTERS).map(|_| 0.into()).collect());
        let abandoned = Arc::new(AtomicUsize::new(0));
        let mut tasks = vec![];
        for seed in 0..24 {
            let (t, inside, abandoned) = (t.clone(), inside.clone(), abandoned.clone());
            tasks.push(tokio::spawn(async move {
                let mut rng = SmallRng::seed_from_u64(seed);
                for _ in 0..150 {
                    let c = rng.gen_range(0..CLUSTERS);
                    let exclusive = rng.gen_bool(0.4);
                    let acquire = if exclusive {
                        t.exclusive(c as u64)
                    } else {
                        t.shared(c as u64)
                    };
                    let lease = match rng.gen_range(0..4) {
                        0 => match tokio::time::timeout(Duration::from_millis(1), acquire).await {
                            Ok(l) => l,
                            Err(_) => {
                                abandoned.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                        },
                        // Biased towards the timer so that a grant that lands at the same
                        // time as the deadline is dropped unobserved.
                        1 => tokio::select! {
                            biased;
                            _ = tokio::time::sleep(Duration::from_millis(1)) => {
                                abandoned.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            l = acquire => l,
                        },
                        _ => acquire.await,
                    };
                    let n = &inside[c];
                    if exclusive {
                        assert_eq!(
                            n.compare_exchange(0, -1, Ordering::SeqCst, Ordering::SeqCst),
                            Ok(0)
                        );
                    } else {
                        let before = n.fetch_add(1, Ordering::SeqCst);
                        assert!(before >= 0, "a reader overlapped a writer");
                    }
                    if rng.gen_ratio(1, 8) {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    } else {
                        for _ in 0..rng.gen_range(0..3) {
                            tokio::task::yield_now().await;
                        }
                    }
                    if exclusive {
                        assert_eq!(
                            n.compare_exchange(-1, 0, Ordering::SeqCst, Ordering::SeqCst),
                            Ok(-1)
                        );
                    } else {
                        assert!(n.fetch_sub(1, Ordering::SeqCst) > 0);
                    }
                    drop(lease);
                }
            }));
        }
        // A leaked grant or a waiter never woken shows up as a hang: make it a failure.
        let all = async {
            for task in tasks {
                task.await.unwrap();
            }
        };
        tokio::time::timeout(Duration::from_secs(60), all)
            .await
            .expect("stuck: a grant leaked or a waiter was never woken");
        assert!(
            abandoned.load(Ordering::Relaxed) > 0,
            "no wait was abandoned"
        );
        assert_eq!(t.len(), 0);
        // Nothing leaked a grant: every cluster is free for a writer right away.
        for c in 0..CLUSTERS as u64 {
            let mut x = t.exclusive(c);
            drop(ready(&mut x));
        }
        assert_eq!(t.len(), 0);
    }
}
