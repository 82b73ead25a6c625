//! `flowmap train`: train a flow map from data alone (MeanFlow, Lagrangian self-distillation, shortcut).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use flowmap::objective::DistillConfig;
use flowmap::pipeline::MapJob;

use super::common::{methods_help, run_settings, train_method, DataFlags, TrainFlags};
use super::distill::run_map;
use super::map_flags::MapFlags;
use super::Ctx;

#[derive(Args)]
pub struct TrainArgs {
    /// The teacher-free objective (`--help` lists them).
    #[arg(long, long_help = methods_help(false))]
    pub method: String,
    #[command(flatten)]
    pub data: DataFlags,
    /// Output checkpoint (.safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Train classifier-free guidance in from labelled data: LO,HI (or one value W). Each row draws ω from
    /// the range; its target velocity is ω·(x1 − x0) + (1 − ω)·(the map's own unconditional velocity), and
    /// the map takes ω as an input (`sample --guidance w`, one NFE per step).
    #[arg(long, allow_hyphen_values = true)]
    pub guidance_range: Option<String>,
    #[command(flatten)]
    pub train: TrainFlags,
    #[command(flatten)]
    pub map: MapFlags,
}

pub fn run(a: TrainArgs, cx: &Ctx) -> Result<()> {
    let device = &cx.device;
    let method = train_method(&a.method)?;
    let (file, cfg) = run_settings(&a.out, &a.train, a.guidance_range.as_deref())?;
    let data = a.data.open()?;
    let base = DistillConfig::for_data(method, &data.state_shape(), data.num_classes().is_some());
    let dcfg = a.map.objective(file.distill_config_over(base)?, method)?;
    let job = MapJob {
        objective: dcfg,
        train: cfg,
        arch: a.map.arch(&data.state_shape(), data.num_classes(), &file)?,
        device: device.clone(),
        ..MapJob::new(method, &data)
    };
    run_map(job, &a.out, &a.train, cx)
}
