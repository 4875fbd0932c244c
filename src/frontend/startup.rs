//! A new client connection: SSLRequest / CancelRequest / StartupMessage, authentication,
//! then the greeting (ParameterStatus, BackendKeyData, ReadyForQuery) and the session.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use rand::RngCore;
use tokio::net::TcpStream;
use tracing::{debug, info, info_span, warn, Instrument};

use super::auth::{md5_matches, AuthError, ScramExchange, ScramVerifier};
use super::cancel::send_cancel;
use super::session::Session;
use super::{Greeting, Shared};
use crate::backend::{BackendError, PoolError};
use crate::config::AuthMethod;
use crate::error;
use crate::net::{FramedStream, NetError};
use crate::protocol::frame::Reader;
use crate::protocol::messages::{self, body, Severity, StartupPacket};
use crate::protocol::{FrameError, MAX_STARTUP_LEN};
use crate::settings::{sync_query, ClientSettings};

/// Why a login did not reach a session.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// The socket failed or the client left; nothing to tell it.
    #[error(transparent)]
    Net(NetError),
    /// The client broke the protocol.
    #[error("{0}")]
    Protocol(String),
    /// Wrong password or unknown user.
    #[error("password authentication failed for user \"{0}\"")]
    BadPassword(String),
    /// No user in the StartupMessage.
    #[error("no PostgreSQL user name specified in startup packet")]
    NoUser,
    /// No node could be reached to learn the server parameters.
    #[error("no server available: {0}")]
    NoServer(String),
    /// The server refused the login (for example: the database does not exist).
    #[error("{message}")]
    Server {
        /// SQLSTATE from the server.
        code: String,
        /// Message from the server.
        message: String,
    },
    /// Startup did not finish within `client.login_timeout`.
    #[error("startup and authentication did not finish in time")]
    Timeout,
    /// The client sent a CancelRequest; the connection ends after it.
    #[error("cancel request")]
    Cancel,
}

impl From<NetError> for LoginError {
    fn from(e: NetError) -> Self {
        match e {
            NetError::Frame(f) => Self::Protocol(f.to_string()),
            NetError::Truncated => Self::Protocol("incomplete startup packet".into()),
            other => Self::Net(other),
        }
    }
}

impl From<FrameError> for LoginError {
    fn from(e: FrameError) -> Self {
        Self::Protocol(e.to_string())
    }
}

impl LoginError {
    /// SQLSTATE for the client, or `None` when there is no one to tell.
    fn sqlstate(&self) -> Option<&str> {
        Some(match self {
            Self::Net(_) | Self::Cancel => return None,
            Self::Protocol(_) | Self::Timeout => error::PROTOCOL_VIOLATION,
            Self::BadPassword(_) => error::INVALID_PASSWORD,
            Self::NoUser => error::INVALID_AUTHORIZATION,
            Self::NoServer(_) => error::CONNECTION_FAILURE,
            Self::Server { code, .. } => code,
        })
    }
}

/// Serves one client connection from accept to close.
///
/// Everything logged for the connection is inside its `client` span. The session enters the
/// span only around its log events, not on every poll of its future: entering and leaving
/// a span twice per statement cost measurable CPU.
pub async fn handle(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    let span =
        info_span!("client", %peer, user = tracing::field::Empty, db = tracing::field::Empty);
    let mut io = FramedStream::tcp(stream);
    let mut out = BytesMut::new();
    let login = tokio::time::timeout(
        shared.config.client.login_timeout,
        login(&shared, &mut io, &mut out),
    )
    .instrument(span.clone())
    .await
    .unwrap_or(Err(LoginError::Timeout));
    match login {
        Ok((user, database, settings)) => {
            span.record("user", user.as_str());
            span.record("db", database.as_str());
            span.in_scope(|| debug!("client logged in"));
            Session::new(&shared, io, user, database, settings, span)
                .run(out)
                .await;
        }
        Err(e) => {
            if let Some(code) = e.sqlstate() {
                span.in_scope(|| info!(cause = %e, "login failed"));
                messages::error_response(&mut out, Severity::Fatal, code, &e.to_string());
                let _ = io.send(&mut out).await;
            }
        }
    }
}

