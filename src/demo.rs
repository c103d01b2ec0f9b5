//! `eventgate demo`: a throwaway PostgreSQL (unless `DATABASE_URL` is given), the
//! schema, the gateway and a few jobs writing output, so a browser or `curl -N` shows
//! live events at once. Ctrl-C stops and removes everything.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use tokio::sync::watch;
use uuid::Uuid;

use crate::cluster::{Cluster, Options};
use crate::model::{Level, NewEvent};
use crate::store;
use crate::{Config, Error};

/// Demo jobs running at once.
const CONCURRENT_JOBS: usize = 3;
/// Time between two batches of a demo job.
const TICK: Duration = Duration::from_millis(250);

/// Runs the demo until Ctrl-C or SIGTERM.
pub async fn run(
    database_url: Option<String>,
    listen: SocketAddr,
    mut config: Config,
) -> Result<(), Error> {
    let (cluster, url) = match database_url {
        Some(url) => (None, url),
        None => {
            eprintln!("starting a throwaway PostgreSQL...");
            let cluster = tokio::task::spawn_blocking(|| Cluster::start(Options::default()))
                .await
                .map_err(|e| Error::internal(format!("cluster start panicked: {e}")))??;
            let url = cluster.url();
            (Some(cluster), url)
        }
    };
    crate::db::migrate(&url).await?;
    config.database_url = url.clone();
    let listener = crate::server::bind(listen)
        .map_err(|e| Error::config(format!("cannot listen on {listen}: {e}")))?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let writer = tokio::spawn(write_jobs(url.clone(), stop_rx));
    eprintln!(
        "\neventgate demo is running\n  dashboard: http://{addr}/\n  jobs:      curl http://{addr}/api/queue/jobs\n  a stream:  curl -N http://{addr}/api/queue/jobs/<id>/events/stream\n\
         Ctrl-C stops it and removes the throwaway database.\n"
    );
    let served = crate::server::run(listener, config, crate::server::shutdown_signal()).await;
    let _ = stop_tx.send(true);
    let _ = writer.await;
    if let Some(cluster) = cluster {
        eprintln!("removing the throwaway PostgreSQL...");
        let _ = tokio::task::spawn_blocking(move || drop(cluster)).await;
    }
    served
}

/// Keeps `CONCURRENT_JOBS` demo jobs writing output until told to stop.
async fn write_jobs(url: String, mut stop_rx: watch::Receiver<bool>) {
    let mut number = 0;
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        while tasks.len() < CONCURRENT_JOBS {
            number += 1;
            if number % 2 == 0 {
                // A real command through the worker, like `eventgate run -- sh -c ...`.
                tasks.spawn(command_job(url.clone(), stop_rx.clone()));
            } else {
                tasks.spawn(demo_job(url.clone(), number, stop_rx.clone()));
            }
            // Stagger them so they are at different stages.
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
        tokio::select! {
            done = tasks.join_next() => {
                if let Some(Ok(Err(e))) = done {
                    tracing::warn!(error = %e, "demo job failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            _ = stop_rx.changed() => break,
        }
    }
    tasks.shutdown().await;
}

/// A shell script run by the worker: output, a progress bar drawn with `\r`, a
/// warning on stderr, colours, and an exit code.
const DEMO_SCRIPT: &str = r#"
printf '\033[1;34m==> fetching dependencies\033[0m\n'
for i in $(seq 1 12); do echo "  fetched crate-$i v0.$i.0"; sleep 0.2; done
printf '\033[1;34m==> compiling\033[0m\n'
for p in 10 20 30 40 50 60 70 80 90 100; do printf '\r  progress %3d%%' "$p"; sleep 0.15; done
printf '\n'
echo "warning: field \`token\` is never read" >&2
for i in $(seq 1 20); do echo "  compiling module_$i.rs"; sleep 0.1; done
printf '\033[32m    Finished\033[0m release profile in 4.2s\n'
exit $(( $(date +%s) % 3 == 0 ))
"#;

async fn command_job(url: String, mut stop_rx: watch::Receiver<bool>) -> Result<(), Error> {
    let client = crate::db::connect(&url).await?;
    let job = store::create_job(
        &client,
        None,
        "demo release (a real command)",
        "queued",
        &json!({"demo": true}),
    )
    .await?;
    drop(client);
    let worker = crate::worker::Worker::builder(url, job.id)
        .stage("build")
        .build();
    let command = ["sh".to_string(), "-c".to_string(), DEMO_SCRIPT.to_string()];
    worker
        .run_until(&command, async move {
            let _ = stop_rx.changed().await;
        })
        .await?;
    Ok(())
}

/// One simulated CI run: stages of coloured output, warnings on stderr, a final status.
async fn demo_job(url: String, number: u32, stop_rx: watch::Receiver<bool>) -> Result<(), Error> {
    let client = crate::db::connect(&url).await?;
    let name = format!("demo build #{number}");
    let job = store::create_job(&client, None, &name, "queued", &json!({"demo": true})).await?;
    let id = job.id;
    set_status(&client, id, "running").await?;
    let stages = ["checkout", "build", "test", "package"];
    let mut line = 0u32;
    for (step, stage) in stages.iter().enumerate() {
        for tick in 0..16 {
            if *stop_rx.borrow() {
                set_status(&client, id, "cancelled").await?;
                return Ok(());
            }
            let mut batch = Vec::new();
            for _ in 0..(1 + fastrand::usize(..4)) {
                line += 1;
                batch.push(demo_line(stage, step, tick, line));
            }
            store::append_events(&client, id, &batch).await?;
            tokio::time::sleep(TICK).await;
        }
    }
    let status = if number % 4 == 0 {
        "failed"
    } else {
        "succeeded"
    };
    set_status(&client, id, status).await?;
    Ok(())
}

fn demo_line(stage: &str, step: usize, tick: u32, line: u32) -> NewEvent {
    let (level, stream, message) = match (stage, tick % 7) {
        (_, 0) if tick == 0 => (
            Level::Info,
            "stdout",
            format!("\x1b[1;34m==> {stage}\x1b[0m"),
        ),
        ("build", 3) => (
            Level::Warn,
            "stderr",
            format!("\x1b[33mwarning\x1b[0m: unused variable `x{line}` (src/lib.rs:{line})"),
        ),
        ("test", 5) => (
            Level::Info,
            "stdout",
            format!("test case_{line} ... \x1b[32mok\x1b[0m"),
        ),
        ("test", 6) if line % 5 == 0 => (
            Level::Error,
            "stderr",
            format!("\x1b[31merror\x1b[0m: flaky test case_{line} retried"),
        ),
        _ => (
            Level::Info,
            "stdout",
            format!("[{stage}] step {tick}: processed item {line}"),
        ),
    };
    NewEvent {
        level,
        message,
        payload: json!({"kind": "log", "stream": stream, "stage": stage, "stepIndex": step}),
    }
}

async fn set_status(client: &tokio_postgres::Client, id: Uuid, status: &str) -> Result<(), Error> {
    client
        .execute(
            "UPDATE agent_jobs SET status = $2 WHERE id = $1",
            &[&id, &status],
        )
        .await?;
    Ok(())
}
