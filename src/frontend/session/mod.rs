//! One client's session: routing, transaction pooling and the relay, as a state machine.
//!
//! A client holds a server connection only while it needs one: from the first message of
//! a statement or transaction until the server's ReadyForQuery says idle with nothing
//! outstanding. Extended-protocol messages are collected until Sync or Flush so the whole
//! batch is routed at once (a pipeline with one INSERT goes to the primary as a whole).
//!
//! # States
//!
//! Where the client stands is a `State`; the server connection belongs to the states
//! that have one.
//!
//! - **Idle**: no server connection. The client's next request is routed (a replica for a
//!   read, else the primary) and takes a connection from that node's pool.
//! - **Attached**: a server connection is held for a request in flight, an open
//!   transaction, or an extended-protocol batch that has not reached its Sync.
//! - **Begun**: the client sent a plain `BEGIN` outside a transaction. pgway answered it
//!   (ReadyForQuery `T`) and holds it: the transaction's first request takes a primary
//!   connection and goes after the `BEGIN`, in one write. A round trip fewer per
//!   transaction, and no server connection idles in a transaction the client has not used
//!   yet. If no connection can be had then, the transaction is lost: Aborted.
//! - **Pinned**: session-bound state (LISTEN, a temporary table, a session advisory lock,
//!   SQL `PREPARE`, a `WITH HOLD` cursor) holds the client on its connection; between
//!   requests pgway relays what the server sends unprompted (notifications).
//! - **CopyIn**: a `COPY ... FROM STDIN` is running; the client's CopyData goes straight
//!   to the server. It remembers whether the client was pinned, and for a COPY sent with
//!   Execute, it lasts until the client's Sync after CopyDone (or after the error).
//! - **SkipToSync**: pgway answered an extended-protocol batch with an error before any
//!   server saw it (no connection could be had), or its server died under it; the
//!   client's messages are discarded up to its Sync, as PostgreSQL does after an error.
//! - **Aborted**: the server of the client's open transaction died under a request. The
//!   client got an ERROR and ReadyForQuery `E`, as for any failed transaction; pgway
//!   answers its `ROLLBACK` itself (then Idle) and anything else with 25P02.
//!
//! Moves between them:
//!
//! ```text
//! Idle ──request──▶ Attached ──ReadyForQuery idle, nothing outstanding──▶ Idle
//!   │                 │  ▲
//!   │                 │  └──DISCARD ALL──┐
//!   │                 ├──pinning effect──▶ Pinned (until the client leaves)
//!   │                 └──CopyInResponse──▶ CopyIn ──CopyDone / CopyFail / error──▶ back
//!   ├──plain BEGIN──▶ Begun ──request──▶ Attached (the BEGIN sent first)
//!   │                   └──no connection for the request──▶ Aborted
//!   ├──no connection for an unsynced batch──▶ SkipToSync ──Sync──▶ Idle
//!   └──server shut down before answering: the request is sent again from Idle
//! Attached ──server died inside a transaction──▶ Aborted ──ROLLBACK──▶ Idle
//!          └─server died outside one: ERROR (08007 if it may have committed)──▶ Idle
//! ```
//!
//! A request's bookkeeping (its session effects, whether it failed, whether it may be
//! sent again) is one `Request`, reset in one place.
//!
//! # Files
//! - `serve.rs`: the loop: reading the client's messages, routing, sending a
//!   request (again, if its server shut down before answering).
//! - `relay.rs`: replies, and what is expected of the server in what order.
//! - `prepared.rs`: the client's prepared statements and their names on
//!   server connections.
//! - `effects.rs`: session effects (SET, pins, DISCARD, `pgway.target`).
//! - `attach.rs`: taking and releasing a server connection, and cleaning up
//!   when the client leaves.
//! - `lost.rs`: a server that died under a request (the client is told and goes on).

mod attach;
mod batch;
mod cache;
mod effects;
mod freshness;
mod lost;
mod prepared;
mod relay;
mod serve;
mod stop;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio_util::sync::CancellationToken;
use tracing::{debug, Instrument};

use self::stop::StopSignal;
use super::cancel::CancelKey;
use super::registry::{self, Registered};
use super::Shared;
use crate::backend::{Pool, PooledConn};
use crate::error::ClientError;
use crate::net::{FramedStream, NetError};
use crate::protocol::messages;
use crate::protocol::FrameError;
use crate::route::floors::Floor;
use crate::route::{Hint, PinReason, SessionEffect, Why};
use crate::settings::ClientSettings;
use crate::timer::Alarm;
use crate::topology::Picks;

