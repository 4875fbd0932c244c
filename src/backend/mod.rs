//! Server side: connections to PostgreSQL nodes and the pools that hold them.

pub mod control;
pub mod pool;
pub mod scram;
pub mod server;

pub use pool::{Account, Pool, PoolError, PoolKey, PooledConn, Pools};
pub use server::{BackendError, Secret, ServerConn};
