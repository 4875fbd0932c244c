//! What pgway itself tells clients: every ErrorResponse pgway makes (as opposed to one it
//! relays from a server) is a [`ClientError`], and [`ClientError::sqlstate`] and
//! [`ClientError::severity`] are the one exhaustive mapping to SQLSTATE and severity. No
//! other module spells a SQLSTATE of its own.
//!
//! The text of each variant is client-safe: it never holds a password or a query
//! parameter.

use std::borrow::Cow;

use bytes::BytesMut;

use crate::backend::{BackendError, PoolError};
use crate::protocol::messages::{self, Severity};

/// SQLSTATEs pgway reads in servers' replies, and the ones behind [`ClientError`].
pub mod sqlstate {
    /// `08P01` protocol_violation.
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    /// `08006` connection_failure.
    pub const CONNECTION_FAILURE: &str = "08006";
    /// `28P01` invalid_password.
    pub const INVALID_PASSWORD: &str = "28P01";
    /// `28000` invalid_authorization_specification.
    pub const INVALID_AUTHORIZATION: &str = "28000";
    /// `53300` too_many_connections.
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    /// `57P01` admin_shutdown.
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    /// `57P02` crash_shutdown.
    pub const CRASH_SHUTDOWN: &str = "57P02";
    /// `57P03` cannot_connect_now.
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    /// `57P05` idle_session_timeout.
    pub const IDLE_SESSION_TIMEOUT: &str = "57P05";
    /// `42P05` duplicate_prepared_statement.
    pub const DUPLICATE_PREPARED_STATEMENT: &str = "42P05";
    /// `22023` invalid_parameter_value.
    pub const INVALID_PARAMETER_VALUE: &str = "22023";
    /// A value that is not valid text for its type (a malformed WAL position).
    pub const INVALID_TEXT_REPRESENTATION: &str = "22P02";
    /// A parameter that cannot be set (`pgway.last_write_lsn`).
    pub const CANT_CHANGE_RUNTIME_PARAM: &str = "55P02";
    /// A write refused by a read-only transaction (a hot standby).
    pub const READ_ONLY_SQL_TRANSACTION: &str = "25006";
    /// For example "recovery is in progress" on a hot standby.
    pub const OBJECT_NOT_IN_PREREQUISITE_STATE: &str = "55000";
    /// `feature_not_supported` (a standby's "cannot access temporary or unlogged relations
    /// during recovery").
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    /// `40001` serialization_failure (also a standby's "conflict with recovery").
    pub const SERIALIZATION_FAILURE: &str = "40001";
    /// `08007` transaction_resolution_unknown.
    pub const TRANSACTION_RESOLUTION_UNKNOWN: &str = "08007";
    /// `25P02` in_failed_sql_transaction.
    pub const IN_FAILED_TRANSACTION: &str = "25P02";
    /// `25P03` idle_in_transaction_session_timeout.
    pub const IDLE_IN_TRANSACTION_TIMEOUT: &str = "25P03";
    /// `53400` configuration_limit_exceeded.
    pub const CONFIGURATION_LIMIT_EXCEEDED: &str = "53400";
    /// `57014` query_canceled.
    pub const QUERY_CANCELED: &str = "57014";
    /// `08`: the class connection_exception (`08000`, `08006`, `08P01`, ...).
    pub const CONNECTION_EXCEPTION_CLASS: &str = "08";
}

