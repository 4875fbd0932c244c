//! Following the primary's committed changes by logical decoding, so the result cache can
//! drop the entries of tables that changed, whoever changed them.
//!
//! [`WalFollower::run`] speaks the streaming replication protocol itself, on a
//! [`ServerConn`] logged in with `replication=database`:
//!
//! 1. `SHOW wal_level`: anything but `logical` is [`WalError::NotLogical`], so the cache
//!    can say why it falls back to TTLs.
//! 2. `CREATE_REPLICATION_SLOT <slot> TEMPORARY LOGICAL test_decoding`: the server drops a
//!    temporary slot when the connection ends, so nothing is ever left on it. Creating one
//!    waits for the transactions running at that moment to end.
//! 3. `START_REPLICATION SLOT <slot> LOGICAL <consistent point> (...)`, then CopyData both
//!    ways: XLogData (`w`, one test_decoding line each) and keepalives (`k`) from the server,
//!    standby status updates (`r`) from us.
//!
//! test_decoding writes `BEGIN`, one `table <schema>.<name>: <KIND>: ...` line per change
//! and `COMMIT`; with `skip-empty-xacts` a transaction that changed no rows writes nothing.
//! A transaction's lines arrive together when it commits, so the follower gathers its
//! tables and reports them as one [`WalEvent::Commit`], with the leaf partitions' ancestors
//! added (looked up once per table on a control connection, see [`Catalog`]).
//!
//! # Invariants
//! - Events are reported in WAL order, each after the previous `on_event` call returned.
//! - A position is confirmed to the server (so it may recycle the WAL before it) only after
//!   `on_event` returned for an event at or past it. Confirmations go out after every read
//!   batch that advanced the position, whenever the server asks, and at least every
//!   [`STATUS_INTERVAL`], so the slot never holds WAL back for long.
//! - Whatever cannot be attributed to a table (a line that does not parse, a failed
//!   ancestor look-up) makes the commit `unknown`: the cache then drops everything.
//! - Row data in the stream is never logged.
//!
//! DDL is not decoded: a table attached to a partitioned table after its ancestors were
//! looked up is still reported without its new parent, and renames are seen under the
//! old name until the table is looked up again (never, once known).

use std::collections::HashMap;
use std::future::Future;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::backend::control::{self, ControlError, ControlLogin};
use crate::backend::server::{BackendError, Login, Secret, ServerConn};
use crate::net::{Connector, FramedStream, NetError};
use crate::protocol::frame::{put_frame, Reader};
use crate::protocol::messages::{body, error_fields, query};
use crate::protocol::MAX_MESSAGE_LEN;

/// `application_name` of the replication and catalog connections.
const APPLICATION_NAME: &str = "pgway_cache";

/// Longest time between two standby status updates (the server's `wal_sender_timeout`
/// defaults to 60 s).
pub const STATUS_INTERVAL: Duration = Duration::from_secs(10);

/// Silence after which the stream counts as lost: the server sends a keepalive every
/// `wal_sender_timeout / 2` (30 s by default) when idle; this is three times the default
/// timeout.
pub const SILENCE_LIMIT: Duration = Duration::from_secs(180);

/// Longest wait for `CREATE_REPLICATION_SLOT`, which waits for the transactions running
/// when it starts. Longer than any network timeout on purpose: a server that is only busy
/// must not be retried into many walsenders all waiting for the same transaction.
pub const SLOT_CREATE_LIMIT: Duration = Duration::from_secs(15 * 60);

/// Pause after a failed catalog connection before the next attempt; commits whose tables
/// are not yet known are `unknown` meanwhile.
const CATALOG_RETRY_PAUSE: Duration = Duration::from_secs(1);

/// Seconds from the Unix epoch to PostgreSQL's (2000-01-01 00:00:00 UTC).
const PG_EPOCH_UNIX_SECS: u64 = 946_684_800;

/// A table and its partition ancestors (itself first), or no row if it does not exist.
/// Reads only the catalogs (no privilege on the table or its schema needed).
const ANCESTORS: &str = "select n.nspname::text, c.relname::text \
     from pg_class t \
     join pg_namespace tn on tn.oid = t.relnamespace \
     cross join lateral ( \
         select t.oid as relid, 0::int8 as depth \
         union all \
         select a.relid::oid, a.depth from pg_partition_ancestors(t.oid) with ordinality as a(relid, depth) \
     ) a \
     join pg_class c on c.oid = a.relid \
     join pg_namespace n on n.oid = c.relnamespace \
     where tn.nspname = $1 and t.relname = $2 \
     order by a.depth";

/// A table: (schema, name), unquoted.
pub type Table = (String, String);

/// What the follower reports, in WAL order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalEvent {
    /// The slot exists and is consistent: every transaction committing after `position`
    /// will be reported.
    Consistent {
        /// The slot's consistent point.
        position: u64,
    },
    /// A transaction that changed rows committed.
    Commit {
        /// The end of its commit record (test_decoding's XLogData `dataStart` for the
        /// `COMMIT` line).
        position: u64,
        /// (schema, name) pairs, unquoted exact names, deduplicated, with partition
        /// ancestors added.
        tables: Vec<Table>,
        /// Some change could not be attributed to a table (a line that did not parse, a
        /// failed ancestor look-up): drop everything.
        unknown: bool,
    },
    /// Everything before this position has been decoded and reported (a keepalive's
    /// `walEnd`, or an XLogData's `walEnd` when no transaction is open).
    Position(u64),
}

