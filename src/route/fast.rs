//! A fast path for the commonest statement: a plain `SELECT` with its values inlined
//! (`SELECT abalance FROM pgbench_accounts WHERE aid = 4711`). Such texts differ on every
//! call, so the classification cache cannot help; parsing each costs microseconds.
//!
//! [`is_plain_select`] scans the text once and says yes only when the statement is
//! certainly a pure read that [`super::classify`] would route to a replica: one statement
//! starting with `SELECT`, no comments (hints need the full parser), no function calls or
//! other parenthesised constructs except after a few keywords, no `INTO`, no locking
//! clause, no `WITH`, no dollar quotes, no backslashes in strings, no `pg_` names (some
//! system views have rows only on the primary), no mention of a `pgway.` setting (the
//! classifier reports it as a session effect). Anything else, however
//! harmless, is left to the parser: a "no" here costs only the parse.

/// What a word means to the scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keyword {
    /// Rules the fast path out wherever it appears (`INTO`, `FOR`, a write, ...).
    Reject,
    /// A `(` after it opens a subquery or a list, not a function call.
    ParenOk,
    /// `CASE`: opens an expression that `END` closes (a `(` after it is fine too).
    Case,
    /// `END`: closes a `CASE`; anywhere else it ends a transaction (`select 1 end` is two
    /// statements to the parser).
    End,
    /// Anything else: an identifier, or a keyword that changes nothing here.
    Other,
}

/// Packs a word of at most 8 bytes into a `u64`, first byte highest, each byte with its
/// `0x20` bit set: ASCII letters become lower case, and no other byte that can be part of
/// a word (digits, `_`, `$`, non-ASCII) becomes a letter, so keywords compare exactly.
const fn pack(word: &[u8]) -> u64 {
    let mut key = 0u64;
    let mut i = 0;
    while i < word.len() {
        key = (key << 8) | (word[i] | 0x20) as u64;
        i += 1;
    }
    key
}

/// The keywords the scan knows, packed (see [`pack`]), and what each means. One `match`
/// on an integer: this runs for every word of every simple query.
macro_rules! keywords {
    ($($kind:ident: $($name:ident = $word:literal),+;)+) => {
        mod packed {
            $($(pub(super) const $name: u64 = super::pack($word);)+)+
        }

        fn packed_keyword(key: u64) -> Keyword {
            match key {
                $($(packed::$name)|+ => Keyword::$kind,)+
                _ => Keyword::Other,
            }
        }
    };
}

keywords! {
    Reject: INTO = b"into", FOR = b"for", WITH = b"with", INSERT = b"insert",
        UPDATE = b"update", DELETE = b"delete", MERGE = b"merge", COPY = b"copy",
        LOCK = b"lock", SHARE = b"share", NOWAIT = b"nowait", TABLE = b"table", DO = b"do",
        CALL = b"call", VALUES = b"values";
    ParenOk: IN = b"in", ANY = b"any", ALL = b"all", SOME = b"some", EXISTS = b"exists",
        AND = b"and", OR = b"or", NOT = b"not", ON = b"on", WHERE = b"where", FROM = b"from",
        JOIN = b"join", SELECT = b"select", AS = b"as", WHEN = b"when", THEN = b"then",
        ELSE = b"else", BETWEEN = b"between", LATERAL = b"lateral", BY = b"by",
        HAVING = b"having", DISTINCT = b"distinct", UNION = b"union", EXCEPT = b"except",
        IS = b"is", LIKE = b"like", ILIKE = b"ilike";
    Case: CASE = b"case";
    End: END = b"end";
}

/// Classifies `word` (any case).
fn keyword(word: &[u8]) -> Keyword {
    // System catalogs and views (`pg_prepared_xacts`, ...): the parser decides.
    if word.len() > 3 && word[..3].eq_ignore_ascii_case(b"pg_") {
        return Keyword::Reject;
    }
    match word.len() {
        0..=8 => packed_keyword(pack(word)),
        // The one longer keyword.
        9 if word.eq_ignore_ascii_case(b"intersect") => Keyword::ParenOk,
        _ => Keyword::Other,
    }
}

/// Byte classes for the scan (one table lookup per byte instead of a chain of tests).
const SPACE: u8 = 1;
/// Starts a word: letters, `_`, and any non-ASCII byte.
const WORD_START: u8 = 2;
/// Continues a word: word starts, digits, `$`.
const WORD: u8 = 4;
const DIGIT: u8 = 8;
/// Operators and separators that end a token and change nothing.
const PUNCT: u8 = 16;

