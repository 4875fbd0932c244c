//! The middle tier of tests: a real [`Session`] driven over in-memory streams.
//!
//! A [`Harness`] builds the state sessions share, with pools that connect through
//! [`FakeNetwork`] (an in-memory [`Connector`]) instead of TCP. A test plays both ends:
//! a [`TestClient`] speaks the frontend protocol to the session, and each [`FakeServer`]
//! is one server connection pgway opened, on which the test reads what pgway sent and
//! writes what a PostgreSQL server would answer. No socket, no PostgreSQL: every step is
//! explicit, and a wait that does not end fails the test after [`WAIT`].

#![allow(
    clippy::expect_used,
    reason = "a harness step that cannot go on fails the test, with its message"
)]

mod copy;
mod fuzz;
mod pinning;
mod pipeline;
mod pooling;
mod retry;
mod routing;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::DuplexStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Session;
use crate::backend::Pools;
use crate::config::Config;
use crate::frontend::Shared;
use crate::net::transport::Connecting;
use crate::net::{Connector, FramedStream, NetError, Transport};
use crate::protocol::frame::{begin_frame, end_frame, put_frame};
use crate::protocol::messages::{self, Severity};
use crate::settings::ClientSettings;
use crate::topology::Role;

/// The primary's address (nothing listens there: the fake network answers).
pub(super) const PRIMARY: &str = "10.0.0.1:5432";
/// The replica's address.
pub(super) const REPLICA: &str = "10.0.0.2:5432";
/// Longest wait for any one step of a test.
pub(super) const WAIT: Duration = Duration::from_secs(5);

/// An in-memory network: a connect to a node hands the other end of a duplex stream to
/// whoever listens for that node ([`Harness::accept`]).
#[derive(Debug, Default)]
pub(super) struct FakeNetwork {
    listeners: Mutex<HashMap<String, mpsc::UnboundedSender<DuplexStream>>>,
}

impl Connector for FakeNetwork {
    fn connect<'a>(&'a self, addr: &'a str) -> Connecting<'a> {
        Box::pin(async move {
            let (near, far) = tokio::io::duplex(64 * 1024);
            let listeners = self.listeners.lock().map_err(|_| refused())?;
            let listener = listeners.get(addr).ok_or_else(refused)?;
            listener.send(far).map_err(|_| refused())?;
            Ok(Box::new(near) as Box<dyn Transport>)
        })
    }
}

fn refused() -> std::io::Error {
    std::io::ErrorKind::ConnectionRefused.into()
}

/// What sessions share, over a fake network with a primary and a replica.
pub(super) struct Harness {
    pub(super) shared: Arc<Shared>,
    network: Arc<FakeNetwork>,
    incoming: HashMap<&'static str, mpsc::UnboundedReceiver<DuplexStream>>,
    next_pid: AtomicI32,
}

impl Harness {
    /// A primary and a replica, both up, `pool_size` connections per node; a client waits
    /// 300 ms for a busy pool.
    pub(super) fn new(pool_size: usize) -> Self {
        Self::with_wait_timeout(pool_size, "300ms")
    }

    /// Like [`Self::new`], but a client waits up to `wait_timeout` (TOML duration text) for
    /// a busy pool, for tests in which one client waits for another's transaction to end.
    /// Read-your-writes is off (its WAL position queries would be in every script);
    /// `freshness.rs` tests it.
    pub(super) fn with_wait_timeout(pool_size: usize, wait_timeout: &str) -> Self {
        Self::with_config(&Self::config(pool_size, wait_timeout, "off"))
    }

    /// Like [`Self::new`] with read-your-writes on (scope `read_your_writes`): every
    /// committing write is followed by pgway's WAL position query.
    pub(super) fn with_read_your_writes(read_your_writes: &str) -> Self {
        Self::with_config(&Self::config(2, "300ms", read_your_writes))
    }

    /// [`Self::config`] of a harness made by [`Self::new`], with `lines` added to its
    /// `[pool]` table.
    pub(super) fn config_with_pool(pool_size: usize, lines: &str) -> String {
        Self::config(pool_size, "300ms", "off").replace(
            "connect_timeout = \"2s\"",
            &format!("connect_timeout = \"2s\"\n{lines}"),
        )
    }