use batch::Batch;
pub use effects::{default_target, followed_reports};
pub use freshness::CURRENT_WAL_INSERT_LSN;
use prepared::{BatchRoutes, Prepared};
use relay::Expect;

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
    /// End the session with this FATAL ErrorResponse.
    #[error(transparent)]
    Fatal(ClientError),
    /// The server connection under the request failed (it died, or its socket did). The
    /// request's loop tells the client with an ERROR where the session can go on (see
    /// `Session::server_died`); elsewhere it ends the session (FATAL 08006).
    #[error("server connection lost: {0}")]
    ServerLost(String),
}

impl SessionError {
    fn protocol(e: FrameError) -> Self {
        Self::Fatal(ClientError::Protocol(e.to_string().into()))
    }

    fn from_client(e: NetError) -> Self {
        match e {
            NetError::Frame(f) => Self::protocol(f),
            NetError::Truncated => Self::Fatal(ClientError::Protocol(
                "incomplete message from client".into(),
            )),
            other => Self::ClientGone(other),
        }
    }

    fn server_lost(e: NetError) -> Self {
        Self::ServerLost(e.to_string())
    }
}

/// The error for a session that lost its server connection where it needs one. Made only
/// when needed: it allocates, and the check runs several times per statement.
fn no_server() -> SessionError {
    SessionError::Fatal(ClientError::ServerLost("no server connection".into()))
}

/// A held server connection and what the server last said about it.
#[derive(Debug)]
struct Link {
    conn: PooledConn,
    /// Transaction status from the last ReadyForQuery (`I`, `T`, `E`).
    status: u8,
    /// Extended-protocol messages were sent since the last Sync was answered.
    unsynced: bool,
    /// An extended-protocol message failed since the last Sync: the server discards
    /// everything but Sync (a Query too) until then, answering none of it.
    skipping: bool,
    /// The connection is to a replica (nothing on it can write).
    replica: bool,
    /// Marks the client active in the registry while the connection is held (`None` for
    /// a session that is not registered).
    active: Option<registry::Attached>,
}

/// A `COPY ... FROM STDIN` in progress.
#[derive(Debug)]
struct Copy {
    /// What pinned the client before the copy (and does again after it).
    pin: Option<PinReason>,
    /// Started by Execute: after the copy the server needs a Sync, which the client sends
    /// after CopyDone or CopyFail (a Sync sent during the copy is ignored by the server).
    extended: bool,
    /// The data is over (CopyDone, CopyFail, or the server's error) in an extended copy:
    /// the client's messages go on to the server up to its Sync.
    until_sync: bool,
}

/// Where the client stands (see the module doc).
#[derive(Debug)]
enum State {
    Idle,
    /// Discarding the client's messages up to its Sync, then ReadyForQuery with this
    /// status (`I`, or `E` for a transaction lost with its server: Aborted follows).
    SkipToSync(u8),
    /// The server of the client's open transaction died: the transaction is gone. pgway
    /// answers its `ROLLBACK` (or `COMMIT`, as PostgreSQL does in a failed transaction)
    /// itself, and anything else with 25P02, as PostgreSQL does in a failed transaction.
    Aborted,
    Attached(Link),
    /// The client sent a plain `BEGIN` (this Query) outside a transaction: pgway answered
    /// it (status `T`) and sends it in front of the transaction's first request, on the
    /// connection that request takes. No server connection is held meanwhile.
    Begun(BytesMut),
    Pinned(Link, PinReason),
    CopyIn(Link, Copy),
}

impl State {
    fn link(&self) -> Option<&Link> {
        match self {
            State::Attached(link) | State::Pinned(link, _) | State::CopyIn(link, _) => Some(link),
            State::Idle | State::Begun(_) | State::SkipToSync(_) | State::Aborted => None,
        }
    }

    fn link_mut(&mut self) -> Option<&mut Link> {
        match self {
            State::Attached(link) | State::Pinned(link, _) | State::CopyIn(link, _) => Some(link),
            State::Idle | State::Begun(_) | State::SkipToSync(_) | State::Aborted => None,
        }
    }

    /// The transaction status: `I` without a server connection, `E` in a lost one.
    fn status(&self) -> u8 {
        match self {
            State::Aborted => b'E',
            State::Begun(_) => b'T',
            _ => self.link().map_or(b'I', |link| link.status),
        }
    }
}

