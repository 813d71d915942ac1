//! PyStrands broker core: WebSocket clients on one side, Python backends (TCP, newline-delimited
//! JSON, protocol v1 or the negotiated v2) on the other, rooms and routing in between. Pure Rust; the PyO3 binding in
//! `rust/py` only converts settings, starts and stops a [`BrokerHandle`] and reads its stats.
//!
//! Layout, in dependency order (each module uses only those before it, plus the `Shared`
//! state defined here):
//!
//! * `config` (settings; public), `protocol` (backend wire format; public for the fuzz tests),
//!   `stats` (counters), `shutdown` (stop signal, task groups), `throttle` (rate limit, backoff,
//!   rate-limited logging), `http` (upgrade handshake) — leaves, none uses another module.
//! * `hub` (clients and rooms — the only state the WebSocket and backend sides share).
//! * `outbox` (one backend's bounded queue of lines: filled by the router, drained by the
//!   backend's writer).
//! * `router` (backend selection, sticky pinning, redelivery, the no-backend queue, pending
//!   connection requests: a state machine behind one lock).
//! * `cluster` (several brokers as one, over Redis: `envelope`, `publisher`, `subscriber`,
//!   `presence`).
//! * `delivery` (backend sends to a client, a room or everyone: the hub, then the cluster).
//! * `ws` (WebSocket connections) and `backend` (backend sessions, hello, writer) — the two
//!   listeners, on top of everything else.
//! * `inproc` (the in-process backend transport: a backend in this process, no socket; it reuses
//!   `backend`'s line handling).

mod admin;
mod backend;
mod browser;
mod client_js;
mod cluster;
pub mod config;
mod delivery;
#[doc(hidden)]
pub mod fuzzing;
mod history;
mod http;
mod hub;
mod inproc;
mod metrics;
mod outbox;
pub mod protocol;
mod resume;
mod router;
mod shutdown;
mod stats;
mod throttle;
mod tls;
mod token;
mod ws;

pub use config::{Config, ConfigError, LimitPolicy, SlowClientPolicy};
pub use inproc::{InprocLink, Status as InprocStatus};
pub use stats::{ClusterStats, Stats};

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;

/// Accepts connections until `stop` fires, running `serve` for each in its own task. Each task
/// holds a clone of `guard`, so shutdown can wait for the connections to finish.
pub(crate) async fn accept_loop<F, Fut>(
    listener: TcpListener,
    what: &'static str,
    mut stop: shutdown::Signal,
    guard: shutdown::TaskGuard,
    serve: F,
) where
    F: Fn(tokio::net::TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, addr)) => {
                    let conn = serve(stream, addr);
                    let guard = guard.clone();
                    tokio::spawn(async move {
                        conn.await;
                        drop(guard);
                    });
                }
                Err(e) => {
                    // Typically out of file descriptors: back off instead of spinning.
                    tracing::error!(error = %e, "{what} listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.fired() => break,
        }
    }
}

/// State every task of one broker shares.
pub(crate) struct Shared {
    pub(crate) cfg: Config,
    pub(crate) hub: hub::Hub,
    pub(crate) counters: Arc<stats::Counters>,
    pub(crate) router: router::Router,
    pub(crate) gauges: Arc<router::Gauges>,
    /// Set when this broker is a node of a cluster (`cluster_url`).
    pub(crate) cluster: Option<cluster::Cluster>,
    /// The broker's runtime, for work started from threads outside it (in-process backends).
    pub(crate) runtime: tokio::runtime::Handle,
    /// Every room's own settings, and (alone) the rooms' history.
    pub(crate) rooms: history::Rooms,
    /// The key of browser session tokens (`session_secret`, a random one, or the cluster's).
    pub(crate) session_key: parking_lot::RwLock<Arc<browser::SessionKey>>,
    /// TLS of the WebSocket listener (`tls_cert`), of the backend listener (`backend_tls_cert`).
    pub(crate) tls: Option<Arc<tls::Tls>>,
    pub(crate) backend_tls: Option<Arc<tls::Tls>>,
    /// Checks signed connection tokens (`jwt_secret`, `jwt_public_key`).
    pub(crate) tokens: Option<token::Verifier>,
    ids: AtomicU64,
    stopping: AtomicBool,
}

impl Shared {
    /// A number unique within this broker (request ids, connection ids).
    pub(crate) fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }
}

