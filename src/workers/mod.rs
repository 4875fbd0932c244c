//! Client sessions run on worker threads, one per core, each with its own executor and
//! its own reactor (a mio `Poll`, an epoll instance: the layout HAProxy uses with
//! `nbthread`).
//!
//! A session and the server connections it borrows then live on one thread: a round trip
//! wakes no other thread, and nothing is handed between cores. With one shared
//! multi-threaded runtime, every readiness event could wake the other worker and move the
//! task, which cost more CPU per statement than the statement's own work (see
//! `benches/RESULTS.md`). The accept loop hands each new client to the worker with the
//! fewest sessions, among the workers that take sessions: as many as the load needs
//! ([`placement`]); the sessions of the others move over between requests.
//!
//! A worker's sessions are not tokio tasks: its [`executor`] holds them and waits on the
//! worker's reactor ([`crate::net::reactor`]) between batches, so neither a wake-up of a
//! session on its own worker nor a readiness event of its sockets goes through tokio's
//! scheduler or I/O driver. What a session starts with tokio (a connect before the socket
//! moves to the worker's reactor, a cancel request, a task) runs on the main runtime,
//! whose handle each worker enters.
//!
//! Server connections remember which worker's reactor they are registered with
//! ([`current`]); the pool prefers one registered with the borrowing thread and moves
//! another over (two `epoll_ctl` calls) only when the thread has none idle.
//!
//! While its sessions have traffic, a worker does not sleep in `epoll_wait` between
//! events: for `busy_poll` after the last bytes one of its sessions read, it polls the
//! reactor without waiting ([`spin`]). Each round trip through pgway otherwise waits for
//! two wake-ups of a sleeping thread (the client's request, the server's answer), and on a
//! virtual machine each costs tens of microseconds: more than pgway's own work.

use std::cell::{Cell, OnceCell};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;
use tokio_util::task::{task_tracker::TaskTrackerToken, TaskTracker};
use tracing::warn;

mod executor;
mod placement;

#[cfg(test)]
pub(crate) use executor::on_a_worker;
pub(crate) use executor::poll_budget;
pub use placement::Placement;

/// Errors starting the workers.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A thread or its runtime could not be created.
    #[error("cannot start worker thread: {0}")]
    Start(#[from] std::io::Error),
}

thread_local! {
    /// Which reactor this thread's I/O is registered with: 0 for threads that are not
    /// workers (the main runtime), `i + 1` for worker `i`.
    static REACTOR: Cell<usize> = const { Cell::new(0) };
}

/// The reactor of the calling thread (see [`REACTOR`]).
pub fn current() -> usize {
    REACTOR.with(Cell::get)
}

thread_local! {
    /// On a worker: the workers' placement and this worker's index in it.
    static PLACED: OnceCell<(Arc<Placement>, usize)> = const { OnceCell::new() };
}

/// The worker a session of this thread that waits for its client between requests should
/// move to, if any (see [`placement`]); `None` off the workers.
#[inline]
pub fn destination() -> Option<usize> {
    PLACED.with(|placed| {
        placed
            .get()
            .and_then(|(placement, here)| placement.destination(*here))
    })
}

/// Moves the calling session to worker `to` (from [`destination`]); true if it now runs
/// there, and its sockets must move to this thread's reactor.
pub async fn move_to(to: usize) -> bool {
    let from = current();
    executor::hop(to).await;
    current() != from
}

thread_local! {
    /// A session of this thread read bytes since [`spin`] last looked.
    static BUSY: Cell<bool> = const { Cell::new(false) };
    /// [`spin`]'s waker while it waits for traffic.
    static SPINNER: Cell<Option<Waker>> = const { Cell::new(None) };
}

/// Notes that a connection of this thread read bytes: [`spin`] goes on (or starts)
/// polling. Two thread-local accesses; on a thread that is not a worker, nothing else.
pub fn busy() {
    BUSY.set(true);
    if let Some(spinner) = SPINNER.take() {
        spinner.wake();
    }
}

/// `busy_poll`: how long a worker polls without sleeping after its last traffic. Shared
/// by the workers, each reading it when it starts polling; a reload changes it.
#[derive(Debug)]
pub struct BusyPoll {
    nanos: AtomicU64,
    /// Wakes the workers' [`spin`] tasks that wait while it is off.
    changed: tokio::sync::Notify,
}

