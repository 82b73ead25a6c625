//! Benchmarks that train for real and write JSON and Markdown (never run as tests).
//!
//! `guidance` ([`guidance`]): classifier-free guidance and autoguidance on MNIST, teacher and maps, at each
//! scale.
//!
//! `ablation`: the discrete distillation's free choices — ε (fixed or annealed), the (t, s) law and the
//! diagonal fraction, the weighting and the target network — each varied alone from the defaults, measured
//! by distilling the analytic Gaussian-mixture teacher at a fixed budget and scoring the result against
//! its exact flow map.

pub mod convergence;
pub mod fuzz;
pub mod guidance;
mod speed;
mod speed_unet;
mod timing;

pub use speed::speed;
pub use timing::SpeedOptions;

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use crate::plot;
use crate::report::{progress_bar, Bar};
use flowmap::backbone::{Arch, MlpConfig};
use flowmap::data::{self, DataSource, GaussianMixture};
use flowmap::flow_map::SolverMap;
use flowmap::metrics;
use flowmap::objective::{DistillConfig, EpsSchedule, Method, TargetNet, TimeDistribution, Weighting};
use flowmap::ode::Solver;
use flowmap::path::LinearPath;
use flowmap::pipeline::{self, MapJob, OutDir, Teacher};
use flowmap::teacher::GmmVelocity;
use flowmap::train::TrainConfig;
use flowmap::Cond;
use flowmap::Result;

/// The analytic three-component mixture as a measuring stick: its exact velocity (the teacher), its data,
/// and 2,000 held-out states with noise beside them, at which a map is compared with the exact Φ.
pub struct MixtureProbe {
    pub teacher: Teacher,
    pub data: DataSource,
    x0: candle_core::Tensor,
    x1: candle_core::Tensor,
}

impl MixtureProbe {
    pub fn new(seed: u64, device: &Device) -> Result<Self> {
        let mixture = GaussianMixture::three_widths();
        let data = DataSource::Mixture(mixture.clone());
        let n = 2000;
        Ok(MixtureProbe {
            teacher: Teacher::Gmm(GmmVelocity::new(mixture)),
            x0: data::to_tensor(&data.heldout(n, seed), n, 2, DType::F32, device)?,
            x1: flowmap::sample::noise(n, &[2], seed + 7, device)?,
            data,
        })
    }

    /// The held-out states on the linear path.
    pub fn points(&self) -> metrics::PathPoints<'_> {
        metrics::PathPoints {
            x0: &self.x0,
            x1: &self.x1,
            cond: Cond::none_ref(),
            path: &LinearPath,
        }
    }

    /// The exact Φ: dopri5 at tolerance 1e-6 on the exact velocity.
    pub fn exact(&self) -> SolverMap<&Teacher> {
        SolverMap::new(&self.teacher, Solver::dopri5(1e-6))
    }
}

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
    push("eps annealed 0.5 → 0.05", &|c| {
        c.eps = EpsSchedule::Annealed { start: 0.5, end: 0.05 }
    });
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
    let probe = MixtureProbe::new(seed, device)?;
    let (teacher, data, points) = (&probe.teacher, &probe.data, probe.points());
    let exact = probe.exact();
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
            let job = MapJob {
                teacher: Some(teacher),
                objective: cfg,
                train: tc,
                arch: Arch::Mlp(MlpConfig::new(2)),
                device: device.clone(),
                ..MapJob::new(method, data)
            };
            let m = job.run(&Bar(&pb))?;
            let seconds = start.elapsed().as_secs_f64();
            pb.finish_and_clear();
            rows.push(AblationRow {
                method: method.name().into(),
                variant,
                config: cfg,
                relative_error: metrics::relative_error_uniform(&m.net, &exact, &points, seed)?,
                semigroup: metrics::semigroup_error(&m.net, &points, 5)?,
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
    flowmap::io::write_text(
        &out.file("ablation.json"),
        &serde_json::to_string_pretty(&rows).expect("rows serialise"),
    )?;
    flowmap::io::write_text(&out.file("ablation.md"), &md)?;
    Ok(rows)
}

/// One method's results in the side-by-side comparison.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CompareRow {
    pub setting: String,
    pub method: String,
    pub sampler: String,
    pub nfe: usize,
    /// The sampling grid's power ρ (`TimeGrid::power`), chosen on a validation draw; `None` for the
    /// teacher's solvers and the data row.
    #[serde(default)]
    pub grid_power: Option<f64>,
    pub energy: f64,
    /// The energy distance on the uniform grid (ρ = 1), for comparison with the chosen grid's.
    #[serde(default)]
    pub energy_uniform: Option<f64>,
    pub sliced_w2: f64,
    /// Relative flow-map error against Φ (analytic teacher only).
    pub map_error: Option<f64>,
    pub semigroup: Option<f64>,
    pub train_seconds: f64,
    pub train_steps: usize,
}

