//! The script format (`tests/differential/scripts/*.sql`); README.md in this directory is
//! the user's guide.
//!
//! A script is a session of several clients taking turns. Lines are read in order:
//!
//! - A line starting with `-- ` whose first word is a directive (below) is a directive;
//!   any other line starting with `--` is a comment. Neither is ever part of a statement.
//! - Other lines form statements: a statement ends at a line whose last non-blank character
//!   is `;`, outside a dollar-quoted body (`$$ ... $$`, `$tag$ ... $tag$`). A statement runs
//!   with the simple query protocol as one Query message, so `select 1; select 2;` on one
//!   line is one multi-statement string.
//!
//! Header directives (before the first client directive):
//!
//! - `-- roles u1 u2`: roles (NOLOGIN) the harness creates before the run and drops after.
//! - `-- setup SQL`: SQL run as the superuser in the fresh database before any client
//!   connects; all setup lines run as one batch, in order (so `SET ROLE app;` applies to the
//!   setup lines after it).
//! - `-- pool_size N`: pgway's `pool.size` for this script (default 1).
//! - `-- generate settings user|superuser`: the steps are generated from `pg_settings` at
//!   test time (see `settings.rs`); a generated script has no other steps.
//!
//! Client directives (each also makes NAME the current client):
//!
//! - `-- client NAME`: the following statements run as client NAME, which connects (to
//!   the script's database, as `app`) before its first statement.
//! - `-- client NAME as USER`: NAME logs in as USER (`app`, `md5user` or `postgres`).
//! - `-- client NAME startup KEY=VALUE`: a StartupMessage parameter (`DateStyle=Postgres,
//!   MDY`, `options=-c search_path=x`, `TimeZone=UTC`, ...); one per line.
//! - `-- client NAME closes`: NAME disconnects; a later statement opens a new session.
//!
//! `as` and `startup` are only allowed while NAME is not connected.
//!
//! Statement directives (for the current client):
//!
//! - `-- extended [PARAMS]`: the next statement runs with the extended protocol (unnamed
//!   statement: Parse, Bind, Describe, Execute, Sync), with PARAMS as text parameters.
//! - `-- prepare NAME`: the next statement is prepared as a protocol-level named statement
//!   (Parse, Describe, Sync) that the client knows as NAME.
//! - `-- execute NAME [PARAMS]`: Bind and Execute NAME (no statement follows).
//! - `-- close NAME`: Close NAME.
//! - `-- copy in`: the next statement is a `COPY ... FROM STDIN`; the lines after it, up
//!   to a line `\.`, are its data.
//! - `-- copy out`: the next statement is a `COPY ... TO STDOUT`.
//!
//! PARAMS: whitespace-separated; `'text'` (SQL quoting, `''` for a quote), `NULL`, or a
//! bare word.

use std::path::Path;

/// Which settings a generated script covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generate {
    /// pg_settings context `user`, as `app`.
    UserSettings,
    /// contexts `user` and `superuser`, as `postgres`.
    SuperuserSettings,
}

/// What one step does.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Log in as this user (set while not connected).
    LoginAs(String),
    /// Add a StartupMessage parameter (set while not connected).
    Startup(String, String),
    /// Disconnect.
    Closes,
    /// A simple Query.
    Simple(String),
    /// Unnamed statement with text parameters.
    Extended(String, Vec<Option<String>>),
    /// Named statement, prepared.
    Prepare(String, String),
    /// Execute a named statement with text parameters.
    Execute(String, Vec<Option<String>>),
    /// Close a named statement.
    CloseStatement(String),
    /// `COPY ... FROM STDIN` with these data lines.
    CopyIn(String, Vec<String>),
    /// `COPY ... TO STDOUT`.
    CopyOut(String),
}

/// One step: a client and what it does.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub client: String,
    pub action: Action,
}

/// A parsed script.
#[derive(Debug, Clone)]
pub struct Script {
    /// File stem, e.g. `issue1_datestyle`.
    pub name: String,
    pub roles: Vec<String>,
    pub setup: Vec<String>,
    pub pool_size: usize,
    pub generate: Option<Generate>,
    pub steps: Vec<Step>,
}

/// Users a client may log in as.
pub const USERS: [&str; 3] = ["app", "md5user", "postgres"];

#[derive(Debug)]
enum Pending {
    Extended(Vec<Option<String>>),
    Prepare(String),
    CopyIn,
    CopyOut,
}

