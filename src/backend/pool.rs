//! Transaction pools: one per (node, database, user), bounded by `pool.size`.
//!
//! A permit from the pool's semaphore stands for one server connection, idle or in use, so
//! the bound holds whether a connection is being created, lent or parked. A lent
//! connection is a [`PooledConn`]: [`PooledConn::release`] parks it for the next client;
//! dropping it instead closes the connection (which makes the server roll back anything
//! open) and frees the permit.
//!
//! Connections are recycled as pgbouncer does, never in the middle of a transaction: one
//! older than `pool.server_lifetime` is closed when it is released instead of parked, and
//! parked ones unused for `pool.server_idle_timeout` (or past their lifetime) are closed
//! by the next [`Pool::acquire`] that looks at them and by [`Pools::sweep`].

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::ArcSwap;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::server::{BackendError, Login, Secret, ServerConn};
use crate::capacity::Capacity;
use crate::config::PoolConfig;
use crate::metrics::WaitHistogram;
use crate::net::{Connector, TcpConnector};
use crate::timer::Alarm;

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
    /// Parked connections, the most recently parked last. Boxed, like a lent one, so
    /// lending and parking move a pointer rather than the whole connection.
    #[expect(
        clippy::vec_box,
        reason = "a connection moves between this list and PooledConn on every transaction"
    )]
    idle: Mutex<Vec<Box<ServerConn>>>,
    /// One permit per connection that may be lent: the pool's size (`pool.size`, or the
    /// user's `pool_size`) less the lent ones. A lent connection's permit is `forget`-ed
    /// and handed back when the [`PooledConn`] is dropped, so lending touches no reference
    /// count besides the pool's own. (Parked connections hold none: one is made only when
    /// none is parked.)
    capacity: Capacity,
    params: OnceLock<Arc<Vec<(String, String)>>>,
    /// Shared by every pool: how long clients waited for a slot.
    waits: Arc<WaitHistogram>,
    /// `pool.server_lifetime` and `pool.server_idle_timeout`, read on every lend and
    /// return: kept here (set again by a reload) rather than read through `settings`.
    lifetimes: Lifetimes,
}

