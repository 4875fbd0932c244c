//! The result cache's WAL follower against a real PostgreSQL 15 primary: logical decoding
//! over a temporary slot reports each committed transaction's tables (partition ancestors
//! included), confirms positions promptly, leaves nothing on the server, and refuses a
//! primary without `wal_level = logical`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test step that cannot go on fails the test, with its message"
)]

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use pgway::cache::wal::{slot_name, WalError, WalEvent, WalFollower};
use pgway::net::TcpConnector;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Limit of the follower's network waits.
const FOLLOWER_TIMEOUT: Duration = Duration::from_secs(10);

/// A table the tests write to after the statements under test: its commit marks the end of
/// what those statements produced.
const MARKER_SCHEMA: &str = "create table marker (id serial primary key);\n";

/// A follower running in a task, its events in a channel.
struct Running {
    slot: String,
    events: mpsc::UnboundedReceiver<WalEvent>,
    stop: CancellationToken,
    task: JoinHandle<Result<(), WalError>>,
    /// Every event received so far, in order.
    seen: Vec<WalEvent>,
}

fn start(port: u16, user: &str, password: &str) -> Running {
    static N: AtomicUsize = AtomicUsize::new(0);
    let slot = slot_name(N.fetch_add(1, Ordering::Relaxed));
    let (tx, events) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let (addr, user, password, slot_, stop_) = (
        format!("127.0.0.1:{port}"),
        user.to_owned(),
        password.to_owned(),
        slot.clone(),
        stop.clone(),
    );
    let task = tokio::spawn(async move {
        let follower = WalFollower {
            addr: &addr,
            user: &user,
            password: &password,
            database: DB,
            slot: &slot_,
            timeout: FOLLOWER_TIMEOUT,
        };
        follower
            .run(&TcpConnector, stop_, move |event| {
                let _ = tx.send(event);
            })
            .await
    });
    Running {
        slot,
        events,
        stop,
        task,
        seen: Vec::new(),
    }
}

impl Running {
    /// The next event, within `WAIT`.
    async fn next(&mut self) -> WalEvent {
        let event = tokio::time::timeout(WAIT, self.events.recv())
            .await
            .unwrap_or_else(|_| panic!("no event within {WAIT:?}; seen: {:?}", self.seen))
            .unwrap_or_else(|| panic!("the follower ended; seen: {:?}", self.seen));
        self.seen.push(event.clone());
        event
    }

    /// Waits for the first event, which must be `Consistent`; returns its position.
    async fn consistent(&mut self) -> u64 {
        match self.next().await {
            WalEvent::Consistent { position } => position,
            other => panic!("first event {other:?}, expected Consistent"),
        }
    }

    /// Commits a row to `marker` and returns every commit reported up to and including
    /// the marker's, as (position, tables, unknown).
    async fn commits_until_marker(
        &mut self,
        cluster: &Cluster,
    ) -> Vec<(u64, BTreeSet<(String, String)>, bool)> {
        cluster.psql_admin(cluster.primary_port(), "insert into marker default values");
        let mut commits = Vec::new();
        loop {
            if let WalEvent::Commit {
                position,
                tables,
                unknown,
            } = self.next().await
            {
                let set: BTreeSet<_> = tables.iter().cloned().collect();
                assert_eq!(
                    set.len(),
                    tables.len(),
                    "tables not deduplicated: {tables:?}"
                );
                let is_marker = set.contains(&table("public", "marker"));
                commits.push((position, set, unknown));
                if is_marker {
                    return commits;
                }
            }
        }
    }

    /// Cancels `stop` and waits for `run` to return.
    async fn stop(self) -> Result<(), WalError> {
        self.stop.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("run returns after stop")
            .expect("the follower task does not panic")
    }
}

fn table(schema: &str, name: &str) -> (String, String) {
    (schema.to_owned(), name.to_owned())
}

fn tables(list: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    list.iter().map(|(s, n)| table(s, n)).collect()
}

/// The primary's current insert position, as a number.
fn insert_position(cluster: &Cluster) -> u64 {
    cluster
        .psql_admin(
            cluster.primary_port(),
            "select (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::int8",
        )
        .parse()
        .expect("a position")
}

