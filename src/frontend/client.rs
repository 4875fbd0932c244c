//! The per-client message loop: routing, transaction pooling and the relay.
//!
//! A client holds a server connection only while it needs one: from the first message of
//! a statement or transaction until the server's ReadyForQuery says idle with nothing
//! outstanding. Extended-protocol messages are collected until Sync or Flush so the whole
//! batch is routed at once (a pipeline with one INSERT goes to the primary as a whole).
//!
//! Named prepared statements live in the client's own table; on a server connection they
//! exist under pgway's names (`pgway_<hash of SQL and types>`), prepared on demand, so a
//! statement prepared on one connection can be executed on any other. Replies the client
//! must see for messages pgway answered itself (ParseComplete, CloseComplete), and replies
//! it must not see (for Parse messages pgway injected), are ordered by a queue of
//! [`Expect`] entries, one per message sent.

use std::collections::{HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::pin::Pin;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::{debug, warn, Instrument};

use super::cancel::{CancelKey, CancelTarget};
use super::Shared;
use crate::backend::server::statement_name;
use crate::backend::{BackendError, Pool, PoolError, PooledConn};
use crate::error;
use crate::net::{recycle_buffer, take_buffer, FramedStream, NetError};
use crate::protocol::frame::{frame_len, put_frame};
use crate::protocol::messages::{
    self, query_text, write_parse, write_target, Bind, Parse, Severity,
};
use crate::protocol::{FrameError, MAX_MESSAGE_LEN};
use crate::route::{Classification, PinReason, SessionEffect, Target};
use crate::settings::{sync_query, ClientSettings, Value};

/// Extended-protocol bytes collected without a Sync before pgway stops waiting for one and
/// sends them on (to the primary, since the batch cannot be judged whole).
const MAX_BATCH_BYTES: usize = 1 << 20;

/// Times a request is sent again after its server shut down before answering it.
const MAX_RETRIES: usize = 3;

/// Why a session ended early.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    /// The client went away or its socket failed: nobody to tell.
    #[error("client connection lost: {0}")]
    ClientGone(NetError),
    /// The server shut down before answering a request that can safely be sent again
    /// (handled inside the session; never reaches the client).
    #[error("server shut down before answering; retrying")]
    Retry,
    /// End the session with a FATAL ErrorResponse.
    #[error("{message}")]
    Fatal {
        /// SQLSTATE.
        code: &'static str,
        /// Text for the client.
        message: String,
    },
}

impl SessionError {
    fn protocol(e: FrameError) -> Self {
        Self::Fatal {
            code: error::PROTOCOL_VIOLATION,
            message: e.to_string(),
        }
    }

    fn from_client(e: NetError) -> Self {
        match e {
            NetError::Frame(f) => Self::protocol(f),
            NetError::Truncated => Self::Fatal {
                code: error::PROTOCOL_VIOLATION,
                message: "incomplete message from client".into(),
            },
            other => Self::ClientGone(other),
        }
    }

    fn server_lost(e: NetError) -> Self {
        Self::Fatal {
            code: error::CONNECTION_FAILURE,
            message: format!("server connection lost: {e}"),
        }
    }
}

/// A statement-level error pgway reports itself (ERROR, the session goes on).
#[derive(Debug)]
struct StatementError {
    code: String,
    message: String,
}

impl StatementError {
    fn new(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: code.to_owned(),
            message: message.into(),
        }
    }
}

/// A client's named (or unnamed) prepared statement.
#[derive(Debug)]
struct Prepared {
    sql: Vec<u8>,
    param_types: Vec<u8>,
    hash: u64,
    target: Target,
    /// Session effects of executing it (SET, LISTEN, ...).
    effects: Vec<SessionEffect>,
}

impl Prepared {
    fn server_name(&self) -> Vec<u8> {
        statement_name(self.hash)
    }
}

/// A child of `shared.shutdown` made once per thread (per gateway), for the sessions that
/// run there. Polling a cancellation token locks its node; with one node per worker, a
/// session's wait between requests locks nothing that other worker threads also lock.
fn thread_shutdown(shared: &Shared) -> CancellationToken {
    thread_local! {
        static CHILD: std::cell::RefCell<Option<(usize, CancellationToken)>> =
            const { std::cell::RefCell::new(None) };
    }
    // Keyed by the gateway's address: a thread serves one gateway, but tests run several
    // in one process.
    let key = std::ptr::from_ref(shared) as usize;
    CHILD.with_borrow_mut(|child| match child {
        Some((k, token)) if *k == key => token.clone(),
        _ => {
            let token = shared.shutdown.child_token();
            *child = Some((key, token.clone()));
            token
        }
    })
}

/// The error for a session that lost its server connection where it needs one. Made only
/// when needed: it allocates, and the check runs several times per statement.
fn no_server() -> SessionError {
    SessionError::Fatal {
        code: error::CONNECTION_FAILURE,
        message: "no server connection".into(),
    }
}

/// The effects that survive a committed transaction's savepoint history.
fn committed_effects(events: Vec<SessionEffect>) -> Vec<SessionEffect> {
    let mut effects = Vec::new();
    let mut savepoints: Vec<(String, usize)> = Vec::new();
    for event in events {
        match event {
            SessionEffect::Savepoint(name) => savepoints.push((name, effects.len())),
            SessionEffect::RollbackToSavepoint(name) => {
                if let Some(i) = savepoints.iter().rposition(|(n, _)| *n == name) {
                    effects.truncate(savepoints[i].1);
                    savepoints.truncate(i + 1);
                }
            }
            SessionEffect::ReleaseSavepoint(name) => {
                if let Some(i) = savepoints.iter().rposition(|(n, _)| *n == name) {
                    savepoints.truncate(i);
                }
            }
            effect => effects.push(effect),
        }
    }
    effects
}

/// Which server reply ends the answer to one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reply {
    Parse,
    Bind,
    Close,
    Describe,
    Execute,
    Sync,
    Query,
    FunctionCall,
}

