//! The hub: per-job state shared by every subscriber of a job.
//!
//! A job's state is created by its first subscriber and dropped a while after its last
//! one left. It holds the highest seq it has broadcast, a bounded ring of recent
//! batches (so a reconnect inside the window costs no query) and the sending half of a
//! `tokio::sync::broadcast` channel of shared, already-encoded batches.
//!
//! Reads are driven by notifications: a notification for a job with state starts one
//! read task for that job, and notifications arriving while it runs only ask for
//! another read ([`Read::Again`]), so a burst costs one or two reads whatever the number
//! of subscribers. The read takes
//! `seq > last_seq`, which is a contiguous range because seqs are gap-free and
//! commit-ordered (see `sql/`). The counter poll ([`Hub::start_counter_poll`]) is the other way in:
//! on a timer, one query reads what is new for every job no read task holds, so events
//! whose NOTIFY was debounced cost no query of their own.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use deadpool_postgres::Pool;
use tokio::sync::{broadcast, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::backoff::Backoff;
use crate::metrics::Metrics;
use crate::model::{End, Event, JobStatus};
use crate::sse::{history_tag, Batch, EventId};
use crate::store;

/// Events per table read.
pub const READ_PAGE: i64 = 1000;

/// Events per job in one counter poll; a job with more is left to its own read task.
/// Small enough that the planner walks each job's `(job_id, seq)` index in order.
const POLL_PAGE: i64 = 100;

/// Ticks of one keep-alive round: each reaches one group of jobs, so a process
/// holding 19,000 streams writes about 1,200 keep-alives at a time, not all at once.
pub const KEEP_ALIVE_GROUPS: u64 = 16;

/// With no notification and nothing found by the counter poll for this long (and the
/// LISTEN session up), the poll slows to [`QUIET_POLL`]: nothing can be waiting for
/// it, because every statement that does not notify comes within 10 ms (the global
/// interval) or 50 ms (its job's debounce) of one that did (`sql/0006`), and that one
/// made the poll fast again.
const QUIET_AFTER: Duration = Duration::from_secs(2);
/// The counter poll's interval on a quiet system: a safety net, not the way in.
const QUIET_POLL: Duration = Duration::from_secs(1);

/// Whether news at `last` and at `now` (milliseconds) are more than [`QUIET_AFTER`] apart.
fn quiet_between(last: u64, now: u64) -> bool {
    now.saturating_sub(last) > QUIET_AFTER.as_millis() as u64
}

/// How long a new subscriber waits for the database before getting a 503.
const SUBSCRIBE_PATIENCE: Duration = Duration::from_secs(15);

/// Tuning of the hub; see `Config` for the flags that set it.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Capacity of each job's broadcast channel, in batches.
    pub channel_capacity: usize,
    /// Most events kept in a job's ring.
    pub ring_events: usize,
    /// Most bytes of frames kept in a job's ring.
    pub ring_bytes: usize,
    /// How long a job's state outlives its last subscriber.
    pub idle_grace: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            channel_capacity: 64,
            ring_events: 4096,
            ring_bytes: 4 << 20,
            idle_grace: Duration::from_secs(30),
        }
    }
}

/// What a job's broadcast channel carries.
#[derive(Debug, Clone)]
pub enum Item {
    /// New events.
    Batch(Arc<Batch>),
    /// Nothing happened for a while: write a keep-alive comment.
    KeepAlive,
    /// The gateway is shutting down: tell the client when to come back and end.
    Shutdown,
    /// The job's history went back (a failover lost events this hub had broadcast):
    /// every stream sends `event: reset` with this seq, the job's last seq now, and
    /// goes on from it.
    Reset(i64),
}

/// The hub. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    settings: Settings,
    metrics: Arc<Metrics>,
    /// A std Mutex: nothing awaits while it is held.
    jobs: Mutex<HashMap<Uuid, Arc<Job>>>,
    /// Cancelled by [`Hub::shutdown`]: no new subscribers, no new reads.
    stop: CancellationToken,
    /// Every task the hub starts (read tasks, the counter poll), so that shutdown can
    /// wait for them.
    tasks: TaskTracker,
    /// The keep-alive group sent last (see [`Hub::keep_alive`]); written and read under
    /// the map's lock.
    keep_alive_last: AtomicU64,
    /// When a notification or the counter poll last brought news, in milliseconds
    /// since `epoch` (see [`QUIET_AFTER`]).
    last_news_ms: AtomicU64,
    epoch: Instant,
    /// Wakes the counter poll out of its quiet sleep: news after a quiet spell, or the
    /// LISTEN session lost.
    poll_wake: Notify,
}

