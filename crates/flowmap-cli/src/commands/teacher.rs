//! `flowmap teacher`: train a velocity network by conditional flow matching.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use flowmap::pipeline;

use super::common::{budgeted, run_settings, DataFlags, TrainFlags};
use super::Ctx;
use crate::arch::ArchFlags;
use crate::report::{self, progress_bar};
use crate::supervise;

#[derive(Args)]
pub struct TeacherArgs {
    #[command(flatten)]
    pub data: DataFlags,
    /// Output checkpoint (.safetensors).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub train: TrainFlags,
    /// Backbone settings (an MLP defaults to width 256, depth 3, 16 time frequencies up to 64).
    #[command(flatten)]
    pub arch: ArchFlags,
}

pub fn run(a: TeacherArgs, cx: &Ctx) -> Result<()> {
    let (device, show) = (&cx.device, cx.show);
    let (file, cfg) = run_settings(&a.out, &a.train, None)?;
    let data = a.data.open()?;
    let shape = data.state_shape();
    let arch = a.arch.build(&shape, data.num_classes(), &file, &[])?;
    let cfg = budgeted(&a.train, cfg.clone(), "teacher", cx, |secs| {
        pipeline::plan_teacher_on(secs, &data, &arch, &cfg, device, cx.collective())
    })?;
    let mut sup = supervise::Supervisor::new(&a.train.long, &a.out)?;
    let pb = progress_bar(cfg.steps as u64, "teacher", show);
    let bar = report::bar_for(&pb, &shape, cfg.batch_size);
    let trained = sup.run(cx.collective(), |ctl| {
        pipeline::train_teacher_controlled(&data, &arch, &cfg, device, &*bar, ctl)
    })?;
    pb.finish_and_clear();
    if !cx.writes() {
        return Ok(());
    }
    trained.save(&a.out)?;
    let (first, last) = trained.log.first_last();
    eprintln!(
        "teacher: {} steps in {:.1}s, loss {first:.4} → {last:.4}; wrote {}",
        cfg.steps,
        trained.log.seconds,
        a.out.display()
    );
    Ok(())
}
