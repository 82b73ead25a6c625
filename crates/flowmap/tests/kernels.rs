//! The CPU fast path against candle's own ops: values and gradients agree to f32 rounding, for the dense
//! layer alone, for whole networks, and for the optimiser and the weight average.

mod common;

use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW, VarBuilder, VarMap};
use flowmap::backbone::mlp::seed_params;
use flowmap::backbone::MlpConfig;
use flowmap::flow_map::{FlowMap, FlowMapNet};
use flowmap::kernels::{self, dense, dense_plain, Activation};
use flowmap::optim::{AdamW, Ema};
use flowmap::Rng;

/// Tests that switch the fast path off hold this lock, so they never overlap.
static SWITCH: Mutex<()> = Mutex::new(());

/// A 2-D flow-map network of the given width, its parameters seeded.
fn flow_map_net(hidden: usize, seed: u64) -> (VarMap, FlowMapNet) {
    let vm = VarMap::new();
    let cfg = MlpConfig {
        hidden,
        ..MlpConfig::new(2)
    };
    let net = FlowMapNet::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    seed_params(&vm, seed).unwrap();
    (vm, net)
}

fn randn(shape: (usize, usize), seed: u64) -> Tensor {
    Rng::new(seed).normal_tensor(shape, DType::F32, &Device::Cpu).unwrap()
}

/// `max |a − b| / max(1, max |b|)`.
fn rel(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let m = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    d / m.max(1.0)
}

