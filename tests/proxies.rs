//! The shipped proxy configs (deploy/) in front of two real gateway replicas over a real
//! PostgreSQL: each proxy is started by the test from its file, as a foreground process
//! on free loopback ports, and stopped at the end. A proxy whose binary is not installed
//! is skipped with a message.
//!
//! Each config must: stream exactly across the stop of a replica (the client resumes with
//! `Last-Event-ID`, the proxy routes it to a live replica), keep a quiet stream open past
//! the proxy's own default timeout, never compress or cache a stream, pass the browser's
//! address and not a forged one, keep HTTP/1.1 connections to the replicas, and in its TLS
//! variant serve h2. The latency each proxy adds is printed, never asserted.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use eventgate::Config;
use futures::future::join_all;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use uuid::Uuid;

// ---------------------------------------------------------------------------------
// The three proxies and their shipped configs.

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Nginx,
    Haproxy,
    Caddy,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Nginx, Kind::Haproxy, Kind::Caddy];

    fn name(self) -> &'static str {
        match self {
            Kind::Nginx => "nginx",
            Kind::Haproxy => "haproxy",
            Kind::Caddy => "caddy",
        }
    }

    /// The file under deploy/.
    fn config(self, tls: bool) -> &'static str {
        match (self, tls) {
            (Kind::Nginx, false) => "nginx.conf",
            (Kind::Nginx, true) => "nginx-tls.conf",
            (Kind::Haproxy, false) => "haproxy.cfg",
            (Kind::Haproxy, true) => "haproxy-tls.cfg",
            (Kind::Caddy, false) => "Caddyfile",
            (Kind::Caddy, true) => "Caddyfile.tls",
        }
    }

    /// The proxy's binary, or `None` after saying that it is skipped.
    fn binary(self) -> Option<PathBuf> {
        let found = which(self.name());
        if found.is_none() {
            println!(
                "SKIPPED {}: no `{}` binary on PATH or in /usr/sbin (Debian package `{}`)",
                self.name(),
                self.name(),
                self.name()
            );
        }
        found
    }
}

/// `name` on PATH, or in /usr/sbin (not on a normal user's PATH).
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// A directory of the test's own under the system temp dir, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(what: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("eventgate-{what}-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A throwaway CA and a server certificate for `eventgate.test` and 127.0.0.1, made
/// with `openssl`.
struct Certs {
    dir: Scratch,
}

const TLS_HOST: &str = "eventgate.test";

