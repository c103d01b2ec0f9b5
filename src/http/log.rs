//! `GET /api/queue/jobs/{id}/log`: a job's whole log as plain text, for `curl`, a
//! download button and `grep`.
//!
//! The body is every event's message in seq order, each followed by `\n`, read from
//! the table a page at a time (bounded in rows and in bytes), so a log of any size costs
//! the gateway one page of memory. It is compressed with zstd, brotli or gzip when the
//! request's `Accept-Encoding` allows. `?follow=1` keeps the response open after the
//! last page and appends new events until the job ends (`curl -N` is a `tail -f`):
//! it subscribes to the job in the [`Hub`] like an event stream does, and each batch the
//! hub broadcasts is only a wake-up to read the table from its cursor. `?ansi=strip`
//! removes terminal escape sequences. `?download=1` asks the browser to save it.

use std::borrow::Cow;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use async_compression::tokio::write::{BrotliEncoder, GzipEncoder, ZstdEncoder};
use bytes::Bytes;
use deadpool_postgres::Pool;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use tokio::io::AsyncWriteExt;
use tokio::sync::broadcast::error::RecvError;
use uuid::Uuid;

use super::{cache, ApiError, App, Body};
use crate::auth::Grant;
use crate::backoff::Backoff;
use crate::hub::{Hub, Item, Start, Subscription};
use crate::limits::Slot;
use crate::store;

/// Most events read by one query.
pub const PAGE_ROWS: i64 = 1000;

/// Most bytes of messages read by one query (a page holds at least one event, so a
/// page is at most this plus one message).
pub const PAGE_BYTES: i64 = 1 << 20;

/// How long a following response waits for a wake-up before reading anyway (a wake
/// lost to a LISTEN reconnect costs at most this).
const FOLLOW_RECHECK: Duration = Duration::from_secs(5);

/// What the query string asked for.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    pub follow: bool,
    pub strip_ansi: bool,
    pub download: bool,
}

impl Options {
    /// Reads `follow`, `ansi` and `download` from a query string; other keys are ignored.
    pub fn parse(query: Option<&str>) -> Result<Options, ApiError> {
        let mut options = Options::default();
        for pair in query.unwrap_or("").split('&').filter(|kv| !kv.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let flag = || match value {
                "" | "1" | "true" | "yes" => Ok(true),
                "0" | "false" | "no" => Ok(false),
                _ => Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_parameter",
                    format!("{key} must be 0 or 1"),
                )),
            };
            match key {
                "follow" => options.follow = flag()?,
                "download" => options.download = flag()?,
                "ansi" => {
                    options.strip_ansi = match value {
                        "strip" => true,
                        "keep" | "" => false,
                        _ => {
                            return Err(ApiError::new(
                                StatusCode::BAD_REQUEST,
                                "invalid_parameter",
                                "ansi must be strip or keep",
                            ))
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(options)
    }
}

/// A content coding of the response body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Identity,
    Gzip,
    Brotli,
    Zstd,
}

impl Coding {
    /// The best coding an `Accept-Encoding` header allows: the highest q-value, ties
    /// going to zstd, then brotli, then gzip; identity when none is acceptable.
    pub fn negotiate(accept: Option<&str>) -> Coding {
        let Some(accept) = accept else {
            return Coding::Identity;
        };
        let mut best = (Coding::Identity, 0.0_f32, 0);
        let mut star: Option<f32> = None;
        let mut named = Vec::new();
        for item in accept.split(',') {
            let mut parts = item.split(';');
            let name = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.trim().strip_prefix("q="))
                .find_map(|v| v.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            match name.as_str() {
                "*" => star = Some(q),
                _ => named.push((name, q)),
            }
        }
        for (coding, name, rank) in [
            (Coding::Zstd, "zstd", 3),
            (Coding::Brotli, "br", 2),
            (Coding::Gzip, "gzip", 1),
        ] {
            let q = named
                .iter()
                .find(|(n, _)| n == name || (name == "gzip" && n == "x-gzip"))
                .map(|&(_, q)| q)
                .or(star)
                .unwrap_or(0.0);
            if q > 0.0 && (q > best.1 || (q == best.1 && rank > best.2)) {
                best = (coding, q, rank);
            }
        }
        best.0
    }

    /// The `Content-Encoding` of this coding (`None` for identity).
    pub(super) fn header(self) -> Option<&'static str> {
        match self {
            Coding::Identity => None,
            Coding::Gzip => Some("gzip"),
            Coding::Brotli => Some("br"),
            Coding::Zstd => Some("zstd"),
        }
    }
}

/// `bytes` compressed whole with `coding` (a response body that is all in memory).
pub(super) async fn compress(coding: Coding, bytes: Vec<u8>) -> Bytes {
    let mut encoder = Encoder::new(coding);
    let head = encoder.push(bytes, false).await;
    let tail = encoder.finish().await;
    if tail.is_empty() {
        return head;
    }
    let mut whole = Vec::with_capacity(head.len() + tail.len());
    whole.extend_from_slice(&head);
    whole.extend_from_slice(&tail);
    Bytes::from(whole)
}

/// A streaming compressor writing into memory: text goes in, whatever compressed
/// bytes are ready come out. Boxed: a brotli state is several KiB.
enum Encoder {
    Identity,
    Gzip(Box<GzipEncoder<Vec<u8>>>),
    Brotli(Box<BrotliEncoder<Vec<u8>>>),
    Zstd(Box<ZstdEncoder<Vec<u8>>>),
}

/// Writes into a `Vec` cannot fail; the encoders' errors come only from their sink.
const MEMORY: &str = "compressing into memory cannot fail";

impl Encoder {
    fn new(coding: Coding) -> Encoder {
        match coding {
            Coding::Identity => Encoder::Identity,
            Coding::Gzip => Encoder::Gzip(Box::new(GzipEncoder::new(Vec::new()))),
            Coding::Brotli => Encoder::Brotli(Box::new(BrotliEncoder::new(Vec::new()))),
            Coding::Zstd => Encoder::Zstd(Box::new(ZstdEncoder::new(Vec::new()))),
        }
    }

