//! `flowmap bench guidance`: classifier-free guidance and autoguidance on MNIST, at each guidance scale.
//!
//! From the shipped class-conditional U-Net teacher (or one given), it trains
//! - a guidance-distilled map (`distill --method M --guidance-range`, a consistency model by default): the
//!   scale is the map's input, so one map serves every scale of its range;
//! - a guided MeanFlow map from data (`train --guidance-range`, fine-tuned from the teacher): the target
//!   velocity `ω·(x1 − x0) + (1 − ω)·F⁻(x_t, t, t | ∅)`, no teacher in the loss;
//! - a weak model for autoguidance: the teacher's recipe at half the channels and a fraction of the steps;
//!
//! then measures, at every scale `w`, FD, precision, recall and class accuracy of the teacher under
//! classifier-free guidance (dopri5 and Euler with 8 steps), the teacher autoguided by the weak model
//! (Euler 8, equal NFE), and each map at 1 and 2 NFE. It writes `guidance.json`, `guidance.md` (with the
//! issue's acceptance checks), `fd-vs-accuracy.png` (one curve per sampler, one point per scale) and a
//! grid per sampler and scale.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::demo_mnist::{self, write_grid};
use crate::plot;
use crate::report::{self, progress_bar};
use flowmap::backbone::{Arch, UnetConfig};
use flowmap::classifier::Classifier;
use flowmap::data::DataSource;
use flowmap::flow_map::AtGuidance;
use flowmap::objective::Method;
use flowmap::ode::Solver;
use flowmap::pipeline::images::{ImageEval, ImageRow};
use flowmap::pipeline::{self, MapJob, OutDir, Teacher, TrainedMap};
use flowmap::sample::Sampler;
use flowmap::teacher::{Autoguided, Guided};
use flowmap::train::TrainConfig;
use flowmap::{io, Result};

/// The run's settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GuidanceConfig {
    /// The teacher checkpoint; `None` for the shipped one.
    pub teacher: Option<PathBuf>,
    /// The guidance scales measured.
    pub scales: Vec<f64>,
    /// The range the maps are trained on.
    pub range: [f64; 2],
    /// The teacher-based method that distils the guided teacher.
    #[serde(default = "default_method")]
    pub method: Method,
    /// Steps of each map, at `batch_size`.
    pub map_steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    /// The autoguidance model: the teacher's U-Net at these first-level channels, trained for these steps
    /// (batch 64) with the teacher's recipe.
    pub weak_channels: usize,
    pub weak_steps: usize,
    /// Samples per row (and held-out reference images).
    pub n_eval: usize,
    pub dopri5_tol: f64,
    /// Euler steps of the teacher's fixed-step rows.
    pub euler_steps: usize,
    pub seed: u64,
}

/// Reports written before the method was a setting distilled with EMD.
fn default_method() -> Method {
    Method::Emd
}

impl Default for GuidanceConfig {
    fn default() -> Self {
        GuidanceConfig {
            teacher: None,
            scales: vec![1.0, 1.5, 2.0, 3.0, 4.0],
            range: [1.0, 4.0],
            // The consistency model against EMD at 1,500 steps at batch 32 (`bench guidance --method emd|cm`):
            // 1-NFE FD over the guided teacher's dopri5 at w = 1, 1.5, 2, 3, 4 of 1.62, 1.30, 1.21, 1.09, 1.05
            // against EMD's 1.55, 1.12, 1.18, 1.39, 1.76; at 3,000 steps at batch 64 it is within 1.29.
            method: Method::Cm,
            map_steps: 3000,
            batch_size: 64,
            lr: 5e-4,
            weak_channels: 8,
            weak_steps: 600,
            n_eval: 500,
            dopri5_tol: 1e-3,
            euler_steps: 8,
            seed: 0,
        }
    }
}

/// One measured row: a sampler at one scale. The row's `model` says what samples (`teacher CFG`, `teacher
/// autoguided`, `EMD map (guidance distilled)`, `MeanFlow (guided, from data)`), its `sampler` how.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GuidanceRow {
    pub w: f64,
    #[serde(flatten)]
    pub row: ImageRow,
}

/// The acceptance checks at one scale.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Acceptance {
    pub w: f64,
    /// The guidance-distilled map's 1-NFE FD over the guided teacher's dopri5 FD (wanted ≤ 1.5).
    pub fd_ratio: f64,
    /// The map's 1-NFE class accuracy minus the teacher's dopri5 accuracy, in points (wanted ≥ −1 at w = 2).
    pub accuracy_gap: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GuidanceReport {
    pub config: GuidanceConfig,
    /// The data's own floor (training images against held-out ones).
    pub floor: ImageRow,
    pub rows: Vec<GuidanceRow>,
    pub acceptance: Vec<Acceptance>,
    pub train_seconds: Vec<(String, f64)>,
    pub seconds: f64,
}