/// Splits PARAMS of `-- extended` / `-- execute`.
pub fn parse_params(text: &str) -> Result<Vec<Option<String>>, String> {
    let mut out = Vec::new();
    let mut chars = text.trim().chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let Some(&c) = chars.peek() else {
            return Ok(out);
        };
        if c == '\'' {
            chars.next();
            let mut s = String::new();
            loop {
                match chars.next() {
                    None => return Err(format!("unterminated quoted parameter in `{text}`")),
                    Some('\'') if chars.peek() == Some(&'\'') => {
                        chars.next();
                        s.push('\'');
                    }
                    Some('\'') => break,
                    Some(c) => s.push(c),
                }
            }
            out.push(Some(s));
        } else {
            let mut s = String::new();
            while chars.peek().is_some_and(|c| !c.is_whitespace()) {
                s.push(chars.next().expect("peeked"));
            }
            out.push(if s == "NULL" { None } else { Some(s) });
        }
    }
}

/// The dollar-quote state after `line`: `open` is the tag of the body we are in, if any.
fn scan_dollar_quotes(line: &str, open: &mut Option<String>) {
    let bytes = line.as_bytes();
    let mut i = 0;
    let mut in_string = false;
    while i < bytes.len() {
        let b = bytes[i];
        if open.is_none() && b == b'\'' {
            in_string = !in_string;
            i += 1;
            continue;
        }
        if in_string || b != b'$' {
            i += 1;
            continue;
        }
        // A tag: `$` [identifier] `$`.
        let mut j = i + 1;
        while j < bytes.len() && (bytes[j].is_ascii_alphanumeric() || bytes[j] == b'_') {
            j += 1;
        }
        if j < bytes.len()
            && bytes[j] == b'$'
            && !bytes[i + 1..j].first().is_some_and(u8::is_ascii_digit)
        {
            let tag = &line[i..=j];
            match open {
                Some(t) if t == tag => *open = None,
                Some(_) => {}
                None => *open = Some(tag.to_string()),
            }
            i = j + 1;
        } else {
            i += 1;
        }
    }
}

const DIRECTIVES: [&str; 10] = [
    "client",
    "extended",
    "prepare",
    "execute",
    "close",
    "copy",
    "roles",
    "setup",
    "pool_size",
    "generate",
];