/// The shared state of one job.
pub struct Job {
    id: Uuid,
    /// Which tick of the keep-alive round reaches this job's subscribers.
    keep_alive_group: u64,
    tx: broadcast::Sender<Item>,
    state: Mutex<State>,
}

struct State {
    /// Highest seq broadcast (or known to exist when the state was made).
    last_seq: i64,
    /// The id of the event at `last_seq`, once this hub has broadcast it: what
    /// [`Hub::sweep`] compares with the table to notice history that went back.
    last_id: Option<Uuid>,
    /// Whether the table is not known to still hold what was broadcast: set when the
    /// LISTEN session is lost ([`Hub::suspect`]) and by [`Hub::sweep`]; cleared once a
    /// read has checked it. While set, the ring serves no catch-up (it may hold a
    /// history a failover took back) and the read task checks first.
    verify: bool,
    /// Counts the times `verify` was set, so a check that began before the last
    /// suspicion does not clear it.
    verify_epoch: u64,
    /// Recent batches, oldest first; together they cover `ring_first..=last_seq`.
    ring: VecDeque<Arc<Batch>>,
    /// The seq and tag of the last event of the batch the ring dropped last: a
    /// resumer exactly there is checked without reading the table.
    before_ring: Option<(i64, u32)>,
    ring_events: usize,
    ring_bytes: usize,
    /// Set once the job's final status event has been seen at the end of the table.
    end: Option<End>,
    /// Who reads the job's new events.
    read: Read,
    /// When the last subscriber left (the janitor's clock).
    idle_since: Option<Instant>,
}

/// Who reads a job's new events, and whether more were announced meanwhile. Only the
/// holder of `Running` or `Again` delivers, so reads of one job never race.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    /// Nobody: the next wake starts a read task.
    Idle,
    /// The counter poll's query covers the job, but a wake does not wait for it (the
    /// query reads every followed job and takes milliseconds): it takes the job over
    /// as from `Idle`, and the poll then leaves the job alone and delivers nothing of
    /// it.
    Polled,
    /// A read task, or the counter poll after its query, is reading.
    Running,
    /// ...and a wake during that read announced events up to this seq: read again
    /// only if the read fell short of it.
    Again(i64),
}

/// Where a new subscriber starts.
pub enum Start {
    /// The job does not exist.
    NotFound,
    /// The job is finished and the cursor is at its end.
    Finished,
    /// The hub is shutting down and takes no new subscribers.
    ShuttingDown,
    /// Subscribed: items sent after this call arrive on `rx`.
    Live(Subscription),
}

/// A subscriber's handle on its job.
pub struct Subscription {
    pub(crate) job: Arc<Job>,
    pub(crate) rx: broadcast::Receiver<Item>,
}

/// What the ring can give a subscriber resuming after some seq.
pub enum CatchUp {
    /// Frames (possibly none) bringing it up to the first seq given (at most about a
    /// page of bytes), and the hub's `last_seq`, the second.
    Frames(Vec<Bytes>, i64, i64),
    /// The ring does not reach back that far: read the table.
    Table,
}

/// Whether a cursor is exactly at a finished job's end: at its last seq, naming the
/// event there or no event at all.
fn at_end(after: EventId, end: &End, last_id: Option<Uuid>) -> bool {
    after.seq == end.last_seq
        && match after.tag {
            None => true,
            Some(tag) => last_id.map(history_tag) == Some(tag),
        }
}

