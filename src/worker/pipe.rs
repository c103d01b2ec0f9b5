//! One pipe of the child: read, decode, redact, split long lines, queue.
//!
//! Runs as its own task per pipe, so stdout and stderr drain concurrently and neither
//! waits for the database (only for room in the [`Buffer`]).
//!
//! Redaction needs whole lines. An unfinished line is emitted early in two cases: it
//! grew past `max_line` bytes, or it sat unfinished for `partial_after` (a prompt, a
//! progress bar without newline). Then it is cut with [`SPLIT_MARKER`], and the last
//! [`Redactor::overlap`] bytes are held back, unredacted, with the rest of the line:
//! a secret that began before the cut and ends in a later read is still seen whole.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

use super::buffer::{Buffer, Chunk, Stream};
use super::decode::{count_lines, Decoder};
use super::redact::{self, Redactor};

/// Bytes asked for per read (a pipe holds 64 KiB on Linux).
pub const READ_SIZE: usize = 128 * 1024;

/// Ends every piece of a line that was cut, so a reader sees that it goes on.
pub const SPLIT_MARKER: &str = " \u{2026}[line continues]";

/// The reading end of one pipe.
#[derive(Debug)]
pub struct Reader {
    pub stream: Stream,
    pub redactor: Arc<Redactor>,
    pub buffer: Arc<Buffer>,
    pub max_line: usize,
    pub partial_after: Duration,
    /// Bytes read so far by every reader (to tell an idle pipe from a busy one).
    pub progress: Arc<AtomicU64>,
}

/// Tells the buffer this reader is done, however the task ends (EOF, error, abort).
struct CloseOnDrop(Arc<Buffer>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close_reader();
    }
}

impl Reader {
    /// Reads `pipe` to its end.
    pub async fn run(self, mut pipe: impl AsyncRead + Unpin) -> io::Result<()> {
        let _close = CloseOnDrop(self.buffer.clone());
        let mut decoder = Decoder::default();
        let mut state = redact::State::default();
        let mut buf = vec![0; READ_SIZE];
        // When the unfinished line is emitted even though it has no newline yet.
        let mut partial_deadline: Option<Instant> = None;
        let result = loop {
            let read = match partial_deadline {
                None => pipe.read(&mut buf).await,
                // `read` is cancel-safe: a timeout loses no bytes.
                Some(deadline) => {
                    match tokio::time::timeout_at(deadline, pipe.read(&mut buf)).await {
                        Ok(read) => read,
                        Err(_) => {
                            partial_deadline = None;
                            let len = decoder.partial().len();
                            if len > self.overlap() {
                                self.emit_partial(&mut decoder, &mut state, len - self.overlap())
                                    .await;
                            }
                            continue;
                        }
                    }
                }
            };
            match read {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    self.progress.fetch_add(n as u64, Ordering::Relaxed);
                    let mut lines = String::new();
                    if decoder.feed(&buf[..n], &mut lines) > 0 {
                        partial_deadline = None;
                        self.emit(lines, &mut state).await;
                    }
                    while decoder.partial().len() > self.max_line {
                        let len = decoder.partial().len();
                        let cut = self.max_line.min(len - self.overlap());
                        self.emit_partial(&mut decoder, &mut state, cut).await;
                    }
                    if decoder.partial().is_empty() {
                        partial_deadline = None;
                    } else if partial_deadline.is_none() {
                        partial_deadline = Some(Instant::now() + self.partial_after);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        let mut last = String::new();
        if decoder.finish(&mut last) > 0 {
            self.emit(last, &mut state).await;
        }
        result
    }

    /// Bytes held back when a line is cut; at most half a line, so a cut always
    /// emits something.
    fn overlap(&self) -> usize {
        self.redactor.overlap().min(self.max_line / 2)
    }

    /// Queues whole lines.
    async fn emit(&self, lines: String, state: &mut redact::State) {
        let lines = match self.redactor.redact(&lines, state) {
            Some(redacted) => redacted,
            None => lines,
        };
        let text = split_long_lines(lines, self.max_line);
        let chunk = Chunk {
            stream: self.stream,
            lines: count_lines(&text),
            text,
        };
        self.buffer.push(chunk).await;
    }

    /// Queues the first `cut` bytes (or less) of the unfinished line as a piece.
    async fn emit_partial(&self, decoder: &mut Decoder, state: &mut redact::State, cut: usize) {
        let partial = decoder.partial();
        let mut cut = floor_char_boundary(partial, cut.min(partial.len()));
        // Never cut through a secret: emit up to its start (or past it if it starts
        // the piece; it is then redacted whole).
        let mut probe = *state;
        if let Some(secret) = self
            .redactor
            .ranges(partial, &mut probe)
            .into_iter()
            .find(|r| r.start < cut && cut < r.end)
        {
            cut = if secret.start > 0 {
                secret.start
            } else {
                secret.end
            };
        }
        if cut == 0 {
            return;
        }
        let head = &partial[..cut];
        let mut piece = match self.redactor.redact(head, state) {
            Some(redacted) => redacted,
            None => head.to_string(),
        };
        piece.push_str(SPLIT_MARKER);
        piece.push('\n');
        decoder.drain_partial(cut);
        let chunk = Chunk {
            stream: self.stream,
            text: piece,
            lines: 1,
        };
        self.buffer.push(chunk).await;
    }
}

/// Cuts lines longer than `max` bytes into pieces ending in [`SPLIT_MARKER`].
pub fn split_long_lines(text: String, max: usize) -> String {
    let mut start = 0;
    let too_long = memchr::memchr_iter(b'\n', text.as_bytes()).any(|end| {
        let long = end - start > max;
        start = end + 1;
        long
    });
    if !too_long {
        return text;
    }
    let mut out = String::with_capacity(text.len() + text.len() / max * SPLIT_MARKER.len());
    for line in text.split_inclusive('\n') {
        let mut rest = line.strip_suffix('\n').unwrap_or(line);
        while rest.len() > max {
            let mut cut = floor_char_boundary(rest, max);
            if cut == 0 {
                cut = rest.chars().next().map_or(rest.len(), char::len_utf8);
            }
            out.push_str(&rest[..cut]);
            out.push_str(SPLIT_MARKER);
            out.push('\n');
            rest = &rest[cut..];
        }
        out.push_str(rest);
        out.push('\n');
    }
    out
}

fn floor_char_boundary(text: &str, mut at: usize) -> usize {
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_only_long_lines() {
        assert_eq!(split_long_lines("ab\ncd\n".into(), 2), "ab\ncd\n");
        let m = SPLIT_MARKER;
        assert_eq!(
            split_long_lines("abcde\nf\n".into(), 2),
            format!("ab{m}\ncd{m}\ne\nf\n")
        );
    }
}
