//! Pinning: session-bound state (LISTEN, SQL PREPARE) holds the client on its server
//! connection, what the server sends unprompted reaches the idle client, DISCARD ALL lets
//! go, and a pinned connection is closed rather than handed to another client.

use super::*;

/// A client that ran `LISTEN ch` on a new primary connection, which pins it there.
async fn listening(h: &mut Harness) -> (TestClient, FakeServer) {
    let mut client = h.client().await;
    client.query("LISTEN ch").await;
    let mut primary = h.accept(PRIMARY).await;
    assert_eq!(primary.recv_query().await, "LISTEN ch");
    primary.answer("LISTEN", b'I').await;
    assert_eq!(tags(&client.until_ready().await), "CZ");
    (client, primary)
}

#[tokio::test]
async fn listen_pins_the_client_to_its_primary_connection() {
    let mut h = Harness::new(2);
    let (mut client, mut primary) = listening(&mut h).await;
    assert_eq!(h.idle(PRIMARY), 0, "not released");
    // Later reads go to the same connection, not to the replica.
    for sql in ["select 1", "select 2"] {
        client.query(sql).await;
        assert_eq!(primary.recv_query().await, sql);
        primary.answer_select("1", b'I').await;
        assert_eq!(tags(&client.until_ready().await), "TDCZ");
    }
    assert_eq!(h.idle(PRIMARY), 0);
    assert!(!h.has_pending_connection(REPLICA));
    assert!(!h.has_pending_connection(PRIMARY));
    // A cancel still reaches the pinned connection between requests.
    let target = h.shared.cancels.target(client.pid, client.secret);
    assert_eq!(target.map(|t| t.pid), Some(primary.pid));
}

#[tokio::test]
async fn a_notification_between_requests_reaches_the_idle_client() {
    let mut h = Harness::new(2);
    let (mut client, mut primary) = listening(&mut h).await;
    primary
        .send(wire::notification(primary.pid, "ch", "hello"))
        .await;
    let (tag, body) = client.recv().await;
    assert_eq!(tag, b'A');
    assert_eq!(cstrings(&body[4..], 2), ["ch", "hello"]);
    // The session goes on on the same connection.
    client.query("select 1").await;
    assert_eq!(primary.recv_query().await, "select 1");
    primary.answer_select("1", b'I').await;
    assert_eq!(tags(&client.until_ready().await), "TDCZ");
}

#[tokio::test]
async fn a_notification_in_the_same_write_as_ready_for_query_reaches_the_client() {
    let mut h = Harness::new(2);
    let mut client = h.client().await;
    client.query("LISTEN ch").await;
    let mut primary = h.accept(PRIMARY).await;
    assert_eq!(primary.recv_query().await, "LISTEN ch");
    let mut out = wire::complete("LISTEN");
    out.extend_from_slice(&wire::ready(b'I'));
    out.extend_from_slice(&wire::notification(primary.pid, "ch", "early"));
    primary.send(out).await;
    assert_eq!(tags(&client.until_ready().await), "CZ");
    // No further traffic from either side.
    let (tag, body) = client.recv().await;
    assert_eq!(tag, b'A');
    assert_eq!(cstrings(&body[4..], 2), ["ch", "early"]);
}

#[tokio::test]
async fn discard_all_unpins_and_the_next_read_goes_to_the_replica() {
    let mut h = Harness::new(2);
    let (mut client, mut primary) = listening(&mut h).await;
    client.query("DISCARD ALL").await;
    assert_eq!(primary.recv_query().await, "DISCARD ALL");
    primary.answer("DISCARD ALL", b'I').await;
    assert_eq!(tags(&client.until_ready().await), "CZ");
    assert_eq!(h.idle(PRIMARY), 1, "released");
    assert_eq!(h.shared.cancels.target(client.pid, client.secret), None);

    h.read_on_replica(&mut client).await;
}

