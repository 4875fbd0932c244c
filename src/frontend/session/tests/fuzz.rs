//! Fuzzing the session: random and mutated sequences of client messages against a real
//! [`Session`](super::Session), whose server connections reach a fake PostgreSQL that
//! answers everything plausibly (see `protocol::fuzz` for the loop and replaying a case).
//!
//! Each case sends its messages, then a tail that ends any COPY and any transaction and
//! asks for a marker row (CopyFail, Sync, `rollback`, `select 'pgway-fuzz-end'`), then
//! closes its sending side. It asserts: nothing panics; the case ends within [`CASE`];
//! every ErrorResponse carries a SQLSTATE; there are never more ReadyForQuery than
//! Sync, Query and FunctionCall messages; and either the marker came back (the session
//! answered everything) or the connection ended right after a FATAL 08P01 (or the client
//! sent Terminate). A message whose length swallowed a Sync is the exception: a session
//! skipping to Sync after an error ignores it, as PostgreSQL does, and a Bind's values
//! are the server's to check, so the case may end after an ERROR or any answer.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use tokio::io::{AsyncWriteExt, DuplexStream};

use super::*;
use crate::protocol::fuzz::{mutate, reference_split, run};
use crate::protocol::messages::{Bind, Parse, Target};
use crate::protocol::MAX_MESSAGE_LEN;

/// Longest a case may take before it counts as a hang.
const CASE: Duration = Duration::from_secs(10);

/// Cases that share one [`Harness`] (its pools and their server connections), as the
/// clients of one pgway do; a harness costs about 100 ms to build. A case replayed alone
/// (`PGWAY_FUZZ_CASES=1`) runs on fresh pools.
const HARNESS_CASES: u64 = 64;

/// The marker row's text.
const MARKER: &str = "pgway-fuzz-end";

/// SQL a client sends, in Query or Parse.
const SQL: &[&str] = &[
    "select 1",
    "select * from t where id = $1",
    "begin",
    "begin read only",
    "commit",
    "rollback",
    "insert into t values (1)",
    "copy t from stdin",
    "set search_path = a",
    "reset all",
    "discard all",
    "listen ch",
    "unlisten *",
    "prepare p as select 1",
    "execute p",
    "deallocate all",
    "deallocate p",
    "select pg_advisory_lock(1)",
    "select fuzz_error()",
    "/* pgway:primary */ select 1",
    "/* pgway:replica */ select 1",
    "/* pgway:fresh */ select 1",
    "set pgway.target = 'primary'",
    "set pgway.target = 'nowhere'",
    "set pgway.min_lsn = 'x'",
    "show pgway.last_route",
    "create temp table x (a int)",
    "declare c cursor with hold for select 1",
    "select 1; select 2",
    "",
    ";",
];

/// Statement and portal names.
const NAMES: &[&str] = &["", "s1", "s2", "pgway_1", "nope"];

fn pick<'a>(rng: &mut StdRng, from: &[&'a str]) -> &'a str {
    from.choose(rng).copied().unwrap_or_default()
}

