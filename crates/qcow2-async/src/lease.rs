//! Per-guest-cluster leases.
//!
//! A guest cluster's mapping (its L2 entry) changes only under an exclusive lease; reads and
//! in-place overwrites hold a shared one, so the host cluster they use cannot be released and
//! reused under them. This is what makes two writers to one unallocated cluster allocate once
//! (invariant 2): the second waits, then finds the cluster allocated.
//!
//! Leases are Tokio `RwLock`s created on demand and dropped with their last holder, so memory
//! is proportional to clusters in flight, not to the disk size. The lock is fair, so a stream
//! of readers cannot starve an allocating writer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

/// The lease table of one image.
#[derive(Debug, Default)]
pub struct ClusterLeases {
    map: Mutex<HashMap<u64, Arc<RwLock<()>>>>,
}

enum Held {
    Shared(#[allow(dead_code)] OwnedRwLockReadGuard<()>),
    Exclusive(#[allow(dead_code)] OwnedRwLockWriteGuard<()>),
}

/// A held lease; released on drop.
pub struct Lease<'a> {
    table: &'a ClusterLeases,
    cluster: u64,
    held: Option<Held>,
}

impl ClusterLeases {
    fn lock_for(&self, cluster: u64) -> Arc<RwLock<()>> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(cluster)
            .or_insert_with(|| Arc::new(RwLock::new(())))
            .clone()
    }

    /// A shared lease: the mapping of `cluster` stays as it is while held.
    pub async fn shared(&self, cluster: u64) -> Lease<'_> {
        let l = self.lock_for(cluster);
        let g = l.read_owned().await;
        Lease {
            table: self,
            cluster,
            held: Some(Held::Shared(g)),
        }
    }

    /// An exclusive lease: only the holder may look at or change the mapping of `cluster`.
    pub async fn exclusive(&self, cluster: u64) -> Lease<'_> {
        let l = self.lock_for(cluster);
        let g = l.write_owned().await;
        Lease {
            table: self,
            cluster,
            held: Some(Held::Exclusive(g)),
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.lock().unwrap().len()
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        drop(self.held.take());
        let mut map = self.table.map.lock().unwrap_or_else(|p| p.into_inner());
        // Remove the entry when nobody else holds or waits for it (the map's own Arc is the
        // only one left).
        if let Some(l) = map.get(&self.cluster) {
            if Arc::strong_count(l) == 1 {
                map.remove(&self.cluster);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

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
}
