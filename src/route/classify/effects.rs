//! Session effects: what a statement does to session state that pgway tracks
//! per client (`SET`, `RESET`, `DISCARD`, `DEALLOCATE`, `UNLISTEN`,
//! savepoints) and the pins ([`PinReason`]) that tie a client to one server
//! connection, read from the tokens (and, for pins, the parsed statement)
//! as described under [Session effects](super#session-effects).

use std::ops::ControlFlow;

use sqlparser::ast::{
    Expr, ObjectName, ObjectNamePart, Select, Statement, TableFactor, Visit, Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Location, Token, TokenWithSpan};

use super::tokens::{
    is_kw, is_trivia, skip_leading_comments, split_statements, tokenize, too_deep,
};

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
    /// A session-level statement whose effect pgway cannot follow across connections
    /// ([`SessionEffect::Untracked`]) succeeded on the server.
    Untracked,
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
    /// `set_config('name', 'value', false)` with literal arguments: the value is the
    /// string itself (replayed with `set_config`, never as `SET name = value`, which would
    /// read a list-valued setting's `'a, b'` as one item).
    SetConfig {
        /// Parameter name, lower-cased.
        name: String,
        /// The value string, unquoted.
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
    /// A session-level statement whose effect pgway cannot follow across pooled
    /// connections, naming it: `"SET SESSION CHARACTERISTICS"` of a form not
    /// recognised, or `"SET"`, `"RESET"`, `"DISCARD"`, `"DEALLOCATE"` for a
    /// statement of that kind whose form was not recognised (never guessed). It
    /// goes to the server, which gives its own answer; if it succeeds, the client
    /// is pinned to that connection ([`PinReason::Untracked`]).
    Untracked(&'static str),
    /// `CREATE [OR REPLACE]`, `ALTER` or `DROP` of a function or procedure: what pgway
    /// learned about functions (volatility, body analysis) is forgotten once it commits.
    FunctionsChanged,
    /// The string mentions `pgway.last_write_lsn`: pgway makes the setting current on the
    /// server connection before the string runs (not a change to the session).
    UsesLastWriteLsn,
    /// The string mentions `pgway.last_route`: pgway makes the setting current on the
    /// server connection before the string runs (not a change to the session).
    UsesLastRoute,
    /// Markers, only in a string of several statements with other effects, so that the
    /// effects of what completed before a failing statement are known: the end of each
    /// statement, after its effects.
    EndOfStatement,
    /// `COMMIT`, `END`, `PREPARE TRANSACTION` in such a string (before its
    /// `EndOfStatement`): the transaction's effects so far are kept.
    Commit,
    /// `ROLLBACK`, `ABORT` (not `ROLLBACK TO`) in such a string: they are dropped.
    Rollback,
}

impl SessionEffect {
    /// True for [`Self::EndOfStatement`], [`Self::Commit`] and [`Self::Rollback`].
    pub fn is_marker(&self) -> bool {
        matches!(self, Self::EndOfStatement | Self::Commit | Self::Rollback)
    }
}

/// Session-level advisory lock functions: the lock outlives the transaction.
/// The `_xact_` variants are released at transaction end and are not listed.
const SESSION_ADVISORY_LOCKS: &[&str] = &[
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
];

/// The session effects of a tokenized string, one per statement that has one.
pub(super) fn session_effects(sql: &str, tokens: &[TokenWithSpan]) -> Vec<SessionEffect> {
    let mut locator = Locator::new(sql);
    let mut effects = Vec::new();
    let mut statements = 0;
    for statement in split_statements(tokens) {
        let words: Vec<&TokenWithSpan> =
            statement.iter().filter(|t| !is_trivia(&t.token)).collect();
        if words.is_empty() {
            continue;
        }
        statements += 1;
        if let Some(settings) = session_characteristics(&words) {
            effects.extend(settings);
        } else if let Some(effect) = statement_effect(&words, statement, &mut locator) {
            effects.push(effect);
        }
        effects.extend(session_set_config(&words));
        effects.extend(transaction_end(&words));
        effects.push(SessionEffect::EndOfStatement);
    }
    if statements < 2 || effects.iter().all(SessionEffect::is_marker) {
        effects.retain(|effect| !effect.is_marker());
    }
    let mentions = |name: &[u8]| {
        sql.as_bytes()
            .windows(name.len())
            .any(|w| w.eq_ignore_ascii_case(name))
    };
    if mentions(b"pgway.last_write_lsn") {
        effects.push(SessionEffect::UsesLastWriteLsn);
    }
    if mentions(b"pgway.last_route") {
        effects.push(SessionEffect::UsesLastRoute);
    }
    effects
}

/// [`SessionEffect::Commit`] or [`SessionEffect::Rollback`] if the statement ends the
/// transaction (`ROLLBACK TO`, `COMMIT PREPARED` and `ROLLBACK PREPARED` do not).
fn transaction_end(words: &[&TokenWithSpan]) -> Option<SessionEffect> {
    let kw = |i: usize, keyword: &str| words.get(i).is_some_and(|w| is_kw(&w.token, keyword));
    let rest_has = |keyword: &str| words.iter().skip(1).any(|w| is_kw(&w.token, keyword));
    if kw(0, "COMMIT") && !kw(1, "PREPARED")
        || kw(0, "END")
        || kw(0, "PREPARE") && kw(1, "TRANSACTION")
    {
        Some(SessionEffect::Commit)
    } else if (kw(0, "ROLLBACK") || kw(0, "ABORT")) && !rest_has("TO") && !kw(1, "PREPARED") {
        Some(SessionEffect::Rollback)
    } else {
        None
    }
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
    } else if is_kw(first, "DO") {
        do_block_effect(words)
    } else if changes_functions(words) {
        Some(SessionEffect::FunctionsChanged)
    } else if let Some(effect) = savepoint_effect(words) {
        Some(effect)
    } else {
        pin_effect(words, tokens).map(SessionEffect::Pin)
    }
}