/// Why following stopped.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// The primary's `wal_level` is not `logical`: there is nothing to follow.
    #[error("wal_level is {wal_level:?} on the primary; following changes needs \"logical\"")]
    NotLogical {
        /// What `SHOW wal_level` said.
        wal_level: String,
    },
    /// The replication connection could not be made (socket, login protocol).
    #[error("cannot open a replication connection: {0}")]
    Connect(#[source] BackendError),
    /// The server refused with an ErrorResponse (e.g. 28P01 wrong password, 28000 no
    /// `pg_hba.conf` entry for replication, 42501 no `REPLICATION` privilege, 53400 no
    /// free replication slot).
    #[error("server error {code}: {message}")]
    Server {
        /// SQLSTATE.
        code: String,
        /// The server's message.
        message: String,
    },
    /// The server said something the replication protocol does not allow.
    #[error("unexpected server behaviour: {0}")]
    Protocol(String),
    /// The connection broke, the server ended the stream, or it was silent for
    /// [`SILENCE_LIMIT`].
    #[error("replication connection lost: {0}")]
    Lost(#[from] NetError),
    /// A network wait took longer than the follower's timeout; names what it waited for.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// The slot name is not 1 to 63 lower-case letters, digits and `_`.
    #[error("invalid replication slot name {0:?}")]
    InvalidSlot(String),
}

impl From<crate::protocol::FrameError> for WalError {
    fn from(e: crate::protocol::FrameError) -> Self {
        Self::Protocol(e.to_string())
    }
}

impl From<BackendError> for WalError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::Server { code, message } => Self::Server { code, message },
            BackendError::Timeout(_) => Self::Timeout("the replication connection's login"),
            other => Self::Connect(other),
        }
    }
}

impl WalError {
    /// True when trying again later may work (the node was down or busy, the connection
    /// broke); false when it will not until someone changes the server or the config
    /// (`wal_level`, password, privileges, `pg_hba.conf`).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Connect(_) | Self::Lost(_) | Self::Timeout(_) | Self::Protocol(_) => true,
            // Connection exceptions, shutting down / cannot connect now, insufficient
            // resources (too many connections, no free slot or walsender).
            Self::Server { code, .. } => {
                code.starts_with("08") || code.starts_with("57P") || code.starts_with("53")
            }
            Self::NotLogical { .. } | Self::InvalidSlot(_) => false,
        }
    }
}

/// Follows one primary database's committed changes. Its `Debug` leaves the password out.
#[derive(Clone)]
pub struct WalFollower<'a> {
    /// The primary, `host:port`.
    pub addr: &'a str,
    /// A role with `REPLICATION` (`cache.wal_user`).
    pub user: &'a str,
    /// Its password.
    pub password: &'a str,
    /// The database whose changes are followed (logical decoding is per database).
    pub database: &'a str,
    /// The temporary slot's name (see [`slot_name`]).
    pub slot: &'a str,
    /// Limit of every network wait except the stream itself (connect plus login, each
    /// command, each write, each catalog look-up).
    pub timeout: Duration,
}

impl std::fmt::Debug for WalFollower<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalFollower")
            .field("addr", &self.addr)
            .field("user", &self.user)
            .field("password", &"***")
            .field("database", &self.database)
            .field("slot", &self.slot)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl WalFollower<'_> {
    /// Connects, creates the temporary slot and follows until the connection breaks, an
    /// error, or `stop` is cancelled (then `Ok(())`).
    ///
    /// `on_event` is called synchronously for each event in order; the follower confirms
    /// a position to the server only after `on_event` returned for it.
    pub async fn run(
        &self,
        connector: &dyn Connector,
        stop: CancellationToken,
        mut on_event: impl FnMut(WalEvent) + Send,
    ) -> Result<(), WalError> {
        let span = tracing::info_span!("wal_follower", node = %self.addr, db = %self.database, slot = %self.slot);
        async {
            let tasks = TaskTracker::new();
            let result = self.follow(connector, &stop, &mut on_event, &tasks).await;
            // The catalog connection's task ends with its client, dropped by now.
            tasks.close();
            let _ = crate::timer::timeout(self.timeout, tasks.wait()).await;
            match &result {
                Ok(()) => debug!("stopped following"),
                Err(cause) => debug!(%cause, "following ended"),
            }
            result
        }
        .instrument(span)
        .await
    }

    async fn follow(
        &self,
        connector: &dyn Connector,
        stop: &CancellationToken,
        on_event: &mut (impl FnMut(WalEvent) + Send),
        tasks: &TaskTracker,
    ) -> Result<(), WalError> {
        if !valid_slot_name(self.slot) {
            return Err(WalError::InvalidSlot(self.slot.to_owned()));
        }
        let secret = Secret::password_of(self.password);
        let login = Login {
            addr: self.addr,
            user: self.user,
            secret: &secret,
            database: self.database,
        };
        let extra = [
            ("replication", "database"),
            ("application_name", APPLICATION_NAME),
        ];
        let connecting = async {
            ServerConn::connect_with(login, &extra, connector, self.timeout)
                .await
                .map_err(WalError::from)
        };
        // connect_with has its own timeout; this one only adds `stop`.
        let Some(mut conn) = bounded(stop, self.timeout * 2, "login", connecting).await? else {
            return Ok(());
        };
        let io = &mut conn.io;

        let show = simple_query(io, "SHOW wal_level");
        let Some(rows) = bounded(stop, self.timeout, "SHOW wal_level", show).await? else {
            return Ok(());
        };
        let wal_level = first_value(&rows, 0)
            .ok_or_else(|| WalError::Protocol("SHOW wal_level returned no value".into()))?;
        if wal_level != "logical" {
            return Err(WalError::NotLogical {
                wal_level: wal_level.to_owned(),
            });
        }

        debug!("creating the temporary slot (waits for running transactions)");
        // No snapshot is exported: the cache reads nothing as of the consistent point.
        let sql = format!(
            "CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL test_decoding NOEXPORT_SNAPSHOT",
            self.slot
        );
        let create = simple_query(io, &sql);
        let limit = self.timeout.max(SLOT_CREATE_LIMIT);
        let Some(rows) = bounded(stop, limit, "CREATE_REPLICATION_SLOT", create).await? else {
            return Ok(());
        };
        let consistent = first_value(&rows, 1).and_then(parse_lsn).ok_or_else(|| {
            WalError::Protocol("CREATE_REPLICATION_SLOT returned no consistent point".into())
        })?;

        let mut catalog = Catalog::new(
            ControlLogin {
                addr: self.addr,
                user: self.user,
                password: self.password,
                database: self.database,
                application_name: APPLICATION_NAME,
                connector,
            },
            self.timeout,
            tasks.clone(),
        );
        // Connected before the first commit needs it; a failure here is retried then.
        if bounded(stop, self.timeout * 2, "the catalog connection", async {
            catalog.connect().await;
            Ok(())
        })
        .await?
        .is_none()
        {
            return Ok(());
        }

        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {} (\"include-xids\" '0', \"skip-empty-xacts\" '1')",
            self.slot,
            format_lsn(consistent)
        );
        let start = simple_start(io, &sql);
        if bounded(stop, self.timeout, "START_REPLICATION", start)
            .await?
            .is_none()
        {
            return Ok(());
        }
        info!(position = %format_lsn(consistent), "following the primary's changes");

        let mut stream = Stream {
            io,
            out: BytesMut::new(),
            catalog,
            on_event,
            open: None,
            processed: 0,
            confirmed: 0,
            reply_requested: false,
            last_status: Instant::now(),
            timeout: self.timeout,
        };
        stream.report(WalEvent::Consistent {
            position: consistent,
        });
        stream.send_status().await?;
        stream.follow(stop).await
    }
}

