//! Configuration: one TOML file, parsed with serde.
//!
//! Every table rejects unknown keys by name (`deny_unknown_fields`), every duration is
//! human-readable (`"5s"`, `"200ms"`), and [`Config::check`] validates what serde cannot
//! (non-empty node lists, unique user names, sane sizes) before a config is used.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Errors from loading or validating a config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The path that was read.
        path: String,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The TOML did not parse or did not match the schema (the message names the key).
    #[error("{0}")]
    Parse(#[from] toml::de::Error),
    /// A value parsed but is not acceptable.
    #[error("invalid value for `{key}`: {reason}")]
    Invalid {
        /// The offending key, dotted (`pool.size`).
        key: String,
        /// Why it was rejected.
        reason: String,
    },
}

/// The most worker threads `workers` may ask for.
pub const MAX_WORKERS: usize = 1024;

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The one port clients use.
    /// _Default:_ `127.0.0.1:6432`
    #[serde(default = "Config::default_listen")]
    pub listen: SocketAddr,
    /// HTTP admin port (`GET /health`). _Default:_ `127.0.0.1:9930`
    #[serde(default = "Config::default_admin_listen")]
    pub admin_listen: SocketAddr,
    /// Users clients log in as; pgway logs in to the servers with the same credentials.
    pub users: Vec<UserConfig>,
    /// Server connection pools.
    #[serde(default)]
    pub pool: PoolConfig,
    /// Where the nodes are and how their roles are found.
    pub topology: TopologyConfig,
    /// Client-facing limits and timeouts.
    #[serde(default)]
    pub client: ClientConfig,
    /// Routing limits.
    #[serde(default)]
    pub routing: RoutingConfig,
    /// Worker threads that run client sessions, each with its own event loop (as HAProxy's
    /// `nbthread`). _Default:_ one per CPU core the process may use
    #[serde(default)]
    pub workers: Option<usize>,
    /// How long a worker goes on polling for I/O after its sessions last read something,
    /// before it sleeps in `epoll_wait` (as HAProxy's `busy-polling`, and Linux's
    /// `net.core.busy_poll`): while traffic flows, a round trip waits for no wake-up of
    /// pgway's thread, which on a virtual machine costs tens of microseconds each. It
    /// spends CPU while traffic flows and none once it stops; `"0s"` turns it off.
    /// _Default:_ `"200us"`
    #[serde(default = "Config::default_busy_poll", with = "humantime_serde")]
    pub busy_poll: Duration,
    /// The result cache (off unless `enabled = true`).
    #[serde(default)]
    pub cache: CacheConfig,
    /// `[server_tls]`: TLS on pgway's connections to the servers. _Default:_ plain TCP
    /// (`mode = "disable"`)
    #[serde(default)]
    pub server_tls: ServerTlsConfig,
    /// How long open transactions get to finish after SIGTERM; clients still inside one
    /// then get FATAL 57P01. (SIGINT allows a tenth of it, at most 1 s.) _Default:_ `"30s"`
    #[serde(default = "Config::default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// How log lines are written to stderr: `"text"` or `"json"` (one object a line).
    /// _Default:_ `"text"`
    #[serde(default)]
    pub log_format: LogFormat,
    /// `[auth_query]`: look up users not in `[[users]]` on the primary. _Default:_ none
    /// (only `[[users]]` may log in)
    #[serde(default)]
    pub auth_query: Option<AuthQueryConfig>,
    /// The file this config was loaded from (`None`: built from text), which a reload
    /// reads again.
    #[serde(skip)]
    pub path: Option<PathBuf>,
}

/// `log_format`: how log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object a line, with the span's fields (client address, user, database).
    Json,
}

/// `[cache]`: the result cache.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Serve repeated reads from memory. _Default:_ `false`
    #[serde(default)]
    pub enabled: bool,
    /// Bound on the memory all entries take (`"256MB"`). _Default:_ `"256MB"`
    #[serde(
        default = "CacheConfig::default_max_memory",
        deserialize_with = "deserialize_byte_size"
    )]
    pub max_memory: Option<u64>,
    /// Results larger than this are not cached. _Default:_ `"1MB"`
    #[serde(
        default = "CacheConfig::default_max_entry_size",
        deserialize_with = "deserialize_byte_size"
    )]
    pub max_entry_size: Option<u64>,
    /// How long an entry lives when neither its rule nor its hint says. _Default:_ `"60s"`
    #[serde(default = "CacheConfig::default_ttl", with = "humantime_serde")]
    pub default_ttl: Duration,
    /// A role with `REPLICATION` for the invalidation stream (logical decoding on the
    /// primary). _Default:_ none (invalidation on the writes pgway sees, plus TTL)
    #[serde(default)]
    pub wal_user: Option<String>,
    /// Its password.
    #[serde(default)]
    pub wal_password: String,
    /// Which reads are cached, by the tables they read.
    #[serde(default)]
    pub rules: Vec<CacheRule>,
}

