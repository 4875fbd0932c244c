//! What the result cache needs to know of a SQL string: whether it is one query it may
//! keep the result of, the relations that query reads, whether it reads the clock, the
//! tables a write names, and the `pgway:cache` hint.

use std::ops::ControlFlow;
use std::time::Duration;

use sqlparser::ast::{visit_relations, ObjectName, Query, Statement, TableFactor, Visit, Visitor};
use sqlparser::tokenizer::{Token, TokenWithSpan};

use super::tokens::{is_kw, is_trivia, leading_comments, split_statements};

/// `/* pgway:cache [ttl=30s] [tables=a.b,c.d] */`: cache this statement's result.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CacheHint {
    /// How long the entry lives (`None`: `cache.default_ttl`).
    pub ttl: Option<Duration>,
    /// Tables the result depends on beyond those pgway finds itself (the tables of a
    /// function it cannot see into, or of a view).
    pub tables: Vec<String>,
}

/// The result cache's facts about one SQL string.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CacheFacts {
    /// The string is one query (`SELECT`, `VALUES`, `TABLE`, `WITH` of reads): its result
    /// may be kept.
    pub query: bool,
    /// For a query: the relations it reads. For a write: the relations it names (DML
    /// targets and what it reads). As written: lower-cased unless quoted, qualified if
    /// written so; CTE names left out. `None`: pgway cannot tell which tables it may
    /// change (DDL, `CALL`, `DO`, anything that does not parse).
    pub tables: Option<Vec<String>>,
    /// It reads the clock (`now()`, `current_timestamp`, `'now'::timestamptz`, ...): its
    /// result changes with time, so only a hint caches it.
    pub clock: bool,
    /// `pgway:cache` in a leading comment.
    pub hint: Option<CacheHint>,
    /// It may change what logical decoding does not report: DDL, `GRANT`/`REVOKE`,
    /// policies, `REFRESH MATERIALIZED VIEW`, comments, and `DO`/`CALL`, which may run
    /// any of them (a word scan of each statement's first word; unparseable text counts).
    pub changes_schema: bool,
}

/// Words that read the clock when used as a function or a keyword, and date/time input
/// strings that do.
const CLOCK_WORDS: &[&str] = &[
    "now",
    "current_timestamp",
    "current_date",
    "current_time",
    "localtime",
    "localtimestamp",
    "statement_timestamp",
    "transaction_timestamp",
    "clock_timestamp",
    "timeofday",
];
const CLOCK_STRINGS: &[&str] = &["now", "today", "tomorrow", "yesterday"];

/// Statements that change what logical decoding does not report (or may run such).
const SCHEMA_CHANGES: &[&str] = &[
    "create", "alter", "drop", "grant", "revoke", "refresh", "comment", "security", "reindex",
    "cluster", "import", "do", "call",
];

/// True if a statement of `tokens` starts with one of [`SCHEMA_CHANGES`], or `tokens` is
/// `None` (the text did not tokenize).
pub(super) fn changes_schema(tokens: Option<&[TokenWithSpan]>) -> bool {
    let Some(tokens) = tokens else {
        return true;
    };
    split_statements(tokens).iter().any(|statement| {
        statement
            .iter()
            .find(|t| !is_trivia(&t.token))
            .is_some_and(|t| SCHEMA_CHANGES.iter().any(|w| is_kw(&t.token, w)))
    })
}

/// True if the tokens read the clock (a word scan: a column named `now` counts too).
pub(super) fn reads_clock(tokens: &[TokenWithSpan]) -> bool {
    tokens.iter().any(|t| match &t.token {
        Token::Word(w) if w.quote_style.is_none() => {
            CLOCK_WORDS.iter().any(|c| w.value.eq_ignore_ascii_case(c))
        }
        Token::SingleQuotedString(s) => CLOCK_STRINGS
            .iter()
            .any(|c| s.trim().eq_ignore_ascii_case(c)),
        _ => false,
    })
}

