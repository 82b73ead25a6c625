//! `flowmap demo mnist` (and `flowmap bench mnist`, the same run at a larger budget): a class-conditional
//! U-Net teacher on the embedded digits → flow maps (EMD and LMD distilled from it, MeanFlow fine-tuned from
//! it) → FD, precision, recall and class accuracy at 1, 2 and 4 NFE beside the teacher's Euler at the same
//! NFE and its dopri5, with the data's own floor; sample grids (one row per class) and the checkpoints,
//! named by role (`teacher.safetensors`, `<method>.safetensors`).
//!
//! The demo starts from the teacher shipped in `assets/mnist-teacher.safetensors` (reproduced bit for bit
//! by the command in [`TEACHER_COMMAND`] built from commit `c434d2f`; GroupNorm's kernel has since been
//! vectorised, so today's build trains a teacher of the same recipe, not of the same bits); the benchmark
//! trains its own.

use std::path::Path;
use std::time::Instant;

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::grid;
use crate::report::{self, progress_bar};
use flowmap::backbone::{Arch, UnetConfig};
use flowmap::classifier::Classifier;
use flowmap::data::DataSource;
use flowmap::objective::{registry, DataKind, DistillConfig, Method};
use flowmap::pipeline::images::{ImageEval, ImageRow};
use flowmap::pipeline::{self, MapJob, OutDir, Teacher};
use flowmap::sample::Sampler;
use flowmap::train::TrainConfig;
use flowmap::{io, Result};

/// The shipped teacher.
const SHIPPED_TEACHER: &[u8] = include_bytes!("../assets/mnist-teacher.safetensors");

/// The command that reproduces the shipped teacher bit for bit (built from commit `c434d2f`).
pub const TEACHER_COMMAND: &str =
    "flowmap teacher --data mnist --channels 16 --steps 3000 --batch 64 --lr 2e-3 --seed 0 --out teacher.safetensors";

/// The shipped teacher's training steps (at batch 64), as in [`TEACHER_COMMAND`].
pub const SHIPPED_TEACHER_STEPS: usize = 3000;

/// Writes the shipped teacher to `path` (atomically).
pub fn write_shipped_teacher(path: &Path) -> Result<()> {
    io::write_atomic(path, |w| w.write_all(SHIPPED_TEACHER))
}

/// The U-Net of the demo's teacher (and of [`TEACHER_COMMAND`]).
pub fn teacher_arch() -> Arch {
    Arch::Unet(UnetConfig::mnist(16))
}

/// The run's budget.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MnistConfig {
    /// `flowmap bench mnist` (every method, the acceptance checks) rather than the demo.
    pub bench: bool,
    /// Train the teacher for this many steps (batch 64) instead of starting from the shipped one.
    pub teacher_steps: Option<usize>,
    /// The flow maps, in order.
    pub methods: Vec<Method>,
    /// Steps of each flow map.
    pub map_steps: usize,
    /// Steps of the recommended one-step recipe for images ([`registry::recommended`], with its own
    /// batch, learning rate and EMA), trained first as the map `distill` gives without `--method`; 0: none.
    #[serde(default)]
    pub recommended_steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    /// Samples per evaluation row (and held-out reference images).
    pub n_eval: usize,
    pub nfes: Vec<usize>,
    /// Relative tolerance of the teacher's dopri5 row.
    pub dopri5_tol: f64,
    /// Train the data-only methods from scratch for the teacher's and a distillation's steps together,
    /// instead of fine-tuning them from the teacher for a distillation's steps. Either way they see the
    /// teacher's budget plus a distillation's, and only data: the teacher's weights are flow matching on the
    /// same digits, the `s → t` limit of every map.
    pub data_only_from_scratch: bool,
    pub seed: u64,
}

