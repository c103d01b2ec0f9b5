//! Bytes of one pipe to lines of text, as a terminal would show them.
//!
//! Reads end anywhere: in the middle of a line or of a UTF-8 character. The
//! [`Decoder`] keeps what is unfinished and hands out only whole lines, so a character
//! split across two reads stays whole. Invalid bytes become U+FFFD (as
//! `String::from_utf8_lossy` does), NUL becomes U+2400 (PostgreSQL text cannot hold
//! NUL), and a carriage return moves back to the start of the line so that the next
//! characters overwrite it: `10%\r20%\r100%\n` is stored as the one line `100%`. ANSI
//! escape sequences pass through untouched for the dashboard to render.
//!
//! Runs of plain whole lines (the common case, and all of a flood) are copied as one
//! block; only lines holding NUL or `\r`, or crossing a read, take the slow path.

use memchr::{memchr, memchr2, memrchr};

/// What a NUL byte becomes: the visible "symbol for null".
pub const NUL_REPLACEMENT: char = '\u{2400}';

/// Decodes one stream. Feed it every read, then call [`Decoder::finish`] at EOF.
#[derive(Debug, Default)]
pub struct Decoder {
    /// An incomplete UTF-8 sequence at the end of the last read (at most 3 bytes).
    tail: Vec<u8>,
    /// The line being written: everything since the last newline, `\r` applied.
    line: String,
    /// After a `\r`: the character position the next character overwrites. `None`
    /// when writing at the end of the line.
    cursor: Option<usize>,
}

impl Decoder {
    /// Decodes `bytes`, appending every line they complete to `out`, each ending in
    /// `\n`. Returns the number of lines appended.
    pub fn feed(&mut self, bytes: &[u8], out: &mut String) -> usize {
        if self.tail.is_empty() {
            self.decode(bytes, out)
        } else {
            let mut joined = std::mem::take(&mut self.tail);
            joined.extend_from_slice(bytes);
            self.decode(&joined, out)
        }
    }

    /// At end of input: an unfinished character becomes U+FFFD and an unfinished line
    /// becomes a line. Returns the number of lines appended to `out` (0 or 1).
    pub fn finish(&mut self, out: &mut String) -> usize {
        if !std::mem::take(&mut self.tail).is_empty() {
            self.write("\u{FFFD}");
        }
        if self.line.is_empty() && self.cursor.is_none() {
            return 0;
        }
        self.end_line(out);
        1
    }

    /// The unfinished line (already decoded, `\r` applied).
    pub fn partial(&self) -> &str {
        &self.line
    }

    /// Whether the last read ended inside a character (the writer is mid-write).
    pub fn in_character(&self) -> bool {
        !self.tail.is_empty()
    }

    /// Removes the first `len` bytes of the unfinished line (a char boundary), for a
    /// line that is emitted in pieces.
    pub fn drain_partial(&mut self, len: usize) {
        let chars = self.line[..len].chars().count();
        self.line.drain(..len);
        self.cursor = self.cursor.map(|at| at.saturating_sub(chars));
    }

    fn decode(&mut self, mut bytes: &[u8], out: &mut String) -> usize {
        let mut lines = 0;
        loop {
            match std::str::from_utf8(bytes) {
                Ok(text) => return lines + self.push_text(text, out),
                Err(e) => {
                    let (valid, rest) = bytes.split_at(e.valid_up_to());
                    let valid = std::str::from_utf8(valid).expect("checked by valid_up_to");
                    lines += self.push_text(valid, out);
                    match e.error_len() {
                        Some(len) => {
                            self.write("\u{FFFD}");
                            bytes = &rest[len..];
                        }
                        // The input ends inside a character: keep it for the next read.
                        None => {
                            self.tail.extend_from_slice(rest);
                            return lines;
                        }
                    }
                }
            }
        }
    }

