//! Operations that finish even when their caller stops waiting.
//!
//! Async callers drop futures all the time (`tokio::time::timeout`, `select!`, aborted
//! tasks). A write dropped between allocating a cluster and linking it into its L2 table
//! would leak the cluster; one dropped while the kernel still writes its data would release
//! its lease too early, and a later writer could reuse the cluster under that write. So every
//! operation that changes the image runs as a [`ToCompletion`]: polled in place while the
//! caller waits (no task, no thread hop), and handed to the runtime to finish on its own if
//! the caller drops it first. The operation then either happens entirely or fails as it
//! would have; only its result is lost. [`Detached`] counts those orphans, and
//! `Image::close` waits for them before its final write-back.
//!
//! Reads need none of this: a dropped read leaves nothing half done (a table it was loading
//! is simply not cached, and the ring keeps its buffer until the kernel is done with it).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// How many dropped operations are still finishing in the background, for `close`.
#[derive(Debug, Default)]
pub(crate) struct Detached {
    running: AtomicUsize,
    idle: tokio::sync::Notify,
}

impl Detached {
    /// Waits until no dropped operation is still running.
    pub(crate) async fn wait_idle(&self) {
        loop {
            let idle = self.idle.notified();
            if self.running.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }

    /// Operations still finishing after their caller dropped them.
    #[cfg(test)]
    fn running(&self) -> usize {
        self.running.load(Ordering::Acquire)
    }
}

/// An operation that runs to completion even if dropped (see the module docs).
///
/// Invariant: `fut` is `Some` until it has returned `Ready`; a `ToCompletion` dropped with
/// `fut` still `Some` hands it to a runtime, counted in `detached` until it ends. The
/// counter is borrowed (from the image the operation runs on) and cloned only on that rare
/// path, so that a request costs no extra reference count traffic.
#[must_use = "an operation does nothing until awaited"]
pub(crate) struct ToCompletion<'a, T: Send + 'static> {
    fut: Option<BoxFuture<T>>,
    detached: &'a Arc<Detached>,
}

impl<'a, T: Send + 'static> ToCompletion<'a, T> {
    pub(crate) fn new(
        detached: &'a Arc<Detached>,
        fut: impl Future<Output = T> + Send + 'static,
    ) -> ToCompletion<'a, T> {
        ToCompletion {
            fut: Some(Box::pin(fut)),
            detached,
        }
    }
}

impl<T: Send + 'static> Future for ToCompletion<'_, T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let fut = self
            .fut
            .as_mut()
            .expect("a ToCompletion is not polled after it completed");
        match fut.as_mut().poll(cx) {
            Poll::Ready(v) => {
                self.fut = None;
                Poll::Ready(v)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: Send + 'static> Drop for ToCompletion<'_, T> {
    fn drop(&mut self) {
        let Some(fut) = self.fut.take() else {
            return;
        };
        let detached = self.detached.clone();
        detached.running.fetch_add(1, Ordering::AcqRel);
        let finish = async move {
            let _ = fut.await;
            if detached.running.fetch_sub(1, Ordering::AcqRel) == 1 {
                detached.idle.notify_waiters();
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                // A runtime that is shutting down drops the task unpolled: then, and only
                // then, the operation stops where the caller left it (its clusters may leak,
                // as after a crash; `check -r leaks` recovers them).
                drop(rt.spawn(finish));
            }
            Err(_) => {
                // Dropped outside any runtime: finish on a thread of its own.
                let spawned = std::thread::Builder::new()
                    .name("qcow2-finish".into())
                    .spawn(move || {
                        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                        {
                            rt.block_on(finish);
                        }
                    });
                if spawned.is_err() {
                    tracing::error!("qcow2: no thread to finish a dropped operation");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[tokio::test]
    async fn a_dropped_operation_still_finishes_and_is_counted_until_then() {
        let d = Arc::new(Detached::default());
        let done = Arc::new(AtomicBool::new(false));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let op = {
            let done = done.clone();
            ToCompletion::new(&d, async move {
                let _ = rx.await;
                done.store(true, Ordering::SeqCst);
            })
        };
        // Poll it once so that it is under way, then drop it (as a timeout would).
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(10), op)
                .await
                .is_err()
        );
        assert_eq!(d.running(), 1);
        assert!(!done.load(Ordering::SeqCst));
        tx.send(()).unwrap();
        d.wait_idle().await;
        assert!(done.load(Ordering::SeqCst));
        assert_eq!(d.running(), 0);
    }

    #[tokio::test]
    async fn an_awaited_operation_runs_in_place() {
        let d = Arc::new(Detached::default());
        let v = ToCompletion::new(&d, async { 7 }).await;
        assert_eq!(v, 7);
        assert_eq!(d.running(), 0);
        d.wait_idle().await;
    }

    #[test]
    fn dropped_outside_a_runtime_it_finishes_on_a_thread() {
        /// Pending on its first poll, ready on the second.
        struct PendOnce(bool);
        impl Future for PendOnce {
            type Output = ();
            fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
                if std::mem::replace(&mut self.0, true) {
                    return Poll::Ready(());
                }
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
        struct Noop;
        impl std::task::Wake for Noop {
            fn wake(self: Arc<Self>) {}
        }
        let d = Arc::new(Detached::default());
        let (tx, rx) = std::sync::mpsc::channel();
        let mut op = Box::pin(ToCompletion::new(&d, async move {
            PendOnce(false).await;
            tx.send(()).unwrap();
        }));
        let waker = std::task::Waker::from(Arc::new(Noop));
        assert!(op
            .as_mut()
            .poll(&mut Context::from_waker(&waker))
            .is_pending());
        drop(op);
        rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
    }
}