impl Reply {
    fn ends_with(self, tag: u8) -> bool {
        match self {
            Reply::Parse => tag == b'1',
            Reply::Bind => tag == b'2',
            Reply::Close => tag == b'3',
            Reply::Describe => matches!(tag, b'T' | b'n'),
            Reply::Execute => matches!(tag, b'C' | b'I' | b's'),
            Reply::Sync | Reply::Query | Reply::FunctionCall => tag == b'Z',
        }
    }

    /// Simple query and function call keep going after an error, up to ReadyForQuery.
    fn survives_error(self) -> bool {
        matches!(self, Reply::Query | Reply::FunctionCall | Reply::Sync)
    }
}

/// One message sent (or answered locally), in order.
#[derive(Debug)]
enum Expect {
    /// Server replies until `kind` ends; forwarded to the client or swallowed.
    Server {
        kind: Reply,
        forward: bool,
        /// A Parse pgway sent under this hash: forget it on the connection if it fails.
        prepared: Option<u64>,
    },
    /// A reply pgway sends itself when its turn comes (ParseComplete, CloseComplete).
    Local(BytesMut),
}

/// One client's session.
pub struct Session<'a> {
    shared: &'a Shared,
    /// The connection's `client` span, entered around log events only.
    span: tracing::Span,
    /// Resolves when pgway starts shutting down. Made once per session and kept registered
    /// with the token, so waiting between requests touches no state shared with other
    /// sessions.
    stopping: Pin<Box<WaitForCancellationFutureOwned>>,
    client: FramedStream,
    out: BytesMut,
    to_server: BytesMut,
    user: String,
    database: String,
    password: String,
    cancel: CancelKey<'a>,
    server: Option<PooledConn>,
    /// Transaction status from the last ReadyForQuery (`I`, `T`, `E`).
    status: u8,
    /// Extended-protocol messages sent since the last Sync was answered.
    unsynced: bool,
    pending: VecDeque<Expect>,
    copy_in: bool,
    statements: HashMap<Vec<u8>, Arc<Prepared>>,
    unnamed: Option<Arc<Prepared>>,
    batch: Vec<BytesMut>,
    batch_bytes: usize,
    /// After an error pgway raised in the extended protocol: discard until Sync.
    skip_until_sync: bool,
    /// Session settings (startup and SET) that follow the client.
    settings: ClientSettings,
    /// Session-bound state holds the client on its server connection.
    pinned: Option<PinReason>,
    /// Effects of the request in flight, applied when it succeeds.
    request_effects: Vec<SessionEffect>,
    /// Effects inside the open transaction, applied if it commits.
    txn_effects: Vec<SessionEffect>,
    /// The request in flight got an ErrorResponse.
    request_failed: bool,
    /// The last CommandComplete was a ROLLBACK.
    rolled_back: bool,
    /// The request in flight may be sent again if the server shuts down before answering.
    can_retry: bool,
    /// A reply to the request in flight has been forwarded to the client.
    request_answered: bool,
    /// The server announced its shutdown in answer to a retryable request.
    retry_pending: bool,
    /// Length of `out` when the request in flight began.
    out_mark: usize,
    /// pgway answered a message of the batch in flight with an error: the rest of it, up to
    /// Sync, is not sent.
    batch_failed: bool,
    /// Statement names the request in flight added (forgotten again if it is re-sent).
    named_in_request: Vec<Vec<u8>>,
    /// This client's pools by node, so taking a connection needs no global lock. Each
    /// holds the session's own copy of the node's address: taking and dropping it per
    /// transaction then touches no reference count that other worker threads also write.
    /// A list, not a map: a session sees a handful of nodes.
    pools: Vec<(Arc<str>, Arc<Pool>)>,
}

impl<'a> Session<'a> {
    /// A session for a logged-in client.
    pub fn new(
        shared: &'a Shared,
        client: FramedStream,
        user: String,
        database: String,
        settings: ClientSettings,
        span: tracing::Span,
    ) -> Self {
        let password = shared
            .users
            .get(&user)
            .map(|u| u.config.password.clone())
            .unwrap_or_default();
        Self {
            shared,
            span,
            stopping: Box::pin(thread_shutdown(shared).cancelled_owned()),
            client,
            out: BytesMut::new(),
            to_server: BytesMut::new(),
            user,
            database,
            password,
            cancel: shared.cancels.register(),
            server: None,
            status: b'I',
            unsynced: false,
            pending: VecDeque::new(),
            copy_in: false,
            statements: HashMap::new(),
            unnamed: None,
            batch: Vec::new(),
            batch_bytes: 0,
            skip_until_sync: false,
            settings,
            pinned: None,
            request_effects: Vec::new(),
            txn_effects: Vec::new(),
            request_failed: false,
            rolled_back: false,
            can_retry: false,
            request_answered: false,
            retry_pending: false,
            out_mark: 0,
            batch_failed: false,
            named_in_request: Vec::new(),
            pools: Vec::new(),
        }
    }

    /// Greets the client (after `greeting`, which holds AuthenticationOk and the
    /// ParameterStatus messages) and serves it until it leaves.
    pub async fn run(mut self, greeting: BytesMut) {
        self.out = greeting;
        messages::backend_key_data(&mut self.out, self.cancel.pid, self.cancel.secret);
        messages::ready_for_query(&mut self.out, b'I');
        let result = match self.flush().await {
            Ok(()) => self.serve().await,
            Err(e) => Err(e),
        };
        let result = result.map_err(|e| match e {
            SessionError::Retry => SessionError::Fatal {
                code: error::CONNECTION_FAILURE,
                message: "server connection lost: the server kept shutting down".into(),
            },
            other => other,
        });
        let span = self.span.clone();
        async {
            match result {
                Ok(()) => debug!("client left"),
                Err(SessionError::ClientGone(cause)) => debug!(%cause, "client connection lost"),
                Err(SessionError::Retry) => {}
                Err(SessionError::Fatal { code, message }) => {
                    debug!(code, %message, "closing client connection");
                    self.out.clear();
                    messages::error_response(&mut self.out, Severity::Fatal, code, &message);
                    let _ = self.flush().await;
                }
            }
            self.cleanup().await;
        }
        .instrument(span)
        .await;
    }

