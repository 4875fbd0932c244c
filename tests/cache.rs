//! The result cache against real PostgreSQL: what is served from memory, and that nothing
//! stale or foreign is. Every test drives pgway the way a user would and checks what a user
//! would check: the rows, `SHOW pgway.last_route` (a statement answered from the cache says
//! `cache...`), the admin port's `GET /cache`, `pg_stat_statements` and `pg_replication_slots`
//! on the servers.
//!
//! Timing bounds (invalidation within 1 s of a commit) are measured by polling every 10 ms;
//! each measured delay is printed (`--nocapture` shows it).
//!
//! `PGWAY_CACHE_CHECK_SECS` sets how long the consistency checker runs (default 8).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test step that cannot go on fails the test, with its message"
)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tokio_postgres::Client;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// The bound the contract sets on invalidation after a commit pgway did not make.
const INVALIDATION_BOUND: Duration = Duration::from_secs(1);

/// How long a bounded poll keeps going past its bound, so that a failure reports the
/// actual delay (or that it never happened).
const POLL_LIMIT: Duration = Duration::from_secs(10);

/// A `[cache]` table: enabled, `keys` as extra lines (e.g. `max_memory = "1MB"`), the WAL
/// stream when `wal`, and one rule over `tables` with `ttl` (no rule when `tables` is
/// empty).
fn cache_toml(wal: bool, keys: &str, tables: &[&str], ttl: &str) -> String {
    let mut toml = format!("[cache]\nenabled = true\n{keys}\n");
    if wal {
        toml.push_str(&format!(
            "wal_user = \"{WAL_USER}\"\nwal_password = \"{WAL_PASSWORD}\"\n"
        ));
    }
    if !tables.is_empty() {
        let list: Vec<String> = tables.iter().map(|t| format!("\"{t}\"")).collect();
        toml.push_str(&format!(
            "\n[[cache.rules]]\ntables = [{}]\nttl = \"{ttl}\"\n",
            list.join(", ")
        ));
    }
    toml
}

/// pgway with the cache section `cache` and an admin port; returns it and the admin port.
fn start_gateway(cluster: &Cluster, cache: String) -> (Gateway, u16) {
    let admin = free_loopback_port();
    let opts = GatewayOptions {
        extra: cache,
        ..GatewayOptions::default()
    };
    (Gateway::start_with_admin(cluster, opts, admin), admin)
}

/// `GET /cache` on the admin port, as JSON.
async fn cache_stats(admin: u16) -> Result<serde_json::Value, String> {
    let response = http_get(admin, "/cache").await?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP body in {response:?}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("GET /cache: {head}\n{body}"));
    }
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    serde_json::from_str(&body).map_err(|e| format!("/cache is not JSON ({e}): {body}"))
}

/// The body of a chunked HTTP response.
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

/// [`cache_stats`] that panics on failure.
async fn stats(admin: u16) -> serde_json::Value {
    cache_stats(admin)
        .await
        .unwrap_or_else(|e| panic!("GET /cache: {e}"))
}

/// A counter of `/cache` (0 when missing).
fn counter(stats: &serde_json::Value, name: &str) -> u64 {
    stats[name].as_u64().unwrap_or(0)
}

/// Waits until `/cache` shows the invalidation stream of `appdb` in state `following`,
/// running `warm_up` through `client` on every attempt (in case streams start with a
/// database's first cacheable read).
async fn wait_following(admin: u16, client: &Client, warm_up: &str) {
    eventually(
        "the cache's WAL stream for appdb to be following",
        WAIT,
        async || {
            let _ = client.simple_query(warm_up).await;
            let s = match cache_stats(admin).await {
                Err(e) if e.contains(" 404 ") => panic!("GET /cache: {e}"),
                other => other?,
            };
            let following = s["streams"].as_array().is_some_and(|streams| {
                streams
                    .iter()
                    .any(|st| st["database"] == DB && st["state"] == "following")
            });
            if following {
                Ok(())
            } else {
                Err(format!("/cache: {s}"))
            }
        },
    )
    .await;
}

/// `SHOW pgway.last_route`.
async fn last_route(client: &Client) -> String {
    simple_value(client, "show pgway.last_route")
        .await
        .unwrap_or_else(|e| panic!("show pgway.last_route: {}", describe_error(&e)))
}

fn is_cache(route: &str) -> bool {
    route.starts_with("cache")
}

/// Runs `sql` (simple protocol) and returns its rows and the route it took.
async fn read(client: &Client, sql: &str) -> (Vec<Vec<Option<String>>>, String) {
    let rows = simple_rows(client, sql)
        .await
        .unwrap_or_else(|e| panic!("`{sql}`: {}", describe_error(&e)));
    (rows, last_route(client).await)
}

/// The first column of the first row of `sql` (simple protocol) and the route it took.
async fn read_value(client: &Client, sql: &str) -> (String, String) {
    let (rows, route) = read(client, sql).await;
    let value = rows
        .first()
        .and_then(|r| r.first().cloned().flatten())
        .unwrap_or_else(|| panic!("`{sql}` returned no value: {rows:?}"));
    (value, route)
}

