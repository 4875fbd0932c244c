//! Session state follows each client across pooled server connections: session parameters
//! (from the StartupMessage and from `SET`/`RESET`/`DISCARD ALL`), protocol-level prepared
//! statements, session-bound features that pin a client to one primary connection (SQL
//! `PREPARE`, temporary tables, advisory locks, `LISTEN`, `WITH HOLD` cursors), and cancel.
//!
//! Most tests run with `pool.size = 1`, so that clients take turns on the same two server
//! connections (one on the primary, one on the replica) and each client keeps landing on a
//! connection that another client changed. Every check asks the server: `inet_server_port()`
//! says which node answered, `current_setting()`/`SHOW` what the session's setting is there.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test step that cannot go on fails the test, with its message"
)]

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use tokio_postgres::{AsyncMessage, Client, NoTls};

/// Three schemas with a `whereami` table each (one row naming the schema), and a log table.
const SETUP: &str = "SET ROLE app;\n\
    CREATE SCHEMA a_schema;\n\
    CREATE SCHEMA b_schema;\n\
    CREATE TABLE public.whereami (v text, hits int NOT NULL DEFAULT 0);\n\
    CREATE TABLE a_schema.whereami (v text, hits int NOT NULL DEFAULT 0);\n\
    CREATE TABLE b_schema.whereami (v text, hits int NOT NULL DEFAULT 0);\n\
    INSERT INTO public.whereami (v) VALUES ('public');\n\
    INSERT INTO a_schema.whereami (v) VALUES ('a_schema');\n\
    INSERT INTO b_schema.whereami (v) VALUES ('b_schema');\n\
    CREATE TABLE public.log (id serial PRIMARY KEY, v text);\n";

/// The search_path of a session that did not set one.
const DEFAULT_PATH: &str = "\"$user\", public";

/// A cluster (primary + one replica) with [`SETUP`] applied, and pgway in front of it.
/// Fields drop in order: the gateway stops before the cluster.
struct Env {
    gw: Gateway,
    cluster: Cluster,
}

impl Env {
    async fn start(pool_size: usize) -> Env {
        Env::start_with(pool_size, "").await
    }

    /// `pool_extra`: more keys for the `[pool]` table.
    ///
    /// A read right after a write (the client's own, or another client's of the same user)
    /// waits for the replica to replay it (read-your-writes). On a loaded machine that can
    /// take longer than the default 20 ms, after which the read would go to the primary.
    /// These tests check where a session's reads go, not that wait, so it is long enough
    /// for every read to land on the replica.
    async fn start_with(pool_size: usize, pool_extra: &str) -> Env {
        let cluster = Cluster::start_with_schema(1, SETUP);
        let gw = Gateway::start_with(
            &cluster,
            GatewayOptions {
                pool_size,
                wait_timeout: "10s".into(),
                pool_extra: pool_extra.into(),
                extra: "[routing]\nread_your_writes_wait = \"30s\"\n".into(),
                ..GatewayOptions::default()
            },
        );
        gw.wait_for_replica_reads(&cluster).await;
        Env { gw, cluster }
    }

    fn primary(&self) -> u16 {
        self.cluster.primary_port()
    }

    fn replica(&self) -> u16 {
        self.cluster.replica_ports()[0]
    }

    fn port_of(&self, target: Target) -> u16 {
        match target {
            Target::Replica => self.replica(),
            Target::Primary => self.primary(),
        }
    }

    fn name(&self, port: u16) -> String {
        self.cluster.name_of(port)
    }

    /// A client with the harness's defaults (application_name `pgway-tests`).
    async fn client(&self) -> Client {
        connect(self.gw.port(), APP_USER, APP_PASSWORD).await
    }

    /// A client that sends `options` and `application_name` in its StartupMessage.
    async fn client_with(&self, options: Option<&str>, application_name: &str) -> Client {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(self.gw.port())
            .user(APP_USER)
            .password(APP_PASSWORD)
            .dbname(DB)
            .application_name(application_name)
            .ssl_mode(tokio_postgres::config::SslMode::Disable)
            .connect_timeout(Duration::from_secs(10));
        if let Some(o) = options {
            config.options(o);
        }
        let (client, connection) = config
            .connect(NoTls)
            .await
            .unwrap_or_else(|e| panic!("connecting with options {options:?}: {e:?}"));
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
    }

    /// The value of `setting` on the primary for a fresh session, asked directly.
    fn server_default(&self, setting: &str) -> String {
        self.cluster
            .psql_admin(self.primary(), &format!("show {setting}"))
    }
}

#[derive(Clone, Copy, Debug)]
enum Proto {
    Simple,
    Extended,
}

const PROTOS: [Proto; 2] = [Proto::Simple, Proto::Extended];

/// Where pgway must run a statement.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Target {
    /// A read outside a transaction.
    Replica,
    /// A statement that calls `txid_current()` (a write).
    Primary,
}

const TARGETS: [Target; 2] = [Target::Replica, Target::Primary];

/// One column of a tokio-postgres row as text (`<NULL>` for NULL).
fn cell(row: &tokio_postgres::Row, i: usize) -> String {
    use tokio_postgres::types::Type;
    let t = row.columns()[i].type_().clone();
    let v: Option<String> = if t == Type::INT4 {
        row.get::<_, Option<i32>>(i).map(|v| v.to_string())
    } else if t == Type::INT8 {
        row.get::<_, Option<i64>>(i).map(|v| v.to_string())
    } else if t == Type::INT2 {
        row.get::<_, Option<i16>>(i).map(|v| v.to_string())
    } else if t == Type::BOOL {
        row.get::<_, Option<bool>>(i)
            .map(|v| if v { "t" } else { "f" }.to_string())
    } else {
        row.get::<_, Option<String>>(i)
    };
    v.unwrap_or_else(|| "<NULL>".into())
}

/// Runs `sql` with `proto` and returns its first row as text (`<NULL>` for NULL).
async fn first_row(client: &Client, sql: &str, proto: Proto) -> Result<Vec<String>, String> {
    match proto {
        Proto::Simple => {
            let rows = simple_rows(client, sql)
                .await
                .map_err(|e| describe_error(&e))?;
            let row = rows.into_iter().next().ok_or("no rows")?;
            Ok(row
                .into_iter()
                .map(|c| c.unwrap_or_else(|| "<NULL>".into()))
                .collect())
        }
        Proto::Extended => {
            let rows = client
                .query(sql, &[])
                .await
                .map_err(|e| describe_error(&e))?;
            let row = rows.first().ok_or("no rows")?;
            Ok((0..row.len()).map(|i| cell(row, i)).collect())
        }
    }
}

/// [`first_row`] that panics, naming the statement, on error.
async fn row_ok(client: &Client, sql: &str, proto: Proto, who: &str) -> Vec<String> {
    first_row(client, sql, proto)
        .await
        .unwrap_or_else(|e| panic!("client {who}: `{sql}` ({proto:?}) failed: {e}"))
}

/// Runs a simple-protocol statement that must succeed.
async fn exec(client: &Client, sql: &str, who: &str) {
    client
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("client {who}: `{sql}` failed: {}", describe_error(&e)));
}

/// The statement that evaluates `expr` (as text) on `target`, with `inet_server_port()` as
/// the second column.
fn probe_sql(expr: &str, target: Target) -> String {
    match target {
        Target::Replica => format!("select ({expr})::text, inet_server_port()"),
        Target::Primary => format!("select ({expr})::text, inet_server_port(), txid_current()"),
    }
}

