//! Functions that only read go to replicas even when nobody declared them STABLE: pgway
//! reads a volatile function's body and proves it read-only, or keeps it on the primary.
//! Every function here returns `inet_server_port()`, so a call says which node ran it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test step that cannot go on fails the test, with its message"
)]

mod common;

use common::*;

/// Functions owned by `app`, created directly on the primary, none with a volatility
/// clause (so all VOLATILE).
const SCHEMA: &str = r#"
SET ROLE app;
CREATE SCHEMA accounts;
CREATE TABLE accounts.users (id uuid PRIMARY KEY, email text, group_id int);
CREATE TABLE accounts.user_groups (id int PRIMARY KEY, name text);
CREATE TABLE accounts.contacts (user_id uuid, value text);
INSERT INTO accounts.user_groups VALUES (1, 'staff');
INSERT INTO accounts.users VALUES ('6f1c1ae4-3a54-4a35-8e5c-2f1d6b4f0a11', 'alice@example.com', 1);
CREATE TABLE log (v text);
CREATE SEQUENCE s;

-- The services' look-up function: a UUID cast in an exception block, then RETURN QUERY.
CREATE FUNCTION accounts.get_user_by_identifier_v1(p_identifier text)
RETURNS TABLE (email text, group_name text, port int) LANGUAGE plpgsql AS $$
DECLARE
  v_uuid uuid;
BEGIN
  BEGIN
    v_uuid := p_identifier::uuid;
  EXCEPTION WHEN invalid_text_representation THEN
    v_uuid := NULL;
  END;
  RETURN QUERY
    SELECT u.email, g.name, inet_server_port()
      FROM accounts.users u
      LEFT JOIN accounts.user_groups g ON g.id = u.group_id
      LEFT JOIN accounts.contacts c ON c.user_id = u.id
     WHERE u.id = v_uuid OR u.email = p_identifier OR c.value = p_identifier;
END;
$$;

CREATE FUNCTION sql_reader() RETURNS int LANGUAGE sql AS $$ SELECT inet_server_port() $$;
CREATE FUNCTION says_insert() RETURNS int LANGUAGE plpgsql AS $$
BEGIN
  RAISE NOTICE 'INSERT INTO log is only words';
  RETURN inet_server_port();
END $$;
CREATE FUNCTION definer_reader() RETURNS int LANGUAGE sql SECURITY DEFINER AS $$
  SELECT inet_server_port() FROM accounts.user_groups LIMIT 1 $$;
CREATE FUNCTION calls_reader() RETURNS int LANGUAGE plpgsql AS $$
BEGIN RETURN sql_reader(); END $$;

CREATE FUNCTION inserts() RETURNS int LANGUAGE plpgsql AS $$
BEGIN INSERT INTO log VALUES ('x'); RETURN inet_server_port(); END $$;
CREATE FUNCTION updates() RETURNS int LANGUAGE sql AS $$
  UPDATE log SET v = v; SELECT inet_server_port() $$;
CREATE FUNCTION takes_nextval() RETURNS int LANGUAGE plpgsql AS $$
BEGIN PERFORM nextval('s'); RETURN inet_server_port(); END $$;
CREATE FUNCTION dynamic() RETURNS int LANGUAGE plpgsql AS $$
DECLARE r int;
BEGIN EXECUTE 'select inet_server_port()' INTO r; RETURN r; END $$;
CREATE FUNCTION calls_writer() RETURNS int LANGUAGE plpgsql AS $$
BEGIN RETURN inserts(); END $$;
CREATE FUNCTION writing_cte() RETURNS int LANGUAGE sql AS $$
  WITH d AS (DELETE FROM log RETURNING 1) SELECT inet_server_port() FROM (SELECT count(*) FROM d) x $$;
CREATE FUNCTION locks_rows() RETURNS int LANGUAGE plpgsql AS $$
BEGIN PERFORM * FROM log FOR UPDATE; RETURN inet_server_port(); END $$;
CREATE FUNCTION terminates() RETURNS int LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_terminate_backend(0); RETURN inet_server_port(); END $$;
RESET ROLE;
"#;

