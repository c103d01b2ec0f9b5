//! Subscribers that behave like browsers: they follow one job's stream, drop the
//! connection at random and come back with `Last-Event-ID` to either replica, some read
//! slowly through a small receive buffer, and one at a time is stalled by the fault
//! schedule. Each one keeps a `Tracker` of what it received.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Deserialize;
use tokio::sync::watch;
use tokio::time::Instant;
use uuid::Uuid;

use crate::sse::{self, Open};
use crate::track::{self, content_hash, End, Tracker};

/// No byte for this long on an open stream (the gateways send a keep-alive every few
/// seconds) counts as a silent stream; the subscriber reconnects.
const SILENCE: Duration = Duration::from_secs(20);

/// How often a waiting subscriber looks at its stall flag.
const TICK: Duration = Duration::from_millis(200);

/// State every client shares with the driver.
pub struct Shared {
    pub start: Instant,
    pub replicas: Vec<SocketAddr>,
    pub commits: Arc<crate::writers::Commits>,
    /// Per persistent subscriber: stalled until this many ms after `start`.
    pub stall_until: Vec<AtomicU64>,
    /// Bumped to make every persistent subscriber reconnect at once.
    pub reconnect_all: watch::Sender<u64>,
    /// Set at the final deadline: everyone stops where they are.
    pub give_up: watch::Sender<bool>,
    pub delivered: AtomicU64,
    pub connections: AtomicU64,
    pub connect_errors: AtomicU64,
    /// Answers other than 200/204/404 (503 while the database is down, ...).
    pub refused: AtomicU64,
    pub not_found: AtomicU64,
    pub silent: AtomicU64,
    /// Ms after `start` when the first asynchronous failover began (`u64::MAX`: none
    /// yet). Only after it may history go back: a `reset` before it fails the run.
    pub async_failover_since: AtomicU64,
    /// The fault that started last: what a `reset` is counted against.
    pub last_fault: std::sync::Mutex<&'static str>,
    /// `reset` frames by the fault that started last before them, and whether an
    /// asynchronous failover had begun: `(fault, allowed) -> count`.
    pub resets: std::sync::Mutex<std::collections::BTreeMap<(&'static str, bool), u64>>,
}

impl Shared {
    fn ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Stalls subscriber `index` for `how_long` from now.
    pub fn stall(&self, index: usize, how_long: Duration) {
        let until = self.ms() + how_long.as_millis() as u64;
        self.stall_until[index].store(until, Ordering::Relaxed);
    }

    /// Whether a `reset` received now is explained by an asynchronous failover.
    fn reset_allowed(&self) -> bool {
        self.ms() >= self.async_failover_since.load(Ordering::SeqCst)
    }

    fn stalled_for(&self, index: Option<usize>) -> Option<Duration> {
        let until = self.stall_until[index?].load(Ordering::Relaxed);
        let now = self.ms();
        (until > now).then(|| Duration::from_millis(until - now))
    }
}

/// Who a client is.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Index into `Shared::stall_until`; `None` for burst clients.
    pub index: Option<usize>,
    pub job: Uuid,
    /// Reads through a small receive buffer with pauses.
    pub slow: bool,
    /// Connects with a small receive buffer (stall targets, so a stall pushes back).
    pub small_buffer: bool,
    /// Never drops its connection on purpose.
    pub steady: bool,
    /// Already has everything up to here (burst clients resume with Last-Event-ID).
    pub floor: i64,
    /// Stop once everything up to here was received (burst clients); else read to `end`.
    pub target: Option<i64>,
    /// A deliberate client-side fault (the negative control, `--sabotage`).
    pub sabotage: Option<Sabotage>,
    pub seed: u64,
}

/// What a sabotaged client does to the 20th event it receives, as if the gateway had
/// done it: the soak must then report exactly one loss, repeat or swap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sabotage {
    /// Moves its Last-Event-ID past the event without keeping it.
    Drop,
    /// Keeps it twice.
    Repeat,
    /// Keeps it after the next one.
    Swap,
}

/// The 1-based index of the event a sabotaged client tampers with.
const SABOTAGED_EVENT: u64 = 20;

