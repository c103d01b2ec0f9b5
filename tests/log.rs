//! The raw log route `GET /api/queue/jobs/{id}/log` against a real PostgreSQL over a
//! real socket: the exact bytes of the table, plain and compressed, and `follow=1`.

mod common;

use std::time::Duration;

use async_compression::tokio::write::{BrotliDecoder, GzipDecoder, ZstdDecoder};
use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use uuid::Uuid;

/// The log as the table holds it: every message in seq order, each followed by `\n`.
async fn table_text(client: &tokio_postgres::Client, job: Uuid) -> String {
    client
        .query_one(
            "SELECT coalesce(string_agg(message || E'\\n', '' ORDER BY seq), '') \
             FROM agent_job_events WHERE job_id = $1",
            &[&job],
        )
        .await
        .unwrap()
        .get(0)
}

/// A finished job whose log spans several pages, with lines that are awkward to carry:
/// several lines in one event, colours, an empty message, non-ASCII text, a large event.
async fn awkward_job(client: &tokio_postgres::Client) -> Uuid {
    let job = create_job(client).await;
    client
        .execute(
            "INSERT INTO agent_job_events (job_id, level, message, payload) \
             SELECT $1, 'info', CASE i % 5 \
                 WHEN 0 THEN 'line ' || i || E'\\nsecond part ' || i \
                 WHEN 1 THEN E'\\x1b[31mred ' || i || E'\\x1b[0m done' \
                 WHEN 2 THEN '' \
                 WHEN 3 THEN 'ünïcødé ✓ ' || i || ' \u{202e}bidi' \
                 ELSE repeat('x', 300) || i END, \
                 '{\"kind\": \"log\", \"stream\": \"stdout\"}' \
             FROM generate_series(1, 2600) AS i",
            &[&job],
        )
        .await
        .unwrap();
    // One event larger than a page's byte budget on its own.
    client
        .execute(
            "INSERT INTO agent_job_events (job_id, message) VALUES ($1, repeat('big ', 300000))",
            &[&job],
        )
        .await
        .unwrap();
    set_status(client, job, "succeeded").await;
    job
}

async fn log(gateway: &Gateway, path: &str, accept: Option<&str>) -> Response {
    let headers: Vec<(&str, &str)> = accept.map(|a| ("accept-encoding", a)).into_iter().collect();
    request(gateway.addr, "GET", path, &headers, None)
        .await
        .unwrap()
}

