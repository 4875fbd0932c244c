//! What a function's body does: [`analyze`] proves that a `LANGUAGE sql` or `plpgsql` body
//! only reads, and lists the functions it calls (which must be proved read-only in turn),
//! or says why it cannot.
//!
//! sqlparser does not parse PL/pgSQL, so the PL/pgSQL reader here is deliberately
//! conservative: it knows the block structure (`DECLARE`, `BEGIN` ... `EXCEPTION WHEN ...
//! THEN` ... `END`, labels), the control statements (`IF`/`ELSIF`/`ELSE`, `CASE`, `LOOP`,
//! `WHILE`, `FOR ... IN`, `FOREACH`, `EXIT`, `CONTINUE`), assignments, `PERFORM`,
//! `SELECT ... INTO`, `RETURN [QUERY|NEXT]`, `RAISE`, `ASSERT`, `GET DIAGNOSTICS`, `NULL`
//! and cursors, and hands every SQL statement and expression in them to the statement
//! classifier, which must find a read. Anything else (a write, `EXECUTE` of dynamic SQL,
//! transaction control, a statement it does not recognise, text it cannot tokenize) makes
//! the body a possible writer.

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::tokenizer::{Token, Tokenizer};

use super::tokens::is_kw;
use super::{classify, StatementKind};

/// A body proved to only read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reads {
    /// Functions it calls that are not on the built-in safe list (as the classifier names
    /// them): each must be read-only too.
    pub calls: Vec<String>,
    /// Tables (and views) it reads, as written (lower-cased unless quoted, qualified if
    /// written so), without the names of its CTEs: what a cached result of a call depends
    /// on.
    pub tables: Vec<String>,
}

/// Why a body may write (words a user can act on: "INSERT in its body").
pub type Why = String;

/// Proves that the body of a function in `language` (`sql` or `plpgsql`) only reads.
pub fn analyze(language: &str, body: &str) -> Result<Reads, Why> {
    let mut reads = Reads::default();
    match language {
        "sql" => check_sql(sql_body(body), &mut reads)?,
        "plpgsql" => Plpgsql::default().body(body, &mut reads)?,
        other => return Err(format!("it is written in {other}")),
    }
    reads.calls.sort_unstable();
    reads.calls.dedup();
    reads.tables.sort_unstable();
    reads.tables.dedup();
    Ok(reads)
}

/// Adds the relations `sql` (one or more statements that classified as reads) reads to
/// `tables`, leaving out its CTEs' names.
fn add_tables(sql: &str, tables: &mut Vec<String>) {
    if let Ok(statements) = sqlparser::parser::Parser::parse_sql(&PostgreSqlDialect {}, sql) {
        super::cache::add_tables(&statements, tables);
    }
}

/// The statements of a SQL-standard body (`BEGIN ATOMIC ... END`, as
/// `pg_get_function_sqlbody` prints it), or the body itself.
fn sql_body(body: &str) -> &str {
    let trimmed = body.trim();
    let upper = trimmed.to_ascii_uppercase();
    if upper.starts_with("BEGIN ATOMIC") && upper.ends_with("END") {
        &trimmed["BEGIN ATOMIC".len()..trimmed.len() - "END".len()]
    } else if upper.starts_with("RETURN ") {
        // `RETURN expr` (SQL-standard single-expression body).
        &trimmed["RETURN".len()..]
    } else {
        trimmed
    }
}

/// `sql` (one or more statements, or an expression after `RETURN`) must classify as a read;
/// its functions join `reads.calls`.
fn check_sql(sql: &str, reads: &mut Reads) -> Result<(), Why> {
    let text = sql.trim();
    if text.is_empty() {
        return Ok(());
    }
    let statement = if starts_like_statement(text) {
        text.to_owned()
    } else {
        format!("SELECT {text}")
    };
    let c = classify(&statement);
    match c.kind {
        StatementKind::Read => {
            reads.calls.extend(c.functions);
            add_tables(&statement, &mut reads.tables);
            Ok(())
        }
        _ => Err(describe_write(text)),
    }
}

