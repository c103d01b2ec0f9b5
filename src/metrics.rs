//! Counters of the gateway, exposed on `/metrics` in the Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonic counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds of the latency histogram's buckets, in seconds.
const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A fixed-bucket histogram of seconds.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Non-cumulative counts; the last one is `+Inf`.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn observe_us(&self, us: u64) {
        let seconds = us as f64 / 1e6;
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.buckets[LATENCY_BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {}", self.count.load(Ordering::Relaxed));
    }
}

/// Every metric of one gateway.
#[derive(Debug, Default)]
pub struct Metrics {
    pub connections: Gauge,
    pub connections_refused: Counter,
    pub streams_open: Gauge,
    pub streams_opened: Counter,
    pub notifications: Counter,
    pub table_reads_live: Counter,
    pub table_reads_backfill: Counter,
    pub table_reads_page: Counter,
    pub batches_encoded: Counter,
    pub jobs_created: Counter,
    pub ring_catch_ups: Counter,
    pub lag_resyncs: Counter,
    pub listener_reconnects: Counter,
    pub events_delivered: Counter,
    pub bytes_delivered: Counter,
    pub streams_catching_up: Gauge,
    pub counter_polls: Counter,
    pub streams_refused: Counter,
    /// Indexed like `auth::Failure::ALL`.
    pub auth_failures: [Counter; 5],
    pub commit_to_send: Histogram,
}

impl Metrics {
    /// A request refused by auth, by reason.
    pub fn auth_failure(&self, failure: crate::auth::Failure) {
        self.auth_failures[failure as usize].inc();
    }

    /// A page of events read for a polling client.
    pub fn table_read_page(&self) {
        self.table_reads_page.inc();
    }

    /// The text exposition; `jobs` and `subscribers` are read from the hub.
    pub fn render(&self, jobs: usize, subscribers: usize, listener_up: bool) -> String {
        let mut out = String::with_capacity(4096);
        let family = |out: &mut String, name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {value}");
        };
        family(
            &mut out,
            "eventgate_connections",
            "gauge",
            "Open HTTP connections.",
            self.connections.get(),
        );
        family(
            &mut out,
            "eventgate_connections_refused_total",
            "counter",
            "Connections answered 503 at the connection limit.",
            self.connections_refused.get(),
        );
        family(
            &mut out,
            "eventgate_streams_open",
            "gauge",
            "Open SSE streams.",
            self.streams_open.get(),
        );
        family(
            &mut out,
            "eventgate_streams_opened_total",
            "counter",
            "SSE streams opened.",
            self.streams_opened.get(),
        );
        family(
            &mut out,
            "eventgate_hub_receivers",
            "gauge",
            "Broadcast receivers attached to the hub.",
            subscribers as u64,
        );
        let catching_up = self.streams_catching_up.get();
        let open = self.streams_open.get();
        let _ = writeln!(
            out,
            "# HELP eventgate_subscribers SSE subscribers by state.\n\
             # TYPE eventgate_subscribers gauge\n\
             eventgate_subscribers{{state=\"catching_up\"}} {catching_up}\n\
             eventgate_subscribers{{state=\"live\"}} {}",
            open.saturating_sub(catching_up)
        );
        family(
            &mut out,
            "eventgate_streams_refused_total",
            "counter",
            "Streams refused at the per-client limit.",
            self.streams_refused.get(),
        );
        let _ = writeln!(
            out,
            "# HELP eventgate_auth_failures_total Requests refused by auth, by reason.\n\
             # TYPE eventgate_auth_failures_total counter"
        );
        for failure in crate::auth::Failure::ALL {
            let _ = writeln!(
                out,
                "eventgate_auth_failures_total{{reason=\"{}\"}} {}",
                failure.label(),
                self.auth_failures[failure as usize].get()
            );
        }
        family(
            &mut out,
            "eventgate_hub_jobs",
            "gauge",
            "Jobs with state in the hub.",
            jobs as u64,
        );
        family(
            &mut out,
            "eventgate_notifications_total",
            "counter",
            "Notifications received on the LISTEN connection.",
            self.notifications.get(),
        );
        let _ = writeln!(
            &mut out,
            "# HELP eventgate_table_reads_total Reads of agent_job_events.\n\
             # TYPE eventgate_table_reads_total counter\n\
             eventgate_table_reads_total{{purpose=\"live\"}} {}\n\
             eventgate_table_reads_total{{purpose=\"backfill\"}} {}\n\
             eventgate_table_reads_total{{purpose=\"page\"}} {}",
            self.table_reads_live.get(),
            self.table_reads_backfill.get(),
            self.table_reads_page.get()
        );
        family(
            &mut out,
            "eventgate_counter_polls_total",
            "counter",
            "Polls over the new events of every served job (the debounced-notify safety net).",
            self.counter_polls.get(),
        );
        family(
            &mut out,
            "eventgate_batches_encoded_total",
            "counter",
            "Batches of frames encoded once for all subscribers.",
            self.batches_encoded.get(),
        );
        family(
            &mut out,
            "eventgate_ring_catch_ups_total",
            "counter",
            "Resumes served from the in-memory ring without a query.",
            self.ring_catch_ups.get(),
        );
        family(
            &mut out,
            "eventgate_lag_resyncs_total",
            "counter",
            "Subscribers that fell behind the channel and resynced.",
            self.lag_resyncs.get(),
        );
        family(
            &mut out,
            "eventgate_listener_reconnects_total",
            "counter",
            "Times the LISTEN connection was re-established.",
            self.listener_reconnects.get(),
        );
        family(
            &mut out,
            "eventgate_listener_up",
            "gauge",
            "Whether the LISTEN connection is up.",
            listener_up as u64,
        );
        self.commit_to_send.render(
            &mut out,
            "eventgate_commit_to_send_seconds",
            "Time from an event's insert to its broadcast to subscribers.",
        );
        family(
            &mut out,
            "eventgate_events_delivered_total",
            "counter",
            "Events written to SSE streams.",
            self.events_delivered.get(),
        );
        family(
            &mut out,
            "eventgate_bytes_delivered_total",
            "counter",
            "Bytes written to SSE streams.",
            self.bytes_delivered.get(),
        );
        out
    }
}
