//! pinning tests (to be written).
