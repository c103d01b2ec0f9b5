//! Writers: events at a fixed total rate, round-robin over the jobs, on their own
//! thread and runtime so the client's load cannot delay them.
//!
//! Several lanes (each one database connection or one keep-alive HTTP connection) take
//! turns on one schedule: tick `i` is due at `start + i / rate` and goes to job
//! `i % jobs`. A lane that falls behind sends its late ticks at once, so the average
//! rate holds. `t` (unix microseconds) is read just before the statement or the publish
//! is sent.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use uuid::Uuid;

use crate::client::unix_micros;
use crate::systems::Kind;

/// Concurrent writer connections.
pub const LANES: usize = 4;
/// Filler so every frame is about 200-250 bytes, as in the reference runs.
const FILLER: &str = "build step 3/7: compiling crate eventgate v0.1.0 (/src) ok";

/// What the writers did, read by the case while they run.
pub struct Progress {
    /// Write statements (or publishes) that succeeded: the batches.
    pub batches: AtomicU64,
    pub errors: AtomicU64,
    /// Highest seq known written, per job.
    pub last_seq: Vec<AtomicI64>,
}

/// Running writers; stopped by [`Writers::stop`].
pub struct Writers {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub progress: Arc<Progress>,
}

impl Writers {
    pub fn start(
        kind: Kind,
        addr: SocketAddr,
        database_url: &str,
        jobs: Arc<Vec<Uuid>>,
        rate: f64,
    ) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(Progress {
            batches: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            last_seq: jobs.iter().map(|_| AtomicI64::new(0)).collect(),
        });
        let url = database_url.to_string();
        let thread = {
            let stop = stop.clone();
            let progress = progress.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("writer runtime");
                rt.block_on(async move {
                    // Seqs for systems that do not assign them (Nchan).
                    let next_seq: Arc<Vec<AtomicI64>> =
                        Arc::new(jobs.iter().map(|_| AtomicI64::new(1)).collect());
                    let start = tokio::time::Instant::now();
                    let mut lanes = Vec::new();
                    for lane in 0..LANES {
                        let lane_ctx = Lane {
                            kind,
                            addr,
                            url: url.clone(),
                            jobs: jobs.clone(),
                            next_seq: next_seq.clone(),
                            progress: progress.clone(),
                            stop: stop.clone(),
                        };
                        lanes.push(tokio::spawn(lane_ctx.run(lane, start, rate)));
                    }
                    for lane in lanes {
                        let _ = lane.await;
                    }
                });
            })
        };
        Writers {
            stop,
            thread: Some(thread),
            progress,
        }
    }

    pub fn stop(mut self) -> Arc<Progress> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.progress.clone()
    }
}

struct Lane {
    kind: Kind,
    addr: SocketAddr,
    url: String,
    jobs: Arc<Vec<Uuid>>,
    next_seq: Arc<Vec<AtomicI64>>,
    progress: Arc<Progress>,
    stop: Arc<AtomicBool>,
}

enum Conn {
    Sql(tokio_postgres::Client, tokio_postgres::Statement),
    Http(HttpConn),
}

impl Lane {
    async fn connect(&self) -> io::Result<Conn> {
        if self.kind.uses_db() {
            let (client, connection) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
                .await
                .map_err(io::Error::other)?;
            tokio::spawn(connection);
            let stmt = client
                .prepare(
                    "INSERT INTO agent_job_events (job_id, level, message, payload) \
                     VALUES ($1, 'info', $2, $3::text::jsonb) RETURNING seq",
                )
                .await
                .map_err(io::Error::other)?;
            Ok(Conn::Sql(client, stmt))
        } else {
            Ok(Conn::Http(HttpConn::connect(self.addr).await?))
        }
    }