impl Hub {
    pub fn new(pool: Pool, settings: Settings, metrics: Arc<Metrics>) -> Hub {
        Hub {
            inner: Arc::new(Inner {
                pool,
                settings,
                metrics,
                jobs: Mutex::new(HashMap::new()),
                stop: CancellationToken::new(),
                tasks: TaskTracker::new(),
                keep_alive_last: AtomicU64::new(KEEP_ALIVE_GROUPS - 1),
                last_news_ms: AtomicU64::new(0),
                epoch: Instant::now(),
                poll_wake: Notify::new(),
            }),
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Number of jobs with state.
    pub fn job_count(&self) -> usize {
        self.jobs().len()
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Arc<Job>>> {
        self.inner.jobs.lock().expect("hub lock poisoned")
    }

    /// Subscribes to a job, creating its state if needed. `after` is the subscriber's
    /// cursor, used only to answer `Finished` without subscribing (when it names the
    /// job's last event, or names no history).
    ///
    /// The receiver is made before the caller reads anything, so any event the
    /// caller's backfill misses arrives on it (subscribe first, then read).
    pub async fn subscribe(&self, job_id: Uuid, after: EventId) -> Result<Start, crate::Error> {
        if let Some(start) = self.subscribe_existing(job_id, after) {
            return Ok(start);
        }
        // First subscriber: learn where the job is. Outside the map's lock (it awaits).
        let Some((status, last_seq, last_id)) = self.job_cursor(job_id).await? else {
            return Ok(Start::NotFound);
        };
        let terminal = status.is_terminal();
        let end = terminal.then_some(End { status, last_seq });
        if let Some(end) = &end {
            // Exactly at the end; a cursor beyond it, or one naming another event
            // there, gets `reset` then `end`.
            if at_end(after, end, last_id) {
                return Ok(Start::Finished);
            }
        }
        let (subscription, created) = {
            let mut jobs = self.jobs();
            // Checked again under the map's lock, which `shutdown` takes to tell every
            // job: a subscriber either sees the flag or gets the shutdown item.
            if self.is_shutting_down() {
                return Ok(Start::ShuttingDown);
            }
            let mut created = false;
            let keep_alive_group = self.inner.keep_alive_last.load(Ordering::Relaxed);
            let job = jobs
                .entry(job_id)
                .or_insert_with(|| {
                    created = true;
                    let mut job = Job::new(job_id, last_seq, last_id, end, &self.inner.settings);
                    job.keep_alive_group = keep_alive_group;
                    Arc::new(job)
                })
                .clone();
            // Subscribe under the map's lock, so the janitor cannot drop the state
            // between our lookup and our subscription.
            let rx = job.tx.subscribe();
            job.lock().idle_since = None;
            (Subscription { job, rx }, created)
        };
        if created {
            self.inner.metrics.jobs_created.inc();
            // Events committed between our query and the state's insertion may have
            // been notified while no state existed: read once to pick them up.
            self.wake(job_id, i64::MAX);
        }
        Ok(Start::Live(subscription))
    }

    /// The job's status, last seq and the id of the event there (what
    /// [`Hub::verify`] later compares with), waiting out a short database outage (a restart)
    /// rather than failing a browser whose EventSource would not retry a 503.
    async fn job_cursor(
        &self,
        job_id: Uuid,
    ) -> Result<Option<(JobStatus, i64, Option<Uuid>)>, crate::Error> {
        let deadline = Instant::now() + SUBSCRIBE_PATIENCE;
        let mut backoff = Backoff::gateway();
        loop {
            let result = async {
                let client = self.inner.pool.get().await?;
                let cursor = async {
                    let Some((status, last_seq)) = store::job_cursor(&client, job_id).await? else {
                        return Ok(None);
                    };
                    let last_id = match last_seq {
                        0 => None,
                        seq => store::events_after(&client, job_id, seq - 1, None, 1)
                            .await?
                            .first()
                            .filter(|e| e.seq == seq)
                            .map(|e| e.id),
                    };
                    Ok(Some((status, last_seq, last_id)))
                }
                .await;
                crate::db::release(client, &cursor);
                Ok::<_, crate::Error>(cursor?)
            }
            .await;
            match result {
                Ok(cursor) => return Ok(cursor),
                Err(e) if Instant::now() >= deadline || self.is_shutting_down() => return Err(e),
                Err(_) => tokio::time::sleep(backoff.next()).await,
            }
        }
    }

    fn subscribe_existing(&self, job_id: Uuid, after: EventId) -> Option<Start> {
        let jobs = self.jobs();
        if self.is_shutting_down() {
            return Some(Start::ShuttingDown);
        }
        let job = jobs.get(&job_id)?;
        let mut state = job.lock();
        if let Some(end) = &state.end {
            if (after.tag.is_none() || !state.verify) && at_end(after, end, state.last_id) {
                return Some(Start::Finished);
            }
        }
        state.idle_since = None;
        let rx = job.tx.subscribe();
        drop(state);
        Some(Start::Live(Subscription {
            job: job.clone(),
            rx,
        }))
    }

    /// A notification `job_id:max_seq` (or a sweep, with `i64::MAX`): read the job's
    /// new events unless a read is already running, in which case it reads again.
    pub fn wake(&self, job_id: Uuid, max_seq: i64) {
        self.saw_news();
        let Some(job) = self.jobs().get(&job_id).cloned() else {
            return;
        };
        {
            let mut state = job.lock();
            if max_seq <= state.last_seq {
                return;
            }
            state.read = match state.read {
                Read::Idle | Read::Polled => Read::Running,
                Read::Running => Read::Again(max_seq),
                Read::Again(wanted) => Read::Again(wanted.max(max_seq)),
            };
            if state.read != Read::Running {
                return;
            }
        }
        self.spawn_read(job);
    }

    /// Wakes every job with state: after the LISTEN connection came back, anything
    /// may have been missed, and history may have gone back (a failover to a standby
    /// that had not received everything), so each job's read first checks that the
    /// table still holds the last event broadcast.
    pub fn sweep(&self) {
        let jobs: Vec<Arc<Job>> = self.jobs().values().cloned().collect();
        tracing::debug!(jobs = jobs.len(), "sweeping active jobs");
        for job in jobs {
            job.lock().suspect();
            self.wake(job.id, i64::MAX);
        }
    }

    /// The LISTEN session was lost: the server may have failed over, and until each
    /// job is checked against the table its ring is not trusted for catch-ups (a
    /// resumer reads the table instead). Reads go on meanwhile: each checks, in its own
    /// query, that the table still holds the last event broadcast before appending.
    pub fn suspect(&self) {
        for job in self.jobs().values() {
            job.lock().suspect();
        }
        // Without LISTEN the counter poll is the way in: at its full pace at once.
        self.inner.poll_wake.notify_one();
    }

    /// The job's last seq in the table now, or `None` if the job is gone.
    pub async fn table_last_seq(&self, job_id: Uuid) -> Result<Option<i64>, crate::Error> {
        let client = self.inner.pool.get().await?;
        let cursor = store::job_cursor(&client, job_id).await;
        crate::db::release(client, &cursor);
        Ok(cursor?.map(|(_, last_seq)| last_seq))
    }

    /// The id of the job's event at `seq` in the table, if it has one: what a resumer
    /// whose seq the ring cannot name is checked against.
    pub async fn table_id_at(&self, job_id: Uuid, seq: i64) -> Result<Option<Uuid>, crate::Error> {
        let client = self.inner.pool.get().await?;
        let id = store::event_id_at(&client, job_id, seq).await;
        crate::db::release(client, &id);
        Ok(id?)
    }

    /// The check [`Hub::sweep`] asks for: whether the table still ends at or after the
    /// hub's `last_seq` with the same event there. If not, the history went back: the
    /// ring is dropped, the hub starts over from the table's last seq, and every stream
    /// gets [`Item::Reset`].
    async fn verify(&self, job: &Job) -> Result<(), crate::Error> {
        let (last_seq, last_id, epoch) = {
            let state = job.lock();
            (state.last_seq, state.last_id, state.verify_epoch)
        };
        self.check_against_table(job, last_seq, last_id).await?;
        // The state now matches the table (it did, or it was reset to it), unless the
        // LISTEN session was lost again meanwhile.
        let mut state = job.lock();
        if state.verify_epoch == epoch {
            state.verify = false;
        }
        Ok(())
    }

    /// The body of [`Hub::verify`]: if the table no longer holds the event broadcast
    /// at `last_seq`, resets the job to the table.
    async fn check_against_table(
        &self,
        job: &Job,
        last_seq: i64,
        last_id: Option<Uuid>,
    ) -> Result<(), crate::Error> {
        let client = self.inner.pool.get().await?;
        // The event first, then the counter: if a rewrite commits between the two
        // reads, the counter read second is the newer one, so N is never stale.
        let checked = async {
            let at = |seq: i64| store::events_after(&client, job.id, seq - 1, None, 1);
            if last_seq > 0 {
                let there = at(last_seq).await?.first().map(|e| (e.seq, e.id));
                match (there, last_id) {
                    (Some((seq, id)), Some(known)) if seq == last_seq && id == known => {
                        return Ok(None)
                    }
                    // Not known yet (the state was made while the event was being
                    // written): learn it.
                    (Some((seq, id)), None) if seq == last_seq => {
                        let mut state = job.lock();
                        if state.last_seq == last_seq && state.last_id.is_none() {
                            state.last_id = Some(id);
                        }
                        return Ok(None);
                    }
                    _ => {}
                }
            } else {
                return Ok(None);
            }
            let Some((status, table_last)) = store::job_cursor(&client, job.id).await? else {
                return Ok(None);
            };
            let new_id = match table_last {
                0 => None,
                seq => at(seq).await?.first().map(|e| e.id),
            };
            Ok(Some((status, table_last, new_id)))
        }
        .await;
        crate::db::release(client, &checked);
        let Some((status, table_last, new_id)) = checked? else {
            return Ok(());
        };
        tracing::warn!(job = %job.id, broadcast = last_seq, table = table_last,
            "the job's history went back; resetting its streams");
        self.inner.metrics.history_resets.inc();
        job.reset(table_last, new_id, status);
        Ok(())
    }

    /// One query over the new events of every job with state that no read task is
    /// reading: whatever was committed after each job's `last_seq` is delivered. This
    /// delivers what debounced or suppressed notifications did not announce (see
    /// `sql/0002_debounced_notify.sql`), and costs one query per interval for all jobs
    /// together (an index probe per job), none when no one is subscribed. Events are
    /// read in the same query, not by a read per job afterwards: under load most events
    /// come this way, so that saves a query per job with news on every tick.
    async fn poll_counters(&self) -> Result<(), crate::Error> {
        // Mark the idle jobs as covered by this query (`Polled`): a wake during it
        // takes its job over at once (a read task of its own) instead of waiting for
        // the query, and this poll then drops what it read of that job.
        let claimed: Vec<(Arc<Job>, i64)> = self
            .jobs()
            .values()
            .filter_map(|job| {
                let mut state = job.lock();
                if state.read != Read::Idle {
                    return None;
                }
                state.read = Read::Polled;
                Some((job.clone(), state.last_seq))
            })
            .collect();
        if claimed.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = claimed.iter().map(|(job, _)| job.id).collect();
        let afters: Vec<i64> = claimed.iter().map(|(_, after)| *after).collect();
        let result = async {
            let client = self.inner.pool.get().await?;
            let events = store::events_following_each(&client, &ids, &afters, POLL_PAGE).await;
            crate::db::release(client, &events);
            Ok::<_, crate::Error>(events?)
        }
        .await;
        self.inner.metrics.counter_polls.inc();
        let mut news: HashMap<Uuid, (Option<Uuid>, Vec<Event>)> = HashMap::new();
        let outcome = result.map(|events| {
            for (event, prev) in events {
                news.entry(event.job_id)
                    .or_insert_with(|| (prev, Vec::new()))
                    .1
                    .push(event);
            }
        });
        if !news.is_empty() {
            self.saw_news();
            self.inner.metrics.table_reads_live.inc();
        }
        for (job, _) in claimed {
            let (prev, events) = news.remove(&job.id).unwrap_or_default();
            {
                let mut state = job.lock();
                if state.read != Read::Polled {
                    // A wake took it over during the query: its read task delivers.
                    self.inner.metrics.poll_takeovers.inc();
                    continue;
                }
                state.read = Read::Running;
            }
            if !events.is_empty() && !job.continues(prev) {
                // History went back under us: the read task checks and resets.
                self.spawn_read(job);
                continue;
            }
            let mut full = store::page_is_full(&events, POLL_PAGE);
            if !events.is_empty() {
                full |= !self.deliver(&job, &events, full);
            }
            // A full page, or a wake during the query for more than it found: the
            // job's own read task takes over (and, after a failed query, retries).
            if self.keep_reading(&job, full) {
                self.spawn_read(job);
            }
        }
        outcome
    }

    /// Starts the read task of a job whose read state this caller set to `Running`.
    fn spawn_read(&self, job: Arc<Job>) {
        let hub = self.clone();
        self.inner
            .tasks
            .spawn(async move { hub.read_loop(job).await });
    }

    /// Reads and broadcasts until the job has nothing new and no notification is
    /// pending. One of these runs per job at most.
    async fn read_loop(&self, job: Arc<Job>) {
        let mut backoff = Backoff::gateway();
        loop {
            if self.is_shutting_down() {
                job.lock().read = Read::Idle;
                return;
            }
            let verify = job.lock().verify;
            if verify {
                if let Err(e) = self.verify(&job).await {
                    tracing::warn!(job = %job.id, error = %e, "checking history failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next()) => {}
                        _ = self.inner.stop.cancelled() => {}
                    }
                    continue;
                }
            }
            let after = {
                let mut state = job.lock();
                state.read = Read::Running;
                state.last_seq
            };
            let events = match self.read(job.id, after).await {
                Ok((prev, events)) => {
                    backoff.reset();
                    if !events.is_empty() && !job.continues(prev) {
                        // History went back under us: check and reset first.
                        continue;
                    }
                    events
                }
                Err(e) => {
                    tracing::warn!(job = %job.id, error = %e, "reading events failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next()) => {}
                        _ = self.inner.stop.cancelled() => {}
                    }
                    continue;
                }
            };
            let mut full = store::page_is_full(&events, READ_PAGE);
            if !events.is_empty() {
                full |= !self.deliver(&job, &events, full);
            }
            if !self.keep_reading(&job, full) {
                return;
            }
        }
    }

    /// Encodes freshly read events once and broadcasts them. `full`: the read stopped
    /// at its page size, so it may not have reached the end of the table. The batch
    /// stops at [`store::PAGE_BYTES`] of frames: returns whether it took every event
    /// (if not, the caller reads again from where it stopped).
    fn deliver(&self, job: &Job, events: &[Event], full: bool) -> bool {
        let batch = Arc::new(Batch::encode_within(
            events,
            !full,
            store::PAGE_BYTES as usize,
        ));
        let took_all = batch.len_events() == events.len();
        let events = &events[..batch.len_events()];
        let metrics = &self.inner.metrics;
        metrics.batches_encoded.inc();
        let last_id = events.last().expect("deliver gets events").id;
        let receivers = job.publish(batch.clone(), last_id, &self.inner.settings) as u64;
        metrics
            .events_delivered
            .inc_by(batch.len_events() as u64 * receivers);
        metrics
            .bytes_delivered
            .inc_by(batch.len_bytes() as u64 * receivers);
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or_default();
        for event in events {
            metrics
                .observe_commit_to_send_us(now_us.saturating_sub(event.created_us).max(0) as u64);
        }
        took_all
    }

    /// After a read by the holder of `Running`: whether to read again, keeping the
    /// claim, or to release it. Read again when the page was full, or when a wake that
    /// came during the read asked for more than it found (its events committed after
    /// the read's snapshot). A wake for what was just read costs nothing.
    fn keep_reading(&self, job: &Job, full: bool) -> bool {
        let mut state = job.lock();
        if full || matches!(state.read, Read::Again(wanted) if wanted > state.last_seq) {
            return true;
        }
        state.read = Read::Idle;
        false
    }

    /// A page of a job's events after `after`, for a subscriber catching up from its
    /// cursor: the stream asks the hub, which owns the pool.
    pub async fn backfill(&self, job_id: Uuid, after: i64) -> Result<Vec<Event>, crate::Error> {
        let client = self.inner.pool.get().await?;
        self.inner.metrics.table_reads_backfill.inc();
        let events = store::events_after(&client, job_id, after, None, READ_PAGE).await;
        crate::db::release(client, &events);
        Ok(events?)
    }

    /// The job's new events after `after`, with the id of the table's event at
    /// `after` (see [`Job::continues`]).
    async fn read(
        &self,
        job_id: Uuid,
        after: i64,
    ) -> Result<(Option<Uuid>, Vec<Event>), crate::Error> {
        let client = self.inner.pool.get().await?;
        self.inner.metrics.table_reads_live.inc();
        let events = store::events_following_each(&client, &[job_id], &[after], READ_PAGE).await;
        crate::db::release(client, &events);
        let events = events?;
        let prev = events.first().and_then(|(_, prev)| *prev);
        Ok((prev, events.into_iter().map(|(event, _)| event).collect()))
    }

    /// Sends a keep-alive to the subscribers of the jobs in `group` (of
    /// [`KEEP_ALIVE_GROUPS`]), so that a round over all jobs is spread over the
    /// interval instead of waking every stream of the process at once. A job joins the
    /// group that was sent last, so its first keep-alive comes a whole round after it.
    pub fn keep_alive(&self, group: u64) {
        let jobs = self.jobs();
        for job in jobs.values() {
            if job.keep_alive_group == group {
                let _ = job.tx.send(Item::KeepAlive);
            }
        }
        self.inner
            .keep_alive_last
            .store(group % KEEP_ALIVE_GROUPS, Ordering::Relaxed);
    }

    /// Drops the state of jobs that have had no subscriber for the grace period.
    pub fn drop_idle(&self) {
        let now = Instant::now();
        let grace = self.inner.settings.idle_grace;
        let mut jobs = self.jobs();
        jobs.retain(|_, job| {
            let mut state = job.lock();
            if job.tx.receiver_count() > 0 || state.read != Read::Idle {
                state.idle_since = None;
                return true;
            }
            let since = *state.idle_since.get_or_insert(now);
            now.duration_since(since) < grace
        });
    }

    /// Tells every stream to end and every task of the hub to stop; new
    /// subscriptions are refused from now on. [`Hub::stopped`] waits for the tasks.
    ///
    /// Streams learn it from their job's channel (`Item::Shutdown`), which they poll
    /// anyway, rather than from the token: a token polled by every stream would add a
    /// shared lock to every delivery to every subscriber.
    pub fn shutdown(&self) {
        self.inner.stop.cancel();
        self.inner.tasks.close();
        // Under the map's lock: see `subscribe`.
        for job in self.jobs().values() {
            let _ = job.tx.send(Item::Shutdown);
        }
    }

    /// Resolves once every task the hub started has ended (after [`Hub::shutdown`]).
    pub async fn stopped(&self) {
        self.inner.tasks.wait().await
    }

    pub fn is_shutting_down(&self) -> bool {
        self.inner.stop.is_cancelled()
    }

    fn saw_news(&self) {
        let now = self.now_ms();
        let last = self.inner.last_news_ms.swap(now, Ordering::Relaxed);
        if quiet_between(last, now) {
            // The first news after a quiet spell: the poll goes back to its pace.
            self.inner.poll_wake.notify_one();
        }
    }

    /// Whether nothing came for [`QUIET_AFTER`].
    fn is_quiet(&self) -> bool {
        quiet_between(
            self.inner.last_news_ms.load(Ordering::Relaxed),
            self.now_ms(),
        )
    }

    /// Milliseconds since the hub's `epoch`.
    fn now_ms(&self) -> u64 {
        self.inner.epoch.elapsed().as_millis() as u64
    }

    /// Starts the counter poll: every `interval`, one query delivers what debounced or
    /// suppressed notifications did not announce. On a quiet system (no news for
    /// [`QUIET_AFTER`]) while `listening()` says the LISTEN session is up, it polls only
    /// every [`QUIET_POLL`]: idle replicas holding thousands of jobs then cost almost
    /// nothing. Zero turns it off. It stops with the hub.
    pub fn start_counter_poll(
        &self,
        interval: Duration,
        listening: impl Fn() -> bool + Send + 'static,
    ) {
        if interval.is_zero() {
            return;
        }
        let hub = self.clone();
        self.inner.tasks.spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failing = false;
            let mut last_poll = Instant::now();
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = hub.inner.stop.cancelled() => return,
                }
                if hub.is_quiet() && listening() {
                    // Asleep until the quiet poll is due, or news or a lost LISTEN
                    // session wakes it, not woken by every tick (an idle replica's
                    // runtime would wake 50 times a second for nothing).
                    let due = tokio::time::Instant::from_std(last_poll + QUIET_POLL);
                    tokio::select! {
                        _ = tokio::time::sleep_until(due) => {}
                        _ = hub.inner.poll_wake.notified() => {
                            ticker.reset();
                            continue;
                        }
                        _ = hub.inner.stop.cancelled() => return,
                    }
                }
                last_poll = Instant::now();
                match hub.poll_counters().await {
                    Ok(()) => failing = false,
                    Err(e) => {
                        // Log once per outage, not 50 times a second.
                        if !failing {
                            tracing::warn!(error = %e, "counter poll failed; retrying");
                        }
                        failing = true;
                    }
                }
            }
        });
    }

    /// Subscribers per job, summed.
    pub fn subscriber_count(&self) -> usize {
        self.jobs().values().map(|j| j.tx.receiver_count()).sum()
    }
}

