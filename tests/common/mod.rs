//! Test set-up: a real PostgreSQL, real gateways on real sockets, and a raw HTTP/SSE
//! client that sees the exact bytes on the wire.
//!
//! One throwaway cluster serves the whole test binary (or `DATABASE_URL`'s server);
//! each test gets a database of its own. Tests that restart PostgreSQL start a cluster
//! of their own.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use eventgate::cluster::{Cluster, Options};
use eventgate::Config;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// Upper bound on any wait in a test, so a bug fails instead of hanging.
pub const PATIENCE: Duration = Duration::from_secs(60);

static SHARED: OnceLock<Server> = OnceLock::new();

enum Server {
    Url(String),
    Cluster(Cluster),
}

impl Server {
    fn url_for(&self, db: &str) -> String {
        match self {
            Server::Url(url) => {
                let mut config: tokio_postgres::Config = url.parse().expect("DATABASE_URL parses");
                config.dbname(db);
                // Rebuild a URL: the gateway takes a string.
                let host = match &config.get_hosts()[0] {
                    tokio_postgres::config::Host::Tcp(h) => h.clone(),
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                };
                let port = config.get_ports().first().copied().unwrap_or(5432);
                let user = config.get_user().unwrap_or("postgres");
                let auth = match config.get_password() {
                    Some(p) => format!("{user}:{}", String::from_utf8_lossy(p)),
                    None => user.to_string(),
                };
                format!("postgres://{auth}@{host}:{port}/{db}")
            }
            Server::Cluster(c) => c.url_for(db),
        }
    }

    fn admin_url(&self) -> String {
        match self {
            Server::Url(url) => url.clone(),
            Server::Cluster(c) => c.url(),
        }
    }
}

fn shared() -> &'static Server {
    SHARED.get_or_init(|| match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => Server::Url(url),
        _ => Server::Cluster(Cluster::start(Options::default()).expect("start postgresql")),
    })
}

/// A fresh, migrated database on the shared server; returns its URL.
pub async fn database() -> String {
    let server = tokio::task::spawn_blocking(shared).await.unwrap();
    let name = format!("t_{}", Uuid::new_v4().simple());
    let admin = eventgate::db::connect(&server.admin_url()).await.unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let url = server.url_for(&name);
    eventgate::db::migrate(&url).await.unwrap();
    url
}

/// A cluster of the test's own (for restarts), with a migrated database.
pub async fn own_cluster() -> (Cluster, String) {
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(Options::default()))
        .await
        .unwrap()
        .expect("start postgresql");
    let url = cluster.url();
    eventgate::db::migrate(&url).await.unwrap();
    (cluster, url)
}

/// A gateway running in this process on 127.0.0.1:<free port>.
pub struct Gateway {
    pub addr: SocketAddr,
    stop_tx: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), eventgate::Error>>>,
}

impl Gateway {
    pub async fn start(url: &str) -> Gateway {
        Gateway::start_with(Config::new(url)).await
    }

    pub async fn start_with(config: Config) -> Gateway {
        Gateway::start_on("127.0.0.1:0".parse().unwrap(), config).await
    }

    pub async fn start_on(addr: SocketAddr, config: Config) -> Gateway {
        let gateway = Gateway::start_unchecked(addr, config).await;
        gateway.wait_ready().await;
        gateway
    }

    /// Starts a gateway without waiting for its plain-HTTP `/readyz` (an HTTPS
    /// gateway answers none: its test checks readiness over TLS).
    pub async fn start_unchecked(addr: SocketAddr, config: Config) -> Gateway {
        let listener = bind_retry(addr).await;
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(eventgate::server::run(listener, config, async {
            let _ = stop_rx.await;
        }));
        Gateway {
            addr,
            stop_tx: Some(stop_tx),
            task: Some(task),
        }
    }

    /// Waits until `/readyz` says the LISTEN connection is up.
    pub async fn wait_ready(&self) {
        wait_for("gateway ready", || async {
            matches!(get(self.addr, "/readyz").await, Ok(r) if r.status == 200)
        })
        .await;
    }

    /// Stops the gateway and waits for `run` to return.
    pub async fn stop(mut self) {
        self.stop_inner().await;
    }

