//! History that went back, and connections that die: `event: reset`, never a hang and
//! never a silent rewrite (DESIGN.md "SSE stream", "Scale beyond one machine").

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

/// The next message, failing the test if none comes in time.
async fn next(sse: &mut Sse) -> Message {
    tokio::time::timeout(PATIENCE, sse.next())
        .await
        .expect("a message in time")
        .expect("the stream goes on")
}

/// Asserts `m` is `event: reset` with `lastSeq` = `last_seq`.
fn assert_reset(m: &Message, last_seq: i64) {
    assert_eq!(m.event, "reset", "{} {}", m.event, m.data);
    assert_eq!(m.json()["lastSeq"], last_seq, "{}", m.data);
}

#[tokio::test]
async fn a_cursor_past_the_end_of_a_running_job_gets_reset_then_the_rest() {
    let url = database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let gw = Gateway::start(&url).await;
    let job = create_job(&db).await;
    insert(&db, job, 3, "before").await;

    let mut beyond = Sse::job(gw.addr, job, Some(i64::MAX)).await;
    assert_eq!(beyond.status, 200);
    assert_reset(&next(&mut beyond).await, 3);

    insert(&db, job, 2, "after").await;
    set_status(&db, job, "failed").await;
    let rest = tokio::time::timeout(PATIENCE, beyond.read_to_end())
        .await
        .expect("the stream ends after the job does");
    let live = seqs(&rest);
    assert_eq!(
        live.first(),
        Some(&4),
        "goes on right after the reset point"
    );
    assert_exact(&live, 4, *live.last().unwrap());
    let last = rest.last().unwrap();
    assert_eq!(last.event, "end");
    assert_eq!(last.json()["status"], "failed");
    assert_eq!(last.json()["lastSeq"], *live.last().unwrap());
}

#[tokio::test]
async fn a_cursor_past_the_end_of_a_finished_job_gets_reset_then_end() {
    let url = database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let job = create_job(&db).await;
    insert(&db, job, 3, "x").await;
    set_status(&db, job, "succeeded").await;
    let last_seq: i64 = db
        .query_one("SELECT last_seq FROM agent_jobs WHERE id = $1", &[&job])
        .await
        .unwrap()
        .get(0);
    // Both from a gateway that never saw the job and from one that has its state.
    let gw = Gateway::start(&url).await;
    let _holder = Sse::job(gw.addr, job, Some(1)).await;
    for _ in 0..2 {
        let mut beyond = Sse::connect(
            gw.addr,
            &format!(
                "/api/queue/jobs/{job}/events/stream?afterSeq={}",
                last_seq + 100
            ),
            None,
        )
        .await;
        assert_eq!(beyond.status, 200);
        let all = tokio::time::timeout(PATIENCE, beyond.read_to_end())
            .await
            .expect("the stream ends");
        assert_eq!(
            all.len(),
            2,
            "reset then end: {:?}",
            all.iter().map(|m| &m.event).collect::<Vec<_>>()
        );
        assert_reset(&all[0], last_seq);
        assert_eq!(all[1].event, "end");
        assert_eq!(all[1].json()["lastSeq"], last_seq);
    }
}

/// Cuts the gateway's LISTEN connection (as a failover or a network cut does) and
/// waits until it is back.
async fn cut_listen(db: &tokio_postgres::Client, gw: &Gateway) {
    let reconnects = gw.metric("eventgate_listener_reconnects_total").await;
    let cut = db
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name LIKE '%-listen' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(cut, 1, "the gateway's LISTEN session was cut");
    wait_for("the LISTEN connection back", || async {
        gw.metric("eventgate_listener_reconnects_total").await > reconnects
    })
    .await;
}

/// Rewrites a job's history as an asynchronous failover does, in one transaction: the
/// events after `keep` are gone, the job's counter is back at `keep`, and `n` other
/// events take the seqs after it again.
async fn rewrite(db: &tokio_postgres::Client, job: Uuid, keep: i64, n: usize, label: &str) {
    db.batch_execute(&format!(
        "BEGIN; \
         DELETE FROM agent_job_events WHERE job_id = '{job}' AND seq > {keep}; \
         UPDATE agent_jobs SET last_seq = {keep}, last_line = {keep} WHERE id = '{job}'; \
         INSERT INTO agent_job_events (job_id, level, message, payload) \
         SELECT '{job}', 'info', '{label} ' || i, '{{\"kind\": \"log\"}}' \
         FROM generate_series(1, {n}) AS i; \
         COMMIT;"
    ))
    .await
    .unwrap();
}