    async fn flush(&mut self) -> Result<(), SessionError> {
        self.client
            .send(&mut self.out)
            .await
            .map_err(SessionError::ClientGone)
    }

    async fn next_frame(&mut self) -> Result<BytesMut, SessionError> {
        if self.pinned.is_some() && self.batch.is_empty() && self.pending.is_empty() {
            return self.next_frame_pinned().await;
        }
        let idle = self.server.is_none() && self.batch.is_empty();
        if idle {
            if let Some(frame) = self
                .client
                .try_frame(MAX_MESSAGE_LEN)
                .map_err(SessionError::from_client)?
            {
                return Ok(frame);
            }
            // Between requests a client holds no buffers: thousands of idle clients cost
            // little memory.
            self.client.release_buffer();
            recycle_buffer(&mut self.out);
            recycle_buffer(&mut self.to_server);
            // Between transactions a stopping pgway may close the connection.
            let frame = tokio::select! {
                biased;
                frame = self.client.read_frame(MAX_MESSAGE_LEN) => frame.map_err(SessionError::from_client),
                _ = self.stopping.as_mut() => Err(SessionError::Fatal {
                    code: error::ADMIN_SHUTDOWN,
                    message: "terminating connection because pgway is shutting down".into(),
                }),
            }?;
            self.out = take_buffer();
            self.to_server = take_buffer();
            Ok(frame)
        } else {
            self.client
                .read_frame(MAX_MESSAGE_LEN)
                .await
                .map_err(SessionError::from_client)
        }
    }

    /// Waits for the client's next message while relaying what the pinned server sends
    /// unprompted (NotificationResponse for LISTEN, notices, parameter changes).
    async fn next_frame_pinned(&mut self) -> Result<BytesMut, SessionError> {
        loop {
            if let Some(frame) = self
                .client
                .try_frame(MAX_MESSAGE_LEN)
                .map_err(SessionError::from_client)?
            {
                return Ok(frame);
            }
            // Forward what the server has already sent before waiting for more: a
            // notification can arrive in the same read as the end of the last reply, which
            // `relay` leaves in the buffer.
            let mut forwarded = false;
            while let Some(frame) = match self.server.as_mut() {
                Some(server) => server
                    .io
                    .try_frame(MAX_MESSAGE_LEN)
                    .map_err(SessionError::server_lost)?,
                None => None,
            } {
                self.out.extend_from_slice(&frame);
                forwarded = true;
                if frame[0] == b'E' {
                    self.flush().await?;
                    return Err(SessionError::ClientGone(NetError::Closed));
                }
            }
            if forwarded {
                self.flush().await?;
            }
            let Session { server, client, .. } = self;
            let Some(server) = server.as_mut() else {
                return client
                    .read_frame(MAX_MESSAGE_LEN)
                    .await
                    .map_err(SessionError::from_client);
            };
            tokio::select! {
                frame = client.read_frame(MAX_MESSAGE_LEN) => {
                    return frame.map_err(SessionError::from_client);
                }
                filled = server.io.fill() => filled.map_err(SessionError::server_lost)?,
            }
        }
    }

    async fn serve(&mut self) -> Result<(), SessionError> {
        loop {
            let frame = self.next_frame().await?;
            match frame[0] {
                b'Q' => self.on_query(frame).await?,
                b'F' => self.on_function_call(frame).await?,
                b'P' | b'B' | b'D' | b'E' | b'C' => {
                    self.batch_bytes += frame.len();
                    self.batch.push(frame);
                    if self.batch_bytes > MAX_BATCH_BYTES {
                        self.run_batch(false).await?;
                    }
                }
                b'H' => {
                    self.batch.push(frame);
                    self.run_batch(false).await?;
                }
                b'S' => {
                    self.batch.push(frame);
                    self.run_batch(true).await?;
                }
                b'X' => return Ok(()),
                // CopyData/CopyDone/CopyFail outside COPY (after a failed COPY): ignored, as
                // PostgreSQL does.
                b'd' | b'c' | b'f' => {}
                other => {
                    return Err(SessionError::Fatal {
                        code: error::PROTOCOL_VIOLATION,
                        message: format!("invalid frontend message type {other}"),
                    })
                }
            }
        }
    }

    /// Reports a pgway-raised error for a statement; `ready` adds ReadyForQuery.
    async fn report(&mut self, e: StatementError, ready: bool) -> Result<(), SessionError> {
        messages::error_response(&mut self.out, Severity::Error, &e.code, &e.message);
        if ready {
            messages::ready_for_query(&mut self.out, self.status);
        }
        self.flush().await
    }

    async fn on_query(&mut self, frame: BytesMut) -> Result<(), SessionError> {
        if self.skip_until_sync {
            return Ok(());
        }
        let sql = query_text(&frame).map_err(SessionError::protocol)?;
        let classification = std::str::from_utf8(sql)
            .ok()
            .map(|sql| self.shared.router.classification(sql));
        if let Some(c) = &classification {
            if let Some(what) = c.session.iter().find_map(|e| match e {
                SessionEffect::Unsupported(what) => Some(*what),
                _ => None,
            }) {
                let e = StatementError::new(
                    error::FEATURE_NOT_SUPPORTED,
                    format!("{what} is not supported through pgway: it cannot follow the session across pooled connections"),
                );
                return self.report(e, true).await;
            }
            if self.answer_deallocate(sql, c).await? {
                return Ok(());
            }
        }
        let target = match &classification {
            Some(c) if self.server.is_none() => {
                self.shared
                    .router
                    .target(c, &self.database, &self.user)
                    .await
            }
            _ => Target::Primary,
        };
        let effects = classification
            .map(|c| c.session.clone())
            .unwrap_or_default();
        let mut attempt = 0;
        loop {
            self.begin_request();
            if self.server.is_none() {
                if let Err(e) = self.attach(target).await {
                    return self.report(e, true).await;
                }
            }
            self.request_effects = effects.clone();
            let server = self.server_mut()?;
            // A simple query replaces the unnamed statement.
            server.unnamed = None;
            self.to_server.extend_from_slice(&frame);
            self.expect(Reply::Query, true, None);
            match self.send_and_relay(true).await {
                Err(SessionError::Retry) if attempt < MAX_RETRIES => {
                    attempt += 1;
                    self.abandon_server();
                }
                other => {
                    other?;
                    self.maybe_release();
                    return Ok(());
                }
            }
        }
    }

