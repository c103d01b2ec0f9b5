//! The fault schedule and each fault.
//!
//! Every kind runs at least once per minute of the run (at least once in total), in a
//! shuffled order per round. A fault is counted only once it really happened (a
//! backend terminated, the server restarted, the replica killed and back, the standby
//! promoted, the LISTEN session silenced and replaced), so the report's counts are
//! facts, not intentions.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventgate::cluster::Cluster;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::gateway::Replica;
use crate::relay::Relay;
use crate::subscriber::{self, Outcome, Shared, Spec};
use crate::writers::{self, Stats};

/// How long a stalled subscriber stops reading.
pub const STALL: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    ListenerKill,
    PoolKill,
    PgRestart,
    GatewayKill,
    SubscriberStall,
    ReconnectBurst,
    PgFailover,
    PgFailoverAsync,
    Blackhole,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::ListenerKill,
        Kind::PoolKill,
        Kind::PgRestart,
        Kind::GatewayKill,
        Kind::SubscriberStall,
        Kind::ReconnectBurst,
        Kind::PgFailover,
        Kind::PgFailoverAsync,
        Kind::Blackhole,
    ];

    /// The kinds a run injects: every one, `pg_failover_async` only when asked.
    pub fn rotation(with_async: bool) -> Vec<Kind> {
        Kind::ALL
            .into_iter()
            .filter(|k| with_async || *k != Kind::PgFailoverAsync)
            .collect()
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::ListenerKill => "listener_kill",
            Kind::PoolKill => "pool_kill",
            Kind::PgRestart => "pg_restart",
            Kind::GatewayKill => "gateway_kill",
            Kind::SubscriberStall => "subscriber_stall",
            Kind::ReconnectBurst => "reconnect_burst",
            Kind::PgFailover => "pg_failover",
            Kind::PgFailoverAsync => "pg_failover_async",
            Kind::Blackhole => "blackhole",
        }
    }
}

/// When each fault happens, as offsets from the start of the write phase: `rounds`
/// shuffled rounds of every kind, evenly spread between 4 s and 6 s before the end.
pub fn schedule(duration: Duration, seed: u64, kinds: &[Kind]) -> Vec<(Duration, Kind)> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let rounds = (duration.as_secs() / 60).max(1) as usize;
    let n = rounds * kinds.len();
    let first = 4.0_f64.min(duration.as_secs_f64() / 4.0);
    let last = (duration.as_secs_f64() - 6.0).max(first + n as f64 * 0.5);
    let step = (last - first) / n as f64;
    let mut order = Vec::with_capacity(n);
    for _ in 0..rounds {
        let mut round = kinds.to_vec();
        rng.shuffle(&mut round);
        order.extend(round);
    }
    order
        .into_iter()
        .enumerate()
        .map(|(i, kind)| (Duration::from_secs_f64(first + step * i as f64), kind))
        .collect()
}

/// The primary and its synchronous streaming standby. A failover swaps the roles:
/// the standby is promoted, the old primary (killed) is rebuilt as the new standby on
/// its old port, so the multi-host `DATABASE_URL` of every process stays valid and the
/// next failover goes the other way.
pub struct Pair {
    pub clusters: [Arc<Cluster>; 2],
    pub primary: usize,
    pub failovers: u64,
}

impl Pair {
    pub fn primary(&self) -> Arc<Cluster> {
        self.clusters[self.primary].clone()
    }

    pub fn standby(&self) -> Arc<Cluster> {
        self.clusters[1 - self.primary].clone()
    }
}

