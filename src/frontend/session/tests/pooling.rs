//! Transaction pooling: clients take turns on server connections, a client that leaves
//! mid-transaction is rolled back before its connection is reused, session settings
//! follow the client from connection to connection, the cancel key points at the
//! connection in use, and one client's protocol violation ends only its own session.

use std::time::Duration;

use super::*;

/// Opens a transaction for `client` on the primary connection `primary` (parked in the
/// pool): the held `begin` arrives with its first statement.
async fn begin(client: &mut TestClient, primary: &mut FakeServer) {
    client.begin_held().await;
    client.query("select 1").await;
    primary.first_in_transaction(client, "select 1").await;
}

/// Runs a write for `client` on `primary` (the connection the pool must hand out).
async fn write(client: &mut TestClient, primary: &mut FakeServer, sql: &str) {
    client.query(sql).await;
    assert_eq!(primary.recv_query().await, sql);
    primary.answer("INSERT 0 1", b'I').await;
    assert_eq!(tags(&client.until_ready().await), "CZ");
}

#[tokio::test]
async fn two_clients_take_turns_on_one_connection() {
    let mut h = Harness::with_wait_timeout(1, "30s");
    let mut a = h.client().await;
    let mut b = h.client().await;
    let mut primary = h.open_transaction(&mut a).await;

    // B's write needs the one connection, which A's transaction holds.
    b.query("insert into t values (1)").await;
    // Give B's session time to reach the pool and wait there (not asserted: had it been
    // given a connection, its query would reach the server before A's COMMIT below).
    crate::timer::sleep(Duration::from_millis(50)).await;
    a.query("commit").await;
    assert_eq!(primary.recv_query().await, "commit");
    primary.answer("COMMIT", b'I').await;
    assert_eq!(tags(&a.until_ready().await), "CZ");

    // Then B runs, on the same server connection.
    assert_eq!(primary.recv_query().await, "insert into t values (1)");
    primary.answer("INSERT 0 1", b'I').await;
    assert_eq!(tags(&b.until_ready().await), "CZ");
    assert!(!h.has_pending_connection(PRIMARY), "no new connection");
    assert_eq!(h.idle(PRIMARY), 1);
}

#[tokio::test]
async fn a_client_that_terminates_inside_a_transaction_is_rolled_back() {
    let mut h = Harness::new(1);
    let mut a = h.client().await;
    let mut primary = h.open_transaction(&mut a).await;

    tokio::join!(a.terminate(), async {
        assert_eq!(primary.recv_query().await, "ROLLBACK");
        primary.answer("ROLLBACK", b'I').await;
    });
    assert_eq!(h.idle(PRIMARY), 1, "returned to the pool");

    let mut b = h.client().await;
    write(&mut b, &mut primary, "insert into t values (1)").await;
    assert!(!h.has_pending_connection(PRIMARY), "reused");
}

#[tokio::test]
async fn a_client_that_vanishes_inside_a_transaction_is_rolled_back() {
    let mut h = Harness::new(1);
    let mut a = h.client().await;
    a.begin_held().await;
    a.query("insert into t values (1)").await;
    let mut primary = h.accept(PRIMARY).await;
    primary.begin_received().await;
    assert_eq!(primary.recv_query().await, "insert into t values (1)");
    primary.answer("INSERT 0 1", b'T').await;
    a.until_ready().await;

    tokio::join!(a.vanish(), async {
        assert_eq!(primary.recv_query().await, "ROLLBACK");
        primary.answer("ROLLBACK", b'I').await;
    });
    assert_eq!(h.idle(PRIMARY), 1, "returned to the pool");

    let mut b = h.client().await;
    write(&mut b, &mut primary, "insert into t values (2)").await;
    assert!(!h.has_pending_connection(PRIMARY), "reused");
}

