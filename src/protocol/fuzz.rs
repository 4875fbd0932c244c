//! Fuzzing on stable Rust: a seeded random loop that mutates real protocol samples.
//!
//! Each target runs cases until its time budget is spent: `PGWAY_FUZZ_SECS` seconds
//! (default [`DEFAULT_SECS`], so the eight targets of `cargo test --lib` fuzz for about two
//! minutes in all, one minute of wall time on two cores). A case is one seed: it builds
//! its input from samples of well-formed messages, mutates them (bit flips, interesting
//! lengths, cuts, splices) and checks the target's properties. A failing case panics with
//! its seed; `PGWAY_FUZZ_SEED=<seed> PGWAY_FUZZ_CASES=1` replays exactly that case.
//!
//! This module holds the loop and the mutator, which the other targets
//! (`route::fuzz`, `frontend::session::tests::fuzz`) share, and the targets for the
//! protocol layer: the frame splitters and [`Reader`], [`FramedStream`] reading frames
//! from a stream cut at arbitrary points, the startup packet and the message decoders.
//!
//! [`FramedStream`]: crate::net::FramedStream

#![allow(
    clippy::expect_used,
    reason = "a fuzz case that cannot go on fails, with its message"
)]

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::frame::{frame_len, put_frame, startup_len, FrameError, Reader};
use super::messages::{self, Bind, Parse, StartupPacket, Target};
use super::{MAX_MESSAGE_LEN, MAX_STARTUP_LEN};

/// Seconds each target runs when `PGWAY_FUZZ_SECS` is not set.
pub(crate) const DEFAULT_SECS: f64 = 15.0;

/// Length-field values worth trying: the limits, one past them, the minimums, the sign.
pub(crate) const INTERESTING_I32: &[i32] = &[
    0,
    1,
    3,
    4,
    5,
    7,
    8,
    9,
    -1,
    i32::MIN,
    i32::MAX,
    MAX_STARTUP_LEN as i32,
    MAX_STARTUP_LEN as i32 + 1,
    MAX_MESSAGE_LEN as i32,
    MAX_MESSAGE_LEN as i32 + 1,
    0x7fff,
    0x8000,
    0xffff,
];

/// How long and from which seed a target runs.
/// The first seed of a run that names none.
const DEFAULT_SEED: u64 = 20_261_201;

struct Budget {
    time: Duration,
    /// The first case's seed; case `i` uses `seed + i`.
    seed: u64,
    /// At most this many cases (`PGWAY_FUZZ_CASES`), for replaying one.
    cases: u64,
}

impl Budget {
    fn from_env() -> Self {
        let secs = std::env::var("PGWAY_FUZZ_SECS")
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(DEFAULT_SECS);
        // A fixed first seed unless one is given: the CI run is the same every time (a
        // long run passes its own, e.g. `PGWAY_FUZZ_SEED=$RANDOM$RANDOM`).
        let seed = std::env::var("PGWAY_FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(DEFAULT_SEED);
        let cases = std::env::var("PGWAY_FUZZ_CASES")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(u64::MAX);
        Self {
            time: Duration::from_secs_f64(secs.max(0.0)),
            seed,
            cases,
        }
    }
}

/// Runs `case` with fresh seeded generators until the budget is spent; returns the number
/// of cases. A panic in a case is re-raised with the seed that replays it.
pub(crate) fn run(target: &str, mut case: impl FnMut(&mut StdRng)) -> u64 {
    let budget = Budget::from_env();
    let started = Instant::now();
    let mut n = 0;
    while n < budget.cases && (n == 0 || started.elapsed() < budget.time) {
        let seed = budget.seed.wrapping_add(n);
        let mut rng = StdRng::seed_from_u64(seed);
        if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(|| case(&mut rng))) {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            panic!(
                "fuzz {target}: case failed: {message}\n\
                 replay: PGWAY_FUZZ_SEED={seed} PGWAY_FUZZ_CASES=1 cargo test --lib {target}"
            );
        }
        n += 1;
    }
    println!(
        "fuzz {target}: {n} cases in {:.1}s (first seed {})",
        started.elapsed().as_secs_f64(),
        budget.seed
    );
    n
}

