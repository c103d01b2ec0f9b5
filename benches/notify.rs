//! Past the NOTIFY lock: write batches per second and commit-to-receive latency with
//! W writers over 1,000 jobs (fsync on), for
//!   (a) `always`: one NOTIFY per statement (the naive design),
//!   (b) `debounced`: the default (sql/0006: at once below the quiet rate, else the
//!       per-job and global NOTIFY debounce, plus the gateway's counter poll, every
//!       20 ms by default),
//!   (c) `ceiling`: no NOTIFY and no gateway at all: the database's own write ceiling,
//!   (d) `reference`: the same rows, columns and values into a plain table whose only
//!       index is the `(job_id, seq)` primary key, seqs and lines from ONE counter
//!       UPDATE per statement, no trigger, no foreign key, no NOTIFY, no gateway: what
//!       PostgreSQL itself can write (issue 15's goal: (b) >= 0.9x (d)),
//! in one run. `cargo bench --bench notify [-- --quick]`.
//!
//! The gateway is the release binary (`eventgate serve`) in a process of its own, as in
//! production: it does not share the bench's runtime, and its CPU is read from /proc.
//! The modes take turns round after round, in a rotating order, so slow drift of the
//! machine (disk, autovacuum, checkpoints, a neighbour's build) hits them alike; each
//! mode's rate is compared with the ceiling of its own round.
//!
//! Extra flags, for experiments: `--rounds N`, `--seconds S`, `--modes a,b` (also
//! `trigger-only` and `poll-only`), `--counter-poll 15ms` for the gateway, and
//! `--database-url URL` to use a running PostgreSQL (say, one with pg_stat_statements)
//! instead of a throwaway cluster.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use eventgate::cluster::{Cluster, Options};
use http_body_util::{BodyExt, Empty};
use uuid::Uuid;

#[path = "common/proc.rs"]
mod proc;
use proc::{children_of, cpu_seconds, ppid};

const JOBS: usize = 1000;
const WRITERS: usize = 16;
const ROWS_PER_BATCH: i32 = 10;
const SUBSCRIBED_JOBS: usize = 100;
const MODES: [&str; 4] = ["always", "debounced", "ceiling", "reference"];
/// Modes that take (b) apart, only with `--modes`: the debounced trigger without a
/// gateway, and a gateway delivering `notify = off` writes with its counter poll alone.
const PARTS: [&str; 2] = ["trigger-only", "poll-only"];

/// The reference of issue 15: the same columns, only the `(job_id, seq)` primary key,
/// counters in a table of their own (no foreign key), no trigger.
const REFERENCE_SCHEMA: &str = "\
    CREATE TABLE IF NOT EXISTS bench_reference_jobs (\
        id uuid PRIMARY KEY, last_seq bigint NOT NULL DEFAULT 0, \
        last_line bigint NOT NULL DEFAULT 0); \
    CREATE TABLE IF NOT EXISTS bench_reference_events (\
        id uuid NOT NULL, job_id uuid NOT NULL, seq bigint NOT NULL, line bigint NOT NULL, \
        level text NOT NULL, message text NOT NULL, payload jsonb NOT NULL, \
        created_at timestamptz NOT NULL, PRIMARY KEY (job_id, seq))";

