//! The job list's feed: one stream of every job's status changes.
//!
//! Status triggers notify `agent_job_status`; one task reads the changed jobs (many ids
//! per query when changes come in bursts) and broadcasts `event: job_status` frames,
//! encoded once, to every open `/api/queue/jobs/stream`.

use std::collections::HashSet;
use std::sync::Arc;

use std::convert::Infallible;

use bytes::Bytes;
use futures::StreamExt;
use hyper::body::Frame;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::auth::Grant;
use crate::backoff::Backoff;
use crate::sse;
use crate::store;

/// Frames of the status stream with the job they are about (nil: for everyone).
type Item = (Uuid, Bytes);

/// Jobs re-sent after the LISTEN connection came back.
const SWEEP_JOBS: i64 = 100;

/// The feed. Cheap to clone.
#[derive(Clone)]
pub struct StatusFeed {
    inner: Arc<Inner>,
}

struct Inner {
    tx: broadcast::Sender<Item>,
    /// Cancelled when the gateway drains: every stream ends, then the reader task.
    shutdown: CancellationToken,
    /// `Some(id)`: a job changed; `None`: resend the recently changed jobs.
    changed_tx: mpsc::UnboundedSender<Option<Uuid>>,
}

impl StatusFeed {
    /// Creates the feed and its reader task; both its streams and the task end when
    /// `shutdown` is cancelled.
    pub fn start(
        pool: deadpool_postgres::Pool,
        shutdown: CancellationToken,
    ) -> (StatusFeed, tokio::task::JoinHandle<()>) {
        let (tx, _) = broadcast::channel(1024);
        let (changed_tx, changed_rx) = mpsc::unbounded_channel();
        let feed = StatusFeed {
            inner: Arc::new(Inner {
                tx,
                changed_tx,
                shutdown,
            }),
        };
        let task = tokio::spawn(feed.clone().run(pool, changed_rx));
        (feed, task)
    }

    /// A job's status changed (or it was created).
    pub fn changed(&self, id: Uuid) {
        let _ = self.inner.changed_tx.send(Some(id));
    }

    /// Notifications may have been missed: resend the recently changed jobs.
    pub fn sweep(&self) {
        let _ = self.inner.changed_tx.send(None);
    }

    /// The frames of one `/api/queue/jobs/stream`: `retry:`, then the changes of the
    /// jobs `grant` covers, until shutdown, `deadline` (token expiry) or a lag.
    pub fn stream(
        &self,
        retry_ms: u64,
        grant: Grant,
        deadline: Option<tokio::time::Instant>,
    ) -> impl futures::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send {
        let first = sse::retry_frame(retry_ms);
        let first = futures::stream::once(async move { Ok(Frame::data(first)) });
        let shutdown = self.inner.shutdown.clone();
        let rest = futures::stream::unfold(Some(self.inner.tx.subscribe()), move |rx| {
            let grant = grant.clone();
            let shutdown = shutdown.clone();
            async move {
                let mut rx = rx?;
                // Credentials that never expire: a deadline that never comes.
                let deadline = deadline.map(tokio::time::sleep_until);
                let expired = async move {
                    match deadline {
                        Some(sleep) => sleep.await,
                        None => futures::future::pending().await,
                    }
                };
                tokio::pin!(expired);
                loop {
                    let item = tokio::select! {
                        item = rx.recv() => item,
                        _ = &mut expired => return None,
                        _ = shutdown.cancelled() => return None,
                    };
                    match item {
                        Ok((job, bytes)) => {
                            if !job.is_nil() && !grant.covers(job) {
                                continue;
                            }
                            return Some((Ok(Frame::data(bytes)), Some(rx)));
                        }
                        // A list page that fell behind would miss changes: end the
                        // stream instead, so it reconnects and re-reads the list (as it
                        // does after any reconnect). Never a silent skip.
                        Err(_) => return None,
                    }
                }
            }
        });
        first.chain(rest)
    }

    pub fn keep_alive(&self) {
        let _ = self
            .inner
            .tx
            .send((Uuid::nil(), Bytes::from_static(sse::KEEP_ALIVE)));
    }

    async fn run(
        self,
        pool: deadpool_postgres::Pool,
        mut changed_rx: mpsc::UnboundedReceiver<Option<Uuid>>,
    ) {
        let shutdown = &self.inner.shutdown;
        let mut backoff = Backoff::gateway();
        loop {
            let first = tokio::select! {
                first = changed_rx.recv() => first,
                _ = shutdown.cancelled() => return,
            };
            let Some(first) = first else { return };
            // Take everything that is already waiting: one query for the burst.
            let mut ids = HashSet::new();
            let mut sweep = false;
            let mut next = Some(first);
            while let Some(change) = next {
                match change {
                    Some(id) => {
                        ids.insert(id);
                    }
                    None => sweep = true,
                }
                next = changed_rx.try_recv().ok();
            }
            if self.inner.tx.receiver_count() == 0 {
                continue;
            }
            let ids: Vec<Uuid> = ids.into_iter().collect();
            loop {
                match self.read(&pool, &ids, sweep).await {
                    Ok(jobs) => {
                        backoff.reset();
                        for job in jobs {
                            let frame = sse::named_frame("job_status", &job);
                            let _ = self.inner.tx.send((job.id, frame));
                        }
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "reading job statuses failed; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(backoff.next()) => {}
                            _ = shutdown.cancelled() => return,
                        }
                    }
                }
            }
        }
    }

    async fn read(
        &self,
        pool: &deadpool_postgres::Pool,
        ids: &[Uuid],
        sweep: bool,
    ) -> Result<Vec<crate::model::Job>, crate::Error> {
        let client = pool.get().await?;
        let mut jobs = if sweep {
            store::recently_updated_jobs(&**client, SWEEP_JOBS).await?
        } else {
            Vec::new()
        };
        if !ids.is_empty() {
            jobs.extend(store::jobs_by_id(&**client, ids).await?);
        }
        // Oldest change first, so a client applying them in order ends with the latest.
        jobs.sort_by(|a, b| a.updated_at.cmp(&b.updated_at));
        Ok(jobs)
    }
}