/// Waits for `fut` up to `limit` (else [`WalError::Timeout`] naming `what`); `None` once
/// `stop` is cancelled.
async fn bounded<T>(
    stop: &CancellationToken,
    limit: Duration,
    what: &'static str,
    fut: impl Future<Output = Result<T, WalError>>,
) -> Result<Option<T>, WalError> {
    tokio::select! {
        () = stop.cancelled() => Ok(None),
        r = crate::timer::timeout(limit, fut) => r.map_err(|_| WalError::Timeout(what))?.map(Some),
    }
}

/// Rows of a DataRow-per-row answer, as text (`None`: NULL).
type Rows = Vec<Vec<Option<String>>>;

/// Column `column` of the first row, if present and not NULL.
fn first_value(rows: &Rows, column: usize) -> Option<&str> {
    rows.first()?.get(column)?.as_deref()
}

/// Sends a simple Query and reads its answer up to ReadyForQuery.
async fn simple_query(io: &mut FramedStream, sql: &str) -> Result<Rows, WalError> {
    let mut out = BytesMut::new();
    query(&mut out, sql);
    io.send(&mut out).await?;
    let mut rows = Rows::new();
    let mut error = None;
    loop {
        let frame = io.read_frame(MAX_MESSAGE_LEN).await?;
        match frame[0] {
            b'D' => rows.push(data_row(body(&frame))?),
            b'T' | b'C' | b'I' | b'N' | b'S' => {}
            b'E' => {
                let (code, message) = error_fields(&frame);
                error = Some(WalError::Server { code, message });
            }
            b'Z' => return error.map_or(Ok(rows), Err),
            other => {
                return Err(WalError::Protocol(format!(
                    "unexpected message {:?} in a command's answer",
                    other as char
                )))
            }
        }
    }
}

/// Sends START_REPLICATION and waits for CopyBothResponse.
async fn simple_start(io: &mut FramedStream, sql: &str) -> Result<(), WalError> {
    let mut out = BytesMut::new();
    query(&mut out, sql);
    io.send(&mut out).await?;
    loop {
        let frame = io.read_frame(MAX_MESSAGE_LEN).await?;
        match frame[0] {
            b'W' => return Ok(()),
            b'N' | b'S' => {}
            b'E' => {
                let (code, message) = error_fields(&frame);
                return Err(WalError::Server { code, message });
            }
            other => {
                return Err(WalError::Protocol(format!(
                    "unexpected message {:?} instead of CopyBothResponse",
                    other as char
                )))
            }
        }
    }
}

/// The text values of a DataRow body.
fn data_row(body: &[u8]) -> Result<Vec<Option<String>>, WalError> {
    let mut r = Reader::new(body, "DataRow");
    let n = r.i16()?;
    let mut row = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
    for _ in 0..n {
        let len = r.i32()?;
        row.push(match usize::try_from(len) {
            Ok(len) => Some(String::from_utf8_lossy(r.bytes(len)?).into_owned()),
            Err(_) => None,
        });
    }
    Ok(row)
}

/// A transaction whose lines are being received.
#[derive(Debug, Default)]
struct Txn {
    tables: Vec<Table>,
    unknown: bool,
}

/// The streaming phase: reads CopyData, reports events, confirms positions.
struct Stream<'s, F> {
    io: &'s mut FramedStream,
    out: BytesMut,
    catalog: Catalog<'s>,
    on_event: &'s mut F,
    /// The transaction between BEGIN and COMMIT, if any.
    open: Option<Txn>,
    /// The highest position reported (and so processed).
    processed: u64,
    /// The position last confirmed to the server.
    confirmed: u64,
    /// The server asked for a status update in the current batch.
    reply_requested: bool,
    last_status: Instant,
    timeout: Duration,
}

