//! A raw HTTP/1.1 + SSE client, as a browser's EventSource sees the wire.
//!
//! Unlike the tests' client (tests/common), every read here is one `read()` on the
//! socket, which is cancel-safe: a subscriber can race a read against a stall, a
//! forced reconnect or the end of the run inside `tokio::select!` without losing
//! bytes. Chunked transfer-encoding is decoded incrementally.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// How long a connect plus the response head may take.
const HEAD_TIMEOUT: Duration = Duration::from_secs(20);

/// A small receive buffer (slow readers, stall targets): the gateway feels their
/// back-pressure instead of the kernel absorbing megabytes.
const SMALL_RCVBUF: u32 = 4096;

/// One SSE message (comments and `retry:` lines are skipped).
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
}

/// What a request for a stream got.
pub enum Open {
    /// `200`: the stream.
    Stream(Body),
    /// Anything else: the status (204 at the end of a finished job, 503, 429, 404...).
    Status(u16),
}

#[derive(Debug, Clone, Copy)]
enum Chunk {
    /// Waiting for a `<hex size>\r\n` line.
    Size,
    /// Inside a chunk, this many bytes still to come.
    Data(usize),
    /// After a chunk's data, its `\r\n`.
    Crlf,
    /// The last chunk was seen.
    Done,
}

/// The body of an open stream.
pub struct Body {
    stream: TcpStream,
    /// Bytes read from the socket but not yet decoded.
    raw: Vec<u8>,
    /// Decoded body bytes not yet parsed into messages.
    text: Vec<u8>,
    chunked: bool,
    chunk: Chunk,
    read_size: usize,
    eof: bool,
}

/// Connects, sends `GET path` with `Last-Event-ID` when given, and reads the head.
pub async fn open(
    addr: SocketAddr,
    path: &str,
    last_event_id: Option<&str>,
    small_buffer: bool,
    read_size: usize,
) -> io::Result<Open> {
    let open = open_inner(addr, path, last_event_id, small_buffer, read_size);
    tokio::time::timeout(HEAD_TIMEOUT, open)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no response head"))?
}

async fn open_inner(
    addr: SocketAddr,
    path: &str,
    last_event_id: Option<&str>,
    small_buffer: bool,
    read_size: usize,
) -> io::Result<Open> {
    let socket = TcpSocket::new_v4()?;
    if small_buffer {
        socket.set_recv_buffer_size(SMALL_RCVBUF)?;
    }
    let mut stream = socket.connect(addr).await?;
    let mut head = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n"
    );
    if let Some(id) = last_event_id {
        head.push_str(&format!("Last-Event-ID: {id}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    let mut raw = Vec::with_capacity(4096);
    let head_end = loop {
        if let Some(i) = find(&raw, b"\r\n\r\n") {
            break i;
        }
        let mut buf = [0u8; 4096];
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    raw.drain(..head_end + 4);
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other("bad status line"))?;
    if status != 200 {
        return Ok(Open::Status(status));
    }
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let mut body = Body {
        stream,
        raw,
        text: Vec::new(),
        chunked,
        chunk: Chunk::Size,
        read_size,
        eof: false,
    };
    body.decode();
    Ok(Open::Stream(body))
}

impl Body {
    /// Reads once from the socket. Cancel-safe. Returns false at the end of the body.
    pub async fn fill(&mut self) -> io::Result<bool> {
        if self.is_done() {
            return Ok(false);
        }
        let mut buf = vec![0u8; self.read_size];
        let n = self.stream.read(&mut buf).await?;
        if n == 0 {
            self.eof = true;
            return Ok(false);
        }
        self.raw.extend_from_slice(&buf[..n]);
        self.decode();
        Ok(!self.is_done())
    }

    fn is_done(&self) -> bool {
        self.eof || matches!(self.chunk, Chunk::Done)
    }

    /// Moves whatever complete chunked data `raw` holds into `text`.
    fn decode(&mut self) {
        if !self.chunked {
            self.text.append(&mut self.raw);
            return;
        }
        loop {
            match self.chunk {
                Chunk::Size => {
                    let Some(i) = find(&self.raw, b"\r\n") else {
                        return;
                    };
                    let line = String::from_utf8_lossy(&self.raw[..i]).into_owned();
                    self.raw.drain(..i + 2);
                    let size = line.trim().split(';').next().unwrap_or("");
                    match usize::from_str_radix(size, 16) {
                        Ok(0) => self.chunk = Chunk::Done,
                        Ok(n) => self.chunk = Chunk::Data(n),
                        Err(_) => {
                            // Garbage on the wire: treat as the end; the subscriber reconnects.
                            self.chunk = Chunk::Done;
                        }
                    }
                }
                Chunk::Data(n) => {
                    if self.raw.is_empty() {
                        return;
                    }
                    let take = n.min(self.raw.len());
                    self.text.extend(self.raw.drain(..take));
                    self.chunk = if take == n {
                        Chunk::Crlf
                    } else {
                        Chunk::Data(n - take)
                    };
                }
                Chunk::Crlf => {
                    if self.raw.len() < 2 {
                        return;
                    }
                    self.raw.drain(..2);
                    self.chunk = Chunk::Size;
                }
                Chunk::Done => return,
            }
        }
    }

    /// The next complete message received so far, if any.
    pub fn next_message(&mut self) -> Option<Message> {
        loop {
            let end = find(&self.text, b"\n\n")?;
            let block: Vec<u8> = self.text.drain(..end + 2).collect();
            let block = String::from_utf8_lossy(&block);
            let mut message = Message {
                id: None,
                event: "message".into(),
                data: String::new(),
            };
            let mut has_data = false;
            for line in block.lines() {
                if line.is_empty() || line.starts_with(':') {
                    continue;
                }
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "id" => message.id = Some(value.to_string()),
                    "event" => message.event = value.to_string(),
                    "data" => {
                        if has_data {
                            message.data.push('\n');
                        }
                        message.data.push_str(value);
                        has_data = true;
                    }
                    _ => {}
                }
            }
            if has_data {
                return Some(message);
            }
        }
    }
}

/// A plain `GET` on a fresh connection, read to its end: `(status, body)`.
pub async fn get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let fut = async {
        let mut stream = TcpStream::connect(addr).await?;
        let head = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(head.as_bytes()).await?;
        let mut all = Vec::new();
        stream.read_to_end(&mut all).await?;
        let Some(i) = find(&all, b"\r\n\r\n") else {
            return Err(io::Error::other("no response head"));
        };
        let head = String::from_utf8_lossy(&all[..i]).into_owned();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::other("bad status line"))?;
        let mut body = Body {
            stream,
            raw: all[i + 4..].to_vec(),
            text: Vec::new(),
            chunked: head
                .to_ascii_lowercase()
                .contains("transfer-encoding: chunked"),
            chunk: Chunk::Size,
            read_size: 0,
            eof: true,
        };
        body.decode();
        Ok((status, String::from_utf8_lossy(&body.text).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "request timed out"))?
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
