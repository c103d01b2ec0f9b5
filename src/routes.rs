//! HTTP routing and the JSON API. Client mistakes become JSON errors
//! `{"error": code, "message": text}` with the right status, never panics.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use deadpool_postgres::Pool;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use crate::auth::{Failure, Grant, Scope};
use crate::config::{Config, DEFAULT_PAGE};
use crate::hub::{Hub, Start};
use crate::listen::Readiness;
use crate::metrics::Metrics;
use crate::status::StatusFeed;
use crate::store::{self, NewEvent};
use crate::stream;

/// Every response body: full buffers and SSE streams alike.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// A request body: hyper's `Incoming`, or `Empty` for the event-stream requests that
/// [`crate::conn`] reads itself.
pub trait RequestBody: hyper::body::Body<Data = Bytes> + Send + Sync + Unpin + 'static {}
impl<T: hyper::body::Body<Data = Bytes> + Send + Sync + Unpin + 'static> RequestBody for T {}

/// What every handler can reach.
pub struct App {
    pub hub: Hub,
    pub feed: StatusFeed,
    pub pool: Pool,
    pub config: Arc<Config>,
    pub ready: Readiness,
    pub metrics: Arc<Metrics>,
    pub slots: crate::limits::StreamSlots,
}

/// An HTTP error: status, stable code, short message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    fn job_not_found() -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "job_not_found", "job not found")
    }

    fn unavailable(e: impl std::fmt::Display) -> ApiError {
        tracing::warn!(error = %e, "database unavailable");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "database_unavailable",
            "the database is unavailable, retry later",
        )
    }

    fn auth(failure: Failure) -> ApiError {
        let (status, code) = if failure.is_forbidden() {
            (StatusCode::FORBIDDEN, "forbidden")
        } else {
            (StatusCode::UNAUTHORIZED, "unauthorized")
        };
        ApiError::new(status, code, failure.message())
    }

    fn response(&self, retry_after: Option<u64>) -> Response<Body> {
        let mut res = json_response(
            self.status,
            &json!({ "error": self.code, "message": self.message }),
        );
        if self.status == StatusCode::UNAUTHORIZED {
            let challenge = match self.message.as_str() {
                m if m == Failure::Missing.message() => "Bearer realm=\"eventgate\"",
                _ => "Bearer realm=\"eventgate\", error=\"invalid_token\"",
            };
            res.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            let secs = retry_after.unwrap_or(1).max(1);
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        res
    }
}

impl From<crate::Error> for ApiError {
    fn from(e: crate::Error) -> ApiError {
        ApiError::unavailable(e)
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(e: deadpool_postgres::PoolError) -> ApiError {
        ApiError::unavailable(e)
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> ApiError {
        ApiError::unavailable(crate::Error::from(e))
    }
}

type Result<T, E = ApiError> = std::result::Result<T, E>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
}

pub fn empty() -> Body {
    full(Bytes::new())
}

pub fn json_response(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    let body = serde_json::to_vec(value).expect("json always serializes");
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-store")
        .body(full(body))
        .expect("constant headers won't error")
}

/// The service of every connection.
pub async fn handle<B: RequestBody>(
    app: Arc<App>,
    req: Request<B>,
    peer: SocketAddr,
) -> Result<Response<Body>, Infallible> {
    let retry = app.config.retry_ms.div_ceil(1000);
    let origin = allowed_origin(&app.config, &req);
    if req.method() == Method::OPTIONS && req.headers().contains_key(header::ORIGIN) {
        return Ok(preflight(origin));
    }
    // Boxed: hyper keeps room for this future in every connection for its whole life,
    // and the routes' futures (database calls) are large. Boxed, the room is a pointer
    // and the large future lives only while a request is being handled.
    let mut res = match Box::pin(route(&app, req, peer)).await {
        Ok(res) => res,
        Err(e) => e.response(Some(retry)),
    };
    if let Some(origin) = origin {
        let headers = res.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
        headers.append(header::VARY, HeaderValue::from_static("Origin"));
    }
    Ok(res)
}

/// The request's `Origin` when it is on the allow-list (exact match).
fn allowed_origin<B>(config: &Config, req: &Request<B>) -> Option<HeaderValue> {
    let origin = req.headers().get(header::ORIGIN)?;
    let text = origin.to_str().ok()?;
    config
        .cors_origins
        .iter()
        .any(|o| o == text)
        .then(|| origin.clone())
}

/// Answers a CORS preflight: allowed origins get the methods and headers we take;
/// others get 403 and no CORS headers, so the browser blocks the call.
fn preflight(origin: Option<HeaderValue>) -> Response<Body> {
    let Some(origin) = origin else {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            "this origin may not call the api",
        )
        .response(None);
    };
    Response::builder()
        .status(StatusCode::NO_CONTENT)
        .header(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin)
        .header(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, "true")
        .header(header::ACCESS_CONTROL_ALLOW_METHODS, "GET, POST, OPTIONS")
        .header(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            "Authorization, Content-Type, Last-Event-ID",
        )
        .header(header::ACCESS_CONTROL_MAX_AGE, "600")
        .header(header::VARY, "Origin")
        .body(empty())
        .expect("constant headers won't error")
}

