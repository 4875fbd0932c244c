//! TLS: clients to pgway (`[client.tls]`, psql with `sslmode=require` and `verify-full`,
//! tokio-postgres over rustls) and pgway to PostgreSQL (`[server_tls]`, against a server
//! whose pg_hba.conf accepts only `hostssl`). Certificates are made at test time with
//! rcgen: a CA, a server certificate for `localhost` and `127.0.0.1` that both PostgreSQL
//! and pgway show, and a second CA that signed nothing of theirs.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test step that cannot go on fails the test, with its message"
)]

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;
use tokio_postgres_rustls::MakeRustlsConnect;

/// The test's certificates, in a directory the `postgres` user can read.
struct Certs {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    other_ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Certs {
    fn new() -> Certs {
        let parent = std::env::var_os("PGWAY_TEST_TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/tmp"));
        let dir = tempfile::Builder::new()
            .prefix("pgway-tls-")
            .tempdir_in(&parent)
            .expect("certificate dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let ca = |name: &str| {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            (cert, key)
        };
        let (ca_cert, ca_key) = ca("pgway test CA");
        let (other_cert, _) = ca("some other CA");
        let (cert, key) = server_cert(&ca_cert, &ca_key);

        let certs = Certs {
            ca: dir.path().join("ca.crt"),
            other_ca: dir.path().join("other-ca.crt"),
            cert: dir.path().join("server.crt"),
            key: dir.path().join("server.key"),
            _dir: dir,
        };
        std::fs::write(&certs.ca, ca_cert.pem()).unwrap();
        std::fs::write(&certs.other_ca, other_cert.pem()).unwrap();
        std::fs::write(&certs.cert, cert.pem()).unwrap();
        std::fs::write(&certs.key, key.serialize_pem()).unwrap();
        // PostgreSQL wants its key private to the user it runs as.
        std::fs::set_permissions(&certs.key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        if root {
            let status = Command::new("chown")
                .arg("postgres:postgres")
                .arg(&certs.cert)
                .arg(&certs.key)
                .status()
                .unwrap();
            assert!(status.success(), "chown of the certificate files");
        }
        certs
    }

    /// Writes a new server certificate, from a new CA, over `cert` and `key`; returns
    /// the new CA's file.
    fn reissue(&self) -> PathBuf {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "pgway test CA, second");
        let new_ca = params.self_signed(&key).unwrap();
        let (cert, cert_key) = server_cert(&new_ca, &key);
        let path = self.ca.with_file_name("second-ca.crt");
        std::fs::write(&path, new_ca.pem()).unwrap();
        std::fs::write(&self.cert, cert.pem()).unwrap();
        std::fs::write(&self.key, cert_key.serialize_pem()).unwrap();
        path
    }

    /// `postgresql.conf` lines for a server with TLS on.
    fn server_conf(&self) -> String {
        format!(
            "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
            self.cert.display(),
            self.key.display()
        )
    }

    /// pgway's `[client.tls]` table.
    fn client_tls(&self, mode: &str) -> String {
        format!(
            "[client.tls]\ncert = \"{}\"\nkey = \"{}\"\nmode = \"{mode}\"\n",
            self.cert.display(),
            self.key.display()
        )
    }

    /// pgway's `[server_tls]` table checking against `ca`.
    fn server_tls(mode: &str, ca: &Path) -> String {
        format!(
            "[server_tls]\nmode = \"{mode}\"\nca = \"{}\"\n",
            ca.display()
        )
    }

    /// tokio-postgres's TLS, trusting `ca`.
    fn tokio_tls(ca: &Path) -> MakeRustlsConnect {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        MakeRustlsConnect::new(config)
    }
}

/// Runs `sql` then `\conninfo` with psql, connected with the libpq `conninfo`; returns
/// stdout, or stderr on failure.
/// A certificate for `localhost` and `127.0.0.1` signed by `ca`, and its key.
fn server_cert(
    ca: &rcgen::Certificate,
    ca_key: &rcgen::KeyPair,
) -> (rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    (params.signed_by(&key, ca, ca_key).unwrap(), key)
}

