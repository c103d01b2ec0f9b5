//! The HTTP edge without a socket: the app is called on a `Request`, with a pool that
//! points at a closed port, so everything refused before a query is answered here and
//! anything that needs the database gets its 503.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::HeaderMap;

use super::*;

/// Nothing listens on port 1 of the loopback: connecting is refused at once.
const NO_DATABASE: &str = "postgres://eventgate@127.0.0.1:1/none";

const JOB: &str = "0b6f3b8e-7f4e-4f57-9d0e-3f0b8e7f4e4f";

fn app() -> Arc<App> {
    app_with(Config::new(NO_DATABASE))
}

fn app_with(config: Config) -> Arc<App> {
    let config = Arc::new(config);
    let pool = crate::db::pool(&config.database_url, 1).expect("a pool is lazy");
    let metrics = Arc::new(Metrics::default());
    let hub = Hub::new(pool.clone(), config.hub.clone(), metrics.clone());
    let (feed, _task) = StatusFeed::start(pool.clone(), Default::default());
    Arc::new(App::new(
        config,
        pool,
        hub,
        feed,
        Readiness::default(),
        metrics,
    ))
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a json body")
    }

    /// The error code of a JSON error.
    fn code(&self) -> String {
        self.json()["error"]
            .as_str()
            .expect("an error code")
            .to_string()
    }
}

