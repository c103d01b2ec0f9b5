//! One client connection: HTTP/1.1 event streams are written straight to the socket,
//! everything else is served by hyper.
//!
//! An idle event stream is the gateway's most numerous object, and hyper keeps two
//! buffers of 8 KiB for every HTTP/1.1 connection (the read buffer and the head write
//! buffer), which it cannot be told to shrink. So when a connection's first request is
//! a plain `GET` of an event stream, this module answers it itself: the request head is
//! peeked and parsed with `httparse` (hyper's own parser), routed by the same
//! [`http::handle`], and the response written with chunked framing straight from the
//! body's frames, which are `Bytes` encoded once per batch and shared by every
//! subscriber. Nothing is copied and no buffer is kept: an idle stream costs its task,
//! its socket and its subscriber.
//!
//! Everything else goes to hyper with the socket untouched: other routes, HTTP/1.0,
//! h2c, heads over [`PEEK_LIMIT`], requests with a body, `Expect` or `Upgrade`, and
//! pipelined requests. A connection kept alive after a stream ends is handed to hyper
//! for its next requests. The stream's bytes are written by [`writer`], whose docs
//! hold its readiness contract.
//!
//! With TLS ([`crate::tls`]) the handshake comes first, under the same deadline as a
//! first head, and nothing is allocated for it until the client sends its first byte
//! (a client that connects and says nothing costs its task and socket, then is let
//! go). ALPN picks the protocol: `h2` is served by hyper's HTTP/2, everything else by
//! hyper's HTTP/1.1; the lean writer above is for plain sockets only.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::body::Body as _;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper::{Method, Request, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::Interest;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::http::{self, ApiError, App, Route};
use crate::stream::Backlog;

mod deadline;
mod writer;
use writer::{encode_head, pump, Framing};

/// What every connection shares.
pub struct Shared {
    pub(crate) app: Arc<App>,
    pub(crate) http1: http1::Builder,
    pub(crate) http2: http2::Builder<TokioExecutor>,
    /// How long a client may take to send its first request head (and, with TLS, to
    /// finish its handshake).
    pub(crate) header_timeout: Duration,
    /// How long a socket may take no bytes of a response (`--send-timeout`).
    pub(crate) send_timeout: Duration,
    /// HTTPS, when `--tls-cert` is set.
    pub(crate) tls: Option<Arc<crate::tls::Tls>>,
}

/// The most of a request head that is peeked at; longer heads go to hyper.
pub const PEEK_LIMIT: usize = 4096;

/// Headers parsed before giving the request to hyper (which takes up to 100).
const MAX_HEADERS: usize = 32;

