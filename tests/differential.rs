//! Differential tests: every script in `tests/differential/scripts/` runs directly against
//! PostgreSQL and through pgway, and the two transcripts must be identical. pgway pools
//! server connections per transaction; this shows whether each client's session still
//! behaves exactly as on a direct connection of its own.
//!
//! Runs of each script, on one cluster (a primary and one streaming replica, with
//! `synchronous_commit = remote_apply` and `synchronous_standby_names = '*'` so that a read
//! on the replica sees every commit acknowledged before it, and `max_prepared_transactions`
//! for two-phase commit):
//!
//! - `direct`: each client has its own connection to the primary. The reference.
//! - `pool1`: through pgway configured with the primary only, `pool.size` 1 (or the
//!   script's `-- pool_size`): the clients of one user take turns on one server connection.
//! - `replica`: through pgway in front of the primary and the replica, `pool.size` 1 per
//!   node (or the script's `-- pool_size`): reads outside transactions go to the replica.
//!
//! Every run gets a fresh database `diff_<script>` (owned by `app`) and the roles the script
//! declares; both are dropped after the run, with any prepared transaction it left. Gateways
//! are started once per (variant, pool size) and reused; pgway's pools are per database, so
//! no pooled connection carries over from one run to the next.
//!
//! `known_differences.txt` lists `variant/script` pairs expected to differ today, each with
//! a reason. The test fails when an unlisted pair differs (with a unified diff), and when a
//! listed pair now matches (remove it from the list). Every difference is also written,
//! with both transcripts, under `target/tmp/differential/` (see the test's output).
//!
//! Knobs: `PGWAY_DIFF_ONLY=name1,name2` runs only those scripts; `PGWAY_DIFF_CONTROL=1`
//! also runs each script directly a second time (`direct2`) and fails on any difference
//! from the first: a check that a new script is deterministic.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a harness step that cannot go on fails the test, with its message"
)]

mod common;

#[path = "differential/diff.rs"]
mod diff;
#[path = "differential/normalize.rs"]
mod normalize;
#[path = "differential/runner.rs"]
mod runner;
#[path = "differential/script.rs"]
mod script;
#[path = "differential/settings.rs"]
mod settings;
#[path = "differential/tap.rs"]
mod tap;
#[path = "differential/transcript.rs"]
mod transcript;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Cluster, Gateway, APP_PASSWORD, APP_USER, MD5_PASSWORD, MD5_USER};
use script::Script;
use tokio_postgres::{Client, NoTls};

/// Password of the superuser `postgres` in pgway's config (PostgreSQL trusts it on
/// loopback, so pgway's login to the server needs none; clients of pgway do).
pub const POSTGRES_PASSWORD: &str = "postgres-secret";

/// The runs compared with `direct`.
const VARIANTS: [Variant; 2] = [Variant::Pool1, Variant::Replica];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Variant {
    Direct,
    /// `direct` again (`PGWAY_DIFF_CONTROL=1`).
    Direct2,
    Pool1,
    Replica,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Direct => "direct",
            Variant::Direct2 => "direct2",
            Variant::Pool1 => "pool1",
            Variant::Replica => "replica",
        }
    }
}

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/differential")
}

/// Where transcripts and diffs go.
fn report_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("differential")
}

/// `known_differences.txt`: `variant/script reason...` per line; `#` comments.
fn known_differences() -> BTreeMap<(String, String), String> {
    let path = dir().join("known_differences.txt");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut out = BTreeMap::new();
    for (no, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, reason) = line
            .split_once(char::is_whitespace)
            .unwrap_or_else(|| panic!("known_differences.txt line {}: no reason", no + 1));
        let (variant, name) = key.split_once('/').unwrap_or_else(|| {
            panic!(
                "known_differences.txt line {}: `variant/script` expected, got `{key}`",
                no + 1
            )
        });
        assert!(
            !reason.trim().is_empty(),
            "known_differences.txt line {}: a reason is required",
            no + 1
        );
        let prev = out.insert(
            (variant.to_string(), name.to_string()),
            reason.trim().to_string(),
        );
        assert!(prev.is_none(), "known_differences.txt lists {key} twice");
    }
    out
}

