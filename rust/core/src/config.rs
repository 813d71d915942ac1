//! Every broker setting in one place: names, defaults and validation.
//!
//! The Python `Broker`, the CLI and the Rust tests all build a [`Config`] and call
//! [`Config::validate`]; an invalid value is reported as a [`ConfigError`] naming the setting and
//! the value, which the binding turns into a Python `ValueError`.

use std::fmt;
use std::time::Duration;

/// What to do with a WebSocket client that went over a limit: its outbound queue is full
/// (`slow_client_policy`) or it sends faster than `client_rate_limit` (`rate_limit_policy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitPolicy {
    /// Close the client (close code [`crate::protocol::CLOSE_SLOW_CONSUMER`] for a full queue,
    /// [`crate::protocol::CLOSE_POLICY`] for the rate limit); its backend gets `disconnected`.
    Close,
    /// Keep the client and drop the message (counted in `slow_client_drops` / `rate_limited`).
    Drop,
}

/// The name the slow-client setting has always used.
pub type SlowClientPolicy = LimitPolicy;

impl LimitPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            SlowClientPolicy::Close => "close",
            SlowClientPolicy::Drop => "drop",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "close" => Some(SlowClientPolicy::Close),
            "drop" => Some(SlowClientPolicy::Drop),
            _ => None,
        }
    }
}

/// All settings of one broker.
#[derive(Clone, Debug)]
pub struct Config {
    /// Interface of the WebSocket listener.
    pub ws_host: String,
    /// Port of the WebSocket listener; 0 picks a free port.
    pub ws_port: u16,
    /// Interface of the backend (TCP) listener.
    pub tcp_host: String,
    /// Port of the backend listener; 0 picks a free port.
    pub tcp_port: u16,
    /// Events kept while no backend is connected (drop-oldest beyond it; 0 disables the queue).
    pub queue_size: usize,
    /// How long a connection request may wait for a backend's `response`.
    pub request_timeout: Duration,
    /// Interval of `heartbeat` lines to backends.
    pub heartbeat_interval: Duration,
    /// Interval of WebSocket pings; a client silent for two intervals is closed. Zero disables.
    pub ping_interval: Duration,
    /// Largest WebSocket message accepted from a client, in bytes (close 1009 beyond it).
    pub max_message_size: usize,
    /// Largest line accepted from a backend, in bytes (the line is discarded and logged beyond it).
    pub max_line_size: usize,
    /// Messages that may wait in one client's outbound queue.
    pub client_queue_size: usize,
    /// What happens when a client's outbound queue is full.
    pub slow_client_policy: SlowClientPolicy,
    /// Allowed `Origin` header values; empty allows every origin.
    pub allowed_origins: Vec<String>,
    /// Maximum simultaneous WebSocket clients; 0 means no limit. Beyond it: HTTP 503.
    pub max_connections: usize,
    /// How long a client may take to send its HTTP upgrade request.
    pub handshake_timeout: Duration,
    /// Tokio worker threads; 0 uses one per CPU.
    pub workers: usize,
    /// Log filter (`error`, `warn`, `info`, `debug`, `trace` or a tracing directive).
    pub log_level: String,
    /// Shared secret backends must present in their v2 `hello`; `None` lets any backend in.
    pub backend_secret: Option<String>,
    /// Unacknowledged events kept per v2 backend for redelivery; the oldest beyond it are
    /// released unprotected (counted in `unacked_overflow`).
    pub max_unacked: usize,
    /// Messages per second one WebSocket client may send (token bucket); 0 disables the limit.
    pub client_rate_limit: f64,
    /// Burst the rate limit allows; 0 means one second's worth (at least 1).
    pub client_rate_burst: u32,
    /// What happens to a client over its rate limit.
    pub rate_limit_policy: LimitPolicy,
    /// Redis URL (`redis://[:password@]host:port/db` or `unix:///path`) of the cluster this broker
    /// joins; `None` runs alone with no Redis connection at all. See [`crate::cluster`].
    pub cluster_url: Option<String>,
    /// With `cluster_url`: refuse to start when Redis cannot be reached at start (true), or start
    /// degraded — local delivery only — and keep retrying (false).
    pub cluster_required: bool,
    /// Prefix of every Redis channel and key of the cluster, so several clusters can share one
    /// Redis server (pub/sub channels ignore the database number of the URL).
    pub cluster_name: String,
    /// This node's id in the cluster (unique per running broker); `None` picks a random one.
    pub cluster_node_id: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            ws_host: "0.0.0.0".into(),
            ws_port: 8080,
            tcp_host: "0.0.0.0".into(),
            tcp_port: 8081,
            queue_size: 1000,
            request_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(15),
            ping_interval: Duration::from_secs(30),
            max_message_size: 4 * 1024 * 1024,
            max_line_size: 16 * 1024 * 1024,
            client_queue_size: 1024,
            slow_client_policy: SlowClientPolicy::Close,
            allowed_origins: Vec::new(),
            max_connections: 0,
            handshake_timeout: Duration::from_secs(10),
            workers: 0,
            log_level: "info".into(),
            backend_secret: None,
            max_unacked: 100_000,
            client_rate_limit: 0.0,
            client_rate_burst: 0,
            rate_limit_policy: LimitPolicy::Drop,
            cluster_url: None,
            cluster_required: true,
            cluster_name: "pystrands".into(),
            cluster_node_id: None,
        }
    }
}

