//! COPY FROM STDIN: the client's data passes straight to the server; a rejected COPY, a
//! CopyFail and a server error mid-COPY leave the session usable and the connection back
//! in its pool; anything but COPY messages during COPY ends the session.

use super::*;

/// A client whose `COPY t FROM STDIN` the primary accepted: the client has seen
/// CopyInResponse.
async fn copying(h: &mut Harness) -> (TestClient, FakeServer) {
    let mut client = h.client().await;
    client.query("COPY t FROM STDIN").await;
    let mut primary = h.accept(PRIMARY).await;
    assert_eq!(primary.recv_query().await, "COPY t FROM STDIN");
    primary.send(wire::copy_in_response()).await;
    assert_eq!(client.recv().await.0, b'G');
    (client, primary)
}

#[tokio::test]
async fn copy_data_the_server_rejects() {
    let mut h = Harness::new(2);
    let (mut client, mut primary) = copying(&mut h).await;
    client
        .send(wire::batch(&[
            wire::copy_data("1\n"),
            wire::copy_data("x\n"),
            wire::frame(b'c', &[]),
        ]))
        .await;
    let got = primary.recv_n(3).await;
    assert_eq!(tags(&got), "ddc");
    assert_eq!(got[1].1, b"x\n");
    let mut out = wire::error(
        Severity::Error,
        "22P02",
        "invalid input syntax for type integer",
    );
    out.extend_from_slice(&wire::ready(b'I'));
    primary.send(out).await;
    let reply = client.until_ready().await;
    assert_eq!(tags(&reply), "EZ");
    assert_eq!(sqlstate(&reply[0]), "22P02");
    assert_eq!(h.idle(PRIMARY), 1, "released");
    h.read_on_replica(&mut client).await;
}

#[tokio::test]
async fn copy_fail_reaches_the_server_and_the_session_goes_on() {
    let mut h = Harness::new(2);
    let (mut client, mut primary) = copying(&mut h).await;
    client
        .send(wire::batch(&[
            wire::copy_data("1\n"),
            wire::frame(b'f', b"client gave up\0"),
        ]))
        .await;
    let got = primary.recv_n(2).await;
    assert_eq!(tags(&got), "df");
    let mut out = wire::error(
        Severity::Error,
        "57014",
        "COPY from stdin failed: client gave up",
    );
    out.extend_from_slice(&wire::ready(b'I'));
    primary.send(out).await;
    let reply = client.until_ready().await;
    assert_eq!(tags(&reply), "EZ");
    assert_eq!(sqlstate(&reply[0]), "57014");
    assert_eq!(h.idle(PRIMARY), 1, "released");
    h.read_on_replica(&mut client).await;
}

#[tokio::test]
async fn a_server_error_mid_copy_while_the_client_still_sends() {
    let mut h = Harness::new(2);
    let (mut client, mut primary) = copying(&mut h).await;
    client.send(wire::copy_data("1\n")).await;
    assert_eq!(primary.recv().await.0, b'd');
    let mut out = wire::error(Severity::Error, "23505", "duplicate key value");
    out.extend_from_slice(&wire::ready(b'I'));
    primary.send(out).await;
    // The client has not read the error yet and keeps sending.
    client.send(wire::copy_data("2\n")).await;
    let reply = client.until_ready().await;
    assert_eq!(tags(&reply), "EZ");
    assert_eq!(sqlstate(&reply[0]), "23505");
    // COPY messages after the error are ignored, as PostgreSQL does.
    client
        .send(wire::batch(&[
            wire::copy_data("late\n"),
            wire::frame(b'c', &[]),
        ]))
        .await;

    // The session goes on, on the same primary connection.
    client.query("insert into t values (3)").await;
    let mut seen = Vec::new();
    let sql = loop {
        let msg = primary.recv().await;
        if msg.0 == b'Q' {
            break text(&msg.1);
        }
        seen.push(msg);
    };
    assert_eq!(sql, "insert into t values (3)");
    // At most the CopyData sent before the client saw the error reached the server
    // (PostgreSQL ignores it), never what came after.
    assert!(
        seen.iter()
            .all(|(tag, body)| *tag == b'd' && body == b"2\n"),
        "{:?}",
        tags(&seen)
    );
    primary.answer("INSERT 0 1", b'I').await;
    assert_eq!(tags(&client.until_ready().await), "CZ");
    assert!(!h.has_pending_connection(PRIMARY));
}

