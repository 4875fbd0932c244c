//! Statement classification for read/write routing.
//!
//! [`classify`] decides whether a SQL string may run on a read replica or must
//! run on the primary. It is a pure function of the SQL text (no I/O, no
//! catalogue access), so the caller can cache its result per SQL string.
//!
//! # The guiding rule
//!
//! **A write must never reach a replica, so anything we are unsure about goes
//! to the primary.** Sending a read to the primary only costs some load;
//! sending a write to a replica fails the client's statement (or, worse,
//! silently reads stale data inside what the client believes is a
//! read-your-writes sequence). Every rule below therefore errs towards
//! [`StatementKind::Write`].
//!
//! # Rules
//!
//! * **Read** ([`StatementKind::Read`]): `SELECT`, `VALUES`, `TABLE t`,
//!   parenthesised queries, set operations (`UNION`, `INTERSECT`, `EXCEPT`)
//!   of reads, `WITH` whose CTEs and body are all reads, `SHOW ...`,
//!   `EXPLAIN <read>` (with or without `ANALYZE`), `COPY table TO STDOUT`
//!   and `COPY (read query) TO STDOUT`. An empty string, or one holding only
//!   whitespace and comments, is also a read.
//! * **Write** ([`StatementKind::Write`]): everything else. In particular
//!   DML, DDL, `CALL`, `DO`, `LISTEN`/`UNLISTEN`/`NOTIFY`, `VACUUM`,
//!   `SET`/`RESET`/`DISCARD`, `PREPARE`/`EXECUTE`/`DEALLOCATE`, cursors,
//!   transaction control, `LOCK`, `COPY ... FROM`, `COPY ... TO` a file or
//!   program, `EXPLAIN` of a non-read (even without `ANALYZE`), any row
//!   locking clause (`FOR UPDATE`, `FOR NO KEY UPDATE`, `FOR SHARE`,
//!   `FOR KEY SHARE`) anywhere in the statement, `SELECT ... INTO`, a
//!   data-modifying statement inside a CTE or subquery, a call to a built-in
//!   function that writes or needs the primary (`nextval`, advisory locks,
//!   `set_config`, `txid_current`, `pg_current_wal_lsn`, `pg_notify`,
//!   `pg_advisory_*`, `dblink*`, large-object writers, replication-slot and
//!   backup functions, ...; matched case-insensitively on the function's own
//!   name whatever schema qualifies it), and **any SQL that does not parse**
//!   or that uses syntax PostgreSQL would not accept for a read.
//! * **BeginReadOnly** ([`StatementKind::BeginReadOnly`]): a lone
//!   `BEGIN`/`START TRANSACTION` whose modes include `READ ONLY` (and not
//!   `READ WRITE`). The whole transaction may then run on one replica.
//! * A string with several `;`-separated statements is `Read` only if every
//!   statement is `Read`; otherwise it is `Write` (a `BEGIN READ ONLY` mixed
//!   with other statements in one string is `Write`).
//!
//! # Functions
//!
//! A read that calls a user-defined or unknown function may still write (a
//! volatile function can do anything), so for `Read` results
//! [`Classification::functions`] lists every called function that is not on
//! a built-in safe list of common immutable and stable functions (`count`,
//! `coalesce`, `lower`, `now`, `date_trunc`, `row_number`, `generate_series`,
//! `current_setting`, `pg_is_in_recovery`, ...), which only applies to
//! unqualified or `pg_catalog.`-qualified calls. The caller must look their
//! volatility up in `pg_proc` and send the statement to the primary unless
//! all of them are non-volatile. Functions are found anywhere in the
//! statement: select list, `FROM` (table functions), `WHERE`, `GROUP BY`,
//! `HAVING`, `ORDER BY`, `LIMIT`, window definitions, CTEs, subqueries,
//! `VALUES` rows and nested function arguments.
//!
//! Functions invoked implicitly (through user-defined operators, casts to
//! user-defined types, or triggers) are not visible in the SQL text and are
//! not reported.
//!
//! # Hints
//!
//! A leading comment `/* pgway:primary */`, `/* pgway:replica */` (spaces
//! inside the comment are optional) or a leading line comment
//! `-- pgway:primary` sets [`Classification::hint`]. Hints do not change
//! [`Classification::kind`]; the caller applies them, and a
//! [`Hint::Replica`] must only be honoured for [`StatementKind::Read`]:
//! it never sends a `Write` to a replica.
//!
//! # Session effects
//!
//! pgway pools server connections per transaction, so it must know when a
//! statement changes session state. [`Classification::session`] lists one
//! [`SessionEffect`] per statement that has one, in order, for every string
//! (Read or Write, parseable or not). Effects say what a statement does *if
//! it succeeds*: apply them after the server reports success, and forget a
//! transaction's `SET`/`RESET` effects if it rolls back.
//!
//! * `SET`, `RESET`, `DISCARD`, `DEALLOCATE` and `UNLISTEN` are read from the
//!   tokens, following PostgreSQL's own grammar (`gram.y`) rather than
//!   sqlparser's, which rejects `SET SCHEMA`, `SET XML OPTION`,
//!   `SET CONSTRAINTS`, `SET local.x = 1`, `RESET TIME ZONE`, ... and cannot
//!   tell `SET x = DEFAULT` from `SET x = "default"`. A form that is not
//!   recognised is [`SessionEffect::Unsupported`], never a guess.
//! * A `SET` value is the input text from its first token to its last
//!   (outer comments excluded, inner ones kept), located through the
//!   tokenizer's line/column positions and checked by tokenizing the slice
//!   again; each item must be a string constant (`'..'`, `E'..'`, `$$..$$`,
//!   `U&'..'`), a word or a signed number, as PostgreSQL requires. So a `;`
//!   inside quotes never splits, and the value replays verbatim.
//! * Pins ([`PinReason`]) are found on the parsed statement (`PREPARE`,
//!   `LISTEN`, `DECLARE ... WITH HOLD`, `CREATE TEMP TABLE/VIEW/SEQUENCE`,
//!   `SELECT ... INTO TEMP`, calls to the session-level advisory lock
//!   functions anywhere in the statement). Only statements containing one of
//!   the telling words are parsed; those the parser rejects (or that are too
//!   deep to parse safely) fall back to a token scan that errs towards
//!   pinning. `CREATE ... pg_temp.x` pins on the tokens. The body of a
//!   `CREATE FUNCTION` / `CREATE PROCEDURE` (including a `BEGIN ATOMIC ...
//!   END` body, whose inner `;` do not end the statement) runs later, not
//!   now, and is not examined.
//! * If the whole string does not tokenize (an unterminated quote, ...),
//!   PostgreSQL rejects it as a whole; the first statement's leading word
//!   still gives `Unsupported` for `SET`/`RESET`/`DISCARD`/`DEALLOCATE` and
//!   pins for `LISTEN`/`PREPARE`/`DECLARE ... HOLD`.
//!
//! Not visible in the SQL text, hence not reported: state changed inside
//! functions or `DO` blocks (`SET` in PL/pgSQL, `set_config(..., false)`,
//! advisory locks taken by a function), and the session-level
//! `set_config(name, value, false)` call itself. Strings are assumed to be
//! lexed with `standard_conforming_strings = on` (the default since
//! PostgreSQL 9.1).
//!
//! # Robustness
//!
//! [`classify`] never panics: malformed input is simply `Write`. The parser
//! limits its recursion depth; statements whose operator chains are so long
//! that walking the parse tree could overflow a 2 MiB stack (thousands of
//! chained `+`/`AND`/`UNION` terms; long comma-separated lists are fine) are
//! `Write` without being parsed. As a last line of defence a panic inside the
//! parser is caught and treated as `Write` (this only applies when the binary
//! is built with `panic = "unwind"`, the default); for session effects such a
//! panic means "did not parse", and the token fallback decides.
//!
//! Two sqlparser 0.63 quirks are worked around: `TABLE t` is rewritten to
//! `SELECT * FROM t` before parsing (the parser rejects it as a statement and
//! mis-parses it inside queries), and statements are split with a stricter
//! loop than `Parser::parse_statements` (which silently stops at a stray
//! `END`). Row locks `FOR NO KEY UPDATE` / `FOR KEY SHARE` do not parse in
//! 0.63; they, like every locking clause, are also caught by a token scan
//! that runs before parsing.

use std::ops::ControlFlow;

use sqlparser::ast::{
    CopySource, CopyTarget, DescribeAlias, Expr, ObjectName, ObjectNamePart, Query, Select,
    Statement, TableFactor, TransactionAccessMode, TransactionMode, Visit, Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::keywords::Keyword;
use sqlparser::parser::{Parser, ParserError};
use sqlparser::tokenizer::{Location, Token, TokenWithSpan, Tokenizer};

/// Where a statement is forced to go by a hint comment.
///
/// The hint is only reported; the caller decides precedence. A
/// [`Hint::Replica`] must never send a [`StatementKind::Write`] (or a `Read`
/// inside a read-write transaction) to a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hint {
    /// `/* pgway:primary */` or `-- pgway:primary`: run on the primary.
    Primary,
    /// `/* pgway:replica */` or `-- pgway:replica`: run on a replica, honoured
    /// only when the statement is a [`StatementKind::Read`].
    Replica,
}

/// What a statement (or a multi-statement string) is, for routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatementKind {
    /// Pure read: may go to a replica outside a transaction, if every function in `functions` is not volatile.
    Read,
    /// Must run on the primary (DML, DDL, locking reads, SELECT INTO, data-modifying CTEs, write functions, unparseable SQL, BEGIN/START TRANSACTION that is not READ ONLY, SET, LISTEN, etc.).
    Write,
    /// `BEGIN READ ONLY` / `START TRANSACTION READ ONLY` (also `BEGIN ISOLATION LEVEL ... READ ONLY`, `BEGIN TRANSACTION READ ONLY`): the whole transaction may run on one replica.
    BeginReadOnly,
}

/// The routing-relevant facts about one SQL string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classification {
    /// What the statement (or every statement of a multi-statement string) is.
    pub kind: StatementKind,
    /// Hint from a leading comment, if any.
    pub hint: Option<Hint>,
    /// Functions called by a Read statement whose volatility must be looked up in pg_proc
    /// before it may go to a replica: lower-cased, schema-qualified if written so ("accounts.get_user_by_identifier_v1", "my_func"),
    /// deduplicated, sorted. Excludes functions on the built-in safe list. Empty for Write.
    ///
    /// Unquoted identifiers are lower-cased as PostgreSQL folds them; a
    /// double-quoted identifier (`"MyFunc"`) keeps its exact spelling, since
    /// that is the name PostgreSQL looks up.
    pub functions: Vec<String>,
    /// Session state changed by the string: one entry per statement that has
    /// an effect, in statement order (statements without one contribute
    /// nothing). Computed for every kind, Read or Write, parseable or not.
    /// See [Session effects](self#session-effects).
    pub session: Vec<SessionEffect>,
}

/// Why a client must stay on one primary connection: session-bound state that cannot move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinReason {
    /// SQL-level `PREPARE name AS ...` (not `PREPARE TRANSACTION`).
    Prepare,
    /// A temporary object: `CREATE [GLOBAL|LOCAL] TEMP|TEMPORARY TABLE/VIEW/SEQUENCE ...`
    /// (with or without `ON COMMIT`), `SELECT ... INTO TEMP ...`, or a `CREATE`
    /// (or `SELECT ... INTO`) naming an object in the `pg_temp.` schema.
    TempTable,
    /// Session-level advisory locks: `pg_advisory_lock`, `pg_advisory_lock_shared`,
    /// `pg_try_advisory_lock`, `pg_try_advisory_lock_shared` (not the `_xact_`
    /// variants, which end with the transaction).
    AdvisoryLock,
    /// `LISTEN channel`.
    Listen,
    /// `DECLARE name ... CURSOR WITH HOLD FOR ...`.
    HoldCursor,
}