    fn config(pool_size: usize, wait_timeout: &str, read_your_writes: &str) -> String {
        format!(
            r#"
            listen = "127.0.0.1:0"
            admin_listen = "127.0.0.1:0"
            [[users]]
            name = "app"
            password = "app-secret"
            [pool]
            size = {pool_size}
            wait_timeout = "{wait_timeout}"
            connect_timeout = "2s"
            [topology]
            kind = "static"
            nodes = ["{PRIMARY}", "{REPLICA}"]
            failover_timeout = "300ms"
            [routing]
            read_your_writes = "{read_your_writes}"
            "#
        )
    }

    /// The nodes of `config` (a static topology), primary and replica as their names say.
    pub(super) fn with_config(config: &str) -> Self {
        let config = Config::from_toml_str(config).expect("test config");
        let network = Arc::new(FakeNetwork::default());
        let mut incoming = HashMap::new();
        for addr in [PRIMARY, REPLICA] {
            let (tx, rx) = mpsc::unbounded_channel();
            network
                .listeners
                .lock()
                .expect("listeners")
                .insert(addr.to_owned(), tx);
            incoming.insert(addr, rx);
        }
        let pools = Arc::new(Pools::with_connector(
            config.pool.clone(),
            Arc::clone(&network) as Arc<dyn Connector>,
        ));
        let reloader = crate::reload::Reloader::new(
            None,
            Arc::new(crate::net::SwapConnector::new(
                Arc::clone(&network) as Arc<dyn Connector>
            )),
            config.client.max_connections,
        );
        let shared = crate::server::build_shared(
            Arc::new(config),
            pools,
            reloader,
            &TaskTracker::new(),
            &CancellationToken::new(),
        );
        shared.topology.update(PRIMARY, Role::Primary, true);
        shared.topology.update(REPLICA, Role::Replica, true);
        Self {
            shared,
            network,
            incoming,
            next_pid: AtomicI32::new(1000),
        }
    }

    /// Takes `addr` off the network: connects to it are refused from now on.
    pub(super) fn unplug(&self, addr: &str) {
        self.network
            .listeners
            .lock()
            .expect("listeners")
            .remove(addr);
    }

    /// A logged-in client with default startup settings.
    pub(super) async fn client(&self) -> TestClient {
        self.client_with(&[]).await
    }

    /// A logged-in client that sent these StartupMessage parameters.
    pub(super) async fn client_with(&self, params: &[(&str, &str)]) -> TestClient {
        let params: Vec<(String, String)> = params
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let mut settings = ClientSettings::from_startup(&params);
        super::default_target(&mut settings).expect("valid startup settings");
        let (near, far) = tokio::io::duplex(64 * 1024);
        let shared = Arc::clone(&self.shared);
        let session = tokio::spawn(async move {
            let mut greeting = BytesMut::new();
            messages::authentication(&mut greeting, 0, &[]);
            Session::new(
                &shared,
                FramedStream::new(Box::new(far)),
                "app".to_owned(),
                "app".to_owned(),
                settings,
                tracing::Span::none(),
            )
            .run(greeting)
            .await;
        });
        let mut client = TestClient {
            io: FramedStream::new(Box::new(near)),
            pid: 0,
            secret: 0,
            session,
        };
        let greeting = client.until_ready().await;
        assert_eq!(tags(&greeting), "RKZ");
        let key = &greeting[1].1;
        client.pid = i32::from_be_bytes([key[0], key[1], key[2], key[3]]);
        client.secret = i32::from_be_bytes([key[4], key[5], key[6], key[7]]);
        client
    }

