//! Secrets stay out of the logs: the pgway binary runs with every log level on
//! (`RUST_LOG=trace`) while clients log in (SCRAM, md5, wrong passwords, a user found
//! through `auth_query`), run statements with parameters (some of which the server
//! refuses, quoting the value) and use the admin console; then its whole log is searched
//! for every password and parameter value used, and none may appear.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test step that cannot go on fails the test, with its message"
)]

mod common;

use common::*;

/// Parameter values sent with the extended protocol: none may be logged.
const PARAMS: [&str; 3] = [
    "param-value-6b1f3e",
    "not-an-int-9c2d77",
    "cached-param-40a1e8",
];

/// Passwords used by this test besides the harness's own.
const DYN_PASSWORD: &str = "dyn-secret-5e21a9";
const AUTH_PASSWORD: &str = "auth-secret-77c0b4";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_password_or_parameter_value_reaches_the_log() {
    let schema = AUTH_QUERY_SCHEMA
        .replace("'auth-secret'", &format!("'{AUTH_PASSWORD}'"))
        .replace("'dyn-secret'", &format!("'{DYN_PASSWORD}'"));
    let cluster = Cluster::start_with_schema(1, &schema);
    let opts = GatewayOptions {
        extra: format!(
            "[auth_query]\n\
             user = \"pgway_auth\"\n\
             password = \"{AUTH_PASSWORD}\"\n\
             query = \"SELECT username, password FROM pgway_auth.get_auth($1)\"\n\
             database = \"appdb\"\n"
        ),
        ..GatewayOptions::default()
    };
    let mut pgway = GatewayProcess::start_logging(&cluster, &opts, "trace");
    pgway.wait_ready(&cluster).await;
    let port = pgway.port();

    // Logins that work, and logins that fail.
    let app = connect(port, APP_USER, APP_PASSWORD).await;
    let md5 = connect(port, MD5_USER, MD5_PASSWORD).await;
    let dynamic = connect(port, "dyn", DYN_PASSWORD).await;
    for (user, password) in [
        (APP_USER, "wrong-app-password-1d9e"),
        (MD5_USER, "wrong-md5-password-3f0a"),
        ("dyn", "wrong-dyn-password-88b2"),
    ] {
        try_connect(port, user, password)
            .await
            .map(drop)
            .expect_err("a wrong password");
    }

    // Parameters: a read, a write, one the server refuses (its message quotes the value),
    // and a prepared statement run on another pooled connection.
    let row = app
        .query_one("select $1::text", &[&PARAMS[0]])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), PARAMS[0]);
    let refused = app
        .query_one("select $1::text::int4", &[&PARAMS[1]])
        .await
        .expect_err("not an integer");
    assert!(describe_error(&refused).contains(PARAMS[1]), "{refused:?}");
    let statement = md5.prepare("select length($1::text)").await.unwrap();
    for _ in 0..3 {
        md5.query_one(&statement, &[&PARAMS[2]]).await.unwrap();
    }
    dynamic
        .query_one("select $1::text", &[&PARAMS[0]])
        .await
        .unwrap();
    drop((app, md5, dynamic));

    let log = pgway.log();
    // Trace logging is on, and logs these very sessions (so the search below can fail).
    assert!(
        log.lines()
            .any(|l| l.contains("client logged in") && l.contains("user=\"dyn\"")),
        "no trace of the sessions in the log:\n{log}"
    );
    for secret in [
        APP_PASSWORD,
        MD5_PASSWORD,
        DYN_PASSWORD,
        AUTH_PASSWORD,
        "wrong-app-password-1d9e",
        "wrong-md5-password-3f0a",
        "wrong-dyn-password-88b2",
    ]
    .iter()
    .chain(PARAMS.iter())
    {
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(secret)).collect();
        assert!(
            lines.is_empty(),
            "{secret:?} is in the log:\n{}",
            lines.join("\n")
        );
    }
}
