//! The admin console: database `pgway` on the client port, as pgbouncer's `pgbouncer`
//! database. `psql -U <admin user> pgway`, then `SHOW POOLS`, `SHOW CLIENTS`,
//! `SHOW SERVERS`, `SHOW STATS`, `SHOW TOPOLOGY`, `SHOW CACHE`, `SHOW CONFIG`,
//! `PAUSE [<db>]`, `RESUME [<db>]`, `KILL_CLIENT <id>` and `RELOAD` (see
//! [`crate::reload`]). Console connections are clients too: `SHOW CLIENTS` lists them (database
//! `pgway`) and `KILL_CLIENT` ends them, the one asking included.
//!
//! Users log in as any user does (`[[users]]`, their password, TLS as configured); only
//! those with `admin = true` may open database `pgway`, others get FATAL 42501 after
//! authenticating (so the console does not tell who is an admin). Columns follow
//! pgbouncer 1.24's where the concept is the same; every value is text.
//!
//! # Why not pgwire
//!
//! pgwire's server API (`process_socket` with startup, authentication and query handlers)
//! owns the socket from the first byte: it would run its own startup and authentication
//! next to pgway's. pgway decides that a connection is for the console only after its own
//! login (SSLRequest and TLS, SCRAM or MD5 against `[[users]]`), on its own
//! [`FramedStream`]; handing the stream over to pgwire at that point is not something its
//! API offers. What the console needs of the protocol is four messages (RowDescription,
//! DataRow, CommandComplete, ReadyForQuery), a few lines each here.
//!
//! # Commands
//! Simple query protocol only; several commands in one Query run in turn. The
//! extended protocol is answered with 0A000 at its Sync.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use rand::RngCore;
use tracing::{debug, info, warn};

use crate::error::{sqlstate, ClientError};
use crate::frontend::registry::{ClientEntry, ClientId, ClientState, Clients};
use crate::frontend::Shared;
use crate::net::{FramedStream, NetError};
use crate::protocol::frame::{begin_frame, end_frame, put_frame};
use crate::protocol::messages::{self, query_text, Severity};
use crate::protocol::MAX_MESSAGE_LEN;
use crate::route::floors::format_lsn;
use crate::topology::patroni::WatchState;
use crate::topology::Role;

/// The database name that opens the console.
pub const DATABASE: &str = "pgway";

/// `42501` insufficient_privilege.
const INSUFFICIENT_PRIVILEGE: &str = "42501";
/// `42601` syntax_error.
const SYNTAX_ERROR: &str = "42601";
/// `42704` undefined_object.
const UNDEFINED_OBJECT: &str = "42704";
/// `0A000` feature_not_supported.
const FEATURE_NOT_SUPPORTED: &str = "0A000";
/// `55000` object_not_in_prerequisite_state.
const NOT_IN_PREREQUISITE_STATE: &str = "55000";
/// `F0000` config_file_error.
const CONFIG_FILE_ERROR: &str = "F0000";

/// What a session ended by `KILL_CLIENT` is told (FATAL 57P01, as PostgreSQL's
/// `pg_terminate_backend`).
pub fn killed() -> ClientError {
    ClientError::Server {
        code: sqlstate::ADMIN_SHUTDOWN.to_owned(),
        message: "terminating connection: terminated by the administrator (KILL_CLIENT)".to_owned(),
    }
}

/// What a user without `admin = true` is told when it opens database `pgway`.
pub fn not_admin(user: &str) -> ClientError {
    ClientError::Server {
        code: INSUFFICIENT_PRIVILEGE.to_owned(),
        message: format!(
            "permission denied for the admin console: user \"{user}\" is not an admin \
             (admin = true in its [[users]] entry)"
        ),
    }
}

/// An error a command answers with (ERROR: the console goes on).
#[derive(Debug)]
struct CommandError {
    code: &'static str,
    message: String,
}

impl CommandError {
    fn syntax(message: impl Into<String>) -> Self {
        Self {
            code: SYNTAX_ERROR,
            message: message.into(),
        }
    }
}

