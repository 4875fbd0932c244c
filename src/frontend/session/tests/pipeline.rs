//! The extended protocol: pipelined batches routed as a whole, errors skipping to Sync,
//! named statements that follow the client across server connections under pgway's own
//! names, and what pgway answers itself (a duplicate name, Close of a statement,
//! DEALLOCATE).

use super::*;

/// Parse, Bind and Execute of one unnamed statement.
fn unnamed(sql: &str) -> [BytesMut; 3] {
    [
        wire::parse("", sql),
        wire::bind("", "", &[]),
        wire::execute(""),
    ]
}

/// The replies to Parse, Bind and Execute of a one-row SELECT.
fn select_replies(value: &str) -> BytesMut {
    wire::batch(&[
        wire::frame(b'1', &[]),
        wire::frame(b'2', &[]),
        wire::data_row(&[value]),
        wire::complete("SELECT 1"),
    ])
}

#[tokio::test]
async fn an_error_in_the_middle_of_a_pipeline_skips_the_rest_up_to_sync() {
    let mut h = Harness::new(2);
    let mut client = h.client().await;
    let mut batch = Vec::new();
    batch.extend(unnamed("insert into t values (1)"));
    batch.extend(unnamed("insert into t values ('not a number')"));
    batch.extend(unnamed("insert into t values (3)"));
    batch.push(wire::sync());
    client.send(wire::batch(&batch)).await;

    let mut primary = h.accept(PRIMARY).await;
    assert_eq!(tags(&primary.recv_n(10).await), "PBEPBEPBES");
    // The first statement runs, the second Parse fails, and the server skips everything
    // after it up to the Sync.
    primary
        .send(wire::batch(&[
            wire::frame(b'1', &[]),
            wire::frame(b'2', &[]),
            wire::complete("INSERT 0 1"),
            wire::error(Severity::Error, "22P02", "invalid input syntax"),
            wire::ready(b'I'),
        ]))
        .await;
    let reply = client.until_ready().await;
    assert_eq!(tags(&reply), "12CEZ");
    assert_eq!(sqlstate(&reply[3]), "22P02");
    assert_eq!(reply[4].1, b"I");
    assert_eq!(h.idle(PRIMARY), 1, "released at the Sync");

    // The next request works, on the same connection.
    let mut batch = unnamed("insert into t values (4)").to_vec();
    batch.push(wire::sync());
    client.send(wire::batch(&batch)).await;
    assert_eq!(tags(&primary.recv_n(4).await), "PBES");
    primary
        .send(wire::batch(&[
            wire::frame(b'1', &[]),
            wire::frame(b'2', &[]),
            wire::complete("INSERT 0 1"),
            wire::ready(b'I'),
        ]))
        .await;
    assert_eq!(tags(&client.until_ready().await), "12CZ");
    assert!(!h.has_pending_connection(PRIMARY));
}

#[tokio::test]
async fn a_batch_of_reads_goes_to_the_replica_and_a_batch_with_one_write_to_the_primary() {
    let mut h = Harness::new(2);
    let mut client = h.client().await;
    let mut batch = Vec::new();
    batch.extend(unnamed("select 1"));
    batch.extend(unnamed("select 2"));
    batch.push(wire::sync());
    client.send(wire::batch(&batch)).await;
    let mut replica = h.accept(REPLICA).await;
    let got = replica.recv_n(7).await;
    assert_eq!(tags(&got), "PBEPBES");
    assert_eq!(cstrings(&got[3].1, 2), ["", "select 2"]);
    let mut out = select_replies("1");
    out.extend_from_slice(&select_replies("2"));
    out.extend_from_slice(&wire::ready(b'I'));
    replica.send(out).await;
    assert_eq!(tags(&client.until_ready().await), "12DC12DCZ");
    assert!(!h.has_pending_connection(PRIMARY));

    // One write among the reads: the whole batch goes to the primary.
    let mut batch = Vec::new();
    batch.extend(unnamed("select 1"));
    batch.extend(unnamed("update t set v = 1"));
    batch.push(wire::sync());
    client.send(wire::batch(&batch)).await;
    let mut primary = h.accept(PRIMARY).await;
    let got = primary.recv_n(7).await;
    assert_eq!(tags(&got), "PBEPBES");
    assert_eq!(cstrings(&got[0].1, 2), ["", "select 1"]);
    assert_eq!(cstrings(&got[3].1, 2), ["", "update t set v = 1"]);
    let mut out = select_replies("1");
    out.extend_from_slice(&wire::batch(&[
        wire::frame(b'1', &[]),
        wire::frame(b'2', &[]),
        wire::complete("UPDATE 1"),
        wire::ready(b'I'),
    ]));
    primary.send(out).await;
    assert_eq!(tags(&client.until_ready().await), "12DC12CZ");
    // The replica connection was parked after the first batch and not used since.
    assert_eq!(h.idle(REPLICA), 1);
    assert_eq!(h.idle(PRIMARY), 1);
}

