//! Replies: what is expected of the server, in what order, and relaying it.
//!
//! Every message sent to the server adds one [`Expect`] to the session's queue, saying
//! which reply ends its answer and whether the client sees it. Replies the client must see
//! for messages pgway answered itself (ParseComplete, CloseComplete) wait in the queue as
//! [`Expect::Local`], so they reach the client in order; replies to messages pgway
//! injected (a Parse of a statement the connection lacks, the settings sync) are
//! swallowed.

use std::sync::Arc;

use bytes::{Buf, BytesMut};
use tracing::{info, warn};

use super::{no_server, Copy, Redo, Session, SessionError, State};
use crate::error::{is_read_only_refusal, is_recovery_conflict, is_shutdown, ClientError};
use crate::frontend::cancel::{send_cancel, CancelTarget};
use crate::net::NetError;
use crate::protocol::frame::{frame_len, put_frame};
use crate::protocol::messages;
use crate::protocol::MAX_MESSAGE_LEN;

/// How much of a read's answer pgway holds back from its client until the answer ends, so
/// that the read can run again on another node if its server dies under it (a larger
/// answer streams on, and a server lost after that costs the client an error). PostgreSQL
/// sends an answer in 8 KiB pieces as they fill.
const HELD_ANSWER: usize = 32 * 1024;

/// Which server reply ends the answer to one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reply {
    Parse,
    Bind,
    Close,
    Describe,
    Execute,
    Sync,
    Query,
    FunctionCall,
    /// pgway's WAL position query after a committing write (see `freshness`).
    WalPosition,
    /// The same joined to a `COMMIT`, before the Sync they share: its answer ends at
    /// CommandComplete.
    WalRow,
}

impl Reply {
    fn ends_with(self, tag: u8) -> bool {
        match self {
            Reply::Parse => tag == b'1',
            Reply::Bind => tag == b'2',
            Reply::Close => tag == b'3',
            Reply::Describe => matches!(tag, b'T' | b'n'),
            Reply::Execute | Reply::WalRow => matches!(tag, b'C' | b'I' | b's'),
            Reply::Sync | Reply::Query | Reply::FunctionCall | Reply::WalPosition => tag == b'Z',
        }
    }

    /// Simple query and function call keep going after an error, up to ReadyForQuery.
    fn survives_error(self) -> bool {
        matches!(
            self,
            Reply::Query | Reply::FunctionCall | Reply::Sync | Reply::WalPosition
        )
    }
}

/// One message sent (or answered locally), in order.
#[derive(Debug)]
pub(super) enum Expect {
    /// Server replies until `kind` ends; forwarded to the client or swallowed.
    Server {
        kind: Reply,
        forward: bool,
        /// A Parse pgway sent under this hash: forget it on the connection if it fails.
        prepared: Option<u64>,
    },
    /// A reply pgway sends itself when its turn comes (ParseComplete, CloseComplete, or an
    /// error pgway raised for a message of the batch).
    Local(BytesMut),
    /// Follows the reply to a client's named Parse: once everything before it was answered,
    /// the statement exists. Skipped after an error (the Parse failed, or the server
    /// skipped it), the client's name is forgotten again, as PostgreSQL never created it.
    Defines(Vec<u8>),
}

/// Whether a replica's ErrorResponse gives the request up to the primary, and why.
fn redo_of(frame: &[u8]) -> Option<Redo> {
    if is_read_only_refusal(frame) {
        Some(Redo::Write)
    } else if is_recovery_conflict(frame) {
        Some(Redo::RecoveryConflict)
    } else {
        None
    }
}

/// A message with an empty body: a reply pgway gives itself (ParseComplete,
/// CloseComplete), or the Flush it puts after a Bind the server will refuse.
pub(super) fn local_reply(tag: u8) -> BytesMut {
    let mut frame = BytesMut::new();
    put_frame(&mut frame, tag, &[]);
    frame
}

