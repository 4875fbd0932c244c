//! Fuzz targets for the statement classifier and its fast path (see `protocol::fuzz` for
//! the loop, the budget and how to replay a case).
//!
//! Inputs are real statements (reads, writes, hints, session commands, the odd shapes the
//! classifier's tests name), mutated a token or a byte at a time, spliced together, and
//! `SELECT`s built from a token soup so that the fast path says yes often.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::{classify, fast, Catalog, Hint, Router, StatementKind};
use crate::protocol::fuzz::{mutate, run};
use crate::topology::TopologyHandle;

/// Statements to start from.
const CORPUS: &[&str] = &[
    "select 1",
    "SELECT abalance FROM pgbench_accounts WHERE aid = 4711;",
    "select * from t where id = $1 for update",
    "select * from t for no key update",
    "select a into b from t",
    "select nextval('s')",
    "select accounts.get_user_by_identifier_v1('x')",
    "with x as (delete from t returning *) select * from x",
    "with x as (select 1) select * from x",
    "insert into t values (1, 'a')",
    "update t set v = v + 1 where id = 2",
    "delete from t",
    "table t",
    "values (1), (2)",
    "(select 1) union (select 2)",
    "explain analyze delete from t",
    "copy t to stdout",
    "copy t from stdin",
    "copy (select 1) to stdout",
    "begin read only",
    "start transaction isolation level serializable read only",
    "begin; select 1; commit",
    "set search_path = a, b",
    "set local statement_timeout = '5s'",
    "reset all",
    "discard all",
    "listen ch",
    "notify ch, 'x'",
    "prepare p as select 1",
    "deallocate all",
    "declare c cursor with hold for select 1",
    "create temp table x (a int)",
    "select pg_advisory_lock(1)",
    "select pg_catalog.set_config('a', 'b', false)",
    "do $$ begin perform 1; end $$",
    "call p()",
    "vacuum t",
    "lock table t",
    "show search_path",
    "select * from pg_prepared_xacts",
    "select substring(a from 1 for 2) from t",
    "select 'for update', \"for\" from t",
    "select E'\\x' from t",
    "select $tag$ ; $tag$",
    "select 1 -- pgway:replica",
    "/* pgway:primary */ select 1",
    "/*pgway:replica*/ select * from t",
    "-- pgway:primary\nselect 1",
    "/* pgway:fresh */ select * from t",
    "/* pgway:min_lsn=0/16B3748 */ select 1",
    "/* pgway:cache ttl=30s */ select * from t",
    "set pgway.target = 'replica'",
    "show pgway.last_route",
    "create function f() returns int language sql begin atomic select 1; end",
    "merge into t using u on t.id = u.id when matched then delete",
    "",
    ";",
    "/*",
    "'",
];

/// Tokens the mutator inserts, and the soup `SELECT`s are made of.
const TOKENS: &[&str] = &[
    "select",
    "from",
    "where",
    "t",
    "u",
    "a",
    "b",
    "id",
    "=",
    "1",
    "2.5",
    "$1",
    "'x'",
    "'it''s'",
    "\"Q\"",
    ",",
    "(",
    ")",
    "*",
    "and",
    "or",
    "not",
    "in",
    "exists",
    "union",
    "order",
    "by",
    "limit",
    "for",
    "update",
    "share",
    "into",
    "with",
    "as",
    "insert",
    "delete",
    "values",
    "nextval",
    "pg_sleep",
    "count",
    "lower",
    "::int",
    ";",
    "--",
    "/*",
    "*/",
    "$$",
    "e'",
    "\\",
    "join",
    "on",
    "lateral",
    "table",
    "returning",
    "do",
    "call",
    "now()",
    "pg_catalog",
    ".",
    "/* pgway:primary */",
    "/* pgway:replica */",
    "set",
    "begin",
    "commit",
    "1for",
    "1into",
    "0x1F",
    "pgway.last_route",
    "'pgway.last_write_lsn'",
];

/// A statement to classify.
fn statement(rng: &mut StdRng) -> String {
    let mut sql = match rng.gen_range(0..4) {
        0 => {
            let n = rng.gen_range(1..12);
            let mut s = String::from("select ");
            for _ in 0..n {
                s.push_str(TOKENS.choose(rng).copied().unwrap_or_default());
                s.push(' ');
            }
            s
        }
        1 => format!(
            "{}; {}",
            CORPUS.choose(rng).copied().unwrap_or_default(),
            CORPUS.choose(rng).copied().unwrap_or_default()
        ),
        _ => CORPUS.choose(rng).copied().unwrap_or_default().to_owned(),
    };
    for _ in 0..rng.gen_range(0..3) {
        let mut words: Vec<&str> = sql.split(' ').collect();
        let at = rng.gen_range(0..=words.len());
        match rng.gen_range(0..3) {
            0 => words.insert(at, TOKENS.choose(rng).copied().unwrap_or_default()),
            1 if at < words.len() => {
                words.remove(at);
            }
            _ => {
                if let Some(w) = words.get_mut(at) {
                    *w = TOKENS.choose(rng).copied().unwrap_or_default();
                }
            }
        }
        sql = words.join(if rng.gen_bool(0.9) { " " } else { "" });
    }
    if rng.gen_bool(0.25) {
        let mut bytes = sql.into_bytes();
        let dict: Vec<&[u8]> = TOKENS.iter().map(|t| t.as_bytes()).collect();
        mutate(rng, &mut bytes, &dict);
        sql = String::from_utf8_lossy(&bytes).into_owned();
    }
    sql
}