async fn decode(coding: &str, body: &[u8]) -> Vec<u8> {
    async fn run<W: tokio::io::AsyncWrite + Unpin>(mut w: W, body: &[u8]) -> W {
        w.write_all(body).await.unwrap();
        w.shutdown().await.unwrap();
        w
    }
    match coding {
        "gzip" => run(GzipDecoder::new(Vec::new()), body).await.into_inner(),
        "br" => run(BrotliDecoder::new(Vec::new()), body).await.into_inner(),
        "zstd" => run(ZstdDecoder::new(Vec::new()), body).await.into_inner(),
        other => panic!("unexpected coding {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_raw_log_is_the_table_byte_for_byte_plain_and_compressed() {
    let url = database().await;
    let client = eventgate::db::connect(&url).await.unwrap();
    let job = awkward_job(&client).await;
    let expected = table_text(&client, job).await;
    let gateway = Gateway::start(&url).await;
    let path = format!("/api/queue/jobs/{job}/log");

    // Plain: text/plain, every message and its newline, nothing else.
    let plain = log(&gateway, &path, None).await;
    assert_eq!(plain.status, 200);
    assert_eq!(
        plain.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(plain.header("content-encoding"), None);
    assert_eq!(plain.body.len(), expected.len());
    assert!(plain.body == expected.as_bytes(), "plain body differs");

    // Compressed in each coding the client accepts, and the same bytes once decoded.
    for (accept, coding) in [
        ("gzip", "gzip"),
        ("gzip, deflate, br", "br"),
        ("gzip, br, zstd", "zstd"),
    ] {
        let res = log(&gateway, &path, Some(accept)).await;
        assert_eq!(res.status, 200);
        assert_eq!(res.header("content-encoding"), Some(coding), "{accept}");
        assert_eq!(res.header("vary"), Some("Accept-Encoding"));
        assert!(res.body.len() < expected.len() / 4, "{coding} compresses");
        let decoded = decode(coding, &res.body).await;
        assert!(decoded == expected.as_bytes(), "{coding} body differs");
    }

    // ansi=strip: the same lines without escape sequences.
    let stripped = log(&gateway, &format!("{path}?ansi=strip"), None).await;
    let text = stripped.text();
    assert!(!text.contains('\u{1b}'));
    assert!(
        text.contains("\nred 6 done\n"),
        "colours removed, text kept"
    );
    assert_eq!(text.lines().count(), expected.lines().count());

    // download=1 names a file.
    let download = log(&gateway, &format!("{path}?download=1"), None).await;
    assert_eq!(
        download.header("content-disposition"),
        Some(format!("attachment; filename=\"job-{job}.log\"").as_str())
    );

    // events?line=N starts at the event holding line N (events of two lines included).
    let lines = expected.split('\n').count() as i64 - 1;
    for n in [1, 2, 3, 7, 1000, 1001, lines - 1, lines] {
        let page = log(
            &gateway,
            &format!("/api/queue/jobs/{job}/events?line={n}&limit=2"),
            None,
        )
        .await;
        let first = &page.json()["items"][0];
        let from = first["line"].as_i64().unwrap();
        let parts = first["message"].as_str().unwrap().split('\n').count() as i64;
        assert!(
            from <= n && n < from + parts,
            "line {n} is in the event at {first}"
        );
        let text: String = expected
            .split_inclusive('\n')
            .skip(from as usize - 1)
            .take(parts as usize)
            .collect();
        assert_eq!(format!("{}\n", first["message"].as_str().unwrap()), text);
    }

    // Unknown jobs and malformed ids are JSON errors.
    let missing = log(
        &gateway,
        &format!("/api/queue/jobs/{}/log", Uuid::new_v4()),
        None,
    )
    .await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["error"], "job_not_found");
    assert_eq!(
        log(&gateway, "/api/queue/jobs/nope/log", None).await.status,
        400
    );
    let bad = log(&gateway, &format!("{path}?follow=maybe"), None).await;
    assert_eq!(bad.status, 400);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_appends_live_events_and_ends_at_the_jobs_end() {
    let url = database().await;
    let client = eventgate::db::connect(&url).await.unwrap();
    let job = create_job(&client).await;
    insert(&client, job, 1500, "before").await;
    let gateway = Gateway::start(&url).await;

    for accept in [None, Some("gzip")] {
        let job = if accept.is_none() {
            job
        } else {
            let job = create_job(&client).await;
            insert(&client, job, 10, "before").await;
            job
        };
        // Given a following request that has read the log so far...
        let mut conn = Conn::new(TcpStream::connect(gateway.addr).await.unwrap());
        let headers: Vec<(&str, &str)> =
            accept.map(|a| ("accept-encoding", a)).into_iter().collect();
        conn.send(
            "GET",
            &format!("/api/queue/jobs/{job}/log?follow=1"),
            &headers,
            None,
            true,
        )
        .await
        .unwrap();
        let (status, head) = conn.read_head().await.unwrap();
        assert_eq!(status, 200);
        let mut body = Vec::new();
        if accept.is_none() {
            // Plain text arrives as it is read: wait until the backlog is there.
            while !String::from_utf8_lossy(&body).contains("before 1500\n") {
                let chunk = tokio::time::timeout(PATIENCE, conn.read_chunk())
                    .await
                    .expect("backlog arrives")
                    .unwrap()
                    .expect("the response is still open");
                body.extend_from_slice(&chunk);
            }
        }

        // ...when events are appended and the job then fails...
        tokio::time::sleep(Duration::from_millis(100)).await;
        insert(&client, job, 5, "live").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        insert(&client, job, 5, "later").await;
        set_status(&client, job, "failed").await;

        // ...then the response ends by itself, holding exactly the table's log.
        let rest = tokio::time::timeout(PATIENCE, conn.read_body_to_end(&head))
            .await
            .expect("the log ends with the job")
            .unwrap();
        body.extend_from_slice(&rest);
        let body = match accept {
            Some(coding) => {
                assert!(head
                    .iter()
                    .any(|(k, v)| k.eq_ignore_ascii_case("content-encoding") && v == coding));
                decode(coding, &body).await
            }
            None => body,
        };
        let expected = table_text(&client, job).await;
        assert!(expected.contains("later 5\n"));
        assert_eq!(String::from_utf8(body).unwrap(), expected);
    }

    // A finished job's follow ends at once, like a plain read.
    let res = log(
        &gateway,
        &format!("/api/queue/jobs/{job}/log?follow=1"),
        None,
    )
    .await;
    assert_eq!(res.status, 200);
    assert_eq!(res.text(), table_text(&client, job).await);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn level_error_finds_the_first_error_however_far_into_the_log() {
    let url = database().await;
    let client = eventgate::db::connect(&url).await.unwrap();
    let job = create_job(&client).await;
    // 3,000 events of two lines each; errors at seqs 1700 and 2100, far past one page.
    client
        .execute(
            "INSERT INTO agent_job_events (job_id, level, message, payload) \
             SELECT $1, CASE WHEN i IN (1700, 2100) THEN 'error' ELSE 'info' END, \
                 'event ' || i || E'\\nsecond ' || i, '{\"kind\": \"log\"}' \
             FROM generate_series(1, 3000) AS i",
            &[&job],
        )
        .await
        .unwrap();
    set_status(&client, job, "failed").await;
    let gateway = Gateway::start(&url).await;
    let page = |query: String| {
        let path = format!("/api/queue/jobs/{job}/events?{query}");
        let gateway = &gateway;
        async move { log(gateway, &path, None).await }
    };
    let only = |res: &Response| -> Vec<(i64, i64, String)> {
        res.json()["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                assert_eq!(e["level"], "error", "{e}");
                (
                    e["seq"].as_i64().unwrap(),
                    e["line"].as_i64().unwrap(),
                    e["message"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };

    let first = page("level=error&limit=1".into()).await;
    assert_eq!(first.status, 200);
    assert_eq!(
        only(&first),
        vec![(1700, 3399, "event 1700\nsecond 1700".into())]
    );
    assert_eq!(first.json()["nextAfterSeq"], 1700);
    // The next one after it, and a range below one.
    let next = page("level=error&limit=1&afterSeq=1700".into()).await;
    assert_eq!(only(&next)[0].0, 2100);
    let below = page("level=error&beforeSeq=2000".into()).await;
    assert_eq!(only(&below).iter().map(|e| e.0).collect::<Vec<_>>(), [1700]);
    // Newest first: the failed status event is the last error.
    let last = page("level=error&sort=desc&limit=2".into()).await;
    let last = only(&last);
    assert_eq!(last[0].2, "status: failed");
    assert_eq!(last[1].0, 2100);
    // Every error, ascending.
    let all = page("level=error".into()).await;
    assert_eq!(
        only(&all).iter().map(|e| e.0).collect::<Vec<_>>(),
        [1700, 2100, 3001]
    );
    // None of a level: an empty page, not an error.
    let warn = page("level=warn".into()).await;
    assert_eq!(warn.status, 200);
    assert_eq!(warn.json()["items"], serde_json::json!([]));

    let bad = page("level=fatal".into()).await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["error"], "invalid_level");
    gateway.stop().await;
}
