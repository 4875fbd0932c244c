//! The config file and the `pgway` binary: the example config is valid, unknown keys and bad
//! values are rejected by name, and the binary serves clients and `GET /health`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test step that cannot go on fails the test, with its message"
)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::*;

fn example_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/static.toml")
}

fn pgway_check(path: &Path) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgway"))
        .args(["check", "--config"])
        .arg(path)
        .env_remove("PGWAY_CONFIG")
        .output()
        .expect("running pgway check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_example_config_is_valid() {
    let text = std::fs::read_to_string(example_config()).expect("reading config/static.toml");
    if let Err(e) = pgway::config::Config::from_toml_str(&text) {
        panic!("config/static.toml rejected: {e}");
    }
    let (ok, output) = pgway_check(&example_config());
    assert!(
        ok,
        "pgway check --config config/static.toml failed:\n{output}"
    );
}

#[test]
fn unknown_keys_and_bad_values_are_rejected_by_name() {
    let good = std::fs::read_to_string(example_config()).expect("reading config/static.toml");
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        ("sise", good.replacen("size = 20", "sise = 20", 1)),
        ("colour", format!("colour = \"blue\"\n{good}")),
        ("hosts", good.replacen("nodes = ", "hosts = ", 1)),
        (
            "passwd",
            good.replacen("password = \"app-secret\"", "passwd = \"x\"", 1),
        ),
        (
            "wait_timeout",
            good.replacen("wait_timeout = \"5s\"", "wait_timeout = \"soon\"", 1),
        ),
        (
            "kind",
            good.replacen("kind = \"static\"", "kind = \"magic\"", 1),
        ),
        (
            "auth",
            good.replacen("auth = \"md5\"", "auth = \"kerberos\"", 1),
        ),
    ];
    let mut failures = Vec::new();
    for (key, text) in cases {
        assert_ne!(text, good, "case {key} did not change the config");
        match pgway::config::Config::from_toml_str(&text) {
            Ok(_) => failures.push(format!("{key}: Config::from_toml_str accepted it")),
            Err(e) if !e.to_string().contains(key) => {
                failures.push(format!("{key}: error does not name the key: {e}"))
            }
            Err(_) => {}
        }
        let path = dir.path().join(format!("{key}.toml"));
        std::fs::write(&path, &text).expect("writing the config");
        let (ok, output) = pgway_check(&path);
        if ok {
            failures.push(format!("{key}: pgway check exited 0"));
        } else if !output.contains(key) {
            failures.push(format!(
                "{key}: pgway check's output does not name it: {output}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Starts the binary with the config in a file (by `--config` or by `PGWAY_CONFIG`) and
/// checks it serves a client and `/health`.
async fn binary_serves(by_env: bool) {
    let cluster = Cluster::start(0);
    let (listen, admin) = (free_loopback_port(), free_loopback_port());
    let toml = gateway_toml(
        &cluster,
        &format!("127.0.0.1:{listen}"),
        &format!("127.0.0.1:{admin}"),
        &GatewayOptions::default(),
    );
    let config = cluster.dir().join("pgway.toml");
    std::fs::write(&config, &toml).expect("writing pgway.toml");
    let log_path = cluster.dir().join("pgway-binary.log");
    let log = std::fs::File::create(&log_path).expect("creating the log");
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgway"));
    if by_env {
        cmd.env("PGWAY_CONFIG", &config);
    } else {
        cmd.arg("--config").arg(&config).env_remove("PGWAY_CONFIG");
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("spawning pgway");
    let log_text = || std::fs::read_to_string(&log_path).unwrap_or_default();

    let primary = cluster.primary_port();
    eventually("the pgway binary to serve a client", WAIT, async || {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("pgway exited with {status}\n--- log\n{}", log_text());
        }
        let client = try_connect(listen, APP_USER, APP_PASSWORD)
            .await
            .map_err(|e| describe_error(&e))?;
        let port = try_served_by(&client)
            .await
            .map_err(|e| describe_error(&e))?;
        if port == primary {
            Ok(())
        } else {
            Err(format!("served by {port}"))
        }
    })
    .await;
    let health = eventually("GET /health", WAIT, async || {
        http_get(admin, "/health").await
    })
    .await;
    assert!(
        health.starts_with("HTTP/1.1 200") || health.starts_with("HTTP/1.0 200"),
        "GET /health:\n{health}\n--- log\n{}",
        log_text()
    );
    child.kill().await.expect("stopping pgway");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_clients_and_health_with_config_flag() {
    binary_serves(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_reads_pgway_config_from_the_environment() {
    binary_serves(true).await;
}