/// How a statement changes session state that pgway tracks per client.
///
/// Effects describe what the statement does *if it succeeds*; the caller
/// applies them only after the server reports success, and must undo a
/// transaction's `Set`/`Reset` effects when the transaction rolls back
/// (PostgreSQL reverts `SET` on `ROLLBACK`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEffect {
    /// `SET [SESSION] name {TO|=} value`, and the special forms
    /// `SET TIME ZONE value` (name `timezone`), `SET NAMES 'x'`
    /// (`client_encoding`), `SET SCHEMA 'x'` (`search_path`), `SET ROLE x`
    /// (`role`), `SET SESSION AUTHORIZATION x` (`session_authorization`) and
    /// `SET XML OPTION x` (`xmloption`).
    ///
    /// `name` is the parameter name with ASCII letters lower-cased, quoted
    /// or not (PostgreSQL parameter names are case-insensitive), dotted names
    /// kept whole (`pgway.target`). Each dot-separated part is non-empty and
    /// made of letters, digits, `_` and `$` (not starting with a digit or
    /// `$`), so quoting every part (`SET "pgway"."target" = ...`) always
    /// replays it exactly.
    ///
    /// `value` is the value exactly as written in the input (a slice of it):
    /// `'a', public`, `'UTC'`, `"$user", public`. Comments before and after
    /// the value are not part of it; comments between list items are kept as
    /// written, which is still valid SQL. Replay as `SET name = value`, except
    /// for `timezone`, which must be replayed as `SET TIME ZONE value` (that
    /// form accepts every value either spelling produces, including
    /// `INTERVAL '...' HOUR TO MINUTE`).
    Set {
        /// Parameter name, lower-cased.
        name: String,
        /// Value text from the input.
        value: String,
    },
    /// Transaction-scoped: `SET LOCAL ...`, `SET TRANSACTION ...`,
    /// `SET CONSTRAINTS ...`, `RESET TRANSACTION ISOLATION LEVEL`.
    SetLocal,
    /// `RESET name` or `SET name {TO|=} DEFAULT` (name lower-cased like
    /// [`SessionEffect::Set`]); also `SET TIME ZONE DEFAULT|LOCAL`,
    /// `SET NAMES [DEFAULT]`, `SET SESSION AUTHORIZATION DEFAULT`,
    /// `RESET TIME ZONE`, `RESET SESSION AUTHORIZATION`.
    Reset(String),
    /// `RESET ALL`.
    ResetAll,
    /// `DISCARD ALL`.
    DiscardAll,
    /// `DISCARD PLANS`, `DISCARD SEQUENCES`, `DISCARD TEMP|TEMPORARY`.
    DiscardOther,
    /// `DEALLOCATE [PREPARE] name`: the name lower-cased unless quoted, as
    /// PostgreSQL folds it.
    Deallocate(String),
    /// `DEALLOCATE [PREPARE] ALL`.
    DeallocateAll,
    /// `UNLISTEN ...` (any form).
    Unlisten,
    /// `SAVEPOINT name` (name lower-cased unless quoted).
    Savepoint(String),
    /// `ROLLBACK [WORK | TRANSACTION] TO [SAVEPOINT] name`: session effects since the
    /// savepoint are undone.
    RollbackToSavepoint(String),
    /// `RELEASE [SAVEPOINT] name`.
    ReleaseSavepoint(String),
    /// Session-bound state: pin the client.
    Pin(PinReason),
    /// A session-level statement pgway cannot keep across pooled connections
    /// and should refuse, naming it: `"SET SESSION CHARACTERISTICS"`, or
    /// `"SET"`, `"RESET"`, `"DISCARD"`, `"DEALLOCATE"` for a statement of
    /// that kind whose form was not recognised (never guessed).
    Unsupported(&'static str),
}

/// Built-in functions that write, take locks, assign a transaction id or only
/// work on the primary. A call to any of them (matched case-insensitively on
/// the function's own name, whatever schema it is qualified with) makes the
/// statement a [`StatementKind::Write`].
const WRITE_FUNCTIONS: &[&str] = &[
    "nextval",
    "setval",
    "currval",
    "lastval",
    "set_config",
    "txid_current",
    "txid_current_if_assigned",
    "pg_current_xact_id",
    "pg_current_xact_id_if_assigned",
    "pg_current_wal_lsn",
    "pg_current_wal_insert_lsn",
    "pg_current_wal_flush_lsn",
    "pg_notify",
    "pg_switch_wal",
    "pg_create_restore_point",
    "pg_start_backup",
    "pg_backup_start",
    "pg_stop_backup",
    "pg_backup_stop",
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "lo_create",
    "lo_creat",
    "lo_import",
    "lo_unlink",
    "lo_from_bytea",
    "lo_put",
    "lo_open",
    "lowrite",
    "pg_logical_emit_message",
    "pg_create_logical_replication_slot",
    "pg_create_physical_replication_slot",
    "pg_drop_replication_slot",
];

/// Name prefixes of built-in (or extension) functions that write or need the
/// primary: advisory locks and `dblink*`. Matched like `WRITE_FUNCTIONS`.
const WRITE_FUNCTION_PREFIXES: &[&str] = &["pg_advisory_", "pg_try_advisory_", "dblink"];

/// Built-in functions that are safe on a replica without a `pg_proc` lookup
/// (immutable or stable, or volatile but harmless there such as `pg_sleep`).
/// Only honoured when the call is unqualified or qualified with
/// `pg_catalog.`; such calls are not reported in `Classification::functions`.
const SAFE_FUNCTIONS: &[&str] = &[
    // aggregates
    "count",
    "sum",
    "avg",
    "min",
    "max",
    "array_agg",
    "string_agg",
    "json_agg",
    "jsonb_agg",
    "json_object_agg",
    "jsonb_object_agg",
    "bool_and",
    "bool_or",
    "every",
    // conditional
    "coalesce",
    "nullif",
    "greatest",
    "least",
    // strings
    "lower",
    "upper",
    "length",
    "char_length",
    "character_length",
    "octet_length",
    "substr",
    "substring",
    "trim",
    "btrim",
    "ltrim",
    "rtrim",
    "concat",
    "concat_ws",
    "replace",
    "split_part",
    "position",
    "strpos",
    "left",
    "right",
    "lpad",
    "rpad",
    "md5",
    "format",
    "regexp_replace",
    "starts_with",
    // numbers
    "abs",
    "round",
    "floor",
    "ceil",
    "ceiling",
    "mod",
    "trunc",
    // date and time
    "now",
    "current_timestamp",
    "current_date",
    "current_time",
    "localtimestamp",
    "localtime",
    "date_trunc",
    "date_part",
    "extract",
    "to_char",
    "to_timestamp",
    "to_date",
    "to_number",
    "age",
    // json
    "json_build_object",
    "jsonb_build_object",
    "json_build_array",
    "jsonb_build_array",
    "to_json",
    "to_jsonb",
    "row_to_json",
    // window functions
    "row_number",
    "rank",
    "dense_rank",
    "lag",
    "lead",
    "first_value",
    "last_value",
    // arrays and set-returning
    "generate_series",
    "unnest",
    "array_length",
    "array_position",
    "array_to_string",
    "cardinality",
    // session and server information
    "exists",
    "version",
    "pg_is_in_recovery",
    "inet_server_port",
    "inet_server_addr",
    "current_setting",
    "current_user",
    "session_user",
    "current_database",
    "current_schema",
    "pg_backend_pid",
    "pg_sleep",
    "pg_last_wal_replay_lsn",
    "pg_last_wal_receive_lsn",
];

impl Classification {
    fn write(hint: Option<Hint>) -> Self {
        Classification {
            kind: StatementKind::Write,
            hint,
            functions: Vec::new(),
            session: Vec::new(),
        }
    }
}

/// Classify one simple-query string or one Parse message's SQL. Never panics, whatever the input.
///
/// See the [module documentation](self) for the rules. The result depends
/// only on `sql`, so it may be cached per SQL text.
#[must_use]
pub fn classify(sql: &str) -> Classification {
    let hint = leading_hint(sql);
    // Nothing below panics on its own; `catch_unwind` only guards against a
    // bug inside sqlparser. For routing a panic means "unsure", which means
    // primary.
    let tokens = std::panic::catch_unwind(|| tokenize(sql)).ok().flatten();
    let session = match &tokens {
        Some(tokens) => std::panic::catch_unwind(|| session_effects(sql, tokens))
            .unwrap_or_else(|_| untokenized_session_effects(sql)),
        None => untokenized_session_effects(sql),
    };
    let routing = tokens.and_then(|tokens| {
        std::panic::catch_unwind(move || classify_tokens(tokens))
            .ok()
            .flatten()
    });
    match routing {
        Some((kind, functions)) => Classification {
            kind,
            hint,
            functions,
            session,
        },
        None => Classification {
            session,
            ..Classification::write(hint)
        },
    }
}

/// Tokenize `sql` with locations, or `None` if it does not tokenize.
fn tokenize(sql: &str) -> Option<Vec<TokenWithSpan>> {
    Tokenizer::new(&PostgreSqlDialect {}, sql)
        .with_unescape(true)
        .tokenize_with_location()
        .ok()
}

/// Returns `None` for Write, otherwise the kind and (for Read) the sorted,
/// deduplicated functions to look up.
fn classify_tokens(tokens: Vec<TokenWithSpan>) -> Option<(StatementKind, Vec<String>)> {
    let dialect = PostgreSqlDialect {};
    if tokens.iter().all(|t| is_trivia(&t.token)) {
        // Empty, or only whitespace and comments: nothing will be executed.
        return Some((StatementKind::Read, Vec::new()));
    }
    if too_deep(&tokens) {
        // The parse tree could be deep enough to overflow the stack when it
        // is walked or dropped.
        return None;
    }
    if has_locking_clause(&tokens) {
        // Safety net independent of the parser, which (in 0.63) rejects
        // `FOR NO KEY UPDATE` / `FOR KEY SHARE`.
        return None;
    }

    let tokens = rewrite_table_commands(tokens)?;
    let statements = parse_statements(dialect, tokens).ok()?;

    let mut functions = Vec::new();
    let mut kinds = Vec::with_capacity(statements.len());
    for statement in &statements {
        match classify_statement(statement, &mut functions) {
            StatementKind::Write => return None,
            kind => kinds.push(kind),
        }
    }

    match kinds.as_slice() {
        [StatementKind::BeginReadOnly] => Some((StatementKind::BeginReadOnly, Vec::new())),
        _ if kinds.iter().all(|k| *k == StatementKind::Read) => {
            functions.sort_unstable();
            functions.dedup();
            Some((StatementKind::Read, functions))
        }
        // A READ ONLY begin mixed with other statements in one string.
        _ => None,
    }
}

/// Whitespace and comments (the tokenizer reports comments as whitespace).
fn is_trivia(token: &Token) -> bool {
    matches!(token, Token::Whitespace(_) | Token::EOF)
}

/// Longest run of tokens, summed over the open brackets, allowed before a
/// statement is declared too deep to parse safely. See [`too_deep`].
const MAX_CHAIN_TOKENS: usize = 4096;

/// True if the SQL might produce a parse tree deep enough to overflow a
/// small (2 MiB, tokio's default) thread stack while it is visited or
/// dropped.
///
/// The parser bounds its own recursion, but a long operator chain such as
/// `1+1+1+...` or `select 1 union select 1 union ...` is parsed iteratively
/// into a left-deep tree whose depth grows with its length, and walking or
/// dropping that tree recurses. Items separated by commas become siblings, not
/// nested nodes, so the bound counts the tokens since the last comma at each
/// bracket level, summed over the open brackets. Huge `IN (...)` lists,
/// `VALUES` lists and select lists stay well below it; only pathological
/// chains exceed it, and those go to the primary.
fn too_deep(tokens: &[TokenWithSpan]) -> bool {
    // Tokens since the last comma at each open bracket level; `outer` is the
    // sum of the enclosing levels' counts.
    let mut levels: Vec<usize> = vec![0];
    let mut outer = 0usize;
    for token in tokens {
        if is_trivia(&token.token) {
            continue;
        }
        let Some(current) = levels.last_mut() else {
            return true;
        };
        match token.token {
            Token::Comma => *current = 0,
            Token::SemiColon => {
                levels.clear();
                levels.push(0);
                outer = 0;
            }
            Token::LParen | Token::LBracket | Token::LBrace => {
                *current += 1;
                outer += *current;
                levels.push(0);
            }
            Token::RParen | Token::RBracket | Token::RBrace => {
                if levels.len() > 1 {
                    levels.pop();
                    if let Some(parent) = levels.last_mut() {
                        outer -= *parent;
                        *parent += 1;
                    }
                }
            }
            _ => *current += 1,
        }
        if outer + levels.last().copied().unwrap_or(0) > MAX_CHAIN_TOKENS {
            return true;
        }
    }
    false
}

/// True if the tokens contain `FOR UPDATE`, `FOR NO KEY UPDATE`, `FOR SHARE`
/// or `FOR KEY SHARE` as unquoted words (string literals and comments are
/// separate tokens, so they cannot trigger it).
fn has_locking_clause(tokens: &[TokenWithSpan]) -> bool {
    let words: Vec<Option<&str>> = tokens
        .iter()
        .filter(|t| !is_trivia(&t.token))
        .map(|t| match &t.token {
            Token::Word(w) if w.quote_style.is_none() => Some(w.value.as_str()),
            _ => None,
        })
        .collect();
    let is = |i: usize, word: &str| {
        words
            .get(i)
            .copied()
            .flatten()
            .is_some_and(|w| w.eq_ignore_ascii_case(word))
    };
    (0..words.len()).any(|i| {
        is(i, "for")
            && (is(i + 1, "update")
                || is(i + 1, "share")
                || (is(i + 1, "no") && is(i + 2, "key") && is(i + 3, "update"))
                || (is(i + 1, "key") && is(i + 2, "share")))
    })
}

