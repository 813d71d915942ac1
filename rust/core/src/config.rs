//! Every broker setting in one place: names, types, defaults, help, environment variables, CLI
//! flags and validation.
//!
//! The `settings!` table below is the single source: it generates the [`Config`] struct, its
//! `Default`, the per-setting checks of [`Config::validate`], [`Config::get`] / [`Config::set`]
//! (by name, with a [`Value`]) and the metadata list [`settings_table`], from which the Python
//! binding converts settings dicts, the CLI builds its flags and `docs/broker.md` its table.
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

/// How the value of a setting is written (in Python, on the command line, in the environment),
/// and the range check every integer setting gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// An integer in `min..=max`; outside it the error says `rule`, or "must be between min and max".
    Int { min: i64, max: i64, rule: Option<&'static str> },
    /// A duration written as a (fractional) number of seconds (see [`seconds`]).
    Seconds,
    /// A floating point number of `unit` (e.g. "messages per second").
    Float { unit: &'static str },
    /// A string.
    Str,
    /// A string, or unset (`None`).
    OptStr,
    /// True or false.
    Bool,
    /// A list of strings.
    List,
    /// A [`LimitPolicy`]: `close` or `drop`.
    Policy,
    /// A secret string, or unset; never echoed in errors, and an empty string means unset.
    Secret,
}

impl Kind {
    /// An integer between `min` and `max` (inclusive).
    pub const fn int(min: i64, max: i64) -> Kind {
        Kind::Int { min, max, rule: None }
    }

    /// An integer between `min` and `max` whose range error reads `rule`.
    pub const fn int_rule(min: i64, max: i64, rule: &'static str) -> Kind {
        Kind::Int { min, max, rule: Some(rule) }
    }

    /// The type as the docs and `_core.settings_table()` show it.
    pub fn type_name(self) -> &'static str {
        match self {
            Kind::Int { .. } => "int",
            Kind::Seconds => "float seconds",
            Kind::Float { .. } => "float",
            Kind::Str => "str",
            Kind::OptStr | Kind::Secret => "str|None",
            Kind::Bool => "bool",
            Kind::List => "list[str]",
            Kind::Policy => "'close'|'drop'",
        }
    }

    /// A short machine name of the kind, for the bindings (`int`, `seconds`, `float`, `str`,
    /// `optional_str`, `bool`, `list`, `policy`, `secret`).
    pub fn id(self) -> &'static str {
        match self {
            Kind::Int { .. } => "int",
            Kind::Seconds => "seconds",
            Kind::Float { .. } => "float",
            Kind::Str => "str",
            Kind::OptStr => "optional_str",
            Kind::Bool => "bool",
            Kind::List => "list",
            Kind::Policy => "policy",
            Kind::Secret => "secret",
        }
    }

    /// The checks every setting of this kind gets, on a value about to be stored (by
    /// [`Config::set`]) or already stored (by [`Config::validate`]).
    fn check(self, setting: &'static str, value: &Value) -> Result<(), ConfigError> {
        match (self, value) {
            (Kind::Int { min, max, rule }, Value::Int(n)) if *n < min || *n > max => match rule {
                Some(rule) => Err(bad(setting, n, rule)),
                None => Err(bad(setting, n, &format!("must be between {min} and {max}"))),
            },
            _ => Ok(()),
        }
    }
}

/// A setting's value, independent of its Rust type: what the bindings pass to [`Config::set`]
/// and get from [`Config::get`]. Durations are seconds ([`Value::Float`]), policies strings.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<String>),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::None => f.write_str("None"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(n) => write!(f, "{n}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Str(s) => write!(f, "{s:?}"),
            Value::List(l) => write!(f, "{l:?}"),
        }
    }
}

