//! Graceful shutdown: a signal every task can wait on, and task groups whose completion can be
//! awaited. A task holds a [`TaskGuard`] for as long as it runs; the group is finished when every
//! guard has been dropped (the pattern of a channel whose receiver sees `None` once all senders
//! are gone).

use tokio::sync::{mpsc, watch};

/// Sends the "stop now" signal.
pub(crate) struct Trigger(watch::Sender<bool>);

/// Waits for the signal; cheap to clone into every task.
#[derive(Clone)]
pub(crate) struct Signal(watch::Receiver<bool>);

/// Creates a linked trigger and signal.
pub(crate) fn signal() -> (Trigger, Signal) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Signal(rx))
}

impl Trigger {
    pub(crate) fn fire(&self) {
        self.0.send_replace(true);
    }
}

impl Signal {
    /// Resolves once the trigger fired (at once if it already has, or if it was dropped).
    pub(crate) async fn fired(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

/// Held by a running task; dropping it marks the task finished.
#[derive(Clone)]
pub(crate) struct TaskGuard(#[allow(dead_code)] mpsc::Sender<()>);

/// A set of tasks that can be waited for.
pub(crate) struct TaskGroup {
    tx: Option<mpsc::Sender<()>>,
    rx: mpsc::Receiver<()>,
}

impl Default for TaskGroup {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(1);
        TaskGroup { tx: Some(tx), rx }
    }
}

impl TaskGroup {
    /// A guard for one more task. Panics only if called after [`wait`](Self::wait).
    pub(crate) fn guard(&self) -> TaskGuard {
        TaskGuard(self.tx.clone().expect("task group already closed"))
    }

    /// A guard, or `None` once [`wait`](Self::wait) was called.
    pub(crate) fn try_guard(&self) -> Option<TaskGuard> {
        self.tx.clone().map(TaskGuard)
    }

    /// Waits until every guard handed out so far (and their clones) has been dropped.
    pub(crate) async fn wait(&mut self) {
        self.tx.take();
        let _ = self.rx.recv().await;
    }
}
