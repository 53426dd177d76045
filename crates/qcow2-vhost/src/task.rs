//! A request future that starts on the thread that popped it and continues where its I/O
//! is reaped: that thread, or a runtime worker.
//!
//! Spawning each request onto Tokio from a queue's event-loop thread costs a cross-thread
//! wake-up per request: the spawn lands in the runtime's inject queue and unparks an idle
//! worker, which on a virtual machine means an inter-processor interrupt and a context
//! switch before the I/O is even submitted (measured: about a third of a QD1 request's
//! server CPU). A [`Task`] is polled first where it was made, so the request reaches the
//! engine and the kernel with no hop; when the I/O completes, the waker runs on the worker
//! that reaped the completion, and the continuation is spawned *there*, into that worker's
//! own queue, where it runs next without waking anyone else. A task woken on a queue thread
//! inside [`run_here`] (the thread reaped the completion itself) is polled there instead.
//!
//! The poll state is one atomic word, so a wake-up that races with a running poll is never
//! lost: the poller sees `NOTIFIED` and polls again.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Wake, Waker};

type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

thread_local! {
    /// `Some` while this thread runs [`run_here`]: tasks woken on it are polled here, at
    /// its end, instead of on the runtime.
    static HERE: RefCell<Option<Vec<Arc<Task>>>> = const { RefCell::new(None) };
}

/// Runs `f` and then, until none is left, every task that was woken on this thread meanwhile
/// (by `f`, or by the tasks run after it). A queue thread that reaps its own io_uring
/// completions calls it, so that the request a completion answers continues right there:
/// no spawn, no wake-up of a runtime worker. Nested calls run `f` only.
pub(crate) fn run_here<R>(f: impl FnOnce() -> R) -> R {
    let outer = HERE.with(|h| {
        let mut h = h.borrow_mut();
        if h.is_some() {
            return false;
        }
        *h = Some(Vec::new());
        true
    });
    let r = f();
    if outer {
        loop {
            let ready = HERE.with(|h| std::mem::take(h.borrow_mut().as_mut().expect("set above")));
            if ready.is_empty() {
                break;
            }
            for task in ready {
                let _context = task.runtime.enter();
                task.state.store(RUNNING, Ordering::Release);
                task.run();
            }
        }
        HERE.with(|h| h.borrow_mut().take());
    }
    r
}

/// Not being polled and not woken since its last poll.
const IDLE: u8 = 0;
/// Woken: a poll is scheduled on the runtime.
const SCHEDULED: u8 = 1;
/// Being polled.
const RUNNING: u8 = 2;
/// Woken while being polled: the poller polls again before it lets go.
const NOTIFIED: u8 = 3;
/// Finished; later wake-ups are ignored.
const DONE: u8 = 4;

/// One request's future and where to continue it.
///
/// Invariant: the future is polled by at most one thread at a time (only the thread that
/// moved `state` to `RUNNING` touches it), and after `DONE` never again.
pub(crate) struct Task {
    state: AtomicU8,
    future: Mutex<Option<BoxFuture>>,
    runtime: tokio::runtime::Handle,
}

impl Task {
    /// Polls `future` once on this thread (inside `runtime`'s context, so that it may use
    /// Tokio's spawn and timers) and leaves the rest to the runtime.
    pub(crate) fn start(
        runtime: &tokio::runtime::Handle,
        future: impl Future<Output = ()> + Send + 'static,
    ) {
        let task = Arc::new(Task {
            state: AtomicU8::new(RUNNING),
            future: Mutex::new(Some(Box::pin(future))),
            runtime: runtime.clone(),
        });
        let _context = runtime.enter();
        task.run();
    }

    /// Polls until the future finishes or is pending with no wake-up in between.
    /// Called with `state == RUNNING`, by the one thread that set it.
    fn run(self: &Arc<Task>) {
        let waker = Waker::from(self.clone());
        let mut cx = Context::from_waker(&waker);
        loop {
            let mut slot = self.future.lock().expect("task lock");
            let done = match slot.as_mut() {
                Some(f) => f.as_mut().poll(&mut cx).is_ready(),
                None => true,
            };
            if done {
                // Dropped here, on the poller, before anyone can see DONE.
                *slot = None;
                self.state.store(DONE, Ordering::Release);
                return;
            }
            drop(slot);
            match self
                .state
                .compare_exchange(RUNNING, IDLE, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return,
                // Woken during the poll: poll again.
                Err(NOTIFIED) => self.state.store(RUNNING, Ordering::Release),
                Err(s) => unreachable!("task state {s} while running"),
            }
        }
    }
}

