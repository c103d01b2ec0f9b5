//! `eventgate run`: runs a command and streams its output into a job as batched,
//! redacted events, then records how it ended.
//!
//! # Layout
//!
//! Following the bytes, from the child to the table:
//!
//! - `pipe`: one task per pipe reads, decodes, redacts and queues whole lines;
//!   `::add-mask::<value>` lines add secrets at run time.
//! - `decode`: bytes to lines as a terminal shows them (UTF-8 split across reads,
//!   invalid bytes, NUL, `\r` progress).
//! - [`redact`]: secrets (in every printed form: encoded, escaped, wrapped,
//!   coloured) and token patterns to `[REDACTED]`.
//! - `buffer`: the bounded queue between the pipes and the writer; drops the oldest
//!   output, and counts it, only when the database cannot keep up; stops at
//!   `--max-log-bytes` and hands over one notice.
//! - `batch`: chunks into events of up to `max_event_bytes`.
//! - `writer`: batches into ONE INSERT each, paced, retried exactly once; the status.
//!
//! This module holds the flags ([`RunArgs`]), the knobs ([`Settings`]), the library
//! API ([`Worker`]) and the life of the child: start, signals, exit.
//!
//! ```no_run
//! # async fn demo(url: &str, job: uuid::Uuid) -> Result<(), eventgate::Error> {
//! use eventgate::worker::Worker;
//! let outcome = Worker::builder(url, job)
//!     .create(true)
//!     .stage("test")
//!     .redact("hunter2-but-longer")
//!     .build()
//!     .run(&["cargo".into(), "test".into()])
//!     .await?;
//! std::process::exit(outcome.exit_code);
//! # }
//! ```

mod batch;
mod buffer;
mod decode;
mod pipe;
pub mod redact;
mod writer;

use std::future::Future;
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use uuid::Uuid;

pub use buffer::{Dropped, Stream, Truncated};
pub use pipe::SPLIT_MARKER;
pub use redact::{Redactor, REDACTED};

use crate::config::parse_duration;
use crate::Error;

/// How long a batch waits for more output after its first line: the first line of a
/// quiet command is in the table about this long after it was printed.
pub const DEFAULT_LINGER: Duration = Duration::from_millis(50);
/// Largest message of one event, in bytes (a longer single line is cut first).
pub const DEFAULT_MAX_EVENT_BYTES: usize = 64 * 1024;
/// Bytes of output that make a batch go at once.
pub const DEFAULT_MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;
/// Most INSERT statements (so NOTIFYs) per second for the job.
pub const DEFAULT_MAX_STATEMENTS_PER_SEC: f64 = 20.0;
/// Longest line stored as one; longer ones are cut with [`SPLIT_MARKER`].
pub const DEFAULT_MAX_LINE_BYTES: usize = 32 * 1024;
/// Most bytes of output one run stores (100 MiB, as Buildkite caps a job's log): past
/// it the command goes on and its pipes are drained, nothing more is stored, and ONE
/// `warn` event with `payload.kind = "notice"`, `payload.notice = "truncated"` and
/// `payload.maxLogBytes` says so (a viewer shows it as a banner). 0: no limit.
pub const DEFAULT_MAX_LOG_BYTES: u64 = 100 * 1024 * 1024;
/// Bound of the queue between the pipes and the database.
pub const DEFAULT_BUFFER_BYTES: usize = 16 * 1024 * 1024;
/// Longest a pipe waits for room in a full queue while the database is up before the
/// oldest output is dropped (and reported).
pub const DEFAULT_MAX_STALL: Duration = Duration::from_secs(10);
/// An unfinished line (a prompt, a progress bar) is shown after this long.
pub const DEFAULT_PARTIAL_LINE_AFTER: Duration = Duration::from_secs(3);
/// Time the command has after SIGTERM before SIGKILL, when the worker is stopped.
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(10);
/// After the command exits, how long its pipes may stay open and silent (held by a
/// background process it left) before the worker stops reading them.
pub const DEFAULT_EOF_GRACE: Duration = Duration::from_secs(5);
/// After the command exits, how long an unreachable database is retried before the
/// worker gives up on what it still holds (reported on stderr) and exits.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(300);
/// How long to retry reaching the database before the command is started.
pub const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Level of stderr events (stdout is always `info`).
pub const DEFAULT_STDERR_LEVEL: Level = Level::Info;
/// Smallest accepted `max_line_bytes` (it must leave room for the secret overlap).
const MIN_LINE_BYTES: usize = 256;
/// Longest job name made from the command line by `--create`.
const MAX_NAME_CHARS: usize = 200;

