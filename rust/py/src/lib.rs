//! `pystrands._core`: the thin PyO3 binding of the broker core. It converts a settings dict into
//! a validated [`Config`], starts and stops a [`BrokerHandle`] with the GIL released, and reads
//! its stats. No Python is ever called from the broker's tokio threads.

use pyo3::exceptions::{PyConnectionError, PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use pystrands_core::config::{seconds, ConfigError};
use pystrands_core::{BrokerHandle, Config, LimitPolicy, StartError};
use std::sync::Mutex;
use std::time::Duration;

fn value_error(e: ConfigError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

fn invalid(setting: &'static str, value: impl std::fmt::Display, reason: &str) -> PyErr {
    value_error(ConfigError { setting, value: value.to_string(), reason: reason.to_string() })
}

fn int(setting: &'static str, v: &Bound<'_, PyAny>, min: i64, max: i64) -> PyResult<i64> {
    if v.is_instance_of::<pyo3::types::PyBool>() {
        return Err(invalid(setting, v, "must be an integer"));
    }
    let n: i64 = v
        .extract()
        .map_err(|_| invalid(setting, v.repr().map(|r| r.to_string()).unwrap_or_default(), "must be an integer"))?;
    if n < min || n > max {
        return Err(invalid(setting, n, &format!("must be between {min} and {max}")));
    }
    Ok(n)
}

fn secs(setting: &'static str, v: &Bound<'_, PyAny>) -> PyResult<Duration> {
    if v.is_instance_of::<pyo3::types::PyBool>() {
        return Err(invalid(setting, v, "must be a number of seconds"));
    }
    let f: f64 = v.extract().map_err(|_| {
        invalid(setting, v.repr().map(|r| r.to_string()).unwrap_or_default(), "must be a number of seconds")
    })?;
    seconds(setting, f).map_err(value_error)
}

fn string(setting: &'static str, v: &Bound<'_, PyAny>) -> PyResult<String> {
    v.extract().map_err(|_| invalid(setting, v.repr().map(|r| r.to_string()).unwrap_or_default(), "must be a string"))
}

fn boolean(setting: &'static str, v: &Bound<'_, PyAny>) -> PyResult<bool> {
    if !v.is_instance_of::<pyo3::types::PyBool>() {
        return Err(invalid(setting, v.repr().map(|r| r.to_string()).unwrap_or_default(), "must be True or False"));
    }
    v.extract()
}

/// Builds a validated [`Config`] from keyword settings (unknown names are refused).
fn config_from(settings: Option<&Bound<'_, PyDict>>) -> PyResult<Config> {
    let mut c = Config::default();
    let Some(settings) = settings else { return Ok(c) };
    for (k, v) in settings.iter() {
        let key: String = k.extract()?;
        if v.is_none() {
            continue; // None means "the default"
        }
        match key.as_str() {
            "ws_host" => c.ws_host = string("ws_host", &v)?,
            "tcp_host" => c.tcp_host = string("tcp_host", &v)?,
            "ws_port" => c.ws_port = int("ws_port", &v, 0, 65535)? as u16,
            "tcp_port" => c.tcp_port = int("tcp_port", &v, 0, 65535)? as u16,
            "queue_size" => c.queue_size = int("queue_size", &v, 0, 10_000_000)? as usize,
            "request_timeout" => c.request_timeout = secs("request_timeout", &v)?,
            "heartbeat_interval" => c.heartbeat_interval = secs("heartbeat_interval", &v)?,
            "ping_interval" => c.ping_interval = secs("ping_interval", &v)?,
            "handshake_timeout" => c.handshake_timeout = secs("handshake_timeout", &v)?,
            "max_message_size" => c.max_message_size = int("max_message_size", &v, 0, i64::MAX)? as usize,
            "max_line_size" => c.max_line_size = int("max_line_size", &v, 0, i64::MAX)? as usize,
            "client_queue_size" => c.client_queue_size = int("client_queue_size", &v, 0, i64::MAX)? as usize,
            "max_connections" => c.max_connections = int("max_connections", &v, 0, i64::MAX)? as usize,
            "workers" => c.workers = int("workers", &v, 0, 1024)? as usize,
            "log_level" => c.log_level = string("log_level", &v)?,
            "cluster_url" => c.cluster_url = Some(string("cluster_url", &v)?),
            "cluster_required" => c.cluster_required = boolean("cluster_required", &v)?,
            "cluster_name" => c.cluster_name = string("cluster_name", &v)?,
            "cluster_node_id" => c.cluster_node_id = Some(string("cluster_node_id", &v)?),
            "slow_client_policy" => {
                let s = string("slow_client_policy", &v)?;
                c.slow_client_policy = LimitPolicy::parse(&s)
                    .ok_or_else(|| invalid("slow_client_policy", &s, "must be 'close' or 'drop'"))?;
            }
            "rate_limit_policy" => {
                let s = string("rate_limit_policy", &v)?;
                c.rate_limit_policy = LimitPolicy::parse(&s)
                    .ok_or_else(|| invalid("rate_limit_policy", &s, "must be 'close' or 'drop'"))?;
            }
            "backend_secret" => {
                let s = v.extract::<String>().map_err(|_| invalid("backend_secret", "<hidden>", "must be a string"))?;
                // An empty secret (e.g. an unset environment variable) means none.
                c.backend_secret = (!s.is_empty()).then_some(s);
            }
            "max_unacked" => c.max_unacked = int("max_unacked", &v, 0, i64::MAX)? as usize,
            "client_rate_burst" => c.client_rate_burst = int("client_rate_burst", &v, 0, u32::MAX as i64)? as u32,
            "client_rate_limit" => {
                if v.is_instance_of::<pyo3::types::PyBool>() {
                    return Err(invalid("client_rate_limit", &v, "must be a number of messages per second"));
                }
                c.client_rate_limit = v.extract().map_err(|_| {
                    invalid(
                        "client_rate_limit",
                        v.repr().map(|r| r.to_string()).unwrap_or_default(),
                        "must be a number of messages per second",
                    )
                })?;
            }
            "allowed_origins" => {
                if v.is_instance_of::<pyo3::types::PyString>() {
                    return Err(invalid("allowed_origins", v, "must be a list of origins, not a string"));
                }
                c.allowed_origins = v.extract().map_err(|_| {
                    invalid(
                        "allowed_origins",
                        v.repr().map(|r| r.to_string()).unwrap_or_default(),
                        "must be a list of strings",
                    )
                })?;
            }
            other => return Err(PyTypeError::new_err(format!("unknown broker setting {other:?}"))),
        }
    }
    c.validate().map_err(value_error)?;
    Ok(c)
}

/// The defaults of every setting, as the Python `Broker` and CLI expose them.
#[pyfunction]
fn default_settings(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let c = Config::default();
    let d = PyDict::new(py);
    d.set_item("ws_host", &c.ws_host)?;
    d.set_item("ws_port", c.ws_port)?;
    d.set_item("tcp_host", &c.tcp_host)?;
    d.set_item("tcp_port", c.tcp_port)?;
    d.set_item("queue_size", c.queue_size)?;
    d.set_item("request_timeout", c.request_timeout.as_secs_f64())?;
    d.set_item("heartbeat_interval", c.heartbeat_interval.as_secs_f64())?;
    d.set_item("ping_interval", c.ping_interval.as_secs_f64())?;
    d.set_item("handshake_timeout", c.handshake_timeout.as_secs_f64())?;
    d.set_item("max_message_size", c.max_message_size)?;
    d.set_item("max_line_size", c.max_line_size)?;
    d.set_item("client_queue_size", c.client_queue_size)?;
    d.set_item("slow_client_policy", c.slow_client_policy.as_str())?;
    d.set_item("allowed_origins", c.allowed_origins.clone())?;
    d.set_item("max_connections", c.max_connections)?;
    d.set_item("workers", c.workers)?;
    d.set_item("log_level", &c.log_level)?;
    d.set_item("backend_secret", c.backend_secret.clone())?;
    d.set_item("max_unacked", c.max_unacked)?;
    d.set_item("client_rate_limit", c.client_rate_limit)?;
    d.set_item("client_rate_burst", c.client_rate_burst)?;
    d.set_item("rate_limit_policy", c.rate_limit_policy.as_str())?;
    d.set_item("cluster_url", c.cluster_url.clone())?;
    d.set_item("cluster_required", c.cluster_required)?;
    d.set_item("cluster_name", &c.cluster_name)?;
    d.set_item("cluster_node_id", c.cluster_node_id.clone())?;
    Ok(d)
}

/// A native broker: `NativeBroker(**settings)`, then `start()`, `stats()`, `stop(timeout)`.
#[pyclass(module = "pystrands._core")]
struct NativeBroker {
    config: Config,
    handle: Mutex<Option<BrokerHandle>>,
}

impl NativeBroker {
    fn with_handle<T>(&self, f: impl FnOnce(&BrokerHandle) -> T) -> Option<T> {
        self.handle.lock().ok()?.as_ref().map(f)
    }
}

#[pymethods]
impl NativeBroker {
    #[new]
    #[pyo3(signature = (**settings))]
    fn new(settings: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        Ok(NativeBroker { config: config_from(settings)?, handle: Mutex::new(None) })
    }

    /// Binds both listeners and starts serving in background threads; returns once bound.
    fn start(&self, py: Python<'_>) -> PyResult<()> {
        let mut guard = self.handle.lock().map_err(|_| PyRuntimeError::new_err("broker state poisoned"))?;
        if guard.as_ref().is_some_and(|h| h.is_running()) {
            return Err(PyRuntimeError::new_err("broker is already running"));
        }
        let cfg = self.config.clone();
        let handle = py.detach(move || BrokerHandle::start(cfg)).map_err(|e| match e {
            StartError::Config(c) => value_error(c),
            StartError::Cluster(_) => PyConnectionError::new_err(e.to_string()),
            StartError::Bind { .. } | StartError::Runtime(_) => PyOSError::new_err(e.to_string()),
        })?;
        *guard = Some(handle);
        Ok(())
    }

    /// Stops serving: close 1001 to clients, flush backends; waits at most `timeout` seconds.
    #[pyo3(signature = (timeout = 5.0))]
    fn stop(&self, py: Python<'_>, timeout: f64) -> PyResult<()> {
        let timeout = seconds("timeout", timeout).map_err(value_error)?;
        let handle = self.handle.lock().map_err(|_| PyRuntimeError::new_err("broker state poisoned"))?.take();
        if let Some(mut h) = handle {
            py.detach(move || h.stop(timeout));
        }
        Ok(())
    }

    #[getter]
    fn running(&self) -> bool {
        self.with_handle(|h| h.is_running()).unwrap_or(false)
    }

    /// The bound WebSocket port, or None when not running.
    #[getter]
    fn ws_port(&self) -> Option<u16> {
        self.with_handle(|h| h.ws_addr().port())
    }

    /// The bound backend (TCP) port, or None when not running.
    #[getter]
    fn tcp_port(&self) -> Option<u16> {
        self.with_handle(|h| h.tcp_addr().port())
    }

    /// Clients, rooms, backends, queued events, pending requests and every counter; in a
    /// cluster also `cluster_node_id`, `cluster_connected`, `cluster_nodes`, `cluster_clients`
    /// and `cluster_rooms`.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        if let Some(s) = self.with_handle(|h| h.stats()) {
            d.set_item("clients", s.clients)?;
            d.set_item("rooms", s.rooms)?;
            d.set_item("backends", s.backends)?;
            d.set_item("queued_events", s.queued_events)?;
            d.set_item("pending_requests", s.pending_requests)?;
            d.set_item("unacked_events", s.unacked_events)?;
            for (name, value) in s.counters {
                d.set_item(name, value)?;
            }
            if let Some(c) = s.cluster {
                d.set_item("cluster_node_id", c.node_id)?;
                d.set_item("cluster_connected", c.connected)?;
                d.set_item("cluster_nodes", c.nodes)?;
                d.set_item("cluster_clients", c.clients)?;
                d.set_item("cluster_rooms", c.rooms)?;
            }
        }
        Ok(d)
    }

    /// Room → members, cluster-wide in a cluster (empty when not running).
    fn room_members<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (room, n) in self.with_handle(|h| h.room_members()).unwrap_or_default() {
            d.set_item(room, n)?;
        }
        Ok(d)
    }
}

impl Drop for NativeBroker {
    fn drop(&mut self) {
        if let Ok(mut g) = self.handle.lock() {
            if let Some(mut h) = g.take() {
                h.stop(Duration::from_secs(2));
            }
        }
    }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativeBroker>()?;
    m.add_function(wrap_pyfunction!(default_settings, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
