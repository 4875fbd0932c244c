//! `auth_query`: users not in `[[users]]` log in with the SCRAM verifier a query returns
//! from the primary (as pgbouncer's `auth_query`), run as `auth_query.user` over one
//! control connection kept open between logins.
//!
//! Only SCRAM-SHA-256 verifiers serve: pgway recovers the client's `ClientKey` from its
//! proof and logs in to the servers with it ([`crate::backend::scram`]). An md5 or empty
//! `rolpassword`, or no row, refuses the login (28P01), with a log line saying which.

use std::time::Duration;

use tokio::sync::Mutex;
use tokio_util::task::TaskTracker;

use super::auth::ScramVerifier;
use super::Shared;
use crate::backend::control::{self, ControlError, ControlLogin};
use crate::config::AuthQueryConfig;

/// `application_name` of the look-up connection (told apart from clients in the
/// servers' logs).
pub const APPLICATION_NAME: &str = "pgway-auth-query";

/// What the query said about a user.
#[derive(Debug)]
pub enum Lookup {
    /// A SCRAM-SHA-256 verifier.
    Verifier(ScramVerifier),
    /// No login with it: why (for the log; the client is told 28P01).
    Refused(&'static str),
}

/// Why the look-up could not be made (the client is told there is no server).
#[derive(Debug, thiserror::Error)]
pub enum AuthQueryError {
    /// There is no node to ask.
    #[error("no node to run auth_query on")]
    NoNode,
    /// The look-up connection could not be made.
    #[error("auth_query connection: {0}")]
    Connect(#[from] ControlError),
    /// The query did not answer in time.
    #[error("auth_query timed out")]
    Timeout,
    /// The query failed.
    #[error("auth_query failed: {0}")]
    Query(tokio_postgres::Error),
}

/// The look-up connection: (node, user, database) it was made for, and the client.
type Connection = (String, String, String, tokio_postgres::Client);

/// Runs the look-ups.
#[derive(Debug, Default)]
pub struct AuthQuery {
    connection: Mutex<Option<Connection>>,
    tasks: TaskTracker,
}

impl AuthQuery {
    /// Looks `user` up with `config`, on the primary (a replica while there is none: the
    /// verifiers are replicated).
    pub async fn lookup(
        &self,
        shared: &Shared,
        config: &AuthQueryConfig,
        user: &str,
    ) -> Result<Lookup, AuthQueryError> {
        let addr = shared
            .topology
            .primary()
            .or_else(|| shared.topology.replica())
            .ok_or(AuthQueryError::NoNode)?;
        let timeout = shared.config.load().pool.connect_timeout;
        let mut connection = self.connection.lock().await;
        let reusable = connection.as_ref().is_some_and(|(a, u, d, client)| {
            **a == *addr && *u == config.user && *d == config.database && !client.is_closed()
        });
        if !reusable {
            let connector = shared.pools.control_connector();
            let login = ControlLogin {
                addr: &addr,
                user: &config.user,
                password: &config.password,
                database: &config.database,
                application_name: APPLICATION_NAME,
                connector: &*connector,
            };
            let client = control::connect(login, timeout, &self.tasks).await?;
            *connection = Some((
                addr.to_string(),
                config.user.clone(),
                config.database.clone(),
                client,
            ));
        }
        let Some((.., client)) = connection.as_ref() else {
            return Err(AuthQueryError::NoNode);
        };
        let answer = query(client, &config.query, user, timeout).await;
        if answer.is_err() {
            // Connected again at the next login.
            *connection = None;
        }
        answer
    }
}

async fn query(
    client: &tokio_postgres::Client,
    sql: &str,
    user: &str,
    timeout: Duration,
) -> Result<Lookup, AuthQueryError> {
    let row = crate::timer::timeout(timeout, client.query_opt(sql, &[&user]))
        .await
        .map_err(|_| AuthQueryError::Timeout)?
        .map_err(AuthQueryError::Query)?;
    let Some(row) = row else {
        return Ok(Lookup::Refused("auth_query returned no row for the user"));
    };
    let verifier: Option<String> = row.try_get(1).map_err(AuthQueryError::Query)?;
    Ok(classify(verifier.as_deref()))
}

/// A `rolpassword` value as a verifier pgway can use, or why not.
fn classify(verifier: Option<&str>) -> Lookup {
    match verifier {
        None | Some("") => Lookup::Refused("the user has no password"),
        Some(v) if v.starts_with("md5") => Lookup::Refused(
            "the user's password is stored as md5; auth_query needs a SCRAM-SHA-256 verifier",
        ),
        Some(v) => ScramVerifier::parse(v).map_or(
            Lookup::Refused("the user's password is not a SCRAM-SHA-256 verifier"),
            Lookup::Verifier,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_scram_verifiers_serve() {
        let scram = postgres_protocol::password::scram_sha_256(b"pw");
        assert!(matches!(classify(Some(&scram)), Lookup::Verifier(_)));
        for refused in [
            None,
            Some(""),
            Some("md5f3bc1d0a24f7d2ee8a5a3e4cb6c3c3e2"),
            Some("plain"),
        ] {
            assert!(
                matches!(classify(refused), Lookup::Refused(_)),
                "{refused:?}"
            );
        }
    }
}
