//! The floor under a gateway's cost per statement: a plain TCP relay (each client
//! connection paired with one server connection, bytes copied both ways, as HAProxy in
//! `mode tcp`), with nothing parsed, routed or pooled. Two of them, to tell what the event
//! loop costs from what pgway's session does:
//!
//! - `tokio`: one current-thread tokio runtime, a task per client running
//!   `tokio::io::copy_bidirectional` (the futures, wakers and readiness layers pgway's
//!   sessions run on);
//! - `mio`: one thread polling every socket with mio, a hand-written state per connection
//!   pair (what a per-worker event loop would run on, as pgbouncer runs on libevent);
//! - `own`: async code again (a future per direction of each pair, reading and writing
//!   through `AsyncRead`-like calls), on a minimal executor and mio reactor of its own, one
//!   thread, no locks: what async sessions would cost without tokio's scheduler, reactor
//!   and readiness layers;
//! - `exec`: the same futures and executor as `own`, on tokio's sockets, polled from a
//!   current-thread tokio runtime's `block_on` (the shape of pgway's workers until they
//!   got a reactor of their own, src/net/reactor.rs): what tokio's reactor and readiness
//!   layers alone cost.
//!
//! Not part of pgway. benches/PROFILE.md counts their instructions per statement with
//! callgrind against pgway's and pgbouncer's:
//!
//! ```sh
//! cargo build --release --example relay_floor
//! valgrind --tool=callgrind target/release/examples/relay_floor mio 127.0.0.1:6475 127.0.0.1:5462
//! ```
//!
//! (then `pgbench -S -c 8` through 6475, as benches/instructions-per-statement.sh does with
//! `GATEWAY=relay-mio` or `GATEWAY=relay-tokio`).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "usage: relay_floor tokio|mio|own|exec LISTEN_ADDR UPSTREAM_ADDR",
        )
    };
    let (kind, listen, upstream) = match args.as_slice() {
        [_, kind, listen, upstream] => (kind.as_str(), listen, upstream),
        _ => return Err(usage()),
    };
    let listen: SocketAddr = listen.parse().map_err(|_| usage())?;
    let upstream: SocketAddr = upstream.parse().map_err(|_| usage())?;
    match kind {
        "tokio" => tokio_relay(listen, upstream),
        "mio" => mio_relay(listen, upstream),
        "own" => own::relay(listen, upstream),
        "exec" => own::on_tokio(listen, upstream),
        _ => Err(usage()),
    }
}

fn tokio_relay(listen: SocketAddr, upstream: SocketAddr) -> io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        loop {
            let (mut client, _) = listener.accept().await?;
            tokio::spawn(async move {
                let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    })
}

/// One side of a pair: its socket, and bytes read from the other side not yet written.
struct Side {
    stream: mio::net::TcpStream,
    pending: Vec<u8>,
}

const LISTENER: mio::Token = mio::Token(usize::MAX);

fn mio_relay(listen: SocketAddr, upstream: SocketAddr) -> io::Result<()> {
    use mio::{Events, Interest, Poll, Token};

    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(256);
    let mut listener = mio::net::TcpListener::bind(listen)?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    // Token 2n is a client, 2n + 1 its server.
    let mut sides: HashMap<usize, Side> = HashMap::new();
    let mut next = 0usize;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match poll.poll(&mut events, None) {
            Ok(()) => {}
            // callgrind_control interrupts the wait when it asks for a dump.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for event in &events {
            if event.token() == LISTENER {
                loop {
                    let (mut client, _) = match listener.accept() {
                        Ok(accepted) => accepted,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e),
                    };
                    // A blocking connect on loopback: set-up cost, not per statement.
                    let server = std::net::TcpStream::connect(upstream)?;
                    server.set_nonblocking(true)?;
                    let mut server = mio::net::TcpStream::from_std(server);
                    client.set_nodelay(true)?;
                    server.set_nodelay(true)?;
                    let (c, s) = (2 * next, 2 * next + 1);
                    next += 1;
                    poll.registry().register(
                        &mut client,
                        Token(c),
                        Interest::READABLE | Interest::WRITABLE,
                    )?;
                    poll.registry().register(
                        &mut server,
                        Token(s),
                        Interest::READABLE | Interest::WRITABLE,
                    )?;
                    sides.insert(
                        c,
                        Side {
                            stream: client,
                            pending: Vec::new(),
                        },
                    );
                    sides.insert(
                        s,
                        Side {
                            stream: server,
                            pending: Vec::new(),
                        },
                    );
                }
                continue;
            }
            let me = event.token().0;
            let peer = me ^ 1;
            if relay(&mut sides, me, peer, &mut buf).is_err() {
                for token in [me, peer] {
                    if let Some(mut side) = sides.remove(&token) {
                        let _ = poll.registry().deregister(&mut side.stream);
                    }
                }
            }
        }
    }
}

