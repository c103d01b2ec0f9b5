//! The HTTP/1.1 writer of event streams: the response head, then the body's frames in
//! chunked framing, written straight from the shared `Bytes` with `writev`, no buffer
//! of its own.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use hyper::body::Body as _;
use hyper::header;
use tokio::net::TcpStream;

use crate::http::Body;
use crate::stream::Backlog;

/// Frames gathered into one `writev` when a subscriber has several waiting.
const WRITE_BATCH: usize = 8;

#[derive(Clone, Copy)]
pub(super) enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// The response head as HTTP/1.1 puts it on the wire.
pub(super) fn encode_head(
    parts: &hyper::http::response::Parts,
    framing: Framing,
    keep_alive: bool,
) -> Vec<u8> {
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(parts.status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\ndate: ");
    head.extend_from_slice(httpdate::fmt_http_date(SystemTime::now()).as_bytes());
    head.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        if name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || name == header::CONNECTION
        {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::None => {}
        Framing::Length(n) => {
            head.extend_from_slice(format!("content-length: {n}\r\n").as_bytes());
        }
        Framing::Chunked => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    if !keep_alive {
        head.extend_from_slice(b"connection: close\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// Writes the response head and then the body's frames as they come, several at a
/// time when several are waiting (the head goes with whatever is ready at once), while
/// watching the socket so that a client who leaves is noticed even when no frame is
/// due. Returns whether the connection may serve another request.
///
/// # Readiness
///
/// The poll relies on tokio's readiness contract for `TcpStream`: `poll_write_ready`
/// and `poll_read_ready` report the readiness tokio last saw and register the task's
/// waker, and readiness is cleared only when an I/O call (`try_write_vectored`,
/// `try_read`) returns `WouldBlock`. So the loop may return `Pending` only after such
/// a call said `WouldBlock`, or after a `poll_*_ready` returned `Pending` (its waker
/// set); then the next edge wakes this task. A `Pending` from the body registers the
/// waker with the body (the job's broadcast). Each return of `Pending` below is one of
/// those three cases, so no wake-up is lost and no poll spins.
///
/// # Shutdown
///
/// This writer does not watch the drain itself: the body it writes ends on shutdown
/// (the hub sends every job's subscribers `Item::Shutdown`), and then this returns and
/// the connection closes. Polling a shared shutdown token here as well would take the
/// token's lock on every delivery to every subscriber.
///
/// One hand-written poll, for the cost per delivery: frames are gathered until the body
/// is pending, written at once, and the task then sleeps without polling the body again
/// (each pending poll of a broadcast receiver takes the channel's lock, shared by every
/// subscriber of the job).
///
/// # Budget
///
/// The bytes gathered and not yet written are told to the stream through `backlog`
/// (before each poll of the body and after each write), which keeps them within the
/// stream's budget (see [`crate::stream`]); a stream that ends over it is not finished
/// but dropped: this returns `Ok(false)` and the connection closes. A socket that takes
/// no byte for `send_timeout` while something is due ends the connection with
/// `TimedOut`; the timer runs only while the socket is full.
// Not an async fn, on purpose: see the comment in the body.
#[allow(clippy::manual_async_fn)]
pub(super) fn pump<'a>(
    stream: &'a TcpStream,
    head: Vec<u8>,
    body: &'a mut Body,
    framing: Framing,
    backlog: Option<&'a Backlog>,
    send_timeout: Duration,
) -> impl std::future::Future<Output = io::Result<bool>> + 'a {
    // An async block, not an async fn: its arguments are kept once (see `conn::serve`).
    async move {
        let chunked = matches!(framing, Framing::Chunked);
        let mut out = Output {
            prefix: head,
            frames: Default::default(),
            count: 0,
            last: false,
            written: 0,
        };
        let mut ended = matches!(framing, Framing::None);
        let mut reusable = true;
        // Armed when the socket is full with something due; dropped on progress.
        let mut stalled: Option<Pin<Box<tokio::time::Sleep>>> = None;
        let tell = |out: &Output| {
            if let Some(backlog) = backlog {
                backlog.set_unsent(out.unsent(chunked));
            }
        };
        std::future::poll_fn(|cx| {
            // Whether the body returned pending in this poll, its waker set.
            let mut body_waiting = false;
            loop {
                while !ended && !body_waiting && out.count < WRITE_BATCH {
                    match Pin::new(&mut *body).poll_frame(cx) {
                        Poll::Ready(Some(Ok(frame))) => {
                            if let Ok(data) = frame.into_data() {
                                if !data.is_empty() {
                                    out.frames[out.count] = data;
                                    out.count += 1;
                                    tell(&out);
                                }
                            }
                        }
                        Poll::Ready(Some(Err(never))) => match never {},
                        Poll::Ready(None) => {
                            if backlog.is_some_and(Backlog::is_over) {
                                // Over budget: what is held is dropped, not sent.
                                return Poll::Ready(Ok(false));
                            }
                            ended = true;
                            out.last = chunked;
                        }
                        Poll::Pending => body_waiting = true,
                    }
                }
                if out.is_pending() {
                    match stream.poll_write_ready(cx) {
                        Poll::Pending => {
                            let timer = stalled
                                .get_or_insert_with(|| Box::pin(tokio::time::sleep(send_timeout)));
                            if timer.as_mut().poll(cx).is_ready() {
                                return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
                            }
                            return Poll::Pending;
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Ready(Ok(())) => {}
                    }
                    let before = out.written;
                    let result = out.try_write(stream, chunked);
                    if out.written != before {
                        stalled = None;
                    }
                    match result {
                        Ok(true) => {
                            stalled = None;
                            out.clear();
                            tell(&out);
                        }
                        // Part of it, or none: try again until the socket says it is full.
                        Ok(false) => {
                            tell(&out);
                            continue;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                }
                if ended {
                    return Poll::Ready(Ok(reusable));
                }
                if !body_waiting {
                    // The batch was full: gather more.
                    continue;
                }
                match stream.poll_read_ready(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(())) => match read_stray(stream) {
                        Err(e) => return Poll::Ready(Err(e)),
                        Ok(Some(false)) => return Poll::Ready(Ok(false)),
                        // Bytes while streaming: a pipelined request. It is not answered;
                        // the connection closes after the stream instead.
                        Ok(Some(true)) => reusable = false,
                        Ok(None) => {}
                    },
                }
            }
        })
        .await
    }
}

/// What is due on the wire: a response head, then frames, then the last chunk.
struct Output {
    prefix: Vec<u8>,
    frames: [Bytes; WRITE_BATCH],
    count: usize,
    /// The last chunk of a chunked body is due.
    last: bool,
    /// Bytes of all that already written.
    written: usize,
}

impl Output {
    fn is_pending(&self) -> bool {
        !self.prefix.is_empty() || self.count > 0 || self.last
    }

    /// Bytes due and not yet written.
    fn unsent(&self, chunked: bool) -> usize {
        let framing = if chunked { 20 } else { 0 };
        let frames: usize = self.frames[..self.count]
            .iter()
            .map(|f| f.len() + framing)
            .sum();
        (self.prefix.len() + frames).saturating_sub(self.written)
    }

    fn clear(&mut self) {
        self.prefix = Vec::new();
        self.frames[..self.count].fill(Bytes::new());
        self.count = 0;
        self.last = false;
        self.written = 0;
    }

    /// One `writev` of what is left: whether all of it is written now.
    fn try_write(&mut self, stream: &TcpStream, chunked: bool) -> io::Result<bool> {
        let mut sizes = [[0u8; 18]; WRITE_BATCH];
        let mut parts: [&[u8]; 3 * WRITE_BATCH + 2] = [&[]; 3 * WRITE_BATCH + 2];
        parts[0] = &self.prefix;
        let mut n = 1;
        for (frame, size) in self.frames[..self.count].iter().zip(sizes.iter_mut()) {
            if chunked {
                parts[n] = chunk_size(frame.len(), size);
                parts[n + 2] = b"\r\n";
            }
            parts[n + 1] = frame;
            n += 3;
        }
        if self.last {
            parts[n] = LAST_CHUNK;
            n += 1;
        }
        let total: usize = parts[..n].iter().map(|p| p.len()).sum();
        let mut skip = self.written;
        let mut slices = [IoSlice::new(&[]); 3 * WRITE_BATCH + 2];
        let mut k = 0;
        for part in &parts[..n] {
            if skip >= part.len() {
                skip -= part.len();
                continue;
            }
            slices[k] = IoSlice::new(&part[skip..]);
            skip = 0;
            k += 1;
        }
        if k == 0 {
            return Ok(true);
        }
        match stream.try_write_vectored(&slices[..k])? {
            0 => Err(io::ErrorKind::WriteZero.into()),
            n => {
                self.written += n;
                Ok(self.written == total)
            }
        }
    }
}

/// Reads what a client sent while its stream is open: `Some(false)` when it closed,
/// `Some(true)` when it sent bytes, `None` when nothing was there after all.
fn read_stray(stream: &TcpStream) -> io::Result<Option<bool>> {
    let mut scratch = [0u8; 512];
    let mut sent = false;
    loop {
        match stream.try_read(&mut scratch) {
            Ok(0) => return Ok(Some(false)),
            Ok(_) => sent = true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Ok(sent.then_some(true));
            }
            Err(e) => return Err(e),
        }
    }
}

/// The end of a chunked body.
const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// `len` in hex and CRLF: a chunk's size line.
fn chunk_size(len: usize, out: &mut [u8; 18]) -> &[u8] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut n = 0;
    let mut rest = len;
    loop {
        digits[n] = HEX[rest & 0xf];
        n += 1;
        rest >>= 4;
        if rest == 0 {
            break;
        }
    }
    for (i, d) in digits[..n].iter().rev().enumerate() {
        out[i] = *d;
    }
    out[n] = b'\r';
    out[n + 1] = b'\n';
    &out[..n + 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sizes_are_hex() {
        let mut out = [0u8; 18];
        assert_eq!(chunk_size(0, &mut out), b"0\r\n");
        assert_eq!(chunk_size(255, &mut out), b"ff\r\n");
        assert_eq!(chunk_size(4096, &mut out), b"1000\r\n");
        assert_eq!(chunk_size(usize::MAX, &mut out), b"ffffffffffffffff\r\n");
    }
}
