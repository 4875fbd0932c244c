//! A TCP stream for tokio-postgres that records every backend message the client reads, in
//! order, and can add StartupMessage parameters that tokio-postgres has no setter for.
//!
//! tokio-postgres drives the protocol as it does for any application; the tap only watches
//! the bytes. That gives the transcript what tokio-postgres does not expose: command tags,
//! ParameterStatus, the transaction status of ReadyForQuery, and notices, errors and
//! notifications in the order the server (or pgway) sent them.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// One backend message: its type byte and its body (after the length).
#[derive(Debug, Clone)]
pub struct Msg {
    pub tag: u8,
    pub body: Vec<u8>,
}

/// What the tap has seen so far.
#[derive(Debug, Default)]
pub struct Log {
    /// Bytes of a message not complete yet.
    partial: Vec<u8>,
    /// Complete messages not taken by the runner yet.
    pub messages: Vec<Msg>,
    /// Number of ReadyForQuery messages seen since the connection opened.
    pub ready_count: usize,
    /// The server closed the connection (or reading failed).
    pub closed: bool,
}

impl Log {
    fn feed(&mut self, bytes: &[u8]) {
        self.partial.extend_from_slice(bytes);
        let mut at = 0;
        while self.partial.len() - at >= 5 {
            let len = u32::from_be_bytes(
                self.partial[at + 1..at + 5]
                    .try_into()
                    .expect("a 4-byte length"),
            ) as usize;
            let total = 1 + len;
            if self.partial.len() - at < total {
                break;
            }
            let tag = self.partial[at];
            if tag == b'Z' {
                self.ready_count += 1;
            }
            self.messages.push(Msg {
                tag,
                body: self.partial[at + 5..at + total].to_vec(),
            });
            at += total;
        }
        self.partial.drain(..at);
    }

    /// Takes the messages up to and including the last ReadyForQuery (all of them once the
    /// connection is closed); later ones stay for the next operation.
    pub fn take_through_last_ready(&mut self) -> Vec<Msg> {
        let end = if self.closed {
            self.messages.len()
        } else {
            self.messages
                .iter()
                .rposition(|m| m.tag == b'Z')
                .map_or(0, |i| i + 1)
        };
        self.messages.drain(..end).collect()
    }
}

/// The tap's shared state: the log and a wake-up for whoever waits on it.
#[derive(Debug, Default)]
pub struct Shared {
    pub log: Mutex<Log>,
    pub changed: Notify,
}

impl Shared {
    /// Waits until `done(log)` holds or the connection is closed, at most `timeout`.
    /// Returns whether `done` held.
    pub async fn wait_for(
        &self,
        timeout: std::time::Duration,
        done: impl Fn(&Log) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Created before the check: a notify_waiters() after the check wakes it.
            let changed = self.changed.notified();
            {
                let log = self.log.lock().expect("tap log");
                if done(&log) {
                    return true;
                }
                if log.closed {
                    return false;
                }
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return false;
            }
        }
    }
}

/// The stream handed to `tokio_postgres::Config::connect_raw`.
pub struct Tap {
    inner: TcpStream,
    shared: Arc<Shared>,
    /// StartupMessage parameters to add (or to replace, when tokio-postgres sends the key).
    startup_extra: Vec<(String, String)>,
    /// The StartupMessage as tokio-postgres writes it, until it is complete.
    startup: Option<Vec<u8>>,
    /// Bytes accepted from tokio-postgres but not written to the socket yet.
    pending: Vec<u8>,
}

impl Tap {
    pub fn new(inner: TcpStream, startup_extra: Vec<(String, String)>) -> (Tap, Arc<Shared>) {
        let shared = Arc::new(Shared::default());
        (
            Tap {
                inner,
                shared: shared.clone(),
                startup_extra,
                startup: Some(Vec::new()),
                pending: Vec::new(),
            },
            shared,
        )
    }

