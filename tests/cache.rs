//! HTTP caching of finished history, against one real gateway: a finished job's polling
//! pages and raw log carry a strong `ETag` and an immutable `Cache-Control` (`public`
//! with auth off, `private` with auth on), `If-None-Match` gets 304 without a read of
//! its events, and everything that can still change stays uncacheable. Pages are
//! compressed when the client accepts it.

mod common;

use std::time::Duration;

use common::*;
use eventgate::Config;
use tokio::io::AsyncWriteExt;

const PAGE_READS: &str = "eventgate_table_reads_total{purpose=\"page\"}";
const IMMUTABLE_PUBLIC: &str = "public, max-age=31536000, immutable";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_jobs_pages_are_immutable_and_revalidate_with_304() {
    let url = database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let gateway = Gateway::start(&url).await;
    let job = create_job(&db).await;
    insert(&db, job, 30, "history").await;
    let page = format!("/api/queue/jobs/{job}/events?afterSeq=0&limit=10");

    // Running: the page may still grow (the last one) or be replaced: not cacheable.
    let running = get(gateway.addr, &page).await.unwrap();
    assert_eq!(running.status, 200);
    assert_eq!(running.header("cache-control"), Some("no-store"));
    assert_eq!(running.header("etag"), None);

    set_status(&db, job, "succeeded").await;
    let first = get(gateway.addr, &page).await.unwrap();
    assert_eq!(first.status, 200);
    assert_eq!(first.header("cache-control"), Some(IMMUTABLE_PUBLIC));
    let etag = first
        .header("etag")
        .expect("a finished page has an etag")
        .to_string();
    assert!(
        etag.starts_with('"') && !etag.starts_with("W/"),
        "strong: {etag}"
    );
    // The same request gives the same tag; another range another one.
    let again = get(gateway.addr, &page).await.unwrap();
    assert_eq!(again.header("etag"), Some(etag.as_str()));
    assert_eq!(again.body, first.body);
    let other = get(
        gateway.addr,
        &format!("/api/queue/jobs/{job}/events?afterSeq=10&limit=10"),
    )
    .await
    .unwrap();
    assert_ne!(other.header("etag"), Some(etag.as_str()));

    // If-None-Match: 304, no body, and no read of the job's events.
    let reads = gateway.metric(PAGE_READS).await;
    for inm in [etag.clone(), format!("\"nope\", W/{etag}")] {
        let res = request(gateway.addr, "GET", &page, &[("If-None-Match", &inm)], None)
            .await
            .unwrap();
        assert_eq!(res.status, 304, "If-None-Match: {inm}");
        assert!(res.body.is_empty());
        assert_eq!(res.header("etag"), Some(etag.as_str()));
        assert_eq!(res.header("cache-control"), Some(IMMUTABLE_PUBLIC));
    }
    assert_eq!(
        gateway.metric(PAGE_READS).await,
        reads,
        "a 304 read the table"
    );
    // A tag that is not this page's: the page, read again.
    let stale = request(
        gateway.addr,
        "GET",
        &page,
        &[("If-None-Match", "\"something-else\"")],
        None,
    )
    .await
    .unwrap();
    assert_eq!(stale.status, 200);
    assert_eq!(stale.body, first.body);
    assert_eq!(gateway.metric(PAGE_READS).await, reads + 1);

    // Compressed when accepted, a representation (and a tag) of its own.
    let gzip = request(
        gateway.addr,
        "GET",
        &page,
        &[("Accept-Encoding", "gzip")],
        None,
    )
    .await
    .unwrap();
    assert_eq!(gzip.status, 200);
    assert_eq!(gzip.header("content-encoding"), Some("gzip"));
    assert_eq!(gzip.header("vary"), Some("Accept-Encoding"));
    assert_ne!(gzip.header("etag"), Some(etag.as_str()));
    let mut decoder = async_compression::tokio::write::GzipDecoder::new(Vec::new());
    decoder.write_all(&gzip.body).await.unwrap();
    decoder.shutdown().await.unwrap();
    assert_eq!(decoder.into_inner(), first.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_jobs_raw_log_is_immutable_per_coding() {
    let url = database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let gateway = Gateway::start(&url).await;
    let job = create_job(&db).await;
    insert(&db, job, 20, "log line").await;
    let log = format!("/api/queue/jobs/{job}/log");

    let running = get(gateway.addr, &log).await.unwrap();
    assert_eq!(running.header("etag"), None);
    assert!(running
        .header("cache-control")
        .is_some_and(|c| c.contains("no-cache")));

    set_status(&db, job, "failed").await;
    let plain = get(gateway.addr, &log).await.unwrap();
    assert_eq!(plain.status, 200);
    assert_eq!(plain.header("cache-control"), Some(IMMUTABLE_PUBLIC));
    assert_eq!(plain.header("vary"), Some("Accept-Encoding"));
    assert_eq!(plain.header("x-accel-buffering"), None);
    let etag = plain.header("etag").unwrap().to_string();
    let gzip = request(
        gateway.addr,
        "GET",
        &log,
        &[("Accept-Encoding", "gzip")],
        None,
    )
    .await
    .unwrap();
    assert_eq!(gzip.header("content-encoding"), Some("gzip"));
    let gzip_etag = gzip.header("etag").unwrap().to_string();
    assert_ne!(gzip_etag, etag, "each coding is its own representation");

    let res = request(gateway.addr, "GET", &log, &[("If-None-Match", &etag)], None)
        .await
        .unwrap();
    assert_eq!(res.status, 304);
    assert!(res.body.is_empty());
    // The plain tag does not match the gzip representation.
    let res = request(
        gateway.addr,
        "GET",
        &log,
        &[("If-None-Match", &etag), ("Accept-Encoding", "gzip")],
        None,
    )
    .await
    .unwrap();
    assert_eq!(res.status, 200);
    assert_eq!(res.body, gzip.body);

    // Following is live by nature: never cached.
    let follow = get(gateway.addr, &format!("{log}?follow=1")).await.unwrap();
    assert_eq!(follow.status, 200);
    assert_eq!(follow.header("etag"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_on_finished_history_is_private() {
    let url = database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let secret = b"cache test secret, long enough for hs256";
    let mut config = Config::new(&url);
    config.auth = eventgate::auth::Auth::hs256(secret);
    let gateway = Gateway::start_with(config).await;
    let job = create_job(&db).await;
    insert(&db, job, 3, "secret history").await;
    set_status(&db, job, "succeeded").await;
    let token = eventgate::auth::mint(
        secret,
        &[eventgate::auth::Scope::Read],
        &[job.to_string()],
        Duration::from_secs(600),
        None,
    )
    .unwrap();
    let bearer = format!("Bearer {token}");
    for path in [
        format!("/api/queue/jobs/{job}/events"),
        format!("/api/queue/jobs/{job}/log"),
    ] {
        let res = request(
            gateway.addr,
            "GET",
            &path,
            &[("Authorization", &bearer)],
            None,
        )
        .await
        .unwrap();
        assert_eq!(res.status, 200, "{path}: {}", res.text());
        assert_eq!(
            res.header("cache-control"),
            Some("private, max-age=31536000, immutable"),
            "{path}"
        );
        let etag = res.header("etag").unwrap().to_string();
        // Without a token: 401 even with the right tag (auth comes first).
        let res = request(
            gateway.addr,
            "GET",
            &path,
            &[("If-None-Match", &etag)],
            None,
        )
        .await
        .unwrap();
        assert_eq!(res.status, 401, "{path}");
        let res = request(
            gateway.addr,
            "GET",
            &path,
            &[("If-None-Match", &etag), ("Authorization", &bearer)],
            None,
        )
        .await
        .unwrap();
        assert_eq!(res.status, 304, "{path}");
    }
}
