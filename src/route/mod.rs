//! Routing: from SQL text to a [`Target`].
//!
//! [`classify`] does the parsing (sqlparser, PostgreSQL dialect); this module adds what
//! needs state: a cache of classifications per statement text (a repeated statement is
//! never parsed again), hints, and the volatility of user functions, looked up once per
//! (database, function) in `pg_proc` through a control connection and cached.

pub mod catalog;
pub mod classify;
pub mod fast;
pub mod floors;
mod front;
#[cfg(test)]
mod fuzz;
pub mod why;

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use front::Front;

pub use catalog::{Catalog, Volatility};
pub use classify::{classify, Classification, Hint, PinReason, SessionEffect, StatementKind};
pub use why::Why;

/// Where a statement goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The primary.
    Primary,
    /// Any usable replica (the primary if there is none).
    Replica,
}

/// Statement texts whose classification is remembered.
const CLASSIFICATION_CACHE_ENTRIES: u64 = 20_000;
/// Longest statement text kept in the cache (longer ones are classified each time).
const CLASSIFICATION_CACHE_MAX_SQL: usize = 16 * 1024;

/// The key under which texts of `sql`'s shape ([`fast::shape`]) share a classification,
/// if it is not `sql` itself.
fn shared_key(sql: &str) -> Option<SharedKey> {
    match fast::shape_again(sql)? {
        Cow::Owned(shape) if shape != sql => Some(SharedKey(shape)),
        Cow::Owned(shape) => {
            fast::give_back(shape);
            None
        }
        Cow::Borrowed(_) => None,
    }
}

/// A shape that is not its text; its buffer goes back to the thread when dropped
/// ([`fast::give_back`]).
struct SharedKey(String);

impl std::ops::Deref for SharedKey {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl Drop for SharedKey {
    fn drop(&mut self) {
        fast::give_back(std::mem::take(&mut self.0));
    }
}

/// Numbers routers apart for the threads' copies of their classifications ([`Front`]).
static ROUTERS: AtomicU64 = AtomicU64::new(0);

/// The classification of every statement [`fast::is_plain_select`] accepts.
static PLAIN_READ: Classification = Classification {
    kind: StatementKind::Read,
    hint: None,
    min_lsn: 0,
    fresh: false,
    functions: Vec::new(),
    session: Vec::new(),
    writes: false,
    cache: crate::route::classify::CacheFacts {
        query: false,
        tables: None,
        clock: false,
        hint: None,
        changes_schema: false,
    },
    // A plain select commits nothing, copies nothing and lets nothing go (whatever its
    // column names are).
    words: fast::Words {
        commits: false,
        copies: false,
        releases: false,
    },
};

/// A statement's classification: the one every plain read shares, which is a static (no
/// reference count for every session on every worker to write per statement), or one
/// parsed and kept in the router's cache.
#[derive(Debug, Clone)]
pub enum Classified {
    /// [`PLAIN_READ`].
    PlainRead,
    /// Any other.
    Parsed(Arc<Classification>),
}

impl std::ops::Deref for Classified {
    type Target = Classification;

    fn deref(&self) -> &Classification {
        match self {
            Self::PlainRead => &PLAIN_READ,
            Self::Parsed(c) => c,
        }
    }
}

/// Classifies statements and decides targets.
pub struct Router {
    classifications: moka::sync::Cache<Arc<str>, Arc<Classification>>,
    /// This router's number, and how often an entry of `classifications` was changed:
    /// together they say whether a thread's copy ([`Front`]) is still this cache's.
    id: u64,
    generation: AtomicU64,
    catalog: Catalog,
    /// Statements a replica refused as writes, sent again to the primary.
    replica_retries: std::sync::atomic::AtomicU64,
    conflict_retries: std::sync::atomic::AtomicU64,
    /// The result cache is on: every statement is classified in full (the fast path knows
    /// no tables).
    cache_facts: bool,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("cached", &self.classifications.entry_count())
            .finish()
    }
}

