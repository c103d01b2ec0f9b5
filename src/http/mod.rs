//! The HTTP edge: routing and the JSON API. Client mistakes become JSON errors
//! `{"error": code, "message": text}` with the right status, never panics.
//!
//! [`Route::of`] is the one route table: [`App::handle`] dispatches on it, and
//! [`crate::conn`] asks it which requests are event streams that it writes itself. The
//! app is a plain value built by [`App::new`], so tests call it on a `Request` without
//! a socket (and, for everything that is refused before a query, without a database).

mod body;
mod cache;
mod cors;
mod error;
mod events;
mod jobs;
mod log;
mod query;
mod streams;
mod web;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use deadpool_postgres::Pool;
use hyper::header;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;
use uuid::Uuid;

pub use body::Body;
pub(crate) use body::{full, RequestBody};
pub use error::ApiError;
use error::Result;
pub(crate) use log::strip_ansi;

use crate::auth::{Grant, Scope};
use crate::config::Config;
use crate::hub::Hub;
use crate::limits::StreamSlots;
use crate::listen::Readiness;
use crate::metrics::Metrics;
use crate::status::StatusFeed;

/// What every handler can reach.
pub struct App {
    hub: Hub,
    feed: StatusFeed,
    pool: Pool,
    config: Arc<Config>,
    ready: Readiness,
    metrics: Arc<Metrics>,
    slots: StreamSlots,
}