    /// The next server connection pgway opens to `addr`, logged in.
    pub(super) async fn accept(&mut self, addr: &str) -> FakeServer {
        let incoming = self.incoming.get_mut(addr).expect("known node");
        let stream = crate::timer::timeout(WAIT, incoming.recv())
            .await
            .unwrap_or_else(|_| panic!("pgway opened no connection to {addr}"))
            .expect("network open");
        let pid = self.next_pid.fetch_add(1, Ordering::Relaxed);
        let mut server = FakeServer {
            io: FramedStream::new(Box::new(stream)),
            pid,
            secret: pid * 7,
            syncs: Vec::new(),
            answer_syncs: true,
        };
        let startup = crate::timer::timeout(WAIT, server.io.read_startup())
            .await
            .expect("startup in time")
            .expect("startup packet");
        assert!(startup.len() > 8, "a StartupMessage");
        let mut out = BytesMut::new();
        messages::authentication(&mut out, 0, &[]);
        messages::parameter_status(&mut out, "server_version", "15.0");
        messages::backend_key_data(&mut out, pid, pid * 7);
        messages::ready_for_query(&mut out, b'I');
        server.io.send(&mut out).await.expect("login reply");
        server
    }

    /// True if pgway has a connection to `addr` waiting that no test accepted yet.
    pub(super) fn has_pending_connection(&mut self, addr: &str) -> bool {
        let incoming = self.incoming.get_mut(addr).expect("known node");
        !incoming.is_empty()
    }

    /// `select 1` from `client` goes to a new replica connection and is answered.
    pub(super) async fn read_on_replica(&mut self, client: &mut TestClient) {
        self.read_on_new_replica_connection(client, "select 1")
            .await;
    }

    /// `sql` from `client` goes to a new replica connection, which answers it and is
    /// returned.
    pub(super) async fn read_on_new_replica_connection(
        &mut self,
        client: &mut TestClient,
        sql: &str,
    ) -> FakeServer {
        client.query(sql).await;
        let mut replica = self.accept(REPLICA).await;
        assert_eq!(replica.recv_query().await, sql);
        replica.answer_select("1", b'I').await;
        assert_eq!(tags(&client.until_ready().await), "TDCZ");
        replica
    }

    /// Opens a transaction for `client` on a new primary connection, returned: pgway
    /// answers the plain `begin` and holds it, and the transaction's first statement
    /// (`select 1`) takes the connection, where the `begin` arrives first.
    pub(super) async fn open_transaction(&mut self, client: &mut TestClient) -> FakeServer {
        client.begin_held().await;
        client.query("select 1").await;
        let mut primary = self.accept(PRIMARY).await;
        primary.first_in_transaction(client, "select 1").await;
        primary
    }

    /// Idle connections parked in the pool for `addr`.
    pub(super) fn idle(&self, addr: &str) -> usize {
        self.shared.pools.get(addr, "app", "app").idle_count()
    }
}

/// One message: its type byte and body.
pub(super) type Msg = (u8, Vec<u8>);

/// The type bytes of `messages`, as a string (`"TDCZ"`).
pub(super) fn tags(messages: &[Msg]) -> String {
    messages.iter().map(|(tag, _)| *tag as char).collect()
}

async fn read(io: &mut FramedStream, who: &str) -> Result<Msg, NetError> {
    let frame = crate::timer::timeout(WAIT, io.read_frame(crate::protocol::MAX_MESSAGE_LEN))
        .await
        .unwrap_or_else(|_| panic!("{who}: nothing arrived within {WAIT:?}"))?;
    Ok((frame[0], frame[5..].to_vec()))
}

/// The client end of a session.
pub(super) struct TestClient {
    io: FramedStream,
    /// pgway's BackendKeyData for this client.
    pub(super) pid: i32,
    pub(super) secret: i32,
    session: tokio::task::JoinHandle<()>,
}

impl TestClient {
    /// Sends raw protocol bytes (see [`wire`]).
    pub(super) async fn send(&mut self, mut bytes: BytesMut) {
        self.io.send(&mut bytes).await.expect("client send");
    }

    /// Sends a simple Query.
    pub(super) async fn query(&mut self, sql: &str) {
        self.send(wire::query(sql)).await;
    }

    /// The next message from pgway.
    pub(super) async fn recv(&mut self) -> Msg {
        read(&mut self.io, "client").await.expect("client recv")
    }