impl MnistConfig {
    /// `flowmap demo mnist`: inside 15 minutes on two cores.
    pub fn demo() -> Self {
        MnistConfig {
            bench: false,
            teacher_steps: None,
            methods: vec![Method::Emd, Method::Meanflow, Method::Lmd],
            map_steps: 300,
            recommended_steps: 1000,
            batch_size: 32,
            lr: 5e-4,
            n_eval: 500,
            nfes: vec![1, 2, 4],
            dopri5_tol: 1e-3,
            data_only_from_scratch: false,
            seed: 0,
        }
    }

    /// `flowmap bench mnist`: a teacher trained here (or the shipped one, `None`) and every method of the
    /// family, the data-only ones from scratch at the teacher's and a distillation's budget together.
    pub fn bench(teacher_steps: Option<usize>, map_steps: usize, n_eval: usize, seed: u64) -> Self {
        MnistConfig {
            bench: true,
            teacher_steps,
            methods: Method::all().collect(),
            map_steps,
            recommended_steps: 0,
            batch_size: 64,
            lr: 5e-4,
            n_eval,
            nfes: vec![1, 2, 4, 8],
            dopri5_tol: 1e-3,
            data_only_from_scratch: true,
            seed,
        }
    }

    /// The teacher's training steps, trained here or shipped.
    pub fn teacher_budget(&self) -> usize {
        self.teacher_steps.unwrap_or(SHIPPED_TEACHER_STEPS)
    }
}

/// How one model was trained.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Training {
    pub model: String,
    /// Steps of this run (the teacher's before it not counted).
    pub steps: usize,
    /// Where its weights started: `teacher` (fine-tuned), `scratch`, or `shipped` for the teacher.
    pub init: String,
    /// Steps of data (teacher and map together) behind the model.
    pub total_steps: usize,
    pub seconds: f64,
    /// The recommended recipe (`distill` without `--method`), trained at its own budget.
    #[serde(default)]
    pub recommended: bool,
}

/// What the run measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MnistReport {
    pub config: MnistConfig,
    pub training: Vec<Training>,
    pub rows: Vec<ImageRow>,
    pub checkpoints: Vec<String>,
    pub seconds: f64,
}

