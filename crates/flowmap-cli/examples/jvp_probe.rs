//! Times a class-conditional U-Net flow map's forward pass and its exact JVP along `(v, 1, 0)` at one
//! batch, the `unet-jvp` row of `flowmap bench speed` (`cargo run --release -p flowmap-cli --example jvp_probe --
//! [channels] [batch] [seconds]`): a loop to run under `perf record` when the tangent path is tuned.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use flowmap::backbone::{Arch, UnetConfig};
use flowmap::flow_map::{FlowMap, FlowMapNet, Point, Tangent};
use flowmap::sample::noise;
use flowmap::Cond;

fn main() -> flowmap::Result<()> {
    let args: Vec<f64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let channels = args.first().map_or(16, |&c| c as usize);
    let batch = args.get(1).map_or(128, |&b| b as usize);
    let seconds = args.get(2).copied().unwrap_or(5.0);
    flowmap::set_compute_threads(std::thread::available_parallelism().map_or(1, |n| n.get()));
    let dev = Device::Cpu;
    let arch = Arch::Unet(UnetConfig::mnist(channels));
    let vars = VarMap::new();
    let map = FlowMapNet::new(&arch, VarBuilder::from_varmap(&vars, DType::F32, &dev))?;
    arch.seed_params(&vars, 0)?;
    let x = noise(batch, &[1, 28, 28], 0, &dev)?;
    let v = noise(batch, &[1, 28, 28], 1, &dev)?;
    let labels: Vec<u32> = (0..batch).map(|i| (i % 10) as u32).collect();
    let cond = Cond::from_classes(&labels, 10, &dev)?;
    let t = Tensor::full(0.7f32, (batch, 1), &dev)?;
    let s = Tensor::full(0.2f32, (batch, 1), &dev)?;
    let at = Point {
        x: &x,
        t: &t,
        s: &s,
        cond: &cond,
    };
    let along = Tangent::along_start(&v, &at)?;
    let tangent = map.as_tangent().expect("the U-Net has a tangent rule");
    let time = |f: &dyn Fn() -> flowmap::Result<()>| -> flowmap::Result<f64> {
        let (start, mut best) = (Instant::now(), f64::MAX);
        while start.elapsed().as_secs_f64() < seconds / 2.0 {
            let t0 = Instant::now();
            f()?;
            best = best.min(t0.elapsed().as_secs_f64());
        }
        Ok(best)
    };
    let forward = time(&|| flowmap::no_grad(|| map.average_velocity(&x, &t, &s, &cond)).map(|_| ()))?;
    let jvp = time(&|| tangent.average_velocity_jvp(&at, &along).map(|_| ()))?;
    println!(
        "{channels} channels, batch {batch}: forward {:.1} ms, JVP {:.1} ms = {:.2}× forward",
        forward * 1e3,
        jvp * 1e3,
        jvp / forward
    );
    Ok(())
}