    /// Sends a plain `begin`, which pgway answers itself (CommandComplete `BEGIN`,
    /// ReadyForQuery `T`) and holds for the transaction's first statement.
    pub(super) async fn begin_held(&mut self) {
        self.query("begin").await;
        let got = self.until_ready().await;
        assert_eq!(tags(&got), "CZ");
        assert_eq!(text(&got[0].1), "BEGIN");
        assert_eq!(got[1].1, b"T");
    }

    /// Messages up to and including the next ReadyForQuery.
    pub(super) async fn until_ready(&mut self) -> Vec<Msg> {
        let mut got = Vec::new();
        loop {
            let msg = self.recv().await;
            let ready = msg.0 == b'Z';
            got.push(msg);
            if ready {
                return got;
            }
        }
    }

    /// Asserts that pgway closed the connection, after the messages it returns.
    pub(super) async fn until_closed(&mut self) -> Vec<Msg> {
        let mut got = Vec::new();
        loop {
            match read(&mut self.io, "client").await {
                Ok(msg) => got.push(msg),
                Err(NetError::Closed) => return got,
                Err(e) => panic!("client: {e}"),
            }
        }
    }

    /// Closes the client's end without a Terminate, and waits for its session to end.
    pub(super) async fn vanish(self) {
        drop(self.io);
        crate::timer::timeout(WAIT, self.session)
            .await
            .expect("session ends")
            .expect("session task");
    }

    /// Sends Terminate and waits for the session to end.
    pub(super) async fn terminate(mut self) {
        self.send(wire::frame(b'X', &[])).await;
        crate::timer::timeout(WAIT, self.session)
            .await
            .expect("session ends")
            .expect("session task");
    }
}

/// One server connection pgway opened, played by the test.
pub(super) struct FakeServer {
    io: FramedStream,
    /// The BackendKeyData it gave pgway.
    pub(super) pid: i32,
    pub(super) secret: i32,
    /// Settings-sync queries pgway sent (answered by [`Self::recv`] on its own).
    pub(super) syncs: Vec<String>,
    /// Whether [`Self::recv`] answers settings-sync queries itself.
    pub(super) answer_syncs: bool,
}

impl FakeServer {
    /// The next message from pgway. Settings-sync queries (pgway's own, `SELECT
    /// pg_catalog.set_config(...)`, `SET`, `RESET`) are answered and recorded in
    /// [`Self::syncs`] instead, unless `answer_syncs` is off.
    pub(super) async fn recv(&mut self) -> Msg {
        loop {
            let msg = self.recv_raw().await.expect("server recv");
            if self.answer_syncs && msg.0 == b'Q' && is_sync(&msg.1) {
                self.syncs.push(text(&msg.1));
                self.send(wire::complete("SET")).await;
                self.send(wire::ready(b'I')).await;
                continue;
            }
            return msg;
        }
    }

    /// The next message, as it came.
    pub(super) async fn recv_raw(&mut self) -> Result<Msg, NetError> {
        read(&mut self.io, "server").await
    }

    /// The next message, which must be a simple Query: its SQL.
    pub(super) async fn recv_query(&mut self) -> String {
        let (tag, body) = self.recv().await;
        assert_eq!(tag as char, 'Q', "expected a Query, got {}", tag as char);
        text(&body)
    }

    /// The next `n` messages.
    pub(super) async fn recv_n(&mut self, n: usize) -> Vec<Msg> {
        let mut got = Vec::with_capacity(n);
        for _ in 0..n {
            got.push(self.recv().await);
        }
        got
    }

    /// Sends raw protocol bytes (see [`wire`]).
    pub(super) async fn send(&mut self, mut bytes: BytesMut) {
        self.io.send(&mut bytes).await.expect("server send");
    }

    /// Receives the `begin` pgway held and answers it (status `T`).
    pub(super) async fn begin_received(&mut self) {
        assert_eq!(self.recv_query().await, "begin");
        self.answer("BEGIN", b'T').await;
    }

    /// Receives a held `begin` and the transaction's first statement after it, `sql` (a
    /// read `client` sent), and answers both: `client` sees only the read's answer.
    pub(super) async fn first_in_transaction(&mut self, client: &mut TestClient, sql: &str) {
        self.begin_received().await;
        assert_eq!(self.recv_query().await, sql);
        self.answer_select("1", b'T').await;
        let got = client.until_ready().await;
        assert_eq!(tags(&got), "TDCZ");
        assert_eq!(got[3].1, b"T");
    }

