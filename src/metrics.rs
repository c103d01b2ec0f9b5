//! The gateway's metrics, exposed on `/metrics` by `prometheus-client` in the
//! OpenMetrics text format (which Prometheus reads as it reads its own).
//!
//! Counters are atomics that the hot paths bump directly; the labelled series are
//! created once here and kept, so no path looks a label set up. What the hub knows
//! (jobs, receivers) and whether the listener is up are set when the text is rendered.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::auth::Failure;

/// Upper bounds of the latency histogram's buckets, in seconds.
const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// One label, as `prometheus-client` takes it.
type Label = [(&'static str, &'static str); 1];

/// Every metric of one gateway.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub connections: Gauge,
    pub connections_refused: Counter,
    pub accept_errors: Counter,
    pub streams_open: Gauge,
    pub streams_opened: Counter,
    pub notifications: Counter,
    /// Reads of `agent_job_events` by the hub, for live delivery.
    pub table_reads_live: Counter,
    /// Reads by a stream catching up from its cursor.
    pub table_reads_backfill: Counter,
    /// Reads of a polling page (`GET .../events`).
    pub table_reads_page: Counter,
    pub batches_encoded: Counter,
    pub jobs_created: Counter,
    pub ring_catch_ups: Counter,
    pub lag_resyncs: Counter,
    pub listener_reconnects: Counter,
    pub listener_silent: Counter,
    /// Jobs whose history went back (a failover lost what the hub had broadcast).
    pub history_resets: Counter,
    /// Resumers whose `Last-Event-ID` named an event the job no longer has there.
    pub resume_resets: Counter,
    /// Jobs a notification took over from the counter poll while its query ran.
    pub poll_takeovers: Counter,
    /// 1 while the database refuses writes (set by the LISTEN session's ping).
    pub database_read_only: Gauge,
    pub events_delivered: Counter,
    pub bytes_delivered: Counter,
    pub streams_catching_up: Gauge,
    pub counter_polls: Counter,
    pub streams_refused: Counter,
    /// Streams ended over `--max-stream-buffer`.
    pub streams_ended_buffer: Counter,
    /// Streams (and connections) closed because the socket took no bytes for
    /// `--send-timeout`.
    pub streams_ended_send_timeout: Counter,
    auth_failures: Family<Label, Counter>,
    commit_to_send: Histogram,
    hub_jobs: Gauge,
    hub_receivers: Gauge,
    listener_up: Gauge,
    subscribers_live: Gauge,
    subscribers_catching_up: Gauge,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let mut registry = Registry::default();
        // One series without labels; the handle kept shares its value with the registry.
        macro_rules! plain {
            ($name:literal, $help:literal) => {{
                let metric = Default::default();
                registry.register($name, $help, Clone::clone(&metric));
                metric
            }};
        }
        // Counters are registered without `_total`, which the exposition adds.
        let connections: Gauge = plain!("eventgate_connections", "Open HTTP connections.");
        let connections_refused: Counter = plain!(
            "eventgate_connections_refused",
            "Connections answered 503 at the connection limit."
        );
        let accept_errors: Counter = plain!(
            "eventgate_accept_errors",
            "Failed accepts, out of descriptors most often (the client was shed with 503 or closed)."
        );
        let streams_open: Gauge = plain!("eventgate_streams_open", "Open SSE streams.");
        let streams_opened: Counter = plain!("eventgate_streams_opened", "SSE streams opened.");
        let hub_receivers: Gauge = plain!(
            "eventgate_hub_receivers",
            "Broadcast receivers attached to the hub."
        );
        let subscribers = Family::<Label, Gauge>::default();
        registry.register(
            "eventgate_subscribers",
            "SSE subscribers by state.",
            subscribers.clone(),
        );
        let streams_refused: Counter = plain!(
            "eventgate_streams_refused",
            "Streams refused at the per-client limit."
        );
        let hub_jobs: Gauge = plain!("eventgate_hub_jobs", "Jobs with state in the hub.");
        let notifications: Counter = plain!(
            "eventgate_notifications",
            "Notifications received on the LISTEN connection."
        );
        let counter_polls: Counter = plain!(
            "eventgate_counter_polls",
            "Polls over the new events of every served job (the debounced-notify safety net)."
        );
        let batches_encoded: Counter = plain!(
            "eventgate_batches_encoded",
            "Batches of frames encoded once for all subscribers."
        );
        let jobs_created: Counter = plain!(
            "eventgate_hub_jobs_created",
            "Job states created in the hub."
        );
        let ring_catch_ups: Counter = plain!(
            "eventgate_ring_catch_ups",
            "Resumes served from the in-memory ring without a query."
        );
        let lag_resyncs: Counter = plain!(
            "eventgate_lag_resyncs",
            "Subscribers that fell behind the channel and resynced."
        );
        let listener_reconnects: Counter = plain!(
            "eventgate_listener_reconnects",
            "Times the LISTEN connection was re-established."
        );
        let listener_silent: Counter = plain!(
            "eventgate_listener_silent",
            "Times the LISTEN connection was dropped for not answering a ping."
        );
        let history_resets: Counter = plain!(
            "eventgate_history_resets",
            "Jobs whose history in the table went back behind what was broadcast (their streams got `reset`)."
        );
        let resume_resets: Counter = plain!(
            "eventgate_resume_resets",
            "Resuming streams whose Last-Event-ID named an event the job's history no longer has at that seq (they got `reset`)."
        );
        let poll_takeovers: Counter = plain!(
            "eventgate_poll_takeovers",
            "Jobs whose notification came while the counter poll's query covered them: read at once by their own read task, the poll's rows dropped."
        );
        let database_read_only: Gauge = plain!(
            "eventgate_database_read_only",
            "Whether the database refused writes (read-only, in recovery) at the last ping."
        );
        let listener_up: Gauge = plain!(
            "eventgate_listener_up",
            "Whether the LISTEN connection is up."
        );
        let events_delivered: Counter = plain!(
            "eventgate_events_delivered",
            "Events written to SSE streams."
        );
        let bytes_delivered: Counter =
            plain!("eventgate_bytes_delivered", "Bytes written to SSE streams.");
        let commit_to_send = Histogram::new(LATENCY_BUCKETS);
        registry.register(
            "eventgate_commit_to_send_seconds",
            "Time from an event's insert to its broadcast to subscribers.",
            commit_to_send.clone(),
        );
        let table_reads = Family::<Label, Counter>::default();
        registry.register(
            "eventgate_table_reads",
            "Reads of agent_job_events, by purpose.",
            table_reads.clone(),
        );
        let auth = Family::<Label, Counter>::default();
        // Every reason shows from the start, at 0.
        for failure in Failure::ALL {
            let _ = auth.get_or_create(&[("reason", failure.label())]);
        }
        registry.register(
            "eventgate_auth_failures",
            "Requests refused by auth, by reason.",
            auth.clone(),
        );
        let ended = Family::<Label, Counter>::default();
        registry.register(
            "eventgate_streams_ended",
            "Streams the gateway ended on a client's budget, by reason.",
            ended.clone(),
        );
        let streams_ended_buffer = ended.get_or_create(&[("reason", "buffer")]).clone();
        let streams_ended_send_timeout = ended.get_or_create(&[("reason", "send_timeout")]).clone();
        let read = |purpose| table_reads.get_or_create(&[("purpose", purpose)]).clone();
        let subscribers_catching_up = subscribers
            .get_or_create(&[("state", "catching_up")])
            .clone();
        let subscribers_live = subscribers.get_or_create(&[("state", "live")]).clone();
        Metrics {
            table_reads_live: read("live"),
            table_reads_backfill: read("backfill"),
            table_reads_page: read("page"),
            auth_failures: auth,
            subscribers_catching_up,
            subscribers_live,
            registry,
            connections,
            connections_refused,
            accept_errors,
            streams_open,
            streams_opened,
            notifications,
            batches_encoded,
            jobs_created,
            ring_catch_ups,
            lag_resyncs,
            listener_reconnects,
            listener_silent,
            history_resets,
            resume_resets,
            poll_takeovers,
            database_read_only,
            events_delivered,
            bytes_delivered,
            streams_catching_up: Gauge::default(),
            counter_polls,
            streams_refused,
            streams_ended_buffer,
            streams_ended_send_timeout,
            commit_to_send,
            hub_jobs,
            hub_receivers,
            listener_up,
        }
    }
}