const CFG_TEACHER: &str = "teacher CFG";
const AUTO_TEACHER: &str = "teacher autoguided";
const MEANFLOW: &str = "MeanFlow (guided, from data)";

/// The guidance-distilled map's row label: `EMD map (guidance distilled)`.
fn distilled_map(method: Method) -> String {
    format!("{} map (guidance distilled)", method.name().to_uppercase())
}

pub fn run(out: &Path, cfg: &GuidanceConfig, device: &Device, show: bool) -> Result<GuidanceReport> {
    let start = Instant::now();
    if !cfg.method.needs_teacher() {
        return Err(flowmap::Error::arg(format!(
            "'{}' trains from data; the guidance bench distils the guided teacher with a teacher-based method",
            cfg.method
        )));
    }
    for &w in &cfg.scales {
        flowmap::cond::check_guidance_scale(w)?;
        if w < cfg.range[0] || w > cfg.range[1] {
            return Err(flowmap::Error::arg(format!(
                "scale {w} is outside the maps' range [{}, {}]",
                cfg.range[0], cfg.range[1]
            )));
        }
    }
    flowmap::backbone::check_guidance_range(cfg.range)?;
    let out = OutDir::create(out)?;
    let data = DataSource::from_spec("mnist")?;
    let teacher_path = out.file("teacher.safetensors");
    match &cfg.teacher {
        None => demo_mnist::write_shipped_teacher(&teacher_path)?,
        Some(p) => io::write_atomic(&teacher_path, |w| w.write_all(&std::fs::read(p)?))?,
    }
    let teacher = Teacher::load(&teacher_path.to_string_lossy(), device)?;
    let classes = teacher.num_classes().ok_or_else(|| {
        flowmap::Error::arg("classifier-free guidance needs a class-conditional teacher (trained on labelled data)")
    })?;
    let mut train_seconds = vec![];

    // The autoguidance model: the teacher's recipe, smaller and shorter.
    let weak_arch = Arch::Unet(UnetConfig {
        channels: cfg.weak_channels,
        num_classes: Some(classes),
        ..UnetConfig::new(&[1, 28, 28])
    });
    let tcfg = TrainConfig {
        steps: cfg.weak_steps,
        batch_size: 64,
        lr: 2e-3,
        seed: cfg.seed,
        ..TrainConfig::default()
    };
    let pb = progress_bar(cfg.weak_steps as u64, "weak model", show);
    let t0 = Instant::now();
    let w = pipeline::train_teacher(&data, &weak_arch, &tcfg, device, &report::ImageBar::new(&pb, 64))?;
    pb.finish_and_clear();
    train_seconds.push(("weak model".to_string(), t0.elapsed().as_secs_f64()));
    w.save(&out.file("weak.safetensors"))?;
    let weak = w.into_teacher();
    pipeline::check_guide(&teacher, &weak)?;

    // The two maps, each over the whole range.
    let train = TrainConfig {
        steps: cfg.map_steps,
        batch_size: cfg.batch_size,
        lr: cfg.lr,
        warmup_steps: (cfg.map_steps / 20).max(1),
        ema_decay: 0.99,
        seed: cfg.seed,
        guidance_range: Some(cfg.range),
        ..TrainConfig::default()
    };
    let mut fit = |name: &str, file: &str, job: MapJob<'_>| -> Result<TrainedMap> {
        let pb = progress_bar(cfg.map_steps as u64, name, show);
        let t0 = Instant::now();
        let m = job.run(&report::ImageBar::new(&pb, cfg.batch_size))?;
        pb.finish_and_clear();
        train_seconds.push((name.to_string(), t0.elapsed().as_secs_f64()));
        m.save(&out.file(file))?;
        Ok(m)
    };
    let distilled = fit(
        &format!("{} (guided)", cfg.method),
        &format!("{}-guided.safetensors", cfg.method),
        MapJob {
            teacher: Some(&teacher),
            train: train.clone(),
            device: device.clone(),
            ..MapJob::new(cfg.method, &data)
        },
    )?;
    let meanflow = fit(
        "meanflow (guided)",
        "meanflow-guided.safetensors",
        MapJob {
            init: Some(&teacher),
            arch: demo_mnist::teacher_arch(),
            train: train.clone(),
            device: device.clone(),
            ..MapJob::new(Method::Meanflow, &data)
        },
    )?;

    let clf = Classifier::embedded_mnist(device)?;
    let ev = ImageEval::new(&clf, &data, cfg.n_eval, cfg.seed, device)?;
    let floor = ev.floor(&data, device)?;
    let mut rows: Vec<GuidanceRow> = vec![];
    let mut figures: Vec<(String, String)> = vec![];
    let mut keep = |w: f64, r: Vec<ImageRow>, x: Vec<candle_core::Tensor>| -> Result<()> {
        for (row, x) in r.into_iter().zip(x) {
            let stem = slug(&format!("{} {} w{w}", row.model, row.sampler));
            figures.push((
                format!("{}, {}, w = {w}", row.model, row.sampler),
                write_grid(&out, &stem, &x)?,
            ));
            rows.push(GuidanceRow { w, row });
        }
        Ok(())
    };
    let euler = Solver::fixed(flowmap::ode::Scheme::Euler, cfg.euler_steps);
    let dopri5 = Solver::dopri5(cfg.dopri5_tol);
    let path = distilled.meta.probability_path()?;
    let cfg_map = distilled_map(cfg.method);
    // A consistency model is defined at `s = 0` only: its multistep samples take the consistency sampler.
    let distilled_sampler = if cfg.method.boundary_only() {
        Sampler::Consistency
    } else {
        Sampler::Deterministic
    };
    let c = Some(classes);
    for &w in &cfg.scales {
        let g = Guided::new(&teacher, w, classes)?;
        let (r, x) = ev.teacher(CFG_TEACHER, &g, c, &[dopri5, euler], device)?;
        keep(w, r, x)?;
        let a = Autoguided::new(&teacher, &weak, w)?;
        let (r, x) = ev.teacher(AUTO_TEACHER, &a, c, &[euler], device)?;
        keep(w, r, x)?;
        for (name, m, sampler) in [
            (&*cfg_map, &distilled, distilled_sampler),
            (MEANFLOW, &meanflow, Sampler::Deterministic),
        ] {
            let at = AtGuidance::new(&m.net, w)?;
            let (r, x) = ev.map(name, &at, c, &[1, 2], sampler, &*path, device)?;
            keep(w, r, x)?;
        }
    }
    let find = |model: &str, w: f64, pick: &dyn Fn(&ImageRow) -> bool| {
        rows.iter()
            .find(|r| r.row.model == model && r.w == w && pick(&r.row))
            .map(|r| r.row.metrics.clone())
    };
    let acceptance = cfg
        .scales
        .iter()
        .filter_map(|&w| {
            let reference = find(CFG_TEACHER, w, &|r| r.sampler.starts_with("dopri5"))?;
            let map = find(&cfg_map, w, &|r| r.nfe == 1)?;
            Some(Acceptance {
                w,
                fd_ratio: map.fd / reference.fd,
                accuracy_gap: 100.0 * (map.accuracy? - reference.accuracy?),
            })
        })
        .collect();
    let report = GuidanceReport {
        config: cfg.clone(),
        floor,
        rows,
        acceptance,
        train_seconds,
        seconds: start.elapsed().as_secs_f64(),
    };
    fd_accuracy_plot(&out, &report)?;
    write_report(&out, &report, &clf, &figures)?;
    Ok(report)
}