/// A setting with a value it cannot take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub setting: &'static str,
    pub value: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid setting {}={}: {}", self.setting, self.value, self.reason)
    }
}

impl std::error::Error for ConfigError {}

fn bad(setting: &'static str, value: impl fmt::Display, reason: &str) -> ConfigError {
    ConfigError { setting, value: value.to_string(), reason: reason.to_string() }
}

/// Parses a duration given in (fractional) seconds, as every interval setting is written.
pub fn seconds(setting: &'static str, secs: f64) -> Result<Duration, ConfigError> {
    if !secs.is_finite() || secs < 0.0 {
        return Err(bad(setting, secs, "must be a finite number of seconds >= 0"));
    }
    if secs > 1e9 {
        return Err(bad(setting, secs, "is too large"));
    }
    Ok(Duration::from_secs_f64(secs))
}

pub const LOG_LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];

const NAME_RULE: &str = "must be 1 to 64 characters from A-Z a-z 0-9 - _ . :";

/// Cluster and node names end up in Redis keys, channel names and every envelope.
fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// Masks the password of a URL like `redis://user:secret@host:6379/0` → `redis://user:***@host:6379/0`.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else { return url.to_string() };
    let rest = &url[scheme_end..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else { return url.to_string() };
    let userinfo = &rest[..at];
    let masked = match userinfo.find(':') {
        Some(colon) => format!("{}:***", &userinfo[..colon]),
        None => "***".to_string(), // `redis://secret@host`: the lone part is taken as the password
    };
    format!("{}{}{}", &url[..scheme_end], masked, &rest[at..])
}