impl Session<'_> {
    pub(super) fn expect(&mut self, kind: Reply, forward: bool, prepared: Option<u64>) {
        self.expected.push_back(Expect::Server {
            kind,
            forward,
            prepared,
        });
    }

    /// Sends pgway's own replies that are due (and passes the statements defined by now).
    /// Inline: called a few times per answer, where nearly always none is due.
    #[inline]
    pub(super) fn emit_local(&mut self) {
        if let Some(Expect::Local(_) | Expect::Defines(_)) = self.expected.front() {
            self.emit_due_local();
        }
    }

    /// [`Self::emit_local`] once one is due.
    fn emit_due_local(&mut self) {
        while let Some(Expect::Local(_) | Expect::Defines(_)) = self.expected.front() {
            if let Some(Expect::Local(frame)) = self.expected.pop_front() {
                self.out.extend_from_slice(&frame);
            }
        }
    }

    /// Drops what the server skips after an error in the extended protocol: everything up
    /// to the next Sync.
    fn skip_to_sync(&mut self) {
        while let Some(front) = self.expected.front() {
            match front {
                Expect::Server {
                    kind: Reply::Sync, ..
                } => break,
                Expect::Server {
                    prepared: Some(hash),
                    ..
                } => {
                    let hash = *hash;
                    if let Some(link) = self.state.link_mut() {
                        link.conn.statements.remove(hash);
                    }
                }
                Expect::Defines(name) => {
                    self.statements.remove(name);
                }
                _ => {}
            }
            self.expected.pop_front();
        }
    }

    /// CopyInResponse: the client's next messages are COPY data (Attached or Pinned ->
    /// CopyIn). `extended`: the COPY came with Execute, not a simple Query.
    fn enter_copy(&mut self, extended: bool) {
        let copy = |pin| Copy {
            pin,
            extended,
            until_sync: false,
        };
        self.state = match std::mem::replace(&mut self.state, State::Idle) {
            State::Attached(link) => State::CopyIn(link, copy(None)),
            State::Pinned(link, reason) => State::CopyIn(link, copy(Some(reason))),
            other => other,
        };
    }

    /// The copy's data is over (the client's CopyDone or CopyFail, or the server's error).
    /// After a simple-Query COPY that ends it; after an extended one, the client's
    /// messages go on to the server up to its Sync.
    fn end_copy_data(&mut self) {
        match &mut self.state {
            State::CopyIn(_, copy) if copy.extended => copy.until_sync = true,
            _ => self.leave_copy(),
        }
    }

    /// COPY is over: CopyIn -> Attached or Pinned.
    fn leave_copy(&mut self) {
        if let State::CopyIn(..) = self.state {
            self.state = match std::mem::replace(&mut self.state, State::Idle) {
                State::CopyIn(link, Copy { pin: None, .. }) => State::Attached(link),
                State::CopyIn(
                    link,
                    Copy {
                        pin: Some(reason), ..
                    },
                ) => State::Pinned(link, reason),
                other => other,
            };
        }
    }

    /// Handles one server message: forward or swallow it, and advance the queue.
    fn on_server_frame(&mut self, frame: &[u8]) {
        let tag = frame[0];
        let head = match self.expected.front() {
            Some(Expect::Server {
                kind,
                forward,
                prepared,
            }) => Some((*kind, *forward, *prepared)),
            _ => None,
        };
        if let Some((Reply::WalPosition | Reply::WalRow, ..)) = head {
            self.on_wal_position_frame(frame);
            self.emit_local();
            return;
        }
        let forward = head.is_none_or(|(_, forward, _)| forward);
        // Why the request goes elsewhere, for an error from a replica before the client
        // saw any of its answer.
        let redo = match tag {
            b'E' if self.request.on_replica && self.request.can_retry && !self.request.flushed => {
                redo_of(frame)
            }
            _ => None,
        };
        match tag {
            // Notifications belong to no request and always reach the client.
            b'A' => {
                self.capture(frame);
                self.out.extend_from_slice(frame);
            }
            // Notices and parameter changes from pgway's own queries are not the client's.
            b'N' => {
                if forward {
                    self.capture(frame);
                    self.out.extend_from_slice(frame);
                }
            }
            b'S' => {
                if forward {
                    self.capture(frame);
                    self.on_parameter_status(frame);
                }
            }
            b'G' | b'W' => {
                self.capture(frame);
                self.request.answered = true;
                self.enter_copy(matches!(head, Some((Reply::Execute, ..))));
                self.out.extend_from_slice(frame);
            }
            b'E' if self.request.can_retry && !self.request.answered && is_shutdown(frame) => {
                // The server is going away and did not run the request: send it elsewhere.
                self.request.retry_pending = true;
                return;
            }
            b'E' if redo.is_some() => {
                // A replica refused what pgway took for a read, or cancelled it for a
                // recovery conflict, before the client saw any of it: the rest of the
                // answer is swallowed, and the request goes to the primary (see
                // `send_request`).
                self.request.redo = redo;
                if let Some((kind, _, _)) = head {
                    if !kind.survives_error() {
                        self.expected.pop_front();
                        self.skip_to_sync();
                    }
                }
            }
            _ if self.request.redo.is_some() => {
                if let Some((kind, _, _)) = head {
                    if kind.ends_with(tag) {
                        self.expected.pop_front();
                        if let (b'Z', Some(link)) = (tag, self.state.link_mut()) {
                            link.status = frame.get(5).copied().unwrap_or(b'I');
                            link.unsynced = false;
                            link.skipping = false;
                        }
                    }
                }
            }
            b'E' => {
                // Errors always reach the client, even for a message pgway injected.
                self.capture(frame);
                self.shared.metrics.error(&messages::error_fields(frame).0);
                self.request.answered = true;
                self.forward_error(frame);
                self.end_copy_data();
                if forward {
                    self.request.failed = true;
                } else if let Some(link) = self.state.link_mut() {
                    link.conn.applied.dirty = true;
                }
                if let Some((kind, _, prepared)) = head {
                    if !kind.survives_error() {
                        if let Some(link) = self.state.link_mut() {
                            link.skipping = true;
                            if let Some(hash) = prepared {
                                link.conn.statements.remove(hash);
                            }
                        }
                        self.expected.pop_front();
                        self.skip_to_sync();
                    }
                }
            }
            _ => match head {
                Some((kind, forward, _)) => {
                    if forward {
                        self.capture(frame);
                        self.request.answered = true;
                        let held = tag == b'Z' && self.before_ready(frame);
                        if !held {
                            self.out.extend_from_slice(frame);
                        }
                        if tag == b'C' {
                            self.txn.rolled_back = messages::body(frame).starts_with(b"ROLLBACK");
                            self.request.completed += 1;
                        } else if tag == b'I' {
                            self.request.completed += 1;
                        }
                    }
                    if kind.ends_with(tag) {
                        self.expected.pop_front();
                        if tag == b'Z' {
                            // The server ignores Sync during COPY: ReadyForQuery means the
                            // copy is over (a batch's later message made it fail).
                            self.leave_copy();
                            let status = frame.get(5).copied().unwrap_or(b'I');
                            if let Some(link) = self.state.link_mut() {
                                link.status = status;
                                if kind == Reply::Sync {
                                    link.unsynced = false;
                                    link.skipping = false;
                                }
                            }
                            if forward {
                                self.on_request_done(status);
                                if self.request.joined {
                                    self.release_ready();
                                }
                            }
                        }
                    }
                }
                None => {
                    self.capture(frame);
                    self.request.answered = true;
                    self.out.extend_from_slice(frame);
                }
            },
        }
        self.emit_local();
    }

    /// How many bytes at the start of `buf` [`Self::on_server_frame`] would only pass on to
    /// the client, as one run however many rows a result has: whole rows (DataRow, and
    /// RowDescription where it does not end the reply), and the replies that end a
    /// message's answer with nothing else to do (ParseComplete, BindComplete,
    /// CloseComplete, and a Describe's RowDescription or NoData), whose expectations it
    /// takes off the queue. Only while the reply is the client's (pgway's own queries,
    /// such as the WAL position query, are never forwarded), no cache fill records it, no
    /// retry swallows it, and no reply of pgway's own is due before the next message.
    /// Also says whether it took an expectation off the queue.
    fn plain_replies(&mut self, buf: &[u8]) -> (usize, bool) {
        let plain = |tag| matches!(tag, b'D' | b'T' | b'1' | b'2' | b'3' | b'n');
        if !buf.first().is_some_and(|&tag| plain(tag))
            || self.request.redo.is_some()
            || self.fill.is_some()
        {
            return (0, false);
        }
        let mut end = 0;
        let mut ended = false;
        // The expectation at the head of the queue, looked at again once a reply ends it.
        'head: while let Some(Expect::Server {
            kind,
            forward: true,
            ..
        }) = self.expected.front()
        {
            let kind = *kind;
            while let Some(&tag) = buf.get(end) {
                let ends = match tag {
                    b'D' => false,
                    b'T' => kind == Reply::Describe,
                    b'1' | b'2' | b'3' | b'n' if kind.ends_with(tag) => true,
                    _ => break 'head,
                };
                match frame_len(&buf[end..], MAX_MESSAGE_LEN) {
                    Ok(Some(len)) => end += len,
                    _ => break 'head,
                }
                if ends {
                    self.expected.pop_front();
                    ended = true;
                    continue 'head;
                }
            }
            break;
        }
        (end, ended)
    }

    /// Forwards an ErrorResponse, naming statements as the client named them rather than by
    /// pgway's server-side names.
    /// A FATAL (the server is ending the connection: shut down, terminated) is passed on
    /// as an ERROR where the session survives its server (see `lost.rs`): the client's
    /// connection stays.
    fn forward_error(&mut self, frame: &[u8]) {
        const PREFIX: &str = "pgway_";
        let fatal = matches!(self.state, State::Attached(_))
            && messages::error_severity(frame).is_some_and(|s| s == "FATAL" || s == "PANIC");
        if !fatal && !frame.windows(PREFIX.len()).any(|w| w == PREFIX.as_bytes()) {
            self.out.extend_from_slice(frame);
            return;
        }
        let statements = &self.statements;
        let client_name = |hash: u64| {
            statements
                .iter()
                .find(|(_, p)| p.hash == hash)
                .map(|(name, _)| String::from_utf8_lossy(name).into_owned())
        };
        messages::rewrite_error(frame, &mut self.out, |value| {
            if fatal && (value == "FATAL" || value == "PANIC") {
                return "ERROR".to_owned();
            }
            let mut text = value.to_owned();
            let mut from = 0;
            while let Some(at) = text[from..].find(PREFIX).map(|i| i + from) {
                let hex_end = at + PREFIX.len() + 16;
                let name = text
                    .get(at + PREFIX.len()..hex_end)
                    .and_then(|hex| u64::from_str_radix(hex, 16).ok())
                    .and_then(client_name);
                match name {
                    Some(name) => {
                        text.replace_range(at..hex_end, &name);
                        from = at + name.len();
                    }
                    None => from = at + PREFIX.len(),
                }
            }
            text
        });
    }

    /// Relays server replies to the client until every expected reply has arrived, passing
    /// COPY data from the client to the server meanwhile.
    pub(super) async fn relay(&mut self) -> Result<(), SessionError> {
        self.emit_local();
        // Right after a request went out, nothing of its answer has come yet (nearly
        // always): the first step is then the wait, not a pass over empty buffers.
        let mut wait = self.out.is_empty()
            && !self.expected.is_empty()
            && matches!(self.state, State::Attached(_) | State::Pinned(..))
            && self.server_mut()?.io.rbuf.is_empty();
        loop {
            if wait {
                if matches!(self.state, State::CopyIn(..)) {
                    self.relay_copy().await?;
                } else if self.timeouts.query.is_zero() || self.request.cancel_sent {
                    let filled = self.server_mut()?.io.fill().await;
                    if let Err(e) = filled {
                        return Err(self.lost(e));
                    }
                } else {
                    self.fill_or_cancel().await?;
                }
            }
            wait = true;
            // Frames are handled where they lie in the read buffer (no split per
            // message); the buffer is lent out of the connection meanwhile.
            let mut buf = std::mem::take(&mut self.server_mut()?.io.rbuf);
            let mut pos = 0;
            let mut malformed = None;
            while !self.expected.is_empty() || matches!(self.state, State::CopyIn(..)) {
                let (run, ended) = self.plain_replies(&buf[pos..]);
                if run > 0 {
                    self.request.answered = true;
                    self.out.extend_from_slice(&buf[pos..pos + run]);
                    pos += run;
                    if ended {
                        // pgway's own replies due after the messages the run answered.
                        self.emit_local();
                    }
                    continue;
                }
                match frame_len(&buf[pos..], MAX_MESSAGE_LEN) {
                    Ok(Some(len)) => {
                        self.on_server_frame(&buf[pos..pos + len]);
                        pos += len;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        malformed = Some(e);
                        break;
                    }
                }
            }
            buf.advance(pos);
            self.server_mut()?.io.rbuf = buf;
            if let Some(e) = malformed {
                return Err(self.lost(NetError::Frame(e)));
            }
            let in_copy = matches!(self.state, State::CopyIn(..));
            let done = self.expected.is_empty() && !in_copy;
            if self.request.redo.is_none() && !self.holds_answer(done, in_copy) {
                if self.out.len() > self.request.out_mark {
                    self.request.flushed = true;
                }
                // A future for the write only if the socket cannot take it all at once.
                let sent = self.client.send_now(&mut self.out);
                if !sent.map_err(SessionError::ClientGone)? {
                    self.flush().await?;
                }
            }
            if done {
                return Ok(());
            }
        }
    }

    /// Whether what the request's answer put in the client's buffer so far stays there
    /// (not flushed), so that the request can still be sent elsewhere if its server goes
    /// away before it ends: replies pgway made itself (a notice) until the server's first
    /// answer, and the answer of a request that wrote nothing (outside a transaction)
    /// until it ends or outgrows [`HELD_ANSWER`]. A server that dies mid-request can send
    /// part of an answer on its way down (PostgreSQL's immediate shutdown flushes, with
    /// its farewell notice, the ParseComplete of a Parse, Describe, Sync batch): the
    /// client must not see it twice.
    fn holds_answer(&self, done: bool, in_copy: bool) -> bool {
        let request = &self.request;
        if done || in_copy {
            return false;
        }
        if !request.answered {
            return request.can_retry && !request.flushed;
        }
        request.may_run_again() && self.out.len().saturating_sub(request.out_mark) < HELD_ANSWER
    }

    /// Waits for the server's next bytes until `client.query_timeout` after the request's
    /// first wait; then asks the server to cancel it (its answer, 57014, is relayed as
    /// any error) and returns, to wait without a deadline.
    async fn fill_or_cancel(&mut self) -> Result<(), SessionError> {
        let deadline = *self
            .request
            .deadline
            .get_or_insert_with(|| tokio::time::Instant::now() + self.timeouts.query);
        let Session { state, alarms, .. } = self;
        let Some(link) = state.link_mut() else {
            return Err(no_server());
        };
        let filled = tokio::select! {
            biased;
            filled = link.conn.io.fill() => Some(filled),
            () = alarms.query.at(deadline) => None,
        };
        match filled {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(self.lost(e)),
            None => {
                self.request.cancel_sent = true;
                let server = self.server_mut()?;
                let target = CancelTarget {
                    addr: Arc::from(server.addr.as_str()),
                    pid: server.pid,
                    secret: server.secret,
                };
                let wait = self.shared.config.load().pool.connect_timeout;
                self.span.in_scope(|| {
                    info!(node = %target.addr, pid = target.pid, timeout = ?self.timeouts.query, "query_timeout: cancelling the request on its server");
                });
                tokio::spawn(async move {
                    if let Err(cause) = send_cancel(&target, wait).await {
                        warn!(%cause, "query_timeout: the cancel request failed");
                    }
                });
                Ok(())
            }
        }
    }

    /// During COPY FROM STDIN: waits for the server's next bytes while passing the client's
    /// COPY messages on (and, after an extended copy's data, everything up to its Sync).
    async fn relay_copy(&mut self) -> Result<(), SessionError> {
        let Session { state, client, .. } = self;
        let State::CopyIn(link, copy) = state else {
            return Ok(());
        };
        let server = &mut link.conn;
        let until_sync = copy.until_sync;
        let tag = tokio::select! {
            filled = server.io.fill() => {
                filled.map_err(SessionError::server_lost)?;
                return Ok(());
            }
            frame = client.read_frame(MAX_MESSAGE_LEN) => {
                let frame = frame.map_err(SessionError::from_client)?;
                if !until_sync && !matches!(frame[0], b'd' | b'c' | b'f' | b'H' | b'S') {
                    return Err(SessionError::Fatal(ClientError::UnexpectedInCopy(frame[0])));
                }
                server
                    .io
                    .send_bytes(&frame)
                    .await
                    .map_err(SessionError::server_lost)?;
                frame[0]
            }
        };
        match tag {
            b'S' if until_sync => self.leave_copy(),
            b'c' | b'f' if !until_sync => self.end_copy_data(),
            _ => {}
        }
        Ok(())
    }

    /// The error for a server connection that failed under the request in flight.
    /// A request goes again to another connection if nothing of it can have taken effect
    /// and the client has seen nothing of its answer: the server announced its shutdown
    /// before answering, or the request wrote nothing outside a transaction (a read, or
    /// anything on a replica) and pgway held back its answer so far (see
    /// [`Self::holds_answer`] and `Request::may_run_again`).
    pub(super) fn lost(&self, e: NetError) -> SessionError {
        if self.request.retry_pending || self.request.may_run_again() {
            SessionError::Retry
        } else {
            SessionError::server_lost(e)
        }
    }
}