/// Exit code when the worker itself fails (bad flags, no database, unknown job).
pub const EXIT_WORKER_ERROR: i32 = 125;
/// Exit code when the command cannot be executed (as shells do).
pub const EXIT_CANNOT_EXECUTE: i32 = 126;
/// Exit code when the command is not found (as shells do).
pub const EXIT_NOT_FOUND: i32 = 127;

/// Flags of `eventgate run`. Every knob can also be set with its `EVENTGATE_*`
/// variable; unset knobs take the `DEFAULT_*` constants of this module.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The job to write to.
    #[arg(long, env = "EVENTGATE_JOB")]
    pub job: Uuid,
    /// Create the job if it does not exist.
    #[arg(long)]
    pub create: bool,
    /// `payload.stage` of every event.
    #[arg(long, env = "EVENTGATE_STAGE")]
    pub stage: Option<String>,
    /// `payload.stepId` of every event.
    #[arg(long, env = "EVENTGATE_STEP_ID")]
    pub step_id: Option<String>,
    /// `payload.stepIndex` of every event.
    #[arg(long, env = "EVENTGATE_STEP_INDEX")]
    pub step_index: Option<i64>,
    /// A value to redact (repeatable; the variable takes one value per line).
    #[arg(
        long,
        env = "EVENTGATE_REDACT",
        value_delimiter = '\n',
        hide_env_values = true
    )]
    pub redact: Vec<String>,
    /// The knobs (boxed: they would make every `Command` of the CLI as large).
    #[command(flatten)]
    pub knobs: Box<Knobs>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// The tuning flags of `eventgate run`; each unset one takes its `DEFAULT_*`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Knobs {
    /// Batch wait after the first line [default: 50ms].
    #[arg(long, env = "EVENTGATE_LINGER", value_parser = parse_duration)]
    pub linger: Option<Duration>,
    /// Largest event message in bytes [default: 65536].
    #[arg(long, env = "EVENTGATE_MAX_EVENT_BYTES")]
    pub max_event_bytes: Option<usize>,
    /// Bytes that make a batch go at once [default: 8388608].
    #[arg(long, env = "EVENTGATE_MAX_BATCH_BYTES")]
    pub max_batch_bytes: Option<usize>,
    /// Most INSERT statements per second; 0 for no cap [default: 20].
    #[arg(long, env = "EVENTGATE_MAX_STATEMENTS_PER_SEC")]
    pub max_statements_per_sec: Option<f64>,
    /// Longest line kept whole, in bytes [default: 32768].
    #[arg(long, env = "EVENTGATE_MAX_LINE_BYTES")]
    pub max_line_bytes: Option<usize>,
    /// Most bytes of output stored; past it one notice, the command goes on; 0 for
    /// no limit [default: 104857600].
    #[arg(long, env = "EVENTGATE_MAX_LOG_BYTES")]
    pub max_log_bytes: Option<u64>,
    /// Bound of the output queue in bytes [default: 16777216].
    #[arg(long, env = "EVENTGATE_BUFFER_BYTES")]
    pub buffer_bytes: Option<usize>,
    /// Longest wait for room in a full queue while the database is up [default: 10s].
    #[arg(long, env = "EVENTGATE_MAX_STALL", value_parser = parse_duration)]
    pub max_stall: Option<Duration>,
    /// Show an unfinished line after this long [default: 3s].
    #[arg(long, env = "EVENTGATE_PARTIAL_LINE_AFTER", value_parser = parse_duration)]
    pub partial_line_after: Option<Duration>,
    /// Time between SIGTERM and SIGKILL when stopped [default: 10s].
    #[arg(long, env = "EVENTGATE_KILL_GRACE", value_parser = parse_duration)]
    pub kill_grace: Option<Duration>,
    /// How long pipes left open after the exit may stay silent [default: 5s].
    #[arg(long, env = "EVENTGATE_EOF_GRACE", value_parser = parse_duration)]
    pub eof_grace: Option<Duration>,
    /// How long to retry an unreachable database after the exit [default: 5m].
    #[arg(long, env = "EVENTGATE_DRAIN_TIMEOUT", value_parser = parse_duration)]
    pub drain_timeout: Option<Duration>,
    /// How long to retry the database before starting the command [default: 30s].
    #[arg(long, env = "EVENTGATE_STARTUP_TIMEOUT", value_parser = parse_duration)]
    pub startup_timeout: Option<Duration>,
    /// Level of stderr events [default: info].
    #[arg(long, env = "EVENTGATE_STDERR_LEVEL", value_parser = parse_level)]
    pub stderr_level: Option<Level>,
    /// NOTIFY per batch: `debounced` (the database's default), `off` for bulk
    /// output (the gateway's counter poll delivers it) or `always`.
    #[arg(long, env = "EVENTGATE_NOTIFY", value_parser = ["debounced", "off", "always"])]
    pub notify: Option<String>,
}

