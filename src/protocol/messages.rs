//! The messages pgway reads or writes itself. Everything else is relayed as raw bytes.

use bytes::BytesMut;

use super::frame::{begin_frame, end_frame, put_frame, FrameError, Reader};

/// Protocol version 3.0 in a StartupMessage.
pub const PROTOCOL_V3: i32 = 196_608;
/// The request code of a CancelRequest.
pub const CANCEL_REQUEST_CODE: i32 = 80_877_102;
/// The request code of an SSLRequest.
pub const SSL_REQUEST_CODE: i32 = 80_877_103;
/// The request code of a GSSENCRequest.
pub const GSSENC_REQUEST_CODE: i32 = 80_877_104;

/// What the first packet on a client connection asked for.
#[derive(Debug, PartialEq, Eq)]
pub enum StartupPacket {
    /// A StartupMessage with its parameters (`user`, `database`, `options`, ...).
    Startup(Vec<(String, String)>),
    /// SSLRequest.
    Ssl,
    /// GSSENCRequest.
    GssEnc,
    /// CancelRequest with the key pgway handed out.
    Cancel {
        /// Process id from BackendKeyData.
        pid: i32,
        /// Secret key from BackendKeyData.
        secret: i32,
    },
}

impl StartupPacket {
    /// Decodes a whole startup packet (length prefix included).
    pub fn decode(packet: &[u8]) -> Result<Self, FrameError> {
        let mut r = Reader::new(packet, "startup");
        let _len = r.i32()?;
        let code = r.i32()?;
        match code {
            CANCEL_REQUEST_CODE => Ok(Self::Cancel {
                pid: r.i32()?,
                secret: r.i32()?,
            }),
            SSL_REQUEST_CODE => Ok(Self::Ssl),
            GSSENC_REQUEST_CODE => Ok(Self::GssEnc),
            PROTOCOL_V3 => {
                let mut params = Vec::new();
                loop {
                    let key = r.cstr()?;
                    if key.is_empty() {
                        break;
                    }
                    let value = r.cstr()?;
                    let key = String::from_utf8(key.to_vec())
                        .map_err(|_| FrameError::Malformed("startup"))?;
                    let value = String::from_utf8(value.to_vec())
                        .map_err(|_| FrameError::Malformed("startup"))?;
                    params.push((key, value));
                }
                Ok(Self::Startup(params))
            }
            _ => Err(FrameError::Malformed("startup")),
        }
    }
}

/// Severity of an ErrorResponse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The statement failed; the session goes on.
    Error,
    /// The session ends.
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// Appends an ErrorResponse.
pub fn error_response(out: &mut BytesMut, severity: Severity, code: &str, message: &str) {
    let start = begin_frame(out, b'E');
    for (field, value) in [
        (b'S', severity.as_str()),
        (b'V', severity.as_str()),
        (b'C', code),
        (b'M', message),
    ] {
        out.extend_from_slice(&[field]);
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(&[0]);
    }
    out.extend_from_slice(&[0]);
    end_frame(out, start);
}

/// Appends an Authentication* message: `code` then `data`.
pub fn authentication(out: &mut BytesMut, code: i32, data: &[u8]) {
    let start = begin_frame(out, b'R');
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(data);
    end_frame(out, start);
}

/// Appends a ParameterStatus.
pub fn parameter_status(out: &mut BytesMut, name: &str, value: &str) {
    let start = begin_frame(out, b'S');
    for s in [name, value] {
        out.extend_from_slice(s.as_bytes());
        out.extend_from_slice(&[0]);
    }
    end_frame(out, start);
}

/// Appends a BackendKeyData.
pub fn backend_key_data(out: &mut BytesMut, pid: i32, secret: i32) {
    let start = begin_frame(out, b'K');
    out.extend_from_slice(&pid.to_be_bytes());
    out.extend_from_slice(&secret.to_be_bytes());
    end_frame(out, start);
}

