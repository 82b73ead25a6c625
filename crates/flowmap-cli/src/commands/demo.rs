//! `flowmap demo [mnist]`: the end-to-end demo on embedded data.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};

use super::Ctx;
use crate::demo::{self, DemoConfig};
use crate::demo_mnist;
use crate::report::{self, eval_table};

#[derive(Args)]
pub struct DemoArgs {
    /// Which demo: the 2-D one (default) or mnist (class-conditional U-Net on the embedded digits).
    #[arg(value_enum, default_value = "2d")]
    pub which: Which,
    /// Output folder (default demo-out, or demo-mnist for mnist).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Train the teacher for this many steps instead of starting from the shipped one (mnist), or the 2-D
    /// teacher's steps.
    #[arg(long)]
    pub teacher_steps: Option<usize>,
    /// Steps of every map (mnist's default: 1,000 for the recommended recipe, 300 for EMD, MeanFlow and LMD).
    #[arg(long)]
    pub distill_steps: Option<usize>,
    #[arg(long)]
    pub gmm_steps: Option<usize>,
    #[arg(long)]
    pub n_eval: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Which demo.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Which {
    /// Checkerboard and a Gaussian mixture: a teacher, EMD and LMD maps, the exact map's error.
    #[value(name = "2d")]
    TwoD,
    /// Class-conditional MNIST digits: the shipped U-Net teacher, the recommended recipe and three maps.
    Mnist,
}

pub fn run(a: DemoArgs, cx: &Ctx) -> Result<()> {
    let (device, show) = (&cx.device, cx.show);
    match a.which {
        Which::TwoD => {}
        Which::Mnist => {
            if a.gmm_steps.is_some() {
                bail!("--gmm-steps applies to the 2-D demo");
            }
            let d = demo_mnist::MnistConfig::demo();
            let cfg = demo_mnist::MnistConfig {
                teacher_steps: a.teacher_steps,
                map_steps: a.distill_steps.unwrap_or(d.map_steps),
                recommended_steps: a.distill_steps.unwrap_or(d.recommended_steps),
                n_eval: a.n_eval.unwrap_or(d.n_eval),
                seed: a.seed,
                ..d
            };
            if cfg.map_steps == 0 || cfg.teacher_steps == Some(0) || cfg.n_eval < 10 {
                bail!("demo budgets must be positive (and --n-eval at least 10)");
            }
            let out = a.out.unwrap_or_else(|| PathBuf::from("demo-mnist"));
            let report = demo_mnist::run(&out, &cfg, device, show)?;
            print!("{}", report::image_table(&report.rows));
            println!("{:.0} s; report: {}", report.seconds, out.join("report.md").display());
            return Ok(());
        }
    }
    let out = a.out.unwrap_or_else(|| PathBuf::from("demo-out"));
    let d = DemoConfig::default();
    let cfg = DemoConfig {
        teacher_steps: a.teacher_steps.unwrap_or(d.teacher_steps),
        distill_steps: a.distill_steps.unwrap_or(d.distill_steps),
        gmm_steps: a.gmm_steps.unwrap_or(d.gmm_steps),
        n_eval: a.n_eval.unwrap_or(d.n_eval),
        seed: a.seed,
        ..d
    };
    if cfg.teacher_steps == 0 || cfg.distill_steps == 0 || cfg.gmm_steps == 0 || cfg.n_eval < 100 {
        bail!("demo budgets must be positive (and --n-eval at least 100)");
    }
    let report = demo::run(&out, &cfg, device, show)?;
    println!("{}", eval_table(&report.rows));
    for (name, ok) in &report.checks {
        println!("[{}] {name}", if *ok { "pass" } else { "FAIL" });
    }
    println!("report: {}", out.join("report.md").display());
    Ok(())
}