/// The connection preface of HTTP/2 with prior knowledge (h2c).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves one connection until it closes or, once `drain` is cancelled, until its
/// current response is done.
// Not an async fn, on purpose: see the comment in the body.
#[allow(clippy::manual_async_fn)]
pub fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    drain: CancellationToken,
) -> impl std::future::Future<Output = ()> + Send {
    // A plain fn around an async block: an async fn keeps its arguments twice in its
    // state (as arguments and as locals), and this state lives as long as the
    // connection ([`tests::a_connection_future_stays_small`]).
    async move {
        if let Some(tls) = shared.tls.clone() {
            // Boxed: the handshake's state (rustls) is ~2.8 KiB, and inline it would be
            // part of every plain connection's task too (docs/performance.md).
            return Box::pin(serve_tls(stream, peer, &shared, drain, &tls)).await;
        }
        // A client that sends nothing is cut off like one that sends headers slowly.
        let first = tokio::time::timeout(shared.header_timeout, sniff(&stream)).await;
        // The hyper paths are boxed: their state is large, and inline it would be part of
        // every connection's task, event streams included.
        let result = match first {
            Ok(Ok(First::Http2)) => Box::pin(serve_hyper(stream, peer, &shared, drain, true)).await,
            Ok(Ok(First::Http1)) => {
                Box::pin(serve_hyper(stream, peer, &shared, drain, false)).await
            }
            Ok(Ok(First::Stream(head))) => {
                match serve_stream(stream, peer, &shared, head, &drain).await {
                    Ok(Some(stream)) => {
                        Box::pin(serve_hyper(stream, peer, &shared, drain, false)).await
                    }
                    Ok(None) => Ok(()),
                    Err(e) => Err(e.into()),
                }
            }
            Ok(Err(_)) | Err(_) => Ok(()),
        };
        if let Err(e) = result {
            tracing::debug!(client = %peer, error = %e, "connection ended with an error");
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Serves one HTTPS connection: the handshake, then hyper with the protocol ALPN chose.
async fn serve_tls(
    stream: TcpStream,
    peer: SocketAddr,
    shared: &Shared,
    drain: CancellationToken,
    tls: &crate::tls::Tls,
) {
    let acceptor = tls.acceptor();
    let deadline = tokio::time::Instant::now() + shared.header_timeout;
    let handshake = async move {
        // No TLS state until the client speaks.
        stream.readable().await?;
        acceptor.accept(stream).await
    };
    let mut stream = match tokio::time::timeout_at(deadline, handshake).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::debug!(client = %peer, error = %e, "tls handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(client = %peer, "tls handshake not finished in time");
            return;
        }
    };
    // A client that finishes its handshake and then says nothing is let go at the same
    // deadline: hyper's HTTP/2 would wait for its preface forever. (Browsers open such
    // connections speculatively, and one stays idle next to the one they use.) What
    // came with the handshake's last flight is already decrypted, or still on the
    // socket.
    let (tcp, session) = stream.get_mut();
    let decrypted = session
        .process_new_packets()
        .is_ok_and(|state| state.plaintext_bytes_to_read() > 0);
    if !decrypted
        && tokio::time::timeout_at(deadline, tcp.readable())
            .await
            .is_err()
    {
        tracing::debug!(client = %peer, "nothing sent after the tls handshake; closing");
        return;
    }
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    let result = Box::pin(serve_hyper_io(stream, peer, shared, drain, h2, true)).await;
    if let Err(e) = result {
        tracing::debug!(client = %peer, error = %e, "connection ended with an error");
    }
}

async fn serve_hyper(
    stream: TcpStream,
    peer: SocketAddr,
    shared: &Shared,
    drain: CancellationToken,
    h2: bool,
) -> Result<(), BoxError> {
    serve_hyper_io(stream, peer, shared, drain, h2, false).await
}

/// Serves a connection with hyper: HTTP/2 when `h2`, else HTTP/1.1. `encrypted`: the
/// connection is HTTPS, which the handlers can see ([`crate::proxy::Encrypted`]).
async fn serve_hyper_io<I>(
    stream: I,
    peer: SocketAddr,
    shared: &Shared,
    drain: CancellationToken,
    h2: bool,
    encrypted: bool,
) -> Result<(), BoxError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let app = shared.app.clone();
    let fired = app.metrics().streams_ended_send_timeout.clone();
    let service = service_fn(move |mut req: Request<hyper::body::Incoming>| {
        if encrypted {
            req.extensions_mut().insert(crate::proxy::Encrypted);
        }
        http::handle(app.clone(), req, peer)
    });
    let io = TokioIo::new(deadline::SendDeadline::new(
        stream,
        shared.send_timeout,
        fired,
    ));
    if h2 {
        drive(shared.http2.serve_connection(io, service), drain).await?;
    } else {
        drive(shared.http1.serve_connection(io, service), drain).await?;
    }
    Ok(())
}

/// Runs a hyper connection, shutting it down gracefully (finish the response in
/// flight, then close) once `drain` is cancelled.
async fn drive<C: GracefulConnection>(conn: C, drain: CancellationToken) -> Result<(), C::Error> {
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => return result,
        _ = drain.cancelled() => {}
    }
    conn.as_mut().graceful_shutdown();
    conn.await
}

/// Answers a connection over the limit with 503 and closes it.
pub(crate) async fn refuse(stream: TcpStream, retry_ms: u64) {
    let retry = retry_ms.div_ceil(1000).max(1);
    let service = service_fn(move |_req| async move {
        let mut res = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_connections",
            "the gateway is at its connection limit, retry later",
        )
        .response(Some(retry));
        res.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        Ok::<_, std::convert::Infallible>(res)
    });
    let conn = http1::Builder::new()
        .keep_alive(false)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(5))
        .serve_connection(TokioIo::new(stream), service);
    let _ = conn.await;
}

/// What the first bytes of a connection say about it.
enum First {
    Http2,
    Http1,
    /// An event-stream request this module serves, its head still unread.
    Stream(Box<Head>),
}

