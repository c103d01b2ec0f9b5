//! PostgreSQL access shared by every command: the pool, connection settings and the
//! migrations of `sql/`.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

use crate::Error;

/// Migrations, in order. Each is applied once and recorded in `eventgate_migrations`;
/// every file is also written to be safe to run again. Consecutive pending files run in
/// ONE transaction (so a database never shows the triggers of one file without the
/// columns of the next); a file whose first line is `-- no-transaction` runs step by
/// step (`-- step` lines between them) outside any transaction, after every job's
/// events are numbered.
pub const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_jobs_and_events.sql",
        include_str!("../sql/0001_jobs_and_events.sql"),
    ),
    (
        "0002_debounced_notify.sql",
        include_str!("../sql/0002_debounced_notify.sql"),
    ),
    (
        "0003_cheaper_notify_check.sql",
        include_str!("../sql/0003_cheaper_notify_check.sql"),
    ),
    (
        "0004_lines_ids_and_adoption.sql",
        include_str!("../sql/0004_lines_ids_and_adoption.sql"),
    ),
    (
        "0005_seq_index_and_checks.sql",
        include_str!("../sql/0005_seq_index_and_checks.sql"),
    ),
    (
        "0006_adaptive_notify.sql",
        include_str!("../sql/0006_adaptive_notify.sql"),
    ),
    (
        "0007_cheaper_write_path.sql",
        include_str!("../sql/0007_cheaper_write_path.sql"),
    ),
    (
        "0008_two_notify_slots.sql",
        include_str!("../sql/0008_two_notify_slots.sql"),
    ),
];

/// The first line of a migration that runs outside a transaction.
const NO_TRANSACTION: &str = "-- no-transaction";

/// The line between the steps of such a migration.
const STEP: &str = "\n-- step\n";

/// How long a migration statement waits for a lock before it gives up and is tried
/// again: a waiting `ALTER TABLE` would hold up every writer queued behind it.
const LOCK_TIMEOUT: &str = "2s";

/// How often a statement that timed out on a lock is tried again.
const LOCK_ATTEMPTS: u32 = 150;

/// Key of the advisory lock that serializes concurrent `migrate` runs.
const MIGRATE_LOCK_KEY: i64 = 0x6576_656e_7467_6174; // "eventgat"

/// TCP keepalive on every connection, so a peer that vanished (no RST: a cut network,
/// a host powered off) is noticed while nothing is being sent: probes start after
/// `KEEPALIVE_IDLE` of silence, every `KEEPALIVE_INTERVAL`, and `KEEPALIVE_RETRIES`
/// unanswered ones close the socket: at most 20 + 3 x 5 = 35 s.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(20);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_RETRIES: u32 = 3;

/// `TCP_USER_TIMEOUT`: data sent and not acknowledged for this long closes the socket
/// (a query sent into a dead network fails in 20 s instead of the kernel's ~15 min of
/// retransmissions). Linux only; ignored elsewhere.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(20);

/// How long to wait for a TCP connection to PostgreSQL.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Parses a connection string and applies our connection settings.
pub fn config(url: &str) -> Result<tokio_postgres::Config, Error> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|e| Error::config(format!("invalid DATABASE_URL: {e}")))?;
    config
        .keepalives(true)
        .keepalives_idle(KEEPALIVE_IDLE)
        .keepalives_interval(KEEPALIVE_INTERVAL)
        .keepalives_retries(KEEPALIVE_RETRIES)
        .connect_timeout(CONNECT_TIMEOUT);
    #[cfg(target_os = "linux")]
    config.tcp_user_timeout(TCP_USER_TIMEOUT);
    if config.get_application_name().is_none() {
        config.application_name("eventgate");
    }
    Ok(config)
}

