//! `kind = "patroni"`: follow Patroni's keys in etcd (v3 API).
//!
//! pgway reads `/<namespace>/<scope>/leader` (the leader's member name) and
//! `/<namespace>/<scope>/members/<name>` (JSON: `conn_url`, `role`, `state`, `tags`), then
//! watches the prefix from the revision it read. The leader may be the primary, and
//! becomes it as soon as it answers `pg_is_in_recovery() = false` (its health monitor is
//! woken at once and probes quickly until then); running members without the
//! `noloadbalance` tag may take reads. When etcd is unreachable the last topology stays in
//! force (health checks go on) and pgway reconnects with backoff, re-watching from the
//! last revision it applied, or reading everything again after a compaction.
//!
//! Where the watch stands (connecting, watching, unreachable) is kept in a
//! [`WatchStatus`] on the [`TopologyHandle`], for `/topology`, `/ready` and the console's
//! `SHOW TOPOLOGY`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, WatchOptions};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Member, TopologyHandle};
use crate::backend::Pools;
use crate::sync::lock;

/// Why the watch had to start over.
#[derive(Debug, thiserror::Error)]
pub enum PatroniError {
    /// etcd could not be reached or answered with an error.
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    /// The watch stream ended.
    #[error("the etcd watch stream ended")]
    StreamEnded,
    /// The revision to resume from was compacted away.
    #[error("etcd compacted revision {0}; reading the keys again")]
    Compacted(i64),
}

/// Where Patroni's keys are.
#[derive(Debug, Clone)]
pub struct PatroniSettings {
    /// etcd endpoints.
    pub endpoints: Vec<String>,
    /// Patroni namespace (`/service`).
    pub namespace: String,
    /// Patroni scope (cluster name).
    pub scope: String,
    /// Connect timeout for etcd.
    pub timeout: Duration,
}

impl PatroniSettings {
    /// `/<namespace>/<scope>/`.
    pub fn prefix(&self) -> String {
        format!(
            "/{}/{}/",
            self.namespace.trim_matches('/'),
            self.scope.trim_matches('/')
        )
        .replace("//", "/")
    }
}

/// Where the etcd watch stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchState {
    /// No watch: the topology is static (from the config).
    Off,
    /// Connecting to etcd for the first time.
    Connecting,
    /// Watching Patroni's keys.
    Watching,
    /// etcd could not be reached (or the watch failed): the last topology stays in force
    /// while pgway retries with backoff.
    Unreachable,
}

impl WatchState {
    /// The state's name in `/topology` and `SHOW TOPOLOGY`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Connecting => "connecting",
            Self::Watching => "watching",
            Self::Unreachable => "unreachable",
        }
    }
}

/// A copy of a [`WatchStatus`] at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchReport {
    /// The etcd endpoints, as configured.
    pub endpoints: Vec<String>,
    /// The state.
    pub state: WatchState,
    /// How long the watch has been in this state.
    pub since: Duration,
    /// Why the watch last failed (kept once it watches again), if it ever failed.
    pub last_error: Option<String>,
    /// The last etcd revision seen (read, watched or in a progress notification).
    pub revision: Option<i64>,
}

/// Where the etcd watch stands, shared between [`watch`] (which updates it as it connects,
/// watches, fails and retries) and the admin views. Off until a watch starts: a static
/// topology never leaves it. Updated on etcd events only, never on a client's path.
#[derive(Debug)]
pub struct WatchStatus {
    inner: Mutex<WatchInner>,
}

#[derive(Debug)]
struct WatchInner {
    endpoints: Vec<String>,
    state: WatchState,
    since: Instant,
    last_error: Option<String>,
    revision: Option<i64>,
}

impl Default for WatchStatus {
    fn default() -> Self {
        Self {
            inner: Mutex::new(WatchInner {
                endpoints: Vec::new(),
                state: WatchState::Off,
                since: Instant::now(),
                last_error: None,
                revision: None,
            }),
        }
    }
}

impl WatchInner {
    /// Moves to `state`; `since` restarts only on a change.
    fn enter(&mut self, state: WatchState) {
        if self.state != state {
            self.state = state;
            self.since = Instant::now();
        }
    }
}

