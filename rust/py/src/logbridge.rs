//! The bridge from the core's `tracing` records to Python's `logging`, so an embedded broker logs
//! where the application logs (its handlers, levels and formatters) instead of straight to
//! stderr.
//!
//! Tokio threads never take the GIL for it: a `tracing` layer formats each record that passes the
//! filter and hands it to a bounded queue with a non-blocking send (a full queue drops the record
//! and counts it). A Python thread (`pystrands._logbridge`) takes records in batches with
//! [`log_records`], waiting with the GIL released, and emits them through `logging`. Records are
//! produced after the core's own rate limits, so rate-limited lines stay rate-limited.
//!
//! One subscriber serves the whole process: its filter is the most verbose `log_level` any broker
//! of the process asked for; Python's logger levels filter further, per logger.

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::reload;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// Records that may wait for the Python thread; beyond, they are dropped and counted.
const QUEUE: usize = 16_384;
/// Most records one call of [`log_records`] returns.
const BATCH: usize = 1024;

/// One formatted record.
struct Record {
    level: u8,
    target: String,
    message: String,
    fields: Vec<(String, String)>,
}

struct Bridge {
    tx: SyncSender<Record>,
    rx: Mutex<Receiver<Record>>,
    dropped: AtomicU64,
    filter: reload::Handle<EnvFilter, Registry>,
    /// The verbosity now in force (0 error … 4 trace; 5: a custom directive).
    level: Mutex<u8>,
}

static BRIDGE: OnceLock<Option<Bridge>> = OnceLock::new();

fn rank(level: &str) -> u8 {
    match level.to_ascii_lowercase().as_str() {
        "error" => 0,
        "warn" => 1,
        "info" => 2,
        "debug" => 3,
        "trace" => 4,
        _ => 5,
    }
}

/// Installs the bridge as the process's `tracing` subscriber (once; later calls only make the
/// filter more verbose when `level` asks for more). False when another subscriber was there.
pub(crate) fn install(level: &str) -> bool {
    let bridge = BRIDGE.get_or_init(|| {
        let filter =
            EnvFilter::try_new(pystrands_core::log_directive(level)).unwrap_or_else(|_| EnvFilter::new("info"));
        let (filter, handle) = reload::Layer::new(filter);
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let subscriber = Registry::default().with(filter).with(ToQueue);
        if tracing::subscriber::set_global_default(subscriber).is_err() {
            return None;
        }
        Some(Bridge {
            tx,
            rx: Mutex::new(rx),
            dropped: AtomicU64::new(0),
            filter: handle,
            level: Mutex::new(rank(level)),
        })
    });
    let Some(bridge) = bridge else { return false };
    if let Ok(mut now) = bridge.level.lock() {
        let wanted = rank(level);
        if wanted > *now || wanted == 5 {
            if let Ok(f) = EnvFilter::try_new(pystrands_core::log_directive(level)) {
                if bridge.filter.reload(f).is_ok() {
                    *now = wanted;
                }
            }
        }
    }
    true
}

/// The layer: formats a record and queues it without waiting.
struct ToQueue;

impl<S: Subscriber> Layer<S> for ToQueue {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let Some(Some(bridge)) = BRIDGE.get() else { return };
        let meta = event.metadata();
        let mut visit = Fields::default();
        event.record(&mut visit);
        let level = match *meta.level() {
            Level::ERROR => 40,
            Level::WARN => 30,
            Level::INFO => 20,
            Level::DEBUG => 10,
            Level::TRACE => 5,
        };
        let record = Record { level, target: meta.target().to_string(), message: visit.message, fields: visit.fields };
        if let Err(TrySendError::Full(_)) = bridge.tx.try_send(record) {
            bridge.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    fields: Vec<(String, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.fields.push((field.name().to_string(), value.to_string()));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            self.fields.push((field.name().to_string(), format!("{value:?}")));
        }
    }
}

/// The Python logger name of a record's target: `pystrands_core::cluster::subscriber` →
/// `pystrands.broker.cluster.subscriber`; another crate's → `pystrands.broker.deps.<crate>`.
fn logger_name(target: &str) -> String {
    match target.strip_prefix("pystrands_core") {
        Some(rest) => format!("pystrands.broker{}", rest.replace("::", ".")),
        None => format!("pystrands.broker.deps.{}", target.split("::").next().unwrap_or(target)),
    }
}

/// Up to 1,024 queued records as `(levelno, logger name, message, {field: value})`, waiting at
/// most `timeout` seconds (GIL released) for the first. Empty when there is no bridge.
#[pyfunction]
#[pyo3(signature = (timeout = 0.5))]
pub(crate) fn log_records<'py>(py: Python<'py>, timeout: f64) -> PyResult<Bound<'py, PyList>> {
    let out = PyList::empty(py);
    let Some(Some(bridge)) = BRIDGE.get() else { return Ok(out) };
    let wait = Duration::from_secs_f64(timeout.clamp(0.0, 60.0));
    let records: Vec<Record> = py.detach(|| {
        let Ok(rx) = bridge.rx.lock() else { return Vec::new() };
        let mut got = Vec::new();
        match rx.recv_timeout(wait) {
            Ok(r) => got.push(r),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return got,
        }
        while got.len() < BATCH {
            match rx.try_recv() {
                Ok(r) => got.push(r),
                Err(_) => break,
            }
        }
        got
    });
    for r in records {
        let fields = PyDict::new(py);
        for (k, v) in r.fields {
            fields.set_item(k, v)?;
        }
        out.append((r.level, logger_name(&r.target), r.message, fields))?;
    }
    Ok(out)
}

/// Records dropped because the Python thread fell behind (queue of 16,384 full).
#[pyfunction]
pub(crate) fn log_dropped() -> u64 {
    match BRIDGE.get() {
        Some(Some(b)) => b.dropped.load(Ordering::Relaxed),
        _ => 0,
    }
}