struct Head {
    /// Length of the head on the wire.
    len: usize,
    request: Request<Empty<Bytes>>,
    keep_alive: bool,
}

/// Peeks at the first request, leaving the socket untouched for hyper.
async fn sniff(stream: &TcpStream) -> io::Result<First> {
    let mut buf = vec![0u8; PEEK_LIMIT];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            // Closed before a request: hyper sees the end and returns.
            return Ok(First::Http1);
        }
        if let Some(first) = classify(&buf[..n], n == buf.len()) {
            return Ok(first);
        }
        // Part of a head so far. The bytes sit unread, so the socket stays readable and
        // another peek would return at once: clear tokio's readiness (a `WouldBlock`
        // from `try_io` does) and sleep until the next readiness edge, which is new
        // bytes or the peer's FIN. Nothing runs meanwhile: a partial head costs no CPU.
        let _ = stream.try_io(Interest::READABLE, || {
            Err::<(), _>(io::ErrorKind::WouldBlock.into())
        });
        // Bytes that arrived between the peek and the clearing raised no new edge of
        // their own: look once more, without waiting.
        if peek_now(stream, &mut buf)? > n {
            continue;
        }
        let ready = stream.ready(Interest::READABLE).await?;
        if ready.is_read_closed() {
            // Gone before finishing its head: nothing to answer.
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// Peeks without waiting and without touching tokio's readiness: how many bytes are
/// buffered now (0 also when none are).
fn peek_now(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: recv writes at most `buf.len()` bytes into `buf`, which we own.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        n if n >= 0 => Ok(n as usize),
        _ => match io::Error::last_os_error() {
            e if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            e => Err(e),
        },
    }
}

/// Decides from the bytes received so far, or `None` to wait for more. `full`: no
/// more bytes can be peeked.
fn classify(bytes: &[u8], full: bool) -> Option<First> {
    if bytes.starts_with(H2_PREFACE) {
        return Some(First::Http2);
    }
    if H2_PREFACE.starts_with(bytes) {
        return None;
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => Some(
            stream_head(&req, len, bytes.len())
                .map_or(First::Http1, |h| First::Stream(Box::new(h))),
        ),
        Ok(httparse::Status::Partial) if !full => {
            // Known already not to be ours: no need to wait for the rest.
            let not_get = req.method.is_some_and(|m| m != "GET");
            let not_stream = req.path.is_some_and(|p| !is_stream_target(p));
            (not_get || not_stream).then_some(First::Http1)
        }
        _ => Some(First::Http1),
    }
}

/// The request as this module serves it, or `None` when it is hyper's.
fn stream_head(req: &httparse::Request, len: usize, available: usize) -> Option<Head> {
    if available != len || req.method != Some("GET") || req.version != Some(1) {
        return None;
    }
    let path = req.path?;
    if !is_stream_target(path) {
        return None;
    }
    let mut keep_alive = true;
    let mut builder = Request::builder()
        .method(Method::GET)
        .uri(path)
        .version(Version::HTTP_11);
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(h.value).ok()?;
        if name == header::CONTENT_LENGTH {
            if value.as_bytes().trim_ascii() != b"0" {
                return None;
            }
        } else if name == header::TRANSFER_ENCODING
            || name == header::UPGRADE
            || name == header::EXPECT
        {
            return None;
        } else if name == header::CONNECTION {
            let text = value.to_str().ok()?;
            if text
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("close"))
            {
                keep_alive = false;
            }
        }
        builder = builder.header(name, value);
    }
    let request = builder.body(Empty::new()).ok()?;
    Some(Head {
        len,
        request,
        keep_alive,
    })
}

/// Whether a request target names an event stream, as the router's table says (the
/// router decides the response either way; this only picks who writes it).
fn is_stream_target(target: &str) -> bool {
    let path = target.split('?').next().unwrap_or_default();
    Route::of(path).is_stream()
}

