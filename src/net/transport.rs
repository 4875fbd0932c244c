//! What pgway needs of a byte stream, for clients and servers alike: TCP in production,
//! in-memory duplex streams in tests, TLS ([`super::tls`]) over either. The session and
//! the pools see only [`Transport`], so a test can drive a whole session without a socket.

use std::fmt::Debug;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use arc_swap::ArcSwap;
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, Interest, ReadBuf};
use tokio::net::TcpStream;

/// A connected byte stream.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + Sync + Debug + 'static {
    /// Resolves once the stream has bytes to read (or is closed), without reading them:
    /// a connection waits for data before it takes a read buffer. Streams that cannot
    /// tell resolve at once.
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let _ = cx;
        Poll::Ready(Ok(()))
    }

    /// True if the peer closed the stream or sent something while it should be idle (a
    /// parked server connection). Never waits.
    ///
    /// The default polls one read with a no-op waker: for TCP that costs a system call only
    /// when the reactor saw the socket become readable since it was last drained, so a
    /// quiet socket reads as "not ready" without asking the kernel. A byte it reads is
    /// lost: call it only on a connection that is dropped if it is stale.
    fn is_stale(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        let mut probe = [0u8; 1];
        let mut buf = ReadBuf::new(&mut probe);
        Pin::new(self).poll_read(&mut cx, &mut buf).is_ready()
    }

    /// The stream registered with the calling thread's reactor, for a server connection
    /// moved to another worker. Streams without a reactor return themselves.
    fn rebind(self: Box<Self>) -> io::Result<Box<dyn Transport>>;

    /// Writes what the stream takes of `buf` now, without waiting; `WouldBlock` if it
    /// takes nothing now or cannot tell without a wait. Streams that buffer (TLS) say
    /// `WouldBlock` always, so that their writes go through `poll_write` and `poll_flush`.
    fn write_now(&mut self, buf: &[u8]) -> io::Result<usize> {
        let _ = buf;
        Err(io::ErrorKind::WouldBlock.into())
    }

    /// Reads what the stream holds now into the spare capacity of `buf` (which must have
    /// some), without waiting; `Ok(0)` at end of stream, `WouldBlock` if nothing is there
    /// or the stream cannot tell without a wait (the default: TLS and in-memory streams
    /// read through `poll_read`). A read that leaves nothing behind leaves the stream
    /// marked as drained, so the next wait goes to the reactor without a read first.
    fn read_now(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        let _ = buf;
        Err(io::ErrorKind::WouldBlock.into())
    }

    /// Reads into the spare capacity of `buf` (which must have some), or waits for bytes
    /// with `cx`'s waker stored; `Ok(0)` at end of stream. The default is tokio's polled
    /// read ([`tokio_util::io::poll_read_buf`]).
    fn poll_read_buf(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        tokio_util::io::poll_read_buf(Pin::new(self), cx, buf)
    }

    /// What has arrived, read into the spare capacity of `buf` as [`Self::read_now`]
    /// reads it, or, if nothing has, a wait for bytes as [`Self::poll_read_buf`] waits.
    /// The default calls the one, then the other; pgway's own sockets need one call,
    /// since their polled read stores no waker when bytes are there.
    fn poll_read_now(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        match self.read_now(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.poll_read_buf(cx, buf),
            done => Poll::Ready(done),
        }
    }
}