/// Parses the script `name` with content `text`.
pub fn parse(name: &str, text: &str) -> Result<Script, String> {
    let mut script = Script {
        name: name.to_string(),
        roles: Vec::new(),
        setup: Vec::new(),
        pool_size: 1,
        generate: None,
        steps: Vec::new(),
    };
    let mut current: Option<String> = None;
    let mut connected: Vec<String> = Vec::new();
    // Names each client has prepared (`-- prepare`), for `-- execute` and `-- close`.
    let mut prepared: Vec<(String, String)> = Vec::new();
    let mut pending: Option<Pending> = None;
    let mut statement: Vec<String> = Vec::new();
    let mut dollar: Option<String> = None;
    let mut lines = text.lines().enumerate().peekable();
    while let Some((no, line)) = lines.next() {
        let at = |msg: String| format!("{name}.sql line {}: {msg}", no + 1);
        let directive = line
            .strip_prefix("-- ")
            .filter(|_| statement.is_empty())
            .and_then(|rest| {
                let word = rest.split_whitespace().next()?;
                DIRECTIVES
                    .contains(&word)
                    .then(|| (word, rest[word.len()..].trim()))
            });
        if let Some((word, args)) = directive {
            let header = matches!(word, "roles" | "setup" | "pool_size" | "generate");
            if header && (current.is_some() || !script.steps.is_empty()) {
                return Err(at(format!("`-- {word}` must come before the first client")));
            }
            if !header && word != "client" && current.is_none() {
                return Err(at(format!("`-- {word}` before any `-- client`")));
            }
            if pending.is_some() {
                return Err(at(format!(
                    "`-- {word}` while {pending:?} waits for its statement"
                )));
            }
            let client = || current.clone().expect("checked above");
            match word {
                "roles" => script
                    .roles
                    .extend(args.split_whitespace().map(str::to_string)),
                "setup" => script.setup.push(args.to_string()),
                "pool_size" => {
                    script.pool_size = args
                        .parse()
                        .map_err(|_| at(format!("bad pool_size `{args}`")))?;
                }
                "generate" => {
                    script.generate = Some(match args {
                        "settings user" => Generate::UserSettings,
                        "settings superuser" => Generate::SuperuserSettings,
                        _ => return Err(at(format!("unknown `-- generate {args}`"))),
                    });
                }
                "client" => {
                    let mut words = args.splitn(2, char::is_whitespace);
                    let who = words.next().unwrap_or_default().to_string();
                    if who.is_empty() || !who.chars().all(|c| c.is_ascii_alphanumeric()) {
                        return Err(at(format!("bad client name `{who}`")));
                    }
                    let rest = words.next().unwrap_or_default().trim();
                    current = Some(who.clone());
                    let is_connected = connected.contains(&who);
                    let action = if rest.is_empty() {
                        None
                    } else if rest == "closes" {
                        connected.retain(|c| c != &who);
                        prepared.retain(|(c, _)| c != &who);
                        Some(Action::Closes)
                    } else if let Some(user) = rest.strip_prefix("as ") {
                        let user = user.trim();
                        if !USERS.contains(&user) {
                            return Err(at(format!("unknown user `{user}`; one of {USERS:?}")));
                        }
                        Some(Action::LoginAs(user.to_string()))
                    } else if let Some(kv) = rest.strip_prefix("startup ") {
                        let (k, v) = kv
                            .split_once('=')
                            .ok_or_else(|| at(format!("`startup KEY=VALUE` expected: `{kv}`")))?;
                        Some(Action::Startup(k.trim().to_string(), v.to_string()))
                    } else {
                        return Err(at(format!("unknown client directive `{rest}`")));
                    };
                    if matches!(action, Some(Action::LoginAs(_) | Action::Startup(..)))
                        && is_connected
                    {
                        return Err(at(format!(
                            "client {who} is connected; `as`/`startup` only before it connects"
                        )));
                    }
                    if let Some(action) = action {
                        script.steps.push(Step {
                            client: who,
                            action,
                        });
                    }
                }
                "extended" => pending = Some(Pending::Extended(parse_params(args).map_err(at)?)),
                "prepare" if !args.is_empty() => pending = Some(Pending::Prepare(args.to_string())),
                "execute" => {
                    let (stmt, params) = args.split_once(' ').unwrap_or((args, ""));
                    if stmt.is_empty() {
                        return Err(at("`-- execute NAME [PARAMS]`".into()));
                    }
                    if !prepared.contains(&(client(), stmt.to_string())) {
                        return Err(at(format!(
                            "`-- execute {stmt}` without `-- prepare {stmt}`"
                        )));
                    }
                    connected.push(client());
                    script.steps.push(Step {
                        client: client(),
                        action: Action::Execute(
                            stmt.to_string(),
                            parse_params(params).map_err(at)?,
                        ),
                    });
                }
                "close" if !args.is_empty() => {
                    let key = (client(), args.to_string());
                    if !prepared.contains(&key) {
                        return Err(at(format!("`-- close {args}` without `-- prepare {args}`")));
                    }
                    prepared.retain(|p| p != &key);
                    connected.push(client());
                    script.steps.push(Step {
                        client: client(),
                        action: Action::CloseStatement(args.to_string()),
                    });
                }
                "copy" if args == "in" => pending = Some(Pending::CopyIn),
                "copy" if args == "out" => pending = Some(Pending::CopyOut),
                _ => return Err(at(format!("bad directive `{line}`"))),
            }
            continue;
        }
        if statement.is_empty() && (line.starts_with("--") || line.trim().is_empty()) {
            continue;
        }
        if line.starts_with("--") {
            return Err(at("a `--` line inside a statement".into()));
        }
        statement.push(line.to_string());
        scan_dollar_quotes(line, &mut dollar);
        if dollar.is_some() || !line.trim_end().ends_with(';') {
            continue;
        }
        let Some(who) = current.clone() else {
            return Err(at("a statement before any `-- client`".into()));
        };
        let sql = std::mem::take(&mut statement).join("\n");
        connected.push(who.clone());
        let action = match pending.take() {
            None => Action::Simple(sql),
            Some(Pending::Extended(params)) => Action::Extended(sql, params),
            Some(Pending::Prepare(stmt)) => {
                prepared.push((who.clone(), stmt.clone()));
                Action::Prepare(stmt, sql)
            }
            Some(Pending::CopyOut) => Action::CopyOut(sql),
            Some(Pending::CopyIn) => {
                let mut data = Vec::new();
                loop {
                    match lines.next() {
                        Some((_, "\\.")) => break,
                        Some((_, l)) => data.push(l.to_string()),
                        None => return Err(at("COPY data without a closing `\\.`".into())),
                    }
                }
                Action::CopyIn(sql, data)
            }
        };
        script.steps.push(Step {
            client: who,
            action,
        });
    }
    if !statement.is_empty() {
        return Err(format!(
            "{name}.sql: the last statement does not end with `;` at the end of a line"
        ));
    }
    if let Some(p) = pending {
        return Err(format!("{name}.sql: {p:?} has no statement"));
    }
    if script.generate.is_some() && !script.steps.is_empty() {
        return Err(format!(
            "{name}.sql: a generated script has no steps of its own"
        ));
    }
    if script.generate.is_none() && script.steps.is_empty() {
        return Err(format!("{name}.sql: no steps"));
    }
    Ok(script)
}

