//! The current topology: which node is the primary, which replicas take reads.
//!
//! Two kinds of source feed it. The member list comes from the config (`kind = "static"`)
//! or from Patroni's keys in etcd ([`patroni`]), which also says which member may be the
//! primary (the leader) and which may take reads. What each node really is comes from
//! [`health`] checks (`pg_is_in_recovery()`, WAL positions). A node is used as the
//! primary only when both agree, so a demoted primary that still accepts writes is never
//! written to. Routing reads a snapshot with one atomic load; changes are announced on a
//! `watch` channel so a client waiting for a primary wakes as soon as one appears.

pub mod health;
pub mod patroni;
pub mod replay;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{watch, Notify};

/// What a node is, as last observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Accepts writes (`pg_is_in_recovery() = false`).
    Primary,
    /// A hot standby (`pg_is_in_recovery() = true`).
    Replica,
    /// Not yet checked.
    Unknown,
}

/// One node and its last observed state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// `host:port`. Shared, not copied, by the snapshots that keep the node.
    pub addr: Arc<str>,
    /// Last observed role.
    pub role: Role,
    /// False after a failed health check or connect, until a check succeeds.
    pub healthy: bool,
    /// WAL position at the last check: write position on a primary, replay position on a
    /// replica.
    pub lsn: Option<u64>,
    /// The source allows this node to be the primary (static: always; Patroni: the leader).
    pub may_be_primary: bool,
    /// The source allows reads here (static: always; Patroni: running, no `noloadbalance`).
    pub may_take_reads: bool,
}

/// What a topology source says about a member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// `host:port`.
    pub addr: String,
    /// May be the primary.
    pub may_be_primary: bool,
    /// May take reads.
    pub may_take_reads: bool,
}

/// An immutable snapshot of all nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Topology {
    /// Every node, in configuration order.
    pub nodes: Vec<Node>,
}

impl Topology {
    /// The healthy primary, if any.
    pub fn primary(&self) -> Option<&Node> {
        self.nodes
            .iter()
            .find(|n| n.healthy && n.role == Role::Primary && n.may_be_primary)
    }

    /// Replicas that may take reads: healthy, replaying, allowed by the source, and at most
    /// `max_lag` bytes behind the primary (when both positions are known).
    pub fn readable_replicas(&self, max_lag: Option<u64>) -> impl Iterator<Item = &Node> {
        self.readable_beside(self.primary(), max_lag)
    }

    /// [`Self::readable_replicas`], with the primary already looked up.
    fn readable_beside<'t>(
        &'t self,
        primary: Option<&Node>,
        max_lag: Option<u64>,
    ) -> impl Iterator<Item = &'t Node> + Clone {
        let primary_lsn = primary.and_then(|p| p.lsn);
        self.nodes.iter().filter(move |n| {
            n.healthy
                && n.role == Role::Replica
                && n.may_take_reads
                && match (max_lag, primary_lsn, n.lsn) {
                    (Some(max), Some(primary), Some(replica)) => {
                        primary.saturating_sub(replica) <= max
                    }
                    _ => true,
                }
        })
    }
}

/// Round-robin over `count` replicas: the next index. The rotation is counted per thread,
/// so picking writes nothing that other worker threads share.
fn next_replica(count: usize) -> usize {
    thread_local! {
        static NEXT_REPLICA: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }
    NEXT_REPLICA.with(|next| {
        let i = next.get();
        next.set(i.wrapping_add(1));
        i % count
    })
}

/// A caller's copy of what it picked nodes from, with a slot of its own per node (a
/// session's pool index): while the topology's generation stays, picking a node reads
/// one atomic instead of the snapshot, and compares no addresses.
#[derive(Debug)]
pub struct Picks<T> {
    generation: u64,
    primary: Option<(Arc<str>, Option<T>)>,
    replicas: Vec<(Arc<str>, Option<T>)>,
}

