//! The storage of sql/0004 and 0007: seqs and lines handed out once per statement per
//! job, and still gap-free, commit-ordered and stable under every kind of concurrent
//! writer; ids that sort like seqs; status events only from real status changes; one
//! hint per job per statement, from the counters.

mod common;

use std::time::Instant;

use common::*;
use futures::StreamExt;
use uuid::Uuid;

/// Inserts `n` events of `lines` lines each into `job` in ONE statement.
async fn insert_lines(client: &tokio_postgres::Client, job: Uuid, n: i32, lines: i32) {
    client
        .execute(
            "INSERT INTO agent_job_events (job_id, message) \
             SELECT $1, (SELECT string_agg('l' || k, E'\\n') FROM generate_series(1, $3) k) \
                        || ' #' || i \
             FROM generate_series(1, $2) AS i",
            &[&job, &n, &lines],
        )
        .await
        .unwrap();
}

/// The seqs of one statement's rows are consecutive: the job stays locked from the
/// statement's first row to its commit.
async fn assert_statements_contiguous(client: &tokio_postgres::Client, job: Uuid) {
    let rows = client
        .query(
            "SELECT split_part(message, ' #', 1), array_agg(seq ORDER BY seq) \
             FROM agent_job_events WHERE job_id = $1 GROUP BY 1",
            &[&job],
        )
        .await
        .unwrap();
    for row in rows {
        let seqs: Vec<i64> = row.get(1);
        assert_eq!(
            seqs.last().unwrap() - seqs[0] + 1,
            seqs.len() as i64,
            "one statement's rows take consecutive seqs: {:?}",
            row.get::<_, String>(0)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_of_one_job_get_gap_free_seqs_and_lines() {
    let url = database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let job = create_job(&db).await;
    let mut writers = Vec::new();
    for w in 0..2 {
        let url = url.clone();
        writers.push(tokio::spawn(async move {
            let client = eventgate::db::connect(&url).await.unwrap();
            for s in 0..40 {
                // Each statement's rows carry its own label; lines differ per writer.
                client
                    .execute(
                        "INSERT INTO agent_job_events (job_id, message) \
                         SELECT $1, repeat(E'x\\n', $2) || $3 || ' #' || i \
                         FROM generate_series(1, 25) AS i",
                        &[&job, &(w + 1), &format!("w{w}s{s}")],
                    )
                    .await
                    .unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    assert_eq!(assert_numbered(&db, job).await, 2 * 40 * 25);
    assert_statements_contiguous(&db, job).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_statement_touching_many_jobs_numbers_each() {
    let url = database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let mut jobs = Vec::new();
    for _ in 0..30 {
        jobs.push(create_job(&db).await);
    }
    // Rows of the jobs interleaved (the worst case: the statement switches job on
    // every row) and grouped, in one transaction, twice, with a rolled-back savepoint
    // in between that must leave no gap.
    db.batch_execute("BEGIN").await.unwrap();
    for order in ["i, j.n", "j.n, i"] {
        db.execute(
            &format!(
                "INSERT INTO agent_job_events (job_id, message) \
                 SELECT j.id, 'm' || i || CASE WHEN i % 2 = 0 THEN E'\\nsecond' ELSE '' END \
                 FROM unnest($1::uuid[]) WITH ORDINALITY AS j(id, n), \
                      generate_series(1, 20) AS i ORDER BY {order}"
            ),
            &[&jobs],
        )
        .await
        .unwrap();
        db.batch_execute("SAVEPOINT s").await.unwrap();
        insert_lines(&db, jobs[3], 5, 3).await;
        db.batch_execute("ROLLBACK TO SAVEPOINT s").await.unwrap();
    }
    insert_lines(&db, jobs[3], 5, 3).await;
    db.batch_execute("COMMIT").await.unwrap();
    for &job in &jobs {
        let want = if job == jobs[3] { 45 } else { 40 };
        assert_eq!(assert_numbered(&db, job).await, want);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_changes_racing_log_writes_stay_in_order() {
    let url = database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let job = create_job(&db).await;
    let writer = {
        let url = url.clone();
        tokio::spawn(async move {
            let client = eventgate::db::connect(&url).await.unwrap();
            for _ in 0..100 {
                insert_lines(&client, job, 10, 2).await;
            }
        })
    };
    let statuses = ["queued", "running"];
    let changer = {
        let url = url.clone();
        tokio::spawn(async move {
            let client = eventgate::db::connect(&url).await.unwrap();
            for i in 0..60 {
                set_status(&client, job, statuses[i % 2]).await;
            }
        })
    };
    writer.await.unwrap();
    changer.await.unwrap();
    set_status(&db, job, "succeeded").await;
    let total = assert_numbered(&db, job).await;
    assert_eq!(total, 100 * 10 + 61, "every log row and every status event");
    // The status events, in seq order, alternate as they were made and end the log.
    let rows = db
        .query(
            "SELECT payload->>'status', payload->>'previous', seq FROM agent_job_events \
             WHERE job_id = $1 AND payload->>'kind' = 'status' ORDER BY seq",
            &[&job],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 61);
    for pair in rows.windows(2) {
        assert_eq!(
            pair[1].get::<_, String>(1),
            pair[0].get::<_, String>(0),
            "each status event follows the previous one"
        );
    }
    assert_eq!(rows.last().unwrap().get::<_, i64>(2), total as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_made_ids_sort_like_seqs_even_inside_one_millisecond() {
    let url = database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let job = create_job(&db).await;
    insert_lines(&db, job, 3000, 1).await;
    insert(&db, job, 500, "b").await;
    let by_time: Vec<i64> = db
        .query(
            "SELECT seq FROM agent_job_events WHERE job_id = $1 \
             ORDER BY date_trunc('milliseconds', created_at), id",
            &[&job],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(by_time, (1..=3500).collect::<Vec<i64>>());
    let shared: i64 = db
        .query_one(
            "SELECT max(n) FROM (SELECT count(*) n FROM agent_job_events WHERE job_id = $1 \
             GROUP BY date_trunc('milliseconds', created_at)) s",
            &[&job],
        )
        .await
        .unwrap()
        .get(0);
    assert!(shared > 1, "some events share a millisecond");
    let versions: i64 = db
        .query_one(
            "SELECT count(*) FROM agent_job_events \
             WHERE job_id = $1 AND substr(id::text, 15, 1) = '7'",
            &[&job],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(versions, 3500, "UUIDv7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_real_status_change_makes_a_status_event() {
    let url = database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let job = create_job(&db).await;
    db.execute(
        "INSERT INTO agent_job_events (job_id, message, payload) \
         VALUES ($1, 'status: succeeded', '{\"kind\": \"status\", \"status\": \"succeeded\"}')",
        &[&job],
    )
    .await
    .unwrap();
    // The same through the gateway's own append.
    let pool = eventgate::db::pool(&url, 1).unwrap();
    let client = pool.get().await.unwrap();
    eventgate::store::append_events(
        &**client,
        job,
        &[eventgate::NewEvent {
            level: eventgate::Level::Info,
            message: "forged".into(),
            payload: serde_json::json!({"kind": "status", "status": "failed"}),
        }],
    )
    .await
    .unwrap();
    set_status(&client, job, "failed").await;
    let kinds: Vec<(String, String)> = db
        .query(
            "SELECT payload->>'kind', message FROM agent_job_events WHERE job_id = $1 ORDER BY seq",
            &[&job],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        kinds,
        [
            ("log".into(), "status: succeeded".into()),
            ("log".into(), "forged".into()),
            ("status".into(), "status: failed".into()),
        ]
    );
    // The hub decides "the job ended" from status events: only the real one counts.
    let events = eventgate::store::events_after(&client, job, 0, None, 10)
        .await
        .unwrap();
    let ends: Vec<Option<eventgate::JobStatus>> = events.iter().map(|e| e.status()).collect();
    assert_eq!(ends, [None, None, Some(eventgate::JobStatus::Failed)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_holding_a_line_is_found_without_reading_before_it() {
    let url = database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let job = create_job(&db).await;
    insert_lines(&db, job, 100, 3).await; // lines 1..=300, event k holds 3k-2..=3k
    let pool = eventgate::db::pool(&url, 1).unwrap();
    let client = pool.get().await.unwrap();
    // Retention may delete the start of a log: seqs no longer start at 1.
    db.execute(
        "DELETE FROM agent_job_events WHERE job_id = $1 AND seq <= 10",
        &[&job],
    )
    .await
    .unwrap();
    for (line, want) in [
        (1, None),
        (30, None),
        (31, Some(11)),
        (33, Some(11)),
        (34, Some(12)),
        (299, Some(100)),
        (10_000, Some(100)),
    ] {
        let got = eventgate::store::seq_of_line(&**client, job, line)
            .await
            .unwrap();
        assert_eq!(got, want, "line {line}");
    }
    let page = eventgate::store::events_after(&client, job, 11, None, 1)
        .await
        .unwrap();
    assert_eq!((page[0].seq, page[0].line), (12, 34));
}

/// One statement's cost against its size: 10,000 rows and 100,000 rows for one job.
/// Printed, not asserted (`cargo test --test storage -- --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_big_statement_costs_in_proportion_to_its_rows() {
    let url = database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let mut took = Vec::new();
    for n in [10_000, 100_000] {
        let job = create_job(&db).await;
        let started = Instant::now();
        insert(&db, job, n, "bulk").await;
        took.push(started.elapsed());
        assert_eq!(assert_numbered(&db, job).await, n);
    }
    let ratio = took[1].as_secs_f64() / took[0].as_secs_f64().max(1e-9);
    println!(
        "one INSERT of 10,000 rows: {:?}; of 100,000 rows: {:?} ({ratio:.1}x)",
        took[0], took[1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inserts_from_functions_with_their_own_settings_stay_gap_free() {
    let url = database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let job = create_job(&db).await;
    // A function with a SET clause undoes every setting it changed when it returns,
    // the statement's counter cache included; the next statement must not trust it.
    db.batch_execute(
        "CREATE FUNCTION log_twice(job uuid) RETURNS void LANGUAGE sql \
         SET search_path = public AS $$ \
             INSERT INTO agent_job_events (job_id, message) VALUES (job, 'f1'), (job, 'f2'); \
             INSERT INTO agent_job_events (job_id, message) VALUES (job, E'f3\\nf3'); \
         $$",
    )
    .await
    .unwrap();
    db.batch_execute("BEGIN").await.unwrap();
    for _ in 0..3 {
        insert(&db, job, 4, "direct").await;
        db.execute("SELECT log_twice($1)", &[&job]).await.unwrap();
    }
    db.batch_execute("COMMIT").await.unwrap();
    assert_eq!(assert_numbered(&db, job).await, 3 * (4 + 3));
}

/// Each writer sends ONE big statement into the same job, all at once: the statements
/// take the job in turn, each one's rows consecutive, nothing lost between them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_single_statements_into_one_job_take_turns() {
    let url = database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let job = create_job(&db).await;
    let go = std::sync::Arc::new(tokio::sync::Barrier::new(4));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (url, go) = (url.clone(), go.clone());
        writers.push(tokio::spawn(async move {
            let client = eventgate::db::connect(&url).await.unwrap();
            go.wait().await;
            client
                .execute(
                    "INSERT INTO agent_job_events (job_id, message) \
                     SELECT $1, $2 || ' #' || i || repeat(E'\\nx', i % 3) \
                     FROM generate_series(1, 1500) AS i",
                    &[&job, &format!("w{w}")],
                )
                .await
                .unwrap();
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    assert_eq!(assert_numbered(&db, job).await, 4 * 1500);
    assert_statements_contiguous(&db, job).await;
}

/// Several writers whose statements each touch many jobs (in the same job order, as a
/// batch importer would; opposite orders could deadlock, as with any row locks): every
/// job is gap-free, and each statement's rows of a job are consecutive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_statements_touching_many_jobs() {
    let url = database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let mut jobs = Vec::new();
    for _ in 0..12 {
        jobs.push(create_job(&db).await);
    }
    let mut writers = Vec::new();
    for w in 0..3 {
        let (url, jobs) = (url.clone(), jobs.clone());
        writers.push(tokio::spawn(async move {
            let client = eventgate::db::connect(&url).await.unwrap();
            for s in 0..15 {
                client
                    .execute(
                        "INSERT INTO agent_job_events (job_id, message) \
                         SELECT j.id, $2 || ' #' || i || repeat(E'\\ny', (i + j.n::int) % 3) \
                         FROM unnest($1::uuid[]) WITH ORDINALITY AS j(id, n), \
                              generate_series(1, 4) AS i ORDER BY j.n, i",
                        &[&jobs, &format!("w{w}s{s}")],
                    )
                    .await
                    .unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    for &job in &jobs {
        assert_eq!(assert_numbered(&db, job).await, 3 * 15 * 4);
        assert_statements_contiguous(&db, job).await;
    }
}

/// Line numbers under concurrent writers of multi-line events and status changes:
/// gap-free at the end, and never changed by what came later (an event keeps the
/// line it got at its commit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn line_numbers_stay_gap_free_and_stable_under_concurrency() {
    let url = database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let job = create_job(&db).await;
    let mut writers = Vec::new();
    for w in 0..3 {
        let url = url.clone();
        writers.push(tokio::spawn(async move {
            let client = eventgate::db::connect(&url).await.unwrap();
            for s in 0..30 {
                insert_lines(&client, job, 1 + (s % 4), 1 + w).await;
            }
        }));
    }
    let changer = {
        let url = url.clone();
        tokio::spawn(async move {
            let client = eventgate::db::connect(&url).await.unwrap();
            for i in 0..20 {
                set_status(&client, job, ["queued", "running"][i % 2]).await;
            }
        })
    };
    // A snapshot while the writers run: whatever it saw must still be there, unchanged.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let early = events_by_seq(&db, job).await;
    for w in writers {
        w.await.unwrap();
    }
    changer.await.unwrap();
    let total = assert_numbered(&db, job).await;
    let late = events_by_seq(&db, job).await;
    assert_eq!(
        &late[..early.len()],
        &early[..],
        "lines and ids never change"
    );
    let statuses: i64 = db
        .query_one(
            "SELECT count(*) FROM agent_job_events WHERE job_id = $1 AND payload->>'kind' = 'status'",
            &[&job],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(statuses, 20);
    let per_writer: usize = (0..30).map(|s| 1 + s % 4).sum();
    assert_eq!(total, 3 * per_writer + 20);
}

/// A statement touching several jobs, their rows interleaved, sends one hint per job,
/// each with that job's highest seq (from the counters, not from a transition table).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_hint_per_job_per_statement_with_its_max_seq() {
    let url = database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let mut jobs = Vec::new();
    for _ in 0..5 {
        jobs.push(create_job(&db).await);
    }
    insert(&db, jobs[2], 3, "before").await; // job 2 starts at seq 4
    let (listener, mut connection) = eventgate::db::config(&url)
        .unwrap()
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    tokio::spawn(async move {
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send(n.payload().to_string());
            }
        }
    });
    listener
        .batch_execute("LISTEN agent_job_events")
        .await
        .unwrap();
    db.batch_execute("SET eventgate.notify = 'always'")
        .await
        .unwrap();
    // Rows switch job on every row, and come back to each job several times.
    db.execute(
        "INSERT INTO agent_job_events (job_id, message) \
         SELECT j.id, 'm' || i FROM unnest($1::uuid[]) WITH ORDINALITY AS j(id, n), \
                generate_series(1, 6) AS i ORDER BY i, j.n",
        &[&jobs],
    )
    .await
    .unwrap();
    // A marker statement: everything before it has arrived once it has.
    insert(&db, jobs[0], 1, "marker").await;
    let mut hints = Vec::new();
    loop {
        let next = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
            .await
            .expect("a notification in time")
            .expect("listener alive");
        if next == format!("{}:7", jobs[0]) {
            break;
        }
        hints.push(next);
    }
    hints.sort();
    let mut want: Vec<String> = jobs
        .iter()
        .map(|j| format!("{j}:{}", if *j == jobs[2] { 9 } else { 6 }))
        .collect();
    want.sort();
    assert_eq!(hints, want, "one hint per job, with its max seq");
    let counts: Vec<usize> = [7, 6, 9, 6, 6].into();
    for (&job, want) in jobs.iter().zip(counts) {
        assert_eq!(assert_numbered(&db, job).await, want);
    }
}