const CLASS: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = if c.is_ascii_whitespace() {
            SPACE
        } else if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 {
            WORD_START | WORD
        } else if c.is_ascii_digit() {
            DIGIT | WORD
        } else if c == b'$' {
            WORD
        } else {
            match c {
                b')' | b',' | b'.' | b'*' | b'=' | b'<' | b'>' | b'+' | b'-' | b'/' | b'%'
                | b':' | b'[' | b']' | b'!' | b'~' | b'^' | b'|' | b'&' | b'@' | b'#' => PUNCT,
                _ => 0,
            }
        };
        b += 1;
    }
    table
};

fn class(b: u8) -> u8 {
    CLASS[usize::from(b)]
}

/// True when `sql` is certainly a plain read (see the module documentation).
pub fn is_plain_select(sql: &str) -> bool {
    let bytes = sql.as_bytes();
    let mut i = 0;
    while i < bytes.len() && class(bytes[i]) == SPACE {
        i += 1;
    }
    let starts = bytes.len() >= i + 7
        && bytes[i..i + 6].eq_ignore_ascii_case(b"select")
        && (class(bytes[i + 6]) == SPACE || bytes[i + 6] == b'*');
    if !starts || names_pgway(bytes) {
        return false;
    }
    // What the last word was, if the previous token was a word.
    let mut last_word: Option<Keyword> = None;
    // `CASE` expressions open.
    let mut cases = 0usize;
    while i < bytes.len() {
        let b = bytes[i];
        let c = class(b);
        if c == SPACE {
            i += 1;
        } else if c & WORD_START != 0 {
            let start = i;
            while i < bytes.len() && class(bytes[i]) & WORD != 0 {
                i += 1;
            }
            // E'...', U&'...', B'...', X'...' and N'...' literals: leave to the parser.
            if matches!(bytes.get(i), Some(b'\'') | Some(b'&')) {
                return false;
            }
            let word = keyword(&bytes[start..i]);
            match word {
                Keyword::Reject => return false,
                Keyword::Case => cases += 1,
                Keyword::End => match cases.checked_sub(1) {
                    Some(open) => cases = open,
                    None => return false,
                },
                _ => {}
            }
            last_word = Some(word);
        } else if c & DIGIT != 0 {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'.') {
                i += 1;
            }
            // `1into t` is `1 INTO t` to the parser (and to PostgreSQL before 15).
            if !is_number(&bytes[start..i]) {
                return false;
            }
            last_word = None;
        } else {
            match b {
                b'\'' => {
                    let Some(end) = skip_quoted(bytes, i) else {
                        return false;
                    };
                    i = end;
                    last_word = None;
                }
                b'"' => {
                    let Some(end) = skip_quoted(bytes, i) else {
                        return false;
                    };
                    i = end;
                    // A quoted identifier followed by `(` is a function call.
                    last_word = Some(Keyword::Other);
                }
                b'$' => {
                    // `$1` parameters only; `$tag$` quoting is left to the parser.
                    i += 1;
                    let start = i;
                    while i < bytes.len() && bytes[i].is_ascii_digit() {
                        i += 1;
                    }
                    if i == start {
                        return false;
                    }
                    last_word = None;
                }
                b'-' if bytes.get(i + 1) == Some(&b'-') => return false,
                b'/' if bytes.get(i + 1) == Some(&b'*') => return false,
                b';' => {
                    return bytes[i + 1..].iter().all(|&b| class(b) == SPACE);
                }
                b'(' => {
                    if last_word
                        .is_some_and(|word| !matches!(word, Keyword::ParenOk | Keyword::Case))
                    {
                        return false;
                    }
                    i += 1;
                    last_word = None;
                }
                _ if c == PUNCT => {
                    i += 1;
                    last_word = None;
                }
                _ => return false,
            }
        }
    }
    true
}

/// True if `run` (digits, letters and dots, starting with a digit) is one numeric literal:
/// digits and dots with an optional exponent (`1.5e3`), or `0x`/`0o`/`0b` and digits.
/// Anything else (`1into`, `2for`) is a number followed by a word to the parser.
fn is_number(run: &[u8]) -> bool {
    if let [b'0', b'x' | b'X' | b'o' | b'O' | b'b' | b'B', digits @ ..] = run {
        return !digits.is_empty() && digits.iter().all(u8::is_ascii_hexdigit);
    }
    let (mantissa, exponent) = match run.iter().position(|&b| b == b'e' || b == b'E') {
        Some(at) => (&run[..at], Some(&run[at + 1..])),
        None => (run, None),
    };
    mantissa.iter().all(|&b| b.is_ascii_digit() || b == b'.')
        && exponent.is_none_or(|e| !e.is_empty() && e.iter().all(u8::is_ascii_digit))
}

/// True if `text` mentions a `pgway.` setting, which the classifier reports as a session
/// effect ([`super::SessionEffect::UsesLastRoute`], ...) wherever it appears, inside a
/// word or a string too. Dots are few: only they are looked at.
fn names_pgway(text: &[u8]) -> bool {
    memchr::memchr_iter(b'.', text)
        .any(|dot| dot >= 5 && text[dot - 5..dot].eq_ignore_ascii_case(b"pgway"))
}