#[test]
fn dense_matches_candle_in_values_and_gradients() {
    // (batch, in, out): skinny read-outs, a first layer, square hidden layers, one row, ragged blocks, and
    // a weight transposed for several blocks whose sides are not multiples of the transpose's 8×8 tiles.
    for (b, n_in, n_out) in [
        (7, 5, 3),
        (300, 34, 256),
        (1, 256, 2),
        (129, 256, 256),
        (4096, 64, 96),
        (513, 256, 2),
        (600, 37, 83),
    ] {
        for act in [Activation::Identity, Activation::Silu] {
            let x = Var::from_tensor(&randn((b, n_in), 1)).unwrap();
            let w = Var::from_tensor(&(randn((n_out, n_in), 2) * 0.2).unwrap()).unwrap();
            let bias = Var::from_tensor(&randn((1, n_out), 3).squeeze(0).unwrap()).unwrap();
            let g = randn((b, n_out), 4);
            let fast = dense(&x, &w, &bias, act).unwrap();
            let plain = dense_plain(&x, &w, &bias, act).unwrap();
            let what = format!("{b}×{n_in}→{n_out} {act:?}");
            assert!(
                rel(&fast, &plain) < 1e-5,
                "{what}: outputs differ by {}",
                rel(&fast, &plain)
            );
            let gf = (&fast * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let gp = (&plain * &g).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in [("x", &x), ("W", &w), ("b", &bias)] {
                let (a, c) = (gf.get(v).unwrap(), gp.get(v).unwrap());
                assert!(rel(a, c) < 1e-5, "{what}: d{name} differs by {}", rel(a, c));
            }
        }
    }
}

#[test]
fn dense_skips_gradients_nobody_asked_for_and_survives_a_second_backward() {
    let x = randn((64, 16), 5); // a plain tensor: no gradient wanted
    let w = Var::from_tensor(&randn((32, 16), 6)).unwrap();
    let bias = Var::zeros(32, DType::F32, &Device::Cpu).unwrap();
    let y = dense(&x, &w, &bias, Activation::Silu).unwrap();
    let loss = y.sqr().unwrap().sum_all().unwrap();
    let g1 = loss.backward().unwrap();
    assert!(g1.get(&x).is_none());
    // The second pass recomputes the pre-activation the first one consumed.
    let g2 = loss.backward().unwrap();
    assert!(rel(g1.get(&w).unwrap(), g2.get(&w).unwrap()) < 1e-6);
}

#[test]
fn fused_mlp_matches_candle_layer_by_layer_in_values_and_gradients() {
    // Batches of one block, of two half blocks (128..511 rows), of several full blocks and a ragged one;
    // an input too narrow for the GEMM blocks and a skinny read-out.
    for (b, widths) in [
        (129, &[5, 16, 3][..]),
        (200, &[34, 64, 64, 2][..]),
        (300, &[34, 96, 2][..]),
        (1100, &[18, 48, 48, 48, 2][..]),
    ] {
        let h = Var::from_tensor(&randn((b, widths[0]), 11)).unwrap();
        let params: Vec<(Var, Var)> = widths
            .windows(2)
            .enumerate()
            .map(|(i, io)| {
                let w = (randn((io[1], io[0]), 20 + i as u64) * (1.0 / (io[0] as f64).sqrt())).unwrap();
                let bias = randn((1, io[1]), 40 + i as u64).squeeze(0).unwrap();
                (Var::from_tensor(&w).unwrap(), Var::from_tensor(&bias).unwrap())
            })
            .collect();
        let acts: Vec<Activation> = (0..params.len())
            .map(|i| {
                if i + 1 == params.len() {
                    Activation::Identity
                } else {
                    Activation::Silu
                }
            })
            .collect();
        let layers: Vec<kernels::Layer<'_>> = params
            .iter()
            .zip(&acts)
            .map(|((w, bias), act)| (w.as_tensor(), bias.as_tensor(), *act))
            .collect();
        let fused = kernels::mlp(&h, &layers).unwrap();
        let plain = layers
            .iter()
            .try_fold(h.as_tensor().clone(), |x, (w, bias, act)| {
                dense_plain(&x, w, bias, *act)
            })
            .unwrap();
        let what = format!("batch {b}, widths {widths:?}");
        assert!(
            rel(&fused, &plain) < 1e-5,
            "{what}: outputs differ by {}",
            rel(&fused, &plain)
        );
        let g = randn(fused.dims2().unwrap(), 5);
        let gf = (&fused * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let gp = (&plain * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let (a, c) = (gf.get(&h).unwrap(), gp.get(&h).unwrap());
        assert!(rel(a, c) < 1e-5, "{what}: dh differs by {}", rel(a, c));
        for (i, (w, bias)) in params.iter().enumerate() {
            for (name, v) in [("W", w), ("b", bias)] {
                let (a, c) = (gf.get(v).unwrap(), gp.get(v).unwrap());
                assert!(rel(a, c) < 1e-5, "{what}: d{name}{i} differs by {}", rel(a, c));
            }
        }
        // A second backward through the same graph recomputes the activations the first one consumed.
        let again = (&fused * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let (w0, _) = &params[0];
        assert!(rel(again.get(w0).unwrap(), gf.get(w0).unwrap()) < 1e-6);
    }
}

#[test]
fn fused_mlp_sums_gradients_over_passes_and_skips_frozen_layers() {
    // Two fused passes through the same parameters in one loss (each pass hands its gradients to candle
    // through its own links), one layer frozen (a detached weight: no link, no gradient), and a plain
    // input: candle's layer-by-layer graph gives the same gradients.
    let widths = [6, 32, 32, 3];
    let params: Vec<(Var, Var)> = widths
        .windows(2)
        .enumerate()
        .map(|(i, io)| {
            let w = (randn((io[1], io[0]), 60 + i as u64) * (1.0 / (io[0] as f64).sqrt())).unwrap();
            let bias = randn((1, io[1]), 70 + i as u64).squeeze(0).unwrap();
            (Var::from_tensor(&w).unwrap(), Var::from_tensor(&bias).unwrap())
        })
        .collect();
    let frozen = params[1].0.as_tensor().detach();
    let layers: Vec<kernels::Layer<'_>> = params
        .iter()
        .enumerate()
        .map(|(i, (w, b))| {
            let w = if i == 1 { &frozen } else { w.as_tensor() };
            let act = if i + 1 == params.len() {
                Activation::Identity
            } else {
                Activation::Silu
            };
            (w, b.as_tensor(), act)
        })
        .collect();
    let (h1, h2) = (randn((300, 6), 81), randn((140, 6), 82));
    let loss = |f: &dyn Fn(&Tensor) -> Tensor| {
        let a = f(&h1).sqr().unwrap().sum_all().unwrap();
        let b = (f(&h2) * 0.5).unwrap().sum_all().unwrap();
        (a + b).unwrap().backward().unwrap()
    };
    let gf = loss(&|h| kernels::mlp(h, &layers).unwrap());
    let gp = loss(&|h| {
        layers
            .iter()
            .try_fold(h.clone(), |x, (w, b, act)| dense_plain(&x, w, b, *act))
            .unwrap()
    });
    assert!(gf.get(&frozen).is_none() && gf.get(params[1].0.as_tensor()).is_none());
    for (i, (w, bias)) in params.iter().enumerate() {
        for (name, v) in [("W", w), ("b", bias)] {
            if i == 1 && name == "W" {
                continue;
            }
            let (a, c) = (gf.get(v).unwrap(), gp.get(v).unwrap());
            assert!(rel(a, c) < 1e-5, "d{name}{i} differs by {}", rel(a, c));
        }
    }
}

#[test]
fn no_grad_gives_the_training_forward_bit_for_bit_and_records_nothing() {
    // One row (dot products), a few rows, one block, two half blocks, several blocks with a ragged end.
    // Bit-for-bit needs the fast path on for both passes: hold the switch.
    let _lock = SWITCH.lock().unwrap();
    let (vm, net) = flow_map_net(96, 4);
    for b in [1, 5, 100, 300, 1100] {
        let x = randn((b, 2), 7);
        let t = (randn((b, 1), 8).abs().unwrap() * 0.3).unwrap();
        let s = (&t * 0.5).unwrap();
        let tracked = net.average_velocity(&x, &t, &s, flowmap::Cond::none_ref()).unwrap();
        let free = flowmap::no_grad(|| net.average_velocity(&x, &t, &s, flowmap::Cond::none_ref())).unwrap();
        let (a, c) = (
            tracked.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            free.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert_eq!(a, c, "batch {b}: inference differs from the training forward");
        // Nothing was recorded: a loss through the no-grad result reaches no parameter.
        let grads = free.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert!(
            vm.all_vars().iter().all(|v| grads.get(v).is_none()),
            "batch {b}: gradients leaked"
        );
        let grads = tracked.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert!(
            vm.all_vars().iter().all(|v| grads.get(v).is_some()),
            "batch {b}: a parameter got no gradient"
        );
    }
}

#[test]
fn whole_network_gradients_match_with_the_fast_path_off() {
    let _lock = SWITCH.lock().unwrap();
    let (vm, net) = flow_map_net(64, 3);
    let x = randn((200, 2), 7);
    let t = common::uniform(0.5, 1.0, (200, 1), 105, DType::F32);
    let s = (&t * 0.3).unwrap();
    let run = || {
        let f = net.map(&x, &t, &s, flowmap::Cond::none_ref()).unwrap();
        let g = f.sqr().unwrap().mean_all().unwrap().backward().unwrap();
        (f, g)
    };
    let (f_fast, g_fast) = run();
    kernels::set_enabled(false);
    let (f_plain, g_plain) = run();
    kernels::set_enabled(true);
    assert!(rel(&f_fast, &f_plain) < 1e-5);
    for (name, v) in flowmap::flow_map::vars_sorted(&vm) {
        let (a, b) = (g_fast.get(&v).unwrap(), g_plain.get(&v).unwrap());
        assert!(rel(a, b) < 1e-5, "gradient of {name} differs by {}", rel(a, b));
    }
}

/// A class-conditional U-Net flow map (every norm-activation-convolution one fused node, GroupNorm, the
/// resampling nodes) against candle's ops: the map and the gradient of every parameter.
#[test]
fn whole_unet_gradients_match_with_the_fast_path_off() {
    use flowmap::backbone::{vars_sorted, Arch, Role, UnetConfig};
    let _lock = SWITCH.lock().unwrap();
    let cfg = UnetConfig {
        channels: 8,
        channel_mult: vec![1, 2],
        attention_resolutions: vec![4],
        groups: 4,
        time_features: 4,
        num_classes: Some(3),
        ..UnetConfig::new(&[2, 8, 8])
    };
    let vm = VarMap::new();
    let arch = Arch::Unet(cfg);
    let net = arch
        .build(Role::FlowMap, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))
        .unwrap();
    // Every parameter drawn, the zero-initialised ones too, so that no path is switched off.
    let mut rng = Rng::new(3);
    for (_, v) in vars_sorted(&vm) {
        v.set(&(rng.normal_tensor(v.shape(), DType::F32, &Device::Cpu).unwrap() * 0.3).unwrap())
            .unwrap();
    }
    let x = rng.normal_tensor(&[6, 2, 8, 8], DType::F32, &Device::Cpu).unwrap();
    let t = Tensor::from_slice(&[0.9f32, 0.7, 0.5, 0.4, 0.2, 0.1], (6, 1), &Device::Cpu).unwrap();
    let gap = (&t * 0.5).unwrap();
    let cond = flowmap::Cond::from_classes(&[0, 1, 2, 3, 0, 1], 3, &Device::Cpu).unwrap();
    let probe = rng.normal_tensor(&[6, 2, 8, 8], DType::F32, &Device::Cpu).unwrap();
    let run = || {
        let y = net.forward(&x, &t, Some(&gap), &cond).unwrap();
        let g = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        (y, g)
    };
    let (y_fast, g_fast) = run();
    kernels::set_enabled(false);
    let (y_plain, g_plain) = run();
    kernels::set_enabled(true);
    assert!(
        rel(&y_fast, &y_plain) < 1e-5,
        "outputs differ by {}",
        rel(&y_fast, &y_plain)
    );
    for (name, v) in vars_sorted(&vm) {
        let (a, b) = (g_fast.get(&v).unwrap(), g_plain.get(&v).unwrap());
        assert!(rel(a, b) < 1e-4, "gradient of {name} differs by {}", rel(a, b));
    }
}

#[test]
fn fused_adamw_and_ema_match_candle() {
    let params = ParamsAdamW {
        lr: 1e-2,
        weight_decay: 0.1,
        ..ParamsAdamW::default()
    };
    let init = randn((37, 19), 8);
    let (a, b) = (Var::from_tensor(&init).unwrap(), Var::from_tensor(&init).unwrap());
    let mut fused = AdamW::new(vec![("a".into(), a.clone())], params.clone()).unwrap();
    let mut reference = candle_nn::AdamW::new(vec![b.clone()], params.clone()).unwrap();
    // The tensor path (taken off the CPU and for other dtypes) against candle-nn's, in f64.
    let init64 = init.to_dtype(candle_core::DType::F64).unwrap();
    let (c, d) = (Var::from_tensor(&init64).unwrap(), Var::from_tensor(&init64).unwrap());
    let mut plain = AdamW::new(vec![("c".into(), c.clone())], params.clone()).unwrap();
    let mut reference64 = candle_nn::AdamW::new(vec![d.clone()], params).unwrap();
    for k in 0..6u64 {
        let target = randn((37, 19), 20 + k).to_dtype(candle_core::DType::F64).unwrap();
        plain
            .backward_step(&(c.as_tensor() - &target).unwrap().sqr().unwrap().sum_all().unwrap())
            .unwrap();
        reference64
            .backward_step(&(d.as_tensor() - &target).unwrap().sqr().unwrap().sum_all().unwrap())
            .unwrap();
    }
    assert_eq!(
        c.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap(),
        d.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap(),
        "the tensor path is candle-nn's algebra"
    );
    for k in 0..6u64 {
        let target = randn((37, 19), 20 + k);
        fused
            .backward_step(&(a.as_tensor() - &target).unwrap().sqr().unwrap().sum_all().unwrap())
            .unwrap();
        reference
            .backward_step(&(b.as_tensor() - &target).unwrap().sqr().unwrap().sum_all().unwrap())
            .unwrap();
    }
    assert!(
        rel(a.as_tensor(), b.as_tensor()) < 1e-6,
        "AdamW differs by {}",
        rel(a.as_tensor(), b.as_tensor())
    );
    assert!(rel(a.as_tensor(), &init) > 1e-3, "the parameters moved");

    let (live, avg) = (VarMap::new(), VarMap::new());
    let lv = live
        .get((5, 3), "p", candle_nn::Init::Const(1.0), DType::F32, &Device::Cpu)
        .unwrap();
    avg.get((5, 3), "p", candle_nn::Init::Const(0.0), DType::F32, &Device::Cpu)
        .unwrap();
    let ema = Ema::new(&avg, &live, 0.9).unwrap();
    let mut expect = lv.copy().unwrap();
    for step in 0..4 {
        let next = randn((5, 3), 40 + step as u64);
        live.data().lock().unwrap().get("p").unwrap().set(&next).unwrap();
        ema.update(step).unwrap();
        let d = ema.decay_at(step);
        expect = ((expect * d).unwrap() + (next * (1.0 - d)).unwrap()).unwrap();
    }
    let got = avg.data().lock().unwrap().get("p").unwrap().as_tensor().clone();
    assert!(rel(&got, &expect) < 1e-6, "EMA {} vs {}", got, expect);
}

#[test]
fn conditioning_matches_the_embedding_and_its_gradients() {
    let emb_freqs: Vec<f32> = (0..16).map(|i| 64f32.powf(i as f32 / 15.0)).collect();
    let freqs = Tensor::from_slice(&emb_freqs, (1, 16), &Device::Cpu).unwrap();
    let x = Var::from_tensor(&randn((50, 3), 9)).unwrap();
    let tg = Var::from_tensor(&common::uniform(0.0, 1.0, (50, 2), 106, DType::F32)).unwrap();
    let fast = kernels::conditioning(&x, &tg, &emb_freqs).unwrap();
    let emb = |c: usize| {
        let arg = tg.narrow(1, c, 1).unwrap().broadcast_mul(&freqs).unwrap();
        vec![arg.sin().unwrap(), arg.cos().unwrap()]
    };
    let mut parts = vec![x.as_tensor().clone()];
    parts.extend(emb(0));
    parts.extend(emb(1));
    let plain = Tensor::cat(&parts, 1).unwrap();
    assert!(rel(&fast, &plain) < 2e-6, "values differ by {}", rel(&fast, &plain));
    let g = randn((50, 3 + 64), 10);
    let gf = (&fast * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let gp = (&plain * &g).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, v) in [("x", &x), ("(t, gap)", &tg)] {
        let (a, b) = (gf.get(v).unwrap(), gp.get(v).unwrap());
        assert!(rel(a, b) < 1e-5, "gradient of {name} differs by {}", rel(a, b));
    }
}

#[test]
fn network_jvp_matches_with_the_fast_path_off() {
    let _lock = SWITCH.lock().unwrap();
    let (_vm, net) = flow_map_net(48, 4);
    for b in [1, 5, 700] {
        let (x, dx) = (randn((b, 2), 11), randn((b, 2), 12));
        let t = common::uniform(0.5, 1.0, (b, 1), 107, DType::F32);
        let s = (&t * 0.5).unwrap();
        let (ones, zeros) = (t.ones_like().unwrap(), t.zeros_like().unwrap());
        let (f1, d1) = common::jvp_at(&net, (&x, &t, &s), (&dx, &ones, &zeros));
        kernels::set_enabled(false);
        let (f2, d2) = common::jvp_at(&net, (&x, &t, &s), (&dx, &ones, &zeros));
        kernels::set_enabled(true);
        assert!(rel(&f1, &f2) < 1e-5, "batch {b}: values differ by {}", rel(&f1, &f2));
        assert!(rel(&d1, &d2) < 1e-5, "batch {b}: tangents differ by {}", rel(&d1, &d2));
    }
}

#[test]
fn batch_velocity_matches_with_the_fast_path_off() {
    // MeanFlow's batch estimate of the marginal velocity: the fused per-row pass against candle's ops, over
    // times from near the data (peaked weights) to the noise (flat ones), at several batch sizes. Near t = 0.02
    // the weights' exponent scales distances by 1/t², so the two summation orders can differ by a few 1e-4 at
    // an unlucky time (an unseeded draw once gave 2.8e-4); the seeded times give at most 5.6e-6.
    let _lock = SWITCH.lock().unwrap();
    for (b, n) in [(1, 1), (7, 5), (300, 256), (700, 512)] {
        let (xt, x0) = (randn((b, 2), 21), randn((n, 2), 22));
        let t = common::uniform(0.02, 1.0, (b, 1), 108, DType::F32);
        let v1 = flowmap::objective::batch_velocity(&xt, &t, &x0).unwrap();
        kernels::set_enabled(false);
        let v2 = flowmap::objective::batch_velocity(&xt, &t, &x0).unwrap();
        kernels::set_enabled(true);
        assert!(
            rel(&v1, &v2) < 1e-4,
            "batch {b} × {n}: velocities differ by {}",
            rel(&v1, &v2)
        );
    }
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    // Bit-for-bit needs the fast path on for both runs: hold the switch.
    let _lock = SWITCH.lock().unwrap();
    let (vm, net) = flow_map_net(MlpConfig::new(2).hidden, 5);
    let b = 1300; // several blocks, the last one ragged
    let x = randn((b, 2), 13);
    let t = common::uniform(0.5, 1.0, (b, 1), 109, DType::F32);
    let s = (&t * 0.25).unwrap();
    let run = |n: usize| {
        kernels::with_threads(n, || {
            let f = net.map(&x, &t, &s, flowmap::Cond::none_ref()).unwrap();
            let g = f.sqr().unwrap().mean_all().unwrap().backward().unwrap();
            let grads: Vec<Vec<f32>> = flowmap::flow_map::vars_sorted(&vm)
                .iter()
                .map(|(_, v)| g.get(v).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap())
                .collect();
            (f.flatten_all().unwrap().to_vec1::<f32>().unwrap(), grads)
        })
    };
    assert_eq!(
        run(1),
        run(2),
        "one and two threads must give bit-identical values and gradients"
    );
}

#[test]
fn few_row_inference_splits_layers_across_threads_with_the_same_bits() {
    // Single-sample generation splits each wide layer's outputs across the threads; every output is the
    // same dot product as on one thread and in the tracked forward. Bit-for-bit: hold the switch.
    let _lock = SWITCH.lock().unwrap();
    for hidden in [256, 512] {
        let (_vm, net) = flow_map_net(hidden, 9);
        for b in [1, 3, 8] {
            let x = randn((b, 2), 21);
            let t = common::uniform(0.5, 1.0, (b, 1), 110, DType::F32);
            let s = (&t * 0.5).unwrap();
            let bits = |f: Tensor| f.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let tracked = bits(net.average_velocity(&x, &t, &s, flowmap::Cond::none_ref()).unwrap());
            for n in [1, 2, 3] {
                let free = kernels::with_threads(n, || {
                    flowmap::no_grad(|| net.average_velocity(&x, &t, &s, flowmap::Cond::none_ref()))
                })
                .unwrap();
                assert_eq!(bits(free), tracked, "width {hidden}, batch {b}, {n} threads");
            }
        }
    }
}