/// Reads what `me` has and writes it to `peer` (keeping what the socket does not take),
/// and writes what `me` still owes from before. `Err` when either side is closed.
fn relay(
    sides: &mut HashMap<usize, Side>,
    me: usize,
    peer: usize,
    buf: &mut [u8],
) -> io::Result<()> {
    let closed = || io::Error::from(io::ErrorKind::UnexpectedEof);
    flush(sides.get_mut(&me).ok_or_else(closed)?)?;
    loop {
        let side = sides.get_mut(&me).ok_or_else(closed)?;
        let n = match side.stream.read(buf) {
            Ok(0) => return Err(closed()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        };
        let other = sides.get_mut(&peer).ok_or_else(closed)?;
        if other.pending.is_empty() {
            // Straight from the read buffer; only what the socket does not take is kept.
            let written = match other.stream.write(&buf[..n]) {
                Ok(w) => w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(e),
            };
            other.pending.extend_from_slice(&buf[written..n]);
        } else {
            other.pending.extend_from_slice(&buf[..n]);
            flush(other)?;
        }
        // A short read drained the socket (edge-triggered: more data is a new event).
        if n < buf.len() {
            return Ok(());
        }
    }
}

/// Writes as much of `side.pending` as the socket takes.
fn flush(side: &mut Side) -> io::Result<()> {
    while !side.pending.is_empty() {
        match side.stream.write(&side.pending) {
            Ok(n) => {
                side.pending.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The `own` relay: futures on a one-thread executor whose reactor is a mio `Poll`.
mod own {
    use std::cell::{Cell, RefCell};
    use std::future::Future;
    use std::io::{self, Read, Write};
    use std::net::SocketAddr;
    use std::pin::Pin;
    use std::rc::Rc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::task::{Context, Poll, Wake, Waker};

    use mio::{Events, Interest, Token};

    thread_local! {
        /// Tasks woken since the last turn.
        static READY: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
        /// On tokio (`exec`): the `block_on` future's waker, while the executor waits.
        static IDLE: RefCell<Option<Waker>> = const { RefCell::new(None) };
    }

    /// A task's waker: its slot (one thread only, so waking is a push). On tokio
    /// (`ON_TOKIO`), waking a task also wakes the `block_on` future if the executor waits.
    struct Entry<const ON_TOKIO: bool> {
        slot: usize,
        queued: AtomicBool,
    }

    impl<const ON_TOKIO: bool> Wake for Entry<ON_TOKIO> {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            if !self.queued.swap(true, Ordering::Relaxed) {
                READY.with_borrow_mut(|r| r.push(self.slot));
                if ON_TOKIO {
                    if let Some(w) = IDLE.with_borrow_mut(Option::take) {
                        w.wake();
                    }
                }
            }
        }
    }

    /// A socket's readiness as the reactor last saw it, and who waits for it.
    #[derive(Default)]
    struct Readiness {
        readable: Cell<bool>,
        writable: Cell<bool>,
        reader: Cell<Option<Waker>>,
        writer: Cell<Option<Waker>>,
    }

    /// A socket registered with the reactor.
    struct Stream {
        socket: mio::net::TcpStream,
        ready: Rc<Readiness>,
    }

    impl Stream {
        fn poll_read(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
            loop {
                if !self.ready.readable.get() {
                    self.ready.reader.set(Some(cx.waker().clone()));
                    return Poll::Pending;
                }
                match (&self.socket).read(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.ready.readable.set(false)
                    }
                    Ok(n) if n > 0 && n < buf.len() => {
                        // A short read drained the socket: the next read waits for an event.
                        self.ready.readable.set(false);
                        return Poll::Ready(Ok(n));
                    }
                    other => return Poll::Ready(other),
                }
            }
        }

        fn poll_write(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            loop {
                if !self.ready.writable.get() {
                    self.ready.writer.set(Some(cx.waker().clone()));
                    return Poll::Pending;
                }
                match (&self.socket).write(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.ready.writable.set(false)
                    }
                    other => return Poll::Ready(other),
                }
            }
        }
    }

    /// Copies `from` to `to` until either side ends.
    async fn copy(from: Rc<Stream>, to: Rc<Stream>) -> io::Result<()> {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = std::future::poll_fn(|cx| from.poll_read(cx, &mut buf)).await?;
            if n == 0 {
                return Ok(());
            }
            let mut done = 0;
            while done < n {
                done += std::future::poll_fn(|cx| to.poll_write(cx, &buf[done..n])).await?;
            }
        }
    }

    type Task = Pin<Box<dyn Future<Output = ()>>>;

    type Tasks<const ON_TOKIO: bool> = Vec<Option<(Task, Waker, Arc<Entry<ON_TOKIO>>)>>;

    /// Polls the tasks woken since the last batch; `batch` is scratch space.
    fn run_batch<const ON_TOKIO: bool>(tasks: &mut Tasks<ON_TOKIO>, batch: &mut Vec<usize>) {
        READY.with_borrow_mut(|r| std::mem::swap(r, batch));
        for slot in batch.drain(..) {
            let Some(Some((task, waker, entry))) = tasks.get_mut(slot) else {
                continue;
            };
            entry.queued.store(false, Ordering::Relaxed);
            if task
                .as_mut()
                .poll(&mut Context::from_waker(waker))
                .is_ready()
            {
                tasks[slot] = None;
            }
        }
    }

    /// Adds `task`, to be polled in the next batch.
    fn spawn<const ON_TOKIO: bool>(tasks: &mut Tasks<ON_TOKIO>, task: Task) {
        let slot = tasks.len();
        let entry = Arc::new(Entry {
            slot,
            queued: AtomicBool::new(true),
        });
        let waker = Waker::from(Arc::clone(&entry));
        tasks.push(Some((task, waker, entry)));
        READY.with_borrow_mut(|r| r.push(slot));
    }

    const LISTENER: Token = Token(usize::MAX);

    pub(super) fn relay(listen: SocketAddr, upstream: SocketAddr) -> io::Result<()> {
        let mut poll = mio::Poll::new()?;
        let mut events = Events::with_capacity(256);
        let mut listener = mio::net::TcpListener::bind(listen)?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let mut tasks: Tasks<false> = Vec::new();
        // Token n: the readiness of socket n (sockets are never reused here).
        let mut sockets: Vec<Rc<Readiness>> = Vec::new();
        let mut batch = Vec::new();
        loop {
            run_batch(&mut tasks, &mut batch);
            if READY.with_borrow(|r| !r.is_empty()) {
                continue;
            }
            match poll.poll(&mut events, None) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for event in &events {
                if event.token() != LISTENER {
                    let ready = &sockets[event.token().0];
                    if event.is_readable() || event.is_read_closed() || event.is_error() {
                        ready.readable.set(true);
                        if let Some(w) = ready.reader.take() {
                            w.wake();
                        }
                    }
                    if event.is_writable() || event.is_write_closed() || event.is_error() {
                        ready.writable.set(true);
                        if let Some(w) = ready.writer.take() {
                            w.wake();
                        }
                    }
                    continue;
                }
                loop {
                    let (client, _) = match listener.accept() {
                        Ok(accepted) => accepted,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e),
                    };
                    // A blocking connect on loopback: set-up cost, not per statement.
                    let server = std::net::TcpStream::connect(upstream)?;
                    server.set_nonblocking(true)?;
                    let server = mio::net::TcpStream::from_std(server);
                    let mut pair = Vec::new();
                    for mut socket in [client, server] {
                        socket.set_nodelay(true)?;
                        poll.registry().register(
                            &mut socket,
                            Token(sockets.len()),
                            Interest::READABLE | Interest::WRITABLE,
                        )?;
                        let ready = Rc::new(Readiness::default());
                        sockets.push(Rc::clone(&ready));
                        pair.push(Rc::new(Stream { socket, ready }));
                    }
                    let (c, s) = (Rc::clone(&pair[0]), Rc::clone(&pair[1]));
                    for task in [
                        Box::pin(async move {
                            let _ = copy(c, s).await;
                        }) as Task,
                        Box::pin(async move {
                            let _ = copy(Rc::clone(&pair[1]), Rc::clone(&pair[0])).await;
                        }),
                    ] {
                        spawn(&mut tasks, task);
                    }
                }
            }
        }
    }

    /// Copies `from` to `to` until either side ends, on tokio's sockets, as pgway's
    /// `Transport` does (src/net/transport.rs): a read only once the reactor saw the socket
    /// readable, a short read reported to tokio as `WouldBlock` so that it forgets the
    /// readiness (no read that blocks before the next wait), a write tried before waiting.
    async fn copy_tokio(
        from: Rc<tokio::net::TcpStream>,
        to: Rc<tokio::net::TcpStream>,
    ) -> io::Result<()> {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = loop {
                std::future::poll_fn(|cx| from.poll_read_ready(cx)).await?;
                let room = buf.len();
                let mut short = None;
                let read = from.try_io(tokio::io::Interest::READABLE, || {
                    match from.try_read(&mut buf) {
                        Ok(n) if n > 0 && n < room => {
                            short = Some(n);
                            Err(io::ErrorKind::WouldBlock.into())
                        }
                        other => other,
                    }
                });
                match (short, read) {
                    (Some(n), _) | (None, Ok(n)) => break n,
                    (None, Err(e)) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    (None, Err(e)) => return Err(e),
                }
            };
            if n == 0 {
                return Ok(());
            }
            let mut done = 0;
            while done < n {
                match to.try_write(&buf[done..n]) {
                    Ok(k) => done += k,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::future::poll_fn(|cx| to.poll_write_ready(cx)).await?;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }

    pub(super) fn on_tokio(listen: SocketAddr, upstream: SocketAddr) -> io::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind(listen).await?;
            let mut tasks: Tasks<true> = Vec::new();
            let mut batch = Vec::new();
            loop {
                // The accept, then a batch of the woken tasks, as one poll of this future.
                let accepted = std::future::poll_fn(|cx| {
                    if let Poll::Ready(accepted) = listener.poll_accept(cx) {
                        return Poll::Ready(Some(accepted));
                    }
                    run_batch(&mut tasks, &mut batch);
                    if READY.with_borrow(|r| !r.is_empty()) {
                        cx.waker().wake_by_ref();
                    } else {
                        IDLE.with_borrow_mut(|idle| *idle = Some(cx.waker().clone()));
                    }
                    Poll::Pending
                })
                .await;
                let Some(accepted) = accepted else { continue };
                let (client, _) = accepted?;
                let server = tokio::net::TcpStream::connect(upstream).await?;
                client.set_nodelay(true)?;
                server.set_nodelay(true)?;
                let (c, s) = (Rc::new(client), Rc::new(server));
                let (c2, s2) = (Rc::clone(&c), Rc::clone(&s));
                for task in [
                    Box::pin(async move {
                        let _ = copy_tokio(c, s).await;
                    }) as Task,
                    Box::pin(async move {
                        let _ = copy_tokio(s2, c2).await;
                    }),
                ] {
                    spawn(&mut tasks, task);
                }
            }
        })
    }
}
