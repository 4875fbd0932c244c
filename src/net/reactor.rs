//! Each worker's reactor: a mio [`Poll`] of its own, which its executor waits on
//! (`crate::workers`), and the sockets registered with it ([`Socket`], a [`Transport`]).
//!
//! The sessions' sockets used to be tokio's, registered with the I/O driver of a
//! current-thread runtime on each worker. Per `pgbench -S` statement that driver, its
//! registrations, readiness bits, `try_io` and the wake-ups it hands over ran about 800
//! instructions of pgway's 4,900 (benches/PROFILE.md, thirty-first round). Here a socket's
//! readiness is one atomic byte, set by the reactor from an event and cleared by the read or
//! write that finds the socket drained; a socket's wakers are kept only while its session
//! waits.
//!
//! Only the busy sockets live here: a client's after it is handed to a worker, and server
//! connections once connected. Everything else a worker starts with tokio (a connect, a
//! cancel request, a control connection) is registered with the main runtime's driver,
//! whose handle each worker enters, and wakes its session from the main thread.

use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use atomic_waker::AtomicWaker;
use bytes::BytesMut;
use mio::unix::SourceFd;
use mio::{Events, Interest, Token};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::transport::Transport;
use crate::sync::lock;

/// The token of the reactor's [`mio::Waker`] (wake-ups from other threads).
const WAKE: Token = Token(usize::MAX);

/// Readiness bits of a socket. A read or write that finds the socket drained clears
/// `READABLE` or `WRITABLE`; the `CLOSED` bits stay once set: with edge-triggered events, a
/// peer's close that arrives with its last bytes is reported once, and the read that takes
/// those bytes must not make the socket wait for an event that will not come.
const READABLE: u8 = 1;
const WRITABLE: u8 = 2;
const READ_CLOSED: u8 = 4;
const WRITE_CLOSED: u8 = 8;
/// Set, for good, once a write has waited for the socket: until then the reactor wakes no
/// writer for it. Nearly every socket reports itself writable with every event and nearly
/// none ever waits to write (replies fit its send buffer), so this spares each event the
/// two atomic operations of waking an empty writer slot.
const WRITER_WAITED: u8 = 16;

/// The bit that stays set with `bit` once the peer or the socket is done.
const fn closed(bit: u8) -> u8 {
    bit << 2
}

/// The most one read takes. A read goes to a buffer of the thread's own and is copied to
/// the caller's: a buffer's spare capacity is not initialized, and reading into it needs
/// `unsafe` (pgway has none) or zeroing it first, which for a reply of a hundred bytes
/// costs more than copying it (about 250 instructions a `-S` statement for 2 KiB).
const SCRATCH: usize = 64 * 1024;