impl BusyPoll {
    /// The setting `window` (zero: off).
    pub fn new(window: Duration) -> Self {
        Self {
            nanos: AtomicU64::new(nanos(window)),
            changed: tokio::sync::Notify::new(),
        }
    }

    /// Changes the setting (a reload).
    pub fn set(&self, window: Duration) {
        self.nanos.store(nanos(window), Ordering::Relaxed);
        self.changed.notify_waiters();
    }

    fn window(&self) -> Duration {
        Duration::from_nanos(self.nanos.load(Ordering::Relaxed))
    }
}

fn nanos(window: Duration) -> u64 {
    u64::try_from(window.as_nanos()).unwrap_or(u64::MAX)
}

/// How often a polling worker looks at how long it waited for its CPU.
const CONTENTION_CHECK: Duration = Duration::from_millis(5);

/// A polling worker stops when it waited for its CPU for more than this share of the time
/// since it last looked (in percent): other threads want the CPUs, and polling would only
/// take time from the servers and clients that share them.
const MAX_WAIT_PERCENT: u128 = 20;

/// How often a polling worker samples the machine's run queues ([`RunQueues`]); it stops
/// when more than half the samples since it last looked at its own wait found the CPUs
/// crowded.
const CROWD_SAMPLE: Duration = Duration::from_millis(1);

/// How long a worker that stopped polling for that reason sleeps between events before
/// it tries again; doubled each time it stops so again, up to [`MAX_BACK_OFF`].
const CONTENTION_BACK_OFF: Duration = Duration::from_millis(200);
const MAX_BACK_OFF: Duration = Duration::from_secs(1);

/// The calling thread's scheduler statistics (`/proc/thread-self/schedstat`).
#[derive(Debug)]
struct SchedStat {
    file: std::fs::File,
}

impl SchedStat {
    /// The calling thread's; read from any thread afterwards, it stays that thread's.
    fn open() -> Option<Self> {
        let stat = Self {
            file: std::fs::File::open("/proc/thread-self/schedstat").ok()?,
        };
        stat.waited().map(|_| stat)
    }

    /// Nanoseconds the thread has waited for a CPU while runnable.
    fn waited(&self) -> Option<u64> {
        self.read(wait_field)
    }

    /// Nanoseconds the thread has run on a CPU.
    fn ran(&self) -> Option<u64> {
        self.read(run_field)
    }

    fn read(&self, field: fn(&[u8]) -> Option<u64>) -> Option<u64> {
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; 96];
        let len = self.file.read_at(&mut buf, 0).ok()?;
        field(buf.get(..len)?)
    }
}

/// The machine's run queues: how many threads are runnable now (`/proc/loadavg`'s fourth
/// field, before the `/`), against the CPUs online. A polling worker's own wait does not
/// show the servers and clients waiting behind it while it runs; this does. The count is
/// the whole machine's (a container sees its host's), and so are the CPUs counted.
struct RunQueues {
    file: std::fs::File,
    cpus: u32,
}

impl RunQueues {
    fn open() -> Option<Self> {
        let online = std::fs::read_to_string("/sys/devices/system/cpu/online").ok()?;
        let mut queues = Self {
            file: std::fs::File::open("/proc/loadavg").ok()?,
            cpus: cpu_count(&online)?,
        };
        queues.crowded().map(|_| queues)
    }

    /// At least two runnable threads more than there are CPUs: more than one waits for
    /// one. (One waiting is common while a single client's round trips run through a
    /// polling worker: the client or its server is runnable a moment before the other
    /// sleeps. Polling pays there; it does not when several threads keep waiting.)
    fn crowded(&mut self) -> Option<bool> {
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; 128];
        let len = self.file.read_at(&mut buf, 0).ok()?;
        Some(runnable_field(buf.get(..len)?)? > self.cpus + 1)
    }
}

/// The runnable threads, from `/proc/loadavg`'s text ("0.50 0.40 0.30 3/250 12345").
fn runnable_field(text: &[u8]) -> Option<u32> {
    nth_field(text, 3)?.split_once('/')?.0.parse().ok()
}

