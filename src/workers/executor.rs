//! A worker's sessions, all polled by one loop that waits on the worker's own reactor
//! ([`crate::net::reactor`]).
//!
//! Each session used to be a tokio task of its own: every wake-up of a session went
//! through tokio's scheduler (its run queue, the task's state transitions and reference
//! counts, the task harness and the [`TaskTracker`] wrapper), about 3% of a `-S`
//! statement's instructions. Here a session is a future in a slot of the worker's
//! [`Executor`], and its waker is the slot's [`Entry`]: waking it on the worker's own
//! thread pushes the slot's number on a thread-local list, which the loop polls before it
//! waits again. A session woken from another thread (a timer of the `pgway-timer` thread,
//! a task of the main runtime, a shutdown signal) goes through a locked list and wakes the
//! reactor (an eventfd).
//!
//! The sessions of one batch share a budget of reads ([`poll_budget`]): a session that
//! finds it spent is woken again, for the next batch, which runs after the reactor has
//! looked at the sockets without waiting. A session that panics is closed (its future
//! dropped) and the others go on, as with a task of its own.
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
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use super::placement::Placement;
use crate::net::reactor::Reactor;
use crate::sync::lock;

/// A session as the executor holds it.
pub(crate) type SessionFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

thread_local! {
    /// The executor of this thread, if it has one: the [`Home`] its entries point to.
    static HOME: Cell<*const Home> = const { Cell::new(std::ptr::null()) };
    /// Slots of this thread's executor woken on this thread since its last batch.
    static READY: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
    /// Sessions handed to this thread's executor ([`add`]) and not yet in a slot.
    static ADDED: RefCell<Vec<SessionFuture>> = const { RefCell::new(Vec::new()) };
    /// Reads the sessions of this batch may still make ([`poll_budget`]).
    static BUDGET: Cell<u32> = const { Cell::new(BATCH_BUDGET) };
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
        let mut arrivals = lock(&self.arrivals);
        if self.closed.load(Ordering::Acquire) {
            drop(arrivals);
            drop(session);
            return;
        }
        arrivals.push(session);
        drop(arrivals);
        self.has_remote.store(true, Ordering::Release);
        if let Some(task) = &*lock(&self.waker) {
            task.wake_by_ref();
        }
    }
}

/// Reads that find bytes, for all the sessions of one batch (tokio's cooperative budget is
/// as large): a session relaying a large result gives the others their turn.
const BATCH_BUDGET: u32 = 128;

/// A read's claim on the budget ([`poll_budget`]).
#[derive(Debug)]
pub(crate) enum Budget {
    /// The batch's, on a worker's executor.
    Batch,
    /// tokio's, off the workers (tests, the main runtime).
    Tokio(tokio::task::coop::RestoreOnPending),
}

impl Budget {
    /// The read found bytes: it counts against the budget.
    pub(crate) fn made_progress(self) {
        match self {
            Self::Batch => BUDGET.set(BUDGET.get().saturating_sub(1)),
            Self::Tokio(coop) => coop.made_progress(),
        }
    }
}

/// Ready if the sessions of this batch may read once more; else the calling session is
/// woken for the next batch. Off a worker's executor, tokio's budget applies instead.
pub(crate) fn poll_budget(cx: &mut Context<'_>) -> Poll<Budget> {
    if HOME.get().is_null() {
        return tokio::task::coop::poll_proceed(cx).map(Budget::Tokio);
    }
    if BUDGET.get() == 0 {
        cx.waker().wake_by_ref();
        return Poll::Pending;
    }
    Poll::Ready(Budget::Batch)
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
        if std::ptr::eq(HOME.get(), Arc::as_ptr(&self.home)) {
            // On the executor's own thread (nearly every wake-up: its reactor's): a plain
            // load and store, no atomic read-modify-write. A wake-up from another thread
            // at the same moment may queue the session a second time; the second poll
            // finds nothing to do (a session is polled after any wake-up anyway), where
            // a lost wake-up could not happen: the flag is only ever set before queueing.
            if self.queued.load(Ordering::Acquire) {
                return;
            }
            self.queued.store(true, Ordering::Release);
            // The loop looks at the list before it waits again.
            READY.with_borrow_mut(|ready| ready.push(self.slot));
        } else {
            if self.queued.swap(true, Ordering::AcqRel) {
                return;
            }
            let home = &self.home;
            lock(&home.remote).push(self.slot);
            home.has_remote.store(true, Ordering::Release);
            if let Some(task) = &*lock(&home.waker) {
                task.wake_by_ref();
            }
        }
    }
}

