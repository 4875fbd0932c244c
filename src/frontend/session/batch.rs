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
/// order the client sent them. Its lists are on the heap: the session takes a batch out
/// and puts it back three times a batch, and it moves as a pointer.
#[derive(Debug, Default)]
pub(super) struct Batch(Option<Box<Lists>>);

#[derive(Debug, Default)]
struct Lists {
    bytes: Vec<u8>,
    /// Where each message ends in `bytes`.
    ends: Vec<usize>,
}

impl Batch {
    /// Appends a message.
    #[inline]
    pub(super) fn push(&mut self, frame: &[u8]) {
        let lists = self.0.get_or_insert_with(Box::default);
        lists.bytes.extend_from_slice(frame);
        lists.ends.push(lists.bytes.len());
    }

    /// How many messages it holds.
    pub(super) fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |lists| lists.ends.len())
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes of its messages, together.
    pub(super) fn size(&self) -> usize {
        self.0.as_ref().map_or(0, |lists| lists.bytes.len())
    }

    /// Its messages in order.
    pub(super) fn iter(&self) -> Frames<'_> {
        self.iter_from(0)
    }

    /// Its messages from the `from`th on.
    pub(super) fn iter_from(&self, from: usize) -> Frames<'_> {
        let Some(lists) = self.0.as_deref() else {
            return Frames {
                bytes: &[],
                ends: [].iter(),
                start: 0,
            };
        };
        let start = from
            .checked_sub(1)
            .and_then(|last| lists.ends.get(last))
            .copied()
            .unwrap_or(0);
        Frames {
            bytes: &lists.bytes,
            ends: lists.ends.get(from..).unwrap_or_default().iter(),
            start,
        }
    }

    /// Its last message.
    pub(super) fn last(&self) -> Option<&[u8]> {
        let lists = self.0.as_deref()?;
        let end = *lists.ends.last()?;
        let start = lists.ends.len().checked_sub(2).map_or(0, |i| lists.ends[i]);
        Some(&lists.bytes[start..end])
    }

    /// Empties it for the next batch, giving back the room of a large one.
    pub(super) fn clear(&mut self) {
        let Some(lists) = self.0.as_deref_mut() else {
            return;
        };
        lists.bytes.clear();
        lists.ends.clear();
        if lists.bytes.capacity() > KEPT_BATCH_BYTES {
            lists.bytes = Vec::new();
        }
        if lists.ends.capacity() > KEPT_BATCH_FRAMES {
            lists.ends = Vec::new();
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
        assert_eq!(batch.0.as_ref().map(|l| l.bytes.capacity()), Some(0));
        for _ in 0..3 {
            batch.push(b"H\0\0\0\x04");
        }
        batch.clear();
        assert!(
            batch.0.as_ref().is_some_and(|l| l.bytes.capacity() > 0),
            "a small batch's room is kept"
        );
    }
}
