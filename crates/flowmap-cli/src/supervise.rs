//! Long runs from the command line: the flags that write and resume training states, the interrupt
//! handler, and the messages that tell a user how to go on.
//!
//! A run writing `OUT.safetensors` keeps its training state in `OUT.state.safetensors`: on the schedule
//! `--checkpoint-every` / `--checkpoint-minutes` sets, when interrupted (SIGINT or SIGTERM), and, holding
//! the last good step, when recovery from non-finite values gives up.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Result};
use clap::Args;
use flowmap::dist::Collective;
use flowmap::train::{Recovery, RunControl, TrainState};

/// Set by the first SIGINT or SIGTERM: the training loop finishes its step, saves and stops.
static STOP: AtomicBool = AtomicBool::new(false);

/// The exit status of a run stopped by an interrupt (128 + SIGINT), as shells report it.
pub const INTERRUPTED: u8 = 130;

#[derive(Args, Clone, Debug, Default)]
pub struct LongRunFlags {
    /// Write the whole training state (parameters, EMA, optimiser, random stream, log) to
    /// OUT.state.safetensors every N steps.
    #[arg(long, value_name = "N")]
    pub checkpoint_every: Option<usize>,
    /// Write the training state every M minutes (of wall clock).
    #[arg(long, value_name = "M")]
    pub checkpoint_minutes: Option<f64>,
    /// Continue the run saved in STATE (a `.state.safetensors`), with the same flags; `--steps` may grow.
    #[arg(long, value_name = "STATE")]
    pub resume: Option<PathBuf>,
    /// On a NaN or infinite loss or gradient, roll back to the good state kept every K steps
    /// (0: no recovery, the run stops at once).
    #[arg(long, value_name = "K", default_value_t = Recovery::default().keep_every)]
    pub rollback_every: usize,
    /// Multiply the learning rate by F after each rollback.
    #[arg(long, value_name = "F", default_value_t = Recovery::default().lr_factor)]
    pub rollback_lr_factor: f64,
    /// Stop with an error after R rollbacks within 1000 steps.
    #[arg(long, value_name = "R", default_value_t = Recovery::default().max_rollbacks)]
    pub max_rollbacks: usize,
    /// Testing: make the loss of step K NaN, once.
    #[arg(long, value_name = "K", hide = true)]
    pub inject_nan_at: Option<usize>,
    /// Testing: make the loss of every step from K on NaN.
    #[arg(long, value_name = "K", hide = true)]
    pub inject_nan_from: Option<usize>,
    /// Testing: stop after K steps as an interrupt does (the state written, exit status 130).
    #[arg(long, value_name = "K", hide = true)]
    pub inject_stop_at: Option<usize>,
}

/// A NaN injected into the loss on purpose, to test recovery from the command line (the hidden
/// `--inject-nan-*` flags), through the training loop's loss hook.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// The first time step `step` runs (a rolled-back run passes it again, cleanly).
    Once { step: usize, fired: bool },
    /// Every step from `k` on.
    From(usize),
}

impl Fault {
    /// The loss of `step` as the fault leaves it.
    fn apply(&mut self, step: usize, loss: f64) -> f64 {
        match self {
            Fault::Once { step: k, fired } if *k == step && !*fired => {
                *fired = true;
                f64::NAN
            }
            Fault::From(k) if step >= *k => f64::NAN,
            _ => loss,
        }
    }
}

/// `OUT.state.safetensors` for `OUT.safetensors`.
pub fn state_path(out: &Path) -> PathBuf {
    let stem = out.file_stem().and_then(|s| s.to_str()).unwrap_or("run");
    out.with_file_name(format!("{stem}.state.safetensors"))
}

/// What one run writes and reads of its training state.
pub struct Supervisor {
    checkpoint_every: Option<usize>,
    checkpoint_minutes: Option<f64>,
    recovery: Recovery,
    fault: Option<Fault>,
    stop_at: Option<usize>,
    pub path: PathBuf,
    resume: Option<TrainState>,
    /// The step of the last state written, if any.
    written: Option<usize>,
}

impl Supervisor {
    /// Checks the flags and reads the state to resume, before anything is trained.
    pub fn new(flags: &LongRunFlags, out: &Path) -> Result<Self> {
        if flags.checkpoint_every == Some(0) {
            bail!("--checkpoint-every must be at least 1");
        }
        if let Some(m) = flags.checkpoint_minutes {
            if !(m > 0.0 && m.is_finite()) {
                bail!("--checkpoint-minutes must be positive, got {m}");
            }
        }
        if flags.inject_nan_at.is_some() && flags.inject_nan_from.is_some() {
            bail!("--inject-nan-at and --inject-nan-from exclude each other");
        }
        let recovery = Recovery {
            keep_every: flags.rollback_every,
            lr_factor: flags.rollback_lr_factor,
            max_rollbacks: flags.max_rollbacks,
            ..Recovery::default()
        };
        recovery.validate()?;
        let resume = match &flags.resume {
            Some(p) => Some(TrainState::load(p)?),
            None => None,
        };
        // A run killed while writing (SIGKILL, a power cut) may have left a temporary file behind.
        flowmap::io::remove_stale_partials(&state_path(out));
        flowmap::io::remove_stale_partials(out);
        Ok(Supervisor {
            checkpoint_every: flags.checkpoint_every,
            checkpoint_minutes: flags.checkpoint_minutes,
            recovery,
            fault: match (flags.inject_nan_at, flags.inject_nan_from) {
                (Some(k), _) => Some(Fault::Once { step: k, fired: false }),
                (_, Some(k)) => Some(Fault::From(k)),
                _ => None,
            },
            stop_at: flags.inject_stop_at,
            path: state_path(out),
            resume,
            written: None,
        })
    }

