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
    pub batches_encoded: Counter,
    pub jobs_created: Counter,
    pub ring_catch_ups: Counter,
    pub lag_resyncs: Counter,
    pub listener_reconnects: Counter,
    pub events_delivered: Counter,
    pub bytes_delivered: Counter,
}

impl Metrics {
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
            "eventgate_subscribers",
            "gauge",
            "Subscribers attached to the hub.",
            subscribers as u64,
        );
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
             eventgate_table_reads_total{{purpose=\"backfill\"}} {}",
            self.table_reads_live.get(),
            self.table_reads_backfill.get()
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
