//! The tokenizer and the token helpers shared by read/write classification
//! (the parent module) and session effects (`effects.rs`): tokenizing with
//! locations, trivia and keyword tests, the parse-depth guard, the statement
//! splitter, skipping leading comments, and the `pgway:` hint comments (see
//! [Hints](super#hints)).

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::tokenizer::{Token, TokenWithSpan, Tokenizer};

/// Where a statement is forced to go by a hint comment.
///
/// The hint is only reported; the caller decides precedence. A
/// [`Hint::Replica`] must never send a [`StatementKind::Write`] (or a `Read`
/// inside a read-write transaction) to a replica.
///
/// [`StatementKind::Write`]: super::StatementKind::Write
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hint {
    /// `/* pgway:primary */` or `-- pgway:primary`: run on the primary.
    Primary,
    /// `/* pgway:replica */` or `-- pgway:replica`: run on a replica, honoured
    /// only when the statement is a [`StatementKind::Read`].
    ///
    /// [`StatementKind::Read`]: super::StatementKind::Read
    Replica,
}

/// Tokenize `sql` with locations, or `None` if it does not tokenize.
pub(super) fn tokenize(sql: &str) -> Option<Vec<TokenWithSpan>> {
    Tokenizer::new(&PostgreSqlDialect {}, sql)
        .with_unescape(true)
        .tokenize_with_location()
        .ok()
}

/// Whitespace and comments (the tokenizer reports comments as whitespace).
pub(super) fn is_trivia(token: &Token) -> bool {
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
pub(super) fn too_deep(tokens: &[TokenWithSpan]) -> bool {
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

/// Split tokens into statements at `;`.
///
/// The one place where `;` does not end a statement is the body of a SQL
/// function written `CREATE FUNCTION ... BEGIN ATOMIC stmt; ... END`: the
/// statements inside belong to the `CREATE` (they run when the function is
/// called, not now), so they stay part of it until the `END` that starts a
/// `;`-separated piece.
pub(super) fn split_statements(tokens: &[TokenWithSpan]) -> Vec<&[TokenWithSpan]> {
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

/// An unquoted word equal to `keyword`, ignoring ASCII case.
pub(super) fn is_kw(token: &Token, keyword: &str) -> bool {
    matches!(token, Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case(keyword))
}

/// `sql` without leading whitespace and comments (block comments nest, as in
/// PostgreSQL), or `None` if a comment is not terminated.
pub(super) fn skip_leading_comments(sql: &str) -> Option<&str> {
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

/// What the comments in front of a statement ask for: `pgway:primary` or
/// `pgway:replica` (the first one counts), `pgway:fresh`, `pgway:min_lsn=<position>`
/// (the highest counts; a malformed position is ignored). Several may share a comment
/// (`/* pgway:fresh pgway:replica */`) or come in several comments, block or line;
/// case-insensitive, spaces allowed around the colon.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Hints {
    pub target: Option<Hint>,
    pub min_lsn: u64,
    pub fresh: bool,
}

/// The [`Hints`] in the comments that start `sql`.
pub(super) fn leading_hints(sql: &str) -> Hints {
    let mut hints = Hints::default();
    leading_comments(sql, |body| parse_hints(body, &mut hints));
    hints
}

/// Calls `f` with the body of each comment, block or line, in front of the first token
/// of `sql`.
pub(super) fn leading_comments(sql: &str, mut f: impl FnMut(&str)) {
    let mut rest = sql;
    loop {
        rest = rest.trim_start();
        let (body, after) = if let Some(inner) = rest.strip_prefix("/*") {
            let Some(end) = inner.find("*/") else {
                return;
            };
            (&inner[..end], &inner[end + 2..])
        } else if let Some(inner) = rest.strip_prefix("--") {
            let end = inner.find('\n').unwrap_or(inner.len());
            (&inner[..end], &inner[end..])
        } else {
            return;
        };
        f(body);
        rest = after;
    }
}

/// Adds the `pgway:<word>` items of one comment body to `hints`.
fn parse_hints(body: &str, hints: &mut Hints) {
    const PREFIX: &str = "pgway";
    let mut rest = body;
    while let Some(at) = find_ignore_case(rest, PREFIX) {
        let after = rest[at + PREFIX.len()..].trim_start();
        let Some(item) = after.strip_prefix(':') else {
            rest = &rest[at + PREFIX.len()..];
            continue;
        };
        let item = item.trim_start();
        let end = item.find(char::is_whitespace).unwrap_or(item.len());
        let (word, tail) = item.split_at(end);
        rest = tail;
        if word.eq_ignore_ascii_case("primary") {
            hints.target.get_or_insert(Hint::Primary);
        } else if word.eq_ignore_ascii_case("replica") {
            hints.target.get_or_insert(Hint::Replica);
        } else if word.eq_ignore_ascii_case("fresh") {
            hints.fresh = true;
        } else if let Some((key, value)) = word.split_once('=') {
            if key.eq_ignore_ascii_case("min_lsn") {
                if let Some(position) = crate::route::floors::parse_lsn(value) {
                    hints.min_lsn = hints.min_lsn.max(position);
                }
            }
        }
    }
}

/// Byte offset of `needle` (ASCII) in `haystack`, ignoring ASCII case.
fn find_ignore_case(haystack: &str, needle: &str) -> Option<usize> {
    haystack
        .as_bytes()
        .windows(needle.len())
        .position(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::super::{classify, StatementKind};
    use super::*;

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
}
