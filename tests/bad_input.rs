//! Bad input from a client (issue 15, point 2), each case against real servers: pgway stays
//! up, the client gets FATAL 08P01 for a framing error or the server's own error for a bad
//! request, and every other client carries on.
//!
//! Every test keeps a *bystander* connected throughout: a client inside an open transaction
//! (so it holds a server connection the whole time) that writes a row after each case and
//! commits at the end. After each case a new client must also be served, and no server
//! connection may be left behind in a transaction or a COPY.
//!
//! Leaks show up as a pool that stops serving: pools have `size = 2` (the bystander holds
//! one) and `wait_timeout = "10s"`, so a server connection lost by one case makes the next
//! case, or the new client after it, fail with 53300.
//!
//! `tests/protocol.rs` covers the first framing cases (HTTP as the first packet, startup
//! lengths of 4, 10,001, 20,000 and 2^31-1 bytes, a truncated startup packet, oversize and
//! short messages while authenticating and when logged in, an unknown message type and a
//! truncated Query when idle). This file adds what those leave out: other garbage, whole
//! oversize startup packets, negative lengths in every phase, framing errors while the
//! client holds a server connection (in a transaction, in an unfinished batch), truncated
//! and malformed Parse messages, Bind with the wrong parameter count, a client that goes
//! away in the middle of a COPY, Terminate inside a transaction, and a client that
//! pipelines without reading.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test step that cannot go on fails the test, with its message"
)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use tokio_postgres::Client;

const SCHEMA: &str = "SET ROLE app; CREATE TABLE bad_t (id int, v text);";

/// `application_name`s of pgway's own control-plane connections (not pooled ones).
const CONTROL_APPS: &str =
    "'pgway-health', 'pgway-catalog', 'pgway-positions', 'pgway-auth-query', 'pgway_cache'";

