//! Prepared statements in transaction pooling.
//!
//! Named prepared statements live in the client's own table; on a server connection they
//! exist under pgway's names (`pgway_<keyed hash of SQL and types>`), prepared on demand, so a
//! statement prepared on one connection can be executed on any other. The unnamed
//! statement is re-sent when the connection's unnamed slot holds another client's.

use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, LazyLock};

use bytes::BytesMut;

use super::batch::{Batch, KEPT_BATCH_FRAMES};
use super::freshness::ReadHints;
use super::relay::{local_reply, Expect, Reply};
use super::{effects, Session, SessionError, State};
use crate::backend::server::{statement_name, STATEMENT_NAME_LEN};
use crate::error::ClientError;
use crate::protocol::frame::put_frame;
use crate::protocol::messages::{
    self, write_parse, write_target, Bind, BindLayout, Parse, ParseLayout,
};
use crate::route::fast::{is_plain_commit, scan_words, Words};
use crate::route::{Classification, Classified, Hint, SessionEffect, Target, Why};

/// The keys of the hash that names statements on the servers, drawn at start-up. A server
/// connection's statement cache matches statements by this hash alone, across the clients
/// of its pool: with keys a client cannot know, no client can choose a text whose name
/// is another client's statement.
static STATEMENT_HASH: LazyLock<RandomState> = LazyLock::new(RandomState::new);

/// A client's named (or unnamed) prepared statement.
#[derive(Debug)]
pub(super) struct Prepared {
    pub(super) sql: Vec<u8>,
    pub(super) param_types: Vec<u8>,
    pub(super) hash: u64,
    /// Its name on the servers, `statement_name(hash)`, made once (a Bind sends it).
    server_name: [u8; STATEMENT_NAME_LEN],
    target: Target,
    /// Session effects of executing it (SET, LISTEN, ...).
    effects: Vec<SessionEffect>,
    /// Executing it may change data (see [`Classification::writes`]).
    writes: bool,
    /// The tables it names, for the result cache (`None`: pgway cannot tell).
    tables: Option<Vec<String>>,
    /// It may change what the cache's invalidation stream does not report (DDL, ...).
    changes_schema: bool,
    /// Its read-your-writes hints (and whether it reads pgway's own settings).
    hints: ReadHints,
    /// Why it runs where `target` says.
    why: Why,
    /// What the word scan of its text found.
    words: Words,
    /// The session's `pgway.target` under which its route follows from its text alone
    /// (decided without the catalog); `None`: decided otherwise.
    route_follows_text: Option<Option<Hint>>,
}

impl Prepared {
    /// Whether `parse` parses this statement again, to run where `route` says: what pgway
    /// read from its text still holds. Drivers that send the unnamed statement with every
    /// execution (the extended protocol without a statement cache) send the same text
    /// again and again.
    fn is_parsed_again_by(&self, parse: &Parse<'_>, route: &(Target, Why)) -> bool {
        self.has_text_of(parse) && self.target == route.0 && self.why == route.1
    }

    /// Whether `parse` has this statement's text and parameter types.
    fn has_text_of(&self, parse: &Parse<'_>) -> bool {
        self.sql == parse.sql && self.param_types == parse.param_types
    }

    /// Its route, for a Parse of the same text in a session whose `pgway.target` is
    /// `session_hint`, if that follows from the text alone (what deciding again would
    /// give).
    fn route_for(&self, parse: &Parse<'_>, session_hint: Option<Hint>) -> Option<Decision> {
        let same = self.route_follows_text == Some(session_hint) && self.has_text_of(parse);
        same.then(|| (self.target, self.why.clone()))
    }
}

/// The statements a batch has parsed so far, by name (the unnamed one too), with where
/// each runs: a few in place (most batches parse one statement or none), a map past that
/// (made when needed: a map's hasher takes a seed).
#[derive(Default)]
struct ParsedInBatch<'a> {
    few: [(&'a [u8], Option<&'a Decision>); ParsedInBatch::FEW],
    len: usize,
    many: Option<foldhash::HashMap<&'a [u8], &'a Decision>>,
}

/// Where a statement runs and why.
type Decision = (Target, Why);

