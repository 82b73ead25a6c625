//! Progress and Ctrl-C while the GIL is released: after every step the training thread re-attaches to run
//! Python's signal handlers and to call the user's callback (`callback(step, loss)`); a
//! `KeyboardInterrupt` (or an exception from the callback) asks the loop to stop after its step, with its
//! state saved, and is raised once the run has returned.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use flowmap::train::Progress;
use pyo3::prelude::*;

pub struct Reporter {
    callback: Option<Py<PyAny>>,
    stop: AtomicBool,
    /// The error a callback raised (an interrupt is reported as the run's own).
    error: Mutex<Option<PyErr>>,
}

impl Reporter {
    pub fn new(callback: Option<Py<PyAny>>) -> Self {
        Reporter {
            callback,
            stop: AtomicBool::new(false),
            error: Mutex::new(None),
        }
    }

    pub fn stop_flag(&self) -> &AtomicBool {
        &self.stop
    }

    /// Tells the callback the run is over (`callback(None, None)`), where it did not raise.
    pub fn finish(&self, py: Python<'_>) {
        if let Some(cb) = &self.callback {
            if self.error.lock().expect("progress lock").is_none() {
                if let Err(e) = cb.call1(py, (py.None(), py.None())) {
                    *self.error.lock().expect("progress lock") = Some(e);
                }
            }
        }
    }

    /// The error a callback raised, if one did.
    pub fn take_error(&self) -> PyResult<()> {
        match self.error.lock().expect("progress lock").take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Progress for Reporter {
    fn step(&self, step: usize, loss: Option<f64>) {
        Python::attach(|py| {
            if py.check_signals().is_err() {
                // The run saves its state and returns `Interrupted`, raised as `TrainingInterrupted`.
                self.stop.store(true, Ordering::SeqCst);
                return;
            }
            if let Some(cb) = &self.callback {
                if let Err(e) = cb.call1(py, (step, loss)) {
                    let interrupt = e.is_instance_of::<pyo3::exceptions::PyKeyboardInterrupt>(py);
                    if !interrupt {
                        *self.error.lock().expect("progress lock") = Some(e);
                    }
                    self.stop.store(true, Ordering::SeqCst);
                }
            }
        });
    }
}