/// The facts for parsed `statements` (`None`: the string did not parse).
pub(super) fn facts(
    sql: &str,
    statements: Option<&[Statement]>,
    clock: bool,
    read: bool,
    changes_schema: bool,
) -> CacheFacts {
    let hint = cache_hint(sql);
    let Some(statements) = statements else {
        return CacheFacts {
            hint,
            clock,
            changes_schema,
            ..CacheFacts::default()
        };
    };
    let query = read && matches!(statements, [Statement::Query(_)]);
    let names_its_tables = statements.iter().all(|s| {
        matches!(
            s,
            Statement::Query(_)
                | Statement::Insert(_)
                | Statement::Update { .. }
                | Statement::Delete(_)
                | Statement::Truncate { .. }
                | Statement::Merge { .. }
                | Statement::Set(_)
                | Statement::ShowVariable { .. }
                | Statement::StartTransaction { .. }
                | Statement::Commit { .. }
                | Statement::Rollback { .. }
                | Statement::Savepoint { .. }
                | Statement::ReleaseSavepoint { .. }
        )
    });
    let tables = (query || (!read && names_its_tables)).then(|| {
        let mut tables = Vec::new();
        add_tables(statements, &mut tables);
        tables.sort_unstable();
        tables.dedup();
        tables
    });
    CacheFacts {
        query,
        tables,
        clock,
        hint,
        changes_schema,
    }
}

/// Adds the relations `statements` name to `tables`, leaving out CTE names.
pub(super) fn add_tables(statements: &[Statement], tables: &mut Vec<String>) {
    /// CTE names, and functions called in `FROM` (which sqlparser names as relations).
    #[derive(Default)]
    struct NotTables {
        ctes: Vec<String>,
        functions: Vec<String>,
    }
    impl Visitor for NotTables {
        type Break = ();
        fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
            if let Some(with) = &query.with {
                for cte in &with.cte_tables {
                    self.ctes.push(cte.alias.name.value.to_ascii_lowercase());
                }
            }
            ControlFlow::Continue(())
        }
        fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
            if let TableFactor::Table {
                name,
                args: Some(_),
                ..
            } = factor
            {
                self.functions.push(folded(name));
            }
            ControlFlow::Continue(())
        }
    }

    let mut not_tables = NotTables::default();
    for statement in statements {
        let _ = statement.visit(&mut not_tables);
    }
    let mut add = |name: &ObjectName| {
        let full = folded(name);
        let a_cte = !full.contains('.') && not_tables.ctes.contains(&full);
        if !a_cte && !full.is_empty() && !not_tables.functions.contains(&full) {
            tables.push(full);
        }
        ControlFlow::<()>::Continue(())
    };
    for statement in statements {
        let _ = visit_relations(statement, &mut add);
    }
}

/// A name as PostgreSQL folds it: unquoted parts lower-cased, joined with `.`.
fn folded(name: &ObjectName) -> String {
    name.0
        .iter()
        .filter_map(|part| part.as_ident())
        .map(|ident| match ident.quote_style {
            Some(_) => ident.value.clone(),
            None => ident.value.to_ascii_lowercase(),
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// The `pgway:cache` hint in the comments that start `sql`, with its `ttl=` and
/// `tables=` (a malformed `ttl` is ignored).
pub fn cache_hint(sql: &str) -> Option<CacheHint> {
    let mut found = None;
    leading_comments(sql, |body| {
        let mut words = body.split_whitespace().peekable();
        while let Some(word) = words.next() {
            let Some(item) = strip_prefix_ignore_case(word, "pgway:") else {
                continue;
            };
            if !item.eq_ignore_ascii_case("cache") {
                continue;
            }
            let hint: &mut CacheHint = found.get_or_insert_with(CacheHint::default);
            while let Some(option) =
                words.next_if(|w| strip_prefix_ignore_case(w, "pgway:").is_none())
            {
                let Some((key, value)) = option.split_once('=') else {
                    continue;
                };
                if key.eq_ignore_ascii_case("ttl") {
                    hint.ttl = humantime_serde::re::humantime::parse_duration(value).ok();
                } else if key.eq_ignore_ascii_case("tables") {
                    hint.tables.extend(
                        value
                            .split(',')
                            .map(str::trim)
                            .filter(|t| !t.is_empty())
                            .map(table_name),
                    );
                }
            }
        }
    });
    found
}

/// A table name as the hint or a rule writes it, folded as PostgreSQL folds unquoted
/// identifiers (`"Odd"` keeps its case).
pub fn table_name(written: &str) -> String {
    written
        .split('.')
        .map(
            |part| match part.strip_prefix('"').and_then(|p| p.strip_suffix('"')) {
                Some(quoted) => quoted.to_owned(),
                None => part.to_ascii_lowercase(),
            },
        )
        .collect::<Vec<_>>()
        .join(".")
}

fn strip_prefix_ignore_case<'a>(word: &'a str, prefix: &str) -> Option<&'a str> {
    let head = word.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &word[prefix.len()..])
}