async fn call(
    app: &Arc<App>,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let mut req = Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a valid request");
    let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    let Ok(res) = handle(app.clone(), req, peer).await;
    let (parts, body) = res.into_parts();
    let body = body
        .collect()
        .await
        .expect("bodies are infallible")
        .to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

async fn get(app: &Arc<App>, uri: &str) -> Answer {
    call(app, "GET", uri, &[], "").await
}

#[test]
fn one_route_table() {
    let id = JOB;
    assert_eq!(Route::of("/healthz"), Route::Health);
    assert_eq!(Route::of("/metrics/"), Route::Metrics);
    assert_eq!(Route::of("/api/queue/jobs"), Route::Jobs);
    assert_eq!(Route::of(&format!("/api/queue/jobs/{id}")), Route::Job(id));
    assert_eq!(Route::of("/api/queue/jobs/x/events"), Route::Events("x"));
    assert_eq!(Route::of("/api/queue/jobs/x/y/z"), Route::OtherJobs);
    assert_eq!(Route::of("/"), Route::Page);
    assert_eq!(Route::of("/jobs/x"), Route::Page);
    assert_eq!(Route::of("/api/nope"), Route::NotFound);
    // The event streams, which the connection layer writes itself.
    for path in [
        "/api/queue/jobs/stream".to_string(),
        "/api/queue/jobs/stream/".to_string(),
        format!("/api/queue/jobs/{id}/events/stream"),
    ] {
        assert!(Route::of(&path).is_stream(), "{path}");
    }
    for path in [
        "/api/queue/jobs".to_string(),
        format!("/api/queue/jobs/{id}/events"),
        format!("/api/queue/jobs/{id}/events/stream/x"),
        "/api/queue/jobs/stream/x".to_string(),
        "/".to_string(),
    ] {
        assert!(!Route::of(&path).is_stream(), "{path}");
    }
}

#[tokio::test]
async fn bad_job_ids_are_400_before_any_query() {
    let app = app();
    for (method, uri) in [
        ("GET", "/api/queue/jobs/nope"),
        ("GET", "/api/queue/jobs/nope/events"),
        ("POST", "/api/queue/jobs/nope/events"),
        ("GET", "/api/queue/jobs/nope/events/stream"),
        ("GET", "/api/queue/jobs/stream/events"),
    ] {
        let res = call(&app, method, uri, &[], "{}").await;
        assert_eq!(res.status, StatusCode::BAD_REQUEST, "{method} {uri}");
        assert_eq!(res.code(), "invalid_job_id", "{method} {uri}");
    }
}

#[tokio::test]
async fn bad_cursors_are_400() {
    let app = app();
    let events = format!("/api/queue/jobs/{JOB}/events");
    for (query, code) in [
        ("limit=0", "invalid_limit"),
        ("limit=1001", "invalid_limit"),
        ("limit=ten", "invalid_limit"),
        ("limit=-1", "invalid_limit"),
        ("afterSeq=-1", "invalid_cursor"),
        ("beforeSeq=x", "invalid_cursor"),
        ("afterEventId=nope", "invalid_cursor"),
    ] {
        let res = get(&app, &format!("{events}?{query}")).await;
        assert_eq!(res.status, StatusCode::BAD_REQUEST, "{query}");
        assert_eq!(res.code(), code, "{query}");
    }
    let list = get(&app, "/api/queue/jobs?status=done").await;
    assert_eq!(
        (list.status, list.code().as_str()),
        (StatusCode::BAD_REQUEST, "invalid_status")
    );
    let list = get(&app, "/api/queue/jobs?limit=501").await;
    assert_eq!(list.code(), "invalid_limit");

    let stream = format!("{events}/stream");
    let res = call(&app, "GET", &stream, &[("last-event-id", "-3")], "").await;
    assert_eq!(res.status, StatusCode::BAD_REQUEST);
    assert_eq!(res.code(), "invalid_last_event_id");
    let res = get(&app, &format!("{stream}?afterSeq=x")).await;
    assert_eq!(res.code(), "invalid_cursor");
}

#[tokio::test]
async fn bad_bodies_are_400_or_413() {
    let app = app_with(Config {
        max_body: 64,
        ..Config::new(NO_DATABASE)
    });
    let events = format!("/api/queue/jobs/{JOB}/events");
    for (uri, body, code) in [
        ("/api/queue/jobs", "{", "invalid_body"),
        ("/api/queue/jobs", r#"{"status": "done"}"#, "invalid_status"),
        ("/api/queue/jobs", r#"{"payload": []}"#, "invalid_body"),
        // Unknown fields are ignored, not refused; a bad value of a known one is not.
        (
            "/api/queue/jobs",
            r#"{"type": "t", "maxAttempts": 0}"#,
            "invalid_body",
        ),
        ("/api/queue/jobs", r#"{"priority": "high"}"#, "invalid_body"),
        (
            &events,
            r#"{"message": "x", "level": "loud"}"#,
            "invalid_body",
        ),
        (&events, r#"{"events": []}"#, "invalid_body"),
        (&events, r#"{"message": "x", "payload": 3}"#, "invalid_body"),
        (&events, "not json", "invalid_body"),
    ] {
        let res = call(&app, "POST", uri, &[], body).await;
        assert_eq!(res.status, StatusCode::BAD_REQUEST, "{uri} {body}");
        assert_eq!(res.code(), code, "{uri} {body}");
    }
    let big = format!(r#"{{"message": "{}"}}"#, "x".repeat(100));
    let res = call(&app, "POST", &events, &[], &big).await;
    assert_eq!(res.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(res.code(), "body_too_large");
}

#[tokio::test]
async fn wrong_methods_are_405_and_unknown_routes_404() {
    let app = app();
    for (method, uri) in [
        ("DELETE", "/api/queue/jobs"),
        ("PUT", "/healthz"),
        ("POST", "/metrics"),
        ("POST", "/api/queue/jobs/stream"),
        ("DELETE", &format!("/api/queue/jobs/{JOB}") as &str),
    ] {
        let res = call(&app, method, uri, &[], "").await;
        assert_eq!(res.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {uri}");
        assert_eq!(res.code(), "method_not_allowed");
        let allow = res.headers[header::ALLOW].to_str().unwrap();
        assert!(allow.contains("GET") && !allow.contains(method), "{allow}");
    }
    let artifacts = format!("/api/queue/jobs/{JOB}/artifacts");
    for (method, uri) in [
        ("GET", "/api/nope"),
        ("POST", "/"),
        ("GET", "/nope.html"),
        ("GET", "/api/queue/jobs/a/b/c/d"),
        ("GET", &artifacts as &str),
        ("POST", &artifacts),
    ] {
        let res = call(&app, method, uri, &[], "").await;
        assert_eq!(res.status, StatusCode::NOT_FOUND, "{method} {uri}");
        assert_eq!(res.code(), "not_found");
    }
}

#[tokio::test]
async fn what_needs_no_database_is_served_without_one() {
    let app = app();
    let health = get(&app, "/healthz").await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(health.json(), json!({"status": "ok"}));
    let page = get(&app, "/").await;
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(
        page.headers[header::CONTENT_TYPE],
        "text/html; charset=utf-8"
    );
    assert_eq!(
        get(&app, &format!("/jobs/{JOB}")).await.status,
        StatusCode::OK
    );
    let metrics = get(&app, "/metrics").await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&metrics.body).contains("eventgate_listener_up 0"));
}

#[tokio::test]
async fn an_unreachable_database_is_503_with_retry_after() {
    let app = app();
    let res = get(&app, &format!("/api/queue/jobs/{JOB}")).await;
    assert_eq!(res.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.code(), "database_unavailable");
    assert_eq!(res.headers[header::RETRY_AFTER], "2");
    let ready = get(&app, "/readyz").await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        ready.json(),
        json!({"ready": false, "listener": false, "database": false, "writable": true,
               "reason": "listener_down"})
    );
}

#[tokio::test]
async fn preflights_answer_only_allowed_origins() {
    let app = app_with(Config {
        cors_origins: vec!["https://ok.example".into()],
        ..Config::new(NO_DATABASE)
    });
    let ok = call(
        &app,
        "OPTIONS",
        "/api/queue/jobs",
        &[("origin", "https://ok.example")],
        "",
    )
    .await;
    assert_eq!(ok.status, StatusCode::NO_CONTENT);
    assert_eq!(
        ok.headers[header::ACCESS_CONTROL_ALLOW_ORIGIN],
        "https://ok.example"
    );
    let no = call(
        &app,
        "OPTIONS",
        "/api/queue/jobs",
        &[("origin", "https://evil.example")],
        "",
    )
    .await;
    assert_eq!(no.status, StatusCode::FORBIDDEN);
    assert!(!no.headers.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN));
    let health = call(
        &app,
        "GET",
        "/healthz",
        &[("origin", "https://ok.example")],
        "",
    )
    .await;
    assert_eq!(
        health.headers[header::ACCESS_CONTROL_ALLOW_ORIGIN],
        "https://ok.example"
    );
}
