//! A new client connection: SSLRequest / CancelRequest / StartupMessage, authentication,
//! then the greeting (ParameterStatus, BackendKeyData, ReadyForQuery) and the session.
//!
//! An SSLRequest is answered `S` when `[client.tls]` offers TLS: the handshake runs (within
//! `client.login_timeout`, like the rest of the login) and the connection's
//! [`FramedStream`] goes on over the TLS stream, so the session never knows. With
//! `mode = "require"` a StartupMessage that arrives unencrypted is refused (FATAL 28000)
//! before authentication; a CancelRequest is served either way (libpq sends it on a fresh
//! connection, plain unless its `sslmode` asks for TLS).
//!
//! A login to database `pgway` opens the admin console ([`crate::admin::console`]) for a
//! user with `admin = true`, and is refused with 42501 for any other; other logins are
//! listed in the client registry ([`super::registry`]) for the console to see.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rand::RngCore;
use tokio::net::TcpStream;
use tracing::{debug, info, info_span, warn, Instrument};

use super::auth::{md5_matches, AuthError, ScramExchange, ScramVerifier};
use super::auth_query::Lookup;
use super::cancel::send_cancel;
use super::registry;
use super::session::Session;
use super::{Greeting, Shared};
use crate::admin::console;
use crate::backend::{Account, BackendError, PoolError, Secret};
use crate::config::AuthMethod;
use crate::error::ClientError;
use crate::net::tls::{self, Detached};
use crate::net::{FramedStream, NetError};
use crate::protocol::frame::Reader;
use crate::protocol::messages::{self, body, Severity, StartupPacket};
use crate::protocol::{FrameError, MAX_STARTUP_LEN};
use crate::settings::{sync_query, ClientSettings, Value};
use crate::topology::Want;

/// Why a login did not reach a session.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// The socket failed or the client left; nothing to tell it.
    #[error(transparent)]
    Net(NetError),
    /// The client sent a CancelRequest; the connection ends after it.
    #[error("cancel request")]
    Cancel,
    /// The TLS handshake failed (the client refused the certificate, spoke no TLS, ...);
    /// the TLS layer told the client what it could.
    #[error("TLS handshake failed: {0}")]
    Handshake(std::io::Error),
    /// pgway refuses the login and tells the client why (bad password, no user, broken
    /// protocol, login timeout, no server, or a server's own refusal such as a database
    /// that does not exist).
    #[error(transparent)]
    Refused(#[from] ClientError),
}

impl From<NetError> for LoginError {
    fn from(e: NetError) -> Self {
        match e {
            NetError::Frame(f) => f.into(),
            NetError::Truncated => ClientError::Protocol("incomplete startup packet".into()).into(),
            other => Self::Net(other),
        }
    }
}

impl From<FrameError> for LoginError {
    fn from(e: FrameError) -> Self {
        ClientError::Protocol(e.to_string().into()).into()
    }
}

impl LoginError {
    /// What the client is told (always FATAL: the connection ends), or `None` when there
    /// is no one to tell.
    pub fn client_error(&self) -> Option<&ClientError> {
        match self {
            Self::Net(_) | Self::Cancel | Self::Handshake(_) => None,
            Self::Refused(e) => Some(e),
        }
    }
}