/// `flowmap bench compare`: every method at an equal wall-clock budget on checkerboard (learned teacher)
/// and on the analytic Gaussian-mixture teacher.
pub fn compare(out: &Path, budget_seconds: f64, seed: u64, device: &Device, show: bool) -> Result<Vec<CompareRow>> {
    use flowmap::data::Toy;
    use flowmap::pipeline::{eval_teacher, EvalSettings};
    use flowmap::sample::{self, Sampler, TimeGrid};

    let out = OutDir::create(out)?;
    let mut rows: Vec<CompareRow> = vec![];
    let nfes = [1usize, 2, 4, 8];
    // The energy distance between two samples of one law spreads as 1/n: over independent checkerboard
    // draws its standard deviation is 8e-5 at 20,000 points (the previous setting; as large as the teacher's
    // dopri5 distance, so ratios to it were noise) and 5e-6 at 200,000, which sorted projections
    // (`metrics::energy_distance_sorted`, ~1 s per distance) make affordable. The `held-out` row shows it.
    let n_eval = 200_000;
    // Grid selection compares candidates whose distances differ by 1e-4 and more; at 50,000 points the
    // statistic's spread is a few 1e-5, and seven candidates at three NFE cost ~10 s per method.
    let n_validation = 50_000;
    let settings = EvalSettings {
        n: n_eval,
        seed,
        max_points: n_eval,
        ..EvalSettings::default()
    };
    let budget = |secs: f64, batch: usize, salt: u64| TrainConfig {
        steps: usize::MAX / 2,
        batch_size: batch,
        seed: seed + salt,
        max_seconds: Some(secs),
        ..TrainConfig::default()
    };

    for setting in ["checkerboard", "gmm"] {
        let (data, teacher, teacher_seconds, arch) = if setting == "checkerboard" {
            let data = DataSource::Toy(Toy::Checkerboard);
            let pb = progress_bar(0, "teacher", show);
            let t = pipeline::train_teacher(
                &data,
                &Arch::Mlp(MlpConfig::new(2)),
                &budget(2.0 * budget_seconds, 1024, 0),
                device,
                &Bar(&pb),
            )?;
            pb.finish_and_clear();
            let secs = t.log.seconds;
            (data, t.into_teacher(), secs, MlpConfig::new(2))
        } else {
            let m = GaussianMixture::three_widths();
            (
                DataSource::Mixture(m.clone()),
                Teacher::Gmm(GmmVelocity::new(m)),
                0.0,
                MlpConfig {
                    hidden: 128,
                    ..MlpConfig::new(2)
                },
            )
        };
        let reference = data.heldout(n_eval, seed);
        // A third independent draw, on which each map's sampling grid is chosen.
        let validation = data.heldout(n_validation, seed + 2);
        let checker = setting == "checkerboard";
        // The metric's floor: a second independent draw of the data against the reference.
        let floor = metrics::distances(&data.heldout(n_eval, seed + 1), &reference, 2, checker, n_eval);
        rows.push(CompareRow {
            setting: setting.into(),
            method: "held-out".into(),
            sampler: "data".into(),
            nfe: 0,
            grid_power: None,
            energy: floor.energy,
            energy_uniform: None,
            sliced_w2: floor.sliced_w2,
            map_error: None,
            semigroup: None,
            train_seconds: 0.0,
            train_steps: 0,
        });
        // The teacher's own samplers.
        let solvers = flowmap::pipeline::euler_and_dopri5(&nfes, 1e-5);
        let (trows, _) = eval_teacher(
            "teacher",
            &teacher,
            &solvers,
            &Cond::none(),
            &reference,
            checker,
            &settings,
            device,
        )?;
        for r in &trows {
            rows.push(CompareRow {
                setting: setting.into(),
                method: "teacher".into(),
                sampler: r.sampler.clone(),
                nfe: r.nfe,
                grid_power: None,
                energy: r.distances.energy,
                energy_uniform: None,
                sliced_w2: r.distances.sliced_w2,
                map_error: None,
                semigroup: None,
                train_seconds: teacher_seconds,
                train_steps: 0,
            });
        }
        for method in Method::all() {
            let pb = progress_bar(0, method.name(), show);
            // Teacher-free methods get the teacher's training time on top of the distillation budget.
            let secs = if method.needs_teacher() {
                budget_seconds
            } else {
                budget_seconds + teacher_seconds
            };
            let tc = budget(secs, 512, 1);
            // A fresh student trained from data gets the CLI's smooth time embedding (8 frequencies up to 4);
            // the teacher's 16 up to 64 make the JVP-based MeanFlow target noisy (`flowmap train --method
            // meanflow --data checkerboard --steps 8000 --batch 512`: 2-NFE energy distance 0.0012, with
            // `--time-features 16 --max-frequency 64` 0.028).
            let fresh = MlpConfig {
                time_features: 8,
                max_frequency: 4.0,
                ..arch.clone()
            };
            let job = MapJob {
                teacher: method.needs_teacher().then_some(&teacher),
                objective: DistillConfig::for_method(method),
                train: tc,
                arch: Arch::Mlp(if method.needs_teacher() { arch.clone() } else { fresh }),
                device: device.clone(),
                ..MapJob::new(method, &data)
            };
            let trained = job.run(&Bar(&pb))?;
            pb.finish_and_clear();
            let sampler = if method.boundary_only() {
                Sampler::Consistency
            } else {
                Sampler::Deterministic
            };
            let (map_error, semigroup) = match &data {
                DataSource::Mixture(m) if !method.boundary_only() => {
                    let r = pipeline::exact_map_report(&trained.net, m, 2000, seed, device)?;
                    (Some(r.relative_error_uniform), Some(r.semigroup))
                }
                _ if !method.boundary_only() => (
                    None,
                    Some(pipeline::semigroup(
                        &trained.net,
                        &data,
                        &LinearPath,
                        2000,
                        seed,
                        device,
                    )?),
                ),
                _ => (None, None),
            };
            let z = sample::noise(n_eval, &[2], seed, device)?;
            let cx = sample::SampleContext::new(seed);
            let score = |grid: &TimeGrid| -> Result<(usize, metrics::Distances)> {
                let s = sample::sample_with(&trained.net, &z, grid, sampler, &cx)?;
                let x = s.x.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
                Ok((s.nfe, metrics::distances(&x, &reference, 2, checker, n_eval)))
            };
            for &k in &nfes {
                // The grid is a hyperparameter like any other: chosen on the validation draw, then scored
                // once on the held-out reference.
                let choice = sample::select_grid(
                    &trained.net,
                    k,
                    sampler,
                    if k == 1 { &[1.0] } else { &sample::GRID_POWERS },
                    &validation,
                    n_validation,
                    &cx,
                    device,
                )?;
                let (nfe, d) = score(&choice.grid)?;
                let uniform = if choice.rho == 1.0 {
                    d.energy
                } else {
                    score(&TimeGrid::uniform(k)?)?.1.energy
                };
                rows.push(CompareRow {
                    setting: setting.into(),
                    method: method.name().into(),
                    sampler: format!("{sampler:?}").to_lowercase(),
                    nfe,
                    grid_power: Some(choice.rho),
                    energy: d.energy,
                    energy_uniform: Some(uniform),
                    sliced_w2: d.sliced_w2,
                    map_error,
                    semigroup,
                    train_seconds: trained.log.seconds,
                    train_steps: trained.log.steps,
                });
            }
        }
    }
    compare_figure(&rows, &out.file("compare_quality_vs_nfe.png"))?;
    flowmap::io::write_text(
        &out.file("compare.json"),
        &serde_json::to_string_pretty(&rows).expect("rows serialise"),
    )?;
    flowmap::io::write_text(
        &out.file("compare.md"),
        &compare_markdown(&rows, budget_seconds, seed, n_eval),
    )?;
    Ok(rows)
}