/// A pool of `size` connections. Connections are made lazily, so this succeeds while the
/// database is down.
pub fn pool(url: &str, size: usize) -> Result<Pool, Error> {
    let manager = Manager::from_config(
        config(url)?,
        NoTls,
        ManagerConfig {
            // A connection closed under us (restart, pg_terminate_backend) is noticed
            // here and replaced; queries that still race it are retried by callers.
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .wait_timeout(Some(Duration::from_secs(10)))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| Error::config(format!("cannot build pool: {e}")))
}

/// Connects once, outside any pool, driving the connection on a task of its own.
pub async fn connect(url: &str) -> Result<tokio_postgres::Client, Error> {
    let (client, connection) = config(url)?.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "connection ended");
        }
    });
    Ok(client)
}

/// Applies every migration not yet recorded. Safe to run concurrently and repeatedly.
/// Returns the names of the migrations applied by this call.
///
/// First it checks what the database holds ([`shape`]): nothing, eventgate's own
/// tables, or the original system's tables, which are adopted in place. Anything else
/// is refused before a single change is made.
pub async fn migrate(url: &str) -> Result<Vec<String>, Error> {
    let mut client = connect(url).await?;
    client
        .batch_execute("SET client_min_messages = warning")
        .await?;
    // A session lock: the steps below span several transactions.
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATE_LOCK_KEY])
        .await?;
    let result = migrate_locked(&mut client).await;
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATE_LOCK_KEY])
        .await;
    result
}

async fn migrate_locked(client: &mut tokio_postgres::Client) -> Result<Vec<String>, Error> {
    let found = shape(client).await?;
    tracing::info!(shape = ?found, "migrating");
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS eventgate_migrations (
                 name text PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await
        .or_else(ignore_concurrent_create)?;
    client
        .batch_execute(&format!("SET lock_timeout = '{LOCK_TIMEOUT}'"))
        .await?;
    let done: Vec<String> = client
        .query("SELECT name FROM eventgate_migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let pending: Vec<&(&str, &str)> = MIGRATIONS
        .iter()
        .filter(|(name, _)| !done.iter().any(|d| d == name))
        .collect();
    let mut applied = Vec::new();
    let mut rest = &pending[..];
    while let Some(&&(name, sql)) = rest.first() {
        if sql.starts_with(NO_TRANSACTION) {
            number_jobs(client).await?;
            for step in sql.split(STEP) {
                retry_on_lock(|| client.batch_execute(step)).await?;
            }
            client
                .execute(
                    "INSERT INTO eventgate_migrations (name) VALUES ($1)",
                    &[&name],
                )
                .await?;
            applied.push(name.to_string());
            rest = &rest[1..];
            continue;
        }
        let group = rest
            .iter()
            .take_while(|(_, sql)| !sql.starts_with(NO_TRANSACTION))
            .count();
        let mut attempt = 0;
        loop {
            attempt += 1;
            match apply_together(client, &rest[..group]).await {
                Ok(()) => break,
                Err(e) if is_lock_timeout(&e) && attempt < LOCK_ATTEMPTS => {
                    tracing::info!("migration waits for a lock; trying again");
                }
                Err(e) => return Err(e.into()),
            }
        }
        applied.extend(rest[..group].iter().map(|(name, _)| name.to_string()));
        rest = &rest[group..];
    }
    Ok(applied)
}

/// Applies migrations in one transaction.
async fn apply_together(
    client: &mut tokio_postgres::Client,
    migrations: &[&(&str, &str)],
) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    for (name, sql) in migrations {
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO eventgate_migrations (name) VALUES ($1)",
            &[name],
        )
        .await?;
    }
    tx.commit().await
}

/// Numbers the events of every job not numbered yet, one job per transaction, so that
/// each job's row is locked (and its writers wait) only while its own events are
/// numbered. Returns how many jobs it numbered.
pub async fn number_jobs(client: &tokio_postgres::Client) -> Result<u64, Error> {
    let mut numbered = 0;
    loop {
        let rows = client
            .query(
                "SELECT id FROM agent_jobs WHERE last_line IS NULL LIMIT 1000",
                &[],
            )
            .await?;
        if rows.is_empty() {
            return Ok(numbered);
        }
        for row in rows {
            let id: uuid::Uuid = row.get(0);
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
            retry_on_lock(|| client.execute("SELECT eventgate_number_job($1)", &params)).await?;
            numbered += 1;
        }
    }
}

