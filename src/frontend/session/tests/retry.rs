//! When a server goes away: a request its server shut down before answering (or a read it
//! died under before answering) is sent again elsewhere (outside a transaction only), a
//! node that refuses connects is skipped, and a server lost mid-answer or mid-transaction
//! fails the statement or the transaction with an ERROR while the client stays connected
//! (08007 for a COMMIT in flight).

use super::*;

/// Whether the topology still counts `addr` as healthy.
fn healthy(h: &Harness, addr: &str) -> bool {
    h.shared
        .topology
        .snapshot()
        .nodes
        .iter()
        .find(|n| &*n.addr == addr)
        .expect("known node")
        .healthy
}

#[tokio::test]
async fn a_read_is_sent_again_when_its_server_shuts_down_before_answering() {
    let mut h = Harness::new(2);
    let mut client = h.client().await;
    client.query("select 1").await;
    let mut replica = h.accept(REPLICA).await;
    assert_eq!(replica.recv_query().await, "select 1");
    replica
        .send(wire::error(
            Severity::Fatal,
            "57P01",
            "terminating connection due to administrator command",
        ))
        .await;
    drop(replica);

    // The only replica is out of rotation: the read goes to the primary.
    let mut primary = h.accept(PRIMARY).await;
    assert_eq!(primary.recv_query().await, "select 1");
    primary.answer_select("1", b'I').await;
    let reply = client.until_ready().await;
    assert_eq!(tags(&reply), "TDCZ", "no error reaches the client");
    assert!(!healthy(&h, REPLICA));
    assert!(healthy(&h, PRIMARY));

    // The session goes on, on the primary.
    client.query("select 2").await;
    assert_eq!(primary.recv_query().await, "select 2");
    primary.answer_select("2", b'I').await;
    assert_eq!(tags(&client.until_ready().await), "TDCZ");
    assert!(!h.has_pending_connection(REPLICA));
}

#[tokio::test]
async fn a_pipelined_batch_is_sent_again_as_a_whole_after_a_shutdown() {
    let mut h = Harness::new(2);
    let mut client = h.client().await;
    client
        .send(wire::batch(&[
            wire::parse("s1", "select 1"),
            wire::bind("", "s1", &[]),
            wire::execute(""),
            wire::sync(),
        ]))
        .await;
    let mut replica = h.accept(REPLICA).await;
    assert_eq!(tags(&replica.recv_n(4).await), "PBES");
    replica
        .send(wire::error(Severity::Fatal, "57P01", "shutting down"))
        .await;
    drop(replica);

    let mut primary = h.accept(PRIMARY).await;
    let got = primary.recv_n(4).await;
    assert_eq!(tags(&got), "PBES");
    assert_eq!(cstrings(&got[0].1, 2)[1], "select 1");
    primary
        .send(wire::batch(&[
            wire::frame(b'1', &[]),
            wire::frame(b'2', &[]),
            wire::data_row(&["1"]),
            wire::complete("SELECT 1"),
            wire::ready(b'I'),
        ]))
        .await;
    // Every reply once: nothing of the failed attempt reaches the client, and the
    // statement name it recorded is not taken for a duplicate.
    assert_eq!(tags(&client.until_ready().await), "12DCZ");
    assert!(!healthy(&h, REPLICA));
}