/// Applies one to four random mutations to `data`; `dict` holds fragments worth inserting
/// (keywords, tags, whole frames).
pub(crate) fn mutate(rng: &mut StdRng, data: &mut Vec<u8>, dict: &[&[u8]]) {
    for _ in 0..rng.gen_range(1..=4) {
        let len = data.len();
        let at = rng.gen_range(0..=len);
        match rng.gen_range(0..10) {
            0 if len > 0 => {
                let i = rng.gen_range(0..len);
                data[i] ^= 1 << rng.gen_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.gen_range(0..len);
                data[i] = *[0u8, 0xff, 0x7f, 0x80, b'\'', b';', b'(', rng.gen()]
                    .choose(rng)
                    .unwrap_or(&0);
            }
            2 if len >= 4 => {
                // An interesting big-endian i32 over four bytes (a length field, often).
                let i = rng.gen_range(0..=len - 4);
                let v = INTERESTING_I32.choose(rng).copied().unwrap_or(0);
                data[i..i + 4].copy_from_slice(&v.to_be_bytes());
            }
            3 if len > 0 => {
                let end = rng.gen_range(at.min(len - 1)..len);
                data.drain(at.min(end)..=end);
            }
            4 => data.truncate(at),
            5 if len > 0 => {
                let from = rng.gen_range(0..len);
                let to = rng.gen_range(from..=len.min(from + 64));
                let copy = data[from..to].to_vec();
                data.splice(at..at, copy);
            }
            6 | 7 if !dict.is_empty() => {
                let piece = dict.choose(rng).copied().unwrap_or_default();
                data.splice(at..at, piece.iter().copied());
            }
            8 => {
                let n = rng.gen_range(1..=8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
                data.splice(at..at, bytes);
            }
            _ => {
                if len > 0 {
                    let i = rng.gen_range(0..len);
                    data[i] = 0;
                }
            }
        }
    }
}

fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    put_frame(&mut out, tag, body);
    out.to_vec()
}

/// A random word for names and SQL text.
fn word(rng: &mut StdRng) -> &'static [u8] {
    [
        &b""[..],
        b"s1",
        b"pgway_1",
        b"select 1",
        b"select $1::int",
        b"COPY t FROM STDIN",
        b"BEGIN",
        b"\xff\xfe",
        b"x",
    ]
    .choose(rng)
    .copied()
    .unwrap_or_default()
}

fn cstr(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(s);
    out.push(0);
}

/// One well-formed message of a random type, either direction.
pub(crate) fn sample_frame(rng: &mut StdRng) -> Vec<u8> {
    let mut body = Vec::new();
    let tag = match rng.gen_range(0..18) {
        0 => {
            cstr(&mut body, word(rng));
            b'Q'
        }
        1 => {
            cstr(&mut body, word(rng));
            cstr(&mut body, word(rng));
            let n = rng.gen_range(0..4i16);
            body.extend_from_slice(&n.to_be_bytes());
            for _ in 0..n {
                body.extend_from_slice(&23i32.to_be_bytes());
            }
            b'P'
        }
        2 => {
            cstr(&mut body, word(rng));
            cstr(&mut body, word(rng));
            body.extend_from_slice(&1i16.to_be_bytes());
            body.extend_from_slice(&0i16.to_be_bytes());
            let n = rng.gen_range(0..3i16);
            body.extend_from_slice(&n.to_be_bytes());
            for _ in 0..n {
                body.extend_from_slice(&2i32.to_be_bytes());
                body.extend_from_slice(b"42");
            }
            body.extend_from_slice(&(-1i32).to_be_bytes());
            body.extend_from_slice(&0i16.to_be_bytes());
            b'B'
        }
        3 | 4 => {
            body.push(*[b'S', b'P'].choose(rng).unwrap_or(&b'S'));
            cstr(&mut body, word(rng));
            if rng.gen() {
                b'D'
            } else {
                b'C'
            }
        }
        5 => {
            cstr(&mut body, word(rng));
            body.extend_from_slice(&0i32.to_be_bytes());
            b'E'
        }
        6 => b'S',
        7 => b'H',
        8 => b'X',
        9 => {
            body.extend_from_slice(word(rng));
            b'd'
        }
        10 => b'c',
        11 => {
            cstr(&mut body, b"client gave up");
            b'f'
        }
        12 | 13 => {
            let mut out = BytesMut::new();
            let code = ["08P01", "57P01", "25P02", "", "4"]
                .choose(rng)
                .copied()
                .unwrap_or_default();
            let severity = if rng.gen() {
                messages::Severity::Error
            } else {
                messages::Severity::Fatal
            };
            messages::error_response(&mut out, severity, code, "message é");
            let mut f = out.to_vec();
            if rng.gen() {
                f[0] = b'N';
            }
            return f;
        }
        14 => {
            body.push(*b"ITE".choose(rng).unwrap_or(&b'I'));
            b'Z'
        }
        15 => {
            body.extend_from_slice(&1i16.to_be_bytes());
            body.extend_from_slice(&1i32.to_be_bytes());
            body.push(b'1');
            b'D'
        }
        16 => {
            body.extend_from_slice(&0i32.to_be_bytes());
            b'R'
        }
        _ => {
            body.extend_from_slice(&[0, 0, 0, 0x04]);
            b'F'
        }
    };
    frame(tag, &body)
}

