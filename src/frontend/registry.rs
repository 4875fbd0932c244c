//! The connected clients, as the admin console sees them (`SHOW CLIENTS`, `SHOW POOLS`,
//! `SHOW STATS`, `KILL_CLIENT`), and the gate `PAUSE` closes in front of new transactions.
//!
//! Each session registers once, at login ([`Clients::register`]; console connections with
//! [`Clients::register_console`]), and is removed when its [`Registered`] handle drops.
//! What the session writes afterwards is its own entry's atomics, with plain loads and
//! stores (it is their only writer: one increment per request for its statement count),
//! when it takes a server connection and gives it back ([`ClientEntry::attached`] and the
//! [`Attached`] guard). Which server connection it holds is its cancel key's
//! [`ServerSlot`], shared with the entry: an uncontended mutex when the session takes a
//! connection, a store when it gives it back. The registry's own mutex is taken at
//! connect, disconnect and by the console only.
//!
//! # Pause protocol
//!
//! `PAUSE` closes the gate for every database, `PAUSE <db>` for one. A session about to
//! take a server connection marks itself `active` and then reads the pause flag (set while
//! any pause is in force); `PAUSE` records what it pauses (under the pause mutex), sets
//! the flag and then reads every session's mark (flag and marks with `SeqCst`). Whatever
//! the interleaving, either the session sees the flag, looks under the mutex and waits if
//! its database is paused, or `PAUSE` sees the session active and waits for it to give
//! its connection back. With no pause in force the gate costs one atomic load.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::backend::Pool;
use crate::frontend::cancel::ServerSlot;
// An entry's counters are written by its session alone (the console and the totals read).
use crate::metrics::bump;
use crate::sync::lock;

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
    /// The client's address (unknown for a console connection opened without it).
    pub addr: Option<SocketAddr>,
    /// pgway's address on the connection.
    pub local: Option<SocketAddr>,
    /// `application_name` from the StartupMessage.
    pub application_name: String,
    /// An admin console connection (database `pgway`): never takes a server connection.
    pub console: bool,
    /// When it logged in.
    pub connected: SystemTime,
    /// Cancelled by `KILL_CLIENT`; the session ends between transactions.
    pub kill: CancellationToken,
    state: AtomicU8,
    /// Transactions (server assignments) so far.
    xacts: AtomicU64,
    /// Statements so far: each simple Query, function call and Execute answered.
    queries: AtomicU64,
    /// Time spent holding server connections, in microseconds.
    xact_us: AtomicU64,
    /// Time spent waiting behind `PAUSE`, in microseconds.
    wait_us: AtomicU64,
    /// The server connection it holds (its cancel key's slot).
    server: Arc<ServerSlot>,
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
        self.server.held().map(|(target, since)| ServerLink {
            addr: target.addr,
            pid: target.pid,
            since,
        })
    }

    /// Transactions so far.
    pub fn xacts(&self) -> u64 {
        self.xacts.load(Ordering::Relaxed)
    }

    /// The client ran `n` more statements (one plain increment per request: the
    /// statement hot path).
    #[inline]
    pub fn queried(&self, n: u64) {
        bump(&self.queries, n);
    }

    /// The session took a server connection, lent at `since` (which one, its cancel key's
    /// slot says): the returned guard marks it active until it drops with the connection's
    /// `Link`.
    pub fn attached(self: &Arc<Self>, since: Instant) -> Attached {
        self.mark_attached();
        Attached {
            entry: Arc::clone(self),
            since,
            ended: false,
        }
    }

    /// A transaction took a server connection: active, one transaction more.
    fn mark_attached(&self) {
        // The gate marked it active already (`Clients::open_now`), nearly always.
        if self.state.load(Ordering::Relaxed) != ClientState::Active as u8 {
            self.set_state(ClientState::Active);
        }
        bump(&self.xacts, 1);
    }
}