/// Evaluates `expr` on `target` with every protocol and asserts that the right node answered
/// and that `ok(value)` holds. `want` describes the expected value for the message.
async fn check_everywhere(
    env: &Env,
    client: &Client,
    who: &str,
    expr: &str,
    want: &str,
    ok: impl Fn(&str) -> bool,
) {
    for target in TARGETS {
        for proto in PROTOS {
            let sql = probe_sql(expr, target);
            let row = row_ok(client, &sql, proto, who).await;
            let port: u16 = row[1].parse().expect("a port");
            assert_eq!(
                port,
                env.port_of(target),
                "client {who}: `{sql}` ({proto:?}) was answered by {}, expected the {target:?}",
                env.name(port)
            );
            assert!(
                ok(&row[0]),
                "client {who}: `{sql}` ({proto:?}) on the {target:?}: expected {want}, got {:?}",
                row[0]
            );
        }
    }
}

/// [`check_everywhere`] for an exact value.
async fn expect_everywhere(env: &Env, client: &Client, who: &str, expr: &str, want: &str) {
    check_everywhere(env, client, who, expr, &format!("{want:?}"), |v| v == want).await;
}

/// `SHOW name` (simple protocol, answered on a replica), which must give `want`.
async fn expect_show(client: &Client, who: &str, name: &str, want: &str) {
    for proto in PROTOS {
        let row = row_ok(client, &format!("show {name}"), proto, who).await;
        assert_eq!(row[0], want, "client {who}: `SHOW {name}` ({proto:?})");
    }
}

/// Expects `sql` to fail with `code`; returns the error message.
async fn expect_error(client: &Client, sql: &str, proto: Proto, code: &str, who: &str) -> String {
    let result = match proto {
        Proto::Simple => client.simple_query(sql).await.map(|_| ()),
        Proto::Extended => client.query(sql, &[]).await.map(|_| ()),
    };
    match result {
        Ok(()) => panic!("client {who}: `{sql}` ({proto:?}) succeeded, expected SQLSTATE {code}"),
        Err(e) => {
            assert_eq!(
                sqlstate(&e),
                code,
                "client {who}: `{sql}` ({proto:?}) failed with {}, expected SQLSTATE {code}",
                describe_error(&e)
            );
            e.as_db_error()
                .map(|d| d.message().to_string())
                .unwrap_or_default()
        }
    }
}