pub fn run(out: &Path, cfg: &MnistConfig, device: &Device, show: bool) -> Result<MnistReport> {
    let start = Instant::now();
    let out = OutDir::create(out)?;
    let data = DataSource::from_spec("mnist")?;
    let teacher_path = out.file("teacher.safetensors");
    let clock = Instant::now();
    match cfg.teacher_steps {
        None => write_shipped_teacher(&teacher_path)?,
        Some(steps) => {
            let tcfg = TrainConfig {
                steps,
                batch_size: 64,
                lr: 2e-3,
                seed: cfg.seed,
                ..TrainConfig::default()
            };
            let pb = progress_bar(steps as u64, "teacher", show);
            let t = pipeline::train_teacher(&data, &teacher_arch(), &tcfg, device, &report::ImageBar::new(&pb, 64))?;
            pb.finish_and_clear();
            t.save(&teacher_path)?;
        }
    }
    let teacher = Teacher::load(&teacher_path.to_string_lossy(), device)?;
    let mut training = vec![Training {
        model: "teacher".into(),
        steps: cfg.teacher_budget(),
        init: if cfg.teacher_steps.is_some() {
            "scratch"
        } else {
            "shipped"
        }
        .into(),
        total_steps: cfg.teacher_budget(),
        seconds: clock.elapsed().as_secs_f64(),
        recommended: false,
    }];
    let mut checkpoints = vec!["teacher.safetensors".to_string()];
    let mut maps = Vec::new();
    let recommended = registry::recommended(DataKind::of(&data.state_shape(), true));
    let runs = (cfg.recommended_steps > 0)
        .then_some((recommended.method, true))
        .into_iter()
        .chain(cfg.methods.iter().map(|&m| (m, false)));
    for (method, is_recommended) in runs {
        let scratch = cfg.data_only_from_scratch && !method.needs_teacher();
        let steps = if is_recommended {
            cfg.recommended_steps
        } else if scratch {
            cfg.map_steps + cfg.teacher_budget()
        } else {
            cfg.map_steps
        };
        let train = if is_recommended {
            TrainConfig {
                steps,
                seed: cfg.seed,
                ..recommended.train.clone()
            }
        } else {
            TrainConfig {
                steps,
                batch_size: cfg.batch_size,
                lr: if scratch { 2e-3 } else { cfg.lr },
                warmup_steps: (steps / 20).max(1),
                ema_decay: if scratch { 0.999 } else { 0.99 },
                seed: cfg.seed,
                ..TrainConfig::default()
            }
        };
        let base = MapJob::new(method, &data);
        let objective = DistillConfig::for_data(method, &data.state_shape(), true);
        let job = if method.needs_teacher() {
            MapJob {
                teacher: Some(&teacher),
                objective,
                train,
                device: device.clone(),
                ..base
            }
        } else {
            MapJob {
                init: (!scratch).then_some(&teacher),
                arch: teacher_arch(),
                objective,
                train,
                device: device.clone(),
                ..base
            }
        };
        let job = MapJob {
            recipe: is_recommended.then_some(recommended.why),
            ..job
        };
        let pb = progress_bar(steps as u64, method.name(), show);
        let clock = Instant::now();
        let m = job.run(&report::ImageBar::new(&pb, job.train.batch_size))?;
        pb.finish_and_clear();
        training.push(Training {
            model: method.name().into(),
            steps,
            init: if scratch { "scratch" } else { "teacher" }.into(),
            total_steps: if scratch { steps } else { steps + cfg.teacher_budget() },
            seconds: clock.elapsed().as_secs_f64(),
            recommended: is_recommended,
        });
        let name = format!("{}.safetensors", method.name());
        m.save(&out.file(&name))?;
        checkpoints.push(name);
        maps.push((method, m));
    }
    let clf = Classifier::embedded_mnist(device)?;
    let ev = ImageEval::new(&clf, &data, cfg.n_eval, cfg.seed, device)?;
    let classes = Some(10);
    let mut rows = vec![ev.floor(&data, device)?];
    let mut figures = Vec::new();
    let solvers = pipeline::euler_and_dopri5(&cfg.nfes, cfg.dopri5_tol);
    let (r, samples) = ev.teacher("teacher", &teacher, classes, &solvers, device)?;
    for (row, x) in r.iter().zip(&samples) {
        figures.push(write_grid(
            &out,
            &format!("teacher-{}", row.sampler.replace('×', "x").replace(['(', ')', '='], "")),
            x,
        )?);
    }
    rows.extend(r);
    for (method, m) in &maps {
        let sampler = if method.boundary_only() {
            Sampler::Consistency
        } else {
            Sampler::Deterministic
        };
        let path = m.meta.probability_path()?;
        let (r, samples) = ev.map(method.name(), &m.net, classes, &cfg.nfes, sampler, &*path, device)?;
        for (row, x) in r.iter().zip(&samples) {
            figures.push(write_grid(&out, &format!("{}-nfe{}", method.name(), row.nfe), x)?);
        }
        rows.extend(r);
    }
    let report = MnistReport {
        config: cfg.clone(),
        training,
        rows,
        checkpoints,
        seconds: start.elapsed().as_secs_f64(),
    };
    write_report(&out, &report, &clf, &figures)?;
    fd_plot(&out, &report)?;
    Ok(report)
}