    async fn run(self, lane: usize, start: tokio::time::Instant, rate: f64) {
        let mut conn = None;
        let mut tick = lane as u64;
        let period = 1.0 / rate;
        while !self.stop.load(Ordering::Relaxed) {
            let due = start + Duration::from_secs_f64(tick as f64 * period);
            tokio::time::sleep_until(due).await;
            if conn.is_none() {
                match self.connect().await {
                    Ok(c) => conn = Some(c),
                    Err(_) => {
                        self.progress.errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                }
            }
            let job = (tick % self.jobs.len() as u64) as usize;
            let c = conn.as_mut().expect("connected above");
            match self.write(c, job).await {
                Ok(seq) => {
                    self.progress.batches.fetch_add(1, Ordering::Relaxed);
                    self.progress.last_seq[job].fetch_max(seq, Ordering::Relaxed);
                }
                Err(_) => {
                    self.progress.errors.fetch_add(1, Ordering::Relaxed);
                    conn = None;
                }
            }
            tick += LANES as u64;
        }
    }

    /// One event, one statement or publish; returns its seq.
    async fn write(&self, conn: &mut Conn, job: usize) -> io::Result<i64> {
        let id = self.jobs[job];
        match conn {
            Conn::Sql(client, stmt) => {
                let t = unix_micros();
                let payload = format!("{{\"kind\":\"log\",\"t\":{t}}}");
                let row = client
                    .query_one(&*stmt, &[&id, &FILLER, &payload])
                    .await
                    .map_err(io::Error::other)?;
                Ok(row.get(0))
            }
            Conn::Http(http) => {
                let seq = if self.kind == Kind::Nchan {
                    self.next_seq[job].fetch_add(1, Ordering::Relaxed)
                } else {
                    0 // the floor server numbers its frames itself
                };
                let t = unix_micros();
                let rest = format!(
                    "\"t\":{t},\"level\":\"info\",\"message\":\"{FILLER}\",\
                     \"payload\":{{\"kind\":\"log\"}}}}"
                );
                // The floor server puts its own `"seq":N,` in front.
                let body = match self.kind {
                    Kind::Nchan => format!("{{\"seq\":{seq},{rest}"),
                    _ => format!("{{{rest}"),
                };
                let answer = http.post(&format!("/pub/{id}"), body.as_bytes()).await?;
                if self.kind == Kind::Nchan {
                    Ok(seq)
                } else {
                    answer
                        .trim()
                        .parse()
                        .map_err(|_| io::Error::other("floor answered without a seq"))
                }
            }
        }
    }
}

/// A keep-alive HTTP/1.1 connection that POSTs and reads whole answers.
struct HttpConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl HttpConn {
    async fn connect(addr: SocketAddr) -> io::Result<HttpConn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(HttpConn {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Posts `body`; the answer's body as text. Errors on a non-2xx status.
    async fn post(&mut self, path: &str, body: &[u8]) -> io::Result<String> {
        let mut request = format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(body);
        self.stream.write_all(&request).await?;
        self.buf.clear();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(at) = memchr::memmem::find(&self.buf, b"\r\n\r\n") {
                break at + 4;
            }
            self.read_more(&mut chunk).await?;
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).to_ascii_lowercase();
        let status = head.get(9..12).unwrap_or("").to_string();
        let body = if let Some(len) = header(&head, "content-length") {
            let len: usize = len.parse().map_err(io::Error::other)?;
            while self.buf.len() < head_end + len {
                self.read_more(&mut chunk).await?;
            }
            String::from_utf8_lossy(&self.buf[head_end..head_end + len]).into_owned()
        } else if header(&head, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            while memchr::memmem::find(&self.buf[head_end..], b"0\r\n\r\n").is_none() {
                self.read_more(&mut chunk).await?;
            }
            String::new()
        } else {
            String::new()
        };
        if !status.starts_with('2') {
            return Err(io::Error::other(format!("publish answered {status}")));
        }
        Ok(body)
    }

    async fn read_more(&mut self, chunk: &mut [u8]) -> io::Result<()> {
        let n = tokio::time::timeout(Duration::from_secs(30), self.stream.read(chunk))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "publish answer"))??;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == name).then(|| v.trim())
    })
}
