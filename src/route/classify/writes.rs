//! Whether a statement the router sends to the primary may change data that a later read
//! must see: the question read-your-writes asks. Erring towards "yes" costs one WAL
//! position query and sends the writer's next reads to a replica that has replayed it;
//! erring towards "no" would let a read miss a write, so anything unsure writes.

use std::ops::ControlFlow;

use sqlparser::ast::{Statement, Visit};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::tokenizer::{Token, TokenWithSpan};

use super::tokens::{is_kw, is_trivia, split_statements, tokenize, too_deep};
use super::{parse_statements, ReadChecker};

/// Statements that change no data, by their first word: settings, transaction control
/// (`COMMIT` alone writes nothing: the transaction's statements did), cursors,
/// notifications and session cleanup. (`COMMIT PREPARED` does write.)
const NO_WRITE_STATEMENTS: &[&str] = &[
    "SET",
    "RESET",
    "SHOW",
    "DISCARD",
    "DEALLOCATE",
    "LISTEN",
    "UNLISTEN",
    "CLOSE",
    "BEGIN",
    "START",
    "SAVEPOINT",
    "RELEASE",
    "ROLLBACK",
    "ABORT",
    "COMMIT",
    "END",
    "FETCH",
    "MOVE",
    "TABLE",
];

/// Built-ins on the write list (they need the primary) that change no data: advisory
/// locks, settings, notifications, WAL positions, transaction ids (a transaction that only
/// took one commits without waiting for its WAL to be flushed, so a replica could not
/// show it for a while), signals to other backends.
const SESSION_FUNCTIONS: &[&str] = &[
    "set_config",
    "pg_notify",
    "currval",
    "lastval",
    "pg_current_wal_lsn",
    "pg_current_wal_insert_lsn",
    "pg_current_wal_flush_lsn",
    "txid_current",
    "txid_current_if_assigned",
    "pg_current_xact_id",
    "pg_current_xact_id_if_assigned",
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_reload_conf",
    "pg_rotate_logfile",
];

/// `name` (a function's own name) is a built-in that needs the primary but changes no
/// data.
pub(super) fn is_session_function(name: &str) -> bool {
    let advisory = ["pg_advisory_", "pg_try_advisory_"].iter().any(|prefix| {
        name.get(..prefix.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
    });
    advisory
        || SESSION_FUNCTIONS
            .iter()
            .any(|f| name.eq_ignore_ascii_case(f))
}

/// True if some statement of `sql` may change data (see
/// [`super::Classification::writes`]).
pub(super) fn may_write(sql: &str) -> bool {
    let Some(tokens) = tokenize(sql) else {
        return true;
    };
    if too_deep(&tokens) {
        // Walking its parse tree could overflow the stack.
        return true;
    }
    split_statements(&tokens)
        .into_iter()
        .any(statement_may_write)
}

fn statement_may_write(tokens: &[TokenWithSpan]) -> bool {
    let mut words = tokens.iter().map(|t| &t.token).filter(|t| !is_trivia(t));
    let Some(first) = words.next() else {
        return false;
    };
    if NO_WRITE_STATEMENTS.iter().any(|k| is_kw(first, k)) {
        return is_kw(first, "COMMIT") && words.next().is_some_and(|w| is_kw(w, "PREPARED"));
    }
    let query =
        ["SELECT", "WITH", "VALUES"].iter().any(|k| is_kw(first, k)) || *first == Token::LParen;
    !query || query_may_write(tokens)
}

/// A query (`SELECT`, `WITH`, `VALUES`) may write if it writes on its own (`INTO`, a
/// writing CTE, a writing built-in) or calls a function that is not a known built-in.
fn query_may_write(tokens: &[TokenWithSpan]) -> bool {
    let Ok(statements) = parse_statements(PostgreSqlDialect {}, tokens.to_vec()) else {
        return true;
    };
    statements.iter().any(|statement| match statement {
        Statement::Query(query) => {
            let mut functions = Vec::new();
            let mut checker = ReadChecker {
                functions: &mut functions,
                lenient: true,
            };
            matches!(query.visit(&mut checker), ControlFlow::Break(())) || !functions.is_empty()
        }
        _ => true,
    })
}

#[cfg(test)]
mod tests {
    use super::super::classify;

    fn writes(sql: &str) -> bool {
        classify(sql).writes
    }

    #[test]
    fn writes_count_whatever_their_form() {
        for sql in [
            "insert into t values (1)",
            "update t set a = 1",
            "delete from t",
            "create table t1(i int)",
            "select * into t2 from t",
            "with d as (delete from t returning *) select * from d",
            "copy t from stdin",
            "call p()",
            "do $$ begin null; end $$",
            "select my_function()",
            "select nextval('s')",
            "commit prepared 'x'",
            "truncate t",
            "select 1; insert into t values (1)",
            "this is not sql",
        ] {
            assert!(writes(sql), "{sql}");
        }
    }

    #[test]
    fn reads_and_session_statements_do_not_write() {
        for sql in [
            "select 1",
            "select * from t where id = 1 for update",
            "SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL",
            "select pg_advisory_lock(1)",
            "select set_config('a.b', 'c', false)",
            "select pg_current_wal_insert_lsn()",
            "select inet_server_port(), txid_current()",
            "set search_path = app",
            "show work_mem",
            "show transaction_read_only",
            "begin",
            "commit",
            "rollback",
            "savepoint s",
            "discard all",
            "deallocate all",
            "listen c",
            "select * from pg_prepared_xacts",
            "table t",
            "",
        ] {
            assert!(!writes(sql), "{sql}");
        }
    }
}