    fn push_text(&mut self, mut text: &str, out: &mut String) -> usize {
        let mut lines = 0;
        while !text.is_empty() {
            if self.line.is_empty() && self.cursor.is_none() {
                // Fast path: copy every whole line before the first NUL or `\r`.
                let plain = match memchr2(b'\0', b'\r', text.as_bytes()) {
                    Some(special) => memrchr(b'\n', &text.as_bytes()[..special]),
                    None => memrchr(b'\n', text.as_bytes()),
                };
                if let Some(last) = plain {
                    let block = &text[..=last];
                    out.push_str(block);
                    lines += count_lines(block);
                    text = &text[last + 1..];
                    continue;
                }
            }
            // Slow path: one line (or the unfinished rest), character by character.
            match memchr(b'\n', text.as_bytes()) {
                Some(end) => {
                    self.write(&text[..end]);
                    self.end_line(out);
                    lines += 1;
                    text = &text[end + 1..];
                }
                None => {
                    self.write(text);
                    break;
                }
            }
        }
        lines
    }

    /// Writes text without newlines at the cursor.
    fn write(&mut self, text: &str) {
        if self.cursor.is_none() && memchr2(b'\0', b'\r', text.as_bytes()).is_none() {
            self.line.push_str(text);
            return;
        }
        for (i, segment) in text.split('\r').enumerate() {
            if i > 0 {
                self.cursor = Some(0);
            }
            if segment.contains('\0') {
                self.put(&segment.replace('\0', NUL_REPLACEMENT.encode_utf8(&mut [0; 4])));
            } else {
                self.put(segment);
            }
        }
    }

    /// Writes a segment without `\r` at the cursor, overwriting what is there.
    fn put(&mut self, segment: &str) {
        let Some(at) = self.cursor else {
            self.line.push_str(segment);
            return;
        };
        let start = self.byte_of_char(at, 0);
        let count = segment.chars().count();
        let end = self.byte_of_char(count, start);
        self.line.replace_range(start..end, segment);
        let written_to = start + segment.len();
        self.cursor = (written_to < self.line.len()).then_some(at + count);
    }

    /// The byte offset `chars` characters after byte `from` (or the end of the line).
    fn byte_of_char(&self, chars: usize, from: usize) -> usize {
        self.line[from..]
            .char_indices()
            .nth(chars)
            .map_or(self.line.len(), |(i, _)| from + i)
    }

    fn end_line(&mut self, out: &mut String) {
        out.push_str(&self.line);
        out.push('\n');
        self.line.clear();
        self.cursor = None;
    }
}

/// The number of `\n` in `text`.
pub fn count_lines(text: &str) -> usize {
    memchr::memchr_iter(b'\n', text.as_bytes()).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(reads: &[&[u8]]) -> String {
        let mut decoder = Decoder::default();
        let mut out = String::new();
        for read in reads {
            decoder.feed(read, &mut out);
        }
        decoder.finish(&mut out);
        out
    }

    #[test]
    fn keeps_a_character_split_across_reads() {
        assert_eq!(decode(&[b"caf\xc3", b"\xa9\n"]), "café\n");
        assert_eq!(decode(&[b"\xe2", b"\x82", b"\xac!\n"]), "€!\n");
    }

    #[test]
    fn replaces_invalid_bytes_and_nul() {
        assert_eq!(decode(&[b"a\xffb\0c\n"]), "a\u{FFFD}b\u{2400}c\n");
        assert_eq!(decode(&[b"end\xc3"]), "end\u{FFFD}\n");
    }

    #[test]
    fn carriage_returns_overwrite_like_a_terminal() {
        assert_eq!(decode(&[b"10%\r20%\r100%\n"]), "100%\n");
        assert_eq!(decode(&[b"abcdef\rXY\n"]), "XYcdef\n");
        assert_eq!(decode(&[b"dos\r\nline\r\n"]), "dos\nline\n");
        assert_eq!(decode(&[b"a\r", b"b\n", b"plain\n"]), "b\nplain\n");
    }

    #[test]
    fn counts_lines_and_keeps_the_unfinished_one() {
        let mut decoder = Decoder::default();
        let mut out = String::new();
        assert_eq!(decoder.feed(b"1\n2\n3", &mut out), 2);
        assert_eq!(decoder.partial(), "3");
        assert_eq!(decoder.feed(b"4\n\n", &mut out), 2);
        assert_eq!(out, "1\n2\n34\n\n");
        assert_eq!(decoder.finish(&mut out), 0);
    }
}