impl std::fmt::Debug for CacheConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheConfig")
            .field("enabled", &self.enabled)
            .field("max_memory", &self.max_memory)
            .field("max_entry_size", &self.max_entry_size)
            .field("default_ttl", &self.default_ttl)
            .field("wal_user", &self.wal_user)
            .field("wal_password", &"***")
            .field("rules", &self.rules)
            .finish()
    }
}

impl CacheConfig {
    fn default_max_memory() -> Option<u64> {
        Some(256 << 20)
    }
    fn default_max_entry_size() -> Option<u64> {
        Some(1 << 20)
    }
    fn default_ttl() -> Duration {
        Duration::from_secs(60)
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            max_memory: Self::default_max_memory(),
            max_entry_size: Self::default_max_entry_size(),
            default_ttl: Self::default_ttl(),
            wal_user: None,
            wal_password: String::new(),
            rules: Vec::new(),
        }
    }
}

/// One `[[cache.rules]]` entry: reads whose every table is listed are cached for `ttl`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheRule {
    /// Tables, `schema.name` (or `name`: that table in any schema).
    pub tables: Vec<String>,
    /// How long entries live. _Default:_ `cache.default_ttl`
    #[serde(default, with = "humantime_serde")]
    pub ttl: Option<Duration>,
}

/// `[routing]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// Replicas whose replay position is further behind the primary's WAL position than
    /// this take no reads until they catch up (`"1MB"`, `"64kB"`, bytes). _Default:_ no limit
    #[serde(default, deserialize_with = "deserialize_byte_size")]
    pub max_replica_lag: Option<u64>,
    /// Whose writes a read must see: `"session"` (its own connection's), `"user"` (any
    /// connection's of the same user and database), `"global"` (any user's of the
    /// database), `"off"`. _Default:_ `"user"`
    #[serde(default)]
    pub read_your_writes: ReadYourWrites,
    /// How long a read that must see a write waits for a replica that has replayed it
    /// before it goes to the primary. _Default:_ `"20ms"`
    #[serde(
        default = "RoutingConfig::default_read_your_writes_wait",
        with = "humantime_serde"
    )]
    pub read_your_writes_wait: Duration,
    /// Functions that may go to a replica whatever pgway finds in their body:
    /// schema-qualified names (every overload, `"accounts.lookup"`) or one overload
    /// (`"accounts.lookup(int, text)"`). _Default:_ none
    #[serde(default)]
    pub read_only_functions: Vec<String>,
    /// Functions that stay on the primary whatever pgway finds in their body, named as in
    /// `read_only_functions`. _Default:_ none
    #[serde(default)]
    pub write_functions: Vec<String>,
    /// How long pgway keeps what it learned about a function (volatility, body analysis)
    /// before it reads the catalog again. _Default:_ `"5m"`
    #[serde(
        default = "RoutingConfig::default_function_analysis_ttl",
        with = "humantime_serde"
    )]
    pub function_analysis_ttl: Duration,
}

impl RoutingConfig {
    fn default_read_your_writes_wait() -> Duration {
        Duration::from_millis(20)
    }

    fn default_function_analysis_ttl() -> Duration {
        Duration::from_secs(300)
    }
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            max_replica_lag: None,
            read_your_writes: ReadYourWrites::default(),
            read_your_writes_wait: Self::default_read_your_writes_wait(),
            read_only_functions: Vec::new(),
            write_functions: Vec::new(),
            function_analysis_ttl: Self::default_function_analysis_ttl(),
        }
    }
}

/// `routing.read_your_writes`: the scope of the writes a read must see.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadYourWrites {
    /// The client connection's own writes.
    Session,
    /// Writes of every connection of the same user and database.
    #[default]
    User,
    /// Writes of every connection to the database.
    Global,
    /// No read waits for a write.
    Off,
}

/// Parses `"1MB"`, `"512kB"`, `"1GB"`, `"100B"` or a bare number of bytes (units are
/// powers of 1024, as in PostgreSQL's settings).
pub fn parse_byte_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1 << 10,
        "mb" | "m" => 1 << 20,
        "gb" | "g" => 1 << 30,
        "tb" | "t" => 1 << 40,
        _ => return None,
    };
    number.checked_mul(factor)
}

fn deserialize_byte_size<'de, D>(deserializer: D) -> Result<Option<u64>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Number(u64),
        Text(String),
    }
    match Raw::deserialize(deserializer)? {
        Raw::Number(n) => Ok(Some(n)),
        Raw::Text(t) => parse_byte_size(&t).map(Some).ok_or_else(|| {
            serde::de::Error::custom(format!("{t:?} is not a size such as \"1MB\""))
        }),
    }
}

/// How a client must prove its password to pgway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum AuthMethod {
    /// SCRAM-SHA-256 (the default, as in PostgreSQL 14+).
    #[default]
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    /// MD5 challenge-response, for old drivers.
    #[serde(rename = "md5")]
    Md5,
}