impl<F: FnMut(WalEvent) + Send> Stream<'_, F> {
    /// Reads until `stop` (then says goodbye), an error, or silence.
    async fn follow(&mut self, stop: &CancellationToken) -> Result<(), WalError> {
        let mut last_heard = Instant::now();
        loop {
            let frame = tokio::select! {
                biased;
                () = stop.cancelled() => {
                    self.goodbye().await;
                    return Ok(());
                }
                () = crate::timer::sleep_until(self.last_status + STATUS_INTERVAL) => {
                    self.send_status().await?;
                    continue;
                }
                () = crate::timer::sleep_until(last_heard + SILENCE_LIMIT) => {
                    return Err(WalError::Lost(NetError::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("nothing from the primary for {} s", SILENCE_LIMIT.as_secs()),
                    ))));
                }
                // Cancel-safe: bytes read stay in the stream's buffer.
                frame = self.io.read_frame(MAX_MESSAGE_LEN) => frame?,
            };
            last_heard = Instant::now();
            self.handle(&frame).await?;
            // The rest of this read batch, without waiting.
            while let Some(frame) = self.io.try_frame(MAX_MESSAGE_LEN)? {
                self.handle(&frame).await?;
            }
            if self.processed > self.confirmed || self.reply_requested {
                self.send_status().await?;
            }
        }
    }

    /// One message from the server.
    async fn handle(&mut self, frame: &[u8]) -> Result<(), WalError> {
        match frame[0] {
            b'd' => self.copy_data(body(frame)).await,
            // The server ended the stream (it is shutting down).
            b'c' => Err(WalError::Lost(NetError::Closed)),
            b'E' => {
                let (code, message) = error_fields(frame);
                Err(WalError::Server { code, message })
            }
            b'N' => {
                let (code, message) = error_fields(frame);
                debug!(%code, %message, "notice from the walsender");
                Ok(())
            }
            b'S' => Ok(()),
            other => Err(WalError::Protocol(format!(
                "unexpected message {:?} while streaming",
                other as char
            ))),
        }
    }

    async fn copy_data(&mut self, data: &[u8]) -> Result<(), WalError> {
        let mut r = Reader::new(data, "CopyData");
        match r.u8()? {
            b'w' => {
                let data_start = u64_be(&mut r)?;
                let wal_end = u64_be(&mut r)?;
                let _send_time = u64_be(&mut r)?;
                self.xlog_data(data_start, wal_end, r.rest()).await;
            }
            b'k' => {
                let wal_end = u64_be(&mut r)?;
                let _send_time = u64_be(&mut r)?;
                self.reply_requested |= r.u8()? != 0;
                if self.open.is_none() {
                    self.advance(wal_end);
                }
            }
            other => debug!(kind = ?(other as char), "ignoring an unknown CopyData message"),
        }
        Ok(())
    }

    /// One test_decoding line.
    async fn xlog_data(&mut self, data_start: u64, wal_end: u64, line: &[u8]) {
        match parse_line(line) {
            Line::Begin => match &mut self.open {
                Some(txn) => {
                    warn!("BEGIN inside an open transaction: treating it as unknown");
                    txn.unknown = true;
                }
                None => self.open = Some(Txn::default()),
            },
            Line::Change(tables) => match &mut self.open {
                Some(txn) => {
                    for table in tables {
                        if !txn.tables.contains(&table) {
                            txn.tables.push(table);
                        }
                    }
                }
                None => {
                    warn!("a change outside a transaction: reporting it as unknown");
                    self.commit(
                        wal_end,
                        Txn {
                            tables,
                            unknown: true,
                        },
                    )
                    .await;
                }
            },
            Line::Commit => {
                let txn = self.open.take().unwrap_or_else(|| {
                    warn!("COMMIT without BEGIN: reporting it as unknown");
                    Txn {
                        tables: Vec::new(),
                        unknown: true,
                    }
                });
                self.commit(data_start, txn).await;
            }
            Line::Message => {}
            Line::Unknown => {
                // The line may hold row data: name only its first word.
                let word = line.split(|&b| b == b' ').next().unwrap_or_default();
                let word = String::from_utf8_lossy(&word[..word.len().min(24)]).into_owned();
                warn!(%word, len = line.len(), "unrecognised test_decoding line: treating the change as unknown");
                match &mut self.open {
                    Some(txn) => txn.unknown = true,
                    None => {
                        self.commit(
                            wal_end,
                            Txn {
                                tables: Vec::new(),
                                unknown: true,
                            },
                        )
                        .await
                    }
                }
            }
        }
        if self.open.is_none() {
            self.advance(wal_end);
        }
    }

    /// Reports a committed transaction, its tables' ancestors added.
    async fn commit(&mut self, position: u64, txn: Txn) {
        let (mut position, mut unknown) = (position, txn.unknown);
        if position == 0 {
            // Not sent by test_decoding; without a position, drop everything.
            position = self.processed;
            unknown = true;
        }
        let (tables, complete) = self.catalog.with_ancestors(&txn.tables).await;
        self.report(WalEvent::Commit {
            position,
            tables,
            unknown: unknown || !complete,
        });
    }

    /// Reports `Position(position)` if it is past everything reported.
    fn advance(&mut self, position: u64) {
        if position > self.processed {
            self.report(WalEvent::Position(position));
        }
    }

    fn report(&mut self, event: WalEvent) {
        let position = match &event {
            WalEvent::Consistent { position }
            | WalEvent::Commit { position, .. }
            | WalEvent::Position(position) => *position,
        };
        (self.on_event)(event);
        self.processed = self.processed.max(position);
    }

    /// Confirms everything processed (written = flushed = applied).
    async fn send_status(&mut self) -> Result<(), WalError> {
        status_update(&mut self.out, self.processed, pg_now());
        crate::timer::timeout(self.timeout, self.io.send(&mut self.out))
            .await
            .map_err(|_| WalError::Timeout("a standby status update to be sent"))??;
        self.confirmed = self.processed;
        self.reply_requested = false;
        self.last_status = Instant::now();
        Ok(())
    }

    /// Confirms what was processed and ends the session; the server drops the slot.
    async fn goodbye(&mut self) {
        status_update(&mut self.out, self.processed, pg_now());
        put_frame(&mut self.out, b'X', &[]);
        match crate::timer::timeout(self.timeout, self.io.send(&mut self.out)).await {
            Ok(Ok(())) => debug!("said goodbye to the walsender"),
            Ok(Err(cause)) => debug!(%cause, "could not say goodbye to the walsender"),
            Err(_) => debug!("timed out saying goodbye to the walsender"),
        }
    }
}

