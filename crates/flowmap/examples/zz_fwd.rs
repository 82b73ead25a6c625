#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use flowmap::flow_map::{FlowMap, FlowMapNet};
use std::time::Instant;
fn main() -> flowmap::Result<()> {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let w: usize = std::env::var("W").ok().and_then(|s| s.parse().ok()).unwrap_or(256);
    let b: usize = std::env::var("B").ok().and_then(|s| s.parse().ok()).unwrap_or(4096);
    let cfg = flowmap::nn::MlpConfig {
        hidden: w,
        ..flowmap::nn::MlpConfig::new(2)
    };
    let net = FlowMapNet::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    flowmap::pipeline::seed_params(&vm, 0)?;
    let x = flowmap::sample::noise(b, 2, 0, &dev)?;
    let t = candle_core::Tensor::ones((b, 1), DType::F32, &dev)?;
    let s = t.zeros_like()?;
    let n = 200;
    for _ in 0..10 {
        net.map(&x, &t, &s)?;
    }
    let t0 = Instant::now();
    for _ in 0..n {
        net.map(&x, &t, &s)?;
    }
    println!(
        "W {w} B {b}: {:.3} ms per pass",
        t0.elapsed().as_secs_f64() / n as f64 * 1e3
    );
    Ok(())
}
