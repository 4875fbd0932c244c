//! Replay positions of replicas, learned on demand for read-your-writes.
//!
//! A read that must see WAL position P may go to a replica once that replica has replayed
//! P (`pg_last_wal_replay_lsn()`). pgway keeps the last position it learned per replica
//! and asks again only while some read is waiting: one prober per replica, on its own
//! control connection, queries back to back while there are waiters and sleeps otherwise,
//! so any number of waiting reads cost one query stream per replica, and reads that need
//! no position cost nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::health::{HealthSettings, LiveHealth};
use crate::backend::control;

/// The replay position query: bytes since `0/0`, NULL on a node that is not replaying.
const REPLAY_POSITION: &str = "select (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::int8";

/// The primary's current position: everything committed is below it.
const CURRENT_POSITION: &str = "select (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::int8";

/// Pause after a failed probe before the next attempt.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

/// One replica's known position and its prober's demand.
#[derive(Debug)]
struct Replica {
    /// The highest replay position seen (0: none yet).
    position: watch::Sender<u64>,
    /// Reads waiting for a higher position.
    waiters: AtomicUsize,
    /// Wakes the prober when the first read starts waiting.
    wanted: Notify,
    /// Bumped whenever any replica's position rises (shared by all of them).
    any_raised: Arc<watch::Sender<u64>>,
}