/// The image issue's acceptance checks, each with its numbers.
fn acceptance(r: &MnistReport) -> String {
    let maps: Vec<&ImageRow> = r.rows.iter().filter(|x| x.model != "teacher" && x.nfe > 0).collect();
    let teacher = |f: &dyn Fn(&ImageRow) -> bool| r.rows.iter().find(|x| x.model == "teacher" && f(x));
    let dopri5 = teacher(&|x| x.sampler.starts_with("dopri5"));
    let euler8 = teacher(&|x| x.sampler == "euler×8");
    let best = |nfe: usize| {
        maps.iter()
            .filter(|x| x.nfe == nfe)
            .min_by(|a, b| a.metrics.fd.total_cmp(&b.metrics.fd))
            .copied()
    };
    let verdict = |ok: bool| if ok { "**met**" } else { "**missed**" };
    let mut md = String::from("## Acceptance\n\n");
    if let (Some(b), Some(e)) = (best(1), euler8) {
        md += &format!(
            "- FD of the best 1-NFE map ({}: {:.2}) below the teacher's Euler-8 FD ({:.2}): {} ({:.2}×).\n",
            b.model,
            b.metrics.fd,
            e.metrics.fd,
            verdict(b.metrics.fd < e.metrics.fd),
            b.metrics.fd / e.metrics.fd
        );
    }
    // The best `nfe`-step map within `factor` of the teacher's dopri5 FD (one step only in the demo).
    let within_dopri5 = |nfe: usize, factor: f64| match (best(nfe), dopri5) {
        (Some(b), Some(d)) => {
            let ratio = b.metrics.fd / d.metrics.fd;
            format!(
                "- The best {nfe}-NFE map ({}: {:.2}) within {factor}× of the teacher's dopri5 FD ({:.2}, {} NFE): {} ({ratio:.2}×).\n",
                b.model,
                b.metrics.fd,
                d.metrics.fd,
                d.nfe,
                verdict(ratio <= factor)
            )
        }
        _ => String::new(),
    };
    md += &within_dopri5(2, 1.5);
    if !r.config.bench {
        md += &within_dopri5(1, 2.0);
    }
    if let Some(d) = dopri5.and_then(|d| d.metrics.accuracy) {
        let off: Vec<String> = maps
            .iter()
            .filter_map(|x| {
                let a = x.metrics.accuracy?;
                (100.0 * (d - a) > 2.0).then(|| format!("{} at {} NFE ({:.1}%)", x.model, x.nfe, 100.0 * a))
            })
            .collect();
        md += &format!(
            "- Class accuracy of the maps' samples within 2 points of the teacher's dopri5 ({:.1}%): {} ({} of {} rows within){}.\n",
            100.0 * d,
            verdict(off.is_empty()),
            maps.len() - off.len(),
            maps.len(),
            if off.is_empty() {
                String::new()
            } else {
                format!("; below it: {}", off.join(", "))
            }
        );
    }
    let distilled = r
        .training
        .iter()
        .find(|t| t.init == "teacher" && t.model != "meanflow" && !t.recommended);
    if let (Some(mf), Some(d)) = (r.training.iter().find(|t| t.model == "meanflow"), distilled) {
        md += &format!(
            "- MeanFlow from data alone at the budget of teacher plus distillation: {} steps of data \
             ({}) against the teacher's {} plus a distillation's {}.\n",
            mf.total_steps,
            if mf.init == "scratch" {
                "from scratch"
            } else {
                "fine-tuned from the flow-matching teacher"
            },
            r.config.teacher_budget(),
            d.steps
        );
    }
    md + "\n"
}

/// FD against NFE, one curve per model (the teacher's dopri5 and the data floor as levels).
fn fd_plot(out: &OutDir, r: &MnistReport) -> Result<()> {
    let mut series: Vec<crate::plot::Series> = Vec::new();
    let mut levels = Vec::new();
    for row in &r.rows {
        if row.nfe == 0 {
            levels.push(("data floor".to_string(), row.metrics.fd));
            continue;
        }
        if row.sampler.starts_with("dopri5") {
            levels.push((format!("teacher dopri5 ({} NFE)", row.nfe), row.metrics.fd));
            continue;
        }
        let name = if row.model == "teacher" {
            "teacher (Euler)".to_string()
        } else {
            row.model.clone()
        };
        match series.iter_mut().find(|s| s.name == name) {
            Some(s) => s.points.push((row.nfe as f64, row.metrics.fd)),
            None => series.push(crate::plot::Series {
                name,
                points: vec![(row.nfe as f64, row.metrics.fd)],
            }),
        }
    }
    crate::plot::loglog_lines_with_levels(
        &out.file("fd-vs-nfe.png"),
        "MNIST: FD against NFE",
        "NFE",
        "FD",
        &series,
        &levels,
    )
    .map_err(|e| flowmap::Error::arg(e.to_string()))
}

