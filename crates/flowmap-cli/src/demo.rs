//! `flowmap demo`: checkerboard → teacher → EMD and LMD flow maps → samples at 1, 2, 4 and 8 NFE against the
//! teacher's Euler sampler (1 to 128 steps) and dopri5; then the same distillation from the analytic
//! Gaussian-mixture teacher, measured against its exact flow map. Writes `report.md`, `report.json`, the
//! checkpoints and PNG figures.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use crate::plot::{self, Panel, Series};
use crate::report::{eval_table, progress_bar, Bar};
use flowmap::backbone::{Arch, MlpConfig};
use flowmap::data::{self, DataSource, GaussianMixture, Toy};
use flowmap::flow_map::FlowMapNet;
use flowmap::metrics::{self, MapError};
use flowmap::objective::{DistillConfig, Method};
use flowmap::path::LinearPath;
use flowmap::pipeline::{self, EvalRow, EvalSettings, MapJob, OutDir, Teacher};
use flowmap::sample::SampleContext;
use flowmap::teacher::GmmVelocity;
use flowmap::train::TrainConfig;
use flowmap::Cond;
use flowmap::Result;

/// The demo's budget.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DemoConfig {
    pub teacher_steps: usize,
    pub distill_steps: usize,
    pub gmm_steps: usize,
    pub batch_size: usize,
    /// Batch size of the distillation runs.
    pub distill_batch_size: usize,
    /// Hidden width of the student distilled from the analytic teacher.
    pub gmm_hidden: usize,
    /// Samples per evaluation row (and held-out points).
    pub n_eval: usize,
    pub seed: u64,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            teacher_steps: 10_000,
            distill_steps: 30_000,
            gmm_steps: 14000,
            batch_size: 1024,
            distill_batch_size: 512,
            gmm_hidden: 128,
            n_eval: 10_000,
            seed: 0,
        }
    }
}

/// The GMM part's measurements.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GmmStudy {
    pub method: String,
    /// `E‖f − Φ‖² / E‖Φ − x‖²` with `(t, s)` uniform on the triangle, per row.
    pub relative_error_uniform: f64,
    /// Mean relative error over the pairs of an 11-point grid.
    pub relative_error_grid: f64,
    /// `(step, semigroup error)` during training.
    pub semigroup_curve: Vec<(usize, f64)>,
    pub seconds: f64,
}

/// Everything the demo measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DemoReport {
    pub config: DemoConfig,
    pub rows: Vec<EvalRow>,
    pub map_error: Vec<(String, Vec<MapError>)>,
    pub semigroup: Vec<(String, f64)>,
    pub gmm: Vec<GmmStudy>,
    pub train_seconds: Vec<(String, f64)>,
    pub checks: Vec<(String, bool)>,
}

const METHODS: [Method; 2] = [Method::Emd, Method::Lmd];

/// Runs two independent jobs side by side, each on one of rayon's workers with the fast path limited to one
/// thread: at these batch sizes two single-threaded runs give more throughput than one run on two cores.
fn parallel<T: Send, F: FnOnce() -> T + Send>(jobs: [F; 2]) -> Vec<T> {
    let [a, b] = jobs;
    let (x, y) = rayon::join(
        || flowmap::kernels::with_threads(1, a),
        || flowmap::kernels::with_threads(1, b),
    );
    vec![x, y]
}

