//! `pystrands._core`: the thin PyO3 binding of the broker core. It converts a settings dict into
//! a validated [`Config`], starts and stops a [`BrokerHandle`] with the GIL released, and reads
//! its stats. No Python is ever called from the broker's tokio threads.
//! `codec` and `encode` add the optional native codec of the Python clients (`LineDecoder`, the
//! three send encoders); `inproc` the link of a backend running in this process (`InprocLink`).

mod codec;
mod encode;
mod inproc;
mod logbridge;

use pyo3::exceptions::{PyConnectionError, PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyList, PyString};
use pystrands_core::config::{self, seconds, ConfigError, Kind, SettingInfo, Value};
use pystrands_core::{BrokerHandle, Config, StartError};
use std::sync::Mutex;
use std::time::Duration;

fn value_error(e: ConfigError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

fn invalid(setting: &'static str, value: impl std::fmt::Display, reason: &str) -> PyErr {
    value_error(ConfigError { setting, value: value.to_string(), reason: reason.to_string() })
}

/// A Python value of the setting `info` as a [`Value`]: one conversion per [`Kind`]. Ranges,
/// policies and the other rules are checked by [`Config::set`] and [`Config::validate`].
fn to_value(info: &SettingInfo, v: &Bound<'_, PyAny>) -> PyResult<Value> {
    let setting = info.name;
    let refuse = |reason: &str| invalid(setting, v.repr().map(|r| r.to_string()).unwrap_or_default(), reason);
    let is_bool = v.is_instance_of::<PyBool>();
    Ok(match info.kind {
        Kind::Int { .. } => {
            if is_bool {
                return Err(refuse("must be an integer"));
            }
            Value::Int(v.extract().map_err(|_| refuse("must be an integer"))?)
        }
        Kind::Seconds | Kind::Float { .. } => {
            let reason = match info.kind {
                Kind::Float { unit } => format!("must be a number of {unit}"),
                _ => "must be a number of seconds".to_string(),
            };
            if is_bool {
                return Err(refuse(&reason));
            }
            Value::Float(v.extract().map_err(|_| refuse(&reason))?)
        }
        Kind::Str | Kind::OptStr | Kind::Policy => Value::Str(v.extract().map_err(|_| refuse("must be a string"))?),
        Kind::Secret => Value::Str(v.extract().map_err(|_| invalid(setting, "<hidden>", "must be a string"))?),
        Kind::Bool => {
            if !is_bool {
                return Err(refuse("must be True or False"));
            }
            Value::Bool(v.extract()?)
        }
        Kind::List => {
            if v.is_instance_of::<PyString>() {
                return Err(refuse("must be a list of strings, not a string"));
            }
            Value::List(v.extract().map_err(|_| refuse("must be a list of strings"))?)
        }
    })
}

/// A [`Value`] as a Python object.
fn to_py<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Value::None => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Int(n) => n.into_pyobject(py)?.into_any(),
        Value::Float(x) => x.into_pyobject(py)?.into_any(),
        Value::Str(s) => PyString::new(py, s).into_any(),
        Value::List(l) => PyList::new(py, l)?.into_any(),
    })
}

/// Builds a validated [`Config`] from keyword settings, walking the settings table (unknown
/// names are refused with `TypeError`; `None` means the default).
fn config_from(settings: Option<&Bound<'_, PyDict>>) -> PyResult<Config> {
    let mut c = Config::default();
    let Some(settings) = settings else { return Ok(c) };
    for (k, v) in settings.iter() {
        let key: String = k.extract()?;
        let Some(info) = config::setting(&key) else {
            return Err(PyTypeError::new_err(format!("unknown broker setting {key:?}")));
        };
        if v.is_none() {
            continue; // None means "the default"
        }
        c.set(info.name, to_value(info, &v)?).map_err(value_error)?;
    }
    c.validate().map_err(value_error)?;
    Ok(c)
}

/// The defaults of every setting, as the Python `Broker` and CLI expose them.
#[pyfunction]
fn default_settings(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    for info in config::settings_table() {
        d.set_item(info.name, to_py(py, &info.default_value())?)?;
    }
    Ok(d)
}

