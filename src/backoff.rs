//! Exponential backoff with jitter: how every retry loop of the gateway and the worker
//! waits between attempts.

use std::time::Duration;

/// Waits that double from `first` up to `max`, each stretched by a random part of up
/// to `jitter` of itself, so that many waiters do not retry in step.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    first: Duration,
    max: Duration,
    jitter: f64,
    next: Duration,
}

impl Backoff {
    /// The gateway's: 50 ms up to 2 s, up to 50 % jitter. Short, because a browser is
    /// waiting and the database is usually back within a second or two.
    pub(crate) fn gateway() -> Backoff {
        Backoff::new(Duration::from_millis(50), Duration::from_secs(2), 0.5)
    }

    /// The worker's: 100 ms up to 5 s, up to 20 % jitter. Longer, because its buffer
    /// holds the output meanwhile and one worker should not hammer a struggling server.
    pub(crate) fn worker() -> Backoff {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(5), 0.2)
    }

    pub(crate) fn new(first: Duration, max: Duration, jitter: f64) -> Backoff {
        Backoff {
            first,
            max,
            jitter,
            next: first,
        }
    }

    /// Back to the first wait, after a success.
    pub(crate) fn reset(&mut self) {
        self.next = self.first;
    }

    /// The next wait.
    pub(crate) fn next(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        base + base.mul_f64(fastrand::f64() * self.jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(300), 0.0);
        let waits: Vec<_> = (0..4).map(|_| backoff.next().as_millis()).collect();
        assert_eq!(waits, [100, 200, 300, 300]);
        backoff.reset();
        assert_eq!(backoff.next(), Duration::from_millis(100));
        let mut jittered = Backoff::gateway();
        let first = jittered.next();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(75));
    }
}
