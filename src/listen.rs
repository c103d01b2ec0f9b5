//! The one LISTEN connection of a gateway.
//!
//! A dedicated connection (not from the pool: a pooled connection would be recycled and
//! lose its LISTEN) driven with `poll_message`, so notifications are read as they come.
//! When it drops, it reconnects with backoff, re-LISTENs, and only then sweeps every job
//! that has subscribers: anything committed while it was down is read from the table.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::backoff::Backoff;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::status::StatusFeed;

/// Channel of event hints, payload `<job_id>:<max_seq>`.
pub const EVENTS_CHANNEL: &str = "agent_job_events";
/// Channel of job status changes, payload `<job_id>:<status>`.
pub const STATUS_CHANNEL: &str = "agent_job_status";

/// How often the LISTEN session is pinged (`SELECT 1`), and how long a ping may take
/// before the session is taken for dead, dropped and replaced (then swept). A session
/// that went silent without a close (a blackholed network, a stalled proxy) is noticed
/// within `PING_EVERY + PING_TIMEOUT` = 10 s, whatever TCP thinks; meanwhile the
/// counter poll, on the pool, keeps delivering.
///
/// The ping is also the cheap check of whether the database takes writes: a server in
/// recovery (a demoted primary, a standby) or with `default_transaction_read_only` on
/// answers `true` (a full disk does not show here: the worker meets it on its INSERT).
pub const PING_EVERY: Duration = Duration::from_secs(5);
pub const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// The ping: `t` when the server refuses writes.
const PING: &str = "SELECT pg_is_in_recovery() OR current_setting('transaction_read_only')::bool";

/// Whether the LISTEN connection is up, and whether its server refused writes at the
/// last ping; read by `/readyz`.
#[derive(Debug, Default, Clone)]
pub struct Readiness {
    up: Arc<AtomicBool>,
    read_only: Arc<AtomicBool>,
}

impl Readiness {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// The database refuses writes (read-only or in recovery): the gateway still
    /// serves what exists, but workers cannot add to it.
    pub fn is_read_only(&self) -> bool {
        self.read_only.load(Ordering::Relaxed)
    }

    fn set(&self, up: bool) {
        self.up.store(up, Ordering::Relaxed)
    }

    fn set_read_only(&self, read_only: bool, metrics: &Metrics) {
        metrics.database_read_only.set(i64::from(read_only));
        if self.read_only.swap(read_only, Ordering::Relaxed) != read_only {
            if read_only {
                tracing::warn!("the database refuses writes (read-only); serving what exists");
            } else {
                tracing::info!("the database accepts writes again");
            }
        }
    }
}

/// Runs the listener until `shutdown` is cancelled.
pub async fn run(
    url: String,
    hub: Hub,
    feed: StatusFeed,
    ready: Readiness,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::gateway();
    let mut first = true;
    loop {
        tokio::select! {
            result = session(&url, &hub, &feed, &ready, &metrics, first) => {
                ready.set(false);
                // The server may have failed over: rings are not trusted until checked.
                hub.suspect();
                match result {
                    Ok(()) => tracing::warn!("listen connection closed; reconnecting"),
                    Err(e) => tracing::warn!(error = %e, "listen connection failed; reconnecting"),
                }
            }
            _ = shutdown.cancelled() => {
                ready.set(false);
                return;
            }
        }
        first = false;
        tokio::select! {
            _ = tokio::time::sleep(backoff.next()) => {}
            _ = shutdown.cancelled() => return,
        }
        if ready.is_up() {
            backoff.reset();
        }
    }
}

/// One connection's life: connect, LISTEN, sweep, then dispatch notifications until
/// the connection ends.
async fn session(
    url: &str,
    hub: &Hub,
    feed: &StatusFeed,
    ready: &Readiness,
    metrics: &Metrics,
    first: bool,
) -> Result<(), crate::Error> {
    let mut config = crate::db::config(url)?;
    // Named apart from the pool (`<name>-listen`), so an operator (or the soak's faults)
    // can tell the one LISTEN session in pg_stat_activity, whatever it last ran.
    let name = format!(
        "{}-listen",
        config.get_application_name().unwrap_or("eventgate")
    );
    config.application_name(&name);
    let (client, mut connection) = config.connect(NoTls).await?;
    let (msg_tx, mut msg_rx) = tokio::sync::mpsc::unbounded_channel();
    // The connection is driven here, not on a task of its own, so this function sees it
    // end. Messages go through a channel so the client can run LISTEN meanwhile.
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    let drive = async move {
        while let Some(message) = messages.next().await {
            match message {
                Ok(message) => {
                    if msg_tx.send(message).is_err() {
                        break;
                    }
                }
                Err(e) => return Err(crate::Error::from(e)),
            }
        }
        Ok(())
    };
    let setup = async {
        client
            .batch_execute(&format!(
                "LISTEN {EVENTS_CHANNEL}; LISTEN {STATUS_CHANNEL};"
            ))
            .await?;
        ready.set(true);
        if !first {
            metrics.listener_reconnects.inc();
        }
        tracing::info!("listening for notifications");
        // Only now, with LISTEN in place, can nothing slip between the sweep and the
        // next notification.
        hub.sweep();
        feed.sweep();
        while let Some(message) = msg_rx.recv().await {
            if let AsyncMessage::Notification(n) = message {
                dispatch(hub, feed, metrics, n.channel(), n.payload());
            }
        }
        Ok::<(), crate::Error>(())
    };
    let ping = async {
        let mut ticker = tokio::time::interval(PING_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // The first tick is at once: whether the new server takes writes.
            ticker.tick().await;
            match tokio::time::timeout(PING_TIMEOUT, client.simple_query(PING)).await {
                Ok(Ok(messages)) => {
                    let read_only = messages.iter().any(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0) == Some("t"),
                        _ => false,
                    });
                    ready.set_read_only(read_only, metrics);
                }
                Ok(Err(e)) => return Err(crate::Error::from(e)),
                Err(_) => {
                    metrics.listener_silent.inc();
                    return Err(crate::Error::db(format!(
                        "listen connection silent: no answer to a ping in {PING_TIMEOUT:?}"
                    )));
                }
            }
        }
    };
    tokio::select! {
        r = drive => r,
        r = setup => r,
        r = ping => r,
    }
}

fn dispatch(hub: &Hub, feed: &StatusFeed, metrics: &Metrics, channel: &str, payload: &str) {
    metrics.notifications.inc();
    let Some((id, rest)) = payload.split_once(':') else {
        tracing::debug!(channel, payload, "ignoring malformed notification");
        return;
    };
    let Ok(id) = id.parse::<Uuid>() else {
        tracing::debug!(channel, payload, "ignoring malformed notification");
        return;
    };
    match channel {
        EVENTS_CHANNEL => hub.wake(id, rest.parse().unwrap_or(i64::MAX)),
        STATUS_CHANNEL => feed.changed(id),
        _ => {}
    }
}
