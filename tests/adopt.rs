//! `eventgate migrate` on the original system's database: adopted in place while its
//! application keeps writing, nothing of it dropped, renamed or retyped; and a database
//! in a shape it does not know is refused untouched.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use uuid::Uuid;

/// The original system's two tables as its migrations leave them (facts from
/// ../shared/moonmind-schema.sql, the chain up to 202602170001), reduced to what the
/// foreign keys need.
const ORIGINAL_LAYOUT: &str = r#"
CREATE TABLE "user" (id uuid NOT NULL, CONSTRAINT user_pkey PRIMARY KEY (id));
CREATE TYPE agentjobstatus AS ENUM ('queued', 'running', 'succeeded', 'failed', 'cancelled');
CREATE TABLE agent_jobs (
    id                   uuid                     NOT NULL,
    type                 varchar(64)              NOT NULL,
    status               agentjobstatus           NOT NULL DEFAULT 'queued'::agentjobstatus,
    priority             integer                  NOT NULL DEFAULT 0,
    payload              jsonb                    NOT NULL,
    created_by_user_id   uuid,
    requested_by_user_id uuid,
    affinity_key         varchar(255),
    claimed_by           varchar(255),
    lease_expires_at     timestamp with time zone,
    attempt              integer                  NOT NULL DEFAULT 1,
    max_attempts         integer                  NOT NULL DEFAULT 3,
    result_summary       text,
    error_message        text,
    artifacts_path       varchar(1024),
    started_at           timestamp with time zone,
    finished_at          timestamp with time zone,
    created_at           timestamp with time zone NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at           timestamp with time zone NOT NULL DEFAULT CURRENT_TIMESTAMP,
    CONSTRAINT pk_agent_jobs PRIMARY KEY (id),
    CONSTRAINT fk_agent_jobs_created_by_user_id
        FOREIGN KEY (created_by_user_id) REFERENCES "user" (id) ON DELETE SET NULL,
    CONSTRAINT fk_agent_jobs_requested_by_user_id
        FOREIGN KEY (requested_by_user_id) REFERENCES "user" (id) ON DELETE SET NULL
);
CREATE INDEX ix_agent_jobs_status_priority_created_at ON agent_jobs (status, priority, created_at);
CREATE INDEX ix_agent_jobs_type_status_created_at ON agent_jobs (type, status, created_at);
CREATE INDEX ix_agent_jobs_lease_expires_at ON agent_jobs (lease_expires_at);
ALTER TYPE agentjobstatus ADD VALUE IF NOT EXISTS 'dead_letter';
ALTER TABLE agent_jobs ADD COLUMN next_attempt_at timestamp with time zone;
CREATE INDEX ix_agent_jobs_next_attempt_at ON agent_jobs (next_attempt_at);
CREATE TYPE agentjobeventlevel AS ENUM ('info', 'warn', 'error');
CREATE TABLE agent_job_events (
    id         uuid                     NOT NULL,
    job_id     uuid                     NOT NULL,
    level      agentjobeventlevel       NOT NULL DEFAULT 'info'::agentjobeventlevel,
    message    text                     NOT NULL,
    payload    jsonb,
    created_at timestamp with time zone NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at timestamp with time zone NOT NULL DEFAULT CURRENT_TIMESTAMP,
    CONSTRAINT pk_agent_job_events PRIMARY KEY (id),
    CONSTRAINT fk_agent_job_events_job_id
        FOREIGN KEY (job_id) REFERENCES agent_jobs (id) ON DELETE CASCADE
);
CREATE INDEX ix_agent_job_events_job_id_created_at ON agent_job_events (job_id, created_at);
CREATE INDEX ix_agent_job_events_level_created_at ON agent_job_events (level, created_at);
ALTER TABLE agent_jobs ADD COLUMN cancel_requested_at timestamp with time zone;
ALTER TABLE agent_jobs ADD COLUMN cancel_requested_by_user_id uuid;
ALTER TABLE agent_jobs ADD COLUMN cancel_reason text;
ALTER TABLE agent_jobs ADD CONSTRAINT fk_agent_jobs_cancel_requested_by_user_id
    FOREIGN KEY (cancel_requested_by_user_id) REFERENCES "user" (id) ON DELETE SET NULL;
"#;

