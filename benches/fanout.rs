//! The fan-out benchmark: the release gateway against Nchan, the original polling
//! design and an in-memory floor, under the same load, in one run.
//!
//! `cargo bench --bench fanout [-- --quick]` starts a throwaway PostgreSQL, then each
//! system in turn as its own process on loopback, opens S SSE streams over J jobs with
//! the client of `client.rs`, writes events at a fixed rate and measures. It writes
//! `target/bench/fanout.{json,md,svg}`. Everything is bounded in time and loopback only.
//!
//! # Layout
//!
//! - `client`: the SSE client (raw HTTP/1.1, chunked decoding, gap/dup tracking).
//! - `writers`: events at a fixed rate, by SQL or by HTTP publish.
//! - `systems`: starting each system and reading its CPU, memory and table reads.
//! - `servers`: the polling and floor servers (this binary re-executed).
//! - `report`: JSON, Markdown and SVG.
//!
//! - `scale`: the cases past one process's descriptor limit (`limit`, `replicas`,
//!   `replica_storm`), with the load from several client processes.
//!
//! Flags: `--quick` (one size per case, seconds each), `--systems a,b`, `--cases a,b`
//! (`idle, fanout, many_jobs, storm, limit, replicas, replica_storm`; the last three
//! only in a full run, never with `--quick`), `--subs N`, `--rate R` (filters),
//! `--measure S`.
//! `FANOUT_GATEWAY_PREFIX="valgrind --tool=callgrind"` runs the gateway under a tool.
//! `FANOUT_GATEWAY_ARGS="--counter-poll 0"` passes more flags to every gateway.

#[path = "fanout/client.rs"]
mod client;
#[path = "common/proc.rs"]
mod proc;
#[path = "fanout/report.rs"]
mod report;
#[path = "fanout/scale.rs"]
mod scale;
#[path = "fanout/servers.rs"]
mod servers;
#[path = "fanout/systems.rs"]
mod systems;
#[path = "fanout/writers.rs"]
mod writers;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventgate::cluster::{Cluster, Options};
use uuid::Uuid;

use client::{Swarm, Target};
use report::Row;
use systems::{Kind, Server};
use writers::Writers;

/// Set when this binary runs as one of the comparison servers.
pub const ROLE_ENV: &str = "FANOUT_ROLE";
/// Open files we ask for: two ends of every stream live on this machine.
const NOFILE: u64 = 200_000;

#[derive(Debug, Clone, Copy, PartialEq)]
enum CaseKind {
    Idle,
    Fanout,
    ManyJobs,
    Storm,
}

impl CaseKind {
    fn name(self) -> &'static str {
        match self {
            CaseKind::Idle => "idle",
            CaseKind::Fanout => "fanout",
            CaseKind::ManyJobs => "many_jobs",
            CaseKind::Storm => "storm",
        }
    }
}

#[derive(Debug, Clone)]
struct Case {
    kind: CaseKind,
    subscribers: usize,
    jobs: usize,
    /// Events per second over all jobs.
    rate: f64,
}

/// Timings of one run.
#[derive(Debug, Clone, Copy)]
struct Timing {
    warm: Duration,
    measure: Duration,
    drain: Duration,
    connect: Duration,
}

struct Args {
    quick: bool,
    systems: Vec<Kind>,
    cases: Option<Vec<String>>,
    subs: Option<usize>,
    rate: Option<f64>,
    measure: Option<u64>,
}

fn parse_args() -> Args {
    let mut args = Args {
        quick: false,
        systems: vec![Kind::Floor, Kind::Eventgate, Kind::Nchan, Kind::Polling],
        cases: None,
        subs: None,
        rate: None,
        measure: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => args.quick = true,
            // What `cargo bench` passes to every bench target.
            "--bench" => {}
            "--systems" => {
                let list = it.next().unwrap_or_default();
                args.systems = list
                    .split(',')
                    .filter_map(|s| {
                        [Kind::Floor, Kind::Eventgate, Kind::Nchan, Kind::Polling]
                            .into_iter()
                            .find(|k| k.name() == s.trim())
                    })
                    .collect();
            }
            "--cases" => {
                args.cases = Some(
                    it.next()
                        .unwrap_or_default()
                        .split(',')
                        .map(str::to_string)
                        .collect(),
                )
            }
            "--subs" => args.subs = it.next().and_then(|v| v.parse().ok()),
            "--rate" => args.rate = it.next().and_then(|v| v.parse().ok()),
            "--measure" => args.measure = it.next().and_then(|v| v.parse().ok()),
            other => eprintln!("fanout: ignoring argument {other:?}"),
        }
    }
    args
}

