//! Runs a script's steps against one endpoint (PostgreSQL itself or pgway) and writes the
//! transcript: per step the client and what it ran, then what came back (`transcript.rs`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt, TryStreamExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_postgres::types::{Format, IsNull, Kind, ToSql, Type};
use tokio_postgres::{Client, NoTls, Statement};

use super::script::{Action, Step};
use super::tap::{Shared, Tap};
use super::transcript::{format_messages, show_value, RowFormat};

/// How long one step may take before the client is given up (a wait, not an assertion:
/// pgway's `pool.wait_timeout` is 2 s, and no script step takes more than half a second
/// on PostgreSQL). A client given up runs none of its later steps (they would only wait
/// again), until the script closes it.
const STEP_TIMEOUT: Duration = Duration::from_secs(6);
/// How long to wait for the ReadyForQuery that ends a step after tokio-postgres returned
/// (it comes right after the reply; a client that does not get it is given up).
const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the clients connect, and with which passwords.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub port: u16,
    pub database: String,
}

/// The password each user logs in with (the same for PostgreSQL and pgway).
pub fn password(user: &str) -> &'static str {
    match user {
        "app" => super::APP_PASSWORD,
        "md5user" => super::MD5_PASSWORD,
        _ => super::POSTGRES_PASSWORD,
    }
}

/// A text-format parameter of any type: what a script writes after `-- extended`.
#[derive(Debug)]
struct TextParam(Option<String>);

impl ToSql for TextParam {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match &self.0 {
            Some(s) => {
                out.extend_from_slice(s.as_bytes());
                Ok(IsNull::No)
            }
            None => Ok(IsNull::Yes),
        }
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }

    fn encode_format(&self, _ty: &Type) -> Format {
        Format::Text
    }

    tokio_postgres::types::to_sql_checked!();
}

/// "No type given": the server infers the parameter's type, as for a literal.
fn unspecified() -> Type {
    Type::new("unspecified".into(), 0, Kind::Simple, "pg_catalog".into())
}