/// Serves a logged-in admin connected from `peer` to pgway's `local` address (as
/// `SHOW CLIENTS` lists it): `out` holds AuthenticationOk. Ends when the client leaves,
/// `KILL_CLIENT` ends it, or pgway stops.
pub async fn serve_at(
    shared: &Shared,
    mut io: FramedStream,
    mut out: BytesMut,
    user: &str,
    peer: Option<SocketAddr>,
    local: Option<SocketAddr>,
) {
    greet(&mut out);
    if io.send(&mut out).await.is_err() {
        return;
    }
    let registered = shared
        .clients
        .register_console(user, DATABASE, peer, local, &shared.shutdown);
    let kill = registered.entry.kill.clone();
    info!(user, id = %registered.entry.id, "admin console opened");
    // The extended protocol is refused once per batch, at its first message.
    let mut refused = false;
    loop {
        let frame = tokio::select! {
            biased;
            () = kill.cancelled() => {
                let e = if shared.shutdown.is_cancelled() {
                    ClientError::Shutdown
                } else {
                    killed()
                };
                e.write_as(&mut out, Severity::Fatal);
                let _ = io.send(&mut out).await;
                return;
            }
            frame = io.read_frame(MAX_MESSAGE_LEN) => frame,
        };
        let frame = match frame {
            Ok(frame) => frame,
            Err(NetError::Closed) => return,
            Err(cause) => {
                debug!(%cause, "admin console connection lost");
                return;
            }
        };
        match frame[0] {
            b'Q' => {
                match query_text(&frame) {
                    Ok(sql) => {
                        let sql = String::from_utf8_lossy(sql).into_owned();
                        run_query(shared, &sql, &mut out).await;
                    }
                    Err(e) => error(&mut out, sqlstate::PROTOCOL_VIOLATION, &e.to_string()),
                }
                messages::ready_for_query(&mut out, b'I');
            }
            b'P' | b'B' | b'D' | b'E' | b'C' | b'H' => {
                if !refused {
                    refused = true;
                    error(
                        &mut out,
                        FEATURE_NOT_SUPPORTED,
                        "the admin console takes the simple query protocol only",
                    );
                }
            }
            b'S' => {
                if !refused {
                    error(
                        &mut out,
                        FEATURE_NOT_SUPPORTED,
                        "the admin console takes the simple query protocol only",
                    );
                }
                refused = false;
                messages::ready_for_query(&mut out, b'I');
            }
            b'X' => return,
            other => {
                ClientError::UnexpectedMessage(other).write_as(&mut out, Severity::Fatal);
                let _ = io.send(&mut out).await;
                return;
            }
        }
        if io.send(&mut out).await.is_err() {
            return;
        }
    }
}

/// ParameterStatus values psql reads, BackendKeyData and ReadyForQuery.
fn greet(out: &mut BytesMut) {
    let version = format!("16.0 (pgway {})", env!("CARGO_PKG_VERSION"));
    for (name, value) in [
        ("server_version", version.as_str()),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", ""),
    ] {
        messages::parameter_status(out, name, value);
    }
    let mut rng = rand::thread_rng();
    // The console has nothing to cancel: a key that matches no session.
    messages::backend_key_data(out, (rng.next_u32() >> 1) as i32, rng.next_u32() as i32);
    messages::ready_for_query(out, b'I');
}

/// Runs each `;`-separated command of `sql`, stopping at the first error.
async fn run_query(shared: &Shared, sql: &str, out: &mut BytesMut) {
    let commands: Vec<&str> = sql
        .split(';')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    if commands.is_empty() {
        put_frame(out, b'I', &[]);
        return;
    }
    for command in commands {
        if let Err(e) = run(shared, command, out).await {
            error(out, e.code, &e.message);
            return;
        }
    }
}

