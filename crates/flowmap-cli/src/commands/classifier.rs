//! `flowmap classifier`: train the image classifier whose features the image metrics use.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::common::{check_output, data_help, open_data};
use super::Ctx;
use crate::report::{progress_bar, Bar};

#[derive(Args)]
pub struct ClassifierArgs {
    /// Labelled images (e.g. mnist, the embedded digits).
    #[arg(long, long_help = data_help("Labelled images"))]
    pub data: String,
    /// Labels of an .npy image array: a 1-D .npy of N integers (class-conditional training).
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// Output classifier (.safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Optimisation steps.
    #[arg(long, default_value_t = 1000)]
    pub steps: usize,
    /// Batch size.
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Peak learning rate (AdamW, cosine decay).
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(a: ClassifierArgs, cx: &Ctx) -> Result<()> {
    let (device, show) = (&cx.device, cx.show);
    check_output(&a.out, "safetensors")?;
    let data = open_data(&a.data, &a.labels)?;
    let cfg = flowmap::classifier::ClassifierTraining {
        steps: a.steps,
        batch_size: a.batch,
        lr: a.lr,
        seed: a.seed,
    };
    let pb = progress_bar(cfg.steps as u64, "classifier", show);
    let start = std::time::Instant::now();
    let (clf, vars) = flowmap::classifier::train(&data, &cfg, device, &Bar(&pb))?;
    pb.finish_and_clear();
    flowmap::classifier::save(&a.out, &clf, &vars)?;
    eprintln!(
        "classifier: {} steps in {:.1}s, held-out accuracy {:.2}%; wrote {}",
        cfg.steps,
        start.elapsed().as_secs_f64(),
        100.0 * clf.meta.heldout_accuracy,
        a.out.display()
    );
    Ok(())
}