/// Checks the request's token, counting refusals by reason.
fn authorize<B>(app: &App, req: &Request<B>, scope: Scope, job: Option<Uuid>) -> Result<Grant> {
    app.config.auth.check(req, scope, job).map_err(|failure| {
        app.metrics.auth_failures[failure as usize].inc();
        ApiError::auth(failure)
    })
}

async fn route<B: RequestBody>(
    app: &App,
    req: Request<B>,
    peer: SocketAddr,
) -> Result<Response<Body>> {
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let method = req.method().clone();
    match (&method, segments.as_slice()) {
        (&Method::GET, ["healthz"]) => Ok(json_response(StatusCode::OK, &json!({"status": "ok"}))),
        (&Method::GET, ["readyz"]) => readyz(app).await,
        (&Method::GET, ["metrics"]) => Ok(metrics(app)),
        (&Method::GET, ["api", "queue", "jobs"]) => {
            let grant = authorize(app, &req, Scope::Read, None)?;
            list_jobs(app, &req, &grant).await
        }
        (&Method::POST, ["api", "queue", "jobs"]) => {
            let grant = authorize(app, &req, Scope::Write, None)?;
            create_job(app, req, &grant).await
        }
        (&Method::GET, ["api", "queue", "jobs", "stream"]) => {
            let grant = authorize(app, &req, Scope::Read, None)?;
            Ok(status_stream(app, grant))
        }
        (&Method::GET, ["api", "queue", "jobs", id]) => {
            let id = parse_job_id(id)?;
            authorize(app, &req, Scope::Read, Some(id))?;
            get_job(app, id).await
        }
        (&Method::GET, ["api", "queue", "jobs", id, "events"]) => {
            let id = parse_job_id(id)?;
            authorize(app, &req, Scope::Read, Some(id))?;
            events_page(app, id, &req).await
        }
        (&Method::POST, ["api", "queue", "jobs", id, "events"]) => {
            let id = parse_job_id(id)?;
            authorize(app, &req, Scope::Write, Some(id))?;
            append(app, id, req).await
        }
        (&Method::GET, ["api", "queue", "jobs", id, "log"]) => {
            let id = parse_job_id(id)?;
            let grant = authorize(app, &req, Scope::Read, Some(id))?;
            crate::log::serve(app, id, &req, peer, &grant).await
        }
        (&Method::GET, ["api", "queue", "jobs", id, "events", "stream"]) => {
            let id = parse_job_id(id)?;
            let grant = authorize(app, &req, Scope::Read, Some(id))?;
            events_stream(app, id, &req, peer, &grant).await
        }
        (&Method::GET, _) if !path.starts_with("/api/") => crate::web::serve(&path),
        (_, ["healthz" | "readyz" | "metrics"]) | (_, ["api", "queue", "jobs", ..]) => {
            Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{method} is not allowed here"),
            ))
        }
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such route",
        )),
    }
}

fn parse_job_id(text: &str) -> Result<Uuid> {
    Uuid::parse_str(text)
        .map_err(|_| ApiError::bad_request("invalid_job_id", "job id must be a uuid"))
}

fn query<B>(req: &Request<B>) -> HashMap<String, String> {
    let Some(q) = req.uri().query() else {
        return HashMap::new();
    };
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// Decodes `%XX` and `+`; invalid escapes are kept as they are.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = match bytes[i] {
            b'%' => bytes
                .get(i + 1..i + 3)
                .and_then(|hex| std::str::from_utf8(hex).ok())
                .and_then(|hex| u8::from_str_radix(hex, 16).ok()),
            _ => None,
        };
        match (decoded, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
            }
            (None, b'+') => {
                out.push(b' ');
                i += 1;
            }
            (None, b) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A non-negative integer query parameter, `None` when absent or empty.