fn cases(args: &Args) -> Vec<Case> {
    let case = |kind, subscribers, jobs, rate| Case {
        kind,
        subscribers,
        jobs,
        rate,
    };
    let mut list = if args.quick {
        vec![
            case(CaseKind::Idle, 2000, 1, 0.0),
            case(CaseKind::Fanout, 2000, 1, 50.0),
            case(CaseKind::ManyJobs, 1000, 200, 100.0),
            case(CaseKind::Storm, 2000, 1, 10.0),
        ]
    } else {
        let mut list = vec![case(CaseKind::Idle, 10_000, 1, 0.0)];
        for subs in [1000, 5000, 10_000] {
            for rate in [10.0, 50.0, 100.0] {
                list.push(case(CaseKind::Fanout, subs, 1, rate));
            }
        }
        list.push(case(CaseKind::ManyJobs, 5000, 1000, 500.0));
        list.push(case(CaseKind::Storm, 10_000, 1, 10.0));
        list
    };
    list.retain(|c| {
        args.cases
            .as_ref()
            .map_or(true, |names| names.iter().any(|n| n == c.kind.name()))
            && args.subs.map_or(true, |s| s == c.subscribers)
            && args
                .rate
                .map_or(true, |r| c.kind == CaseKind::Idle || r == c.rate)
    });
    list
}

