//! The `flowmap` command-line tool: the application over the `flowmap` library — its commands, reports,
//! plots, the demo and the benchmarks.

mod alloc;
mod arch;
mod bench;
mod demo;
mod demo_mnist;
mod grid;
mod plot;
mod report;
mod supervise;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Args, Parser, Subcommand};
use flowmap::backbone::{Arch, MlpConfig};
use flowmap::checkpoint::{Checkpoint, ModelKind};
use flowmap::data::{self, DataSource, Toy};
use flowmap::flow_map::SolverMap;
use flowmap::objective::{
    DistillConfig, EpsSchedule, JvpMode, MeanFlowTangent, MeanFlowVelocity, Method, TargetNet, TimeDistribution,
    Weighting,
};
use flowmap::ode::{self, Solver};
use flowmap::pipeline::{self, EvalSettings, MapJob, OutDir, RunConfig, Teacher};
use flowmap::sample::{self, SampleContext, Sampler, TimeGrid};
use flowmap::teacher::VelocityField;
use flowmap::train::TrainConfig;
use flowmap::{io, Cond};

use arch::ArchFlags;
use demo::DemoConfig;
use report::{eval_table, progress_bar, Bar};

#[global_allocator]
static GLOBAL: alloc::Watched = alloc::Watched;

#[derive(Parser)]
#[command(
    name = "flowmap",
    version,
    about = "Flow map learning: few-step generators distilled from flow-matching teachers"
)]
struct Cli {
    /// Worker threads for tensor kernels and metrics (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Hide progress bars.
    #[arg(long, global = true)]
    quiet: bool,
    /// Device: cpu, cuda, cuda:N, metal or metal:N (CUDA needs a build with `--features cuda`).
    #[arg(long, global = true, default_value = "cpu")]
    device: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a velocity network (the teacher) by conditional flow matching.
    Teacher(TeacherArgs),
    /// Distil a flow map from a teacher checkpoint or an analytic `gmm:SPEC.json` teacher.
    Distill(DistillArgs),
    /// Train a flow map from data alone (MeanFlow, Lagrangian self-distillation, shortcut).
    Train(TrainArgs),
    /// Generate samples from a flow map (k-step) or a teacher (ODE solver).
    Sample(SampleArgs),
    /// Evaluate f(x, t, s) on points: a flow map, or Φ_{t→s} of a teacher by an ODE solver.
    Apply(ApplyArgs),
    /// Score samples against held-out data at several NFE (a teacher: Euler at each NFE and dopri5); writes metrics JSON, a Markdown table and plots.
    Eval(EvalArgs),
    /// Train the image classifier whose features the image metrics (FD, precision, recall, accuracy) use.
    Classifier(ClassifierArgs),
    /// The end-to-end demo on embedded data: teacher → EMD and LMD maps → report with figures.
    Demo(DemoArgs),
    /// Benchmarks that train for real and write JSON and Markdown.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Ablation of ε, the (t, s) law, the weighting and the target network on the analytic teacher.
    Ablation(AblationArgs),
    /// Every method at an equal wall-clock budget, on checkerboard and on the analytic mixture teacher.
    Compare(CompareArgs),
    /// The cost of the exact forward-mode JVP against a forward pass and finite differences.
    Jvp(JvpArgs),
    /// Training and sampling throughput, latency, GFLOP/s against the sgemm peak; `--peer` runs PyTorch too.
    Speed(SpeedArgs),
    /// MNIST: a class-conditional U-Net teacher (trained in the run, or the shipped one) and every method of
    /// the family, FD, precision, recall and class accuracy against NFE, with the image issue's acceptance.
    Mnist(MnistBenchArgs),
    /// Guidance on MNIST: the teacher under classifier-free guidance and autoguidance, a guidance-distilled
    /// map and guided MeanFlow, FD, precision, recall and class accuracy at each scale.
    Guidance(GuidanceBenchArgs),
    /// Mutation fuzzing of every file loader: no panic, no allocation beyond what the file justifies.
    Fuzz(FuzzArgs),
}

