//! The loop: read the client's next message, route it, send the request (again, on
//! another connection, if its server shut down before answering), relay the answer.

use bytes::BytesMut;
use tracing::info;

use super::attach::Quick;
use super::batch::Batch;
use super::freshness::ReadHints;
use super::prepared::{BatchRoutes, Routed};
use super::relay::local_reply;
use super::{effects, Redo, Session, SessionError, State};
use crate::error::ClientError;
use crate::metrics::Route;
use crate::net::{keep_buffers, recycle_buffers, take_buffers, FramedStream, NetError};
use crate::protocol::frame::put_frame;
use crate::protocol::messages::{self, query_text};
use crate::protocol::{FrameError, MAX_MESSAGE_LEN};
use crate::route::fast::{is_plain_begin, scan_words};
use crate::route::{Classified, Target, Why};

/// Extended-protocol bytes collected without a Sync before pgway stops waiting for one and
/// sends them on (to the primary, since the batch cannot be judged whole).
const MAX_BATCH_BYTES: usize = 1 << 20;

/// Times a request is sent again after its server shut down before answering it.
const MAX_RETRIES: usize = 3;

/// How a request is sent.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// It may be sent again elsewhere if its server shuts down before answering.
    retry: bool,
    /// Its answers are relayed now (else: a batch that did not end with Sync or Flush).
    relay: bool,
    /// It ends with ReadyForQuery (a simple query, a function call, a batch with Sync).
    ready: bool,
    /// Statements it runs, for `SHOW STATS`' `total_query_count`: a simple query or a
    /// function call is one, a batch as many as its Executes.
    statements: u64,
    /// If no server connection can be had, the client gets the error and ReadyForQuery
    /// from [`Session::send_request`] itself (a simple-protocol request; a batch handles
    /// it in its own way).
    report: bool,
}

/// How a simple query is sent.
const QUERY_PLAN: Plan = Plan {
    retry: true,
    relay: true,
    ready: true,
    statements: 1,
    report: true,
};

/// How a batch is sent: `sync`, it ends with Sync; `complete`, with Sync or Flush.
fn batch_plan(batch: &Batch, sync: bool, complete: bool) -> Plan {
    Plan {
        retry: sync,
        relay: complete,
        ready: sync,
        statements: batch.iter().filter(|f| f[0] == b'E').count() as u64,
        report: false,
    }
}

/// Where a batch that needs no wait goes (see [`Session::route_batch_now`]).
struct BatchRoute {
    target: Target,
    hints: ReadHints,
    plan: Plan,
}

/// Where a simple query goes, and what sending it needs from its routing.
#[derive(Debug)]
struct QueryRoute {
    classification: Option<Classified>,
    target: Target,
    hints: ReadHints,
    /// It was routed as a read (the cache counts what it writes as not written).
    proven_read: bool,
    /// The length of its text, which starts after the frame's header.
    sql_len: usize,
}

impl QueryRoute {
    /// The query's text in its frame.
    fn sql<'f>(&self, frame: &'f [u8]) -> &'f [u8] {
        frame.get(5..5 + self.sql_len).unwrap_or_default()
    }
}

/// A malformed message of a batch is refused as it arrives (FATAL 08P01), as PostgreSQL
/// refuses it, not when its batch runs: its length may have swallowed the Sync that would
/// run the batch. Bind is the exception: its values are the server's to check (it answers
/// ERROR 08P01 and the session goes on), so only its names are read here; see
/// [`Session::holds_refused_bind`] for the rest.
///
/// A Parse or a Bind is read here once: the layout kept in `routes` lets routing and
/// sending read it again without a scan.
fn check_batch_frame(frame: &[u8], routes: &mut BatchRoutes) -> Result<(), SessionError> {
    match frame[0] {
        b'P' => messages::Parse::decode(frame).map(|parse| routes.layouts.push(parse.layout())),
        b'B' => messages::Bind::decode(frame).map(|bind| routes.bind_layouts.push(bind.layout())),
        b'E' => messages::check_execute(frame),
        b'H' if frame.len() != 5 => Err(FrameError::Malformed("Flush")),
        b'S' if frame.len() != 5 => Err(FrameError::Malformed("Sync")),
        b'H' | b'S' => Ok(()),
        _ => messages::Target::decode(frame).map(drop),
    }
    .map_err(SessionError::protocol)
}