/// Checkerboard's energy distance against NFE for the teacher's Euler sampler and every method, with the
/// teacher's dopri5 and the metric's floor (a second draw of the data) as dashed levels. A diverged run
/// (energy distance beyond any sensible scale) is reported in the table, not drawn.
pub fn compare_figure(rows: &[CompareRow], path: &Path) -> Result<()> {
    let board: Vec<&CompareRow> = rows.iter().filter(|r| r.setting == "checkerboard").collect();
    let mut curves = vec![];
    for m in methods_in(rows, "checkerboard") {
        let label = if m == "teacher" { "teacher, Euler" } else { m };
        let pts: Vec<(f64, f64)> = board
            .iter()
            .filter(|r| r.method == m && (m != "teacher" || r.sampler.starts_with("euler")))
            .map(|r| (r.nfe as f64, r.energy))
            .collect();
        if m != "held-out" && !pts.is_empty() && pts.iter().all(|p| p.1.is_finite() && p.1 > 0.0 && p.1 < 10.0) {
            curves.push(plot::Series {
                name: label.into(),
                points: pts,
            });
        }
    }
    let mut levels = vec![];
    if let Some(r) = dopri5_row(rows, "checkerboard") {
        levels.push((format!("teacher dopri5 ({} NFE)", r.nfe), r.energy));
    }
    if let Some(r) = board.iter().find(|r| r.method == "held-out") {
        levels.push(("held-out data (floor)".to_string(), r.energy));
    }
    plot::loglog_lines_with_levels(
        path,
        "checkerboard: energy distance vs NFE, equal budget",
        "NFE",
        "energy distance",
        &curves,
        &levels,
    )
}