    /// Marks the start of a request: whether it may be retried on another connection if
    /// the server shuts down before answering (only outside a transaction, when nothing
    /// of it can have taken effect).
    fn begin_request(&mut self) {
        self.can_retry = self.status == b'I' && !self.unsynced && self.pinned.is_none();
        self.request_answered = false;
        self.retry_pending = false;
        self.out_mark = self.out.len();
        self.batch_failed = false;
        self.named_in_request.clear();
    }

    /// Sends what is queued and, if `relay`, relays the answers.
    async fn send_and_relay(&mut self, relay: bool) -> Result<(), SessionError> {
        let sent = self.send_to_server().await;
        match sent {
            Err(_) if self.can_retry && !self.request_answered => return Err(SessionError::Retry),
            other => other?,
        }
        if relay {
            self.relay().await?;
        }
        Ok(())
    }

    /// Drops a server connection that went away under a retryable request, forgets what
    /// was queued for it and takes its node out of rotation until it is healthy again.
    fn abandon_server(&mut self) {
        if let Some(conn) = self.server.take() {
            self.span.in_scope(|| {
                debug!(node = %conn.addr, "server shut down before answering; sending the request again");
            });
            self.shared.topology.mark_down(&conn.addr);
            self.shared.pools.clear_node(&conn.addr);
        }
        if let Ok(mut slot) = self.cancel.slot.lock() {
            *slot = None;
        }
        self.pending.clear();
        self.to_server.clear();
        self.out.truncate(self.out_mark);
        self.copy_in = false;
        self.unsynced = false;
        self.request_effects.clear();
        self.request_failed = false;
        for name in std::mem::take(&mut self.named_in_request) {
            self.statements.remove(&name);
        }
    }

    /// `DEALLOCATE name` / `DEALLOCATE ALL` of protocol-level statements, which live in
    /// pgway, not on any one server: answered here unless the client is pinned (its SQL
    /// `PREPARE`d statements are on its server). Returns true if answered.
    async fn answer_deallocate(
        &mut self,
        sql: &[u8],
        classification: &Classification,
    ) -> Result<bool, SessionError> {
        let [effect] = classification.session.as_slice() else {
            return Ok(false);
        };
        let single = sql
            .iter()
            .rposition(|&b| b != b';' && !b.is_ascii_whitespace())
            .is_some_and(|last| !sql[..last].contains(&b';'));
        if !single {
            return Ok(false);
        }
        let tag: &[u8] = match effect {
            SessionEffect::Deallocate(name) if self.statements.contains_key(name.as_bytes()) => {
                self.statements.remove(name.as_bytes());
                b"DEALLOCATE\0"
            }
            SessionEffect::DeallocateAll if self.pinned.is_none() => {
                self.statements.clear();
                self.unnamed = None;
                b"DEALLOCATE ALL\0"
            }
            _ => return Ok(false),
        };
        put_frame(&mut self.out, b'C', tag);
        messages::ready_for_query(&mut self.out, self.status);
        self.flush().await?;
        Ok(true)
    }

    /// Writes what is queued for the server.
    async fn send_to_server(&mut self) -> Result<(), SessionError> {
        let mut to_server = std::mem::take(&mut self.to_server);
        let server = self.server_mut()?;
        let sent = server.io.send(&mut to_server).await;
        self.to_server = to_server;
        sent.map_err(SessionError::server_lost)
    }

    async fn on_function_call(&mut self, frame: BytesMut) -> Result<(), SessionError> {
        if self.skip_until_sync {
            return Ok(());
        }
        if self.server.is_none() {
            if let Err(e) = self.attach(Target::Primary).await {
                return self.report(e, true).await;
            }
        }
        self.to_server.extend_from_slice(&frame);
        self.expect(Reply::FunctionCall, true, None);
        self.send_to_server().await?;
        self.relay().await?;
        self.maybe_release();
        Ok(())
    }

    fn server_mut(&mut self) -> Result<&mut PooledConn, SessionError> {
        self.server.as_mut().ok_or_else(no_server)
    }

    /// Routes, rewrites, sends and relays the collected extended-protocol batch.
    /// `sync`: the batch ends with Sync (else with Flush, or it grew too large).
    async fn run_batch(&mut self, sync: bool) -> Result<(), SessionError> {
        let batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        if self.skip_until_sync {
            if sync {
                self.skip_until_sync = false;
                messages::ready_for_query(&mut self.out, self.status);
                self.flush().await?;
            }
            return Ok(());
        }
        let complete = sync || batch.last().is_some_and(|f| f[0] == b'H');
        let parse_targets = self.parse_targets(&batch).await?;
        let target = if !complete {
            Target::Primary
        } else if self.server.is_none() {
            self.batch_target(&batch, &parse_targets)?
        } else {
            Target::Primary
        };
        let mut attempt = 0;
        loop {
            self.begin_request();
            self.can_retry &= sync;
            if self.server.is_none() {
                if let Err(e) = self.attach(target).await {
                    self.skip_until_sync = !sync;
                    return self.report(e, sync).await;
                }
            }
            let mut targets = parse_targets.iter();
            for frame in &batch {
                let target = if frame[0] == b'P' {
                    targets.next().copied()
                } else {
                    None
                };
                self.translate(frame, target.unwrap_or(Target::Primary))?;
            }
            self.unsynced = !sync;
            match self.send_and_relay(complete).await {
                Err(SessionError::Retry) if attempt < MAX_RETRIES => {
                    attempt += 1;
                    self.abandon_server();
                }
                other => {
                    other?;
                    if complete {
                        self.maybe_release();
                    }
                    return Ok(());
                }
            }
        }
    }