impl RunArgs {
    /// The knobs, defaults filled in.
    pub fn settings(&self) -> Settings {
        self.knobs.settings()
    }
}

impl Knobs {
    /// The knobs, defaults filled in.
    pub fn settings(&self) -> Settings {
        let d = Settings::default();
        Settings {
            linger: self.linger.unwrap_or(d.linger),
            max_event_bytes: self.max_event_bytes.unwrap_or(d.max_event_bytes),
            max_batch_bytes: self.max_batch_bytes.unwrap_or(d.max_batch_bytes),
            max_statements_per_sec: self
                .max_statements_per_sec
                .unwrap_or(d.max_statements_per_sec),
            max_line_bytes: self.max_line_bytes.unwrap_or(d.max_line_bytes),
            max_log_bytes: self.max_log_bytes.unwrap_or(d.max_log_bytes),
            buffer_bytes: self.buffer_bytes.unwrap_or(d.buffer_bytes),
            max_stall: self.max_stall.unwrap_or(d.max_stall),
            partial_line_after: self.partial_line_after.unwrap_or(d.partial_line_after),
            kill_grace: self.kill_grace.unwrap_or(d.kill_grace),
            eof_grace: self.eof_grace.unwrap_or(d.eof_grace),
            drain_timeout: self.drain_timeout.unwrap_or(d.drain_timeout),
            startup_timeout: self.startup_timeout.unwrap_or(d.startup_timeout),
            stderr_level: self.stderr_level.unwrap_or(d.stderr_level),
            notify: self.notify.clone().filter(|m| m != "debounced"),
        }
    }
}

/// Event level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
    Error,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }
}

fn parse_level(text: &str) -> Result<Level, String> {
    match text {
        "info" => Ok(Level::Info),
        "warn" => Ok(Level::Warn),
        "error" => Ok(Level::Error),
        _ => Err(format!("invalid level {text:?} (use info, warn or error)")),
    }
}

