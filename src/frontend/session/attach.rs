//! Taking and releasing a server connection: Idle -> Attached when a request needs one,
//! back to Idle when the server is idle and nothing is outstanding, and what is left when
//! the client leaves.

use std::sync::Arc;

use bytes::BytesMut;
use tracing::{debug, warn};

use super::{Link, Session, State};
use crate::backend::{PoolError, PooledConn};
use crate::error::ClientError;
use crate::frontend::registry::Clients as Registry;
use crate::net::NetError;
use crate::protocol::messages;
use crate::protocol::MAX_MESSAGE_LEN;
use crate::route::{Target, Why};
use crate::topology::Want;

/// How far [`Session::attach_now`] got without waiting.
pub(super) enum Quick {
    /// The session holds a server connection.
    Attached,
    /// It chose this node (pool index, is it the primary); no connection to it was parked.
    Picked((usize, bool)),
    /// It has to wait (a `PAUSE`, a read-your-writes floor, no node usable now).
    NotNow,
}

/// The node a request for `target` wants.
fn want_for(target: Target) -> Want {
    match target {
        Target::Replica => Want::Replica,
        Target::Primary => Want::Primary,
    }
}

impl Session<'_> {
    /// Idle -> Attached on what the pool of the node [`Self::attach_now`] picked
    /// ([`Quick::Picked`]) gave. `Ok(None)`: attached; `Ok(Some(down))`: that node is down
    /// (`down` nodes found down so far), [`Self::attach_waiting`] tries another; `Err`:
    /// no connection for this request.
    ///
    /// Taking a connection goes in three steps, the caller's: [`Self::attach_now`] first,
    /// a plain function for the usual case (no `PAUSE`, no read-your-writes floor to wait
    /// for, a node up and a parked connection to it), so that case makes no future at all;
    /// the next most usual, a wait for a free slot in the pool of the node picked, awaits
    /// [`crate::backend::Pool::acquire`] itself (one level of future) and hands its outcome
    /// here; everything else is the boxed [`Self::attach_waiting`], so the session's own
    /// future stays small. (That box cost mimalloc about 440 instructions to allocate and
    /// 150 to free: a block of 728 bytes, not a power of two, takes its aligned
    /// allocation's slow path whenever the page's free list is empty, which a block that
    /// comes and goes alone finds every time.)
    pub(super) fn attach_acquired(
        &mut self,
        target: Target,
        (index, primary): (usize, bool),
        acquired: Result<PooledConn, PoolError>,
    ) -> Result<Option<usize>, ClientError> {
        match acquired {
            Ok(conn) => {
                self.attach_to(conn, index, target == Target::Replica && !primary);
                Ok(None)
            }
            Err(e) => {
                let mut down = 0;
                match self.acquire_failed(index, e, &mut down) {
                    Ok(()) => Ok(Some(down)),
                    Err(e) => {
                        Registry::not_attached(self.registered.as_ref().map(|r| &*r.entry));
                        Err(e)
                    }
                }
            }
        }
    }

    /// Takes a server connection for `target` where nothing has to be waited for (see
    /// [`Self::attach_acquired`]).
    pub(super) fn attach_now(&mut self, target: Target) -> Quick {
        let shared = self.shared;
        if target == Target::Replica && self.read_floor() != 0 {
            return Quick::NotNow;
        }
        let want = want_for(target);
        if !shared
            .clients
            .open_now(self.registered.as_ref().map(|r| &*r.entry))
        {
            return Quick::NotNow;
        }
        let Some((index, primary)) = self.pick_now(want) else {
            return Quick::NotNow;
        };
        let Some(conn) = self.pools[index].1.try_acquire() else {
            return Quick::Picked((index, primary));
        };
        self.attach_to(conn, index, want == Want::Replica && !primary);
        Quick::Attached
    }

    /// Takes a server connection for `target` (Idle -> Attached) when it may have to wait:
    /// for `RESUME`, a replica to replay the client's writes, a primary after a failover, a
    /// free slot or a new connection.
    /// `picked`: a node (pool index, is it the primary) to try first; `down`: how many
    /// nodes were found down already.
    pub(super) async fn attach_waiting(
        &mut self,
        target: Target,
        picked: Option<(usize, bool)>,
        down: usize,
    ) -> Result<(), ClientError> {
        let shared = self.shared;
        // `PAUSE` holds new transactions here (a client ended by `KILL_CLIENT` or pgway's
        // shutdown meanwhile stops waiting).
        let entry = self.registered.as_ref().map(|r| &*r.entry);
        tokio::select! {
            biased;
            () = shared.clients.gate(entry) => {}
            () = &mut self.stopping => {
                Registry::not_attached(self.registered.as_ref().map(|r| &*r.entry));
                return Err(ClientError::Shutdown);
            }
        }
        let attached = self.take_connection(target, picked, down).await;
        if attached.is_err() {
            Registry::not_attached(self.registered.as_ref().map(|r| &*r.entry));
        }
        attached
    }

    /// Idle -> Attached on `conn` (from `self.pools[index]`; `replica`: a read that a
    /// replica serves).
    fn attach_to(&mut self, conn: PooledConn, index: usize, replica: bool) {
        // What the client holds, for a cancel request and the console (one record; the
        // node's address is copied only when it differs from the last one held).
        self.cancel
            .slot
            .hold(&self.pools[index].0, conn.pid, conn.secret, conn.lent_at);
        let active = match self.ended_attached.take() {
            Some(mut active) => {
                active.again(conn.lent_at);
                Some(active)
            }
            None => self
                .registered
                .as_ref()
                .map(|r| r.entry.attached(conn.lent_at)),
        };
        self.state = State::Attached(Link {
            conn,
            status: b'I',
            unsynced: false,
            skipping: false,
            replica,
            active,
        });
        self.sync_settings();
    }

    /// [`Self::attach_waiting`] once past the pause gate.
    async fn take_connection(
        &mut self,
        target: Target,
        mut picked: Option<(usize, bool)>,
        mut down: usize,
    ) -> Result<(), ClientError> {
        let mut want = want_for(target);
        loop {
            let (index, primary) = match picked.take() {
                Some(node) => node,
                None => self.pick_node(&mut want).await?,
            };
            // A read may land on the primary when no replica takes reads.
            let replica = want == Want::Replica && !primary;
            match self.pools[index].1.acquire().await {
                Ok(conn) => {
                    self.attach_to(conn, index, replica);
                    return Ok(());
                }
                Err(e) => self.acquire_failed(index, e, &mut down)?,
            }
        }
    }

    /// What a failed [`crate::backend::Pool::acquire`] from `self.pools[index]` means: a
    /// node found down (`down` of them so far, each tried once) is taken out of rotation
    /// and another may be tried (`Ok`); anything else ends the attach.
    fn acquire_failed(
        &mut self,
        index: usize,
        e: PoolError,
        down: &mut usize,
    ) -> Result<(), ClientError> {
        let shared = self.shared;
        let topology = &shared.topology;
        match e {
            PoolError::Connect(e) if e.is_node_down() && *down < topology.node_count() => {
                let addr = &self.pools[index].0;
                self.span.in_scope(|| {
                    warn!(node = %addr, cause = %e, "node unreachable; taking it out of rotation");
                });
                topology.take_out_of_rotation(addr, &shared.pools);
                *down += 1;
                Ok(())
            }
            e => Err(e.into()),
        }
    }

    /// Chooses the node for `want` (pool index, is it the primary). A read under a
    /// read-your-writes floor goes to a replica that has replayed it, else to the primary
    /// (`want` becomes `Primary`); with no node usable now, waits for a primary through a
    /// failover.
    async fn pick_node(&mut self, want: &mut Want) -> Result<(usize, bool), ClientError> {
        let shared = self.shared;
        let topology = &shared.topology;
        let wait = || shared.config.load().topology.failover_timeout();
        let caught_up = match (*want, self.read_floor()) {
            (Want::Replica, floor) if floor != 0 => {
                let replica = self.replica_at(floor).await;
                if replica.is_none() {
                    *want = Want::Primary;
                    let wait = shared.config.load().routing.read_your_writes_wait;
                    self.reroute(Why::FloorNotReplayed(wait));
                }
                replica
            }
            _ => None,
        };
        match caught_up {
            Some(addr) => {
                let primary = topology.with_primary(|primary| *primary == *addr);
                Ok((self.pool_index(&addr), primary.unwrap_or(false)))
            }
            None => match self.pick_now(*want) {
                Some(picked) => Ok(picked),
                None => topology
                    .with_node(*want, wait, |addr, primary| {
                        (self.pool_index(addr), primary)
                    })
                    .await
                    .ok_or_else(|| ClientError::NoPrimary(wait())),
            },
        }
    }

    /// The node for `want` in the topology as of now (pool index, is it the primary),
    /// from what this session picked from the same generation of it before (see
    /// [`crate::topology::Picks`]); `None`: no node for `want` is usable now.
    fn pick_now(&mut self, want: Want) -> Option<(usize, bool)> {
        let mut picks = std::mem::take(&mut self.picks);
        let picked = picks.pick(&self.shared.topology, want, |addr| self.pool_index(addr));
        self.picks = picks;
        picked
    }

    /// The index in `self.pools` of the pool for `addr`, added on first use.
    fn pool_index(&mut self, addr: &str) -> usize {
        if let Some(i) = self.pools.iter().position(|(a, _)| **a == *addr) {
            return i;
        }
        let pool = self.shared.pools.get(addr, &self.database, &self.user);
        self.shared.clients.note_pool(&pool);
        self.pools.push((Arc::from(addr), pool));
        self.pools.len() - 1
    }

    /// Returns the server connection to its pool when the client no longer needs it
    /// (Attached -> Idle): the server is idle, no Sync is owed and nothing is outstanding.
    pub(super) fn maybe_release(&mut self) {
        let State::Attached(link) = &self.state else {
            return;
        };
        if link.status != b'I' || link.unsynced || !self.expected.is_empty() {
            return;
        }
        if let State::Attached(link) = std::mem::replace(&mut self.state, State::Idle) {
            self.cancel.slot.clear();
            let now = crate::clock::now();
            if let Some(mut active) = link.active {
                active.end_at(now);
                self.ended_attached = Some(active);
            }
            link.conn.release_at(now);
        }
    }

    /// Drops a server connection that went away under a retryable request, forgets what
    /// was queued for it and takes its node out of rotation until it is healthy again
    /// (back to Idle, to send the request again).
    pub(super) fn abandon_server(&mut self) {
        if let Some(link) = std::mem::replace(&mut self.state, State::Idle).link() {
            let addr = &link.conn.addr;
            self.span.in_scope(|| {
                debug!(node = %addr, "server shut down before answering; sending the request again");
            });
            self.shared
                .topology
                .take_out_of_rotation(addr, &self.shared.pools);
        }
        self.cancel.slot.clear();
        self.expected.clear();
        self.to_server.clear();
        self.forget_attempt();
    }

    /// Forgets an attempt the client saw nothing of, to send the request again: its
    /// replies held back, the statement names it added, what it noted.
    pub(super) fn forget_attempt(&mut self) {
        self.out.truncate(self.request.out_mark);
        for name in self.request.named.drain(..) {
            self.statements.remove(&name);
        }
        self.request.reset();
    }

    /// At the end of a session: return the server connection if it can be reused, rolling
    /// back an open transaction first; otherwise close it.
    pub(super) async fn cleanup(&mut self) {
        self.cancel.slot.clear();
        let link = match std::mem::replace(&mut self.state, State::Idle) {
            State::Attached(link) if self.expected.is_empty() => link,
            // Mid-statement or mid-COPY: closing the connection makes the server abort it.
            // Pinned (temporary tables, advisory locks, LISTEN, prepared statements):
            // closing the connection is the one sure way to leave nothing behind for the
            // next client.
            _ => return,
        };
        let Link {
            mut conn,
            status,
            unsynced,
            ..
        } = link;
        if unsynced {
            // The client left in the middle of an extended-protocol batch: what it ran is
            // in an implicit transaction that a Sync would commit. Closing the connection
            // makes the server roll it back.
            return;
        }
        if status == b'I' {
            conn.release();
            return;
        }
        let mut out = BytesMut::new();
        messages::query(&mut out, "ROLLBACK");
        let rollback = async {
            conn.io.send(&mut out).await?;
            loop {
                let frame = conn.io.read_frame(MAX_MESSAGE_LEN).await?;
                if frame[0] == b'Z' {
                    return Ok::<u8, NetError>(frame.get(5).copied().unwrap_or(b'E'));
                }
            }
        };
        match crate::timer::timeout(self.shared.config.load().pool.connect_timeout, rollback).await
        {
            Ok(Ok(b'I')) => {
                debug!("rolled back the open transaction of a client that left");
                conn.release();
            }
            _ => debug!("closing server connection after a failed rollback"),
        }
    }
}