/// An error pgway reports to a client itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The client broke the protocol; the connection ends.
    #[error("{0}")]
    Protocol(Cow<'static, str>),
    /// A message type that is not valid where it arrived; the connection ends.
    #[error("invalid frontend message type {0}")]
    UnexpectedMessage(u8),
    /// A message other than CopyData/CopyDone/CopyFail/Flush/Sync during COPY FROM STDIN.
    #[error("unexpected message type {0} during COPY")]
    UnexpectedInCopy(u8),
    /// The server connection under the client's request failed; the connection ends.
    #[error("server connection lost: {0}")]
    ServerLost(String),
    /// The server died under a request that may have committed (a COMMIT, or a write
    /// outside a transaction): nobody can say whether it did.
    #[error("server connection lost while committing: {0}; the transaction may or may not have committed")]
    TransactionResolutionUnknown(String),
    /// The server of the client's open transaction died under a request: the transaction
    /// is gone (rolled back).
    #[error("server connection lost: {0}; the transaction was rolled back")]
    TransactionLost(String),
    /// The server died under a read outside a transaction whose answer had begun.
    #[error("server connection lost: {0}; the statement did not complete")]
    StatementLost(String),
    /// A statement in a transaction that failed (with its server): only its end is taken.
    #[error("current transaction is aborted, commands ignored until end of transaction block")]
    InFailedTransaction,
    /// The server kept shutting down under a request pgway sent again each time.
    #[error("server connection lost: the server kept shutting down")]
    ServerKeptShuttingDown,
    /// pgway is stopping and the client is between transactions.
    #[error("terminating connection because pgway is shutting down")]
    Shutdown,
    /// No primary (for a write, or at all) within `topology.failover_timeout`.
    #[error("no primary server became available within {0:?}")]
    NoPrimary(std::time::Duration),
    /// No node could be reached (at login).
    #[error("no server available: {0}")]
    NoServer(String),
    /// Connecting to a node failed for a reason other than a refusal by the server.
    #[error("{0}")]
    ConnectFailed(String),
    /// Every server connection stayed busy for `pool.wait_timeout`.
    #[error("{0}")]
    PoolTimeout(String),
    /// `client.max_connections` clients are connected already.
    #[error("sorry, too many clients already")]
    TooManyClients,
    /// The user's `max_connections` clients are connected already.
    #[error("too many connections for role \"{0}\"")]
    TooManyForUser(String),
    /// A Parse under a name the client already uses.
    #[error("prepared statement \"{0}\" already exists")]
    DuplicatePreparedStatement(String),
    /// A value pgway does not accept for one of its own settings (`pgway.*`).
    #[error("invalid value for parameter \"{name}\": \"{value}\"")]
    InvalidParameterValue {
        /// The setting.
        name: &'static str,
        /// What the client sent.
        value: String,
    },
    /// A WAL position pgway cannot read (`pgway.min_lsn`).
    #[error("invalid input syntax for type pg_lsn: \"{0}\"")]
    InvalidLsn(String),
    /// A pgway setting only pgway sets.
    #[error("parameter \"{0}\" cannot be changed")]
    ReadOnlyParameter(&'static str),
    /// Wrong password or unknown user.
    #[error("password authentication failed for user \"{0}\"")]
    BadPassword(String),
    /// No user in the StartupMessage.
    #[error("no PostgreSQL user name specified in startup packet")]
    NoUser,
    /// A client started without TLS while `client.tls.mode = "require"`.
    #[error("SSL required: pgway accepts only encrypted connections (connect with sslmode=require or stronger)")]
    SslRequired,
    /// Startup and authentication did not finish within `client.login_timeout`.
    #[error("startup and authentication did not finish in time")]
    LoginTimeout,
    /// The client sent nothing for `client.idle_timeout` outside a transaction.
    #[error("terminating connection due to client idle timeout ({0:?})")]
    IdleTimeout(std::time::Duration),
    /// The client left a transaction open and sent nothing for
    /// `client.idle_in_transaction_timeout`.
    #[error("terminating connection due to idle-in-transaction timeout ({0:?})")]
    IdleInTransactionTimeout(std::time::Duration),
    /// A Parse beyond `client.max_prepared_statements` named statements.
    #[error(
        "too many prepared statements: this client keeps {0} (client.max_prepared_statements); \
         close some with Close or DEALLOCATE"
    )]
    TooManyPreparedStatements(usize),
    /// The user's `databases` list leaves this database out.
    #[error("user \"{user}\" may not connect to database \"{database}\"")]
    DatabaseNotAllowed {
        /// The role.
        user: String,
        /// The database it asked for.
        database: String,
    },
    /// A server's own refusal (at login, or when a connection for the client was made),
    /// passed on with the server's SQLSTATE.
    #[error("{message}")]
    Server {
        /// SQLSTATE from the server.
        code: String,
        /// The server's message.
        message: String,
    },
}

