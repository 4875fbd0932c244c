//! Session effects: what a statement changes in the session (SET, RESET, DISCARD,
//! DEALLOCATE, pins, `pgway.target`), kept when the request succeeds and its transaction
//! commits, and brought along to every server connection the client lands on.
//!
//! Parameters the server reports (ParameterStatus: DateStyle, TimeZone, ...) follow the
//! reported value instead of the text of the SET. What pgway cannot follow (an unfamiliar
//! SET form, `set_config(..., false)`) goes to the server and pins the client once it
//! succeeds, so it never reaches another client.

use bytes::BytesMut;
use tracing::debug;

use super::{freshness, Copy, Session, SessionError, State};
use crate::error::ClientError;
use crate::net::NetError;
use crate::protocol::messages;
use crate::protocol::MAX_MESSAGE_LEN;
use crate::route::{Hint, PinReason, SessionEffect};
use crate::settings::{sync_query, ClientSettings, Settings, Value, ROLE, SESSION_AUTHORIZATION};

/// pgway's own setting: where the session's statements go (`primary`, `replica`, `auto`).
pub const TARGET_SETTING: &str = "pgway.target";

/// The routing hint `pgway.target` gives every statement of the session that has none of
/// its own; `None` for `auto`.
pub(super) fn target_hint(settings: &ClientSettings) -> Option<Hint> {
    match settings.current.get(TARGET_SETTING) {
        Some(Value::Raw(value) | Value::Sql(value)) => parse_target(value).flatten(),
        None => None,
    }
}

/// `Some(hint)` for a valid value of `pgway.target` (SQL text or raw), `None` otherwise.
fn parse_target(value: &str) -> Option<Option<Hint>> {
    match unquoted(value).to_ascii_lowercase().as_str() {
        "primary" => Some(Some(Hint::Primary)),
        "replica" => Some(Some(Hint::Replica)),
        "auto" | "default" => Some(None),
        _ => None,
    }
}

/// What pgway refuses among a statement's effects, before any server sees it: only values
/// of its own settings it cannot take. Everything else goes to the server, which answers.
pub(super) fn refusal(effects: &[SessionEffect]) -> Option<ClientError> {
    effects.iter().find_map(|effect| match effect {
        SessionEffect::Set { name, value } | SessionEffect::SetConfig { name, value } => {
            if name == TARGET_SETTING && parse_target(value).is_none() {
                Some(ClientError::InvalidParameterValue {
                    name: TARGET_SETTING,
                    value: value.clone(),
                })
            } else {
                freshness::refusal(name, value)
            }
        }
        _ => None,
    })
}

/// A pgway setting's value without the quotes of its SQL text.
pub(super) fn unquoted(value: &str) -> &str {
    let value = value.trim();
    value
        .strip_prefix('\'')
        .and_then(|v| v.strip_suffix('\''))
        .or_else(|| value.strip_prefix('"').and_then(|v| v.strip_suffix('"')))
        .unwrap_or(value)
}

/// Makes sure `pgway.target` has a value in the client's settings (`auto` unless its
/// startup options set one), so the server connections it lands on answer
/// `SHOW pgway.target` in either protocol; an invalid startup value is refused.
pub fn default_target(settings: &mut ClientSettings) -> Result<(), ClientError> {
    freshness::check_startup(settings)?;
    match settings.startup.get(TARGET_SETTING) {
        Some(Value::Raw(value) | Value::Sql(value)) => match parse_target(value) {
            Some(_) => Ok(()),
            None => Err(ClientError::InvalidParameterValue {
                name: TARGET_SETTING,
                value: value.clone(),
            }),
        },
        None => {
            let auto = Value::Raw("auto".to_owned());
            settings.startup.set(TARGET_SETTING, auto.clone());
            settings.current.set(TARGET_SETTING, auto);
            Ok(())
        }
    }
}

