//! A worker's sessions, all polled by one future: the worker runtime's `block_on` future.
//!
//! Each session used to be a tokio task of its own: every wake-up of a session went
//! through tokio's scheduler (its run queue, the task's state transitions and reference
//! counts, the task harness and the [`TaskTracker`] wrapper), about 3% of a `-S`
//! statement's instructions. Here a session is a future in a slot of the worker's
//! [`Executor`], and its waker is the slot's [`Entry`]: waking it on the worker's own
//! thread pushes the slot's number on a thread-local list and, if the executor waits,
//! marks the runtime's `block_on` future as woken (tokio does not wake its own thread's
//! reactor for that). After its reactor turn the runtime polls that future once, and it
//! polls every session woken since the last time. A session woken from another thread (a
//! timer of the `pgway-timer` thread, a shutdown signal) goes through a locked list and
//! wakes the runtime as any cross-thread wake-up does.
//!
//! The sessions of one batch share tokio's cooperative budget: a session that finds it
//! spent is woken again, for the next batch, which runs after the runtime has polled its
//! reactor and run its tasks ([`tokio::task::yield_now`]). A session that panics is closed
//! (its future dropped) and the others go on, as with a task of its own.
//!
//! A session may move to another worker's executor ([`hop`]): the executor takes it out
//! of its slot after the poll that asked and hands it to the other's [`Home`], where it
//! is polled in the next batch (see `super::placement`).
//!
//! [`TaskTracker`]: tokio_util::task::TaskTracker

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

use super::placement::Placement;

/// A session as the executor holds it.
pub(crate) type SessionFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

thread_local! {
    /// The executor of this thread, if it has one: the [`Home`] its entries point to.
    static HOME: Cell<*const Home> = const { Cell::new(std::ptr::null()) };
    /// Slots of this thread's executor woken on this thread since its last batch.
    static READY: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
    /// Sessions handed to this thread's executor ([`add`]) and not yet in a slot.
    static ADDED: RefCell<Vec<SessionFuture>> = const { RefCell::new(Vec::new()) };
    /// The executor waits for a wake-up: the next local wake must wake it.
    static IDLE: Cell<bool> = const { Cell::new(false) };
    /// The executor's waker, the runtime's own (set on its first poll).
    static WAKER: RefCell<Option<Waker>> = const { RefCell::new(None) };
    /// The session being polled asked to move to this worker ([`hop`]).
    static MOVING: Cell<Option<usize>> = const { Cell::new(None) };
}

/// What the entries of one executor share: the way in for wake-ups from other threads,
/// and for sessions moving in from other workers.
#[derive(Default)]
pub(super) struct Home {
    /// Slots woken on other threads.
    remote: Mutex<Vec<usize>>,
    /// Sessions handed over by other workers' executors ([`hop`]).
    arrivals: Mutex<Vec<SessionFuture>>,
    /// `remote` or `arrivals` may have some (checked without a lock on every batch).
    has_remote: AtomicBool,
    /// The executor has ended: a session handed over now is dropped, not kept where
    /// nothing polls it.
    closed: AtomicBool,
    /// The executor's waker, for those wake-ups.
    waker: Mutex<Option<Waker>>,
}

impl std::fmt::Debug for Home {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Home").finish_non_exhaustive()
    }
}

impl Home {
    /// Takes `session` in from another worker and wakes this executor for it.
    fn arrive(&self, session: SessionFuture) {
        let mut arrivals = self.arrivals.lock().unwrap_or_else(PoisonError::into_inner);
        if self.closed.load(Ordering::Acquire) {
            drop(arrivals);
            drop(session);
            return;
        }
        arrivals.push(session);
        drop(arrivals);
        self.has_remote.store(true, Ordering::Release);
        if let Some(task) = &*self.waker.lock().unwrap_or_else(PoisonError::into_inner) {
            task.wake_by_ref();
        }
    }
}

/// A session's waker: its slot, and whether it is on a ready list already.
#[derive(Debug)]
struct Entry {
    slot: usize,
    queued: AtomicBool,
    home: Arc<Home>,
}

