//! `/api/queue/jobs/{id}/events`: appending events and reading them a page at a time
//! (the polling fallback and the original system's cursors).

use hyper::header;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use uuid::Uuid;

use super::body::full;
use super::body::{json_response, read_json, Body, RequestBody};
use super::cache;
use super::error::{ApiError, Result};
use super::log::{compress, Coding};
use super::query::{level_filter, Original, PageQuery};
use super::App;
use crate::model::{Level, NewEvent};
use crate::store;

/// Most events in one append.
const MAX_APPEND: usize = 10_000;

/// One event, in this gateway's shape or the original system's (`workerId`, kept as
/// `payload.workerId`); camelCase or snake_case; unknown fields ignored.
#[derive(Deserialize)]
struct AppendEvent {
    #[serde(default, alias = "worker_id", rename = "workerId")]
    worker_id: Option<serde_json::Value>,
    #[serde(default)]
    level: Option<String>,
    message: String,
    #[serde(default)]
    payload: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum AppendBody {
    Many { events: Vec<AppendEvent> },
    One(AppendEvent),
}

pub(super) async fn append<B: RequestBody>(
    app: &App,
    id: Uuid,
    req: Request<B>,
) -> Result<Response<Body>> {
    let body: AppendBody = read_json(req, app.config.max_body, app.config.body_timeout).await?;
    let events = match body {
        AppendBody::Many { events } => events,
        AppendBody::One(event) => vec![event],
    };
    if events.is_empty() {
        return Err(ApiError::bad_request("invalid_body", "no events to append"));
    }
    if events.len() > MAX_APPEND {
        return Err(ApiError::bad_request(
            "invalid_body",
            "at most 10000 events per append",
        ));
    }
    let mut rows = Vec::with_capacity(events.len());
    for event in events {
        let level = match event.level.as_deref() {
            None => Level::Info,
            Some(text) => text.parse::<Level>().map_err(|_| {
                ApiError::bad_request("invalid_body", "level must be info, warn or error")
            })?,
        };
        let mut payload = match event.payload {
            None | Some(serde_json::Value::Null) => json!({}),
            Some(payload) => payload,
        };
        let Some(fields) = payload.as_object_mut() else {
            return Err(ApiError::bad_request(
                "invalid_body",
                "payload must be an object",
            ));
        };
        if let Some(worker) = event.worker_id.filter(|w| !w.is_null()) {
            fields.entry("workerId").or_insert(worker);
        }
        if event.message.len() > app.config.max_message {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "message_too_large",
                format!(
                    "a message may hold at most {} bytes",
                    app.config.max_message
                ),
            ));
        }
        // PostgreSQL text cannot hold NUL.
        let message = event.message.replace('\0', "\u{FFFD}");
        let payload = strip_nul(payload);
        rows.push(NewEvent {
            level,
            message,
            payload,
        });
    }
    let client = app.pool.get().await?;
    match store::append_events(&**client, id, &rows).await {
        Ok(ids) => {
            let last_seq = ids.last().map(|&(_, seq)| seq).unwrap_or(0);
            let items: Vec<_> = ids
                .iter()
                .map(|(id, seq)| json!({ "id": id, "seq": seq }))
                .collect();
            Ok(json_response(
                StatusCode::CREATED,
                &json!({ "items": items, "lastSeq": last_seq }),
            ))
        }
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION) => {
            Err(ApiError::job_not_found())
        }
        Err(e) => Err(e.into()),
    }
}

/// Replaces NUL in every string of a JSON value (jsonb cannot hold `\u0000`).
pub(super) fn strip_nul(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::String(s) if s.contains('\0') => Value::String(s.replace('\0', "\u{FFFD}")),
        Value::Array(items) => Value::Array(items.into_iter().map(strip_nul).collect()),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (k.replace('\0', "\u{FFFD}"), strip_nul(v)))
                .collect(),
        ),
        other => other,
    }
}