/// The same two tables as the later, squashed migration creates them (594fc88de6eb):
/// default constraint names, no server defaults on status, priority, attempt,
/// max_attempts or level, four finish_* columns, other indexes.
const SQUASHED_LAYOUT: &str = r#"
CREATE TABLE "user" (id uuid NOT NULL, CONSTRAINT user_pkey PRIMARY KEY (id));
CREATE TYPE agentjobstatus AS ENUM ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'dead_letter');
CREATE TABLE agent_jobs (
    id                          uuid                     NOT NULL,
    type                        varchar(64)              NOT NULL,
    status                      agentjobstatus           NOT NULL,
    priority                    integer                  NOT NULL,
    payload                     jsonb                    NOT NULL,
    created_by_user_id          uuid,
    requested_by_user_id        uuid,
    cancel_requested_by_user_id uuid,
    cancel_requested_at         timestamp with time zone,
    cancel_reason               text,
    affinity_key                varchar(255),
    claimed_by                  varchar(255),
    lease_expires_at            timestamp with time zone,
    next_attempt_at             timestamp with time zone,
    attempt                     integer                  NOT NULL,
    max_attempts                integer                  NOT NULL,
    result_summary              text,
    error_message               text,
    finish_outcome_code         varchar(64),
    finish_outcome_stage        varchar(32),
    finish_outcome_reason       varchar(256),
    finish_summary_json         jsonb,
    artifacts_path              varchar(1024),
    started_at                  timestamp with time zone,
    finished_at                 timestamp with time zone,
    created_at                  timestamp with time zone NOT NULL DEFAULT now(),
    updated_at                  timestamp with time zone NOT NULL DEFAULT now(),
    PRIMARY KEY (id),
    FOREIGN KEY (cancel_requested_by_user_id) REFERENCES "user" (id) ON DELETE SET NULL,
    FOREIGN KEY (created_by_user_id) REFERENCES "user" (id) ON DELETE SET NULL,
    FOREIGN KEY (requested_by_user_id) REFERENCES "user" (id) ON DELETE SET NULL
);
CREATE INDEX ix_agent_jobs_created_at_id ON agent_jobs (created_at, id);
CREATE INDEX ix_agent_jobs_lease_expires_at ON agent_jobs (lease_expires_at);
CREATE INDEX ix_agent_jobs_status_created_at_id ON agent_jobs (status, created_at, id);
CREATE INDEX ix_agent_jobs_status_priority_created_at ON agent_jobs (status, priority, created_at);
CREATE INDEX ix_agent_jobs_type_status_created_at ON agent_jobs (type, status, created_at);
CREATE TYPE agentjobeventlevel AS ENUM ('info', 'warn', 'error');
CREATE TABLE agent_job_events (
    id         uuid                     NOT NULL,
    job_id     uuid                     NOT NULL,
    level      agentjobeventlevel       NOT NULL,
    message    text                     NOT NULL,
    payload    jsonb,
    created_at timestamp with time zone NOT NULL DEFAULT now(),
    updated_at timestamp with time zone NOT NULL DEFAULT now(),
    PRIMARY KEY (id),
    FOREIGN KEY (job_id) REFERENCES agent_jobs (id) ON DELETE CASCADE
);
CREATE INDEX ix_agent_job_events_job_id_created_at ON agent_job_events (job_id, created_at);
CREATE INDEX ix_agent_job_events_level_created_at ON agent_job_events (level, created_at);
"#;

/// `jobs` running jobs with `per_job` events each, made the original way: uuid4 ids,
/// the application's clock (four events share each millisecond), NULL payloads now and
/// then, every level, some messages of two lines. One more job has no events.
async fn original_data(client: &tokio_postgres::Client, jobs: i32, per_job: i32) {
    client
        .execute(
            "INSERT INTO agent_jobs (id, type, status, payload, created_at, updated_at) \
             SELECT gen_random_uuid(), 'codex_exec', 'running', '{}', \
                    timestamptz '2026-02-17 10:00:00+00' + n * interval '1 second', now() \
             FROM generate_series(0, $1) AS n",
            &[&jobs],
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO agent_job_events (id, job_id, level, message, payload, created_at, \
                                           updated_at) \
             SELECT gen_random_uuid(), j.id, \
                    (ARRAY['info', 'warn', 'error'])[1 + i % 3]::agentjobeventlevel, \
                    CASE WHEN i % 7 = 0 THEN 'line ' || i || E'\\nmore' ELSE 'line ' || i END, \
                    CASE WHEN i % 5 = 0 THEN NULL \
                         ELSE jsonb_build_object('kind', 'log', 'stream', 'stdout') END, \
                    j.created_at + (i / 4) * interval '1 millisecond', \
                    j.created_at + (i / 4) * interval '1 millisecond' \
             FROM (SELECT id, created_at FROM agent_jobs ORDER BY created_at LIMIT $1) j, \
                  generate_series(1, $2) AS i",
            &[&(jobs as i64), &per_job],
        )
        .await
        .unwrap();
}

