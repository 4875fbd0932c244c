//! Steps of the generated scripts (`-- generate settings user|superuser`), issue case 5:
//! client `a` sets every user-settable parameter to a value other than its own current
//! one, client `b` (same user, so with pgway's pool of one it lands on the connection `a`
//! used) checks its own values, then `a` checks its values.
//!
//! The list comes from `pg_settings` (context `user`, plus `superuser` for the superuser
//! script) of the cluster under test, read once on a direct connection before any run, so
//! every run of the script gets the same steps. Each candidate `SET` is first tried on that
//! direct connection, in script order: a value the server refuses there (one setting may
//! exclude another, `log_statement_stats` with `log_executor_stats`) or that changes
//! nothing is left out, so the generated script runs without errors on PostgreSQL.
//!
//! Checks per client: `show NAME` for each setting (pgway may answer SHOW itself), and one
//! `select name, setting from pg_settings` over all of them (what the server has).
//!
//! Values: booleans flip; enums take the next value of `enumvals`; numbers go one up
//! (or down at the maximum; timeouts and intervals that are 0, meaning off, become an hour
//! rather than one millisecond); strings take the value from [`STRING_VALUES`].

use std::collections::BTreeMap;

use tokio_postgres::{Client, SimpleQueryMessage};

use super::script::{Action, Generate, Step};

/// Settings left out, and why.
pub const EXCLUDED: &[(&str, &str)] = &[
    (
        "exit_on_error",
        "turns every later error into FATAL; one error would end the session and hide the rest",
    ),
    (
        "local_preload_libraries",
        "only read at connection start; there is no library to name",
    ),
    (
        "session_preload_libraries",
        "only read at connection start; there is no library to name",
    ),
    (
        "default_table_access_method",
        "`heap` is the only table access method",
    ),
    (
        "wal_consistency_checking",
        "a developer option that makes the replica verify every WAL record",
    ),
];

/// Values for string settings (set as quoted literals).
pub const STRING_VALUES: &[(&str, &str)] = &[
    ("DateStyle", "SQL, DMY"),
    ("TimeZone", "Asia/Tokyo"),
    ("application_name", "diff-app"),
    ("backtrace_functions", "diff_no_such_function"),
    ("client_encoding", "LATIN1"),
    ("default_tablespace", "pg_default"),
    ("default_text_search_config", "pg_catalog.simple"),
    ("dynamic_library_path", "$libdir:/nonexistent"),
    ("extension_destdir", "/nonexistent"),
    ("lc_messages", "POSIX"),
    ("lc_monetary", "POSIX"),
    ("lc_numeric", "POSIX"),
    ("lc_time", "POSIX"),
    ("restrict_nonsystem_relation_kind", "foreign-table"),
    ("search_path", "diff_schema, public"),
    ("temp_tablespaces", "pg_default"),
    ("timezone_abbreviations", "Australia"),
];

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn rows(msgs: Vec<SimpleQueryMessage>) -> Vec<Vec<Option<String>>> {
    msgs.into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
            }
            _ => None,
        })
        .collect()
}

/// A candidate value (SQL literal) for one pg_settings row, or why there is none.
fn candidate(row: &BTreeMap<&str, Option<String>>) -> Result<String, String> {
    let get = |k: &str| row.get(k).cloned().flatten().unwrap_or_default();
    let name = get("name");
    let setting = get("setting");
    match get("vartype").as_str() {
        "bool" => Ok(quote(if setting == "on" { "off" } else { "on" })),
        "enum" => {
            let vals: Vec<String> = serde_json::from_str(&get("enumvals"))
                .map_err(|e| format!("enumvals of {name}: {e}"))?;
            let at = vals.iter().position(|v| *v == setting).unwrap_or(0);
            Ok(quote(&vals[(at + 1) % vals.len()]))
        }
        "integer" => {
            let cur: i64 = setting.parse().map_err(|e| format!("{name}: {e}"))?;
            let (min, max): (i64, i64) = (
                get("min_val").parse().unwrap_or(i64::MIN),
                get("max_val").parse().unwrap_or(i64::MAX),
            );
            let unit = get("unit");
            let off_means_disabled = name.contains("timeout") || name.ends_with("_interval");
            let v = if cur == 0 && off_means_disabled && unit == "ms" {
                3_600_000
            } else if cur == 0 && off_means_disabled && unit == "s" {
                3600
            } else if cur < max {
                cur + 1
            } else {
                cur - 1
            };
            if v < min || v > max {
                return Err("no other value in range".into());
            }
            Ok(v.to_string())
        }
        "real" => {
            let cur: f64 = setting.parse().map_err(|e| format!("{name}: {e}"))?;
            let (min, max): (f64, f64) = (
                get("min_val").parse().unwrap_or(f64::MIN),
                get("max_val").parse().unwrap_or(f64::MAX),
            );
            let v = if cur + 1.0 <= max {
                cur + 1.0
            } else {
                (cur + min) / 2.0
            };
            Ok(format!("{v}"))
        }
        _ => STRING_VALUES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| quote(v))
            .ok_or_else(|| "a string setting without a value in STRING_VALUES".into()),
    }
}