#[tokio::test]
async fn an_unnamed_statement_parsed_again_runs_where_its_text_and_the_session_say() {
    let mut h = Harness::new(2);
    let mut client = h.client().await;
    // The same read twice (as drivers without a statement cache send it): the replica,
    // Parse and all, both times.
    let mut replica = None;
    for value in ["1", "2"] {
        let mut batch = unnamed("select 1").to_vec();
        batch.push(wire::sync());
        client.send(wire::batch(&batch)).await;
        if replica.is_none() {
            replica = Some(h.accept(REPLICA).await);
        }
        let server = replica.as_mut().expect("replica");
        let got = server.recv_n(4).await;
        assert_eq!(tags(&got), "PBES");
        assert_eq!(cstrings(&got[0].1, 2), ["", "select 1"]);
        let mut out = select_replies(value);
        out.extend_from_slice(&wire::ready(b'I'));
        server.send(out).await;
        assert_eq!(tags(&client.until_ready().await), "12DCZ");
    }
    // Other text in its place: a write. A Bind alone then executes the write, on the
    // primary.
    let mut batch = unnamed("update t set v = 1").to_vec();
    batch.push(wire::sync());
    client.send(wire::batch(&batch)).await;
    let mut primary = h.accept(PRIMARY).await;
    assert_eq!(tags(&primary.recv_n(4).await), "PBES");
    primary
        .send(wire::batch(&[
            wire::frame(b'1', &[]),
            wire::frame(b'2', &[]),
            wire::complete("UPDATE 1"),
            wire::ready(b'I'),
        ]))
        .await;
    assert_eq!(tags(&client.until_ready().await), "12CZ");
    client
        .send(wire::batch(&[
            wire::bind("", "", &[]),
            wire::execute(""),
            wire::sync(),
        ]))
        .await;
    assert_eq!(
        tags(&primary.recv_n(3).await),
        "BES",
        "the primary has it already"
    );
    primary
        .send(wire::batch(&[
            wire::frame(b'2', &[]),
            wire::complete("UPDATE 1"),
            wire::ready(b'I'),
        ]))
        .await;
    assert_eq!(tags(&client.until_ready().await), "2CZ");
    // The read again: back to the replica.
    let mut batch = unnamed("select 1").to_vec();
    batch.push(wire::sync());
    client.send(wire::batch(&batch)).await;
    let server = replica.as_mut().expect("replica");
    assert_eq!(tags(&server.recv_n(4).await), "PBES");
    let mut out = select_replies("3");
    out.extend_from_slice(&wire::ready(b'I'));
    server.send(out).await;
    assert_eq!(tags(&client.until_ready().await), "12DCZ");

    // The same text after `SET pgway.target = 'primary'`: the primary, as the setting
    // says (the route kept with the statement was decided without it).
    client.query("SET pgway.target = 'primary'").await;
    assert_eq!(primary.recv_query().await, "SET pgway.target = 'primary'");
    primary.answer("SET", b'I').await;
    assert_eq!(tags(&client.until_ready().await), "CZ");
    let mut batch = unnamed("select 1").to_vec();
    batch.push(wire::sync());
    client.send(wire::batch(&batch)).await;
    let got = primary.recv_n(4).await;
    assert_eq!(tags(&got), "PBES");
    assert_eq!(cstrings(&got[0].1, 2), ["", "select 1"]);
    let mut out = select_replies("4");
    out.extend_from_slice(&wire::ready(b'I'));
    primary.send(out).await;
    assert_eq!(tags(&client.until_ready().await), "12DCZ");
    assert!(!h.has_pending_connection(PRIMARY));
}

