//! The original system's request shapes, cursors and routes, against a real gateway on
//! a real PostgreSQL: on eventgate's own schema and on an adopted original database;
//! and `eventgate run` on an adopted database.

mod common;

use common::*;
use serde_json::{json, Value};
use uuid::Uuid;

/// `POST` with a JSON body; the response's JSON.
async fn post(addr: std::net::SocketAddr, path: &str, body: Value, status: u16) -> Value {
    let res = post_json(addr, path, &body).await;
    assert_eq!(res.status, status, "{path} {body}: {}", res.text());
    res.json()
}

async fn page(addr: std::net::SocketAddr, path: &str) -> Vec<Value> {
    let res = get(addr, path).await.unwrap();
    assert_eq!(res.status, 200, "{path}: {}", res.text());
    res.json()["items"].as_array().unwrap().clone()
}

fn seqs_of(items: &[Value]) -> Vec<i64> {
    items.iter().map(|e| e["seq"].as_i64().unwrap()).collect()
}

/// Everything the original system's worker and dashboards send, on the database at
/// `url`.
async fn original_shapes(url: &str) {
    let gateway = Gateway::start(url).await;
    let a = gateway.addr;
    let db = eventgate::db::connect(url).await.unwrap();

    // Jobs the original way, camelCase and snake_case, unknown fields ignored.
    let job = post(
        a,
        "/api/queue/jobs",
        json!({"type": "codex_exec", "priority": 5, "maxAttempts": 2,
               "payload": {"repo": "x"}, "affinityKey": "k1", "someday": true}),
        201,
    )
    .await;
    let id: Uuid = job["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(job["payload"], json!({"repo": "x"}));
    assert_eq!(job["status"], "queued");
    let other = post(
        a,
        "/api/queue/jobs",
        json!({"type": "t2", "max_attempts": 4, "affinity_key": "k2"}),
        201,
    )
    .await;
    // Columns the table has are stored; the others were ignored.
    let stored: Value = db
        .query_one("SELECT to_jsonb(j) FROM agent_jobs j WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    if stored.get("priority").is_some() {
        // The job's JSON carries the original's fields in camelCase.
        assert_eq!(
            (
                &job["type"],
                &job["priority"],
                &job["maxAttempts"],
                &job["attempt"]
            ),
            (&json!("codex_exec"), &json!(5), &json!(2), &json!(1))
        );
        assert_eq!(job["affinityKey"], "k1");
        let listed = get(a, "/api/queue/jobs").await.unwrap().json();
        let listed = listed["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["id"] == job["id"])
            .cloned()
            .unwrap();
        assert_eq!(listed["maxAttempts"], 2);
        let one = get(a, &format!("/api/queue/jobs/{id}"))
            .await
            .unwrap()
            .json();
        assert_eq!(one["priority"], 5);
        assert_eq!(stored["type"], "codex_exec");
        assert_eq!(stored["priority"], 5);
        assert_eq!(stored["max_attempts"], 2);
        assert_eq!(stored["affinity_key"], "k1");
        let other: Uuid = other["id"].as_str().unwrap().parse().unwrap();
        let stored: Value = db
            .query_one(
                "SELECT to_jsonb(j) FROM agent_jobs j WHERE id = $1",
                &[&other],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            (&stored["max_attempts"], &stored["affinity_key"]),
            (&json!(4), &json!("k2"))
        );
    }
    post(
        a,
        "/api/queue/jobs",
        json!({"type": "t", "maxAttempts": 0}),
        400,
    )
    .await;

    // Appends the original worker's way.
    let events = format!("/api/queue/jobs/{id}/events");
    post(
        a,
        &events,
        json!({"workerId": "w1", "level": "warn", "message": "one", "extra": 1}),
        201,
    )
    .await;
    post(
        a,
        &events,
        json!({"worker_id": "w2", "message": "two", "payload": null}),
        201,
    )
    .await;
    post(
        a,
        &events,
        json!({"events": [
            {"message": "three\u{2028}x\u{2029}y\u{85}z"},
            {"message": "four", "payload": {"workerId": "mine"}, "workerId": "w3"},
            {"message": "five", "level": "error"},
        ]}),
        201,
    )
    .await;
    let all = page(a, &events).await;
    let logs: Vec<&Value> = all
        .iter()
        .filter(|e| e["payload"]["kind"] != "status")
        .collect();
    let messages: Vec<&str> = logs
        .iter()
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert_eq!(
        messages,
        [
            "one",
            "two",
            "three\u{2028}x\u{2029}y\u{85}z",
            "four",
            "five"
        ]
    );
    assert_eq!(
        (&logs[0]["level"], &logs[0]["payload"]["workerId"]),
        (&json!("warn"), &json!("w1"))
    );
    assert_eq!(
        (&logs[1]["level"], &logs[1]["payload"]["workerId"]),
        (&json!("info"), &json!("w2"))
    );
    assert_eq!(logs[2]["payload"].get("workerId"), None);
    // A workerId already in the payload is kept.
    assert_eq!(logs[3]["payload"]["workerId"], "mine");

    // Ids sort in seq order, as the later dashboard sorts: (createdAt, id).
    let mut by_original = all.clone();
    by_original.sort_by_key(|e| {
        (
            e["createdAt"].as_str().unwrap()[..23].to_string(),
            e["id"].as_str().unwrap().to_string(),
        )
    });
    assert_eq!(seqs_of(&by_original), seqs_of(&all));
    let mut ids: Vec<&str> = all.iter().map(|e| e["id"].as_str().unwrap()).collect();
    let in_seq_order = ids.clone();
    ids.sort();
    assert_eq!(ids, in_seq_order);

    // Polling with the original cursors.
    let third = logs[2];
    let (t, e, seq3) = (
        third["createdAt"].as_str().unwrap(),
        third["id"].as_str().unwrap(),
        third["seq"].as_i64().unwrap(),
    );
    let enc = |t: &str| t.replace('+', "%2B");
    let before = page(
        a,
        &format!("{events}?before={}&beforeEventId={e}&sort=desc", enc(t)),
    )
    .await;
    let mut expected: Vec<i64> = seqs_of(&all).into_iter().filter(|&s| s < seq3).collect();
    expected.reverse();
    assert_eq!(seqs_of(&before), expected);
    let desc_all = page(a, &format!("{events}?sort=desc&limit=2")).await;
    let n = all.len();
    assert_eq!(
        seqs_of(&desc_all),
        [seqs_of(&all)[n - 1], seqs_of(&all)[n - 2]]
    );
    let after = page(
        a,
        &format!("{events}?after={}&afterEventId={e}&sort=asc", enc(t)),
    )
    .await;
    let later: Vec<i64> = seqs_of(&all).into_iter().filter(|&s| s > seq3).collect();
    assert_eq!(seqs_of(&after), later);

    // The stream resumed from after + afterEventId: exactly the events after it, once,
    // in order, then the live ones.
    let mut sse = Sse::connect(
        a,
        &format!("{events}/stream?after={}&afterEventId={e}", enc(t)),
        None,
    )
    .await;
    assert_eq!(sse.status, 200);
    assert_eq!(
        sse.header("content-type"),
        Some("text/event-stream; charset=utf-8")
    );
    let last = *later.last().unwrap();
    let got = sse.until_seq(last).await;
    assert_eq!(seqs(&got), later);
    post(a, &events, json!({"workerId": "w1", "message": "six"}), 201).await;
    let six = sse.next().await.unwrap();
    assert_eq!(six.seq(), last + 1);
    assert_eq!(six.json()["message"], "six");
    // From the start: the escaped separators, exact bytes.
    let mut sse = Sse::job(a, id, None).await;
    sse.until_seq(last + 1).await;
    let raw = sse.raw.clone();
    let needle = br#""message":"three\u2028x\u2029y\u0085z""#;
    assert!(
        raw.windows(needle.len()).any(|w| w == needle),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    for sep in ["\u{2028}", "\u{2029}", "\u{85}"] {
        assert!(
            !raw.windows(sep.len()).any(|w| w == sep.as_bytes()),
            "raw {sep:?}"
        );
    }

    // Routes: unknown under a job is 404, a wrong method 405 with Allow.
    for tail in ["artifacts", "attachments", "live-session"] {
        let res = get(a, &format!("/api/queue/jobs/{id}/{tail}"))
            .await
            .unwrap();
        assert_eq!(res.status, 404, "{tail}");
        assert_eq!(res.json()["error"], "not_found");
    }
    let res = request(a, "DELETE", &events, &[], None).await.unwrap();
    assert_eq!(res.status, 405);
    assert_eq!(res.header("allow"), Some("GET, POST"));
    let res = request(a, "PUT", &format!("/api/queue/jobs/{id}"), &[], None)
        .await
        .unwrap();
    assert_eq!((res.status, res.header("allow")), (405, Some("GET")));

    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn original_shapes_on_eventgates_schema() {
    original_shapes(&database().await).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn original_shapes_on_an_adopted_database() {
    original_shapes(&adopted_database().await).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn eventgate_run_on_an_adopted_database() {
    let url = adopted_database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let job = eventgate::store::create_job(&db, None, "codex_exec", "queued", &json!({}))
        .await
        .unwrap()
        .id;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_eventgate"))
        .args(["run", "--job", &job.to_string(), "--stderr-level", "warn"])
        .args(["--", "sh", "-c"])
        .arg("echo hello; echo oops >&2; echo bye")
        .env("DATABASE_URL", &url)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: String = db
        .query_one("SELECT status::text FROM agent_jobs WHERE id = $1", &[&job])
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "succeeded");
    let rows = db
        .query(
            "SELECT id, level::text, message, payload->>'kind' FROM agent_job_events \
             WHERE job_id = $1 ORDER BY seq",
            &[&job],
        )
        .await
        .unwrap();
    let logs: Vec<(Uuid, String, String)> = rows
        .iter()
        .filter(|r| r.get::<_, Option<String>>(3).as_deref() == Some("log"))
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let text: String = logs.iter().map(|(_, _, m)| format!("{m}\n")).collect();
    for line in ["hello", "oops", "bye"] {
        assert!(text.lines().any(|l| l == line), "{line} in {text:?}");
    }
    // Levels land in the enum column: stdout `info`, stderr `warn` (`--stderr-level`).
    let level_of = |line: &str| {
        logs.iter()
            .find(|(_, _, m)| m.lines().any(|l| l == line))
            .map(|(_, level, _)| level.as_str())
    };
    assert_eq!(level_of("hello"), Some("info"));
    assert_eq!(level_of("oops"), Some("warn"));
    // The worker's ids are UUIDv7, in seq order.
    assert!(logs.iter().all(|(id, _, _)| id.get_version_num() == 7));
    let ids: Vec<Uuid> = logs.iter().map(|(id, _, _)| *id).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted);
    let kinds: Vec<Option<String>> = rows.iter().map(|r| r.get(3)).collect();
    assert_eq!(
        kinds
            .iter()
            .filter(|k| k.as_deref() == Some("status"))
            .count(),
        2,
        "running, succeeded"
    );
}