/// The rows' methods in `setting`, each once, in order of appearance.
fn methods_in<'a>(rows: &'a [CompareRow], setting: &str) -> Vec<&'a str> {
    let mut methods: Vec<&str> = vec![];
    for r in rows.iter().filter(|r| r.setting == setting) {
        if !methods.contains(&r.method.as_str()) {
            methods.push(&r.method);
        }
    }
    methods
}

/// The teacher's dopri5 row in `setting`.
fn dopri5_row<'a>(rows: &'a [CompareRow], setting: &str) -> Option<&'a CompareRow> {
    rows.iter()
        .find(|r| r.setting == setting && r.method == "teacher" && r.sampler.starts_with("dopri5"))
}

/// The teacher's dopri5 energy distance in `setting`, the reference of the comparison's ratios.
fn dopri5_energy(rows: &[CompareRow], setting: &str) -> Option<f64> {
    dopri5_row(rows, setting).map(|r| r.energy)
}

/// The comparison as Markdown: one table per setting, each energy distance also as a multiple of the
/// teacher's dopri5, then the acceptance checks evaluated on these rows.
pub fn compare_markdown(rows: &[CompareRow], budget: f64, seed: u64, n_eval: usize) -> String {
    let mut md = format!(
        "# Every flow-map method at an equal budget\n\nProduced by `flowmap bench compare --budget-seconds {budget}` (seed {seed}). Each teacher-based method distils for {budget} s of wall clock; the teacher-free methods ({}) get the teacher's training time on top. Energy distance and sliced W2 against {n_eval} held-out points (the `held-out` row scores a second, independent draw of the data: the metrics' floor at this size), and the energy distance as a multiple of the teacher's dopri5; on the analytic mixture, the relative flow-map error `E‖f − Φ‖²/E‖Φ − x‖²` with `(t, s)` uniform; the semigroup error over a 5-point grid. `cm` is sampled with the multistep consistency sampler. Every flow map walks the grid `t_i = (1 − i/k)^ρ` whose power ρ ∈ {{1/3, 1/2, 1/√2, 1, √2, 2, 3}} gave the least energy distance on a separate validation draw of 50000 points (`sample::select_grid`); the `uniform` column is the same map on the uniform grid (ρ = 1). The teacher's Euler rows stay uniform.\n",
        Method::all().filter(|m| !m.needs_teacher()).map(Method::name).collect::<Vec<_>>().join(", ")
    );
    for setting in ["checkerboard", "gmm"] {
        let reference = dopri5_energy(rows, setting);
        md += &format!("\n## {setting}\n\n| method | sampler | NFE | grid ρ | energy distance | × dopri5 | uniform | sliced W2 | map error | semigroup | train s | steps |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for r in rows.iter().filter(|r| r.setting == setting) {
            let opt = |v: Option<f64>| v.map(|v| format!("{v:.2e}")).unwrap_or_else(|| "–".into());
            let ratio = match reference {
                Some(d) if d > 0.0 && r.method != "held-out" => format!("{:.2}", r.energy / d),
                _ => "–".into(),
            };
            let rho = r.grid_power.map(|p| format!("{p:.2}")).unwrap_or_else(|| "–".into());
            let uniform = r
                .energy_uniform
                .map(|e| format!("{e:.6}"))
                .unwrap_or_else(|| "–".into());
            md += &format!(
                "| {} | {} | {} | {rho} | {:.6} | {} | {uniform} | {:.4} | {} | {} | {:.1} | {} |\n",
                r.method,
                r.sampler,
                r.nfe,
                r.energy,
                ratio,
                r.sliced_w2,
                opt(r.map_error),
                opt(r.semigroup),
                r.train_seconds,
                r.train_steps
            );
        }
    }
    md += "\n![quality versus NFE](compare_quality_vs_nfe.png)\n";
    md += &compare_checks(rows);
    md
}