/// One client message.
fn client_message(rng: &mut StdRng) -> BytesMut {
    match rng.gen_range(0..40) {
        0..=5 => wire::query(pick(rng, SQL)),
        6..=10 => {
            let mut out = BytesMut::new();
            let n = rng.gen_range(0..3i16);
            let mut types = n.to_be_bytes().to_vec();
            for _ in 0..n {
                types.extend_from_slice(&23i32.to_be_bytes());
            }
            messages::write_parse(
                &mut out,
                pick(rng, NAMES).as_bytes(),
                pick(rng, SQL).as_bytes(),
                &types,
            );
            out
        }
        11..=15 => {
            let params: Vec<&str> = (0..rng.gen_range(0..3)).map(|_| "1").collect();
            wire::bind(pick(rng, NAMES), pick(rng, NAMES), &params)
        }
        16..=17 => wire::describe(*b"SP".choose(rng).unwrap_or(&b'S'), pick(rng, NAMES)),
        18..=20 => wire::execute(pick(rng, NAMES)),
        21..=22 => wire::close(*b"SP".choose(rng).unwrap_or(&b'S'), pick(rng, NAMES)),
        23..=26 => wire::sync(),
        27 => wire::flush(),
        28..=29 => wire::copy_data("1\n"),
        30 => wire::frame(b'c', &[]),
        31 => wire::frame(b'f', b"gave up\0"),
        32 => wire::frame(b'F', &[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]),
        33 if rng.gen_bool(0.2) => wire::frame(b'X', &[]),
        34 => {
            // An unknown or server-only type with a sane length.
            let tag = *b"AZTpGK\x00\xff?".choose(rng).unwrap_or(&b'?');
            wire::frame(tag, b"x\0")
        }
        35 => {
            // A bad length: negative, too short, over 1 GiB.
            let mut out = BytesMut::new();
            out.put_u8(*b"QPS".choose(rng).unwrap_or(&b'Q'));
            let len = *[-1, 0, 3, i32::MIN, (1 << 30) + 1, i32::MAX]
                .choose(rng)
                .unwrap_or(&-1);
            out.put_i32(len);
            out
        }
        36 => {
            // Malformed bodies under the right length.
            let tag = *b"PBDCQ".choose(rng).unwrap_or(&b'P');
            wire::frame(tag, &[b'z'; 3])
        }
        _ => wire::query(&format!("select {}", rng.gen::<u16>())),
    }
}

/// A case: client messages, some mutated, then the tail.
fn case_bytes(rng: &mut StdRng) -> Vec<u8> {
    let mut bytes = Vec::new();
    for _ in 0..rng.gen_range(1..24) {
        let mut m = client_message(rng).to_vec();
        if rng.gen_bool(0.08) {
            mutate(rng, &mut m, &[b"\0", b"S\0\0\0\x04", b"\0\0\0\x04"]);
        }
        bytes.extend_from_slice(&m);
    }
    if rng.gen_bool(0.05) {
        mutate(rng, &mut bytes, &[b"\0", b"S\0\0\0\x04"]);
    }
    for m in [
        wire::frame(b'f', b"fuzz end\0"),
        wire::sync(),
        wire::query("rollback"),
        wire::query(&format!("select '{MARKER}'")),
    ] {
        bytes.extend_from_slice(&m);
    }
    bytes
}

/// What the fake PostgreSQL remembers about one connection.
#[derive(Default)]
struct FakeState {
    /// ReadyForQuery status.
    status: u8,
    /// Skipping to Sync after an extended-protocol error.
    skipping: bool,
    /// In COPY FROM STDIN: started by Execute (else by Query).
    copy: Option<bool>,
    statements: HashMap<Vec<u8>, String>,
    portals: HashMap<Vec<u8>, String>,
}

impl FakeState {
    fn error(&mut self, out: &mut BytesMut, code: &str) {
        out.extend_from_slice(&wire::error(Severity::Error, code, "fake error"));
        if self.status == b'T' {
            self.status = b'E';
        }
    }

    /// The effect of `sql` having run on the transaction status.
    fn ran(&mut self, sql: &str) {
        let sql = sql.trim_start().to_ascii_lowercase();
        if sql.starts_with("begin") || sql.starts_with("start") {
            self.status = b'T';
        } else if ["commit", "rollback", "abort", "end"]
            .iter()
            .any(|w| sql.starts_with(w))
        {
            self.status = b'I';
        }
    }

