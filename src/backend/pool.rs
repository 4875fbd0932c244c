//! Transaction pools: one per (node, database, user), bounded by `pool.size`.
//!
//! A slot stands for one server connection in use or being made, so the bound holds
//! whether a connection is being created, lent or parked (see [`Slots`]). A lent
//! connection is a [`PooledConn`]: [`PooledConn::release`] parks it for the next client;
//! dropping it instead closes the connection (which makes the server roll back anything
//! open) and frees its slot.
//!
//! Connections are recycled as pgbouncer does, never in the middle of a transaction: one
//! older than `pool.server_lifetime` is closed when it is released instead of parked, and
//! parked ones unused for `pool.server_idle_timeout` (or past their lifetime) are closed
//! by the next [`Pool::acquire`] that looks at them and by [`Pools::sweep`].

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{ready, Context, Poll, Waker};

use arc_swap::ArcSwap;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::server::{BackendError, Login, Secret, ServerConn};
use crate::config::PoolConfig;
use crate::metrics::WaitHistogram;
use crate::net::{Connector, TcpConnector};
// What the pools' mutexes guard stays consistent after a panic: the maps change by one
// insert or remove, and a pool's counts only where nothing can panic between them.
use crate::sync::lock;

/// Errors when borrowing a server connection.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// Every connection stayed busy for `pool.wait_timeout` (SQLSTATE 53300).
    #[error("no server connection to {addr} became free within {waited:?}")]
    Timeout {
        /// The node.
        addr: String,
        /// How long the client waited.
        waited: std::time::Duration,
    },
    /// Creating a new connection failed.
    #[error(transparent)]
    Connect(#[from] BackendError),
}

/// What a pool is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// Node `host:port`.
    pub addr: String,
    /// Database name.
    pub database: String,
    /// Role name.
    pub user: String,
}

/// One pool.
pub struct Pool {
    key: PoolKey,
    /// How to log in as `key.user`: replaced by a reload or by the user's next login
    /// through `auth_query`; read for each new connection.
    secret: Mutex<Secret>,
    /// `[pool]`, shared by every pool and swapped by a reload.
    settings: Arc<ArcSwap<PoolConfig>>,
    connector: Arc<dyn Connector>,
    /// The parked connections, the slots and the queue: one lock, taken once to lend a
    /// connection and once to park it.
    slots: Mutex<Slots>,
    params: OnceLock<Arc<Vec<(String, String)>>>,
    /// Shared by every pool: how long clients waited for a slot.
    waits: Arc<WaitHistogram>,
    /// `pool.server_lifetime` and `pool.server_idle_timeout`, read on every lend and
    /// return: kept here (set again by a reload) rather than read through `settings`.
    lifetimes: Lifetimes,
}

/// What a pool holds.
///
/// A slot stands for a server connection lent or being made, or for one handed to a
/// queued client that has not taken it yet; at most `size` are held. A parked connection
/// holds none, so lending and parking one move it between `idle` and a [`PooledConn`] and
/// change one count. A client that finds no free slot, or others queued for one before
/// it, queues; a slot freed while clients queue is handed to the oldest ([`Self::grant`]),
/// which is woken, so they are served in the order they came, as pgbouncer serves them.
/// A client still queued at its deadline is taken out by [`Pools::expire_waits`]
/// ([`Self::expire`]) and woken to give up: no wait sets a timer of its own.
struct Slots {
    /// Parked connections, the most recently parked last. Boxed, like a lent one, so
    /// lending and parking move a pointer rather than the whole connection.
    #[expect(
        clippy::vec_box,
        reason = "a connection moves between this list and PooledConn on every transaction"
    )]
    idle: Vec<Box<ServerConn>>,
    /// `pool.size`, or the user's `pool_size`.
    size: usize,
    /// Slots held.
    held: usize,
    /// Server connections open, lent or parked (a new one counts once made): more than
    /// `size` only after the pool shrank, until the extra ones come back to be closed.
    open: usize,
    /// Clients queued for a slot, the oldest first. Tickets rise, so a client's entry is
    /// found by binary search, and a client has been handed a slot once the first one
    /// left is younger (see [`Self::granted_to`]), unless its wait expired.
    queue: VecDeque<Waiter>,
    /// Tickets of clients taken out of the queue at their deadline ([`Self::expire`]),
    /// until each one sees it ([`Self::claim`], [`Self::leave`]).
    expired: Vec<u64>,
    /// The ticket of the next client to queue.
    next_ticket: u64,
    /// Slots handed to queued clients and not taken yet.
    granted: usize,
    /// Connections lent without a wait (the pool-wait histogram's first bucket): counted
    /// here, under the lock a lend takes anyway, rather than in the histogram shared by
    /// every pool, which would be an atomic add per transaction on a line that every
    /// worker writes.
    at_once: u64,
}

impl Slots {
    /// A slot is free for a client that has not queued: one is, and nobody queues.
    fn free(&self) -> bool {
        self.queue.is_empty() && self.held < self.size
    }

    /// Takes a slot for a client that has not queued, if one is [`Self::free`].
    fn take(&mut self) -> bool {
        let free = self.free();
        if free {
            self.held += 1;
        }
        free
    }

    /// Queues a client woken by `waker`, until `deadline` at the latest (`None`: no end);
    /// returns its ticket.
    fn queue(&mut self, waker: &Waker, deadline: Option<Instant>) -> u64 {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.queue.push_back(Waiter {
            ticket,
            deadline,
            waker: waker.clone(),
        });
        ticket
    }

