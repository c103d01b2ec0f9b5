//! `eventgate tail <job-id>`: follows a job's log in a terminal over SSE.
//!
//! It starts at the log's tail (the last `--lines` lines, read with the polling API's
//! `beforeSeq`) or at its start (`--from-start`), then reads the job's event stream.
//! Every event is printed once, by seq: across a dropped connection or a gateway
//! restart it reconnects with backoff and `Last-Event-ID`, and on `event: reset`
//! (history went back) it says so on stderr and goes on from the stream's new point.
//! Colours are kept when stdout is a terminal and stripped otherwise. It exits when the
//! job ends: 0 if it succeeded, 1 otherwise (like `gh run watch --exit-status`).
//!
//! The client is hyper's own HTTP/1.1 connection over a TCP socket (plain `http://`;
//! put a TLS-terminating proxy's plain side or an SSH tunnel in front of a remote
//! gateway served over HTTPS).

use std::io::Write;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::header;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;
use uuid::Uuid;

use crate::sse::{history_tag, EventId};
use crate::Error;

/// Lines printed from the tail by default.
pub const DEFAULT_LINES: usize = 10;

/// The gateway asked by default.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8080";

/// Longest wait between two reconnects.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How long one request may take to get its response head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// Flags of `eventgate tail`.
#[derive(Debug, clap::Args)]
pub struct TailArgs {
    /// The job to follow.
    pub job: Uuid,
    /// The gateway's base URL (http://host:port).
    #[arg(long, env = "EVENTGATE_URL", default_value = DEFAULT_URL)]
    pub url: String,
    /// A token with read scope for the job (see `eventgate token`).
    #[arg(long, env = "EVENTGATE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Lines of the log's tail to print first.
    #[arg(long, short = 'n', default_value_t = DEFAULT_LINES)]
    pub lines: usize,
    /// Print the whole log from its first line.
    #[arg(long, conflicts_with = "lines")]
    pub from_start: bool,
}

/// Where the gateway is.
#[derive(Debug, Clone)]
struct Target {
    /// `host:port` to connect to.
    addr: String,
    /// The `Host` header.
    host: String,
    /// A path prefix before `/api/` (a gateway under a sub-path of a proxy).
    prefix: String,
}

impl Target {
    fn parse(url: &str) -> Result<Target, Error> {
        let rest = if let Some(rest) = url.strip_prefix("http://") {
            rest
        } else if url.starts_with("https://") {
            return Err(Error::config(
                "tail speaks plain http; reach an https gateway through its proxy's plain side or a tunnel",
            ));
        } else {
            url
        };
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if authority.is_empty() {
            return Err(Error::config(format!("no host in url {url:?}")));
        }
        let addr = match authority.rsplit_once(':') {
            Some((_, port)) if !port.contains(']') => authority.to_string(),
            _ => format!("{authority}:80"),
        };
        Ok(Target {
            addr,
            host: authority.to_string(),
            prefix: path.trim_end_matches('/').to_string(),
        })
    }
}