/// A Rust type a setting can have: converts to and from a [`Value`].
pub trait SettingType: Sized {
    fn to_value(&self) -> Value;
    /// Converts `value` to this type; a value of the wrong shape or out of the type's range is a
    /// [`ConfigError`] naming `setting`.
    fn from_value(setting: &'static str, value: Value) -> Result<Self, ConfigError>;
}

fn wrong_type(setting: &'static str, value: &Value, what: &str) -> ConfigError {
    bad(setting, value, &format!("must be {what}"))
}

macro_rules! integer_setting_types {
    ($($t:ty),*) => {$(
        impl SettingType for $t {
            fn to_value(&self) -> Value {
                Value::Int(i64::try_from(*self).unwrap_or(i64::MAX))
            }
            fn from_value(setting: &'static str, value: Value) -> Result<Self, ConfigError> {
                match value {
                    Value::Int(n) => <$t>::try_from(n)
                        .map_err(|_| bad(setting, n, &format!("must be between {} and {}", <$t>::MIN, <$t>::MAX))),
                    other => Err(wrong_type(setting, &other, "an integer")),
                }
            }
        }
    )*};
}

integer_setting_types!(u16, u32, usize);

impl SettingType for f64 {
    fn to_value(&self) -> Value {
        Value::Float(*self)
    }
    fn from_value(setting: &'static str, value: Value) -> Result<Self, ConfigError> {
        match value {
            Value::Float(x) => Ok(x),
            Value::Int(n) => Ok(n as f64),
            other => Err(wrong_type(setting, &other, "a number")),
        }
    }
}

impl SettingType for Duration {
    fn to_value(&self) -> Value {
        Value::Float(self.as_secs_f64())
    }
    fn from_value(setting: &'static str, value: Value) -> Result<Self, ConfigError> {
        seconds(setting, f64::from_value(setting, value)?)
    }
}

impl SettingType for bool {
    fn to_value(&self) -> Value {
        Value::Bool(*self)
    }
    fn from_value(setting: &'static str, value: Value) -> Result<Self, ConfigError> {
        match value {
            Value::Bool(b) => Ok(b),
            other => Err(wrong_type(setting, &other, "True or False")),
        }
    }
}

impl SettingType for String {
    fn to_value(&self) -> Value {
        Value::Str(self.clone())
    }
    fn from_value(setting: &'static str, value: Value) -> Result<Self, ConfigError> {
        match value {
            Value::Str(s) => Ok(s),
            other => Err(wrong_type(setting, &other, "a string")),
        }
    }
}

impl SettingType for Option<String> {
    fn to_value(&self) -> Value {
        self.as_ref().map_or(Value::None, |s| Value::Str(s.clone()))
    }
    fn from_value(setting: &'static str, value: Value) -> Result<Self, ConfigError> {
        match value {
            Value::None => Ok(None),
            other => String::from_value(setting, other).map(Some),
        }
    }
}

impl SettingType for Vec<String> {
    fn to_value(&self) -> Value {
        Value::List(self.clone())
    }
    fn from_value(setting: &'static str, value: Value) -> Result<Self, ConfigError> {
        match value {
            Value::List(l) => Ok(l),
            other => Err(wrong_type(setting, &other, "a list of strings")),
        }
    }
}

impl SettingType for LimitPolicy {
    fn to_value(&self) -> Value {
        Value::Str(self.as_str().to_string())
    }
    fn from_value(setting: &'static str, value: Value) -> Result<Self, ConfigError> {
        let s = String::from_value(setting, value)?;
        LimitPolicy::parse(&s).ok_or_else(|| bad(setting, &s, "must be 'close' or 'drop'"))
    }
}

/// What [`settings_table`] tells about one setting.
#[derive(Clone, Copy, Debug)]
pub struct SettingInfo {
    /// The name: the `Config` field, the Python keyword and the settings dict key.
    pub name: &'static str,
    pub kind: Kind,
    /// One or two sentences for users (CLI `--help`, `docs/broker.md`, the field's rustdoc).
    pub help: &'static str,
    /// Environment variables the CLI reads (the first is the documented one).
    pub env: &'static [&'static str],
    /// CLI flags (the first is the documented one).
    pub flags: &'static [&'static str],
}

impl SettingInfo {
    /// The type as the docs show it, e.g. `int`, `float seconds`, `str|None`.
    pub fn type_name(&self) -> &'static str {
        self.kind.type_name()
    }

    /// Whether the value is a secret (never logged or echoed; better passed in the environment).
    pub fn secret(&self) -> bool {
        self.kind == Kind::Secret
    }

    /// The default value.
    pub fn default_value(&self) -> Value {
        Config::default().get(self.name).expect("every table row is a Config field")
    }

    /// The default for humans: `10 s`, `4194304 (4 MiB)`, `unset`, `empty`, `close`.
    pub fn default_text(&self) -> String {
        const MIB: i64 = 1024 * 1024;
        match self.default_value() {
            Value::None => "unset".to_string(),
            Value::List(l) if l.is_empty() => "empty".to_string(),
            Value::List(l) => l.join(", "),
            Value::Str(s) => s,
            Value::Int(n) if n >= MIB && n % MIB == 0 => format!("{n} ({} MiB)", n / MIB),
            Value::Float(x) if self.kind == Kind::Seconds => format!("{x} s"),
            other => other.to_string(),
        }
    }
}