    /// The target of every Parse in the batch (in order).
    async fn parse_targets(&self, batch: &[BytesMut]) -> Result<Vec<Target>, SessionError> {
        let mut targets = Vec::new();
        for frame in batch.iter().filter(|f| f[0] == b'P') {
            let parse = Parse::decode(frame).map_err(SessionError::protocol)?;
            targets.push(match std::str::from_utf8(parse.sql) {
                Ok(sql) => {
                    self.shared
                        .router
                        .route(sql, &self.database, &self.user)
                        .await
                }
                Err(_) => Target::Primary,
            });
        }
        Ok(targets)
    }

    /// The target for a whole batch: the primary if any statement in it needs it.
    fn batch_target(
        &self,
        batch: &[BytesMut],
        parse_targets: &[Target],
    ) -> Result<Target, SessionError> {
        let mut target = Target::Replica;
        // Statements parsed earlier in this batch, by name (the unnamed one too).
        let mut parsed: HashMap<&[u8], Target> = HashMap::new();
        let mut parse_targets = parse_targets.iter();
        for frame in batch {
            let this = match frame[0] {
                b'P' => {
                    let parse = Parse::decode(frame).map_err(SessionError::protocol)?;
                    let t = parse_targets.next().copied().unwrap_or(Target::Primary);
                    parsed.insert(parse.name, t);
                    t
                }
                b'B' => {
                    let bind = Bind::decode(frame).map_err(SessionError::protocol)?;
                    let known = if bind.statement.is_empty() {
                        self.unnamed.as_ref()
                    } else {
                        self.statements.get(bind.statement)
                    };
                    parsed
                        .get(bind.statement)
                        .copied()
                        .or(known.map(|p| p.target))
                        .unwrap_or(Target::Primary)
                }
                _ => continue,
            };
            if this == Target::Primary {
                return Ok(Target::Primary);
            }
            target = this;
        }
        Ok(target)
    }

    /// Appends one client message, rewritten for the attached server, to `to_server`, and
    /// records what to expect back.
    /// `target` is the routing decision for a Parse message.
    fn translate(&mut self, frame: &BytesMut, target: Target) -> Result<(), SessionError> {
        let client_id = self.cancel.pid as u64;
        if self.batch_failed && frame[0] != b'S' {
            // PostgreSQL skips everything after an error until Sync.
            return Ok(());
        }
        match frame[0] {
            b'P' => {
                let parse = Parse::decode(frame).map_err(SessionError::protocol)?;
                if !parse.name.is_empty() && self.statements.contains_key(parse.name) {
                    let mut error = BytesMut::new();
                    messages::error_response(
                        &mut error,
                        Severity::Error,
                        "42P05",
                        &format!(
                            "prepared statement \"{}\" already exists",
                            String::from_utf8_lossy(parse.name)
                        ),
                    );
                    self.pending.push_back(Expect::Local(error));
                    self.batch_failed = true;
                    self.request_failed = true;
                    return Ok(());
                }
                if !parse.name.is_empty() {
                    self.named_in_request.push(parse.name.to_vec());
                }
                let prepared = self.remember(&parse, target);
                if parse.name.is_empty() {
                    self.to_server.extend_from_slice(frame);
                    self.server_mut()?.unnamed = Some((prepared.hash, client_id));
                    self.expect(Reply::Parse, true, None);
                } else if self.server_mut()?.statements.touch(prepared.hash) {
                    self.pending.push_back(Expect::Local(local_reply(b'1')));
                } else {
                    self.prepare_on_server(&prepared, true)?;
                }
            }
            b'B' => {
                let bind = Bind::decode(frame).map_err(SessionError::protocol)?;
                let prepared = if bind.statement.is_empty() {
                    self.unnamed.as_ref()
                } else {
                    self.statements.get(bind.statement)
                };
                if let Some(prepared) = prepared {
                    self.request_effects
                        .extend(prepared.effects.iter().cloned());
                }
                match self.server_statement(bind.statement)? {
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
                    self.pending.push_back(Expect::Local(local_reply(b'3')));
                } else {
                    self.to_server.extend_from_slice(frame);
                    self.expect(Reply::Close, true, None);
                }
            }
            b'E' => {
                self.to_server.extend_from_slice(frame);
                self.expect(Reply::Execute, true, None);
            }
            b'S' => {
                self.to_server.extend_from_slice(frame);
                self.expect(Reply::Sync, true, None);
            }
            _ => self.to_server.extend_from_slice(frame),
        }
        Ok(())
    }

    fn expect(&mut self, kind: Reply, forward: bool, prepared: Option<u64>) {
        self.pending.push_back(Expect::Server {
            kind,
            forward,
            prepared,
        });
    }

