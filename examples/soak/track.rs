//! What one client received, checked against the table at the end.
//!
//! A browser's stream of a job must hold every seq of the job exactly once, in order.
//! The tracker classifies each received seq as it arrives: new and in order, a
//! duplicate (seen before), or reordered (new, but below the highest seen). What is
//! never seen by the end is lost. A content hash per seq (summed) shows the frames
//! carried the table's text, not just the right numbers.

use hdrhistogram::Histogram;

/// Latencies in microseconds, two significant digits. It grows with the largest value
/// recorded, so the thousands of burst clients, which record none, cost next to nothing.
pub fn histogram() -> Histogram<u64> {
    Histogram::new(2).expect("2 significant digits are valid")
}

/// How a stream ended: `event: end` data, or a 204 at the end of a finished job.
#[derive(Debug, Clone, PartialEq)]
pub enum End {
    Frame { status: String, last_seq: i64 },
    NoContent,
}

/// One client's view of one job.
pub struct Tracker {
    /// Seqs at or below this were delivered before this tracker started (a burst
    /// client resuming with Last-Event-ID); receiving one again is a duplicate.
    floor: i64,
    /// Bit `seq - floor - 1` is set once `seq` was received.
    seen: Vec<u64>,
    /// `content_hash` of `seq` at index `seq - floor - 1` (0 until received): what a
    /// `reset` takes back out of `hash`.
    hashes: Vec<u64>,
    pub max_seq: i64,
    /// The `id:` of the last message received (`<seq>-<tag>`, or a bare seq where
    /// the client made it up): what a browser sends on reconnect.
    pub last_id: Option<String>,
    pub received: u64,
    pub duplicated: u64,
    pub reordered: u64,
    /// Frames whose data named another job, or whose `id:` and `seq` differ.
    pub corrupt: u64,
    /// `event: reset` frames (history went back; never, with synchronous replication).
    pub resets: u64,
    /// `reset` frames that came before any asynchronous failover (a failure).
    pub unexpected_resets: u64,
    /// Events a `reset` took back (held above its `lastSeq`).
    pub reset_dropped: u64,
    /// Wrapping sum of `content_hash` over the seqs received (first time only).
    pub hash: u64,
    pub end: Option<End>,
}

impl Tracker {
    /// A tracker for a client that already has everything up to `floor`.
    pub fn new(floor: i64) -> Tracker {
        Tracker {
            floor,
            seen: Vec::new(),
            hashes: Vec::new(),
            max_seq: floor,
            last_id: (floor > 0).then(|| floor.to_string()),
            received: 0,
            duplicated: 0,
            reordered: 0,
            corrupt: 0,
            resets: 0,
            unexpected_resets: 0,
            reset_dropped: 0,
            hash: 0,
            end: None,
        }
    }

    pub fn floor(&self) -> i64 {
        self.floor
    }

    /// Records one received event with its `content_hash`. Returns true if it was new.
    pub fn record(&mut self, seq: i64, hash: u64) -> bool {
        self.received += 1;
        self.last_id = Some(seq.to_string());
        if seq <= self.floor || self.is_seen(seq) {
            self.duplicated += 1;
            return false;
        }
        let bit = (seq - self.floor - 1) as usize;
        if self.seen.len() <= bit / 64 {
            self.seen.resize(bit / 64 + 1, 0);
        }
        self.seen[bit / 64] |= 1 << (bit % 64);
        if self.hashes.len() <= bit {
            self.hashes.resize(bit + 1, 0);
        }
        self.hashes[bit] = hash;
        if seq < self.max_seq {
            self.reordered += 1;
        }
        self.max_seq = self.max_seq.max(seq);
        self.hash = self.hash.wrapping_add(hash);
        true
    }