/// A file-name stem: lower-case letters, digits and dots, other runs of characters as one `-`
/// (`teacher CFG dopri5(rtol=1e-3) w1.5` → `teacher-cfg-dopri5-rtol-1e-3-w1.5`).
fn slug(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_alphanumeric() || c == '.' {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_string()
}

/// FD against class accuracy: one curve per sampler, one point per scale (tagged with its `w`).
fn fd_accuracy_plot(out: &OutDir, r: &GuidanceReport) -> Result<()> {
    let mut series: Vec<plot::Series> = vec![];
    let mut tags: Vec<Vec<String>> = vec![];
    for row in &r.rows {
        let name = format!("{} {}", row.row.model, row.row.sampler);
        let point = (100.0 * row.row.metrics.accuracy.unwrap_or(f64::NAN), row.row.metrics.fd);
        match series.iter().position(|s| s.name == name) {
            Some(i) => {
                series[i].points.push(point);
                tags[i].push(format!("{}", row.w));
            }
            None => {
                series.push(plot::Series {
                    name,
                    points: vec![point],
                });
                tags.push(vec![format!("{}", row.w)]);
            }
        }
    }
    plot::lin_log_tagged_lines(
        &out.file("fd-vs-accuracy.png"),
        "MNIST guidance: FD against class accuracy (points tagged by w)",
        "class accuracy (%)",
        "FD",
        &series,
        &tags,
    )
}

fn write_report(out: &OutDir, r: &GuidanceReport, clf: &Classifier, figures: &[(String, String)]) -> Result<()> {
    let c = &r.config;
    let teacher = match &c.teacher {
        None => format!("the shipped teacher (`{}`)", demo_mnist::TEACHER_COMMAND),
        Some(p) => format!("`{}`", p.display()),
    };
    let scales: Vec<String> = c.scales.iter().map(|w| w.to_string()).collect();
    let mut md = format!(
        "# flowmap bench guidance: MNIST\n\n\
         Teacher: {teacher}, a 16-channel class-conditional U-Net trained with 10% label dropout. \
         Classifier-free guidance `v(∅) + w·(v(c) − v(∅))`; autoguidance `v_weak + w·(v − v_weak)` by a \
         {}-channel U-Net of the same recipe trained for {} steps at batch 64. The maps are trained once on \
         w ∈ [{}, {}] for {} steps at batch {} (lr {}), and sampled at each w with the scale as their input: \
         the {} map distils the guided teacher{}, the MeanFlow map is fine-tuned from the teacher on data \
         with the guided target `ω·(x1 − x0) + (1 − ω)·F⁻(x_t, t, t | ∅)`.\n\n\
         Scales {}; {} samples per row (classes `i mod 10`) against {} held-out digits, in the features of \
         the shipped MNIST classifier (held-out accuracy {:.2}%). NFE counts network evaluations: a guided \
         teacher step costs two. Data floor (training images against held-out): FD {:.3}, precision {:.3}, \
         recall {:.3}.\n\n",
        c.weak_channels,
        c.weak_steps,
        c.range[0],
        c.range[1],
        c.map_steps,
        c.batch_size,
        c.lr,
        c.method.name().to_uppercase(),
        if c.method.boundary_only() {
            " (at `s = 0`; its 2-step rows use the consistency sampler)"
        } else {
            ""
        },
        scales.join(", "),
        c.n_eval,
        c.n_eval,
        100.0 * clf.meta.heldout_accuracy,
        r.floor.metrics.fd,
        r.floor.metrics.precision,
        r.floor.metrics.recall,
    );
    md += "| sampler | w | steps | NFE | FD | precision | recall | class accuracy | seconds |\n|---|---:|---|---:|---:|---:|---:|---:|---:|\n";
    for g in &r.rows {
        let m = &g.row.metrics;
        let acc = m.accuracy.map_or("-".into(), |a| format!("{:.1}%", 100.0 * a));
        md += &format!(
            "| {} | {} | {} | {} | {:.3} | {:.3} | {:.3} | {acc} | {:.1} |\n",
            g.row.model, g.w, g.row.sampler, g.row.nfe, m.fd, m.precision, m.recall, g.row.seconds
        );
    }
    md += "\n## Acceptance\n\nThe guidance-distilled map at 1 NFE against the guided teacher's dopri5 at each w (wanted: FD ratio ≤ 1.5 at every w; class accuracy no more than 1 point below at w = 2).\n\n| w | FD ratio | accuracy gap (points) | FD ratio ≤ 1.5 |\n|---:|---:|---:|---|\n";
    for a in &r.acceptance {
        md += &format!(
            "| {} | {:.2} | {:+.1} | {} |\n",
            a.w,
            a.fd_ratio,
            a.accuracy_gap,
            if a.fd_ratio <= 1.5 { "yes" } else { "no" }
        );
    }
    // Autoguidance against classifier-free guidance at equal NFE (the teacher's Euler rows).
    md += "\n## Autoguidance against classifier-free guidance at equal NFE\n\n| w | CFG FD | autoguided FD | CFG accuracy | autoguided accuracy |\n|---:|---:|---:|---:|---:|\n";
    for &w in &c.scales {
        let euler = |s: &str| {
            r.rows
                .iter()
                .find(|g| g.row.model == s && g.w == w && g.row.sampler.starts_with("euler"))
        };
        if let (Some(a), Some(b)) = (euler(CFG_TEACHER), euler(AUTO_TEACHER)) {
            let acc = |g: &GuidanceRow| {
                g.row
                    .metrics
                    .accuracy
                    .map_or("-".into(), |a| format!("{:.1}%", 100.0 * a))
            };
            md += &format!(
                "| {w} | {:.3} | {:.3} | {} | {} |\n",
                a.row.metrics.fd,
                b.row.metrics.fd,
                acc(a),
                acc(b)
            );
        }
    }
    md += "\nTraining: ";
    md += &r
        .train_seconds
        .iter()
        .map(|(n, s)| format!("{n} {s:.0} s"))
        .collect::<Vec<_>>()
        .join(", ");
    md += &format!(
        "; total {:.0} s. Checkpoints: teacher.safetensors, weak.safetensors, {m}-guided.safetensors, meanflow-guided.safetensors \
         (`flowmap sample --model {m}-guided.safetensors --guidance 2 --class all --n 100 --png g.png --out g.npy`).\n\n\
         ![FD against class accuracy](fd-vs-accuracy.png)\n\n## Samples (one row per class)\n\n",
        r.seconds,
        m = c.method,
    );
    for (title, f) in figures {
        md += &format!("**{title}**\n\n![{f}]({f})\n\n");
    }
    io::write_text(&out.file("guidance.md"), &md)?;
    io::write_text(
        &out.file("guidance.json"),
        &serde_json::to_string_pretty(r).expect("report serialises"),
    )?;
    Ok(())
}
