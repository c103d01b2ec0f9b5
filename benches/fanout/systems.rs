//! The four systems under load, each a separate process: how to start it, where its
//! streams are, how to publish into it, and its CPU, memory and table reads from /proc
//! and its metrics.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::proc::{children_of, cpu_seconds};

/// Pooled connections of the gateway and of the polling server (the gateway's default).
pub const POOL_SIZE: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Eventgate,
    Nchan,
    Polling,
    Floor,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Eventgate => "eventgate",
            Kind::Nchan => "nchan",
            Kind::Polling => "polling",
            Kind::Floor => "floor",
        }
    }

    /// Whether events are written with SQL (else published over HTTP).
    pub fn uses_db(self) -> bool {
        matches!(self, Kind::Eventgate | Kind::Polling)
    }
}

/// A running system; stopped on drop.
pub struct Server {
    pub kind: Kind,
    pub addr: SocketAddr,
    /// Where writers publish (the floor has a port of its own for it).
    pub publish_addr: SocketAddr,
    child: Child,
    /// nginx's temp dir.
    dir: Option<PathBuf>,
}

impl Server {
    pub fn start(kind: Kind, database_url: &str) -> io::Result<Server> {
        let port = free_port()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let publish_addr: SocketAddr = if kind == Kind::Floor {
            ([127, 0, 0, 1], free_port()?).into()
        } else {
            addr
        };
        let (child, dir) = match kind {
            Kind::Eventgate => (start_gateway(addr, database_url)?, None),
            Kind::Nchan => {
                let (child, dir) = start_nginx(addr)?;
                (child, Some(dir))
            }
            Kind::Polling | Kind::Floor => {
                let exe = std::env::current_exe()?;
                let child = Command::new(exe)
                    .env(crate::ROLE_ENV, kind.name())
                    .env("FANOUT_LISTEN", addr.to_string())
                    .env("FANOUT_PUBLISH_LISTEN", publish_addr.to_string())
                    .env("DATABASE_URL", database_url)
                    .stdin(Stdio::null())
                    .spawn()?;
                (child, None)
            }
        };
        let mut server = Server {
            kind,
            addr,
            publish_addr,
            child,
            dir,
        };
        server.wait_listening()?;
        Ok(server)
    }

    fn wait_listening(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(io::Error::other(format!(
                    "{} exited at start: {status}",
                    self.kind.name()
                )));
            }
            if TcpStream::connect(self.addr).is_ok()
                && TcpStream::connect(self.publish_addr).is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "{} did not listen in time",
                    self.kind.name()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The path of a job's stream.
    pub fn stream_path(&self, job: Uuid) -> String {
        match self.kind {
            Kind::Eventgate | Kind::Polling => format!("/api/queue/jobs/{job}/events/stream"),
            Kind::Nchan | Kind::Floor => format!("/sub/{job}"),
        }
    }

    /// The server's processes: nginx's master and workers, else the one process.
    pub fn pids(&self) -> Vec<u32> {
        let master = self.child.id();
        let mut pids = vec![master];
        if self.kind == Kind::Nchan {
            pids.extend(children_of(master));
        }
        pids
    }

    /// CPU seconds used so far by the server's processes.
    pub fn cpu_seconds(&self) -> f64 {
        self.pids().into_iter().map(cpu_seconds).sum()
    }

    /// Memory in KiB: VmRSS of a single process; summed PSS for nginx's processes
    /// (their shared memory zone would otherwise count once per worker).
    pub fn memory_kib(&self) -> u64 {
        let pids = self.pids();
        if pids.len() == 1 {
            status_field(pids[0], "VmRSS:").unwrap_or(0)
        } else {
            pids.into_iter().filter_map(pss_kib).sum()
        }
    }

    /// Whether the gateway answers `/healthz` with 200 (`None` for the others).
    pub fn healthz(&self) -> Option<bool> {
        (self.kind == Kind::Eventgate)
            .then(|| http_get(self.addr, "/healthz").is_ok_and(|t| t.starts_with("HTTP/1.1 200")))
    }