async fn run(shared: &Shared, command: &str, out: &mut BytesMut) -> Result<(), CommandError> {
    // Keywords are matched in upper case; a database name keeps its case.
    let raw: Vec<&str> = command.split_whitespace().collect();
    let words: Vec<String> = raw.iter().map(|w| w.to_ascii_uppercase()).collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    // The second word as written (a database for PAUSE and RESUME).
    let argument = raw.get(1).copied().unwrap_or_default();
    match words.as_slice() {
        ["SHOW", what] => show(shared, what, out),
        ["PAUSE"] => pause(shared, None, out).await,
        ["PAUSE", _] => pause(shared, Some(&database_name(argument)?), out).await,
        ["RESUME"] => resume(shared, None, out),
        ["RESUME", _] => resume(shared, Some(&database_name(argument)?), out),
        ["KILL_CLIENT", id] => {
            let id = id
                .parse()
                .map(ClientId)
                .map_err(|_| CommandError::syntax(format!("invalid client id \"{id}\"")))?;
            if !shared.clients.kill(id) {
                return Err(CommandError {
                    code: UNDEFINED_OBJECT,
                    message: format!("no client with id {id}"),
                });
            }
            info!(%id, "admin console: KILL_CLIENT");
            command_complete(out, "KILL_CLIENT");
            Ok(())
        }
        ["RELOAD"] => reload(shared, out).await,
        ["PAUSE" | "RESUME", ..] => Err(CommandError::syntax(
            "PAUSE and RESUME take at most one database",
        )),
        _ => Err(CommandError::syntax(format!(
            "unrecognized admin command \"{command}\": the console knows SHOW POOLS, \
             SHOW CLIENTS, SHOW SERVERS, SHOW STATS, SHOW TOPOLOGY, SHOW CACHE, SHOW CONFIG, \
             PAUSE, RESUME, KILL_CLIENT <id> and RELOAD"
        ))),
    }
}

/// A database name as `PAUSE` and `RESUME` take it: as written, or double-quoted (`""`
/// inside stands for `"`).
fn database_name(word: &str) -> Result<String, CommandError> {
    let name = match word.strip_prefix('"') {
        Some(rest) => rest
            .strip_suffix('"')
            .filter(|inner| !inner.is_empty())
            .map(|inner| inner.replace("\"\"", "\""))
            .ok_or_else(|| CommandError::syntax(format!("invalid database name {word}")))?,
        None => word.to_owned(),
    };
    if name == DATABASE {
        return Err(CommandError {
            code: NOT_IN_PREREQUISITE_STATE,
            message: format!("the admin console (database \"{DATABASE}\") cannot be paused"),
        });
    }
    Ok(name)
}

/// `RELOAD`: reads the config file again and applies it (see [`crate::reload`]). A NOTICE
/// names each changed key that needs a restart; a refused file is an error naming the
/// key (the running config stays).
async fn reload(shared: &Shared, out: &mut BytesMut) -> Result<(), CommandError> {
    info!("admin console: RELOAD");
    let report = crate::reload::reload(shared).await.map_err(|e| {
        warn!(cause = %e, "admin console: reload refused; the running config stays");
        CommandError {
            code: match e {
                crate::reload::ReloadError::Busy => NOT_IN_PREREQUISITE_STATE,
                _ => CONFIG_FILE_ERROR,
            },
            message: e.to_string(),
        }
    })?;
    for key in report.need_restart {
        notice(
            out,
            &format!("{key} changed, but it needs a restart: the running value stays"),
        );
    }
    command_complete(out, "RELOAD");
    Ok(())
}

/// `PAUSE [<db>]`: new transactions (of `database`'s clients, or of every client) wait;
/// returns once none of those clients holds a server connection, or after
/// `pool.wait_timeout` with a NOTICE (the pause stays in force).
async fn pause(
    shared: &Shared,
    database: Option<&str>,
    out: &mut BytesMut,
) -> Result<(), CommandError> {
    shared.clients.pause(database);
    info!(database, "admin console: PAUSE");
    let timeout = shared.config.load().pool.wait_timeout;
    if !shared.clients.drained(timeout, database).await {
        let active = shared.clients.active_count(database);
        let what = database.map_or_else(
            || "pgway is".to_owned(),
            |db| format!("database \"{db}\" is"),
        );
        notice(
            out,
            &format!(
                "{what} paused, but {active} client(s) still held a server connection after \
                 {timeout:?} (pinned sessions keep theirs)"
            ),
        );
    }
    command_complete(out, "PAUSE");
    Ok(())
}