    async fn stop_inner(&mut self) {
        if let Some(tx) = self.stop_tx.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(PATIENCE, task)
                .await
                .expect("gateway stops in time")
                .unwrap()
                .unwrap();
        }
    }

    /// A counter or gauge from `/metrics`.
    pub async fn metric(&self, name: &str) -> u64 {
        let res = get(self.addr, "/metrics").await.unwrap();
        metric_value(&res.text(), name)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(tx) = self.stop_tx.take() {
            let _ = tx.send(());
        }
    }
}

pub fn metric_value(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            (key == name).then(|| value.parse().ok())?
        })
        .unwrap_or_else(|| panic!("metric {name} missing in:\n{text}"))
}

async fn bind_retry(addr: SocketAddr) -> tokio::net::TcpListener {
    for _ in 0..100 {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    panic!("cannot bind {addr}");
}

/// Polls `check` until it is true, failing after `PATIENCE`.
pub async fn wait_for<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A complete HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not json ({e}): {}", self.text()))
    }
}

pub async fn get(addr: SocketAddr, path: &str) -> std::io::Result<Response> {
    request(addr, "GET", path, &[], None).await
}

pub async fn post_json(addr: SocketAddr, path: &str, body: &serde_json::Value) -> Response {
    let body = serde_json::to_vec(body).unwrap();
    request(
        addr,
        "POST",
        path,
        &[("content-type", "application/json")],
        Some(&body),
    )
    .await
    .unwrap()
}

/// One request on a fresh connection (`Connection: close`), read to the end.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> std::io::Result<Response> {
    let stream = TcpStream::connect(addr).await?;
    let mut conn = Conn::new(stream);
    // A server may answer (413) before it has read the whole body: still read it.
    let sent = conn.send(method, path, headers, body, true).await;
    let (status, headers) = match conn.read_head().await {
        Ok(head) => head,
        Err(e) => return Err(sent.err().unwrap_or(e)),
    };
    let body = conn.read_body_to_end(&headers).await?;
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// A raw HTTP/1.1 connection.
pub struct Conn {
    reader: BufReader<TcpStream>,
}

impl Conn {
    pub fn new(stream: TcpStream) -> Conn {
        Conn {
            reader: BufReader::new(stream),
        }
    }

    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        close: bool,
    ) -> std::io::Result<()> {
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if let Some(body) = body {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        if close {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        let stream = self.reader.get_mut();
        stream.write_all(head.as_bytes()).await?;
        if let Some(body) = body {
            stream.write_all(body).await?;
        }
        stream.flush().await
    }

    pub async fn read_head(&mut self) -> std::io::Result<(u16, Vec<(String, String)>)> {
        let mut line = String::new();
        self.reader.read_line(&mut line).await?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
        let mut headers = Vec::new();
        loop {
            line.clear();
            self.reader.read_line(&mut line).await?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        Ok((status, headers))
    }

    pub async fn read_body_to_end(
        &mut self,
        headers: &[(String, String)],
    ) -> std::io::Result<Vec<u8>> {
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let mut body = Vec::new();
        if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            while let Some(chunk) = self.read_chunk().await? {
                body.extend_from_slice(&chunk);
            }
        } else if let Some(len) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
            body.resize(len, 0);
            self.reader.read_exact(&mut body).await?;
        } else {
            self.reader.read_to_end(&mut body).await?;
        }
        Ok(body)
    }

    /// The next chunk of a chunked body; `None` at its end.
    pub async fn read_chunk(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
            .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
        let mut chunk = vec![0; size + 2];
        self.reader.read_exact(&mut chunk).await?;
        chunk.truncate(size);
        Ok((size > 0).then_some(chunk))
    }
}

/// One SSE message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
}

impl Message {
    /// The seq of an `id:` as the gateway writes it, `<seq>-<tag>`.
    pub fn seq(&self) -> i64 {
        let id = self.id.as_deref().expect("event has an id");
        let (seq, tag) = id.split_once('-').expect("the id names its history");
        assert_eq!(tag.len(), 8, "{id}");
        seq.parse().unwrap()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data).unwrap()
    }
}

/// An open SSE stream, parsed as the WHATWG spec says (enough of it for our frames).
pub struct Sse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    conn: Conn,
    /// Every byte of the body received so far.
    pub raw: Vec<u8>,
    pending: String,
    ended: bool,
}