/// The bookkeeping of one request: from the first message sent until the server's
/// ReadyForQuery (for an extended-protocol batch, its Sync's).
#[derive(Debug, Default)]
struct Request {
    /// Session effects of what was sent, applied when the request succeeds.
    effects: Vec<SessionEffect>,
    /// The request got an ErrorResponse.
    failed: bool,
    /// The request may be sent again if the server shuts down before answering (only
    /// outside a transaction, when nothing of it can have taken effect).
    can_retry: bool,
    /// The server has begun to answer it (a reply to it is on its way to the client).
    answered: bool,
    /// The server announced its shutdown in answer to it.
    retry_pending: bool,
    /// Length of the client's output buffer when this attempt began.
    out_mark: usize,
    /// pgway answered a message of the batch with an error: the rest, up to Sync, is not
    /// sent.
    batch_failed: bool,
    /// Statement names this attempt added (forgotten again if it is sent again).
    named: Vec<Vec<u8>>,
    /// The client is pinned and this request may have let go of what pinned it: ask the
    /// server afterwards.
    check_pins: bool,
    /// Followed parameters the server reported during the request.
    reported: Vec<&'static str>,
    /// Statements that completed (CommandComplete or EmptyQueryResponse).
    completed: usize,
    /// It may change data (read-your-writes). Kept until the request is done.
    may_write: bool,
    /// It may commit a transaction (`COMMIT`, `END`): asked inside transactions and of
    /// writes. Kept across the batches of a request that a Flush split.
    commits: bool,
    /// What it wrote may have committed: it succeeded, or it failed after a `COMMIT`.
    /// Set at its ReadyForQuery.
    kept_writes: bool,
    /// It may run a `COPY` (no query may follow it before it is answered).
    copies: bool,
    /// The WAL position query waits until the request is answered.
    wal_deferred: bool,
    /// The WAL position query joins the request's `COMMIT` before the Sync they share (see
    /// `freshness`): the Sync's ReadyForQuery is held until the position is in.
    joined: bool,
    /// Its last Bind was of a plain `COMMIT` to the unnamed portal (extended protocol).
    commit_bound: bool,
    /// Its last Execute ran that `COMMIT`: the WAL position query may join it.
    commit_executed: bool,
    /// The transaction status of the client's ReadyForQuery, held until the WAL position
    /// query is answered (a status byte, not the frame: no allocation per write).
    held_ready: Option<u8>,
    /// The answer to the WAL position query.
    wal_position: Option<u64>,
    /// A position this request's reads must see (hints `pgway:min_lsn=`, `pgway:fresh`).
    min_position: u64,
    /// This attempt went to a replica.
    on_replica: bool,
    /// Part of its answer was sent to the client.
    flushed: bool,
    /// Its answer has ended (its ReadyForQuery arrived; pgway's own queries after it may
    /// still be under way). What it did is noted (`may_write`, `failed` are taken).
    ended: bool,
    /// The replica gave it up before the client saw any of its answer (refused it as a
    /// write, or cancelled it for a recovery conflict): the rest of the answer is
    /// swallowed and the request goes to the primary.
    redo: Option<Redo>,
    /// It was sent again to the primary after a replica refused it.
    retried_on_primary: bool,
    /// It asks about `pgway.last_route`: its own route is not recorded.
    quiet_route: bool,
    /// A cacheable read sent to a server: the position it saw is asked with it (see
    /// `Session::seen`).
    ask_seen: bool,
    /// When `client.query_timeout` runs out for the request on its server (set at its
    /// first wait for the server; `None` with the timeout off or once the cancel is sent).
    deadline: Option<tokio::time::Instant>,
    /// The server was asked to cancel it (`client.query_timeout`).
    cancel_sent: bool,
}

impl Request {
    /// Starts sending (or sending again): what an earlier attempt noted is forgotten, but
    /// effects and failure of messages already answered (an earlier Flush) are kept.
    /// `continues`: the batch goes on one sent before without a Sync (its Execute of a
    /// `COMMIT` may have come in that one, and the WAL position query is still owed).
    fn begin_attempt(&mut self, can_retry: bool, out_mark: usize, continues: bool) {
        self.can_retry = can_retry;
        self.answered = false;
        self.retry_pending = false;
        self.out_mark = out_mark;
        self.batch_failed = false;
        self.named.clear();
        self.check_pins = false;
        self.reported.clear();
        self.completed = 0;
        self.on_replica = false;
        self.flushed = false;
        self.ended = false;
        self.redo = None;
        self.commits &= continues;
        self.copies = false;
        self.wal_deferred = false;
        self.joined = false;
        self.commit_bound = false;
        self.commit_executed = false;
        self.held_ready = None;
        self.wal_position = None;
        self.deadline = None;
        self.cancel_sent = false;
    }

