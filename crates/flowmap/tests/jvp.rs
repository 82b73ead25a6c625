//! Forward-mode JVPs of every layer and of the whole flow-map network against central finite
//! differences in f64 (relative error ≤ 1e-6).

mod common;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use flowmap::backbone::mlp::seed_params;
use flowmap::backbone::MlpConfig;
use flowmap::flow_map::FiniteDifference;
use flowmap::flow_map::FlowMapNet;
use flowmap::kernels::Activation;
use flowmap::layers::{Dense, SinusoidalEmbedding};
use flowmap::layers::{Jvp, Silu};
use flowmap::Rng;

const H: f64 = 1e-5;

fn randn(shape: (usize, usize), seed: u64) -> Tensor {
    Rng::new(seed).normal_tensor(shape, DType::F64, &Device::Cpu).unwrap()
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let num = (a - b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt();
    let den = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt();
    num / den.max(1e-300)
}

/// Central difference of `f` at `x` along `dx`.
fn fd(f: impl Fn(&Tensor) -> Tensor, x: &Tensor, dx: &Tensor) -> Tensor {
    let plus = f(&(x + (dx * H).unwrap()).unwrap());
    let minus = f(&(x - (dx * H).unwrap()).unwrap());
    ((plus - minus).unwrap() / (2.0 * H)).unwrap()
}

fn check_layer(name: &str, layer: &(impl Jvp + ?Sized), forward: impl Fn(&Tensor) -> Tensor, x: &Tensor, dx: &Tensor) {
    let (y, dy) = layer.forward_jvp(x, dx).unwrap();
    assert!(
        rel_err(&y, &forward(x)) < 1e-14,
        "{name}: primal output differs from the forward pass"
    );
    let e = rel_err(&dy, &fd(&forward, x, dx));
    assert!(e < 1e-6, "{name}: JVP relative error {e:e}");
}

#[test]
fn each_layer_matches_finite_differences() {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
    let lin = Dense::new(7, 5, Activation::Identity, vb.pp("lin")).unwrap();
    let dense_silu = Dense::new(7, 5, Activation::Silu, vb.pp("dense")).unwrap();
    seed_params(&vm, 1).unwrap();
    let (x, dx) = (randn((16, 7), 2), randn((16, 7), 3));
    check_layer("linear", &lin, |z| lin.forward(z).unwrap(), &x, &dx);
    check_layer("dense + silu", &dense_silu, |z| dense_silu.forward(z).unwrap(), &x, &dx);
    check_layer("silu", &Silu, |z| z.silu().unwrap(), &x, &dx);
    let emb = SinusoidalEmbedding::new(8, 4.0, &vb).unwrap();
    let (t, dt) = (randn((16, 1), 4), randn((16, 1), 5));
    check_layer("sinusoidal embedding", &emb, |z| emb.forward(z).unwrap(), &t, &dt);
}

#[test]
fn flow_map_network_matches_finite_differences_in_every_direction() {
    let vm = VarMap::new();
    let cfg = MlpConfig {
        hidden: 32,
        depth: 3,
        ..MlpConfig::new(3)
    };
    let net = FlowMapNet::new(&cfg, VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu)).unwrap();
    seed_params(&vm, 7).unwrap();
    let n = 32;
    let x = randn((n, 3), 8);
    let u = common::uniform(0.0, 1.0, (n, 1), 101, DType::F64);
    let w = common::uniform(0.0, 1.0, (n, 1), 102, DType::F64);
    let (t, s) = (u.maximum(&w).unwrap(), u.minimum(&w).unwrap());
    let fd_map = FiniteDifference { map: &net, h: H };
    let zero_x = x.zeros_like().unwrap();
    let zero_t = t.zeros_like().unwrap();
    let one_t = t.ones_like().unwrap();
    let directions = [
        ("x", randn((n, 3), 9), zero_t.clone(), zero_t.clone()),
        ("t", zero_x.clone(), one_t.clone(), zero_t.clone()),
        ("s", zero_x.clone(), zero_t.clone(), one_t.clone()),
        ("(v, 1, 0)", randn((n, 3), 10), one_t.clone(), zero_t.clone()),
        ("mixed", randn((n, 3), 11), randn((n, 1), 12), randn((n, 1), 13)),
    ];
    for (name, dx, dt, ds) in directions {
        let (f, df) = common::jvp_at(&net, (&x, &t, &s), (&dx, &dt, &ds));
        let (f_ref, df_ref) = common::jvp_at(&fd_map, (&x, &t, &s), (&dx, &dt, &ds));
        assert!(rel_err(&f, &f_ref) < 1e-14, "{name}: primal differs");
        let e = rel_err(&df, &df_ref);
        assert!(e < 1e-6, "direction {name}: JVP relative error {e:e}");
    }
}