#[tokio::test]
async fn a_named_statement_is_prepared_again_on_a_new_connection() {
    let mut h = Harness::new(2);
    let mut client = h.client().await;
    client
        .send(wire::batch(&[wire::parse("s1", "select 1"), wire::sync()]))
        .await;
    let mut replica = h.accept(REPLICA).await;
    let got = replica.recv_n(2).await;
    assert_eq!(tags(&got), "PS");
    let [server_name, sql] = <[String; 2]>::try_from(cstrings(&got[0].1, 2)).unwrap();
    assert!(server_name.starts_with("pgway_"), "{server_name}");
    assert_eq!(sql, "select 1");
    replica
        .send(wire::batch(&[wire::frame(b'1', &[]), wire::ready(b'I')]))
        .await;
    assert_eq!(tags(&client.until_ready().await), "1Z");
    assert_eq!(h.idle(REPLICA), 1);

    // The connection goes away while parked.
    drop(replica);
    client
        .send(wire::batch(&[
            wire::bind("", "s1", &[]),
            wire::execute(""),
            wire::sync(),
        ]))
        .await;
    let mut replica = h.accept(REPLICA).await;
    let got = replica.recv_n(4).await;
    // pgway prepares the statement on the new connection first, under the same name.
    assert_eq!(tags(&got), "PBES");
    assert_eq!(cstrings(&got[0].1, 2), [server_name.clone(), sql]);
    assert_eq!(cstrings(&got[1].1, 2), [String::new(), server_name]);
    let mut out = select_replies("1");
    out.extend_from_slice(&wire::ready(b'I'));
    replica.send(out).await;
    // The client sees no ParseComplete for a Parse it did not send.
    assert_eq!(tags(&client.until_ready().await), "2DCZ");
}

#[tokio::test]
async fn a_duplicate_statement_name_is_refused_by_pgway_and_the_rest_skipped_to_sync() {
    let mut h = Harness::new(2);
    let mut client = h.client().await;
    client
        .send(wire::batch(&[wire::parse("s1", "select 1"), wire::sync()]))
        .await;
    let mut replica = h.accept(REPLICA).await;
    let got = replica.recv_n(2).await;
    let server_name = cstrings(&got[0].1, 1).remove(0);
    replica
        .send(wire::batch(&[wire::frame(b'1', &[]), wire::ready(b'I')]))
        .await;
    assert_eq!(tags(&client.until_ready().await), "1Z");

    client
        .send(wire::batch(&[
            wire::parse("s1", "select 2"),
            wire::bind("", "s1", &[]),
            wire::execute(""),
            wire::sync(),
        ]))
        .await;
    // The server sees the Sync alone.
    assert_eq!(replica.recv().await.0, b'S');
    replica.send(wire::ready(b'I')).await;
    let reply = client.until_ready().await;
    assert_eq!(tags(&reply), "EZ");
    assert_eq!(sqlstate(&reply[0]), "42P05");
    assert_eq!(severity(&reply[0]), "ERROR");

    // s1 is still the first statement.
    client
        .send(wire::batch(&[
            wire::bind("", "s1", &[]),
            wire::execute(""),
            wire::sync(),
        ]))
        .await;
    let got = replica.recv_n(3).await;
    assert_eq!(tags(&got), "BES");
    assert_eq!(cstrings(&got[0].1, 2), [String::new(), server_name]);
    replica
        .send(wire::batch(&[
            wire::frame(b'2', &[]),
            wire::data_row(&["1"]),
            wire::complete("SELECT 1"),
            wire::ready(b'I'),
        ]))
        .await;
    assert_eq!(tags(&client.until_ready().await), "2DCZ");
    assert!(!h.has_pending_connection(REPLICA));
}