impl<T> Default for Picks<T> {
    fn default() -> Self {
        Self {
            generation: 0,
            primary: None,
            replicas: Vec::new(),
        }
    }
}

impl<T: Copy> Picks<T> {
    /// The node for `want` from the topology as of now (its slot, made by `slot` from
    /// its address the first time, and whether it is the primary); `None`: no node for
    /// `want` is usable now. The same choice as [`TopologyHandle::node_now`].
    pub fn pick(
        &mut self,
        topology: &TopologyHandle,
        want: Want,
        mut slot: impl FnMut(&str) -> T,
    ) -> Option<(T, bool)> {
        if topology.generation() != self.generation {
            let (generation, primary, replicas) = topology.picks_now();
            self.generation = generation;
            self.primary = primary.map(|addr| (addr, None));
            self.replicas.clear();
            self.replicas
                .extend(replicas.into_iter().map(|addr| (addr, None)));
        }
        let replica = match want {
            Want::Primary => false,
            Want::Replica => !self.replicas.is_empty(),
            Want::Any => self.primary.is_none() && !self.replicas.is_empty(),
        };
        let (addr, cached) = if replica {
            let i = next_replica(self.replicas.len());
            self.replicas.get_mut(i)?
        } else {
            self.primary.as_mut()?
        };
        let value = *cached.get_or_insert_with(|| slot(addr));
        Some((value, !replica))
    }
}

/// Which node a caller needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// The primary.
    Primary,
    /// A replica that may take reads, else the primary.
    Replica,
    /// The primary, else a replica: for what any node can answer (login parameters).
    Any,
}

/// The shared, swappable topology.
#[derive(Debug)]
pub struct TopologyHandle {
    current: ArcSwap<Topology>,
    changed: watch::Sender<u64>,
    /// `routing.max_replica_lag` (`u64::MAX`: no limit), set again by a reload.
    max_lag: AtomicU64,
    /// Counts the changes of what routing reads (a new snapshot, a new lag limit), from 1:
    /// a caller that keeps what it picked from one generation ([`Picks`]) looks again
    /// only when it moves.
    generation: AtomicU64,
    wakers: Mutex<HashMap<String, Arc<Notify>>>,
    /// Where the etcd watch stands (off for a static topology).
    etcd: patroni::WatchStatus,
}

impl TopologyHandle {
    /// A fixed node list (static topology): every node may be primary and take reads; roles
    /// are unknown until checked.
    pub fn new(addrs: &[String]) -> Arc<Self> {
        Self::with_max_lag(addrs, None)
    }

    /// Like [`Self::new`], with a replica lag limit.
    pub fn with_max_lag(addrs: &[String], max_lag: Option<u64>) -> Arc<Self> {
        let handle = Arc::new(Self {
            current: ArcSwap::from_pointee(Topology::default()),
            changed: watch::channel(0).0,
            max_lag: AtomicU64::new(max_lag.unwrap_or(u64::MAX)),
            generation: AtomicU64::new(1),
            wakers: Mutex::new(HashMap::new()),
            etcd: patroni::WatchStatus::default(),
        });
        handle.set_static_nodes(addrs);
        handle
    }

    /// The replica lag limit in force.
    fn max_lag(&self) -> Option<u64> {
        Some(self.max_lag.load(Ordering::Relaxed)).filter(|lag| *lag != u64::MAX)
    }

    /// A reload: a new replica lag limit for the reads routed from now on.
    pub fn set_max_lag(&self, max_lag: Option<u64>) {
        self.max_lag
            .store(max_lag.unwrap_or(u64::MAX), Ordering::Relaxed);
        self.generation.fetch_add(1, Ordering::Release);
        self.changed.send_modify(|v| *v += 1);
    }

    /// A reload of a static topology: `addrs` are the nodes from now on (see
    /// [`Self::set_members`]).
    pub fn set_static_nodes(&self, addrs: &[String]) {
        self.set_members(
            addrs
                .iter()
                .map(|addr| Member {
                    addr: addr.clone(),
                    may_be_primary: true,
                    may_take_reads: true,
                })
                .collect(),
        );
    }

