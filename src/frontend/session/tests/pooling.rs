//! pooling tests (to be written).
