//! What writes events: plain SQL writers (some holding slow transactions open, some in
//! each NOTIFY mode), a flood used by the stall fault, and `eventgate run` worker
//! processes whose command is this example itself in `emit` mode.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_postgres::{Client, NoTls, Row};
use uuid::Uuid;

use crate::subscriber::now_us;

/// One plain multi-row statement for one job, as any client would write.
const INSERT_ONE_JOB: &str = "INSERT INTO agent_job_events (job_id, level, message, payload) \
     SELECT $1, 'info', m, '{\"kind\": \"log\", \"stream\": \"stdout\"}' FROM unnest($2::text[]) WITH ORDINALITY AS u(m, o) ORDER BY o RETURNING job_id, seq, message";

/// One statement touching several jobs (the trigger sends one hint per job).
const INSERT_MANY_JOBS: &str = "INSERT INTO agent_job_events (job_id, level, message, payload) \
     SELECT j, 'info', m, '{\"kind\": \"log\", \"stream\": \"stdout\"}' FROM unnest($1::uuid[], $2::text[]) WITH ORDINALITY AS u(j, m, o) \
     ORDER BY o RETURNING job_id, seq, message";

/// When each SQL-written event's commit was acknowledged to its writer, per job and
/// seq: the start of its commit-to-receive latency. (The `t=` stamp in the message is
/// earlier: a statement may wait on the job's row lock behind a slow transaction.)
/// With it, the content hash of what was written: at the end, every acknowledged
/// event must be in the final table as written, whatever failed over meanwhile.
pub struct Commits {
    /// `(µs, content hash)` by seq. A std Mutex: nothing awaits while it is held.
    jobs: HashMap<Uuid, Mutex<Vec<(u64, u64)>>>,
    /// Acknowledgements whose seq a later acknowledged write took again: at most one
    /// of the two can be in the table, so each of these is an acknowledged write lost.
    superseded: Mutex<Vec<u64>>,
}

/// Acknowledged events checked against the final table.
#[derive(Debug, Default, Clone, Copy)]
pub struct Acked {
    pub checked: u64,
    /// Not in the table, or there with other content.
    pub missing: u64,
    /// Missing too, but acknowledged while replication was asynchronous before a
    /// failover (`pg_failover_async`): lost by design, counted, not a failure.
    pub lost_async: u64,
}

impl Commits {
    pub fn new(jobs: &[Uuid]) -> Commits {
        Commits {
            jobs: jobs.iter().map(|&j| (j, Mutex::new(Vec::new()))).collect(),
            superseded: Mutex::new(Vec::new()),
        }
    }

    fn set(&self, rows: &[Row], us: u64) {
        for row in rows {
            let job: Uuid = row.get(0);
            let seq: i64 = row.get(1);
            let message: &str = row.get(2);
            if let Some(log) = self.jobs.get(&job) {
                let mut log = log.lock().expect("commit log lock");
                let i = seq as usize;
                if log.len() <= i {
                    log.resize(i + 1, (0, 0));
                }
                let hash = crate::track::content_hash(seq, message);
                let (before, old) = log[i];
                if before != 0 && old != hash {
                    self.superseded.lock().expect("lock").push(before);
                }
                log[i] = (us, hash);
            }
        }
    }

    /// Compares every acknowledged event with `table(job, seq)`, the content hash of
    /// that seq in the final table; `may_lose(µs)` tells whether an acknowledgement at
    /// that time could be lost (inside an asynchronous failover's window).
    pub fn check(
        &self,
        table: impl Fn(Uuid, i64) -> Option<u64>,
        may_lose: impl Fn(u64) -> bool,
    ) -> Acked {
        let mut acked = Acked::default();
        for (&job, log) in &self.jobs {
            let log = log.lock().expect("commit log lock");
            for (seq, &(us, hash)) in log.iter().enumerate() {
                if us == 0 {
                    continue;
                }
                acked.checked += 1;
                if table(job, seq as i64) != Some(hash) {
                    if may_lose(us) {
                        acked.lost_async += 1;
                    } else {
                        acked.missing += 1;
                    }
                }
            }
        }
        for &us in self.superseded.lock().expect("lock").iter() {
            acked.checked += 1;
            if may_lose(us) {
                acked.lost_async += 1;
            } else {
                acked.missing += 1;
            }
        }
        acked
    }

    /// The commit time of `seq`, once its writer has seen the acknowledgement.
    pub fn get(&self, job: Uuid, seq: i64) -> Option<u64> {
        let log = self.jobs.get(&job)?.lock().expect("commit log lock");
        log.get(seq as usize)
            .map(|&(us, _)| us)
            .filter(|&us| us > 0)
    }
}

/// Padding of each flood row, in bytes.
const FLOOD_PAD: usize = 3_000;