    /// Compresses `text`; with `flush`, everything given so far can be decoded from
    /// the bytes returned so far (a sync flush), which a follower needs.
    async fn push(&mut self, text: Vec<u8>, flush: bool) -> Bytes {
        macro_rules! push {
            ($e:expr) => {{
                $e.write_all(&text).await.expect(MEMORY);
                if flush {
                    $e.flush().await.expect(MEMORY);
                }
                Bytes::from(std::mem::take($e.get_mut()))
            }};
        }
        match self {
            Encoder::Identity => Bytes::from(text),
            Encoder::Gzip(e) => push!(e),
            Encoder::Brotli(e) => push!(e),
            Encoder::Zstd(e) => push!(e),
        }
    }

    /// The end of the compressed stream (its trailer).
    async fn finish(&mut self) -> Bytes {
        macro_rules! finish {
            ($e:expr) => {{
                $e.shutdown().await.expect(MEMORY);
                Bytes::from(std::mem::take($e.get_mut()))
            }};
        }
        match self {
            Encoder::Identity => Bytes::new(),
            Encoder::Gzip(e) => finish!(e),
            Encoder::Brotli(e) => finish!(e),
            Encoder::Zstd(e) => finish!(e),
        }
    }
}

/// Answers `GET /api/queue/jobs/{id}/log` (the caller has checked read access).
pub async fn serve<B>(
    app: &App,
    id: Uuid,
    req: &Request<B>,
    peer: SocketAddr,
    grant: &Grant,
) -> Result<Response<Body>, ApiError> {
    let options = Options::parse(req.uri().query())?;
    let coding = Coding::negotiate(
        req.headers()
            .get(header::ACCEPT_ENCODING)
            .and_then(|v| v.to_str().ok()),
    );
    let mut follow = None;
    let mut etag = None;
    let auth_on = app.config.auth.is_on();
    if options.follow {
        // A following response is long-lived: it counts against the client's streams.
        let slot = app.stream_slot(peer)?;
        // Subscribe before the first read, so no wake-up falls between the two.
        match app
            .hub
            .subscribe(id, crate::sse::EventId { seq: 0, tag: None })
            .await?
        {
            Start::NotFound => return Err(not_found()),
            Start::Finished => {}
            Start::ShuttingDown => {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "shutting_down",
                    "the gateway is restarting, retry later",
                ))
            }
            Start::Live(subscription) => {
                follow = Some(Follow {
                    hub: app.hub.clone(),
                    subscription,
                    deadline: grant.expires_at(),
                    _slot: slot,
                })
            }
        }
    } else {
        let client = app.pool.get().await?;
        let Some((status, last_seq)) = store::job_cursor(&client, id).await? else {
            return Err(not_found());
        };
        // A finished job's log never changes ([`super::cache`]).
        if status.is_terminal() {
            let what = format!("log-{}", coding.header().unwrap_or("identity"));
            let tag = cache::etag(id, last_seq, &what, req.uri().query());
            if cache::not_modified(req, &tag) {
                return Ok(cache::unchanged(&tag, auth_on, Some("Accept-Encoding")));
            }
            etag = Some(tag);
        }
    }
    let reader = Reader {
        pool: app.pool.clone(),
        job: id,
        after: 0,
        strip_ansi: options.strip_ansi,
        encoder: Encoder::new(coding),
        unflushed: false,
        follow,
        done: false,
    };
    let frames = futures::stream::unfold(reader, |mut reader| async move {
        let chunk = reader.next_chunk().await?;
        Some((Ok::<_, Infallible>(Frame::data(chunk)), reader))
    });
    let mut res = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-cache, no-transform")
        .header(header::VARY, "Accept-Encoding")
        .header("x-content-type-options", "nosniff")
        .header("x-accel-buffering", "no");
    if let Some(name) = coding.header() {
        res = res.header(header::CONTENT_ENCODING, name);
    }
    if options.download {
        let value = format!("attachment; filename=\"job-{id}.log\"");
        res = res.header(
            header::CONTENT_DISPOSITION,
            HeaderValue::from_str(&value).expect("a uuid is a valid header value"),
        );
    }
    let mut res = res
        .body(StreamBody::new(frames).boxed_unsync())
        .expect("constant headers won't error");
    if let Some(etag) = &etag {
        cache::mark(res.headers_mut(), etag, auth_on);
        // Not a live response: a proxy may buffer it (nginx caches only what it buffers).
        res.headers_mut().remove("x-accel-buffering");
    }
    Ok(res)
}

fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "job_not_found", "job not found")
}

/// A following response's hold on the job.
struct Follow {
    hub: Hub,
    subscription: Subscription,
    /// When the token expires (the response ends then).
    deadline: Option<SystemTime>,
    _slot: Slot,
}

/// The state of one response body.
struct Reader {
    pool: Pool,
    job: Uuid,
    /// Every event up to this seq has been written.
    after: i64,
    strip_ansi: bool,
    encoder: Encoder,
    /// Text went into the encoder since its last flush.
    unflushed: bool,
    follow: Option<Follow>,
    done: bool,
}

impl Reader {
    /// The next piece of the body; `None` at its end.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        loop {
            if self.done {
                return None;
            }
            let page = self.page().await;
            let Some(page) = page else {
                // The gateway is shutting down.
                self.done = true;
                return Some(self.encoder.finish().await);
            };
            if let Some(&(seq, _)) = page.last() {
                self.after = seq;
                let mut text = Vec::with_capacity(page.iter().map(|(_, m)| m.len() + 1).sum());
                for (_, message) in &page {
                    let message = match self.strip_ansi {
                        true => strip_ansi(message),
                        false => Cow::Borrowed(message.as_str()),
                    };
                    text.extend_from_slice(message.as_bytes());
                    text.push(b'\n');
                }
                // A follower sees each page as soon as it is read; a plain download
                // lets the compressor fill its blocks.
                let flush = self.follow.is_some();
                let chunk = self.encoder.push(text, flush).await;
                self.unflushed = !flush;
                if !chunk.is_empty() {
                    return Some(chunk);
                }
                continue;
            }
            // Caught up with the table.
            if self.follow.is_none() || self.finished().await {
                self.done = true;
                let chunk = self.encoder.finish().await;
                return (!chunk.is_empty()).then_some(chunk);
            }
            if self.unflushed {
                self.unflushed = false;
                let chunk = self.encoder.push(Vec::new(), true).await;
                if !chunk.is_empty() {
                    return Some(chunk);
                }
            }
            if !self.wait().await {
                self.done = true;
                let chunk = self.encoder.finish().await;
                return (!chunk.is_empty()).then_some(chunk);
            }
        }
    }

    /// The next page after the cursor, waiting out a database outage with backoff (a
    /// reader stalls rather than getting a log that ends early). `None` when the
    /// gateway is shutting down.
    async fn page(&self) -> Option<Vec<(i64, String)>> {
        let mut backoff = Backoff::gateway();
        loop {
            let result = async {
                let client = self.pool.get().await?;
                let page =
                    store::log_page(&client, self.job, self.after, PAGE_ROWS, PAGE_BYTES).await?;
                Ok::<_, crate::Error>(page)
            }
            .await;
            match result {
                Ok(page) => return Some(page),
                Err(e) => {
                    tracing::warn!(job = %self.job, error = %e, "log page read failed; retrying");
                    if self
                        .follow
                        .as_ref()
                        .is_some_and(|f| f.hub.is_shutting_down())
                    {
                        return None;
                    }
                    tokio::time::sleep(backoff.next()).await;
                }
            }
        }
    }

    /// Whether the job is over and its final event written out.
    async fn finished(&self) -> bool {
        let Some(follow) = &self.follow else {
            return true;
        };
        if let Some(end) = follow.subscription.job.end() {
            return self.after >= end.last_seq;
        }
        let cursor = async {
            let client = self.pool.get().await.ok()?;
            store::job_cursor(&client, self.job).await.ok()?
        }
        .await;
        match cursor {
            Some((status, last_seq)) => status.is_terminal() && self.after >= last_seq,
            // Deleted: nothing more will come.
            None => true,
        }
    }

    /// Waits for news of the job. `false` when the response should end: the gateway is
    /// shutting down, the token expired, or the job's state was dropped.
    async fn wait(&mut self) -> bool {
        let Some(follow) = &mut self.follow else {
            return false;
        };
        let expiry = follow.deadline.map(|at| {
            at.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
        });
        let recheck = match expiry {
            Some(left) if left.is_zero() => return false,
            Some(left) => left.min(FOLLOW_RECHECK),
            None => FOLLOW_RECHECK,
        };
        let after = self.after;
        let woke = tokio::time::timeout(recheck, async {
            loop {
                match follow.subscription.rx.recv().await {
                    Ok(Item::Batch(batch)) if batch.last_seq() > after => return true,
                    Ok(Item::Batch(_)) | Ok(Item::KeepAlive) => continue,
                    Ok(Item::Shutdown) | Err(RecvError::Closed) => return false,
                    // History went back (a failover): text already sent cannot be
                    // taken back, so the response ends and the client fetches again.
                    Ok(Item::Reset(_)) => return false,
                    // Missed some wake-ups: read the table, which has them all.
                    Err(RecvError::Lagged(_)) => return true,
                }
            }
        })
        .await;
        match woke {
            Ok(alive) => alive && !follow.hub.is_shutting_down(),
            Err(_) => !follow.hub.is_shutting_down() && !expiry.is_some_and(|l| l <= recheck),
        }
    }
}