    /// Answers a one-row, one-column SELECT: RowDescription, DataRow, CommandComplete,
    /// ReadyForQuery with `status`.
    pub(super) async fn answer_select(&mut self, value: &str, status: u8) {
        let mut out = wire::row_description(&["?column?"]);
        out.extend_from_slice(&wire::data_row(&[value]));
        out.extend_from_slice(&wire::complete("SELECT 1"));
        out.extend_from_slice(&wire::ready(status));
        self.send(out).await;
    }

    /// Answers a command: CommandComplete `tag`, ReadyForQuery `status`.
    pub(super) async fn answer(&mut self, tag: &str, status: u8) {
        let mut out = wire::complete(tag);
        out.extend_from_slice(&wire::ready(status));
        self.send(out).await;
    }

    /// Asserts that pgway closed this connection (after any messages, which it returns).
    pub(super) async fn until_closed(&mut self) -> Vec<Msg> {
        let mut got = Vec::new();
        loop {
            match self.recv_raw().await {
                Ok(msg) => got.push(msg),
                Err(NetError::Closed) => return got,
                Err(e) => panic!("server: {e}"),
            }
        }
    }
}

fn is_sync(query: &[u8]) -> bool {
    let sql = text(query);
    sql.starts_with("SELECT pg_catalog.set_config(")
        || sql.starts_with("RESET ALL;")
        || (sql.starts_with("SET ") || sql.starts_with("RESET ")) && sql.ends_with(';')
}

