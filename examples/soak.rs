//! Fault and load soak: proves that no event is lost, repeated or reordered while
//! PostgreSQL, the gateways and the clients misbehave.
//!
//! `cargo run --release --example soak -- --duration 60`
//!
//! It starts a throwaway PostgreSQL primary with a synchronous streaming standby
//! (`pg_basebackup -R`), two gateway replicas as separate processes of the release
//! binary (each with its own LISTEN connection, on a two-host `DATABASE_URL` with
//! `target_session_attrs=read-write`; replica `b` through a loopback relay that can go
//! silent), plain SQL writers (some
//! holding slow transactions, in every NOTIFY mode) and, when the binary has the
//! worker, `eventgate run` processes; then subscribers that behave like browsers. While
//! they run, faults are injected on a schedule (see `soak/faults.rs`). At the end every
//! job is finished, every subscriber reads to `end`, and what each received is compared
//! with the table. One JSON line and a Markdown table go to stdout; the exit status is
//! non-zero if anything was lost, duplicated, reordered or corrupted, if an event a
//! writer saw acknowledged is not in the final table as written (except what was
//! acknowledged while `pg_failover_async` had made replication asynchronous: that is
//! counted), if a subscriber got `event: reset` before any asynchronous failover (with
//! synchronous replication history never goes back), if a subscriber never reached
//! its end, or if a fault kind was never injected. A subscriber that gets `reset`
//! `{"lastSeq": N}` drops what it holds above N and goes on from N, so its final view
//! must still equal the table exactly.
//!
//! # Layout
//!
//! - `soak/sse.rs`: a cancel-safe raw HTTP/SSE client.
//! - `soak/track.rs`: what one client received, classified as it arrives.
//! - `soak/subscriber.rs`: browser-like subscribers and the burst's clients.
//! - `soak/writers.rs`: SQL writers, the flood, `eventgate run` workers and their command.
//! - `soak/gateway.rs`: replica processes, their RSS and counters.
//! - `soak/relay.rs`: the loopback TCP relay of the `blackhole` fault.
//! - `soak/faults.rs`: the schedule and each fault.

#[path = "soak/faults.rs"]
mod faults;
#[path = "soak/gateway.rs"]
mod gateway;
#[path = "soak/relay.rs"]
mod relay;
#[path = "soak/sse.rs"]
mod sse;
#[path = "soak/subscriber.rs"]
mod subscriber;
#[path = "soak/track.rs"]
mod track;
#[path = "soak/writers.rs"]
mod writers;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use eventgate::cluster::{Cluster, Options};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::gateway::{Counters, Replica};
use crate::subscriber::{Outcome, Shared, Spec};
use crate::track::{content_hash, End};

#[derive(Parser)]
#[command(name = "soak", about = "Fault and load soak of eventgate")]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
    #[command(flatten)]
    args: Args,
}

#[derive(Subcommand)]
enum Sub {
    /// The command the `eventgate run` workers run: stamped lines until a file appears.
    #[command(hide = true)]
    Emit {
        #[arg(long)]
        stop_file: PathBuf,
        #[arg(long)]
        tag: String,
        #[arg(long)]
        max_secs: u64,
    },
}

#[derive(clap::Args, Debug, Clone)]
struct Args {
    /// Seconds of writing and faults (the final drain comes on top).
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Jobs written by plain SQL writers.
    #[arg(long, default_value_t = 20)]
    jobs: usize,
    /// Browser-like subscribers.
    #[arg(long, default_value_t = 200)]
    subscribers: usize,
    /// Plain SQL writers (a quarter of them hold slow transactions).
    #[arg(long, default_value_t = 8)]
    writers: usize,
    /// `eventgate run` worker processes (one job each), when the binary has the worker.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Clients of each reconnect burst.
    #[arg(long, default_value_t = 1000)]
    burst: usize,
    /// Statements per second per SQL writer.
    #[arg(long, default_value_t = 20)]
    rate: u32,
    /// Seed of every random choice (printed in the summary).
    #[arg(long)]
    seed: Option<u64>,
    /// Negative control: three subscribers drop, repeat and swap one event each on
    /// purpose; the run must then report 1 lost, 1 duplicated, 1 reordered and fail.
    #[arg(long)]
    sabotage: bool,
    /// The gateway binary (default: the release binary of this workspace, built if stale).
    #[arg(long)]
    gateway_bin: Option<PathBuf>,
    /// Adds `pg_failover_async` to the rotation: replication made asynchronous, commits
    /// lost by the promotion, clients must get `reset` and end equal to the table.
    /// Off by default (and in `.ci/run`): its 600 s run still shows one client of 200
    /// ending with other content than the table, the limit of seq-only SSE ids
    /// (docs/reliability.md).
    #[arg(long)]
    async_failover: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Sub::Emit {
        stop_file,
        tag,
        max_secs,
    }) = cli.command
    {
        return ExitCode::from(writers::emit(&stop_file, &tag, max_secs) as u8);
    }
    raise_fd_limit();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("soak: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(soak(cli.args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("soak: {e}");
            ExitCode::from(2)
        }
    }
}