/// Rewrite every `TABLE name` query command into the equivalent
/// `SELECT * FROM name`, or return `None` (Write) if a `TABLE` keyword is left
/// that does not start a query.
///
/// sqlparser 0.63 rejects `TABLE t` as a statement, and its `TABLE` query-body
/// parser always consumes three tokens, so `table t;checkpoint` would parse
/// as the lone query `TABLE t` and hide the `checkpoint`. Rewriting avoids
/// that parser path entirely. A `TABLE` keyword is treated as the query
/// command when it follows the start of input, `;`, `(`, `)`, a set operator
/// (with `ALL`/`DISTINCT`) or `EXPLAIN` and its options. Any other unquoted
/// `TABLE` (`CREATE TABLE`, `LOCK TABLE`, `GRANT ... ON TABLE`, ...) belongs
/// to a statement that is a write anyway, so it short-cuts to Write.
fn rewrite_table_commands(tokens: Vec<TokenWithSpan>) -> Option<Vec<TokenWithSpan>> {
    let is_table = |t: &TokenWithSpan| matches!(&t.token, Token::Word(w) if w.keyword == Keyword::TABLE && w.quote_style.is_none());
    if !tokens.iter().any(is_table) {
        return Some(tokens);
    }
    let mut out = Vec::with_capacity(tokens.len() + 4);
    let mut query_may_start = true;
    for token in tokens {
        if is_table(&token) {
            if !query_may_start {
                return None;
            }
            let span = token.span;
            for replacement in [
                Token::make_keyword("SELECT"),
                Token::Mul,
                Token::make_keyword("FROM"),
            ] {
                out.push(TokenWithSpan::new(replacement, span));
            }
            query_may_start = false;
            continue;
        }
        if !is_trivia(&token.token) {
            query_may_start = match &token.token {
                Token::SemiColon | Token::LParen | Token::RParen => true,
                Token::Word(w) if w.quote_style.is_none() => matches!(
                    w.keyword,
                    Keyword::UNION
                        | Keyword::INTERSECT
                        | Keyword::EXCEPT
                        | Keyword::ALL
                        | Keyword::DISTINCT
                        | Keyword::EXPLAIN
                        | Keyword::ANALYZE
                        | Keyword::VERBOSE
                ),
                _ => false,
            };
        }
        out.push(token);
    }
    Some(out)
}

/// Parse `;`-separated statements.
///
/// Differs from `Parser::parse_statements` in one way that matters here: a
/// statement must be followed by `;` or the end of input (0.63's loop stops
/// silently at an `END` keyword after a statement, which would drop the
/// delete of `select 1 end; delete from t`).
fn parse_statements(
    dialect: PostgreSqlDialect,
    tokens: Vec<TokenWithSpan>,
) -> Result<Vec<Statement>, ParserError> {
    let mut parser = Parser::new(&dialect).with_tokens_with_locations(tokens);
    let mut statements = Vec::new();
    loop {
        while parser.consume_token(&Token::SemiColon) {}
        if parser.peek_token_ref().token == Token::EOF {
            return Ok(statements);
        }
        statements.push(parser.parse_statement()?);
        let next = parser.peek_token_ref();
        if !matches!(next.token, Token::SemiColon | Token::EOF) {
            return parser.expected_ref("end of statement", next);
        }
    }
}

/// Classify one parsed top-level statement, appending the functions a read
/// calls to `functions`.
fn classify_statement(statement: &Statement, functions: &mut Vec<String>) -> StatementKind {
    match statement {
        Statement::Query(query) => classify_query(query, functions),
        Statement::ShowVariable { .. } => StatementKind::Read,
        // EXPLAIN without ANALYZE would not execute a write, but treating it
        // like its target keeps the rule simple and errs towards the primary.
        Statement::Explain {
            describe_alias: DescribeAlias::Explain,
            query_plan: false,
            estimate: false,
            statement,
            ..
        } => match classify_statement(statement, functions) {
            StatementKind::Read => StatementKind::Read,
            _ => StatementKind::Write,
        },
        Statement::Copy {
            source,
            to: true,
            target: CopyTarget::Stdout,
            ..
        } => match source {
            CopySource::Table { .. } => StatementKind::Read,
            CopySource::Query(query) => classify_query(query, functions),
        },
        Statement::StartTransaction {
            modes,
            modifier: None,
            statements,
            exception: None,
            has_end_keyword: false,
            ..
        } if statements.is_empty() => {
            let read_only = modes.contains(&TransactionMode::AccessMode(
                TransactionAccessMode::ReadOnly,
            ));
            let read_write = modes.contains(&TransactionMode::AccessMode(
                TransactionAccessMode::ReadWrite,
            ));
            if read_only && !read_write {
                StatementKind::BeginReadOnly
            } else {
                StatementKind::Write
            }
        }
        _ => StatementKind::Write,
    }
}

/// Classify a query (and everything nested in it) as Read or Write.
fn classify_query(query: &Query, functions: &mut Vec<String>) -> StatementKind {
    let mut visitor = ReadChecker { functions };
    match query.visit(&mut visitor) {
        ControlFlow::Continue(()) => StatementKind::Read,
        ControlFlow::Break(()) => StatementKind::Write,
    }
}

/// Walks a query; breaks as soon as anything makes it a write, and records
/// the functions that need a volatility lookup.
struct ReadChecker<'a> {
    functions: &'a mut Vec<String>,
}

impl ReadChecker<'_> {
    /// Handle one called function: break if it is a known writer, skip it if
    /// it is known safe, record it otherwise.
    fn call(&mut self, name: &ObjectName) -> ControlFlow<()> {
        let mut parts = Vec::with_capacity(name.0.len());
        for part in &name.0 {
            match part {
                ObjectNamePart::Identifier(ident) => parts.push(ident),
                // Dialect-specific computed name: not PostgreSQL, be safe.
                ObjectNamePart::Function(_) => return ControlFlow::Break(()),
            }
        }
        let Some((last, qualifiers)) = parts.split_last() else {
            return ControlFlow::Break(());
        };
        let last_raw = last.value.as_str();
        if is_write_function(last_raw) {
            return ControlFlow::Break(());
        }

        let normalize = |ident: &sqlparser::ast::Ident| {
            if ident.quote_style.is_some() {
                ident.value.clone()
            } else {
                ident.value.to_ascii_lowercase()
            }
        };
        let last_name = normalize(last);
        let builtin_scope = match qualifiers {
            [] => true,
            [schema] => normalize(schema) == "pg_catalog",
            _ => false,
        };
        if builtin_scope && SAFE_FUNCTIONS.contains(&last_name.as_str()) {
            return ControlFlow::Continue(());
        }

        let mut full = String::new();
        for qualifier in qualifiers {
            full.push_str(&normalize(qualifier));
            full.push('.');
        }
        full.push_str(&last_name);
        self.functions.push(full);
        ControlFlow::Continue(())
    }
}

/// Case-insensitive match against [`WRITE_FUNCTIONS`] and
/// [`WRITE_FUNCTION_PREFIXES`].
fn is_write_function(name: &str) -> bool {
    WRITE_FUNCTIONS.iter().any(|f| name.eq_ignore_ascii_case(f))
        || WRITE_FUNCTION_PREFIXES.iter().any(|p| {
            name.get(..p.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(p))
        })
}

impl Visitor for ReadChecker<'_> {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        // Row locks need the primary. The other clauses are not PostgreSQL
        // syntax; if they ever parse, be safe.
        if !query.locks.is_empty()
            || query.for_clause.is_some()
            || query.settings.is_some()
            || query.format_clause.is_some()
            || !query.pipe_operators.is_empty()
        {
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, select: &Select) -> ControlFlow<()> {
        // SELECT ... INTO creates a table.
        if select.into.is_some() {
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_statement(&mut self, _statement: &Statement) -> ControlFlow<()> {
        // A statement nested in a query is INSERT/UPDATE/DELETE/MERGE in a
        // CTE or subquery: a data-modifying query.
        ControlFlow::Break(())
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
        match factor {
            // `FROM my_func(1)` parses as a table with arguments.
            TableFactor::Table {
                name,
                args: Some(_),
                ..
            }
            | TableFactor::Function { name, .. } => self.call(name),
            _ => ControlFlow::Continue(()),
        }
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        if let Expr::Function(function) = expr {
            self.call(&function.name)?;
        }
        ControlFlow::Continue(())
    }
}

// ---------------------------------------------------------------------------
// Session effects
// ---------------------------------------------------------------------------

/// Session-level advisory lock functions: the lock outlives the transaction.
/// The `_xact_` variants are released at transaction end and are not listed.
const SESSION_ADVISORY_LOCKS: &[&str] = &[
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
];

/// The session effects of a tokenized string, one per statement that has one.
fn session_effects(sql: &str, tokens: &[TokenWithSpan]) -> Vec<SessionEffect> {
    let mut locator = Locator::new(sql);
    let mut effects = Vec::new();
    for statement in split_statements(tokens) {
        let words: Vec<&TokenWithSpan> =
            statement.iter().filter(|t| !is_trivia(&t.token)).collect();
        if let Some(effect) = statement_effect(&words, statement, &mut locator) {
            effects.push(effect);
        }
    }
    effects
}

/// Split tokens into statements at `;`.
///
/// The one place where `;` does not end a statement is the body of a SQL
/// function written `CREATE FUNCTION ... BEGIN ATOMIC stmt; ... END`: the
/// statements inside belong to the `CREATE` (they run when the function is
/// called, not now), so they stay part of it until the `END` that starts a
/// `;`-separated piece.
fn split_statements(tokens: &[TokenWithSpan]) -> Vec<&[TokenWithSpan]> {
    let mut statements = Vec::new();
    let mut start = 0;
    // First word of the current statement and of the current `;` piece.
    let mut statement_first: Option<&Token> = None;
    let mut piece_first: Option<&Token> = None;
    let mut previous: Option<&Token> = None;
    let mut atomic = false;
    for (i, token) in tokens.iter().enumerate() {
        if token.token == Token::SemiColon {
            let body_ends = piece_first.is_some_and(|t| is_kw(t, "END"));
            piece_first = None;
            previous = None;
            if atomic && !body_ends {
                continue;
            }
            atomic = false;
            statements.push(tokens.get(start..i).unwrap_or_default());
            start = i + 1;
            statement_first = None;
            continue;
        }
        if is_trivia(&token.token) {
            continue;
        }
        let token = &token.token;
        statement_first.get_or_insert(token);
        piece_first.get_or_insert(token);
        if statement_first.is_some_and(|t| is_kw(t, "CREATE")) {
            if previous.is_some_and(|p| is_kw(p, "BEGIN")) && is_kw(token, "ATOMIC") {
                atomic = true;
            } else if previous.is_some_and(|p| is_kw(p, "ATOMIC")) && is_kw(token, "END") {
                // `BEGIN ATOMIC END`: an empty body.
                atomic = false;
            }
        }
        previous = Some(token);
    }
    statements.push(tokens.get(start..).unwrap_or_default());
    statements
}

/// The effect of one statement. `words` are its non-trivia tokens, `tokens`
/// all of them.
fn statement_effect(
    words: &[&TokenWithSpan],
    tokens: &[TokenWithSpan],
    locator: &mut Locator<'_>,
) -> Option<SessionEffect> {
    let first = &words.first()?.token;
    if is_kw(first, "SET") {
        set_effect(words, locator)
    } else if is_kw(first, "RESET") {
        Some(reset_effect(words))
    } else if is_kw(first, "DISCARD") {
        Some(discard_effect(words))
    } else if is_kw(first, "DEALLOCATE") {
        Some(deallocate_effect(words))
    } else if is_kw(first, "UNLISTEN") {
        Some(SessionEffect::Unlisten)
    } else if let Some(effect) = savepoint_effect(words) {
        Some(effect)
    } else {
        pin_effect(words, tokens).map(SessionEffect::Pin)
    }
}

/// An unquoted word equal to `keyword`, ignoring ASCII case.
fn is_kw(token: &Token, keyword: &str) -> bool {
    matches!(token, Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case(keyword))
}

/// `=` or `TO`: the assignment in `SET name = value`.
fn is_assign(token: &Token) -> bool {
    *token == Token::Eq || is_kw(token, "TO")
}

/// A string constant PostgreSQL accepts where its grammar says `Sconst`.
fn is_string(token: &Token) -> bool {
    matches!(
        token,
        Token::SingleQuotedString(_)
            | Token::EscapedStringLiteral(_)
            | Token::DollarQuotedString(_)
            | Token::UnicodeStringLiteral(_)
    )
}

/// An identifier or keyword, unquoted or double-quoted (and not empty).
fn is_word(token: &Token) -> bool {
    matches!(token, Token::Word(w) if w.quote_style.is_none() || (w.quote_style == Some('"') && !w.value.is_empty()))
}

/// One `var_value` of PostgreSQL's `SET` grammar: a string, a word
/// (identifier, keyword, `on`/`true`/...) or an optionally signed number.
/// `DEFAULT` is not a value (it is handled before, and is a syntax error in a
/// list).
fn is_var_value(item: &[&TokenWithSpan]) -> bool {
    match item {
        [one] => {
            is_string(&one.token)
                || (is_word(&one.token) && !is_kw(&one.token, "DEFAULT"))
                || matches!(one.token, Token::Number(..))
        }
        [sign, number] => {
            matches!(sign.token, Token::Plus | Token::Minus)
                && matches!(number.token, Token::Number(..))
        }
        _ => false,
    }
}

/// True if `words` is a non-empty comma-separated list of [`is_var_value`].
fn is_var_list(words: &[&TokenWithSpan]) -> bool {
    !words.is_empty() && words.split(|t| t.token == Token::Comma).all(is_var_value)
}

/// Parse a parameter name (`name`, `a.b`, `"A".b`) at the start of `words`:
/// the lower-cased name and the number of tokens it used. `None` unless every
/// part is a valid parameter-name part (see [`SessionEffect::Set`]).
fn guc_name(words: &[&TokenWithSpan]) -> Option<(String, usize)> {
    let mut name = String::new();
    let mut used = 0;
    loop {
        let Token::Word(word) = &words.get(used)?.token else {
            return None;
        };
        if !matches!(word.quote_style, None | Some('"')) {
            return None;
        }
        let mut chars = word.value.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || !c.is_ascii());
        if !first_ok
            || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$' || !c.is_ascii())
        {
            return None;
        }
        name.push_str(&word.value.to_ascii_lowercase());
        used += 1;
        if words.get(used).is_some_and(|t| t.token == Token::Period) {
            name.push('.');
            used += 1;
        } else {
            return Some((name, used));
        }
    }
}

