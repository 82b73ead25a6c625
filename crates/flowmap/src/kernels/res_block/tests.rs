use super::*;
use crate::kernels::testing::{check_against_plain, flat, rand, same_on_1_and_4_threads};
use candle_core::Var;

struct Vars {
    x: Var,
    ss: Var,
    norm1: Var,
    w1: Var,
    b1: Var,
    norm2: Var,
    w2: Var,
    b2: Var,
    skip: Option<(Var, Var)>,
}

fn vars(b: usize, c: usize, o: usize, hw: usize, k: usize, seed: u64) -> Vars {
    let v =
        |shape: &[usize], i: u64, scale: f64| Var::from_tensor(&(rand(shape, seed * 16 + i) * scale).unwrap()).unwrap();
    Vars {
        x: v(&[b, c, hw, hw + 1], 1, 1.5),
        ss: v(&[b, 2 * o], 2, 0.5),
        norm1: v(&[2 * c], 3, 1.0),
        w1: v(&[o, c, k, k], 4, 0.5),
        b1: v(&[o], 5, 1.0),
        norm2: v(&[2 * o], 6, 1.0),
        w2: v(&[o, o, k, k], 7, 0.5),
        b2: v(&[o], 8, 1.0),
        skip: (c != o).then(|| (v(&[o, c, 1, 1], 9, 0.5), v(&[o], 10, 1.0))),
    }
}

fn params(v: &Vars) -> ResBlockParams<'_> {
    ResBlockParams {
        norm1: v.norm1.as_tensor(),
        conv1: (v.w1.as_tensor(), v.b1.as_tensor()),
        norm2: v.norm2.as_tensor(),
        conv2: (v.w2.as_tensor(), v.b2.as_tensor()),
        skip: v.skip.as_ref().map(|(w, b)| (w.as_tensor(), b.as_tensor())),
    }
}

/// The fused node against the block's layers from candle's primitive ops, in values and in the
/// gradients of the input, the scale-shift and every parameter: with and without the skip convolution,
/// the input as one tensor and as two (split at a group boundary and inside a group), one and several
/// groups, batches that are not a multiple of the block, and single images large enough that their
/// convolutions split into bands of pixels (`conv::forward_image_alone`: a band edge inside a line,
/// the skip convolution, a 7 × 8 image's unaligned bands) and their norms into halves of the groups.
#[test]
fn matches_the_layers_in_values_and_gradients() {
    let cases = [
        (1, 32, 32, 27, 3, 4, None),
        (1, 48, 32, 20, 3, 4, None),
        (1, 64, 64, 7, 3, 4, None),
        (5, 4, 6, 5, 3, 2, None),
        (3, 4, 4, 4, 3, 4, None),
        (9, 6, 3, 3, 1, 3, None),
        (1, 2, 2, 6, 3, 1, None),
        (6, 8, 4, 4, 3, 2, Some(4)),
        (5, 6, 4, 3, 3, 2, Some(1)),
    ];
    for (b, c, o, hw, k, groups, split) in cases {
        let v = vars(b, c, o, hw, k, b as u64);
        let p = params(&v);
        let at = format!("{b} {c} {o} {hw} {k} {groups} {split:?}");
        let probe = rand(&[b, o, hw, hw + 1], 99);
        let mut named = vec![
            ("ss", &v.ss),
            ("norm1", &v.norm1),
            ("w1", &v.w1),
            ("b1", &v.b1),
            ("norm2", &v.norm2),
            ("w2", &v.w2),
            ("b2", &v.b2),
        ];
        if let Some((w, bias)) = &v.skip {
            named.extend([("skip w", w), ("skip b", bias)]);
        }
        match split {
            None => {
                let fast = res_block(&[&v.x], &v.ss, &p, groups, 1e-5).unwrap();
                let slow = plain(&[&v.x], &v.ss, &p, groups, 1e-5).unwrap();
                named.push(("x", &v.x));
                check_against_plain(&fast, &slow, &named, &probe, 1e-4, &at);
            }
            Some(c_a) => {
                let part = |from: usize, n: usize| Var::from_tensor(&v.x.narrow(1, from, n).unwrap()).unwrap();
                let (xa, xb) = (part(0, c_a), part(c_a, c - c_a));
                let fast = res_block(&[&xa, &xb], &v.ss, &p, groups, 1e-5).unwrap();
                let slow = plain(&[&xa, &xb], &v.ss, &p, groups, 1e-5).unwrap();
                named.extend([("x first part", &xa), ("x second part", &xb)]);
                check_against_plain(&fast, &slow, &named, &probe, 1e-4, &at);
            }
        }
    }
}

