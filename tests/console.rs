//! The admin console (database `pgway`) against real servers: psql runs every SHOW
//! command and gets pgbouncer's column names (SHOW CLIENTS lists the console itself, SHOW
//! STATS counts statements), a non-admin is refused with 42501, PAUSE holds new
//! transactions until RESUME while clients loop short transactions, PAUSE <db> holds only
//! that database's clients, and KILL_CLIENT ends the listed client only (a console
//! connection, itself included).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test step that cannot go on fails the test, with its message"
)]

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio_postgres::SimpleQueryMessage;

const ADMIN_USER: &str = "pgway_admin";
const ADMIN_PASSWORD: &str = "admin-secret";

/// A gateway whose config has, after the usual users, an admin (last: the first user is
/// the one pgway's own checks log in as, and the admin has no role on the servers).
fn gateway(cluster: &Cluster, opts: GatewayOptions) -> Gateway {
    Gateway::start_toml(|listen| {
        format!(
            "{}\n[[users]]\nname = \"{ADMIN_USER}\"\npassword = \"{ADMIN_PASSWORD}\"\nadmin = true\n",
            gateway_toml(cluster, listen, "127.0.0.1:0", &opts)
        )
    })
}

/// psql `-c sql` on database `pgway` as the admin: the header and rows (unaligned, `|`),
/// or stderr (verbose: with the SQLSTATE).
fn console(port: u16, sql: &str) -> Result<(Vec<String>, Vec<Vec<String>>), String> {
    let out = Command::new(pg_bin("psql"))
        .args(["-X", "-A", "-F", "|", "-P", "footer=off"])
        .args(["-v", "ON_ERROR_STOP=1", "-v", "VERBOSITY=verbose"])
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-U", ADMIN_USER, "-d", "pgway", "-c", sql])
        .env("PGPASSWORD", ADMIN_PASSWORD)
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGSERVICE")
        .output()
        .expect("running psql");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines().filter(|l| !l.is_empty());
    let header = lines
        .next()
        .map(|h| h.split('|').map(str::to_owned).collect())
        .unwrap_or_default();
    let rows = lines
        .map(|l| l.split('|').map(str::to_owned).collect())
        .collect();
    Ok((header, rows))
}

/// [`console`] run off the async runtime.
async fn console_async(port: u16, sql: &str) -> Result<(Vec<String>, Vec<Vec<String>>), String> {
    let sql = sql.to_owned();
    tokio::task::spawn_blocking(move || console(port, &sql))
        .await
        .expect("psql task")
}

/// The rows of `SHOW ...` as column-name maps.
fn records(header: &[String], rows: &[Vec<String>]) -> Vec<HashMap<String, String>> {
    rows.iter()
        .map(|row| header.iter().cloned().zip(row.iter().cloned()).collect())
        .collect()
}

async fn show(port: u16, what: &str) -> Vec<HashMap<String, String>> {
    let (header, rows) = console_async(port, &format!("SHOW {what}"))
        .await
        .unwrap_or_else(|e| panic!("SHOW {what}: {e}"));
    records(&header, &rows)
}

/// `SHOW CLIENTS` without console connections (database `pgway`).
async fn app_clients(port: u16) -> Vec<HashMap<String, String>> {
    let mut clients = show(port, "CLIENTS").await;
    clients.retain(|c| c["database"] != "pgway");
    clients
}