/// One row per setting:
///
/// ```text
/// name: RustType = default => {
///     kind: Kind::..., [check: fn(&'static str, &RustType) -> Result<(), ConfigError>,]
///     env: ["PYSTRANDS_NAME", aliases...], flag: ["--name", aliases...], help: "...",
/// }
/// ```
///
/// generates the `Config` struct (the help is the field's doc), its `Default`, `SETTINGS`,
/// `Config::get`, `Config::set` and `Config::validate_each` (the kind's check, then `check`).
macro_rules! settings {
    ($(
        $(#[$meta:meta])*
        $name:ident: $ty:ty = $default:expr => {
            kind: $kind:expr,
            $(check: $check:expr,)?
            env: [$($env:literal),+ $(,)?],
            flag: [$($flag:literal),+ $(,)?],
            help: $help:literal $(,)?
        }
    )*) => {
        /// All settings of one broker (generated by the `settings!` table in `config.rs`).
        #[derive(Clone)]
        pub struct Config {
            $(#[doc = $help] $(#[$meta])* pub $name: $ty,)*
        }

        /// Every setting, secrets shown as `<hidden>` (a `Config` may end up in a log line).
        impl fmt::Debug for Config {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let mut d = f.debug_struct("Config");
                $(
                    let value = SettingType::to_value(&self.$name);
                    if ($kind) == Kind::Secret && value != Value::None {
                        d.field(stringify!($name), &"<hidden>");
                    } else {
                        d.field(stringify!($name), &value);
                    }
                )*
                d.finish()
            }
        }

        impl Default for Config {
            fn default() -> Self {
                Config { $($name: $default,)* }
            }
        }

        /// Every setting, in the order of the table.
        pub static SETTINGS: &[SettingInfo] = &[$(
            SettingInfo {
                name: stringify!($name),
                kind: $kind,
                help: $help,
                env: &[$($env),+],
                flags: &[$($flag),+],
            },
        )*];

        impl Config {
            /// The value of the setting `name`, `None` for an unknown name.
            pub fn get(&self, name: &str) -> Option<Value> {
                match name {
                    $(stringify!($name) => Some(SettingType::to_value(&self.$name)),)*
                    _ => None,
                }
            }

            /// Sets the setting `name` (one of [`settings_table`]) from `value`, converting it to
            /// the field's type. An integer out of the setting's range or a value of the wrong
            /// shape is refused; the other checks wait for [`Config::validate`]. For a
            /// [`Kind::Secret`] an empty string means unset. An unknown name is an error with
            /// `setting == "name"`.
            pub fn set(&mut self, name: &str, value: Value) -> Result<(), ConfigError> {
                match name {
                    $(stringify!($name) => {
                        let setting = stringify!($name);
                        let value = match ($kind, value) {
                            (Kind::Secret, Value::Str(s)) if s.is_empty() => Value::None,
                            (Kind::Secret, v @ (Value::None | Value::Str(_))) => v,
                            (Kind::Secret, _) => return Err(bad(setting, "<hidden>", "must be a string")),
                            (_, v) => v,
                        };
                        ($kind).check(setting, &value)?;
                        self.$name = SettingType::from_value(setting, value)?;
                        Ok(())
                    })*
                    _ => Err(bad("name", name, "is not a broker setting")),
                }
            }

            /// The checks of every single setting, in table order: its kind's, then its own.
            fn validate_each(&self) -> Result<(), ConfigError> {
                $(
                    ($kind).check(stringify!($name), &SettingType::to_value(&self.$name))?;
                    $(($check)(stringify!($name), &self.$name)?;)?
                )*
                Ok(())
            }
        }
    };
}

/// Every setting of the broker, in the order of the table (see [`SETTINGS`]).
pub fn settings_table() -> &'static [SettingInfo] {
    SETTINGS
}

/// The row of the setting `name`.
pub fn setting(name: &str) -> Option<&'static SettingInfo> {
    SETTINGS.iter().find(|s| s.name == name)
}

