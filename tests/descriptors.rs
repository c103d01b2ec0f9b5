//! Meeting the descriptor limit gracefully: the real binary under a small `ulimit -n`.
//! The connection cap is lowered to fit the limit, so clients past it get 503 with
//! `Retry-After` while the gateway can still answer; when even that runs out (a flood
//! of refused connections holding descriptors), `accept` failures shed clients through
//! a spare descriptor instead of spinning; the streams already open keep delivering,
//! exactly, and the gateway recovers when descriptors free up.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The descriptor limit the gateway runs under: small, so the test stays small.
const NOFILE: u64 = 160;
/// Pooled connections of the gateway under test.
const POOL: u64 = 4;

/// Kills the gateway if the test fails before stopping it.
struct Killer(u32);

impl Drop for Killer {
    fn drop(&mut self) {
        unsafe {
            libc::kill(self.0 as i32, libc::SIGKILL);
        }
    }
}

/// Starts `eventgate serve` with `ulimit -n NOFILE` on a free port.
fn start_gateway(url: &str) -> (std::process::Child, SocketAddr) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let bin = env!("CARGO_BIN_EXE_eventgate");
    let child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n {NOFILE} && exec {bin} serve --listen 127.0.0.1:{port} \
             --pool-size {POOL} --max-streams-per-client 100000 --header-timeout 5s \
             --shutdown-grace 2s"
        ))
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    (child, format!("127.0.0.1:{port}").parse().unwrap())
}

/// Reads what the gateway says to a connection that sent a request, up to 4 KiB.
async fn answer(mut stream: TcpStream) -> String {
    let _ = stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await;
    let mut buf = vec![0u8; 4096];
    let mut got = 0;
    while got < buf.len() {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf[got..])).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => got += n,
        }
    }
    String::from_utf8_lossy(&buf[..got]).into_owned()
}

#[test]
fn the_descriptor_limit_is_met_by_shedding_not_dying() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = rt.block_on(database());
    let (mut child, addr) = start_gateway(&url);
    let killer = Killer(child.id());
    rt.block_on(async {
        wait_for("gateway up", || async {
            matches!(get(addr, "/readyz").await, Ok(r) if r.status == 200)
        })
        .await;
        let db = eventgate::db::connect(&url).await.unwrap();
        let job = create_job(&db).await;

        // Fill the gateway: streams until it refuses (the cap fits the limit).
        let mut streams = Vec::new();
        let mut refused = 0;
        for _ in 0..NOFILE {
            let path = format!("/api/queue/jobs/{job}/events/stream");
            let sse = Sse::connect(addr, &path, None).await;
            if sse.status == 200 {
                streams.push(sse);
            } else {
                assert_eq!(sse.status, 503, "past the cap: 503");
                assert!(
                    sse.header("retry-after").is_some(),
                    "503 says when to retry"
                );
                refused += 1;
                break;
            }
        }
        let held = streams.len();
        assert!(
            refused == 1,
            "the cap was reached below the descriptor limit"
        );
        assert!(
            (held as u64) < NOFILE - POOL,
            "the cap keeps descriptors back for the pool ({held} streams held)"
        );

        // Flood: connections that send nothing hold a descriptor each while refused,
        // until accept itself fails. Every client gets a 503 or a close, never a hang.
        let mut flood = Vec::new();
        for _ in 0..(NOFILE * 2) {
            if let Ok(s) = TcpStream::connect(addr).await {
                flood.push(s);
            }
        }
        let answers = futures::future::join_all(flood.into_iter().map(answer)).await;
        let shed = answers
            .iter()
            .filter(|a| a.starts_with("HTTP/1.1 503"))
            .count();
        let closed = answers.iter().filter(|a| a.is_empty()).count();
        println!(
            "flood of {}: {shed} answered 503, {closed} closed, {} other",
            answers.len(),
            answers.len() - shed - closed
        );
        assert_eq!(shed + closed, answers.len(), "every flooded client shed");

        // The streams held all along still deliver, exactly.
        insert(&db, job, 3, "after the flood").await;
        let last = last_seq(&db, job).await;
        for sse in streams.iter_mut() {
            let got = sse.until_seq(last).await;
            assert_exact(&seqs(&got), 1, last);
        }
        drop(streams);

        // Recovered: descriptors back, the gateway answers again.
        wait_for("gateway answers after the flood", || async {
            matches!(get(addr, "/healthz").await, Ok(r) if r.status == 200)
        })
        .await;
        let metrics = get(addr, "/metrics").await.unwrap().text();
        println!(
            "eventgate_accept_errors_total {}",
            metric_value(&metrics, "eventgate_accept_errors_total")
        );
    });
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = child.wait().unwrap();
    std::mem::forget(killer);
    assert!(status.success(), "the gateway exits cleanly: {status}");
}