#[tokio::test]
async fn history_that_went_back_resets_every_stream_then_follows_the_new_history() {
    let url = database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let gw = Gateway::start(&url).await;
    let job = create_job(&db).await;
    insert(&db, job, 80, "old").await;

    let mut from_start = Sse::job(gw.addr, job, None).await;
    let mut resumed = Sse::job(gw.addr, job, Some(40)).await;
    assert_exact(&seqs(&from_start.until_seq(80).await), 1, 80);
    assert_exact(&seqs(&resumed.until_seq(80).await), 41, 80);

    // The table loses 51..80 and new writers take 51.. again (fewer of them than were
    // lost, so nothing is above the hub's last seq: only the check can notice).
    rewrite(&db, job, 50, 5, "new").await;
    cut_listen(&db, &gw).await;

    for sse in [&mut from_start, &mut resumed] {
        assert_reset(&next(sse).await, 55);
    }
    insert(&db, job, 3, "after").await;
    for sse in [&mut from_start, &mut resumed] {
        let after = sse.until_seq(58).await;
        assert_exact(&seqs(&after), 56, 58);
        assert!(after.iter().all(|m| m.event == "queue_event"));
        for m in &after {
            assert!(
                m.json()["message"].as_str().unwrap().starts_with("after "),
                "{}",
                m.data
            );
        }
    }
    // A newcomer sees the new history only.
    let mut newcomer = Sse::job(gw.addr, job, None).await;
    let all = newcomer.until_seq(58).await;
    assert_exact(&seqs(&all), 1, 58);
    assert!(all[50].json()["message"]
        .as_str()
        .unwrap()
        .starts_with("new "));
}

#[tokio::test]
async fn the_same_length_with_other_events_is_noticed_by_id() {
    let url = database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let gw = Gateway::start(&url).await;
    let job = create_job(&db).await;
    insert(&db, job, 10, "old").await;
    let mut sse = Sse::job(gw.addr, job, None).await;
    assert_exact(&seqs(&sse.until_seq(10).await), 1, 10);

    // 6..10 replaced by other events with the same seqs: only the ids differ.
    rewrite(&db, job, 5, 5, "other").await;
    cut_listen(&db, &gw).await;
    assert_reset(&next(&mut sse).await, 10);
    insert(&db, job, 1, "after").await;
    let after = sse.until_seq(11).await;
    assert_exact(&seqs(&after), 11, 11);
}

/// A loopback TCP relay to PostgreSQL that can blackhole the LISTEN session: once
/// `blackhole` is set, the relayed connection that sent `LISTEN` stops forwarding in
/// both directions without closing (a silent network); the others go on.
struct Relay {
    port: u16,
    blackhole: Arc<AtomicBool>,
}