/// A big-endian u64.
fn u64_be(r: &mut Reader<'_>) -> Result<u64, WalError> {
    let bytes: [u8; 8] = r
        .bytes(8)?
        .try_into()
        .map_err(|_| WalError::Protocol("short CopyData".into()))?;
    Ok(u64::from_be_bytes(bytes))
}

/// Appends a CopyData holding a standby status update confirming `position`.
fn status_update(out: &mut BytesMut, position: u64, now: i64) {
    let mut msg = [0u8; 34];
    msg[0] = b'r';
    msg[1..9].copy_from_slice(&position.to_be_bytes());
    msg[9..17].copy_from_slice(&position.to_be_bytes());
    msg[17..25].copy_from_slice(&position.to_be_bytes());
    msg[25..33].copy_from_slice(&now.to_be_bytes());
    // msg[33]: no reply requested.
    put_frame(out, b'd', &msg);
}

/// Microseconds since 2000-01-01 00:00:00 UTC.
fn pg_now() -> i64 {
    let since_unix = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let micros = since_unix
        .saturating_sub(Duration::from_secs(PG_EPOCH_UNIX_SECS))
        .as_micros();
    i64::try_from(micros).unwrap_or(i64::MAX)
}

/// `X/Y` (hex halves) as a position.
fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    let hi = u32::from_str_radix(hi, 16).ok()?;
    let lo = u32::from_str_radix(lo, 16).ok()?;
    Some((u64::from(hi) << 32) | u64::from(lo))
}

/// A position as PostgreSQL writes it, `X/Y`.
fn format_lsn(position: u64) -> String {
    format!("{:X}/{:X}", position >> 32, position & 0xFFFF_FFFF)
}

/// Why an ancestor look-up failed.
#[derive(Debug, thiserror::Error)]
enum LookupError {
    #[error("no catalog connection yet (retrying shortly)")]
    Waiting,
    #[error(transparent)]
    Connect(#[from] ControlError),
    #[error("look-up timed out")]
    Timeout,
    #[error(transparent)]
    Query(#[from] tokio_postgres::Error),
    #[error("no such table (any more)")]
    NotFound,
}

/// Partition ancestors of changed tables, looked up once per table name on a control
/// connection and remembered for the follower's life. A table that does not exist (any
/// more) is not remembered.
struct Catalog<'a> {
    login: ControlLogin<'a>,
    timeout: Duration,
    tasks: TaskTracker,
    client: Option<(tokio_postgres::Client, tokio_postgres::Statement)>,
    /// No connection attempt before this (after a failed one).
    retry_at: Option<Instant>,
    known: HashMap<Table, Vec<Table>>,
}

impl<'a> Catalog<'a> {
    fn new(login: ControlLogin<'a>, timeout: Duration, tasks: TaskTracker) -> Self {
        Self {
            login,
            timeout,
            tasks,
            client: None,
            retry_at: None,
            known: HashMap::new(),
        }
    }

    /// Connects (and prepares the look-up) if not connected; logs a failure.
    async fn connect(&mut self) {
        if let Err(cause) = self.client().await {
            warn!(%cause, "no catalog connection: commits of new tables are reported as unknown");
        }
    }

    async fn client(
        &mut self,
    ) -> Result<&(tokio_postgres::Client, tokio_postgres::Statement), LookupError> {
        if self.client.as_ref().is_some_and(|(c, _)| c.is_closed()) {
            self.client = None;
        }
        if self.client.is_none() {
            if self.retry_at.is_some_and(|at| Instant::now() < at) {
                return Err(LookupError::Waiting);
            }
            self.retry_at = Some(Instant::now() + CATALOG_RETRY_PAUSE);
            let client = control::connect(self.login, self.timeout, &self.tasks).await?;
            let statement = crate::timer::timeout(self.timeout, client.prepare(ANCESTORS))
                .await
                .map_err(|_| LookupError::Timeout)??;
            self.retry_at = None;
            self.client = Some((client, statement));
        }
        self.client.as_ref().ok_or(LookupError::Waiting)
    }

    /// `table` and its ancestors.
    async fn ancestors(&mut self, table: &Table) -> Result<Vec<Table>, LookupError> {
        if let Some(known) = self.known.get(table) {
            return Ok(known.clone());
        }
        let timeout = self.timeout;
        let (client, statement) = self.client().await?;
        let rows = match crate::timer::timeout(
            timeout,
            client.query(statement, &[&table.0.as_str(), &table.1.as_str()]),
        )
        .await
        {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => {
                self.client = None;
                return Err(e.into());
            }
            Err(_) => {
                self.client = None;
                return Err(LookupError::Timeout);
            }
        };
        let found = rows
            .iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect::<Result<Vec<Table>, tokio_postgres::Error>>()?;
        if found.is_empty() {
            return Err(LookupError::NotFound);
        }
        self.known.insert(table.clone(), found.clone());
        Ok(found)
    }

    /// `tables` with their ancestors, deduplicated, and false if some look-up failed (the
    /// table itself is listed then).
    async fn with_ancestors(&mut self, tables: &[Table]) -> (Vec<Table>, bool) {
        let mut all: Vec<Table> = Vec::with_capacity(tables.len());
        let mut complete = true;
        for table in tables {
            let found = match self.ancestors(table).await {
                Ok(found) => found,
                Err(cause) => {
                    warn!(schema = %table.0, table = %table.1, %cause, "cannot look up partition ancestors: reporting the commit as unknown");
                    complete = false;
                    vec![table.clone()]
                }
            };
            for t in found {
                if !all.contains(&t) {
                    all.push(t);
                }
            }
        }
        (all, complete)
    }
}

/// One line of test_decoding's output.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// `BEGIN` (`BEGIN <xid>` with `include-xids`).
    Begin,
    /// `COMMIT` (plus xid and timestamp when asked for).
    Commit,
    /// `table <schema>.<name>[, <schema>.<name>...]: INSERT|UPDATE|DELETE|TRUNCATE: ...`.
    Change(Vec<Table>),
    /// `message: ...` (`pg_logical_emit_message`): changes no table.
    Message,
    /// Anything else.
    Unknown,
}

