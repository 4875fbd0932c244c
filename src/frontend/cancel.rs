//! Cancel keys: each client gets a BackendKeyData of pgway's own; a CancelRequest with it
//! is forwarded, with the server's own key, to the server connection currently running
//! that client's query. A cancel for a client with nothing running does nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::protocol::messages::CANCEL_REQUEST_CODE;
use crate::sync::lock;

/// The server connection a client is using right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelTarget {
    /// Node `host:port`.
    pub addr: Arc<str>,
    /// The server's BackendKeyData.
    pub pid: i32,
    /// The server's secret key.
    pub secret: i32,
}

/// The server connection a client holds, if any: written by its session when it takes or
/// gives back a server connection, read by a CancelRequest with the client's key and by the
/// console (`SHOW CLIENTS`). One record for both, so taking a connection takes one
/// uncontended mutex; giving it back is one plain store (`holding`).
#[derive(Debug)]
pub struct ServerSlot {
    last: Mutex<Held>,
    /// A connection is held now (`last` describes it). Set after `last` is written, under
    /// its mutex's release; readers look at it first. Only the slot's session writes it.
    holding: AtomicBool,
}

#[derive(Debug)]
struct Held {
    /// The node of the last connection held: kept when the connection is given back, so
    /// that taking the next one from the same node (nearly always the case) copies no
    /// address.
    addr: Option<Arc<str>>,
    pid: i32,
    secret: i32,
    since: Instant,
}

impl ServerSlot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        lock(&self.last)
    }

    /// The client took the connection with BackendKeyData `pid`/`secret` on `addr`, lent
    /// at `since`.
    pub fn hold(&self, addr: &Arc<str>, pid: i32, secret: i32, since: Instant) {
        let mut held = self.lock();
        if !held.addr.as_ref().is_some_and(|a| Arc::ptr_eq(a, addr)) {
            held.addr = Some(Arc::clone(addr));
        }
        held.pid = pid;
        held.secret = secret;
        held.since = since;
        drop(held);
        self.holding.store(true, Ordering::Release);
    }

    /// The client holds no server connection any more.
    pub fn clear(&self) {
        self.holding.store(false, Ordering::Release);
    }

    /// The connection held now and since when, if any.
    pub fn held(&self) -> Option<(CancelTarget, Instant)> {
        if !self.is_held() {
            return None;
        }
        let held = self.lock();
        held.addr.as_ref().map(|addr| {
            let target = CancelTarget {
                addr: Arc::clone(addr),
                pid: held.pid,
                secret: held.secret,
            };
            (target, held.since)
        })
    }

    /// A connection is held now.
    pub fn is_held(&self) -> bool {
        self.holding.load(Ordering::Acquire)
    }
}

impl Default for ServerSlot {
    /// Nothing held (`since` is read only while something is).
    fn default() -> Self {
        Self {
            last: Mutex::new(Held {
                addr: None,
                pid: 0,
                secret: 0,
                since: Instant::now(),
            }),
            holding: AtomicBool::new(false),
        }
    }
}

#[derive(Debug)]
struct Entry {
    secret: i32,
    slot: Arc<ServerSlot>,
}

/// All keys handed out.
#[derive(Debug, Default)]
pub struct CancelRegistry {
    entries: Mutex<HashMap<i32, Entry>>,
}

/// Unregisters a client's key when dropped.
#[derive(Debug)]
pub struct CancelKey<'a> {
    registry: &'a CancelRegistry,
    /// pgway's process id for this client.
    pub pid: i32,
    /// pgway's secret for this client.
    pub secret: i32,
    /// Where a cancel should go (the client registry's entry shares it).
    pub slot: Arc<ServerSlot>,
}

impl Drop for CancelKey<'_> {
    fn drop(&mut self) {
        lock(&self.registry.entries).remove(&self.pid);
    }
}

impl CancelRegistry {
    /// Hands out a new unique key.
    pub fn register(&self) -> CancelKey<'_> {
        let mut rng = rand::thread_rng();
        let slot = Arc::new(ServerSlot::default());
        let mut entries = lock(&self.entries);
        loop {
            let pid = rng.gen_range(1..i32::MAX);
            if entries.contains_key(&pid) {
                continue;
            }
            let secret = rng.gen();
            entries.insert(
                pid,
                Entry {
                    secret,
                    slot: Arc::clone(&slot),
                },
            );
            return CancelKey {
                registry: self,
                pid,
                secret,
                slot,
            };
        }
    }

    /// The server to cancel for this key, if the key is valid and its client is busy.
    pub fn target(&self, pid: i32, secret: i32) -> Option<CancelTarget> {
        let entries = lock(&self.entries);
        let entry = entries.get(&pid).filter(|e| e.secret == secret)?;
        entry.slot.held().map(|(target, _)| target)
    }
}

/// Sends a CancelRequest to a server (best effort, bounded by `timeout`).
pub async fn send_cancel(target: &CancelTarget, timeout: Duration) -> std::io::Result<()> {
    let mut packet = [0u8; 16];
    packet[0..4].copy_from_slice(&16i32.to_be_bytes());
    packet[4..8].copy_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
    packet[8..12].copy_from_slice(&target.pid.to_be_bytes());
    packet[12..16].copy_from_slice(&target.secret.to_be_bytes());
    let send = async {
        let mut stream = TcpStream::connect(&*target.addr).await?;
        stream.write_all(&packet).await?;
        // PostgreSQL closes the connection once it has signalled the backend. Waiting for
        // that keeps the client's cancel call as synchronous as it is without pgway, so a
        // late cancel cannot hit the client's next query.
        let mut sink = [0u8; 64];
        while stream.read(&mut sink).await? > 0 {}
        Ok(())
    };
    crate::timer::timeout(timeout, send)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "cancel timed out"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked_and_removed() {
        let registry = CancelRegistry::default();
        let key = registry.register();
        assert_eq!(registry.target(key.pid, key.secret), None);
        let target = CancelTarget {
            addr: "127.0.0.1:1".into(),
            pid: 42,
            secret: 7,
        };
        let addr: Arc<str> = "127.0.0.1:1".into();
        key.slot.hold(&addr, 42, 7, Instant::now());
        assert_eq!(registry.target(key.pid, key.secret), Some(target.clone()));
        key.slot.clear();
        assert_eq!(registry.target(key.pid, key.secret), None);
        // Held again on the same node: the address is kept, the key is the new one.
        key.slot.hold(&addr, 43, 8, Instant::now());
        let again = registry.target(key.pid, key.secret);
        assert_eq!(again.as_ref().map(|t| (t.pid, t.secret)), Some((43, 8)));
        assert!(again.is_some_and(|t| Arc::ptr_eq(&t.addr, &addr)));
        // On another node: the address is replaced.
        key.slot.hold(&"127.0.0.1:2".into(), 44, 9, Instant::now());
        let moved = registry.target(key.pid, key.secret);
        assert_eq!(
            moved.map(|t| t.addr.to_string()),
            Some("127.0.0.1:2".to_owned())
        );
        assert_eq!(registry.target(key.pid, key.secret.wrapping_add(1)), None);
        let pid = key.pid;
        let secret = key.secret;
        drop(key);
        assert_eq!(registry.target(pid, secret), None);
    }
}
