//! The load's SSE client: thousands of streams on a two-thread tokio runtime, raw
//! HTTP/1.1 over TCP with its own chunked decoding and WHATWG line parsing.
//!
//! Every stream keeps a bitset of the seqs it received, so duplicates, holes and
//! reordering are counted exactly per connection. Latency is `receipt - t`, where `t` is
//! the writer's clock (unix microseconds) read just before the commit or publish, and
//! receipt is read once per socket read (all events of one read share it).

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{watch, Semaphore};

/// Shards of the shared counters, so tasks on both threads rarely meet on a lock.
const SHARDS: usize = 16;
/// Connects in flight at once (the servers' accept backlogs are about 1k).
const CONNECT_CONCURRENCY: usize = 512;
/// Bytes read per `read` call.
const READ_BUF: usize = 8 * 1024;
/// Loopback source addresses rotated over, so closed connections in TIME_WAIT never
/// exhaust the ephemeral ports of one address across cases.
const SOURCE_ADDRS: u32 = 200;

/// Latencies above this are clamped (microseconds).
const MAX_LATENCY_US: u64 = 120_000_000;

/// What every stream task is told to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Run,
    /// Drop the connection and resume with `Last-Event-ID` (the value is a generation).
    Reconnect(u32),
    Stop,
}

/// One shard of the counters, on its own cache lines.
#[repr(align(128))]
struct Shard {
    delivered: AtomicU64,
    latency: Mutex<Histogram<u64>>,
    reconnect: Mutex<Histogram<u64>>,
}

/// Counters shared by every stream of one case.
pub struct Stats {
    shards: Vec<Shard>,
    /// Latencies are recorded only while this is set (the measured window).
    pub measuring: AtomicBool,
    /// Streams that got their response headers at least once.
    pub connected: AtomicUsize,
    /// Non-200 responses (503 at a connection limit and the like).
    pub http_errors: AtomicU64,
    /// Streams that ended or failed on their own and were resumed.
    pub drops: AtomicU64,
    /// Highest seq received, per connection (for the drain).
    pub max_seq: Vec<AtomicI64>,
    /// Streams whose first attempt has an outcome: headers, or (when refusals are not
    /// retried) a refusal or a close before any head.
    pub settled: AtomicUsize,
    /// Refusals that carried `Retry-After` (503 at a limit, as it should be).
    pub retry_after: AtomicU64,
    /// First attempts that ended before any response head (closed, reset, timed out),
    /// when refusals are not retried.
    pub head_failures: AtomicU64,
    /// Streams that got a new response head after a reconnect.
    pub reconnected: AtomicUsize,
}

impl Stats {
    pub fn new(connections: usize) -> Arc<Stats> {
        let hist = || Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid bounds");
        Arc::new(Stats {
            shards: (0..SHARDS)
                .map(|_| Shard {
                    delivered: AtomicU64::new(0),
                    latency: Mutex::new(hist()),
                    reconnect: Mutex::new(hist()),
                })
                .collect(),
            measuring: AtomicBool::new(false),
            connected: AtomicUsize::new(0),
            http_errors: AtomicU64::new(0),
            drops: AtomicU64::new(0),
            max_seq: (0..connections).map(|_| AtomicI64::new(0)).collect(),
            settled: AtomicUsize::new(0),
            retry_after: AtomicU64::new(0),
            head_failures: AtomicU64::new(0),
            reconnected: AtomicUsize::new(0),
        })
    }

    /// Events received so far (all phases).
    pub fn delivered(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.delivered.load(Ordering::Relaxed))
            .sum()
    }

    /// Latencies of the measured window, merged (microseconds).
    pub fn latency(&self) -> Histogram<u64> {
        merge(self.shards.iter().map(|s| &s.latency))
    }

    /// Time from dropping a connection to the new response's headers (microseconds).
    pub fn reconnect(&self) -> Histogram<u64> {
        merge(self.shards.iter().map(|s| &s.reconnect))
    }
}

fn merge<'a>(hists: impl Iterator<Item = &'a Mutex<Histogram<u64>>>) -> Histogram<u64> {
    let mut out = Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid bounds");
    for h in hists {
        out.add(&*h.lock().expect("histogram lock"))
            .expect("same bounds");
    }
    out
}