/// Forgets expired room history now and then, until the broker stops.
async fn sweep_history(shared: Arc<Shared>, mut stop: shutdown::Signal) {
    let mut every = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = every.tick() => shared.rooms.sweep(),
            _ = stop.fired() => return,
        }
    }
}

/// Why a broker could not start.
#[derive(Debug)]
pub enum StartError {
    Config(ConfigError),
    /// A listener could not bind (`which` is `ws_port` or `tcp_port`).
    Bind {
        which: &'static str,
        addr: String,
        source: std::io::Error,
    },
    Runtime(std::io::Error),
    /// Redis (`cluster_url`) could not be reached and `cluster_required` is set.
    Cluster(String),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Config(e) => e.fmt(f),
            StartError::Bind { which, addr, source } => write!(f, "cannot listen on {addr} ({which}): {source}"),
            StartError::Runtime(e) => write!(f, "cannot start the async runtime: {e}"),
            StartError::Cluster(e) => {
                write!(f, "{e} (set cluster_required=false to start without it and keep retrying)")
            }
        }
    }
}

impl std::error::Error for StartError {}

/// Installs the `tracing` subscriber (stderr) once per process. The level of the first broker
/// started wins; later calls keep the existing subscriber.
/// The `tracing` filter directive of a `log_level` setting: a plain level applies to the broker's
/// own records (other crates stay at `warn`); anything else is used as a directive as it is.
pub fn log_directive(level: &str) -> String {
    if config::LOG_LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
        format!("warn,pystrands_core={level}")
    } else {
        level.to_string()
    }
}

