//! What the speed benchmarks share: a row of measurements, a call-rate timer, training steps per second and
//! the nets they time. `speed` (the MLP rows and the report) and `speed_unet` (the U-Net rows) both use it.

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use flowmap::backbone::Arch;
use flowmap::data::DataSource;
use flowmap::flow_map::{FlowMap, FlowMapNet};
use flowmap::kernels::Precision;
use flowmap::path::LinearPath;
use flowmap::teacher::{VelocityField, VelocityNet};
use flowmap::train::Silent;
use flowmap::train::{fit, TrainConfig, Trainable};
use flowmap::Result;
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// One measurement.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SpeedRow {
    pub workload: String,
    pub width: usize,
    pub batch: usize,
    /// `steps/s` (training), `samples/s` (sampling) or `ms` (latency).
    pub unit: String,
    pub value: f64,
    /// Floating-point work per second in the network's matrix products (training rows).
    pub gflops: Option<f64>,
    /// `gflops` over the sgemm peak measured in this run (the best of flowmap's and PyTorch's).
    pub peak_fraction: Option<f64>,
    /// The process's peak resident memory while this row ran (MLP rows), or the heap a U-Net training row
    /// held at its peak above its start.
    pub peak_rss_mb: Option<f64>,
    /// The peer's memory for the row: its resident-set growth over the row (U-Net rows).
    #[serde(default)]
    pub peer_peak_mb: Option<f64>,
    /// The same workload in PyTorch, and flowmap / PyTorch.
    pub peer: Option<f64>,
    pub ratio: Option<f64>,
}

/// Calls `f` until `seconds` have passed (at least 3 times, after 2 warm-up calls); returns calls/s.
pub(super) fn rate(seconds: f64, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..2 {
        f()?;
    }
    let (start, mut n) = (Instant::now(), 0usize);
    while n < 3 || start.elapsed().as_secs_f64() < seconds {
        f()?;
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Training steps per second of `fit` on `objective`: a short warm-up run, then a timed run sized to fill
/// about `seconds` (each run builds its optimiser afresh, as a user's run does); and the heap the timed run
/// held at its peak above its start, in MB (the process's allocator counts it).
pub(super) fn steps_per_second<O: flowmap::objective::Objective>(
    objective: &O,
    trainable: &Trainable<'_, O::Model>,
    data: &DataSource,
    batch: usize,
    seconds: f64,
    device: &Device,
) -> Result<(f64, f64)> {
    let cfg = |steps| TrainConfig {
        steps,
        batch_size: batch,
        warmup_steps: 1,
        ..TrainConfig::default()
    };
    let warm = fit(objective, trainable, data, &cfg(2), device, &Silent)?;
    let estimate = 2.0 / warm.seconds.max(1e-9);
    let steps = ((estimate * seconds).ceil() as usize).max(3);
    let (log, peak) = crate::alloc::watch(usize::MAX, || {
        fit(objective, trainable, data, &cfg(steps), device, &Silent)
    });
    let log = log?;
    Ok((log.steps as f64 / log.seconds, peak as f64 / (1 << 20) as f64))
}

/// A teacher and a flow map seeded from it, each with its EMA copy.
pub(super) struct Nets {
    pub teacher_vars: VarMap,
    pub teacher_ema: VarMap,
    pub teacher: VelocityNet,
    pub teacher_ema_net: VelocityNet,
    pub map_vars: VarMap,
    pub map_ema: VarMap,
    pub map: FlowMapNet,
    pub map_ema_net: FlowMapNet,
}

impl Nets {
    /// The teacher as the training loop takes it (its EMA copy kept, the live model its own target).
    pub(super) fn teacher_trainable(&self, classes: Option<usize>) -> Trainable<'_, dyn VelocityField> {
        Trainable {
            params: &self.teacher_vars,
            model: &self.teacher,
            ema: Some((&self.teacher_ema, &self.teacher_ema_net)),
            ema_target: false,
            path: &LinearPath,
            classes,
            backbone: Some(self.teacher.backbone()),
        }
    }

    /// The flow map as the training loop takes it.
    pub(super) fn map_trainable(&self, classes: Option<usize>) -> Trainable<'_, dyn FlowMap> {
        Trainable {
            params: &self.map_vars,
            model: &self.map,
            ema: Some((&self.map_ema, &self.map_ema_net)),
            ema_target: false,
            path: &LinearPath,
            classes,
            backbone: Some(self.map.backbone()),
        }
    }
}

pub(super) fn nets(arch: &Arch, seed: u64, device: &Device) -> Result<Nets> {
    let vb = |vm: &VarMap| VarBuilder::from_varmap(vm, DType::F32, device);
    let (teacher_vars, teacher_ema, map_vars, map_ema) = (VarMap::new(), VarMap::new(), VarMap::new(), VarMap::new());
    let teacher = VelocityNet::new(arch, vb(&teacher_vars))?;
    let teacher_ema_net = VelocityNet::new(arch, vb(&teacher_ema))?;
    let map = FlowMapNet::new(arch, vb(&map_vars))?;
    let map_ema_net = FlowMapNet::new(arch, vb(&map_ema))?;
    arch.seed_params(&teacher_vars, seed)?;
    arch.init_from_teacher(&map_vars, &teacher_vars)?;
    Ok(Nets {
        teacher_vars,
        teacher_ema,
        teacher,
        teacher_ema_net,
        map_vars,
        map_ema,
        map,
        map_ema_net,
    })
}

/// What `flowmap bench speed` measures.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SpeedOptions {
    /// Which networks: `mlp` (on 2-D points) and `unet` (on 28 × 28 digits).
    pub nets: Vec<String>,
    pub widths: Vec<usize>,
    pub batches: Vec<usize>,
    /// The U-Nets' first-level channels and their batches.
    pub unet_channels: Vec<usize>,
    pub unet_batches: Vec<usize>,
    /// Minimum timed seconds per row.
    pub seconds: f64,
    /// Run the PyTorch peer (when `python3` can import torch).
    pub peer: bool,
    /// Rounds, alternating peer and flowmap; each side keeps its best figure per row (this machine's
    /// neighbours move single runs by ±25%).
    pub rounds: usize,
    /// The Python interpreter for the peer.
    pub python: String,
    pub seed: u64,
    /// The precision of flowmap's matrix products, and the peer's: `bf16` runs PyTorch's forward passes
    /// under `torch.autocast("cpu", dtype=torch.bfloat16)`.
    #[serde(default)]
    pub precision: Precision,
    /// The workloads to run, by name (every one when empty): a single row, with a long `seconds`, is the
    /// loop to profile under `perf record`.
    #[serde(default)]
    pub rows: Vec<String>,
}

impl SpeedOptions {
    /// Whether the run measures `workload`.
    pub fn wants(&self, workload: &str) -> bool {
        self.rows.is_empty() || self.rows.iter().any(|r| r == workload)
    }

    /// How many of `workloads` the run measures.
    pub(super) fn count(&self, workloads: &[&str]) -> usize {
        workloads.iter().filter(|w| self.wants(w)).count()
    }
}

impl Default for SpeedOptions {
    fn default() -> Self {
        SpeedOptions {
            nets: vec!["mlp".into(), "unet".into()],
            widths: vec![256, 512],
            batches: vec![256, 1024, 4096],
            unet_channels: vec![16, 32],
            unet_batches: vec![32, 128, 256],
            seconds: 2.0,
            peer: false,
            rounds: 2,
            python: "python3".into(),
            seed: 0,
            precision: Precision::F32,
            rows: vec![],
        }
    }
}
