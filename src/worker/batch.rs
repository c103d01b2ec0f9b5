//! Chunks of output into the events of one INSERT.
//!
//! Consecutive chunks of the same stream coalesce into one event of up to
//! `max_event` bytes of whole lines, so a flood becomes a few large rows instead of a
//! row per line, while a quiet command's single line is an event of its own. Order is
//! kept: a chunk of the other stream closes the open event.

use memchr::{memchr, memrchr};

use super::buffer::{Chunk, Dropped, Stream};
use super::decode::count_lines;

/// What an event holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Lines of one stream.
    Log(Stream),
    /// A note that output was dropped here.
    Dropped(Dropped),
    /// The notice that the log reached `--max-log-bytes` (this many bytes) here.
    Truncated(u64),
}

/// One row to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: Kind,
    /// Whole lines, each ending in `\n`.
    pub text: String,
    pub lines: usize,
}

#[cfg(test)]
impl Event {
    /// The stored message: the lines without the last newline.
    pub fn message(&self) -> &str {
        self.text.strip_suffix('\n').unwrap_or(&self.text)
    }
}

/// Builds the events of the next batch.
#[derive(Debug)]
pub struct Batcher {
    max_event: usize,
    events: Vec<Event>,
}

impl Batcher {
    /// Events of at most `max_event` bytes (a single longer line stays whole).
    pub fn new(max_event: usize) -> Batcher {
        Batcher {
            max_event: max_event.max(1),
            events: Vec::new(),
        }
    }

    /// Adds output after everything added so far.
    pub fn push(&mut self, chunk: &Chunk) {
        let kind = Kind::Log(chunk.stream);
        let mut text = chunk.text.as_str();
        while !text.is_empty() {
            if let Some(open) = self.events.last_mut().filter(|e| e.kind == kind) {
                let room = self.max_event.saturating_sub(open.text.len());
                let take = whole_lines_within(text, room);
                if take > 0 {
                    open.text.push_str(&text[..take]);
                    open.lines += count_lines(&text[..take]);
                    text = &text[take..];
                    continue;
                }
            }
            let mut take = whole_lines_within(text, self.max_event);
            if take == 0 {
                // One line longer than an event: it goes alone.
                take = memchr(b'\n', text.as_bytes()).map_or(text.len(), |i| i + 1);
            }
            let piece = &text[..take];
            // Room for the whole event when more is likely to follow (a flood), so
            // the String never grows past it.
            let capacity = if text.len() >= self.max_event / 2 {
                self.max_event
            } else {
                take
            };
            let mut event_text = String::with_capacity(capacity);
            event_text.push_str(piece);
            self.events.push(Event {
                kind,
                text: event_text,
                lines: count_lines(piece),
            });
            text = &text[take..];
        }
    }

    /// Adds a note that output was dropped at this point.
    pub fn push_dropped(&mut self, dropped: Dropped) {
        let text = format!(
            "[eventgate: {} lines ({} bytes) of output were dropped here: the database \
             could not keep up and the worker's buffer was full]\n",
            dropped.lines, dropped.bytes
        );
        self.events.push(Event {
            kind: Kind::Dropped(dropped),
            text,
            lines: 1,
        });
    }

    /// Adds the notice that the log is full: nothing after it is stored.
    pub fn push_truncated(&mut self, limit: u64) {
        let text = format!(
            "[eventgate: the log reached its limit of {limit} bytes (--max-log-bytes); \
             later output is not stored, the command goes on]\n"
        );
        self.events.push(Event {
            kind: Kind::Truncated(limit),
            text,
            lines: 1,
        });
    }

    /// The events built so far, in order.
    pub fn take(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }
}

/// The length of the longest prefix of `text` made of whole lines and at most `limit`
/// bytes long.
fn whole_lines_within(text: &str, limit: usize) -> usize {
    if text.len() <= limit {
        return text.len();
    }
    memrchr(b'\n', &text.as_bytes()[..limit]).map_or(0, |i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(stream: Stream, text: &str) -> Chunk {
        Chunk {
            stream,
            text: text.to_string(),
            lines: count_lines(text),
        }
    }

    #[test]
    fn coalesces_one_stream_up_to_the_event_size() {
        let mut batcher = Batcher::new(8);
        batcher.push(&chunk(Stream::Stdout, "1\n2\n"));
        batcher.push(&chunk(Stream::Stdout, "3\n4\n5\n6\n"));
        batcher.push(&chunk(Stream::Stderr, "e\n"));
        batcher.push(&chunk(Stream::Stdout, "7\n"));
        let events = batcher.take();
        let shown: Vec<(&str, usize)> = events.iter().map(|e| (e.message(), e.lines)).collect();
        assert_eq!(
            shown,
            vec![("1\n2\n3\n4", 4), ("5\n6", 2), ("e", 1), ("7", 1)]
        );
        assert_eq!(events[2].kind, Kind::Log(Stream::Stderr));
    }

    #[test]
    fn a_long_line_goes_alone() {
        let mut batcher = Batcher::new(4);
        batcher.push(&chunk(Stream::Stdout, "a\nlongline\nb\n"));
        let events = batcher.take();
        let shown: Vec<&str> = events.iter().map(|e| e.message()).collect();
        assert_eq!(shown, vec!["a", "longline", "b"]);
    }
}
