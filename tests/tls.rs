//! `serve --tls-cert --tls-key`: HTTPS on the gateway itself, with a CA made by the test
//! (rcgen). ALPN offers h2 and http/1.1; a live job streams exactly over h2; many streams
//! share one connection; a client that never finishes its handshake is let go; SIGHUP
//! swaps the certificate while open streams go on.
//!
//! The HTTP clients are `curl` and `h2load` (Debian packages `curl`, `nghttp2-client`),
//! as a user would run them; the handshake checks use rustls' own client.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use eventgate::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use uuid::Uuid;

/// A CA and a server certificate for `localhost` and 127.0.0.1 signed by it, as PEM
/// files in a scratch directory (removed on drop).
struct Certs {
    dir: PathBuf,
    ca_der: Vec<u8>,
}

impl Certs {
    fn make(name: &str) -> Certs {
        let dir = std::env::temp_dir().join(format!("eventgate-tls-{name}-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("eventgate test CA {name}"),
        );
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut leaf =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .unwrap();
        leaf.distinguished_name
            .push(rcgen::DnType::CommonName, format!("eventgate {name}"));
        let cert = leaf.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
        std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
        Certs {
            dir,
            ca_der: ca_cert.der().to_vec(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn files(&self) -> eventgate::tls::Files {
        eventgate::tls::Files {
            cert: self.path("cert.pem"),
            key: self.path("key.pem"),
        }
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn installed(name: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    if !found {
        println!("SKIPPED: no `{name}` binary on PATH");
    }
    found
}

/// An HTTPS gateway, ready (its `/readyz` answered over TLS).
async fn https_gateway(config: Config, ca: &Path) -> Gateway {
    let gateway = Gateway::start_unchecked("127.0.0.1:0".parse().unwrap(), config).await;
    let addr = gateway.addr;
    wait_for("the https gateway ready", || async {
        curl(
            addr,
            ca,
            "/readyz",
            &["-o", "/dev/null", "-w", "%{http_code}"],
        )
        .await
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout) == "200")
    })
    .await;
    gateway
}

fn tls_config(url: &str, certs: &Certs) -> Config {
    let mut config = Config::new(url);
    config.tls = Some(certs.files());
    config
}

fn curl_command(addr: SocketAddr, ca: &Path, path: &str, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new("curl");
    command
        .args(["-sS", "--max-time", "120", "--cacert"])
        .arg(ca)
        .args(args)
        .arg(format!("https://localhost:{}{path}", addr.port()))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

async fn curl(
    addr: SocketAddr,
    ca: &Path,
    path: &str,
    args: &[&str],
) -> std::io::Result<std::process::Output> {
    curl_command(addr, ca, path, args).output().await
}

/// A counter or gauge of an HTTPS gateway (this request's own connection included).
async fn metric(addr: SocketAddr, ca: &Path, name: &str) -> u64 {
    let out = curl(addr, ca, "/metrics", &[]).await.unwrap();
    metric_value(&String::from_utf8_lossy(&out.stdout), name)
}

/// What a handshake trusting only `ca_der` and offering h2 and http/1.1 gives: the
/// protocol chosen and the server's leaf certificate.
async fn handshake(addr: SocketAddr, ca_der: &[u8]) -> Result<(Vec<u8>, Vec<u8>), String> {
    let stream = connect(addr, ca_der).await?;
    let session = stream.get_ref().1;
    let alpn = session.alpn_protocol().unwrap_or_default().to_vec();
    let leaf = session.peer_certificates().unwrap()[0].to_vec();
    Ok((alpn, leaf))
}

/// A finished handshake, trusting only `ca_der`, offering h2 and http/1.1.
async fn connect(
    addr: SocketAddr,
    ca_der: &[u8],
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from(ca_der.to_vec()))
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())
}

fn stream_path(job: Uuid) -> String {
    format!("/api/queue/jobs/{job}/events/stream")
}

/// The seqs and events of a complete SSE body.
fn parse_sse(text: &str) -> Vec<(Option<i64>, String)> {
    text.split("\n\n")
        .filter(|block| block.lines().any(|l| l.starts_with("data:")))
        .map(|block| {
            let field = |name: &str| {
                block
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim().to_string())
            };
            (
                field("id:").and_then(|id| id.split('-').next()?.parse().ok()),
                field("event:").unwrap_or_else(|| "message".into()),
            )
        })
        .collect()
}

fn stream_seqs(messages: &[(Option<i64>, String)]) -> Vec<i64> {
    messages
        .iter()
        .filter(|(_, event)| event == "queue_event")
        .filter_map(|(id, _)| *id)
        .collect()
}

// ---------------------------------------------------------------------------------

/// ALPN offers h2 and http/1.1: curl gets HTTP/2 when it asks for it and HTTP/1.1 when
/// it offers only that; a live job streams to `end` over h2, every event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_chooses_h2_or_http11_and_a_job_streams_exactly_over_h2() {
    if !installed("curl") {
        return;
    }
    let certs = Certs::make("alpn");
    let ca = certs.path("ca.pem");
    let url = database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let gateway = https_gateway(tls_config(&url, &certs), &ca).await;

    let (alpn, _) = handshake(gateway.addr, &certs.ca_der).await.unwrap();
    assert_eq!(alpn, b"h2");
    let h2 = curl(gateway.addr, &ca, "/healthz", &["--http2", "-v"])
        .await
        .unwrap();
    let verbose = String::from_utf8_lossy(&h2.stderr);
    assert!(verbose.contains("ALPN: server accepted h2"), "{verbose}");
    assert!(verbose.contains("< HTTP/2 200"), "{verbose}");
    let h1 = curl(gateway.addr, &ca, "/healthz", &["--http1.1", "-v"])
        .await
        .unwrap();
    let verbose = String::from_utf8_lossy(&h1.stderr);
    assert!(
        verbose.contains("ALPN: server accepted http/1.1"),
        "{verbose}"
    );
    assert!(verbose.contains("< HTTP/1.1 200"), "{verbose}");
    assert_eq!(String::from_utf8_lossy(&h1.stdout), r#"{"status":"ok"}"#);

    let job = create_job(&db).await;
    insert(&db, job, 5, "before").await;
    for version in ["--http2", "--http1.1"] {
        let reader = curl_command(gateway.addr, &ca, &stream_path(job), &[version, "-N"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // Over h2 the job is live; then, over HTTP/1.1, the finished job's whole history.
        if version == "--http2" {
            wait_for("the stream open", || async {
                metric(gateway.addr, &ca, "eventgate_streams_open").await == 1
            })
            .await;
            insert(&db, job, 5, "live").await;
            set_status(&db, job, "succeeded").await;
        }
        let out = tokio::time::timeout(PATIENCE, reader.wait_with_output())
            .await
            .expect("the stream ends at `end`")
            .unwrap();
        assert!(out.status.success());
        let messages = parse_sse(&String::from_utf8_lossy(&out.stdout));
        let last = last_seq(&db, job).await;
        assert_exact(&stream_seqs(&messages), 1, last);
        assert_eq!(messages.last().map(|m| m.1.as_str()), Some("end"));
        println!("{version}: {last} events to `end` over TLS");
    }
}

/// Eight live streams and the job list from one client share ONE h2 connection (the
/// gateway counts it, and h2load says so); each completes when the job ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_live_streams_share_one_h2_connection() {
    if !installed("curl") || !installed("h2load") {
        return;
    }
    let certs = Certs::make("mux");
    let ca = certs.path("ca.pem");
    let url = database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let gateway = https_gateway(tls_config(&url, &certs), &ca).await;
    let job = create_job(&db).await;
    insert(&db, job, 3, "before").await;

    let target = format!(
        "https://127.0.0.1:{}{}",
        gateway.addr.port(),
        stream_path(job)
    );
    let h2load = tokio::process::Command::new("h2load")
        .args([
            "-n",
            "8",
            "-c",
            "1",
            "-m",
            "8",
            "-H",
            "Accept: text/event-stream",
        ])
        .arg(&target)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_for("eight streams open", || async {
        metric(gateway.addr, &ca, "eventgate_streams_open").await == 8
    })
    .await;
    // h2load's one connection, and the one of this request for the metrics.
    assert_eq!(
        metric(gateway.addr, &ca, "eventgate_connections").await,
        2,
        "eight streams on more than one connection"
    );
    set_status(&db, job, "succeeded").await;
    let out = tokio::time::timeout(PATIENCE, h2load.wait_with_output())
        .await
        .expect("every stream ends")
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("Application protocol: h2"), "{report}");
    assert!(
        report.contains("8 total, 8 started, 8 done, 8 succeeded"),
        "{report}"
    );
}

/// A client that connects and never starts its handshake, stops halfway through its
/// ClientHello, or finishes it and then sends nothing, is closed at the head deadline; meanwhile it holds only its slot and
/// others are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_handshake_is_let_go() {
    if !installed("curl") {
        return;
    }
    let certs = Certs::make("slow");
    let ca = certs.path("ca.pem");
    let url = database().await;
    let mut config = tls_config(&url, &certs);
    config.header_timeout = Duration::from_secs(1);
    let gateway = https_gateway(config, &ca).await;

    let silent = TcpStream::connect(gateway.addr).await.unwrap();
    let mut partial = TcpStream::connect(gateway.addr).await.unwrap();
    // A TLS record header announcing a 512-byte ClientHello, and its first bytes.
    partial
        .write_all(&[
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
        ])
        .await
        .unwrap();
    // One that finishes its handshake and then says nothing (as a browser's speculative
    // connection does): hyper's h2 would wait for its preface forever.
    let mute = connect(gateway.addr, &certs.ca_der).await.unwrap();
    let started = Instant::now();
    // Served meanwhile.
    let (alpn, _) = handshake(gateway.addr, &certs.ca_der).await.unwrap();
    assert_eq!(alpn, b"h2");
    for (what, mut stream) in [("silent", silent), ("partial", partial)] {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("the {what} client was never let go"));
        // Closed: the end of the stream, or a reset; never a TLS answer to half a hello.
        assert!(matches!(read, Ok(0) | Err(_)), "{what}: {read:?}");
        println!(
            "{what} client let go after {:.1?} (header timeout 1 s)",
            started.elapsed()
        );
    }
    let mut mute = mute;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(PATIENCE, mute.read(&mut buf))
        .await
        .expect("the client that sent nothing after its handshake was never let go");
    assert!(matches!(read, Ok(0) | Err(_)), "mute: {read:?}");
    println!(
        "a client mute after its handshake let go after {:.1?}",
        started.elapsed()
    );
    wait_for("only the metrics request's connection left", || async {
        metric(gateway.addr, &ca, "eventgate_connections").await == 1
    })
    .await;
}