/// Relay of what a pinned server sends between requests.
impl Session<'_> {
    /// Forwards what the pinned server has already sent (a notification can arrive in the
    /// same read as the end of the last reply, which [`Self::relay`] leaves in the buffer).
    /// Returns true if the server sent an error (it is ending the session).
    pub(super) async fn forward_unprompted(&mut self) -> Result<bool, SessionError> {
        let mut forwarded = false;
        while let Some(frame) = match self.state.link_mut() {
            Some(link) => link
                .conn
                .io
                .try_frame(MAX_MESSAGE_LEN)
                .map_err(SessionError::server_lost)?,
            None => None,
        } {
            self.out.extend_from_slice(&frame);
            forwarded = true;
            if frame[0] == b'E' {
                self.flush().await?;
                return Ok(true);
            }
        }
        if forwarded {
            self.flush().await?;
        }
        Ok(false)
    }

    /// Waits for the client's next message while relaying what the pinned server sends
    /// unprompted (NotificationResponse for LISTEN, notices, parameter changes), and
    /// returns its length (it stays in the client's read buffer). The serve
    /// loop has taken any message the client sent already, and a read of the client's
    /// that the server's bytes interrupt leaves no whole message behind (it would have
    /// returned it), so each pass waits in the client's read straight away.
    pub(super) async fn next_frame_pinned(&mut self) -> Result<usize, SessionError> {
        loop {
            if self.forward_unprompted().await? {
                return Err(SessionError::ClientGone(NetError::Closed));
            }
            let Session {
                state,
                client,
                stopping,
                hard_stop,
                timeouts,
                alarms,
                ..
            } = self;
            let Some(link) = state.link_mut() else {
                return client
                    .frame_ready(MAX_MESSAGE_LEN)
                    .await
                    .map_err(SessionError::from_client);
            };
            let (timeout, expired) = timeouts.client_wait(link.status);
            tokio::select! {
                len = client.frame_ready(MAX_MESSAGE_LEN) => {
                    return len.map_err(SessionError::from_client);
                }
                filled = link.conn.io.fill() => filled.map_err(SessionError::server_lost)?,
                // A stopping pgway closes a pinned client between transactions, and one
                // inside a transaction at the drain deadline.
                _ = &mut *stopping, if link.status == b'I' => {
                    return Err(SessionError::Fatal(ClientError::Shutdown));
                }
                _ = &mut *hard_stop => return Err(SessionError::Fatal(ClientError::Shutdown)),
                () = alarms.client_wait(link.status).after(timeout) => return Err(SessionError::Fatal(expired)),
            }
        }
    }
}
