//! The fault schedule and each fault.
//!
//! Every kind runs at least once per minute of the run (at least once in total), in a
//! shuffled order per round. A fault is counted only once it really happened (a
//! backend terminated, the server restarted, the replica killed and back), so the
//! report's counts are facts, not intentions.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventgate::cluster::Cluster;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::gateway::Replica;
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
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::ListenerKill,
        Kind::PoolKill,
        Kind::PgRestart,
        Kind::GatewayKill,
        Kind::SubscriberStall,
        Kind::ReconnectBurst,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::ListenerKill => "listener_kill",
            Kind::PoolKill => "pool_kill",
            Kind::PgRestart => "pg_restart",
            Kind::GatewayKill => "gateway_kill",
            Kind::SubscriberStall => "subscriber_stall",
            Kind::ReconnectBurst => "reconnect_burst",
        }
    }
}

/// When each fault happens, as offsets from the start of the write phase: `rounds`
/// shuffled rounds of every kind, evenly spread between 4 s and 6 s before the end.
pub fn schedule(duration: Duration, seed: u64) -> Vec<(Duration, Kind)> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let rounds = (duration.as_secs() / 60).max(1) as usize;
    let n = rounds * Kind::ALL.len();
    let first = 4.0_f64.min(duration.as_secs_f64() / 4.0);
    let last = (duration.as_secs_f64() - 6.0).max(first + n as f64 * 0.5);
    let step = (last - first) / n as f64;
    let mut kinds = Vec::with_capacity(n);
    for _ in 0..rounds {
        let mut round = Kind::ALL.to_vec();
        rng.shuffle(&mut round);
        kinds.extend(round);
    }
    kinds
        .into_iter()
        .enumerate()
        .map(|(i, kind)| (Duration::from_secs_f64(first + step * i as f64), kind))
        .collect()
}

/// What the faults act on.
pub struct Context {
    pub cluster: Arc<Cluster>,
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
            let cluster = ctx.cluster.clone();
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
    }
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
