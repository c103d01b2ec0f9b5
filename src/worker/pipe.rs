//! One pipe of the child: read, decode, redact, split long lines, queue.
//!
//! Runs as its own task per pipe, so stdout and stderr drain concurrently and neither
//! waits for the database (only for room in the [`Buffer`]).
//!
//! Redaction needs whole lines. An unfinished line is emitted early in two cases, cut
//! with [`SPLIT_MARKER`] and with a tail held back, unredacted, with the rest of the
//! line, so that a secret that began before the cut and ends in a later read is still
//! seen whole:
//!
//! - it grew past `max_line` bytes: the last [`Redactor::overlap`] bytes are held;
//! - it sat unfinished for `partial_after` (a prompt, a progress bar): held are the
//!   last two words (a token being printed, or `Bearer <token>`; token patterns have
//!   no other spaces), at least the longest literal secret, and everything from a
//!   `-----` on (a private key fence).

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
                            // Not while a character is half written: more is coming.
                            let cut = if decoder.in_character() {
                                0
                            } else {
                                self.timed_cut(decoder.partial())
                            };
                            if cut > 0 {
                                self.emit_partial(&mut decoder, &mut state, cut).await;
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
                    // Sized up front: the queue counts bytes of text, so a String
                    // must not hold twice that in capacity.
                    let mut lines = String::with_capacity(n + decoder.partial().len() + 8);
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

    /// Where an unfinished line that waited too long may be cut (see the module docs).
    fn timed_cut(&self, partial: &str) -> usize {
        let mut cut = partial
            .len()
            .saturating_sub(self.redactor.longest_literal());
        let before_last_words = {
            let mut rest = partial.trim_end();
            for _ in 0..2 {
                rest = rest.trim_end_matches(|c: char| !c.is_whitespace());
                rest = rest.trim_end();
            }
            // Keep the whitespace before the held words with the emitted piece.
            partial[rest.len()..]
                .find(|c: char| !c.is_whitespace())
                .map_or(partial.len(), |i| rest.len() + i)
        };
        cut = cut.min(before_last_words);
        if let Some(fence) = partial.find("-----") {
            cut = cut.min(fence);
        }
        cut
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

    use tokio::io::AsyncWriteExt;

    /// Feeds `writes` to a reader as separate reads; returns the queued text.
    async fn read_through(redactor: Redactor, max_line: usize, writes: &[&str]) -> String {
        read_through_timed(redactor, max_line, Duration::from_secs(3600), writes).await
    }

    async fn read_through_timed(
        redactor: Redactor,
        max_line: usize,
        partial_after: Duration,
        writes: &[&str],
    ) -> String {
        let buffer = Arc::new(Buffer::new(1 << 20, Duration::from_secs(1), 1));
        let reader = Reader {
            stream: Stream::Stdout,
            redactor: Arc::new(redactor),
            buffer: buffer.clone(),
            max_line,
            partial_after,
            progress: Arc::new(AtomicU64::new(0)),
        };
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let task = tokio::spawn(reader.run(rx));
        for write in writes {
            tx.write_all(write.as_bytes()).await.unwrap();
            // Let the reader take this write alone (and time out on it).
            tokio::time::sleep(partial_after.min(Duration::from_millis(20)) * 5).await;
        }
        drop(tx);
        task.await.unwrap().unwrap();
        let taken = buffer.take(usize::MAX);
        taken.chunks.iter().map(|c| c.text.as_str()).collect()
    }

    #[tokio::test]
    async fn a_secret_across_a_forced_cut_is_still_redacted() {
        let secret = "secret-spanning-the-cut";
        let head = format!("{}{}", "a".repeat(250), &secret[..8]);
        let tail = format!("{}{}\n", &secret[8..], "b".repeat(500));
        let text = read_through(Redactor::new([secret]), 256, &[&head, &tail]).await;
        assert!(
            !text.contains(secret) && !text.contains(&secret[8..]),
            "{text}"
        );
        assert!(text.contains(SPLIT_MARKER), "the line was cut");
        let joined = text.replace(&format!("{SPLIT_MARKER}\n"), "");
        let expected = format!(
            "{}{}{}\n",
            "a".repeat(250),
            redact::REDACTED,
            "b".repeat(500)
        );
        assert_eq!(joined, expected);
    }

    #[tokio::test]
    async fn an_unfinished_line_shows_after_a_while_but_not_its_last_words() {
        let m = SPLIT_MARKER;
        let token = format!("ghp_{}", "x1".repeat(18));
        let writes = [
            "Progress: step one two",
            " done\n",
            "auth Bearer ",
            &token[..10],
            &format!("{} ok\n", &token[10..]),
        ];
        let text = read_through_timed(
            Redactor::new(Vec::<String>::new()),
            4096,
            Duration::from_millis(10),
            &writes,
        )
        .await;
        assert_eq!(
            text,
            format!("Progress: step {m}\none two done\nauth {m}\nBearer [REDACTED] ok\n")
        );
    }

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
