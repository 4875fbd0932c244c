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
//!
//! Such texts mostly repeat the one before them up to their values:
//! [`is_plain_select_again`] remembers, per thread, where the scan of the last text it
//! took stood after its last white space, and scans a text that starts with the same bytes
//! only from there.

use std::borrow::Cow;
use std::cell::{Cell, RefCell};

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

/// [`pack`] of `text[end - len..end]`, a word of 1 to 8 bytes: read as one 8-byte load
/// where the text has 8 bytes up to `end`, the bytes before the word masked off; a word
/// in the first 8 bytes of a longer text (the leading `SELECT`) from the text's first 8
/// bytes, the bytes after it shifted out.
fn pack_word(text: &[u8], end: usize, len: usize) -> u64 {
    let eight = |from: usize| {
        text.get(from..from + 8)
            .and_then(|eight| <[u8; 8]>::try_from(eight).ok())
            .map(u64::from_be_bytes)
    };
    let loaded = match end.checked_sub(8) {
        Some(from) => eight(from),
        None => eight(0).and_then(|first8| first8.checked_shr(8 * (8 - end as u32))),
    };
    match loaded {
        Some(loaded) if (1..=8).contains(&len) && len <= end => {
            let keep = u64::MAX >> (64 - 8 * len);
            (loaded | 0x2020_2020_2020_2020) & keep
        }
        _ => pack(&text[end - len..end]),
    }
}