fn int_param(q: &HashMap<String, String>, name: &str) -> Result<Option<i64>> {
    match q.get(name).map(|v| v.trim()) {
        None | Some("") => Ok(None),
        Some(v) => match v.parse::<i64>() {
            Ok(n) if n >= 0 => Ok(Some(n)),
            _ => Err(ApiError::bad_request(
                "invalid_cursor",
                format!("{name} must be a non-negative integer"),
            )),
        },
    }
}

async fn readyz(app: &App) -> Result<Response<Body>> {
    let listener = app.ready.is_up();
    let pool = match app.pool.get().await {
        Ok(client) => client.simple_query("SELECT 1").await.is_ok(),
        Err(_) => false,
    };
    let status = if listener && pool {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok(json_response(
        status,
        &json!({ "ready": listener && pool, "listener": listener, "database": pool }),
    ))
}

fn metrics(app: &App) -> Response<Body> {
    let text = app.metrics.render(
        app.hub.job_count(),
        app.hub.subscriber_count(),
        app.ready.is_up(),
    );
    Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
        .body(full(text))
        .expect("constant headers won't error")
}

async fn list_jobs<B>(app: &App, req: &Request<B>, grant: &Grant) -> Result<Response<Body>> {
    let q = query(req);
    let limit = int_param(&q, "limit")?.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_limit",
            "limit must be 1..500",
        ));
    }
    let status = q
        .get("status")
        .map(|s| s.as_str())
        .filter(|s| !s.is_empty());
    if let Some(status) = status {
        if !JOB_STATUSES.contains(&status) {
            return Err(ApiError::bad_request(
                "invalid_status",
                "unknown job status",
            ));
        }
    }
    let client = app.pool.get().await?;
    let mut items = store::list_jobs(&**client, limit, status).await?;
    if !grant.covers_all() {
        // A token for some jobs lists only those.
        items.retain(|job| grant.covers(job.id));
    }
    Ok(json_response(StatusCode::OK, &json!({ "items": items })))
}

const JOB_STATUSES: &[&str] = &[
    "queued",
    "running",
    "succeeded",
    "failed",
    "cancelled",
    "dead_letter",
];

async fn get_job(app: &App, id: Uuid) -> Result<Response<Body>> {
    let client = app.pool.get().await?;
    match store::get_job(&**client, id).await? {
        Some(job) => Ok(json_response(StatusCode::OK, &job)),
        None => Err(ApiError::job_not_found()),
    }
}

/// Reads a JSON body, refusing more than `max_body` bytes with 413.
async fn read_json<T: serde::de::DeserializeOwned, B: RequestBody>(
    app: &App,
    req: Request<B>,
) -> Result<T> {
    let max = app.config.max_body;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request body is larger than {max} bytes"),
        )
    };
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > max as u64 {
            // Read (and drop) a body of reasonable size before answering: closing a
            // socket with unread data resets it, and the client may never see the 413.
            if len <= DISCARD_LIMIT {
                discard(req.into_body()).await;
            }
            return Err(too_large());
        }
    }
    let mut body = req.into_body();
    let mut bytes = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| {
            ApiError::bad_request("invalid_body", "could not read the request body")
        })?;
        if let Some(data) = frame.data_ref() {
            if bytes.len() + data.len() > max {
                discard(body).await;
                return Err(too_large());
            }
            bytes.extend_from_slice(data);
        }
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request("invalid_body", format!("invalid json: {e}")))
}