/// What routing a batch found out about one of its messages, for [`Session::translate`].
#[derive(Clone, Copy)]
pub(super) enum Routed<'a> {
    /// A Parse: where its statement runs, and where its fields end.
    Parse(&'a Decision, ParseLayout),
    /// A Bind: where its names end, and the statement it executes, if routing the batch
    /// looked it up.
    Bind(BindLayout, Option<&'a Arc<Prepared>>),
    /// Nothing (a Parse without a route runs on the primary).
    Nothing,
}

/// What routing a batch found out, for sending it (kept from batch to batch, so most
/// batches allocate nothing).
#[derive(Default)]
pub(super) struct BatchRoutes {
    /// Where each Parse's fields end, as it arrived (read once then), in order.
    pub(super) layouts: Vec<ParseLayout>,
    /// Where each Bind's names end, as it arrived, in order.
    pub(super) bind_layouts: Vec<BindLayout>,
    /// Where each Parse runs and why, in order.
    pub(super) parses: Vec<Decision>,
    /// The statements the batch's first Binds execute, in order, looked up once when the
    /// batch was routed. Binds past the end are looked up when sent: the list stops at
    /// the batch's first Close, which may close a statement a later Bind names, and at
    /// its first Bind of a statement it parses (there when that Bind is sent).
    pub(super) binds: Vec<Arc<Prepared>>,
}

impl BatchRoutes {
    /// The most entries a list keeps its room for, for the next batch (as for the batch).
    const KEPT: usize = KEPT_BATCH_FRAMES;

    /// Whether nothing has been collected (no batch has begun).
    pub(super) fn is_empty(&self) -> bool {
        self.layouts.is_empty() && self.bind_layouts.is_empty()
    }

    /// Empties the lists for the next batch, giving back the room of large ones.
    pub(super) fn clear(&mut self) {
        self.layouts.clear();
        self.bind_layouts.clear();
        self.parses.clear();
        self.binds.clear();
        if self.layouts.capacity() > Self::KEPT {
            self.layouts = Vec::new();
        }
        if self.bind_layouts.capacity() > Self::KEPT {
            self.bind_layouts = Vec::new();
        }
        if self.parses.capacity() > Self::KEPT {
            self.parses = Vec::new();
        }
        if self.binds.capacity() > Self::KEPT {
            self.binds = Vec::new();
        }
    }
}

impl<'a> ParsedInBatch<'a> {
    const FEW: usize = 4;

    fn insert(&mut self, name: &'a [u8], route: &'a Decision) {
        if let Some(slot) = self.few[..self.len].iter_mut().find(|(n, _)| *n == name) {
            slot.1 = Some(route);
        } else if self.len < Self::FEW {
            self.few[self.len] = (name, Some(route));
            self.len += 1;
        } else {
            self.many.get_or_insert_default().insert(name, route);
        }
    }

    fn get(&self, name: &[u8]) -> Option<&'a Decision> {
        self.few[..self.len]
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, route)| *route)
            .or_else(|| self.many.as_ref()?.get(name).copied())
    }
}

