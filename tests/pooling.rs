//! Transaction pooling: bounded pools, the wait timeout (SQLSTATE 53300), clean-up when a
//! client leaves inside a transaction, and session settings that follow the client.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test step that cannot go on fails the test, with its message"
)]

mod common;

use std::collections::BTreeSet;

use common::*;
use tokio_postgres::error::SqlState;

const SCHEMA: &str = "SET ROLE app;\n\
    CREATE TABLE items (id int, v text);\n\
    CREATE SEQUENCE item_seq;\n";

/// A primary and one replica with [`SCHEMA`], and pgway in front with `pool.size =
/// pool_size`, once reads reach the replica.
async fn pooled_gateway(pool_size: usize, wait_timeout: &str) -> (Cluster, Gateway) {
    let cluster = Cluster::start_with_schema(1, SCHEMA);
    let gw = Gateway::start_with(
        &cluster,
        GatewayOptions {
            pool_size,
            wait_timeout: wait_timeout.into(),
            // A read right after a write waits for the replica to replay it; on a loaded
            // machine that can take longer than the default 20ms, and these tests check
            // where reads go, not the wait.
            extra: "[routing]\nread_your_writes_wait = \"5s\"\n".into(),
            ..GatewayOptions::default()
        },
    );
    gw.wait_for_replica_reads(&cluster).await;
    (cluster, gw)
}