fn main() {
    if let Ok(role) = std::env::var(ROLE_ENV) {
        raise_nofile();
        if role == "client" {
            scale::client_main();
            return;
        }
        servers::run(&role);
        return;
    }
    if std::env::args().any(|a| a == "--sizes") {
        print_sizes();
        return;
    }
    let args = parse_args();
    client::self_check();
    raise_nofile();
    let timing = if args.quick {
        Timing {
            warm: Duration::from_secs(1),
            measure: Duration::from_secs(3),
            drain: Duration::from_secs(3),
            connect: Duration::from_secs(30),
        }
    } else {
        Timing {
            warm: Duration::from_secs(3),
            measure: Duration::from_secs(args.measure.unwrap_or(10)),
            drain: Duration::from_secs(5),
            connect: Duration::from_secs(90),
        }
    };
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("client runtime");

    let mut notes = vec![
        "Client, writers, PostgreSQL and the server share the machine's cores; CPU % is \
         the server's processes only (200 % = two cores)."
            .to_string(),
        "PostgreSQL runs with fsync off: the bench measures fan-out, not disk commits.".to_string(),
        "KiB/conn: VmRSS growth over the server's baseline before the streams opened, per \
         stream (nchan: PSS summed over master and workers)."
            .to_string(),
        "reads/batch: eventgate's live table reads per write statement (independent of \
         subscribers); polling's reads per write statement."
            .to_string(),
    ];
    let case_list = cases(&args);
    let pg = if args.systems.iter().any(|k| k.uses_db()) {
        match Cluster::start(Options {
            fsync: false,
            max_connections: 300,
        }) {
            Ok(pg) => Some(pg),
            Err(e) => {
                eprintln!("fanout: no PostgreSQL ({e}); skipping eventgate and polling");
                notes.push(format!(
                    "eventgate and polling skipped: no PostgreSQL ({e})"
                ));
                None
            }
        }
    } else {
        None
    };
    let url = pg.as_ref().map(|pg| pg.url()).unwrap_or_default();
    if let Some(_pg) = &pg {
        rt.block_on(eventgate::db::migrate(&url))
            .expect("migrations apply");
    }

    // Every system runs from the start and the cases go round them in turn, so the
    // noise of a shared machine falls on all of them alike.
    let mut servers = Vec::new();
    for &kind in &args.systems {
        if kind.uses_db() && pg.is_none() {
            continue;
        }
        if kind == Kind::Nchan {
            if let Err(why) = systems::nchan_available() {
                eprintln!("fanout: skipping nchan rows: {why}");
                notes.push(format!("nchan rows skipped: {why}"));
                continue;
            }
        }
        match Server::start(kind, &url) {
            Ok(server) => {
                eprintln!(
                    "fanout: {} on {} (pid {:?})",
                    kind.name(),
                    server.addr,
                    server.pids()
                );
                servers.push(server);
            }
            Err(e) => {
                eprintln!("fanout: skipping {}: {e}", kind.name());
                notes.push(format!("{} skipped: {e}", kind.name()));
            }
        }
    }
    let load_before = loadavg();
    let mut rows = Vec::new();
    let mut source_base = 0u32;
    for case in &case_list {
        for server in &servers {
            let row = run_case(&rt, server, case, &url, timing, source_base);
            source_base += case.subscribers as u32;
            log_row(&row);
            rows.push(row);
        }
    }
    // Past one process's descriptor limit: only in a full run, and only when asked for
    // (or when no case is named).
    let scale_wanted = |name: &str| {
        !args.quick
            && args
                .cases
                .as_ref()
                .map_or(true, |names| names.iter().any(|n| n == name))
    };
    if scale_wanted("limit") {
        for server in &servers {
            if server.kind == Kind::Polling {
                // 19,000 polls a second would measure PostgreSQL, not the server.
                notes.push("limit: polling not run (19,000 table reads a second)".into());
                continue;
            }
            let row = scale::limit_case(&rt, server, &url, timing, source_base);
            source_base += 21_000;
            log_row(&row);
            rows.push(row);
        }
    }
    if (scale_wanted("replicas") || scale_wanted("replica_storm")) && pg.is_some() {
        notes.push(format!(
            "replicas, replica_storm: eventgate only; {} gateway processes on one PostgreSQL \
             (the floor has no shared state to spread over processes; one nginx with 2 workers \
             holds at most 2 x 20,000 descriptors)",
            scale::REPLICAS
        ));
        let storm = scale_wanted("replica_storm");
        for row in scale::replicas_case(&rt, &url, timing, source_base, storm, &mut notes) {
            log_row(&row);
            rows.push(row);
        }
    }
    drop(servers);
    drop(pg);

    let header = format!(
        "{} run, {} cores, {}; warm-up {} s, measured {} s per case. Generated by \
         `cargo bench --bench fanout{}` in {:.0} s. Load average (1 min) {:.1} at the start, \
         {:.1} at the end: other work on the machine takes cores too.",
        if args.quick { "Quick" } else { "Full" },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        machine(),
        timing.warm.as_secs(),
        timing.measure.as_secs(),
        if args.quick { " -- --quick" } else { "" },
        started.elapsed().as_secs_f64(),
        load_before,
        loadavg(),
    );
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("bench");
    report::write_all(&dir, &rows, &notes, &header).expect("write the report");
    println!("{}", report::markdown(&rows, &notes, &header));
    eprintln!(
        "fanout: wrote {0}/fanout.json, {0}/fanout.md, {0}/fanout.svg (and fanout-scale.svg \
         with the scale cases)",
        dir.display()
    );
    // The one thing this bench asserts: the gateway never loses or repeats an event.
    let broken: Vec<_> = rows
        .iter()
        .filter(|r| r.system == "eventgate" && (r.gaps > 0 || r.dups > 0))
        .map(|r| format!("{} ({} gaps, {} dups)", r.case, r.gaps, r.dups))
        .collect();
    if !broken.is_empty() {
        eprintln!(
            "fanout: the gateway lost or repeated events: {}",
            broken.join(", ")
        );
        std::process::exit(1);
    }
}

fn log_row(row: &Row) {
    eprintln!(
        "  {:<9} {:<9} {:>6} subs {:>4} jobs {:>4}/s: {:>9.0} deliveries/s ({:>5.1} %), \
         p50 {:.1} p99 {:.1} max {:.0} ms, gaps {} dups {}, cpu {:.0} % (client {:.0} %), \
         {:.1} KiB/conn, reads/batch {}, load {:.1} {}",
        row.system,
        row.case,
        row.subscribers,
        row.jobs,
        row.rate,
        row.deliveries_per_s,
        row.demand_met * 100.0,
        row.p50_ms,
        row.p99_ms,
        row.max_ms,
        row.gaps,
        row.dups,
        row.cpu_pct,
        row.client_cpu_pct,
        row.rss_per_conn_kib,
        row.reads_per_batch
            .map_or("-".into(), |r| format!("{r:.2}")),
        row.load,
        row.note,
    );
}

/// The 1-minute load average.
fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    cpu
}

