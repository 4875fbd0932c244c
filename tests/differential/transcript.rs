//! Turns the backend messages of one operation into transcript lines.
//!
//! Per operation, in the order received: column names and types (RowDescription), rows
//! (text; `NULL` unquoted, values quoted), command tags, empty-query answers, errors
//! (severity, SQLSTATE, message), notices (severity, message), COPY data. Then:
//!
//! - `parameter NAME = "VALUE"` for each ParameterStatus that changed a value the client
//!   had (a driver keeps the last value per name; a repeat of the same value is invisible).
//!   Sorted by name: PostgreSQL reports them at ReadyForQuery, in no meaningful order.
//! - `notification ...` lines, in arrival order. They come last because when a
//!   notification arrives relative to the rows of the statement that runs while it is
//!   delivered is timing, not behaviour; which statement's reply carries it is not (the
//!   server delivers it before the next ReadyForQuery at the latest).
//! - `ready: idle|in transaction|failed transaction`: the status of the operation's last
//!   ReadyForQuery.
//!
//! Protocol bookkeeping without meaning for the user (ParseComplete, BindComplete,
//! CloseComplete, NoData, ParameterDescription for unnamed statements, BackendKeyData,
//! authentication) is left out.

use std::collections::BTreeMap;

use super::tap::Msg;

/// How DataRow values are encoded in this operation.
#[derive(Debug, Clone)]
pub enum RowFormat {
    /// Simple query protocol: text.
    Text,
    /// tokio-postgres asks for binary results; the column types (OIDs) come from the
    /// operation's RowDescription or, for a prepared statement, from its preparation.
    Binary(Vec<u32>),
}

fn cstr(body: &[u8], at: &mut usize) -> String {
    let end = body[*at..]
        .iter()
        .position(|&b| b == 0)
        .map_or(body.len(), |p| *at + p);
    let s = String::from_utf8_lossy(&body[*at..end]).into_owned();
    *at = (end + 1).min(body.len());
    s
}

fn i16_at(body: &[u8], at: &mut usize) -> i16 {
    let v = i16::from_be_bytes(body[*at..*at + 2].try_into().expect("2 bytes"));
    *at += 2;
    v
}

fn i32_at(body: &[u8], at: &mut usize) -> i32 {
    let v = i32::from_be_bytes(body[*at..*at + 4].try_into().expect("4 bytes"));
    *at += 4;
    v
}

/// Fields of an ErrorResponse or NoticeResponse.
pub fn fields(body: &[u8]) -> BTreeMap<u8, String> {
    let mut out = BTreeMap::new();
    let mut at = 0;
    while at < body.len() && body[at] != 0 {
        let code = body[at];
        at += 1;
        out.insert(code, cstr(body, &mut at));
    }
    out
}

