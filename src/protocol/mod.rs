//! PostgreSQL wire protocol: framing and the few messages pgway builds or reads.
//!
//! No I/O policy lives here. Frames are split by hand (type byte + length) so the
//! original bytes can be forwarded unchanged and a malformed frame is an error value,
//! never a panic. Decoders work on copies of just the fields pgway needs.

pub mod frame;
#[cfg(test)]
pub(crate) mod fuzz;
pub mod messages;

pub use frame::{FrameError, MAX_MESSAGE_LEN, MAX_STARTUP_LEN};
