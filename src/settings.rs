//! Session settings that follow a client across pooled server connections.
//!
//! A client's settings come from its StartupMessage (`application_name`, `client_encoding`,
//! `DateStyle`, `TimeZone`, `options=-c name=value`, ...) and from session-level `SET`.
//! Each server connection remembers what pgway applied to it. Before a client's statement
//! runs on a connection whose settings differ, pgway sends one multi-statement query that
//! brings them in line, in the same write as the statement (no extra round trip); when
//! nothing differs, nothing is sent (one hash comparison).

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

/// A setting's value, remembered the way it must be replayed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Value {
    /// A raw string, as in a StartupMessage: replayed with `set_config(name, raw, false)`.
    Raw(String),
    /// SQL text as the client wrote it after `SET name =`: replayed verbatim.
    Sql(String),
}

/// A set of settings with a hash of its content, so "same?" is usually one comparison.
///
/// The map is shared copy-on-write: a clone costs a reference count, and two sets cloned
/// from one another (a client's settings and what pgway applied for it on a connection,
/// or clients whose identical startup settings were shared at login) compare equal by
/// pointer without walking the map.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    values: Arc<BTreeMap<String, Value>>,
    hash: u64,
}

impl PartialEq for Settings {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.values, &other.values)
            || (self.hash == other.hash && self.values == other.values)
    }
}

impl Eq for Settings {}

impl Settings {
    fn rehash(&mut self) {
        let mut hasher = DefaultHasher::new();
        self.values.hash(&mut hasher);
        self.hash = hasher.finish();
    }

    /// Sets `name`.
    pub fn set(&mut self, name: &str, value: Value) {
        Arc::make_mut(&mut self.values).insert(name.to_owned(), value);
        self.rehash();
    }

    /// Removes `name`.
    pub fn remove(&mut self, name: &str) {
        if self.values.contains_key(name) {
            Arc::make_mut(&mut self.values).remove(name);
            self.rehash();
        }
    }

    /// Removes everything.
    pub fn clear(&mut self) {
        if !self.values.is_empty() {
            self.values = Arc::default();
        }
        self.rehash();
    }

    /// The value of `name`.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.values.get(name)
    }

    /// Every setting, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Value)> {
        self.values.iter()
    }

    /// Content hash.
    pub fn hash(&self) -> u64 {
        self.hash
    }

    /// True when nothing is set.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

/// What pgway applied to one server connection, on top of the server's defaults.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    /// The settings in force on the connection (beyond its login defaults).
    pub settings: Settings,
    /// Something changed the connection's settings in a way pgway could not follow: the
    /// next sync starts with `RESET ALL`.
    pub dirty: bool,
}

/// A client's settings: the session defaults from its StartupMessage, and the current ones.
#[derive(Debug, Clone, Default)]
pub struct ClientSettings {
    /// From the StartupMessage; what `RESET` returns to.
    pub startup: Settings,
    /// In force now.
    pub current: Settings,
    /// The parameters pgway follows by their ParameterStatus reports, as the server
    /// reported them at login (startup settings applied): what `RESET` reports for a
    /// parameter the StartupMessage set.
    pub at_login: Settings,
    /// The values of those parameters the client was last told (ParameterStatus): it is
    /// told only of changes, as PostgreSQL tells it.
    pub told: Settings,
}

/// The session user (`SET SESSION AUTHORIZATION`). Setting or resetting it resets
/// [`ROLE`] on the server.
pub const SESSION_AUTHORIZATION: &str = "session_authorization";
/// The current role (`SET ROLE`).
pub const ROLE: &str = "role";

/// StartupMessage keys that are not settings.
const NOT_SETTINGS: &[&str] = &["user", "database", "options", "replication"];

impl ClientSettings {
    /// Settings from StartupMessage parameters, with `options` expanded.
    pub fn from_startup(params: &[(String, String)]) -> Self {
        let mut startup = Settings::default();
        for (name, value) in params {
            if name == "options" {
                for (name, value) in parse_options(value) {
                    startup.set(&name.to_ascii_lowercase(), Value::Raw(value));
                }
            } else if !NOT_SETTINGS.contains(&name.as_str()) && !name.starts_with("_pq_.") {
                startup.set(&name.to_ascii_lowercase(), Value::Raw(value.clone()));
            }
        }
        Self {
            current: startup.clone(),
            startup,
            at_login: Settings::default(),
            told: Settings::default(),
        }
    }

