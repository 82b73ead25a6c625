//! The U-Net backbone: shapes, its zero-initialised start, exact tangents of every layer against f64
//! central differences, gradients to every parameter, seeding a flow map from a teacher, bad input.

mod common;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::max_abs;
use flowmap::backbone::unet::{Attention, Conv2d, GroupNorm};
use flowmap::backbone::{vars_sorted, Arch, Backbone, Role, UnetConfig};
use flowmap::cond::Cond;
use flowmap::flow_map::{FlowMap, FlowMapNet};
use flowmap::layers::Jvp;
use flowmap::teacher::{VelocityField, VelocityNet};
use flowmap::Rng;

/// A small class-conditional U-Net on 1 × 8 × 8 images: three levels (8 → 4 → 2), attention at 2 and 4,
/// two heads.
fn tiny() -> UnetConfig {
    UnetConfig {
        channels: 8,
        channel_mult: vec![1, 2, 2],
        attention_resolutions: vec![2, 4],
        heads: 2,
        groups: 4,
        time_features: 4,
        num_classes: Some(3),
        ..UnetConfig::new(&[1, 8, 8])
    }
}

fn build(cfg: &UnetConfig, role: Role, dtype: DType) -> (std::sync::Arc<dyn Backbone>, VarMap) {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, dtype, &Device::Cpu);
    let net = Arch::Unet(cfg.clone()).build(role, vb).unwrap();
    Arch::Unet(cfg.clone()).seed_params(&vm, 7).unwrap();
    (net, vm)
}

/// Overwrites every parameter (the zero-initialised ones too) with `N(0, 0.3²)` draws, so that no path
/// through the network is switched off.
fn randomise(vm: &VarMap, seed: u64) {
    let mut rng = Rng::new(seed);
    for (_, v) in vars_sorted(vm) {
        let t = (rng.normal_tensor(v.shape(), v.dtype(), v.device()).unwrap() * 0.3).unwrap();
        v.set(&t).unwrap();
    }
}

fn normal(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    Rng::new(seed).normal_tensor(shape, dtype, &Device::Cpu).unwrap()
}

