//! The `eventgate` binary: parses flags, sets up logging, and calls the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use eventgate::config::{self, Config};

#[derive(Parser)]
#[command(
    name = "eventgate",
    version,
    about = "Live job output from PostgreSQL to browsers over SSE"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve(ServeArgs),
    /// Apply the migrations of sql/ (safe to run again).
    Migrate(DbArgs),
    /// Run a command and stream its output into a job.
    Run {
        #[command(flatten)]
        db: DbArgs,
        #[command(flatten)]
        args: eventgate::worker::RunArgs,
    },
    /// Everything with no set-up: a throwaway PostgreSQL, the gateway and demo jobs.
    Demo(DemoArgs),
    /// Mint an HS256 token signed with EVENTGATE_JWT_SECRET.
    Token(TokenArgs),
    /// Delete the events of jobs that finished long ago, in small batches.
    Prune(PruneArgs),
    /// Follow a job's log in a terminal; exit 0 if it succeeded, 1 otherwise.
    Tail(eventgate::tail::TailArgs),
}

#[derive(clap::Args)]
struct TokenArgs {
    /// The signing secret.
    #[arg(long, env = "EVENTGATE_JWT_SECRET", hide_env_values = true)]
    secret: String,
    /// Scopes: read, write (repeat or space-separate).
    #[arg(long, num_args = 1.., default_value = "read")]
    scope: Vec<String>,
    /// Jobs the token covers (repeat); `*` for all.
    #[arg(long = "job", required = true)]
    jobs: Vec<String>,
    /// Lifetime, like 15m, 1h, 7d (at most ten years).
    #[arg(long, default_value = "1h", value_parser = config::parse_duration)]
    ttl: std::time::Duration,
    /// Subject, logged by the gateway.
    #[arg(long)]
    sub: Option<String>,
}

#[derive(clap::Args)]
struct PruneArgs {
    #[command(flatten)]
    db: DbArgs,
    /// Delete events of jobs finished before this long ago (e.g. 30d).
    #[arg(long, value_parser = config::parse_duration)]
    older_than: std::time::Duration,
    /// Events per delete statement.
    #[arg(long, default_value_t = eventgate::prune::DEFAULT_BATCH)]
    batch: i64,
}

#[derive(clap::Args)]
struct DbArgs {
    /// PostgreSQL connection string.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
}

#[derive(clap::Args)]
struct ServeArgs {
    #[command(flatten)]
    db: DbArgs,
    #[command(flatten)]
    gateway: GatewayArgs,
}

