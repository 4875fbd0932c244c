//! `/metrics`, `/ready` and `/topology` on the admin port, against real servers: the
//! counters a dashboard reads move as clients use pgway, and `/topology` names its source.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test step that cannot go on fails the test, with its message"
)]

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_as_clients_use_pgway() {
    let cluster = Cluster::start_with_schema(1, "SET ROLE app;\nCREATE TABLE t (i int);\n");
    let admin = free_loopback_port();
    let opts = GatewayOptions {
        extra: format!(
            "[cache]\nenabled = true\nwal_user = \"{WAL_USER}\"\nwal_password = \"{WAL_PASSWORD}\"\n\
             [[cache.rules]]\ntables = [\"public.t\"]\nttl = \"1h\"\n"
        ),
        ..GatewayOptions::default()
    };
    let gw = Gateway::start_with_admin(&cluster, opts, admin);
    gw.wait_for_replica_reads(&cluster).await;
    let ready = http_get(admin, "/ready").await.expect("GET /ready");
    assert!(
        ready.contains("200 OK") && ready.contains("ready"),
        "{ready}"
    );
    assert!(!ready.contains("etcd"), "{ready}");
    // A static topology says so, with no etcd watch.
    let topology = topology_json(admin).await;
    assert_eq!(topology["source"], "static", "{topology}");
    assert!(topology["etcd"].is_null(), "{topology}");
    assert_eq!(
        topology["nodes"].as_array().map(Vec::len),
        Some(2),
        "{topology}"
    );

    let before = scrape(admin).await;
    let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    client
        .batch_execute("insert into t values (1)")
        .await
        .expect("insert");
    for _ in 0..5 {
        client.simple_query("select 1").await.expect("a read");
    }
    // A cached read: filled once, then hits.
    eventually("cache hits", WAIT, async || {
        client
            .simple_query("select count(*) from t")
            .await
            .map_err(|e| describe_error(&e))?;
        let text = scrape(admin).await;
        match sample(&text, "pgway_cache_hits_total") {
            Some(n) if n >= 1.0 => Ok(()),
            other => Err(format!("hits {other:?}")),
        }
    })
    .await;
    let e = client
        .batch_execute("select * from no_such_table")
        .await
        .expect_err("an undefined table");
    assert_eq!(sqlstate(&e), "42P01");
    let after = scrape(admin).await;

    let grew = |series: &str, by: f64| {
        let (b, a) = (
            sample(&before, series).unwrap_or(0.0),
            sample(&after, series),
        );
        let a = a.unwrap_or_else(|| panic!("{series} missing from /metrics:\n{after}"));
        assert!(a >= b + by, "{series}: {b} -> {a}\n{after}");
    };
    grew("pgway_queries_total{route=\"replica\"}", 5.0);
    grew("pgway_queries_total{route=\"primary\"}", 1.0);
    grew("pgway_queries_total{route=\"cache\"}", 1.0);
    grew("pgway_errors_total{class=\"42\"}", 1.0);
    grew("pgway_pool_wait_seconds_count", 6.0);
    grew("pgway_cache_misses_total", 1.0);
    grew("pgway_read_your_writes_total{outcome=\"replica\"}", 0.0);
    assert_eq!(
        sample(&after, "pgway_client_connections"),
        Some(1.0),
        "{after}"
    );
    let primary = format!(
        "pgway_server_connections{{node=\"127.0.0.1:{}\",state=\"idle\"}}",
        cluster.primary_port()
    );
    assert!(
        sample(&after, &primary).is_some_and(|n| n >= 1.0),
        "{primary}\n{after}"
    );
    for name in [
        "pgway_failovers_total",
        "pgway_no_primary_seconds_total",
        "pgway_replica_retries_total",
        "pgway_cache_evictions_total",
        "pgway_cache_invalidations_total",
    ] {
        assert!(sample(&after, name).is_some(), "{name} missing:\n{after}");
    }
    assert!(
        after.contains("# TYPE pgway_pool_wait_seconds histogram"),
        "{after}"
    );
    drop(client);
    eventually("the client to be counted out", WAIT, async || match sample(
        &scrape(admin).await,
        "pgway_client_connections",
    ) {
        Some(n) if n < 0.5 => Ok(()),
        other => Err(format!("{other:?}")),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_says_what_is_degraded_and_failovers_are_counted() {
    let mut cluster = Cluster::start(1);
    let admin = free_loopback_port();
    let gw = Gateway::start_with_admin(&cluster, GatewayOptions::default(), admin);
    gw.wait_for_replica_reads(&cluster).await;
    // pgway must have seen the first primary: a promotion counts as a failover only
    // when the primary changes from one pgway knew.
    wait_for_new_primary(gw.port(), cluster.primary_port()).await;
    cluster.stop_primary();
    let body = eventually("/ready to say the primary is gone", WAIT, async || {
        let response = http_get(admin, "/ready").await?;
        if response.contains("no primary") {
            Ok(response)
        } else {
            Err(response)
        }
    })
    .await;
    assert!(body.contains("200 OK"), "reads still flow: {body}");
    eventually(
        "time without a primary to be counted",
        WAIT,
        async || match sample(&scrape(admin).await, "pgway_no_primary_seconds_total") {
            Some(n) if n > 0.0 => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    // The replica is promoted: a failover, and the primary is back.
    cluster.promote_replica(0);
    eventually("the failover to be counted", WAIT, async || {
        match sample(&scrape(admin).await, "pgway_failovers_total") {
            Some(n) if n >= 1.0 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    eventually("/ready to have a primary again", WAIT, async || {
        let response = http_get(admin, "/ready").await?;
        if response.contains("200 OK") && !response.contains("no primary") {
            Ok(())
        } else {
            Err(response)
        }
    })
    .await;
    cluster.stop_replica(0);
    let body = eventually("/ready to refuse", WAIT, async || {
        let response = http_get(admin, "/ready").await?;
        if response.contains("503") {
            Ok(response)
        } else {
            Err(response)
        }
    })
    .await;
    assert!(body.contains("no node is reachable"), "{body}");
}