impl Transport for TcpStream {
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_read_ready(cx)
    }

    /// `try_read` asks the kernel only when the reactor saw the socket become readable,
    /// like the default, but unlike a poll it never swaps the waker stored for the socket
    /// (a lock taken for every lent connection).
    fn is_stale(&mut self) -> bool {
        let mut probe = [0u8; 1];
        !matches!(self.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// On a worker, the socket moves to the worker's own reactor
    /// ([`super::reactor::adopt`]).
    fn rebind(self: Box<Self>) -> io::Result<Box<dyn Transport>> {
        super::reactor::adopt((*self).into_std()?)
    }

    /// One `send` when the reactor has seen the socket writable, with no future, waker or
    /// cooperative budget around it (`try_write`, less its system call). The call is
    /// rustix's: a system call of its own, where libc's `send` (which std's write calls)
    /// is a thread-cancellation point and switches cancellation on and off around the
    /// call, about 37 instructions that pgway, which cancels no threads, has no use for.
    fn write_now(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.try_io(Interest::WRITABLE, || {
            rustix::net::send(&*self, buf, rustix::net::SendFlags::NOSIGNAL)
                .map_err(io::Error::from)
        })
    }

    /// `try_read_buf` when the reactor has seen the socket readable: no future or waker
    /// (the caller, `FramedStream::poll_fill`, spends the cooperative budget). A short read means the socket is drained, and tokio forgets a
    /// socket's readiness only when an attempt under `try_io` says `WouldBlock`; so the
    /// read runs inside a second `try_io` that reports a short read as `WouldBlock`, and
    /// the bytes it read are kept. (`try_read_buf` alone would leave the readiness set,
    /// and the next wait would start with a read that blocks: a system call more per
    /// round trip.) Its `recv` is std's, through libc (see `write_now`): reading into a
    /// buffer's spare capacity with rustix would take an `unsafe` block, which pgway
    /// forbids.
    fn read_now(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        let room = buf.capacity() - buf.len();
        let mut short = None;
        let read = self.try_io(Interest::READABLE, || match self.try_read_buf(buf)? {
            n if n > 0 && n < room => {
                short = Some(n);
                Err(io::ErrorKind::WouldBlock.into())
            }
            n => Ok(n),
        });
        match short {
            Some(n) => Ok(n),
            None => read,
        }
    }
}

impl Transport for DuplexStream {
    fn rebind(self: Box<Self>) -> io::Result<Box<dyn Transport>> {
        Ok(self)
    }
}

/// What [`Connector::connect`] returns.
pub type Connecting<'a> = Pin<Box<dyn Future<Output = io::Result<Box<dyn Transport>>> + Send + 'a>>;

/// Opens server connections. [`TcpConnector`] in production; tests give the pools one
/// that hands out in-memory streams to a scripted server.
pub trait Connector: Send + Sync + Debug {
    /// Connects to `addr` (`host:port`).
    fn connect<'a>(&'a self, addr: &'a str) -> Connecting<'a>;

    /// Why the last connect to `addr` failed, if it failed for a reason of this
    /// connector's own that waiting will not cure (a TLS certificate pgway does not
    /// trust), so a client can be told that rather than wait for a healthy node.
    fn lasting_failure(&self, addr: &str) -> Option<String> {
        let _ = addr;
        None
    }
}

/// A connector that a reload can replace (`[server_tls]`): each connect goes through the
/// one in force when it starts.
#[derive(Debug)]
pub struct SwapConnector(ArcSwap<Arc<dyn Connector>>);

impl SwapConnector {
    /// Connects through `first` until [`Self::replace`].
    pub fn new(first: Arc<dyn Connector>) -> Self {
        Self(ArcSwap::from_pointee(first))
    }

    /// Connections opened from now on go through `next`.
    pub fn replace(&self, next: Arc<dyn Connector>) {
        self.0.store(Arc::new(next));
    }
}

impl Connector for SwapConnector {
    fn connect<'a>(&'a self, addr: &'a str) -> Connecting<'a> {
        let current = self.0.load_full();
        Box::pin(async move { current.connect(addr).await })
    }

    fn lasting_failure(&self, addr: &str) -> Option<String> {
        self.0.load().lasting_failure(addr)
    }
}

/// Plain TCP, with Nagle off (every message is latency).
#[derive(Debug, Default, Clone, Copy)]
pub struct TcpConnector;

impl Connector for TcpConnector {
    fn connect<'a>(&'a self, addr: &'a str) -> Connecting<'a> {
        Box::pin(async move {
            let stream = TcpStream::connect(addr).await?;
            if super::reactor::on_reactor() {
                // Connected through the main runtime: from now on on this worker's reactor.
                return super::reactor::adopt(stream.into_std()?);
            }
            let _ = stream.set_nodelay(true);
            Ok(Box::new(stream) as Box<dyn Transport>)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_duplex_stream_is_stale_once_its_peer_writes_or_leaves() {
        let (mut near, mut far) = tokio::io::duplex(64);
        assert!(!near.is_stale());
        far.write_all(b"x").await.unwrap();
        assert!(near.is_stale());
        let (mut near, far) = tokio::io::duplex(64);
        drop(far);
        assert!(near.is_stale());
    }

    #[tokio::test]
    async fn a_send_larger_than_the_socket_takes_at_once_arrives_whole() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let mut client =
            super::super::FramedStream::new(TcpConnector.connect(&addr).await.unwrap());
        let (mut server, _) = listener.accept().await.unwrap();
        // A few bytes (taken at once), then 16 MiB (more than loopback's send buffer: the
        // rest waits for the reader), then a few bytes again.
        let big: Vec<u8> = (0..16u32 << 20).map(|i| (i % 251) as u8).collect();
        let parts = [b"first".to_vec(), big, b"last".to_vec()];
        let expected: Vec<u8> = parts.concat();
        let reader = tokio::spawn(async move {
            let mut got = vec![0; expected.len()];
            server.read_exact(&mut got).await.unwrap();
            got == expected
        });
        for part in &parts {
            let mut buf = bytes::BytesMut::from(&part[..]);
            client.send(&mut buf).await.unwrap();
            assert!(buf.is_empty());
        }
        assert!(reader.await.unwrap(), "the reader got every byte, in order");
    }

    #[tokio::test]
    async fn a_read_now_takes_what_is_there_and_a_later_wait_still_wakes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let sent: Vec<u8> = (0..20_000u32).map(|i| (i % 253) as u8).collect();
        server.write_all(&sent).await.unwrap();
        let wait = std::time::Duration::from_secs(10);
        crate::timer::timeout(wait, client.readable())
            .await
            .unwrap()
            .unwrap();
        // Full reads leave the socket marked readable; the short one that drains it does not.
        let mut got = Vec::new();
        let mut sizes = Vec::new();
        loop {
            let mut buf = BytesMut::with_capacity(8192);
            match client.read_now(&mut buf) {
                Ok(n) => {
                    assert_eq!(n, buf.len());
                    sizes.push(n);
                    got.extend_from_slice(&buf);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(
            got, sent,
            "every byte, in order, without a wait between reads"
        );
        assert!(sizes.len() >= 3, "{sizes:?}");
        // Drained: the next bytes come after a wait, which the reactor must still end.
        server.write_all(b"abc").await.unwrap();
        crate::timer::timeout(wait, client.readable())
            .await
            .unwrap()
            .unwrap();
        let mut buf = BytesMut::with_capacity(64);
        assert_eq!(client.read_now(&mut buf).unwrap(), 3);
        assert_eq!(&buf[..], b"abc");
        drop(server);
        crate::timer::timeout(wait, client.readable())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            client.read_now(&mut BytesMut::with_capacity(64)).unwrap(),
            0,
            "end of stream"
        );
    }

    #[tokio::test]
    async fn reads_that_always_find_bytes_still_spend_the_cooperative_budget() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        // Room for far more than the reads below take, so that none finds the socket empty.
        let _ = socket.set_recv_buffer_size(4 << 20);
        let client = socket
            .connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        tokio::spawn(async move {
            let chunk = vec![7u8; 64 * 1024];
            for _ in 0..64 {
                if server.write_all(&chunk).await.is_err() {
                    break;
                }
            }
        });
        crate::timer::sleep(std::time::Duration::from_millis(200)).await;
        let mut framed = super::super::FramedStream::new(Box::new(client));
        // 1 KiB reads, each one full: the socket stays ready, and only the budget (128 a
        // poll of the task) makes this loop give the thread back to the task's neighbours.
        let mut reads = 0;
        let spent = loop {
            framed.rbuf = BytesMut::with_capacity(1024);
            framed.fill().await.unwrap();
            reads += 1;
            if !tokio::task::coop::has_budget_remaining() {
                break true;
            }
            if reads == 2000 {
                break false;
            }
        };
        assert!(
            spent,
            "{reads} reads in one poll without spending the budget"
        );
    }

    #[tokio::test]
    async fn a_quiet_tcp_socket_is_not_stale_until_its_peer_writes_or_leaves() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        for leaves in [false, true] {
            let mut client = TcpConnector.connect(&addr).await.unwrap();
            let (mut server, _) = listener.accept().await.unwrap();
            assert!(!client.is_stale());
            // Still quiet after the reactor had a turn.
            crate::timer::sleep(std::time::Duration::from_millis(20)).await;
            assert!(!client.is_stale());
            if leaves {
                drop(server);
            } else {
                server.write_all(b"N").await.unwrap();
            }
            // What the peer did reaches the reactor asynchronously.
            let mut stale = false;
            for _ in 0..100 {
                crate::timer::sleep(std::time::Duration::from_millis(10)).await;
                if client.is_stale() {
                    stale = true;
                    break;
                }
            }
            assert!(stale, "leaves: {leaves}");
        }
    }
}
