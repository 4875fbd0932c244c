//! Whether a function may run on a replica, from `pg_proc`, looked up once per (database,
//! function name) and kept for `routing.function_analysis_ttl`.
//!
//! Every overload of the name must qualify: `STABLE` or `IMMUTABLE`; or `VOLATILE` (the
//! default, so most plpgsql functions) with a `LANGUAGE sql` or `plpgsql` body that
//! [`body::analyze`] proves read-only and whose callees qualify in turn (up to
//! [`MAX_DEPTH`] calls deep); or a volatile built-in that is harmless on a replica
//! (`random`, `clock_timestamp`, ...). `routing.read_only_functions` and
//! `routing.write_functions` override this either way.
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

use arc_swap::ArcSwap;
use tokio::sync::Mutex;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::backend::control::{self, ControlError, ControlLogin};
use crate::net::{Connector, TcpConnector};
use crate::route::classify::body;
use crate::topology::TopologyHandle;

/// How many calls deep the analysis follows a function's callees.
pub const MAX_DEPTH: usize = 8;

/// Volatile built-ins (in `pg_catalog`) that are harmless on a replica: they read no
/// node-local state and write nothing.
const HARMLESS_VOLATILE: &[&str] = &[
    "random",
    "random_normal",
    "clock_timestamp",
    "timeofday",
    "gen_random_uuid",
    "pg_sleep",
    "pg_sleep_for",
    "pg_sleep_until",
];

/// `routing.read_only_functions` and `routing.write_functions`: schema-qualified names
/// (every overload) or names with an argument list (that overload).
#[derive(Debug, Clone, Default)]
pub struct FunctionRules {
    /// Functions that may go to a replica whatever their body.
    pub read_only: Vec<String>,
    /// Functions that stay on the primary whatever their body.
    pub write: Vec<String>,
    /// How long an answer is kept.
    pub ttl: Duration,
}

impl FunctionRules {
    /// Name-only entries (`schema.name`) matching `schema`.`name`.
    fn names(list: &[String], schema: &str, name: &str) -> bool {
        list.iter().any(|entry| {
            !entry.contains('(')
                && entry.rsplit_once('.').is_some_and(|(s, n)| {
                    s.eq_ignore_ascii_case(schema) && n.eq_ignore_ascii_case(name)
                })
        })
    }

    /// Entries with an argument list, which PostgreSQL resolves to overloads
    /// (`to_regprocedure`).
    fn overloads(list: &[String]) -> Vec<String> {
        list.iter().filter(|e| e.contains('(')).cloned().collect()
    }
}

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

/// Who the control connections log in as: the client's own user when pgway has its
/// password, else `fallback` (the first `[[users]]` entry: users known only through
/// `auth_query` have no password pgway could use).
#[derive(Clone, Default)]
pub struct Credentials {
    /// Passwords by user.
    pub passwords: HashMap<String, String>,
    /// Who logs in for users without a password here.
    pub fallback: Option<String>,
}

impl Credentials {
    /// The `[[users]]` entries' passwords, falling back to the first entry's.
    pub fn of(users: &[crate::config::UserConfig]) -> Self {
        Self {
            passwords: users
                .iter()
                .map(|u| (u.name.clone(), u.password.clone()))
                .collect(),
            fallback: users.first().map(|u| u.name.clone()),
        }
    }

    /// The user a control connection for `user`'s look-ups logs in as, and its password.
    fn login_for<'c>(&'c self, user: &'c str) -> Option<(&'c str, &'c str)> {
        let own = self.passwords.get(user).map(|p| (user, p.as_str()));
        own.or_else(|| {
            let fallback = self.fallback.as_deref()?;
            Some((fallback, self.passwords.get(fallback)?.as_str()))
        })
    }
}

/// What the catalog learned, dropped whole when its rules change.
struct Learned {
    /// Per (database, function).
    answers: moka::sync::Cache<(String, String), Answer>,
    /// Per (database, relation name): a table logical decoding reports (see
    /// [`Catalog::is_decoded_table`]).
    relations: moka::sync::Cache<(String, String), bool>,
}

