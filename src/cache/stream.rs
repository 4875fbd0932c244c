//! One invalidation stream per database: follows the primary's WAL (see [`super::wal`])
//! and applies each committed change to the cache, reconnecting after a break and moving
//! to a new primary after a failover.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::wal::{slot_name, WalError, WalEvent, WalFollower};
use super::{Db, Stats, StreamState};
use crate::backend::control::{self, ControlLogin};
use crate::net::Connector;
use crate::sync::lock;
use crate::topology::TopologyHandle;

/// Pause before connecting again after the stream broke.
const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// Pause before asking again a primary whose `wal_level` is not `logical`.
const NOT_LOGICAL_PAUSE: Duration = Duration::from_secs(30);

/// What every stream needs: where the primary is, who to log in as, where tasks run.
#[derive(Clone)]
pub struct Streams {
    /// The topology (the stream follows its primary).
    pub topology: Arc<TopologyHandle>,
    /// `cache.wal_user`.
    pub user: String,
    /// `cache.wal_password`.
    pub password: String,
    /// Opens the replication connection.
    pub connector: Arc<dyn Connector>,
    /// Timeout of each network wait but the stream's own reads.
    pub timeout: Duration,
    /// Tracks the streams' tasks.
    pub tasks: TaskTracker,
    /// Where they run.
    pub runtime: tokio::runtime::Handle,
    /// Ends them.
    pub shutdown: CancellationToken,
}

impl std::fmt::Debug for Streams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streams")
            .field("user", &self.user)
            .field("password", &"***")
            .finish_non_exhaustive()
    }
}

impl Streams {
    /// At start: tells the operator at once if the primary's `wal_level` is not `logical`
    /// (streams start with the first cacheable statement of each database), asking in
    /// `database` as `cache.wal_user`.
    pub fn check_wal_level(&self, database: String) {
        let streams = self.clone();
        self.tasks.spawn_on(
            async move {
                let Some(primary) = streams.topology.wait_primary(streams.timeout * 6).await else {
                    return;
                };
                let login = ControlLogin {
                    addr: &primary,
                    user: &streams.user,
                    password: &streams.password,
                    database: &database,
                    application_name: "pgway_cache",
                    connector: &*streams.connector,
                };
                let client = match control::connect(login, streams.timeout, &streams.tasks).await {
                    Ok(client) => client,
                    Err(cause) => {
                        warn!(%cause, "cannot log in as cache.wal_user to check wal_level");
                        return;
                    }
                };
                let level =
                    crate::timer::timeout(streams.timeout, client.query_one("SHOW wal_level", &[]))
                        .await;
                match level
                    .ok()
                    .and_then(Result::ok)
                    .and_then(|row| row.try_get::<_, String>(0).ok())
                {
                    Some(level) if level == "logical" => {
                        info!(
                            "the primary's wal_level is logical: the result cache follows its WAL"
                        );
                    }
                    Some(wal_level) => warn!(
                        %wal_level,
                        "the primary's wal_level is not logical: the result cache is \
                         invalidated only by writes through pgway, and by its TTL"
                    ),
                    None => warn!("could not read the primary's wal_level"),
                }
            },
            &self.runtime,
        );
    }

    /// Starts following `db`'s changes.
    pub fn start(&self, db: Arc<Db>, stats: Arc<Stats>) {
        let streams = self.clone();
        self.tasks.spawn_on(
            async move { streams.follow(db, stats).await },
            &self.runtime,
        );
    }

    async fn follow(self, db: Arc<Db>, stats: Arc<Stats>) {
        let mut attempt = 0;
        let mut warned_not_logical = false;
        while !self.shutdown.is_cancelled() {
            let Some(primary) = self.topology.wait_primary(self.timeout).await else {
                db.set_state(StreamState::Down);
                self.pause(RETRY_PAUSE).await;
                continue;
            };
            db.set_state(StreamState::Starting);
            attempt += 1;
            let slot = slot_name(attempt);
            *lock(&db.slot) = Some(slot.clone());
            let stop = self.shutdown.child_token();
            let watcher = self.runtime.spawn(primary_changes(
                Arc::clone(&self.topology),
                Arc::clone(&primary),
                stop.clone(),
            ));
            let follower = WalFollower {
                addr: &primary,
                user: &self.user,
                password: &self.password,
                database: &db.name,
                slot: &slot,
                timeout: self.timeout,
            };
            let result = follower
                .run(&*self.connector, stop.clone(), |event| {
                    apply(&db, &stats, event)
                })
                .await;
            watcher.abort();
            *lock(&db.slot) = None;
            match result {
                Ok(()) => {
                    // Stopping, or the primary changed: follow the new one at once.
                    db.set_state(StreamState::Starting);
                }
                Err(WalError::NotLogical { wal_level }) => {
                    db.set_state(StreamState::NotLogical);
                    if !warned_not_logical {
                        warned_not_logical = true;
                        warn!(
                            database = %db.name,
                            %wal_level,
                            "the primary's wal_level is not logical: the result cache is \
                             invalidated only by writes through pgway, and by its TTL"
                        );
                    }
                    self.pause(NOT_LOGICAL_PAUSE).await;
                }
                Err(cause) => {
                    db.set_state(StreamState::Down);
                    warn!(database = %db.name, %cause, "cache invalidation stream broke; the cache is bypassed until it is back");
                    self.pause(RETRY_PAUSE).await;
                }
            }
        }
    }

    async fn pause(&self, how_long: Duration) {
        tokio::select! {
            _ = crate::timer::sleep(how_long) => {}
            _ = self.shutdown.cancelled() => {}
        }
    }
}

/// Cancels `stop` when the topology's primary is no longer `primary`.
async fn primary_changes(
    topology: Arc<TopologyHandle>,
    primary: Arc<str>,
    stop: CancellationToken,
) {
    let mut changes = topology.subscribe();
    loop {
        if topology.primary().as_deref() != Some(&*primary) {
            stop.cancel();
            return;
        }
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = stop.cancelled() => return,
        }
    }
}

/// Applies one event of the stream to the cache.
fn apply(db: &Db, stats: &Stats, event: WalEvent) {
    match event {
        WalEvent::Consistent { position } => {
            // What changed while no stream was consistent is unknown: start empty.
            db.invalidate_all(stats);
            db.epoch.fetch_add(1, Ordering::AcqRel);
            db.position.store(position, Ordering::Release);
            db.set_state(StreamState::Following);
            db.advance(position);
            info!(database = %db.name, "cache invalidation stream is consistent");
        }
        WalEvent::Commit {
            position,
            tables,
            unknown,
        } => {
            if unknown {
                db.invalidate_all(stats);
            } else {
                let names: Vec<&str> = tables.iter().map(|(_, name)| name.as_str()).collect();
                db.invalidate(&names, position, stats);
            }
            db.advance(position);
        }
        WalEvent::Position(position) => db.advance(position),
    }
}
