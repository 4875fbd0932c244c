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
//! `-- pgway:primary` sets [`Classification::hint`]; `pgway:fresh` and
//! `pgway:min_lsn=<position>` set [`Classification::fresh`] and
//! [`Classification::min_lsn`] (read-your-writes). Hints do not change
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
//!   recognised is [`SessionEffect::Untracked`], never a guess.
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
//!
//! # Layout
//!
//! This file holds [`classify`], the types it returns and the read/write
//! rules (sqlparser-based: locking clauses, the `TABLE` rewrite, write and
//! safe functions). `effects.rs` finds the session effects and pins,
//! `tokens.rs` holds the tokenizer, the statement splitter and the hint
//! comments that both use.

pub mod body;
mod cache;
mod effects;
mod tokens;
mod writes;

use std::ops::ControlFlow;

use sqlparser::ast::{
    CopySource, CopyTarget, DescribeAlias, Expr, ObjectName, ObjectNamePart, Query, Select,
    Statement, TableFactor, TransactionAccessMode, TransactionMode, Visit, Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::keywords::Keyword;
use sqlparser::parser::{Parser, ParserError};
use sqlparser::tokenizer::{Token, TokenWithSpan};

pub use cache::{cache_hint, table_name, CacheFacts, CacheHint};
pub use effects::{PinReason, SessionEffect};
pub use tokens::Hint;

use super::fast::{scan_words, Words};
use effects::{session_effects, untokenized_session_effects};
use tokens::{is_trivia, leading_hints, tokenize, too_deep};

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
    /// `pgway:min_lsn=<position>` in a leading comment: the WAL position the read must
    /// see (0: none).
    pub min_lsn: u64,
    /// `pgway:fresh` in a leading comment: the read must see everything committed on the
    /// primary before it arrived.
    pub fresh: bool,
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
    /// The string may change data that a later read must see (read-your-writes): DML,
    /// DDL, `SELECT ... INTO`, `COPY FROM`, `CALL`, `DO`, writing or unknown functions,
    /// anything unparseable. Not: reads (locking ones included), `SET`/`SHOW`/`RESET`,
    /// transaction control, cursors, `LISTEN`, and calls of built-ins that only touch the
    /// session (advisory locks, `set_config`, `pg_notify`). See [`writes::may_write`].
    pub writes: bool,
    /// What the result cache needs: whether it is one query, the tables it reads or
    /// names, whether it reads the clock, its `pgway:cache` hint.
    pub cache: CacheFacts,
    /// What the session's word scan finds in the text (a commit, a COPY, something that
    /// may release session-bound state): made once with the classification.
    pub words: Words,
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

/// System views whose rows exist only on the primary (a replica lists none): prepared
/// transactions, replication connections and slots. A read of one goes to the primary.
/// Matched unqualified or qualified with `pg_catalog.`.
const PRIMARY_ONLY_VIEWS: &[&str] = &[
    "pg_prepared_xacts",
    "pg_stat_replication",
    "pg_replication_slots",
];

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
            min_lsn: 0,
            fresh: false,
            functions: Vec::new(),
            session: Vec::new(),
            writes: true,
            cache: CacheFacts::default(),
            words: Words::default(),
        }
    }
}

/// Classify one simple-query string or one Parse message's SQL. Never panics, whatever the input.
///
/// See the [module documentation](self) for the rules. The result depends
/// only on `sql`, so it may be cached per SQL text.
#[must_use]
pub fn classify(sql: &str) -> Classification {
    let hints = leading_hints(sql);
    let hint = hints.target;
    // Nothing below panics on its own; `catch_unwind` only guards against a
    // bug inside sqlparser. For routing a panic means "unsure", which means
    // primary.
    let tokens = std::panic::catch_unwind(|| tokenize(sql)).ok().flatten();
    let session = match &tokens {
        Some(tokens) => std::panic::catch_unwind(|| session_effects(sql, tokens))
            .unwrap_or_else(|_| untokenized_session_effects(sql)),
        None => untokenized_session_effects(sql),
    };
    let clock = tokens.as_deref().is_some_and(cache::reads_clock);
    let changes_schema = cache::changes_schema(tokens.as_deref());
    let mut parsed = None;
    let routing = tokens.and_then(|tokens| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            classify_tokens(tokens, &mut parsed)
        }))
        .ok()
        .flatten()
    });
    let read = routing
        .as_ref()
        .is_some_and(|(kind, _)| *kind == StatementKind::Read);
    let cache = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        cache::facts(sql, parsed.as_deref(), clock, read, changes_schema)
    }))
    .unwrap_or_default();
    match routing {
        Some((kind, functions)) => Classification {
            kind,
            hint,
            min_lsn: hints.min_lsn,
            fresh: hints.fresh,
            // A volatile function may write; a stable one sends the read to a replica,
            // where nothing is written anyway.
            writes: !functions.is_empty(),
            functions,
            session,
            cache,
            words: scan_words(sql.as_bytes()),
        },
        None => Classification {
            session,
            writes: std::panic::catch_unwind(|| writes::may_write(sql)).unwrap_or(true),
            min_lsn: hints.min_lsn,
            fresh: hints.fresh,
            cache,
            words: scan_words(sql.as_bytes()),
            ..Classification::write(hint)
        },
    }
}

