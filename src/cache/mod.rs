//! The result cache: results of reads kept in memory and replayed to clients, never staler
//! than a replica.
//!
//! # What is kept
//! The server's own reply bytes to a read made outside a transaction (a simple query, or
//! an extended-protocol Bind/Execute), keyed by database, user, the request (SQL text,
//! parameter types, values and formats) and every session setting pgway follows for the
//! client. Which reads qualify is a [`Plan`], worked out once per statement text: one query
//! whose every table a `[[cache.rules]]` entry covers (or that carries a `pgway:cache`
//! hint), calling no volatile function, reading only tables logical decoding reports.
//!
//! # Invalidation
//! Each table name has a version. An entry remembers the versions of its tables when its
//! query was sent; it is served only while they are unchanged, and a fill whose tables
//! changed while its query ran is not kept. Versions are bumped by the WAL stream of the
//! database ([`stream`]: every committed change, whoever made it) and by writes through
//! pgway at their commit, before their client sees the reply. Tables are known by their
//! own name, without schema: a change to `a.t` also drops entries that read `b.t`, which
//! costs a miss, never a stale answer.
//!
//! # Never staler than a replica
//! - A fill reads under a floor: the WAL position of the last change pgway saw to any of
//!   its tables, so a replica that has not replayed that change cannot fill the entry
//!   with what came before it.
//! - An entry is served only while the stream has decoded the WAL at least up to the
//!   position the read must see (its read-your-writes floor) and up to the replay position
//!   of every readable replica pgway knows: what a replica would answer, the stream has
//!   seen.
//! - Until a stream is consistent (at start, after it broke, after a failover) the cache
//!   of its database is bypassed, and when it becomes consistent it is emptied.
//! - Without `cache.wal_user` (or without `wal_level = logical`) only writes through pgway
//!   invalidate, and the TTL bounds the rest.

pub mod stream;
pub mod wal;

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use tokio::sync::watch;

use crate::config::CacheConfig;
use crate::route::classify::table_name;
use crate::settings::Settings;
use crate::sync::lock;

/// The cached reply is at least this much bigger in memory than its bytes (key, entry,
/// the map's own overhead).
const ENTRY_OVERHEAD: usize = 256;

/// How long a read waits for another client's identical read to fill the entry before it
/// runs its own query.
pub const FILL_WAIT: Duration = Duration::from_secs(5);

/// One table name's change count and the WAL position of its last change.
#[derive(Debug, Default)]
pub struct TableState {
    version: AtomicU64,
    last_change: AtomicU64,
}

/// What a cached read depends on, worked out once per statement text and database.
#[derive(Debug)]
pub struct Plan {
    /// Its tables' states.
    tables: Box<[Arc<TableState>]>,
    /// How long its entries live.
    pub ttl: Duration,
}

/// The invalidation stream's state for a database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum StreamState {
    /// No `cache.wal_user`: writes through pgway and TTL only.
    Off = 0,
    /// Configured, not started yet: it starts with the database's first cacheable
    /// statement, and the cache is bypassed until it is consistent.
    Idle = 5,
    /// Connecting, or creating the slot (waiting for running transactions).
    Starting = 1,
    /// Consistent and following: the cache serves.
    Following = 2,
    /// Broken; trying again.
    Down = 3,
    /// The primary's `wal_level` is not `logical`: writes through pgway and TTL only.
    NotLogical = 4,
}

impl StreamState {
    fn from_u8(n: u8) -> Self {
        match n {
            1 => Self::Starting,
            2 => Self::Following,
            3 => Self::Down,
            4 => Self::NotLogical,
            5 => Self::Idle,
            _ => Self::Off,
        }
    }

    /// The name `/cache` shows.
    pub fn name(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Idle => "idle",
            Self::Starting => "starting",
            Self::Following => "following",
            Self::Down => "down",
            Self::NotLogical => "not_logical",
        }
    }
}

