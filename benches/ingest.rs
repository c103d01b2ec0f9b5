//! `cargo bench --bench ingest [-- --quick]`: how fast `eventgate run` stores a flood,
//! beside what the database itself can take for the same bytes, in the same run.
//!
//! 1. `eventgate run --job J -- seq 1 N` end to end (the release binary cargo built for
//!    this bench): wall time from spawn to exit, lines/s and rows/s, peak RSS of the
//!    worker process (from `wait4`), and a check that every line was stored.
//! 2. The ceiling: the same `seq` output, cut into rows of the same size (whole lines,
//!    up to 64 KiB), sent with ONE `COPY ... FROM STDIN` into the same table (same
//!    triggers) of the same database.
//! 3. First-line latency: a quiet command prints its clock; the row's `created_at`
//!    minus that time.
//!
//! Prints a Markdown table. Uses `DATABASE_URL` if set, else a throwaway cluster
//! (fsync off, as in the tests). Extra arguments (`--bench` from cargo) are ignored.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use eventgate::cluster::{Cluster, Options};
use futures::SinkExt;
use uuid::Uuid;

/// Lines of the full run and of `--quick`.
const LINES: u64 = 10_000_000;
const QUICK_LINES: u64 = 1_000_000;
/// First-line latency samples.
const LATENCY_RUNS: usize = 5;

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let lines = if quick { QUICK_LINES } else { LINES };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(bench(lines));
}

