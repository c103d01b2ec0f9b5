//! A throwaway PostgreSQL cluster started from the binaries installed on this machine.
//!
//! `eventgate demo`, the tests and the benchmarks all use it, so "no set-up" means the
//! same thing everywhere. `initdb` refuses to run as root, so when we are root every
//! PostgreSQL command runs as the `postgres` user (through `runuser`) in a directory it
//! owns.
//!
//! Cleanup does not depend on `Drop` alone: a watchdog shell process, started with the
//! cluster, stops the server and removes its directory once the process that started it
//! is gone (tests keep their cluster in a `static`, which is never dropped).

use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long to wait for the server to accept connections after a start or restart.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Options of a throwaway cluster.
#[derive(Debug, Clone)]
pub struct Options {
    /// Keep `fsync` on (benchmarks that measure commit cost); tests turn it off.
    pub fsync: bool,
    /// `max_connections` of the server.
    pub max_connections: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            fsync: false,
            max_connections: 200,
        }
    }
}

/// A running throwaway cluster; stopped and removed on drop.
#[derive(Debug)]
pub struct Cluster {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
    watchdog: Option<Child>,
}

impl Cluster {
    /// Creates, configures and starts a new cluster on a free loopback port.
    pub fn start(options: Options) -> io::Result<Cluster> {
        let bin = find_bin_dir()?;
        let as_postgres = is_root();
        let dir = make_dir(as_postgres)?;
        let port = free_port()?;
        let mut cluster = Cluster {
            dir,
            bin,
            port,
            as_postgres,
            watchdog: None,
        };
        cluster.init(&options)?;
        cluster.spawn_watchdog()?;
        cluster.pg_ctl(&["start", "-w", "-t", "60"], true)?;
        cluster.wait_ready()?;
        Ok(cluster)
    }

    /// A streaming standby of `primary` (`pg_basebackup -R`), asynchronous, started on
    /// a free loopback port of its own.
    pub fn standby_of(primary: &Cluster) -> io::Result<Cluster> {
        let dir = make_dir(primary.as_postgres)?;
        let port = free_port()?;
        let mut cluster = Cluster {
            dir,
            bin: primary.bin.clone(),
            port,
            as_postgres: primary.as_postgres,
            watchdog: None,
        };
        cluster.copy_as_standby(primary)?;
        cluster.spawn_watchdog()?;
        cluster.pg_ctl(&["start", "-w", "-t", "60"], true)?;
        cluster.wait_ready()?;
        Ok(cluster)
    }

    /// `pg_ctl promote`: a standby becomes a primary.
    pub fn promote(&self) -> io::Result<()> {
        self.pg_ctl(&["promote", "-w", "-t", "60"], false)
    }

    /// Immediate stop (`-m immediate`: no checkpoint, like `kill -9` of the server).
    pub fn crash(&self) -> io::Result<()> {
        self.pg_ctl(&["stop", "-m", "immediate", "-w"], false)
    }

    /// `kill -9` of the postmaster (its backends notice and exit on their own), then
    /// waits for it to be gone. Unlike [`Cluster::crash`], nothing is asked of the
    /// server: this is the machine dying.
    pub fn kill9(&self) -> io::Result<()> {
        let pid = self.postmaster_pid()?;
        // SAFETY: kill(2) with a pid read from our own cluster's postmaster.pid.
        if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let deadline = Instant::now() + START_TIMEOUT;
        while Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid) {
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "postmaster still there after kill -9",
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Makes this (stopped or killed) cluster a fresh streaming standby of `primary`:
    /// its data directory is replaced by a `pg_basebackup -R` of the primary, on the
    /// same port and directory, so connection strings that name it stay valid.
    pub fn rebuild_as_standby_of(&self, primary: &Cluster) -> io::Result<()> {
        if let Ok(pid) = self.postmaster_pid() {
            if Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid) {
                return Err(io::Error::other("the server is still running"));
            }
        }
        // The killed server's socket lock names its pid; while that pid is a zombie not
        // yet reaped (a loaded machine), a new server takes the lock for held and
        // refuses to start. The server is gone, so its socket and lock are stale.
        for stale in [
            format!(".s.PGSQL.{}.lock", self.port),
            format!(".s.PGSQL.{}", self.port),
        ] {
            remove_if_there(&self.dir.join(stale))?;
        }
        match std::fs::remove_dir_all(self.data()) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        self.copy_as_standby(primary)?;
        self.pg_ctl(&["start", "-w", "-t", "60"], true)?;
        self.wait_ready()
    }