impl Wake for Entry {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.queued.swap(true, Ordering::AcqRel) {
            return;
        }
        if std::ptr::eq(HOME.get(), Arc::as_ptr(&self.home)) {
            READY.with_borrow_mut(|ready| ready.push(self.slot));
            wake_if_idle();
        } else {
            let home = &self.home;
            home.remote
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(self.slot);
            home.has_remote.store(true, Ordering::Release);
            if let Some(task) = &*home.waker.lock().unwrap_or_else(PoisonError::into_inner) {
                task.wake_by_ref();
            }
        }
    }
}

/// Wakes this thread's executor if it waits (a local wake-up or a new session).
fn wake_if_idle() {
    if IDLE.replace(false) {
        WAKER.with_borrow(|task| {
            if let Some(task) = task {
                task.wake_by_ref();
            }
        });
    }
}

/// Hands a new session to the executor of the calling thread (a worker running
/// [`Executor::run`], or `main` itself); it is first polled in the executor's next batch.
pub(crate) fn add(session: SessionFuture) {
    ADDED.with_borrow_mut(|added| added.push(session));
    wake_if_idle();
}

/// Moves the calling session to worker `to`'s executor: resolves there, in that worker's
/// next batch. It resolves where it is, in this worker's next batch, if that worker's
/// executor does not run or is this one, or outside a worker's executor. The session's
/// sockets stay registered with the reactor they were registered with: the caller moves
/// them.
pub(super) async fn hop(to: usize) {
    let mut asked = false;
    std::future::poll_fn(|cx| {
        if asked {
            return Poll::Ready(());
        }
        asked = true;
        MOVING.set(Some(to));
        // Polled again where it is if it cannot move; where it moves, a new session's
        // first poll needs no wake-up.
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await;
}

/// A session in its slot, with the waker made for it once.
struct Slot {
    session: SessionFuture,
    waker: Waker,
    entry: Arc<Entry>,
}

/// The sessions of one worker thread.
pub(crate) struct Executor {
    home: Arc<Home>,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    /// The batch being polled (kept for its allocation).
    batch: Vec<usize>,
    /// The workers' placement and this worker's index in it, on a worker.
    placement: Option<(Arc<Placement>, usize)>,
}

impl Executor {
    /// Runs `main` and the sessions it hands over ([`add`]) on the calling thread until
    /// `main` ends; the sessions still running then are dropped. A worker's runtime runs
    /// this as its `block_on` future: a wake-up on the worker's own thread then only
    /// marks the runtime as woken, and the runtime polls this future after its reactor
    /// turn, with no task of its own to schedule and run.
    ///
    /// On worker `placement.1` of `placement.0`, sessions may move in from the other
    /// workers and out to them ([`hop`]).
    pub(crate) async fn run(main: SessionFuture, placement: Option<(Arc<Placement>, usize)>) {
        let mut executor = Self {
            home: Arc::default(),
            slots: Vec::new(),
            free: Vec::new(),
            batch: Vec::new(),
            placement,
        };
        if let Some((placement, index)) = &executor.placement {
            placement.set_home(*index, Arc::clone(&executor.home));
        }
        HOME.set(Arc::as_ptr(&executor.home));
        ADDED.with_borrow_mut(|added| added.insert(0, main));
        std::future::poll_fn(|cx| executor.poll_batch(cx)).await
    }

    /// Polls the sessions woken since the last batch, and new ones; ready when `main`
    /// (slot 0) has ended.
    fn poll_batch(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if WAKER.with_borrow(Option::is_none) {
            WAKER.set(Some(cx.waker().clone()));
            *self
                .home
                .waker
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(cx.waker().clone());
        }
        if self.home.has_remote.load(Ordering::Acquire) {
            self.home.has_remote.store(false, Ordering::Release);
            let mut remote = self
                .home
                .remote
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            READY.with_borrow_mut(|ready| ready.append(&mut remote));
            drop(remote);
            let arrived = std::mem::take(
                &mut *self
                    .home
                    .arrivals
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner),
            );
            if !arrived.is_empty() {
                ADDED.with_borrow_mut(|added| added.extend(arrived));
            }
        }
        self.take_added();
        READY.with_borrow_mut(|ready| std::mem::swap(ready, &mut self.batch));
        let mut batch = std::mem::take(&mut self.batch);
        let _clock = crate::clock::batch();
        for slot in batch.drain(..) {
            self.poll_slot(slot);
        }
        self.batch = batch;
        if matches!(self.slots.first(), Some(None)) {
            return Poll::Ready(());
        }
        self.take_added();
        if READY.with_borrow(|ready| !ready.is_empty()) {
            // Woken again during the batch (a spent budget, a session waking another, a
            // new session): the next batch comes after the runtime has looked at its
            // sockets and run its tasks.
            let yielded = std::pin::pin!(tokio::task::yield_now());
            let _ = yielded.poll(cx);
        } else {
            IDLE.set(true);
        }
        Poll::Pending
    }

    /// Puts the sessions handed over by [`add`] in slots, each woken for its first poll.
    fn take_added(&mut self) {
        if ADDED.with_borrow(Vec::is_empty) {
            return;
        }
        let added = ADDED.with_borrow_mut(std::mem::take);
        for session in added {
            let slot = self.free.pop().unwrap_or_else(|| {
                self.slots.push(None);
                self.slots.len() - 1
            });
            let entry = Arc::new(Entry {
                slot,
                queued: AtomicBool::new(true),
                home: Arc::clone(&self.home),
            });
            let waker = Waker::from(Arc::clone(&entry));
            self.slots[slot] = Some(Slot {
                session,
                waker,
                entry,
            });
            READY.with_borrow_mut(|ready| ready.push(slot));
        }
    }

    /// Polls the session in `slot` (none there: a wake-up from a session that ended) and
    /// frees the slot when the session ends or panics.
    fn poll_slot(&mut self, slot: usize) {
        let Some(Some(held)) = self.slots.get_mut(slot) else {
            return;
        };
        held.entry.queued.store(false, Ordering::Release);
        let mut cx = Context::from_waker(&held.waker);
        let session = &mut held.session;
        let ended = match catch_unwind(AssertUnwindSafe(|| session.as_mut().poll(&mut cx))) {
            Ok(Poll::Pending) => {
                if let Some(to) = MOVING.take() {
                    self.send_away(slot, to);
                }
                false
            }
            Ok(Poll::Ready(())) => true,
            Err(_) => {
                tracing::error!("a session panicked; its client's connection is closed");
                true
            }
        };
        if ended {
            self.slots[slot] = None;
            self.free.push(slot);
        }
    }

    /// Hands the session in `slot`, which asked to move ([`hop`]), to worker `to`'s
    /// executor. It stays if that is this worker or does not run: [`hop`] then resolves
    /// here, on the wake-up it gave itself.
    fn send_away(&mut self, slot: usize, to: usize) {
        let Some((placement, here)) = &self.placement else {
            return;
        };
        if to == *here {
            return;
        }
        let Some(home) = placement.home(to) else {
            return;
        };
        let Some(held) = self.slots.get_mut(slot).and_then(Option::take) else {
            return;
        };
        self.free.push(slot);
        placement.moved(*here, to);
        home.arrive(held.session);
    }
}

impl Drop for Executor {
    /// The thread's executor is gone: its entries' wake-ups go nowhere, and sessions
    /// handed over to it are dropped (a session holds the server's state, which holds the
    /// placement, which holds this executor's [`Home`]).
    fn drop(&mut self) {
        let arrived = {
            let mut arrivals = self
                .home
                .arrivals
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            self.home.closed.store(true, Ordering::Release);
            std::mem::take(&mut *arrivals)
        };
        drop(arrived);
        if std::ptr::eq(HOME.get(), Arc::as_ptr(&self.home)) {
            HOME.set(std::ptr::null());
            WAKER.set(None);
            IDLE.set(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::sync::{mpsc, oneshot};

    /// Runs `test` as the `main` of an executor on a current-thread runtime (a worker's
    /// kind); a session never woken fails it after ten seconds instead of hanging.
    fn on_a_worker<F: Future<Output = ()> + Send + 'static>(test: F) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let passed = Arc::new(AtomicBool::new(false));
        let passed_in_main = Arc::clone(&passed);
        runtime.block_on(Executor::run(
            Box::pin(async move {
                crate::timer::timeout(std::time::Duration::from_secs(10), test)
                    .await
                    .expect("a session was never woken");
                passed_in_main.store(true, Ordering::SeqCst);
            }),
            None,
        ));
        // `main` panicking (a failed assertion) ends the executor, not the test.
        assert!(passed.load(Ordering::SeqCst), "the test's main ended early");
    }

    #[test]
    fn sessions_woken_on_this_thread_and_on_others_all_finish() {
        on_a_worker(async {
            let (done, mut finished) = mpsc::unbounded_channel();
            let mut local = Vec::new();
            let mut remote = Vec::new();
            for i in 0..40 {
                let (tx, rx) = oneshot::channel::<usize>();
                let done = done.clone();
                add(Box::pin(async move {
                    let value = rx.await.expect("sender kept");
                    done.send((i, value)).expect("test waits");
                }));
                if i % 2 == 0 {
                    local.push((i, tx));
                } else {
                    remote.push((i, tx));
                }
            }
            let other = std::thread::spawn(move || {
                for (i, tx) in remote {
                    tx.send(i * 10).expect("session waits");
                }
            });
            tokio::task::yield_now().await;
            for (i, tx) in local {
                tx.send(i * 10).expect("session waits");
            }
            other.join().expect("other thread");
            let mut seen = Vec::new();
            while seen.len() < 40 {
                let (i, value) = finished.recv().await.expect("sessions send");
                assert_eq!(value, i * 10);
                seen.push(i);
            }
            seen.sort_unstable();
            assert_eq!(seen, (0..40).collect::<Vec<_>>());
        });
    }

    /// Counts its drops: a session's future dropped when it ends or panics.
    struct Dropped(Arc<AtomicUsize>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_session_that_panics_is_dropped_and_the_others_go_on() {
        on_a_worker(async {
            let drops = Arc::new(AtomicUsize::new(0));
            let guard = Dropped(Arc::clone(&drops));
            let (tx, rx) = oneshot::channel::<()>();
            add(Box::pin(async move {
                let _guard = guard;
                let () = rx.await.expect("sender kept");
                panic!("a session's bug");
            }));
            let (done_tx, done_rx) = oneshot::channel();
            let (go_tx, go_rx) = oneshot::channel::<()>();
            add(Box::pin(async move {
                go_rx.await.expect("sender kept");
                done_tx.send(()).expect("test waits");
            }));
            tokio::task::yield_now().await;
            tx.send(()).expect("session waits");
            tokio::task::yield_now().await;
            assert_eq!(
                drops.load(Ordering::SeqCst),
                1,
                "the panicked session is dropped"
            );
            go_tx.send(()).expect("session waits");
            done_rx.await.expect("the other session finishes");
        });
    }

    #[test]
    fn sessions_woken_only_from_other_threads_finish() {
        on_a_worker(async {
            let (done, mut finished) = mpsc::unbounded_channel();
            let mut senders = Vec::new();
            for i in 0..8 {
                let (tx, rx) = oneshot::channel::<usize>();
                let done = done.clone();
                add(Box::pin(async move {
                    done.send(rx.await.expect("sender kept") + i)
                        .expect("test waits");
                }));
                senders.push(tx);
            }
            // The executor has polled them all and waits when the other thread wakes them.
            tokio::task::yield_now().await;
            std::thread::spawn(move || {
                for tx in senders {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                    tx.send(100).expect("session waits");
                }
            });
            let mut sum = 0;
            for _ in 0..8 {
                sum += finished.recv().await.expect("sessions send");
            }
            assert_eq!(sum, 800 + (0..8).sum::<usize>());
        });
    }

    #[test]
    fn a_session_that_wakes_itself_runs_again_without_starving_the_runtime() {
        on_a_worker(async {
            let (busy_done, busy_finished) = oneshot::channel();
            let mut polls = 0;
            let mut busy_done = Some(busy_done);
            add(Box::pin(std::future::poll_fn(move |cx| {
                polls += 1;
                if polls == 1_000 {
                    if let Some(done) = busy_done.take() {
                        done.send(polls).expect("test waits");
                    }
                    return Poll::Ready(());
                }
                cx.waker().wake_by_ref();
                Poll::Pending
            })));
            let (done_tx, done_rx) = oneshot::channel();
            add(Box::pin(async move {
                // Woken by a task of the runtime, which runs between two batches.
                let (tx, rx) = oneshot::channel();
                tokio::spawn(async move { tx.send(7).expect("session waits") });
                done_tx
                    .send(rx.await.expect("task sends"))
                    .expect("test waits");
            }));
            assert_eq!(done_rx.await.expect("the other session finishes"), 7);
            assert_eq!(
                busy_finished.await.expect("the busy session finishes"),
                1_000
            );
        });
    }
}
