//! The wire protocol relay: bad input (ErrorResponse 08P01, then close, other clients
//! unaffected), COPY both ways, the extended query protocol, notices, notifications, errors,
//! large messages and query cancellation.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test step that cannot go on fails the test, with its message"
)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, NoTls};

/// One piece of bad input and what to do before sending it.
struct BadInput {
    name: &'static str,
    /// `None`: send right after connecting. `Some(user)`: after the startup message for
    /// `user`, once pgway has asked for a password. Post-login cases use [`RawConn::login`].
    phase: Phase,
    bytes: Vec<u8>,
    /// Close our write side after sending (the server sees EOF mid-message).
    half_close: bool,
    /// SQLSTATEs accepted in the ErrorResponse.
    codes: &'static [&'static str],
}

#[derive(Clone, Copy)]
enum Phase {
    Connected,
    AwaitingPassword(&'static str),
    LoggedIn,
}

fn be32(n: i64) -> [u8; 4] {
    (n as u32).to_be_bytes()
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// Sends `case` on a fresh connection and returns what went wrong, if anything.
async fn try_bad_input(port: u16, case: &BadInput) -> Result<(), String> {
    let mut raw = match case.phase {
        Phase::Connected => RawConn::connect(port).await,
        Phase::AwaitingPassword(user) => RawConn::awaiting_password(port, user).await?,
        Phase::LoggedIn => RawConn::login(port, APP_USER, APP_PASSWORD).await,
    };
    raw.send(&case.bytes).await;
    if case.half_close {
        raw.shutdown_write().await;
    }
    let fields = raw.expect_error_then_close().await?;
    let code = fields.get(&b'C').cloned().unwrap_or_default();
    if case.codes.contains(&code.as_str()) {
        Ok(())
    } else {
        Err(format!(
            "expected SQLSTATE {:?}, got {code} ({:?})",
            case.codes,
            fields.get(&b'M')
        ))
    }
}

/// Runs every case, checking after each that an already-connected client and a new client
/// still work, and reports all failures together.
async fn check_bad_inputs(cases: Vec<BadInput>) {
    let cluster = Cluster::start(0);
    let gw = Gateway::start(&cluster);
    let bystander = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    let mut failures = Vec::new();
    for case in &cases {
        if let Err(e) = try_bad_input(gw.port(), case).await {
            failures.push(format!("{}: {e}", case.name));
        }
        if let Err(e) = try_served_by(&bystander).await {
            failures.push(format!(
                "after {}: an already-connected client failed: {}",
                case.name,
                describe_error(&e)
            ));
        }
        match try_connect(gw.port(), APP_USER, APP_PASSWORD).await {
            Ok(c) => {
                if let Err(e) = try_served_by(&c).await {
                    failures.push(format!(
                        "after {}: a new client failed: {}",
                        case.name,
                        describe_error(&e)
                    ));
                }
            }
            Err(e) => failures.push(format!(
                "after {}: a new client could not connect: {}",
                case.name,
                describe_error(&e)
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} problem(s) with bad input:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

const PROTOCOL_VIOLATION: &[&str] = &["08P01"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_startup_input_gets_08p01_and_the_connection_is_closed() {
    let v3 = be32(PROTOCOL_3_0 as i64);
    check_bad_inputs(vec![
        BadInput {
            name: "startup packet of 20000 bytes (limit 10000)",
            phase: Phase::Connected,
            bytes: cat(&[&be32(20_000), &v3]),
            half_close: false,
            codes: PROTOCOL_VIOLATION,
        },
        BadInput {
            name: "startup packet of 10001 bytes (limit 10000)",
            phase: Phase::Connected,
            bytes: cat(&[&be32(10_001), &v3]),
            half_close: false,
            codes: PROTOCOL_VIOLATION,
        },
        BadInput {
            name: "startup packet of 2 GiB",
            phase: Phase::Connected,
            bytes: cat(&[&be32(0x7fff_ffff), &v3]),
            half_close: false,
            codes: PROTOCOL_VIOLATION,
        },
        BadInput {
            name: "startup length 4 (below the minimum)",
            phase: Phase::Connected,
            bytes: be32(4).to_vec(),
            half_close: false,
            codes: PROTOCOL_VIOLATION,
        },
        BadInput {
            name: "garbage: an HTTP request",
            phase: Phase::Connected,
            bytes: b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            half_close: false,
            codes: PROTOCOL_VIOLATION,
        },
        BadInput {
            name: "garbage: unknown protocol code",
            phase: Phase::Connected,
            bytes: cat(&[&be32(8), &[0xde, 0xad, 0xbe, 0xef]]),
            half_close: false,
            // PostgreSQL itself answers an unsupported protocol version with 0A000.
            codes: &["08P01", "0A000"],
        },
        BadInput {
            name: "startup parameters without their terminating NUL",
            phase: Phase::Connected,
            bytes: cat(&[&be32(16), &v3, b"user\0app"]),
            half_close: false,
            codes: PROTOCOL_VIOLATION,
        },
        BadInput {
            name: "truncated startup packet (100 bytes announced, 20 sent, then EOF)",
            phase: Phase::Connected,
            bytes: cat(&[&be32(100), &v3, b"user\0app\0database"]),
            half_close: true,
            codes: PROTOCOL_VIOLATION,
        },
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_during_authentication_gets_08p01() {
    check_bad_inputs(vec![
        BadInput {
            name: "SASLInitialResponse with length 0x7fffffff (over 1 GiB)",
            phase: Phase::AwaitingPassword(APP_USER),
            bytes: cat(&[b"p", &be32(0x7fff_ffff)]),
            half_close: false,
            codes: PROTOCOL_VIOLATION,
        },
        BadInput {
            name: "truncated PasswordMessage (100 bytes announced, 10 sent, then EOF)",
            phase: Phase::AwaitingPassword(MD5_USER),
            bytes: cat(&[b"p", &be32(100), b"md5abcdef0"]),
            half_close: true,
            codes: PROTOCOL_VIOLATION,
        },
        BadInput {
            name: "a Query instead of the SASL response",
            phase: Phase::AwaitingPassword(APP_USER),
            bytes: message(b'Q', b"select 1\0"),
            half_close: false,
            codes: PROTOCOL_VIOLATION,
        },
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_after_login_get_08p01() {
    check_bad_inputs(vec![
        BadInput {
            name: "Query with length 0x7fffffff (over 1 GiB)",
            phase: Phase::LoggedIn,
            bytes: cat(&[b"Q", &be32(0x7fff_ffff)]),
            half_close: false,
            codes: PROTOCOL_VIOLATION,
        },
        BadInput {
            name: "Query with length 1 GiB + 1",
            phase: Phase::LoggedIn,
            bytes: cat(&[b"Q", &be32((1 << 30) + 1)]),
            half_close: false,
            codes: PROTOCOL_VIOLATION,
        },
        BadInput {
            name: "Query with length 2 (below the minimum 4)",
            phase: Phase::LoggedIn,
            bytes: cat(&[b"Q", &be32(2)]),
            half_close: false,
            codes: PROTOCOL_VIOLATION,
        },
        BadInput {
            name: "unknown message type 'z'",
            phase: Phase::LoggedIn,
            bytes: message(b'z', b""),
            half_close: false,
            codes: PROTOCOL_VIOLATION,
        },
        BadInput {
            name: "garbage bytes",
            phase: Phase::LoggedIn,
            // Type 0xff with a negative length.
            bytes: vec![0xff; 16],
            half_close: false,
            codes: PROTOCOL_VIOLATION,
        },
        BadInput {
            name: "truncated Query (100 bytes announced, 10 sent, then EOF)",
            phase: Phase::LoggedIn,
            bytes: cat(&[b"Q", &be32(100), b"select 1 f"]),
            half_close: true,
            codes: PROTOCOL_VIOLATION,
        },
    ])
    .await;
}

/// The text of every CopyData message, and the CommandComplete tags.
fn copy_text(msgs: &[BackendMessage]) -> (String, Vec<String>) {
    let data = msgs
        .iter()
        .filter(|m| m.tag == b'd')
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect();
    let tags = msgs
        .iter()
        .filter(|m| m.tag == b'C')
        .map(|m| {
            String::from_utf8_lossy(&m.body)
                .trim_end_matches('\0')
                .to_string()
        })
        .collect();
    (data, tags)
}

fn errors(msgs: &[BackendMessage]) -> Vec<HashMap<u8, String>> {
    msgs.iter()
        .filter(|m| m.tag == b'E')
        .map(|m| m.fields())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_from_stdin_and_to_stdout() {
    let cluster = Cluster::start(1);
    cluster.psql_admin(
        cluster.primary_port(),
        "SET ROLE app; CREATE TABLE copy_t (id int, v text);",
    );
    cluster.wait_replay();
    let gw = Gateway::start(&cluster);
    let mut raw = RawConn::login(gw.port(), APP_USER, APP_PASSWORD).await;

    // COPY FROM STDIN: CopyInResponse, CopyData x2, CopyDone -> CommandComplete "COPY 3".
    raw.send_message(b'Q', b"copy copy_t from stdin\0").await;
    let m = raw.recv_message().await;
    assert_eq!(m.tag, b'G', "expected CopyInResponse, got {m:?}");
    raw.send_message(b'd', b"1\tone\n2\ttwo\n").await;
    raw.send_message(b'd', b"3\tthree\n").await;
    raw.send_message(b'c', b"").await;
    let msgs = raw.until_ready().await;
    assert_eq!(copy_text(&msgs).1, vec!["COPY 3"], "{msgs:?}");

    // CopyFail aborts a COPY; nothing is added and the session goes on.
    raw.send_message(b'Q', b"copy copy_t from stdin\0").await;
    assert_eq!(raw.recv_message().await.tag, b'G');
    raw.send_message(b'd', b"4\tfour\n").await;
    raw.send_message(b'f', b"client gave up\0").await;
    let msgs = raw.until_ready().await;
    assert_eq!(
        errors(&msgs).len(),
        1,
        "CopyFail must produce an error: {msgs:?}"
    );

    // Bad data: the server's error is relayed and the session goes on.
    raw.send_message(b'Q', b"copy copy_t from stdin\0").await;
    assert_eq!(raw.recv_message().await.tag, b'G');
    raw.send_message(b'd', b"not-a-number\tx\n").await;
    raw.send_message(b'c', b"").await;
    let msgs = raw.until_ready().await;
    let errs = errors(&msgs);
    assert_eq!(
        errs.first().and_then(|e| e.get(&b'C')).map(String::as_str),
        Some("22P02"),
        "{msgs:?}"
    );

    assert_eq!(
        cluster.psql_admin(
            cluster.primary_port(),
            "select string_agg(id || ':' || v, ',' order by id) from copy_t"
        ),
        "1:one,2:two,3:three"
    );
    cluster.wait_replay();

    // COPY TO STDOUT: CopyOutResponse, CopyData per row, CopyDone, CommandComplete.
    let msgs = raw
        .query("copy (select id, v from copy_t order by id) to stdout")
        .await;
    assert!(
        msgs.iter().any(|m| m.tag == b'H'),
        "no CopyOutResponse: {msgs:?}"
    );
    assert!(msgs.iter().any(|m| m.tag == b'c'), "no CopyDone: {msgs:?}");
    assert_eq!(
        copy_text(&msgs),
        (
            "1\tone\n2\ttwo\n3\tthree\n".to_string(),
            vec!["COPY 3".to_string()]
        )
    );
    let msgs = raw
        .query("copy copy_t to stdout with (format csv, header)")
        .await;
    let (data, _) = copy_text(&msgs);
    assert!(data.starts_with("id,v\n"), "{data:?}");
    assert_eq!(data.lines().count(), 4, "{data:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_query_protocol_with_parameters_and_prepared_statements() {
    let cluster = Cluster::start(1);
    cluster.psql_admin(
        cluster.primary_port(),
        "SET ROLE app; CREATE TABLE items (id int, v text, b bytea);",
    );
    cluster.wait_replay();
    // pool.size 1: all clients share one server connection per node, so prepared
    // statements of different clients (tokio-postgres names them s0, s1, ... in every
    // client) meet on the same server connection.
    let gw = Gateway::start_with(
        &cluster,
        GatewayOptions {
            pool_size: 1,
            wait_timeout: "20s".into(),
            ..GatewayOptions::default()
        },
    );
    gw.wait_for_replica_reads(&cluster).await;
    let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;

    let row = client
        .query_one(
            "select $1::int + 1, $2::text, $3::text is null",
            &[&41i32, &"x", &None::<String>],
        )
        .await
        .expect("parameters");
    assert_eq!(
        (
            row.get::<_, i32>(0),
            row.get::<_, String>(1),
            row.get::<_, bool>(2)
        ),
        (42, "x".to_string(), true)
    );

    // One prepared statement, executed many times (across server connections).
    let double = client
        .prepare("select $1::int * 2, inet_server_port()")
        .await
        .expect("prepare");
    for i in 0..10i32 {
        let row = client.query_one(&double, &[&i]).await.expect("execute");
        assert_eq!(row.get::<_, i32>(0), i * 2);
    }
    // A prepared write: runs on the primary every time.
    let insert = client
        .prepare("insert into items (id, v, b) values ($1, $2, $3) returning inet_server_port()")
        .await
        .expect("prepare insert");
    let blob: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    for i in 0..5i32 {
        let row = client
            .query_one(&insert, &[&i, &format!("v{i}"), &blob])
            .await
            .expect("execute insert");
        assert_eq!(row.get::<_, i32>(0) as u16, cluster.primary_port());
    }
    let got: Vec<u8> = client
        .query_one("/* pgway:primary */ select b from items where id = 3", &[])
        .await
        .expect("read bytea")
        .get(0);
    assert_eq!(got, blob, "100 kB bytea round trip");

    // Several clients whose prepared statements share names, interleaved.
    let mut clients = Vec::new();
    let mut stmts = Vec::new();
    for k in 0..4i32 {
        let c = connect(gw.port(), APP_USER, APP_PASSWORD).await;
        let s = c
            .prepare(&format!("select $1::int + {k}, {k} as client"))
            .await
            .expect("prepare per client");
        clients.push(c);
        stmts.push(s);
    }
    for round in 0..5i32 {
        for (k, (c, s)) in clients.iter().zip(&stmts).enumerate() {
            let row = c.query_one(s, &[&round]).await.expect("execute per client");
            assert_eq!(
                (row.get::<_, i32>(0), row.get::<_, i32>(1)),
                (round + k as i32, k as i32),
                "client {k} round {round} got another client's statement"
            );
        }
    }

    // Pipelined queries on one client.
    let (a, b, c) = tokio::join!(
        client.query_one("select 1::int", &[]),
        client.query_one("select $1::text", &[&"two"]),
        client.query("select g from generate_series(1, 3) g", &[]),
    );
    assert_eq!(a.expect("pipelined 1").get::<_, i32>(0), 1);
    assert_eq!(b.expect("pipelined 2").get::<_, String>(0), "two");
    assert_eq!(c.expect("pipelined 3").len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notices_are_relayed() {
    let cluster = Cluster::start(1);
    cluster.psql_admin(
        cluster.primary_port(),
        "SET ROLE app; CREATE FUNCTION noisy() RETURNS int LANGUAGE plpgsql STABLE \
         AS $$ BEGIN RAISE NOTICE 'noisy on %', inet_server_port(); RETURN 1; END $$;",
    );
    cluster.wait_replay();
    let gw = Gateway::start(&cluster);
    gw.wait_for_replica_reads(&cluster).await;
    let mut s = session(gw.port(), APP_USER, APP_PASSWORD).await;

    s.client
        .batch_execute("do $$ begin raise notice 'hello from pgway'; end $$")
        .await
        .expect("DO with RAISE NOTICE");
    s.client
        .query_one("select noisy()", &[])
        .await
        .expect("select noisy()");
    let mut notices = Vec::new();
    while notices.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(10), s.messages.recv()).await {
            Ok(Some(AsyncMessage::Notice(n))) => notices.push((
                n.severity().to_string(),
                n.code().code().to_string(),
                n.message().to_string(),
            )),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    let replica = cluster.replica_ports()[0];
    assert_eq!(
        notices,
        vec![
            (
                "NOTICE".to_string(),
                "00000".to_string(),
                "hello from pgway".to_string()
            ),
            (
                "NOTICE".to_string(),
                "00000".to_string(),
                format!("noisy on {replica}")
            ),
        ]
    );
}

// DESIGN.md (Pooling): LISTEN pins the client to one primary connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_notify_delivers_notifications() {
    let cluster = Cluster::start(0);
    let gw = Gateway::start(&cluster);
    let mut listener = session(gw.port(), APP_USER, APP_PASSWORD).await;
    listener
        .client
        .batch_execute("listen pgway_chan")
        .await
        .expect("LISTEN");
    let notifier = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    notifier
        .batch_execute("notify pgway_chan, 'hello'")
        .await
        .expect("NOTIFY");
    // The listening client is idle: the notification must arrive without it sending anything.
    let got = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match listener.messages.recv().await {
                Some(AsyncMessage::Notification(n)) => {
                    return Some((n.channel().to_string(), n.payload().to_string()))
                }
                Some(_) => continue,
                None => return None,
            }
        }
    })
    .await;
    assert_eq!(
        got,
        Ok(Some(("pgway_chan".to_string(), "hello".to_string()))),
        "notification for an idle LISTENing client (Err = none within 15 s)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_relayed_and_leave_the_session_usable() {
    let cluster = Cluster::start(1);
    let gw = Gateway::start(&cluster);
    let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;

    let cases: [(&str, SqlState); 4] = [
        ("selec 1", SqlState::SYNTAX_ERROR),
        ("select 1/0", SqlState::DIVISION_BY_ZERO),
        ("select * from no_such_table", SqlState::UNDEFINED_TABLE),
        (
            "insert into no_such_table values (1)",
            SqlState::UNDEFINED_TABLE,
        ),
    ];
    for (sql, code) in &cases {
        let e = client.simple_query(sql).await.expect_err(sql);
        assert_eq!(
            e.code(),
            Some(code),
            "simple `{sql}`: {}",
            describe_error(&e)
        );
        assert_eq!(
            simple_value(&client, "select 'ok'")
                .await
                .expect("after error"),
            "ok"
        );
        let e = client.query(*sql, &[]).await.expect_err(sql);
        assert_eq!(
            e.code(),
            Some(code),
            "extended `{sql}`: {}",
            describe_error(&e)
        );
        let row = client
            .query_one("select 'ok'::text", &[])
            .await
            .expect("after error");
        assert_eq!(row.get::<_, String>(0), "ok");
    }

    // An error in the middle of a multi-statement string stops it there.
    let e = client
        .simple_query("select 1; select 1/0; select 2")
        .await
        .expect_err("multi-statement with an error");
    assert_eq!(e.code(), Some(&SqlState::DIVISION_BY_ZERO));

    // In a transaction: the error aborts it until ROLLBACK.
    client.simple_query("begin").await.expect("begin");
    let e = client.simple_query("select 1/0").await.expect_err("1/0");
    assert_eq!(e.code(), Some(&SqlState::DIVISION_BY_ZERO));
    let e = client
        .simple_query("select 1")
        .await
        .expect_err("statement in an aborted transaction");
    assert_eq!(
        e.code(),
        Some(&SqlState::IN_FAILED_SQL_TRANSACTION),
        "{}",
        describe_error(&e)
    );
    client.simple_query("rollback").await.expect("rollback");
    assert_eq!(
        simple_value(&client, "select 'ok'")
            .await
            .expect("after rollback"),
        "ok"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_queries_and_results_are_relayed() {
    let cluster = Cluster::start(1);
    let gw = Gateway::start(&cluster);
    let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;

    let rows = simple_rows(
        &client,
        "select repeat('x', 1000) from generate_series(1, 5000)",
    )
    .await
    .expect("5 MB result");
    assert_eq!(rows.len(), 5000);
    assert!(rows
        .iter()
        .all(|r| r[0].as_deref().map(str::len) == Some(1000)));

    // Rows are passed on in runs of whatever one read holds: every row arrives, in order,
    // in both protocols, rows cut by a read's end too.
    let sql = "select g, repeat(chr(65 + g % 26), g % 300) from generate_series(1, 20000) g";
    let expect = |g: i32| {
        (
            g,
            char::from(65 + (g % 26) as u8)
                .to_string()
                .repeat((g % 300) as usize),
        )
    };
    let rows = simple_rows(&client, sql)
        .await
        .expect("20,000 rows, simple");
    assert_eq!(rows.len(), 20_000);
    for (i, row) in rows.iter().enumerate() {
        let (g, text) = expect(i as i32 + 1);
        assert_eq!(row[0].as_deref(), Some(g.to_string().as_str()));
        assert_eq!(row[1].as_deref(), Some(text.as_str()));
    }
    let rows = client
        .query(&format!("{sql} where g > $1"), &[&0i32])
        .await
        .expect("20,000 rows, extended");
    assert_eq!(rows.len(), 20_000);
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(
            (row.get::<_, i32>(0), row.get::<_, String>(1)),
            expect(i as i32 + 1)
        );
    }
    // An error after thousands of rows still reaches the client, and the session goes on.
    let err = simple_rows(
        &client,
        "select 1 / (15000 - g) from generate_series(1, 20000) g",
    )
    .await
    .expect_err("division by zero at row 15,000");
    assert_eq!(err.code(), Some(&SqlState::DIVISION_BY_ZERO), "{err:?}");
    assert_eq!(
        simple_value(&client, "select 'after'")
            .await
            .expect("after the error"),
        "after"
    );

    let big = "y".repeat(1_000_000);
    let len = simple_value(&client, &format!("select length('{big}')"))
        .await
        .expect("1 MB query text");
    assert_eq!(len, "1000000");
    let row = client
        .query_one("select length($1::text)", &[&big])
        .await
        .expect("1 MB parameter");
    assert_eq!(row.get::<_, i32>(0), 1_000_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_request_reaches_the_running_query() {
    let cluster = Cluster::start(1);
    let gw = Gateway::start(&cluster);
    let client = std::sync::Arc::new(connect(gw.port(), APP_USER, APP_PASSWORD).await);
    let token = client.cancel_token();
    let running = {
        let client = client.clone();
        tokio::spawn(async move { client.simple_query("select pg_sleep(60)").await })
    };
    // Cancel until the query ends (the first request may arrive before the query starts).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !running.is_finished() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300)).await;
        if let Err(e) = token.cancel_query(NoTls).await {
            panic!("sending CancelRequest: {e:?}");
        }
    }
    assert!(
        running.is_finished(),
        "pg_sleep(60) still running after 30 s of cancel requests"
    );
    let e = running
        .await
        .expect("query task")
        .expect_err("a cancelled query fails");
    assert_eq!(
        e.code(),
        Some(&SqlState::QUERY_CANCELED),
        "{}",
        describe_error(&e)
    );
    assert_eq!(
        simple_value(&client, "select 'ok'")
            .await
            .expect("after cancel"),
        "ok"
    );
}
