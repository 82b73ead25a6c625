//! Probe for issue 41 (bf16): how fast candle's own CPU matrix product is in bf16 against f32 on this
//! machine, at the MLP's and the U-Net's GEMM shapes. Prints one line per shape: GFLOP/s in f32, in bf16,
//! and their ratio. `cargo run --release --example bf16_matmul_probe`.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};

fn gflops(a: &Tensor, b: &Tensor, reps: usize) -> candle_core::Result<f64> {
    let (m, k) = a.dims2()?;
    let n = b.dim(1)?;
    a.matmul(b)?; // warm-up
    let start = Instant::now();
    for _ in 0..reps {
        let c = a.matmul(b)?;
        std::hint::black_box(c);
    }
    Ok(2.0 * (m * k * n * reps) as f64 / start.elapsed().as_secs_f64() / 1e9)
}

fn main() -> candle_core::Result<()> {
    flowmap::set_compute_threads(2);
    let dev = Device::Cpu;
    // (rows, inner, cols): the MLP teacher's hidden layer at batch 4,096; a U-Net 3×3 convolution as a GEMM
    // (batch 128 × 14 × 14 positions, 64 × 9 inputs, 64 outputs); a square product.
    for (m, k, n) in [(4096, 256, 256), (128 * 196, 576, 64), (1024, 1024, 1024)] {
        let a = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let b = Tensor::randn(0f32, 1.0, (k, n), &dev)?;
        let reps = (2e10 / (2.0 * (m * k * n) as f64)).ceil() as usize;
        let f32_rate = gflops(&a, &b, reps)?;
        let (ab, bb) = (a.to_dtype(DType::BF16)?, b.to_dtype(DType::BF16)?);
        let bf16_rate = gflops(&ab, &bb, reps)?;
        println!(
            "{m}×{k} · {k}×{n}: f32 {f32_rate:.1} GFLOP/s, bf16 {bf16_rate:.1} GFLOP/s, bf16/f32 {:.2}",
            bf16_rate / f32_rate
        );
    }
    Ok(())
}