/// SIGHUP re-reads the files: new handshakes get the new certificate, a stream opened
/// under the old one goes on to `end` with every event; a reload from broken files
/// keeps the certificate in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_swaps_the_certificate_without_dropping_streams() {
    if !installed("curl") {
        return;
    }
    let old = Certs::make("old");
    let new = Certs::make("new");
    let url = database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    // The gateway reads its files from a directory of its own, replaced below.
    let live = Certs::make("live");
    for name in ["cert.pem", "key.pem"] {
        std::fs::copy(old.path(name), live.path(name)).unwrap();
    }
    let gateway = https_gateway(tls_config(&url, &live), &old.path("ca.pem")).await;
    let job = create_job(&db).await;
    insert(&db, job, 5, "before").await;
    let reader = curl_command(
        gateway.addr,
        &old.path("ca.pem"),
        &stream_path(job),
        &["--http2", "-N"],
    )
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    wait_for("the stream open", || async {
        metric(gateway.addr, &old.path("ca.pem"), "eventgate_streams_open").await == 1
    })
    .await;

    for name in ["cert.pem", "key.pem"] {
        std::fs::copy(new.path(name), live.path(name)).unwrap();
    }
    // SAFETY: sends a signal to this process; the gateway installed its handler at start.
    unsafe { libc::kill(libc::getpid(), libc::SIGHUP) };
    wait_for("the new certificate served", || async {
        handshake(gateway.addr, &new.ca_der).await.is_ok()
    })
    .await;
    assert!(handshake(gateway.addr, &old.ca_der).await.is_err());

    // Broken files: the reload fails and the new certificate stays.
    std::fs::write(live.path("cert.pem"), "not a certificate").unwrap();
    unsafe { libc::kill(libc::getpid(), libc::SIGHUP) };
    tokio::time::sleep(Duration::from_millis(300)).await;
    handshake(gateway.addr, &new.ca_der).await.unwrap();

    insert(&db, job, 5, "after the reload").await;
    set_status(&db, job, "succeeded").await;
    let out = tokio::time::timeout(PATIENCE, reader.wait_with_output())
        .await
        .expect("the stream opened before the reload ends at `end`")
        .unwrap();
    assert!(out.status.success());
    let messages = parse_sse(&String::from_utf8_lossy(&out.stdout));
    assert_exact(&stream_seqs(&messages), 1, last_seq(&db, job).await);
    assert_eq!(messages.last().map(|m| m.1.as_str()), Some("end"));
}