/// Runs the demo into `out`.
pub fn run(out: &Path, cfg: &DemoConfig, device: &Device, show_progress: bool) -> Result<DemoReport> {
    let out = OutDir::create(out)?;
    let data = DataSource::Toy(Toy::Checkerboard);
    let settings = EvalSettings {
        n: cfg.n_eval,
        seed: cfg.seed,
        max_points: cfg.n_eval,
        ..EvalSettings::default()
    };
    let arch = Arch::Mlp(MlpConfig::new(2));
    let train = |steps: usize, batch_size: usize, salt: u64| TrainConfig {
        steps,
        batch_size,
        seed: cfg.seed + salt,
        ..TrainConfig::default()
    };

    // 1. Teacher.
    let pb = progress_bar(cfg.teacher_steps as u64, "teacher", show_progress);
    let trained = pipeline::train_teacher(
        &data,
        &arch,
        &train(cfg.teacher_steps, cfg.batch_size, 0),
        device,
        &Bar(&pb),
    )?;
    pb.finish_and_clear();
    trained.save(&out.file("teacher.safetensors"))?;
    let mut train_seconds = vec![("teacher (flow matching)".to_string(), trained.log.seconds)];
    let teacher = trained.into_teacher();

    // 2. Flow maps: EMD and LMD train side by side, one compute thread each.
    let multi = indicatif::MultiProgress::new();
    let results = parallel(METHODS.map(|method| {
        let pb = multi.add(progress_bar(cfg.distill_steps as u64, method.name(), show_progress));
        let (teacher, data, arch) = (&teacher, &data, &arch);
        let tc = train(cfg.distill_steps, cfg.distill_batch_size, 1);
        move || {
            let job = MapJob {
                teacher: Some(teacher),
                objective: DistillConfig::default(),
                train: tc,
                arch: arch.clone(),
                device: device.clone(),
                ..MapJob::new(method, data)
            };
            let m = job.run(&Bar(&pb));
            pb.finish_and_clear();
            m
        }
    }));
    let mut maps: Vec<(String, FlowMapNet)> = vec![];
    for (method, m) in METHODS.into_iter().zip(results) {
        let m = m?;
        m.save(&out.file(&format!("{}.safetensors", method.name())))?;
        train_seconds.push((method.name().to_uppercase(), m.log.seconds));
        maps.push((method.name().to_uppercase(), m.net));
    }

    // 3. Samples and distances.
    let reference = data.heldout(cfg.n_eval, cfg.seed);
    let nfes = [1, 2, 4, 8];
    let (mut rows, teacher_samples) = pipeline::eval_teacher(
        "teacher",
        &teacher,
        &pipeline::teacher_solvers(),
        &Cond::none(),
        &reference,
        true,
        &settings,
        device,
    )?;
    let mut map_samples = vec![];
    for (name, net) in &maps {
        let (r, s) = pipeline::eval_map(
            name,
            net,
            &nfes,
            flowmap::sample::Sampler::Deterministic,
            &SampleContext::new(cfg.seed),
            &reference,
            true,
            &settings,
            device,
        )?;
        rows.extend(r);
        map_samples.push(s);
    }

    // 4. Errors against the teacher's exact flow map, and the semigroup error (both maps side by side).
    let measured = parallel([0, 1].map(|i| {
        let (net, teacher, data) = (&maps[i].1, &teacher, &data);
        move || -> Result<(Vec<MapError>, f64)> {
            Ok((
                pipeline::map_errors(net, teacher, data, &LinearPath, 11, 1000, cfg.seed, device)?,
                pipeline::semigroup(net, data, &LinearPath, 2000, cfg.seed, device)?,
            ))
        }
    }));
    let mut map_error = vec![];
    let mut semigroup = vec![];
    for ((name, _), m) in maps.iter().zip(measured) {
        let (errors, sg) = m?;
        map_error.push((name.clone(), errors));
        semigroup.push((name.clone(), sg));
    }

    // 5. The analytic teacher, again both methods side by side.
    let gmm = parallel(METHODS.map(|method| move || gmm_study(method, cfg, device, show_progress)))
        .into_iter()
        .collect::<Result<Vec<_>>>()?;

    // 6. Figures.
    let find = |model: &str, nfe: usize| rows.iter().position(|r| r.model == model && r.nfe == nfe);
    let dopri = rows
        .iter()
        .position(|r| r.sampler.starts_with("dopri5"))
        .expect("dopri5 row");
    let mut panels = vec![Panel {
        title: "data (held out)".into(),
        points: &reference,
        dim: 2,
    }];
    panels.push(Panel {
        title: format!("teacher dopri5, NFE {}", rows[dopri].nfe),
        points: &teacher_samples[dopri],
        dim: 2,
    });
    for k in [2, 8] {
        let i = find("teacher", k).expect("euler row");
        panels.push(Panel {
            title: format!("teacher Euler, NFE {k}"),
            points: &teacher_samples[i],
            dim: 2,
        });
    }
    for ((name, _), samples) in maps.iter().zip(&map_samples) {
        for (k, s) in nfes.iter().zip(samples) {
            panels.push(Panel {
                title: format!("{name} map, NFE {k}"),
                points: s,
                dim: 2,
            });
        }
    }
    plot::scatter_panels(&out.file("samples.png"), &panels, 4, 2.6)?;

    let mut series = vec![Series {
        name: "teacher, Euler".into(),
        points: rows
            .iter()
            .filter(|r| r.sampler.starts_with("euler"))
            .map(|r| (r.nfe as f64, r.distances.energy))
            .collect(),
    }];
    series.push(Series {
        name: "teacher, dopri5".into(),
        points: vec![(rows[dopri].nfe as f64, rows[dopri].distances.energy)],
    });
    for (name, _) in &maps {
        series.push(Series {
            name: format!("{name} flow map"),
            points: rows
                .iter()
                .filter(|r| &r.model == name)
                .map(|r| (r.nfe as f64, r.distances.energy))
                .collect(),
        });
    }
    plot::loglog_lines(
        &out.file("quality_vs_nfe.png"),
        "checkerboard: energy distance to held-out data",
        "NFE",
        "energy distance",
        &series,
    )?;
    for (name, errs) in &map_error {
        let cells: Vec<(f64, f64, f64)> = errs.iter().map(|e| (e.t, e.s, e.rel)).collect();
        plot::triangle_heatmap(
            &out.file(&format!("map_error_{}.png", name.to_lowercase())),
            &format!("{name}: relative error E|f - Φ|² / E|Φ - x|²"),
            &cells,
            11,
        )?;
    }

    // 7. Checks and report.
    let energy = |model: &str, nfe: usize| find(model, nfe).map(|i| rows[i].distances.energy).unwrap_or(f64::NAN);
    let d_dopri = rows[dopri].distances.energy;
    let checks = vec![
        (
            "EMD at 1 NFE beats teacher Euler at 8 NFE (energy distance)".to_string(),
            energy("EMD", 1) < energy("teacher", 8),
        ),
        (
            "EMD at 2 NFE within 1.25× of teacher dopri5 (energy distance)".to_string(),
            energy("EMD", 2) <= 1.25 * d_dopri,
        ),
        (
            "GMM EMD relative flow-map error below 1e-2 (uniform pairs)".to_string(),
            gmm.iter().any(|g| g.method == "EMD" && g.relative_error_uniform < 1e-2),
        ),
        (
            "GMM EMD semigroup error falls during training (end below 0.7× its peak)".to_string(),
            gmm.iter().any(|g| g.method == "EMD" && falls(&g.semigroup_curve)),
        ),
    ];
    let report = DemoReport {
        config: cfg.clone(),
        rows,
        map_error,
        semigroup,
        gmm,
        train_seconds,
        checks,
    };
    flowmap::io::write_text(
        &out.file("report.json"),
        &serde_json::to_string_pretty(&report).expect("report serialises"),
    )?;
    flowmap::io::write_text(&out.file("report.md"), &markdown(&report))?;
    Ok(report)
}