/// The original application writing: one event at a time, uuid4 ids made by it, its
/// own clock, no seq. Returns the events in commit order and the longest INSERT.
fn original_writer(
    url: String,
    jobs: Vec<Uuid>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(Vec<(Uuid, Uuid)>, Duration)> {
    tokio::spawn(async move {
        let client = eventgate::db::connect(&url).await.unwrap();
        let insert = client
            .prepare(
                "INSERT INTO agent_job_events (id, job_id, level, message, payload, \
                                               created_at, updated_at) \
                 VALUES ($1, $2, $3::text::agentjobeventlevel, $4, NULL, $5, $5)",
            )
            .await
            .unwrap();
        let mut written = Vec::new();
        let mut longest = Duration::ZERO;
        let mut n = 0usize;
        while !stop.load(Ordering::Relaxed) {
            let job = jobs[n % jobs.len()];
            let id = Uuid::new_v4();
            let message = if n % 3 == 0 {
                format!("live {n}\nsecond line")
            } else {
                format!("live {n}")
            };
            let started = Instant::now();
            client
                .execute(&insert, &[&id, &job, &"info", &message, &SystemTime::now()])
                .await
                .expect("the original application's INSERT succeeds");
            longest = longest.max(started.elapsed());
            written.push((job, id));
            n += 1;
            tokio::task::yield_now().await;
        }
        (written, longest)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopts_the_original_database_while_its_application_writes() {
    let url = empty_database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    db.batch_execute(ORIGINAL_LAYOUT).await.unwrap();
    original_data(&db, 6, 600).await;
    let before = catalog_snapshot(&db, false).await;
    let jobs: Vec<Uuid> = db
        .query("SELECT id FROM agent_jobs ORDER BY created_at", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // The order the old events must get: (created_at, id), per job.
    let mut expected: HashMap<Uuid, Vec<Uuid>> = HashMap::new();
    for row in db
        .query(
            "SELECT job_id, id FROM agent_job_events ORDER BY job_id, created_at, id",
            &[],
        )
        .await
        .unwrap()
    {
        expected.entry(row.get(0)).or_default().push(row.get(1));
    }
    let shared_ms: i64 = db
        .query_one(
            "SELECT count(*) FROM (SELECT 1 FROM agent_job_events \
             GROUP BY job_id, created_at HAVING count(*) > 1) s",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(shared_ms > 0, "the fixture has events sharing a timestamp");

    // Given the original application writing into every job (and the empty one),
    let stop = Arc::new(AtomicBool::new(false));
    let writer = original_writer(url.clone(), jobs.clone(), stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    // when eventgate adopts the database under it,
    let applied = eventgate::db::migrate(&url).await.unwrap();
    assert!(applied.iter().any(|n| n.starts_with("0004")), "{applied:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let (written, longest) = writer.await.unwrap();
    println!(
        "original writer: {} inserts, longest {:?} (while migrate ran)",
        written.len(),
        longest
    );

    // then nothing of the original was dropped, renamed or retyped, only added to:
    let after = catalog_snapshot(&db, false).await;
    let before_lines: Vec<&str> = before.lines().collect();
    let after_lines: Vec<&str> = after.lines().collect();
    for line in &before_lines {
        assert!(after_lines.contains(line), "kept: {line}");
    }
    let added_columns: Vec<&str> = after_lines
        .iter()
        .filter(|l| l.starts_with("col agent_") && !before_lines.contains(l))
        .map(|l| l.split(' ').nth(1).unwrap())
        .collect();
    let mut added_columns = added_columns;
    added_columns.sort();
    assert_eq!(
        added_columns,
        [
            "agent_job_events.line",
            "agent_job_events.seq",
            "agent_jobs.last_line",
            "agent_jobs.last_seq",
            "agent_jobs.notified_at"
        ]
    );
    assert!(
        !after_lines
            .iter()
            .any(|l| l.starts_with("typ ") && !before_lines.contains(l)),
        "no type added or changed"
    );

    // every job's events are numbered: the old ones in (created_at, id) order, the
    // application's new ones after them in commit order, gap-free seqs and lines.
    let mut total = 0;
    for &job in &jobs {
        let mut want = expected.remove(&job).unwrap_or_default();
        want.extend(written.iter().filter(|w| w.0 == job).map(|w| w.1));
        let got: Vec<Uuid> = events_by_seq(&db, job)
            .await
            .into_iter()
            .map(|e| e.0)
            .collect();
        assert_eq!(got.len(), want.len(), "job {job}: every event is there");
        assert!(
            got == want,
            "job {job}: seq order is (created_at, id) then commit order"
        );
        total += assert_numbered(&db, job).await;
    }
    assert_eq!(total, 6 * 600 + written.len());

    // and migrate again changes nothing.
    let settled = catalog_snapshot(&db, true).await;
    assert_eq!(
        eventgate::db::migrate(&url).await.unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(
        catalog_snapshot(&db, true).await,
        settled,
        "a second migrate changes nothing"
    );

    // The original application still works: its INSERTs and its status UPDATEs (the
    // enum-typed status makes an enum-typed status event), and a claimed status event
    // of its own is an ordinary line.
    let job = jobs[0];
    let before_seq = assert_numbered(&db, job).await as i64;
    db.execute(
        "INSERT INTO agent_job_events (id, job_id, level, message, payload, created_at, \
                                       updated_at) \
         VALUES ($1, $2, 'warn'::agentjobeventlevel, 'fake', \
                 '{\"kind\": \"status\", \"status\": \"succeeded\"}', now(), now())",
        &[&Uuid::new_v4(), &job],
    )
    .await
    .unwrap();
    db.execute(
        "UPDATE agent_jobs SET status = 'failed'::agentjobstatus, updated_at = now(), \
                finished_at = now(), error_message = 'boom' WHERE id = $1",
        &[&job],
    )
    .await
    .unwrap();
    let rows = db
        .query(
            "SELECT seq, level::text, payload->>'kind', payload->>'status' \
             FROM agent_job_events WHERE job_id = $1 AND seq > $2 ORDER BY seq",
            &[&job, &before_seq],
        )
        .await
        .unwrap();
    let got: Vec<(i64, String, Option<String>, Option<String>)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        got,
        [
            (
                before_seq + 1,
                "warn".to_string(),
                Some("log".to_string()),
                Some("succeeded".to_string())
            ),
            (
                before_seq + 2,
                "error".to_string(),
                Some("status".to_string()),
                Some("failed".to_string())
            ),
        ]
    );
    assert_numbered(&db, job).await;

    // eventgate's own status writes and appends work on the enum columns too.
    let other = jobs[1];
    let pool = eventgate::db::pool(&url, 1).unwrap();
    let client = pool.get().await.unwrap();
    assert!(
        eventgate::store::set_job_status(&**client, other, "cancelled")
            .await
            .unwrap()
    );
    eventgate::store::append_events(
        &**client,
        other,
        &[eventgate::NewEvent {
            level: eventgate::Level::Warn,
            message: "after\nthe end".into(),
            payload: serde_json::json!({"kind": "log", "stream": "stderr"}),
        }],
    )
    .await
    .unwrap();
    let tail = eventgate::store::events_after(&client, other, 0, None, 10_000)
        .await
        .unwrap();
    let n = tail.len();
    assert_eq!(
        (tail[n - 2].status(), tail[n - 2].level.as_str()),
        (Some(eventgate::JobStatus::Cancelled), "warn")
    );
    assert_eq!(
        (tail[n - 1].level.as_str(), tail[n - 1].seq),
        ("warn", n as i64)
    );
    assert_numbered(&db, other).await;
    drop(client);

    // The gateway serves the adopted tables: the whole job streamed exactly (it ended:
    // the stream ends too), then resumed from the middle.
    let gateway = Gateway::start(&url).await;
    let last = before_seq + 2;
    let mut sse = Sse::job(gateway.addr, job, None).await;
    let messages = sse.read_to_end().await;
    assert_exact(&seqs(&messages), 1, last);
    let first = messages
        .iter()
        .find(|m| m.event == "queue_event")
        .unwrap()
        .json();
    assert_eq!(first["line"], 1);
    assert!(
        first["payload"].is_object(),
        "a NULL payload is served as {{}}"
    );
    let mut sse = Sse::job(gateway.addr, job, Some(last / 2)).await;
    assert_exact(&seqs(&sse.read_to_end().await), last / 2 + 1, last);
    let page = get(gateway.addr, &format!("/api/queue/jobs/{job}"))
        .await
        .unwrap();
    assert_eq!(page.status, 200, "{}", page.text());
    assert_eq!(page.json()["status"], "failed");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_shape_is_refused_untouched() {
    let shapes = [
        // Tables of these names that are something else entirely.
        "CREATE TABLE agent_jobs (id int PRIMARY KEY, state text); \
         CREATE TABLE agent_job_events (id int PRIMARY KEY, job_id int, body text);",
        // Only one of the two.
        "CREATE TABLE agent_jobs (id uuid PRIMARY KEY, status text);",
        // Nearly the original layout, but the message is not text.
        &ORIGINAL_LAYOUT.replace(
            "message    text                     NOT NULL,",
            "message    varchar(200)             NOT NULL,",
        ),
    ];
    for layout in shapes {
        let url = empty_database().await;
        let db = eventgate::db::connect(&url).await.unwrap();
        db.batch_execute(layout).await.unwrap();
        let before = catalog_snapshot(&db, false).await;
        let err = eventgate::db::migrate(&url).await.unwrap_err().to_string();
        assert!(err.contains("refusing to migrate"), "{err}");
        assert!(err.contains("nothing was changed"), "{err}");
        assert_eq!(catalog_snapshot(&db, false).await, before, "untouched");

        // The command says so and exits non-zero.
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_eventgate"))
            .arg("migrate")
            .env("DATABASE_URL", &url)
            .output()
            .await
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("refusing to migrate"), "{stderr}");
        assert_eq!(catalog_snapshot(&db, false).await, before, "untouched");
    }
}

/// Migrate's time on 1,000,000 existing events (1,000 jobs) while the original
/// application keeps inserting, with the writer's longest INSERT (the longest it was
/// held up by a lock of migrate), and the first page's latency afterwards. A
/// measurement, not a test: `cargo test --test adopt -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_adopting_a_million_events() {
    let url = empty_database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    db.batch_execute(ORIGINAL_LAYOUT).await.unwrap();
    let started = Instant::now();
    original_data(&db, 1000, 1000).await;
    db.batch_execute("VACUUM ANALYZE").await.unwrap();
    println!("fixture: 1,000,000 events in {:?}", started.elapsed());
    let jobs: Vec<Uuid> = db
        .query(
            "SELECT id FROM agent_jobs ORDER BY created_at LIMIT 50",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = original_writer(url.clone(), jobs.clone(), stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    eventgate::db::migrate(&url).await.unwrap();
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (written, longest) = writer.await.unwrap();
    println!(
        "migrate: {took:?}; the original writer meanwhile: {} inserts, longest {longest:?}",
        written.len()
    );
    for &job in &jobs[..3] {
        assert_numbered(&db, job).await;
    }
    let pool = eventgate::db::pool(&url, 1).unwrap();
    let client = pool.get().await.unwrap();
    let started = Instant::now();
    let page = eventgate::store::events_after(&client, jobs[10], 0, None, 200)
        .await
        .unwrap();
    println!(
        "first page afterwards: {} events in {:?}",
        page.len(),
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopts_the_squashed_layout_too() {
    let url = empty_database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    db.batch_execute(SQUASHED_LAYOUT).await.unwrap();
    // The squashed layout has no server defaults: the application names every column.
    db.batch_execute(
        "INSERT INTO agent_jobs (id, type, status, priority, payload, attempt, max_attempts) \
         SELECT gen_random_uuid(), 'codex_exec', 'queued', 0, '{}', 1, 3 \
         FROM generate_series(1, 3); \
         INSERT INTO agent_job_events (id, job_id, level, message, payload, created_at) \
         SELECT gen_random_uuid(), j.id, 'info', 'old ' || i, NULL, \
                timestamptz '2026-03-20 10:00:00+00' + (i / 3) * interval '1 millisecond' \
         FROM agent_jobs j, generate_series(1, 200) AS i;",
    )
    .await
    .unwrap();
    let before = catalog_snapshot(&db, false).await;
    eventgate::db::migrate(&url).await.unwrap();
    let after = catalog_snapshot(&db, false).await;
    for line in before.lines() {
        assert!(after.lines().any(|l| l == line), "kept: {line}");
    }
    let job: Uuid = db
        .query_one("SELECT id FROM agent_jobs LIMIT 1", &[])
        .await
        .unwrap()
        .get(0);
    db.execute(
        "INSERT INTO agent_job_events (id, job_id, level, message, payload, created_at) \
         VALUES ($1, $2, 'error', 'new', NULL, now())",
        &[&Uuid::new_v4(), &job],
    )
    .await
    .unwrap();
    db.execute(
        "UPDATE agent_jobs SET status = 'dead_letter', updated_at = now() WHERE id = $1",
        &[&job],
    )
    .await
    .unwrap();
    assert_eq!(assert_numbered(&db, job).await, 202);
    let last: (String, String) = db
        .query_one(
            "SELECT level::text, payload->>'status' FROM agent_job_events \
             WHERE job_id = $1 AND seq = 202",
            &[&job],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(last, ("error".to_string(), "dead_letter".to_string()));
    assert_eq!(
        eventgate::db::migrate(&url).await.unwrap(),
        Vec::<String>::new()
    );
}
