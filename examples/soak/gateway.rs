//! Gateway replicas as separate processes of the release binary, each with its own
//! LISTEN connection, on fixed ports so a killed replica comes back where clients look.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::sse;

/// How long a (re)started replica has to say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(45);

/// Counters of `/metrics` worth reporting, summed over a replica's lives.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    pub lag_resyncs: u64,
    pub listener_reconnects: u64,
    pub ring_catch_ups: u64,
    pub backfill_reads: u64,
    pub live_reads: u64,
    pub streams_opened: u64,
}

impl Counters {
    fn parse(text: &str) -> Counters {
        let get = |name: &str| {
            text.lines()
                .find_map(|line| {
                    let (key, value) = line.rsplit_once(' ')?;
                    (key == name).then(|| value.parse::<f64>().ok())?
                })
                .unwrap_or(0.0) as u64
        };
        Counters {
            lag_resyncs: get("eventgate_lag_resyncs_total"),
            listener_reconnects: get("eventgate_listener_reconnects_total"),
            ring_catch_ups: get("eventgate_ring_catch_ups_total"),
            backfill_reads: get("eventgate_table_reads_total{purpose=\"backfill\"}"),
            live_reads: get("eventgate_table_reads_total{purpose=\"live\"}"),
            streams_opened: get("eventgate_streams_opened_total"),
        }
    }

    pub fn add(&mut self, other: &Counters) {
        self.lag_resyncs += other.lag_resyncs;
        self.listener_reconnects += other.listener_reconnects;
        self.ring_catch_ups += other.ring_catch_ups;
        self.backfill_reads += other.backfill_reads;
        self.live_reads += other.live_reads;
        self.streams_opened += other.streams_opened;
    }
}

/// One replica: a process we can kill -9 and start again on the same port.
pub struct Replica {
    pub name: String,
    pub addr: SocketAddr,
    bin: PathBuf,
    url: String,
    log: PathBuf,
    child: Option<Child>,
    /// Counters of earlier lives plus the last scrape of this one.
    past: Counters,
    current: Counters,
    pub max_rss_kib: u64,
    pub starts: u32,
}

impl Replica {
    pub fn new(name: &str, addr: SocketAddr, bin: &Path, url: &str, dir: &Path) -> Replica {
        Replica {
            name: name.to_string(),
            addr,
            bin: bin.to_path_buf(),
            url: url.to_string(),
            log: dir.join(format!("gateway-{name}.log")),
            child: None,
            past: Counters::default(),
            current: Counters::default(),
            max_rss_kib: 0,
            starts: 0,
        }
    }

    /// Starts the process and waits for `/readyz` (LISTEN up, pool ok).
    pub async fn start(&mut self) -> Result<(), String> {
        for attempt in 0..10 {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)
                .map_err(|e| format!("cannot open {}: {e}", self.log.display()))?;
            let child = Command::new(&self.bin)
                .arg("serve")
                .arg("--listen")
                .arg(self.addr.to_string())
                .args(["--counter-poll", "25ms", "--keep-alive", "5s"])
                .args(["--max-connections", "20000"])
                .args(["--max-streams-per-client", "100000"])
                .env("DATABASE_URL", &self.url)
                .env("RUST_LOG", "warn")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| format!("cannot start {}: {e}", self.bin.display()))?;
            self.child = Some(child);
            self.starts += 1;
            self.current = Counters::default();
            match self.wait_ready().await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    // Most likely the port is not free yet after a kill: try again.
                    self.kill().await;
                    if attempt == 9 {
                        return Err(e);
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
        unreachable!("the loop returns")
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = &mut self.child {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("gateway {} exited: {status}", self.name));
                }
            }
            if matches!(sse::get(self.addr, "/readyz").await, Ok((200, _))) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!("gateway {} not ready", self.name));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// `kill -9`, then reap it.
    pub async fn kill(&mut self) {
        self.sample_rss();
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        self.past.add(&self.current);
        self.current = Counters::default();
    }

    /// SIGTERM (graceful drain), then SIGKILL after a deadline.
    pub async fn stop(&mut self) {
        self.sample_rss();
        self.scrape().await;
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                // SAFETY: kill(2) with a pid of our own child and a valid signal.
                unsafe {
                    libc::kill(pid as i32, libc::SIGTERM);
                }
            }
            if tokio::time::timeout(Duration::from_secs(15), child.wait())
                .await
                .is_err()
            {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        }
        self.past.add(&self.current);
        self.current = Counters::default();
    }

    /// Reads the process's resident set size (and its high-water mark) from /proc.
    pub fn sample_rss(&mut self) {
        let Some(pid) = self.pid() else { return };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            return;
        };
        for line in status.lines() {
            if let Some(rest) = line
                .strip_prefix("VmRSS:")
                .or_else(|| line.strip_prefix("VmHWM:"))
            {
                let kib: u64 = rest
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .unwrap_or(0);
                self.max_rss_kib = self.max_rss_kib.max(kib);
            }
        }
    }

    /// Scrapes `/metrics` of the current life.
    pub async fn scrape(&mut self) {
        if self.child.is_none() {
            return;
        }
        if let Ok((200, text)) = sse::get(self.addr, "/metrics").await {
            self.current = Counters::parse(&text);
        }
    }

    pub fn counters(&self) -> Counters {
        let mut c = self.past;
        c.add(&self.current);
        c
    }
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_addr() -> std::io::Result<SocketAddr> {
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
}
