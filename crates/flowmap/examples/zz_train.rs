#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use flowmap::teacher::{VelocityField, VelocityNet};
use flowmap::train::{fit, TrainConfig, Trainable};
fn run() -> f64 {
    let dev = Device::Cpu;
    let w: usize = std::env::var("W").ok().and_then(|s| s.parse().ok()).unwrap_or(256);
    let b: usize = std::env::var("B").ok().and_then(|s| s.parse().ok()).unwrap_or(4096);
    let steps: usize = std::env::var("N").ok().and_then(|s| s.parse().ok()).unwrap_or(100);
    let cfg = flowmap::nn::MlpConfig {
        hidden: w,
        ..flowmap::nn::MlpConfig::new(2)
    };
    let (live, ema) = (VarMap::new(), VarMap::new());
    let net = VelocityNet::new(&cfg, VarBuilder::from_varmap(&live, DType::F32, &dev)).unwrap();
    let en = VelocityNet::new(&cfg, VarBuilder::from_varmap(&ema, DType::F32, &dev)).unwrap();
    flowmap::pipeline::seed_params(&live, 0).unwrap();
    let tr = Trainable::<dyn VelocityField> {
        params: &live,
        model: &net,
        ema: Some((&ema, &en)),
        ema_target: false,
    };
    let data = flowmap::data::DataSource::Toy(flowmap::data::Toy::Checkerboard);
    let pb = flowmap::pipeline::progress_bar(0, "", false);
    let tc = TrainConfig {
        steps,
        batch_size: b,
        ..TrainConfig::default()
    };
    let obj = flowmap::objective::FlowMatching::new();
    fit(&obj, &tr, &data, &TrainConfig { steps: 5, ..tc.clone() }, &dev, &pb).unwrap();
    let log = fit(&obj, &tr, &data, &tc, &dev, &pb).unwrap();
    log.steps as f64 / log.seconds
}
fn main() {
    let r = if std::env::var("INSTALL").is_ok() {
        rayon::ThreadPoolBuilder::new().build().unwrap().install(run)
    } else {
        run()
    };
    println!(
        "{} B {}: {r:.1} steps/s",
        if std::env::var("INSTALL").is_ok() {
            "install"
        } else {
            "plain"
        },
        std::env::var("B").unwrap_or("4096".into())
    );
}