/// Appends a ReadyForQuery with the given transaction status (`I`, `T`, `E`).
pub fn ready_for_query(out: &mut BytesMut, status: u8) {
    put_frame(out, b'Z', &[status]);
}

/// Appends a Query message.
pub fn query(out: &mut BytesMut, sql: &str) {
    let start = begin_frame(out, b'Q');
    out.extend_from_slice(sql.as_bytes());
    out.extend_from_slice(&[0]);
    end_frame(out, start);
}

/// The body of a frame (after tag and length).
pub fn body(frame: &[u8]) -> &[u8] {
    frame.get(5..).unwrap_or_default()
}

/// A Parse message, borrowed from its frame.
#[derive(Debug)]
pub struct Parse<'a> {
    /// Statement name (empty: the unnamed statement).
    pub name: &'a [u8],
    /// The SQL text, undecoded.
    pub sql: &'a [u8],
    /// Everything after the SQL: parameter type count and OIDs.
    pub param_types: &'a [u8],
}

impl<'a> Parse<'a> {
    /// Reads a Parse frame.
    pub fn decode(frame: &'a [u8]) -> Result<Self, FrameError> {
        let mut r = Reader::new(body(frame), "Parse");
        let name = r.name()?;
        let sql = r.cstr()?;
        let param_types = r.rest();
        let mut check = Reader::new(param_types, "Parse");
        let n = usize::try_from(check.i16()?).map_err(|_| FrameError::Malformed("Parse"))?;
        check.bytes(n * 4)?;
        check.end()?;
        Ok(Self {
            name,
            sql,
            param_types,
        })
    }

    /// Appends this Parse under another statement name.
    pub fn write_renamed(&self, out: &mut BytesMut, name: &[u8]) {
        write_parse(out, name, self.sql, self.param_types);
    }

    /// Where its name and SQL text end, for reading its frame again without a scan.
    pub fn layout(&self) -> ParseLayout {
        ParseLayout(TwoStrings::of(self.name, self.sql))
    }

    /// The Parse in `frame`, read at `layout` (what [`Self::layout`] gave for the same
    /// frame): slices only, no scan for the strings' ends. A layout that does not fit
    /// the frame reads it from the start.
    pub fn at(frame: &'a [u8], layout: ParseLayout) -> Result<Self, FrameError> {
        match layout.0.read(frame) {
            Some((name, sql, param_types)) => Ok(Self {
                name,
                sql,
                param_types,
            }),
            None => Self::decode(frame),
        }
    }
}

/// Where a Parse message's name and SQL text end (see [`Parse::at`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseLayout(TwoStrings);

/// The lengths of the two strings a Parse or a Bind starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TwoStrings(usize, usize);

impl TwoStrings {
    fn of(first: &[u8], second: &[u8]) -> Self {
        Self(first.len(), second.len())
    }

    /// The two strings at the start of `frame`'s body and the rest after them, if each
    /// ends where this says.
    fn read(self, frame: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
        let body = body(frame);
        let second = self.0 + 1..self.0 + 1 + self.1;
        let ends = (body.get(self.0), body.get(second.end));
        match (body.get(second.end + 1..), ends) {
            (Some(rest), (Some(0), Some(0))) => Some((&body[..self.0], &body[second], rest)),
            _ => None,
        }
    }
}

/// Appends a Parse message.
pub fn write_parse(out: &mut BytesMut, name: &[u8], sql: &[u8], param_types: &[u8]) {
    let start = begin_frame(out, b'P');
    out.extend_from_slice(name);
    out.extend_from_slice(&[0]);
    out.extend_from_slice(sql);
    out.extend_from_slice(&[0]);
    out.extend_from_slice(param_types);
    end_frame(out, start);
}

/// A Bind message, borrowed from its frame.
#[derive(Debug)]
pub struct Bind<'a> {
    /// Destination portal.
    pub portal: &'a [u8],
    /// Source statement.
    pub statement: &'a [u8],
    /// Formats, parameters and result formats, untouched.
    pub rest: &'a [u8],
}