/// The number of CPUs in a kernel CPU list ("0-3,6,8-9").
fn cpu_count(list: &str) -> Option<u32> {
    let mut count = 0;
    for range in list.trim().split(',') {
        let (first, last) = match range.split_once('-') {
            Some((first, last)) => (first.parse::<u32>().ok()?, last.parse::<u32>().ok()?),
            None => {
                let cpu = range.parse::<u32>().ok()?;
                (cpu, cpu)
            }
        };
        count += last.checked_sub(first)? + 1;
    }
    (count > 0).then_some(count)
}

/// The time waiting on a run queue, from `schedstat`'s text: "run_time wait_time
/// timeslices", in nanoseconds.
fn wait_field(text: &[u8]) -> Option<u64> {
    nth_field(text, 1)?.parse().ok()
}

/// The time on a CPU, from `schedstat`'s text (see [`wait_field`]).
fn run_field(text: &[u8]) -> Option<u64> {
    nth_field(text, 0)?.parse().ok()
}

/// The `n`th whitespace-separated field (from 0) of a kernel statistics file's text.
fn nth_field(text: &[u8], n: usize) -> Option<&str> {
    std::str::from_utf8(text)
        .ok()?
        .split_ascii_whitespace()
        .nth(n)
}

/// Runs on each worker: waits (without polling) until one of the worker's sessions reads
/// something, then keeps the worker from sleeping until `busy_poll` has passed with no
/// session reading anything ([`poll_while_busy`]). With `busy_poll` off it waits for a
/// reload to change it, with no timer and no wake-up per event. Without
/// `/proc/thread-self/schedstat` it never polls: it could not tell when polling takes CPU
/// time that others need.
async fn spin(busy_poll: Arc<BusyPoll>) {
    let Some(mut contention) = Contention::open() else {
        if !busy_poll.window().is_zero() && current() == 1 {
            tracing::info!(
                "busy_poll: no /proc/thread-self/schedstat here; workers sleep between events"
            );
        }
        return;
    };
    let mut back_off = CONTENTION_BACK_OFF;
    loop {
        if busy_poll.window().is_zero() {
            // Registered before looking again, so a reload in between is not missed.
            let changed = busy_poll.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if busy_poll.window().is_zero() {
                changed.await;
            }
            continue;
        }
        std::future::poll_fn(|cx| {
            if BUSY.replace(false) {
                Poll::Ready(())
            } else {
                SPINNER.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await;
        if poll_while_busy(busy_poll.window(), &mut contention).await {
            back_off = CONTENTION_BACK_OFF;
        } else {
            crate::timer::sleep(back_off).await;
            back_off = (back_off * 2).min(MAX_BACK_OFF);
            contention.restart();
        }
    }
}

/// What a polling worker has seen of the contention for CPUs since it last judged it
/// (every [`CONTENTION_CHECK`] of polling). The window runs across polling episodes: under
/// steady traffic with short gaps, each episode may be far shorter than the window.
struct Contention {
    stat: SchedStat,
    queues: Option<RunQueues>,
    /// When the window started, and the thread's wait for a CPU then.
    since: (Instant, u64),
    /// The last run-queue sample.
    sampled: Instant,
    /// Run-queue samples in the window, and how many found the CPUs crowded.
    samples: u32,
    crowded: u32,
}

impl Contention {
    fn open() -> Option<Self> {
        let stat = SchedStat::open()?;
        let now = Instant::now();
        let waited = stat.waited()?;
        Some(Self {
            stat,
            queues: RunQueues::open(),
            since: (now, waited),
            sampled: now,
            samples: 0,
            crowded: 0,
        })
    }

    /// Starts a new window (after a back-off, whose sleep says nothing).
    fn restart(&mut self) {
        let now = Instant::now();
        self.since = (now, self.stat.waited().unwrap_or(self.since.1));
        self.sampled = now;
        (self.samples, self.crowded) = (0, 0);
    }

    /// Samples the run queues if one is due; at the end of a window, false if the worker
    /// shares its CPU: it waited for it for more than [`MAX_WAIT_PERCENT`] of the window,
    /// or most samples found the CPUs crowded ([`RunQueues::crowded`]).
    fn check(&mut self, now: Instant) -> bool {
        if let Some(queues) = &mut self.queues {
            if now.duration_since(self.sampled) >= CROWD_SAMPLE {
                self.sampled = now;
                self.samples += 1;
                self.crowded += u32::from(queues.crowded().unwrap_or(false));
            }
        }
        let window = now.duration_since(self.since.0);
        if window < CONTENTION_CHECK {
            return true;
        }
        let Some(waited) = self.stat.waited() else {
            return false;
        };
        let own_wait = u128::from(waited.saturating_sub(self.since.1)) * 100
            > window.as_nanos() * MAX_WAIT_PERCENT;
        let crowded = self.crowded * 2 > self.samples;
        self.since = (now, waited);
        (self.samples, self.crowded) = (0, 0);
        !(own_wait || crowded)
    }
}

/// Keeps the worker from sleeping until `window` passes with no session reading anything
/// (true), or until the worker turns out to share its CPU ([`Contention::check`]: false).
/// Yielding wakes this session for the executor's next batch, which comes after a look at
/// the reactor without a timeout (`epoll_wait` with 0), so the sessions' own events come
/// first.
async fn poll_while_busy(window: Duration, contention: &mut Contention) -> bool {
    let mut last = Instant::now();
    loop {
        tokio::task::yield_now().await;
        let now = Instant::now();
        if BUSY.replace(false) {
            last = now;
        } else if now.duration_since(last) >= window {
            return true;
        }
        if !contention.check(now) {
            return false;
        }
    }
}

/// Number of workers for this machine: one per core the process may use.
pub fn default_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A worker's `main` ([`executor::Executor::run`]): hands each client sent to worker
/// `index` to the executor as a session running `serve`, tracked by `sessions` (through its
/// [`Seat`]); once no more come, waits for the sessions to end. Returns at once when `stop`
/// is cancelled.
async fn take_clients<F, Fut>(
    mut rx: mpsc::UnboundedReceiver<Accepted>,
    serve: Arc<F>,
    placement: Arc<Placement>,
    index: usize,
    sessions: TaskTracker,
    stop: CancellationToken,
) where
    F: Fn(std::net::TcpStream, SocketAddr, Seat) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => return,
            next = rx.recv() => next,
        };
        let Some((stream, peer, permit)) = next else {
            break;
        };
        // Given back when the session ends, or here if it never starts.
        let place = Place {
            placement: Arc::clone(&placement),
            worker: index,
            _permit: permit,
        };
        let seat = Seat {
            _place: place,
            _tracked: sessions.token(),
        };
        // The session's own future is the executor's task, with no wrapper around it to
        // poll through on every wake-up: it holds its seat until it ends.
        executor::add(Box::pin(serve(stream, peer, seat)));
    }
    // No more clients: let this worker's sessions finish (or be stopped).
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = sessions.wait() => {}
    }
}