struct Conn {
    client: Client,
    tap: Arc<Shared>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct ClientSlot {
    user: Option<String>,
    startup: Vec<(String, String)>,
    conn: Option<Conn>,
    statements: HashMap<String, Statement>,
    /// The ParameterStatus values this client has seen.
    params: BTreeMap<String, String>,
    /// A step got no answer within [`STEP_TIMEOUT`]; the client was given up.
    given_up: bool,
}

/// Runs `steps` against `endpoint`; returns the transcript lines (not yet normalized).
pub async fn run(endpoint: &Endpoint, steps: &[Step]) -> Vec<String> {
    let mut clients: BTreeMap<String, ClientSlot> = BTreeMap::new();
    let mut out = Vec::new();
    for step in steps {
        let slot = clients.entry(step.client.clone()).or_default();
        let who = &step.client;
        match &step.action {
            Action::LoginAs(user) => slot.user = Some(user.clone()),
            Action::Startup(k, v) => slot.startup.push((k.clone(), v.clone())),
            Action::Closes => {
                out.push(format!("[{who}] closes"));
                close(slot).await;
                slot.user = None;
                slot.startup.clear();
                slot.given_up = false;
            }
            action if slot.given_up => {
                out.push(heading(who, action));
                out.push("  (not run: the client was given up)".into());
            }
            action => {
                if slot.conn.is_none() {
                    connect(endpoint, who, slot, &mut out).await;
                }
                out.push(heading(who, action));
                if slot.conn.is_none() {
                    out.push("  (not connected)".into());
                    continue;
                }
                run_action(slot, action, &mut out).await;
            }
        }
    }
    for slot in clients.values_mut() {
        close(slot).await;
    }
    out
}

fn heading(who: &str, action: &Action) -> String {
    let params = |p: &[Option<String>]| {
        if p.is_empty() {
            return String::new();
        }
        let shown: Vec<String> = p.iter().map(|v| show_value(v.as_deref())).collect();
        format!("; params: {}", shown.join(", "))
    };
    let text = match action {
        Action::Simple(sql) => sql.clone(),
        Action::Extended(sql, p) => format!("(extended{}) {sql}", params(p)),
        Action::Prepare(name, sql) => format!("(prepare {name}) {sql}"),
        Action::Execute(name, p) => format!("(execute {name}{})", params(p)),
        Action::CloseStatement(name) => format!("(close {name})"),
        Action::CopyIn(sql, data) => {
            let mut s = format!("(copy in) {sql}");
            for l in data {
                s.push_str(&format!("\n  data: {}", show_value(Some(l))));
            }
            s
        }
        Action::CopyOut(sql) => format!("(copy out) {sql}"),
        Action::LoginAs(_) | Action::Startup(..) | Action::Closes => unreachable!(),
    };
    let mut lines = text.lines();
    let mut s = format!("[{who}] {}", lines.next().unwrap_or_default());
    for l in lines {
        s.push_str(&format!("\n[{who}]   {l}"));
    }
    s
}

async fn connect(endpoint: &Endpoint, who: &str, slot: &mut ClientSlot, out: &mut Vec<String>) {
    let user = slot.user.clone().unwrap_or_else(|| "app".into());
    let startup: Vec<String> = slot
        .startup
        .iter()
        .map(|(k, v)| format!("{k}={v:?}"))
        .collect();
    out.push(format!(
        "[{who}] connects as {user}{}",
        if startup.is_empty() {
            String::new()
        } else {
            format!(" with {}", startup.join(", "))
        }
    ));
    let stream = match TcpStream::connect(("127.0.0.1", endpoint.port)).await {
        Ok(s) => s,
        Err(e) => {
            out.push(format!("  could not connect: {e}"));
            return;
        }
    };
    let (tap, shared) = Tap::new(stream, slot.startup.clone());
    let mut config = tokio_postgres::Config::new();
    config
        .user(&user)
        .password(password(&user))
        .dbname(&endpoint.database)
        .ssl_mode(tokio_postgres::config::SslMode::Disable);
    let result = tokio::time::timeout(STEP_TIMEOUT, config.connect_raw(tap, NoTls)).await;
    let msgs = shared
        .log
        .lock()
        .expect("tap log")
        .take_through_last_ready();
    slot.params.clear();
    // The startup parameters are all "changes": the client had none before.
    format_messages(&msgs, RowFormat::Text, &mut slot.params, out);
    match result {
        Ok(Ok((client, connection))) => {
            let task = tokio::spawn(async move {
                let _ = connection.await;
            });
            slot.conn = Some(Conn {
                client,
                tap: shared,
                task,
            });
        }
        Ok(Err(e)) => {
            if e.as_db_error().is_none() {
                out.push(format!("  client error: {e}"));
            }
        }
        Err(_) => out.push(format!("  no answer to the login within {STEP_TIMEOUT:?}")),
    }
}

async fn close(slot: &mut ClientSlot) {
    slot.statements.clear();
    if let Some(conn) = slot.conn.take() {
        drop(conn.client);
        // The connection sends Terminate and ends once the client is gone.
        if tokio::time::timeout(READY_TIMEOUT, conn.task)
            .await
            .is_err()
        {
            eprintln!("warning: a connection did not end within {READY_TIMEOUT:?} of Terminate");
        }
    }
    slot.params.clear();
}

/// What a step did on the client side, besides the messages the tap saw.
enum Outcome {
    /// tokio-postgres returned; the ReadyForQuery count that ends the step, and its error.
    Done(usize, Option<tokio_postgres::Error>),
    /// No answer within [`STEP_TIMEOUT`].
    TimedOut,
}

async fn run_action(slot: &mut ClientSlot, action: &Action, out: &mut Vec<String>) {
    if let Action::Execute(name, _) | Action::CloseStatement(name) = action {
        if !slot.statements.contains_key(name) {
            // Its Parse failed, or it was prepared on a connection that is gone.
            out.push(format!("  (no statement {name} on this connection)"));
            return;
        }
    }
    let (outcome, format) = {
        let ClientSlot {
            conn, statements, ..
        } = &mut *slot;
        let conn = conn.as_ref().expect("connected");
        let client = &conn.client;
        let ready_before = conn.tap.log.lock().expect("tap log").ready_count;
        let mut format = RowFormat::Binary(Vec::new());
        let fut = step(client, statements, action, &mut format);
        let outcome = match tokio::time::timeout(STEP_TIMEOUT, fut).await {
            Ok((expected, error)) => Outcome::Done(ready_before + expected, error),
            Err(_) => Outcome::TimedOut,
        };
        (outcome, format)
    };
    let conn = slot.conn.as_ref().expect("connected");
    match outcome {
        Outcome::Done(target, error) => {
            let ready = conn
                .tap
                .wait_for(READY_TIMEOUT, |log| log.ready_count >= target)
                .await;
            let msgs = {
                let mut log = conn.tap.log.lock().expect("tap log");
                if ready {
                    log.take_through_last_ready()
                } else {
                    // An incomplete reply: show all of it.
                    std::mem::take(&mut log.messages)
                }
            };
            format_messages(&msgs, format, &mut slot.params, out);
            if let Some(e) = error.filter(|e| e.as_db_error().is_none()) {
                out.push(format!("  client error: {e}"));
            }
            if !ready && !conn.client.is_closed() {
                out.push(format!(
                    "  no ReadyForQuery within {READY_TIMEOUT:?} of the reply; the client gives up"
                ));
                let conn = slot.conn.take().expect("connected");
                conn.task.abort();
                slot.statements.clear();
                slot.given_up = true;
            } else if conn.client.is_closed() {
                out.push("  connection closed".into());
                let conn = slot.conn.take().expect("connected");
                conn.task.abort();
                slot.statements.clear();
            }
        }
        Outcome::TimedOut => {
            let msgs = std::mem::take(&mut conn.tap.log.lock().expect("tap log").messages);
            format_messages(&msgs, format, &mut slot.params, out);
            out.push(format!(
                "  no answer within {STEP_TIMEOUT:?}; the client gives up"
            ));
            let conn = slot.conn.take().expect("connected");
            conn.task.abort();
            slot.statements.clear();
            slot.given_up = true;
        }
    }
}

/// Runs one step; returns how many ReadyForQuery messages it causes, and the error
/// tokio-postgres returned, if any.
async fn step(
    client: &Client,
    statements: &mut HashMap<String, Statement>,
    action: &Action,
    format: &mut RowFormat,
) -> (usize, Option<tokio_postgres::Error>) {
    match action {
        Action::Simple(sql) => {
            *format = RowFormat::Text;
            (1, client.simple_query(sql).await.err())
        }
        Action::Extended(sql, params) => {
            let params: Vec<(TextParam, Type)> = params
                .iter()
                .map(|p| (TextParam(p.clone()), unspecified()))
                .collect();
            let result = async {
                let rows = client
                    .query_typed_raw(
                        sql,
                        params.iter().map(|(p, t)| (p as &dyn ToSql, t.clone())),
                    )
                    .await?;
                rows.try_collect::<Vec<_>>().await
            }
            .await;
            (1, result.err())
        }
        Action::Prepare(name, sql) => match client.prepare(sql).await {
            Ok(stmt) => {
                statements.insert(name.clone(), stmt);
                (1, None)
            }
            Err(e) => (1, Some(e)),
        },
        Action::Execute(name, params) => {
            let Some(stmt) = statements.get(name) else {
                // Its Parse failed, or it was prepared on a connection that is gone.
                return (0, None);
            };
            *format = RowFormat::Binary(stmt.columns().iter().map(|c| c.type_().oid()).collect());
            let params: Vec<TextParam> = params.iter().map(|p| TextParam(p.clone())).collect();
            let result = async {
                let rows = client
                    .query_raw(stmt, params.iter().map(|p| p as &dyn ToSql))
                    .await?;
                rows.try_collect::<Vec<_>>().await
            }
            .await;
            // A parameter count tokio-postgres refuses is not sent at all.
            let sent = !matches!(&result, Err(e) if e.as_db_error().is_none() && !e.is_closed());
            (usize::from(sent), result.err())
        }
        Action::CloseStatement(name) => match statements.remove(name) {
            // Dropping the last handle sends Close and Sync.
            Some(stmt) => {
                drop(stmt);
                (1, None)
            }
            None => (0, None),
        },
        Action::CopyIn(sql, data) => {
            // Prepare, copy, and the Close of the statement: three ReadyForQuery.
            let stmt = match client.prepare(sql).await {
                Ok(s) => s,
                Err(e) => return (1, Some(e)),
            };
            let result = async {
                let sink = client.copy_in::<_, bytes::Bytes>(&stmt).await?;
                let mut sink = std::pin::pin!(sink);
                for line in data {
                    sink.send(bytes::Bytes::from(format!("{line}\n"))).await?;
                }
                sink.as_mut().finish().await
            }
            .await;
            drop(stmt);
            (3, result.err())
        }
        Action::CopyOut(sql) => {
            let stmt = match client.prepare(sql).await {
                Ok(s) => s,
                Err(e) => return (1, Some(e)),
            };
            let result = async {
                let stream = client.copy_out(&stmt).await?;
                let mut stream = std::pin::pin!(stream);
                while let Some(chunk) = stream.next().await {
                    chunk?;
                }
                Ok::<_, tokio_postgres::Error>(())
            }
            .await;
            drop(stmt);
            (3, result.err())
        }
        Action::LoginAs(_) | Action::Startup(..) | Action::Closes => unreachable!(),
    }
}
