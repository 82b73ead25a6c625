//! `flowmap train`: train a flow map from data alone (MeanFlow, Lagrangian self-distillation, shortcut).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use flowmap::objective::DistillConfig;
use flowmap::pipeline::MapJob;

use super::common::{TrainFlags, check_output, data_help, methods_help, open_data, parse_guidance_range, read_config, train_config, train_method};
use super::distill::run_map;
use super::map_flags::MapFlags;
use super::Ctx;

#[derive(Args)]
pub struct TrainArgs {
    /// The teacher-free objective (`--help` lists them).
    #[arg(long, long_help = methods_help(false))]
    pub method: String,
    /// The data (`--help` lists the specs).
    #[arg(long, long_help = data_help("The data"))]
    pub data: String,
    /// Labels of an .npy image array: a 1-D .npy of N integers (class-conditional training).
    #[arg(long)]
    pub labels: Option<PathBuf>,
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
    let (device, show) = (&cx.device, cx.show);
    let method = train_method(&a.method)?;
    check_output(&a.out, "safetensors")?;
    let file = read_config(&a.train.config)?;
    let mut cfg = train_config(&a.train, file.train.clone());
    if let Some(r) = &a.guidance_range {
        cfg.guidance_range = Some(parse_guidance_range(r)?);
    }
    cfg.validate()?;
    let data = open_data(&a.data, &a.labels)?;
    let base = DistillConfig::for_data(method, &data.state_shape(), data.num_classes().is_some());
    let dcfg = a.map.objective(file.distill_config_over(base)?, method)?;
    let job = MapJob {
        objective: dcfg,
        train: cfg,
        arch: a.map.arch(&data.state_shape(), data.num_classes(), &file)?,
        device: device.clone(),
        ..MapJob::new(method, &data)
    };
    run_map(&job, &a.out, &a.train.long, show)
}
