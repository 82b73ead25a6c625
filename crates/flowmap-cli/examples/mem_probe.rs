//! Where a U-Net training step's memory goes: the heap after the forward pass (activations), its peak
//! during the backward pass, and the heap the gradients hold at the end (`cargo run --release --example
//! mem_probe -- [batch] [channels]`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use flowmap::backbone::{Arch, Role, UnetConfig};
use flowmap::Cond;

struct Counting;
static NET: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator; the counters only observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let now = NET.fetch_add(l.size() as isize, Relaxed) + l.size() as isize;
        PEAK.fetch_max(now, Relaxed);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        NET.fetch_sub(l.size() as isize, Relaxed);
        System.dealloc(p, l)
    }
}

#[global_allocator]
static A: Counting = Counting;

fn mb(b: isize) -> f64 {
    b as f64 / (1 << 20) as f64
}

fn main() -> flowmap::Result<()> {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let batch = args.first().copied().unwrap_or(128);
    let channels = args.get(1).copied().unwrap_or(16);
    let dev = Device::Cpu;
    let arch = Arch::Unet(UnetConfig::mnist(channels));
    let vars = VarMap::new();
    let net = arch.build(Role::Velocity, VarBuilder::from_varmap(&vars, DType::F32, &dev))?;
    arch.seed_params(&vars, 0)?;
    let x = Tensor::randn(0f32, 1.0, (batch, 1, 28, 28), &dev)?;
    let t = Tensor::rand(0f32, 1.0, (batch, 1), &dev)?;
    let cond = Cond::from_classes(&(0..batch as u32).map(|i| i % 10).collect::<Vec<_>>(), 10, &dev)?;
    let target = Tensor::randn(0f32, 1.0, (batch, 1, 28, 28), &dev)?;
    for round in 0..2 {
        let base = NET.load(Relaxed);
        PEAK.store(base, Relaxed);
        let v = net.forward(&x, &t, None, &cond)?;
        let loss = (v - &target)?.sqr()?.mean_all()?;
        let fwd = NET.load(Relaxed) - base;
        let fwd_peak = PEAK.load(Relaxed) - base;
        PEAK.store(NET.load(Relaxed), Relaxed);
        let grads = loss.backward()?;
        let bwd_peak = PEAK.load(Relaxed) - base;
        drop(loss);
        let held = NET.load(Relaxed) - base;
        drop(grads);
        println!(
            "round {round}: forward holds {:.1} MB (peak {:.1}), backward peak {:.1} MB, gradients {:.1} MB",
            mb(fwd),
            mb(fwd_peak),
            mb(bwd_peak),
            mb(held)
        );
    }
    Ok(())
}