/// The layers' forward-mode pass as the U-Net's tangent path runs it (`GroupNorm` and `Conv2d` JVPs,
/// the skip, the adds), from the same kernels, one tensor at a time.
fn layered_jvp(
    x: &Tensor,
    dx: &Tensor,
    ss: &Tensor,
    dss: &Tensor,
    p: &ResBlockParams<'_>,
    groups: usize,
) -> (Tensor, Tensor) {
    let conv = |x: &Tensor, (w, b): (&Tensor, &Tensor)| conv::conv2d(x, w, b).unwrap();
    let tangent = |dx: &Tensor, (w, b): (&Tensor, &Tensor)| conv::conv2d(dx, w, &b.zeros_like().unwrap()).unwrap();
    let z = Tensor::zeros((x.dim(0).unwrap(), 2 * x.dim(1).unwrap()), x.dtype(), x.device()).unwrap();
    let (n1, dn1) = norm::group_norm_jvp(x, dx, groups, 1e-5, p.norm1, &z, &z, true).unwrap();
    let (c1, dc1) = (conv(&n1, p.conv1), tangent(&dn1, p.conv1));
    let (n2, dn2) = norm::group_norm_jvp(&c1, &dc1, groups, 1e-5, p.norm2, ss, dss, true).unwrap();
    let (h, dh) = (conv(&n2, p.conv2), tangent(&dn2, p.conv2));
    let (s, ds) = match p.skip {
        Some(sk) => (conv(x, sk), tangent(dx, sk)),
        None => (x.clone(), dx.clone()),
    };
    ((s + h).unwrap(), (ds + dh).unwrap())
}

/// The fused forward-mode pass is the layers' one bit for bit (value and tangent): with and without
/// the skip convolution, the input in one part and in two, batches on and off the block, and single
/// images whose convolutions split into bands.
#[test]
fn jvp_is_the_layers_jvp_bit_for_bit() {
    for (b, c, o, hw, groups, split) in [
        (5, 4, 6, 5, 2, None),
        (3, 4, 4, 4, 4, None),
        (6, 8, 4, 4, 2, Some(4)),
        (1, 32, 32, 27, 4, None),
        (1, 48, 32, 20, 4, Some(16)),
        (9, 16, 16, 7, 4, Some(8)),
    ] {
        let v = vars(b, c, o, hw, 3, 3);
        let p = params(&v);
        let x = v.x.as_tensor();
        let dx = rand(x.dims(), 41);
        let dss = rand(v.ss.dims(), 42);
        let (want, dwant) = layered_jvp(x, &dx, v.ss.as_tensor(), &dss, &p, groups);
        let (parts, tangents): (Vec<Tensor>, Vec<Tensor>) = match split {
            None => (vec![x.clone()], vec![dx.clone()]),
            Some(c_a) => {
                let cut = |t: &Tensor| vec![t.narrow(1, 0, c_a).unwrap(), t.narrow(1, c_a, c - c_a).unwrap()];
                (cut(x), cut(&dx))
            }
        };
        let (pr, tr): (Vec<&Tensor>, Vec<&Tensor>) = (parts.iter().collect(), tangents.iter().collect());
        let (y, dy) = res_block_jvp(&pr, &tr, v.ss.as_tensor(), &dss, &p, groups, 1e-5)
            .unwrap()
            .expect("fused");
        let bits = |t: &Tensor| flat(t).iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let at = format!("{b} {c} {o} {hw} {groups} {split:?}");
        assert!(bits(&y) == bits(&want), "value differs at {at}");
        assert!(bits(&dy) == bits(&dwant), "tangent differs at {at}");
    }
}

#[test]
fn rejects_a_scale_shift_that_does_not_fit() {
    let v = vars(2, 4, 6, 3, 3, 1);
    let err = res_block(&[&v.x], &rand(&[2, 8], 3), &params(&v), 2, 1e-5).unwrap_err();
    assert!(err.to_string().contains("does not fit"), "{err}");
}

#[test]
fn bit_identical_across_thread_counts() {
    for (b, c, o, hw, split) in [
        (11, 4, 6, 4, None),
        (11, 4, 4, 4, None),
        (11, 8, 4, 4, Some(2)),
        (1, 32, 32, 27, None),
        (1, 48, 32, 20, Some(16)),
    ] {
        let v = vars(b, c, o, hw, 3, 7);
        let parts: Vec<Var> = match split {
            None => vec![v.x.clone()],
            Some(c_a) => vec![
                Var::from_tensor(&v.x.narrow(1, 0, c_a).unwrap()).unwrap(),
                Var::from_tensor(&v.x.narrow(1, c_a, c - c_a).unwrap()).unwrap(),
            ],
        };
        let refs: Vec<&Tensor> = parts.iter().map(|p| p.as_tensor()).collect();
        same_on_1_and_4_threads(|| {
            let y = res_block(&refs, &v.ss, &params(&v), 2, 1e-5).unwrap();
            let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let dx: Vec<f32> = parts.iter().flat_map(|p| flat(g.get(p).unwrap())).collect();
            (
                flat(&y),
                dx,
                [
                    flat(g.get(&v.ss).unwrap()),
                    flat(g.get(&v.w1).unwrap()),
                    flat(g.get(&v.norm1).unwrap()),
                ]
                .concat(),
            )
        });
    }
}