    /// It can run again elsewhere, its server lost under it, and the client be none the
    /// wiser: it has not ended, nothing of its answer reached the client, the server
    /// reported no error for it, and nothing it did outlives its server connection.
    fn may_run_again(&self) -> bool {
        self.can_retry
            && !self.ended
            && !self.flushed
            && !self.failed
            && !self.may_have_changed(true)
    }

    /// What it did may outlive its server connection: it wrote outside a transaction
    /// (`idle`: the server was in none), or it may have ended one with `COMMIT`. Not on a
    /// replica, which changes nothing: what a function there did to the session ends with
    /// the connection.
    fn may_have_changed(&self, idle: bool) -> bool {
        !self.on_replica && (self.commits || (idle && self.may_write))
    }

    /// Forgets everything (the request is sent again elsewhere).
    fn reset(&mut self) {
        self.effects.clear();
        self.ask_seen = false;
        self.failed = false;
        self.may_write = false;
        self.begin_attempt(false, 0, false);
    }
}

/// Why a replica's answer to a request was swallowed, to send the request to the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Redo {
    /// The replica refused it as a write (`25006`, "recovery is in progress"): pgway took
    /// a write for a read, and learns from it.
    Write,
    /// The replica cancelled it for a conflict with recovery (`40001`). The primary has no
    /// such conflicts, and every replica replays the same WAL that caused this one.
    RecoveryConflict,
}

/// `[client]` timeouts of a session, `Duration::ZERO` where off.
#[derive(Debug, Clone, Copy, Default)]
struct Timeouts {
    /// `client.idle_timeout`: silent outside a transaction.
    idle: Duration,
    /// `client.idle_in_transaction_timeout`: silent while holding a server connection.
    idle_in_transaction: Duration,
    /// `client.query_timeout`: a request unanswered by its server.
    query: Duration,
}

impl Timeouts {
    fn of(client: &crate::config::ClientConfig) -> Self {
        Self {
            idle: client.idle_timeout,
            idle_in_transaction: client.idle_in_transaction_timeout,
            query: client.query_timeout,
        }
    }

    /// The wait for the client's next message ends with an error after this long: idle
    /// outside a transaction, idle inside one (server status `T` or `E`).
    fn client_wait(&self, status: u8) -> (Duration, ClientError) {
        if status == b'I' {
            (self.idle, ClientError::IdleTimeout(self.idle))
        } else {
            (
                self.idle_in_transaction,
                ClientError::IdleInTransactionTimeout(self.idle_in_transaction),
            )
        }
    }
}

/// The timers of a session's [`Timeouts`], one for each: a deadline that moves later
/// costs next to nothing (see [`Alarm`]), one that moves earlier sets the timer again.
#[derive(Debug, Default)]
struct Alarms {
    idle: Alarm,
    idle_in_transaction: Alarm,
    query: Alarm,
}

impl Alarms {
    /// The timer of a wait for the client's next message (see [`Timeouts::client_wait`]).
    fn client_wait(&mut self, status: u8) -> &mut Alarm {
        if status == b'I' {
            &mut self.idle
        } else {
            &mut self.idle_in_transaction
        }
    }
}

/// The open transaction's effects, kept or dropped when it ends.
#[derive(Debug, Default)]
struct Transaction {
    /// Effects of its requests that succeeded, savepoints included.
    effects: Vec<SessionEffect>,
    /// The last CommandComplete was a ROLLBACK.
    rolled_back: bool,
    /// A request of the open transaction may have changed data.
    wrote: bool,
    /// The tables its requests may have changed, for the result cache.
    written: cache::Written,
}

