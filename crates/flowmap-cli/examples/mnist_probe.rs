//! One flow map on the embedded digits at a chosen recipe, scored at 1, 2, 4 and 8 NFE: the quick loop
//! behind the image recipes of `flowmap bench mnist` (`cargo run --release -p flowmap-cli --example mnist_probe --
//! METHOD STEPS [key=value …]`). It starts from the shipped teacher: the teacher-based methods distil it,
//! the data-only ones are fine-tuned from it, with the bench's settings (500-step runs at batch 64 and
//! learning rate 5·10⁻⁴, the method's defaults for images, [`DistillConfig::for_data`]); each key changes
//! one of them. `lr` is the run's learning rate, which an objective's `lr_scale` then scales. Keys: `lr`, `ema`, `batch`, `diag` (diagonal fraction), `grid` and `grid_steps` (rows on
//! few-step grids' jumps),
//! `times` (uniform or logit-normal:MEAN:STD), `weighting` (constant, normalized, adaptive:C:P), `target`
//! (current or ema), `eps` (a fixed ε), `tangent_c`, `warmup`, `cm_n`, `cm_rho`, `n` (samples per row),
//! `seed`, `save` (a checkpoint path).

use candle_core::Device;
use flowmap::classifier::Classifier;
use flowmap::data::DataSource;
use flowmap::objective::{DistillConfig, EpsSchedule, Method, TargetNet, TimeDistribution, Weighting};
use flowmap::pipeline::images::ImageEval;
use flowmap::pipeline::{MapJob, Teacher};
use flowmap::sample::Sampler;
use flowmap::train::{Silent, TrainConfig};
use flowmap::{Error, Result};

const TEACHER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../flowmap-cli/assets/mnist-teacher.safetensors"
);

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = || Error::arg("usage: mnist_probe METHOD STEPS [key=value …]");
    let method: Method = args.first().ok_or_else(usage)?.parse()?;
    let steps: usize = args.get(1).and_then(|s| s.parse().ok()).ok_or_else(usage)?;
    let dev = Device::Cpu;
    let data = DataSource::from_spec("mnist")?;
    let teacher = Teacher::load(TEACHER, &dev)?;
    let mut objective = DistillConfig::for_data(method, &data.state_shape(), true);
    let mut train = TrainConfig {
        steps,
        batch_size: 64,
        lr: 5e-4,
        warmup_steps: (steps / 20).max(1),
        ema_decay: 0.99,
        ..TrainConfig::default()
    };
    let (mut n, mut save) = (500, None);
    let num = |v: &str| v.parse::<f64>().map_err(|_| Error::arg(format!("not a number: {v}")));
    for kv in &args[2..] {
        let (k, v) = kv.split_once('=').ok_or_else(usage)?;
        let parts: Vec<&str> = v.split(':').collect();
        match k {
            "lr" => train.lr = num(v)?,
            "ema" => train.ema_decay = num(v)?,
            "batch" => train.batch_size = num(v)? as usize,
            "seed" => train.seed = num(v)? as u64,
            "n" => n = num(v)? as usize,
            "save" => save = Some(v.to_string()),
            "diag" => objective.times.diagonal_fraction = num(v)?,
            "grid" => objective.times.grid_fraction = num(v)?,
            "grid_steps" => objective.times.grid_steps = num(v)? as usize,
            "cm_n" => objective.continuous.cm_intervals = num(v)? as usize,
            "cm_rho" => objective.continuous.cm_time_power = num(v)?,
            "tangent_c" => objective.continuous.tangent_c = num(v)?,
            "warmup" => objective.continuous.warmup = num(v)?,
            "eps" => objective.eps = EpsSchedule::Fixed { eps: num(v)? },
            "target" => objective.target = if v == "ema" { TargetNet::Ema } else { TargetNet::Current },
            "times" => {
                objective.times.distribution = match parts[..] {
                    ["uniform"] => TimeDistribution::Uniform,
                    ["logit-normal", m, s] => TimeDistribution::LogitNormal {
                        mean: num(m)?,
                        std: num(s)?,
                    },
                    _ => return Err(usage()),
                }
            }
            "weighting" => {
                objective.weighting = match parts[..] {
                    ["constant"] => Weighting::Constant,
                    ["normalized"] => Weighting::Normalized,
                    ["adaptive", c, p] => Weighting::Adaptive { c: num(c)?, p: num(p)? },
                    _ => return Err(usage()),
                }
            }
            _ => return Err(Error::arg(format!("unknown key '{k}'"))),
        }
    }
    // The teacher seeds the student either way, and fixes its architecture.
    let job = MapJob {
        teacher: method.needs_teacher().then_some(&teacher),
        init: (!method.needs_teacher()).then_some(&teacher),
        objective,
        train,
        ..MapJob::new(method, &data)
    };
    let clock = std::time::Instant::now();
    let m = job.run(&Silent)?;
    let secs = clock.elapsed().as_secs_f64();
    if let Some(p) = save {
        m.save(std::path::Path::new(&p))?;
    }
    let clf = Classifier::embedded_mnist(&dev)?;
    let ev = ImageEval::new(&clf, &data, n, 0, &dev)?;
    let sampler = if method.boundary_only() {
        Sampler::Consistency
    } else {
        Sampler::Deterministic
    };
    let path = m.meta.probability_path()?;
    let (rows, _) = ev.map(method.name(), &m.net, Some(10), &[1, 2, 4, 8], sampler, &*path, &dev)?;
    println!("{method} {steps} steps {:?} ({secs:.0} s)", &args[2..]);
    for r in rows {
        println!(
            "  nfe {}: FD {:.2}  precision {:.3}  recall {:.3}  accuracy {:.1}%",
            r.nfe,
            r.metrics.fd,
            r.metrics.precision,
            r.metrics.recall,
            100.0 * r.metrics.accuracy.unwrap_or(f64::NAN)
        );
    }
    Ok(())
}