/// The worker's knobs; see the `DEFAULT_*` constants.
#[derive(Debug, Clone)]
pub struct Settings {
    pub linger: Duration,
    pub max_event_bytes: usize,
    pub max_batch_bytes: usize,
    pub max_statements_per_sec: f64,
    pub max_line_bytes: usize,
    pub max_log_bytes: u64,
    pub buffer_bytes: usize,
    pub max_stall: Duration,
    pub partial_line_after: Duration,
    pub kill_grace: Duration,
    pub eof_grace: Duration,
    pub drain_timeout: Duration,
    pub startup_timeout: Duration,
    pub stderr_level: Level,
    /// `eventgate.notify` for the worker's session (`off`, `always`); `None` keeps the
    /// database's setting (debounced). See `sql/0002_debounced_notify.sql`.
    pub notify: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            linger: DEFAULT_LINGER,
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            max_statements_per_sec: DEFAULT_MAX_STATEMENTS_PER_SEC,
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
            max_log_bytes: DEFAULT_MAX_LOG_BYTES,
            buffer_bytes: DEFAULT_BUFFER_BYTES,
            max_stall: DEFAULT_MAX_STALL,
            partial_line_after: DEFAULT_PARTIAL_LINE_AFTER,
            kill_grace: DEFAULT_KILL_GRACE,
            eof_grace: DEFAULT_EOF_GRACE,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            startup_timeout: DEFAULT_STARTUP_TIMEOUT,
            stderr_level: DEFAULT_STDERR_LEVEL,
            notify: None,
        }
    }
}

/// Labels copied into every log event's payload.
#[derive(Debug, Clone, Default)]
pub struct Labels {
    pub stage: Option<String>,
    pub step_id: Option<String>,
    pub step_index: Option<i64>,
}

/// How a run ended, as recorded in the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Succeeded,
    Failed,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }
}

/// The result of a run.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: Status,
    /// The command's exit code, 128 + signal when a signal ended it, or 126/127 when
    /// it could not be started.
    pub exit_code: i32,
    /// The signal that ended the command, if one did.
    pub signal: Option<i32>,
    /// Lines stored (pieces of cut lines count one each).
    pub lines: u64,
    /// Rows stored, and the statements that stored them.
    pub rows: u64,
    pub statements: u64,
    /// Output dropped because the database could not keep up.
    pub dropped: Dropped,
    /// Lines not stored: refused by the database, or still held when the drain
    /// timeout gave up on an unreachable database.
    pub unstored_lines: u64,
    /// Whether the final status made it into the job.
    pub status_recorded: bool,
}

/// Builds a [`Worker`].
#[derive(Debug)]
pub struct Builder {
    database_url: String,
    job: Uuid,
    create: bool,
    labels: Labels,
    redact: Vec<String>,
    env_secrets: bool,
    settings: Settings,
}

impl Builder {
    /// Create the job if it does not exist.
    pub fn create(mut self, create: bool) -> Self {
        self.create = create;
        self
    }

    /// `payload.stage` of every event.
    pub fn stage(mut self, stage: impl Into<String>) -> Self {
        self.labels.stage = Some(stage.into());
        self
    }

    /// `payload.stepId` and `payload.stepIndex` of every event.
    pub fn step(mut self, id: Option<String>, index: Option<i64>) -> Self {
        self.labels.step_id = id;
        self.labels.step_index = index;
        self
    }

    /// A value to redact (with its encoded forms).
    pub fn redact(mut self, value: impl Into<String>) -> Self {
        self.redact.push(value.into());
        self
    }

    /// Whether to redact the values of environment variables named like secrets
    /// (on by default).
    pub fn env_secrets(mut self, on: bool) -> Self {
        self.env_secrets = on;
        self
    }

    pub fn settings(mut self, settings: Settings) -> Self {
        self.settings = settings;
        self
    }

    pub fn build(self) -> Worker {
        let mut settings = self.settings;
        settings.max_line_bytes = settings.max_line_bytes.max(MIN_LINE_BYTES);
        settings.max_event_bytes = settings.max_event_bytes.max(settings.max_line_bytes + 64);
        Worker {
            database_url: self.database_url,
            job: self.job,
            create: self.create,
            labels: self.labels,
            redact: self.redact,
            env_secrets: self.env_secrets,
            settings,
        }
    }
}