/// One client's session.
pub struct Session<'a> {
    shared: &'a Shared,
    /// The connection's `client` span, entered around log events only.
    span: tracing::Span,
    /// Resolves when pgway starts shutting down. Made once per session and kept registered
    /// with the token, so waiting between requests touches no state shared with other
    /// sessions.
    stopping: StopSignal,
    /// Resolves when pgway's drain deadline (`shutdown_timeout`) passes: a client still
    /// inside a transaction is then told 57P01 while pgway waits for it. Made once per
    /// session, like `stopping`.
    hard_stop: StopSignal,
    client: FramedStream,
    /// What goes to the client next.
    out: BytesMut,
    /// What goes to the server next.
    to_server: BytesMut,
    user: String,
    database: String,
    cancel: CancelKey<'a>,
    state: State,
    /// Replies expected from the server (or due from pgway), one per message sent, in
    /// order. Empty whenever the client holds no server connection.
    expected: VecDeque<Expect>,
    request: Request,
    txn: Transaction,
    /// Named prepared statements, by the client's name.
    statements: foldhash::HashMap<Vec<u8>, Arc<Prepared>>,
    /// The unnamed prepared statement.
    unnamed: Option<Arc<Prepared>>,
    /// Extended-protocol messages collected until Sync or Flush.
    batch: Batch,
    /// What routing the batch found out, worked out when it runs (kept for the next batch).
    /// `None` while a batch is out of the session to run: putting the lists back then
    /// drops a `None`, not four empty lists (three times an extended-protocol statement).
    /// On the heap (as the batch's lists are): taken out and put back three times a batch,
    /// it moves as a pointer.
    batch_routes: Option<Box<BatchRoutes>>,
    /// How many of `batch`'s messages [`Self::holds_refused_bind`] has read.
    batch_checked: usize,
    /// `[client]` timeouts, read at login (`Duration::ZERO`: off).
    timeouts: Timeouts,
    /// The timers of those timeouts, armed again for each wait.
    alarms: Alarms,
    /// Session settings (startup and SET) that follow the client.
    settings: ClientSettings,
    /// `SET pgway.target`: the routing hint for every statement without one of its own.
    target: Option<Hint>,
    /// This client's pools by node, so taking a connection needs no global lock. Each
    /// holds the session's own copy of the node's address: taking and dropping it per
    /// transaction then touches no reference count that other worker threads also write.
    /// A list, not a map: a session sees a handful of nodes.
    pools: Vec<(Arc<str>, Arc<Pool>)>,
    /// The nodes picked from the topology's current generation, by index in `pools`.
    picks: Picks<usize>,
    /// The read-your-writes floor this client reads under and raises (`None`: off).
    floor: Option<Floor>,
    /// The WAL position of this connection's last write (0: none yet).
    last_write: u64,
    /// A write committed but its WAL position went with its server (see `lost.rs`): the
    /// next read looks up the primary's position first, as `pgway:fresh` does, and raises
    /// the floor to it.
    position_lost: bool,
    /// `pgway.min_lsn`: a position every read of the session must see (0: none).
    min_lsn: u64,
    /// Where the last statement went and why (`SHOW pgway.last_route`).
    last_route: Why,
    /// The result cache, when it is on.
    cache: Option<cache::SessionCache>,
    /// The reply of the request in flight, for the result cache.
    fill: Option<crate::cache::Fill>,
    /// The highest WAL position a cacheable read of this client saw on a server, and the
    /// stream epoch it was seen in: later hits need the invalidation stream at least there,
    /// so its reads never go back (a new stream, after a failover, starts afresh).
    seen: (u64, u64),
    /// Its place in the admin console's client registry, when [`Self::registered`].
    registered: Option<Registered>,
    /// The registry guard of its last transaction, ended, for the next one (see
    /// [`registry::Attached`]).
    ended_attached: Option<registry::Attached>,
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
        let target = effects::target_hint(&settings);
        let floor = shared.floors.for_client(&database, &user);
        let min_lsn = freshness::min_lsn(&settings);
        let cache = shared
            .cache
            .as_ref()
            .map(|cache| cache::SessionCache::new(cache.db(&database), &user));
        Self {
            shared,
            span,
            stopping: StopSignal::new(thread_shutdown(shared)),
            hard_stop: StopSignal::new(thread_hard_stop(shared)),
            client,
            out: BytesMut::new(),
            to_server: BytesMut::new(),
            user,
            database,
            cancel: shared.cancels.register(),
            state: State::Idle,
            expected: VecDeque::new(),
            request: Request::default(),
            txn: Transaction::default(),
            statements: foldhash::HashMap::default(),
            unnamed: None,
            batch: Batch::default(),
            batch_routes: None,
            batch_checked: 0,
            timeouts: Timeouts::of(&shared.config.load().client),
            alarms: Alarms::default(),
            settings,
            target,
            pools: Vec::new(),
            picks: Picks::default(),
            floor,
            last_write: 0,
            position_lost: false,
            min_lsn,
            last_route: Why::Nothing,
            cache,
            fill: None,
            seen: (0, 0),
            registered: None,
            ended_attached: None,
        }
    }

    /// Lists the session in the client registry (`SHOW CLIENTS`), where `KILL_CLIENT`
    /// can end it: its wait between requests then ends on the registry's token, a child of
    /// the shutdown token it waited on before.
    pub fn registered(mut self, login: registry::Login) -> Self {
        let parent = thread_shutdown(self.shared);
        let registered =
            self.shared
                .clients
                .register(login, Arc::clone(&self.cancel.slot), &parent);
        self.stopping = StopSignal::new(registered.entry.kill.clone());
        self.registered = Some(registered);
        self
    }

    /// The error a session ends with when its wait between requests is cancelled: pgway's
    /// shutdown, or `KILL_CLIENT`.
    fn stop_reason(&self, e: ClientError) -> ClientError {
        match (&e, &self.registered) {
            (ClientError::Shutdown, Some(_)) if !self.shared.shutdown.is_cancelled() => {
                crate::admin::console::killed()
            }
            _ => e,
        }
    }

    /// Greets the client (after `greeting`, which holds AuthenticationOk and the
    /// ParameterStatus messages) and serves it until it leaves.
    pub async fn run(&mut self, greeting: BytesMut) {
        self.out = greeting;
        self.shared.metrics.client(1);
        messages::backend_key_data(&mut self.out, self.cancel.pid, self.cancel.secret);
        messages::ready_for_query(&mut self.out, b'I');
        let result = match self.flush().await {
            Ok(()) => self.serve().await,
            Err(e) => Err(e),
        };
        let span = self.span.clone();
        async {
            match result {
                Ok(()) => debug!("client left"),
                Err(SessionError::ClientGone(cause)) => debug!(%cause, "client connection lost"),
                Err(SessionError::Retry) => {
                    self.close_with(ClientError::ServerKeptShuttingDown).await
                }
                Err(SessionError::Fatal(e)) => {
                    let e = self.stop_reason(e);
                    self.close_with(e).await
                }
                Err(SessionError::ServerLost(cause)) => {
                    self.close_with(ClientError::ServerLost(cause)).await
                }
            }
            self.cleanup().await;
            self.shared.metrics.client(-1);
        }
        .instrument(span)
        .await;
    }

    /// Ends the connection with a FATAL error.
    async fn close_with(&mut self, e: ClientError) {
        debug!(code = e.sqlstate(), message = %e, "closing client connection");
        self.shared.metrics.error(e.sqlstate());
        self.out.clear();
        e.write_as(&mut self.out, messages::Severity::Fatal);
        let _ = self.flush().await;
    }

    async fn flush(&mut self) -> Result<(), SessionError> {
        self.client
            .send(&mut self.out)
            .await
            .map_err(SessionError::ClientGone)
    }

    fn server_mut(&mut self) -> Result<&mut PooledConn, SessionError> {
        match self.state.link_mut() {
            Some(link) => Ok(&mut link.conn),
            None => Err(no_server()),
        }
    }
}

