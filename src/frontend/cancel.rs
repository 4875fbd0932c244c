//! Cancel keys: each client gets a BackendKeyData of pgway's own; a CancelRequest with it
//! is forwarded, with the server's own key, to the server connection currently running
//! that client's query. A cancel for a client with nothing running does nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::protocol::messages::CANCEL_REQUEST_CODE;

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

/// A client's slot: updated when it takes or returns a server connection.
pub type CancelSlot = Arc<Mutex<Option<CancelTarget>>>;

#[derive(Debug)]
struct Entry {
    secret: i32,
    slot: CancelSlot,
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
    /// Where a cancel should go.
    pub slot: CancelSlot,
}

impl Drop for CancelKey<'_> {
    fn drop(&mut self) {
        if let Ok(mut entries) = self.registry.entries.lock() {
            entries.remove(&self.pid);
        }
    }
}

impl CancelKey<'_> {
    /// A cancel for this client now goes to `target` (the client took a server connection).
    pub fn point_to(&self, target: CancelTarget) {
        if let Ok(mut slot) = self.slot.lock() {
            *slot = Some(target);
        }
    }

    /// A cancel for this client now does nothing (it holds no server connection).
    pub fn clear(&self) {
        if let Ok(mut slot) = self.slot.lock() {
            *slot = None;
        }
    }
}

impl CancelRegistry {
    /// Hands out a new unique key.
    pub fn register(&self) -> CancelKey<'_> {
        let mut rng = rand::thread_rng();
        let slot: CancelSlot = Arc::new(Mutex::new(None));
        let mut entries = match self.entries.lock() {
            Ok(e) => e,
            Err(poisoned) => poisoned.into_inner(),
        };
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
        let entries = self.entries.lock().ok()?;
        let entry = entries.get(&pid).filter(|e| e.secret == secret)?;
        let target = entry.slot.lock().ok()?.clone();
        target
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
        *key.slot.lock().unwrap() = Some(target.clone());
        assert_eq!(registry.target(key.pid, key.secret), Some(target));
        assert_eq!(registry.target(key.pid, key.secret.wrapping_add(1)), None);
        let pid = key.pid;
        let secret = key.secret;
        drop(key);
        assert_eq!(registry.target(pid, secret), None);
    }
}