impl State {
    /// See [`State::verify`].
    fn suspect(&mut self) {
        self.verify = true;
        self.verify_epoch += 1;
    }
}

impl Job {
    fn new(
        id: Uuid,
        last_seq: i64,
        last_id: Option<Uuid>,
        end: Option<End>,
        settings: &Settings,
    ) -> Job {
        let (tx, _) = broadcast::channel(settings.channel_capacity);
        Job {
            id,
            keep_alive_group: 0,
            tx,
            state: Mutex::new(State {
                last_seq,
                last_id,
                verify: false,
                verify_epoch: 0,
                ring: VecDeque::new(),
                before_ring: None,
                ring_events: 0,
                ring_bytes: 0,
                end,
                read: Read::Idle,
                idle_since: None,
            }),
        }
    }

    pub fn id(&self) -> Uuid {
        self.id
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("job lock poisoned")
    }

    /// Appends a batch to the ring and broadcasts it. Both happen under the state lock,
    /// so a subscriber that takes the lock sees each batch either in the ring or later
    /// on its receiver.
    /// Returns how many receivers it reached.
    fn publish(&self, batch: Arc<Batch>, last_id: Uuid, settings: &Settings) -> usize {
        let mut state = self.lock();
        if batch.last_seq() <= state.last_seq {
            return 0;
        }
        debug_assert_eq!(
            batch.first_seq(),
            state.last_seq + 1,
            "reads are contiguous"
        );
        state.last_seq = batch.last_seq();
        state.last_id = Some(last_id);
        if let Some(end) = batch.end() {
            state.end = Some(end.clone());
        }
        state.ring_events += batch.len_events();
        state.ring_bytes += batch.len_bytes();
        state.ring.push_back(batch.clone());
        while state.ring.len() > 1
            && (state.ring_events > settings.ring_events || state.ring_bytes > settings.ring_bytes)
        {
            let old = state.ring.pop_front().expect("ring is not empty");
            state.before_ring = old.tag_at(old.last_seq()).map(|t| (old.last_seq(), t));
            state.ring_events -= old.len_events();
            state.ring_bytes -= old.len_bytes();
        }
        // No receivers is fine: the ring keeps it for the next one.
        self.tx.send(Item::Batch(batch)).unwrap_or(0)
    }