    /// Table reads `(live, backfill)` so far, where the system has such a counter.
    pub fn reads(&self) -> Option<(u64, u64)> {
        match self.kind {
            Kind::Eventgate => {
                let text = http_get(self.addr, "/metrics").ok()?;
                let live = metric(&text, "eventgate_table_reads_total{purpose=\"live\"}")?;
                let backfill = metric(&text, "eventgate_table_reads_total{purpose=\"backfill\"}")?;
                Some((live, backfill))
            }
            Kind::Polling => {
                let text = http_get(self.addr, "/metrics").ok()?;
                Some((metric(&text, "polling_reads_total")?, 0))
            }
            _ => None,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: kill has no memory preconditions; the pid is our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        // Long enough for a gateway under valgrind to write its profile.
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The release gateway: the one `cargo bench` built along with this bench (so never
/// stale), else `target/release/eventgate`, built first if missing.
fn gateway_binary() -> io::Result<PathBuf> {
    // Another build of the gateway, to measure a change side by side.
    if let Some(bin) = std::env::var_os("FANOUT_GATEWAY_BIN") {
        return Ok(PathBuf::from(bin));
    }
    if let Some(bin) = option_env!("CARGO_BIN_EXE_eventgate").map(PathBuf::from) {
        if bin.exists() {
            return Ok(bin);
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let bin = target.join("release").join("eventgate");
    if !bin.exists() {
        eprintln!("fanout: building the release gateway (cargo build --release --bin eventgate)");
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--release", "--bin", "eventgate"])
            .current_dir(root)
            .status()?;
        if !status.success() {
            return Err(io::Error::other("cargo build --release failed"));
        }
    }
    Ok(bin)
}

fn start_gateway(addr: SocketAddr, database_url: &str) -> io::Result<Child> {
    let bin = gateway_binary()?;
    let status = Command::new(&bin)
        .arg("migrate")
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        return Err(io::Error::other("eventgate migrate failed"));
    }
    // A profiler or other wrapper, e.g. "valgrind --tool=callgrind".
    let prefix = std::env::var("FANOUT_GATEWAY_PREFIX").unwrap_or_default();
    let mut words = prefix.split_whitespace();
    let mut cmd = match words.next() {
        Some(tool) => {
            let mut cmd = Command::new(tool);
            cmd.args(words).arg(&bin);
            cmd
        }
        None => Command::new(&bin),
    };
    cmd.args(["serve", "--listen", &addr.to_string()])
        .args(["--max-connections", "100000"])
        .args(["--max-streams-per-client", "1000000"])
        .args(["--pool-size", &POOL_SIZE.to_string()])
        // More flags for the gateway, e.g. "--counter-poll 0" to see what the poll costs.
        .args(
            std::env::var("FANOUT_GATEWAY_ARGS")
                .unwrap_or_default()
                .split_whitespace(),
        )
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
}

/// nginx's binary and the nchan module, or why Nchan rows are skipped.
pub fn nchan_available() -> Result<(PathBuf, PathBuf), String> {
    let nginx = ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or("nginx not found (apt-get install -y nginx libnginx-mod-nchan)")?;
    let module = [
        "/usr/lib/nginx/modules/ngx_nchan_module.so",
        "/usr/share/nginx/modules/ngx_nchan_module.so",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .ok_or("the nchan module is not installed (apt-get install -y libnginx-mod-nchan)")?;
    Ok((nginx, module))
}

fn start_nginx(addr: SocketAddr) -> io::Result<(Child, PathBuf)> {
    let (nginx, module) = nchan_available().map_err(io::Error::other)?;
    let dir = std::env::temp_dir().join(format!(
        "fanout-nginx-{}-{}",
        std::process::id(),
        addr.port()
    ));
    std::fs::create_dir_all(&dir)?;
    // SAFETY: geteuid has no preconditions.
    let user = if unsafe { libc::geteuid() } == 0 {
        "user root;"
    } else {
        ""
    };
    let d = dir.display();
    let conf = format!(
        r#"{user}
worker_processes 2;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
load_module {module};
worker_rlimit_nofile 200000;
events {{ worker_connections 60000; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 1000000;
    nchan_shared_memory_size 256M;
    server {{
        listen {addr} reuseport;
        location ~ ^/sub/([-\w]+)$ {{
            nchan_subscriber eventsource;
            nchan_channel_id $1;
            nchan_subscriber_first_message newest;
        }}
        location ~ ^/pub/([-\w]+)$ {{
            nchan_publisher;
            nchan_channel_id $1;
            nchan_message_buffer_length 4096;
            nchan_message_timeout 10m;
        }}
    }}
}}
"#,
        module = module.display(),
    );
    std::fs::write(dir.join("nginx.conf"), conf)?;
    let child = Command::new(nginx)
        .arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-e")
        .arg(dir.join("error.log"))
        .stdin(Stdio::null())
        .spawn()?;
    Ok((child, dir))
}

/// A port that was free a moment ago on 127.0.0.1.
fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn status_field(pid: u32, name: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    kib_field(&text, name)
}

fn pss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    kib_field(&text, "Pss:")
}

fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(name))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(name))?
        .rsplit(' ')
        .next()?
        .trim()
        .parse::<f64>()
        .ok()
        .map(|v| v as u64)
}

/// A one-shot GET with `Connection: close`; the body as text.
pub fn http_get(addr: SocketAddr, path: &str) -> io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// The kernel's count of connections dropped because a listen queue was full
/// (`TcpExt: ListenOverflows`), machine-wide.
pub fn listen_overflows() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/net/netstat") else {
        return 0;
    };
    let mut lines = text.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if !names.starts_with("TcpExt:") {
            continue;
        }
        let names = names.split_whitespace();
        let values = values.split_whitespace();
        for (n, v) in names.zip(values) {
            if n == "ListenOverflows" {
                return v.parse().unwrap_or(0);
            }
        }
    }
    0
}