/// Whether the semigroup error ends well below its peak. A fresh network starts near a constant map, which
/// is trivially consistent, so the error first rises as the map moves, then falls as it learns.
fn falls(curve: &[(usize, f64)]) -> bool {
    let peak = curve.iter().map(|p| p.1).fold(0.0, f64::max);
    curve.last().is_some_and(|l| l.1 < 0.7 * peak)
}

/// Distils from the analytic teacher of [`GaussianMixture::three_widths`] and measures against its exact Φ.
pub fn gmm_study(method: Method, cfg: &DemoConfig, device: &Device, show_progress: bool) -> Result<GmmStudy> {
    let mixture = GaussianMixture::three_widths();
    let velocity = GmmVelocity::new(mixture.clone());
    let teacher = Teacher::Gmm(velocity.clone());
    let data = DataSource::Mixture(mixture);
    let n = 2000;
    let x0 = data::to_tensor(&data.heldout(n, cfg.seed), n, 2, DType::F32, device)?;
    let x1 = flowmap::sample::noise(n, &[2], cfg.seed + 7, device)?;
    let points = metrics::PathPoints {
        x0: &x0,
        x1: &x1,
        cond: Cond::none_ref(),
        path: &LinearPath,
    };
    let mut curve = vec![];
    let mut monitor = |step: usize, net: &FlowMapNet| -> Result<()> {
        curve.push((step, metrics::semigroup_error(net, &points, 5)?));
        Ok(())
    };
    let tc = TrainConfig {
        steps: cfg.gmm_steps,
        batch_size: cfg.distill_batch_size,
        seed: cfg.seed + 2,
        ..TrainConfig::default()
    };
    let pb = progress_bar(cfg.gmm_steps as u64, &format!("gmm {}", method.name()), show_progress);
    let start = Instant::now();
    let every = (cfg.gmm_steps / 10).max(1);
    let job = MapJob {
        teacher: Some(&teacher),
        objective: DistillConfig::default(),
        train: tc,
        arch: Arch::Mlp(MlpConfig {
            hidden: cfg.gmm_hidden,
            ..MlpConfig::new(2)
        }),
        device: device.clone(),
        ..MapJob::new(method, &data)
    };
    let m = job.run_monitored(&Bar(&pb), every, &mut monitor)?;
    let seconds = start.elapsed().as_secs_f64();
    pb.finish_and_clear();
    let report = pipeline::exact_map_report(&m.net, velocity.mixture(), n, cfg.seed, device)?;
    Ok(GmmStudy {
        method: method.name().to_uppercase(),
        relative_error_uniform: report.relative_error_uniform,
        relative_error_grid: report.relative_error_grid,
        semigroup_curve: curve,
        seconds,
    })
}

