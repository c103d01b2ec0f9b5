//! eventgate streams the live output of queue jobs from PostgreSQL to browsers.
//!
//! Workers insert batched log events into `agent_job_events`; a statement-level trigger
//! sends one small NOTIFY per statement per job; one gateway holds ONE LISTEN
//! connection and fans every notification out to the job's Server-Sent Events
//! subscribers through per-job broadcast channels. A reconnecting browser sends
//! `Last-Event-ID` and gets exactly what it missed, backfilled from the table.
//!
//! # Layout
//!
//! Following one event from the database to the browser, bottom to top. A module
//! imports only modules listed before it, except where noted.
//!
//! - [`model`]: the domain: `Job`, `JobStatus` (the one status list and the terminal
//!   rule), `Event`, `Level`, `End`.
//! - `error`: [`Error`], the crate's error for everything that is not an HTTP response.
//! - [`auth`]: HS256 tokens: who may read or write which job.
//! - [`config`]: settings read once and passed down (it imports `hub::Settings`, the
//!   hub's own tuning, from further down: the hub owns what its settings mean).
//! - `backoff`: the one retry schedule of the gateway and the worker.
//! - [`db`]: connection settings, the pool, and the migrations of `sql/`.
//! - [`store`]: the queries: jobs, pages of events, appends.
//! - `metrics`: the gateway's counters, exposed by `prometheus-client`.
//! - [`sse`]: events encoded once into shared SSE frames.
//! - [`hub`]: per-job state: coalesced reads, the counter poll, a ring of recent
//!   batches, broadcast; owns its tasks.
//! - `status`: the job list's single stream of status changes.
//! - `listen`: the one LISTEN connection, its reconnects and catch-up sweeps; wakes the
//!   hub and the status feed.
//! - [`proxy`]: who the client is behind a trusted reverse proxy (`--trusted-proxy`).
//! - `limits`: per-client caps (open streams per address).
//! - [`stream`]: one subscriber: backfill, hand-over to live, lag recovery, end.
//! - `http`: the HTTP edge: one route table, errors, bodies, typed queries, CORS, jobs,
//!   events, streams, the raw log (`log`) and the embedded dashboard.
//! - [`conn`]: one connection: event streams written without hyper's buffers (its
//!   `writer`), the rest by hyper.
//! - [`tls`]: HTTPS: the certificate (re-read on SIGHUP) and ALPN `h2`, `http/1.1`.
//! - [`server`]: the accept loop, connection limits, background tasks and the drain.
//! - [`worker`]: `eventgate run`: a command's output as batched, redacted events.
//! - [`tail`]: `eventgate tail`, a job's log followed in a terminal over SSE.
//! - [`prune`]: retention; [`cluster`]: throwaway PostgreSQL clusters (demo, tests,
//!   benchmarks); [`demo`]: `eventgate demo`, the whole thing with no set-up.

pub mod auth;
mod backoff;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod db;
pub mod demo;
mod error;
mod http;
pub mod hub;
mod limits;
mod listen;
mod metrics;
pub mod model;
pub mod proxy;
pub mod prune;
pub mod server;
pub mod sse;
mod status;
pub mod store;
pub mod stream;
pub mod tail;
pub mod tls;
pub mod worker;

pub use config::Config;
pub use error::Error;
pub use model::{End, Event, Job, JobStatus, Level, NewEvent};