#[tokio::test]
async fn a_named_parse_the_server_rejects_leaves_the_name_free() {
    let mut h = Harness::new(2);
    let mut client = h.client().await;
    client
        .send(wire::batch(&[wire::parse("s1", "selec 1"), wire::sync()]))
        .await;
    let mut primary = h.accept(PRIMARY).await;
    assert_eq!(tags(&primary.recv_n(2).await), "PS");
    primary
        .send(wire::batch(&[
            wire::error(
                Severity::Error,
                "42601",
                "syntax error at or near \"selec\"",
            ),
            wire::ready(b'I'),
        ]))
        .await;
    let reply = client.until_ready().await;
    assert_eq!(tags(&reply), "EZ");
    assert_eq!(sqlstate(&reply[0]), "42601");

    // As in PostgreSQL, the failed Parse created no statement: the name can be used.
    client
        .send(wire::batch(&[wire::parse("s1", "select 1"), wire::sync()]))
        .await;
    let mut replica = h.accept(REPLICA).await;
    let first = replica.recv().await;
    assert_eq!(
        first.0 as char, 'P',
        "the server got no Parse: pgway refused it itself"
    );
    assert_eq!(replica.recv().await.0, b'S');
    replica
        .send(wire::batch(&[wire::frame(b'1', &[]), wire::ready(b'I')]))
        .await;
    assert_eq!(tags(&client.until_ready().await), "1Z");
}

#[tokio::test]
async fn a_named_parse_the_server_skipped_after_an_error_leaves_the_name_free() {
    let mut h = Harness::new(2);
    let mut client = h.client().await;
    // The unnamed Parse fails; PostgreSQL skips the named one after it, up to Sync.
    client
        .send(wire::batch(&[
            wire::parse("", "selec 1"),
            wire::parse("s2", "select 2"),
            wire::sync(),
        ]))
        .await;
    let mut primary = h.accept(PRIMARY).await;
    assert_eq!(tags(&primary.recv_n(3).await), "PPS");
    primary
        .send(wire::batch(&[
            wire::error(
                Severity::Error,
                "42601",
                "syntax error at or near \"selec\"",
            ),
            wire::ready(b'I'),
        ]))
        .await;
    let reply = client.until_ready().await;
    assert_eq!(tags(&reply), "EZ", "no ParseComplete for the skipped Parse");

    // s2 was never created: preparing it now reaches the server, with no 42P05 from pgway.
    client
        .send(wire::batch(&[wire::parse("s2", "select 2"), wire::sync()]))
        .await;
    let mut replica = h.accept(REPLICA).await;
    assert_eq!(tags(&replica.recv_n(2).await), "PS");
    replica
        .send(wire::batch(&[wire::frame(b'1', &[]), wire::ready(b'I')]))
        .await;
    assert_eq!(tags(&client.until_ready().await), "1Z");
}