fn starts_like_statement(text: &str) -> bool {
    let first = text
        .split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
        .next()
        .unwrap_or_default();
    [
        "select", "with", "values", "table", "insert", "update", "delete", "merge",
    ]
    .iter()
    .any(|k| first.eq_ignore_ascii_case(k))
        || text.starts_with('(')
}

/// Names what makes `sql` a write, as far as a word can say it.
fn describe_write(sql: &str) -> Why {
    let first = sql
        .split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
        .find(|w| !w.is_empty())
        .unwrap_or_default()
        .to_ascii_uppercase();
    let words: Vec<String> = sql
        .split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
        .map(str::to_ascii_uppercase)
        .collect();
    let has = |w: &str| words.iter().any(|x| x == w);
    if [
        "INSERT", "UPDATE", "DELETE", "MERGE", "TRUNCATE", "CREATE", "DROP", "ALTER",
    ]
    .contains(&first.as_str())
    {
        format!("{first} in its body")
    } else if has("FOR") && (has("UPDATE") || has("SHARE")) {
        "a locking read (FOR UPDATE/SHARE) in its body".to_owned()
    } else if has("INSERT") || has("UPDATE") || has("DELETE") {
        "a writing CTE in its body".to_owned()
    } else {
        let snippet: String = sql.chars().take(60).collect();
        format!("a statement that may write in its body ({snippet})")
    }
}

/// The PL/pgSQL reader's state across statements.
#[derive(Debug, Default)]
struct Plpgsql {
    /// Inside a `DECLARE` section (until its `BEGIN`).
    declaring: bool,
}

/// Tokens of one `;`-separated piece, trivia dropped, with the text they came from.
struct Piece {
    tokens: Vec<Token>,
}

impl Piece {
    fn kw(&self, i: usize, keyword: &str) -> bool {
        self.tokens.get(i).is_some_and(|t| is_kw(t, keyword))
    }

    /// SQL text of `tokens[from..to]`.
    fn text(&self, from: usize, to: usize) -> String {
        let mut out = String::new();
        for token in self
            .tokens
            .get(from..to.min(self.tokens.len()))
            .unwrap_or_default()
        {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(&token.to_string());
        }
        out
    }

    /// Index of the first `keyword` at paren depth 0 at or after `from`.
    fn find(&self, from: usize, keyword: &str) -> Option<usize> {
        let mut depth = 0i32;
        for (i, token) in self.tokens.iter().enumerate().skip(from) {
            match token {
                Token::LParen | Token::LBracket => depth += 1,
                Token::RParen | Token::RBracket => depth -= 1,
                t if depth == 0 && is_kw(t, keyword) => return Some(i),
                _ => {}
            }
        }
        None
    }

    /// Index of the first `:=` (or `=`) at depth 0: an assignment.
    fn assignment(&self) -> Option<usize> {
        let mut depth = 0i32;
        for (i, token) in self.tokens.iter().enumerate() {
            match token {
                Token::LParen => depth += 1,
                Token::RParen => depth -= 1,
                Token::Assignment | Token::Eq if depth == 0 => return Some(i),
                _ => {}
            }
        }
        None
    }
}

impl Plpgsql {
    fn body(&mut self, body: &str, reads: &mut Reads) -> Result<(), Why> {
        let tokens = Tokenizer::new(&PostgreSqlDialect {}, body)
            .with_unescape(false)
            .tokenize()
            .map_err(|_| "its body does not tokenize".to_owned())?;
        let mut piece = Vec::new();
        let mut depth = 0i32;
        for token in tokens {
            match token {
                Token::Whitespace(_) | Token::EOF => continue,
                Token::LParen => depth += 1,
                Token::RParen => depth -= 1,
                Token::SemiColon if depth == 0 => {
                    self.piece(
                        Piece {
                            tokens: std::mem::take(&mut piece),
                        },
                        reads,
                    )?;
                    continue;
                }
                _ => {}
            }
            piece.push(token);
        }
        self.piece(Piece { tokens: piece }, reads)
    }