impl Learned {
    fn new(ttl: Option<Duration>) -> Self {
        Self {
            answers: bounded(ttl),
            relations: bounded(ttl),
        }
    }
}

/// A cache of 100,000 entries at most, each kept for `ttl` if one is given.
fn bounded<V: Clone + Send + Sync + 'static>(
    ttl: Option<Duration>,
) -> moka::sync::Cache<(String, String), V> {
    let builder = moka::sync::Cache::builder().max_capacity(100_000);
    match ttl {
        Some(ttl) => builder.time_to_live(ttl).build(),
        None => builder.build(),
    }
}

/// The volatility cache and its control connections. Its `Debug` names the users it may
/// log in as, not their passwords.
pub struct Catalog {
    topology: Arc<TopologyHandle>,
    /// Swapped by a reload.
    credentials: ArcSwap<Credentials>,
    timeout: Duration,
    /// What pgway learned under `rules`.
    learned: ArcSwap<Learned>,
    clients: Mutex<HashMap<(String, String), tokio_postgres::Client>>,
    tasks: TaskTracker,
    /// Swapped by a reload (with `learned`).
    rules: ArcSwap<FunctionRules>,
    /// Opens the control connections.
    connector: Arc<dyn Connector>,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let credentials = self.credentials.load();
        let mut users: Vec<&str> = credentials.passwords.keys().map(String::as_str).collect();
        users.sort_unstable();
        f.debug_struct("Catalog")
            .field("users", &users)
            .field("timeout", &self.timeout)
            .field("cached", &self.learned.load().answers.entry_count())
            .finish_non_exhaustive()
    }
}

/// Every overload of a name: its identity, volatility, language and body, and whether an
/// overload-specific rule names it ($3: read-only entries, $4: write entries).
const LOOKUP: &str =
    "select n.nspname::text, p.proname::text, p.provolatile::text, l.lanname::text, \
       case when p.prosqlbody is not null then pg_catalog.pg_get_function_sqlbody(p.oid) \
            else p.prosrc end, \
       p.oid = any(array(select pg_catalog.to_regprocedure(x) from unnest($3::text[]) x)), \
       p.oid = any(array(select pg_catalog.to_regprocedure(x) from unnest($4::text[]) x)) \
     from pg_catalog.pg_proc p join pg_catalog.pg_namespace n on n.oid = p.pronamespace \
     join pg_catalog.pg_language l on l.oid = p.prolang \
     where p.proname = $1 and ($2::text is null or n.nspname = $2)";

/// How many relations are called `$1` (in schema `$2`, or any), and whether all of them
/// are tables logical decoding reports.
const RELATION: &str = "select count(*)::int8, coalesce(bool_and(c.relkind in ('r', 'p') \
       and c.relpersistence = 'p' \
       and n.nspname not in ('pg_catalog', 'information_schema') \
       and n.nspname !~ '^pg_toast'), false) \
     from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace \
     where c.relname = $1 and ($2::text is null or n.nspname = $2) \
       and c.relkind in ('r', 'p', 'v', 'm', 'f')";

/// What pgway learned about a function name.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Whether it may run on a replica.
    pub volatility: Volatility,
    /// Why it may not, in words for `SHOW pgway.last_route`.
    pub why: Option<Arc<str>>,
    /// The tables it reads (callees included), when its body was analysed: what a cached
    /// result of a call depends on.
    pub tables: Arc<[String]>,
    /// Whether a call's result may be cached, and under which tables.
    pub cacheable: Cacheable,
}

/// Whether a function call's result may be kept by the result cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Cacheable {
    /// Never: it is volatile (or calls something that is), or it may write.
    No,
    /// Only under tables a `pgway:cache tables=...` hint names: pgway cannot see which
    /// tables it reads (a body it cannot analyse, a rule that forces it read-only).
    TablesUnknown,
    /// Under [`Answer::tables`].
    Yes,
}

impl Answer {
    fn volatile(why: String) -> Self {
        Self {
            volatility: Volatility::Volatile,
            why: Some(Arc::from(why)),
            tables: Arc::from([]),
            cacheable: Cacheable::No,
        }
    }
}