/// One database's tables, generation and stream.
#[derive(Debug)]
pub struct Db {
    name: Arc<str>,
    tables: Mutex<HashMap<String, Arc<TableState>>>,
    /// Bumped to drop every entry of the database.
    generation: AtomicU64,
    /// Bumped each time a stream becomes consistent (a new slot, perhaps on a new primary):
    /// positions learned before are of another stream.
    epoch: AtomicU64,
    state: AtomicU8,
    /// The stream has decoded (and applied) everything before this WAL position.
    position: AtomicU64,
    /// Reads waiting for the stream to get further, and their wake-up.
    waiting: std::sync::atomic::AtomicUsize,
    advanced: tokio::sync::Notify,
    /// The temporary slot's name, while there is one.
    slot: Mutex<Option<String>>,
    /// Plans by statement text (`None`: not cacheable).
    plans: moka::sync::Cache<Box<[u8]>, Option<Arc<Plan>>>,
}

impl Db {
    fn table(&self, name: &str) -> Arc<TableState> {
        let bare = bare_name(name);
        let mut tables = lock(&self.tables);
        Arc::clone(tables.entry(bare.to_owned()).or_default())
    }

    /// The stream's state.
    pub fn state(&self) -> StreamState {
        StreamState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// The plan of `sql`, if it was worked out.
    pub fn known_plan(&self, sql: &[u8]) -> Option<Option<Arc<Plan>>> {
        self.plans.get(sql)
    }

    /// Remembers the plan of `sql`.
    pub fn remember_plan(&self, sql: &[u8], plan: Option<Arc<Plan>>) {
        self.plans.insert(sql.into(), plan);
    }

    /// The stream decoded the WAL up to `position`.
    fn advance(&self, position: u64) {
        self.position.fetch_max(position, Ordering::AcqRel);
        if self.waiting.load(Ordering::Acquire) > 0 {
            self.advanced.notify_waiters();
        }
    }

    /// Waits up to `wait` for the stream to reach `position`; true if it did.
    pub async fn wait_for(&self, position: u64, wait: Duration) -> bool {
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let reached = crate::timer::timeout(wait, async {
            loop {
                let advanced = self.advanced.notified();
                tokio::pin!(advanced);
                advanced.as_mut().enable();
                if self.position.load(Ordering::Acquire) >= position
                    || self.state() != StreamState::Following
                {
                    return;
                }
                advanced.await;
            }
        })
        .await
        .is_ok();
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        reached && self.position.load(Ordering::Acquire) >= position
    }

    fn set_state(&self, state: StreamState) {
        self.state.store(state as u8, Ordering::Release);
    }

    /// Tables (names as written) changed at WAL position `position` (0: unknown).
    fn invalidate(&self, tables: &[impl AsRef<str>], position: u64, stats: &Stats) {
        for table in tables {
            let state = self.table(table.as_ref());
            state.last_change.fetch_max(position, Ordering::AcqRel);
            state.version.fetch_add(1, Ordering::AcqRel);
            stats.invalidations.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Drops every entry.
    fn invalidate_all(&self, stats: &Stats) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.plans.invalidate_all();
        stats.invalidations.fetch_add(1, Ordering::Relaxed);
    }

    /// The stream's epoch (see the field).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The position the stream has decoded up to.
    pub fn position(&self) -> u64 {
        self.position.load(Ordering::Acquire)
    }

    /// The temporary slot's name, while there is one.
    pub fn slot(&self) -> Option<String> {
        lock(&self.slot).clone()
    }

    /// A plan over `tables` (names as written) that lives `ttl`.
    pub fn plan(&self, tables: &[String], ttl: Duration) -> Arc<Plan> {
        Arc::new(Plan {
            tables: tables.iter().map(|t| self.table(t)).collect(),
            ttl,
        })
    }
}

/// The table's own name, without schema (or database).
fn bare_name(name: &str) -> &str {
    name.rsplit('.').next().unwrap_or(name)
}

/// The exact key of an entry (its hash is the map's key).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Key {
    database: Arc<str>,
    user: Arc<str>,
    settings: Settings,
    request: Box<[u8]>,
}

/// One cached reply.
#[derive(Debug)]
struct Entry {
    key: Key,
    reply: Bytes,
    generation: u64,
    versions: Box<[(Arc<TableState>, u64)]>,
    ttl: Duration,
}

impl Entry {
    fn current(&self, db: &Db) -> bool {
        self.generation == db.generation.load(Ordering::Acquire)
            && self
                .versions
                .iter()
                .all(|(table, version)| table.version.load(Ordering::Acquire) == *version)
    }
}

struct PerEntryTtl;

impl moka::Expiry<u64, Arc<Entry>> for PerEntryTtl {
    fn expire_after_create(
        &self,
        _key: &u64,
        value: &Arc<Entry>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// Counters, as `/cache` shows them.
#[derive(Debug, Default)]
pub struct Stats {
    /// Reads answered from memory.
    pub hits: AtomicU64,
    /// Cacheable reads that went to a server.
    pub misses: AtomicU64,
    /// Cacheable reads that went to a server because the stream was not consistent or
    /// not far enough.
    pub bypassed: AtomicU64,
    /// Entries stored.
    pub fills: AtomicU64,
    /// Results not stored: too large, failed, or a table changed while they were read.
    pub fills_refused: AtomicU64,
    /// Entries evicted for room.
    pub evictions: AtomicU64,
    /// Table changes (and whole-database drops) applied.
    pub invalidations: AtomicU64,
}

/// A request's identity apart from who sends it: the SQL text and, for the extended
/// protocol, parameter types, the Bind's formats and values and what was described.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The parts, hashed and compared in order.
    pub parts: &'a [&'a [u8]],
}

/// The result cache.
pub struct ResultCache {
    /// `[cache]`, swapped by a reload (which changes only `default_ttl` and `rules`).
    config: ArcSwap<CacheConfig>,
    /// Rule tables, folded, with their TTL; swapped by a reload.
    rules: ArcSwap<Vec<(Vec<String>, Duration)>>,
    entries: moka::sync::Cache<u64, Arc<Entry>>,
    dbs: Mutex<HashMap<Arc<str>, Arc<Db>>>,
    /// Fills in progress, by key hash: a read of the same key waits for the fill.
    pending: Mutex<HashMap<u64, watch::Receiver<()>>>,
    stats: Arc<Stats>,
    /// Starts a database's stream (set by [`stream::start`]).
    streams: Option<stream::Streams>,
}

impl std::fmt::Debug for ResultCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResultCache")
            .field("entries", &self.entries.entry_count())
            .finish_non_exhaustive()
    }
}