/// Every `*.sql` under `dir`, parsed, sorted by name.
pub fn load_all(dir: &Path) -> Vec<Script> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|p| {
            let name = p.file_stem().expect("a file name").to_string_lossy();
            let text = std::fs::read_to_string(p)
                .unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
            parse(&name, &text).unwrap_or_else(|e| panic!("{e}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(text: &str) -> Vec<(String, Action)> {
        parse("t", text)
            .unwrap()
            .steps
            .into_iter()
            .map(|s| (s.client, s.action))
            .collect()
    }

    #[test]
    fn statements_directives_and_comments() {
        let got = steps(
            "-- a comment\n\
             -- client a startup DateStyle=Postgres, MDY\n\
             SET datestyle TO iso; SET datestyle TO ymd;\n\
             -- client b as postgres\n\
             select 1\n  + 1;\n\
             -- extended 'it''s' NULL 42\n\
             select $1, $2, $3;\n\
             -- client a\n\
             -- copy in\n\
             copy t from stdin;\n1\tx\n\\.\n\
             DO $$ BEGIN PERFORM 1; END $$;\n\
             -- client a closes\n",
        );
        assert_eq!(
            got,
            vec![
                (
                    "a".into(),
                    Action::Startup("DateStyle".into(), "Postgres, MDY".into())
                ),
                (
                    "a".into(),
                    Action::Simple("SET datestyle TO iso; SET datestyle TO ymd;".into())
                ),
                ("b".into(), Action::LoginAs("postgres".into())),
                ("b".into(), Action::Simple("select 1\n  + 1;".into())),
                (
                    "b".into(),
                    Action::Extended(
                        "select $1, $2, $3;".into(),
                        vec![Some("it's".into()), None, Some("42".into())]
                    )
                ),
                (
                    "a".into(),
                    Action::CopyIn("copy t from stdin;".into(), vec!["1\tx".into()])
                ),
                (
                    "a".into(),
                    Action::Simple("DO $$ BEGIN PERFORM 1; END $$;".into())
                ),
                ("a".into(), Action::Closes),
            ]
        );
    }

    #[test]
    fn dollar_quoted_bodies_span_lines() {
        let got = steps(
            "-- client a\nCREATE FUNCTION f() RETURNS int AS $body$\nBEGIN\n  RETURN 1;\nEND;\n$body$ LANGUAGE plpgsql;\n",
        );
        assert_eq!(got.len(), 1);
        assert!(matches!(&got[0].1, Action::Simple(s) if s.ends_with("plpgsql;")));
    }

    #[test]
    fn misuse_is_reported() {
        assert!(parse("t", "select 1;\n").is_err());
        assert!(parse("t", "-- client a\nselect 1;\n-- client a as postgres\n").is_err());
        assert!(parse("t", "-- client a\n-- roles u1\n").is_err());
        assert!(parse("t", "-- client a\nselect 1\n").is_err());
        assert!(parse("t", "-- client a\n-- extended\n-- client b\n").is_err());
        assert!(parse("t", "-- client a as nobody\nselect 1;\n").is_err());
        assert!(parse("t", "-- client a\n-- execute q\n").is_err());
        assert!(parse(
            "t",
            "-- client a\n-- prepare q\nselect 1;\n-- client b\n-- execute q\n"
        )
        .is_err());
        assert!(parse(
            "t",
            "-- client a\n-- prepare q\nselect 1;\n-- close q\n-- close q\n"
        )
        .is_err());
    }
}