    fn simple_query(&mut self, sql: &str, out: &mut BytesMut) {
        let lower = sql.to_ascii_lowercase();
        let ends = ["rollback", "commit", "abort"]
            .iter()
            .any(|w| lower.trim_start().starts_with(w));
        if self.status == b'E' && !ends {
            self.error(out, "25P02");
        } else if lower.contains("fuzz_error") {
            self.error(out, "42883");
        } else if lower.contains("copy") && lower.contains("from stdin") {
            self.copy = Some(false);
            out.extend_from_slice(&wire::copy_in_response());
            return;
        } else if sql.contains(MARKER) {
            out.extend_from_slice(&wire::row_description(&["?column?"]));
            out.extend_from_slice(&wire::data_row(&[MARKER]));
            out.extend_from_slice(&wire::complete("SELECT 1"));
        } else {
            self.ran(sql);
            out.extend_from_slice(&wire::complete("SELECT 1"));
        }
        out.extend_from_slice(&wire::ready(self.status));
    }

    /// Answers one message; false when the connection ends.
    fn answer(&mut self, frame: &[u8], out: &mut BytesMut) -> bool {
        let tag = frame[0];
        if let Some(extended) = self.copy {
            match tag {
                b'd' | b'H' | b'S' => {}
                b'c' => {
                    self.copy = None;
                    out.extend_from_slice(&wire::complete("COPY 1"));
                    if !extended {
                        out.extend_from_slice(&wire::ready(self.status));
                    }
                }
                _ => {
                    self.copy = None;
                    self.error(out, if tag == b'f' { "57014" } else { "08P01" });
                    if extended {
                        self.skipping = true;
                    } else {
                        out.extend_from_slice(&wire::ready(self.status));
                    }
                }
            }
            return true;
        }
        if self.skipping && tag != b'S' {
            return tag != b'X';
        }
        match tag {
            b'Q' => match messages::query_text(frame) {
                Ok(sql) => self.simple_query(&String::from_utf8_lossy(sql), out),
                Err(_) => return false,
            },
            b'P' => match Parse::decode(frame) {
                Ok(p) if !p.sql.windows(10).any(|w| w == b"fuzz_error") => {
                    let sql = String::from_utf8_lossy(p.sql).into_owned();
                    self.statements.insert(p.name.to_vec(), sql);
                    out.extend_from_slice(&wire::frame(b'1', &[]));
                }
                _ => {
                    self.error(out, "42601");
                    self.skipping = true;
                }
            },
            b'B' => match Bind::decode(frame) {
                Ok(b) if self.statements.contains_key(b.statement) => {
                    let sql = self.statements[b.statement].clone();
                    self.portals.insert(b.portal.to_vec(), sql);
                    out.extend_from_slice(&wire::frame(b'2', &[]));
                }
                _ => {
                    self.error(out, "26000");
                    self.skipping = true;
                }
            },
            b'D' => match Target::decode(frame) {
                Ok(t) if t.kind == b'S' && self.statements.contains_key(t.name) => {
                    out.extend_from_slice(&wire::frame(b't', &[0, 0]));
                    out.extend_from_slice(&wire::frame(b'n', &[]));
                }
                Ok(t) if t.kind == b'P' && self.portals.contains_key(t.name) => {
                    out.extend_from_slice(&wire::frame(b'n', &[]));
                }
                _ => {
                    self.error(out, "26000");
                    self.skipping = true;
                }
            },
            b'E' => {
                let portal = messages::body(frame).split(|&b| b == 0).next();
                match portal.and_then(|p| self.portals.get(p)).cloned() {
                    Some(sql) => {
                        let lower = sql.to_ascii_lowercase();
                        if lower.contains("copy") && lower.contains("from stdin") {
                            self.copy = Some(true);
                            out.extend_from_slice(&wire::copy_in_response());
                        } else {
                            self.ran(&sql);
                            out.extend_from_slice(&wire::complete("SELECT 0"));
                        }
                    }
                    None => {
                        self.error(out, "34000");
                        self.skipping = true;
                    }
                }
            }
            b'C' => {
                if let Ok(t) = Target::decode(frame) {
                    if t.kind == b'S' {
                        self.statements.remove(t.name);
                    } else {
                        self.portals.remove(t.name);
                    }
                }
                out.extend_from_slice(&wire::frame(b'3', &[]));
            }
            b'S' => {
                self.skipping = false;
                self.portals.clear();
                out.extend_from_slice(&wire::ready(self.status));
            }
            b'H' => {}
            b'F' => {
                out.extend_from_slice(&wire::frame(b'V', &(-1i32).to_be_bytes()));
                out.extend_from_slice(&wire::ready(self.status));
            }
            b'X' => return false,
            _ => {
                out.extend_from_slice(&wire::error(Severity::Fatal, "08P01", "unexpected"));
                return false;
            }
        }
        true
    }
}

