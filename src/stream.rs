//! One SSE subscriber: backfill, hand-over to live, lag recovery, end.
//!
//! The order of operations is what makes delivery exactly-once:
//! 1. subscribe to the job's broadcast (done by `Hub::subscribe` before we get here);
//! 2. catch up from the cursor: from the hub's ring when it reaches back far enough,
//!    else from the table, page by page;
//! 3. then take live batches from the receiver, skipping any seq already sent, and
//!    going back to step 2 whenever a batch does not start right after the cursor
//!    (the receiver lagged and lost batches, or anything else left a hole).
//!
//! `cursor` is the highest seq written to this stream; it only moves forward by one
//! frame at a time, so nothing is skipped and nothing is repeated.
//!
//! # Budget
//!
//! What a stream holds unsent is bounded in bytes, whatever its client reads: every
//! page it catches up with (from the ring or the table) stops at about
//! [`store::PAGE_BYTES`], and the next page is read only once the writer holds less
//! than [`PULL_AHEAD`] unsent (a backfill goes at the client's pace). Live batches are
//! pushed, not pulled: a live batch that would take what the writer holds past
//! [`Options::max_buffer`] ends the stream instead (the client resumes from its
//! `Last-Event-ID`, from the table). The writer tells the stream what it holds through
//! a shared [`Backlog`].

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures::task::AtomicWaker;
use http_body_util::StreamBody;
use hyper::body::Frame;
use tokio::sync::broadcast::error::RecvError;

use crate::backoff::Backoff;
use crate::hub::{CatchUp, Hub, Item, Subscription, READ_PAGE};
use crate::sse::{self, Batch};
use crate::store;

/// A stream reads its next page (from the ring or the table) only once its writer holds
/// less than this unsent, so a backfill goes at the client's pace and a client that
/// stops reading holds about one page. Small next to a socket's send buffer, so a fast
/// client never waits for the read.
pub const PULL_AHEAD: usize = 64 << 10;

/// The bytes a stream's writer holds unsent, shared between the writer (which keeps it
/// current) and the stream (which keeps it within budget).
///
/// The gateway's own HTTP/1.1 writer ([`crate::conn`]) updates it; behind hyper (h2,
/// and the HTTP/1.1 streams hyper serves) it stays 0, and hyper's flow control polls
/// the body for a frame only when the last one is sent (h2: at most its 400 KiB send
/// buffer per stream), so there too a stream holds about a page.
#[derive(Debug, Default)]
pub struct Backlog {
    unsent: AtomicUsize,
    /// The stream, waiting for room to read its next page.
    waker: AtomicWaker,
    /// Set by the stream when it ends over budget: the writer drops what it holds and
    /// closes the connection instead of finishing the body.
    over: AtomicBool,
}

impl Backlog {
    pub fn new() -> Arc<Backlog> {
        Arc::default()
    }

    /// The writer holds `n` bytes unsent now.
    pub fn set_unsent(&self, n: usize) {
        self.unsent.store(n, Ordering::Relaxed);
        if n < PULL_AHEAD {
            self.waker.wake();
        }
    }

    pub fn unsent(&self) -> usize {
        self.unsent.load(Ordering::Relaxed)
    }

    /// Whether the stream ended over its budget.
    pub fn is_over(&self) -> bool {
        self.over.load(Ordering::Relaxed)
    }

