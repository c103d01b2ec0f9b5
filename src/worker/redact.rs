//! Secrets out of the output before it leaves the process.
//!
//! A [`Redactor`] knows literal secrets (environment variables named like secrets,
//! `--redact` values, the database password, and values a command masks at run time
//! with `::add-mask::<value>`) in every form a tool commonly prints them in, and token
//! patterns that need no configuration (GitHub, AWS access keys, JWTs, `Bearer`
//! credentials, Slack tokens) and private key blocks, which span lines.
//!
//! # Whole classes of forms, not a list
//!
//! Listing encodings one by one misses the next tool's choice (which reserved
//! characters does this URL encoder keep?), so a text is matched in three views, and
//! each match in a view is mapped back to the bytes of the original it came from:
//!
//! 1. **As printed.** The secret, its base64 (standard and URL-safe alphabets, at each
//!    of the three byte alignments a secret can have inside a longer encoded text, only
//!    the characters its own bits decide, so padding or none), its hex (lower and
//!    upper case) and the secret with `+` for spaces.
//! 2. **Printed, minus the terminal.** Escape sequences removed (SGR colours such as
//!    `grep --color=always` puts inside a match, `ESC[K`, OSC hyperlinks), and a line
//!    made only of base64 characters (16 or more) joined to the next one, so an
//!    encoding wrapped at any width (GNU `base64` wraps at 76) is seen whole, whatever
//!    the column where the secret's part begins. A match across the break redacts
//!    both pieces, so no stored line or pair of lines decodes to the secret.
//! 3. **Decoded.** The second view with `%XX` (either case) and JSON/JavaScript
//!    backslash escapes (`\"`, `\/`, `\n`, `\u00e9`, surrogate pairs) decoded and `+`
//!    read as a space, matched against the secret with `+` read as a space too. Any
//!    set of reserved characters (Python's `quote` keeps `/`, `encodeURI` keeps `/`
//!    and `+`, forms use `+` for spaces) and any JSON encoder then give the same
//!    bytes. Built only for text holding a `%` or a `\`.
//!
//! Views 2 and 3 are built only when the text has something to remove or decode, so
//! plain output costs one scan for the literals, one for the token patterns, and a
//! look for escapes and base64-only lines.
//!
//! It works on text made of whole lines, so a secret is never cut by a read boundary.
//! When a line must be emitted before its end (too long, or unfinished for too long),
//! the caller keeps the last [`Redactor::overlap`] bytes back; a run of base64-only
//! lines at the end of a read is kept back by [`Redactor::wrapped_tail`], see
//! `pipe.rs`.

use std::ops::Range;
use std::sync::{Arc, RwLock};

use aho_corasick::{AhoCorasick, MatchKind};
use base64::Engine;
use regex::Regex;

/// What a secret becomes.
pub const REDACTED: &str = "[REDACTED]";

/// Values shorter than this (in characters) are not treated as secrets: they would
/// match everywhere and hide ordinary output.
pub const MIN_SECRET_CHARS: usize = 6;

/// Most values a command may add with `::add-mask::` (each rebuilds the matcher);
/// later ones are refused, and the worker says so in the log.
pub const MAX_ADDED_MASKS: usize = 1024;

/// The workflow command that adds a secret at run time (GitHub Actions).
pub const ADD_MASK: &str = "::add-mask::";

/// Parts of environment variable names whose values are secrets (case-insensitive).
pub const SECRET_NAME_PARTS: &[&str] = &[
    "TOKEN",
    "SECRET",
    "PASSWORD",
    "PASSWD",
    "KEY",
    "CREDENTIAL",
    "AUTH",
];

/// Shortest line taken for a piece of wrapped base64 (or hex): shorter runs of
/// letters are words.
const MIN_WRAP_WIDTH: usize = 16;

/// The longest token-pattern match we guarantee to catch across a forced split.
const TOKEN_OVERLAP: usize = 1024;

/// Token patterns. ASCII-only classes and word boundaries (`-u`) keep the matcher on
/// its fast path. None can match a newline.
const TOKEN_PATTERNS: &str = r"(?x-u)
      \b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{30,255}\b        # GitHub
    | \bgithub_pat_[A-Za-z0-9_]{22,255}\b                     # GitHub fine-grained
    | \b(?:AKIA|ASIA)[A-Z0-9]{16}\b                           # AWS access key id
    | \beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]* # JWT
    | \b(?:Bearer|bearer|BEARER)[\ \t]+[A-Za-z0-9._~+/-]{8,}=*  # HTTP credentials
    | \bxox[abprs]-[A-Za-z0-9-]{10,}                          # Slack