    /// Starts the job over from the table's `last_seq` (see [`Hub::verify`]): the ring
    /// is dropped and every stream is told. Under the state lock, like `publish`, so a
    /// subscriber sees either the old state and then the reset, or only the new state.
    fn reset(&self, last_seq: i64, last_id: Option<Uuid>, status: JobStatus) {
        let mut state = self.lock();
        state.last_seq = last_seq;
        state.last_id = last_id;
        state.ring.clear();
        state.before_ring = None;
        state.ring_events = 0;
        state.ring_bytes = 0;
        state.end = status.is_terminal().then_some(End { status, last_seq });
        let _ = self.tx.send(Item::Reset(last_seq));
    }

    /// Whether new events read after the state's `last_seq` continue what was
    /// broadcast: `prev`, the id the table holds at `last_seq`, is the one broadcast
    /// there. Every read checks it before appending, so a failover that took events
    /// back is noticed at the first read from the new primary, whichever connection
    /// got there first; and the table's history being a prefix of the old one up to
    /// the first lost commit, a match there vouches for everything before it. If not,
    /// the job is marked for [`Hub::verify`], which resets it.
    fn continues(&self, prev: Option<Uuid>) -> bool {
        let mut state = self.lock();
        let ok = match state.last_id {
            _ if state.last_seq == 0 => true,
            // Not learnt yet (see `Hub::verify`): nothing to compare with.
            None => true,
            Some(known) => prev == Some(known),
        };
        if !ok {
            state.suspect();
        }
        ok
    }