    /// Fills this cluster's (empty) data directory with a `pg_basebackup -R` of
    /// `primary` (a fast checkpoint, so it does not wait for the next one) and points
    /// it at this cluster's own port and socket directory.
    fn copy_as_standby(&self, primary: &Cluster) -> io::Result<()> {
        let mut cmd = self.command("pg_basebackup");
        cmd.args([
            "-h",
            "127.0.0.1",
            "-p",
            &primary.port.to_string(),
            "-U",
            "postgres",
        ])
        .arg("-D")
        .arg(self.data())
        .args(["-R", "-X", "stream", "--no-sync", "-c", "fast"]);
        run(cmd, "pg_basebackup")?;
        self.append_conf(&format!(
            "\n# standby\nport = {}\nunix_socket_directories = '{}'\n",
            self.port,
            self.dir.display()
        ))
    }

    /// Appends `conf` to `postgresql.conf` and reloads the server (for settings that
    /// need no restart, such as `synchronous_standby_names`).
    pub fn configure(&self, conf: &str) -> io::Result<()> {
        self.append_conf(&format!("\n{conf}\n"))?;
        self.pg_ctl(&["reload"], false)
    }

    fn postmaster_pid(&self) -> io::Result<i32> {
        let text = std::fs::read_to_string(self.data().join("postmaster.pid"))?;
        text.lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .ok_or_else(|| io::Error::other("no pid in postmaster.pid"))
    }