#[tokio::test]
async fn an_unexpected_message_during_copy_ends_the_session() {
    let mut h = Harness::new(2);
    let (mut client, mut primary) = copying(&mut h).await;
    client.query("select 1").await;
    let got = client.until_closed().await;
    assert_eq!(tags(&got), "E");
    assert_eq!(sqlstate(&got[0]), "08P01");
    assert_eq!(severity(&got[0]), "FATAL");
    // The connection was mid-COPY: closed, so the server aborts the COPY.
    assert_eq!(tags(&primary.until_closed().await), "");
    assert_eq!(h.idle(PRIMARY), 0);
}

/// A client whose `COPY t FROM STDIN` went as Parse/Bind/Execute/Sync (as tokio-postgres
/// and libpq send it) and that has seen CopyInResponse.
async fn copying_extended(h: &mut Harness) -> (TestClient, FakeServer) {
    let mut client = h.client().await;
    client
        .send(wire::batch(&[
            wire::parse("", "COPY t FROM STDIN"),
            wire::bind("", "", &[]),
            wire::execute(""),
            wire::sync(),
        ]))
        .await;
    let mut primary = h.accept(PRIMARY).await;
    assert_eq!(tags(&primary.recv_n(4).await), "PBES");
    primary
        .send(wire::batch(&[
            wire::frame(b'1', &[]),
            wire::frame(b'2', &[]),
            wire::copy_in_response(),
        ]))
        .await;
    for tag in "12G".bytes() {
        assert_eq!(client.recv().await.0, tag);
    }
    (client, primary)
}

#[tokio::test]
async fn an_extended_copy_ends_with_the_clients_sync_after_copy_done() {
    let mut h = Harness::new(2);
    let (mut client, mut primary) = copying_extended(&mut h).await;
    // The Sync sent with Execute was ignored by the server during the copy; the one after
    // CopyDone gets the ReadyForQuery.
    client
        .send(wire::batch(&[
            wire::copy_data("1\n"),
            wire::frame(b'c', &[]),
            wire::sync(),
        ]))
        .await;
    assert_eq!(tags(&primary.recv_n(3).await), "dcS");
    primary
        .send(wire::batch(&[wire::complete("COPY 1"), wire::ready(b'I')]))
        .await;
    assert_eq!(tags(&client.until_ready().await), "CZ");
    assert_eq!(h.idle(PRIMARY), 1, "released");
    h.read_on_replica(&mut client).await;
}

#[tokio::test]
async fn an_extended_copy_the_server_rejects_waits_for_the_clients_sync() {
    let mut h = Harness::new(2);
    let (mut client, mut primary) = copying_extended(&mut h).await;
    client.send(wire::copy_data("x\n")).await;
    assert_eq!(primary.recv().await.0, b'd');
    primary
        .send(wire::error(
            Severity::Error,
            "22P02",
            "invalid input syntax for type integer",
        ))
        .await;
    assert_eq!(sqlstate(&client.recv().await), "22P02");
    // The client finishes its side; the server discards it up to the Sync.
    client
        .send(wire::batch(&[
            wire::copy_data("2\n"),
            wire::frame(b'c', &[]),
            wire::sync(),
        ]))
        .await;
    assert_eq!(tags(&primary.recv_n(3).await), "dcS");
    primary.send(wire::ready(b'I')).await;
    assert_eq!(tags(&client.until_ready().await), "Z");
    h.read_on_replica(&mut client).await;
}
