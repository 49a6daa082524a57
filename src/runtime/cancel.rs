//! Cancelling runs from another thread.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ort::session::RunOptions;

use super::placement;
use crate::{Error, Result};

/// Cancels runs from another thread. Cheap to clone; create one per job, hand clones to whoever may cancel, and pass
/// it to [`Graph::run_with`](super::Graph::run_with). Once cancelled it stays cancelled: every later run with it fails with
/// [`ErrorKind::Cancelled`](crate::ErrorKind::Cancelled) without running. Needs no ONNX Runtime to create.
#[derive(Clone, Default)]
pub struct Canceller {
    inner: Arc<CancelInner>,
}

#[derive(Default)]
struct CancelInner {
    cancelled: AtomicBool,
    /// The run options of the runs in flight with this canceller.
    running: Mutex<Vec<Arc<RunOptions>>>,
}

impl fmt::Debug for Canceller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Canceller")
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

impl Canceller {
    pub fn new() -> Canceller {
        Canceller::default()
    }

    /// Cancels the runs in flight with this handle (ONNX Runtime stops between kernels) and every later one.
    pub fn cancel(&self) {
        let running = self.inner.running.lock().unwrap_or_else(|e| e.into_inner());
        self.inner.cancelled.store(true, Ordering::SeqCst);
        for opts in running.iter() {
            let _ = opts.terminate();
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.inner.cancelled.load(Ordering::SeqCst)
    }

    /// Registers a run; `None` when already cancelled.
    pub(crate) fn begin(&self) -> Result<Option<Arc<RunOptions>>> {
        let mut opts = RunOptions::new()
            .map_err(|e| Error::runtime(format!("cannot create run options: {e}")))?;
        placement::quiet(&mut opts)
            .map_err(|e| Error::runtime(format!("cannot set the run's log level: {e}")))?;
        let opts = Arc::new(opts);
        let mut running = self.inner.running.lock().unwrap_or_else(|e| e.into_inner());
        if self.is_cancelled() {
            return Ok(None);
        }
        running.push(Arc::clone(&opts));
        Ok(Some(opts))
    }

    pub(crate) fn end(&self, opts: &Arc<RunOptions>) {
        let mut running = self.inner.running.lock().unwrap_or_else(|e| e.into_inner());
        running.retain(|o| !Arc::ptr_eq(o, opts));
    }
}