/// One statement of `$3` rows for job `$1`: one counter UPDATE, then the rows.
const REFERENCE_INSERT: &str = "\
    WITH c AS (UPDATE bench_reference_jobs \
                  SET last_seq = last_seq + $3::int, last_line = last_line + $3::int \
                WHERE id = $1 RETURNING last_seq - $3::int AS seq0, last_line - $3::int AS line0) \
    INSERT INTO bench_reference_events \
        (id, job_id, seq, line, level, message, payload, created_at) \
    SELECT gen_random_uuid(), $1, c.seq0 + g, c.line0 + g, 'info', $2, \
           '{\"kind\": \"log\", \"stream\": \"stdout\"}', clock_timestamp() \
      FROM c, generate_series(1, $3::int) g";

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// One mode in one round.
struct Outcome {
    mode: &'static str,
    batches_per_s: f64,
    notifications: u64,
    /// The gateway's live table reads and counter polls.
    reads: u64,
    polls: u64,
    /// Seconds between the two reads of the gateway's metrics.
    metrics_span: f64,
    batches: u64,
    deliveries: usize,
    gaps: usize,
    latencies_us: Vec<u64>,
    /// From the writer's receipt of the commit (its `execute` returning) to receipt by
    /// the subscriber; 0 when the event arrived first.
    ack_latencies_us: Vec<u64>,
    /// CPU over the write window, in % of one core.
    gateway_cpu: f64,
    postgres_cpu: f64,
    bench_cpu: f64,
    /// Busy share of the whole machine over the window, in % of all cores.
    machine_busy: f64,
    /// The 1-minute load average at the end of the window.
    load: f64,
}

/// A mode over all rounds.
struct Summary {
    mode: &'static str,
    /// Median write rate over the rounds.
    batches_per_s: f64,
    /// Median over the rounds of (this mode's rate / the same round's ceiling).
    of_ceiling: f64,
    /// Lowest and highest of those ratios.
    of_ceiling_range: (f64, f64),
    /// The same against the `reference` table, and each round's ratio.
    of_reference: f64,
    of_reference_range: (f64, f64),
    reference_ratios: Vec<f64>,
    notifications: u64,
    reads_per_batch: f64,
    polls_per_s: f64,
    deliveries: usize,
    gaps: usize,
    latencies_us: Vec<u64>,
    ack_latencies_us: Vec<u64>,
    gateway_cpu: f64,
    postgres_cpu: f64,
    bench_cpu: f64,
    machine_busy: f64,
}

struct Plan {
    seconds: u64,
    rounds: usize,
    modes: Vec<&'static str>,
    database_url: Option<String>,
    /// The gateway's `--counter-poll`, when not its default.
    counter_poll: Option<String>,
}

fn plan() -> Plan {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let quick = args.iter().any(|a| a == "--quick");
    let (seconds, rounds) = if quick { (3, 2) } else { (6, 9) };
    let modes = match value("--modes") {
        Some(list) => MODES
            .into_iter()
            .chain(PARTS)
            .filter(|m| list.split(',').any(|x| x == *m))
            .collect(),
        None => MODES.to_vec(),
    };
    Plan {
        seconds: value("--seconds").map_or(seconds, |v| v.parse().expect("--seconds N")),
        rounds: value("--rounds").map_or(rounds, |v| v.parse().expect("--rounds N")),
        modes,
        database_url: value("--database-url"),
        counter_poll: value("--counter-poll"),
    }
}

