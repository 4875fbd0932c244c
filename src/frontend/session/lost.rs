//! A server that dies under a request (killed, crashed, its host gone) without announcing
//! its shutdown: the client is told with an ERROR and goes on, as a client of PostgreSQL
//! goes on after a failed statement, instead of losing its connection.
//!
//! - Inside a transaction, the transaction is gone with its server: ERROR 08006 and
//!   ReadyForQuery `E`. The session is then Aborted: pgway answers the client's `ROLLBACK`
//!   (or `COMMIT`, which PostgreSQL answers `ROLLBACK` in a failed transaction) itself,
//!   and anything else with 25P02, until then.
//! - A request that may have committed (a `COMMIT`, or a write outside a transaction) gets
//!   08007, transaction resolution unknown, and ReadyForQuery `I`: pgway cannot know
//!   whether the server committed before it died.
//! - A request outside a transaction that wrote nothing (a read, or anything a replica
//!   ran), that the server reported no error for, and none of whose answer reached the
//!   client (pgway holds back the first 32 KiB of such an answer until it ends) runs
//!   again on another node: the client sees no error (see `Session::lost`). Anything
//!   else (a read whose answer had reached the client) gets 08006 and ReadyForQuery `I`.
//! - A request answered whole whose server died under pgway's own WAL position query
//!   after it (read-your-writes) gets its ReadyForQuery: it succeeded. The next read looks
//!   up the primary's position before it goes to a replica.
//!
//! An unsynced batch gets the error now and its ReadyForQuery at its Sync (SkipToSync).
//! A pinned client (session state on that server) or one in COPY still loses its
//! connection (FATAL 08006): what it relied on is gone.

use bytes::BytesMut;
use tracing::warn;

use super::batch::Batch;
use super::relay::local_reply;
use super::{Session, SessionError, State, Transaction};
use crate::error::ClientError;
use crate::protocol::frame::put_frame;
use crate::protocol::messages::{self, Bind, Parse, Target};