    /// Resolves once the writer holds less than [`PULL_AHEAD`].
    async fn room(&self) {
        std::future::poll_fn(|cx| {
            if self.unsent() < PULL_AHEAD {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            // Sent between the check and the registration: no wake would come.
            if self.unsent() < PULL_AHEAD {
                return Poll::Ready(());
            }
            Poll::Pending
        })
        .await
    }
}

/// Attempts at a backfill read (about 25 s with backoff) before the stream ends and
/// lets the client reconnect with its Last-Event-ID.
const BACKFILL_ATTEMPTS: u32 = 16;

/// How a stream is shaped: the retry hint and when it must end on its own.
#[derive(Debug, Clone)]
pub struct Options {
    /// `retry:` sent first, in milliseconds.
    pub retry_ms: u64,
    /// `retry:` sent at shutdown is drawn from this range, so clients spread out.
    pub shutdown_retry_ms: (u64, u64),
    /// When the stream's credentials expire, if they do.
    pub deadline: Option<tokio::time::Instant>,
    /// The most bytes the stream's writer may hold unsent when a live batch arrives
    /// (`--max-stream-buffer`); past it the stream ends.
    pub max_buffer: usize,
    /// What the writer holds unsent, shared with it.
    pub backlog: Arc<Backlog>,
}

/// The body of an SSE response for one job.
pub fn body(
    hub: Hub,
    subscription: Subscription,
    cursor: sse::EventId,
    options: Options,
    peer: std::net::SocketAddr,
    slot: crate::limits::Slot,
) -> StreamBody<impl futures::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send> {
    let hub_metrics = hub.metrics().clone();
    let job_id = subscription.job.id();
    let subscriber = Subscriber {
        hub,
        subscription,
        cursor: cursor.seq,
        check: cursor.tag,
        options,
        queue: VecDeque::new(),
        phase: Phase::Start,
        _open: StreamGuard::new(hub_metrics, job_id, peer, slot),
    };
    let stream = futures::stream::unfold(subscriber, |mut s| async move {
        let bytes = s.next().await?;
        Some((Ok(Frame::data(bytes)), s))
    });
    StreamBody::new(stream)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Start,
    CatchUp,
    Live,
    Done,
}

struct Subscriber {
    hub: Hub,
    subscription: Subscription,
    cursor: i64,
    /// The history tag the client sent with its cursor, until checked: whether the
    /// event it holds at `cursor` is the one the job has there.
    check: Option<u32>,
    options: Options,
    /// Frames waiting to be written (backfill pages; live batches bypass it).
    queue: VecDeque<Bytes>,
    phase: Phase,
    _open: StreamGuard,
}

impl Subscriber {
    /// Moves to another phase, keeping the "catching up" gauge right.
    fn set_phase(&mut self, phase: Phase) {
        let gauge = &self.hub.metrics().streams_catching_up;
        match (self.phase == Phase::CatchUp, phase == Phase::CatchUp) {
            (false, true) => {
                gauge.inc();
            }
            (true, false) => {
                gauge.dec();
            }
            _ => {}
        }
        self.phase = phase;
    }

