//! One pipe of the child: read, decode, redact, split long lines, queue.
//!
//! Runs as its own task per pipe, so stdout and stderr drain concurrently and neither
//! waits for the database (only for room in the [`Buffer`]). Once the log is full
//! (`--max-log-bytes`) it goes on reading, so the command never blocks on its pipe,
//! and throws the output away.
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
//!   `-----` on (a private key fence). An `::add-mask::` line is held whole.
//!
//! Whole lines are held back too when a read ends in a run of base64-only lines
//! ([`Redactor::wrapped_tail`]): a wrapped encoding may go on in the next read, and a
//! secret's encoding cut by the wrap is only recognised with both its pieces. They go
//! with the next read, or after `partial_after`, or at the end.
//!
//! A line `::add-mask::<value>` adds `value` to the secrets of both pipes before
//! anything after it is redacted; the line is stored as `::add-mask::[REDACTED]`.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

use super::buffer::{Buffer, Chunk, Stream};
use super::decode::{count_lines, Decoder};
use super::redact::{self, Redactor, ADD_MASK, REDACTED};

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

/// What a reader carries from one block of lines to the next.
#[derive(Debug, Default)]
struct Carried {
    redact: redact::State,
    /// Whole lines kept back (see the module docs), not yet redacted.
    held: String,
    /// Bytes at the start of `held` inside a secret found with the lines before.
    covered: usize,
    /// Inside an `::add-mask::` line too long to be held whole: its rest is hidden.
    masking: bool,
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
        let mut carried = Carried::default();
        let mut buf = vec![0; READ_SIZE];
        // When the unfinished line (or held lines) are emitted even though no more
        // output came.
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
                            self.emit(String::new(), &mut carried, true).await;
                            // Not while a character is half written: more is coming.
                            let cut = if decoder.in_character() {
                                0
                            } else {
                                self.timed_cut(decoder.partial())
                            };
                            if cut > 0 {
                                self.emit_partial(&mut decoder, &mut carried, cut).await;
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
                        self.emit(lines, &mut carried, false).await;
                    }
                    while decoder.partial().len() > self.max_line {
                        let len = decoder.partial().len();
                        let cut = self.max_line.min(len - self.overlap());
                        self.emit_partial(&mut decoder, &mut carried, cut).await;
                    }
                    if decoder.partial().is_empty() && carried.held.is_empty() {
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
        decoder.finish(&mut last);
        self.emit(last, &mut carried, true).await;
        result
    }

    /// Bytes held back when a line is cut; at most half a line, so a cut always
    /// emits something.
    fn overlap(&self) -> usize {
        self.redactor.overlap().min(self.max_line / 2)
    }