/// Runs `f` again while it fails because a lock was not granted in time (or a
/// deadlock was broken), up to [`LOCK_ATTEMPTS`] times.
async fn retry_on_lock<T, F, Fut>(mut f: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tokio_postgres::Error>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        match f().await {
            Err(e) if is_lock_timeout(&e) && attempt < LOCK_ATTEMPTS => {
                tracing::info!("migration waits for a lock; trying again");
            }
            result => return result.map_err(Error::from),
        }
    }
}

fn is_lock_timeout(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    matches!(e.code(), Some(c) if *c == SqlState::LOCK_NOT_AVAILABLE || *c == SqlState::T_R_DEADLOCK_DETECTED)
}

/// What a database holds where eventgate keeps its tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Neither `agent_jobs` nor `agent_job_events`.
    Empty,
    /// eventgate's own tables (text `status` and `level`, `name`, `seq`).
    Own,
    /// The original system's tables (enum `agentjobstatus` and `agentjobeventlevel`,
    /// `type`, nullable `payload` on events), adopted or not yet.
    Original,
}

/// The job statuses every trigger may write.
const STATUSES: &[&str] = &[
    "queued",
    "running",
    "succeeded",
    "failed",
    "cancelled",
    "dead_letter",
];

/// Reads the catalog (and changes nothing) to tell which [`Shape`] the database holds.
/// Tables of these names in any other shape are an error that says what differs.
pub async fn shape(client: &tokio_postgres::Client) -> Result<Shape, Error> {
    let rows = client
        .query(
            "SELECT c.relname::text, c.relkind::text, a.attname::text, \
                    format_type(a.atttypid, a.atttypmod) \
             FROM pg_class c \
             LEFT JOIN pg_attribute a \
                    ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
             WHERE c.relnamespace = current_schema()::regnamespace \
               AND c.relname IN ('agent_jobs', 'agent_job_events')",
            &[],
        )
        .await?;
    let enums = client
        .query(
            "SELECT t.typname::text, array_agg(e.enumlabel::text ORDER BY e.enumsortorder) \
             FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid \
             WHERE t.typname IN ('agentjobstatus', 'agentjobeventlevel') \
             GROUP BY t.typname",
            &[],
        )
        .await?;
    let columns: Vec<(String, String, Option<String>, Option<String>)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let labels = |name: &str| -> Vec<String> {
        enums
            .iter()
            .find(|r| r.get::<_, String>(0) == name)
            .map(|r| r.get(1))
            .unwrap_or_default()
    };
    classify(
        &columns,
        labels("agentjobstatus"),
        labels("agentjobeventlevel"),
    )
    .map_err(|why| {
        Error::db(format!(
            "refusing to migrate: agent_jobs and agent_job_events are not eventgate's \
             tables nor the original system's ({why}); nothing was changed"
        ))
    })
}