fn be32(n: i64) -> [u8; 4] {
    (n as u32).to_be_bytes()
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// A Parse of the unnamed statement with `types` parameter type OIDs.
fn parse(sql: &str, types: &[i32]) -> Vec<u8> {
    let mut body = cat(&[b"\0", &cstr(sql), &(types.len() as i16).to_be_bytes()]);
    for t in types {
        body.extend_from_slice(&t.to_be_bytes());
    }
    message(b'P', &body)
}

/// A Bind of the unnamed statement to the unnamed portal with text parameters.
fn bind(params: &[&str]) -> Vec<u8> {
    let mut body = b"\0\0\0\0".to_vec(); // portal, statement, no parameter formats
    body.extend_from_slice(&(params.len() as i16).to_be_bytes());
    for p in params {
        body.extend_from_slice(&(p.len() as i32).to_be_bytes());
        body.extend_from_slice(p.as_bytes());
    }
    body.extend_from_slice(&0i16.to_be_bytes()); // no result formats
    message(b'B', &body)
}

fn execute() -> Vec<u8> {
    message(b'E', b"\0\0\0\0\0")
}

fn sync() -> Vec<u8> {
    message(b'S', b"")
}

fn fields_of(msgs: &[BackendMessage]) -> Vec<HashMap<u8, String>> {
    msgs.iter()
        .filter(|m| m.tag == b'E')
        .map(BackendMessage::fields)
        .collect()
}

/// The transaction status of the last ReadyForQuery in `msgs`.
fn status(msgs: &[BackendMessage]) -> char {
    msgs.last()
        .filter(|m| m.tag == b'Z')
        .map_or('?', |m| m.body[0] as char)
}

/// Sends a simple query and checks it succeeds, ending with ReadyForQuery `want`.
async fn query_ok(raw: &mut RawConn, sql: &str, want: char) {
    let msgs = raw.query(sql).await;
    assert!(
        fields_of(&msgs).is_empty() && status(&msgs) == want,
        "`{sql}`: expected success and ReadyForQuery '{want}', got errors {:?} and '{}'",
        fields_of(&msgs),
        status(&msgs)
    );
}

/// A client connected for the whole test, inside an open transaction.
struct Bystander {
    client: Client,
    pid: i32,
    rows: usize,
}

impl Bystander {
    async fn start(port: u16) -> Bystander {
        let client = connect(port, APP_USER, APP_PASSWORD).await;
        client
            .batch_execute("begin; insert into bad_t values (0, 'bystander')")
            .await
            .unwrap_or_else(|e| panic!("bystander: begin + insert: {}", describe_error(&e)));
        let pid = simple_value(&client, "select pg_backend_pid()")
            .await
            .expect("bystander: its backend pid")
            .parse()
            .expect("a pid");
        Bystander {
            client,
            pid,
            rows: 1,
        }
    }

    /// One more statement in the bystander's transaction.
    async fn check(&mut self) -> Result<(), String> {
        let n = simple_value(
            &self.client,
            "insert into bad_t values (0, 'bystander'); \
             select count(*) from bad_t where v = 'bystander'",
        )
        .await
        .map_err(|e| format!("the bystander failed: {}", describe_error(&e)))?;
        self.rows += 1;
        if n == self.rows.to_string() {
            Ok(())
        } else {
            Err(format!(
                "the bystander sees {n} of its rows, wrote {}",
                self.rows
            ))
        }
    }
}

/// A primary with [`SCHEMA`], pgway in front (pools of 2, 10 s wait), and a bystander.
struct Fixture {
    // Dropped in this order: the client, then pgway, then the servers.
    bystander: Bystander,
    gw: Gateway,
    cluster: Cluster,
}

impl Fixture {
    async fn start() -> Fixture {
        let cluster = Cluster::start_with_schema(0, SCHEMA);
        let gw = Gateway::start_with(
            &cluster,
            GatewayOptions {
                pool_size: 2,
                wait_timeout: "10s".into(),
                ..GatewayOptions::default()
            },
        );
        let bystander = Bystander::start(gw.port()).await;
        Fixture {
            cluster,
            gw,
            bystander,
        }
    }

    fn port(&self) -> u16 {
        self.gw.port()
    }

    /// Server connections (other than the bystander's and pgway's own control connections)
    /// that are not idle: a transaction or a COPY left behind.
    fn stray_backends(&self) -> String {
        self.cluster.psql_admin(
            self.cluster.primary_port(),
            &format!(
                "select coalesce(string_agg(pid || ' ' || state || ': ' || left(query, 60), '; '), '') \
                 from pg_stat_activity where backend_type = 'client backend' \
                 and usename = '{APP_USER}' and pid <> {} and state <> 'idle' \
                 and application_name not in ({CONTROL_APPS})",
                self.bystander.pid
            ),
        )
    }

    /// After a bad client: the bystander goes on, a new client is served, and no server
    /// connection is left in a transaction or a COPY.
    async fn others_carry_on(&mut self) -> Result<(), String> {
        self.bystander.check().await?;
        let client = try_connect(self.port(), APP_USER, APP_PASSWORD)
            .await
            .map_err(|e| format!("a new client could not connect: {}", describe_error(&e)))?;
        simple_value(&client, "select 'ok'")
            .await
            .map_err(|e| format!("a new client failed: {}", describe_error(&e)))?;
        drop(client);
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let stray = self.stray_backends();
            if stray.is_empty() {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(format!("server connections left behind: {stray}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Commits the bystander's transaction and checks that all its rows, and none of the
    /// bad clients' rows (`v = 'bad'`), were committed.
    async fn finish(mut self) {
        self.others_carry_on()
            .await
            .unwrap_or_else(|e| panic!("at the end: {e}"));
        self.bystander
            .client
            .simple_query("commit")
            .await
            .unwrap_or_else(|e| panic!("bystander: commit: {}", describe_error(&e)));
        let counts = self.cluster.psql_admin(
            self.cluster.primary_port(),
            "select count(*) filter (where v = 'bystander') || ' ' || \
             count(*) filter (where v = 'bad') from bad_t",
        );
        assert_eq!(
            counts,
            format!("{} 0", self.bystander.rows),
            "committed rows: bystander's, bad clients'"
        );
    }
}

/// Where a bad message is sent.
#[derive(Clone, Copy, Debug)]
enum Phase {
    /// Right after connecting (the first packet).
    Connected,
    /// After the StartupMessage for this user, once pgway asked for a password.
    AwaitingPassword(&'static str),
    /// Logged in, idle.
    LoggedIn,
    /// Inside a transaction that inserted a row (the client holds a server connection).
    InTransaction,
    /// Inside a transaction, after Parse/Bind/Execute of an insert without Sync.
    MidBatch,
    /// Inside a transaction, in COPY FROM STDIN after one CopyData.
    InCopy,
}

/// A framing error: the client must get FATAL 08P01 and be disconnected.
struct Framing {
    name: &'static str,
    phase: Phase,
    bytes: Vec<u8>,
    /// Close our write side after sending (pgway sees EOF in the middle of a message).
    half_close: bool,
}

impl Framing {
    fn new(name: &'static str, phase: Phase, bytes: Vec<u8>) -> Framing {
        Framing {
            name,
            phase,
            bytes,
            half_close: false,
        }
    }

    fn half_closed(mut self) -> Framing {
        self.half_close = true;
        self
    }
}

/// Opens a connection and brings it to `phase`.
async fn reach(port: u16, phase: Phase) -> Result<RawConn, String> {
    Ok(match phase {
        Phase::Connected => RawConn::connect(port).await,
        Phase::AwaitingPassword(user) => RawConn::awaiting_password(port, user).await?,
        Phase::LoggedIn => RawConn::login(port, APP_USER, APP_PASSWORD).await,
        Phase::InTransaction | Phase::MidBatch | Phase::InCopy => {
            let mut raw = RawConn::login(port, APP_USER, APP_PASSWORD).await;
            query_ok(&mut raw, "begin; insert into bad_t values (1, 'bad')", 'T').await;
            if matches!(phase, Phase::MidBatch) {
                let batch = cat(&[
                    &parse("insert into bad_t values ($1, 'bad')", &[23]),
                    &bind(&["2"]),
                    &execute(),
                ]);
                raw.send(&batch).await;
            }
            if matches!(phase, Phase::InCopy) {
                raw.send_message(b'Q', b"copy bad_t from stdin\0").await;
                let m = raw.recv_message().await;
                if m.tag != b'G' {
                    return Err(format!("expected CopyInResponse, got {m:?}"));
                }
                raw.send_message(b'd', b"3\tbad\n").await;
            }
            raw
        }
    })
}

async fn try_framing(port: u16, case: &Framing) -> Result<(), String> {
    let mut raw = reach(port, case.phase).await?;
    raw.send(&case.bytes).await;
    if case.half_close {
        raw.shutdown_write().await;
    }
    let fields = raw.expect_error_then_close().await?;
    let code = fields.get(&b'C').map_or("none", String::as_str);
    let severity = fields
        .get(&b'V')
        .or_else(|| fields.get(&b'S'))
        .map_or("none", String::as_str);
    if (severity, code) == ("FATAL", "08P01") {
        Ok(())
    } else {
        Err(format!(
            "expected FATAL 08P01, got {severity} {code} ({:?})",
            fields.get(&b'M')
        ))
    }
}

/// Runs every case against one gateway, checking after each that the others carry on;
/// reports all failures together.
async fn check_framing(cases: Vec<Framing>) {
    let mut fx = Fixture::start().await;
    let mut failures = Vec::new();
    for case in &cases {
        let result = tokio::time::timeout(WAIT, try_framing(fx.port(), case))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {WAIT:?}")));
        if let Err(e) = result {
            failures.push(format!("{} ({:?}): {e}", case.name, case.phase));
        }
        if let Err(e) = fx.others_carry_on().await {
            failures.push(format!("after {}: {e}", case.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} problem(s) with bad input:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
    fx.finish().await;
}

/// A StartupMessage of exactly `len` bytes (user, database and a padded `application_name`).
fn startup_of_len(len: usize) -> Vec<u8> {
    let base = startup_message(&[
        ("user", APP_USER),
        ("database", DB),
        ("application_name", ""),
    ]);
    let pad = "x".repeat(len - base.len());
    let msg = startup_message(&[
        ("user", APP_USER),
        ("database", DB),
        ("application_name", &pad),
    ]);
    assert_eq!(msg.len(), len);
    msg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_bad_lengths_before_login_get_fatal_08p01() {
    use Phase::*;
    let v3 = be32(PROTOCOL_3_0 as i64);
    // The first bytes of a TLS 1.2 ClientHello, as a client that skipped the SSLRequest
    // sends: its "length" is 0x16030100, about 369 MB.
    let client_hello = [
        0x16, 0x03, 0x01, 0x00, 0xf4, 0x01, 0x00, 0x00, 0xf0, 0x03, 0x03,
    ];
    check_framing(vec![
        Framing::new(
            "garbage: a TLS ClientHello",
            Connected,
            client_hello.to_vec(),
        ),
        Framing::new("garbage: 16 zero bytes", Connected, vec![0; 16]),
        Framing::new("garbage: 16 bytes 0xff", Connected, vec![0xff; 16]),
        Framing::new(
            "garbage: a line of text",
            Connected,
            b"hello pgway\n".to_vec(),
        ),
        Framing::new(
            "a whole startup packet of 10,001 bytes",
            Connected,
            startup_of_len(10_001),
        ),
        Framing::new(
            "a whole startup packet of 12,000 bytes",
            Connected,
            startup_of_len(12_000),
        ),
        Framing::new("startup length -1", Connected, cat(&[&be32(-1), &v3])),
        Framing::new(
            "startup length i32::MIN",
            Connected,
            cat(&[&be32(i32::MIN.into()), &v3]),
        ),
        Framing::new(
            "startup length 1 GiB + 1",
            Connected,
            cat(&[&be32((1 << 30) + 1), &v3]),
        ),
        Framing::new(
            "PasswordMessage length -1 (SCRAM)",
            AwaitingPassword(APP_USER),
            cat(&[b"p", &be32(-1)]),
        ),
        Framing::new(
            "PasswordMessage length 1 GiB + 1 (md5)",
            AwaitingPassword(MD5_USER),
            cat(&[b"p", &be32((1 << 30) + 1)]),
        ),
        Framing::new(
            "PasswordMessage length i32::MIN (md5)",
            AwaitingPassword(MD5_USER),
            cat(&[b"p", &be32(i32::MIN.into())]),
        ),
        Framing::new(
            "unknown message type instead of a password",
            AwaitingPassword(MD5_USER),
            message(b'z', b"md5\0"),
        ),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_lengths_and_unknown_types_after_login_get_fatal_08p01() {
    use Phase::*;
    let mut cases = Vec::new();
    for phase in [LoggedIn, InTransaction, MidBatch] {
        cases.extend([
            Framing::new("Query length -1", phase, cat(&[b"Q", &be32(-1)])),
            Framing::new(
                "Query length i32::MIN",
                phase,
                cat(&[b"Q", &be32(i32::MIN.into())]),
            ),
            Framing::new(
                "Sync length 1 GiB + 1",
                phase,
                cat(&[b"S", &be32((1 << 30) + 1)]),
            ),
            Framing::new("unknown message type 'z'", phase, message(b'z', b"")),
            Framing::new("unknown message type 0x00", phase, message(0, b"abc")),
            Framing::new(
                "a PasswordMessage after login",
                phase,
                message(b'p', b"app-secret\0"),
            ),
        ]);
    }
    cases.extend([
        Framing::new(
            "unknown message type 'z' in COPY",
            InCopy,
            message(b'z', b""),
        ),
        Framing::new("a Query in COPY", InCopy, message(b'Q', b"select 1\0")),
        Framing::new(
            "CopyData length -1 in COPY",
            InCopy,
            cat(&[b"d", &be32(-1)]),
        ),
        Framing::new(
            "CopyData length 1 GiB + 1 in COPY",
            InCopy,
            cat(&[b"d", &be32((1 << 30) + 1)]),
        ),
        Framing::new(
            "truncated Query in a transaction (100 bytes announced, 10 sent, then EOF)",
            InTransaction,
            cat(&[b"Q", &be32(100), b"select 1 f"]),
        )
        .half_closed(),
    ]);
    check_framing(cases).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_and_malformed_extended_messages_get_fatal_08p01() {
    use Phase::*;
    let mut cases = Vec::new();
    for phase in [LoggedIn, InTransaction] {
        cases.extend([
            Framing::new(
                "Parse announcing 100 bytes, 20 sent, then EOF",
                phase,
                cat(&[b"P", &be32(100), b"\0select 1\0\0\0xxxxxxx"]),
            )
            .half_closed(),
            Framing::new(
                "Parse announcing 5 bytes more than its body (it swallows the Sync after it), \
                 then another Sync",
                phase,
                cat(&[&swallowing_parse(), &sync()]),
            ),
            Framing::new(
                "Parse whose statement name has no NUL",
                phase,
                cat(&[&message(b'P', b"stmt"), &sync()]),
            ),
            Framing::new(
                "Parse whose SQL has no NUL",
                phase,
                cat(&[&message(b'P', b"s1\0select 1"), &sync()]),
            ),
            Framing::new(
                "Parse without its parameter type count",
                phase,
                cat(&[&message(b'P', b"s1\0select 1\0"), &sync()]),
            ),
            Framing::new(
                "Parse announcing 3 parameter types, holding 1",
                phase,
                cat(&[&message(b'P', b"s1\0select $1\0\0\x03\0\0\0\x17"), &sync()]),
            ),
            Framing::new(
                "Parse with a negative parameter type count",
                phase,
                cat(&[&message(b'P', b"s1\0select 1\0\xff\xff"), &sync()]),
            ),
            Framing::new(
                "Parse with an empty body",
                phase,
                cat(&[&message(b'P', b""), &sync()]),
            ),
            Framing::new(
                "Bind whose portal name has no NUL",
                phase,
                cat(&[&parse("select 1", &[]), &message(b'B', b"portal"), &sync()]),
            ),
            Framing::new(
                "Describe of an unknown kind 'X'",
                phase,
                cat(&[&parse("select 1", &[]), &message(b'D', b"X\0"), &sync()]),
            ),
            Framing::new(
                "Close without its name",
                phase,
                cat(&[&message(b'C', b"S"), &sync()]),
            ),
            Framing::new(
                "Execute announcing 5 bytes more than its body (it swallows the Sync after \
                 it)",
                phase,
                cat(&[
                    &parse("select 1", &[]),
                    &bind(&[]),
                    b"E",
                    &be32(4 + 5 + 5),
                    b"\0\0\0\0\0",
                    &sync(),
                ]),
            ),
            Framing::new(
                "Sync with a body",
                phase,
                cat(&[&parse("select 1", &[]), &message(b'S', b"x")]),
            ),
            Framing::new(
                "Query with bytes after its string",
                phase,
                message(b'Q', b"select 1\0select 2\0"),
            ),
        ]);
    }
    check_framing(cases).await;
}

/// A Parse whose length covers the Sync sent after it: its body ends in 5 bytes that are
/// no parameter type.
fn swallowing_parse() -> Vec<u8> {
    cat(&[b"P", &be32(4 + 12 + 5), b"\0select 1\0\0\0", &sync()])
}

// PostgreSQL reports a malformed message as soon as it has read it; so does pgway, though
// it collects an extended-protocol batch until Sync or Flush: a client whose broken Parse
// swallowed its Sync hears of it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_parse_is_reported_without_waiting_for_sync() {
    let fx = Fixture::start().await;
    let mut raw = RawConn::login(fx.port(), APP_USER, APP_PASSWORD).await;
    raw.send(&swallowing_parse()).await;
    let fields = raw
        .expect_error_then_close()
        .await
        .unwrap_or_else(|e| panic!("a Parse that swallowed its Sync: {e}"));
    assert_eq!(class(&fields), ("FATAL", "08P01"), "{fields:?}");
    fx.finish().await;
}

/// What a client hears after a Parse and a Bind whose length swallowed the Sync sent after
/// it (no other message follows), then after an Execute and a Sync and after a query: the
/// tags, and the error's class.
async fn after_a_swallowing_bind(port: u16) -> (Vec<u8>, (String, String), Vec<u8>) {
    let mut raw = RawConn::login(port, APP_USER, APP_PASSWORD).await;
    let body = bind(&["41"])[5..].to_vec();
    let swallowing = cat(&[b"B", &be32(4 + body.len() as i64 + 5), &body, &sync()]);
    raw.send(&cat(&[&parse("select $1::int + 1", &[23]), &swallowing]))
        .await;
    let mut heard = Vec::new();
    let fields = loop {
        let m = raw.recv_message().await;
        heard.push(m.tag);
        if m.tag == b'E' {
            break fields_of(&[m]).remove(0);
        }
    };
    let (severity, code) = class(&fields);
    let error = (severity.to_string(), code.to_string());
    // The server skips the Execute (its Bind failed) up to the Sync.
    raw.send(&cat(&[&execute(), &sync()])).await;
    let mut then: Vec<u8> = raw.until_ready().await.iter().map(|m| m.tag).collect();
    let answer = raw.query("select 'usable'").await;
    assert!(fields_of(&answer).is_empty(), "{port}: then {answer:?}");
    then.extend(answer.iter().map(|m| m.tag));
    (heard, error, then)
}

// A Bind is the server's to check, so pgway lets PostgreSQL refuse it; PostgreSQL does so as
// soon as it has read it. A client whose broken Bind swallowed its Sync hears the same
// ERROR from pgway at once, and its session goes on after the next Sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_bind_is_answered_without_waiting_for_sync_as_postgres_does() {
    let mut fx = Fixture::start().await;
    let direct = after_a_swallowing_bind(fx.cluster.primary_port()).await;
    assert_eq!(
        direct,
        (
            b"1E".to_vec(),
            ("ERROR".to_string(), "08P01".to_string()),
            b"ZTDCZ".to_vec()
        ),
        "PostgreSQL itself"
    );
    let through_pgway = after_a_swallowing_bind(fx.port()).await;
    assert_eq!(through_pgway, direct, "through pgway");
    fx.others_carry_on()
        .await
        .unwrap_or_else(|e| panic!("after the swallowing Bind: {e}"));
    fx.finish().await;
}

/// Sends `batch` (ending with Sync) and returns the single error's fields and the
/// ReadyForQuery status.
async fn batch_error(raw: &mut RawConn, batch: &[u8]) -> (HashMap<u8, String>, char) {
    raw.send(batch).await;
    let msgs = raw.until_ready().await;
    let errs = fields_of(&msgs);
    assert_eq!(errs.len(), 1, "expected one ErrorResponse: {msgs:?}");
    (errs[0].clone(), status(&msgs))
}

/// `(severity, SQLSTATE)` of an error.
fn class(fields: &HashMap<u8, String>) -> (&str, &str) {
    (
        fields
            .get(&b'V')
            .or_else(|| fields.get(&b'S'))
            .map_or("none", String::as_str),
        fields.get(&b'C').map_or("none", String::as_str),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_with_the_wrong_parameter_count_gets_the_servers_08p01() {
    let mut fx = Fixture::start().await;
    let mut raw = RawConn::login(fx.port(), APP_USER, APP_PASSWORD).await;
    let select = parse("select $1::int + 1", &[23]);

    // Too many, too few, and a count larger than the values sent: PostgreSQL's own error
    // ("bind message supplies 2 parameters, but prepared statement "" requires 1",
    // "insufficient data left in message"), ERROR not FATAL, and the session goes on.
    let too_many = cat(&[&select, &bind(&["1", "2"]), &execute(), &sync()]);
    let too_few = cat(&[&select, &bind(&[]), &execute(), &sync()]);
    let mut short = b"\0\0\0\0\0\x02\0\0\0\x011".to_vec(); // 2 parameters, 1 value
    short.extend_from_slice(&0i16.to_be_bytes());
    let missing_value = cat(&[&select, &message(b'B', &short), &execute(), &sync()]);
    for (name, batch) in [
        ("2 parameters for 1", &too_many),
        ("0 parameters for 1", &too_few),
        ("a count of 2 with 1 value", &missing_value),
    ] {
        let (fields, st) = batch_error(&mut raw, batch).await;
        assert_eq!(class(&fields), ("ERROR", "08P01"), "{name}: {fields:?}");
        assert_eq!(st, 'I', "{name}: ReadyForQuery after the error");
        let msgs = raw.query("select 'usable'").await;
        assert!(fields_of(&msgs).is_empty(), "{name}: then {msgs:?}");
        fx.others_carry_on()
            .await
            .unwrap_or_else(|e| panic!("after {name}: {e}"));
    }

    // A named statement, prepared in one batch and bound wrongly in the next.
    let named = message(b'P', b"s1\0select $1::int, $2::text\0\0\0");
    raw.send(&cat(&[&named, &sync()])).await;
    let msgs = raw.until_ready().await;
    assert!(fields_of(&msgs).is_empty(), "Parse s1: {msgs:?}");
    let mut one = b"\0s1\0\0\0\0\x01\0\0\0\x017".to_vec();
    one.extend_from_slice(&0i16.to_be_bytes());
    let (fields, _) =
        batch_error(&mut raw, &cat(&[&message(b'B', &one), &execute(), &sync()])).await;
    assert_eq!(class(&fields), ("ERROR", "08P01"), "bind s1: {fields:?}");
    let mut two = b"\0s1\0\0\0\0\x02\0\0\0\x017\0\0\0\x01x".to_vec();
    two.extend_from_slice(&0i16.to_be_bytes());
    raw.send(&cat(&[&message(b'B', &two), &execute(), &sync()]))
        .await;
    let msgs = raw.until_ready().await;
    assert!(
        fields_of(&msgs).is_empty() && msgs.iter().any(|m| m.tag == b'D'),
        "s1 bound rightly after the error: {msgs:?}"
    );

    // Inside a transaction: the error aborts it (ReadyForQuery 'E'), ROLLBACK ends it, and
    // nothing it wrote is committed.
    query_ok(&mut raw, "begin; insert into bad_t values (1, 'bad')", 'T').await;
    let insert = parse("insert into bad_t values ($1, 'bad')", &[23]);
    let (fields, st) = batch_error(
        &mut raw,
        &cat(&[&insert, &bind(&["1", "2", "3"]), &execute(), &sync()]),
    )
    .await;
    assert_eq!(
        class(&fields),
        ("ERROR", "08P01"),
        "in a transaction: {fields:?}"
    );
    assert_eq!(st, 'E', "ReadyForQuery after an error in a transaction");
    query_ok(&mut raw, "rollback", 'I').await;
    query_ok(&mut raw, "select 1", 'I').await;
    fx.finish().await;
}

/// How a client in the middle of COPY FROM STDIN goes away.
#[derive(Clone, Copy, Debug)]
enum Leave {
    /// The socket is closed (our side dropped).
    Drop,
    /// We close our write side and read until pgway closes.
    HalfClose,
    /// Half of a CopyData message, then the socket is closed.
    MidMessage,
    /// A Terminate message instead of CopyDone.
    Terminate,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_copy_commits_nothing_and_leaks_no_server_connection() {
    let mut fx = Fixture::start().await;
    // Each way twice: with one free server connection in the pool (the bystander holds
    // the other), a connection lost by one round makes the next one wait and fail.
    for leave in [
        Leave::Drop,
        Leave::HalfClose,
        Leave::MidMessage,
        Leave::Terminate,
    ]
    .into_iter()
    .flat_map(|l| [l, l])
    {
        let mut raw = RawConn::login(fx.port(), APP_USER, APP_PASSWORD).await;
        raw.send_message(b'Q', b"copy bad_t from stdin\0").await;
        let m = raw.recv_message().await;
        assert_eq!(m.tag, b'G', "{leave:?}: expected CopyInResponse, got {m:?}");
        for i in 0..100 {
            raw.send_message(b'd', format!("{i}\tbad\n").as_bytes())
                .await;
        }
        match leave {
            Leave::Drop => drop(raw),
            Leave::HalfClose => {
                raw.shutdown_write().await;
                // pgway may say why it closes (08P01: the client vanished mid-COPY); it
                // must close.
                let end = loop {
                    match raw.recv().await {
                        Ok(m) if matches!(m.tag, b'E' | b'N') => continue,
                        other => break other,
                    }
                };
                assert!(
                    matches!(end, Err(RawEnd::Eof | RawEnd::Reset)),
                    "{leave:?}: expected pgway to close, got {end:?}"
                );
            }
            Leave::MidMessage => {
                raw.send(&cat(&[b"d", &be32(100), b"7\tbad"])).await;
                drop(raw);
            }
            Leave::Terminate => {
                raw.send_message(b'X', b"").await;
                let end = loop {
                    match raw.recv().await {
                        Ok(m) if matches!(m.tag, b'E' | b'N') => continue,
                        other => break other,
                    }
                };
                assert!(
                    matches!(end, Err(RawEnd::Eof | RawEnd::Reset)),
                    "{leave:?}: expected pgway to close, got {end:?}"
                );
            }
        }
        fx.others_carry_on()
            .await
            .unwrap_or_else(|e| panic!("after leaving mid-COPY by {leave:?}: {e}"));
    }
    fx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_inside_a_transaction_rolls_it_back() {
    let mut fx = Fixture::start().await;
    let insert = parse("insert into bad_t values ($1, 'bad')", &[23]);
    // Each case twice, with one free server connection (see the COPY test).
    let cases: [(&str, Vec<u8>); 4] = [
        ("after an insert", Vec::new()),
        (
            "in an aborted transaction",
            cat(&[&message(b'Q', b"select 1/0\0")]),
        ),
        (
            "after an unsynced Parse/Bind/Execute",
            cat(&[&insert, &bind(&["5"]), &execute()]),
        ),
        (
            "after a flushed Parse/Bind/Execute",
            cat(&[&insert, &bind(&["6"]), &execute(), &message(b'H', b"")]),
        ),
    ];
    for (name, before) in cases.iter().flat_map(|c| [c, c]) {
        let mut raw = RawConn::login(fx.port(), APP_USER, APP_PASSWORD).await;
        query_ok(&mut raw, "begin; insert into bad_t values (1, 'bad')", 'T').await;
        let pid: i32 = {
            let msgs = raw.query("select pg_backend_pid()").await;
            let row = msgs.iter().find(|m| m.tag == b'D').expect("a DataRow");
            // DataRow: i16 column count, i32 length, value.
            String::from_utf8_lossy(&row.body[6..])
                .parse()
                .expect("a pid")
        };
        raw.send(before).await;
        if before.starts_with(b"Q") {
            let msgs = raw.until_ready().await;
            assert_eq!(status(&msgs), 'E', "{name}: {msgs:?}");
        }
        if before.ends_with(&message(b'H', b"")) {
            // Flush: the insert ran (ParseComplete, BindComplete, CommandComplete).
            for want in [b'1', b'2', b'C'] {
                let m = raw.recv_message().await;
                assert_eq!(m.tag, want, "{name}: {m:?}");
            }
        }
        raw.send_message(b'X', b"").await;
        let end = raw.recv().await;
        assert!(
            matches!(end, Err(RawEnd::Eof | RawEnd::Reset)),
            "{name}: expected the connection to close after Terminate, got {end:?}"
        );
        fx.others_carry_on()
            .await
            .unwrap_or_else(|e| panic!("after Terminate {name}: {e}"));
        let state = fx.cluster.psql_admin(
            fx.cluster.primary_port(),
            &format!("select coalesce(max(state), 'gone') from pg_stat_activity where pid = {pid}"),
        );
        assert!(
            state == "idle" || state == "gone",
            "{name}: the server connection of the terminated client is {state}"
        );
    }
    fx.finish().await;
}

/// Resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_without_reading_is_bounded_and_blocks_no_one() {
    let cluster = Cluster::start_with_schema(0, SCHEMA);
    // Pools of 4: the bystander holds one, each client that does not read at most one,
    // and the others are served by the fourth.
    let mut gw = GatewayProcess::start(
        &cluster,
        &GatewayOptions {
            pool_size: 4,
            wait_timeout: "10s".into(),
            ..GatewayOptions::default()
        },
    );
    gw.wait_ready(&cluster).await;
    let mut bystander = Bystander::start(gw.port()).await;
    let before = rss(gw.pid());

    // Two clients that pipeline queries and never read. One sends 2,000 queries of 20 MB
    // results each (40 GB if pgway buffered them); the other 200,000 small ones, so that
    // pgway has to stop reading it too (its writer blocks then, which is the point).
    let mut big = RawConn::login(gw.port(), APP_USER, APP_PASSWORD).await;
    let mut small = RawConn::login(gw.port(), APP_USER, APP_PASSWORD).await;
    let big_query = message(
        b'Q',
        b"select repeat('x', 1000) from generate_series(1, 20000)\0",
    );
    let small_query = message(b'Q', b"select 1\0");
    let writers = [
        tokio::spawn(async move {
            let chunk = big_query.repeat(100);
            for _ in 0..20 {
                big.send(&chunk).await;
            }
            big
        }),
        tokio::spawn(async move {
            let chunk = small_query.repeat(1000);
            for _ in 0..200 {
                small.send(&chunk).await;
            }
            small
        }),
    ];

    // The backpressure reaches the server: its backend waits to write to pgway.
    let primary = cluster.primary_port();
    eventually(
        "the server to block writing results pgway does not read",
        WAIT,
        async || {
            let waiting = try_psql(
                primary,
                DB,
                "select count(*) from pg_stat_activity \
                 where wait_event = 'ClientWrite' and query like 'select repeat%'",
            )?;
            if waiting == "1" {
                Ok(())
            } else {
                Err(format!("{waiting} backends in ClientWrite"))
            }
        },
    )
    .await;

    // Others are served meanwhile: the bystander (in its transaction), a new client, and
    // a write that needs a primary connection.
    bystander
        .check()
        .await
        .unwrap_or_else(|e| panic!("while a client does not read: {e}"));
    let other = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    other
        .batch_execute("insert into bad_t values (9, 'other'); delete from bad_t where id = 9")
        .await
        .unwrap_or_else(|e| panic!("a new client: {}", describe_error(&e)));

    // pgway's memory stays bounded however long the client keeps not reading.
    let mut peak = 0;
    for _ in 0..20 {
        peak = peak.max(rss(gw.pid()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let grown = peak.saturating_sub(before);
    eprintln!(
        "pgway resident memory: {} MiB before, {} MiB peak with a client not reading \
         (+{} MiB)",
        before >> 20,
        peak >> 20,
        grown >> 20
    );
    assert!(
        grown < 64 << 20,
        "pgway grew by {} MiB for a client that does not read",
        grown >> 20
    );

    // The client goes away: its server connection comes back, pgway stays up.
    for writer in writers {
        writer.abort();
        let _ = writer.await;
    }
    eventually(
        "the server connection of the gone client to be free",
        WAIT,
        async || {
            let stray = try_psql(
                primary,
                DB,
                &format!(
                    "select count(*) from pg_stat_activity where backend_type = 'client backend' \
                 and usename = 'app' and state <> 'idle' and pid <> {} \
                 and application_name not in ({CONTROL_APPS})",
                    bystander.pid
                ),
            )?;
            if stray == "0" {
                Ok(())
            } else {
                Err(format!("{stray} busy server connections"))
            }
        },
    )
    .await;
    for _ in 0..4 {
        let c = connect(gw.port(), APP_USER, APP_PASSWORD).await;
        c.batch_execute("begin; select pg_sleep(0.01); commit")
            .await
            .unwrap_or_else(|e| panic!("after the client left: {}", describe_error(&e)));
    }
    bystander
        .check()
        .await
        .unwrap_or_else(|e| panic!("at the end: {e}"));
    bystander
        .client
        .simple_query("commit")
        .await
        .expect("bystander: commit");
    assert!(
        gw.log().lines().all(|l| !l.contains("panicked")),
        "pgway panicked:\n{}",
        gw.log()
    );
}