thread_local! {
    /// The reactor of this thread, on a worker.
    static HERE: std::cell::RefCell<Option<Arc<Shared>>> = const { std::cell::RefCell::new(None) };
    /// Where this thread's reads land first (see [`SCRATCH`]).
    static LANDING: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// What a socket shares with the reactor: its readiness and who waits for it.
#[derive(Debug)]
struct Readiness {
    bits: AtomicU8,
    reader: AtomicWaker,
    writer: AtomicWaker,
}

/// A registered socket's place in [`Shared::sources`]: its readiness, and the generation
/// of the slot (part of the token, so that an event for a socket gone is not taken for
/// its slot's next one).
#[derive(Debug, Default)]
struct Slot {
    generation: u32,
    readiness: Option<Arc<Readiness>>,
}

#[derive(Debug, Default)]
struct Sources {
    slots: Vec<Slot>,
    free: Vec<u32>,
}

impl Sources {
    fn insert(&mut self, readiness: Arc<Readiness>) -> Token {
        let index = self.free.pop().unwrap_or_else(|| {
            self.slots.push(Slot::default());
            u32::try_from(self.slots.len() - 1).unwrap_or(u32::MAX)
        });
        let slot = &mut self.slots[index as usize];
        slot.generation = slot.generation.wrapping_add(1);
        slot.readiness = Some(readiness);
        token(index, slot.generation)
    }

    fn remove(&mut self, token: Token) {
        let (index, generation) = split(token);
        if let Some(slot) = self.slots.get_mut(index as usize) {
            if slot.generation == generation && slot.readiness.take().is_some() {
                self.free.push(index);
            }
        }
    }

    fn get(&self, token: Token) -> Option<&Readiness> {
        let (index, generation) = split(token);
        let slot = self.slots.get(index as usize)?;
        (slot.generation == generation)
            .then_some(slot.readiness.as_deref())
            .flatten()
    }
}

fn token(index: u32, generation: u32) -> Token {
    Token(((generation as usize) << 32) | index as usize)
}

fn split(token: Token) -> (u32, u32) {
    ((token.0 & 0xffff_ffff) as u32, (token.0 >> 32) as u32)
}

/// What other threads may use of a reactor: its registry, its sources, its waker.
#[derive(Debug)]
pub(crate) struct Shared {
    registry: mio::Registry,
    waker: mio::Waker,
    sources: Mutex<Sources>,
}

impl Shared {
    fn sources(&self) -> std::sync::MutexGuard<'_, Sources> {
        lock(&self.sources)
    }
}

/// Wakes a reactor from another thread (the executor's waker for wake-ups of its sessions
/// from other threads).
struct Wake(Arc<Shared>);

impl std::task::Wake for Wake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if let Err(cause) = self.0.waker.wake() {
            tracing::error!(%cause, "cannot wake a worker");
        }
    }
}

/// A worker's reactor: waits for its sockets' events and for wake-ups from other threads.
#[derive(Debug)]
pub(crate) struct Reactor {
    poll: mio::Poll,
    events: Events,
    shared: Arc<Shared>,
}

impl Reactor {
    /// A reactor for the calling thread: sockets made on it from now on ([`adopt`]) are
    /// registered with it.
    pub(crate) fn new() -> io::Result<Self> {
        let poll = mio::Poll::new()?;
        let shared = Arc::new(Shared {
            registry: poll.registry().try_clone()?,
            waker: mio::Waker::new(poll.registry(), WAKE)?,
            sources: Mutex::default(),
        });
        HERE.set(Some(Arc::clone(&shared)));
        Ok(Self {
            poll,
            events: Events::with_capacity(256),
            shared,
        })
    }

    /// The waker that wakes this reactor's [`Self::turn`] from any thread.
    pub(crate) fn waker(&self) -> Waker {
        Waker::from(Arc::new(Wake(Arc::clone(&self.shared))))
    }

    /// Waits for events (at most `timeout`; `Some(ZERO)` looks without waiting) and wakes
    /// the sessions that wait for them.
    pub(crate) fn turn(&mut self, timeout: Option<Duration>) {
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return,
            Err(cause) => {
                tracing::error!(%cause, "a worker cannot wait for its sockets");
                std::thread::sleep(Duration::from_millis(10));
                return;
            }
        }
        if self.events.is_empty() {
            return;
        }
        let sources = self.shared.sources();
        for event in &self.events {
            if event.token() == WAKE {
                continue;
            }
            let Some(readiness) = sources.get(event.token()) else {
                continue;
            };
            let mut bits = 0;
            if event.is_readable() {
                bits |= READABLE;
            }
            if event.is_read_closed() || event.is_error() {
                bits |= READABLE | READ_CLOSED;
            }
            if event.is_writable() {
                bits |= WRITABLE;
            }
            if event.is_write_closed() || event.is_error() {
                bits |= WRITABLE | WRITE_CLOSED;
            }
            // A writer that sets `WRITER_WAITED` after this either sees `WRITABLE` once
            // it has registered, or is woken here: the two updates are ordered.
            let before = readiness.bits.fetch_or(bits, Ordering::AcqRel);
            if bits & READABLE != 0 {
                readiness.reader.wake();
            }
            if bits & WRITABLE != 0 && before & WRITER_WAITED != 0 {
                readiness.writer.wake();
            }
        }
    }
}