";

/// The lines that open and close a PEM private key.
const PRIVATE_KEY_FENCE: &str = r"-----(?:BEGIN|END) [A-Z0-9 ]*PRIVATE KEY-----";

/// Finds secrets in text. Shared by both pipes; what a pipe must carry from one block
/// to the next (inside a private key?) is its [`State`]. Secrets added at run time
/// ([`Redactor::add`]) apply to both pipes from the next block on.
#[derive(Debug)]
pub struct Redactor {
    /// Swapped whole when a secret is added; a block is matched against one version.
    literals: RwLock<Arc<Literals>>,
    tokens: Regex,
    fences: Regex,
}

/// The literal secrets and the matchers built from them.
#[derive(Debug, Default)]
struct Literals {
    secrets: Vec<String>,
    added: usize,
    /// Forms as printed (views 1 and 2).
    printed: Option<AhoCorasick>,
    /// The secrets with `+` read as a space (view 3).
    decoded: Option<AhoCorasick>,
    /// Longest printed form of a secret, counting a fully percent-encoded one.
    longest: usize,
}

/// What one stream carries from block to block.
#[derive(Debug, Default, Clone, Copy)]
pub struct State {
    in_private_key: bool,
}

/// Why [`Redactor::add`] did not add a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Shorter than [`MIN_SECRET_CHARS`].
    TooShort,
    /// [`MAX_ADDED_MASKS`] were added already.
    TooMany,
}

impl Redactor {
    /// A redactor for these secret values (short ones are ignored) and the token
    /// patterns.
    pub fn new<S: AsRef<str>>(secrets: impl IntoIterator<Item = S>) -> Redactor {
        let secrets = secrets
            .into_iter()
            .map(|s| s.as_ref().to_string())
            .collect();
        Redactor {
            literals: RwLock::new(Arc::new(Literals::new(secrets, 0))),
            tokens: Regex::new(TOKEN_PATTERNS).expect("constant pattern"),
            fences: Regex::new(PRIVATE_KEY_FENCE).expect("constant pattern"),
        }
    }

    /// The values of this process's environment variables whose names look secret.
    pub fn env_secrets() -> Vec<String> {
        std::env::vars_os()
            .filter(|(name, _)| is_secret_name(&name.to_string_lossy()))
            .filter_map(|(_, value)| value.into_string().ok())
            .collect()
    }

