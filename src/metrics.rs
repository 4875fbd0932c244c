//! Prometheus metrics (`GET /metrics` on the admin port), with `prometheus-client`.
//!
//! What pgway counts on its own paths lives here ([`Metrics`]): statements by where they
//! were answered, errors sent to clients by SQLSTATE class, pool waits, client
//! connections, failovers and time without a primary. The rest is read when scraped from
//! where it is kept anyway ([`Sources`]): read-your-writes outcomes, replica retries, the
//! result cache's counters and each pool's server connections. Names and units follow
//! Prometheus conventions (`_total` counters, `_seconds`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::backend::Pools;
use crate::cache::ResultCache;
use crate::route::Router;
use crate::sync::lock;
use crate::topology::replay::ReplayPositions;

/// Upper bounds of the pool-wait histogram's buckets, in seconds.
const WAIT_BUCKETS: [f64; 12] = [
    0.0, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
];

/// Where a statement was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The primary.
    Primary,
    /// A replica.
    Replica,
    /// The result cache.
    Cache,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabels {
    class: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectionLabels {
    node: String,
    state: &'static str,
}

/// How long clients waited for a pool slot: a histogram kept in atomics, so an observation
/// takes no lock. Most take a free slot at once: those each pool counts under the lock it
/// takes anyway (`crate::backend::Pools::taken_at_once`), and they join the first bucket
/// when the histogram is read.
#[derive(Debug, Default)]
pub struct WaitHistogram {
    /// Per bucket (not cumulative); the last is `+Inf`.
    buckets: [AtomicU64; WAIT_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl WaitHistogram {
    /// A client waited `waited`.
    pub fn observe(&self, waited: Duration) {
        let seconds = waited.as_secs_f64();
        let at = WAIT_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(WAIT_BUCKETS.len());
        self.buckets[at].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Sum, count and buckets, with `at_once` more waits of zero.
    fn snapshot(&self, at_once: u64) -> (f64, u64, Vec<(f64, u64)>) {
        let mut counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        counts[0] += at_once;
        let buckets = WAIT_BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(counts.iter().copied())
            .collect();
        let sum = Duration::from_nanos(self.sum_nanos.load(Ordering::Relaxed)).as_secs_f64();
        (sum, counts.iter().sum(), buckets)
    }
}

/// Time without a primary: closed spans, and the start of the open one.
#[derive(Debug, Default)]
struct Outage {
    closed: Duration,
    since: Option<Instant>,
}

/// Requests answered, by [`Route`]: a row of counters per thread that answered any, each
/// written by its own thread alone (a plain load and store per request, where one counter
/// for all would be an atomic add on a line that every worker writes) and added up when
/// scraped. A thread's row is the last [`Metrics`] it counted for (one per process but in
/// tests); rows stay with their `Metrics`, so no count is lost.
#[derive(Debug)]
struct Queries {
    /// Which `Metrics` these are, for a thread's row.
    id: u64,
    rows: Mutex<Vec<Arc<QueryRow>>>,
}

#[derive(Debug, Default)]
struct QueryRow([AtomicU64; 3]);

/// Adds `n` to a counter that only the calling thread writes (others only read it): a
/// plain load and store, no atomic read-modify-write (a locked instruction, a full
/// barrier on x86) on the statement path.
#[inline]
pub(crate) fn bump(counter: &AtomicU64, n: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(n),
        Ordering::Relaxed,
    );
}

/// Numbers the [`Queries`] of each `Metrics`.
static QUERY_COUNTS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// This thread's row, and the [`Queries::id`] it belongs to.
    static QUERY_ROW: std::cell::RefCell<Option<(u64, Arc<QueryRow>)>> =
        const { std::cell::RefCell::new(None) };
}

impl Queries {
    fn new() -> Self {
        Self {
            id: QUERY_COUNTS.fetch_add(1, Ordering::Relaxed),
            rows: Mutex::new(Vec::new()),
        }
    }

    #[inline]
    fn count(&self, route: Route) {
        QUERY_ROW.with_borrow_mut(|row| {
            if !matches!(row, Some((id, _)) if *id == self.id) {
                let fresh = Arc::new(QueryRow::default());
                lock(&self.rows).push(Arc::clone(&fresh));
                *row = Some((self.id, fresh));
            }
            if let Some((_, row)) = row {
                bump(&row.0[route as usize], 1);
            }
        });
    }

    fn get(&self, route: Route) -> u64 {
        lock(&self.rows)
            .iter()
            .map(|row| row.0[route as usize].load(Ordering::Relaxed))
            .sum()
    }
}

/// What pgway counts itself.
#[derive(Debug)]
pub struct Metrics {
    queries: Queries,
    errors: Family<ClassLabels, Counter>,
    clients: Gauge,
    failovers: Counter,
    outage: Mutex<Outage>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Zeroed counters.
    pub fn new() -> Self {
        Self {
            queries: Queries::new(),
            errors: Family::default(),
            clients: Gauge::default(),
            failovers: Counter::default(),
            outage: Mutex::new(Outage::default()),
        }
    }

    /// A request was answered by `route`.
    pub fn query(&self, route: Route) {
        self.queries.count(route);
    }

    /// An ErrorResponse with `sqlstate` went to a client.
    pub fn error(&self, sqlstate: &str) {
        let class = sqlstate.get(..2).unwrap_or("??").to_owned();
        self.errors.get_or_create(&ClassLabels { class }).inc();
    }

    /// A client connected (`+1`) or left (`-1`).
    pub fn client(&self, delta: i64) {
        self.clients.inc_by(delta);
    }

    /// A new primary took over.
    pub fn failover(&self) {
        self.failovers.inc();
    }

    /// Whether the topology has a primary now (called on every topology change).
    pub fn primary_present(&self, present: bool) {
        let mut outage = lock(&self.outage);
        match (present, outage.since) {
            (true, Some(since)) => {
                outage.closed += since.elapsed();
                outage.since = None;
            }
            (false, None) => outage.since = Some(Instant::now()),
            _ => {}
        }
    }

    fn no_primary_seconds(&self) -> f64 {
        let outage = lock(&self.outage);
        let open = outage
            .since
            .map(|since| since.elapsed())
            .unwrap_or_default();
        (outage.closed + open).as_secs_f64()
    }
}

/// What the scrape reads from elsewhere.
#[derive(Debug, Clone)]
pub struct Sources {
    /// pgway's own counters.
    pub metrics: Arc<Metrics>,
    /// Read-your-writes outcomes.
    pub replay: Arc<ReplayPositions>,
    /// Replica retries.
    pub router: Arc<Router>,
    /// Server connections.
    pub pools: Arc<Pools>,
    /// The result cache, when on.
    pub cache: Option<Arc<ResultCache>>,
    /// The workers' sessions.
    pub placement: Arc<crate::workers::Placement>,
}

/// The registry `/metrics` encodes: everything is read from `sources` when scraped.
pub fn registry(sources: Sources) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(sources));
    registry
}

