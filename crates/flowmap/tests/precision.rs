//! Mixed precision (`Precision::Bf16`): bf16 operands with f32 sums in every matrix product. Networks agree
//! with f32 to bf16 rounding in values and gradients, keep their bits at any thread count, train along the
//! f32 loss curve, and record the setting; where the CPU has no AVX-512 BF16, bf16 is f32 to the bit.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use flowmap::backbone::{vars_sorted, Arch, MlpConfig, Role};
use flowmap::data::{DataSource, Toy};
use flowmap::kernels::{self, with_precision, Precision};
use flowmap::pipeline;
use flowmap::train::TrainConfig;
use flowmap::{Cond, Rng};

use common::{rel_to_largest as rel, small_unet};

/// Whether this CPU runs the bf16 kernels (otherwise bf16 must give the f32 bits).
fn has_bf16() -> bool {
    Precision::Bf16.effective() == Precision::Bf16
}

/// A network with every parameter drawn (zero-initialised ones too, so no path is idle), an input batch,
/// and a run giving the output and the gradient of every parameter.
struct Case {
    vm: VarMap,
    net: Box<dyn Fn() -> (Tensor, candle_core::backprop::GradStore)>,
}

fn case(arch: Arch, x_shape: &[usize], classes: Option<usize>) -> Case {
    let vm = VarMap::new();
    let net = arch
        .build(Role::FlowMap, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))
        .unwrap();
    let mut rng = Rng::new(3);
    for (_, v) in vars_sorted(&vm) {
        v.set(&(rng.normal_tensor(v.shape(), DType::F32, &Device::Cpu).unwrap() * 0.3).unwrap())
            .unwrap();
    }
    let b = x_shape[0];
    let x = rng.normal_tensor(x_shape, DType::F32, &Device::Cpu).unwrap();
    let t = common::uniform(0.2, 1.0, (b, 1), 103, DType::F32);
    let gap = (&t * 0.5).unwrap();
    let cond = match classes {
        Some(c) => Cond::from_classes(
            &(0..b as u32).map(|i| i % c as u32).collect::<Vec<_>>(),
            c,
            &Device::Cpu,
        )
        .unwrap(),
        None => Cond::none(),
    };
    let probe = rng.normal_tensor(x_shape, DType::F32, &Device::Cpu).unwrap();
    Case {
        vm,
        net: Box::new(move || {
            let y = net.forward(&x, &t, Some(&gap), &cond).unwrap();
            let g = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            (y, g)
        }),
    }
}

fn cases() -> Vec<(&'static str, Case)> {
    let unet = small_unet(&[2, 8, 8], 16, 4, Some(3));
    vec![
        ("mlp", case(Arch::Mlp(MlpConfig::new(2)), &[700, 2], None)),
        ("unet", case(unet, &[6, 2, 8, 8], Some(3))),
    ]
}

/// bf16 against f32: the outputs and every parameter's gradient within bf16 rounding (relative 2⁻⁸ per
/// operand, a few percent through a deep network's products), and not equal (the kernels ran); on a CPU
/// without the instructions, the same bits.
#[test]
fn bf16_matches_f32_to_bf16_rounding_in_values_and_gradients() {
    for (name, c) in cases() {
        let (y32, g32) = (c.net)();
        let (y16, g16) = with_precision(Precision::Bf16, || (c.net)());
        let e = rel(&y16, &y32);
        eprintln!("{name}: bf16 outputs differ from f32 by {e:.2e} (relative to the largest)");
        if has_bf16() {
            assert!(e > 0.0 && e < 2e-2, "{name}: outputs differ by {e}");
        } else {
            assert_eq!(e, 0.0, "{name}: bf16 without the instructions must be f32");
        }
        for (p, v) in vars_sorted(&c.vm) {
            let (a, b) = (g16.get(&v).unwrap(), g32.get(&v).unwrap());
            let e = rel(a, b);
            assert!(e < 5e-2, "{name}: gradient of {p} differs by {e}");
            assert!(
                a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() > 0.0,
                "{name}: no gradient reaches {p}"
            );
        }
    }
}

/// bf16 products keep their bits at any thread count, as f32 ones do.
#[test]
fn bf16_results_do_not_depend_on_the_thread_count() {
    for (name, c) in cases() {
        let run = |n: usize| {
            kernels::with_threads(n, || {
                with_precision(Precision::Bf16, || {
                    let (y, g) = (c.net)();
                    let grads: Vec<Vec<f32>> = vars_sorted(&c.vm)
                        .iter()
                        .map(|(_, v)| g.get(v).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap())
                        .collect();
                    (y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), grads)
                })
            })
        };
        assert!(run(1) == run(2), "{name}: one and two threads gave different bits");
    }
}

