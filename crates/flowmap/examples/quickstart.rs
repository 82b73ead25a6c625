//! The README's library example: train a teacher, distil an EMD flow map, sample it in two steps.
//! `cargo run --release --example quickstart` (a few minutes on two cores).

use candle_core::Device;
use flowmap::data::{DataSource, Toy};
use flowmap::nn::MlpConfig;
use flowmap::objective::{DistillConfig, Method};
use flowmap::pipeline::{self, progress_bar};
use flowmap::sample::{self, TimeGrid};
use flowmap::train::TrainConfig;

fn main() -> flowmap::Result<()> {
    let dev = Device::Cpu;
    let data = DataSource::Toy(Toy::Checkerboard);
    let cfg = TrainConfig {
        steps: 4000,
        ..TrainConfig::default()
    };
    let pb = progress_bar(4000, "teacher", true);
    let teacher = pipeline::train_teacher(&data, &MlpConfig::new(2), &cfg, &dev, &pb)?.into_teacher();
    let pb = progress_bar(4000, "emd", true);
    let map = pipeline::distill(
        &teacher,
        &data,
        Method::Emd,
        &DistillConfig::default(),
        &cfg,
        &MlpConfig::new(2),
        &dev,
        &pb,
        None,
    )?;
    let z = sample::noise(10_000, 2, 0, &dev)?;
    let two_step = sample::sample_map(&map.net, &z, &TimeGrid::uniform(2)?)?;
    assert_eq!(two_step.nfe, 2);
    map.save(std::path::Path::new("emd.safetensors"))
}