/// `CREATE [OR REPLACE] FUNCTION|PROCEDURE`, `ALTER` or `DROP` of a function, procedure
/// or routine: what pgway learned about functions may be out of date.
fn changes_functions(words: &[&TokenWithSpan]) -> bool {
    let Some(first) = words.first() else {
        return false;
    };
    (is_kw(&first.token, "CREATE") || is_kw(&first.token, "ALTER") || is_kw(&first.token, "DROP"))
        && words.iter().skip(1).take(3).any(|w| {
            ["FUNCTION", "PROCEDURE", "ROUTINE"]
                .iter()
                .any(|k| is_kw(&w.token, k))
        })
}

/// A `DO` block whose body may change settings (it has the word `set`, `reset`,
/// `set_config` or `discard`; an `UPDATE ... SET` is a false alarm, which costs only a
/// pin) is [`SessionEffect::Untracked`]: pgway cannot see what it changed, so the client
/// keeps its connection. Other blocks (`RAISE NOTICE`, DDL, loops) change no setting.
fn do_block_effect(words: &[&TokenWithSpan]) -> Option<SessionEffect> {
    const WORDS: [&str; 4] = ["set", "reset", "set_config", "discard"];
    let may_set = words.iter().skip(1).any(|word| match &word.token {
        Token::DollarQuotedString(body) => text_has_word(&body.value, &WORDS),
        Token::SingleQuotedString(body) => text_has_word(body, &WORDS),
        _ => false,
    });
    may_set.then_some(SessionEffect::Untracked("DO"))
}

/// True if `text` has one of `words` (lower-case) as a whole word, in any case.
fn text_has_word(text: &str, words: &[&str]) -> bool {
    text.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '$'))
        .any(|word| words.iter().any(|w| w.eq_ignore_ascii_case(word)))
}