#[tokio::test]
async fn no_retry_inside_a_transaction() {
    let mut h = Harness::new(2);
    let mut client = h.client().await;
    let mut primary = h.open_transaction(&mut client).await;

    client.query("select 1").await;
    assert_eq!(primary.recv_query().await, "select 1");
    primary
        .send(wire::error(
            Severity::Fatal,
            "57P01",
            "terminating connection due to administrator command",
        ))
        .await;
    drop(primary);

    // The transaction is gone with its server: the client hears the server's own error,
    // as an ERROR, and its transaction is failed ('E'); its connection stays.
    let got = client.until_ready().await;
    assert_eq!(tags(&got), "EZ");
    assert_eq!(sqlstate(&got[0]), "57P01");
    assert_eq!(severity(&got[0]), "ERROR");
    assert_eq!(got[1].1, b"E");
    // Sent nowhere else.
    assert!(!h.has_pending_connection(PRIMARY));
    assert!(!h.has_pending_connection(REPLICA));
    // pgway answers the ROLLBACK itself; then the client goes on.
    client.query("rollback").await;
    let got = client.until_ready().await;
    assert_eq!(tags(&got), "CZ");
    assert_eq!(text(&got[0].1), "ROLLBACK");
    assert_eq!(got[1].1, b"I");
    assert!(!h.has_pending_connection(PRIMARY));
    h.read_on_replica(&mut client).await;
}

#[tokio::test]
async fn a_read_whose_server_dies_mid_answer_runs_again_unseen() {
    let mut h = Harness::new(2);
    let mut client = h.client().await;
    client.query("select 1").await;
    let mut replica = h.accept(REPLICA).await;
    assert_eq!(replica.recv_query().await, "select 1");
    let mut out = wire::row_description(&["?column?"]);
    out.extend_from_slice(&wire::data_row(&["replica"]));
    replica.send(out).await;
    drop(replica);

    // Half answered, but pgway held the half back: the read runs again on the primary,
    // and the client sees the primary's answer alone.
    let mut primary = h.accept(PRIMARY).await;
    assert_eq!(primary.recv_query().await, "select 1");
    primary.answer_select("primary", b'I').await;
    let got = client.until_ready().await;
    assert_eq!(tags(&got), "TDCZ", "no error reaches the client");
    assert!(text(&got[1].1).contains("primary"));
}

#[tokio::test]
async fn a_server_that_dies_after_part_of_the_answer_reached_the_client_fails_it_with_08006() {
    let mut h = Harness::new(2);
    let mut client = h.client().await;
    client.query("select 1").await;
    let mut replica = h.accept(REPLICA).await;
    assert_eq!(replica.recv_query().await, "select 1");
    // More than pgway holds back: the rows stream on to the client.
    let value = "x".repeat(1024);
    let mut out = wire::row_description(&["?column?"]);
    for _ in 0..40 {
        out.extend_from_slice(&wire::data_row(&[value.as_str()]));
    }
    replica.send(out).await;
    drop(replica);

    // Half answered: the statement fails, the connection stays.
    let got = client.until_ready().await;
    assert_eq!(tags(&got), format!("T{}EZ", "D".repeat(40)));
    assert_eq!(sqlstate(&got[41]), "08006");
    assert_eq!(severity(&got[41]), "ERROR");
    assert_eq!(got[42].1, b"I");
    // Not sent again anywhere.
    assert!(!h.has_pending_connection(PRIMARY));
    assert!(!h.has_pending_connection(REPLICA));
    assert_eq!(h.idle(REPLICA), 0);
    // And on: a new transaction on a new connection.
    h.open_transaction(&mut client).await;
}

#[tokio::test]
async fn a_read_goes_to_the_primary_when_the_replica_refuses_connects() {
    let mut h = Harness::new(2);
    h.unplug(REPLICA);
    let mut client = h.client().await;
    client.query("select 1").await;
    let mut primary = h.accept(PRIMARY).await;
    assert_eq!(primary.recv_query().await, "select 1");
    primary.answer_select("1", b'I').await;
    assert_eq!(tags(&client.until_ready().await), "TDCZ");
    assert!(!healthy(&h, REPLICA));
    assert_eq!(h.idle(PRIMARY), 1);
}

#[tokio::test]
async fn a_read_whose_server_dies_before_answering_goes_elsewhere() {
    let mut h = Harness::new(2);
    let mut client = h.client().await;
    client.query("select 1").await;
    let replica = h.accept(REPLICA).await;
    // Killed: no message, the socket closes.
    drop(replica);
    let mut primary = h.accept(PRIMARY).await;
    assert_eq!(primary.recv_query().await, "select 1");
    primary.answer_select("1", b'I').await;
    assert_eq!(
        tags(&client.until_ready().await),
        "TDCZ",
        "no error reaches the client"
    );
}

