//! The only place where transcripts are rewritten before they are compared.
//!
//! Every rule hides a value that differs between two runs for reasons that are not pgway's
//! doing; each says why. Keep this list short: a rule too broad hides real differences.
//!
//! Deliberately no rule for:
//! - **Server ports and process ids in query results.** Scripts must not print
//!   `inet_server_port()`, `pg_backend_pid()` or `current_setting('port')`: which server
//!   process or node answered is not session behaviour, and a rule for it would also hide a
//!   client seeing another client's backend.
//! - **Database names.** Each run of a script uses a fresh database with the same name.

use std::sync::OnceLock;

use regex::Regex;

struct Rule {
    pattern: Regex,
    replacement: &'static str,
}

fn rules() -> &'static [Rule] {
    static RULES: OnceLock<Vec<Rule>> = OnceLock::new();
    RULES.get_or_init(|| {
        let rule = |pattern: &str, replacement: &'static str| Rule {
            pattern: Regex::new(pattern).expect("a valid normalization pattern"),
            replacement,
        };
        vec![
            // NotificationResponse carries the sending backend's process id. A direct
            // connection and a pooled server connection are different processes, and a
            // process id is never the same in two runs.
            rule(
                r"notification from pid \d+:",
                "notification from pid <pid>:",
            ),
            // A session's temporary schema is named after its backend's slot in shared
            // memory (pg_temp_3, pg_toast_temp_3): which slot a backend gets depends on which
            // other backends (pgway's pool, its health checks) are connected.
            rule(r"\bpg_(toast_)?temp_\d+\b", "pg_${1}temp_<n>"),
            // tokio-postgres names the statements it prepares `s0`, `s1`, ... from one
            // counter for the whole test process, so the same script's statements get
            // other numbers in each run. They show when the server reports an unknown
            // prepared statement. (pgway's own names, `pgway_...`, are not rewritten.)
            rule(
                r#"prepared statement "s\d+""#,
                r#"prepared statement "s<n>""#,
            ),
            // Object ids of objects a script creates (>= 16384, FirstNormalObjectId) come
            // from the cluster-wide OID counter, which moves on between runs. Built-in ids
            // (types like 23 or 1082 in `columns:` lines) are stable and stay.
            rule(
                r"::(1638[4-9]|163[9]\d|16[4-9]\d\d|1[7-9]\d{3}|[2-9]\d{4}|\d{6,})\b",
                "::<oid>",
            ),
            rule(r"\bOID \d+\b", "OID <oid>"),
            // pgway's own errors name the node they are about (`no server connection to
            // 127.0.0.1:23180 ...`). The harness picks the cluster's ports at random per
            // test run; PostgreSQL's replies name no address.
            rule(r"\b127\.0\.0\.1:\d+\b", "127.0.0.1:<port>"),
        ]
    })
}

/// `line` with every rule applied.
pub fn line(line: &str) -> String {
    let mut s = line.to_string();
    for r in rules() {
        if r.pattern.is_match(&s) {
            s = r.pattern.replace_all(&s, r.replacement).into_owned();
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_rule() {
        assert_eq!(
            line("  notification from pid 4242: channel \"c\" payload \"p\""),
            "  notification from pid <pid>: channel \"c\" payload \"p\""
        );
        assert_eq!(
            line("  row: \"pg_temp_3\", \"pg_toast_temp_12\""),
            "  row: \"pg_temp_<n>\", \"pg_toast_temp_<n>\""
        );
        assert_eq!(
            line("  ERROR 26000: prepared statement \"s17\" does not exist"),
            "  ERROR 26000: prepared statement \"s<n>\" does not exist"
        );
        assert_eq!(
            line("  ERROR 26000: prepared statement \"pgway_1f\" does not exist"),
            "  ERROR 26000: prepared statement \"pgway_1f\" does not exist"
        );
        assert_eq!(
            line("  columns: \"a\"::23, \"b\"::16384, \"c\"::99999, \"d\"::1082, \"e\"::16383"),
            "  columns: \"a\"::23, \"b\"::<oid>, \"c\"::<oid>, \"d\"::1082, \"e\"::16383"
        );
        assert_eq!(
            line("relation with OID 16390 does not exist"),
            "relation with OID <oid> does not exist"
        );
        assert_eq!(
            line("  ERROR 53300: no server connection to 127.0.0.1:23180 became free"),
            "  ERROR 53300: no server connection to 127.0.0.1:<port> became free"
        );
        assert_eq!(line("  row: \"1999-01-08\""), "  row: \"1999-01-08\"");
    }
}
