//! # flowmap
//!
//! Flow map learning: a network `f(x_t, t, s) ≈ Φ_{t→s}(x_t)`, the solution operator of the
//! probability-flow ODE `dx/dτ = v(x, τ)`, turns a flow-matching teacher into a generator that needs one to
//! four network evaluations.
//!
//! Conventions, everywhere: time runs from data (`t = 0`) to noise (`t = 1`); a map goes down,
//! `0 ≤ s ≤ t ≤ 1`; the path is `x_t = (1 − t)·x0 + t·x1` with `x1 ~ N(0, I)`; and
//! `Φ_{t→s}(x) = x + ∫_t^s v(x_τ, τ) dτ`. Flow maps are parameterised by their average velocity,
//! `f(x, t, s) = x + (s − t)·F(x, t, s)`.
//!
//! Every model is evaluated on a state `x` of any shape (`B × D` points, `B × C × H × W` images), `B × 1`
//! times and a condition [`Cond`] (class labels with a reserved null class, or none).
//!
//! Modules follow the mathematics: [`path`] (interpolants), [`ode`] (solvers), [`teacher`] (velocity
//! fields), [`flow_map`] (maps, including Φ itself, and their tangents), [`layers`] (the building blocks,
//! each with its forward-mode tangent rule), [`backbone`] (the networks inside teachers and maps, registered
//! in one list), [`objective`] (losses, and the method registry), [`train`] (the one training loop), [`sample`] (the one
//! sampler), [`metrics`], [`data`], [`checkpoint`] and [`pipeline`] (the end-to-end jobs, returning plain
//! values). [`kernels`] holds the fast CPU paths (candle custom ops, each beside its plain reference) and
//! every `unsafe` block of the crate. Reports, plots, the demo and the benchmarks live in the application,
//! `flowmap-cli`.

pub mod backbone;
pub mod checkpoint;
pub mod classifier;
pub mod cond;
pub mod data;
pub mod device;
pub mod dist;
mod error;
pub mod flow_map;
pub mod image_metrics;
pub mod io;
pub mod kernels;
pub mod layers;
pub mod metrics;
pub mod objective;
pub mod ode;
pub mod optim;
pub mod path;
pub mod pipeline;
mod rng;
pub mod sample;
pub mod state;
pub mod teacher;
pub mod train;

pub use cond::Cond;
pub use device::parse_device;
pub use error::{Error, Result};
pub use kernels::no_grad;
pub use rng::Rng;

/// Sets how many threads the CPU kernels use, for the ops that follow: flowmap's fused kernels and candle's
/// matrix products run on rayon's pool of `n` threads (candle reads `RAYON_NUM_THREADS` when it launches a
/// kernel), and candle's separate pool for elementwise ops is switched off (`CANDLE_NUM_THREADS=1`): its
/// workers spin beside rayon's and, on a 2-core machine, take the cores the GEMMs need. Call it before
/// starting other threads. Call it even for the default: with the variable unset, candle counts the cores
/// anew (parsing `/proc/cpuinfo`) at every matrix product.
pub fn set_compute_threads(n: usize) {
    // SAFETY (edition 2021: safe fn): called from the main thread before worker threads start.
    std::env::set_var("RAYON_NUM_THREADS", n.max(1).to_string());
    std::env::set_var("CANDLE_NUM_THREADS", "1");
}