impl ClientError {
    /// The SQLSTATE the client sees.
    pub fn sqlstate(&self) -> &str {
        use sqlstate::*;
        match self {
            Self::Protocol(_)
            | Self::UnexpectedMessage(_)
            | Self::UnexpectedInCopy(_)
            | Self::LoginTimeout
            | Self::IdleTimeout(_) => PROTOCOL_VIOLATION,
            Self::IdleInTransactionTimeout(_) => IDLE_IN_TRANSACTION_TIMEOUT,
            Self::TransactionResolutionUnknown(_) => TRANSACTION_RESOLUTION_UNKNOWN,
            Self::TransactionLost(_) | Self::StatementLost(_) => CONNECTION_FAILURE,
            Self::InFailedTransaction => IN_FAILED_TRANSACTION,
            Self::TooManyPreparedStatements(_) => CONFIGURATION_LIMIT_EXCEEDED,
            Self::DatabaseNotAllowed { .. } => INVALID_AUTHORIZATION,
            Self::ServerLost(_)
            | Self::ServerKeptShuttingDown
            | Self::NoPrimary(_)
            | Self::NoServer(_)
            | Self::ConnectFailed(_) => CONNECTION_FAILURE,
            Self::Shutdown => ADMIN_SHUTDOWN,
            Self::PoolTimeout(_) | Self::TooManyClients | Self::TooManyForUser(_) => {
                TOO_MANY_CONNECTIONS
            }
            Self::DuplicatePreparedStatement(_) => DUPLICATE_PREPARED_STATEMENT,
            Self::InvalidParameterValue { .. } => INVALID_PARAMETER_VALUE,
            Self::InvalidLsn(_) => INVALID_TEXT_REPRESENTATION,
            Self::ReadOnlyParameter(_) => CANT_CHANGE_RUNTIME_PARAM,
            Self::BadPassword(_) => INVALID_PASSWORD,
            Self::NoUser | Self::SslRequired => INVALID_AUTHORIZATION,
            Self::Server { code, .. } => code,
        }
    }

    /// FATAL for errors that end the connection, ERROR for those that end a statement.
    pub fn severity(&self) -> Severity {
        match self {
            Self::Protocol(_)
            | Self::UnexpectedMessage(_)
            | Self::UnexpectedInCopy(_)
            | Self::ServerLost(_)
            | Self::ServerKeptShuttingDown
            | Self::Shutdown
            | Self::NoServer(_)
            | Self::TooManyClients
            | Self::TooManyForUser(_)
            | Self::BadPassword(_)
            | Self::NoUser
            | Self::SslRequired
            | Self::LoginTimeout
            | Self::IdleTimeout(_)
            | Self::IdleInTransactionTimeout(_)
            | Self::DatabaseNotAllowed { .. } => Severity::Fatal,
            Self::NoPrimary(_)
            | Self::ConnectFailed(_)
            | Self::PoolTimeout(_)
            | Self::DuplicatePreparedStatement(_)
            | Self::TooManyPreparedStatements(_)
            | Self::TransactionResolutionUnknown(_)
            | Self::TransactionLost(_)
            | Self::StatementLost(_)
            | Self::InFailedTransaction
            | Self::InvalidParameterValue { .. }
            | Self::InvalidLsn(_)
            | Self::ReadOnlyParameter(_) => Severity::Error,
            // At login a refusal ends the connection; the session reports a refusal of a
            // new server connection as a statement error.
            Self::Server { .. } => Severity::Error,
        }
    }

    /// Appends the ErrorResponse for this error to `out`, with its own severity.
    pub fn write(&self, out: &mut BytesMut) {
        self.write_as(out, self.severity());
    }

    /// Appends the ErrorResponse with `severity` (a refusal at login is FATAL).
    pub fn write_as(&self, out: &mut BytesMut, severity: Severity) {
        messages::error_response(out, severity, self.sqlstate(), &self.to_string());
    }
}

impl From<PoolError> for ClientError {
    /// What a client is told when no server connection could be borrowed for it: a busy
    /// pool is 53300, a server's refusal keeps the server's SQLSTATE, and any other failure
    /// to connect is a connection failure.
    fn from(e: PoolError) -> Self {
        match e {
            PoolError::Timeout { .. } => Self::PoolTimeout(e.to_string()),
            PoolError::Connect(BackendError::Server { code, message }) => {
                Self::Server { code, message }
            }
            PoolError::Connect(other) => Self::ConnectFailed(other.to_string()),
        }
    }
}