/// A grid of the first 100 samples (ten per class, one row per class); returns its file name.
pub(crate) fn write_grid(out: &OutDir, stem: &str, x: &candle_core::Tensor) -> Result<String> {
    let stem: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let name = format!("grid-{stem}.png");
    let shown = x.narrow(0, 0, x.dim(0)?.min(100))?;
    grid::write_grid(&out.file(&name), &shown, 10).map_err(|e| flowmap::Error::arg(e.to_string()))?;
    Ok(name)
}

fn write_report(out: &OutDir, r: &MnistReport, clf: &Classifier, figures: &[String]) -> Result<()> {
    let c = &r.config;
    let teacher = match c.teacher_steps {
        None => format!("the shipped teacher, which `{TEACHER_COMMAND}` reproduces"),
        Some(s) => format!("a teacher trained here for {s} steps at batch 64"),
    };
    let data_only = if c.data_only_from_scratch {
        format!(
            "the data-only ones trained from scratch for the teacher's steps and a distillation's together ({})",
            c.teacher_budget() + c.map_steps
        )
    } else {
        "the data-only ones fine-tuned from the teacher on data".to_string()
    };
    let title = if c.bench {
        "flowmap bench mnist"
    } else {
        "flowmap demo: MNIST"
    };
    let mut md = format!(
        "# {title}\n\nA class-conditional U-Net teacher ({teacher}) and flow maps {} trained for {} steps at batch {} \
         (the teacher-based ones distilled from the teacher, {data_only}).\n\n\
         Metrics on {} samples per row (classes `i mod 10`) against {} held-out digits, in the features of the \
         shipped MNIST classifier (held-out accuracy {:.2}%). FD is a Fréchet distance in those features (not \
         an Inception FID); the first row is the data's own floor.\n\n",
        c.methods.iter().map(|m| m.name()).collect::<Vec<_>>().join(", "),
        c.map_steps,
        c.batch_size,
        c.n_eval,
        c.n_eval,
        100.0 * clf.meta.heldout_accuracy
    );
    if let Some(t) = r.training.iter().find(|t| t.recommended) {
        let rec = registry::recommended(DataKind::of(&[1, 28, 28], true)).train;
        md += &format!(
            "`{}` is the recommended one-step recipe for images (`flowmap distill` without `--method`), trained with \
             its own settings (batch {}, learning rate {}, EMA decay {}) for {} steps.\n\n",
            t.model, rec.batch_size, rec.lr, rec.ema_decay, t.steps
        );
    }
    md += "| model | started from | steps | steps of data behind it | training seconds |\n|---|---|---:|---:|---:|\n";
    for t in &r.training {
        md += &format!(
            "| {} | {} | {} | {} | {:.0} |\n",
            t.model, t.init, t.steps, t.total_steps, t.seconds
        );
    }
    md += "\n";
    md += &acceptance(r);
    md += &report::image_table(&r.rows);
    md += &format!("\nTotal time: {:.0} s.\n\nCheckpoints: {}.\n\n![FD against NFE](fd-vs-nfe.png)\n\n## Samples (one row per class)\n\n", r.seconds, r.checkpoints.join(", "));
    for f in figures {
        md += &format!(
            "**{}**\n\n![{f}]({f})\n\n",
            f.trim_start_matches("grid-").trim_end_matches(".png")
        );
    }
    io::write_text(&out.file("report.md"), &md)?;
    io::write_text(
        &out.file("report.json"),
        &serde_json::to_string_pretty(r).expect("report serialises"),
    )?;
    Ok(())
}
