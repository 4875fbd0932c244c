//! Read-your-writes in the session: after a request that may have written commits on the
//! primary, the WAL position that covers it raises the client's floor before the client
//! sees ReadyForQuery; a read under a floor goes to a replica that has replayed it, or
//! (after `routing.read_your_writes_wait`) to the primary.
//!
//! The position comes from `pg_current_wal_insert_lsn()`, sent in the same write as the
//! request, right after it, on the same connection (no extra round trip): the insert
//! position covers the commit record even under `synchronous_commit = off`, where the
//! write position can lag it. The client's ReadyForQuery is held until that answer is in.
//! After a write that commits on its own, the position is asked with a FunctionCall: no
//! statement on the connection, and no parser, planner or executor on the server. After a
//! lone `COMMIT` (a simple query), both go in one extended-protocol batch with one Sync
//! ([`Session::queue_joined_commit`]), and after a `COMMIT` the client executes in the
//! extended protocol, the query goes in front of the client's Sync
//! ([`Session::join_position_before_sync`]): the server answers them in one write. That
//! query is a statement prepared once per server connection (in its statement cache, like
//! the clients' statements), so the server does not parse and plan it per commit.
//!
//! pgway's own settings for it live here too: `pgway.min_lsn` (a token), and the read-only
//! `pgway.last_write_lsn` and `pgway.last_route`, made current on the server connection only
//! for the statements that read them.

use std::sync::Arc;

use super::effects::unquoted;
use super::relay::{Expect, Reply};
use super::{Session, SessionError, State};
use crate::backend::server::statement_name;
use crate::error::ClientError;
use crate::protocol::frame::{begin_frame, end_frame, put_frame};
use crate::protocol::messages::{self, write_parse, write_target};
use crate::route::fast::is_plain_commit;
use crate::route::floors::{format_lsn, parse_lsn};
use crate::route::{Classification, SessionEffect, Target, Why};
use crate::settings::{quote_literal, ClientSettings, Value};

/// pgway's setting: the WAL position the session's reads must see at least (a token
/// from another service's `pgway.last_write_lsn`).
pub const MIN_LSN_SETTING: &str = "pgway.min_lsn";
/// pgway's read-only setting: the WAL position of the connection's last write.
pub const LAST_WRITE_SETTING: &str = "pgway.last_write_lsn";
/// pgway's read-only setting: where the client's previous statement went and why.
pub const LAST_ROUTE_SETTING: &str = "pgway.last_route";

/// The WAL position query pgway sends after a COMMIT, joined to it.
const WAL_POSITION_QUERY: &str = "SELECT pg_catalog.pg_current_wal_insert_lsn()";

/// The OID of `pg_catalog.pg_current_wal_insert_lsn()`, which pgway calls with a
/// FunctionCall after a write that commits on its own. Built-in functions keep their OIDs
/// across PostgreSQL versions (it is 2852 since PostgreSQL 10 named it so);
/// `tests/read_your_writes.rs` checks it on the server the tests run.
pub const CURRENT_WAL_INSERT_LSN: u32 = 2852;

/// The key of [`WAL_POSITION_QUERY`] in a server connection's statement cache, where the
/// clients' statements are keyed by a hash of their content (its server-side name is
/// `statement_name(WAL_POSITION_KEY)`, as for theirs).
const WAL_POSITION_KEY: u64 = 0x7767_7761_795f_6c73;

/// The position a read just made saw (sent after a cacheable read that missed): a
/// replica's replay position, the primary's flush position (every commit acknowledged by
/// then is flushed, and the invalidation stream decodes only flushed WAL; the insert
/// position can run ahead of it by records the WAL writer flushes later).
const SEEN_POSITION_QUERY: &str = "SELECT coalesce(pg_catalog.pg_last_wal_replay_lsn(), \
     pg_catalog.pg_current_wal_flush_lsn())";

/// The read-your-writes hints of a request's statements, and whether they read pgway's
/// own per-statement settings.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct ReadHints {
    /// The highest `pgway:min_lsn=`.
    pub min_lsn: u64,
    /// Some statement says `pgway:fresh`.
    pub fresh: bool,
    /// Some statement mentions `pgway.last_write_lsn`.
    pub last_write: bool,
    /// Some statement mentions `pgway.last_route`.
    pub last_route: bool,
}

impl ReadHints {
    /// One statement's hints.
    pub fn of(c: &Classification) -> Self {
        let mut hints = Self::default();
        hints.add(c);
        hints
    }