impl Session<'_> {
    pub(super) async fn serve(&mut self) -> Result<(), SessionError> {
        loop {
            // The next message: one the client sent already (the rest of a batch), else
            // by what the session waits in (written out here, not as a future of its
            // own: each level of futures is a copy into its caller's state on every
            // statement). It stays in the client's read buffer until taken.
            let buffered = self
                .client
                .buffered_frame(MAX_MESSAGE_LEN)
                .map_err(SessionError::from_client)?;
            let len = match buffered {
                Some(len) => len,
                None => {
                    let between_requests = self.batch.is_empty() && self.expected.is_empty();
                    let idle = matches!(
                        self.state,
                        State::Idle | State::SkipToSync(_) | State::Aborted
                    );
                    if matches!(self.state, State::Pinned(..)) && between_requests {
                        self.next_frame_pinned().await?
                    } else if idle && self.batch.is_empty() {
                        self.next_frame_idle().await?
                    } else if self.holds_refused_bind() {
                        // As if the client had sent a Flush after it.
                        self.batch.push(&local_reply(b'H'));
                        self.run_batch(false).await?;
                        continue;
                    } else {
                        self.next_frame_attached().await?
                    }
                }
            };
            let tag = self.client.rbuf[0];
            if let b'P' | b'B' | b'D' | b'E' | b'C' | b'H' | b'S' = tag {
                // A message of an extended-protocol batch: copied into the batch.
                let frame = &self.client.rbuf[..len];
                let routes = self.batch_routes.get_or_insert_with(Box::default);
                check_batch_frame(frame, routes)?;
                self.batch.push(frame);
                self.client.consume(len);
                match tag {
                    b'H' => self.run_batch(false).await?,
                    b'S' => {
                        // Routed in place when nothing needs a wait (nearly every batch):
                        // then it is sent from here, as a simple query is, with no future
                        // of a batch step in between (see `route_batch_now`). The batch
                        // stays in the session meanwhile: nothing of it lives across the
                        // wait here.
                        match self.route_batch_now()? {
                            Some(route) => {
                                let hints = route.hints;
                                let sent = self
                                    .send_request(route.target, route.plan, move |session| {
                                        session.queue_collected_batch(hints)
                                    })
                                    .await;
                                let failed = self.batch_sent(sent, true)?;
                                self.clear_batch();
                                if let Some(e) = failed {
                                    self.report(e, true).await?;
                                }
                            }
                            None => self.run_batch(true).await?,
                        }
                    }
                    _ if self.batch.size() > MAX_BATCH_BYTES => self.run_batch(false).await?,
                    _ => {}
                }
                continue;
            }
            let frame = self.client.rbuf.split_to(len);
            match tag {
                b'Q' => {
                    // Routed in place when nothing needs a wait (nearly every query): then
                    // the request is sent from here, with no future of a routing step in
                    // between (see `route_query_now`).
                    let mut frame = frame;
                    let route = match self.route_query_now(&frame) {
                        Some(route) => Some(route),
                        None => self.route_query(&mut frame).await?,
                    };
                    if let Some(route) = route {
                        let sent = self
                            .send_request(route.target, QUERY_PLAN, |session| {
                                session.queue_query(&frame, &route)
                            })
                            .await;
                        self.query_sent(sent, &frame, &route)?;
                    }
                }
                b'F' => self.on_function_call(frame).await?,
                b'X' => return Ok(()),
                // CopyData/CopyDone/CopyFail outside COPY (after a failed COPY): ignored, as
                // PostgreSQL does.
                b'd' | b'c' | b'f' => {}
                other => return Err(SessionError::Fatal(ClientError::UnexpectedMessage(other))),
            }
        }
    }

    /// Whether the batch holds a Bind that the server will refuse, read once each. When
    /// pgway would wait for the client with such a Bind in the batch, the batch runs at
    /// once, as if a Flush followed the Bind: PostgreSQL answers it with ERROR 08P01 as
    /// soon as it has read it, and the client may be waiting for that answer, since the
    /// Bind's length may have swallowed the Sync sent after it.
    fn holds_refused_bind(&mut self) -> bool {
        let mut unchecked = self.batch.iter_from(self.batch_checked);
        self.batch_checked = self.batch.len();
        unchecked.any(|frame| {
            frame[0] == b'B'
                && messages::Bind::decode(frame).is_ok_and(|bind| !bind.is_well_formed())
        })
    }

    /// Waits for the client's next message while it holds a server connection (inside a
    /// transaction, a batch or a COPY). Once pgway's drain deadline has passed, a client
    /// that keeps pgway waiting here is told 57P01 and closed; one silent for
    /// `client.idle_in_transaction_timeout` inside a transaction (or `client.idle_timeout`
    /// outside one) is closed too, and its transaction rolled back. (The serve loop has
    /// looked for a message the client sent already.) Returns the message's length (it
    /// stays in the client's read buffer).
    async fn next_frame_attached(&mut self) -> Result<usize, SessionError> {
        let status = self.state.status();
        let (timeout, expired) = self.timeouts.client_wait(status);
        tokio::select! {
            biased;
            len = self.client.frame_ready(MAX_MESSAGE_LEN) => len.map_err(SessionError::from_client),
            _ = &mut self.hard_stop => Err(SessionError::Fatal(ClientError::Shutdown)),
            () = self.alarms.client_wait(status).after(timeout) => Err(SessionError::Fatal(expired)),
        }
    }

    /// Waits for the next request of a client that holds no server connection (none is
    /// buffered: the serve loop looked), as [`Self::next_frame_attached`] does.
    async fn next_frame_idle(&mut self) -> Result<usize, SessionError> {
        // Between requests a session may move to another worker (the workers taking
        // sessions follow the load: see `crate::workers::Placement`).
        if let Some(to) = crate::workers::destination() {
            self.move_to(to).await?;
        }
        // Between requests a client holds no buffers (thousands of idle clients cost
        // little memory), but for the first few of a worker's: a busy client's next
        // request comes soon.
        let kept = match self.client.spare_buffer() {
            Some(rbuf) => keep_buffers([rbuf, &self.out, &self.to_server]),
            None => None,
        };
        if kept.is_none() {
            let mut none = BytesMut::new();
            let rbuf = self.client.spare_buffer().unwrap_or(&mut none);
            recycle_buffers([rbuf, &mut self.out, &mut self.to_server]);
        }
        // Between transactions a stopping pgway may close the connection, and
        // `client.idle_timeout` does.
        let timeout = self.timeouts.idle;
        let len = tokio::select! {
            biased;
            len = self.client.frame_ready(MAX_MESSAGE_LEN) => len.map_err(SessionError::from_client),
            _ = &mut self.stopping => Err(SessionError::Fatal(ClientError::Shutdown)),
            () = self.alarms.idle.after(timeout) => Err(SessionError::Fatal(ClientError::IdleTimeout(timeout))),
        }?;
        if kept.is_none() {
            [self.out, self.to_server] = take_buffers();
        }
        Ok(len)
    }

    /// Moves the session to worker `to`, and its client socket to that worker's reactor.
    /// It holds no server connection here; its pools' connections move on their own when
    /// it borrows one registered with the other worker.
    async fn move_to(&mut self, to: usize) -> Result<(), SessionError> {
        if crate::workers::move_to(to).await {
            let client = std::mem::replace(
                &mut self.client,
                FramedStream::new(Box::new(crate::net::tls::Detached)),
            );
            self.client = client.rebind().map_err(SessionError::from_client)?;
        }
        Ok(())
    }

    /// After an error in an extended-protocol batch, PostgreSQL discards every message but
    /// Sync, a Query or FunctionCall too, and answers none of them; so does pgway, whether
    /// it raised the error (SkipToSync) or the server did (the server would never answer
    /// a Query sent to it now).
    fn skips_to_sync(&self) -> bool {
        matches!(self.state, State::SkipToSync(_))
            || self.state.link().is_some_and(|link| link.skipping)
    }

    /// Reports a pgway-raised error for a statement; `ready` adds ReadyForQuery.
    pub(super) async fn report(&mut self, e: ClientError, ready: bool) -> Result<(), SessionError> {
        self.shared.metrics.error(e.sqlstate());
        e.write(&mut self.out);
        if ready {
            messages::ready_for_query(&mut self.out, self.state.status());
        }
        self.flush().await
    }

    /// Routes a simple query that [`Self::route_query_now`] could not: `None` when it was
    /// answered here (an error, a DEALLOCATE, a held BEGIN, the result cache) or is
    /// skipped. A held BEGIN takes `frame`.
    async fn route_query(
        &mut self,
        frame: &mut BytesMut,
    ) -> Result<Option<QueryRoute>, SessionError> {
        if self.skips_to_sync() {
            return Ok(None);
        }
        let sql = query_text(frame).map_err(SessionError::protocol)?;
        if let State::Aborted = self.state {
            self.answer_aborted_query(sql).await?;
            return Ok(None);
        }
        let classification = self.shared.router.classification_of(sql);
        let mut target = Target::Primary;
        let mut why = self.held_why();
        let mut hints = ReadHints::default();
        if let Some(c) = &classification {
            hints.add(c);
            if let Some(e) = effects::refusal(&c.session) {
                self.report(e, true).await?;
                return Ok(None);
            }
            if self.answer_deallocate(sql, c) {
                self.flush().await?;
                return Ok(None);
            }
            if let State::Idle = self.state {
                let router = &self.shared.router;
                (target, why) = match router.decide_now(c, self.target) {
                    Some(decision) => decision,
                    None => {
                        router
                            .decide(c, &self.database, &self.user, self.target)
                            .await
                    }
                };
            }
        }
        let proven_read = target == Target::Replica || why.is_proven_read();
        self.note_route(why, hints);
        if self.holds_begin(target, sql) {
            self.hold_begin(std::mem::take(frame)).await?;
            return Ok(None);
        }
        let target = if self.apply_read_hints(hints, target) {
            self.fresh_target(target).await
        } else {
            target
        };
        // Checked here, not in `cached_query`: without a cache, its future is not even made
        // (and with one, it is boxed: the session's own future stays small).
        if let (Some(c), Some(_)) = (&classification, &self.cache) {
            if Box::pin(self.cached_query(sql, c, hints)).await? {
                return Ok(None);
            }
        }
        Ok(Some(QueryRoute {
            classification,
            target,
            hints,
            proven_read,
            sql_len: sql.len(),
        }))
    }

    /// [`Self::route_query`] for a query that needs no wait to be routed, as nearly every
    /// one: no session effects (SET, DEALLOCATE: they may be refused or answered here), no
    /// function whose volatility must be looked up, no `pgway:fresh` read, no held BEGIN,
    /// no result cache, no failed transaction. `None` (having changed nothing): route it
    /// with [`Self::route_query`].
    fn route_query_now(&mut self, frame: &[u8]) -> Option<QueryRoute> {
        if self.cache.is_some() || self.skips_to_sync() {
            return None;
        }
        let sql = query_text(frame).ok()?;
        let c = match self.state {
            State::Aborted => return None,
            _ => self.shared.router.classification_of(sql)?,
        };
        if !c.session.is_empty() {
            return None;
        }
        let (target, why) = match self.state {
            State::Idle => self.shared.router.decide_now(&c, self.target)?,
            _ => (Target::Primary, self.held_why()),
        };
        let hints = ReadHints::of(&c);
        if self.wants_fresh_target(hints, target) || self.holds_begin(target, sql) {
            return None;
        }
        let proven_read = target == Target::Replica || why.is_proven_read();
        self.note_route(why, hints);
        let fresh = self.apply_read_hints(hints, target);
        debug_assert!(!fresh, "checked above");
        Some(QueryRoute {
            proven_read,
            classification: Some(c),
            target,
            hints,
            sql_len: sql.len(),
        })
    }

    /// Queues a routed simple query on the connection it got (the request of
    /// [`Self::send_request`]).
    fn queue_query(&mut self, frame: &[u8], route: &QueryRoute) -> Result<(), SessionError> {
        let classification = route.classification.as_deref();
        self.track_pgway_settings(route.hints);
        match classification {
            Some(c) => {
                self.request.effects.clone_from(&c.session);
                self.request.may_write = c.writes;
            }
            None => {
                self.request.effects.clear();
                self.request.may_write = true;
            }
        }
        self.note_written(classification, route.proven_read);
        let sql = route.sql(frame);
        let in_transaction = self.state.status() != b'I';
        // Pinned, or about to be by what its transaction did (a temporary table ON COMMIT
        // DROP is gone again at the COMMIT that pins the client).
        let held = self.is_pinned() || in_transaction;
        if self.request.may_write || held {
            let words = classification.map_or_else(|| scan_words(sql), |c| c.words);
            if self.request.may_write || in_transaction {
                self.request.commits = words.commits;
                self.request.copies = self.request.may_write && words.copies;
            }
            self.request.check_pins = held && words.releases;
        }
        // A simple query replaces the unnamed statement (as does a joined COMMIT).
        self.server_mut()?.unnamed = None;
        if !(self.request.commits && self.queue_joined_commit(sql)) {
            self.to_server.extend_from_slice(frame);
            self.expect(super::relay::Reply::Query, true, None);
        }
        Ok(())
    }

    /// After a simple query was sent and answered: the result cache's fill ends, and a
    /// query a replica refused as a write teaches the router to send its text to the
    /// primary.
    fn query_sent(
        &mut self,
        sent: Result<Result<(), ClientError>, SessionError>,
        frame: &[u8],
        route: &QueryRoute,
    ) -> Result<(), SessionError> {
        self.finish_fill();
        // Ok(Err(_)) cannot be: the plan reports it.
        let reported = sent?;
        debug_assert!(reported.is_ok());
        if std::mem::take(&mut self.request.retried_on_primary) {
            if let (Some(c), Ok(text)) =
                (&route.classification, std::str::from_utf8(route.sql(frame)))
            {
                self.shared.router.learn_write(&self.database, text, c);
            }
        }
        Ok(())
    }

    /// Whether `sql`, routed to `target`, is a plain `BEGIN` outside a transaction that
    /// [`Self::hold_begin`] answers (`pool.hold_begin`).
    fn holds_begin(&self, target: Target, sql: &[u8]) -> bool {
        target == Target::Primary
            && matches!(self.state, State::Idle)
            && is_plain_begin(sql)
            && self.shared.config.load().pool.hold_begin
    }

    /// A plain `BEGIN` outside a transaction (Idle -> Begun): answered here, and sent in
    /// front of the transaction's first request (see [`Self::send_request`]). Counted as a
    /// statement on the primary, where it goes.
    async fn hold_begin(&mut self, frame: BytesMut) -> Result<(), SessionError> {
        if let Some(registered) = &self.registered {
            registered.entry.queried(1);
        }
        self.shared.metrics.query(Route::Primary);
        // What the BEGIN's CommandComplete would have said.
        self.txn.rolled_back = false;
        put_frame(&mut self.out, b'C', b"BEGIN\0");
        messages::ready_for_query(&mut self.out, b'T');
        self.state = State::Begun(frame);
        self.flush().await
    }

    async fn on_function_call(&mut self, frame: BytesMut) -> Result<(), SessionError> {
        if self.skips_to_sync() {
            return Ok(());
        }
        if let State::Aborted = self.state {
            return self.report(ClientError::InFailedTransaction, true).await;
        }
        let plan = Plan {
            retry: false,
            ..QUERY_PLAN
        };
        let sent = self
            .send_request(Target::Primary, plan, |session| {
                session.request.may_write = true;
                if session.cache.is_some() {
                    // A function call by OID: pgway cannot tell what it does.
                    session.txn.written.add(None, true);
                }
                session.to_server.extend_from_slice(&frame);
                session.expect(super::relay::Reply::FunctionCall, true, None);
                Ok(())
            })
            .await?;
        // Ok(Err(_)) cannot be: the plan reports it.
        debug_assert!(sent.is_ok());
        Ok(())
    }

    /// Routes, rewrites, sends and relays the collected extended-protocol batch.
    /// `sync`: the batch ends with Sync (else with Flush, or it grew too large).
    async fn run_batch(&mut self, sync: bool) -> Result<(), SessionError> {
        let (batch, mut routes) = self.take_batch();
        let ran = self.run_frames(&batch, &mut routes, sync).await;
        self.keep_batch(batch, routes);
        ran
    }

    /// The collected batch and what was read of it, to run.
    fn take_batch(&mut self) -> (Batch, Box<BatchRoutes>) {
        self.batch_checked = 0;
        (
            std::mem::take(&mut self.batch),
            self.batch_routes.take().unwrap_or_default(),
        )
    }

    /// After a batch ran: the next one reuses its lists (a client's batches are mostly
    /// alike), unless this one was large.
    fn keep_batch(&mut self, mut batch: Batch, mut routes: Box<BatchRoutes>) {
        batch.clear();
        routes.clear();
        if self.batch.is_empty() {
            self.batch = batch;
        }
        if self
            .batch_routes
            .as_ref()
            .is_none_or(|routes| routes.is_empty())
        {
            // (As for the batch: unless the next one has begun.)
            self.batch_routes = Some(routes);
        }
    }

    /// [`Self::keep_batch`] of the batch still in the session, once it ran.
    fn clear_batch(&mut self) {
        let (batch, routes) = self.take_batch();
        self.keep_batch(batch, routes);
    }

    /// [`Self::queue_batch`] of the batch still in the session, which ends with Sync.
    fn queue_collected_batch(&mut self, hints: ReadHints) -> Result<(), SessionError> {
        let batch = std::mem::take(&mut self.batch);
        let routes = self.batch_routes.take().unwrap_or_default();
        let queued = self.queue_batch(&batch, &routes, hints, true);
        self.batch = batch;
        self.batch_routes = Some(routes);
        queued
    }

    /// [`Self::run_frames`]' routing of a batch that ends with Sync, for one that needs no
    /// wait (as nearly every one): no skipped or failed transaction, no function whose
    /// volatility must be looked up, no `pgway:fresh` read, no result cache. `None`
    /// (having changed nothing): run it with [`Self::run_frames`].
    fn route_batch_now(&mut self) -> Result<Option<BatchRoute>, SessionError> {
        if self.cache.is_some() || matches!(self.state, State::SkipToSync(_) | State::Aborted) {
            return Ok(None);
        }
        let batch = std::mem::take(&mut self.batch);
        let mut routes = self.batch_routes.take().unwrap_or_default();
        let routed = self.route_taken_batch_now(&batch, &mut routes);
        self.batch = batch;
        self.batch_routes = Some(routes);
        routed
    }

    /// [`Self::route_batch_now`] of the batch taken out of the session.
    fn route_taken_batch_now(
        &mut self,
        batch: &Batch,
        routes: &mut BatchRoutes,
    ) -> Result<Option<BatchRoute>, SessionError> {
        let Some(mut hints) = self.parse_targets_now(batch, routes)? else {
            return Ok(None);
        };
        let (target, why) = match self.state {
            State::Idle => self.batch_target(batch, routes, &mut hints)?,
            _ => (Target::Primary, self.held_why()),
        };
        if self.wants_fresh_target(hints, target) {
            routes.parses.clear();
            routes.binds.clear();
            return Ok(None);
        }
        let plan = batch_plan(batch, true, true);
        if plan.statements > 0 {
            self.note_route(why, hints);
        }
        let fresh = self.apply_read_hints(hints, target);
        debug_assert!(!fresh, "checked above");
        Ok(Some(BatchRoute {
            target,
            hints,
            plan,
        }))
    }

    /// [`Self::run_batch`] of `batch`; `routes` (empty) is for what routing it finds out.
    async fn run_frames(
        &mut self,
        batch: &Batch,
        routes: &mut BatchRoutes,
        sync: bool,
    ) -> Result<(), SessionError> {
        if let State::SkipToSync(status) = self.state {
            if sync {
                self.state = if status == b'E' {
                    State::Aborted
                } else {
                    State::Idle
                };
                messages::ready_for_query(&mut self.out, status);
                self.flush().await?;
            }
            return Ok(());
        }
        if let State::Aborted = self.state {
            return self.answer_aborted_batch(batch, sync).await;
        }
        let complete = sync || batch.last().is_some_and(|f| f[0] == b'H');
        let mut hints = self.parse_targets(batch, routes).await?;
        let (target, why) = match self.state {
            State::Idle if complete => self.batch_target(batch, routes, &mut hints)?,
            _ => (Target::Primary, self.held_why()),
        };
        let routes = &*routes;
        let plan = batch_plan(batch, sync, complete);
        if plan.statements > 0 {
            self.note_route(why, hints);
        }
        let target = if self.apply_read_hints(hints, target) {
            self.fresh_target(target).await
        } else {
            target
        };
        if sync && self.cache.is_some() && matches!(self.state, State::Idle) {
            let route = routes.parses.first();
            if Box::pin(self.cached_batch(batch, route, hints)).await? {
                return Ok(());
            }
        }
        let sent = self
            .send_request(target, plan, |session| {
                session.queue_batch(batch, routes, hints, sync)
            })
            .await;
        match self.batch_sent(sent, sync)? {
            Some(e) => self.report(e, sync).await,
            None => Ok(()),
        }
    }

    /// Queues a routed batch on the connection it got, each message as the server is to
    /// read it (the request of [`Self::send_request`]).
    fn queue_batch(
        &mut self,
        batch: &Batch,
        routes: &BatchRoutes,
        hints: ReadHints,
        sync: bool,
    ) -> Result<(), SessionError> {
        self.track_pgway_settings(hints);
        let mut parses = routes.parses.iter().zip(&routes.layouts);
        let mut binds = routes.binds.iter();
        let mut bind_layouts = routes.bind_layouts.iter();
        for frame in batch.iter() {
            let routed = match frame[0] {
                b'P' => parses
                    .next()
                    .map_or(Routed::Nothing, |(r, at)| Routed::Parse(r, *at)),
                b'B' => bind_layouts
                    .next()
                    .map_or(Routed::Nothing, |at| Routed::Bind(*at, binds.next())),
                _ => Routed::Nothing,
            };
            self.translate(frame, routed)?;
        }
        if let Some(link) = self.state.link_mut() {
            link.unsynced = !sync;
        }
        Ok(())
    }

    /// After a batch was sent and answered: the result cache's fill ends; `Some` error if
    /// no server connection could be had (nothing was sent: the client is to be told).
    fn batch_sent(
        &mut self,
        sent: Result<Result<(), ClientError>, SessionError>,
        sync: bool,
    ) -> Result<Option<ClientError>, SessionError> {
        self.finish_fill();
        let sent = sent?;
        self.request.retried_on_primary = false;
        let Err(e) = sent else {
            return Ok(None);
        };
        if !sync {
            // `E`: a held BEGIN's transaction was lost with it (Aborted).
            self.state = State::SkipToSync(self.state.status());
        }
        Ok(Some(e))
    }

    /// Sends a request: takes a server connection for `target` if the client holds none,
    /// has `queue` write the request for it, sends it and (per `plan`) relays the answers.
    /// If the server shuts down before answering a retryable request, the connection is
    /// dropped and the request goes again, from Idle, to another one.
    ///
    /// In Begun, the held `BEGIN` goes first (again with each retry); if no connection can
    /// be had for it, the transaction is lost (Aborted).
    ///
    /// `Ok(Err(e))`: no server connection could be had; nothing was sent (with
    /// `plan.report`, the client was told and the result is `Ok(Ok(()))`). The simple
    /// protocol's requests await this future straight away, not through a wrapper that
    /// reports: each level of futures is a copy of the one below it into its state, on
    /// every statement.
    async fn send_request(
        &mut self,
        target: Target,
        plan: Plan,
        mut queue: impl FnMut(&mut Self) -> Result<(), SessionError>,
    ) -> Result<Result<(), ClientError>, SessionError> {
        let mut attempt = 0;
        let mut target = target;
        let mut begin = None;
        loop {
            let can_retry = plan.retry && self.can_retry_now();
            let continues = self.state.link().is_some_and(|link| link.unsynced);
            self.request
                .begin_attempt(can_retry, self.out.len(), continues);
            if let State::Begun(_) = self.state {
                if let State::Begun(frame) = std::mem::replace(&mut self.state, State::Idle) {
                    begin = Some(frame);
                }
            }
            if let State::Idle = self.state {
                // No future made when a parked connection is there, one level for a wait
                // for a free slot (see `attach_acquired`).
                let attached = match self.attach_now(target) {
                    Quick::Attached => Ok(None),
                    Quick::Picked(node) => {
                        let acquired = self.pools[node.0].1.acquire().await;
                        self.attach_acquired(target, node, acquired)
                    }
                    // Nothing to try at once: the wait, no node found down yet.
                    Quick::NotNow => Ok(Some(0)),
                };
                let attached = match attached {
                    Ok(None) => Ok(()),
                    Ok(Some(down)) => Box::pin(self.attach_waiting(target, None, down)).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = attached {
                    if begin.is_some() {
                        self.state = State::Aborted;
                    }
                    if plan.report {
                        self.report(e, true).await?;
                        return Ok(Ok(()));
                    }
                    return Ok(Err(e));
                }
                self.request.on_replica = self.state.link().is_some_and(|link| link.replica);
                if let Some(begin) = &begin {
                    self.queue_begin(begin);
                }
            }
            if let Some(fill) = &mut self.fill {
                fill.restart();
            }
            queue(self)?;
            if plan.ready {
                self.queue_wal_position();
            }
            // Counted as sent (once, whatever the retries), not once answered: a client
            // that saw the answer sees the count.
            if attempt == 0 {
                if let Some(registered) = &self.registered {
                    registered.entry.queried(plan.statements);
                }
            }
            // Sent and relayed here, not through `send_and_relay`: one level of futures
            // less on every statement.
            let link = self.state.link_mut().ok_or_else(super::no_server)?;
            let sent = link.conn.io.send(&mut self.to_server).await;
            let outcome = match self.send_outcome(sent) {
                Ok(()) if plan.relay => self.relay().await,
                other => other,
            };
            match outcome {
                Err(SessionError::Retry) if attempt < MAX_RETRIES => {
                    attempt += 1;
                    self.abandon_server();
                }
                Ok(()) if attempt < MAX_RETRIES => {
                    let Some(redo) = self.request.redo else {
                        break;
                    };
                    attempt += 1;
                    self.give_back_refused(redo);
                    target = Target::Primary;
                    self.reroute(match redo {
                        Redo::Write => Why::RefusedByReplica,
                        Redo::RecoveryConflict => Why::RecoveryConflict,
                    });
                }
                Err(SessionError::ServerLost(cause)) if self.survives_server_loss() => {
                    self.server_died(&cause, plan.ready).await?;
                    return Ok(Ok(()));
                }
                other => {
                    other?;
                    break;
                }
            }
        }
        if self.request_done(plan) {
            Box::pin(self.request_done_waiting(plan)).await?;
        }
        Ok(Ok(()))
    }

    /// Queues the held `BEGIN` in front of a request: its answer is swallowed, and the
    /// connection is in a transaction from here on (so no WAL position query follows the
    /// request unless it commits).
    fn queue_begin(&mut self, begin: &[u8]) {
        self.to_server.extend_from_slice(begin);
        self.expect(super::relay::Reply::Query, false, None);
        if let Some(link) = self.state.link_mut() {
            link.status = b'T';
            // A simple query replaces the unnamed statement.
            link.conn.unnamed = None;
        }
    }

    /// A request answered: counted in the metrics, and its server connection released if
    /// nothing holds it. True if it has steps left that ask a server something first
    /// ([`Self::request_done_waiting`]: rare, so no future is made for the others).
    fn request_done(&mut self, plan: Plan) -> bool {
        if plan.ready {
            self.shared.metrics.query(if self.request.on_replica {
                Route::Replica
            } else {
                Route::Primary
            });
        }
        let waits = self.request.wal_deferred || (plan.relay && self.request.check_pins);
        if !waits && plan.relay {
            self.maybe_release();
        }
        waits
    }

    /// [`Self::request_done`]'s steps that ask a server something: its WAL position if
    /// deferred, whether it left the connection pinned; then the release.
    async fn request_done_waiting(&mut self, plan: Plan) -> Result<(), SessionError> {
        if self.request.wal_deferred {
            self.ask_deferred_wal_position().await?;
        }
        if plan.relay {
            if self.request.check_pins {
                self.unpin_if_unbound().await?;
            }
            self.maybe_release();
        }
        Ok(())
    }

    /// A replica gave the request up (see [`Redo`]): nothing of it reached the client. The
    /// connection (idle again) goes back to its pool, what the attempt noted is forgotten,
    /// and the request is counted; one refused as a write is remembered as a write.
    fn give_back_refused(&mut self, redo: Redo) {
        self.forget_attempt();
        self.maybe_release();
        match redo {
            Redo::Write => {
                self.request.retried_on_primary = true;
                self.shared.router.count_replica_retry();
            }
            Redo::RecoveryConflict => {
                self.span.in_scope(|| {
                    info!("a replica cancelled a read for a recovery conflict; sending it to the primary");
                });
                self.shared.router.count_conflict_retry();
            }
        }
    }

    /// Nothing of a request sent now can have taken effect if its server shuts down before
    /// answering: no transaction is open, no Sync is owed, nothing holds the client.
    fn can_retry_now(&self) -> bool {
        match &self.state {
            // Begun: the held BEGIN goes again with the request.
            State::Idle | State::Begun(_) => true,
            State::Attached(link) => link.status == b'I' && !link.unsynced,
            State::Pinned(..) | State::CopyIn(..) | State::SkipToSync(_) | State::Aborted => false,
        }
    }

    /// Sends what is queued and, if `relay`, relays the answers.
    pub(super) async fn send_and_relay(&mut self, relay: bool) -> Result<(), SessionError> {
        // The link and the buffer are fields apart: no buffer lent out and put back.
        let link = self.state.link_mut().ok_or_else(super::no_server)?;
        let sent = link.conn.io.send(&mut self.to_server).await;
        self.send_outcome(sent)?;
        if relay {
            self.relay().await?;
        }
        Ok(())
    }

    /// What a failed send to the server means: the request goes again elsewhere if
    /// nothing of it can have taken effect, else the server is lost.
    fn send_outcome(&self, sent: Result<(), NetError>) -> Result<(), SessionError> {
        match sent {
            Err(_) if self.request.can_retry && !self.request.answered => Err(SessionError::Retry),
            other => other.map_err(SessionError::server_lost),
        }
    }
}