impl Session<'_> {
    /// Where every Parse in the batch would run and why (in order, into `routes`), and
    /// the batch's read-your-writes hints.
    pub(super) async fn parse_targets(
        &self,
        batch: &Batch,
        routes: &mut BatchRoutes,
    ) -> Result<ReadHints, SessionError> {
        let mut hints = ReadHints::default();
        let parses = batch.iter().filter(|f| f[0] == b'P');
        for (frame, at) in parses.zip(&routes.layouts) {
            let route = match self.parse_target_now(frame, *at, &mut hints)? {
                Ok(route) => route,
                Err(c) => {
                    let router = &self.shared.router;
                    router
                        .decide(&c, &self.database, &self.user, self.target)
                        .await
                }
            };
            routes.parses.push(route);
        }
        Ok(hints)
    }

    /// [`Self::parse_targets`] without waiting, as for nearly every batch: `None` (and
    /// `routes` as it was) if a statement's functions need their volatility looked up.
    pub(super) fn parse_targets_now(
        &self,
        batch: &Batch,
        routes: &mut BatchRoutes,
    ) -> Result<Option<ReadHints>, SessionError> {
        let mut hints = ReadHints::default();
        let parses = batch.iter().filter(|f| f[0] == b'P');
        for (frame, at) in parses.zip(&routes.layouts) {
            match self.parse_target_now(frame, *at, &mut hints)? {
                Ok(route) => routes.parses.push(route),
                Err(_) => {
                    routes.parses.clear();
                    return Ok(None);
                }
            }
        }
        Ok(Some(hints))
    }

    /// Where one Parse would run and why, adding its hints to `hints`; `Err` with its
    /// classification if that needs [`crate::route::Router::decide`]'s wait.
    fn parse_target_now(
        &self,
        frame: &[u8],
        at: ParseLayout,
        hints: &mut ReadHints,
    ) -> Result<Result<Decision, Classified>, SessionError> {
        let parse = Parse::at(frame, at).map_err(SessionError::protocol)?;
        // The unnamed statement parsed again (drivers without a statement cache): its
        // route and hints, without classifying its text again.
        if let Some(unnamed) = self.unnamed.as_ref().filter(|_| parse.name.is_empty()) {
            if let Some(route) = unnamed.route_for(&parse, self.target) {
                hints.merge(unnamed.hints);
                return Ok(Ok(route));
            }
        }
        let Ok(sql) = std::str::from_utf8(parse.sql) else {
            return Ok(Ok((Target::Primary, Why::NotARead)));
        };
        let router = &self.shared.router;
        let c = router.classification(sql);
        hints.add(&c);
        Ok(router.decide_now(&c, self.target).ok_or(c))
    }

    /// Where the batch goes (a replica only if every statement it parses or executes may
    /// go there) and why, adding the hints of the statements it executes to `hints` and
    /// the statements its Binds execute to `routes.binds`.
    pub(super) fn batch_target(
        &self,
        batch: &Batch,
        routes: &mut BatchRoutes,
        hints: &mut ReadHints,
    ) -> Result<(Target, Why), SessionError> {
        let mut route = (Target::Replica, &Why::PlainRead);
        let mut parsed = ParsedInBatch::default();
        let mut parses = routes.parses.iter().zip(&routes.layouts);
        let mut bind_layouts = routes.bind_layouts.iter();
        let binds = &mut routes.binds;
        let mut collect = true;
        for frame in batch.iter() {
            let this = match frame[0] {
                b'P' => {
                    let Some((r, at)) = parses.next() else {
                        return Ok((Target::Primary, Why::NotARead));
                    };
                    let parse = Parse::at(frame, *at).map_err(SessionError::protocol)?;
                    parsed.insert(parse.name, r);
                    (r.0, &r.1)
                }
                b'B' => {
                    let bind = match bind_layouts.next() {
                        Some(at) => Bind::at(frame, *at),
                        None => Bind::decode(frame),
                    }
                    .map_err(SessionError::protocol)?;
                    // A statement parsed in this batch: its hints are in `hints` already.
                    if let Some(r) = parsed.get(bind.statement) {
                        // Looked up when sent, as are the Binds after it (the list has
                        // no entry for it).
                        collect = false;
                        (r.0, &r.1)
                    } else {
                        let Some(p) = self.statement(bind.statement) else {
                            return Ok((Target::Primary, Why::NotARead));
                        };
                        if collect {
                            binds.push(Arc::clone(p));
                        }
                        hints.merge(p.hints);
                        (p.target, &p.why)
                    }
                }
                b'C' => {
                    collect = false;
                    continue;
                }
                _ => continue,
            };
            if this.0 == Target::Primary {
                return Ok((this.0, this.1.clone()));
            }
            route = this;
        }
        Ok((route.0, route.1.clone()))
    }

    /// The client's statement `name` (`""`: the unnamed one).
    pub(super) fn statement(&self, name: &[u8]) -> Option<&Arc<Prepared>> {
        if name.is_empty() {
            self.unnamed.as_ref()
        } else {
            self.statements.get(name)
        }
    }

    /// Appends one client message, rewritten for the attached server, to `to_server`, and
    /// records what to expect back.
    /// `routed`: for a Parse, where it runs; for a Bind, the statement it executes, if
    /// routing the batch looked it up (else it is looked up here).
    pub(super) fn translate(
        &mut self,
        frame: &[u8],
        routed: Routed<'_>,
    ) -> Result<(), SessionError> {
        let server_skips = self.state.link().is_some_and(|link| link.skipping);
        if (self.request.batch_failed || server_skips) && frame[0] != b'S' {
            // PostgreSQL skips everything after an error until Sync: nothing is sent, and
            // no reply awaited, that the server would not give.
            return Ok(());
        }
        match frame[0] {
            b'P' => {
                let (parse, route) = match routed {
                    Routed::Parse(route, at) => (Parse::at(frame, at), route.clone()),
                    _ => (Parse::decode(frame), (Target::Primary, Why::NotARead)),
                };
                let parse = parse.map_err(SessionError::protocol)?;
                self.translate_parse(frame, &parse, route)?;
            }
            b'B' => {
                let (bind, routed) = match routed {
                    Routed::Bind(at, prepared) => (Bind::at(frame, at), prepared),
                    _ => (Bind::decode(frame), None),
                };
                let bind = bind.map_err(SessionError::protocol)?;
                // One look-up for the effects and the server's name.
                let looked_up;
                let prepared = match routed {
                    Some(prepared) => Some(prepared),
                    None => {
                        looked_up = self.statement(bind.statement).cloned();
                        looked_up.as_ref()
                    }
                };
                if let Some(prepared) = prepared {
                    self.request
                        .effects
                        .extend(prepared.effects.iter().cloned());
                    let in_transaction = self.state.status() != b'I';
                    let held = matches!(self.state, State::Pinned(..)) || in_transaction;
                    if held && prepared.words.releases {
                        self.request.check_pins = true;
                    }
                    self.request.may_write |= prepared.writes;
                    let proven_read =
                        prepared.target == Target::Replica || prepared.why.is_proven_read();
                    if prepared.writes && !proven_read && self.cache.is_some() {
                        let (tables, schema) = (prepared.tables.clone(), prepared.changes_schema);
                        self.txn.written.add(tables.as_deref(), schema);
                    }
                    self.request.copies |= prepared.writes && prepared.words.copies;
                    if (in_transaction || prepared.writes) && prepared.words.commits {
                        self.request.commits = true;
                    }
                }
                self.request.commit_bound = prepared.is_some_and(|prepared| {
                    prepared.words.commits && is_plain_commit(&prepared.sql)
                }) && bind.portal.is_empty();
                match self.server_statement_of(bind.statement.is_empty(), prepared.map(|p| &**p))? {
                    Some(name) => bind.write_renamed(&mut self.to_server, &name),
                    None => self.to_server.extend_from_slice(frame),
                }
                self.expect(Reply::Bind, true, None);
            }
            b'D' => {
                let target = messages::Target::decode(frame).map_err(SessionError::protocol)?;
                let renamed = if target.kind == b'S' {
                    self.server_statement(target.name)?
                } else {
                    None
                };
                match renamed {
                    Some(name) => target.write_renamed(&mut self.to_server, b'D', &name),
                    None => self.to_server.extend_from_slice(frame),
                }
                self.expect(Reply::Describe, true, None);
            }
            b'C' => {
                let target = messages::Target::decode(frame).map_err(SessionError::protocol)?;
                if target.kind == b'S' && !target.name.is_empty() {
                    // The statement stays prepared on the server for reuse; the client's
                    // name for it is gone.
                    self.statements.remove(target.name);
                    self.expected.push_back(Expect::Local(local_reply(b'3')));
                } else {
                    self.to_server.extend_from_slice(frame);
                    self.expect(Reply::Close, true, None);
                }
            }
            b'E' => {
                // The unnamed portal (an empty name, then the row limit).
                self.request.commit_executed =
                    self.request.commit_bound && frame.get(5) == Some(&0);
                self.to_server.extend_from_slice(frame);
                self.expect(Reply::Execute, true, None);
            }
            b'S' => {
                if !self.request.batch_failed {
                    self.join_position_before_sync();
                }
                self.to_server.extend_from_slice(frame);
                self.expect(Reply::Sync, true, None);
            }
            _ => self.to_server.extend_from_slice(frame),
        }
        Ok(())
    }

    fn translate_parse(
        &mut self,
        frame: &[u8],
        parse: &Parse<'_>,
        route: (Target, Why),
    ) -> Result<(), SessionError> {
        let again = match &self.unnamed {
            Some(unnamed) if parse.name.is_empty() && unnamed.is_parsed_again_by(parse, &route) => {
                Some(Arc::clone(unnamed))
            }
            _ => None,
        };
        let Some(prepared) = again.or_else(|| self.admit_parse(parse, route)) else {
            return Ok(());
        };
        if parse.name.is_empty() {
            let client_id = self.cancel.pid as u64;
            self.to_server.extend_from_slice(frame);
            self.server_mut()?.unnamed = Some((prepared.hash, client_id));
            self.expect(Reply::Parse, true, None);
            return Ok(());
        }
        if self.server_mut()?.statements.touch(prepared.hash) {
            self.expected.push_back(Expect::Local(local_reply(b'1')));
        } else {
            self.prepare_on_server(&prepared, true)?;
        }
        self.expected
            .push_back(Expect::Defines(parse.name.to_vec()));
        Ok(())
    }

    /// Reads a client's Parse and remembers its statement, or refuses it: a name in use,
    /// one statement too many, or a setting pgway refuses. A refused Parse is answered
    /// with its error in its place, and the rest of the batch is skipped.
    fn admit_parse(&mut self, parse: &Parse<'_>, route: (Target, Why)) -> Option<Arc<Prepared>> {
        let classification = std::str::from_utf8(parse.sql)
            .map(|sql| self.shared.router.classification(sql))
            .ok();
        let effects = classification
            .as_ref()
            .map(|c| c.session.clone())
            .unwrap_or_default();
        let limit = self.shared.config.load().client.max_prepared_statements;
        let refused = if !parse.name.is_empty() && self.statements.contains_key(parse.name) {
            Some(ClientError::DuplicatePreparedStatement(
                String::from_utf8_lossy(parse.name).into_owned(),
            ))
        } else if !parse.name.is_empty() && self.statements.len() >= limit {
            // What pgway remembers per client is bounded (`client.max_prepared_statements`).
            Some(ClientError::TooManyPreparedStatements(limit))
        } else {
            effects::refusal(&effects)
        };
        if let Some(e) = refused {
            let mut error = BytesMut::new();
            e.write(&mut error);
            self.expected.push_back(Expect::Local(error));
            self.request.batch_failed = true;
            self.request.failed = true;
            return None;
        }
        if !parse.name.is_empty() {
            self.request.named.push(parse.name.to_vec());
        }
        Some(self.remember(parse, route, effects, classification.as_deref()))
    }

    /// Records a client's Parse, and where it is to run, in its statement table.
    pub(super) fn remember(
        &mut self,
        parse: &Parse<'_>,
        (target, why): (Target, Why),
        effects: Vec<SessionEffect>,
        classification: Option<&Classification>,
    ) -> Arc<Prepared> {
        let hash = STATEMENT_HASH.hash_one((parse.sql, parse.param_types));
        let router = &self.shared.router;
        let route_follows_text = classification
            .and_then(|c| router.decide_now(c, self.target))
            .filter(|(t, w)| *t == target && *w == why)
            .map(|_| self.target);
        let prepared = Arc::new(Prepared {
            sql: parse.sql.to_vec(),
            param_types: parse.param_types.to_vec(),
            hash,
            server_name: statement_name(hash),
            target,
            effects,
            writes: classification.is_none_or(|c| c.writes),
            tables: classification.and_then(|c| c.cache.tables.clone()),
            changes_schema: classification.is_none_or(|c| c.cache.changes_schema),
            hints: classification.map(ReadHints::of).unwrap_or_default(),
            why,
            words: classification.map_or_else(|| scan_words(parse.sql), |c| c.words),
            route_follows_text,
        });
        if parse.name.is_empty() {
            self.unnamed = Some(Arc::clone(&prepared));
        } else {
            self.statements
                .insert(parse.name.to_vec(), Arc::clone(&prepared));
        }
        prepared
    }

    /// Sends a Parse of `prepared` under pgway's name, closing the least recently used
    /// statement if the connection's cache is full.
    fn prepare_on_server(
        &mut self,
        prepared: &Prepared,
        forward: bool,
    ) -> Result<(), SessionError> {
        let capacity = self.shared.config.load().pool.statement_cache;
        let name = prepared.server_name;
        write_parse(
            &mut self.to_server,
            &name,
            &prepared.sql,
            &prepared.param_types,
        );
        self.expect(Reply::Parse, forward, Some(prepared.hash));
        if let Some(evicted) = self
            .server_mut()?
            .statements
            .insert(prepared.hash, capacity)
        {
            write_target(&mut self.to_server, b'C', b'S', &statement_name(evicted));
            self.expect(Reply::Close, false, None);
        }
        Ok(())
    }

    /// The server-side name for the client's statement `name`, preparing it on the
    /// attached connection first if needed. `None`: send the name unchanged (a statement
    /// the client never prepared, for which the server gives its usual error).
    fn server_statement(
        &mut self,
        name: &[u8],
    ) -> Result<Option<[u8; STATEMENT_NAME_LEN]>, SessionError> {
        let prepared = self.statement(name).cloned();
        self.server_statement_of(name.is_empty(), prepared.as_deref())
    }

    /// [`Self::server_statement`] of the client's statement `prepared` (the unnamed one if
    /// `unnamed`), already looked up.
    fn server_statement_of(
        &mut self,
        unnamed: bool,
        prepared: Option<&Prepared>,
    ) -> Result<Option<[u8; STATEMENT_NAME_LEN]>, SessionError> {
        let Some(prepared) = prepared else {
            return Ok(None);
        };
        if unnamed {
            let client_id = self.cancel.pid as u64;
            let server = self.server_mut()?;
            if server.unnamed != Some((prepared.hash, client_id)) {
                server.unnamed = Some((prepared.hash, client_id));
                write_parse(
                    &mut self.to_server,
                    b"",
                    &prepared.sql,
                    &prepared.param_types,
                );
                self.expect(Reply::Parse, false, None);
            }
            return Ok(None);
        }
        if !self.server_mut()?.statements.touch(prepared.hash) {
            self.prepare_on_server(prepared, false)?;
        }
        Ok(Some(prepared.server_name))
    }

    /// `DEALLOCATE name` / `DEALLOCATE ALL` of protocol-level statements, which live in
    /// pgway, not on any one server: answered here unless the client is pinned (its SQL
    /// `PREPARE`d statements are on its server). Returns true if answered (the answer is
    /// in `out`, for the caller to flush).
    pub(super) fn answer_deallocate(
        &mut self,
        sql: &[u8],
        classification: &Classification,
    ) -> bool {
        let [effect] = classification.session.as_slice() else {
            return false;
        };
        let single = sql
            .iter()
            .rposition(|&b| b != b';' && !b.is_ascii_whitespace())
            .is_some_and(|last| !sql[..last].contains(&b';'));
        if !single {
            return false;
        }
        let tag: &[u8] = match effect {
            SessionEffect::Deallocate(name) if self.statements.contains_key(name.as_bytes()) => {
                self.statements.remove(name.as_bytes());
                b"DEALLOCATE\0"
            }
            SessionEffect::DeallocateAll if !self.is_pinned() => {
                self.statements.clear();
                self.unnamed = None;
                b"DEALLOCATE ALL\0"
            }
            _ => return false,
        };
        put_frame(&mut self.out, b'C', tag);
        messages::ready_for_query(&mut self.out, self.state.status());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statement_names_come_from_a_key_no_client_knows() {
        use std::hash::{BuildHasherDefault, DefaultHasher};
        let text: (&[u8], &[u8]) = (b"SELECT abalance FROM pgbench_accounts WHERE aid = $1", b"");
        // Stable within the process (every connection must find the statement by it)...
        assert_eq!(STATEMENT_HASH.hash_one(text), STATEMENT_HASH.hash_one(text));
        // ...and not what SipHash with the well-known zero key gives, which a client could
        // compute for any text.
        let unkeyed = BuildHasherDefault::<DefaultHasher>::default().hash_one(text);
        assert_ne!(STATEMENT_HASH.hash_one(text), unkeyed);
    }

    #[test]
    fn parsed_in_batch_finds_the_last_parse_of_each_name_in_place_and_past_it() {
        let decisions: Vec<Decision> = (0..8)
            .map(|i| (Target::Replica, Why::Function(format!("f{i}").into())))
            .collect();
        let names: Vec<Vec<u8>> = (0..6).map(|i| format!("s{i}").into_bytes()).collect();
        let mut parsed = ParsedInBatch::default();
        parsed.insert(b"", &decisions[7]);
        for (name, decision) in names.iter().zip(&decisions) {
            parsed.insert(name, decision);
        }
        assert!(
            parsed.len == ParsedInBatch::FEW && parsed.many.as_ref().is_some_and(|m| !m.is_empty())
        );
        for (name, decision) in names.iter().zip(&decisions) {
            assert!(std::ptr::eq(parsed.get(name).expect("parsed"), decision));
        }
        // The unnamed statement parsed again (in place), and a name kept past the few.
        parsed.insert(b"", &decisions[6]);
        parsed.insert(b"s5", &decisions[0]);
        assert!(std::ptr::eq(
            parsed.get(b"").expect("unnamed"),
            &decisions[6]
        ));
        assert!(std::ptr::eq(parsed.get(b"s5").expect("s5"), &decisions[0]));
        assert!(parsed.get(b"s6").is_none());
    }
}