/// Settable parameters PostgreSQL 15 reports with ParameterStatus whose value pgway takes
/// from the report rather than from the text of a `SET`: a `SET` can combine with the
/// earlier value (`SET datestyle TO ymd` keeps the output format), so the value to restore
/// is the one the server last reported. (`session_authorization` is reported too, but
/// follows its `SET`: it also resets the role, see [`crate::settings::sync_query`].)
///
/// Each is kept under its lower-case name, next to the name the server reports it by.
const FOLLOWED_REPORTS: [(&str, &str); 7] = [
    ("datestyle", "DateStyle"),
    ("intervalstyle", "IntervalStyle"),
    ("timezone", "TimeZone"),
    ("application_name", "application_name"),
    ("client_encoding", "client_encoding"),
    ("standard_conforming_strings", "standard_conforming_strings"),
    (
        "default_transaction_read_only",
        "default_transaction_read_only",
    ),
];

/// The name pgway keeps a reported parameter under, if it follows its reports.
fn followed_report(name: &str) -> Option<&'static str> {
    FOLLOWED_REPORTS
        .iter()
        .find(|(key, _)| key.eq_ignore_ascii_case(name))
        .map(|(key, _)| *key)
}

/// The followed parameters among a greeting's ParameterStatus values, by pgway's names.
pub fn followed_reports(params: &[(String, String)]) -> Settings {
    let mut reports = Settings::default();
    for (name, value) in params {
        if let Some(key) = followed_report(name) {
            reports.set(key, Value::Raw(value.clone()));
        }
    }
    reports
}

/// One boolean: does this server connection still hold session-bound state (a LISTEN, a
/// session advisory lock, an SQL prepared statement, a WITH HOLD cursor, a temporary
/// object)?
const BOUND_STATE_QUERY: &str = "SELECT EXISTS (SELECT FROM pg_catalog.pg_listening_channels()) \
     OR EXISTS (SELECT FROM pg_catalog.pg_locks \
                WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid()) \
     OR EXISTS (SELECT FROM pg_catalog.pg_prepared_statements WHERE from_sql) \
     OR EXISTS (SELECT FROM pg_catalog.pg_cursors WHERE is_holdable) \
     OR EXISTS (SELECT FROM pg_catalog.pg_class \
                WHERE relnamespace = pg_catalog.pg_my_temp_schema())";

/// Of a failed string's effects (with markers), those its first `completed` statements
/// made up to the last transaction end among them: what follows that end was rolled back
/// with the failing statement, or waits in an aborted transaction that can only roll back.
/// `BEGIN; SET a ..; COMMIT; SET b ..; select 1/0` keeps `a`, not `b`.
fn committed_before_failure(
    mut effects: Vec<SessionEffect>,
    completed: usize,
) -> Vec<SessionEffect> {
    let mut statements = 0;
    let mut keep = 0;
    for (at, effect) in effects.iter().enumerate() {
        if statements == completed {
            break;
        }
        match effect {
            SessionEffect::EndOfStatement => statements += 1,
            SessionEffect::Commit | SessionEffect::Rollback => keep = at + 1,
            _ => {}
        }
    }
    effects.truncate(keep);
    effects
}

/// The effects that survive a committed transaction's savepoint history.
fn committed_effects(events: Vec<SessionEffect>) -> Vec<SessionEffect> {
    let mut effects = Vec::new();
    let mut savepoints: Vec<(String, usize)> = Vec::new();
    for event in events {
        match event {
            SessionEffect::Savepoint(name) => savepoints.push((name, effects.len())),
            SessionEffect::RollbackToSavepoint(name) => {
                if let Some(i) = savepoints.iter().rposition(|(n, _)| *n == name) {
                    effects.truncate(savepoints[i].1);
                    savepoints.truncate(i + 1);
                }
            }
            SessionEffect::ReleaseSavepoint(name) => {
                if let Some(i) = savepoints.iter().rposition(|(n, _)| *n == name) {
                    savepoints.truncate(i);
                }
            }
            effect => effects.push(effect),
        }
    }
    effects
}