    /// `event: reset` `{"lastSeq": n}`: what this client holds is not the job's
    /// history. Like the dashboard it reloads: everything it holds is dropped and it
    /// reads again from its floor (from the start, or from `n` if the history is now
    /// shorter than what it had before it started), so the content of every seq it ends
    /// with comes from the new history. Returns how many events were dropped.
    pub fn reset(&mut self, n: i64) -> u64 {
        self.resets += 1;
        let dropped = self.received_count();
        self.seen.clear();
        self.hashes.clear();
        self.hash = 0;
        self.floor = self.floor.min(n.max(0));
        self.max_seq = self.floor;
        self.last_id = (self.floor > 0).then(|| self.floor.to_string());
        self.reset_dropped += dropped;
        dropped
    }

    /// The first seq whose content differs from `table(seq)` (its content hash), and
    /// how many differ: where a view went wrong.
    pub fn differing(&self, table: impl Fn(i64) -> Option<u64>) -> (Option<i64>, u64) {
        let mut first = None;
        let mut n = 0;
        for (bit, &hash) in self.hashes.iter().enumerate() {
            let seq = self.floor + 1 + bit as i64;
            if self.is_seen(seq) && table(seq) != Some(hash) {
                first = first.or(Some(seq));
                n += 1;
            }
        }
        (first, n)
    }

    fn received_count(&self) -> u64 {
        self.seen.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    pub fn is_seen(&self, seq: i64) -> bool {
        if seq <= self.floor {
            return true;
        }
        let bit = (seq - self.floor - 1) as usize;
        self.seen
            .get(bit / 64)
            .is_some_and(|w| w & (1 << (bit % 64)) != 0)
    }

    /// Seqs in `floor+1..=last` never received.
    pub fn lost(&self, last: i64) -> u64 {
        (self.floor + 1..=last)
            .filter(|&s| !self.is_seen(s))
            .count() as u64
    }

    /// Seqs received above `last` (events the table does not have).
    pub fn phantom(&self, last: i64) -> u64 {
        let mut n = 0;
        for (i, word) in self.seen.iter().enumerate() {
            for b in 0..64 {
                let seq = self.floor + 1 + (i * 64 + b) as i64;
                if seq > last && word & (1 << b) != 0 {
                    n += 1;
                }
            }
        }
        n
    }
}

/// FNV-1a over the seq and the message text.
pub fn content_hash(seq: i64, message: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in seq.to_le_bytes().iter().chain(message.as_bytes()) {
        h ^= u64::from(*byte);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies() {
        let mut t = Tracker::new(0);
        for s in [1, 2, 4, 3, 3, 5] {
            t.record(s, 0);
        }
        assert_eq!((t.duplicated, t.reordered, t.lost(6)), (1, 1, 1));
        assert_eq!(t.phantom(4), 1);
        let mut b = Tracker::new(10);
        b.record(10, 0);
        b.record(11, 0);
        assert_eq!((b.duplicated, b.lost(12)), (1, 1));
    }

    #[test]
    fn a_reset_reloads_from_the_floor() {
        let mut t = Tracker::new(0);
        for s in 1..=5 {
            t.record(s, content_hash(s, "old"));
        }
        assert_eq!(t.reset(3), 5);
        assert_eq!((t.max_seq, t.last_id, t.lost(3)), (0, None, 3));
        for s in 1..=6 {
            assert!(
                t.record(s, content_hash(s, "new")),
                "seq {s} is new after the reset"
            );
        }
        let want = (1..=6).map(|s| content_hash(s, "new"));
        assert_eq!(t.hash, want.fold(0u64, u64::wrapping_add));
        assert_eq!(
            (t.duplicated, t.reordered, t.resets, t.reset_dropped),
            (0, 0, 1, 5)
        );
        // Below the floor of a resuming client: it starts over from there.
        let mut b = Tracker::new(10);
        b.record(11, 7);
        assert_eq!(b.reset(8), 1);
        assert_eq!((b.floor(), b.hash, b.lost(8), b.lost(9)), (8, 0, 0, 1));
    }
}