/// One `[[users]]` entry. Its `Debug` shows the password as `***`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// Role name, as the client sends it in its StartupMessage.
    pub name: String,
    /// Password: checked against the client's, and used to log in to the servers.
    pub password: String,
    /// Client authentication method. _Default:_ `scram-sha-256`
    #[serde(default)]
    pub auth: AuthMethod,
    /// May use the admin console (database `pgway`: `SHOW POOLS`, `PAUSE`, ...).
    /// _Default:_ `false`
    #[serde(default)]
    pub admin: bool,
    /// Server connections per node for this user's pools, instead of `pool.size`.
    #[serde(default)]
    pub pool_size: Option<usize>,
    /// Most client connections this user may hold at once (beyond it: 53300).
    /// _Default:_ only `client.max_connections` applies
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// The databases this user may connect to (others: FATAL 28000). _Default:_ any
    #[serde(default)]
    pub databases: Option<Vec<String>>,
}

impl std::fmt::Debug for UserConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserConfig")
            .field("name", &self.name)
            .field("password", &"***")
            .field("auth", &self.auth)
            .field("admin", &self.admin)
            .field("pool_size", &self.pool_size)
            .field("max_connections", &self.max_connections)
            .field("databases", &self.databases)
            .finish()
    }
}

/// `[auth_query]`: users not in `[[users]]` log in with the SCRAM verifier this query
/// returns from the primary (as pgbouncer's `auth_query`). Its `Debug` hides the password.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthQueryConfig {
    /// The role pgway runs the query as.
    pub user: String,
    /// Its password.
    #[serde(default)]
    pub password: String,
    /// Takes the user name as `$1`, returns (name, verifier).
    /// _Default:_ `SELECT rolname, rolpassword FROM pg_authid WHERE rolname = $1`
    #[serde(default = "AuthQueryConfig::default_query")]
    pub query: String,
    /// The database the query runs in. _Default:_ `postgres`
    #[serde(default = "AuthQueryConfig::default_database")]
    pub database: String,
}

impl AuthQueryConfig {
    fn default_query() -> String {
        "SELECT rolname, rolpassword FROM pg_authid WHERE rolname = $1".to_owned()
    }
    fn default_database() -> String {
        "postgres".to_owned()
    }
}

impl std::fmt::Debug for AuthQueryConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthQueryConfig")
            .field("user", &self.user)
            .field("password", &"***")
            .field("query", &self.query)
            .field("database", &self.database)
            .finish()
    }
}

/// `[pool]`: server connection pools, one per (node, database, user).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Server connections per node, per (database, user). _Default:_ 20
    #[serde(default = "PoolConfig::default_size")]
    pub size: usize,
    /// How long a client waits for a server connection before SQLSTATE 53300. _Default:_ 5s
    #[serde(default = "PoolConfig::default_wait_timeout", with = "humantime_serde")]
    pub wait_timeout: Duration,
    /// TCP connect plus login to a server. _Default:_ 5s
    #[serde(
        default = "PoolConfig::default_connect_timeout",
        with = "humantime_serde"
    )]
    pub connect_timeout: Duration,
    /// Named statements kept prepared per server connection (LRU). _Default:_ 500
    #[serde(default = "PoolConfig::default_statement_cache")]
    pub statement_cache: usize,
    /// A server connection older than this is closed when its client releases it, instead
    /// of being parked (never in the middle of a transaction); `"0s"`: never. _Default:_ 1h
    #[serde(
        default = "PoolConfig::default_server_lifetime",
        with = "humantime_serde"
    )]
    pub server_lifetime: Duration,
    /// A parked server connection unused for this long is closed; `"0s"`: never.
    /// _Default:_ 10m
    #[serde(
        default = "PoolConfig::default_server_idle_timeout",
        with = "humantime_serde"
    )]
    pub server_idle_timeout: Duration,
    /// A plain `BEGIN` outside a transaction is answered by pgway and sent in front of the
    /// transaction's first statement (a round trip fewer, no server connection held
    /// before the transaction uses one). `false`: it goes to the server at once, as
    /// pgbouncer sends it. _Default:_ true
    #[serde(default = "PoolConfig::default_hold_begin")]
    pub hold_begin: bool,
}

impl PoolConfig {
    fn default_hold_begin() -> bool {
        true
    }
    fn default_size() -> usize {
        20
    }
    fn default_wait_timeout() -> Duration {
        Duration::from_secs(5)
    }
    fn default_connect_timeout() -> Duration {
        Duration::from_secs(5)
    }
    fn default_statement_cache() -> usize {
        500
    }
    fn default_server_lifetime() -> Duration {
        Duration::from_secs(3600)
    }
    fn default_server_idle_timeout() -> Duration {
        Duration::from_secs(600)
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            size: Self::default_size(),
            wait_timeout: Self::default_wait_timeout(),
            connect_timeout: Self::default_connect_timeout(),
            statement_cache: Self::default_statement_cache(),
            server_lifetime: Self::default_server_lifetime(),
            server_idle_timeout: Self::default_server_idle_timeout(),
            hold_begin: Self::default_hold_begin(),
        }
    }
}

