//! Following the primary's changes by logical decoding (being written).
