//! The device harness: networks (values, every parameter's gradient, the exact tangent), training and
//! sampling on the device under test, against the CPU's fast path.
//!
//! `FLOWMAP_TEST_DEVICE=cuda` (or `cuda:N`) tests a GPU, in a build with `--features cuda`
//! (`scripts/gpu-check` runs it). Without it the subject is the CPU with the fast path switched off: candle's
//! own ops, which are what every other device runs, so these cases hold on every machine CI has.

mod common;

use std::sync::{Mutex, MutexGuard};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use flowmap::backbone::{vars_sorted, Arch, MlpConfig};
use flowmap::data::{DataSource, Toy};
use flowmap::flow_map::{FlowMap, FlowMapNet, Point, Tangent, TangentMap};
use flowmap::kernels;
use flowmap::objective::Method;
use flowmap::pipeline::{self, Generation, MapJob, Model};
use flowmap::train::{Silent, TrainConfig};
use flowmap::{Cond, Rng};

use common::rel_to_largest as rel;

/// The fast path's switch is process-wide: the cases of this file run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The device under test.
fn device() -> Device {
    match std::env::var("FLOWMAP_TEST_DEVICE") {
        Ok(spec) if !spec.is_empty() => flowmap::parse_device(&spec).unwrap_or_else(|e| panic!("{e}")),
        _ => Device::Cpu,
    }
}

/// Runs `f` on the device under test: on the CPU, with the fast path off (on again afterwards, even if `f`
/// panics).
fn on_subject<R>(f: impl FnOnce(&Device) -> R) -> R {
    struct FastPathBack;
    impl Drop for FastPathBack {
        fn drop(&mut self) {
            kernels::set_enabled(true);
        }
    }
    let dev = device();
    let _back = FastPathBack;
    if dev.is_cpu() {
        kernels::set_enabled(false);
    }
    f(&dev)
}

/// What one network computes at one point: the output, every parameter's gradient of `⟨y, probe⟩` (in
/// name order), and the exact tangent of the average velocity along `(dx, 1, 0)`.
struct Outputs {
    y: Tensor,
    grads: Vec<(String, Tensor)>,
    tangent: Tensor,
}

/// Builds `arch` on `dev` with the parameters `params` (drawn once, on the host) and evaluates it.
fn evaluate(
    arch: &Arch,
    shape: &[usize],
    classes: Option<usize>,
    params: &[(String, Tensor)],
    dev: &Device,
) -> Outputs {
    let vm = VarMap::new();
    let net = FlowMapNet::new(arch.clone(), VarBuilder::from_varmap(&vm, DType::F32, dev)).unwrap();
    for ((name, v), (pname, p)) in vars_sorted(&vm).into_iter().zip(params) {
        assert_eq!(&name, pname);
        v.set(&p.to_device(dev).unwrap()).unwrap();
    }
    let mut rng = Rng::new(11);
    let b = shape[0];
    let x = rng.normal_tensor(shape, DType::F32, dev).unwrap();
    let dx = rng.normal_tensor(shape, DType::F32, dev).unwrap();
    let probe = rng.normal_tensor(shape, DType::F32, dev).unwrap();
    let t: Vec<f32> = (0..b).map(|i| 0.3 + 0.7 * (i as f32 + 0.5) / b as f32).collect();
    let t = Tensor::from_vec(t, (b, 1), &Device::Cpu)
        .unwrap()
        .to_device(dev)
        .unwrap();
    let s = (&t * 0.4).unwrap();
    let cond = match classes {
        Some(c) => Cond::from_classes(&(0..b as u32).map(|i| i % c as u32).collect::<Vec<_>>(), c, dev).unwrap(),
        None => Cond::none(),
    };
    let at = Point {
        x: &x,
        t: &t,
        s: &s,
        cond: &cond,
    };
    let y = net.map(&x, &t, &s, &cond).unwrap();
    let g = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    let grads = vars_sorted(&vm)
        .into_iter()
        .map(|(name, v)| {
            let grad = g
                .get(&v)
                .unwrap_or_else(|| panic!("no gradient reaches {name}"))
                .clone();
            (name, grad)
        })
        .collect();
    let along = Tangent {
        x: dx,
        t: t.ones_like().unwrap(),
        s: t.zeros_like().unwrap(),
    };
    let (_, tangent) = net.average_velocity_jvp(&at, &along).unwrap();
    Outputs { y, grads, tangent }
}

/// The networks of these cases: a name, the architecture, the input's shape and the number of classes.
fn cases() -> Vec<(&'static str, Arch, Vec<usize>, Option<usize>)> {
    vec![
        ("mlp", Arch::Mlp(MlpConfig::new(2)), vec![300, 2], None),
        (
            "unet",
            common::small_unet(&[2, 8, 8], 16, 4, Some(3)),
            vec![6, 2, 8, 8],
            Some(3),
        ),
    ]
}

/// Every parameter of `arch`, drawn on the host (zero-initialised ones too, so that no path is idle).
fn drawn_params(arch: &Arch) -> Vec<(String, Tensor)> {
    let vm = VarMap::new();
    FlowMapNet::new(arch.clone(), VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    let mut rng = Rng::new(3);
    vars_sorted(&vm)
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                (rng.normal_tensor(v.shape(), DType::F32, &Device::Cpu).unwrap() * 0.3).unwrap(),
            )
        })
        .collect()
}