/// `RESUME [<db>]`: the waiting clients (of `database`, or all, every database paused one
/// by one included) go on.
fn resume(shared: &Shared, database: Option<&str>, out: &mut BytesMut) -> Result<(), CommandError> {
    shared.clients.resume(database).map_err(|e| CommandError {
        code: NOT_IN_PREREQUISITE_STATE,
        message: e.to_string(),
    })?;
    info!(database, "admin console: RESUME");
    command_complete(out, "RESUME");
    Ok(())
}

fn show(shared: &Shared, what: &str, out: &mut BytesMut) -> Result<(), CommandError> {
    let table = match what {
        "POOLS" => pools(shared),
        "CLIENTS" => clients(shared),
        "SERVERS" => servers(shared),
        "STATS" => stats(shared),
        "TOPOLOGY" => topology(shared),
        "CACHE" => cache(shared),
        "CONFIG" => config(shared),
        other => {
            return Err(CommandError::syntax(format!(
                "unrecognized SHOW item \"{other}\": the console shows POOLS, CLIENTS, \
                 SERVERS, STATS, TOPOLOGY, CACHE and CONFIG"
            )))
        }
    };
    if what == "TOPOLOGY" {
        if let Some(source) = etcd_notice(shared) {
            notice(out, &source);
        }
    }
    table.write(out);
    Ok(())
}

/// For a Patroni topology, where the etcd watch stands (a NOTICE before `SHOW TOPOLOGY`'s
/// rows).
fn etcd_notice(shared: &Shared) -> Option<String> {
    let etcd = shared.topology.etcd().report();
    if etcd.state == WatchState::Off {
        return None;
    }
    let mut text = format!(
        "topology source: etcd ({}), {} for {}s",
        etcd.endpoints.join(", "),
        etcd.state.name(),
        etcd.since.as_secs()
    );
    if let Some(revision) = etcd.revision {
        let _ = write!(text, ", revision {revision}");
    }
    if let Some(error) = &etcd.last_error {
        let _ = write!(text, "; last error: {error}");
    }
    Some(text)
}

/// A result set: column names and text rows.
struct Table {
    columns: &'static [&'static str],
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(columns: &'static [&'static str]) -> Self {
        Self {
            columns,
            rows: Vec::new(),
        }
    }

    fn write(&self, out: &mut BytesMut) {
        let start = begin_frame(out, b'T');
        out.put_i16(i16::try_from(self.columns.len()).unwrap_or(i16::MAX));
        for name in self.columns {
            out.extend_from_slice(name.as_bytes());
            out.put_u8(0);
            out.put_i32(0); // table oid
            out.put_i16(0); // column number
            out.put_i32(25); // text
            out.put_i16(-1); // variable length
            out.put_i32(-1); // type modifier
            out.put_i16(0); // text format
        }
        end_frame(out, start);
        for row in &self.rows {
            let start = begin_frame(out, b'D');
            out.put_i16(i16::try_from(row.len()).unwrap_or(i16::MAX));
            for value in row {
                out.put_i32(i32::try_from(value.len()).unwrap_or(i32::MAX));
                out.extend_from_slice(value.as_bytes());
            }
            end_frame(out, start);
        }
        command_complete(out, &format!("SHOW {}", self.rows.len()));
    }
}

fn command_complete(out: &mut BytesMut, tag: &str) {
    let start = begin_frame(out, b'C');
    out.extend_from_slice(tag.as_bytes());
    out.put_u8(0);
    end_frame(out, start);
}

fn error(out: &mut BytesMut, code: &str, message: &str) {
    messages::error_response(out, Severity::Error, code, message);
}

fn notice(out: &mut BytesMut, message: &str) {
    let start = begin_frame(out, b'N');
    for (field, value) in [
        (b'S', "NOTICE"),
        (b'V', "NOTICE"),
        (b'C', "01000"),
        (b'M', message),
    ] {
        out.put_u8(field);
        out.extend_from_slice(value.as_bytes());
        out.put_u8(0);
    }
    out.put_u8(0);
    end_frame(out, start);
}

