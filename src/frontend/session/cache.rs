//! The result cache in the session: a read outside a transaction is looked up before it is
//! sent; a hit is answered from memory, a miss is sent (under the floor of its tables'
//! last changes) and its reply, captured as it is relayed, is stored at its ReadyForQuery.
//! Writes through pgway drop their tables' entries at their commit, before the client
//! sees the reply.

use std::sync::Arc;

use super::batch::Batch;
use super::freshness::ReadHints;
use super::prepared::Prepared;
use super::{Session, SessionError, State};
use crate::cache::{Db, Fill, Lookup, Plan, Request, StreamState, FILL_WAIT};
use crate::protocol::frame::put_frame;
use crate::protocol::messages::{self, Bind, Parse};
use crate::route::catalog::{Cacheable, Volatility};
use crate::route::{Classification, Hint, StatementKind, Target, Why};

/// The session's handle on the cache.
#[derive(Debug)]
pub(super) struct SessionCache {
    db: Arc<Db>,
    user: Arc<str>,
}

impl SessionCache {
    pub fn new(db: Arc<Db>, user: &str) -> Self {
        Self {
            db,
            user: Arc::from(user),
        }
    }
}

/// An extended-protocol batch the cache can answer: `[Parse] Bind [Describe portal]
/// Execute Sync` on the unnamed portal, all rows.
pub(super) struct CachedBatch<'a> {
    parse: Option<Parse<'a>>,
    bind: Bind<'a>,
    describe: bool,
}