    fn literals(&self) -> Arc<Literals> {
        // Poisoned only by a panic while swapping an Arc; the old one is still whole.
        self.literals
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Adds a secret at run time (`::add-mask::`), in all its forms.
    pub fn add(&self, secret: &str) -> Result<(), Refused> {
        if secret.trim_matches(['\r', '\n']).chars().count() < MIN_SECRET_CHARS {
            return Err(Refused::TooShort);
        }
        let mut literals = self.literals.write().unwrap_or_else(|e| e.into_inner());
        if literals.secrets.iter().any(|s| s == secret) {
            return Ok(());
        }
        if literals.added >= MAX_ADDED_MASKS {
            return Err(Refused::TooMany);
        }
        let mut secrets = literals.secrets.clone();
        secrets.push(secret.to_string());
        *literals = Arc::new(Literals::new(secrets, literals.added + 1));
        Ok(())
    }

    /// How many bytes at the end of an unfinished line must be held back so that a
    /// secret that continues in the next read is still seen whole.
    pub fn overlap(&self) -> usize {
        self.longest_literal().max(TOKEN_OVERLAP)
    }

    /// The length of the longest printed form of a literal secret.
    pub fn longest_literal(&self) -> usize {
        self.literals().longest
    }

    /// How many bytes at the end of `text` (whole lines) to keep back until the next
    /// lines are read: a run of base64-only lines may be a wrapped encoding that goes
    /// on, and a secret's part at the end of its last line is only known with the
    /// next line. Enough lines are kept to hold the longest form; 0 without literal
    /// secrets.
    pub fn wrapped_tail(&self, text: &str) -> usize {
        let longest = self.longest_literal();
        if longest == 0 || !text.ends_with('\n') {
            return 0;
        }
        let bytes = text.as_bytes();
        let mut start = bytes.len();
        // Walk back over whole lines while they are base64-only.
        while start > 0 && bytes.len() - start < longest + MIN_WRAP_WIDTH {
            let end = start - 1; // the newline of this line
            let line_start = memchr::memrchr(b'\n', &bytes[..end]).map_or(0, |i| i + 1);
            if !is_wrap_line(&bytes[line_start..end]) {
                break;
            }
            start = line_start;
        }
        bytes.len() - start
    }

    /// The merged byte ranges of `text` to redact, in order. Updates `state` as if all
    /// of `text` had been emitted.
    pub fn ranges(&self, text: &str, state: &mut State) -> Vec<Range<usize>> {
        let mut ranges = Vec::new();
        let mut key_start = state.in_private_key.then_some(0);
        for fence in self.fences.find_iter(text) {
            let begins = fence.as_str().starts_with("-----BEGIN");
            match key_start {
                None if begins => key_start = Some(fence.start()),
                Some(start) if !begins => {
                    ranges.push(start..fence.end());
                    key_start = None;
                }
                _ => {}
            }
        }
        if let Some(start) = key_start {
            ranges.push(start..text.len());
        }
        state.in_private_key = key_start.is_some();
        self.literals().find(text, &mut ranges);
        for token in self.tokens.find_iter(text) {
            let mut start = token.start();
            // Keep the scheme of `Bearer <credential>` readable.
            if token.as_str().as_bytes()[0].eq_ignore_ascii_case(&b'b') {
                let scheme = token.as_str()[6..].len() - token.as_str()[6..].trim_start().len();
                start += 6 + scheme;
            }
            ranges.push(start..token.end());
        }
        merge(ranges)
    }

    /// `text` with its secrets replaced, or `None` when it holds none.
    pub fn redact(&self, text: &str, state: &mut State) -> Option<String> {
        let ranges = self.ranges(text, state);
        (!ranges.is_empty()).then(|| apply(text, &ranges))
    }
}

impl Literals {
    fn new(secrets: Vec<String>, added: usize) -> Literals {
        let mut printed = Vec::new();
        let mut decoded = Vec::new();
        let mut longest = 0;
        for secret in &secrets {
            let trimmed = secret.trim_matches(['\r', '\n']);
            if trimmed.chars().count() < MIN_SECRET_CHARS {
                continue;
            }
            // Fully percent-encoded, every byte becomes three.
            longest = longest.max(3 * trimmed.len());
            // Output is matched as whole text, but a secret of several lines is also
            // looked for line by line (it may be printed one line at a time).
            let mut values = vec![trimmed];
            if trimmed.contains('\n') {
                values.extend(trimmed.lines().map(|l| l.trim_end_matches('\r')));
            }
            for value in values {
                if value.chars().count() < MIN_SECRET_CHARS {
                    continue;
                }
                printed.push(value.to_string());
                printed.push(value.replace(' ', "+"));
                decoded.push(value.replace('+', " "));
            }
            printed.extend(base64_forms(trimmed.as_bytes()));
            printed.extend(hex_forms(trimmed.as_bytes()));
        }
        printed.retain(|f| f.chars().count() >= MIN_SECRET_CHARS);
        for forms in [&mut printed, &mut decoded] {
            forms.sort();
            forms.dedup();
        }
        longest = printed.iter().map(String::len).fold(longest, usize::max);
        let build = |forms: &[String]| {
            (!forms.is_empty()).then(|| {
                AhoCorasick::builder()
                    .match_kind(MatchKind::LeftmostLongest)
                    .build(forms)
                    .expect("literal patterns always build")
            })
        };
        Literals {
            printed: build(&printed),
            decoded: build(&decoded),
            secrets,
            added,
            longest,
        }
    }

    /// Adds the ranges of `text` that hold a literal secret in any view.
    fn find(&self, text: &str, ranges: &mut Vec<Range<usize>>) {
        let (Some(printed), Some(decoded)) = (&self.printed, &self.decoded) else {
            return;
        };
        ranges.extend(printed.find_iter(text).map(|m| m.range()));
        let view = View::printed(text);
        if let Some(view) = &view {
            ranges.extend(
                printed
                    .find_iter(&view.bytes)
                    .map(|m| whole_chars(text, view.source(m.range()))),
            );
        }
        let shown = view.as_ref().map_or(text.as_bytes(), |v| &v.bytes);
        if memchr::memchr2(b'%', b'\\', shown).is_some() {
            let decoded_view = View::decode(shown);
            ranges.extend(decoded.find_iter(&decoded_view.bytes).map(|m| {
                let in_shown = decoded_view.source(m.range());
                let in_text = match &view {
                    Some(view) => view.source(in_shown),
                    None => in_shown,
                };
                whole_chars(text, in_text)
            }));
        }
    }
}

/// A normalised copy of a text, and where each of its bytes came from.
#[derive(Debug, Default)]
struct View {
    bytes: Vec<u8>,
    /// In view order; bulk copies make few pieces, so plain runs cost a memcpy.
    pieces: Vec<Piece>,
}

/// Bytes of a view from `view` on came from the source from `source` on: one for one
/// when `copied`, else all of them from the `len` source bytes (a decoded escape).
#[derive(Debug, Clone, Copy)]
struct Piece {
    view: usize,
    source: usize,
    len: usize,
    copied: bool,
}

impl View {
    fn with_capacity(n: usize) -> View {
        View {
            bytes: Vec::with_capacity(n),
            pieces: Vec::new(),
        }
    }