impl Sse {
    pub async fn connect(addr: SocketAddr, path: &str, last_event_id: Option<i64>) -> Sse {
        let id = last_event_id.map(|n| n.to_string());
        let mut headers = vec![];
        if let Some(id) = &id {
            headers.push(("Last-Event-ID", id.as_str()));
        }
        Sse::connect_with(addr, path, &headers).await
    }

    pub async fn connect_with(addr: SocketAddr, path: &str, extra: &[(&str, &str)]) -> Sse {
        let stream = TcpStream::connect(addr).await.unwrap();
        let mut conn = Conn::new(stream);
        let mut headers = vec![("Accept", "text/event-stream")];
        headers.extend_from_slice(extra);
        conn.send("GET", path, &headers, None, false).await.unwrap();
        let (status, headers) = conn.read_head().await.unwrap();
        let ended = status != 200;
        Sse {
            status,
            headers,
            conn,
            raw: Vec::new(),
            pending: String::new(),
            ended,
        }
    }

    /// A stream whose request the caller sent and whose head it read on `conn`.
    pub fn from_parts(status: u16, headers: Vec<(String, String)>, conn: Conn) -> Sse {
        Sse {
            status,
            headers,
            conn,
            raw: Vec::new(),
            pending: String::new(),
            ended: status != 200,
        }
    }