impl<'a> CachedBatch<'a> {
    /// The batch's shape, if it is one the cache answers.
    pub fn of(batch: &'a Batch) -> Option<Self> {
        // At most Parse, Bind, Describe, Execute and Sync.
        let mut frames: [&'a [u8]; 5] = [&[]; 5];
        if batch.len() > frames.len() {
            return None;
        }
        for (slot, frame) in frames.iter_mut().zip(batch.iter()) {
            *slot = frame;
        }
        Self::of_frames(&frames[..batch.len()])
    }

    /// [`Self::of`] of the batch's messages.
    fn of_frames(batch: &[&'a [u8]]) -> Option<Self> {
        let (last, rest) = batch.split_last()?;
        if last[0] != b'S' {
            return None;
        }
        let (parse, rest) = match rest.first() {
            Some(&f) if f[0] == b'P' => (Some(Parse::decode(f).ok()?), &rest[1..]),
            _ => (None, rest),
        };
        let [bind, rest @ ..] = rest else {
            return None;
        };
        if bind[0] != b'B' {
            return None;
        }
        let bind = Bind::decode(bind).ok()?;
        if !bind.portal.is_empty() || parse.as_ref().is_some_and(|p| p.name != bind.statement) {
            return None;
        }
        let (describe, rest) = match rest.first() {
            Some(f) if f[0] == b'D' => {
                let target = messages::Target::decode(f).ok()?;
                if target.kind != b'P' || !target.name.is_empty() {
                    return None;
                }
                (true, &rest[1..])
            }
            _ => (false, rest),
        };
        // Execute of the unnamed portal, every row: an empty name and a zero row limit.
        match rest {
            [execute] if execute.len() == 10 && execute[0] == b'E' && execute[5..] == [0; 5] => {
                Some(Self {
                    parse,
                    bind,
                    describe,
                })
            }
            _ => None,
        }
    }
}

impl Session<'_> {
    /// Whether the request about to be sent may use the cache at all: outside a
    /// transaction, not asking for the primary's freshness (`pgway:fresh`, a primary
    /// target), not reading pgway's per-statement settings.
    fn may_cache(&self, hints: ReadHints, hint: Option<Hint>) -> bool {
        self.cache.is_some()
            && matches!(self.state, State::Idle)
            && !hints.fresh
            && !hints.last_route
            && !hints.last_write
            && hint.or(self.target) != Some(Hint::Primary)
    }

    /// A simple query: answered from the cache (true), or sent with a fill (or without).
    pub(super) async fn cached_query(
        &mut self,
        sql: &[u8],
        c: &Classification,
        hints: ReadHints,
    ) -> Result<bool, SessionError> {
        if !self.may_cache(hints, c.hint) || !c.cache.query {
            return Ok(false);
        }
        let Some(plan) = self.cache_plan(sql, c).await else {
            return Ok(false);
        };
        let Some(reply) = self.look_up(&[b"Q", sql], &plan).await else {
            return Ok(false);
        };
        self.out.extend_from_slice(&reply);
        self.answered_from_cache().await
    }

    /// An extended-protocol batch: answered from the cache (true), or sent with a fill
    /// (or without).
    pub(super) async fn cached_batch(
        &mut self,
        batch: &Batch,
        route: Option<&(Target, Why)>,
        hints: ReadHints,
    ) -> Result<bool, SessionError> {
        if !self.may_cache(hints, None) {
            return Ok(false);
        }
        let Some(shape) = CachedBatch::of(batch) else {
            return Ok(false);
        };
        // The statement parsed in this batch, else the client's prepared one (its own
        // handle, so the session can be borrowed again below).
        let prepared: Option<Arc<Prepared>> = match &shape.parse {
            Some(_) => None,
            None => match self.statement(shape.bind.statement) {
                Some(prepared) => Some(Arc::clone(prepared)),
                None => return Ok(false),
            },
        };
        let (sql, types): (&[u8], &[u8]) = match (&shape.parse, &prepared) {
            (Some(parse), _) => (parse.sql, parse.param_types),
            (None, Some(prepared)) => (&prepared.sql, &prepared.param_types),
            (None, None) => return Ok(false),
        };
        let Ok(text) = std::str::from_utf8(sql) else {
            return Ok(false);
        };
        let c = self.shared.router.classification(text);
        if !c.cache.query || c.hint == Some(Hint::Primary) {
            return Ok(false);
        }
        if let Some(parse) = &shape.parse {
            if !parse.name.is_empty() && self.statements.contains_key(parse.name) {
                // The server path reports the duplicate.
                return Ok(false);
            }
        }
        let Some(plan) = self.cache_plan(sql, &c).await else {
            return Ok(false);
        };
        let describe: &[u8] = if shape.describe { b"D" } else { b"-" };
        let parts: [&[u8]; 6] = [b"E", sql, b"\0", types, shape.bind.rest, describe];
        let Some(reply) = self.look_up(&parts, &plan).await else {
            return Ok(false);
        };
        if let Some(parse) = &shape.parse {
            let route = route.cloned().unwrap_or((Target::Replica, Why::PlainRead));
            self.remember(parse, route, c.session.clone(), Some(&c));
            put_frame(&mut self.out, b'1', &[]);
        }
        self.out.extend_from_slice(&reply);
        self.answered_from_cache().await
    }

    async fn answered_from_cache(&mut self) -> Result<bool, SessionError> {
        self.last_route = Why::Cache;
        self.shared.metrics.query(crate::metrics::Route::Cache);
        if let Some(registered) = &self.registered {
            registered.entry.queried(1);
        }
        messages::ready_for_query(&mut self.out, b'I');
        self.flush().await?;
        Ok(true)
    }

    /// Looks the request up: the reply on a hit; on a miss, a fill is started (and the
    /// request's floor raised to its tables' last change) and `None` returned, as when the
    /// cache cannot serve now.
    async fn look_up(&mut self, parts: &[&[u8]], plan: &Plan) -> Option<bytes::Bytes> {
        let handle = self.cache.as_ref()?;
        let (db, user) = (Arc::clone(&handle.db), Arc::clone(&handle.user));
        let cache = self.shared.cache.as_ref()?;
        let (epoch, seen) = self.seen;
        let seen = if epoch == db.epoch() { seen } else { 0 };
        let floor = self.read_floor().max(seen);
        let replicas = self.known_replica_position();
        let request = Request { parts };
        let (mut waited, mut caught_up) = (false, false);
        // What the read sees is asked with it, so a later hit is no older; and if it goes
        // to a server, that server must have replayed what earlier reads saw: the client's
        // reads never go back, from the cache or not.
        self.request.ask_seen = true;
        self.request.min_position = self.request.min_position.max(seen);
        loop {
            match cache.lookup(
                &db,
                &user,
                &self.settings.current,
                request,
                plan,
                floor,
                replicas,
            ) {
                Lookup::Hit(reply) => {
                    self.request.ask_seen = false;
                    return Some(reply);
                }
                Lookup::Miss(fill) => {
                    self.request.min_position = self.request.min_position.max(fill.floor);
                    self.fill = Some(fill);
                    return None;
                }
                Lookup::Wait(mut filling) if !waited => {
                    waited = true;
                    let _ = crate::timer::timeout(FILL_WAIT, filling.changed()).await;
                }
                Lookup::Behind(position) if !caught_up => {
                    caught_up = true;
                    let wait = self.shared.config.load().routing.read_your_writes_wait;
                    if !db.wait_for(position, wait).await {
                        cache.count_bypass();
                        return None;
                    }
                }
                Lookup::Wait(_) | Lookup::Behind(_) | Lookup::Bypass => {
                    cache.count_bypass();
                    return None;
                }
            }
        }
    }

    /// A cacheable read saw `position` on its server.
    pub(super) fn saw(&mut self, position: u64) {
        if let Some(handle) = &self.cache {
            let epoch = handle.db.epoch();
            let (seen_epoch, seen) = self.seen;
            self.seen = if seen_epoch == epoch {
                (epoch, seen.max(position))
            } else {
                (epoch, position)
            };
        }
    }

    /// The highest replay position pgway knows of a readable replica.
    fn known_replica_position(&self) -> u64 {
        self.shared
            .topology
            .snapshot()
            .readable_replicas(None)
            .filter_map(|n| n.lsn)
            .max()
            .unwrap_or(0)
    }

    /// The statement's plan: worked out once per text (functions and tables looked up in
    /// the catalog), `None` if it is not cached.
    async fn cache_plan(&self, sql: &[u8], c: &Classification) -> Option<Arc<Plan>> {
        let handle = self.cache.as_ref()?;
        if let Some(known) = handle.db.known_plan(sql) {
            return known;
        }
        let plan = self.work_out_plan(&handle.db, c).await;
        handle.db.remember_plan(sql, plan.clone());
        if let (Some(_), Some(cache)) = (&plan, &self.shared.cache) {
            cache.follow(&handle.db);
        }
        plan
    }

    async fn work_out_plan(&self, db: &Db, c: &Classification) -> Option<Arc<Plan>> {
        let cache = self.shared.cache.as_ref()?;
        let facts = &c.cache;
        if !facts.query || c.kind != StatementKind::Read {
            return None;
        }
        let hint = facts.hint.as_ref();
        if facts.clock && hint.is_none() {
            return None;
        }
        let named = hint.is_some_and(|h| !h.tables.is_empty());
        let mut tables = facts.tables.clone().unwrap_or_default();
        let catalog = self.shared.router.catalog();
        for function in &c.functions {
            let answer = catalog.answer(&self.database, &self.user, function).await;
            if answer.volatility == Volatility::Volatile {
                return None;
            }
            match answer.cacheable {
                Cacheable::No => return None,
                Cacheable::TablesUnknown if !named => return None,
                Cacheable::TablesUnknown => {}
                Cacheable::Yes => tables.extend(answer.tables.iter().cloned()),
            }
        }
        if !named {
            for table in &tables {
                if !catalog
                    .is_decoded_table(&self.database, &self.user, table)
                    .await
                {
                    return None;
                }
            }
        }
        let ttl = match hint {
            Some(hint) => hint.ttl.unwrap_or(cache.config().default_ttl),
            None if tables.is_empty() => return None,
            None => cache.rule_ttl(&tables)?,
        };
        if let Some(hint) = hint {
            tables.extend(hint.tables.iter().cloned());
        }
        Some(db.plan(&tables, ttl))
    }

    /// A message the client is sent, for the fill in progress; at its ReadyForQuery the
    /// fill is stored (before the client has the reply, so its next read can hit).
    pub(super) fn capture(&mut self, frame: &[u8]) {
        if let Some(fill) = &mut self.fill {
            fill.capture(frame);
            if fill.complete {
                self.finish_fill();
            }
        }
    }

    /// After the request: its fill is stored if it succeeded whole, else dropped. (Inline:
    /// after every request, where nearly always nothing was filled.)
    #[inline]
    pub(super) fn finish_fill(&mut self) {
        if let Some(fill) = self.fill.take() {
            self.store_fill(fill);
        }
    }

    /// [`Self::finish_fill`] of a fill.
    fn store_fill(&mut self, fill: Fill) {
        let (Some(cache), Some(handle)) = (&self.shared.cache, &self.cache) else {
            return;
        };
        if fill.complete && !fill.refused {
            cache.store(&handle.db, fill);
        } else {
            cache.abandon(fill);
        }
    }

    /// The transaction is over: if what it wrote was kept (`kept`), the entries of the
    /// tables it named are dropped, or all of the database's if pgway cannot tell which
    /// (`position`: its WAL position, 0 if unknown).
    /// (Inline: at the end of every transaction, where nearly always no cache is on.)
    #[inline]
    pub(super) fn end_written(&mut self, kept: bool, position: u64) {
        if self.cache.is_some() {
            self.drop_written(kept, position);
        }
    }

    /// [`Self::end_written`] with the cache on.
    fn drop_written(&mut self, kept: bool, position: u64) {
        let written = std::mem::take(&mut self.txn.written);
        if !kept {
            return;
        }
        let (Some(cache), Some(handle)) = (&self.shared.cache, &self.cache) else {
            return;
        };
        if !written.any {
            return;
        }
        if written.schema {
            cache.invalidate_all(&handle.db);
            self.shared.router.catalog().relations_changed();
            return;
        }
        match written.tables {
            Some(tables) => cache.invalidate(&handle.db, &tables, position),
            // The stream reports which tables changed; without it, everything goes.
            None if handle.db.state() == StreamState::Following => {}
            None => cache.invalidate_all(&handle.db),
        }
    }

    /// Notes what a request about to be sent may write (`read`: its functions were shown
    /// not to write, or it goes to a replica).
    pub(super) fn note_written(&mut self, c: Option<&Classification>, read: bool) {
        if self.cache.is_none() {
            return;
        }
        match c {
            Some(c) if !c.writes || read => {}
            Some(c) => self
                .txn
                .written
                .add(c.cache.tables.as_deref(), c.cache.changes_schema),
            None => self.txn.written.add(None, true),
        }
    }
}

/// What the open transaction (or request) may have changed, for the cache.
#[derive(Debug)]
pub(super) struct Written {
    /// Something may have been written.
    any: bool,
    /// The tables named (names as written); `None`: pgway cannot tell.
    tables: Option<Vec<String>>,
    /// DDL and the like, which the invalidation stream does not report.
    schema: bool,
}

impl Default for Written {
    fn default() -> Self {
        Self {
            any: false,
            tables: Some(Vec::new()),
            schema: false,
        }
    }
}

impl Written {
    /// A statement that may write `tables` (`None`: unknown) was sent; `schema`: it may
    /// change what the stream does not report.
    pub(super) fn add(&mut self, tables: Option<&[String]>, schema: bool) {
        self.any = true;
        self.schema |= schema;
        match (&mut self.tables, tables) {
            (Some(known), Some(tables)) => known.extend(tables.iter().cloned()),
            (known, _) => *known = None,
        }
    }
}