/// `host:port` split for pgbouncer's separate columns.
fn host_port(addr: &str) -> (String, String) {
    match addr.rsplit_once(':') {
        Some((host, port)) => (host.to_owned(), port.to_owned()),
        None => (addr.to_owned(), String::new()),
    }
}

fn time(t: std::time::SystemTime) -> String {
    humantime_serde::re::humantime::format_rfc3339_seconds(t).to_string()
}

/// `SHOW POOLS`: one row per (database, user) with clients or pools.
fn pools(shared: &Shared) -> Table {
    #[derive(Default)]
    struct Row {
        cl_active: u64,
        cl_waiting: u64,
        sv_active: u64,
        sv_idle: u64,
        maxwait: Duration,
    }
    let mut rows = std::collections::BTreeMap::<(String, String), Row>::new();
    for client in shared.clients.list() {
        let row = rows
            .entry((client.database.clone(), client.user.clone()))
            .or_default();
        match client.state() {
            ClientState::Waiting => {
                row.cl_waiting += 1;
                row.maxwait = row.maxwait.max(client.waited());
            }
            ClientState::Idle | ClientState::Active => row.cl_active += 1,
        }
        if client.server().is_some() {
            row.sv_active += 1;
        }
    }
    for pool in shared.clients.pools() {
        let key = pool.key();
        let row = rows
            .entry((key.database.clone(), key.user.clone()))
            .or_default();
        row.sv_idle += pool.idle_count() as u64;
    }
    let mut table = Table::new(&[
        "database",
        "user",
        "cl_active",
        "cl_waiting",
        "cl_active_cancel_req",
        "cl_waiting_cancel_req",
        "sv_active",
        "sv_active_cancel",
        "sv_being_canceled",
        "sv_idle",
        "sv_used",
        "sv_tested",
        "sv_login",
        "maxwait",
        "maxwait_us",
        "pool_mode",
        "load_balance_hosts",
    ]);
    for ((database, user), row) in rows {
        table.rows.push(vec![
            database,
            user,
            row.cl_active.to_string(),
            row.cl_waiting.to_string(),
            "0".into(),
            "0".into(),
            row.sv_active.to_string(),
            "0".into(),
            "0".into(),
            row.sv_idle.to_string(),
            "0".into(),
            "0".into(),
            "0".into(),
            row.maxwait.as_secs().to_string(),
            row.maxwait.subsec_micros().to_string(),
            "transaction".into(),
            String::new(),
        ]);
    }
    table
}

const CONNECTION_COLUMNS: &[&str] = &[
    "type",
    "user",
    "database",
    "replication",
    "state",
    "addr",
    "port",
    "local_addr",
    "local_port",
    "connect_time",
    "request_time",
    "wait",
    "wait_us",
    "close_needed",
    "ptr",
    "link",
    "remote_pid",
    "tls",
    "application_name",
    "prepared_statements",
    "id",
];

/// `SHOW CLIENTS`: one row per client session and console connection (database
/// `pgway`). `link` is the server connection it holds (`node/pid`), `id` what
/// `KILL_CLIENT` takes.
fn clients(shared: &Shared) -> Table {
    let mut table = Table::new(CONNECTION_COLUMNS);
    for client in shared.clients.list() {
        table.rows.push(client_row(&client));
    }
    table
}

fn client_row(client: &ClientEntry) -> Vec<String> {
    let server = client.server();
    let waited = client.waited();
    let state = match client.state() {
        ClientState::Waiting => "waiting",
        ClientState::Idle | ClientState::Active => "active",
    };
    vec![
        "C".into(),
        client.user.clone(),
        client.database.clone(),
        "none".into(),
        state.into(),
        client.addr.map(|a| a.ip().to_string()).unwrap_or_default(),
        client
            .addr
            .map(|a| a.port().to_string())
            .unwrap_or_default(),
        client.local.map(|a| a.ip().to_string()).unwrap_or_default(),
        client
            .local
            .map(|a| a.port().to_string())
            .unwrap_or_default(),
        time(client.connected),
        server
            .as_ref()
            .map(|s| time(s.since_wall()))
            .unwrap_or_default(),
        waited.as_secs().to_string(),
        waited.subsec_micros().to_string(),
        "0".into(),
        String::new(),
        server
            .as_ref()
            .map(|s| format!("{}/{}", s.addr, s.pid))
            .unwrap_or_default(),
        server
            .as_ref()
            .map(|s| s.pid.to_string())
            .unwrap_or_default(),
        String::new(),
        client.application_name.clone(),
        String::new(),
        client.id.to_string(),
    ]
}