    fn copy(&mut self, bytes: &[u8], source: usize) {
        if bytes.is_empty() {
            return;
        }
        self.pieces.push(Piece {
            view: self.bytes.len(),
            source,
            len: bytes.len(),
            copied: true,
        });
        self.bytes.extend_from_slice(bytes);
    }

    fn decoded(&mut self, bytes: &[u8], source: Range<usize>) {
        self.pieces.push(Piece {
            view: self.bytes.len(),
            source: source.start,
            len: source.len(),
            copied: false,
        });
        self.bytes.extend_from_slice(bytes);
    }

    /// The range of the source that the view's `range` (not empty) came from.
    fn source(&self, range: Range<usize>) -> Range<usize> {
        let piece = |at: usize| &self.pieces[self.pieces.partition_point(|p| p.view <= at) - 1];
        let first = piece(range.start);
        let start = if first.copied {
            first.source + (range.start - first.view)
        } else {
            first.source
        };
        let last = piece(range.end - 1);
        let end = if last.copied {
            last.source + (range.end - last.view)
        } else {
            last.source + last.len
        };
        start..end
    }

    /// View 2: escape sequences removed, wrapped base64 lines joined. `None` when it
    /// would equal the text.
    fn printed(text: &str) -> Option<View> {
        let bytes = text.as_bytes();
        if memchr::memchr(0x1b, bytes).is_none() && !has_wrapped_lines(bytes) {
            return None;
        }
        let mut view = View::with_capacity(bytes.len());
        // Scanned up to `at`; copied up to `run`.
        let (mut at, mut run, mut line_start) = (0, 0, 0);
        while let Some(found) = memchr::memchr2(0x1b, b'\n', &bytes[at..]) {
            let i = at + found;
            at = i + 1;
            if bytes[i] == 0x1b {
                if let Some(len) = escape_len(&bytes[i..]) {
                    view.copy(&bytes[run..i], run);
                    at = i + len;
                    run = at;
                }
            } else {
                let joined = is_wrap_line(&bytes[line_start..i])
                    && bytes.get(i + 1).is_some_and(|&b| is_base64_byte(b));
                if joined {
                    view.copy(&bytes[run..i], run);
                    run = i + 1;
                }
                line_start = i + 1;
            }
        }
        view.copy(&bytes[run..], run);
        Some(view)
    }