/// Bodies up to this size are read and dropped before a 413 (see `read_json`).
const DISCARD_LIMIT: u64 = 64 << 20;
/// How long reading a refused body may take.
const DISCARD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads a body to its end (or `DISCARD_LIMIT`, or `DISCARD_TIMEOUT`), keeping nothing.
async fn discard<B: RequestBody>(body: B) {
    let drain = async {
        let mut body = body;
        let mut seen = 0u64;
        while let Some(Ok(frame)) = body.frame().await {
            if let Some(data) = frame.data_ref() {
                seen += data.len() as u64;
                if seen > DISCARD_LIMIT {
                    break;
                }
            }
        }
    };
    let _ = tokio::time::timeout(DISCARD_TIMEOUT, drain).await;
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CreateJob {
    id: Option<Uuid>,
    #[serde(default)]
    name: String,
    status: Option<String>,
    #[serde(default)]
    payload: Option<serde_json::Value>,
}

async fn create_job<B: RequestBody>(
    app: &App,
    req: Request<B>,
    grant: &Grant,
) -> Result<Response<Body>> {
    let body: CreateJob = read_json(app, req).await?;
    // A token for some jobs may create only those, by id.
    if !grant.covers_all() && !body.id.is_some_and(|id| grant.covers(id)) {
        app.metrics.auth_failures[Failure::Job as usize].inc();
        return Err(ApiError::auth(Failure::Job));
    }
    let status = body.status.as_deref().unwrap_or("queued");
    if !JOB_STATUSES.contains(&status) {
        return Err(ApiError::bad_request(
            "invalid_status",
            "unknown job status",
        ));
    }
    let payload = body.payload.unwrap_or_else(|| json!({}));
    if !payload.is_object() {
        return Err(ApiError::bad_request(
            "invalid_body",
            "payload must be an object",
        ));
    }
    let client = app.pool.get().await?;
    match store::create_job(&**client, body.id, &body.name, status, &payload).await {
        Ok(job) => Ok(json_response(StatusCode::CREATED, &job)),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
            Err(ApiError::new(
                StatusCode::CONFLICT,
                "job_exists",
                "a job with this id exists",
            ))
        }
        Err(e) => Err(e.into()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AppendEvent {
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

async fn append<B: RequestBody>(app: &App, id: Uuid, req: Request<B>) -> Result<Response<Body>> {
    let body: AppendBody = read_json(app, req).await?;
    let events = match body {
        AppendBody::Many { events } => events,
        AppendBody::One(event) => vec![event],
    };
    if events.is_empty() {
        return Err(ApiError::bad_request("invalid_body", "no events to append"));
    }
    if events.len() > 10_000 {
        return Err(ApiError::bad_request(
            "invalid_body",
            "at most 10000 events per append",
        ));
    }
    let mut rows = Vec::with_capacity(events.len());
    for event in events {
        let level = event.level.unwrap_or_else(|| "info".into());
        if !["info", "warn", "error"].contains(&level.as_str()) {
            return Err(ApiError::bad_request(
                "invalid_body",
                "level must be info, warn or error",
            ));
        }
        let payload = event.payload.unwrap_or_else(|| json!({}));
        if !payload.is_object() {
            return Err(ApiError::bad_request(
                "invalid_body",
                "payload must be an object",
            ));
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
fn strip_nul(value: serde_json::Value) -> serde_json::Value {
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

async fn events_page<B>(app: &App, id: Uuid, req: &Request<B>) -> Result<Response<Body>> {
    let q = query(req);
    let limit = int_param(&q, "limit")?.unwrap_or(DEFAULT_PAGE);
    if !(1..=app.config.max_page).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_limit",
            format!("limit must be 1..{}", app.config.max_page),
        ));
    }
    let after_seq = int_param(&q, "afterSeq")?;
    let before_seq = int_param(&q, "beforeSeq")?;
    let after_event_id =
        match q.get("afterEventId").map(|s| s.trim()) {
            None | Some("") => None,
            Some(v) => Some(Uuid::parse_str(v).map_err(|_| {
                ApiError::bad_request("invalid_cursor", "afterEventId must be a uuid")
            })?),
        };
    let after_time = q.get("after").map(|s| s.trim()).filter(|s| !s.is_empty());
    let line = int_param(&q, "line")?;

    let client = app.pool.get().await?;
    let Some((status, _)) = store::job_cursor(&client, id).await? else {
        return Err(ApiError::job_not_found());
    };
    // `line=N`: the page starts at the event holding line N (or the log's start).
    let after_seq = match line {
        Some(line) => Some(
            store::seq_of_line(&**client, id, line)
                .await?
                .map_or(0, |s| s - 1),
        ),
        None => after_seq,
    };
    // The original cursor: an event id (exact), else a timestamp.
    let after = match (after_seq, after_event_id, after_time) {
        (Some(seq), _, _) => Some(seq),
        (None, Some(event), _) => match store::seq_of_event(&client, id, event).await? {
            Some(seq) => Some(seq),
            None => match after_time {
                Some(t) => Some(seq_at_time(&client, id, t).await?),
                None => {
                    return Err(ApiError::bad_request(
                        "invalid_cursor",
                        "afterEventId is not an event of this job",
                    ))
                }
            },
        },
        (None, None, Some(t)) => Some(seq_at_time(&client, id, t).await?),
        (None, None, None) => None,
    };
    let items = match (after, before_seq) {
        // Only an upper bound: the newest page below it (a log's tail, then older pages).
        (None, Some(before)) => store::events_before(&client, id, before, limit).await?,
        (after, before) => {
            store::events_after(&client, id, after.unwrap_or(0), before, limit).await?
        }
    };
    let next_after = items.last().map(|e| e.seq).or(after).unwrap_or(0);
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "items": items,
            "nextAfterSeq": next_after,
            "jobStatus": status,
        }),
    ))
}

async fn seq_at_time(client: &deadpool_postgres::Client, id: Uuid, t: &str) -> Result<i64> {
    match store::seq_at_time(client, id, t).await {
        Ok(seq) => Ok(seq),
        Err(e) if e.code().is_some_and(|c| c.code().starts_with("22")) => Err(
            ApiError::bad_request("invalid_cursor", "after must be an ISO 8601 timestamp"),
        ),
        Err(e) => Err(e.into()),
    }
}

fn sse_response(body: Body) -> Response<Body> {
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache, no-transform")
        .header("x-accel-buffering", "no")
        .body(body)
        .expect("constant headers won't error")
}

/// The resume point: `Last-Event-ID`, else `?afterSeq=`, else the start.
fn stream_cursor<B>(req: &Request<B>) -> Result<i64> {
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
    Ok(int_param(&query(req), "afterSeq")?.unwrap_or(0))
}

async fn events_stream<B>(
    app: &App,
    id: Uuid,
    req: &Request<B>,
    peer: SocketAddr,
    grant: &Grant,
) -> Result<Response<Body>> {
    let cursor = stream_cursor(req)?;
    let Some(slot) = app.slots.take(peer.ip()) else {
        app.metrics.streams_refused.inc();
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_streams",
            format!(
                "at most {} open streams per client",
                app.config.max_streams_per_client
            ),
        ));
    };
    if app.hub.is_shutting_down() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the gateway is restarting, retry later",
        ));
    }
    match app.hub.subscribe(id, cursor).await? {
        Start::NotFound => Err(ApiError::job_not_found()),
        Start::Finished => Ok(Response::builder()
            .status(StatusCode::NO_CONTENT)
            .body(empty())
            .expect("constant status won't error")),
        Start::Live(subscription) => {
            let options = stream::Options {
                retry_ms: app.config.retry_ms,
                shutdown_retry_ms: (app.config.retry_ms, app.config.retry_ms * 5),
                deadline: grant.expires_at().map(deadline_of),
            };
            if let Some(sub) = grant.subject() {
                tracing::info!(job = %id, client = %peer, sub, "stream authorized");
            }
            let body = stream::body(app.hub.clone(), subscription, cursor, options, peer, slot);
            Ok(sse_response(body.boxed_unsync()))
        }
    }
}

/// A wall-clock expiry as a tokio deadline.
fn deadline_of(at: std::time::SystemTime) -> tokio::time::Instant {
    let left = at
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    tokio::time::Instant::now() + left
}

fn status_stream(app: &App, grant: Grant) -> Response<Body> {
    let deadline = grant.expires_at().map(deadline_of);
    let frames = app.feed.stream(app.config.retry_ms, grant, deadline);
    let body = http_body_util::StreamBody::new(frames);
    sse_response(body.boxed_unsync())
}

/// Answers a connection over the limit with 503 and closes it.
pub async fn refuse(io: hyper_util::rt::TokioIo<tokio::net::TcpStream>, retry_ms: u64) {
    let retry = retry_ms.div_ceil(1000).max(1);
    let service = hyper::service::service_fn(move |_req| async move {
        let mut res = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_connections",
            "the gateway is at its connection limit, retry later",
        )
        .response(Some(retry));
        res.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        Ok::<_, Infallible>(res)
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(std::time::Duration::from_secs(5))
        .serve_connection(io, service);
    let _ = conn.await;
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn decodes_queries() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(
            percent_decode("2026-01-01T00%3A00%3A00Z"),
            "2026-01-01T00:00:00Z"
        );
    }
}