/// Effect of a statement starting with `SET`, following PostgreSQL's
/// `VariableSetStmt` and `ConstraintsSetStmt` grammar. `None` only for
/// `SET name FROM CURRENT`, which keeps the value the client already has.
fn set_effect(words: &[&TokenWithSpan], locator: &mut Locator<'_>) -> Option<SessionEffect> {
    const UNSUPPORTED: SessionEffect = SessionEffect::Unsupported("SET");
    let mut rest = words.get(1..).unwrap_or_default();

    // A keyword followed by `=`, `TO` or `.` is a parameter name, not syntax
    // (`SET local.x = 1`, `SET session = 1`, `SET time TO 1`).
    let is_syntax = |rest: &[&TokenWithSpan], keyword: &str| {
        rest.first().is_some_and(|t| is_kw(&t.token, keyword))
            && !rest
                .get(1)
                .is_some_and(|t| is_assign(&t.token) || t.token == Token::Period)
    };
    let second_is = |rest: &[&TokenWithSpan], keyword: &str| {
        rest.get(1).is_some_and(|t| is_kw(&t.token, keyword))
    };

    // SET LOCAL ... / SET SESSION ...
    if is_syntax(rest, "LOCAL") && rest.len() > 1 {
        return Some(SessionEffect::SetLocal);
    }
    if is_syntax(rest, "SESSION")
        && rest.len() > 1
        && !second_is(rest, "AUTHORIZATION")
        && !second_is(rest, "CHARACTERISTICS")
    {
        rest = rest.get(1..).unwrap_or_default();
    }

    if is_syntax(rest, "TRANSACTION") || is_syntax(rest, "CONSTRAINTS") {
        return Some(SessionEffect::SetLocal);
    }
    if is_syntax(rest, "SESSION") && second_is(rest, "CHARACTERISTICS") {
        return Some(SessionEffect::Unsupported("SET SESSION CHARACTERISTICS"));
    }
    if is_syntax(rest, "SESSION") && second_is(rest, "AUTHORIZATION") {
        return Some(match rest.get(2..).unwrap_or_default() {
            [value] if is_kw(&value.token, "DEFAULT") => {
                SessionEffect::Reset("session_authorization".to_owned())
            }
            value @ [one] if is_string(&one.token) || is_word(&one.token) => {
                set_value("session_authorization", value, locator)
            }
            _ => UNSUPPORTED,
        });
    }
    if is_syntax(rest, "TIME") && second_is(rest, "ZONE") {
        return Some(time_zone_effect(rest.get(2..).unwrap_or_default(), locator));
    }
    if is_syntax(rest, "NAMES") {
        return Some(match rest.get(1..).unwrap_or_default() {
            [] => SessionEffect::Reset("client_encoding".to_owned()),
            [value] if is_kw(&value.token, "DEFAULT") => {
                SessionEffect::Reset("client_encoding".to_owned())
            }
            value @ [one] if is_string(&one.token) => set_value("client_encoding", value, locator),
            _ => UNSUPPORTED,
        });
    }
    if is_syntax(rest, "SCHEMA") {
        return Some(match rest.get(1..).unwrap_or_default() {
            value @ [one] if is_string(&one.token) => set_value("search_path", value, locator),
            _ => UNSUPPORTED,
        });
    }
    if is_syntax(rest, "ROLE") {
        return Some(match rest.get(1..).unwrap_or_default() {
            value @ [one]
                if is_string(&one.token)
                    || (is_word(&one.token) && !is_kw(&one.token, "DEFAULT")) =>
            {
                set_value("role", value, locator)
            }
            _ => UNSUPPORTED,
        });
    }
    if is_syntax(rest, "XML") && second_is(rest, "OPTION") {
        return Some(match rest.get(2..).unwrap_or_default() {
            value @ [one] if is_kw(&one.token, "DOCUMENT") || is_kw(&one.token, "CONTENT") => {
                set_value("xmloption", value, locator)
            }
            _ => UNSUPPORTED,
        });
    }

    // Generic: SET name {TO|=} {DEFAULT | value [, ...]} / SET name FROM CURRENT.
    let Some((name, used)) = guc_name(rest) else {
        return Some(UNSUPPORTED);
    };
    match rest.get(used..).unwrap_or_default() {
        [from, current] if is_kw(&from.token, "FROM") && is_kw(&current.token, "CURRENT") => None,
        [assign, value] if is_assign(&assign.token) && is_kw(&value.token, "DEFAULT") => {
            Some(SessionEffect::Reset(name))
        }
        [assign, value @ ..] if is_assign(&assign.token) && is_var_list(value) => {
            Some(set_value(&name, value, locator))
        }
        _ => Some(UNSUPPORTED),
    }
}

/// Effect of `SET TIME ZONE <value>` (`value` is what follows `ZONE`).
fn time_zone_effect(value: &[&TokenWithSpan], locator: &mut Locator<'_>) -> SessionEffect {
    match value {
        // Both mean "the server's default time zone" (gram.y: VAR_SET_DEFAULT).
        [one] if is_kw(&one.token, "DEFAULT") || is_kw(&one.token, "LOCAL") => {
            SessionEffect::Reset("timezone".to_owned())
        }
        _ if is_var_value(value) => set_value("timezone", value, locator),
        // INTERVAL '-08:00' HOUR TO MINUTE, INTERVAL(2) '...'.
        [interval, tail @ ..]
            if is_kw(&interval.token, "INTERVAL")
                && tail.iter().any(|t| is_string(&t.token))
                && tail.iter().all(|t| {
                    is_string(&t.token)
                        || is_word(&t.token)
                        || matches!(t.token, Token::Number(..) | Token::LParen | Token::RParen)
                }) =>
        {
            set_value("timezone", value, locator)
        }
        _ => SessionEffect::Unsupported("SET"),
    }
}

/// `Set { name, value }` with the value text cut from the input, or
/// `Unsupported("SET")` if that text cannot be recovered exactly.
fn set_value(name: &str, value: &[&TokenWithSpan], locator: &mut Locator<'_>) -> SessionEffect {
    match source_text(value, locator) {
        Some(value) => SessionEffect::Set {
            name: name.to_owned(),
            value: value.to_owned(),
        },
        None => SessionEffect::Unsupported("SET"),
    }
}

/// The input text from the start of the first token to the end of the last,
/// checked by tokenizing it again: it must give back exactly the same
/// non-trivia tokens.
fn source_text<'a>(tokens: &[&TokenWithSpan], locator: &mut Locator<'a>) -> Option<&'a str> {
    let (first, last) = (tokens.first()?, tokens.last()?);
    let start = locator.offset(first.span.start)?;
    let end = locator.offset(last.span.end)?;
    let text = locator.sql.get(start..end)?;
    let again = tokenize(text)?;
    let mut again = again.iter().filter(|t| !is_trivia(&t.token));
    let same = tokens
        .iter()
        .all(|t| again.next().is_some_and(|a| a.token == t.token))
        && again.next().is_none();
    same.then_some(text)
}

/// Converts the tokenizer's 1-based line/column locations (columns count
/// characters, lines end at `\n`) into byte offsets. Walks forward from the
/// last answer, so converting a string's locations in order is linear.
struct Locator<'a> {
    sql: &'a str,
    byte: usize,
    line: u64,
    column: u64,
}

impl<'a> Locator<'a> {
    fn new(sql: &'a str) -> Self {
        Locator {
            sql,
            byte: 0,
            line: 1,
            column: 1,
        }
    }

    fn offset(&mut self, location: Location) -> Option<usize> {
        let target = (location.line, location.column);
        if target < (self.line, self.column) {
            *self = Locator::new(self.sql);
        }
        while (self.line, self.column) < target {
            let c = self.sql.get(self.byte..)?.chars().next()?;
            self.byte += c.len_utf8();
            if c == '\n' {
                self.line += 1;
                self.column = 1;
            } else {
                self.column += 1;
            }
        }
        ((self.line, self.column) == target).then_some(self.byte)
    }
}

/// Effect of a statement starting with `RESET`.
fn reset_effect(words: &[&TokenWithSpan]) -> SessionEffect {
    let rest = words.get(1..).unwrap_or_default();
    let is = |i: usize, keyword: &str| rest.get(i).is_some_and(|t| is_kw(&t.token, keyword));
    match rest.len() {
        1 if is(0, "ALL") => return SessionEffect::ResetAll,
        2 if is(0, "TIME") && is(1, "ZONE") => return SessionEffect::Reset("timezone".to_owned()),
        2 if is(0, "SESSION") && is(1, "AUTHORIZATION") => {
            return SessionEffect::Reset("session_authorization".to_owned())
        }
        3 if is(0, "TRANSACTION") && is(1, "ISOLATION") && is(2, "LEVEL") => {
            return SessionEffect::SetLocal
        }
        _ => {}
    }
    match guc_name(rest) {
        Some((name, used)) if used == rest.len() => SessionEffect::Reset(name),
        _ => SessionEffect::Unsupported("RESET"),
    }
}

/// Effect of a statement starting with `DISCARD`.
fn discard_effect(words: &[&TokenWithSpan]) -> SessionEffect {
    match words.get(1..).unwrap_or_default() {
        [what] if is_kw(&what.token, "ALL") => SessionEffect::DiscardAll,
        [what]
            if ["PLANS", "SEQUENCES", "TEMP", "TEMPORARY"]
                .iter()
                .any(|k| is_kw(&what.token, k)) =>
        {
            SessionEffect::DiscardOther
        }
        _ => SessionEffect::Unsupported("DISCARD"),
    }
}

/// A savepoint name: lower-cased unless quoted.
fn object_name(token: &Token) -> Option<String> {
    match token {
        Token::Word(w) if w.quote_style.is_none() => Some(w.value.to_ascii_lowercase()),
        Token::Word(w) if w.quote_style == Some('"') && !w.value.is_empty() => {
            Some(w.value.clone())
        }
        _ => None,
    }
}