/// Every network on the device computes what it computes on the CPU: outputs, each parameter's gradient
/// and the exact tangent within f32 summation-order differences.
#[test]
fn networks_agree_with_the_cpu_in_values_gradients_and_tangents() {
    let _g = serial();
    for (name, arch, shape, classes) in cases() {
        let params = drawn_params(&arch);
        let cpu = evaluate(&arch, &shape, classes, &params, &Device::Cpu);
        let sub = on_subject(|dev| evaluate(&arch, &shape, classes, &params, dev));
        let e = rel(&sub.y, &cpu.y);
        eprintln!(
            "{name}: outputs differ by {e:.1e}, tangents by {:.1e}",
            rel(&sub.tangent, &cpu.tangent)
        );
        assert!(e < 1e-4, "{name}: outputs differ by {e}");
        let e = rel(&sub.tangent, &cpu.tangent);
        assert!(e < 1e-3, "{name}: tangents differ by {e}");
        for ((p, a), (_, b)) in sub.grads.iter().zip(&cpu.grads) {
            let e = rel(a, b);
            assert!(e < 1e-3, "{name}: the gradient of {p} differs by {e}");
        }
    }
}

/// `--precision bf16` off the CPU's fast path (on another device, or with the fast path off) runs its
/// products and convolutions on bf16 operands (candle's bf16 ops on a GPU; on the CPU, f32 ops on operands
/// rounded to bf16): outputs, gradients and tangents within bf16 rounding of f32's, and not equal to them.
#[test]
fn bf16_on_the_device_runs_bf16_ops_within_bf16_rounding() {
    use flowmap::kernels::{with_precision, Precision};
    let _g = serial();
    for (name, arch, shape, classes) in cases() {
        let params = drawn_params(&arch);
        let f32s = on_subject(|dev| evaluate(&arch, &shape, classes, &params, dev));
        let bf16 = on_subject(|dev| with_precision(Precision::Bf16, || evaluate(&arch, &shape, classes, &params, dev)));
        let (ey, et) = (rel(&bf16.y, &f32s.y), rel(&bf16.tangent, &f32s.tangent));
        eprintln!("{name}: bf16 outputs differ from f32 by {ey:.1e}, tangents by {et:.1e}");
        assert!(ey > 0.0 && ey < 3e-2, "{name}: bf16 outputs differ by {ey}");
        assert!(et > 0.0 && et < 5e-2, "{name}: bf16 tangents differ by {et}");
        for ((p, a), (_, b)) in bf16.grads.iter().zip(&f32s.grads) {
            let e = rel(a, b);
            assert!(e < 8e-2, "{name}: the bf16 gradient of {p} differs by {e}");
        }
    }
}

/// A teacher and a MeanFlow map (its loss runs the exact JVP) trained on the device follow the CPU's loss
/// curves, the teacher's samples on the device are the CPU's, and a checkpoint written on the device loads
/// on the CPU with the same numbers.
#[test]
fn training_and_sampling_on_the_device_follow_the_cpu() {
    let _g = serial();
    let data = DataSource::Toy(Toy::Checkerboard);
    let arch = Arch::Mlp(MlpConfig {
        hidden: 64,
        depth: 3,
        ..MlpConfig::new(2)
    });
    let cfg = TrainConfig {
        steps: 300,
        batch_size: 256,
        warmup_steps: 20,
        ..TrainConfig::default()
    };
    let teach = |dev: &Device| pipeline::train_teacher(&data, &arch, &cfg, dev, &Silent).unwrap();
    let map = |dev: &Device| {
        let job = MapJob {
            train: TrainConfig {
                steps: 200,
                ..cfg.clone()
            },
            arch: arch.clone(),
            device: dev.clone(),
            ..MapJob::new(Method::Meanflow, &data)
        };
        job.run(&Silent).unwrap()
    };
    let (cpu_teacher, cpu_map) = (teach(&Device::Cpu), map(&Device::Cpu));
    let (sub_teacher, sub_map) = on_subject(|dev| (teach(dev), map(dev)));
    for (what, a, b) in [
        ("teacher", &cpu_teacher.log, &sub_teacher.log),
        ("meanflow", &cpu_map.log, &sub_map.log),
    ] {
        let ((a0, a1), (b0, b1)) = (a.first_last(), b.first_last());
        eprintln!("{what}: CPU loss {a0:.5} → {a1:.5}, device {b0:.5} → {b1:.5}");
        assert!(
            (a0 - b0).abs() < 1e-3 * a0,
            "{what}: the first losses differ: {a0} vs {b0}"
        );
        assert!(
            (a1 - b1).abs() < 0.03 * a1,
            "{what}: the last tenth differs: {a1} vs {b1}"
        );
    }

    // The device's teacher through a checkpoint, sampled on the device and on the CPU from the same noise.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("teacher.safetensors");
    sub_teacher.save(&path).unwrap();
    let gen = Generation {
        nfe: 8,
        seed: 5,
        ..Generation::default()
    };
    let spec = path.to_str().unwrap();
    let on_cpu = Model::load(spec, &Device::Cpu).unwrap();
    let (x_cpu, nfe) = on_cpu.generator(&gen, None).unwrap().sample(512, &Device::Cpu).unwrap();
    assert_eq!(nfe, 8);
    let x_sub = on_subject(|dev| {
        let m = Model::load(spec, dev).unwrap();
        let g = m.generator(&gen, None).unwrap();
        let (x, _) = g.sample(512, dev).unwrap();
        x
    });
    let e = rel(&x_sub, &x_cpu);
    eprintln!("teacher samples (Euler, 8 steps) differ by {e:.1e}");
    assert!(e < 1e-4, "the device's samples differ from the CPU's by {e}");
}
