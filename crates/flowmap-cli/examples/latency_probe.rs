//! Times one image through a class-conditional U-Net flow map at 1 NFE, the `unet-latency-1nfe` row of
//! `flowmap bench speed` (`cargo run --release -p flowmap-cli --example latency_probe -- [channels] [seconds]`): a loop
//! to run under `perf record` when the single-image path is tuned.

use std::time::Instant;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use flowmap::backbone::{Arch, UnetConfig};
use flowmap::flow_map::FlowMapNet;
use flowmap::sample::{noise, sample_map, TimeGrid};
use flowmap::Cond;

fn main() -> flowmap::Result<()> {
    let args: Vec<f64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let channels = args.first().map_or(32, |&c| c as usize);
    let seconds = args.get(1).copied().unwrap_or(5.0);
    flowmap::set_compute_threads(std::thread::available_parallelism().map_or(1, |n| n.get()));
    let dev = Device::Cpu;
    let arch = Arch::Unet(UnetConfig::mnist(channels));
    let vars = VarMap::new();
    let map = FlowMapNet::new(&arch, VarBuilder::from_varmap(&vars, DType::F32, &dev))?;
    arch.seed_params(&vars, 0)?;
    let x = noise(1, &[1, 28, 28], 0, &dev)?;
    let cond = Cond::from_classes(&[3], 10, &dev)?;
    let one = TimeGrid::uniform(1)?;
    let (start, mut n, mut best) = (Instant::now(), 0usize, f64::MAX);
    while start.elapsed().as_secs_f64() < seconds {
        let t0 = Instant::now();
        sample_map(&map, &x, &one, &cond)?;
        best = best.min(t0.elapsed().as_secs_f64());
        n += 1;
    }
    let mean = start.elapsed().as_secs_f64() / n as f64;
    println!(
        "{channels} channels: {n} images, mean {:.3} ms, best {:.3} ms",
        mean * 1e3,
        best * 1e3
    );
    Ok(())
}