impl<'a> Bind<'a> {
    /// Reads a Bind frame.
    pub fn decode(frame: &'a [u8]) -> Result<Self, FrameError> {
        let mut r = Reader::new(body(frame), "Bind");
        Ok(Self {
            portal: r.name()?,
            statement: r.name()?,
            rest: r.rest(),
        })
    }

    /// Whether its formats, values and result formats fill the message exactly, as
    /// PostgreSQL reads them (a value length below -1, a count past the end, or bytes
    /// after the last field are refused with ERROR 08P01). PostgreSQL sends that error as
    /// soon as it has read the Bind, so a Bind whose length swallowed the Sync after it
    /// is answered without one.
    pub fn is_well_formed(&self) -> bool {
        bind_values(self.rest).is_some()
    }

    /// Where its portal and statement names end, for reading its frame again without a
    /// scan.
    pub fn layout(&self) -> BindLayout {
        BindLayout(TwoStrings::of(self.portal, self.statement))
    }

    /// The Bind in `frame`, read at `layout` (what [`Self::layout`] gave for the same
    /// frame): slices only. A layout that does not fit the frame reads it from the start.
    pub fn at(frame: &'a [u8], layout: BindLayout) -> Result<Self, FrameError> {
        match layout.0.read(frame) {
            Some((portal, statement, rest)) => Ok(Self {
                portal,
                statement,
                rest,
            }),
            None => Self::decode(frame),
        }
    }

    /// Appends this Bind with another statement name.
    pub fn write_renamed(&self, out: &mut BytesMut, statement: &[u8]) {
        let start = begin_frame(out, b'B');
        out.extend_from_slice(self.portal);
        out.extend_from_slice(&[0]);
        out.extend_from_slice(statement);
        out.extend_from_slice(&[0]);
        out.extend_from_slice(self.rest);
        end_frame(out, start);
    }
}

/// Where a Bind message's portal and statement names end (see [`Bind::at`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindLayout(TwoStrings);

/// Reads a Bind's formats, values and result formats to the end; `None` if PostgreSQL
/// would refuse them (a negative parameter count never matches a statement; negative
/// format counts read no formats).
fn bind_values(rest: &[u8]) -> Option<()> {
    fn formats(r: &mut Reader<'_>) -> Option<()> {
        let n = usize::try_from(r.i16().ok()?).unwrap_or(0);
        r.bytes(2 * n).ok().map(drop)
    }
    let mut r = Reader::new(rest, "Bind");
    formats(&mut r)?;
    for _ in 0..u16::try_from(r.i16().ok()?).ok()? {
        let len = r.i32().ok()?;
        if len != -1 {
            r.bytes(usize::try_from(len).ok()?).ok()?;
        }
    }
    formats(&mut r)?;
    r.end().ok()
}

/// Checks an Execute frame: a portal name and a row limit, nothing else.
pub fn check_execute(frame: &[u8]) -> Result<(), FrameError> {
    let mut r = Reader::new(body(frame), "Execute");
    r.name()?;
    r.i32()?;
    r.end()
}

/// A Describe or Close message: which kind of object (`S` or `P`) and its name.
#[derive(Debug)]
pub struct Target<'a> {
    /// `S` for a statement, `P` for a portal.
    pub kind: u8,
    /// The object's name.
    pub name: &'a [u8],
}

impl<'a> Target<'a> {
    /// Reads a Describe or Close frame.
    pub fn decode(frame: &'a [u8]) -> Result<Self, FrameError> {
        let mut r = Reader::new(body(frame), "Describe/Close");
        let kind = r.u8()?;
        if kind != b'S' && kind != b'P' {
            return Err(FrameError::Malformed("Describe/Close"));
        }
        Ok(Self {
            kind,
            name: r.name()?,
        })
    }

    /// Appends a message of type `tag` for the same kind under another name.
    pub fn write_renamed(&self, out: &mut BytesMut, tag: u8, name: &[u8]) {
        write_target(out, tag, self.kind, name);
    }
}