fn psql(conninfo: &str, sql: &str) -> Result<String, String> {
    let out = Command::new(pg_bin("psql"))
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .args(["-c", sql, "-c", "\\conninfo", "-d", conninfo])
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGSSLMODE")
        .env_remove("PGSSLROOTCERT")
        .env_remove("PGSERVICE")
        .output()
        .expect("running psql");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A libpq conninfo for the gateway as `app`, with `extra` settings.
fn conninfo(gw: &Gateway, extra: &str) -> String {
    format!(
        "host=localhost hostaddr=127.0.0.1 port={} user={APP_USER} password={APP_PASSWORD} \
         dbname={DB} {extra}",
        gw.port()
    )
}

/// tokio-postgres over rustls to the gateway, checking its certificate against `ca` and
/// the name `localhost`.
async fn tls_client(
    gw: &Gateway,
    ca: &Path,
    mode: SslMode,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("localhost")
        .hostaddr(IpAddr::V4(Ipv4Addr::LOCALHOST))
        .port(gw.port())
        .user(APP_USER)
        .password(APP_PASSWORD)
        .dbname(DB)
        .ssl_mode(mode)
        .connect_timeout(Duration::from_secs(10));
    let (client, connection) = config.connect(Certs::tokio_tls(ca)).await?;
    tokio::spawn(connection);
    Ok(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_connects_with_sslmode_require_and_verify_full() {
    let certs = Certs::new();
    let cluster = Cluster::start(0);
    let gw = Gateway::start_with(
        &cluster,
        GatewayOptions {
            extra: certs.client_tls("allow"),
            ..GatewayOptions::default()
        },
    );

    for settings in [
        "sslmode=require".to_owned(),
        format!("sslmode=verify-full sslrootcert={}", certs.ca.display()),
    ] {
        let out = psql(&conninfo(&gw, &settings), "select 40 + 2")
            .unwrap_or_else(|e| panic!("psql with {settings}: {e}"));
        assert!(out.starts_with("42\n"), "{settings}: {out}");
        assert!(out.contains("SSL connection"), "{settings}: {out}");
    }

    // libpq refuses pgway's certificate when it trusts another CA.
    let settings = format!(
        "sslmode=verify-full sslrootcert={}",
        certs.other_ca.display()
    );
    let err = psql(&conninfo(&gw, &settings), "select 1").expect_err("untrusted certificate");
    assert!(err.contains("certificate verify failed"), "{err}");

    // "allow": plain text still works, for psql and for tokio-postgres.
    let out = psql(&conninfo(&gw, "sslmode=disable"), "select 1").expect("plain psql");
    assert!(
        out.starts_with("1\n") && !out.contains("SSL connection"),
        "{out}"
    );
    let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    assert_eq!(simple_value(&client, "select 7").await.unwrap(), "7");

    // tokio-postgres over rustls: extended protocol, several statements, one session.
    let client = tls_client(&gw, &certs.ca, SslMode::Require)
        .await
        .expect("TLS client");
    for i in 0..20i32 {
        let row = client
            .query_one("select $1::int4 * 2", &[&i])
            .await
            .unwrap();
        assert_eq!(row.get::<_, i32>(0), i * 2);
    }
    // A large reply crosses many TLS records.
    let big = simple_value(&client, "select repeat('x', 1000000)")
        .await
        .unwrap();
    assert_eq!(big.len(), 1_000_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mode_require_refuses_plain_clients_with_28000() {
    let certs = Certs::new();
    let cluster = Cluster::start(0);
    let gw = Gateway::start_with(
        &cluster,
        GatewayOptions {
            extra: certs.client_tls("require"),
            ..GatewayOptions::default()
        },
    );

    // Before authentication: the StartupMessage alone is answered with the refusal.
    let mut raw = RawConn::connect(gw.port()).await;
    raw.send_startup(APP_USER, DB).await;
    let fields = raw
        .expect_error_then_close()
        .await
        .expect("FATAL then close");
    assert_eq!(fields.get(&b'S').map(String::as_str), Some("FATAL"));
    assert_eq!(fields.get(&b'C').map(String::as_str), Some("28000"));
    assert!(
        fields
            .get(&b'M')
            .is_some_and(|m| m.contains("SSL required")),
        "{fields:?}"
    );

    let err = try_connect(gw.port(), APP_USER, APP_PASSWORD)
        .await
        .expect_err("a plain tokio-postgres client is refused");
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{}",
        describe_error(&err)
    );
    let err = psql(&conninfo(&gw, "sslmode=disable"), "select 1").expect_err("plain psql");
    assert!(err.contains("SSL required"), "{err}");

    let settings = format!("sslmode=verify-full sslrootcert={}", certs.ca.display());
    let out = psql(&conninfo(&gw, &settings), "select 'over tls'").expect("psql over TLS");
    assert!(
        out.starts_with("over tls\n") && out.contains("SSL connection"),
        "{out}"
    );

    // CancelRequest still works: sent on a fresh plain connection (tokio-postgres with
    // NoTls), and on one that negotiates TLS first. (`prefer`: tokio-postgres refuses a
    // plain cancel for a `require` client; pgway's `require` mode makes the session TLS.)
    let client = tls_client(&gw, &certs.ca, SslMode::Prefer)
        .await
        .expect("TLS client");
    let plain_cancel = client.cancel_token();
    let sleeping = tokio::spawn(async move {
        let result = client.simple_query("select pg_sleep(30)").await;
        (client, result)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    plain_cancel
        .cancel_query(NoTls)
        .await
        .expect("plain cancel request");
    let (client, result) = tokio::time::timeout(Duration::from_secs(10), sleeping)
        .await
        .expect("the cancelled query ends")
        .unwrap();
    let err = result.expect_err("the query was cancelled");
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err}");

    let tls_cancel = client.cancel_token();
    let ca = certs.ca.clone();
    let sleeping = tokio::spawn(async move { client.simple_query("select pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    tls_cancel
        .cancel_query(Certs::tokio_tls(&ca))
        .await
        .expect("cancel request over TLS");
    let result = tokio::time::timeout(Duration::from_secs(10), sleeping)
        .await
        .expect("the cancelled query ends")
        .unwrap();
    let err = result.expect_err("the query was cancelled");
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err}");
}

/// Rewrites the primary's pg_hba.conf to accept TCP connections over TLS only.
fn hostssl_only(cluster: &Cluster) {
    std::fs::write(
        cluster.dir().join("primary").join("pg_hba.conf"),
        "# written by tests/tls.rs: TLS only on TCP\n\
         local     all all                    trust\n\
         hostnossl all all      0.0.0.0/0     reject\n\
         hostssl   all postgres 127.0.0.1/32  trust\n\
         hostssl   all all      127.0.0.1/32  scram-sha-256\n",
    )
    .expect("writing pg_hba.conf");
    cluster.psql_admin(cluster.primary_port(), "select pg_reload_conf()");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_tls_verify_full_reaches_a_hostssl_only_server() {
    let certs = Certs::new();
    let cluster = Cluster::start_with_conf(0, &certs.server_conf());
    hostssl_only(&cluster);
    // The server now refuses plain connections.
    let direct = eventually(
        "the server to refuse plain TCP",
        WAIT,
        async || match try_session(cluster.primary_port(), APP_USER, APP_PASSWORD, DB).await {
            Ok(_) => Err("a plain login still works".to_owned()),
            Err(e) => Ok(e),
        },
    )
    .await;
    assert!(
        describe_error(&direct).contains("no encryption"),
        "{}",
        describe_error(&direct)
    );

    let gw = Gateway::start_with(
        &cluster,
        GatewayOptions {
            // Two workers, two connections per pool, eight clients: server connections
            // (and their TLS sessions) move between the workers' reactors.
            extra: format!(
                "workers = 2\n{}{}",
                Certs::server_tls("verify-full", &certs.ca),
                certs.client_tls("allow")
            ),
            pool_size: 2,
            ..GatewayOptions::default()
        },
    );

    let mut tasks = Vec::new();
    for i in 0..8i64 {
        let port = gw.port();
        tasks.push(tokio::spawn(async move {
            let client = connect(port, APP_USER, APP_PASSWORD).await;
            for j in 0..25i64 {
                let row = client
                    .query_one("select $1::int8 + $2::int8", &[&i, &j])
                    .await
                    .unwrap_or_else(|e| panic!("client {i}: {}", describe_error(&e)));
                assert_eq!(row.get::<_, i64>(0), i + j);
            }
            // The server connection serving this client is encrypted.
            simple_value(
                &client,
                "select ssl::text from pg_stat_ssl where pid = pg_backend_pid()",
            )
            .await
            .unwrap()
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), "true");
    }

    // pgway's own control connections (health checks) are encrypted too.
    let control = cluster.psql_admin(
        cluster.primary_port(),
        "select count(*) filter (where s.ssl) || '/' || count(*) from pg_stat_activity a \
         join pg_stat_ssl s using (pid) where a.application_name = 'pgway-health'",
    );
    assert!(
        control.starts_with('1') && control.ends_with("/1"),
        "health connections (encrypted/all): {control}"
    );

    // TLS on both sides at once.
    let settings = format!("sslmode=verify-full sslrootcert={}", certs.ca.display());
    let out = psql(
        &conninfo(&gw, &settings),
        "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
    )
    .expect("psql over TLS to pgway over TLS");
    assert!(
        out.starts_with("t\n") && out.contains("SSL connection"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_tls_with_a_wrong_ca_fails_clearly() {
    let certs = Certs::new();
    let cluster = Cluster::start_with_conf(0, &certs.server_conf());
    let gw = Gateway::start_with(
        &cluster,
        GatewayOptions {
            extra: Certs::server_tls("verify-full", &certs.other_ca),
            ..GatewayOptions::default()
        },
    );
    let err = try_connect(gw.port(), APP_USER, APP_PASSWORD)
        .await
        .expect_err("pgway cannot trust the server");
    let text = describe_error(&err);
    assert!(
        text.contains("08006")
            && text.contains("invalid peer certificate")
            && text.contains(&cluster.primary_port().to_string()),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_shows_new_clients_the_new_certificate() {
    let certs = Certs::new();
    let cluster = Cluster::start(0);
    let gw = Gateway::start_toml(|listen| {
        gateway_toml(
            &cluster,
            listen,
            "127.0.0.1:0",
            &GatewayOptions {
                // "allow": the console (plain text) reloads it.
                extra: certs.client_tls("allow"),
                ..GatewayOptions::default()
            },
        )
        .replace(
            &format!("password = \"{APP_PASSWORD}\"\n"),
            &format!("password = \"{APP_PASSWORD}\"\nadmin = true\n"),
        )
    });
    let before = tls_client(&gw, &certs.ca, SslMode::Require)
        .await
        .expect("TLS client, first certificate");

    // The files change under pgway: nothing changes until the reload.
    let second_ca = certs.reissue();
    tls_client(&gw, &certs.ca, SslMode::Require)
        .await
        .expect("still the first certificate before the reload");
    gw.reload(gw.toml(), APP_USER, APP_PASSWORD)
        .await
        .expect("RELOAD");

    let after = tls_client(&gw, &second_ca, SslMode::Require)
        .await
        .expect("TLS client trusting the second CA");
    assert_eq!(simple_value(&after, "select 1").await.unwrap(), "1");
    tls_client(&gw, &certs.ca, SslMode::Require)
        .await
        .expect_err("the first CA no longer vouches for pgway");
    let settings = format!("sslmode=verify-full sslrootcert={}", second_ca.display());
    let out = psql(&conninfo(&gw, &settings), "select 40 + 2")
        .unwrap_or_else(|e| panic!("psql with {settings}: {e}"));
    assert!(out.starts_with("42\n"), "{out}");
    // The client connected before the reload keeps its session.
    assert_eq!(simple_value(&before, "select 2").await.unwrap(), "2");

    // A key that does not parse refuses the reload; the second certificate stays.
    std::fs::write(&certs.key, "not a key").unwrap();
    let refused = gw
        .reload(gw.toml(), APP_USER, APP_PASSWORD)
        .await
        .expect_err("a reload with a broken key");
    assert!(refused.contains("client.tls.key"), "{refused}");
    tls_client(&gw, &second_ca, SslMode::Require)
        .await
        .expect("the second certificate is still served");
}