/// What a request's path names, whatever its method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route<'a> {
    Health,
    Ready,
    Metrics,
    /// `/api/queue/jobs`
    Jobs,
    /// `/api/queue/jobs/stream`
    JobsStream,
    /// `/api/queue/jobs/{id}`
    Job(&'a str),
    /// `/api/queue/jobs/{id}/events`
    Events(&'a str),
    /// `/api/queue/jobs/{id}/events/stream`
    EventsStream(&'a str),
    /// `/api/queue/jobs/{id}/log`
    Log(&'a str),
    /// Anything else under `/api/queue/jobs/` (`/artifacts`, `/live-session`, ...):
    /// not a route of this gateway, 404.
    OtherJobs,
    /// Outside `/api/`: the dashboard's pages and files.
    Page,
    NotFound,
}

impl<'a> Route<'a> {
    /// The route of a path (without its query). A trailing `/` is ignored.
    pub(crate) fn of(path: &'a str) -> Route<'a> {
        let mut segments = path.trim_end_matches('/').split('/').skip(1);
        let mut next = || segments.next();
        match (next(), next(), next(), next(), next(), next(), next()) {
            (Some("healthz"), None, ..) => Route::Health,
            (Some("readyz"), None, ..) => Route::Ready,
            (Some("metrics"), None, ..) => Route::Metrics,
            (Some("api"), Some("queue"), Some("jobs"), a, b, c, d) => match (a, b, c, d) {
                (None, ..) => Route::Jobs,
                (Some("stream"), None, ..) => Route::JobsStream,
                (Some(id), None, ..) => Route::Job(id),
                (Some(id), Some("events"), None, _) => Route::Events(id),
                (Some(id), Some("events"), Some("stream"), None) => Route::EventsStream(id),
                (Some(id), Some("log"), None, _) => Route::Log(id),
                _ => Route::OtherJobs,
            },
            _ if !path.starts_with("/api/") => Route::Page,
            _ => Route::NotFound,
        }
    }

    /// The methods this route answers (the `Allow` of a 405); empty when it is no route.
    pub(crate) fn allowed(self) -> &'static str {
        match self {
            Route::Health | Route::Ready | Route::Metrics => "GET",
            Route::Jobs | Route::Events(_) => "GET, POST",
            Route::JobsStream
            | Route::Job(_)
            | Route::EventsStream(_)
            | Route::Log(_)
            | Route::Page => "GET",
            Route::OtherJobs | Route::NotFound => "",
        }
    }

    /// Whether a `GET` of this route answers with an event stream.
    pub(crate) fn is_stream(self) -> bool {
        matches!(self, Route::JobsStream | Route::EventsStream(_))
    }
}

impl App {
    pub(crate) fn new(
        config: Arc<Config>,
        pool: Pool,
        hub: Hub,
        feed: StatusFeed,
        ready: Readiness,
        metrics: Arc<Metrics>,
    ) -> App {
        App {
            slots: StreamSlots::new(config.max_streams_per_client),
            hub,
            feed,
            pool,
            config,
            ready,
            metrics,
        }
    }

    /// One of the client's slots for a long-lived response (an event stream, a
    /// following raw log), held until the response ends; 429 when it has none left.
    pub(crate) fn stream_slot(&self, peer: SocketAddr) -> Result<crate::limits::Slot> {
        self.slots.take(peer.ip()).ok_or_else(|| {
            self.metrics.streams_refused.inc();
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_streams",
                format!(
                    "at most {} open streams per client",
                    self.config.max_streams_per_client
                ),
            )
        })
    }

    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// How long a refused client should wait, in whole seconds.
    pub(crate) fn retry_secs(&self) -> u64 {
        self.config.retry_ms.div_ceil(1000)
    }
}

/// The service of every connection.
pub(crate) async fn handle<B: RequestBody>(
    app: Arc<App>,
    mut req: Request<B>,
    peer: SocketAddr,
) -> std::result::Result<Response<Body>, Infallible> {
    // From here on `peer` is the client as far as it is believed: behind a trusted
    // proxy, the address it forwarded. Logs and per-address caps see that one.
    let encrypted = req.extensions().get::<crate::proxy::Encrypted>().is_some();
    let client = crate::proxy::client(peer, encrypted, req.headers(), &app.config.trusted_proxies);
    req.extensions_mut().insert(client);
    let peer = client.addr;
    let origin = cors::allowed_origin(&app.config, &req);
    if req.method() == Method::OPTIONS && req.headers().contains_key(header::ORIGIN) {
        return Ok(cors::preflight(origin));
    }
    // Boxed: hyper keeps room for this future in every connection for its whole life,
    // and the routes' futures (database calls) are large. Boxed, the room is a pointer
    // and the large future lives only while a request is being handled.
    let mut res = match Box::pin(route(&app, req, peer)).await {
        Ok(res) => res,
        Err(e) => e.response(Some(app.retry_secs())),
    };
    if let Some(origin) = origin {
        cors::allow(res.headers_mut(), origin);
    }
    Ok(res)
}

/// Checks the request's token, counting refusals by reason. A write authenticated by
/// the cookie must also pass the CSRF check ([`cors::check_cookie_write`]).
fn authorize<B>(app: &App, req: &Request<B>, scope: Scope, job: Option<Uuid>) -> Result<Grant> {
    let grant = app.config.auth.check(req, scope, job).map_err(|failure| {
        app.metrics.auth_failure(failure);
        ApiError::auth(failure)
    })?;
    if scope == Scope::Write && grant.via == crate::auth::Transport::Cookie {
        cors::check_cookie_write(&app.config, req)?;
    }
    Ok(grant)
}

async fn route<B: RequestBody>(
    app: &App,
    req: Request<B>,
    peer: SocketAddr,
) -> Result<Response<Body>> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    match (&method, Route::of(&path)) {
        (&Method::GET, Route::Health) => Ok(body::json_response(
            StatusCode::OK,
            &json!({"status": "ok"}),
        )),
        (&Method::GET, Route::Ready) => readyz(app).await,
        (&Method::GET, Route::Metrics) => Ok(metrics(app)),
        (&Method::GET, Route::Jobs) => {
            let grant = authorize(app, &req, Scope::Read, None)?;
            jobs::list(app, &req, &grant).await
        }
        (&Method::POST, Route::Jobs) => {
            let grant = authorize(app, &req, Scope::Write, None)?;
            jobs::create(app, req, &grant).await
        }
        (&Method::GET, Route::JobsStream) => {
            let grant = authorize(app, &req, Scope::Read, None)?;
            streams::statuses(app, grant, peer)
        }
        (&Method::GET, Route::Job(id)) => {
            let id = query::job_id(id)?;
            authorize(app, &req, Scope::Read, Some(id))?;
            jobs::get(app, id).await
        }
        (&Method::GET, Route::Events(id)) => {
            let id = query::job_id(id)?;
            authorize(app, &req, Scope::Read, Some(id))?;
            events::page(app, id, &req).await
        }
        (&Method::POST, Route::Events(id)) => {
            let id = query::job_id(id)?;
            authorize(app, &req, Scope::Write, Some(id))?;
            events::append(app, id, req).await
        }
        (&Method::GET, Route::EventsStream(id)) => {
            let id = query::job_id(id)?;
            let grant = authorize(app, &req, Scope::Read, Some(id))?;
            streams::events(app, id, &req, peer, &grant).await
        }
        (&Method::GET, Route::Log(id)) => {
            let id = query::job_id(id)?;
            let grant = authorize(app, &req, Scope::Read, Some(id))?;
            log::serve(app, id, &req, peer, &grant).await
        }
        (&Method::GET, Route::Page) => web::serve(&path),
        (_, Route::Page | Route::OtherJobs | Route::NotFound) => {
            Err(ApiError::not_found("no such route"))
        }
        (_, route) => {
            let mut res = ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{method} is not allowed here"),
            )
            .response(None);
            res.headers_mut().insert(
                header::ALLOW,
                header::HeaderValue::from_static(route.allowed()),
            );
            Ok(res)
        }
    }
}

async fn readyz(app: &App) -> Result<Response<Body>> {
    let listener = app.ready.is_up();
    let pool = match app.pool.get().await {
        Ok(client) => client.simple_query("SELECT 1").await.is_ok(),
        Err(_) => false,
    };
    // Set by the LISTEN session's ping (listen.rs). A database that refuses writes
    // (read-only, in recovery, disk full) leaves the gateway ready: it still serves
    // everything that exists, and taking every replica out of the balancer would end
    // that too. The body says so, for the operator and for probes that care.
    let writable = !app.ready.is_read_only();
    let ready = listener && pool;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let reason = match (listener, pool, writable) {
        (false, _, _) => Some("listener_down"),
        (_, false, _) => Some("database_unreachable"),
        (_, _, false) => Some("database_read_only"),
        _ => None,
    };
    Ok(body::json_response(
        status,
        &json!({
            "ready": ready,
            "listener": listener,
            "database": pool,
            "writable": writable,
            "reason": reason,
        }),
    ))
}

fn metrics(app: &App) -> Response<Body> {
    let text = app.metrics.render(
        app.hub.job_count(),
        app.hub.subscriber_count(),
        app.ready.is_up(),
    );
    Response::builder()
        .header(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
        .body(full(text))
        .expect("constant headers won't error")
}

#[cfg(test)]
mod tests;