/// Runs commands into a job. Build one with [`Worker::builder`].
#[derive(Debug)]
pub struct Worker {
    database_url: String,
    job: Uuid,
    create: bool,
    labels: Labels,
    redact: Vec<String>,
    env_secrets: bool,
    settings: Settings,
}

impl Worker {
    pub fn builder(database_url: impl Into<String>, job: Uuid) -> Builder {
        Builder {
            database_url: database_url.into(),
            job,
            create: false,
            labels: Labels::default(),
            redact: Vec::new(),
            env_secrets: true,
            settings: Settings::default(),
        }
    }

    /// Runs `command` to its end.
    pub async fn run(&self, command: &[String]) -> Result<Outcome, Error> {
        self.run_until(command, std::future::pending()).await
    }

    /// Runs `command`; when `shutdown` completes first, stops it (SIGTERM, then
    /// SIGKILL after the grace) and records `cancelled`.
    ///
    /// Errors are the worker's own (bad URL, unknown job, database unreachable at
    /// start); whatever the command does is an [`Outcome`].
    pub async fn run_until(
        &self,
        command: &[String],
        shutdown: impl Future<Output = ()>,
    ) -> Result<Outcome, Error> {
        let Some(program) = command.first() else {
            return Err(Error::config("no command to run"));
        };
        let settings = &self.settings;
        let mut config = crate::db::config(&self.database_url)?;
        if let Some(mode) = &settings.notify {
            // A startup option of the session, kept across reconnects.
            let options = format!(
                "{} -c eventgate.notify={mode}",
                config.get_options().unwrap_or_default()
            );
            config.options(options.trim());
        }
        let redactor = Arc::new(self.redactor(&config));
        let buffer = Arc::new(buffer::Buffer::new(
            settings.buffer_bytes,
            settings.max_stall,
            2,
            settings.max_log_bytes,
        ));
        let mut sink = writer::Sink::new(config, self.job, buffer.clone());
        let give_up_at = sink.give_up_at();
        let name = job_name(&redactor, command);
        sink.start(
            self.create,
            &name,
            Instant::now() + settings.startup_timeout,
        )
        .await?;

        let mut cmd = tokio::process::Command::new(program);
        cmd.args(&command[1..])
            .stdin(Stdio::inherit())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Its own process group, so that stopping it stops what it started too; but
        // not when stdin is a terminal, where a background group could not read it.
        let own_group = !stdin_is_terminal();
        if own_group {
            cmd.as_std_mut().process_group(0);
        }
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => return self.cannot_start(sink, &redactor, program, e).await,
        };

        let progress = Arc::new(AtomicU64::new(0));
        let reader = |stream| pipe::Reader {
            stream,
            redactor: redactor.clone(),
            buffer: buffer.clone(),
            max_line: settings.max_line_bytes,
            partial_after: settings.partial_line_after,
            progress: progress.clone(),
        };
        let stdout = child.stdout.take().expect("stdout was piped");
        let stderr = child.stderr.take().expect("stderr was piped");
        let readers = vec![
            tokio::spawn(reader(Stream::Stdout).run(stdout)),
            tokio::spawn(reader(Stream::Stderr).run(stderr)),
        ];
        let writer = tokio::spawn(writer::write_loop(
            sink,
            buffer.clone(),
            settings.clone(),
            self.labels.clone(),
        ));

        tokio::pin!(shutdown);
        let (exit, cancelled) = tokio::select! {
            exit = child.wait() => (exit?, false),
            () = &mut shutdown => {
                let pid = child.id().map(|id| id as i32);
                (stop(&mut child, pid, own_group, settings.kill_grace).await?, true)
            }
        };

        let _ = give_up_at.set(Instant::now() + settings.drain_timeout);
        wait_for_readers(readers, &progress, settings.eof_grace).await;
        let (mut sink, written) = writer
            .await
            .map_err(|e| Error::config(format!("writer task failed: {e}")))?;

