//! Route decision cost: parsing a statement the first time, and the cached decision for a
//! statement seen before (the target is at most 1 µs).
//!
//! Run: `cargo bench --bench route`

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use pgway::route::{classify, Catalog, Router};
use pgway::topology::TopologyHandle;

const SIMPLE: &str = "SELECT * FROM accounts WHERE id = $1";
/// What `pgbench -S` sends: its value differs on every call, so only the fast path serves it.
const PGBENCH_SELECT: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = 76543;";

const JOIN_20_LINES: &str = "WITH recent AS (
    SELECT o.account_id, max(o.created_at) AS last_order
    FROM orders o
    WHERE o.created_at > now() - interval '30 days'
    GROUP BY o.account_id
), totals AS (
    SELECT account_id, sum(amount) AS total
    FROM payments
    WHERE status = 'settled'
    GROUP BY account_id
)
SELECT a.id, a.email, r.last_order, coalesce(t.total, 0) AS total,
       u.name AS owner, g.name AS group_name
FROM accounts a
JOIN recent r ON r.account_id = a.id
LEFT JOIN totals t ON t.account_id = a.id
JOIN users u ON u.id = a.owner_id
LEFT JOIN user_groups ug ON ug.user_id = u.id
LEFT JOIN groups g ON g.id = ug.group_id
WHERE a.active AND lower(a.email) LIKE $1
ORDER BY r.last_order DESC LIMIT 50";

fn router() -> Router {
    let topology = TopologyHandle::new(&["127.0.0.1:1".to_owned()]);
    Router::new(Catalog::new(
        topology,
        pgway::route::catalog::Credentials::default(),
        Duration::from_millis(10),
    ))
}

fn bench_route(c: &mut Criterion) {
    c.bench_function("classify/simple/first", |b| {
        b.iter(|| classify(black_box(SIMPLE)))
    });
    c.bench_function("classify/join_20_lines/first", |b| {
        b.iter(|| classify(black_box(JOIN_20_LINES)))
    });
    c.bench_function("fast/pgbench_select", |b| {
        b.iter(|| pgway::route::fast::is_plain_select(black_box(PGBENCH_SELECT.as_bytes())))
    });
    let router = router();
    router.classification(SIMPLE);
    router.classification(JOIN_20_LINES);
    c.bench_function("route/simple/cached", |b| {
        b.iter(|| router.classification(black_box(SIMPLE)))
    });
    c.bench_function("route/join_20_lines/cached", |b| {
        b.iter(|| router.classification(black_box(JOIN_20_LINES)))
    });
}

criterion_group!(benches, bench_route);
criterion_main!(benches);