#[derive(clap::Args)]
struct GatewayArgs {
    /// Address to listen on.
    #[arg(long, env = "EVENTGATE_LISTEN", default_value = config::DEFAULT_LISTEN, value_parser = config::parse_listen)]
    listen: std::net::SocketAddr,
    /// Pooled database connections (the LISTEN connection is one more).
    #[arg(long, env = "EVENTGATE_POOL_SIZE", default_value_t = config::DEFAULT_POOL_SIZE)]
    pool_size: usize,
    /// Interval between keep-alive comments on idle streams.
    #[arg(long, env = "EVENTGATE_KEEP_ALIVE", default_value = "15s", value_parser = config::parse_duration)]
    keep_alive: std::time::Duration,
    /// `retry:` hint sent to browsers, in milliseconds.
    #[arg(long, env = "EVENTGATE_RETRY_MS", default_value_t = config::DEFAULT_RETRY_MS)]
    retry_ms: u64,
    /// Most open connections; more get 503 with Retry-After.
    #[arg(long, env = "EVENTGATE_MAX_CONNECTIONS", default_value_t = config::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Time a client has to send its request headers.
    #[arg(long, env = "EVENTGATE_HEADER_TIMEOUT", default_value = "10s", value_parser = config::parse_duration)]
    header_timeout: std::time::Duration,
    /// Deadline of the drain on SIGTERM/Ctrl-C.
    #[arg(long, env = "EVENTGATE_SHUTDOWN_GRACE", default_value = "10s", value_parser = config::parse_duration)]
    shutdown_grace: std::time::Duration,
    /// Largest request body in bytes (larger gets 413).
    #[arg(long, env = "EVENTGATE_MAX_BODY", default_value_t = config::DEFAULT_MAX_BODY)]
    max_body: usize,
    /// Largest message of one appended event in bytes (larger gets 413).
    #[arg(long, env = "EVENTGATE_MAX_MESSAGE", default_value_t = config::DEFAULT_MAX_MESSAGE)]
    max_message: usize,
    /// Interval of the query over served jobs' new events that delivers events whose
    /// NOTIFY was debounced or suppressed (0 turns it off).
    #[arg(long, env = "EVENTGATE_COUNTER_POLL", default_value = "20ms", value_parser = config::parse_duration)]
    counter_poll: std::time::Duration,
    /// Largest `limit` of a polling page.
    #[arg(long, env = "EVENTGATE_MAX_PAGE", default_value_t = config::MAX_PAGE)]
    max_page: i64,
    /// Open streams per client address (more get 429).
    #[arg(long, env = "EVENTGATE_MAX_STREAMS_PER_CLIENT", default_value_t = config::DEFAULT_MAX_STREAMS_PER_CLIENT)]
    max_streams_per_client: usize,
    /// Most bytes a stream may hold unsent when a live batch arrives; past it the
    /// stream ends and its client resumes from its cursor.
    #[arg(long, env = "EVENTGATE_MAX_STREAM_BUFFER", default_value_t = config::DEFAULT_MAX_STREAM_BUFFER)]
    max_stream_buffer: usize,
    /// Time a socket may accept no bytes of a response before it is closed.
    #[arg(long, env = "EVENTGATE_SEND_TIMEOUT", default_value = "60s", value_parser = config::parse_duration)]
    send_timeout: std::time::Duration,
    /// Time a client has to send a request body (slower gets 408 and a close).
    #[arg(long, env = "EVENTGATE_BODY_TIMEOUT", default_value = "30s", value_parser = config::parse_duration)]
    body_timeout: std::time::Duration,
    /// HS256 secret for tokens; without it auth is off (loopback only).
    #[arg(long, env = "EVENTGATE_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// `iss` every token must carry (unchecked when unset).
    #[arg(long, env = "EVENTGATE_JWT_ISSUER")]
    jwt_issuer: Option<String>,
    /// `aud` every token must carry (unchecked when unset).
    #[arg(long, env = "EVENTGATE_JWT_AUDIENCE")]
    jwt_audience: Option<String>,
    /// Serve without auth on a non-loopback address.
    #[arg(long, env = "EVENTGATE_INSECURE_NO_AUTH")]
    insecure_no_auth: bool,
    /// Browser origin allowed to call the API (repeat).
    #[arg(
        long = "cors-origin",
        env = "EVENTGATE_CORS_ORIGINS",
        value_delimiter = ','
    )]
    cors_origins: Vec<String>,
    /// PEM certificate chain: serve HTTPS with ALPN h2 and http/1.1 (re-read on SIGHUP).
    #[arg(long, env = "EVENTGATE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "EVENTGATE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Peer (CIDR, or one address) whose X-Forwarded-For / Forwarded and
    /// X-Forwarded-Proto are believed (repeat).
    #[arg(
        long = "trusted-proxy",
        env = "EVENTGATE_TRUSTED_PROXIES",
        value_delimiter = ','
    )]
    trusted_proxies: Vec<eventgate::proxy::Cidr>,
}