#[tokio::test]
async fn a_transaction_whose_server_dies_fails_and_pgway_answers_its_rollback() {
    let mut h = Harness::new(2);
    let mut client = h.client().await;
    let mut primary = h.open_transaction(&mut client).await;
    client.query("insert into t values (1)").await;
    assert_eq!(primary.recv_query().await, "insert into t values (1)");
    drop(primary);

    let got = client.until_ready().await;
    assert_eq!(tags(&got), "EZ");
    assert_eq!(sqlstate(&got[0]), "08006");
    assert_eq!(severity(&got[0]), "ERROR");
    assert_eq!(got[1].1, b"E");
    // Anything but the end of the transaction: 25P02, as PostgreSQL answers.
    client.query("select 1").await;
    let got = client.until_ready().await;
    assert_eq!(tags(&got), "EZ");
    assert_eq!(sqlstate(&got[0]), "25P02");
    assert_eq!(got[1].1, b"E");
    // A ROLLBACK sent with the extended protocol, as drivers do.
    client
        .send(wire::batch(&[
            wire::parse("", "ROLLBACK"),
            wire::bind("", "", &[]),
            wire::execute(""),
            wire::sync(),
        ]))
        .await;
    let got = client.until_ready().await;
    assert_eq!(tags(&got), "12CZ");
    assert_eq!(text(&got[2].1), "ROLLBACK");
    assert_eq!(got[3].1, b"I");
    assert!(!h.has_pending_connection(PRIMARY));
    // And on: a new transaction on a new connection.
    h.open_transaction(&mut client).await;
}

#[tokio::test]
async fn a_commit_whose_server_dies_is_resolution_unknown() {
    let mut h = Harness::new(2);
    let mut client = h.client().await;
    let mut primary = h.open_transaction(&mut client).await;
    client.query("commit").await;
    assert_eq!(primary.recv_query().await, "commit");
    drop(primary);

    let got = client.until_ready().await;
    assert_eq!(tags(&got), "EZ");
    assert_eq!(sqlstate(&got[0]), "08007");
    assert_eq!(
        got[1].1, b"I",
        "the transaction is over, whatever its outcome"
    );
    h.read_on_replica(&mut client).await;
}

#[tokio::test]
async fn a_write_whose_position_query_dies_with_its_server_succeeds() {
    let mut h = Harness::with_read_your_writes("user");
    let mut client = h.client().await;
    client.query("insert into t values (1)").await;
    let mut primary = h.accept(PRIMARY).await;
    assert_eq!(primary.recv_query().await, "insert into t values (1)");
    // The position query: a FunctionCall of pg_current_wal_insert_lsn() (its OID, no
    // argument formats, no arguments, a binary result).
    let got = primary.recv_n(1).await;
    assert_eq!(tags(&got), "F");
    assert_eq!(got[0].1, [0, 0, 0x0b, 0x24, 0, 0, 0, 0, 0, 1]);
    // The write commits and is answered; the server dies under the position query.
    primary.answer("INSERT 0 1", b'I').await;
    drop(primary);

    let got = client.until_ready().await;
    assert_eq!(tags(&got), "CZ", "the write succeeded: no error");
    assert_eq!(got[1].1, b"I");
    // Its position is unknown: the next read looks the primary's up first (no primary
    // answers it here), and goes to the primary rather than to a replica that may not
    // have the write.
    client.query("select 1").await;
    let mut primary = h.accept(PRIMARY).await;
    assert_eq!(primary.recv_query().await, "select 1");
    primary.answer_select("1", b'I').await;
    assert_eq!(tags(&client.until_ready().await), "TDCZ");
    assert!(!h.has_pending_connection(REPLICA));
}