/// Classifies the word `text[start..end]` (any case). Only a word of at most 8 bytes is
/// packed (see [`pack`]): the longer ones (most identifiers) are never keywords but one.
fn keyword(text: &[u8], start: usize, end: usize) -> Keyword {
    let word = &text[start..end];
    // System catalogs and views (`pg_prepared_xacts`, ...): the parser decides.
    if word.len() > 3 && word[2] == b'_' && word[..2].eq_ignore_ascii_case(b"pg") {
        return Keyword::Reject;
    }
    match word.len() {
        0..=8 => packed_keyword(pack_word(text, end, word.len())),
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
/// Letters, digits and `_`: the bytes of a word to [`scan_words`] (which, unlike the
/// scans above, ends a word at `$` and at any byte outside ASCII).
const ASCII_WORD: u8 = 32;

const CLASS: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = if c.is_ascii_whitespace() {
            SPACE
        } else if c.is_ascii_alphabetic() || c == b'_' {
            WORD_START | WORD | ASCII_WORD
        } else if c >= 0x80 {
            WORD_START | WORD
        } else if c.is_ascii_digit() {
            DIGIT | WORD | ASCII_WORD
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
pub fn is_plain_select(bytes: &[u8]) -> bool {
    match start(bytes) {
        Some(at) => scan(bytes, at).0,
        None => false,
    }
}

/// Longest start of a text that [`is_plain_select_again`] and [`shape_again`] remember.
const REPEAT_MAX: usize = 1024;

/// The start of the last text this thread's [`is_plain_select_again`] took, up to the last
/// point its scan passed after white space, and that point.
struct Repeat {
    start: Vec<u8>,
    point: Point,
}

thread_local! {
    static REPEAT: RefCell<Repeat> = const {
        RefCell::new(Repeat {
            start: Vec::new(),
            point: Point {
                at: 0,
                last_word: None,
                cases: 0,
            },
        })
    };
}

/// [`is_plain_select`] for the per-statement path. Applications send one statement again
/// and again with other values inlined, and mostly the values come last
/// (`... WHERE aid = 4711`): a text that begins with the same bytes as the last one this
/// thread took, up to the point where that one's scan last passed white space, is scanned
/// only from there on. The answer is the same as a whole scan's (see [`scan`]).
pub fn is_plain_select_again(bytes: &[u8]) -> bool {
    REPEAT.with(|repeat| {
        let Ok(mut last) = repeat.try_borrow_mut() else {
            return is_plain_select(bytes);
        };
        let at = last.point.at;
        if at != 0 && bytes.get(..at) == Some(last.start.as_slice()) {
            return scan(bytes, last.point).0;
        }
        let Some(from) = start(bytes) else {
            return false;
        };
        let (plain, passed) = scan(bytes, from);
        if let Some(point) = passed.filter(|point| plain && point.at <= REPEAT_MAX) {
            last.start.clear();
            last.start.extend_from_slice(&bytes[..point.at]);
            last.point = point;
        }
        plain
    })
}

/// Where the scan of a text that starts with `SELECT` begins (at that word), after
/// leading white space; `None` for any other text.
fn start(bytes: &[u8]) -> Option<Point> {
    let mut i = 0;
    while i < bytes.len() && class(bytes[i]) == SPACE {
        i += 1;
    }
    // `select` is letters only: its packed form compares case-blind and exactly.
    let starts = bytes.len() >= i + 7
        && pack_word(bytes, i + 6, 6) == packed::SELECT
        && (class(bytes[i + 6]) == SPACE || bytes[i + 6] == b'*');
    starts.then_some(Point {
        at: i,
        last_word: None,
        cases: 0,
    })
}

/// Where [`scan`] stands between two tokens: everything it needs to go on from there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Point {
    /// The next byte to look at.
    at: usize,
    /// What the last word was, if the previous token was a word.
    last_word: Option<Keyword>,
    /// `CASE` expressions open.
    cases: usize,
}

/// [`is_plain_select`] from `from` on. Also returns the last point the scan passed right
/// after white space, if it passed one: no token before that point looked at a byte past
/// it (a token looks at most one byte past its end, white space at none, and [`start`]
/// only at `SELECT` and the byte after it), so the scan of a text with the same bytes up
/// to there reaches the same point, and may go on from there
/// ([`is_plain_select_again`]).
fn scan(bytes: &[u8], from: Point) -> (bool, Option<Point>) {
    let Point {
        at: mut i,
        mut last_word,
        mut cases,
    } = from;
    let mut resume = None;
    while i < bytes.len() {
        let b = bytes[i];
        let c = class(b);
        if c == SPACE {
            i += 1;
            resume = Some(Point {
                at: i,
                last_word,
                cases,
            });
        } else if c & WORD_START != 0 {
            let start = i;
            i += word_len(&bytes[i..]);
            // E'...', U&'...', B'...', X'...' and N'...' literals: leave to the parser.
            if matches!(bytes.get(i), Some(b'\'') | Some(b'&')) {
                return (false, resume);
            }
            let word = keyword(bytes, start, i);
            match word {
                Keyword::Reject => return (false, resume),
                Keyword::Case => cases += 1,
                Keyword::End => match cases.checked_sub(1) {
                    Some(open) => cases = open,
                    None => return (false, resume),
                },
                _ => {}
            }
            last_word = Some(word);
        } else if c & DIGIT != 0 {
            // `1into t` is `1 INTO t` to the parser (and to PostgreSQL before 15).
            let Some(len) = number(&bytes[i..]) else {
                return (false, resume);
            };
            i += len;
            last_word = None;
        } else {
            match b {
                b'\'' => {
                    let Some(end) = skip_quoted_plain(bytes, i) else {
                        return (false, resume);
                    };
                    i = end;
                    last_word = None;
                }
                b'"' => {
                    let Some(end) = skip_quoted_plain(bytes, i) else {
                        return (false, resume);
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
                        return (false, resume);
                    }
                    last_word = None;
                }
                b'-' if bytes.get(i + 1) == Some(&b'-') => return (false, resume),
                b'/' if bytes.get(i + 1) == Some(&b'*') => return (false, resume),
                b';' => {
                    return (bytes[i + 1..].iter().all(|&b| class(b) == SPACE), resume);
                }
                b'(' => {
                    if last_word
                        .is_some_and(|word| !matches!(word, Keyword::ParenOk | Keyword::Case))
                    {
                        return (false, resume);
                    }
                    i += 1;
                    last_word = None;
                }
                b'.' if follows_pgway(bytes, i) => return (false, resume),
                _ if c == PUNCT => {
                    i += 1;
                    last_word = None;
                }
                _ => return (false, resume),
            }
        }
    }
    (true, resume)
}

/// How many bytes at the start of `rest` continue a word ([`WORD`]).
fn word_len(rest: &[u8]) -> usize {
    rest.iter()
        .position(|&b| class(b) & WORD == 0)
        .unwrap_or(rest.len())
}

/// The length of the numeric literal at the start of `rest` (which starts with a digit):
/// digits and dots with an optional exponent (`1.5e3`), or `0x`/`0o`/`0b` and digits.
/// `None` if letters, digits or dots follow it (`1into`, `2for`, `1e5e3`): that run is a
/// number followed by a word to the parser. One pass over the run.
fn number(rest: &[u8]) -> Option<usize> {
    let run_byte = |at: usize| {
        rest.get(at)
            .is_some_and(|&b| b.is_ascii_alphanumeric() || b == b'.')
    };
    let mut i = 0;
    if let [b'0', b'x' | b'X' | b'o' | b'O' | b'b' | b'B', ..] = rest {
        i = 2;
        while rest.get(i).is_some_and(u8::is_ascii_hexdigit) {
            i += 1;
        }
        return (i > 2 && !run_byte(i)).then_some(i);
    }
    while rest
        .get(i)
        .is_some_and(|&b| b.is_ascii_digit() || b == b'.')
    {
        i += 1;
    }
    if let Some(b'e' | b'E') = rest.get(i) {
        i += 1;
        let digits = i;
        while rest.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == digits {
            return None;
        }
    }
    (!run_byte(i)).then_some(i)
}

/// True if `text` mentions a `pgway.` setting, which the classifier reports as a session
/// effect ([`super::SessionEffect::UsesLastRoute`], ...) wherever it appears, inside a
/// word or a string too. Dots are few: only they are looked at.
///
/// [`is_plain_select`] checks each dot as it meets it instead (between tokens, and inside
/// quotes); a dot inside a number (`1.5`) cannot follow `pgway`: a run of digits and
/// letters with a `y` in it is no number, and the scan refuses it.
fn names_pgway(text: &[u8]) -> bool {
    memchr::memchr_iter(b'.', text).any(|dot| follows_pgway(text, dot))
}

/// True if the dot at `dot` follows `pgway` (any case).
fn follows_pgway(text: &[u8], dot: usize) -> bool {
    dot >= 5 && text[dot - 5..dot].eq_ignore_ascii_case(b"pgway")
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

/// [`skip_quoted`] for [`is_plain_select`]: `None` also if the quoted text names a
/// `pgway.` setting.
fn skip_quoted_plain(bytes: &[u8], start: usize) -> Option<usize> {
    skip_quoted(bytes, start).filter(|&end| !names_pgway(&bytes[start..end]))
}

fn is_word_byte(b: u8) -> bool {
    class(b) & ASCII_WORD != 0
}

/// What the word scan of a request's text found: the cheap checks that decide whether a
/// request needs a closer look once it is answered. A word anywhere counts (in a string or
/// a column name too): a false alarm costs a look, a miss would cost correctness. Kept in
/// the text's [`super::Classification`] (texts of one [`shape`] have the same words:
/// a string holding one has no shape).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Words {
    /// `COMMIT` or `END`: the request may end a transaction with a commit.
    pub commits: bool,
    /// `COPY`: it may run a COPY.
    pub copies: bool,
    /// It may let go of session-bound state: `UNLISTEN`, `DEALLOCATE`, `DISCARD`, `DROP`,
    /// `CLOSE`, the end of a transaction (`COMMIT`, `END`, `ROLLBACK`, `ABORT`, for
    /// `ON COMMIT DROP`), `pg_advisory_unlock*`. Checked only for pinned clients and
    /// inside transactions; a false alarm costs one check, and only for a client that is
    /// pinned once the request is done.
    pub releases: bool,
}

/// The words of `sql` taken as one statement with nothing after it but a `;` and white
/// space (a comment is a word too, which no caller accepts).
fn plain_words(sql: &[u8]) -> impl Iterator<Item = &[u8]> {
    let text = sql.trim_ascii_end();
    let text = text.strip_suffix(b";").unwrap_or(text);
    text.split(u8::is_ascii_whitespace)
        .filter(|word| !word.is_empty())
}

fn is_word(word: Option<&[u8]>, expected: &[u8]) -> bool {
    word.is_some_and(|word| word.eq_ignore_ascii_case(expected))
}

/// True when `sql` is one plain transaction start: `BEGIN`, `BEGIN WORK`, `BEGIN
/// TRANSACTION` or `START TRANSACTION`, in any case, with no modes, no comment and nothing
/// after it but a `;` and white space. Such a `BEGIN` takes no snapshot, lock or
/// transaction id on the server, so a gateway may answer it and send it in front of the
/// transaction's first statement.
pub fn is_plain_begin(sql: &[u8]) -> bool {
    let mut words = plain_words(sql);
    // Any other statement is turned down at its first word.
    let first = words.next();
    let plain = if is_word(first, b"begin") {
        match words.next() {
            None => true,
            second => is_word(second, b"work") || is_word(second, b"transaction"),
        }
    } else {
        is_word(first, b"start") && is_word(words.next(), b"transaction")
    };
    plain && words.next().is_none()
}

/// True when `sql` is one plain commit: `COMMIT` or `END`, alone or with `WORK` or
/// `TRANSACTION`, in any case, with no `AND CHAIN`, no comment and nothing after it but a
/// `;` and white space. Such a text is also one statement the extended protocol takes.
pub fn is_plain_commit(sql: &[u8]) -> bool {
    let mut words = plain_words(sql);
    let first = words.next();
    if !(is_word(first, b"commit") || is_word(first, b"end")) {
        return false;
    }
    match words.next() {
        None => true,
        second => {
            (is_word(second, b"work") || is_word(second, b"transaction")) && words.next().is_none()
        }
    }
}

/// Scans `sql` once for the words of [`Words`]: one pass, a table lookup per byte, and a
/// word compared only when its length matches one of the few.
pub fn scan_words(sql: &[u8]) -> Words {
    const END: u64 = pack(b"end");
    const COPY: u64 = pack(b"copy");
    const DROP: u64 = pack(b"drop");
    const ABORT: u64 = pack(b"abort");
    const CLOSE: u64 = pack(b"close");
    const COMMIT: u64 = pack(b"commit");
    const DISCARD: u64 = pack(b"discard");
    const UNLISTEN: u64 = pack(b"unlisten");
    const ROLLBACK: u64 = pack(b"rollback");
    let mut found = Words::default();
    let mut i = 0;
    while i < sql.len() {
        if !is_word_byte(sql[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < sql.len() && is_word_byte(sql[i]) {
            i += 1;
        }
        let word = &sql[start..i];
        match word.len() {
            3..=8 => match pack(word) {
                END | COMMIT => {
                    found.commits = true;
                    found.releases = true;
                }
                COPY => found.copies = true,
                DROP | ABORT | CLOSE | DISCARD | UNLISTEN | ROLLBACK => found.releases = true,
                _ => {}
            },
            10 => found.releases |= word.eq_ignore_ascii_case(b"deallocate"),
            18.. => found.releases |= word[..18].eq_ignore_ascii_case(b"pg_advisory_unlock"),
            _ => {}
        }
    }
    found
}

/// The statement with every plain literal replaced (strings by `''`, numbers by `0`), so
/// texts that differ only in inlined values share one cache entry: what a statement is
/// does not depend on its values. `None` when the text holds anything this simple scan
/// does not understand (comments, dollar quotes, escape strings, backslashes), in which
/// case the exact text is the key; and when a string's contents may change what the
/// statement is: a `pgway.` setting named anywhere (`current_setting('pgway.last_route')`
/// reads pgway's own setting, `current_setting('work_mem')` does not), a `DO` block (its
/// body may change settings or not), `set_config`, a string holding a word of [`Words`].
///
/// Runs of bytes that stay are copied whole; only literals are written anew, and a text
/// without any is its own shape (borrowed, nothing allocated).
pub fn shape(sql: &str) -> Option<Cow<'_, str>> {
    shape_from(sql, 0, &mut 0)
}

/// How many statements [`shape_again`] remembers per thread: a transaction of a few
/// statements that take turns (TPC-B's five) keeps each one's start.
const SHAPE_STARTS: usize = 8;

/// The starts of the last texts this thread's [`shape_again`] scanned from their first
/// byte, each up to the last point its scan passed after white space before it replaced
/// anything, and which slot the next one takes.
struct ShapeStarts {
    starts: [Vec<u8>; SHAPE_STARTS],
    next: usize,
}

/// The longest buffer [`give_back`] keeps: the longest text the classification cache keeps
/// (longer texts are not shaped on the per-statement path).
const SHAPE_BUFFER_MAX: usize = 16 * 1024;

thread_local! {
    /// A buffer for this thread's next shape: [`shape_from`] takes it and [`give_back`]
    /// returns it, so shaping a statement on the per-statement path allocates nothing
    /// (a new one cost the allocator about 150 instructions a statement, its free included).
    static SHAPE_BUFFER: Cell<String> = const { Cell::new(String::new()) };
    static SHAPE_STARTS_SEEN: RefCell<ShapeStarts> = const {
        RefCell::new(ShapeStarts {
            starts: [const { Vec::new() }; SHAPE_STARTS],
            next: 0,
        })
    };
}

/// [`shape`] for the per-statement path. Applications send the same statements again and
/// again with other values inlined, and the values come after the same words
/// (`UPDATE pgbench_accounts SET abalance = abalance + 42 ...`): a text that begins with
/// the same bytes as one of the last texts this thread scanned whole, up to the last point
/// that scan passed after white space before its first literal, is scanned only from
/// there on. Up to that point the scan replaced nothing and ended no token past it (a
/// token looks at most one byte past its end, white space at none), so the shape is the
/// same as a whole scan's.
pub fn shape_again(sql: &str) -> Option<Cow<'_, str>> {
    SHAPE_STARTS_SEEN.with(|seen| {
        let Ok(mut seen) = seen.try_borrow_mut() else {
            return shape(sql);
        };
        let bytes = sql.as_bytes();
        if let Some(start) = seen
            .starts
            .iter()
            .find(|start| !start.is_empty() && bytes.starts_with(start))
        {
            return shape_from(sql, start.len(), &mut 0);
        }
        let mut point = 0;
        let shape = shape_from(sql, 0, &mut point);
        if shape.is_some() && point != 0 && point <= REPEAT_MAX {
            let slot = seen.next;
            seen.next = (slot + 1) % SHAPE_STARTS;
            let start = &mut seen.starts[slot];
            start.clear();
            start.extend_from_slice(&bytes[..point]);
        }
        shape
    })
}

/// [`shape`], scanning from `from` (0, or a point [`shape_again`] found in an earlier
/// text with the same bytes before it). Sets `point` to the last point the scan passed
/// after white space before it replaced anything (left as it is: none).
fn shape_from<'a>(sql: &'a str, from: usize, point: &mut usize) -> Option<Cow<'a, str>> {
    let bytes = sql.as_bytes();
    if names_pgway(bytes) {
        return None;
    }
    let mut out = SHAPE_BUFFER.with(Cell::take);
    // `sql[copied..]` is not in `out` yet.
    let mut copied = 0;
    let mut i = from;
    // The previous token was a word (a quote right after one is a prefixed literal).
    let mut in_word = false;
    while i < bytes.len() {
        let b = bytes[i];
        let c = class(b);
        if c & WORD_START != 0 {
            let start = i;
            i += word_len(&bytes[i..]);
            let word = &bytes[start..i];
            if word.eq_ignore_ascii_case(b"do") || word.eq_ignore_ascii_case(b"set_config") {
                return None;
            }
            in_word = true;
            continue;
        }
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
                // A string holding a word the session looks for (`'commit'`) would lend
                // its words to every text of the shape.
                if scan_words(inner.as_bytes()) != Words::default() {
                    return None;
                }
                if !["now", "today", "tomorrow", "yesterday"]
                    .iter()
                    .any(|w| inner.eq_ignore_ascii_case(w))
                {
                    replace(&mut out, sql.get(copied..start)?, "''", sql.len());
                    copied = i;
                }
            }
            b'"' => i = skip_quoted(bytes, i)?,
            b'$' => {
                // `$1` parameters stay; `$tag$` quoting is not understood.
                let start = i;
                i += 1;
                while i < bytes.len() && bytes[i].is_ascii_digit() {
                    i += 1;
                }
                if i == start + 1 {
                    return None;
                }
            }
            b'-' if bytes.get(i + 1) == Some(&b'-') => return None,
            b'/' if bytes.get(i + 1) == Some(&b'*') => return None,
            _ if c & DIGIT != 0 => {
                let start = i;
                // Not a number alone (`1into`): a keyword may hide in it, keep the text.
                i += number(&bytes[i..])?;
                replace(&mut out, sql.get(copied..start)?, "0", sql.len());
                copied = i;
            }
            _ => {
                i += 1;
                if c == SPACE && copied == 0 {
                    *point = i;
                }
            }
        }
        in_word = false;
    }
    if copied == 0 {
        give_back(out);
        return Some(Cow::Borrowed(sql));
    }
    out.push_str(sql.get(copied..)?);
    Some(Cow::Owned(out))
}

