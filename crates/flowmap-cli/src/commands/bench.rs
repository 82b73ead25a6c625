//! `flowmap bench …`: the benchmarks, each a subcommand whose body lives in `crate::bench`.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use flowmap::objective::Method;

use super::common::{methods_help, parse_range, parse_sizes};
use super::Ctx;
use crate::{bench, demo_mnist, report};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Ablation of ε, the (t, s) law, the weighting and the target network on the analytic teacher.
    Ablation(AblationArgs),
    /// Every method at an equal wall-clock budget, on checkerboard and on the analytic mixture teacher.
    Compare(CompareArgs),
    /// Every method's error against the exact Φ of an analytic mixture against its training budget
    /// (log–log, with the fitted rate).
    Convergence(ConvergenceArgs),
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
pub struct FuzzArgs {
    /// Output folder (fuzz.json, fuzz.md, the case in progress, kept crashes).
    #[arg(long, default_value = "bench/fuzz")]
    pub out: PathBuf,
    /// Loaders, comma-separated (default: all): npy, npy-labels, idx, idx-gzip, checkpoint, train-state,
    /// csv, toml, gmm-json, image-png, image-jpeg.
    #[arg(long, value_delimiter = ',')]
    pub loader: Vec<String>,
    /// Seconds per loader.
    #[arg(long, default_value_t = 600.0)]
    pub seconds: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}