#[tokio::test]
async fn a_client_that_leaves_while_pinned_gets_its_connection_closed() {
    let mut h = Harness::new(1);
    let (client, mut primary) = listening(&mut h).await;
    client.terminate().await;
    // Closed, not rolled back and parked: the next client would inherit the LISTEN.
    assert_eq!(tags(&primary.until_closed().await), "");
    assert_eq!(h.idle(PRIMARY), 0);

    // Its pool slot is free: the next client gets a new connection.
    let mut other = h.client().await;
    other.query("insert into t values (1)").await;
    let mut primary = h.accept(PRIMARY).await;
    assert_eq!(primary.recv_query().await, "insert into t values (1)");
    primary.answer("INSERT 0 1", b'I').await;
    assert_eq!(tags(&other.until_ready().await), "CZ");
}

#[tokio::test]
async fn a_client_waiting_for_a_pinned_connection_gets_53300_and_goes_on() {
    let mut h = Harness::new(1);
    let (_listener, _primary) = listening(&mut h).await;
    let mut client = h.client().await;
    client.query("insert into t values (1)").await;
    let reply = client.until_ready().await;
    assert_eq!(tags(&reply), "EZ");
    assert_eq!(sqlstate(&reply[0]), "53300");
    assert_eq!(severity(&reply[0]), "ERROR");
    assert!(!h.has_pending_connection(PRIMARY));

    // The session goes on: a read has the replica's pool to itself.
    h.read_on_replica(&mut client).await;
}

#[tokio::test]
async fn sql_prepare_pins_and_deallocate_all_then_goes_to_its_server() {
    let mut h = Harness::new(2);
    let mut client = h.client().await;
    client.query("PREPARE p AS select 1").await;
    let mut primary = h.accept(PRIMARY).await;
    assert_eq!(primary.recv_query().await, "PREPARE p AS select 1");
    primary.answer("PREPARE", b'I').await;
    assert_eq!(tags(&client.until_ready().await), "CZ");
    assert_eq!(h.idle(PRIMARY), 0, "pinned");

    client.query("EXECUTE p").await;
    assert_eq!(primary.recv_query().await, "EXECUTE p");
    primary.answer_select("1", b'I').await;
    assert_eq!(tags(&client.until_ready().await), "TDCZ");
    // The SQL-level statement lives on the server: DEALLOCATE ALL is not answered by
    // pgway while the client is pinned.
    client.query("DEALLOCATE ALL").await;
    assert_eq!(primary.recv_query().await, "DEALLOCATE ALL");
    primary.answer("DEALLOCATE ALL", b'I').await;
    assert_eq!(tags(&client.until_ready().await), "CZ");
    assert!(!h.has_pending_connection(PRIMARY));
    assert!(!h.has_pending_connection(REPLICA));
    // With its prepared statements gone, nothing holds the client any more.
    answer_bound_state(&mut primary, false).await;
    h.read_on_replica(&mut client).await;
}

#[tokio::test]
async fn a_set_pgway_cannot_follow_goes_to_the_server_and_pins_when_it_succeeds() {
    let mut h = Harness::new(2);
    let mut client = h.client().await;
    // A value pgway cannot replay exactly: the server decides.
    client.query("SET x.y = 'a' 'b'").await;
    let mut primary = h.accept(PRIMARY).await;
    assert_eq!(primary.recv_query().await, "SET x.y = 'a' 'b'");
    primary
        .send(wire::batch(&[
            wire::error(Severity::Error, "42601", "syntax error at or near \"'b'\""),
            wire::ready(b'I'),
        ]))
        .await;
    let reply = client.until_ready().await;
    assert_eq!(tags(&reply), "EZ");
    assert_eq!(sqlstate(&reply[0]), "42601", "the server's own answer");
    assert_eq!(h.idle(PRIMARY), 1, "a failed statement does not pin");

    // When the server takes it, the client stays on that connection.
    client.query("SET x.y = 'a' 'b'").await;
    assert_eq!(primary.recv_query().await, "SET x.y = 'a' 'b'");
    primary.answer("SET", b'I').await;
    assert_eq!(tags(&client.until_ready().await), "CZ");
    assert_eq!(h.idle(PRIMARY), 0, "pinned");
    client.query("select 1").await;
    assert_eq!(primary.recv_query().await, "select 1");
    primary.answer_select("1", b'I').await;
    client.until_ready().await;
    assert!(!h.has_pending_connection(REPLICA));
}