/// What the faults act on.
pub struct Context {
    /// Held for the whole of a restart or a failover: they never overlap.
    pub pair: Arc<tokio::sync::Mutex<Pair>>,
    /// Multi-host (`target_session_attrs=read-write`): always reaches the primary.
    pub url: String,
    pub replicas: Arc<tokio::sync::Mutex<Vec<Replica>>>,
    pub shared: Arc<Shared>,
    /// Jobs that run until the end: where burst clients resume.
    pub jobs: Arc<Vec<Uuid>>,
    /// Persistent subscribers that may be stalled, with their job.
    pub stall_targets: Vec<(usize, Uuid)>,
    pub burst: usize,
    pub seed: u64,
    pub stats: Arc<Stats>,
    pub commits: Arc<writers::Commits>,
    pub injected: Mutex<BTreeMap<&'static str, u64>>,
    pub failed: Mutex<Vec<String>>,
    pub burst_clients: Mutex<Vec<JoinHandle<Outcome>>>,
    pub floods: Mutex<Vec<JoinHandle<u64>>>,
    /// Between replica `b` and each server of the pair.
    pub relays: Vec<Relay>,
    /// Seconds from silencing the LISTEN session to the gateway noticing, per blackhole.
    pub noticed: Mutex<Vec<f64>>,
    /// Seconds from `kill -9` of the primary until both gateways were ready again, per
    /// failover.
    pub failover_ready: Mutex<Vec<f64>>,
    /// Per asynchronous failover, µs since the epoch: from replication turned
    /// asynchronous to the promote done. Only an acknowledgement inside one may be lost.
    pub async_windows: Mutex<Vec<(u64, u64)>>,
    /// Per asynchronous failover: events (all jobs) the old primary had and the
    /// promoted standby did not, as counted on both just before and after.
    pub async_lost: Mutex<Vec<i64>>,
}

impl Context {
    fn elapsed(&self) -> f64 {
        self.shared.start.elapsed().as_secs_f64()
    }
}