impl Router {
    /// A router that looks functions up through `catalog`.
    pub fn new(catalog: Catalog) -> Self {
        Self {
            classifications: moka::sync::Cache::new(CLASSIFICATION_CACHE_ENTRIES),
            id: ROUTERS.fetch_add(1, Ordering::Relaxed),
            generation: AtomicU64::new(0),
            catalog,
            cache_facts: false,
            replica_retries: std::sync::atomic::AtomicU64::new(0),
            conflict_retries: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Classifies every statement in full, tables included (for the result cache).
    pub fn with_cache_facts(self) -> Self {
        Self {
            cache_facts: true,
            // Entries classified without table facts are not this router's.
            id: ROUTERS.fetch_add(1, Ordering::Relaxed),
            ..self
        }
    }

    /// The catalog look-ups (functions, relations).
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The classification of `sql`, parsed once and then served from the cache.
    pub fn classification(&self, sql: &str) -> Classified {
        if !self.cache_facts && fast::is_plain_select_again(sql.as_bytes()) {
            return Classified::PlainRead;
        }
        Classified::Parsed(self.parsed(sql))
    }

    /// [`Self::classification`] of a request's text as it came: one the fast path takes
    /// needs no UTF-8 check first (the scan reads bytes; a text in another client encoding
    /// is a plain read all the same). `None` for a text that is not UTF-8 and not a plain
    /// read: it goes to the primary unparsed.
    pub fn classification_of(&self, sql: &[u8]) -> Option<Classified> {
        if !self.cache_facts && fast::is_plain_select_again(sql) {
            return Some(Classified::PlainRead);
        }
        std::str::from_utf8(sql)
            .ok()
            .map(|sql| Classified::Parsed(self.parsed(sql)))
    }

    /// [`Self::classification`] past the fast path.
    fn parsed(&self, sql: &str) -> Arc<Classification> {
        if sql.len() > CLASSIFICATION_CACHE_MAX_SQL {
            return Arc::new(classify(sql));
        }
        let generation = self.generation.load(Ordering::Acquire);
        Front::with(self.id, generation, |front| self.cached(sql, Some(front)))
            .unwrap_or_else(|| self.cached(sql, None))
    }

    /// [`Self::classification`] from this thread's copy `front`, else from the shared cache
    /// (keeping what it finds in `front`), else parsed.
    fn cached(&self, sql: &str, mut front: Option<&mut Front>) -> Arc<Classification> {
        // The text itself first: a repeated text costs one look-up and no scan (building
        // the shape of a long text costs more than hashing it).
        if let Some(hit) = front.as_ref().and_then(|front| front.text(sql)) {
            return hit;
        }
        // Texts that differ only in inlined values share an entry under their shape. An
        // entry with session effects under the shape's key was stored for that exact text
        // (say `SET x = 0`), not for the shape: its values are not ours.
        let shape = shared_key(sql);
        let shared = |hit: &Arc<Classification>| hit.session.is_empty();
        if let (Some(front), Some(key)) = (front.as_ref(), shape.as_deref()) {
            if let Some(hit) = front.shape(key).filter(shared) {
                return hit;
            }
        }
        if let Some(hit) = self.classifications.get(sql) {
            if let Some(front) = front {
                front.keep_text(sql, &hit);
            }
            return hit;
        }
        if let Some(key) = shape.as_deref() {
            if let Some(hit) = self.classifications.get(key).filter(shared) {
                if let Some(front) = front {
                    front.keep_shape(key, &hit);
                }
                return hit;
            }
        }
        let parsed = Arc::new(classify(sql));
        self.classifications
            .insert(Arc::from(sql), Arc::clone(&parsed));
        if let Some(front) = front.as_deref_mut() {
            front.keep_text(sql, &parsed);
        }
        if let Some(shape) = shape.filter(|_| parsed.session.is_empty()) {
            if let Some(front) = front {
                front.keep_shape(&shape, &parsed);
            }
            self.classifications
                .insert(Arc::from(&*shape), Arc::clone(&parsed));
        }
        parsed
    }

    /// Where a statement goes, outside a transaction.
    pub async fn target(
        &self,
        classification: &Classification,
        database: &str,
        user: &str,
        session_hint: Option<Hint>,
    ) -> Target {
        self.decide(classification, database, user, session_hint)
            .await
            .0
    }

    /// [`Self::decide`] without waiting, for every statement that needs no function
    /// look-up (`None`: it does).
    pub fn decide_now(
        &self,
        classification: &Classification,
        session_hint: Option<Hint>,
    ) -> Option<(Target, Why)> {
        let hint = classification.hint.or(session_hint);
        let needs_lookup = classification.kind == StatementKind::Read
            && hint.is_none()
            && !classification.functions.is_empty();
        if needs_lookup {
            return None;
        }
        Some(Self::without_functions(classification, hint))
    }

    /// The decision for a statement whose functions need no look-up (none, or a hint).
    fn without_functions(classification: &Classification, hint: Option<Hint>) -> (Target, Why) {
        let from_statement = classification.hint.is_some();
        match (hint, classification.kind) {
            (Some(Hint::Primary), _) if from_statement => (Target::Primary, Why::PrimaryHint),
            (Some(Hint::Primary), _) => (Target::Primary, Why::PrimaryTarget),
            (_, StatementKind::Write) => (Target::Primary, Why::NotARead),
            (_, StatementKind::BeginReadOnly) => (Target::Replica, Why::ReadOnlyTransaction),
            (Some(Hint::Replica), _) if from_statement => (Target::Replica, Why::ReplicaHint),
            (Some(Hint::Replica), _) => (Target::Replica, Why::ReplicaTarget),
            (None, StatementKind::Read) => (Target::Replica, Why::PlainRead),
        }
    }

    /// Where a statement goes, outside a transaction, and why.
    pub async fn decide(
        &self,
        classification: &Classification,
        database: &str,
        user: &str,
        session_hint: Option<Hint>,
    ) -> (Target, Why) {
        if let Some(decision) = self.decide_now(classification, session_hint) {
            return decision;
        }
        for function in &classification.functions {
            let answer = self.catalog.answer(database, user, function).await;
            if answer.volatility != Volatility::NotVolatile {
                let why = answer
                    .why
                    .unwrap_or_else(|| Arc::from(format!("{function}, which may write")));
                return (Target::Primary, Why::Function(why));
            }
        }
        (Target::Replica, Why::ReadOnlyFunctions)
    }

    /// A replica refused a statement pgway had taken for a read; it was sent again to the
    /// primary.
    pub fn count_replica_retry(&self) {
        self.replica_retries
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// How many statements replicas refused as writes (each sent again to the primary).
    pub fn replica_retries(&self) -> u64 {
        self.replica_retries
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A replica cancelled a read for a conflict with recovery; it was sent again to the
    /// primary.
    pub fn count_conflict_retry(&self) {
        self.conflict_retries
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// How many reads replicas cancelled for recovery conflicts (each sent again to the
    /// primary).
    pub fn conflict_retries(&self) -> u64 {
        self.conflict_retries
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A replica refused `sql` as a write: from now on the text, and the functions it
    /// calls, go to the primary (until the function answers expire).
    pub fn learn_write(&self, database: &str, sql: &str, classification: &Classification) {
        tracing::info!(
            functions = ?classification.functions,
            "a replica refused a statement as a write; it ran on the primary, which its \
             text and functions now go to"
        );
        for function in &classification.functions {
            self.catalog.learn_write(database, function);
        }
        if sql.len() <= CLASSIFICATION_CACHE_MAX_SQL {
            let write = Arc::new(Classification {
                kind: StatementKind::Write,
                writes: true,
                ..classification.clone()
            });
            // Under its shape too: the same statement with other values is the same write.
            if let Some(shape) = shared_key(sql) {
                if write.session.is_empty() {
                    self.classifications
                        .insert(Arc::from(&*shape), Arc::clone(&write));
                }
            }
            self.classifications.insert(Arc::from(sql), write);
            // Every thread's copy of the old entries is dropped at its next look-up.
            self.generation.fetch_add(1, Ordering::Release);
        }
    }

    /// A function was created, replaced, altered or dropped: forget what was learned
    /// about functions.
    pub fn functions_changed(&self) {
        self.catalog.functions_changed();
    }

    /// The target for a SQL text: classification (cached) then [`Self::target`].
    pub async fn route(
        &self,
        sql: &str,
        database: &str,
        user: &str,
        session_hint: Option<Hint>,
    ) -> Target {
        let classification = self.classification(sql);
        self.target(&classification, database, user, session_hint)
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::topology::TopologyHandle;

    fn router() -> Router {
        Router::new(Catalog::new(
            TopologyHandle::new(&[]),
            catalog::Credentials::default(),
            Duration::from_millis(10),
        ))
    }

    #[test]
    fn session_values_never_come_from_another_texts_entry() {
        let r = router();
        let zero = r.classification("SET work_mem = 0");
        let five = r.classification("SET work_mem = 5");
        let value = |c: &Classification| match c.session.first() {
            Some(SessionEffect::Set { value, .. }) => value.clone(),
            other => format!("{other:?}"),
        };
        assert_eq!(
            (value(&zero), value(&five)),
            ("0".to_owned(), "5".to_owned())
        );
        assert_eq!(value(&r.classification("SET work_mem = 0")), "0");
    }

    #[test]
    fn statements_differing_in_values_share_an_entry() {
        let r = router();
        let a = r.classification("update t set v = 1 where id = 2");
        let b = r.classification("update t set v = 3 where id = 4");
        assert!(std::ptr::eq(&*a, &*b));
        assert_eq!(a.kind, StatementKind::Write);
    }

    /// Texts whose strings decide what they do never share an entry: each is classified
    /// as itself, whichever came first.
    #[test]
    fn strings_that_decide_a_statements_effects_are_not_values() {
        let r = router();
        for (plain, effect) in [
            (
                "select current_setting('work_mem')",
                "select current_setting('pgway.last_route')",
            ),
            (
                "do 'begin raise notice ''hi''; end'",
                "do 'begin perform set_config(''work_mem'', ''1MB'', false); end'",
            ),
            (
                "select set_config('work_mem', '1MB', true)",
                "select set_config('work_mem', '1MB', false)",
            ),
        ] {
            assert!(r.classification(plain).session.is_empty(), "{plain}");
            let routed = r.classification(effect);
            assert_eq!(routed.session, classify(effect).session, "{effect}");
            assert!(!routed.session.is_empty(), "{effect}");
        }
    }

    #[test]
    fn a_text_finds_its_own_words_whatever_came_before_it() {
        let r = router();
        assert!(
            !r.classification("insert into log values (1, 'x')")
                .words
                .commits
        );
        let commits = r.classification("insert into log values (2, 'commit')");
        assert!(commits.words.commits && commits.words.releases);
        let again = r.classification("insert into log values (3, 'y')");
        assert_eq!(again.words, fast::Words::default());
    }

    #[test]
    fn a_learned_write_holds_for_new_texts_of_its_shape() {
        let r = router();
        // A function call: not the fast path's (a plain select never reaches the cache).
        let sql = "select f(1)";
        let read = r.classification("select f(2)");
        assert_ne!(read.kind, StatementKind::Write);
        r.learn_write("db", sql, &read);
        // `select f(2)` keeps its own entry; texts not seen yet find the shape's.
        for text in [sql, "select f(3)", "select f(4)"] {
            let c = r.classification(text);
            assert_eq!((c.kind, c.writes), (StatementKind::Write, true), "{text}");
        }
    }

    /// Each thread keeps its own copy of the entries it used (`front.rs`): a write learned
    /// on another thread still reaches it, and another router's entries never do.
    #[test]
    fn a_learned_write_reaches_every_threads_copy_and_no_other_router() {
        let r = router();
        let read = r.classification("select g(1)");
        assert_ne!(read.kind, StatementKind::Write);
        // Served from this thread's copy of the shape.
        assert!(std::ptr::eq(&*read, &*r.classification("select g(2)")));
        std::thread::scope(|s| {
            s.spawn(|| r.learn_write("db", "select g(1)", &read));
        });
        for text in ["select g(1)", "select g(5)"] {
            let c = r.classification(text);
            assert_eq!((c.kind, c.writes), (StatementKind::Write, true), "{text}");
        }
        let other = router();
        assert_ne!(
            other.classification("select g(1)").kind,
            StatementKind::Write
        );
        assert_ne!(
            other.classification("select g(6)").kind,
            StatementKind::Write
        );
        assert_eq!(r.classification("select g(7)").kind, StatementKind::Write);
    }
}