/// What a client saw.
pub struct Outcome {
    pub spec: Spec,
    pub tracker: Tracker,
    /// Commit-to-receive of SQL-written events, in µs.
    pub latency: Histogram<u64>,
    /// Emit-to-receive of events written by `eventgate run` workers, in µs.
    pub worker_latency: Histogram<u64>,
    /// Send-to-receive of SQL-written events (from the `t=` stamp), in µs: includes
    /// waits on a job's row lock behind a slow transaction.
    pub send_latency: Histogram<u64>,
    /// Got everything it wanted (to `end`, or to its target).
    pub complete: bool,
    /// How long it took from its first connection attempt.
    pub took: Duration,
}

#[derive(Deserialize)]
struct EventData {
    id: Uuid,
    #[serde(rename = "jobId")]
    job_id: Uuid,
    seq: i64,
    message: String,
}

#[derive(Deserialize)]
struct ResetData {
    #[serde(rename = "lastSeq")]
    last_seq: i64,
}

#[derive(Deserialize)]
struct EndData {
    status: String,
    #[serde(rename = "lastSeq")]
    last_seq: i64,
}

/// Microseconds since the epoch: the clock writers stamp into messages.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or_default()
}

/// The `t=<µs>` stamp in a message (the first one, for coalesced worker lines).
pub fn stamp(message: &str) -> Option<u64> {
    let i = message.find("t=")?;
    let digits: String = message[i + 2..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// Follows the job until it ends (or the target is reached), or until `give_up`.
pub async fn run(spec: Spec, shared: Arc<Shared>) -> Outcome {
    let began = Instant::now();
    let mut client = Client {
        tracker: Tracker::new(spec.floor),
        latency: track::histogram(),
        worker_latency: track::histogram(),
        send_latency: track::histogram(),
        rng: fastrand::Rng::with_seed(spec.seed),
        pending: Vec::new(),
        events: 0,
        held: None,
        reload: false,
        shared,
        spec,
    };
    client.follow().await;
    client.resolve();
    let complete = client.is_complete();
    Outcome {
        complete,
        took: began.elapsed(),
        tracker: client.tracker,
        latency: client.latency,
        worker_latency: client.worker_latency,
        send_latency: client.send_latency,
        spec: client.spec,
    }
}

struct Client {
    spec: Spec,
    shared: Arc<Shared>,
    tracker: Tracker,
    latency: Histogram<u64>,
    worker_latency: Histogram<u64>,
    send_latency: Histogram<u64>,
    rng: fastrand::Rng,
    /// SQL events received before their writer saw the commit acknowledgement:
    /// `(seq, received µs, connection opened µs)`, resolved a little later.
    pending: Vec<(i64, u64, u64)>,
    /// Events received so far, and one held back (sabotage only).
    events: u64,
    held: Option<(i64, u64)>,
    /// A `reset` came: reconnect from the tracker's floor (the dashboard's reload).
    reload: bool,
}

enum Closed {
    /// The stream ended or broke: reconnect.
    Reconnect,
    /// Done (end, target reached, or give up).
    Finished,
}

impl Client {
    fn is_complete(&self) -> bool {
        match self.spec.target {
            Some(target) => {
                self.tracker.max_seq >= target && self.tracker.lost(target) == 0
                    || self.tracker.end.is_some()
            }
            None => self.tracker.end.is_some(),
        }
    }

    async fn follow(&mut self) {
        let path = format!("/api/queue/jobs/{}/events/stream", self.spec.job);
        let mut give_up = self.shared.give_up.subscribe();
        let mut avoid: Option<usize> = None;
        loop {
            if self.is_complete() || *give_up.borrow_and_update() {
                return;
            }
            if let Some(d) = self.shared.stalled_for(self.spec.index) {
                tokio::time::sleep(d.min(TICK)).await;
                continue;
            }
            // Either replica, like a load balancer would pick; not the one that just
            // failed if there is another.
            let n = self.shared.replicas.len();
            let mut pick = self.rng.usize(..n);
            if Some(pick) == avoid && n > 1 {
                pick = (pick + 1) % n;
            }
            let addr = self.shared.replicas[pick];
            self.shared.connections.fetch_add(1, Ordering::Relaxed);
            let (small, read_size) = match (self.spec.slow, self.spec.small_buffer) {
                (true, _) => (true, 2048),
                (false, small) => (small, 16 * 1024),
            };
            match sse::open(
                addr,
                &path,
                self.tracker.last_id.as_deref(),
                small,
                read_size,
            )
            .await
            {
                Err(_) => {
                    self.shared.connect_errors.fetch_add(1, Ordering::Relaxed);
                    avoid = Some(pick);
                    self.pause(50..400).await;
                }
                Ok(Open::Status(204)) => {
                    self.tracker.end = Some(End::NoContent);
                    return;
                }
                Ok(Open::Status(404)) => {
                    self.shared.not_found.fetch_add(1, Ordering::Relaxed);
                    self.pause(200..400).await;
                }
                Ok(Open::Status(_)) => {
                    self.shared.refused.fetch_add(1, Ordering::Relaxed);
                    avoid = Some(pick);
                    self.pause(200..1000).await;
                }
                Ok(Open::Stream(body)) => {
                    avoid = None;
                    match self.read(body, &mut give_up).await {
                        Closed::Finished => return,
                        // A browser waits `retry:` (2 s); a shorter wait packs more
                        // reconnects into the run.
                        Closed::Reconnect => self.pause(0..300).await,
                    }
                }
            }
        }
    }

    async fn pause(&mut self, ms: std::ops::Range<u64>) {
        tokio::time::sleep(Duration::from_millis(self.rng.u64(ms))).await;
    }

    async fn read(&mut self, mut body: sse::Body, give_up: &mut watch::Receiver<bool>) -> Closed {
        let opened_us = now_us();
        let mut reconnect_rx = self.shared.reconnect_all.subscribe();
        let leave_at = (!self.spec.steady && self.spec.index.is_some())
            .then(|| Instant::now() + Duration::from_millis(self.rng.u64(1_000..20_000)));
        let mut last_byte = Instant::now();
        // Latency is measured only on connections that were never stalled on purpose.
        let mut stalled = false;
        loop {
            while let Some(message) = body.next_message() {
                self.handle(message, opened_us, stalled);
                if std::mem::take(&mut self.reload) {
                    return Closed::Reconnect;
                }
                if self.is_complete() {
                    self.resolve();
                    return Closed::Finished;
                }
            }
            self.resolve();
            if let Some(d) = self.shared.stalled_for(self.spec.index) {
                stalled = true;
                tokio::time::sleep(d.min(TICK)).await;
                last_byte = Instant::now();
                continue;
            }
            if self.spec.slow {
                self.pause(1..10).await;
            }
            let now = Instant::now();
            if leave_at.is_some_and(|t| now >= t) {
                return Closed::Reconnect;
            }
            if now >= last_byte + SILENCE {
                self.shared.silent.fetch_add(1, Ordering::Relaxed);
                return Closed::Reconnect;
            }
            tokio::select! {
                result = body.fill() => match result {
                    Ok(true) => last_byte = Instant::now(),
                    Ok(false) | Err(_) => {
                        // Parse what came with the last read before reconnecting.
                        while let Some(message) = body.next_message() {
                            self.handle(message, opened_us, stalled);
                            if std::mem::take(&mut self.reload) {
                                return Closed::Reconnect;
                            }
                        }
                        return if self.is_complete() { Closed::Finished } else { Closed::Reconnect };
                    }
                },
                _ = reconnect_rx.changed() => return Closed::Reconnect,
                _ = give_up.changed() => return Closed::Finished,
                _ = tokio::time::sleep(TICK) => {}
            }
        }
    }

    /// Turns pending receipts whose commit time is now known into latency samples;
    /// forgets those older than a minute (their writer lost the acknowledgement).
    fn resolve(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let now = now_us();
        let commits = self.shared.commits.clone();
        let job = self.spec.job;
        let latency = &mut self.latency;
        self.pending
            .retain(|&(seq, received, opened)| match commits.get(job, seq) {
                Some(commit) => {
                    // Committed while this connection was open: a live delivery.
                    if commit >= opened {
                        let us = received.saturating_sub(commit).max(1);
                        let _ = latency.record(us.min(3_600_000_000));
                    }
                    false
                }
                None => now.saturating_sub(received) < 60_000_000,
            });
    }

    /// Applies `--sabotage` to one event; true if the event must not be recorded.
    fn sabotage(&mut self, seq: i64, hash: u64) -> bool {
        let Some(sabotage) = self.spec.sabotage else {
            return false;
        };
        self.events += 1;
        match (sabotage, self.events) {
            (Sabotage::Drop, SABOTAGED_EVENT) => {
                self.tracker.last_id = Some(seq.to_string());
                true
            }
            (Sabotage::Repeat, SABOTAGED_EVENT) => {
                self.tracker.record(seq, hash);
                false
            }
            (Sabotage::Swap, SABOTAGED_EVENT) => {
                self.held = Some((seq, hash));
                self.tracker.last_id = Some(seq.to_string());
                true
            }
            (Sabotage::Swap, n) if n == SABOTAGED_EVENT + 1 => {
                self.tracker.record(seq, hash);
                if let Some((held, held_hash)) = self.held.take() {
                    self.tracker.record(held, held_hash);
                }
                self.tracker.last_id = Some(seq.to_string());
                true
            }
            _ => false,
        }
    }

    fn handle(&mut self, message: sse::Message, opened_us: u64, stalled: bool) {
        match message.event.as_str() {
            "queue_event" => {
                let received_us = now_us();
                self.shared.delivered.fetch_add(1, Ordering::Relaxed);
                // `id: <seq>-<tag>`, the tag the last 8 hex digits of the event's id.
                let id: Option<(i64, &str)> = message.id.as_deref().and_then(|s| {
                    let (seq, tag) = s.split_once('-')?;
                    Some((seq.parse().ok()?, tag))
                });
                let data: Option<EventData> = serde_json::from_str(&message.data).ok();
                let (seq, text) = match (&data, id) {
                    (Some(d), Some((id, tag)))
                        if d.job_id == self.spec.job
                            && d.seq == id
                            && d.id.to_string().ends_with(tag)
                            && tag.len() == 8 =>
                    {
                        (id, d.message.as_str())
                    }
                    (_, Some((id, _))) => {
                        self.tracker.corrupt += 1;
                        (id, "")
                    }
                    (_, None) => {
                        self.tracker.corrupt += 1;
                        return;
                    }
                };
                let hash = content_hash(seq, text);
                if self.sabotage(seq, hash) {
                    return;
                }
                let new = self.tracker.record(seq, hash);
                // As EventSource: the next reconnect sends the id as it came.
                self.tracker.last_id = message.id.clone();
                if !new || stalled || self.spec.slow || self.spec.index.is_none() {
                    return;
                }
                // Only events committed while this connection was open (a backfill of
                // old events is not a delivery latency), and not on purpose-slow readers.
                if text.starts_with("sql") {
                    self.pending.push((seq, received_us, opened_us));
                    if let Some(t) = stamp(text).filter(|&t| t >= opened_us) {
                        let us = received_us.saturating_sub(t).max(1);
                        let _ = self.send_latency.record(us.min(3_600_000_000));
                    }
                } else if let Some(t) = stamp(text).filter(|&t| t >= opened_us) {
                    // Worker lines: from the moment the command printed the line.
                    let us = received_us.saturating_sub(t).max(1);
                    let _ = self.worker_latency.record(us.min(3_600_000_000));
                }
            }
            "reset" => {
                let allowed = self.shared.reset_allowed();
                let fault = *self.shared.last_fault.lock().expect("lock");
                *self
                    .shared
                    .resets
                    .lock()
                    .expect("lock")
                    .entry((fault, allowed))
                    .or_default() += 1;
                match serde_json::from_str::<ResetData>(&message.data) {
                    Ok(reset) => {
                        self.tracker.reset(reset.last_seq);
                        self.reload = true;
                        if !allowed {
                            self.tracker.unexpected_resets += 1;
                        }
                        // A burst client's window ends where the history now does.
                        if let Some(target) = &mut self.spec.target {
                            *target = (*target).min(reset.last_seq.max(self.tracker.floor()));
                        }
                    }
                    Err(_) => self.tracker.corrupt += 1,
                }
            }
            "end" => {
                if let Ok(end) = serde_json::from_str::<EndData>(&message.data) {
                    self.tracker.end = Some(End::Frame {
                        status: end.status,
                        last_seq: end.last_seq,
                    });
                } else {
                    self.tracker.corrupt += 1;
                }
            }
            _ => {}
        }
    }
}