/// The JSON summary's shape, gathered as the run goes.
struct Run {
    args: Args,
    seed: u64,
    worker_mode: bool,
    workers_started: usize,
}

async fn soak(args: Args) -> Result<bool, String> {
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    let duration = Duration::from_secs(args.duration.max(10));
    let bin = gateway_bin(args.gateway_bin.clone())?;
    let dir = std::env::temp_dir().join(format!("eventgate-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    eprintln!("soak: seed {seed}, logs in {}", dir.display());

    // A primary and a synchronous standby: a commit is acknowledged once the standby
    // has it, so a failover loses nothing a writer was told is stored.
    let (primary, standby) = tokio::task::spawn_blocking(|| {
        let primary = Cluster::start(Options {
            fsync: false,
            max_connections: 300,
        })?;
        primary.configure("synchronous_commit = on\nsynchronous_standby_names = '*'")?;
        let standby = Cluster::standby_of(&primary)?;
        Ok::<_, std::io::Error>((primary, standby))
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("cannot start postgresql: {e}"))?;
    let ports = [primary.port(), standby.port()];
    let pair = Arc::new(tokio::sync::Mutex::new(faults::Pair {
        clusters: [Arc::new(primary), Arc::new(standby)],
        primary: 0,
        failovers: 0,
    }));
    let url = multi_host(ports);
    let mut relays = Vec::new();
    for port in ports {
        relays.push(
            relay::Relay::start(port)
                .await
                .map_err(|e| format!("cannot start a relay: {e}"))?,
        );
    }
    let relayed_url = multi_host([relays[0].port, relays[1].port]);
    eventgate::db::migrate(&url)
        .await
        .map_err(|e| format!("migrate: {e}"))?;
    let admin = writers::connect(&url, "soak-admin")
        .await
        .map_err(|e| format!("connect: {e}"))?;

    // Jobs of the SQL writers.
    let mut sql_jobs = Vec::with_capacity(args.jobs.max(1));
    for _ in 0..args.jobs.max(1) {
        let id = Uuid::new_v4();
        admin
            .execute(
                "INSERT INTO agent_jobs (id, name, status) VALUES ($1, 'soak', 'running')",
                &[&id],
            )
            .await
            .map_err(|e| format!("create job: {e}"))?;
        sql_jobs.push(id);
    }
    let sql_jobs = Arc::new(sql_jobs);

    // Workers, when the binary has them: each creates its own job.
    let worker_mode = args.workers > 0 && writers::worker_supported(&bin);
    let mut workers = Vec::new();
    if worker_mode {
        for i in 0..args.workers {
            let worker = writers::spawn_worker(&bin, &url, &dir, i, args.duration + 600)
                .map_err(|e| format!("cannot start a worker: {e}"))?;
            workers.push(worker);
        }
        for worker in &workers {
            wait_for_job(&admin, worker.job).await?;
        }
    }
    eprintln!(
        "soak: workers: {}",
        if worker_mode {
            format!("{} `eventgate run` processes", workers.len())
        } else {
            "none (this binary has no `eventgate run --create`): plain SQL writers only".into()
        }
    );
    let all_jobs: Vec<Uuid> = sql_jobs
        .iter()
        .copied()
        .chain(workers.iter().map(|w| w.job))
        .collect();

    // Two replicas.
    let mut replicas = Vec::new();
    for (name, url) in [("a", &url), ("b", &relayed_url)] {
        let addr = gateway::free_addr().map_err(|e| e.to_string())?;
        let mut replica = Replica::new(name, addr, &bin, url, &dir);
        replica.start().await?;
        replicas.push(replica);
    }
    let addrs = replicas.iter().map(|r| r.addr).collect();
    let replicas = Arc::new(tokio::sync::Mutex::new(replicas));

    let commits = Arc::new(writers::Commits::new(&sql_jobs));
    let (reconnect_all, _) = watch::channel(0u64);
    let (give_up, _) = watch::channel(false);
    let shared = Arc::new(Shared {
        start: tokio::time::Instant::now(),
        replicas: addrs,
        commits: commits.clone(),
        stall_until: (0..args.subscribers).map(|_| AtomicU64::new(0)).collect(),
        reconnect_all,
        give_up,
        delivered: AtomicU64::new(0),
        connections: AtomicU64::new(0),
        connect_errors: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        not_found: AtomicU64::new(0),
        silent: AtomicU64::new(0),
        async_failover_since: AtomicU64::new(u64::MAX),
        last_fault: std::sync::Mutex::new("none"),
        resets: Default::default(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);

    // Subscribers, arriving over the first seconds, each from the start of its job.
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut subscribers: Vec<JoinHandle<Outcome>> = Vec::with_capacity(args.subscribers);
    let mut stall_targets = Vec::new();
    let arrival = (duration / 6).min(Duration::from_secs(10));
    for i in 0..args.subscribers {
        let job = all_jobs[i % all_jobs.len()];
        // Every job gets a share of each kind: one in ten rounds of subscribers reads
        // slowly, one in five never leaves on purpose (slow readers among them).
        let round = i / all_jobs.len();
        let slow = is_slow(i, all_jobs.len());
        // Stall targets (about one in 17) stay connected, read at full speed once
        // resumed, through a small buffer.
        let stall_target = i % 17 == 7 && !slow && sql_jobs.contains(&job);
        let steady = round % 5 == 1 || stall_target;
        if stall_target {
            stall_targets.push((i, job));
        }
        let spec = Spec {
            index: Some(i),
            job,
            slow,
            small_buffer: stall_target,
            steady,
            floor: 0,
            target: None,
            sabotage: match (args.sabotage, i) {
                (true, 0) => Some(subscriber::Sabotage::Drop),
                (true, 1) => Some(subscriber::Sabotage::Repeat),
                (true, 2) => Some(subscriber::Sabotage::Swap),
                _ => None,
            },
            seed: rng.u64(..),
        };
        let delay = arrival.mul_f64(rng.f64());
        let shared = shared.clone();
        subscribers.push(tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            subscriber::run(spec, shared).await
        }));
    }

    // RSS and counters, sampled while it runs.
    let sampler = tokio::spawn(sample(replicas.clone(), stop_rx.clone()));

    // Writers.
    let stats = Arc::new(writers::Stats::default());
    let stop_writers = Arc::new(AtomicBool::new(false));
    let mut writer_tasks = Vec::new();
    for i in 0..args.writers {
        let writer = writers::Writer {
            index: i,
            slow: i % 4 == 2,
            notify: match i % 4 {
                1 => "always",
                3 => "off",
                _ => "",
            },
            rate: args.rate,
            seed: rng.u64(..),
        };
        writer_tasks.push(tokio::spawn(writers::run(
            writer,
            url.clone(),
            sql_jobs.clone(),
            stop_writers.clone(),
            stats.clone(),
            commits.clone(),
        )));
    }

    // Faults.
    let plan = faults::schedule(duration, seed, &faults::Kind::rotation(args.async_failover));
    let ctx = Arc::new(faults::Context {
        pair: pair.clone(),
        url: url.clone(),
        replicas: replicas.clone(),
        shared: shared.clone(),
        jobs: sql_jobs.clone(),
        stall_targets,
        burst: args.burst,
        seed,
        stats: stats.clone(),
        commits: commits.clone(),
        injected: Default::default(),
        failed: Default::default(),
        burst_clients: Default::default(),
        floods: Default::default(),
        relays,
        noticed: Default::default(),
        failover_ready: Default::default(),
        async_windows: Default::default(),
        async_lost: Default::default(),
    });
    let fault_task = tokio::spawn(faults::run(ctx.clone(), plan, stop_rx.clone()));

    // The write phase, with a progress line every 10 s.
    let began = tokio::time::Instant::now();
    while began.elapsed() < duration {
        let left = duration.saturating_sub(began.elapsed());
        tokio::time::sleep(left.min(Duration::from_secs(10))).await;
        eprintln!(
            "[{:6.1}s] statements {}, write errors {}, delivered {}, connections {}",
            shared.start.elapsed().as_secs_f64(),
            stats.statements.load(Ordering::Relaxed),
            stats.errors.load(Ordering::Relaxed),
            shared.delivered.load(Ordering::Relaxed),
            shared.connections.load(Ordering::Relaxed),
        );
    }

    // Wind down: writers, workers, faults in flight.
    eprintln!("soak: stopping writers and workers; finishing jobs");
    stop_writers.store(true, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    for task in writer_tasks {
        let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
    }
    let mut worker_exits = Vec::new();
    for worker in &workers {
        let _ = std::fs::write(&worker.stop_file, b"stop");
    }
    for worker in &mut workers {
        let status = match tokio::time::timeout(Duration::from_secs(60), worker.child.wait()).await
        {
            Ok(Ok(status)) => status.to_string(),
            _ => {
                let _ = worker.child.start_kill();
                let _ = worker.child.wait().await;
                "killed after 60 s".to_string()
            }
        };
        worker_exits.push(status);
    }
    if tokio::time::timeout(Duration::from_secs(180), fault_task)
        .await
        .is_err()
    {
        ctx.failed
            .lock()
            .expect("lock")
            .push("a fault did not finish in 180 s".into());
    }
    let floods: Vec<_> = ctx.floods.lock().expect("lock").drain(..).collect();
    for flood in floods {
        let _ = flood.await;
    }
    {
        let mut replicas = replicas.lock().await;
        for replica in replicas.iter_mut() {
            if !replica.is_running() {
                replica.start().await?;
            }
        }
    }
    finish_jobs(&url, &all_jobs).await?;

    // Every subscriber reads to its end, within a deadline.
    // Slow readers of a job flooded by the last stall need a while to catch up.
    let drain = Duration::from_secs(120 + args.duration / 10);
    let give_up_at = tokio::time::Instant::now() + drain;
    {
        let shared = shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(give_up_at).await;
            let _ = shared.give_up.send(true);
        });
    }
    let mut outcomes = Vec::new();
    for task in subscribers {
        outcomes.push(
            task.await
                .map_err(|e| format!("subscriber panicked: {e}"))?,
        );
    }
    let bursts: Vec<_> = ctx.burst_clients.lock().expect("lock").drain(..).collect();
    for task in bursts {
        outcomes.push(
            task.await
                .map_err(|e| format!("burst client panicked: {e}"))?,
        );
    }
    let drained_in =
        drain.saturating_sub(give_up_at.saturating_duration_since(tokio::time::Instant::now()));

    // The table, the truth.
    let truth = read_table(&url, &all_jobs).await?;

    // Replicas down, last samples.
    let _ = sampler.await;
    let (max_rss_kib, counters, starts) = {
        let mut replicas = replicas.lock().await;
        let mut counters = Counters::default();
        let mut max_rss = 0;
        let mut starts = 0;
        for replica in replicas.iter_mut() {
            replica.stop().await;
            counters.add(&replica.counters());
            max_rss = max_rss.max(replica.max_rss_kib);
            starts += replica.starts;
        }
        (max_rss, counters, starts)
    };

    let run = Run {
        args: args.clone(),
        seed,
        worker_mode,
        workers_started: workers.len(),
    };
    let injected = ctx.injected.lock().expect("lock").clone();
    let failed = ctx.failed.lock().expect("lock").clone();
    let windows = ctx.async_windows.lock().expect("lock").clone();
    let acked = commits.check(
        |job, seq| {
            let t = truth.get(&job)?;
            let s = usize::try_from(seq)
                .ok()
                .filter(|&s| s >= 1 && s < t.prefix.len())?;
            Some(t.prefix[s].wrapping_sub(t.prefix[s - 1]))
        },
        |us| windows.iter().any(|&(from, to)| us >= from && us <= to),
    );
    let resets_by_fault = shared.resets.lock().expect("lock").clone();
    let figures = Figures {
        acked,
        async_lost: ctx.async_lost.lock().expect("lock").clone(),
        resets_by_fault,
        noticed: ctx.noticed.lock().expect("lock").clone(),
        failover_ready: ctx.failover_ready.lock().expect("lock").clone(),
    };
    let report = Report::build(
        &run,
        &truth,
        &outcomes,
        &shared,
        &stats,
        injected,
        failed,
        counters,
        max_rss_kib,
        starts,
        drained_in,
        worker_exits,
        figures,
    );
    println!("{}", report.json);
    println!();
    println!("{}", report.table);
    drop(ctx);
    drop(pair);
    if report.ok {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!(
            "soak: FAILED; gateway and worker logs kept in {}",
            dir.display()
        );
    }
    Ok(report.ok)
}

/// The gateway binary: the one next to this example's target directory, built first
/// (examples do not build the crate's binaries; this is a no-op when it is fresh).
fn gateway_bin(explicit: Option<PathBuf>) -> Result<PathBuf, String> {
    if let Some(path) = explicit {
        return Ok(path);
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("cannot locate the target directory")?;
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["build", "--quiet", "--bin", "eventgate"])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().map_err(|e| format!("cargo build: {e}"))?;
    if !status.success() {
        return Err("cargo build --bin eventgate failed".into());
    }
    let bin = profile_dir.join("eventgate");
    if !bin.exists() {
        return Err(format!("no gateway binary at {}", bin.display()));
    }
    Ok(bin)
}

/// The two servers in one connection string: whoever is the primary is found.
fn multi_host(ports: [u16; 2]) -> String {
    format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=read-write",
        ports[0], ports[1]
    )
}

/// Figures of the failover and blackhole faults, and the check of acknowledged writes.
struct Figures {
    acked: writers::Acked,
    /// Per asynchronous failover: events the old primary had and the new one did not.
    async_lost: Vec<i64>,
    /// `reset` frames by the fault that started last before them, and whether an
    /// asynchronous failover had begun by then.
    resets_by_fault: BTreeMap<(&'static str, bool), u64>,
    /// Seconds to notice each silenced LISTEN session.
    noticed: Vec<f64>,
    /// Seconds from each `kill -9` of the primary to both gateways ready.
    failover_ready: Vec<f64>,
}

/// `(median, max)` of `v`, 0 when empty.
fn median_max(v: &[f64]) -> (f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let round = |x: f64| (x * 10.0).round() / 10.0;
    match v.last() {
        Some(&max) => (round(v[v.len() / 2]), round(max)),
        None => (0.0, 0.0),
    }
}

/// Whether subscriber `i` of `jobs` jobs is a slow reader (one round in ten).
fn is_slow(i: usize, jobs: usize) -> bool {
    (i / jobs.max(1)) % 10 == 1
}

/// 1,000 clients at once plus the gateways' sockets need more than 1,024 descriptors.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit with a valid resource and a pointer to a local.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

async fn wait_for_job(client: &tokio_postgres::Client, job: Uuid) -> Result<(), String> {
    for _ in 0..200 {
        let found = client
            .query_opt("SELECT 1 FROM agent_jobs WHERE id = $1", &[&job])
            .await
            .map_err(|e| e.to_string())?;
        if found.is_some() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("worker did not create job {job} within 20 s"))
}

/// Samples the replicas' RSS every half second and their counters every 2 s.
async fn sample(replicas: Arc<tokio::sync::Mutex<Vec<Replica>>>, mut stop: watch::Receiver<bool>) {
    let mut tick: u64 = 0;
    loop {
        {
            let mut replicas = replicas.lock().await;
            for replica in replicas.iter_mut() {
                replica.sample_rss();
                if tick % 4 == 0 {
                    replica.scrape().await;
                }
            }
        }
        tick += 1;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// `UPDATE agent_jobs SET status = 'succeeded'` for every job still open, retried
/// through a restart that may still be settling.
async fn finish_jobs(url: &str, jobs: &[Uuid]) -> Result<(), String> {
    let ids = jobs.to_vec();
    let mut last = String::new();
    for _ in 0..60 {
        match writers::connect(url, "soak-admin").await {
            Ok(client) => match client
                .execute(
                    "UPDATE agent_jobs SET status = 'succeeded' WHERE id = ANY($1) \
                     AND status NOT IN ('succeeded', 'failed', 'cancelled', 'dead_letter')",
                    &[&ids],
                )
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) => last = e.to_string(),
            },
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(format!("cannot finish the jobs: {last}"))
}

/// One job as the table has it.
struct Truth {
    status: String,
    last_seq: i64,
    /// `prefix[s]` = wrapping sum of content hashes of seqs 1..=s.
    prefix: Vec<u64>,
    /// Seqs missing or repeated in the table itself (must be 0: seqs are gap-free).
    table_gaps: u64,
}

async fn read_table(url: &str, jobs: &[Uuid]) -> Result<HashMap<Uuid, Truth>, String> {
    let client = writers::connect(url, "soak-admin")
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut truth = HashMap::new();
    for &job in jobs {
        let row = client
            .query_one(
                "SELECT status, last_seq FROM agent_jobs WHERE id = $1",
                &[&job],
            )
            .await
            .map_err(|e| format!("read job: {e}"))?;
        let status: String = row.get(0);
        let last_seq: i64 = row.get(1);
        let rows = client
            .query(
                "SELECT seq, message FROM agent_job_events WHERE job_id = $1 ORDER BY seq",
                &[&job],
            )
            .await
            .map_err(|e| format!("read events: {e}"))?;
        let mut prefix = Vec::with_capacity(rows.len() + 1);
        prefix.push(0u64);
        let mut table_gaps = 0;
        for (i, row) in rows.iter().enumerate() {
            let seq: i64 = row.get(0);
            let message: &str = row.get(1);
            if seq != i as i64 + 1 {
                table_gaps += 1;
            }
            let sum = prefix[i].wrapping_add(content_hash(seq, message));
            prefix.push(sum);
        }
        if rows.len() as i64 != last_seq {
            table_gaps += 1;
        }
        truth.insert(
            job,
            Truth {
                status,
                last_seq: rows.len() as i64,
                prefix,
                table_gaps,
            },
        );
    }
    Ok(truth)
}

struct Report {
    json: String,
    table: String,
    ok: bool,
}

#[derive(Default)]
struct Verdict {
    lost: u64,
    duplicated: u64,
    reordered: u64,
    corrupt: u64,
    phantom: u64,
    content_mismatch: u64,
    wrong_end: u64,
    incomplete: u64,
    delivered: u64,
    resets: u64,
    /// Resets before any asynchronous failover: history went back when it must not.
    unexpected_resets: u64,
    /// Events resets took back from clients.
    reset_dropped: u64,
    /// Clients that got at least one reset.
    reset_clients: u64,
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    fn build(
        run: &Run,
        truth: &HashMap<Uuid, Truth>,
        outcomes: &[Outcome],
        shared: &Shared,
        stats: &writers::Stats,
        injected: BTreeMap<&'static str, u64>,
        failed: Vec<String>,
        counters: Counters,
        max_rss_kib: u64,
        gateway_starts: u32,
        drained_in: Duration,
        worker_exits: Vec<String>,
        figures: Figures,
    ) -> Report {
        let mut v = Verdict::default();
        let mut latency = track::histogram();
        let mut worker_latency = track::histogram();
        let mut send_latency = track::histogram();
        let mut burst_clients = 0;
        let mut burst_slowest = Duration::ZERO;
        for outcome in outcomes {
            let t = &outcome.tracker;
            let Some(job) = truth.get(&outcome.spec.job) else {
                continue;
            };
            if outcome.spec.index.is_none() {
                burst_clients += 1;
                burst_slowest = burst_slowest.max(outcome.took);
            }
            // Persistent subscribers must hold all of 1..=last; burst clients their
            // window floor+1..=max(target, what they got).
            let high = match outcome.spec.target {
                Some(target) => target.max(t.max_seq).min(job.last_seq),
                None => job.last_seq,
            };
            let lost = t.lost(high);
            let phantom = t.phantom(job.last_seq);
            v.lost += lost;
            v.phantom += phantom;
            v.duplicated += t.duplicated;
            v.reordered += t.reordered;
            v.corrupt += t.corrupt;
            v.resets += t.resets;
            v.unexpected_resets += t.unexpected_resets;
            v.reset_dropped += t.reset_dropped;
            v.reset_clients += u64::from(t.resets > 0);
            v.delivered += t.received;
            if !outcome.complete {
                v.incomplete += 1;
            }
            if lost == 0 && phantom == 0 {
                let floor = t.floor().clamp(0, high) as usize;
                let expected = job.prefix[high as usize].wrapping_sub(job.prefix[floor]);
                if expected != t.hash {
                    v.content_mismatch += 1;
                    let (first, n) = t.differing(|s| {
                        let s = usize::try_from(s)
                            .ok()
                            .filter(|&s| s >= 1 && s < job.prefix.len())?;
                        Some(job.prefix[s].wrapping_sub(job.prefix[s - 1]))
                    });
                    eprintln!(
                        "soak: content differs from the table: {} client of job {}, {n} seqs from \
                         {first:?} on (table last seq {}), {} resets, max seq {}",
                        if outcome.spec.index.is_some() {
                            "persistent"
                        } else {
                            "burst"
                        },
                        outcome.spec.job,
                        job.last_seq,
                        t.resets,
                        t.max_seq
                    );
                }
            }
            if let Some(End::Frame { status, last_seq }) = &t.end {
                if *last_seq != job.last_seq || *status != job.status {
                    v.wrong_end += 1;
                }
            }
            let _ = latency.add(&outcome.latency);
            let _ = worker_latency.add(&outcome.worker_latency);
            let _ = send_latency.add(&outcome.send_latency);
        }
        let table_gaps: u64 = truth.values().map(|t| t.table_gaps).sum();
        let written: i64 = truth.values().map(|t| t.last_seq).sum();
        let missing_kinds: Vec<&str> = faults::Kind::rotation(run.args.async_failover)
            .iter()
            .map(|k| k.name())
            .filter(|k| injected.get(k).copied().unwrap_or(0) == 0)
            .collect();
        let ok = v.lost == 0
            && v.duplicated == 0
            && v.reordered == 0
            && v.corrupt == 0
            && v.phantom == 0
            && v.content_mismatch == 0
            && v.wrong_end == 0
            && v.incomplete == 0
            && table_gaps == 0
            && v.unexpected_resets == 0
            && figures.acked.missing == 0
            && missing_kinds.is_empty()
            && failed.is_empty();
        let ms = |h: &Histogram<u64>, q: f64| {
            if h.is_empty() {
                0.0
            } else {
                (h.value_at_quantile(q) as f64 / 1000.0 * 10.0).round() / 10.0
            }
        };
        let faults_json: serde_json::Map<String, serde_json::Value> = faults::Kind::ALL
            .iter()
            .map(|k| {
                (
                    k.name().to_string(),
                    json!(injected.get(k.name()).copied().unwrap_or(0)),
                )
            })
            .collect();
        let args = &run.args;
        let reset_key = |&(fault, allowed): &(&str, bool)| {
            if allowed {
                fault.to_string()
            } else {
                format!("{fault} (before any async failover)")
            }
        };
        let resets_json: serde_json::Map<String, serde_json::Value> = figures
            .resets_by_fault
            .iter()
            .map(|(k, n)| (reset_key(k), json!(n)))
            .collect();
        let resets_text = figures
            .resets_by_fault
            .iter()
            .map(|(k, n)| format!("{}: {n}", reset_key(k)))
            .collect::<Vec<_>>()
            .join(", ");
        let json = json!({
            "soak": "eventgate",
            "ok": ok,
            "seed": run.seed,
            "duration_s": args.duration,
            "jobs": truth.len(),
            "writers": args.writers,
            "workers": run.workers_started,
            "worker_mode": if run.worker_mode { "eventgate run" } else { "sql only" },
            "subscribers": args.subscribers,
            "burst_clients": burst_clients,
            "burst_slowest_catch_up_s": (burst_slowest.as_secs_f64() * 10.0).round() / 10.0,
            "events_written": written,
            "events_delivered": v.delivered,
            "faults": faults_json,
            "lost": v.lost,
            "duplicated": v.duplicated,
            "reordered": v.reordered,
            "corrupt": v.corrupt + v.phantom + v.content_mismatch + v.wrong_end,
            "incomplete": v.incomplete,
            "p50_commit_to_receive_ms": ms(&latency, 0.5),
            "p99_commit_to_receive_ms": ms(&latency, 0.99),
            "max_commit_to_receive_ms": ms(&latency, 1.0),
            "latency_samples": latency.len(),
            "p99_send_to_receive_ms": ms(&send_latency, 0.99),
            "p99_worker_emit_to_receive_ms": ms(&worker_latency, 0.99),
            "max_gateway_rss_kib": max_rss_kib,
            "connections": shared.connections.load(Ordering::Relaxed),
            "resets": v.resets,
            "resets_unexpected": v.unexpected_resets,
            "resets_by_fault": resets_json,
            "reset_clients": v.reset_clients,
            "reset_dropped_events": v.reset_dropped,
            "acknowledged_sql_events": figures.acked.checked,
            "acknowledged_missing_or_changed": figures.acked.missing,
            "acknowledged_lost_in_async_failover": figures.acked.lost_async,
            "async_failover_events_lost": figures.async_lost,
            "blackhole_noticed_s": figures.noticed,
            "failover_gateways_ready_s": figures.failover_ready,
            "lag_resyncs": counters.lag_resyncs,
            "listener_reconnects": counters.listener_reconnects,
            "fault_failures": failed,
        })
        .to_string();

        let mut table = String::new();
        let mut row = |k: &str, v: String| table.push_str(&format!("| {k} | {v} |\n"));
        row("result", if ok { "PASS".into() } else { "FAIL".into() });
        row(
            "duration (write phase) / drain",
            format!("{} s / {:.1} s", args.duration, drained_in.as_secs_f64()),
        );
        row("seed", run.seed.to_string());
        row(
            "jobs",
            format!(
                "{} ({} SQL, {} `eventgate run`)",
                truth.len(),
                truth.len() - run.workers_started,
                run.workers_started
            ),
        );
        row(
            "writers",
            format!(
                "{} SQL ({} with slow transactions; NOTIFY debounced/always/off), {} workers{}",
                args.writers,
                (0..args.writers).filter(|i| i % 4 == 2).count(),
                run.workers_started,
                if run.worker_mode {
                    ""
                } else {
                    " (binary has no worker: SQL only)"
                }
            ),
        );
        row(
            "SQL statements ok / failed (faults) / slow transactions",
            format!(
                "{} / {} / {}",
                stats.statements.load(Ordering::Relaxed),
                stats.errors.load(Ordering::Relaxed),
                stats.slow_transactions.load(Ordering::Relaxed)
            ),
        );
        if !worker_exits.is_empty() {
            row("worker exits", worker_exits.join(", "));
        }
        row(
            "subscribers",
            format!(
                "{} ({} slow readers) + {} burst clients",
                args.subscribers,
                (0..args.subscribers)
                    .filter(|&i| is_slow(i, truth.len()))
                    .count(),
                burst_clients
            ),
        );
        row(
            "slowest burst client to catch up",
            format!("{:.1} s", burst_slowest.as_secs_f64()),
        );
        row("events written (table)", written.to_string());
        row("events delivered", v.delivered.to_string());
        row(
            "SSE connections (connect errors / refused / 404 / silent)",
            format!(
                "{} ({} / {} / {} / {})",
                shared.connections.load(Ordering::Relaxed),
                shared.connect_errors.load(Ordering::Relaxed),
                shared.refused.load(Ordering::Relaxed),
                shared.not_found.load(Ordering::Relaxed),
                shared.silent.load(Ordering::Relaxed)
            ),
        );
        for kind in faults::Kind::ALL {
            row(
                &format!("fault: {}", kind.name()),
                injected.get(kind.name()).copied().unwrap_or(0).to_string(),
            );
        }
        if !failed.is_empty() {
            row("fault failures", failed.join("; "));
        }
        row("**lost**", v.lost.to_string());
        row("**duplicated**", v.duplicated.to_string());
        row("**reordered**", v.reordered.to_string());
        row(
            "corrupt (bad frame / phantom seq / content / wrong end)",
            format!(
                "{} / {} / {} / {}",
                v.corrupt, v.phantom, v.content_mismatch, v.wrong_end
            ),
        );
        row(
            "subscribers that never reached their end",
            v.incomplete.to_string(),
        );
        row("table seq gaps", table_gaps.to_string());
        row(
            "acknowledged SQL events missing or changed in the final table",
            format!("{} of {}", figures.acked.missing, figures.acked.checked),
        );
        row(
            "acknowledged SQL events lost in asynchronous failovers (allowed)",
            figures.acked.lost_async.to_string(),
        );
        row(
            "pg_failover_async: events the old primary had and the promoted one not",
            format!("{:?}", figures.async_lost),
        );
        row(
            "`event: reset` received (clients / events taken back)",
            format!("{} ({} / {})", v.resets, v.reset_clients, v.reset_dropped),
        );
        row(
            "`event: reset` by the fault started last before it",
            if resets_text.is_empty() {
                "none".into()
            } else {
                resets_text
            },
        );
        row(
            "**`event: reset` before any asynchronous failover**",
            v.unexpected_resets.to_string(),
        );
        let (median, max) = median_max(&figures.noticed);
        row(
            "blackhole: silent LISTEN noticed after, median / max",
            format!("{median} / {max} s ({} times)", figures.noticed.len()),
        );
        let (median, max) = median_max(&figures.failover_ready);
        row(
            "pg_failover: kill -9 to both gateways ready, median / max",
            format!(
                "{median} / {max} s ({} times)",
                figures.failover_ready.len()
            ),
        );
        row(
            "commit-to-receive p50 / p99 / max (SQL, live)",
            format!(
                "{} / {} / {} ms ({} samples)",
                ms(&latency, 0.5),
                ms(&latency, 0.99),
                ms(&latency, 1.0),
                latency.len()
            ),
        );
        row(
            "send-to-receive p50 / p99 (SQL `t=` stamp, incl. row-lock waits)",
            format!(
                "{} / {} ms",
                ms(&send_latency, 0.5),
                ms(&send_latency, 0.99)
            ),
        );
        if run.worker_mode {
            row(
                "worker emit-to-receive p50 / p99",
                format!(
                    "{} / {} ms",
                    ms(&worker_latency, 0.5),
                    ms(&worker_latency, 0.99)
                ),
            );
        }
        row("max gateway RSS", format!("{max_rss_kib} KiB"));
        row(
            "gateway: starts / listener reconnects / lag resyncs / ring catch-ups",
            format!(
                "{} / {} / {} / {}",
                gateway_starts,
                counters.listener_reconnects,
                counters.lag_resyncs,
                counters.ring_catch_ups
            ),
        );
        row(
            "gateway table reads: live / backfill",
            format!("{} / {}", counters.live_reads, counters.backfill_reads),
        );
        let table = format!("| measure | value |\n|---|---|\n{table}");
        Report { json, table, ok }
    }
}