/// Reads `sql` until a read is answered from the cache (so an entry holding `want`
/// exists), asserting every value is `want`. Right after a write the cache may be bypassed
/// for a moment (until the WAL stream has decoded the writer's commit), so the hit may take
/// a few reads; more than 1 s fails.
async fn fill(client: &Client, sql: &str, want: &str) {
    let start = Instant::now();
    let mut routes = Vec::new();
    loop {
        let (v, route) = read_value(client, sql).await;
        assert_eq!(v, want, "`{sql}` (read {}, route {route:?})", routes.len());
        if is_cache(&route) {
            return;
        }
        routes.push(route);
        if routes.len() >= 2 && start.elapsed() > Duration::from_secs(1) {
            panic!("`{sql}` was not answered from the cache within 1 s; routes: {routes:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `sql` through `client` every 10 ms until its value is `want`; returns how long
/// that took from `since`. Panics after [`POLL_LIMIT`].
async fn time_until_value(client: &Client, sql: &str, want: &str, since: Instant) -> Duration {
    let mut last = String::new();
    while since.elapsed() < POLL_LIMIT {
        match simple_value(client, sql).await {
            Ok(v) if v == want => return since.elapsed(),
            Ok(v) => last = format!("{v:?} (route {:?})", last_route(client).await),
            Err(e) => last = describe_error(&e),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("`{sql}` did not return {want:?} within {POLL_LIMIT:?} of the commit; last: {last}")
}

/// One number from `sql` run on the server at `port` (psql, superuser).
fn server_number(cluster: &Cluster, port: u16, sql: &str) -> i64 {
    let out = cluster.psql_admin(port, sql);
    out.trim()
        .parse()
        .unwrap_or_else(|e| panic!("`{sql}` on {}: {out:?}: {e}", cluster.name_of(port)))
}

/// Temporary replication slots on the server at `port`.
fn temporary_slots(cluster: &Cluster, port: u16) -> i64 {
    server_number(
        cluster,
        port,
        "select count(*) from pg_replication_slots where temporary",
    )
}

const KV_SCHEMA: &str = "
SET ROLE app;
CREATE TABLE kv (k int PRIMARY KEY, v text);
INSERT INTO kv VALUES (1, 'one'), (2, 'two');
CREATE TABLE other (k int PRIMARY KEY, v text);
INSERT INTO other VALUES (1, 'first');
RESET ROLE;
";

const KV_READ: &str = "select v from kv where k = 1";
const OTHER_READ: &str = "select v from other where k = 1";

/// A cluster with [`KV_SCHEMA`] and one replica, and pgway caching `kv` and `other` for 3 h
/// with the WAL stream; waits until reads reach the replica and the stream follows.
async fn kv_setup() -> (Cluster, Gateway, u16, Client) {
    let cluster = Cluster::start_with_schema(1, KV_SCHEMA);
    let (gw, admin) = start_gateway(
        &cluster,
        cache_toml(true, "", &["public.kv", "public.other"], "3h"),
    );
    gw.wait_for_replica_reads(&cluster).await;
    let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    wait_following(admin, &client, "select v from kv where k = 2").await;
    (cluster, gw, admin, client)
}

// ---------------------------------------------------------------------------------------
// 1. A cached statement does not run again
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_statement_runs_once_on_the_servers() {
    let cluster = Cluster::start_with_conf(1, "shared_preload_libraries = 'pg_stat_statements'\n");
    let primary = cluster.primary_port();
    let replica = cluster.replica_ports()[0];
    cluster.psql_admin(
        primary,
        "CREATE EXTENSION pg_stat_statements;
         SET ROLE app;
         CREATE TABLE items (id int PRIMARY KEY, name text);
         INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 10) g;
         RESET ROLE;",
    );
    cluster.wait_replay();
    let (gw, admin) = start_gateway(&cluster, cache_toml(true, "", &["public.items"], "3h"));
    gw.wait_for_replica_reads(&cluster).await;
    let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    wait_following(admin, &client, "select count(*) from items where id < 0").await;

    // Executions of `query` (exact text) on both servers.
    let calls = |query: &str| -> i64 {
        let sql = format!(
            "select coalesce(sum(calls), 0) from pg_stat_statements where query = '{query}'"
        );
        server_number(&cluster, primary, &sql) + server_number(&cluster, replica, &sql)
    };

    const N: usize = 6;
    let simple = "select id, name from items order by id";
    let before = stats(admin).await;
    for i in 0..N {
        let (rows, route) = read(&client, simple).await;
        assert_eq!(rows.len(), 10, "read {i}: {rows:?}");
        assert_eq!(rows[9], vec![Some("10".into()), Some("item 10".into())]);
        if i > 0 {
            assert!(
                is_cache(&route),
                "simple read {i} was not answered from the cache: {route:?}"
            );
        }
    }
    let simple_calls = calls(simple);
    eprintln!("pg_stat_statements: {N} simple reads through pgway ran {simple_calls} time(s)");
    assert_eq!(
        simple_calls, 1,
        "{N} identical reads through pgway ran {simple_calls} times on the servers"
    );

    // The extended protocol (tokio-postgres prepares, binds and executes).
    let extended = "select name, id from items order by id desc";
    for i in 0..N {
        let rows = client
            .query(extended, &[])
            .await
            .unwrap_or_else(|e| panic!("extended read {i}: {}", describe_error(&e)));
        assert_eq!(rows.len(), 10);
        assert_eq!(rows[0].get::<_, String>(0), "item 10");
        assert_eq!(rows[0].get::<_, i32>(1), 10);
        let route = last_route(&client).await;
        if i > 0 {
            assert!(
                is_cache(&route),
                "extended read {i} was not answered from the cache: {route:?}"
            );
        }
    }
    let extended_calls = calls(extended);
    eprintln!("pg_stat_statements: {N} extended reads through pgway ran {extended_calls} time(s)");
    assert_eq!(
        extended_calls, 1,
        "{N} identical extended reads through pgway ran {extended_calls} times"
    );

    // Concurrent identical misses run the query once: 12 clients at once, a query that
    // takes a while (a 16-million-row cross join).
    let slow = "select count(*) from items a, items b, generate_series(1, 40000) g \
                where a.id <= b.id";
    let mut clients = Vec::new();
    for _ in 0..12 {
        clients.push(connect(gw.port(), APP_USER, APP_PASSWORD).await);
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(clients.len()));
    let mut tasks = Vec::new();
    for c in clients {
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            simple_value(&c, slow)
                .await
                .unwrap_or_else(|e| panic!("the slow read: {}", describe_error(&e)))
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("a client"), (55 * 40000).to_string());
    }
    let slow_calls = calls(
        "select count(*) from items a, items b, generate_series($1, $2) g where a.id <= b.id",
    );
    eprintln!("pg_stat_statements: 12 concurrent identical reads ran {slow_calls} time(s)");
    assert_eq!(
        slow_calls, 1,
        "12 concurrent identical reads ran {slow_calls} times on the servers"
    );

    let after = stats(admin).await;
    assert_eq!(after["enabled"], true, "{after}");
    assert!(
        counter(&after, "hits") >= counter(&before, "hits") + 2 * (N as u64 - 1),
        "/cache hits did not grow by {}: before {before}, after {after}",
        2 * (N - 1)
    );
    assert!(
        counter(&after, "fills") >= counter(&before, "fills") + 2,
        "before {before}, after {after}"
    );
    assert!(counter(&after, "entries") >= 2, "{after}");
    assert!(counter(&after, "bytes") > 0, "{after}");
}

// ---------------------------------------------------------------------------------------
// 2. A write through pgway shows on the next read
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_pgway_shows_on_the_next_read() {
    let (_cluster, gw, _admin, a) = kv_setup().await;
    let b = connect(gw.port(), APP_USER, APP_PASSWORD).await;

    fill(&a, KV_READ, "one").await;
    // Another connection of the same user shares the entry.
    let (v, route) = read_value(&b, KV_READ).await;
    assert_eq!(v, "one");
    assert!(
        is_cache(&route),
        "another connection of the same user missed the entry: {route:?}"
    );

    // A plain UPDATE: both connections see it at once.
    a.batch_execute("update kv set v = 'two' where k = 1")
        .await
        .expect("update");
    for (who, c) in [("writer", &a), ("other connection", &b)] {
        let (v, route) = read_value(c, KV_READ).await;
        assert_eq!(
            v, "two",
            "the {who} read a stale value right after the write (route {route:?})"
        );
    }
    fill(&b, KV_READ, "two").await;

    // An explicit transaction: invalidated at its COMMIT.
    a.batch_execute("begin; update kv set v = 'three' where k = 1; commit")
        .await
        .expect("transaction");
    for (who, c) in [("writer", &a), ("other connection", &b)] {
        let (v, route) = read_value(c, KV_READ).await;
        assert_eq!(
            v, "three",
            "the {who} read a stale value after the COMMIT (route {route:?})"
        );
    }
    fill(&a, KV_READ, "three").await;

    // The extended protocol, for the write and the read.
    a.execute("update kv set v = $1 where k = 1", &[&"four"])
        .await
        .expect("extended update");
    for (who, c) in [("writer", &a), ("other connection", &b)] {
        let v: String = c
            .query_one("select v from kv where k = $1", &[&1i32])
            .await
            .expect("extended read")
            .get(0);
        assert_eq!(
            v, "four",
            "the {who}'s extended read after an extended write"
        );
        let (v, route) = read_value(c, KV_READ).await;
        assert_eq!(
            v, "four",
            "the {who}'s simple read after an extended write (route {route:?})"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 3. A write made directly on the primary
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_made_directly_on_the_primary_shows_within_a_second() {
    let (cluster, _gw, _admin, client) = kv_setup().await;
    let primary = cluster.primary_port();
    let mut delays = Vec::new();
    let mut current = "one".to_owned();
    for round in 0..3 {
        fill(&client, KV_READ, &current).await;
        let next = format!("direct {round}");
        cluster.psql_admin(primary, &format!("update kv set v = '{next}' where k = 1"));
        let committed = Instant::now();
        let delay = time_until_value(&client, KV_READ, &next, committed).await;
        eprintln!(
            "round {round}: a direct write on the primary showed through pgway after {delay:?}"
        );
        delays.push(delay);
        current = next;
    }
    // INSERT, DELETE and TRUNCATE, on a count.
    let count = "select count(*) from other";
    for (round, (write, want)) in [
        ("insert into other values (2, 'x'), (3, 'y')", "3"),
        ("delete from other where k = 2", "2"),
        ("truncate other", "0"),
        ("insert into other values (9, 'z')", "1"),
    ]
    .into_iter()
    .enumerate()
    {
        let (before, route) = read_value(&client, count).await;
        if !is_cache(&route) {
            let (again, route) = read_value(&client, count).await;
            assert_eq!(again, before);
            assert!(is_cache(&route), "`{count}` was not cached: {route:?}");
        }
        cluster.psql_admin(primary, write);
        let committed = Instant::now();
        let delay = time_until_value(&client, count, want, committed).await;
        eprintln!("`{write}` made on the primary showed through pgway after {delay:?}");
        assert!(round < 4);
        delays.push(delay);
    }
    let worst = *delays.iter().max().expect("rounds");
    assert!(
        worst < INVALIDATION_BOUND,
        "a write made directly on the primary took {worst:?} to show through the cache \
         (bound {INVALIDATION_BOUND:?}); delays {delays:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 4. A trigger's write
// ---------------------------------------------------------------------------------------

const TRIGGER_SCHEMA: &str = "
SET ROLE app;
CREATE TABLE orders (id int PRIMARY KEY, item text);
CREATE TABLE order_log (order_id int, note text);
CREATE FUNCTION log_order() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO order_log VALUES (NEW.id, 'created');
  RETURN NEW;
END $$;
CREATE TRIGGER orders_log AFTER INSERT ON orders FOR EACH ROW EXECUTE FUNCTION log_order();
RESET ROLE;
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_triggers_write_to_a_cached_table_invalidates_it() {
    let cluster = Cluster::start_with_schema(1, TRIGGER_SCHEMA);
    let (gw, admin) = start_gateway(&cluster, cache_toml(true, "", &["public.order_log"], "3h"));
    gw.wait_for_replica_reads(&cluster).await;
    let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    let log_count = "select count(*) from order_log";
    wait_following(admin, &client, log_count).await;

    // Through pgway: the writer touched only `orders`; its next read of `order_log` sees
    // the trigger's row (read-your-writes holds for the cache too).
    fill(&client, log_count, "0").await;
    client
        .batch_execute("insert into orders values (1, 'book')")
        .await
        .expect("insert through pgway");
    let (v, route) = read_value(&client, log_count).await;
    assert_eq!(
        v, "1",
        "after an insert into orders through pgway, the trigger's row in order_log is \
         missing (route {route:?})"
    );

    // Directly on the primary: within the bound.
    fill(&client, log_count, "1").await;
    cluster.psql_admin(
        cluster.primary_port(),
        "insert into orders values (2, 'pen')",
    );
    let committed = Instant::now();
    let delay = time_until_value(&client, log_count, "2", committed).await;
    eprintln!("a trigger's write made on the primary showed through pgway after {delay:?}");
    assert!(
        delay < INVALIDATION_BOUND,
        "a trigger's write took {delay:?} to show (bound {INVALIDATION_BOUND:?})"
    );
}

// ---------------------------------------------------------------------------------------
// 5. A rolled-back write
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_write_invalidates_nothing() {
    let (cluster, _gw, admin, client) = kv_setup().await;
    fill(&client, KV_READ, "one").await;

    // Through pgway.
    client
        .batch_execute("begin; update kv set v = 'rolled back' where k = 1; rollback")
        .await
        .expect("a rolled-back transaction");
    let (v, route) = read_value(&client, KV_READ).await;
    assert_eq!(v, "one");
    assert!(
        is_cache(&route),
        "a write rolled back through pgway dropped the entry: last_route = {route:?}"
    );
    // The same in separate round trips, the extended protocol for the write.
    client.batch_execute("begin").await.expect("begin");
    client
        .execute("update kv set v = $1 where k = 1", &[&"rolled back too"])
        .await
        .expect("update");
    client.batch_execute("rollback").await.expect("rollback");
    let (v, route) = read_value(&client, KV_READ).await;
    assert_eq!(v, "one");
    assert!(
        is_cache(&route),
        "a write rolled back (in separate round trips) dropped the entry: {route:?}"
    );
    // A failing statement rolls back too.
    let e = client
        .batch_execute("update kv set v = (1/0)::text where k = 1")
        .await
        .expect_err("division by zero");
    assert_eq!(sqlstate(&e), "22012", "{}", describe_error(&e));
    let (v, route) = read_value(&client, KV_READ).await;
    assert_eq!(v, "one");
    assert!(
        is_cache(&route),
        "a failed write through pgway dropped the entry: last_route = {route:?}"
    );

    // Directly on the primary: a rolled-back write, then a committed write to `other`. Once
    // `other`'s entry is gone the stream has passed the rollback, and `kv`'s entry must
    // still be there.
    fill(&client, OTHER_READ, "first").await;
    let invalidations_before = counter(&stats(admin).await, "invalidations");
    cluster.psql_admin(
        cluster.primary_port(),
        "begin; update kv set v = 'rolled back' where k = 1; rollback;
         update other set v = 'second' where k = 1;",
    );
    let delay = time_until_value(&client, OTHER_READ, "second", Instant::now()).await;
    eprintln!("the committed write after the rollback showed after {delay:?}");
    let (v, route) = read_value(&client, KV_READ).await;
    assert_eq!(v, "one");
    assert!(
        is_cache(&route),
        "a write rolled back on the primary dropped the entry: last_route = {route:?}"
    );
    let after = stats(admin).await;
    assert!(
        counter(&after, "invalidations") > invalidations_before,
        "the committed write to `other` counted no invalidation: {after}"
    );
}

// ---------------------------------------------------------------------------------------
// 6. Users and privileges
// ---------------------------------------------------------------------------------------

const PRIVILEGES_SCHEMA: &str = "
SET ROLE app;
CREATE TABLE secrets (id int, s text);
INSERT INTO secrets VALUES (1, 'app only');
CREATE TABLE notes (owner name, body text);
INSERT INTO notes VALUES ('app', 'note of app'), ('md5user', 'note of md5user');
ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
ALTER TABLE notes FORCE ROW LEVEL SECURITY;
CREATE POLICY own_notes ON notes USING (owner = current_user);
GRANT SELECT ON notes TO md5user;
RESET ROLE;
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_never_see_each_others_entries() {
    let cluster = Cluster::start_with_schema(1, PRIVILEGES_SCHEMA);
    let (gw, admin) = start_gateway(
        &cluster,
        cache_toml(true, "", &["public.secrets", "public.notes"], "3h"),
    );
    gw.wait_for_replica_reads(&cluster).await;
    let app = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    let md5 = connect(gw.port(), MD5_USER, MD5_PASSWORD).await;
    wait_following(admin, &app, "select count(*) from notes").await;

    // GRANT to one user only: the other gets 42501 every time, in both protocols, even
    // though the same SQL is cached for the first.
    let secret = "select s from secrets";
    fill(&app, secret, "app only").await;
    for i in 0..3 {
        match simple_rows(&md5, secret).await {
            Ok(rows) => panic!("md5user read secrets without a grant (try {i}): {rows:?}"),
            Err(e) => assert_eq!(sqlstate(&e), "42501", "try {i}: {}", describe_error(&e)),
        }
        match md5.query(secret, &[]).await {
            Ok(rows) => panic!(
                "md5user read secrets without a grant (extended, try {i}): {} rows",
                rows.len()
            ),
            Err(e) => assert_eq!(sqlstate(&e), "42501", "try {i}: {}", describe_error(&e)),
        }
    }
    // The errors were not cached in place of app's entry.
    let (v, route) = read_value(&app, secret).await;
    assert_eq!(v, "app only");
    assert!(is_cache(&route), "{route:?}");

    // Row-level security on current_user: each user reads only its own rows, also from
    // the cache.
    let notes = "select owner, body from notes order by body";
    for round in 0..2 {
        for (who, c, want) in [
            ("app", &app, "note of app"),
            ("md5user", &md5, "note of md5user"),
        ] {
            let (rows, route) = read(c, notes).await;
            let bodies: Vec<String> = rows
                .iter()
                .map(|r| r[1].clone().unwrap_or_default())
                .collect();
            assert_eq!(
                bodies,
                vec![want.to_owned()],
                "round {round}: {who} read {rows:?} (route {route:?})"
            );
            if round == 1 {
                assert!(
                    is_cache(&route),
                    "round {round}: {who}'s repeated read was not a hit: {route:?}"
                );
            }
        }
    }

    // Errors are never cached: once the grant is made (a catalog change, no table data
    // changes), md5user's read succeeds.
    cluster.psql_admin(cluster.primary_port(), "grant select on secrets to md5user");
    eventually(
        "md5user's read to succeed after the GRANT",
        WAIT,
        async || match simple_rows(&md5, secret).await {
            Ok(rows) if rows == vec![vec![Some("app only".to_owned())]] => Ok(()),
            Ok(rows) => Err(format!("rows {rows:?}")),
            Err(e) => Err(describe_error(&e)),
        },
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// 7. Session settings are part of the key
// ---------------------------------------------------------------------------------------

const SETTINGS_SCHEMA: &str = "
SET ROLE app;
CREATE SCHEMA s1;
CREATE SCHEMA s2;
CREATE TABLE s1.t (v text);
CREATE TABLE s2.t (v text);
INSERT INTO s1.t VALUES ('from s1');
INSERT INTO s2.t VALUES ('from s2');
CREATE TABLE events (id int, at timestamptz);
INSERT INTO events VALUES (1, '2024-01-01 12:00:00+00');
CREATE TABLE tenant_rows (tenant text, v text);
INSERT INTO tenant_rows VALUES ('a', 'row of a'), ('b', 'row of b');
ALTER TABLE tenant_rows ENABLE ROW LEVEL SECURITY;
ALTER TABLE tenant_rows FORCE ROW LEVEL SECURITY;
CREATE POLICY by_tenant ON tenant_rows USING (tenant = current_setting('app.tenant', true));
RESET ROLE;
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_settings_are_part_of_the_key() {
    let cluster = Cluster::start_with_schema(1, SETTINGS_SCHEMA);
    let (gw, admin) = start_gateway(
        &cluster,
        cache_toml(
            true,
            "",
            &["s1.t", "s2.t", "public.events", "public.tenant_rows"],
            "3h",
        ),
    );
    gw.wait_for_replica_reads(&cluster).await;
    let c = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    wait_following(admin, &c, "select count(*) from events").await;

    // search_path: same SQL, two tables.
    let by_path = "select v from t";
    let mut not_hits = Vec::new();
    for round in 0..2 {
        for schema in ["s1", "s2"] {
            c.batch_execute(&format!("set search_path = {schema}"))
                .await
                .expect("set search_path");
            let want = format!("from {schema}");
            for attempt in 0..2 {
                let (v, route) = read_value(&c, by_path).await;
                assert_eq!(
                    v, want,
                    "search_path = {schema}, round {round}, read {attempt}: got another \
                     schema's rows (route {route:?})"
                );
                if (round, attempt) != (0, 0) && !is_cache(&route) {
                    not_hits.push(format!(
                        "search_path {schema} round {round} read {attempt}: {route}"
                    ));
                }
            }
        }
    }
    c.batch_execute("reset search_path").await.expect("reset");

    // TimeZone changes the text of a timestamptz.
    let at = "select at from events where id = 1";
    for round in 0..2 {
        for (zone, want) in [
            ("UTC", "2024-01-01 12:00:00+00"),
            ("Asia/Tokyo", "2024-01-01 21:00:00+09"),
            ("America/New_York", "2024-01-01 07:00:00-05"),
        ] {
            c.batch_execute(&format!("set timezone = '{zone}'"))
                .await
                .expect("set timezone");
            let (v, route) = read_value(&c, at).await;
            assert_eq!(v, want, "TimeZone {zone}, round {round} (route {route:?})");
            if round == 1 && !is_cache(&route) {
                not_hits.push(format!("TimeZone {zone} round {round}: {route}"));
            }
        }
    }
    // The extended protocol (binary timestamptz) is the same instant in every zone.
    let instant: std::time::SystemTime = c.query_one(at, &[]).await.expect("extended read").get(0);
    assert_eq!(
        instant,
        std::time::UNIX_EPOCH + Duration::from_secs(1_704_110_400),
        "the binary timestamptz"
    );
    c.batch_execute("reset timezone").await.expect("reset");

    // A custom setting read by a row-level security policy.
    let tenant = "select v from tenant_rows";
    for round in 0..2 {
        for t in ["a", "b"] {
            c.batch_execute(&format!("set app.tenant = '{t}'"))
                .await
                .expect("set app.tenant");
            let (rows, route) = read(&c, tenant).await;
            assert_eq!(
                rows,
                vec![vec![Some(format!("row of {t}"))]],
                "app.tenant = {t}, round {round} (route {route:?})"
            );
            if round == 1 && !is_cache(&route) {
                not_hits.push(format!("app.tenant {t} round {round}: {route}"));
            }
        }
    }
    c.batch_execute("reset app.tenant").await.expect("reset");
    let (rows, route) = read(&c, tenant).await;
    assert!(
        rows.is_empty(),
        "without app.tenant the policy shows no rows, got {rows:?} (route {route:?})"
    );

    // A second connection with the same settings shares the entries; with other settings
    // it does not get them.
    let d = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    d.batch_execute("set search_path = s2").await.expect("set");
    let (v, route) = read_value(&d, by_path).await;
    assert_eq!(v, "from s2", "route {route:?}");
    if !is_cache(&route) {
        not_hits.push(format!("another connection with search_path s2: {route}"));
    }

    assert!(
        not_hits.is_empty(),
        "the values were right, but these repeated reads were not answered from the \
         cache:\n{}",
        not_hits.join("\n")
    );
}

// ---------------------------------------------------------------------------------------
// 8. TTL, without the WAL stream
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_wal_stream_entries_live_until_their_ttl() {
    let cluster = Cluster::start_with_schema(1, KV_SCHEMA);
    let primary = cluster.primary_port();
    let (gw, admin) = start_gateway(&cluster, cache_toml(false, "", &[], ""));
    gw.wait_for_replica_reads(&cluster).await;
    let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    const TTL: Duration = Duration::from_secs(2);
    let sql = "/* pgway:cache ttl=2s */ select v from kv where k = 1";

    let filled_at = Instant::now();
    let (v, route) = read_value(&client, sql).await;
    assert_eq!(v, "one", "route {route:?}");
    assert!(
        !is_cache(&route),
        "the first read cannot be a hit: {route:?}"
    );
    let filled_by = Instant::now();
    let (v, route) = read_value(&client, sql).await;
    assert_eq!(v, "one");
    assert!(
        is_cache(&route),
        "the hinted read was not cached: {route:?}"
    );

    // A write pgway does not see: the entry keeps the old value until its TTL.
    cluster.psql_admin(primary, "update kv set v = 'direct' where k = 1");
    let read_at = Instant::now();
    let (v, route) = read_value(&client, sql).await;
    assert!(
        read_at < filled_at + TTL - Duration::from_millis(500),
        "the machine is too slow for this check: {:?} passed between the fill and the read",
        read_at - filled_at
    );
    assert_eq!(
        (v.as_str(), is_cache(&route)),
        ("one", true),
        "without the WAL stream, the entry must be served until its TTL (route {route:?})"
    );

    // Then the fresh value, not before the TTL and soon after it.
    let mut fresh_at = None;
    while filled_by.elapsed() < TTL + POLL_LIMIT {
        let started = Instant::now();
        let (v, route) = read_value(&client, sql).await;
        if v == "direct" {
            fresh_at = Some(started);
            break;
        }
        assert_eq!(v, "one", "route {route:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let fresh_at = fresh_at.expect("the fresh value never came after the TTL");
    eprintln!(
        "the fresh value came {:?} after the fill (TTL {TTL:?})",
        fresh_at - filled_at
    );
    assert!(
        fresh_at + Duration::from_millis(50) >= filled_at + TTL,
        "the entry expired early: the fresh value came {:?} after the fill, TTL {TTL:?}",
        fresh_at - filled_at
    );
    assert!(
        fresh_at <= filled_by + TTL + Duration::from_millis(1500),
        "the entry outlived its TTL: the fresh value came {:?} after the fill, TTL {TTL:?}",
        fresh_at - filled_at
    );

    // Writes pgway sees still invalidate at once.
    fill(&client, sql, "direct").await;
    client
        .batch_execute("update kv set v = 'through pgway' where k = 1")
        .await
        .expect("update");
    let (v, route) = read_value(&client, sql).await;
    assert_eq!(
        v, "through pgway",
        "a write through pgway did not invalidate without the WAL stream (route {route:?})"
    );

    // /cache says there is no stream following the WAL.
    let s = stats(admin).await;
    let following = s["streams"]
        .as_array()
        .is_some_and(|a| a.iter().any(|st| st["state"] == "following"));
    assert!(!following, "no wal_user, yet a stream follows: {s}");
}

// ---------------------------------------------------------------------------------------
// 9. Memory bound
// ---------------------------------------------------------------------------------------

const PADS_SCHEMA: &str = "
SET ROLE app;
CREATE TABLE pads (id int PRIMARY KEY, pad text);
INSERT INTO pads SELECT g, repeat(md5(g::text), 63) FROM generate_series(1, 3000) g;
RESET ROLE;
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_within_max_memory() {
    let cluster = Cluster::start_with_schema(1, PADS_SCHEMA);
    let (gw, admin) = start_gateway(
        &cluster,
        cache_toml(
            false,
            "max_memory = \"1MB\"\nmax_entry_size = \"64kB\"",
            &[],
            "",
        ),
    );
    gw.wait_for_replica_reads(&cluster).await;

    // 3000 distinct statements of ~2 kB each (~6 MB) from 4 clients.
    const N: usize = 3000;
    const CLIENTS: usize = 4;
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
        tasks.push(tokio::spawn(async move {
            for id in (1..=N).filter(|id| id % CLIENTS == c) {
                let sql = format!("/* pgway:cache ttl=60s */ select pad from pads where id = {id}");
                let v = simple_value(&client, &sql)
                    .await
                    .unwrap_or_else(|e| panic!("`{sql}`: {}", describe_error(&e)));
                assert_eq!(v.len(), 32 * 63, "`{sql}`");
            }
        }));
    }
    for t in tasks {
        t.await.expect("a flooding client");
    }

    let s = stats(admin).await;
    eprintln!("/cache after {N} distinct statements of ~2 kB: {s}");
    assert!(
        counter(&s, "fills") > 512,
        "more statements should have been cached than fit: {s}"
    );
    assert!(
        counter(&s, "bytes") <= 1 << 20,
        "/cache reports {} bytes, above max_memory = 1MB: {s}",
        counter(&s, "bytes")
    );
    assert!(counter(&s, "evictions") > 0, "nothing was evicted: {s}");
    assert!(
        counter(&s, "entries") > 0 && counter(&s, "entries") < N as u64,
        "{s}"
    );

    // The cache still works after the flood.
    let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    let sql = "/* pgway:cache ttl=60s */ select pad from pads where id = 1 and 1 = 1";
    let want = cluster.psql_admin(cluster.primary_port(), "select repeat(md5('1'), 63)");
    let mut hit = false;
    for _ in 0..5 {
        let (v, route) = read_value(&client, sql).await;
        assert_eq!(v, want);
        hit |= is_cache(&route);
    }
    assert!(hit, "after the flood, a repeated statement is never a hit");
}

// ---------------------------------------------------------------------------------------
// 10. max_entry_size
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_larger_than_max_entry_size_are_not_cached() {
    let cluster = Cluster::start_with_schema(1, PADS_SCHEMA);
    let (gw, admin) = start_gateway(
        &cluster,
        cache_toml(false, "max_entry_size = \"64kB\"", &[], ""),
    );
    gw.wait_for_replica_reads(&cluster).await;
    let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;

    // ~200 kB.
    let big = "/* pgway:cache ttl=60s */ select id, pad from pads where id <= 100 order by id";
    let before = stats(admin).await;
    for i in 0..3 {
        let (rows, route) = read(&client, big).await;
        assert_eq!(rows.len(), 100, "read {i}");
        assert_eq!(rows[99][0].as_deref(), Some("100"));
        assert_eq!(rows[99][1].as_ref().map(String::len), Some(32 * 63));
        assert!(
            !is_cache(&route),
            "read {i} of a ~200 kB result was answered from the cache (max_entry_size \
             64kB): {route:?}"
        );
    }
    // The extended protocol too.
    for i in 0..2 {
        let rows = client.query(big, &[]).await.expect("extended big read");
        assert_eq!(rows.len(), 100);
        let route = last_route(&client).await;
        assert!(!is_cache(&route), "extended read {i}: {route:?}");
    }
    let after = stats(admin).await;
    assert_eq!(
        counter(&after, "hits"),
        counter(&before, "hits"),
        "before {before}, after {after}"
    );
    assert!(
        counter(&after, "bytes") < 64 << 10,
        "the big result takes memory: {after}"
    );
    assert!(
        counter(&after, "fills_refused") > counter(&before, "fills_refused")
            || counter(&after, "misses") >= counter(&before, "misses") + 5,
        "neither fills_refused nor misses grew: before {before}, after {after}"
    );
    eprintln!("/cache after the big reads: {after}");

    // A small result with the same hint is cached.
    fill(
        &client,
        "/* pgway:cache ttl=60s */ select id from pads where id = 7",
        "7",
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// 11. The extended protocol
// ---------------------------------------------------------------------------------------

const ITEMS_SCHEMA: &str = "
SET ROLE app;
CREATE TABLE items (id int PRIMARY KEY, name text, score float8, tags text[]);
INSERT INTO items VALUES
  (1, 'alpha', 1.5, '{a}'), (2, 'beta', 2.5, '{b,bb}'), (3, 'gamma', 3.5, NULL),
  (4, 'delta', 4.5, '{}');
RESET ROLE;
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_extended_protocol_is_cached_per_parameters_and_formats() {
    let cluster = Cluster::start_with_schema(1, ITEMS_SCHEMA);
    let (gw, admin) = start_gateway(&cluster, cache_toml(true, "", &["public.items"], "3h"));
    gw.wait_for_replica_reads(&cluster).await;
    let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    wait_following(admin, &client, "select count(*) from items").await;

    let by_id = "select id, name, score, tags from items where id = $1";
    type Item = (i32, String, f64, Option<Vec<String>>);
    let get = |r: &tokio_postgres::Row| -> Item { (r.get(0), r.get(1), r.get(2), r.get(3)) };
    let want = |id: i32| -> Item {
        match id {
            1 => (1, "alpha".into(), 1.5, Some(vec!["a".into()])),
            2 => (2, "beta".into(), 2.5, Some(vec!["b".into(), "bb".into()])),
            3 => (3, "gamma".into(), 3.5, None),
            _ => unreachable!(),
        }
    };

    for id in [1i32, 2, 1, 2, 3, 3] {
        let rows = client.query(by_id, &[&id]).await.expect("extended read");
        let route = last_route(&client).await;
        assert_eq!(rows.len(), 1, "id {id}");
        assert_eq!(get(&rows[0]), want(id), "id {id} (route {route:?})");
    }
    // Each parameter value is its own entry: first a miss, then a hit.
    for id in [4i32, 4] {
        client.query(by_id, &[&id]).await.expect("extended read");
    }
    let route = last_route(&client).await;
    assert!(is_cache(&route), "the repeated id = 4 read: {route:?}");
    let rows = client.query(by_id, &[&99i32]).await.expect("no row");
    assert!(rows.is_empty(), "id 99: {} rows", rows.len());
    let route = last_route(&client).await;
    assert!(
        !is_cache(&route),
        "a parameter value never read before was answered from the cache: {route:?}"
    );
    let rows = client.query(by_id, &[&99i32]).await.expect("no row");
    assert!(rows.is_empty(), "id 99 again: {} rows", rows.len());

    // A prepared statement executed many times with alternating values.
    let prepared = client.prepare(by_id).await.expect("prepare");
    for id in [1i32, 2, 3, 1, 2, 3] {
        let row = client.query_one(&prepared, &[&id]).await.expect("execute");
        assert_eq!(get(&row), want(id), "prepared, id {id}");
    }
    let route = last_route(&client).await;
    assert!(is_cache(&route), "a repeated prepared execution: {route:?}");

    // Binary results (tokio-postgres' extended protocol) and text results (simple protocol)
    // of the same SQL never get each other's bytes, in either order.
    let q3 = "select id, name, score from items where id = 3";
    let q4 = "select id, name, score from items where id = 4";
    for _ in 0..2 {
        let row = client.query_one(q3, &[]).await.expect("binary");
        assert_eq!(
            (
                row.get::<_, i32>(0),
                row.get::<_, String>(1),
                row.get::<_, f64>(2)
            ),
            (3, "gamma".into(), 3.5)
        );
    }
    for _ in 0..2 {
        let (rows, route) = read(&client, q3).await;
        assert_eq!(
            rows,
            vec![vec![
                Some("3".into()),
                Some("gamma".into()),
                Some("3.5".into())
            ]],
            "text after binary (route {route:?})"
        );
    }
    for _ in 0..2 {
        let (rows, route) = read(&client, q4).await;
        assert_eq!(
            rows,
            vec![vec![
                Some("4".into()),
                Some("delta".into()),
                Some("4.5".into())
            ]],
            "text first (route {route:?})"
        );
    }
    for _ in 0..2 {
        let row = client.query_one(q4, &[]).await.expect("binary after text");
        assert_eq!(
            (
                row.get::<_, i32>(0),
                row.get::<_, String>(1),
                row.get::<_, f64>(2)
            ),
            (4, "delta".into(), 4.5),
            "binary after text"
        );
    }
    let route = last_route(&client).await;
    assert!(is_cache(&route), "the repeated binary read: {route:?}");

    // A write through pgway drops the entries of every parameter value.
    client
        .execute("update items set name = name || '!'", &[])
        .await
        .expect("update");
    for id in [1i32, 2, 3] {
        let row = client.query_one(by_id, &[&id]).await.expect("read");
        let mut w = want(id);
        w.1.push('!');
        assert_eq!(get(&row), w, "id {id} after the update");
    }
    let (rows, _) = read(&client, q4).await;
    assert_eq!(
        rows[0][1].as_deref(),
        Some("delta!"),
        "text after the update"
    );
}

// ---------------------------------------------------------------------------------------
// 12. Functions
// ---------------------------------------------------------------------------------------

const FUNCTIONS_SCHEMA: &str = r#"
SET ROLE app;
CREATE TABLE user_groups (id int PRIMARY KEY, name text);
INSERT INTO user_groups VALUES (1, 'staff'), (2, 'guests');
CREATE FUNCTION get_group(p int) RETURNS TABLE (id int, name text) LANGUAGE sql STABLE AS $$
  SELECT g.id, g.name FROM public.user_groups g WHERE g.id = p $$;
CREATE FUNCTION group_label(p int) RETURNS text LANGUAGE sql STABLE AS $$
  SELECT '#' || p || ' ' || g.name FROM public.user_groups g WHERE g.id = p $$;
-- No volatility clause (VOLATILE), but its body only reads.
CREATE FUNCTION group_name(p int) RETURNS text LANGUAGE plpgsql AS $$
DECLARE r text;
BEGIN
  SELECT g.name INTO r FROM public.user_groups g WHERE g.id = p;
  RETURN r;
END $$;
CREATE FUNCTION groups_plus_random() RETURNS float8 LANGUAGE sql AS $$
  SELECT random() + count(*) FROM public.user_groups $$;
-- STABLE, but which tables it reads pgway cannot know (dynamic SQL).
CREATE FUNCTION count_groups_dynamically() RETURNS bigint LANGUAGE plpgsql STABLE AS $$
DECLARE r bigint;
BEGIN
  EXECUTE 'SELECT count(*) FROM public.user_groups' INTO r;
  RETURN r;
END $$;
RESET ROLE;
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_are_cached_under_the_tables_they_read() {
    let cluster = Cluster::start_with_schema(1, FUNCTIONS_SCHEMA);
    let primary = cluster.primary_port();
    let (gw, admin) = start_gateway(
        &cluster,
        cache_toml(true, "", &["public.user_groups"], "3h"),
    );
    gw.wait_for_replica_reads(&cluster).await;
    let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    wait_following(admin, &client, "select count(*) from user_groups").await;

    // A STABLE sql function, extended protocol.
    let stable = "select * from get_group($1)";
    let name_of = async |id: i32| -> (String, String) {
        let row = client.query_one(stable, &[&id]).await.expect("get_group");
        assert_eq!(row.get::<_, i32>(0), id);
        (row.get(1), last_route(&client).await)
    };
    assert_eq!(name_of(1).await.0, "staff");
    let (name, route) = name_of(1).await;
    assert_eq!(name, "staff");
    assert!(
        is_cache(&route),
        "a STABLE function's repeated read: {route:?}"
    );
    client
        .batch_execute("update user_groups set name = 'staff 2' where id = 1")
        .await
        .expect("update");
    let (name, route) = name_of(1).await;
    assert_eq!(
        name, "staff 2",
        "after a write through pgway (route {route:?})"
    );
    let (_, route) = name_of(1).await;
    assert!(is_cache(&route), "{route:?}");
    fill(&client, "select name from get_group(1)", "staff 2").await;
    cluster.psql_admin(
        primary,
        "update user_groups set name = 'staff 3' where id = 1",
    );
    let committed = Instant::now();
    let delay = time_until_value(
        &client,
        "select name from get_group(1)",
        "staff 3",
        committed,
    )
    .await;
    eprintln!("a direct write showed through a STABLE function after {delay:?}");
    // That poll used the simple protocol; the extended entry must be gone as well.
    let (name, route) = name_of(1).await;
    assert_eq!(
        name, "staff 3",
        "extended, after a direct write (route {route:?})"
    );
    assert!(delay < INVALIDATION_BOUND, "{delay:?}");

    // A VOLATILE plpgsql function proved read-only.
    let volatile = "select group_name(2)";
    fill(&client, volatile, "guests").await;
    client
        .batch_execute("update user_groups set name = 'guests 2' where id = 2")
        .await
        .expect("update");
    let (v, route) = read_value(&client, volatile).await;
    assert_eq!(v, "guests 2", "route {route:?}");

    // A function calling random() is never cached.
    let mut values = Vec::new();
    for i in 0..4 {
        let (v, route) = read_value(&client, "select groups_plus_random()").await;
        assert!(
            !is_cache(&route),
            "read {i} of a function calling random() came from the cache: {route:?}"
        );
        values.push(v);
    }
    let mut distinct = values.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), values.len(), "{values:?}");
    // Nor is random() itself, even with a hint.
    for i in 0..2 {
        let (_, route) = read_value(
            &client,
            "/* pgway:cache ttl=30s */ select random() from user_groups limit 1",
        )
        .await;
        assert!(!is_cache(&route), "hinted random(), read {i}: {route:?}");
    }

    // A function whose tables pgway cannot know: not cached by the rule, cached with a
    // hint naming its tables, and invalidated by writes to them.
    for i in 0..2 {
        let (v, route) = read_value(&client, "select count_groups_dynamically()").await;
        assert_eq!(v, "2");
        assert!(
            !is_cache(&route),
            "read {i} of a function with unknown tables, without a hint naming them, came \
             from the cache: {route:?}"
        );
    }
    let hinted =
        "/* pgway:cache ttl=30s tables=public.user_groups */ select count_groups_dynamically()";
    fill(&client, hinted, "2").await;
    client
        .batch_execute("insert into user_groups values (3, 'admins')")
        .await
        .expect("insert");
    let (v, route) = read_value(&client, hinted).await;
    assert_eq!(v, "3", "after a write through pgway (route {route:?})");
    fill(&client, hinted, "3").await;
    cluster.psql_admin(primary, "insert into user_groups values (4, 'bots')");
    let delay = time_until_value(&client, hinted, "4", Instant::now()).await;
    eprintln!("a direct write showed through a hinted function after {delay:?}");
    assert!(delay < INVALIDATION_BOUND, "{delay:?}");

    // A STABLE function called in a query that reads a table itself.
    let mixed = "select id, group_label(id) from user_groups where id = 2";
    let label = |rows: Vec<Vec<Option<String>>>| rows[0][1].clone().unwrap_or_default();
    let (rows, _) = read(&client, mixed).await;
    assert_eq!(label(rows), "#2 guests 2");
    let mut routes = Vec::new();
    for _ in 0..3 {
        let (rows, route) = read(&client, mixed).await;
        assert_eq!(label(rows), "#2 guests 2");
        routes.push(route);
    }
    assert!(
        routes.iter().any(|r| is_cache(r)),
        "a read of a table calling a STABLE function over a cached table is never answered \
         from the cache: {routes:?}; /cache: {}",
        stats(admin).await
    );
}

// ---------------------------------------------------------------------------------------
// 13. Two pgway instances
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_one_instance_invalidates_the_other() {
    let cluster = Cluster::start_with_schema(1, KV_SCHEMA);
    let primary = cluster.primary_port();
    let cache = || cache_toml(true, "", &["public.kv", "public.other"], "3h");
    let (gw1, admin1) = start_gateway(&cluster, cache());
    let (gw2, admin2) = start_gateway(&cluster, cache());
    gw1.wait_for_replica_reads(&cluster).await;
    gw2.wait_for_replica_reads(&cluster).await;
    let c1 = connect(gw1.port(), APP_USER, APP_PASSWORD).await;
    let c2 = connect(gw2.port(), APP_USER, APP_PASSWORD).await;
    wait_following(admin1, &c1, OTHER_READ).await;
    wait_following(admin2, &c2, OTHER_READ).await;

    // One temporary slot per instance.
    let slots =
        eventually(
            "two temporary slots on the primary",
            WAIT,
            async || match temporary_slots(&cluster, primary) {
                2 => Ok(2),
                n => Err(format!("{n} temporary slots")),
            },
        )
        .await;
    assert_eq!(slots, 2);

    let mut delays = Vec::new();
    let mut current = "one".to_owned();
    for round in 0..4 {
        let (writer, reader) = if round % 2 == 0 {
            (&c1, &c2)
        } else {
            (&c2, &c1)
        };
        fill(writer, KV_READ, &current).await;
        fill(reader, KV_READ, &current).await;
        let next = format!("round {round}");
        writer
            .batch_execute(&format!("update kv set v = '{next}' where k = 1"))
            .await
            .expect("update");
        let committed = Instant::now();
        let (v, route) = read_value(writer, KV_READ).await;
        assert_eq!(v, next, "the writing instance, at once (route {route:?})");
        let delay = time_until_value(reader, KV_READ, &next, committed).await;
        eprintln!(
            "round {round}: a write through instance {} left instance {}'s cache after {delay:?}",
            round % 2 + 1,
            2 - round % 2
        );
        delays.push(delay);
        current = next;
    }
    let s1 = stats(admin1).await;
    let s2 = stats(admin2).await;
    assert!(counter(&s1, "invalidations") > 0, "{s1}");
    assert!(counter(&s2, "invalidations") > 0, "{s2}");
    let worst = *delays.iter().max().expect("rounds");
    assert!(
        worst < INVALIDATION_BOUND,
        "a write through one instance stayed in the other's cache for {worst:?} (bound \
         {INVALIDATION_BOUND:?}); delays {delays:?}"
    );

    // Both slots go away with the instances.
    drop((c1, c2));
    drop(gw1);
    drop(gw2);
    eventually(
        "no temporary slot once both instances stopped",
        Duration::from_secs(10),
        async || match temporary_slots(&cluster, primary) {
            0 => Ok(()),
            n => Err(format!("{n} temporary slots")),
        },
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// 14. Failover
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_empties_the_cache_and_invalidation_resumes_on_the_new_primary() {
    let (mut cluster, gw, admin, client) = kv_setup().await;
    let new_primary = cluster.replica_ports()[0];
    fill(&client, KV_READ, "one").await;

    // The replica misses a write; the primary serves it and it is cached.
    cluster.stop_replica(0);
    let primary = cluster.primary_port();
    eventually(
        "reads to move to the primary",
        WAIT,
        async || match try_served_by(&client).await {
            Ok(p) if p == primary => Ok(()),
            Ok(p) => Err(format!("served by {p}")),
            Err(e) => Err(describe_error(&e)),
        },
    )
    .await;
    client
        .batch_execute("update kv set v = 'lost' where k = 1")
        .await
        .expect("update with the replica down");
    fill(&client, KV_READ, "lost").await;

    // The primary dies; the replica, which never got that write, is promoted.
    cluster.stop_primary();
    cluster.start_replica(0);
    cluster.promote_replica(0);
    wait_for_new_primary(gw.port(), new_primary).await;
    let s = stats(admin).await;
    eprintln!("/cache once the new primary is found: {s}");

    // The entry of the lost write is gone. (The client's first statement may fail while
    // pgway replaces server connections to the dead primary.)
    let (v, route) = eventually(
        "a read after the failover",
        WAIT,
        async || match simple_value(&client, KV_READ).await {
            Ok(v) => Ok((v, last_route(&client).await)),
            Err(e) => Err(describe_error(&e)),
        },
    )
    .await;
    assert_eq!(
        v, "one",
        "after the failover, the cache served a write the new primary does not have \
         (route {route:?}; /cache before the read: {s})"
    );

    // The stream follows the new primary, with its own slot there.
    wait_following(admin, &client, OTHER_READ).await;
    eventually(
        "a temporary slot on the new primary",
        WAIT,
        async || match temporary_slots(&cluster, new_primary) {
            1 => Ok(()),
            n => Err(format!("{n} temporary slots")),
        },
    )
    .await;

    // Invalidation resumes: a direct write on the new primary shows.
    fill(&client, KV_READ, "one").await;
    cluster.psql_admin(
        new_primary,
        "update kv set v = 'after failover' where k = 1",
    );
    let delay = time_until_value(&client, KV_READ, "after failover", Instant::now()).await;
    eprintln!("after the failover, a direct write on the new primary showed after {delay:?}");
    assert!(delay < INVALIDATION_BOUND, "{delay:?}");
    // And so does a write through pgway.
    fill(&client, KV_READ, "after failover").await;
    client
        .batch_execute("update kv set v = 'through pgway' where k = 1")
        .await
        .expect("update on the new primary");
    let (v, route) = read_value(&client, KV_READ).await;
    assert_eq!(v, "through pgway", "route {route:?}");
}

// ---------------------------------------------------------------------------------------
// 16. Partitions count for their parent
// ---------------------------------------------------------------------------------------

const PARTITIONS_SCHEMA: &str = "
SET ROLE app;
CREATE TABLE measurements (id int, at date, v int) PARTITION BY RANGE (at);
CREATE TABLE measurements_2024 PARTITION OF measurements
  FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE measurements_2025 PARTITION OF measurements
  FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
INSERT INTO measurements VALUES (1, '2024-05-01', 10);
RESET ROLE;
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_to_a_partition_invalidates_its_parent() {
    let cluster = Cluster::start_with_schema(1, PARTITIONS_SCHEMA);
    let primary = cluster.primary_port();
    let (gw, admin) = start_gateway(
        &cluster,
        cache_toml(true, "", &["public.measurements"], "3h"),
    );
    gw.wait_for_replica_reads(&cluster).await;
    let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    let sum = "select coalesce(sum(v), 0) from measurements";
    wait_following(admin, &client, sum).await;

    // Through pgway: into the parent, then naming a partition.
    fill(&client, sum, "10").await;
    client
        .batch_execute("insert into measurements values (2, '2025-02-01', 5)")
        .await
        .expect("insert into the parent");
    let (v, route) = read_value(&client, sum).await;
    assert_eq!(v, "15", "insert into the parent (route {route:?})");
    fill(&client, sum, "15").await;
    client
        .batch_execute("update measurements_2024 set v = 20 where id = 1")
        .await
        .expect("update of a partition");
    let (v, route) = read_value(&client, sum).await;
    assert_eq!(
        v, "25",
        "a write through pgway naming a partition left the parent's entry (route {route:?})"
    );

    // Directly on the primary: naming a partition, through the parent, moving a row
    // between partitions.
    let mut delays = Vec::new();
    for (write, want) in [
        (
            "insert into measurements_2025 values (3, '2025-03-01', 100)",
            "125",
        ),
        ("delete from measurements where id = 2", "120"),
        (
            "update measurements set at = '2025-06-01', v = 21 where id = 1",
            "121",
        ),
        ("truncate measurements_2025", "0"),
    ] {
        let (before, route) = read_value(&client, sum).await;
        if !is_cache(&route) {
            fill(&client, sum, &before).await;
        }
        cluster.psql_admin(primary, write);
        let delay = time_until_value(&client, sum, want, Instant::now()).await;
        eprintln!("`{write}` on the primary showed through the parent after {delay:?}");
        delays.push(delay);
    }
    let worst = *delays.iter().max().expect("writes");
    assert!(
        worst < INVALIDATION_BOUND,
        "a write to a partition took {worst:?} to show through its parent; {delays:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 17. What is never cached
// ---------------------------------------------------------------------------------------

const NEVER_SCHEMA: &str = "
SET ROLE app;
CREATE TABLE kv (k int PRIMARY KEY, v text);
INSERT INTO kv VALUES (1, 'one');
CREATE VIEW kv_view AS SELECT k, v FROM kv;
CREATE UNLOGGED TABLE kv_unlogged (k int PRIMARY KEY, v text);
INSERT INTO kv_unlogged VALUES (1, 'unlogged one');
CREATE SEQUENCE seq;
RESET ROLE;
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_volatile_functions_views_unlogged_tables_and_pinned_clients_are_never_cached()
{
    let cluster = Cluster::start_with_schema(1, NEVER_SCHEMA);
    let (gw, admin) = start_gateway(
        &cluster,
        cache_toml(
            true,
            "",
            &["public.kv", "public.kv_view", "public.kv_unlogged"],
            "3h",
        ),
    );
    gw.wait_for_replica_reads(&cluster).await;
    let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    wait_following(admin, &client, "select count(*) from kv").await;
    fill(&client, KV_READ, "one").await;
    // Another connection checks after each step that the entry is still there: none of
    // these statements writes anything that commits.
    let observer = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    let dropped = std::cell::RefCell::new(Vec::new());
    let still_there = async |after: &str| {
        let (v, route) = read_value(&observer, KV_READ).await;
        assert_eq!(v, "one", "after {after}");
        if !is_cache(&route) {
            dropped
                .borrow_mut()
                .push(format!("after {after}: the next read was {route:?}"));
            // Fill it again for the next step.
            fill(&observer, KV_READ, "one").await;
        }
    };

    let cached = std::cell::RefCell::new(Vec::new());
    // Reads `sql` three times; each must succeed and none may be a hit.
    let never = async |what: &str, sql: &str| {
        let mut values = Vec::new();
        for i in 0..3 {
            let (v, route) = read_value(&client, sql).await;
            if is_cache(&route) {
                cached
                    .borrow_mut()
                    .push(format!("{what}, read {i}: `{sql}`: {route}"));
            }
            values.push(v);
        }
        values
    };

    // Inside a transaction: not even the entry filled outside it, and the transaction's
    // own uncommitted write is what it reads.
    client.batch_execute("begin").await.expect("begin");
    never("inside a transaction", KV_READ).await;
    client
        .batch_execute("update kv set v = 'in the transaction' where k = 1")
        .await
        .expect("update");
    let values = never("after a write in the transaction", KV_READ).await;
    assert_eq!(
        values[0], "in the transaction",
        "the transaction's own write"
    );
    client.batch_execute("rollback").await.expect("rollback");
    still_there("a rolled-back transaction").await;

    // Volatile functions, with the rule and with a hint.
    let values = never(
        "clock_timestamp()",
        "select v || clock_timestamp()::text from kv where k = 1",
    )
    .await;
    assert_ne!(values[0], values[2], "clock_timestamp() repeated itself");
    still_there("reads of kv calling clock_timestamp()").await;
    never(
        "random(), hinted",
        "/* pgway:cache ttl=30s */ select v || random()::text from kv where k = 1",
    )
    .await;
    let values = never(
        "nextval(), hinted",
        "/* pgway:cache ttl=30s */ select nextval('seq')",
    )
    .await;
    assert_eq!(values, vec!["1", "2", "3"], "nextval() through pgway");
    still_there("random() and nextval()").await;

    // A view and an unlogged table, with the rule and with a hint.
    never("a view", "select v from kv_view where k = 1").await;
    never(
        "a view, hinted",
        "/* pgway:cache ttl=30s */ select v from kv_view where k = 1",
    )
    .await;
    // (A replica cannot read an unlogged table, and pgway does not know to send such a
    // read to the primary: the hint does.)
    let values = never(
        "an unlogged table",
        "/* pgway:primary */ select v from kv_unlogged where k = 1",
    )
    .await;
    assert_eq!(values[0], "unlogged one");
    never(
        "an unlogged table, hinted",
        "/* pgway:primary pgway:cache ttl=30s */ select v from kv_unlogged where k = 1",
    )
    .await;

    still_there("reads of a view and an unlogged table").await;

    // Errors.
    for i in 0..3 {
        let e = simple_rows(
            &client,
            "/* pgway:cache ttl=30s */ select 1 / (k - 1) from kv",
        )
        .await
        .expect_err("division by zero");
        assert_eq!(sqlstate(&e), "22012", "{}", describe_error(&e));
        let route = last_route(&client).await;
        if is_cache(&route) {
            cached
                .borrow_mut()
                .push(format!("an error, read {i}: {route}"));
        }
    }

    // A pinned client: its temporary table shadows `kv`, so the entry is not its answer.
    let pinned = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    still_there("failed reads").await;
    fill(&pinned, KV_READ, "one").await;
    pinned
        .batch_execute(
            "create temporary table kv (k int, v text); insert into kv values (1, 'temporary')",
        )
        .await
        .expect("a temporary table");
    for i in 0..3 {
        let (v, route) = read_value(&pinned, KV_READ).await;
        assert_eq!(
            v, "temporary",
            "read {i} of a client with a temporary kv got another table's rows (route {route:?})"
        );
        if is_cache(&route) {
            cached
                .borrow_mut()
                .push(format!("a pinned client, read {i}: {route}"));
        }
    }
    let cached = cached.into_inner();
    assert!(
        cached.is_empty(),
        "answered from the cache:\n{}",
        cached.join("\n")
    );
    let dropped = dropped.into_inner();
    assert!(
        dropped.is_empty(),
        "statements that commit no write dropped kv's entry:\n{}",
        dropped.join("\n")
    );
}

// ---------------------------------------------------------------------------------------
// 15. Consistency checker
// ---------------------------------------------------------------------------------------

/// A committed increment: when its reply arrived, and the value it set.
#[derive(Clone, Copy, Debug)]
struct Write {
    acked: Instant,
    n: i64,
}

/// A read through pgway: when it was sent, and the value.
#[derive(Clone, Copy, Debug)]
struct Read {
    started: Instant,
    n: i64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistency_checker_under_concurrent_writers_and_readers() {
    let secs: u64 = std::env::var("PGWAY_CACHE_CHECK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let duration = Duration::from_secs(secs);
    let cluster = Cluster::start_with_schema(
        1,
        "SET ROLE app;
         CREATE TABLE counters (id int PRIMARY KEY, n bigint NOT NULL);
         INSERT INTO counters VALUES (1, 0);
         RESET ROLE;",
    );
    let primary = cluster.primary_port();
    let (gw, admin) = start_gateway(&cluster, cache_toml(true, "", &["public.counters"], "3h"));
    gw.wait_for_replica_reads(&cluster).await;
    const READ: &str = "select n from counters where id = 1";
    const INCREMENT: &str = "update counters set n = n + 1 where id = 1 returning n";
    let warm = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    wait_following(admin, &warm, READ).await;
    let before = stats(admin).await;

    let writes: Arc<Mutex<Vec<Write>>> = Arc::default();
    let ryw_violations: Arc<Mutex<Vec<String>>> = Arc::default();
    let start = Instant::now();
    let end = start + duration;
    let mut tasks = Vec::new();

    // Writers: two through pgway (each checks it reads its own write back), two directly
    // on the primary.
    for w in 0..4 {
        let through_pgway = w < 2;
        let port = if through_pgway { gw.port() } else { primary };
        let client = connect(port, APP_USER, APP_PASSWORD).await;
        let writes = writes.clone();
        let ryw = ryw_violations.clone();
        tasks.push(tokio::spawn(async move {
            let mut count = 0u64;
            while Instant::now() < end {
                let n: i64 = simple_value(&client, INCREMENT)
                    .await
                    .unwrap_or_else(|e| panic!("writer {w}: {}", describe_error(&e)))
                    .parse()
                    .expect("a number");
                let acked = Instant::now();
                writes.lock().unwrap().push(Write { acked, n });
                count += 1;
                if through_pgway {
                    let seen: i64 = simple_value(&client, READ)
                        .await
                        .unwrap_or_else(|e| panic!("writer {w} read: {}", describe_error(&e)))
                        .parse()
                        .expect("a number");
                    if seen < n {
                        ryw.lock().unwrap().push(format!(
                            "writer {w} wrote {n} and then read {seen} through pgway"
                        ));
                    }
                }
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            (if through_pgway { "pgway" } else { "direct" }, count)
        }));
    }

    // Readers through pgway.
    let mut readers = Vec::new();
    for r in 0..3 {
        let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
        readers.push(tokio::spawn(async move {
            let mut reads = Vec::new();
            let mut hits = 0u64;
            while Instant::now() < end {
                let started = Instant::now();
                let n: i64 = simple_value(&client, READ)
                    .await
                    .unwrap_or_else(|e| panic!("reader {r}: {}", describe_error(&e)))
                    .parse()
                    .expect("a number");
                reads.push(Read { started, n });
                // Every tenth read, ask where it came from (a second round trip).
                if reads.len() % 10 == 0 && is_cache(&last_route(&client).await) {
                    hits += 1;
                }
                tokio::task::yield_now().await;
            }
            (reads, hits)
        }));
    }

    let mut by_kind = std::collections::BTreeMap::new();
    for t in tasks {
        let (kind, count) = t.await.expect("a writer");
        *by_kind.entry(kind).or_insert(0u64) += count;
    }
    let mut all_reads = Vec::new();
    let mut sampled_hits = 0;
    for (r, t) in readers.into_iter().enumerate() {
        let (reads, hits) = t.await.expect("a reader");
        sampled_hits += hits;
        all_reads.push((r, reads));
    }
    let after = stats(admin).await;

    // The check.
    let mut writes = writes.lock().unwrap().clone();
    writes.sort_by_key(|w| w.acked);
    // prefix_max[i] = the largest value among writes[..=i].
    let prefix_max: Vec<i64> = writes
        .iter()
        .scan(0i64, |m, w| {
            *m = (*m).max(w.n);
            Some(*m)
        })
        .collect();
    let must_see = |started: Instant| -> i64 {
        let Some(cutoff) = started.checked_sub(INVALIDATION_BOUND) else {
            return 0;
        };
        let i = writes.partition_point(|w| w.acked <= cutoff);
        if i == 0 {
            0
        } else {
            prefix_max[i - 1]
        }
    };
    // Staleness of a read: how long before it started the first write above its value
    // had been acknowledged.
    let by_value: std::collections::HashMap<i64, Instant> =
        writes.iter().map(|w| (w.n, w.acked)).collect();
    let mut stale_violations = Vec::new();
    let mut backwards = Vec::new();
    let mut worst_staleness = Duration::ZERO;
    let mut total_reads = 0;
    for (r, reads) in &all_reads {
        total_reads += reads.len();
        let mut last = 0i64;
        for read in reads {
            let floor = must_see(read.started);
            if read.n < floor {
                stale_violations.push(format!(
                    "reader {r} at +{:?} read {} but {} was acknowledged more than {:?} before",
                    read.started - start,
                    read.n,
                    floor,
                    INVALIDATION_BOUND
                ));
            }
            if read.n < last {
                backwards.push(format!(
                    "reader {r} at +{:?} read {} after {}",
                    read.started - start,
                    read.n,
                    last
                ));
            }
            last = last.max(read.n);
            if let Some(acked) = by_value.get(&(read.n + 1)) {
                if *acked < read.started {
                    worst_staleness = worst_staleness.max(read.started - *acked);
                }
            }
        }
    }
    let ryw = ryw_violations.lock().unwrap().clone();
    eprintln!(
        "consistency checker, {secs} s: writes {by_kind:?} (final value {}), {total_reads} reads \
         by 3 readers ({sampled_hits} of the sampled every-tenth reads were hits), worst \
         staleness {worst_staleness:?}; /cache hits {} misses {} invalidations {}; violations: \
         {} stale, {} backwards, {} read-your-writes",
        writes.last().map_or(0, |w| w.n),
        counter(&after, "hits") - counter(&before, "hits"),
        counter(&after, "misses") - counter(&before, "misses"),
        counter(&after, "invalidations") - counter(&before, "invalidations"),
        stale_violations.len(),
        backwards.len(),
        ryw.len(),
    );
    let final_n = server_number(&cluster, primary, "select n from counters where id = 1");
    assert_eq!(
        final_n as usize,
        writes.len(),
        "every increment is recorded once"
    );
    assert!(
        total_reads > 100,
        "too few reads to check anything: {total_reads}"
    );
    assert!(
        counter(&after, "hits") > counter(&before, "hits"),
        "no read was answered from the cache: {after}"
    );
    let show = |v: &[String]| v.iter().take(10).cloned().collect::<Vec<_>>().join("\n");
    assert!(
        stale_violations.is_empty(),
        "{} reads older than the bound:\n{}",
        stale_violations.len(),
        show(&stale_violations)
    );
    assert!(
        backwards.is_empty(),
        "{} reads went backwards:\n{}",
        backwards.len(),
        show(&backwards)
    );
    assert!(
        ryw.is_empty(),
        "{} read-your-writes violations:\n{}",
        ryw.len(),
        show(&ryw)
    );
}