/// `SHOW STATS`' `total_query_count` of `database` (0 when it has no row yet).
async fn query_count(port: u16, database: &str) -> u64 {
    show(port, "STATS")
        .await
        .iter()
        .find(|s| s["database"] == database)
        .map_or(0, |s| {
            s["total_query_count"]
                .parse()
                .unwrap_or_else(|e| panic!("total_query_count of {database}: {e}: {s:?}"))
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_commands_answer_with_pgbouncer_columns() {
    let cluster = Cluster::start(1);
    let gw = gateway(&cluster, GatewayOptions::default());
    gw.wait_for_replica_reads(&cluster).await;
    let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    client.simple_query("select 1").await.expect("a read");
    let port = gw.port();

    let expect_columns = |what: &str, header: &[String], wanted: &[&str]| {
        for column in wanted {
            assert!(
                header.iter().any(|h| h == column),
                "SHOW {what} lacks column {column}: {header:?}"
            );
        }
    };
    let (header, rows) = console_async(port, "SHOW POOLS").await.expect("SHOW POOLS");
    expect_columns(
        "POOLS",
        &header,
        &[
            "database",
            "user",
            "cl_active",
            "cl_waiting",
            "sv_active",
            "sv_idle",
            "maxwait",
            "pool_mode",
        ],
    );
    let pools = records(&header, &rows);
    let app = pools
        .iter()
        .find(|p| p["database"] == DB && p["user"] == APP_USER)
        .unwrap_or_else(|| panic!("no pool for {APP_USER}: {pools:?}"));
    assert_eq!(app["cl_active"], "1", "{app:?}");
    assert_eq!(app["cl_waiting"], "0", "{app:?}");
    assert_eq!(app["pool_mode"], "transaction");
    assert!(app["sv_idle"].parse::<u32>().unwrap() >= 1, "{app:?}");

    let (header, rows) = console_async(port, "SHOW CLIENTS")
        .await
        .expect("SHOW CLIENTS");
    expect_columns(
        "CLIENTS",
        &header,
        &[
            "type", "user", "database", "state", "addr", "port", "link", "id",
        ],
    );
    let mut clients = records(&header, &rows);
    // The console connection that asks is listed too, as pgbouncer lists its own.
    let consoles: Vec<_> = clients
        .iter()
        .filter(|c| c["database"] == "pgway")
        .cloned()
        .collect();
    assert_eq!(consoles.len(), 1, "{clients:?}");
    assert_eq!(consoles[0]["user"], ADMIN_USER);
    assert_eq!(consoles[0]["type"], "C");
    assert!(consoles[0]["id"].parse::<u64>().is_ok(), "{consoles:?}");
    clients.retain(|c| c["database"] != "pgway");
    assert_eq!(clients.len(), 1, "{clients:?}");
    assert_eq!(clients[0]["user"], APP_USER);
    assert_eq!(clients[0]["database"], DB);
    assert_eq!(clients[0]["addr"], "127.0.0.1");
    assert_eq!(clients[0]["application_name"], "pgway-tests");
    assert!(clients[0]["id"].parse::<u64>().is_ok(), "{clients:?}");

    let (header, _) = console_async(port, "SHOW SERVERS")
        .await
        .expect("SHOW SERVERS");
    expect_columns(
        "SERVERS",
        &header,
        &[
            "type",
            "user",
            "database",
            "state",
            "addr",
            "port",
            "remote_pid",
        ],
    );
    let servers = show(port, "SERVERS").await;
    assert!(
        servers
            .iter()
            .any(|s| s["user"] == APP_USER && s["state"] == "idle"),
        "{servers:?}"
    );

    let stats = show(port, "STATS").await;
    let db = stats
        .iter()
        .find(|s| s["database"] == DB)
        .unwrap_or_else(|| panic!("no stats for {DB}: {stats:?}"));
    assert!(
        db["total_xact_count"].parse::<u64>().unwrap() >= 1,
        "{db:?}"
    );
    expect_columns(
        "STATS",
        &db.keys().cloned().collect::<Vec<_>>(),
        &[
            "total_server_assignment_count",
            "total_xact_count",
            "total_query_count",
            "total_xact_time",
            "total_wait_time",
            "avg_xact_time",
        ],
    );

    let topology = show(port, "TOPOLOGY").await;
    assert_eq!(topology.len(), 2, "{topology:?}");
    assert!(
        topology.iter().any(|n| n["role"] == "primary"),
        "{topology:?}"
    );
    assert!(
        topology.iter().any(|n| n["role"] == "replica"),
        "{topology:?}"
    );

    let cache = show(port, "CACHE").await;
    assert!(
        cache
            .iter()
            .any(|r| r["key"] == "enabled" && r["value"] == "false"),
        "{cache:?}"
    );
    let config = show(port, "CONFIG").await;
    assert!(
        config
            .iter()
            .any(|r| r["key"] == "pool.size" && r["value"] == "4"),
        "{config:?}"
    );
    assert!(
        !config.iter().any(|r| r["value"].contains(APP_PASSWORD)),
        "passwords stay out: {config:?}"
    );

    // The same file again: nothing changes, the console says RELOAD.
    console_async(port, "RELOAD")
        .await
        .unwrap_or_else(|e| panic!("RELOAD: {e}"));
    let unknown = console_async(port, "SHOW NONSENSE").await.unwrap_err();
    assert!(unknown.contains("42601"), "{unknown}");
    let unknown = console_async(port, "DROP TABLE t").await.unwrap_err();
    assert!(
        unknown.contains("42601") && unknown.contains("unrecognized admin command"),
        "{unknown}"
    );

    // The extended protocol is refused; the simple one works from any driver.
    let admin = try_session(port, ADMIN_USER, ADMIN_PASSWORD, "pgway")
        .await
        .expect("admin login")
        .client;
    let e = admin.query("SHOW POOLS", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "0A000", "{}", describe_error(&e));
    let rows = admin.simple_query("SHOW CLIENTS").await.expect("simple");
    assert!(rows
        .iter()
        .any(|m| matches!(m, SimpleQueryMessage::Row(r) if r.get("user") == Some(APP_USER))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_without_admin_is_refused_the_console() {
    let cluster = Cluster::start(0);
    let gw = gateway(&cluster, GatewayOptions::default());
    let e = try_session(gw.port(), APP_USER, APP_PASSWORD, "pgway")
        .await
        .err()
        .expect("refused");
    assert_eq!(sqlstate(&e), "42501", "{}", describe_error(&e));
    // A wrong password is a password failure, not a hint that the user is an admin.
    let e = try_session(gw.port(), ADMIN_USER, "wrong", "pgway")
        .await
        .err()
        .expect("refused");
    assert_eq!(sqlstate(&e), "28P01", "{}", describe_error(&e));
    // The same user still reaches its database.
    let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    client.simple_query("select 1").await.expect("a read");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pause_holds_new_transactions_until_resume() {
    let cluster = Cluster::start_with_schema(0, "SET ROLE app;\nCREATE TABLE t (i int);\n");
    let gw = gateway(&cluster, GatewayOptions::default());
    let port = gw.port();
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut loops = Vec::new();
    for i in 0..4 {
        let client = connect(port, APP_USER, APP_PASSWORD).await;
        let (done, stop) = (Arc::clone(&done), Arc::clone(&stop));
        loops.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                // A transaction over several round trips: PAUSE lets it finish.
                client.simple_query("begin").await?;
                client
                    .simple_query(&format!("insert into t values ({i})"))
                    .await?;
                client.simple_query("select pg_sleep(0.005)").await?;
                client.simple_query("commit").await?;
                done.fetch_add(1, Ordering::SeqCst);
                n += 1;
            }
            Ok::<u64, tokio_postgres::Error>(n)
        }));
    }
    eventually("transactions running", WAIT, async || {
        let n = done.load(Ordering::SeqCst);
        if n >= 20 {
            Ok(())
        } else {
            Err(format!("{n} done"))
        }
    })
    .await;

    console_async(port, "PAUSE").await.expect("PAUSE");
    let paused_at = done.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        done.load(Ordering::SeqCst),
        paused_at,
        "no transaction completes while paused"
    );
    let pools = show(port, "POOLS").await;
    let app = pools
        .iter()
        .find(|p| p["user"] == APP_USER)
        .expect("app pool");
    assert_eq!(app["cl_waiting"], "4", "{app:?}");
    assert_eq!(app["sv_active"], "0", "{app:?}");
    let clients = app_clients(port).await;
    assert_eq!(clients.len(), 4, "{clients:?}");
    assert!(
        clients.iter().all(|c| c["state"] == "waiting"),
        "{clients:?}"
    );

    console_async(port, "RESUME").await.expect("RESUME");
    eventually("transactions again", WAIT, async || {
        let n = done.load(Ordering::SeqCst);
        if n >= paused_at + 20 {
            Ok(())
        } else {
            Err(format!("{n} done, {paused_at} at the pause"))
        }
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for l in loops {
        let n = l.await.expect("loop task").expect("no client error");
        assert!(n > 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_client_ends_the_listed_client() {
    let cluster = Cluster::start(0);
    let gw = gateway(&cluster, GatewayOptions::default());
    let port = gw.port();
    let victim = connect(port, APP_USER, APP_PASSWORD).await;
    victim.simple_query("select 1").await.expect("a read");
    let clients = app_clients(port).await;
    assert_eq!(clients.len(), 1, "{clients:?}");
    let id = clients[0]["id"].clone();
    let other = connect(port, APP_USER, APP_PASSWORD).await;
    other.simple_query("select 1").await.expect("a read");

    console_async(port, &format!("KILL_CLIENT {id}"))
        .await
        .expect("KILL_CLIENT");
    eventually("the client gone from SHOW CLIENTS", WAIT, async || {
        let clients = app_clients(port).await;
        if clients.len() == 1 && clients[0]["id"] != id {
            Ok(())
        } else {
            Err(format!("{clients:?}"))
        }
    })
    .await;
    assert!(
        victim.simple_query("select 1").await.is_err(),
        "the killed client's next query fails"
    );
    other
        .simple_query("select 1")
        .await
        .expect("the other client carries on");
    let unknown = console_async(port, "KILL_CLIENT 999999").await.unwrap_err();
    assert!(unknown.contains("42704"), "{unknown}");

    // A console connection can be killed too: this one kills itself. The command
    // completes, then the connection ends with 57P01.
    let admin = try_session(port, ADMIN_USER, ADMIN_PASSWORD, "pgway")
        .await
        .expect("admin login")
        .client;
    let own: Vec<String> = admin
        .simple_query("SHOW CLIENTS")
        .await
        .expect("SHOW CLIENTS")
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) if r.get("database") == Some("pgway") => {
                r.get("id").map(str::to_owned)
            }
            _ => None,
        })
        .collect();
    assert_eq!(own.len(), 1, "only this console connection: {own:?}");
    admin
        .simple_query(&format!("KILL_CLIENT {}", own[0]))
        .await
        .expect("KILL_CLIENT of itself completes");
    let e = eventually("the console connection to end", WAIT, async || match admin
        .simple_query("SHOW CLIENTS")
        .await
    {
        Err(e) => Ok(e),
        Ok(_) => Err("still served".to_owned()),
    })
    .await;
    // FATAL 57P01, then the connection closes: the next query sees one or the other,
    // depending on whether tokio-postgres read the FATAL before it sent the query.
    let text = describe_error(&e);
    assert!(
        text.contains("57P01") || text.contains("connection closed"),
        "{text}"
    );
    eventually(
        "the console connection gone from SHOW CLIENTS",
        WAIT,
        async || {
            let clients = show(port, "CLIENTS").await;
            if clients.iter().any(|c| c["id"] == own[0]) {
                Err(format!("{clients:?}"))
            } else {
                Ok(())
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_stats_counts_each_statement() {
    let cluster = Cluster::start(0);
    let gw = gateway(&cluster, GatewayOptions::default());
    let port = gw.port();
    let client = connect(port, APP_USER, APP_PASSWORD).await;
    client.simple_query("select 1").await.expect("warm-up");
    let before = query_count(port, DB).await;
    // Simple queries, one statement each, in and outside a transaction.
    client.simple_query("select 1").await.expect("a read");
    client.simple_query("begin").await.expect("begin");
    client.simple_query("select 2").await.expect("a read");
    client.simple_query("commit").await.expect("commit");
    // The extended protocol: each Execute is a statement (preparing one is not).
    let statement = client.prepare("select $1::int").await.expect("prepare");
    for i in 0..3i32 {
        let row = client.query_one(&statement, &[&i]).await.expect("execute");
        assert_eq!(row.get::<_, i32>(0), i);
    }
    // A statement the server refuses is a statement run too.
    client
        .simple_query("select * from no_such_table")
        .await
        .expect_err("an undefined table");
    let ran = 4 + 3 + 1;
    let after = query_count(port, DB).await;
    assert_eq!(after, before + ran, "{before} -> {after}");
    // A client that leaves keeps its count.
    drop(client);
    eventually("the client to leave", WAIT, async || {
        match app_clients(port).await.len() {
            0 => Ok(()),
            n => Err(format!("{n} clients")),
        }
    })
    .await;
    assert_eq!(query_count(port, DB).await, after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_of_one_database_holds_only_its_clients() {
    let cluster = Cluster::start(0);
    let gw = gateway(&cluster, GatewayOptions::default());
    let port = gw.port();
    let held = connect(port, APP_USER, APP_PASSWORD).await;
    held.simple_query("select 1").await.expect("a read");
    let other = try_session(port, APP_USER, APP_PASSWORD, "postgres")
        .await
        .expect("a client of database postgres")
        .client;
    other.simple_query("select 1").await.expect("a read");

    console_async(port, &format!("PAUSE {DB}"))
        .await
        .expect("PAUSE <db>");
    let waiting = tokio::spawn(async move {
        let rows = simple_rows(&held, "select 42").await;
        (held, rows)
    });
    // A client of another database goes on.
    let value = tokio::time::timeout(WAIT, simple_value(&other, "select 7"))
        .await
        .expect("a client of another database is not held")
        .expect("a read on database postgres");
    assert_eq!(value, "7");
    eventually(
        "the client of the paused database to wait",
        WAIT,
        async || {
            let clients = app_clients(port).await;
            let mine: Vec<_> = clients.iter().filter(|c| c["database"] == DB).collect();
            if mine.len() == 1 && mine[0]["state"] == "waiting" {
                Ok(())
            } else {
                Err(format!("{clients:?}"))
            }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "the paused database's client waits");
    let pools = show(port, "POOLS").await;
    let paused = pools
        .iter()
        .find(|p| p["database"] == DB && p["user"] == APP_USER)
        .unwrap_or_else(|| panic!("no pool for {DB}: {pools:?}"));
    assert_eq!(paused["cl_waiting"], "1", "{pools:?}");
    let postgres = pools
        .iter()
        .find(|p| p["database"] == "postgres")
        .unwrap_or_else(|| panic!("no pool for postgres: {pools:?}"));
    assert_eq!(postgres["cl_waiting"], "0", "{pools:?}");
    assert!(
        show(port, "STATS")
            .await
            .iter()
            .any(|s| s["database"] == DB),
        "SHOW STATS answers while paused"
    );
    // Neither the console nor a database that is not paused can be resumed one by one.
    let e = console_async(port, "RESUME postgres").await.unwrap_err();
    assert!(e.contains("55000") && e.contains("not paused"), "{e}");
    let e = console_async(port, "PAUSE pgway").await.unwrap_err();
    assert!(e.contains("55000"), "{e}");

    console_async(port, &format!("RESUME {DB}"))
        .await
        .expect("RESUME <db>");
    let (held, rows) = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("the held client goes on after RESUME <db>")
        .expect("the held client's task");
    let rows = rows.expect("no error for the held client");
    assert_eq!(rows, vec![vec![Some("42".to_owned())]]);
    held.simple_query("select 1").await.expect("and goes on");

    // PAUSE without a database still holds every database; RESUME lets all go.
    console_async(port, &format!("PAUSE {DB}"))
        .await
        .expect("PAUSE <db>");
    console_async(port, "PAUSE").await.expect("PAUSE");
    let e = console_async(port, &format!("RESUME {DB}"))
        .await
        .unwrap_err();
    assert!(e.contains("55000") && e.contains("as a whole"), "{e}");
    let other_waits = tokio::spawn(async move {
        let value = simple_value(&other, "select 8").await;
        (other, value)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!other_waits.is_finished(), "PAUSE holds every database");
    console_async(port, "RESUME").await.expect("RESUME");
    let (_, value) = tokio::time::timeout(WAIT, other_waits)
        .await
        .expect("RESUME lets every client go")
        .expect("the client's task");
    assert_eq!(value.expect("no error after RESUME"), "8");
    held.simple_query("select 1")
        .await
        .expect("the database paused one by one is resumed too");
}
