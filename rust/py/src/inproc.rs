//! `InprocLink`: the Python face of an in-process backend's link to the broker
//! (`pystrands_core::InprocLink`).
//!
//! Why it exists: the backend clients drive their sans-I/O session over a socket; in the broker's
//! own process this object stands in for the socket. Reads take a whole batch of lines in one
//! call and return them as one `bytes`; `fileno()` is what an event loop watches (readable once
//! per batch); `recv` blocks a reader thread with the GIL released; `write` hands a batch of the
//! backend's lines to the broker without blocking (the link's task in the broker's runtime
//! carries them out). The broker's tokio threads never touch Python.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use pystrands_core::{InprocLink, InprocStatus};
use std::time::Duration;

/// An in-process backend's link to its broker (made by `NativeBroker.attach()`).
#[pyclass(module = "pystrands._core", name = "InprocLink", frozen)]
pub(crate) struct PyInprocLink {
    link: InprocLink,
}

impl PyInprocLink {
    pub(crate) fn new(link: InprocLink) -> Self {
        PyInprocLink { link }
    }

    /// One batch as bytes: `Some` (maybe empty) or `None` at the end of the stream.
    fn take<'py>(&self, py: Python<'py>, max_lines: usize) -> Option<Bound<'py, PyBytes>> {
        let mut lines = Vec::new();
        match self.link.take(&mut lines, max_lines.max(1)) {
            InprocStatus::End => None,
            InprocStatus::Empty => Some(PyBytes::new(py, b"")),
            InprocStatus::Lines => {
                let total = lines.iter().map(|l| l.len()).sum();
                let bytes = PyBytes::new_with(py, total, |buf| {
                    let mut at = 0;
                    for l in &lines {
                        buf[at..at + l.len()].copy_from_slice(l);
                        at += l.len();
                    }
                    Ok(())
                })
                .ok()?;
                // Dropping the lines (refcounted buffers) needs no GIL, but it is cheap either way.
                Some(bytes)
            }
        }
    }
}

fn timeout_arg(timeout: Option<f64>) -> PyResult<Option<Duration>> {
    match timeout {
        None => Ok(None),
        Some(t) if t.is_finite() && t >= 0.0 => Ok(Some(Duration::from_secs_f64(t.min(1e9)))),
        Some(t) => Err(PyValueError::new_err(format!("invalid timeout={t}: must be a number of seconds >= 0"))),
    }
}

#[pymethods]
impl PyInprocLink {
    /// The file descriptor that becomes readable when `read()` has lines (for `add_reader`).
    fn fileno(&self) -> i32 {
        self.link.wake_fd()
    }

    /// The backend id the broker's logs use for this link.
    #[getter]
    fn id(&self) -> u64 {
        self.link.id()
    }

    /// True once the link is over: shortly after `close()` (the broker finishes what was
    /// written first), or when the broker stopped.
    #[getter]
    fn closed(&self) -> bool {
        self.link.is_closed()
    }

    /// Up to `max_lines` waiting lines as one `bytes` without blocking: `b""` when there are
    /// none, `None` at the end of the stream.
    #[pyo3(signature = (max_lines = 4096))]
    fn read<'py>(&self, py: Python<'py>, max_lines: usize) -> Option<Bound<'py, PyBytes>> {
        self.take(py, max_lines)
    }

    /// Like `socket.recv`: blocks (GIL released) until lines arrive and returns them; `b""` at
    /// the end of the stream; `None` when `timeout` (seconds) passed first.
    #[pyo3(signature = (timeout = None, max_lines = 4096))]
    fn recv<'py>(
        &self,
        py: Python<'py>,
        timeout: Option<f64>,
        max_lines: usize,
    ) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let limit = timeout_arg(timeout)?;
        loop {
            match self.take(py, max_lines) {
                None => return Ok(Some(PyBytes::new(py, b""))),
                Some(b) if !b.as_bytes().is_empty() => return Ok(Some(b)),
                Some(_) => {}
            }
            let link = &self.link;
            let woken = py.detach(|| link.wait(limit));
            if !woken {
                return Ok(None);
            }
        }
    }

    /// Hands the backend's lines (sends, answers, acks) to the broker. Never blocks, unless the
    /// broker has more than 64 MiB of this link's lines still to carry out: then it waits, with
    /// the GIL released, until half of them are.
    fn write(&self, py: Python<'_>, data: &[u8]) {
        let link = &self.link;
        if link.backlogged() {
            py.detach(|| link.wait_backlog());
        }
        link.write(data);
    }

    /// Ends the stream for readers (`read` → `None`, `recv` → `b""`); writing still works.
    fn shutdown(&self) {
        self.link.shutdown();
    }

    /// Closes the link; the broker redelivers what was not acknowledged to other backends.
    fn close(&self, py: Python<'_>) {
        let link = &self.link;
        py.detach(|| link.close());
    }

    /// After the broker began stopping: waits (GIL released) until every line was read.
    fn wait_drained(&self, py: Python<'_>, timeout: f64) -> PyResult<bool> {
        let t = timeout_arg(Some(timeout))?.unwrap_or_default();
        let link = &self.link;
        Ok(py.detach(|| link.wait_drained(t)))
    }
}
