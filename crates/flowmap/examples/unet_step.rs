use candle_core::{DType, Device, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use flowmap::backbone::{Arch, Role, UnetConfig};
use flowmap::cond::Cond;
fn main() -> flowmap::Result<()> {
    let dev = Device::Cpu;
    let b: usize = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(128);
    let ch: usize = std::env::args().nth(2).map(|s| s.parse().unwrap()).unwrap_or(32);
    let mut cfg = UnetConfig::new(&[1, 28, 28]);
    cfg.channels = ch;
    cfg.num_classes = Some(10);
    let arch = Arch::Unet(cfg);
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let net = arch.build(Role::Velocity, vb)?;
    arch.seed_params(&vm, 1)?;
    let n: usize = vm.all_vars().iter().map(|v| v.elem_count()).sum();
    println!("params {n}");
    let mut opt = candle_nn::AdamW::new_lr(vm.all_vars(), 1e-3)?;
    let x = Tensor::randn(0f32, 1., (b, 1, 28, 28), &dev)?;
    let t = Tensor::rand(0f32, 1., (b, 1), &dev)?;
    let labels: Vec<u32> = (0..b as u32).map(|i| i % 10).collect();
    let c = Cond::from_classes(&labels, 10, &dev)?;
    for i in 0..4 {
        let t0 = std::time::Instant::now();
        let y = net.forward(&x, &t, None, &c)?;
        let t1 = t0.elapsed();
        let loss = (y - &x)?.sqr()?.mean_all()?;
        opt.backward_step(&loss)?;
        let t2 = t0.elapsed();
        println!("step {i}: fwd {:.3}s total {:.3}s", t1.as_secs_f64(), t2.as_secs_f64());
    }
    let t0 = std::time::Instant::now();
    let dx = x.ones_like()?;
    let _ = net.forward_jvp((&x, &t, None, &c), (&dx, &t.zeros_like()?, None))?;
    println!("jvp {:.3}s", t0.elapsed().as_secs_f64());
    Ok(())
}