/// Marks its client active while it holds a server connection (RAII: part of the
/// session's `Link`, so every way a connection is given back or dropped marks it idle).
/// Ended ([`Self::end_at`]), the session keeps it for its next transaction
/// ([`Self::again`]): no reference count on the entry taken and dropped per transaction.
#[derive(Debug)]
pub struct Attached {
    entry: Arc<ClientEntry>,
    since: Instant,
    /// [`Self::end_at`] marked the client idle already.
    ended: bool,
}

impl Attached {
    /// Marks the client idle as of `now`: a clock reading the caller made anyway (giving
    /// the connection back reads the clock too; one reading a statement fewer).
    pub fn end_at(&mut self, now: Instant) {
        if !self.ended {
            self.end(now);
            self.ended = true;
        }
    }

    /// The guard of an ended transaction, active again for the client's next one, whose
    /// connection was lent at `since`.
    pub fn again(&mut self, since: Instant) {
        self.entry.mark_attached();
        self.since = since;
        self.ended = false;
    }

    fn end(&self, now: Instant) {
        let held = now.saturating_duration_since(self.since);
        let us = u64::try_from(held.as_micros()).unwrap_or(u64::MAX);
        bump(&self.entry.xact_us, us);
        // No SeqCst here: the pause protocol needs it for marking a session active (then
        // reading the flag), not for marking it idle, which `PAUSE` polls for.
        self.entry
            .state
            .store(ClientState::Idle as u8, Ordering::Release);
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if !self.ended {
            self.end(Instant::now());
        }
    }
}

/// Counters of clients that left, per database.
#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    /// Transactions (server assignments).
    pub xacts: u64,
    /// Statements.
    pub queries: u64,
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
    /// Some pause is in force (mirrors [`Self::pause`] being non-empty; written under its
    /// mutex): the gate's fast path.
    paused: AtomicBool,
    /// What is paused.
    pause: Mutex<Paused>,
    /// Bumped at every `PAUSE` and `RESUME`: waiting sessions look again.
    changed: watch::Sender<u64>,
}

/// What `PAUSE` holds.
#[derive(Debug, Default)]
struct Paused {
    /// `PAUSE` without a database: everything.
    all: bool,
    /// `PAUSE <db>`: these databases.
    databases: BTreeSet<String>,
}

impl Paused {
    fn any(&self) -> bool {
        self.all || !self.databases.is_empty()
    }

    /// Clients of `database` (`None`: an unregistered session) must wait.
    fn holds(&self, database: Option<&str>) -> bool {
        self.all || database.is_some_and(|db| self.databases.contains(db))
    }
}

/// Why `RESUME <db>` did nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResumeError {
    /// The database was not paused on its own.
    #[error("database \"{0}\" is not paused")]
    NotPaused(String),
    /// `PAUSE` without a database is in force: only `RESUME` without one lifts it.
    #[error("pgway is paused as a whole: RESUME without a database resumes it")]
    PausedAll,
}

impl Default for Clients {
    fn default() -> Self {
        Self {
            next: AtomicU64::new(1),
            entries: Mutex::new(BTreeMap::new()),
            left: Mutex::new(HashMap::new()),
            pools: Mutex::new(HashMap::new()),
            paused: AtomicBool::new(false),
            pause: Mutex::new(Paused::default()),
            changed: watch::Sender::new(0),
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
        totals.queries += entry.queries.load(Ordering::Relaxed);
        totals.xact_us += entry.xact_us.load(Ordering::Relaxed);
        totals.wait_us += entry.wait_us.load(Ordering::Relaxed);
    }
}

impl Clients {
    /// Adds a logged-in client. Its session is cancelled through `entry.kill`, a child of
    /// `parent` (so pgway's shutdown reaches it too).
    /// `server`: the client's cancel key's slot, which says what server connection it holds.
    pub fn register(
        self: &Arc<Self>,
        login: Login,
        server: Arc<ServerSlot>,
        parent: &CancellationToken,
    ) -> Registered {
        self.add(
            login.user,
            login.database,
            Some(login.addr),
            login.local,
            login.application_name,
            Some(server),
            parent,
        )
    }

