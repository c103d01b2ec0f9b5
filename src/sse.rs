//! Server-Sent Events framing: events become frames once, in batches that every
//! subscriber shares.
//!
//! A [`Batch`] holds the frames of consecutive seqs in one [`Bytes`] buffer plus the
//! offset where each frame starts, so a subscriber that already has part of a batch
//! (after a backfill) takes the rest with a cheap slice instead of re-encoding.
//!
//! An event's `id:` names its place in the job's history, not only its seq:
//! `<seq>-<tag>`, the tag being the last 8 hex digits of the event's id (see
//! [`EventId`]). EventSource echoes it as `Last-Event-ID`, so a client that comes back
//! after a failover rewrote that seq is told (`reset`) rather than continued.

use std::fmt::Write as _;

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;
use uuid::Uuid;

use crate::model::{End, Event};

/// The keep-alive comment, sent when a stream has been quiet for a while.
pub const KEEP_ALIVE: &[u8] = b": keep-alive\n\n";

impl End {
    /// `event: end` with `{"status": ..., "lastSeq": ...}`.
    pub fn frame(&self) -> Bytes {
        let data = serde_json::json!({ "status": self.status, "lastSeq": self.last_seq });
        Bytes::from(format!("event: end\ndata: {data}\n\n"))
    }
}

/// Where one frame of a [`Batch`] starts, and what it names (16 bytes, as a bare
/// `(i64, u32)` takes with its padding).
#[derive(Debug, Clone, Copy)]
struct FrameAt {
    seq: i64,
    start: u32,
    tag: u32,
}

/// An SSE `id:` as the gateway writes it, `<seq>-<tag>`, or as a client may send it
/// back: a bare `<seq>` is accepted too (older clients, hand-made cursors), and then
/// names no history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventId {
    pub seq: i64,
    pub tag: Option<u32>,
}

/// The history tag of an event: the last 32 bits of its id, i.e. the last 8 hex digits
/// of the uuid as text. Random bits in every id the gateway, the worker or the
/// original system makes (UUIDv7s end with 38 random bits, UUIDv4s are random), so
/// two histories that gave the same seq to different events tell apart but for a
/// chance of 1 in 2^32, and a worker re-sending the same event (same id) after a
/// failover is the same history.
pub fn history_tag(id: Uuid) -> u32 {
    let b = id.as_bytes();
    u32::from_be_bytes([b[12], b[13], b[14], b[15]])
}

impl EventId {
    /// `7`, or `7-0a1b2c3d` (exactly 8 hex digits after the dash); `None` otherwise,
    /// and for negative seqs.
    pub fn parse(text: &str) -> Option<EventId> {
        let (seq, tag) = match text.split_once('-') {
            Some((seq, tag)) => {
                if tag.len() != 8 || !tag.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return None;
                }
                (seq, Some(u32::from_str_radix(tag, 16).ok()?))
            }
            None => (text, None),
        };
        if !seq.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let seq = seq.parse::<i64>().ok()?;
        // Seq 0 is "before the first event": there is nothing to name.
        Some(EventId {
            seq,
            tag: tag.filter(|_| seq > 0),
        })
    }
}

impl std::fmt::Display for EventId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.tag {
            Some(tag) => write!(f, "{}-{tag:08x}", self.seq),
            None => write!(f, "{}", self.seq),
        }
    }
}

/// The frames of consecutive events of one job, encoded once.
#[derive(Debug)]
pub struct Batch {
    bytes: Bytes,
    /// Each frame's seq, start offset and history tag, ascending by seq. Seqs are
    /// consecutive except where events were deleted (retention), so lookups search.
    frames: Vec<FrameAt>,
    /// Set when the batch ends with the job's final status event.
    end: Option<End>,
}

impl Batch {
    /// Encodes events read with `ORDER BY seq`. `finished` says the read that produced
    /// them reached the end of the table, so a trailing terminal status event ends the
    /// job.
    ///
    /// # Panics
    /// If `events` is empty.
    pub fn encode(events: &[Event], finished: bool) -> Batch {
        Batch::encode_within(events, finished, usize::MAX)
    }

    /// [`Batch::encode`], stopping after the frame that reaches `max_bytes` (a batch
    /// always holds one frame): the batch may hold fewer events than given, and then
    /// `finished` does not apply (the events left out come first).
    ///
    /// # Panics
    /// If `events` is empty.
    pub fn encode_within(events: &[Event], finished: bool, max_bytes: usize) -> Batch {
        assert!(!events.is_empty(), "a batch is never empty");
        let mut buf = BytesMut::with_capacity(events.len().min(64) * 256);
        let mut frames = Vec::with_capacity(events.len());
        for event in events {
            if buf.len() >= max_bytes {
                break;
            }
            frames.push(FrameAt {
                seq: event.seq,
                start: buf.len() as u32,
                tag: history_tag(event.id),
            });
            write_event(&mut buf, event);
        }
        let finished = finished && frames.len() == events.len();
        let end = match events[frames.len() - 1]
            .status()
            .map(|s| (frames[frames.len() - 1].seq, s))
        {
            Some((seq, status)) if finished && status.is_terminal() => Some(End {
                status,
                last_seq: seq,
            }),
            _ => None,
        };
        Batch {
            bytes: buf.freeze(),
            frames,
            end,
        }
    }