impl Replica {
    fn raise(&self, position: u64) {
        if self
            .position
            .send_if_modified(|known| raise(known, position))
        {
            self.any_raised.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

/// Look-ups of a primary's current position, shared: one query answers every read that
/// asked before it was sent.
#[derive(Debug)]
struct Primary {
    /// Look-ups asked for, numbered from 1.
    asked: AtomicU64,
    /// The number of the last look-up a query answered, and its answer.
    answered: watch::Sender<(u64, Option<u64>)>,
    /// Wakes the prober.
    wanted: Notify,
}

/// How reads under a floor were served: by a replica at once, by a replica after waiting
/// for it to replay, by the primary because no replica had caught up in time.
#[derive(Debug, Default)]
struct Outcomes {
    replica: AtomicU64,
    replica_after_wait: AtomicU64,
    primary: AtomicU64,
}

/// Replay positions of every replica pgway has needed one for, and current positions of
/// primaries for `pgway:fresh` reads.
pub struct ReplayPositions {
    outcomes: Outcomes,
    replicas: Mutex<HashMap<Arc<str>, Arc<Replica>>>,
    primaries: Mutex<HashMap<Arc<str>, Arc<Primary>>>,
    any_raised: Arc<watch::Sender<u64>>,
    settings: LiveHealth,
    tasks: TaskTracker,
    runtime: tokio::runtime::Handle,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for ReplayPositions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayPositions")
            .field("replicas", &self.replicas.lock().map(|r| r.len()).ok())
            .finish()
    }
}

/// Counts a waiting read while it lives.
struct Waiting(Arc<Replica>);

impl Waiting {
    fn new(replica: &Arc<Replica>) -> Self {
        if replica.waiters.fetch_add(1, Ordering::AcqRel) == 0 {
            replica.wanted.notify_one();
        }
        Self(Arc::clone(replica))
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.waiters.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ReplayPositions {
    /// Probers log in with `settings` (the health checks' credentials) and run on `tasks`
    /// in `runtime` until `shutdown`.
    pub fn new(
        settings: LiveHealth,
        tasks: TaskTracker,
        runtime: tokio::runtime::Handle,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            outcomes: Outcomes::default(),
            replicas: Mutex::new(HashMap::new()),
            primaries: Mutex::new(HashMap::new()),
            any_raised: Arc::new(watch::Sender::new(0)),
            settings,
            tasks,
            runtime,
            shutdown,
        }
    }

    /// Records a position learned elsewhere (a health check).
    pub fn observe(&self, addr: &str, position: u64) {
        if let Some(replica) = self.replica(addr, false) {
            replica.raise(position);
        }
    }

    /// Makes sure `addr` has its prober (which connects at once), so the first read that
    /// waits for it does not wait for a login too.
    pub fn prepare(&self, addr: &str) {
        self.replica(addr, true);
    }

    /// The last known replay position of `addr` (0 if none).
    pub fn known(&self, addr: &str) -> u64 {
        self.replica(addr, false)
            .map_or(0, |replica| *replica.position.borrow())
    }

    /// The first of `candidates` that has replayed `position`, waiting up to `wait` for
    /// one (and asking them meanwhile), and whether it had to wait. `None`: none got there
    /// in time.
    pub async fn first_at(
        &self,
        candidates: &[Arc<str>],
        position: u64,
        wait: Duration,
    ) -> Option<(Arc<str>, bool)> {
        let replica = self.find_at(candidates, position, wait).await;
        let counter = match &replica {
            Some((_, false)) => &self.outcomes.replica,
            Some((_, true)) => &self.outcomes.replica_after_wait,
            None => &self.outcomes.primary,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        replica
    }

    /// How reads under a floor were served so far.
    pub fn outcomes(&self) -> [(&'static str, u64); 3] {
        let o = &self.outcomes;
        [
            ("replica", o.replica.load(Ordering::Relaxed)),
            (
                "replica_after_wait",
                o.replica_after_wait.load(Ordering::Relaxed),
            ),
            ("primary", o.primary.load(Ordering::Relaxed)),
        ]
    }

    async fn find_at(
        &self,
        candidates: &[Arc<str>],
        position: u64,
        wait: Duration,
    ) -> Option<(Arc<str>, bool)> {
        let replicas: Vec<(Arc<str>, Arc<Replica>)> = candidates
            .iter()
            .filter_map(|addr| Some((Arc::clone(addr), self.replica(addr, true)?)))
            .collect();
        let reached = |replicas: &[(Arc<str>, Arc<Replica>)]| {
            replicas
                .iter()
                .find(|(_, r)| *r.position.borrow() >= position)
                .map(|(addr, _)| Arc::clone(addr))
        };
        if let Some(addr) = reached(&replicas) {
            return Some((addr, false));
        }
        if wait.is_zero() || replicas.is_empty() {
            return None;
        }
        let mut raised = self.any_raised.subscribe();
        let _waiting: Vec<Waiting> = replicas.iter().map(|(_, r)| Waiting::new(r)).collect();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(addr) = reached(&replicas) {
                return Some((addr, true));
            }
            match crate::timer::timeout_at(deadline, raised.changed()).await {
                Ok(Ok(())) => continue,
                _ => return reached(&replicas).map(|addr| (addr, true)),
            }
        }
    }

    /// The current WAL position of the primary at `addr`, from a look-up sent after this
    /// call began (so it covers every commit acknowledged before), waiting up to `wait`.
    pub async fn primary_position(&self, addr: &str, wait: Duration) -> Option<u64> {
        let primary = self.primary(addr)?;
        let mut answered = primary.answered.subscribe();
        let mine = primary.asked.fetch_add(1, Ordering::AcqRel) + 1;
        primary.wanted.notify_one();
        let answer = crate::timer::timeout(wait, answered.wait_for(|(n, _)| *n >= mine)).await;
        match answer {
            Ok(Ok(answer)) => answer.1,
            _ => None,
        }
    }

    fn primary(&self, addr: &str) -> Option<Arc<Primary>> {
        let mut primaries = self.primaries.lock().ok()?;
        if let Some(primary) = primaries.get(addr) {
            return Some(Arc::clone(primary));
        }
        let primary = Arc::new(Primary {
            asked: AtomicU64::new(0),
            answered: watch::Sender::new((0, None)),
            wanted: Notify::new(),
        });
        primaries.insert(Arc::from(addr), Arc::clone(&primary));
        let prober = look_up(
            addr.to_owned(),
            Arc::clone(&primary),
            Arc::clone(&self.settings),
            self.tasks.clone(),
            self.shutdown.clone(),
        );
        self.tasks.spawn_on(prober, &self.runtime);
        Some(primary)
    }

    /// The entry for `addr`, created (with its prober) when `create`.
    fn replica(&self, addr: &str, create: bool) -> Option<Arc<Replica>> {
        let mut replicas = self.replicas.lock().ok()?;
        if let Some(replica) = replicas.get(addr) {
            return Some(Arc::clone(replica));
        }
        if !create {
            return None;
        }
        let replica = Arc::new(Replica {
            position: watch::Sender::new(0),
            waiters: AtomicUsize::new(0),
            wanted: Notify::new(),
            any_raised: Arc::clone(&self.any_raised),
        });
        replicas.insert(Arc::from(addr), Arc::clone(&replica));
        let prober = probe(
            addr.to_owned(),
            Arc::clone(&replica),
            Arc::clone(&self.settings),
            self.tasks.clone(),
            self.shutdown.clone(),
        );
        self.tasks.spawn_on(prober, &self.runtime);
        Some(replica)
    }
}

/// Raises `known` to `position`; true if it changed.
fn raise(known: &mut u64, position: u64) -> bool {
    if position > *known {
        *known = position;
        true
    } else {
        false
    }
}

/// Asks `addr` for its replay position back to back while reads wait, until `shutdown`.
async fn probe(
    addr: String,
    replica: Arc<Replica>,
    settings: LiveHealth,
    tasks: TaskTracker,
    shutdown: CancellationToken,
) {
    let mut client: Option<tokio_postgres::Client> = None;
    // Connected (and a first position known) before any read needs one.
    if let Ok(Some(position)) = ask(
        &addr,
        REPLAY_POSITION,
        &settings.load_full(),
        &tasks,
        &mut client,
    )
    .await
    {
        replica.raise(position);
    }
    loop {
        if replica.waiters.load(Ordering::Acquire) == 0 {
            tokio::select! {
                () = replica.wanted.notified() => {}
                () = shutdown.cancelled() => return,
            }
        }
        if shutdown.is_cancelled() {
            return;
        }
        match ask(
            &addr,
            REPLAY_POSITION,
            &settings.load_full(),
            &tasks,
            &mut client,
        )
        .await
        {
            Ok(Some(position)) => replica.raise(position),
            Ok(None) => crate::timer::sleep(RETRY_PAUSE).await,
            Err(cause) => {
                debug!(node = %addr, %cause, "replay position probe failed");
                client = None;
                crate::timer::sleep(RETRY_PAUSE).await;
            }
        }
    }
}

/// Answers look-ups of the primary at `addr`, one query for all that are waiting, until
/// `shutdown`.
async fn look_up(
    addr: String,
    primary: Arc<Primary>,
    settings: LiveHealth,
    tasks: TaskTracker,
    shutdown: CancellationToken,
) {
    let mut client: Option<tokio_postgres::Client> = None;
    loop {
        let asked = primary.asked.load(Ordering::Acquire);
        if asked <= primary.answered.borrow().0 {
            tokio::select! {
                () = primary.wanted.notified() => continue,
                () = shutdown.cancelled() => return,
            }
        }
        let answer = match ask(
            &addr,
            CURRENT_POSITION,
            &settings.load_full(),
            &tasks,
            &mut client,
        )
        .await
        {
            Ok(position) => position,
            Err(cause) => {
                debug!(node = %addr, %cause, "primary position look-up failed");
                client = None;
                None
            }
        };
        primary.answered.send_replace((asked, answer));
    }
}

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error(transparent)]
    Connect(#[from] control::ControlError),
    #[error("replay position query timed out")]
    Timeout,
    #[error(transparent)]
    Query(#[from] tokio_postgres::Error),
}

/// One position query (connecting first if needed). `None`: NULL (not replaying).
async fn ask(
    addr: &str,
    query: &str,
    settings: &HealthSettings,
    tasks: &TaskTracker,
    client: &mut Option<tokio_postgres::Client>,
) -> Result<Option<u64>, ProbeError> {
    let c = settings
        .control_client(addr, "pgway-positions", tasks, client)
        .await?;
    let row = crate::timer::timeout(settings.timeout, c.query_one(query, &[]))
        .await
        .map_err(|_| ProbeError::Timeout)??;
    let position: Option<i64> = row.try_get(0)?;
    Ok(position.and_then(|p| u64::try_from(p).ok()))
}