/// `[client]`: limits on the client side.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// Time a client has to finish startup and authentication. _Default:_ 10s
    #[serde(
        default = "ClientConfig::default_login_timeout",
        with = "humantime_serde"
    )]
    pub login_timeout: Duration,
    /// Most client connections served at once; more are refused with 53300. _Default:_ 10000
    #[serde(default = "ClientConfig::default_max_connections")]
    pub max_connections: usize,
    /// `[client.tls]`: TLS for clients. _Default:_ none (an SSLRequest is answered `N`)
    #[serde(default)]
    pub tls: Option<ClientTlsConfig>,
    /// A client that holds no open transaction and sends nothing for this long is closed
    /// (FATAL 08P01); `"0s"`: never. _Default:_ `"0s"`
    #[serde(default, with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A client that leaves a transaction open and sends nothing for this long is closed
    /// (FATAL 25P03), its transaction rolled back and its server connection returned;
    /// `"0s"`: never. _Default:_ `"0s"`
    #[serde(default, with = "humantime_serde")]
    pub idle_in_transaction_timeout: Duration,
    /// A request the server has not answered after this long is cancelled on the server
    /// (the client gets its 57014); `"0s"`: never. _Default:_ `"0s"`
    #[serde(default, with = "humantime_serde")]
    pub query_timeout: Duration,
    /// Named prepared statements pgway remembers per client; a Parse beyond it gets 53400.
    /// _Default:_ 10000
    #[serde(default = "ClientConfig::default_max_prepared_statements")]
    pub max_prepared_statements: usize,
}

/// `[client.tls]`: the certificate pgway shows clients, and whether they must use it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTlsConfig {
    /// PEM file with the certificate chain, the server's own certificate first (relative
    /// paths are relative to pgway's working directory). Required unless `mode = "disable"`.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// PEM file with the certificate's private key (PKCS#8, PKCS#1 or SEC1). Required
    /// unless `mode = "disable"`.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// _Default:_ `"allow"`
    #[serde(default)]
    pub mode: ClientTlsMode,
}

/// Whether clients may, must or cannot use TLS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientTlsMode {
    /// An SSLRequest is answered `N`: clients go on in plain text.
    Disable,
    /// TLS for clients that ask for it (libpq's `sslmode=prefer` and above), plain text for
    /// the others.
    #[default]
    Allow,
    /// TLS only: a client that starts without an SSLRequest is refused (FATAL 28000)
    /// before authentication.
    Require,
}

/// `[server_tls]`: TLS from pgway to the PostgreSQL servers, in libpq's words.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsConfig {
    /// _Default:_ `"disable"`
    #[serde(default)]
    pub mode: ServerTlsMode,
    /// PEM file with the certificate authorities that sign the servers' certificates.
    /// Required by `verify-ca` and `verify-full`.
    #[serde(default)]
    pub ca: Option<PathBuf>,
}

/// How pgway checks the servers' certificates (libpq's `sslmode` values).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerTlsMode {
    /// Plain TCP.
    #[default]
    Disable,
    /// TLS, the certificate not checked (protects against eavesdropping only).
    Require,
    /// TLS, the certificate chain checked against `ca`.
    VerifyCa,
    /// TLS, the chain checked against `ca` and the certificate's names against the
    /// node's host (name or IP address, as the topology gives it).
    VerifyFull,
}

impl ClientConfig {
    fn default_login_timeout() -> Duration {
        Duration::from_secs(10)
    }
    fn default_max_connections() -> usize {
        10_000
    }
    fn default_max_prepared_statements() -> usize {
        10_000
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            login_timeout: Self::default_login_timeout(),
            max_connections: Self::default_max_connections(),
            tls: None,
            idle_timeout: Duration::ZERO,
            idle_in_transaction_timeout: Duration::ZERO,
            query_timeout: Duration::ZERO,
            max_prepared_statements: Self::default_max_prepared_statements(),
        }
    }
}

/// `[topology]`: how pgway learns which node is the primary.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum TopologyConfig {
    /// A fixed list of nodes; roles come from `pg_is_in_recovery()`.
    Static(StaticTopology),
    /// Patroni's keys in etcd (v3 API), watched.
    Patroni(PatroniTopology),
}

impl TopologyConfig {
    /// How often nodes are health-checked.
    pub fn health_interval(&self) -> Duration {
        match self {
            Self::Static(s) => s.health_interval,
            Self::Patroni(p) => p.health_interval,
        }
    }

    /// Database the health checks log in to.
    pub fn health_database(&self) -> &str {
        match self {
            Self::Static(s) => &s.health_database,
            Self::Patroni(p) => &p.health_database,
        }
    }

