//! An extended-protocol batch being collected: its messages back to back in one buffer,
//! copied out of the client's read buffer as they arrive, not split off it one by one.
//! A split shares the read buffer's memory with the message (a reference count taken
//! and given back per message, and the buffer's first split allocates the count); a copy
//! of a message of a few dozen bytes costs less, and the read buffer stays a plain one.

/// The most messages of a batch whose room a client keeps for its next one.
pub(super) const KEPT_BATCH_FRAMES: usize = 16;

/// The most bytes of a batch whose room a client keeps for its next one.
const KEPT_BATCH_BYTES: usize = 1024;

/// The messages of an extended-protocol batch, each whole (tag, length, body), in the
/// order the client sent them.
#[derive(Debug, Default)]
pub(super) struct Batch {
    bytes: Vec<u8>,
    /// Where each message ends in `bytes`.
    ends: Vec<usize>,
}

impl Batch {
    /// Appends a message.
    #[inline]
    pub(super) fn push(&mut self, frame: &[u8]) {
        self.bytes.extend_from_slice(frame);
        self.ends.push(self.bytes.len());
    }

    /// How many messages it holds.
    pub(super) fn len(&self) -> usize {
        self.ends.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The bytes of its messages, together.
    pub(super) fn size(&self) -> usize {
        self.bytes.len()
    }

    /// Its messages in order.
    pub(super) fn iter(&self) -> Frames<'_> {
        Frames {
            bytes: &self.bytes,
            ends: self.ends.iter(),
            start: 0,
        }
    }

    /// Its messages from the `from`th on.
    pub(super) fn iter_from(&self, from: usize) -> Frames<'_> {
        let start = from
            .checked_sub(1)
            .and_then(|last| self.ends.get(last))
            .copied()
            .unwrap_or(0);
        Frames {
            bytes: &self.bytes,
            ends: self.ends.get(from..).unwrap_or_default().iter(),
            start,
        }
    }

    /// Its last message.
    pub(super) fn last(&self) -> Option<&[u8]> {
        let end = *self.ends.last()?;
        let start = self.ends.len().checked_sub(2).map_or(0, |i| self.ends[i]);
        Some(&self.bytes[start..end])
    }

    /// Empties it for the next batch, giving back the room of a large one.
    pub(super) fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
        if self.bytes.capacity() > KEPT_BATCH_BYTES {
            self.bytes = Vec::new();
        }
        if self.ends.capacity() > KEPT_BATCH_FRAMES {
            self.ends = Vec::new();
        }
    }
}

/// The messages of a [`Batch`], in order.
#[derive(Debug, Clone)]
pub(super) struct Frames<'a> {
    bytes: &'a [u8],
    ends: std::slice::Iter<'a, usize>,
    start: usize,
}

impl<'a> Iterator for Frames<'a> {
    type Item = &'a [u8];

    #[inline]
    fn next(&mut self) -> Option<&'a [u8]> {
        let end = *self.ends.next()?;
        let frame = &self.bytes[self.start..end];
        self.start = end;
        Some(frame)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.ends.size_hint()
    }
}

impl ExactSizeIterator for Frames<'_> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_gives_back_its_messages_whole_and_in_order() {
        let frames: [&[u8]; 3] = [
            b"B\0\0\0\x0cabcdefgh",
            b"E\0\0\0\x09\0\0\0\0",
            b"S\0\0\0\x04",
        ];
        let mut batch = Batch::default();
        assert!(batch.is_empty() && batch.last().is_none() && batch.iter().next().is_none());
        for frame in frames {
            batch.push(frame);
        }
        assert_eq!(batch.len(), 3);
        assert_eq!(batch.size(), frames.iter().map(|f| f.len()).sum::<usize>());
        assert_eq!(batch.iter().collect::<Vec<_>>(), frames);
        assert_eq!(batch.iter().len(), 3);
        for from in 0..=4 {
            let expected: Vec<&[u8]> = frames.iter().skip(from).copied().collect();
            assert_eq!(
                batch.iter_from(from).collect::<Vec<_>>(),
                expected,
                "from {from}"
            );
        }
        assert_eq!(batch.last(), Some(frames[2]));
        batch.clear();
        assert!(batch.is_empty() && batch.size() == 0 && batch.last().is_none());
        batch.push(frames[1]);
        assert_eq!(batch.last(), Some(frames[1]));
        assert_eq!(batch.iter().collect::<Vec<_>>(), [frames[1]]);
    }

    #[test]
    fn a_large_batch_gives_its_room_back_when_cleared() {
        let mut batch = Batch::default();
        let frame = vec![b'B'; 600];
        for _ in 0..3 {
            batch.push(&frame);
        }
        batch.clear();
        assert_eq!(batch.bytes.capacity(), 0);
        for _ in 0..3 {
            batch.push(b"H\0\0\0\x04");
        }
        batch.clear();
        assert!(batch.bytes.capacity() > 0, "a small batch's room is kept");
    }
}