impl WatchStatus {
    fn lock(&self) -> MutexGuard<'_, WatchInner> {
        lock(&self.inner)
    }

    /// A watch of `endpoints` starts: connecting, unless it started already.
    pub fn started(&self, endpoints: &[String]) {
        let mut inner = self.lock();
        if inner.state == WatchState::Off {
            inner.endpoints = endpoints.to_vec();
            inner.enter(WatchState::Connecting);
        }
    }

    /// The watch is running.
    pub fn watching(&self) {
        self.lock().enter(WatchState::Watching);
    }

    /// The watch failed with `cause`: etcd is unreachable until it watches again.
    pub fn failed(&self, cause: &PatroniError) {
        let mut inner = self.lock();
        inner.last_error = Some(cause.to_string());
        inner.enter(WatchState::Unreachable);
    }

    /// etcd answered at `revision`.
    pub fn saw_revision(&self, revision: i64) {
        let mut inner = self.lock();
        inner.revision = Some(inner.revision.map_or(revision, |r| r.max(revision)));
    }

    /// The state now.
    pub fn state(&self) -> WatchState {
        self.lock().state
    }

    /// Everything, as of now.
    pub fn report(&self) -> WatchReport {
        let inner = self.lock();
        WatchReport {
            endpoints: inner.endpoints.clone(),
            state: inner.state,
            since: inner.since.elapsed(),
            last_error: inner.last_error.clone(),
            revision: inner.revision,
        }
    }
}

/// A member key's JSON, as far as pgway needs it.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct MemberInfo {
    /// `postgres://host:port/dbname`.
    #[serde(default)]
    pub conn_url: String,
    /// `master`/`primary`/`replica`/`standby_leader`.
    #[serde(default)]
    pub role: String,
    /// `running`, `starting`, `stopped`, ...
    #[serde(default)]
    pub state: String,
    /// Member tags (`noloadbalance`, `nofailover`, ...).
    #[serde(default)]
    pub tags: BTreeMap<String, serde_json::Value>,
}

impl MemberInfo {
    /// `host:port` from `conn_url`.
    pub fn addr(&self) -> Option<String> {
        let rest = self
            .conn_url
            .split_once("://")
            .map_or(self.conn_url.as_str(), |(_, r)| r);
        let hostport = rest.split(['/', '?']).next()?;
        let hostport = hostport.rsplit_once('@').map_or(hostport, |(_, h)| h);
        if hostport.is_empty() {
            return None;
        }
        if hostport.ends_with(']') || !hostport.contains(':') {
            return Some(format!("{hostport}:5432"));
        }
        Some(hostport.to_owned())
    }

    fn tag(&self, name: &str) -> bool {
        match self.tags.get(name) {
            Some(serde_json::Value::Bool(b)) => *b,
            Some(serde_json::Value::String(s)) => matches!(s.as_str(), "true" | "on" | "yes" | "1"),
            Some(serde_json::Value::Number(n)) => n.as_i64().unwrap_or(0) != 0,
            _ => false,
        }
    }
}

/// What the keys say.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterState {
    /// The leader's member name.
    pub leader: Option<String>,
    /// Members by name.
    pub members: BTreeMap<String, MemberInfo>,
}

impl ClusterState {
    /// Applies a put (`Some(value)`) or delete (`None`) of `key` (relative to the prefix).
    pub fn apply(&mut self, key: &str, value: Option<&[u8]>) {
        if key == "leader" {
            self.leader = value.map(|v| String::from_utf8_lossy(v).trim().to_owned());
        } else if let Some(name) = key.strip_prefix("members/") {
            match value.map(serde_json::from_slice::<MemberInfo>) {
                Some(Ok(info)) => {
                    self.members.insert(name.to_owned(), info);
                }
                Some(Err(cause)) => {
                    warn!(member = %name, %cause, "unreadable Patroni member key; ignoring the member");
                    self.members.remove(name);
                }
                None => {
                    self.members.remove(name);
                }
            }
        }
    }

    /// The leader's address.
    pub fn leader_addr(&self) -> Option<String> {
        self.members.get(self.leader.as_deref()?)?.addr()
    }

    /// The member list for the topology.
    pub fn members(&self) -> Vec<Member> {
        self.members
            .iter()
            .filter_map(|(name, info)| {
                Some(Member {
                    addr: info.addr()?,
                    may_be_primary: self.leader.as_deref() == Some(name.as_str()),
                    may_take_reads: info.state == "running" && !info.tag("noloadbalance"),
                })
            })
            .collect()
    }
}

