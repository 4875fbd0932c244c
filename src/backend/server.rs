//! One connection from pgway to a PostgreSQL server: connect, log in, remember what the
//! server told us (parameters, cancel key) and which statements are prepared on it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::scram::{PasswordKeys, ScramClient, ScramKeys};
use crate::net::{Connector, FramedStream, NetError};
use crate::protocol::frame::Reader;
use crate::protocol::messages::{body, error_fields};
use crate::protocol::MAX_MESSAGE_LEN;
use bytes::BytesMut;
use postgres_protocol::message::frontend;

/// Errors talking to a server.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The socket failed or closed.
    #[error(transparent)]
    Net(#[from] NetError),
    /// Connect plus login took longer than `pool.connect_timeout`.
    #[error("timed out connecting to {0}")]
    Timeout(String),
    /// The server refused us with an ErrorResponse (bad password, no such database, ...).
    #[error("server error {code}: {message}")]
    Server {
        /// SQLSTATE.
        code: String,
        /// The server's message.
        message: String,
    },
    /// The server said something we did not expect during login.
    #[error("unexpected server behaviour: {0}")]
    Protocol(String),
}

impl From<crate::protocol::FrameError> for BackendError {
    fn from(e: crate::protocol::FrameError) -> Self {
        Self::Protocol(e.to_string())
    }
}

impl BackendError {
    /// True when the node itself is unreachable (not a refusal of these credentials).
    pub fn is_node_down(&self) -> bool {
        use crate::error::sqlstate::{
            ADMIN_SHUTDOWN, CANNOT_CONNECT_NOW, CONNECTION_EXCEPTION_CLASS, CRASH_SHUTDOWN,
        };
        match self {
            Self::Net(_) | Self::Timeout(_) => true,
            // Cannot connect now (starting up, shutting down, in recovery without hot
            // standby), a shutdown that caught the login half-way, or a connection
            // exception.
            Self::Server { code, .. } => {
                code == CANNOT_CONNECT_NOW
                    || code == ADMIN_SHUTDOWN
                    || code == CRASH_SHUTDOWN
                    || code.starts_with(CONNECTION_EXCEPTION_CLASS)
            }
            Self::Protocol(_) => false,
        }
    }
}

/// How pgway proves who it is to a server. Its `Debug` shows neither.
#[derive(Clone)]
pub enum Secret {
    /// A password, for whatever method the server asks, with the SCRAM keys last derived
    /// from it.
    Password(Arc<PasswordKeys>),
    /// SCRAM keys from a client's proof (a user known through `auth_query`): the server
    /// must ask for SCRAM-SHA-256 and hold the verifier they came from.
    Scram(Arc<ScramKeys>),
}

impl Secret {
    /// `password`, no SCRAM keys derived from it yet.
    pub fn password_of(password: &str) -> Self {
        Self::Password(Arc::new(PasswordKeys::new(password)))
    }

    /// The password, for a server that asks for one in clear text or md5.
    fn password(&self) -> Result<&str, BackendError> {
        match self {
            Self::Password(password) => Ok(password.password()),
            Self::Scram(_) => Err(BackendError::Protocol(
                "the server asks for a password, and pgway has only SCRAM keys for this \
                 user (auth_query): the server must use scram-sha-256"
                    .into(),
            )),
        }
    }

    /// A SCRAM exchange for this secret.
    fn scram(&self) -> ScramClient {
        match self {
            Self::Password(password) => ScramClient::with_password(Arc::clone(password)),
            Self::Scram(keys) => ScramClient::with_keys(Arc::clone(keys)),
        }
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Password(_) => f.write_str("Password(***)"),
            Self::Scram(_) => f.write_str("Scram(***)"),
        }
    }
}

/// Where and how to log in. Its `Debug` leaves the secret out.
#[derive(Clone)]
pub struct Login<'a> {
    /// `host:port`.
    pub addr: &'a str,
    /// Role name.
    pub user: &'a str,
    /// Password or keys.
    pub secret: &'a Secret,
    /// Database name.
    pub database: &'a str,
}

impl std::fmt::Debug for Login<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("addr", &self.addr)
            .field("user", &self.user)
            .field("secret", &self.secret)
            .field("database", &self.database)
            .finish()
    }
}

/// Least-recently-used set of statements prepared on one server connection, by content hash.
#[derive(Debug, Default)]
pub struct StatementCache {
    entries: foldhash::HashMap<u64, u64>,
    tick: u64,
}

impl StatementCache {
    /// True if the statement is prepared here; marks it used.
    pub fn touch(&mut self, hash: u64) -> bool {
        self.tick += 1;
        match self.entries.get_mut(&hash) {
            Some(used) => {
                *used = self.tick;
                true
            }
            None => false,
        }
    }

    /// True if the statement is prepared here (without marking it used).
    pub fn contains(&self, hash: u64) -> bool {
        self.entries.contains_key(&hash)
    }