    /// Takes the clients whose deadline is not after `now` out of the queue; returns
    /// their wakers, for the caller to wake once the lock is let go.
    fn expire(&mut self, now: Instant) -> Vec<Waker> {
        let mut woken = Vec::new();
        let expired = &mut self.expired;
        self.queue.retain_mut(|waiter| {
            let due = waiter.due(now);
            if due {
                expired.push(waiter.ticket);
                woken.push(std::mem::replace(&mut waiter.waker, Waker::noop().clone()));
            }
            !due
        });
        woken
    }

    /// Sees whether the wait of the client queued with `ticket` expired (it is out of the
    /// queue then).
    fn seen_expired(&mut self, ticket: u64) -> bool {
        let Some(at) = self.expired.iter().position(|t| *t == ticket) else {
            return false;
        };
        self.expired.swap_remove(at);
        true
    }

    /// Hands a free slot to the oldest client queued; returns its waker, for the caller
    /// to wake once the lock is let go.
    fn grant(&mut self) -> Option<Waker> {
        if self.held >= self.size {
            return None;
        }
        let waiter = self.queue.pop_front()?;
        self.held += 1;
        self.granted += 1;
        Some(waiter.waker)
    }

    /// Whether a slot was handed to the client queued with `ticket`: only a grant takes
    /// a client out of the queue while it waits, and grants go to the oldest first.
    fn granted_to(&self, ticket: u64) -> bool {
        self.queue.front().is_none_or(|first| first.ticket > ticket)
    }

    /// The client queued with `ticket` takes the slot handed to it, if one was; if not,
    /// it will be woken by `waker`, unless its wait expired.
    fn claim(&mut self, ticket: u64, waker: &Waker) -> Claim {
        if self.seen_expired(ticket) {
            return Claim::Expired;
        }
        if self.granted_to(ticket) {
            self.granted -= 1;
            return Claim::Granted;
        }
        if let Ok(at) = self.queue.binary_search_by_key(&ticket, |w| w.ticket) {
            self.queue[at].waker.clone_from(waker);
        }
        Claim::Waiting
    }

    /// The client queued with `ticket` gives up (it went away): it leaves the queue, or
    /// gives back the slot handed to it (see [`Self::give_back`]).
    fn leave(&mut self, ticket: u64) -> Option<Waker> {
        if self.seen_expired(ticket) {
            return None;
        }
        if self.granted_to(ticket) {
            self.granted -= 1;
            return self.give_back();
        }
        if let Ok(at) = self.queue.binary_search_by_key(&ticket, |w| w.ticket) {
            self.queue.remove(at);
        }
        None
    }

    /// Gives a slot back; it goes on to the oldest client queued, if one is (see
    /// [`Self::grant`]).
    fn give_back(&mut self) -> Option<Waker> {
        self.held -= 1;
        self.grant()
    }

    /// Parks `conn`, giving its slot back, unless the pool holds more connections than its
    /// size (it shrank): then `conn` is returned, to be closed once the lock is let go.
    /// The waker is [`Self::give_back`]'s.
    fn park(&mut self, conn: Box<ServerConn>) -> (Option<Box<ServerConn>>, Option<Waker>) {
        let extra = if self.open > self.size {
            self.open -= 1;
            Some(conn)
        } else {
            self.idle.push(conn);
            None
        };
        (extra, self.give_back())
    }

    /// The parked connection to lend on reactor `here`: the most recently parked one
    /// registered with it, else the most recently parked one. Expired ones found on the
    /// way are closed (see [`Lifetimes::expired`]).
    fn take_idle(
        &mut self,
        here: usize,
        now: Instant,
        lifetimes: &Lifetimes,
    ) -> Option<Box<ServerConn>> {
        loop {
            let at = self
                .idle
                .iter()
                .rposition(|conn| conn.reactor == here)
                .or_else(|| self.idle.len().checked_sub(1))?;
            let conn = self.idle.remove(at);
            if !lifetimes.expired(&conn, now) {
                return Some(conn);
            }
            self.open -= 1;
            tracing::debug!(pid = conn.pid, "closing an expired server connection");
        }
    }
}

/// A client queued for a slot.
#[derive(Debug)]
struct Waiter {
    ticket: u64,
    /// When it stops waiting: `pool.wait_timeout` after it queued (`None`: a timeout
    /// beyond what an `Instant` holds).
    deadline: Option<Instant>,
    waker: Waker,
}

impl Waiter {
    /// Past its deadline at `now`.
    fn due(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|deadline| deadline <= now)
    }
}

/// What a queued client finds when it looks ([`Slots::claim`]).
#[derive(Debug, PartialEq, Eq)]
enum Claim {
    /// A slot was handed to it: it holds it now.
    Granted,
    /// Still queued.
    Waiting,
    /// Its deadline passed first: out of the queue.
    Expired,
}

/// `pool.server_lifetime` and `pool.server_idle_timeout` in nanoseconds (0: never), and
/// a generation that every change bumps: a connection's deadlines
/// ([`crate::backend::server::Deadlines`]) worked out under another generation are
/// worked out again. Also `pool.wait_timeout`, read by every wait for a slot (an atomic
/// load, where `settings` would be a shared reference count's look-up).
#[derive(Debug)]
struct Lifetimes {
    lifetime: AtomicU64,
    idle_timeout: AtomicU64,
    wait_timeout: AtomicU64,
    /// Starts at 1 (a connection's deadlines start at 0: not worked out).
    generation: AtomicU64,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Self {
            lifetime: AtomicU64::new(0),
            idle_timeout: AtomicU64::new(0),
            wait_timeout: AtomicU64::new(0),
            generation: AtomicU64::new(1),
        }
    }
}