async fn bench(lines: u64) {
    let cluster;
    let server = match std::env::var("DATABASE_URL") {
        Ok(url) => url,
        Err(_) => {
            cluster = Cluster::start(Options::default()).expect("start postgresql");
            cluster.url()
        }
    };
    let url = fresh_database(&server).await;
    let client = eventgate::db::connect(&url).await.expect("connect");

    // 1. The worker.
    let job = Uuid::new_v4();
    let bin = env!("CARGO_BIN_EXE_eventgate");
    let count = lines.to_string();
    let started = Instant::now();
    // Reaped by `wait4` below, which also reports its peak RSS.
    #[allow(clippy::zombie_processes)]
    let child = Command::new(bin)
        .args([
            "run",
            "--create",
            "--job",
            &job.to_string(),
            "--",
            "seq",
            "1",
            &count,
        ])
        .env("DATABASE_URL", &url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn eventgate");
    let (code, max_rss_kib) = wait4(child.id() as i32);
    let worker_time = started.elapsed();
    assert_eq!(code, 0, "eventgate run failed");
    let row = client
        .query_one(
            "SELECT count(*), coalesce(sum((payload->>'lines')::bigint), 0)::bigint \
             FROM agent_job_events WHERE job_id = $1 AND payload->>'kind' = 'log'",
            &[&job],
        )
        .await
        .expect("count");
    let worker_rows: i64 = row.get(0);
    let stored_lines: i64 = row.get(1);
    assert_eq!(stored_lines as u64, lines, "every line stored");
    let last: String = client
        .query_one(
            "SELECT message FROM agent_job_events WHERE job_id = $1 \
             AND payload->>'kind' = 'log' ORDER BY seq DESC LIMIT 1",
            &[&job],
        )
        .await
        .expect("last")
        .get(0);
    assert!(
        last.ends_with(&format!("\n{lines}")),
        "the last line is last"
    );

    // 2. The ceiling: the same bytes, the same row size, one COPY.
    let output = Command::new("seq")
        .args(["1", &count])
        .output()
        .expect("seq")
        .stdout;
    let copy_job = Uuid::new_v4();
    eventgate::store::create_job(
        &client,
        Some(copy_job),
        "copy",
        "running",
        &serde_json::json!({}),
    )
    .await
    .expect("create job");
    let (data, copy_rows) = copy_data(
        copy_job,
        &output,
        eventgate::worker::DEFAULT_MAX_EVENT_BYTES,
    );
    let started = Instant::now();
    let sink = client
        .copy_in("COPY agent_job_events (job_id, level, message, payload) FROM STDIN")
        .await
        .expect("copy");
    futures::pin_mut!(sink);
    for piece in data.chunks(1 << 20) {
        sink.send(bytes::Bytes::copy_from_slice(piece))
            .await
            .expect("copy data");
    }
    let copied = sink.finish().await.expect("copy finish");
    let copy_time = started.elapsed();
    assert_eq!(copied, copy_rows);

    // 3. First-line latency.
    let mut latencies = Vec::new();
    for _ in 0..LATENCY_RUNS {
        latencies.push(first_line_latency(bin, &url, &client).await);
    }
    latencies.sort();

    let bytes = output.len() as f64;
    let per_s = |n: f64, t: Duration| n / t.as_secs_f64();
    let ratio = copy_time.as_secs_f64() / worker_time.as_secs_f64();
    println!();
    println!(
        "`eventgate run -- seq 1 {lines}` ({:.1} MB of output)",
        bytes / 1e6
    );
    println!();
    println!("| | eventgate run | COPY ceiling |");
    println!("|---|---:|---:|");
    println!(
        "| time | {:.2} s | {:.2} s |",
        worker_time.as_secs_f64(),
        copy_time.as_secs_f64()
    );
    println!("| rows | {worker_rows} | {copy_rows} |");
    println!(
        "| lines/s | {:.2} M | {:.2} M |",
        per_s(lines as f64, worker_time) / 1e6,
        per_s(lines as f64, copy_time) / 1e6
    );
    println!(
        "| rows/s | {:.0} | {:.0} |",
        per_s(worker_rows as f64, worker_time),
        per_s(copy_rows as f64, copy_time)
    );
    println!(
        "| MB/s | {:.1} | {:.1} |",
        per_s(bytes, worker_time) / 1e6,
        per_s(bytes, copy_time) / 1e6
    );
    println!(
        "| peak RSS of the worker | {:.1} MiB | |",
        max_rss_kib as f64 / 1024.0
    );
    println!(
        "| first line in the table (median / max of {LATENCY_RUNS}) | {:.0} ms / {:.0} ms | |",
        latencies[LATENCY_RUNS / 2].as_secs_f64() * 1e3,
        latencies[LATENCY_RUNS - 1].as_secs_f64() * 1e3
    );
    println!("| share of the ceiling | {:.0} % | 100 % |", ratio * 100.0);
    println!();
    println!(
        "The worker's time includes starting the process, connecting, marking the job \
         running, running `seq` and recording the final status."
    );
}

/// Waits for a child; returns its exit code and peak RSS in KiB.
fn wait4(pid: i32) -> (i32, i64) {
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to our own locals; pid is our un-reaped child.
    let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(reaped, pid, "wait4");
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    (code, usage.ru_maxrss)
}

/// COPY text-format rows for `output` cut into whole lines of at most `max` bytes
/// (the worker's rule). Returns the data and the row count.
fn copy_data(job: Uuid, output: &[u8], max: usize) -> (Vec<u8>, u64) {
    let mut data = Vec::with_capacity(output.len() * 11 / 10);
    let mut rows = 0;
    let mut rest = output;
    while !rest.is_empty() {
        let take = if rest.len() <= max {
            rest.len()
        } else {
            memchr::memrchr(b'\n', &rest[..max]).map_or(rest.len(), |i| i + 1)
        };
        let (event, tail) = rest.split_at(take);
        rest = tail;
        let message = event.strip_suffix(b"\n").unwrap_or(event);
        let lines = memchr::memchr_iter(b'\n', event).count();
        data.extend_from_slice(format!("{job}\tinfo\t").as_bytes());
        for &b in message {
            match b {
                b'\n' => data.extend_from_slice(b"\\n"),
                b'\\' => data.extend_from_slice(b"\\\\"),
                b'\t' => data.extend_from_slice(b"\\t"),
                b'\r' => data.extend_from_slice(b"\\r"),
                _ => data.push(b),
            }
        }
        data.extend_from_slice(
            format!("\t{{\"kind\":\"log\",\"stream\":\"stdout\",\"lines\":{lines}}}\n").as_bytes(),
        );
        rows += 1;
    }
    (data, rows)
}

/// Runs a quiet command that prints its clock; returns how long its line took to be
/// in the table.
async fn first_line_latency(bin: &str, url: &str, client: &tokio_postgres::Client) -> Duration {
    let job = Uuid::new_v4();
    let status = Command::new(bin)
        .args(["run", "--create", "--job", &job.to_string(), "--"])
        .args(["sh", "-c", "date +%s.%N; sleep 0.5"])
        .env("DATABASE_URL", url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .expect("run eventgate");
    assert!(status.success());
    let row = client
        .query_one(
            "SELECT message, extract(epoch FROM created_at)::float8 FROM agent_job_events \
             WHERE job_id = $1 AND payload->>'kind' = 'log' ORDER BY seq LIMIT 1",
            &[&job],
        )
        .await
        .expect("first line");
    let printed: f64 = row.get::<_, String>(0).trim().parse().expect("a clock");
    let stored: f64 = row.get(1);
    Duration::from_secs_f64((stored - printed).max(0.0))
}

async fn fresh_database(server: &str) -> String {
    let name = format!("ingest_{}", Uuid::new_v4().simple());
    let admin = eventgate::db::connect(server).await.expect("connect");
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
    let url = match server.rsplit_once('/') {
        Some((base, _)) if !base.ends_with('/') => format!("{base}/{name}"),
        _ => format!("{server}/{name}"),
    };
    eventgate::db::migrate(&url).await.expect("migrate");
    url
}