    /// `RESET name`: back to the startup value, or the server default.
    pub fn reset(&mut self, name: &str) {
        match self.startup.get(name).cloned() {
            Some(value) => self.current.set(name, value),
            None => self.current.remove(name),
        }
    }

    /// `RESET ALL`.
    pub fn reset_all(&mut self) {
        self.current = self.startup.clone();
    }
}

/// Parses the StartupMessage `options` value: `-c name=value` and `--name=value`, separated
/// by whitespace, with `\` escaping the next character.
pub fn parse_options(options: &str) -> Vec<(String, String)> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    let mut in_word = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    word.push(next);
                    in_word = true;
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    let mut out = Vec::new();
    let mut words = words.into_iter();
    while let Some(w) = words.next() {
        let assignment = if w == "-c" {
            words.next()
        } else if let Some(rest) = w.strip_prefix("--") {
            Some(rest.to_owned())
        } else {
            w.strip_prefix("-c").map(str::to_owned)
        };
        if let Some((name, value)) = assignment.as_deref().and_then(|a| a.split_once('=')) {
            out.push((name.replace('-', "_"), value.to_owned()));
        }
    }
    out
}

/// `s` as an SQL string literal.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn quote_name(name: &str) -> String {
    let plain = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    if plain && !name.is_empty() {
        name.to_owned()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

fn push_set(sql: &mut String, name: &str, value: &Value) {
    match value {
        Value::Raw(raw) => {
            sql.push_str("SELECT pg_catalog.set_config(");
            sql.push_str(&quote_literal(name));
            sql.push_str(", ");
            sql.push_str(&quote_literal(raw));
            sql.push_str(", false);");
        }
        Value::Sql(text) => {
            match name {
                "timezone" => sql.push_str("SET TIME ZONE "),
                "role" => sql.push_str("SET ROLE "),
                "session_authorization" => sql.push_str("SET SESSION AUTHORIZATION "),
                _ => {
                    sql.push_str("SET ");
                    sql.push_str(&quote_name(name));
                    sql.push_str(" = ");
                }
            }
            sql.push_str(text);
            sql.push(';');
        }
    }
}

/// The query that turns `applied` into `wanted`, or `None` when they already match.
/// Updates `applied` to `wanted`.
pub fn sync_query(applied: &mut Applied, wanted: &Settings) -> Option<String> {
    if !applied.dirty && Arc::ptr_eq(&applied.settings.values, &wanted.values) {
        // The case of every statement of a client whose settings did not change.
        return None;
    }
    if !applied.dirty && applied.settings == *wanted {
        // Shared from now on: the next comparison with this client's settings is by pointer.
        applied.settings = wanted.clone();
        return None;
    }
    let mut sql = String::new();
    let empty = Settings::default();
    let have = if applied.dirty {
        sql.push_str("RESET ALL;");
        &empty
    } else {
        &applied.settings
    };
    // What differs: a value to set, or `None` to reset.
    let mut changes: Vec<(&str, Option<&Value>)> = wanted
        .values
        .iter()
        .filter(|(name, value)| have.get(name) != Some(*value))
        .map(|(name, value)| (name.as_str(), Some(value)))
        .chain(
            have.values
                .keys()
                .filter(|name| !wanted.values.contains_key(*name))
                .map(|name| (name.as_str(), None)),
        )
        .collect();
    // Setting (or resetting) the session user resets the current role on the server: it
    // goes first, and the role the client wants is then set again.
    if let Some(at) = changes
        .iter()
        .position(|(name, _)| *name == SESSION_AUTHORIZATION)
    {
        let authorization = changes.remove(at);
        changes.retain(|(name, _)| *name != ROLE);
        changes.insert(0, authorization);
        if let Some(role) = wanted.get(ROLE) {
            changes.insert(1, (ROLE, Some(role)));
        }
    }
    for (name, value) in changes {
        match value {
            Some(value) => push_set(&mut sql, name, value),
            None => {
                sql.push_str("RESET ");
                sql.push_str(&quote_name(name));
                sql.push(';');
            }
        }
    }
    applied.settings = wanted.clone();
    applied.dirty = false;
    (!sql.is_empty()).then_some(sql)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_parsed() {
        assert_eq!(
            parse_options("-c search_path=b_schema --statement-timeout=5s -cwork_mem=4MB"),
            vec![
                ("search_path".into(), "b_schema".into()),
                ("statement_timeout".into(), "5s".into()),
                ("work_mem".into(), "4MB".into()),
            ]
        );
        assert_eq!(
            parse_options(r"-c search_path=a,\ b"),
            vec![("search_path".into(), "a, b".into())]
        );
        assert!(parse_options("-x -c novalue").is_empty());
    }

    #[test]
    fn startup_params_become_settings() {
        let s = ClientSettings::from_startup(&[
            ("user".into(), "app".into()),
            ("database".into(), "db".into()),
            ("application_name".into(), "psql".into()),
            ("DateStyle".into(), "ISO".into()),
            ("options".into(), "-c search_path=x".into()),
        ]);
        assert_eq!(
            s.current.get("application_name"),
            Some(&Value::Raw("psql".into()))
        );
        assert_eq!(s.current.get("datestyle"), Some(&Value::Raw("ISO".into())));
        assert_eq!(s.current.get("search_path"), Some(&Value::Raw("x".into())));
        assert_eq!(s.current.get("user"), None);
    }

    #[test]
    fn sync_sends_only_differences_and_nothing_when_equal() {
        let mut client = ClientSettings::from_startup(&[("application_name".into(), "a'b".into())]);
        let mut applied = Applied::default();
        let sql = sync_query(&mut applied, &client.current).expect("first sync");
        assert_eq!(
            sql,
            "SELECT pg_catalog.set_config('application_name', 'a''b', false);"
        );
        assert_eq!(sync_query(&mut applied, &client.current), None);

        client
            .current
            .set("search_path", Value::Sql("'x', public".into()));
        client.current.set("timezone", Value::Sql("'UTC'".into()));
        let sql = sync_query(&mut applied, &client.current).expect("second sync");
        assert_eq!(sql, "SET search_path = 'x', public;SET TIME ZONE 'UTC';");

        client.reset_all();
        let sql = sync_query(&mut applied, &client.current).expect("reset");
        assert_eq!(sql, "RESET search_path;RESET timezone;");

        applied.dirty = true;
        let sql = sync_query(&mut applied, &client.current).expect("dirty");
        assert!(sql.starts_with("RESET ALL;SELECT pg_catalog.set_config('application_name'"));
    }

    #[test]
    fn reset_returns_to_startup_value() {
        let mut client = ClientSettings::from_startup(&[("timezone".into(), "UTC".into())]);
        client
            .current
            .set("timezone", Value::Sql("'Asia/Tokyo'".into()));
        client.current.set("work_mem", Value::Sql("'8MB'".into()));
        client.reset("timezone");
        client.reset("work_mem");
        assert_eq!(client.current, client.startup);
    }

    #[test]
    fn the_session_user_is_replayed_before_the_role() {
        let mut applied = Applied::default();
        let mut wanted = Settings::default();
        wanted.set(ROLE, Value::Sql("u9".into()));
        wanted.set(SESSION_AUTHORIZATION, Value::Sql("u8".into()));
        assert_eq!(
            sync_query(&mut applied, &wanted).as_deref(),
            Some("SET SESSION AUTHORIZATION u8;SET ROLE u9;")
        );
        // A new session user resets the role on the server: the role goes again.
        let mut next = wanted.clone();
        next.set(SESSION_AUTHORIZATION, Value::Sql("u10".into()));
        assert_eq!(
            sync_query(&mut applied, &next).as_deref(),
            Some("SET SESSION AUTHORIZATION u10;SET ROLE u9;")
        );
        let mut reset = next.clone();
        reset.remove(SESSION_AUTHORIZATION);
        reset.remove(ROLE);
        assert_eq!(
            sync_query(&mut applied, &reset).as_deref(),
            Some("RESET session_authorization;")
        );
    }

    #[test]
    fn odd_names_are_quoted() {
        let mut applied = Applied::default();
        let mut wanted = Settings::default();
        wanted.set("MyGuc", Value::Sql("1".into()));
        assert_eq!(
            sync_query(&mut applied, &wanted).as_deref(),
            Some("SET \"MyGuc\" = 1;")
        );
    }
}