/// What a session's future holds while it runs, given back when it ends (or panics): its
/// place on its worker, and its entry in the tracker of sessions (which `Workers`'
/// shutdown waits for).
pub struct Seat {
    _place: Place,
    _tracked: TaskTrackerToken,
}

/// A session's place on its worker: counted in the worker's sessions, and the client's
/// slot under `client.max_connections`, until the session ends (or panics).
struct Place {
    placement: Arc<Placement>,
    /// The worker it started on.
    worker: usize,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Place {
    /// Uncounted on the worker it ends on, which may not be the one it started on.
    fn drop(&mut self) {
        let worker = current()
            .checked_sub(1)
            .filter(|&here| here < self.placement.count())
            .unwrap_or(self.worker);
        self.placement.left(worker);
    }
}

/// A new client for a worker: the socket (detached from the accepting runtime), the peer,
/// and the client's slot under `client.max_connections`, held until the session ends.
type Accepted = (std::net::TcpStream, SocketAddr, OwnedSemaphorePermit);

/// The running workers.
#[derive(Debug)]
pub struct Workers {
    senders: Vec<mpsc::UnboundedSender<Accepted>>,
    placement: Arc<Placement>,
    threads: Vec<std::thread::JoinHandle<()>>,
    stop: CancellationToken,
}

impl Workers {
    /// Starts `placement.count()` workers. Each runs `serve(stream, peer, seat)` for the
    /// clients handed to it, in the worker's executor and tracked by `sessions`, until
    /// [`Self::shutdown`], polling without sleeping for `busy_poll` after its last
    /// traffic ([`spin`]). Which of them take new clients follows the load once
    /// [`Placement::follow_load`] runs.
    pub fn start<F, Fut>(
        placement: Arc<Placement>,
        sessions: TaskTracker,
        busy_poll: Arc<BusyPoll>,
        serve: F,
    ) -> Result<Self, WorkerError>
    where
        F: Fn(std::net::TcpStream, SocketAddr, Seat) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let serve = Arc::new(serve);
        let count = placement.count();
        let stop = CancellationToken::new();
        let mut senders = Vec::with_capacity(count);
        let mut threads = Vec::with_capacity(count);
        crate::timer::start_for_workers()?;
        // What a session starts with tokio (a connect, a task) goes to the runtime that
        // starts the workers; their own sockets are on their own reactors.
        let runtime = tokio::runtime::Handle::current();
        for index in 0..count {
            let (tx, rx) = mpsc::unbounded_channel::<Accepted>();
            let runtime = runtime.clone();
            let (serve, placement, stop, sessions, busy_poll) = (
                Arc::clone(&serve),
                Arc::clone(&placement),
                stop.clone(),
                sessions.clone(),
                Arc::clone(&busy_poll),
            );
            let thread = std::thread::Builder::new()
                .name(format!("pgway-worker-{index}"))
                .spawn(move || {
                    REACTOR.with(|r| r.set(index + 1));
                    PLACED.with(|placed| placed.set((Arc::clone(&placement), index)).ok());
                    placement.open_cpu_clock(index);
                    crate::timer::use_timer_runtime();
                    let _runtime = runtime.enter();
                    // Polling runs beside the sessions, in a slot of their executor.
                    executor::add(Box::pin(spin(busy_poll)));
                    // The accept loop is the executor's `main`: the worker ends with it.
                    let main = Box::pin(take_clients(
                        rx,
                        serve,
                        Arc::clone(&placement),
                        index,
                        sessions,
                        stop,
                    ));
                    if let Err(cause) = executor::Executor::run(main, Some((placement, index))) {
                        tracing::error!(%cause, worker = index, "cannot start a worker's reactor");
                    }
                })?;
            senders.push(tx);
            threads.push(thread);
        }
        Ok(Self {
            senders,
            placement,
            threads,
            stop,
        })
    }