    /// Records a client's Parse, and where it is to run, in its statement table.
    fn remember(&mut self, parse: &Parse<'_>, target: Target) -> Arc<Prepared> {
        let mut hasher = DefaultHasher::new();
        parse.sql.hash(&mut hasher);
        parse.param_types.hash(&mut hasher);
        let hash = hasher.finish();
        let effects = std::str::from_utf8(parse.sql)
            .map(|sql| self.shared.router.classification(sql).session.clone())
            .unwrap_or_default();
        let prepared = Arc::new(Prepared {
            sql: parse.sql.to_vec(),
            param_types: parse.param_types.to_vec(),
            hash,
            target,
            effects,
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
        let capacity = self.shared.config.pool.statement_cache;
        let name = prepared.server_name();
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
    fn server_statement(&mut self, name: &[u8]) -> Result<Option<Vec<u8>>, SessionError> {
        let client_id = self.cancel.pid as u64;
        if name.is_empty() {
            let Some(prepared) = self.unnamed.clone() else {
                return Ok(None);
            };
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
        let Some(prepared) = self.statements.get(name).cloned() else {
            return Ok(None);
        };
        if !self.server_mut()?.statements.touch(prepared.hash) {
            self.prepare_on_server(&prepared, false)?;
        }
        Ok(Some(prepared.server_name()))
    }

    /// Takes a server connection for `target`, trying another node when one is down.
    async fn attach(&mut self, target: Target) -> Result<(), StatementError> {
        let shared = self.shared;
        let topology = &shared.topology;
        let wait = shared.config.topology.failover_timeout();
        let mut attempts = topology.node_count() + 1;
        loop {
            let pick = |addr: &str| self.pool_index(addr);
            let index = match target {
                Target::Replica => topology.with_replica(pick),
                Target::Primary => topology.with_primary(pick),
            };
            let index = match index {
                Some(index) => index,
                None => {
                    let addr = topology.wait_primary(wait).await.ok_or_else(|| {
                        StatementError::new(
                            error::CONNECTION_FAILURE,
                            format!("no primary server became available within {wait:?}"),
                        )
                    })?;
                    self.pool_index(&addr)
                }
            };
            let (addr, pool) = &self.pools[index];
            let addr = Arc::clone(addr);
            match pool.acquire().await {
                Ok(conn) => {
                    if let Ok(mut slot) = self.cancel.slot.lock() {
                        *slot = Some(CancelTarget {
                            addr: Arc::clone(&addr),
                            pid: conn.pid,
                            secret: conn.secret,
                        });
                    }
                    self.server = Some(conn);
                    self.sync_settings();
                    return Ok(());
                }
                Err(e @ PoolError::Timeout { .. }) => {
                    return Err(StatementError::new(
                        error::TOO_MANY_CONNECTIONS,
                        e.to_string(),
                    ))
                }
                Err(PoolError::Connect(e)) if e.is_node_down() && attempts > 1 => {
                    self.span.in_scope(|| {
                        warn!(node = %addr, cause = %e, "node unreachable; taking it out of rotation");
                    });
                    topology.mark_down(&addr);
                    shared.pools.clear_node(&addr);
                    attempts -= 1;
                }
                Err(PoolError::Connect(BackendError::Server { code, message })) => {
                    return Err(StatementError::new(&code, message))
                }
                Err(PoolError::Connect(e)) => {
                    return Err(StatementError::new(
                        error::CONNECTION_FAILURE,
                        e.to_string(),
                    ))
                }
            }
        }
    }

    /// The index in `self.pools` of the pool for `addr`, added on first use.
    fn pool_index(&mut self, addr: &str) -> usize {
        if let Some(i) = self.pools.iter().position(|(a, _)| **a == *addr) {
            return i;
        }
        let pool = self
            .shared
            .pools
            .get(addr, &self.database, &self.user, &self.password);
        self.pools.push((Arc::from(addr), pool));
        self.pools.len() - 1
    }

    /// Queues the query that brings the attached connection's settings in line with the
    /// client's, if they differ; its replies are swallowed.
    fn sync_settings(&mut self) {
        let Some(server) = self.server.as_mut() else {
            return;
        };
        if let Some(sql) = sync_query(&mut server.applied, &self.settings.current) {
            server.unnamed = None;
            messages::query(&mut self.to_server, &sql);
            self.expect(Reply::Query, false, None);
        }
    }

    /// At the end of a request (ReadyForQuery): keep the session effects of what succeeded
    /// and committed, drop the rest.
    fn on_request_done(&mut self, status: u8) {
        let effects = std::mem::take(&mut self.request_effects);
        let failed = std::mem::take(&mut self.request_failed);
        if !failed {
            self.txn_effects.extend(effects);
        }
        if status == b'I' {
            let events = std::mem::take(&mut self.txn_effects);
            if !self.rolled_back {
                self.apply_effects(committed_effects(events));
            }
        }
    }

    fn apply_effects(&mut self, effects: Vec<SessionEffect>) {
        for effect in effects {
            let server = self.server.as_mut();
            match effect {
                SessionEffect::Set { name, value } => {
                    if let Some(server) = server {
                        server
                            .applied
                            .settings
                            .set(&name, Value::Sql(value.clone()));
                    }
                    self.settings.current.set(&name, Value::Sql(value));
                }
                SessionEffect::Reset(name) => {
                    if let Some(server) = server {
                        server.applied.settings.remove(&name);
                    }
                    self.settings.reset(&name);
                }
                SessionEffect::ResetAll => {
                    if let Some(server) = server {
                        server.applied.settings.clear();
                    }
                    self.settings.reset_all();
                }
                SessionEffect::DiscardAll => {
                    if let Some(server) = server {
                        server.applied.settings.clear();
                        server.statements = Default::default();
                        server.unnamed = None;
                    }
                    self.settings.reset_all();
                    self.statements.clear();
                    self.unnamed = None;
                    self.pinned = None;
                }
                SessionEffect::DeallocateAll => {
                    if let Some(server) = server {
                        server.statements = Default::default();
                    }
                    self.statements.clear();
                }
                SessionEffect::Deallocate(name) => {
                    self.statements.remove(name.as_bytes());
                }
                SessionEffect::Pin(reason) => {
                    if self.pinned.is_none() {
                        self.span.in_scope(|| {
                            debug!(?reason, "client pinned to its server connection");
                        });
                    }
                    self.pinned = Some(reason);
                }
                SessionEffect::SetLocal
                | SessionEffect::DiscardOther
                | SessionEffect::Unlisten
                | SessionEffect::Savepoint(_)
                | SessionEffect::RollbackToSavepoint(_)
                | SessionEffect::ReleaseSavepoint(_)
                | SessionEffect::Unsupported(_) => {}
            }
        }
    }

    /// Returns the server connection to its pool when the client no longer needs it.
    fn maybe_release(&mut self) {
        if self.status == b'I'
            && self.pending.is_empty()
            && !self.unsynced
            && !self.copy_in
            && self.pinned.is_none()
        {
            if let Some(conn) = self.server.take() {
                if let Ok(mut slot) = self.cancel.slot.lock() {
                    *slot = None;
                }
                conn.release();
            }
        }
    }

    /// Sends pgway's own replies that are due.
    fn emit_local(&mut self) {
        while let Some(Expect::Local(_)) = self.pending.front() {
            if let Some(Expect::Local(frame)) = self.pending.pop_front() {
                self.out.extend_from_slice(&frame);
            }
        }
    }

    /// Drops what the server skips after an error in the extended protocol: everything up
    /// to the next Sync.
    fn skip_to_sync(&mut self) {
        while let Some(front) = self.pending.front() {
            match front {
                Expect::Server {
                    kind: Reply::Sync, ..
                } => break,
                Expect::Server {
                    prepared: Some(hash),
                    ..
                } => {
                    let hash = *hash;
                    if let Some(server) = self.server.as_mut() {
                        server.statements.remove(hash);
                    }
                }
                _ => {}
            }
            self.pending.pop_front();
        }
    }

    /// Handles one server message: forward or swallow it, and advance the queue.
    fn on_server_frame(&mut self, frame: &[u8]) {
        let tag = frame[0];
        let head = match self.pending.front() {
            Some(Expect::Server {
                kind,
                forward,
                prepared,
            }) => Some((*kind, *forward, *prepared)),
            _ => None,
        };
        let forward = head.is_none_or(|(_, forward, _)| forward);
        match tag {
            // Notifications belong to no request and always reach the client.
            b'A' => self.out.extend_from_slice(frame),
            // Notices and parameter changes from pgway's own queries are not the client's.
            b'N' | b'S' => {
                if forward {
                    self.out.extend_from_slice(frame);
                }
            }
            b'G' | b'W' => {
                self.request_answered = true;
                self.copy_in = true;
                self.out.extend_from_slice(frame);
            }
            b'E' if self.can_retry && !self.request_answered && is_shutdown(frame) => {
                // The server is going away and did not run the request: send it elsewhere.
                self.retry_pending = true;
                return;
            }
            b'E' => {
                // Errors always reach the client, even for a message pgway injected.
                self.request_answered = true;
                self.forward_error(frame);
                self.copy_in = false;
                if forward {
                    self.request_failed = true;
                } else if let Some(server) = self.server.as_mut() {
                    server.applied.dirty = true;
                }
                if let Some((kind, _, prepared)) = head {
                    if !kind.survives_error() {
                        if let (Some(hash), Some(server)) = (prepared, self.server.as_mut()) {
                            server.statements.remove(hash);
                        }
                        self.pending.pop_front();
                        self.skip_to_sync();
                    }
                }
            }
            _ => match head {
                Some((kind, forward, _)) => {
                    if forward {
                        self.request_answered = true;
                        self.out.extend_from_slice(frame);
                        if tag == b'C' {
                            self.rolled_back = messages::body(frame).starts_with(b"ROLLBACK");
                        }
                    }
                    if kind.ends_with(tag) {
                        self.pending.pop_front();
                        if tag == b'Z' {
                            let status = frame.get(5).copied().unwrap_or(b'I');
                            self.status = status;
                            if kind == Reply::Sync {
                                self.unsynced = false;
                            }
                            if forward {
                                self.on_request_done(status);
                            }
                        }
                    }
                }
                None => {
                    self.request_answered = true;
                    self.out.extend_from_slice(frame);
                }
            },
        }
        self.emit_local();
    }

    /// Forwards an ErrorResponse, naming statements as the client named them rather than by
    /// pgway's server-side names.
    fn forward_error(&mut self, frame: &[u8]) {
        const PREFIX: &str = "pgway_";
        if !frame.windows(PREFIX.len()).any(|w| w == PREFIX.as_bytes()) {
            self.out.extend_from_slice(frame);
            return;
        }
        let statements = &self.statements;
        let client_name = |hash: u64| {
            statements
                .iter()
                .find(|(_, p)| p.hash == hash)
                .map(|(name, _)| String::from_utf8_lossy(name).into_owned())
        };
        messages::rewrite_error(frame, &mut self.out, |value| {
            let mut text = value.to_owned();
            let mut from = 0;
            while let Some(at) = text[from..].find(PREFIX).map(|i| i + from) {
                let hex_end = at + PREFIX.len() + 16;
                let name = text
                    .get(at + PREFIX.len()..hex_end)
                    .and_then(|hex| u64::from_str_radix(hex, 16).ok())
                    .and_then(client_name);
                match name {
                    Some(name) => {
                        text.replace_range(at..hex_end, &name);
                        from = at + name.len();
                    }
                    None => from = at + PREFIX.len(),
                }
            }
            text
        });
    }

    /// Relays server replies to the client until every expected reply has arrived, passing
    /// COPY data from the client to the server meanwhile.
    async fn relay(&mut self) -> Result<(), SessionError> {
        self.emit_local();
        loop {
            // Frames are handled where they lie in the read buffer (no split per message);
            // the buffer is lent out of the connection meanwhile.
            let mut buf = std::mem::take(&mut self.server_mut()?.io.rbuf);
            let mut pos = 0;
            let mut malformed = None;
            while !self.pending.is_empty() || self.copy_in {
                match frame_len(&buf[pos..], MAX_MESSAGE_LEN) {
                    Ok(Some(len)) => {
                        self.on_server_frame(&buf[pos..pos + len]);
                        pos += len;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        malformed = Some(e);
                        break;
                    }
                }
            }
            buf.advance(pos);
            self.server_mut()?.io.rbuf = buf;
            if let Some(e) = malformed {
                return Err(self.lost(NetError::Frame(e)));
            }
            let done = self.pending.is_empty() && !self.copy_in;
            // Replies pgway made itself wait for the server's first answer, so a request
            // can still be sent elsewhere if the server shuts down without answering.
            if done || self.request_answered || !self.can_retry {
                self.flush().await?;
            }
            if done {
                return Ok(());
            }
            let Session {
                server,
                client,
                copy_in,
                ..
            } = self;
            let server = server.as_mut().ok_or_else(no_server)?;
            if *copy_in {
                tokio::select! {
                    filled = server.io.fill() => filled.map_err(SessionError::server_lost)?,
                    frame = client.read_frame(MAX_MESSAGE_LEN) => {
                        let frame = frame.map_err(SessionError::from_client)?;
                        match frame[0] {
                            b'd' | b'c' | b'f' | b'H' | b'S' => {
                                if matches!(frame[0], b'c' | b'f') {
                                    *copy_in = false;
                                }
                                server
                                    .io
                                    .send_bytes(&frame)
                                    .await
                                    .map_err(SessionError::server_lost)?;
                            }
                            other => {
                                return Err(SessionError::Fatal {
                                    code: error::PROTOCOL_VIOLATION,
                                    message: format!("unexpected message type {other} during COPY"),
                                })
                            }
                        }
                    }
                }
            } else if let Err(e) = server.io.fill().await {
                return Err(self.lost(e));
            }
        }
    }

    /// The error for a server connection that failed under the request in flight.
    fn lost(&self, e: NetError) -> SessionError {
        if self.retry_pending {
            SessionError::Retry
        } else {
            SessionError::server_lost(e)
        }
    }

    /// At the end of a session: return the server connection if it can be reused, rolling
    /// back an open transaction first; otherwise close it.
    async fn cleanup(&mut self) {
        if let Ok(mut slot) = self.cancel.slot.lock() {
            *slot = None;
        }
        let Some(mut conn) = self.server.take() else {
            return;
        };
        if !self.pending.is_empty() || self.copy_in {
            // Mid-statement: closing the connection makes the server abort it.
            return;
        }
        if self.pinned.is_some() {
            // Temporary tables, advisory locks, LISTEN, prepared statements: closing the
            // connection is the one sure way to leave nothing behind for the next client.
            return;
        }
        if self.status == b'I' && !self.unsynced {
            conn.release();
            return;
        }
        let mut out = BytesMut::new();
        let mut expected = 1;
        if self.unsynced {
            put_frame(&mut out, b'S', &[]);
            expected += 1;
        }
        messages::query(&mut out, "ROLLBACK");
        let rollback = async {
            conn.io.send(&mut out).await?;
            let mut status = b'E';
            while expected > 0 {
                let frame = conn.io.read_frame(MAX_MESSAGE_LEN).await?;
                if frame[0] == b'Z' {
                    expected -= 1;
                    status = frame.get(5).copied().unwrap_or(b'E');
                }
            }
            Ok::<u8, NetError>(status)
        };
        match tokio::time::timeout(self.shared.config.pool.connect_timeout, rollback).await {
            Ok(Ok(b'I')) => {
                debug!("rolled back the open transaction of a client that left");
                conn.release();
            }
            _ => debug!("closing server connection after a failed rollback"),
        }
    }
}

/// True for a FATAL ErrorResponse by which a server says it is shutting down (or cannot
/// take connections, or ends an idle session), so the request it answers did not run.
fn is_shutdown(frame: &[u8]) -> bool {
    let (code, _) = messages::error_fields(frame);
    let fatal = messages::error_severity(frame).is_some_and(|s| s == "FATAL");
    // 57P01 admin shutdown / pg_terminate_backend, 57P02 crash shutdown, 57P03 cannot
    // connect now, 57P05 idle_session_timeout.
    fatal && matches!(code.as_str(), "57P01" | "57P02" | "57P03" | "57P05")
}

/// A reply pgway gives itself: a message with an empty body (ParseComplete, CloseComplete).
fn local_reply(tag: u8) -> BytesMut {
    let mut frame = BytesMut::new();
    put_frame(&mut frame, tag, &[]);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(value: &str) -> SessionEffect {
        SessionEffect::Set {
            name: "work_mem".into(),
            value: value.into(),
        }
    }

    #[test]
    fn savepoints_undo_and_keep_effects() {
        use SessionEffect::{
            ReleaseSavepoint as Release, RollbackToSavepoint as RollbackTo, Savepoint,
        };
        let events = vec![
            set("'8MB'"),
            Savepoint("s".into()),
            set("'9MB'"),
            RollbackTo("s".into()),
            Savepoint("t".into()),
            set("'10MB'"),
            Release("t".into()),
            RollbackTo("missing".into()),
        ];
        assert_eq!(committed_effects(events), vec![set("'8MB'"), set("'10MB'")]);
        // Rolling back to an outer savepoint undoes inner ones too.
        let events = vec![
            Savepoint("a".into()),
            set("'1MB'"),
            Savepoint("b".into()),
            set("'2MB'"),
            RollbackTo("a".into()),
            set("'3MB'"),
        ];
        assert_eq!(committed_effects(events), vec![set("'3MB'")]);
    }

    #[test]
    fn shutdown_errors_are_recognised() {
        let mut frame = BytesMut::new();
        messages::error_response(&mut frame, Severity::Fatal, "57P01", "terminating");
        assert!(is_shutdown(&frame));
        frame.clear();
        messages::error_response(&mut frame, Severity::Error, "57P01", "not fatal");
        assert!(!is_shutdown(&frame));
        frame.clear();
        messages::error_response(&mut frame, Severity::Fatal, "28P01", "password");
        assert!(!is_shutdown(&frame));
    }
}