impl Drop for Reactor {
    fn drop(&mut self) {
        HERE.with_borrow_mut(|here| {
            if here
                .as_ref()
                .is_some_and(|shared| Arc::ptr_eq(shared, &self.shared))
            {
                *here = None;
            }
        });
    }
}

/// True on a thread with a reactor of its own (a worker).
pub(crate) fn on_reactor() -> bool {
    HERE.with_borrow(Option::is_some)
}

/// A connected socket as a [`Transport`]: registered with the calling thread's reactor if
/// it has one (a worker), else with tokio's (it must then run inside a tokio runtime).
/// Nagle is turned off: every message is latency.
pub fn adopt(stream: std::net::TcpStream) -> io::Result<Box<dyn Transport>> {
    let _ = stream.set_nodelay(true);
    match HERE.with_borrow(Clone::clone) {
        Some(shared) => Ok(Box::new(Socket::register(stream, shared, fresh())?)),
        None => {
            stream.set_nonblocking(true)?;
            Ok(Box::new(tokio::net::TcpStream::from_std(stream)?))
        }
    }
}

/// Readiness of a socket not yet seen by the reactor: readable and writable until a read
/// or write says otherwise (the reactor reports its state when it is registered, but a
/// write tried before that need not wait for it).
fn fresh() -> Arc<Readiness> {
    Arc::new(Readiness {
        bits: AtomicU8::new(READABLE | WRITABLE),
        reader: AtomicWaker::new(),
        writer: AtomicWaker::new(),
    })
}

/// A socket's slot in its reactor's sources, freed when dropped (closing the socket takes
/// it out of the reactor's epoll set).
#[derive(Debug)]
struct Registration {
    token: Token,
    reactor: Arc<Shared>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.reactor.sources().remove(self.token);
    }
}

/// A TCP socket registered with a worker's reactor.
#[derive(Debug)]
pub struct Socket {
    stream: std::net::TcpStream,
    readiness: Arc<Readiness>,
    registration: Registration,
}

impl Socket {
    fn register(
        stream: std::net::TcpStream,
        reactor: Arc<Shared>,
        readiness: Arc<Readiness>,
    ) -> io::Result<Self> {
        stream.set_nonblocking(true)?;
        let token = reactor.sources().insert(Arc::clone(&readiness));
        let fd = stream.as_raw_fd();
        if let Err(e) = reactor.registry.register(
            &mut SourceFd(&fd),
            token,
            Interest::READABLE | Interest::WRITABLE,
        ) {
            reactor.sources().remove(token);
            return Err(e);
        }
        Ok(Self {
            stream,
            readiness,
            registration: Registration { token, reactor },
        })
    }

    fn ready(&self, bit: u8) -> bool {
        self.readiness.bits.load(Ordering::Acquire) & (bit | closed(bit)) != 0
    }

    /// Clears `bit` after a read or write found the socket drained. On the thread of the
    /// socket's own reactor (nearly always), nothing else writes its bits meanwhile: the
    /// reactor sets them on this thread, between polls. So a plain load and store do,
    /// where a socket used from another worker (its session moved) needs an atomic
    /// read-modify-write against that reactor's updates.
    fn drained(&self, bit: u8) {
        let bits = &self.readiness.bits;
        if self.at_home() {
            bits.store(bits.load(Ordering::Relaxed) & !bit, Ordering::Relaxed);
        } else {
            bits.fetch_and(!bit, Ordering::AcqRel);
        }
    }

    /// Whether the calling thread is the one whose reactor the socket is registered with.
    fn at_home(&self) -> bool {
        HERE.with_borrow(|here| {
            here.as_ref()
                .is_some_and(|here| Arc::ptr_eq(here, &self.registration.reactor))
        })
    }