settings! {
    ws_host: String = "0.0.0.0".into() => {
        kind: Kind::Str,
        check: not_blank,
        env: ["PYSTRANDS_WS_HOST"],
        flag: ["--ws-host"],
        help: "Interface of the WebSocket listener (Python and CLI: defaults to host).",
    }
    ws_port: u16 = 8080 => {
        kind: Kind::int(0, 65535),
        env: ["PYSTRANDS_WS_PORT"],
        flag: ["--ws-port"],
        help: "Port of the WebSocket listener; 0 picks a free port.",
    }
    tcp_host: String = "0.0.0.0".into() => {
        kind: Kind::Str,
        check: not_blank,
        env: ["PYSTRANDS_TCP_HOST"],
        flag: ["--tcp-host"],
        help: "Interface of the backend (TCP) listener (Python and CLI: defaults to host).",
    }
    tcp_port: u16 = 8081 => {
        kind: Kind::int(0, 65535),
        env: ["PYSTRANDS_TCP_PORT"],
        flag: ["--tcp-port"],
        help: "Port of the backend (TCP) listener; 0 picks a free port. Keep it private, or set \
               backend_secret: whoever reaches it controls the broker.",
    }
    queue_size: usize = 1000 => {
        kind: Kind::int(0, 10_000_000),
        env: ["PYSTRANDS_QUEUE_SIZE"],
        flag: ["--queue-size"],
        help: "Events kept while no backend is connected (drop-oldest beyond it; 0 disables the queue).",
    }
    request_timeout: Duration = Duration::from_secs(10) => {
        kind: Kind::Seconds,
        check: positive,
        env: ["PYSTRANDS_REQUEST_TIMEOUT"],
        flag: ["--request-timeout"],
        help: "How long a connection request waits for a backend's response before HTTP 503.",
    }
    heartbeat_interval: Duration = Duration::from_secs(15) => {
        kind: Kind::Seconds,
        check: at_least_10ms,
        env: ["PYSTRANDS_HEARTBEAT_INTERVAL"],
        flag: ["--heartbeat-interval"],
        help: "Interval of heartbeat lines to backends; a v2 backend silent for 3 intervals is declared dead.",
    }
    ping_interval: Duration = Duration::from_secs(30) => {
        kind: Kind::Seconds,
        env: ["PYSTRANDS_PING_INTERVAL"],
        flag: ["--ping-interval"],
        help: "Interval of WebSocket pings; a client silent for two intervals is closed (code 4002). \
               0 disables pings.",
    }
    max_message_size: usize = 4 * 1024 * 1024 => {
        kind: Kind::int_rule(16, 1 << 30, "must be between 16 bytes and 1 GiB"),
        env: ["PYSTRANDS_MAX_MESSAGE_SIZE"],
        flag: ["--max-message-size"],
        help: "Largest WebSocket message accepted from a client, in bytes (close 1009 beyond it).",
    }
    max_line_size: usize = 16 * 1024 * 1024 => {
        kind: Kind::int_rule(1024, 1 << 31, "must be between 1 KiB and 2 GiB"),
        env: ["PYSTRANDS_MAX_LINE_SIZE"],
        flag: ["--max-line-size"],
        help: "Largest line accepted from a backend, in bytes (a longer line is discarded and logged; \
               the backend stays connected).",
    }
    client_queue_size: usize = 1024 => {
        kind: Kind::int(1, 1_000_000),
        env: ["PYSTRANDS_CLIENT_QUEUE_SIZE"],
        flag: ["--client-queue-size"],
        help: "Messages that may wait in one client's outbound queue before slow_client_policy applies.",
    }
    slow_client_policy: LimitPolicy = LimitPolicy::Close => {
        kind: Kind::Policy,
        env: ["PYSTRANDS_SLOW_CLIENT_POLICY"],
        flag: ["--slow-client-policy"],
        help: "When a client's outbound queue is full: 'close' the client (code 1013) or 'drop' the \
               message (counted in slow_client_drops).",
    }
    allowed_origins: Vec<String> = Vec::new() => {
        kind: Kind::List,
        check: no_blank_entries,
        env: ["PYSTRANDS_ALLOWED_ORIGINS"],
        flag: ["--allowed-origin"],
        help: "Allowed Origin header values (others get HTTP 403); empty allows every origin. \
               CLI: repeat the flag; environment: comma-separated.",
    }
    max_connections: usize = 0 => {
        kind: Kind::int(0, i64::MAX),
        env: ["PYSTRANDS_MAX_CONNECTIONS"],
        flag: ["--max-connections"],
        help: "Most simultaneous WebSocket clients (0: no limit); beyond it new connections get HTTP 503.",
    }
    handshake_timeout: Duration = Duration::from_secs(10) => {
        kind: Kind::Seconds,
        check: positive,
        env: ["PYSTRANDS_HANDSHAKE_TIMEOUT"],
        flag: ["--handshake-timeout"],
        help: "How long a client may take to send its HTTP upgrade request.",
    }
    workers: usize = 0 => {
        kind: Kind::int(0, 1024),
        env: ["PYSTRANDS_WORKERS"],
        flag: ["--workers"],
        help: "Native (tokio) worker threads; 0 uses one per CPU.",
    }
    log_level: String = "info".into() => {
        kind: Kind::Str,
        check: log_level_rule,
        env: ["PYSTRANDS_LOG_LEVEL"],
        flag: ["--log-level"],
        help: "Native log filter: error, warn, info, debug, trace (or a tracing directive). Records go \
               through Python logging (pystrands.broker.* loggers); the most verbose level any broker \
               of the process asked for is kept, Python logger levels filter further.",
    }
    backend_secret: Option<String> = None => {
        kind: Kind::Secret,
        check: secret_rule,
        env: ["PYSTRANDS_BACKEND_SECRET"],
        flag: ["--backend-secret"],
        help: "Shared secret every backend must present in its protocol-v2 hello; unset lets any \
               backend in. Prefer the environment variable (flags show in ps).",
    }
    max_unacked: usize = 100_000 => {
        kind: Kind::int(1, 10_000_000),
        env: ["PYSTRANDS_MAX_UNACKED"],
        flag: ["--max-unacked"],
        help: "Unacknowledged events kept per v2 backend for redelivery; the oldest beyond it are \
               released unprotected (counted in unacked_overflow).",
    }
    client_rate_limit: f64 = 0.0 => {
        kind: Kind::Float { unit: "messages per second" },
        check: rate_rule,
        env: ["PYSTRANDS_CLIENT_RATE_LIMIT"],
        flag: ["--client-rate-limit"],
        help: "Messages per second one WebSocket client may send (token bucket); 0 disables the limit.",
    }
    client_rate_burst: u32 = 0 => {
        kind: Kind::int(0, 1_000_000_000),
        env: ["PYSTRANDS_CLIENT_RATE_BURST"],
        flag: ["--client-rate-burst"],
        help: "Burst the client rate limit allows; 0 means one second's worth (at least 1).",
    }
    rate_limit_policy: LimitPolicy = LimitPolicy::Drop => {
        kind: Kind::Policy,
        env: ["PYSTRANDS_RATE_LIMIT_POLICY"],
        flag: ["--rate-limit-policy"],
        help: "For a client over its rate limit: 'drop' the message (counted in rate_limited) or \
               'close' the client (code 1008).",
    }
    /// Accepted forms: `redis://[:password@]host:port/db` or `unix:///path`. See [`crate::cluster`].
    cluster_url: Option<String> = None => {
        kind: Kind::OptStr,
        check: redis_url_rule,
        env: ["PYSTRANDS_REDIS_URL", "PYSTRANDS_CLUSTER_URL"],
        flag: ["--redis-url", "--cluster-url"],
        help: "Redis URL of the cluster this broker joins, e.g. redis://127.0.0.1:6379/0; unset runs \
               alone with no Redis connection at all.",
    }
    cluster_required: bool = true => {
        kind: Kind::Bool,
        env: ["PYSTRANDS_CLUSTER_REQUIRED"],
        flag: ["--cluster-required"],
        help: "With cluster_url: refuse to start when Redis cannot be reached at start (true), or start \
               with local delivery only and keep retrying (false).",
    }
    /// Pub/sub channels ignore the database number of the URL, hence the prefix.
    cluster_name: String = "pystrands".into() => {
        kind: Kind::Str,
        check: name_rule,
        env: ["PYSTRANDS_CLUSTER_NAME"],
        flag: ["--cluster-name"],
        help: "Prefix of every Redis channel and key of the cluster, so several clusters can share one \
               Redis server.",
    }
    cluster_node_id: Option<String> = None => {
        kind: Kind::OptStr,
        check: optional_name_rule,
        env: ["PYSTRANDS_CLUSTER_NODE_ID"],
        flag: ["--cluster-node-id"],
        help: "This node's id in the cluster (unique per running broker); unset picks a random one.",
    }
    inproc_queue_size: usize = 4096 => {
        kind: Kind::int(1, 10_000_000),
        env: ["PYSTRANDS_INPROC_QUEUE_SIZE"],
        flag: ["--inproc-queue-size"],
        help: "Events waiting for an in-process backend above which the broker stops reading the \
               WebSocket clients that feed it until it catches up (backpressure instead of loss).",
    }
    max_rooms_per_client: usize = 100 => {
        kind: Kind::int(1, 100_000),
        env: ["PYSTRANDS_MAX_ROOMS_PER_CLIENT"],
        flag: ["--max-rooms-per-client"],
        help: "Rooms one connection may be in at once (its first room included); a join beyond it is \
               refused and reported to the backend.",
    }
    max_id_length: usize = 256 => {
        kind: Kind::int(1, 65_536),
        env: ["PYSTRANDS_MAX_ID_LENGTH"],
        flag: ["--max-id-length"],
        help: "Longest room or user id in bytes that a backend may set or name; longer ones are refused \
               (an accept with one answers 503 to the client). Client ids are not limited.",
    }
    metrics_bind: Option<String> = None => {
        kind: Kind::OptStr,
        check: optional_socket_addr,
        env: ["PYSTRANDS_METRICS_BIND"],
        flag: ["--metrics-bind"],
        help: "host:port of a separate listener for /health, /ready, /metrics, /stats and /admin \
               (e.g. 127.0.0.1:9090); unset serves them on the WebSocket port.",
    }
    admin_token: Option<String> = None => {
        kind: Kind::Secret,
        check: secret_rule,
        env: ["PYSTRANDS_ADMIN_TOKEN"],
        flag: ["--admin-token"],
        help: "Token of the live admin page GET /admin (Authorization: Bearer, or its login form); \
               unset turns the page off. Prefer the environment variable (flags show in ps).",
    }
    history_size: usize = 0 => {
        kind: Kind::int(0, 100_000),
        env: ["PYSTRANDS_HISTORY_SIZE"],
        flag: ["--history-size"],
        help: "Messages kept per room for recovery after a reconnect (browser protocol pystrands.1) and \
               for backends' room_history; 0 keeps none. A backend's room_config sets it per room.",
    }
    history_ttl: Duration = Duration::from_secs(300) => {
        kind: Kind::Seconds,
        check: positive,
        env: ["PYSTRANDS_HISTORY_TTL"],
        flag: ["--history-ttl"],
        help: "How long a room's history is kept after its last message.",
    }
    history_meta_ttl: Duration = Duration::from_secs(86_400) => {
        kind: Kind::Seconds,
        check: positive,
        env: ["PYSTRANDS_HISTORY_META_TTL"],
        flag: ["--history-meta-ttl"],
        help: "How long a room's stream position (offset and epoch) is kept after its last message, \
               and how long a browser session token can restore rooms.",
    }
    presence_max_members: usize = 100 => {
        kind: Kind::int(0, 1_000_000),
        env: ["PYSTRANDS_PRESENCE_MAX_MEMBERS"],
        flag: ["--presence-max-members"],
        help: "Presence events (rooms with presence on) are not sent for rooms with more members than \
               this on the node (counted in presence_suppressed).",
    }
    session_secret: Option<String> = None => {
        kind: Kind::Secret,
        check: secret_rule,
        env: ["PYSTRANDS_SESSION_SECRET"],
        flag: ["--session-secret"],
        help: "Key that signs browser session tokens (which restore a reconnecting client's rooms); \
               unset: a random key per broker, shared through Redis in a cluster.",
    }
    tls_cert: Option<String> = None => {
        kind: Kind::OptStr,
        check: optional_path_rule,
        env: ["PYSTRANDS_TLS_CERT"],
        flag: ["--tls-cert"],
        help: "PEM certificate chain of the WebSocket listener: with tls_key set, ws_port serves wss:// \
               only (a plain request gets HTTP 400). Reloaded on SIGHUP or when the file changes.",
    }
    tls_key: Option<String> = None => {
        kind: Kind::OptStr,
        check: optional_path_rule,
        env: ["PYSTRANDS_TLS_KEY"],
        flag: ["--tls-key"],
        help: "PEM private key of tls_cert (PKCS#8, PKCS#1 or SEC1).",
    }
    backend_tls_cert: Option<String> = None => {
        kind: Kind::OptStr,
        check: optional_path_rule,
        env: ["PYSTRANDS_BACKEND_TLS_CERT"],
        flag: ["--backend-tls-cert"],
        help: "PEM certificate chain of the backend listener: with backend_tls_key set, backends must \
               connect over TLS (the clients' ssl argument). Reloaded like tls_cert.",
    }
    backend_tls_key: Option<String> = None => {
        kind: Kind::OptStr,
        check: optional_path_rule,
        env: ["PYSTRANDS_BACKEND_TLS_KEY"],
        flag: ["--backend-tls-key"],
        help: "PEM private key of backend_tls_cert.",
    }
    backend_tls_client_ca: Option<String> = None => {
        kind: Kind::OptStr,
        check: optional_path_rule,
        env: ["PYSTRANDS_BACKEND_TLS_CLIENT_CA"],
        flag: ["--backend-tls-client-ca"],
        help: "PEM CA certificates: when set (with backend_tls_cert), a backend must present a client \
               certificate signed by one of them (mutual TLS), else the connection is refused.",
    }
    redis_tls_ca: Option<String> = None => {
        kind: Kind::OptStr,
        check: optional_path_rule,
        env: ["PYSTRANDS_REDIS_TLS_CA"],
        flag: ["--redis-tls-ca"],
        help: "PEM CA certificates that sign the Redis server's certificate for a rediss:// cluster_url; \
               unset trusts the system's CAs.",
    }
    jwt_secret: Option<String> = None => {
        kind: Kind::Secret,
        check: secret_rule,
        env: ["PYSTRANDS_JWT_SECRET"],
        flag: ["--jwt-secret"],
        help: "HMAC key of signed connection tokens (HS256/384/512): a client with a valid token (?token= \
               or Authorization: Bearer) is accepted without asking a backend; a bad token gets HTTP 401.",
    }
    jwt_public_key: Option<String> = None => {
        kind: Kind::OptStr,
        env: ["PYSTRANDS_JWT_PUBLIC_KEY"],
        flag: ["--jwt-public-key"],
        help: "Public key (a PEM file's path, or the PEM text) of signed connection tokens: RSA (RS256/384/512, \
               PS256/384/512), EC (ES256/384) or Ed25519 (EdDSA).",
    }
    jwt_leeway: Duration = Duration::from_secs(5) => {
        kind: Kind::Seconds,
        env: ["PYSTRANDS_JWT_LEEWAY"],
        flag: ["--jwt-leeway"],
        help: "Clock skew allowed on a token's exp and nbf (whole seconds).",
    }
    jwt_audience: Option<String> = None => {
        kind: Kind::OptStr,
        env: ["PYSTRANDS_JWT_AUDIENCE"],
        flag: ["--jwt-audience"],
        help: "When set, a token must carry this aud claim.",
    }
    jwt_issuer: Option<String> = None => {
        kind: Kind::OptStr,
        env: ["PYSTRANDS_JWT_ISSUER"],
        flag: ["--jwt-issuer"],
        help: "When set, a token must carry this iss claim.",
    }
}