#[tokio::test]
async fn a_client_that_vanishes_before_sync_has_its_work_rolled_back_not_committed() {
    let mut h = Harness::new(1);
    let mut a = h.client().await;
    a.send(wire::batch(&[
        wire::parse("", "insert into t values (1)"),
        wire::bind("", "", &[]),
        wire::execute(""),
        wire::flush(),
    ]))
    .await;
    let mut primary = h.accept(PRIMARY).await;
    assert_eq!(tags(&primary.recv_n(4).await), "PBEH");
    primary
        .send(wire::batch(&[
            wire::frame(b'1', &[]),
            wire::frame(b'2', &[]),
            wire::complete("INSERT 0 1"),
        ]))
        .await;
    for tag in "12C".bytes() {
        assert_eq!(a.recv().await.0, tag);
    }

    // The insert runs in the implicit transaction that only a Sync would commit. Answer
    // whatever pgway sends while the session cleans up, and note it.
    let mut seen = Vec::new();
    let leave = a.vanish();
    tokio::pin!(leave);
    let mut left = false;
    while !left {
        tokio::select! {
            () = &mut leave => left = true,
            msg = primary.recv_raw() => match msg {
                Ok((b'S', _)) => {
                    seen.push(b'S');
                    primary.send(wire::ready(b'I')).await;
                }
                Ok((b'Q', _)) => {
                    seen.push(b'Q');
                    primary.answer("ROLLBACK", b'I').await;
                }
                Ok((tag, _)) => seen.push(tag),
                Err(_) => {
                    (&mut leave).await;
                    left = true;
                }
            },
        }
    }
    assert_ne!(
        seen.first(),
        Some(&b'S'),
        "a Sync before any ROLLBACK commits the client's unsynced insert"
    );
}

#[tokio::test]
async fn session_settings_follow_the_client() {
    let mut h = Harness::new(1);
    let mut a = h.client().await;
    a.query("SET work_mem = '8MB'").await;
    let mut primary = h.accept(PRIMARY).await;
    assert_eq!(primary.recv_query().await, "SET work_mem = '8MB'");
    primary.answer("SET", b'I').await;
    assert_eq!(tags(&a.until_ready().await), "CZ");

    // B gets the connection without A's setting.
    let mut b = h.client().await;
    primary.syncs.clear();
    write(&mut b, &mut primary, "insert into t values (1)").await;
    assert_eq!(primary.syncs.len(), 1, "{:?}", primary.syncs);
    assert!(primary.syncs[0].contains("work_mem"), "{:?}", primary.syncs);
    assert!(!primary.syncs[0].contains("8MB"), "{:?}", primary.syncs);

    // A comes back: its setting is applied again before its statement.
    primary.syncs.clear();
    write(&mut a, &mut primary, "insert into t values (2)").await;
    assert_eq!(primary.syncs.len(), 1, "{:?}", primary.syncs);
    assert!(
        primary.syncs[0].contains("work_mem") && primary.syncs[0].contains("'8MB'"),
        "{:?}",
        primary.syncs
    );
    // And not again while nothing changed.
    primary.syncs.clear();
    write(&mut a, &mut primary, "insert into t values (3)").await;
    assert!(primary.syncs.is_empty(), "{:?}", primary.syncs);
    assert!(!h.has_pending_connection(PRIMARY));
}

#[tokio::test]
async fn a_set_in_a_rolled_back_transaction_does_not_follow_the_client() {
    let mut h = Harness::new(1);
    let mut a = h.client().await;
    a.query("SET work_mem = '8MB'").await;
    let mut primary = h.accept(PRIMARY).await;
    assert_eq!(primary.recv_query().await, "SET work_mem = '8MB'");
    primary.answer("SET", b'I').await;
    a.until_ready().await;

    begin(&mut a, &mut primary).await;
    a.query("SET work_mem = '16MB'").await;
    assert_eq!(primary.recv_query().await, "SET work_mem = '16MB'");
    primary.answer("SET", b'T').await;
    a.until_ready().await;
    a.query("rollback").await;
    assert_eq!(primary.recv_query().await, "rollback");
    primary.answer("ROLLBACK", b'I').await;
    a.until_ready().await;

    let mut b = h.client().await;
    write(&mut b, &mut primary, "insert into t values (1)").await;
    primary.syncs.clear();
    write(&mut a, &mut primary, "insert into t values (2)").await;
    assert_eq!(primary.syncs.len(), 1, "{:?}", primary.syncs);
    assert!(primary.syncs[0].contains("'8MB'"), "{:?}", primary.syncs);
    assert!(!primary.syncs[0].contains("16MB"), "{:?}", primary.syncs);
}

