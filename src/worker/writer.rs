//! The database side: one connection, batches out of the buffer, retries, and the
//! job's status.
//!
//! A batch is ONE `INSERT ... SELECT FROM unnest(...)` statement over arrays sent in
//! NOTIFY per batch. A batch goes when `max_batch` bytes are waiting or `linger` after
//! its first line, but never sooner than `1 / max_statements_per_sec` after the
//! previous statement started.
//!
//! Connection errors are retried with capped exponential backoff (the buffer meanwhile
//! drops its oldest output once full, and says so): while the command runs, forever;
//! once it has exited, until the drain timeout, so that a database gone for good
//! cannot keep the worker from exiting with the command's code. Each event gets its id
//! here, so after an error that leaves it unknown whether the statement committed, a
//! look-up of the first id tells, and nothing is stored twice.
//!
//! A failover can also take back what WAS acknowledged (asynchronous replication: the
//! promoted standby never got the last commits). So the batches acknowledged in the
//! last [`RESEND_WINDOW`] are kept, and after every reconnect their first ids are
//! looked up on whatever server we reached: the missing ones are stored again, in
//! their order, before anything new. With synchronous replication none is missing.
//!
//! A database that refuses writes (read-only after a demotion or
//! `default_transaction_read_only`, a full disk) is waited out like an unreachable
//! one: the output stays in the bounded buffer (which then drops its oldest, and
//! counts it), a log line says so, and once writes go through again a `notice` event
//! (`payload.notice = "writes_refused"`) says for how long they were refused.

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Json;
use tokio_postgres::{Client, NoTls};
use uuid::Uuid;

use super::batch::{Batcher, Event, Kind};
use super::buffer::{Buffer, Stream};
use super::{Labels, Settings};
use crate::backoff::Backoff;
use crate::db::is_connection_error;
use crate::store;
use crate::Error;

/// Attempts at a batch that fails for a reason other than the connection (a constraint,
/// a deleted job) before it is given up and reported.
const QUERY_ATTEMPTS: u32 = 3;
/// Wait after such a failure, times the failures so far.
const QUERY_RETRY: Duration = Duration::from_millis(100);

/// How long an acknowledged batch is kept to be stored again if a failover lost it:
/// longer than any replication lag we mean to survive.
pub const RESEND_WINDOW: Duration = Duration::from_secs(30);
/// Most bytes of acknowledged batches kept for that (the oldest go first).
const RESEND_BYTES: usize = 16 * 1024 * 1024;

/// The type of `agent_job_events.level` as SQL spells it: `text` on eventgate's own
/// table, the enum `agentjobeventlevel` on the original system's.
const LEVEL_TYPE: &str = "SELECT format_type(atttypid, atttypmod) FROM pg_attribute \
     WHERE attrelid = 'agent_job_events'::regclass AND attname = 'level'";

/// One batch: the rows' columns as arrays, in binary, in order. The level goes as text
/// and is cast to the column's type (`level_type`, from [`LEVEL_TYPE`]).
///
/// Measured against the `jsonb_populate_recordset` of one JSON document it replaced
/// (docs/worker.md, "Ingest figures"): a flood's rows are up to 64 KiB of text full of
/// newlines, which JSON escapes and the server had to parse and unescape again.
fn insert_sql(level_type: &str) -> String {
    format!(
        "INSERT INTO agent_job_events (id, job_id, level, message, payload) \
         SELECT r.id, $1, r.level::{level_type}, r.message, r.payload \
         FROM unnest($2::uuid[], $3::text[], $4::text[], $5::jsonb[]) \
             WITH ORDINALITY AS r(id, level, message, payload, n) ORDER BY r.n"
    )
}