/// A fake PostgreSQL on one connection pgway opened.
async fn fake_postgres(stream: DuplexStream, pid: i32) {
    let mut io = FramedStream::new(Box::new(stream));
    if io.read_startup().await.is_err() {
        return;
    }
    let mut out = BytesMut::new();
    messages::authentication(&mut out, 0, &[]);
    messages::parameter_status(&mut out, "server_version", "15.0");
    messages::backend_key_data(&mut out, pid, pid * 7);
    messages::ready_for_query(&mut out, b'I');
    let mut state = FakeState {
        status: b'I',
        ..FakeState::default()
    };
    loop {
        if io.send(&mut out).await.is_err() {
            return;
        }
        let Ok(frame) = io.read_frame(MAX_MESSAGE_LEN).await else {
            return;
        };
        if !state.answer(&frame, &mut out) {
            let _ = io.send(&mut out).await;
            return;
        }
    }
}

/// Accepts every connection pgway opens to either node.
fn serve_fake_nodes(h: &mut Harness) {
    for addr in [PRIMARY, REPLICA] {
        let Some(mut incoming) = h.incoming.remove(addr) else {
            continue;
        };
        tokio::spawn(async move {
            let mut pid = 1000;
            while let Some(stream) = incoming.recv().await {
                pid += 1;
                tokio::spawn(fake_postgres(stream, pid));
            }
        });
    }
}

/// Runs one case; panics with what went wrong.
async fn session_case(h: &Harness, bytes: &[u8]) {
    let TestClient {
        mut io, session, ..
    } = h.client().await;
    // Cases are small: all of it fits in the pipe without pgway's replies being read.
    io.send_bytes(bytes).await.expect("client send");
    io.stream.shutdown().await.expect("client shutdown");
    let mut got: Vec<Msg> = Vec::new();
    let end = loop {
        match io.read_frame(MAX_MESSAGE_LEN).await {
            Ok(frame) => got.push((frame[0], frame[5..].to_vec())),
            Err(e) => break e,
        }
    };
    session.await.expect("session task panicked");
    check(bytes, &got, &end);
}

/// The case's properties (see the module documentation).
fn check(bytes: &[u8], got: &[Msg], end: &NetError) {
    let show = || format!("sent {bytes:?}\ngot {:?}\nend {end:?}", tags(got));
    assert!(matches!(end, NetError::Closed), "{}", show());
    for msg in got.iter().filter(|m| m.0 == b'E') {
        let code = sqlstate(msg);
        assert!(
            code.len() == 5 && code.bytes().all(|b| b.is_ascii_alphanumeric()),
            "ErrorResponse without a SQLSTATE: {}",
            show()
        );
    }
    let (frames, _) = reference_split(bytes, MAX_MESSAGE_LEN);
    let asks = frames
        .iter()
        .filter(|f| matches!(f[0], b'Q' | b'S' | b'F'))
        .count();
    let readies = got.iter().filter(|m| m.0 == b'Z').count();
    assert!(
        readies <= asks,
        "{readies} ReadyForQuery for {asks}: {}",
        show()
    );
    let marker = got
        .windows(2)
        .any(|w| w[0].0 == b'D' && text(&w[0].1[6..]) == MARKER && w[1].0 != b'E');
    if marker {
        return;
    }
    if frames.iter().any(|f| f[0] == b'X') {
        return;
    }
    // A message whose length swallowed a Sync: a session skipping to Sync ignores it, as
    // PostgreSQL does, and a Bind's values are the server's to check, which never sees a
    // batch without its Sync. Either way the Sync never comes.
    let swallowed_sync = frames
        .iter()
        .any(|f| f[1..].windows(5).any(|w| w == b"S\0\0\0\x04"));
    let last = got.last();
    if swallowed_sync && last.is_none_or(|m| m.0 != b'E' || severity(m) == "ERROR") {
        return;
    }
    let last = last.unwrap_or_else(|| panic!("closed in silence: {}", show()));
    assert_eq!(last.0, b'E', "closed without an error: {}", show());
    assert_eq!(severity(last), "FATAL", "{}", show());
    assert_eq!(sqlstate(last), "08P01", "{}", show());
}