    fn drain_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pending.drain(..n);
        }
        Poll::Ready(Ok(()))
    }
}

/// `msg` (a StartupMessage: length, protocol, `key\0value\0`..., `\0`) with `extra` added,
/// replacing a key that is already there.
fn rewrite_startup(msg: &[u8], extra: &[(String, String)]) -> Vec<u8> {
    let protocol = &msg[4..8];
    let mut params: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut fields = msg[8..].split(|&b| b == 0);
    while let (Some(k), Some(v)) = (fields.next(), fields.next()) {
        if k.is_empty() {
            break;
        }
        params.push((k.to_vec(), v.to_vec()));
    }
    for (k, v) in extra {
        match params.iter_mut().find(|(pk, _)| pk == k.as_bytes()) {
            Some(p) => p.1 = v.as_bytes().to_vec(),
            None => params.push((k.as_bytes().to_vec(), v.as_bytes().to_vec())),
        }
    }
    let mut body = protocol.to_vec();
    for (k, v) in params {
        body.extend_from_slice(&k);
        body.push(0);
        body.extend_from_slice(&v);
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

impl AsyncRead for Tap {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = ready!(Pin::new(&mut this.inner).poll_read(cx, buf));
        {
            let mut log = this.shared.log.lock().expect("tap log");
            match &result {
                Ok(()) if buf.filled().len() > before => log.feed(&buf.filled()[before..]),
                _ => log.closed = true,
            }
        }
        this.shared.changed.notify_waiters();
        Poll::Ready(result)
    }
}

impl AsyncWrite for Tap {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(startup) = this.startup.as_mut() {
            startup.extend_from_slice(data);
            if startup.len() >= 4 {
                let len = u32::from_be_bytes(startup[..4].try_into().expect("4 bytes")) as usize;
                if startup.len() >= len {
                    let all = this.startup.take().expect("startup bytes");
                    this.pending = rewrite_startup(&all[..len], &this.startup_extra);
                    this.pending.extend_from_slice(&all[len..]);
                }
            }
            return Poll::Ready(Ok(data.len()));
        }
        ready!(this.drain_pending(cx))?;
        Pin::new(&mut this.inner).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.drain_pending(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.drain_pending(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_parameters_are_added_or_replaced() {
        let original = {
            let mut body = 196_608u32.to_be_bytes().to_vec();
            for (k, v) in [("client_encoding", "UTF8"), ("user", "app")] {
                body.extend_from_slice(k.as_bytes());
                body.push(0);
                body.extend_from_slice(v.as_bytes());
                body.push(0);
            }
            body.push(0);
            let mut m = ((body.len() + 4) as u32).to_be_bytes().to_vec();
            m.extend_from_slice(&body);
            m
        };
        let out = rewrite_startup(
            &original,
            &[
                ("DateStyle".into(), "Postgres, MDY".into()),
                ("client_encoding".into(), "LATIN1".into()),
            ],
        );
        let len = u32::from_be_bytes(out[..4].try_into().unwrap()) as usize;
        assert_eq!(len, out.len());
        let text = String::from_utf8_lossy(&out[8..]).replace('\0', "|");
        assert_eq!(
            text,
            "client_encoding|LATIN1|user|app|DateStyle|Postgres, MDY||"
        );
    }

    #[test]
    fn messages_are_framed_across_reads() {
        let mut log = Log::default();
        log.feed(&[b'C', 0, 0, 0, 8, b'S', b'E']);
        assert!(log.messages.is_empty());
        log.feed(&[b'T', 0, b'Z', 0, 0, 0, 5, b'I', b'A']);
        assert_eq!(log.messages.len(), 2);
        assert_eq!(log.ready_count, 1);
        assert_eq!(log.take_through_last_ready().len(), 2);
        log.feed(&[0, 0, 0, 4]);
        assert_eq!(log.messages.len(), 1);
        assert!(log.take_through_last_ready().is_empty());
    }
}