    /// One `;`-separated piece: structural keywords in front are peeled off, then what is
    /// left is one simple statement.
    fn piece(&mut self, mut p: Piece, reads: &mut Reads) -> Result<(), Why> {
        loop {
            // A label: `<<name>>`.
            if matches!(p.tokens.first(), Some(Token::ShiftLeft)) {
                match p.tokens.iter().position(|t| *t == Token::ShiftRight) {
                    Some(end) => {
                        p.tokens.drain(..=end);
                        continue;
                    }
                    None => return Err("a label it cannot read in its body".to_owned()),
                }
            }
            if p.kw(0, "DECLARE") {
                self.declaring = true;
                p.tokens.remove(0);
                continue;
            }
            if p.kw(0, "BEGIN") {
                self.declaring = false;
                p.tokens.remove(0);
                continue;
            }
            if p.kw(0, "EXCEPTION") || p.kw(0, "ELSE") || p.kw(0, "LOOP") {
                p.tokens.remove(0);
                continue;
            }
            // `IF cond THEN`, `ELSIF cond THEN`, `WHEN cond THEN` (CASE or handler).
            if p.kw(0, "IF") || p.kw(0, "ELSIF") || p.kw(0, "ELSEIF") || p.kw(0, "WHEN") {
                let then = p
                    .find(1, "THEN")
                    .ok_or_else(|| "an IF/WHEN it cannot read in its body".to_owned())?;
                if !p.kw(0, "WHEN") || !self.is_condition_name(&p, then) {
                    check_sql(&p.text(1, then), reads)?;
                }
                p.tokens.drain(..=then);
                continue;
            }
            if p.kw(0, "CASE") {
                // `CASE expr WHEN` or `CASE WHEN`.
                let when = p.find(1, "WHEN").unwrap_or(p.tokens.len());
                check_sql(&p.text(1, when), reads)?;
                p.tokens.drain(..when);
                continue;
            }
            if p.kw(0, "WHILE") {
                let body = p
                    .find(1, "LOOP")
                    .ok_or_else(|| "a WHILE it cannot read in its body".to_owned())?;
                check_sql(&p.text(1, body), reads)?;
                p.tokens.drain(..=body);
                continue;
            }
            if p.kw(0, "FOR") || p.kw(0, "FOREACH") {
                self.for_loop(&mut p, reads)?;
                continue;
            }
            break;
        }
        self.statement(&p, reads)
    }

    /// An exception handler's condition (`WHEN division_by_zero OR others THEN`) names
    /// conditions, not expressions.
    fn is_condition_name(&self, p: &Piece, then: usize) -> bool {
        p.tokens[1..then].iter().all(|t| {
            matches!(t, Token::Word(_) | Token::SingleQuotedString(_))
                || is_kw(t, "OR")
                || is_kw(t, "SQLSTATE")
        }) && then > 1
    }

    /// `FOR var IN [REVERSE] a .. b [BY c] LOOP`, `FOR var IN query LOOP`,
    /// `FOREACH var [SLICE n] IN ARRAY expr LOOP`: the query or expressions must read.
    fn for_loop(&self, p: &mut Piece, reads: &mut Reads) -> Result<(), Why> {
        let cannot = || "a loop it cannot read in its body".to_owned();
        let in_at = p.find(1, "IN").ok_or_else(cannot)?;
        let loop_at = p.find(in_at + 1, "LOOP").ok_or_else(cannot)?;
        let mut from = in_at + 1;
        if p.kw(from, "EXECUTE") {
            return Err("EXECUTE of dynamic SQL in its body".to_owned());
        }
        if p.kw(from, "REVERSE") || p.kw(from, "ARRAY") {
            from += 1;
        }
        let range = p.tokens[from..loop_at]
            .iter()
            .position(|t| *t == Token::Period)
            .filter(|&i| p.tokens.get(from + i + 1) == Some(&Token::Period));
        match range {
            Some(dots) => {
                let by = p.find(from, "BY").unwrap_or(loop_at);
                check_sql(&p.text(from, from + dots), reads)?;
                check_sql(&p.text(from + dots + 2, by), reads)?;
                if by < loop_at {
                    check_sql(&p.text(by + 1, loop_at), reads)?;
                }
            }
            None => check_sql(&p.text(from, loop_at), reads)?,
        }
        p.tokens.drain(..=loop_at);
        Ok(())
    }