/// A well-formed startup-style packet: StartupMessage, SSLRequest, GSSENCRequest or
/// CancelRequest.
pub(crate) fn sample_startup(rng: &mut StdRng) -> Vec<u8> {
    let mut packet = vec![0, 0, 0, 0];
    match rng.gen_range(0..5) {
        0 => packet.extend_from_slice(&messages::SSL_REQUEST_CODE.to_be_bytes()),
        1 => packet.extend_from_slice(&messages::GSSENC_REQUEST_CODE.to_be_bytes()),
        2 => {
            for v in [messages::CANCEL_REQUEST_CODE, rng.gen(), rng.gen()] {
                packet.extend_from_slice(&v.to_be_bytes());
            }
        }
        _ => {
            packet.extend_from_slice(&messages::PROTOCOL_V3.to_be_bytes());
            for _ in 0..rng.gen_range(0..4) {
                let (k, v) = [
                    (&b"user"[..], &b"app"[..]),
                    (b"database", b"db"),
                    (b"options", b"-c search_path=a"),
                    (b"application_name", b"\xc3\xa9"),
                    (b"x", b""),
                ]
                .choose(rng)
                .copied()
                .unwrap_or_default();
                cstr(&mut packet, k);
                cstr(&mut packet, v);
            }
            packet.push(0);
        }
    }
    let len = packet.len() as i32;
    packet[..4].copy_from_slice(&len.to_be_bytes());
    packet
}

/// Tags and fragments the frame mutator inserts.
const FRAME_DICT: &[&[u8]] = &[
    b"Q",
    b"P",
    b"B",
    b"S",
    b"\0",
    b"\0\0",
    b"\0\0\0\x04",
    b"\xff\xff\xff\xff",
    b"\x40\0\0\0",
    b"\x40\0\0\x01",
    b"\x7f\xff\xff\xff",
    b"S\0\0\0\x04",
    b"Z\0\0\0\x05I",
];

/// A byte stream of one to eight messages, sometimes mutated.
pub(crate) fn sample_stream(rng: &mut StdRng) -> Vec<u8> {
    let mut stream = Vec::new();
    for _ in 0..rng.gen_range(1..=8) {
        let mut f = sample_frame(rng);
        if rng.gen_bool(0.3) {
            mutate(rng, &mut f, FRAME_DICT);
        }
        stream.extend_from_slice(&f);
    }
    if rng.gen_bool(0.2) {
        mutate(rng, &mut stream, FRAME_DICT);
    }
    stream
}

/// The announced length of the frame at the start of `buf` (which holds at least 5 bytes).
fn announced(buf: &[u8]) -> i64 {
    i64::from(i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]))
}

/// What splitting `stream` with [`frame_len`] gives: the frames, then how it ends (an
/// error, or the bytes of an incomplete last frame).
pub(crate) fn reference_split(
    stream: &[u8],
    limit: usize,
) -> (Vec<&[u8]>, Result<usize, FrameError>) {
    let mut frames = Vec::new();
    let mut rest = stream;
    loop {
        match frame_len(rest, limit) {
            Ok(Some(n)) => {
                frames.push(&rest[..n]);
                rest = &rest[n..];
            }
            Ok(None) => return (frames, Ok(rest.len())),
            Err(e) => return (frames, Err(e)),
        }
    }
}