    /// How long a write waits for a primary.
    pub fn failover_timeout(&self) -> Duration {
        match self {
            Self::Static(s) => s.failover_timeout,
            Self::Patroni(p) => p.failover_timeout,
        }
    }
}

/// `kind = "patroni"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatroniTopology {
    /// etcd endpoints (`host:port` or URLs), tried in turn.
    pub etcd: Vec<String>,
    /// Patroni's `namespace`. _Default:_ `/service`
    #[serde(default = "PatroniTopology::default_namespace")]
    pub namespace: String,
    /// Patroni's `scope` (the cluster name).
    pub scope: String,
    /// How long new write transactions wait for a usable primary. _Default:_ 30s
    #[serde(default = "default_failover_timeout", with = "humantime_serde")]
    pub failover_timeout: Duration,
    /// How often each member is health-checked. _Default:_ 1s
    #[serde(
        default = "StaticTopology::default_health_interval",
        with = "humantime_serde"
    )]
    pub health_interval: Duration,
    /// Database the health checks log in to. _Default:_ `postgres`
    #[serde(default = "StaticTopology::default_health_database")]
    pub health_database: String,
}

impl PatroniTopology {
    fn default_namespace() -> String {
        "/service".to_owned()
    }
}

fn default_failover_timeout() -> Duration {
    Duration::from_secs(30)
}

/// `kind = "static"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticTopology {
    /// `host:port` of every node, primary and replicas in any order.
    pub nodes: Vec<String>,
    /// How often each node's role and health are checked. _Default:_ 1s
    #[serde(
        default = "StaticTopology::default_health_interval",
        with = "humantime_serde"
    )]
    pub health_interval: Duration,
    /// Database the health checks log in to (as the first `[[users]]` entry). _Default:_ `postgres`
    #[serde(default = "StaticTopology::default_health_database")]
    pub health_database: String,
    /// How long new write transactions wait for a usable primary. _Default:_ 30s
    #[serde(default = "default_failover_timeout", with = "humantime_serde")]
    pub failover_timeout: Duration,
}

impl StaticTopology {
    fn default_health_interval() -> Duration {
        Duration::from_secs(1)
    }
    fn default_health_database() -> String {
        "postgres".to_owned()
    }
}