/// Every setting, in table order: a dict with `name`, `type` (e.g. `"float seconds"`), `kind`
/// (`int`, `seconds`, `float`, `str`, `optional_str`, `bool`, `list`, `policy`, `secret`),
/// `default`, `default_text` (for humans), `help`, `env` and `flag` (the documented
/// environment variable and CLI flag), `envs` and `flags` (with their aliases), `secret`.
#[pyfunction]
fn settings_table(py: Python<'_>) -> PyResult<Bound<'_, PyList>> {
    let rows = PyList::empty(py);
    for info in config::settings_table() {
        let d = PyDict::new(py);
        d.set_item("name", info.name)?;
        d.set_item("type", info.type_name())?;
        d.set_item("kind", info.kind.id())?;
        d.set_item("default", to_py(py, &info.default_value())?)?;
        d.set_item("default_text", info.default_text())?;
        d.set_item("help", info.help)?;
        d.set_item("env", info.env[0])?;
        d.set_item("envs", info.env.to_vec())?;
        d.set_item("flag", info.flags[0])?;
        d.set_item("flags", info.flags.to_vec())?;
        d.set_item("secret", info.secret())?;
        rows.append(d)?;
    }
    Ok(rows)
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
        // The lock is taken and released without the GIL: the getters (`running`, `stats`, ...)
        // lock it while holding the GIL, so holding it while waiting for the GIL deadlocks.
        let cfg = self.config.clone();
        let slot = &self.handle;
        py.detach(move || {
            let mut guard = slot.lock().map_err(|_| PyRuntimeError::new_err("broker state poisoned"))?;
            if guard.as_ref().is_some_and(|h| h.is_running()) {
                return Err(PyRuntimeError::new_err("broker is already running"));
            }
            logbridge::install(&cfg.log_level);
            let handle = BrokerHandle::start(cfg).map_err(|e| match e {
                StartError::Config(c) => value_error(c),
                StartError::Cluster(_) => PyConnectionError::new_err(e.to_string()),
                StartError::Bind { .. } | StartError::Runtime(_) => PyOSError::new_err(e.to_string()),
            })?;
            *guard = Some(handle);
            Ok(())
        })
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

    /// First half of `stop` for in-process backends: clients are closed (1001) and their last
    /// events routed, then routing stops; the links then drain and close, and `stop` finishes.
    #[pyo3(signature = (timeout = 5.0))]
    fn stop_clients(&self, py: Python<'_>, timeout: f64) -> PyResult<()> {
        let timeout = seconds("timeout", timeout).map_err(value_error)?;
        let taken = self.handle.lock().map_err(|_| PyRuntimeError::new_err("broker state poisoned"))?.take();
        let Some(mut h) = taken else { return Ok(()) };
        let h = py.detach(move || {
            h.stop_clients(timeout);
            h
        });
        let mut guard = self.handle.lock().map_err(|_| PyRuntimeError::new_err("broker state poisoned"))?;
        if guard.is_none() {
            *guard = Some(h);
        }
        Ok(())
    }

    /// After `stop_clients`: waits (GIL released) until every in-process link has taken all
    /// it was sent, at most `timeout` seconds; true when all did.
    #[pyo3(signature = (timeout = 5.0))]
    fn wait_drained(&self, py: Python<'_>, timeout: f64) -> PyResult<bool> {
        let timeout = seconds("timeout", timeout).map_err(value_error)?;
        let links = self.with_handle(|h| h.inproc_links()).unwrap_or_default();
        Ok(py.detach(move || {
            let deadline = std::time::Instant::now() + timeout;
            links.iter().all(|l| l.wait_drained(deadline.saturating_duration_since(std::time::Instant::now())))
        }))
    }

    /// A link for a backend running in this process (`RuntimeError` when not running).
    fn attach(&self) -> PyResult<inproc::PyInprocLink> {
        let link = self
            .with_handle(|h| h.attach_backend())
            .unwrap_or_else(|| Err("the broker is not running".to_string()))
            .map_err(PyRuntimeError::new_err)?;
        Ok(inproc::PyInprocLink::new(link))
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
            for (name, value) in s.to_json() {
                match value {
                    serde_json::Value::Bool(b) => d.set_item(name, b)?,
                    serde_json::Value::String(t) => d.set_item(name, t)?,
                    serde_json::Value::Number(n) => d.set_item(name, n.as_u64().unwrap_or(0))?,
                    _ => {}
                }
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
    m.add_class::<codec::LineDecoder>()?;
    m.add_class::<inproc::PyInprocLink>()?;
    m.add_function(wrap_pyfunction!(encode::encode_room_message, m)?)?;
    m.add_function(wrap_pyfunction!(encode::encode_private_message, m)?)?;
    m.add_function(wrap_pyfunction!(encode::encode_broadcast, m)?)?;
    m.add_function(wrap_pyfunction!(default_settings, m)?)?;
    m.add_function(wrap_pyfunction!(settings_table, m)?)?;
    m.add_function(wrap_pyfunction!(logbridge::log_records, m)?)?;
    m.add_function(wrap_pyfunction!(logbridge::log_dropped, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
