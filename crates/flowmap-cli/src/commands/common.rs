//! Flags and helpers shared by several commands.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Args;
use flowmap::data::DataSource;
use flowmap::objective::Method;
use flowmap::pipeline::RunConfig;
use flowmap::train::TrainConfig;

use crate::supervise;

#[derive(Args, Clone)]
pub struct TrainFlags {
    /// Optimisation steps.
    #[arg(long)]
    pub steps: Option<usize>,
    /// A wall-clock budget in minutes instead of --steps: a short probe times a step, and the run gets the
    /// steps that fit (its schedule that of a run with that many --steps, which reproduces it bit for bit).
    #[arg(long, conflicts_with_all = ["steps", "resume"])]
    pub minutes: Option<f64>,
    /// Batch size.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Peak learning rate (AdamW, warm-up then cosine decay).
    #[arg(long)]
    pub lr: Option<f64>,
    /// EMA decay of the weights.
    #[arg(long)]
    pub ema: Option<f64>,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Precision of the matrix products: f32, or bf16 (mixed precision: bf16 operands with f32 sums,
    /// everything else f32, the checkpoint f32; on a CPU without AVX-512 BF16 the products stay f32, said
    /// in one line).
    #[arg(long, value_name = "f32|bf16")]
    pub precision: Option<flowmap::kernels::Precision>,
    /// A TOML file with `[train]` (and for distill `[distill]`) tables; flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub long: supervise::LongRunFlags,
}

/// `--data` and `--labels`: what a command trains on.
#[derive(Args, Clone)]
pub struct DataFlags {
    /// The data (`--help` lists the specs).
    #[arg(long, long_help = data_help("The data"))]
    pub data: String,
    /// Labels of an .npy image array: a 1-D .npy of N integers (class-conditional training).
    #[arg(long)]
    pub labels: Option<PathBuf>,
}

impl DataFlags {
    pub fn open(&self) -> Result<DataSource> {
        open_data(&self.data, &self.labels)
    }
}

/// What a training command settles before it trains: its output checked, the `--config` file read, and the
/// run's settings ([`train_settings`] over the defaults).
pub fn run_settings(out: &Path, flags: &TrainFlags, guidance_range: Option<&str>) -> Result<(RunConfig, TrainConfig)> {
    check_output(out, "safetensors")?;
    let file = read_config(&flags.config)?;
    let cfg = train_settings(&file, flags, guidance_range, TrainConfig::default())?;
    Ok((file, cfg))
}

/// A run's training settings: `base` (the defaults, or a recipe's), then the file's `[train]` table, then
/// the flags, then a guidance range, validated.
pub fn train_settings(
    file: &RunConfig,
    flags: &TrainFlags,
    guidance_range: Option<&str>,
    base: TrainConfig,
) -> Result<TrainConfig> {
    let mut cfg = train_config(flags, file.train_config_over(base)?);
    if let Some(r) = guidance_range {
        cfg.guidance_range = Some(parse_guidance_range(r)?);
    }
    cfg.validate()?;
    Ok(cfg)
}

/// `cfg` with the steps that fit in `--minutes` (`probe` plans them), reported in one line; as it is without.
pub fn budgeted(
    flags: &TrainFlags,
    mut cfg: TrainConfig,
    what: &str,
    cx: &super::Ctx,
    plan: impl FnOnce(f64) -> flowmap::Result<flowmap::pipeline::BudgetPlan>,
) -> Result<TrainConfig> {
    if cfg.precision != flowmap::kernels::Precision::F32 && cx.writes() {
        eprintln!("precision: {}", cfg.precision.describe_on(&cx.device));
    }
    if let Some(m) = flags.minutes {
        // In a data-parallel run every rank probes together and takes rank 0's plan.
        let p = plan(m * 60.0)?;
        if cx.writes() {
            eprintln!(
                "{what}: {m} minutes plan {} steps ({:.1} ms per step over a {}-step probe of {:.1} s); --steps {} reproduces the run",
                p.steps,
                1e3 * p.seconds_per_step,
                p.probe_steps,
                p.probe_seconds,
                p.steps
            );
        }
        cfg.steps = p.steps;
    }
    Ok(cfg)
}

/// A method for `flowmap distill` (one that needs a teacher).
pub fn distill_method(s: &str) -> Result<Method> {
    let m: Method = s.parse()?;
    if !m.needs_teacher() {
        bail!("'{s}' trains from data without a teacher: use `flowmap train --method {s} --data SPEC`");
    }
    Ok(m)
}

/// A method for `flowmap train` (one that trains from data alone).
pub fn train_method(s: &str) -> Result<Method> {
    let m: Method = s.parse()?;
    if m.needs_teacher() {
        let free: Vec<&str> = Method::all().filter(|m| !m.needs_teacher()).map(Method::name).collect();
        bail!(
            "'{s}' distils a teacher: use `flowmap distill --teacher T --method {s}` (teacher-free methods: {})",
            free.join(", ")
        );
    }
    Ok(m)
}

/// `--method`'s long help, from the method registry.
pub fn methods_help(teacher: bool) -> String {
    let what = if teacher {
        "Objective (distils the teacher)"
    } else {
        "Teacher-free objective"
    };
    format!("{what}:\n{}", flowmap::objective::registry::describe(teacher))
}

/// `--data`'s long help: `what`, then every data spec the library knows.
pub fn data_help(what: &str) -> String {
    format!("{what}, a spec:\n{}", flowmap::data::describe_specs())
}

/// A comma-separated list of positive sizes.
pub fn parse_sizes(s: &str, flag: &str) -> Result<Vec<usize>> {
    s.split(',')
        .map(|x| match x.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => bail!("{flag}: '{}' is not a positive integer", x.trim()),
        })
        .collect()
}

pub fn read_config(path: &Option<PathBuf>) -> Result<RunConfig> {
    Ok(match path {
        None => RunConfig::default(),
        Some(p) => RunConfig::from_file(p)?,
    })
}

pub fn train_config(f: &TrainFlags, mut c: TrainConfig) -> TrainConfig {
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
    if let Some(p) = f.precision {
        c.precision = p;
    }
    c
}

/// The data named by `--data`, with `--labels` for an `.npy` image array.
pub fn open_data(spec: &str, labels: &Option<PathBuf>) -> Result<DataSource> {
    Ok(match labels {
        Some(l) => DataSource::from_spec(&DataSource::npy_with_labels(Path::new(spec), l))?,
        None => DataSource::from_spec(spec)?,
    })
}

pub fn check_output(path: &Path, ext: &str) -> Result<()> {
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

/// `LO,HI` or `W` (the range `[W, W]`) of `--guidance-range`.
pub fn parse_guidance_range(s: &str) -> Result<[f64; 2]> {
    parse_range(s, "--guidance-range")
}

/// A guidance range `LO,HI` or `W` given to `flag`.
pub fn parse_range(s: &str, flag: &str) -> Result<[f64; 2]> {
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

pub fn parse_nfes(s: &str) -> Result<Vec<usize>> {
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