/// True for an ErrorResponse in which a hot standby refuses what only a primary can do:
/// `25006` ("cannot execute ... in a read-only transaction"), `55000` "... recovery is in
/// progress", or `0A000` "cannot access temporary or unlogged relations during recovery"
/// (an unlogged table has no rows on a standby).
pub fn is_read_only_refusal(frame: &[u8]) -> bool {
    let (code, message) = messages::error_fields(frame);
    code == sqlstate::READ_ONLY_SQL_TRANSACTION
        || code == sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE && message.contains("recovery")
        || code == sqlstate::FEATURE_NOT_SUPPORTED && message.contains("during recovery")
}

/// True for the ERROR by which a hot standby cancels a statement that holds back the
/// replay of WAL (`40001` "canceling statement due to conflict with recovery", after
/// `max_standby_streaming_delay`): the statement did not run to its end and may run
/// elsewhere.
pub fn is_recovery_conflict(frame: &[u8]) -> bool {
    let (code, message) = messages::error_fields(frame);
    code == sqlstate::SERIALIZATION_FAILURE
        && message.contains("conflict with recovery")
        && messages::error_severity(frame).is_some_and(|s| s == "ERROR")
}

/// True for a FATAL ErrorResponse by which a server says it is shutting down (or cannot
/// take connections, or ends an idle session), so the request it answers did not run.
pub fn is_shutdown(frame: &[u8]) -> bool {
    use sqlstate::*;
    let (code, _) = messages::error_fields(frame);
    let fatal = messages::error_severity(frame).is_some_and(|s| s == "FATAL");
    fatal
        && [
            ADMIN_SHUTDOWN,
            CRASH_SHUTDOWN,
            CANNOT_CONNECT_NOW,
            IDLE_SESSION_TIMEOUT,
        ]
        .contains(&code.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_a_sqlstate_and_a_message() {
        let errors = [
            ClientError::Protocol("bad".into()),
            ClientError::UnexpectedMessage(b'?'),
            ClientError::ServerLost("eof".into()),
            ClientError::Shutdown,
            ClientError::TooManyClients,
            ClientError::TooManyForUser("app".into()),
            ClientError::DuplicatePreparedStatement("s1".into()),
            ClientError::Server {
                code: "3D000".into(),
                message: "database \"x\" does not exist".into(),
            },
        ];
        let codes: Vec<_> = errors.iter().map(ClientError::sqlstate).collect();
        assert_eq!(
            codes,
            ["08P01", "08P01", "08006", "57P01", "53300", "53300", "42P05", "3D000"]
        );
        let mut out = BytesMut::new();
        ClientError::Shutdown.write(&mut out);
        assert_eq!(messages::error_severity(&out).as_deref(), Some("FATAL"));
        assert_eq!(
            messages::error_fields(&out),
            (
                "57P01".to_owned(),
                "terminating connection because pgway is shutting down".to_owned()
            )
        );
    }

    #[test]
    fn pool_errors_keep_their_code_and_text() {
        let timeout = PoolError::Timeout {
            addr: "127.0.0.1:5432".into(),
            waited: std::time::Duration::from_secs(5),
        };
        let text = timeout.to_string();
        let busy = ClientError::from(timeout);
        assert_eq!(busy, ClientError::PoolTimeout(text.clone()));
        assert_eq!((busy.sqlstate(), busy.to_string()), ("53300", text));

        let refused = ClientError::from(PoolError::Connect(BackendError::Server {
            code: "3D000".into(),
            message: "database \"x\" does not exist".into(),
        }));
        assert_eq!(refused.sqlstate(), "3D000");
        assert_eq!(refused.to_string(), "database \"x\" does not exist");

        let down = ClientError::from(PoolError::Connect(BackendError::Timeout(
            "127.0.0.1:5432".into(),
        )));
        assert_eq!(
            down,
            ClientError::ConnectFailed("timed out connecting to 127.0.0.1:5432".into())
        );
        assert_eq!(down.sqlstate(), "08006");
    }

    #[test]
    fn shutdown_errors_are_recognised() {
        let mut frame = BytesMut::new();
        messages::error_response(&mut frame, Severity::Fatal, "57P01", "terminating");
        assert!(is_shutdown(&frame));
        frame.clear();
        messages::error_response(&mut frame, Severity::Error, "57P01", "not fatal");
        assert!(!is_shutdown(&frame));
        frame.clear();
        messages::error_response(&mut frame, Severity::Fatal, "28P01", "password");
        assert!(!is_shutdown(&frame));
    }
}
