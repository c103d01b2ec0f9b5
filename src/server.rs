//! The gateway process: accept loop, background tasks and graceful shutdown.
//!
//! [`run`] owns everything it starts. Each background task gets the shutdown signal and
//! is awaited before `run` returns, so tests can start and stop gateways at will.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::conn;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::http::App;
use crate::hub::{Hub, KEEP_ALIVE_GROUPS};
use crate::listen::{self, Readiness};
use crate::metrics::Metrics;
use crate::status::StatusFeed;

/// How often idle jobs are looked for.
const JANITOR_INTERVAL: Duration = Duration::from_secs(5);

/// Backlog of the listening socket: a reconnect storm of thousands of clients must
/// queue, not overflow (the kernel caps it at `net.core.somaxconn`).
pub const LISTEN_BACKLOG: u32 = 4096;

/// Descriptors kept back from client connections: the pool, the LISTEN connection,
/// the spare (below), a 503 being written, and files and sockets the process opens now
/// and then. The connection cap is lowered to the process's descriptor limit minus
/// these, so the gateway sheds with 503 before `accept` can fail, and its own
/// PostgreSQL connections are never the ones starved.
const RESERVED_DESCRIPTORS: u64 = 64;

/// How often a run of failed accepts is logged (with how many there were).
const ACCEPT_ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// The process's limit on open descriptors (`ulimit -n`), if it can be read.
fn descriptor_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    (ok && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

/// The connection cap: the configured one, lowered to fit the descriptor limit.
fn connection_cap(config: &Config) -> usize {
    let Some(limit) = descriptor_limit() else {
        return config.max_connections;
    };
    let reserved = RESERVED_DESCRIPTORS + config.pool_size as u64;
    let fits = limit.saturating_sub(reserved).max(1) as usize;
    if fits < config.max_connections {
        tracing::info!(
            max_connections = fits,
            configured = config.max_connections,
            descriptor_limit = limit,
            "connection cap lowered to fit the descriptor limit"
        );
    }
    fits.min(config.max_connections)
}

/// What the accept loop does when `accept` fails: out of descriptors (EMFILE/ENFILE)
/// it gives up a spare descriptor kept for the purpose, accepts the waiting client,
/// answers 503 with `Retry-After` (or just closes) and takes the spare back, so the
/// queue drains instead of the loop spinning on a listener that stays readable. Each
/// failure is counted; the log says so once per `ACCEPT_ERROR_LOG_EVERY`.
struct AcceptErrors {
    spare: Option<std::fs::File>,
    unlogged: u64,
    last_log: Option<tokio::time::Instant>,
    metrics: Arc<Metrics>,
}

impl AcceptErrors {
    fn new(metrics: Arc<Metrics>) -> AcceptErrors {
        AcceptErrors {
            spare: std::fs::File::open("/dev/null").ok(),
            unlogged: 0,
            last_log: None,
            metrics,
        }
    }

    async fn handle(
        &mut self,
        listener: &TcpListener,
        error: std::io::Error,
        retry_ms: u64,
        tls: bool,
    ) {
        self.metrics.accept_errors.inc();
        self.unlogged += 1;
        let now = tokio::time::Instant::now();
        if self
            .last_log
            .map_or(true, |at| now.duration_since(at) >= ACCEPT_ERROR_LOG_EVERY)
        {
            tracing::warn!(error = %error, failures = self.unlogged,
                "accept failed; shedding new connections until descriptors free up");
            self.unlogged = 0;
            self.last_log = Some(now);
        }
        let out_of_descriptors = matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
        if out_of_descriptors && self.spare.take().is_some() {
            // One descriptor free: take the waiting client and tell it to come back.
            if let Ok(Ok((stream, _))) =
                tokio::time::timeout(Duration::from_millis(10), listener.accept()).await
            {
                // Over TLS a plain 503 is noise to the client: just close.
                if !tls {
                    shed(stream, retry_ms);
                }
            }
            self.spare = std::fs::File::open("/dev/null").ok();
        } else {
            // Another failure, or no spare to give: wait instead of spinning.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Answers 503 in one non-blocking write and closes: nothing is held for the client.
fn shed(stream: tokio::net::TcpStream, retry_ms: u64) {
    let secs = retry_ms.div_ceil(1000).max(1);
    let body = r#"{"error":"too_many_connections","message":"the gateway is out of descriptors, retry later"}"#;
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: {secs}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.try_write(response.as_bytes());
}

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
    let tls = match &config.tls {
        Some(files) => Some(Arc::new(crate::tls::Tls::load(files.clone())?)),
        None => None,
    };
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::default());
    let pool = crate::db::pool(&config.database_url, config.pool_size)?;
    let hub = Hub::new(pool.clone(), config.hub.clone(), metrics.clone());
    // The one signal type of every task and body. `drain` first: streams end, each
    // connection finishes its response in flight and closes, the hub stops. `stop`
    // once the connections are gone: the background tasks end.
    let drain = CancellationToken::new();
    let stop = CancellationToken::new();
    let (feed, feed_task) = StatusFeed::start(pool.clone(), drain.clone());
    let ready = Readiness::default();

    let listener_task = tokio::spawn(listen::run(
        config.database_url.clone(),
        hub.clone(),
        feed.clone(),
        ready.clone(),
        metrics.clone(),
        stop.clone(),
    ));
    let ticker_task = tokio::spawn(tick(
        hub.clone(),
        feed.clone(),
        config.keep_alive,
        stop.clone(),
    ));
    let listening = ready.clone();
    hub.start_counter_poll(config.counter_poll, move || listening.is_up());

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
        send_timeout: config.send_timeout,
        tls: tls.clone(),
    });
    // The handler is installed here, before the first connection: from now on a
    // SIGHUP reloads the certificate instead of ending the process.
    let reload_task = match tls {
        Some(tls) => {
            let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                .map_err(|e| crate::Error::config(format!("cannot handle SIGHUP: {e}")))?;
            Some(tokio::spawn(reload_on_sighup(tls, hangup, stop.clone())))
        }
        None => None,
    };
    // Every connection holds a permit of `limit` until it ends, and is a task of
    // `connections`, so that the drain can wait for it and abort it at the deadline.
    let limit = Arc::new(Semaphore::new(connection_cap(&config)));
    let mut accept_errors = AcceptErrors::new(metrics.clone());
    let mut connections = JoinSet::new();

    let scheme = if shared.tls.is_some() {
        "https"
    } else {
        "http"
    };
    tracing::info!(addr = %listener.local_addr()?, scheme, "gateway listening");
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    let tls = shared.tls.is_some();
                    accept_errors.handle(&listener, e, config.retry_ms, tls).await;
                    continue;
                }
            },
            // Reap finished connections, so the set holds only open ones.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            metrics.connections_refused.inc();
            // A 503 over TLS would cost a handshake: an HTTPS client is just closed.
            if shared.tls.is_none() {
                connections.spawn(conn::refuse(stream, config.retry_ms));
            }
            continue;
        };
        let open = Open::new(metrics.clone(), permit);
        // Not an async block around it: that would hold the arguments twice, and the
        // task's state lives as long as the connection.
        let serving = conn::serve(stream, peer, shared.clone(), drain.clone());
        connections.spawn(serving.map(move |()| drop(open)));
    }

    tracing::info!("shutting down: draining connections");
    drop(listener);
    // Streams end themselves on this; then idle keep-alive connections close.
    hub.shutdown();
    drain.cancel();
    let all_closed = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(config.shutdown_grace, all_closed)
        .await
        .is_err()
    {
        tracing::warn!(
            left = connections.len(),
            "drain deadline of {:?} passed; closing what is left",
            config.shutdown_grace
        );
        // Dropping a connection's task closes its socket.
        connections.shutdown().await;
    }
    stop.cancel();
    hub.stopped().await;
    if let Some(task) = reload_task {
        if let Err(e) = task.await {
            tracing::error!(task = "tls reload", error = %e, "background task failed");
        }
    }
    for (name, task) in [
        ("listener", listener_task),
        ("ticker", ticker_task),
        ("status feed", feed_task),
    ] {
        if let Err(e) = task.await {
            tracing::error!(task = name, error = %e, "background task failed");
        }
    }
    tracing::info!("gateway stopped");
    Ok(())
}