/// `SHOW SERVERS`: a row per server connection a client holds (with its backend pid and
/// the client's id as `link`), and a row per idle connection of the pools sessions use
/// (pgway does not track those one by one: no pid).
fn servers(shared: &Shared) -> Table {
    let mut table = Table::new(CONNECTION_COLUMNS);
    let row = |user: &str, database: &str, state: &str, addr: &str| {
        let (host, port) = host_port(addr);
        vec![
            "S".into(),
            user.to_owned(),
            database.to_owned(),
            "none".into(),
            state.to_owned(),
            host,
            port,
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            "0".into(),
            "0".into(),
            "0".into(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
        ]
    };
    for client in shared.clients.list() {
        if let Some(server) = client.server() {
            let mut r = row(&client.user, &client.database, "active", &server.addr);
            r[9] = time(server.since_wall());
            r[10] = time(server.since_wall());
            r[15] = client.id.to_string();
            r[16] = server.pid.to_string();
            table.rows.push(r);
        }
    }
    let mut pools = shared.clients.pools();
    pools.sort_by(|a, b| {
        let (a, b) = (a.key(), b.key());
        (&a.database, &a.user, &a.addr).cmp(&(&b.database, &b.user, &b.addr))
    });
    for pool in pools {
        let key = pool.key();
        for _ in 0..pool.idle_count() {
            table
                .rows
                .push(row(&key.user, &key.database, "idle", &key.addr));
        }
    }
    table
}

/// `SHOW STATS`: per database, since pgway started (clients that left included).
/// A transaction is a server assignment (transaction pooling: a statement outside a
/// transaction counts as one); a query is a simple Query, a function call or an Execute
/// answered (by a server or the result cache); times are in microseconds.
fn stats(shared: &Shared) -> Table {
    let mut totals = std::collections::BTreeMap::new();
    for (database, t) in shared.clients.left() {
        totals.insert(database, t);
    }
    for client in shared.clients.list() {
        let t = Clients::totals_of(&client);
        let sum = totals.entry(client.database.clone()).or_default();
        sum.xacts += t.xacts;
        sum.queries += t.queries;
        sum.xact_us += t.xact_us;
        sum.wait_us += t.wait_us;
    }
    let mut table = Table::new(&[
        "database",
        "total_server_assignment_count",
        "total_xact_count",
        "total_query_count",
        "total_xact_time",
        "total_wait_time",
        "avg_xact_time",
    ]);
    for (database, t) in totals {
        let avg = t.xact_us.checked_div(t.xacts).unwrap_or(0);
        table.rows.push(vec![
            database,
            t.xacts.to_string(),
            t.xacts.to_string(),
            t.queries.to_string(),
            t.xact_us.to_string(),
            t.wait_us.to_string(),
            avg.to_string(),
        ]);
    }
    table
}

/// `SHOW TOPOLOGY`: the nodes as pgway sees them.
fn topology(shared: &Shared) -> Table {
    let mut table = Table::new(&[
        "node",
        "role",
        "healthy",
        "lsn",
        "replay_lsn",
        "may_be_primary",
        "may_take_reads",
    ]);
    let snapshot = shared.topology.snapshot();
    for node in &snapshot.nodes {
        let role = match node.role {
            Role::Primary => "primary",
            Role::Replica => "replica",
            Role::Unknown => "unknown",
        };
        let replay = shared.replay.known(&node.addr);
        table.rows.push(vec![
            node.addr.to_string(),
            role.into(),
            node.healthy.to_string(),
            node.lsn.map(format_lsn).unwrap_or_default(),
            if replay == 0 {
                String::new()
            } else {
                format_lsn(replay)
            },
            node.may_be_primary.to_string(),
            node.may_take_reads.to_string(),
        ]);
    }
    table
}

/// `SHOW CACHE`: the result cache's counters, one `key`/`value` row each, and each
/// database's invalidation stream.
fn cache(shared: &Shared) -> Table {
    use std::sync::atomic::Ordering::Relaxed;
    let mut table = Table::new(&["key", "value"]);
    let mut row = |k: &str, v: String| table.rows.push(vec![k.to_owned(), v]);
    let Some(cache) = &shared.cache else {
        row("enabled", "false".into());
        return table;
    };
    let (entries, bytes) = cache.size();
    let s = cache.stats();
    row("enabled", "true".into());
    row("entries", entries.to_string());
    row("bytes", bytes.to_string());
    for (name, counter) in [
        ("hits", &s.hits),
        ("misses", &s.misses),
        ("bypassed", &s.bypassed),
        ("fills", &s.fills),
        ("fills_refused", &s.fills_refused),
        ("evictions", &s.evictions),
        ("invalidations", &s.invalidations),
    ] {
        row(name, counter.load(Relaxed).to_string());
    }
    for db in cache.dbs() {
        row(
            &format!("stream.{}", db.name()),
            db.state().name().to_owned(),
        );
    }
    table
}

/// `SHOW CONFIG`: the settings in force (passwords left out); `changeable` says whether a
/// reload (SIGHUP, `RELOAD`) changes it or it needs a restart.
fn config(shared: &Shared) -> Table {
    let c = shared.config.load();
    let mut table = Table::new(&["key", "value", "changeable"]);
    let mut row = |k: &str, v: String| {
        let changeable = if crate::reload::RESTART_KEYS.contains(&k) {
            "no"
        } else {
            "yes"
        };
        table
            .rows
            .push(vec![k.to_owned(), v, changeable.to_owned()]);
    };
    let duration = |d: Duration| humantime_serde::re::humantime::format_duration(d).to_string();
    let bytes = |b: Option<u64>| b.map_or_else(|| "unlimited".to_owned(), |b| b.to_string());
    row("listen", c.listen.to_string());
    row("admin_listen", c.admin_listen.to_string());
    row(
        "workers",
        c.workers
            .map_or_else(|| "auto".to_owned(), |w| w.to_string()),
    );
    row("busy_poll", duration(c.busy_poll));
    row("pool.size", c.pool.size.to_string());
    row("pool.wait_timeout", duration(c.pool.wait_timeout));
    row("pool.connect_timeout", duration(c.pool.connect_timeout));
    row("pool.statement_cache", c.pool.statement_cache.to_string());
    row("pool.hold_begin", c.pool.hold_begin.to_string());
    row("client.login_timeout", duration(c.client.login_timeout));
    row(
        "client.max_connections",
        c.client.max_connections.to_string(),
    );
    row(
        "topology.failover_timeout",
        duration(c.topology.failover_timeout()),
    );
    row("routing.max_replica_lag", bytes(c.routing.max_replica_lag));
    row(
        "routing.read_your_writes",
        format!("{:?}", c.routing.read_your_writes).to_lowercase(),
    );
    row(
        "routing.read_your_writes_wait",
        duration(c.routing.read_your_writes_wait),
    );
    row("cache.enabled", c.cache.enabled.to_string());
    row("cache.max_memory", bytes(c.cache.max_memory));
    row("cache.default_ttl", duration(c.cache.default_ttl));
    let mut users = String::new();
    for u in &c.users {
        if !users.is_empty() {
            users.push_str(", ");
        }
        let _ = write!(users, "{}{}", u.name, if u.admin { " (admin)" } else { "" });
    }
    row("users", users);
    row(
        "auth_query.user",
        c.auth_query
            .as_ref()
            .map_or_else(|| "(off)".to_owned(), |a| a.user.clone()),
    );
    table
}
