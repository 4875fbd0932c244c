//! The current topology: which node is the primary, which replicas take reads.
//!
//! Watchers (only [`health`] for `kind = "static"` so far) publish node states; routing
//! reads a snapshot with one atomic load. Changes are announced on a `watch` channel so
//! a client waiting for a primary wakes as soon as one appears.

pub mod health;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;

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
    /// `host:port`.
    pub addr: String,
    /// Last observed role.
    pub role: Role,
    /// False after a failed health check or connect, until a check succeeds.
    pub healthy: bool,
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
            .find(|n| n.healthy && n.role == Role::Primary)
    }
}

/// The shared, swappable topology.
#[derive(Debug)]
pub struct TopologyHandle {
    current: ArcSwap<Topology>,
    changed: watch::Sender<u64>,
    next_replica: AtomicUsize,
}

impl TopologyHandle {
    /// Starts with every node's role unknown and healthy (so the first connect can try it).
    pub fn new(addrs: &[String]) -> Arc<Self> {
        let nodes = addrs
            .iter()
            .map(|addr| Node {
                addr: addr.clone(),
                role: Role::Unknown,
                healthy: true,
            })
            .collect();
        Arc::new(Self {
            current: ArcSwap::from_pointee(Topology { nodes }),
            changed: watch::channel(0).0,
            next_replica: AtomicUsize::new(0),
        })
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Topology> {
        self.current.load_full()
    }

    /// Address of the healthy primary, if there is one.
    pub fn primary(&self) -> Option<String> {
        self.current.load().primary().map(|n| n.addr.clone())
    }

    /// A healthy replica, round-robin across all of them.
    pub fn replica(&self) -> Option<String> {
        let topology = self.current.load();
        let replicas: Vec<&Node> = topology
            .nodes
            .iter()
            .filter(|n| n.healthy && n.role == Role::Replica)
            .collect();
        if replicas.is_empty() {
            return None;
        }
        let i = self.next_replica.fetch_add(1, Ordering::Relaxed) % replicas.len();
        Some(replicas[i].addr.clone())
    }

    /// Records a node's observed state; returns the previous state if it changed.
    pub fn update(&self, addr: &str, role: Role, healthy: bool) -> Option<Node> {
        let mut previous = None;
        self.current.rcu(|current| {
            let mut next = Topology::clone(current);
            previous = None;
            for node in next.nodes.iter_mut().filter(|n| n.addr == addr) {
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
            }
            next
        });
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
    pub async fn wait_primary(&self, timeout: Duration) -> Option<String> {
        let mut changes = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(addr) = self.primary() {
                return Some(addr);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
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
        let picks: Vec<String> = (0..4).filter_map(|_| t.replica()).collect();
        assert!(picks.contains(&"b:2".to_owned()) && picks.contains(&"c:3".to_owned()));
        t.mark_down("b:2");
        assert!((0..4).all(|_| t.replica().as_deref() == Some("c:3")));
        t.mark_down("c:3");
        assert_eq!(t.replica(), None);
        // A health check that passes puts it back, with its role kept.
        t.update("c:3", Role::Unknown, true);
        assert_eq!(t.replica().as_deref(), Some("c:3"));
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