/// Returns `None` for Write, otherwise the kind and (for Read) the sorted,
/// deduplicated functions to look up. The statements, if they parse, are left in `parsed`.
fn classify_tokens(
    tokens: Vec<TokenWithSpan>,
    parsed: &mut Option<Vec<Statement>>,
) -> Option<(StatementKind, Vec<String>)> {
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
    let statements: &[Statement] = parsed.insert(parse_statements(dialect, tokens).ok()?);

    let mut functions = Vec::new();
    let mut kinds = Vec::with_capacity(statements.len());
    for statement in statements {
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
        // A standby answers these for itself (`on`), not for the session pgway gives the
        // client, which can write: the primary answers them.
        Statement::ShowVariable { variable }
            if matches!(variable.as_slice(), [name] if ["all", "transaction_read_only", "in_hot_standby"]
                .iter()
                .any(|n| name.value.eq_ignore_ascii_case(n))) =>
        {
            StatementKind::Write
        }
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
    let mut visitor = ReadChecker {
        functions,
        lenient: false,
    };
    match query.visit(&mut visitor) {
        ControlFlow::Continue(()) => StatementKind::Read,
        ControlFlow::Break(()) => StatementKind::Write,
    }
}

/// Walks a query; breaks as soon as anything makes it a write, and records
/// the functions that need a volatility lookup.
struct ReadChecker<'a> {
    functions: &'a mut Vec<String>,
    /// Asks "may it write data?" rather than "may it run on a replica?": row locks,
    /// primary-only views and built-ins that only touch the session do not count.
    lenient: bool,
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
            if self.lenient && writes::is_session_function(last_raw) {
                return ControlFlow::Continue(());
            }
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

/// `name` is one of [`PRIMARY_ONLY_VIEWS`].
fn is_primary_only_view(name: &ObjectName) -> bool {
    let parts: Vec<&str> = name
        .0
        .iter()
        .filter_map(|part| match part {
            ObjectNamePart::Identifier(ident) => Some(ident.value.as_str()),
            ObjectNamePart::Function(_) => None,
        })
        .collect();
    let view = match parts.as_slice() {
        [view] => view,
        [schema, view] if schema.eq_ignore_ascii_case("pg_catalog") => view,
        _ => return false,
    };
    PRIMARY_ONLY_VIEWS
        .iter()
        .any(|v| v.eq_ignore_ascii_case(view))
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
        if !query.locks.is_empty() && !self.lenient
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
            TableFactor::Table {
                name, args: None, ..
            } if is_primary_only_view(name) && !self.lenient => ControlFlow::Break(()),
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

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn kind(sql: &str) -> StatementKind {
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
    fn views_only_the_primary_fills_are_read_there() {
        assert_write("select gid from pg_prepared_xacts");
        assert_write("SELECT count(*) FROM pg_catalog.pg_stat_replication");
        assert_write("select * from t join pg_replication_slots s on true");
        assert_read("select * from pg_stat_activity", &[]);
        assert_read("select * from myschema.pg_prepared_xacts", &[]);
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
        assert_write("SHOW ALL");
        assert_write("show transaction_read_only");
        assert_write("SHOW In_Hot_Standby");
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

    pub(super) const BIG_QUERY: &str = "
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