/// What a look-up found.
#[derive(Debug)]
pub enum Lookup {
    /// The reply to replay.
    Hit(Bytes),
    /// Not cached (or no longer current): fill it.
    Miss(Fill),
    /// Another client is filling it: wait on this, then look again.
    Wait(watch::Receiver<()>),
    /// The stream has not decoded the WAL up to this position yet, which the read must
    /// see: wait for it (briefly), then look again.
    Behind(u64),
    /// The cache may not serve this read now (the stream is not consistent).
    Bypass,
}

/// A fill in progress: the reply as it is relayed, and what it depends on.
#[derive(Debug)]
pub struct Fill {
    hash: u64,
    key: Key,
    generation: u64,
    versions: Box<[(Arc<TableState>, u64)]>,
    ttl: Duration,
    /// The reply so far (what the client is sent, ParseComplete and ReadyForQuery left out).
    pub reply: bytes::BytesMut,
    /// Something in the reply rules it out (an error, a notification, a parameter change,
    /// its size).
    pub refused: bool,
    /// Its ReadyForQuery came: the reply is whole.
    pub complete: bool,
    /// `cache.max_entry_size`.
    max: usize,
    /// The position its read must see: the last change pgway knows of to its tables.
    pub floor: u64,
    /// Wakes reads waiting for this fill when dropped.
    _done: watch::Sender<()>,
}

