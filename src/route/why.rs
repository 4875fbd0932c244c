//! Why a statement went where it went, for `SHOW pgway.last_route`: recorded per request
//! as a small value (no text is made until a client asks), printed as `primary: ...`,
//! `replica: ...` in words a user can act on.

use std::sync::Arc;
use std::time::Duration;

/// The reason for a routing decision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Why {
    /// No statement yet.
    #[default]
    Nothing,
    /// A read that calls no function pgway needs to look up.
    PlainRead,
    /// A read whose functions were all shown not to write.
    ReadOnlyFunctions,
    /// `/* pgway:replica */` on the statement.
    ReplicaHint,
    /// `SET pgway.target = 'replica'`.
    ReplicaTarget,
    /// `BEGIN READ ONLY`, or a statement inside such a transaction.
    ReadOnlyTransaction,
    /// `/* pgway:primary */` on the statement.
    PrimaryHint,
    /// `SET pgway.target = 'primary'`.
    PrimaryTarget,
    /// Not a read pgway can prove (a write, transaction control, a setting, SQL it cannot
    /// parse).
    NotARead,
    /// A call of a function that may write: the function and why.
    Function(Arc<str>),
    /// Inside a transaction that runs on the primary.
    InTransaction,
    /// The session is pinned to its connection (LISTEN, a temporary table, ...).
    Pinned,
    /// No replica had replayed the read-your-writes floor within the wait.
    FloorNotReplayed(Duration),
    /// A replica refused it as a write; it ran on the primary.
    RefusedByReplica,
    /// A replica cancelled it for a conflict with recovery; it ran here.
    RecoveryConflict,
    /// Answered from the result cache.
    Cache,
}

impl Why {
    /// The statement is a read whose functions (if any) were shown not to write.
    pub fn is_proven_read(&self) -> bool {
        matches!(self, Why::PlainRead | Why::ReadOnlyFunctions)
    }
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Why::Nothing => f.write_str("none: no statement yet"),
            Why::PlainRead => f.write_str("replica: plain read"),
            Why::ReadOnlyFunctions => f.write_str("replica: a read whose functions only read"),
            Why::ReplicaHint => f.write_str("replica: /* pgway:replica */ hint"),
            Why::ReplicaTarget => f.write_str("replica: pgway.target = replica"),
            Why::ReadOnlyTransaction => f.write_str("replica: read-only transaction"),
            Why::PrimaryHint => f.write_str("primary: /* pgway:primary */ hint"),
            Why::PrimaryTarget => f.write_str("primary: pgway.target = primary"),
            Why::NotARead => {
                f.write_str("primary: not a read (a write, or SQL pgway cannot prove only reads)")
            }
            Why::Function(why) => write!(f, "primary: calls {why}"),
            Why::InTransaction => f.write_str("primary: inside a transaction"),
            Why::Pinned => f.write_str(
                "primary: the session is pinned to its connection (LISTEN, temporary table, \
                 session lock, SQL PREPARE, WITH HOLD cursor or an untracked setting)",
            ),
            Why::FloorNotReplayed(wait) => write!(
                f,
                "primary: read-your-writes floor not replayed by any replica within {}ms",
                wait.as_millis()
            ),
            Why::RefusedByReplica => {
                f.write_str("primary: a replica refused it as a write, so it ran here")
            }
            Why::RecoveryConflict => f.write_str(
                "primary: a replica cancelled it for a conflict with recovery, so it ran here",
            ),
            Why::Cache => f.write_str("cache: answered from pgway's result cache"),
        }
    }
}