    /// Runs `train` under a [`RunControl`] that writes this run's states and watches for interrupts, and
    /// turns an interrupt or a divergence into a message that says how to go on.
    ///
    /// In a data-parallel run (`ranks`), every rank trains under the collective and rank 0 alone writes
    /// the states.
    pub fn run<T>(
        &mut self,
        ranks: Option<&dyn Collective>,
        train: impl FnOnce(RunControl<'_>) -> flowmap::Result<T>,
    ) -> Result<T> {
        install_handler()?;
        let path = self.path.clone();
        let written = &mut self.written;
        let mut save = |s: &TrainState| -> flowmap::Result<()> {
            s.save(&path)?;
            *written = Some(s.meta.step);
            Ok(())
        };
        let (mut fault, stop_at) = (self.fault, self.stop_at);
        let mut inject = |step: usize, loss: f64| {
            if stop_at == Some(step + 1) {
                STOP.store(true, Ordering::SeqCst);
            }
            match fault.as_mut() {
                Some(f) => f.apply(step, loss),
                None => loss,
            }
        };
        let ctl = RunControl {
            checkpoint_every: self.checkpoint_every,
            checkpoint_minutes: self.checkpoint_minutes,
            save_state: ranks
                .is_none_or(|c| c.rank() == 0)
                .then_some(&mut save as &mut dyn FnMut(&TrainState) -> flowmap::Result<()>),
            resume: self.resume.take(),
            stop: Some(&STOP),
            recovery: self.recovery,
            loss_hook: (self.fault.is_some() || self.stop_at.is_some())
                .then_some(&mut inject as &mut dyn FnMut(usize, f64) -> f64),
            monitor: None,
            collective: ranks,
        };
        match train(ctl) {
            Ok(v) => Ok(v),
            Err(flowmap::Error::Interrupted { step }) => Err(Interrupted {
                step,
                state: self.path.clone(),
            }
            .into()),
            // The message says where the last good state is; the error underneath stays a divergence, which
            // every rank of a data-parallel run returns together (`ranks::is_collective`).
            Err(e @ flowmap::Error::Diverged { .. }) => match self.written {
                Some(good) => {
                    let hint = format!(
                        "{e}; the last good state (step {good}) is in {} (resume with {})",
                        self.path.display(),
                        resume_hint(&self.path)
                    );
                    Err(anyhow::Error::new(e).context(hint))
                }
                None => Err(e.into()),
            },
            Err(e) => Err(e.into()),
        }
    }
}

/// A run stopped by an interrupt, its state saved: `main` prints how to resume and exits with 130.
#[derive(Debug)]
pub struct Interrupted {
    pub step: usize,
    pub state: PathBuf,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "interrupted after step {}; the training state is in {}\nresume with: {}",
            self.step,
            self.state.display(),
            resume_command(&self.state)
        )
    }
}

impl std::error::Error for Interrupted {}

/// The command line of this process with `--resume STATE` in place of any `--resume` it had.
pub fn resume_command(state: &Path) -> String {
    let mut args: Vec<String> = Vec::new();
    let mut it = std::env::args();
    if let Some(first) = it.next() {
        args.push(first);
    }
    while let Some(a) = it.next() {
        if a == "--resume" {
            it.next();
            continue;
        }
        if a.starts_with("--resume=") {
            continue;
        }
        args.push(a);
    }
    args.push("--resume".into());
    args.push(state.display().to_string());
    args.iter().map(|a| shell_quote(a)).collect::<Vec<_>>().join(" ")
}

fn resume_hint(state: &Path) -> String {
    format!("--resume {}", shell_quote(&state.display().to_string()))
}

/// `a` as one shell word.
fn shell_quote(a: &str) -> String {
    let plain = !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:=,+@%".contains(c));
    if plain {
        a.to_string()
    } else {
        format!("'{}'", a.replace('\'', r"'\''"))
    }
}

/// The first SIGINT or SIGTERM asks the loop to stop after its step; a second exits at once, removing any
/// file half-written.
fn install_handler() -> Result<()> {
    static INSTALLED: AtomicBool = AtomicBool::new(false);
    if INSTALLED.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            flowmap::io::remove_partial_files();
            eprintln!("\ninterrupted again: stopping now, without saving");
            std::process::exit(INTERRUPTED as i32);
        }
        eprintln!("\ninterrupt: finishing this step and saving the training state (interrupt again to quit now)");
    })?;
    Ok(())
}
