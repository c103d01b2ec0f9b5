//! Query strings and cursors, parsed into typed structs before any handler runs.
//!
//! The query string is decoded by `serde_urlencoded` (`%XX` and `+`; invalid escapes
//! kept as they are; a repeated name keeps its last value). Each route then takes the
//! names it knows into a struct of typed values; names it does not know are ignored,
//! as the original system did.

use std::collections::HashMap;

use hyper::Request;
use uuid::Uuid;

use super::error::{ApiError, Result};
use crate::config::DEFAULT_PAGE;
use crate::model::{JobStatus, Level};
use crate::sse::EventId;

/// Largest `limit` of the job list.
const MAX_JOBS: i64 = 500;
/// Default `limit` of the job list.
const DEFAULT_JOBS: i64 = 50;

/// The decoded query string of a request, by name.
struct Params(HashMap<String, String>);

impl Params {
    fn of<B>(req: &Request<B>) -> Params {
        let query = req.uri().query().unwrap_or_default();
        // Decoding into strings cannot fail: bad escapes and bad UTF-8 are kept or
        // replaced, not refused.
        Params(serde_urlencoded::from_str(query).unwrap_or_default())
    }

    /// The value of `name`, trimmed; `None` when absent or empty.
    fn text(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(|v| v.trim()).filter(|v| !v.is_empty())
    }

    /// A non-negative integer, `None` when absent or empty.
    fn int(&self, name: &str) -> Result<Option<i64>> {
        self.text(name).map(|v| non_negative(name, v)).transpose()
    }

    /// `limit`, `default` when absent or empty: any value outside `1..=max` (negative,
    /// zero, too large, not a number) is `invalid_limit`.
    fn limit(&self, default: i64, max: i64) -> Result<i64> {
        let Some(text) = self.text("limit") else {
            return Ok(default);
        };
        match text.parse::<i64>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(ApiError::bad_request(
                "invalid_limit",
                format!("limit must be an integer in 1..={max}"),
            )),
        }
    }
}

fn non_negative(name: &str, text: &str) -> Result<i64> {
    match text.parse::<i64>() {
        Ok(n) if n >= 0 => Ok(n),
        _ => Err(ApiError::bad_request(
            "invalid_cursor",
            format!("{name} must be a non-negative integer"),
        )),
    }
}

/// `GET /api/queue/jobs?limit=&status=`.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct JobsQuery {
    pub limit: i64,
    pub status: Option<JobStatus>,
}

impl JobsQuery {
    pub fn parse<B>(req: &Request<B>) -> Result<JobsQuery> {
        let q = Params::of(req);
        let limit = q.limit(DEFAULT_JOBS, MAX_JOBS)?;
        // Not trimmed: a status is a name, not a number.
        let status = match q.0.get("status").filter(|s| !s.is_empty()) {
            None => None,
            Some(text) => Some(
                text.parse::<JobStatus>()
                    .map_err(|_| ApiError::bad_request("invalid_status", "unknown job status"))?,
            ),
        };
        Ok(JobsQuery { limit, status })
    }
}

/// The original system's cursor: an event (`afterEventId`, `beforeEventId`) and its
/// `createdAt` (`after`, `before`; ISO 8601, checked by PostgreSQL when it is used).
/// Either part may be missing; the event, when it is this job's, wins.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Original {
    pub event: Option<Uuid>,
    pub time: Option<String>,
}

impl Original {
    fn parse(q: &Params, time: &str, event: &str) -> Result<Original> {
        let event_id = q
            .text(event)
            .map(|v| {
                Uuid::parse_str(v).map_err(|_| {
                    ApiError::bad_request("invalid_cursor", format!("{event} must be a uuid"))
                })
            })
            .transpose()?;
        Ok(Original {
            event: event_id,
            time: q.text(time).map(str::to_string),
        })
    }

    pub fn is_set(&self) -> bool {
        self.event.is_some() || self.time.is_some()
    }
}

/// `GET /api/queue/jobs/{id}/events?afterSeq=&beforeSeq=&limit=&sort=`, and the original
/// system's cursors `after` + `afterEventId`, `before` + `beforeEventId`.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct PageQuery {
    pub limit: i64,
    pub after_seq: Option<i64>,
    pub before_seq: Option<i64>,
    pub after: Original,
    pub before: Original,
    /// `sort=desc`: the newest `limit` events of the range, newest first.
    pub descending: bool,
    /// `line=N`: the page starts at the event holding line N.
    pub line: Option<i64>,
}