async fn login(
    shared: &Shared,
    io: &mut FramedStream,
    out: &mut BytesMut,
) -> Result<(String, String, ClientSettings), LoginError> {
    let params = loop {
        let packet = io.read_startup().await?;
        match StartupPacket::decode(&packet)? {
            StartupPacket::Ssl | StartupPacket::GssEnc => {
                // No TLS yet: 'N' tells the client to go on in plain text.
                out.extend_from_slice(b"N");
                io.send(out).await?;
            }
            StartupPacket::Cancel { pid, secret } => {
                if let Some(target) = shared.cancels.target(pid, secret) {
                    if let Err(cause) =
                        send_cancel(&target, shared.config.pool.connect_timeout).await
                    {
                        warn!(%cause, "could not forward cancel request");
                    }
                }
                return Err(LoginError::Cancel);
            }
            StartupPacket::Startup(params) => break params,
        }
    };
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let user = param("user")
        .filter(|u| !u.is_empty())
        .ok_or(LoginError::NoUser)?;
    let database = param("database")
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());
    if param("replication").is_some_and(|r| r != "false" && r != "0" && r != "off") {
        return Err(LoginError::Protocol(
            "replication connections are not supported through pgway".into(),
        ));
    }

    authenticate(shared, io, out, &user).await?;
    messages::authentication(out, 0, &[]);

    let mut settings = ClientSettings::from_startup(&params);
    super::session::default_target(&mut settings).map_err(|e| LoginError::Server {
        code: e.sqlstate().to_owned(),
        message: e.to_string(),
    })?;
    let greeting = greeting(shared, &user, &database, &mut settings).await?;
    for (name, value) in greeting.params.iter() {
        messages::parameter_status(out, name, value);
    }
    Ok((user, database, settings))
}

async fn authenticate(
    shared: &Shared,
    io: &mut FramedStream,
    out: &mut BytesMut,
    user: &str,
) -> Result<(), LoginError> {
    let entry = shared.users.get(user);
    let method = entry.map(|u| u.config.auth).unwrap_or_default();
    let bad_password = || LoginError::BadPassword(user.to_owned());
    match method {
        AuthMethod::ScramSha256 => {
            messages::authentication(out, 10, b"SCRAM-SHA-256\0\0");
            io.send(out).await?;
            let first = expect_password_message(io).await?;
            let mut r = Reader::new(body(&first), "SASLInitialResponse");
            let mechanism = r.cstr()?;
            if mechanism != b"SCRAM-SHA-256" {
                return Err(LoginError::Protocol(
                    "unsupported SASL mechanism; only SCRAM-SHA-256 is offered".into(),
                ));
            }
            let len = r.i32()?;
            let data = if len < 0 {
                &[][..]
            } else {
                r.bytes(len as usize)?
            };
            let verifier = entry
                .map(|u| u.verifier.clone())
                .unwrap_or_else(ScramVerifier::random);
            let (exchange, server_first) =
                ScramExchange::start(verifier, data).map_err(scram_error)?;
            messages::authentication(out, 11, server_first.as_bytes());
            io.send(out).await?;
            let last = expect_password_message(io).await?;
            let server_final = exchange.finish(body(&last)).map_err(|e| match e {
                AuthError::BadPassword => bad_password(),
                other => scram_error(other),
            })?;
            if entry.is_none() {
                return Err(bad_password());
            }
            messages::authentication(out, 12, server_final.as_bytes());
        }
        AuthMethod::Md5 => {
            let mut salt = [0u8; 4];
            rand::thread_rng().fill_bytes(&mut salt);
            messages::authentication(out, 5, &salt);
            io.send(out).await?;
            let reply = expect_password_message(io).await?;
            let response = Reader::new(body(&reply), "PasswordMessage").cstr()?;
            let ok = entry.is_some_and(|u| md5_matches(user, &u.config.password, salt, response));
            if !ok {
                return Err(bad_password());
            }
        }
    }
    Ok(())
}

fn scram_error(e: AuthError) -> LoginError {
    LoginError::Protocol(e.to_string())
}

async fn expect_password_message(io: &mut FramedStream) -> Result<BytesMut, LoginError> {
    let frame = io.read_frame(MAX_STARTUP_LEN).await?;
    match frame[0] {
        b'p' => Ok(frame),
        b'X' => Err(LoginError::Net(NetError::Closed)),
        other => Err(LoginError::Protocol(format!(
            "expected a password message, got message type {:?}",
            other as char
        ))),
    }
}

