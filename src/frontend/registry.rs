//! The connected clients, as the admin console sees them (`SHOW CLIENTS`, `SHOW POOLS`,
//! `KILL_CLIENT`), and the gate `PAUSE` closes in front of new transactions.
//!
//! Each session registers once, at login ([`Clients::register`]), and is removed when its
//! [`Registered`] handle drops. What the session writes afterwards is its own entry's
//! atomics and one uncontended mutex, once when it takes a server connection and once
//! when it gives it back ([`ClientEntry::attached`] and the [`Attached`] guard): the
//! registry's own mutex is taken at connect, disconnect and by the console only.
//!
//! # Pause protocol
//!
//! A session about to take a server connection marks itself `active` and then reads the
//! pause flag; `PAUSE` sets the flag and then reads every session's mark (both with
//! `SeqCst`). Whatever the interleaving, either the session sees the flag and waits, or
//! `PAUSE` sees the session active and waits for it to give its connection back.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::backend::Pool;

/// A client's id, as `SHOW CLIENTS` lists it and `KILL_CLIENT` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClientId(pub u64);

impl std::fmt::Display for ClientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Where a client stands, as the console reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ClientState {
    /// Holds no server connection.
    Idle = 0,
    /// Holds a server connection, or is taking one.
    Active = 1,
    /// Waits for `RESUME` before it may take a server connection.
    Waiting = 2,
}

impl ClientState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Active,
            2 => Self::Waiting,
            _ => Self::Idle,
        }
    }
}

/// The server connection a client holds: its node and backend pid.
#[derive(Debug, Clone)]
pub struct ServerLink {
    /// Node `host:port`.
    pub addr: Arc<str>,
    /// The server's backend pid.
    pub pid: i32,
    /// Since when the client holds it (a monotonic instant: one clock read per
    /// transaction; [`ServerLink::since_wall`] gives the wall-clock time).
    pub since: Instant,
}

impl ServerLink {
    /// Since when the client holds it, in wall-clock time.
    pub fn since_wall(&self) -> SystemTime {
        SystemTime::now()
            .checked_sub(self.since.elapsed())
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }
}

/// One connected client.
#[derive(Debug)]
pub struct ClientEntry {
    /// Its id.
    pub id: ClientId,
    /// Role name.
    pub user: String,
    /// Database name.
    pub database: String,
    /// The client's address.
    pub addr: SocketAddr,
    /// pgway's address on the connection.
    pub local: Option<SocketAddr>,
    /// `application_name` from the StartupMessage.
    pub application_name: String,
    /// When it logged in.
    pub connected: SystemTime,
    /// Cancelled by `KILL_CLIENT`; the session ends between transactions.
    pub kill: CancellationToken,
    state: AtomicU8,
    /// Transactions (server assignments) so far.
    xacts: AtomicU64,
    /// Time spent holding server connections, in microseconds.
    xact_us: AtomicU64,
    /// Time spent waiting behind `PAUSE`, in microseconds.
    wait_us: AtomicU64,
    server: Mutex<Option<ServerLink>>,
    /// Since when it waits behind `PAUSE`.
    waiting_since: Mutex<Option<Instant>>,
}

impl ClientEntry {
    /// How long it has been waiting behind `PAUSE` (zero when it is not).
    pub fn waited(&self) -> Duration {
        lock(&self.waiting_since).map_or(Duration::ZERO, |since| since.elapsed())
    }

    /// Its state now.
    pub fn state(&self) -> ClientState {
        ClientState::from_u8(self.state.load(Ordering::SeqCst))
    }

    fn set_state(&self, state: ClientState) {
        self.state.store(state as u8, Ordering::SeqCst);
    }

    /// The server connection it holds, if any.
    pub fn server(&self) -> Option<ServerLink> {
        lock(&self.server).clone()
    }

    /// Transactions so far.
    pub fn xacts(&self) -> u64 {
        self.xacts.load(Ordering::Relaxed)
    }

    /// The session took a server connection (`pid` on `addr`): the returned guard marks it
    /// active until it drops with the connection's `Link`.
    pub fn attached(self: &Arc<Self>, addr: Arc<str>, pid: i32) -> Attached {
        self.set_state(ClientState::Active);
        self.xacts.fetch_add(1, Ordering::Relaxed);
        let since = Instant::now();
        *lock(&self.server) = Some(ServerLink { addr, pid, since });
        Attached {
            entry: Arc::clone(self),
            since,
        }
    }
}