// The per-setting checks named in the table (`check:`), run by `Config::validate`.

fn not_blank(setting: &'static str, v: &str) -> Result<(), ConfigError> {
    if v.trim().is_empty() {
        return Err(bad(setting, "''", "must not be empty"));
    }
    Ok(())
}

fn positive(setting: &'static str, d: &Duration) -> Result<(), ConfigError> {
    if d.is_zero() {
        return Err(bad(setting, 0, "must be > 0 seconds"));
    }
    Ok(())
}

fn at_least_10ms(setting: &'static str, d: &Duration) -> Result<(), ConfigError> {
    if *d < Duration::from_millis(10) {
        return Err(bad(setting, d.as_secs_f64(), "must be >= 0.01 seconds"));
    }
    Ok(())
}

fn no_blank_entries(setting: &'static str, v: &[String]) -> Result<(), ConfigError> {
    if v.iter().any(|o| o.trim().is_empty()) {
        return Err(bad(setting, "''", "entries must not be empty"));
    }
    Ok(())
}

fn secret_rule(setting: &'static str, v: &Option<String>) -> Result<(), ConfigError> {
    if let Some(secret) = v {
        if secret.is_empty() || secret.contains(['\n', '\r']) {
            return Err(bad(setting, "<hidden>", "must be a non-empty string without line breaks"));
        }
    }
    Ok(())
}