    /// Replaces the member list, keeping what was observed of nodes already known. New
    /// nodes start healthy with their role unknown, so they are unused until checked.
    pub fn set_members(&self, members: Vec<Member>) {
        let mut changed = false;
        self.current.rcu(|current| {
            let nodes: Vec<Node> = members
                .iter()
                .map(|m| {
                    let known = current.nodes.iter().find(|n| *n.addr == *m.addr);
                    Node {
                        addr: known
                            .map_or_else(|| Arc::from(m.addr.as_str()), |n| Arc::clone(&n.addr)),
                        role: known.map_or(Role::Unknown, |n| n.role),
                        healthy: known.is_none_or(|n| n.healthy),
                        lsn: known.and_then(|n| n.lsn),
                        may_be_primary: m.may_be_primary,
                        may_take_reads: m.may_take_reads,
                    }
                })
                .collect();
            changed = nodes != current.nodes;
            Topology { nodes }
        });
        if changed {
            self.generation.fetch_add(1, Ordering::Release);
            self.changed.send_modify(|v| *v += 1);
        }
    }

    /// Asks the health monitor of `addr` to check it now.
    pub fn wake(&self, addr: &str) {
        if let Some(waker) = self.waker(addr, false) {
            waker.notify_one();
        }
    }

    /// The notifier a health monitor waits on for `addr` (created when `create`).
    pub fn waker(&self, addr: &str, create: bool) -> Option<Arc<Notify>> {
        let mut wakers = self.wakers.lock().ok()?;
        if create {
            return Some(Arc::clone(wakers.entry(addr.to_owned()).or_default()));
        }
        wakers.get(addr).cloned()
    }

