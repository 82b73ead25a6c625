//! The library's errors as the Python classes of `flowmap.errors` (all under `flowmap.FlowmapError`, and
//! each also the built-in a Python user expects: `ValueError`, `FileNotFoundError`, `OSError`, …), with
//! the library's one-line message.

use std::path::Path;

use pyo3::prelude::*;
use pyo3::types::PyTuple;

/// The class of `flowmap.errors` named `name`.
fn class<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
    py.import("flowmap.errors")?.getattr(name)
}

fn raise(name: &str, msg: String) -> PyErr {
    Python::attach(|py| match class(py, name) {
        Ok(cls) => match cls.call1((msg.clone(),)) {
            Ok(obj) => PyErr::from_value(obj),
            Err(e) => e,
        },
        Err(e) => e,
    })
}

/// The Python exception of a library error.
pub fn to_py(e: flowmap::Error) -> PyErr {
    use flowmap::Error as E;
    let name = match &e {
        E::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => "FileNotFound",
        E::Io { .. } => "FlowmapIOError",
        E::Data(_) => "DataError",
        // A data-parallel refusal (the package runs as one process; a rank refuses its settings).
        E::InvalidArgument(_) | E::Ranks(_) => "InvalidArgument",
        E::Checkpoint { .. } => "CheckpointError",
        E::Config(_) => "ConfigError",
        E::Diverged { .. } => "DivergedError",
        E::Interrupted { .. } => "TrainingInterrupted",
        // A collective transport (NCCL) failing: the package never builds one.
        E::Candle(_) | E::Plot { .. } | E::Transport(_) => "TensorError",
    };
    raise(name, e.to_string())
}

/// An invalid argument (`flowmap.errors.InvalidArgument`, a `ValueError`).
pub fn arg_err(msg: impl Into<String>) -> PyErr {
    raise("InvalidArgument", msg.into())
}

/// `flowmap.errors.TrainingInterrupted` (a `KeyboardInterrupt`) after `step` steps, carrying the state.
pub fn interrupted(py: Python<'_>, step: usize, path: Option<&Path>, state: Option<crate::PyTrainState>) -> PyErr {
    let msg = match path {
        Some(p) => format!(
            "training interrupted after step {step}; its state is in {} (resume=flowmap.TrainState.load(...)) and on this exception's .state",
            p.display()
        ),
        None => format!("training interrupted after step {step}; its state is on this exception's .state (pass it as resume=)"),
    };
    let build = || -> PyResult<PyErr> {
        let cls = class(py, "TrainingInterrupted")?;
        let state = match state {
            Some(s) => Bound::new(py, s)?.into_any(),
            None => py.None().into_bound(py),
        };
        let args = PyTuple::new(py, [msg.into_pyobject(py)?.into_any(), state])?;
        Ok(PyErr::from_value(cls.call1(args)?))
    };
    build().unwrap_or_else(|e| e)
}