#[derive(Args)]
pub struct MnistBenchArgs {
    /// Output folder.
    #[arg(long, default_value = "bench/mnist")]
    pub out: PathBuf,
    /// Teacher steps (batch 64).
    #[arg(long, default_value_t = 3000, conflicts_with = "shipped_teacher")]
    pub teacher_steps: usize,
    /// Start from the shipped teacher (the same recipe at 3000 steps, trained by an earlier build) instead
    /// of training one.
    #[arg(long)]
    pub shipped_teacher: bool,
    /// Steps of each distillation (the data-only methods train for the teacher's and these together).
    #[arg(long, default_value_t = 1000)]
    pub map_steps: usize,
    /// Batch size of the maps.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// The data-only methods (those `flowmap train` takes): trained from scratch for the teacher's steps
    /// and a distillation's, or fine-tuned from the flow-matching teacher for a distillation's.
    #[arg(long, value_enum, default_value = "scratch")]
    pub data_only: DataOnlyInit,
    /// Methods, comma-separated (default: every one).
    #[arg(long, value_delimiter = ',')]
    pub methods: Vec<String>,
    /// Samples per evaluation row.
    #[arg(long, default_value_t = 2000)]
    pub n_eval: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum DataOnlyInit {
    Scratch,
    Finetune,
}
#[derive(Args)]
pub struct GuidanceBenchArgs {
    /// Output folder.
    #[arg(long, default_value = "bench/guidance")]
    pub out: PathBuf,
    /// The class-conditional teacher (default: the shipped MNIST teacher).
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// Guidance scales measured, comma-separated (each inside --range).
    #[arg(long, default_value = "1,1.5,2,3,4")]
    pub scales: String,
    /// The maps' guidance range LO,HI.
    #[arg(long, default_value = "1,4")]
    pub range: String,
    /// The teacher-based method that distils the guided teacher.
    #[arg(long, default_value = "cm", long_help = methods_help(true))]
    pub method: String,
    /// Steps of each map.
    #[arg(long, default_value_t = 3000)]
    pub map_steps: usize,
    /// Batch size of each map.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Steps of the autoguidance model (batch 64).
    #[arg(long, default_value_t = 600)]
    pub weak_steps: usize,
    /// First-level channels of the autoguidance model.
    #[arg(long, default_value_t = 8)]
    pub weak_channels: usize,
    /// Samples per evaluation row.
    #[arg(long, default_value_t = 500)]
    pub n_eval: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}
#[derive(Args)]
pub struct SpeedArgs {
    /// Output folder.
    #[arg(long, default_value = "bench-out/speed")]
    pub out: PathBuf,
    /// Hidden widths, comma-separated.
    #[arg(long, default_value = "256,512")]
    pub widths: String,
    /// Batch sizes, comma-separated.
    #[arg(long, default_value = "256,1024,4096")]
    pub batches: String,
    /// Networks to measure: mlp (2-D points), unet (28 × 28 digits), comma-separated.
    #[arg(long, default_value = "mlp,unet")]
    pub nets: String,
    /// The U-Nets' first-level channels, comma-separated.
    #[arg(long, default_value = "16,32")]
    pub unet_channels: String,
    /// The U-Nets' batch sizes, comma-separated.
    #[arg(long, default_value = "32,128,256")]
    pub unet_batches: String,
    /// Minimum timed seconds per row.
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// Also run the PyTorch peer (bench/peer/torch_peer.py; needs `pip install torch`).
    #[arg(long)]
    pub peer: bool,
    /// Rounds (peer, then flowmap, in each); every figure is the best of its rounds.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Python interpreter for the peer.
    #[arg(long, default_value = "python3")]
    pub python: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Precision of the matrix products: f32, or bf16 (flowmap's bf16 kernels; the peer under
    /// `torch.autocast("cpu", dtype=torch.bfloat16)`).
    #[arg(long, value_name = "f32|bf16", default_value = "f32")]
    pub precision: flowmap::kernels::Precision,
    /// Only these rows (workloads), comma-separated, e.g. `unet-jvp`: with a long `--seconds`, the loop to
    /// profile under `perf record` [default: every row].
    #[arg(long, value_delimiter = ',')]
    pub rows: Vec<String>,
}
#[derive(Args)]
pub struct JvpArgs {
    /// Output folder.
    #[arg(long, default_value = "bench-out/jvp")]
    pub out: PathBuf,
}
#[derive(Args)]
pub struct ConvergenceArgs {
    /// Output folder.
    #[arg(long, default_value = "bench-out/convergence")]
    pub out: PathBuf,
    /// Methods, comma-separated (default: every method).
    #[arg(long, value_delimiter = ',')]
    pub methods: Vec<String>,
    /// Training budgets in steps, comma-separated: each a separate run.
    #[arg(long, default_value = "125,250,500,1000,2000,4000")]
    pub steps: String,
    #[arg(long, default_value_t = 512)]
    pub batch: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A run configuration whose `[train]`, `[distill]` and `[arch]` tables are laid over every run's
    /// defaults (the budget, batch and seed stay the flags').
    #[arg(long)]
    pub config: Option<PathBuf>,
}
#[derive(Args)]
pub struct CompareArgs {
    /// Output folder.
    #[arg(long, default_value = "bench-out/compare")]
    pub out: PathBuf,
    /// Training seconds per method.
    #[arg(long, default_value_t = 30.0)]
    pub budget_seconds: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}
#[derive(Args)]
pub struct AblationArgs {
    /// Output folder.
    #[arg(long, default_value = "bench-out")]
    pub out: PathBuf,
    /// Methods, comma-separated.
    #[arg(long, default_value = "emd,lmd")]
    pub methods: String,
    #[arg(long, default_value_t = 1500)]
    pub steps: usize,
    #[arg(long, default_value_t = 512)]
    pub batch: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl BenchCommand {
    pub fn run(self, cx: &Ctx) -> Result<()> {
        let (device, show) = (&cx.device, cx.show);
        match self {
            BenchCommand::Convergence(a) => {
                let methods = if a.methods.is_empty() {
                    Method::all().collect::<Vec<_>>()
                } else {
                    a.methods
                        .iter()
                        .map(|m| m.trim().parse::<Method>())
                        .collect::<flowmap::Result<Vec<_>>>()?
                };
                let budgets = parse_sizes(&a.steps, "--steps")?;
                if a.batch == 0 {
                    bail!("--batch must be at least 1");
                }
                let config = match &a.config {
                    Some(p) => Some((flowmap::pipeline::RunConfig::from_file(p)?, p.display().to_string())),
                    None => None,
                };
                let opts = bench::convergence::ConvergenceOptions {
                    methods,
                    budgets,
                    batch: a.batch,
                    seed: a.seed,
                    config,
                };
                let (_, fits) = bench::convergence::convergence(&a.out, &opts, device, show)?;
                for f in fits {
                    println!("{:12} rate {:+.2}  final error {:.2e}", f.method, f.rate, f.final_error);
                }
                println!("wrote {}", a.out.join("convergence.md").display());
                Ok(())
            }
            BenchCommand::Compare(a) => {
                if !(a.budget_seconds > 0.0) {
                    bail!("--budget-seconds must be positive");
                }
                let rows = bench::compare(&a.out, a.budget_seconds, a.seed, device, show)?;
                println!("{} rows; wrote {}", rows.len(), a.out.join("compare.md").display());
                Ok(())
            }
            BenchCommand::Speed(a) => {
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
                    precision: a.precision,
                    rows: a.rows,
                };
                let report = bench::speed(&a.out, &opts, device, show)?;
                print!("{}", report.summary());
                println!(
                    "peer: {}; wrote {}",
                    report.peer_status,
                    a.out.join("speed.md").display()
                );
                Ok(())
            }
            BenchCommand::Mnist(a) => {
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
                let report = demo_mnist::run(&a.out, &cfg, device, show)?;
                print!("{}", report::image_table(&report.rows));
                println!("{:.0} s; wrote {}", report.seconds, a.out.join("report.md").display());
                Ok(())
            }
            BenchCommand::Guidance(a) => {
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
                let report = bench::guidance::run(&a.out, &cfg, device, show)?;
                println!("{:.0} s; wrote {}", report.seconds, a.out.join("guidance.md").display());
                Ok(())
            }
            BenchCommand::Fuzz(a) => {
                if !(a.seconds >= 0.0 && a.seconds.is_finite()) {
                    bail!("--seconds must be a non-negative number, got {}", a.seconds);
                }
                let (rows, md) = bench::fuzz::report(&a.out, &a.loader, a.seconds, a.seed, &|name| {
                    if show {
                        eprintln!("fuzzing {name} for {} s", a.seconds);
                    }
                })?;
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
            BenchCommand::Jvp(a) => {
                for r in bench::jvp(&a.out, device)? {
                    println!(
                        "batch {:5} hidden {:4}: forward {:.3} ms, JVP {:.3} ms ({:.2}×), FD {:.3} ms ({:.2}×)",
                        r.batch, r.hidden, r.forward_ms, r.jvp_ms, r.jvp_ratio, r.fd_jvp_ms, r.fd_ratio
                    );
                }
                Ok(())
            }
            BenchCommand::Ablation(a) => {
                let methods = a
                    .methods
                    .split(',')
                    .map(|m| m.trim().parse::<Method>())
                    .collect::<flowmap::Result<Vec<_>>>()?;
                let rows = bench::ablation(&a.out, &methods, a.steps, a.batch, a.seed, device, show)?;
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
}
