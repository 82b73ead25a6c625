//! Benchmarks that train for real and write JSON and Markdown (never run as tests).
//!
//! `ablation`: the discrete distillation's free choices — ε (fixed or annealed), the (t, s) law and the
//! diagonal fraction, the weighting and the target network — each varied alone from the defaults, measured
//! by distilling the analytic Gaussian-mixture teacher at a fixed budget and scoring the result against
//! its exact flow map.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use crate::data::{self, DataSource, GaussianMixture};
use crate::demo::relative_error_uniform;
use crate::flow_map::SolverMap;
use crate::metrics;
use crate::nn::MlpConfig;
use crate::objective::{DistillConfig, EpsSchedule, Method, TargetNet, TimeDistribution, Weighting};
use crate::ode::Solver;
use crate::pipeline::{self, progress_bar, OutDir, Teacher};
use crate::teacher::GmmVelocity;
use crate::train::TrainConfig;
use crate::Result;

/// One ablation row.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AblationRow {
    pub method: String,
    pub variant: String,
    pub config: DistillConfig,
    /// `E‖f − Φ‖² / E‖Φ − x‖²`, `(t, s)` uniform per row.
    pub relative_error: f64,
    pub semigroup: f64,
    pub seconds: f64,
}

/// The variants: the defaults, then one change each.
pub fn ablation_variants() -> Vec<(String, DistillConfig)> {
    let d = DistillConfig::default();
    let mut v = vec![("default".to_string(), d)];
    let mut push = |name: &str, f: &dyn Fn(&mut DistillConfig)| {
        let mut c = d;
        f(&mut c);
        v.push((name.to_string(), c));
    };
    push("eps fixed 0.05", &|c| c.eps = EpsSchedule::Fixed { eps: 0.05 });
    push("eps fixed 0.2", &|c| c.eps = EpsSchedule::Fixed { eps: 0.2 });
    push("eps fixed 0.5", &|c| c.eps = EpsSchedule::Fixed { eps: 0.5 });
    push("weight constant", &|c| c.weighting = Weighting::Constant);
    push("weight adaptive (c 1e-3, p 0.5)", &|c| {
        c.weighting = Weighting::Adaptive { c: 1e-3, p: 0.5 }
    });
    push("diagonal 0", &|c| c.times.diagonal_fraction = 0.0);
    push("diagonal 0.5", &|c| c.times.diagonal_fraction = 0.5);
    push("times logit-normal(0, 1)", &|c| {
        c.times.distribution = TimeDistribution::LogitNormal { mean: 0.0, std: 1.0 }
    });
    push("target EMA", &|c| c.target = TargetNet::Ema);
    v
}

/// Runs the ablation for `methods` at `steps` steps each and writes `ablation.json` and `ablation.md`.
pub fn ablation(
    out: &Path,
    methods: &[Method],
    steps: usize,
    batch: usize,
    seed: u64,
    device: &Device,
    show: bool,
) -> Result<Vec<AblationRow>> {
    let out = OutDir::create(out)?;
    let mixture = GaussianMixture::three_widths();
    let teacher = Teacher::Gmm(GmmVelocity::new(mixture.clone()));
    let data = DataSource::Mixture(mixture);
    let n = 2000;
    let x0 = data::to_tensor(&data.heldout(n, seed), n, 2, DType::F32, device)?;
    let x1 = crate::sample::noise(n, 2, seed + 7, device)?;
    let exact = SolverMap::new(&teacher, Solver::dopri5(1e-6));
    let mut rows = vec![];
    for &method in methods {
        for (variant, cfg) in ablation_variants() {
            let tc = TrainConfig {
                steps,
                batch_size: batch,
                seed,
                ..TrainConfig::default()
            };
            let pb = progress_bar(
                steps as u64,
                &format!("{method} {}", &variant[..variant.len().min(10)]),
                show,
            );
            let start = Instant::now();
            let m = pipeline::distill(
                &teacher,
                &data,
                method,
                &cfg,
                &tc,
                &MlpConfig::new(2),
                device,
                &pb,
                None,
            )?;
            let seconds = start.elapsed().as_secs_f64();
            pb.finish_and_clear();
            rows.push(AblationRow {
                method: method.name().into(),
                variant,
                config: cfg,
                relative_error: relative_error_uniform(&m.net, &exact, &x0, &x1, seed)?,
                semigroup: metrics::semigroup_error(&m.net, &x0, &x1, 5)?,
                seconds,
            });
        }
    }
    let mut md = format!(
        "# Ablation of the discrete distillation objectives\n\nAnalytic three-component Gaussian-mixture teacher, MLP 256×3, {steps} steps at batch {batch}, seed {seed}. Relative flow-map error `E‖f − Φ‖² / E‖Φ − x‖²` with `(t, s)` uniform on the triangle, 2000 held-out points; semigroup error over the triples of a 5-point grid. Produced by `flowmap bench ablation`.\n\n| method | variant | relative error | semigroup error | seconds |\n|---|---|---:|---:|---:|\n"
    );
    for r in &rows {
        md += &format!(
            "| {} | {} | {:.3e} | {:.3e} | {:.1} |\n",
            r.method, r.variant, r.relative_error, r.semigroup, r.seconds
        );
    }
    crate::io::write_text(
        &out.file("ablation.json"),
        &serde_json::to_string_pretty(&rows).expect("rows serialise"),
    )?;
    crate::io::write_text(&out.file("ablation.md"), &md)?;
    Ok(rows)
}
