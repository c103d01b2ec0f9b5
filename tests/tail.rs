//! `eventgate tail` as a user runs it: a child process following a job that
//! `eventgate run` writes, through a gateway restart, against a real PostgreSQL.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_eventgate");

/// The log as the table holds it: every message's lines, in seq order.
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

/// Reads the child's output until it holds `want`.
async fn read_until(
    printed: &mut String,
    stdout: &mut BufReader<tokio::process::ChildStdout>,
    want: &str,
) {
    let read = async {
        while !printed.contains(want) {
            let mut line = String::new();
            let n = stdout.read_line(&mut line).await.unwrap();
            assert!(n > 0, "tail ended before printing {want:?}: {printed}");
            printed.push_str(&line);
        }
    };
    tokio::time::timeout(PATIENCE, read)
        .await
        .expect("tail prints in time");
}

fn tail(gateway: std::net::SocketAddr, job: Uuid, flags: &[&str]) -> Child {
    Command::new(BIN)
        .arg("tail")
        .arg(job.to_string())
        .arg("--url")
        .arg(format!("http://{gateway}"))
        .args(flags)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start eventgate tail")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_follows_a_running_job_through_a_gateway_restart_and_exits_with_its_status() {
    let url = database().await;
    let client = eventgate::db::connect(&url).await.unwrap();
    let job = create_job(&client).await;
    let gateway = Gateway::start(&url).await;
    let addr = gateway.addr;
    let dir = std::env::temp_dir().join(format!("eventgate-tail-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let stop = dir.join("stop");

    // Given a worker printing lines until told to stop, then failing with exit 3...
    let script = format!(
        "i=0; while [ ! -e '{}' ]; do i=$((i+1)); echo \"line $i\"; sleep 0.01; done; \
         echo 'last line'; exit 3",
        stop.display()
    );
    let mut worker = Command::new(BIN)
        .args(["run", "--job", &job.to_string(), "--", "sh", "-c", &script])
        .env("DATABASE_URL", &url)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    // ...and `eventgate tail --from-start` following it...
    let mut follower = tail(addr, job, &["--from-start"]);
    let mut stdout = BufReader::new(follower.stdout.take().unwrap());
    let mut printed = String::new();
    read_until(&mut printed, &mut stdout, "line 20\n").await;

    // ...when the gateway restarts while the job goes on writing...
    gateway.stop().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let gateway = Gateway::start_on(addr, eventgate::Config::new(&url)).await;
    let seen = printed.lines().count();
    let more = format!("line {}\n", seen + 50);
    read_until(&mut printed, &mut stdout, &more).await;

    // ...and the job then ends with a failure...
    std::fs::write(&stop, b"").unwrap();
    let worker_code = tokio::time::timeout(PATIENCE, worker.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(worker_code.code(), Some(3));
    let status = tokio::time::timeout(PATIENCE, follower.wait())
        .await
        .expect("tail exits when the job ends")
        .unwrap();
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).await.unwrap();
    printed.push_str(&rest);

    // ...then tail printed every line of the log once, in order, and exits 1.
    let expected = table_text(&client, job).await;
    assert!(expected.contains("last line\n"));
    assert_eq!(printed, expected);
    assert_eq!(status.code(), Some(1), "a failed job exits 1");
    let mut stderr = String::new();
    follower
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .await
        .unwrap();
    assert!(
        stderr.contains("reconnected"),
        "it saw the restart: {stderr}"
    );

    // A finished, succeeded job: `--lines 3` prints its last three lines and exits 0.
    let done = create_job(&client).await;
    insert(&client, done, 10, "done").await;
    set_status(&client, done, "succeeded").await;
    let out = tail(gateway.addr, done, &["--lines", "3"])
        .wait_with_output()
        .await
        .unwrap();
    let table = table_text(&client, done).await;
    let last3: Vec<&str> = table.lines().rev().take(3).collect();
    let want: String = last3.iter().rev().map(|l| format!("{l}\n")).collect();
    assert_eq!(String::from_utf8_lossy(&out.stdout), want);
    assert_eq!(out.status.code(), Some(0), "a succeeded job exits 0");

    // An unknown job is an error, not a wait.
    let out = tail(gateway.addr, Uuid::new_v4(), &[])
        .wait_with_output()
        .await
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("job not found"));
    gateway.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