pub(super) async fn page<B>(app: &App, id: Uuid, req: &Request<B>) -> Result<Response<Body>> {
    let query = PageQuery::parse(req, app.config.max_page)?;
    let level = level_filter(req)?;
    let limit = query.limit;

    let client = app.pool.get().await?;
    let Some((status, last_seq)) = store::job_cursor(&client, id).await? else {
        return Err(ApiError::job_not_found());
    };
    // A finished job's pages never change ([`super::cache`]): a client or cache that
    // holds this one gets 304 before any read of its events.
    let auth_on = app.config.auth.is_on();
    let coding = Coding::negotiate(
        req.headers()
            .get(header::ACCEPT_ENCODING)
            .and_then(|v| v.to_str().ok()),
    );
    let etag = status.is_terminal().then(|| {
        let what = format!("page-{}", coding.header().unwrap_or("identity"));
        cache::etag(id, last_seq, &what, req.uri().query())
    });
    if let Some(etag) = &etag {
        if cache::not_modified(req, etag) {
            return Ok(cache::unchanged(etag, auth_on, Some("Accept-Encoding")));
        }
    }
    // `line=N`: the page starts at the event holding line N (or the log's start).
    let line_start = match query.line {
        Some(line) => Some(
            store::seq_of_line(&**client, id, line)
                .await?
                .map_or(0, |s| s - 1),
        ),
        None => None,
    };
    let after = match line_start.or(query.after_seq) {
        Some(seq) => Some(seq),
        None => seq_after(&client, id, &query.after).await?,
    };
    let before = match query.before_seq {
        Some(seq) => Some(seq),
        None => seq_before(&client, id, &query.before).await?,
    };
    app.metrics.table_read_page();
    // The newest page below a bound keeps its newest events when it is cut to its
    // byte budget; every other page keeps its first (the ones next to its cursor).
    let keep_newest = !query.descending && after.is_none() && before.is_some();
    let items = match (after, before, level) {
        // `level=`: the first `limit` events of that level in the range (or the last,
        // for `sort=desc` and for a page below `before` only, as without it).
        (_, _, Some(level)) => {
            let newest = query.descending || (after.is_none() && before.is_some());
            let mut items = store::events_at_level(
                &client,
                id,
                level.as_str(),
                after.unwrap_or(0),
                before,
                limit,
                newest,
            )
            .await?;
            if newest && !query.descending {
                items.reverse();
            }
            items
        }
        _ if query.descending => {
            store::events_desc(&client, id, after.unwrap_or(0), before, limit).await?
        }
        // Only an upper bound: the newest page below it (a log's tail, then older pages).
        (None, Some(before), None) => store::events_before(&client, id, before, limit).await?,
        (after, before, None) => {
            store::events_after(&client, id, after.unwrap_or(0), before, limit).await?
        }
    };
    let (items, seqs) = within_page_bytes(&items, keep_newest);
    let next_after = seqs.into_iter().max().or(after).unwrap_or(0);
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Page<'a> {
        items: Vec<&'a RawValue>,
        next_after_seq: i64,
        job_status: crate::model::JobStatus,
    }
    let page = Page {
        items: items.iter().map(|i| &**i).collect(),
        next_after_seq: next_after,
        job_status: status,
    };
    let json = serde_json::to_vec(&page).expect("json always serializes");
    let mut res = Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-store")
        .header(header::VARY, "Accept-Encoding");
    // Compressed when the client accepts it (a page is up to a megabyte of JSON).
    let body = match coding.header() {
        Some(name) => {
            res = res.header(header::CONTENT_ENCODING, name);
            compress(coding, json).await
        }
        None => json.into(),
    };
    let mut res = res.body(full(body)).expect("constant headers won't error");
    if let Some(etag) = &etag {
        cache::mark(res.headers_mut(), etag, auth_on);
    }
    Ok(res)
}

/// A polling page's events as JSON, cut where they reach [`store::PAGE_BYTES`] (at
/// least one is kept): from the front, or from the back when `keep_newest`. With
/// them, their seqs (`nextAfterSeq` is the highest: the next page starts after it).
fn within_page_bytes(
    events: &[crate::model::Event],
    keep_newest: bool,
) -> (Vec<Box<RawValue>>, Vec<i64>) {
    let mut kept = Vec::new();
    let mut seqs = Vec::new();
    let mut bytes = 0usize;
    let mut take = |event: &crate::model::Event| {
        if bytes >= store::PAGE_BYTES as usize {
            return;
        }
        let json = serde_json::to_string(event).expect("json always serializes");
        bytes += json.len();
        kept.push(RawValue::from_string(json).expect("serde_json writes json"));
        seqs.push(event.seq);
    };
    if keep_newest {
        events.iter().rev().for_each(&mut take);
        kept.reverse();
        seqs.reverse();
    } else {
        events.iter().for_each(&mut take);
    }
    (kept, seqs)
}

/// The seq the original cursor `after` + `afterEventId` stands for: the event's own
/// (exact), else the last event created at or before `after`; `None` when unset.
pub(super) async fn seq_after(
    client: &deadpool_postgres::Client,
    id: Uuid,
    cursor: &Original,
) -> Result<Option<i64>> {
    if let Some(event) = cursor.event {
        if let Some(seq) = store::seq_of_event(client, id, event).await? {
            return Ok(Some(seq));
        }
    }
    match (&cursor.time, cursor.event) {
        (Some(t), _) => Ok(Some(at_time(store::seq_at_time(client, id, t).await)?)),
        (None, Some(_)) => Err(ApiError::bad_request(
            "invalid_cursor",
            "afterEventId is not an event of this job",
        )),
        (None, None) => Ok(None),
    }
}

/// The seq the original cursor `before` + `beforeEventId` stands for: the event's own
/// (exact), else the first event created at or after `before` (past the end when there
/// is none); `None` when unset.
async fn seq_before(
    client: &deadpool_postgres::Client,
    id: Uuid,
    cursor: &Original,
) -> Result<Option<i64>> {
    if let Some(event) = cursor.event {
        if let Some(seq) = store::seq_of_event(client, id, event).await? {
            return Ok(Some(seq));
        }
    }
    match (&cursor.time, cursor.event) {
        (Some(t), _) => {
            let seq = at_time(store::seq_from_time(client, id, t).await)?;
            Ok(Some(seq.unwrap_or(i64::MAX)))
        }
        (None, Some(_)) => Err(ApiError::bad_request(
            "invalid_cursor",
            "beforeEventId is not an event of this job",
        )),
        (None, None) => Ok(None),
    }
}

/// A time cursor PostgreSQL could not read is the client's mistake.
fn at_time<T>(read: std::result::Result<T, tokio_postgres::Error>) -> Result<T> {
    match read {
        Ok(value) => Ok(value),
        Err(e) if e.code().is_some_and(|c| c.code().starts_with("22")) => {
            Err(ApiError::bad_request(
                "invalid_cursor",
                "after and before must be ISO 8601 timestamps",
            ))
        }
        Err(e) => Err(e.into()),
    }
}
