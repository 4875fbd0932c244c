//! Control connections: tokio-postgres clients pgway uses for its own queries (health,
//! roles, WAL positions, catalog look-ups), never for clients' statements.
//!
//! They reach the servers through the same [`Connector`] as the pools (so `[server_tls]`
//! covers them: pgway's own TLS, then tokio-postgres speaks the protocol over the stream).
//!
//! Each connection's I/O runs in a task of its own, on the [`TaskTracker`] the caller
//! passes (the one [`crate::server::run`] waits for at shutdown). That task ends when the
//! [`tokio_postgres::Client`] is dropped, so whoever holds the client decides when it ends.

use std::time::Duration;

use tokio_postgres::NoTls;
use tokio_util::task::TaskTracker;

use crate::config::split_host_port;
use crate::net::Connector;

/// Who a control connection logs in as, and where. Its `Debug` leaves the password out.
#[derive(Clone, Copy)]
pub struct ControlLogin<'a> {
    /// Node `host:port`.
    pub addr: &'a str,
    /// Role name.
    pub user: &'a str,
    /// Password.
    pub password: &'a str,
    /// Database.
    pub database: &'a str,
    /// `application_name`, so the connection is recognisable in `pg_stat_activity`.
    pub application_name: &'a str,
    /// Opens the stream (plain TCP, or TLS as `[server_tls]` says).
    pub connector: &'a dyn Connector,
}

impl std::fmt::Debug for ControlLogin<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlLogin")
            .field("addr", &self.addr)
            .field("user", &self.user)
            .field("password", &"***")
            .field("database", &self.database)
            .field("application_name", &self.application_name)
            .field("connector", &self.connector)
            .finish()
    }
}

/// Why a control connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The node's address is not `host:port`.
    #[error("bad address {0:?}")]
    BadAddress(String),
    /// Connect plus login did not finish within the timeout.
    #[error("connect timed out")]
    Timeout,
    /// The stream could not be opened (refused, unreachable, TLS failed).
    #[error("cannot connect: {0}")]
    Io(std::io::Error),
    /// tokio-postgres could not connect or log in (refused, wrong password, no such
    /// database, ...).
    #[error(transparent)]
    Connect(tokio_postgres::Error),
}

/// Connects within `timeout`; the connection's task runs on `tasks` until the client is
/// dropped.
pub async fn connect(
    login: ControlLogin<'_>,
    timeout: Duration,
    tasks: &TaskTracker,
) -> Result<tokio_postgres::Client, ControlError> {
    if split_host_port(login.addr).is_none() {
        return Err(ControlError::BadAddress(login.addr.to_owned()));
    }
    let mut config = tokio_postgres::Config::new();
    config
        .user(login.user)
        .password(login.password)
        .dbname(login.database)
        .application_name(login.application_name);
    let connecting = async {
        let stream = login
            .connector
            .connect(login.addr)
            .await
            .map_err(ControlError::Io)?;
        // The connector did any TLS already: tokio-postgres speaks plain protocol over it.
        config
            .connect_raw(stream, NoTls)
            .await
            .map_err(ControlError::Connect)
    };
    let (client, connection) = crate::timer::timeout(timeout, connecting)
        .await
        .map_err(|_| ControlError::Timeout)??;
    tasks.spawn(connection);
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_leaves_the_password_out() {
        let login = ControlLogin {
            addr: "127.0.0.1:5432",
            user: "app",
            password: "app-secret",
            database: "postgres",
            application_name: "pgway-health",
            connector: &crate::net::TcpConnector,
        };
        let text = format!("{login:?}");
        assert!(
            !text.contains("app-secret") && text.contains("\"app\""),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_bad_address_is_named() {
        let login = ControlLogin {
            addr: "nohost",
            user: "app",
            password: "app-secret",
            database: "postgres",
            application_name: "pgway-health",
            connector: &crate::net::TcpConnector,
        };
        let err = connect(login, Duration::from_millis(10), &TaskTracker::new())
            .await
            .expect_err("bad address");
        assert!(
            matches!(&err, ControlError::BadAddress(a) if a == "nohost"),
            "{err}"
        );
    }
}
