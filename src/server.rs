//! The gateway process: accept loop, background tasks and graceful shutdown.
//!
//! [`run`] owns everything it starts. Each background task gets the shutdown signal and
//! is awaited before `run` returns, so tests can start and stop gateways at will.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::conn;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::config::Config;
use crate::http::App;
use crate::hub::Hub;
use crate::listen::{self, Readiness};
use crate::metrics::Metrics;
use crate::status::StatusFeed;

/// How often idle jobs are looked for.
const JANITOR_INTERVAL: Duration = Duration::from_secs(5);

/// Backlog of the listening socket: a reconnect storm of thousands of clients must
/// queue, not overflow (the kernel caps it at `net.core.somaxconn`).
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds a listening socket with `LISTEN_BACKLOG` (tokio's `bind` uses 1024).
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Runs a gateway on `listener` until `shutdown` completes, then drains: streams are
/// told to come back later and end, and connections get `shutdown_grace` to finish.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), crate::Error> {
    let addr = listener.local_addr()?;
    if !config.auth.is_on() {
        if !addr.ip().is_loopback() && !config.insecure_no_auth {
            return Err(crate::Error::config(format!(
                "refusing to serve {addr} without auth: set EVENTGATE_JWT_SECRET, \
                 listen on loopback, or pass --insecure-no-auth"
            )));
        }
        tracing::warn!(%addr, "auth is off: anyone who can reach this address reads every job");
    }
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::default());
    let pool = crate::db::pool(&config.database_url, config.pool_size)?;
    let hub = Hub::new(pool.clone(), config.hub.clone(), metrics.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    let (feed, feed_task) = StatusFeed::start(pool.clone(), stop_rx.clone());
    let ready = Readiness::default();

    let listener_task = tokio::spawn(listen::run(
        config.database_url.clone(),
        hub.clone(),
        feed.clone(),
        ready.clone(),
        stop_rx.clone(),
    ));
    let ticker_task = tokio::spawn(tick(
        hub.clone(),
        feed.clone(),
        config.keep_alive,
        stop_rx.clone(),
    ));

    let poll_task = tokio::spawn(poll_counters(
        hub.clone(),
        config.counter_poll,
        stop_rx.clone(),
    ));

    let app = Arc::new(App::new(
        config.clone(),
        pool,
        hub.clone(),
        feed.clone(),
        ready,
        metrics.clone(),
    ));

    // HTTP/1.1 and h2c (prior knowledge), chosen per connection by `conn::serve`. Not
    // hyper-util's auto builder: it reads the first bytes into a buffer of its own and
    // replays them, which makes hyper grow every connection's read buffer to 16 KiB.
    let mut http1 = http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_timeout)
        .keep_alive(true);
    let mut http2 = http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(20)));
    let shared = Arc::new(conn::Shared {
        app,
        http1,
        http2,
        header_timeout: config.header_timeout,
    });
    // Turns true when the gateway drains: each connection finishes its response in
    // flight and closes. Every connection holds a permit of `connections` until it ends,
    // so getting all of them back means every connection is gone.
    let (drain_tx, drain_rx) = watch::channel(false);
    let connections = Arc::new(Semaphore::new(config.max_connections));

    tracing::info!(addr = %listener.local_addr()?, "gateway listening");
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            metrics.connections_refused.inc();
            tokio::spawn(conn::refuse(stream, config.retry_ms));
            continue;
        };
        metrics.connections.inc();
        let (shared, drain, metrics) = (shared.clone(), drain_rx.clone(), metrics.clone());
        tokio::spawn(async move {
            conn::serve(stream, peer, shared, drain).await;
            metrics.connections.dec();
            drop(permit);
        });
    }

    tracing::info!("shutting down: draining connections");
    drop(listener);
    // Streams end themselves on this; then idle keep-alive connections close.
    hub.shutdown();
    feed.shutdown();
    let _ = drain_tx.send(true);
    let all = u32::try_from(config.max_connections).unwrap_or(u32::MAX);
    let drained = tokio::time::timeout(config.shutdown_grace, connections.acquire_many(all)).await;
    if drained.is_err() {
        tracing::warn!(
            "drain deadline of {:?} passed; closing what is left",
            config.shutdown_grace
        );
    }
    let _ = stop_tx.send(true);
    for (name, task) in [
        ("listener", listener_task),
        ("ticker", ticker_task),
        ("counter poll", poll_task),
        ("status feed", feed_task),
    ] {
        if let Err(e) = task.await {
            tracing::error!(task = name, error = %e, "background task failed");
        }
    }
    tracing::info!("gateway stopped");
    Ok(())
}

/// Keep-alives for every stream, and dropping idle jobs, on one timer each.
async fn tick(
    hub: Hub,
    feed: StatusFeed,
    keep_alive: Duration,
    mut stop_rx: watch::Receiver<bool>,
) {
    let mut keep_alive = tokio::time::interval(keep_alive);
    keep_alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    keep_alive.tick().await;
    let mut janitor = tokio::time::interval(JANITOR_INTERVAL);
    loop {
        tokio::select! {
            _ = keep_alive.tick() => {
                hub.keep_alive();
                feed.keep_alive();
            }
            _ = janitor.tick() => hub.drop_idle(),
            _ = stop_rx.wait_for(|stop| *stop) => return,
        }
    }
}

/// The counter poll: delivers events whose notification was debounced or suppressed,
/// within `interval`.
async fn poll_counters(hub: Hub, interval: Duration, mut stop_rx: watch::Receiver<bool>) {
    if interval.is_zero() {
        return;
    }
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop_rx.wait_for(|stop| *stop) => return,
        }
        match hub.poll_counters().await {
            Ok(()) => failing = false,
            Err(e) => {
                // Log once per outage, not 40 times a second.
                if !failing {
                    tracing::warn!(error = %e, "counter poll failed; retrying");
                }
                failing = true;
            }
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => futures::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