impl Lifetimes {
    fn set(&self, settings: &PoolConfig) {
        let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.lifetime
            .store(nanos(settings.server_lifetime), Ordering::Relaxed);
        self.idle_timeout
            .store(nanos(settings.server_idle_timeout), Ordering::Relaxed);
        self.wait_timeout
            .store(nanos(settings.wait_timeout), Ordering::Relaxed);
        // Released after the values: whoever reads this generation (acquire) reads
        // them or newer ones, and newer ones come with a newer generation.
        self.generation.fetch_add(1, Ordering::Release);
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// `since` plus `limit` (`Duration::ZERO`: never).
    fn after(since: Instant, limit: Duration) -> Option<Instant> {
        if limit.is_zero() {
            None
        } else {
            // Beyond what an Instant can hold: never.
            since.checked_add(limit)
        }
    }

    /// When a connection made at `created` is past `pool.server_lifetime`.
    fn retire(&self, created: Instant) -> Option<Instant> {
        Self::after(created, self.lifetime())
    }

    /// When a connection that retires at `retire` and was parked at `parked` is to be
    /// closed rather than lent: the earlier of `retire` and `pool.server_idle_timeout`
    /// after `parked`.
    fn close(&self, retire: Option<Instant>, parked: Instant) -> Option<Instant> {
        earliest(retire, Self::after(parked, self.idle_timeout()))
    }

    fn lifetime(&self) -> Duration {
        Duration::from_nanos(self.lifetime.load(Ordering::Relaxed))
    }

    fn idle_timeout(&self) -> Duration {
        Duration::from_nanos(self.idle_timeout.load(Ordering::Relaxed))
    }

    fn wait_timeout(&self) -> Duration {
        Duration::from_nanos(self.wait_timeout.load(Ordering::Relaxed))
    }

    /// A parked connection to close rather than lend: past its lifetime, or unused for
    /// `pool.server_idle_timeout` (`0s`: never). One comparison when its deadlines were
    /// worked out (at parking) under the lifetimes in force.
    fn expired(&self, conn: &ServerConn, now: Instant) -> bool {
        let due = if conn.deadlines.generation == self.generation() {
            conn.deadlines.close
        } else {
            self.close(self.retire(conn.created), conn.parked)
        };
        due.is_some_and(|due| now >= due)
    }
}

impl std::fmt::Debug for Pool {
    /// Everything but the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("key", &self.key)
            .field("size", &self.size())
            .field("idle", &self.idle_count())
            .finish_non_exhaustive()
    }
}

impl Pool {
    fn new(
        key: PoolKey,
        account: &Account,
        settings: Arc<ArcSwap<PoolConfig>>,
        connector: Arc<dyn Connector>,
        waits: Arc<WaitHistogram>,
    ) -> Self {
        let lifetimes = Lifetimes::default();
        let size = {
            let settings = settings.load();
            lifetimes.set(&settings);
            account.pool_size.unwrap_or(settings.size)
        };
        Self {
            lifetimes,
            waits,
            slots: Mutex::new(Slots {
                idle: Vec::new(),
                size,
                held: 0,
                open: 0,
                queue: VecDeque::new(),
                expired: Vec::new(),
                next_ticket: 0,
                granted: 0,
                at_once: 0,
            }),
            key,
            secret: Mutex::new(account.secret.clone()),
            settings,
            connector,
            params: OnceLock::new(),
        }
    }

    /// The pool's key.
    pub fn key(&self) -> &PoolKey {
        &self.key
    }

    /// Server connections this pool may hold.
    pub fn size(&self) -> usize {
        lock(&self.slots).size
    }

    /// Server connections lent to clients now, or being made for them.
    pub fn lent(&self) -> usize {
        let slots = lock(&self.slots);
        slots.held - slots.granted
    }

    /// Changes how many connections the pool may hold. Growing hands the new slots to
    /// queued clients at once; shrinking closes parked connections beyond the new size
    /// now and lent ones as they come back, so no client is interrupted.
    fn resize(&self, size: usize) {
        let mut wake = Vec::new();
        let extra: Vec<Box<ServerConn>> = {
            let mut slots = lock(&self.slots);
            slots.size = size;
            // The least recently parked go.
            let extra = slots.open.saturating_sub(size).min(slots.idle.len());
            let extra: Vec<_> = slots.idle.drain(..extra).collect();
            slots.open -= extra.len();
            while let Some(waker) = slots.grant() {
                wake.push(waker);
            }
            extra
        };
        drop(extra);
        wake.into_iter().for_each(Waker::wake);
    }

    /// How new connections log in from now on.
    fn set_secret(&self, secret: &Secret) {
        *lock(&self.secret) = secret.clone();
    }

    /// ParameterStatus values from the first connection this pool made, once one was made.
    pub fn params(&self) -> Option<Arc<Vec<(String, String)>>> {
        self.params.get().cloned()
    }

    /// Borrows a parked connection without waiting, if a slot is free (see
    /// [`Slots::free`]) and a usable connection is parked: the per-statement path, one
    /// lock and no future to set up. `None` leaves everything as it was;
    /// [`Self::acquire`] then queues or connects.
    pub fn try_acquire(self: &Arc<Self>) -> Option<PooledConn> {
        let now = crate::clock::now();
        let conn = {
            let mut slots = lock(&self.slots);
            if !slots.free() {
                return None;
            }
            let conn = slots.take_idle(crate::workers::current(), now, &self.lifetimes)?;
            slots.held += 1;
            slots.at_once += 1;
            conn
        };
        let slot = Slot(self);
        let Some(conn) = self.usable(conn).or_else(|| self.take_parked(now)) else {
            // Not lent after all: `acquire` counts this client's lend.
            lock(&self.slots).at_once -= 1;
            return None;
        };
        Some(self.lend(conn, slot, now))
    }