/// The acceptance checks of the comparison, on checkerboard unless stated.
fn compare_checks(rows: &[CompareRow]) -> String {
    let board = |m: &str, nfe: usize| {
        rows.iter()
            .find(|r| r.setting == "checkerboard" && r.method == m && r.nfe == nfe)
            .map(|r| r.energy)
    };
    let methods: Vec<&str> = methods_in(rows, "checkerboard")
        .into_iter()
        .filter(|m| *m != "teacher" && *m != "held-out")
        .collect();
    let euler = |nfe: usize| {
        rows.iter()
            .find(|r| r.setting == "checkerboard" && r.method == "teacher" && r.sampler == format!("euler×{nfe}"))
            .map(|r| r.energy)
    };
    let beats_euler = methods.iter().all(|m| {
        [1, 2]
            .iter()
            .all(|&k| matches!((board(m, k), euler(k)), (Some(a), Some(b)) if a < b))
    });
    let dopri = dopri5_energy(rows, "checkerboard").unwrap_or(f64::NAN);
    let (best, best_ed) = methods
        .iter()
        .filter_map(|m| board(m, 2).map(|e| (*m, e)))
        .fold(("–", f64::INFINITY), |a, b| if b.1 < a.1 { b } else { a });
    let map_error = |m: &str| {
        rows.iter()
            .find(|r| r.setting == "gmm" && r.method == m)
            .and_then(|r| r.map_error)
    };
    let meanflow = board("meanflow", 2).unwrap_or(f64::NAN);
    let mark = |ok: bool| if ok { "pass" } else { "fail" };
    let mut md = String::from("\n## Checks\n\n| check | measured | result |\n|---|---|---|\n");
    md += &format!(
        "| every method beats the teacher's Euler sampler at 1 and 2 NFE | – | {} |\n",
        mark(beats_euler)
    );
    md += &format!(
        "| best 2-NFE energy distance within 1.2× the teacher's dopri5 | {best} {best_ed:.6} = {:.2}× | {} |\n",
        best_ed / dopri,
        mark(best_ed <= 1.2 * dopri)
    );
    if let (Some(cont), Some(disc)) = (map_error("emd-cont"), map_error("emd")) {
        md += &format!(
            "| mixture: continuous EMD at least as accurate as discrete EMD (map error) | {cont:.2e} vs {disc:.2e} | {} |\n",
            mark(cont <= disc)
        );
    }
    md += &format!(
        "| MeanFlow (no teacher) 2-NFE energy distance within 2× the teacher's dopri5 | {meanflow:.6} = {:.2}× | {} |\n",
        meanflow / dopri,
        mark(meanflow <= 2.0 * dopri)
    );
    md
}