    /// View 3: percent and backslash escapes of `shown` decoded, `+` as a space.
    fn decode(shown: &[u8]) -> View {
        let mut view = View::with_capacity(shown.len());
        let (mut at, mut run) = (0, 0);
        while let Some(found) = memchr::memchr2(b'%', b'\\', &shown[at..]) {
            let i = at + found;
            at = i + 1;
            let escape = if shown[i] == b'%' {
                match (hex_value(shown.get(i + 1)), hex_value(shown.get(i + 2))) {
                    (Some(h), Some(l)) => Some((Decoded::Byte(h << 4 | l), 3)),
                    _ => None,
                }
            } else {
                backslash_escape(&shown[i..])
            };
            let Some((decoded, len)) = escape else {
                continue;
            };
            view.copy(&shown[run..i], run);
            match decoded {
                Decoded::Byte(b) => view.decoded(&[b], i..i + len),
                Decoded::Char(c) => {
                    let mut utf8 = [0; 4];
                    view.decoded(c.encode_utf8(&mut utf8).as_bytes(), i..i + len);
                }
            }
            at = i + len;
            run = at;
        }
        view.copy(&shown[run..], run);
        for b in &mut view.bytes {
            if *b == b'+' {
                *b = b' ';
            }
        }
        view
    }
}

/// `range` widened to whole characters of `text`.
fn whole_chars(text: &str, range: Range<usize>) -> Range<usize> {
    let (mut start, mut end) = (range.start, range.end);
    while !text.is_char_boundary(start) {
        start -= 1;
    }
    while !text.is_char_boundary(end) {
        end += 1;
    }
    start..end
}

enum Decoded {
    Byte(u8),
    Char(char),
}

/// A JSON/JavaScript escape at the start of `s` (which starts with `\`): what it
/// stands for and its length.
fn backslash_escape(s: &[u8]) -> Option<(Decoded, usize)> {
    let byte = match *s.get(1)? {
        b'"' => b'"',
        b'\\' => b'\\',
        b'/' => b'/',
        b'\'' => b'\'',
        b'b' => 0x08,
        b'f' => 0x0c,
        b'n' => b'\n',
        b'r' => b'\r',
        b't' => b'\t',
        b'u' => {
            let unit = hex4(s.get(2..6)?)?;
            if (0xd800..0xdc00).contains(&unit) && s.get(6..8) == Some(b"\\u") {
                let low = hex4(s.get(8..12)?)?;
                if (0xdc00..0xe000).contains(&low) {
                    let c = 0x10000 + ((unit - 0xd800) << 10) + (low - 0xdc00);
                    return Some((Decoded::Char(char::from_u32(c)?), 12));
                }
            }
            return Some((Decoded::Char(char::from_u32(unit)?), 6));
        }
        _ => return None,
    };
    Some((Decoded::Byte(byte), 2))
}

fn hex4(digits: &[u8]) -> Option<u32> {
    digits.iter().try_fold(0, |acc, &d| {
        Some(acc << 4 | u32::from(hex_value(Some(&d))?))
    })
}

fn hex_value(digit: Option<&u8>) -> Option<u8> {
    let d = *digit?;
    match d {
        b'0'..=b'9' => Some(d - b'0'),
        b'a'..=b'f' => Some(d - b'a' + 10),
        b'A'..=b'F' => Some(d - b'A' + 10),
        _ => None,
    }
}

/// The length of the terminal escape sequence at the start of `s` (which starts with
/// ESC): CSI (`ESC [ params final`, SGR colours and `ESC[K`), OSC (`ESC ] ... BEL` or
/// `ESC ] ... ESC \`, hyperlinks and titles), or `ESC intermediates final`. `None`
/// when it is not a whole one.
fn escape_len(s: &[u8]) -> Option<usize> {
    match *s.get(1)? {
        b'[' => {
            let body = s[2..].iter().position(|&b| !(0x20..=0x3f).contains(&b))?;
            let last = *s.get(2 + body)?;
            (0x40..=0x7e).contains(&last).then_some(body + 3)
        }
        b']' => {
            let mut i = 2;
            while i < s.len() {
                match s[i] {
                    0x07 => return Some(i + 1),
                    0x1b if s.get(i + 1) == Some(&b'\\') => return Some(i + 2),
                    b'\n' => return None,
                    _ => i += 1,
                }
            }
            None
        }
        _ => {
            let intermediates = s[1..]
                .iter()
                .take_while(|b| (0x20..=0x2f).contains(*b))
                .count();
            let last = *s.get(1 + intermediates)?;
            (0x30..=0x7e).contains(&last).then_some(intermediates + 2)
        }
    }
}

fn is_base64_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'-' | b'_')
}

/// A line that may be one piece of a wrapped encoding.
fn is_wrap_line(line: &[u8]) -> bool {
    line.len() >= MIN_WRAP_WIDTH && line.iter().all(|&b| is_base64_byte(b))
}

/// Whether some line of `bytes` is a wrap line followed by another line.
fn has_wrapped_lines(bytes: &[u8]) -> bool {
    let mut start = 0;
    for end in memchr::memchr_iter(b'\n', bytes) {
        if end - start >= MIN_WRAP_WIDTH
            && bytes.get(end + 1).is_some_and(|&b| is_base64_byte(b))
            && is_wrap_line(&bytes[start..end])
        {
            return true;
        }
        start = end + 1;
    }
    false
}

/// Whether an environment variable of this name holds a secret.
pub fn is_secret_name(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    SECRET_NAME_PARTS.iter().any(|part| upper.contains(part))
}

/// The value of an `::add-mask::<value>` line (without its newline), unescaped as
/// GitHub Actions escapes command data (`%25`, `%0D`, `%0A`) and trimmed.
pub fn add_mask_value(line: &str) -> Option<String> {
    let value = line.trim_start().strip_prefix(ADD_MASK)?;
    let value = value
        .replace("%0D", "\r")
        .replace("%0A", "\n")
        .replace("%25", "%");
    Some(value.trim().to_string())
}