/// `SET SESSION CHARACTERISTICS AS TRANSACTION mode [[,] mode ...]`: the three settings
/// it stands for (`default_transaction_isolation`, `default_transaction_read_only`,
/// `default_transaction_deferrable`), one `Set` per mode. `None` if the statement is not
/// that, or a mode is not recognised (then it is [`SessionEffect::Untracked`]).
fn session_characteristics(words: &[&TokenWithSpan]) -> Option<Vec<SessionEffect>> {
    let head = ["SET", "SESSION", "CHARACTERISTICS", "AS", "TRANSACTION"];
    if words.len() <= head.len()
        || !head
            .iter()
            .zip(words)
            .all(|(keyword, word)| is_kw(&word.token, keyword))
    {
        return None;
    }
    let set = |name: &str, value: &str| SessionEffect::Set {
        name: name.to_owned(),
        value: value.to_owned(),
    };
    let kw = |i: usize, keyword: &str| words.get(i).is_some_and(|w| is_kw(&w.token, keyword));
    let mut effects = Vec::new();
    let mut i = head.len();
    while i < words.len() {
        if words[i].token == Token::Comma && !effects.is_empty() {
            i += 1;
            continue;
        }
        if kw(i, "ISOLATION") && kw(i + 1, "LEVEL") {
            let (level, used) = if kw(i + 2, "SERIALIZABLE") {
                ("'serializable'", 1)
            } else if kw(i + 2, "REPEATABLE") && kw(i + 3, "READ") {
                ("'repeatable read'", 2)
            } else if kw(i + 2, "READ") && kw(i + 3, "COMMITTED") {
                ("'read committed'", 2)
            } else if kw(i + 2, "READ") && kw(i + 3, "UNCOMMITTED") {
                ("'read uncommitted'", 2)
            } else {
                return None;
            };
            effects.push(set("default_transaction_isolation", level));
            i += 2 + used;
        } else if kw(i, "READ") && (kw(i + 1, "ONLY") || kw(i + 1, "WRITE")) {
            let on = if kw(i + 1, "ONLY") { "on" } else { "off" };
            effects.push(set("default_transaction_read_only", on));
            i += 2;
        } else if kw(i, "DEFERRABLE") {
            effects.push(set("default_transaction_deferrable", "on"));
            i += 1;
        } else if kw(i, "NOT") && kw(i + 1, "DEFERRABLE") {
            effects.push(set("default_transaction_deferrable", "off"));
            i += 2;
        } else {
            return None;
        }
    }
    Some(effects)
}

/// The effect of a `set_config(name, value, is_local)` call in the statement whose
/// `is_local` is not the literal `true`: a session-level setting. With string literals for
/// name and value and `false` for `is_local`, pgway knows it
/// ([`SessionEffect::SetConfig`]); otherwise it cannot see the value
/// ([`SessionEffect::Untracked`]). (One call per statement is followed; a second one
/// makes it untracked.)
fn session_set_config(words: &[&TokenWithSpan]) -> Option<SessionEffect> {
    let mut found = None;
    for (at, word) in words.iter().enumerate() {
        if !is_kw(&word.token, "set_config")
            || words.get(at + 1).map(|t| &t.token) != Some(&Token::LParen)
        {
            continue;
        }
        // The arguments at depth 1, split at commas.
        let mut args: Vec<Vec<&Token>> = vec![Vec::new()];
        let mut depth = 0usize;
        for token in words.iter().skip(at + 1).map(|t| &t.token) {
            match token {
                Token::LParen => depth += 1,
                Token::RParen => depth = depth.saturating_sub(1),
                _ => {}
            }
            if depth == 0 {
                break;
            }
            match token {
                Token::Comma if depth == 1 => args.push(Vec::new()),
                Token::LParen if depth == 1 => {}
                _ => {
                    if let Some(arg) = args.last_mut() {
                        arg.push(token);
                    }
                }
            }
        }
        let args: Vec<&[&Token]> = args.iter().map(Vec::as_slice).collect();
        let effect = match args.as_slice() {
            [_, _, [local]] if is_kw(local, "TRUE") => continue,
            [[Token::SingleQuotedString(name)], [Token::SingleQuotedString(value)], [local]]
                if is_kw(local, "FALSE")
                    && found.is_none()
                    && !name.eq_ignore_ascii_case("session_authorization") =>
            {
                SessionEffect::SetConfig {
                    name: name.to_ascii_lowercase(),
                    value: value.clone(),
                }
            }
            _ => return Some(SessionEffect::Untracked("set_config")),
        };
        found = Some(effect);
    }
    found
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
    const UNSUPPORTED: SessionEffect = SessionEffect::Untracked("SET");
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
        // Handled whole by `session_characteristics` (several effects); here only when
        // that did not recognise it.
        return Some(SessionEffect::Untracked("SET SESSION CHARACTERISTICS"));
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
        _ => SessionEffect::Untracked("SET"),
    }
}