#[tokio::test]
async fn closing_a_named_statement_is_answered_by_pgway() {
    let mut h = Harness::new(2);
    let mut client = h.client().await;
    client
        .send(wire::batch(&[wire::parse("s1", "select 1"), wire::sync()]))
        .await;
    let mut replica = h.accept(REPLICA).await;
    assert_eq!(tags(&replica.recv_n(2).await), "PS");
    replica
        .send(wire::batch(&[wire::frame(b'1', &[]), wire::ready(b'I')]))
        .await;
    assert_eq!(tags(&client.until_ready().await), "1Z");

    client
        .send(wire::batch(&[wire::close(b'S', "s1"), wire::sync()]))
        .await;
    // No Close reaches the server: only the Sync.
    assert_eq!(replica.recv().await.0, b'S');
    replica.send(wire::ready(b'I')).await;
    assert_eq!(tags(&client.until_ready().await), "3Z");

    // The client's name is free again; the statement stayed prepared on the server, so
    // preparing it again is answered by pgway too.
    client
        .send(wire::batch(&[wire::parse("s1", "select 1"), wire::sync()]))
        .await;
    assert_eq!(replica.recv().await.0, b'S');
    replica.send(wire::ready(b'I')).await;
    assert_eq!(tags(&client.until_ready().await), "1Z");
    assert!(!h.has_pending_connection(REPLICA));
}

#[tokio::test]
async fn a_bind_after_a_close_in_the_same_batch_names_a_statement_that_is_gone() {
    let mut h = Harness::new(2);
    let mut client = h.client().await;
    client
        .send(wire::batch(&[wire::parse("s1", "select 1"), wire::sync()]))
        .await;
    let mut replica = h.accept(REPLICA).await;
    let got = replica.recv_n(2).await;
    let server_name = cstrings(&got[0].1, 1).remove(0);
    replica
        .send(wire::batch(&[wire::frame(b'1', &[]), wire::ready(b'I')]))
        .await;
    assert_eq!(tags(&client.until_ready().await), "1Z");

    // Bind s1, Close s1, Bind s1: the first runs pgway's statement; the second names
    // one the client no longer has, and goes to the server under the client's name, for
    // PostgreSQL's own error (routing looked both up before the Close was read).
    client
        .send(wire::batch(&[
            wire::bind("", "s1", &[]),
            wire::execute(""),
            wire::close(b'S', "s1"),
            wire::bind("", "s1", &[]),
            wire::execute(""),
            wire::sync(),
        ]))
        .await;
    let got = replica.recv_n(5).await;
    assert_eq!(tags(&got), "BEBES");
    assert_eq!(cstrings(&got[0].1, 2), [String::new(), server_name]);
    assert_eq!(cstrings(&got[2].1, 2), ["", "s1"]);
    replica
        .send(wire::batch(&[
            wire::frame(b'2', &[]),
            wire::data_row(&["1"]),
            wire::complete("SELECT 1"),
            wire::error(
                Severity::Error,
                "26000",
                "prepared statement \"s1\" does not exist",
            ),
            wire::ready(b'I'),
        ]))
        .await;
    let replies = client.until_ready().await;
    assert_eq!(tags(&replies), "2DC3EZ");
    assert_eq!(sqlstate(&replies[4]), "26000");
}

#[tokio::test]
async fn a_flush_separated_pipeline_keeps_its_connection_until_sync() {
    let mut h = Harness::new(2);
    let mut client = h.client().await;
    client
        .send(wire::batch(&[
            wire::parse("", "select 1"),
            wire::describe(b'S', ""),
            wire::flush(),
        ]))
        .await;
    let mut replica = h.accept(REPLICA).await;
    assert_eq!(tags(&replica.recv_n(3).await), "PDH");
    replica
        .send(wire::batch(&[
            wire::frame(b'1', &[]),
            wire::frame(b't', &0i16.to_be_bytes()),
            wire::row_description(&["?column?"]),
        ]))
        .await;
    let mut reply = Vec::new();
    for _ in 0..3 {
        reply.push(client.recv().await);
    }
    assert_eq!(tags(&reply), "1tT");
    // No Sync yet: the connection stays with the client.
    assert_eq!(h.idle(REPLICA), 0);
    let target = h.shared.cancels.target(client.pid, client.secret);
    assert_eq!(target.map(|t| t.pid), Some(replica.pid));

    client
        .send(wire::batch(&[
            wire::bind("", "", &[]),
            wire::execute(""),
            wire::sync(),
        ]))
        .await;
    // Same connection, the unnamed statement not sent again.
    assert_eq!(tags(&replica.recv_n(3).await), "BES");
    replica
        .send(wire::batch(&[
            wire::frame(b'2', &[]),
            wire::data_row(&["1"]),
            wire::complete("SELECT 1"),
            wire::ready(b'I'),
        ]))
        .await;
    assert_eq!(tags(&client.until_ready().await), "2DCZ");
    assert_eq!(h.idle(REPLICA), 1, "released at the Sync");
    assert!(!h.has_pending_connection(REPLICA));
    assert!(!h.has_pending_connection(PRIMARY));
}