fn run_case(
    rt: &tokio::runtime::Runtime,
    server: &Server,
    case: &Case,
    url: &str,
    timing: Timing,
    source_base: u32,
) -> Row {
    let jobs: Arc<Vec<Uuid>> = Arc::new((0..case.jobs).map(|_| Uuid::new_v4()).collect());
    if server.kind.uses_db() {
        rt.block_on(create_jobs(url, &jobs)).expect("create jobs");
    }
    let mut note = String::new();
    // Let the allocator settle after the previous case before taking the baseline.
    std::thread::sleep(Duration::from_millis(500));
    let baseline = server.memory_kib();
    let overflows0 = systems::listen_overflows();
    let targets: Vec<Target> = (0..case.subscribers)
        .map(|i| Target {
            addr: server.addr,
            path: server.stream_path(jobs[i % jobs.len()]),
            resume: server.addr,
        })
        .collect();
    let swarm = Swarm::open(rt.handle(), targets, source_base);
    if !swarm.wait_connected(timing.connect) {
        note.push_str(&format!(
            "only {} of {} streams connected; ",
            swarm.stats.connected.load(Ordering::Relaxed),
            swarm.len()
        ));
    }
    let stats = swarm.stats.clone();
    let subs = case.subscribers as f64;

    if case.kind == CaseKind::Idle {
        std::thread::sleep(timing.warm);
        let cpu0 = server.cpu_seconds();
        let own0 = proc::cpu_seconds(std::process::id());
        let t0 = Instant::now();
        std::thread::sleep(timing.measure.min(Duration::from_secs(5)));
        let elapsed = t0.elapsed().as_secs_f64();
        let cpu = (server.cpu_seconds() - cpu0) / elapsed * 100.0;
        let client_cpu = (proc::cpu_seconds(std::process::id()) - own0) / elapsed * 100.0;
        let memory = server.memory_kib();
        swarm.close(rt.handle());
        return Row {
            system: server.kind.name().into(),
            case: case.kind.name().into(),
            subscribers: case.subscribers,
            jobs: case.jobs,
            rate: 0.0,
            demand_per_s: 0.0,
            deliveries_per_s: 0.0,
            demand_met: 0.0,
            written_per_s: 0.0,
            p50_ms: 0.0,
            p99_ms: 0.0,
            max_ms: 0.0,
            gaps: 0,
            dups: 0,
            reorders: 0,
            undelivered: 0,
            cpu_pct: cpu,
            client_cpu_pct: client_cpu,
            load: loadavg(),
            rss_per_conn_kib: memory.saturating_sub(baseline) as f64 / subs,
            reads_per_batch: None,
            backfill_reads: None,
            reconnect_p50_ms: None,
            reconnect_p99_ms: None,
            drops: stats.drops.load(Ordering::Relaxed),
            http_errors: stats.http_errors.load(Ordering::Relaxed),
            listen_overflows: systems::listen_overflows() - overflows0,
            idle_cpu_pct: Some(cpu),
            replicas: Vec::new(),
            note: note.trim_end_matches("; ").into(),
        };
    }

    let writers = Writers::start(
        server.kind,
        server.publish_addr,
        url,
        jobs.clone(),
        case.rate,
    );
    std::thread::sleep(timing.warm);
    let cpu0 = server.cpu_seconds();
    let own0 = proc::cpu_seconds(std::process::id());
    let reads0 = server.reads();
    let batches0 = writers.progress.batches.load(Ordering::Relaxed);
    let delivered0 = stats.delivered();
    stats.measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    if case.kind == CaseKind::Storm {
        swarm.reconnect_all(1);
    }
    std::thread::sleep(timing.measure);
    let elapsed = t0.elapsed().as_secs_f64();
    stats.measuring.store(false, Ordering::Relaxed);
    let delivered = stats.delivered() - delivered0;
    let batches = writers.progress.batches.load(Ordering::Relaxed) - batches0;
    let cpu = (server.cpu_seconds() - cpu0) / elapsed * 100.0;
    let client_cpu = (proc::cpu_seconds(std::process::id()) - own0) / elapsed * 100.0;
    let reads1 = server.reads();
    let memory = server.memory_kib();
    let progress = writers.stop();

    // Drain: wait until every stream has its job's last event, or the deadline.
    let last: Vec<i64> = progress
        .last_seq
        .iter()
        .map(|s| s.load(Ordering::Relaxed))
        .collect();
    let deadline = Instant::now() + timing.drain;
    loop {
        let behind = (0..case.subscribers)
            .filter(|&i| stats.max_seq[i].load(Ordering::Relaxed) < last[i % jobs.len()])
            .count();
        if behind == 0 || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let latency = stats.latency();
    let reconnect = stats.reconnect();
    let trackers = swarm.close(rt.handle());
    let (mut gaps, mut dups, mut reorders, mut undelivered) = (0, 0, 0, 0);
    for (i, t) in trackers.iter().enumerate() {
        gaps += t.gaps();
        dups += t.dups;
        reorders += t.reorders;
        undelivered += (last[i % jobs.len()] - t.max_seq).max(0) as u64;
    }
    if reorders > 0 {
        note.push_str(&format!("{reorders} out of order; "));
    }
    let errors = progress.errors.load(Ordering::Relaxed);
    if errors > 0 {
        note.push_str(&format!("{errors} write errors; "));
    }
    let demand = case.rate * subs / case.jobs as f64;
    let deliveries = delivered as f64 / elapsed;
    let ms = |us: u64| us as f64 / 1000.0;
    let reads_per_batch = match (reads0, reads1) {
        (Some(a), Some(b)) if batches > 0 => Some((b.0 - a.0) as f64 / batches as f64),
        _ => None,
    };
    let storm = case.kind == CaseKind::Storm;
    Row {
        system: server.kind.name().into(),
        case: case.kind.name().into(),
        subscribers: case.subscribers,
        jobs: case.jobs,
        rate: case.rate,
        demand_per_s: demand,
        deliveries_per_s: deliveries,
        demand_met: deliveries / demand,
        written_per_s: batches as f64 / elapsed,
        p50_ms: ms(latency.value_at_quantile(0.5)),
        p99_ms: ms(latency.value_at_quantile(0.99)),
        max_ms: ms(latency.max()),
        gaps,
        dups,
        reorders,
        undelivered,
        cpu_pct: cpu,
        client_cpu_pct: client_cpu,
        load: loadavg(),
        rss_per_conn_kib: memory.saturating_sub(baseline) as f64 / subs,
        reads_per_batch,
        backfill_reads: match (server.kind, reads0, reads1) {
            (Kind::Eventgate, Some(a), Some(b)) => Some(b.1 - a.1),
            _ => None,
        },
        reconnect_p50_ms: storm.then(|| ms(reconnect.value_at_quantile(0.5))),
        reconnect_p99_ms: storm.then(|| ms(reconnect.value_at_quantile(0.99))),
        drops: stats.drops.load(Ordering::Relaxed),
        http_errors: stats.http_errors.load(Ordering::Relaxed),
        listen_overflows: systems::listen_overflows() - overflows0,
        idle_cpu_pct: None,
        replicas: Vec::new(),
        note: note.trim_end_matches("; ").into(),
    }
}

async fn create_jobs(url: &str, jobs: &[Uuid]) -> Result<(), tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    let task = tokio::spawn(connection);
    client
        .execute(
            "INSERT INTO agent_jobs (id, name, status) SELECT unnest($1::uuid[]), 'fanout', 'running'",
            &[&jobs],
        )
        .await?;
    drop(client);
    let _ = task.await;
    Ok(())
}

/// Raises the soft (and, as root, the hard) limit of open files; children inherit it.
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        let want = NOFILE.max(lim.rlim_cur);
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: want.max(lim.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            // Not root: go as high as the hard limit allows.
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// `--sizes`: bytes of the gateway's per-stream state that every idle stream holds, from
/// the types alone (what the idle-memory row is made of, besides hyper's buffers).
fn print_sizes() {
    fn returned6<F, A, B, C, D, E, G, R>(_: &F) -> usize
    where
        F: Fn(A, B, C, D, E, G) -> R,
    {
        std::mem::size_of::<R>()
    }
    fn returned4<F, A, B, C, D, R>(_: &F) -> usize
    where
        F: Fn(A, B, C, D) -> R,
    {
        std::mem::size_of::<R>()
    }
    println!(
        "eventgate::stream::body (StreamBody, its Subscriber and next() future): {} bytes",
        returned6(&eventgate::stream::body)
    );
    println!(
        "eventgate::conn::serve future (a connection's task, less the body): {} bytes",
        returned4(&eventgate::conn::serve)
    );
    println!(
        "broadcast::Receiver<hub::Item>: {} bytes",
        std::mem::size_of::<tokio::sync::broadcast::Receiver<eventgate::hub::Item>>()
    );
}
