//! pgway: a PostgreSQL wire-protocol gateway.
//!
//! Clients connect to one port. pgway parses each statement, sends reads made outside a
//! transaction to a replica and everything else to the primary, and pools server
//! connections per transaction.
//!
//! # Layout
//! - [`config`]: the TOML config and its validation.
//! - [`server`]: the accept loop and shutdown; [`server::run`] is the library entry point.
//! - [`protocol`]: framing and the few messages pgway reads or writes (no I/O policy).
//! - [`error`]: every error pgway itself tells a client, mapped to SQLSTATE and severity.
//! - [`net`]: the [`net::Transport`] trait (TCP, in-memory streams) and a stream with a
//!   read buffer that yields frames.
//! - [`frontend`]: startup, authentication, cancel, and [`frontend::session`], the
//!   per-client state machine.
//! - [`backend`]: server connections and their pools.
//! - [`route`]: SQL classification (sqlparser) and routing decisions.
//! - [`settings`]: session settings that follow a client across server connections.
//! - [`topology`]: which node is primary; health checks.
//! - [`admin`]: the HTTP admin port.
//! - [`metrics`]: Prometheus metrics for `/metrics`.
//! - [`cache`]: the result cache and its invalidation from the WAL.
//! - [`workers`]: the threads that run the sessions; [`timer`]: their timers, which run on
//!   a thread of their own; [`clock`]: the time, read once per batch of their sessions.
//!
//! Data flows one way: frontend → route → topology picks a node → backend pool → server;
//! the server's bytes flow back untouched except for the messages pgway must read.

#![warn(missing_docs)]

pub mod admin;
pub mod backend;
pub mod cache;
pub mod capacity;
pub mod clock;
pub mod config;
pub mod error;
pub mod frontend;
pub mod metrics;
pub mod net;
pub mod protocol;
pub mod reload;
pub mod route;
pub mod server;
pub mod settings;
pub(crate) mod sync;
pub mod timer;
pub mod topology;
pub mod workers;