/// Runs the schedule; each fault on a task of its own at its time (they may overlap
/// when one takes long, as real failures do). Returns when all have finished.
pub async fn run(
    ctx: Arc<Context>,
    plan: Vec<(Duration, Kind)>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let began = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for (i, (at, kind)) in plan.into_iter().enumerate() {
        tokio::time::sleep_until(began + at).await;
        if *stop.borrow() {
            break;
        }
        let ctx = ctx.clone();
        tasks.push(tokio::spawn(async move {
            *ctx.shared.last_fault.lock().expect("lock") = kind.name();
            let t = ctx.elapsed();
            let result = inject(&ctx, kind, i as u64).await;
            match result {
                Ok(detail) => {
                    eprintln!("[{t:6.1}s] {:<16} {detail}", kind.name());
                    *ctx.injected
                        .lock()
                        .expect("lock")
                        .entry(kind.name())
                        .or_default() += 1;
                }
                Err(e) => {
                    eprintln!("[{t:6.1}s] {:<16} FAILED: {e}", kind.name());
                    ctx.failed
                        .lock()
                        .expect("lock")
                        .push(format!("{}: {e}", kind.name()));
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
}

async fn inject(ctx: &Context, kind: Kind, nth: u64) -> Result<String, String> {
    match kind {
        Kind::ListenerKill => {
            let n = terminate(ctx, "application_name = 'eventgate-listen'").await?;
            if n == 0 {
                return Err("no LISTEN backend found".into());
            }
            Ok(format!("terminated {n} LISTEN backend(s)"))
        }
        Kind::PoolKill => {
            let n = terminate(ctx, "application_name = 'eventgate'").await?;
            if n == 0 {
                return Err("no pool backend found".into());
            }
            Ok(format!("terminated {n} pool backend(s)"))
        }
        Kind::PgRestart => {
            let pair = ctx.pair.lock().await;
            let cluster = pair.primary();
            let began = std::time::Instant::now();
            tokio::task::spawn_blocking(move || cluster.restart())
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            Ok(format!(
                "pg_ctl restart -m fast took {:.1}s",
                began.elapsed().as_secs_f64()
            ))
        }
        Kind::GatewayKill => {
            let mut replicas = ctx.replicas.lock().await;
            let i = (nth as usize) % replicas.len();
            let replica = &mut replicas[i];
            replica.scrape().await;
            let pid = replica.pid().ok_or("replica is not running")?;
            replica.kill().await;
            let down = Duration::from_millis(500 + fastrand::u64(..1_500));
            tokio::time::sleep(down).await;
            let began = std::time::Instant::now();
            replica.start().await?;
            Ok(format!(
                "kill -9 {} (pid {pid}), down {:.1}s, ready again in {:.1}s",
                replica.name,
                down.as_secs_f64(),
                began.elapsed().as_secs_f64()
            ))
        }
        Kind::SubscriberStall => {
            if ctx.stall_targets.is_empty() {
                return Err("no subscriber to stall".into());
            }
            let (index, job) = ctx.stall_targets[nth as usize % ctx.stall_targets.len()];
            ctx.shared.stall(index, STALL);
            let flood = writers::flood(
                ctx.url.clone(),
                job,
                STALL,
                ctx.stats.clone(),
                ctx.commits.clone(),
            );
            let shared = ctx.shared.clone();
            let flood = tokio::spawn(async move {
                let n = flood.await;
                let t = shared.start.elapsed().as_secs_f64();
                eprintln!("[{t:6.1}s] subscriber_stall flood of job {job} ended: {n} statements");
                n
            });
            ctx.floods.lock().expect("lock").push(flood);
            Ok(format!(
                "subscriber {index} stops reading for {}s while its job is flooded",
                STALL.as_secs()
            ))
        }
        Kind::ReconnectBurst => burst(ctx, nth).await,
        Kind::PgFailover => failover(ctx, false).await,
        Kind::PgFailoverAsync => failover(ctx, true).await,
        Kind::Blackhole => blackhole(ctx).await,
    }
}

/// `kill -9` of the primary, `pg_ctl promote` of the synchronous standby, then the old
/// primary rebuilt as the new one's standby. While no standby is attached, commits
/// wait (`synchronous_standby_names = '*'`): nothing is acknowledged that only one
/// server has.
///
/// `asynchronous`: first the primary stops waiting for the standby
/// (`synchronous_standby_names = ''`) and the standby is stopped for `ASYNC_LAG`, so
/// the primary acknowledges commits the standby never gets; then the same `kill -9`,
/// the standby started again and promoted without them, and synchronous replication
/// restored on it. Writers saw those commits acknowledged; the gateways must send
/// `reset` to whoever saw them.
async fn failover(ctx: &Context, asynchronous: bool) -> Result<String, String> {
    let mut pair = ctx.pair.lock().await;
    let (old, new) = (pair.primary(), pair.standby());
    let mut lost = None;
    let mut window_from = 0;
    if asynchronous {
        ctx.shared.async_failover_since.fetch_min(
            ctx.shared.start.elapsed().as_millis() as u64,
            Ordering::SeqCst,
        );
        window_from = crate::subscriber::now_us();
        let (o, n) = (old.clone(), new.clone());
        tokio::task::spawn_blocking(move || {
            o.configure("synchronous_standby_names = ''")?;
            n.stop()
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("asynchronous, standby stopped: {e}"))?;
        tokio::time::sleep(ASYNC_LAG).await;
        lost = Some(events_on(&old.url()).await?);
    }
    // Ready again means: a new LISTEN session (the old one died with the primary).
    let mut reconnects = Vec::new();
    for &addr in &ctx.shared.replicas {
        reconnects.push(metric(addr, "eventgate_listener_reconnects_total").await);
    }
    let began = std::time::Instant::now();
    let (o, n) = (old.clone(), new.clone());
    tokio::task::spawn_blocking(move || {
        o.kill9()?;
        if asynchronous {
            n.resume()?;
        }
        n.promote()?;
        // The promoted standby waits for a standby again (it has the setting from
        // its base backup; said again so it holds whatever the old primary had).
        n.configure("synchronous_standby_names = '*'")
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("kill -9 and promote: {e}"))?;
    let promoted = began.elapsed();
    let mut lost_note = String::new();
    if let Some(before) = lost {
        ctx.async_windows
            .lock()
            .expect("lock")
            .push((window_from, crate::subscriber::now_us()));
        let after = events_on(&new.url()).await?;
        let n = (before - after).max(0);
        ctx.async_lost.lock().expect("lock").push(n);
        lost_note = format!(
            " (asynchronous, standby stopped {:.1}s: the old primary had {before} events, \
             the promoted standby {after}: at least {n} lost)",
            ASYNC_LAG.as_secs_f64()
        );
    }
    pair.primary = 1 - pair.primary;
    pair.failovers += 1;
    // The gateways find the new primary while the new standby is being made (commits
    // wait for that; reads and streams do not).
    let (o, n) = (old.clone(), new.clone());
    let rebuild = async {
        // Up to three tries: on this loaded machine the rebuilt server's first start
        // has failed once (its log went with the cluster), the next one starts.
        let mut tries = 0;
        loop {
            tries += 1;
            let (o, n) = (o.clone(), n.clone());
            match tokio::task::spawn_blocking(move || o.rebuild_as_standby_of(&n))
                .await
                .map_err(|e| e.to_string())?
            {
                Ok(()) => break,
                Err(e) if tries < 3 => {
                    let t = ctx.elapsed();
                    eprintln!("[{t:6.1}s] rebuild of the standby failed, again in 1 s: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(format!("rebuild the standby ({tries} tries): {e}")),
            }
        }
        Ok::<_, String>(began.elapsed())
    };
    let gateways = async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut ready = Vec::new();
        for (&addr, before) in ctx.shared.replicas.iter().zip(&reconnects) {
            loop {
                // A replica restarted meanwhile (gateway_kill) starts its counter at 0.
                let now = metric(addr, "eventgate_listener_reconnects_total").await;
                let reconnected = match (now, before) {
                    (Some(now), Some(before)) => now != *before,
                    _ => false,
                };
                if reconnected && matches!(crate::sse::get(addr, "/readyz").await, Ok((200, _))) {
                    ready.push(began.elapsed());
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    return Err(format!("gateway {addr} not ready 60 s after the failover"));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(ready)
    };
    let (rebuilt, ready) = tokio::join!(rebuild, gateways);
    if rebuilt.is_err() {
        // With no standby every commit would wait for one forever, and the soak would
        // hang instead of finishing and reporting this failure: let writes through.
        let n = new.clone();
        let _ = tokio::task::spawn_blocking(move || n.configure("synchronous_standby_names = ''"))
            .await;
    }
    let (rebuilt, ready) = (rebuilt?, ready?);
    let ready = ready.into_iter().max().unwrap_or_default();
    ctx.failover_ready
        .lock()
        .expect("lock")
        .push(ready.as_secs_f64());
    Ok(format!(
        "kill -9 primary :{}, promoted :{} in {:.1}s, new standby :{} in {:.1}s, \
         gateways ready {:.1}s after the kill{lost_note}",
        old.port(),
        new.port(),
        promoted.as_secs_f64(),
        old.port(),
        rebuilt.as_secs_f64(),
        ready.as_secs_f64()
    ))
}

/// How long an asynchronous failover keeps the standby stopped before the `kill -9`:
/// what the primary acknowledges meanwhile is lost.
const ASYNC_LAG: Duration = Duration::from_millis(1_500);

/// Events of all jobs on one server (`sum(last_seq)`), on a direct connection.
async fn events_on(url: &str) -> Result<i64, String> {
    let client = writers::connect(url, "soak-admin")
        .await
        .map_err(|e| format!("connect {url}: {e}"))?;
    let row = client
        .query_one(
            "SELECT coalesce(sum(last_seq), 0)::bigint FROM agent_jobs",
            &[],
        )
        .await
        .map_err(|e| format!("count events: {e}"))?;
    Ok(row.get(0))
}

/// Silences replica `b`'s LISTEN session in its relay (no close) and measures how long
/// the gateway takes to notice (`eventgate_listener_silent_total`); then lets new
/// connections through and waits for the session to be replaced. Meanwhile its
/// subscribers get their events from the counter poll, on the pool.
async fn blackhole(ctx: &Context) -> Result<String, String> {
    let addr = *ctx.shared.replicas.last().ok_or("no replica")?;
    let silent_before = metric(addr, "eventgate_listener_silent_total").await;
    let silenced_before: u64 = ctx
        .relays
        .iter()
        .map(|r| r.silenced.load(Ordering::SeqCst))
        .sum();
    for relay in &ctx.relays {
        relay.blackhole.store(true, Ordering::SeqCst);
    }
    let cut = std::time::Instant::now();
    let deadline = cut + Duration::from_secs(60);
    let heal = |ctx: &Context| {
        for relay in &ctx.relays {
            relay.blackhole.store(false, Ordering::SeqCst);
        }
    };
    // A replica killed meanwhile (gateway_kill) comes back with its counters at 0.
    let mut before = silent_before.unwrap_or(0.0);
    let noticed = loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Some(now) = metric(addr, "eventgate_listener_silent_total").await {
            if now > before {
                break cut.elapsed();
            }
            before = before.min(now);
        }
        if std::time::Instant::now() > deadline {
            heal(ctx);
            return Err("the silent LISTEN session was not noticed in 60 s".into());
        }
    };
    heal(ctx);
    let silenced: u64 = ctx
        .relays
        .iter()
        .map(|r| r.silenced.load(Ordering::SeqCst))
        .sum();
    if silenced == silenced_before {
        return Err("the gateway noticed a silence no relay made".into());
    }
    let replaced = loop {
        if matches!(crate::sse::get(addr, "/readyz").await, Ok((200, _))) {
            break cut.elapsed();
        }
        if std::time::Instant::now() > deadline {
            return Err("no LISTEN session again 60 s after the blackhole".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    ctx.noticed
        .lock()
        .expect("lock")
        .push(noticed.as_secs_f64());
    Ok(format!(
        "LISTEN session of b silenced: noticed after {:.1}s, replaced (ready) after {:.1}s",
        noticed.as_secs_f64(),
        replaced.as_secs_f64()
    ))
}

/// One counter of a replica's `/metrics`, if it answers.
async fn metric(addr: std::net::SocketAddr, name: &str) -> Option<f64> {
    let (status, text) = crate::sse::get(addr, "/metrics").await.ok()?;
    if status != 200 {
        return None;
    }
    text.lines().find_map(|line| {
        let (key, value) = line.rsplit_once(' ')?;
        (key == name).then(|| value.parse().ok())?
    })
}

/// `pg_terminate_backend` of the gateways' backends (the pool is 'eventgate', the LISTEN
/// session 'eventgate-listen')
/// matching `filter`. Returns how many were terminated.
async fn terminate(ctx: &Context, filter: &str) -> Result<u64, String> {
    let client = writers::connect(&ctx.url, "soak-admin")
        .await
        .map_err(|e| format!("admin connection: {e}"))?;
    let sql = format!(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE pid <> pg_backend_pid() AND {filter}"
    );
    let row = client
        .query_one(&sql, &[])
        .await
        .map_err(|e| format!("terminate: {e}"))?;
    Ok(row.get::<_, i64>(0) as u64)
}

/// `burst` clients resume at once, each with a Last-Event-ID a little behind the head
/// of a running job, to a random replica; every persistent subscriber reconnects too.
async fn burst(ctx: &Context, nth: u64) -> Result<String, String> {
    let client = writers::connect(&ctx.url, "soak-admin")
        .await
        .map_err(|e| format!("admin connection: {e}"))?;
    let ids: Vec<Uuid> = ctx.jobs.to_vec();
    let rows = client
        .query(
            "SELECT id, last_seq FROM agent_jobs WHERE id = ANY($1)",
            &[&ids],
        )
        .await
        .map_err(|e| format!("read cursors: {e}"))?;
    let heads: Vec<(Uuid, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    if heads.is_empty() {
        return Err("no running job".into());
    }
    let mut rng = fastrand::Rng::with_seed(ctx.seed ^ (nth + 1).wrapping_mul(0x9e37_79b9));
    let mut handles = Vec::with_capacity(ctx.burst);
    for _ in 0..ctx.burst {
        let (job, head) = heads[rng.usize(..heads.len())];
        let floor = (head - rng.i64(0..=100)).max(0);
        let spec = Spec {
            index: None,
            job,
            slow: false,
            small_buffer: false,
            steady: true,
            floor,
            target: Some(head),
            sabotage: None,
            seed: rng.u64(..),
        };
        handles.push(tokio::spawn(subscriber::run(spec, ctx.shared.clone())));
    }
    let persistent = ctx.shared.stall_until.len();
    ctx.shared.reconnect_all.send_modify(|g| *g += 1);
    let opened_before = ctx.shared.connections.load(Ordering::Relaxed);
    ctx.burst_clients.lock().expect("lock").extend(handles);
    Ok(format!(
        "{} clients resume with Last-Event-ID at once, and {persistent} subscribers reconnect \
         ({opened_before} connections so far)",
        ctx.burst
    ))
}