/// The decision of [`shape`] over `(table, relkind, column, type)` rows.
fn classify(
    columns: &[(String, String, Option<String>, Option<String>)],
    status_labels: Vec<String>,
    level_labels: Vec<String>,
) -> Result<Shape, String> {
    let has_table = |t: &str| columns.iter().any(|c| c.0 == t);
    match (has_table("agent_jobs"), has_table("agent_job_events")) {
        (false, false) => return Ok(Shape::Empty),
        (true, false) => return Err("agent_jobs exists without agent_job_events".into()),
        (false, true) => return Err("agent_job_events exists without agent_jobs".into()),
        (true, true) => {}
    }
    if let Some(c) = columns.iter().find(|c| c.1 != "r") {
        return Err(format!("{} is not a plain table", c.0));
    }
    let type_of = |t: &str, col: &str| -> Option<&str> {
        columns
            .iter()
            .find(|c| c.0 == t && c.2.as_deref() == Some(col))
            .and_then(|c| c.3.as_deref())
    };
    let expect = |t: &str, col: &str, want: &str| -> Result<(), String> {
        match type_of(t, col) {
            Some(got) if got == want => Ok(()),
            Some(got) => Err(format!("{t}.{col} is {got}, not {want}")),
            None => Err(format!("{t}.{col} is missing")),
        }
    };
    let optional = |t: &str, col: &str, want: &str| -> Result<(), String> {
        match type_of(t, col) {
            Some(got) if got != want => Err(format!("{t}.{col} is {got}, not {want}")),
            _ => Ok(()),
        }
    };
    const TS: &str = "timestamp with time zone";
    expect("agent_jobs", "id", "uuid")?;
    expect("agent_jobs", "created_at", TS)?;
    expect("agent_jobs", "updated_at", TS)?;
    expect("agent_jobs", "payload", "jsonb")?;
    expect("agent_job_events", "id", "uuid")?;
    expect("agent_job_events", "job_id", "uuid")?;
    expect("agent_job_events", "message", "text")?;
    expect("agent_job_events", "payload", "jsonb")?;
    expect("agent_job_events", "created_at", TS)?;
    optional("agent_jobs", "last_seq", "bigint")?;
    optional("agent_jobs", "last_line", "bigint")?;
    optional("agent_jobs", "notified_at", TS)?;
    optional("agent_job_events", "seq", "bigint")?;
    optional("agent_job_events", "line", "bigint")?;
    match type_of("agent_jobs", "status") {
        Some("text") => {
            expect("agent_jobs", "name", "text")?;
            expect("agent_jobs", "last_seq", "bigint")?;
            expect("agent_job_events", "level", "text")?;
            expect("agent_job_events", "seq", "bigint")?;
            Ok(Shape::Own)
        }
        Some("agentjobstatus") => {
            expect("agent_jobs", "type", "character varying(64)")?;
            expect("agent_job_events", "level", "agentjobeventlevel")?;
            expect("agent_job_events", "updated_at", TS)?;
            if let Some(missing) = STATUSES
                .iter()
                .find(|s| !status_labels.iter().any(|l| l == *s))
            {
                return Err(format!("agentjobstatus has no '{missing}'"));
            }
            if let Some(missing) = ["info", "warn", "error"]
                .iter()
                .find(|s| !level_labels.iter().any(|l| l == *s))
            {
                return Err(format!("agentjobeventlevel has no '{missing}'"));
            }
            Ok(Shape::Original)
        }
        Some(other) => Err(format!("agent_jobs.status is {other}")),
        None => Err("agent_jobs.status is missing".into()),
    }
}

/// Two `CREATE TABLE IF NOT EXISTS` racing can still collide on the type's unique index.
fn ignore_concurrent_create(e: tokio_postgres::Error) -> Result<(), Error> {
    match e.code() {
        Some(code) if *code == tokio_postgres::error::SqlState::UNIQUE_VIOLATION => Ok(()),
        _ => Err(e.into()),
    }
}

/// Hands a pooled connection back unless `result` failed because the connection is
/// gone: a broken connection is dropped instead, so the next caller gets a fresh one
/// rather than the same error.
pub fn release<T>(client: deadpool_postgres::Object, result: &Result<T, tokio_postgres::Error>) {
    if let Err(e) = result {
        if is_connection_error(e) {
            let _ = deadpool_postgres::Object::take(client);
        }
    }
}

/// Whether an error means the connection is gone (so a retry on a fresh one may work),
/// as opposed to an error in the query itself.
pub fn is_connection_error(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        // admin_shutdown, crash_shutdown, cannot_connect_now, connection_* classes.
        Some(code) => {
            let c = code.code();
            c.starts_with("08") || c.starts_with("57P")
        }
        // No SQLSTATE: an I/O or protocol error on the socket.
        None => true,
    }
}