#[derive(Args)]
struct FuzzArgs {
    /// Output folder (fuzz.json, fuzz.md, the case in progress, kept crashes).
    #[arg(long, default_value = "bench/fuzz")]
    out: PathBuf,
    /// Loaders, comma-separated (default: all): npy, npy-labels, idx, idx-gzip, checkpoint, train-state,
    /// csv, toml, gmm-json, image-png, image-jpeg.
    #[arg(long, value_delimiter = ',')]
    loader: Vec<String>,
    /// Seconds per loader.
    #[arg(long, default_value_t = 600.0)]
    seconds: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct MnistBenchArgs {
    /// Output folder.
    #[arg(long, default_value = "bench/mnist")]
    out: PathBuf,
    /// Teacher steps (batch 64).
    #[arg(long, default_value_t = 3000, conflicts_with = "shipped_teacher")]
    teacher_steps: usize,
    /// Start from the shipped teacher (the same recipe at 3000 steps, trained by an earlier build) instead
    /// of training one.
    #[arg(long)]
    shipped_teacher: bool,
    /// Steps of each distillation (the data-only methods train for the teacher's and these together).
    #[arg(long, default_value_t = 1000)]
    map_steps: usize,
    /// Batch size of the maps.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// The data-only methods (meanflow, self-lmd, shortcut): trained from scratch for the teacher's steps
    /// and a distillation's, or fine-tuned from the flow-matching teacher for a distillation's.
    #[arg(long, value_enum, default_value = "scratch")]
    data_only: DataOnlyInit,
    /// Methods, comma-separated (default: every one).
    #[arg(long, value_delimiter = ',')]
    methods: Vec<String>,
    /// Samples per evaluation row.
    #[arg(long, default_value_t = 2000)]
    n_eval: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum DataOnlyInit {
    Scratch,
    Finetune,
}

#[derive(Args)]
struct GuidanceBenchArgs {
    /// Output folder.
    #[arg(long, default_value = "bench/guidance")]
    out: PathBuf,
    /// The class-conditional teacher (default: the shipped MNIST teacher).
    #[arg(long)]
    teacher: Option<PathBuf>,
    /// Guidance scales measured, comma-separated (each inside --range).
    #[arg(long, default_value = "1,1.5,2,3,4")]
    scales: String,
    /// The maps' guidance range LO,HI.
    #[arg(long, default_value = "1,4")]
    range: String,
    /// The teacher-based method that distils the guided teacher (emd, lmd, emd-cont, lmd-cont, cm, ctm,
    /// progressive, direct).
    #[arg(long, default_value = "cm")]
    method: String,
    /// Steps of each map.
    #[arg(long, default_value_t = 3000)]
    map_steps: usize,
    /// Batch size of each map.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Steps of the autoguidance model (batch 64).
    #[arg(long, default_value_t = 600)]
    weak_steps: usize,
    /// First-level channels of the autoguidance model.
    #[arg(long, default_value_t = 8)]
    weak_channels: usize,
    /// Samples per evaluation row.
    #[arg(long, default_value_t = 500)]
    n_eval: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct SpeedArgs {
    /// Output folder.
    #[arg(long, default_value = "bench-out/speed")]
    out: PathBuf,
    /// Hidden widths, comma-separated.
    #[arg(long, default_value = "256,512")]
    widths: String,
    /// Batch sizes, comma-separated.
    #[arg(long, default_value = "256,1024,4096")]
    batches: String,
    /// Networks to measure: mlp (2-D points), unet (28 × 28 digits), comma-separated.
    #[arg(long, default_value = "mlp,unet")]
    nets: String,
    /// The U-Nets' first-level channels, comma-separated.
    #[arg(long, default_value = "16,32")]
    unet_channels: String,
    /// The U-Nets' batch sizes, comma-separated.
    #[arg(long, default_value = "32,128,256")]
    unet_batches: String,
    /// Minimum timed seconds per row.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Also run the PyTorch peer (bench/peer/torch_peer.py; needs `pip install torch`).
    #[arg(long)]
    peer: bool,
    /// Rounds (peer, then flowmap, in each); every figure is the best of its rounds.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Python interpreter for the peer.
    #[arg(long, default_value = "python3")]
    python: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct JvpArgs {
    /// Output folder.
    #[arg(long, default_value = "bench-out/jvp")]
    out: PathBuf,
}

#[derive(Args)]
struct CompareArgs {
    /// Output folder.
    #[arg(long, default_value = "bench-out/compare")]
    out: PathBuf,
    /// Training seconds per method.
    #[arg(long, default_value_t = 30.0)]
    budget_seconds: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct AblationArgs {
    /// Output folder.
    #[arg(long, default_value = "bench-out")]
    out: PathBuf,
    /// Methods, comma-separated.
    #[arg(long, default_value = "emd,lmd")]
    methods: String,
    #[arg(long, default_value_t = 1500)]
    steps: usize,
    #[arg(long, default_value_t = 512)]
    batch: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args, Clone)]
struct TrainFlags {
    /// Optimisation steps.
    #[arg(long)]
    steps: Option<usize>,
    /// Batch size.
    #[arg(long)]
    batch: Option<usize>,
    /// Peak learning rate (AdamW, warm-up then cosine decay).
    #[arg(long)]
    lr: Option<f64>,
    /// EMA decay of the weights.
    #[arg(long)]
    ema: Option<f64>,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A TOML file with `[train]` (and for distill `[distill]`) tables; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    long: supervise::LongRunFlags,
}

#[derive(Args)]
struct TeacherArgs {
    /// Data spec: checkerboard, moons, 8gaussians, spirals, rings, swissroll, gmm:SPEC.json, FILE.npy, FILE.csv, mnist.
    #[arg(long)]
    data: String,
    /// Labels of an .npy image array: a 1-D .npy of N integers (class-conditional training).
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Output checkpoint (.safetensors).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    train: TrainFlags,
    /// Backbone settings (an MLP defaults to width 256, depth 3, 16 time frequencies up to 64).
    #[command(flatten)]
    arch: ArchFlags,
}

#[derive(Args)]
struct DistillArgs {
    /// Teacher checkpoint, or `gmm:SPEC.json` for the analytic mixture teacher.
    #[arg(long)]
    teacher: String,
    /// Objective: emd, lmd, emd-cont, lmd-cont, cm, ctm, progressive or direct.
    #[arg(long, long_help = methods_help(true))]
    method: String,
    /// Output checkpoint (.safetensors).
    #[arg(long)]
    out: PathBuf,
    /// Data for x_t (default: the teacher's own data).
    #[arg(long)]
    data: Option<String>,
    /// Labels of an .npy image array: a 1-D .npy of N integers (class-conditional training).
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Distil classifier-free guidance into the map: LO,HI (or one value W); each training pair draws w from
    /// the range and the map takes w as an input (`sample --guidance w`, one NFE per step).
    #[arg(long, allow_hyphen_values = true)]
    guidance_range: Option<String>,
    /// Autoguidance distilled into the map: with --guidance-range, the teacher is guided by this weaker
    /// model of the same data, v_weak + w·(v − v_weak), instead of by its null class (conditional or
    /// unconditional teachers).
    #[arg(long)]
    guide_model: Option<PathBuf>,
    #[command(flatten)]
    train: TrainFlags,
    #[command(flatten)]
    map: MapFlags,
}

/// Guidance at sampling time.
#[derive(Args, Clone)]
struct GuidanceFlags {
    /// Guidance scale w ≥ 0. A class-conditional teacher: classifier-free guidance
    /// v(x, t, ∅) + w·(v(x, t, c) − v(x, t, ∅)), two evaluations per step in one batch (1: the conditional
    /// model); with --guide-model, autoguidance. A guidance-distilled map: its input w, one evaluation.
    #[arg(long, allow_negative_numbers = true)]
    guidance: Option<f64>,
    /// Autoguidance (Karras et al. 2024): guide the teacher by this weaker model of the same data (an
    /// earlier or smaller checkpoint), v_weak + w·(v − v_weak); conditional or unconditional.
    #[arg(long)]
    guide_model: Option<PathBuf>,
}

impl GuidanceFlags {
    /// The guiding model, loaded.
    fn load(&self, device: &Device) -> Result<Option<Teacher>> {
        let Some(p) = &self.guide_model else { return Ok(None) };
        if self.guidance.is_none() {
            bail!("--guide-model guides at a scale: give it with --guidance w");
        }
        load_guide(p, device).map(Some)
    }
}

/// The model `--guide-model` names.
fn load_guide(path: &Path, device: &Device) -> Result<Teacher> {
    Teacher::load(&path.to_string_lossy(), device).map_err(|e| anyhow::anyhow!("--guide-model: {e}"))
}

/// `LO,HI` or `W` (the range `[W, W]`) of `--guidance-range`.
fn parse_guidance_range(s: &str) -> Result<[f64; 2]> {
    parse_range(s, "--guidance-range")
}

/// A guidance range `LO,HI` or `W` given to `flag`.
fn parse_range(s: &str, flag: &str) -> Result<[f64; 2]> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    let num = |p: &str| -> Result<f64> {
        p.parse::<f64>()
            .map_err(|_| anyhow::anyhow!("{flag} {s}: '{p}' is not a number (expected LO,HI or W)"))
    };
    let range = match parts[..] {
        [w] => [num(w)?; 2],
        [lo, hi] => [num(lo)?, num(hi)?],
        _ => bail!("{flag} {s}: expected LO,HI or W"),
    };
    flowmap::backbone::check_guidance_range(range)?;
    Ok(range)
}

#[derive(Args)]
struct TrainArgs {
    /// Teacher-free objective: meanflow, self-lmd or shortcut.
    #[arg(long, long_help = methods_help(false))]
    method: String,
    /// Data spec (as for `teacher`).
    #[arg(long)]
    data: String,
    /// Labels of an .npy image array: a 1-D .npy of N integers (class-conditional training).
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Output checkpoint (.safetensors).
    #[arg(long)]
    out: PathBuf,
    /// Train classifier-free guidance in from labelled data: LO,HI (or one value W). Each row draws ω from
    /// the range; its target velocity is ω·(x1 − x0) + (1 − ω)·(the map's own unconditional velocity), and
    /// the map takes ω as an input (`sample --guidance w`, one NFE per step).
    #[arg(long, allow_hyphen_values = true)]
    guidance_range: Option<String>,
    #[command(flatten)]
    train: TrainFlags,
    #[command(flatten)]
    map: MapFlags,
}

/// Settings of the flow-map objectives and of a fresh student network.
#[derive(Args)]
struct MapFlags {
    /// Fixed teacher step fraction ε of the discrete objectives (default: annealed 0.5 → 0.02).
    #[arg(long)]
    eps: Option<f64>,
    /// Fraction of each batch on the diagonal s = t.
    #[arg(long)]
    diagonal_fraction: Option<f64>,
    /// Spacing ρ of the consistency-distillation grid t_k = (k/N)^ρ (cm only; 1 is uniform, default 4).
    #[arg(long)]
    cm_time_power: Option<f64>,
    /// Fraction of the off-diagonal pairs on the jumps of 1-, 2-, 4- and 8-step uniform grids.
    #[arg(long)]
    grid_fraction: Option<f64>,
    /// Weighting: constant, normalized or adaptive.
    #[arg(long)]
    weighting: Option<String>,
    /// Target network θ⁻: current or ema.
    #[arg(long)]
    target: Option<String>,
    /// (t, s) distribution: uniform or logit-normal.
    #[arg(long)]
    times: Option<String>,
    /// Tangents of the continuous-time objectives: exact (forward-mode JVP) or fd (finite differences).
    #[arg(long)]
    jvp: Option<String>,
    /// MeanFlow's JVP tangent in x: conditional (x1 − x0, the default) or model (the network's own diagonal).
    #[arg(long)]
    meanflow_tangent: Option<String>,
    /// The velocity MeanFlow's target is built from: conditional (x1 − x0, the default) or batch (the batch's
    /// estimate of the marginal velocity).
    #[arg(long)]
    meanflow_velocity: Option<String>,
    /// A fresh student's backbone (network teachers set the student's themselves; an MLP student defaults
    /// to width 256, depth 3, 8 time frequencies up to 4).
    #[command(flatten)]
    arch: ArchFlags,
}

impl MapFlags {
    fn objective(&self, base: DistillConfig, method: Method) -> Result<DistillConfig> {
        let mut dcfg = base;
        if let Some(e) = self.eps {
            dcfg.eps = EpsSchedule::Fixed { eps: e };
        }
        if let Some(f) = self.diagonal_fraction {
            dcfg.times.diagonal_fraction = f;
        }
        if let Some(rho) = self.cm_time_power {
            if method != Method::Cm {
                bail!("--cm-time-power applies to --method cm only");
            }
            dcfg.continuous.cm_time_power = rho;
        }
        if let Some(f) = self.grid_fraction {
            dcfg.times.grid_fraction = f;
        }
        if let Some(w) = &self.weighting {
            dcfg.weighting = match w.as_str() {
                "constant" => Weighting::Constant,
                "normalized" => Weighting::Normalized,
                "adaptive" => Weighting::Adaptive { c: 1e-3, p: 1.0 },
                other => bail!("unknown weighting '{other}' (expected constant, normalized or adaptive)"),
            };
        }
        if let Some(t) = &self.target {
            dcfg.target = match t.as_str() {
                "current" => TargetNet::Current,
                "ema" => TargetNet::Ema,
                other => bail!("unknown target '{other}' (expected current or ema)"),
            };
        }
        if let Some(t) = &self.times {
            dcfg.times.distribution = match t.as_str() {
                "uniform" => TimeDistribution::Uniform,
                "logit-normal" => TimeDistribution::LogitNormal { mean: 0.0, std: 1.0 },
                other => bail!("unknown time distribution '{other}' (expected uniform or logit-normal)"),
            };
        }
        if let Some(j) = &self.jvp {
            dcfg.continuous.jvp = match j.as_str() {
                "exact" => JvpMode::Exact,
                "fd" => JvpMode::FiniteDifference { h: 1e-3 },
                other => bail!("unknown JVP mode '{other}' (expected exact or fd)"),
            };
        }
        if let Some(m) = &self.meanflow_tangent {
            dcfg.continuous.meanflow_tangent = meanflow_choice(
                method,
                "tangent",
                m,
                &[
                    ("conditional", MeanFlowTangent::Conditional),
                    ("model", MeanFlowTangent::Model),
                ],
            )?;
        }
        if let Some(m) = &self.meanflow_velocity {
            dcfg.continuous.meanflow_velocity = meanflow_choice(
                method,
                "velocity",
                m,
                &[
                    ("conditional", MeanFlowVelocity::Conditional),
                    ("batch", MeanFlowVelocity::Batch),
                ],
            )?;
        }
        dcfg.validate()?;
        Ok(dcfg)
    }

    fn arch(&self, shape: &[usize], classes: Option<usize>, file: &RunConfig) -> Result<Arch> {
        let mlp = MlpConfig {
            time_features: 8,
            max_frequency: 4.0,
            ..MlpConfig::for_shape(shape)
        };
        self.arch.build(shape, classes, file, mlp)
    }
}

#[derive(Args)]
struct SampleArgs {
    /// Flow-map or teacher checkpoint, or gmm:SPEC.json.
    #[arg(long)]
    model: String,
    /// Network evaluations: steps of the flow map, or the teacher solver's evaluation budget.
    #[arg(long, default_value_t = 1)]
    nfe: usize,
    /// Custom descending time grid from 1 to 0 for a flow map, e.g. 1,0.6,0 (overrides --nfe).
    #[arg(long, conflicts_with = "grid_power")]
    grid: Option<String>,
    /// A flow map's --nfe steps on the grid t_i = (1 − i/k)^ρ: 1 is uniform, larger ρ steps finer near the data.
    #[arg(long, default_value_t = 1.0)]
    grid_power: f64,
    /// Teacher solver: euler, heun, midpoint, rk4 or dopri5.
    #[arg(long, default_value = "euler")]
    solver: String,
    /// Flow-map sampler: deterministic, consistency or gamma:G (default: deterministic; consistency for a
    /// consistency model).
    #[arg(long)]
    sampler: Option<String>,
    /// Number of samples.
    #[arg(long, default_value_t = 10_000)]
    n: usize,
    /// Class of a class-conditional model's samples: K, all (sample i gets class i mod C, the default) or
    /// null (the unconditional model).
    #[arg(long)]
    class: Option<String>,
    /// Output .npy (n × state shape, float32; images in the data's own value range).
    #[arg(long)]
    out: PathBuf,
    /// Also write the images as a PNG grid (one row per class with --class all).
    #[arg(long)]
    png: Option<PathBuf>,
    #[command(flatten)]
    guide: GuidanceFlags,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct ApplyArgs {
    /// Flow-map or teacher checkpoint, or gmm:SPEC.json.
    #[arg(long)]
    model: String,
    /// Start time t.
    #[arg(long)]
    t: f64,
    /// End time s ≤ t.
    #[arg(long)]
    s: f64,
    /// Input points (.npy or .csv, N × D), or images (.npy, N × C × H × W in the data's own range).
    #[arg(long)]
    input: PathBuf,
    /// Class of a class-conditional model: K, all (row i gets class i mod C, the default) or null.
    #[arg(long)]
    class: Option<String>,
    #[command(flatten)]
    guide: GuidanceFlags,
    /// Output .npy.
    #[arg(long)]
    out: PathBuf,
    /// Solver for teachers: euler, heun, midpoint, rk4 or dopri5.
    #[arg(long, default_value = "dopri5")]
    solver: String,
    /// Steps of a fixed-step solver.
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// Tolerance of dopri5.
    #[arg(long, default_value_t = 1e-5)]
    tol: f64,
}

#[derive(Args)]
struct EvalArgs {
    /// Flow-map or teacher checkpoint.
    #[arg(long)]
    model: String,
    /// Held-out data spec (default: the model's training data).
    #[arg(long)]
    data: Option<String>,
    /// Labels of an .npy image array: a 1-D .npy of N integers (class-conditional training).
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Comma-separated NFE values.
    #[arg(long, default_value = "1,2,4,8")]
    nfe: String,
    /// Samples per row.
    #[arg(long, default_value_t = 10_000)]
    n: usize,
    /// How a flow map walks its grid: deterministic, consistency or gamma:G (default: consistency for a
    /// consistency model, deterministic otherwise).
    #[arg(long)]
    sampler: Option<String>,
    /// A flow map's k-step grid t_i = (1 − i/k)^ρ: 1 is uniform, larger ρ steps finer near the data.
    #[arg(long, default_value_t = 1.0)]
    grid_power: f64,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// Images: the classifier whose features FD, precision and recall are measured in (default: the
    /// shipped MNIST classifier).
    #[arg(long)]
    classifier: Option<PathBuf>,
    #[command(flatten)]
    guide: GuidanceFlags,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct ClassifierArgs {
    /// Labelled images (e.g. mnist, the embedded digits).
    #[arg(long)]
    data: String,
    /// Labels of an .npy image array: a 1-D .npy of N integers (class-conditional training).
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Output classifier (.safetensors).
    #[arg(long)]
    out: PathBuf,
    /// Optimisation steps.
    #[arg(long, default_value_t = 1000)]
    steps: usize,
    /// Batch size.
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Peak learning rate (AdamW, cosine decay).
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct DemoArgs {
    /// Which demo: the 2-D one (default) or mnist (class-conditional U-Net on the embedded digits).
    which: Option<String>,
    /// Output folder (default demo-out, or demo-mnist for mnist).
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long)]
    teacher_steps: Option<usize>,
    #[arg(long)]
    distill_steps: Option<usize>,
    #[arg(long)]
    gmm_steps: Option<usize>,
    #[arg(long)]
    n_eval: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn main() -> ExitCode {
    alloc::keep_freed_memory();
    // Output piped into a reader that stops early (`| head`) ends the program quietly, as in any Unix tool,
    // instead of a panic on the failed write.
    #[cfg(unix)]
    // SAFETY: restores the default disposition of SIGPIPE before any other thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind::*;
            if matches!(
                e.kind(),
                DisplayHelp | DisplayVersion | DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One line: clap's first line names the problem; a list that follows a colon is folded in.
            let text = e.render().to_string();
            let mut lines = text.lines();
            let mut line = lines.next().unwrap_or("error: bad arguments").to_string();
            if line.ends_with(':') {
                let items: Vec<&str> = lines.map(str::trim).take_while(|l| !l.is_empty()).collect();
                line = format!("{} {}", line, items.join(", "));
            }
            eprintln!("{line}");
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<supervise::Interrupted>() => {
            eprintln!("{e}");
            ExitCode::from(supervise::INTERRUPTED)
        }
        Err(e) => {
            // The library's messages already name their cause; the chain would repeat it.
            let msg = e.to_string();
            eprintln!("error: {}", msg.lines().next().unwrap_or(""));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let n = match cli.threads {
        Some(0) => bail!("--threads must be at least 1"),
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    flowmap::set_compute_threads(n);
    // Everything runs on one rayon pool of n workers, the caller included: the fused kernels' parallel
    // regions then start on a worker that is already awake instead of waking the pool from outside.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(n).build()?;
    pool.install(|| run_command(cli))
}

fn run_command(cli: Cli) -> Result<()> {
    let device = flowmap::parse_device(&cli.device)?;
    let show = !cli.quiet;
    match cli.command {
        Command::Teacher(a) => teacher(a, &device, show),
        Command::Distill(a) => distill(a, &device, show),
        Command::Train(a) => train_cmd(a, &device, show),
        Command::Sample(a) => sample_cmd(a, &device),
        Command::Apply(a) => apply(a, &device),
        Command::Eval(a) => eval(a, &device),
        Command::Demo(a) => demo_cmd(a, &device, show),
        Command::Classifier(a) => classifier_cmd(a, &device, show),
        Command::Bench(BenchCommand::Compare(a)) => {
            if !(a.budget_seconds > 0.0) {
                bail!("--budget-seconds must be positive");
            }
            let rows = bench::compare(&a.out, a.budget_seconds, a.seed, &device, show)?;
            println!("{} rows; wrote {}", rows.len(), a.out.join("compare.md").display());
            Ok(())
        }
        Command::Bench(BenchCommand::Speed(a)) => {
            if !(a.seconds > 0.0 && a.seconds.is_finite()) {
                bail!("--seconds must be positive");
            }
            if a.rounds == 0 {
                bail!("--rounds must be at least 1");
            }
            let opts = bench::SpeedOptions {
                widths: parse_sizes(&a.widths, "--widths")?,
                batches: parse_sizes(&a.batches, "--batches")?,
                nets: a.nets.split(',').map(|n| n.trim().to_string()).collect(),
                unet_channels: parse_sizes(&a.unet_channels, "--unet-channels")?,
                unet_batches: parse_sizes(&a.unet_batches, "--unet-batches")?,
                seconds: a.seconds,
                peer: a.peer,
                rounds: a.rounds,
                python: a.python,
                seed: a.seed,
            };
            let report = bench::speed(&a.out, &opts, &device, show)?;
            for r in &report.rows {
                let peer = match (r.peer, r.ratio) {
                    (Some(p), Some(x)) => format!("  PyTorch {p:10.1}  ratio {x:5.2}"),
                    _ => String::new(),
                };
                println!(
                    "{:15} width {:4} batch {:5}: {:10.1} {}{peer}",
                    r.workload, r.width, r.batch, r.value, r.unit
                );
            }
            println!(
                "peer: {}; wrote {}",
                report.peer_status,
                a.out.join("speed.md").display()
            );
            Ok(())
        }
        Command::Bench(BenchCommand::Mnist(a)) => {
            if a.teacher_steps == 0 || a.map_steps == 0 || a.batch == 0 || a.n_eval < 10 {
                bail!("bench budgets must be positive (and --n-eval at least 10)");
            }
            let teacher_steps = (!a.shipped_teacher).then_some(a.teacher_steps);
            let mut cfg = demo_mnist::MnistConfig::bench(teacher_steps, a.map_steps, a.n_eval, a.seed);
            cfg.batch_size = a.batch;
            cfg.data_only_from_scratch = matches!(a.data_only, DataOnlyInit::Scratch);
            if !a.methods.is_empty() {
                cfg.methods = a.methods.iter().map(|m| m.parse()).collect::<flowmap::Result<_>>()?;
            }
            let report = demo_mnist::run(&a.out, &cfg, &device, show)?;
            print!("{}", report::image_table(&report.rows));
            println!("{:.0} s; wrote {}", report.seconds, a.out.join("report.md").display());
            Ok(())
        }
        Command::Bench(BenchCommand::Guidance(a)) => {
            if a.map_steps == 0 || a.weak_steps == 0 || a.n_eval < 10 {
                bail!("bench budgets must be positive (and --n-eval at least 10)");
            }
            let scales = a
                .scales
                .split(',')
                .map(|p| {
                    p.trim()
                        .parse::<f64>()
                        .map_err(|_| anyhow::anyhow!("--scales {}: '{p}' is not a number", a.scales))
                })
                .collect::<Result<Vec<_>>>()?;
            if let Some(t) = &a.teacher {
                if !t.is_file() {
                    bail!("--teacher {}: no such file", t.display());
                }
            }
            let cfg = bench::guidance::GuidanceConfig {
                teacher: a.teacher.clone(),
                scales,
                range: parse_range(&a.range, "--range")?,
                method: a.method.parse()?,
                map_steps: a.map_steps,
                batch_size: a.batch,
                weak_steps: a.weak_steps,
                weak_channels: a.weak_channels,
                n_eval: a.n_eval,
                seed: a.seed,
                ..Default::default()
            };
            let report = bench::guidance::run(&a.out, &cfg, &device, show)?;
            println!("{:.0} s; wrote {}", report.seconds, a.out.join("guidance.md").display());
            Ok(())
        }
        Command::Bench(BenchCommand::Fuzz(a)) => {
            if !(a.seconds >= 0.0 && a.seconds.is_finite()) {
                bail!("--seconds must be a non-negative number, got {}", a.seconds);
            }
            io::create_dir(&a.out)?;
            let rows = bench::fuzz::run(&a.out, &a.loader, a.seconds, a.seed, &|name| {
                if show {
                    eprintln!("fuzzing {name} for {} s", a.seconds);
                }
            })?;
            let json = serde_json::json!({ "seconds_per_loader": a.seconds, "seed": a.seed, "loaders": rows });
            io::write_text(&a.out.join("fuzz.json"), &serde_json::to_string_pretty(&json)?)?;
            let md = bench::fuzz::table(&rows);
            io::write_text(&a.out.join("fuzz.md"), &md)?;
            print!("{md}");
            let bad: u64 = rows.iter().map(|r| r.panics + r.over_memory).sum();
            if bad > 0 {
                for f in rows.iter().flat_map(|r| &r.findings) {
                    eprintln!("finding: {f}");
                }
                bail!("{bad} loads panicked or held more memory than their file justifies");
            }
            Ok(())
        }
        Command::Bench(BenchCommand::Jvp(a)) => {
            for r in bench::jvp(&a.out, &device)? {
                println!(
                    "batch {:5} hidden {:4}: forward {:.3} ms, JVP {:.3} ms ({:.2}×), FD {:.3} ms ({:.2}×)",
                    r.batch, r.hidden, r.forward_ms, r.jvp_ms, r.jvp_ratio, r.fd_jvp_ms, r.fd_ratio
                );
            }
            Ok(())
        }
        Command::Bench(BenchCommand::Ablation(a)) => {
            let methods = a
                .methods
                .split(',')
                .map(|m| m.trim().parse::<Method>())
                .collect::<flowmap::Result<Vec<_>>>()?;
            let rows = bench::ablation(&a.out, &methods, a.steps, a.batch, a.seed, &device, show)?;
            for r in rows {
                println!(
                    "{:4} {:34} rel {:.3e}  semigroup {:.3e}  {:.1}s",
                    r.method, r.variant, r.relative_error, r.semigroup, r.seconds
                );
            }
            Ok(())
        }
    }
}

/// `--method`'s long help, from the method registry.
fn methods_help(teacher: bool) -> String {
    let what = if teacher {
        "Objective (distils the teacher)"
    } else {
        "Teacher-free objective"
    };
    format!("{what}:\n{}", flowmap::objective::registry::describe(teacher))
}

/// A comma-separated list of positive sizes.
fn parse_sizes(s: &str, flag: &str) -> Result<Vec<usize>> {
    s.split(',')
        .map(|x| match x.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => bail!("{flag}: '{}' is not a positive integer", x.trim()),
        })
        .collect()
}

fn read_config(path: &Option<PathBuf>) -> Result<RunConfig> {
    Ok(match path {
        None => RunConfig::default(),
        Some(p) => RunConfig::from_file(p)?,
    })
}

fn train_config(f: &TrainFlags, base: Option<TrainConfig>) -> TrainConfig {
    let mut c = base.unwrap_or_default();
    if let Some(v) = f.steps {
        c.steps = v;
    }
    if let Some(v) = f.batch {
        c.batch_size = v;
    }
    if let Some(v) = f.lr {
        c.lr = v;
    }
    if let Some(v) = f.ema {
        c.ema_decay = v;
    }
    c.seed = f.seed;
    c
}

/// The data named by `--data`, with `--labels` for an `.npy` image array.
fn open_data(spec: &str, labels: &Option<PathBuf>) -> Result<DataSource> {
    Ok(match labels {
        Some(l) => DataSource::from_spec(&DataSource::npy_with_labels(Path::new(spec), l))?,
        None => DataSource::from_spec(spec)?,
    })
}

fn check_output(path: &Path, ext: &str) -> Result<()> {
    if path.extension().and_then(|e| e.to_str()) != Some(ext) {
        bail!("output {} must end in .{ext}", path.display());
    }
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !dir.is_dir() {
            bail!("output folder {} does not exist", dir.display());
        }
    }
    Ok(())
}

fn teacher(a: TeacherArgs, device: &Device, show: bool) -> Result<()> {
    check_output(&a.out, "safetensors")?;
    let file = read_config(&a.train.config)?;
    let cfg = train_config(&a.train, file.train.clone());
    cfg.validate()?;
    let data = open_data(&a.data, &a.labels)?;
    let shape = data.state_shape();
    let arch = a
        .arch
        .build(&shape, data.num_classes(), &file, MlpConfig::for_shape(&shape))?;
    let mut sup = supervise::Supervisor::new(&a.train.long, &a.out)?;
    let pb = progress_bar(cfg.steps as u64, "teacher", show);
    let bar = report::bar_for(&pb, &shape, cfg.batch_size);
    let trained = sup.run(|ctl| pipeline::train_teacher_controlled(&data, &arch, &cfg, device, &*bar, ctl))?;
    pb.finish_and_clear();
    trained.save(&a.out)?;
    let (first, last) = trained.log.first_last();
    eprintln!(
        "teacher: {} steps in {:.1}s, loss {first:.4} → {last:.4}; wrote {}",
        cfg.steps,
        trained.log.seconds,
        a.out.display()
    );
    Ok(())
}

fn distill(a: DistillArgs, device: &Device, show: bool) -> Result<()> {
    let method = Method::parse_distill(&a.method)?;
    check_output(&a.out, "safetensors")?;
    let file = read_config(&a.train.config)?;
    let mut cfg = train_config(&a.train, file.train.clone());
    if let Some(r) = &a.guidance_range {
        cfg.guidance_range = Some(parse_guidance_range(r)?);
    }
    cfg.validate()?;
    if a.data.is_none() && a.labels.is_some() {
        bail!("--labels goes with --data");
    }
    let given = a.data.as_ref().map(|spec| open_data(spec, &a.labels)).transpose()?;
    let teacher = load_teacher(&a.teacher, given.as_ref(), &a.map, &file, device)?;
    if matches!(teacher, Teacher::Net { .. }) && a.map.arch.any() {
        bail!("a network teacher fixes the student's backbone (it starts as the teacher); drop the --arch flags");
    }
    let data = match given {
        Some(d) => d,
        None => teacher.data()?,
    };
    let base = DistillConfig::for_data(method, &teacher.state_shape(), data.num_classes().is_some());
    let dcfg = a.map.objective(file.distill_config_over(base)?, method)?;
    let guide = a.guide_model.as_deref().map(|p| load_guide(p, device)).transpose()?;
    let job = MapJob {
        teacher: Some(&teacher),
        guide: guide.as_ref(),
        objective: dcfg,
        train: cfg,
        arch: a.map.arch(&teacher.state_shape(), data.num_classes(), &file)?,
        device: device.clone(),
        ..MapJob::new(method, &data)
    };
    run_map(&job, &a.out, &a.train.long, show)
}

/// The teacher of `distill`: `gmm:SPEC.json`, a flowmap checkpoint, or a plain safetensors state dict (a
/// PyTorch model's, say) whose architecture the `--config` file's `[arch]` table gives and whose data
/// `--data` names.
fn load_teacher(
    spec: &str,
    data: Option<&DataSource>,
    flags: &MapFlags,
    file: &RunConfig,
    device: &Device,
) -> Result<Teacher> {
    let path = Path::new(spec);
    if spec.starts_with("gmm:") || !path.is_file() || Checkpoint::has_metadata(path)? {
        return Ok(Teacher::load(spec, device)?);
    }
    let why = "has no flowmap metadata (a state dict saved by another framework?)";
    let (Some(data), Some(_)) = (data, file.arch_kind()?) else {
        bail!(
            "{spec} {why}: give its architecture with --config FILE (an [arch] table with its kind, e.g. kind = \"unet\") and its data with --data"
        );
    };
    let arch = flags.arch(&data.state_shape(), data.num_classes(), file)?;
    let foreign = flowmap::checkpoint::Foreign {
        kind: ModelKind::Teacher,
        arch,
        data: data.name(),
        scale: data.scale(),
    };
    Ok(Teacher::from_checkpoint(
        Checkpoint::load_foreign(path, foreign)?,
        device,
    )?)
}

fn train_cmd(a: TrainArgs, device: &Device, show: bool) -> Result<()> {
    let method = Method::parse_train(&a.method)?;
    check_output(&a.out, "safetensors")?;
    let file = read_config(&a.train.config)?;
    let mut cfg = train_config(&a.train, file.train.clone());
    if let Some(r) = &a.guidance_range {
        cfg.guidance_range = Some(parse_guidance_range(r)?);
    }
    cfg.validate()?;
    let data = open_data(&a.data, &a.labels)?;
    let base = DistillConfig::for_data(method, &data.state_shape(), data.num_classes().is_some());
    let dcfg = a.map.objective(file.distill_config_over(base)?, method)?;
    let job = MapJob {
        objective: dcfg,
        train: cfg,
        arch: a.map.arch(&data.state_shape(), data.num_classes(), &file)?,
        device: device.clone(),
        ..MapJob::new(method, &data)
    };
    run_map(&job, &a.out, &a.train.long, show)
}

/// Runs a flow-map job behind a progress bar and saves its map.
fn run_map(job: &MapJob<'_>, out: &Path, long: &supervise::LongRunFlags, show: bool) -> Result<()> {
    let (method, steps) = (job.method, job.train.steps);
    let mut sup = supervise::Supervisor::new(long, out)?;
    let pb = progress_bar(steps as u64, method.name(), show);
    let bar = report::bar_for(&pb, &job.data.state_shape(), job.train.batch_size);
    let m = sup.run(|ctl| job.run_controlled(&*bar, ctl))?;
    pb.finish_and_clear();
    m.save(out)?;
    let (first, last) = m.log.first_last();
    eprintln!(
        "{method}: {steps} steps in {:.1}s, loss {first:.4} → {last:.4}; wrote {}",
        m.log.seconds,
        out.display()
    );
    Ok(())
}

/// A model named on the command line: a flow map, or a teacher (network or analytic).
enum Model {
    Map(flowmap::flow_map::FlowMapNet, Checkpoint),
    Teacher(Teacher),
}

/// The value of `--meanflow-<what>` among `options`: an error for any method but meanflow, or an unknown name.
fn meanflow_choice<T: Copy>(method: Method, what: &str, name: &str, options: &[(&str, T)]) -> Result<T> {
    if method != Method::Meanflow {
        bail!("--meanflow-{what} applies to --method meanflow only");
    }
    match options.iter().find(|(n, _)| *n == name) {
        Some(&(_, v)) => Ok(v),
        None => {
            let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
            bail!("unknown MeanFlow {what} '{name}' (expected {})", names.join(" or "))
        }
    }
}

fn load_model(spec: &str, device: &Device) -> Result<Model> {
    if spec.starts_with("gmm:") {
        return Ok(Model::Teacher(Teacher::load(spec, device)?));
    }
    let ck = Checkpoint::load(Path::new(spec))?;
    Ok(match ck.meta.kind {
        ModelKind::FlowMap | ModelKind::ConsistencyModel => {
            let (net, _) = ck.flow_map_net(device)?;
            Model::Map(net, ck)
        }
        ModelKind::Teacher => {
            let (net, vars) = ck.velocity_net(device)?;
            Model::Teacher(Teacher::Net {
                net,
                vars,
                meta: ck.meta,
            })
        }
    })
}

fn write_tensor(path: &Path, x: &Tensor) -> Result<()> {
    let v = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    data::write_npy_f32_shape(path, x.dims(), &v)?;
    Ok(())
}

impl Model {
    /// The shape of one state.
    fn state_shape(&self) -> Vec<usize> {
        match self {
            Model::Map(net, _) => flowmap::flow_map::FlowMap::state_shape(net),
            Model::Teacher(t) => t.state_shape(),
        }
    }

    /// The classes of a class-conditional model.
    fn num_classes(&self) -> Option<usize> {
        match self {
            Model::Map(net, _) => net.arch().num_classes(),
            Model::Teacher(Teacher::Net { meta, .. }) => meta.arch.num_classes(),
            Model::Teacher(_) => None,
        }
    }

    /// How the data's values map to `[−1, 1]`, when the model was trained on images.
    fn scale(&self) -> Option<flowmap::data::Scale> {
        match self {
            Model::Map(_, ck) => ck.meta.scale,
            Model::Teacher(Teacher::Net { meta, .. }) => meta.scale,
            Model::Teacher(_) => None,
        }
    }
}

/// The condition of `n` samples of a model with `classes` under `--class` (`K`, `all` or `null`), and the
/// number of grid rows it asks for (one per class for `all`).
fn class_cond(spec: Option<&str>, n: usize, classes: Option<usize>, device: &Device) -> Result<(Cond, usize)> {
    class_cond_from(spec, 0, n, classes, device)
}

/// [`class_cond`] for samples `start..start + n` (with `all`, sample `i` has class `i mod C`).
fn class_cond_from(
    spec: Option<&str>,
    start: usize,
    n: usize,
    classes: Option<usize>,
    device: &Device,
) -> Result<(Cond, usize)> {
    let Some(c) = classes else {
        if spec.is_some_and(|s| s != "null") {
            bail!(
                "--class {}: the model is unconditional (it was trained without labels)",
                spec.unwrap_or("")
            );
        }
        return Ok((Cond::none(), 0));
    };
    let labels: Vec<u32> = match spec.unwrap_or("all") {
        "all" => (start..start + n).map(|i| (i % c) as u32).collect(),
        "null" => vec![c as u32; n],
        k => match k.parse::<usize>() {
            Ok(k) if k < c => vec![k as u32; n],
            Ok(k) => bail!("--class {k} is out of range: the model has classes 0..{}", c - 1),
            Err(_) => bail!("--class '{k}' is not a class number, all or null"),
        },
    };
    let rows = if spec.unwrap_or("all") == "all" { c } else { 0 };
    Ok((Cond::from_classes(&labels, c, device)?, rows))
}

/// `x` in the data's own value range (images), as the model's checkpoint records it.
fn to_data_range(x: &Tensor, scale: Option<flowmap::data::Scale>) -> Result<Tensor> {
    Ok(match scale {
        Some(s) => x.affine(0.5 * (s.hi - s.lo), s.lo + 0.5 * (s.hi - s.lo))?,
        None => x.clone(),
    })
}

fn sample_cmd(a: SampleArgs, device: &Device) -> Result<()> {
    check_output(&a.out, "npy")?;
    if let Some(p) = &a.png {
        check_output(p, "png")?;
    }
    if a.n == 0 {
        bail!("--n must be at least 1");
    }
    if a.nfe == 0 {
        bail!("--nfe must be at least 1");
    }
    let model = load_model(&a.model, device)?;
    let shape = model.state_shape();
    if a.png.is_some() && shape.len() != 3 {
        bail!("--png writes image grids; this model's states have shape {shape:?}");
    }
    // Checked once up front: the rows of a grid, and a bad --class before anything is written.
    let (_, rows) = class_cond(a.class.as_deref(), 1, model.num_classes(), device)?;
    // Samples stream to the file chunk by chunk (256 images or 65,536 points at a time), so memory stays
    // bounded for any --n; the grid keeps the first GRID_MAX.
    const GRID_MAX: usize = 4096;
    let chunk = sample::chunk_rows(&shape).min(65_536);
    let map_setup = match &model {
        Model::Map(_, ck) => {
            let grid = match &a.grid {
                Some(g) => g.parse::<TimeGrid>()?,
                None => TimeGrid::power(a.nfe, a.grid_power)?,
            };
            let sampler = map_sampler(a.sampler.as_deref(), ck, grid.steps() > 1)?;
            Some((grid, sampler, ck.meta.probability_path()?))
        }
        Model::Teacher(_) => {
            if a.grid.is_some() || a.grid_power != 1.0 {
                bail!("--grid and --grid-power apply to flow maps; teachers take --solver and --nfe");
            }
            None
        }
    };
    let solver = match &model {
        Model::Teacher(_) => Some(teacher_solver(&a.solver, a.nfe)?),
        Model::Map(..) => None,
    };
    let weak = a.guide.load(device)?;
    let field = match &model {
        Model::Teacher(t) => Some(guided(t, a.guide.guidance, weak.as_ref(), model.num_classes())?),
        Model::Map(..) => None,
    };
    let map = match &model {
        Model::Map(net, ck) => Some(map_at(net, ck, &a.guide)?),
        Model::Teacher(_) => None,
    };
    if a.guide.guidance.is_some() && a.guide.guide_model.is_none() && a.class.as_deref() == Some("null") {
        bail!("--guidance needs classes to guide towards; --class null is the unconditional model (guide it with --guide-model)");
    }
    let what = match (&map_setup, solver) {
        (Some((grid, sampler, _)), _) => match guidance_label(&a.guide) {
            Some(g) => format!("flow map on grid {grid}, {sampler:?} sampler, {g}"),
            None => format!("flow map on grid {grid}, {sampler:?} sampler"),
        },
        (None, Some(solver)) => match guidance_label(&a.guide) {
            Some(g) => format!("teacher, {solver}, {g}"),
            None => format!("teacher, {solver}"),
        },
        (None, None) => unreachable!("a model is a map or a teacher"),
    };
    let scale = model.scale();
    let mut kept: Vec<Tensor> = Vec::new();
    let mut kept_rows = 0;
    let mut nfe = 0;
    let header = data::npy::npy_f32_header(&flowmap::state::batch_shape(a.n, &shape));
    io::write_atomic(&a.out, |w| {
        w.write_all(&header)?;
        let run = |z: &Tensor, seed: u64, start: usize| -> flowmap::Result<sample::Sampled> {
            let (cond, _) = class_cond_from(a.class.as_deref(), start, z.dim(0)?, model.num_classes(), device)
                .map_err(|e| flowmap::Error::arg(e.to_string()))?;
            match (&model, &map_setup, solver) {
                (Model::Map(..), Some((grid, sampler, path)), _) => {
                    let cx = SampleContext::new(seed).with_path(&**path).with_cond(&cond);
                    sample::sample_with(&**map.as_ref().expect("a map"), z, grid, *sampler, &cx)
                }
                (Model::Teacher(_), _, Some(solver)) => {
                    sample::sample_ode(field.as_deref().expect("a teacher's field"), z, solver, &cond)
                }
                _ => unreachable!("set up above"),
            }
        };
        let sink = |x: &Tensor| -> flowmap::Result<()> {
            if a.png.is_some() && kept_rows < GRID_MAX {
                let take = x.dim(0)?.min(GRID_MAX - kept_rows);
                kept.push(x.narrow(0, 0, take)?);
                kept_rows += take;
            }
            let v = to_data_range(x, scale)
                .map_err(|e| flowmap::Error::arg(e.to_string()))?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
            w.write_all(&bytes).map_err(|e| flowmap::Error::io(&a.out, e))
        };
        nfe = sample::stream(a.n, &shape, a.seed, chunk, device, run, sink).map_err(std::io::Error::other)?;
        Ok(())
    })?;
    if let Some(p) = &a.png {
        let x = Tensor::cat(&kept, 0)?;
        let rows = if rows > 0 {
            rows
        } else {
            (x.dim(0)? as f64).sqrt().ceil() as usize
        };
        grid::write_grid(p, &x, rows)?;
    }
    eprintln!("{} samples ({what}), NFE {nfe}; wrote {}", a.n, a.out.display());
    Ok(())
}

/// The teacher `t` as `--guidance` asks: classifier-free guidance at `w`, autoguidance by `weak` (the
/// loaded `--guide-model`), or as it is.
fn guided<'a>(
    t: &'a Teacher,
    w: Option<f64>,
    weak: Option<&'a Teacher>,
    classes: Option<usize>,
) -> Result<Box<dyn VelocityField + 'a>> {
    let Some(w) = w else { return Ok(Box::new(t)) };
    if let Some(weak) = weak {
        pipeline::check_guide(t, weak)?;
        return Ok(Box::new(flowmap::teacher::Autoguided::new(t, weak, w)?));
    }
    let Some(c) = classes else {
        bail!("--guidance {w}: the model is unconditional; classifier-free guidance needs a class-conditional teacher (trained on labelled data), or guide it by a weaker model with --guide-model");
    };
    Ok(Box::new(flowmap::teacher::Guided::new(t, w, c)?))
}

/// A flow map as it is evaluated: a guidance-distilled one at `--guidance w` (which it needs), any other
/// as it is (it has no guidance input, so `--guidance` is an error).
fn map_at<'a>(
    net: &'a flowmap::flow_map::FlowMapNet,
    ck: &Checkpoint,
    g: &GuidanceFlags,
) -> Result<Box<dyn flowmap::flow_map::FlowMap + 'a>> {
    if g.guide_model.is_some() {
        bail!(
            "--guide-model guides a teacher; a flow map has its guidance distilled in (distil it with --guide-model)"
        );
    }
    match (ck.meta.arch.guidance(), g.guidance) {
        (None, None) => Ok(Box::new(net)),
        (None, Some(w)) => bail!(
            "--guidance {w}: this flow map was distilled without guidance, so it has no guidance input; guide its teacher instead, or distil with --guidance-range"
        ),
        (Some([lo, hi]), None) => {
            bail!("this flow map has guidance distilled into it (w in [{lo}, {hi}]): pass --guidance w")
        }
        (Some(_), Some(w)) => Ok(Box::new(flowmap::flow_map::AtGuidance::new(net, w)?)),
    }
}

/// What `--guidance` names in reports: `guidance w = …` or `autoguidance w = …`.
fn guidance_label(g: &GuidanceFlags) -> Option<String> {
    let kind = if g.guide_model.is_some() {
        "autoguidance"
    } else {
        "guidance"
    };
    g.guidance.map(|w| format!("{kind} w = {w}"))
}

/// Whether the checkpoint holds a map trained only for `s = 0` (a consistency model).
/// The sampler named on the command line, or the map's own: a consistency model is defined at `s = 0` only,
/// so its multi-step samples re-noise between jumps (and a sampler that would evaluate it at `s > 0` is an
/// error); every other map walks its grid deterministically.
fn map_sampler(name: Option<&str>, ck: &Checkpoint, multi_step: bool) -> Result<Sampler> {
    let boundary = boundary_only(ck);
    let sampler = match (name, boundary) {
        (Some(name), _) => Sampler::parse(name)?,
        (None, true) => Sampler::Consistency,
        (None, false) => Sampler::Deterministic,
    };
    if boundary && !sampler.boundary_only() && multi_step {
        bail!("a consistency model maps only to s = 0: sample it with --sampler consistency (or gamma:1), or with --nfe 1");
    }
    Ok(sampler)
}

fn boundary_only(ck: &Checkpoint) -> bool {
    ck.meta.kind.boundary_only()
}

/// A solver within an NFE budget: as many steps as the budget buys.
fn teacher_solver(name: &str, nfe: usize) -> Result<Solver> {
    if name == "dopri5" {
        return Ok(Solver::dopri5(1e-5));
    }
    let scheme: ode::Scheme = name.parse()?;
    let steps = nfe / scheme.evals_per_step();
    if steps == 0 {
        bail!(
            "{name} needs at least {} evaluations per step; --nfe {nfe} buys none",
            scheme.evals_per_step()
        );
    }
    Ok(Solver::fixed(scheme, steps))
}

fn apply(a: ApplyArgs, device: &Device) -> Result<()> {
    check_output(&a.out, "npy")?;
    for (name, v) in [("t", a.t), ("s", a.s)] {
        if !(0.0..=1.0).contains(&v) {
            bail!("--{name} {v} is outside [0, 1]");
        }
    }
    if a.s > a.t {
        bail!(
            "--s {} is greater than --t {}: flow maps go down in time (0 ≤ s ≤ t ≤ 1)",
            a.s,
            a.t
        );
    }
    let model = load_model(&a.model, device)?;
    let shape = model.state_shape();
    let (rows, x) = if shape.len() == 3 {
        // Images come in the data's own value range, as `sample` writes them.
        let nd = data::npy::read_npy_nd(&a.input)?;
        if nd.shape.len() != 4 || nd.shape[1..] != shape[..] {
            bail!(
                "{} holds an array of shape {:?}, but the model takes N × {:?} images",
                a.input.display(),
                nd.shape,
                shape
            );
        }
        let scale = model.scale();
        let v: Vec<f64> = nd.data.iter().map(|&v| scale.map_or(v, |s| s.to_model(v))).collect();
        (
            nd.shape[0],
            data::to_batch(&v, nd.shape[0], &shape, DType::F32, device)?,
        )
    } else {
        let pts = data::read_points(&a.input)?;
        let dim = flowmap::state::numel(&shape);
        if pts.cols != dim {
            bail!(
                "{} has dimension {}, but the model expects {dim}",
                a.input.display(),
                pts.cols
            );
        }
        (
            pts.rows,
            data::to_batch(&pts.data, pts.rows, &shape, DType::F32, device)?,
        )
    };
    let (c, _) = class_cond(a.class.as_deref(), rows, model.num_classes(), device)?;
    let col = |v: f64| Tensor::full(v as f32, (rows, 1), device);
    let (t, s) = (col(a.t)?, col(a.s)?);
    let y = match &model {
        Model::Map(net, ck) => {
            if boundary_only(ck) && a.s != 0.0 {
                bail!(
                    "a consistency model maps only to s = 0 (got --s {}): it was trained on the boundary",
                    a.s
                );
            }
            flowmap::flow_map::FlowMap::map(&*map_at(net, ck, &a.guide)?, &x, &t, &s, &c)?
        }
        Model::Teacher(tch) => {
            let solver = ode::parse_solver(&a.solver, a.steps, a.tol)?;
            let weak = a.guide.load(device)?;
            let field = guided(tch, a.guide.guidance, weak.as_ref(), model.num_classes())?;
            flowmap::flow_map::FlowMap::map(&SolverMap::new(&*field, solver), &x, &t, &s, &c)?
        }
    };
    write_tensor(&a.out, &to_data_range(&y, model.scale())?)?;
    eprintln!(
        "applied f(x, {}, {}) to {rows} states; wrote {}",
        a.t,
        a.s,
        a.out.display()
    );
    Ok(())
}

fn parse_nfes(s: &str) -> Result<Vec<usize>> {
    let v = s
        .split(',')
        .map(|p| {
            p.trim()
                .parse::<usize>()
                .map_err(|_| anyhow::anyhow!("bad --nfe entry '{p}' (expected e.g. 1,2,4,8)"))
        })
        .collect::<Result<Vec<_>>>()?;
    if v.iter().any(|&k| k == 0) {
        bail!("--nfe values must be at least 1");
    }
    Ok(v)
}

fn eval(a: EvalArgs, device: &Device) -> Result<()> {
    let nfes = parse_nfes(&a.nfe)?;
    if a.n < 2 {
        bail!("--n must be at least 2");
    }
    let model = load_model(&a.model, device)?;
    // The guidance flags are checked before the output folder exists.
    let weak = a.guide.load(device)?;
    match &model {
        Model::Map(net, ck) => drop(map_at(net, ck, &a.guide)?),
        Model::Teacher(t) => drop(guided(t, a.guide.guidance, weak.as_ref(), model.num_classes())?),
    }
    let data = match (&a.data, &model) {
        (Some(spec), _) => open_data(spec, &a.labels)?,
        (None, _) if a.labels.is_some() => bail!("--labels goes with --data"),
        (None, Model::Map(_, ck)) => pipeline::data_of(&ck.meta)?,
        (None, Model::Teacher(t)) => t.data()?,
    };
    let dim = flowmap::state::numel(&model.state_shape());
    if data.dim() != dim {
        bail!(
            "data '{}' has dimension {}, but the model expects {dim}",
            data.name(),
            data.dim()
        );
    }
    // Every flag is checked before the output folder exists: a flow map's sampler and grid, and that a
    // teacher was given neither.
    TimeGrid::power(1, a.grid_power)?;
    let sampler = match &model {
        Model::Map(_, ck) => Some(map_sampler(a.sampler.as_deref(), ck, nfes.iter().any(|&k| k > 1))?),
        Model::Teacher(_) if a.sampler.is_some() => {
            bail!("--sampler applies to flow maps; a teacher is scored with Euler and dopri5")
        }
        Model::Teacher(_) if a.grid_power != 1.0 => {
            bail!("--grid-power applies to flow maps; a teacher is scored with Euler and dopri5")
        }
        Model::Teacher(_) => None,
    };
    if model.state_shape().len() == 3 {
        return eval_images(&a, &model, weak.as_ref(), &data, &nfes, sampler, device);
    }
    if a.classifier.is_some() {
        bail!("--classifier applies to image models");
    }
    let out = OutDir::create(&a.out)?;
    let reference = data.heldout(a.n, a.seed);
    let n_ref = reference.len() / dim;
    let settings = EvalSettings {
        n: a.n,
        seed: a.seed,
        max_points: if dim <= 16 { 10_000 } else { 2000 },
        grid_power: a.grid_power,
    };
    let checker = matches!(data, DataSource::Toy(Toy::Checkerboard));
    let (rows, samples) = match (&model, sampler) {
        (Model::Map(net, ck), Some(sampler)) => {
            let path = ck.meta.probability_path()?;
            let cx = SampleContext::new(a.seed).with_path(&*path);
            pipeline::eval_map(
                "flow map", net, &nfes, sampler, &cx, &reference, checker, &settings, device,
            )?
        }
        (Model::Map(..), None) => unreachable!("a flow map's sampler is resolved above"),
        (Model::Teacher(t), _) => {
            // Euler at each NFE, then the adaptive solver: the teacher's own best.
            let solvers = pipeline::euler_and_dopri5(nfes.as_ref(), 1e-5);
            pipeline::eval_teacher(
                "teacher",
                t,
                &solvers,
                &Cond::none(),
                &reference,
                checker,
                &settings,
                device,
            )?
        }
    };
    let mut md = format!(
        "# flowmap eval: {}\n\n{} samples per row against {n_ref} held-out points of '{}'.\n\n",
        a.model,
        a.n,
        data.name()
    );
    md += &eval_table(&rows);
    // Where the data is a Gaussian mixture its exact flow map is known: measure the map against it.
    let exact_report = match (&model, &data) {
        (Model::Map(net, ck), DataSource::Mixture(mix)) if !boundary_only(ck) => {
            let r = pipeline::exact_map_report(net, mix, 2000, a.seed, device)?;
            md += &format!(
                "\nAgainst the mixture's exact flow map Φ: relative error E‖f − Φ‖²/E‖Φ − x‖² = {:.3e} with (t, s) uniform, {:.3e} averaged over an 11-point grid; semigroup error {:.3e}.\n",
                r.relative_error_uniform, r.relative_error_grid, r.semigroup
            );
            eprintln!(
                "exact-map relative error {:.3e} (uniform pairs), semigroup error {:.3e}",
                r.relative_error_uniform, r.semigroup
            );
            Some(r)
        }
        _ => None,
    };
    let json = serde_json::json!({ "rows": rows, "exact_map": exact_report });
    io::write_text(&out.file("metrics.json"), &serde_json::to_string_pretty(&json)?)?;
    if dim >= 2 {
        let mut panels = vec![plot::Panel {
            title: "data (held out)".into(),
            points: &reference,
            dim,
        }];
        for (r, s) in rows.iter().zip(&samples) {
            panels.push(plot::Panel {
                title: format!("NFE {}", r.nfe),
                points: s,
                dim,
            });
        }
        plot::scatter_panels(&out.file("samples.png"), &panels, 5, 3.0)?;
        md += "\n![samples](samples.png)\n";
    }
    io::write_text(&out.file("metrics.md"), &md)?;
    print!("{}", eval_table(&rows));
    Ok(())
}

/// The classifier named by `--classifier`, or the shipped MNIST one.
fn load_classifier(path: Option<&Path>, device: &Device) -> Result<flowmap::classifier::Classifier> {
    Ok(match path {
        Some(p) => flowmap::classifier::Classifier::load(p, device)?,
        None => flowmap::classifier::Classifier::embedded_mnist(device)?,
    })
}

/// `eval` on images: FD, precision, recall and class accuracy at each NFE beside the data's floor, and a
/// grid per row.
fn eval_images(
    a: &EvalArgs,
    model: &Model,
    weak: Option<&Teacher>,
    data: &DataSource,
    nfes: &[usize],
    sampler: Option<Sampler>,
    device: &Device,
) -> Result<()> {
    let clf = load_classifier(a.classifier.as_deref(), device)?;
    let ev = pipeline::images::ImageEval::new(&clf, data, a.n, a.seed, device)?.with_grid_power(a.grid_power)?;
    let out = OutDir::create(&a.out)?;
    let classes = model.num_classes();
    let mut rows = vec![ev.floor(data, device)?];
    let (r, samples) = match (model, sampler) {
        (Model::Map(net, ck), Some(sampler)) => {
            let path = ck.meta.probability_path()?;
            let name = match guidance_label(&a.guide) {
                Some(g) => format!("flow map ({g})"),
                None => "flow map".into(),
            };
            ev.map(
                &name,
                &*map_at(net, ck, &a.guide)?,
                classes,
                nfes,
                sampler,
                &*path,
                device,
            )?
        }
        (Model::Map(..), None) => unreachable!("a flow map's sampler is resolved before"),
        (Model::Teacher(t), _) => {
            let solvers = pipeline::euler_and_dopri5(nfes.as_ref(), 1e-5);
            let name = match guidance_label(&a.guide) {
                Some(g) => format!("teacher ({g})"),
                None => "teacher".into(),
            };
            let field = guided(t, a.guide.guidance, weak, classes)?;
            ev.teacher(&name, &*field, classes, &solvers, device)?
        }
    };
    let mut md = format!(
        "# flowmap eval: {}

{} samples per row against held-out images of '{}', in the features of the classifier trained on '{}' (held-out accuracy {:.2}%).

",
        a.model,
        a.n,
        data.name(),
        clf.meta.data,
        100.0 * clf.meta.heldout_accuracy
    );
    let grid_rows = classes.unwrap_or(10);
    for (i, (row, x)) in r.iter().zip(&samples).enumerate() {
        let name = format!("grid-{i}-nfe{}.png", row.nfe);
        let shown = x.narrow(0, 0, x.dim(0)?.min(grid_rows * 10))?;
        grid::write_grid(&out.file(&name), &shown, grid_rows)?;
        md += &format!("![{} NFE {}]({name}) ", row.sampler, row.nfe);
    }
    rows.extend(r);
    let table = report::image_table(&rows);
    md = format!("{md}\n\n{table}");
    io::write_text(
        &out.file("metrics.json"),
        &serde_json::to_string_pretty(&serde_json::json!({ "rows": rows }))?,
    )?;
    io::write_text(&out.file("metrics.md"), &md)?;
    print!("{table}");
    Ok(())
}

fn classifier_cmd(a: ClassifierArgs, device: &Device, show: bool) -> Result<()> {
    check_output(&a.out, "safetensors")?;
    let data = open_data(&a.data, &a.labels)?;
    let cfg = flowmap::classifier::ClassifierTraining {
        steps: a.steps,
        batch_size: a.batch,
        lr: a.lr,
        seed: a.seed,
    };
    let pb = progress_bar(cfg.steps as u64, "classifier", show);
    let start = std::time::Instant::now();
    let (clf, vars) = flowmap::classifier::train(&data, &cfg, device, &Bar(&pb))?;
    pb.finish_and_clear();
    flowmap::classifier::save(&a.out, &clf, &vars)?;
    eprintln!(
        "classifier: {} steps in {:.1}s, held-out accuracy {:.2}%; wrote {}",
        cfg.steps,
        start.elapsed().as_secs_f64(),
        100.0 * clf.meta.heldout_accuracy,
        a.out.display()
    );
    Ok(())
}

fn demo_cmd(a: DemoArgs, device: &Device, show: bool) -> Result<()> {
    match a.which.as_deref() {
        None | Some("2d") => {}
        Some("mnist") => {
            if a.gmm_steps.is_some() {
                bail!("--gmm-steps applies to the 2-D demo");
            }
            let d = demo_mnist::MnistConfig::demo();
            let cfg = demo_mnist::MnistConfig {
                teacher_steps: a.teacher_steps,
                map_steps: a.distill_steps.unwrap_or(d.map_steps),
                n_eval: a.n_eval.unwrap_or(d.n_eval),
                seed: a.seed,
                ..d
            };
            if cfg.map_steps == 0 || cfg.teacher_steps == Some(0) || cfg.n_eval < 10 {
                bail!("demo budgets must be positive (and --n-eval at least 10)");
            }
            let out = a.out.unwrap_or_else(|| PathBuf::from("demo-mnist"));
            let report = demo_mnist::run(&out, &cfg, device, show)?;
            print!("{}", report::image_table(&report.rows));
            println!("{:.0} s; report: {}", report.seconds, out.join("report.md").display());
            return Ok(());
        }
        Some(other) => bail!("unknown demo '{other}' (expected 2d or mnist)"),
    }
    let out = a.out.unwrap_or_else(|| PathBuf::from("demo-out"));
    let d = DemoConfig::default();
    let cfg = DemoConfig {
        teacher_steps: a.teacher_steps.unwrap_or(d.teacher_steps),
        distill_steps: a.distill_steps.unwrap_or(d.distill_steps),
        gmm_steps: a.gmm_steps.unwrap_or(d.gmm_steps),
        n_eval: a.n_eval.unwrap_or(d.n_eval),
        seed: a.seed,
        ..d
    };
    if cfg.teacher_steps == 0 || cfg.distill_steps == 0 || cfg.gmm_steps == 0 || cfg.n_eval < 100 {
        bail!("demo budgets must be positive (and --n-eval at least 100)");
    }
    let report = demo::run(&out, &cfg, device, show)?;
    println!("{}", eval_table(&report.rows));
    for (name, ok) in &report.checks {
        println!("[{}] {name}", if *ok { "pass" } else { "FAIL" });
    }
    println!("report: {}", out.join("report.md").display());
    Ok(())
}
