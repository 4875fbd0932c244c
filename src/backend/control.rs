//! Control connections: tokio-postgres clients pgway uses for its own queries (health,
//! roles, WAL positions, catalog look-ups), never for clients' statements.

use std::time::Duration;

use tokio_postgres::NoTls;

use crate::config::split_host_port;

/// Who a control connection logs in as, and where.
#[derive(Debug, Clone, Copy)]
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
}

/// Connects within `timeout`; the connection task runs in the background.
pub async fn connect(
    login: ControlLogin<'_>,
    timeout: Duration,
) -> Result<tokio_postgres::Client, String> {
    let (host, port) = split_host_port(login.addr).ok_or("bad address")?;
    let mut config = tokio_postgres::Config::new();
    config
        .host(host)
        .port(port)
        .user(login.user)
        .password(login.password)
        .dbname(login.database)
        .application_name(login.application_name)
        .connect_timeout(timeout);
    let (client, connection) = tokio::time::timeout(timeout, config.connect(NoTls))
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    Ok(client)
}