    /// The frames after `after` that the ring holds, if it reaches back that far: whole
    /// batches up to about `max_bytes` (at least one), and the seq they reach. Nothing
    /// from the ring while the job awaits a check against the table (see
    /// [`Hub::suspect`]).
    pub fn catch_up(&self, after: i64, max_bytes: usize) -> CatchUp {
        let state = self.lock();
        if after >= state.last_seq {
            return CatchUp::Frames(Vec::new(), state.last_seq, state.last_seq);
        }
        if state.verify {
            return CatchUp::Table;
        }
        match state.ring.front() {
            Some(first) if first.first_seq() <= after + 1 => {
                let mut frames = Vec::new();
                let mut bytes = 0;
                let mut upto = after;
                for batch in &state.ring {
                    if bytes >= max_bytes {
                        break;
                    }
                    if let Some(frame) = batch.after(after) {
                        bytes += frame.len();
                        frames.push(frame);
                        upto = batch.last_seq();
                    }
                }
                CatchUp::Frames(frames, upto, state.last_seq)
            }
            _ => CatchUp::Table,
        }
    }

    /// The job's end, once known.
    pub fn end(&self) -> Option<End> {
        self.lock().end.clone()
    }

    /// What the hub knows of the event at `seq`: its history tag, when the ring holds
    /// it (or it is the last one broadcast), and the hub's last seq. Nothing while the
    /// job awaits a check against the table: what the ring holds may be a history a
    /// failover took back.
    pub fn tag_at(&self, seq: i64) -> (Option<u32>, i64) {
        let state = self.lock();
        if state.verify {
            return (None, state.last_seq);
        }
        let tag = if seq == state.last_seq {
            state.last_id.map(history_tag)
        } else {
            state
                .ring
                .iter()
                .find(|b| b.first_seq() <= seq && seq <= b.last_seq())
                .and_then(|b| b.tag_at(seq))
                .or_else(|| state.before_ring.filter(|&(s, _)| s == seq).map(|(_, t)| t))
        };
        (tag, state.last_seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Level;
    use serde_json::value::RawValue;

    fn batch(seq: i64, bytes: usize) -> Arc<Batch> {
        let event = Event {
            id: Uuid::nil(),
            job_id: Uuid::nil(),
            seq,
            level: Level::Info,
            line: seq,
            message: "x".repeat(bytes),
            payload: RawValue::from_string("{}".into()).unwrap(),
            created_at: "2026-01-01T00:00:00.000000Z".into(),
            created_us: 0,
        };
        Arc::new(Batch::encode(&[event], false))
    }

    #[test]
    fn a_ring_catch_up_is_bounded_in_bytes_but_gives_one_batch() {
        let settings = Settings::default();
        let job = Job::new(Uuid::nil(), 0, None, None, &settings);
        for seq in 1..=5 {
            job.publish(batch(seq, 300 << 10), Uuid::nil(), &settings);
        }
        // About 1 MiB of 300 KiB batches: four of them, then the rest on the next call.
        let CatchUp::Frames(frames, upto, last) = job.catch_up(0, 1 << 20) else {
            panic!("the ring reaches back to the start");
        };
        assert_eq!((frames.len(), upto, last), (4, 4, 5));
        let CatchUp::Frames(frames, upto, _) = job.catch_up(upto, 1 << 20) else {
            panic!("still in the ring");
        };
        assert_eq!((frames.len(), upto), (1, 5));
        // However small the budget, one batch.
        let CatchUp::Frames(frames, upto, _) = job.catch_up(2, 1) else {
            panic!("still in the ring");
        };
        assert_eq!((frames.len(), upto), (1, 3));
    }
}