/// Marks its client active while it holds a server connection (RAII: part of the
/// session's `Link`, so every way a connection is given back or dropped marks it idle).
#[derive(Debug)]
pub struct Attached {
    entry: Arc<ClientEntry>,
    since: Instant,
}

impl Drop for Attached {
    fn drop(&mut self) {
        let us = u64::try_from(self.since.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.entry.xact_us.fetch_add(us, Ordering::Relaxed);
        *lock(&self.entry.server) = None;
        self.entry.set_state(ClientState::Idle);
    }
}

/// Counters of clients that left, per database.
#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    /// Transactions (server assignments).
    pub xacts: u64,
    /// Time holding server connections, in microseconds.
    pub xact_us: u64,
    /// Time waiting behind `PAUSE`, in microseconds.
    pub wait_us: u64,
}

/// The registry of connected clients and the pause gate.
#[derive(Debug)]
pub struct Clients {
    next: AtomicU64,
    entries: Mutex<BTreeMap<ClientId, Arc<ClientEntry>>>,
    /// Counters of clients that left, by database.
    left: Mutex<HashMap<String, Totals>>,
    /// Pools sessions took connections from, by (node, database, user), for their idle
    /// connection counts.
    pools: Mutex<HashMap<crate::backend::PoolKey, Arc<Pool>>>,
    paused: AtomicBool,
    resumed: watch::Sender<bool>,
}

impl Default for Clients {
    fn default() -> Self {
        Self {
            next: AtomicU64::new(1),
            entries: Mutex::new(BTreeMap::new()),
            left: Mutex::new(HashMap::new()),
            pools: Mutex::new(HashMap::new()),
            paused: AtomicBool::new(false),
            resumed: watch::Sender::new(false),
        }
    }
}

/// Who connected, as [`Clients::register`] takes it.
#[derive(Debug)]
pub struct Login {
    /// Role name.
    pub user: String,
    /// Database name.
    pub database: String,
    /// The client's address.
    pub addr: SocketAddr,
    /// pgway's address on the connection.
    pub local: Option<SocketAddr>,
    /// `application_name` from the StartupMessage.
    pub application_name: String,
}

/// A session's place in the registry; removes it when dropped.
#[derive(Debug)]
pub struct Registered {
    clients: Arc<Clients>,
    /// The entry.
    pub entry: Arc<ClientEntry>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let entry = &self.entry;
        lock(&self.clients.entries).remove(&entry.id);
        let mut left = lock(&self.clients.left);
        let totals = left.entry(entry.database.clone()).or_default();
        totals.xacts += entry.xacts.load(Ordering::Relaxed);
        totals.xact_us += entry.xact_us.load(Ordering::Relaxed);
        totals.wait_us += entry.wait_us.load(Ordering::Relaxed);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Clients {
    /// Adds a logged-in client. Its session is cancelled through `entry.kill`, a child of
    /// `parent` (so pgway's shutdown reaches it too).
    pub fn register(self: &Arc<Self>, login: Login, parent: &CancellationToken) -> Registered {
        let id = ClientId(self.next.fetch_add(1, Ordering::Relaxed));
        let entry = Arc::new(ClientEntry {
            id,
            user: login.user,
            database: login.database,
            addr: login.addr,
            local: login.local,
            application_name: login.application_name,
            connected: SystemTime::now(),
            kill: parent.child_token(),
            state: AtomicU8::new(ClientState::Idle as u8),
            xacts: AtomicU64::new(0),
            xact_us: AtomicU64::new(0),
            wait_us: AtomicU64::new(0),
            server: Mutex::new(None),
            waiting_since: Mutex::new(None),
        });
        lock(&self.entries).insert(id, Arc::clone(&entry));
        Registered {
            clients: Arc::clone(self),
            entry,
        }
    }

    /// Every connected client, by id.
    pub fn list(&self) -> Vec<Arc<ClientEntry>> {
        lock(&self.entries).values().cloned().collect()
    }

    /// Counters of clients that left, by database.
    pub fn left(&self) -> HashMap<String, Totals> {
        lock(&self.left).clone()
    }

    /// Counters of a connected client.
    pub fn totals_of(entry: &ClientEntry) -> Totals {
        Totals {
            xacts: entry.xacts.load(Ordering::Relaxed),
            xact_us: entry.xact_us.load(Ordering::Relaxed),
            wait_us: entry.wait_us.load(Ordering::Relaxed),
        }
    }

    /// Ends client `id` between transactions; false if no such client is connected.
    pub fn kill(&self, id: ClientId) -> bool {
        match lock(&self.entries).get(&id) {
            Some(entry) => {
                entry.kill.cancel();
                true
            }
            None => false,
        }
    }

    /// Remembers a pool a session uses (once per session and node).
    pub fn note_pool(&self, pool: &Arc<Pool>) {
        lock(&self.pools)
            .entry(pool.key().clone())
            .or_insert_with(|| Arc::clone(pool));
    }

    /// The pools sessions used.
    pub fn pools(&self) -> Vec<Arc<Pool>> {
        lock(&self.pools).values().cloned().collect()
    }

    /// `PAUSE` is in force.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Closes the gate: sessions that take a server connection from now on wait.
    pub fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
        self.resumed.send_replace(true);
    }