/// One connection to the database, remade when lost.
pub struct Sink {
    config: tokio_postgres::Config,
    job: Uuid,
    client: Option<Client>,
    /// The batch INSERT for this connection's database (see [`insert_sql`]).
    insert: String,
    backoff: Backoff,
    buffer: Arc<Buffer>,
    down_since: Option<Instant>,
    /// Once set (when the command has exited), connection errors after this instant
    /// are given up instead of retried.
    give_up_at: Arc<OnceLock<Instant>>,
    /// Batches acknowledged within [`RESEND_WINDOW`], oldest first, and their bytes.
    recent: VecDeque<Sent>,
    recent_bytes: usize,
    /// Set when the connection was lost: check `recent` on the next one.
    check_recent: bool,
    /// Since when, and why, the database refuses writes.
    refused: Option<(Instant, String)>,
    /// The id of the notice that writes go through again, fixed once the refusal
    /// began, so it is stored once even if the connection breaks around it.
    notice_id: Option<Uuid>,
    /// Batches stored again after a failover lost them (for the tests and the log).
    pub resent: u64,
}

/// An acknowledged batch, as it was sent.
struct Sent {
    at: Instant,
    first_id: Uuid,
    rows: Rows,
    bytes: usize,
}

impl Sink {
    pub fn new(config: tokio_postgres::Config, job: Uuid, buffer: Arc<Buffer>) -> Sink {
        Sink {
            config,
            job,
            client: None,
            insert: String::new(),
            backoff: Backoff::worker(),
            buffer,
            down_since: None,
            give_up_at: Arc::new(OnceLock::new()),
            recent: VecDeque::new(),
            recent_bytes: 0,
            check_recent: false,
            refused: None,
            notice_id: None,
            resent: 0,
        }
    }

    /// Where to set the instant after which an unreachable database is given up.
    pub fn give_up_at(&self) -> Arc<OnceLock<Instant>> {
        self.give_up_at.clone()
    }

    fn given_up(&self, e: &tokio_postgres::Error) -> Option<Error> {
        let deadline = self.give_up_at.get()?;
        (Instant::now() >= *deadline)
            .then(|| Error::db(format!("database unreachable, gave up: {e}")))
    }

    /// The connection and the batch INSERT that fits its database.
    async fn connection(&mut self) -> Result<(&Client, &str), tokio_postgres::Error> {
        if self.client.is_none() || self.insert.is_empty() {
            let client = self.client().await?;
            let level_type: String = client.query_one(LEVEL_TYPE, &[]).await?.get(0);
            self.insert = insert_sql(&level_type);
        }
        let client = self.client.as_ref().expect("connected above");
        Ok((client, self.insert.as_str()))
    }