    /// Where the etcd watch stands ([`patroni::watch`] updates it; off for a static
    /// topology).
    pub fn etcd(&self) -> &patroni::WatchStatus {
        &self.etcd
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Topology> {
        self.current.load_full()
    }

    /// Address of the healthy primary, if there is one.
    pub fn primary(&self) -> Option<Arc<str>> {
        self.current.load().primary().map(|n| Arc::clone(&n.addr))
    }

    /// A replica that may take reads, round-robin across all of them.
    pub fn replica(&self) -> Option<Arc<str>> {
        let topology = self.current.load();
        self.pick_replica(&topology, topology.primary())
            .map(|n| Arc::clone(&n.addr))
    }

    /// Every replica that may take reads now.
    pub fn readable_replicas(&self) -> Vec<Arc<str>> {
        self.current
            .load()
            .readable_replicas(self.max_lag())
            .map(|n| Arc::clone(&n.addr))
            .collect()
    }

    /// Round-robin over the readable replicas. The rotation is counted per thread, so
    /// picking writes nothing that other worker threads share.
    fn pick_replica<'t>(&self, topology: &'t Topology, primary: Option<&Node>) -> Option<&'t Node> {
        let mut readable = topology.readable_beside(primary, self.max_lag());
        let count = readable.clone().count();
        if count == 0 {
            return None;
        }
        readable.nth(next_replica(count))
    }

    /// What routing reads now, for [`Picks`]: the generation, the healthy primary and
    /// the replicas that may take reads. The generation is read first, so the nodes are
    /// at least as new as it says.
    pub fn picks_now(&self) -> (u64, Option<Arc<str>>, Vec<Arc<str>>) {
        let generation = self.generation.load(Ordering::Acquire);
        let topology = self.current.load();
        let primary = topology.primary();
        let replicas = topology
            .readable_beside(primary, self.max_lag())
            .map(|n| Arc::clone(&n.addr))
            .collect();
        (generation, primary.map(|n| Arc::clone(&n.addr)), replicas)
    }

    /// The generation of what routing reads (see [`Picks`]).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Calls `f` with the healthy primary's address, if there is one, without copying it.
    pub fn with_primary<R>(&self, f: impl FnOnce(&str) -> R) -> Option<R> {
        self.current.load().primary().map(|n| f(&n.addr))
    }

    /// Calls `f` with the address of a node for `want`, without copying it, and whether
    /// that node is the primary (a read may land on it when no replica takes reads).
    /// `None`: no node for `want` is usable now.
    pub fn node_now<R>(&self, want: Want, mut f: impl FnMut(&str, bool) -> R) -> Option<R> {
        // One look at the topology answers both what to pick and whether it is the primary.
        let topology = self.current.load();
        let primary = topology.primary();
        let replica = |f: &mut dyn FnMut(&str, bool) -> R| {
            self.pick_replica(&topology, primary).map(|n| {
                let is_primary = primary.is_some_and(|p| p.addr == n.addr);
                f(&n.addr, is_primary)
            })
        };
        match want {
            Want::Primary => primary.map(|n| f(&n.addr, true)),
            Want::Replica => replica(&mut f),
            Want::Any => match primary {
                Some(n) => Some(f(&n.addr, true)),
                None => replica(&mut f),
            },
        }
    }

    /// [`Self::node_now`], but with no node usable now, waits up to `wait()` for a primary
    /// (so writes wait through a failover instead of failing). `None`: no node came in
    /// time.
    pub async fn with_node<R>(
        &self,
        want: Want,
        wait: impl FnOnce() -> Duration,
        mut f: impl FnMut(&str, bool) -> R,
    ) -> Option<R> {
        match self.node_now(want, &mut f) {
            Some(r) => Some(r),
            None => self.wait_primary(wait()).await.map(|addr| f(&addr, true)),
        }
    }

    /// Takes a node out of rotation at once, after a connect to it failed or its server
    /// shut down under a request: no new transaction is sent there until a health check
    /// passes again, and its idle pooled connections are closed.
    pub fn take_out_of_rotation(&self, addr: &str, pools: &crate::backend::Pools) {
        self.mark_down(addr);
        pools.clear_node(addr);
    }

    /// How many nodes the topology has.
    pub fn node_count(&self) -> usize {
        self.current.load().nodes.len()
    }

    /// Records a node's observed state; returns the previous state if its role or health
    /// changed. (A new WAL position alone is stored without announcing a change.)
    pub fn update(&self, addr: &str, role: Role, healthy: bool) -> Option<Node> {
        self.observe(addr, role, healthy, None)
    }

    /// [`Self::update`] with the WAL position measured by the check.
    pub fn observe(&self, addr: &str, role: Role, healthy: bool, lsn: Option<u64>) -> Option<Node> {
        let mut previous = None;
        let mut moved = false;
        self.current.rcu(|current| {
            let mut next = Topology::clone(current);
            previous = None;
            for node in next.nodes.iter_mut().filter(|n| &*n.addr == addr) {
                let role = if role == Role::Unknown {
                    node.role
                } else {
                    role
                };
                if node.role != role || node.healthy != healthy {
                    previous = Some(node.clone());
                    node.role = role;
                    node.healthy = healthy;
                }
                if lsn.is_some() {
                    node.lsn = lsn;
                }
            }
            moved = next != **current;
            next
        });
        if moved {
            self.generation.fetch_add(1, Ordering::Release);
        }
        if previous.is_some() {
            self.changed.send_modify(|v| *v += 1);
        }
        previous
    }

    /// Takes a node out of rotation at once (a connect to it failed).
    pub fn mark_down(&self, addr: &str) {
        self.update(addr, Role::Unknown, false);
    }

    /// Waits up to `timeout` for a healthy primary.
    pub async fn wait_primary(&self, timeout: Duration) -> Option<Arc<str>> {
        let mut changes = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(addr) = self.primary() {
                return Some(addr);
            }
            match crate::timer::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => continue,
                _ => return self.primary(),
            }
        }
    }

    /// A receiver that sees every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle() -> Arc<TopologyHandle> {
        TopologyHandle::new(&["a:1".into(), "b:2".into(), "c:3".into()])
    }

    #[test]
    fn replicas_rotate_and_fall_out() {
        let t = handle();
        assert_eq!(t.primary(), None);
        t.update("a:1", Role::Primary, true);
        t.update("b:2", Role::Replica, true);
        t.update("c:3", Role::Replica, true);
        assert_eq!(t.primary().as_deref(), Some("a:1"));
        let picks: Vec<Arc<str>> = (0..4).filter_map(|_| t.replica()).collect();
        assert!(picks.iter().any(|p| &**p == "b:2") && picks.iter().any(|p| &**p == "c:3"));
        t.mark_down("b:2");
        assert!((0..4).all(|_| t.replica().as_deref() == Some("c:3")));
        t.mark_down("c:3");
        assert_eq!(t.replica(), None);
        // A health check that passes puts it back, with its role kept.
        t.update("c:3", Role::Unknown, true);
        assert_eq!(t.replica().as_deref(), Some("c:3"));
    }

    #[test]
    fn patroni_eligibility_and_lag() {
        let member = |addr: &str, may_be_primary, may_take_reads| Member {
            addr: addr.into(),
            may_be_primary,
            may_take_reads,
        };
        let t = TopologyHandle::with_max_lag(&[], Some(100));
        t.set_members(vec![
            member("a:1", true, true),
            member("b:2", false, true),
            member("c:3", false, false),
        ]);
        t.observe("a:1", Role::Primary, true, Some(1000));
        t.observe("b:2", Role::Replica, true, Some(950));
        t.observe("c:3", Role::Replica, true, Some(1000));
        assert_eq!(t.primary().as_deref(), Some("a:1"));
        // c is noloadbalance: never a read target.
        assert!((0..4).all(|_| t.replica().as_deref() == Some("b:2")));
        // b falls 200 bytes behind: out until it catches up.
        t.observe("b:2", Role::Replica, true, Some(800));
        assert_eq!(t.replica(), None);
        t.observe("b:2", Role::Replica, true, Some(990));
        assert_eq!(t.replica().as_deref(), Some("b:2"));
        // A node still answering as primary but no longer the leader is not the primary.
        t.set_members(vec![member("a:1", false, true), member("b:2", true, true)]);
        assert_eq!(t.primary(), None);
        t.observe("b:2", Role::Primary, true, Some(1000));
        assert_eq!(t.primary().as_deref(), Some("b:2"));
    }

    /// What `picks` and [`TopologyHandle::node_now`] (as `with_node` uses it) choose for
    /// `want`, over six picks:
    /// the addresses (sorted, deduplicated) and whether each was the primary.
    fn both_choose(
        t: &TopologyHandle,
        picks: &mut Picks<usize>,
        slots: &mut Vec<String>,
        want: Want,
    ) -> [Vec<(String, bool)>; 2] {
        let mut cached = Vec::new();
        let mut fresh = Vec::new();
        // Apart: the replicas' rotation is shared, so alternating would skip every other.
        for _ in 0..6 {
            let slot = |addr: &str| {
                slots.push(addr.to_owned());
                slots.len() - 1
            };
            if let Some((slot, primary)) = picks.pick(t, want, slot) {
                cached.push((slots[slot].clone(), primary));
            }
        }
        // With no replica, node_now's caller (`with_node`) waits for the primary, which is
        // there or not at once here.
        let node = |want| t.node_now(want, |addr: &str, primary| (addr.to_owned(), primary));
        for _ in 0..6 {
            let found = match want {
                Want::Replica => node(Want::Replica).or_else(|| node(Want::Primary)),
                _ => node(want),
            };
            fresh.extend(found);
        }
        for choices in [&mut cached, &mut fresh] {
            choices.sort();
            choices.dedup();
        }
        [cached, fresh]
    }

    #[test]
    fn picks_follow_the_topology_and_make_each_slot_once_per_generation() {
        let t = TopologyHandle::with_max_lag(&["a:1".into(), "b:2".into(), "c:3".into()], None);
        let mut picks = Picks::default();
        let mut slots = Vec::new();
        let owned = |choices: &[(&str, bool)]| -> Vec<(String, bool)> {
            choices.iter().map(|(a, p)| ((*a).to_owned(), *p)).collect()
        };
        let check = |picks: &mut Picks<usize>, slots: &mut Vec<String>, want, expected| {
            let [cached, fresh] = both_choose(&t, picks, slots, want);
            assert_eq!(cached, expected, "{want:?}");
            assert_eq!(cached, fresh, "{want:?}: the same choice as node_now");
        };
        // Nothing checked yet: no node.
        for want in [Want::Primary, Want::Replica, Want::Any] {
            check(&mut picks, &mut slots, want, vec![]);
        }
        t.update("a:1", Role::Primary, true);
        t.update("b:2", Role::Replica, true);
        t.update("c:3", Role::Replica, true);
        check(
            &mut picks,
            &mut slots,
            Want::Primary,
            owned(&[("a:1", true)]),
        );
        check(
            &mut picks,
            &mut slots,
            Want::Replica,
            owned(&[("b:2", false), ("c:3", false)]),
        );
        check(&mut picks, &mut slots, Want::Any, owned(&[("a:1", true)]));
        assert_eq!(slots, ["a:1", "b:2", "c:3"], "one slot per node");

        // A replica goes down: the next pick sees it, with new slots.
        t.mark_down("b:2");
        check(
            &mut picks,
            &mut slots,
            Want::Replica,
            owned(&[("c:3", false)]),
        );
        assert_eq!(slots[3..], ["c:3"]);
        // No replica left: a read takes the primary.
        t.mark_down("c:3");
        check(
            &mut picks,
            &mut slots,
            Want::Replica,
            owned(&[("a:1", true)]),
        );
        // No primary: any node is a replica; nothing for a write.
        t.update("c:3", Role::Unknown, true);
        t.mark_down("a:1");
        check(&mut picks, &mut slots, Want::Any, owned(&[("c:3", false)]));
        check(&mut picks, &mut slots, Want::Primary, vec![]);

        // A lag limit set by a reload moves the generation too.
        t.update("a:1", Role::Primary, true);
        t.observe("a:1", Role::Primary, true, Some(1000));
        t.observe("c:3", Role::Replica, true, Some(500));
        check(
            &mut picks,
            &mut slots,
            Want::Replica,
            owned(&[("c:3", false)]),
        );
        t.set_max_lag(Some(100));
        check(
            &mut picks,
            &mut slots,
            Want::Replica,
            owned(&[("a:1", true)]),
        );
        // A health check that changes nothing keeps the generation, and the slots.
        let made = slots.len();
        let generation = t.generation();
        t.observe("c:3", Role::Replica, true, Some(500));
        assert_eq!(t.generation(), generation);
        check(
            &mut picks,
            &mut slots,
            Want::Replica,
            owned(&[("a:1", true)]),
        );
        assert_eq!(slots.len(), made);
    }

    #[test]
    fn update_reports_changes_only() {
        let t = handle();
        assert!(t.update("a:1", Role::Primary, true).is_some());
        assert!(t.update("a:1", Role::Primary, true).is_none());
        let previous = t.update("a:1", Role::Replica, true).expect("role flip");
        assert_eq!(previous.role, Role::Primary);
    }

    #[tokio::test]
    async fn wait_primary_wakes_on_change() {
        let t = handle();
        let waiter = {
            let t = Arc::clone(&t);
            tokio::spawn(async move { t.wait_primary(Duration::from_secs(10)).await })
        };
        tokio::task::yield_now().await;
        t.update("b:2", Role::Primary, true);
        assert_eq!(waiter.await.ok().flatten().as_deref(), Some("b:2"));
        assert_eq!(handle().wait_primary(Duration::from_millis(10)).await, None);
    }
}