/// Random and mutated client message sequences against a session (see the module
/// documentation for what each case asserts).
#[test]
fn fuzz_session() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut harness = None;
    let mut cases = 0u64;
    run("fuzz_session", |rng| {
        let bytes = case_bytes(rng);
        runtime.block_on(async {
            if cases.is_multiple_of(HARNESS_CASES) {
                let mut h = Harness::new(2);
                serve_fake_nodes(&mut h);
                harness = Some(h);
            }
            cases += 1;
            let h = harness.as_ref().expect("a harness");
            if crate::timer::timeout(CASE, session_case(h, &bytes))
                .await
                .is_err()
            {
                panic!("the session hangs on {bytes:?}");
            }
        });
    });
}

/// Found by the long run of `fuzz_session`: Bind of an unknown statement and Flush (the
/// server errs and skips to Sync), then a Parse mentioning `pgway.last_route` and Sync.
/// pgway made the setting current with a query the skipping server never answered, and
/// waited for it.
#[test]
fn a_bind_of_an_unknown_statement_then_flush_and_sync() {
    let bytes: &[u8] = &[
        66, 0, 0, 0, 24, 0, 115, 50, 0, 0, 0, 0, 2, 0, 0, 0, 1, 49, 0, 0, 0, 1, 49, 0, 0, 72, 0, 0,
        0, 4, 66, 0, 0, 0, 23, 110, 111, 112, 101, 0, 115, 49, 0, 0, 0, 0, 1, 0, 0, 0, 1, 49, 0, 0,
        80, 0, 0, 0, 46, 115, 49, 0, 115, 101, 116, 32, 112, 103, 119, 97, 121, 46, 116, 97, 114,
        103, 101, 116, 32, 61, 32, 39, 110, 111, 119, 104, 101, 114, 101, 39, 0, 0, 2, 0, 0, 0, 23,
        0, 0, 0, 23, 80, 0, 0, 0, 33, 110, 111, 112, 101, 0, 115, 104, 111, 119, 32, 112, 103, 119,
        97, 121, 46, 108, 97, 115, 116, 95, 114, 111, 117, 116, 101, 0, 0, 0, 102, 0, 0, 0, 13,
        102, 117, 122, 122, 32, 101, 110, 100, 0, 83, 0, 0, 0, 4, 81, 0, 0, 0, 13, 114, 111, 108,
        108, 98, 97, 99, 107, 0, 81, 0, 0, 0, 28, 115, 101, 108, 101, 99, 116, 32, 39, 112, 103,
        119, 97, 121, 45, 102, 117, 122, 122, 45, 101, 110, 100, 39, 0,
    ];
    replay(bytes);
}