/// Replaces each range by [`REDACTED`], keeping the newlines inside it, so a redacted
/// block has as many lines as before.
pub fn apply(text: &str, ranges: &[Range<usize>]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for range in ranges {
        out.push_str(&text[at..range.start]);
        for (i, line) in text[range.clone()].split('\n').enumerate() {
            if i > 0 {
                out.push('\n');
            }
            if !line.is_empty() {
                out.push_str(REDACTED);
            }
        }
        at = range.end;
    }
    out.push_str(&text[at..]);
    out
}

/// Sorts ranges and merges those that overlap or touch.
pub fn merge(mut ranges: Vec<Range<usize>>) -> Vec<Range<usize>> {
    ranges.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<usize>> = Vec::with_capacity(ranges.len());
    for range in ranges {
        match merged.last_mut() {
            Some(last) if range.start <= last.end => last.end = last.end.max(range.end),
            _ => merged.push(range),
        }
    }
    merged
}

/// The base64 text of `secret` wherever it sits in a longer encoded input: for each
/// alignment (0, 1 or 2 bytes before it in its group of three), only the characters
/// fully determined by the secret's own bits.
fn base64_forms(secret: &[u8]) -> Vec<String> {
    let engines = [
        base64::engine::general_purpose::STANDARD,
        base64::engine::general_purpose::URL_SAFE,
    ];
    let mut forms = Vec::new();
    for engine in engines {
        for (pad, skip) in [(0, 0), (1, 2), (2, 3)] {
            let mut input = vec![0u8; pad];
            input.extend_from_slice(secret);
            let encoded = engine.encode(&input);
            let determined = input.len() * 8 / 6;
            forms.push(encoded[skip..determined].to_string());
        }
    }
    forms
}