/// What one stream saw over its whole life (all its connections).
#[derive(Debug, Default, Clone)]
pub struct Tracker {
    /// Bit `seq` set once received.
    bits: Vec<u64>,
    /// Seqs received before this one are expected from `start + 1` on.
    pub start: i64,
    pub max_seq: i64,
    pub distinct: u64,
    pub dups: u64,
    pub reorders: u64,
    /// The last `id:` field, sent back as `Last-Event-ID` on a reconnect.
    last_id: Vec<u8>,
}

impl Tracker {
    fn record(&mut self, seq: i64) -> bool {
        if seq <= 0 {
            return false;
        }
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if word >= self.bits.len() {
            self.bits.resize(word + 1 + self.bits.len() / 2, 0);
        }
        if self.bits[word] & (1 << bit) != 0 {
            self.dups += 1;
            return false;
        }
        self.bits[word] |= 1 << bit;
        self.distinct += 1;
        if seq < self.max_seq {
            self.reorders += 1;
        }
        self.max_seq = self.max_seq.max(seq);
        true
    }

    /// Seqs missing below the highest one received.
    pub fn gaps(&self) -> u64 {
        (self.max_seq - self.start).max(0) as u64 - self.distinct
    }
}

/// Where a stream connects.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub path: String,
    /// Where it resumes after a reconnect (another replica, or the same address).
    pub resume: SocketAddr,
}

/// Shared by the streams of one case.
pub struct Swarm {
    pub stats: Arc<Stats>,
    control_tx: watch::Sender<Control>,
    tasks: Vec<tokio::task::JoinHandle<Tracker>>,
}

impl Swarm {
    /// Opens one stream per target, `source_base` choosing the loopback source address.
    pub fn open(rt: &tokio::runtime::Handle, targets: Vec<Target>, source_base: u32) -> Swarm {
        Swarm::open_with(rt, targets, source_base, false)
    }

    /// Like [`Swarm::open`]; with `give_up`, a stream whose first attempt is refused
    /// (any non-200) or closed before a head stops there, as EventSource does, instead
    /// of retrying: how the clients past a server's limit are counted.
    pub fn open_with(
        rt: &tokio::runtime::Handle,
        targets: Vec<Target>,
        source_base: u32,
        give_up: bool,
    ) -> Swarm {
        let stats = Stats::new(targets.len());
        let (control_tx, control_rx) = watch::channel(Control::Run);
        let permits = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
        let tasks = targets
            .into_iter()
            .enumerate()
            .map(|(index, target)| {
                let source = Ipv4Addr::from(
                    u32::from(Ipv4Addr::new(127, 0, 0, 2))
                        + (source_base + index as u32) % SOURCE_ADDRS,
                );
                let stream = Stream {
                    index,
                    target,
                    source,
                    stats: stats.clone(),
                    permits: permits.clone(),
                    give_up,
                };
                rt.spawn(stream.run(control_rx.clone()))
            })
            .collect();
        Swarm {
            stats,
            control_tx,
            tasks,
        }
    }