/// `Set { name, value }` with the value text cut from the input, or
/// `Unsupported("SET")` if that text cannot be recovered exactly.
fn set_value(name: &str, value: &[&TokenWithSpan], locator: &mut Locator<'_>) -> SessionEffect {
    // These apply to the current transaction only (outside a block, to the SET's own
    // implicit one): nothing to follow, as for `SET LOCAL`.
    if [
        "transaction_isolation",
        "transaction_read_only",
        "transaction_deferrable",
    ]
    .contains(&name)
    {
        return SessionEffect::SetLocal;
    }
    match source_text(value, locator) {
        Some(value) => SessionEffect::Set {
            name: name.to_owned(),
            value: value.to_owned(),
        },
        None => SessionEffect::Untracked("SET"),
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
        _ => SessionEffect::Untracked("RESET"),
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
        _ => SessionEffect::Untracked("DISCARD"),
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
            _ => SessionEffect::Untracked("DEALLOCATE"),
        },
        _ => SessionEffect::Untracked("DEALLOCATE"),
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
pub(super) fn untokenized_session_effects(sql: &str) -> Vec<SessionEffect> {
    let Some(rest) = skip_leading_comments(sql) else {
        return Vec::new();
    };
    let end = rest
        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '$'))
        .unwrap_or(rest.len());
    let word = rest.get(..end).unwrap_or_default().to_ascii_lowercase();
    let effect = match word.as_str() {
        "set" => SessionEffect::Untracked("SET"),
        "reset" => SessionEffect::Untracked("RESET"),
        "discard" => SessionEffect::Untracked("DISCARD"),
        "deallocate" => SessionEffect::Untracked("DEALLOCATE"),
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

#[cfg(test)]
mod tests {
    use super::super::tests::{kind, BIG_QUERY};
    use super::super::{classify, StatementKind};
    use super::*;

    /// The effects of `sql`, without the markers of a multi-statement string.
    fn effects(sql: &str) -> Vec<SessionEffect> {
        let mut effects = classify(sql).session;
        effects.retain(|effect| !effect.is_marker());
        effects
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
                "SET transaction_isolation = 'serializable'",
                SessionEffect::SetLocal,
            ),
            ("set transaction_read_only to on", SessionEffect::SetLocal),
            (
                "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
                set("default_transaction_isolation", "'serializable'"),
            ),
            (
                "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL NEVER",
                SessionEffect::Untracked("SET SESSION CHARACTERISTICS"),
            ),
        ] {
            assert_eq!(effects(sql), vec![effect], "{sql}");
        }
        assert_eq!(
            effects(
                "set session characteristics as transaction isolation level repeatable read, \
                 read only not deferrable"
            ),
            vec![
                set("default_transaction_isolation", "'repeatable read'"),
                set("default_transaction_read_only", "on"),
                set("default_transaction_deferrable", "off"),
            ]
        );
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
            assert_eq!(got, vec![SessionEffect::Untracked("SET")], "{sql}");
        }
    }

    #[test]
    fn set_config_outside_a_transaction_is_followed_when_literal_and_untracked_otherwise() {
        let set_config = |name: &str, value: &str| {
            vec![SessionEffect::SetConfig {
                name: name.to_owned(),
                value: value.to_owned(),
            }]
        };
        assert_eq!(
            effects("select set_config('A.b', 'c, d', false)"),
            set_config("a.b", "c, d")
        );
        assert_eq!(
            effects("SELECT pg_catalog.set_config('search_path', 'x', FALSE) AS s"),
            set_config("search_path", "x")
        );
        let untracked = vec![SessionEffect::Untracked("set_config")];
        for sql in [
            "SELECT pg_catalog.set_config('a.b', lower('C'), FALSE)",
            "select set_config('a.b', 'c', false), set_config('d.e', 'f', false)",
            "select set_config('session_authorization', 'u1', false)",
            "select set_config('a.b', 'c', $1)",
            "select 1, set_config('search_path', 'x', (select false))",
        ] {
            assert_eq!(effects(sql), untracked, "{sql}");
        }
        for sql in [
            "select set_config('a.b', 'c', true)",
            "select set_config('a.b', concat('c', 'd'), TRUE)",
            "select 'set_config(1, 2, false)'",
        ] {
            assert!(effects(sql).is_empty(), "{sql}");
        }
    }

    #[test]
    fn function_ddl_is_an_effect() {
        for sql in [
            "create or replace function f() returns int language sql as 'select 1'",
            "CREATE FUNCTION f() RETURNS int AS $$ select 1 $$ LANGUAGE sql",
            "alter function f() stable",
            "drop function if exists f(int)",
            "create procedure p() language sql as 'select 1'",
            "drop routine r",
            // A body's statements belong to the CREATE: no pin for this lock.
            "create function f() returns void language sql as $$ select pg_advisory_lock(1) $$",
            "create or replace function f() returns bigint language sql return 1",
        ] {
            assert_eq!(effects(sql), vec![SessionEffect::FunctionsChanged], "{sql}");
        }
        assert!(effects("create table function_log(i int)").is_empty());
    }

    #[test]
    fn a_do_block_is_untracked() {
        assert_eq!(
            effects("do $$ begin perform set_config('a.b', 'c', false); end $$"),
            vec![SessionEffect::Untracked("DO")]
        );
        assert_eq!(
            effects("DO 'BEGIN SET search_path = x; END'"),
            vec![SessionEffect::Untracked("DO")]
        );
        assert_eq!(
            effects("do $f$ begin update t set a = 1; end $f$"),
            vec![SessionEffect::Untracked("DO")]
        );
        assert!(effects("do $$ begin raise notice 'settings'; end $$").is_empty());
        assert!(effects("do language plpgsql $$ begin create table offset_t(); end $$").is_empty());
        assert!(effects("select 'do'").is_empty());
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
            ("reset", SessionEffect::Untracked("RESET")),
            ("reset a b", SessionEffect::Untracked("RESET")),
            ("discard all", SessionEffect::DiscardAll),
            ("DISCARD PLANS", SessionEffect::DiscardOther),
            ("discard sequences", SessionEffect::DiscardOther),
            ("discard temp", SessionEffect::DiscardOther),
            ("discard temporary", SessionEffect::DiscardOther),
            ("discard", SessionEffect::Untracked("DISCARD")),
            ("discard everything", SessionEffect::Untracked("DISCARD")),
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
            ("deallocate", SessionEffect::Untracked("DEALLOCATE")),
            ("deallocate a, b", SessionEffect::Untracked("DEALLOCATE")),
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
    fn a_string_of_statements_with_effects_marks_statement_and_transaction_ends() {
        use SessionEffect::{Commit, EndOfStatement as End, Rollback};
        assert_eq!(
            classify("BEGIN; SET a = 1; COMMIT; select 1/0").session,
            vec![End, set("a", "1"), End, Commit, End, End]
        );
        assert_eq!(
            classify("begin; set a = 1; rollback to s; abort; end; commit prepared 'x'").session,
            vec![
                End,
                set("a", "1"),
                End,
                SessionEffect::RollbackToSavepoint("s".into()),
                End,
                Rollback,
                End,
                Commit,
                End,
                End
            ]
        );
        assert_eq!(
            classify("prepare transaction 'x'; rollback prepared 'x'; set a = 1").session,
            vec![Commit, End, End, set("a", "1"), End]
        );
        // No markers for one statement, or for a string without other effects.
        assert_eq!(classify("commit").session, vec![]);
        assert_eq!(classify("begin; select 1; commit").session, vec![]);
        assert_eq!(classify("set a = 1;").session, vec![set("a", "1")]);
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
            effects("set search_path = app; garbage !!; unlisten *"),
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
            vec![SessionEffect::FunctionsChanged, set("x", "1")]
        );
        assert_eq!(
            effects("create procedure p() begin atomic end; listen a"),
            vec![
                SessionEffect::FunctionsChanged,
                SessionEffect::Pin(PinReason::Listen)
            ]
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
            ("set x = 'unterminated", SessionEffect::Untracked("SET")),
            ("/* c */ RESET \"x", SessionEffect::Untracked("RESET")),
            ("discard 'x", SessionEffect::Untracked("DISCARD")),
            ("deallocate \"x", SessionEffect::Untracked("DEALLOCATE")),
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
}