/// pgway's config: the given nodes, the users `app`, `md5user` and `postgres`.
fn gateway_toml(listen: &str, nodes: &[u16], pool_size: usize) -> String {
    let nodes: Vec<String> = nodes.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
    format!(
        "listen = \"{listen}\"\n\
         admin_listen = \"127.0.0.1:0\"\n\
         \n\
         [[users]]\n\
         name = \"{APP_USER}\"\n\
         password = \"{APP_PASSWORD}\"\n\
         \n\
         [[users]]\n\
         name = \"{MD5_USER}\"\n\
         password = \"{MD5_PASSWORD}\"\n\
         auth = \"md5\"\n\
         \n\
         [[users]]\n\
         name = \"postgres\"\n\
         password = \"{POSTGRES_PASSWORD}\"\n\
         \n\
         [pool]\n\
         size = {pool_size}\n\
         wait_timeout = \"2s\"\n\
         \n\
         [topology]\n\
         kind = \"static\"\n\
         nodes = [{nodes}]\n\
         health_interval = \"200ms\"\n",
        nodes = nodes.join(", "),
    )
}

/// A direct connection as `postgres` to `db` on `port`.
async fn admin(port: u16, db: &str) -> Client {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user("postgres")
        .dbname(db)
        .ssl_mode(tokio_postgres::config::SslMode::Disable)
        .connect_timeout(Duration::from_secs(10));
    let (client, connection) = config
        .connect(NoTls)
        .await
        .unwrap_or_else(|e| panic!("admin connection to {db} on {port}: {e:?}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

async fn admin_exec(client: &Client, sql: &str) {
    client
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("harness SQL failed: {}\n{sql}", common::describe_error(&e)));
}

fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Fields drop in order: the gateways stop before the cluster.
struct Harness {
    gateways: HashMap<(Variant, usize), Gateway>,
    cluster: Cluster,
    /// Roles that existed before any script ran.
    base_roles: BTreeSet<String>,
    /// The admin connection to the `postgres` database on the primary.
    admin: Client,
}

impl Harness {
    async fn start() -> Harness {
        let cluster = Cluster::start_with_conf(1, "max_prepared_transactions = 10");
        let primary = cluster.primary_port();
        // On every node, so that `show synchronous_commit` reads the same wherever pgway
        // sends it (postgresql.auto.conf is not replicated).
        for port in std::iter::once(primary).chain(cluster.replica_ports()) {
            cluster.psql_admin(
                port,
                "ALTER SYSTEM SET synchronous_standby_names = '*';\n\
                 ALTER SYSTEM SET synchronous_commit = 'remote_apply';\n\
                 SELECT pg_reload_conf();\n",
            );
        }
        common::wait_until_blocking(
            "the replica to become a synchronous standby",
            common::WAIT,
            || {
                let out = common::try_psql(
                    primary,
                    "postgres",
                    "SELECT string_agg(sync_state, ',') FROM pg_stat_replication;",
                )?;
                if out == "sync" {
                    Ok(())
                } else {
                    Err(format!("sync_state = {out:?}"))
                }
            },
        );
        let admin = admin(primary, "postgres").await;
        let base_roles = admin
            .query("select rolname::text from pg_roles", &[])
            .await
            .expect("listing roles")
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect();
        Harness {
            cluster,
            gateways: HashMap::new(),
            base_roles,
            admin,
        }
    }

    async fn endpoint_port(&mut self, variant: Variant, pool_size: usize) -> u16 {
        let primary = self.cluster.primary_port();
        if matches!(variant, Variant::Direct | Variant::Direct2) {
            return primary;
        }
        if let Some(gw) = self.gateways.get(&(variant, pool_size)) {
            return gw.port();
        }
        let mut nodes = vec![primary];
        if variant == Variant::Replica {
            nodes.extend(self.cluster.replica_ports());
        }
        let gw = Gateway::start_toml(|listen| gateway_toml(listen, &nodes, pool_size));
        if variant == Variant::Replica {
            gw.wait_for_replica_reads(&self.cluster).await;
        }
        let port = gw.port();
        self.gateways.insert((variant, pool_size), gw);
        port
    }

    fn database(script: &Script) -> String {
        format!("diff_{}", script.name)
    }

    /// A fresh database and the script's roles and setup.
    async fn prepare(&self, script: &Script) {
        let db = Harness::database(script);
        admin_exec(
            &self.admin,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", ident(&db)),
        )
        .await;
        for role in &script.roles {
            admin_exec(
                &self.admin,
                &format!("DROP ROLE IF EXISTS {r}; CREATE ROLE {r}", r = ident(role)),
            )
            .await;
        }
        admin_exec(
            &self.admin,
            &format!("CREATE DATABASE {} OWNER app", ident(&db)),
        )
        .await;
        if !script.setup.is_empty() {
            let c = admin(self.cluster.primary_port(), &db).await;
            admin_exec(&c, &script.setup.join("\n")).await;
        }
    }

    /// Drops what a run left: prepared transactions, the database, new roles.
    async fn clean(&self, script: &Script) {
        let db = Harness::database(script);
        {
            let c = admin(self.cluster.primary_port(), &db).await;
            let gids = c
                .query(
                    "select gid from pg_prepared_xacts where database = current_database()",
                    &[],
                )
                .await
                .expect("listing prepared transactions");
            for g in gids {
                let gid: String = g.get(0);
                admin_exec(
                    &c,
                    &format!("ROLLBACK PREPARED '{}'", gid.replace('\'', "''")),
                )
                .await;
            }
        }
        admin_exec(
            &self.admin,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", ident(&db)),
        )
        .await;
        let roles: Vec<String> = self
            .admin
            .query("select rolname::text from pg_roles", &[])
            .await
            .expect("listing roles")
            .iter()
            .map(|r| r.get::<_, String>(0))
            .filter(|r| !self.base_roles.contains(r))
            .collect();
        for r in roles {
            admin_exec(&self.admin, &format!("DROP ROLE {}", ident(&r))).await;
        }
    }

    /// Runs `script` (its steps already generated) through `variant`; the normalized
    /// transcript.
    async fn run(
        &mut self,
        script: &Script,
        steps: &[script::Step],
        variant: Variant,
    ) -> Vec<String> {
        let port = self.endpoint_port(variant, script.pool_size).await;
        self.prepare(script).await;
        if variant == Variant::Replica {
            self.cluster.wait_replay();
        }
        let endpoint = runner::Endpoint {
            port,
            database: Harness::database(script),
        };
        let lines = runner::run(&endpoint, steps).await;
        self.clean(script).await;
        lines
            .iter()
            .flat_map(|l| l.lines().map(normalize::line).collect::<Vec<_>>())
            .collect()
    }
}

/// The steps of `script`: its own, or generated from pg_settings.
async fn steps_of(script: &Script, cluster: &Cluster) -> Vec<script::Step> {
    let Some(kind) = script.generate else {
        return script.steps.clone();
    };
    let user = match kind {
        script::Generate::UserSettings => APP_USER,
        script::Generate::SuperuserSettings => "postgres",
    };
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(cluster.primary_port())
        .user(user)
        .password(runner::password(user))
        .dbname(common::DB)
        .ssl_mode(tokio_postgres::config::SslMode::Disable);
    let (probe, connection) = config.connect(NoTls).await.expect("probe connection");
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    let steps = settings::generate(kind, &probe).await;
    drop(probe);
    let _ = task.await;
    steps
}

fn write_file(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().expect("a parent")).expect("creating report dir");
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

#[test]
fn sessions_through_pgway_behave_as_direct_connections() {
    let started = Instant::now();
    let mut scripts = script::load_all(&dir().join("scripts"));
    let known = known_differences();
    for (variant, name) in known.keys() {
        assert!(
            VARIANTS.iter().any(|v| v.name() == variant),
            "known_differences.txt: unknown variant `{variant}` (one of pool1, replica)"
        );
        assert!(
            scripts.iter().any(|s| &s.name == name),
            "known_differences.txt: no script named `{name}`"
        );
    }
    let only: Option<BTreeSet<String>> = std::env::var("PGWAY_DIFF_ONLY")
        .ok()
        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect());
    match &only {
        Some(only) => {
            scripts.retain(|s| only.contains(&s.name));
            assert!(
                !scripts.is_empty(),
                "PGWAY_DIFF_ONLY={only:?} names no script"
            );
        }
        None => assert!(
            scripts.len() >= 40,
            "only {} scripts in tests/differential/scripts",
            scripts.len()
        ),
    }
    let mut variants = VARIANTS.to_vec();
    if std::env::var_os("PGWAY_DIFF_CONTROL").is_some() {
        variants.insert(0, Variant::Direct2);
    }
    let report = report_dir();
    let _ = std::fs::remove_dir_all(&report);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let results = rt.block_on(async {
        let mut h = Harness::start().await;
        let mut results: Vec<(String, Variant, Option<String>)> = Vec::new();
        for script in &scripts {
            let t = Instant::now();
            let steps = steps_of(script, &h.cluster).await;
            let direct = h.run(script, &steps, Variant::Direct).await;
            write_file(
                &report.join("direct").join(format!("{}.txt", script.name)),
                &direct.join("\n"),
            );
            for &variant in &variants {
                let got = h.run(script, &steps, variant).await;
                write_file(
                    &report
                        .join(variant.name())
                        .join(format!("{}.txt", script.name)),
                    &got.join("\n"),
                );
                let d = diff::unified(
                    &format!("direct/{}", script.name),
                    &direct,
                    &format!("{}/{}", variant.name(), script.name),
                    &got,
                    3,
                    60,
                );
                results.push((script.name.clone(), variant, d));
            }
            eprintln!("{}: {:.1?}", script.name, t.elapsed());
        }
        results
    });

    let mut failures = Vec::new();
    let mut summary = Vec::new();
    for (name, variant, d) in &results {
        let key = (variant.name().to_string(), name.clone());
        // A direct run differs from another only if the script is not deterministic.
        let listed = known.get(&key).filter(|_| *variant != Variant::Direct2);
        match (d, listed) {
            (Some(d), listed) => {
                let first: String = d.lines().take(20).collect::<Vec<_>>().join("\n");
                summary.push(format!(
                    "== {}/{name} differs ({})\n{first}\n",
                    variant.name(),
                    listed.map_or("NOT LISTED".to_string(), |r| format!("known: {r}"))
                ));
                write_file(
                    &report
                        .join("diffs")
                        .join(format!("{}-{name}.diff", variant.name())),
                    d,
                );
                if listed.is_none() {
                    failures.push(format!(
                        "script `{name}` differs through pgway ({}), and known_differences.txt \
                         does not list `{}/{name}`:\n{d}",
                        variant.name(),
                        variant.name()
                    ));
                }
            }
            (None, Some(reason)) => failures.push(format!(
                "script `{name}` now behaves as on a direct connection ({}): remove \
                 `{}/{name}` ({reason}) from tests/differential/known_differences.txt",
                variant.name(),
                variant.name()
            )),
            (None, None) => {}
        }
    }
    let differing = summary.len();
    write_file(&report.join("summary.txt"), &summary.join("\n"));
    eprintln!(
        "{} scripts x {} variants in {:.1?}; {differing} differ (known: {}); transcripts and \
         diffs in {}\n\n{}",
        scripts.len(),
        variants.len(),
        started.elapsed(),
        differing
            - failures
                .iter()
                .filter(|f| f.contains("does not list"))
                .count(),
        report.display(),
        summary.join("\n")
    );
    assert!(
        failures.is_empty(),
        "{} problem(s):\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}