/// Found by `fuzz_session`: a pinned client (a session advisory lock) whose Bind failed
/// without a Sync, then a COMMIT: pgway checked whether the pin could go with a query the
/// server, skipping to Sync, never answered, and waited for it.
#[test]
fn a_pin_check_waits_for_the_sync_of_a_failed_batch() {
    let bytes: &[u8] = &[
        80, 0, 0, 0, 26, 115, 50, 0, 114, 111, 108, 108, 98, 97, 99, 107, 0, 0, 2, 0, 0, 0, 23, 0,
        0, 0, 23, 66, 0, 0, 0, 16, 0, 110, 111, 112, 101, 0, 0, 0, 0, 0, 0, 0, 102, 0, 0, 0, 12,
        103, 97, 118, 101, 32, 117, 112, 0, 83, 0, 0, 0, 4, 81, 0, 0, 0, 28, 115, 101, 116, 32,
        112, 103, 119, 97, 121, 46, 109, 105, 110, 95, 108, 115, 110, 32, 61, 32, 39, 120, 39, 0,
        68, 0, 0, 0, 13, 80, 112, 103, 119, 97, 121, 95, 49, 0, 81, 0, 0, 0, 17, 115, 101, 108,
        101, 99, 116, 32, 49, 52, 57, 52, 50, 0, 72, 0, 0, 0, 4, 83, 0, 0, 0, 4, 66, 0, 0, 0, 30,
        110, 111, 112, 101, 0, 110, 111, 112, 101, 0, 0, 0, 0, 2, 0, 0, 0, 1, 49, 0, 0, 0, 1, 49,
        0, 0, 81, 0, 0, 0, 31, 115, 101, 108, 101, 99, 116, 32, 112, 103, 95, 97, 100, 118, 105,
        115, 111, 114, 121, 95, 108, 111, 99, 107, 40, 49, 41, 0, 67, 0, 0, 0, 8, 83, 115, 49, 0,
        66, 0, 0, 0, 18, 110, 111, 112, 101, 0, 115, 50, 0, 0, 39, 17, 0, 0, 0, 81, 0, 0, 0, 31,
        115, 101, 108, 101, 99, 116, 32, 112, 103, 95, 97, 100, 118, 105, 115, 111, 114, 121, 95,
        108, 111, 99, 107, 40, 49, 41, 0, 72, 0, 0, 0, 4, 81, 0, 0, 0, 11, 99, 111, 109, 109, 105,
        116, 0, 66, 0, 0, 0, 31, 112, 103, 119, 97, 121, 95, 49, 0, 115, 50, 0, 0, 0, 0, 2, 0, 0,
        0, 1, 49, 0, 0, 0, 1, 49, 0, 0, 255, 0, 0, 0, 6, 120, 0, 83, 0, 0, 0, 4, 66, 0, 0, 0, 18,
        110, 111, 112, 101, 0, 115, 50, 0, 0, 0, 0, 0, 0, 0, 80, 0, 0, 0, 38, 115, 50, 0, 115, 101,
        116, 32, 112, 103, 119, 97, 121, 46, 116, 97, 114, 103, 101, 116, 32, 61, 32, 39, 110, 111,
        119, 104, 101, 114, 101, 39, 0, 0, 0, 81, 0, 0, 0, 17, 115, 101, 108, 101, 99, 116, 32, 54,
        53, 48, 56, 50, 0, 100, 0, 0, 0, 6, 49, 10, 102, 0, 0, 0, 13, 102, 117, 122, 122, 32, 101,
        110, 100, 0, 83, 0, 0, 0, 4, 81, 0, 0, 0, 13, 114, 111, 108, 108, 98, 97, 99, 107, 0, 81,
        0, 0, 0, 28, 115, 101, 108, 101, 99, 116, 32, 39, 112, 103, 119, 97, 121, 45, 102, 117,
        122, 122, 45, 101, 110, 100, 39, 0,
    ];
    replay(bytes);
}

/// Runs one recorded case against fresh pools, as `fuzz_session` did when it found it.
fn replay(bytes: &[u8]) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut h = Harness::new(2);
        serve_fake_nodes(&mut h);
        crate::timer::timeout(CASE, session_case(&h, bytes))
            .await
            .expect("the session answers");
    });
}