fn rate_rule(setting: &'static str, v: &f64) -> Result<(), ConfigError> {
    if !v.is_finite() || *v < 0.0 || *v > 1e9 {
        return Err(bad(setting, v, "must be a number of messages per second >= 0 (0 disables)"));
    }
    Ok(())
}

fn redis_url_rule(setting: &'static str, v: &Option<String>) -> Result<(), ConfigError> {
    if let Some(url) = v {
        if url.trim().is_empty() {
            return Err(bad(setting, "''", "must not be empty (leave it unset to run without a cluster)"));
        }
        if let Err(e) = redis::Client::open(url.as_str()) {
            return Err(bad(setting, redact_url(url), &format!("is not a usable Redis URL ({e})")));
        }
    }
    Ok(())
}

fn optional_path_rule(setting: &'static str, v: &Option<String>) -> Result<(), ConfigError> {
    match v.as_deref() {
        Some(p) if p.trim().is_empty() => Err(bad(setting, "''", "must be the path of a PEM file (or unset)")),
        _ => Ok(()),
    }
}

fn name_rule(setting: &'static str, v: &str) -> Result<(), ConfigError> {
    if !valid_name(v) {
        return Err(bad(setting, v, NAME_RULE));
    }
    Ok(())
}

fn optional_socket_addr(setting: &'static str, v: &Option<String>) -> Result<(), ConfigError> {
    match v.as_deref() {
        Some(addr) if addr.parse::<std::net::SocketAddr>().is_err() => {
            Err(bad(setting, addr, "must be host:port with a numeric address, e.g. 127.0.0.1:9090"))
        }
        _ => Ok(()),
    }
}