/// The generated steps, from `admin`-style direct connections `probe` (as the script's
/// user, in a database like the script's) and `scratch` (same user; its settings change).
pub async fn generate(kind: Generate, probe: &Client) -> Vec<Step> {
    let contexts = match kind {
        Generate::UserSettings => "'user'",
        Generate::SuperuserSettings => "'user', 'superuser'",
    };
    let listing = probe
        .simple_query(&format!(
            "select name, vartype, setting, unit, min_val, max_val, \
             array_to_json(enumvals)::text as enumvals \
             from pg_settings where context in ({contexts}) order by name"
        ))
        .await
        .expect("reading pg_settings");
    let mut columns = Vec::new();
    let mut settings = Vec::new();
    for m in listing {
        match m {
            SimpleQueryMessage::RowDescription(cols) => {
                columns = cols.iter().map(|c| c.name().to_string()).collect();
            }
            SimpleQueryMessage::Row(r) => {
                let row: BTreeMap<String, Option<String>> = columns
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.clone(), r.get(i).map(str::to_string)))
                    .collect();
                settings.push(row);
            }
            _ => {}
        }
    }
    assert!(
        settings.len() > 50,
        "pg_settings lists only {} settings for contexts {contexts}",
        settings.len()
    );
    let mut chosen: Vec<(String, String)> = Vec::new();
    let mut skipped: Vec<String> = Vec::new();
    for row in &settings {
        let row: BTreeMap<&str, Option<String>> =
            row.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let name = row["name"].clone().unwrap_or_default();
        if let Some((_, why)) = EXCLUDED.iter().find(|(n, _)| *n == name) {
            skipped.push(format!("{name}: {why}"));
            continue;
        }
        let value = match candidate(&row) {
            Ok(v) => v,
            Err(why) => {
                skipped.push(format!("{name}: {why}"));
                continue;
            }
        };
        let show = format!("select current_setting({})", quote(&name));
        let before = rows(probe.simple_query(&show).await.expect("current_setting"));
        if let Err(e) = probe.simple_query(&format!("SET {name} = {value}")).await {
            skipped.push(format!(
                "{name} = {value}: refused on PostgreSQL: {}",
                super::common::describe_error(&e)
            ));
            continue;
        }
        let after = rows(probe.simple_query(&show).await.expect("current_setting"));
        if before == after {
            skipped.push(format!("{name} = {value}: changes nothing"));
            continue;
        }
        chosen.push((name, value));
    }
    eprintln!(
        "generated settings script ({kind:?}): {} settings; left out: {}",
        chosen.len(),
        skipped.join("; ")
    );
    let user = match kind {
        Generate::UserSettings => "app",
        Generate::SuperuserSettings => "postgres",
    };
    let mut steps = Vec::new();
    let push = |steps: &mut Vec<Step>, client: &str, action: Action| {
        steps.push(Step {
            client: client.into(),
            action,
        })
    };
    push(&mut steps, "a", Action::LoginAs(user.into()));
    push(&mut steps, "b", Action::LoginAs(user.into()));
    for (name, value) in &chosen {
        push(
            &mut steps,
            "a",
            Action::Simple(format!("SET {name} = {value};")),
        );
    }
    let names = chosen
        .iter()
        .map(|(n, _)| quote(n))
        .collect::<Vec<_>>()
        .join(", ");
    for who in ["b", "a"] {
        for (name, _) in &chosen {
            push(&mut steps, who, Action::Simple(format!("show {name};")));
        }
        push(
            &mut steps,
            who,
            Action::Simple(format!(
                "select name, setting from pg_settings where name in ({names}) order by name;"
            )),
        );
    }
    steps
}
