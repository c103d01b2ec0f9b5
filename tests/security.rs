//! Auth, CORS, limits, metrics and logs: a gateway facing the open internet.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use eventgate::auth::Auth;
use eventgate::Config;
use serde_json::json;

const SECRET: &str = "correct horse battery staple";

/// A token signed with a generic JWT encoder, as a host application would.
fn token(secret: &str, scope: &str, jobs: &[String], exp_in: i64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"exp": now + exp_in, "scope": scope, "jobs": jobs, "sub": "tester"}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

async fn secured(url: &str) -> Gateway {
    let mut config = Config::new(url);
    config.auth = Auth::hs256(SECRET.as_bytes());
    config.max_body = 1 << 20;
    Gateway::start_with(config).await
}

enum Transport {
    Header,
    Cookie,
    Query,
}

async fn call(
    gw: &Gateway,
    method: &str,
    path: &str,
    token: Option<&str>,
    transport: &Transport,
    body: Option<&[u8]>,
) -> Response {
    let mut path = path.to_string();
    let auth;
    let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/json")];
    if let Some(token) = token {
        match transport {
            Transport::Header => {
                auth = format!("Bearer {token}");
                headers.push(("Authorization", &auth));
            }
            Transport::Cookie => {
                auth = format!("theme=dark; eventgate_token={token}");
                headers.push(("Cookie", &auth));
            }
            Transport::Query => {
                path.push(if path.contains('?') { '&' } else { '?' });
                path.push_str("access_token=");
                path.push_str(token);
            }
        }
    }
    // Streams are read only to their head: a 200 stream never ends by itself.
    if path.contains("/stream") {
        let sse_path = path.clone();
        let mut sse = Sse::connect_with(gw.addr, &sse_path, &headers).await;
        let body = if sse.status == 200 {
            Vec::new()
        } else {
            sse.error_body().await
        };
        return Response {
            status: sse.status,
            headers: sse.headers.clone(),
            body,
        };
    }
    request(gw.addr, method, &path, &headers, body)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_auth_matrix_over_every_transport() {
    let url = database().await;
    let gw = secured(&url).await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let job = create_job(&db).await;
    insert(&db, job, 3, "secret build output").await;
    let other = create_job(&db).await;
    let j = job.to_string();

    let good_read = token(SECRET, "read", std::slice::from_ref(&j), 3600);
    let good_write = token(SECRET, "write read", std::slice::from_ref(&j), 3600);
    let forged = token("not the secret", "read write", &["*".to_string()], 3600);
    let expired = token(SECRET, "read write", &["*".to_string()], -120);
    let other_job = token(SECRET, "read write", &[other.to_string()], 3600);
    let read_only = good_read.clone();

    let read_paths = [
        format!("/api/queue/jobs/{job}"),
        format!("/api/queue/jobs/{job}/events"),
        format!("/api/queue/jobs/{job}/events/stream"),
    ];
    let append_path = format!("/api/queue/jobs/{job}/events");
    let append_body = br#"{"message": "from a worker"}"#;

    for transport in [Transport::Header, Transport::Cookie, Transport::Query] {
        for path in &read_paths {
            for (token, status) in [
                (None, 401),
                (Some(forged.as_str()), 401),
                (Some(expired.as_str()), 401),
                (Some(other_job.as_str()), 403),
                (Some(good_read.as_str()), 200),
            ] {
                let res = call(&gw, "GET", path, token, &transport, None).await;
                assert_eq!(res.status, status, "GET {path} with {token:?}");
                if status != 200 {
                    let text = res.text();
                    assert!(
                        !text.contains("secret build output"),
                        "no data leaked: {text}"
                    );
                    if status == 401 {
                        assert!(res
                            .header("www-authenticate")
                            .is_some_and(|v| v.starts_with("Bearer")));
                    }
                }
            }
        }
        // Writes need the write scope for that job.
        for (token, status) in [
            (None, 401),
            (Some(forged.as_str()), 401),
            (Some(expired.as_str()), 401),
            (Some(read_only.as_str()), 403),
            (Some(other_job.as_str()), 403),
            (Some(good_write.as_str()), 201),
        ] {
            let res = call(
                &gw,
                "POST",
                &append_path,
                token,
                &transport,
                Some(append_body),
            )
            .await;
            assert_eq!(
                res.status,
                status,
                "POST append with {token:?}: {}",
                res.text()
            );
        }
    }
    // Exactly the three good appends landed (one per transport).
    assert_eq!(last_seq(&db, job).await, 6);

    // The job list shows only the jobs a token covers.
    let list = call(
        &gw,
        "GET",
        "/api/queue/jobs",
        Some(&good_read),
        &Transport::Header,
        None,
    )
    .await;
    let ids: Vec<String> = list.json()["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, vec![j.clone()]);
    // Creating a job needs write; a job-scoped token may create only that id.
    let create = br#"{"name": "new"}"#;
    let res = call(
        &gw,
        "POST",
        "/api/queue/jobs",
        Some(&good_read),
        &Transport::Header,
        Some(create),
    )
    .await;
    assert_eq!(res.status, 403);
    let all_write = token(SECRET, "write", &["*".to_string()], 3600);
    let res = call(
        &gw,
        "POST",
        "/api/queue/jobs",
        Some(&all_write),
        &Transport::Header,
        Some(create),
    )
    .await;
    assert_eq!(res.status, 201);

    // Health and metrics stay open; failures are counted by reason.
    assert_eq!(get(gw.addr, "/healthz").await.unwrap().status, 200);
    let metrics = get(gw.addr, "/metrics").await.unwrap().text();
    for reason in ["missing", "invalid", "expired", "scope", "job"] {
        let n = metric_value(
            &metrics,
            &format!("eventgate_auth_failures_total{{reason=\"{reason}\"}}"),
        );
        assert!(n > 0, "{reason} failures counted");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_closes_when_its_token_expires() {
    let url = database().await;
    let gw = secured(&url).await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let job = create_job(&db).await;
    insert(&db, job, 2, "x").await;
    let short = token(SECRET, "read", &[job.to_string()], 2);
    let path = format!("/api/queue/jobs/{job}/events/stream?access_token={short}");
    let mut sse = Sse::connect(gw.addr, &path, None).await;
    assert_eq!(sse.status, 200);
    let got = sse.read_to_end().await; // ends by itself at expiry, job still running
    assert_exact(&seqs(&got), 1, 2);
    // Reconnecting with the expired token is refused.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let again = Sse::connect(gw.addr, &path, Some(2)).await;
    assert_eq!(again.status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_secret_only_loopback_is_served() {
    let url = database().await;
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let refused = eventgate::server::run(listener, Config::new(&url), async {}).await;
    let err = refused.expect_err("no auth on a public address is refused");
    assert!(err.to_string().contains("without auth"), "{err}");

    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let mut config = Config::new(&url);
    config.insecure_no_auth = true;
    eventgate::server::run(listener, config, async {})
        .await
        .expect("allowed when asked for explicitly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_allows_listed_origins_only() {
    let url = database().await;
    let mut config = Config::new(&url);
    config.cors_origins = vec!["https://ci.example.com".into()];
    let gw = Gateway::start_with(config).await;

    let preflight = |origin: &'static str| {
        let addr = gw.addr;
        async move {
            request(
                addr,
                "OPTIONS",
                "/api/queue/jobs",
                &[
                    ("Origin", origin),
                    ("Access-Control-Request-Method", "GET"),
                    ("Access-Control-Request-Headers", "authorization"),
                ],
                None,
            )
            .await
            .unwrap()
        }
    };
    let ok = preflight("https://ci.example.com").await;
    assert_eq!(ok.status, 204);
    assert_eq!(
        ok.header("access-control-allow-origin"),
        Some("https://ci.example.com")
    );
    assert_eq!(ok.header("access-control-allow-credentials"), Some("true"));
    assert!(ok
        .header("access-control-allow-headers")
        .unwrap()
        .contains("Authorization"));
    let bad = preflight("https://evil.example.com").await;
    assert_eq!(bad.status, 403);
    assert!(bad.header("access-control-allow-origin").is_none());

    let listed = request(
        gw.addr,
        "GET",
        "/api/queue/jobs",
        &[("Origin", "https://ci.example.com")],
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        listed.header("access-control-allow-origin"),
        Some("https://ci.example.com")
    );
    let unlisted = request(
        gw.addr,
        "GET",
        "/api/queue/jobs",
        &[("Origin", "https://evil.example.com")],
        None,
    )
    .await
    .unwrap();
    assert!(unlisted.header("access-control-allow-origin").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_answer_with_their_status_codes() {
    let url = database().await;
    let mut config = Config::new(&url);
    config.max_body = 1 << 20;
    config.max_message = 1000;
    config.max_page = 50;
    config.max_streams_per_client = 2;
    let gw = Gateway::start_with(config).await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let job = create_job(&db).await;

    // 10 MiB append: 413 before the body is read.
    let huge = vec![b'a'; 10 << 20];
    let res = request(
        gw.addr,
        "POST",
        &format!("/api/queue/jobs/{job}/events"),
        &[],
        Some(&huge),
    )
    .await
    .unwrap();
    assert_eq!(res.status, 413);
    assert_eq!(res.json()["error"], "body_too_large");
    // A message over the cap.
    let res = post_json(
        gw.addr,
        &format!("/api/queue/jobs/{job}/events"),
        &json!({"message": "m".repeat(1001)}),
    )
    .await;
    assert_eq!(res.status, 413);
    assert_eq!(res.json()["error"], "message_too_large");
    // Page size.
    let res = get(gw.addr, &format!("/api/queue/jobs/{job}/events?limit=51"))
        .await
        .unwrap();
    assert_eq!(res.status, 400);
    // Streams per client address.
    let _a = Sse::job(gw.addr, job, None).await;
    let _b = Sse::job(gw.addr, job, None).await;
    let third = Sse::connect(
        gw.addr,
        &format!("/api/queue/jobs/{job}/events/stream"),
        None,
    )
    .await;
    assert_eq!(third.status, 429);
    drop(_a);
    wait_for("a stream slot frees up", || async {
        let mut sse = Sse::connect(
            gw.addr,
            &format!("/api/queue/jobs/{job}/events/stream"),
            None,
        )
        .await;
        let ok = sse.status == 200;
        if !ok {
            sse.raw.clear();
        }
        ok
    })
    .await;
    assert_eq!(
        last_seq(&db, job).await,
        0,
        "nothing written by refused appends"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_families_move_when_events_flow() {
    let url = database().await;
    let gw = Gateway::start(&url).await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let job = create_job(&db).await;
    let before = get(gw.addr, "/metrics").await.unwrap().text();
    let mut sse = Sse::job(gw.addr, job, None).await;
    insert(&db, job, 10, "m").await;
    sse.until_seq(10).await;
    let after = get(gw.addr, "/metrics").await.unwrap().text();
    for family in [
        "eventgate_connections",
        "eventgate_streams_open",
        "eventgate_hub_jobs",
        "eventgate_notifications_total",
        "eventgate_table_reads_total{purpose=\"live\"}",
        "eventgate_events_delivered_total",
        "eventgate_bytes_delivered_total",
        "eventgate_commit_to_send_seconds_count",
        "eventgate_subscribers{state=\"live\"}",
    ] {
        let (b, a) = (metric_value(&before, family), metric_value(&after, family));
        assert!(a > b, "{family} moved: {b} -> {a}");
    }
    for family in [
        "eventgate_lag_resyncs_total",
        "eventgate_listener_reconnects_total",
        "eventgate_connections_refused_total",
        "eventgate_auth_failures_total{reason=\"missing\"}",
    ] {
        metric_value(&after, family);
    }
}

#[test]
fn logs_and_debug_output_hold_no_secret() {
    // The real binary, with secrets in its environment and a bad database password:
    // its logs must show neither.
    let bin = env!("CARGO_BIN_EXE_eventgate");
    let out = std::process::Command::new(bin)
        .args(["serve", "--listen", "127.0.0.1:0", "--shutdown-grace", "1s"])
        .env(
            "DATABASE_URL",
            "postgres://app:hunter2-db-pass@127.0.0.1:1/nope",
        )
        .env("EVENTGATE_JWT_SECRET", "jwt-secret-never-logged")
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    unsafe {
        libc::kill(out.id() as i32, libc::SIGTERM);
    }
    let out = out.wait_with_output().unwrap();
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        logs.contains("listen"),
        "the gateway logged something: {logs}"
    );
    assert!(!logs.contains("hunter2-db-pass"), "{logs}");
    assert!(!logs.contains("jwt-secret-never-logged"), "{logs}");

    let mut config = Config::new("postgres://app:hunter2-db-pass@db/x");
    config.auth = Auth::hs256(b"jwt-secret-never-logged");
    let debug = format!("{config:?}");
    assert!(!debug.contains("hunter2-db-pass") && !debug.contains("jwt-secret-never-logged"));
}

#[test]
fn sigterm_drains_open_streams_within_the_deadline() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = rt.block_on(database());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_eventgate"))
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--shutdown-grace",
            "3s",
        ])
        .env("DATABASE_URL", &url)
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    rt.block_on(async {
        wait_for("gateway up", || async {
            matches!(get(addr, "/readyz").await, Ok(r) if r.status == 200)
        })
        .await;
        let db = eventgate::db::connect(&url).await.unwrap();
        let job = create_job(&db).await;
        let mut streams =
            futures::future::join_all((0..5).map(|_| Sse::job(addr, job, None))).await;
        for sse in streams.iter_mut() {
            sse.next_raw().await; // the first retry frame
        }
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let started = std::time::Instant::now();
        for sse in streams.iter_mut() {
            assert!(sse.read_to_end().await.is_empty());
            let text = String::from_utf8(sse.raw.clone()).unwrap();
            assert_eq!(text.matches("retry: ").count(), 2, "{text:?}");
        }
        assert!(started.elapsed() < Duration::from_secs(30));
    });
    let mut child = child;
    let status = child.wait().unwrap();
    assert!(status.success(), "clean exit after drain: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_deletes_only_old_finished_jobs_events_in_batches() {
    let url = database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let old = create_job(&db).await;
    let recent = create_job(&db).await;
    let running = create_job(&db).await;
    for job in [old, recent, running] {
        insert(&db, job, 1200, "line").await;
    }
    set_status(&db, old, "succeeded").await;
    set_status(&db, recent, "failed").await;
    db.execute(
        "UPDATE agent_jobs SET finished_at = now() - interval '40 days' WHERE id = $1",
        &[&old],
    )
    .await
    .unwrap();
    let deleted = eventgate::prune::run(&url, Duration::from_secs(30 * 86400), 500)
        .await
        .unwrap();
    assert_eq!(deleted, 1201, "the old job's events, status event included");
    let count = |job| {
        let db = &db;
        async move {
            db.query_one(
                "SELECT count(*) FROM agent_job_events WHERE job_id = $1",
                &[&job],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
        }
    };
    assert_eq!(count(old).await, 0);
    assert_eq!(count(recent).await, 1201);
    assert_eq!(count(running).await, 1200);
}

#[test]
fn the_token_command_mints_what_the_gateway_accepts() {
    let job = uuid::Uuid::new_v4();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_eventgate"))
        .args([
            "token",
            "--scope",
            "read",
            "--job",
            &job.to_string(),
            "--ttl",
            "1h",
        ])
        .env("EVENTGATE_JWT_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let auth = Auth::hs256(SECRET.as_bytes());
    let req = hyper::Request::get("/")
        .header("authorization", format!("Bearer {token}"))
        .body(())
        .unwrap();
    let grant = auth
        .check(&req, eventgate::auth::Scope::Read, Some(job))
        .expect("accepted");
    let left = grant
        .expires_at()
        .unwrap()
        .duration_since(SystemTime::now())
        .unwrap();
    assert!(left > Duration::from_secs(3500) && left <= Duration::from_secs(3600));
    assert!(auth
        .check(&req, eventgate::auth::Scope::Write, Some(job))
        .is_err());

    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_eventgate"))
        .args(["token", "--scope", "admin", "--job", "*"])
        .env("EVENTGATE_JWT_SECRET", SECRET)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2), "a usage mistake exits 2");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown scope"));
}