/// Positions never go back, whatever the kind of event.
fn assert_ordered(events: &[WalEvent]) {
    let positions: Vec<u64> = events
        .iter()
        .map(|e| match e {
            WalEvent::Consistent { position }
            | WalEvent::Commit { position, .. }
            | WalEvent::Position(position) => *position,
        })
        .collect();
    assert!(
        positions.windows(2).all(|w| w[0] <= w[1]),
        "positions out of order: {events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_commit_per_transaction_with_all_its_tables() {
    let cluster = Cluster::start_with_schema(
        0,
        &format!(
            "{MARKER_SCHEMA}\
             create table t_a (id int primary key, v text);\n\
             create table t_b (id int primary key, v text);\n"
        ),
    );
    let port = cluster.primary_port();
    let mut follower = start(port, WAL_USER, WAL_PASSWORD);
    let consistent = follower.consistent().await;

    let before = insert_position(&cluster);
    cluster.psql_admin(
        port,
        "begin;\n\
         insert into t_a values (1, 'x'), (2, 'y');\n\
         update t_a set v = 'z' where id = 1;\n\
         delete from t_a where id = 2;\n\
         insert into t_b values (1, 'b');\n\
         truncate t_b;\n\
         commit;",
    );
    let after = insert_position(&cluster);
    cluster.psql_admin(
        port,
        "begin; insert into t_a values (3, 'gone'); delete from t_b; rollback;",
    );
    let commits = follower.commits_until_marker(&cluster).await;
    assert_eq!(
        commits.len(),
        2,
        "one commit, then the marker's: {commits:?}"
    );
    let (position, changed, unknown) = &commits[0];
    assert_eq!(*changed, tables(&[("public", "t_a"), ("public", "t_b")]));
    assert!(!unknown);
    assert!(
        *position > before && *position <= after && *position > consistent,
        "commit position {position} not in ({before}, {after}] or before the consistent point {consistent}"
    );

    // TRUNCATE of several tables in one statement.
    cluster.psql_admin(port, "insert into t_a values (9, 'x'); truncate t_a, t_b;");
    let commits = follower.commits_until_marker(&cluster).await;
    assert_eq!(commits.len(), 3, "{commits:?}");
    assert_eq!(commits[0].1, tables(&[("public", "t_a")]));
    assert_eq!(
        commits[1].1,
        tables(&[("public", "t_a"), ("public", "t_b")])
    );
    assert!(commits.iter().all(|(_, _, unknown)| !unknown));

    assert_ordered(&follower.seen);
    follower.stop().await.expect("a clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_by_triggers_and_functions_are_reported() {
    let cluster = Cluster::start_with_schema(
        0,
        &format!(
            "{MARKER_SCHEMA}\
             create table src (id int);\n\
             create table audit (id int);\n\
             create table via_fn (id int);\n\
             create function audit_it() returns trigger language plpgsql as \
             $$ begin insert into audit values (new.id); return new; end $$;\n\
             create trigger audit_src after insert on src for each row execute function audit_it();\n\
             create function write_it() returns int language sql as \
             $$ insert into via_fn values (1) returning id $$;\n"
        ),
    );
    let port = cluster.primary_port();
    let mut follower = start(port, WAL_USER, WAL_PASSWORD);
    follower.consistent().await;

    cluster.psql_admin(port, "insert into src values (1)");
    cluster.psql_admin(port, "select write_it()");
    let commits = follower.commits_until_marker(&cluster).await;
    assert_eq!(commits.len(), 3, "{commits:?}");
    assert_eq!(
        commits[0].1,
        tables(&[("public", "src"), ("public", "audit")])
    );
    assert_eq!(commits[1].1, tables(&[("public", "via_fn")]));
    assert!(commits.iter().all(|(_, _, unknown)| !unknown));
    follower.stop().await.expect("a clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_is_reported_with_its_ancestors() {
    let cluster = Cluster::start_with_schema(
        0,
        &format!(
            "{MARKER_SCHEMA}\
             create table parted (id int, kind text) partition by range (id);\n\
             create table parted_low partition of parted for values from (0) to (100);\n\
             create table parted_high partition of parted for values from (100) to (200) \
             partition by list (kind);\n\
             create table parted_high_a partition of parted_high for values in ('a');\n\
             create table parted_high_b partition of parted_high for values in ('b');\n"
        ),
    );
    let port = cluster.primary_port();
    let mut follower = start(port, WAL_USER, WAL_PASSWORD);
    follower.consistent().await;

    cluster.psql_admin(port, "insert into parted values (5, 'a')");
    cluster.psql_admin(port, "insert into parted values (150, 'b')");
    // The second time, the ancestors come from what the follower remembered.
    cluster.psql_admin(port, "update parted set kind = 'b' where id = 5");
    let commits = follower.commits_until_marker(&cluster).await;
    assert_eq!(commits.len(), 4, "{commits:?}");
    assert_eq!(
        commits[0].1,
        tables(&[("public", "parted_low"), ("public", "parted")])
    );
    assert_eq!(
        commits[1].1,
        tables(&[
            ("public", "parted_high_b"),
            ("public", "parted_high"),
            ("public", "parted")
        ])
    );
    assert_eq!(commits[2].1, commits[0].1);
    assert!(commits.iter().all(|(_, _, unknown)| !unknown));
    follower.stop().await.expect("a clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quoted_names_are_reported_exactly() {
    let cluster = Cluster::start_with_schema(
        0,
        &format!(
            "{MARKER_SCHEMA}\
             create schema \"My Schema\";\n\
             create table \"My Schema\".\"Odd.Name: x\" (id int);\n\
             create table \"My Schema\".\"we\"\"ird, t\" (id int);\n\
             create table public.\"Grüße\" (id int);\n"
        ),
    );
    let port = cluster.primary_port();
    let mut follower = start(port, WAL_USER, WAL_PASSWORD);
    follower.consistent().await;

    cluster.psql_admin(
        port,
        "begin;\n\
         insert into \"My Schema\".\"Odd.Name: x\" values (1);\n\
         insert into \"My Schema\".\"we\"\"ird, t\" values (1);\n\
         insert into \"Grüße\" values (1);\n\
         commit;",
    );
    cluster.psql_admin(
        port,
        "truncate \"My Schema\".\"Odd.Name: x\", \"My Schema\".\"we\"\"ird, t\"",
    );
    let commits = follower.commits_until_marker(&cluster).await;
    assert_eq!(commits.len(), 3, "{commits:?}");
    assert_eq!(
        commits[0].1,
        tables(&[
            ("My Schema", "Odd.Name: x"),
            ("My Schema", "we\"ird, t"),
            ("public", "Grüße")
        ])
    );
    assert_eq!(
        commits[1].1,
        tables(&[("My Schema", "Odd.Name: x"), ("My Schema", "we\"ird, t")])
    );
    assert!(commits.iter().all(|(_, _, unknown)| !unknown));
    follower.stop().await.expect("a clean stop");
}

/// `temporary|confirmed_flush_lsn as a number` of the slot, or `None` if it does not exist.
fn slot_state(cluster: &Cluster, slot: &str) -> Option<(bool, u64)> {
    let out = cluster.psql_admin(
        cluster.primary_port(),
        &format!(
            "select temporary, (confirmed_flush_lsn - '0/0'::pg_lsn)::int8 \
             from pg_replication_slots where slot_name = '{slot}'"
        ),
    );
    let (temporary, confirmed) = out.split_once('|')?;
    Some((temporary == "t", confirmed.parse().expect("a position")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slot_is_temporary_confirmed_promptly_and_gone_after_stop() {
    let cluster = Cluster::start_with_schema(0, MARKER_SCHEMA);
    let port = cluster.primary_port();
    let mut follower = start(port, WAL_USER, WAL_PASSWORD);
    let consistent = follower.consistent().await;
    let slot = follower.slot.clone();

    let (temporary, _) = slot_state(&cluster, &slot).expect("the slot exists while running");
    assert!(temporary, "the slot is temporary");

    cluster.psql_admin(port, "insert into marker default values");
    let written = insert_position(&cluster);
    assert!(written > consistent);
    // Well under the 10 s periodic update: confirmed because the position advanced.
    eventually(
        "the slot to confirm past the write",
        Duration::from_secs(5),
        async || match slot_state(&cluster, &slot) {
            Some((_, confirmed)) if confirmed >= written => Ok(()),
            other => Err(format!("slot {other:?}, write at {written}")),
        },
    )
    .await;
    // The follower got there through the commit (events are reported before confirmed).
    let commits = follower.commits_until_marker(&cluster).await;
    assert!(commits[0].0 <= written, "{commits:?}");

    follower.stop().await.expect("a clean stop");
    eventually(
        "the temporary slot to go",
        Duration::from_secs(5),
        async || match slot_state(&cluster, &slot) {
            None => Ok(()),
            Some(state) => Err(format!("still there: {state:?}")),
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_without_logical_wal_is_refused() {
    let cluster = Cluster::start_with_conf(0, "wal_level = replica\n");
    let port = cluster.primary_port();
    assert_eq!(cluster.psql_admin(port, "show wal_level"), "replica");
    let follower = start(port, WAL_USER, WAL_PASSWORD);
    let result = tokio::time::timeout(WAIT, follower.task)
        .await
        .expect("run returns")
        .expect("no panic");
    match result {
        Err(WalError::NotLogical { wal_level }) => assert_eq!(wal_level, "replica"),
        other => panic!("expected NotLogical, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_an_error_not_a_hang() {
    let cluster = Cluster::start(0);
    let follower = start(cluster.primary_port(), WAL_USER, "not-the-password");
    let result = tokio::time::timeout(FOLLOWER_TIMEOUT, follower.task)
        .await
        .expect("run returns before its own timeout")
        .expect("no panic");
    match result {
        Err(ref e @ WalError::Server { ref code, .. }) => {
            assert_eq!(code, "28P01", "{e}");
            assert!(!e.is_retryable());
            assert!(!e.to_string().contains("not-the-password"), "{e}");
        }
        other => panic!("expected an authentication error, got {other:?}"),
    }
}