    /// Ready once the reactor has seen the socket `bit`-ready (now or after a wait).
    fn poll_ready(&self, bit: u8, cx: &mut Context<'_>) -> Poll<()> {
        if self.ready(bit) {
            return Poll::Ready(());
        }
        let waiters = if bit == READABLE {
            &self.readiness.reader
        } else {
            let bits = &self.readiness.bits;
            if bits.load(Ordering::Acquire) & WRITER_WAITED == 0 {
                bits.fetch_or(WRITER_WAITED, Ordering::AcqRel);
            }
            &self.readiness.writer
        };
        waiters.register(cx.waker());
        // An event in between (from another thread's reactor, for a socket that moved) is
        // seen here, or wakes the waker just stored.
        if self.ready(bit) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Waits for `bit`, then tries `op`, going round again while it would block (the
    /// readiness bit was stale: the operation cleared it).
    fn poll_io<T>(
        &self,
        bit: u8,
        cx: &mut Context<'_>,
        mut op: impl FnMut() -> io::Result<T>,
    ) -> Poll<io::Result<T>> {
        loop {
            std::task::ready!(self.poll_ready(bit, cx));
            match op() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                done => return Poll::Ready(done),
            }
        }
    }

    /// One `recv` of at most `room` bytes, handed to `take`; a short read (or `WouldBlock`)
    /// marks the socket drained.
    fn recv(&self, room: usize, take: impl FnOnce(&[u8])) -> io::Result<usize> {
        LANDING.with_borrow_mut(|landing| {
            if landing.is_empty() {
                landing.resize(SCRATCH, 0);
            }
            let len = room.clamp(1, SCRATCH);
            let dst = &mut landing[..len];
            match rustix::net::recv(&self.stream, &mut *dst, rustix::net::RecvFlags::empty()) {
                Ok((n, _)) => {
                    if n > 0 && n < len {
                        self.drained(READABLE);
                    }
                    take(&dst[..n]);
                    Ok(n)
                }
                Err(rustix::io::Errno::AGAIN) => {
                    self.drained(READABLE);
                    Err(io::ErrorKind::WouldBlock.into())
                }
                Err(e) => Err(e.into()),
            }
        })
    }

    /// One `send` of `src`; `WouldBlock` marks the socket unwritable.
    fn send(&self, src: &[u8]) -> io::Result<usize> {
        match rustix::net::send(&self.stream, src, rustix::net::SendFlags::NOSIGNAL) {
            Ok(n) => Ok(n),
            Err(rustix::io::Errno::AGAIN) => {
                self.drained(WRITABLE);
                Err(io::ErrorKind::WouldBlock.into())
            }
            Err(e) => Err(e.into()),
        }
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.poll_io(READABLE, cx, || {
            self.recv(buf.remaining(), |bytes| buf.put_slice(bytes))
                .map(drop)
        })
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_io(WRITABLE, cx, || self.send(buf))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.stream.shutdown(std::net::Shutdown::Write))
    }
}