    /// Hands a new client to the worker with the fewest sessions among those that take
    /// sessions now.
    pub fn dispatch(
        &self,
        stream: tokio::net::TcpStream,
        peer: SocketAddr,
        permit: OwnedSemaphorePermit,
    ) {
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(cause) => {
                warn!(%cause, %peer, "cannot detach client socket");
                return;
            }
        };
        let index = self.placement.place_new();
        let sent = match self.senders.get(index) {
            Some(sender) => sender.send((stream, peer, permit)).is_ok(),
            None => false,
        };
        if !sent {
            self.placement.left(index);
            warn!(%peer, "worker gone; client dropped");
        }
    }

    /// Takes no more clients; sessions already running go on until they end.
    pub fn close(&mut self) {
        self.senders.clear();
    }

    /// Stops the workers (ending any session still running) and waits for their threads.
    pub async fn shutdown(mut self) {
        self.close();
        self.stop.cancel();
        let threads = std::mem::take(&mut self.threads);
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}

impl Drop for Workers {
    /// Dropped without [`Workers::shutdown`] (say, `run` abandoned by its caller): the
    /// threads still end, with their sessions.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_changes_the_window_the_workers_read() {
        let busy_poll = BusyPoll::new(Duration::from_micros(200));
        assert_eq!(busy_poll.window(), Duration::from_micros(200));
        busy_poll.set(Duration::ZERO);
        assert!(busy_poll.window().is_zero());
        busy_poll.set(Duration::from_millis(1));
        assert_eq!(busy_poll.window(), Duration::from_millis(1));
    }

    #[test]
    fn the_wait_is_schedstats_second_field_and_the_run_time_its_first() {
        assert_eq!(wait_field(b"1457549 230 17\n"), Some(230));
        assert_eq!(wait_field(b"1457549\n"), None);
        assert_eq!(wait_field(b"x y z"), None);
        assert_eq!(run_field(b"1457549 230 17\n"), Some(1_457_549));
        assert_eq!(run_field(b"x y z"), None);
    }

    #[test]
    fn runnable_threads_and_cpus_are_read_from_the_kernels_text() {
        assert_eq!(runnable_field(b"7.72 4.62 3.17 6/111 1545\n"), Some(6));
        assert_eq!(runnable_field(b"7.72 4.62 3.17 6 1545\n"), None);
        assert_eq!(runnable_field(b"7.72 4.62"), None);
        assert_eq!(cpu_count("0-1\n"), Some(2));
        assert_eq!(cpu_count("0"), Some(1));
        assert_eq!(cpu_count("0-3,6,8-9"), Some(7));
        assert_eq!(cpu_count("3-1"), None);
        assert_eq!(cpu_count(""), None);
        // This machine's own: at least this thread is runnable while it reads.
        let mut queues = RunQueues::open().expect("/proc/loadavg and the CPU list");
        assert!(queues.cpus >= 1);
        assert!(queues.crowded().is_some());
    }

    #[test]
    fn a_threads_wait_for_a_cpu_is_read_and_never_goes_back() {
        // Linux has had the file since 2.6.x (with schedstats or task delay accounting).
        let Some(stat) = SchedStat::open() else {
            panic!("no /proc/thread-self/schedstat: busy_poll would never poll here");
        };
        let first = stat.waited().expect("first read");
        std::thread::yield_now();
        assert!(stat.waited().expect("second read") >= first);
    }

    /// Serves a test client on a worker: answers each read with the number of the
    /// worker's reactor, then moves where the placement says, its socket with it.
    async fn answer_where(stream: std::net::TcpStream) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut io) = crate::net::reactor::adopt(stream) else {
            return;
        };
        let mut buf = [0u8; 16];
        while let Ok(1..) = io.read(&mut buf).await {
            if io.write_all(&[b'0' + current() as u8]).await.is_err() {
                return;
            }
            if let Some(to) = destination() {
                if move_to(to).await {
                    match io.rebind() {
                        Ok(moved) => io = moved,
                        Err(_) => return,
                    }
                }
            }
        }
    }

    /// Sends a byte and reads which worker answered (1 or 2).
    async fn ask(client: &mut tokio::net::TcpStream) -> u8 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        client.write_all(b"?").await.expect("send");
        let mut answer = [0u8; 1];
        client.read_exact(&mut answer).await.expect("answer");
        answer[0] - b'0'
    }

    #[test]
    fn sessions_move_to_the_workers_that_take_sessions_with_their_sockets() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let placement = Arc::new(Placement::new(2));
            let sessions = TaskTracker::new();
            let workers = Workers::start(
                Arc::clone(&placement),
                sessions.clone(),
                Arc::new(BusyPoll::new(Duration::ZERO)),
                |stream, _peer, seat| async move {
                    let _seat = seat;
                    answer_where(stream).await;
                },
            )
            .expect("workers");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            let slots = Arc::new(tokio::sync::Semaphore::new(8));
            let mut clients = Vec::new();
            for _ in 0..2 {
                let client = tokio::net::TcpStream::connect(addr).await.expect("connect");
                let (stream, peer) = listener.accept().await.expect("accept");
                let permit = Arc::clone(&slots).acquire_owned().await.expect("slot");
                workers.dispatch(stream, peer, permit);
                clients.push(client);
            }
            // Both workers take sessions: one client on each.
            assert_eq!(ask(&mut clients[0]).await, 1);
            assert_eq!(ask(&mut clients[1]).await, 2);
            assert_eq!(placement.sessions(), [1, 1]);

            // Only the first takes sessions: the second's session moves after its answer
            // (the one just given, or the next: it may look before or after the change),
            // and is served by the first from then on.
            placement.set_active(1, false);
            let _ = ask(&mut clients[1]).await;
            assert_eq!(ask(&mut clients[1]).await, 1);
            assert_eq!(ask(&mut clients[0]).await, 1);
            assert_eq!(placement.sessions(), [2, 0]);

            // Both again, spreading: one session moves back to the second.
            placement.set_active(2, true);
            let _ = ask(&mut clients[0]).await;
            let _ = ask(&mut clients[1]).await;
            let mut served = [ask(&mut clients[0]).await, ask(&mut clients[1]).await];
            served.sort_unstable();
            assert_eq!(served, [1, 2]);
            assert_eq!(placement.sessions(), [1, 1]);

            drop(clients);
            sessions.close();
            crate::timer::timeout(Duration::from_secs(10), sessions.wait())
                .await
                .expect("the sessions end when their clients leave");
            assert_eq!(placement.sessions(), [0, 0]);
            workers.shutdown().await;
        });
    }
}