impl PageQuery {
    /// `max_page`: the largest `limit` this gateway serves.
    pub fn parse<B>(req: &Request<B>, max_page: i64) -> Result<PageQuery> {
        let q = Params::of(req);
        let limit = q.limit(DEFAULT_PAGE, max_page)?;
        let descending = match q.text("sort") {
            None | Some("asc") => false,
            Some("desc") => true,
            Some(_) => {
                return Err(ApiError::bad_request(
                    "invalid_sort",
                    "sort must be asc or desc",
                ))
            }
        };
        Ok(PageQuery {
            limit,
            after_seq: q.int("afterSeq")?,
            before_seq: q.int("beforeSeq")?,
            after: Original::parse(&q, "after", "afterEventId")?,
            before: Original::parse(&q, "before", "beforeEventId")?,
            descending,
            line: q.int("line")?,
        })
    }
}

/// Where an event stream resumes.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum StreamCursor {
    /// After this seq (`Last-Event-ID`, `?afterSeq=`, or 0: the start), with the tag
    /// of the event the client holds there when it sent one.
    Seq(EventId),
    /// After the original system's cursor, `?after=` + `afterEventId=`.
    Original(Original),
}

/// Where an event stream resumes: `Last-Event-ID`, else `?afterSeq=`, else `?after=` +
/// `afterEventId=`, else the start.
pub(super) fn stream_cursor<B>(req: &Request<B>) -> Result<StreamCursor> {
    let q = Params::of(req);
    if let Some(id) = last_event_id(req)? {
        return Ok(StreamCursor::Seq(id));
    }
    // The stream's `afterSeq` also takes an `id:` as sent (the dashboard's new
    // EventSource names the history it holds, as a browser's own reconnect does).
    if let Some(text) = q.text("afterSeq") {
        return match EventId::parse(text) {
            Some(id) => Ok(StreamCursor::Seq(id)),
            None => Err(ApiError::bad_request(
                "invalid_cursor",
                "afterSeq must be a non-negative integer, or an event's id: as sent",
            )),
        };
    }
    let original = Original::parse(&q, "after", "afterEventId")?;
    if original.is_set() {
        return Ok(StreamCursor::Original(original));
    }
    Ok(StreamCursor::Seq(EventId { seq: 0, tag: None }))
}

/// `Last-Event-ID`: what the stream sent as `id:` (`<seq>-<tag>`), or a bare seq.
fn last_event_id<B>(req: &Request<B>) -> Result<Option<EventId>> {
    if let Some(value) = req.headers().get("last-event-id") {
        let text = value.to_str().unwrap_or("\u{FFFD}").trim();
        if !text.is_empty() {
            return match EventId::parse(text) {
                Some(id) => Ok(Some(id)),
                None => Err(ApiError::bad_request(
                    "invalid_last_event_id",
                    "Last-Event-ID must be an id: the stream sent (<seq>-<8 hex digits>) \
                     or a non-negative integer",
                )),
            };
        }
    }
    Ok(None)
}

/// A job id from the path.
pub(super) fn job_id(text: &str) -> Result<Uuid> {
    Uuid::parse_str(text)
        .map_err(|_| ApiError::bad_request("invalid_job_id", "job id must be a uuid"))
}