    /// The next bytes to write, or `None` when the stream ends.
    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if let Some(bytes) = self.queue.pop_front() {
                return Some(bytes);
            }
            match self.phase {
                Phase::Start => {
                    self.set_phase(Phase::CatchUp);
                    return Some(sse::retry_frame(self.options.retry_ms));
                }
                Phase::CatchUp => {
                    // The next page only once the writer has sent most of the last.
                    self.options.backlog.room().await;
                    // Boxed: the table read's future is large and rare; inline, it
                    // would be part of every idle subscriber's state.
                    if let Err(e) = Box::pin(self.catch_up()).await {
                        tracing::warn!(job = %self.subscription.job.id(), error = %e,
                            "backfill failed; ending the stream so the client resumes");
                        self.set_phase(Phase::Done);
                    }
                }
                Phase::Live => {
                    if let Some(bytes) = self.live().await {
                        return Some(bytes);
                    }
                }
                Phase::Done => return None,
            }
        }
    }

    /// Brings the stream up to date from the ring or the table; `Live` when done.
    async fn catch_up(&mut self) -> Result<(), crate::Error> {
        let job = self.subscription.job.clone();
        if let Some(tag) = self.check.take() {
            if let Some(last_seq) = self.history_differs(tag).await? {
                self.hub.metrics().resume_resets.inc();
                self.reset(last_seq);
            }
        }
        match job.catch_up(self.cursor, store::PAGE_BYTES as usize) {
            CatchUp::Frames(_, _, last_seq) if self.cursor > last_seq => {
                // Beyond what the hub has: the table may be ahead of the hub (then the
                // events arrive live), or the cursor is past the job's end.
                match self.hub.table_last_seq(job.id()).await? {
                    Some(table_last) if table_last < self.cursor => self.reset(table_last),
                    _ => {}
                }
                self.set_phase(Phase::Live);
                self.check_end();
                return Ok(());
            }
            CatchUp::Frames(frames, upto, last_seq) => {
                if !frames.is_empty() {
                    self.hub.metrics().ring_catch_ups.inc();
                }
                self.queue.extend(frames);
                self.cursor = self.cursor.max(upto);
                if self.cursor >= last_seq {
                    self.set_phase(Phase::Live);
                    self.check_end();
                }
                // Else a page of the ring was taken: the next one when it is sent.
                return Ok(());
            }
            CatchUp::Table => {}
        }
        let events = self.read_table().await?;
        let mut finished = !store::page_is_full(&events, READ_PAGE);
        if !events.is_empty() {
            let batch = Batch::encode_within(&events, finished, store::PAGE_BYTES as usize);
            finished &= batch.len_events() == events.len();
            self.cursor = batch.last_seq();
            if let Some(bytes) = batch.after(i64::MIN) {
                self.queue.push_back(bytes);
            }
            if let Some(end) = batch.end() {
                self.queue.push_back(end.frame());
                self.set_phase(Phase::Done);
                return Ok(());
            }
        }
        if finished {
            // The table had nothing more; whatever commits next arrives on the receiver.
            self.set_phase(Phase::Live);
            self.check_end();
        }
        Ok(())
    }

    /// Whether the event the client holds at its cursor (its tag) is not the job's
    /// event there: then `Some` of the seq to reset to, the job's last seq now. Asked
    /// of the ring first (no query when it holds the cursor, or when the cursor is the
    /// last seq broadcast), else of the table. A seq the table does not hold (past its
    /// end, which the catch-up handles, or deleted by retention) gives no evidence.
    async fn history_differs(&self, tag: u32) -> Result<Option<i64>, crate::Error> {
        let job = &self.subscription.job;
        match job.tag_at(self.cursor) {
            (Some(known), _) if known == tag => return Ok(None),
            (Some(_), last_seq) => return Ok(Some(last_seq)),
            (None, _) => {}
        }
        match self.hub.table_id_at(job.id(), self.cursor).await? {
            Some(id) if sse::history_tag(id) != tag => {
                Ok(Some(self.hub.table_last_seq(job.id()).await?.unwrap_or(0)))
            }
            _ => Ok(None),
        }
    }

    /// `event: reset` `{"lastSeq": N}`: what the client saw after (or instead of) seq
    /// `N` is not the job's history; the stream goes on from `N`.
    fn reset(&mut self, last_seq: i64) {
        self.queue.push_back(sse::named_frame(
            "reset",
            &serde_json::json!({ "lastSeq": last_seq }),
        ));
        self.cursor = last_seq;
    }

    async fn read_table(&self) -> Result<Vec<crate::model::Event>, crate::Error> {
        let mut backoff = Backoff::gateway();
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self
                .hub
                .backfill(self.subscription.job.id(), self.cursor)
                .await
            {
                Ok(events) => return Ok(events),
                Err(e) if attempt >= BACKFILL_ATTEMPTS => return Err(e),
                Err(_) => tokio::time::sleep(backoff.next()).await,
            }
        }
    }

    /// After catching up: if the job has ended at or before the cursor, finish.
    fn check_end(&mut self) {
        if let Some(end) = self.subscription.job.end() {
            if self.cursor >= end.last_seq {
                self.queue.push_back(end.frame());
                self.set_phase(Phase::Done);
            }
        }
    }

    /// Waits for the next live item. `None` means "loop again" (phase may have changed).
    async fn live(&mut self) -> Option<Bytes> {
        let item = match self.options.deadline {
            Some(deadline) => tokio::select! {
                item = self.subscription.rx.recv() => item,
                _ = tokio::time::sleep_until(deadline) => {
                    // Credentials expired: end; the browser reconnects with fresh ones.
                    self.set_phase(Phase::Done);
                    return None;
                }
            },
            None => self.subscription.rx.recv().await,
        };
        match item {
            Ok(Item::Batch(batch)) => self.deliver(&batch),
            Ok(Item::Reset(last_seq)) => {
                // Frames queued before the reset are of the old history: drop them.
                self.queue.clear();
                self.reset(last_seq);
                self.set_phase(Phase::CatchUp);
                None
            }
            Ok(Item::KeepAlive) => Some(Bytes::from_static(sse::KEEP_ALIVE)),
            Ok(Item::Shutdown) => {
                self.set_phase(Phase::Done);
                let (low, high) = self.options.shutdown_retry_ms;
                Some(sse::retry_frame(fastrand::u64(low..=high.max(low))))
            }
            Err(RecvError::Lagged(missed)) => {
                tracing::debug!(job = %self.subscription.job.id(), missed, "subscriber lagged; resyncing");
                self.hub.metrics().lag_resyncs.inc();
                self.set_phase(Phase::CatchUp);
                None
            }
            Err(RecvError::Closed) => {
                self.set_phase(Phase::Done);
                None
            }
        }
    }

    fn deliver(&mut self, batch: &Arc<Batch>) -> Option<Bytes> {
        if batch.last_seq() <= self.cursor {
            return None; // Already sent during catch-up.
        }
        if batch.first_seq() > self.cursor + 1 {
            // A hole: go back to the ring or the table for what is missing.
            self.set_phase(Phase::CatchUp);
            return None;
        }
        let bytes = batch.after(self.cursor);
        let unsent = self.options.backlog.unsent();
        let size = bytes.as_ref().map_or(0, Bytes::len);
        if unsent > 0 && unsent + size > self.options.max_buffer {
            // The client is further behind than its budget: end, so that it resumes
            // from its Last-Event-ID, read from the table at its own pace.
            tracing::info!(job = %self.subscription.job.id(), unsent, cursor = self.cursor,
                "stream over its buffer budget; ending it");
            self.hub.metrics().streams_ended_buffer.inc();
            self.options.backlog.over.store(true, Ordering::Relaxed);
            self.queue.clear();
            self.set_phase(Phase::Done);
            return None;
        }
        self.cursor = batch.last_seq();
        if let Some(end) = batch.end() {
            self.queue.push_back(end.frame());
            self.set_phase(Phase::Done);
        }
        bytes
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.set_phase(Phase::Done);
    }
}

/// Counts open streams for `/metrics` and logs each stream's opening and end.
struct StreamGuard {
    metrics: Arc<crate::metrics::Metrics>,
    _slot: crate::limits::Slot,
    job: uuid::Uuid,
    peer: std::net::SocketAddr,
    opened: tokio::time::Instant,
}

impl StreamGuard {
    fn new(
        metrics: Arc<crate::metrics::Metrics>,
        job: uuid::Uuid,
        peer: std::net::SocketAddr,
        slot: crate::limits::Slot,
    ) -> StreamGuard {
        metrics.streams_open.inc();
        metrics.streams_opened.inc();
        tracing::info!(%job, client = %peer, "stream opened");
        StreamGuard {
            metrics,
            _slot: slot,
            job,
            peer,
            opened: tokio::time::Instant::now(),
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.metrics.streams_open.dec();
        let lived: Duration = self.opened.elapsed();
        tracing::info!(job = %self.job, client = %self.peer, secs = lived.as_secs_f64(), "stream closed");
    }
}
