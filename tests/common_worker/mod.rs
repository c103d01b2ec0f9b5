//! Set-up for the worker tests: one PostgreSQL per test binary, a fresh database per
//! test, the real `eventgate` binary, and reading back what it stored.

#![allow(dead_code)]

use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use eventgate::cluster::{Cluster, Options};
use eventgate::worker::SPLIT_MARKER;
use serde_json::Value;
use uuid::Uuid;

/// The server every test shares: `DATABASE_URL` if set, else a throwaway cluster.
fn server_url() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    URL.get_or_init(|| match std::env::var("DATABASE_URL") {
        Ok(url) => url,
        Err(_) => CLUSTER
            .get_or_init(|| Cluster::start(Options::default()).expect("start postgresql"))
            .url(),
    })
}

/// `url` with its database replaced by `database`.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    format!("{}/{database}{query}", &base[..path_start])
}

/// A new migrated database on `server`, returned as a connection string.
pub async fn fresh_database_on(server: &str) -> String {
    let name = format!("worker_{}", Uuid::new_v4().simple());
    let admin = eventgate::db::connect(server).await.expect("connect");
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
    let url = with_database(server, &name);
    eventgate::db::migrate(&url).await.expect("migrate");
    url
}

/// A new migrated database on the shared server.
pub async fn fresh_database() -> String {
    fresh_database_on(server_url()).await
}

/// A job in `queued` state.
pub async fn create_job(url: &str) -> Uuid {
    let client = eventgate::db::connect(url).await.expect("connect");
    let job = eventgate::store::create_job(&client, None, "test", "queued", &serde_json::json!({}))
        .await
        .expect("create job");
    job.id
}

/// `eventgate run` as a child process, ready to be waited for or signalled.
pub fn worker(url: &str, job: Uuid, flags: &[&str], command: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_eventgate"));
    cmd.arg("run")
        .arg("--job")
        .arg(job.to_string())
        .args(flags)
        .arg("--")
        .args(command)
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Runs `eventgate run` to its end; returns its exit code.
pub async fn run(url: &str, job: Uuid, flags: &[&str], command: &[&str]) -> i32 {
    let out = worker(url, job, flags, command)
        .output()
        .await
        .expect("run eventgate");
    if !out.stderr.is_empty() {
        eprintln!("worker stderr: {}", String::from_utf8_lossy(&out.stderr));
    }
    out.status
        .code()
        .expect("the worker exits, it is not killed")
}

/// Runs `sh -c script` under the worker.
pub async fn run_sh(url: &str, job: Uuid, flags: &[&str], script: &str) -> i32 {
    run(url, job, flags, &["sh", "-c", script]).await
}

/// One stored event.
#[derive(Debug, Clone)]
pub struct Stored {
    pub seq: i64,
    pub level: String,
    pub message: String,
    pub payload: Value,
}

impl Stored {
    pub fn kind(&self) -> &str {
        self.payload["kind"].as_str().unwrap_or("")
    }

    pub fn stream(&self) -> &str {
        self.payload["stream"].as_str().unwrap_or("")
    }
}

/// Every event of the job, by seq; checks that seqs are 1, 2, 3, ... without gaps.
pub async fn events(url: &str, job: Uuid) -> Vec<Stored> {
    let client = eventgate::db::connect(url).await.expect("connect");
    let rows = client
        .query(
            "SELECT seq, level, message, payload FROM agent_job_events \
             WHERE job_id = $1 ORDER BY seq",
            &[&job],
        )
        .await
        .expect("select events");
    let events: Vec<Stored> = rows
        .iter()
        .map(|r| Stored {
            seq: r.get(0),
            level: r.get(1),
            message: r.get(2),
            payload: r.get(3),
        })
        .collect();
    for (i, event) in events.iter().enumerate() {
        assert_eq!(event.seq, i as i64 + 1, "seqs have no gaps");
    }
    events
}

/// The lines of one stream as the command printed them: messages split on newlines,
/// pieces of cut lines joined again.
pub fn lines(events: &[Stored], stream: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut open = String::new();
    for event in events {
        if event.kind() != "log" || event.stream() != stream || !event.payload["dropped"].is_null()
        {
            continue;
        }
        for line in event.message.split('\n') {
            match line.strip_suffix(SPLIT_MARKER) {
                Some(piece) => open.push_str(piece),
                None => {
                    open.push_str(line);
                    lines.push(std::mem::take(&mut open));
                }
            }
        }
    }
    lines
}

/// The job's status.
pub async fn status(url: &str, job: Uuid) -> Option<String> {
    let client = eventgate::db::connect(url).await.expect("connect");
    let row = client
        .query_opt("SELECT status FROM agent_jobs WHERE id = $1", &[&job])
        .await
        .expect("select job");
    row.map(|r| r.get(0))
}

/// Every text the job stored: messages, payloads, and the job row itself.
pub async fn everything_stored(url: &str, job: Uuid) -> String {
    let client = eventgate::db::connect(url).await.expect("connect");
    let rows = client
        .query(
            "SELECT message || ' ' || payload::text FROM agent_job_events WHERE job_id = $1 \
             UNION ALL SELECT name || ' ' || payload::text FROM agent_jobs WHERE id = $1",
            &[&job],
        )
        .await
        .expect("select");
    rows.iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until the job has a log line equal to `line` (a generous deadline, not a
/// timing assertion: it only bounds a hung test).
pub async fn wait_for_line(url: &str, job: Uuid, line: &str) {
    for _ in 0..600 {
        let events = events(url, job).await;
        if lines(&events, "stdout").iter().any(|l| l == line) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{line:?} never reached the table");
}

/// The payload of the job's last event (its final status).
pub fn final_status(events: &[Stored]) -> &Value {
    let last = events.last().expect("some events");
    assert_eq!(last.kind(), "status", "the status event comes last");
    &last.payload
}

/// `value` percent-encoded, keeping ASCII alphanumerics and the bytes of `keep` (each
/// URL encoder keeps its own set).
pub fn percent_encoded(value: &str, keep: &str) -> String {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || keep.as_bytes().contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Everything a reader could decode out of `text` as base64: each run of base64
/// characters at each of its four alignments, decoded (lossy), joined by `|`.
pub fn base64_decodings(text: &str) -> String {
    use base64::Engine;
    let engines = [
        base64::engine::general_purpose::STANDARD_NO_PAD,
        base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ];
    let mut out = String::new();
    let runs = text.split(|c: char| !(c.is_ascii_alphanumeric() || "+/-_".contains(c)));
    for run in runs {
        for skip in 0..4.min(run.len()) {
            let part = &run[skip..];
            let part = &part[..part.len() / 4 * 4];
            for engine in &engines {
                if let Ok(bytes) = engine.decode(part) {
                    out.push_str(&String::from_utf8_lossy(&bytes));
                    out.push('|');
                }
            }
        }
    }
    out
}
