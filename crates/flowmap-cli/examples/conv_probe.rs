//! Times the fused 3×3 convolution, forward and forward + backward, at the shapes of the default U-Net on
//! 28 × 28 digits with `channels` at the first level (16, the demo's, by default): the probe behind the
//! convolution's block sizes (`cargo run --release -p flowmap-cli --example conv_probe -- [batch] [reps] [channels]
//! [threads]`).

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use flowmap::kernels::conv2d;

fn main() -> flowmap::Result<()> {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let batch = args.first().copied().unwrap_or(128);
    let reps = args.get(1).copied().unwrap_or(10);
    let base = args.get(2).copied().unwrap_or(16);
    let threads = args.get(3).copied();
    flowmap::set_compute_threads(threads.unwrap_or(std::thread::available_parallelism().map_or(1, |n| n.get())));
    let dev = Device::Cpu;
    let mut total = (0.0, 0.0);
    for (c, hw) in [(base, 28usize), (2 * base, 14), (2 * base, 7)] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (batch, c, hw, hw), &dev)?)?;
        let w = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (c, c, 3, 3), &dev)? * 0.1)?)?;
        let b = Var::from_tensor(&Tensor::zeros(c, DType::F32, &dev)?)?;
        let g = Tensor::randn(0f32, 1.0, (batch, c, hw, hw), &dev)?;
        let (mut fwd, mut both) = (f64::MAX, f64::MAX);
        for _ in 0..reps {
            let t0 = Instant::now();
            let y = conv2d(&x, &w, &b)?;
            let t1 = Instant::now();
            let grads = (y * &g)?.sum_all()?.backward()?;
            let t2 = Instant::now();
            assert!(grads.get(&w).is_some());
            fwd = fwd.min((t1 - t0).as_secs_f64());
            both = both.min((t2 - t0).as_secs_f64());
        }
        let flops = 2.0 * (batch * c * c * 9 * hw * hw) as f64;
        println!(
            "{c:>3} ch {hw:>2}×{hw:<2}  forward {:7.2} ms ({:5.1} GFLOP/s)  forward+backward {:7.2} ms ({:5.1} GFLOP/s)",
            fwd * 1e3,
            flops / fwd / 1e9,
            both * 1e3,
            3.0 * flops / both / 1e9
        );
        total.0 += fwd;
        total.1 += both;
    }
    println!(
        "total forward {:.2} ms, forward+backward {:.2} ms",
        total.0 * 1e3,
        total.1 * 1e3
    );
    Ok(())
}