/// `pool.server_lifetime` and `pool.server_idle_timeout` in nanoseconds (0: never), and
/// a generation that every change bumps: a connection's deadlines
/// ([`crate::backend::server::Deadlines`]) worked out under another generation are
/// worked out again.
#[derive(Debug)]
struct Lifetimes {
    lifetime: AtomicU64,
    idle_timeout: AtomicU64,
    /// Starts at 1 (a connection's deadlines start at 0: not worked out).
    generation: AtomicU64,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Self {
            lifetime: AtomicU64::new(0),
            idle_timeout: AtomicU64::new(0),
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
            capacity: Capacity::new(size),
            key,
            secret: Mutex::new(account.secret.clone()),
            settings,
            connector,
            idle: Mutex::new(Vec::new()),
            params: OnceLock::new(),
        }
    }

    /// The pool's key.
    pub fn key(&self) -> &PoolKey {
        &self.key
    }

    /// Server connections this pool may hold.
    pub fn size(&self) -> usize {
        self.capacity.size()
    }

    /// Server connections lent to clients now.
    pub fn lent(&self) -> usize {
        self.capacity.held()
    }

    /// Changes how many connections the pool may hold (see [`Capacity::resize`]), and
    /// closes parked connections beyond the new size.
    fn resize(&self, size: usize) {
        self.capacity.resize(size);
        let extra: Vec<Box<ServerConn>> = match self.idle.lock() {
            Ok(mut idle) => {
                // The least recently parked go.
                let extra = idle.len().saturating_sub(size);
                idle.drain(..extra).collect()
            }
            Err(_) => Vec::new(),
        };
        drop(extra);
    }

    /// How new connections log in from now on.
    fn set_secret(&self, secret: &Secret) {
        if let Ok(mut current) = self.secret.lock() {
            *current = secret.clone();
        }
    }

    /// ParameterStatus values from the first connection this pool made, once one was made.
    pub fn params(&self) -> Option<Arc<Vec<(String, String)>>> {
        self.params.get().cloned()
    }

    /// Borrows a parked connection without waiting, if a slot and a usable parked
    /// connection are both free now: the per-statement path, with no future to set up.
    /// `None` leaves everything as it was; [`Self::acquire`] then waits or connects.
    pub fn try_acquire(self: &Arc<Self>) -> Option<PooledConn> {
        let permit = self.capacity.permits.try_acquire().ok()?;
        permit.forget();
        let permit = Permit(self);
        let now = crate::clock::now();
        let conn = self.take_parked(now)?;
        self.waits.no_wait();
        Some(self.lend(conn, permit, now))
    }

    /// Borrows a connection: an idle one, or a new one if the pool is below its size.
    /// Waits at most `pool.wait_timeout` for a free slot, timed by `alarm`: a session
    /// passes the same one to each of its waits, so a wait that ends in time (nearly
    /// every one) sets no timer of its own (see [`Alarm`]).
    pub async fn acquire(self: &Arc<Self>, alarm: &mut Alarm) -> Result<PooledConn, PoolError> {
        let permit = match self.capacity.permits.try_acquire() {
            Ok(permit) => {
                self.waits.no_wait();
                permit
            }
            Err(_) => {
                let started = tokio::time::Instant::now();
                let wait = self.settings.load().wait_timeout;
                let permit = tokio::select! {
                    biased;
                    permit = self.capacity.permits.acquire() => permit.ok(),
                    () = alarm.at(started + wait) => None,
                };
                self.waits.observe(started.elapsed());
                permit.ok_or_else(|| PoolError::Timeout {
                    addr: self.key.addr.clone(),
                    waited: wait,
                })?
            }
        };
        // From here the permit belongs to the PooledConn made below (its Drop returns it),
        // or is returned by `Permit` if making one fails.
        permit.forget();
        let permit = Permit(self);
        let now = crate::clock::now();
        if let Some(conn) = self.take_parked(now) {
            return Ok(self.lend(conn, permit, now));
        }
        let secret = match self.secret.lock() {
            Ok(secret) => secret.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let login = Login {
            addr: &self.key.addr,
            user: &self.key.user,
            secret: &secret,
            database: &self.key.database,
        };
        let timeout = self.settings.load().connect_timeout;
        // Boxed: a login's future is large, and the wait for a slot above, which nearly
        // every call ends with, should not carry it (see `Session::attach`).
        let conn = Box::pin(ServerConn::connect(login, &*self.connector, timeout)).await?;
        let _ = self.params.set(Arc::new(conn.params.clone()));
        Ok(self.lend(Box::new(conn), permit, Instant::now()))
    }

    /// Takes a parked connection fit to lend: the most recently parked one on this
    /// thread's reactor, else the most recently parked one, moved over. Expired ones and
    /// ones the server closed (or wrote to) while parked are dropped on the way.
    fn take_parked(&self, now: Instant) -> Option<Box<ServerConn>> {
        let here = crate::workers::current();
        loop {
            let mut conn = self
                .idle
                .lock()
                .map(|mut idle| {
                    let at = idle
                        .iter()
                        .rposition(|conn| conn.reactor == here)
                        .or_else(|| idle.len().checked_sub(1));
                    at.map(|at| idle.remove(at))
                })
                .unwrap_or(None)?;
            if self.expired(&conn, now) {
                tracing::debug!(addr = %self.key.addr, pid = conn.pid, "closing an expired server connection");
                continue;
            }
            // Checked on the reactor it is registered with, before any move.
            if conn.io.is_stale() {
                continue;
            }
            match conn.adopt() {
                Ok(conn) => return Some(conn),
                Err(cause) => {
                    tracing::debug!(%cause, "cannot move a server connection between workers");
                }
            }
        }
    }

    fn lend(
        self: &Arc<Self>,
        conn: Box<ServerConn>,
        permit: Permit<'_>,
        now: Instant,
    ) -> PooledConn {
        std::mem::forget(permit);
        PooledConn {
            conn: Some(conn),
            pool: Arc::clone(self),
            lent_at: now,
        }
    }

    /// Closes every idle connection (the node changed role or went away).
    pub fn clear_idle(&self) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.clear();
        }
    }

    /// A parked connection to close rather than lend: past its lifetime, or unused for
    /// `pool.server_idle_timeout` (`0s`: never). One comparison when its deadlines were
    /// worked out (at parking) under the lifetimes in force.
    fn expired(&self, conn: &ServerConn, now: Instant) -> bool {
        let lifetimes = &self.lifetimes;
        let due = if conn.deadlines.generation == lifetimes.generation() {
            conn.deadlines.close
        } else {
            lifetimes.close(lifetimes.retire(conn.created), conn.parked)
        };
        due.is_some_and(|due| now >= due)
    }

    /// Parks `conn` as of `now`, working out its deadlines first (see
    /// [`crate::backend::server::Deadlines`]). One past `pool.server_lifetime`, or beyond
    /// the pool's size (it shrank), is dropped instead, which closes it.
    fn park(&self, mut conn: Box<ServerConn>, now: Instant) {
        let lifetimes = &self.lifetimes;
        let generation = lifetimes.generation();
        if conn.deadlines.generation != generation {
            conn.deadlines.retire = lifetimes.retire(conn.created);
        }
        if conn.deadlines.retire.is_some_and(|retire| now >= retire) {
            tracing::debug!(addr = %self.key.addr, pid = conn.pid, "closing a server connection past pool.server_lifetime");
            return;
        }
        conn.parked = now;
        conn.deadlines.generation = generation;
        conn.deadlines.close = lifetimes.close(conn.deadlines.retire, now);
        if let Ok(mut idle) = self.idle.lock() {
            // Parked ones beyond the size (the pool shrank) are closed.
            if idle.len() < self.size() {
                idle.push(conn);
            }
        }
    }

    /// Closes the parked connections that [`Self::expired`] says are due; returns how
    /// many. The sockets are closed after the list is unlocked.
    pub fn close_expired(&self) -> usize {
        let now = Instant::now();
        let expired: Vec<Box<ServerConn>> = match self.idle.lock() {
            Ok(mut idle) => {
                let (gone, keep) = std::mem::take(&mut *idle)
                    .into_iter()
                    .partition(|conn| self.expired(conn, now));
                *idle = keep;
                gone
            }
            Err(_) => Vec::new(),
        };
        expired.len()
    }

    /// Connections parked and ready.
    pub fn idle_count(&self) -> usize {
        self.idle.lock().map(|idle| idle.len()).unwrap_or(0)
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
    /// Holds one of the pool's permits (returned on drop).
    pool: Arc<Pool>,
    /// When it was lent (the clock read that also judged its age).
    pub lent_at: Instant,
}

impl Drop for PooledConn {
    fn drop(&mut self) {
        // A lent connection was dropped (closing it) or parked by `release`: either way its
        // slot in the pool is free again.
        self.pool.capacity.permits.add_permits(1);
    }
}

/// A permit taken from `pool` and not yet handed to a [`PooledConn`]; gives it back if
/// connecting fails.
struct Permit<'p>(&'p Pool);

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.0.capacity.permits.add_permits(1);
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
        // Its slot is freed by our own drop, parked or closed.
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
        let pools = match self.pools.lock() {
            Ok(pools) => pools,
            Err(poisoned) => poisoned.into_inner(),
        };
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

    /// Every pool, for a moment.
    fn all(&self) -> Vec<Arc<Pool>> {
        lock(&self.pools).values().cloned().collect()
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
        if let Ok(pools) = self.pools.lock() {
            for pool in pools.values().filter(|p| p.key.addr == addr) {
                pool.clear_idle();
            }
        }
    }
}

/// The mutex's value, also after a panic elsewhere poisoned it (the maps it guards stay
/// consistent: every change is one insert or remove).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
