//! One file per command: its clap arguments and its body, `run(args, &Ctx)`. `main.rs` parses and
//! dispatches; the files below share flags and helpers through `common`, `guidance`, `map_flags` and `model`.

use candle_core::Device;

pub mod apply;
pub mod bench;
pub mod classifier;
mod common;
pub mod demo;
pub mod distill;
pub mod eval;
mod guidance;
mod map_flags;
mod model;
pub mod sample;
pub mod teacher;
pub mod train;

/// What every command is run with: the device, whether progress is shown, and the ranks of a
/// data-parallel launch (`mpirun`), if any.
pub struct Ctx {
    pub device: Device,
    pub show: bool,
    pub ranks: Option<crate::ranks::Ranks>,
}

impl Ctx {
    /// The collective of a data-parallel launch.
    pub fn collective(&self) -> Option<&dyn flowmap::dist::Collective> {
        self.ranks.as_ref().map(|r| r.collective())
    }

    /// Whether this process prints and writes the run's files (rank 0, or the one process).
    pub fn writes(&self) -> bool {
        crate::ranks::rank_of(self.ranks.as_ref()) == 0
    }
}
