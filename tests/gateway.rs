//! The gateway against a real PostgreSQL over real sockets: each test is one invariant
//! of DESIGN.md or one promise of the HTTP contract.

mod common;

use std::time::Duration;

use common::*;
use eventgate::Config;
use futures::future::join_all;
use serde_json::json;

// ---------------------------------------------------------------------------------
// Invariant 1: exact order.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seqs_are_gap_free_and_in_commit_order_under_concurrent_writers() {
    let url = database().await;
    let setup = eventgate::db::connect(&url).await.unwrap();
    let job = create_job(&setup).await;

    // Given a transaction that takes seq 1 and stays open...
    let mut slow = eventgate::db::connect(&url).await.unwrap();
    let slow_tx = slow.transaction().await.unwrap();
    slow_tx
        .execute(
            "INSERT INTO agent_job_events (job_id, message) VALUES ($1, 'slow')",
            &[&job],
        )
        .await
        .unwrap();

    // ...when faster writers start after it and commit first...
    let fast = tokio::spawn({
        let url = url.clone();
        async move {
            let c = eventgate::db::connect(&url).await.unwrap();
            insert(&c, job, 3, "fast").await;
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !fast.is_finished(),
        "a second writer waits for the first to commit"
    );
    // A reader now sees nothing: no later seq is visible before the slow one.
    assert_eq!(last_seq(&setup, job).await, 0);
    slow_tx.commit().await.unwrap();
    fast.await.unwrap();

    // ...then seqs follow commit order with no gap: the slow row is 1, the fast ones 2..4.
    let rows = setup
        .query(
            "SELECT seq, message FROM agent_job_events WHERE job_id = $1 ORDER BY seq",
            &[&job],
        )
        .await
        .unwrap();
    let got: Vec<(i64, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        got,
        vec![
            (1, "slow".to_string()),
            (2, "fast 1".into()),
            (3, "fast 2".into()),
            (4, "fast 3".into())
        ]
    );

    // And many concurrent sessions still give 1..=N with no gap.
    let writers = (0..6).map(|w| {
        let url = url.clone();
        tokio::spawn(async move {
            let c = eventgate::db::connect(&url).await.unwrap();
            for i in 0..25 {
                insert(&c, job, 1 + (i % 3), &format!("w{w}")).await;
            }
        })
    });
    join_all(writers).await;
    let n = last_seq(&setup, job).await;
    let count: i64 = setup
        .query_one(
            "SELECT count(DISTINCT seq) FROM agent_job_events WHERE job_id = $1",
            &[&job],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, n, "no gap and no duplicate seq");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_transaction_never_makes_a_subscriber_skip() {
    // The bigserial trap: with a global id, a reader that saw id 5 of a fast writer
    // would skip id 4 of a slow one that commits later. Per-job seqs make it wait.
    let url = database().await;
    let gw = Gateway::start(&url).await;
    let setup = eventgate::db::connect(&url).await.unwrap();
    let job = create_job(&setup).await;
    let mut sse = Sse::job(gw.addr, job, None).await;

    let mut slow = eventgate::db::connect(&url).await.unwrap();
    let slow_tx = slow.transaction().await.unwrap();
    slow_tx
        .execute(
            "INSERT INTO agent_job_events (job_id, message) VALUES ($1, 'slow')",
            &[&job],
        )
        .await
        .unwrap();
    let fast = tokio::spawn({
        let url = url.clone();
        async move {
            let c = eventgate::db::connect(&url).await.unwrap();
            insert(&c, job, 5, "fast").await;
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    slow_tx.commit().await.unwrap();
    fast.await.unwrap();

    let got = sse.until_seq(6).await;
    assert_exact(&seqs(&got), 1, 6);
    assert_eq!(got[0].json()["message"], "slow");
}

// ---------------------------------------------------------------------------------
// Invariant 2: exactly once.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_subscribers_get_identical_streams_with_exact_bytes() {
    let url = database().await;
    let gw = Gateway::start(&url).await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let job = create_job(&db).await;
    let mut subscribers = join_all((0..8).map(|_| Sse::job(gw.addr, job, None))).await;

    for round in 0..10 {
        insert(&db, job, 1 + round % 4, &format!("round {round}")).await;
    }
    let n = last_seq(&db, job).await;
    for sse in subscribers.iter_mut() {
        assert_exact(&seqs(&sse.until_seq(n).await), 1, n);
        assert_eq!(
            sse.header("content-type"),
            Some("text/event-stream; charset=utf-8")
        );
        assert_eq!(sse.header("cache-control"), Some("no-cache, no-transform"));
        assert_eq!(sse.header("x-accel-buffering"), Some("no"));
    }
    let first = subscribers[0].raw.clone();
    for sse in &subscribers[1..] {
        assert_eq!(sse.raw, first, "every subscriber sees the same bytes");
    }

    // The exact frame of seq 1, built from the row itself.
    let row = db
        .query_one(
            "SELECT id, message, payload::text, \
             to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') \
             FROM agent_job_events WHERE job_id = $1 AND seq = 1",
            &[&job],
        )
        .await
        .unwrap();
    let (id, message, payload, created): (uuid::Uuid, String, String, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    // The id names the event: its seq, and the last 8 hex digits of its id.
    let tag = &id.to_string()[28..];
    let expected = format!(
        "retry: 2000\n\nid: 1-{tag}\nevent: queue_event\ndata: {{\"id\":\"{id}\",\"jobId\":\"{job}\",\
         \"seq\":1,\"line\":1,\"level\":\"info\",\"message\":\"{message}\",\"payload\":{payload},\
         \"createdAt\":\"{created}\"}}\n\n"
    );
    let text = String::from_utf8(first).unwrap();
    assert!(
        text.starts_with(&expected),
        "wire bytes:\n{text:.600}\nexpected prefix:\n{expected}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_racing_new_subscribers_lose_and_repeat_nothing() {
    let url = database().await;
    let gw = Gateway::start(&url).await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let job = create_job(&db).await;

    // Writers keep committing while subscribers join at different moments, each
    // backfilling from the table and handing over to live.
    let writer = tokio::spawn({
        let url = url.clone();
        async move {
            let c = eventgate::db::connect(&url).await.unwrap();
            for i in 0..150 {
                insert(&c, job, 1 + i % 5, "race").await;
                if i % 10 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            set_status(&c, job, "succeeded").await;
        }
    });
    let mut readers = Vec::new();
    for i in 0..10u64 {
        tokio::time::sleep(Duration::from_millis(7 * i)).await;
        let addr = gw.addr;
        readers.push(tokio::spawn(async move {
            let mut sse = Sse::job(addr, job, None).await;
            sse.read_to_end().await
        }));
    }
    writer.await.unwrap();
    let n = last_seq(&db, job).await;
    for reader in readers {
        let got = reader.await.unwrap();
        assert_exact(&seqs(&got), 1, n);
        let end = got.last().unwrap();
        assert_eq!(end.event, "end");
        assert_eq!(end.json(), json!({"status": "succeeded", "lastSeq": n}));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_from_last_event_id_or_after_seq_gives_exactly_the_rest() {
    let url = database().await;
    let gw = Gateway::start(&url).await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let job = create_job(&db).await;
    insert(&db, job, 50, "x").await;

    let mut by_header = Sse::job(gw.addr, job, Some(20)).await;
    assert_exact(&seqs(&by_header.until_seq(50).await), 21, 50);

    let path = format!("/api/queue/jobs/{job}/events/stream?afterSeq=30");
    let mut by_query = Sse::connect(gw.addr, &path, None).await;
    assert_exact(&seqs(&by_query.until_seq(50).await), 31, 50);

    // The header wins over the query, as a browser's reconnect carries both.
    let mut both = Sse::connect(gw.addr, &path, Some(45)).await;
    assert_exact(&seqs(&both.until_seq(50).await), 46, 50);

    // And live events keep coming after the resume point.
    insert(&db, job, 3, "after").await;
    assert_exact(&seqs(&by_header.until_seq(53).await), 51, 53);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_stops_reading_gets_everything_when_it_reads_again() {
    let url = database().await;
    // A tiny channel and ring force the lag path: the stalled subscriber loses its
    // place in the channel and must resync from the table.
    let mut config = Config::new(&url);
    config.hub.channel_capacity = 4;
    config.hub.ring_events = 64;
    let gw = Gateway::start_with(config).await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let job = create_job(&db).await;
    let mut stalled = Sse::job(gw.addr, job, None).await;
    let mut reader = Sse::job(gw.addr, job, None).await;

    // Thousands of events with long messages, well past the socket buffers, while the
    // stalled subscriber reads nothing.
    // The reader takes each batch before the next is written, so there is one
    // broadcast per statement: far more than the channel holds.
    let big = "y".repeat(2000);
    let mut read = Vec::new();
    for i in 1..=60 {
        insert(&db, job, 100, &big).await;
        read.extend(seqs(&reader.until_seq(i * 100).await));
    }
    let n = last_seq(&db, job).await;
    assert_eq!(n, 6000);
    assert_exact(&read, 1, n);

    assert_exact(&seqs(&stalled.until_seq(n).await), 1, n);
    assert!(
        gw.metric("eventgate_lag_resyncs_total").await >= 1,
        "the stalled subscriber went through the lag path"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_restart_loses_and_repeats_nothing() {
    let url = database().await;
    let gw = Gateway::start(&url).await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let job = create_job(&db).await;
    insert(&db, job, 10, "before").await;
    let mut sse = Sse::job(gw.addr, job, None).await;
    let mut got = seqs(&sse.until_seq(10).await);
    let addr = gw.addr;

    // The gateway stops: the stream ends with a retry hint.
    gw.stop().await;
    assert!(sse.read_to_end().await.is_empty());
    insert(&db, job, 10, "while down").await;

    // A new gateway on the same address; the client resumes with its last id.
    let gw = Gateway::start_on(addr, Config::new(&url)).await;
    let mut sse = Sse::job(gw.addr, job, got.last().copied()).await;
    insert(&db, job, 5, "after").await;
    got.extend(seqs(&sse.until_seq(25).await));
    assert_exact(&got, 1, 25);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_loss_pool_loss_and_postgres_restart_lose_nothing() {
    let (cluster, url) = own_cluster().await;
    let gw = Gateway::start(&url).await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let job = create_job(&db).await;
    let mut subscribers = join_all((0..3).map(|_| Sse::job(gw.addr, job, None))).await;
    insert(&db, job, 10, "start").await;

    // Kill every other backend: the LISTEN connection and the pool's connections.
    let killed: i64 = db
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE pid <> pg_backend_pid() AND datname = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(killed >= 1, "the listener's backend was terminated");
    // Written while the listener is down: only the catch-up sweep can deliver these.
    insert(&db, job, 10, "while listener down").await;
    gw.wait_ready().await;
    insert(&db, job, 5, "after reconnect").await;
    for sse in subscribers.iter_mut() {
        assert_exact(&seqs(&sse.until_seq(25).await), 1, 25);
    }

    // A fast restart of PostgreSQL: every connection dies, ours too.
    drop(db);
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.restart().expect("restart postgresql");
        cluster
    })
    .await
    .unwrap();
    let db = connect_retry(&url).await;
    insert(&db, job, 10, "after restart").await;
    gw.wait_ready().await;
    insert(&db, job, 5, "after listener is back").await;
    set_status(&db, job, "succeeded").await;
    let n = last_seq(&db, job).await;
    for sse in subscribers.iter_mut() {
        let rest = sse.read_to_end().await;
        assert_exact(&seqs(&rest), 26, n);
        assert_eq!(rest.last().unwrap().event, "end");
    }
    assert!(gw.metric("eventgate_listener_reconnects_total").await >= 2);

    // The next requests work on fresh connections.
    let res = get(gw.addr, &format!("/api/queue/jobs/{job}"))
        .await
        .unwrap();
    assert_eq!(res.status, 200);
    assert_eq!(res.json()["status"], "succeeded");
    let res = get(gw.addr, &format!("/api/queue/jobs/{job}/events?limit=5"))
        .await
        .unwrap();
    assert_eq!(res.status, 200);
    drop(cluster);
}

// ---------------------------------------------------------------------------------
// Invariants 3 and 4: reads scale with writes; frames are encoded once.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_table_reads_do_not_depend_on_the_number_of_subscribers() {
    let url = database().await;
    let gw = Gateway::start(&url).await;
    let db = eventgate::db::connect(&url).await.unwrap();
    const BATCHES: i64 = 20;

    let mut reads = Vec::new();
    for subscribers in [1usize, 25] {
        let job = create_job(&db).await;
        let mut streams = join_all((0..subscribers).map(|_| Sse::job(gw.addr, job, None))).await;
        let before_reads = gw
            .metric("eventgate_table_reads_total{purpose=\"live\"}")
            .await;
        let before_encoded = gw.metric("eventgate_batches_encoded_total").await;
        for b in 1..=BATCHES {
            insert(&db, job, 3, "batch").await;
            // Wait until every subscriber has it, so batches cannot coalesce.
            for sse in streams.iter_mut() {
                sse.until_seq(b * 3).await;
            }
        }
        let live_reads = gw
            .metric("eventgate_table_reads_total{purpose=\"live\"}")
            .await
            - before_reads;
        let encoded = gw.metric("eventgate_batches_encoded_total").await - before_encoded;
        // One read per write batch (plus at most one when the job's state was made),
        // and each batch encoded once for all subscribers.
        assert!(
            live_reads <= BATCHES as u64 + 2,
            "{subscribers} subscribers: {live_reads} live reads for {BATCHES} batches"
        );
        assert!(
            encoded <= BATCHES as u64 + 1,
            "{encoded} encodes for {BATCHES} batches"
        );
        reads.push(live_reads);
    }
    assert!(
        reads[1] <= reads[0] + 2,
        "25 subscribers cost {} reads, 1 subscriber {}",
        reads[1],
        reads[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_inside_the_recent_window_are_served_from_memory() {
    let url = database().await;
    let gw = Gateway::start(&url).await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let job = create_job(&db).await;
    let mut live = Sse::job(gw.addr, job, None).await; // keeps the job's state alive
    for _ in 0..10 {
        insert(&db, job, 10, "x").await;
    }
    live.until_seq(100).await;

    let backfill_before = gw
        .metric("eventgate_table_reads_total{purpose=\"backfill\"}")
        .await;
    // A storm of 50 clients resuming at different points inside the ring.
    let storm = (0..50).map(|i| {
        let addr = gw.addr;
        async move {
            let from = 50 + i;
            let mut sse = Sse::job(addr, job, Some(from)).await;
            (from, seqs(&sse.until_seq(100).await))
        }
    });
    for (from, got) in join_all(storm).await {
        assert_exact(&got, from + 1, 100);
    }
    let backfill_after = gw
        .metric("eventgate_table_reads_total{purpose=\"backfill\"}")
        .await;
    assert_eq!(
        backfill_after, backfill_before,
        "no table read for resumes in the ring"
    );
    assert!(gw.metric("eventgate_ring_catch_ups_total").await >= 50);
}

// ---------------------------------------------------------------------------------
// Invariant 5: bounded memory.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_jobs_are_dropped_from_the_hub() {
    let url = database().await;
    let mut config = Config::new(&url);
    config.hub.idle_grace = Duration::from_millis(100);
    let gw = Gateway::start_with(config).await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let job = create_job(&db).await;
    {
        let mut sse = Sse::job(gw.addr, job, None).await;
        insert(&db, job, 1, "x").await;
        sse.until_seq(1).await;
        assert_eq!(gw.metric("eventgate_hub_jobs").await, 1);
    }
    wait_for("idle job dropped", || async {
        gw.metric("eventgate_hub_jobs").await == 0
    })
    .await;
}

// ---------------------------------------------------------------------------------
// Invariant 6: small notifications, one per statement per job.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_small_notification_per_statement_per_job() {
    use futures::StreamExt;
    let url = database().await;
    let writer = eventgate::db::connect(&url).await.unwrap();
    let a = create_job(&writer).await;
    let b = create_job(&writer).await;

    let (client, mut connection) = eventgate::db::config(&url)
        .unwrap()
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    tokio::spawn(async move {
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
            }
        }
    });
    client
        .batch_execute("LISTEN agent_job_events")
        .await
        .unwrap();

    // One statement, 200 rows over two jobs, with 4 KiB messages.
    writer
        .execute(
            "INSERT INTO agent_job_events (job_id, message) \
             SELECT CASE WHEN i % 2 = 0 THEN $1::uuid ELSE $2::uuid END, repeat('z', 4096) \
             FROM generate_series(1, 200) AS i",
            &[&a, &b],
        )
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        let (channel, payload) = tokio::time::timeout(PATIENCE, rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(channel, "agent_job_events");
        assert!(payload.len() < 64, "a hint, not log text: {payload:?}");
        got.push(payload);
    }
    got.sort();
    let mut expected = vec![format!("{a}:100"), format!("{b}:100")];
    expected.sort();
    assert_eq!(got, expected);
    // And nothing more for that statement.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        rx.try_recv().is_err(),
        "one notification per job per statement"
    );
}

// ---------------------------------------------------------------------------------
// The end of a job.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_job_ends_the_stream_then_answers_204() {
    let url = database().await;
    let gw = Gateway::start(&url).await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let job = create_job(&db).await;
    let mut live = Sse::job(gw.addr, job, None).await;
    insert(&db, job, 5, "x").await;
    live.until_seq(5).await;
    set_status(&db, job, "failed").await;

    // Live: the status event, then `end`, then the body ends.
    let rest = live.read_to_end().await;
    assert_eq!(seqs(&rest), vec![6]);
    assert_eq!(rest[0].json()["payload"]["status"], "failed");
    assert_eq!(rest[1].event, "end");
    assert_eq!(rest[1].json(), json!({"status": "failed", "lastSeq": 6}));
    assert_eq!(rest.len(), 2);

    // From the start: everything then `end`.
    let mut replay = Sse::job(gw.addr, job, None).await;
    let all = replay.read_to_end().await;
    assert_exact(&seqs(&all), 1, 6);
    assert_eq!(all.last().unwrap().event, "end");

    // Caught up: 204, which makes EventSource stop reconnecting.
    let caught_up = Sse::connect(
        gw.addr,
        &format!("/api/queue/jobs/{job}/events/stream"),
        Some(6),
    )
    .await;
    assert_eq!(caught_up.status, 204);

    // Also from a gateway that never saw the job live.
    let other = Gateway::start(&url).await;
    let caught_up = Sse::connect(
        other.addr,
        &format!("/api/queue/jobs/{job}/events/stream?afterSeq=6"),
        None,
    )
    .await;
    assert_eq!(caught_up.status, 204);
}

// ---------------------------------------------------------------------------------
// The HTTP contract.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_json_error_never_a_panic() {
    let url = database().await;
    let mut config = Config::new(&url);
    config.max_body = 64 * 1024;
    let gw = Gateway::start_with(config).await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let job = create_job(&db).await;
    let unknown = uuid::Uuid::new_v4();
    let a = gw.addr;

    let cases: Vec<(Response, u16, &str)> = vec![
        (
            get(a, "/api/queue/jobs/not-a-uuid").await.unwrap(),
            400,
            "invalid_job_id",
        ),
        (
            get(a, &format!("/api/queue/jobs/{unknown}")).await.unwrap(),
            404,
            "job_not_found",
        ),
        (
            get(a, &format!("/api/queue/jobs/{unknown}/events/stream"))
                .await
                .unwrap(),
            404,
            "job_not_found",
        ),
        (
            get(a, &format!("/api/queue/jobs/{job}/events?afterSeq=abc"))
                .await
                .unwrap(),
            400,
            "invalid_cursor",
        ),
        (
            get(a, &format!("/api/queue/jobs/{job}/events?afterSeq=-1"))
                .await
                .unwrap(),
            400,
            "invalid_cursor",
        ),
        (
            get(a, &format!("/api/queue/jobs/{job}/events?limit=0"))
                .await
                .unwrap(),
            400,
            "invalid_limit",
        ),
        (
            get(a, &format!("/api/queue/jobs/{job}/events?limit=5000"))
                .await
                .unwrap(),
            400,
            "invalid_limit",
        ),
        (
            get(a, &format!("/api/queue/jobs/{job}/events?afterEventId=zzz"))
                .await
                .unwrap(),
            400,
            "invalid_cursor",
        ),
        (
            get(a, &format!("/api/queue/jobs/{job}/events?after=not-a-time"))
                .await
                .unwrap(),
            400,
            "invalid_cursor",
        ),
        (
            get(
                a,
                &format!("/api/queue/jobs/{job}/events/stream?afterSeq=x"),
            )
            .await
            .unwrap(),
            400,
            "invalid_cursor",
        ),
        (
            request(
                a,
                "GET",
                &format!("/api/queue/jobs/{job}/events/stream"),
                &[("Last-Event-ID", "abc")],
                None,
            )
            .await
            .unwrap(),
            400,
            "invalid_last_event_id",
        ),
        (
            request(a, "POST", "/api/queue/jobs", &[], Some(b"{not json"))
                .await
                .unwrap(),
            400,
            "invalid_body",
        ),
        (
            post_json(
                a,
                &format!("/api/queue/jobs/{job}/events"),
                &json!({"level": "loud", "message": "m"}),
            )
            .await,
            400,
            "invalid_body",
        ),
        (
            post_json(
                a,
                &format!("/api/queue/jobs/{job}/events"),
                &json!({"events": []}),
            )
            .await,
            400,
            "invalid_body",
        ),
        (
            post_json(
                a,
                &format!("/api/queue/jobs/{unknown}/events"),
                &json!({"message": "m"}),
            )
            .await,
            404,
            "job_not_found",
        ),
        (
            post_json(
                a,
                &format!("/api/queue/jobs/{job}/events"),
                &json!({"message": "m".repeat(100_000)}),
            )
            .await,
            413,
            "body_too_large",
        ),
        (
            post_json(a, "/api/queue/jobs", &json!({"status": "exploded"})).await,
            400,
            "invalid_status",
        ),
        (
            request(a, "DELETE", &format!("/api/queue/jobs/{job}"), &[], None)
                .await
                .unwrap(),
            405,
            "method_not_allowed",
        ),
        (get(a, "/api/nope").await.unwrap(), 404, "not_found"),
    ];
    for (res, status, code) in cases {
        assert_eq!(res.status, status, "{}", res.text());
        assert_eq!(res.header("content-type"), Some("application/json"));
        let body = res.json();
        assert_eq!(body["error"], code, "{body}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // Nothing was written by the failed appends, and the gateway still works.
    assert_eq!(last_seq(&db, job).await, 0);
    assert_eq!(get(a, "/healthz").await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_and_events_api_round_trip() {
    let url = database().await;
    let gw = Gateway::start(&url).await;
    let a = gw.addr;

    let created = post_json(
        a,
        "/api/queue/jobs",
        &json!({"name": "build", "payload": {"ref": "main"}}),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.text());
    let job = created.json();
    assert_eq!(job["status"], "queued");
    assert_eq!(job["name"], "build");
    let id = job["id"].as_str().unwrap().to_string();

    let one = post_json(
        a,
        &format!("/api/queue/jobs/{id}/events"),
        &json!({"message": "hello\u{0}world", "payload": {"kind": "log", "stream": "stdout"}}),
    )
    .await;
    assert_eq!(one.status, 201, "{}", one.text());
    assert_eq!(one.json()["lastSeq"], 1);
    let many = post_json(
        a,
        &format!("/api/queue/jobs/{id}/events"),
        &json!({"events": (0..250).map(|i| json!({"level": "warn", "message": format!("m{i}")})).collect::<Vec<_>>()}),
    )
    .await;
    assert_eq!(many.status, 201);
    assert_eq!(many.json()["lastSeq"], 251);

    // Polling pages with afterSeq and the default limit of 200.
    let page = get(a, &format!("/api/queue/jobs/{id}/events"))
        .await
        .unwrap()
        .json();
    assert_eq!(page["items"].as_array().unwrap().len(), 200);
    assert_eq!(page["nextAfterSeq"], 200);
    assert_eq!(page["jobStatus"], "queued");
    assert_eq!(page["items"][0]["message"], "hello\u{FFFD}world");
    let page = get(
        a,
        &format!("/api/queue/jobs/{id}/events?afterSeq=200&limit=1000"),
    )
    .await
    .unwrap()
    .json();
    assert_eq!(page["items"].as_array().unwrap().len(), 51);
    assert_eq!(page["nextAfterSeq"], 251);
    // Nothing new: the cursor stays.
    let page = get(a, &format!("/api/queue/jobs/{id}/events?afterSeq=251"))
        .await
        .unwrap()
        .json();
    assert_eq!(page["items"].as_array().unwrap().len(), 0);
    assert_eq!(page["nextAfterSeq"], 251);
    // The tail, then older pages.
    let tail = get(
        a,
        &format!("/api/queue/jobs/{id}/events?beforeSeq=999999&limit=10"),
    )
    .await
    .unwrap()
    .json();
    let tail_seqs: Vec<i64> = tail["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(tail_seqs, (242..=251).collect::<Vec<_>>());
    let window = get(
        a,
        &format!("/api/queue/jobs/{id}/events?afterSeq=10&beforeSeq=15"),
    )
    .await
    .unwrap()
    .json();
    assert_eq!(window["items"].as_array().unwrap().len(), 4);
    // The original cursor: `after` + `afterEventId`.
    let e10 = get(
        a,
        &format!("/api/queue/jobs/{id}/events?afterSeq=9&limit=1"),
    )
    .await
    .unwrap()
    .json();
    let e10 = &e10["items"][0];
    let path = format!(
        "/api/queue/jobs/{id}/events?after={}&afterEventId={}&limit=3",
        e10["createdAt"].as_str().unwrap(),
        e10["id"].as_str().unwrap()
    );
    let page = get(a, &path).await.unwrap().json();
    let got: Vec<i64> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(got, vec![11, 12, 13]);

    // Job list and one job.
    let list = get(a, "/api/queue/jobs?limit=10").await.unwrap().json();
    assert_eq!(list["items"][0]["id"], id.as_str());
    assert_eq!(list["items"][0]["lastSeq"], 251);
    let filtered = get(a, "/api/queue/jobs?status=running")
        .await
        .unwrap()
        .json();
    assert_eq!(filtered["items"].as_array().unwrap().len(), 0);
    let dup = post_json(a, "/api/queue/jobs", &json!({"id": id})).await;
    assert_eq!(dup.status, 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_list_stream_sends_status_changes() {
    let url = database().await;
    let gw = Gateway::start(&url).await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let mut list = Sse::connect(gw.addr, "/api/queue/jobs/stream", None).await;
    assert_eq!(list.status, 200);
    // Let the subscription settle before the change, then create and move a job.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let job = create_job(&db).await;
    set_status(&db, job, "succeeded").await;
    let mut statuses = Vec::new();
    while statuses.last().map(String::as_str) != Some("succeeded") {
        let m = list.next().await.expect("status frames");
        assert_eq!(m.event, "job_status");
        let data = m.json();
        assert_eq!(data["id"], job.to_string());
        statuses.push(data["status"].as_str().unwrap().to_string());
    }
    assert!(statuses.len() <= 2, "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_twice_changes_nothing() {
    let url = database().await; // already migrated once
    let applied = eventgate::db::migrate(&url).await.unwrap();
    assert!(applied.is_empty(), "{applied:?}");
    // And concurrent runs do not trip over each other.
    let runs = join_all((0..3).map(|_| eventgate::db::migrate(&url))).await;
    for run in runs {
        assert!(run.unwrap().is_empty());
    }
}

// ---------------------------------------------------------------------------------
// Server hygiene.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_open_streams_with_a_retry_hint_within_the_deadline() {
    let url = database().await;
    let mut config = Config::new(&url);
    config.shutdown_grace = Duration::from_secs(5);
    let gw = Gateway::start_with(config).await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let job = create_job(&db).await;
    let mut streams = join_all((0..5).map(|_| Sse::job(gw.addr, job, None))).await;
    for sse in streams.iter_mut() {
        // Wait for the first retry frame so the stream is established.
        while sse.raw.is_empty() {
            sse.next_raw().await;
        }
    }
    let started = std::time::Instant::now();
    gw.stop().await;
    assert!(started.elapsed() < Duration::from_secs(30));
    for sse in streams.iter_mut() {
        assert!(sse.read_to_end().await.is_empty());
        let text = String::from_utf8(sse.raw.clone()).unwrap();
        let hints = text.matches("retry: ").count();
        assert_eq!(hints, 2, "a first retry and a shutdown retry: {text:?}");
    }
}

/// Event streams over HTTP/1.1 are written by the gateway itself, not hyper (see
/// `eventgate::conn`): they must still follow HTTP/1.1, notice a client that leaves,
/// and hand a kept-alive connection on to hyper for its next requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_follow_http1_and_keep_their_connection_usable() {
    let url = database().await;
    // No keep-alive is written during the test: only reading the socket can tell
    // that a client left.
    let mut config = Config::new(&url);
    config.keep_alive = Duration::from_secs(600);
    let gw = Gateway::start_with(config).await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let job = create_job(&db).await;
    let path = format!("/api/queue/jobs/{job}/events/stream");
    let header = |headers: &[(String, String)], name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let connect = || async { Conn::new(tokio::net::TcpStream::connect(gw.addr).await.unwrap()) };

    // A stream's head: status, date, chunked framing, SSE headers.
    let mut conn = connect().await;
    conn.send("GET", &path, &[], None, false).await.unwrap();
    let (status, headers) = conn.read_head().await.unwrap();
    assert_eq!(status, 200);
    assert!(header(&headers, "date").is_some_and(|d| d.ends_with(" GMT")));
    assert_eq!(
        header(&headers, "transfer-encoding").as_deref(),
        Some("chunked")
    );
    assert_eq!(
        header(&headers, "content-type").as_deref(),
        Some("text/event-stream; charset=utf-8")
    );
    assert_eq!(header(&headers, "content-length"), None);
    let first = conn.read_chunk().await.unwrap().unwrap();
    assert!(first.starts_with(b"retry: "), "{first:?}");

    // A client that leaves an idle stream (no event due) is noticed and let go.
    wait_for("one open stream", || async {
        gw.metric("eventgate_streams_open").await == 1
    })
    .await;
    drop(conn);
    wait_for("the stream to close", || async {
        gw.metric("eventgate_streams_open").await == 0
    })
    .await;

    // Kept alive: the stream ends (`end`, last chunk), then hyper answers the next
    // request on the same connection, then a caught-up stream gets 204 on it, and the
    // connection still serves.
    let mut conn = connect().await;
    conn.send("GET", &path, &[], None, false).await.unwrap();
    assert_eq!(conn.read_head().await.unwrap().0, 200);
    insert(&db, job, 3, "x").await;
    set_status(&db, job, "succeeded").await;
    let mut body = Vec::new();
    while let Some(chunk) = conn.read_chunk().await.unwrap() {
        body.extend_from_slice(&chunk);
    }
    let text = String::from_utf8(body).unwrap();
    assert!(
        text.contains("id: 4-") && text.ends_with("\n\n") && text.contains("event: end"),
        "{text}"
    );
    conn.send("GET", "/healthz", &[], None, false)
        .await
        .unwrap();
    let (status, headers) = conn.read_head().await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        conn.read_body_to_end(&headers).await.unwrap(),
        br#"{"status":"ok"}"#
    );
    conn.send("GET", &path, &[("Last-Event-ID", "4")], None, false)
        .await
        .unwrap();
    let (status, headers) = conn.read_head().await.unwrap();
    assert_eq!(status, 204);
    assert_eq!(header(&headers, "content-length"), None);
    assert_eq!(header(&headers, "transfer-encoding"), None);
    conn.send("GET", "/healthz", &[], None, false)
        .await
        .unwrap();
    assert_eq!(conn.read_head().await.unwrap().0, 200);

    // The first request answered on our path, then `Connection: close` is honoured.
    let mut conn = connect().await;
    conn.send("GET", &path, &[("Last-Event-ID", "4")], None, true)
        .await
        .unwrap();
    let (status, headers) = conn.read_head().await.unwrap();
    assert_eq!(status, 204);
    assert_eq!(header(&headers, "connection").as_deref(), Some("close"));
    assert!(conn.read_head().await.is_err(), "closed after the response");

    // Errors keep their JSON body and exact length.
    let mut conn = connect().await;
    let unknown = format!("/api/queue/jobs/{}/events/stream", uuid::Uuid::new_v4());
    conn.send("GET", &unknown, &[], None, false).await.unwrap();
    let (status, headers) = conn.read_head().await.unwrap();
    assert_eq!(status, 404);
    let body = conn.read_body_to_end(&headers).await.unwrap();
    assert_eq!(
        header(&headers, "content-length"),
        Some(body.len().to_string())
    );
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body).unwrap()["error"],
        "job_not_found"
    );
    conn.send("GET", "/healthz", &[], None, false)
        .await
        .unwrap();
    assert_eq!(conn.read_head().await.unwrap().0, 200);

    // Pipelined requests and HTTP/1.0 go to hyper, and are answered all the same.
    let exchange = |request: String| async move {
        let mut raw = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut raw, request.as_bytes())
            .await
            .unwrap();
        let mut answer = String::new();
        let read = tokio::io::AsyncReadExt::read_to_string(&mut raw, &mut answer);
        tokio::time::timeout(PATIENCE, read).await.unwrap().unwrap();
        answer
    };
    let answer = exchange(format!(
        "GET {path} HTTP/1.1\r\nHost: t\r\nLast-Event-ID: 4\r\n\r\nGET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    ))
    .await;
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
    assert!(
        answer.contains("HTTP/1.1 200") && answer.ends_with(r#"{"status":"ok"}"#),
        "{answer}"
    );
    let answer = exchange(format!("GET {path} HTTP/1.0\r\n\r\n")).await;
    assert!(
        answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200"),
        "{answer}"
    );
    assert!(
        !answer.contains("chunked") && answer.contains("event: end"),
        "{answer}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_answers_503_with_retry_after() {
    let url = database().await;
    let mut config = Config::new(&url);
    config.max_connections = 3;
    let gw = Gateway::start_with(config).await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let job = create_job(&db).await;
    let _held = join_all((0..3).map(|_| Sse::job(gw.addr, job, None))).await;
    let res = get(gw.addr, "/healthz").await.unwrap();
    assert_eq!(res.status, 503);
    assert!(res.header("retry-after").is_some());
    assert_eq!(res.json()["error"], "too_many_connections");
    drop(_held);
    wait_for("capacity back", || async {
        matches!(get(gw.addr, "/healthz").await, Ok(r) if r.status == 200)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_client_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let url = database().await;
    let mut config = Config::new(&url);
    config.header_timeout = Duration::from_millis(500);
    let gw = Gateway::start_with(config).await;
    let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Never finish the headers: the server must close the connection on its own.
    let mut buf = Vec::new();
    let read = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the connection was closed by the server");
    let text = String::from_utf8_lossy(&buf);
    assert!(buf.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");

    // A client that connects and sends nothing at all is cut off too.
    let mut silent = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(PATIENCE, silent.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "the silent connection was closed by the server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge_streams_too() {
    let url = database().await;
    let gw = Gateway::start(&url).await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let job = create_job(&db).await;
    insert(&db, job, 3, "h2").await;
    set_status(&db, job, "succeeded").await;

    let stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get(format!("http://test/api/queue/jobs/{job}/events/stream"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let res = sender.send_request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.version(), hyper::Version::HTTP_2);
    use http_body_util::BodyExt;
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(text.contains("\nevent: queue_event\n"), "{text}");
    assert!(text.contains("id: 4-"), "{text}");
    assert!(
        text.ends_with("event: end\ndata: {\"lastSeq\":4,\"status\":\"succeeded\"}\n\n"),
        "{text}"
    );
}
