//! Splitting a byte stream into protocol frames.
//!
//! A regular message is `tag: u8, len: i32 (includes itself), body`. The startup
//! packet has no tag. Lengths are checked before anything is allocated.

use bytes::{Buf, BytesMut};

/// Largest startup packet accepted (PostgreSQL's own limit is 10,000 bytes).
pub const MAX_STARTUP_LEN: usize = 10_000;
/// Largest regular message accepted from a client (1 GiB, PostgreSQL's `MaxAllocSize`).
pub const MAX_MESSAGE_LEN: usize = 1 << 30;

/// A frame that cannot be valid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The length field is below the minimum for its kind of frame.
    #[error("invalid message length {0}")]
    TooShort(i64),
    /// The length field is above the limit.
    #[error("message length {len} exceeds the limit of {limit} bytes")]
    TooLong {
        /// The announced length.
        len: i64,
        /// The limit it broke.
        limit: usize,
    },
    /// The body does not hold the fields its type requires.
    #[error("malformed {0} message")]
    Malformed(&'static str),
}

/// Length of the complete regular frame at the start of `buf` (tag included), or `None` if
/// more bytes are needed. Checks the length before the body has arrived.
pub fn frame_len(buf: &[u8], limit: usize) -> Result<Option<usize>, FrameError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as i64;
    if len < 4 {
        return Err(FrameError::TooShort(len));
    }
    if len as u64 > limit as u64 {
        return Err(FrameError::TooLong { len, limit });
    }
    let total = len as usize + 1;
    Ok((buf.len() >= total).then_some(total))
}

/// Length of the complete startup-style packet (no tag) at the start of `buf`.
pub fn startup_len(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as i64;
    if len < 8 {
        return Err(FrameError::TooShort(len));
    }
    if len as u64 > MAX_STARTUP_LEN as u64 {
        return Err(FrameError::TooLong {
            len,
            limit: MAX_STARTUP_LEN,
        });
    }
    let len = len as usize;
    Ok((buf.len() >= len).then_some(len))
}

/// A cursor over a message body that never panics on short input.
pub struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// Reads fields out of `buf`, naming `what` in errors.
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, what }
    }

    fn err(&self) -> FrameError {
        FrameError::Malformed(self.what)
    }

    /// A NUL-terminated string (bytes, without the NUL).
    pub fn cstr(&mut self) -> Result<&'a [u8], FrameError> {
        let end = memchr::memchr(0, self.buf).ok_or(FrameError::Malformed(self.what))?;
        let s = &self.buf[..end];
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }

    /// A big-endian i32.
    pub fn i32(&mut self) -> Result<i32, FrameError> {
        if self.buf.len() < 4 {
            return Err(self.err());
        }
        let v = (&self.buf[..4]).get_i32();
        self.buf = &self.buf[4..];
        Ok(v)
    }

    /// A big-endian i16.
    pub fn i16(&mut self) -> Result<i16, FrameError> {
        if self.buf.len() < 2 {
            return Err(self.err());
        }
        let v = (&self.buf[..2]).get_i16();
        self.buf = &self.buf[2..];
        Ok(v)
    }

    /// One byte.
    pub fn u8(&mut self) -> Result<u8, FrameError> {
        let (&b, rest) = self
            .buf
            .split_first()
            .ok_or(FrameError::Malformed(self.what))?;
        self.buf = rest;
        Ok(b)
    }

    /// `n` raw bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.buf.len() < n {
            return Err(self.err());
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// Whatever is left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
}

/// Appends a regular frame `tag, len, body` to `out`.
pub fn put_frame(out: &mut BytesMut, tag: u8, body: &[u8]) {
    out.reserve(body.len() + 5);
    out.extend_from_slice(&[tag]);
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(body);
}

/// Starts a frame whose length is patched by [`end_frame`]; returns its start offset.
pub fn begin_frame(out: &mut BytesMut, tag: u8) -> usize {
    let start = out.len();
    out.extend_from_slice(&[tag, 0, 0, 0, 0]);
    start
}

/// Writes the length of the frame begun at `start`.
pub fn end_frame(out: &mut BytesMut, start: usize) {
    let len = (out.len() - start - 1) as i32;
    out[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_len_waits_checks_and_splits() {
        assert_eq!(frame_len(b"Q\0\0", MAX_MESSAGE_LEN), Ok(None));
        assert_eq!(frame_len(b"Q\0\0\0\x05", MAX_MESSAGE_LEN), Ok(None));
        assert_eq!(frame_len(b"Q\0\0\0\x05x", MAX_MESSAGE_LEN), Ok(Some(6)));
        assert_eq!(
            frame_len(b"Q\0\0\0\x03", MAX_MESSAGE_LEN),
            Err(FrameError::TooShort(3))
        );
        assert!(matches!(
            frame_len(b"p\x7f\xff\xff\xff", MAX_MESSAGE_LEN),
            Err(FrameError::TooLong { .. })
        ));
        assert!(matches!(
            frame_len(b"p\xff\xff\xff\xff", MAX_MESSAGE_LEN),
            Err(FrameError::TooShort(-1))
        ));
    }

    #[test]
    fn startup_len_limits() {
        assert_eq!(startup_len(&[0, 0, 0, 8, 1, 2, 3, 4]), Ok(Some(8)));
        assert_eq!(startup_len(&[0, 0, 0, 8, 1]), Ok(None));
        assert!(matches!(
            startup_len(&20_000i32.to_be_bytes()),
            Err(FrameError::TooLong { .. })
        ));
        assert_eq!(startup_len(&[0, 0, 0, 2]), Err(FrameError::TooShort(2)));
    }

    #[test]
    fn reader_never_panics_on_short_input() {
        let mut r = Reader::new(b"abc", "test");
        assert!(r.cstr().is_err());
        let mut r = Reader::new(b"ab\0\0\x01", "test");
        assert_eq!(r.cstr().ok(), Some(&b"ab"[..]));
        assert!(r.i32().is_err());
        assert_eq!(r.i16().ok(), Some(1));
        assert!(r.u8().is_err());
        assert!(r.bytes(1).is_err());
    }

    #[test]
    fn put_and_patch_frames_roundtrip() {
        let mut out = BytesMut::new();
        put_frame(&mut out, b'Q', b"select 1\0");
        let start = begin_frame(&mut out, b'Z');
        out.extend_from_slice(b"I");
        end_frame(&mut out, start);
        let first = frame_len(&out, MAX_MESSAGE_LEN).unwrap().unwrap();
        assert_eq!(&out[5..first], b"select 1\0");
        assert_eq!(&out[first..], b"Z\0\0\0\x05I");
    }
}