    /// Borrows a connection: a parked one, or a new one if none is. Without a free slot
    /// (see [`Slots::free`]), queues at most `pool.wait_timeout` (`0s`: not at all), as
    /// [`Pools::expire_waits`] times it: a wait sets no timer of its own. The future is
    /// [`Acquire`], one level for a wait (the per-statement path awaits it whenever no
    /// slot is free).
    pub fn acquire(self: &Arc<Self>) -> Acquire<'_> {
        Acquire {
            pool: self,
            step: Step::Start,
        }
    }

    /// [`Acquire`]'s first step, which never waits: a free slot taken, with the parked
    /// connection taken with it if one was (`Ok`), or a ticket in the queue for `waker`
    /// (`Err(Some)`), or neither when the pool waits `timeout` zero (`Err(None)`).
    fn enter(
        &self,
        waker: &Waker,
        now: Instant,
        timeout: Duration,
    ) -> Result<Option<Box<ServerConn>>, Option<u64>> {
        let mut slots = lock(&self.slots);
        if slots.take() {
            slots.at_once += 1;
            Ok(slots.take_idle(crate::workers::current(), now, &self.lifetimes))
        } else if timeout.is_zero() {
            Err(None)
        } else {
            Err(Some(slots.queue(waker, now.checked_add(timeout))))
        }
    }

    /// Whether the client queued with `ticket` holds a slot now: `Ready(Ok)` with the
    /// parked connection taken with it, if one was; `Ready(Err)` once its wait expired
    /// ([`Pools::expire_waits`]); `Pending` until `waker` is woken.
    fn claim(&self, ticket: u64, waker: &Waker) -> Poll<Result<Option<Box<ServerConn>>, ()>> {
        let mut slots = lock(&self.slots);
        match slots.claim(ticket, waker) {
            Claim::Granted => Poll::Ready(Ok(slots.take_idle(
                crate::workers::current(),
                crate::clock::now(),
                &self.lifetimes,
            ))),
            Claim::Expired => Poll::Ready(Err(())),
            Claim::Waiting => Poll::Pending,
        }
    }

    /// Lends the slot the caller holds, with `parked` if it is usable (or another parked
    /// connection), else makes a new connection for it: the future of that is returned.
    fn lend_or_connect(
        self: &Arc<Self>,
        parked: Option<Box<ServerConn>>,
    ) -> Result<PooledConn, Connecting<'_>> {
        // From here the slot belongs to the PooledConn made below, or `Slot` gives it
        // back if none is made.
        let slot = Slot(self);
        let now = crate::clock::now();
        // None was parked when the slot was taken: a new one, without looking again.
        match parked.and_then(|conn| self.usable(conn).or_else(|| self.take_parked(now))) {
            Some(conn) => Ok(self.lend(conn, slot, now)),
            // Boxed: a login's future is large, and the wait for a slot, which nearly
            // every acquire ends with, should not carry it (see `Session::attach_acquired`).
            None => Err(Box::pin(self.connect(slot))),
        }
    }

    /// A new connection for `slot`.
    async fn connect(self: &Arc<Self>, slot: Slot<'_>) -> Result<PooledConn, PoolError> {
        let secret = lock(&self.secret).clone();
        let login = Login {
            addr: &self.key.addr,
            user: &self.key.user,
            secret: &secret,
            database: &self.key.database,
        };
        let timeout = self.settings.load().connect_timeout;
        let conn = ServerConn::connect(login, &*self.connector, timeout).await?;
        let _ = self.params.set(Arc::new(conn.params.clone()));
        lock(&self.slots).open += 1;
        Ok(self.lend(Box::new(conn), slot, Instant::now()))
    }

    /// A client queued at `started` waited `timeout` in vain.
    fn timed_out(&self, started: Instant, timeout: Duration) -> PoolError {
        self.waits
            .observe(crate::clock::now().saturating_duration_since(started));
        PoolError::Timeout {
            addr: self.key.addr.clone(),
            waited: timeout,
        }
    }

    /// Takes the clients queued past their deadline at `now` out of the queue and wakes
    /// them (each one gives up with [`PoolError::Timeout`]).
    fn expire_waits(&self, now: Instant) {
        let woken = lock(&self.slots).expire(now);
        woken.into_iter().for_each(Waker::wake);
    }

    /// `conn`, taken from the parked ones, if it can be lent on this thread: the server
    /// has not closed it (or written to it) while it was parked, and it could be moved
    /// to this thread's reactor. Checked on the reactor it is registered with, before
    /// any move. One that cannot is closed.
    fn usable(&self, mut conn: Box<ServerConn>) -> Option<Box<ServerConn>> {
        let usable = if conn.io.is_stale() {
            None
        } else {
            conn.adopt()
                .map_err(|cause| {
                    tracing::debug!(%cause, "cannot move a server connection between workers");
                })
                .ok()
        };
        if usable.is_none() {
            lock(&self.slots).open -= 1;
        }
        usable
    }

    /// Takes a parked connection fit to lend, for a client holding a slot: see
    /// [`Slots::take_idle`] and [`Self::usable`].
    fn take_parked(&self, now: Instant) -> Option<Box<ServerConn>> {
        let here = crate::workers::current();
        loop {
            let conn = lock(&self.slots).take_idle(here, now, &self.lifetimes)?;
            if let Some(conn) = self.usable(conn) {
                return Some(conn);
            }
        }
    }

    fn lend(self: &Arc<Self>, conn: Box<ServerConn>, slot: Slot<'_>, now: Instant) -> PooledConn {
        std::mem::forget(slot);
        PooledConn {
            conn: Some(conn),
            pool: Arc::clone(self),
            lent_at: now,
        }
    }

    /// Closes every idle connection (the node changed role or went away).
    pub fn clear_idle(&self) {
        let idle = {
            let mut slots = lock(&self.slots);
            let idle = std::mem::take(&mut slots.idle);
            slots.open -= idle.len();
            idle
        };
        drop(idle);
    }

    /// Parks `conn` as of `now`, working out its deadlines first (see
    /// [`crate::backend::server::Deadlines`]). One past `pool.server_lifetime`, or beyond
    /// the pool's size (it shrank), is dropped instead, which closes it. Either way its
    /// slot is free again.
    fn park(&self, mut conn: Box<ServerConn>, now: Instant) {
        let lifetimes = &self.lifetimes;
        let generation = lifetimes.generation();
        if conn.deadlines.generation != generation {
            conn.deadlines.retire = lifetimes.retire(conn.created);
        }
        if conn.deadlines.retire.is_some_and(|retire| now >= retire) {
            tracing::debug!(addr = %self.key.addr, pid = conn.pid, "closing a server connection past pool.server_lifetime");
            self.close(conn);
            return;
        }
        conn.parked = now;
        conn.deadlines.generation = generation;
        conn.deadlines.close = lifetimes.close(conn.deadlines.retire, now);
        let (extra, wake) = lock(&self.slots).park(conn);
        drop(extra);
        wake_up(wake);
    }

    /// Closes `conn`, lent until now, and frees its slot.
    fn close(&self, conn: Box<ServerConn>) {
        let wake = {
            let mut slots = lock(&self.slots);
            slots.open -= 1;
            slots.give_back()
        };
        drop(conn);
        wake_up(wake);
    }

    /// Closes the parked connections that [`Lifetimes::expired`] says are due; returns how
    /// many. The sockets are closed after the list is unlocked.
    pub fn close_expired(&self) -> usize {
        let now = Instant::now();
        let expired: Vec<Box<ServerConn>> = {
            let mut slots = lock(&self.slots);
            let (gone, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut slots.idle)
                .into_iter()
                .partition(|conn| self.lifetimes.expired(conn, now));
            slots.idle = keep;
            slots.open -= gone.len();
            gone
        };
        expired.len()
    }

    /// Connections parked and ready.
    pub fn idle_count(&self) -> usize {
        lock(&self.slots).idle.len()
    }
}

