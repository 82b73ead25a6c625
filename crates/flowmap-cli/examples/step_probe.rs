//! Times U-Net teacher training steps (flow matching, AdamW + EMA, labels dropped with probability 0.1) on
//! the embedded digits, the `unet-teacher` row of `flowmap bench speed` without the rest of the bench:
//! the loop to run under `perf` (`cargo run --release -p flowmap-cli --example step_probe -- [channels] [batch] [steps]
//! [threads]`), with the CLI's allocator.

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use flowmap::backbone::{Arch, UnetConfig};
use flowmap::data::DataSource;
use flowmap::objective::FlowMatching;
use flowmap::path::LinearPath;
use flowmap::teacher::{VelocityField, VelocityNet};
use flowmap::train::{fit, Silent, TrainConfig, Trainable};

// The CLI's allocator and its setting (`flowmap-cli/src/alloc.rs`): freed pages stay in the process.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

extern "C" {
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

fn main() -> flowmap::Result<()> {
    // SAFETY: `mi_option_purge_delay` (15) set to -1 (never purge), as the CLI does.
    unsafe { mi_option_set(15, -1) };
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let arg = |i: usize, default: usize| args.get(i).copied().unwrap_or(default);
    let (channels, batch, steps) = (arg(0, 32), arg(1, 128), arg(2, 20));
    let threads = arg(3, std::thread::available_parallelism().map_or(1, |n| n.get()));
    flowmap::set_compute_threads(threads);
    let dev = Device::Cpu;
    let data = DataSource::from_spec("mnist")?;
    let arch = Arch::Unet(UnetConfig::mnist(channels));
    let (vars, ema) = (VarMap::new(), VarMap::new());
    let net = VelocityNet::new(&arch, VarBuilder::from_varmap(&vars, DType::F32, &dev))?;
    let ema_net = VelocityNet::new(&arch, VarBuilder::from_varmap(&ema, DType::F32, &dev))?;
    arch.seed_params(&vars, 0)?;
    let trainable: Trainable<'_, dyn VelocityField> = Trainable {
        params: &vars,
        model: &net,
        ema: Some((&ema, &ema_net as &dyn VelocityField)),
        ema_target: false,
        path: &LinearPath,
        classes: Some(10),
        backbone: Some(net.backbone()),
    };
    let cfg = TrainConfig {
        steps,
        batch_size: batch,
        warmup_steps: 1,
        ..TrainConfig::default()
    };
    // Two steps first, as the bench does: the first touches every buffer the allocator then keeps.
    fit(
        &FlowMatching::new(),
        &trainable,
        &data,
        &TrainConfig {
            steps: 2,
            ..cfg.clone()
        },
        &dev,
        &Silent,
    )?;
    let log = fit(&FlowMatching::new(), &trainable, &data, &cfg, &dev, &Silent)?;
    println!(
        "{channels} channels, batch {batch}, {threads} threads: {:.3} steps/s ({} steps in {:.2} s)",
        log.steps as f64 / log.seconds,
        log.steps,
        log.seconds
    );
    Ok(())
}
