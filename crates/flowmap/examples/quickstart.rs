//! The README's library example: train a teacher, distil an EMD flow map, sample it in two steps.
//! `cargo run --release --example quickstart` (a few minutes on two cores).

use candle_core::Device;
use flowmap::backbone::{Arch, MlpConfig};
use flowmap::data::{DataSource, Toy};
use flowmap::objective::Method;
use flowmap::pipeline::{self, MapJob};
use flowmap::sample::{self, TimeGrid};
use flowmap::train::{Silent, TrainConfig};
use flowmap::Cond;

fn main() -> flowmap::Result<()> {
    let dev = Device::Cpu;
    let data = DataSource::Toy(Toy::Checkerboard);
    let cfg = TrainConfig {
        steps: 4000,
        ..TrainConfig::default()
    };
    let arch = Arch::Mlp(MlpConfig::new(2));
    // Progress goes to any `Progress`: a closure `|step, loss| …`, or `Silent`.
    let teacher = pipeline::train_teacher(&data, &arch, &cfg, &dev, &Silent)?.into_teacher();
    let job = MapJob {
        teacher: Some(&teacher),
        train: cfg.clone(),
        ..MapJob::new(Method::Emd, &data)
    };
    let map = job.run(&|step: usize, loss: Option<f64>| {
        if let Some(l) = loss.filter(|_| step % 1000 == 0) {
            eprintln!("emd step {step}: loss {l:.4}");
        }
    })?;
    let z = sample::noise(10_000, &[2], 0, &dev)?;
    let two_step = sample::sample_map(&map.net, &z, &TimeGrid::uniform(2)?, &Cond::none())?;
    assert_eq!(two_step.nfe, 2);
    map.save(std::path::Path::new("emd.safetensors"))
}