/// `sql` from `client` must fail with 53300: the pool it needs stays busy for
/// `pool.wait_timeout`.
async fn times_out(client: &tokio_postgres::Client, sql: &str, what: &str) {
    let err = client
        .simple_query(sql)
        .await
        .expect_err(&format!("{what} must fail while the pool is busy"));
    assert_eq!(
        err.code(),
        Some(&SqlState::TOO_MANY_CONNECTIONS),
        "{what}: expected SQLSTATE 53300, got {}",
        describe_error(&err)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_waiting_longer_than_wait_timeout_gets_53300() {
    let (cluster, gw) = pooled_gateway(1, "1s").await;

    // Client A holds the only primary server connection in an open transaction.
    let a = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    a.batch_execute("begin; insert into items (id, v) values (1, 'a')")
        .await
        .expect("client A: begin + insert");

    // Client B's write has to wait for it and gives up after wait_timeout with 53300.
    let b = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    times_out(
        &b,
        "insert into items (id, v) values (2, 'b')",
        "B's first write",
    )
    .await;

    // Reads use the replica's pool and are not blocked by the busy primary pool.
    let port = served_by(&b).await;
    assert_eq!(
        port,
        cluster.replica_ports()[0],
        "read while the primary pool is busy: served by {}",
        cluster.name_of(port)
    );

    // Once A commits, B's write goes through on the same session.
    a.simple_query("commit").await.expect("client A: commit");
    let port = eventually(
        "client B's write after client A committed",
        WAIT,
        async || {
            let rows = simple_rows(
                &b,
                "insert into items (id, v) values (2, 'b') returning inet_server_port()",
            )
            .await
            .map_err(|e| describe_error(&e))?;
            Ok(rows[0][0].clone().unwrap_or_default())
        },
    )
    .await;
    assert_eq!(port, cluster.primary_port().to_string());

    // B's session times its waits with one timer, armed again for each: after a wait
    // that ended in time, it still gives up on the next one.
    a.batch_execute("begin; insert into items (id, v) values (3, 'a2')")
        .await
        .expect("client A: second transaction");
    times_out(
        &b,
        "insert into items (id, v) values (4, 'b2')",
        "B's second write",
    )
    .await;
    a.simple_query("commit").await.expect("client A: commit");
    assert_eq!(
        cluster.psql_admin(
            cluster.primary_port(),
            "select string_agg(v, ',' order by id) from items"
        ),
        "a,b,a2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_begin_takes_no_server_connection_until_the_transaction_uses_one() {
    let (cluster, gw) = pooled_gateway(1, "1s").await;
    let primary = cluster.primary_port();
    let a = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    let b = connect(gw.port(), APP_USER, APP_PASSWORD).await;

    // pgway answers A's BEGIN and holds it: the pool's one primary connection stays free,
    // and B's write does not wait for A (it would get 53300 after 1s).
    a.simple_query("begin").await.expect("client A: begin");
    b.simple_query("insert into items (id, v) values (1, 'b')")
        .await
        .unwrap_or_else(|e| {
            panic!(
                "client B's write while A is in a transaction: {}",
                describe_error(&e)
            )
        });

    // A's first statement opens the transaction on the server, BEGIN first: it is not
    // committed on its own, and its backend is idle in a transaction.
    let row = simple_rows(
        &a,
        "insert into items (id, v) values (2, 'a') returning inet_server_port(), pg_backend_pid()",
    )
    .await
    .unwrap_or_else(|e| panic!("client A's insert: {}", describe_error(&e)));
    assert_eq!(row[0][0].as_deref(), Some(primary.to_string().as_str()));
    let pid = row[0][1].clone().unwrap_or_default();
    assert_eq!(
        cluster.psql_admin(
            primary,
            &format!("select state from pg_stat_activity where pid = {pid}")
        ),
        "idle in transaction"
    );
    assert_eq!(
        cluster.psql_admin(primary, "select count(*) from items where id = 2"),
        "0",
        "A's insert is not visible before its transaction ends"
    );
    times_out(
        &b,
        "insert into items (id, v) values (3, 'b')",
        "B's write while A's transaction holds the connection",
    )
    .await;

    // ROLLBACK undoes it; a held BEGIN followed by COMMIT keeps what came between.
    a.simple_query("rollback")
        .await
        .expect("client A: rollback");
    a.simple_query("begin")
        .await
        .expect("client A: second begin");
    a.simple_query("insert into items (id, v) values (4, 'a')")
        .await
        .expect("client A: second insert");
    a.simple_query("commit").await.expect("client A: commit");
    assert_eq!(committed_items(&cluster), "b1,a4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_share_a_pool_bounded_by_pool_size() {
    const CLIENTS: usize = 8;
    const ROUNDS: usize = 5;
    let (cluster, gw) = pooled_gateway(2, "20s").await;

    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let port = gw.port();
        tasks.push(tokio::spawn(async move {
            let client = connect(port, APP_USER, APP_PASSWORD).await;
            // (server port, backend pid) of every statement.
            let mut seen = Vec::new();
            for r in 0..ROUNDS {
                let w = client
                    .query_one(
                        "insert into items (id, v) \
                         select $1, pg_sleep(0.05)::text \
                         returning inet_server_port(), pg_backend_pid()",
                        &[&((c * 100 + r) as i32)],
                    )
                    .await
                    .unwrap_or_else(|e| panic!("client {c} write {r}: {}", describe_error(&e)));
                seen.push((w.get::<_, i32>(0) as u16, w.get::<_, i32>(1)));
                let rd = client
                    .query_one(
                        "select inet_server_port(), pg_backend_pid() from pg_sleep(0.05)",
                        &[],
                    )
                    .await
                    .unwrap_or_else(|e| panic!("client {c} read {r}: {}", describe_error(&e)));
                seen.push((rd.get::<_, i32>(0) as u16, rd.get::<_, i32>(1)));
            }
            seen
        }));
    }
    let mut by_node: std::collections::BTreeMap<u16, BTreeSet<i32>> = Default::default();
    for t in tasks {
        for (port, pid) in t.await.expect("client task") {
            by_node.entry(port).or_default().insert(pid);
        }
    }
    assert_eq!(
        cluster.psql_admin(cluster.primary_port(), "select count(*) from items"),
        (CLIENTS * ROUNDS).to_string(),
        "every client's writes must have succeeded"
    );
    for (port, pids) in &by_node {
        assert!(
            pids.len() <= 2,
            "{} served {CLIENTS} clients with {} server connections (pool.size = 2): pids {pids:?}",
            cluster.name_of(*port),
            pids.len()
        );
    }
    assert!(
        by_node.contains_key(&cluster.primary_port()),
        "writes never reached the primary: {by_node:?}"
    );
}

/// Client A holds the only primary connection in a transaction (its backend pid), and
/// client B's insert of row `id` is sent meanwhile, on a task of its own: B waits in the
/// pool's queue. Returns B's task, which yields the backend pid that served the insert.
async fn queue_behind_a_transaction(
    gw: &Gateway,
    a: &tokio_postgres::Client,
    id: i32,
) -> (i32, tokio::task::JoinHandle<i32>) {
    a.batch_execute("begin; insert into items (id, v) values (1, 'a')")
        .await
        .expect("client A: begin + insert");
    let a_pid: i32 = simple_value(a, "select pg_backend_pid()")
        .await
        .expect("client A's backend pid")
        .parse()
        .expect("a pid");
    let b = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    let waiting = tokio::spawn(async move {
        let row = b
            .query_one(
                "insert into items (id, v) values ($1, 'b') returning pg_backend_pid()",
                &[&id],
            )
            .await
            .unwrap_or_else(|e| panic!("client B's insert: {}", describe_error(&e)));
        row.get::<_, i32>(0)
    });
    // Long enough for B to be in the queue; were it not yet, the steps below still hold.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "client B did not wait for client A");
    (a_pid, waiting)
}

/// The backend pid that served client B's insert (see [`queue_behind_a_transaction`]),
/// which must come within [`WAIT`] after `what`.
async fn served(waiting: tokio::task::JoinHandle<i32>, what: &str) -> i32 {
    tokio::time::timeout(WAIT, waiting)
        .await
        .unwrap_or_else(|_| panic!("client B still waiting after {what}"))
        .expect("client B's task")
}

/// The committed rows of `items` on the primary, as `v || id` in id order.
fn committed_items(cluster: &Cluster) -> String {
    cluster.psql_admin(
        cluster.primary_port(),
        "select string_agg(v || id, ',' order by id) from items",
    )
}

// DESIGN.md (Pooling): "dead connections replaced"; a client waiting in the queue gets the
// slot of a connection that died under another client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_client_gets_the_slot_of_a_connection_that_closed() {
    let (cluster, gw) = pooled_gateway(1, "20s").await;
    let a = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    let (a_pid, waiting) = queue_behind_a_transaction(&gw, &a, 2).await;

    // A's server connection goes away under it; A's next statement finds out, which
    // closes it: its slot goes to B, who connects anew.
    cluster.psql_admin(
        cluster.primary_port(),
        &format!("select pg_terminate_backend({a_pid})"),
    );
    a.simple_query("select 1")
        .await
        .expect_err("A's transaction ended with its server connection");
    let b_pid = served(waiting, "A's connection closed").await;
    assert_ne!(b_pid, a_pid, "B was served by A's terminated backend");
    assert_eq!(
        committed_items(&cluster),
        "b2",
        "A's transaction is rolled back, B's insert committed"
    );
}

// README (Pooling): "Clients waiting for a server connection are served in the order they
// came". Three clients queue behind a transaction on a pool of one; each takes the next
// value of a sequence when served, so the values show the order. (Simple queries: one
// request each. A prepared statement's Parse and its Execute queue apart, and a client's
// Execute may come after the next client's.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_clients_are_served_in_the_order_they_came() {
    let (cluster, gw) = pooled_gateway(1, "20s").await;
    let a = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    a.batch_execute("begin; insert into items (id, v) values (0, 'a')")
        .await
        .expect("client A: begin + insert");
    let mut waiting = Vec::new();
    for name in ["b", "c", "d"] {
        let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
        waiting.push(tokio::spawn(async move {
            let sql = format!(
                "insert into items (id, v) values (nextval('item_seq'), '{name}') returning id"
            );
            let id = simple_value(&client, &sql)
                .await
                .unwrap_or_else(|e| panic!("client {name}'s insert: {}", describe_error(&e)));
            id.parse::<i32>().expect("an id")
        }));
        // Long enough for this client to be in the queue before the next one comes.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(
            !waiting.last().is_some_and(|w| w.is_finished()),
            "client {name} did not wait for client A"
        );
    }
    a.simple_query("commit").await.expect("client A: commit");
    let mut served = Vec::new();
    for waiter in waiting {
        served.push(
            tokio::time::timeout(WAIT, waiter)
                .await
                .expect("a queued client still waiting after A committed")
                .expect("a queued client's task"),
        );
    }
    assert_eq!(served, [1, 2, 3], "b, c and d were served in that order");
    assert_eq!(committed_items(&cluster), "a0,b1,c2,d3");
}