impl Certs {
    /// `None` (after saying so) when `openssl` is not installed.
    fn make() -> Option<Certs> {
        if which("openssl").is_none() {
            println!("SKIPPED TLS: no `openssl` binary");
            return None;
        }
        let certs = Certs {
            dir: Scratch::new("certs"),
        };
        let dir = certs.dir.path();
        std::fs::write(
            dir.join("ext.cnf"),
            format!(
                "subjectAltName=DNS:{TLS_HOST},IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
                 extendedKeyUsage=serverAuth\n"
            ),
        )
        .unwrap();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        let subject = format!("/CN={TLS_HOST}");
        let steps: [&[&str]; 3] = [
            &[
                &["req", "-x509"][..],
                &ec,
                &["-days", "1", "-subj", "/CN=eventgate test CA"],
                &["-keyout", "ca.key", "-out", "ca.pem"],
            ]
            .concat(),
            &[
                &["req"][..],
                &ec,
                &["-subj", &subject],
                &["-keyout", "key.pem", "-out", "csr.pem"],
            ]
            .concat(),
            &[
                "x509",
                "-req",
                "-in",
                "csr.pem",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                "ext.cnf",
                "-out",
                "cert.pem",
            ],
        ];
        for args in steps {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // HAProxy takes the chain and its key in one file.
        let pem = [
            std::fs::read(dir.join("cert.pem")).unwrap(),
            std::fs::read(dir.join("key.pem")).unwrap(),
        ]
        .concat();
        std::fs::write(dir.join("combined.pem"), pem).unwrap();
        Some(certs)
    }

    fn file(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

/// A free loopback port (another process may take it before we do: `Proxy::start`
/// retries on a failed bind).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `template` with every `${NAME}` replaced; a placeholder left over fails the test.
fn render(template: &str, vars: &[(&str, String)]) -> String {
    let mut text = template.to_string();
    for (name, value) in vars {
        text = text.replace(&format!("${{{name}}}"), value);
    }
    if let Some(at) = text.find("${") {
        let end = text[at..].find('}').map_or(text.len(), |e| at + e + 1);
        panic!("placeholder {} is not one the test knows", &text[at..end]);
    }
    text
}

/// A proxy running from a shipped config in a scratch directory.
struct Proxy {
    kind: Kind,
    tls: bool,
    addr: SocketAddr,
    child: Child,
    dir: Scratch,
    /// The CA that signed the TLS variant's certificate.
    ca: Option<String>,
}

impl Proxy {
    /// Starts `kind` from its shipped config (the TLS variant with `certs`) in front of
    /// `upstreams`, and waits until it answers `/readyz` through a replica.
    async fn start(
        kind: Kind,
        bin: &Path,
        certs: Option<&Certs>,
        upstreams: [SocketAddr; 2],
    ) -> Proxy {
        Proxy::start_edited(kind, bin, certs, upstreams, |text| text.to_string()).await
    }

    /// As `start`, with the config text changed by `edit` first (only to show what a
    /// setting is for).
    async fn start_edited(
        kind: Kind,
        bin: &Path,
        certs: Option<&Certs>,
        upstreams: [SocketAddr; 2],
        edit: impl Fn(&str) -> String,
    ) -> Proxy {
        let tls = certs.is_some();
        let file = kind.config(tls);
        let template = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("deploy")
                .join(file),
        )
        .unwrap_or_else(|e| panic!("deploy/{file}: {e}"));
        for attempt in 0.. {
            let dir = Scratch::new(kind.name());
            let port = free_port();
            let mut vars = vec![
                ("LISTEN_ADDR", "127.0.0.1".to_string()),
                ("LISTEN_PORT", port.to_string()),
                ("GATEWAY_A", upstreams[0].to_string()),
                ("GATEWAY_B", upstreams[1].to_string()),
            ];
            if let Some(certs) = certs {
                vars.push(("TLS_CERT", certs.file("cert.pem")));
                vars.push(("TLS_KEY", certs.file("key.pem")));
                vars.push(("TLS_PEM", certs.file("combined.pem")));
            }
            let text = edit(&render(&template, &vars));
            let config = dir.path().join(file);
            std::fs::write(&config, text).unwrap();
            let log = std::fs::File::create(dir.path().join("proxy.log")).unwrap();
            let mut command = Command::new(bin);
            match kind {
                Kind::Nginx => {
                    for sub in ["logs", "temp", "cache"] {
                        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
                    }
                    command
                        .arg("-p")
                        .arg(dir.path())
                        .arg("-c")
                        .arg(&config)
                        .args(["-e", "stderr", "-g", "daemon off;"]);
                }
                Kind::Haproxy => {
                    command.arg("-db").arg("-f").arg(&config);
                }
                Kind::Caddy => {
                    // Caddy keeps its state under HOME / XDG dirs: keep it in ours.
                    command
                        .args(["run", "--adapter", "caddyfile", "--config"])
                        .arg(&config)
                        .env("HOME", dir.path())
                        .env("XDG_DATA_HOME", dir.path().join("data"))
                        .env("XDG_CONFIG_HOME", dir.path().join("config"));
                }
            }
            let child = command
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
            let mut proxy = Proxy {
                kind,
                tls,
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                child,
                dir,
                ca: certs.map(|c| c.file("ca.pem")),
            };
            match proxy.wait_listening().await {
                Ok(()) => {
                    proxy.wait_ready().await;
                    return proxy;
                }
                Err(log) if attempt < 3 && log.contains("in use") => continue,
                Err(log) => panic!("{} exited at start:\n{log}", proxy.label()),
            }
        }
        unreachable!()
    }

    fn label(&self) -> String {
        let tls = if self.tls { " (TLS, h2)" } else { "" };
        format!("{}{tls}", self.kind.name())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("proxy.log")).unwrap_or_default()
    }

    /// Until the port accepts; `Err(log)` if the process exited.
    async fn wait_listening(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if self.child.try_wait().unwrap().is_some() {
                return Err(self.log());
            }
            if TcpStream::connect(self.addr).await.is_ok() {
                return Ok(());
            }
            assert!(Instant::now() < deadline, "{} never listened", self.label());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Until `/readyz` through the proxy is 200 (a health check may have to pass first).
    async fn wait_ready(&self) {
        let label = self.label();
        wait_for(&format!("{label} ready"), || async {
            if self.tls {
                curl(self, "/readyz", &["-o", "/dev/null", "-w", "%{http_code}"])
                    .await
                    .is_ok_and(|out| String::from_utf8_lossy(&out.stdout) == "200")
            } else {
                matches!(get(self.addr, "/readyz").await, Ok(r) if r.status == 200)
            }
        })
        .await;
    }

    /// `https://eventgate.test:<port>` resolved to the proxy (the certificate's name, so
    /// the client sends SNI as a browser would).
    fn https(&self, path: &str) -> String {
        format!("https://{TLS_HOST}:{}{path}", self.addr.port())
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // SIGTERM first: nginx's master takes its workers down with it (a SIGKILL
        // would leave them running).
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- {} log (last lines) ---", self.label());
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// `curl --http2` to `path` on a TLS proxy, trusting the test CA and sending SNI; `-v`
/// in `args` puts the handshake and the headers on stderr.
fn curl_command(proxy: &Proxy, path: &str, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new("curl");
    command
        .args(["--http2", "-sS", "--max-time", "300"])
        .arg("--cacert")
        .arg(proxy.ca.as_deref().expect("a TLS proxy"))
        .arg("--resolve")
        .arg(format!("{TLS_HOST}:{}:127.0.0.1", proxy.addr.port()))
        .args(args)
        .arg(proxy.https(path))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

async fn curl(proxy: &Proxy, path: &str, args: &[&str]) -> std::io::Result<std::process::Output> {
    curl_command(proxy, path, args).output().await
}

/// Whether curl's `-v` output says ALPN chose h2 (curl 7.88 and later, and older).
fn alpn_chose_h2(verbose: &str) -> bool {
    verbose.contains("ALPN: server accepted h2") || verbose.contains("server accepted to use h2")
}

/// The messages of a complete SSE body, as `Sse` parses them.
fn parse_sse(text: &str) -> Vec<Message> {
    text.split("\n\n")
        .filter_map(|block| {
            let mut message = Message {
                id: None,
                event: "message".into(),
                data: String::new(),
            };
            let mut has_data = false;
            for line in block.lines().filter(|l| !l.starts_with(':')) {
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "id" => message.id = Some(value.to_string()),
                    "event" => message.event = value.to_string(),
                    "data" => {
                        if has_data {
                            message.data.push('\n');
                        }
                        message.data.push_str(value);
                        has_data = true;
                    }
                    _ => {}
                }
            }
            has_data.then_some(message)
        })
        .collect()
}

/// What a browser sends: it accepts compression on every request.
const BROWSER: &[(&str, &str)] = &[("Accept-Encoding", "gzip, deflate, br, zstd")];

fn stream_path(job: Uuid) -> String {
    format!("/api/queue/jobs/{job}/events/stream")
}

/// Resumes a stream through `proxy` after `last`, as EventSource does: a refused
/// attempt (no replica reachable yet) is retried after a pause.
async fn resume(proxy: &Proxy, job: Uuid, last: i64) -> Sse {
    let id = last.to_string();
    let headers = [BROWSER, &[("Last-Event-ID", id.as_str())]].concat();
    let deadline = Instant::now() + PATIENCE;
    let mut refused = 0;
    loop {
        let mut sse = Sse::connect_with(proxy.addr, &stream_path(job), &headers).await;
        if sse.status == 200 {
            if refused > 0 {
                println!(
                    "{}: resumed after {refused} refused attempt(s)",
                    proxy.label()
                );
            }
            return sse;
        }
        let _ = sse.error_body().await;
        refused += 1;
        assert!(
            Instant::now() < deadline,
            "{} refuses to resume the stream (last status {})",
            proxy.label(),
            sse.status
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The replica that holds the one open stream.
async fn serving(replicas: &[Option<Gateway>; 2]) -> usize {
    let deadline = Instant::now() + PATIENCE;
    loop {
        for (i, replica) in replicas.iter().enumerate() {
            if let Some(gateway) = replica {
                if gateway.metric("eventgate_streams_open").await == 1 {
                    return i;
                }
            }
        }
        assert!(Instant::now() < deadline, "no replica holds the stream");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_streams(gateway: &Gateway, n: u64, what: &str) {
    wait_for(what, || async {
        gateway.metric("eventgate_streams_open").await == n
    })
    .await;
}

// ---------------------------------------------------------------------------------
// Exactly once, through each proxy, across the stop of either replica.

/// Given a stream through the proxy, when the replica serving it stops, the client
/// resumes through the proxy on the other one; then the first comes back, the other
/// stops, and the proxy sends the client back to the first. Every event arrives once,
/// in order, up to `end`; nothing on the way compresses the stream.
async fn follows_a_job_across_replica_stops(kind: Kind) {
    let Some(bin) = kind.binary() else { return };
    let url = database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let mut replicas = [
        Some(Gateway::start(&url).await),
        Some(Gateway::start(&url).await),
    ];
    let addrs = [0, 1].map(|i| replicas[i].as_ref().unwrap().addr);
    let proxy = Proxy::start(kind, &bin, None, addrs).await;
    let job = create_job(&db).await;
    insert(&db, job, 10, "before").await;

    let mut sse = Sse::connect_with(proxy.addr, &stream_path(job), BROWSER).await;
    assert_eq!(sse.status, 200);
    assert!(
        sse.header("content-type")
            .is_some_and(|t| t.starts_with("text/event-stream")),
        "{:?}",
        sse.headers
    );
    assert_eq!(
        sse.header("content-encoding"),
        None,
        "{} compressed the event stream",
        proxy.label()
    );
    let mut got = seqs(&sse.until_seq(10).await);

    // The replica serving the stream stops: the stream ends, the client resumes.
    let first = serving(&replicas).await;
    let other = 1 - first;
    replicas[first].take().unwrap().stop().await;
    got.extend(seqs(&sse.read_to_end().await));
    insert(&db, job, 10, "one replica down").await;
    let mut sse = resume(&proxy, job, *got.last().unwrap()).await;
    wait_streams(
        replicas[other].as_ref().unwrap(),
        1,
        "the stream on the other replica",
    )
    .await;
    insert(&db, job, 5, "on the other replica").await;
    got.extend(seqs(&sse.until_seq(25).await));

    // The first replica comes back on its address; the other one stops.
    replicas[first] = Some(Gateway::start_on(addrs[first], Config::new(&url)).await);
    replicas[other].take().unwrap().stop().await;
    got.extend(seqs(&sse.read_to_end().await));
    insert(&db, job, 5, "other replica down").await;
    let mut sse = resume(&proxy, job, *got.last().unwrap()).await;
    wait_streams(
        replicas[first].as_ref().unwrap(),
        1,
        "the stream back on the first replica",
    )
    .await;

    set_status(&db, job, "succeeded").await;
    let rest = sse.read_to_end().await;
    got.extend(seqs(&rest));
    let last = last_seq(&db, job).await;
    assert_exact(&got, 1, last);
    let end = rest.last().expect("the stream ends with `end`");
    assert_eq!(end.event, "end", "{end:?}");
    assert_eq!(end.json()["lastSeq"], last);
    assert!(rest.iter().all(|m| m.event != "reset"), "{rest:?}");
    println!(
        "{}: {last} events exactly once across the stop of each replica",
        proxy.label()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_follows_a_job_across_replica_stops() {
    follows_a_job_across_replica_stops(Kind::Nginx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_follows_a_job_across_replica_stops() {
    follows_a_job_across_replica_stops(Kind::Haproxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caddy_follows_a_job_across_replica_stops() {
    follows_a_job_across_replica_stops(Kind::Caddy).await;
}

// ---------------------------------------------------------------------------------
// TLS at the proxy, h2 to the browser.

/// The TLS variant negotiates h2 by ALPN, streams a live job to `end` over it without
/// compressing it, and multiplexes several streams on one connection.
async fn serves_streams_over_h2(kind: Kind) {
    let Some(bin) = kind.binary() else { return };
    let Some(certs) = Certs::make() else { return };
    if which("curl").is_none() {
        println!("SKIPPED {} TLS: no `curl` binary", kind.name());
        return;
    }
    let url = database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let a = Gateway::start(&url).await;
    let b = Gateway::start(&url).await;
    let proxy = Proxy::start(kind, &bin, Some(&certs), [a.addr, b.addr]).await;
    let job = create_job(&db).await;
    insert(&db, job, 5, "before").await;

    let curl = curl_command(
        &proxy,
        &stream_path(job),
        &[
            "-v",
            "-N",
            "-H",
            "Accept: text/event-stream",
            "-H",
            "Accept-Encoding: gzip, deflate, br, zstd",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    wait_for("the h2 stream open on a replica", || async {
        a.metric("eventgate_streams_open").await + b.metric("eventgate_streams_open").await == 1
    })
    .await;
    insert(&db, job, 5, "live").await;
    set_status(&db, job, "succeeded").await;
    let out = tokio::time::timeout(PATIENCE, curl.wait_with_output())
        .await
        .expect("the stream ends at `end`")
        .unwrap();
    let verbose = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "curl: {verbose}");
    assert!(
        alpn_chose_h2(&verbose),
        "ALPN did not choose h2:\n{verbose}"
    );
    assert!(verbose.contains("< HTTP/2 200"), "{verbose}");
    assert!(
        verbose.contains("< content-type: text/event-stream"),
        "{verbose}"
    );
    assert!(
        !verbose.to_ascii_lowercase().contains("< content-encoding"),
        "{} compressed the stream:\n{verbose}",
        proxy.label()
    );
    let messages = parse_sse(&String::from_utf8_lossy(&out.stdout));
    let last = last_seq(&db, job).await;
    assert_exact(&seqs(&messages), 1, last);
    assert_eq!(messages.last().map(|m| m.event.as_str()), Some("end"));
    println!(
        "{}: ALPN h2, {last} events to `end` over HTTP/2",
        proxy.label()
    );

    // Eight streams of the finished job at once on ONE h2 connection.
    let Some(h2load) = which("h2load") else {
        println!("SKIPPED h2 multiplexing: no `h2load` binary (Debian package nghttp2-client)");
        return;
    };
    let url = format!(
        "https://127.0.0.1:{}{}",
        proxy.addr.port(),
        stream_path(job)
    );
    let out = tokio::process::Command::new(h2load)
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
        .arg(&url)
        .output()
        .await
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("Application protocol: h2"),
        "h2load:\n{report}"
    );
    assert!(
        report.contains("8 total, 8 started, 8 done, 8 succeeded"),
        "h2load:\n{report}"
    );
    println!(
        "{}: 8 concurrent streams on one h2 connection, all complete",
        proxy.label()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_tls_serves_streams_over_h2() {
    serves_streams_over_h2(Kind::Nginx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_tls_serves_streams_over_h2() {
    serves_streams_over_h2(Kind::Haproxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caddy_tls_serves_streams_over_h2() {
    serves_streams_over_h2(Kind::Caddy).await;
}

// ---------------------------------------------------------------------------------
// Quiet streams.

/// How long the idle check keeps streams quiet: the gateways' keep-alive interval in
/// that test. 80 s is past nginx's 60 s default `proxy_read_timeout` and Debian's 50 s
/// HAProxy timeouts; `PROXY_IDLE_SECS=125` runs it past twice nginx's default (the
/// shipped configs allow 150 s).
fn idle_secs() -> u64 {
    std::env::var("PROXY_IDLE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(80)
}

/// The default a shipped config raises, as a note for the output.
fn default_idle(kind: Kind) -> &'static str {
    match kind {
        Kind::Nginx => "nginx's default proxy_read_timeout is 60 s",
        Kind::Haproxy => "Debian's stock haproxy.cfg has 50 s client/server timeouts",
        Kind::Caddy => "Caddy has no stream timeout by default",
    }
}

/// A stream read piece by piece: chunks of a plain HTTP/1.1 body, or lines of curl's
/// output over h2.
enum Reader {
    Plain(Conn),
    Curl {
        /// Killed when the stream is dropped.
        _child: Box<tokio::process::Child>,
        lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    },
}

struct Quiet {
    label: String,
    kind: Kind,
    reader: Reader,
    text: String,
    last_data: Instant,
}

impl Quiet {
    async fn open(proxy: &Proxy, job: Uuid) -> Quiet {
        let reader = if proxy.tls {
            let mut child = curl_command(proxy, &stream_path(job), &["-N"])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let lines = BufReader::new(child.stdout.take().unwrap()).lines();
            Reader::Curl {
                _child: Box::new(child),
                lines,
            }
        } else {
            let mut conn = Conn::new(TcpStream::connect(proxy.addr).await.unwrap());
            let headers = [BROWSER, &[("Accept", "text/event-stream")]].concat();
            conn.send("GET", &stream_path(job), &headers, None, false)
                .await
                .unwrap();
            let (status, _) = conn.read_head().await.unwrap();
            assert_eq!(status, 200, "{}", proxy.label());
            Reader::Plain(conn)
        };
        Quiet {
            label: proxy.label(),
            kind: proxy.kind,
            reader,
            text: String::new(),
            last_data: Instant::now(),
        }
    }

    async fn piece(&mut self) -> Option<String> {
        match &mut self.reader {
            Reader::Plain(conn) => conn
                .read_chunk()
                .await
                .ok()
                .flatten()
                .map(|c| String::from_utf8_lossy(&c).into_owned()),
            Reader::Curl { lines, .. } => lines.next_line().await.ok().flatten().map(|l| l + "\n"),
        }
    }

    /// Reads until `needle` has arrived; returns how long the stream was quiet before
    /// the piece that brought it, or how long it was quiet before it was cut.
    async fn until(&mut self, needle: &str) -> Result<Duration, String> {
        let patience = Duration::from_secs(idle_secs()) + PATIENCE;
        loop {
            let piece = tokio::time::timeout(patience, self.piece())
                .await
                .map_err(|_| format!("{}: nothing for {patience:?}", self.label))?;
            let quiet = self.last_data.elapsed();
            let Some(piece) = piece else {
                return Err(format!(
                    "{} cut the stream after {quiet:.1?} of quiet",
                    self.label
                ));
            };
            self.last_data = Instant::now();
            self.text.push_str(&piece);
            if self.text.contains(needle) {
                return Ok(quiet);
            }
        }
    }
}

/// A stream that nothing is written to but the gateway's keep-alive comment, every
/// `idle_secs()`, stays open through each proxy (plain and TLS, all at once): the
/// comment arrives after the whole quiet spell, then the next event on the same
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stream_outlives_each_proxys_default_timeout() {
    let kinds: Vec<(Kind, PathBuf)> = Kind::ALL
        .into_iter()
        .filter_map(|k| Some((k, k.binary()?)))
        .collect();
    if kinds.is_empty() {
        return;
    }
    let certs = if which("curl").is_some() {
        Certs::make()
    } else {
        println!("SKIPPED the TLS variants: no `curl` binary");
        None
    };
    let url = database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let idle = Duration::from_secs(idle_secs());
    let quiet_config = || {
        let mut config = Config::new(&url);
        config.keep_alive = idle;
        config
    };
    let a = Gateway::start_with(quiet_config()).await;
    let b = Gateway::start_with(quiet_config()).await;
    let mut proxies = Vec::new();
    for (kind, bin) in &kinds {
        proxies.push(Proxy::start(*kind, bin, None, [a.addr, b.addr]).await);
        if let Some(certs) = &certs {
            proxies.push(Proxy::start(*kind, bin, Some(certs), [a.addr, b.addr]).await);
        }
    }
    let job = create_job(&db).await;
    let mut streams = Vec::new();
    for proxy in &proxies {
        let mut quiet = Quiet::open(proxy, job).await;
        quiet.until("retry:").await.unwrap();
        streams.push(quiet);
    }
    println!(
        "idle: {} streams quiet until the gateways' keep-alive, every {idle:?}",
        streams.len()
    );

    let quiet = join_all(streams.iter_mut().map(|s| s.until(": keep-alive"))).await;
    insert(&db, job, 1, "after the quiet").await;
    let next = join_all(streams.iter_mut().map(|s| s.until("id: 1-"))).await;
    let mut cut = Vec::new();
    for ((stream, quiet), next) in streams.iter().zip(quiet).zip(next) {
        match (quiet, next) {
            (Ok(quiet), Ok(_)) => println!(
                "idle: {}: open after {quiet:.1?} of quiet, then the next event ({})",
                stream.label,
                default_idle(stream.kind)
            ),
            (Err(e), _) => cut.push(format!("{e} ({})", default_idle(stream.kind))),
            (Ok(_), Err(e)) => cut.push(format!("{e} after the keep-alive")),
        }
    }
    assert!(cut.is_empty(), "{}", cut.join("\n"));
    drop(streams);
    drop(proxies);
}

// ---------------------------------------------------------------------------------
// The browser's address, and keep-alive to the replicas.

/// An upstream that records each request head with the number of its connection and
/// answers 200 (it stands in for both replicas, to show exactly what a proxy sends).
struct Recorder {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<(usize, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    async fn start() -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let heads = heads.clone();
            async move {
                for conn_id in 0.. {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    let heads = heads.clone();
                    tokio::spawn(async move {
                        let mut reader = BufReader::new(stream);
                        loop {
                            let mut head = String::new();
                            loop {
                                let mut line = String::new();
                                match reader.read_line(&mut line).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(_) if line == "\r\n" => break,
                                    Ok(_) => head.push_str(&line),
                                }
                            }
                            heads.lock().unwrap().push((conn_id, head));
                            let answer = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\
                                          Content-Length: 2\r\n\r\nok";
                            if reader.get_mut().write_all(answer.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        Recorder { addr, heads, task }
    }

    /// The heads of requests for paths under `prefix`, with their connection numbers.
    fn requests(&self, prefix: &str) -> Vec<(usize, String)> {
        self.heads
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, head)| head.starts_with(&format!("GET {prefix}")))
            .cloned()
            .collect()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The values of header `name` in a request head.
fn header_values(head: &str, name: &str) -> Vec<String> {
    head.lines()
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .filter(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim().to_string())
        .collect()
}

/// From a browser at 127.0.0.2 that forges `X-Forwarded-For` and `Forwarded`, each
/// proxy (plain and TLS) passes the real address in `X-Forwarded-For` and no
/// `Forwarded`, over HTTP/1.1 connections it keeps and reuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_proxy_passes_the_browsers_address_not_a_forged_one() {
    let certs = if which("curl").is_some() {
        Certs::make()
    } else {
        None
    };
    let forged = [
        ("X-Forwarded-For", "203.0.113.9"),
        ("Forwarded", "for=203.0.113.9"),
    ];
    const REQUESTS: usize = 6;
    for kind in Kind::ALL {
        let Some(bin) = kind.binary() else { continue };
        let variants = std::iter::once(None).chain(certs.as_ref().map(Some));
        for certs in variants {
            let recorder = Recorder::start().await;
            let proxy = Proxy::start(kind, &bin, certs, [recorder.addr, recorder.addr]).await;
            let prefix = format!("/probe/{}/", Uuid::new_v4());
            let paths: Vec<String> = (0..REQUESTS).map(|i| format!("{prefix}{i}")).collect();
            if proxy.tls {
                // One curl, one h2 connection, the requests one after another.
                let mut args = vec!["--interface".to_string(), "127.0.0.2".to_string()];
                for (k, v) in &forged {
                    args.extend(["-H".to_string(), format!("{k}: {v}")]);
                }
                args.extend(paths[1..].iter().map(|path| proxy.https(path)));
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let out = curl(&proxy, &paths[0], &args).await.unwrap();
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            } else {
                let socket = TcpSocket::new_v4().unwrap();
                socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
                let mut conn = Conn::new(socket.connect(proxy.addr).await.unwrap());
                for path in &paths {
                    conn.send("GET", path, &forged, None, false).await.unwrap();
                    let (status, headers) = conn.read_head().await.unwrap();
                    assert_eq!(status, 200, "{}", proxy.label());
                    conn.read_body_to_end(&headers).await.unwrap();
                }
            }

            let seen = recorder.requests(&prefix);
            assert_eq!(seen.len(), REQUESTS, "{}: {seen:?}", proxy.label());
            for (_, head) in &seen {
                let label = proxy.label();
                let request_line = head.lines().next().unwrap();
                assert!(
                    request_line.ends_with(" HTTP/1.1"),
                    "{label}: {request_line}"
                );
                assert_eq!(
                    header_values(head, "x-forwarded-for"),
                    ["127.0.0.2"],
                    "{label}:\n{head}"
                );
                assert_eq!(
                    header_values(head, "forwarded"),
                    Vec::<String>::new(),
                    "{label}:\n{head}"
                );
                let proto = if proxy.tls { "https" } else { "http" };
                assert_eq!(
                    header_values(head, "x-forwarded-proto"),
                    [proto],
                    "{label}:\n{head}"
                );
                assert!(
                    !header_values(head, "connection")
                        .iter()
                        .any(|v| v.eq_ignore_ascii_case("close")),
                    "{label} closes its connections to the replicas:\n{head}"
                );
            }
            let mut connections: Vec<usize> = seen.iter().map(|(c, _)| *c).collect();
            connections.sort();
            connections.dedup();
            assert!(
                connections.len() < REQUESTS,
                "{}: {REQUESTS} requests took {} connections to the replicas",
                proxy.label(),
                connections.len()
            );
            println!(
                "{}: X-Forwarded-For = the browser's address, forged headers dropped, \
                 {REQUESTS} requests over {} kept-alive HTTP/1.1 connection(s)",
                proxy.label(),
                connections.len()
            );
        }
    }
}

// ---------------------------------------------------------------------------------
// nginx's cache of history pages.

/// Whether a response lets a shared cache keep it for a while (what nginx's
/// `proxy_cache` without `proxy_cache_valid` stores).
fn shared_cache_may_store(res: &Response) -> bool {
    let cc = res
        .header("cache-control")
        .unwrap_or("")
        .to_ascii_lowercase();
    let directives: Vec<&str> = cc.split(',').map(str::trim).collect();
    let refused = directives
        .iter()
        .any(|d| ["no-store", "no-cache", "private"].contains(d) || d.starts_with("private="));
    let lifetime = directives.iter().any(|d| {
        ["max-age=", "s-maxage="].iter().any(|p| {
            d.strip_prefix(p)
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|n| n > 0)
        })
    });
    !refused && lifetime && res.header("set-cookie").is_none()
}

/// A finished job's history page through nginx is served from the cache exactly when
/// the gateway's Cache-Control allows a shared cache to keep it; its event stream is
/// never looked up in the cache and always complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_caches_history_pages_only_as_the_gateway_allows() {
    let Some(bin) = Kind::Nginx.binary() else {
        return;
    };
    let url = database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let a = Gateway::start(&url).await;
    let b = Gateway::start(&url).await;
    let proxy = Proxy::start(Kind::Nginx, &bin, None, [a.addr, b.addr]).await;
    let job = create_job(&db).await;
    insert(&db, job, 30, "history").await;
    set_status(&db, job, "succeeded").await;
    let last = last_seq(&db, job).await;

    let page = format!("/api/queue/jobs/{job}/events?afterSeq=0&limit=10");
    let first = get(proxy.addr, &page).await.unwrap();
    assert_eq!(first.status, 200, "{}", first.text());
    let second = get(proxy.addr, &page).await.unwrap();
    assert_eq!(second.status, 200);
    assert_eq!(first.json()["items"], second.json()["items"]);
    let cache_control = first
        .header("cache-control")
        .unwrap_or("(none)")
        .to_string();
    let second_status = second.header("x-cache-status").unwrap_or("(none)");
    if shared_cache_may_store(&first) {
        assert_eq!(
            second_status, "HIT",
            "the gateway allows caching ({cache_control}) but nginx read the page again"
        );
        if let Some(etag) = first.header("etag") {
            let revalidated = request(proxy.addr, "GET", &page, &[("If-None-Match", etag)], None)
                .await
                .unwrap();
            assert_eq!(revalidated.status, 304, "If-None-Match {etag}");
        }
    } else {
        assert_ne!(
            second_status, "HIT",
            "nginx served a page the gateway marked {cache_control:?} from its cache"
        );
    }
    println!(
        "nginx cache: a finished job's page has Cache-Control {cache_control:?}; \
         the second read was {second_status}"
    );

    for _ in 0..2 {
        let mut sse = Sse::job(proxy.addr, job, None).await;
        assert_eq!(sse.header("x-cache-status"), None, "{:?}", sse.headers);
        let all = sse.read_to_end().await;
        assert_exact(&seqs(&all), 1, last);
        assert_eq!(all.last().map(|m| m.event.as_str()), Some("end"));
    }
}

// ---------------------------------------------------------------------------------
// Added latency (printed, never asserted).

/// Median and 99th percentile of `values` (sorted here).
fn p50_p99(values: &mut [f64]) -> (f64, f64) {
    values.sort_by(f64::total_cmp);
    let at =
        |q: f64| values[((q * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1];
    (at(0.5), at(0.99))
}

/// Writes `WARM_UP + events` events to a new job one at a time, each when every reader
/// (a stream from each of `addrs`) has the one before, and returns for each reader the
/// milliseconds from the INSERT's start to the frame's arrival, warm-up left out.
async fn lockstep(
    db: &tokio_postgres::Client,
    gateway: &Gateway,
    addrs: &[SocketAddr],
    events: usize,
) -> Vec<Vec<f64>> {
    const WARM_UP: usize = 10;
    let job = create_job(db).await;
    let (arrived_tx, mut arrived_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut readers = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let mut sse = Sse::job(*addr, job, None).await;
        let arrived_tx = arrived_tx.clone();
        readers.push(tokio::spawn(async move {
            while let Some(m) = sse.next().await {
                if m.event == "queue_event" {
                    let _ = arrived_tx.send((i, m.seq(), Instant::now()));
                }
            }
        }));
    }
    wait_streams(gateway, addrs.len() as u64, "every reader's stream open").await;

    let mut latency: Vec<Vec<f64>> = vec![Vec::new(); addrs.len()];
    for seq in 1..=(WARM_UP + events) as i64 {
        let sent = Instant::now();
        insert(db, job, 1, "latency").await;
        for _ in 0..addrs.len() {
            let (i, got, at) = tokio::time::timeout(PATIENCE, arrived_rx.recv())
                .await
                .expect("every reader gets the event")
                .unwrap();
            assert_eq!(got, seq, "reader {i} got seq {got} while {seq} was due");
            if seq > WARM_UP as i64 {
                latency[i].push((at - sent).as_secs_f64() * 1000.0);
            }
        }
    }
    set_status(db, job, "succeeded").await;
    for reader in readers {
        tokio::time::timeout(PATIENCE, reader)
            .await
            .unwrap()
            .unwrap();
    }
    latency
}

/// Prints reader 0 (direct) and, for each other reader, its figures and what it adds
/// per event over direct.
fn report(events: usize, labels: &[String], latency: &[Vec<f64>]) {
    let (p50, p99) = p50_p99(&mut latency[0].clone());
    println!(
        "latency: {events} events one at a time, INSERT start to SSE frame arrival, one \
         gateway; direct: p50 {p50:.2} ms, p99 {p99:.2} ms"
    );
    for (label, through) in labels.iter().zip(&latency[1..]) {
        let mut added: Vec<f64> = through
            .iter()
            .zip(&latency[0])
            .map(|(p, d)| p - d)
            .collect();
        let (p50, p99) = p50_p99(&mut through.clone());
        let (added_p50, added_p99) = p50_p99(&mut added);
        println!(
            "latency: {label}: p50 {p50:.2} ms, p99 {p99:.2} ms; added per event: \
             p50 {added_p50:.2} ms, p99 {added_p99:.2} ms"
        );
    }
}

/// The time each shipped config adds to every event, over a direct stream from the same
/// gateway in the same run; then HAProxy without `option http-no-delay`, to show what
/// the setting is for (fewer events: each one waits about 200 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_added_by_each_proxy_is_reported() {
    let url = database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    // One replica in both upstream slots: every path ends at the same LISTEN.
    let gateway = Gateway::start(&url).await;
    let upstreams = [gateway.addr, gateway.addr];
    let mut proxies = Vec::new();
    let mut haproxy = None;
    for kind in Kind::ALL {
        let Some(bin) = kind.binary() else { continue };
        proxies.push(Proxy::start(kind, &bin, None, upstreams).await);
        if kind == Kind::Haproxy {
            haproxy = Some(bin);
        }
    }
    let labels: Vec<String> = proxies.iter().map(Proxy::label).collect();
    let addrs: Vec<SocketAddr> = std::iter::once(gateway.addr)
        .chain(proxies.iter().map(|p| p.addr))
        .collect();
    const EVENTS: usize = 200;
    report(
        EVENTS,
        &labels,
        &lockstep(&db, &gateway, &addrs, EVENTS).await,
    );
    drop(proxies);

    let Some(bin) = haproxy else { return };
    let without = Proxy::start_edited(Kind::Haproxy, &bin, None, upstreams, |text| {
        assert!(text.contains("\n    option http-no-delay\n"));
        text.replace("\n    option http-no-delay\n", "\n")
    })
    .await;
    const WITHOUT_EVENTS: usize = 50;
    let latency = lockstep(&db, &gateway, &[gateway.addr, without.addr], WITHOUT_EVENTS).await;
    report(
        WITHOUT_EVENTS,
        &["haproxy without option http-no-delay (never shipped)".to_string()],
        &latency,
    );
}

// ---------------------------------------------------------------------------------
// The browser's address, as the gateway sees it (--trusted-proxy).

/// Everything the gateways of this test binary log, for checks on what they say.
fn captured_log() -> Arc<Mutex<Vec<u8>>> {
    static LOG: std::sync::OnceLock<Arc<Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    LOG.get_or_init(|| {
        let log = Arc::new(Mutex::new(Vec::new()));
        struct Into(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Into {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = log.clone();
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(move || Into(sink.clone()))
            .try_init();
        log
    })
    .clone()
}

/// The lines of the captured log that mention `needle`.
fn log_lines(needle: &str) -> Vec<String> {
    let log = captured_log();
    let text = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
    text.lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

/// A stream through `proxy` from a browser at `from`, as EventSource opens it.
async fn stream_from(proxy: &Proxy, from: &str, job: Uuid) -> Sse {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut conn = Conn::new(socket.connect(proxy.addr).await.unwrap());
    let headers = [
        BROWSER,
        &[
            ("Accept", "text/event-stream"),
            // Forged: a trusted proxy's own X-Forwarded-For replaces it.
            ("X-Forwarded-For", "203.0.113.9"),
        ],
    ]
    .concat();
    conn.send("GET", &stream_path(job), &headers, None, false)
        .await
        .unwrap();
    let (status, headers) = conn.read_head().await.unwrap();
    Sse::from_parts(status, headers, conn)
}

/// With `--trusted-proxy 127.0.0.1` on the gateway, behind each proxy: the stream's
/// log lines name the browser (127.0.0.2), not the proxy or a forged address, and the
/// per-address cap counts browsers: a second stream from 127.0.0.2 is refused with 429
/// while one from 127.0.0.3 opens. Without the flag, every browser is the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_proxy_lets_the_gateway_log_and_cap_the_browsers_address() {
    captured_log();
    let url = database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    for kind in Kind::ALL {
        let Some(bin) = kind.binary() else { continue };
        for trusted in [true, false] {
            let mut config = Config::new(&url);
            config.max_streams_per_client = 1;
            if trusted {
                config.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
            }
            // One replica in both slots: the cap is per replica.
            let gateway = Gateway::start_with(config).await;
            let proxy = Proxy::start(kind, &bin, None, [gateway.addr, gateway.addr]).await;
            let label = proxy.label();
            let job = create_job(&db).await;

            let mut first = stream_from(&proxy, "127.0.0.2", job).await;
            assert_eq!(first.status, 200, "{label}");
            first.next_raw().await;
            let opened = log_lines(&job.to_string());
            let opened: Vec<&String> = opened
                .iter()
                .filter(|l| l.contains("stream opened"))
                .collect();
            assert_eq!(opened.len(), 1, "{label}: {opened:?}");
            let second = stream_from(&proxy, "127.0.0.2", job).await;
            let other = stream_from(&proxy, "127.0.0.3", job).await;
            if trusted {
                assert!(
                    opened[0].contains("client=127.0.0.2:"),
                    "{label}: the gateway logged {}",
                    opened[0]
                );
                assert_eq!(second.status, 429, "{label}: a second stream of 127.0.0.2");
                assert_eq!(other.status, 200, "{label}: 127.0.0.3 has its own streams");
            } else {
                assert!(
                    opened[0].contains("client=127.0.0.1:"),
                    "{label}: untrusted, the gateway logged {}",
                    opened[0]
                );
                assert_eq!(second.status, 429, "{label}");
                assert_eq!(other.status, 429, "{label}: every browser is the proxy");
            }
            println!(
                "{label}: --trusted-proxy {}: the gateway logs {:?}; caps count {}",
                if trusted { "127.0.0.1" } else { "unset" },
                opened[0]
                    .split_whitespace()
                    .find(|w| w.starts_with("client="))
                    .unwrap_or("?"),
                if trusted { "browsers" } else { "the proxy" },
            );
            set_status(&db, job, "succeeded").await;
        }
    }
}

// ---------------------------------------------------------------------------------
// A storm of readers of a finished job, absorbed by nginx's cache.

const PAGE_READS: &str = "eventgate_table_reads_total{purpose=\"page\"}";

/// 1,000 clients (50 at a time) each read five pages of a finished 100,000-event job
/// through nginx started from deploy/nginx.conf in front of two replicas: every answer
/// is the right page, and the replicas' page reads move by about the number of
/// distinct pages, not by the number of requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_absorbs_a_storm_of_readers_of_a_finished_job() {
    use futures::StreamExt;
    let Some(bin) = Kind::Nginx.binary() else {
        return;
    };
    let url = database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let a = Gateway::start(&url).await;
    let b = Gateway::start(&url).await;
    let proxy = Proxy::start(Kind::Nginx, &bin, None, [a.addr, b.addr]).await;
    const EVENTS: usize = 100_000;
    let job = create_job(&db).await;
    insert(&db, job, EVENTS, "history").await;
    set_status(&db, job, "succeeded").await;
    let pages: Vec<(i64, String)> = (0..5)
        .map(|k| {
            let after = k * (EVENTS as i64 / 5);
            (
                after,
                format!("/api/queue/jobs/{job}/events?afterSeq={after}&limit=200"),
            )
        })
        .collect();
    let reads = || async { a.metric(PAGE_READS).await + b.metric(PAGE_READS).await };
    let before = reads().await;

    const CLIENTS: usize = 1000;
    const AT_ONCE: usize = 50;
    let started = Instant::now();
    let statuses: Vec<Vec<String>> = futures::stream::iter(0..CLIENTS)
        .map(|_| async {
            let mut seen = Vec::new();
            for (after, page) in &pages {
                let res = get(proxy.addr, page).await.unwrap();
                assert_eq!(res.status, 200, "{page}: {}", res.text());
                let body = res.json();
                let items = body["items"].as_array().unwrap();
                assert_eq!(items.len(), 200, "{page}");
                assert_eq!(items[0]["seq"], after + 1, "{page}");
                seen.push(res.header("x-cache-status").unwrap_or("-").to_string());
            }
            seen
        })
        .buffer_unordered(AT_ONCE)
        .collect()
        .await;
    let elapsed = started.elapsed();
    let moved = reads().await - before;
    let requests = CLIENTS * pages.len();
    let hits = statuses.iter().flatten().filter(|s| *s == "HIT").count();
    println!(
        "nginx cache: {CLIENTS} clients x {} pages of a finished {EVENTS}-event job = \
         {requests} requests in {elapsed:.1?}: {hits} HIT; the replicas read {moved} page(s)",
        pages.len()
    );
    assert!(
        moved >= 1 && moved <= 2 * pages.len() as u64,
        "{requests} requests for {} distinct pages cost {moved} table reads",
        pages.len()
    );
}