    pub fn first_seq(&self) -> i64 {
        self.frames[0].seq
    }

    pub fn last_seq(&self) -> i64 {
        self.frames[self.frames.len() - 1].seq
    }

    /// The history tag of the event at `seq`, if this batch holds it.
    pub fn tag_at(&self, seq: i64) -> Option<u32> {
        let i = self.frames.binary_search_by_key(&seq, |f| f.seq).ok()?;
        Some(self.frames[i].tag)
    }

    /// The job's end, when this batch carries its final status event.
    pub fn end(&self) -> Option<&End> {
        self.end.as_ref()
    }

    /// Number of bytes of all frames.
    pub fn len_bytes(&self) -> usize {
        self.bytes.len()
    }

    /// Number of events.
    pub fn len_events(&self) -> usize {
        self.frames.len()
    }

    /// The frames of events with seq > `after`, sharing this batch's buffer.
    pub fn after(&self, after: i64) -> Option<Bytes> {
        if after >= self.last_seq() {
            return None;
        }
        if after < self.first_seq() {
            return Some(self.bytes.clone());
        }
        // The first frame with seq > after.
        let i = self.frames.partition_point(|f| f.seq <= after);
        Some(self.bytes.slice(self.frames[i].start as usize..))
    }
}

/// `id: <seq>-<tag>`, `event: queue_event`, `data: <Event JSON>`. The JSON is on one
/// line: serde escapes newlines in strings and PostgreSQL prints jsonb on one line.
fn write_event(buf: &mut BytesMut, event: &Event) {
    let id = EventId {
        seq: event.seq,
        tag: Some(history_tag(event.id)),
    };
    let mut text = String::with_capacity(32);
    let _ = write!(text, "id: {id}\nevent: queue_event\ndata: ");
    buf.put_slice(text.as_bytes());
    write_json(buf, event);
    buf.put_slice(b"\n\n");
}

/// JSON on one line, with U+2028, U+2029 and U+0085 escaped (`\u2028` ...): clients
/// that split lines on them would otherwise cut a `data:` line. These characters only
/// occur inside JSON strings, where the escape means the same character.
fn write_json(buf: &mut BytesMut, value: &impl Serialize) {
    let json = serde_json::to_vec(value).expect("json always serializes");
    let mut rest = &json[..];
    while let Some(i) = rest
        .windows(2)
        .position(|w| w == [0xE2, 0x80] || w == [0xC2, 0x85])
    {
        let escape: Option<&[u8]> = match &rest[i..] {
            [0xE2, 0x80, 0xA8, ..] => Some(b"\\u2028"),
            [0xE2, 0x80, 0xA9, ..] => Some(b"\\u2029"),
            [0xC2, 0x85, ..] => Some(b"\\u0085"),
            _ => None,
        };
        let taken = match escape {
            Some(escape) => {
                buf.put_slice(&rest[..i]);
                buf.put_slice(escape);
                i + if rest[i] == 0xC2 { 2 } else { 3 }
            }
            None => {
                buf.put_slice(&rest[..i + 2]);
                i + 2
            }
        };
        rest = &rest[taken..];
    }
    buf.put_slice(rest);
}

/// `retry: <ms>`: how long a browser waits before reconnecting.
pub fn retry_frame(ms: u64) -> Bytes {
    Bytes::from(format!("retry: {ms}\n\n"))
}