/// Logs to stderr, unless the process already has a `tracing` subscriber (the Python binding
/// installs one that hands records to Python's `logging`).
pub(crate) fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(log_directive(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// Warns when the backend port, a control plane that can broadcast and kick, is reachable from
/// other machines with nothing to keep strangers out.
fn warn_if_exposed(cfg: &Config, tcp_addr: SocketAddr) {
    let guarded = cfg.backend_secret.is_some() || cfg.backend_tls_client_ca.is_some();
    if !tcp_addr.ip().is_loopback() && !guarded {
        tracing::warn!(
            backends = %tcp_addr,
            "the backend port listens beyond loopback with neither backend_secret nor backend_tls_client_ca: \
             anyone who reaches it can send to every client and kick them; set one, or tcp_host=127.0.0.1"
        );
    }
    if !tcp_addr.ip().is_loopback() && cfg.backend_secret.is_some() && cfg.backend_tls_cert.is_none() {
        tracing::warn!(
            backends = %tcp_addr,
            "backend_secret crosses the network in clear text (no backend_tls_cert)"
        );
    }
}

/// A running broker. Dropping it stops it (with a short drain).
pub struct BrokerHandle {
    runtime: Option<Runtime>,
    shared: Arc<Shared>,
    ws_addr: SocketAddr,
    tcp_addr: SocketAddr,
    stop_listeners: shutdown::Trigger,
    clients: shutdown::TaskGroup,
    backends: shutdown::TaskGroup,
    stop_cluster: shutdown::Trigger,
    cluster_tasks: shutdown::TaskGroup,
    links: inproc::Links,
    /// Set once [`stop_clients`](Self::stop_clients) ran.
    clients_stopped: bool,
}

impl BrokerHandle {
    /// Validates `cfg`, binds both listeners and starts serving in a runtime of its own.
    /// Returns once both listeners are bound.
    pub fn start(cfg: Config) -> Result<BrokerHandle, StartError> {
        cfg.validate().map_err(StartError::Config)?;
        init_logging(&cfg.log_level);
        tls::install_crypto_provider();
        let ws_tls = tls::Source::websocket(&cfg).map(tls::Tls::load).transpose().map_err(StartError::Config)?;
        let backend_tls = tls::Source::backend(&cfg).map(tls::Tls::load).transpose().map_err(StartError::Config)?;
        let tokens = token::Verifier::from_config(&cfg).map_err(StartError::Config)?;
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if cfg.workers > 0 {
            builder.worker_threads(cfg.workers);
        }
        let runtime = builder.thread_name("pystrands-broker").enable_all().build().map_err(StartError::Runtime)?;

        let ws_bind = format!("{}:{}", cfg.ws_host, cfg.ws_port);
        let tcp_bind = format!("{}:{}", cfg.tcp_host, cfg.tcp_port);
        let (ws_listener, tcp_listener) = runtime.block_on(async {
            let ws = TcpListener::bind(&ws_bind).await.map_err(|source| StartError::Bind {
                which: "ws_port",
                addr: ws_bind.clone(),
                source,
            })?;
            let tcp = TcpListener::bind(&tcp_bind).await.map_err(|source| StartError::Bind {
                which: "tcp_port",
                addr: tcp_bind.clone(),
                source,
            })?;
            Ok::<_, StartError>((ws, tcp))
        })?;
        let metrics_listener = match &cfg.metrics_bind {
            None => None,
            Some(addr) => Some(runtime.block_on(TcpListener::bind(addr)).map_err(|source| StartError::Bind {
                which: "metrics_bind",
                addr: addr.clone(),
                source,
            })?),
        };
        let ws_addr = ws_listener.local_addr().map_err(StartError::Runtime)?;
        let tcp_addr = tcp_listener.local_addr().map_err(StartError::Runtime)?;
        warn_if_exposed(&cfg, tcp_addr);

        let counters = Arc::new(stats::Counters::default());
        let (cluster, cluster_starter) = match &cfg.cluster_url {
            None => (None, None),
            Some(_) => {
                let (c, mut starter) = cluster::build(&cfg, counters.clone()).map_err(StartError::Cluster)?;
                if let Err(e) = runtime.block_on(starter.connect()) {
                    if cfg.cluster_required {
                        return Err(StartError::Cluster(e));
                    }
                    tracing::warn!("{e}; starting without the cluster (cluster_required=false): local delivery only until Redis is reachable");
                }
                tracing::info!(node_id = starter.node_id(), redis = %cfg.cluster_url_redacted().unwrap_or_default(), "cluster node");
                (Some(c), Some(starter))
            }
        };
        let gauges = Arc::new(router::Gauges::default());
        let limits = router::Limits {
            queue_size: cfg.queue_size,
            max_unacked: cfg.max_unacked,
            max_id_length: cfg.max_id_length,
        };
        let router = router::Router::new(limits, counters.clone(), gauges.clone());
        let shared_key = cluster_starter.as_ref().and_then(|s| s.session_key());
        let session_key = match (&cfg.session_secret, shared_key) {
            (Some(secret), _) => browser::SessionKey::new(secret.as_bytes()),
            (None, Some(key)) => browser::SessionKey::new(key),
            (None, None) => browser::SessionKey::random(),
        };
        let shared = Arc::new(Shared {
            hub: hub::Hub::new(cfg.slow_client_policy, counters.clone()),
            rooms: history::Rooms::new(&cfg),
            session_key: parking_lot::RwLock::new(Arc::new(session_key)),
            cfg,
            counters: counters.clone(),
            router,
            gauges: gauges.clone(),
            cluster,
            runtime: runtime.handle().clone(),
            tls: ws_tls,
            backend_tls,
            tokens,
            ids: AtomicU64::new(1),
            stopping: AtomicBool::new(false),
        });
        let (stop_listeners, listeners_sig) = shutdown::signal();
        let (stop_cluster, cluster_sig) = shutdown::signal();
        let clients = shutdown::TaskGroup::default();
        let backends = shutdown::TaskGroup::default();
        let cluster_tasks = shutdown::TaskGroup::default();
        {
            let _enter = runtime.enter();
            if let Some(starter) = cluster_starter {
                starter.spawn(shared.clone(), cluster_sig, cluster_tasks.guard());
            }
            tokio::spawn(ws::listen(ws_listener, shared.clone(), listeners_sig.clone(), clients.guard()));
            tokio::spawn(sweep_history(shared.clone(), listeners_sig.clone()));
            let reloadable: Vec<_> = shared.tls.iter().chain(shared.backend_tls.iter()).cloned().collect();
            if !reloadable.is_empty() {
                tokio::spawn(tls::watch(reloadable, counters.clone(), listeners_sig.clone()));
            }
            if let Some(listener) = metrics_listener {
                tokio::spawn(metrics::listen(listener, shared.clone(), listeners_sig.clone(), clients.guard()));
            }
            tokio::spawn(backend::listen(tcp_listener, shared.clone(), listeners_sig, backends.guard()));
        }
        tracing::info!(
            websocket = %ws_addr,
            backends = %tcp_addr,
            wss = shared.tls.is_some(),
            backend_tls = shared.backend_tls.is_some(),
            tokens = shared.tokens.is_some(),
            "PyStrands broker listening"
        );
        Ok(BrokerHandle {
            runtime: Some(runtime),
            shared,
            ws_addr,
            tcp_addr,
            stop_listeners,
            clients,
            backends,
            stop_cluster,
            cluster_tasks,
            links: inproc::Links::default(),
            clients_stopped: false,
        })
    }

    /// Attaches a backend that runs in this process (see [`InprocLink`]); `Err` when the broker
    /// is stopping or stopped. The link registers with the router on its first line (`hello`).
    pub fn attach_backend(&self) -> Result<InprocLink, String> {
        if self.runtime.is_none() || self.shared.stopping() {
            return Err("the broker is not running".to_string());
        }
        let guard = self.backends.try_guard().ok_or_else(|| "the broker is stopping".to_string())?;
        let runtime = self.runtime.as_ref().ok_or_else(|| "the broker is not running".to_string())?;
        InprocLink::open(self.shared.clone(), guard, &self.links, runtime.handle())
            .map_err(|e| format!("cannot create the in-process wake-up: {e}"))
    }

    /// The in-process links that are open now.
    pub fn inproc_links(&self) -> Vec<InprocLink> {
        self.links.snapshot()
    }

    /// The first half of [`stop`](Self::stop), for in-process backends: listeners close,
    /// clients get close 1001 and their last events are routed, then routing stops and every
    /// backend is told to finish. In-process backends then drain what they were sent, close
    /// their links, and `stop` does the rest. Waits at most `timeout` for the clients.
    pub fn stop_clients(&mut self, timeout: Duration) {
        if self.runtime.is_none() || self.clients_stopped {
            return;
        }
        self.clients_stopped = true;
        tracing::info!("PyStrands broker stopping");
        self.shared.stopping.store(true, Ordering::Release);
        self.stop_listeners.fire();
        self.shared.hub.kick_all(protocol::CLOSE_GOING_AWAY);
        let clients = &mut self.clients;
        if let Some(runtime) = &self.runtime {
            runtime.block_on(async {
                if tokio::time::timeout(timeout, clients.wait()).await.is_err() {
                    tracing::warn!("some clients did not close in time");
                }
            });
        }
        self.shared.router.stop();
    }

    pub fn ws_addr(&self) -> SocketAddr {
        self.ws_addr
    }

    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp_addr
    }

    pub fn is_running(&self) -> bool {
        self.runtime.is_some()
    }

    pub fn stats(&self) -> Stats {
        metrics::snapshot(&self.shared)
    }

    /// Room → number of members: on every live node of the cluster (other nodes' counts as of
    /// their last presence report), or on this broker when it runs alone.
    pub fn room_members(&self) -> Vec<(String, usize)> {
        match &self.shared.cluster {
            Some(c) => c.room_members(&self.shared.hub).into_iter().collect(),
            None => self.shared.hub.room_sizes().1.into_iter().map(|(r, n)| (r.to_string(), n)).collect(),
        }
    }

    /// Stops the broker: listeners close, clients get close 1001, their last events and anything
    /// else queued for backends is flushed, then backend connections close. Waits at most
    /// `timeout` in all; whatever is still running then is dropped. Calling it twice is harmless.
    pub fn stop(&mut self, timeout: Duration) {
        if self.runtime.is_none() {
            return;
        }
        let deadline = Instant::now() + timeout;
        let left = move || deadline.saturating_duration_since(Instant::now());
        self.stop_clients(left());
        let Some(runtime) = self.runtime.take() else { return };
        let backends = &mut self.backends;
        let stop_cluster = &self.stop_cluster;
        let cluster_tasks = &mut self.cluster_tasks;
        runtime.block_on(async {
            if tokio::time::timeout(left(), backends.wait()).await.is_err() {
                tracing::warn!("some backend connections did not finish flushing in time");
            }
            // Last: what backends sent is published, and this node leaves the cluster's presence.
            stop_cluster.fire();
            if tokio::time::timeout(left(), cluster_tasks.wait()).await.is_err() {
                tracing::warn!("the cluster connection did not finish in time");
            }
        });
        self.links.close_all();
        runtime.shutdown_timeout(left().max(Duration::from_millis(100)));
        tracing::info!("PyStrands broker stopped");
    }
}

impl Drop for BrokerHandle {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(2));
    }
}