    /// Adds an admin console connection (database `database`, `pgway`): listed by
    /// `SHOW CLIENTS`, ended by `KILL_CLIENT` through `entry.kill` (a child of `parent`).
    pub fn register_console(
        self: &Arc<Self>,
        user: &str,
        database: &str,
        addr: Option<SocketAddr>,
        local: Option<SocketAddr>,
        parent: &CancellationToken,
    ) -> Registered {
        self.add(
            user.to_owned(),
            database.to_owned(),
            addr,
            local,
            String::new(),
            None,
            parent,
        )
    }

    #[allow(
        clippy::too_many_arguments,
        reason = "the entry's fields, from two callers"
    )]
    fn add(
        self: &Arc<Self>,
        user: String,
        database: String,
        addr: Option<SocketAddr>,
        local: Option<SocketAddr>,
        application_name: String,
        server: Option<Arc<ServerSlot>>,
        parent: &CancellationToken,
    ) -> Registered {
        let console = server.is_none();
        let id = ClientId(self.next.fetch_add(1, Ordering::Relaxed));
        let entry = Arc::new(ClientEntry {
            id,
            user,
            database,
            addr,
            local,
            application_name,
            console,
            connected: SystemTime::now(),
            kill: parent.child_token(),
            state: AtomicU8::new(ClientState::Idle as u8),
            xacts: AtomicU64::new(0),
            queries: AtomicU64::new(0),
            xact_us: AtomicU64::new(0),
            wait_us: AtomicU64::new(0),
            server: server.unwrap_or_default(),
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
            queries: entry.queries.load(Ordering::Relaxed),
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

    /// Clients of `database` wait at the gate (`None`: clients of every database do,
    /// `PAUSE` without a database).
    pub fn is_paused(&self, database: Option<&str>) -> bool {
        let pause = lock(&self.pause);
        match database {
            Some(db) => pause.holds(Some(db)),
            None => pause.all,
        }
    }

    /// The databases paused one by one (`PAUSE <db>`).
    pub fn paused_databases(&self) -> Vec<String> {
        lock(&self.pause).databases.iter().cloned().collect()
    }

    /// Closes the gate for `database` (`None`: for every database): sessions that take a
    /// server connection from now on wait.
    pub fn pause(&self, database: Option<&str>) {
        let mut pause = lock(&self.pause);
        match database {
            Some(db) => {
                pause.databases.insert(db.to_owned());
            }
            None => pause.all = true,
        }
        self.paused.store(true, Ordering::SeqCst);
        drop(pause);
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Opens the gate for `database` (`None`: everything, the databases paused one by one
    /// included); their waiting sessions go on.
    pub fn resume(&self, database: Option<&str>) -> Result<(), ResumeError> {
        let mut pause = lock(&self.pause);
        match database {
            None => *pause = Paused::default(),
            Some(_) if pause.all => return Err(ResumeError::PausedAll),
            Some(db) => {
                if !pause.databases.remove(db) {
                    return Err(ResumeError::NotPaused(db.to_owned()));
                }
            }
        }
        self.paused.store(pause.any(), Ordering::SeqCst);
        drop(pause);
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
        Ok(())
    }

    /// Clients of `database` (`None`: of any) that hold (or are taking) a server
    /// connection.
    pub fn active_count(&self, database: Option<&str>) -> usize {
        lock(&self.entries)
            .values()
            .filter(|e| database.is_none_or(|db| e.database == db))
            .filter(|e| e.state() == ClientState::Active)
            .count()
    }

    /// Waits until no client of `database` (`None`: of any) holds a server connection, at
    /// most `timeout`; false if some still did then.
    pub async fn drained(&self, timeout: Duration, database: Option<&str>) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.active_count(database) == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            crate::timer::sleep(Duration::from_millis(10)).await;
        }
    }

    /// [`Self::gate`] without waiting: true, the session (`entry`) marked active, when no
    /// `PAUSE` is in force; false when [`Self::gate`] has to be awaited.
    pub fn open_now(&self, entry: Option<&ClientEntry>) -> bool {
        // Marked active before looking (see the module doc's pause protocol).
        if let Some(entry) = entry {
            entry.set_state(ClientState::Active);
        }
        !self.paused.load(Ordering::SeqCst)
    }

    /// The gate in front of a new transaction: returns at once unless a pause holds the
    /// session's database, else when `RESUME` lets it go. The session (`entry`, when
    /// registered) is marked active on return, waiting while it waits (see the module
    /// doc's pause protocol).
    pub async fn gate(&self, entry: Option<&ClientEntry>) {
        let database = entry.map(|e| e.database.as_str());
        loop {
            if self.open_now(entry) {
                return;
            }
            // Subscribed before looking, so a RESUME after the look wakes the wait.
            let mut changed = self.changed.subscribe();
            if !lock(&self.pause).holds(database) {
                return;
            }
            let started = Instant::now();
            if let Some(entry) = entry {
                *lock(&entry.waiting_since) = Some(started);
                entry.set_state(ClientState::Waiting);
            }
            loop {
                // The sender lives as long as `self`: this cannot fail while we borrow it.
                let _ = changed.changed().await;
                if !lock(&self.pause).holds(database) {
                    break;
                }
            }
            if let Some(entry) = entry {
                *lock(&entry.waiting_since) = None;
                let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                bump(&entry.wait_us, us);
            }
        }
    }

    /// A session failed to take a server connection after (or while waiting at)
    /// [`Self::gate`]: idle again.
    pub fn not_attached(entry: Option<&ClientEntry>) {
        if let Some(entry) = entry {
            *lock(&entry.waiting_since) = None;
            if entry.state() != ClientState::Idle && !entry.server.is_held() {
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

    fn slot() -> Arc<ServerSlot> {
        Arc::new(ServerSlot::default())
    }

    #[tokio::test]
    async fn clients_register_attach_and_leave() {
        let clients = Arc::new(Clients::default());
        let root = CancellationToken::new();
        let a_slot = slot();
        let a = clients.register(login("a"), Arc::clone(&a_slot), &root);
        let b = clients.register(login("b"), slot(), &root);
        assert_eq!(clients.list().len(), 2);
        clients.gate(Some(&a.entry)).await;
        assert!(a.entry.server().is_none());
        // The session writes what it holds to its cancel key's slot, which the entry reads.
        a_slot.hold(&Arc::from("n1"), 42, 7, Instant::now());
        let guard = a.entry.attached(Instant::now());
        assert_eq!(clients.active_count(None), 1);
        assert_eq!(clients.active_count(Some("db")), 1);
        assert_eq!(clients.active_count(Some("other")), 0);
        assert_eq!(a.entry.server().map(|s| s.pid), Some(42));
        assert!(!clients.drained(Duration::from_millis(20), None).await);
        assert!(
            clients
                .drained(Duration::from_millis(20), Some("other"))
                .await
        );
        a.entry.queried(1);
        a.entry.queried(2);
        assert_eq!(Clients::totals_of(&a.entry).queries, 3);
        a_slot.clear();
        assert!(a.entry.server().is_none());
        drop(guard);
        assert!(clients.drained(Duration::from_millis(20), None).await);
        assert!(clients.kill(b.entry.id));
        assert!(b.entry.kill.is_cancelled());
        assert!(!clients.kill(ClientId(999)));
        drop(a);
        assert_eq!(clients.list().len(), 1);
        assert_eq!(clients.left().get("db").map(|t| t.xacts), Some(1));
        assert_eq!(clients.left().get("db").map(|t| t.queries), Some(3));
    }

    #[tokio::test]
    async fn console_connections_are_listed_and_can_be_killed() {
        let clients = Arc::new(Clients::default());
        let root = CancellationToken::new();
        let app = clients.register(login("a"), slot(), &root);
        let console = clients.register_console("ops", "pgway", None, None, &root);
        let listed = clients.list();
        assert_eq!(listed.len(), 2);
        assert!(listed
            .iter()
            .any(|e| e.console && e.database == "pgway" && e.addr.is_none()));
        assert!(!app.entry.console);
        // PAUSE waits for no console connection.
        clients.pause(None);
        assert!(clients.drained(Duration::from_millis(20), None).await);
        assert_eq!(clients.resume(None), Ok(()));
        assert!(clients.kill(console.entry.id));
        assert!(console.entry.kill.is_cancelled());
        assert!(!app.entry.kill.is_cancelled());
    }

    #[tokio::test]
    async fn the_gate_holds_new_transactions_until_resume() {
        let clients = Arc::new(Clients::default());
        let root = CancellationToken::new();
        let a = clients.register(login("a"), slot(), &root);
        clients.pause(None);
        let waiting = {
            let clients = Arc::clone(&clients);
            let entry = Arc::clone(&a.entry);
            tokio::spawn(async move { clients.gate(Some(&entry)).await })
        };
        crate::timer::sleep(Duration::from_millis(30)).await;
        assert_eq!(a.entry.state(), ClientState::Waiting);
        assert!(!waiting.is_finished());
        assert_eq!(clients.resume(None), Ok(()));
        waiting.await.expect("the gate opens");
        assert_eq!(a.entry.state(), ClientState::Active);
    }

    fn login_to(user: &str, database: &str) -> Login {
        Login {
            database: database.to_owned(),
            ..login(user)
        }
    }

    /// Waits (a little) until `entry` is `state`.
    async fn settles(entry: &ClientEntry, state: ClientState) {
        for _ in 0..100 {
            if entry.state() == state {
                return;
            }
            crate::timer::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(entry.state(), state);
    }

    #[tokio::test]
    async fn pause_of_one_database_holds_only_its_clients() {
        let clients = Arc::new(Clients::default());
        let root = CancellationToken::new();
        let a = clients.register(login_to("a", "one"), slot(), &root);
        let b = clients.register(login_to("b", "two"), slot(), &root);
        let gate = |entry: &Arc<ClientEntry>| {
            let clients = Arc::clone(&clients);
            let entry = Arc::clone(entry);
            tokio::spawn(async move { clients.gate(Some(&entry)).await })
        };
        clients.pause(Some("one"));
        assert!(clients.is_paused(Some("one")));
        assert!(!clients.is_paused(Some("two")));
        assert!(!clients.is_paused(None));
        assert_eq!(clients.paused_databases(), vec!["one".to_owned()]);
        let held = gate(&a.entry);
        gate(&b.entry)
            .await
            .expect("a client of another database goes on");
        assert_eq!(b.entry.state(), ClientState::Active);
        Clients::not_attached(Some(&b.entry));
        settles(&a.entry, ClientState::Waiting).await;
        // Pausing or resuming something else wakes it, but it goes on waiting.
        clients.pause(Some("three"));
        assert_eq!(
            clients.resume(Some("two")),
            Err(ResumeError::NotPaused("two".into()))
        );
        assert_eq!(clients.resume(Some("three")), Ok(()));
        crate::timer::sleep(Duration::from_millis(30)).await;
        assert!(!held.is_finished());
        assert_eq!(a.entry.state(), ClientState::Waiting);
        assert_eq!(clients.resume(Some("one")), Ok(()));
        held.await.expect("the gate opens");
        assert_eq!(a.entry.state(), ClientState::Active);
        assert!(clients.paused_databases().is_empty());
        assert!(!clients.paused.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn resume_without_a_database_lifts_every_pause() {
        let clients = Arc::new(Clients::default());
        let root = CancellationToken::new();
        let a = clients.register(login_to("a", "one"), slot(), &root);
        clients.pause(Some("one"));
        clients.pause(None);
        assert_eq!(clients.resume(Some("one")), Err(ResumeError::PausedAll));
        let held = {
            let clients = Arc::clone(&clients);
            let entry = Arc::clone(&a.entry);
            tokio::spawn(async move { clients.gate(Some(&entry)).await })
        };
        settles(&a.entry, ClientState::Waiting).await;
        assert_eq!(clients.resume(None), Ok(()));
        held.await.expect("the gate opens");
        assert!(!clients.is_paused(Some("one")));
        assert!(!clients.paused.load(Ordering::SeqCst));
    }
}
