//! `flowmap distill`: distil a flow map from a teacher (a checkpoint, a plain state dict, or `gmm:SPEC.json`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use candle_core::Device;
use clap::Args;
use flowmap::checkpoint::{Foreign, ModelKind};
use flowmap::data::DataSource;
use flowmap::objective::{registry, DataKind, DistillConfig};
use flowmap::pipeline::{MapJob, RunConfig, Teacher};
use flowmap::teacher::VelocityField;

use super::common::{
    budgeted, check_output, data_help, distill_method, methods_help, open_data, read_config, train_settings, TrainFlags,
};
use super::guidance::load_guide;
use super::map_flags::MapFlags;
use super::Ctx;
use crate::report::{self, progress_bar};
use crate::supervise;

#[derive(Args)]
pub struct DistillArgs {
    /// Teacher checkpoint, or `gmm:SPEC.json` for the analytic mixture teacher.
    #[arg(long)]
    pub teacher: String,
    /// The objective that distils the teacher (`--help` lists them); without it, the recommended one-step
    /// recipe for the teacher's kind of data.
    #[arg(long, long_help = methods_help(true))]
    pub method: Option<String>,
    /// Output checkpoint (.safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Data for x_t (default: the teacher's own data).
    #[arg(long, long_help = data_help("Data for x_t (default: the teacher's own data)"))]
    pub data: Option<String>,
    /// Labels of an .npy image array: a 1-D .npy of N integers (class-conditional training).
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// Distil classifier-free guidance into the map: LO,HI (or one value W); each training pair draws w from
    /// the range and the map takes w as an input (`sample --guidance w`, one NFE per step).
    #[arg(long, allow_hyphen_values = true)]
    pub guidance_range: Option<String>,
    /// Autoguidance distilled into the map: with --guidance-range, the teacher is guided by this weaker
    /// model of the same data, v_weak + w·(v − v_weak), instead of by its null class (conditional or
    /// unconditional teachers).
    #[arg(long)]
    pub guide_model: Option<PathBuf>,
    #[command(flatten)]
    pub train: TrainFlags,
    #[command(flatten)]
    pub map: MapFlags,
}

pub fn run(a: DistillArgs, cx: &Ctx) -> Result<()> {
    let device = &cx.device;
    let named = a.method.as_deref().map(distill_method).transpose()?;
    // The teacher (and so the kind of data, which picks a recipe) is read before the training settings,
    // which lie over the recipe's; the output is checked first, before anything slow.
    check_output(&a.out, "safetensors")?;
    if a.data.is_none() && a.labels.is_some() {
        bail!("--labels goes with --data");
    }
    let given = a.data.as_ref().map(|spec| open_data(spec, &a.labels)).transpose()?;
    let file = read_config(&a.train.config)?;
    let teacher = load_teacher(&a.teacher, given.as_ref(), &a.map, &file, device)?;
    if matches!(teacher, Teacher::Net { .. }) && a.map.arch.any() {
        bail!("a network teacher fixes the student's backbone (it starts as the teacher); drop the --arch flags");
    }
    let data = match given {
        Some(d) => d,
        None => teacher.data()?,
    };
    let kind = DataKind::of(&teacher.state_shape(), data.num_classes().is_some());
    let (method, recommendation) = match named {
        Some(m) => (m, None),
        None => {
            let r = registry::recommended(kind);
            (r.method, Some(r))
        }
    };
    if let (Some(r), true) = (&recommendation, cx.writes()) {
        let what = if kind.image { "images" } else { "points" };
        eprintln!(
            "distill: no --method given: the recommended one-step recipe for {what}, {method} ({}; batch {}, learning rate {}, EMA decay {}): {}",
            method.info().summary,
            r.train.batch_size,
            r.train.lr,
            r.train.ema_decay,
            r.why
        );
    }
    let cfg = train_settings(
        &file,
        &a.train,
        a.guidance_range.as_deref(),
        recommendation.as_ref().map(|r| r.train.clone()).unwrap_or_default(),
    )?;
    let recipe = recommendation.map(|r| r.why);
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
        recipe,
        ..MapJob::new(method, &data)
    };
    run_map(job, &a.out, &a.train, cx)
}

/// The teacher of `distill`: `gmm:SPEC.json`, a flowmap checkpoint, or a plain safetensors state dict (a
/// PyTorch model's, say) whose architecture the `--config` file's `[arch]` table gives and whose data
/// `--data` names. The library decides which the file is ([`Teacher::open`]).
fn load_teacher(
    spec: &str,
    data: Option<&DataSource>,
    flags: &MapFlags,
    file: &RunConfig,
    device: &Device,
) -> Result<Teacher> {
    Ok(Teacher::open(spec, device, || {
        let why = "has no flowmap metadata (a state dict saved by another framework?)";
        let (Some(data), Some(_)) = (data, file.arch_kind()?) else {
            return Err(flowmap::Error::arg(format!(
                "{spec} {why}: give its architecture with --config FILE (an [arch] table with its kind, e.g. kind = \"unet\") and its data with --data"
            )));
        };
        let arch = flags
            .arch(&data.state_shape(), data.num_classes(), file)
            .map_err(|e| flowmap::Error::arg(e.to_string()))?;
        Ok(Foreign {
            kind: ModelKind::Teacher,
            arch,
            data: data.name(),
            scale: data.scale(),
        })
    })?)
}

/// Runs a flow-map job (for `--minutes`, planned first) behind a progress bar and saves its map.
pub fn run_map(mut job: MapJob<'_>, out: &Path, flags: &TrainFlags, cx: &Ctx) -> Result<()> {
    job.train = budgeted(flags, job.train.clone(), job.method.name(), cx, |secs| {
        job.plan_budget_on(secs, cx.collective())
    })?;
    let (method, steps) = (job.method, job.train.steps);
    let mut sup = supervise::Supervisor::new(&flags.long, out)?;
    let pb = progress_bar(steps as u64, method.name(), cx.show);
    let bar = report::bar_for(&pb, &job.data.state_shape(), job.train.batch_size);
    let m = sup.run(cx.collective(), |ctl| job.run_controlled(&*bar, ctl))?;
    pb.finish_and_clear();
    if !cx.writes() {
        return Ok(());
    }
    m.save(out)?;
    let (first, last) = m.log.first_last();
    eprintln!(
        "{method}: {steps} steps in {:.1}s, loss {first:.4} → {last:.4}; wrote {}",
        m.log.seconds,
        out.display()
    );
    Ok(())
}
