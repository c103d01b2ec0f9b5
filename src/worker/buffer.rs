//! The bounded queue between the pipes and the writer.
//!
//! Readers push [`Chunk`]s of whole, redacted lines; the writer takes them in batches.
//! The bound is in bytes. When it is reached:
//!
//! - while the database accepts writes, a reader waits for room (backpressure: the
//!   child then waits on its pipe, as it would on a slow terminal), but at most
//!   `max_stall` per chunk, so a slow database cannot stall the child for long;
//! - while the database is unreachable (the writer says so with
//!   [`Buffer::set_outage`]), or once `max_stall` has passed, the OLDEST chunks are
//!   dropped and counted. The writer takes the count with the next chunks and writes an
//!   event saying how much was lost, in the place where it was lost.
//!
//! The queue also keeps the log's byte budget (`--max-log-bytes`): whole lines are
//! admitted until it is spent; past it nothing more is queued, and the writer is handed
//! ONE notice once everything admitted before it is out, so the notice comes last.
//!
//! A std `Mutex`, not a tokio one: nothing awaits while it is held.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::decode::count_lines;

/// Which pipe of the child.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    /// The name stored in `payload.stream`.
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Whole lines of one stream, each ending in `\n`, already redacted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub stream: Stream,
    pub text: String,
    pub lines: usize,
}

/// Output dropped because the buffer was full.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    pub lines: u64,
    pub bytes: u64,
}

impl Dropped {
    pub fn is_empty(&self) -> bool {
        self.lines == 0 && self.bytes == 0
    }
}

/// Output not stored because the log reached its byte budget.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Truncated {
    /// The budget, `--max-log-bytes`.
    pub limit: u64,
    pub lines: u64,
    pub bytes: u64,
}

/// What the writer takes in one go.
#[derive(Debug, Default)]
pub struct Taken {
    /// Output dropped before `chunks` (and after anything taken earlier).
    pub dropped: Dropped,
    pub chunks: Vec<Chunk>,
    /// Set once, after the last chunk that fit the budget: write the notice.
    pub truncated: Option<u64>,
}

/// The queue; shared by the readers and the writer through an `Arc`.
#[derive(Debug)]
pub struct Buffer {
    inner: Mutex<Inner>,
    /// Readers wake the writer.
    data_ready: Notify,
    /// The writer wakes waiting readers.
    space_freed: Notify,
    bound: usize,
    max_stall: Duration,
    /// Bytes of output the log may hold; 0 for no limit.
    max_log_bytes: u64,
}

#[derive(Debug)]
struct Inner {
    chunks: VecDeque<Chunk>,
    bytes: usize,
    open_readers: usize,
    outage: bool,
    dropped: Dropped,
    dropped_total: Dropped,
    /// Bytes admitted against `max_log_bytes`.
    admitted: u64,
    truncated: Option<Truncated>,
    notice_pending: bool,
}