#[cfg(test)]
mod tests {
    use super::super::classify;
    use super::*;

    #[test]
    fn a_query_lists_its_tables_without_ctes() {
        let c = classify(
            "with g as (select * from accounts.groups) select * from g join Users u using (id)",
        );
        assert!(c.cache.query);
        assert_eq!(
            c.cache.tables.as_deref(),
            Some(&["accounts.groups".to_owned(), "users".to_owned()][..])
        );
        assert!(!c.cache.clock);
        let c = classify("select * from accounts.get_user(1) u join t using (id)");
        assert_eq!(c.cache.tables.as_deref(), Some(&["t".to_owned()][..]));
        let c = classify("select * from \"Odd\".t where x > now()");
        assert_eq!(c.cache.tables.as_deref(), Some(&["Odd.t".to_owned()][..]));
        assert!(c.cache.clock);
        assert!(
            classify("select '2020-01-01'::date, 'today'::date")
                .cache
                .clock
        );
        assert!(!classify("select 1; select 2").cache.query);
        assert!(!classify("show search_path").cache.query);
        assert!(!classify("select * from t for update").cache.query);
    }

    #[test]
    fn writes_name_their_tables_unless_pgway_cannot_tell() {
        let tables = |sql: &str| classify(sql).cache.tables;
        assert_eq!(
            tables("insert into a.t select * from u"),
            Some(vec!["a.t".to_owned(), "u".to_owned()])
        );
        assert_eq!(tables("update t set x = 1"), Some(vec!["t".to_owned()]));
        assert_eq!(tables("delete from t"), Some(vec!["t".to_owned()]));
        assert_eq!(
            tables("truncate a, b"),
            Some(vec!["a".to_owned(), "b".to_owned()])
        );
        assert_eq!(
            tables("begin; update t set x = 1; commit"),
            Some(vec!["t".to_owned()])
        );
        assert_eq!(tables("alter table t add column y int"), None);
        assert_eq!(tables("call p()"), None);
        assert_eq!(tables("do $$ begin end $$"), None);
        assert_eq!(tables("garbage !!"), None);
        let schema = |sql: &str| classify(sql).cache.changes_schema;
        assert!(schema("alter table t add column y int"));
        assert!(schema("update t set x = 1; grant select on t to x"));
        assert!(schema("do $$ begin end $$"));
        assert!(!schema("update t set x = 1"));
        assert!(!schema("select f()"));
    }

    #[test]
    fn the_cache_hint_takes_ttl_and_tables() {
        assert_eq!(cache_hint("select 1"), None);
        assert_eq!(
            cache_hint("/* pgway:cache */ select 1"),
            Some(CacheHint::default())
        );
        assert_eq!(
            cache_hint("/* pgway:cache ttl=30s tables=accounts.users,\"Odd\".T */ select f()"),
            Some(CacheHint {
                ttl: Some(Duration::from_secs(30)),
                tables: vec!["accounts.users".to_owned(), "Odd.t".to_owned()],
            })
        );
        assert_eq!(
            cache_hint("-- pgway:replica pgway:cache ttl=2m pgway:fresh\nselect 1")
                .and_then(|h| h.ttl),
            Some(Duration::from_secs(120))
        );
        assert_eq!(cache_hint("select 1 /* pgway:cache */"), None);
    }
}