    /// Adds one statement's hints.
    pub fn add(&mut self, c: &Classification) {
        self.min_lsn = self.min_lsn.max(c.min_lsn);
        self.fresh |= c.fresh;
        if !c.session.is_empty() {
            for effect in &c.session {
                match effect {
                    SessionEffect::UsesLastWriteLsn => self.last_write = true,
                    SessionEffect::UsesLastRoute => self.last_route = true,
                    _ => {}
                }
            }
        }
    }

    /// Adds another request part's hints.
    pub fn merge(&mut self, other: Self) {
        self.min_lsn = self.min_lsn.max(other.min_lsn);
        self.fresh |= other.fresh;
        self.last_write |= other.last_write;
        self.last_route |= other.last_route;
    }
}

/// The session's `pgway.min_lsn` (0 when unset).
pub(super) fn min_lsn(settings: &ClientSettings) -> u64 {
    match settings.current.get(MIN_LSN_SETTING) {
        Some(Value::Raw(value) | Value::Sql(value)) => parse_lsn(unquoted(value)).unwrap_or(0),
        None => 0,
    }
}

/// What pgway refuses of a `SET name = value` of its freshness settings.
pub(super) fn refusal(name: &str, value: &str) -> Option<ClientError> {
    if name == LAST_WRITE_SETTING {
        Some(ClientError::ReadOnlyParameter(LAST_WRITE_SETTING))
    } else if name == LAST_ROUTE_SETTING {
        Some(ClientError::ReadOnlyParameter(LAST_ROUTE_SETTING))
    } else if name == MIN_LSN_SETTING && parse_lsn(unquoted(value)).is_none() {
        Some(ClientError::InvalidLsn(unquoted(value).to_owned()))
    } else {
        None
    }
}

/// Refuses a startup `pgway.min_lsn` that is not a WAL position.
pub(super) fn check_startup(settings: &ClientSettings) -> Result<(), ClientError> {
    let value = settings.startup.get(MIN_LSN_SETTING);
    match value {
        Some(Value::Raw(value) | Value::Sql(value)) => match refusal(MIN_LSN_SETTING, value) {
            Some(e) => Err(e),
            None => Ok(()),
        },
        None => Ok(()),
    }
}

/// The insert position as the end of the last record: right after a page boundary the
/// insert position points past the next page's header (24 bytes, 40 at the start of a
/// segment), where no record can end, while a replica that replayed the last record
/// reports the boundary itself. (Default page and segment sizes; with others a read may
/// only wait for the next record.)
fn record_end(position: u64) -> u64 {
    const PAGE: u64 = 8192;
    const SEGMENT: u64 = 16 << 20;
    if position % SEGMENT == 40 {
        position - 40
    } else if position % PAGE == 24 {
        position - 24
    } else {
        position
    }
}