    /// Opens the gate; waiting sessions go on.
    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
        self.resumed.send_replace(false);
    }

    /// Clients that hold (or are taking) a server connection.
    pub fn active_count(&self) -> usize {
        lock(&self.entries)
            .values()
            .filter(|e| e.state() == ClientState::Active)
            .count()
    }

    /// Waits until no client holds a server connection, at most `timeout`; false if some
    /// still did then.
    pub async fn drained(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.active_count() == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The gate in front of a new transaction: returns at once unless `PAUSE` is in
    /// force, else when `RESUME` comes. The session (`entry`, when registered) is marked
    /// active on return, waiting while it waits (see the module doc's pause protocol).
    pub async fn gate(&self, entry: Option<&ClientEntry>) {
        loop {
            if let Some(entry) = entry {
                entry.set_state(ClientState::Active);
            }
            if !self.is_paused() {
                return;
            }
            let started = Instant::now();
            if let Some(entry) = entry {
                *lock(&entry.waiting_since) = Some(started);
                entry.set_state(ClientState::Waiting);
            }
            let mut resumed = self.resumed.subscribe();
            // The sender lives as long as `self`: this cannot fail while we borrow it.
            let _ = resumed.wait_for(|paused| !*paused).await;
            if let Some(entry) = entry {
                *lock(&entry.waiting_since) = None;
                let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                entry.wait_us.fetch_add(us, Ordering::Relaxed);
            }
        }
    }

    /// A session failed to take a server connection after (or while waiting at)
    /// [`Self::gate`]: idle again.
    pub fn not_attached(entry: Option<&ClientEntry>) {
        if let Some(entry) = entry {
            *lock(&entry.waiting_since) = None;
            if entry.state() != ClientState::Idle && lock(&entry.server).is_none() {
                entry.set_state(ClientState::Idle);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login(user: &str) -> Login {
        Login {
            user: user.to_owned(),
            database: "db".to_owned(),
            addr: "127.0.0.1:5000".parse().expect("an address"),
            local: None,
            application_name: String::new(),
        }
    }

    #[tokio::test]
    async fn clients_register_attach_and_leave() {
        let clients = Arc::new(Clients::default());
        let root = CancellationToken::new();
        let a = clients.register(login("a"), &root);
        let b = clients.register(login("b"), &root);
        assert_eq!(clients.list().len(), 2);
        clients.gate(Some(&a.entry)).await;
        let guard = a.entry.attached(Arc::from("n1"), 42);
        assert_eq!(clients.active_count(), 1);
        assert_eq!(a.entry.server().map(|s| s.pid), Some(42));
        assert!(!clients.drained(Duration::from_millis(20)).await);
        drop(guard);
        assert!(clients.drained(Duration::from_millis(20)).await);
        assert!(clients.kill(b.entry.id));
        assert!(b.entry.kill.is_cancelled());
        assert!(!clients.kill(ClientId(999)));
        drop(a);
        assert_eq!(clients.list().len(), 1);
        assert_eq!(clients.left().get("db").map(|t| t.xacts), Some(1));
    }

    #[tokio::test]
    async fn the_gate_holds_new_transactions_until_resume() {
        let clients = Arc::new(Clients::default());
        let root = CancellationToken::new();
        let a = clients.register(login("a"), &root);
        clients.pause();
        let waiting = {
            let clients = Arc::clone(&clients);
            let entry = Arc::clone(&a.entry);
            tokio::spawn(async move { clients.gate(Some(&entry)).await })
        };
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(a.entry.state(), ClientState::Waiting);
        assert!(!waiting.is_finished());
        clients.resume();
        waiting.await.expect("the gate opens");
        assert_eq!(a.entry.state(), ClientState::Active);
    }
}