/// The ParameterStatus values a client sees at login: the server's, as they are once the
/// client's startup settings are applied (PostgreSQL reports normalised values, e.g.
/// `DateStyle=ISO, MDY`). Learned from a real login and cached per (database, user,
/// settings), which also proves the database exists, the credentials work and the
/// settings are valid.
///
/// A cache hit also hands the client the cached copy of its startup settings.
async fn greeting(
    shared: &Shared,
    user: &str,
    database: &str,
    settings: &mut ClientSettings,
) -> Result<Arc<Greeting>, LoginError> {
    let key = (
        database.to_owned(),
        user.to_owned(),
        settings.startup.hash(),
    );
    if let Some(hit) = shared.greetings.get(&key) {
        if hit.settings == settings.startup {
            settings.startup = hit.settings.clone();
            settings.current = hit.settings.clone();
            return Ok(hit);
        }
    }
    let password = shared
        .users
        .get(user)
        .map(|u| u.config.password.as_str())
        .unwrap_or_default();
    let wait = shared.config.topology.failover_timeout();
    let addr = match shared.topology.primary() {
        Some(addr) => addr,
        None => match shared.topology.replica() {
            Some(addr) => addr,
            None => shared
                .topology
                .wait_primary(wait)
                .await
                .ok_or_else(|| LoginError::NoServer("no healthy node".into()))?,
        },
    };
    let pool = shared.pools.get(&addr, database, user, password);
    let mut conn = pool.acquire().await.map_err(|e| match e {
        PoolError::Connect(BackendError::Server { code, message }) => {
            LoginError::Server { code, message }
        }
        PoolError::Connect(other) => {
            if other.is_node_down() {
                shared.topology.mark_down(&addr);
            }
            LoginError::NoServer(other.to_string())
        }
        timeout @ PoolError::Timeout { .. } => LoginError::Server {
            code: error::TOO_MANY_CONNECTIONS.to_owned(),
            message: timeout.to_string(),
        },
    })?;
    let mut params = conn.params.clone();
    if let Some(sql) = sync_query(&mut conn.applied, &settings.current) {
        let mut out = BytesMut::new();
        messages::query(&mut out, &sql);
        let timeout = shared.config.pool.connect_timeout;
        let reported = tokio::time::timeout(timeout, apply_startup(&mut conn.io, out))
            .await
            .map_err(|_| LoginError::NoServer("timed out applying startup settings".into()))?
            .map_err(|e| LoginError::NoServer(e.to_string()))?;
        match reported {
            Ok(changes) => {
                for (name, value) in changes {
                    match params.iter_mut().find(|(n, _)| *n == name) {
                        Some(slot) => slot.1 = value,
                        None => params.push((name, value)),
                    }
                }
            }
            Err((code, message)) => {
                // Invalid startup settings: the connection is fine, the client is not.
                conn.applied.dirty = true;
                conn.release();
                return Err(LoginError::Server { code, message });
            }
        }
    }
    conn.release();
    let greeting = Arc::new(Greeting {
        params,
        settings: settings.startup.clone(),
    });
    shared.greetings.insert(key, Arc::clone(&greeting));
    Ok(greeting)
}

/// Runs the startup-settings query; returns the ParameterStatus changes it caused, or the
/// server's error.
async fn apply_startup(
    io: &mut FramedStream,
    mut query: BytesMut,
) -> Result<Result<Vec<(String, String)>, (String, String)>, NetError> {
    io.send(&mut query).await?;
    let mut changes = Vec::new();
    let mut failure = None;
    loop {
        let frame = io.read_frame(crate::protocol::MAX_MESSAGE_LEN).await?;
        match frame[0] {
            b'S' => {
                let mut r = Reader::new(body(&frame), "ParameterStatus");
                if let (Ok(name), Ok(value)) = (r.cstr(), r.cstr()) {
                    changes.push((
                        String::from_utf8_lossy(name).into_owned(),
                        String::from_utf8_lossy(value).into_owned(),
                    ));
                }
            }
            b'E' => failure = Some(messages::error_fields(&frame)),
            b'Z' => return Ok(failure.map_or(Ok(changes), Err)),
            _ => {}
        }
    }
}