        let signal = exit.signal();
        let exit_code = exit.code().unwrap_or_else(|| 128 + signal.unwrap_or(0));
        let status = if cancelled {
            Status::Cancelled
        } else if exit.success() {
            Status::Succeeded
        } else {
            Status::Failed
        };
        let dropped = buffer.dropped_total();
        let mut detail = exit_detail(&exit);
        if !dropped.is_empty() {
            detail["droppedLines"] = json!(dropped.lines);
            detail["droppedBytes"] = json!(dropped.bytes);
        }
        if written.unstored_lines > 0 {
            detail["unstoredLines"] = json!(written.unstored_lines);
        }
        if let Some(truncated) = buffer.truncated() {
            detail["truncated"] = json!({
                "maxLogBytes": truncated.limit,
                "lines": truncated.lines,
                "bytes": truncated.bytes,
            });
        }
        let status_recorded = match sink.finish(status.as_str(), &detail).await {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, status = status.as_str(), "could not record the status");
                false
            }
        };
        if written.unstored_lines > 0 {
            tracing::error!(
                lines = written.unstored_lines,
                "output lines were not stored"
            );
        }
        Ok(Outcome {
            status,
            exit_code,
            signal,
            lines: written.lines,
            rows: written.rows,
            statements: written.statements,
            dropped,
            unstored_lines: written.unstored_lines,
            status_recorded,
        })
    }

    fn redactor(&self, config: &tokio_postgres::Config) -> Redactor {
        let mut secrets = self.redact.clone();
        if self.env_secrets {
            secrets.extend(Redactor::env_secrets());
        }
        if let Some(password) = config.get_password() {
            secrets.push(String::from_utf8_lossy(password).into_owned());
        }
        Redactor::new(secrets)
    }

    /// The command could not be executed: say why in the job, record `failed`.
    async fn cannot_start(
        &self,
        mut sink: writer::Sink,
        redactor: &Redactor,
        program: &str,
        e: std::io::Error,
    ) -> Result<Outcome, Error> {
        let exit_code = if e.kind() == std::io::ErrorKind::NotFound {
            EXIT_NOT_FOUND
        } else {
            EXIT_CANNOT_EXECUTE
        };
        let message = format!("eventgate: cannot run {program:?}: {e}\n");
        let mut state = redact::State::default();
        let message = redactor.redact(&message, &mut state).unwrap_or(message);
        let mut batcher = batch::Batcher::new(self.settings.max_event_bytes);
        batcher.push(&buffer::Chunk {
            stream: Stream::Stderr,
            text: message.clone(),
            lines: 1,
        });
        let rows = writer::Rows::new(batcher.take(), &self.labels, "error");
        sink.insert(&rows).await?;
        let detail = json!({"exitCode": exit_code, "error": message.trim_end()});
        sink.finish(Status::Failed.as_str(), &detail).await?;
        Ok(Outcome {
            status: Status::Failed,
            exit_code,
            signal: None,
            lines: 1,
            rows: 1,
            statements: 1,
            dropped: Dropped::default(),
            unstored_lines: 0,
            status_recorded: true,
        })
    }
}

/// SIGTERM to the command (its group), SIGKILL after `grace`; waits for its exit.
async fn stop(
    child: &mut tokio::process::Child,
    pid: Option<i32>,
    own_group: bool,
    grace: Duration,
) -> std::io::Result<ExitStatus> {
    let Some(pid) = pid else {
        // Already reaped.
        return child.wait().await;
    };
    let target = if own_group { -pid } else { pid };
    // SAFETY: kill has no memory-safety preconditions; the pid is our own child's
    // (or its group's), not yet reaped, so it cannot name another process.
    unsafe { libc::kill(target, libc::SIGTERM) };
    if let Ok(exit) = tokio::time::timeout(grace, child.wait()).await {
        return exit;
    }
    // SAFETY: as above.
    unsafe { libc::kill(target, libc::SIGKILL) };
    child.wait().await
}