/// `frame_len` and `startup_len` on arbitrary streams: a length is checked before the body
/// arrives, every prefix of a frame asks for more bytes (or fails alike), and errors are
/// typed and say what the length field said.
#[test]
fn fuzz_frame_splitters() {
    run("fuzz_frame_splitters", |rng| {
        let stream = sample_stream(rng);
        let limit = if rng.gen_bool(0.2) {
            rng.gen_range(0..64)
        } else {
            MAX_MESSAGE_LEN
        };
        let mut rest = &stream[..];
        loop {
            let got = frame_len(rest, limit);
            if rest.len() >= 5 {
                // The verdict on the length field needs only the header.
                match (&got, frame_len(&rest[..5], limit)) {
                    (Err(a), Err(b)) => assert_eq!(*a, b, "{stream:?}"),
                    (Ok(_), Ok(_)) => {}
                    (a, b) => panic!("header {b:?} vs frame {a:?}: {stream:?}"),
                }
            }
            match got {
                Ok(Some(n)) => {
                    assert!(n >= 5 && n <= rest.len(), "{stream:?}");
                    let len = announced(rest);
                    assert_eq!(n as i64, len + 1);
                    assert!(len >= 4 && len as u64 <= limit as u64);
                    let cut = rng.gen_range(0..n);
                    assert_eq!(frame_len(&rest[..cut], limit), Ok(None), "{stream:?}");
                    rest = &rest[n..];
                }
                Ok(None) => {
                    assert!(rest.len() < 5 || announced(rest) + 1 > rest.len() as i64);
                    break;
                }
                Err(FrameError::TooShort(len)) => {
                    assert!(len < 4 && len == announced(rest), "{stream:?}");
                    break;
                }
                Err(FrameError::TooLong { len, limit: l }) => {
                    assert!(l == limit && len > l as i64 && len == announced(rest));
                    break;
                }
                Err(e @ FrameError::Malformed(_)) => panic!("{e} from frame_len: {stream:?}"),
            }
        }

        let mut packet = sample_startup(rng);
        if rng.gen_bool(0.5) {
            mutate(rng, &mut packet, FRAME_DICT);
        }
        match startup_len(&packet) {
            Ok(Some(n)) => {
                assert!((8..=MAX_STARTUP_LEN).contains(&n) && n <= packet.len());
                let cut = rng.gen_range(0..n);
                assert_eq!(startup_len(&packet[..cut]), Ok(None), "{packet:?}");
            }
            Ok(None) => assert!(
                packet.len() < 4 || {
                    let len = i32::from_be_bytes([packet[0], packet[1], packet[2], packet[3]]);
                    len as usize > packet.len()
                }
            ),
            Err(FrameError::TooShort(len)) => assert!(len < 8),
            Err(FrameError::TooLong { len, limit }) => {
                assert!(limit == MAX_STARTUP_LEN && len > limit as i64)
            }
            Err(e) => panic!("{e} from startup_len: {packet:?}"),
        }
    });
}

/// [`Reader`] against a model: every read takes exactly its bytes or fails with
/// `Malformed` and takes none, whatever the input and the requested sizes.
#[test]
fn fuzz_reader() {
    run("fuzz_reader", |rng| {
        let mut data = sample_frame(rng);
        mutate(rng, &mut data, FRAME_DICT);
        let mut r = Reader::new(&data, "fuzz");
        let mut pos = 0;
        let malformed = || FrameError::Malformed("fuzz");
        for _ in 0..rng.gen_range(1..12) {
            let left = &data[pos..];
            match rng.gen_range(0..6) {
                0 => match memchr::memchr(0, left) {
                    Some(end) => {
                        assert_eq!(r.cstr(), Ok(&left[..end]));
                        pos += end + 1;
                    }
                    None => assert_eq!(r.cstr(), Err(malformed())),
                },
                1 => match left.get(..4) {
                    Some(b) => {
                        assert_eq!(r.i32(), Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]])));
                        pos += 4;
                    }
                    None => assert_eq!(r.i32(), Err(malformed())),
                },
                2 => match left.get(..2) {
                    Some(b) => {
                        assert_eq!(r.i16(), Ok(i16::from_be_bytes([b[0], b[1]])));
                        pos += 2;
                    }
                    None => assert_eq!(r.i16(), Err(malformed())),
                },
                3 => match left.first() {
                    Some(&b) => {
                        assert_eq!(r.u8(), Ok(b));
                        pos += 1;
                    }
                    None => assert_eq!(r.u8(), Err(malformed())),
                },
                4 => {
                    let n = *[
                        0,
                        1,
                        left.len(),
                        left.len() + 1,
                        usize::MAX,
                        rng.gen_range(0..16),
                    ]
                    .choose(rng)
                    .unwrap_or(&0);
                    match left.get(..n) {
                        Some(b) => {
                            assert_eq!(r.bytes(n), Ok(b));
                            pos += n;
                        }
                        None => assert_eq!(r.bytes(n), Err(malformed())),
                    }
                }
                _ => {
                    assert_eq!(r.rest(), left);
                    pos = data.len();
                }
            }
        }
    });
}