impl Fill {
    /// Adds one message the client is sent.
    pub fn capture(&mut self, frame: &[u8]) {
        match frame[0] {
            // pgway makes these itself when it replays.
            b'1' => {}
            b'Z' => self.complete = true,
            b'E' | b'A' | b'S' | b'G' | b'H' | b'W' => self.refused = true,
            _ if self.refused => {}
            _ if self.reply.len() + frame.len() > self.max => {
                self.refused = true;
                self.reply = bytes::BytesMut::new();
            }
            _ => self.reply.extend_from_slice(frame),
        }
    }

    /// Starts over (the request is sent again).
    pub fn restart(&mut self) {
        self.reply.clear();
        self.refused = false;
        self.complete = false;
    }
}

impl ResultCache {
    /// A cache configured by `[cache]`.
    pub fn new(config: &CacheConfig) -> Self {
        let stats = Arc::new(Stats::default());
        let evictions = Arc::clone(&stats);
        let entries = moka::sync::Cache::builder()
            .max_capacity(config.max_memory.unwrap_or(u64::MAX))
            .weigher(|_, entry: &Arc<Entry>| {
                let bytes = entry.reply.len() + entry.key.request.len() + ENTRY_OVERHEAD;
                u32::try_from(bytes).unwrap_or(u32::MAX)
            })
            .expire_after(PerEntryTtl)
            .eviction_listener(move |_, _, cause| {
                if cause == moka::notification::RemovalCause::Size {
                    evictions.evictions.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build();
        Self {
            config: ArcSwap::from_pointee(config.clone()),
            rules: ArcSwap::from_pointee(folded_rules(config)),
            entries,
            dbs: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            stats,
            streams: None,
        }
    }

    /// Follows each database's WAL through `streams`.
    pub fn with_streams(self, streams: stream::Streams) -> Self {
        Self {
            streams: Some(streams),
            ..self
        }
    }

    /// The configuration.
    pub fn config(&self) -> arc_swap::Guard<Arc<CacheConfig>> {
        self.config.load()
    }

    /// A reload: `cache.default_ttl` and `[[cache.rules]]` from `next` (its other keys
    /// need a restart and are kept). If either changed, every database's entries are
    /// dropped: they were stored under the old rules and TTLs.
    pub fn reconfigure(&self, next: &CacheConfig) -> bool {
        let current = self.config.load_full();
        if current.default_ttl == next.default_ttl && current.rules == next.rules {
            return false;
        }
        let mut config = (*current).clone();
        config.default_ttl = next.default_ttl;
        config.rules = next.rules.clone();
        self.rules.store(Arc::new(folded_rules(&config)));
        self.config.store(Arc::new(config));
        for db in self.dbs() {
            db.invalidate_all(&self.stats);
        }
        true
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Entries and their weight in bytes.
    pub fn size(&self) -> (u64, u64) {
        self.entries.run_pending_tasks();
        (self.entries.entry_count(), self.entries.weighted_size())
    }

    /// Every database seen so far.
    pub fn dbs(&self) -> Vec<Arc<Db>> {
        let dbs = lock(&self.dbs);
        dbs.values().cloned().collect()
    }

    /// The state of `database`, made on first use. With a stream configured it starts
    /// out bypassed; [`Self::follow`] starts its stream.
    pub fn db(&self, database: &str) -> Arc<Db> {
        let mut dbs = lock(&self.dbs);
        if let Some(db) = dbs.get(database) {
            return Arc::clone(db);
        }
        let name: Arc<str> = Arc::from(database);
        let db = Arc::new(Db {
            name: Arc::clone(&name),
            tables: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            state: AtomicU8::new(StreamState::Off as u8),
            position: AtomicU64::new(0),
            waiting: std::sync::atomic::AtomicUsize::new(0),
            advanced: tokio::sync::Notify::new(),
            slot: Mutex::new(None),
            plans: moka::sync::Cache::builder()
                .max_capacity(20_000)
                .time_to_live(Duration::from_secs(300))
                .build(),
        });
        dbs.insert(name, Arc::clone(&db));
        if self.streams.is_some() {
            db.set_state(StreamState::Idle);
        }
        db
    }

    /// With a stream configured: checks the primary's `wal_level` now, in `database`.
    pub fn check_wal_level(&self, database: &str) {
        if let Some(streams) = &self.streams {
            streams.check_wal_level(database.to_owned());
        }
    }

    /// Starts following `db`'s WAL, unless it is followed already: called for its first
    /// cacheable statement, so a database nothing is cached for has no slot.
    pub fn follow(&self, db: &Arc<Db>) {
        if let Some(streams) = &self.streams {
            // Idle -> Starting happens once: only the caller that makes it starts the stream.
            let started = db.state.compare_exchange(
                StreamState::Idle as u8,
                StreamState::Starting as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
            if started.is_ok() {
                streams.start(Arc::clone(db), Arc::clone(&self.stats));
            }
        }
    }

    /// How long entries over `tables` (names as written) live if rules cover every one of
    /// them (`None`: some table is not covered).
    pub fn rule_ttl(&self, tables: &[String]) -> Option<Duration> {
        let rules = self.rules.load();
        let mut ttl: Option<Duration> = None;
        for table in tables {
            let covering = rules
                .iter()
                .filter(|(names, _)| names.iter().any(|rule| covers(rule, table)))
                .map(|(_, ttl)| *ttl)
                .max()?;
            ttl = Some(ttl.map_or(covering, |t| t.min(covering)));
        }
        ttl
    }

    /// Looks `request` up for (`database`, `user`, `settings`) under `plan`. `floor`: the
    /// position the read must see; `replicas`: the highest replay position known of a
    /// readable replica.
    #[allow(clippy::too_many_arguments)]
    pub fn lookup(
        &self,
        db: &Db,
        user: &Arc<str>,
        settings: &Settings,
        request: Request<'_>,
        plan: &Plan,
        floor: u64,
        replicas: u64,
    ) -> Lookup {
        match db.state() {
            StreamState::Following => {
                let needed = floor.max(replicas);
                if db.position.load(Ordering::Acquire) < needed {
                    return Lookup::Behind(needed);
                }
            }
            StreamState::Off | StreamState::NotLogical => {}
            StreamState::Idle | StreamState::Starting | StreamState::Down => {
                self.stats.bypassed.fetch_add(1, Ordering::Relaxed);
                return Lookup::Bypass;
            }
        }
        let hash = key_hash(&db.name, user, settings, request);
        if let Some(entry) = self.entries.get(&hash) {
            let same = *entry.key.database == *db.name
                && entry.key.user == *user
                && same_settings(&entry.key.settings, settings)
                && same_request(&entry.key.request, request);
            if same && entry.current(db) {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                return Lookup::Hit(entry.reply.clone());
            }
            if same {
                self.entries.invalidate(&hash);
            }
        }
        let mut pending = lock(&self.pending);
        if let Some(fill) = pending.get(&hash) {
            if fill.has_changed().is_ok() {
                return Lookup::Wait(fill.clone());
            }
        }
        let (done, waiting) = watch::channel(());
        pending.insert(hash, waiting);
        drop(pending);
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        // Versions first, then the floor: a change between the two shows as a new version.
        let versions: Box<[(Arc<TableState>, u64)]> = plan
            .tables
            .iter()
            .map(|t| (Arc::clone(t), t.version.load(Ordering::Acquire)))
            .collect();
        let floor = plan
            .tables
            .iter()
            .map(|t| t.last_change.load(Ordering::Acquire))
            .max()
            .unwrap_or(0);
        Lookup::Miss(Fill {
            hash,
            key: Key {
                database: Arc::clone(&db.name),
                user: Arc::clone(user),
                settings: settings.clone(),
                request: request.parts.concat().into_boxed_slice(),
            },
            generation: db.generation.load(Ordering::Acquire),
            versions,
            ttl: plan.ttl,
            reply: bytes::BytesMut::new(),
            refused: false,
            complete: false,
            max: usize::try_from(self.config.load().max_entry_size.unwrap_or(u64::MAX))
                .unwrap_or(usize::MAX),
            floor,
            _done: done,
        })
    }

    /// Stores a fill whose request succeeded, unless something rules it out.
    pub fn store(&self, db: &Db, fill: Fill) {
        let Fill {
            hash,
            key,
            generation,
            versions,
            ttl,
            reply,
            refused,
            ..
        } = fill;
        let entry = Entry {
            key,
            reply: reply.freeze(),
            generation,
            versions,
            ttl,
        };
        let max = self.config.load().max_entry_size.unwrap_or(u64::MAX);
        let fits = u64::try_from(entry.reply.len()).is_ok_and(|n| n <= max);
        let serving = matches!(
            db.state(),
            StreamState::Following | StreamState::Off | StreamState::NotLogical
        );
        if !refused && fits && serving && entry.current(db) {
            self.entries.insert(hash, Arc::new(entry));
            self.stats.fills.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.fills_refused.fetch_add(1, Ordering::Relaxed);
        }
        self.forget_pending(hash);
    }

    /// A fill that will not be stored (its request failed, or the client left).
    pub fn abandon(&self, fill: Fill) {
        self.stats.fills_refused.fetch_add(1, Ordering::Relaxed);
        self.forget_pending(fill.hash);
    }

    fn forget_pending(&self, hash: u64) {
        let mut pending = lock(&self.pending);
        pending.remove(&hash);
    }

    /// Tables (names as written) changed at WAL position `position` (0: unknown): their
    /// entries are dropped, and fills read at least that position from now on.
    pub fn invalidate(&self, db: &Db, tables: &[impl AsRef<str>], position: u64) {
        db.invalidate(tables, position, &self.stats);
    }

    /// Drops every entry of `db`.
    pub fn invalidate_all(&self, db: &Db) {
        db.invalidate_all(&self.stats);
    }

    /// Counts a cacheable read that went to a server without a fill.
    pub fn count_bypass(&self) {
        self.stats.bypassed.fetch_add(1, Ordering::Relaxed);
    }
}

/// `[[cache.rules]]`: each rule's tables, folded, with its TTL.
fn folded_rules(config: &CacheConfig) -> Vec<(Vec<String>, Duration)> {
    config
        .rules
        .iter()
        .map(|rule| {
            (
                rule.tables.iter().map(|t| table_name(t)).collect(),
                rule.ttl.unwrap_or(config.default_ttl),
            )
        })
        .collect()
}

/// True if the rule's table `rule` covers the statement's `table` (names folded): the same
/// name; an unqualified statement table with the rule's own name (the search path decides
/// its schema, and invalidation goes by name); or an unqualified rule, any schema.
fn covers(rule: &str, table: &str) -> bool {
    rule == table
        || (!table.contains('.') && bare_name(rule) == table)
        || (!rule.contains('.') && bare_name(table) == rule)
}

/// Settings that do not change a result: pgway's own, and `application_name`.
fn in_key(name: &str) -> bool {
    !name.starts_with("pgway.") && name != "application_name"
}

fn key_hash(database: &str, user: &str, settings: &Settings, request: Request<'_>) -> u64 {
    let mut hasher = DefaultHasher::new();
    database.hash(&mut hasher);
    user.hash(&mut hasher);
    for (name, value) in settings.iter().filter(|(name, _)| in_key(name)) {
        name.hash(&mut hasher);
        value.hash(&mut hasher);
    }
    for part in request.parts {
        hasher.write(part);
    }
    hasher.finish()
}

fn same_settings(a: &Settings, b: &Settings) -> bool {
    a == b
        || a.iter()
            .filter(|(name, _)| in_key(name))
            .eq(b.iter().filter(|(name, _)| in_key(name)))
}

fn same_request(stored: &[u8], request: Request<'_>) -> bool {
    let mut rest = stored;
    for part in request.parts {
        match rest.strip_prefix(*part) {
            Some(after) => rest = after,
            None => return false,
        }
    }
    rest.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CacheRule;
    use crate::settings::Value;

    fn cache(rules: &[(&[&str], u64)]) -> ResultCache {
        let config = CacheConfig {
            enabled: true,
            rules: rules
                .iter()
                .map(|(tables, secs)| CacheRule {
                    tables: tables.iter().map(|t| (*t).to_owned()).collect(),
                    ttl: Some(Duration::from_secs(*secs)),
                })
                .collect(),
            ..CacheConfig::default()
        };
        ResultCache::new(&config)
    }

    #[test]
    fn rules_cover_tables_by_name() {
        let c = cache(&[
            (&["accounts.user_groups", "contact_type"], 3600),
            (&["x.t"], 10),
        ]);
        let ttl = |tables: &[&str]| {
            c.rule_ttl(&tables.iter().map(|t| (*t).to_owned()).collect::<Vec<_>>())
        };
        assert_eq!(
            ttl(&["accounts.user_groups"]),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(ttl(&["user_groups"]), Some(Duration::from_secs(3600)));
        assert_eq!(ttl(&["other.user_groups"]), None);
        assert_eq!(ttl(&["any.contact_type"]), Some(Duration::from_secs(3600)));
        assert_eq!(ttl(&["user_groups", "x.t"]), Some(Duration::from_secs(10)));
        assert_eq!(ttl(&["user_groups", "y"]), None);
    }

    #[test]
    fn an_entry_is_served_until_a_table_changes_and_never_across_users() {
        let c = cache(&[(&["t"], 60)]);
        let db = c.db("appdb");
        let plan = db.plan(&["public.t".to_owned()], Duration::from_secs(60));
        let (alice, bob): (Arc<str>, Arc<str>) = (Arc::from("alice"), Arc::from("bob"));
        let settings = Settings::default();
        let request = Request {
            parts: &[b"Q", b"select * from t"],
        };
        let Lookup::Miss(mut fill) = c.lookup(&db, &alice, &settings, request, &plan, 0, 0) else {
            panic!("expected a miss");
        };
        // A second reader of the same key waits for the fill.
        assert!(matches!(
            c.lookup(&db, &alice, &settings, request, &plan, 0, 0),
            Lookup::Wait(_)
        ));
        fill.capture(b"D\0\0\0\x06\0\0");
        fill.capture(b"Z\0\0\0\x05I");
        c.store(&db, fill);
        let Lookup::Hit(reply) = c.lookup(&db, &alice, &settings, request, &plan, 0, 0) else {
            panic!("expected a hit");
        };
        assert_eq!(&reply[..], b"D\0\0\0\x06\0\0");
        assert!(matches!(
            c.lookup(&db, &bob, &settings, request, &plan, 0, 0),
            Lookup::Miss(_)
        ));
        let mut other = Settings::default();
        other.set("search_path", Value::Sql("a".into()));
        assert!(matches!(
            c.lookup(&db, &alice, &other, request, &plan, 0, 0),
            Lookup::Miss(_)
        ));
        // pgway's own settings are not part of the key.
        let mut own = Settings::default();
        own.set("pgway.last_route", Value::Raw("x".into()));
        assert!(matches!(
            c.lookup(&db, &alice, &own, request, &plan, 0, 0),
            Lookup::Hit(_)
        ));
        c.invalidate(&db, &["other_schema.t"], 42);
        assert!(matches!(
            c.lookup(&db, &alice, &settings, request, &plan, 0, 0),
            Lookup::Miss(f) if f.floor == 42
        ));
    }

    #[test]
    fn a_fill_is_not_kept_if_its_table_changed_meanwhile() {
        let c = cache(&[(&["t"], 60)]);
        let db = c.db("appdb");
        let plan = db.plan(&["t".to_owned()], Duration::from_secs(60));
        let user: Arc<str> = Arc::from("alice");
        let request = Request {
            parts: &[b"Q", b"select 1 from t"],
        };
        let Lookup::Miss(fill) = c.lookup(&db, &user, &Settings::default(), request, &plan, 0, 0)
        else {
            panic!("expected a miss");
        };
        c.invalidate(&db, &["t"], 7);
        c.store(&db, fill);
        assert_eq!(c.stats().fills_refused.load(Ordering::Relaxed), 1);
        assert!(matches!(
            c.lookup(&db, &user, &Settings::default(), request, &plan, 0, 0),
            Lookup::Miss(_)
        ));
    }
}