/// Removes terminal escape sequences: CSI (`ESC [ ... final`, colours and cursor
/// moves), OSC (`ESC ] ... BEL` or `ESC \`, titles and links) and two-byte escapes.
pub fn strip_ansi(text: &str) -> Cow<'_, str> {
    if !text.contains('\u{1b}') && !text.contains('\u{9b}') {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => match chars.next() {
                Some('[') => skip_csi(&mut chars),
                Some(']') => skip_osc(&mut chars),
                // Character set selection and the like take one more character.
                Some('(' | ')' | '*' | '+' | '#' | '%') => {
                    chars.next();
                }
                Some(_) | None => {}
            },
            '\u{9b}' => skip_csi(&mut chars),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

fn skip_csi(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) {
    // Parameter and intermediate bytes, then one final byte in @..~.
    for c in chars.by_ref() {
        if ('\u{40}'..='\u{7e}').contains(&c) {
            return;
        }
        if !('\u{20}'..='\u{3f}').contains(&c) {
            return;
        }
    }
}

fn skip_osc(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) {
    while let Some(c) = chars.next() {
        match c {
            '\u{7}' => return,
            '\u{1b}' if chars.peek() == Some(&'\\') => {
                chars.next();
                return;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_escapes() {
        assert_eq!(strip_ansi("plain"), "plain");
        assert_eq!(strip_ansi("\x1b[1;31mred\x1b[0m ok"), "red ok");
        assert_eq!(strip_ansi("\x1b]8;;http://x\x07link\x1b]8;;\x1b\\"), "link");
        assert_eq!(strip_ansi("a\x1b(Bb\x1b[2Kc"), "abc");
    }

    #[test]
    fn negotiates_codings() {
        assert_eq!(Coding::negotiate(None), Coding::Identity);
        assert_eq!(Coding::negotiate(Some("gzip")), Coding::Gzip);
        assert_eq!(
            Coding::negotiate(Some("gzip, deflate, br, zstd")),
            Coding::Zstd
        );
        assert_eq!(
            Coding::negotiate(Some("br;q=1, gzip;q=0.5")),
            Coding::Brotli
        );
        assert_eq!(Coding::negotiate(Some("zstd;q=0, gzip")), Coding::Gzip);
        assert_eq!(Coding::negotiate(Some("identity")), Coding::Identity);
        assert_eq!(Coding::negotiate(Some("*;q=0")), Coding::Identity);
    }

    #[test]
    fn parses_options() {
        let o = Options::parse(Some("follow=1&ansi=strip")).unwrap();
        assert!(o.follow && o.strip_ansi && !o.download);
        assert!(Options::parse(Some("follow=maybe")).is_err());
        assert_eq!(Options::parse(None).unwrap(), Options::default());
    }
}
