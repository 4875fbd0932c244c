//! Read-your-writes in the session: after a request that may have written commits on the
//! primary, the WAL position that covers it raises the client's floor before the client
//! sees ReadyForQuery; a read under a floor goes to a replica that has replayed it, or
//! (after `routing.read_your_writes_wait`) to the primary.
//!
//! The position comes from `pg_current_wal_insert_lsn()`, sent in the same write as the
//! request, right after it, on the same connection (no extra round trip): the insert
//! position covers the commit record even under `synchronous_commit = off`, where the
//! write position can lag it. The client's ReadyForQuery is held until that answer is in.

use std::sync::Arc;

use super::relay::{Expect, Reply};
use super::{Session, SessionError};
use crate::protocol::messages;
use crate::route::floors::parse_lsn;

/// The WAL position query pgway sends after a committing write.
const WAL_POSITION_QUERY: &str = "SELECT pg_catalog.pg_current_wal_insert_lsn()";

/// True if `sql` may run a `COPY` (a word scan).
pub(super) fn may_copy(sql: &[u8]) -> bool {
    sql.split(|b| !(b.is_ascii_alphanumeric() || *b == b'_'))
        .any(|word| word.eq_ignore_ascii_case(b"copy"))
}

/// True if `sql` may end a transaction with a commit (`COMMIT`, `END`): a word scan, run
/// only inside transactions that wrote.
pub(super) fn may_commit(sql: &[u8]) -> bool {
    sql.split(|b| !(b.is_ascii_alphanumeric() || *b == b'_'))
        .any(|word| word.eq_ignore_ascii_case(b"commit") || word.eq_ignore_ascii_case(b"end"))
}

impl Session<'_> {
    /// After a request that ends with ReadyForQuery is queued: if it may commit a write,
    /// the WAL position query follows it.
    pub(super) fn queue_wal_position(&mut self) {
        if self.floor.is_none() {
            return;
        }
        let Some(link) = self.state.link() else {
            return;
        };
        let commits = if link.status == b'I' {
            self.request.may_write
        } else {
            (self.txn.wrote || self.request.may_write) && self.request.commits
        };
        if !commits {
        } else if self.request.copies {
            // A query sent behind a COPY FROM STDIN would reach the server as copy data:
            // this one is asked once the request is answered (its ReadyForQuery waits).
            self.request.wal_deferred = true;
        } else {
            self.queue_wal_query();
        }
    }

    fn queue_wal_query(&mut self) {
        messages::query(&mut self.to_server, WAL_POSITION_QUERY);
        self.expect(Reply::WalPosition, false, None);
    }

    /// After a request whose WAL position query was deferred (a COPY): asks it now, and
    /// relays its answer, which lets the client's ReadyForQuery go.
    pub(super) async fn ask_deferred_wal_position(&mut self) -> Result<(), SessionError> {
        if !std::mem::take(&mut self.request.wal_deferred) {
            return Ok(());
        }
        if self.request.held_ready.is_none() {
            return Ok(());
        }
        self.queue_wal_query();
        self.send_and_relay(true).await
    }

    /// The client's ReadyForQuery, if the WAL position query follows it: held until that
    /// answer is in. True if held.
    pub(super) fn hold_ready(&mut self, frame: &[u8]) -> bool {
        let follows = matches!(
            self.expected.get(1),
            Some(Expect::Server {
                kind: Reply::WalPosition,
                ..
            })
        ) || (self.request.wal_deferred && self.expected.len() == 1);
        if follows {
            self.request.held_ready = Some(frame.into());
        }
        follows
    }

    /// A reply to the WAL position query: nothing of it reaches the client (an error, say
    /// in a failed transaction, only means no position); at its end the floor is raised
    /// if the client's request left no transaction open, and the client's ReadyForQuery
    /// goes out.
    pub(super) fn on_wal_position_frame(&mut self, frame: &[u8]) {
        match frame[0] {
            b'A' => self.out.extend_from_slice(frame),
            b'D' => {
                // One column: int16 count, int32 length, the text.
                let text = frame
                    .get(11..)
                    .and_then(|text| std::str::from_utf8(text).ok());
                self.request.wal_position = text.and_then(parse_lsn);
            }
            b'Z' => {
                self.expected.pop_front();
                let Some(ready) = self.request.held_ready.take() else {
                    return;
                };
                let position = self.request.wal_position.take();
                if let (Some(position), Some(floor), Some(&b'I')) =
                    (position, &self.floor, ready.get(5))
                {
                    floor.raise(position);
                    self.last_write = position;
                }
                self.out.extend_from_slice(&ready);
            }
            _ => {}
        }
    }

    /// The position a read must see now (0: none).
    pub(super) fn read_floor(&self) -> u64 {
        self.floor.as_ref().map_or(0, |floor| floor.get())
    }

    /// For a read under a floor: a readable replica that has replayed it (waiting up to
    /// `routing.read_your_writes_wait` for one), else `None` (the primary then).
    pub(super) async fn replica_at(&self, position: u64) -> Option<Arc<str>> {
        let shared = self.shared;
        let candidates = shared.topology.readable_replicas();
        shared
            .replay
            .first_at(
                &candidates,
                position,
                shared.config.routing.read_your_writes_wait,
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::may_commit;

    #[test]
    fn commits_are_found_by_word() {
        assert!(may_commit(b"COMMIT"));
        assert!(may_commit(b"update t set a = 1; end"));
        assert!(!may_commit(b"rollback"));
        assert!(!may_commit(b"select committed, endpoint from t"));
    }
}