/// Watches Patroni's keys until `shutdown`, publishing to `topology`.
pub async fn watch(
    settings: PatroniSettings,
    topology: Arc<TopologyHandle>,
    pools: Arc<Pools>,
    shutdown: CancellationToken,
) {
    topology.etcd().started(&settings.endpoints);
    let mut watcher = Watcher {
        prefix: settings.prefix(),
        settings,
        topology,
        pools,
        state: ClusterState::default(),
        revision: None,
    };
    let mut backoff = Duration::from_millis(100);
    let mut warned = false;
    loop {
        let mut established = false;
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            result = watcher.run(&mut established) => result,
        };
        if established {
            if warned {
                info!("etcd reachable again; watching from the last revision applied");
            }
            warned = false;
            backoff = Duration::from_millis(100);
        }
        match result {
            Ok(()) => return,
            Err(PatroniError::Compacted(rev)) => {
                info!(
                    revision = rev,
                    "etcd history compacted; reading Patroni's keys again"
                );
                watcher.revision = None;
                continue;
            }
            Err(cause) => {
                watcher.topology.etcd().failed(&cause);
                if !warned {
                    warn!(%cause, "etcd unreachable; keeping the last known topology and retrying");
                    warned = true;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = crate::timer::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

struct Watcher {
    settings: PatroniSettings,
    prefix: String,
    topology: Arc<TopologyHandle>,
    pools: Arc<Pools>,
    state: ClusterState,
    /// The last etcd revision applied.
    revision: Option<i64>,
}

impl Watcher {
    /// Reads (if needed) and watches until the stream fails. Sets `established` once the
    /// watch is running.
    async fn run(&mut self, established: &mut bool) -> Result<(), PatroniError> {
        let endpoints: Vec<String> = self
            .settings
            .endpoints
            .iter()
            .map(|e| {
                if e.contains("://") {
                    e.clone()
                } else {
                    format!("http://{e}")
                }
            })
            .collect();
        let options = ConnectOptions::new()
            .with_connect_timeout(self.settings.timeout)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        let mut client = Client::connect(endpoints, Some(options)).await?;
        let revision = match self.revision {
            Some(revision) => revision,
            None => {
                let response = crate::timer::timeout(
                    self.settings.timeout,
                    client.get(self.prefix.as_str(), Some(GetOptions::new().with_prefix())),
                )
                .await
                .map_err(|_| etcd_client::Error::InvalidArgs("etcd read timed out".into()))??;
                let mut state = ClusterState::default();
                for kv in response.kvs() {
                    if let Some(key) = kv.key_str().ok().and_then(|k| k.strip_prefix(&self.prefix))
                    {
                        state.apply(key, Some(kv.value()));
                    }
                }
                let revision = response.header().map_or(0, |h| h.revision());
                self.topology.etcd().saw_revision(revision);
                self.publish(state);
                self.revision = Some(revision);
                revision
            }
        };
        let (_watcher, mut stream) = client
            .watch(
                self.prefix.as_str(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1)
                        .with_progress_notify(),
                ),
            )
            .await?;
        *established = true;
        self.topology.etcd().watching();
        info!(prefix = %self.prefix, revision, "watching Patroni's keys in etcd");
        loop {
            let Some(response) = stream.message().await? else {
                return Err(PatroniError::StreamEnded);
            };
            if response.compact_revision() > 0 {
                return Err(PatroniError::Compacted(response.compact_revision()));
            }
            if response.canceled() {
                return Err(PatroniError::StreamEnded);
            }
            if let Some(header) = response.header() {
                self.topology.etcd().saw_revision(header.revision());
            }
            let mut state = self.state.clone();
            let mut last = None;
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                last = Some(kv.mod_revision());
                let Some(key) = kv.key_str().ok().and_then(|k| k.strip_prefix(&self.prefix)) else {
                    continue;
                };
                match event.event_type() {
                    EventType::Put => state.apply(key, Some(kv.value())),
                    EventType::Delete => state.apply(key, None),
                }
            }
            if let Some(last) = last {
                self.publish(state);
                self.revision = Some(last);
            }
        }
    }

    /// Publishes a new state: member list, and on a leader change, the old leader's idle
    /// connections closed and the new leader probed at once.
    fn publish(&mut self, state: ClusterState) {
        if state == self.state && self.revision.is_some() {
            return;
        }
        let old_leader = self.state.leader_addr();
        let new_leader = state.leader_addr();
        self.topology.set_members(state.members());
        if old_leader != new_leader {
            info!(
                leader = state.leader.as_deref().unwrap_or("(none)"),
                addr = new_leader.as_deref().unwrap_or("-"),
                "Patroni leader changed"
            );
            if let Some(old) = &old_leader {
                self.pools.clear_node(old);
            }
            if let Some(new) = &new_leader {
                self.topology.wake(new);
            }
        }
        self.state = state;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_urls_and_roles() {
        let mut state = ClusterState::default();
        state.apply(
            "members/pg1",
            Some(br#"{"conn_url":"postgres://127.0.0.1:5441/postgres","api_url":"http://127.0.0.1:8008/patroni","state":"running","role":"master","xlog_location":123}"#),
        );
        state.apply(
            "members/pg2",
            Some(br#"{"conn_url":"postgresql://u@10.0.0.2:5442/postgres","state":"running","role":"replica","tags":{"noloadbalance":true}}"#),
        );
        state.apply(
            "members/pg3",
            Some(br#"{"conn_url":"postgres://db3/postgres","state":"starting","role":"replica"}"#),
        );
        state.apply("leader", Some(b"pg1"));
        assert_eq!(state.leader_addr().as_deref(), Some("127.0.0.1:5441"));
        let members = state.members();
        assert_eq!(
            members,
            vec![
                Member {
                    addr: "127.0.0.1:5441".into(),
                    may_be_primary: true,
                    may_take_reads: true
                },
                Member {
                    addr: "10.0.0.2:5442".into(),
                    may_be_primary: false,
                    may_take_reads: false
                },
                Member {
                    addr: "db3:5432".into(),
                    may_be_primary: false,
                    may_take_reads: false
                },
            ]
        );
        state.apply("leader", None);
        assert_eq!(state.leader_addr(), None);
        state.apply("members/pg1", None);
        assert_eq!(state.members().len(), 2);
        state.apply("members/pg2", Some(b"not json"));
        assert_eq!(state.members().len(), 1);
    }

    #[test]
    fn watch_status_transitions() {
        let status = WatchStatus::default();
        assert_eq!(status.state(), WatchState::Off);
        assert_eq!(status.report().endpoints, Vec::<String>::new());
        let endpoints = vec!["127.0.0.1:2379".to_owned()];
        status.started(&endpoints);
        let report = status.report();
        assert_eq!(report.state, WatchState::Connecting);
        assert_eq!(report.endpoints, endpoints);
        assert_eq!((report.last_error, report.revision), (None, None));

        status.failed(&PatroniError::StreamEnded);
        let report = status.report();
        assert_eq!(report.state, WatchState::Unreachable);
        assert_eq!(
            report.last_error.as_deref(),
            Some("the etcd watch stream ended")
        );
        // Retrying while unreachable: the state (and its `since`) stays.
        std::thread::sleep(Duration::from_millis(200));
        status.failed(&PatroniError::Compacted(7));
        let report = status.report();
        assert_eq!(report.state, WatchState::Unreachable);
        assert!(report.since >= Duration::from_millis(200), "{report:?}");
        assert!(report
            .last_error
            .is_some_and(|e| e.contains("compacted revision 7")));

        status.watching();
        status.saw_revision(12);
        status.saw_revision(10);
        let report = status.report();
        assert_eq!(report.state, WatchState::Watching);
        assert!(report.since < Duration::from_millis(200), "{report:?}");
        assert_eq!(report.revision, Some(12));
        // The last error stays on record.
        assert!(report.last_error.is_some());
        // A second start changes nothing.
        status.started(&[]);
        assert_eq!(status.state(), WatchState::Watching);
        assert_eq!(status.report().endpoints, endpoints);
        assert_eq!(WatchState::Unreachable.name(), "unreachable");
    }

    #[test]
    fn prefix_is_normalised() {
        let settings = |namespace: &str| PatroniSettings {
            endpoints: vec![],
            namespace: namespace.into(),
            scope: "demo".into(),
            timeout: Duration::from_secs(1),
        };
        assert_eq!(settings("/service").prefix(), "/service/demo/");
        assert_eq!(settings("service/").prefix(), "/service/demo/");
    }
}