fn markdown(r: &DemoReport) -> String {
    let mut s = String::from("# flowmap demo report\n\n");
    s += &format!(
        "Checkerboard: teacher {} steps at batch {}, each flow map {} steps at batch {}; {} samples against {} held-out points; seed {}. Produced by `flowmap demo`.\n\n",
        r.config.teacher_steps,
        r.config.batch_size,
        r.config.distill_steps,
        r.config.distill_batch_size,
        r.config.n_eval,
        r.config.n_eval,
        r.config.seed
    );
    s += "## Checks\n\n";
    for (name, ok) in &r.checks {
        s += &format!("- [{}] {name}\n", if *ok { "x" } else { " " });
    }
    s += "\n## Sample quality\n\n";
    s += &eval_table(&r.rows);
    s += "\n![samples](samples.png)\n\n![quality versus NFE](quality_vs_nfe.png)\n\n";
    s += "## Against the teacher's exact flow map\n\nMean relative error `E‖f − Φ‖² / E‖Φ − x‖²` over the 55 pairs `t > s` of an 11-point grid on 1,000 held-out points (Φ by dopri5 on the teacher, tolerance 1e-5), and the semigroup error `E‖f(f(x,t,u),u,s) − f(x,t,s)‖²` over the triples of a 5-point grid (2,000 points).\n\n| map | mean relative error | semigroup error |\n|---|---:|---:|\n";
    for ((name, errs), (_, sg)) in r.map_error.iter().zip(&r.semigroup) {
        s += &format!("| {name} | {:.3e} | {:.3e} |\n", metrics::mean_relative(errs), sg);
    }
    for (name, _) in &r.map_error {
        s += &format!("\n![{name} error](map_error_{}.png)\n", name.to_lowercase());
    }
    s += "\n## Analytic Gaussian-mixture teacher\n\nThree isotropic components of stds 0.15, 0.4 and 0.25; the student is measured against the exact Φ of the mixture (dopri5 on the closed-form velocity, tolerance 1e-6).\n\n| method | relative error, uniform (t, s) | relative error, grid mean | semigroup error: peak → end | seconds |\n|---|---:|---:|---:|---:|\n";
    for g in &r.gmm {
        let a = g.semigroup_curve.iter().map(|p| p.1).fold(0.0, f64::max);
        let b = g.semigroup_curve.last().map(|p| p.1).unwrap_or(f64::NAN);
        s += &format!(
            "| {} | {:.3e} | {:.3e} | {a:.3e} → {b:.3e} | {:.1} |\n",
            g.method, g.relative_error_uniform, g.relative_error_grid, g.seconds
        );
    }
    s += "\n## Training time\n\n| run | seconds |\n|---|---:|\n";
    for (name, secs) in &r.train_seconds {
        s += &format!("| {name} | {secs:.1} |\n");
    }
    s
}