impl Session<'_> {
    /// After a request that ends with ReadyForQuery is queued: if it may commit a write,
    /// the WAL position query follows it.
    pub(super) fn queue_wal_position(&mut self) {
        if self.request.joined {
            // Queued with the request's COMMIT.
            return;
        }
        if self.request.ask_seen && self.state.link().is_some() {
            messages::query(&mut self.to_server, SEEN_POSITION_QUERY);
            self.expect(Reply::WalPosition, false, None);
            return;
        }
        if self.floor.is_none() {
            return;
        }
        let Some(link) = self.state.link() else {
            return;
        };
        if link.replica {
            // Nothing written there; the position query would only fail.
            return;
        }
        let commits = if link.status == b'I' {
            self.request.may_write
        } else {
            (self.txn.wrote || self.request.may_write) && self.request.commits
        };
        if !commits {
        } else if self.request.copies {
            // A query sent behind a COPY FROM STDIN would reach the server as copy data:
            // this one is asked once the request is answered (its ReadyForQuery waits).
            self.request.wal_deferred = true;
        } else {
            self.queue_wal_query(false);
        }
    }

    /// Whether the WAL position query can join a `COMMIT` sent now, before its Sync: the
    /// connection is the primary's, in a transaction (not failed) that wrote, and owned by
    /// no client's prepared statements; the server is not skipping to a Sync.
    fn position_joins(&self) -> bool {
        self.floor.is_some()
            && (self.txn.wrote || self.request.may_write)
            && !self.request.copies
            && !self.pins()
            && self
                .state
                .link()
                .is_some_and(|link| !link.replica && link.status == b'T' && !link.skipping)
    }

    /// Queues a client's lone `COMMIT` (a simple query) with the WAL position query
    /// joined to it, if one follows: Parse, Bind and Execute of its text, answered like the
    /// simple query (ParseComplete and BindComplete are swallowed), the position's Bind
    /// and Execute, and one Sync for both. PostgreSQL answers the two in one write, where a
    /// simple query and a Sync would each end with a ReadyForQuery and a write of its own.
    /// The `COMMIT` commits at its Execute, so the position still covers it. False if it
    /// does not apply (the caller sends the query).
    pub(super) fn queue_joined_commit(&mut self, sql: &[u8]) -> bool {
        if !(is_plain_commit(sql) && self.position_joins()) {
            return false;
        }
        let out = &mut self.to_server;
        // The unnamed statement, no parameter types (a count of 0).
        write_parse(out, b"", sql, &[0, 0]);
        // Bind it to the unnamed portal: no parameters, text results.
        put_frame(out, b'B', &[0, 0, 0, 0, 0, 0, 0, 0]);
        put_frame(out, b'E', &[0, 0, 0, 0, 0]);
        self.expect(Reply::Parse, false, None);
        self.expect(Reply::Bind, false, None);
        self.expect(Reply::Execute, true, None);
        self.queue_wal_query(true);
        put_frame(&mut self.to_server, b'S', &[]);
        self.expect(Reply::Sync, true, None);
        true
    }

    /// Before the Sync of a client's extended-protocol batch whose last Execute ran a
    /// plain `COMMIT` (see [`Self::queue_joined_commit`]): the WAL position query joins it,
    /// and the client's Sync ends both.
    pub(super) fn join_position_before_sync(&mut self) {
        if std::mem::take(&mut self.request.commit_executed) && self.position_joins() {
            self.queue_wal_query(true);
        }
    }

    /// A client pinned to the connection (or being pinned by this request) owns what
    /// `pg_prepared_statements` shows there.
    fn pins(&self) -> bool {
        self.is_pinned()
            || self
                .request
                .effects
                .iter()
                .any(|effect| matches!(effect, SessionEffect::Pin(_)))
    }

    /// Queues the WAL position query. On its own (after a request with a Sync or a simple
    /// query of its own): a FunctionCall of `pg_current_wal_insert_lsn()`, which needs no
    /// statement on the connection and runs without the parser, planner and executor of a
    /// statement (see [`CURRENT_WAL_INSERT_LSN`]). `joined` to a `COMMIT`, before the Sync
    /// they share (a FunctionCall would end with a ReadyForQuery of its own): Bind and
    /// Execute of its prepared statement, after a Parse where the connection does not have
    /// it yet, and no Sync. Any error in that answer makes the connection forget the
    /// statement (see [`Self::on_wal_position_frame`]): the next Parse is then preceded by
    /// a Close, as pgway cannot tell whether the server kept it. A pinned client owns what
    /// `pg_prepared_statements` shows on its connection, so its COMMIT is never joined
    /// (see [`Self::position_joins`]).
    fn queue_wal_query(&mut self, joined: bool) {
        if !joined {
            // OID, no argument format codes, no arguments, a binary result.
            let mut body = [0; 10];
            body[..4].copy_from_slice(&CURRENT_WAL_INSERT_LSN.to_be_bytes());
            body[9] = 1;
            put_frame(&mut self.to_server, b'F', &body);
            self.expect(Reply::WalPosition, false, None);
            return;
        }
        let capacity = self.shared.config.load().pool.statement_cache;
        let Some(link) = self.state.link_mut() else {
            return;
        };
        let name = statement_name(WAL_POSITION_KEY);
        let out = &mut self.to_server;
        let parses = !link.conn.statements.touch(WAL_POSITION_KEY);
        if parses {
            write_target(out, b'C', b'S', &name);
            // No parameter types (a count of 0).
            write_parse(out, &name, WAL_POSITION_QUERY.as_bytes(), &[0, 0]);
            if let Some(evicted) = link.conn.statements.insert(WAL_POSITION_KEY, capacity) {
                write_target(out, b'C', b'S', &statement_name(evicted));
            }
        }
        // Bind: the unnamed portal, no parameters, text results; Execute it.
        let start = begin_frame(out, b'B');
        out.extend_from_slice(&[0]);
        out.extend_from_slice(&name);
        out.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0]);
        end_frame(out, start);
        put_frame(out, b'E', &[0, 0, 0, 0, 0]);
        // A failed COMMIT makes the server skip to the Sync, a Parse of it too.
        let prepared = parses.then_some(WAL_POSITION_KEY);
        self.expect(Reply::WalRow, false, prepared);
        self.request.joined = true;
    }

    /// After a request whose WAL position query was deferred (a COPY): asks it now, and
    /// relays its answer, which lets the client's ReadyForQuery go.
    pub(super) async fn ask_deferred_wal_position(&mut self) -> Result<(), SessionError> {
        if !std::mem::take(&mut self.request.wal_deferred) {
            return Ok(());
        }
        if self.request.held_ready.is_none() {
            return Ok(());
        }
        self.queue_wal_query(false);
        self.send_and_relay(true).await
    }

    /// Before the client's ReadyForQuery goes out: the ParameterStatus its resets owe it
    /// first; and if the WAL position query follows, it is held until that answer is in.
    /// True if held.
    #[inline]
    pub(super) fn before_ready(&mut self, frame: &[u8]) -> bool {
        if !self.request.effects.is_empty() {
            self.report_resets();
        }
        (self.expected.len() > 1 || self.request.wal_deferred || self.request.joined)
            && self.hold_ready(frame)
    }

    fn hold_ready(&mut self, frame: &[u8]) -> bool {
        let follows = matches!(
            self.expected.get(1),
            Some(Expect::Server {
                kind: Reply::WalPosition,
                ..
            })
        ) || (self.request.wal_deferred && self.expected.len() == 1)
            || self.request.joined;
        if follows {
            // A ReadyForQuery: its status byte is all it says.
            self.request.held_ready = Some(frame.get(5).copied().unwrap_or(b'E'));
        }
        follows
    }

    /// A reply to the WAL position query: nothing of it reaches the client (an error, say
    /// in a failed transaction, only means no position); at its end the floor is raised
    /// if the client's request left no transaction open, and the client's ReadyForQuery
    /// goes out. Joined to a `COMMIT`, its answer ends at CommandComplete (or the error),
    /// and the Sync's ReadyForQuery, the client's, releases it.
    pub(super) fn on_wal_position_frame(&mut self, frame: &[u8]) {
        match frame[0] {
            b'A' => self.out.extend_from_slice(frame),
            // Only the joined query is a prepared statement, which the connection may
            // have lost.
            b'E' if self.request.joined => {
                if let Some(link) = self.state.link_mut() {
                    link.conn.statements.remove(WAL_POSITION_KEY);
                }
                self.expected.pop_front();
            }
            b'V' => {
                // FunctionCallResponse: int32 length, the 8-byte binary `pg_lsn`.
                self.request.wal_position = frame
                    .get(9..17)
                    .and_then(|value| value.try_into().ok())
                    .map(|value| record_end(u64::from_be_bytes(value)));
            }
            b'D' => {
                // One column: int16 count, int32 length, the text.
                let text = frame
                    .get(11..)
                    .and_then(|text| std::str::from_utf8(text).ok());
                self.request.wal_position = text.and_then(parse_lsn).map(record_end);
            }
            b'C' if self.request.joined => {
                self.expected.pop_front();
            }
            b'Z' => {
                self.expected.pop_front();
                self.release_ready();
            }
            _ => {}
        }
    }

    /// The WAL position is in (or known lost): the floor is raised if the client's request
    /// left no transaction open, and the client's held ReadyForQuery goes out.
    pub(super) fn release_ready(&mut self) {
        self.request.joined = false;
        let Some(ready) = self.request.held_ready.take() else {
            return;
        };
        let position = self.request.wal_position.take();
        if std::mem::take(&mut self.request.ask_seen) {
            self.saw(position.unwrap_or(0));
            messages::ready_for_query(&mut self.out, ready);
            return;
        }
        let kept = std::mem::take(&mut self.request.kept_writes) && !self.txn.rolled_back;
        let ended = ready == b'I';
        if ended {
            self.end_written(kept, position.unwrap_or(0));
        }
        match (kept && ended, position, &self.floor) {
            (true, Some(position), Some(floor)) => {
                floor.raise(position);
                self.last_write = position;
                self.position_lost = false;
            }
            // The query failed (its statement was gone, say): as when it went with
            // its server, the next read looks the primary's position up.
            (true, None, Some(_)) => self.position_lost = true,
            _ => {}
        }
        messages::ready_for_query(&mut self.out, ready);
    }

    /// The position a read must see now (0: none): the scope's floor, `pgway.min_lsn`,
    /// and the statement's own hints.
    pub(super) fn read_floor(&self) -> u64 {
        let floor = self.floor.as_ref().map_or(0, |floor| floor.get());
        floor.max(self.min_lsn).max(self.request.min_position)
    }

    /// Before a request is sent: its hints' position for its reads. True if it is a
    /// `pgway:fresh` read, for which [`Self::fresh_target`] looks up the primary's
    /// current position.
    pub(super) fn apply_read_hints(&mut self, hints: ReadHints, target: Target) -> bool {
        self.request.min_position = hints.min_lsn;
        self.wants_fresh_target(hints, target)
    }

    /// Whether a read to `target` with `hints` needs [`Self::fresh_target`].
    pub(super) fn wants_fresh_target(&self, hints: ReadHints, target: Target) -> bool {
        target == Target::Replica && (hints.fresh || self.position_lost)
    }

    /// A `pgway:fresh` read (or the first read after a write whose position was lost):
    /// under the primary's current position (one look-up serves every read waiting for
    /// one), or, if that fails, on the primary.
    pub(super) async fn fresh_target(&mut self, target: Target) -> Target {
        let shared = self.shared;
        let Some(primary) = shared.topology.primary() else {
            return target;
        };
        let wait = shared.config.load().pool.connect_timeout;
        match shared.replay.primary_position(&primary, wait).await {
            Some(position) => {
                self.request.min_position = self.request.min_position.max(position);
                if std::mem::take(&mut self.position_lost) {
                    // The primary's position now covers the write whose own was lost.
                    if let Some(floor) = &self.floor {
                        floor.raise(position);
                    }
                    self.last_write = self.last_write.max(position);
                }
                target
            }
            None => Target::Primary,
        }
    }

    /// Why a statement of a client that holds its server connection goes there.
    pub(super) fn held_why(&self) -> Why {
        match &self.state {
            State::Pinned(..) => Why::Pinned,
            State::Attached(link) if link.replica => Why::ReadOnlyTransaction,
            _ => Why::InTransaction,
        }
    }

    /// Records where the request about to be sent goes and why (unless it asks about the
    /// last route itself, which must stay the previous statement's).
    #[inline]
    pub(super) fn note_route(&mut self, why: Why, hints: ReadHints) {
        if !hints.last_route {
            self.last_route = why;
        }
    }

    /// The request's route changed on the way (the floor, a refusal).
    pub(super) fn reroute(&mut self, why: Why) {
        if !self.request.quiet_route {
            self.last_route = why;
        }
    }

    /// Before a request that reads pgway's per-statement settings runs: they are made
    /// current on the connection it runs on.
    #[inline]
    pub(super) fn track_pgway_settings(&mut self, hints: ReadHints) {
        self.request.quiet_route = hints.last_route;
        if hints.last_route {
            self.make_current(LAST_ROUTE_SETTING, self.last_route.to_string());
        }
        if hints.last_write {
            self.make_current(LAST_WRITE_SETTING, format_lsn(self.last_write));
        }
    }

    /// Sets one of pgway's read-only settings for the client and on its connection.
    fn make_current(&mut self, name: &str, value: String) {
        self.settings.current.set(name, Value::Raw(value.clone()));
        if self.state.link().is_some_and(|link| link.skipping) {
            // The server discards everything until Sync (an earlier error of the batch):
            // it would not answer a settings query, and the statement will not run.
            return;
        }
        match self.state.status() {
            b'I' => self.sync_settings(),
            // Inside a transaction a session-level SET could be rolled back behind pgway's
            // back: the value is set for the transaction only.
            b'T' => self.set_for_transaction(name, &value),
            _ => {}
        }
    }

    /// `set_config(name, value, true)` in front of the request, its answer swallowed.
    fn set_for_transaction(&mut self, name: &str, value: &str) {
        let sql = format!(
            "SELECT pg_catalog.set_config({}, {}, true)",
            quote_literal(name),
            quote_literal(value)
        );
        messages::query(&mut self.to_server, &sql);
        self.expect(Reply::Query, false, None);
    }

    /// For a read under a floor: a readable replica that has replayed it (waiting up to
    /// `routing.read_your_writes_wait` for one), else `None` (the primary then).
    pub(super) async fn replica_at(&self, position: u64) -> Option<Arc<str>> {
        let shared = self.shared;
        let candidates = shared.topology.readable_replicas();
        let wait = shared.config.load().routing.read_your_writes_wait;
        let found = shared.replay.first_at(&candidates, position, wait).await;
        found.map(|(addr, _)| addr)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_insert_position_past_a_page_header_is_the_boundary() {
        use super::record_end;
        assert_eq!(record_end(3 * 8192 + 24), 3 * 8192);
        assert_eq!(record_end((5 << 24) + 40), 5 << 24);
        assert_eq!(record_end(3 * 8192 + 48), 3 * 8192 + 48);
    }
}