/// One `GET` on a fresh connection; the connection lives as long as the response body.
async fn get(
    target: &Target,
    token: Option<&str>,
    path: &str,
    last_event_id: Option<&str>,
) -> std::io::Result<Response<Incoming>> {
    let stream = TcpStream::connect(&target.addr).await?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    // Owned by the response: it ends when the body is dropped or read to its end.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::get(format!("{}{path}", target.prefix))
        .header(header::HOST, &target.host)
        .header(header::USER_AGENT, "eventgate-tail");
    if let Some(token) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    if let Some(id) = last_event_id {
        req = req
            .header("last-event-id", id)
            .header(header::ACCEPT, "text/event-stream");
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(std::io::Error::other)?;
    tokio::time::timeout(HEAD_TIMEOUT, sender.send_request(req))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no response"))?
        .map_err(std::io::Error::other)
}

/// Reads a whole (small, JSON) body.
async fn body_json<T: serde::de::DeserializeOwned>(res: Response<Incoming>) -> std::io::Result<T> {
    let bytes = res
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(std::io::Error::other)
}

#[derive(Deserialize)]
struct Event {
    #[serde(default)]
    id: Option<Uuid>,
    seq: i64,
    message: String,
}

#[derive(Deserialize)]
struct Page {
    items: Vec<Event>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Job {
    status: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Reset {
    last_seq: i64,
}

#[derive(Deserialize)]
struct EndData {
    status: String,
}

/// What a failed request means for the loop.
enum Failure {
    /// Try again later (the gateway is down or restarting, or the connection dropped).
    Retry(String),
    /// Give up with this message and exit status.
    Fatal(String, u8),
}

fn fatal_for(status: StatusCode, what: &str) -> Failure {
    match status {
        StatusCode::NOT_FOUND => Failure::Fatal(format!("{what}: job not found"), 1),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Failure::Fatal(
            format!("{what}: {status} (pass a token with read scope for this job: --token)"),
            2,
        ),
        StatusCode::BAD_REQUEST => Failure::Fatal(format!("{what}: {status}"), 2),
        s => Failure::Retry(format!("{what}: {s}")),
    }
}

/// The output: stdout, with escape sequences stripped unless it is a terminal.
struct Output {
    out: std::io::BufWriter<std::io::Stdout>,
    strip: bool,
}

impl Output {
    fn new() -> Output {
        // SAFETY: isatty only reads the descriptor's state.
        let tty = unsafe { libc::isatty(libc::STDOUT_FILENO) } == 1;
        Output {
            out: std::io::BufWriter::new(std::io::stdout()),
            strip: !tty,
        }
    }

    fn line(&mut self, text: &str) -> std::io::Result<()> {
        let text = match self.strip {
            true => crate::http::strip_ansi(text),
            false => std::borrow::Cow::Borrowed(text),
        };
        self.out.write_all(text.as_bytes())?;
        self.out.write_all(b"\n")
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Runs `eventgate tail`; returns the process's exit status.
pub async fn run(args: TailArgs) -> Result<u8, Error> {
    let target = Target::parse(&args.url)?;
    let mut tail = Tail {
        target,
        token: args.token,
        job: args.job,
        cursor: 0,
        cursor_id: None,
        out: Output::new(),
        backoff: MIN_BACKOFF,
        complained: false,
    };
    if !args.from_start {
        tail.start_at_tail(args.lines).await?;
    }
    tail.follow().await
}

const MIN_BACKOFF: Duration = Duration::from_millis(100);

struct Tail {
    target: Target,
    token: Option<String>,
    job: Uuid,
    /// Every event up to this seq has been printed.
    cursor: i64,
    /// The id of the event printed at `cursor`, when known: resumes name it, so that
    /// a history a failover rewrote meanwhile is told (`reset`) rather than continued.
    cursor_id: Option<Uuid>,
    out: Output,
    backoff: Duration,
    /// A retry was reported on stderr (reported once until something works again).
    complained: bool,
}

impl Tail {
    fn api(&self) -> String {
        format!("/api/queue/jobs/{}", self.job)
    }

    /// Prints the last `lines` lines and moves the cursor to the end of the table.
    async fn start_at_tail(&mut self, lines: usize) -> Result<(), Error> {
        // Lines are at least events, so this many events hold enough lines.
        let limit = lines.clamp(1, 1000);
        let path = format!("{}/events?beforeSeq={}&limit={limit}", self.api(), i64::MAX);
        let page: Page = loop {
            match self.request_json(&path, "tail").await {
                Ok(page) => break page,
                Err(Failure::Fatal(message, _)) => return Err(Error::config(message)),
                Err(Failure::Retry(message)) => self.pause(&message).await,
            }
        };
        let Some(last) = page.items.last() else {
            return Ok(());
        };
        self.cursor = last.seq;
        self.cursor_id = last.id;
        let all: Vec<&str> = page
            .items
            .iter()
            .flat_map(|e| e.message.split('\n'))
            .collect();
        for line in &all[all.len().saturating_sub(lines)..] {
            self.out.line(line)?;
        }
        self.out.flush()?;
        Ok(())
    }

    async fn request_json<T: serde::de::DeserializeOwned>(
        &mut self,
        path: &str,
        what: &str,
    ) -> Result<T, Failure> {
        let res = get(&self.target, self.token.as_deref(), path, None)
            .await
            .map_err(|e| Failure::Retry(format!("{what}: {e}")))?;
        if res.status() != StatusCode::OK {
            return Err(fatal_for(res.status(), what));
        }
        body_json(res)
            .await
            .map_err(|e| Failure::Retry(format!("{what}: {e}")))
    }

    /// Waits before the next attempt, saying once on stderr why.
    async fn pause(&mut self, why: &str) {
        if !self.complained {
            eprintln!("eventgate tail: {why}; reconnecting");
            self.complained = true;
        }
        let jitter = self.backoff.mul_f64(fastrand::f64() * 0.5);
        tokio::time::sleep(self.backoff + jitter).await;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    /// Follows the stream until the job ends; the job's exit status.
    async fn follow(&mut self) -> Result<u8, Error> {
        loop {
            match self.stream_once().await {
                Ok(Some(status)) => return Ok(exit_status(&status)),
                // The stream ended without `end` (a restart, a drop, an expired stream
                // budget): resume from the cursor.
                Ok(None) => self.pause("the stream ended").await,
                Err(Failure::Retry(message)) => self.pause(&message).await,
                Err(Failure::Fatal(message, code)) => {
                    eprintln!("eventgate tail: {message}");
                    return Ok(code);
                }
            }
        }
    }

    /// One connection to the event stream. `Some(status)` when the job ended.
    async fn stream_once(&mut self) -> Result<Option<String>, Failure> {
        let path = format!("{}/events/stream", self.api());
        let id = EventId {
            seq: self.cursor,
            tag: self.cursor_id.map(history_tag),
        };
        let res = get(
            &self.target,
            self.token.as_deref(),
            &path,
            Some(&id.to_string()),
        )
        .await
        .map_err(|e| Failure::Retry(format!("stream: {e}")))?;
        match res.status() {
            StatusCode::OK => {}
            // Finished, and the cursor is at its end.
            StatusCode::NO_CONTENT => return self.final_status().await.map(Some),
            s => return Err(fatal_for(s, "stream")),
        }
        if self.complained {
            eprintln!("eventgate tail: reconnected");
            self.complained = false;
        }
        self.backoff = MIN_BACKOFF;
        let mut body = res.into_body();
        let mut parser = Parser::default();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| Failure::Retry(format!("stream: {e}")))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            parser.push(&data);
            while let Some(message) = parser.next_message() {
                if let Some(status) = self
                    .handle(message)
                    .map_err(|e| Failure::Fatal(format!("cannot write the output: {e}"), 1))?
                {
                    self.out.flush().ok();
                    return Ok(Some(status));
                }
            }
            self.out
                .flush()
                .map_err(|e| Failure::Fatal(format!("cannot write the output: {e}"), 1))?;
        }
        Ok(None)
    }

    /// Acts on one SSE message; `Some(status)` on `end`.
    fn handle(&mut self, message: Message) -> std::io::Result<Option<String>> {
        match message.event.as_str() {
            "queue_event" => {
                let Ok(event) = serde_json::from_str::<Event>(&message.data) else {
                    return Ok(None);
                };
                // Exactly once: a resumed stream starts after the cursor anyway, and
                // this check keeps it so whatever the server does.
                if event.seq > self.cursor {
                    self.cursor = event.seq;
                    self.cursor_id = event.id;
                    for line in event.message.split('\n') {
                        self.out.line(line)?;
                    }
                }
            }
            "reset" => {
                if let Ok(reset) = serde_json::from_str::<Reset>(&message.data) {
                    self.out.flush()?;
                    eprintln!(
                        "eventgate tail: the job's history went back to event {} (a failover lost events); going on from there",
                        reset.last_seq
                    );
                    self.cursor = reset.last_seq;
                    self.cursor_id = None;
                }
            }
            "end" => {
                let status = serde_json::from_str::<EndData>(&message.data)
                    .map(|e| e.status)
                    .unwrap_or_default();
                return Ok(Some(status));
            }
            _ => {}
        }
        Ok(None)
    }

    async fn final_status(&mut self) -> Result<String, Failure> {
        let job: Job = self.request_json(&self.api(), "job").await?;
        Ok(job.status)
    }
}

fn exit_status(status: &str) -> u8 {
    match status {
        "succeeded" => 0,
        _ => 1,
    }
}

/// One SSE message: its `event:` (default `message`) and its `data:` lines joined.
#[derive(Debug, Default, PartialEq, Eq)]
struct Message {
    event: String,
    data: String,
}

/// An incremental SSE parser (the WHATWG event-stream rules, without `id:`'s
/// bookkeeping: the event's seq is in its data).
#[derive(Default)]
struct Parser {
    buf: BytesMut,
    event: Option<String>,
    data: Option<String>,
}

impl Parser {
    fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message, if the buffer holds one.
    fn next_message(&mut self) -> Option<Message> {
        loop {
            let end = self.buf.iter().position(|&b| b == b'\n' || b == b'\r')?;
            // A lone `\r` at the buffer's end may be the first half of `\r\n`.
            if self.buf[end] == b'\r' && end + 1 == self.buf.len() {
                return None;
            }
            let line = String::from_utf8_lossy(&self.buf[..end]).into_owned();
            let skip = match (self.buf[end], self.buf.get(end + 1)) {
                (b'\r', Some(b'\n')) => 2,
                _ => 1,
            };
            self.buf.advance(end + skip);
            if line.is_empty() {
                let data = self.data.take();
                let event = self.event.take();
                if let Some(data) = data {
                    return Some(Message {
                        event: event.unwrap_or_else(|| "message".into()),
                        data,
                    });
                }
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f.to_string(), v.strip_prefix(' ').unwrap_or(v).to_string()),
                None => (line, String::new()),
            };
            match field.as_str() {
                "event" => self.event = Some(value),
                "data" => match &mut self.data {
                    Some(data) => {
                        data.push('\n');
                        data.push_str(&value);
                    }
                    None => self.data = Some(value),
                },
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sse_across_reads() {
        let mut p = Parser::default();
        p.push(b"retry: 2000\n\nid: 1\nevent: queue_event\ndata: {\"a\"");
        assert_eq!(p.next_message(), None);
        p.push(b":1}\r");
        assert_eq!(p.next_message(), None);
        p.push(b"\n\r\n: keep-alive\n\nevent: end\ndata: x\ndata: y\n\n");
        assert_eq!(
            p.next_message(),
            Some(Message {
                event: "queue_event".into(),
                data: "{\"a\":1}".into()
            })
        );
        assert_eq!(
            p.next_message(),
            Some(Message {
                event: "end".into(),
                data: "x\ny".into()
            })
        );
        assert_eq!(p.next_message(), None);
    }

    #[test]
    fn parses_urls() {
        let t = Target::parse("http://127.0.0.1:9000/").unwrap();
        assert_eq!((t.addr.as_str(), t.prefix.as_str()), ("127.0.0.1:9000", ""));
        let t = Target::parse("http://logs.example/gate").unwrap();
        assert_eq!(
            (t.addr.as_str(), t.host.as_str()),
            ("logs.example:80", "logs.example")
        );
        assert_eq!(t.prefix, "/gate");
        assert!(Target::parse("https://x").is_err());
        assert!(Target::parse("http://").is_err());
    }
}
