//! The cases past one process's descriptor limit: `limit` (one server pushed past what
//! it can hold), `replicas` (100,000 streams over six gateway replicas on one
//! PostgreSQL) and `replica_storm` (all of them resuming at once, each on the next
//! replica).
//!
//! A process may hold at most `ulimit -n` descriptors (20,000 on the machines this was
//! written on, and not raisable), so the streams come from several client processes:
//! this bench binary re-executed with `FANOUT_ROLE=client`, each running the swarm of
//! `client.rs` over its share of the streams from loopback source addresses 127.0.0.2
//! and up (bound before connect, so the 4-tuples never run out), and answering the
//! parent's one-line commands on stdin with one JSON line on stdout.

use std::io::{self, BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::client::{Swarm, Target, Tracker};
use crate::report::Row;
use crate::systems::{Kind, Server};
use crate::writers::Writers;
use crate::{loadavg, proc, Timing};

/// Streams per client process: under the 20,000 descriptors a process may hold.
const PER_CLIENT: usize = 17_000;
/// Gateway replicas of the `replicas` case.
pub const REPLICAS: usize = 6;
/// Streams of the `replicas` case, over its 1,000 jobs at 1 event/s each.
const REPLICA_STREAMS: usize = 100_000;
const REPLICA_JOBS: usize = 1000;
/// Streams held by the server in the `limit` case, then the extra clients past it.
const LIMIT_HELD: usize = 19_000;
const LIMIT_EXTRA: usize = 1_500;
/// Jobs and events/s of the `limit` case's writes (one delivery per stream per second).
const LIMIT_JOBS: usize = 100;
const LIMIT_RATE: f64 = 100.0;
/// Idle CPU is read over this window: two keep-alive rounds (15 s each) fall inside.
const IDLE_WINDOW: Duration = Duration::from_secs(30);
const MAX_LATENCY_US: u64 = 120_000_000;

/// What a client process is told to open.
#[derive(Serialize, Deserialize)]
struct Spec {
    /// Per stream: where it connects, where it resumes, and its path.
    streams: Vec<(SocketAddr, SocketAddr, String)>,
    /// Job index per stream, for the drain's "behind" and the undelivered count.
    job_of: Vec<usize>,
    source_base: u32,
    give_up: bool,
}

/// Runs as a client process (`FANOUT_ROLE=client`) until told `close` or stdin ends.
pub fn client_main() {
    let spec: Spec = match std::env::var("FANOUT_CLIENT_SPEC")
        .ok()
        .and_then(|path| std::fs::read(path).ok())
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
    {
        Some(spec) => spec,
        None => {
            eprintln!("fanout client: no readable FANOUT_CLIENT_SPEC");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("client runtime");
    let targets = spec
        .streams
        .iter()
        .map(|(addr, resume, path)| Target {
            addr: *addr,
            resume: *resume,
            path: path.clone(),
        })
        .collect();
    let swarm = Swarm::open_with(rt.handle(), targets, spec.source_base, spec.give_up);
    let stats = swarm.stats.clone();
    let behind = |lasts: &[i64]| {
        spec.job_of
            .iter()
            .enumerate()
            .filter(|(i, j)| stats.max_seq[*i].load(Ordering::Relaxed) < lasts[**j])
            .count()
    };
    let stdout = io::stdout();
    let mut swarm = Some(swarm);
    for line in io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let (cmd, arg) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        let lasts: Vec<i64> = arg
            .split(',')
            .filter_map(|v| v.trim().parse().ok())
            .collect();
        let reply = match cmd {
            "status" => json!({
                "connected": stats.connected.load(Ordering::Relaxed),
                "settled": stats.settled.load(Ordering::Relaxed),
                "delivered": stats.delivered(),
                "http_errors": stats.http_errors.load(Ordering::Relaxed),
                "retry_after": stats.retry_after.load(Ordering::Relaxed),
                "head_failures": stats.head_failures.load(Ordering::Relaxed),
                "drops": stats.drops.load(Ordering::Relaxed),
                "reconnected": stats.reconnected.load(Ordering::Relaxed),
                "cpu": proc::cpu_seconds(std::process::id()),
            }),
            "measure" => {
                stats.measuring.store(arg == "1", Ordering::Relaxed);
                json!({})
            }
            "behind" if lasts.len() > spec.job_of.iter().copied().max().unwrap_or(0) => {
                json!({ "behind": behind(&lasts) })
            }
            "reconnect" => {
                if let Some(swarm) = &swarm {
                    swarm.reconnect_all(1);
                }
                json!({})
            }
            "hist" => json!({
                "latency": recorded(&stats.latency()),
                "reconnect": recorded(&stats.reconnect()),
            }),
            "close" if lasts.len() > spec.job_of.iter().copied().max().unwrap_or(0) => {
                let trackers = swarm
                    .take()
                    .map(|s| s.close(rt.handle()))
                    .unwrap_or_default();
                json!(tally(&trackers, &spec.job_of, &lasts))
            }
            other => json!({ "error": format!("unknown command {other:?}") }),
        };
        let mut out = stdout.lock();
        let _ = writeln!(out, "{reply}");
        let _ = out.flush();
        if cmd == "close" {
            break;
        }
    }
}

/// A histogram as `[value, count]` pairs, to merge in the parent.
fn recorded(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
struct Tally {
    gaps: u64,
    dups: u64,
    reorders: u64,
    undelivered: u64,
    /// Streams that received at least one event.
    receiving: u64,
}

fn tally(trackers: &[Tracker], job_of: &[usize], lasts: &[i64]) -> Tally {
    let mut t = Tally::default();
    for (tracker, &job) in trackers.iter().zip(job_of) {
        t.gaps += tracker.gaps();
        t.dups += tracker.dups;
        t.reorders += tracker.reorders;
        if tracker.max_seq > 0 {
            t.receiving += 1;
            t.undelivered += (lasts[job] - tracker.max_seq).max(0) as u64;
        }
    }
    t
}

/// One client process, driven over its stdin and stdout.
struct ClientProc {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

/// The client processes of one case.
struct Clients {
    procs: Vec<ClientProc>,
}

impl Clients {
    /// Starts one process per `PER_CLIENT` streams (at most), in order.
    fn start(
        streams: Vec<(SocketAddr, SocketAddr, String, usize)>,
        source_base: u32,
        give_up: bool,
        per_client: usize,
    ) -> io::Result<Clients> {
        let exe = std::env::current_exe()?;
        let mut procs = Vec::new();
        for (n, part) in streams.chunks(per_client.max(1)).enumerate() {
            let spec = Spec {
                streams: part
                    .iter()
                    .map(|(a, r, p, _)| (*a, *r, p.clone()))
                    .collect(),
                job_of: part.iter().map(|s| s.3).collect(),
                source_base: source_base + (n * per_client) as u32,
                give_up,
            };
            let file = std::env::temp_dir().join(format!(
                "fanout-client-{}-{}-{n}.json",
                std::process::id(),
                source_base
            ));
            std::fs::write(&file, serde_json::to_vec(&spec).map_err(io::Error::other)?)?;
            let mut child = Command::new(&exe)
                .env(crate::ROLE_ENV, "client")
                .env("FANOUT_CLIENT_SPEC", &file)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()?;
            let stdin = child.stdin.take().expect("piped stdin");
            let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
            procs.push(ClientProc {
                child,
                stdin,
                stdout,
            });
        }
        Ok(Clients { procs })
    }

    /// Sends one command to every process; their replies in order (`null` if one died).
    fn ask(&mut self, cmd: &str) -> Vec<Value> {
        for p in &mut self.procs {
            let _ = writeln!(p.stdin, "{cmd}").and_then(|_| p.stdin.flush());
        }
        self.procs
            .iter_mut()
            .map(|p| {
                let mut line = String::new();
                match p.stdout.read_line(&mut line) {
                    Ok(n) if n > 0 => serde_json::from_str(&line).unwrap_or(Value::Null),
                    _ => Value::Null,
                }
            })
            .collect()
    }

    /// A field of `status`, summed over the processes.
    fn sum(replies: &[Value], field: &str) -> u64 {
        replies.iter().filter_map(|r| r[field].as_u64()).sum()
    }

    fn sum_f(replies: &[Value], field: &str) -> f64 {
        replies.iter().filter_map(|r| r[field].as_f64()).sum()
    }

    /// Waits until `field` of `status` reaches `want` over all processes, or `timeout`.
    fn wait(&mut self, field: &str, want: u64, timeout: Duration) -> (u64, Duration) {
        let t0 = Instant::now();
        loop {
            let got = Clients::sum(&self.ask("status"), field);
            if got >= want || t0.elapsed() > timeout {
                return (got, t0.elapsed());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Latency and reconnect histograms, merged.
    fn histograms(&mut self) -> (Histogram<u64>, Histogram<u64>) {
        let new = || Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid bounds");
        let (mut latency, mut reconnect) = (new(), new());
        for reply in self.ask("hist") {
            for (key, h) in [("latency", &mut latency), ("reconnect", &mut reconnect)] {
                let Ok(pairs) = serde_json::from_value::<Vec<(u64, u64)>>(reply[key].clone())
                else {
                    continue;
                };
                for (v, c) in pairs {
                    let _ = h.record_n(v.clamp(1, MAX_LATENCY_US), c);
                }
            }
        }
        (latency, reconnect)
    }

    /// Streams behind the given last seqs (per job index).
    fn behind(&mut self, lasts: &[i64]) -> u64 {
        Clients::sum(&self.ask(&format!("behind {}", join(lasts))), "behind")
    }

    /// Closes every stream; what each process's streams saw, in order.
    fn close(mut self, lasts: &[i64]) -> Vec<Tally> {
        let replies = self.ask(&format!("close {}", join(lasts)));
        for p in &mut self.procs {
            let _ = p.child.wait();
        }
        replies
            .into_iter()
            .map(|r| serde_json::from_value(r).unwrap_or_default())
            .collect()
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        for p in &mut self.procs {
            if let Ok(None) = p.child.try_wait() {
                let _ = p.child.kill();
            }
            let _ = p.child.wait();
        }
    }
}

/// The kernel's memory that grows with sockets: `Slab` of /proc/meminfo and the TCP
/// buffer pages of /proc/net/sockstat, in KiB.
fn kernel_kib() -> (u64, u64) {
    let slab = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Slab:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0);
    let tcp_pages: u64 = std::fs::read_to_string("/proc/net/sockstat")
        .ok()
        .and_then(|t| {
            let line = t.lines().find(|l| l.starts_with("TCP:"))?;
            let mut words = line.split_whitespace();
            while let Some(w) = words.next() {
                if w == "mem" {
                    return words.next()?.parse().ok();
                }
            }
            None
        })
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    (slab, tcp_pages * page / 1024)
}

fn join(v: &[i64]) -> String {
    v.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
}

fn sum_tally(ts: &[Tally]) -> Tally {
    ts.iter().fold(Tally::default(), |a, t| Tally {
        gaps: a.gaps + t.gaps,
        dups: a.dups + t.dups,
        reorders: a.reorders + t.reorders,
        undelivered: a.undelivered + t.undelivered,
        receiving: a.receiving + t.receiving,
    })
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Last seqs written per job.
fn lasts(writers: &Writers) -> Vec<i64> {
    writers
        .progress
        .last_seq
        .iter()
        .map(|s| s.load(Ordering::Relaxed))
        .collect()
}

fn empty_row(system: &str, case: &str, subscribers: usize, jobs: usize, rate: f64) -> Row {
    Row {
        system: system.into(),
        case: case.into(),
        subscribers,
        jobs,
        rate,
        demand_per_s: rate * subscribers as f64 / jobs.max(1) as f64,
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
        cpu_pct: 0.0,
        client_cpu_pct: 0.0,
        load: loadavg(),
        rss_per_conn_kib: 0.0,
        reads_per_batch: None,
        backfill_reads: None,
        reconnect_p50_ms: None,
        reconnect_p99_ms: None,
        drops: 0,
        http_errors: 0,
        listen_overflows: 0,
        idle_cpu_pct: None,
        replicas: Vec::new(),
        note: String::new(),
    }
}

/// `limit`: `LIMIT_HELD` streams on one server, its memory per stream and idle CPU
/// with keep-alives running; then `LIMIT_EXTRA` more clients, and what they get; then
/// writes, and whether the held streams still get every event exactly once.
pub fn limit_case(
    rt: &tokio::runtime::Runtime,
    server: &Server,
    url: &str,
    timing: Timing,
    source_base: u32,
) -> Row {
    let name = server.kind.name();
    let mut row = empty_row(name, "limit", LIMIT_HELD, LIMIT_JOBS, LIMIT_RATE);
    let jobs: Arc<Vec<Uuid>> = Arc::new((0..LIMIT_JOBS).map(|_| Uuid::new_v4()).collect());
    if server.kind.uses_db() {
        if let Err(e) = rt.block_on(crate::create_jobs(url, &jobs)) {
            row.note = format!("could not create jobs: {e}");
            return row;
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let baseline = server.memory_kib();
    let stream = |i: usize| {
        let job = i % LIMIT_JOBS;
        (server.addr, server.addr, server.stream_path(jobs[job]), job)
    };
    // The held streams: two processes, so each stays under its own limit.
    let held: Vec<_> = (0..LIMIT_HELD).map(stream).collect();
    let mut clients = match Clients::start(held, source_base, false, LIMIT_HELD.div_ceil(2)) {
        Ok(c) => c,
        Err(e) => {
            row.note = format!("client processes failed to start: {e}");
            return row;
        }
    };
    let (connected, took) = clients.wait("connected", LIMIT_HELD as u64, timing.connect * 2);
    let mut note = format!(
        "{connected} of {LIMIT_HELD} held in {:.0} s",
        took.as_secs_f64()
    );
    std::thread::sleep(timing.warm);
    // Idle, keep-alives running; `/healthz` asked every 50 ms meanwhile, whose worst
    // answer times show whether a keep-alive round holds up the runtime.
    let cpu0 = server.cpu_seconds();
    let t0 = Instant::now();
    let probe = server.healthz().map(|_| {
        let server_addr = server.addr;
        std::thread::spawn(move || {
            let mut times = Vec::new();
            while t0.elapsed() < IDLE_WINDOW {
                let asked = Instant::now();
                if crate::systems::http_get(server_addr, "/healthz").is_ok() {
                    times.push(asked.elapsed());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            times.sort();
            times
        })
    });
    std::thread::sleep(IDLE_WINDOW);
    let idle_cpu = (server.cpu_seconds() - cpu0) / t0.elapsed().as_secs_f64() * 100.0;
    if let Some(times) = probe.and_then(|p| p.join().ok()) {
        if let (Some(max), false) = (times.last(), times.is_empty()) {
            let p99 = times[(times.len() * 99 / 100).min(times.len() - 1)];
            note.push_str(&format!(
                "; /healthz while idle: {} answers, p99 {:.1} ms, max {:.1} ms",
                times.len(),
                p99.as_secs_f64() * 1000.0,
                max.as_secs_f64() * 1000.0
            ));
        }
    }
    let held_kib = server.memory_kib();
    row.rss_per_conn_kib = held_kib.saturating_sub(baseline) as f64 / connected.max(1) as f64;
    row.idle_cpu_pct = Some(idle_cpu);
    note.push_str(&format!(
        "; idle {idle_cpu:.1} % CPU over {} s with keep-alives",
        IDLE_WINDOW.as_secs()
    ));

    // Past the limit: clients that do not retry a refusal, as EventSource does not.
    let extra: Vec<_> = (LIMIT_HELD..LIMIT_HELD + LIMIT_EXTRA).map(stream).collect();
    let mut extras = match Clients::start(extra, source_base + LIMIT_HELD as u32, true, LIMIT_EXTRA)
    {
        Ok(c) => c,
        Err(e) => {
            row.note = format!("{note}; extra clients failed to start: {e}");
            return row;
        }
    };
    // A refused client may wait for its head's 30 s timeout when nothing answers.
    extras.wait("settled", LIMIT_EXTRA as u64, Duration::from_secs(60));
    let status = extras.ask("status");
    let extra_ok = Clients::sum(&status, "connected");
    let refused = Clients::sum(&status, "http_errors");
    let retry_after = Clients::sum(&status, "retry_after");
    let closed = Clients::sum(&status, "head_failures");
    note.push_str(&format!(
        "; streams {}..{}: {extra_ok} served, {refused} refused ({retry_after} with Retry-After), \
         {closed} closed before a head",
        LIMIT_HELD + 1,
        LIMIT_HELD + LIMIT_EXTRA
    ));

    // Writes: every held stream gets one event a second.
    let writers = Writers::start(
        server.kind,
        server.publish_addr,
        url,
        jobs.clone(),
        LIMIT_RATE,
    );
    std::thread::sleep(timing.warm);
    let cpu0 = server.cpu_seconds();
    let d0 = Clients::sum(&clients.ask("status"), "delivered")
        + Clients::sum(&extras.ask("status"), "delivered");
    let batches0 = writers.progress.batches.load(Ordering::Relaxed);
    clients.ask("measure 1");
    extras.ask("measure 1");
    let t0 = Instant::now();
    std::thread::sleep(timing.measure);
    let elapsed = t0.elapsed().as_secs_f64();
    clients.ask("measure 0");
    extras.ask("measure 0");
    let delivered = Clients::sum(&clients.ask("status"), "delivered")
        + Clients::sum(&extras.ask("status"), "delivered")
        - d0;
    row.cpu_pct = (server.cpu_seconds() - cpu0) / elapsed * 100.0;
    row.written_per_s =
        (writers.progress.batches.load(Ordering::Relaxed) - batches0) as f64 / elapsed;
    let progress = writers.stop();
    let last: Vec<i64> = progress
        .last_seq
        .iter()
        .map(|s| s.load(Ordering::Relaxed))
        .collect();
    let deadline = Instant::now() + timing.drain;
    while clients.behind(&last) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let (latency, _) = clients.histograms();
    let status = clients.ask("status");
    row.drops = Clients::sum(&status, "drops");
    row.http_errors = Clients::sum(&status, "http_errors") + refused;
    let tally = sum_tally(&clients.close(&last));
    let extra_tally = sum_tally(&extras.close(&last));
    let streams_receiving = connected + extra_ok;
    row.subscribers = streams_receiving as usize;
    row.demand_per_s = LIMIT_RATE * streams_receiving as f64 / LIMIT_JOBS as f64;
    row.deliveries_per_s = delivered as f64 / elapsed;
    row.demand_met = row.deliveries_per_s / row.demand_per_s.max(1.0);
    row.p50_ms = ms(latency.value_at_quantile(0.5));
    row.p99_ms = ms(latency.value_at_quantile(0.99));
    row.max_ms = ms(latency.max());
    row.gaps = tally.gaps + extra_tally.gaps;
    row.dups = tally.dups + extra_tally.dups;
    row.reorders = tally.reorders + extra_tally.reorders;
    row.undelivered = tally.undelivered + extra_tally.undelivered;
    note.push_str(&format!(
        "; then {} of {} held streams received",
        tally.receiving, connected
    ));
    if let Some(healthy) = server.healthz() {
        note.push_str(if healthy {
            "; /healthz 200 after"
        } else {
            "; /healthz not 200 after"
        });
    }
    row.note = note;
    row.load = loadavg();
    row
}

/// `replicas` and `replica_storm`: `REPLICA_STREAMS` streams over `REPLICAS` gateways
/// on one PostgreSQL, `REPLICA_JOBS` jobs at 1 event/s each; then (with `storm`) every
/// stream drops and resumes with `Last-Event-ID` on the next replica.
pub fn replicas_case(
    rt: &tokio::runtime::Runtime,
    url: &str,
    timing: Timing,
    source_base: u32,
    storm: bool,
    notes: &mut Vec<String>,
) -> Vec<Row> {
    let rate = REPLICA_JOBS as f64;
    let mut row = empty_row("eventgate", "replicas", REPLICA_STREAMS, REPLICA_JOBS, rate);
    let mut replicas = Vec::new();
    for _ in 0..REPLICAS {
        match Server::start(Kind::Eventgate, url) {
            Ok(s) => replicas.push(s),
            Err(e) => {
                row.note = format!("replica failed to start: {e}");
                return vec![row];
            }
        }
    }
    let jobs: Arc<Vec<Uuid>> = Arc::new((0..REPLICA_JOBS).map(|_| Uuid::new_v4()).collect());
    if let Err(e) = rt.block_on(crate::create_jobs(url, &jobs)) {
        row.note = format!("could not create jobs: {e}");
        return vec![row];
    }
    std::thread::sleep(Duration::from_millis(500));
    let baselines: Vec<u64> = replicas.iter().map(Server::memory_kib).collect();
    let kernel0 = kernel_kib();
    // Replica r holds streams r*per .. (r+1)*per, over every job; each resumes on r+1.
    let per = REPLICA_STREAMS.div_ceil(REPLICAS);
    let streams: Vec<_> = (0..REPLICA_STREAMS)
        .map(|i| {
            let r = (i / per).min(REPLICAS - 1);
            let job = i % REPLICA_JOBS;
            (
                replicas[r].addr,
                replicas[(r + 1) % REPLICAS].addr,
                replicas[r].stream_path(jobs[job]),
                job,
            )
        })
        .collect();
    // One client process per replica (the last holds a few fewer).
    let started = Clients::start(streams, source_base, false, per.min(PER_CLIENT));
    let mut clients = match started {
        Ok(c) => c,
        Err(e) => {
            row.note = format!("client processes failed to start: {e}");
            return vec![row];
        }
    };
    let (connected, took) = clients.wait(
        "connected",
        REPLICA_STREAMS as u64,
        Duration::from_secs(300),
    );
    let mut note = format!(
        "{connected} of {REPLICA_STREAMS} connected in {:.0} s",
        took.as_secs_f64()
    );
    std::thread::sleep(timing.warm);
    let cpu_of = |rs: &[Server]| rs.iter().map(Server::cpu_seconds).collect::<Vec<_>>();
    let cpu0 = cpu_of(&replicas);
    let t0 = Instant::now();
    std::thread::sleep(IDLE_WINDOW);
    let idle_s = t0.elapsed().as_secs_f64();
    let idle_cpu: Vec<f64> = cpu_of(&replicas)
        .iter()
        .zip(&cpu0)
        .map(|(a, b)| (a - b) / idle_s * 100.0)
        .collect();
    let held: Vec<u64> = replicas.iter().map(Server::memory_kib).collect();
    let grown: u64 = held
        .iter()
        .zip(&baselines)
        .map(|(h, b)| h.saturating_sub(*b))
        .sum();
    row.rss_per_conn_kib = grown as f64 / connected.max(1) as f64;
    let kernel1 = kernel_kib();
    notes.push(format!(
        "replicas: kernel memory for {connected} streams (both ends on this machine): slab \
         +{} KiB, TCP buffers +{} KiB ({:.2} KiB per socket, slab and buffers)",
        kernel1.0.saturating_sub(kernel0.0),
        kernel1.1.saturating_sub(kernel0.1),
        (kernel1.0.saturating_sub(kernel0.0) + kernel1.1.saturating_sub(kernel0.1)) as f64
            / (2 * connected.max(1)) as f64
    ));
    row.idle_cpu_pct = Some(idle_cpu.iter().sum());
    note.push_str(&format!(
        "; idle {:.1} % CPU over all {REPLICAS} over {} s ({})",
        idle_cpu.iter().sum::<f64>(),
        IDLE_WINDOW.as_secs(),
        idle_cpu
            .iter()
            .map(|c| format!("{c:.1}"))
            .collect::<Vec<_>>()
            .join(" / ")
    ));

    let writers = Writers::start(Kind::Eventgate, replicas[0].addr, url, jobs.clone(), rate);
    std::thread::sleep(timing.warm);
    let reads = |rs: &[Server]| rs.iter().map(|s| s.reads()).collect::<Vec<_>>();
    let cpu0 = cpu_of(&replicas);
    let reads0 = reads(&replicas);
    let status0 = clients.ask("status");
    let batches0 = writers.progress.batches.load(Ordering::Relaxed);
    let own0 = Clients::sum_f(&status0, "cpu");
    clients.ask("measure 1");
    let t0 = Instant::now();
    std::thread::sleep(timing.measure);
    let elapsed = t0.elapsed().as_secs_f64();
    clients.ask("measure 0");
    let status1 = clients.ask("status");
    let batches = writers.progress.batches.load(Ordering::Relaxed) - batches0;
    let busy_cpu: Vec<f64> = cpu_of(&replicas)
        .iter()
        .zip(&cpu0)
        .map(|(a, b)| (a - b) / elapsed * 100.0)
        .collect();
    let reads1 = reads(&replicas);
    let live_reads: u64 = reads0
        .iter()
        .zip(&reads1)
        .filter_map(|(a, b)| Some(b.as_ref()?.0 - a.as_ref()?.0))
        .sum();
    let shares: Vec<f64> = status0
        .iter()
        .zip(&status1)
        .map(|(a, b)| {
            (b["delivered"].as_u64().unwrap_or(0) - a["delivered"].as_u64().unwrap_or(0)) as f64
                / elapsed
        })
        .collect();
    let delivered: f64 = shares.iter().sum();
    let (latency, _) = clients.histograms();
    row.deliveries_per_s = delivered;
    row.demand_met = delivered / row.demand_per_s;
    row.written_per_s = batches as f64 / elapsed;
    row.p50_ms = ms(latency.value_at_quantile(0.5));
    row.p99_ms = ms(latency.value_at_quantile(0.99));
    row.max_ms = ms(latency.max());
    row.cpu_pct = busy_cpu.iter().sum();
    row.client_cpu_pct = (Clients::sum_f(&status1, "cpu") - own0) / elapsed * 100.0;
    row.reads_per_batch = (batches > 0).then(|| live_reads as f64 / batches as f64);
    row.replicas = shares
        .iter()
        .copied()
        .zip(busy_cpu.iter().copied())
        .collect();
    note.push_str(&format!(
        "; per replica deliveries/s {} and CPU % {}",
        shares
            .iter()
            .map(|d| format!("{:.1}k", d / 1000.0))
            .collect::<Vec<_>>()
            .join(" / "),
        busy_cpu
            .iter()
            .map(|c| format!("{c:.0}"))
            .collect::<Vec<_>>()
            .join(" / ")
    ));
    row.load = loadavg();
    notes.push(format!(
        "replicas: per-replica idle CPU % {:?}, busy CPU % {:?}, deliveries/s {:?}, RSS KiB {:?} (baseline {:?})",
        idle_cpu.iter().map(|c| (c * 10.0).round() / 10.0).collect::<Vec<_>>(),
        busy_cpu.iter().map(|c| c.round()).collect::<Vec<_>>(),
        shares.iter().map(|d| d.round()).collect::<Vec<_>>(),
        held,
        baselines
    ));

    let mut storm_row = None;
    if storm {
        let mut s = empty_row(
            "eventgate",
            "replica_storm",
            REPLICA_STREAMS,
            REPLICA_JOBS,
            rate,
        );
        let reads0 = reads(&replicas);
        let at_storm = lasts(&writers);
        let (hist_latency0, _) = clients.histograms();
        let cpu0 = cpu_of(&replicas);
        clients.ask("measure 1");
        let t0 = Instant::now();
        clients.ask("reconnect");
        let (resumed, took) = clients.wait(
            "reconnected",
            REPLICA_STREAMS as u64,
            Duration::from_secs(180),
        );
        // Caught up: every stream has what was written when the storm began.
        let deadline = Instant::now() + Duration::from_secs(60);
        while clients.behind(&at_storm) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let caught = t0.elapsed();
        // A few seconds more of live delivery on the new replicas.
        std::thread::sleep(timing.warm);
        let elapsed = t0.elapsed().as_secs_f64();
        clients.ask("measure 0");
        let reads1 = reads(&replicas);
        let backfill: u64 = reads0
            .iter()
            .zip(&reads1)
            .filter_map(|(a, b)| Some(b.as_ref()?.1 - a.as_ref()?.1))
            .sum();
        let (mut latency, reconnect) = clients.histograms();
        let _ = latency.subtract(&hist_latency0);
        s.p50_ms = ms(latency.value_at_quantile(0.5));
        s.p99_ms = ms(latency.value_at_quantile(0.99));
        s.max_ms = ms(latency.max());
        s.reconnect_p50_ms = Some(ms(reconnect.value_at_quantile(0.5)));
        s.reconnect_p99_ms = Some(ms(reconnect.value_at_quantile(0.99)));
        s.backfill_reads = Some(backfill);
        s.cpu_pct = cpu_of(&replicas)
            .iter()
            .zip(&cpu0)
            .map(|(a, b)| (a - b) / elapsed * 100.0)
            .sum();
        let status = clients.ask("status");
        s.http_errors = Clients::sum(&status, "http_errors");
        s.note = format!(
            "{resumed} of {REPLICA_STREAMS} resumed on the next replica in {:.1} s, all caught up \
             in {:.1} s, {backfill} backfill reads",
            took.as_secs_f64(),
            caught.as_secs_f64()
        );
        s.load = loadavg();
        storm_row = Some(s);
    }

    let progress = writers.stop();
    let last: Vec<i64> = progress
        .last_seq
        .iter()
        .map(|s| s.load(Ordering::Relaxed))
        .collect();
    let deadline = Instant::now() + timing.drain * 2;
    while clients.behind(&last) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = clients.ask("status");
    let tallies = clients.close(&last);
    let tally = sum_tally(&tallies);
    row.drops = Clients::sum(&status, "drops");
    row.http_errors = Clients::sum(&status, "http_errors");
    // Gaps and duplicates are per stream over its whole life, storm included.
    for r in std::iter::once(&mut row).chain(storm_row.as_mut()) {
        r.gaps = tally.gaps;
        r.dups = tally.dups;
        r.reorders = tally.reorders;
        r.undelivered = tally.undelivered;
    }
    row.note = note;
    drop(replicas);
    std::iter::once(row).chain(storm_row).collect()
}