impl Transport for Socket {
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_ready(READABLE, cx).map(Ok)
    }

    /// A read of one byte, only if the reactor saw the socket readable since it was
    /// last drained: a quiet socket costs no system call.
    fn is_stale(&mut self) -> bool {
        if !self.ready(READABLE) {
            return false;
        }
        !matches!(self.recv(1, |_| {}), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Registered with the calling thread's reactor instead of the one it was (two
    /// `epoll_ctl` calls); with tokio's off the workers.
    fn rebind(self: Box<Self>) -> io::Result<Box<dyn Transport>> {
        if self.at_home() {
            return Ok(self);
        }
        let here = HERE.with_borrow(Clone::clone);
        let fd = self.stream.as_raw_fd();
        self.registration
            .reactor
            .registry
            .deregister(&mut SourceFd(&fd))?;
        let Self {
            stream,
            readiness,
            registration,
        } = *self;
        drop(registration);
        match here {
            Some(here) => Ok(Box::new(Socket::register(stream, here, readiness)?)),
            None => Ok(Box::new(tokio::net::TcpStream::from_std(stream)?)),
        }
    }

    fn write_now(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !self.ready(WRITABLE) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.send(buf)
    }

    /// A read into the spare capacity of `buf` (through the thread's landing buffer, see
    /// [`SCRATCH`]).
    fn read_now(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        if !self.ready(READABLE) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let room = buf.capacity() - buf.len();
        self.recv(room, |bytes| buf.extend_from_slice(bytes))
    }

    /// [`Self::read_now`] once the reactor has seen the socket readable.
    fn poll_read_buf(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        self.poll_io(READABLE, cx, || {
            let room = buf.capacity() - buf.len();
            self.recv(room, |bytes| buf.extend_from_slice(bytes))
        })
    }

    /// [`Self::poll_read_buf`] alone: it reads at once, with no waker stored, when the
    /// socket is readable.
    fn poll_read_now(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        self.poll_read_buf(cx, buf)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::workers::on_a_worker;
    use std::io::{Read, Write};
    use std::sync::mpsc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A connected pair: the accepted end registered with this thread's reactor, the
    /// other a plain blocking socket for the test to drive.
    pub(in crate::net) fn pair() -> (Box<dyn Transport>, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let peer =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (accepted, _) = listener.accept().expect("accept");
        (adopt(accepted).expect("register"), peer)
    }

    /// Waits until the reactor has seen the socket readable.
    async fn readable(socket: &mut Box<dyn Transport>) {
        std::future::poll_fn(|cx| socket.poll_readable(cx))
            .await
            .expect("readable");
    }

    #[test]
    fn reads_take_what_arrived_in_order_and_a_drained_socket_waits_for_the_reactor() {
        on_a_worker(async {
            let (mut socket, mut peer) = pair();
            let sent: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
            let writer = {
                let sent = sent.clone();
                let mut peer = peer.try_clone().expect("clone");
                std::thread::spawn(move || peer.write_all(&sent).expect("write"))
            };
            let mut got = Vec::new();
            while got.len() < sent.len() {
                let mut buf = BytesMut::with_capacity(64 * 1024);
                match socket.read_now(&mut buf) {
                    Ok(n) => {
                        assert!(n > 0 && n == buf.len());
                        got.extend_from_slice(&buf);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => readable(&mut socket).await,
                    Err(e) => panic!("{e}"),
                }
            }
            writer.join().expect("writer");
            assert_eq!(got, sent, "every byte, in order");
            // Drained: nothing to read, without a system call, until the reactor says so.
            let mut buf = BytesMut::with_capacity(64);
            let drained = socket.read_now(&mut buf);
            assert!(matches!(&drained, Err(e) if e.kind() == io::ErrorKind::WouldBlock));
            assert!(buf.is_empty(), "a failed read leaves the buffer as it was");
            peer.write_all(b"abc").expect("write");
            readable(&mut socket).await;
            assert_eq!(socket.read_now(&mut buf).expect("read"), 3);
            assert_eq!(&buf[..], b"abc");
            drop(peer);
            readable(&mut socket).await;
            assert_eq!(
                socket
                    .read_now(&mut BytesMut::with_capacity(64))
                    .expect("eof"),
                0
            );
        });
    }

    #[test]
    fn a_close_reported_with_the_last_bytes_still_ends_the_stream_after_they_are_read() {
        on_a_worker(async {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let mut peer = std::net::TcpStream::connect(listener.local_addr().expect("addr"))
                .expect("connect");
            let (accepted, _) = listener.accept().expect("accept");
            peer.write_all(b"last").expect("write");
            drop(peer);
            let here = HERE.with_borrow(Clone::clone).expect("a worker's reactor");
            let mut socket = Socket::register(accepted, here, fresh()).expect("register");
            // The reactor reports the bytes and the close in one event (edge-triggered:
            // once).
            for _ in 0..500 {
                if socket.readiness.bits.load(Ordering::Acquire) & READ_CLOSED != 0 {
                    break;
                }
                crate::timer::sleep(Duration::from_millis(10)).await;
            }
            assert_ne!(
                socket.readiness.bits.load(Ordering::Acquire) & READ_CLOSED,
                0
            );
            let mut buf = BytesMut::with_capacity(64);
            // A short read: the socket counts as drained, but not as open.
            assert_eq!(socket.read_now(&mut buf).expect("the bytes"), 4);
            assert_eq!(&buf[..], b"last");
            let end = std::future::poll_fn(|cx| socket.poll_read_buf(cx, &mut buf));
            assert_eq!(end.await.expect("end of stream"), 0);
        });
    }

    #[test]
    fn a_write_larger_than_the_socket_takes_waits_for_room_and_arrives_whole() {
        on_a_worker(async {
            let (socket, mut peer) = pair();
            let mut framed = crate::net::FramedStream::new(socket);
            let big: Vec<u8> = (0..8u32 << 20).map(|i| (i % 241) as u8).collect();
            let expected = big.clone();
            let reader = std::thread::spawn(move || {
                let mut got = vec![0; expected.len()];
                peer.read_exact(&mut got).expect("read");
                got == expected
            });
            framed.send_bytes(&big).await.expect("send");
            assert!(
                tokio::task::spawn_blocking(move || reader.join().expect("reader"))
                    .await
                    .expect("join"),
                "the peer got every byte, in order"
            );
        });
    }

    #[test]
    fn a_quiet_socket_is_not_stale_until_its_peer_writes_or_leaves() {
        on_a_worker(async {
            for leaves in [false, true] {
                let (mut socket, mut peer) = pair();
                // Fresh sockets read as readable until a read says otherwise.
                assert!(!socket.is_stale());
                crate::timer::sleep(Duration::from_millis(20)).await;
                assert!(!socket.is_stale(), "still quiet after the reactor's turn");
                if leaves {
                    drop(peer);
                } else {
                    peer.write_all(b"N").expect("write");
                }
                readable(&mut socket).await;
                assert!(socket.is_stale(), "leaves: {leaves}");
            }
        });
    }

    #[test]
    fn a_socket_moves_to_another_workers_reactor_and_off_the_workers() {
        let (to_second, on_second) = mpsc::channel::<(Box<dyn Transport>, std::net::TcpStream)>();
        let second = std::thread::spawn(move || {
            on_a_worker(async move {
                let (socket, mut peer) = on_second.recv().expect("socket");
                let mut socket = socket.rebind().expect("rebind");
                peer.write_all(b"ping").expect("write");
                let mut got = [0u8; 4];
                socket.read_exact(&mut got).await.expect("read");
                assert_eq!(&got, b"ping");
                socket.write_all(b"pong").await.expect("write");
                let mut back = [0u8; 4];
                peer.read_exact(&mut back).expect("read");
                assert_eq!(&back, b"pong");
                // Off the workers, inside a tokio runtime: tokio's reactor takes it.
                let runtime = tokio::runtime::Handle::current();
                let moved = std::thread::spawn(move || {
                    let _entered = runtime.enter();
                    let socket = socket.rebind().expect("rebind to tokio");
                    (socket, peer)
                })
                .join()
                .expect("thread");
                let (mut socket, mut peer) = moved;
                peer.write_all(b"last").expect("write");
                let mut got = [0u8; 4];
                socket.read_exact(&mut got).await.expect("read");
                assert_eq!(&got, b"last");
            });
        });
        on_a_worker(async move {
            let (mut socket, mut peer) = pair();
            // Used here first, so it is registered and has seen events.
            peer.write_all(b"x").expect("write");
            let mut got = [0u8; 1];
            socket.read_exact(&mut got).await.expect("read");
            to_second.send((socket, peer)).expect("second runs");
        });
        second.join().expect("the second worker's checks passed");
    }
}