/// Parses a test_decoding line; never fails, [`Line::Unknown`] for what it cannot read.
fn parse_line(line: &[u8]) -> Line {
    let Ok(line) = std::str::from_utf8(line) else {
        return Line::Unknown;
    };
    let keyword = |word: &str| {
        line == word
            || line
                .strip_prefix(word)
                .is_some_and(|rest| rest.starts_with(' '))
    };
    if keyword("BEGIN") {
        Line::Begin
    } else if keyword("COMMIT") {
        Line::Commit
    } else if line.starts_with("message: ") {
        Line::Message
    } else if let Some(rest) = line.strip_prefix("table ") {
        parse_change(rest).map_or(Line::Unknown, Line::Change)
    } else {
        Line::Unknown
    }
}

/// The tables of a change line after `table `.
fn parse_change(mut rest: &str) -> Option<Vec<Table>> {
    let mut tables = Vec::new();
    loop {
        let (schema, after) = identifier(rest)?;
        let after = after.strip_prefix('.')?;
        let (name, after) = identifier(after)?;
        tables.push((schema, name));
        if let Some(next) = after.strip_prefix(", ") {
            rest = next;
            continue;
        }
        let after = after.strip_prefix(": ")?;
        let (kind, _) = after.split_once(':')?;
        return match kind {
            "INSERT" | "UPDATE" | "DELETE" if tables.len() == 1 => Some(tables),
            "TRUNCATE" => Some(tables),
            _ => None,
        };
    }
}

/// One identifier as `quote_identifier` writes it (quoted with `""` doubled, or a plain
/// run of characters), and what follows it.
fn identifier(text: &str) -> Option<(String, &str)> {
    if let Some(quoted) = text.strip_prefix('"') {
        let mut name = String::new();
        let mut rest = quoted;
        loop {
            let end = rest.find('"')?;
            name.push_str(&rest[..end]);
            rest = &rest[end + 1..];
            match rest.strip_prefix('"') {
                Some(after) => {
                    name.push('"');
                    rest = after;
                }
                None => break,
            }
        }
        (!name.is_empty()).then_some((name, rest))
    } else {
        let end = text.find(['.', ':', ',', ' ', '"']).unwrap_or(text.len());
        (end > 0).then(|| (text[..end].to_owned(), &text[end..]))
    }
}