/// A child of `shared.hard_stop`, made once per thread as [`thread_shutdown`] is.
fn thread_hard_stop(shared: &Shared) -> CancellationToken {
    thread_child(&shared.hard_stop)
}

/// A child of `shared.shutdown` made once per thread (per gateway), for the sessions that
/// run there. Polling a cancellation token locks its node; with one node per worker, a
/// session's wait between requests locks nothing that other worker threads also lock.
fn thread_shutdown(shared: &Shared) -> CancellationToken {
    thread_child(&shared.shutdown)
}

/// This thread's child of `parent`, made on first use. Keyed by the parent's address: a
/// thread serves one gateway, but tests run several in one process.
fn thread_child(parent: &CancellationToken) -> CancellationToken {
    thread_local! {
        static CHILDREN: std::cell::RefCell<Vec<(usize, CancellationToken)>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }
    let key = std::ptr::from_ref(parent) as usize;
    CHILDREN.with_borrow_mut(|children| {
        // A cancelled child under a parent that is not cancelled belongs to a gateway
        // that stopped and whose memory this one reuses: it is replaced.
        children.retain(|(k, token)| *k != key || !token.is_cancelled() || parent.is_cancelled());
        if let Some((_, token)) = children.iter().find(|(k, _)| *k == key) {
            return token.clone();
        }
        let token = parent.child_token();
        // A thread keeps the children of the last few gateways it served (tests start
        // many in one process).
        if children.len() >= 8 {
            children.remove(0);
        }
        children.push((key, token.clone()));
        token
    })
}