    /// One simple statement.
    fn statement(&self, p: &Piece, reads: &mut Reads) -> Result<(), Why> {
        let Some(first) = p.tokens.first() else {
            return Ok(());
        };
        let n = p.tokens.len();
        if self.declaring {
            return self.declaration(p, reads);
        }
        if is_kw(first, "END") || is_kw(first, "NULL") && n == 1 {
            return Ok(());
        }
        if is_kw(first, "EXECUTE") || p.find(0, "EXECUTE").is_some() && p.kw(0, "RETURN") {
            return Err("EXECUTE of dynamic SQL in its body".to_owned());
        }
        if is_kw(first, "RETURN") {
            let from = if p.kw(1, "QUERY") || p.kw(1, "NEXT") {
                2
            } else {
                1
            };
            return check_sql(&p.text(from, n), reads);
        }
        if is_kw(first, "PERFORM") {
            return check_sql(&p.text(1, n), reads);
        }
        if is_kw(first, "EXIT") || is_kw(first, "CONTINUE") {
            return match p.find(1, "WHEN") {
                Some(when) => check_sql(&p.text(when + 1, n), reads),
                None => Ok(()),
            };
        }
        if is_kw(first, "ASSERT") {
            return check_sql(&p.text(1, n), reads);
        }
        if is_kw(first, "RAISE") {
            return self.raise(p, reads);
        }
        if is_kw(first, "GET") && p.find(1, "DIAGNOSTICS").is_some() {
            return Ok(());
        }
        if is_kw(first, "CLOSE") || is_kw(first, "FETCH") || is_kw(first, "MOVE") {
            return Ok(());
        }
        if is_kw(first, "OPEN") {
            return match p.find(1, "FOR") {
                Some(_) if p.find(1, "EXECUTE").is_some() => {
                    Err("EXECUTE of dynamic SQL in its body".to_owned())
                }
                Some(at) => check_sql(&p.text(at + 1, n), reads),
                None => Ok(()),
            };
        }
        if is_kw(first, "SELECT") || is_kw(first, "WITH") {
            return check_sql(&without_into(p), reads);
        }
        let word = first.to_string().to_ascii_uppercase();
        match word.as_str() {
            "INSERT" | "UPDATE" | "DELETE" | "MERGE" | "TRUNCATE" | "CREATE" | "DROP" | "ALTER"
            | "COPY" | "CALL" | "LOCK" | "GRANT" | "REVOKE" | "VACUUM" | "ANALYZE" | "REFRESH"
            | "CLUSTER" | "REINDEX" | "COMMENT" | "SECURITY" | "IMPORT" | "LISTEN" | "NOTIFY"
            | "SET" | "RESET" | "DISCARD" | "PREPARE" | "DEALLOCATE" => {
                return Err(format!("{word} in its body"));
            }
            "COMMIT" | "ROLLBACK" | "SAVEPOINT" | "RELEASE" => {
                return Err("transaction control in its body".to_owned());
            }
            _ => {}
        }
        if let (Token::Word(_), Some(at)) = (first, p.assignment()) {
            return check_sql(&p.text(at + 1, n), reads);
        }
        Err(format!("a statement it cannot read in its body ({word})"))
    }