/// Hex of the secret's bytes, lower and upper case (`xxd -p`, `od`, digests).
fn hex_forms(secret: &[u8]) -> [String; 2] {
    let lower: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    let upper = lower.to_ascii_uppercase();
    [lower, upper]
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "s3cr3t value/with+chars";

    fn redact(redactor: &Redactor, text: &str) -> String {
        let mut state = State::default();
        redactor
            .redact(text, &mut state)
            .unwrap_or_else(|| text.to_string())
    }

    fn assert_hidden(r: &Redactor, text: &str) {
        let out = redact(r, text);
        assert!(out.contains(REDACTED), "{text:?} -> {out:?}");
        assert!(!out.contains(SECRET), "{text:?} -> {out:?}");
    }

    /// Percent-encodes every byte of `value` except those in `keep` (and
    /// alphanumerics), as URL encoders with different reserved sets do.
    fn percent(value: &str, keep: &str, lower: bool) -> String {
        value
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || keep.as_bytes().contains(&b) {
                    (b as char).to_string()
                } else if lower {
                    format!("%{b:02x}")
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    }

    #[test]
    fn redacts_a_value_in_all_its_forms() {
        let r = Redactor::new([SECRET]);
        let b64 = base64::engine::general_purpose::STANDARD;
        let b64url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        for text in [
            SECRET.to_string(),
            format!("x {SECRET} y"),
            b64.encode(SECRET),
            b64.encode(format!("user:{SECRET}")),
            b64.encode(format!("u:{SECRET}\n")),
            b64.encode(format!("ab{SECRET}")),
            b64url.encode(format!("a{SECRET}")),
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(SECRET),
            hex_forms(SECRET.as_bytes())[0].clone(),
            format!("0x{}", hex_forms(SECRET.as_bytes())[1]),
            "s3cr3t+value/with+chars".to_string(),
        ] {
            assert_hidden(&r, &text);
        }
    }

    #[test]
    fn any_reserved_set_of_percent_encoding_is_redacted() {
        let r = Redactor::new([SECRET]);
        // Python quote (keeps /), encodeURIComponent, encodeURI (keeps / and +),
        // everything encoded, lower case hex; then `+` for spaces (quote_plus).
        for keep in ["-._~/", "-_.!~*'()", "-_.!~*'();/?:@&=+$,#", ""] {
            for lower in [false, true] {
                let encoded = percent(SECRET, keep, lower);
                assert_hidden(&r, &format!("url=https://h/?t={encoded}&x=1"));
                assert_hidden(&r, &encoded.replace("%20", "+"));
            }
        }
        assert_eq!(
            redact(&r, "s3cr3t%20value%2Fwith%2Bchars ok"),
            format!("{REDACTED} ok")
        );
    }

    #[test]
    fn json_escapes_are_redacted() {
        let secret = "pa\"ss/wörd\\x😀";
        let r = Redactor::new([secret]);
        let serde = serde_json::to_string(secret).unwrap();
        let ascii = r#""pa\"ss\/w\u00f6rd\\x\ud83d\ude00""#;
        for text in [
            serde.as_str(),
            ascii,
            r#"{"k": "pa\"ss/w\u00F6rd\\x\uD83D\uDE00"}"#,
        ] {
            let out = redact(&r, text);
            assert!(out.contains(REDACTED), "{text} -> {out}");
            assert!(!out.contains("ss"), "{text} -> {out}");
        }
    }

    #[test]
    fn colour_codes_inside_a_secret_are_redacted_with_them() {
        let r = Redactor::new([SECRET]);
        // As `grep --color=always value` prints it.
        let text = "id s3cr3t \x1b[01;31m\x1b[Kvalue\x1b[m\x1b[K/with+chars end\n";
        assert_eq!(redact(&r, text), format!("id {REDACTED} end\n"));
        // An OSC hyperlink and a charset switch, too.
        let text = "\x1b]8;;http://x\x07s3cr3t\x1b]8;;\x07 value\x1b(B/with+chars\n";
        assert_eq!(
            redact(&r, text),
            format!("\x1b]8;;http://x\x07{REDACTED}\n")
        );
        // A lone ESC is kept as it is.
        assert_eq!(redact(&r, "a\x1b b\n"), "a\x1b b\n");
    }

    #[test]
    fn base64_wrapped_at_any_column_is_redacted_on_both_lines() {
        let r = Redactor::new([SECRET]);
        let b64 = base64::engine::general_purpose::STANDARD;
        // Every position of the secret in the wrapped text, so every split of its
        // encoding across the break and every byte alignment.
        for width in [76, 64, 20] {
            for lead in 0..80 {
                let input = format!("{}{SECRET}{}", "x".repeat(lead), "y".repeat(40));
                let encoded = b64.encode(&input);
                let wrapped: String = encoded
                    .as_bytes()
                    .chunks(width)
                    .map(|c| format!("{}\n", std::str::from_utf8(c).unwrap()))
                    .collect();
                let out = redact(&r, &wrapped);
                assert_eq!(out.lines().count(), wrapped.lines().count());
                for (i, pair) in out.lines().collect::<Vec<_>>().windows(2).enumerate() {
                    for piece in [pair[0].to_string(), pair.concat()] {
                        let decoded = decode_lossy(&piece);
                        assert!(
                            !decoded.contains("cr3t val") && !decoded.contains("with+ch"),
                            "width {width} lead {lead} lines {i}: {piece:?} -> {decoded:?}"
                        );
                    }
                }
            }
        }
    }

    /// What a reader could get out of a stored line: every alignment of every
    /// base64 run in it, decoded.
    fn decode_lossy(line: &str) -> String {
        let b64 = base64::engine::general_purpose::STANDARD_NO_PAD;
        let mut out = String::new();
        for run in line.split(|c: char| !c.is_ascii_alphanumeric() && c != '+' && c != '/') {
            for skip in 0..4.min(run.len()) {
                let part = &run[skip..];
                let part = &part[..part.len() / 4 * 4];
                if let Ok(bytes) = b64.decode(part) {
                    out.push_str(&String::from_utf8_lossy(&bytes));
                    out.push('|');
                }
            }
        }
        out
    }

    #[test]
    fn wrapped_tail_keeps_back_a_run_of_base64_lines() {
        let r = Redactor::new([SECRET]);
        let line = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo";
        assert_eq!(r.wrapped_tail("hello world\n"), 0);
        let text = format!("hello world\n{line}\n");
        assert_eq!(r.wrapped_tail(&text), line.len() + 1);
        assert_eq!(Redactor::new(Vec::<String>::new()).wrapped_tail(&text), 0);
        let many = format!("{line}\n").repeat(100);
        let kept = r.wrapped_tail(&many);
        assert!(kept >= r.longest_literal() && kept < many.len(), "{kept}");
    }

    #[test]
    fn secrets_added_at_run_time_are_redacted_in_every_form() {
        let r = Redactor::new(Vec::<String>::new());
        assert_eq!(redact(&r, "x hunter2-added y"), "x hunter2-added y");
        assert_eq!(r.add("hunter2-added"), Ok(()));
        assert_eq!(r.add("abc"), Err(Refused::TooShort));
        assert_eq!(redact(&r, "x hunter2-added y"), format!("x {REDACTED} y"));
        assert_eq!(redact(&r, "hunter2%2Dadded"), REDACTED);
        assert_eq!(
            add_mask_value("  ::add-mask::multi%0Aline%25 \n").as_deref(),
            Some("multi\nline%")
        );
        assert_eq!(add_mask_value("echo ::add-mask::x"), None);
    }

    #[test]
    fn ignores_short_values_and_keeps_lines() {
        let r = Redactor::new(["abc", "longsecret"]);
        assert_eq!(redact(&r, "abc\nlongsecret\n"), "abc\n[REDACTED]\n");
    }

    #[test]
    fn plain_text_is_left_alone() {
        let r = Redactor::new([SECRET]);
        for text in [
            "a%20b %zz \\n \\u12 \x1b[31mred\x1b[0m + plus\n",
            "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo\nQUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo\n",
        ] {
            assert_eq!(redact(&r, text), text);
        }
    }

    #[test]
    fn knows_token_patterns() {
        let r = Redactor::new(Vec::<String>::new());
        let cases = [
            "ghp_0123456789abcdefghijABCDEFGHIJ012345",
            "AKIAIOSFODNN7EXAMPLE",
            "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
        ];
        for token in cases {
            assert_eq!(redact(&r, &format!("t={token};")), "t=[REDACTED];");
        }
        assert_eq!(
            redact(&r, "Authorization: Bearer abcdefgh12345678"),
            "Authorization: Bearer [REDACTED]"
        );
    }

    #[test]
    fn redacts_private_key_blocks_across_blocks() {
        let r = Redactor::new(Vec::<String>::new());
        let mut state = State::default();
        let first = r
            .redact(
                "before\n-----BEGIN RSA PRIVATE KEY-----\nMIIE\n",
                &mut state,
            )
            .unwrap();
        assert_eq!(first, "before\n[REDACTED]\n[REDACTED]\n");
        let second = r
            .redact("abcd\n-----END RSA PRIVATE KEY-----\nafter\n", &mut state)
            .unwrap();
        assert_eq!(second, "[REDACTED]\n[REDACTED]\nafter\n");
    }

    #[test]
    fn secret_names() {
        assert!(is_secret_name("GITHUB_TOKEN"));
        assert!(is_secret_name("db_password"));
        assert!(is_secret_name("AWS_SECRET_ACCESS_KEY"));
        assert!(!is_secret_name("HOME"));
    }
}

/// Redaction throughput on typical output (a measurement, not an assertion): run with
/// `cargo test --release --lib redact::throughput -- --ignored --nocapture`.
#[cfg(test)]
mod throughput {
    use super::*;

    fn corpus(kind: &str) -> String {
        let mut text = String::new();
        let mut i = 0u64;
        while text.len() < 16 << 20 {
            i += 1;
            let line = match kind {
                "plain" => format!("   Compiling crate-{i} v0.{i}.3 (/build/src/crate-{i}) in {i}ms, ok\n"),
                "ansi" => format!("\x1b[1m\x1b[32m   Compiling\x1b[0m crate-{i} v0.{i}.3 (\x1b[2m/build/{i}\x1b[0m)\n"),
                "url" => format!("GET https://example.com/a%20b/{i}?q=x%2Fy&r={i}+z 200 {i}ms\n"),
                _ => {
                    let bytes: Vec<u8> = (0..57).map(|k| ((i * 31 + k * 7) % 251) as u8).collect();
                    format!("{}\n", base64::engine::general_purpose::STANDARD.encode(bytes))
                }
            };
            text.push_str(&line);
        }
        text
    }

    #[test]
    #[ignore]
    fn measure() {
        let r = Redactor::new([
            "s3cr3t value/with+chars",
            "hunter2-but-longer",
            "AnotherSecret_12345",
            "db-password-0000",
        ]);
        for kind in ["plain", "ansi", "url", "base64"] {
            let text = corpus(kind);
            let chunks: Vec<&str> = {
                let mut out = Vec::new();
                let mut rest = text.as_str();
                while !rest.is_empty() {
                    let at = rest.len().min(128 * 1024);
                    let end = rest[..at].rfind('\n').map_or(rest.len(), |i| i + 1);
                    out.push(&rest[..end]);
                    rest = &rest[end..];
                }
                out
            };
            let mut best = f64::MAX;
            for _ in 0..3 {
                let started = std::time::Instant::now();
                let mut found = 0;
                for chunk in &chunks {
                    let mut state = State::default();
                    found += r.ranges(chunk, &mut state).len();
                }
                assert_eq!(found, 0);
                best = best.min(started.elapsed().as_secs_f64());
            }
            println!(
                "{kind:>7}: {:.0} MiB/s",
                text.len() as f64 / best / (1 << 20) as f64
            );
        }
    }
}
