use super::*;
use crate::kernels::testing::{check_against_plain, flat, rand, same_on_1_and_4_threads};
use candle_core::Var;

/// The fused node against candle's convolution, in values and in all three gradients, at kernel sizes
/// 1, 3 and 5, odd and even image sizes, a kernel wider than its image and batches that are not
/// a multiple of the block, and single images large enough to split into bands of pixels (a band
/// edge inside a line, a 7 × 7 image's unaligned halves, and a 1×1 kernel).
#[test]
fn matches_candle_in_values_and_gradients() {
    for (b, ci, co, h, w, k) in [
        (1, 32, 32, 28, 28, 3),
        (1, 40, 48, 15, 20, 3),
        (1, 64, 96, 28, 28, 1),
        (1, 64, 64, 7, 7, 3),
        (5, 3, 4, 7, 6, 3),
        (9, 2, 8, 4, 4, 1),
        (2, 4, 3, 5, 9, 5),
        (1, 1, 2, 3, 3, 3),
        (2, 2, 3, 2, 3, 5),
    ] {
        let x = Var::from_tensor(&rand(&[b, ci, h, w], 1)).unwrap();
        let wt = Var::from_tensor(&rand(&[co, ci, k, k], 2)).unwrap();
        let bias = Var::from_tensor(&rand(&[co], 3)).unwrap();
        let fast = conv2d(&x, &wt, &bias).unwrap();
        let slow = plain(&x, &wt, &bias).unwrap();
        let vars = [("x", &x), ("w", &wt), ("b", &bias)];
        check_against_plain(
            &fast,
            &slow,
            &vars,
            &rand(&[b, co, h, w], 4),
            1e-4,
            &format!("{b} {ci} {co} {h} {w} {k}"),
        );
    }
}

fn k3(c_in: usize, c_out: usize, h: usize, w: usize) -> Geometry {
    Geometry {
        c_in,
        c_out,
        h,
        w,
        k: 3,
    }
}

fn same_bits(fast: &[f32], slow: &[f32], at: &str) {
    let differ = fast
        .iter()
        .zip(slow)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    assert_eq!(differ, 0, "{at}: {differ} of {} outputs differ", fast.len());
}

/// The direct 3×3 kernel against im2col and the GEMM, bit for bit: whole images and bands of pixels
/// (aligned, ragged, a single line), pixel counts whose 16-pixel vectors leave one over a block of three
/// (49, 13, 4: a first block of four), channel counts off the register blocks (1, 3, 12, 17 outputs),
/// one input channel, and depths past the GEMM's 512-long chunk in both of its chunking rules (a
/// 7 × 7 image with at most 64 outputs, and larger), added to the output or written over it.
#[test]
fn direct_kernel_matches_the_gemm_bit_for_bit() {
    if !direct::applies(&k3(1, 2, 4, 4), 16) {
        eprintln!("no AVX-512: the direct kernel does not run here");
        return;
    }
    let cases: &[(usize, usize, usize, usize, std::ops::Range<usize>)] = &[
        (16, 16, 28, 28, 0..784),
        (32, 32, 14, 14, 0..196),
        (32, 32, 7, 7, 0..49),
        (64, 32, 14, 14, 0..196),
        (64, 32, 7, 7, 0..49),
        (128, 64, 7, 7, 0..49),
        (96, 80, 14, 14, 0..196),
        (1, 16, 28, 28, 0..784),
        (16, 3, 28, 28, 0..784),
        (12, 12, 5, 9, 0..45),
        (5, 17, 3, 2, 0..6),
        (32, 32, 28, 28, 384..784),
        (32, 32, 28, 28, 0..392),
        (32, 32, 7, 7, 24..49),
        (20, 9, 20, 21, 203..420),
        (8, 8, 6, 6, 7..9),
    ];
    for (ci, co, h, w, pixels) in cases.iter().cloned() {
        let g = k3(ci, co, h, w);
        let hw = g.hw();
        let x = flat(&rand(&[ci * hw], 1));
        let wt = flat(&rand(&[co * ci * 9], 2));
        let y0 = flat(&rand(&[co * hw], 3));
        for acc in [true, false] {
            let mut fast = y0.clone();
            // SAFETY: `fast` is `O × H·W`.
            unsafe { direct::conv3x3(g, &wt, &x, fast.as_mut_ptr(), hw, pixels.clone(), acc) };
            let mut slow = y0.clone();
            let n = pixels.len();
            let mut cols = vec![0.0f32; g.rows() * n];
            im2col_pixels(g, &x, &mut cols, pixels.clone());
            // SAFETY: as in `forward_image_alone`.
            unsafe {
                super::super::gemm_strided(
                    co,
                    n,
                    g.rows(),
                    (slow.as_mut_ptr().add(pixels.start), hw as isize, 1),
                    acc,
                    (wt.as_ptr(), g.rows() as isize, 1),
                    (cols.as_ptr(), n as isize, 1),
                )
            };
            same_bits(
                &fast,
                &slow,
                &format!("{ci} → {co} at {h} × {w}, pixels {pixels:?}, acc {acc}"),
            );
        }
    }
}