    /// `name [CONSTANT] type [COLLATE c] [NOT NULL] [{DEFAULT | := | =} expr]`,
    /// `name CURSOR [(args)] FOR query`, `name ALIAS FOR $1`.
    fn declaration(&self, p: &Piece, reads: &mut Reads) -> Result<(), Why> {
        let n = p.tokens.len();
        if p.kw(1, "ALIAS") {
            return Ok(());
        }
        if let Some(cursor) = p.find(1, "CURSOR") {
            let at = p.find(cursor, "FOR").unwrap_or(n);
            return check_sql(&p.text(at + 1, n), reads);
        }
        if let Some(at) = p.find(1, "DEFAULT").or_else(|| p.assignment()) {
            return check_sql(&p.text(at + 1, n), reads);
        }
        Ok(())
    }

    /// `RAISE [level] 'format' [, expr ...] [USING option = expr [, ...]]`: the expressions
    /// must read.
    fn raise(&self, p: &Piece, reads: &mut Reads) -> Result<(), Why> {
        let n = p.tokens.len();
        let using = p.find(1, "USING").unwrap_or(n);
        if let Some(comma) = p.tokens[..using].iter().position(|t| *t == Token::Comma) {
            check_sql(&p.text(comma + 1, using), reads)?;
        }
        if using < n {
            // `USING MESSAGE = expr, DETAIL = expr`: check each value.
            let mut from = using + 1;
            while from < n {
                let end = p.tokens[from..]
                    .iter()
                    .position(|t| *t == Token::Comma)
                    .map_or(n, |i| from + i);
                let eq = p.tokens[from..end]
                    .iter()
                    .position(|t| *t == Token::Eq || *t == Token::Assignment)
                    .map(|i| from + i + 1)
                    .unwrap_or(end);
                check_sql(&p.text(eq, end), reads)?;
                from = end + 1;
            }
        }
        Ok(())
    }
}

