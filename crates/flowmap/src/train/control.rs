//! How a run is supervised from outside: where its states go and when, the state it resumes from, a stop
//! flag, recovery from non-finite values, and hooks that watch it ([`RunControl`]).

use std::sync::atomic::AtomicBool;

use super::TrainState;
use crate::dist::Collective;
use crate::{Error, Result};

/// Recovery from a non-finite loss or gradient: the loop keeps a good state in memory every `keep_every`
/// steps; on a NaN or an infinity it rolls back to it, multiplies the learning rate by `lr_factor`, draws
/// fresh batches and goes on. A run that has rolled back `max_rollbacks` times within `window` steps
/// stops at the next non-finite value, with [`Error::Diverged`] (its last good state written, if it writes
/// states).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Recovery {
    /// `0` turns recovery off: the first non-finite value ends the run.
    pub keep_every: usize,
    pub lr_factor: f64,
    pub max_rollbacks: usize,
    pub window: usize,
}

impl Default for Recovery {
    fn default() -> Self {
        Recovery {
            keep_every: 50,
            lr_factor: 0.5,
            max_rollbacks: 3,
            window: 1000,
        }
    }
}

impl Recovery {
    pub fn validate(&self) -> Result<()> {
        if !(self.lr_factor > 0.0 && self.lr_factor < 1.0) {
            return Err(Error::arg(format!(
                "the learning-rate factor after a rollback must lie in (0, 1), got {}",
                self.lr_factor
            )));
        }
        Ok(())
    }
}

/// Where a run's states go.
pub type StateSink<'a> = &'a mut dyn FnMut(&TrainState) -> Result<()>;
/// Called with a step number.
pub type StepHook<'a> = &'a mut dyn FnMut(usize) -> Result<()>;
/// Called with a step number and its loss; returns the loss the loop uses.
pub type LossHook<'a> = &'a mut dyn FnMut(usize, f64) -> f64;

/// How a run keeps what it has done: states written on a schedule, a resumed state, a stop flag (an
/// interrupt), recovery from non-finite values and a monitor. [`RunControl::default`] writes nothing and
/// recovers with [`Recovery::default`].
#[derive(Default)]
pub struct RunControl<'a> {
    /// Write the state every this many steps.
    pub checkpoint_every: Option<usize>,
    /// Write the state when this many minutes have passed since the last.
    pub checkpoint_minutes: Option<f64>,
    /// Where states go: on the schedule above, when stopped, at the end of a run that writes states, and
    /// (the last good one) when recovery gives up.
    pub save_state: Option<StateSink<'a>>,
    /// The state to continue from.
    pub resume: Option<TrainState>,
    /// When set (by a signal handler, say), the run finishes its step, writes its state and returns
    /// [`Error::Interrupted`].
    pub stop: Option<&'a AtomicBool>,
    pub recovery: Recovery,
    /// Sees each step's loss before it is checked and returns the value the loop goes on with: a test hook
    /// (a test makes a step's loss NaN through it to exercise recovery). `None` leaves every loss as it is.
    pub loss_hook: Option<LossHook<'a>>,
    /// `(every, hook)`: `hook(step)` before the first step and after every `every` steps.
    pub monitor: Option<(usize, StepHook<'a>)>,
    /// The ranks of a data-parallel run ([`crate::dist`]): each holds its block of every batch, the
    /// gradients and losses are averaged over the ranks, and every rank keeps the same parameters. Every
    /// rank runs with the same settings and data (checked at the start); give `save_state` to one rank.
    pub collective: Option<&'a dyn Collective>,
}
