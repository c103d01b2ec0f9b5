//! Hostile clients: what one client that sends slowly, reads never or lies can make the
//! gateway hold. Each test asserts the mechanism (the connection was let go, the slot was
//! taken), never a timing; CPU figures are printed, not asserted.

mod common;

use std::time::Duration;

use common::*;
use eventgate::Config;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// CPU time (user + system) of this process, in clock ticks.
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command's closing parenthesis: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_head_costs_nothing_and_a_close_is_noticed() {
    let url = database().await;
    let mut config = Config::new(&url);
    // Long enough that only noticing the close can let the connections go in time.
    config.header_timeout = Duration::from_secs(600);
    let gw = Gateway::start_with(config).await;
    let baseline = gw.metric("eventgate_connections").await;

    // Held: connections that sent one byte of what could be an event-stream request.
    const HELD: usize = 500;
    let mut held = Vec::new();
    for _ in 0..HELD {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(b"G").await.unwrap();
        held.push(s);
    }
    wait_for("held connections accepted", || async {
        gw.metric("eventgate_connections").await >= baseline + HELD as u64
    })
    .await;
    let before = cpu_ticks();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ticks = cpu_ticks() - before;
    println!("{HELD} partial heads held for 2 s: {ticks} ticks of CPU (100 ticks = 1 core-second)");

    // Closed: the gateway notices each close, long before the header timeout.
    drop(held);
    for _ in 0..HELD {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(b"G").await.unwrap();
    }
    wait_for("closed partial heads let go", || async {
        gw.metric("eventgate_connections").await <= baseline
    })
    .await;

    // A head that arrives in pieces is still served.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    for piece in [
        "GET /hea",
        "lthz HTTP/1.1\r\nHost: t",
        "\r\nConnection: close\r\n\r\n",
    ] {
        s.write_all(piece.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut conn = Conn::new(s);
    let (status, _) = conn.read_head().await.unwrap();
    assert_eq!(status, 200);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_is_sent_with_browser_security_headers() {
    let url = database().await;
    let gw = Gateway::start(&url).await;
    for path in [
        "/",
        "/jobs/00000000-0000-0000-0000-000000000000",
        "/static/job.js",
    ] {
        let res = get(gw.addr, path).await.unwrap();
        assert_eq!(res.status, 200, "{path}");
        let csp = res.header("content-security-policy").unwrap_or_default();
        assert!(csp.contains("frame-ancestors 'none'"), "{path}: {csp}");
        assert!(csp.contains("script-src 'self'"), "{path}: {csp}");
        assert!(!csp.contains("unsafe-inline"), "{path}: {csp}");
        assert_eq!(res.header("x-frame-options"), Some("DENY"), "{path}");
        assert_eq!(res.header("referrer-policy"), Some("no-referrer"), "{path}");
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_in_a_new_job_is_replaced_not_a_database_error() {
    let url = database().await;
    let gw = Gateway::start(&url).await;
    let res = post_json(
        gw.addr,
        "/api/queue/jobs",
        &serde_json::json!({"name": "a\u{0}b", "payload": {"k\u{0}": ["x\u{0}"]}}),
    )
    .await;
    assert_eq!(res.status, 201, "{}", res.text());
    let job = res.json();
    assert_eq!(job["name"], "a\u{FFFD}b");
    assert_eq!(job["payload"]["k\u{FFFD}"][0], "x\u{FFFD}");
    gw.stop().await;
}