    /// Waits until every stream got its headers once; false on timeout.
    pub fn wait_connected(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.stats.connected.load(Ordering::Relaxed) < self.tasks.len() {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn reconnect_all(&self, generation: u32) {
        let _ = self.control_tx.send(Control::Reconnect(generation));
    }

    /// Closes every stream and returns what each saw.
    pub fn close(self, rt: &tokio::runtime::Handle) -> Vec<Tracker> {
        let _ = self.control_tx.send(Control::Stop);
        rt.block_on(async {
            let mut out = Vec::with_capacity(self.tasks.len());
            for task in self.tasks {
                out.push(task.await.unwrap_or_default());
            }
            out
        })
    }
}

struct Stream {
    index: usize,
    target: Target,
    source: Ipv4Addr,
    stats: Arc<Stats>,
    permits: Arc<Semaphore>,
    give_up: bool,
}

enum Ended {
    Stop,
    Reconnect,
    /// The server ended the stream or the socket failed: resume like EventSource.
    Dropped,
}

impl Stream {
    async fn run(self, mut control_rx: watch::Receiver<Control>) -> Tracker {
        let mut tracker = Tracker::default();
        let mut first = true;
        let mut dropped_at: Option<Instant> = None;
        let mut buf = vec![0u8; READ_BUF];
        let mut scratch = Vec::new();
        let mut addr = self.target.addr;
        loop {
            if *control_rx.borrow_and_update() == Control::Stop {
                return tracker;
            }
            let connected = {
                let _permit = self.permits.acquire().await.expect("never closed");
                self.connect(addr, &tracker.last_id).await
            };
            let (mut socket, parser) = match connected {
                Ok(Ok(ok)) => ok,
                Ok(Err(204)) => return tracker,
                Ok(Err(_)) => {
                    self.stats.http_errors.fetch_add(1, Ordering::Relaxed);
                    if first && self.give_up {
                        self.stats.settled.fetch_add(1, Ordering::Relaxed);
                        return tracker;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                Err(_) => {
                    if first && self.give_up {
                        self.stats.head_failures.fetch_add(1, Ordering::Relaxed);
                        self.stats.settled.fetch_add(1, Ordering::Relaxed);
                        return tracker;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if first {
                first = false;
                self.stats.connected.fetch_add(1, Ordering::Relaxed);
                self.stats.settled.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(at) = dropped_at.take() {
                self.stats.reconnected.fetch_add(1, Ordering::Relaxed);
                let us = at.elapsed().as_micros() as u64;
                self.shard()
                    .reconnect
                    .lock()
                    .expect("histogram lock")
                    .saturating_record(us.max(1));
            }
            let ended = self
                .read_loop(
                    &mut socket,
                    parser,
                    &mut tracker,
                    &mut buf,
                    &mut scratch,
                    &mut control_rx,
                )
                .await;
            let ended = match ended {
                // Told something: what, now that the read loop let go of the receiver.
                None => match *control_rx.borrow_and_update() {
                    Control::Stop => Ended::Stop,
                    Control::Reconnect(_) => Ended::Reconnect,
                    Control::Run => Ended::Dropped,
                },
                Some(ended) => ended,
            };
            // RST instead of FIN: no TIME_WAIT left behind by thousands of streams. A zero
            // linger never blocks the thread (the deprecation is about nonzero ones).
            #[allow(deprecated)]
            let _ = socket.set_linger(Some(Duration::ZERO));
            drop(socket);
            match ended {
                Ended::Stop => return tracker,
                Ended::Reconnect => {
                    dropped_at = Some(Instant::now());
                    addr = self.target.resume;
                }
                Ended::Dropped => {
                    self.stats.drops.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn shard(&self) -> &Shard {
        &self.stats.shards[self.index % SHARDS]
    }

    /// Connects and reads the response head. `Ok(Err(status))` for a non-200 answer.
    async fn connect(
        &self,
        addr: SocketAddr,
        last_id: &[u8],
    ) -> io::Result<Result<(TcpStream, Parser), u16>> {
        let socket = TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.bind(SocketAddr::new(self.source.into(), 0))?;
        let mut stream = socket.connect(addr).await?;
        stream.set_nodelay(true)?;
        let mut request = format!(
            "GET {} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\
             Cache-Control: no-cache\r\n",
            self.target.path
        )
        .into_bytes();
        if !last_id.is_empty() {
            request.extend_from_slice(b"Last-Event-ID: ");
            request.extend_from_slice(last_id);
            request.extend_from_slice(b"\r\n");
        }
        request.extend_from_slice(b"\r\n");
        stream.write_all(&request).await?;
        let mut head = Vec::with_capacity(512);
        let mut chunk = [0u8; 1024];
        let end = loop {
            let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut chunk))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "response head"))??;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            head.extend_from_slice(&chunk[..n]);
            if let Some(at) = memchr::memmem::find(&head, b"\r\n\r\n") {
                break at + 4;
            }
        };
        let text = String::from_utf8_lossy(&head[..end]).to_ascii_lowercase();
        let status: u16 = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        if status != 200 {
            if text.contains("\r\nretry-after:") {
                self.stats.retry_after.fetch_add(1, Ordering::Relaxed);
            }
            return Ok(Err(status));
        }
        let mut parser = Parser::new(text.contains("transfer-encoding: chunked"));
        parser.pending.extend_from_slice(&head[end..]);
        Ok(Ok((stream, parser)))
    }

    /// Reads until the stream ends (`Some`) or a control message arrives (`None`).
    async fn read_loop(
        &self,
        socket: &mut TcpStream,
        mut parser: Parser,
        tracker: &mut Tracker,
        buf: &mut [u8],
        latencies: &mut Vec<u64>,
        control_rx: &mut watch::Receiver<Control>,
    ) -> Option<Ended> {
        // Bytes that came with the head.
        let early = std::mem::take(&mut parser.pending);
        self.consume(&mut parser, tracker, &early, latencies);
        // One registration for the connection's life, not one per read: 10k streams
        // re-arming a shared `watch` on every read contend on its waiter list.
        let changed = control_rx.changed();
        tokio::pin!(changed);
        loop {
            let n = tokio::select! {
                read = socket.read(buf) => match read {
                    Ok(0) | Err(_) => return Some(Ended::Dropped),
                    Ok(n) => n,
                },
                _ = &mut changed => return None,
            };
            if !self.consume(&mut parser, tracker, &buf[..n], latencies) {
                return Some(Ended::Dropped);
            }
        }
    }

    /// Feeds bytes through the parser; false when the body ended.
    fn consume(
        &self,
        parser: &mut Parser,
        tracker: &mut Tracker,
        bytes: &[u8],
        latencies: &mut Vec<u64>,
    ) -> bool {
        latencies.clear();
        let now = unix_micros();
        let mut delivered = 0u64;
        let open = parser.feed(bytes, |id, seq, t| {
            if let Some(id) = id {
                tracker.last_id.clear();
                tracker.last_id.extend_from_slice(id);
            }
            if let Some(seq) = seq {
                if tracker.record(seq) {
                    delivered += 1;
                    if let Some(t) = t {
                        latencies.push(now.saturating_sub(t).max(1));
                    }
                }
            }
        });
        if delivered > 0 {
            self.shard()
                .delivered
                .fetch_add(delivered, Ordering::Relaxed);
            self.stats.max_seq[self.index].store(tracker.max_seq, Ordering::Relaxed);
            if self.stats.measuring.load(Ordering::Relaxed) {
                let mut h = self.shard().latency.lock().expect("histogram lock");
                for &us in latencies.iter() {
                    h.saturating_record(us.min(MAX_LATENCY_US));
                }
            }
        }
        open
    }
}

/// Unix time in microseconds.
pub fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_micros() as u64
}

#[derive(Debug, Clone, Copy)]
enum Chunk {
    /// Reading the hex size line; the value so far, and whether we are in extensions.
    Size(usize, bool),
    Data(usize),
    /// The CRLF after a chunk's data; how many bytes of it remain.
    DataEnd(u8),
    Done,
}

/// Chunked decoding plus SSE line parsing, across arbitrary read boundaries.
struct Parser {
    chunked: bool,
    chunk: Chunk,
    /// An incomplete SSE line carried to the next read (or early body bytes).
    pending: Vec<u8>,
    /// The last line ended with CR: a LF right after it belongs to the same end.
    after_cr: bool,
    /// Fields of the event being built.
    event_seq: Option<i64>,
    event_t: Option<u64>,
    event_id: Option<(usize, [u8; 64])>,
}

impl Parser {
    fn new(chunked: bool) -> Parser {
        Parser {
            chunked,
            chunk: Chunk::Size(0, false),
            pending: Vec::new(),
            after_cr: false,
            event_seq: None,
            event_t: None,
            event_id: None,
        }
    }

    /// Calls `on_event(id, seq, t)` per dispatched event. False once the body ended.
    fn feed(
        &mut self,
        mut bytes: &[u8],
        mut on_event: impl FnMut(Option<&[u8]>, Option<i64>, Option<u64>),
    ) -> bool {
        if !self.chunked {
            self.lines(bytes, &mut on_event);
            return true;
        }
        while !bytes.is_empty() {
            match self.chunk {
                Chunk::Done => return false,
                Chunk::Size(value, ext) => {
                    let b = bytes[0];
                    bytes = &bytes[1..];
                    self.chunk = match b {
                        b'\n' if value == 0 => Chunk::Done,
                        b'\n' => Chunk::Data(value),
                        b'\r' => Chunk::Size(value, true),
                        _ if ext => Chunk::Size(value, true),
                        b';' => Chunk::Size(value, true),
                        _ => match (b as char).to_digit(16) {
                            Some(d) => Chunk::Size(value * 16 + d as usize, false),
                            None => Chunk::Size(value, true),
                        },
                    };
                }
                Chunk::Data(left) => {
                    let take = left.min(bytes.len());
                    self.lines(&bytes[..take], &mut on_event);
                    bytes = &bytes[take..];
                    self.chunk = if take == left {
                        Chunk::DataEnd(2)
                    } else {
                        Chunk::Data(left - take)
                    };
                }
                Chunk::DataEnd(left) => {
                    bytes = &bytes[1..];
                    self.chunk = if left == 1 {
                        Chunk::Size(0, false)
                    } else {
                        Chunk::DataEnd(left - 1)
                    };
                }
            }
        }
        !matches!(self.chunk, Chunk::Done)
    }

    /// Splits body bytes into lines ended by CRLF, LF or CR, as WHATWG says.
    fn lines(
        &mut self,
        mut bytes: &[u8],
        on_event: &mut impl FnMut(Option<&[u8]>, Option<i64>, Option<u64>),
    ) {
        if self.after_cr && bytes.first() == Some(&b'\n') {
            bytes = &bytes[1..];
        }
        self.after_cr = false;
        while let Some(at) = memchr::memchr2(b'\n', b'\r', bytes) {
            if self.pending.is_empty() {
                self.line(&bytes[..at], on_event);
            } else {
                let mut line = std::mem::take(&mut self.pending);
                line.extend_from_slice(&bytes[..at]);
                self.line(&line, on_event);
                line.clear();
                self.pending = line;
            }
            let mut next = at + 1;
            if bytes[at] == b'\r' {
                match bytes.get(next) {
                    Some(b'\n') => next += 1,
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            bytes = &bytes[next..];
        }
        self.pending.extend_from_slice(bytes);
    }

    fn line(
        &mut self,
        line: &[u8],
        on_event: &mut impl FnMut(Option<&[u8]>, Option<i64>, Option<u64>),
    ) {
        if line.is_empty() {
            let id = self.event_id.take();
            let seq = self.event_seq.take();
            let t = self.event_t.take();
            if id.is_some() || seq.is_some() {
                on_event(id.as_ref().map(|(n, b)| &b[..*n]), seq, t);
            }
            return;
        }
        if let Some(data) = line.strip_prefix(b"data:") {
            self.event_seq = number_after(data, b"\"seq\":").map(|n| n as i64);
            self.event_t = number_after(data, b"\"t\":");
        } else if let Some(id) = line.strip_prefix(b"id:") {
            let id = id.strip_prefix(b" ").unwrap_or(id);
            let mut copy = [0u8; 64];
            let n = id.len().min(64);
            copy[..n].copy_from_slice(&id[..n]);
            self.event_id = Some((n, copy));
        }
        // `event:`, `retry:` and comments need no action here.
    }
}

/// The unsigned integer after `key` (spaces allowed between).
fn number_after(haystack: &[u8], key: &[u8]) -> Option<u64> {
    let at = memchr::memmem::find(haystack, key)? + key.len();
    let rest = &haystack[at..];
    let start = rest.iter().position(|b| *b != b' ')?;
    let mut value: u64 = 0;
    let mut digits = 0;
    for b in &rest[start..] {
        if !b.is_ascii_digit() {
            break;
        }
        value = value * 10 + (b - b'0') as u64;
        digits += 1;
    }
    (digits > 0).then_some(value)
}

/// Checks the parser on a chunked body split at every byte, with LF, CRLF and CR line
/// ends; run at the start of every bench so a client bug cannot pass for a server's.
pub fn self_check() {
    let body: &[u8] = b"retry: 2000\n\nid: 1\nevent: queue_event\n\
        data: {\"seq\":1,\"payload\":{\"t\": 5}}\n\n: keep-alive\r\n\r\n\
        id: 2\r\ndata: {\"seq\":2,\"t\":7}\r\rid: 3\ndata: {\"seq\":3,\"t\":9}\n\n";
    let mut wire = Vec::new();
    for part in body.chunks(7) {
        wire.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        wire.extend_from_slice(part);
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(b"0\r\n\r\n");
    let want = vec![
        (Some(b"1".to_vec()), Some(1), Some(5)),
        (Some(b"2".to_vec()), Some(2), Some(7)),
        (Some(b"3".to_vec()), Some(3), Some(9)),
    ];
    for split in 1..wire.len() {
        let mut parser = Parser::new(true);
        let mut seen = Vec::new();
        let mut open = true;
        for piece in [&wire[..split], &wire[split..]] {
            open = parser.feed(piece, |id, seq, t| {
                seen.push((id.map(<[u8]>::to_vec), seq, t))
            });
        }
        assert_eq!(seen, want, "SSE parser, split at {split}");
        assert!(!open, "the last chunk ends the body");
    }
}