/// `level=info|warn|error` of the events page: only the events of that level, in the
/// page's range (the panel's "first error" is `?level=error&limit=1`).
pub(super) fn level_filter<B>(req: &Request<B>) -> Result<Option<Level>> {
    Params::of(req)
        .text("level")
        .map(|text| {
            text.parse::<Level>().map_err(|_| {
                ApiError::bad_request("invalid_level", "level must be info, warn or error")
            })
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(query: &str) -> Request<()> {
        Request::builder()
            .uri(format!("/x?{query}"))
            .body(())
            .unwrap()
    }

    #[test]
    fn decodes_like_a_form() {
        let q = Params::of(&req(
            "a=a%20b+c&b=100%&c=%zz&d=2026-01-01T00%3A00%3A00Z&e&a2=",
        ));
        assert_eq!(q.text("a"), Some("a b c"));
        assert_eq!(q.text("b"), Some("100%"));
        assert_eq!(q.text("c"), Some("%zz"));
        assert_eq!(q.text("d"), Some("2026-01-01T00:00:00Z"));
        assert_eq!(q.text("e"), None);
        assert_eq!(q.text("a2"), None);
        // A repeated name keeps its last value.
        assert_eq!(
            Params::of(&req("limit=1&limit=7")).int("limit").unwrap(),
            Some(7)
        );
    }

    #[test]
    fn pages() {
        let page =
            PageQuery::parse(&req("afterSeq=%203&limit=10&after=&afterEventId="), 1000).unwrap();
        assert_eq!(
            page,
            PageQuery {
                limit: 10,
                after_seq: Some(3),
                before_seq: None,
                after: Original::default(),
                before: Original::default(),
                descending: false,
                line: None,
            }
        );
        let id = Uuid::now_v7();
        let page = PageQuery::parse(
            &req(&format!(
                "before=2026-01-01T00:00:00Z&beforeEventId={id}&sort=desc"
            )),
            1000,
        )
        .unwrap();
        assert_eq!(
            page.before,
            Original {
                event: Some(id),
                time: Some("2026-01-01T00:00:00Z".into())
            }
        );
        assert!(page.descending);
        assert_eq!(
            PageQuery::parse(&req(""), 1000).unwrap().limit,
            DEFAULT_PAGE
        );
        for (query, status) in [
            ("limit=0", "invalid_limit"),
            ("limit=1001", "invalid_limit"),
            ("limit=x", "invalid_limit"),
            ("limit=-1", "invalid_limit"),
            ("limit=99999999999999999999", "invalid_limit"),
            ("afterSeq=-1", "invalid_cursor"),
            ("beforeSeq=1.5", "invalid_cursor"),
            ("afterEventId=nope", "invalid_cursor"),
            ("beforeEventId=nope", "invalid_cursor"),
            ("sort=up", "invalid_sort"),
        ] {
            let e = PageQuery::parse(&req(query), 1000).unwrap_err();
            assert!(e.to_string().contains(status), "{query}: {e}");
        }
    }

    #[test]
    fn stream_cursors_in_order() {
        let id = Uuid::now_v7();
        let original = format!("after=2026-01-01T00:00:00Z&afterEventId={id}");
        let with = |query: &str, last: Option<&str>| {
            let mut b = Request::builder().uri(format!("/x?{query}"));
            if let Some(last) = last {
                b = b.header("last-event-id", last);
            }
            stream_cursor(&b.body(()).unwrap()).unwrap()
        };
        let seq = |seq, tag| StreamCursor::Seq(EventId { seq, tag });
        let both = format!("afterSeq=4&{original}");
        assert_eq!(with(&both, Some("9")), seq(9, None));
        assert_eq!(with(&both, Some("9-0000abcd")), seq(9, Some(0xabcd)));
        assert_eq!(with(&both, None), seq(4, None));
        assert_eq!(with("afterSeq=4-0000abcd", None), seq(4, Some(0xabcd)));
        assert_eq!(
            with(&original, None),
            StreamCursor::Original(Original {
                event: Some(id),
                time: Some("2026-01-01T00:00:00Z".into())
            })
        );
        assert_eq!(with("", None), seq(0, None));
    }

    #[test]
    fn job_lists() {
        assert_eq!(
            JobsQuery::parse(&req("status=dead_letter")).unwrap(),
            JobsQuery {
                limit: DEFAULT_JOBS,
                status: Some(JobStatus::DeadLetter)
            }
        );
        assert!(JobsQuery::parse(&req("status=done")).is_err());
        assert!(JobsQuery::parse(&req("limit=501")).is_err());
        let e = JobsQuery::parse(&req("limit=-1")).unwrap_err();
        assert!(e.to_string().contains("invalid_limit"), "{e}");
    }

    #[test]
    fn level_filters() {
        assert_eq!(
            level_filter(&req("level=error")).unwrap(),
            Some(Level::Error)
        );
        assert_eq!(level_filter(&req("level=")).unwrap(), None);
        assert_eq!(level_filter(&req("")).unwrap(), None);
        let e = level_filter(&req("level=fatal")).unwrap_err();
        assert!(e.to_string().contains("invalid_level"), "{e}");
    }
}