/// The index just past the string literal (`'`) or quoted identifier (`"`) that starts at
/// `start`, where a doubled quote stands for itself. `None` if it is not closed, or if a
/// string literal holds a backslash (an escape if `standard_conforming_strings` were off:
/// left to the parser).
fn skip_quoted(bytes: &[u8], start: usize) -> Option<usize> {
    let quote = bytes[start];
    let mut i = start + 1;
    loop {
        match *bytes.get(i)? {
            b'\\' if quote == b'\'' => return None,
            b if b == quote && bytes.get(i + 1) == Some(&quote) => i += 2,
            b if b == quote => return Some(i + 1),
            _ => i += 1,
        }
    }
}

/// The statement with every plain literal replaced (strings by `''`, numbers by `0`), so
/// texts that differ only in inlined values share one cache entry: what a statement is
/// does not depend on its values. `None` when the text holds anything this simple scan
/// does not understand (comments, dollar quotes, escape strings, backslashes), in which
/// case the exact text is the key.
pub fn shape(sql: &str) -> Option<String> {
    let bytes = sql.as_bytes();
    let mut out = String::with_capacity(sql.len());
    let mut i = 0;
    let mut in_word = false;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'\'' => {
                if in_word {
                    // E'..', U&'..', B'..', X'..', N'..'.
                    return None;
                }
                let start = i;
                i = skip_quoted(bytes, i)?;
                // Date/time inputs that read the clock ('now', 'today') keep their text:
                // the result cache tells them apart.
                let inner = sql.get(start + 1..i - 1)?.trim();
                if ["now", "today", "tomorrow", "yesterday"]
                    .iter()
                    .any(|w| inner.eq_ignore_ascii_case(w))
                {
                    out.push_str(sql.get(start..i)?);
                } else {
                    out.push_str("''");
                }
            }
            b'"' => {
                let start = i;
                i = skip_quoted(bytes, i)?;
                out.push_str(sql.get(start..i)?);
            }
            b'$' if !in_word => {
                let start = i;
                i += 1;
                while i < bytes.len() && bytes[i].is_ascii_digit() {
                    i += 1;
                }
                if i == start + 1 {
                    return None;
                }
                out.push_str(sql.get(start..i)?);
            }
            b'-' if bytes.get(i + 1) == Some(&b'-') => return None,
            b'/' if bytes.get(i + 1) == Some(&b'*') => return None,
            b if b.is_ascii_digit() && !in_word => {
                let start = i;
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'.') {
                    i += 1;
                }
                // Not a number alone (`1into`): a keyword may hide in it, keep the text.
                if !is_number(&bytes[start..i]) {
                    return None;
                }
                out.push('0');
            }
            b if b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80 => {
                let start = i;
                while i < bytes.len()
                    && (bytes[i].is_ascii_alphanumeric()
                        || bytes[i] == b'_'
                        || bytes[i] == b'$'
                        || bytes[i] >= 0x80)
                {
                    i += 1;
                }
                out.push_str(sql.get(start..i)?);
                in_word = true;
                continue;
            }
            _ => {
                out.push(b as char);
                i += 1;
            }
        }
        in_word = false;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::super::classify::{classify, StatementKind};
    use super::*;

    const YES: &[&str] = &[
        "SELECT abalance FROM pgbench_accounts WHERE aid = 4711;",
        "select * from t where id = $1",
        "  SELECT a, b FROM t WHERE a IN (1, 2, 3) AND b = 'it''s' ORDER BY a DESC LIMIT 10",
        "select x from t where exists (select 1 from u where u.id = t.id)",
        "select \"Weird\".\"Col\" from \"Weird\" where v::int > 3",
        "select t.a from t join u on (t.id = u.id) where t.b = any($1)",
        "select*from t",
        "select 1",
        "SELECT a FROM t INTERSECT (SELECT b FROM u) UNION\t(select c from v)",
        "select 1.5e3, 0x1F from t where n between 1 and 2",
        "select case when a then (case b when 1 then 2 end) else 3 END from t",
    ];

    const NO: &[&str] = &[
        "select nextval('s')",
        // Found by `fuzz_fast_path_accepts_only_reads`: `END` outside a `CASE` is a
        // statement of its own (a COMMIT) to the parser.
        "select aordeer end ord ordeer e",
        "select case when a then 1 end end",
        // Found by `fuzz_fast_path_accepts_only_reads`: the classifier reports a session
        // effect for any mention of a pgway setting.
        "select not pgway.last_route",
        "select * from t where name = 'PGWAY.last_write_lsn'",
        "select selectpgway.last_route",
        // Found by `fuzz_fast_path_accepts_only_reads`: `1 INTO u` to the parser.
        "select 1into u",
        "select * from t where id = 2for update",
        "select count(*) from t",
        "select * from t for update",
        "select * from t for no key update",
        "select * into t2 from t",
        "select 1; delete from t",
        "/* pgway:primary */ select 1",
        "select 1 -- pgway:primary",
        "select $$x$$",
        "select E'\\''; delete from t; select ''",
        "select 'a\\'; delete from t; --'",
        "with x as (delete from t returning *) select * from x",
        "select * from (with x as (select 1) select * from x) y",
        "selectx from t",
        "insert into t values (1)",
        "select \"nextval\"('s')",
        "select * from t, lateral my_func(t.id)",
        "select * from my_func(1)",
        "select * from t where x = Some_Function_Name(1)",
        "select a from t INTO t2",
        "select a from t where b = 'unterminated",
        "select pg_advisory_lock(1)",
        "select gid from pg_prepared_xacts",
        "select * from t tablesample system (10)",
        "select u&'\\0041'",
        "select 1 ; ; delete from t",
        "select * from t lock in share mode",
        "select ARRAY(select 1)",
    ];

    #[test]
    fn keywords_match_in_any_case_and_only_whole() {
        assert_eq!(keyword(b"INTERSECT"), Keyword::ParenOk);
        assert_eq!(keyword(b"Into"), Keyword::Reject);
        assert_eq!(keyword(b"intersects"), Keyword::Other);
        assert_eq!(keyword(b"int"), Keyword::Other);
        assert_eq!(keyword(b"pgbench_accounts"), Keyword::Other);
        assert_eq!(keyword(b"Case"), Keyword::Case);
        assert_eq!(keyword(b"END"), Keyword::End);
        // Bytes that are not letters never pack to a keyword's letters.
        assert_eq!(keyword(b"i_"), Keyword::Other);
        assert_eq!(keyword(b"o\x92"), Keyword::Other);
        assert_eq!(keyword(b"\0in"), Keyword::Other);
    }

    #[test]
    fn accepts_plain_selects() {
        for sql in YES {
            assert!(is_plain_select(sql), "should take the fast path: {sql}");
        }
    }

    #[test]
    fn leaves_everything_else_to_the_parser() {
        for sql in NO {
            assert!(
                !is_plain_select(sql),
                "should not take the fast path: {sql}"
            );
        }
    }

    #[test]
    fn never_disagrees_with_the_parser() {
        for sql in YES.iter().chain(NO) {
            if is_plain_select(sql) {
                let c = classify(sql);
                assert_eq!(c.kind, StatementKind::Read, "{sql}");
                assert!(
                    c.functions.is_empty() && c.session.is_empty() && c.hint.is_none(),
                    "{sql}: {c:?}"
                );
            }
        }
    }

    #[test]
    fn never_panics_on_truncations() {
        for sql in YES.iter().chain(NO) {
            for end in 0..=sql.len() {
                if let Some(prefix) = sql.get(..end) {
                    let _ = is_plain_select(prefix);
                }
            }
        }
    }

    #[test]
    fn shapes_drop_values_only() {
        assert_eq!(
            shape("UPDATE pgbench_accounts SET abalance = abalance + -42 WHERE aid = 17;")
                .as_deref(),
            Some("UPDATE pgbench_accounts SET abalance = abalance + -0 WHERE aid = 0;")
        );
        assert_eq!(
            shape("select * from t2 where a = 'x''y' and b = 1.5e3 and c = $12").as_deref(),
            Some("select * from t2 where a = '' and b = 0 and c = $12")
        );
        assert_eq!(
            shape("select \"a1\" from t"),
            Some("select \"a1\" from t".into())
        );
        for sql in [
            "select E'x'",
            // Found by `fuzz_classifier`: it shared an entry with `select 5 u`, a read.
            "select 1into u",
            "select 'a\\'",
            "select 1 -- c",
            "/* h */ select 1",
            "select $$x$$",
            "select 'open",
        ] {
            assert_eq!(shape(sql), None, "{sql}");
        }
    }

    #[test]
    fn statements_of_one_shape_classify_alike() {
        let pairs = [
            (
                "select * from t where id = 1 for update",
                "select * from t where id = 2 for update",
            ),
            (
                "insert into t values (1, 'a')",
                "insert into t values (2, 'b')",
            ),
            ("select nextval('a')", "select nextval('b')"),
            (
                "select * from t where x = 'for update'",
                "select * from t where x = 'plain'",
            ),
            ("select * from t limit 5", "select * from t limit 10"),
        ];
        for (a, b) in pairs {
            assert_eq!(shape(a), shape(b), "{a} / {b}");
            let (ca, cb) = (classify(a), classify(b));
            assert_eq!(
                (ca.kind, &ca.functions),
                (cb.kind, &cb.functions),
                "{a} / {b}"
            );
        }
    }
}