/// Appends a Describe (`D`) or Close (`C`) message.
pub fn write_target(out: &mut BytesMut, tag: u8, kind: u8, name: &[u8]) {
    let start = begin_frame(out, tag);
    out.extend_from_slice(&[kind]);
    out.extend_from_slice(name);
    out.extend_from_slice(&[0]);
    end_frame(out, start);
}

/// The SQL text of a Query frame: one string that ends the frame (PostgreSQL refuses
/// bytes after it).
pub fn query_text(frame: &[u8]) -> Result<&[u8], FrameError> {
    let mut r = Reader::new(body(frame), "Query");
    let sql = r.cstr()?;
    r.end()?;
    Ok(sql)
}

/// The SQLSTATE and message of an ErrorResponse or NoticeResponse frame.
pub fn error_fields(frame: &[u8]) -> (String, String) {
    let mut r = Reader::new(body(frame), "ErrorResponse");
    let (mut code, mut message) = (String::new(), String::new());
    while let Ok(field) = r.u8() {
        if field == 0 {
            break;
        }
        let Ok(value) = r.cstr() else { break };
        match field {
            b'C' => code = String::from_utf8_lossy(value).into_owned(),
            b'M' => message = String::from_utf8_lossy(value).into_owned(),
            _ => {}
        }
    }
    (code, message)
}

/// Appends a copy of an ErrorResponse/NoticeResponse `frame` with every field value passed
/// through `rewrite`.
pub fn rewrite_error(frame: &[u8], out: &mut BytesMut, rewrite: impl Fn(&str) -> String) {
    let start = begin_frame(out, frame.first().copied().unwrap_or(b'E'));
    let mut r = Reader::new(body(frame), "ErrorResponse");
    while let Ok(field) = r.u8() {
        if field == 0 {
            break;
        }
        let Ok(value) = r.cstr() else { break };
        out.extend_from_slice(&[field]);
        out.extend_from_slice(rewrite(&String::from_utf8_lossy(value)).as_bytes());
        out.extend_from_slice(&[0]);
    }
    out.extend_from_slice(&[0]);
    end_frame(out, start);
}