/// Hands a shape's buffer back to this thread for its next shape (one at most, and none
/// longer than [`SHAPE_BUFFER_MAX`]).
pub fn give_back(mut buffer: String) {
    if buffer.capacity() <= SHAPE_BUFFER_MAX {
        buffer.clear();
        SHAPE_BUFFER.with(|spare| spare.set(buffer));
    }
}

/// Appends the text before a literal and what stands for the literal (the first time,
/// room for the whole text is made, if the buffer has not that much already).
fn replace(out: &mut String, before: &str, literal: &str, len: usize) {
    if out.is_empty() {
        out.reserve(len);
    }
    out.push_str(before);
    out.push_str(literal);
}

#[cfg(test)]
mod tests {
    #[test]
    fn plain_begins() {
        for sql in [
            "BEGIN",
            "begin;",
            "BEGIN;\n",
            "  Begin  Work ; ",
            "BEGIN TRANSACTION",
            "start transaction;",
        ] {
            assert!(super::is_plain_begin(sql.as_bytes()), "{sql:?}");
        }
        for sql in [
            "",
            ";",
            "BEGIN ISOLATION LEVEL SERIALIZABLE",
            "BEGIN READ ONLY",
            "START TRANSACTION READ WRITE",
            "BEGIN; SELECT 1",
            "BEGIN;;",
            "/* pgway:fresh */ BEGIN",
            "BEGINS",
            "START",
            "COMMIT",
            "begin work transaction",
        ] {
            assert!(!super::is_plain_begin(sql.as_bytes()), "{sql:?}");
        }
    }