impl Config {
    fn default_listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 6432))
    }
    fn default_admin_listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9930))
    }
    fn default_busy_poll() -> Duration {
        Duration::from_micros(200)
    }
    fn default_shutdown_timeout() -> Duration {
        Duration::from_secs(30)
    }

    /// Parses and validates a config from TOML text.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text)?;
        config.check()?;
        Ok(config)
    }

    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut config = Self::from_toml_str(&text)?;
        config.path = Some(path.to_owned());
        Ok(config)
    }

    /// Checks what serde cannot: sizes, lists and uniqueness.
    pub fn check(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, reason: &str| ConfigError::Invalid {
            key: key.to_owned(),
            reason: reason.to_owned(),
        };
        if self.users.is_empty() {
            return Err(invalid("users", "at least one [[users]] entry is required"));
        }
        for (i, user) in self.users.iter().enumerate() {
            if user.name.is_empty() {
                return Err(invalid(&format!("users[{i}].name"), "must not be empty"));
            }
            if self.users[..i].iter().any(|u| u.name == user.name) {
                return Err(invalid(
                    &format!("users[{i}].name"),
                    &format!("user {:?} is listed twice", user.name),
                ));
            }
            if user.pool_size == Some(0) {
                return Err(invalid(
                    &format!("users[{i}].pool_size"),
                    "must be at least 1",
                ));
            }
            if user.max_connections == Some(0) {
                return Err(invalid(
                    &format!("users[{i}].max_connections"),
                    "must be at least 1",
                ));
            }
        }
        if self.pool.size == 0 {
            return Err(invalid("pool.size", "must be at least 1"));
        }
        if self.pool.statement_cache == 0 {
            return Err(invalid("pool.statement_cache", "must be at least 1"));
        }
        if self
            .workers
            .is_some_and(|n| !(1..=MAX_WORKERS).contains(&n))
        {
            return Err(invalid(
                "workers",
                &format!("must be between 1 and {MAX_WORKERS}"),
            ));
        }
        for (i, rule) in self.cache.rules.iter().enumerate() {
            if rule.tables.is_empty() || rule.tables.iter().any(|t| t.trim().is_empty()) {
                return Err(invalid(
                    &format!("cache.rules[{i}].tables"),
                    "must list at least one table, none empty",
                ));
            }
        }
        if self.cache.wal_user.as_deref().is_some_and(str::is_empty) {
            return Err(invalid("cache.wal_user", "must not be empty"));
        }
        if self.cache.max_entry_size > self.cache.max_memory {
            return Err(invalid(
                "cache.max_entry_size",
                "must not be larger than cache.max_memory",
            ));
        }
        if self.client.max_connections == 0 {
            return Err(invalid("client.max_connections", "must be at least 1"));
        }
        if self.client.max_prepared_statements == 0 {
            return Err(invalid(
                "client.max_prepared_statements",
                "must be at least 1",
            ));
        }
        self.check_tls()?;
        if let Some(aq) = &self.auth_query {
            for (key, value) in [
                ("auth_query.user", &aq.user),
                ("auth_query.query", &aq.query),
                ("auth_query.database", &aq.database),
            ] {
                if value.trim().is_empty() {
                    return Err(invalid(key, "must not be empty"));
                }
            }
            if !aq.query.contains("$1") {
                return Err(invalid("auth_query.query", "must take the user name as $1"));
            }
        }
        for (key, list) in [
            (
                "routing.read_only_functions",
                &self.routing.read_only_functions,
            ),
            ("routing.write_functions", &self.routing.write_functions),
        ] {
            for (i, entry) in list.iter().enumerate() {
                let name = entry.split('(').next().unwrap_or_default();
                let qualified = name
                    .split_once('.')
                    .is_some_and(|(schema, f)| !schema.trim().is_empty() && !f.trim().is_empty());
                if !qualified || entry.contains('(') && !entry.trim_end().ends_with(')') {
                    return Err(invalid(
                        &format!("{key}[{i}]"),
                        &format!("{entry:?} is not schema.function or schema.function(types)"),
                    ));
                }
            }
        }
        match &self.topology {
            TopologyConfig::Static(s) => {
                if s.nodes.is_empty() {
                    return Err(invalid("topology.nodes", "at least one node is required"));
                }
                for (i, node) in s.nodes.iter().enumerate() {
                    if split_host_port(node).is_none() {
                        return Err(invalid(
                            &format!("topology.nodes[{i}]"),
                            &format!("{node:?} is not host:port"),
                        ));
                    }
                }
            }
            TopologyConfig::Patroni(p) => {
                if p.etcd.is_empty() {
                    return Err(invalid(
                        "topology.etcd",
                        "at least one endpoint is required",
                    ));
                }
                if p.scope.is_empty() {
                    return Err(invalid("topology.scope", "must not be empty"));
                }
            }
        }
        if self.topology.health_interval().is_zero() {
            return Err(invalid("topology.health_interval", "must be more than 0"));
        }
        Ok(())
    }

    /// `[client.tls]` and `[server_tls]`: the files each mode needs are named (they are
    /// read when pgway starts).
    fn check_tls(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, reason: &str| ConfigError::Invalid {
            key: key.to_owned(),
            reason: reason.to_owned(),
        };
        if let Some(tls) = &self.client.tls {
            if tls.mode != ClientTlsMode::Disable {
                for (key, path) in [("client.tls.cert", &tls.cert), ("client.tls.key", &tls.key)] {
                    if path.as_ref().is_none_or(|p| p.as_os_str().is_empty()) {
                        return Err(invalid(
                            key,
                            "is required unless client.tls.mode = \"disable\"",
                        ));
                    }
                }
            }
        }
        let server = &self.server_tls;
        match server.mode {
            ServerTlsMode::VerifyCa | ServerTlsMode::VerifyFull => {
                if server.ca.as_ref().is_none_or(|p| p.as_os_str().is_empty()) {
                    return Err(invalid(
                        "server_tls.ca",
                        "is required by mode \"verify-ca\" and \"verify-full\"",
                    ));
                }
            }
            ServerTlsMode::Disable | ServerTlsMode::Require => {
                if server.ca.is_some() {
                    return Err(invalid(
                        "server_tls.ca",
                        "is used only by mode \"verify-ca\" or \"verify-full\" (mode \"require\" \
                         checks no certificate)",
                    ));
                }
            }
        }
        Ok(())
    }

    /// The configured user with this name.
    pub fn user(&self, name: &str) -> Option<&UserConfig> {
        self.users.iter().find(|u| u.name == name)
    }
}