/// A slot taken from a pool and not yet handed to a [`PooledConn`]; gives it back if
/// none is made (connecting failed).
struct Slot<'p>(&'p Pool);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let wake = lock(&self.0.slots).give_back();
        wake_up(wake);
    }
}

/// Wakes the client a slot was handed to, if one was (after the pool's lock is let go).
fn wake_up(waker: Option<Waker>) {
    if let Some(waker) = waker {
        waker.wake();
    }
}

/// A new connection being made for a slot ([`Pool::lend_or_connect`]).
type Connecting<'p> = Pin<Box<dyn Future<Output = Result<PooledConn, PoolError>> + Send + 'p>>;

/// [`Pool::acquire`]'s future: written out rather than an `async fn`, so that a wait for
/// a slot is one level of future, and one that is dropped while queued leaves the queue
/// (see [`Slots::leave`]).
#[must_use = "a future does nothing unless awaited"]
pub struct Acquire<'p> {
    pool: &'p Arc<Pool>,
    step: Step<'p>,
}

/// Where an [`Acquire`] stands.
enum Step<'p> {
    Start,
    /// In the queue with `ticket` since `since`, for at most `timeout`.
    Queued {
        ticket: u64,
        since: Instant,
        timeout: Duration,
    },
    Connecting(Connecting<'p>),
    Done,
}

impl Future for Acquire<'_> {
    type Output = Result<PooledConn, PoolError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let pool = this.pool;
        let parked = match &mut this.step {
            Step::Start => {
                let now = crate::clock::now();
                let timeout = pool.lifetimes.wait_timeout();
                match pool.enter(cx.waker(), now, timeout) {
                    Ok(parked) => parked,
                    Err(Some(ticket)) => {
                        // The queue holds this poll's waker: nothing a poll would see
                        // can change before it is woken.
                        this.step = Step::Queued {
                            ticket,
                            since: now,
                            timeout,
                        };
                        return Poll::Pending;
                    }
                    Err(None) => {
                        this.step = Step::Done;
                        return Poll::Ready(Err(pool.timed_out(now, timeout)));
                    }
                }
            }
            Step::Queued {
                ticket,
                since,
                timeout,
            } => {
                let (since, timeout) = (*since, *timeout);
                let claimed = ready!(pool.claim(*ticket, cx.waker()));
                this.step = Step::Done;
                let Ok(parked) = claimed else {
                    return Poll::Ready(Err(pool.timed_out(since, timeout)));
                };
                pool.waits
                    .observe(crate::clock::now().saturating_duration_since(since));
                parked
            }
            Step::Connecting(connecting) => {
                let made = ready!(connecting.as_mut().poll(cx));
                this.step = Step::Done;
                return Poll::Ready(made);
            }
            Step::Done => panic!("Acquire polled after it completed"),
        };
        this.step = Step::Done;
        match pool.lend_or_connect(parked) {
            Ok(conn) => Poll::Ready(Ok(conn)),
            Err(mut connecting) => {
                let polled = connecting.as_mut().poll(cx);
                if polled.is_pending() {
                    this.step = Step::Connecting(connecting);
                }
                polled
            }
        }
    }
}

impl Drop for Acquire<'_> {
    /// A client that goes away while queued leaves the queue, or gives back the slot
    /// handed to it.
    fn drop(&mut self) {
        if let Step::Queued { ticket, .. } = self.step {
            let wake = lock(&self.pool.slots).leave(ticket);
            wake_up(wake);
        }
    }
}

/// The earlier of two deadlines (`None`: never).
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