impl Metrics {
    /// A request refused by auth, by reason.
    pub fn auth_failure(&self, failure: Failure) {
        self.auth_failures
            .get_or_create(&[("reason", failure.label())])
            .inc();
    }

    /// A page of events read for a polling client.
    pub fn table_read_page(&self) {
        self.table_reads_page.inc();
    }

    /// An event broadcast `us` microseconds after its insert.
    pub fn observe_commit_to_send_us(&self, us: u64) {
        self.commit_to_send.observe(us as f64 / 1e6);
    }

    /// The text exposition; `jobs` and `subscribers` are read from the hub.
    pub fn render(&self, jobs: usize, subscribers: usize, listener_up: bool) -> String {
        self.hub_jobs.set(jobs as i64);
        self.hub_receivers.set(subscribers as i64);
        self.listener_up.set(listener_up as i64);
        let catching_up = self.streams_catching_up.get();
        self.subscribers_catching_up.set(catching_up);
        self.subscribers_live
            .set((self.streams_open.get() - catching_up).max(0));
        let mut out = String::with_capacity(8192);
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, name: &str) -> Option<String> {
        text.lines().find_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            (key == name).then(|| value.to_string())
        })
    }

    #[test]
    fn every_series_is_named_as_before() {
        let metrics = Metrics::default();
        metrics.table_reads_live.inc();
        metrics.table_read_page();
        metrics.auth_failure(Failure::Scope);
        metrics.streams_open.inc();
        metrics.observe_commit_to_send_us(1500);
        let text = metrics.render(3, 4, true);
        for (name, expected) in [
            ("eventgate_connections", "0"),
            ("eventgate_streams_open", "1"),
            ("eventgate_hub_jobs", "3"),
            ("eventgate_hub_receivers", "4"),
            ("eventgate_listener_up", "1"),
            ("eventgate_database_read_only", "0"),
            ("eventgate_table_reads_total{purpose=\"live\"}", "1"),
            ("eventgate_table_reads_total{purpose=\"backfill\"}", "0"),
            ("eventgate_table_reads_total{purpose=\"page\"}", "1"),
            ("eventgate_auth_failures_total{reason=\"scope\"}", "1"),
            ("eventgate_auth_failures_total{reason=\"missing\"}", "0"),
            ("eventgate_subscribers{state=\"live\"}", "1"),
            ("eventgate_subscribers{state=\"catching_up\"}", "0"),
            ("eventgate_commit_to_send_seconds_count", "1"),
            ("eventgate_commit_to_send_seconds_bucket{le=\"0.002\"}", "1"),
            ("eventgate_commit_to_send_seconds_bucket{le=\"0.001\"}", "0"),
            ("eventgate_notifications_total", "0"),
            ("eventgate_counter_polls_total", "0"),
            ("eventgate_lag_resyncs_total", "0"),
            ("eventgate_listener_reconnects_total", "0"),
            ("eventgate_connections_refused_total", "0"),
            ("eventgate_accept_errors_total", "0"),
            ("eventgate_ring_catch_ups_total", "0"),
            ("eventgate_history_resets_total", "0"),
            ("eventgate_resume_resets_total", "0"),
            ("eventgate_poll_takeovers_total", "0"),
            ("eventgate_streams_opened_total", "0"),
            ("eventgate_batches_encoded_total", "0"),
            ("eventgate_events_delivered_total", "0"),
            ("eventgate_bytes_delivered_total", "0"),
            ("eventgate_streams_ended_total{reason=\"buffer\"}", "0"),
            (
                "eventgate_streams_ended_total{reason=\"send_timeout\"}",
                "0",
            ),
        ] {
            assert_eq!(
                value(&text, name).as_deref(),
                Some(expected),
                "{name} in\n{text}"
            );
        }
    }
}