/// `SAVEPOINT`, `ROLLBACK ... TO` and `RELEASE` statements.
fn savepoint_effect(words: &[&TokenWithSpan]) -> Option<SessionEffect> {
    let (first, rest) = words.split_first()?;
    if is_kw(&first.token, "SAVEPOINT") {
        return match rest {
            [name] => object_name(&name.token).map(SessionEffect::Savepoint),
            _ => None,
        };
    }
    if is_kw(&first.token, "RELEASE") {
        let rest = match rest {
            [kw, rest @ ..] if is_kw(&kw.token, "SAVEPOINT") => rest,
            rest => rest,
        };
        return match rest {
            [name] => object_name(&name.token).map(SessionEffect::ReleaseSavepoint),
            _ => None,
        };
    }
    if is_kw(&first.token, "ROLLBACK") || is_kw(&first.token, "ABORT") {
        let rest = match rest {
            [kw, rest @ ..] if is_kw(&kw.token, "WORK") || is_kw(&kw.token, "TRANSACTION") => rest,
            rest => rest,
        };
        let rest = match rest {
            [to, rest @ ..] if is_kw(&to.token, "TO") => rest,
            _ => return None,
        };
        let rest = match rest {
            [kw, rest @ ..] if is_kw(&kw.token, "SAVEPOINT") => rest,
            rest => rest,
        };
        return match rest {
            [name] => object_name(&name.token).map(SessionEffect::RollbackToSavepoint),
            _ => None,
        };
    }
    None
}

/// Effect of a statement starting with `DEALLOCATE`.
fn deallocate_effect(words: &[&TokenWithSpan]) -> SessionEffect {
    let rest = match words.get(1..).unwrap_or_default() {
        [prepare, rest @ ..] if is_kw(&prepare.token, "PREPARE") && !rest.is_empty() => rest,
        rest => rest,
    };
    match rest {
        [all] if is_kw(&all.token, "ALL") => SessionEffect::DeallocateAll,
        [name] => match &name.token {
            Token::Word(w) if w.quote_style.is_none() => {
                SessionEffect::Deallocate(w.value.to_ascii_lowercase())
            }
            Token::Word(w) if w.quote_style == Some('"') && !w.value.is_empty() => {
                SessionEffect::Deallocate(w.value.clone())
            }
            _ => SessionEffect::Unsupported("DEALLOCATE"),
        },
        _ => SessionEffect::Unsupported("DEALLOCATE"),
    }
}

/// The reason a statement pins the client, if any.
///
/// Decided on the parsed statement when it parses; when it does not (or is
/// too deep to parse safely), on its tokens. Statements that cannot pin are
/// not parsed at all.
fn pin_effect(words: &[&TokenWithSpan], tokens: &[TokenWithSpan]) -> Option<PinReason> {
    if names_pg_temp_object(words) {
        return Some(PinReason::TempTable);
    }
    if creates_routine(words) {
        // The body runs when the function is called, not now.
        return None;
    }
    if !may_pin(words) {
        return None;
    }
    match parse_one(tokens) {
        Some(statement) => match statement.visit(&mut PinFinder) {
            ControlFlow::Break(reason) => Some(reason),
            ControlFlow::Continue(()) => None,
        },
        None => token_pin(words),
    }
}

/// Cheap filter: only statements with one of these words can pin.
fn may_pin(words: &[&TokenWithSpan]) -> bool {
    let first = words.first().map(|t| &t.token);
    first.is_some_and(|t| is_kw(t, "LISTEN") || is_kw(t, "PREPARE") || is_kw(t, "DECLARE"))
        || words.iter().any(|t| {
            is_kw(&t.token, "TEMP")
                || is_kw(&t.token, "TEMPORARY")
                || is_session_advisory_word(&t.token)
        })
}

/// A word naming a session-level advisory lock function.
fn is_session_advisory_word(token: &Token) -> bool {
    matches!(token, Token::Word(w) if SESSION_ADVISORY_LOCKS.iter().any(|f| w.value.eq_ignore_ascii_case(f)))
}

/// `CREATE [OR REPLACE] FUNCTION|PROCEDURE ...`.
fn creates_routine(words: &[&TokenWithSpan]) -> bool {
    let mut rest = words.iter().map(|t| &t.token);
    rest.next().is_some_and(|t| is_kw(t, "CREATE"))
        && rest
            .find(|t| !is_kw(t, "OR") && !is_kw(t, "REPLACE"))
            .is_some_and(|t| is_kw(t, "FUNCTION") || is_kw(t, "PROCEDURE"))
}

/// A `CREATE` statement mentioning `pg_temp.something` (an object created in,
/// or a view over, the session's temporary schema), or `INTO pg_temp.x`.
fn names_pg_temp_object(words: &[&TokenWithSpan]) -> bool {
    let is_create = words.first().is_some_and(|t| is_kw(&t.token, "CREATE"));
    words.windows(3).any(|w| match w {
        [before, schema, dot] => {
            matches!(&schema.token, Token::Word(s) if s.value.eq_ignore_ascii_case("pg_temp"))
                && dot.token == Token::Period
                && (is_create || is_kw(&before.token, "INTO"))
        }
        _ => false,
    })
}

/// Parse one statement's tokens, or `None` if they are not exactly one
/// statement, could nest too deeply to walk safely, or the parser panics.
fn parse_one(tokens: &[TokenWithSpan]) -> Option<Statement> {
    if too_deep(tokens) {
        return None;
    }
    std::panic::catch_unwind(|| {
        let dialect = PostgreSqlDialect {};
        let mut parser = Parser::new(&dialect).with_tokens_with_locations(tokens.to_vec());
        let statement = parser.parse_statement().ok()?;
        (parser.peek_token_ref().token == Token::EOF).then_some(statement)
    })
    .ok()
    .flatten()
}

/// Finds the first pin reason in a parsed statement.
struct PinFinder;

impl PinFinder {
    fn call(name: &ObjectName) -> ControlFlow<PinReason> {
        match name.0.last() {
            Some(ObjectNamePart::Identifier(ident))
                if SESSION_ADVISORY_LOCKS
                    .iter()
                    .any(|f| ident.value.eq_ignore_ascii_case(f)) =>
            {
                ControlFlow::Break(PinReason::AdvisoryLock)
            }
            _ => ControlFlow::Continue(()),
        }
    }
}

impl Visitor for PinFinder {
    type Break = PinReason;

    fn pre_visit_statement(&mut self, statement: &Statement) -> ControlFlow<PinReason> {
        let reason = match statement {
            Statement::Prepare { .. } => Some(PinReason::Prepare),
            Statement::LISTEN { .. } => Some(PinReason::Listen),
            Statement::Declare { stmts } if stmts.iter().any(|d| d.hold == Some(true)) => {
                Some(PinReason::HoldCursor)
            }
            Statement::CreateTable(table) if table.temporary => Some(PinReason::TempTable),
            Statement::CreateView(view) if view.temporary => Some(PinReason::TempTable),
            Statement::CreateSequence {
                temporary: true, ..
            } => Some(PinReason::TempTable),
            _ => None,
        };
        match reason {
            Some(reason) => ControlFlow::Break(reason),
            None => ControlFlow::Continue(()),
        }
    }

