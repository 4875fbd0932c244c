//! Static topology: roles found with `pg_is_in_recovery()`, health checks every
//! `health_interval`, replicas leaving and rejoining the rotation, reads spread over replicas.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test step that cannot go on fails the test, with its message"
)]

mod common;

use std::collections::BTreeMap;

use common::*;
use tokio_postgres::Client;

/// Ports that served `n` plain reads, spread over `clients`.
async fn read_ports(clients: &[Client], n: usize) -> BTreeMap<u16, usize> {
    let mut count = BTreeMap::new();
    for i in 0..n {
        *count
            .entry(served_by(&clients[i % clients.len()]).await)
            .or_insert(0) += 1;
    }
    count
}

fn names(cluster: &Cluster, count: &BTreeMap<u16, usize>) -> Vec<String> {
    count
        .iter()
        .map(|(p, n)| format!("{} x{n}", cluster.name_of(*p)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_spread_across_replicas() {
    let cluster = Cluster::start(2);
    let gw = Gateway::start(&cluster);
    gw.wait_for_replica_reads(&cluster).await;

    // Both replicas have to be found healthy; then 40 reads from 4 clients hit both.
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(connect(gw.port(), APP_USER, APP_PASSWORD).await);
    }
    let replicas = port_set(cluster.replica_ports());
    let count = eventually("reads to reach both replicas", WAIT, async || {
        let count = read_ports(&clients, 40).await;
        if port_set(count.keys().copied()) == replicas {
            Ok(count)
        } else {
            Err(format!("{:?}", names(&cluster, &count)))
        }
    })
    .await;
    assert!(
        !count.contains_key(&cluster.primary_port()),
        "plain reads went to the primary although both replicas are up: {:?}",
        names(&cluster, &count)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_usable_replica_reads_go_to_the_primary() {
    let cluster = Cluster::start(0);
    let gw = Gateway::start(&cluster);
    let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    for _ in 0..5 {
        assert_eq!(served_by(&client).await, cluster.primary_port());
    }
    let rows = simple_rows(&client, "select pg_is_in_recovery()")
        .await
        .unwrap();
    assert_eq!(rows[0][0].as_deref(), Some("f"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_replica_leaves_the_rotation_and_comes_back() {
    let mut cluster = Cluster::start(1);
    cluster.psql_admin(
        cluster.primary_port(),
        "SET ROLE app; CREATE TABLE items (id int);",
    );
    cluster.wait_replay();
    let gw = Gateway::start(&cluster);
    gw.wait_for_replica_reads(&cluster).await;
    let primary = cluster.primary_port();
    let replica = cluster.replica_ports()[0];
    let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    assert_eq!(served_by(&client).await, replica);

    cluster.stop_replica(0);

    // Within a few health intervals reads are answered by the primary (a read that was in
    // flight when the replica went down may fail; that is tolerated while waiting).
    eventually(
        "reads to move to the primary after the replica stopped",
        WAIT,
        async || match try_served_by(&client).await {
            Ok(p) if p == primary => Ok(()),
            Ok(p) => Err(format!("served by {}", cluster.name_of(p))),
            Err(e) => Err(describe_error(&e)),
        },
    )
    .await;
    // From then on, every read succeeds on the primary, for old and new clients alike.
    let fresh = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    for (i, c) in [&client, &fresh].into_iter().cycle().take(10).enumerate() {
        let port = try_served_by(c)
            .await
            .unwrap_or_else(|e| panic!("read {i} with the replica down: {}", describe_error(&e)));
        assert_eq!(port, primary, "read {i} with the replica down");
    }
    // Writes are unaffected.
    fresh
        .batch_execute("insert into items values (1)")
        .await
        .unwrap_or_else(|e| panic!("write with the replica down: {}", describe_error(&e)));

    cluster.start_replica(0);

    // The replica is used again once it is healthy, without restarting pgway.
    eventually(
        "reads to return to the restarted replica",
        WAIT,
        async || match try_served_by(&client).await {
            Ok(p) if p == replica => Ok(()),
            Ok(p) => Err(format!("served by {}", cluster.name_of(p))),
            Err(e) => Err(describe_error(&e)),
        },
    )
    .await;
    cluster.wait_replay();
    let rows = simple_rows(&fresh, "select count(*), inet_server_port() from items")
        .await
        .expect("read after the replica came back");
    assert_eq!(rows[0][0].as_deref(), Some("1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_replicas_a_stopped_one_is_skipped() {
    let mut cluster = Cluster::start(2);
    let gw = Gateway::start(&cluster);
    gw.wait_for_replica_reads(&cluster).await;
    let [r0, r1] = cluster.replica_ports()[..] else {
        unreachable!()
    };
    let clients = vec![
        connect(gw.port(), APP_USER, APP_PASSWORD).await,
        connect(gw.port(), APP_USER, APP_PASSWORD).await,
    ];

    cluster.stop_replica(0);

    // Eventually 20 reads in a row all succeed, none on the stopped replica ...
    let count = eventually("reads to avoid the stopped replica", WAIT, async || {
        let mut count = BTreeMap::new();
        for i in 0..20 {
            match try_served_by(&clients[i % 2]).await {
                Ok(p) => *count.entry(p).or_insert(0usize) += 1,
                Err(e) => return Err(describe_error(&e)),
            }
        }
        if count.contains_key(&r0) {
            Err(format!("{:?}", names(&cluster, &count)))
        } else {
            Ok(count)
        }
    })
    .await;
    // ... and they stay on the other replica rather than the primary.
    assert_eq!(
        port_set(count.keys().copied()),
        port_set([r1]),
        "with one of two replicas down, reads belong on the other replica: {:?}",
        names(&cluster, &count)
    );

    cluster.start_replica(0);
    eventually(
        "reads to reach the restarted replica again",
        WAIT,
        async || {
            let count = read_ports(&clients, 20).await;
            if count.contains_key(&r0) {
                Ok(())
            } else {
                Err(format!("{:?}", names(&cluster, &count)))
            }
        },
    )
    .await;
}

/// A promoted replica becomes the primary without a restart of pgway, and a write sent while
/// there is no primary waits for one instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_replica_takes_the_writes() {
    let mut cluster = Cluster::start(1);
    cluster.psql_admin(
        cluster.primary_port(),
        "SET ROLE app; CREATE TABLE items (id int);",
    );
    cluster.wait_replay();
    let gw = Gateway::start(&cluster);
    gw.wait_for_replica_reads(&cluster).await;
    let replica = cluster.replica_ports()[0];
    let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    let port_of_write = "insert into items values (1) returning inet_server_port()";
    let rows = simple_rows(&client, port_of_write).await.unwrap();
    assert_eq!(
        rows[0][0].as_deref(),
        Some(cluster.primary_port().to_string().as_str())
    );

    cluster.stop_primary();
    // This write finds no primary: it waits (topology.failover_timeout, 30 s by default)
    // while the replica is promoted, then runs there.
    let writer = {
        let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
        tokio::spawn(async move {
            simple_rows(
                &client,
                "insert into items values (2) returning inet_server_port()",
            )
            .await
            .map(|rows| rows[0][0].clone())
            .map_err(|e| describe_error(&e))
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    cluster.promote_replica(0);
    let answered = writer.await.unwrap();
    assert_eq!(answered, Ok(Some(replica.to_string())), "the waiting write");
    let rows = simple_rows(&client, port_of_write).await.unwrap();
    assert_eq!(rows[0][0].as_deref(), Some(replica.to_string().as_str()));
    let rows = simple_rows(&client, "select count(*) from items")
        .await
        .unwrap();
    assert_eq!(rows[0][0].as_deref(), Some("3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_and_removes_a_replica() {
    let cluster = Cluster::start(1);
    let replica = cluster.replica_ports()[0];
    let full = gateway_toml(
        &cluster,
        "LISTEN",
        "127.0.0.1:0",
        &GatewayOptions::default(),
    )
    .replace(
        &format!("password = \"{APP_PASSWORD}\"\n"),
        &format!("password = \"{APP_PASSWORD}\"\nadmin = true\n"),
    );
    let primary_only = full.replace(&format!(", \"127.0.0.1:{replica}\""), "");
    assert_ne!(primary_only, full, "the replica is in the node list");
    let gw = Gateway::start_toml(|listen| primary_only.replace("LISTEN", listen));
    let listen = format!("127.0.0.1:{}", gw.port());
    let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    for _ in 0..5 {
        assert_eq!(served_by(&client).await, cluster.primary_port());
    }

    // The replica joins the node list: once checked, it takes the reads.
    gw.reload(&full.replace("LISTEN", &listen), APP_USER, APP_PASSWORD)
        .await
        .expect("RELOAD with the replica");
    eventually("reads to reach the added replica", WAIT, async || {
        let port = served_by(&client).await;
        (port == replica)
            .then_some(())
            .ok_or(format!("served by {port}"))
    })
    .await;

    // And leaves it again: reads go back to the primary, on the same client.
    gw.reload(
        &primary_only.replace("LISTEN", &listen),
        APP_USER,
        APP_PASSWORD,
    )
    .await
    .expect("RELOAD without the replica");
    eventually("reads to leave the removed replica", WAIT, async || {
        let ports = read_ports(std::slice::from_ref(&client), 5).await;
        (ports.keys().eq([&cluster.primary_port()]))
            .then_some(())
            .ok_or(format!("{:?}", names(&cluster, &ports)))
    })
    .await;
}