/// The first `n` NUL-terminated strings of a message body (a Parse's statement name and
/// SQL, a Bind's portal and statement name).
pub(super) fn cstrings(body: &[u8], n: usize) -> Vec<String> {
    body.split(|&b| b == 0)
        .take(n)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// A NUL-terminated string body as text.
pub(super) fn text(body: &[u8]) -> String {
    String::from_utf8_lossy(body.strip_suffix(b"\0").unwrap_or(body)).into_owned()
}

/// Builders for protocol messages, both directions.
pub(super) mod wire {
    use super::*;

    /// Any message.
    pub(in crate::frontend::session) fn frame(tag: u8, body: &[u8]) -> BytesMut {
        let mut out = BytesMut::new();
        put_frame(&mut out, tag, body);
        out
    }

    fn cstr(out: &mut BytesMut, s: &str) {
        out.put_slice(s.as_bytes());
        out.put_u8(0);
    }

    /// Query.
    pub(in crate::frontend::session) fn query(sql: &str) -> BytesMut {
        let mut out = BytesMut::new();
        messages::query(&mut out, sql);
        out
    }

    /// Parse with no parameter types.
    pub(in crate::frontend::session) fn parse(name: &str, sql: &str) -> BytesMut {
        let mut out = BytesMut::new();
        messages::write_parse(
            &mut out,
            name.as_bytes(),
            sql.as_bytes(),
            &0i16.to_be_bytes(),
        );
        out
    }

    /// Bind of `statement` to `portal`, text parameters, text results.
    pub(in crate::frontend::session) fn bind(
        portal: &str,
        statement: &str,
        params: &[&str],
    ) -> BytesMut {
        let mut out = BytesMut::new();
        let start = begin_frame(&mut out, b'B');
        cstr(&mut out, portal);
        cstr(&mut out, statement);
        out.put_i16(0);
        out.put_i16(params.len() as i16);
        for p in params {
            out.put_i32(p.len() as i32);
            out.put_slice(p.as_bytes());
        }
        out.put_i16(0);
        end_frame(&mut out, start);
        out
    }

    /// Execute of `portal`, all rows.
    pub(in crate::frontend::session) fn execute(portal: &str) -> BytesMut {
        let mut out = BytesMut::new();
        let start = begin_frame(&mut out, b'E');
        cstr(&mut out, portal);
        out.put_i32(0);
        end_frame(&mut out, start);
        out
    }

    /// Describe (`kind` b'S' statement, b'P' portal).
    pub(in crate::frontend::session) fn describe(kind: u8, name: &str) -> BytesMut {
        let mut out = BytesMut::new();
        messages::write_target(&mut out, b'D', kind, name.as_bytes());
        out
    }

    /// Close (`kind` b'S' statement, b'P' portal).
    pub(in crate::frontend::session) fn close(kind: u8, name: &str) -> BytesMut {
        let mut out = BytesMut::new();
        messages::write_target(&mut out, b'C', kind, name.as_bytes());
        out
    }

    /// Sync.
    pub(in crate::frontend::session) fn sync() -> BytesMut {
        frame(b'S', &[])
    }

    /// Flush.
    pub(in crate::frontend::session) fn flush() -> BytesMut {
        frame(b'H', &[])
    }

    /// Several messages in one write.
    pub(in crate::frontend::session) fn batch(parts: &[BytesMut]) -> BytesMut {
        let mut out = BytesMut::new();
        for part in parts {
            out.extend_from_slice(part);
        }
        out
    }

    /// RowDescription of text columns.
    pub(in crate::frontend::session) fn row_description(columns: &[&str]) -> BytesMut {
        let mut out = BytesMut::new();
        let start = begin_frame(&mut out, b'T');
        out.put_i16(columns.len() as i16);
        for name in columns {
            cstr(&mut out, name);
            out.put_i32(0);
            out.put_i16(0);
            out.put_i32(25);
            out.put_i16(-1);
            out.put_i32(-1);
            out.put_i16(0);
        }
        end_frame(&mut out, start);
        out
    }

    /// DataRow of text values.
    pub(in crate::frontend::session) fn data_row(values: &[&str]) -> BytesMut {
        let mut out = BytesMut::new();
        let start = begin_frame(&mut out, b'D');
        out.put_i16(values.len() as i16);
        for v in values {
            out.put_i32(v.len() as i32);
            out.put_slice(v.as_bytes());
        }
        end_frame(&mut out, start);
        out
    }

    /// CommandComplete.
    pub(in crate::frontend::session) fn complete(tag: &str) -> BytesMut {
        let mut body = tag.as_bytes().to_vec();
        body.push(0);
        frame(b'C', &body)
    }

    /// ReadyForQuery.
    pub(in crate::frontend::session) fn ready(status: u8) -> BytesMut {
        frame(b'Z', &[status])
    }

    /// ErrorResponse.
    pub(in crate::frontend::session) fn error(
        severity: Severity,
        code: &str,
        message: &str,
    ) -> BytesMut {
        let mut out = BytesMut::new();
        messages::error_response(&mut out, severity, code, message);
        out
    }

    /// NotificationResponse.
    pub(in crate::frontend::session) fn notification(
        pid: i32,
        channel: &str,
        payload: &str,
    ) -> BytesMut {
        let mut out = BytesMut::new();
        let start = begin_frame(&mut out, b'A');
        out.put_i32(pid);
        cstr(&mut out, channel);
        cstr(&mut out, payload);
        end_frame(&mut out, start);
        out
    }

    /// CopyInResponse, text format, one column.
    pub(in crate::frontend::session) fn copy_in_response() -> BytesMut {
        let mut out = BytesMut::new();
        let start = begin_frame(&mut out, b'G');
        out.put_u8(0);
        out.put_i16(1);
        out.put_i16(0);
        end_frame(&mut out, start);
        out
    }

    /// CopyData.
    pub(in crate::frontend::session) fn copy_data(data: &str) -> BytesMut {
        frame(b'd', data.as_bytes())
    }
}

/// The SQLSTATE of an ErrorResponse body.
pub(super) fn sqlstate(msg: &Msg) -> String {
    assert_eq!(msg.0 as char, 'E', "expected an ErrorResponse");
    let mut frame = BytesMut::new();
    put_frame(&mut frame, b'E', &msg.1);
    messages::error_fields(&frame).0
}

/// The severity of an ErrorResponse body.
pub(super) fn severity(msg: &Msg) -> String {
    let mut frame = BytesMut::new();
    put_frame(&mut frame, msg.0, &msg.1);
    messages::error_severity(&frame).unwrap_or_default()
}