// ---------------------------------------------------------------------------------------
// Session parameters
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_path_set_by_each_client_follows_it_on_shared_connections() {
    let env = Env::start(1).await;
    let a = env.client().await;
    let b = env.client().await;
    let c = env.client().await; // sets nothing
    exec(&a, "set search_path = a_schema", "A").await;
    exec(&b, "SET search_path TO b_schema", "B").await;
    for round in 0..10 {
        let proto = if round % 2 == 0 {
            Proto::Simple
        } else {
            Proto::Extended
        };
        for (who, client, want) in [
            ("A", &a, "a_schema"),
            ("B", &b, "b_schema"),
            ("C", &c, "public"),
        ] {
            let sql = "select v, inet_server_port() from whereami";
            let row = row_ok(client, sql, proto, who).await;
            assert_eq!(
                (row[0].as_str(), row[1].parse::<u16>().unwrap()),
                (want, env.replica()),
                "round {round}, client {who}: `{sql}` ({proto:?}) must read its own schema's \
                 table on the replica"
            );
            let sql = "update whereami set hits = hits + 1 returning v, inet_server_port()";
            let row = row_ok(client, sql, proto, who).await;
            assert_eq!(
                (row[0].as_str(), row[1].parse::<u16>().unwrap()),
                (want, env.primary()),
                "round {round}, client {who}: `{sql}` ({proto:?}) must write its own schema's \
                 table on the primary"
            );
        }
    }
    assert_eq!(
        env.cluster.psql_admin(
            env.primary(),
            "select string_agg(v || '=' || hits, ',' order by v) from \
             (select * from public.whereami union all select * from a_schema.whereami \
              union all select * from b_schema.whereami) t"
        ),
        "a_schema=10,b_schema=10,public=10",
        "each client's 10 updates must have gone to its own schema's table"
    );
    expect_show(&a, "A", "search_path", "a_schema").await;
    expect_show(&b, "B", "search_path", "b_schema").await;
    expect_show(&c, "C", "search_path", DEFAULT_PATH).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_parameters_apply_on_every_server_connection() {
    let env = Env::start(1).await;
    // options=-c ... and application_name in the StartupMessage (tokio-postgres sends both).
    let x = env
        .client_with(
            Some("-c search_path=b_schema -c statement_timeout=4321"),
            "svc-b",
        )
        .await;
    let y = env.client().await; // application_name pgway-tests, no options
    for round in 0..3 {
        for (who, client, app, path, timeout, table) in [
            ("X", &x, "svc-b", "b_schema", "4321ms", "b_schema"),
            ("Y", &y, "pgway-tests", DEFAULT_PATH, "0", "public"),
        ] {
            let who = format!("{who} (round {round})");
            expect_show(client, &who, "application_name", app).await;
            expect_show(client, &who, "search_path", path).await;
            expect_show(client, &who, "statement_timeout", timeout).await;
            expect_everywhere(
                &env,
                client,
                &who,
                "current_setting('application_name')",
                app,
            )
            .await;
            expect_everywhere(&env, client, &who, "current_setting('search_path')", path).await;
            expect_everywhere(&env, client, &who, "select v from whereami", table).await;
        }
    }
}

/// Reads a ParameterStatus message: (name, value).
fn parameter_status(m: &BackendMessage) -> (String, String) {
    let mut parts = m.body.split(|&b| b == 0);
    let name = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let value = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    (name, value)
}

/// Data rows of a message exchange as text, or the first ErrorResponse as `SQLSTATE: message`.
fn raw_rows(msgs: &[BackendMessage]) -> Result<Vec<Vec<Option<String>>>, String> {
    let mut rows = Vec::new();
    for m in msgs {
        match m.tag {
            b'E' => {
                let f = m.fields();
                return Err(format!(
                    "{}: {}",
                    f.get(&b'C').cloned().unwrap_or_default(),
                    f.get(&b'M').cloned().unwrap_or_default()
                ));
            }
            b'D' => {
                let n = i16::from_be_bytes([m.body[0], m.body[1]]) as usize;
                let mut at = 2;
                let mut row = Vec::with_capacity(n);
                for _ in 0..n {
                    let len = i32::from_be_bytes(m.body[at..at + 4].try_into().unwrap());
                    at += 4;
                    if len < 0 {
                        row.push(None);
                    } else {
                        let len = len as usize;
                        row.push(Some(
                            String::from_utf8_lossy(&m.body[at..at + len]).into_owned(),
                        ));
                        at += len;
                    }
                }
                rows.push(row);
            }
            _ => {}
        }
    }
    Ok(rows)
}

/// Runs a simple query on a raw connection; the first row's columns as text.
async fn raw_row(conn: &mut RawConn, sql: &str) -> Vec<String> {
    let msgs = conn.query(sql).await;
    let rows = raw_rows(&msgs).unwrap_or_else(|e| panic!("raw client: `{sql}` failed: {e}"));
    rows.into_iter()
        .next()
        .unwrap_or_else(|| panic!("raw client: `{sql}` returned no rows"))
        .into_iter()
        .map(|c| c.unwrap_or_else(|| "<NULL>".into()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_timezone_datestyle_and_options_from_a_raw_startup_message() {
    let env = Env::start(1).await;
    let default_tz = env.server_default("timezone");
    let (mut raw, login) = RawConn::login_with(
        env.gw.port(),
        APP_USER,
        APP_PASSWORD,
        &[
            ("TimeZone", "Asia/Tokyo"),
            ("DateStyle", "SQL, DMY"),
            ("application_name", "raw-client"),
            ("options", "-c search_path=a_schema"),
        ],
    )
    .await;
    let reported: HashMap<String, String> = login
        .iter()
        .filter(|m| m.tag == b'S')
        .map(parameter_status)
        .collect();
    for (name, want) in [
        ("TimeZone", "Asia/Tokyo"),
        ("DateStyle", "SQL, DMY"),
        ("application_name", "raw-client"),
    ] {
        assert_eq!(
            reported.get(name).map(String::as_str),
            Some(want),
            "ParameterStatus {name} reported to the client at login (all: {reported:?})"
        );
    }
    let other = env.client().await;
    for round in 0..3 {
        for target in TARGETS {
            let row = raw_row(&mut raw, &probe_sql("to_char(now(), 'OF')", target)).await;
            assert_eq!(row[1], env.port_of(target).to_string(), "now() target");
            assert_eq!(
                row[0], "+09",
                "round {round}: raw client (TimeZone=Asia/Tokyo at startup): UTC offset of now() \
                 on the {target:?}"
            );
            let row = raw_row(&mut raw, &probe_sql("'2024-03-01'::date", target)).await;
            assert_eq!(
                row[0], "01/03/2024",
                "round {round}: raw client (DateStyle=SQL, DMY at startup): a date on the {target:?}"
            );
            let row = raw_row(&mut raw, &probe_sql("select v from whereami", target)).await;
            assert_eq!(
                row[0], "a_schema",
                "round {round}: raw client (options=-c search_path=a_schema): whereami on the \
                 {target:?}"
            );
            let row = raw_row(
                &mut raw,
                &probe_sql("current_setting('application_name')", target),
            )
            .await;
            assert_eq!(row[0], "raw-client", "round {round}: application_name");
        }
        // Another client on the same server connections keeps the server's defaults.
        expect_everywhere(
            &env,
            &other,
            "other",
            "current_setting('TimeZone')",
            &default_tz,
        )
        .await;
        expect_everywhere(&env, &other, "other", "'2024-03-01'::date", "2024-03-01").await;
        expect_everywhere(&env, &other, "other", "select v from whereami", "public").await;
    }
    let row = raw_row(&mut raw, "show timezone").await;
    assert_eq!(row[0], "Asia/Tokyo", "raw client: SHOW timezone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_time_zone_shows_in_now_on_replica_and_primary() {
    let env = Env::start(1).await;
    let default_tz = env.server_default("timezone");
    assert_ne!(default_tz, "Asia/Tokyo");
    let a = env.client().await;
    let b = env.client().await;
    exec(&a, "SET TIME ZONE 'Asia/Tokyo'", "A").await;
    for _ in 0..3 {
        check_everywhere(&env, &a, "A", "now()", "a +09 offset", |v| {
            v.ends_with("+09")
        })
        .await;
        expect_show(&a, "A", "timezone", "Asia/Tokyo").await;
        check_everywhere(&env, &b, "B", "now()", "no +09 offset", |v| {
            !v.ends_with("+09")
        })
        .await;
        expect_show(&b, "B", "timezone", &default_tz).await;
    }
    exec(&a, "SET TIME ZONE DEFAULT", "A").await;
    expect_show(&a, "A", "timezone", &default_tz).await;
    check_everywhere(&env, &a, "A", "now()", "no +09 offset", |v| {
        !v.ends_with("+09")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_reset_all_and_discard_all_return_to_the_defaults() {
    let env = Env::start(1).await;
    let default_work_mem = env.server_default("work_mem");
    // X's startup options are its defaults, as in PostgreSQL.
    let x = env
        .client_with(Some("-c search_path=b_schema"), "svc-x")
        .await;
    let y = env.client().await;
    let table = "select v from whereami";
    let y_unchanged = async || {
        expect_everywhere(&env, &y, "Y", table, "public").await;
        expect_everywhere(
            &env,
            &y,
            "Y",
            "current_setting('work_mem')",
            &default_work_mem,
        )
        .await;
    };

    exec(&x, "set search_path = a_schema", "X").await;
    expect_everywhere(&env, &x, "X after SET", table, "a_schema").await;
    y_unchanged().await;
    exec(&x, "reset search_path", "X").await;
    expect_everywhere(&env, &x, "X after RESET search_path", table, "b_schema").await;
    expect_show(&x, "X after RESET search_path", "search_path", "b_schema").await;

    exec(&x, "set search_path = a_schema", "X").await;
    exec(&x, "set search_path to default", "X").await;
    expect_everywhere(
        &env,
        &x,
        "X after SET search_path TO DEFAULT",
        table,
        "b_schema",
    )
    .await;

    exec(&x, "set search_path = a_schema", "X").await;
    exec(&x, "set work_mem = '7MB'", "X").await;
    exec(&x, "set application_name = 'renamed'", "X").await;
    expect_everywhere(
        &env,
        &x,
        "X after SET work_mem",
        "current_setting('work_mem')",
        "7MB",
    )
    .await;
    y_unchanged().await;
    exec(&x, "RESET ALL", "X").await;
    let who = "X after RESET ALL";
    expect_everywhere(&env, &x, who, table, "b_schema").await;
    expect_everywhere(
        &env,
        &x,
        who,
        "current_setting('work_mem')",
        &default_work_mem,
    )
    .await;
    expect_everywhere(
        &env,
        &x,
        who,
        "current_setting('application_name')",
        "svc-x",
    )
    .await;
    expect_show(&x, who, "work_mem", &default_work_mem).await;
    y_unchanged().await;

    exec(&x, "set search_path = a_schema", "X").await;
    exec(&x, "set work_mem = '7MB'", "X").await;
    expect_everywhere(&env, &x, "X before DISCARD ALL", table, "a_schema").await;
    exec(&x, "DISCARD ALL", "X").await;
    let who = "X after DISCARD ALL";
    expect_everywhere(&env, &x, who, table, "b_schema").await;
    expect_everywhere(
        &env,
        &x,
        who,
        "current_setting('work_mem')",
        &default_work_mem,
    )
    .await;
    y_unchanged().await;

    // Without startup options the default is the server's.
    exec(&y, "set search_path = a_schema", "Y").await;
    expect_everywhere(&env, &y, "Y after SET", table, "a_schema").await;
    exec(&y, "discard all", "Y").await;
    expect_everywhere(&env, &y, "Y after DISCARD ALL", table, "public").await;
    expect_show(&y, "Y after DISCARD ALL", "search_path", DEFAULT_PATH).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_local_stays_inside_its_transaction() {
    let env = Env::start(1).await;
    let a = env.client().await;
    let b = env.client().await;
    let timeout = "current_setting('statement_timeout')";
    let rows = simple_rows(
        &a,
        "begin; set local statement_timeout = '1234ms'; show statement_timeout",
    )
    .await
    .unwrap_or_else(|e| panic!("BEGIN; SET LOCAL: {}", describe_error(&e)));
    assert_eq!(
        rows,
        vec![vec![Some("1234ms".to_string())]],
        "SET LOCAL inside BEGIN"
    );
    exec(&a, "commit", "A").await;
    expect_everywhere(&env, &a, "A after COMMIT", timeout, "0").await;
    expect_everywhere(&env, &b, "B", timeout, "0").await;

    // SET LOCAL on top of a session-level SET: back to the session value after COMMIT.
    exec(&a, "set statement_timeout = '5s'", "A").await;
    exec(
        &a,
        "begin; set local statement_timeout = '1234ms'; select 1; commit",
        "A",
    )
    .await;
    expect_everywhere(&env, &a, "A after SET then SET LOCAL", timeout, "5s").await;
    expect_everywhere(&env, &b, "B", timeout, "0").await;

    // The same through the extended protocol (tokio-postgres's Transaction).
    let mut a = a;
    let tx = a.transaction().await.expect("BEGIN");
    tx.batch_execute("set local statement_timeout = '2345ms'")
        .await
        .expect("SET LOCAL");
    let row = tx
        .query_one("show statement_timeout", &[])
        .await
        .expect("SHOW");
    assert_eq!(row.get::<_, String>(0), "2345ms");
    tx.commit().await.expect("COMMIT");
    expect_everywhere(
        &env,
        &a,
        "A after an extended-protocol transaction",
        timeout,
        "5s",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_inside_a_rolled_back_transaction_does_not_stick() {
    let env = Env::start(1).await;
    let default_work_mem = env.server_default("work_mem");
    let a = env.client().await;
    let b = env.client().await;
    let work_mem = "current_setting('work_mem')";

    exec(&a, "BEGIN; SET work_mem = '7MB'; ROLLBACK", "A").await;
    expect_everywhere(
        &env,
        &a,
        "A after BEGIN; SET; ROLLBACK",
        work_mem,
        &default_work_mem,
    )
    .await;
    expect_show(&a, "A after ROLLBACK", "work_mem", &default_work_mem).await;

    exec(&a, "BEGIN", "A").await;
    exec(&a, "SET work_mem = '7MB'", "A").await;
    exec(&a, "COMMIT", "A").await;
    expect_everywhere(&env, &a, "A after BEGIN; SET; COMMIT", work_mem, "7MB").await;
    expect_show(&a, "A after COMMIT", "work_mem", "7MB").await;
    expect_everywhere(&env, &b, "B", work_mem, &default_work_mem).await;

    // A transaction that failed: its COMMIT is a rollback.
    exec(&a, "BEGIN", "A").await;
    exec(&a, "SET work_mem = '9MB'", "A").await;
    expect_error(&a, "select 1/0", Proto::Simple, "22012", "A").await;
    let commit = a.simple_query("COMMIT").await;
    assert!(commit.is_ok(), "COMMIT of a failed transaction: {commit:?}");
    expect_everywhere(&env, &a, "A after a failed transaction", work_mem, "7MB").await;

    // A multi-statement query string is one implicit transaction: the error undoes the SET.
    expect_error(
        &a,
        "SET work_mem = '11MB'; select 1/0",
        Proto::Simple,
        "22012",
        "A",
    )
    .await;
    expect_everywhere(
        &env,
        &a,
        "A after a failed implicit transaction",
        work_mem,
        "7MB",
    )
    .await;

    // tokio-postgres's Transaction (extended protocol), dropped = ROLLBACK.
    let mut a = a;
    {
        let tx = a.transaction().await.expect("BEGIN");
        tx.batch_execute("SET work_mem = '13MB'")
            .await
            .expect("SET");
        tx.rollback().await.expect("ROLLBACK");
    }
    expect_everywhere(&env, &a, "A after Transaction::rollback", work_mem, "7MB").await;
    expect_everywhere(&env, &b, "B", work_mem, &default_work_mem).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_rolled_back_to_a_savepoint_does_not_stick() {
    let env = Env::start(1).await;
    let a = env.client().await;
    let work_mem = "current_setting('work_mem')";
    exec(
        &a,
        "BEGIN; SET work_mem = '8MB'; SAVEPOINT s; SET work_mem = '9MB'; \
         ROLLBACK TO SAVEPOINT s; COMMIT",
        "A",
    )
    .await;
    expect_everywhere(&env, &a, "A after ROLLBACK TO SAVEPOINT", work_mem, "8MB").await;
    exec(
        &a,
        "BEGIN; SAVEPOINT s; SET work_mem = '10MB'; RELEASE SAVEPOINT s; COMMIT",
        "A",
    )
    .await;
    expect_everywhere(&env, &a, "A after RELEASE SAVEPOINT", work_mem, "10MB").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_timeout_and_lock_timeout_apply_on_replica_and_primary() {
    let env = Env::start(2).await;
    let a = env.client().await;
    let b = env.client().await;
    exec(&a, "SET statement_timeout = '100ms'", "A").await;
    for proto in PROTOS {
        for (target, sql) in [
            (Target::Replica, "select pg_sleep(1)"),
            (
                Target::Primary,
                "insert into public.log (v) select 'slept' from pg_sleep(1)",
            ),
        ] {
            let msg = expect_error(&a, sql, proto, "57014", "A").await;
            assert_eq!(
                msg, "canceling statement due to statement timeout",
                "`{sql}` ({proto:?}, {target:?})"
            );
        }
    }
    expect_everywhere(
        &env,
        &a,
        "A",
        "current_setting('statement_timeout')",
        "100ms",
    )
    .await;
    // B is not affected.
    let row = row_ok(
        &b,
        "select pg_sleep(0.3)::text, inet_server_port()",
        Proto::Simple,
        "B",
    )
    .await;
    assert_eq!(row[1], env.replica().to_string());
    assert_eq!(
        env.cluster
            .psql_admin(env.primary(), "select count(*) from log where v = 'slept'"),
        "0"
    );

    // lock_timeout: B holds a lock on `log`; A's insert gives up after 200 ms.
    exec(&a, "SET statement_timeout = 0", "A").await;
    exec(&a, "SET lock_timeout = '200ms'", "A").await;
    exec(
        &b,
        "begin; lock table public.log in access exclusive mode",
        "B",
    )
    .await;
    for proto in PROTOS {
        let started = Instant::now();
        expect_error(
            &a,
            "insert into public.log (v) values ('blocked')",
            proto,
            "55P03",
            "A",
        )
        .await;
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    exec(&b, "commit", "B").await;
    let row = row_ok(
        &a,
        "insert into public.log (v) values ('after') returning v, inet_server_port()",
        Proto::Extended,
        "A",
    )
    .await;
    assert_eq!(row, vec!["after".to_string(), env.primary().to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_settings_follow_the_client() {
    let env = Env::start(1).await;
    let a = env.client().await;
    let b = env.client().await;
    let c = env.client().await;
    exec(&a, "SET myapp.tenant = 'acme'", "A").await;
    exec(&b, "set myapp.tenant to 'globex'", "B").await;
    let expr = "current_setting('myapp.tenant', true)";
    for round in 0..3 {
        expect_everywhere(&env, &a, &format!("A round {round}"), expr, "acme").await;
        expect_everywhere(&env, &b, &format!("B round {round}"), expr, "globex").await;
        // Never set by C: NULL in a fresh session ('' once a session has reset it).
        check_everywhere(
            &env,
            &c,
            &format!("C round {round}"),
            expr,
            "NULL or ''",
            |v| v == "<NULL>" || v.is_empty(),
        )
        .await;
    }
    expect_show(&a, "A", "myapp.tenant", "acme").await;
    exec(&a, "RESET myapp.tenant", "A").await;
    check_everywhere(&env, &a, "A after RESET", expr, "''", |v| {
        v == "<NULL>" || v.is_empty()
    })
    .await;
    expect_everywhere(&env, &b, "B", expr, "globex").await;
}

// ---------------------------------------------------------------------------------------
// Protocol-level prepared statements
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_work_from_many_clients_on_a_small_pool() {
    const CLIENTS: usize = 6;
    const ROUNDS: i32 = 25;
    let env = Env::start(2).await;
    let (primary, replica) = (env.primary(), env.replica());
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let port = env.gw.port();
        tasks.push(tokio::spawn(async move {
            let client = connect(port, APP_USER, APP_PASSWORD).await;
            let read = client
                .prepare("select $1::int4 * 2, inet_server_port()")
                .await
                .unwrap_or_else(|e| panic!("client {c}: prepare: {}", describe_error(&e)));
            let write = client
                .prepare("insert into public.log (v) values ($1) returning v, inet_server_port()")
                .await
                .unwrap_or_else(|e| panic!("client {c}: prepare: {}", describe_error(&e)));
            for i in 0..ROUNDS {
                let row = client.query_one(&read, &[&i]).await.unwrap_or_else(|e| {
                    panic!(
                        "client {c}, round {i}: prepared read: {}",
                        describe_error(&e)
                    )
                });
                assert_eq!(
                    (row.get::<_, i32>(0), row.get::<_, i32>(1) as u16),
                    (i * 2, replica),
                    "client {c}, round {i}: prepared SELECT (value, server port)"
                );
                let v = format!("c{c}-{i}");
                let row = client.query_one(&write, &[&v]).await.unwrap_or_else(|e| {
                    panic!(
                        "client {c}, round {i}: prepared insert: {}",
                        describe_error(&e)
                    )
                });
                assert_eq!(
                    (row.get::<_, String>(0), row.get::<_, i32>(1) as u16),
                    (v, primary),
                    "client {c}, round {i}: prepared INSERT (value, server port)"
                );
                // A one-off statement in between moves the client to other connections.
                client
                    .simple_query("select 1")
                    .await
                    .unwrap_or_else(|e| panic!("client {c}: {}", describe_error(&e)));
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    assert_eq!(
        env.cluster
            .psql_admin(env.primary(), "select count(distinct v) from log"),
        (CLIENTS as i32 * ROUNDS).to_string()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deallocate_all_removes_the_clients_protocol_level_statements() {
    let env = Env::start(1).await;
    let a = env.client().await;
    let b = env.client().await;
    let one = a.prepare("select $1::int4 + 1").await.expect("prepare one");
    let two = a.prepare("select $1::int4 + 2").await.expect("prepare two");
    let theirs = b.prepare("select $1::int4 + 3").await.expect("prepare B's");
    for i in 0..3 {
        assert_eq!(
            a.query_one(&one, &[&i])
                .await
                .expect("one")
                .get::<_, i32>(0),
            i + 1
        );
        assert_eq!(
            a.query_one(&two, &[&i])
                .await
                .expect("two")
                .get::<_, i32>(0),
            i + 2
        );
        assert_eq!(
            b.query_one(&theirs, &[&i])
                .await
                .expect("B")
                .get::<_, i32>(0),
            i + 3
        );
    }

    // (DEALLOCATE of one statement by name: tokio-postgres does not expose its statement
    // names; see named_parse_bind_close_and_reuse_as_a_raw_client_sends_them.)
    drop(one);

    // DEALLOCATE ALL: every statement of this client, and only of this client.
    exec(&a, "DEALLOCATE ALL", "A").await;
    let err = a
        .query_one(&two, &[&1i32])
        .await
        .expect_err("executing a statement after DEALLOCATE ALL must fail");
    assert_eq!(sqlstate(&err), "26000", "{}", describe_error(&err));
    assert_eq!(
        b.query_one(&theirs, &[&5i32])
            .await
            .unwrap_or_else(|e| panic!(
                "B's statement after A's DEALLOCATE ALL: {}",
                describe_error(&e)
            ))
            .get::<_, i32>(0),
        8,
        "another client's DEALLOCATE ALL must not remove B's statement"
    );

    // New statements work after DEALLOCATE ALL.
    let three = a
        .prepare("select $1::int4 + 1")
        .await
        .expect("prepare again");
    assert_eq!(
        a.query_one(&three, &[&1i32])
            .await
            .expect("again")
            .get::<_, i32>(0),
        2
    );
    exec(&a, "DEALLOCATE PREPARE ALL", "A").await;
    let err = a
        .query_one(&three, &[&1i32])
        .await
        .expect_err("after DEALLOCATE PREPARE ALL");
    assert_eq!(sqlstate(&err), "26000", "{}", describe_error(&err));
}

// Raw extended-protocol messages.

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

fn parse_msg(name: &str, sql: &str) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, name);
    cstr(&mut b, sql);
    b.extend_from_slice(&0i16.to_be_bytes());
    message(b'P', &b)
}

fn bind_msg(stmt: &str, params: &[&str]) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, "");
    cstr(&mut b, stmt);
    b.extend_from_slice(&0i16.to_be_bytes()); // all parameters in text
    b.extend_from_slice(&(params.len() as i16).to_be_bytes());
    for p in params {
        b.extend_from_slice(&(p.len() as i32).to_be_bytes());
        b.extend_from_slice(p.as_bytes());
    }
    b.extend_from_slice(&0i16.to_be_bytes()); // all results in text
    message(b'B', &b)
}

fn describe_msg(kind: u8, name: &str) -> Vec<u8> {
    let mut b = vec![kind];
    cstr(&mut b, name);
    message(b'D', &b)
}

fn execute_msg() -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, "");
    b.extend_from_slice(&0i32.to_be_bytes());
    message(b'E', &b)
}

fn close_msg(name: &str) -> Vec<u8> {
    let mut b = vec![b'S'];
    cstr(&mut b, name);
    message(b'C', &b)
}

fn sync_msg() -> Vec<u8> {
    message(b'S', &[])
}

/// Sends `msgs` then Sync, and reads up to ReadyForQuery.
async fn raw_exchange(conn: &mut RawConn, msgs: &[Vec<u8>]) -> Vec<BackendMessage> {
    let mut bytes: Vec<u8> = msgs.concat();
    bytes.extend_from_slice(&sync_msg());
    conn.send(&bytes).await;
    conn.until_ready().await
}

/// Bind + Execute of `stmt`: its first row, or `SQLSTATE: message`.
async fn raw_execute(
    conn: &mut RawConn,
    stmt: &str,
    params: &[&str],
) -> Result<Vec<String>, String> {
    let msgs = raw_exchange(conn, &[bind_msg(stmt, params), execute_msg()]).await;
    let rows = raw_rows(&msgs)?;
    Ok(rows
        .into_iter()
        .next()
        .ok_or_else(|| {
            format!(
                "no rows: {:?}",
                msgs.iter().map(|m| m.tag as char).collect::<String>()
            )
        })?
        .into_iter()
        .map(|c| c.unwrap_or_default())
        .collect())
}

fn tags(msgs: &[BackendMessage]) -> String {
    msgs.iter().map(|m| m.tag as char).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_parse_bind_close_and_reuse_as_a_raw_client_sends_them() {
    let env = Env::start(1).await;
    let (primary, replica) = (env.primary().to_string(), env.replica().to_string());
    let mut raw = RawConn::login(env.gw.port(), APP_USER, APP_PASSWORD).await;
    let other = env.client().await;
    let move_around = async || {
        exec(
            &other,
            "insert into public.log (v) values ('other')",
            "other",
        )
        .await;
        row_ok(&other, "select 1", Proto::Extended, "other").await;
    };

    // Parse alone, then Bind/Execute in later round trips, with other traffic in between.
    let msgs = raw_exchange(
        &mut raw,
        &[parse_msg("q1", "select $1::int + 1, inet_server_port()")],
    )
    .await;
    assert_eq!(tags(&msgs), "1Z", "Parse q1 + Sync");
    for i in 0..5 {
        move_around().await;
        let got = raw_execute(&mut raw, "q1", &[&i.to_string()]).await;
        assert_eq!(
            got,
            Ok(vec![(i + 1).to_string(), replica.clone()]),
            "execution {i} of q1"
        );
    }
    // Describe of the statement, on whatever connection.
    move_around().await;
    let msgs = raw_exchange(&mut raw, &[describe_msg(b'S', "q1")]).await;
    assert_eq!(
        tags(&msgs),
        "tTZ",
        "Describe S q1: ParameterDescription, RowDescription"
    );

    // A second Parse of the same name is an error, as in PostgreSQL; q1 keeps its SQL.
    let msgs = raw_exchange(&mut raw, &[parse_msg("q1", "select 'other sql', 0")]).await;
    let parse_again = raw_rows(&msgs).map(|_| tags(&msgs));
    let q1_after = raw_execute(&mut raw, "q1", &["1"]).await;
    assert_eq!(
        (parse_again, q1_after),
        (
            Err("42P05: prepared statement \"q1\" already exists".to_string()),
            Ok(vec!["2".to_string(), replica.clone()])
        ),
        "(a second Parse of q1 without Close, then q1's result): PostgreSQL refuses the Parse \
         and keeps q1"
    );

    // Close frees the name; Bind of a closed statement is the usual 26000.
    let msgs = raw_exchange(&mut raw, &[close_msg("q1")]).await;
    assert_eq!(tags(&msgs), "3Z", "Close S q1 + Sync");
    move_around().await;
    assert_eq!(
        raw_execute(&mut raw, "q1", &["1"]).await,
        Err("26000: prepared statement \"q1\" does not exist".to_string())
    );
    let msgs = raw_exchange(
        &mut raw,
        &[parse_msg(
            "q1",
            "select $1::text || '!', inet_server_port()",
        )],
    )
    .await;
    assert_eq!(tags(&msgs), "1Z", "Parse q1 again after Close");
    move_around().await;
    assert_eq!(
        raw_execute(&mut raw, "q1", &["hi"]).await,
        Ok(vec!["hi!".to_string(), replica.clone()])
    );

    // A prepared INSERT runs on the primary.
    let msgs = raw_exchange(
        &mut raw,
        &[parse_msg(
            "ins",
            "insert into public.log (v) values ($1) returning v, inet_server_port()",
        )],
    )
    .await;
    assert_eq!(tags(&msgs), "1Z");
    for i in 0..3 {
        move_around().await;
        let v = format!("raw-{i}");
        assert_eq!(
            raw_execute(&mut raw, "ins", &[&v]).await,
            Ok(vec![v.clone(), primary.clone()]),
            "prepared INSERT {i}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_statement_parsed_and_run_in_one_batch_is_routed_like_its_sql() {
    let env = Env::start(1).await;
    let (primary, replica) = (env.primary().to_string(), env.replica().to_string());
    let mut raw = RawConn::login(env.gw.port(), APP_USER, APP_PASSWORD).await;
    let other = env.client().await;
    // Parse + Bind + Describe + Execute + Sync in one write: how node-postgres runs a named
    // query the first time on a connection, and pgjdbc a statement once prepareThreshold is
    // reached.
    for (name, sql, param, want) in [
        (
            "sel",
            "select $1::int * 10, inet_server_port()",
            "4",
            vec!["40".to_string(), replica.clone()],
        ),
        (
            "ins",
            "insert into public.log (v) values ($1) returning v, inet_server_port()",
            "x",
            vec!["x".to_string(), primary.clone()],
        ),
    ] {
        let msgs = raw_exchange(
            &mut raw,
            &[
                parse_msg(name, sql),
                bind_msg(name, &[param]),
                describe_msg(b'P', ""),
                execute_msg(),
            ],
        )
        .await;
        assert_eq!(
            tags(&msgs),
            "12TDCZ",
            "{name}: Parse/Bind/Describe/Execute/Sync"
        );
        let rows = raw_rows(&msgs).map(|r| {
            r.into_iter()
                .map(|row| {
                    row.into_iter()
                        .map(Option::unwrap_or_default)
                        .collect::<Vec<_>>()
                })
                .collect::<Vec<_>>()
        });
        assert_eq!(
            rows,
            Ok(vec![want.clone()]),
            "`{sql}`: (value, server) of the first execution, in one batch with its Parse"
        );
        // Later executions: Bind/Execute only.
        for i in 0..3 {
            exec(
                &other,
                "insert into public.log (v) values ('other')",
                "other",
            )
            .await;
            assert_eq!(
                raw_execute(&mut raw, name, &[param]).await,
                Ok(want.clone()),
                "`{sql}`: (value, server) of execution {i} after the first"
            );
        }
    }

    // Errors about a statement name the client's statement, not pgway's.
    assert_eq!(
        raw_execute(&mut raw, "sel", &["1", "2"]).await,
        Err(
            "08P01: bind message supplies 2 parameters, but prepared statement \"sel\" \
             requires 1"
                .to_string()
        )
    );

    // SQL DEALLOCATE removes protocol-level statements too.
    let msgs = raw.query("DEALLOCATE sel").await;
    assert!(
        raw_rows(&msgs).is_ok(),
        "DEALLOCATE sel: {:?}",
        raw_rows(&msgs)
    );
    assert_eq!(
        raw_execute(&mut raw, "sel", &["1"]).await,
        Err("26000: prepared statement \"sel\" does not exist".to_string())
    );
    assert_eq!(
        raw_execute(&mut raw, "ins", &["y"]).await,
        Ok(vec!["y".to_string(), primary.clone()]),
        "DEALLOCATE sel leaves ins"
    );
    let msgs = raw.query("DEALLOCATE ALL").await;
    assert!(
        raw_rows(&msgs).is_ok(),
        "DEALLOCATE ALL: {:?}",
        raw_rows(&msgs)
    );
    assert_eq!(
        raw_execute(&mut raw, "ins", &["z"]).await,
        Err("26000: prepared statement \"ins\" does not exist".to_string()),
        "ins after DEALLOCATE ALL"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounded_statement_cache_never_loses_a_clients_statement() {
    // One server connection per node, at most 2 statements on each. Each read here must
    // land on the replica, after the client's own write (see `Env::start_with`).
    let env = Env::start_with(1, "statement_cache = 2").await;
    let (primary, replica) = (env.primary(), env.replica());
    let clients = [env.client().await, env.client().await];
    let mut statements = Vec::new();
    for (c, client) in clients.iter().enumerate() {
        let mut mine = Vec::new();
        for k in 0..3 {
            mine.push(
                client
                    .prepare(&format!("select $1::int4 + {k}, inet_server_port()"))
                    .await
                    .expect("prepare a read"),
            );
        }
        for k in 0..2 {
            mine.push(
                client
                    .prepare(&format!(
                        "insert into public.log (v) values ($1::text || '-{c}-{k}') \
                         returning v, inet_server_port()"
                    ))
                    .await
                    .expect("prepare a write"),
            );
        }
        statements.push(mine);
    }
    for round in 0..10i32 {
        let mut order: Vec<usize> = (0..5).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for &k in &order {
            for (c, client) in clients.iter().enumerate() {
                let stmt = &statements[c][k];
                let what = format!("round {round}, client {c}, statement {k}");
                let row = client
                    .query_one(
                        stmt,
                        &[if k < 3 {
                            &round as &(dyn tokio_postgres::types::ToSql + Sync)
                        } else {
                            &"r"
                        }],
                    )
                    .await
                    .unwrap_or_else(|e| panic!("{what}: {}", describe_error(&e)));
                if k < 3 {
                    assert_eq!(
                        (row.get::<_, i32>(0), row.get::<_, i32>(1) as u16),
                        (round + k as i32, replica),
                        "{what}"
                    );
                } else {
                    assert_eq!(
                        (row.get::<_, String>(0), row.get::<_, i32>(1) as u16),
                        (format!("r-{c}-{}", k - 3), primary),
                        "{what}"
                    );
                }
            }
        }
    }
    // The bound holds on both server connections.
    for target in TARGETS {
        let sql = probe_sql("select count(*) from pg_prepared_statements", target);
        let row = row_ok(&clients[0], &sql, Proto::Simple, "0").await;
        let n: usize = row[0].parse().expect("a count");
        assert!(
            n <= 2,
            "{n} statements prepared on the {target:?}'s server connection with statement_cache = 2"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Session-bound features pin the client to one primary connection
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_prepare_and_execute_pin_the_client_to_the_primary() {
    let env = Env::start(3).await;
    let a = env.client().await;
    let b = env.client().await;
    exec(
        &a,
        "PREPARE q(int) AS select $1 + 1, inet_server_port(), pg_backend_pid()",
        "A",
    )
    .await;
    let mut pids = std::collections::BTreeSet::new();
    for i in 0..6 {
        let proto = if i % 2 == 0 {
            Proto::Simple
        } else {
            Proto::Extended
        };
        let row = row_ok(&a, &format!("EXECUTE q({i})"), proto, "A").await;
        assert_eq!(
            (row[0].clone(), row[1].parse::<u16>().unwrap()),
            ((i + 1).to_string(), env.primary()),
            "EXECUTE q({i}) ({proto:?}): (value, server)"
        );
        pids.insert(row[2].clone());
        // Other clients keep working meanwhile.
        exec(&b, "insert into public.log (v) values ('b')", "B").await;
        let port = served_by(&b).await;
        assert_eq!(port, env.replica(), "B's read while A is pinned");
    }
    assert_eq!(
        pids.len(),
        1,
        "A's EXECUTEs ran on server connections {pids:?}"
    );
    exec(&a, "DEALLOCATE q", "A").await;
    expect_error(&a, "EXECUTE q(1)", Proto::Simple, "26000", "A").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_tables_pin_the_client_until_discard_all() {
    let env = Env::start(3).await;
    let a = env.client().await;
    let b = env.client().await;
    exec(&a, "create temp table tt (a int)", "A").await;
    for i in 1..=5 {
        let proto = if i % 2 == 0 {
            Proto::Simple
        } else {
            Proto::Extended
        };
        exec(&a, &format!("insert into tt values ({i})"), "A").await;
        let row = row_ok(
            &a,
            "select count(*), inet_server_port() from tt",
            proto,
            "A",
        )
        .await;
        assert_eq!(
            row,
            vec![i.to_string(), env.primary().to_string()],
            "A reads its temp table ({proto:?}) after {i} inserts"
        );
        // B does not see A's temporary table on any connection.
        for target in TARGETS {
            let row = row_ok(
                &b,
                &probe_sql("to_regclass('tt') is null", target),
                Proto::Simple,
                "B",
            )
            .await;
            assert_eq!(
                row[0], "true",
                "B must not see A's temp table on the {target:?}"
            );
        }
    }
    exec(&a, "DISCARD ALL", "A").await;
    expect_error(&a, "select count(*) from tt", Proto::Simple, "42P01", "A").await;
    // No longer pinned: A's reads go to the replica again.
    let port = eventually(
        "A's reads to go to the replica after DISCARD ALL",
        WAIT,
        async || {
            let p = try_served_by(&a).await.map_err(|e| describe_error(&e))?;
            if p == env.replica() {
                Ok(p)
            } else {
                Err(format!("served by {}", env.name(p)))
            }
        },
    )
    .await;
    assert_eq!(port, env.replica());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_advisory_locks_stay_with_the_client_until_it_leaves() {
    let env = Env::start(3).await;
    let a = env.client().await;
    let b = env.client().await;
    let value = async |c: &Client, who: &str, sql: &str| -> String {
        row_ok(c, sql, Proto::Simple, who).await[0].clone()
    };
    assert_eq!(
        value(&a, "A", "select pg_advisory_lock(42)::text").await,
        ""
    );
    assert_eq!(
        value(&b, "B", "select pg_try_advisory_lock(42)").await,
        "f",
        "B must not get the lock A holds"
    );
    // A's other statements keep working, and A can unlock it (on the same server session).
    exec(&a, "insert into public.log (v) values ('a')", "A").await;
    row_ok(&a, "select 1", Proto::Extended, "A").await;
    assert_eq!(
        value(&a, "A", "select pg_advisory_unlock(42)").await,
        "t",
        "A's unlock must run where A's lock is"
    );
    assert_eq!(value(&b, "B", "select pg_try_advisory_lock(42)").await, "t");
    assert_eq!(value(&b, "B", "select pg_advisory_unlock(42)").await, "t");

    // A takes it again and leaves: the lock goes with A's session.
    assert_eq!(
        value(&a, "A", "select pg_advisory_lock(42)::text").await,
        ""
    );
    assert_eq!(value(&b, "B", "select pg_try_advisory_lock(42)").await, "f");
    drop(a);
    eventually("B to get lock 42 after A left", WAIT, async || {
        let v = value(&b, "B", "select pg_try_advisory_lock(42)").await;
        if v == "t" {
            Ok(())
        } else {
            Err(format!("pg_try_advisory_lock(42) = {v}"))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_delivers_notifications_to_an_idle_client() {
    let env = Env::start(3).await;
    let mut listener = session(env.gw.port(), APP_USER, APP_PASSWORD).await;
    exec(&listener.client, "LISTEN pgway_chan", "listener").await;
    let notifier = env.client().await;
    let mut next_notification = async || {
        tokio::time::timeout(Duration::from_secs(15), async {
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
        .await
    };
    // Other traffic first, so that the listener's server connection would be reused if it
    // were not pinned.
    for _ in 0..3 {
        exec(
            &notifier,
            "insert into public.log (v) values ('n')",
            "notifier",
        )
        .await;
    }
    exec(&notifier, "NOTIFY pgway_chan, 'hello'", "notifier").await;
    assert_eq!(
        next_notification().await,
        Ok(Some(("pgway_chan".to_string(), "hello".to_string()))),
        "notification for an idle LISTENing client (Err = none within 15 s)"
    );
    // The listener keeps working and keeps receiving.
    row_ok(&listener.client, "select 1", Proto::Extended, "listener").await;
    exec(
        &notifier,
        "select pg_notify('pgway_chan', 'second')",
        "notifier",
    )
    .await;
    assert_eq!(
        next_notification().await,
        Ok(Some(("pgway_chan".to_string(), "second".to_string()))),
        "second notification"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_hold_cursor_survives_between_statements() {
    let env = Env::start(3).await;
    let a = env.client().await;
    let b = env.client().await;
    exec(
        &a,
        "DECLARE c CURSOR WITH HOLD FOR select generate_series(1, 10)",
        "A",
    )
    .await;
    let fetch = async || -> Vec<String> {
        simple_rows(&a, "FETCH 3 FROM c")
            .await
            .unwrap_or_else(|e| panic!("FETCH 3 FROM c: {}", describe_error(&e)))
            .into_iter()
            .map(|r| r[0].clone().unwrap_or_default())
            .collect()
    };
    assert_eq!(fetch().await, ["1", "2", "3"]);
    exec(&b, "insert into public.log (v) values ('b')", "B").await;
    row_ok(&b, "select 1", Proto::Simple, "B").await;
    row_ok(&a, "select 1", Proto::Extended, "A").await;
    assert_eq!(fetch().await, ["4", "5", "6"]);
    exec(&a, "CLOSE c", "A").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_connection_is_cleaned_and_released_when_the_client_is_done() {
    // One primary connection: a pinned client holds it, so it must come back clean.
    let env = Env::start(1).await;
    let b = env.client().await;
    let clean = async || {
        // B's write waits for the connection, then finds none of A's state there.
        // (B only looks at pg_locks: taking an advisory lock would pin B in turn.)
        let row = row_ok(
            &b,
            &probe_sql(
                "(to_regclass('tt') is null)::text || ',' || \
                 (select count(*) from pg_locks where locktype = 'advisory')",
                Target::Primary,
            ),
            Proto::Simple,
            "B",
        )
        .await;
        assert_eq!(
            row[0], "true,0",
            "B on the primary's only connection after A: (no temp table tt, advisory locks held)"
        );
    };

    // Released by DISCARD ALL.
    let a = env.client().await;
    exec(
        &a,
        "create temp table tt (a int); insert into tt values (1)",
        "A",
    )
    .await;
    exec(&a, "DISCARD ALL", "A").await;
    clean().await;
    drop(a);

    // Released by leaving, with a temp table and a session lock.
    let a = env.client().await;
    exec(&a, "create temp table tt (a int)", "A").await;
    exec(&a, "select pg_advisory_lock(43)", "A").await;
    drop(a);
    clean().await;
}

// ---------------------------------------------------------------------------------------
// Cancel
// ---------------------------------------------------------------------------------------

/// Waits until a query containing `needle` is active on some node; returns that node's port.
async fn wait_running(env: &Env, needle: &str) -> u16 {
    let ports = [env.primary(), env.replica()];
    eventually(&format!("`{needle}` to be running"), WAIT, async || {
        for port in ports {
            let n = try_psql(
                port,
                DB,
                &format!(
                    "select count(*) from pg_stat_activity where state = 'active' \
                     and query like '%{needle}%' and pid <> pg_backend_pid()"
                ),
            )?;
            if n != "0" {
                return Ok(port);
            }
        }
        Err("not running on any node".to_string())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_ctrl_c_cancels_the_running_query() {
    let env = Env::start(2).await;
    let started = Instant::now();
    let child = tokio::process::Command::new(pg_bin("psql"))
        .arg(env.gw.dsn(APP_USER, APP_PASSWORD, DB))
        .args(["-X", "-c", "select pg_sleep(30)"])
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGPASSWORD")
        .env_remove("PGSERVICE")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawning psql");
    let pid = child.id().expect("psql's pid");
    let port = wait_running(&env, "pg_sleep(30)").await;
    assert_eq!(port, env.replica(), "psql's read runs on the replica");
    // What Ctrl-C in a terminal does: SIGINT to psql, which sends a CancelRequest.
    let status = std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .expect("kill -INT");
    assert!(status.success());
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("psql must stop within 20 s of Ctrl-C")
        .expect("psql's output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("canceling statement due to user request"),
        "psql after Ctrl-C ({}): stderr {stderr}",
        out.status
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "psql's exit status; stderr {stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "the query was not cancelled: psql ran {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_the_clients_query_on_replica_and_primary() {
    let env = Env::start(2).await;
    for (target, sql, needle) in [
        (Target::Replica, "select pg_sleep(31)", "pg_sleep(31)"),
        (
            Target::Primary,
            "insert into public.log (v) select 'x' from pg_sleep(32)",
            "pg_sleep(32)",
        ),
    ] {
        let client = env.client().await;
        let token = client.cancel_token();
        let sql_owned = sql.to_string();
        let running = tokio::spawn(async move {
            let r = client.query(sql_owned.as_str(), &[]).await.map(|_| ());
            (client, r)
        });
        let port = wait_running(&env, needle).await;
        assert_eq!(port, env.port_of(target), "`{sql}` runs on the {target:?}");
        token
            .cancel_query(NoTls)
            .await
            .expect("sending the cancel request");
        let (client, result) = tokio::time::timeout(Duration::from_secs(20), running)
            .await
            .expect("the query must stop within 20 s of the cancel")
            .expect("query task");
        let err = result.expect_err("a cancelled query fails");
        assert_eq!(sqlstate(&err), "57014", "{}", describe_error(&err));
        assert_eq!(
            err.as_db_error().map(|d| d.message()),
            Some("canceling statement due to user request")
        );
        // The session goes on.
        assert_eq!(served_by(&client).await, env.replica());
    }

    // Inside a transaction.
    let client = env.client().await;
    exec(&client, "begin", "A").await;
    let token = client.cancel_token();
    let running = tokio::spawn(async move {
        let r = client.simple_query("select pg_sleep(33)").await.map(|_| ());
        (client, r)
    });
    wait_running(&env, "pg_sleep(33)").await;
    token.cancel_query(NoTls).await.expect("cancel");
    let (client, result) = tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .expect("cancelled within 20 s")
        .expect("task");
    assert_eq!(sqlstate(&result.expect_err("cancelled")), "57014");
    exec(&client, "rollback", "A").await;
    assert_eq!(served_by(&client).await, env.replica());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_from_an_idle_client_does_nothing() {
    // One connection per node: the idle client's last server connection now runs B's query.
    let env = Env::start(1).await;
    let a = env.client().await;
    let b = env.client().await;
    for (target, sql, needle) in [
        (
            Target::Replica,
            "select pg_sleep(3)::text, inet_server_port()",
            "pg_sleep(3)",
        ),
        (
            Target::Primary,
            "select pg_sleep(2.5)::text, inet_server_port(), txid_current()",
            "pg_sleep(2.5)",
        ),
    ] {
        // A used this node's only connection last.
        row_ok(&a, &probe_sql("1", target), Proto::Simple, "A").await;
        let b2 = connect(env.gw.port(), APP_USER, APP_PASSWORD).await;
        let sql_owned = sql.to_string();
        let running = tokio::spawn(async move {
            let r = first_row(&b2, &sql_owned, Proto::Extended).await;
            drop(b2);
            r
        });
        wait_running(&env, needle).await;
        a.cancel_token()
            .cancel_query(NoTls)
            .await
            .expect("sending A's cancel request");
        let result = running.await.expect("B's task");
        let row = result.unwrap_or_else(|e| {
            panic!("A's cancel (A has no running query) stopped another client's `{sql}`: {e}")
        });
        assert_eq!(row[1], env.port_of(target).to_string());
    }
    // A cancel while idle is not kept for A's next query.
    a.cancel_token().cancel_query(NoTls).await.expect("cancel");
    tokio::time::sleep(Duration::from_millis(200)).await;
    for sql in [
        "select pg_sleep(0.5)",
        "select pg_sleep(0.5), txid_current()",
    ] {
        a.simple_query(sql)
            .await
            .unwrap_or_else(|e| panic!("A's `{sql}` after an idle cancel: {}", describe_error(&e)));
    }
    row_ok(&b, "select 1", Proto::Simple, "B").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_is_unpinned_once_its_session_bound_state_is_gone() {
    let env = Env::start(3).await;
    let a = env.client().await;
    let served = async |what: &str| -> u16 {
        let port = try_served_by(&a)
            .await
            .unwrap_or_else(|e| panic!("{what}: {}", describe_error(&e)));
        assert!(
            port == env.primary() || port == env.replica(),
            "{what}: served by {}",
            env.name(port)
        );
        port
    };
    for (take, give_back) in [
        ("create temp table tt (i int)", "drop table tt"),
        ("select pg_advisory_lock(7)", "select pg_advisory_unlock(7)"),
        ("listen pgway_unpin", "unlisten *"),
        ("prepare p as select 1", "deallocate p"),
        (
            "begin; declare c cursor with hold for select 1; commit",
            "close c",
        ),
    ] {
        exec(&a, take, "A").await;
        assert_eq!(
            served(take).await,
            env.primary(),
            "after `{take}` A's reads stay on its primary connection"
        );
        exec(&a, give_back, "A").await;
        assert_eq!(
            served(give_back).await,
            env.replica(),
            "after `{give_back}` nothing holds A: its reads go to the replica again"
        );
    }
    // Two pins, one given back: still pinned.
    exec(&a, "select pg_advisory_lock(8)", "A").await;
    exec(&a, "listen pgway_unpin", "A").await;
    exec(&a, "unlisten *", "A").await;
    assert_eq!(served("one of two pins left").await, env.primary());
    exec(&a, "select pg_advisory_unlock(8)", "A").await;
    assert_eq!(served("both given back").await, env.replica());
}