/// Memory of idle streams: `H2_CONNECTIONS` connections of `H2_STREAMS` live streams
/// each, opened by h2load, and the gateway's (this process's) RSS before and while they
/// are open. `H2_MODE`: `tls` (h2 over the gateway's TLS, the default), `h2c` (h2 with
/// prior knowledge, plain) or `h1` (plain HTTP/1.1, one stream per connection: the lean
/// writer). A figure, never an assertion; run it by hand:
/// `H2_CONNECTIONS=20 H2_STREAMS=100 cargo test --test tls -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn h2_memory_per_idle_stream() {
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (conns, per) = (env("H2_CONNECTIONS", 20), env("H2_STREAMS", 100));
    let mode = std::env::var("H2_MODE").unwrap_or_else(|_| "tls".into());
    let tls = mode == "tls";
    let certs = Certs::make("memory");
    let ca = certs.path("ca.pem");
    let url = database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let mut config = if tls {
        tls_config(&url, &certs)
    } else {
        Config::new(&url)
    };
    config.max_streams_per_client = usize::MAX;
    let gateway = if tls {
        https_gateway(config, &ca).await
    } else {
        Gateway::start_with(config).await
    };
    let open = |job: Uuid, c: u64, m: u64| {
        let scheme = if tls { "https" } else { "http" };
        let target = format!(
            "{scheme}://127.0.0.1:{}{}",
            gateway.addr.port(),
            stream_path(job)
        );
        let mut h2load = tokio::process::Command::new("h2load");
        if mode == "h1" {
            h2load.arg("--h1");
        }
        h2load
            .args(["-t", "1", "-n", &(c * m).to_string(), "-c", &c.to_string()])
            .args(["-m", &m.to_string(), "-H", "Accept: text/event-stream"])
            .arg(target)
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    let streams = |n: u64| {
        let addr = gateway.addr;
        let ca = ca.clone();
        async move {
            wait_for(&format!("{n} streams open"), || async {
                let open = if tls {
                    metric(addr, &ca, "eventgate_streams_open").await
                } else {
                    let res = get(addr, "/metrics").await.unwrap();
                    metric_value(&res.text(), "eventgate_streams_open")
                };
                open == n
            })
            .await;
        }
    };
    // A warm-up round, so one-time allocations are in the baseline.
    let warm = create_job(&db).await;
    // (HTTP/1.1 has one stream per connection: more would be pipelined.)
    let warm_up = if mode == "h1" {
        open(warm, 100, 1)
    } else {
        open(warm, 4, 25)
    };
    streams(100).await;
    drop(warm_up);
    streams(0).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = rss_kib();

    let job = create_job(&db).await;
    let load = open(job, conns, per);
    streams(conns * per).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during = rss_kib();
    let n = conns * per;
    println!(
        "{mode} memory: {conns} connections x {per} idle streams = {n}: RSS {before} -> {during} KiB, \
         {:.2} KiB per stream (connections' share included)",
        (during.saturating_sub(before)) as f64 / n as f64
    );
    set_status(&db, job, "succeeded").await;
    drop(load);
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}