/// Timing of one pass of a flow-map network: forward, exact JVP, finite-difference JVP.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JvpTiming {
    pub batch: usize,
    pub hidden: usize,
    pub forward_ms: f64,
    pub jvp_ms: f64,
    pub fd_jvp_ms: f64,
    /// `jvp_ms / forward_ms` (PyTorch's `torch.func.jvp` costs about 2.8× a forward on this kind of MLP).
    pub jvp_ratio: f64,
    pub fd_ratio: f64,
}

fn median_ms(mut f: impl FnMut() -> Result<()>, reps: usize) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    v.sort_by(f64::total_cmp);
    Ok(v[reps / 2])
}

/// `flowmap bench jvp`: the cost of the exact forward-mode JVP against a plain forward pass.
pub fn jvp(out: &Path, device: &Device) -> Result<Vec<JvpTiming>> {
    use candle_nn::{VarBuilder, VarMap};
    use flowmap::flow_map::{FiniteDifference, FlowMap, FlowMapNet, Point, Tangent, TangentMap};

    let out = OutDir::create(out)?;
    let mut rows = vec![];
    for (batch, hidden) in [(256, 256), (1024, 256), (4096, 256), (1024, 512)] {
        let vm = VarMap::new();
        let cfg = MlpConfig {
            hidden,
            ..MlpConfig::new(2)
        };
        let net = FlowMapNet::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, device))?;
        Arch::Mlp(cfg).seed_params(&vm, 0)?;
        let mut rng = flowmap::Rng::new(1);
        let x = rng.normal_tensor((batch, 2), DType::F32, device)?;
        let dx = rng.normal_tensor((batch, 2), DType::F32, device)?;
        let t = flowmap::data::to_tensor(&rng.uniform_vec(batch), batch, 1, DType::F32, device)?;
        let s = (&t * 0.5)?;
        let at = Point {
            x: &x,
            t: &t,
            s: &s,
            cond: Cond::none_ref(),
        };
        let along = Tangent::along_start(&dx, &at)?;
        let forward_ms = median_ms(|| net.average_velocity(&x.detach(), &t, &s, at.cond).map(|_| ()), 30)?;
        let jvp_ms = median_ms(|| net.average_velocity_jvp(&at, &along).map(|_| ()), 30)?;
        let fd = FiniteDifference { map: &net, h: 1e-3 };
        let fd_jvp_ms = median_ms(|| fd.average_velocity_jvp(&at, &along).map(|_| ()), 30)?;
        rows.push(JvpTiming {
            batch,
            hidden,
            forward_ms,
            jvp_ms,
            fd_jvp_ms,
            jvp_ratio: jvp_ms / forward_ms,
            fd_ratio: fd_jvp_ms / forward_ms,
        });
    }
    let mut md = String::from("# Forward-mode JVP cost\n\nFlow-map MLP (dimension 2, 3 hidden layers, SiLU), f32 on the CPU; median of 30 passes. Produced by `flowmap bench jvp`.\n\n| batch | hidden | forward ms | exact JVP ms | JVP / forward | finite-difference JVP ms | FD / forward |\n|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in &rows {
        md += &format!(
            "| {} | {} | {:.3} | {:.3} | {:.2} | {:.3} | {:.2} |\n",
            r.batch, r.hidden, r.forward_ms, r.jvp_ms, r.jvp_ratio, r.fd_jvp_ms, r.fd_ratio
        );
    }
    flowmap::io::write_text(
        &out.file("jvp.json"),
        &serde_json::to_string_pretty(&rows).expect("rows serialise"),
    )?;
    flowmap::io::write_text(&out.file("jvp.md"), &md)?;
    Ok(rows)
}