/// Startup packets, well-formed and mutated: decoding never panics, fails only as
/// `Malformed("startup")`, and what it accepts encodes back to the same packet.
#[test]
fn fuzz_startup_packet() {
    run("fuzz_startup_packet", |rng| {
        let mut packet = sample_startup(rng);
        if rng.gen_bool(0.8) {
            mutate(rng, &mut packet, FRAME_DICT);
        }
        // As the session reads it: split by `startup_len`, then decoded.
        let whole = match startup_len(&packet) {
            Ok(Some(n)) => &packet[..n],
            _ => &packet[..],
        };
        match StartupPacket::decode(whole) {
            Ok(StartupPacket::Startup(params)) => {
                let mut again = vec![0, 0, 0, 0];
                again.extend_from_slice(&messages::PROTOCOL_V3.to_be_bytes());
                for (k, v) in &params {
                    assert!(!k.is_empty() && !k.contains('\0') && !v.contains('\0'));
                    cstr(&mut again, k.as_bytes());
                    cstr(&mut again, v.as_bytes());
                }
                again.push(0);
                assert_eq!(
                    StartupPacket::decode(&again),
                    Ok(StartupPacket::Startup(params)),
                    "{packet:?}"
                );
            }
            Ok(StartupPacket::Cancel { pid, secret }) => {
                assert_eq!(whole[8..12], pid.to_be_bytes());
                assert_eq!(whole[12..16], secret.to_be_bytes());
            }
            Ok(StartupPacket::Ssl | StartupPacket::GssEnc) => {}
            Err(e) => assert_eq!(e, FrameError::Malformed("startup"), "{packet:?}"),
        }
    });
}

/// The message decoders on well-formed and mutated frames: no panic, typed errors, and
/// whatever decodes re-encodes (renamed) into a frame that decodes to the same fields.
#[test]
fn fuzz_message_decoders() {
    run("fuzz_message_decoders", |rng| {
        let mut f = sample_frame(rng);
        if rng.gen_bool(0.7) {
            mutate(rng, &mut f, FRAME_DICT);
        }
        // Decoders get whole frames from the splitter; sometimes feed them raw bytes too.
        let f = match frame_len(&f, MAX_MESSAGE_LEN) {
            Ok(Some(n)) if rng.gen_bool(0.8) => f[..n].to_vec(),
            _ => f,
        };
        let name: &[u8] = word(rng).split(|&b| b == 0).next().unwrap_or_default();
        let well_formed = |out: &BytesMut| {
            assert_eq!(
                frame_len(out, MAX_MESSAGE_LEN),
                Ok(Some(out.len())),
                "{f:?}"
            );
        };
        match Parse::decode(&f) {
            Ok(p) => {
                assert!(!p.name.contains(&0) && !p.sql.contains(&0));
                let n = i16::from_be_bytes([p.param_types[0], p.param_types[1]]);
                assert_eq!(p.param_types.len(), 2 + 4 * n as usize);
                let mut out = BytesMut::new();
                p.write_renamed(&mut out, name);
                well_formed(&out);
                let again = Parse::decode(&out).expect("renamed Parse decodes");
                assert_eq!((again.name, again.sql), (name, p.sql));
                assert_eq!(again.param_types, p.param_types);
            }
            Err(e) => assert_eq!(e, FrameError::Malformed("Parse")),
        }
        match Bind::decode(&f) {
            Ok(b) => {
                let mut out = BytesMut::new();
                b.write_renamed(&mut out, name);
                well_formed(&out);
                let again = Bind::decode(&out).expect("renamed Bind decodes");
                assert_eq!((again.portal, again.statement), (b.portal, name));
                assert_eq!(again.rest, b.rest);
            }
            Err(e) => assert_eq!(e, FrameError::Malformed("Bind")),
        }
        match Target::decode(&f) {
            Ok(t) => {
                assert!(t.kind == b'S' || t.kind == b'P');
                let mut out = BytesMut::new();
                t.write_renamed(&mut out, b'D', name);
                well_formed(&out);
                let again = Target::decode(&out).expect("renamed Describe decodes");
                assert_eq!((again.kind, again.name), (t.kind, name));
            }
            Err(e) => assert_eq!(e, FrameError::Malformed("Describe/Close")),
        }
        match messages::query_text(&f) {
            Ok(sql) => assert_eq!([sql, &[0]].concat(), messages::body(&f)),
            Err(e) => assert_eq!(e, FrameError::Malformed("Query")),
        }
        let fields = messages::error_fields(&f);
        let severity = messages::error_severity(&f);
        let mut out = BytesMut::new();
        messages::rewrite_error(&f, &mut out, str::to_owned);
        well_formed(&out);
        assert_eq!(messages::error_fields(&out), fields, "{f:?}");
        assert_eq!(messages::error_severity(&out), severity, "{f:?}");
        let mut upper = BytesMut::new();
        messages::rewrite_error(&out, &mut upper, str::to_uppercase);
        well_formed(&upper);
    });
}