/// A PL/pgSQL `SELECT ... INTO [STRICT] targets FROM ...` as a plain `SELECT` (its `INTO`
/// fills variables, not a table).
fn without_into(p: &Piece) -> String {
    let n = p.tokens.len();
    let Some(into) = p.find(0, "INTO") else {
        return p.text(0, n);
    };
    const AFTER: [&str; 10] = [
        "FROM", "WHERE", "GROUP", "HAVING", "WINDOW", "ORDER", "LIMIT", "OFFSET", "UNION", "FOR",
    ];
    let end = (into + 1..n)
        .find(|&i| AFTER.iter().any(|k| p.kw(i, k)))
        .unwrap_or(n);
    let mut text = p.text(0, into);
    text.push(' ');
    text.push_str(&p.text(end, n));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plpgsql(body: &str) -> Result<Reads, Why> {
        analyze("plpgsql", body)
    }

    /// The shape of the services' look-up function.
    const SEED: &str = r#"
DECLARE
  v_uuid uuid;
BEGIN
  BEGIN
    v_uuid := p_identifier::uuid;
  EXCEPTION WHEN invalid_text_representation THEN
    v_uuid := NULL;
  END;
  RETURN QUERY
    SELECT u.id, u.email, g.name
      FROM accounts.users u
      LEFT JOIN accounts.user_groups g ON g.id = u.group_id
      LEFT JOIN accounts.contacts c ON c.user_id = u.id
     WHERE u.id = v_uuid OR u.email = p_identifier OR c.value = p_identifier;
END;
"#;

    #[test]
    fn the_seed_function_only_reads() {
        let reads = plpgsql(SEED).expect("read-only");
        assert!(reads.calls.is_empty(), "{reads:?}");
        assert_eq!(
            reads.tables,
            vec![
                "accounts.contacts",
                "accounts.user_groups",
                "accounts.users"
            ]
        );
    }

    #[test]
    fn control_structures_and_expressions_are_read() {
        let body = r#"
<<outer>>
DECLARE
  total int := 0;
  c CURSOR FOR SELECT id FROM t;
  r record;
BEGIN
  IF p > 0 THEN
    total := total + helper(p);
  ELSIF p < 0 THEN
    PERFORM pg_sleep(0);
  ELSE
    NULL;
  END IF;
  FOR r IN SELECT id FROM t WHERE id > total LOOP
    total := total + r.id;
    EXIT outer WHEN total > 100;
  END LOOP;
  FOR i IN 1 .. 10 BY 2 LOOP
    CONTINUE WHEN i = 3;
  END LOOP;
  FOREACH x IN ARRAY ARRAY[1, 2] LOOP
    total := total + x;
  END LOOP;
  WHILE total < 10 LOOP
    total := total + 1;
  END LOOP;
  CASE total WHEN 1 THEN total := 2; ELSE total := 3; END CASE;
  SELECT count(*) INTO STRICT total FROM t WHERE id = p;
  OPEN c; FETCH c INTO r; CLOSE c;
  GET DIAGNOSTICS total = ROW_COUNT;
  RAISE NOTICE 'total % of %', total, other_fn(p) USING HINT = 'none';
  ASSERT total >= 0, 'negative';
  RETURN NEXT total;
  RETURN total;
EXCEPTION
  WHEN division_by_zero OR SQLSTATE '22012' THEN
    RETURN -1;
END;
"#;
        let reads = plpgsql(body).expect("read-only");
        assert_eq!(reads.calls, vec!["helper", "other_fn"]);
    }

    #[test]
    fn writes_and_dynamic_sql_are_found() {
        for (body, why) in [
            ("BEGIN INSERT INTO t VALUES (1); END", "INSERT in its body"),
            ("BEGIN UPDATE t SET a = 1; END", "UPDATE in its body"),
            ("BEGIN PERFORM nextval('s'); END", "may write"),
            ("BEGIN EXECUTE 'select 1'; END", "EXECUTE"),
            ("BEGIN RETURN QUERY EXECUTE 'select 1'; END", "EXECUTE"),
            (
                "BEGIN FOR r IN EXECUTE 'select 1' LOOP END LOOP; END",
                "EXECUTE",
            ),
            (
                "BEGIN RETURN QUERY WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d; END",
                "writing CTE",
            ),
            ("BEGIN PERFORM * FROM t FOR UPDATE; END", "locking read"),
            ("BEGIN PERFORM pg_terminate_backend(1); END", "may write"),
            ("BEGIN COMMIT; END", "transaction control"),
            ("BEGIN frobnicate the database; END", "cannot read"),
            ("BEGIN CALL p(); END", "CALL"),
        ] {
            let got = plpgsql(body).expect_err(body);
            assert!(got.contains(why), "{body}: {got}");
        }
    }

    #[test]
    fn words_in_strings_and_comments_are_not_statements() {
        let body = "BEGIN RAISE NOTICE 'INSERT INTO t'; -- UPDATE t\n RETURN 'DELETE'; END";
        assert_eq!(plpgsql(body), Ok(Reads::default()));
        let ctes =
            "BEGIN RETURN QUERY WITH recent AS (SELECT * FROM s.events) SELECT * FROM recent; END";
        assert_eq!(
            plpgsql(ctes).map(|r| r.tables),
            Ok(vec!["s.events".to_owned()])
        );
    }

    #[test]
    fn sql_bodies() {
        assert_eq!(
            analyze("sql", "select id from t where id = $1; select f2($1)"),
            Ok(Reads {
                calls: vec!["f2".to_owned()],
                tables: vec!["t".to_owned()],
            })
        );
        assert_eq!(
            analyze("sql", "BEGIN ATOMIC\n SELECT 1;\nEND"),
            Ok(Reads::default())
        );
        assert!(analyze("sql", "insert into t values (1)").is_err());
        assert!(analyze("c", "whatever").is_err());
    }
}