#[tokio::test]
async fn session_characteristics_follow_the_client() {
    let mut h = Harness::new(1);
    let mut a = h.client().await;
    a.query("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .await;
    let mut primary = h.accept(PRIMARY).await;
    primary.recv_query().await;
    primary.answer("SET", b'I').await;
    assert_eq!(tags(&a.until_ready().await), "CZ");
    assert_eq!(h.idle(PRIMARY), 1, "followed, not pinned");

    // Another client on the one connection gets the default back first ...
    let mut b = h.client().await;
    b.query("insert into t values (1)").await;
    assert_eq!(primary.recv_query().await, "insert into t values (1)");
    assert!(
        primary
            .syncs
            .last()
            .is_some_and(|s| s.contains("RESET default_transaction_isolation")),
        "{:?}",
        primary.syncs
    );
    primary.answer("INSERT 0 1", b'I').await;
    b.until_ready().await;
    // ... and the first client's setting comes back with it.
    a.query("insert into t values (2)").await;
    assert_eq!(primary.recv_query().await, "insert into t values (2)");
    assert!(
        primary
            .syncs
            .last()
            .is_some_and(|s| s.contains("default_transaction_isolation = 'repeatable read'")),
        "{:?}",
        primary.syncs
    );
    primary.answer("INSERT 0 1", b'I').await;
    a.until_ready().await;
}

/// Answers pgway's question whether the connection still holds session-bound state.
async fn answer_bound_state(primary: &mut FakeServer, bound: bool) {
    let sql = primary.recv_query().await;
    assert!(sql.contains("pg_listening_channels()"), "{sql}");
    let mut out = wire::row_description(&["?column?"]);
    out.extend_from_slice(&wire::data_row(&[if bound { "t" } else { "f" }]));
    out.extend_from_slice(&wire::complete("SELECT 1"));
    out.extend_from_slice(&wire::ready(b'I'));
    primary.send(out).await;
}

#[tokio::test]
async fn unlisten_unpins_once_the_server_says_nothing_is_left() {
    let mut h = Harness::new(2);
    let (mut client, mut primary) = listening(&mut h).await;
    client.query("UNLISTEN *").await;
    assert_eq!(primary.recv_query().await, "UNLISTEN *");
    primary.answer("UNLISTEN", b'I').await;
    assert_eq!(tags(&client.until_ready().await), "CZ");
    answer_bound_state(&mut primary, false).await;
    // Released: the next read goes to the replica.
    h.read_on_replica(&mut client).await;
    assert_eq!(
        h.idle(PRIMARY),
        1,
        "the primary connection went back to its pool"
    );
}

#[tokio::test]
async fn a_client_stays_pinned_while_the_server_still_holds_its_state() {
    let mut h = Harness::new(2);
    let (mut client, mut primary) = listening(&mut h).await;
    // Another channel is still listened to.
    client.query("UNLISTEN other").await;
    assert_eq!(primary.recv_query().await, "UNLISTEN other");
    primary.answer("UNLISTEN", b'I').await;
    client.until_ready().await;
    answer_bound_state(&mut primary, true).await;
    client.query("select 1").await;
    assert_eq!(primary.recv_query().await, "select 1");
    primary.answer_select("1", b'I').await;
    assert_eq!(tags(&client.until_ready().await), "TDCZ");
    assert!(!h.has_pending_connection(REPLICA));
    // Statements that cannot let go of anything are not followed by a question.
    assert_eq!(h.idle(PRIMARY), 0);
}