    /// Records a statement as prepared; returns the least recently used one to close if the
    /// cache is over `capacity`.
    pub fn insert(&mut self, hash: u64, capacity: usize) -> Option<u64> {
        self.tick += 1;
        self.entries.insert(hash, self.tick);
        if self.entries.len() <= capacity {
            return None;
        }
        let oldest = self
            .entries
            .iter()
            .filter(|(&h, _)| h != hash)
            .min_by_key(|(_, &used)| used)
            .map(|(&h, _)| h)?;
        self.entries.remove(&oldest);
        Some(oldest)
    }

    /// Forgets a statement (its Parse failed, or it was closed).
    pub fn remove(&mut self, hash: u64) {
        self.entries.remove(&hash);
    }

    /// How many statements are prepared.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when none is.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The server-side name pgway gives a statement with this content hash.
pub fn statement_name(hash: u64) -> [u8; STATEMENT_NAME_LEN] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut name = *b"pgway_0000000000000000";
    for (i, digit) in name[6..].iter_mut().enumerate() {
        *digit = HEX[((hash >> (60 - 4 * i)) & 0xf) as usize];
    }
    name
}

/// The length of [`statement_name`]: `pgway_` and 16 hex digits.
pub const STATEMENT_NAME_LEN: usize = 22;

/// A logged-in server connection.
#[derive(Debug)]
pub struct ServerConn {
    /// The framed socket.
    pub io: FramedStream,
    /// `host:port` of the node.
    pub addr: String,
    /// BackendKeyData: process id.
    pub pid: i32,
    /// BackendKeyData: secret key.
    pub secret: i32,
    /// ParameterStatus values from login.
    pub params: Vec<(String, String)>,
    /// Named statements prepared here by pgway.
    pub statements: StatementCache,
    /// Content hash of the statement in the unnamed slot, and the client that put it there.
    pub unnamed: Option<(u64, u64)>,
    /// Session settings pgway applied on this connection.
    pub applied: crate::settings::Applied,
    /// The reactor the socket is registered with ([`crate::workers::current`]).
    pub reactor: usize,
    /// When the connection was made (`pool.server_lifetime` counts from here).
    pub created: Instant,
    /// When the connection was last parked in its pool (`pool.server_idle_timeout` counts
    /// from here); its creation until then.
    pub parked: Instant,
    /// When its pool closes it rather than lend or park it, worked out once per lifetime
    /// setting (see [`Deadlines`]).
    pub deadlines: Deadlines,
}

/// A connection's deadlines from `pool.server_lifetime` and `pool.server_idle_timeout`,
/// worked out by its pool when it is parked: lending it then compares one instant, where
/// adding the limits to its creation and parking times each time cost about 100
/// instructions a statement. `None`: never.
#[derive(Debug, Clone, Copy, Default)]
pub struct Deadlines {
    /// The pool's lifetimes generation these were worked out with (0: not yet).
    pub generation: u64,
    /// Its creation plus `pool.server_lifetime`.
    pub retire: Option<Instant>,
    /// While parked: the earlier of `retire` and when it was parked plus
    /// `pool.server_idle_timeout`.
    pub close: Option<Instant>,
}

impl ServerConn {
    /// Moves the socket to the calling thread's reactor, if it is registered with another
    /// worker's (so its readiness events wake this thread, not that one).
    pub fn adopt(self: Box<Self>) -> Result<Box<Self>, NetError> {
        let here = crate::workers::current();
        if self.reactor == here {
            return Ok(self);
        }
        let this = *self;
        let io = this.io.rebind()?;
        Ok(Box::new(Self {
            io,
            reactor: here,
            ..this
        }))
    }

    /// Connects through `connector` and logs in, within `timeout`.
    pub async fn connect(
        login: Login<'_>,
        connector: &dyn Connector,
        timeout: Duration,
    ) -> Result<Self, BackendError> {
        Self::connect_with(login, &[], connector, timeout).await
    }

    /// [`ServerConn::connect`] with `extra` startup parameters after `user` and `database`
    /// (e.g. `replication=database` for a walsender connection).
    pub async fn connect_with(
        login: Login<'_>,
        extra: &[(&str, &str)],
        connector: &dyn Connector,
        timeout: Duration,
    ) -> Result<Self, BackendError> {
        crate::timer::timeout(timeout, Self::do_connect(login.clone(), extra, connector))
            .await
            .map_err(|_| BackendError::Timeout(login.addr.to_owned()))?
    }

