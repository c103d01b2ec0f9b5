//! Past the NOTIFY lock: write batches per second and commit-to-receive latency with
//! W writers over 1,000 jobs (fsync on), for
//!   (a) `always`: one NOTIFY per statement (the naive design),
//!   (b) `debounced`: the default (at most one NOTIFY per job per second, plus the
//!       gateway's counter poll every 25 ms),
//!   (c) `ceiling`: no NOTIFY and no gateway at all: the database's own write ceiling,
//! in one run. `cargo bench --bench notify [-- --quick]`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use eventgate::cluster::{Cluster, Options};
use http_body_util::{BodyExt, Empty};
use uuid::Uuid;

const JOBS: usize = 1000;
const WRITERS: usize = 16;
const ROWS_PER_BATCH: i32 = 10;
const SUBSCRIBED_JOBS: usize = 100;

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

struct Outcome {
    mode: &'static str,
    batches_per_s: f64,
    notifications: u64,
    deliveries: usize,
    gaps: usize,
    latencies_us: Vec<u64>,
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    // Modes take turns, round after round, so they share the machine's noise; the
    // report gives the median rate over the rounds and the pooled latencies.
    let (seconds, rounds) = if quick { (3, 1) } else { (6, 3) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    eprintln!("starting PostgreSQL (fsync on)...");
    let cluster = Cluster::start(Options {
        fsync: true,
        max_connections: 100,
    })
    .expect("start postgresql");
    let url = cluster.url();
    let outcomes = rt.block_on(async {
        eventgate::db::migrate(&url).await.unwrap();
        let db = eventgate::db::connect(&url).await.unwrap();
        let mut jobs = Vec::with_capacity(JOBS);
        for _ in 0..JOBS {
            let id = Uuid::new_v4();
            db.execute(
                "INSERT INTO agent_jobs (id, name, status) VALUES ($1, 'bench', 'running')",
                &[&id],
            )
            .await
            .unwrap();
            jobs.push(id);
        }
        let jobs = Arc::new(jobs);
        let mut runs: Vec<Vec<Outcome>> = vec![Vec::new(), Vec::new(), Vec::new()];
        for round in 0..rounds {
            for (i, mode) in ["always", "debounced", "ceiling"].into_iter().enumerate() {
                eprintln!("round {}/{rounds}, mode {mode}: {seconds} s...", round + 1);
                let window = Duration::from_secs(seconds);
                runs[i].push(run_mode(&url, mode, jobs.clone(), window).await);
            }
        }
        runs.into_iter().map(merge).collect::<Vec<_>>()
    });
    drop(cluster);
    report(&outcomes, seconds, rounds);
}

/// One mode's rounds as one outcome: the median rate, everything else summed.
fn merge(mut rounds: Vec<Outcome>) -> Outcome {
    rounds.sort_by(|a, b| a.batches_per_s.total_cmp(&b.batches_per_s));
    let median = rounds[rounds.len() / 2].batches_per_s;
    let mut latencies_us: Vec<u64> = rounds.iter().flat_map(|o| o.latencies_us.clone()).collect();
    latencies_us.sort_unstable();
    Outcome {
        mode: rounds[0].mode,
        batches_per_s: median,
        notifications: rounds.iter().map(|o| o.notifications).sum(),
        deliveries: rounds.iter().map(|o| o.deliveries).sum(),
        gaps: rounds.iter().map(|o| o.gaps).sum(),
        latencies_us,
    }
}

async fn run_mode(
    url: &str,
    mode: &'static str,
    jobs: Arc<Vec<Uuid>>,
    window: Duration,
) -> Outcome {
    // The gateway, in this process, for the modes that deliver.
    let gateway = if mode == "ceiling" {
        None
    } else {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let mut config = eventgate::Config::new(url);
        config.max_streams_per_client = 100_000;
        let task = tokio::spawn(eventgate::server::run(listener, config, async {
            let _ = stop_rx.await;
        }));
        wait_ready(addr).await;
        Some((addr, stop_tx, task))
    };
    let notifications_before = match &gateway {
        Some((addr, _, _)) => metric(*addr, "eventgate_notifications_total").await,
        None => 0,
    };

    // Subscribers: one per job on the first SUBSCRIBED_JOBS jobs.
    let stop = Arc::new(AtomicBool::new(false));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let mut subscribers = Vec::new();
    if let Some((addr, _, _)) = &gateway {
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
                *addr,
                job,
                after,
                stop.clone(),
                latencies.clone(),
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let batches = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + window;
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (url, jobs, batches) = (url.to_string(), jobs.clone(), batches.clone());
        writers.push(tokio::spawn(async move {
            let client = eventgate::db::connect(&url).await.unwrap();
            let setting = match mode {
                "always" => "SET eventgate.notify = 'always'",
                "ceiling" => "SET eventgate.notify = 'off'",
                _ => "SELECT 1",
            };
            client.batch_execute(setting).await.unwrap();
            let stmt = client
                .prepare(
                    "INSERT INTO agent_job_events (job_id, level, message, payload) \
                     SELECT $1, 'info', $2, '{\"kind\": \"log\", \"stream\": \"stdout\"}' \
                     FROM generate_series(1, $3::int)",
                )
                .await
                .unwrap();
            let mut rng = fastrand::Rng::with_seed(w as u64);
            while Instant::now() < deadline {
                let job = jobs[rng.usize(..jobs.len())];
                let t = now_us().to_string();
                client
                    .execute(&stmt, &[&job, &t, &ROWS_PER_BATCH])
                    .await
                    .unwrap();
                batches.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let started = Instant::now();
    for w in writers {
        w.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let batches = batches.load(Ordering::Relaxed);

    // Let the last batches arrive (the bound is the counter poll: 25 ms), then stop.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    let mut deliveries = 0;
    let mut gaps = 0;
    for s in subscribers {
        let (n, g) = s.await.unwrap();
        deliveries += n;
        gaps += g;
    }
    let notifications = match &gateway {
        Some((addr, _, _)) => {
            metric(*addr, "eventgate_notifications_total").await - notifications_before
        }
        None => 0,
    };
    if let Some((_, stop_tx, task)) = gateway {
        let _ = stop_tx.send(());
        let _ = task.await;
    }
    let mut latencies_us = std::mem::take(&mut *latencies.lock().unwrap());
    latencies_us.sort_unstable();
    Outcome {
        mode,
        batches_per_s: batches as f64 / elapsed,
        notifications,
        deliveries,
        gaps,
        latencies_us,
    }
}

/// One SSE subscriber over hyper's client; returns (events received, gaps seen).
async fn subscribe(
    addr: std::net::SocketAddr,
    job: Uuid,
    after: i64,
    stop: Arc<AtomicBool>,
    latencies: Arc<Mutex<Vec<u64>>>,
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
                local.push(at.saturating_sub(t));
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

async fn metric(addr: std::net::SocketAddr, name: &str) -> u64 {
    let text = http_get(addr, "/metrics").await.unwrap();
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

fn report(outcomes: &[Outcome], seconds: u64, rounds: u64) {
    let ceiling = outcomes
        .iter()
        .find(|o| o.mode == "ceiling")
        .map(|o| o.batches_per_s)
        .unwrap_or(f64::NAN);
    let mut md = format!(
        "NOTIFY lock benchmark: {WRITERS} writers, {JOBS} jobs, {ROWS_PER_BATCH} rows per batch, \
         fsync on, {SUBSCRIBED_JOBS} jobs with a subscriber; the modes take turns, {rounds} round(s) \
         of {seconds} s each, in one run: median write rate, NOTIFYs and deliveries summed, \
         latencies pooled.\n\n\
         | mode | write batches/s (median) | of ceiling | NOTIFYs received | deliveries | gaps | p50 ms | p99 ms | max ms |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    for o in outcomes {
        md.push_str(&format!(
            "| {} | {:.0} | {:.0} % | {} | {} | {} | {:.1} | {:.1} | {:.1} |\n",
            o.mode,
            o.batches_per_s,
            100.0 * o.batches_per_s / ceiling,
            o.notifications,
            o.deliveries,
            o.gaps,
            pct(&o.latencies_us, 0.5),
            pct(&o.latencies_us, 0.99),
            pct(&o.latencies_us, 1.0),
        ));
    }
    println!("{md}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("notify.md"), &md);
    if outcomes.iter().any(|o| o.gaps > 0) {
        eprintln!("gaps seen: delivery is broken");
        std::process::exit(1);
    }
}