    /// The connection string of the `postgres` database.
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// The connection string of another database of this cluster.
    pub fn url_for(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// The TCP port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Fast restart (`pg_ctl restart -m fast`): every connection is terminated.
    pub fn restart(&self) -> io::Result<()> {
        self.pg_ctl(&["restart", "-m", "fast", "-w", "-t", "60"], true)?;
        self.wait_ready()
    }

    /// Stops the server (`-m fast`) without removing the cluster.
    pub fn stop(&self) -> io::Result<()> {
        self.pg_ctl(&["stop", "-m", "fast", "-w"], false)
    }

    /// Starts a stopped server again.
    pub fn resume(&self) -> io::Result<()> {
        self.pg_ctl(&["start", "-w", "-t", "60"], true)?;
        self.wait_ready()
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn init(&self, options: &Options) -> io::Result<()> {
        let data = self.data();
        let mut cmd = self.command("initdb");
        cmd.arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .args(["--locale=C"]);
        run(cmd, "initdb")?;
        let conf = format!(
            "\n# eventgate throwaway cluster\nport = {port}\nlisten_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{dir}'\nfsync = {fsync}\nsynchronous_commit = {fsync}\n\
             full_page_writes = {fsync}\nmax_connections = {max}\nshared_buffers = 128MB\n\
             log_min_messages = warning\nlog_min_error_statement = panic\n",
            port = self.port,
            dir = self.dir.display(),
            fsync = if options.fsync { "on" } else { "off" },
            max = options.max_connections,
        );
        self.append_conf(&conf)
    }

    fn append_conf(&self, conf: &str) -> io::Result<()> {
        // Append as the owner of the file: the data directory is not ours when we are root.
        let mut cmd = self.command_raw("sh");
        cmd.arg("-c")
            .arg("cat >> \"$1\"")
            .arg("sh")
            .arg(self.data().join("postgresql.conf"));
        cmd.stdin(Stdio::piped());
        let mut child = cmd.spawn()?;
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("stdin was piped");
            stdin.write_all(conf.as_bytes())?;
        }
        let status = child.wait()?;
        if !status.success() {
            return Err(io::Error::other("could not write postgresql.conf"));
        }
        Ok(())
    }

    /// A shell that outlives us by at most a second: when our process is gone, it
    /// stops the server and removes the directory.
    fn spawn_watchdog(&mut self) -> io::Result<()> {
        let script = format!(
            "while [ -d /proc/{pid} ]; do sleep 1; done; \
             '{bin}/pg_ctl' -D '{data}' stop -m immediate >/dev/null 2>&1; rm -rf '{dir}'",
            pid = std::process::id(),
            bin = self.bin.display(),
            data = self.data().display(),
            dir = self.dir.display(),
        );
        let mut cmd = self.command_raw("sh");
        cmd.arg("-c").arg(script);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Its own process group: a Ctrl-C at the terminal must not kill it before we
        // had the chance to clean up ourselves.
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        self.watchdog = Some(cmd.spawn()?);
        Ok(())
    }

    fn pg_ctl(&self, args: &[&str], with_log: bool) -> io::Result<()> {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D").arg(self.data());
        cmd.args(args);
        if with_log {
            cmd.arg("-l").arg(self.dir.join("server.log"));
        }
        // pg_ctl's server must not die with our terminal's Ctrl-C either.
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        run(cmd, "pg_ctl")
    }

    fn wait_ready(&self) -> io::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let mut cmd = self.command("pg_isready");
            cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q"]);
            if cmd.status().map(|s| s.success()).unwrap_or(false) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "postgresql did not become ready",
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A command from PostgreSQL's bin directory, run as the cluster's owner.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        self.command_raw(&path.to_string_lossy())
    }

    fn command_raw(&self, program: &str) -> Command {
        let mut cmd = if self.as_postgres {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--", program]);
            cmd
        } else {
            Command::new(program)
        };
        cmd.current_dir(&self.dir).stdin(Stdio::null());
        cmd
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.pg_ctl(&["stop", "-m", "immediate", "-w"], false);
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run(mut cmd: Command, what: &str) -> io::Result<()> {
    let out = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

/// The directory holding `initdb` and `pg_ctl`: the newest `/usr/lib/postgresql/*/bin`,
/// else whatever `pg_config --bindir` or `PATH` says.
fn find_bin_dir() -> io::Result<PathBuf> {
    if let Ok(dir) = std::env::var("EVENTGATE_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let dir = Path::new(dir);
        if dir.join("initdb").exists() && dir.join("pg_ctl").exists() {
            return Ok(dir.to_path_buf());
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "no postgresql server binaries found (install postgresql, or set DATABASE_URL)",
    ))
}

/// A process that has exited but not been reaped (a killed postmaster whose parent,
/// `pg_ctl`'s shell, is gone, until init reaps it).
fn remove_if_there(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')))
        .unwrap_or(true)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A fresh directory under the temp dir, owned by `postgres` when we are root.
fn make_dir(as_postgres: bool) -> io::Result<PathBuf> {
    let base = if as_postgres {
        // runuser'd processes must reach it: /tmp is world-traversable.
        PathBuf::from("/tmp")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!(
        "eventgate-pg-{}-{:08x}",
        std::process::id(),
        fastrand::u32(..)
    ));
    std::fs::create_dir(&dir)?;
    if as_postgres {
        let status = Command::new("chown")
            .arg("postgres:postgres")
            .arg(&dir)
            .status()?;
        if !status.success() {
            return Err(io::Error::other("could not chown the cluster directory"));
        }
    }
    Ok(dir)
}

/// A port that was free a moment ago on 127.0.0.1.
fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