impl Relay {
    async fn start(upstream: u16) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let blackhole = Arc::new(AtomicBool::new(false));
        let hole = blackhole.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    continue;
                };
                let listens = Arc::new(AtomicBool::new(false));
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                tokio::spawn(pipe(ri, wo, listens.clone(), hole.clone(), true));
                tokio::spawn(pipe(ro, wi, listens, hole.clone(), false));
            }
        });
        Relay { port, blackhole }
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    listens: Arc<AtomicBool>,
    blackhole: Arc<AtomicBool>,
    to_server: bool,
) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if to_server && buf[..n].windows(6).any(|w| w == b"LISTEN") {
            listens.store(true, Ordering::SeqCst);
        }
        if listens.load(Ordering::SeqCst) && blackhole.load(Ordering::SeqCst) {
            // Silent: keep both sockets open, forward nothing, ever.
            let _keep = (from, to);
            return std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// `url` with its port replaced by `port`.
fn via(url: &str, port: u16) -> String {
    let config: tokio_postgres::Config = url.parse().unwrap();
    let upstream = config.get_ports()[0];
    url.replacen(&format!(":{upstream}/"), &format!(":{port}/"), 1)
}

/// A gateway whose connections to PostgreSQL go through a [`Relay`], a job, and a
/// stream of it that has received its first `n` events (labelled `label`).
async fn behind_relay(
    n: usize,
    label: &str,
) -> (tokio_postgres::Client, Relay, Gateway, Uuid, Sse) {
    let url = database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let upstream = url.parse::<tokio_postgres::Config>().unwrap().get_ports()[0];
    let relay = Relay::start(upstream).await;
    let gw = Gateway::start(&via(&url, relay.port)).await;
    let job = create_job(&db).await;
    let mut sse = Sse::job(gw.addr, job, None).await;
    insert(&db, job, n, label).await;
    assert_exact(&seqs(&sse.until_seq(n as i64).await), 1, n as i64);
    (db, relay, gw, job, sse)
}

#[tokio::test]
async fn a_silent_listen_connection_is_noticed_and_replaced_and_nothing_is_lost() {
    let (db, relay, gw, job, mut sse) = behind_relay(10, "before").await;

    let silent = gw.metric("eventgate_listener_silent_total").await;
    let reconnects = gw.metric("eventgate_listener_reconnects_total").await;
    relay.blackhole.store(true, Ordering::SeqCst);
    let cut = std::time::Instant::now();
    // Written into the silence: the counter poll, on the pool, delivers them.
    insert(&db, job, 10, "during").await;
    assert_exact(&seqs(&sse.until_seq(20).await), 11, 20);
    wait_for("the silent LISTEN connection noticed", || async {
        gw.metric("eventgate_listener_silent_total").await > silent
    })
    .await;
    let noticed = cut.elapsed();
    // The network heals for new connections (the blackholed one stays silent forever).
    relay.blackhole.store(false, Ordering::SeqCst);
    wait_for("the silent LISTEN connection replaced", || async {
        gw.metric("eventgate_listener_reconnects_total").await > reconnects
    })
    .await;
    println!(
        "figure: blackholed LISTEN noticed after {:.1} s, replaced after {:.1} s",
        noticed.as_secs_f64(),
        cut.elapsed().as_secs_f64()
    );
    insert(&db, job, 10, "after").await;
    assert_exact(&seqs(&sse.until_seq(30).await), 21, 30);
}

/// Whether every message is an event whose message starts with `label`.
fn all_labelled(messages: &[Message], label: &str) -> bool {
    messages.iter().all(|m| {
        m.event == "queue_event" && m.json()["message"].as_str().unwrap().starts_with(label)
    })
}

/// The gap the asynchronous-failover soak found: the pool reaches the new history
/// before the LISTEN session notices anything (here it is silent; a failover to a host
/// that vanished without a RST does this), and the new history is already longer than
/// what was broadcast. The counter poll must not append the new events to the old
/// ones (then the check at the reconnect would find the new id at the new last seq and
/// pass): every read first checks the event at its cursor, so the stream gets `reset`
/// before any event of the new history.
#[tokio::test]
async fn a_longer_new_history_read_before_the_listen_session_notices_is_reset_not_appended() {
    let (db, relay, gw, job, mut sse) = behind_relay(80, "old").await;

    relay.blackhole.store(true, Ordering::SeqCst);
    let resets = gw.metric("eventgate_history_resets_total").await;
    // 51..80 lost, and 40 new events: the table ends at 90, past the hub's 80.
    rewrite(&db, job, 50, 40, "new").await;
    assert_reset(&next(&mut sse).await, 90);
    assert_eq!(
        gw.metric("eventgate_history_resets_total").await,
        resets + 1
    );
    insert(&db, job, 2, "after").await;
    let after = sse.until_seq(92).await;
    assert_exact(&seqs(&after), 91, 92);
    assert!(all_labelled(&after, "after "), "{after:?}");
    relay.blackhole.store(false, Ordering::SeqCst);
}

/// Once the LISTEN session is lost, the ring may hold a history a failover took back:
/// until the job is checked against the table, a resumer is served from the table.
/// Here the resumer's cursor comes from the new history (as the soak's burst clients'
/// do), inside the range the ring still holds from the old one.
#[tokio::test]
async fn after_the_listen_session_is_lost_resumers_read_the_table_not_the_ring() {
    let (db, relay, gw, job, mut sse) = behind_relay(80, "old").await;

    // The session goes silent and is noticed (each new one goes silent too, so it
    // stays lost until the relay heals).
    let silent = gw.metric("eventgate_listener_silent_total").await;
    relay.blackhole.store(true, Ordering::SeqCst);
    wait_for("the silent LISTEN connection noticed", || async {
        gw.metric("eventgate_listener_silent_total").await > silent
    })
    .await;
    // Shorter than what was broadcast, so no read appends to it: only the ring
    // could show the old 53..80.
    rewrite(&db, job, 50, 5, "new").await;
    let ring_catch_ups = gw.metric("eventgate_ring_catch_ups_total").await;
    let mut resumer = Sse::job(gw.addr, job, Some(52)).await;
    let got = resumer.until_seq(55).await;
    assert_exact(&seqs(&got), 53, 55);
    assert!(all_labelled(&got, "new "), "{got:?}");
    assert_eq!(
        gw.metric("eventgate_ring_catch_ups_total").await,
        ring_catch_ups
    );

    // The relay heals: the reconnect's check resets the old stream to the new history.
    relay.blackhole.store(false, Ordering::SeqCst);
    assert_reset(&next(&mut sse).await, 55);
    insert(&db, job, 1, "after").await;
    assert_exact(&seqs(&sse.until_seq(56).await), 56, 56);
}

#[tokio::test]
async fn several_hosts_with_the_first_dead_find_the_primary() {
    let url = database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    // A port nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config: tokio_postgres::Config = url.parse().unwrap();
    let port = config.get_ports()[0];
    let multi = url.replacen(
        &format!("127.0.0.1:{port}/"),
        &format!("127.0.0.1:{dead},127.0.0.1:{port}/"),
        1,
    ) + "?target_session_attrs=read-write";
    assert_ne!(multi, url);
    // migrate, the pool and the LISTEN connection all take the multi-host URL.
    eventgate::db::migrate(&multi).await.unwrap();
    let gw = Gateway::start(&multi).await;
    let job = create_job(&db).await;
    let mut sse = Sse::job(gw.addr, job, None).await;
    insert(&db, job, 5, "x").await;
    assert_exact(&seqs(&sse.until_seq(5).await), 1, 5);
    // Live, so through the LISTEN connection or the counter poll; and a newcomer
    // backfills through the pool.
    let mut other = Sse::job(gw.addr, job, Some(2)).await;
    assert_exact(&seqs(&other.until_seq(5).await), 3, 5);
}

/// The job's last seq on `url`'s server.
async fn last_seq_on(url: &str, job: Uuid) -> Option<i64> {
    let client = eventgate::db::connect(url).await.ok()?;
    let row = client
        .query_opt("SELECT last_seq FROM agent_jobs WHERE id = $1", &[&job])
        .await
        .ok()??;
    Some(row.get(0))
}

#[tokio::test]
async fn an_asynchronous_failover_that_lost_commits_resets_then_follows_the_new_primary() {
    let (primary, url) = own_cluster().await;
    // Blocking (pg_basebackup, pg_ctl) but short, as the other tests' restarts are.
    let standby = eventgate::cluster::Cluster::standby_of(&primary).expect("a standby");
    let multi = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=read-write",
        primary.port(),
        standby.port()
    );
    let standby_url = standby.url();
    let db = eventgate::db::connect(&url).await.unwrap();
    let gw = Gateway::start(&multi).await;
    let job = create_job(&db).await;
    let mut sse = Sse::job(gw.addr, job, None).await;
    insert(&db, job, 50, "replicated").await;
    wait_for("the standby at 50", || async {
        last_seq_on(&standby_url, job).await == Some(50)
    })
    .await;
    // The standby stops receiving; the primary acknowledges 30 more it never gets.
    standby.stop().unwrap();
    insert(&db, job, 30, "lost").await;
    assert_exact(&seqs(&sse.until_seq(80).await), 1, 80);
    drop(db);
    primary.crash().unwrap();
    standby.resume().unwrap();
    standby.promote().unwrap();

    assert_reset(&next(&mut sse).await, 50);
    let new = connect_retry(&standby_url).await;
    insert(&new, job, 3, "new").await;
    let after = sse.until_seq(53).await;
    assert_exact(&seqs(&after), 51, 53);
    for m in &after {
        assert!(
            m.json()["message"].as_str().unwrap().starts_with("new "),
            "{}",
            m.data
        );
    }
}

