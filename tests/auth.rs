//! Client authentication: SCRAM-SHA-256 (the default) and md5; wrong passwords and unknown
//! users get FATAL 28P01.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test step that cannot go on fails the test, with its message"
)]

mod common;

use common::*;
use tokio_postgres::error::SqlState;

/// Asserts that logging in as `user` with `password` fails with FATAL 28P01.
async fn assert_rejected(port: u16, user: &str, password: &str) {
    let err = match try_connect(port, user, password).await {
        Ok(_) => panic!("login as {user:?} with password {password:?} must fail"),
        Err(e) => e,
    };
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_PASSWORD),
        "login as {user:?}: expected SQLSTATE 28P01, got {}",
        describe_error(&err)
    );
    assert_eq!(
        err.as_db_error().map(|d| d.severity()),
        Some("FATAL"),
        "login as {user:?}: {}",
        describe_error(&err)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_logs_in_with_scram_sha_256() {
    let cluster = Cluster::start(0);
    let gw = Gateway::start(&cluster);

    // pgway asks for SASL with SCRAM-SHA-256 (AuthenticationSASL, code 10).
    let mut raw = RawConn::connect(gw.port()).await;
    raw.send_startup(APP_USER, DB).await;
    let m = raw.recv_message().await;
    assert_eq!(
        (m.tag as char, m.auth_code()),
        ('R', 10),
        "expected AuthenticationSASL"
    );
    assert!(
        String::from_utf8_lossy(&m.body[4..]).contains("SCRAM-SHA-256"),
        "mechanisms: {:?}",
        String::from_utf8_lossy(&m.body[4..])
    );

    let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    let who = simple_value(&client, "select current_user || '@' || current_database()")
        .await
        .expect("select current_user");
    assert_eq!(who, "app@appdb");

    // The raw client completes the SCRAM exchange too (and checks the server signature).
    let mut raw = RawConn::login(gw.port(), APP_USER, APP_PASSWORD).await;
    raw.send_message(b'Q', b"select 1\0").await;
    assert_eq!(raw.recv_message().await.tag, b'T');
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5user_logs_in_with_md5() {
    let cluster = Cluster::start(0);
    let gw = Gateway::start(&cluster);

    let mut raw = RawConn::connect(gw.port()).await;
    raw.send_startup(MD5_USER, DB).await;
    let m = raw.recv_message().await;
    assert_eq!(
        (m.tag as char, m.auth_code()),
        ('R', 5),
        "expected AuthenticationMD5Password"
    );

    let client = connect(gw.port(), MD5_USER, MD5_PASSWORD).await;
    let who = simple_value(&client, "select current_user")
        .await
        .expect("select current_user");
    assert_eq!(who, "md5user");
    // md5user's queries run as md5user on the server (it may create in public).
    client
        .batch_execute("create table md5_owned (id int); insert into md5_owned values (1)")
        .await
        .unwrap_or_else(|e| panic!("md5user DDL: {}", describe_error(&e)));
    assert_eq!(
        cluster.psql_admin(
            cluster.primary_port(),
            "select tableowner from pg_tables where tablename = 'md5_owned'"
        ),
        "md5user"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_passwords_and_unknown_users_get_28p01() {
    let cluster = Cluster::start(0);
    let gw = Gateway::start(&cluster);
    let port = gw.port();

    assert_rejected(port, APP_USER, "wrong-secret").await;
    assert_rejected(port, APP_USER, "").await;
    assert_rejected(port, MD5_USER, "wrong-secret").await;
    assert_rejected(port, MD5_USER, APP_PASSWORD).await;
    assert_rejected(port, "nobody", "whatever").await;
    // PostgreSQL trusts `postgres` on loopback, but pgway does not know that user.
    assert_rejected(port, "postgres", "").await;
    assert_rejected(port, "postgres", "postgres").await;

    // The gateway keeps serving good logins.
    let client = connect(port, APP_USER, APP_PASSWORD).await;
    assert_eq!(served_by(&client).await, cluster.primary_port());
    let client = connect(port, MD5_USER, MD5_PASSWORD).await;
    assert_eq!(served_by(&client).await, cluster.primary_port());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_known_only_through_auth_query_logs_in_and_is_routed() {
    let cluster = Cluster::start_with_schema(1, AUTH_QUERY_SCHEMA);
    let gw = Gateway::start_with(
        &cluster,
        GatewayOptions {
            extra: "[auth_query]\n\
                    user = \"pgway_auth\"\n\
                    password = \"auth-secret\"\n\
                    query = \"SELECT username, password FROM pgway_auth.get_auth($1)\"\n\
                    database = \"appdb\"\n\
                    \n\
                    # The read after dyn's write asserts the replica, which may take\n\
                    # longer than the default 20 ms to replay it on a loaded machine.\n\
                    [routing]\n\
                    read_your_writes_wait = \"30s\"\n"
                .into(),
            ..GatewayOptions::default()
        },
    );
    gw.wait_for_replica_reads(&cluster).await;

    // `dyn` is in no [[users]] entry: pgway reads its verifier and checks the proof.
    let client = connect(gw.port(), "dyn", "dyn-secret").await;
    let who = simple_value(&client, "select current_user")
        .await
        .expect("current_user");
    assert_eq!(
        who, "dyn",
        "the servers were logged in to as the client's user"
    );
    client
        .batch_execute("insert into dyn_t values (1)")
        .await
        .expect("a write as dyn");
    let written = simple_value(
        &client,
        "select inet_server_port()::text || ' ' || pg_is_in_recovery()::text || ' ' || \
         (select count(*) from dyn_t)::text",
    )
    .await
    .expect("a read as dyn");
    let replica = cluster.replica_ports()[0];
    assert_eq!(
        written,
        format!("{replica} true 1"),
        "a read on the replica, with the write"
    );
    // A second client of the same user, while the first is still connected.
    let again = connect(gw.port(), "dyn", "dyn-secret").await;
    assert_eq!(
        simple_value(&again, "select count(*) from dyn_t")
            .await
            .expect("second client"),
        "1"
    );

    // Wrong password, md5 or no verifier, no such role: 28P01, as for [[users]].
    assert_rejected(gw.port(), "dyn", "wrong").await;
    assert_rejected(gw.port(), "dyn_md5", "dyn-md5-secret").await;
    assert_rejected(gw.port(), "dyn_nopass", "").await;
    assert_rejected(gw.port(), "nobody", "x").await;
    // pgway_auth may run the look-up only: pg_authid itself stays closed to it.
    let direct = try_session(cluster.primary_port(), "pgway_auth", "auth-secret", DB)
        .await
        .expect("pgway_auth logs in to the primary");
    let denied = direct
        .client
        .simple_query("select count(*) from pg_authid")
        .await
        .expect_err("pg_authid is not readable by pgway_auth");
    assert_eq!(denied.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE));
}