/// One overload, as [`LOOKUP`] returns it.
struct Overload {
    schema: String,
    name: String,
    volatility: String,
    language: String,
    body: Option<String>,
    forced_read_only: bool,
    forced_write: bool,
}

impl Catalog {
    /// A catalog that connects with `credentials` to nodes from `topology`. Its control
    /// connections run on a tracker of its own until [`Self::with_tasks`] gives it one.
    pub fn new(topology: Arc<TopologyHandle>, credentials: Credentials, timeout: Duration) -> Self {
        Self {
            topology,
            credentials: ArcSwap::from_pointee(credentials),
            timeout,
            learned: ArcSwap::from_pointee(Learned::new(None)),
            clients: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
            rules: ArcSwap::from_pointee(FunctionRules::default()),
            connector: Arc::new(TcpConnector),
        }
    }

    /// Opens the control connections through `connector` (`[server_tls]`'s) instead of
    /// plain TCP.
    pub fn with_connector(self, connector: Arc<dyn Connector>) -> Self {
        Self { connector, ..self }
    }

    /// Runs the control connections' tasks on `tasks` (the tracker shutdown waits for).
    pub fn with_tasks(self, tasks: TaskTracker) -> Self {
        Self { tasks, ..self }
    }

    /// Applies `routing.read_only_functions`, `routing.write_functions` and
    /// `routing.function_analysis_ttl`.
    pub fn with_rules(self, rules: FunctionRules) -> Self {
        self.set_rules(rules);
        self
    }

    /// A reload: new function rules, and everything learned under the old ones forgotten
    /// (answers depend on the rules, and their TTL may have changed).
    pub fn set_rules(&self, rules: FunctionRules) {
        self.learned.store(Arc::new(Learned::new(Some(rules.ttl))));
        self.rules.store(Arc::new(rules));
    }

    /// A reload: who control connections log in as. Connections open now stay.
    pub fn set_credentials(&self, credentials: Credentials) {
        self.credentials.store(Arc::new(credentials));
    }

    /// Forgets every answer: a function was created, replaced, altered or dropped (its
    /// callers may have changed with it).
    pub fn functions_changed(&self) {
        self.learned.load().answers.invalidate_all();
    }

    /// Forgets what it learned about relations (DDL went through pgway).
    pub fn relations_changed(&self) {
        self.learned.load().relations.invalidate_all();
    }

    /// A replica refused a statement calling `function`: it stays on the primary until
    /// its answer expires.
    pub fn learn_write(&self, database: &str, function: &str) {
        let why = format!("{function}, which a replica refused to run");
        self.learned.load().answers.insert(
            (database.to_owned(), function.to_owned()),
            Answer::volatile(why),
        );
    }

    /// Whether `function` (lower-case, `schema.name` or `name`) may run on a replica in
    /// `database`.
    pub async fn volatility(&self, database: &str, user: &str, function: &str) -> Volatility {
        self.answer(database, user, function).await.volatility
    }

    /// What pgway knows about `function` (looked up and analysed if it is not cached).
    pub async fn answer(&self, database: &str, user: &str, function: &str) -> Answer {
        self.answer_at(database, user, function, 0).await
    }