    #[test]
    fn plain_commits() {
        for sql in [
            "COMMIT",
            "end;",
            "END;\n",
            "  Commit  Work ; ",
            "END TRANSACTION",
        ] {
            assert!(super::is_plain_commit(sql.as_bytes()), "{sql:?}");
        }
        for sql in [
            "",
            ";",
            "COMMIT AND CHAIN",
            "COMMIT AND NO CHAIN",
            "COMMIT PREPARED 'x'",
            "COMMIT; SELECT 1",
            "COMMIT;;",
            "/* pgway:fresh */ COMMIT",
            "COMMITS",
            "END IF",
            "BEGIN",
            "commit work transaction",
        ] {
            assert!(!super::is_plain_commit(sql.as_bytes()), "{sql:?}");
        }
    }

    /// What [`number`] replaced, two passes: the run, then whether it is one literal.
    fn number_by_run(rest: &[u8]) -> Option<usize> {
        let len = rest
            .iter()
            .position(|&b| !(b.is_ascii_alphanumeric() || b == b'.'))
            .unwrap_or(rest.len());
        let run = &rest[..len];
        let one = if let [b'0', b'x' | b'X' | b'o' | b'O' | b'b' | b'B', digits @ ..] = run {
            !digits.is_empty() && digits.iter().all(u8::is_ascii_hexdigit)
        } else {
            let (mantissa, exponent) = match run.iter().position(|&b| b == b'e' || b == b'E') {
                Some(at) => (&run[..at], Some(&run[at + 1..])),
                None => (run, None),
            };
            mantissa.iter().all(|&b| b.is_ascii_digit() || b == b'.')
                && exponent.is_none_or(|e| !e.is_empty() && e.iter().all(u8::is_ascii_digit))
        };
        one.then_some(len)
    }