    async fn do_connect(
        login: Login<'_>,
        extra: &[(&str, &str)],
        connector: &dyn Connector,
    ) -> Result<Self, BackendError> {
        let stream = connector
            .connect(login.addr)
            .await
            .map_err(NetError::from)?;
        let mut io = FramedStream::new(stream);
        let mut out = BytesMut::new();
        frontend::startup_message(
            [("user", login.user), ("database", login.database)]
                .into_iter()
                .chain(extra.iter().copied()),
            &mut out,
        )
        .map_err(|e| BackendError::Protocol(e.to_string()))?;
        io.send(&mut out).await?;

        let mut scram: Option<ScramClient> = None;
        let mut conn = Self {
            io,
            addr: login.addr.to_owned(),
            pid: 0,
            secret: 0,
            params: Vec::new(),
            statements: StatementCache::default(),
            unnamed: None,
            applied: Default::default(),
            reactor: crate::workers::current(),
            created: Instant::now(),
            parked: Instant::now(),
            deadlines: Deadlines::default(),
        };
        loop {
            let frame = conn.io.read_frame(MAX_MESSAGE_LEN).await?;
            let mut r = Reader::new(body(&frame), "login");
            match frame[0] {
                b'R' => {
                    let code = r.i32()?;
                    match code {
                        0 => {}
                        3 => frontend::password_message(
                            login.secret.password()?.as_bytes(),
                            &mut out,
                        )
                        .map_err(|e| BackendError::Protocol(e.to_string()))?,
                        5 => {
                            let salt: [u8; 4] = r
                                .bytes(4)?
                                .try_into()
                                .map_err(|_| BackendError::Protocol("bad md5 salt".into()))?;
                            let hash = postgres_protocol::authentication::md5_hash(
                                login.user.as_bytes(),
                                login.secret.password()?.as_bytes(),
                                salt,
                            );
                            frontend::password_message(hash.as_bytes(), &mut out)
                                .map_err(|e| BackendError::Protocol(e.to_string()))?;
                        }
                        10 => {
                            let mut offers_scram = false;
                            while let Ok(m) = r.cstr() {
                                if m.is_empty() {
                                    break;
                                }
                                offers_scram |= m == b"SCRAM-SHA-256";
                            }
                            if !offers_scram {
                                return Err(BackendError::Protocol(
                                    "server offers no SASL mechanism pgway supports".into(),
                                ));
                            }
                            let s = login.secret.scram();
                            frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut out)
                                .map_err(|e| BackendError::Protocol(e.to_string()))?;
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram.as_mut().ok_or_else(|| {
                                BackendError::Protocol("SASLContinue before SASL".into())
                            })?;
                            s.update(r.rest())
                                .map_err(|e| BackendError::Protocol(e.to_string()))?;
                            frontend::sasl_response(s.message(), &mut out)
                                .map_err(|e| BackendError::Protocol(e.to_string()))?;
                        }
                        12 => {
                            let s = scram.as_mut().ok_or_else(|| {
                                BackendError::Protocol("SASLFinal before SASL".into())
                            })?;
                            s.finish(r.rest())
                                .map_err(|e| BackendError::Protocol(e.to_string()))?;
                        }
                        other => {
                            return Err(BackendError::Protocol(format!(
                                "unsupported authentication request {other}"
                            )))
                        }
                    }
                    conn.io.send(&mut out).await?;
                }
                b'S' => {
                    let name = String::from_utf8_lossy(r.cstr()?).into_owned();
                    let value = String::from_utf8_lossy(r.cstr()?).into_owned();
                    conn.params.push((name, value));
                }
                b'K' => {
                    conn.pid = r.i32()?;
                    conn.secret = r.i32()?;
                }
                b'E' => {
                    let (code, message) = error_fields(&frame);
                    return Err(BackendError::Server { code, message });
                }
                b'N' => {}
                b'Z' => return Ok(conn),
                other => {
                    return Err(BackendError::Protocol(format!(
                        "unexpected message {:?} during login",
                        other as char
                    )))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statement_names_are_pgway_and_the_hash_in_hex() {
        for hash in [0, 1, 0xdead_beef, u64::MAX, 0x0123_4567_89ab_cdef] {
            assert_eq!(
                statement_name(hash).to_vec(),
                format!("pgway_{hash:016x}").into_bytes()
            );
        }
    }

    #[test]
    fn a_login_cut_short_by_a_shutdown_means_the_node_is_down() {
        let refusal = |code: &str| BackendError::Server {
            code: code.to_owned(),
            message: String::new(),
        };
        // Shutting down or starting up, a shutdown during the login, a crash.
        for down in ["57P03", "57P01", "57P02", "08006"] {
            assert!(refusal(down).is_node_down(), "{down}");
        }
        // A refusal of these credentials or this database says nothing of the node.
        for up in ["28P01", "3D000", "53300"] {
            assert!(!refusal(up).is_node_down(), "{up}");
        }
    }

    #[test]
    fn statement_cache_evicts_least_recently_used() {
        let mut cache = StatementCache::default();
        assert_eq!(cache.insert(1, 2), None);
        assert_eq!(cache.insert(2, 2), None);
        assert!(cache.touch(1));
        assert_eq!(cache.insert(3, 2), Some(2));
        assert!(cache.touch(1) && cache.touch(3) && !cache.touch(2));
        cache.remove(1);
        assert_eq!(cache.len(), 1);
    }
}