impl Buffer {
    /// A queue of at most `bound` bytes fed by `readers` readers, for a log of at
    /// most `max_log_bytes` (0: no limit).
    pub fn new(bound: usize, max_stall: Duration, readers: usize, max_log_bytes: u64) -> Buffer {
        Buffer {
            inner: Mutex::new(Inner {
                chunks: VecDeque::new(),
                bytes: 0,
                open_readers: readers,
                outage: false,
                dropped: Dropped::default(),
                dropped_total: Dropped::default(),
                admitted: 0,
                truncated: None,
                notice_pending: false,
            }),
            data_ready: Notify::new(),
            space_freed: Notify::new(),
            bound,
            max_stall,
            max_log_bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a chunk, waiting for room as described in the module docs. Only the
    /// whole lines that fit the log's budget are queued.
    pub async fn push(&self, mut chunk: Chunk) {
        if !self.admit(&mut chunk) {
            return;
        }
        let deadline = Instant::now() + self.max_stall;
        loop {
            let freed = self.space_freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut inner = self.lock();
                let fits = inner.bytes + chunk.text.len() <= self.bound;
                if fits || inner.outage || Instant::now() >= deadline {
                    inner.push_dropping_oldest(chunk, self.bound);
                    drop(inner);
                    self.data_ready.notify_one();
                    return;
                }
            }
            let _ = tokio::time::timeout_at(deadline, freed).await;
        }
    }

    /// Cuts `chunk` to the log's budget; false when nothing of it is to be queued.
    fn admit(&self, chunk: &mut Chunk) -> bool {
        if self.max_log_bytes == 0 {
            return true;
        }
        let mut inner = self.lock();
        if let Some(truncated) = &mut inner.truncated {
            truncated.lines += chunk.lines as u64;
            truncated.bytes += chunk.text.len() as u64;
            return false;
        }
        let room = self.max_log_bytes - inner.admitted;
        let len = chunk.text.len() as u64;
        if len <= room {
            inner.admitted += len;
            return true;
        }
        let room = usize::try_from(room).unwrap_or(usize::MAX);
        let keep = memchr::memrchr(b'\n', &chunk.text.as_bytes()[..room]).map_or(0, |i| i + 1);
        let rest = &chunk.text[keep..];
        inner.truncated = Some(Truncated {
            limit: self.max_log_bytes,
            lines: count_lines(rest) as u64,
            bytes: rest.len() as u64,
        });
        inner.notice_pending = true;
        inner.admitted += keep as u64;
        drop(inner);
        self.data_ready.notify_one();
        chunk.text.truncate(keep);
        chunk.lines = count_lines(&chunk.text);
        keep > 0
    }

    /// Whether the log's budget is spent: readers need not prepare more output.
    pub fn is_log_full(&self) -> bool {
        self.lock().truncated.is_some()
    }

    /// Counts output a reader did not queue because the log is full.
    pub fn not_stored(&self, text: &str) {
        if let Some(truncated) = &mut self.lock().truncated {
            truncated.lines += count_lines(text) as u64;
            truncated.bytes += text.len() as u64;
        }
    }

    /// What the budget kept out, if it was reached.
    pub fn truncated(&self) -> Option<Truncated> {
        self.lock().truncated
    }

    /// One reader is done (EOF, or abandoned).
    pub fn close_reader(&self) {
        self.lock().open_readers -= 1;
        self.data_ready.notify_one();
    }

    /// The writer says whether the database is unreachable.
    pub fn set_outage(&self, outage: bool) {
        self.lock().outage = outage;
        if outage {
            self.space_freed.notify_waiters();
        }
    }

    /// Waits until at least `bytes` are queued, something was dropped, every reader is
    /// done, or `deadline` passes.
    pub async fn wait_for(&self, bytes: usize, deadline: Option<Instant>) {
        loop {
            let ready = self.data_ready.notified();
            tokio::pin!(ready);
            ready.as_mut().enable();
            {
                let inner = self.lock();
                if inner.bytes >= bytes
                    || !inner.dropped.is_empty()
                    || inner.notice_pending
                    || inner.open_readers == 0
                {
                    return;
                }
            }
            match deadline {
                Some(deadline) => {
                    if tokio::time::timeout_at(deadline, ready).await.is_err() {
                        return;
                    }
                }
                None => ready.await,
            }
        }
    }

    /// Takes chunks from the front, about `max_bytes` of them (at least one).
    pub fn take(&self, max_bytes: usize) -> Taken {
        let mut inner = self.lock();
        let mut taken = Taken {
            dropped: std::mem::take(&mut inner.dropped),
            chunks: Vec::new(),
            truncated: None,
        };
        let mut bytes = 0;
        while let Some(front) = inner.chunks.front() {
            if !taken.chunks.is_empty() && bytes + front.text.len() > max_bytes {
                break;
            }
            let chunk = inner.chunks.pop_front().expect("front exists");
            bytes += chunk.text.len();
            taken.chunks.push(chunk);
        }
        inner.bytes -= bytes;
        if inner.chunks.is_empty() && std::mem::take(&mut inner.notice_pending) {
            taken.truncated = Some(self.max_log_bytes);
        }
        drop(inner);
        self.space_freed.notify_waiters();
        taken
    }

    /// Whether every reader is done and nothing is left.
    pub fn is_finished(&self) -> bool {
        let inner = self.lock();
        inner.open_readers == 0
            && inner.chunks.is_empty()
            && inner.dropped.is_empty()
            && !inner.notice_pending
    }

    /// Everything dropped so far.
    pub fn dropped_total(&self) -> Dropped {
        self.lock().dropped_total
    }
}

impl Inner {
    fn push_dropping_oldest(&mut self, chunk: Chunk, bound: usize) {
        while self.bytes + chunk.text.len() > bound {
            let Some(old) = self.chunks.pop_front() else {
                break;
            };
            self.bytes -= old.text.len();
            for dropped in [&mut self.dropped, &mut self.dropped_total] {
                dropped.lines += old.lines as u64;
                dropped.bytes += old.text.len() as u64;
            }
        }
        self.bytes += chunk.text.len();
        self.chunks.push_back(chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(text: &str) -> Chunk {
        Chunk {
            stream: Stream::Stdout,
            text: text.to_string(),
            lines: 1,
        }
    }

    #[tokio::test]
    async fn drops_the_oldest_during_an_outage_and_says_so() {
        let buffer = Buffer::new(8, Duration::from_secs(60), 1, 0);
        buffer.set_outage(true);
        for text in ["aaa\n", "bbb\n", "ccc\n"] {
            buffer.push(chunk(text)).await;
        }
        let taken = buffer.take(1024);
        assert_eq!(taken.dropped, Dropped { lines: 1, bytes: 4 });
        assert_eq!(taken.chunks, vec![chunk("bbb\n"), chunk("ccc\n")]);
        assert_eq!(buffer.dropped_total().lines, 1);
    }

    #[tokio::test]
    async fn waits_for_room_then_gives_up_after_max_stall() {
        let buffer = Buffer::new(4, Duration::from_millis(20), 1, 0);
        buffer.push(chunk("aaa\n")).await;
        buffer.push(chunk("bbb\n")).await;
        let taken = buffer.take(1024);
        assert_eq!(taken.dropped.lines, 1);
        assert_eq!(taken.chunks, vec![chunk("bbb\n")]);
    }

    #[tokio::test]
    async fn stops_at_the_log_budget_on_a_line_and_hands_over_one_notice_last() {
        let buffer = Buffer::new(1024, Duration::from_secs(60), 1, 10);
        buffer.push(chunk("aaa\n")).await;
        let mut two = chunk("bbb\nccc\n");
        two.lines = 2;
        buffer.push(two).await;
        buffer.push(chunk("ddd\n")).await;
        buffer.not_stored("eee\n");
        assert!(buffer.is_log_full());
        let taken = buffer.take(4);
        assert_eq!(taken.chunks, vec![chunk("aaa\n")]);
        assert_eq!(taken.truncated, None, "not before what fit is out");
        let taken = buffer.take(1024);
        assert_eq!(taken.chunks, vec![chunk("bbb\n")]);
        assert_eq!(taken.truncated, Some(10));
        assert_eq!(buffer.take(1024).truncated, None, "once");
        let truncated = buffer.truncated().unwrap();
        assert_eq!((truncated.lines, truncated.bytes), (3, 12));
    }
}
