//! PostgreSQL access shared by every command: the pool, connection settings and the
//! migrations of `sql/`.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

use crate::Error;

/// Migrations, in order. Each is applied once, in its own transaction, and recorded in
/// `eventgate_migrations`; every file is also written to be safe to run again.
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
];

/// Key of the advisory lock that serializes concurrent `migrate` runs.
const MIGRATE_LOCK_KEY: i64 = 0x6576_656e_7467_6174; // "eventgat"

/// TCP keepalive idle time on every connection, so a dead peer is noticed in about a
/// minute even when nothing is being sent (the LISTEN connection is mostly silent).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(20);

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
        .connect_timeout(CONNECT_TIMEOUT);
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
pub async fn migrate(url: &str) -> Result<Vec<String>, Error> {
    let mut client = connect(url).await?;
    client
        .batch_execute("SET client_min_messages = warning")
        .await?;
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS eventgate_migrations (
                 name text PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await
        .or_else(ignore_concurrent_create)?;
    let mut applied = Vec::new();
    for (name, sql) in MIGRATIONS {
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK_KEY])
            .await?;
        let done = tx
            .query_opt(
                "SELECT 1 FROM eventgate_migrations WHERE name = $1",
                &[name],
            )
            .await?
            .is_some();
        if !done {
            tx.batch_execute(sql).await?;
            tx.execute(
                "INSERT INTO eventgate_migrations (name) VALUES ($1)",
                &[name],
            )
            .await?;
            applied.push(name.to_string());
        }
        tx.commit().await?;
    }
    Ok(applied)
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
