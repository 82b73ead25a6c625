use super::*;

#[test]
fn transpose_is_the_transpose_on_tiled_and_ragged_shapes() {
    for (rows, cols) in [(1, 1), (8, 8), (3, 17), (16, 24), (13, 21), (256, 66), (66, 256)] {
        let a: Vec<f32> = (0..rows * cols).map(|i| i as f32 * 0.5 - 3.0).collect();
        let t = transpose(&a, rows, cols);
        for r in 0..rows {
            for c in 0..cols {
                assert_eq!(
                    t[c * rows + r].to_bits(),
                    a[r * cols + c].to_bits(),
                    "{rows}×{cols} at ({r}, {c})"
                );
            }
        }
    }
}

#[test]
fn exp_is_within_two_ulp_of_libm_on_the_range_silu_uses() {
    let mut worst = 0.0f64;
    let mut x = -87.0f32;
    while x < 88.0 {
        let (a, b) = (exp(x) as f64, (x as f64).exp());
        worst = worst.max(((a - b) / b).abs());
        x += 0.0137;
    }
    // 2 ulp of f32 is 2·2⁻²³ ≈ 2.4e-7 relative.
    assert!(worst < 2.4e-7, "worst relative error {worst:e}");
}

#[test]
fn sin_cos_match_libm_over_the_embedding_range() {
    let mut worst = 0.0f64;
    let mut x = -70.0f32;
    while x < 70.0 {
        let (s, c) = sin_cos(x);
        let xd = x as f64;
        worst = worst.max((s as f64 - xd.sin()).abs()).max((c as f64 - xd.cos()).abs());
        x += 0.00731;
    }
    assert!(worst < 1e-6, "worst absolute error {worst:e}");
}

#[test]
fn silu_backward_matches_the_derivative() {
    let a: Vec<f32> = (0..64).map(|i| (i as f32 - 32.0) * 0.37).collect();
    let g: Vec<f32> = (0..64).map(|i| 1.0 + 0.01 * i as f32).collect();
    let (mut s, mut y) = (a.clone(), vec![MaybeUninit::uninit(); 64]);
    add_bias_silu(&mut s, &mut y, &[0.0; 8]);
    let y: Vec<f32> = y.iter().map(|v| unsafe { v.assume_init() }).collect();
    let mut cs = vec![0.0f32; 8];
    silu_backward(&mut s, &y, &g, &mut cs);
    let silu = |x: f64| x / (1.0 + (-x).exp());
    for i in 0..64 {
        let x = a[i] as f64;
        assert!((y[i] as f64 - silu(x)).abs() < 1e-6 * (1.0 + x.abs()));
        let h = 1e-5;
        let fd = (silu(x + h) - silu(x - h)) / (2.0 * h) * g[i] as f64;
        assert!(
            (s[i] as f64 - fd).abs() < 1e-5 * (1.0 + fd.abs()),
            "at {x}: {} vs {fd}",
            s[i]
        );
    }
    let expect: f32 = (0..8).map(|r| s[r * 8 + 3]).sum();
    assert!((cs[3] - expect).abs() < 1e-5);
}