    /// Where an unfinished line that waited too long may be cut (see the module docs).
    fn timed_cut(&self, partial: &str) -> usize {
        let start = partial.trim_start();
        if start.starts_with(ADD_MASK) || ADD_MASK.starts_with(start) {
            return 0;
        }
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

    /// Queues whole lines after the held ones; keeps back a wrapped tail unless
    /// `last` (no more lines are coming soon).
    async fn emit(&self, lines: String, carried: &mut Carried, last: bool) {
        if self.buffer.is_log_full() {
            self.buffer.not_stored(&carried.held);
            self.buffer.not_stored(&lines);
            carried.held.clear();
            return;
        }
        let lines = self.masked(lines, carried);
        let mut text = if carried.held.is_empty() {
            lines
        } else {
            let mut text = std::mem::take(&mut carried.held);
            text.push_str(&lines);
            text
        };
        if text.is_empty() {
            return;
        }
        let cut = if last {
            text.len()
        } else {
            text.len() - self.redactor.wrapped_tail(&text)
        };
        let mut ranges = self.redactor.ranges(&text, &mut carried.redact);
        if carried.covered > 0 {
            ranges.push(0..carried.covered);
            ranges = redact::merge(ranges);
        }
        carried.covered = 0;
        let mut emitted = Vec::with_capacity(ranges.len());
        for range in ranges.into_iter().take_while(|r| r.start < cut) {
            if range.end > cut {
                carried.covered = range.end - cut;
                emitted.push(range.start..cut);
            } else {
                emitted.push(range);
            }
        }
        carried.held = text.split_off(cut);
        if text.is_empty() {
            return;
        }
        if !emitted.is_empty() {
            text = redact::apply(&text, &emitted);
        }
        let text = split_long_lines(text, self.max_line);
        let chunk = Chunk {
            stream: self.stream,
            lines: count_lines(&text),
            text,
        };
        self.buffer.push(chunk).await;
    }

    /// `lines` with each `::add-mask::<value>` line's value added to the secrets and
    /// hidden (and the rest of an over-long one that was cut).
    fn masked(&self, lines: String, carried: &mut Carried) -> String {
        let continues = carried.masking;
        if !continues && memchr::memmem::find(lines.as_bytes(), ADD_MASK.as_bytes()).is_none() {
            return lines;
        }
        let mut out = String::with_capacity(lines.len() + 64);
        for line in lines.split_inclusive('\n') {
            let newline = if line.ends_with('\n') { "\n" } else { "" };
            if carried.masking {
                carried.masking = newline.is_empty();
                out.push_str(REDACTED);
                out.push_str(newline);
                continue;
            }
            let Some(value) = redact::add_mask_value(line.trim_end_matches('\n')) else {
                out.push_str(line);
                continue;
            };
            let note = match self.redactor.add(&value) {
                Ok(()) => String::new(),
                Err(redact::Refused::TooShort) => format!(
                    " [eventgate: not masked elsewhere: shorter than {} characters]",
                    redact::MIN_SECRET_CHARS
                ),
                Err(redact::Refused::TooMany) => format!(
                    " [eventgate: not masked: more than {} masks]",
                    redact::MAX_ADDED_MASKS
                ),
            };
            let command_end = line.find(ADD_MASK).expect("a mask line") + ADD_MASK.len();
            out.push_str(&line[..command_end]);
            out.push_str(REDACTED);
            out.push_str(&note);
            out.push_str(newline);
        }
        out
    }

    /// Queues the first `cut` bytes (or less) of the unfinished line as a piece.
    async fn emit_partial(&self, decoder: &mut Decoder, carried: &mut Carried, cut: usize) {
        // The held lines come before this piece.
        self.emit(String::new(), carried, true).await;
        let partial = decoder.partial();
        let mut cut = floor_char_boundary(partial, cut.min(partial.len()));
        if self.buffer.is_log_full() {
            self.buffer.not_stored(&partial[..cut]);
            decoder.drain_partial(cut);
            return;
        }
        let mut piece = if carried.masking || partial.trim_start().starts_with(ADD_MASK) {
            // An over-long `::add-mask::` line: too long to be a secret we can look
            // for, but never stored in clear.
            let head = match partial.find(ADD_MASK) {
                Some(at) if !carried.masking => &partial[..at + ADD_MASK.len()],
                _ => "",
            };
            carried.masking = true;
            format!("{head}{REDACTED}")
        } else {
            // Never cut through a secret: emit up to its start (or past it if it
            // starts the piece; it is then redacted whole).
            let mut probe = carried.redact;
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
            match self.redactor.redact(head, &mut carried.redact) {
                Some(redacted) => redacted,
                None => head.to_string(),
            }
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
        let buffer = Arc::new(Buffer::new(1 << 20, Duration::from_secs(1), 1, 0));
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

    #[tokio::test]
    async fn a_wrapped_encoding_cut_at_a_read_and_at_its_wrap_is_redacted_on_both_lines() {
        use base64::Engine;
        let secret = "s3cr3t value/with+chars";
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(format!("{}{secret}", "x".repeat(40)));
        // The secret's encoding starts at column 54 and crosses the wrap at 76; the
        // first line comes alone in its own read.
        let first = format!("{}\n", &encoded[..76]);
        let second = format!("{}\n", &encoded[76..]);
        let text = read_through(Redactor::new([secret]), 4096, &[&first, &second]).await;
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].ends_with(redact::REDACTED), "{text}");
        assert!(lines[1].starts_with(redact::REDACTED), "{text}");
        assert_eq!(&lines[0][..50], &encoded[..50], "the rest stays");
    }

    #[tokio::test]
    async fn add_mask_hides_its_value_then_and_later_on() {
        let writes = [
            "before masked-value-1\n::add-mask::masked-value-1\nsame read masked-value-1\n",
            "later masked-value-1 and masked%2Dvalue%2D1\n::add-mask::abc\nabc\n",
        ];
        let text = read_through(Redactor::new(Vec::<String>::new()), 4096, &writes).await;
        let r = redact::REDACTED;
        assert_eq!(
            text,
            format!(
                "before {r}\n::add-mask::{r}\nsame read {r}\nlater {r} and {r}\n\
                 ::add-mask::{r} [eventgate: not masked elsewhere: shorter than 6 characters]\n\
                 abc\n"
            )
        );
    }

    #[tokio::test]
    async fn an_add_mask_line_longer_than_a_line_is_never_stored_in_clear() {
        let value = "v".repeat(1000);
        let line = format!("::add-mask::{value}\nnext\n");
        let text = read_through(Redactor::new(Vec::<String>::new()), 256, &[&line]).await;
        assert!(!text.contains("vvvv"), "{text}");
        assert!(text.ends_with("next\n"), "{text}");
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