/// [`crate::net::FramedStream`] reading a stream delivered in random pieces: the same
/// frames and the same end as [`reference_split`] over the whole stream, and its buffer
/// never grows with what a length field announces, only with what arrived.
#[test]
fn fuzz_framed_stream() {
    use tokio::io::AsyncWriteExt;

    use crate::net::{FramedStream, NetError};

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    run("fuzz_framed_stream", |rng| {
        let mut stream = sample_stream(rng);
        if rng.gen_bool(0.1) {
            // A header announcing a huge body that never comes.
            let len = *[MAX_MESSAGE_LEN as i32, MAX_MESSAGE_LEN as i32 + 1, 1 << 29]
                .choose(rng)
                .unwrap_or(&0);
            stream.push(b'Q');
            stream.extend_from_slice(&len.to_be_bytes());
            stream.extend_from_slice(b"select");
        }
        let limit = if rng.gen_bool(0.2) {
            rng.gen_range(0..64)
        } else {
            MAX_MESSAGE_LEN
        };
        let (frames, end) = reference_split(&stream, limit);
        let pipe = rng.gen_range(1..=256);
        let chunks: Vec<usize> = (0..stream.len()).map(|_| rng.gen_range(1..=64)).collect();
        let bound = 4 * stream.len() + (64 << 10);
        runtime.block_on(async {
            let (mut near, far) = tokio::io::duplex(pipe);
            let data = stream.clone();
            let writer = tokio::spawn(async move {
                let mut rest = &data[..];
                for n in chunks {
                    if rest.is_empty() {
                        break;
                    }
                    let n = n.min(rest.len());
                    if near.write_all(&rest[..n]).await.is_err() {
                        return;
                    }
                    rest = &rest[n..];
                    tokio::task::yield_now().await;
                }
            });
            let mut io = FramedStream::new(Box::new(far));
            let read = async {
                let mut got = Vec::new();
                loop {
                    let next = io.read_frame(limit).await;
                    assert!(
                        io.rbuf.capacity() <= bound,
                        "read buffer of {} bytes for a stream of {}: {stream:?}",
                        io.rbuf.capacity(),
                        stream.len()
                    );
                    match next {
                        Ok(frame) => got.push(frame),
                        Err(e) => return (got, e),
                    }
                }
            };
            let (got, error) = crate::timer::timeout(Duration::from_secs(10), read)
                .await
                .expect("FramedStream hangs on a stream that ended");
            assert_eq!(got, frames, "{stream:?}");
            match (end, error) {
                (Err(want), NetError::Frame(e)) => assert_eq!(want, e, "{stream:?}"),
                (Ok(0), NetError::Closed) | (Ok(1..), NetError::Truncated) => {}
                (want, e) => panic!("ended with {e:?}, expected {want:?}: {stream:?}"),
            }
            writer.abort();
        });
    });
}

/// A header announcing a 1 GiB body takes no 1 GiB buffer: memory follows the bytes that
/// arrive, not the length field (found by `fuzz_framed_stream`).
#[tokio::test]
async fn a_huge_announced_length_allocates_only_what_arrives() {
    use tokio::io::AsyncWriteExt;

    use crate::net::{FramedStream, NetError};

    let (mut near, far) = tokio::io::duplex(1024);
    let mut io = FramedStream::new(Box::new(far));
    let mut header = vec![b'Q'];
    header.extend_from_slice(&(MAX_MESSAGE_LEN as i32).to_be_bytes());
    header.extend_from_slice(b"select 1");
    near.write_all(&header).await.expect("write");
    drop(near);
    let err = io.read_frame(MAX_MESSAGE_LEN).await.expect_err("truncated");
    assert!(matches!(err, NetError::Truncated), "{err:?}");
    assert!(io.rbuf.capacity() < 1 << 20, "{}", io.rbuf.capacity());
}