/// Runs `sql` (whose first column is a port) through pgway and names the node that ran it.
async fn node_of(client: &tokio_postgres::Client, cluster: &Cluster, sql: &str) -> String {
    let rows = simple_rows(client, sql)
        .await
        .unwrap_or_else(|e| panic!("`{sql}`: {}", describe_error(&e)));
    let port: u16 = rows[0][0]
        .as_deref()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("`{sql}`: no port in {rows:?}"));
    cluster.name_of(port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_bodies_go_to_the_replica_and_writing_ones_stay_on_the_primary() {
    let cluster = Cluster::start_with_schema(1, SCHEMA);
    let gw = Gateway::start(&cluster);
    gw.wait_for_replica_reads(&cluster).await;
    let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    let primary = cluster.name_of(cluster.primary_port());
    let replica = cluster.name_of(cluster.replica_ports()[0]);

    let mut wrong = Vec::new();
    for (sql, want) in [
        (
            "select port from accounts.get_user_by_identifier_v1('alice@example.com')",
            &replica,
        ),
        (
            "select port from accounts.get_user_by_identifier_v1('6f1c1ae4-3a54-4a35-8e5c-2f1d6b4f0a11')",
            &replica,
        ),
        ("select sql_reader()", &replica),
        ("select says_insert()", &replica),
        ("select definer_reader()", &replica),
        ("select calls_reader()", &replica),
        ("select inserts()", &primary),
        ("select updates()", &primary),
        ("select takes_nextval()", &primary),
        ("select dynamic()", &primary),
        ("select calls_writer()", &primary),
        ("select writing_cte()", &primary),
        ("select locks_rows()", &primary),
        ("select terminates()", &primary),
    ] {
        let got = node_of(&client, &cluster, sql).await;
        if got != *want {
            wrong.push(format!("`{sql}`: ran on {got}, expected {want}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    // The look-up function still answers right on the replica.
    let rows = simple_rows(
        &client,
        "select email, group_name from accounts.get_user_by_identifier_v1('6f1c1ae4-3a54-4a35-8e5c-2f1d6b4f0a11')",
    )
    .await
    .expect("the look-up");
    assert_eq!(
        rows,
        vec![vec![
            Some("alice@example.com".to_owned()),
            Some("staff".to_owned())
        ]]
    );

    // SHOW pgway.last_route says where the statement before went, and why.
    for (sql, want) in [
        ("select 1", "replica: plain read"),
        (
            "select sql_reader()",
            "replica: a read whose functions only read",
        ),
        (
            "select inserts()",
            "primary: calls public.inserts, which may write (INSERT in its body)",
        ),
        (
            "select calls_writer()",
            "primary: calls public.calls_writer, which calls public.inserts, which may write \
             (INSERT in its body)",
        ),
        (
            "/* pgway:primary */ select 1",
            "primary: /* pgway:primary */ hint",
        ),
        (
            "/* pgway:replica */ select 2",
            "replica: /* pgway:replica */ hint",
        ),
        ("insert into log values ('x')", "primary: not a read"),
    ] {
        client.batch_execute(sql).await.expect(sql);
        let got = simple_value(&client, "show pgway.last_route")
            .await
            .expect("show pgway.last_route");
        assert!(got.starts_with(want), "after `{sql}`: {got}");
        // Asking again (and in the extended protocol) still names that statement.
        let again: String = client
            .query_one("show pgway.last_route", &[])
            .await
            .expect("show pgway.last_route, extended")
            .get(0);
        assert_eq!(again, got, "after `{sql}`, asked again");
    }
    client.batch_execute("begin").await.expect("begin");
    client.batch_execute("select 1").await.expect("select 1");
    let inside = simple_value(&client, "show pgway.last_route")
        .await
        .expect("show pgway.last_route in a transaction");
    client.batch_execute("commit").await.expect("commit");
    assert_eq!(inside, "primary: inside a transaction");
    client
        .batch_execute("begin read only")
        .await
        .expect("begin read only");
    client.batch_execute("select 1").await.expect("select 1");
    let inside = simple_value(&client, "show pgway.last_route")
        .await
        .expect("show pgway.last_route in a read-only transaction");
    client.batch_execute("commit").await.expect("commit");
    assert_eq!(inside, "replica: read-only transaction");

    // Redefining the callee to write, through pgway, moves it and its caller to the
    // primary at once.
    client
        .batch_execute(
            "CREATE OR REPLACE FUNCTION sql_reader() RETURNS int LANGUAGE sql AS $$ \
             INSERT INTO log VALUES ('now I write'); SELECT inet_server_port() $$",
        )
        .await
        .expect("redefining sql_reader");
    assert_eq!(
        node_of(&client, &cluster, "select sql_reader()").await,
        primary
    );
    assert_eq!(
        node_of(&client, &cluster, "select calls_reader()").await,
        primary
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_lists_override_the_analysis() {
    let cluster = Cluster::start_with_schema(1, SCHEMA);
    let admin = free_loopback_port();
    let opts = GatewayOptions {
        extra: "[routing]\n\
                read_only_functions = [\"public.dynamic\", \"public.inserts\", \"public.updates\"]\n\
                write_functions = [\"public.sql_reader()\"]\n"
            .into(),
        ..GatewayOptions::default()
    };
    let gw = Gateway::start_with_admin(&cluster, opts, admin);
    gw.wait_for_replica_reads(&cluster).await;
    let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    let primary = cluster.name_of(cluster.primary_port());
    let replica = cluster.name_of(cluster.replica_ports()[0]);
    assert_eq!(
        node_of(&client, &cluster, "select dynamic()").await,
        replica
    );
    assert_eq!(
        node_of(&client, &cluster, "select sql_reader()").await,
        primary
    );
    assert_eq!(
        node_of(&client, &cluster, "select calls_reader()").await,
        primary
    );

    // Listed as read-only, but they write: the replica refuses, and the client gets the
    // primary's answer instead of the error, in both protocols.
    assert_eq!(
        node_of(&client, &cluster, "select inserts()").await,
        primary
    );
    assert_eq!(
        simple_value(&client, "show pgway.last_route")
            .await
            .expect("show pgway.last_route"),
        "primary: a replica refused it as a write, so it ran here"
    );
    let row = client
        .query_one("select updates()", &[])
        .await
        .expect("a writing function through the extended protocol");
    let port = u16::try_from(row.get::<_, i32>(0)).expect("a port");
    assert_eq!(cluster.name_of(port), primary);
    // The simple-protocol text is remembered as a write: a second call goes to the
    // primary at once, without a refusal.
    assert_eq!(
        node_of(&client, &cluster, "select inserts()").await,
        primary
    );
    let topology = topology_json(admin).await;
    assert_eq!(topology["replica_retries"], 2, "{topology}");
    let rows = cluster.psql_admin(cluster.primary_port(), "select count(*) from log");
    assert_eq!(
        rows.trim(),
        "2",
        "each call of inserts() inserted once, on the primary"
    );
}
