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
use crate::model::JobStatus;

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
        let limit = q.int("limit")?.unwrap_or(DEFAULT_JOBS);
        if !(1..=MAX_JOBS).contains(&limit) {
            return Err(ApiError::bad_request(
                "invalid_limit",
                format!("limit must be 1..{MAX_JOBS}"),
            ));
        }
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

/// `GET /api/queue/jobs/{id}/events?afterSeq=&beforeSeq=&limit=`, and the original
/// system's cursors `after` (a timestamp) and `afterEventId`.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct PageQuery {
    pub limit: i64,
    pub after_seq: Option<i64>,
    pub before_seq: Option<i64>,
    pub after_event_id: Option<Uuid>,
    /// ISO 8601, checked by PostgreSQL when it is used.
    pub after_time: Option<String>,
    /// `line=N`: the page starts at the event holding line N.
    pub line: Option<i64>,
}

impl PageQuery {
    /// `max_page`: the largest `limit` this gateway serves.
    pub fn parse<B>(req: &Request<B>, max_page: i64) -> Result<PageQuery> {
        let q = Params::of(req);
        let limit = q.int("limit")?.unwrap_or(DEFAULT_PAGE);
        if !(1..=max_page).contains(&limit) {
            return Err(ApiError::bad_request(
                "invalid_limit",
                format!("limit must be 1..{max_page}"),
            ));
        }
        let after_seq = q.int("afterSeq")?;
        let before_seq = q.int("beforeSeq")?;
        let after_event_id = q
            .text("afterEventId")
            .map(|v| {
                Uuid::parse_str(v).map_err(|_| {
                    ApiError::bad_request("invalid_cursor", "afterEventId must be a uuid")
                })
            })
            .transpose()?;
        let after_time = q.text("after").map(str::to_string);
        let line = q.int("line")?;
        Ok(PageQuery {
            limit,
            after_seq,
            before_seq,
            after_event_id,
            after_time,
            line,
        })
    }
}

/// Where an event stream resumes: `Last-Event-ID`, else `?afterSeq=`, else the start.
pub(super) fn stream_cursor<B>(req: &Request<B>) -> Result<i64> {
    if let Some(value) = req.headers().get("last-event-id") {
        let text = value.to_str().unwrap_or("\u{FFFD}").trim();
        if !text.is_empty() {
            return match text.parse::<i64>() {
                Ok(n) if n >= 0 => Ok(n),
                _ => Err(ApiError::bad_request(
                    "invalid_last_event_id",
                    "Last-Event-ID must be a non-negative integer",
                )),
            };
        }
    }
    Ok(Params::of(req).int("afterSeq")?.unwrap_or(0))
}

/// A job id from the path.
pub(super) fn job_id(text: &str) -> Result<Uuid> {
    Uuid::parse_str(text)
        .map_err(|_| ApiError::bad_request("invalid_job_id", "job id must be a uuid"))
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
                after_event_id: None,
                after_time: None,
                line: None,
            }
        );
        assert_eq!(
            PageQuery::parse(&req(""), 1000).unwrap().limit,
            DEFAULT_PAGE
        );
        for (query, status) in [
            ("limit=0", "invalid_limit"),
            ("limit=1001", "invalid_limit"),
            ("limit=x", "invalid_cursor"),
            ("afterSeq=-1", "invalid_cursor"),
            ("beforeSeq=1.5", "invalid_cursor"),
            ("afterEventId=nope", "invalid_cursor"),
        ] {
            let e = PageQuery::parse(&req(query), 1000).unwrap_err();
            assert!(e.to_string().contains(status), "{query}: {e}");
        }
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
    }
}