/// Hands a new session to the executor of the calling thread (a worker running
/// [`Executor::run`], or `main` itself); it is first polled in the executor's next batch.
pub(crate) fn add(session: SessionFuture) {
    ADDED.with_borrow_mut(|added| added.push(session));
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
    /// `main` ends, waiting on a reactor of the thread's own between batches; the sessions
    /// still running then are dropped. Sockets made on this thread meanwhile
    /// ([`crate::net::reactor::adopt`]) are registered with that reactor.
    ///
    /// On worker `placement.1` of `placement.0`, sessions may move in from the other
    /// workers and out to them ([`hop`]).
    pub(crate) fn run(
        main: SessionFuture,
        placement: Option<(Arc<Placement>, usize)>,
    ) -> std::io::Result<()> {
        let mut reactor = Reactor::new()?;
        let mut executor = Self {
            home: Arc::default(),
            slots: Vec::new(),
            free: Vec::new(),
            batch: Vec::new(),
            placement,
        };
        *lock(&executor.home.waker) = Some(reactor.waker());
        if let Some((placement, index)) = &executor.placement {
            placement.set_home(*index, Arc::clone(&executor.home));
        }
        HOME.set(Arc::as_ptr(&executor.home));
        ADDED.with_borrow_mut(|added| added.insert(0, main));
        loop {
            if executor.poll_batch().is_ready() {
                return Ok(());
            }
            // Woken again during the batch (a spent budget, a session waking another, a
            // new session): the next batch comes after a look at the sockets that does
            // not wait.
            let more = READY.with_borrow(|ready| !ready.is_empty())
                || executor.home.has_remote.load(Ordering::Acquire);
            reactor.turn(more.then_some(std::time::Duration::ZERO));
        }
    }

    /// Polls the sessions woken since the last batch, and new ones; ready when `main`
    /// (slot 0) has ended.
    fn poll_batch(&mut self) -> Poll<()> {
        if self.home.has_remote.load(Ordering::Acquire) {
            self.home.has_remote.store(false, Ordering::Release);
            let mut remote = lock(&self.home.remote);
            READY.with_borrow_mut(|ready| ready.append(&mut remote));
            drop(remote);
            let arrived = std::mem::take(&mut *lock(&self.home.arrivals));
            if !arrived.is_empty() {
                ADDED.with_borrow_mut(|added| added.extend(arrived));
            }
        }
        self.take_added();
        READY.with_borrow_mut(|ready| std::mem::swap(ready, &mut self.batch));
        let mut batch = std::mem::take(&mut self.batch);
        let _clock = crate::clock::batch();
        BUDGET.set(BATCH_BUDGET);
        for slot in batch.drain(..) {
            self.poll_slot(slot);
        }
        self.batch = batch;
        if matches!(self.slots.first(), Some(None)) {
            return Poll::Ready(());
        }
        self.take_added();
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
            let mut arrivals = lock(&self.home.arrivals);
            self.home.closed.store(true, Ordering::Release);
            std::mem::take(&mut *arrivals)
        };
        drop(arrived);
        if std::ptr::eq(HOME.get(), Arc::as_ptr(&self.home)) {
            HOME.set(std::ptr::null());
        }
    }
}

#[cfg(test)]
/// Runs `test` as the `main` of an executor on this thread, with a runtime's handle
/// entered for its tasks and timers (a worker's setting); a session never woken fails
/// it after ten seconds instead of hanging.
pub(crate) fn on_a_worker<F: Future<Output = ()> + Send + 'static>(test: F) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let _entered = runtime.enter();
    let passed = Arc::new(AtomicBool::new(false));
    let passed_in_main = Arc::clone(&passed);
    Executor::run(
        Box::pin(async move {
            crate::timer::timeout(std::time::Duration::from_secs(10), test)
                .await
                .expect("a session was never woken");
            passed_in_main.store(true, Ordering::SeqCst);
        }),
        None,
    )
    .expect("reactor");
    // `main` panicking (a failed assertion) ends the executor, not the test.
    assert!(passed.load(Ordering::SeqCst), "the test's main ended early");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::sync::{mpsc, oneshot};

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
    fn a_session_that_wakes_itself_runs_again_without_starving_the_sockets() {
        on_a_worker(async {
            // Busy until the other session has read from its socket: if the reactor never
            // looked at the sockets while this one kept the worker busy, neither would end.
            let read = Arc::new(AtomicBool::new(false));
            let read_seen = Arc::clone(&read);
            let (busy_done, busy_finished) = oneshot::channel();
            let mut polls = 0u64;
            let mut busy_done = Some(busy_done);
            add(Box::pin(std::future::poll_fn(move |cx| {
                polls += 1;
                if read_seen.load(Ordering::SeqCst) {
                    if let Some(done) = busy_done.take() {
                        done.send(polls).expect("test waits");
                    }
                    return Poll::Ready(());
                }
                cx.waker().wake_by_ref();
                Poll::Pending
            })));
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let mut peer = std::net::TcpStream::connect(listener.local_addr().expect("addr"))
                .expect("connect");
            let (accepted, _) = listener.accept().expect("accept");
            let mut socket = crate::net::reactor::adopt(accepted).expect("register");
            let (done_tx, done_rx) = oneshot::channel();
            add(Box::pin(async move {
                use tokio::io::AsyncReadExt;
                let mut got = [0u8; 1];
                socket.read_exact(&mut got).await.expect("read");
                read.store(true, Ordering::SeqCst);
                done_tx.send(got[0]).expect("test waits");
            }));
            tokio::task::yield_now().await;
            std::thread::spawn(move || {
                use std::io::Write;
                std::thread::sleep(std::time::Duration::from_millis(20));
                peer.write_all(b"7").expect("write");
                std::thread::sleep(std::time::Duration::from_millis(100));
            });
            assert_eq!(done_rx.await.expect("the reader finishes"), b'7');
            let polls = busy_finished.await.expect("the busy session finishes");
            assert!(polls > 1, "{polls}");
        });
    }
}