impl GatewayArgs {
    fn config(&self, database_url: String) -> Config {
        let mut config = Config::new(database_url);
        config.pool_size = self.pool_size;
        config.keep_alive = self.keep_alive;
        config.retry_ms = self.retry_ms;
        config.max_connections = self.max_connections;
        config.header_timeout = self.header_timeout;
        config.shutdown_grace = self.shutdown_grace;
        config.max_body = self.max_body;
        config.max_message = self.max_message;
        config.counter_poll = self.counter_poll;
        config.max_page = self.max_page.clamp(1, 100_000);
        config.max_streams_per_client = self.max_streams_per_client;
        config.max_stream_buffer = self.max_stream_buffer;
        config.send_timeout = self.send_timeout;
        config.body_timeout = self.body_timeout;
        if let Some(secret) = self.jwt_secret.as_deref().filter(|s| !s.is_empty()) {
            config.auth = eventgate::auth::Auth::hs256(secret.as_bytes())
                .with_issuer(self.jwt_issuer.clone())
                .with_audience(self.jwt_audience.clone());
        }
        config.insecure_no_auth = self.insecure_no_auth;
        config.cors_origins = self.cors_origins.clone();
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            config.tls = Some(eventgate::tls::Files {
                cert: cert.clone(),
                key: key.clone(),
            });
        }
        config.trusted_proxies = self.trusted_proxies.clone();
        config
    }
}

#[derive(clap::Args)]
struct DemoArgs {
    /// Use this database instead of a throwaway cluster.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    #[command(flatten)]
    gateway: GatewayArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("eventgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve(args).await.map(|()| 0),
            Command::Migrate(args) => migrate(&args.database_url).await.map(|()| 0),
            Command::Run { db, args } => {
                Ok(eventgate::worker::run_cli(&db.database_url, args).await)
            }
            Command::Token(args) => token(args).map(|()| 0),
            Command::Tail(args) => eventgate::tail::run(args).await.map(i32::from),
            Command::Prune(args) => {
                let deleted =
                    eventgate::prune::run(&args.db.database_url, args.older_than, args.batch)
                        .await?;
                println!("deleted {deleted} events");
                Ok(0)
            }
            Command::Demo(args) => {
                let config = args.gateway.config(String::new());
                eventgate::demo::run(args.database_url, args.gateway.listen, config)
                    .await
                    .map(|()| 0)
            }
        }
    });
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("eventgate: {e}");
            // Like clap's usage errors: a mistake to fix, not a failure to retry.
            if e.is_config() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn serve(args: ServeArgs) -> Result<(), eventgate::Error> {
    let config = args.gateway.config(args.db.database_url);
    let listener = eventgate::server::bind(args.gateway.listen).map_err(|e| {
        eventgate::Error::config(format!("cannot listen on {}: {e}", args.gateway.listen))
    })?;
    eventgate::server::run(listener, config, eventgate::server::shutdown_signal()).await
}

fn token(args: TokenArgs) -> Result<(), eventgate::Error> {
    use eventgate::auth::Scope;
    let mut scopes = Vec::new();
    for s in args.scope.iter().flat_map(|s| s.split_whitespace()) {
        scopes.push(match s {
            "read" => Scope::Read,
            "write" => Scope::Write,
            other => {
                return Err(eventgate::Error::config(format!(
                    "unknown scope {other:?} (read or write)"
                )))
            }
        });
    }
    for job in &args.jobs {
        if job != "*" && job.parse::<uuid::Uuid>().is_err() {
            return Err(eventgate::Error::config(format!(
                "--job must be a uuid or *, not {job:?}"
            )));
        }
    }
    let token = eventgate::auth::mint(
        args.secret.as_bytes(),
        &scopes,
        &args.jobs,
        args.ttl,
        args.sub,
    )?;
    println!("{token}");
    Ok(())
}

async fn migrate(url: &str) -> Result<(), eventgate::Error> {
    let applied = eventgate::db::migrate(url).await?;
    if applied.is_empty() {
        println!("schema is up to date");
    } else {
        for name in applied {
            println!("applied {name}");
        }
    }
    Ok(())
}