impl Config {
    /// Checks every setting; the first bad one is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.ws_host.trim().is_empty() {
            return Err(bad("ws_host", "''", "must not be empty"));
        }
        if self.tcp_host.trim().is_empty() {
            return Err(bad("tcp_host", "''", "must not be empty"));
        }
        if self.ws_port != 0 && self.ws_port == self.tcp_port && self.ws_host == self.tcp_host {
            return Err(bad("tcp_port", self.tcp_port, "must differ from ws_port"));
        }
        if self.queue_size > 10_000_000 {
            return Err(bad("queue_size", self.queue_size, "must be between 0 and 10000000"));
        }
        if self.request_timeout.is_zero() {
            return Err(bad("request_timeout", 0, "must be > 0 seconds"));
        }
        if self.heartbeat_interval < Duration::from_millis(10) {
            return Err(bad("heartbeat_interval", self.heartbeat_interval.as_secs_f64(), "must be >= 0.01 seconds"));
        }
        if self.handshake_timeout.is_zero() {
            return Err(bad("handshake_timeout", 0, "must be > 0 seconds"));
        }
        if self.max_message_size < 16 || self.max_message_size > 1 << 30 {
            return Err(bad("max_message_size", self.max_message_size, "must be between 16 bytes and 1 GiB"));
        }
        if self.max_line_size < 1024 || self.max_line_size > 1 << 31 {
            return Err(bad("max_line_size", self.max_line_size, "must be between 1 KiB and 2 GiB"));
        }
        if self.client_queue_size == 0 || self.client_queue_size > 1_000_000 {
            return Err(bad("client_queue_size", self.client_queue_size, "must be between 1 and 1000000"));
        }
        if self.workers > 1024 {
            return Err(bad("workers", self.workers, "must be between 0 and 1024"));
        }
        for origin in &self.allowed_origins {
            if origin.trim().is_empty() {
                return Err(bad("allowed_origins", "''", "entries must not be empty"));
            }
        }
        if let Some(secret) = &self.backend_secret {
            if secret.is_empty() || secret.contains(['\n', '\r']) {
                return Err(bad("backend_secret", "<hidden>", "must be a non-empty string without line breaks"));
            }
        }
        if self.max_unacked == 0 || self.max_unacked > 10_000_000 {
            return Err(bad("max_unacked", self.max_unacked, "must be between 1 and 10000000"));
        }
        if !self.client_rate_limit.is_finite() || self.client_rate_limit < 0.0 || self.client_rate_limit > 1e9 {
            return Err(bad(
                "client_rate_limit",
                self.client_rate_limit,
                "must be a number of messages per second >= 0 (0 disables)",
            ));
        }
        if self.client_rate_burst > 1_000_000_000 {
            return Err(bad("client_rate_burst", self.client_rate_burst, "must be between 0 and 1000000000"));
        }
        if let Some(url) = &self.cluster_url {
            if url.trim().is_empty() {
                return Err(bad("cluster_url", "''", "must not be empty (leave it unset to run without a cluster)"));
            }
            if let Err(e) = redis::Client::open(url.as_str()) {
                return Err(bad("cluster_url", redact_url(url), &format!("is not a usable Redis URL ({e})")));
            }
        }
        if !valid_name(&self.cluster_name) {
            return Err(bad("cluster_name", &self.cluster_name, NAME_RULE));
        }
        if let Some(id) = &self.cluster_node_id {
            if !valid_name(id) {
                return Err(bad("cluster_node_id", id, NAME_RULE));
            }
        }
        let level = self.log_level.to_ascii_lowercase();
        let directive_ok =
            self.log_level.contains('=') && tracing_subscriber::EnvFilter::try_new(&self.log_level).is_ok();
        if !LOG_LEVELS.contains(&level.as_str()) && !directive_ok {
            return Err(bad("log_level", &self.log_level, "must be one of error, warn, info, debug, trace"));
        }
        Ok(())
    }

    /// Token-bucket burst of the client rate limit.
    pub fn rate_burst(&self) -> f64 {
        if self.client_rate_burst > 0 {
            f64::from(self.client_rate_burst)
        } else {
            self.client_rate_limit.ceil().max(1.0)
        }
    }

    /// How long a v2 backend may stay silent before it is declared dead.
    pub fn backend_silence_limit(&self) -> std::time::Duration {
        self.heartbeat_interval * 3
    }

    /// `cluster_url` fit for logs and error messages (a password in it is masked).
    pub fn cluster_url_redacted(&self) -> Option<String> {
        self.cluster_url.as_deref().map(redact_url)
    }

    /// Whether a WebSocket request carrying this `Origin` may connect.
    pub fn origin_allowed(&self, origin: Option<&str>) -> bool {
        if self.allowed_origins.is_empty() || self.allowed_origins.iter().any(|o| o == "*") {
            return true;
        }
        match origin {
            Some(o) => self.allowed_origins.iter().any(|a| a.eq_ignore_ascii_case(o)),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn errors_name_the_setting_and_value() {
        let c = Config { client_queue_size: 0, ..Config::default() };
        let e = c.validate().unwrap_err();
        assert_eq!(e.setting, "client_queue_size");
        assert!(e.to_string().contains("client_queue_size=0"), "{e}");

        let c = Config { log_level: "loud".into(), ..Config::default() };
        assert_eq!(c.validate().unwrap_err().setting, "log_level");

        assert_eq!(seconds("request_timeout", -1.0).unwrap_err().setting, "request_timeout");
        assert!(seconds("request_timeout", f64::NAN).is_err());

        let c = Config { backend_secret: Some("a\nb".into()), ..Config::default() };
        let e = c.validate().unwrap_err();
        assert_eq!(e.setting, "backend_secret");
        assert!(!e.to_string().contains("a\nb"), "the secret is never echoed: {e}");
        let c = Config { client_rate_limit: -1.0, ..Config::default() };
        assert_eq!(c.validate().unwrap_err().setting, "client_rate_limit");
        let c = Config { max_unacked: 0, ..Config::default() };
        assert_eq!(c.validate().unwrap_err().setting, "max_unacked");
    }

    #[test]
    fn same_port_twice_is_refused() {
        let c = Config { ws_port: 9000, tcp_port: 9000, ..Config::default() };
        assert_eq!(c.validate().unwrap_err().setting, "tcp_port");
    }

    #[test]
    fn cluster_settings_are_checked_and_passwords_never_shown() {
        let ok = Config { cluster_url: Some("redis://127.0.0.1:6379/0".into()), ..Config::default() };
        ok.validate().unwrap();
        let e = Config { cluster_url: Some("http://:hunter2@x/".into()), ..Config::default() }.validate().unwrap_err();
        assert_eq!(e.setting, "cluster_url");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert_eq!(
            Config { cluster_url: Some(" ".into()), ..Config::default() }.validate().unwrap_err().setting,
            "cluster_url"
        );
        assert_eq!(
            Config { cluster_name: "a b".into(), ..Config::default() }.validate().unwrap_err().setting,
            "cluster_name"
        );
        assert_eq!(
            Config { cluster_node_id: Some(String::new()), ..Config::default() }.validate().unwrap_err().setting,
            "cluster_node_id"
        );
        Config { cluster_node_id: Some("node-1.eu:a_b".into()), ..Config::default() }.validate().unwrap();

        assert_eq!(redact_url("redis://:hunter2@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(redact_url("redis://me:hunter2@h:1/0"), "redis://me:***@h:1/0");
        assert_eq!(redact_url("redis://hunter2@h"), "redis://***@h");
        assert_eq!(redact_url("redis://h:1/0"), "redis://h:1/0");
        assert_eq!(redact_url("redis://h/x@y"), "redis://h/x@y");
    }

    #[test]
    fn origins() {
        let mut c = Config::default();
        assert!(c.origin_allowed(None));
        c.allowed_origins = vec!["https://app.example".into()];
        assert!(c.origin_allowed(Some("https://APP.example")));
        assert!(!c.origin_allowed(Some("https://evil.example")));
        assert!(!c.origin_allowed(None));
    }
}