fn col(v: &[f64], dtype: DType) -> Tensor {
    Tensor::from_slice(v, (v.len(), 1), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn labels(l: &[u32]) -> Cond {
    Cond::from_classes(l, 3, &Device::Cpu).unwrap()
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    max_abs(&(a - b).unwrap()) / max_abs(b).max(1e-12)
}

#[test]
fn output_has_the_state_shape_and_starts_at_zero() {
    let cfg = tiny();
    let (net, _) = build(&cfg, Role::FlowMap, DType::F32);
    let x = normal(&[3, 1, 8, 8], 1, DType::F32);
    let t = col(&[0.9, 0.5, 0.2], DType::F32);
    let gap = col(&[0.4, 0.5, 0.1], DType::F32);
    let y = net.forward(&x, &t, Some(&gap), &labels(&[0, 2, 3])).unwrap();
    assert_eq!(y.dims(), x.dims());
    assert_eq!(
        max_abs(&y),
        0.0,
        "the zero-initialised output layer makes the start exactly zero"
    );
}

/// The whole network's tangent (every layer's rule chained) against f64 central differences, along a
/// direction that moves the state, the time and the gap together.
#[test]
fn network_tangent_matches_central_differences() {
    let cfg = tiny();
    let (net, vm) = build(&cfg, Role::FlowMap, DType::F64);
    randomise(&vm, 11);
    let x = normal(&[2, 1, 8, 8], 2, DType::F64);
    let t = col(&[0.8, 0.35], DType::F64);
    let gap = col(&[0.3, 0.2], DType::F64);
    let dx = normal(&[2, 1, 8, 8], 3, DType::F64);
    let dt = col(&[1.0, -0.5], DType::F64);
    let dgap = col(&[0.5, 0.25], DType::F64);
    let c = labels(&[1, 3]);
    let (y, dy) = net
        .forward_jvp((&x, &t, Some(&gap), &c), (&dx, &dt, Some(&dgap)))
        .unwrap();
    let at = |e: f64| {
        let xe = (&x + (&dx * e).unwrap()).unwrap();
        let te = (&t + (&dt * e).unwrap()).unwrap();
        let ge = (&gap + (&dgap * e).unwrap()).unwrap();
        net.forward(&xe, &te, Some(&ge), &c).unwrap()
    };
    // Fourth-order central differences: with the time embedding's highest frequency (200) the second-order
    // formula's truncation error is ~1e-6 at any step f64 resolves; this one's is ~1e-10 (it falls as h⁴).
    let h = 2e-5;
    let fd = ((((at(h) - at(-h)).unwrap() * 8.0).unwrap() - (at(2.0 * h) - at(-2.0 * h)).unwrap()).unwrap()
        / (12.0 * h))
        .unwrap();
    assert!(rel_err(&y, &at(0.0)) < 1e-12, "the JVP's primal is the forward pass");
    let e = rel_err(&dy, &fd);
    assert!(e < 1e-6, "relative tangent error {e:e}");
}

/// Each layer's own rule, in f64, with random parameters.
#[test]
fn layer_tangents_match_central_differences() {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
    let conv = Conv2d::new(4, 6, 3, vb.pp("conv")).unwrap();
    let norm = GroupNorm::new(2, 4, vb.pp("norm")).unwrap();
    let attn = Attention::new(4, 2, 2, vb.pp("attn")).unwrap();
    randomise(&vm, 5);
    let x = normal(&[2, 4, 5, 3], 8, DType::F64);
    let dx = normal(&[2, 4, 5, 3], 9, DType::F64);
    let h = 1e-5;
    let check = |name: &str, f: &dyn Fn(&Tensor) -> Tensor, (y, dy): (Tensor, Tensor)| {
        let fd = ((f(&(&x + (&dx * h).unwrap()).unwrap()) - f(&(&x - (&dx * h).unwrap()).unwrap())).unwrap()
            / (2.0 * h))
            .unwrap();
        assert!(rel_err(&y, &f(&x)) < 1e-12, "{name}: primal");
        let e = rel_err(&dy, &fd);
        assert!(e < 1e-6, "{name}: relative tangent error {e:e}");
    };
    check(
        "conv",
        &|x| conv.forward(x).unwrap(),
        conv.forward_jvp(&x, &dx).unwrap(),
    );
    check(
        "group norm",
        &|x| norm.forward(x).unwrap(),
        norm.forward_jvp(&x, &dx).unwrap(),
    );
    check(
        "attention",
        &|x| attn.forward(x).unwrap(),
        attn.forward_jvp(&x, &dx).unwrap(),
    );
}

/// After a random perturbation of every parameter, each one gets a non-zero gradient: no layer is cut off
/// from the loss (candle's fused norms and softmax would silently be).
#[test]
fn gradients_reach_every_parameter() {
    let cfg = tiny();
    let (net, vm) = build(&cfg, Role::FlowMap, DType::F32);
    randomise(&vm, 13);
    let x = normal(&[3, 1, 8, 8], 4, DType::F32);
    let t = col(&[0.9, 0.5, 0.2], DType::F32);
    let gap = col(&[0.4, 0.5, 0.1], DType::F32);
    let y = net.forward(&x, &t, Some(&gap), &labels(&[0, 1, 2])).unwrap();
    let probe = normal(&[3, 1, 8, 8], 5, DType::F32);
    let grads = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    let mut names = Vec::new();
    for (name, v) in vars_sorted(&vm) {
        let g = grads.get(&v).unwrap_or_else(|| panic!("no gradient for {name}"));
        if name == "class_embedding.weight" {
            // Only the rows of the labels used (0, 1, 2) get a gradient; row 3 (null) must not.
            let rows = g.abs().unwrap().sum(1).unwrap().to_vec1::<f32>().unwrap();
            assert!(rows[..3].iter().all(|&r| r > 0.0) && rows[3] == 0.0, "{rows:?}");
        } else {
            assert!(max_abs(g) > 0.0, "zero gradient for {name}");
        }
        names.push(name);
    }
    assert!(names.iter().any(|n| n.contains("attn.qkv")) && names.iter().any(|n| n.starts_with("mid.")));
}

/// A flow map seeded from a teacher computes one Euler step of it: `f(x, t, s) = x + (s − t)·v(x, t)`.
#[test]
fn flow_map_seeded_from_teacher_is_one_euler_step() {
    let cfg = tiny();
    let dev = Device::Cpu;
    let tvm = VarMap::new();
    let teacher = VelocityNet::new(
        &Arch::Unet(cfg.clone()),
        VarBuilder::from_varmap(&tvm, DType::F32, &dev),
    )
    .unwrap();
    randomise(&tvm, 17);
    let svm = VarMap::new();
    let student = FlowMapNet::new(Arch::Unet(cfg.clone()), VarBuilder::from_varmap(&svm, DType::F32, &dev)).unwrap();
    Arch::Unet(cfg.clone()).init_from_teacher(&svm, &tvm).unwrap();
    let x = normal(&[4, 1, 8, 8], 6, DType::F32);
    let t = col(&[0.9, 0.6, 0.4, 1.0], DType::F32);
    let s = col(&[0.1, 0.6, 0.0, 0.5], DType::F32);
    let c = labels(&[0, 1, 2, 3]);
    let v = teacher.velocity(&x, &t, &c).unwrap();
    let euler = (&x
        + v.broadcast_mul(&(&s - &t).unwrap().reshape((4, 1, 1, 1)).unwrap())
            .unwrap())
    .unwrap();
    let f = student.map(&x, &t, &s, &c).unwrap();
    assert!(max_abs(&v) > 0.1, "a non-trivial teacher");
    assert!(max_abs(&(f - euler).unwrap()) < 1e-5);
}

#[test]
fn bad_configurations_and_inputs_are_errors() {
    let mut cfg = UnetConfig::new(&[1, 28, 28]);
    cfg.channel_mult = vec![1, 2, 2, 2];
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("28 × 28") && e.contains("2^3"), "{e}");
    let mut cfg = UnetConfig::new(&[1, 28, 28]);
    cfg.attention_resolutions = vec![5];
    assert!(cfg
        .validate()
        .unwrap_err()
        .to_string()
        .contains("attention resolution 5"));
    let mut cfg = UnetConfig::new(&[1, 28, 28]);
    cfg.groups = 5;
    assert!(cfg.validate().unwrap_err().to_string().contains("groups"));
    assert!(UnetConfig::new(&[784])
        .validate()
        .unwrap_err()
        .to_string()
        .contains("C × H × W"));

    let (net, _) = build(&tiny(), Role::Velocity, DType::F32);
    let t = col(&[0.5], DType::F32);
    let wrong = normal(&[1, 1, 16, 16], 1, DType::F32);
    let e = net.forward(&wrong, &t, None, &Cond::none()).unwrap_err().to_string();
    assert!(e.contains("[1, 16, 16]") && e.contains("[1, 8, 8]"), "{e}");
    let x = normal(&[1, 1, 8, 8], 1, DType::F32);
    let e = net.forward(&x, &t, None, &labels(&[3])).map(|_| ());
    assert!(e.is_ok(), "the null class is a valid label");
    let bad = Cond::labels(Tensor::new(&[7u32], &Device::Cpu).unwrap()).unwrap();
    let e = net.forward(&x, &t, None, &bad).unwrap_err().to_string();
    assert!(e.contains("class label 7"), "{e}");
}

/// Training-time dropout is reproducible from its seed and off by default.
#[test]
fn dropout_is_seeded_and_off_unless_asked() {
    let cfg = UnetConfig { dropout: 0.3, ..tiny() };
    let (net, vm) = build(&cfg, Role::Velocity, DType::F32);
    randomise(&vm, 19);
    let x = normal(&[2, 1, 8, 8], 1, DType::F32);
    let t = col(&[0.5, 0.7], DType::F32);
    let run = || net.forward(&x, &t, None, &Cond::none()).unwrap();
    let plain = run();
    net.set_dropout_seed(Some(4));
    let a = run();
    net.set_dropout_seed(Some(4));
    let b = run();
    net.set_dropout_seed(None);
    assert_eq!(max_abs(&(&a - &b).unwrap()), 0.0);
    assert!(max_abs(&(&a - &plain).unwrap()) > 1e-3);
    assert_eq!(max_abs(&(run() - plain).unwrap()), 0.0);
}
