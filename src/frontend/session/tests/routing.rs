//! Where statements go: reads outside a transaction to the replica, everything else to the
//! primary, and `pgway.target` for the rest of the session.

use super::*;

#[tokio::test]
async fn a_read_goes_to_the_replica_and_its_connection_is_released() {
    let mut h = Harness::new(2);
    let mut client = h.client().await;
    client.query("select 1").await;
    let mut replica = h.accept(REPLICA).await;
    assert_eq!(replica.recv_query().await, "select 1");
    replica.answer_select("1", b'I').await;
    let reply = client.until_ready().await;
    assert_eq!(tags(&reply), "TDCZ");
    assert_eq!(reply[1].1, wire::data_row(&["1"])[5..].to_vec());
    // Released: parked in the replica's pool, and a cancel now has nowhere to go.
    assert_eq!(h.idle(REPLICA), 1);
    assert_eq!(h.shared.cancels.target(client.pid, client.secret), None);
    // The next read takes the same connection: no new one is opened.
    client.query("select 2").await;
    assert_eq!(replica.recv_query().await, "select 2");
    replica.answer_select("2", b'I').await;
    assert_eq!(tags(&client.until_ready().await), "TDCZ");
    assert!(!h.has_pending_connection(REPLICA));
}

#[tokio::test]
async fn a_write_and_a_transaction_go_to_the_primary_on_one_connection() {
    let mut h = Harness::new(2);
    let mut client = h.client().await;
    client.query("insert into t values (1)").await;
    let mut primary = h.accept(PRIMARY).await;
    assert_eq!(primary.recv_query().await, "insert into t values (1)");
    primary.answer("INSERT 0 1", b'I').await;
    assert_eq!(tags(&client.until_ready().await), "CZ");

    client.begin_held().await;
    // A read inside the transaction goes to the primary connection, after the held begin.
    client.query("select 1").await;
    primary.first_in_transaction(&mut client, "select 1").await;
    assert_eq!(h.idle(PRIMARY), 0, "held for the transaction");
    client.query("commit").await;
    assert_eq!(primary.recv_query().await, "commit");
    primary.answer("COMMIT", b'I').await;
    client.until_ready().await;
    assert_eq!(h.idle(PRIMARY), 1, "released at the end of the transaction");
    assert!(!h.has_pending_connection(REPLICA));
}

#[tokio::test]
async fn pgway_target_primary_sends_reads_to_the_primary_until_reset() {
    let mut h = Harness::new(2);
    let mut client = h.client().await;
    client.query("SET pgway.target = 'primary'").await;
    let mut primary = h.accept(PRIMARY).await;
    assert_eq!(primary.recv_query().await, "SET pgway.target = 'primary'");
    primary.answer("SET", b'I').await;
    assert_eq!(tags(&client.until_ready().await), "CZ");

    client.query("select 1").await;
    assert_eq!(primary.recv_query().await, "select 1");
    primary.answer_select("1", b'I').await;
    client.until_ready().await;
    assert!(!h.has_pending_connection(REPLICA));

    client.query("RESET pgway.target").await;
    assert_eq!(primary.recv_query().await, "RESET pgway.target");
    primary.answer("RESET", b'I').await;
    client.until_ready().await;
    client.query("select 2").await;
    let mut replica = h.accept(REPLICA).await;
    assert_eq!(replica.recv_query().await, "select 2");
    // The replica connection was brought in line with the client's settings first.
    assert!(
        replica.syncs.iter().any(|s| s.contains("pgway.target")),
        "{:?}",
        replica.syncs
    );
    replica.answer_select("2", b'I').await;
    client.until_ready().await;
}

#[tokio::test]
async fn pgway_target_replica_sends_function_reads_to_the_replica_but_never_writes() {
    let mut h = Harness::new(2);
    let mut client = h
        .client_with(&[("options", "-c pgway.target=replica")])
        .await;
    // A function pgway knows nothing about: normally the primary (its volatility is looked
    // up first); with pgway.target = replica, the replica.
    client.query("select my_function(1)").await;
    let mut replica = h.accept(REPLICA).await;
    assert_eq!(replica.recv_query().await, "select my_function(1)");
    replica.answer_select("1", b'I').await;
    client.until_ready().await;

    client.query("update t set v = 1").await;
    let mut primary = h.accept(PRIMARY).await;
    assert_eq!(primary.recv_query().await, "update t set v = 1");
    primary.answer("UPDATE 1", b'I').await;
    client.until_ready().await;

    client.begin_held().await;
    client.query("rollback").await;
    primary.begin_received().await;
    assert_eq!(primary.recv_query().await, "rollback");
    primary.answer("ROLLBACK", b'I').await;
    client.until_ready().await;
}

#[tokio::test]
async fn an_invalid_pgway_target_is_refused_without_reaching_a_server() {
    let mut h = Harness::new(2);
    let mut client = h.client().await;
    client.query("SET pgway.target = 'elsewhere'").await;
    let reply = client.until_ready().await;
    assert_eq!(tags(&reply), "EZ");
    assert_eq!(sqlstate(&reply[0]), "22023");
    assert!(!h.has_pending_connection(PRIMARY));
    // In the extended protocol too: the Parse is refused, the rest skipped up to the Sync,
    // which is all the server sees.
    client
        .send(wire::batch(&[
            wire::parse("", "SET pgway.target = 'elsewhere'"),
            wire::bind("", "", &[]),
            wire::execute(""),
            wire::sync(),
        ]))
        .await;
    let mut primary = h.accept(PRIMARY).await;
    assert_eq!(primary.recv().await.0, b'S');
    primary.send(wire::ready(b'I')).await;
    let reply = client.until_ready().await;
    assert_eq!(tags(&reply), "EZ");
    assert_eq!(sqlstate(&reply[0]), "22023");
    // The session goes on.
    client.query("select 1").await;
    let mut replica = h.accept(REPLICA).await;
    replica.recv_query().await;
    replica.answer_select("1", b'I').await;
    assert_eq!(tags(&client.until_ready().await), "TDCZ");
}
