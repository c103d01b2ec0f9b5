//! Debounced and suppressed NOTIFY (sql/0002), adaptive (sql/0006): at once when quiet,
//! fewer notifications when busy, the same delivery.

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use tokio::sync::mpsc;

/// Counts notifications on `agent_job_events` from a LISTEN connection of its own.
async fn listen(url: &str) -> (tokio_postgres::Client, mpsc::UnboundedReceiver<String>) {
    let (client, mut connection) = eventgate::db::config(url)
        .unwrap()
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    tokio::spawn(async move {
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send(n.payload().to_string());
            }
        }
    });
    client
        .batch_execute("LISTEN agent_job_events")
        .await
        .unwrap();
    (client, rx)
}

/// The next `n` notification payloads, waiting for each.
async fn next_notifications(rx: &mut mpsc::UnboundedReceiver<String>, n: usize) -> Vec<String> {
    let mut got = Vec::new();
    while got.len() < n {
        let next = tokio::time::timeout(PATIENCE, rx.recv()).await;
        got.push(
            next.expect("a notification in time")
                .expect("listener alive"),
        );
    }
    got
}

fn drain(rx: &mut mpsc::UnboundedReceiver<String>) -> Vec<String> {
    let mut out = Vec::new();
    while let Ok(p) = rx.try_recv() {
        out.push(p);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_notifies_about_once_and_its_last_batch_is_not_stranded() {
    let url = database().await;
    let gw = Gateway::start(&url).await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let job = create_job(&db).await;
    let (_listener, mut rx) = listen(&url).await;
    let mut subscribers =
        futures::future::join_all((0..3).map(|_| Sse::job(gw.addr, job, None))).await;

    // 100 statements as fast as one session can commit them.
    let started = std::time::Instant::now();
    for i in 0..100 {
        insert(&db, job, 2, &format!("burst {i}")).await;
    }
    let elapsed = started.elapsed();
    for sse in subscribers.iter_mut() {
        assert_exact(&seqs(&sse.until_seq(200).await), 1, 200);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let notes = drain(&mut rx);
    // At most one per started 50 ms (the per-job debounce) of the burst.
    let bound = 2 + elapsed.as_millis() as usize / 50;
    assert!(
        !notes.is_empty() && notes.len() <= bound,
        "{} notifications for 100 statements in {elapsed:?}",
        notes.len()
    );
    assert!(gw.metric("eventgate_counter_polls_total").await > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_with_notify_off_are_delivered_by_the_counter_poll() {
    let url = database().await;
    let gw = Gateway::start(&url).await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let job = create_job(&db).await;
    let (_listener, mut rx) = listen(&url).await;
    let mut sse = Sse::job(gw.addr, job, None).await;

    let bulk = eventgate::db::connect(&url).await.unwrap();
    bulk.batch_execute("SET eventgate.notify = off")
        .await
        .unwrap();
    for i in 0..50 {
        insert(&bulk, job, 10, &format!("bulk {i}")).await;
        if i % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }
    assert_exact(&seqs(&sse.until_seq(500).await), 1, 500);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        drain(&mut rx).is_empty(),
        "no NOTIFY from a notify=off session"
    );

    // The status change still ends the stream (it notifies the status channel only;
    // its event comes through the poll like the rest).
    set_status(&bulk, job, "succeeded").await;
    let rest = sse.read_to_end().await;
    assert_eq!(seqs(&rest), vec![501]);
    assert_eq!(rest.last().unwrap().event, "end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_writers_still_wake_an_idle_gateway_at_once_and_always_means_always() {
    let url = database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let job = create_job(&db).await;
    let (_listener, mut rx) = listen(&url).await;

    // A quiet job: its first statement notifies, with the hint payload.
    insert(&db, job, 3, "hello").await;
    let first = next_notifications(&mut rx, 1).await.remove(0);
    assert_eq!(first, format!("{job}:3"));

    // `always`: one per statement, the behaviour before debouncing.
    let loud = eventgate::db::connect(&url).await.unwrap();
    loud.batch_execute("SET eventgate.notify = 'always'")
        .await
        .unwrap();
    for _ in 0..5 {
        insert(&loud, job, 1, "loud").await;
    }
    let got = next_notifications(&mut rx, 5).await;
    assert_eq!(
        got,
        (4..=8).map(|s| format!("{job}:{s}")).collect::<Vec<_>>()
    );

    // A short debounce set for the database applies to new sessions.
    let db_name: String = db
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    db.batch_execute(&format!(
        "ALTER DATABASE {db_name} SET eventgate.notify_debounce = '1ms'"
    ))
    .await
    .unwrap();
    let quick = eventgate::db::connect(&url).await.unwrap();
    for _ in 0..3 {
        insert(&quick, job, 1, "quick").await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = next_notifications(&mut rx, 3).await;
    assert_eq!(
        got,
        (9..=11).map(|s| format!("{job}:{s}")).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_busy_jobs_share_a_global_notification_budget() {
    let url = database().await;
    let gw = Gateway::start(&url).await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let mut jobs = Vec::new();
    for _ in 0..40 {
        jobs.push(create_job(&db).await);
    }
    let (_listener, mut rx) = listen(&url).await;
    let mut streams =
        futures::future::join_all(jobs.iter().map(|j| Sse::job(gw.addr, *j, None))).await;

    // Each job's first statement: per job, every one is due; globally, at most one per
    // 10 ms may notify. (An explicit global interval: 0003's fixed rule, without the
    // quiet-rate meter of 0006, which would let a burst of first statements through.)
    db.batch_execute("SET eventgate.notify_global_interval = '10ms'")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    for job in &jobs {
        insert(&db, *job, 1, "first").await;
    }
    let elapsed = started.elapsed();
    for sse in streams.iter_mut() {
        assert_exact(&seqs(&sse.until_seq(1).await), 1, 1);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let notes = drain(&mut rx).len();
    let bound = 1 + elapsed.as_millis() as usize / 10 + 1;
    assert!(
        notes >= 1 && notes <= bound,
        "{notes} notifications for 40 jobs written in {elapsed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_notify_off_sends_no_notify_and_is_delivered_in_full() {
    let url = database().await;
    let gw = Gateway::start(&url).await;
    let (_listener, mut rx) = listen(&url).await;
    let job = uuid::Uuid::new_v4();
    let db = eventgate::db::connect(&url).await.unwrap();
    db.execute(
        "INSERT INTO agent_jobs (id, name) VALUES ($1, 'bulk')",
        &[&job],
    )
    .await
    .unwrap();
    let mut sse = Sse::job(gw.addr, job, None).await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_eventgate"))
        .args(["run", "--job", &job.to_string(), "--notify", "off", "--"])
        .args(["sh", "-c", "seq 1 20000"])
        .env("DATABASE_URL", &url)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = sse.read_to_end().await;
    let n = last_seq(&db, job).await;
    assert_exact(&seqs(&got), 1, n);
    assert_eq!(got.last().unwrap().event, "end");
    let lines: usize = got
        .iter()
        .filter(|m| m.event == "queue_event" && m.json()["payload"]["kind"] == "log")
        .map(|m| m.json()["message"].as_str().unwrap().lines().count())
        .sum();
    assert_eq!(lines, 20000, "every line delivered");
    assert!(
        drain(&mut rx).is_empty(),
        "no NOTIFY from the worker's session"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_notify_settings_fall_back_to_the_defaults_and_never_fail_a_write() {
    let url = database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let job = create_job(&db).await;
    let (_listener, mut rx) = listen(&url).await;

    let odd = eventgate::db::connect(&url).await.unwrap();
    odd.batch_execute(
        "SET eventgate.notify = 'sometimes'; \
         SET eventgate.notify_debounce = 'soon'; \
         SET eventgate.notify_global_interval = 'now and then'",
    )
    .await
    .unwrap();
    // An unknown mode is the default, and bad durations are the default ones: a quiet
    // job's first statement notifies, the next ones inside 50 ms do not.
    for _ in 0..3 {
        insert(&odd, job, 1, "odd").await;
    }
    let first = next_notifications(&mut rx, 1).await.remove(0);
    assert_eq!(first, format!("{job}:1"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(drain(&mut rx).is_empty(), "debounced as by default");

    // A global interval of 0 leaves only the per-job debounce.
    odd.batch_execute(
        "SET eventgate.notify_global_interval = '0'; SET eventgate.notify_debounce = '0'",
    )
    .await
    .unwrap();
    for _ in 0..3 {
        insert(&odd, job, 1, "each").await;
    }
    let got = next_notifications(&mut rx, 3).await;
    assert_eq!(
        got,
        (4..=6).map(|s| format!("{job}:{s}")).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_counter_poll_reads_past_its_page_and_across_jobs_in_one_query() {
    let url = database().await;
    let gw = Gateway::start(&url).await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let jobs = [create_job(&db).await, create_job(&db).await];
    let mut streams =
        futures::future::join_all(jobs.iter().map(|j| Sse::job(gw.addr, *j, None))).await;

    // No notifications at all: only the poll delivers. One statement far larger than
    // the poll's page of 100 per job, on two jobs between two polls.
    let bulk = eventgate::db::connect(&url).await.unwrap();
    bulk.batch_execute("SET eventgate.notify = off")
        .await
        .unwrap();
    let polls_before = gw.metric("eventgate_counter_polls_total").await;
    insert(&bulk, jobs[0], 250, "big").await;
    insert(&bulk, jobs[1], 3, "small").await;
    insert(&bulk, jobs[0], 5, "after").await;
    assert_exact(&seqs(&streams[0].until_seq(255).await), 1, 255);
    assert_exact(&seqs(&streams[1].until_seq(3).await), 1, 3);
    assert!(gw.metric("eventgate_counter_polls_total").await > polls_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_statements_of_many_jobs_each_notify_at_once() {
    let url = database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let mut jobs = Vec::new();
    for _ in 0..30 {
        jobs.push(create_job(&db).await);
    }
    let (_listener, mut rx) = listen(&url).await;

    // One statement per job, a few milliseconds apart: far below the quiet rate, so
    // none waits for the global interval of 0003 (which let at most one per 10 ms by).
    for job in &jobs {
        insert(&db, *job, 1, "lone").await;
        tokio::time::sleep(Duration::from_millis(4)).await;
    }
    let got = next_notifications(&mut rx, jobs.len()).await;
    assert_eq!(
        got,
        jobs.iter().map(|j| format!("{j}:1")).collect::<Vec<_>>(),
        "each lone statement notified, with its hint"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(drain(&mut rx).is_empty(), "one notification per statement");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_quiet_rate_a_burst_is_coalesced_and_every_event_delivered() {
    let url = database().await;
    let gw = Gateway::start(&url).await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let mut jobs = Vec::new();
    for _ in 0..20 {
        jobs.push(create_job(&db).await);
    }
    let (_listener, mut rx) = listen(&url).await;
    let mut streams =
        futures::future::join_all(jobs.iter().map(|j| Sse::job(gw.addr, *j, None))).await;

    // A threshold of 5 statements a second, which one session writing in a loop passes
    // at once: from then on the statements share 0003's budget.
    let busy = eventgate::db::connect(&url).await.unwrap();
    busy.batch_execute("SET eventgate.notify_quiet_rate = '5'")
        .await
        .unwrap();
    let rounds = 10;
    for r in 0..rounds {
        for job in &jobs {
            insert(&busy, *job, 3, &format!("burst {r}")).await;
        }
    }
    let statements = rounds * jobs.len();
    for sse in streams.iter_mut() {
        assert_exact(
            &seqs(&sse.until_seq(3 * rounds as i64).await),
            1,
            3 * rounds as i64,
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let notes = drain(&mut rx);
    assert!(
        !notes.is_empty() && notes.len() < statements,
        "{} notifications for {statements} statements",
        notes.len()
    );
    for note in &notes {
        let (job, seq) = note.split_once(':').expect("a job_id:max_seq hint");
        assert!(jobs.iter().any(|j| j.to_string() == job), "{note}");
        assert_eq!(
            seq.parse::<i64>().unwrap() % 3,
            0,
            "a statement's last seq: {note}"
        );
    }
}

/// The fast path's slots (sql/0008): two notifying transactions may be in flight at
/// once (one committing, one waiting behind it at PostgreSQL's NOTIFY lock), a third
/// takes no slot. Seen in `pg_locks`, then in what the two notify at their commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_notifying_transactions_may_be_in_flight_and_a_third_takes_no_slot() {
    let url = database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let jobs = [
        create_job(&db).await,
        create_job(&db).await,
        create_job(&db).await,
    ];
    let (_listener, mut rx) = listen(&url).await;
    let mut open = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        let c = eventgate::db::connect(&url).await.unwrap();
        c.batch_execute(&format!(
            "BEGIN; INSERT INTO agent_job_events (job_id, level, message) \
             VALUES ('{job}', 'info', 'open {i}')"
        ))
        .await
        .unwrap();
        open.push(c);
    }
    assert_eq!(
        slots(&open[0]).await,
        Some(vec![6]),
        "the first takes slot 6"
    );
    assert_eq!(slots(&open[1]).await, Some(vec![7]), "the second slot 7");
    assert_eq!(slots(&open[2]).await, None, "the third none");
    // The two with a slot notify at their commit, whatever the clock.
    for c in &open[..2] {
        c.batch_execute("COMMIT").await.unwrap();
    }
    let mut got = next_notifications(&mut rx, 2).await;
    got.sort();
    let mut want: Vec<String> = jobs[..2].iter().map(|j| format!("{j}:1")).collect();
    want.sort();
    assert_eq!(got, want);
    open[2].batch_execute("COMMIT").await.unwrap();
}

/// The slots (advisory locks (1702260340, 6) and (…, 7)) `c`'s transaction holds.
async fn slots(c: &tokio_postgres::Client) -> Option<Vec<i32>> {
    c.query_one(
        "SELECT array_agg(objid::int4 ORDER BY objid) \
         FROM pg_locks WHERE locktype = 'advisory' AND classid = 1702260340 \
         AND objid IN (6, 7) AND pid = pg_backend_pid()",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}