/// Reserved words the fast path lets a `(` follow, which sqlparser may take for a
/// function's name (`and (2)`, `on ( )`).
const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "not",
    "on",
    "in",
    "where",
    "from",
    "join",
    "select",
    "as",
    "when",
    "then",
    "else",
    "case",
    "between",
    "lateral",
    "by",
    "having",
    "distinct",
    "union",
    "except",
    "intersect",
    "is",
    "like",
    "ilike",
];

/// True if the classifier reports only calls of reserved words: PostgreSQL rejects such a
/// text, so it fails on any node. Known, open: the fast path accepts
/// `select (1), and (2)` and `select on ( )`, which the classifier takes for calls.
fn keyword_call(functions: &[String]) -> bool {
    !functions.is_empty() && functions.iter().all(|f| KEYWORDS.contains(&f.as_str()))
}

/// True if sqlparser rejects `sql`: PostgreSQL will reject it too (or it is syntax
/// sqlparser does not know, which the classifier sends to the primary).
fn unparseable(sql: &str) -> bool {
    std::panic::catch_unwind(|| Parser::parse_sql(&PostgreSqlDialect {}, sql).is_err())
        .unwrap_or(true)
}

/// The classifier on arbitrary and mutated SQL: it never panics, is a function of its
/// text, honours a leading hint without changing the kind, and the router (cache, shapes,
/// fast path) agrees with it on what a statement is.
#[test]
fn fuzz_classifier() {
    let router = Router::new(Catalog::new(
        TopologyHandle::new(&[]),
        super::catalog::Credentials::default(),
        Duration::from_millis(10),
    ));
    run("fuzz_classifier", |rng| {
        let sql = statement(rng);
        let c = classify(&sql);
        assert_eq!(classify(&sql), c, "not deterministic: {sql:?}");
        if c.kind == StatementKind::Write {
            assert!(c.functions.is_empty(), "{sql:?}");
        }
        let _ = fast::shape(&sql);
        let routed = router.classification(&sql);
        if !fast::is_plain_select(sql.as_bytes()) {
            // A text served by another of its shape finds the same words in itself.
            assert_eq!(routed.words, c.words, "words of another text: {sql:?}");
        }
        let not_plain = c.kind != StatementKind::Read || !c.functions.is_empty();
        if not_plain && !keyword_call(&c.functions) && !unparseable(&sql) {
            // Whatever the cache or a shape shared with another text says, a statement
            // that is not a plain read never comes back as one (unless it does not parse:
            // PostgreSQL rejects it on any node).
            assert!(
                routed.kind != StatementKind::Read || !routed.functions.is_empty(),
                "router says plain read, classify says {:?}: {sql:?}",
                c.kind
            );
        }
        if c.hint.is_some() {
            return;
        }
        for (hint, comment) in [
            (Hint::Primary, "/* pgway:primary */ "),
            (Hint::Replica, "/*pgway:replica*/\n"),
            (Hint::Primary, "-- pgway:primary\n"),
        ] {
            let hinted = classify(&format!("{comment}{sql}"));
            assert_eq!(hinted.hint, Some(hint), "{comment}{sql:?}");
            assert_eq!(hinted.kind, c.kind, "{comment}{sql:?}");
        }
    });
}

/// What the fast path accepts the full classifier calls a plain read: no hint, no
/// function to look up, no session effect, no write. The one exception is a text the
/// parser rejects (PostgreSQL rejects it too, on whichever node).
#[test]
fn fuzz_fast_path_accepts_only_reads() {
    let mut accepted = 0u64;
    let mut unparsed = 0u64;
    run("fuzz_fast_path_accepts_only_reads", |rng| {
        let sql = statement(rng);
        if !fast::is_plain_select(sql.as_bytes()) {
            return;
        }
        accepted += 1;
        let c = classify(&sql);
        let plain = c.kind == StatementKind::Read
            && c.hint.is_none()
            && c.functions.is_empty()
            && c.session.is_empty()
            && !c.writes
            && !c.fresh
            && c.min_lsn == 0;
        if !plain && !keyword_call(&c.functions) {
            assert!(
                unparseable(&sql),
                "fast path took {c:?} for a read: {sql:?}"
            );
            unparsed += 1;
        }
    });
    println!("fuzz_fast_path_accepts_only_reads: {accepted} accepted, {unparsed} unparseable");
}

/// The fast path going on from an earlier text's point ([`fast::is_plain_select_again`])
/// answers as a whole scan does: texts that share a start with the one before them (a
/// statement, then its start with another statement's end), in both orders.
#[test]
fn fuzz_fast_path_resumes_as_a_whole_scan() {
    let mut plain = 0u64;
    run("fuzz_fast_path_resumes_as_a_whole_scan", |rng| {
        let first = statement(rng);
        let other = statement(rng);
        let cut = rng.gen_range(0..=first.len());
        let from = rng.gen_range(0..=other.len());
        let (Some(start), Some(end)) = (first.get(..cut), other.get(from..)) else {
            return;
        };
        let second = format!("{start}{end}");
        for (earlier, text) in [(&first, &second), (&second, &first)] {
            let _ = fast::is_plain_select_again(earlier.as_bytes());
            let again = fast::is_plain_select_again(text.as_bytes());
            assert_eq!(
                again,
                fast::is_plain_select(text.as_bytes()),
                "{earlier:?} then {text:?}"
            );
            plain += u64::from(again);
        }
    });
    println!("fuzz_fast_path_resumes_as_a_whole_scan: {plain} plain reads");
}