/// Serves one client connection from accept to close, holding the session's `seat` on its
/// worker until then.
///
/// Everything logged for the connection is inside its `client` span. The session enters the
/// span only around its log events, not on every poll of its future: entering and leaving
/// a span twice per statement cost measurable CPU.
pub async fn handle(
    shared: Arc<Shared>,
    stream: std::net::TcpStream,
    peer: SocketAddr,
    _seat: crate::workers::Seat,
) {
    let span =
        info_span!("client", %peer, user = tracing::field::Empty, db = tracing::field::Empty);
    let local = stream.local_addr().ok();
    let mut io = match crate::net::reactor::adopt(stream) {
        Ok(stream) => FramedStream::new(stream),
        Err(cause) => {
            span.in_scope(|| warn!(%cause, "cannot register client socket"));
            return;
        }
    };
    let mut out = BytesMut::new();
    // Boxed: the login's state is large and needed once, while this future lives as long
    // as the client (its size is memory per idle client).
    let login = Box::pin(crate::timer::timeout(
        shared.config.load().client.login_timeout,
        login(&shared, &mut io, &mut out),
    ))
    .instrument(span.clone())
    .await
    .unwrap_or(Err(ClientError::LoginTimeout.into()));
    // The user's own connection limit (`max_connections` in its `[[users]]` entry).
    let mut _slot = None;
    let login = login.and_then(|(user, database, settings)| {
        let limit = shared
            .users
            .load()
            .get(&user)
            .and_then(|u| u.config.max_connections);
        _slot = Some(
            shared
                .per_user
                .enter(&user, limit)
                .ok_or_else(|| ClientError::TooManyForUser(user.clone()))?,
        );
        Ok((user, database, settings))
    });
    match login {
        Ok((user, database, _)) if database == console::DATABASE => {
            span.record("user", user.as_str());
            span.record("db", database.as_str());
            console::serve_at(&shared, io, out, &user, Some(peer), local)
                .instrument(span)
                .await;
        }
        Ok((user, database, settings)) => {
            span.record("user", user.as_str());
            span.record("db", database.as_str());
            span.in_scope(|| debug!("client logged in"));
            let application_name = match settings.startup.get("application_name") {
                Some(Value::Raw(name) | Value::Sql(name)) => name.clone(),
                None => String::new(),
            };
            let login = registry::Login {
                user: user.clone(),
                database: database.clone(),
                addr: peer,
                local,
                application_name,
            };
            Session::new(&shared, io, user, database, settings, span)
                .registered(login)
                .run(out)
                .await;
        }
        Err(LoginError::Handshake(cause)) => {
            span.in_scope(|| info!(%cause, "TLS handshake failed"));
        }
        Err(e) => {
            if let Some(reply) = e.client_error() {
                span.in_scope(|| info!(cause = %e, "login failed"));
                reply.write_as(&mut out, Severity::Fatal);
                let _ = io.send(&mut out).await;
            }
        }
    }
}

/// The packets before the StartupMessage: SSLRequest (answered `S` and a TLS handshake,
/// or `N`), GSSENCRequest (`N`) and CancelRequest (forwarded; the connection then ends).
/// Returns the StartupMessage's parameters.
async fn negotiate(
    shared: &Shared,
    io: &mut FramedStream,
    out: &mut BytesMut,
) -> Result<Vec<(String, String)>, LoginError> {
    // Read once: a reload that swaps the certificate affects connections that start later.
    let tls = shared.client_tls.load();
    let mut encrypted = false;
    loop {
        let packet = io.read_startup().await?;
        match StartupPacket::decode(&packet)? {
            StartupPacket::Ssl if encrypted => {
                return Err(ClientError::Protocol(
                    "SSLRequest on a connection that is encrypted already".into(),
                )
                .into());
            }
            StartupPacket::Ssl => match tls.acceptor() {
                Some(acceptor) => {
                    start_tls(io, out, acceptor).await?;
                    encrypted = true;
                }
                None => {
                    // 'N' tells the client to go on in plain text (or to give up, if its
                    // sslmode insists).
                    out.extend_from_slice(b"N");
                    io.send(out).await?;
                }
            },
            StartupPacket::GssEnc => {
                // No GSSAPI encryption: 'N', and the client goes on (libpq then tries
                // SSLRequest or plain text).
                out.extend_from_slice(b"N");
                io.send(out).await?;
            }
            StartupPacket::Cancel { pid, secret } => {
                if let Some(target) = shared.cancels.target(pid, secret) {
                    if let Err(cause) =
                        send_cancel(&target, shared.config.load().pool.connect_timeout).await
                    {
                        warn!(%cause, "could not forward cancel request");
                    }
                }
                return Err(LoginError::Cancel);
            }
            StartupPacket::Startup(_) if !encrypted && !tls.allows_plain() => {
                return Err(ClientError::SslRequired.into());
            }
            StartupPacket::Startup(params) => return Ok(params),
        }
    }
}

/// Refuses a client over `client.max_connections` the way it can read: its SSLRequest
/// answered first (a TLS handshake if pgway has a certificate), then FATAL 53300 after
/// its StartupMessage. A CancelRequest is still forwarded. Bounded by `timeout`.
pub async fn refuse(shared: Arc<Shared>, stream: TcpStream, timeout: Duration) {
    let mut io = FramedStream::tcp(stream);
    let mut out = BytesMut::new();
    let negotiated = crate::timer::timeout(timeout, negotiate(&shared, &mut io, &mut out)).await;
    if let Ok(Ok(_)) = negotiated {
        ClientError::TooManyClients.write(&mut out);
        let _ = crate::timer::timeout(timeout, io.send(&mut out)).await;
    }
}