    #[test]
    fn a_number_ends_where_the_run_ends_or_is_no_number() {
        // Every run of up to 5 bytes from an alphabet of the bytes that matter, after a
        // leading digit, followed by nothing or a space.
        let alphabet = b"0159.eExXbBoOaF_ +";
        let mut texts = vec![Vec::new()];
        for _ in 0..5 {
            let longer: Vec<Vec<u8>> = texts
                .iter()
                .flat_map(|t| alphabet.iter().map(move |&b| [t.as_slice(), &[b]].concat()))
                .collect();
            texts.extend(longer);
            texts.dedup();
        }
        for lead in [b'0', b'7'] {
            for tail in &texts {
                let text = [&[lead], tail.as_slice()].concat();
                assert_eq!(
                    number(&text),
                    number_by_run(&text),
                    "{}",
                    String::from_utf8_lossy(&text)
                );
            }
        }
    }

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
        "select 'pgway.last_route'",
        "select x from t where y = 'a PgWay.b'",
        "select \"pgway.x\" from t",
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
    fn a_word_packs_alike_wherever_it_ends() {
        // A long text (8-byte loads) and texts shorter than one load.
        for text in [
            b"SELECT a FROM t WHERE\x92In = 1 OR iN".as_slice(),
            b"Select",
            b"SELECT 1",
            b"a",
        ] {
            for end in 1..=text.len() {
                for len in 1..=end.min(8) {
                    assert_eq!(
                        pack_word(text, end, len),
                        pack(&text[end - len..end]),
                        "{end} {len}"
                    );
                }
            }
        }
    }