#[tokio::test]
async fn deallocate_of_a_protocol_statement_is_answered_locally() {
    let mut h = Harness::new(2);
    let mut client = h.client().await;
    client
        .send(wire::batch(&[wire::parse("s1", "select 1"), wire::sync()]))
        .await;
    let mut replica = h.accept(REPLICA).await;
    assert_eq!(tags(&replica.recv_n(2).await), "PS");
    replica
        .send(wire::batch(&[wire::frame(b'1', &[]), wire::ready(b'I')]))
        .await;
    assert_eq!(tags(&client.until_ready().await), "1Z");

    client.query("DEALLOCATE s1").await;
    let reply = client.until_ready().await;
    assert_eq!(tags(&reply), "CZ");
    assert_eq!(text(&reply[0].1), "DEALLOCATE");
    client.query("DEALLOCATE ALL").await;
    let reply = client.until_ready().await;
    assert_eq!(tags(&reply), "CZ");
    assert_eq!(text(&reply[0].1), "DEALLOCATE ALL");
    assert!(!h.has_pending_connection(PRIMARY));

    // The name is free: a new s1 is prepared, and the Parse is the first thing the server
    // sees since the first batch.
    client
        .send(wire::batch(&[wire::parse("s1", "select 2"), wire::sync()]))
        .await;
    let got = replica.recv_n(2).await;
    assert_eq!(tags(&got), "PS");
    assert_eq!(cstrings(&got[0].1, 2)[1], "select 2");
    replica
        .send(wire::batch(&[wire::frame(b'1', &[]), wire::ready(b'I')]))
        .await;
    assert_eq!(tags(&client.until_ready().await), "1Z");
}

/// After a server error in a batch not yet synced, PostgreSQL discards every message up
/// to Sync, a Query too, and answers none: pgway does not send the Query (whose answer
/// would never come), and the client's Sync gets its ReadyForQuery. Found by
/// `fuzz_session`: the session waited for the Query's answer for ever.
#[tokio::test]
async fn a_query_after_an_unsynced_error_is_skipped_as_postgres_does() {
    let mut h = Harness::new(2);
    let mut client = h.client().await;
    client
        .send(wire::batch(&[
            wire::parse("", "insert into t values (1)"),
            wire::bind("", "", &[]),
            wire::execute(""),
            wire::flush(),
        ]))
        .await;
    let mut primary = h.accept(PRIMARY).await;
    assert_eq!(tags(&primary.recv_n(4).await), "PBEH");
    let mut out = wire::frame(b'1', &[]);
    out.extend_from_slice(&wire::frame(b'2', &[]));
    out.extend_from_slice(&wire::error(
        Severity::Error,
        "23505",
        "duplicate key value",
    ));
    primary.send(out).await;
    assert_eq!(tags(&[client.recv().await, client.recv().await]), "12");
    assert_eq!(sqlstate(&client.recv().await), "23505");
    client
        .send(wire::batch(&[
            wire::query("select 1"),
            wire::parse("", "select 2"),
            wire::flush(),
            wire::sync(),
        ]))
        .await;
    assert_eq!(
        primary.recv().await.0,
        b'S',
        "only the Sync reaches the server"
    );
    primary.send(wire::ready(b'I')).await;
    assert_eq!(tags(&client.until_ready().await), "Z");
    h.read_on_replica(&mut client).await;
}