async fn login(
    shared: &Shared,
    io: &mut FramedStream,
    out: &mut BytesMut,
) -> Result<(String, String, ClientSettings), LoginError> {
    let params = negotiate(shared, io, out).await?;
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let user = param("user")
        .filter(|u| !u.is_empty())
        .ok_or(ClientError::NoUser)?;
    let database = param("database")
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());
    if param("replication").is_some_and(|r| r != "false" && r != "0" && r != "off") {
        return Err(ClientError::Protocol(
            "replication connections are not supported through pgway".into(),
        )
        .into());
    }

    authenticate(shared, io, out, &user).await?;
    // The databases the user may reach (`databases` in its `[[users]]` entry), checked
    // before any server hears of the database.
    let allowed = shared
        .users
        .load()
        .get(&user)
        .and_then(|u| u.config.databases.clone())
        .is_none_or(|list| database == console::DATABASE || list.contains(&database));
    if !allowed {
        return Err(ClientError::DatabaseNotAllowed { user, database }.into());
    }
    if database == console::DATABASE {
        // The admin console: no server behind it, so no greeting to learn. Refused only
        // now, after the password: the refusal does not tell who is an admin.
        if !shared
            .users
            .load()
            .get(&user)
            .is_some_and(|u| u.config.admin)
        {
            return Err(console::not_admin(&user).into());
        }
        messages::authentication(out, 0, &[]);
        return Ok((user, database, ClientSettings::default()));
    }
    messages::authentication(out, 0, &[]);

    let mut settings = ClientSettings::from_startup(&params);
    super::session::default_target(&mut settings)?;
    let greeting = greeting(shared, &user, &database, &mut settings).await?;
    for (name, value) in greeting.params.iter() {
        messages::parameter_status(out, name, value);
    }
    settings.at_login = super::session::followed_reports(&greeting.params);
    settings.told = settings.at_login.clone();
    Ok((user, database, settings))
}

/// Answers an SSLRequest with `S` and runs the handshake; from then on `io` reads and
/// writes through TLS.
async fn start_tls(
    io: &mut FramedStream,
    out: &mut BytesMut,
    acceptor: &tokio_rustls::TlsAcceptor,
) -> Result<(), LoginError> {
    if !io.rbuf.is_empty() {
        // Bytes sent before the handshake would be taken as if they had come encrypted
        // (PostgreSQL refuses them too: CVE-2021-23214).
        return Err(
            ClientError::Protocol("received unencrypted data after SSL request".into()).into(),
        );
    }
    out.extend_from_slice(b"S");
    io.send(out).await?;
    io.release_buffer();
    let plain = std::mem::replace(&mut io.stream, Box::new(Detached));
    io.stream = tls::accept(acceptor, plain)
        .await
        .map_err(LoginError::Handshake)?;
    Ok(())
}