/// A value as it appears in the transcript: quoted (Rust escapes), or `NULL`.
pub fn show_value(v: Option<&str>) -> String {
    match v {
        Some(s) => format!("{s:?}"),
        None => "NULL".into(),
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::from("\\x");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// A binary-format value of type `oid` as text, for the types scripts use with the extended
/// protocol; other types show their bytes in hex (deterministic, so still comparable).
fn binary_value(oid: u32, v: &[u8]) -> String {
    let int = |n: usize| -> Option<i64> {
        (v.len() == n).then(|| match n {
            2 => i16::from_be_bytes(v.try_into().expect("2")) as i64,
            4 => i32::from_be_bytes(v.try_into().expect("4")) as i64,
            _ => i64::from_be_bytes(v.try_into().expect("8")),
        })
    };
    let text = match oid {
        16 if v.len() == 1 => Some(if v[0] != 0 { "t" } else { "f" }.to_string()),
        20 => int(8).map(|n| n.to_string()),
        21 => int(2).map(|n| n.to_string()),
        23 => int(4).map(|n| n.to_string()),
        26 => int(4).map(|n| (n as u32).to_string()),
        700 if v.len() == 4 => Some(f32::from_be_bytes(v.try_into().expect("4")).to_string()),
        701 if v.len() == 8 => Some(f64::from_be_bytes(v.try_into().expect("8")).to_string()),
        // text, name, varchar, bpchar, unknown, json, xml, char
        25 | 19 | 1043 | 1042 | 705 | 114 | 142 | 18 => {
            Some(String::from_utf8_lossy(v).into_owned())
        }
        3802 if v.first() == Some(&1) => Some(String::from_utf8_lossy(&v[1..]).into_owned()),
        _ => None,
    };
    match text {
        Some(t) => format!("{t:?}"),
        None => format!("binary {}", hex(v)),
    }
}

/// Formats `msgs` (one operation's messages) into `out`, updating the client's view of
/// its ParameterStatus values.
pub fn format_messages(
    msgs: &[Msg],
    mut format: RowFormat,
    params: &mut BTreeMap<String, String>,
    out: &mut Vec<String>,
) {
    let mut changed: BTreeMap<String, String> = BTreeMap::new();
    let mut notifications = Vec::new();
    let mut last_status = None;
    for m in msgs {
        let b = &m.body[..];
        match m.tag {
            b'T' => {
                let mut at = 0;
                let n = i16_at(b, &mut at);
                let mut cols = Vec::new();
                let mut oids = Vec::new();
                for _ in 0..n {
                    let name = cstr(b, &mut at);
                    at += 6; // table oid, column number
                    let oid = i32_at(b, &mut at) as u32;
                    at += 8; // type size, modifier, format
                    cols.push(format!("{name:?}::{oid}"));
                    oids.push(oid);
                }
                if let RowFormat::Binary(types) = &mut format {
                    *types = oids;
                }
                out.push(format!("  columns: {}", cols.join(", ")));
            }
            b'D' => {
                let mut at = 0;
                let n = i16_at(b, &mut at);
                let mut vals = Vec::new();
                for i in 0..n as usize {
                    let len = i32_at(b, &mut at);
                    if len < 0 {
                        vals.push("NULL".to_string());
                        continue;
                    }
                    let v = &b[at..at + len as usize];
                    at += len as usize;
                    vals.push(match &format {
                        RowFormat::Text => show_value(Some(&String::from_utf8_lossy(v))),
                        RowFormat::Binary(types) => {
                            binary_value(types.get(i).copied().unwrap_or(0), v)
                        }
                    });
                }
                out.push(format!("  row: {}", vals.join(", ")));
            }
            b'C' => {
                let mut at = 0;
                out.push(format!("  tag: {}", cstr(b, &mut at)));
            }
            b'I' => out.push("  empty query".into()),
            b'E' => {
                let f = fields(b);
                let get = |c: u8| f.get(&c).cloned().unwrap_or_default();
                out.push(format!("  {} {}: {}", get(b'S'), get(b'C'), get(b'M')));
            }
            b'N' => {
                let f = fields(b);
                let get = |c: u8| f.get(&c).cloned().unwrap_or_default();
                out.push(format!("  notice {}: {}", get(b'S'), get(b'M')));
            }
            b'S' => {
                let mut at = 0;
                let name = cstr(b, &mut at);
                let value = cstr(b, &mut at);
                if params.get(&name) != Some(&value) {
                    changed.insert(name.clone(), value.clone());
                } else {
                    changed.remove(&name);
                }
                params.insert(name, value);
            }
            b'A' => {
                let mut at = 0;
                let pid = i32_at(b, &mut at);
                let channel = cstr(b, &mut at);
                let payload = cstr(b, &mut at);
                notifications.push(format!(
                    "  notification from pid {pid}: channel {channel:?} payload {payload:?}"
                ));
            }
            b'G' => out.push("  copy in".into()),
            b'H' => out.push("  copy out".into()),
            b'd' => out.push(format!(
                "  copy data: {}",
                show_value(Some(&String::from_utf8_lossy(b)))
            )),
            b'c' => out.push("  copy done".into()),
            b'Z' => last_status = b.first().copied(),
            // ParseComplete, BindComplete, CloseComplete, NoData, ParameterDescription,
            // PortalSuspended, BackendKeyData, authentication.
            b'1' | b'2' | b'3' | b'n' | b't' | b's' | b'K' | b'R' => {}
            other => out.push(format!("  unexpected message {:?}", other as char)),
        }
    }
    for (name, value) in changed {
        out.push(format!("  parameter {name} = {value:?}"));
    }
    out.extend(notifications);
    if let Some(s) = last_status {
        out.push(format!(
            "  ready: {}",
            match s {
                b'I' => "idle".to_string(),
                b'T' => "in transaction".to_string(),
                b'E' => "failed transaction".to_string(),
                other => format!("status {:?}", other as char),
            }
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Msg {
        Msg {
            tag,
            body: body.to_vec(),
        }
    }

    #[test]
    fn a_simple_query_reply() {
        let mut desc = vec![0, 2];
        for name in ["a", "b"] {
            desc.extend_from_slice(name.as_bytes());
            desc.push(0);
            desc.extend_from_slice(&[0; 6]);
            desc.extend_from_slice(&25u32.to_be_bytes());
            desc.extend_from_slice(&[0; 8]);
        }
        let mut row = vec![0, 2];
        row.extend_from_slice(&1i32.to_be_bytes());
        row.push(b'x');
        row.extend_from_slice(&(-1i32).to_be_bytes());
        let mut params = BTreeMap::from([("DateStyle".to_string(), "ISO, MDY".to_string())]);
        let mut out = Vec::new();
        format_messages(
            &[
                msg(b'T', &desc),
                msg(b'D', &row),
                msg(b'C', b"SELECT 1\0"),
                msg(
                    b'N',
                    b"SWARNING\0C25P01\0Mthere is no transaction in progress\0\0",
                ),
                msg(b'S', b"DateStyle\0ISO, MDY\0"),
                msg(b'S', b"TimeZone\0UTC\0"),
                msg(b'A', b"\0\0\0\x07ch\0hi\0"),
                msg(b'Z', b"I"),
            ],
            RowFormat::Text,
            &mut params,
            &mut out,
        );
        assert_eq!(
            out,
            vec![
                "  columns: \"a\"::25, \"b\"::25",
                "  row: \"x\", NULL",
                "  tag: SELECT 1",
                "  notice WARNING: there is no transaction in progress",
                "  parameter TimeZone = \"UTC\"",
                "  notification from pid 7: channel \"ch\" payload \"hi\"",
                "  ready: idle",
            ]
        );
    }

    #[test]
    fn binary_values() {
        assert_eq!(binary_value(23, &42i32.to_be_bytes()), "\"42\"");
        assert_eq!(binary_value(16, &[1]), "\"t\"");
        assert_eq!(binary_value(25, b"hi"), "\"hi\"");
        assert_eq!(binary_value(1082, &[0, 0, 1, 0]), "binary \\x00000100");
    }
}