/// The non-localised severity (`V`, else `S`) of an ErrorResponse or NoticeResponse frame.
pub fn error_severity(frame: &[u8]) -> Option<String> {
    let mut r = Reader::new(body(frame), "ErrorResponse");
    let mut localized = None;
    while let Ok(field) = r.u8() {
        if field == 0 {
            break;
        }
        let Ok(value) = r.cstr() else { break };
        match field {
            b'V' => return Some(String::from_utf8_lossy(value).into_owned()),
            b'S' => localized = Some(String::from_utf8_lossy(value).into_owned()),
            _ => {}
        }
    }
    localized
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame::{frame_len, MAX_MESSAGE_LEN};

    #[test]
    fn a_parse_read_at_its_layout_is_the_parse_decoded() {
        let fields = |p: &Parse<'_>| (p.name.to_vec(), p.sql.to_vec(), p.param_types.to_vec());
        let frames: Vec<BytesMut> = [
            (&b""[..], &b"select 1"[..], &[0, 0][..]),
            (b"s1", b"select $1", &[0, 1, 0, 0, 0, 23]),
            (b"", b"", &[0, 0]),
        ]
        .iter()
        .map(|(name, sql, types)| {
            let mut out = BytesMut::new();
            write_parse(&mut out, name, sql, types);
            out
        })
        .collect();
        for frame in &frames {
            let decoded = Parse::decode(frame).unwrap();
            let again = Parse::at(frame, decoded.layout()).unwrap();
            assert_eq!(fields(&again), fields(&decoded));
        }
        // Another frame's layout does not fit: the frame is read from the start.
        let other = Parse::decode(&frames[1]).unwrap().layout();
        let read = Parse::at(&frames[0], other).unwrap();
        assert_eq!(fields(&read), fields(&Parse::decode(&frames[0]).unwrap()));
        // A malformed frame is refused either way.
        assert!(Parse::at(&frames[0][..frames[0].len() - 1], other).is_err());
    }

    #[test]
    fn a_bind_read_at_its_layout_is_the_bind_decoded() {
        let fields = |b: &Bind<'_>| (b.portal.to_vec(), b.statement.to_vec(), b.rest.to_vec());
        // Portal, statement, then no formats, one value "7" and no result formats.
        let bind = |portal: &[u8], statement: &[u8]| {
            let mut out = BytesMut::new();
            let start = begin_frame(&mut out, b'B');
            for name in [portal, statement] {
                out.extend_from_slice(name);
                out.extend_from_slice(&[0]);
            }
            out.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1, b'7', 0, 0]);
            end_frame(&mut out, start);
            out
        };
        let frames = [bind(b"", b""), bind(b"", b"P_1"), bind(b"c1", b"s")];
        for frame in &frames {
            let decoded = Bind::decode(frame).unwrap();
            let again = Bind::at(frame, decoded.layout()).unwrap();
            assert_eq!(fields(&again), fields(&decoded));
        }
        // Another frame's layout does not fit: the frame is read from the start.
        let other = Bind::decode(&frames[2]).unwrap().layout();
        let read = Bind::at(&frames[1], other).unwrap();
        assert_eq!(read.statement, b"P_1");
        assert_eq!(fields(&read), fields(&Bind::decode(&frames[1]).unwrap()));
        // A frame cut inside its names is refused either way.
        assert!(Bind::at(&frames[1][..7], other).is_err());
    }

    #[test]
    fn startup_roundtrip() {
        let mut packet = Vec::new();
        packet.extend_from_slice(&0i32.to_be_bytes());
        packet.extend_from_slice(&PROTOCOL_V3.to_be_bytes());
        packet.extend_from_slice(b"user\0app\0database\0db\0\0");
        let len = packet.len() as i32;
        packet[..4].copy_from_slice(&len.to_be_bytes());
        assert_eq!(
            StartupPacket::decode(&packet),
            Ok(StartupPacket::Startup(vec![
                ("user".into(), "app".into()),
                ("database".into(), "db".into())
            ]))
        );
        assert!(StartupPacket::decode(&packet[..packet.len() - 3]).is_err());
        let mut cancel = Vec::new();
        for v in [16, CANCEL_REQUEST_CODE, 7, 9] {
            cancel.extend_from_slice(&v.to_be_bytes());
        }
        assert_eq!(
            StartupPacket::decode(&cancel),
            Ok(StartupPacket::Cancel { pid: 7, secret: 9 })
        );
    }

    #[test]
    fn parse_bind_describe_rename_roundtrip() {
        let mut out = BytesMut::new();
        write_parse(&mut out, b"s1", b"select $1", &[0, 1, 0, 0, 0, 23]);
        let p = Parse::decode(&out).expect("parse");
        assert_eq!((p.name, p.sql), (&b"s1"[..], &b"select $1"[..]));
        let mut renamed = BytesMut::new();
        p.write_renamed(&mut renamed, b"pgway_1");
        let r = Parse::decode(&renamed).expect("renamed");
        assert_eq!(
            (r.name, r.param_types),
            (&b"pgway_1"[..], &[0, 1, 0, 0, 0, 23][..])
        );
        assert_eq!(
            frame_len(&renamed, MAX_MESSAGE_LEN),
            Ok(Some(renamed.len()))
        );

        let mut bind = BytesMut::new();
        put_frame(&mut bind, b'B', b"portal\0s1\0\0\0\0\0\0\0");
        let b = Bind::decode(&bind).expect("bind");
        let mut out = BytesMut::new();
        b.write_renamed(&mut out, b"pgway_1");
        let b2 = Bind::decode(&out).expect("bind renamed");
        assert_eq!(
            (b2.portal, b2.statement, b2.rest),
            (b.portal, &b"pgway_1"[..], b.rest)
        );

        let mut d = BytesMut::new();
        write_target(&mut d, b'D', b'S', b"s1");
        let t = Target::decode(&d).expect("describe");
        assert_eq!((t.kind, t.name), (b'S', &b"s1"[..]));
    }

    #[test]
    fn a_bind_is_well_formed_only_if_its_values_fill_it_exactly() {
        let well_formed = |rest: &[u8]| {
            let mut frame = BytesMut::new();
            put_frame(&mut frame, b'B', &[b"\0s1\0", rest].concat());
            Bind::decode(&frame).expect("names").is_well_formed()
        };
        // One text format, two values (one NULL), one result format.
        let good = b"\0\x01\0\0\0\x02\0\0\0\x0242\xff\xff\xff\xff\0\x01\0\x01";
        assert!(well_formed(good));
        assert!(
            well_formed(b"\0\0\0\0\0\0"),
            "no formats, values or results"
        );
        assert!(
            well_formed(b"\xff\xff\0\0\xff\xff"),
            "negative format counts"
        );
        let mut swallowed_sync = good.to_vec();
        swallowed_sync.extend_from_slice(b"S\0\0\0\x04");
        assert!(!well_formed(&swallowed_sync), "bytes after the last field");
        assert!(
            !well_formed(&good[..good.len() - 1]),
            "a result format cut short"
        );
        assert!(
            !well_formed(b"\0\0\0\x01\0\0\0\x09ab\0\0"),
            "a value past the end"
        );
        assert!(!well_formed(b"\0\0\0\x01\xff\xff\xff\xfe\0\0"), "length -2");
        assert!(!well_formed(b"\0\0\xff\xff\0\0"), "a negative value count");
        assert!(!well_formed(b""), "no counts at all");
    }

    #[test]
    fn execute_must_fill_its_frame_exactly() {
        let frame = |body: &[u8]| {
            let mut out = BytesMut::new();
            put_frame(&mut out, b'E', body);
            out
        };
        assert_eq!(check_execute(&frame(b"\0\0\0\0\0")), Ok(()));
        assert_eq!(check_execute(&frame(b"portal\0\0\0\0\x0a")), Ok(()));
        for bad in [&b"\0\0\0\0"[..], b"\0\0\0\0\0S", b"portal"] {
            assert!(check_execute(&frame(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn malformed_bodies_are_errors() {
        let mut out = BytesMut::new();
        put_frame(&mut out, b'P', b"s1\0select 1");
        assert!(Parse::decode(&out).is_err());
        out.clear();
        put_frame(&mut out, b'P', b"s1\0select 1\0\0\x02\0\0\0\x17");
        assert!(Parse::decode(&out).is_err());
        out.clear();
        put_frame(&mut out, b'D', b"Xname\0");
        assert!(Target::decode(&out).is_err());
        assert!(query_text(b"Q\0\0\0\x05x").is_err());
        assert!(query_text(b"Q\0\0\0\x07x\0y").is_err());
        assert_eq!(query_text(b"Q\0\0\0\x06x\0"), Ok(&b"x"[..]));
    }

    #[test]
    fn error_response_fields_roundtrip() {
        let mut out = BytesMut::new();
        error_response(&mut out, Severity::Error, "53300", "too many");
        assert_eq!(frame_len(&out, MAX_MESSAGE_LEN), Ok(Some(out.len())));
        assert_eq!(error_fields(&out), ("53300".into(), "too many".into()));
        assert_eq!(error_severity(&out).as_deref(), Some("ERROR"));
        let mut renamed = BytesMut::new();
        rewrite_error(&out, &mut renamed, |v| v.replace("many", "few"));
        assert_eq!(error_fields(&renamed), ("53300".into(), "too few".into()));
        assert_eq!(
            frame_len(&renamed, MAX_MESSAGE_LEN),
            Ok(Some(renamed.len()))
        );
    }
}