/// Counters the writers share with the report.
#[derive(Default)]
pub struct Stats {
    pub statements: AtomicU64,
    pub errors: AtomicU64,
    pub reconnects: AtomicU64,
    pub slow_transactions: AtomicU64,
}

/// How one SQL writer behaves.
#[derive(Debug, Clone)]
pub struct Writer {
    pub index: usize,
    /// Holds a transaction open between two inserts for 0.1-1.5 s.
    pub slow: bool,
    /// `eventgate.notify` for its session: "" (debounced), "always" or "off".
    pub notify: &'static str,
    /// Statements per second.
    pub rate: u32,
    pub seed: u64,
}

/// A connection of our own with an application_name that the faults leave alone.
pub async fn connect(url: &str, name: &str) -> Result<Client, tokio_postgres::Error> {
    let mut config: tokio_postgres::Config = url.parse()?;
    config
        .application_name(name)
        .connect_timeout(Duration::from_secs(5));
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Writes until `stop`, reconnecting through faults. Jobs get skewed load: the first
/// one is hot, so its subscribers see bursts.
pub async fn run(
    writer: Writer,
    url: String,
    jobs: Arc<Vec<Uuid>>,
    stop: Arc<AtomicBool>,
    stats: Arc<Stats>,
    commits: Arc<Commits>,
) {
    let mut rng = fastrand::Rng::with_seed(writer.seed);
    let mut client: Option<Client> = None;
    let mut counter: u64 = 0;
    let period = Duration::from_secs_f64(1.0 / f64::from(writer.rate.max(1)));
    while !stop.load(Ordering::Relaxed) {
        let c = match &client {
            Some(c) if !c.is_closed() => c,
            _ => {
                client = None;
                match connect(&url, "soak-writer").await {
                    Ok(c) => {
                        if !writer.notify.is_empty() {
                            let set = format!("SET eventgate.notify = '{}'", writer.notify);
                            if c.batch_execute(&set).await.is_err() {
                                continue;
                            }
                        }
                        stats.reconnects.fetch_add(1, Ordering::Relaxed);
                        client = Some(c);
                        client.as_ref().expect("just set")
                    }
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(100 + rng.u64(..200))).await;
                        continue;
                    }
                }
            }
        };
        let job = if rng.u8(..4) == 0 {
            jobs[0]
        } else {
            jobs[rng.usize(..jobs.len())]
        };
        let size = match rng.u16(..1000) {
            0..=4 => 1_200, // past one read page of the gateway (1000)
            5..=60 => 50 + rng.usize(..150),
            _ => 1 + rng.usize(..12),
        };
        let result = if writer.slow && rng.bool() {
            stats.slow_transactions.fetch_add(1, Ordering::Relaxed);
            let hold = Duration::from_millis(100 + rng.u64(..1_400));
            slow_transaction(c, &writer, job, size, hold, &mut counter).await
        } else if rng.u8(..20) == 0 && jobs.len() > 1 {
            let mut two = [job, jobs[rng.usize(..jobs.len())]];
            // A fixed lock order across writers: no deadlocks between two-job statements.
            two.sort();
            let ids: Vec<Uuid> = (0..size).map(|i| two[i % 2]).collect();
            let texts = messages(&writer, "t", size, &mut counter);
            c.query(INSERT_MANY_JOBS, &[&ids, &texts]).await
        } else {
            let texts = messages(&writer, "t", size, &mut counter);
            c.query(INSERT_ONE_JOB, &[&job, &texts]).await
        };
        match result {
            Ok(rows) => {
                commits.set(&rows, now_us());
                stats.statements.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        let jitter = period.mul_f64(rng.f64());
        tokio::time::sleep(period / 2 + jitter).await;
    }
}

/// `sql w<writer> n<counter> <mark>=<µs>`: `t=` is the send time, `h=` marks rows of a
/// held transaction. Latency is measured from the commit (`Commits`), not from these.
fn messages(writer: &Writer, mark: &str, n: usize, counter: &mut u64) -> Vec<String> {
    let t = now_us();
    (0..n)
        .map(|_| {
            *counter += 1;
            format!("sql w{} n{} {mark}={t}", writer.index, counter)
        })
        .collect()
}

/// BEGIN; insert; hold the job's row lock; insert again; COMMIT.
async fn slow_transaction(
    client: &Client,
    writer: &Writer,
    job: Uuid,
    size: usize,
    hold: Duration,
    counter: &mut u64,
) -> Result<Vec<Row>, tokio_postgres::Error> {
    client.batch_execute("BEGIN").await?;
    let first = messages(writer, "h", size.min(50), counter);
    let result = async {
        let mut rows = client.query(INSERT_ONE_JOB, &[&job, &first]).await?;
        tokio::time::sleep(hold).await;
        let second = messages(writer, "t", 1 + size / 4, counter);
        rows.extend(client.query(INSERT_ONE_JOB, &[&job, &second]).await?);
        client.batch_execute("COMMIT").await?;
        Ok(rows)
    }
    .await;
    if result.is_err() {
        let _ = client.batch_execute("ROLLBACK").await;
    }
    result
}

/// Many small autocommit statements into one job for `how_long`: enough batches to
/// push a stalled subscriber past its broadcast channel's capacity.
pub async fn flood(
    url: String,
    job: Uuid,
    how_long: Duration,
    stats: Arc<Stats>,
    commits: Arc<Commits>,
) -> u64 {
    let mut written = 0;
    let deadline = tokio::time::Instant::now() + how_long;
    let fill_until = tokio::time::Instant::now() + how_long.mul_f64(0.4);
    let writer = Writer {
        index: 99,
        slow: false,
        notify: "always",
        rate: 0,
        seed: 0,
    };
    let mut counter = 0;
    let mut client: Option<Client> = None;
    while tokio::time::Instant::now() < deadline {
        let c = match &client {
            Some(c) if !c.is_closed() => c,
            _ => match connect(&url, "soak-flood").await {
                Ok(c) => {
                    let _ = c.batch_execute("SET eventgate.notify = 'always'").await;
                    client = Some(c);
                    client.as_ref().expect("just set")
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // First big rows: megabytes, past every socket and hyper buffer; then many
        // small statements: more batches than the job's broadcast channel holds.
        let big = tokio::time::Instant::now() < fill_until;
        let pad = if big {
            "x".repeat(FLOOD_PAD)
        } else {
            String::new()
        };
        let texts: Vec<String> = messages(&writer, "t", if big { 5 } else { 1 }, &mut counter)
            .into_iter()
            .map(|m| format!("{m} {pad}"))
            .collect();
        match c.query(INSERT_ONE_JOB, &[&job, &texts]).await {
            Ok(rows) => {
                commits.set(&rows, now_us());
                written += 1;
                stats.statements.fetch_add(1, Ordering::Relaxed)
            }
            Err(_) => stats.errors.fetch_add(1, Ordering::Relaxed),
        };
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    written
}

/// Whether this gateway binary has the worker: `run --help` succeeds and offers
/// `--create` (the placeholder before the worker landed has neither behaviour).
pub fn worker_supported(bin: &Path) -> bool {
    let out = std::process::Command::new(bin)
        .args(["run", "--help"])
        .stdin(std::process::Stdio::null())
        .output();
    match out {
        Ok(out) => {
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("--create")
        }
        Err(_) => false,
    }
}

/// One `eventgate run` process and the file that tells its command to exit.
pub struct Worker {
    pub job: Uuid,
    pub child: tokio::process::Child,
    pub stop_file: PathBuf,
}

/// Starts `eventgate run --job <id> --create -- <this example> emit ...`.
pub fn spawn_worker(
    bin: &Path,
    url: &str,
    dir: &Path,
    index: usize,
    max_secs: u64,
) -> std::io::Result<Worker> {
    let job = Uuid::new_v4();
    let stop_file = dir.join(format!("worker-{index}.stop"));
    let log = std::fs::File::create(dir.join(format!("worker-{index}.log")))?;
    let me = std::env::current_exe()?;
    let child = tokio::process::Command::new(bin)
        .arg("run")
        .arg("--job")
        .arg(job.to_string())
        .arg("--create")
        .arg("--")
        .arg(me)
        .arg("emit")
        .arg("--stop-file")
        .arg(&stop_file)
        .arg("--tag")
        .arg(index.to_string())
        .arg("--max-secs")
        .arg(max_secs.to_string())
        .env("DATABASE_URL", with_app_name(url, "eventgate-worker"))
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()?;
    Ok(Worker {
        job,
        child,
        stop_file,
    })
}

/// `url` with `application_name` set, so the faults can tell processes apart.
pub fn with_app_name(url: &str, name: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}application_name={name}")
}

/// The worker's command: lines stamped with the time they were written, at about 50
/// per second with occasional bursts and stderr lines, until the stop file appears.
pub fn emit(stop_file: &Path, tag: &str, max_secs: u64) -> i32 {
    use std::io::Write;
    let start = std::time::Instant::now();
    let mut rng = fastrand::Rng::new();
    let mut n: u64 = 0;
    let stdout = std::io::stdout();
    while !stop_file.exists() && start.elapsed().as_secs() < max_secs {
        let lines = if rng.u8(..50) == 0 { 200 } else { 1 };
        let mut out = stdout.lock();
        for _ in 0..lines {
            n += 1;
            if writeln!(out, "wk{tag} n{n} t={}", now_us()).is_err() {
                return 1;
            }
        }
        if out.flush().is_err() {
            return 1;
        }
        drop(out);
        if rng.u8(..10) == 0 {
            eprintln!("wk{tag} warn n{n} t={}", now_us());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    0
}