/// A teacher trained in bf16 follows the f32 run's loss curve (its last tenth within 2%), reproduces
/// itself bit for bit, and its checkpoint says bf16 where an f32 one says nothing new.
#[test]
fn bf16_training_follows_the_f32_loss_curve_and_is_recorded() {
    let data = DataSource::Toy(Toy::Checkerboard);
    let arch = Arch::Mlp(MlpConfig {
        hidden: 128,
        depth: 3,
        ..MlpConfig::new(2)
    });
    let run = |precision| {
        let cfg = TrainConfig {
            steps: 600,
            batch_size: 512,
            warmup_steps: 20,
            precision,
            ..TrainConfig::default()
        };
        pipeline::train_teacher(&data, &arch, &cfg, &Device::Cpu, &flowmap::train::Silent).unwrap()
    };
    let (f32_run, bf16_run) = (run(Precision::F32), run(Precision::Bf16));
    let ((a0, a1), (_, b1)) = (f32_run.log.first_last(), bf16_run.log.first_last());
    assert!(a1 < 0.85 * a0, "the f32 loss should fall: {a0} → {a1}");
    eprintln!("last tenth of the loss: f32 {a1:.7}, bf16 {b1:.7}");
    // The bf16 run computed in bf16 (without the instructions, in f32 to the bit).
    assert_eq!(f32_run.log.losses == bf16_run.log.losses, !has_bf16());
    assert!((b1 - a1).abs() < 0.02 * a1, "bf16 ends at {b1}, f32 at {a1}");
    let again = run(Precision::Bf16);
    assert_eq!(bf16_run.log.losses, again.log.losses, "a bf16 run reproduces itself");
    let dir = tempfile::tempdir().unwrap();
    let (p32, p16) = (dir.path().join("a.safetensors"), dir.path().join("b.safetensors"));
    pipeline::Model::from(f32_run).save(&p32).unwrap();
    pipeline::Model::from(bf16_run).save(&p16).unwrap();
    let train = |p: &std::path::Path| flowmap::checkpoint::Checkpoint::load(p).unwrap().meta.training["train"].clone();
    assert!(train(&p32).get("precision").is_none());
    assert_eq!(train(&p16)["precision"], "bf16");
}

#[test]
fn precision_names_parse_and_unknown_ones_are_refused() {
    assert_eq!("bf16".parse::<Precision>().unwrap(), Precision::Bf16);
    assert_eq!("f32".parse::<Precision>().unwrap(), Precision::F32);
    let e = "fp16".parse::<Precision>().unwrap_err().to_string();
    assert!(e.contains("unknown precision 'fp16'"), "{e}");
    assert!(Precision::Bf16
        .describe()
        .contains(if has_bf16() { "vdpbf16ps" } else { "run in f32" }));
}

/// The exact JVP (MeanFlow's and the continuous objectives' tangent) runs its products in bf16 too: the
/// tangent stays within bf16 rounding of the f32 one (itself checked against f64 differences), for an
/// MLP and a U-Net flow map.
#[test]
fn bf16_tangents_stay_within_bf16_rounding_of_f32() {
    use flowmap::flow_map::{FlowMapNet, Point, Tangent, TangentMap};
    let unet = small_unet(&[2, 8, 8], 16, 4, None);
    for (name, arch, shape) in [
        ("mlp", Arch::Mlp(MlpConfig::new(2)), vec![300, 2]),
        ("unet", unet, vec![4, 2, 8, 8]),
    ] {
        let vm = VarMap::new();
        let net = FlowMapNet::new(arch, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
        let mut rng = Rng::new(5);
        for (_, v) in vars_sorted(&vm) {
            v.set(&(rng.normal_tensor(v.shape(), DType::F32, &Device::Cpu).unwrap() * 0.3).unwrap())
                .unwrap();
        }
        let x = rng.normal_tensor(&shape[..], DType::F32, &Device::Cpu).unwrap();
        let dx = rng.normal_tensor(&shape[..], DType::F32, &Device::Cpu).unwrap();
        let t = common::uniform(0.3, 1.0, (shape[0], 1), 104, DType::F32);
        let s = (&t * 0.4).unwrap();
        let at = Point {
            x: &x,
            t: &t,
            s: &s,
            cond: Cond::none_ref(),
        };
        let along = Tangent {
            x: dx,
            t: t.ones_like().unwrap(),
            s: t.zeros_like().unwrap(),
        };
        let (_, d32) = net.average_velocity_jvp(&at, &along).unwrap();
        let (_, d16) = with_precision(Precision::Bf16, || net.average_velocity_jvp(&at, &along).unwrap());
        let e = rel(&d16, &d32);
        eprintln!("{name}: bf16 tangent differs from f32 by {e:.2e} (relative to the largest)");
        if has_bf16() {
            assert!(e > 0.0 && e < 3e-2, "{name}: tangents differ by {e}");
        } else {
            assert_eq!(e, 0.0);
        }
    }
}
