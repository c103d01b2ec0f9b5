//! Secrets out of the output before it leaves the process.
//!
//! A [`Redactor`] knows literal secrets (environment variables named like secrets,
//! `--redact` values, the database password) in every form they are likely to be
//! printed in: as is, URL-encoded, and base64 (standard and URL-safe alphabets, at each
//! of the three byte alignments a secret can have inside a longer encoded text). It
//! also knows token patterns that need no configuration (GitHub, AWS access keys, JWTs,
//! `Bearer` credentials, Slack tokens) and private key blocks, which span lines.
//!
//! It works on text made of whole lines, so a secret is never cut by a read boundary;
//! no match crosses a newline, so a block of many lines is redacted in one pass. When a
//! line must be emitted before its end (too long, or unfinished for too long), the
//! caller keeps the last [`Redactor::overlap`] bytes back, see `pipe.rs`.

use std::ops::Range;

use aho_corasick::{AhoCorasick, MatchKind};
use base64::Engine;
use regex::Regex;

/// What a secret becomes.
pub const REDACTED: &str = "[REDACTED]";

/// Values shorter than this (in characters) are not treated as secrets: they would
/// match everywhere and hide ordinary output.
pub const MIN_SECRET_CHARS: usize = 6;

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

/// Finds secrets in text. Immutable and shared by both pipes; what a pipe must carry
/// from one block to the next (inside a private key?) is its [`State`].
#[derive(Debug)]
pub struct Redactor {
    literals: Option<AhoCorasick>,
    longest_literal: usize,
    tokens: Regex,
    fences: Regex,
}

/// What one stream carries from block to block.
#[derive(Debug, Default, Clone, Copy)]
pub struct State {
    in_private_key: bool,
}

impl Redactor {
    /// A redactor for these secret values (short ones are ignored) and the token
    /// patterns.
    pub fn new<S: AsRef<str>>(secrets: impl IntoIterator<Item = S>) -> Redactor {
        let mut forms: Vec<String> = secrets
            .into_iter()
            .flat_map(|s| secret_forms(s.as_ref()))
            .collect();
        forms.sort();
        forms.dedup();
        let longest_literal = forms.iter().map(String::len).max().unwrap_or(0);
        let literals = (!forms.is_empty()).then(|| {
            AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostLongest)
                .build(&forms)
                .expect("literal patterns always build")
        });
        Redactor {
            literals,
            longest_literal,
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

    /// How many bytes at the end of an unfinished line must be held back so that a
    /// secret that continues in the next read is still seen whole.
    pub fn overlap(&self) -> usize {
        self.longest_literal.max(TOKEN_OVERLAP)
    }

    /// The length of the longest literal secret form.
    pub fn longest_literal(&self) -> usize {
        self.longest_literal
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
        if let Some(literals) = &self.literals {
            ranges.extend(literals.find_iter(text).map(|m| m.range()));
        }
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

/// Whether an environment variable of this name holds a secret.
pub fn is_secret_name(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    SECRET_NAME_PARTS.iter().any(|part| upper.contains(part))
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

fn merge(mut ranges: Vec<Range<usize>>) -> Vec<Range<usize>> {
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

/// Every form of a secret to look for. A value with several lines is also looked for
/// line by line (output is matched one line at a time).
fn secret_forms(secret: &str) -> Vec<String> {
    let mut forms = Vec::new();
    let mut add_text_forms = |value: &str| {
        if value.chars().count() < MIN_SECRET_CHARS {
            return;
        }
        forms.push(value.to_string());
        forms.extend(url_encoded(value));
    };
    let trimmed = secret.trim_matches(['\r', '\n']);
    if !trimmed.contains('\n') {
        add_text_forms(trimmed);
    }
    for line in trimmed.lines() {
        add_text_forms(line.trim_end_matches('\r'));
    }
    if trimmed.chars().count() >= MIN_SECRET_CHARS {
        forms.extend(url_encoded(trimmed));
        forms.extend(base64_forms(trimmed.as_bytes()));
    }
    forms.retain(|f| f.chars().count() >= MIN_SECRET_CHARS && !f.contains('\n'));
    forms
}

/// Percent-encoded forms (upper and lower case hex, and `+` for spaces as in forms).
fn url_encoded(value: &str) -> Vec<String> {
    let mut upper = String::new();
    for &b in value.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            upper.push(b as char);
        } else {
            upper.push_str(&format!("%{b:02X}"));
        }
    }
    if upper == value {
        return Vec::new();
    }
    let lower = percent_lowercase(&upper);
    let plus_upper = upper.replace("%20", "+");
    let plus_lower = lower.replace("%20", "+");
    vec![upper, lower, plus_upper, plus_lower]
}

fn percent_lowercase(encoded: &str) -> String {
    let mut out = String::with_capacity(encoded.len());
    let mut hex_left = 0;
    for c in encoded.chars() {
        if c == '%' {
            hex_left = 2;
            out.push(c);
        } else if hex_left > 0 {
            hex_left -= 1;
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    fn redact(redactor: &Redactor, text: &str) -> String {
        let mut state = State::default();
        redactor
            .redact(text, &mut state)
            .unwrap_or_else(|| text.to_string())
    }

    #[test]
    fn redacts_a_value_in_all_its_forms() {
        let secret = "s3cr3t value/with+chars";
        let r = Redactor::new([secret]);
        let b64 = base64::engine::general_purpose::STANDARD;
        for text in [
            secret.to_string(),
            format!("x {secret} y"),
            b64.encode(secret),
            b64.encode(format!("user:{secret}")),
            b64.encode(format!("u:{secret}\n")),
            b64.encode(format!("ab{secret}")),
            base64::engine::general_purpose::URL_SAFE.encode(format!("a{secret}")),
            "s3cr3t%20value%2Fwith%2Bchars".to_string(),
            "s3cr3t+value%2fwith%2bchars".to_string(),
        ] {
            let out = redact(&r, &text);
            assert!(out.contains(REDACTED), "{text} -> {out}");
            assert!(!out.contains(secret), "{text} -> {out}");
        }
    }

    #[test]
    fn ignores_short_values_and_keeps_lines() {
        let r = Redactor::new(["abc", "longsecret"]);
        assert_eq!(redact(&r, "abc\nlongsecret\n"), "abc\n[REDACTED]\n");
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