/// True for a name [`WalFollower`] may put in a command unquoted: 1 to 63 lower-case
/// letters, digits and `_`.
fn valid_slot_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// A slot name for this pgway instance and database: `pgway_<pid>_<8 hex>_<n>`, with the
/// hex drawn once per process, so instances sharing a primary never collide.
pub fn slot_name(n: usize) -> String {
    static INSTANCE: OnceLock<u32> = OnceLock::new();
    let instance = *INSTANCE.get_or_init(rand::random::<u32>);
    format!("pgway_{}_{instance:08x}_{n}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(schema: &str, name: &str) -> Table {
        (schema.to_owned(), name.to_owned())
    }

    #[test]
    fn begin_commit_and_messages() {
        assert_eq!(parse_line(b"BEGIN"), Line::Begin);
        assert_eq!(parse_line(b"BEGIN 742"), Line::Begin);
        assert_eq!(parse_line(b"COMMIT"), Line::Commit);
        assert_eq!(
            parse_line(b"COMMIT 742 (at 2024-01-01 00:00:00+00)"),
            Line::Commit
        );
        assert_eq!(
            parse_line(b"message: transactional: 1 prefix: p, sz: 1 content:x"),
            Line::Message
        );
        assert_eq!(parse_line(b"BEGINNING"), Line::Unknown);
        assert_eq!(parse_line(b""), Line::Unknown);
    }

    #[test]
    fn simple_changes() {
        assert_eq!(
            parse_line(b"table public.accounts: INSERT: id[integer]:1 name[text]:'a'"),
            Line::Change(vec![t("public", "accounts")])
        );
        assert_eq!(
            parse_line(b"table s1.t_2: UPDATE: old-key: id[integer]:1 new-tuple: id[integer]:2"),
            Line::Change(vec![t("s1", "t_2")])
        );
        assert_eq!(
            parse_line(b"table public.x: DELETE: (no-tuple-data)"),
            Line::Change(vec![t("public", "x")])
        );
    }

    #[test]
    fn quoted_names_are_unquoted_exactly() {
        assert_eq!(
            parse_line(b"table \"My Schema\".\"Odd.Name: x\": INSERT: id[integer]:1"),
            Line::Change(vec![t("My Schema", "Odd.Name: x")])
        );
        assert_eq!(
            parse_line(b"table \"a\"\"b\".\"we\"\"ird, t\": DELETE: id[integer]:1"),
            Line::Change(vec![t("a\"b", "we\"ird, t")])
        );
        assert_eq!(
            parse_line("table public.\"Grüße\": INSERT: x[int]:1".as_bytes()),
            Line::Change(vec![t("public", "Grüße")])
        );
        // Data after the kind may contain anything, also what looks like a table.
        assert_eq!(
            parse_line(b"table public.a: INSERT: v[text]:'table public.b: DELETE:'"),
            Line::Change(vec![t("public", "a")])
        );
    }

    #[test]
    fn truncate_lists_one_or_more_tables() {
        // One line per table ...
        assert_eq!(
            parse_line(b"table a.b: TRUNCATE: (no-flags)"),
            Line::Change(vec![t("a", "b")])
        );
        // ... or all of them on one line (PostgreSQL 11+ decodes TRUNCATE a, b that way).
        assert_eq!(
            parse_line(b"table public.a, \"X, Y\".\"b.c\": TRUNCATE: restart_seqs cascade"),
            Line::Change(vec![t("public", "a"), t("X, Y", "b.c")])
        );
    }

    #[test]
    fn what_does_not_parse_is_unknown() {
        for line in [
            &b"table public.a INSERT: x"[..],
            b"table public: INSERT: x",
            b"table \"unterminated.a: INSERT: x",
            b"table public.a: MERGE: x",
            b"table public.a, public.b: INSERT: x",
            b"table .a: INSERT: x",
            b"table \"\".a: INSERT: x",
            b"table public.a: INSERT",
            b"something new",
            b"\xff\xfe",
        ] {
            assert_eq!(
                parse_line(line),
                Line::Unknown,
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn positions_round_trip() {
        assert_eq!(parse_lsn("0/16B3748"), Some(0x016B_3748));
        assert_eq!(parse_lsn("1A/FF"), Some((0x1A << 32) | 0xFF));
        assert_eq!(parse_lsn("nope"), None);
        assert_eq!(parse_lsn("1/"), None);
        assert_eq!(format_lsn((0x1A << 32) | 0xFF), "1A/FF");
        assert_eq!(
            parse_lsn(&format_lsn(0x0123_4567_89AB_CDEF)),
            Some(0x0123_4567_89AB_CDEF)
        );
    }

    #[test]
    fn a_status_update_confirms_one_position_three_times() {
        let mut out = BytesMut::new();
        status_update(&mut out, 0x0102_0304_0506_0708, 99);
        assert_eq!(out.len(), 1 + 4 + 34);
        assert_eq!(&out[..5], &[b'd', 0, 0, 0, 38]);
        assert_eq!(out[5], b'r');
        for i in 0..3 {
            let at = 6 + i * 8;
            assert_eq!(&out[at..at + 8], &0x0102_0304_0506_0708u64.to_be_bytes());
        }
        assert_eq!(&out[30..38], &99i64.to_be_bytes());
        assert_eq!(out[38], 0);
    }

    #[test]
    fn the_clock_counts_from_2000() {
        // 2020-01-01 was more than 20 years after 2000-01-01.
        assert!(pg_now() > 20 * 365 * 86_400 * 1_000_000);
    }

    #[test]
    fn slot_names_are_valid_and_distinct() {
        let (a, b) = (slot_name(0), slot_name(1));
        assert!(valid_slot_name(&a) && valid_slot_name(&b), "{a} {b}");
        assert_ne!(a, b);
        assert!(a.starts_with("pgway_"));
        assert!(valid_slot_name(&slot_name(usize::MAX)));
        assert!(!valid_slot_name("Pgway"));
        assert!(!valid_slot_name("a; DROP"));
        assert!(!valid_slot_name(""));
        assert!(!valid_slot_name(&"a".repeat(64)));
    }

    /// Hands out one in-memory stream, the follower's end of a scripted walsender.
    #[derive(Debug)]
    struct OneStream(std::sync::Mutex<Option<tokio::io::DuplexStream>>);

    impl Connector for OneStream {
        fn connect<'a>(&'a self, _addr: &'a str) -> crate::net::transport::Connecting<'a> {
            let stream = self.0.lock().unwrap().take();
            Box::pin(async move {
                stream
                    .map(|s| Box::new(s) as Box<dyn crate::net::Transport>)
                    .ok_or_else(|| std::io::Error::other("connected twice"))
            })
        }
    }

    fn xlog_data(out: &mut BytesMut, position: u64, line: &str) {
        let mut msg = vec![b'w'];
        msg.extend_from_slice(&position.to_be_bytes());
        msg.extend_from_slice(&position.to_be_bytes());
        msg.extend_from_slice(&0i64.to_be_bytes());
        msg.extend_from_slice(line.as_bytes());
        put_frame(out, b'd', &msg);
    }

    fn keepalive(out: &mut BytesMut, wal_end: u64, reply: bool) {
        let mut msg = vec![b'k'];
        msg.extend_from_slice(&wal_end.to_be_bytes());
        msg.extend_from_slice(&0i64.to_be_bytes());
        msg.push(u8::from(reply));
        put_frame(out, b'd', &msg);
    }

    fn data_row_frame(out: &mut BytesMut, values: &[Option<&str>]) {
        let mut msg = (values.len() as i16).to_be_bytes().to_vec();
        for v in values {
            match v {
                Some(v) => {
                    msg.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    msg.extend_from_slice(v.as_bytes());
                }
                None => msg.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        put_frame(out, b'D', &msg);
    }

    /// Reads frames until a standby status update confirming `position`; checks that
    /// every update confirms one position three times and that they never go back.
    async fn confirmed(io: &mut FramedStream, position: u64, last: &mut u64) {
        loop {
            let frame = io.read_frame(MAX_MESSAGE_LEN).await.unwrap();
            assert_eq!(frame[0], b'd', "only CopyData while streaming");
            let msg = body(&frame);
            assert_eq!((msg[0], msg.len()), (b'r', 34));
            let at = |i: usize| u64::from_be_bytes(msg[1 + i * 8..9 + i * 8].try_into().unwrap());
            assert!(
                at(0) == at(1) && at(1) == at(2),
                "written = flushed = applied"
            );
            assert!(at(0) >= *last, "confirmations never go back");
            *last = at(0);
            if at(0) == position {
                return;
            }
            assert!(at(0) < position, "confirmed {} past {position}", at(0));
        }
    }

    /// A scripted walsender: login, SHOW, CREATE_REPLICATION_SLOT, START_REPLICATION,
    /// then the lines the real one cannot be made to send.
    async fn fake_walsender(stream: tokio::io::DuplexStream) {
        let mut io = FramedStream::new(Box::new(stream));
        let startup = io.read_startup().await.unwrap();
        let text = String::from_utf8_lossy(&startup).into_owned();
        assert!(text.contains("replication\0database\0"), "{text:?}");
        assert!(text.contains("application_name\0pgway_cache\0"), "{text:?}");
        let mut out = BytesMut::new();
        put_frame(&mut out, b'R', &0i32.to_be_bytes());
        put_frame(&mut out, b'Z', b"I");
        io.send(&mut out).await.unwrap();

        let sql = |frame: &[u8]| String::from_utf8_lossy(query_text_of(frame)).into_owned();
        let frame = io.read_frame(MAX_MESSAGE_LEN).await.unwrap();
        assert_eq!(sql(&frame), "SHOW wal_level");
        data_row_frame(&mut out, &[Some("logical")]);
        put_frame(&mut out, b'C', b"SHOW\0");
        put_frame(&mut out, b'Z', b"I");
        io.send(&mut out).await.unwrap();

        let frame = io.read_frame(MAX_MESSAGE_LEN).await.unwrap();
        assert!(sql(&frame).starts_with("CREATE_REPLICATION_SLOT pgway_t TEMPORARY LOGICAL"));
        data_row_frame(
            &mut out,
            &[Some("pgway_t"), Some("0/100"), None, Some("test_decoding")],
        );
        put_frame(&mut out, b'C', b"CREATE_REPLICATION_SLOT\0");
        put_frame(&mut out, b'Z', b"I");
        io.send(&mut out).await.unwrap();

        let frame = io.read_frame(MAX_MESSAGE_LEN).await.unwrap();
        assert!(
            sql(&frame).starts_with("START_REPLICATION SLOT pgway_t LOGICAL 0/100 ("),
            "{}",
            sql(&frame)
        );
        put_frame(&mut out, b'W', &[0, 0, 0]);
        io.send(&mut out).await.unwrap();
        let mut last = 0;
        confirmed(&mut io, 0x100, &mut last).await;

        // A transaction with a line nobody can read, and a keepalive inside it.
        xlog_data(&mut out, 0x200, "BEGIN");
        keepalive(&mut out, 0x150, false);
        xlog_data(&mut out, 0x210, "something new: table public.b: INSERT: x");
        xlog_data(&mut out, 0x300, "COMMIT");
        // A transaction whose table cannot be looked up (no catalog connection).
        xlog_data(&mut out, 0x310, "BEGIN");
        xlog_data(&mut out, 0x320, "table public.a: INSERT: id[integer]:1");
        xlog_data(&mut out, 0x380, "COMMIT");
        io.send(&mut out).await.unwrap();
        confirmed(&mut io, 0x380, &mut last).await;
        // Nothing new, but a reply is requested: confirmed at once.
        keepalive(&mut out, 0x380, true);
        io.send(&mut out).await.unwrap();
        confirmed(&mut io, 0x380, &mut last).await;
        keepalive(&mut out, 0x400, false);
        io.send(&mut out).await.unwrap();
        confirmed(&mut io, 0x400, &mut last).await;
        // The server ends the stream.
        put_frame(&mut out, b'c', &[]);
        io.send(&mut out).await.unwrap();
        // Wait for the follower to hang up.
        while io.read_frame(MAX_MESSAGE_LEN).await.is_ok() {}
    }

    fn query_text_of(frame: &[u8]) -> &[u8] {
        crate::protocol::messages::query_text(frame).unwrap()
    }

    #[tokio::test]
    async fn the_protocol_against_a_scripted_walsender() {
        let (near, far) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(fake_walsender(far));
        let follower = WalFollower {
            // Nothing listens there: catalog look-ups fail.
            addr: "127.0.0.1:1",
            user: "pgway_wal",
            password: "wal-secret",
            database: "appdb",
            slot: "pgway_t",
            timeout: Duration::from_secs(5),
        };
        let mut events = Vec::new();
        let result = follower
            .run(
                &OneStream(std::sync::Mutex::new(Some(near))),
                CancellationToken::new(),
                |e| events.push(e),
            )
            .await;
        assert!(
            matches!(result, Err(WalError::Lost(NetError::Closed))),
            "{result:?}"
        );
        server.await.unwrap();
        assert_eq!(
            events,
            [
                WalEvent::Consistent { position: 0x100 },
                WalEvent::Commit {
                    position: 0x300,
                    tables: vec![],
                    unknown: true
                },
                WalEvent::Commit {
                    position: 0x380,
                    tables: vec![t("public", "a")],
                    unknown: true
                },
                WalEvent::Position(0x400),
            ]
        );
    }

    #[tokio::test]
    async fn an_invalid_slot_name_is_refused_before_connecting() {
        let follower = WalFollower {
            addr: "127.0.0.1:1",
            user: "u",
            password: "p",
            database: "d",
            slot: "x; DROP",
            timeout: Duration::from_secs(1),
        };
        let result = follower
            .run(
                &OneStream(std::sync::Mutex::new(None)),
                CancellationToken::new(),
                |_| {},
            )
            .await;
        assert!(
            matches!(result, Err(WalError::InvalidSlot(_))),
            "{result:?}"
        );
    }

    #[test]
    fn debug_leaves_the_password_out() {
        let follower = WalFollower {
            addr: "127.0.0.1:5432",
            user: "pgway_wal",
            password: "wal-secret",
            database: "appdb",
            slot: "pgway_1",
            timeout: Duration::from_secs(1),
        };
        let text = format!("{follower:?}");
        assert!(
            !text.contains("wal-secret") && text.contains("pgway_wal"),
            "{text}"
        );
    }

    #[test]
    fn retryable_errors() {
        let server = |code: &str| WalError::Server {
            code: code.into(),
            message: String::new(),
        };
        assert!(server("57P01").is_retryable());
        assert!(server("53300").is_retryable());
        assert!(!server("28P01").is_retryable());
        assert!(!server("42501").is_retryable());
        assert!(WalError::Lost(NetError::Closed).is_retryable());
        assert!(!WalError::NotLogical {
            wal_level: "replica".into()
        }
        .is_retryable());
    }
}