/// A named event with a JSON payload (used for `job_status`).
pub fn named_frame(event: &str, data: &impl Serialize) -> Bytes {
    let mut buf = BytesMut::with_capacity(256);
    buf.put_slice(b"event: ");
    buf.put_slice(event.as_bytes());
    buf.put_slice(b"\ndata: ");
    write_json(&mut buf, data);
    buf.put_slice(b"\n\n");
    buf.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{JobStatus, Level};
    use serde_json::value::RawValue;

    fn event(seq: i64, message: &str, payload: &str) -> Event {
        Event {
            id: Uuid::from_u128(0x0a1b_2c3d),
            job_id: Uuid::nil(),
            seq,
            level: Level::Info,
            line: seq,
            message: message.into(),
            payload: RawValue::from_string(payload.into()).unwrap(),
            created_at: "2026-01-01T00:00:00.000000Z".into(),
            created_us: 0,
        }
    }

    #[test]
    fn frames_are_exact_and_newlines_stay_in_json() {
        let batch = Batch::encode(&[event(7, "a\nb", r#"{"kind": "log"}"#)], true);
        let text = String::from_utf8(batch.after(0).unwrap().to_vec()).unwrap();
        assert_eq!(
            text,
            "id: 7-0a1b2c3d\nevent: queue_event\ndata: {\"id\":\"00000000-0000-0000-0000-00000a1b2c3d\",\
             \"jobId\":\"00000000-0000-0000-0000-000000000000\",\"seq\":7,\"line\":7,\"level\":\"info\",\
             \"message\":\"a\\nb\",\"payload\":{\"kind\": \"log\"},\
             \"createdAt\":\"2026-01-01T00:00:00.000000Z\"}\n\n"
        );
    }

    #[test]
    fn line_separators_are_escaped() {
        let batch = Batch::encode(
            &[event(1, "a\u{2028}b\u{2029}c\u{85}d\u{2027}", "{}")],
            true,
        );
        let bytes = batch.after(0).unwrap();
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(
            text.contains("\"message\":\"a\\u2028b\\u2029c\\u0085d\u{2027}\""),
            "{text}"
        );
        let data = text.lines().nth(2).unwrap().strip_prefix("data: ").unwrap();
        let back: serde_json::Value = serde_json::from_str(data).unwrap();
        assert_eq!(back["message"], "a\u{2028}b\u{2029}c\u{85}d\u{2027}");
        let named = named_frame("x", &serde_json::json!({"m": "\u{2028}"}));
        assert_eq!(&named[..], b"event: x\ndata: {\"m\":\"\\u2028\"}\n\n");
    }

    #[test]
    fn ids_name_the_history_and_parse_back() {
        let id = Uuid::parse_str("0190a3b2-0000-7000-8000-00000a1b2c3d").unwrap();
        assert_eq!(history_tag(id), 0x0a1b_2c3d);
        let written = EventId {
            seq: 42,
            tag: Some(history_tag(id)),
        };
        // The tag is the uuid's last 8 hex digits, as its text shows them.
        assert_eq!(written.to_string(), "42-0a1b2c3d");
        assert!(id.to_string().ends_with("0a1b2c3d"));
        assert_eq!(EventId::parse("42-0a1b2c3d"), Some(written));
        assert_eq!(EventId::parse("42-0A1B2C3D"), Some(written));
        let bare = EventId { seq: 42, tag: None };
        assert_eq!(EventId::parse("42"), Some(bare));
        assert_eq!(bare.to_string(), "42");
        // Seq 0 names nothing; bad shapes are refused.
        assert_eq!(EventId::parse("0-0a1b2c3d").unwrap().tag, None);
        for bad in [
            "",
            "-3",
            "+3",
            "x",
            "4-",
            "4-0a1b2c3",
            "4-0a1b2c3d0",
            "4-0a1b2c3g",
            "4.5",
        ] {
            assert_eq!(EventId::parse(bad), None, "{bad:?}");
        }
        let batch = Batch::encode(&[event(3, "x", "{}"), event(5, "y", "{}")], false);
        assert_eq!(batch.tag_at(5), Some(0x0a1b_2c3d));
        assert_eq!(batch.tag_at(4), None);
    }

    #[test]
    fn after_slices_the_rest() {
        let events: Vec<_> = (3..=5).map(|s| event(s, "x", "{}")).collect();
        let batch = Batch::encode(&events, false);
        let all = batch.after(2).unwrap();
        let rest = String::from_utf8(batch.after(3).unwrap().to_vec()).unwrap();
        assert!(rest.starts_with("id: 4-0a1b2c3d\n"));
        assert!(all.len() > rest.len());
        assert!(batch.after(5).is_none());
        assert_eq!(batch.last_seq(), 5);
    }

    #[test]
    fn a_batch_stops_at_its_byte_budget_but_holds_one_frame() {
        let status = r#"{"kind": "status", "status": "failed"}"#;
        let mut events: Vec<_> = (1..=9).map(|s| event(s, &"x".repeat(100), "{}")).collect();
        events.push(event(10, "s", status));
        let batch = Batch::encode_within(&events, true, 500);
        assert!(batch.len_events() < events.len(), "{}", batch.len_events());
        assert!(batch.len_bytes() >= 500);
        assert!(batch.end().is_none(), "the end was left out");
        let one = Batch::encode_within(&events[9..], true, 1);
        assert_eq!(one.len_events(), 1);
        assert!(one.end().is_some());
        assert_eq!(
            Batch::encode_within(&events, true, usize::MAX).len_events(),
            10
        );
    }

    #[test]
    fn gaps_left_by_retention_are_tolerated() {
        let batch = Batch::encode(&[event(3, "a", "{}"), event(7, "b", "{}")], false);
        let rest = String::from_utf8(batch.after(4).unwrap().to_vec()).unwrap();
        assert!(rest.starts_with("id: 7-0a1b2c3d\n"));
        assert_eq!((batch.first_seq(), batch.last_seq()), (3, 7));
    }

    #[test]
    fn end_only_when_finished_with_terminal_status() {
        let status = r#"{"kind": "status", "status": "failed"}"#;
        let batch = Batch::encode(&[event(1, "x", "{}"), event(2, "s", status)], true);
        assert_eq!(
            batch.end(),
            Some(&End {
                status: JobStatus::Failed,
                last_seq: 2
            })
        );
        let batch = Batch::encode(&[event(2, "s", status)], false);
        assert!(batch.end().is_none());
        let running = r#"{"kind": "status", "status": "running"}"#;
        assert!(Batch::encode(&[event(2, "s", running)], true)
            .end()
            .is_none());
    }
}