// README (reload): "a larger `size` (or `pool_size`) is usable at once", also by a client
// already waiting in the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_grows_pool_size_serves_waiting_clients_at_once() {
    let cluster = Cluster::start_with_schema(1, SCHEMA);
    let toml = gateway_toml(
        &cluster,
        "LISTEN",
        "127.0.0.1:0",
        &GatewayOptions {
            pool_size: 1,
            wait_timeout: "30s".into(),
            ..GatewayOptions::default()
        },
    )
    .replace(
        &format!("password = \"{APP_PASSWORD}\"\n"),
        &format!("password = \"{APP_PASSWORD}\"\nadmin = true\n"),
    );
    let gw = Gateway::start_toml(|listen| toml.replace("LISTEN", listen));
    let listen = format!("127.0.0.1:{}", gw.port());
    let a = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    let (a_pid, waiting) = queue_behind_a_transaction(&gw, &a, 2).await;

    let grown = toml
        .replace("LISTEN", &listen)
        .replace("size = 1\n", "size = 2\n");
    assert_ne!(
        grown,
        toml.replace("LISTEN", &listen),
        "the config sets size = 1"
    );
    gw.reload(&grown, APP_USER, APP_PASSWORD)
        .await
        .expect("RELOAD with pool.size = 2");
    // B is served while A's transaction is still open, by a second connection.
    let b_pid = served(waiting, "pool.size grew").await;
    assert_ne!(b_pid, a_pid);
    a.simple_query("commit").await.expect("client A: commit");
    assert_eq!(committed_items(&cluster), "a1,b2");
}