/// A command printing `line 1` .. `line <n>`, one every 10 ms.
fn counting(n: usize) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        format!("i=0; while [ $i -lt {n} ]; do i=$((i+1)); echo \"line $i\"; sleep 0.01; done"),
    ]
}

/// `eventgate run` (the library) of [`counting`] `n` into a new `job`, on a task.
fn spawn_worker(
    url: String,
    job: Uuid,
    n: usize,
) -> tokio::task::JoinHandle<Result<eventgate::worker::Outcome, eventgate::Error>> {
    tokio::spawn(async move {
        let worker = eventgate::worker::Worker::builder(url, job)
            .create(true)
            .build();
        worker.run(&counting(n)).await
    })
}

/// The stdout lines a job holds on `client`'s server, in seq order.
async fn stored_lines(client: &tokio_postgres::Client, job: Uuid) -> Vec<String> {
    client
        .query(
            "SELECT message FROM agent_job_events WHERE job_id = $1 \
             AND payload->>'kind' = 'log' ORDER BY seq",
            &[&job],
        )
        .await
        .unwrap()
        .iter()
        .flat_map(|r| {
            r.get::<_, String>(0)
                .split('\n')
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Asserts `lines` is exactly `line 1` .. `line <n>`: none lost, none twice, in order.
fn assert_every_line_once(lines: &[String], n: usize) {
    let expected: Vec<String> = (1..=n).map(|i| format!("line {i}")).collect();
    if lines != expected {
        let missing = expected.iter().filter(|l| !lines.contains(l)).count();
        panic!(
            "{} lines stored, {missing} missing, first differences: {:?}",
            lines.len(),
            lines
                .iter()
                .zip(&expected)
                .filter(|(a, b)| a != b)
                .take(3)
                .collect::<Vec<_>>()
        );
    }
}

/// Events of `job` on `url`'s server (0 while it cannot be reached).
async fn count_on(url: &str, job: Uuid) -> i64 {
    let Ok(client) = eventgate::db::connect(url).await else {
        return 0;
    };
    client
        .query_one(
            "SELECT count(*) FROM agent_job_events WHERE job_id = $1",
            &[&job],
        )
        .await
        .map(|r| r.get(0))
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_writing_through_a_synchronous_promotion_stores_every_line_exactly_once() {
    let (primary, url) = own_cluster().await;
    tokio::task::block_in_place(|| {
        primary
            .configure("synchronous_commit = on\nsynchronous_standby_names = '*'")
            .expect("synchronous replication on")
    });
    let standby = tokio::task::block_in_place(|| {
        eventgate::cluster::Cluster::standby_of(&primary).expect("a standby")
    });
    let multi = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=read-write",
        primary.port(),
        standby.port()
    );
    let job = Uuid::new_v4();
    let n = 400;
    let worker = spawn_worker(multi, job, n);
    wait_for("50 events on the primary", || async {
        count_on(&url, job).await >= 50
    })
    .await;

    // The primary dies mid-run; the synchronous standby takes over.
    tokio::task::block_in_place(|| {
        primary.kill9().expect("kill -9 of the primary");
        standby.promote().expect("promote");
        // Alone now: it must not wait for a standby it no longer has.
        standby
            .configure("synchronous_standby_names = ''")
            .expect("synchronous replication off");
    });
    let outcome = tokio::time::timeout(PATIENCE, worker)
        .await
        .expect("the worker finishes")
        .unwrap()
        .expect("the worker runs");
    assert_eq!(outcome.exit_code, 0);

    let new = connect_retry(&standby.url()).await;
    assert_every_line_once(&stored_lines(&new, job).await, n);
    assert_numbered(&new, job).await;
    let status: String = new
        .query_one("SELECT status FROM agent_jobs WHERE id = $1", &[&job])
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "succeeded");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_stores_again_what_an_asynchronous_failover_took_back() {
    let (primary, url) = own_cluster().await;
    let standby = tokio::task::block_in_place(|| {
        eventgate::cluster::Cluster::standby_of(&primary).expect("a standby")
    });
    let standby_url = standby.url();
    let multi = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=read-write",
        primary.port(),
        standby.port()
    );
    let job = Uuid::new_v4();
    let n = 500;
    let worker = spawn_worker(multi, job, n);
    wait_for("20 events on the standby", || async {
        count_on(&standby_url, job).await >= 20
    })
    .await;
    // The standby stops receiving; the primary acknowledges batches it never gets.
    tokio::task::block_in_place(|| standby.stop().unwrap());
    let replicated = {
        // What the standby has is what the primary had when it stopped, at most.
        count_on(&url, job).await
    };
    wait_for("20 more events on the primary only", || async {
        count_on(&url, job).await >= replicated + 20
    })
    .await;
    tokio::task::block_in_place(|| {
        primary.kill9().expect("kill -9 of the primary");
        standby.resume().expect("the standby back");
        standby.promote().expect("promote");
    });
    let outcome = tokio::time::timeout(PATIENCE, worker)
        .await
        .expect("the worker finishes")
        .unwrap()
        .expect("the worker runs");
    assert_eq!(outcome.exit_code, 0);

    let new = connect_retry(&standby_url).await;
    assert_every_line_once(&stored_lines(&new, job).await, n);
    assert_numbered(&new, job).await;
}

/// `ALTER SYSTEM SET default_transaction_read_only` from a session that stays writable.
async fn set_read_only(admin: &tokio_postgres::Client, on: bool) {
    admin
        .batch_execute(&format!(
            "ALTER SYSTEM SET default_transaction_read_only = {}",
            if on { "on" } else { "off" }
        ))
        .await
        .unwrap();
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_database_keeps_output_in_the_worker_and_the_gateway_serving() {
    let (_cluster, url) = own_cluster().await;
    let admin = eventgate::db::connect(&url).await.unwrap();
    // A session setting outranks the configuration file: this one can always write.
    admin
        .batch_execute("SET default_transaction_read_only = off")
        .await
        .unwrap();
    let gw = Gateway::start(&url).await;
    let job = Uuid::new_v4();
    let n = 600;
    let worker = spawn_worker(url.clone(), job, n);
    wait_for("20 events", || async { count_on(&url, job).await >= 20 }).await;

    set_read_only(&admin, true).await;
    wait_for("the gateway to see the database read-only", || async {
        gw.metric("eventgate_database_read_only").await == 1
    })
    .await;
    // Nothing is added while writes are refused, and what exists is still served.
    let held = count_on(&url, job).await;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert_eq!(count_on(&url, job).await, held, "writes were refused");
    let mut sse = Sse::job(gw.addr, job, None).await;
    assert_eq!(sse.status, 200);
    assert_exact(&seqs(&sse.until_seq(held).await), 1, held);
    // Ready (it serves what exists), and it says writes are refused.
    let ready = get(gw.addr, "/readyz").await.unwrap();
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(ready.json()["writable"], false, "{}", ready.text());
    assert_eq!(ready.json()["reason"], "database_read_only");

    set_read_only(&admin, false).await;
    wait_for("the gateway to see the database writable", || async {
        gw.metric("eventgate_database_read_only").await == 0
    })
    .await;
    let ready = get(gw.addr, "/readyz").await.unwrap();
    assert_eq!(ready.json()["writable"], true, "{}", ready.text());
    let outcome = tokio::time::timeout(PATIENCE, worker)
        .await
        .expect("the worker finishes")
        .unwrap()
        .expect("the worker runs");
    assert_eq!(outcome.exit_code, 0);
    assert_every_line_once(&stored_lines(&admin, job).await, n);
    assert_numbered(&admin, job).await;
    let notice = admin
        .query_one(
            "SELECT seq, message, (payload->>'refusedSeconds')::float8 FROM agent_job_events \
             WHERE job_id = $1 AND payload->>'notice' = 'writes_refused'",
            &[&job],
        )
        .await
        .expect("one writes_refused notice");
    let (seq, message, secs): (i64, String, f64) = (notice.get(0), notice.get(1), notice.get(2));
    assert_eq!(seq, held + 1, "the notice comes first after the refusal");
    assert!(secs >= 1.0, "{message}");
    assert!(message.contains("read-only"), "{message}");
}

/// `Last-Event-ID` as an EventSource sends it: the `id:` it received last.
async fn resume(addr: std::net::SocketAddr, job: Uuid, id: &str) -> Sse {
    let path = format!("/api/queue/jobs/{job}/events/stream");
    Sse::connect_with(addr, &path, &[("Last-Event-ID", id)]).await
}

/// `id` with its history tag changed: the same seq, naming another event.
fn other_tag(id: &str) -> String {
    let (seq, tag) = id.split_once('-').unwrap();
    format!("{seq}-{:08x}", u32::from_str_radix(tag, 16).unwrap() ^ 1)
}

/// The limit the 600 s soak showed while ids were bare seqs: a client away during the
/// whole failover, holding events of the lost range, comes back after its replica (or
/// a fresh one) already follows the new history. Its `Last-Event-ID` names the event it
/// holds (`<seq>-<tag>`), so it gets `reset` whether the ring or the table answers; the
/// same seq naming the job's own event goes on without one.
#[tokio::test]
async fn a_resumer_holding_events_a_failover_took_back_gets_reset_from_ring_or_table() {
    let url = database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let gw = Gateway::start(&url).await;
    let job = create_job(&db).await;
    insert(&db, job, 60, "old").await;
    let mut stayed = Sse::job(gw.addr, job, None).await;
    let old = {
        let mut away = Sse::job(gw.addr, job, None).await;
        away.until_seq(60).await
    };
    assert_exact(&seqs(&stayed.until_seq(60).await), 1, 60);
    let held = old[59].id.clone().unwrap();
    assert!(held.starts_with("60-"), "{held}");

    // The table loses 51..60 and keeps 5 other events there; the stream that stayed
    // is reset, and 10 more events follow (the ring holds 56..65 of the new history).
    rewrite(&db, job, 50, 5, "new").await;
    cut_listen(&db, &gw).await;
    assert_reset(&next(&mut stayed).await, 55);
    insert(&db, job, 10, "after").await;
    let new = stayed.until_seq(65).await;
    assert_exact(&seqs(&new), 56, 65);
    let new_at_60 = new[4].id.clone().unwrap();
    assert!(
        new_at_60.starts_with("60-") && new_at_60 != held,
        "{new_at_60}"
    );

    // From the replica that followed the failover (the ring answers) and from one
    // that never saw the old history (the table answers).
    let fresh = Gateway::start(&url).await;
    for (name, addr) in [("ring", gw.addr), ("table", fresh.addr)] {
        let before = gw.metric("eventgate_ring_catch_ups_total").await;
        let mut back = resume(addr, job, &held).await;
        assert_eq!(back.status, 200, "{name}");
        assert_reset(&next(&mut back).await, 65);
        if name == "ring" {
            assert_eq!(
                gw.metric("eventgate_ring_catch_ups_total").await,
                before,
                "nothing of the ring was sent before the reset"
            );
        }
        // Naming the event the job has at 60: exactly the rest, no reset.
        let mut right = resume(addr, job, &new_at_60).await;
        let rest = right.until_seq(65).await;
        assert_exact(&seqs(&rest), 61, 65);
        assert!(all_labelled(&rest, "after"), "{name}");
        // A bare seq names no history: it is taken as it was (documented).
        let mut bare = resume(addr, job, "60").await;
        assert_exact(&seqs(&bare.until_seq(65).await), 61, 65);
    }
    assert_eq!(gw.metric("eventgate_resume_resets_total").await, 1);
    assert_eq!(fresh.metric("eventgate_resume_resets_total").await, 1);

    // At a finished job's end: naming its last event is `204`; naming another event
    // there is `reset` then `end`, never a 204 that would leave the wrong history shown.
    set_status(&db, job, "succeeded").await;
    let all = stayed.read_to_end().await;
    let last = all.iter().rev().find(|m| m.event == "queue_event").unwrap();
    let last_id = last.id.clone().unwrap();
    let last_seq = last.seq();
    for addr in [gw.addr, fresh.addr] {
        // Once this gateway has seen the end itself (a stream from just before it ends).
        let mut before_end = resume(addr, job, &(last_seq - 1).to_string()).await;
        tokio::time::timeout(PATIENCE, before_end.read_to_end())
            .await
            .expect("the stream ends");
        assert_eq!(resume(addr, job, &last_id).await.status, 204);
        let mut wrong = resume(addr, job, &other_tag(&last_id)).await;
        assert_eq!(wrong.status, 200);
        let frames = tokio::time::timeout(PATIENCE, wrong.read_to_end())
            .await
            .expect("the stream ends");
        let events: Vec<&str> = frames.iter().map(|m| m.event.as_str()).collect();
        assert_eq!(events, ["reset", "end"]);
        assert_reset(&frames[0], last_seq);
    }
}
