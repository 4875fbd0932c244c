//! Client sessions run on worker threads, one per core, each with its own single-threaded
//! tokio runtime and its own epoll instance (the layout HAProxy uses with `nbthread`).
//!
//! A session and the server connections it borrows then live on one thread: a round trip
//! wakes no other thread, and nothing is handed between cores. With one shared
//! multi-threaded runtime, every readiness event could wake the other worker and move the
//! task, which cost more CPU per statement than the statement's own work (see
//! `benches/RESULTS.md`). The accept loop hands each new client to the worker with the
//! fewest sessions.
//!
//! Server connections remember which worker's reactor they are registered with
//! ([`current`]); the pool prefers one registered with the borrowing thread and moves
//! another over (two `epoll_ctl` calls) only when the thread has none idle.

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

/// Errors starting the workers.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A thread or its runtime could not be created.
    #[error("cannot start worker thread: {0}")]
    Start(#[from] std::io::Error),
}

thread_local! {
    /// Which reactor this thread's I/O is registered with: 0 for threads that are not
    /// workers (the main runtime), `i + 1` for worker `i`.
    static REACTOR: Cell<usize> = const { Cell::new(0) };
}

/// The reactor of the calling thread (see [`REACTOR`]).
pub fn current() -> usize {
    REACTOR.with(Cell::get)
}

/// Number of workers for this machine: one per core the process may use.
pub fn default_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A new client for a worker: the socket (detached from the accepting runtime), the peer,
/// and the client's slot under `client.max_connections`, held until the session ends.
type Accepted = (std::net::TcpStream, SocketAddr, OwnedSemaphorePermit);

/// The running workers.
#[derive(Debug)]
pub struct Workers {
    senders: Vec<mpsc::UnboundedSender<Accepted>>,
    load: Arc<Vec<AtomicUsize>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    stop: CancellationToken,
}

impl Workers {
    /// Starts `count` workers. Each runs `serve(stream, peer)` for the clients handed to
    /// it, as tasks tracked by `sessions`, until [`Self::shutdown`].
    pub fn start<F, Fut>(count: usize, sessions: TaskTracker, serve: F) -> Result<Self, WorkerError>
    where
        F: Fn(tokio::net::TcpStream, SocketAddr) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let serve = Arc::new(serve);
        let load = Arc::new((0..count).map(|_| AtomicUsize::new(0)).collect::<Vec<_>>());
        let stop = CancellationToken::new();
        let mut senders = Vec::with_capacity(count);
        let mut threads = Vec::with_capacity(count);
        for index in 0..count {
            let (tx, mut rx) = mpsc::unbounded_channel::<Accepted>();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (serve, load, stop, sessions) = (
                Arc::clone(&serve),
                Arc::clone(&load),
                stop.clone(),
                sessions.clone(),
            );
            let thread = std::thread::Builder::new()
                .name(format!("pgway-worker-{index}"))
                .spawn(move || {
                    REACTOR.with(|r| r.set(index + 1));
                    runtime.block_on(async move {
                        loop {
                            let next = tokio::select! {
                                _ = stop.cancelled() => return,
                                next = rx.recv() => next,
                            };
                            let Some((stream, peer, permit)) = next else {
                                break;
                            };
                            let stream = match tokio::net::TcpStream::from_std(stream) {
                                Ok(stream) => stream,
                                Err(cause) => {
                                    warn!(%cause, %peer, "cannot register client socket");
                                    load[index].fetch_sub(1, Ordering::Relaxed);
                                    continue;
                                }
                            };
                            let (serve, load) = (Arc::clone(&serve), Arc::clone(&load));
                            sessions.spawn(async move {
                                serve(stream, peer).await;
                                load[index].fetch_sub(1, Ordering::Relaxed);
                                drop(permit);
                            });
                        }
                        // No more clients: let this worker's sessions finish (or be stopped).
                        tokio::select! {
                            _ = stop.cancelled() => {}
                            _ = sessions.wait() => {}
                        }
                    });
                })?;
            senders.push(tx);
            threads.push(thread);
        }
        Ok(Self {
            senders,
            load,
            threads,
            stop,
        })
    }

    /// Hands a new client to the least busy worker.
    pub fn dispatch(
        &self,
        stream: tokio::net::TcpStream,
        peer: SocketAddr,
        permit: OwnedSemaphorePermit,
    ) {
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(cause) => {
                warn!(%cause, %peer, "cannot detach client socket");
                return;
            }
        };
        let index = (0..self.senders.len())
            .min_by_key(|&i| self.load[i].load(Ordering::Relaxed))
            .unwrap_or(0);
        self.load[index].fetch_add(1, Ordering::Relaxed);
        if self.senders[index].send((stream, peer, permit)).is_err() {
            self.load[index].fetch_sub(1, Ordering::Relaxed);
            warn!(%peer, "worker gone; client dropped");
        }
    }

    /// Takes no more clients; sessions already running go on until they end.
    pub fn close(&mut self) {
        self.senders.clear();
    }

    /// Stops the workers (ending any session still running) and waits for their threads.
    pub async fn shutdown(mut self) {
        self.close();
        self.stop.cancel();
        let threads = std::mem::take(&mut self.threads);
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}

impl Drop for Workers {
    /// Dropped without [`Workers::shutdown`] (say, `run` abandoned by its caller): the
    /// threads still end, with their sessions.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