#[tokio::test]
async fn the_cancel_key_names_the_server_connection_in_use() {
    let mut h = Harness::new(2);
    let mut client = h.client().await;
    assert_eq!(h.shared.cancels.target(client.pid, client.secret), None);

    client.query("select 1").await;
    let mut replica = h.accept(REPLICA).await;
    assert_eq!(replica.recv_query().await, "select 1");
    // In flight: a cancel goes to the replica connection, with the server's own key.
    let target = h
        .shared
        .cancels
        .target(client.pid, client.secret)
        .expect("a query in flight");
    assert_eq!(
        (&*target.addr, target.pid, target.secret),
        (REPLICA, replica.pid, replica.secret)
    );
    assert_eq!(
        h.shared
            .cancels
            .target(client.pid, client.secret.wrapping_add(1)),
        None,
        "wrong secret"
    );
    replica.answer_select("1", b'I').await;
    client.until_ready().await;
    assert_eq!(h.shared.cancels.target(client.pid, client.secret), None);

    // A held `begin` takes no connection: the key names none.
    client.begin_held().await;
    assert_eq!(h.shared.cancels.target(client.pid, client.secret), None);
    // Inside a transaction the key stays on the primary connection between statements.
    client.query("select 1").await;
    let mut primary = h.accept(PRIMARY).await;
    primary.first_in_transaction(&mut client, "select 1").await;
    let target = h.shared.cancels.target(client.pid, client.secret);
    assert_eq!(
        target.map(|t| (t.addr.to_string(), t.pid, t.secret)),
        Some((PRIMARY.to_owned(), primary.pid, primary.secret))
    );
    client.query("commit").await;
    assert_eq!(primary.recv_query().await, "commit");
    primary.answer("COMMIT", b'I').await;
    client.until_ready().await;
    assert_eq!(h.shared.cancels.target(client.pid, client.secret), None);
}

#[tokio::test]
async fn an_unknown_message_type_ends_only_that_session() {
    let mut h = Harness::new(2);
    let mut other = h.client().await;
    let mut primary = h.open_transaction(&mut other).await;

    let mut client = h.client().await;
    client.send(wire::frame(b'y', b"junk")).await;
    let got = client.until_closed().await;
    assert_eq!(tags(&got), "E");
    assert_eq!(sqlstate(&got[0]), "08P01");
    assert_eq!(severity(&got[0]), "FATAL");

    // The other client's transaction carries on.
    other.query("insert into t values (1)").await;
    assert_eq!(primary.recv_query().await, "insert into t values (1)");
    primary.answer("INSERT 0 1", b'T').await;
    assert_eq!(tags(&other.until_ready().await), "CZ");
    other.query("commit").await;
    assert_eq!(primary.recv_query().await, "commit");
    primary.answer("COMMIT", b'I').await;
    assert_eq!(tags(&other.until_ready().await), "CZ");
}