    async fn client(&mut self) -> Result<&mut Client, tokio_postgres::Error> {
        if self.client.is_none() {
            let (client, connection) = self.config.connect(NoTls).await?;
            // The task ends when the client is dropped or the connection breaks; the
            // next query then fails with a connection error and we reconnect.
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "worker connection ended");
                }
            });
            self.client = Some(client);
        }
        Ok(self.client.as_mut().expect("connected above"))
    }

    /// After a connection error or a refused write: forget the connection (with
    /// several hosts, the next one may find the new primary) and wait before the next
    /// try. The buffer keeps the output meanwhile.
    async fn lost(&mut self, e: &tokio_postgres::Error) {
        self.client = None;
        self.check_recent = true;
        if is_refusal(e) {
            if self.refused.is_none() {
                tracing::warn!(
                    error = %e,
                    "database refuses writes (read-only or full); keeping output in the \
                     buffer (its oldest is dropped, and counted, once it is full) and retrying"
                );
                let reason = e
                    .as_db_error()
                    .map_or_else(|| e.to_string(), |d| d.message().into());
                self.refused = Some((Instant::now(), reason));
            }
        } else if self.down_since.is_none() {
            tracing::warn!(error = %e, "database unreachable, retrying");
        }
        if self.down_since.is_none() {
            self.down_since = Some(Instant::now());
            self.buffer.set_outage(true);
        }
        tokio::time::sleep(self.backoff.next()).await;
    }

    fn recovered(&mut self) {
        self.backoff.reset();
        if let Some(since) = self.down_since.take() {
            tracing::info!(after = ?since.elapsed(), "database reachable again");
            self.buffer.set_outage(false);
        }
    }

    /// Before the first write on a new connection: the notice that writes go through
    /// again (if they were refused), then every recent batch the server does not have.
    async fn catch_up(&mut self) -> Result<(), tokio_postgres::Error> {
        let job = self.job;
        if let Some((since, reason)) = self.refused.clone() {
            let id = *self.notice_id.get_or_insert_with(Uuid::now_v7);
            let refused_for = since.elapsed();
            let (client, insert) = self.connection().await?;
            let stored = client
                .query_opt("SELECT 1 FROM agent_job_events WHERE id = $1", &[&id])
                .await?;
            if stored.is_none() {
                let secs = (refused_for.as_secs_f64() * 10.0).round() / 10.0;
                let notice = Rows::one(
                    id,
                    "warn",
                    format!(
                        "the database refused writes for {secs} s ({reason}); \
                         output was kept in the worker's buffer meanwhile"
                    ),
                    json!({"kind": "notice", "notice": "writes_refused", "refusedSeconds": secs}),
                );
                execute(client, insert, job, &notice).await?;
            }
            tracing::info!(
                refused_for = ?refused_for,
                "database accepts writes again"
            );
            self.refused = None;
            self.notice_id = None;
        }
        if !self.check_recent || self.recent.is_empty() {
            self.check_recent = false;
            return Ok(());
        }
        let ids: Vec<Uuid> = self.recent.iter().map(|s| s.first_id).collect();
        self.connection().await?;
        // The fields, not `connection()`: `recent` is read while they are in use.
        let client = self.client.as_ref().expect("connected above");
        let insert = self.insert.as_str();
        let found: std::collections::HashSet<Uuid> = client
            .query(
                "SELECT id FROM agent_job_events WHERE id = ANY($1)",
                &[&ids],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut resent = 0;
        for sent in self.recent.iter().filter(|s| !found.contains(&s.first_id)) {
            execute(client, insert, job, &sent.rows).await?;
            resent += 1;
        }
        if resent > 0 {
            tracing::warn!(
                batches = resent,
                "acknowledged batches were missing after a reconnect (a failover lost \
                 them); stored again"
            );
            self.resent += resent;
        }
        self.check_recent = false;
        Ok(())
    }

    /// Keeps an acknowledged batch for [`RESEND_WINDOW`] (and at most
    /// [`RESEND_BYTES`] of them).
    fn remember(&mut self, first_id: Uuid, rows: Rows) {
        let now = Instant::now();
        let bytes = rows.bytes();
        self.recent.push_back(Sent {
            at: now,
            first_id,
            rows,
            bytes,
        });
        self.recent_bytes += bytes;
        while let Some(oldest) = self.recent.front() {
            if now.duration_since(oldest.at) <= RESEND_WINDOW && self.recent_bytes <= RESEND_BYTES {
                break;
            }
            self.recent_bytes -= oldest.bytes;
            self.recent.pop_front();
        }
    }

    /// Marks the job running (creating it first if asked). Connection errors are
    /// retried until `give_up_at`.
    pub async fn start(
        &mut self,
        create: bool,
        name: &str,
        give_up_at: Instant,
    ) -> Result<(), Error> {
        let job = self.job;
        loop {
            let attempt = async {
                let client = self.client().await?;
                if create {
                    // On either schema (the original's required columns get defaults).
                    let created =
                        store::create_job(&*client, Some(job), name, "queued", &json!({})).await;
                    match created {
                        Ok(_) => {}
                        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {}
                        Err(e) => return Err(e),
                    }
                }
                store::set_job_status(&*client, job, "running").await
            };
            match attempt.await {
                Ok(false) => {
                    return Err(Error::config(format!(
                        "job {job} does not exist (pass --create to create it)"
                    )))
                }
                Ok(true) => {
                    self.recovered();
                    return Ok(());
                }
                Err(e) if is_retryable(&e) && Instant::now() < give_up_at => self.lost(&e).await,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Stores `rows` in one statement, retrying until it is stored exactly once.
    pub async fn insert(&mut self, rows: &Rows) -> Result<(), Error> {
        let job = self.job;
        let mut maybe_stored = false;
        let mut failures = 0;
        loop {
            let attempt = async {
                self.catch_up().await?;
                let (client, insert) = self.connection().await?;
                if maybe_stored {
                    let stored = client
                        .query_opt(
                            "SELECT 1 FROM agent_job_events WHERE id = $1",
                            &[&rows.ids[0]],
                        )
                        .await?;
                    if stored.is_some() {
                        return Ok(());
                    }
                }
                execute(client, insert, job, rows).await
            };
            match attempt.await {
                Ok(()) => {
                    self.recovered();
                    self.remember(rows.ids[0], rows.clone());
                    return Ok(());
                }
                Err(e) if is_retryable(&e) => {
                    if let Some(gave_up) = self.given_up(&e) {
                        return Err(gave_up);
                    }
                    // A refused statement did not commit; a broken connection may have.
                    maybe_stored |= !is_refusal(&e);
                    self.lost(&e).await;
                }
                Err(e) => {
                    failures += 1;
                    if failures >= QUERY_ATTEMPTS {
                        return Err(e.into());
                    }
                    tracing::warn!(error = %e, "insert failed, retrying");
                    tokio::time::sleep(QUERY_RETRY * failures).await;
                }
            }
        }
    }

    /// Records the final status, with `detail` merged into its status event.
    /// Idempotent, so retried on connection errors until it is stored.
    pub async fn finish(&mut self, status: &str, detail: &Value) -> Result<(), Error> {
        let job = self.job;
        let detail = detail.to_string();
        loop {
            let attempt = async {
                self.catch_up().await?;
                let client = self.client().await?;
                let tx = client.transaction().await?;
                tx.execute(
                    "SELECT set_config('eventgate.status_detail', $1, true)",
                    &[&detail],
                )
                .await?;
                store::set_job_status(&tx, job, status).await?;
                tx.commit().await
            };
            match attempt.await {
                Ok(()) => {
                    self.recovered();
                    return Ok(());
                }
                Err(e) if is_retryable(&e) => {
                    if let Some(gave_up) = self.given_up(&e) {
                        return Err(gave_up);
                    }
                    self.lost(&e).await
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Whether the database refused to write (read-only, disk full, out of resources):
/// nothing was stored, and it may pass later, so it is waited out.
fn is_refusal(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        Some(code) => *code == SqlState::READ_ONLY_SQL_TRANSACTION || code.code().starts_with("53"),
        None => false,
    }
}

/// Connection errors and refusals: retried (until the drain timeout, once the command
/// has exited).
fn is_retryable(e: &tokio_postgres::Error) -> bool {
    is_connection_error(e) || is_refusal(e)
}

/// Stores `rows` for `job` with `insert` (from [`insert_sql`]), in one statement.
async fn execute(
    client: &Client,
    insert: &str,
    job: Uuid,
    rows: &Rows,
) -> Result<(), tokio_postgres::Error> {
    let payloads: Vec<Json<&Value>> = rows.payloads.iter().map(Json).collect();
    client
        .execute(
            insert,
            &[&job, &rows.ids, &rows.levels, &rows.messages, &payloads],
        )
        .await
        .map(drop)
}

/// A batch as the columns of the INSERT.
#[derive(Debug, Default, Clone)]
pub struct Rows {
    ids: Vec<Uuid>,
    levels: Vec<&'static str>,
    messages: Vec<String>,
    payloads: Vec<Value>,
    /// Lines in the batch (for the count of what could not be stored).
    pub lines: u64,
}

impl Rows {
    pub fn new(events: Vec<Event>, labels: &Labels, stderr_level: &'static str) -> Rows {
        let mut rows = Rows::default();
        for event in events {
            let (stream, level) = match event.kind {
                Kind::Log(Stream::Stdout) => (Stream::Stdout, "info"),
                Kind::Log(Stream::Stderr) => (Stream::Stderr, stderr_level),
                Kind::Dropped(_) | Kind::Truncated(_) => (Stream::Stderr, "warn"),
            };
            let mut payload = Map::new();
            if let Kind::Truncated(limit) = event.kind {
                // A viewer shows it as a banner, not as a line of the command's.
                payload.insert("kind".into(), json!("notice"));
                payload.insert("notice".into(), json!("truncated"));
                payload.insert("maxLogBytes".into(), json!(limit));
            } else {
                payload.insert("kind".into(), json!("log"));
                payload.insert("stream".into(), json!(stream.as_str()));
            }
            if let Some(stage) = &labels.stage {
                payload.insert("stage".into(), json!(stage));
            }
            if let Some(step_id) = &labels.step_id {
                payload.insert("stepId".into(), json!(step_id));
            }
            if let Some(step_index) = labels.step_index {
                payload.insert("stepIndex".into(), json!(step_index));
            }
            payload.insert("lines".into(), json!(event.lines));
            if let Kind::Dropped(dropped) = event.kind {
                payload.insert(
                    "dropped".into(),
                    json!({"lines": dropped.lines, "bytes": dropped.bytes}),
                );
            } else if let Kind::Log(_) = event.kind {
                rows.lines += event.lines as u64;
            }
            // Time-ordered (UUIDv7, monotonic within this process): ids sort as seqs.
            rows.ids.push(Uuid::now_v7());
            rows.levels.push(level);
            let mut message = event.text;
            if message.ends_with('\n') {
                message.pop();
            }
            rows.messages.push(message);
            rows.payloads.push(Value::Object(payload));
        }
        rows
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// A batch of one row (the worker's own notices).
    fn one(id: Uuid, level: &'static str, message: String, payload: Value) -> Rows {
        Rows {
            ids: vec![id],
            levels: vec![level],
            messages: vec![message],
            payloads: vec![payload],
            lines: 0,
        }
    }

    /// About what the batch weighs in memory (for the bound on what is kept to resend).
    fn bytes(&self) -> usize {
        self.messages.iter().map(String::len).sum::<usize>() + 64 * self.ids.len()
    }
}

/// What the write loop did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Written {
    pub statements: u64,
    pub rows: u64,
    pub lines: u64,
    /// Lines of batches given up after [`QUERY_ATTEMPTS`] non-connection errors.
    pub unstored_lines: u64,
}

/// Moves everything from the buffer to the database until every reader is done and
/// the buffer is empty. Returns the sink for the final status.
pub async fn write_loop(
    mut sink: Sink,
    buffer: Arc<Buffer>,
    settings: Settings,
    labels: Labels,
) -> (Sink, Written) {
    let min_interval = if settings.max_statements_per_sec > 0.0 {
        Duration::from_secs_f64(1.0 / settings.max_statements_per_sec)
    } else {
        Duration::ZERO
    };
    let stderr_level = settings.stderr_level.as_str();
    let mut batcher = Batcher::new(settings.max_event_bytes);
    let mut written = Written::default();
    let mut last_statement: Option<Instant> = None;
    loop {
        // Wait for the first line of the next batch (or the end).
        buffer.wait_for(1, None).await;
        if buffer.is_finished() {
            break;
        }
        let now = Instant::now();
        let earliest = last_statement.map_or(now, |at| at + min_interval);
        // Give it `linger` to fill up, unless a full batch is waiting.
        buffer
            .wait_for(
                settings.max_batch_bytes,
                Some((now + settings.linger).max(earliest)),
            )
            .await;
        tokio::time::sleep_until(earliest).await;
        let taken = buffer.take(settings.max_batch_bytes);
        if !taken.dropped.is_empty() {
            batcher.push_dropped(taken.dropped);
        }
        for chunk in &taken.chunks {
            batcher.push(chunk);
        }
        if let Some(limit) = taken.truncated {
            batcher.push_truncated(limit);
        }
        let rows = Rows::new(batcher.take(), &labels, stderr_level);
        if rows.is_empty() {
            continue;
        }
        // The cap counts from each statement's start, so a statement that itself takes
        // longer than the interval (a flood's 8 MiB batch) is followed at once: counted
        // from its end, every big statement left the database idle for the interval.
        let started = Instant::now();
        match sink.insert(&rows).await {
            Ok(()) => {
                written.statements += 1;
                written.rows += rows.ids.len() as u64;
                written.lines += rows.lines;
            }
            Err(e) => {
                written.unstored_lines += rows.lines;
                tracing::error!(error = %e, lines = rows.lines, "could not store output");
            }
        }
        last_statement = Some(started);
    }
    (sink, written)
}
