//! A byte stream ([`Transport`]) with a read buffer that yields whole protocol frames.

pub mod reactor;
pub mod tls;
pub mod transport;

use std::future::Future;
use std::io;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

pub use transport::{Connector, SwapConnector, TcpConnector, Transport};

use crate::protocol::frame::{frame_len, startup_len};
use crate::protocol::FrameError;

/// Errors on a framed stream.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The socket failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the connection.
    #[error("connection closed")]
    Closed,
    /// The peer closed the connection in the middle of a frame.
    #[error("connection closed inside a message")]
    Truncated,
    /// The peer sent something that cannot be a valid frame.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Initial capacity of a read buffer; it grows for larger frames and is reused.
const READ_CAPACITY: usize = 8 * 1024;

/// Most buffers each worker thread keeps for reuse, and the largest one it keeps: at most
/// 1 MiB per worker, whatever the number of clients.
const SPARE_BUFFERS: usize = 64;
const SPARE_MAX_CAPACITY: usize = 16 * 1024;

/// Most buffers the idle sessions of one worker thread keep while they wait for their
/// clients' next request (see [`keep_buffers`]): three each for 32 sessions, at most 1.5
/// MiB beside the spares. (A light load gathers its sessions on one worker: see
/// `crate::workers::Placement`.)
const KEPT_BUFFERS: usize = 96;

