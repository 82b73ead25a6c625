//! MeanFlow's adaptive loss weight is biased in low dimension; the plain squared error is not.
//!
//! Trains MeanFlow from samples of the analytic three-Gaussian mixture and prints the relative flow-map
//! error `E‖f − Φ‖² / E‖Φ − x‖²` against the exact solution operator every quarter of the run.
//!
//! `cargo run --release -p flowmap-cli --example meanflow_bias -- [plain|model-tangent|adaptive|paper] [STEPS]`
//! - `plain`: flowmap's default (`DistillConfig::for_method(Method::Meanflow)`): squared error, uniform pairs;
//! - `model-tangent`: the same with the JVP along the network's own diagonal velocity instead of `x1 − x0`;
//! - `adaptive`: the same with the paper's weight `1/(‖Δ‖² + 1e-3)` (p = 1);
//! - `paper`: the paper's weight, logit-normal(−0.4, 1) times and 75% of the batch on the diagonal.

use candle_core::Device;
use flowmap::backbone::{Arch, MlpConfig};
use flowmap::data::{DataSource, GaussianMixture};
use flowmap::flow_map::FlowMapNet;
use flowmap::objective::{DistillConfig, MeanFlowTangent, Method, TimeDistribution, TimeSampling, Weighting};
use flowmap::pipeline::{self, MapJob};
use flowmap::train::Silent;
use flowmap::train::TrainConfig;

fn main() -> flowmap::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let variant = args.get(1).map(String::as_str).unwrap_or("plain");
    let steps: usize = match args.get(2) {
        Some(s) => s
            .parse()
            .map_err(|_| flowmap::Error::InvalidArgument(format!("STEPS must be an integer, got '{s}'")))?,
        None => 4000,
    };
    let mut dcfg = DistillConfig::for_method(Method::Meanflow);
    let adaptive = Weighting::Adaptive { c: 1e-3, p: 1.0 };
    match variant {
        "plain" => {}
        "model-tangent" => dcfg.continuous.meanflow_tangent = MeanFlowTangent::Model,
        "adaptive" => dcfg.weighting = adaptive,
        "paper" => {
            dcfg.weighting = adaptive;
            dcfg.times = TimeSampling {
                distribution: TimeDistribution::LogitNormal { mean: -0.4, std: 1.0 },
                diagonal_fraction: 0.75,
                grid_fraction: 0.0,
                grid_steps: 8,
            };
        }
        other => {
            return Err(flowmap::Error::InvalidArgument(format!(
                "unknown variant '{other}' (plain, model-tangent, adaptive or paper)"
            )))
        }
    }
    let dev = Device::Cpu;
    let mixture = GaussianMixture::three_widths();
    let data = DataSource::Mixture(mixture.clone());
    let arch = MlpConfig {
        hidden: 128,
        time_features: 8,
        max_frequency: 4.0,
        ..MlpConfig::new(2)
    };
    let cfg = TrainConfig {
        steps,
        batch_size: 512,
        ..TrainConfig::default()
    };
    let mut report = |step: usize, net: &FlowMapNet| -> flowmap::Result<()> {
        let r = pipeline::exact_map_report(net, &mixture, 1000, 0, &dev)?;
        println!(
            "{variant:>8} step {step:>6}: relative flow-map error {:.4}, semigroup error {:.4}",
            r.relative_error_uniform, r.semigroup
        );
        Ok(())
    };
    let job = MapJob {
        objective: dcfg,
        train: cfg,
        arch: Arch::Mlp(arch),
        device: dev.clone(),
        ..MapJob::new(Method::Meanflow, &data)
    };
    job.run_monitored(&Silent, steps.div_ceil(4), &mut report)?;
    Ok(())
}