fn main() {
    let plan = plan();
    let load_before = loadavg();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let cluster = match &plan.database_url {
        Some(_) => None,
        None => {
            eprintln!("starting PostgreSQL (fsync on)...");
            let options = Options {
                fsync: true,
                max_connections: 100,
            };
            Some(Cluster::start(options).expect("start postgresql"))
        }
    };
    let url = match (&cluster, &plan.database_url) {
        (Some(cluster), _) => cluster.url(),
        (None, url) => url.clone().expect("a database url"),
    };
    let outcomes = rt.block_on(async {
        eventgate::db::migrate(&url).await.unwrap();
        let db = eventgate::db::connect(&url).await.unwrap();
        db.batch_execute(REFERENCE_SCHEMA).await.unwrap();
        let mut jobs = Vec::with_capacity(JOBS);
        for _ in 0..JOBS {
            let id = Uuid::new_v4();
            db.execute(
                "INSERT INTO agent_jobs (id, name, status) VALUES ($1, 'bench', 'running')",
                &[&id],
            )
            .await
            .unwrap();
            db.execute("INSERT INTO bench_reference_jobs (id) VALUES ($1)", &[&id])
                .await
                .unwrap();
            jobs.push(id);
        }
        let postmaster: i32 = db
            .query_one(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'checkpointer'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        let postmaster = ppid(postmaster as u32).expect("postmaster pid");
        let jobs = Arc::new(jobs);
        let mut outcomes = Vec::new();
        for round in 0..plan.rounds {
            // Rotate the order so no mode always follows the same one.
            let n = plan.modes.len();
            for k in 0..n {
                let mode = plan.modes[(round + k) % n];
                eprintln!(
                    "round {}/{}, mode {mode}: {} s...",
                    round + 1,
                    plan.rounds,
                    plan.seconds
                );
                let window = Duration::from_secs(plan.seconds);
                let outcome = run_mode(&url, mode, jobs.clone(), window, postmaster, &plan).await;
                eprintln!(
                    "  {:.0} batches/s, gateway {:.0} %, postgres {:.0} %, bench {:.0} %, machine {:.0} % busy",
                    outcome.batches_per_s,
                    outcome.gateway_cpu,
                    outcome.postgres_cpu,
                    outcome.bench_cpu,
                    outcome.machine_busy
                );
                outcomes.push((round, outcome));
            }
        }
        outcomes
    });
    drop(cluster);
    let load_after = loadavg();
    let loads: Vec<f64> = outcomes.iter().map(|(_, o)| o.load).collect();
    let summaries = summarize(&plan, outcomes);
    report(&plan, &summaries, load_before, load_after, &loads);
}

/// Each mode's rounds as one summary: median rates and ratios, CPU averaged, counts
/// summed, latencies pooled.
fn summarize(plan: &Plan, outcomes: Vec<(usize, Outcome)>) -> Vec<Summary> {
    let rate_of = |round: usize, mode: &str| {
        outcomes
            .iter()
            .find(|(r, o)| *r == round && o.mode == mode)
            .map(|(_, o)| o.batches_per_s)
    };
    let range = |ratios: &[f64]| {
        (
            ratios.iter().copied().fold(f64::NAN, f64::min),
            ratios.iter().copied().fold(f64::NAN, f64::max),
        )
    };
    let mut out = Vec::new();
    for mode in &plan.modes {
        let mine: Vec<&(usize, Outcome)> =
            outcomes.iter().filter(|(_, o)| o.mode == *mode).collect();
        let rates: Vec<f64> = mine.iter().map(|(_, o)| o.batches_per_s).collect();
        let ratios: Vec<f64> = mine
            .iter()
            .filter_map(|(r, o)| Some(o.batches_per_s / rate_of(*r, "ceiling")?))
            .collect();
        let reference_ratios: Vec<f64> = mine
            .iter()
            .filter_map(|(r, o)| Some(o.batches_per_s / rate_of(*r, "reference")?))
            .collect();
        let mean = |f: &dyn Fn(&Outcome) -> f64| {
            mine.iter().map(|(_, o)| f(o)).sum::<f64>() / mine.len() as f64
        };
        let batches: u64 = mine.iter().map(|(_, o)| o.batches).sum();
        let reads: u64 = mine.iter().map(|(_, o)| o.reads).sum();
        let polls: u64 = mine.iter().map(|(_, o)| o.polls).sum();
        let mut latencies_us: Vec<u64> = mine
            .iter()
            .flat_map(|(_, o)| o.latencies_us.iter().copied())
            .collect();
        latencies_us.sort_unstable();
        let mut ack_latencies_us: Vec<u64> = mine
            .iter()
            .flat_map(|(_, o)| o.ack_latencies_us.iter().copied())
            .collect();
        ack_latencies_us.sort_unstable();
        out.push(Summary {
            mode,
            batches_per_s: median(&rates),
            of_ceiling: median(&ratios),
            of_ceiling_range: range(&ratios),
            of_reference: median(&reference_ratios),
            of_reference_range: range(&reference_ratios),
            reference_ratios,
            notifications: mine.iter().map(|(_, o)| o.notifications).sum(),
            reads_per_batch: reads as f64 / batches.max(1) as f64,
            polls_per_s: polls as f64
                / mine
                    .iter()
                    .map(|(_, o)| o.metrics_span)
                    .sum::<f64>()
                    .max(1e-9),
            deliveries: mine.iter().map(|(_, o)| o.deliveries).sum(),
            gaps: mine.iter().map(|(_, o)| o.gaps).sum(),
            latencies_us,
            ack_latencies_us,
            gateway_cpu: mean(&|o| o.gateway_cpu),
            postgres_cpu: mean(&|o| o.postgres_cpu),
            bench_cpu: mean(&|o| o.bench_cpu),
            machine_busy: mean(&|o| o.machine_busy),
        });
    }
    out
}

fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The gateway under test: the release binary, `eventgate serve`, in its own process.
struct Gateway {
    addr: std::net::SocketAddr,
    child: Child,
}

impl Gateway {
    async fn start(url: &str, counter_poll: Option<&str>) -> Gateway {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_eventgate"));
        cmd.args(["serve", "--listen", &addr.to_string()]);
        if let Some(interval) = counter_poll {
            cmd.args(["--counter-poll", interval]);
        }
        let child = cmd
            .args(["--max-streams-per-client", "1000000"])
            .env("DATABASE_URL", url)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("start eventgate serve");
        wait_ready(addr).await;
        Gateway { addr, child }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM (a graceful drain), then wait for it.
    fn stop(mut self) {
        // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

async fn run_mode(
    url: &str,
    mode: &'static str,
    jobs: Arc<Vec<Uuid>>,
    window: Duration,
    postmaster: u32,
    plan: &Plan,
) -> Outcome {
    // The gateway, for the modes that deliver.
    let gateway = if matches!(mode, "ceiling" | "trigger-only" | "reference") {
        None
    } else {
        Some(Gateway::start(url, plan.counter_poll.as_deref()).await)
    };
    let gateway_metrics = |gateway: &Option<Gateway>| {
        let addr = gateway.as_ref().map(|g| g.addr);
        async move {
            let Some(addr) = addr else {
                return [0; 3];
            };
            let text = http_get(addr, "/metrics").await.unwrap();
            [
                "eventgate_notifications_total",
                "eventgate_table_reads_total{purpose=\"live\"}",
                "eventgate_counter_polls_total",
            ]
            .map(|name| metric(&text, name))
        }
    };

    // Subscribers: one per job on the first SUBSCRIBED_JOBS jobs.
    let stop = Arc::new(AtomicBool::new(false));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let mut subscribers = Vec::new();
    if let Some(gateway) = &gateway {
        // Start each stream at the job's current end: earlier modes' events are not
        // this mode's deliveries.
        let db = eventgate::db::connect(url).await.unwrap();
        let ids: Vec<Uuid> = jobs.iter().take(SUBSCRIBED_JOBS).copied().collect();
        let rows = db
            .query(
                "SELECT id, last_seq FROM agent_jobs WHERE id = ANY($1)",
                &[&ids],
            )
            .await
            .unwrap();
        for row in rows {
            let (job, after): (Uuid, i64) = (row.get(0), row.get(1));
            subscribers.push(tokio::spawn(subscribe(
                gateway.addr,
                job,
                after,
                stop.clone(),
                latencies.clone(),
            )));
        }
    }

    // Writers connect and prepare, then all start together.
    let batches = Arc::new(AtomicU64::new(0));
    let go = Arc::new(tokio::sync::Barrier::new(WRITERS + 1));
    let deadline = Arc::new(Mutex::new(None::<Instant>));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (url, jobs, batches) = (url.to_string(), jobs.clone(), batches.clone());
        let (go, deadline) = (go.clone(), deadline.clone());
        writers.push(tokio::spawn(async move {
            let client = eventgate::db::connect(&url).await.unwrap();
            let setting = match mode {
                "always" => "SET eventgate.notify = 'always'",
                "ceiling" | "poll-only" => "SET eventgate.notify = 'off'",
                _ => "SELECT 1",
            };
            client.batch_execute(setting).await.unwrap();
            let sql = if mode == "reference" {
                REFERENCE_INSERT
            } else {
                "INSERT INTO agent_job_events (job_id, level, message, payload) \
                 SELECT $1, 'info', $2, '{\"kind\": \"log\", \"stream\": \"stdout\"}' \
                 FROM generate_series(1, $3::int)"
            };
            let stmt = client.prepare(sql).await.unwrap();
            let mut rng = fastrand::Rng::with_seed(w as u64);
            // (job, send time, commit acknowledged), for the latency from the commit.
            let mut acks = Vec::new();
            go.wait().await;
            let deadline = deadline.lock().unwrap().expect("set before the start");
            while Instant::now() < deadline {
                let job = jobs[rng.usize(..jobs.len())];
                let sent = now_us();
                client
                    .execute(&stmt, &[&job, &sent.to_string(), &ROWS_PER_BATCH])
                    .await
                    .unwrap();
                acks.push((job, sent, now_us()));
                batches.fetch_add(1, Ordering::Relaxed);
            }
            // The client too: its backend must still be there for the CPU sample.
            (client, acks)
        }));
    }
    // Let the subscribers' streams settle (and the writers connect).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let metrics_before = gateway_metrics(&gateway).await;
    let metrics_at = Instant::now();
    let cpu_before = Cpu::sample(gateway.as_ref().map(Gateway::pid), postmaster);
    let started = Instant::now();
    *deadline.lock().unwrap() = Some(started + window);
    go.wait().await;
    let mut clients = Vec::new();
    let mut acks = std::collections::HashMap::new();
    for w in writers {
        let (client, list) = w.await.unwrap();
        clients.push(client);
        acks.extend(list.into_iter().map(|(job, sent, ack)| ((job, sent), ack)));
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_after = Cpu::sample(gateway.as_ref().map(Gateway::pid), postmaster);
    drop(clients);
    let load = loadavg();
    let batches = batches.load(Ordering::Relaxed);

    // Let the last batches arrive (the bound is the counter poll: 20 ms by default), then stop.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    let mut deliveries = 0;
    let mut gaps = 0;
    for s in subscribers {
        let (n, g) = s.await.unwrap();
        deliveries += n;
        gaps += g;
    }
    let metrics_after = gateway_metrics(&gateway).await;
    let metrics_span = metrics_at.elapsed().as_secs_f64();
    if let Some(gateway) = gateway {
        gateway.stop();
    }
    let received = std::mem::take(&mut *latencies.lock().unwrap());
    let mut latencies_us: Vec<u64> = received
        .iter()
        .map(|(_, sent, at)| at.saturating_sub(*sent))
        .collect();
    latencies_us.sort_unstable();
    let mut ack_latencies_us: Vec<u64> = received
        .iter()
        .filter_map(|(job, sent, at)| Some(at.saturating_sub(*acks.get(&(*job, *sent))?)))
        .collect();
    ack_latencies_us.sort_unstable();
    let pct = |a: f64, b: f64| 100.0 * (b - a) / elapsed;
    Outcome {
        mode,
        batches_per_s: batches as f64 / elapsed,
        notifications: metrics_after[0] - metrics_before[0],
        reads: metrics_after[1] - metrics_before[1],
        polls: metrics_after[2] - metrics_before[2],
        metrics_span,
        batches,
        deliveries,
        gaps,
        latencies_us,
        ack_latencies_us,
        gateway_cpu: pct(cpu_before.gateway, cpu_after.gateway),
        postgres_cpu: 100.0 * cpu_after.postgres_since(&cpu_before) / elapsed,
        bench_cpu: pct(cpu_before.bench, cpu_after.bench),
        machine_busy: 100.0 * (cpu_after.machine_busy - cpu_before.machine_busy)
            / (cpu_after.machine_total - cpu_before.machine_total).max(1.0),
        load,
    }
}

/// CPU seconds used so far, from /proc.
struct Cpu {
    gateway: f64,
    /// The postmaster and each of its children, by pid.
    postgres: std::collections::HashMap<u32, f64>,
    bench: f64,
    /// Busy and total jiffies of the whole machine.
    machine_busy: f64,
    machine_total: f64,
}

impl Cpu {
    fn sample(gateway: Option<u32>, postmaster: u32) -> Cpu {
        let (machine_busy, machine_total) = machine_jiffies();
        let postgres = children_of(postmaster)
            .into_iter()
            .chain([postmaster])
            .map(|pid| (pid, cpu_seconds(pid)))
            .collect();
        Cpu {
            gateway: gateway.map_or(0.0, cpu_seconds),
            postgres,
            bench: cpu_seconds(std::process::id()),
            machine_busy,
            machine_total,
        }
    }

    /// PostgreSQL's CPU seconds between two samples: every process alive at the end,
    /// less what it had used at the start. A process that both started and ended
    /// inside the window (an autovacuum worker) is missed; one that ended is not
    /// counted (its time at the postmaster's reaping would include time before).
    fn postgres_since(&self, start: &Cpu) -> f64 {
        self.postgres
            .iter()
            .map(|(pid, cpu)| cpu - start.postgres.get(pid).copied().unwrap_or(0.0))
            .sum()
    }
}

/// (busy, total) jiffies over all cores, from the first line of /proc/stat.
fn machine_jiffies() -> (f64, f64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let values: Vec<f64> = text
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: f64 = values.iter().take(8).sum();
    // idle and iowait are the 4th and 5th.
    let idle = values.get(3).copied().unwrap_or(0.0) + values.get(4).copied().unwrap_or(0.0);
    (total - idle, total)
}

/// The 1-minute load average.
fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// One SSE subscriber over hyper's client; returns (events received, gaps seen).
async fn subscribe(
    addr: std::net::SocketAddr,
    job: Uuid,
    after: i64,
    stop: Arc<AtomicBool>,
    latencies: Arc<Mutex<Vec<(Uuid, u64, u64)>>>,
) -> (usize, usize) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get(format!(
        "/api/queue/jobs/{job}/events/stream?afterSeq={after}"
    ))
    .header("host", "bench")
    .body(Empty::<Bytes>::new())
    .unwrap();
    let mut body = sender.send_request(req).await.unwrap().into_body();
    let mut pending = String::new();
    let (mut received, mut gaps, mut last) = (0usize, 0usize, None::<i64>);
    let mut local = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let frame = match tokio::time::timeout(Duration::from_millis(200), body.frame()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(_) => break,
            Err(_) => continue,
        };
        let Some(data) = frame.data_ref() else {
            continue;
        };
        let at = now_us();
        pending.push_str(std::str::from_utf8(data).unwrap());
        while let Some(end) = pending.find("\n\n") {
            let block: String = pending.drain(..end + 2).collect();
            let Some(json) = block.lines().find_map(|l| l.strip_prefix("data: ")) else {
                continue;
            };
            #[derive(serde::Deserialize)]
            struct Event {
                seq: i64,
                message: String,
            }
            let Ok(event) = serde_json::from_str::<Event>(json) else {
                continue;
            };
            if let Some(prev) = last {
                if event.seq != prev + 1 {
                    gaps += 1;
                }
            }
            last = Some(event.seq);
            received += 1;
            if let Ok(t) = event.message.parse::<u64>() {
                local.push((job, t, at));
            }
        }
    }
    latencies.lock().unwrap().extend(local);
    (received, gaps)
}

async fn wait_ready(addr: std::net::SocketAddr) {
    for _ in 0..600 {
        if let Ok(text) = http_get(addr, "/readyz").await {
            if text.contains("\"ready\":true") {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("gateway not ready");
}

/// A counter from the gateway's /metrics text (0 if absent).
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

async fn http_get(
    addr: std::net::SocketAddr,
    path: &str,
) -> Result<String, Box<dyn std::error::Error>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", "bench")
        .body(Empty::<Bytes>::new())?;
    let body = sender
        .send_request(req)
        .await?
        .into_body()
        .collect()
        .await?;
    Ok(String::from_utf8_lossy(&body.to_bytes()).into_owned())
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn report(plan: &Plan, summaries: &[Summary], load_before: f64, load_after: f64, loads: &[f64]) {
    let load_mean = loads.iter().sum::<f64>() / loads.len().max(1) as f64;
    let load_max = loads.iter().copied().fold(0.0, f64::max);
    let mut md = format!(
        "NOTIFY lock benchmark: {WRITERS} writers, {JOBS} jobs, {ROWS_PER_BATCH} rows per batch, \
         fsync on, {SUBSCRIBED_JOBS} jobs with a subscriber, the gateway a release `eventgate serve` \
         process of its own. The modes take turns in a rotating order, {} round(s) of {} s each, \
         in one run. Rate: median over the rounds; of ceiling: median over the rounds of the rate \
         divided by the same round's ceiling (lowest-highest in brackets); of reference: the same against the \
         `reference` table (issue 15's plain table: only the (job_id, seq) key, one counter \
         UPDATE per statement, no trigger, FK, NOTIFY or gateway); CPU in % of one core, \
         averaged over the rounds' write windows; NOTIFYs and deliveries summed; reads/batch: \
         the gateway's live reads (after a notification, or a poll that found events) per \
         write batch of all 1,000 jobs; latencies pooled, from the writer's send (so the \
         commit's own fsync wait included) to receipt by the subscriber, and p99 from the \
         writer's receipt of the commit instead. 1-minute load average: \
         {load_before:.2} before the run, {load_mean:.2} on average at the end of the windows \
         (max {load_max:.2}), {load_after:.2} after.\n\n\
         | mode | write batches/s | of ceiling | of reference | NOTIFYs | reads/batch | polls/s | deliveries | gaps | p50 ms | p99 ms | max ms | p99 ms from commit | gateway CPU | postgres CPU | bench CPU | machine busy |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        plan.rounds, plan.seconds,
    );
    for s in summaries {
        md.push_str(&format!(
            "| {} | {:.0} | {:.1} % ({:.0}-{:.0}) | {:.1} % ({:.0}-{:.0}) | {} | {:.3} | {:.1} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} % | {:.0} % | {:.0} % | {:.0} % |\n",
            s.mode,
            s.batches_per_s,
            100.0 * s.of_ceiling,
            100.0 * s.of_ceiling_range.0,
            100.0 * s.of_ceiling_range.1,
            100.0 * s.of_reference,
            100.0 * s.of_reference_range.0,
            100.0 * s.of_reference_range.1,
            s.notifications,
            s.reads_per_batch,
            s.polls_per_s,
            s.deliveries,
            s.gaps,
            pct(&s.latencies_us, 0.5),
            pct(&s.latencies_us, 0.99),
            pct(&s.latencies_us, 1.0),
            pct(&s.ack_latencies_us, 0.99),
            s.gateway_cpu,
            s.postgres_cpu,
            s.bench_cpu,
            s.machine_busy,
        ));
    }
    if let Some(s) = summaries.iter().find(|s| s.mode == "debounced") {
        let rounds: Vec<String> = s
            .reference_ratios
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect();
        md.push_str(&format!(
            "\nThe project's schema with live delivery (`debounced`) against the reference \
             table, per round: {}; median {:.2}x (goal >= 0.9x); p99 commit-to-receive of \
             the followed jobs {:.1} ms (goal <= 50).\n",
            rounds.join(", "),
            s.of_reference,
            pct(&s.ack_latencies_us, 0.99),
        ));
    }
    println!("{md}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("notify.md"), &md);
    if summaries.iter().any(|s| s.gaps > 0) {
        eprintln!("gaps seen: delivery is broken");
        std::process::exit(1);
    }
}