    fn answer_at<'s>(
        &'s self,
        database: &'s str,
        user: &'s str,
        function: &'s str,
        depth: usize,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Answer> + Send + 's>> {
        Box::pin(async move {
            let key = (database.to_owned(), function.to_owned());
            if let Some(answer) = self.learned.load().answers.get(&key) {
                return answer;
            }
            if depth > MAX_DEPTH {
                return Answer::volatile(format!("{function}, called more than {MAX_DEPTH} deep"));
            }
            match self.lookup(database, user, function).await {
                Ok(overloads) => {
                    let answer = self
                        .judge(database, user, function, &overloads, depth)
                        .await;
                    self.learned.load().answers.insert(key, answer.clone());
                    answer
                }
                Err(cause) => {
                    // Not kept: the next statement asks again.
                    debug!(%function, %cause, "function look-up failed; routing to the primary");
                    Answer::volatile(format!(
                        "{function}, which pgway could not look up ({cause})"
                    ))
                }
            }
        })
    }

    /// Every overload must qualify (see the module doc); no overload: volatile.
    async fn judge(
        &self,
        database: &str,
        user: &str,
        function: &str,
        overloads: &[Overload],
        depth: usize,
    ) -> Answer {
        if overloads.is_empty() {
            return Answer::volatile(format!("{function}, which pgway cannot find"));
        }
        let mut tables: Vec<String> = Vec::new();
        let mut cacheable = Cacheable::Yes;
        for o in overloads {
            let rules = self.rules.load();
            let name = format!("{}.{}", o.schema, o.name);
            if o.forced_write || FunctionRules::names(&rules.write, &o.schema, &o.name) {
                return Answer::volatile(format!("{name}, listed in routing.write_functions"));
            }
            let volatile = o.volatility == "v";
            if o.schema == "pg_catalog" {
                if volatile && HARMLESS_VOLATILE.contains(&o.name.as_str()) {
                    cacheable = Cacheable::No;
                    continue;
                }
                if !volatile {
                    // A built-in: it reads no table of the user's.
                    continue;
                }
            }
            if o.forced_read_only || FunctionRules::names(&rules.read_only, &o.schema, &o.name) {
                cacheable = cacheable.min(if volatile {
                    Cacheable::No
                } else {
                    Cacheable::TablesUnknown
                });
                continue;
            }
            let analysis = match &o.body {
                Some(text) => body::analyze(&o.language, text),
                None => Err("its body is not readable".to_owned()),
            };
            let calls = match analysis {
                Ok(reads) => {
                    tables.extend(reads.tables);
                    reads.calls
                }
                Err(why) if volatile => {
                    debug!(function = %name, %why, "function may write");
                    return Answer::volatile(format!("{name}, which may write ({why})"));
                }
                Err(_) => {
                    // Stable or immutable: it may run on a replica whatever its body;
                    // only the tables it reads are unknown.
                    cacheable = cacheable.min(Cacheable::TablesUnknown);
                    continue;
                }
            };
            for call in &calls {
                let callee = self.answer_at(database, user, call, depth + 1).await;
                if callee.volatility == Volatility::Volatile {
                    if !volatile {
                        cacheable = Cacheable::No;
                        continue;
                    }
                    let why = callee.why.as_deref().unwrap_or(call.as_str());
                    return Answer::volatile(format!("{name}, which calls {why}"));
                }
                cacheable = cacheable.min(callee.cacheable);
                tables.extend(callee.tables.iter().cloned());
            }
        }
        tables.sort_unstable();
        tables.dedup();
        Answer {
            volatility: Volatility::NotVolatile,
            why: None,
            tables: Arc::from(tables),
            cacheable,
        }
    }

    /// Whether every relation named `name` (`schema.name`, or `name` in any schema) is a
    /// table whose changes logical decoding reports: a plain or partitioned table, logged,
    /// not a system catalog (views, materialized views, foreign, temporary and unlogged
    /// tables are not). Kept like function answers; a failed look-up says no and is not
    /// kept.
    pub async fn is_decoded_table(&self, database: &str, user: &str, name: &str) -> bool {
        let key = (database.to_owned(), name.to_owned());
        if let Some(known) = self.learned.load().relations.get(&key) {
            return known;
        }
        let parts: Vec<&str> = name.split('.').collect();
        let (schema, relation) = match parts.as_slice() {
            [relation] => (None, *relation),
            [.., schema, relation] => (Some(*schema), *relation),
            [] => return false,
        };
        let answer = self
            .query_one(database, user, RELATION, &[&relation, &schema])
            .await
            .and_then(|row| {
                let (count, tables): (i64, bool) = (
                    row.try_get(0).map_err(CatalogError::UnexpectedRow)?,
                    row.try_get(1).map_err(CatalogError::UnexpectedRow)?,
                );
                Ok(count > 0 && tables)
            });
        match answer {
            Ok(known) => {
                self.learned.load().relations.insert(key, known);
                known
            }
            Err(cause) => {
                debug!(relation = %name, %cause, "relation look-up failed; not caching");
                false
            }
        }
    }

    /// Runs one query that returns one row on the control connection for (database, user).
    async fn query_one(
        &self,
        database: &str,
        user: &str,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<tokio_postgres::Row, CatalogError> {
        let mut clients = self.clients.lock().await;
        let client = self.client(&mut clients, database, user).await?;
        crate::timer::timeout(self.timeout, client.query_one(sql, params))
            .await
            .map_err(|_| CatalogError::Timeout)?
            .map_err(CatalogError::Query)
    }

    async fn lookup(
        &self,
        database: &str,
        user: &str,
        function: &str,
    ) -> Result<Vec<Overload>, CatalogError> {
        let (schema, name) = match function.rsplit_once('.') {
            Some((schema, name)) => (Some(schema), name),
            None => (None, function),
        };
        let rules = self.rules.load();
        let read_only = FunctionRules::overloads(&rules.read_only);
        let write = FunctionRules::overloads(&rules.write);
        let mut clients = self.clients.lock().await;
        let client = self.client(&mut clients, database, user).await?;
        let rows = crate::timer::timeout(
            self.timeout,
            client.query(LOOKUP, &[&name, &schema, &read_only, &write]),
        )
        .await
        .map_err(|_| CatalogError::Timeout)?
        .map_err(CatalogError::Query)?;
        rows.iter()
            .map(|row| {
                Ok(Overload {
                    schema: row.try_get(0)?,
                    name: row.try_get(1)?,
                    volatility: row.try_get(2)?,
                    language: row.try_get(3)?,
                    body: row.try_get(4)?,
                    forced_read_only: row.try_get::<_, Option<bool>>(5)?.unwrap_or(false),
                    forced_write: row.try_get::<_, Option<bool>>(6)?.unwrap_or(false),
                })
            })
            .collect::<Result<_, tokio_postgres::Error>>()
            .map_err(CatalogError::UnexpectedRow)
    }

    /// The control connection for (database, user), connected again if it closed.
    async fn client<'c>(
        &self,
        clients: &'c mut HashMap<(String, String), tokio_postgres::Client>,
        database: &str,
        user: &str,
    ) -> Result<&'c tokio_postgres::Client, CatalogError> {
        let credentials = self.credentials.load_full();
        let (user, password) = credentials
            .login_for(user)
            .ok_or(CatalogError::UnknownUser)?;
        let key = (database.to_owned(), user.to_owned());
        let client = match clients.remove(&key).filter(|c| !c.is_closed()) {
            Some(client) => client,
            None => self.connect(database, user, password).await?,
        };
        Ok(clients.entry(key).or_insert(client))
    }

    async fn connect(
        &self,
        database: &str,
        user: &str,
        password: &str,
    ) -> Result<tokio_postgres::Client, CatalogError> {
        let addr = self
            .topology
            .primary()
            .or_else(|| self.topology.replica())
            .ok_or(CatalogError::NoUsableNode)?;
        let login = ControlLogin {
            addr: &addr,
            user,
            password,
            database,
            application_name: "pgway-catalog",
            connector: &*self.connector,
        };
        Ok(control::connect(login, self.timeout, &self.tasks).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_without_a_password_look_up_as_the_first_user() {
        let credentials = Credentials {
            passwords: HashMap::from([("app".to_owned(), "app-secret".to_owned())]),
            fallback: Some("app".to_owned()),
        };
        assert_eq!(credentials.login_for("app"), Some(("app", "app-secret")));
        assert_eq!(
            credentials.login_for("from_auth_query"),
            Some(("app", "app-secret"))
        );
        assert_eq!(Credentials::default().login_for("app"), None);
    }

    #[test]
    fn debug_names_users_not_passwords() {
        let credentials = Credentials {
            passwords: HashMap::from([("app".to_owned(), "app-secret".to_owned())]),
            fallback: None,
        };
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
            Credentials {
                passwords: HashMap::from([("app".to_owned(), "app-secret".to_owned())]),
                fallback: None,
            },
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