/// A borrowed server connection. Dropping it closes the connection; see [`Self::release`].
#[derive(Debug)]
pub struct PooledConn {
    conn: Option<Box<ServerConn>>,
    /// Holds one of the pool's slots (given back when parked or closed).
    pool: Arc<Pool>,
    /// When it was lent (the clock read that also judged its age).
    pub lent_at: Instant,
}

impl Drop for PooledConn {
    fn drop(&mut self) {
        // Dropped while lent (`release` parks it instead): closed.
        if let Some(conn) = self.conn.take() {
            self.pool.close(conn);
        }
    }
}

impl PooledConn {
    /// Parks the connection for the next client. Call only when the server is idle
    /// (ReadyForQuery `I`) and nothing is outstanding on it.
    pub fn release(self) {
        self.release_at(Instant::now());
    }

    /// [`Self::release`] with the clock read by the caller.
    pub fn release_at(mut self, now: Instant) {
        if let Some(conn) = self.conn.take() {
            self.pool.park(conn, now);
        }
    }

    /// The pool this connection came from.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }
}

impl Deref for PooledConn {
    type Target = ServerConn;
    #[expect(
        clippy::expect_used,
        reason = "`conn` is Some until `release` consumes the PooledConn"
    )]
    fn deref(&self) -> &ServerConn {
        // Invariant: `conn` is Some until `release` consumes self.
        self.conn.as_deref().expect("PooledConn used after release")
    }
}

impl DerefMut for PooledConn {
    #[expect(
        clippy::expect_used,
        reason = "`conn` is Some until `release` consumes the PooledConn"
    )]
    fn deref_mut(&mut self) -> &mut ServerConn {
        self.conn
            .as_deref_mut()
            .expect("PooledConn used after release")
    }
}

/// How pgway logs in to the servers as one user, and that user's pool size.
#[derive(Clone, Debug)]
pub struct Account {
    /// Password or SCRAM keys.
    pub secret: Secret,
    /// `pool_size` from the user's `[[users]]` entry, else `pool.size`.
    pub pool_size: Option<usize>,
}

impl Account {
    /// The same secret and size (a user from `auth_query` logging in again with the
    /// same password).
    fn same_as(&self, other: &Account) -> bool {
        self.pool_size == other.pool_size
            && match (&self.secret, &other.secret) {
                (Secret::Password(a), Secret::Password(b)) => a.password() == b.password(),
                (Secret::Scram(a), Secret::Scram(b)) => a == b,
                _ => false,
            }
    }
}

/// Every pool, created on first use.
#[derive(Debug)]
pub struct Pools {
    settings: Arc<ArcSwap<PoolConfig>>,
    /// How each user logs in to the servers (users pgway has no account for log in with
    /// an empty password, which a server that wants one refuses).
    accounts: Mutex<HashMap<String, Account>>,
    connector: Arc<dyn Connector>,
    /// How pgway's own control connections (health checks, catalog, the cache's stream)
    /// reach the servers.
    control: Arc<dyn Connector>,
    /// How long clients waited for a slot, over every pool.
    waits: Arc<WaitHistogram>,
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
}

impl Pools {
    /// No pools yet; each is created with `settings` when first asked for, and connects
    /// over TCP.
    pub fn new(settings: PoolConfig) -> Self {
        Self::with_connector(settings, Arc::new(TcpConnector))
    }

    /// Pools whose connections `connector` opens, and so does every other connection
    /// pgway makes to the servers ([`Self::control_connector`]): `[server_tls]`'s choice.
    pub fn over(settings: PoolConfig, connector: Arc<dyn Connector>) -> Self {
        Self {
            control: Arc::clone(&connector),
            ..Self::with_connector(settings, connector)
        }
    }

    /// Pools whose connections `connector` opens (tests: in-memory streams), while
    /// control connections use plain TCP.
    pub fn with_connector(settings: PoolConfig, connector: Arc<dyn Connector>) -> Self {
        Self {
            settings: Arc::new(ArcSwap::from_pointee(settings)),
            accounts: Mutex::new(HashMap::new()),
            connector,
            control: Arc::new(TcpConnector),
            waits: Arc::new(WaitHistogram::default()),
            pools: Mutex::new(HashMap::new()),
        }
    }

    /// Sets how `user` logs in and the size of its pools, for pools made from now on and
    /// those that exist (their next connections; a smaller size applies as connections
    /// come back).
    pub fn set_account(&self, user: &str, account: Account) {
        if lock(&self.accounts)
            .get(user)
            .is_some_and(|known| known.same_as(&account))
        {
            return;
        }
        self.apply_account(user, account);
    }

    /// [`Self::set_account`], also when the account is the one known (`pool.size` may
    /// have changed).
    fn apply_account(&self, user: &str, account: Account) {
        let size = account.pool_size.unwrap_or(self.settings.load().size);
        for pool in self.all().iter().filter(|p| p.key.user == user) {
            pool.set_secret(&account.secret);
            if pool.size() != size {
                pool.resize(size);
            }
        }
        lock(&self.accounts).insert(user.to_owned(), account);
    }

    /// A reload: new `[pool]` settings, and the accounts of the `[[users]]` entries (the
    /// accounts of other users, learned through `auth_query`, stay).
    pub fn reconfigure(&self, settings: PoolConfig, accounts: Vec<(String, Account)>) {
        self.settings.store(Arc::new(settings));
        let settings = self.settings.load();
        for pool in self.all() {
            pool.lifetimes.set(&settings);
        }
        let mut known: HashMap<String, Account> = lock(&self.accounts).clone();
        for (user, account) in accounts {
            known.insert(user, account);
        }
        for (user, account) in known {
            self.apply_account(&user, account);
        }
    }