#[tokio::test]
async fn a_reported_setting_comes_back_as_the_server_reported_it() {
    let mut h = Harness::new(1);
    let mut a = h.client_with(&[("DateStyle", "Postgres, MDY")]).await;
    let status = |value: &str| wire::frame(b'S', format!("DateStyle\0{value}\0").as_bytes());
    // `SET datestyle TO ymd` keeps the output format ISO that the SET before it chose: the
    // server reports the combined value.
    a.query("SET datestyle TO iso").await;
    let mut primary = h.accept(PRIMARY).await;
    primary.recv_query().await;
    primary
        .send(wire::batch(&[
            status("ISO, MDY"),
            wire::complete("SET"),
            wire::ready(b'I'),
        ]))
        .await;
    assert_eq!(tags(&a.until_ready().await), "SCZ");
    a.query("SET datestyle TO ymd").await;
    primary.recv_query().await;
    primary
        .send(wire::batch(&[
            status("ISO, YMD"),
            wire::complete("SET"),
            wire::ready(b'I'),
        ]))
        .await;
    assert_eq!(tags(&a.until_ready().await), "SCZ");

    // Another client has the connection in between.
    let mut b = h.client().await;
    b.query("insert into t values (1)").await;
    assert_eq!(primary.recv_query().await, "insert into t values (1)");
    primary.answer("INSERT 0 1", b'I').await;
    b.until_ready().await;

    // The first client gets what the server last reported to it, not `SET datestyle = ymd`.
    a.query("insert into t values (2)").await;
    assert_eq!(primary.recv_query().await, "insert into t values (2)");
    let sync = primary.syncs.last().cloned().unwrap_or_default();
    assert!(
        sync.contains("set_config('datestyle', 'ISO, YMD', false)"),
        "{sync}"
    );
    primary.answer("INSERT 0 1", b'I').await;
    a.until_ready().await;
}

#[tokio::test]
async fn a_failed_string_that_committed_a_set_leaves_nothing_for_the_next_client() {
    let mut h = Harness::new(1);
    let mut a = h.client().await;
    let sql = "BEGIN; SET work_mem = '3MB'; COMMIT; select 1/0";
    a.query(sql).await;
    let mut primary = h.accept(PRIMARY).await;
    assert_eq!(primary.recv_query().await, sql);
    primary
        .send(wire::batch(&[
            wire::complete("BEGIN"),
            wire::complete("SET"),
            wire::complete("COMMIT"),
            wire::error(Severity::Error, "22012", "division by zero"),
            wire::ready(b'I'),
        ]))
        .await;
    let reply = a.until_ready().await;
    assert_eq!(tags(&reply), "CCCEZ");
    // The SET committed on the server; pgway cannot tell which statements of the string
    // took effect, so the next client's sync starts from a clean slate.
    let mut b = h.client().await;
    b.query("insert into t values (1)").await;
    assert_eq!(primary.recv_query().await, "insert into t values (1)");
    assert!(
        primary
            .syncs
            .last()
            .is_some_and(|s| s.starts_with("RESET ALL;")),
        "{:?}",
        primary.syncs
    );
    primary.answer("INSERT 0 1", b'I').await;
    b.until_ready().await;
}

/// `client` reads `sql` on the replica connection `replica`.
async fn read_on(client: &mut TestClient, replica: &mut FakeServer, sql: &str) {
    client.query(sql).await;
    assert_eq!(replica.recv_query().await, sql);
    replica.answer_select("1", b'I').await;
    assert_eq!(tags(&client.until_ready().await), "TDCZ");
}

#[tokio::test]
async fn a_parked_connection_past_its_limits_is_closed_not_lent_also_after_a_reload() {
    let mut h = Harness::with_config(&Harness::config_with_pool(
        2,
        "server_idle_timeout = \"150ms\"",
    ));
    let mut client = h.client().await;
    let mut first = h
        .read_on_new_replica_connection(&mut client, "select 1")
        .await;
    assert_eq!(h.idle(REPLICA), 1);

    // Unused for longer than server_idle_timeout: closed when next taken, and a new one
    // serves the read (no sweep runs in this harness).
    crate::timer::sleep(Duration::from_millis(300)).await;
    let mut second = h
        .read_on_new_replica_connection(&mut client, "select 2")
        .await;
    assert!(first.until_closed().await.is_empty());

    // A reload turns both limits off: the deadline worked out when the connection was
    // parked no longer holds, so it is lent again however long it waited.
    let reload = |idle: Duration, lifetime: Duration| {
        let mut pool = h.shared.config.load().pool.clone();
        pool.server_idle_timeout = idle;
        pool.server_lifetime = lifetime;
        h.shared.pools.reconfigure(pool, Vec::new());
    };
    reload(Duration::ZERO, Duration::ZERO);
    crate::timer::sleep(Duration::from_millis(300)).await;
    read_on(&mut client, &mut second, "select 3").await;

    // A reload shortens server_lifetime below the connection's age: closed when next
    // taken, though it was parked with no deadline at all.
    reload(Duration::ZERO, Duration::from_millis(100));
    h.read_on_new_replica_connection(&mut client, "select 4")
        .await;
    assert!(second.until_closed().await.is_empty());
    assert!(!h.has_pending_connection(REPLICA));
}