impl Collector for Sources {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = &self.metrics;
        counter_family(
            &mut encoder,
            "pgway_queries",
            "Requests answered, by where: the primary, a replica, or the result cache.",
            [Route::Primary, Route::Replica, Route::Cache]
                .iter()
                .map(|r| {
                    let route = match r {
                        Route::Primary => "primary",
                        Route::Replica => "replica",
                        Route::Cache => "cache",
                    };
                    (RouteLabels { route }, m.queries.get(*r))
                }),
        )?;
        let outcomes = self
            .replay
            .outcomes()
            .map(|(outcome, n)| (OutcomeLabels { outcome }, n));
        counter_family(
            &mut encoder,
            "pgway_read_your_writes",
            "Reads under a read-your-writes floor, by who served them.",
            outcomes.into_iter(),
        )?;
        m.errors.encode(encoder.encode_descriptor(
            "pgway_errors",
            "ErrorResponses sent to clients, by SQLSTATE class.",
            None,
            MetricType::Counter,
        )?)?;
        let (sum, count, buckets) = self.pools.waits().snapshot(self.pools.taken_at_once());
        encoder
            .encode_descriptor(
                "pgway_pool_wait_seconds",
                "How long clients waited for a server connection slot.",
                None,
                MetricType::Histogram,
            )?
            .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        let connections = self.pools.connections();
        let mut per_node: Vec<(ConnectionLabels, i64)> = Vec::new();
        for (node, active, idle) in connections {
            for (state, n) in [("active", active), ("idle", idle)] {
                let labels = ConnectionLabels {
                    node: node.clone(),
                    state,
                };
                match per_node.iter_mut().find(|(l, _)| *l == labels) {
                    Some((_, total)) => *total += n,
                    None => per_node.push((labels, n)),
                }
            }
        }
        let mut family = encoder.encode_descriptor(
            "pgway_server_connections",
            "Server connections, by node and state.",
            None,
            MetricType::Gauge,
        )?;
        for (labels, n) in &per_node {
            ConstGauge::new(*n).encode(family.encode_family(labels)?)?;
        }
        gauge(
            &mut encoder,
            "pgway_client_connections",
            "Clients connected.",
            m.clients.get(),
        )?;
        self.encode_workers(&mut encoder)?;
        counter(
            &mut encoder,
            "pgway_failovers",
            "Times a new primary took over.",
            m.failovers.get(),
        )?;
        let no_primary = ConstCounter::new(m.no_primary_seconds());
        no_primary.encode(encoder.encode_descriptor(
            "pgway_no_primary_seconds",
            "Time the topology had no primary.",
            None,
            no_primary.metric_type(),
        )?)?;
        counter(
            &mut encoder,
            "pgway_replica_retries",
            "Statements a replica refused, sent again to the primary.",
            self.router.replica_retries(),
        )?;
        counter(
            &mut encoder,
            "pgway_recovery_conflict_retries",
            "Reads a replica cancelled for a conflict with recovery, sent again to the primary.",
            self.router.conflict_retries(),
        )?;
        if let Some(cache) = &self.cache {
            let stats = cache.stats();
            let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
            for (name, help, value) in [
                (
                    "pgway_cache_hits",
                    "Reads answered from the result cache.",
                    load(&stats.hits),
                ),
                (
                    "pgway_cache_misses",
                    "Cacheable reads sent to a server to fill an entry.",
                    load(&stats.misses),
                ),
                (
                    "pgway_cache_bypassed",
                    "Cacheable reads sent to a server while the cache could not serve them.",
                    load(&stats.bypassed),
                ),
                (
                    "pgway_cache_evictions",
                    "Entries evicted for room.",
                    load(&stats.evictions),
                ),
                (
                    "pgway_cache_invalidations",
                    "Table changes (and whole-database drops) applied to the cache.",
                    load(&stats.invalidations),
                ),
                (
                    "pgway_cache_fills_refused",
                    "Results not kept (failed, too large, or a table changed meanwhile).",
                    load(&stats.fills_refused),
                ),
            ] {
                counter(&mut encoder, name, help, value)?;
            }
            let (entries, bytes) = cache.size();
            gauge(
                &mut encoder,
                "pgway_cache_entries",
                "Entries in the result cache.",
                i64::try_from(entries).unwrap_or(i64::MAX),
            )?;
            gauge(
                &mut encoder,
                "pgway_cache_bytes",
                "Memory the result cache's entries take.",
                i64::try_from(bytes).unwrap_or(i64::MAX),
            )?;
        }
        Ok(())
    }
}