    /// How pgway's control connections reach the servers (the pools' connector, unless
    /// the pools were made [`Self::with_connector`]).
    pub fn control_connector(&self) -> Arc<dyn Connector> {
        Arc::clone(&self.control)
    }

    /// How long clients waited for a slot.
    pub fn waits(&self) -> &WaitHistogram {
        &self.waits
    }

    /// The pool for (node, database, user), logging in with the user's account.
    pub fn get(&self, addr: &str, database: &str, user: &str) -> Arc<Pool> {
        let key = PoolKey {
            addr: addr.to_owned(),
            database: database.to_owned(),
            user: user.to_owned(),
        };
        let mut pools = lock(&self.pools);
        if let Some(pool) = pools.get(&key) {
            return Arc::clone(pool);
        }
        let account = lock(&self.accounts)
            .get(user)
            .cloned()
            .unwrap_or_else(|| Account {
                secret: Secret::password_of(""),
                pool_size: None,
            });
        let pool = Arc::new(Pool::new(
            key.clone(),
            &account,
            Arc::clone(&self.settings),
            Arc::clone(&self.connector),
            Arc::clone(&self.waits),
        ));
        pools.insert(key, Arc::clone(&pool));
        pool
    }

    /// Every pool's node with its active (lent) and idle connections.
    pub fn connections(&self) -> Vec<(String, i64, i64)> {
        let pools = lock(&self.pools);
        pools
            .values()
            .map(|pool| {
                let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
                (
                    pool.key.addr.clone(),
                    count(pool.lent()),
                    count(pool.idle_count()),
                )
            })
            .collect()
    }

    /// Connections lent without a wait, by every pool so far (pools are never dropped).
    pub fn taken_at_once(&self) -> u64 {
        lock(&self.pools)
            .values()
            .map(|pool| lock(&pool.slots).at_once)
            .sum()
    }

    /// Every pool, for a moment.
    fn all(&self) -> Vec<Arc<Pool>> {
        lock(&self.pools).values().cloned().collect()
    }