#[tokio::test]
async fn a_held_begin_takes_no_connection_until_its_first_statement() {
    let mut h = Harness::new(1);
    let mut a = h.client().await;
    let mut b = h.client().await;
    // A's BEGIN is answered by pgway: the pool's one connection stays free for B.
    a.begin_held().await;
    b.query("insert into t values (1)").await;
    let mut primary = h.accept(PRIMARY).await;
    assert_eq!(primary.recv_query().await, "insert into t values (1)");
    primary.answer("INSERT 0 1", b'I').await;
    assert_eq!(tags(&b.until_ready().await), "CZ");

    // A's first statement takes it, the BEGIN in front; the transaction then holds it.
    a.query("insert into t values (2)").await;
    primary.begin_received().await;
    assert_eq!(primary.recv_query().await, "insert into t values (2)");
    primary.answer("INSERT 0 1", b'T').await;
    let got = a.until_ready().await;
    assert_eq!(tags(&got), "CZ", "the BEGIN's own answer is not repeated");
    assert_eq!(text(&got[0].1), "INSERT 0 1");
    assert_eq!(got[1].1, b"T");
    assert_eq!(h.idle(PRIMARY), 0, "held for the transaction");
    a.query("commit").await;
    assert_eq!(primary.recv_query().await, "commit");
    primary.answer("COMMIT", b'I').await;
    assert_eq!(tags(&a.until_ready().await), "CZ");
    assert_eq!(h.idle(PRIMARY), 1);
    assert!(
        !h.has_pending_connection(PRIMARY),
        "one connection for both"
    );
}

#[tokio::test]
async fn a_held_begin_whose_first_statement_gets_no_connection_fails_its_transaction() {
    let mut h = Harness::new(1);
    let mut other = h.client().await;
    let _held = h.open_transaction(&mut other).await;

    let mut a = h.client().await;
    a.begin_held().await;
    // The one connection stays busy past `pool.wait_timeout`.
    a.query("insert into t values (1)").await;
    let got = a.until_ready().await;
    assert_eq!(tags(&got), "EZ");
    assert_eq!(sqlstate(&got[0]), "53300");
    assert_eq!(got[1].1, b"E", "the client's transaction failed");
    // As in any failed transaction: 25P02 until it ends; pgway answers the ROLLBACK.
    a.query("select 1").await;
    let got = a.until_ready().await;
    assert_eq!(sqlstate(&got[0]), "25P02");
    a.query("rollback").await;
    let got = a.until_ready().await;
    assert_eq!(tags(&got), "CZ");
    assert_eq!(text(&got[0].1), "ROLLBACK");
    assert_eq!(got[1].1, b"I");
    assert!(!h.has_pending_connection(PRIMARY));
}

#[tokio::test]
async fn with_hold_begin_off_a_begin_goes_to_the_server_at_once() {
    let mut h = Harness::with_config(&Harness::config_with_pool(1, "hold_begin = false"));
    let mut a = h.client().await;
    a.query("begin").await;
    let mut primary = h.accept(PRIMARY).await;
    primary.begin_received().await;
    let got = a.until_ready().await;
    assert_eq!(tags(&got), "CZ");
    assert_eq!(got[1].1, b"T");
    assert_eq!(h.idle(PRIMARY), 0, "the BEGIN holds the connection");
    a.query("commit").await;
    assert_eq!(primary.recv_query().await, "commit");
    primary.answer("COMMIT", b'I').await;
    assert_eq!(tags(&a.until_ready().await), "CZ");
    assert_eq!(h.idle(PRIMARY), 1);
}