    #[test]
    fn keywords_match_in_any_case_and_only_whole() {
        // A word alone, and the same word after other bytes (packed by one 8-byte load).
        let keyword = |word: &[u8]| {
            let text = [b"x.Into,?!".as_slice(), word].concat();
            let after = keyword(&text, text.len() - word.len(), text.len());
            let alone = keyword(word, 0, word.len());
            assert_eq!(after, alone, "{}", String::from_utf8_lossy(word));
            alone
        };
        assert_eq!(keyword(b"intersection"), Keyword::Other);
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
            assert!(
                is_plain_select(sql.as_bytes()),
                "should take the fast path: {sql}"
            );
        }
    }

    #[test]
    fn leaves_everything_else_to_the_parser() {
        for sql in NO {
            assert!(
                !is_plain_select(sql.as_bytes()),
                "should not take the fast path: {sql}"
            );
        }
    }

    #[test]
    fn never_disagrees_with_the_parser() {
        for sql in YES.iter().chain(NO) {
            if is_plain_select(sql.as_bytes()) {
                let c = classify(sql);
                assert_eq!(c.kind, StatementKind::Read, "{sql}");
                assert!(
                    c.functions.is_empty() && c.session.is_empty() && c.hint.is_none(),
                    "{sql}: {c:?}"
                );
            }
        }
    }

    /// Texts that begin like an earlier one and go on differently: [`is_plain_select_again`]
    /// after the earlier one says what a whole scan says.
    #[test]
    fn a_repeated_start_gets_the_whole_scans_answer() {
        const TAILS: &[&str] = &[
            "",
            " ",
            "1",
            "12345;",
            "1 ; delete from t",
            "count(1)",
            "1 for update",
            "x into y",
            "'a'",
            "e'a'",
            "-- pgway:primary",
            "/* x */ 1",
            "end",
            "case when a then b end",
            "(select 1)",
            "1.5e3",
            "1e",
            "$1",
            "$x$",
            "pg_sleep",
            "pgway.last_route",
            "\"a\"(1)",
        ];
        // Texts whose scan went on from the remembered point, and of those the plain reads.
        let (mut resumed, mut plain) = (0, 0);
        for earlier in YES.iter().chain(NO) {
            for cut in 0..=earlier.len() {
                let Some(start) = earlier.get(..cut) else {
                    continue;
                };
                for tail in TAILS {
                    let text = format!("{start}{tail}");
                    let _ = is_plain_select_again(earlier.as_bytes());
                    let resumes = REPEAT.with_borrow(|last| {
                        last.point.at != 0 && text.as_bytes().starts_with(&last.start)
                    });
                    let again = is_plain_select_again(text.as_bytes());
                    assert_eq!(
                        again,
                        is_plain_select(text.as_bytes()),
                        "{earlier:?} then {text:?}"
                    );
                    resumed += usize::from(resumes);
                    plain += usize::from(resumes && again);
                }
            }
        }
        // The shortcut was taken, and answered both ways.
        assert!(
            resumed > plain && plain > 100,
            "{resumed} resumed, {plain} plain"
        );
    }

    #[test]
    fn never_panics_on_truncations() {
        for sql in YES.iter().chain(NO) {
            for end in 0..=sql.len() {
                if let Some(prefix) = sql.get(..end) {
                    let _ = is_plain_select(prefix.as_bytes());
                }
            }
        }
    }

    #[test]
    fn the_word_scan_finds_each_word_whole_and_in_any_case() {
        let words = |sql: &str| scan_words(sql.as_bytes());
        assert_eq!(
            words("COMMIT"),
            Words {
                commits: true,
                releases: true,
                copies: false
            }
        );
        assert!(words("update t set a = 1; end").commits);
        assert!(words("update t set a = 1;End").commits);
        assert!(!words("rollback").commits);
        assert!(words("rollback").releases);
        assert!(words("Abort").releases);
        let near_misses = words("select committed, endpoint, copying, dropped from t_end");
        assert_eq!(near_misses, Words::default());
        assert!(words("copy t from stdin").copies);
        assert!(!words("copy t from stdin").releases);
        for release in [
            "unlisten *",
            "DEALLOCATE ALL",
            "discard all",
            "drop table t",
            "close c",
        ] {
            assert!(words(release).releases, "{release}");
        }
        assert!(words("select pg_advisory_unlock_all()").releases);
        assert!(words("select pg_advisory_unlock(1)").releases);
        assert!(!words("select pg_advisory_lock(1)").releases);
        // Bytes outside ASCII end words; digits and `_` do not.
        assert!(words("select 1;\u{e9}commit").commits);
        assert!(!words("select 1 as commit2, _end").commits);
        assert_eq!(words(""), Words::default());
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
            "select current_setting('pgway.last_route')",
            "do 'begin null; end'",
            "select set_config('a', 'b', false)",
            "insert into log values ('commit')",
        ] {
            assert_eq!(shape(sql), None, "{sql}");
        }
        // Nothing replaced: the text itself, not a copy.
        assert!(matches!(shape("begin"), Some(Cow::Borrowed("begin"))));
        assert!(matches!(shape("select now_()"), Some(Cow::Borrowed(_))));
        assert_eq!(
            shape("select 'now', 'x', \"y\", a1, $1 from t").as_deref(),
            Some("select 'now', '', \"y\", a1, $1 from t")
        );
    }

    #[test]
    fn a_shape_built_again_from_an_earlier_start_is_the_whole_scans() {
        const TEXTS: &[&str] = &[
            "UPDATE pgbench_accounts SET abalance = abalance + -42 WHERE aid = 17;",
            "insert into t values (1, 'a') returning id",
            "select * from t2 where a = 'x''y' and b = 1.5e3 and c = $12",
            "select 'now', 'x', \"y\", a1, $1 from t",
            "update t set s = E'x' where id = 1",
            "select current_setting('pgway.last_route') from t where id = 2",
            "insert into log values ('commit')",
            "do 'begin null; end'",
        ];
        const TAILS: &[&str] = &[
            "",
            " 5",
            "5 ",
            "'q' x",
            "-- c",
            "1into",
            "E'x'",
            "\"a\" 1",
            "pgway.x",
            "$$x$$",
            " set_config('a', 'b', false)",
            "'commit'",
        ];
        // Texts whose scan went on from the remembered point.
        let mut resumed = 0;
        for earlier in TEXTS {
            for cut in 0..=earlier.len() {
                let Some(start) = earlier.get(..cut) else {
                    continue;
                };
                for tail in TAILS {
                    let text = format!("{start}{tail}");
                    // The point comes from a whole scan of `earlier`.
                    SHAPE_STARTS_SEEN
                        .with_borrow_mut(|seen| seen.starts.iter_mut().for_each(Vec::clear));
                    let _ = shape_again(earlier);
                    let resumes = SHAPE_STARTS_SEEN.with_borrow(|seen| {
                        seen.starts
                            .iter()
                            .any(|start| !start.is_empty() && text.as_bytes().starts_with(start))
                    });
                    assert_eq!(
                        shape_again(&text),
                        shape(&text),
                        "{earlier:?} then {text:?}"
                    );
                    resumed += usize::from(resumes);
                }
            }
        }
        assert!(resumed > 300, "{resumed} resumed");
    }

    #[test]
    fn statements_that_take_turns_each_resume_from_their_own_start() {
        let transaction = |i: i32| {
            [
                format!("UPDATE pgbench_accounts SET abalance = abalance + {i} WHERE aid = 7;"),
                format!("SELECT abalance FROM pgbench_accounts WHERE aid = {i};"),
                format!("UPDATE pgbench_tellers SET tbalance = tbalance + {i} WHERE tid = 3;"),
                format!("UPDATE pgbench_branches SET bbalance = bbalance + {i} WHERE bid = 1;"),
                format!("INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (3, 1, 7, {i}, CURRENT_TIMESTAMP);"),
            ]
        };
        let resumes = |text: &str| {
            SHAPE_STARTS_SEEN.with_borrow(|seen| {
                seen.starts
                    .iter()
                    .any(|start| !start.is_empty() && text.as_bytes().starts_with(start))
            })
        };
        for text in transaction(-5) {
            let _ = shape_again(&text);
        }
        for i in [12, -3000, 4] {
            for text in transaction(i) {
                assert!(resumes(&text), "{text}");
                assert_eq!(shape_again(&text), shape(&text), "{text}");
            }
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