/// Splits `host:port` (or `[v6]:port`) into its parts.
pub fn split_host_port(addr: &str) -> Option<(&str, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    Some((host, port.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
listen = "127.0.0.1:6432"
admin_listen = "127.0.0.1:9930"
[[users]]
name = "app"
password = "app-secret"
[pool]
size = 20
wait_timeout = "5s"
[topology]
kind = "static"
nodes = ["127.0.0.1:5441", "127.0.0.1:5442"]
health_interval = "1s"
"#;

    #[test]
    fn the_cache_section_parses_and_is_checked() {
        let with = |cache: &str| Config::from_toml_str(&format!("{EXAMPLE}\n{cache}"));
        let config = with(
            r#"[cache]
enabled = true
max_memory = "256MB"
max_entry_size = "1MB"
default_ttl = "60s"
wal_user = "pgway_wal"
wal_password = "secret"
[[cache.rules]]
tables = ["accounts.user_groups", "accounts.contact_type"]
ttl = "3h"
"#,
        )
        .expect("cache config");
        assert!(config.cache.enabled);
        assert_eq!(config.cache.max_memory, Some(256 << 20));
        assert_eq!(
            config.cache.rules[0].ttl,
            Some(Duration::from_secs(3 * 3600))
        );
        assert!(!format!("{:?}", config.cache).contains("secret"));
        assert!(
            !Config::from_toml_str(EXAMPLE)
                .expect("example")
                .cache
                .enabled
        );
        let refused = |cache: &str, key: &str| match with(cache) {
            Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key),
            other => panic!("{cache}: {other:?}"),
        };
        refused("[[cache.rules]]\ntables = []\n", "cache.rules[0].tables");
        refused(
            "[cache]\nmax_memory = \"1MB\"\nmax_entry_size = \"2MB\"\n",
            "cache.max_entry_size",
        );
        assert!(with("[cache]\nttl = \"1s\"\n").is_err());
    }

    #[test]
    fn users_are_not_admins_unless_marked() {
        let config = Config::from_toml_str(&format!(
            "{EXAMPLE}\n[[users]]\nname = \"ops\"\npassword = \"x\"\nadmin = true\n"
        ))
        .expect("config with an admin");
        assert!(!config.users[0].admin);
        assert!(config.users[1].admin);
        assert!(Config::from_toml_str(&format!(
            "{EXAMPLE}\n[[users]]\nname = \"ops\"\npassword = \"x\"\nadmin = \"yes\"\n"
        ))
        .is_err());
    }

    #[test]
    fn example_parses() {
        let config = Config::from_toml_str(EXAMPLE).expect("example config");
        assert_eq!(config.pool.size, 20);
        assert_eq!(config.pool.wait_timeout, Duration::from_secs(5));
        assert_eq!(config.users[0].auth, AuthMethod::ScramSha256);
        let TopologyConfig::Static(s) = &config.topology else {
            panic!("static topology expected");
        };
        assert_eq!(s.nodes.len(), 2);
        assert_eq!(s.health_interval, Duration::from_secs(1));
    }

    #[test]
    fn unknown_key_is_named() {
        let text = EXAMPLE.replace("size = 20", "size = 20\nsizee = 3");
        let err = Config::from_toml_str(&text).expect_err("unknown key");
        assert!(err.to_string().contains("sizee"), "{err}");
        let text = EXAMPLE.replace("health_interval", "health_intervall");
        let err = Config::from_toml_str(&text).expect_err("unknown key");
        assert!(err.to_string().contains("health_intervall"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let err = Config::from_toml_str(&EXAMPLE.replace("size = 20", "size = 0"))
            .expect_err("zero pool");
        assert!(err.to_string().contains("pool.size"), "{err}");
        let err = Config::from_toml_str(&EXAMPLE.replace("\"5s\"", "\"five\""))
            .expect_err("bad duration");
        assert!(err.to_string().contains("wait_timeout"), "{err}");
        let err = Config::from_toml_str(&EXAMPLE.replace("127.0.0.1:5442", "nohost"))
            .expect_err("bad node");
        assert!(err.to_string().contains("topology.nodes[1]"), "{err}");
        let err =
            Config::from_toml_str(&format!("workers = 0\n{EXAMPLE}")).expect_err("zero workers");
        assert!(err.to_string().contains("workers"), "{err}");
    }

    #[test]
    fn workers_default_to_none_and_parse() {
        assert_eq!(
            Config::from_toml_str(EXAMPLE).expect("example").workers,
            None
        );
        let config = Config::from_toml_str(&format!("workers = 3\n{EXAMPLE}")).expect("workers");
        assert_eq!(config.workers, Some(3));
    }

    #[test]
    fn busy_poll_defaults_to_200us_and_zero_turns_it_off() {
        let config = Config::from_toml_str(EXAMPLE).expect("example");
        assert_eq!(config.busy_poll, Duration::from_micros(200));
        let config = Config::from_toml_str(&format!("busy_poll = \"0s\"\n{EXAMPLE}")).expect("off");
        assert!(config.busy_poll.is_zero());
        let config =
            Config::from_toml_str(&format!("busy_poll = \"1ms\"\n{EXAMPLE}")).expect("1ms");
        assert_eq!(config.busy_poll, Duration::from_millis(1));
        let err = Config::from_toml_str(&format!("busy_poll = \"soon\"\n{EXAMPLE}"))
            .expect_err("not a duration");
        assert!(err.to_string().contains("busy_poll"), "{err}");
    }

    #[test]
    fn patroni_topology_and_lag_parse() {
        let text = EXAMPLE.replace(
            "kind = \"static\"\nnodes = [\"127.0.0.1:5441\", \"127.0.0.1:5442\"]\nhealth_interval = \"1s\"",
            "kind = \"patroni\"\netcd = [\"127.0.0.1:2379\"]\nnamespace = \"/service\"\nscope = \"demo\"\nfailover_timeout = \"30s\"\n[routing]\nmax_replica_lag = \"1MB\"",
        );
        let config = Config::from_toml_str(&text).expect("patroni config");
        let TopologyConfig::Patroni(p) = &config.topology else {
            panic!("patroni topology expected");
        };
        assert_eq!(p.scope, "demo");
        assert_eq!(p.failover_timeout, Duration::from_secs(30));
        assert_eq!(config.routing.max_replica_lag, Some(1 << 20));
        let err =
            Config::from_toml_str(&text.replace("\"1MB\"", "\"lots\"")).expect_err("bad size");
        assert!(err.to_string().contains("max_replica_lag"), "{err}");
        let err = Config::from_toml_str(&text.replace("scope", "scop")).expect_err("typo");
        assert!(err.to_string().contains("scop"), "{err}");
    }

    #[test]
    fn debug_never_prints_a_password() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("pgway.toml");
        std::fs::write(&path, EXAMPLE).expect("write config");
        let config = Config::load(&path).expect("example config");
        for text in [format!("{config:?}"), format!("{config:#?}")] {
            assert!(!text.contains("app-secret"), "{text}");
            assert!(text.contains("\"app\""), "{text}");
        }
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_byte_size("1MB"), Some(1 << 20));
        assert_eq!(parse_byte_size("64kB"), Some(64 << 10));
        assert_eq!(parse_byte_size("100"), Some(100));
        assert_eq!(parse_byte_size("1 GB"), Some(1 << 30));
        assert_eq!(parse_byte_size("MB"), None);
        assert_eq!(parse_byte_size("1XB"), None);
    }

    #[test]
    fn tls_sections_parse_and_are_checked() {
        let with = |tls: &str| Config::from_toml_str(&format!("{EXAMPLE}\n{tls}"));
        let config = Config::from_toml_str(EXAMPLE).expect("example");
        assert!(config.client.tls.is_none());
        assert_eq!(config.server_tls.mode, ServerTlsMode::Disable);

        let config = with(
            r#"[client]
login_timeout = "5s"
[client.tls]
cert = "server.crt"
key = "server.key"
mode = "require"
[server_tls]
mode = "verify-full"
ca = "root.crt"
"#,
        )
        .expect("tls config");
        let tls = config.client.tls.as_ref().expect("client.tls");
        assert_eq!(tls.mode, ClientTlsMode::Require);
        assert_eq!(tls.cert.as_deref(), Some(Path::new("server.crt")));
        assert_eq!(config.server_tls.mode, ServerTlsMode::VerifyFull);
        assert_eq!(config.server_tls.ca.as_deref(), Some(Path::new("root.crt")));

        let tls = with("[client.tls]\ncert = \"c\"\nkey = \"k\"\n").expect("default mode");
        assert_eq!(
            tls.client.tls.map(|t| t.mode),
            Some(ClientTlsMode::Allow),
            "[client.tls] defaults to allow"
        );
        for mode in ["disable", "require", "verify-ca", "verify-full"] {
            let ca = if mode.starts_with("verify") {
                "ca = \"root.crt\"\n"
            } else {
                ""
            };
            with(&format!("[server_tls]\nmode = \"{mode}\"\n{ca}")).expect(mode);
        }
        with("[client.tls]\nmode = \"disable\"\n").expect("disable needs no files");

        let refused = |tls: &str, key: &str| match with(tls) {
            Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{tls}"),
            other => panic!("{tls}: {other:?}"),
        };
        refused("[client.tls]\nkey = \"k\"\n", "client.tls.cert");
        refused(
            "[client.tls]\ncert = \"c\"\nmode = \"require\"\n",
            "client.tls.key",
        );
        refused("[server_tls]\nmode = \"verify-ca\"\n", "server_tls.ca");
        refused("[server_tls]\nmode = \"verify-full\"\n", "server_tls.ca");
        refused(
            "[server_tls]\nmode = \"require\"\nca = \"root.crt\"\n",
            "server_tls.ca",
        );
        for (tls, named) in [
            ("[server_tls]\nmode = \"prefer\"\n", "prefer"),
            ("[client.tls]\nmode = \"verify-full\"\n", "verify-full"),
            ("[server_tls]\nmode = \"require\"\ncert = \"x\"\n", "cert"),
            ("[client.tls]\ncrt = \"x\"\n", "crt"),
        ] {
            let err = with(tls).expect_err(tls);
            assert!(err.to_string().contains(named), "{tls}: {err}");
        }
    }

    #[test]
    fn split_host_port_forms() {
        assert_eq!(split_host_port("127.0.0.1:5432"), Some(("127.0.0.1", 5432)));
        assert_eq!(split_host_port("[::1]:5432"), Some(("::1", 5432)));
        assert_eq!(split_host_port("db:x"), None);
        assert_eq!(split_host_port(":5432"), None);
    }
}
