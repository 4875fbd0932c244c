//! The result cache: results of reads kept in memory and replayed to clients, invalidated
//! from the primary's WAL (see [`wal`]) and by the writes pgway sees.

pub mod wal;
