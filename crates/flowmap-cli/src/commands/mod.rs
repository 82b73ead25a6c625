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

/// What every command is run with: the device, and whether progress is shown.
pub struct Ctx {
    pub device: Device,
    pub show: bool,
}