/// Starts a client in a transaction with an uncommitted insert, then lets it go away with
/// `leave`, and checks that the transaction was rolled back and released its locks.
async fn disconnect_in_transaction_rolls_back(abrupt: bool) {
    let cluster = Cluster::start_with_schema(1, SCHEMA);
    let gw = Gateway::start(&cluster);
    let primary = cluster.primary_port();

    let s = session(gw.port(), APP_USER, APP_PASSWORD).await;
    s.client
        .batch_execute("begin; insert into items (id, v) values (500, 'uncommitted')")
        .await
        .expect("begin + insert");
    let pid = simple_value(&s.client, "select pg_backend_pid()")
        .await
        .expect("backend pid in transaction");
    if abrupt {
        // The socket is dropped without a Terminate message.
        s.task.abort();
        drop(s.client);
    } else {
        // tokio-postgres sends Terminate and closes.
        drop(s.client);
    }

    // No lock left behind on the primary: an ACCESS EXCLUSIVE lock is granted at once.
    eventually(
        "the ROW EXCLUSIVE lock of the abandoned transaction to go away",
        WAIT,
        async || {
            try_psql(
                primary,
                DB,
                "begin; lock table items in access exclusive mode nowait; rollback;",
            )
        },
    )
    .await;
    let idle_in_tx = cluster.psql_admin(
        primary,
        &format!(
            "select count(*) from pg_stat_activity \
             where pid = {pid} and state like 'idle in transaction%'"
        ),
    );
    assert_eq!(
        idle_in_tx, "0",
        "backend {pid} is still idle in transaction"
    );
    assert_eq!(
        cluster.psql_admin(primary, "select count(*) from items where id = 500"),
        "0",
        "the uncommitted insert must have been rolled back"
    );

    // Another client can use the table through the gateway.
    let other = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    other
        .batch_execute(
            "begin; lock table items in access exclusive mode nowait; \
             insert into items (id, v) values (501, 'ok'); commit",
        )
        .await
        .unwrap_or_else(|e| panic!("another client: {}", describe_error(&e)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_inside_a_transaction_is_rolled_back() {
    disconnect_in_transaction_rolls_back(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_socket_dropped_inside_a_transaction_is_rolled_back() {
    disconnect_in_transaction_rolls_back(true).await;
}

// DESIGN.md (Pooling): "Session state follows the client across server connections".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_settings_follow_the_client_not_the_server_connection() {
    let cluster = Cluster::start(1);
    cluster.psql_admin(
        cluster.primary_port(),
        "SET ROLE app; CREATE SCHEMA other; \
         CREATE TABLE public.whereami (v text); INSERT INTO public.whereami VALUES ('public'); \
         CREATE TABLE other.whereami (v text); INSERT INTO other.whereami VALUES ('other');",
    );
    cluster.wait_replay();
    // One server connection per node, so both clients share it.
    let gw = Gateway::start_with(
        &cluster,
        GatewayOptions {
            pool_size: 1,
            wait_timeout: "10s".into(),
            ..GatewayOptions::default()
        },
    );
    gw.wait_for_replica_reads(&cluster).await;
    let a = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    let b = connect(gw.port(), APP_USER, APP_PASSWORD).await;

    a.simple_query("set search_path = other")
        .await
        .expect("SET search_path");
    a.simple_query("set statement_timeout = '1234s'")
        .await
        .expect("SET statement_timeout");
    for round in 0..3 {
        for (who, client, want_v, want_timeout) in
            [("A", &a, "other", "1234s"), ("B", &b, "public", "0")]
        {
            let v = simple_value(client, "select v from whereami")
                .await
                .unwrap_or_else(|e| panic!("client {who}: {}", describe_error(&e)));
            assert_eq!(
                v, want_v,
                "round {round}: client {who} sees search_path's table"
            );
            let t = simple_value(client, "show statement_timeout")
                .await
                .unwrap_or_else(|e| panic!("client {who}: {}", describe_error(&e)));
            assert_eq!(
                t, want_timeout,
                "round {round}: client {who} statement_timeout"
            );
            // Writes run on the primary's connection, with the same session state.
            let w = simple_value(
                client,
                "select current_setting('search_path') || ' ' || txid_current()",
            )
            .await
            .unwrap_or_else(|e| panic!("client {who}: {}", describe_error(&e)));
            let want_path = if who == "A" {
                "other"
            } else {
                "\"$user\", public"
            };
            assert!(
                w.starts_with(&format!("{want_path} ")),
                "round {round}: client {who} search_path on the primary: {w}"
            );
        }
    }
    a.simple_query("reset search_path").await.expect("RESET");
    let v = simple_value(&a, "select v from whereami")
        .await
        .expect("read");
    assert_eq!(v, "public", "after RESET search_path");
}

/// Client sessions run on one worker thread per core, and a server connection is
/// registered with the worker that opened it. With `pool.size = 1` the one connection to
/// each node must serve clients on every worker in turn (it is moved over), and every
/// statement must still run on it: the same backend pid, the right node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_server_connection_serves_clients_on_every_worker() {
    const CLIENTS: usize = 4;
    let (cluster, gw) = pooled_gateway(1, "20s").await;

    // Opened together, the clients are spread over the workers (fewest sessions first).
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(connect(gw.port(), APP_USER, APP_PASSWORD).await);
    }
    let mut reads = BTreeSet::new();
    let mut writes = BTreeSet::new();
    for round in 0..3 {
        for (i, client) in clients.iter().enumerate() {
            let rows = simple_rows(client, "select inet_server_port(), pg_backend_pid()")
                .await
                .unwrap_or_else(|e| panic!("client {i} read {round}: {}", describe_error(&e)));
            assert_eq!(
                rows[0][0].as_deref(),
                Some(cluster.replica_ports()[0].to_string().as_str()),
                "client {i}: reads go to the replica"
            );
            reads.insert(rows[0][1].clone());
            let rows = simple_rows(
                client,
                &format!(
                    "insert into items (id, v) values ({}, 'w') \
                     returning inet_server_port(), pg_backend_pid()",
                    round * CLIENTS + i
                ),
            )
            .await
            .unwrap_or_else(|e| panic!("client {i} write {round}: {}", describe_error(&e)));
            assert_eq!(
                rows[0][0].as_deref(),
                Some(cluster.primary_port().to_string().as_str()),
                "client {i}: writes go to the primary"
            );
            writes.insert(rows[0][1].clone());
        }
    }
    assert_eq!(reads.len(), 1, "one replica connection for all: {reads:?}");
    assert_eq!(
        writes.len(),
        1,
        "one primary connection for all: {writes:?}"
    );
    assert_eq!(
        cluster.psql_admin(cluster.primary_port(), "select count(*) from items"),
        (3 * CLIENTS).to_string()
    );
}

/// When pgway stops, a client idle between transactions is told why (FATAL 57P01, as
/// PostgreSQL's own smart shutdown says it) instead of finding its socket closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clients_are_told_when_pgway_stops() {
    let cluster = Cluster::start(0);
    let gw = Gateway::start(&cluster);
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(gw.port())
        .user(APP_USER)
        .password(APP_PASSWORD)
        .dbname(DB)
        .ssl_mode(tokio_postgres::config::SslMode::Disable);
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connecting through pgway");
    let connection = tokio::spawn(connection);
    simple_rows(&client, "select 1")
        .await
        .expect("a query before the stop");

    // Dropping the gateway stops it (and waits for its thread).
    tokio::task::spawn_blocking(move || drop(gw))
        .await
        .expect("stopping the gateway");
    let ended = tokio::time::timeout(WAIT, connection)
        .await
        .expect("the client connection ends once pgway stops")
        .expect("the connection task");
    let err = ended.expect_err("pgway's FATAL ends the connection with an error");
    assert_eq!(
        err.code(),
        Some(&SqlState::ADMIN_SHUTDOWN),
        "expected SQLSTATE 57P01, got {}",
        describe_error(&err)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_pool_size_and_max_connections_override_the_defaults() {
    let cluster = Cluster::start(0);
    let gw = Gateway::start_toml(|listen| {
        gateway_toml(
            &cluster,
            listen,
            "127.0.0.1:0",
            &GatewayOptions {
                pool_size: 10,
                wait_timeout: "10s".into(),
                ..GatewayOptions::default()
            },
        )
        .replace(
            &format!("password = \"{APP_PASSWORD}\"\n"),
            &format!("password = \"{APP_PASSWORD}\"\npool_size = 2\nmax_connections = 3\n"),
        )
    });
    let port = gw.port();

    // Three transactions at once, over this user's two server connections.
    assert_eq!(concurrent_pids(port, APP_PASSWORD, 3).await.len(), 2);

    // Three clients at most; the fourth gets PostgreSQL's own refusal.
    // (The clients above may still be on their way out: their slots free as they go.)
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            eventually("a client slot", WAIT, async || {
                try_connect(port, APP_USER, APP_PASSWORD)
                    .await
                    .map_err(|e| describe_error(&e))
            })
            .await,
        );
    }
    let refused = try_connect(port, APP_USER, APP_PASSWORD)
        .await
        .expect_err("a fourth client of the user");
    assert_eq!(refused.code(), Some(&SqlState::TOO_MANY_CONNECTIONS));
    assert!(
        describe_error(&refused).contains("too many connections for role \"app\""),
        "{refused:?}"
    );
    // Another user is not counted with this one.
    let other = connect(port, MD5_USER, MD5_PASSWORD).await;
    assert_eq!(served_by(&other).await, cluster.primary_port());
    // A slot comes free when a client leaves.
    drop(held.pop());
    eventually("a slot to come free", WAIT, async || {
        try_connect(port, APP_USER, APP_PASSWORD)
            .await
            .map(drop)
            .map_err(|e| describe_error(&e))
    })
    .await;
}