/// The direct weight gradient against im2col of `G` and the GEMM, bit for bit, at the U-Net's shapes,
/// input channels off the 16-lane vectors (3, 20, 40), one to three vectors of them, output counts off
/// the blocks of three, depths past the GEMM's chunks, added to a partial sum or written over it.
#[test]
fn direct_weight_gradient_matches_the_gemm_bit_for_bit() {
    if !direct::applies_weight_grad(&k3(16, 16, 4, 4)) {
        eprintln!("no AVX-512: the direct kernel does not run here");
        return;
    }
    for (ci, co, h, w) in [
        (16, 16, 28, 28),
        (32, 32, 14, 14),
        (32, 32, 7, 7),
        (64, 32, 14, 14),
        (48, 16, 28, 28),
        (3, 16, 28, 28),
        (20, 7, 9, 13),
        (40, 5, 6, 5),
        (16, 32, 40, 40),
    ] {
        let g = k3(ci, co, h, w);
        let hw = g.hw();
        let x = flat(&rand(&[ci * hw], 1));
        let gi = flat(&rand(&[co * hw], 2));
        let d0 = flat(&rand(&[co * 9 * ci], 3));
        for acc in [true, false] {
            let mut fast = d0.clone();
            let mut scratch = vec![f32::NAN; direct::weight_grad_scratch(&g)];
            direct::weight_grad(g, &x, &gi, &mut scratch, &mut fast, acc);
            let mut slow = d0.clone();
            let mut cols = vec![0.0f32; g.g_rows() * hw];
            im2col(
                Geometry {
                    c_in: co,
                    c_out: ci,
                    ..g
                },
                &gi,
                &mut cols,
            );
            // SAFETY: as in `Backward::image`.
            unsafe {
                super::super::gemm_strided(
                    ci,
                    g.g_rows(),
                    hw,
                    (slow.as_mut_ptr(), 1, ci as isize),
                    acc,
                    (x.as_ptr(), hw as isize, 1),
                    (cols.as_ptr(), 1, hw as isize),
                )
            };
            same_bits(&fast, &slow, &format!("{ci} → {co} at {h} × {w}, acc {acc}"));
        }
    }
}

/// The interleaved row sums are `Iterator::sum`'s, bit for bit, whole blocks of eight rows or not, with
/// a row of negative zeros (whose sum's sign depends on the starting value).
#[test]
fn row_sums_add_in_iterator_order() {
    for (n, len) in [(16, 784), (13, 49), (3, 5), (9, 1)] {
        let mut rows = flat(&rand(&[n * len], 8));
        rows[..len].fill(-0.0);
        let mut got = vec![f32::NAN; n];
        row_sums(&rows, len, |r, s| got[r] = s);
        for (r, g) in got.iter().enumerate() {
            let want: f32 = rows[r * len..(r + 1) * len].iter().sum();
            assert_eq!(g.to_bits(), want.to_bits(), "row {r} of {n} × {len}");
        }
    }
}

#[test]
fn bit_identical_across_thread_counts() {
    for (b, c, o, h) in [(11, 3, 20, 6), (3, 3, 20, 6), (1, 32, 32, 28), (1, 64, 64, 7)] {
        let x = Var::from_tensor(&rand(&[b, c, h, h], 5)).unwrap();
        let wt = Var::from_tensor(&rand(&[o, c, 3, 3], 6)).unwrap();
        let bias = Var::from_tensor(&rand(&[o], 7)).unwrap();
        same_on_1_and_4_threads(|| {
            let y = conv2d(&x, &wt, &bias).unwrap();
            let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            (flat(&y), flat(g.get(&x).unwrap()), flat(g.get(&wt).unwrap()))
        });
    }
}