/// Answers an event-stream request. Returns the socket when the connection may serve
/// more requests.
// Not an async fn, on purpose: see the comment in the body.
#[allow(clippy::manual_async_fn)]
fn serve_stream<'a>(
    mut stream: TcpStream,
    peer: SocketAddr,
    shared: &'a Shared,
    head: Box<Head>,
    drain: &'a CancellationToken,
) -> impl std::future::Future<Output = io::Result<Option<TcpStream>>> + 'a {
    // An async block, not an async fn: see [`serve`].
    async move {
        // The head was only peeked: consume it.
        let mut consumed = vec![0u8; head.len];
        stream.read_exact(&mut consumed).await?;
        drop(consumed);

        // Boxed: routing is short, and its state need not stay in the stream's task.
        let response = match Box::pin(http::handle(shared.app.clone(), head.request, peer)).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
        let (parts, mut body) = response.into_parts();
        let bodyless = parts.status.is_informational()
            || parts.status == StatusCode::NO_CONTENT
            || parts.status == StatusCode::NOT_MODIFIED;
        let length = if bodyless {
            None
        } else {
            body.size_hint().exact()
        };
        let framing = match (bodyless, length) {
            (true, _) => Framing::None,
            (false, Some(n)) => Framing::Length(n),
            (false, None) => Framing::Chunked,
        };
        let keep_alive = head.keep_alive && !drain.is_cancelled();
        let wire_head = encode_head(&parts, framing, keep_alive);
        let backlog = parts.extensions.get::<Arc<Backlog>>().cloned();
        drop(parts);
        let pumped = pump(
            &stream,
            wire_head,
            &mut body,
            framing,
            backlog.as_deref(),
            shared.send_timeout,
        )
        .await;
        let reusable = match pumped {
            Ok(reusable) => reusable,
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                tracing::info!(client = %peer, "socket took nothing for the send timeout; closing");
                shared.app.metrics().streams_ended_send_timeout.inc();
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        Ok((keep_alive && reusable && !drain.is_cancelled()).then_some(stream))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(bytes: &[u8], full: bool) -> &'static str {
        match classify(bytes, full) {
            None => "wait",
            Some(First::Http1) => "hyper",
            Some(First::Http2) => "h2",
            Some(First::Stream(_)) => "stream",
        }
    }

    /// The size of the future an async fn returns, from its signature alone.
    fn future_size<A, B, C, D, F: std::future::Future>(_: fn(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// A connection's future is allocated with its task and lives as long as the
    /// connection: for an idle event stream it is most of what the stream costs. A
    /// large path inlined into it (the TLS handshake once was, 2.8 KiB) makes every
    /// stream pay for it; such paths are boxed, and the connection's layers are plain
    /// fns around async blocks (an async fn holds its arguments twice). 920 bytes in
    /// a debug build when this was written; 3,040 with the TLS path inline.
    #[test]
    fn a_connection_future_stays_small() {
        let size = future_size(serve);
        assert!(size <= 1024, "conn::serve's future is {size} bytes");
    }

    #[test]
    fn classifies_first_requests() {
        let get = b"GET /api/queue/jobs/stream HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(kind(get, false), "stream");
        assert_eq!(kind(&get[..20], false), "wait");
        assert_eq!(kind(&get[..20], true), "hyper");
        assert_eq!(kind(H2_PREFACE, false), "h2");
        assert_eq!(kind(&H2_PREFACE[..5], false), "wait");
        assert_eq!(kind(b"POST /api/queue/jobs HT", false), "hyper");
        assert_eq!(kind(b"GET /healthz HT", false), "hyper");
        assert_eq!(
            kind(b"GET /api/queue/jobs/stream HTTP/1.0\r\n\r\n", false),
            "hyper"
        );
        assert_eq!(kind(b"garbage\r\n\r\n", false), "hyper");
        let mut pipelined = get.to_vec();
        pipelined.extend_from_slice(get);
        assert_eq!(kind(&pipelined, false), "hyper");
        let with_body = b"GET /api/queue/jobs/stream HTTP/1.1\r\nContent-Length: 2\r\n\r\n";
        assert_eq!(kind(with_body, false), "hyper");
        let upgrade = b"GET /api/queue/jobs/stream HTTP/1.1\r\nUpgrade: h2c\r\n\r\n";
        assert_eq!(kind(upgrade, false), "hyper");
        let close = b"GET /api/queue/jobs/stream HTTP/1.1\r\nConnection: close\r\n\r\n";
        match classify(close, false) {
            Some(First::Stream(head)) => {
                assert!(!head.keep_alive);
                assert_eq!(head.len, close.len());
            }
            _ => panic!("not a stream"),
        }
    }
}