    pub async fn job(addr: SocketAddr, job: Uuid, last_event_id: Option<i64>) -> Sse {
        let sse = Sse::connect(
            addr,
            &format!("/api/queue/jobs/{job}/events/stream"),
            last_event_id,
        )
        .await;
        assert_eq!(sse.status, 200, "stream of {job} opens");
        sse
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body of a refused stream (a JSON error or nothing).
    pub async fn error_body(&mut self) -> Vec<u8> {
        assert_ne!(self.status, 200, "an open stream has no end");
        self.conn.read_body_to_end(&self.headers).await.unwrap()
    }

    /// Reads one more chunk of the body into `raw` (and the parser's buffer).
    pub async fn next_raw(&mut self) {
        match tokio::time::timeout(PATIENCE, self.conn.read_chunk()).await {
            Ok(Ok(Some(chunk))) => {
                self.raw.extend_from_slice(&chunk);
                self.pending
                    .push_str(std::str::from_utf8(&chunk).expect("utf-8 stream"));
            }
            Ok(Ok(None)) | Ok(Err(_)) => self.ended = true,
            Err(_) => panic!("no SSE data within {PATIENCE:?}"),
        }
    }

    /// The next message (comments and `retry:` are skipped), or `None` at the end of
    /// the body.
    pub async fn next(&mut self) -> Option<Message> {
        loop {
            if let Some(message) = self.parse_one() {
                return Some(message);
            }
            if self.ended {
                return None;
            }
            self.next_raw().await;
        }
    }

    fn parse_one(&mut self) -> Option<Message> {
        loop {
            let end = self.pending.find("\n\n")?;
            let block: String = self.pending.drain(..end + 2).collect();
            let mut message = Message {
                id: None,
                event: "message".into(),
                data: String::new(),
            };
            let mut has_data = false;
            for line in block.lines() {
                if line.starts_with(':') || line.is_empty() {
                    continue;
                }
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
            if has_data {
                return Some(message);
            }
        }
    }

    /// Reads `queue_event`s until one with seq >= `seq` (or the stream ends).
    pub async fn until_seq(&mut self, seq: i64) -> Vec<Message> {
        let mut out = Vec::new();
        while let Some(m) = self.next().await {
            let done = m.event == "queue_event" && m.seq() >= seq;
            out.push(m);
            if done {
                break;
            }
        }
        out
    }

    /// Reads everything until the stream ends.
    pub async fn read_to_end(&mut self) -> Vec<Message> {
        let mut out = Vec::new();
        while let Some(m) = self.next().await {
            out.push(m);
        }
        out
    }
}

/// The seqs of the `queue_event` messages.
pub fn seqs(messages: &[Message]) -> Vec<i64> {
    messages
        .iter()
        .filter(|m| m.event == "queue_event")
        .map(|m| m.seq())
        .collect()
}

/// Asserts `seqs` is exactly `from..=to`.
pub fn assert_exact(seqs: &[i64], from: i64, to: i64) {
    let expected: Vec<i64> = (from..=to).collect();
    if seqs != expected.as_slice() {
        let dups = seqs.len() as i64 - {
            let mut s = seqs.to_vec();
            s.dedup();
            s.len() as i64
        };
        panic!(
            "expected seqs {from}..={to} ({} of them), got {} (first {:?}, last {:?}, {dups} repeated)",
            expected.len(),
            seqs.len(),
            seqs.first(),
            seqs.last()
        );
    }
}

/// A job created with plain SQL.
pub async fn create_job(client: &tokio_postgres::Client) -> Uuid {
    let id = Uuid::new_v4();
    client
        .execute(
            "INSERT INTO agent_jobs (id, name, status) VALUES ($1, 'test', 'running')",
            &[&id],
        )
        .await
        .unwrap();
    id
}

/// Inserts `n` events in ONE plain multi-row statement, as any client would.
pub async fn insert(client: &tokio_postgres::Client, job: Uuid, n: usize, label: &str) {
    client
        .execute(
            "INSERT INTO agent_job_events (job_id, level, message, payload) \
             SELECT $1, 'info', $2 || ' ' || i, '{\"kind\": \"log\", \"stream\": \"stdout\"}' \
             FROM generate_series(1, $3::int) AS i",
            &[&job, &label, &(n as i32)],
        )
        .await
        .unwrap();
}

pub async fn set_status(client: &tokio_postgres::Client, job: Uuid, status: &str) {
    client
        .execute(
            "UPDATE agent_jobs SET status = $2 WHERE id = $1",
            &[&job, &status],
        )
        .await
        .unwrap();
}

/// `connect` with retries, for use right after a restart.
pub async fn connect_retry(url: &str) -> tokio_postgres::Client {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match eventgate::db::connect(url).await {
            Ok(c) => return c,
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "cannot connect: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Total events of a job in the table.
pub async fn last_seq(client: &tokio_postgres::Client, job: Uuid) -> i64 {
    client
        .query_one(
            "SELECT coalesce(max(seq), 0) FROM agent_job_events WHERE job_id = $1",
            &[&job],
        )
        .await
        .unwrap()
        .get(0)
}

/// A fresh database on the shared server with NOTHING applied (for tests that build a
/// layout of their own first); returns its URL.
pub async fn empty_database() -> String {
    let server = tokio::task::spawn_blocking(shared).await.unwrap();
    let name = format!("t_{}", Uuid::new_v4().simple());
    let admin = eventgate::db::connect(&server.admin_url()).await.unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    server.url_for(&name)
}

/// Everything `migrate` could change, as text: columns (types, nullability, defaults),
/// indexes, constraints, triggers, functions, enum types, and every row's version
/// (`xmin`, `ctid`) of the two tables. Equal snapshots mean nothing was changed.
pub async fn catalog_snapshot(client: &tokio_postgres::Client, with_rows: bool) -> String {
    let mut parts: Vec<String> = client
        .query(
            "SELECT x FROM ( \
               SELECT 'col ' || table_name || '.' || column_name || ' #' || ordinal_position \
                      || ' ' || data_type || ' ' || udt_name || ' null=' || is_nullable \
                      || ' default=' || coalesce(column_default, '-') \
                      || ' len=' || coalesce(character_maximum_length::text, '-') AS x \
                 FROM information_schema.columns WHERE table_schema = current_schema() \
               UNION ALL SELECT 'idx ' || indexdef FROM pg_indexes \
                 WHERE schemaname = current_schema() \
               UNION ALL SELECT 'con ' || conrelid::regclass::text || ' ' || conname || ' ' \
                      || pg_get_constraintdef(oid) || ' valid=' || convalidated \
                 FROM pg_constraint WHERE connamespace = current_schema()::regnamespace \
               UNION ALL SELECT 'trg ' || pg_get_triggerdef(oid) FROM pg_trigger \
                 WHERE NOT tgisinternal \
               UNION ALL SELECT 'fn ' || proname || ' ' || md5(prosrc) FROM pg_proc \
                 WHERE pronamespace = current_schema()::regnamespace \
               UNION ALL SELECT 'typ ' || t.typname || ' ' || \
                      (SELECT string_agg(enumlabel, ',' ORDER BY enumsortorder) \
                         FROM pg_enum WHERE enumtypid = t.oid) \
                 FROM pg_type t \
                 WHERE t.typnamespace = current_schema()::regnamespace AND t.typtype = 'e' \
               UNION ALL SELECT 'rel ' || relname || ' ' || relkind::text FROM pg_class \
                 WHERE relnamespace = current_schema()::regnamespace \
             ) s ORDER BY x",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    if with_rows {
        for table in ["agent_jobs", "agent_job_events"] {
            let row = client
                .query_one(
                    &format!(
                        "SELECT count(*)::text || ' ' || coalesce(md5(string_agg( \
                             t.xmin::text || t.ctid::text || to_jsonb(t)::text, ',' \
                             ORDER BY t.ctid)), '-') FROM {table} t"
                    ),
                    &[],
                )
                .await
                .unwrap();
            parts.push(format!("rows {table} {}", row.get::<_, String>(0)));
        }
    }
    parts.join("\n")
}

/// Each job's events as `(id, seq, line, message)` in seq order.
pub async fn events_by_seq(
    client: &tokio_postgres::Client,
    job: Uuid,
) -> Vec<(Uuid, i64, i64, String)> {
    client
        .query(
            "SELECT id, seq, line, message FROM agent_job_events WHERE job_id = $1 ORDER BY seq",
            &[&job],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

/// seqs 1..=n without a gap, lines from 1 without a gap (an event of k lines takes k
/// numbers), and the job's counters at the end.
pub async fn assert_numbered(client: &tokio_postgres::Client, job: Uuid) -> usize {
    let events = events_by_seq(client, job).await;
    let mut next_line = 1;
    for (i, (_, seq, line, message)) in events.iter().enumerate() {
        assert_eq!(*seq, i as i64 + 1, "seqs of job {job} are gap-free");
        assert_eq!(
            *line, next_line,
            "lines of job {job} are gap-free at seq {seq}"
        );
        next_line += message.split('\n').count() as i64;
    }
    let row = client
        .query_one(
            "SELECT last_seq, last_line FROM agent_jobs WHERE id = $1",
            &[&job],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), events.len() as i64, "last_seq");
    assert_eq!(row.get::<_, i64>(1), next_line - 1, "last_line");
    events.len()
}

/// The original system's two tables (enum status and level, app-made ids, no seq),
/// reduced to the columns that matter here, in a fresh database, adopted by
/// `eventgate migrate`; returns its URL. (tests/adopt.rs builds the full layout.)
pub async fn adopted_database() -> String {
    let url = empty_database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    db.batch_execute(
        "CREATE TYPE agentjobstatus AS ENUM \
             ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'dead_letter'); \
         CREATE TABLE agent_jobs ( \
             id uuid NOT NULL PRIMARY KEY, \
             type varchar(64) NOT NULL, \
             status agentjobstatus NOT NULL DEFAULT 'queued', \
             priority integer NOT NULL DEFAULT 0, \
             payload jsonb NOT NULL, \
             affinity_key varchar(255), \
             attempt integer NOT NULL, \
             max_attempts integer NOT NULL, \
             started_at timestamptz, \
             finished_at timestamptz, \
             created_at timestamptz NOT NULL DEFAULT now(), \
             updated_at timestamptz NOT NULL DEFAULT now()); \
         CREATE TYPE agentjobeventlevel AS ENUM ('info', 'warn', 'error'); \
         CREATE TABLE agent_job_events ( \
             id uuid NOT NULL PRIMARY KEY, \
             job_id uuid NOT NULL REFERENCES agent_jobs (id) ON DELETE CASCADE, \
             level agentjobeventlevel NOT NULL, \
             message text NOT NULL, \
             payload jsonb, \
             created_at timestamptz NOT NULL DEFAULT now(), \
             updated_at timestamptz NOT NULL DEFAULT now()); \
         CREATE INDEX ix_agent_job_events_job_id_created_at \
             ON agent_job_events (job_id, created_at);",
    )
    .await
    .unwrap();
    eventgate::db::migrate(&url).await.unwrap();
    url
}