/// Waits until both pipes reach EOF. A pipe held open by a process the command left
/// behind is given up once it has been silent for `eof_grace`.
async fn wait_for_readers(
    readers: Vec<JoinHandle<std::io::Result<()>>>,
    progress: &AtomicU64,
    eof_grace: Duration,
) {
    for mut reader in readers {
        let mut seen = progress.load(Ordering::Relaxed);
        let result = loop {
            match tokio::time::timeout(eof_grace, &mut reader).await {
                Ok(result) => break Some(result),
                Err(_) => {
                    let now = progress.load(Ordering::Relaxed);
                    if now == seen {
                        tracing::warn!(
                            "output pipe still open after the command exited; stopped reading it"
                        );
                        reader.abort();
                        break None;
                    }
                    seen = now;
                }
            }
        };
        match result {
            Some(Ok(Err(e))) => tracing::error!(error = %e, "reading output failed"),
            Some(Err(e)) => tracing::error!(error = %e, "reader task failed"),
            _ => {}
        }
    }
}

/// `exitCode` and `signal` for the final status event.
fn exit_detail(exit: &ExitStatus) -> Value {
    match (exit.code(), exit.signal()) {
        (Some(code), _) => json!({"exitCode": code}),
        (None, Some(signal)) => json!({
            "exitCode": 128 + signal,
            "signal": signal,
            "signalName": signal_name(signal),
        }),
        (None, None) => json!({}),
    }
}

fn signal_name(signal: i32) -> String {
    let name = match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        _ => return format!("signal {signal}"),
    };
    name.to_string()
}

/// The job's name when `--create` makes it: the command line, redacted, shortened.
fn job_name(redactor: &Redactor, command: &[String]) -> String {
    let line = command.join(" ");
    let mut state = redact::State::default();
    let line = redactor.redact(&line, &mut state).unwrap_or(line);
    line.chars().take(MAX_NAME_CHARS).collect()
}

fn stdin_is_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stdin().is_terminal()
}

/// `eventgate run`: runs the worker until the command ends or SIGINT/SIGTERM, and
/// returns the exit code for the process: the command's (128 + signal if a signal
/// ended it), 128 + the signal the worker got if it was stopped, 125 for the worker's
/// own errors. A second SIGINT/SIGTERM exits at once, without recording a status.
pub async fn run_cli(database_url: &str, args: RunArgs) -> i32 {
    use tokio::signal::unix::{signal, SignalKind};
    // Registered before the command starts, so no signal finds the default action.
    let (mut interrupt, mut terminate) = match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(i), Ok(t)) => (i, t),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("eventgate run: cannot handle signals: {e}");
            return EXIT_WORKER_ERROR;
        }
    };
    let received = Arc::new(AtomicI32::new(0));
    let shutdown = {
        let received = received.clone();
        async move {
            let first = tokio::select! {
                _ = interrupt.recv() => libc::SIGINT,
                _ = terminate.recv() => libc::SIGTERM,
            };
            received.store(first, Ordering::SeqCst);
            tracing::info!(signal = first, "stopping the command");
            // Owned by the runtime: ends with the process.
            tokio::spawn(async move {
                let second = tokio::select! {
                    _ = interrupt.recv() => libc::SIGINT,
                    _ = terminate.recv() => libc::SIGTERM,
                };
                eprintln!("eventgate run: second signal, exiting without recording the status");
                std::process::exit(128 + second);
            });
        }
    };
    let settings = args.settings();
    let worker = Worker::builder(database_url, args.job)
        .create(args.create)
        .step(args.step_id, args.step_index)
        .settings(settings);
    let worker = match args.stage {
        Some(stage) => worker.stage(stage),
        None => worker,
    };
    let worker = args
        .redact
        .into_iter()
        .fold(worker, |w, value| w.redact(value))
        .build();
    match worker.run_until(&args.command, shutdown).await {
        Ok(outcome) if outcome.status == Status::Cancelled => 128 + received.load(Ordering::SeqCst),
        Ok(outcome) => outcome.exit_code,
        Err(e) => {
            eprintln!("eventgate run: {e}");
            EXIT_WORKER_ERROR
        }
    }
}