/// Re-reads the certificate and key on each SIGHUP; open connections keep theirs.
async fn reload_on_sighup(
    tls: Arc<crate::tls::Tls>,
    mut hangup: tokio::signal::unix::Signal,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            Some(()) = hangup.recv() => match tls.reload() {
                Ok(()) => tracing::info!(cert = %tls.files().cert.display(), "tls certificate reloaded"),
                Err(e) => tracing::error!(error = %e, "tls reload failed; keeping the certificate in use"),
            },
            _ = stop.cancelled() => return,
        }
    }
}

/// Keep-alives for every stream, and dropping idle jobs, on one timer each.
///
/// The keep-alive timer ticks `KEEP_ALIVE_GROUPS` times per interval and each tick
/// reaches one group of jobs: every stream still gets one keep-alive per interval, but
/// a process holding 19,000 streams writes about 1,200 of them at a time, not all at
/// once (a burst of both runtime threads every interval; see docs/performance.md,
/// "Past one process's descriptor limit").
async fn tick(hub: Hub, feed: StatusFeed, keep_alive: Duration, stop: CancellationToken) {
    let tick = keep_alive / KEEP_ALIVE_GROUPS as u32;
    let mut keep_alive = tokio::time::interval(tick.max(Duration::from_millis(1)));
    keep_alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    keep_alive.tick().await;
    let mut group = 0;
    let mut janitor = tokio::time::interval(JANITOR_INTERVAL);
    loop {
        tokio::select! {
            _ = keep_alive.tick() => {
                hub.keep_alive(group);
                // The job-list stream's once a round, a whole interval after the start.
                if group == KEEP_ALIVE_GROUPS - 1 {
                    feed.keep_alive();
                }
                group = (group + 1) % KEEP_ALIVE_GROUPS;
            }
            _ = janitor.tick() => hub.drop_idle(),
            _ = stop.cancelled() => return,
        }
    }
}

/// An open connection: counted in `eventgate_connections` and holding its place under
/// the connection limit until it is dropped (when it ends or is aborted).
struct Open {
    metrics: Arc<Metrics>,
    _permit: OwnedSemaphorePermit,
}

impl Open {
    fn new(metrics: Arc<Metrics>, permit: OwnedSemaphorePermit) -> Open {
        metrics.connections.inc();
        Open {
            metrics,
            _permit: permit,
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.metrics.connections.dec();
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