impl Sources {
    /// `pgway_workers_active` and `pgway_worker_sessions`.
    fn encode_workers(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let placement = &self.placement;
        gauge(
            encoder,
            "pgway_workers_active",
            "Worker threads taking new client sessions (the others' sessions move to them).",
            i64::try_from(placement.active()).unwrap_or(i64::MAX),
        )?;
        let mut family = encoder.encode_descriptor(
            "pgway_worker_sessions",
            "Client sessions, by the worker thread that runs them.",
            None,
            MetricType::Gauge,
        )?;
        for (worker, sessions) in placement.sessions().into_iter().enumerate() {
            let labels = [("worker", worker.to_string())];
            ConstGauge::new(i64::try_from(sessions).unwrap_or(i64::MAX))
                .encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let counter = ConstCounter::new(value);
    counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    let gauge = ConstGauge::new(value);
    gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
}

fn counter_family<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: impl Iterator<Item = (L, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in values {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_fall_in_their_buckets() {
        let h = WaitHistogram::default();
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let (sum, count, buckets) = h.snapshot(1);
        assert_eq!(count, 3);
        assert!((sum - 60.003).abs() < 1e-6, "{sum}");
        assert_eq!(buckets[0], (0.0, 1));
        assert_eq!(buckets[4], (0.005, 1));
        assert_eq!(buckets.last(), Some(&(f64::INFINITY, 1)));
    }

    #[test]
    fn queries_counted_on_several_threads_and_for_two_metrics_add_up_apart() {
        let a = Metrics::new();
        let b = Metrics::new();
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    for _ in 0..100 {
                        a.query(Route::Replica);
                        b.query(Route::Primary);
                    }
                    a.query(Route::Cache);
                });
            }
        });
        a.query(Route::Replica);
        assert_eq!(a.queries.get(Route::Replica), 301);
        assert_eq!(a.queries.get(Route::Cache), 3);
        assert_eq!(a.queries.get(Route::Primary), 0);
        assert_eq!(b.queries.get(Route::Primary), 300);
        assert_eq!(b.queries.get(Route::Replica), 0);
    }

    #[test]
    fn time_without_a_primary_adds_up() {
        let m = Metrics::new();
        m.primary_present(false);
        std::thread::sleep(Duration::from_millis(20));
        m.primary_present(true);
        let closed = m.no_primary_seconds();
        assert!(closed >= 0.02, "{closed}");
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(m.no_primary_seconds(), closed, "no open span");
    }
}