thread_local! {
    static SPARE: std::cell::RefCell<Vec<BytesMut>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Buffers kept by this thread's idle sessions, under [`KeptBuffers`] guards.
    static KEPT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Buffers an idle session holds on to instead of giving them back: counted against
/// [`KEPT_BUFFERS`] on its thread until the guard drops (a session moves to another
/// worker only between requests, before it keeps any).
#[derive(Debug)]
pub struct KeptBuffers(usize);

impl Drop for KeptBuffers {
    fn drop(&mut self) {
        KEPT.with(|kept| kept.set(kept.get().saturating_sub(self.0)));
    }
}

/// Whether `buf` is of a size a spare may be: allocated, and not grown past
/// [`SPARE_MAX_CAPACITY`] (a grown one is dropped, not kept).
fn spare_sized(buf: &BytesMut) -> bool {
    buf.capacity() != 0 && buf.capacity() <= SPARE_MAX_CAPACITY
}

/// Whether a session waiting for its client's next request may keep `bufs` meanwhile,
/// instead of giving them back with [`recycle_buffers`] and taking them again with
/// [`take_buffers`] once the request comes (a busy client's comes soon): yes while all
/// are empty and of a size a spare may be, and this thread's idle sessions keep at most
/// [`KEPT_BUFFERS`] with them. Past that, an idle client holds no buffers, so thousands
/// of them cost no more memory than a few.
pub fn keep_buffers<const N: usize>(bufs: [&BytesMut; N]) -> Option<KeptBuffers> {
    // A buffer with bytes in it is not kept either: given back, it is emptied, as it
    // always was.
    if bufs.iter().any(|buf| !buf.is_empty() || !spare_sized(buf)) {
        return None;
    }
    KEPT.with(|kept| {
        let now = kept.get() + N;
        (now <= KEPT_BUFFERS).then(|| {
            kept.set(now);
            KeptBuffers(N)
        })
    })
}

/// A buffer for a request that is starting: an emptied one this thread used before, so a
/// busy client does not `malloc` and `free` its buffers on every statement, or a new one.
/// All are made the size of a read buffer, so any of them serves as any of a session's
/// buffers without growing.
pub fn take_buffer() -> BytesMut {
    let [buf] = take_buffers();
    buf
}

/// [`take_buffer`] for `N` buffers, with one visit to the thread's spares.
pub fn take_buffers<const N: usize>() -> [BytesMut; N] {
    SPARE.with_borrow_mut(|spare| {
        std::array::from_fn(|_| {
            spare
                .pop()
                .unwrap_or_else(|| BytesMut::with_capacity(READ_CAPACITY))
        })
    })
}

/// Gives a buffer back for [`take_buffer`] on this thread (dropped if it is too large or
/// enough are kept). The caller is left with none: an idle client holds no memory.
pub fn recycle_buffer(buf: &mut BytesMut) {
    recycle_buffers([buf]);
}

/// [`recycle_buffer`] for `N` buffers, with one visit to the thread's spares.
pub fn recycle_buffers<const N: usize>(bufs: [&mut BytesMut; N]) {
    SPARE.with_borrow_mut(|spare| {
        for buf in bufs {
            let mut buf = std::mem::take(buf);
            if !spare_sized(&buf) {
                continue;
            }
            buf.clear();
            if spare.len() < SPARE_BUFFERS {
                spare.push(buf);
            }
        }
    });
}

/// A stream plus its read buffer.
#[derive(Debug)]
pub struct FramedStream {
    /// The stream.
    pub stream: Box<dyn Transport>,
    /// Bytes read but not yet consumed.
    pub rbuf: BytesMut,
}

impl FramedStream {
    /// Wraps a connected stream.
    pub fn new(stream: Box<dyn Transport>) -> Self {
        Self {
            stream,
            rbuf: BytesMut::new(),
        }
    }

    /// Wraps a connected socket (and turns Nagle off: every message is latency).
    pub fn tcp(stream: TcpStream) -> Self {
        let _ = stream.set_nodelay(true);
        Self::new(Box::new(stream))
    }

    /// Reads more bytes into the buffer; `Closed`/`Truncated` at EOF. (A `poll_fn`, not an
    /// `async fn`: a session waits in it for every reply, and a future of `poll_fn` adds
    /// no state machine of its own to the session's.)
    pub fn fill(&mut self) -> impl Future<Output = Result<(), NetError>> + '_ {
        let mut waited = false;
        std::future::poll_fn(move |cx| self.poll_more(cx, &mut waited))
    }

    /// One poll of [`Self::fill`]; `waited` starts false.
    fn poll_more(&mut self, cx: &mut Context<'_>, waited: &mut bool) -> Poll<Result<(), NetError>> {
        Poll::Ready(match ready!(self.poll_fill(cx, waited))? {
            0 if self.rbuf.is_empty() => Err(NetError::Closed),
            0 => Err(NetError::Truncated),
            _ => {
                crate::workers::busy();
                Ok(())
            }
        })
    }

    /// One read into the buffer, for [`Self::fill`]. A stream without a buffer (an idle
    /// client holds none) waits for data before it takes memory for it; once woken
    /// (`waited`) it takes a buffer and reads straight away, since the read checks the
    /// socket's readiness itself, and gives the buffer back if the wake-up was not for
    /// data. A read treats a short read as "drained", so the next wait goes straight to
    /// epoll instead of first trying a read that would block: one system call less per
    /// round trip. One call reads what is there or stores the waker
    /// ([`Transport::poll_read_now`]).
    fn poll_fill(&mut self, cx: &mut Context<'_>, waited: &mut bool) -> Poll<io::Result<usize>> {
        if self.rbuf.capacity() - self.rbuf.len() < 1024 {
            if self.rbuf.capacity() == 0 {
                if !*waited {
                    *waited = true;
                    ready!(self.stream.poll_readable(cx))?;
                }
                self.rbuf = take_buffer();
            }
            self.rbuf.reserve(READ_CAPACITY);
        }
        // A read that finds bytes spends the cooperative budget, as tokio's polled read does:
        // a session relaying a large result yields to the worker's others in between. (A
        // tokio stream's polled read, TLS or off the workers, spends tokio's budget too: a
        // read that waited counts twice there.) One that waits leaves the budget as it was.
        let coop = ready!(crate::workers::poll_budget(cx));
        let read = self.stream.poll_read_now(cx, &mut self.rbuf);
        if read.is_ready() {
            coop.made_progress();
        } else if *waited && self.rbuf.is_empty() {
            recycle_buffer(&mut self.rbuf);
        }
        read
    }

    /// Re-registers the stream with the calling thread's runtime (it may have been
    /// created on another worker's).
    pub fn rebind(self) -> Result<Self, NetError> {
        Ok(Self {
            stream: self.stream.rebind()?,
            rbuf: self.rbuf,
        })
    }

    /// Frees the read buffer if it holds nothing (an idle connection needs none).
    pub fn release_buffer(&mut self) {
        if let Some(rbuf) = self.spare_buffer() {
            recycle_buffer(rbuf);
        }
    }

    /// The read buffer, if it holds nothing (for [`recycle_buffers`] with others).
    pub fn spare_buffer(&mut self) -> Option<&mut BytesMut> {
        (self.rbuf.is_empty() && self.rbuf.capacity() > 0).then_some(&mut self.rbuf)
    }

    /// Splits off the next complete regular frame already in the buffer, if any.
    pub fn try_frame(&mut self, limit: usize) -> Result<Option<BytesMut>, NetError> {
        Ok(self
            .buffered_frame(limit)?
            .map(|len| self.rbuf.split_to(len)))
    }

    /// The length of the next complete regular frame already in the buffer, if any; the
    /// frame stays there (at the start of [`Self::rbuf`]).
    #[inline]
    pub fn buffered_frame(&self, limit: usize) -> Result<Option<usize>, NetError> {
        Ok(frame_len(&self.rbuf, limit)?)
    }

    /// Takes the first `len` bytes (a frame that [`Self::buffered_frame`] found, copied
    /// elsewhere) out of the buffer. A buffer that holds nothing else is dropped if the
    /// frame was large: the copy is what is left of it, and a buffer grown for a large
    /// frame is not kept.
    #[inline]
    pub fn consume(&mut self, len: usize) {
        if len > SPARE_MAX_CAPACITY && self.rbuf.len() == len {
            self.rbuf = BytesMut::new();
        } else {
            self.rbuf.advance(len);
        }
    }

    /// Reads the next regular frame (tag, length, body), waiting for bytes as needed. (A
    /// `poll_fn`, as [`Self::fill`] is.)
    pub fn read_frame(
        &mut self,
        limit: usize,
    ) -> impl Future<Output = Result<BytesMut, NetError>> + '_ {
        let mut waited = false;
        std::future::poll_fn(move |cx| {
            let len = ready!(self.poll_frame(cx, limit, &mut waited))?;
            Poll::Ready(Ok(self.rbuf.split_to(len)))
        })
    }

    /// Waits until the buffer holds a complete regular frame, and returns its length
    /// ([`Self::buffered_frame`]: the frame stays in the buffer).
    pub fn frame_ready(
        &mut self,
        limit: usize,
    ) -> impl Future<Output = Result<usize, NetError>> + '_ {
        let mut waited = false;
        std::future::poll_fn(move |cx| self.poll_frame(cx, limit, &mut waited))
    }

    /// One poll of [`Self::frame_ready`]; `waited` starts false.
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
        limit: usize,
        waited: &mut bool,
    ) -> Poll<Result<usize, NetError>> {
        loop {
            if let Some(len) = frame_len(&self.rbuf, limit)? {
                return Poll::Ready(Ok(len));
            }
            if self.rbuf.len() >= 5 {
                // `frame_len` checked the length field: the frame is larger than what we hold.
                // Room for the rest of it, but at most as much again as has arrived: memory
                // follows the bytes a client sends, not the length it announces (a header
                // saying 1 GiB takes no 1 GiB buffer).
                let len =
                    i32::from_be_bytes([self.rbuf[1], self.rbuf[2], self.rbuf[3], self.rbuf[4]]);
                let missing = (len as usize + 1).saturating_sub(self.rbuf.len());
                self.rbuf
                    .reserve(missing.min(self.rbuf.len().max(READ_CAPACITY)));
            }
            ready!(self.poll_more(cx, waited))?;
            // The next read is another wait of `fill`'s.
            *waited = false;
        }
    }

    /// Reads a startup-style packet (no tag byte).
    pub async fn read_startup(&mut self) -> Result<BytesMut, NetError> {
        loop {
            if let Some(len) = startup_len(&self.rbuf)? {
                return Ok(self.rbuf.split_to(len));
            }
            self.fill().await?;
        }
    }

    /// Writes all of `buf`, then clears it.
    pub async fn send(&mut self, buf: &mut BytesMut) -> Result<(), NetError> {
        self.send_bytes(buf).await?;
        buf.clear();
        Ok(())
    }

    /// Writes what the socket takes of `buf` now, without waiting, and takes it out of
    /// `buf`; true if that was all of it (nearly every write fits the socket's send buffer
    /// at once). [`Self::send`] writes the rest. A caller that tries this first makes no
    /// future for the usual case.
    pub fn send_now(&mut self, buf: &mut BytesMut) -> Result<bool, NetError> {
        let sent = self.write_now(buf)?;
        if sent == buf.len() {
            buf.clear();
            return Ok(true);
        }
        buf.advance(sent);
        Ok(false)
    }

    /// What the socket takes of `bytes` now (0 if it would block).
    fn write_now(&mut self, bytes: &[u8]) -> Result<usize, NetError> {
        if bytes.is_empty() {
            return Ok(0);
        }
        match self.stream.write_now(bytes) {
            Ok(sent) => Ok(sent),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes `bytes` as they are.
    pub async fn send_bytes(&mut self, bytes: &[u8]) -> Result<(), NetError> {
        let sent = self.write_now(bytes)?;
        if sent < bytes.len() {
            self.stream.write_all(&bytes[sent..]).await?;
            // TLS may keep records buffered after a write; plain TCP is flushed already.
            self.stream.flush().await?;
        }
        Ok(())
    }

    /// True if the peer closed the stream or sent something while it should be idle
    /// (see [`Transport::is_stale`]).
    pub fn is_stale(&mut self) -> bool {
        self.stream.is_stale()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workers::on_a_worker;
    use std::io::Read;

    #[test]
    fn a_write_larger_than_the_socket_takes_at_once_keeps_its_rest_in_order() {
        on_a_worker(async {
            let (stream, mut peer) = reactor::tests::pair();
            let mut io = FramedStream::new(stream);
            // More than loopback's send and receive buffers hold while nobody reads.
            let sent: Vec<u8> = (0..16_000_000u32).map(|i| (i % 251) as u8).collect();
            let mut buf = BytesMut::from(&sent[..]);
            assert!(
                !io.send_now(&mut buf).expect("send_now"),
                "all of it went at once"
            );
            assert!(
                !buf.is_empty() && buf.len() < sent.len(),
                "{} left",
                buf.len()
            );
            let reader = std::thread::spawn(move || {
                let mut got = Vec::new();
                peer.read_to_end(&mut got).expect("read");
                got
            });
            io.send(&mut buf).await.expect("send the rest");
            assert!(buf.is_empty());
            drop(io);
            let got = reader.join().expect("reader");
            assert!(
                got == sent,
                "{} bytes arrived, {} sent",
                got.len(),
                sent.len()
            );
        });
    }

    #[test]
    fn idle_sessions_keep_buffers_up_to_the_threads_budget() {
        // A thread of its own: the budget is per thread.
        std::thread::spawn(|| {
            let buf = BytesMut::with_capacity(READ_CAPACITY);
            let sessions = KEPT_BUFFERS / 3;
            let mut kept: Vec<_> = (0..sessions)
                .map(|_| keep_buffers([&buf, &buf, &buf]))
                .collect();
            assert!(
                kept.iter().all(Option::is_some),
                "{sessions} sessions keep theirs"
            );
            // One more session than the budget holds gives its buffers back.
            assert!(keep_buffers([&buf, &buf, &buf]).is_none());
            assert_eq!(KEPT.get(), KEPT_BUFFERS);
            // A session that stops waiting frees its share for another.
            drop(kept.pop());
            assert_eq!(KEPT.get(), KEPT_BUFFERS - 3);
            assert!(keep_buffers([&buf, &buf, &buf]).is_some());
            // A guard dropped at once gave its share back.
            assert_eq!(KEPT.get(), KEPT_BUFFERS - 3);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn no_session_keeps_an_unsized_or_grown_buffer() {
        std::thread::spawn(|| {
            let buf = BytesMut::with_capacity(READ_CAPACITY);
            // None yet: the session takes its buffers once the request comes anyway.
            assert!(keep_buffers([&buf, &BytesMut::new()]).is_none());
            // Grown for a large result: given back (and dropped), not held while idle.
            let large = BytesMut::with_capacity(SPARE_MAX_CAPACITY + 1);
            assert!(keep_buffers([&buf, &large]).is_none());
            // Holding bytes: given back and emptied, as before buffers were kept.
            let mut held = BytesMut::with_capacity(READ_CAPACITY);
            held.extend_from_slice(b"Z");
            assert!(keep_buffers([&buf, &held]).is_none());
            assert_eq!(KEPT.get(), 0);
        })
        .join()
        .unwrap();
    }
}