impl Session<'_> {
    /// The session can go on without the server it lost: it held it for a request or a
    /// transaction only (not pinned, not in COPY).
    pub(super) fn survives_server_loss(&self) -> bool {
        matches!(self.state, State::Attached(_))
    }

    /// Tells the client its request failed with its server (see the module doc); `ready`:
    /// the request ends with ReadyForQuery (else the batch awaits its Sync).
    pub(super) async fn server_died(
        &mut self,
        cause: &str,
        ready: bool,
    ) -> Result<(), SessionError> {
        if self.request.held_ready.is_some_and(|status| status == b'I') {
            return self.position_lost(cause).await;
        }
        let status = self.state.status();
        let unknown = self.request.may_have_changed(status == b'I');
        let error = if unknown {
            ClientError::TransactionResolutionUnknown(cause.to_owned())
        } else if status == b'I' {
            ClientError::StatementLost(cause.to_owned())
        } else {
            ClientError::TransactionLost(cause.to_owned())
        };
        let after = if status != b'I' && !unknown {
            b'E'
        } else {
            b'I'
        };
        self.drop_lost_server(cause, error.sqlstate());
        for name in self.request.named.drain(..) {
            self.statements.remove(&name);
        }
        // The server's own error for the request (its FATAL, passed on as an ERROR) tells
        // the client already.
        let told = self.request.failed;
        self.request.reset();
        self.txn = Transaction::default();
        if !told {
            self.shared.metrics.error(error.sqlstate());
            error.write(&mut self.out);
        }
        if ready {
            messages::ready_for_query(&mut self.out, after);
            self.state = if after == b'E' {
                State::Aborted
            } else {
                State::Idle
            };
        } else {
            self.state = State::SkipToSync(after);
        }
        self.flush().await
    }

    /// Lets go of the server connection lost under the request (`code`: what the client is
    /// told) and of what was owed to it.
    fn drop_lost_server(&mut self, cause: &str, code: &str) {
        if let Some(link) = std::mem::replace(&mut self.state, State::Idle).link() {
            let addr = &link.conn.addr;
            self.span.in_scope(|| {
                warn!(node = %addr, %cause, code, "server connection lost under a request; the client is told and goes on");
            });
            // One backend may have been terminated on a healthy node: the node's health
            // check runs now and takes it out of rotation only if it is down.
            self.shared.topology.wake(addr);
        }
        self.cancel.slot.clear();
        self.expected.clear();
        self.to_server.clear();
    }

    /// The request was answered whole, its transaction over (its ReadyForQuery `I` is
    /// held), and only pgway's WAL position query after it went with the server: the
    /// client gets its ReadyForQuery, not an error. What it wrote committed at a position
    /// pgway does not know, so the next read looks up the primary's (`position_lost`).
    async fn position_lost(&mut self, cause: &str) -> Result<(), SessionError> {
        self.drop_lost_server(cause, "none: the request was answered");
        let Some(ready) = self.request.held_ready.take() else {
            return Ok(());
        };
        if std::mem::take(&mut self.request.ask_seen) {
            // A cacheable read whose position went with its server: not stored, since
            // later hits could not be held to what this client saw.
            if let (Some(fill), Some(cache)) = (self.fill.take(), &self.shared.cache) {
                cache.abandon(fill);
            }
        }
        let kept = std::mem::take(&mut self.request.kept_writes) && !self.txn.rolled_back;
        self.end_written(kept, 0);
        self.position_lost |= kept && self.floor.is_some();
        self.request.reset();
        self.txn = Transaction::default();
        messages::ready_for_query(&mut self.out, ready);
        self.flush().await
    }

    /// A simple query in a lost transaction: a transaction end is answered `ROLLBACK`
    /// (then Idle), anything else 25P02.
    pub(super) async fn answer_aborted_query(&mut self, sql: &[u8]) -> Result<(), SessionError> {
        if !ends_transaction(sql) {
            return self.report(ClientError::InFailedTransaction, true).await;
        }
        self.state = State::Idle;
        put_frame(&mut self.out, b'C', b"ROLLBACK\0");
        messages::ready_for_query(&mut self.out, b'I');
        self.flush().await
    }

    /// An extended-protocol batch in a lost transaction: Parse, Bind, Describe, Execute
    /// and Close of a transaction end are answered as the server would (Execute with
    /// `ROLLBACK`, then Idle at Sync); at the first other message, 25P02 and the rest up
    /// to Sync is skipped.
    pub(super) async fn answer_aborted_batch(
        &mut self,
        batch: &Batch,
        sync: bool,
    ) -> Result<(), SessionError> {
        // Statements of this batch that end the transaction, by name.
        let mut parsed: Vec<(Vec<u8>, bool)> = Vec::new();
        let mut ended = false;
        for frame in batch.iter() {
            let ok = match frame[0] {
                b'P' => {
                    let parse = Parse::decode(frame).map_err(SessionError::protocol)?;
                    let end = ends_transaction(parse.sql);
                    parsed.retain(|(name, _)| name != parse.name);
                    parsed.push((parse.name.to_vec(), end));
                    end.then(|| local_reply(b'1'))
                }
                b'B' => {
                    let bind = Bind::decode(frame).map_err(SessionError::protocol)?;
                    self.ends_transaction_named(&parsed, bind.statement)
                        .then(|| local_reply(b'2'))
                }
                b'D' => {
                    let target = Target::decode(frame).map_err(SessionError::protocol)?;
                    let mut reply = BytesMut::new();
                    if target.kind == b'S' {
                        put_frame(&mut reply, b't', &[0, 0]);
                    }
                    reply.extend_from_slice(&local_reply(b'n'));
                    Some(reply)
                }
                b'E' => {
                    ended = true;
                    let mut reply = BytesMut::new();
                    put_frame(&mut reply, b'C', b"ROLLBACK\0");
                    Some(reply)
                }
                b'C' => Some(local_reply(b'3')),
                b'H' | b'S' => Some(BytesMut::new()),
                _ => None,
            };
            match ok {
                Some(reply) => self.out.extend_from_slice(&reply),
                None => {
                    ClientError::InFailedTransaction.write(&mut self.out);
                    if sync {
                        messages::ready_for_query(&mut self.out, b'E');
                    } else {
                        self.state = State::SkipToSync(b'E');
                    }
                    return self.flush().await;
                }
            }
        }
        if sync {
            let status = if ended { b'I' } else { b'E' };
            if ended {
                self.state = State::Idle;
            }
            messages::ready_for_query(&mut self.out, status);
        } else if ended {
            // Flushed ends before the Sync: the rest of the batch runs outside it.
            self.state = State::SkipToSync(b'I');
        }
        self.flush().await
    }

    /// The statement `name` (parsed in this batch, or earlier) ends a transaction.
    fn ends_transaction_named(&self, parsed: &[(Vec<u8>, bool)], name: &[u8]) -> bool {
        if let Some((_, end)) = parsed.iter().rev().find(|(n, _)| n == name) {
            return *end;
        }
        let earlier = if name.is_empty() {
            self.unnamed.as_ref()
        } else {
            self.statements.get(name)
        };
        earlier.is_some_and(|prepared| ends_transaction(&prepared.sql))
    }
}

/// `ROLLBACK`, `ABORT`, `COMMIT` or `END` (with `WORK` or `TRANSACTION`, and `AND NO
/// CHAIN`), alone: what ends a failed transaction. (`ROLLBACK TO SAVEPOINT` does not: the
/// savepoint died with the server.)
fn ends_transaction(sql: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(sql) else {
        return false;
    };
    let text = text.trim().trim_end_matches(';').to_ascii_lowercase();
    let mut words = text.split_whitespace();
    if !matches!(words.next(), Some("rollback" | "abort" | "commit" | "end")) {
        return false;
    }
    let rest: Vec<&str> = words.collect();
    matches!(
        rest.as_slice(),
        [] | ["work" | "transaction"]
            | ["and", "no", "chain"]
            | ["work" | "transaction", "and", "no", "chain"]
    )
}

#[cfg(test)]
mod tests {
    use super::ends_transaction;

    #[test]
    fn what_ends_a_failed_transaction() {
        for yes in [
            "rollback",
            "ROLLBACK;",
            " abort work ",
            "commit",
            "END TRANSACTION",
            "rollback and no chain",
        ] {
            assert!(ends_transaction(yes.as_bytes()), "{yes}");
        }
        for no in [
            "rollback to savepoint a",
            "rollback prepared 'x'",
            "select 1",
            "commit and chain",
            "rollback; select 1",
        ] {
            assert!(!ends_transaction(no.as_bytes()), "{no}");
        }
    }
}
