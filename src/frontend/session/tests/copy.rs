//! copy tests (to be written).
