//! The long-lived responses: a job's event stream and the job list's status stream,
//! shaped as `text/event-stream`.

use std::net::SocketAddr;
use std::time::SystemTime;

use http_body_util::BodyExt;
use hyper::header;
use hyper::{Request, Response, StatusCode};
use uuid::Uuid;

use super::body::{empty, Body};
use super::error::{ApiError, Result};
use super::query::{stream_cursor, StreamCursor};
use super::App;
use crate::auth::Grant;
use crate::hub::Start;
use crate::sse::EventId;
use crate::stream;

/// The head every event stream answers with.
fn sse_response(body: Body) -> Response<Body> {
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-cache, no-transform")
        .header("x-accel-buffering", "no")
        .body(body)
        .expect("constant headers won't error")
}

/// `GET /api/queue/jobs/{id}/events/stream`.
pub(super) async fn events<B>(
    app: &App,
    id: Uuid,
    req: &Request<B>,
    peer: SocketAddr,
    grant: &Grant,
) -> Result<Response<Body>> {
    let cursor = match stream_cursor(req)? {
        StreamCursor::Seq(cursor) => cursor,
        StreamCursor::Original(original) => {
            let client = app.pool.get().await?;
            // As polling: an event id that is not this job's, without a time, is 400.
            let seq = super::events::seq_after(&client, id, &original)
                .await?
                .unwrap_or(0);
            EventId { seq, tag: None }
        }
    };
    let slot = app.stream_slot(peer)?;
    if app.hub.is_shutting_down() {
        return Err(shutting_down());
    }
    match app.hub.subscribe(id, cursor).await? {
        Start::NotFound => Err(ApiError::job_not_found()),
        Start::Finished => Ok(Response::builder()
            .status(StatusCode::NO_CONTENT)
            .body(empty())
            .expect("constant status won't error")),
        Start::ShuttingDown => Err(shutting_down()),
        Start::Live(subscription) => {
            let options = stream::Options {
                retry_ms: app.config.retry_ms,
                shutdown_retry_ms: (app.config.retry_ms, app.config.retry_ms * 5),
                deadline: grant.expires_at().map(deadline_of),
                max_buffer: app.config.max_stream_buffer,
                backlog: stream::Backlog::new(),
            };
            if let Some(sub) = grant.subject() {
                tracing::info!(job = %id, client = %peer, sub, "stream authorized");
            }
            let backlog = options.backlog.clone();
            let body = stream::body(app.hub.clone(), subscription, cursor, options, peer, slot);
            let mut res = sse_response(body.boxed_unsync());
            // For the writer of HTTP/1.1 streams, which keeps it current (see `conn`).
            res.extensions_mut().insert(backlog);
            Ok(res)
        }
    }
}

fn shutting_down() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "shutting_down",
        "the gateway is restarting, retry later",
    )
}

/// `GET /api/queue/jobs/stream`. Long-lived like a job's stream, so it takes one of
/// the client's stream slots, held until the response is dropped.
pub(super) fn statuses(app: &App, grant: Grant, peer: SocketAddr) -> Result<Response<Body>> {
    let slot = app.stream_slot(peer)?;
    let deadline = grant.expires_at().map(deadline_of);
    let frames = app.feed.stream(app.config.retry_ms, grant, deadline);
    let frames = futures::StreamExt::map(frames, move |frame| {
        let _held = &slot;
        frame
    });
    let body = http_body_util::StreamBody::new(frames);
    Ok(sse_response(body.boxed_unsync()))
}

/// A wall-clock expiry as a tokio deadline.
fn deadline_of(at: SystemTime) -> tokio::time::Instant {
    let left = at.duration_since(SystemTime::now()).unwrap_or_default();
    tokio::time::Instant::now() + left
}
