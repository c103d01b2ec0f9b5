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
//! Following the data, from the database to the browser:
//!
//! - [`db`]: connection settings, the pool, and the migrations of `sql/`.
//! - [`store`]: the queries: jobs, pages of events, appends.
//! - [`listen`]: the one LISTEN connection, its reconnects and catch-up sweeps.
//! - [`hub`]: per-job state: coalesced reads, a ring of recent batches, broadcast.
//! - [`sse`]: events encoded once into shared SSE frames.
//! - [`stream`]: one subscriber: backfill, hand-over to live, lag recovery, end.
//! - [`status`]: the job list's single stream of status changes.
//! - [`routes`]: HTTP routing and the JSON API; [`web`]: the embedded dashboard;
//!   [`log`]: the raw log route, streamed from the table.
//! - [`server`]: the accept loop, connection limits, background tasks and graceful shutdown;
//!   [`conn`]: one connection, event streams written without hyper's buffers.
//! - [`worker`]: `eventgate run`: a command's output as batched, redacted events.
//! - [`tail`]: `eventgate tail`, a job's log followed in a terminal over SSE.
//! - [`demo`]: `eventgate demo`, the whole thing with no set-up; [`prune`]: retention.
//! - [`cluster`]: throwaway PostgreSQL clusters (demo, tests, benchmarks).
//! - [`auth`]: HS256 tokens: who may read or write which job; [`limits`]: per-client caps.
//! - [`config`], [`metrics`], [`Error`]: what the rest shares.

pub mod auth;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod db;
pub mod demo;
mod error;
pub mod hub;
pub mod limits;
pub mod listen;
pub mod log;
pub mod metrics;
pub mod prune;
pub mod routes;
pub mod server;
pub mod sse;
pub mod status;
pub mod store;
pub mod stream;
pub mod tail;
pub mod web;
pub mod worker;

pub use config::Config;
pub use error::Error;
