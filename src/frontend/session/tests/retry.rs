//! retry tests (to be written).