    /// Ends the waits for a slot that are past `pool.wait_timeout`, looking every tenth of
    /// it (every 100 ms at most, every 10 ms at least), as pgbouncer's janitor looks for
    /// clients past `query_wait_timeout` (every third of a second): a client gives up at
    /// most that much later than its deadline. One loop for every pool, so that the
    /// waits themselves set no timers. Until `shutdown`.
    pub async fn expire_waits(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let timeout = self.settings.load().wait_timeout;
            let period =
                (timeout / 10).clamp(Duration::from_millis(10), Duration::from_millis(100));
            tokio::select! {
                () = crate::timer::sleep(period) => {}
                () = shutdown.cancelled() => return,
            }
            let now = Instant::now();
            for pool in self.all() {
                pool.expire_waits(now);
            }
        }
    }

    /// Closes parked connections that are past `pool.server_lifetime` or unused for
    /// `pool.server_idle_timeout`, at a quarter of the shorter of the two (between 100 ms
    /// and 30 s; every 30 s if both are `0s`), until `shutdown`.
    pub async fn sweep(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let settings = self.settings.load_full();
            // Both `0s` (until a reload says otherwise): look again in 30 s.
            let shortest = [settings.server_lifetime, settings.server_idle_timeout]
                .into_iter()
                .filter(|d| !d.is_zero())
                .min()
                .unwrap_or(Duration::from_secs(120));
            let period = (shortest / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
            tokio::select! {
                () = crate::timer::sleep(period) => {}
                () = shutdown.cancelled() => return,
            }
            let closed: usize = self.all().iter().map(|pool| pool.close_expired()).sum();
            if closed > 0 {
                tracing::debug!(closed, "closed expired idle server connections");
            }
        }
    }

    /// Closes the idle connections of every pool on node `addr`.
    pub fn clear_node(&self, addr: &str) {
        for pool in lock(&self.pools).values().filter(|p| p.key.addr == addr) {
            pool.clear_idle();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool's slots with `held` of `size` held and nobody queued.
    fn slots(size: usize, held: usize) -> Slots {
        Slots {
            idle: Vec::new(),
            size,
            held,
            open: held,
            queue: VecDeque::new(),
            expired: Vec::new(),
            next_ticket: 0,
            granted: 0,
            at_once: 0,
        }
    }

    /// A deadline no test reaches.
    fn later() -> Option<Instant> {
        Some(Instant::now() + Duration::from_secs(3600))
    }

    #[test]
    fn freed_slots_go_to_queued_clients_in_the_order_they_came() {
        let mut slots = slots(1, 1);
        let waker = Waker::noop();
        assert!(!slots.take(), "the only slot is held");
        let a = slots.queue(waker, later());
        let b = slots.queue(waker, later());
        assert!(!slots.granted_to(a) && !slots.granted_to(b));

        assert!(slots.give_back().is_some(), "a queued client is woken");
        assert!(slots.granted_to(a), "the oldest gets the slot");
        assert_eq!(
            slots.claim(b, waker),
            Claim::Waiting,
            "the younger one waits on"
        );
        assert!(!slots.take(), "a newcomer queues behind b");
        assert_eq!(slots.claim(a, waker), Claim::Granted);
        assert_eq!((slots.held, slots.granted), (1, 0));

        assert!(slots.give_back().is_some());
        assert_eq!(slots.claim(b, waker), Claim::Granted);
        assert_eq!((slots.held, slots.granted), (1, 0));
        assert!(slots.give_back().is_none(), "nobody left to wake");
        assert!(slots.take(), "the slot is free for a newcomer");
    }

    #[test]
    fn a_client_that_gives_up_leaves_the_queue_or_passes_its_slot_on() {
        let mut slots = slots(1, 1);
        let waker = Waker::noop();
        let a = slots.queue(waker, later());
        let b = slots.queue(waker, later());
        let c = slots.queue(waker, later());
        // b goes away before anything is freed: a and c keep their places.
        assert!(slots.leave(b).is_none());
        assert_eq!(slots.queue.len(), 2);
        // a is handed the slot, then goes away without taking it: c gets it.
        assert!(slots.give_back().is_some());
        assert!(slots.granted_to(a) && !slots.granted_to(c));
        assert!(slots.leave(a).is_some(), "c is woken");
        assert_eq!(slots.claim(c, waker), Claim::Granted);
        assert_eq!((slots.held, slots.granted, slots.queue.len()), (1, 0, 0));
    }

    #[test]
    fn a_slot_handed_out_and_not_yet_taken_leaves_others_free() {
        let mut slots = slots(2, 2);
        let waker = Waker::noop();
        let a = slots.queue(waker, later());
        assert!(slots.give_back().is_some());
        // a has not run yet; the next slot freed is free for anyone.
        assert!(slots.give_back().is_none());
        assert!(
            slots.take(),
            "a newcomer need not queue behind a client already served"
        );
        assert_eq!(slots.claim(a, waker), Claim::Granted);
        assert_eq!((slots.held, slots.granted), (2, 0));
    }

    #[test]
    fn a_larger_size_serves_every_client_it_can_at_once() {
        let mut slots = slots(1, 1);
        let waker = Waker::noop();
        let tickets: Vec<u64> = (0..3).map(|_| slots.queue(waker, later())).collect();
        slots.size = 3;
        let mut woken = 0;
        while slots.grant().is_some() {
            woken += 1;
        }
        assert_eq!(woken, 2);
        assert!(slots.granted_to(tickets[0]) && slots.granted_to(tickets[1]));
        assert!(
            !slots.granted_to(tickets[2]),
            "the third waits for a slot to come back"
        );
    }

    #[test]
    fn a_client_past_its_deadline_leaves_the_queue_and_the_next_one_gets_the_slot() {
        let mut slots = slots(1, 1);
        let waker = Waker::noop();
        let now = Instant::now();
        let after = |secs| Some(now + Duration::from_secs(secs));
        let a = slots.queue(waker, after(1));
        let b = slots.queue(waker, after(2));
        let c = slots.queue(waker, None);
        assert!(slots.expire(now).is_empty(), "nobody is due yet");
        // b's deadline passes first (a reload shortened the timeout after a queued).
        slots.queue[0].deadline = after(5);
        assert_eq!(slots.expire(now + Duration::from_secs(2)).len(), 1);
        assert_eq!(slots.claim(b, waker), Claim::Expired);
        assert_eq!(slots.claim(a, waker), Claim::Waiting);
        // The slot freed goes to a, then c, as if b had never queued.
        assert!(slots.give_back().is_some());
        assert_eq!(slots.claim(c, waker), Claim::Waiting);
        assert!(
            slots.expire(now + Duration::from_secs(86_400)).is_empty(),
            "c's wait has no deadline"
        );
        assert_eq!(slots.claim(a, waker), Claim::Granted);
        assert!(slots.give_back().is_some());
        assert_eq!(slots.claim(c, waker), Claim::Granted);
        assert_eq!((slots.held, slots.granted, slots.queue.len()), (1, 0, 0));
        assert!(slots.expired.is_empty());
    }

    #[test]
    fn a_client_that_expired_and_went_away_unseen_leaves_nothing_behind() {
        let mut slots = slots(1, 1);
        let waker = Waker::noop();
        let now = Instant::now();
        let a = slots.queue(waker, Some(now));
        let b = slots.queue(waker, later());
        assert_eq!(slots.expire(now).len(), 1);
        assert!(
            slots.leave(a).is_none(),
            "an expired client holds no slot to pass on"
        );
        assert!(slots.expired.is_empty());
        assert!(slots.give_back().is_some(), "b is woken");
        assert_eq!(slots.claim(b, waker), Claim::Granted);
    }

    /// Polls `acquire` once with a waker that does nothing.
    fn poll_once(acquire: &mut Acquire<'_>) -> Poll<Result<PooledConn, PoolError>> {
        Pin::new(acquire).poll(&mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn an_acquire_dropped_while_queued_or_granted_leaves_no_waiter_and_no_slot_behind() {
        let pools = Pools::new(PoolConfig {
            size: 1,
            ..PoolConfig::default()
        });
        let pool = pools.get("127.0.0.1:1", "db", "user");
        // The one slot is held (by a client whose connection is lent).
        lock(&pool.slots).held = 1;
        let mut first = pool.acquire();
        let mut second = pool.acquire();
        let mut third = pool.acquire();
        for acquire in [&mut first, &mut second, &mut third] {
            assert!(
                poll_once(acquire).is_pending(),
                "no slot is free: it queues"
            );
        }
        assert_eq!(lock(&pool.slots).queue.len(), 3);
        drop(first);
        assert_eq!(lock(&pool.slots).queue.len(), 2, "the first left the queue");
        // The lent connection's slot comes back: it is handed to the second, which goes
        // away before it looks; the slot passes on to the third.
        assert!(
            lock(&pool.slots).give_back().is_some(),
            "the second is woken"
        );
        drop(second);
        let slots = lock(&pool.slots);
        assert_eq!((slots.held, slots.granted, slots.queue.len()), (1, 1, 0));
        drop(slots);
        drop(third);
        let slots = lock(&pool.slots);
        assert_eq!(
            (slots.held, slots.granted, slots.queue.len()),
            (0, 0, 0),
            "the slot handed to the third came back when it went away"
        );
    }
}
