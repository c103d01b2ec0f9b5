//! The gateway's configuration, read once from flags and `EVENTGATE_*` / `DATABASE_URL`
//! environment variables and passed down.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use crate::hub;

/// Default address of `serve`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default pooled connections for reads and writes (the LISTEN connection is extra).
pub const DEFAULT_POOL_SIZE: usize = 16;
/// Default interval between keep-alive comments (browsers and proxies drop idle
/// streams at about 30 s).
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Default `retry:` hint, in milliseconds.
pub const DEFAULT_RETRY_MS: u64 = 2000;
/// Default cap on open connections; above it, new ones get 503.
pub const DEFAULT_MAX_CONNECTIONS: usize = 50_000;
/// Default time a client has to send its request headers (slowloris guard).
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default deadline of the drain at shutdown.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Default largest request body, in bytes.
pub const DEFAULT_MAX_BODY: usize = 1 << 20;
/// Default interval of the gateway's poll over the new events of served jobs, which
/// bounds the delay of events whose NOTIFY was debounced or suppressed. 20 ms, not 25: the
/// NOTIFY bench's p99 from a writer's send (its fsync wait included) was 50-56 ms at 25.
pub const DEFAULT_COUNTER_POLL: Duration = Duration::from_millis(20);
/// Default events per polling page.
pub const DEFAULT_PAGE: i64 = 200;
/// Default largest `limit` of a polling page.
pub const MAX_PAGE: i64 = 1000;
/// Default largest `message` of one appended event, in bytes.
pub const DEFAULT_MAX_MESSAGE: usize = 256 * 1024;
/// Default open SSE streams per client address.
pub const DEFAULT_MAX_STREAMS_PER_CLIENT: usize = 64;
/// Default most bytes a stream may hold unsent when a live batch arrives; past it the
/// stream ends and its client resumes from its cursor. 4 MiB: several pages, and at 64
/// streams per address a client costs at most about 256 MiB however it reads.
pub const DEFAULT_MAX_STREAM_BUFFER: usize = 4 << 20;
/// Default time a socket may take no bytes of a response before the gateway closes it:
/// longer than the keep-alive interval, so an idle stream is never mistaken for one.
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// Default time a client has to send a request body.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything `serve` needs.
#[derive(Clone)]
pub struct Config {
    /// Connection string; never printed (it may hold a password).
    pub database_url: String,
    pub pool_size: usize,
    pub keep_alive: Duration,
    pub retry_ms: u64,
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub shutdown_grace: Duration,
    pub max_body: usize,
    pub max_page: i64,
    /// Interval of the counter poll; zero turns it off.
    pub counter_poll: Duration,
    pub max_message: usize,
    pub max_streams_per_client: usize,
    /// See [`DEFAULT_MAX_STREAM_BUFFER`].
    pub max_stream_buffer: usize,
    /// See [`DEFAULT_SEND_TIMEOUT`].
    pub send_timeout: Duration,
    /// See [`DEFAULT_BODY_TIMEOUT`].
    pub body_timeout: Duration,
    pub hub: hub::Settings,
    /// Token verification (off without a secret).
    pub auth: crate::auth::Auth,
    /// Serve without auth on a non-loopback address anyway.
    pub insecure_no_auth: bool,
    /// Origins allowed to call the API from a browser (CORS), exact match.
    pub cors_origins: Vec<String>,
    /// HTTPS with this certificate and key (`--tls-cert`, `--tls-key`); plain without.
    pub tls: Option<crate::tls::Files>,
    /// Peers whose forwarded-client headers are believed (`--trusted-proxy`).
    pub trusted_proxies: Vec<crate::proxy::Cidr>,
}

impl Config {
    /// Defaults for everything but the database.
    pub fn new(database_url: impl Into<String>) -> Config {
        Config {
            database_url: database_url.into(),
            pool_size: DEFAULT_POOL_SIZE,
            keep_alive: DEFAULT_KEEP_ALIVE,
            retry_ms: DEFAULT_RETRY_MS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            max_body: DEFAULT_MAX_BODY,
            max_page: MAX_PAGE,
            counter_poll: DEFAULT_COUNTER_POLL,
            max_message: DEFAULT_MAX_MESSAGE,
            max_streams_per_client: DEFAULT_MAX_STREAMS_PER_CLIENT,
            max_stream_buffer: DEFAULT_MAX_STREAM_BUFFER,
            send_timeout: DEFAULT_SEND_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            hub: hub::Settings::default(),
            auth: crate::auth::Auth::off(),
            insecure_no_auth: false,
            cors_origins: Vec::new(),
            tls: None,
            trusted_proxies: Vec::new(),
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("database_url", &redact_url(&self.database_url))
            .field("pool_size", &self.pool_size)
            .field("keep_alive", &self.keep_alive)
            .field("retry_ms", &self.retry_ms)
            .field("max_connections", &self.max_connections)
            .field("header_timeout", &self.header_timeout)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("max_body", &self.max_body)
            .field("max_page", &self.max_page)
            .field("counter_poll", &self.counter_poll)
            .field("max_message", &self.max_message)
            .field("max_streams_per_client", &self.max_streams_per_client)
            .field("max_stream_buffer", &self.max_stream_buffer)
            .field("send_timeout", &self.send_timeout)
            .field("body_timeout", &self.body_timeout)
            .field("hub", &self.hub)
            .field("auth", &self.auth)
            .field("insecure_no_auth", &self.insecure_no_auth)
            .field("cors_origins", &self.cors_origins)
            .field("tls", &self.tls)
            .field("trusted_proxies", &self.trusted_proxies)
            .finish()
    }
}

/// A connection string with its password replaced, for logs.
pub fn redact_url(url: &str) -> String {
    // postgres://user:password@host/db -> postgres://user:***@host/db
    if let Some((scheme, rest)) = url.split_once("://") {
        if let Some((userinfo, host)) = rest.rsplit_once('@') {
            if let Some((user, _)) = userinfo.split_once(':') {
                return format!("{scheme}://{user}:***@{host}");
            }
        }
        return url.to_string();
    }
    // key=value form: hide password=...
    url.split_whitespace()
        .map(|kv| {
            if kv.starts_with("password=") {
                "password=***"
            } else {
                kv
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Parses a duration the way `humantime` does (`10s`, `500ms`, `2m`, `1h`, `30d`,
/// `1h 30m`), or plain seconds (`7`, `0.5`), as the flags always took.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return text
            .parse::<f64>()
            .ok()
            .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
            .ok_or_else(|| format!("invalid duration: {text:?}"));
    }
    humantime::parse_duration(text).map_err(|e| format!("invalid duration {text:?}: {e}"))
}

/// Parses a listen address.
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    text.parse()
        .map_err(|_| format!("invalid listen address {text:?} (expected host:port)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_print() {
        let c = Config::new("postgres://me:hunter2@db:5432/x");
        assert!(!format!("{c:?}").contains("hunter2"));
        assert_eq!(
            redact_url("host=db password=hunter2 user=me"),
            "host=db password=*** user=me"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(
            parse_duration("30d").unwrap(),
            Duration::from_secs(30 * 86400)
        );
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert_eq!(
            parse_duration(" 1.5 ").unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(parse_duration("15s").unwrap(), Duration::from_secs(15));
        assert_eq!(parse_duration("20ms").unwrap(), Duration::from_millis(20));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("0.5s").unwrap(), Duration::from_millis(500));
        assert!(parse_duration("7x").is_err());
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("1..2").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-1s").is_err());
        // Too large for a Duration: an error, not a panic.
        assert!(parse_duration("2000000000000000000000000000d").is_err());
    }
}