async fn authenticate(
    shared: &Shared,
    io: &mut FramedStream,
    out: &mut BytesMut,
    user: &str,
) -> Result<(), LoginError> {
    let users = shared.users.load();
    let entry = users.get(user);
    let method = entry.map(|u| u.config.auth).unwrap_or_default();
    let bad_password = || LoginError::from(ClientError::BadPassword(user.to_owned()));
    match method {
        AuthMethod::ScramSha256 => {
            // A user pgway does not know may be known to the servers (`auth_query`).
            let looked_up = match (entry, &shared.config.load().auth_query) {
                (None, Some(config)) => Some(
                    shared
                        .auth_query
                        .lookup(shared, config, user)
                        .await
                        .map_err(|e| ClientError::NoServer(e.to_string()))?,
                ),
                _ => None,
            };
            let verifier = match (&looked_up, entry) {
                (Some(Lookup::Verifier(verifier)), _) => verifier.clone(),
                (_, Some(entry)) => entry.verifier.clone(),
                // Unknown or refused: the same exchange, which no password passes.
                _ => ScramVerifier::random(),
            };
            messages::authentication(out, 10, b"SCRAM-SHA-256\0\0");
            io.send(out).await?;
            let first = expect_password_message(io).await?;
            let mut r = Reader::new(body(&first), "SASLInitialResponse");
            let mechanism = r.cstr()?;
            if mechanism != b"SCRAM-SHA-256" {
                return Err(ClientError::Protocol(
                    "unsupported SASL mechanism; only SCRAM-SHA-256 is offered".into(),
                )
                .into());
            }
            let len = r.i32()?;
            let data = if len < 0 {
                &[][..]
            } else {
                r.bytes(len as usize)?
            };
            let (exchange, server_first) =
                ScramExchange::start(verifier.clone(), data).map_err(scram_error)?;
            messages::authentication(out, 11, server_first.as_bytes());
            io.send(out).await?;
            let last = expect_password_message(io).await?;
            let (server_final, client_key) = exchange.finish(body(&last)).map_err(|e| match e {
                AuthError::BadPassword => bad_password(),
                other => scram_error(other),
            })?;
            match looked_up {
                Some(Lookup::Verifier(_)) => {
                    // The servers are logged in to with the keys this proof gave.
                    let keys = verifier.keys(client_key);
                    shared.pools.set_account(
                        user,
                        Account {
                            secret: Secret::Scram(Arc::new(keys)),
                            pool_size: None,
                        },
                    );
                }
                Some(Lookup::Refused(why)) => {
                    info!(user, why, "auth_query: login refused");
                    return Err(bad_password());
                }
                None if entry.is_none() => return Err(bad_password()),
                None => {}
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
    ClientError::Protocol(e.to_string().into()).into()
}

async fn expect_password_message(io: &mut FramedStream) -> Result<BytesMut, LoginError> {
    let frame = io.read_frame(MAX_STARTUP_LEN).await?;
    match frame[0] {
        b'p' => Ok(frame),
        b'X' => Err(LoginError::Net(NetError::Closed)),
        other => Err(ClientError::Protocol(
            format!(
                "expected a password message, got message type {:?}",
                other as char
            )
            .into(),
        )
        .into()),
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
    let wait = || shared.config.load().topology.failover_timeout();
    let pool_for = |addr: &str, _| shared.pools.get(addr, database, user);
    let pool = match shared
        .topology
        .with_node(Want::Any, || Duration::ZERO, pool_for)
        .await
    {
        Some(pool) => pool,
        None => {
            // No node is usable now. If pgway cannot reach them for a reason waiting will
            // not cure (a server certificate it does not trust), say so at once.
            if let Some(failure) = lasting_failure(shared) {
                return Err(ClientError::NoServer(failure).into());
            }
            shared
                .topology
                .with_node(Want::Any, wait, pool_for)
                .await
                .ok_or_else(|| ClientError::NoServer("no healthy node".into()))?
        }
    };
    let addr = &pool.key().addr;
    let mut conn = pool.acquire().await.map_err(|e| match e {
        // At login a node that cannot be reached is "no server available", as it is when
        // there is no node at all.
        PoolError::Connect(other) if !matches!(other, BackendError::Server { .. }) => {
            if other.is_node_down() {
                shared.topology.take_out_of_rotation(addr, &shared.pools);
            }
            ClientError::NoServer(other.to_string())
        }
        refused_or_busy => ClientError::from(refused_or_busy),
    })?;
    let mut params = conn.params.clone();
    // pgway takes writes whichever node it learned the parameters from: libpq's
    // `target_session_attrs=read-write` must accept it.
    if let Some(standby) = params.iter_mut().find(|(name, _)| name == "in_hot_standby") {
        standby.1 = "off".to_owned();
    }
    if let Some(sql) = sync_query(&mut conn.applied, &settings.current) {
        let mut out = BytesMut::new();
        messages::query(&mut out, &sql);
        let timeout = shared.config.load().pool.connect_timeout;
        let reported = crate::timer::timeout(timeout, apply_startup(&mut conn.io, out))
            .await
            .map_err(|_| ClientError::NoServer("timed out applying startup settings".into()))?
            .map_err(|e| ClientError::NoServer(e.to_string()))?;
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
                return Err(ClientError::Server { code, message }.into());
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

/// Why the last connection to a node failed, if it failed for a reason of the server
/// connector's own (TLS): the first such node's.
fn lasting_failure(shared: &Shared) -> Option<String> {
    let connector = shared.pools.control_connector();
    let snapshot = shared.topology.snapshot();
    snapshot
        .nodes
        .iter()
        .find_map(|node| connector.lasting_failure(&node.addr))
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
