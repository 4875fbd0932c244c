//! Function volatility from `pg_proc`, looked up once per (database, function name).
//!
//! Look-ups go over a tokio-postgres control connection per (database, user) to whichever
//! node is usable (the catalog is the same on every node). Anything pgway cannot find out
//! counts as volatile, so the statement goes to the primary.
//!
//! The control connections' tasks run on the catalog's [`TaskTracker`] (see
//! [`Catalog::with_tasks`]) and end when the catalog is dropped.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::backend::control::{self, ControlError, ControlLogin};
use crate::topology::TopologyHandle;

/// Whether a function may run on a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Volatility {
    /// `IMMUTABLE` or `STABLE` (every overload).
    NotVolatile,
    /// `VOLATILE`, unknown, or the look-up failed: primary.
    Volatile,
}

/// Why a volatility look-up failed (the function then counts as volatile).
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// There is neither a primary nor a readable replica to ask.
    #[error("no usable node")]
    NoUsableNode,
    /// The client's user has no password in the config to log in with.
    #[error("unknown user")]
    UnknownUser,
    /// No control connection could be made.
    #[error(transparent)]
    Connect(#[from] ControlError),
    /// The look-up did not answer within the timeout.
    #[error("look-up timed out")]
    Timeout,
    /// The look-up query failed.
    #[error(transparent)]
    Query(tokio_postgres::Error),
    /// The row the look-up returned is not what it asks for.
    #[error(transparent)]
    UnexpectedRow(tokio_postgres::Error),
}

/// Users' passwords, for the control connections.
pub type Credentials = Arc<HashMap<String, String>>;

/// The volatility cache and its control connections. Its `Debug` names the users it may
/// log in as, not their passwords.
pub struct Catalog {
    topology: Arc<TopologyHandle>,
    credentials: Credentials,
    timeout: Duration,
    cache: moka::sync::Cache<(String, String), Volatility>,
    clients: Mutex<HashMap<(String, String), tokio_postgres::Client>>,
    tasks: TaskTracker,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut users: Vec<&str> = self.credentials.keys().map(String::as_str).collect();
        users.sort_unstable();
        f.debug_struct("Catalog")
            .field("users", &users)
            .field("timeout", &self.timeout)
            .field("cached", &self.cache.entry_count())
            .finish_non_exhaustive()
    }
}

const LOOKUP: &str =
    "select coalesce(max(case p.provolatile when 'v' then 2 when 's' then 1 else 0 end), 2)::int4 \
     from pg_catalog.pg_proc p join pg_catalog.pg_namespace n on n.oid = p.pronamespace \
     where p.proname = $1 and ($2::text is null or n.nspname = $2)";

impl Catalog {
    /// A catalog that connects with `credentials` to nodes from `topology`. Its control
    /// connections run on a tracker of its own until [`Self::with_tasks`] gives it one.
    pub fn new(topology: Arc<TopologyHandle>, credentials: Credentials, timeout: Duration) -> Self {
        Self {
            topology,
            credentials,
            timeout,
            cache: moka::sync::Cache::new(100_000),
            clients: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
        }
    }

    /// Runs the control connections' tasks on `tasks` (the tracker shutdown waits for).
    pub fn with_tasks(self, tasks: TaskTracker) -> Self {
        Self { tasks, ..self }
    }

    /// The volatility of `function` (lower-case, `schema.name` or `name`) in `database`.
    pub async fn volatility(&self, database: &str, user: &str, function: &str) -> Volatility {
        let key = (database.to_owned(), function.to_owned());
        if let Some(v) = self.cache.get(&key) {
            return v;
        }
        match self.lookup(database, user, function).await {
            Ok(v) => {
                self.cache.insert(key, v);
                v
            }
            Err(cause) => {
                debug!(%function, %cause, "volatility look-up failed; routing to the primary");
                Volatility::Volatile
            }
        }
    }

    async fn lookup(
        &self,
        database: &str,
        user: &str,
        function: &str,
    ) -> Result<Volatility, CatalogError> {
        let (schema, name) = match function.rsplit_once('.') {
            Some((schema, name)) => (Some(schema), name),
            None => (None, function),
        };
        let mut clients = self.clients.lock().await;
        let key = (database.to_owned(), user.to_owned());
        let client = match clients.remove(&key).filter(|c| !c.is_closed()) {
            Some(client) => client,
            None => self.connect(database, user).await?,
        };
        let client = clients.entry(key).or_insert(client);
        let row = tokio::time::timeout(self.timeout, client.query_one(LOOKUP, &[&name, &schema]))
            .await
            .map_err(|_| CatalogError::Timeout)?
            .map_err(CatalogError::Query)?;
        let level: i32 = row.try_get(0).map_err(CatalogError::UnexpectedRow)?;
        Ok(if level < 2 {
            Volatility::NotVolatile
        } else {
            Volatility::Volatile
        })
    }

    async fn connect(
        &self,
        database: &str,
        user: &str,
    ) -> Result<tokio_postgres::Client, CatalogError> {
        let addr = self
            .topology
            .primary()
            .or_else(|| self.topology.replica())
            .ok_or(CatalogError::NoUsableNode)?;
        let password = self
            .credentials
            .get(user)
            .ok_or(CatalogError::UnknownUser)?;
        let login = ControlLogin {
            addr: &addr,
            user,
            password,
            database,
            application_name: "pgway-catalog",
        };
        Ok(control::connect(login, self.timeout, &self.tasks).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_names_users_not_passwords() {
        let credentials = Arc::new(HashMap::from([("app".to_owned(), "app-secret".to_owned())]));
        let catalog = Catalog::new(
            TopologyHandle::new(&[]),
            credentials,
            Duration::from_millis(10),
        );
        let text = format!("{catalog:?}");
        assert!(
            !text.contains("app-secret") && text.contains("\"app\""),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_failed_look_up_counts_as_volatile() {
        let catalog = Catalog::new(
            TopologyHandle::new(&[]),
            Arc::new(HashMap::new()),
            Duration::from_millis(10),
        );
        assert!(matches!(
            catalog.lookup("db", "app", "f").await,
            Err(CatalogError::NoUsableNode)
        ));
        assert_eq!(
            catalog.volatility("db", "app", "f").await,
            Volatility::Volatile
        );
    }
}