    fn pre_visit_select(&mut self, select: &Select) -> ControlFlow<PinReason> {
        if select.into.as_ref().is_some_and(|into| into.temporary) {
            return ControlFlow::Break(PinReason::TempTable);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<PinReason> {
        match factor {
            TableFactor::Table {
                name,
                args: Some(_),
                ..
            }
            | TableFactor::Function { name, .. } => Self::call(name),
            _ => ControlFlow::Continue(()),
        }
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<PinReason> {
        match expr {
            Expr::Function(function) => Self::call(&function.name),
            _ => ControlFlow::Continue(()),
        }
    }
}

/// Pin detection on tokens, for statements that do not parse. Errs towards
/// pinning: a needless pin only costs pooling for that client.
fn token_pin(words: &[&TokenWithSpan]) -> Option<PinReason> {
    let token = |i: usize| words.get(i).map(|t| &t.token);
    let is = |i: usize, keyword: &str| token(i).is_some_and(|t| is_kw(t, keyword));
    if is(0, "LISTEN") {
        return Some(PinReason::Listen);
    }
    if is(0, "PREPARE") {
        // `PREPARE TRANSACTION 'gid'` is two-phase commit, not a statement.
        let two_phase = is(1, "TRANSACTION") && token(2).is_some_and(is_string);
        return (!two_phase).then_some(PinReason::Prepare);
    }
    if is(0, "DECLARE") {
        // The options, WITH HOLD among them, come before `FOR query`.
        let options = (1..words.len()).take_while(|&i| !is(i, "FOR"));
        let hold = options
            .into_iter()
            .any(|i| is(i, "WITH") && is(i + 1, "HOLD"));
        return hold.then_some(PinReason::HoldCursor);
    }
    for i in 0..words.len() {
        // CREATE [OR REPLACE] [GLOBAL|LOCAL] TEMP|TEMPORARY ...
        // ... INTO [GLOBAL|LOCAL] TEMP|TEMPORARY ... (not INSERT/MERGE INTO)
        let creates = is(i, "CREATE");
        let selects_into = is(i, "INTO") && !(i > 0 && (is(i - 1, "INSERT") || is(i - 1, "MERGE")));
        if creates || selects_into {
            let temp = (i + 1..words.len())
                .find(|&j| {
                    !["OR", "REPLACE", "GLOBAL", "LOCAL"]
                        .iter()
                        .any(|k| is(j, k))
                })
                .is_some_and(|j| is(j, "TEMP") || is(j, "TEMPORARY"));
            if temp {
                return Some(PinReason::TempTable);
            }
        }
        if token(i).is_some_and(is_session_advisory_word) && token(i + 1) == Some(&Token::LParen) {
            return Some(PinReason::AdvisoryLock);
        }
    }
    None
}

/// Session effects of a string the tokenizer rejects (an unterminated quote
/// or comment, ...). PostgreSQL rejects such a string as a whole, so usually
/// nothing runs; to stay on the safe side the first statement's leading word
/// still decides: a SET-like statement is `Unsupported` (never guessed),
/// `LISTEN`/`PREPARE`/`DECLARE ... HOLD` pin.
fn untokenized_session_effects(sql: &str) -> Vec<SessionEffect> {
    let Some(rest) = skip_leading_comments(sql) else {
        return Vec::new();
    };
    let end = rest
        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '$'))
        .unwrap_or(rest.len());
    let word = rest.get(..end).unwrap_or_default().to_ascii_lowercase();
    let effect = match word.as_str() {
        "set" => SessionEffect::Unsupported("SET"),
        "reset" => SessionEffect::Unsupported("RESET"),
        "discard" => SessionEffect::Unsupported("DISCARD"),
        "deallocate" => SessionEffect::Unsupported("DEALLOCATE"),
        "unlisten" => SessionEffect::Unlisten,
        "listen" => SessionEffect::Pin(PinReason::Listen),
        "prepare" => SessionEffect::Pin(PinReason::Prepare),
        "declare" if rest.to_ascii_lowercase().contains("hold") => {
            SessionEffect::Pin(PinReason::HoldCursor)
        }
        _ => return Vec::new(),
    };
    vec![effect]
}

/// `sql` without leading whitespace and comments (block comments nest, as in
/// PostgreSQL), or `None` if a comment is not terminated.
fn skip_leading_comments(sql: &str) -> Option<&str> {
    let mut rest = sql;
    loop {
        rest = rest.trim_start();
        if let Some(inner) = rest.strip_prefix("--") {
            rest = inner.find('\n').and_then(|end| inner.get(end..))?;
        } else if rest.starts_with("/*") {
            let mut depth = 0usize;
            let mut i = 0;
            loop {
                let tail = rest.get(i..)?;
                if tail.starts_with("/*") {
                    depth += 1;
                    i += 2;
                } else if tail.starts_with("*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += tail.chars().next()?.len_utf8();
                }
            }
            rest = rest.get(i..)?;
        } else {
            return Some(rest);
        }
    }
}

/// The hint in the leading comments of `sql`, if any. Leading whitespace and
/// comments are skipped until the first hint or the first other text.
fn leading_hint(sql: &str) -> Option<Hint> {
    let mut rest = sql;
    loop {
        rest = rest.trim_start();
        let (body, after) = if let Some(inner) = rest.strip_prefix("/*") {
            let end = inner.find("*/")?;
            (inner.get(..end)?, inner.get(end + 2..)?)
        } else if let Some(inner) = rest.strip_prefix("--") {
            let end = inner.find('\n').unwrap_or(inner.len());
            (inner.get(..end)?, inner.get(end..)?)
        } else {
            return None;
        };
        if let Some(hint) = parse_hint(body) {
            return Some(hint);
        }
        rest = after;
    }
}

/// Parse a comment body such as ` pgway:replica ` (case-insensitive, spaces
/// allowed around the words and the colon).
fn parse_hint(body: &str) -> Option<Hint> {
    let body = body.trim();
    let prefix = "pgway";
    if !body.get(..prefix.len())?.eq_ignore_ascii_case(prefix) {
        return None;
    }
    let target = body
        .get(prefix.len()..)?
        .trim_start()
        .strip_prefix(':')?
        .trim();
    if target.eq_ignore_ascii_case("primary") {
        Some(Hint::Primary)
    } else if target.eq_ignore_ascii_case("replica") {
        Some(Hint::Replica)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(sql: &str) -> StatementKind {
        classify(sql).kind
    }

    fn assert_read(sql: &str, functions: &[&str]) {
        let c = classify(sql);
        assert_eq!(c.kind, StatementKind::Read, "expected Read: {sql}");
        assert_eq!(c.functions, functions, "functions of: {sql}");
    }

    fn assert_write(sql: &str) {
        let c = classify(sql);
        assert_eq!(c.kind, StatementKind::Write, "expected Write: {sql}");
        assert!(
            c.functions.is_empty(),
            "Write must have no functions: {sql}"
        );
    }

    #[test]
    fn simple_reads() {
        assert_read("select 1", &[]);
        assert_read("SELECT * FROM accounts WHERE id = $1", &[]);
        assert_read("table t", &[]);
        assert_read("TABLE public.t", &[]);
        assert_read("table t union select 1", &[]);
        assert_read("select 1 union all table t", &[]);
        assert_read("table t order by a limit 5", &[]);
        assert_read("with x as (table t) select * from x", &[]);
        assert_read("explain table t", &[]);
        assert_read("copy (table t) to stdout", &[]);
        assert_read("table t; table u", &[]);
        assert_read("values (1),(2)", &[]);
        assert_read("(select 1)", &[]);
        assert_read("select 1 union select 2 except select 3", &[]);
        assert_read("show search_path", &[]);
        assert_read("SHOW ALL", &[]);
        assert_read("show transaction isolation level", &[]);
        assert_read("select 'for update', \"for\" from t", &[]);
        assert_read("select substring(a from 1 for 2) from t", &[]);
    }

    #[test]
    fn empty_and_comments_are_read() {
        assert_read("", &[]);
        assert_read("   \n\t ", &[]);
        assert_read("-- nothing", &[]);
        assert_read("/* nothing */", &[]);
        assert_read(";", &[]);
        assert_read(" ; ; ", &[]);
    }

    #[test]
    fn ctes() {
        assert_read("with x as (select 1) select * from x", &[]);
        assert_read(
            "with recursive r(n) as (select 1 union all select n + 1 from r where n < 10) select * from r",
            &[],
        );
        assert_write("with x as (insert into t values (1) returning *) select * from x");
        assert_write("with x as (update t set a = 1 returning *) select * from x");
        assert_write("with x as (delete from t returning *) select * from x");
        assert_write("with x as (select 1) insert into t select * from x");
        assert_write("with x as (select nextval('s')) select * from x");
    }

    #[test]
    fn locking_reads() {
        assert_write("select * from t for update");
        assert_write("select * from t for no key update");
        assert_write("select * from t for share");
        assert_write("select * from t for key share");
        assert_write("select * from t for update skip locked");
        assert_write("select * from t for no key update skip locked");
        assert_write("select * from t for update of t nowait");
        assert_write("SELECT * FROM t FOR\n  NO /* x */ KEY UPDATE");
        assert_write("select * from (select * from t for update) s");
        assert_write("select * from t where a in (select a from u for share)");
    }

    /// The AST checks must hold on their own, without the textual
    /// locking-clause safety net that runs before parsing.
    #[test]
    fn ast_checks_without_safety_net() {
        for sql in [
            "select * from t for update",
            "select * from t for share nowait",
            "select * from (select * from t for update) s",
            "with x as (select * from t for update) select * from x",
            "select * from t where a in (select a from u for share)",
        ] {
            let statements = Parser::parse_sql(&PostgreSqlDialect {}, sql).unwrap();
            let mut functions = Vec::new();
            assert_eq!(
                classify_statement(&statements[0], &mut functions),
                StatementKind::Write,
                "{sql}"
            );
        }
    }

    #[test]
    fn select_into() {
        assert_write("select * into t2 from t");
        assert_write("select * into temporary t2 from t");
    }

    #[test]
    fn write_functions() {
        assert_write("select nextval('s')");
        assert_write("SELECT pg_catalog.nextval('s')");
        assert_write("SELECT NEXTVAL('s')");
        assert_write("select currval('s'), lastval()");
        assert_write("select setval('s', 1)");
        assert_write("select pg_advisory_lock(1)");
        assert_write("select pg_try_advisory_xact_lock(1)");
        assert_write("select txid_current()");
        assert_write("select pg_current_xact_id()");
        assert_write("select pg_current_wal_lsn()");
        assert_write("select set_config('a.b','c',false)");
        assert_write("select pg_notify('c','x')");
        assert_write("select * from dblink('x', 'select 1') as t(a int)");
        assert_write("select public.dblink_exec('x', 'delete from t')");
        assert_write("select lo_import('/tmp/x')");
        assert_write("select pg_terminate_backend(123)");
        assert_write("select 1 union select nextval('s')");
        assert_write("select * from t where id = (select nextval('s'))");
        assert_write("select coalesce(a, nextval('s')) from t");
        assert_write("select * from t order by nextval('s')");
        assert_write("select * from t limit (select nextval('s'))");
        assert_write("values (nextval('s'))");
        assert_write("select case when a then pg_advisory_lock(1) end from t");
        assert_write("select count(*) over (partition by nextval('s')) from t");
    }

    #[test]
    fn user_functions_are_reported() {
        assert_read(
            "select accounts.get_user_by_identifier_v1('x')",
            &["accounts.get_user_by_identifier_v1"],
        );
        assert_read("select * from my_func(1)", &["my_func"]);
        assert_read(
            "select count(*) from t where x in (select random())",
            &["random"],
        );
        assert_read("select My_Func(1), my_func(2), MY_FUNC(3)", &["my_func"]);
        assert_read("select \"MyFunc\"(1)", &["MyFunc"]);
        assert_read("select S.F(1)", &["s.f"]);
        assert_read(
            "select pg_catalog.count(*), pg_catalog.random()",
            &["pg_catalog.random"],
        );
        assert_read("select public.count(*) from t", &["public.count"]);
        assert_read("select * from t, lateral my_srf(t.a) s", &["my_srf"]);
        assert_read(
            "select * from t where exists (select 1 from u where g(u.a) = t.a)",
            &["g"],
        );
        assert_read(
            "select (select f1()) as x, upper(f2(a)) from t",
            &["f1", "f2"],
        );
        assert_read(
            "select a from t group by f(a) having h(count(*)) > 1",
            &["f", "h"],
        );
        assert_read("select a from t order by f(a) limit f2(3)", &["f", "f2"]);
        assert_read("select f(a)::text, cast(g(b) as int) from t", &["f", "g"]);
        assert_read(
            "select case when f(a) then g(b) else h(c) end from t",
            &["f", "g", "h"],
        );
        assert_read(
            "select count(*) filter (where f(x)) over w from t window w as (order by g(y))",
            &["f", "g"],
        );
        assert_read("values (f(1)), (g(2))", &["f", "g"]);
        assert_read("with x as (select f(1)) select * from x", &["f"]);
        assert_read("select * from generate_series(1, 3) with ordinality", &[]);
        assert_read(
            "select now(), current_timestamp, current_user, coalesce(a, 0), lower(b), count(*) from t",
            &[],
        );
        assert_read("select pg_sleep(1), pg_is_in_recovery()", &[]);
    }

    #[test]
    fn multi_statement() {
        assert_read("select 1; select 2", &[]);
        assert_read("select f(1); select g(2); select f(3);", &["f", "g"]);
        assert_write("select 1; insert into t values (1)");
        assert_write("insert into t values (1); select 1");
        assert_write("BEGIN READ ONLY; SELECT 1; COMMIT");
        assert_write("select 1 end; delete from t");
        assert_write("select 1; garbage !!");
    }

    #[test]
    fn transactions() {
        assert_write("begin");
        assert_write("BEGIN TRANSACTION");
        assert_write("start transaction");
        assert_write("begin read write");
        assert_write("begin read only, read write");
        assert_write("begin isolation level serializable");
        assert_write("commit");
        assert_write("rollback");
        assert_write("end");
        assert_write("savepoint a");
        assert_write("release savepoint a");
        assert_write("set transaction read only");
        assert_eq!(kind("BEGIN READ ONLY"), StatementKind::BeginReadOnly);
        assert_eq!(
            kind("start transaction read only"),
            StatementKind::BeginReadOnly
        );
        assert_eq!(
            kind("begin transaction read only"),
            StatementKind::BeginReadOnly
        );
        assert_eq!(kind("begin work read only;"), StatementKind::BeginReadOnly);
        assert_eq!(
            kind("begin isolation level serializable read only"),
            StatementKind::BeginReadOnly
        );
        assert_eq!(
            kind("START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"),
            StatementKind::BeginReadOnly
        );
        assert!(classify("begin read only").functions.is_empty());
    }

    #[test]
    fn dml_ddl_and_utility_are_write() {
        for sql in [
            "insert into t values (1)",
            "insert into t select * from u",
            "update t set a = 1",
            "delete from t",
            "merge into t using u on t.a = u.a when matched then delete",
            "create table t (a int)",
            "drop table t",
            "alter table t add column b int",
            "truncate t",
            "create index on t (a)",
            "copy t from stdin",
            "copy t to '/tmp/file'",
            "copy t to program 'cat'",
            "copy (delete from t returning *) to stdout",
            "copy (select nextval('s')) to stdout",
            "call p()",
            "do $$ begin perform 1; end $$",
            "listen c",
            "unlisten *",
            "notify c, 'x'",
            "vacuum t",
            "analyze t",
            "set search_path = x",
            "set local statement_timeout = 0",
            "reset all",
            "discard all",
            "prepare p as select 1",
            "execute p",
            "deallocate p",
            "declare c cursor for select 1",
            "fetch 10 from c",
            "close c",
            "lock table t",
            "grant select on t to u",
            "refresh materialized view v",
            "checkpoint",
            "explain analyze delete from t",
            "explain (analyze, buffers) update t set a = 1",
            "explain delete from t",
            "garbage !!",
            "table t;checkpoint",
            "table t; vacuum; select 1",
            "table t union table u;checkpoint",
            "lock table t in access exclusive mode",
            "select 1; create table t (a int)",
            "select",
            "select (",
            "select 'unterminated",
            "select * from t where",
        ] {
            assert_write(sql);
        }
    }

    #[test]
    fn copy_and_explain_reads() {
        assert_read("copy t to stdout", &[]);
        assert_read("copy t (a, b) to stdout with (format csv)", &[]);
        assert_read("copy (select f(a) from t) to stdout", &["f"]);
        assert_read("explain select 1", &[]);
        assert_read("explain analyze select f(1)", &["f"]);
        assert_read("explain (analyze, verbose) select * from t", &[]);
        assert_write("explain select * from t for update");
        assert_write("describe select 1");
    }

    #[test]
    fn hints() {
        let c = classify("/* pgway:replica */ select 1");
        assert_eq!(c.hint, Some(Hint::Replica));
        assert_eq!(c.kind, StatementKind::Read);
        assert_eq!(
            classify("/*pgway:primary*/ select 1").hint,
            Some(Hint::Primary)
        );
        assert_eq!(
            classify("/*pgway:replica*/select 1").hint,
            Some(Hint::Replica)
        );
        assert_eq!(
            classify("  \n/*   pgway : replica   */\nselect 1").hint,
            Some(Hint::Replica)
        );
        assert_eq!(
            classify("-- pgway:primary\nselect 1").hint,
            Some(Hint::Primary)
        );
        assert_eq!(
            classify("--pgway:replica\nselect 1").hint,
            Some(Hint::Replica)
        );
        assert_eq!(
            classify("/* app=web */ /* pgway:replica */ select 1").hint,
            Some(Hint::Replica)
        );
        // The hint never changes the kind.
        let c = classify("/* pgway:replica */ delete from t");
        assert_eq!(c.hint, Some(Hint::Replica));
        assert_eq!(c.kind, StatementKind::Write);
        let c = classify("/* pgway:primary */ garbage !!");
        assert_eq!(c.hint, Some(Hint::Primary));
        assert_eq!(c.kind, StatementKind::Write);
        // Not hints.
        assert_eq!(classify("select 1 /* pgway:replica */").hint, None);
        assert_eq!(classify("/* pgway:elsewhere */ select 1").hint, None);
        assert_eq!(classify("/* pgwayreplica */ select 1").hint, None);
        assert_eq!(classify("/* pgway:replica select 1").hint, None);
        assert_eq!(classify("select 1").hint, None);
        assert_eq!(classify("/* pgway:replica */").kind, StatementKind::Read);
    }

    fn effects(sql: &str) -> Vec<SessionEffect> {
        classify(sql).session
    }

    fn set(name: &str, value: &str) -> SessionEffect {
        SessionEffect::Set {
            name: name.to_owned(),
            value: value.to_owned(),
        }
    }

    fn reset(name: &str) -> SessionEffect {
        SessionEffect::Reset(name.to_owned())
    }

    fn pin(reason: PinReason) -> Vec<SessionEffect> {
        vec![SessionEffect::Pin(reason)]
    }

    #[test]
    fn set_statements() {
        for (sql, name, value) in [
            (
                "set search_path = 'a', public",
                "search_path",
                "'a', public",
            ),
            ("SET search_path TO myschema", "search_path", "myschema"),
            (
                "set session statement_timeout = '5s'",
                "statement_timeout",
                "'5s'",
            ),
            ("SET TIME ZONE 'UTC'", "timezone", "'UTC'"),
            ("set time zone utc", "timezone", "utc"),
            ("set time zone -7", "timezone", "-7"),
            (
                "SET TIME ZONE INTERVAL '-08:00' HOUR TO MINUTE",
                "timezone",
                "INTERVAL '-08:00' HOUR TO MINUTE",
            ),
            (
                "set timezone = 'Europe/Paris'",
                "timezone",
                "'Europe/Paris'",
            ),
            ("SET NAMES 'UTF8'", "client_encoding", "'UTF8'"),
            ("set schema 'app'", "search_path", "'app'"),
            ("SET ROLE admin", "role", "admin"),
            ("set role none", "role", "none"),
            ("SET SESSION ROLE 'Admin'", "role", "'Admin'"),
            (
                "SET SESSION AUTHORIZATION bob",
                "session_authorization",
                "bob",
            ),
            (
                "set session session authorization \"Bob\"",
                "session_authorization",
                "\"Bob\"",
            ),
            ("set xml option document", "xmloption", "document"),
            ("set a.b = 'x'", "a.b", "'x'"),
            ("SET pgway.target TO replica", "pgway.target", "replica"),
            ("SET MyApp.Tenant = 42", "myapp.tenant", "42"),
            ("set \"MyApp\".\"Tenant\" = 42", "myapp.tenant", "42"),
            ("set local.x = 1", "local.x", "1"),
            ("set session.x = 1", "session.x", "1"),
            (
                "SET search_path = \"$user\", public",
                "search_path",
                "\"$user\", public",
            ),
            (
                "set application_name = 'it''s; fine'",
                "application_name",
                "'it''s; fine'",
            ),
            ("SET x = 1 /* c */", "x", "1"),
            ("SET x = /* c */ 1 -- d", "x", "1"),
            ("set a = 'x', /* keep */ 'y'", "a", "'x', /* keep */ 'y'"),
            ("set a = 'x', -- keep\n 'y'", "a", "'x', -- keep\n 'y'"),
            ("set x=-1", "x", "-1"),
            ("set x = + 1.5e3", "x", "+ 1.5e3"),
            ("set enable_seqscan to off", "enable_seqscan", "off"),
            ("set a = E'x\\';y'", "a", "E'x\\';y'"),
            ("set a = $$x;y$$", "a", "$$x;y$$"),
            ("set a = $t$x;$$y$t$", "a", "$t$x;$$y$t$"),
            ("set a = U&'d\\0061t'", "a", "U&'d\\0061t'"),
            ("set a = 'é', 'ü'", "a", "'é', 'ü'"),
            (
                "  SET\n\tdatestyle\r\n=\r\n iso,\r\n mdy  ;  ",
                "datestyle",
                "iso,\r\n mdy",
            ),
            ("/* pgway:primary */ set a = 1", "a", "1"),
        ] {
            assert_eq!(effects(sql), vec![set(name, value)], "{sql}");
            assert_eq!(kind(sql), StatementKind::Write, "{sql}");
        }
    }

    #[test]
    fn set_value_is_a_slice_after_multibyte_text() {
        let sql = "select 'ééé', \"ü\"; /* ñ */ set a = 'ö';\nselect '€'; set b = 'x'";
        assert_eq!(effects(sql), vec![set("a", "'ö'"), set("b", "'x'")]);
    }

    #[test]
    fn set_defaults_local_and_unsupported() {
        for (sql, effect) in [
            ("set timezone to default", reset("timezone")),
            ("SET search_path = DEFAULT", reset("search_path")),
            ("set time zone default", reset("timezone")),
            ("SET TIME ZONE LOCAL", reset("timezone")),
            ("set names", reset("client_encoding")),
            ("set names default", reset("client_encoding")),
            (
                "set session authorization default",
                reset("session_authorization"),
            ),
            ("SET LOCAL work_mem = '1MB'", SessionEffect::SetLocal),
            ("set local time zone 'UTC'", SessionEffect::SetLocal),
            ("set local role admin", SessionEffect::SetLocal),
            (
                "set transaction isolation level serializable",
                SessionEffect::SetLocal,
            ),
            ("set transaction snapshot '0001'", SessionEffect::SetLocal),
            ("set session transaction read only", SessionEffect::SetLocal),
            ("set constraints all deferred", SessionEffect::SetLocal),
            (
                "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
                SessionEffect::Unsupported("SET SESSION CHARACTERISTICS"),
            ),
        ] {
            assert_eq!(effects(sql), vec![effect], "{sql}");
        }
        assert!(effects("set search_path from current").is_empty());
        for sql in [
            "set",
            "set = 3",
            "SET x",
            "set x =",
            "set x = 5s",
            "set x = 'a' 'b'",
            "set x = 'a'\n'b'",
            "set x = 1 +",
            "set x = (1)",
            "set x = $1",
            "set x = b'01'",
            "set x = N'x'",
            "set x = ''::text",
            "set x = 1, default",
            "set x = \"\"",
            "set \"\" = 1",
            "set \"a-b\" = 1",
            "set x.\"1\" = 1",
            "set a. = 1",
            "SET U&\"d\\0061t\" = 1",
            "set timezone 'UTC'",
            "set time zone",
            "set time zone 'a', 'b'",
            "set schema app",
            "set names utf8",
            "set role",
            "set role default",
            "set xml option foo",
            "set catalog 'x'",
            "set session authorization",
        ] {
            let got = effects(sql);
            assert_eq!(got, vec![SessionEffect::Unsupported("SET")], "{sql}");
        }
    }

    #[test]
    fn reset_discard_deallocate_unlisten() {
        for (sql, effect) in [
            ("reset search_path", reset("search_path")),
            ("RESET Search_Path", reset("search_path")),
            ("reset myapp.tenant", reset("myapp.tenant")),
            ("RESET ROLE", reset("role")),
            ("reset time zone", reset("timezone")),
            (
                "reset session authorization",
                reset("session_authorization"),
            ),
            ("reset transaction isolation level", SessionEffect::SetLocal),
            ("RESET ALL", SessionEffect::ResetAll),
            ("reset", SessionEffect::Unsupported("RESET")),
            ("reset a b", SessionEffect::Unsupported("RESET")),
            ("discard all", SessionEffect::DiscardAll),
            ("DISCARD PLANS", SessionEffect::DiscardOther),
            ("discard sequences", SessionEffect::DiscardOther),
            ("discard temp", SessionEffect::DiscardOther),
            ("discard temporary", SessionEffect::DiscardOther),
            ("discard", SessionEffect::Unsupported("DISCARD")),
            ("discard everything", SessionEffect::Unsupported("DISCARD")),
            ("deallocate s1", SessionEffect::Deallocate("s1".to_owned())),
            ("DEALLOCATE S1", SessionEffect::Deallocate("s1".to_owned())),
            (
                "DEALLOCATE PREPARE \"S1\"",
                SessionEffect::Deallocate("S1".to_owned()),
            ),
            (
                "deallocate prepare",
                SessionEffect::Deallocate("prepare".to_owned()),
            ),
            ("deallocate all", SessionEffect::DeallocateAll),
            ("DEALLOCATE PREPARE ALL", SessionEffect::DeallocateAll),
            (
                "deallocate \"all\"",
                SessionEffect::Deallocate("all".to_owned()),
            ),
            ("deallocate", SessionEffect::Unsupported("DEALLOCATE")),
            ("deallocate a, b", SessionEffect::Unsupported("DEALLOCATE")),
            ("unlisten *", SessionEffect::Unlisten),
            ("UNLISTEN foo", SessionEffect::Unlisten),
            ("unlisten", SessionEffect::Unlisten),
        ] {
            assert_eq!(effects(sql), vec![effect], "{sql}");
            assert_eq!(kind(sql), StatementKind::Write, "{sql}");
        }
    }

    #[test]
    fn pins() {
        for (sql, reason) in [
            ("prepare q as select 1", PinReason::Prepare),
            ("PREPARE q(int) AS SELECT $1", PinReason::Prepare),
            (
                "prepare q as insert into t values (pg_advisory_lock(1))",
                PinReason::Prepare,
            ),
            ("create temp table x(a int)", PinReason::TempTable),
            ("CREATE TEMPORARY TABLE x AS select 1", PinReason::TempTable),
            (
                "create global temporary table x(a int)",
                PinReason::TempTable,
            ),
            (
                "create local temp table x(a int) on commit drop",
                PinReason::TempTable,
            ),
            ("create temp view v as select 1", PinReason::TempTable),
            (
                "create or replace temporary view v as select 1",
                PinReason::TempTable,
            ),
            ("create temp sequence s", PinReason::TempTable),
            ("select 1 into temp t2", PinReason::TempTable),
            (
                "select * into temporary table t2 from t",
                PinReason::TempTable,
            ),
            (
                "explain analyze create temp table x as select 1",
                PinReason::TempTable,
            ),
            ("create table pg_temp.x(a int)", PinReason::TempTable),
            (
                "create view v as select * from PG_TEMP.x",
                PinReason::TempTable,
            ),
            ("select 1 into pg_temp.x", PinReason::TempTable),
            ("select pg_advisory_lock(1)", PinReason::AdvisoryLock),
            (
                "SELECT pg_catalog.PG_ADVISORY_LOCK_SHARED(1, 2)",
                PinReason::AdvisoryLock,
            ),
            (
                "select pg_try_advisory_lock(hashtext('job'))",
                PinReason::AdvisoryLock,
            ),
            (
                "select * from pg_try_advisory_lock_shared(1)",
                PinReason::AdvisoryLock,
            ),
            (
                "update jobs set locked = pg_try_advisory_lock(id) where id = 1",
                PinReason::AdvisoryLock,
            ),
            (
                "with x as (select pg_advisory_lock(1)) select * from x",
                PinReason::AdvisoryLock,
            ),
            (
                "explain analyze select pg_advisory_lock(1)",
                PinReason::AdvisoryLock,
            ),
            (
                "copy (select pg_advisory_lock(1)) to stdout",
                PinReason::AdvisoryLock,
            ),
            ("listen foo", PinReason::Listen),
            ("LISTEN \"Foo\"", PinReason::Listen),
            (
                "declare c cursor with hold for select 1",
                PinReason::HoldCursor,
            ),
            (
                "DECLARE c BINARY INSENSITIVE NO SCROLL CURSOR WITH HOLD FOR SELECT * FROM t",
                PinReason::HoldCursor,
            ),
        ] {
            assert_eq!(effects(sql), pin(reason), "{sql}");
            assert_eq!(kind(sql), StatementKind::Write, "{sql}");
        }
    }

    #[test]
    fn statements_without_effects() {
        for sql in [
            "create table x(a int)",
            "create unlogged table x(a int)",
            "select 1",
            "select temp, temporary from t",
            "select 'pg_advisory_lock(1)', \"set\" from t",
            "select pg_advisory_xact_lock(1)",
            "select pg_try_advisory_xact_lock_shared(1)",
            "select pg_advisory_unlock(1)",
            "select pg_advisory_lock from t",
            "declare c cursor for select 1",
            "declare c cursor without hold for select pg_advisory_xact_lock(1)",
            "select * into t2 from t",
            "insert into temp values (1)",
            "execute q",
            "notify c",
            "show search_path",
            "begin read only",
            "prepare transaction 'gid'",
            "commit prepared 'gid'",
            "create function f() returns void language sql as $$ select pg_advisory_lock(1) $$",
            "create or replace function f() returns bigint language sql return 1",
            "update t set a = 1",
            "",
            "-- set x = 1",
            "/* listen foo */",
            ";;",
        ] {
            assert_eq!(effects(sql), vec![], "{sql}");
        }
    }

    #[test]
    fn savepoint_statements() {
        assert_eq!(
            effects("savepoint s1"),
            vec![SessionEffect::Savepoint("s1".into())]
        );
        assert_eq!(
            effects("ROLLBACK TO SAVEPOINT S1"),
            vec![SessionEffect::RollbackToSavepoint("s1".into())]
        );
        assert_eq!(
            effects("rollback work to \"A\""),
            vec![SessionEffect::RollbackToSavepoint("A".into())]
        );
        assert_eq!(
            effects("release s1"),
            vec![SessionEffect::ReleaseSavepoint("s1".into())]
        );
        assert_eq!(effects("rollback"), vec![]);
        assert_eq!(
            effects("begin; set a.b = 1; savepoint s; set a.b = 2; rollback to s; commit"),
            vec![
                SessionEffect::Set {
                    name: "a.b".into(),
                    value: "1".into()
                },
                SessionEffect::Savepoint("s".into()),
                SessionEffect::Set {
                    name: "a.b".into(),
                    value: "2".into()
                },
                SessionEffect::RollbackToSavepoint("s".into()),
            ]
        );
    }

    #[test]
    fn session_effects_in_multi_statement_strings() {
        assert_eq!(
            effects("set a.b = 'x'; select 1; reset all"),
            vec![set("a.b", "'x'"), SessionEffect::ResetAll]
        );
        assert_eq!(
            effects(
                "select 1; listen foo; set x = 'a;b'; select pg_advisory_lock(2); deallocate all;"
            ),
            vec![
                SessionEffect::Pin(PinReason::Listen),
                set("x", "'a;b'"),
                SessionEffect::Pin(PinReason::AdvisoryLock),
                SessionEffect::DeallocateAll,
            ]
        );
        // Effects are reported whatever the routing kind, and even when
        // another statement of the string does not parse.
        let c = classify("set search_path = app; garbage !!; unlisten *");
        assert_eq!(c.kind, StatementKind::Write);
        assert_eq!(
            c.session,
            vec![set("search_path", "app"), SessionEffect::Unlisten]
        );
        // A string that is otherwise a Read still reports its effects.
        assert_eq!(effects("show all; set x = 1"), vec![set("x", "1")]);
        // Statements inside a BEGIN ATOMIC body belong to the CREATE.
        assert_eq!(
            effects(
                "create function f() returns void language sql begin atomic \
                 select pg_advisory_lock(1); select 2; end; set x = 1"
            ),
            vec![set("x", "1")]
        );
        assert_eq!(
            effects("create procedure p() begin atomic end; listen a"),
            pin(PinReason::Listen)
        );
        // Outside CREATE, BEGIN ATOMIC does not hide later statements.
        assert_eq!(effects("begin atomic; set x = 1; end"), vec![set("x", "1")]);
    }

    #[test]
    fn pins_without_a_parse() {
        // The parser rejects these (or they are too deep to parse); the
        // token fallback still pins.
        for (sql, reason) in [
            ("listen foo.bar", PinReason::Listen),
            ("listen", PinReason::Listen),
            ("prepare q as garbage !!", PinReason::Prepare),
            (
                "create temporary recursive view v(n) as select 1",
                PinReason::TempTable,
            ),
            ("select 1 into local temp t", PinReason::TempTable),
            (
                "declare c no scroll cursor with hold for select * from t for no key update",
                PinReason::HoldCursor,
            ),
            (
                "select pg_advisory_lock(1) from t for no key update",
                PinReason::AdvisoryLock,
            ),
        ] {
            assert_eq!(effects(sql), pin(reason), "{sql}");
        }
        let deep = format!(
            "select {}pg_advisory_lock(1){}",
            "(".repeat(5000),
            ")".repeat(5000)
        );
        assert_eq!(effects(&deep), pin(PinReason::AdvisoryLock));
        let long = format!("select {}pg_advisory_lock(1)", "1+".repeat(5000));
        assert_eq!(effects(&long), pin(PinReason::AdvisoryLock));
        assert!(effects("declare c cursor for select 'with hold' garbage !!").is_empty());
    }

    #[test]
    fn untokenizable_input() {
        // The tokenizer rejects an unterminated quote; the leading word still
        // decides, and SET-like statements are never guessed.
        for (sql, effect) in [
            ("set x = 'unterminated", SessionEffect::Unsupported("SET")),
            ("/* c */ RESET \"x", SessionEffect::Unsupported("RESET")),
            ("discard 'x", SessionEffect::Unsupported("DISCARD")),
            ("deallocate \"x", SessionEffect::Unsupported("DEALLOCATE")),
            ("listen \"x", SessionEffect::Pin(PinReason::Listen)),
            (
                "prepare q as select 'x",
                SessionEffect::Pin(PinReason::Prepare),
            ),
            (
                "declare c cursor with hold for select 'x",
                SessionEffect::Pin(PinReason::HoldCursor),
            ),
            ("unlisten 'x", SessionEffect::Unlisten),
        ] {
            assert_eq!(effects(sql), vec![effect], "{sql}");
        }
        for sql in ["select 'x", "settings 'x", "/* set x = 1", "-- set x = 1"] {
            assert!(effects(sql).is_empty(), "{sql}");
        }
    }

    /// Replaying a `Set` as the module documentation says gives back the same
    /// effect.
    fn assert_replays(effect: &SessionEffect) {
        let SessionEffect::Set { name, value } = effect else {
            return;
        };
        let replay = if name == "timezone" {
            format!("SET TIME ZONE {value}")
        } else {
            let quoted: Vec<String> = name.split('.').map(|p| format!("\"{p}\"")).collect();
            format!("SET {} = {value}", quoted.join("."))
        };
        assert_eq!(effects(&replay), vec![effect.clone()], "{replay}");
    }

    #[test]
    fn set_values_replay() {
        for sql in [
            "set search_path = 'a', public",
            "SET search_path = \"$user\", public",
            "set application_name = 'it''s; fine'",
            "set a = 'x', -- keep\n 'y'",
            "set timezone = 'UTC'",
            "set time zone interval '+02:00' hour to minute",
            "set names 'LATIN1'",
            "set x = -1",
        ] {
            let got = effects(sql);
            assert_eq!(got.len(), 1, "{sql}");
            assert_replays(&got[0]);
        }
    }

    const BIG_QUERY: &str = "
        WITH recent_orders AS (
            SELECT o.id, o.account_id, o.total, o.created_at
            FROM orders o
            WHERE o.created_at > now() - interval '30 days'
        ), top_accounts AS (
            SELECT account_id, sum(total) AS spent, count(*) AS n
            FROM recent_orders
            GROUP BY account_id
            HAVING sum(total) > 100
        )
        SELECT a.id, lower(a.email) AS email, ta.spent, ta.n,
               coalesce(p.display_name, a.username) AS name,
               row_number() OVER (ORDER BY ta.spent DESC) AS position
        FROM accounts a
        JOIN top_accounts ta ON ta.account_id = a.id
        LEFT JOIN profiles p ON p.account_id = a.id
        LEFT JOIN LATERAL (
            SELECT max(r.created_at) AS last_order FROM recent_orders r WHERE r.account_id = a.id
        ) lo ON true
        WHERE a.deleted_at IS NULL AND a.id IN (SELECT account_id FROM memberships WHERE active)
          AND EXISTS (SELECT 1 FROM sessions s WHERE s.account_id = a.id)
        ORDER BY ta.spent DESC, a.id
        LIMIT 50 OFFSET $1";

    #[test]
    fn big_join_with_ctes_is_read() {
        assert_read(BIG_QUERY, &[]);
        let with_user_fn = BIG_QUERY.replace("lower(a.email)", "billing.mask_email(a.email)");
        assert_read(&with_user_fn, &["billing.mask_email"]);
        let locked = format!("{BIG_QUERY} FOR UPDATE OF a");
        assert_write(&locked);
    }

    #[test]
    fn hostile_inputs_do_not_panic() {
        let deep_parens = format!("select {}1{}", "(".repeat(5000), ")".repeat(5000));
        assert_write(&deep_parens);
        let deep_subqueries = format!("select {}1{}", "(select ".repeat(500), ")".repeat(500));
        assert_write(&deep_subqueries);
        let long_union = vec!["select 1"; 2000].join(" union ");
        let _ = classify(&long_union);
        // Long operator chains parse into left-deep trees; they must not
        // overflow this (2 MiB) test thread's stack.
        assert_read(&format!("select {}1", "1+".repeat(1500)), &[]);
        for chain in [
            format!("select {}1", "1+".repeat(100_000)),
            format!("select 1 where {}true", "true and ".repeat(50_000)),
            vec!["select 1"; 20_000].join(" union "),
            format!("select 1{}", "::int".repeat(50_000)),
            format!("select a{}", "[1]".repeat(50_000)),
            format!("select {}1", "not ".repeat(50_000)),
            format!("select {}1", "-".repeat(50_000)),
        ] {
            assert_write(&chain);
        }
        // Wide but shallow statements stay reads.
        let in_list = (0..20_000)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",");
        assert_read(&format!("select * from t where id in ({in_list})"), &[]);
        let many = "select 1;".repeat(2000);
        assert_read(&many, &[]);
        for sql in [
            "/*",
            "--",
            "/* */ /*",
            "$$",
            "e'\\",
            "\"",
            "\u{0}",
            "sélect ü",
            "/*é*/",
        ] {
            let _ = classify(sql);
        }
    }

    /// xorshift64*: deterministic pseudo-random numbers without extra crates.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: usize) -> usize {
            usize::try_from(self.next() % n as u64).unwrap_or(0)
        }
    }

    #[test]
    fn random_and_truncated_inputs_do_not_panic() {
        let samples = [
            BIG_QUERY,
            "with x as (insert into t values (1) returning *) select * from x",
            "select * from t for no key update skip locked",
            "/* pgway:replica */ select accounts.get_user_by_identifier_v1('x')",
            "copy (select 1) to stdout with (format csv)",
            "begin isolation level serializable read only",
            "select $$dollar$$, e'esc\\'', \"quoted\"\"id\", 1.5e3, x'ff', b'01' -- c",
            "set search_path = 'a', \"$user\", public; SET LOCAL x TO 1 /* c */; reset all",
            "SET TIME ZONE INTERVAL '-08:00' HOUR TO MINUTE; set session authorization default",
            "deallocate prepare \"S1\"; discard all; unlisten *; listen foo",
            "create temp table x as select pg_advisory_lock(1); select 1 into temp t",
            "declare c cursor with hold for select 1; prepare q as select $1",
            "create function f() returns int begin atomic select 1; end; set a.b = $t$x$t$",
        ];
        let alphabet: &[u8] =
            b"selct frmwhiu()*,;'\"$-/\n\t0123456789.:=<>!_ \\\xc3\xa9\xff\x00SETRUNAOZDLPG&+";
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut kinds_of_effects = std::collections::HashSet::new();
        for _ in 0..1000 {
            // Random bytes over a SQL-ish alphabet, decoded lossily.
            let len = rng.below(80);
            let bytes: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.below(alphabet.len())])
                .collect();
            let _ = classify(&String::from_utf8_lossy(&bytes));

            // Truncated and mutated real statements.
            let sample = samples[rng.below(samples.len())].as_bytes();
            let cut = rng.below(sample.len() + 1);
            let mut bytes = sample[..cut].to_vec();
            if !bytes.is_empty() {
                let at = rng.below(bytes.len());
                bytes[at] = alphabet[rng.below(alphabet.len())];
            }
            let sql = String::from_utf8_lossy(&bytes);
            let c = classify(&sql);
            if c.kind != StatementKind::Read {
                assert!(c.functions.is_empty());
            }
            for effect in &c.session {
                if let SessionEffect::Set { value, .. } = effect {
                    assert!(sql.contains(value.as_str()), "{sql:?}: {value:?}");
                    assert_eq!(value.trim(), value, "{sql:?}");
                }
                assert_replays(effect);
                kinds_of_effects.insert(std::mem::discriminant(effect));
            }
        }
        // The mutated samples reach most of the session-effect code.
        assert!(kinds_of_effects.len() >= 8, "{}", kinds_of_effects.len());
    }

    /// Rough timing: `cargo test --release -- --ignored --nocapture timing`.
    #[test]
    #[ignore = "timing loop, run in release by hand"]
    fn timing() {
        for (name, sql) in [
            ("simple", "SELECT * FROM accounts WHERE id = $1"),
            ("20-line", BIG_QUERY),
        ] {
            let iterations: u32 = 20_000;
            let start = std::time::Instant::now();
            for _ in 0..iterations {
                std::hint::black_box(classify(std::hint::black_box(sql)));
            }
            let per_call = start.elapsed() / iterations;
            println!("{name}: {per_call:?} per classify");
        }
    }
}