impl Wake for Task {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            let next = match s {
                IDLE => SCHEDULED,
                RUNNING => NOTIFIED,
                _ => return, // already scheduled, notified or done
            };
            match self
                .state
                .compare_exchange(s, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break,
                Err(now) => s = now,
            }
        }
        if s == IDLE {
            // Never poll inside wake(): the waker may be called under the caller's locks.
            // On a thread inside `run_here`, the task is polled at its end; spawned from a
            // runtime worker (the worker that reaped the completion), the continuation goes
            // to that worker's own queue.
            let queued = HERE.with(|h| match h.try_borrow_mut() {
                Ok(mut h) => h.as_mut().map(|ready| ready.push(self.clone())).is_some(),
                Err(_) => false,
            });
            if queued {
                return;
            }
            let task = self.clone();
            self.runtime.spawn(async move {
                task.state.store(RUNNING, Ordering::Release);
                task.run();
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::Poll;
    use std::time::Duration;

    /// Pending until its flag is set, then ready; counts its polls.
    struct Gate {
        open: Arc<std::sync::atomic::AtomicBool>,
        waker: Arc<Mutex<Option<Waker>>>,
        polls: Arc<AtomicUsize>,
    }

    impl Future for Gate {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            if self.open.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    type GateHandles = (
        Arc<std::sync::atomic::AtomicBool>,
        Arc<Mutex<Option<Waker>>>,
        Arc<AtomicUsize>,
    );

    /// A gate and its handles: (open flag, last waker, poll count).
    fn gate() -> (Gate, GateHandles) {
        let g = Gate {
            open: Arc::default(),
            waker: Arc::default(),
            polls: Arc::default(),
        };
        let (o, w, p) = (g.open.clone(), g.waker.clone(), g.polls.clone());
        (g, (o, w, p))
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("test-worker")
            .build()
            .unwrap()
    }

    #[test]
    fn a_ready_future_finishes_on_the_starting_thread() {
        let rt = runtime();
        let here = std::thread::current().id();
        let ran_on = Arc::new(Mutex::new(None));
        let r = ran_on.clone();
        Task::start(rt.handle(), async move {
            *r.lock().unwrap() = Some(std::thread::current().id());
        });
        assert_eq!(*ran_on.lock().unwrap(), Some(here));
    }

    #[test]
    fn a_woken_future_continues_on_the_runtime() {
        let rt = runtime();
        let (g, (open, waker, polls)) = gate();
        let (tx, rx) = std::sync::mpsc::channel();
        Task::start(rt.handle(), async move {
            g.await;
            tx.send(std::thread::current().name().map(str::to_owned))
                .unwrap();
        });
        assert_eq!(polls.load(Ordering::SeqCst), 1, "polled once inline");
        assert!(rx.try_recv().is_err());
        open.store(true, Ordering::SeqCst);
        waker.lock().unwrap().take().unwrap().wake();
        let name = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(name.as_deref(), Some("test-worker"));
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_wake_during_the_inline_poll_is_not_lost() {
        // The future wakes itself while it is being polled, then is ready on the next poll.
        struct SelfWake(bool);
        impl Future for SelfWake {
            type Output = ();
            fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
                if self.0 {
                    return Poll::Ready(());
                }
                self.0 = true;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
        let rt = runtime();
        let (tx, rx) = std::sync::mpsc::channel();
        Task::start(rt.handle(), async move {
            SelfWake(false).await;
            tx.send(()).unwrap();
        });
        // Polled again by the same thread (NOTIFIED), not left waiting for a wake-up.
        rx.try_recv().expect("finished without the runtime's help");
    }

    #[test]
    fn many_wakes_from_many_threads_finish_the_future_exactly_once() {
        let rt = runtime();
        for _ in 0..200 {
            let (g, (open, waker, _)) = gate();
            let finished = Arc::new(AtomicUsize::new(0));
            let f = finished.clone();
            Task::start(rt.handle(), async move {
                g.await;
                f.fetch_add(1, Ordering::SeqCst);
            });
            let w = waker.lock().unwrap().clone().unwrap();
            open.store(true, Ordering::SeqCst);
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    let w = w.clone();
                    std::thread::spawn(move || {
                        for _ in 0..10 {
                            w.wake_by_ref();
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while finished.load(Ordering::SeqCst) == 0 {
                assert!(std::time::Instant::now() < deadline, "never finished");
                std::thread::yield_now();
            }
            std::thread::sleep(Duration::from_millis(1));
            assert_eq!(finished.load(Ordering::SeqCst), 1);
        }
    }

    #[test]
    fn a_task_woken_inside_run_here_continues_on_this_thread() {
        let rt = runtime();
        let here = std::thread::current().id();
        let (g, (open, waker, polls)) = gate();
        let ran_on = Arc::new(Mutex::new(None));
        let r = ran_on.clone();
        Task::start(rt.handle(), async move {
            g.await;
            *r.lock().unwrap() = Some(std::thread::current().id());
        });
        assert_eq!(polls.load(Ordering::SeqCst), 1);
        open.store(true, Ordering::SeqCst);
        // A completion reaped on this thread wakes the task: it runs at the end of run_here.
        run_here(|| {
            waker.lock().unwrap().take().unwrap().wake();
            assert!(ran_on.lock().unwrap().is_none(), "not polled inside wake()");
        });
        assert_eq!(*ran_on.lock().unwrap(), Some(here));
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn the_inline_poll_has_the_runtime_context() {
        let rt = runtime();
        let (tx, rx) = std::sync::mpsc::channel();
        Task::start(rt.handle(), async move {
            // tokio::spawn panics outside a runtime context.
            let inner = tokio::spawn(async { 7 });
            tx.send(inner.await.unwrap()).unwrap();
        });
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 7);
    }
}