impl Session<'_> {
    /// At the end of a request (ReadyForQuery): keep the session effects of what succeeded
    /// and committed, drop the rest.
    pub(super) fn on_request_done(&mut self, status: u8) {
        self.request.ended = true;
        self.request.min_position = 0;
        self.request.kept_writes = !self.request.failed || self.request.commits;
        if status == b'I' && self.request.held_ready.is_none() && !self.request.wal_deferred {
            let kept = self.request.kept_writes && !self.txn.rolled_back;
            self.end_written(kept, 0);
        }
        let wrote = std::mem::take(&mut self.request.may_write);
        self.txn.wrote = status != b'I' && (self.txn.wrote || wrote);
        let mut effects = std::mem::take(&mut self.request.effects);
        if std::mem::take(&mut self.request.failed) && !effects.is_empty() {
            // What the failed string may have done on the server that pgway does not keep
            // (a SET whose statement completed, in the transaction the error rolled back)
            // must not reach another client: the next sync starts from RESET ALL.
            if let Some(link) = self.state.link_mut() {
                link.conn.applied.dirty = true;
            }
            effects = committed_before_failure(effects, self.request.completed);
        }
        if effects.is_empty() {
            // The common case: nothing to keep.
        } else {
            self.keep_effects(effects);
        }
        if status == b'I' && !self.txn.effects.is_empty() {
            let events = std::mem::take(&mut self.txn.effects);
            if !self.txn.rolled_back {
                self.apply_effects(committed_effects(events));
            }
        }
    }

    /// A finished request's effects join its transaction's; at each transaction end
    /// marked in a string, the transaction's are applied or dropped.
    fn keep_effects(&mut self, effects: Vec<SessionEffect>) {
        for effect in effects {
            match effect {
                SessionEffect::Commit => {
                    let events = std::mem::take(&mut self.txn.effects);
                    self.apply_effects(committed_effects(events));
                }
                SessionEffect::Rollback => self.txn.effects.clear(),
                SessionEffect::EndOfStatement => {}
                effect => self.txn.effects.push(effect),
            }
        }
    }

    fn apply_effects(&mut self, effects: Vec<SessionEffect>) {
        let mut settings_changed = false;
        for effect in effects {
            let server = self.state.link_mut().map(|link| &mut link.conn);
            match effect {
                SessionEffect::Set { name, value } => {
                    self.apply_set(name, Value::Sql(value));
                    settings_changed = true;
                }
                SessionEffect::SetConfig { name, value } => {
                    self.apply_set(name, Value::Raw(value));
                    settings_changed = true;
                }
                SessionEffect::Reset(name) => {
                    if let Some(server) = server {
                        server.applied.settings.remove(&name);
                        if name == SESSION_AUTHORIZATION {
                            server.applied.settings.remove(ROLE);
                        }
                    }
                    self.settings.reset(&name);
                    if name == SESSION_AUTHORIZATION {
                        self.settings.current.remove(ROLE);
                    }
                    settings_changed = true;
                }
                SessionEffect::ResetAll => {
                    if let Some(server) = server {
                        server.applied.settings.clear();
                    }
                    self.settings.reset_all();
                    settings_changed = true;
                }
                SessionEffect::DiscardAll => {
                    if let Some(server) = server {
                        server.applied.settings.clear();
                        server.statements = Default::default();
                        server.unnamed = None;
                    }
                    self.settings.reset_all();
                    settings_changed = true;
                    self.statements.clear();
                    self.unnamed = None;
                    self.unpin();
                }
                SessionEffect::DeallocateAll => {
                    if let Some(server) = server {
                        server.statements = Default::default();
                    }
                    self.statements.clear();
                }
                SessionEffect::Deallocate(name) => {
                    self.statements.remove(name.as_bytes());
                }
                SessionEffect::Pin(reason) => self.pin(reason),
                // pgway cannot follow it to another connection: the client stays on this
                // one, so nobody else gets the setting and the client keeps it.
                SessionEffect::Untracked(_) => self.pin(PinReason::Untracked),
                SessionEffect::FunctionsChanged => self.shared.router.functions_changed(),
                SessionEffect::SetLocal
                | SessionEffect::UsesLastWriteLsn
                | SessionEffect::UsesLastRoute
                | SessionEffect::EndOfStatement
                | SessionEffect::Commit
                | SessionEffect::Rollback
                | SessionEffect::DiscardOther
                | SessionEffect::Unlisten
                | SessionEffect::Savepoint(_)
                | SessionEffect::RollbackToSavepoint(_)
                | SessionEffect::ReleaseSavepoint(_) => {}
            }
        }
        if settings_changed {
            self.target = target_hint(&self.settings);
            self.min_lsn = freshness::min_lsn(&self.settings);
        }
    }

    /// A session-level `SET` (or `set_config`) that succeeded and committed.
    fn apply_set(&mut self, name: String, value: Value) {
        let server = self.state.link_mut().map(|link| &mut link.conn);
        if let Some(key) = followed_report(&name) {
            // Its ParameterStatus said what the value is now (kept again here, in case a
            // RESET ALL earlier in the same request was applied just before).
            if let Some(value) = self.settings.told.get(key).cloned() {
                if let Some(server) = server {
                    server.applied.settings.set(key, value.clone());
                }
                self.settings.current.set(key, value);
            }
            return;
        }
        if let Some(server) = server {
            if name == SESSION_AUTHORIZATION {
                server.applied.settings.remove(ROLE);
            }
            server.applied.settings.set(&name, value.clone());
        }
        if name == SESSION_AUTHORIZATION {
            // The server reset the role: PostgreSQL's `role` is `none` now.
            self.settings.current.remove(ROLE);
        }
        self.settings.current.set(&name, value);
    }

    /// A ParameterStatus from the client's own statement (a SET, a RESET, the end of a
    /// transaction), forwarded. For a parameter pgway follows by its reports, the reported
    /// value is the client's value now, and the connection's; the client hears of it only
    /// if it changed for the client. A `RESET` (`RESET ALL`, `DISCARD ALL`) of a parameter
    /// the client's StartupMessage set returns the connection to its own login value, the
    /// server's default: the client hears its startup value instead, as it would directly.
    pub(super) fn on_parameter_status(&mut self, frame: &[u8]) {
        let mut fields = messages::body(frame).split(|&b| b == 0);
        let (Some(name), Some(value)) = (fields.next(), fields.next()) else {
            return;
        };
        let Some(key) = std::str::from_utf8(name).ok().and_then(followed_report) else {
            self.out.extend_from_slice(frame);
            return;
        };
        let real = String::from_utf8_lossy(value).into_owned();
        self.request.reported.push(key);
        let value = match self.reset_to_startup(key, &real) {
            Some(startup) => startup,
            None => Value::Raw(real.clone()),
        };
        if let Some(link) = self.state.link_mut() {
            link.conn.applied.settings.set(key, Value::Raw(real));
        }
        self.tell(key, &value);
        self.settings.current.set(key, value);
    }

    /// The value the client's StartupMessage gave `key`, as reported at login, when the
    /// connection just reported `value` because this request reset `key` to its default.
    fn reset_to_startup(&self, key: &str, value: &str) -> Option<Value> {
        let default = self
            .state
            .link()?
            .conn
            .params
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(key))?;
        if default.1 != value {
            return None;
        }
        self.startup_if_reset(key)
    }

    /// Before a request's ReadyForQuery: a parameter its `RESET` returned to the startup
    /// value without a report (the connection already had the server default) is reported
    /// now, if the client was told another value. (Not when the request ended in a
    /// ROLLBACK, which undid the reset.)
    pub(super) fn report_resets(&mut self) {
        if self.request.failed || self.request.effects.is_empty() || self.txn.rolled_back {
            return;
        }
        for (key, _) in FOLLOWED_REPORTS {
            if !self.request.reported.contains(&key) {
                if let Some(startup) = self.startup_if_reset(key) {
                    self.tell(key, &startup);
                }
            }
        }
    }

    /// The startup value of `key` as reported at login, if the StartupMessage set `key`
    /// and this request resets it.
    fn startup_if_reset(&self, key: &str) -> Option<Value> {
        self.settings.startup.get(key)?;
        let resets = self.request.effects.iter().any(|effect| match effect {
            SessionEffect::Reset(name) => name == key,
            SessionEffect::ResetAll | SessionEffect::DiscardAll => true,
            _ => false,
        });
        resets
            .then(|| self.settings.at_login.get(key).cloned())
            .flatten()
    }

    /// Sends the client a ParameterStatus for `key` if `value` is news to it.
    fn tell(&mut self, key: &str, value: &Value) {
        if self.settings.told.get(key) == Some(value) {
            return;
        }
        if let (Some((_, reported_as)), Value::Raw(text)) =
            (FOLLOWED_REPORTS.iter().find(|(k, _)| *k == key), value)
        {
            messages::parameter_status(&mut self.out, reported_as, text);
        }
        self.settings.told.set(key, value.clone());
    }

    /// After a request that may have let go of what pinned the client: if the server
    /// connection holds no session-bound state any more, Pinned -> Attached (and the
    /// caller releases it). A pin for something pgway cannot see ([`PinReason::Untracked`])
    /// stays. Notifications that arrive meanwhile reach the client.
    pub(super) async fn unpin_if_unbound(&mut self) -> Result<(), SessionError> {
        let State::Pinned(link, reason) = &mut self.state else {
            return Ok(());
        };
        // Not while the connection owes a Sync: after an error the server discards
        // everything until then, and would never answer the check.
        if *reason == PinReason::Untracked
            || link.status != b'I'
            || link.unsynced
            || link.skipping
            || !self.expected.is_empty()
        {
            return Ok(());
        }
        let io = &mut link.conn.io;
        let mut query = BytesMut::new();
        messages::query(&mut query, BOUND_STATE_QUERY);
        let out = &mut self.out;
        let check = async {
            io.send(&mut query).await?;
            let mut bound = true;
            loop {
                let frame = io.read_frame(MAX_MESSAGE_LEN).await?;
                match frame[0] {
                    b'A' => out.extend_from_slice(&frame),
                    // One row, one column: its value is `t` or `f`.
                    b'D' => bound = frame.get(11) != Some(&b'f'),
                    b'E' => bound = true,
                    b'Z' => return Ok::<bool, NetError>(bound),
                    _ => {}
                }
            }
        };
        let bound = crate::timer::timeout(self.shared.config.load().pool.connect_timeout, check)
            .await
            .map_err(|_| {
                SessionError::Fatal(ClientError::ServerLost(
                    "timed out asking the server for the session's state".into(),
                ))
            })?
            .map_err(SessionError::server_lost)?;
        self.flush().await?;
        if !bound {
            self.span.in_scope(|| {
                debug!("client unpinned: its session-bound state is gone");
            });
            self.unpin();
        }
        Ok(())
    }

    /// Session-bound state holds the client on its connection (Attached -> Pinned). A pin
    /// for something pgway cannot see is never replaced by one it can check.
    fn pin(&mut self, reason: PinReason) {
        if !self.is_pinned() {
            self.span.in_scope(|| {
                debug!(?reason, "client pinned to its server connection");
            });
        }
        self.state = match std::mem::replace(&mut self.state, State::Idle) {
            State::Pinned(link, PinReason::Untracked) => State::Pinned(link, PinReason::Untracked),
            State::Attached(link) | State::Pinned(link, _) => State::Pinned(link, reason),
            State::CopyIn(link, copy) => {
                let pin = match copy.pin {
                    Some(PinReason::Untracked) => PinReason::Untracked,
                    _ => reason,
                };
                State::CopyIn(
                    link,
                    Copy {
                        pin: Some(pin),
                        ..copy
                    },
                )
            }
            other => other,
        };
    }

    /// `DISCARD ALL` let go of what pinned the client (Pinned -> Attached).
    fn unpin(&mut self) {
        self.state = match std::mem::replace(&mut self.state, State::Idle) {
            State::Pinned(link, _) => State::Attached(link),
            State::CopyIn(link, copy) => State::CopyIn(link, Copy { pin: None, ..copy }),
            other => other,
        };
    }

    /// True while session-bound state holds the client on its connection.
    pub(super) fn is_pinned(&self) -> bool {
        matches!(
            self.state,
            State::Pinned(..) | State::CopyIn(_, Copy { pin: Some(_), .. })
        )
    }

    /// Queues the query that brings the attached connection's settings in line with the
    /// client's, if they differ; its replies are swallowed.
    pub(super) fn sync_settings(&mut self) {
        let Some(link) = self.state.link_mut() else {
            return;
        };
        let server = &mut link.conn;
        if let Some(sql) = sync_query(&mut server.applied, &self.settings.current) {
            server.unnamed = None;
            messages::query(&mut self.to_server, &sql);
            self.expect(super::relay::Reply::Query, false, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(value: &str) -> SessionEffect {
        SessionEffect::Set {
            name: "work_mem".into(),
            value: value.into(),
        }
    }

    #[test]
    fn savepoints_undo_and_keep_effects() {
        use SessionEffect::{
            ReleaseSavepoint as Release, RollbackToSavepoint as RollbackTo, Savepoint,
        };
        let events = vec![
            set("'8MB'"),
            Savepoint("s".into()),
            set("'9MB'"),
            RollbackTo("s".into()),
            Savepoint("t".into()),
            set("'10MB'"),
            Release("t".into()),
            RollbackTo("missing".into()),
        ];
        assert_eq!(committed_effects(events), vec![set("'8MB'"), set("'10MB'")]);
        // Rolling back to an outer savepoint undoes inner ones too.
        let events = vec![
            Savepoint("a".into()),
            set("'1MB'"),
            Savepoint("b".into()),
            set("'2MB'"),
            RollbackTo("a".into()),
            set("'3MB'"),
        ];
        assert_eq!(committed_effects(events), vec![set("'3MB'")]);
    }

    #[test]
    fn target_values() {
        assert_eq!(parse_target("'primary'"), Some(Some(Hint::Primary)));
        assert_eq!(parse_target("REPLICA"), Some(Some(Hint::Replica)));
        assert_eq!(parse_target(" 'auto' "), Some(None));
        assert_eq!(parse_target("'elsewhere'"), None);
        let refused = refusal(&[SessionEffect::Set {
            name: TARGET_SETTING.into(),
            value: "'elsewhere'".into(),
        }]);
        assert_eq!(
            refused.map(|e| e.sqlstate().to_owned()),
            Some("22023".into())
        );
    }

    #[test]
    fn startup_target_defaults_to_auto_and_is_checked() {
        let mut settings = ClientSettings::from_startup(&[]);
        default_target(&mut settings).unwrap();
        assert_eq!(target_hint(&settings), None);
        assert_eq!(
            settings.current.get(TARGET_SETTING),
            Some(&Value::Raw("auto".into()))
        );
        let mut settings =
            ClientSettings::from_startup(&[("options".into(), "-c pgway.target=primary".into())]);
        default_target(&mut settings).unwrap();
        assert_eq!(target_hint(&settings), Some(Hint::Primary));
        let mut settings =
            ClientSettings::from_startup(&[("options".into(), "-c pgway.target=nowhere".into())]);
        assert!(default_target(&mut settings).is_err());
    }
}