fn optional_name_rule(setting: &'static str, v: &Option<String>) -> Result<(), ConfigError> {
    v.as_deref().map_or(Ok(()), |id| name_rule(setting, id))
}

fn log_level_rule(setting: &'static str, v: &str) -> Result<(), ConfigError> {
    let level = v.to_ascii_lowercase();
    let directive_ok = v.contains('=') && tracing_subscriber::EnvFilter::try_new(v).is_ok();
    if !LOG_LEVELS.contains(&level.as_str()) && !directive_ok {
        return Err(bad(setting, v, "must be one of error, warn, info, debug, trace"));
    }
    Ok(())
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
    /// Checks every setting; the first bad one is returned. The checks of single settings come
    /// from the table (in its order), then those across settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_each()?;
        if self.ws_port != 0 && self.ws_port == self.tcp_port && self.ws_host == self.tcp_host {
            return Err(bad("tcp_port", self.tcp_port, "must differ from ws_port"));
        }
        let pair = |cert: &'static str, c: &Option<String>, key: &'static str, k: &Option<String>| match (c, k) {
            (Some(_), None) => Err(bad(key, "unset", &format!("must be set with {cert}"))),
            (None, Some(_)) => Err(bad(cert, "unset", &format!("must be set with {key}"))),
            _ => Ok(()),
        };
        pair("tls_cert", &self.tls_cert, "tls_key", &self.tls_key)?;
        pair("backend_tls_cert", &self.backend_tls_cert, "backend_tls_key", &self.backend_tls_key)?;
        if self.backend_tls_client_ca.is_some() && self.backend_tls_cert.is_none() {
            return Err(bad(
                "backend_tls_cert",
                "unset",
                "must be set with backend_tls_client_ca (mutual TLS needs TLS)",
            ));
        }
        if let Some(url) = &self.cluster_url {
            if self.redis_tls_ca.is_some() && !url.starts_with("rediss://") {
                return Err(bad(
                    "redis_tls_ca",
                    self.redis_tls_ca.as_deref().unwrap_or(""),
                    "needs a rediss:// cluster_url",
                ));
            }
        }
        if let Some(key) = &self.jwt_public_key {
            if key.trim().is_empty() {
                return Err(bad("jwt_public_key", "''", "must be a PEM file's path or PEM text (or unset)"));
            }
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
    fn table_rows_are_complete_and_follow_the_naming_rules() {
        let mut names: Vec<_> = settings_table().iter().map(|s| s.name).collect();
        assert_eq!(names.len(), 47);
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), settings_table().len(), "duplicate setting names");
        let defaults = Config::default();
        for s in settings_table() {
            assert!(defaults.get(s.name).is_some(), "{} is not a Config field", s.name);
            let env = format!("PYSTRANDS_{}", s.name.to_ascii_uppercase());
            assert!(s.env.contains(&env.as_str()), "{}: {:?} lacks {env}", s.name, s.env);
            let flag = format!("--{}", s.name.replace('_', "-"));
            let singular = flag.trim_end_matches('s');
            assert!(
                s.flags.contains(&flag.as_str()) || (s.kind == Kind::List && s.flags.contains(&singular)),
                "{}: {:?}",
                s.name,
                s.flags
            );
            assert!(!s.help.is_empty() && !s.help.contains("  "), "{}: help {:?}", s.name, s.help);
            assert_eq!(s.secret(), ["backend_secret", "admin_token", "session_secret", "jwt_secret"].contains(&s.name));
        }
        assert_eq!(setting("queue_size").unwrap().type_name(), "int");
        assert_eq!(setting("request_timeout").unwrap().type_name(), "float seconds");
        assert_eq!(setting("slow_client_policy").unwrap().type_name(), "'close'|'drop'");
        assert!(setting("nope").is_none());
    }

    #[test]
    fn debug_output_hides_secrets() {
        let cfg = Config {
            jwt_secret: Some("s3cr3t-jwt".into()),
            backend_secret: Some("s3cr3t-b".into()),
            ..Config::default()
        };
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("s3cr3t") && shown.contains("jwt_secret: \"<hidden>\""), "{shown}");
        assert!(shown.contains("ws_port: Int(8080)"), "{shown}");
    }

    #[test]
    fn every_setting_round_trips_through_get_and_set() {
        let defaults = Config::default();
        let mut c = Config::default();
        for s in settings_table() {
            c.set(s.name, defaults.get(s.name).unwrap()).unwrap();
            assert_eq!(c.get(s.name), defaults.get(s.name), "{}", s.name);
            if let Kind::Int { min, max, .. } = s.kind {
                // The range of the row fits the Rust type of the field.
                c.set(s.name, Value::Int(min)).unwrap();
                c.set(s.name, Value::Int(max)).unwrap();
                c.set(s.name, defaults.get(s.name).unwrap()).unwrap();
            }
        }
        c.validate().unwrap();
        c.set("request_timeout", Value::Float(2.5)).unwrap();
        assert_eq!(c.request_timeout, Duration::from_millis(2500));
        c.set("slow_client_policy", Value::Str("drop".into())).unwrap();
        assert_eq!(c.slow_client_policy, LimitPolicy::Drop);
        c.set("cluster_node_id", Value::Str("n1".into())).unwrap();
        assert_eq!(c.cluster_node_id.as_deref(), Some("n1"));
        c.set("backend_secret", Value::Str(String::new())).unwrap();
        assert_eq!(c.backend_secret, None, "an empty secret means none");
        c.set("backend_secret", Value::Str("s3cret".into())).unwrap();
        assert_eq!(c.backend_secret.as_deref(), Some("s3cret"));
    }

    #[test]
    fn set_refuses_bad_values_naming_the_setting() {
        let mut c = Config::default();
        let e = c.set("queue_size", Value::Int(-1)).unwrap_err();
        assert_eq!(e.to_string(), "invalid setting queue_size=-1: must be between 0 and 10000000");
        let e = c.set("max_message_size", Value::Int(1 << 40)).unwrap_err();
        assert_eq!(e.to_string(), "invalid setting max_message_size=1099511627776: must be between 16 bytes and 1 GiB");
        let e = c.set("ws_port", Value::Int(70000)).unwrap_err();
        assert_eq!(e.setting, "ws_port");
        let e = c.set("slow_client_policy", Value::Str("explode".into())).unwrap_err();
        assert_eq!(e.to_string(), "invalid setting slow_client_policy=explode: must be 'close' or 'drop'");
        let e = c.set("request_timeout", Value::Float(-1.0)).unwrap_err();
        assert_eq!(e.setting, "request_timeout");
        let e = c.set("backend_secret", Value::Int(12345)).unwrap_err();
        assert!(!e.to_string().contains("12345"), "{e}");
        assert_eq!(c.set("no_such", Value::Int(1)).unwrap_err().value, "no_such");
        assert_eq!(c.set("cluster_required", Value::Int(1)).unwrap_err().setting, "cluster_required");
        // What set accepts, validate may still refuse: the checks of the table rows.
        c.set("client_queue_size", Value::Int(1)).unwrap();
        c.set("log_level", Value::Str("loud".into())).unwrap();
        assert_eq!(c.validate().unwrap_err().setting, "log_level");
    }

    #[test]
    fn defaults_for_humans() {
        let text = |n| setting(n).unwrap().default_text();
        assert_eq!(text("request_timeout"), "10 s");
        assert_eq!(text("max_message_size"), "4194304 (4 MiB)");
        assert_eq!(text("queue_size"), "1000");
        assert_eq!(text("cluster_url"), "unset");
        assert_eq!(text("allowed_origins"), "empty");
        assert_eq!(text("cluster_required"), "true");
        assert_eq!(text("rate_limit_policy"), "drop");
        assert_eq!(text("client_rate_limit"), "0");
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
