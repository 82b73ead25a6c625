//! Matrix products with bf16 operands and f32 accumulation, on AVX-512 BF16 (`vdpbf16ps`).
//!
//! `dst (+)= lhs · rhs` as the fast path's other products ([`super::gemm_strided`]), but each operand is
//! first rounded to bf16 (round to nearest even, as `vcvtneps2bf16`; subnormals flushed to zero, as the
//! instruction does) and each `vdpbf16ps` adds two products per lane into an f32 accumulator. Both operands
//! are packed so that one 32-bit lane holds two consecutive elements along `k`:
//!
//! - `rhs` (`k × n`) into panels of [`NR`] columns, `[k/2][NR]` pairs, once per product;
//! - `lhs` (`m × k`) into blocks of [`MR`] rows, `[k/2][MR]` pairs, each reused across every panel.
//!
//! The micro-kernel keeps an `MR × NR` tile in 24 zmm registers and, per pair of `k`, loads two panel
//! vectors and broadcasts each row's pair from memory. A product sums over `k` in one fixed order whatever
//! the strides and the thread count, so its bits are reproducible; they differ from the f32 product's by the
//! operands' rounding (relative 2⁻⁸ at most per operand).
//!
//! [`available`] says whether this CPU has the instructions; elsewhere [`super::gemm_strided`] keeps f32.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::scratch::Scratch;

/// Rows of an `lhs` block (the tile's height).
const MR: usize = 12;
/// Columns of an `rhs` panel (the tile's width: two zmm registers of 16 f32).
const NR: usize = 32;
/// Depth of a block of `k` (even, so that no pair straddles two blocks): the packed panels of a block stay
/// in the L2 cache (`KC/2 × n` lanes, 256 KB at n = 256), and the partial sums of the blocks are added to
/// the destination in order.
const KC: usize = 512;

/// Whether this CPU runs the bf16 products (AVX-512F and AVX-512 BF16).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `x` rounded to bf16, its 16 bits: round to nearest even, a subnormal to a zero of its sign, a NaN to a
/// quiet NaN (what `vcvtneps2bf16` does).
pub(crate) fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    if b & 0x7f80_0000 == 0 {
        return ((b >> 16) & 0x8000) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// The f32 value of a bf16's bits.
#[cfg(test)]
pub(crate) fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// The lane of two bf16 along `k`: `lo` in the low half (the first of the pair).
fn pair(lo: f32, hi: f32) -> u32 {
    to_bf16(lo) as u32 | (to_bf16(hi) as u32) << 16
}

/// A strided f32 matrix: `(pointer, row stride, column stride)`, as [`super::gemm_strided`] takes them.
type Strided = (*const f32, isize, isize);

/// Element `(i, j)` of a strided matrix.
///
/// # Safety
/// `(i, j)` lies inside the matrix.
#[cfg(test)]
unsafe fn at(a: Strided, i: usize, j: usize) -> f32 {
    *a.0.offset(i as isize * a.1 + j as isize * a.2)
}

/// `dst (+)= lhs · rhs` with bf16 operands and f32 sums (`m × k` times `k × n`; strides as
/// [`super::gemm_strided`]). Single-threaded, as the fast path's other products: its callers split the work.
///
/// # Safety
/// As [`super::gemm_strided`]; and [`available`] is true.
pub(crate) unsafe fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: (*mut f32, isize, isize),
    read_dst: bool,
    lhs: Strided,
    rhs: Strided,
) {
    debug_assert!(available());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !read_dst {
            for i in 0..m {
                for j in 0..n {
                    *dst.0.offset(i as isize * dst.1 + j as isize * dst.2) = 0.0;
                }
            }
        }
        return;
    }
    let panels = n.div_ceil(NR);
    let kp_max = KC.min(k).div_ceil(2);
    let (mut b_buf, mut a_buf) = (Scratch::new(panels * kp_max * NR), Scratch::new(kp_max * MR));
    let (b, a) = (lanes(&mut b_buf), lanes(&mut a_buf));
    let mut tile = [0f32; MR * NR];
    for k0 in (0..k).step_by(KC) {
        let kl = KC.min(k - k0);
        let kp = kl.div_ceil(2);
        let (lhs, rhs) = (
            (lhs.0.offset(k0 as isize * lhs.2), lhs.1, lhs.2),
            (rhs.0.offset(k0 as isize * rhs.1), rhs.1, rhs.2),
        );
        let b = &mut b[..panels * kp * NR];
        pack_rhs(rhs, kl, n, b);
        let a = &mut a[..kp * MR];
        // The first block of `k` writes (or adds to) `dst`, the others add their partial sums.
        let add = read_dst || k0 > 0;
        for i0 in (0..m).step_by(MR) {
            let rows = MR.min(m - i0);
            pack_lhs(lhs, i0, rows, kl, a);
            for (pj, panel) in b.chunks_exact(kp * NR).enumerate() {
                let j0 = pj * NR;
                let cols = NR.min(n - j0);
                tile_kernel(kp, a.as_ptr(), panel.as_ptr(), &mut tile);
                let d = dst.0.offset(i0 as isize * dst.1 + j0 as isize * dst.2);
                if dst.2 == 1 {
                    store_rows(&tile, d, dst.1, rows, cols, add);
                } else {
                    for (i, row) in tile.chunks_exact(NR).take(rows).enumerate() {
                        for (j, &v) in row[..cols].iter().enumerate() {
                            let p = d.offset(i as isize * dst.1 + j as isize * dst.2);
                            *p = if add { *p + v } else { v };
                        }
                    }
                }
            }
        }
    }
}

/// A scratch buffer's floats as the 32-bit lanes of bf16 pairs (every element is written before it is
/// read, as the scratch contract asks).
fn lanes(s: &mut Scratch) -> &mut [u32] {
    // SAFETY: f32 and u32 have one size and alignment, and every bit pattern is a valid u32.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<u32>(), s.len()) }
}

/// `rhs` (`k × n`) as panels of [`NR`] columns, each `[⌈k/2⌉][NR]` pairs; columns and a `k` past the end
/// are zeros.
unsafe fn pack_rhs(rhs: Strided, k: usize, n: usize, out: &mut [u32]) {
    let kp = k.div_ceil(2);
    for (pj, panel) in out.chunks_exact_mut(kp * NR).enumerate() {
        let j0 = pj * NR;
        let src = rhs.0.offset(j0 as isize * rhs.2);
        pack(src, rhs.2, rhs.1, NR.min(n - j0), NR, k, panel);
    }
}

/// Rows `i0..i0 + rows` of `lhs` (`m × k`) as `[⌈k/2⌉][MR]` pairs; rows past `rows` are zeros.
unsafe fn pack_lhs(lhs: Strided, i0: usize, rows: usize, k: usize, out: &mut [u32]) {
    pack(lhs.0.offset(i0 as isize * lhs.1), lhs.1, lhs.2, rows, MR, k, out);
}

/// The pairs of `count` lines of a matrix (line `x`, element `q` along `k` at `src + x·x_stride +
/// q·k_stride`) as `[⌈k/2⌉][width]` lanes, lines `count..width` zeros. Lines stored along `k` and lines
/// stored side by side each have a vector route; any other layout is converted element by element, to the
/// same bits.
unsafe fn pack(
    src: *const f32,
    x_stride: isize,
    k_stride: isize,
    count: usize,
    width: usize,
    k: usize,
    out: &mut [u32],
) {
    debug_assert!(count <= width && width <= 32);
    if count == 0 {
        out.fill(0);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if k_stride == 1 {
        return pack_along(src, x_stride, count, width, k, out);
    } else if x_stride == 1 {
        return pack_across(src, k_stride, count, width, k, out);
    }
    let el = |x: usize, q: usize| *src.offset(x as isize * x_stride + q as isize * k_stride);
    for (p, lanes) in out.chunks_exact_mut(width).enumerate() {
        for (x, lane) in lanes.iter_mut().enumerate() {
            *lane = if x < count {
                pair(el(x, 2 * p), if 2 * p + 1 < k { el(x, 2 * p + 1) } else { 0.0 })
            } else {
                0
            };
        }
    }
}

/// [`pack`] for lines stored along `k`: 32 elements of a line at a time become its next 16 pairs by one
/// `vcvtne2ps2bf16`, spread into the line's slot of each pair.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pack_along(src: *const f32, x_stride: isize, count: usize, width: usize, k: usize, out: &mut [u32]) {
    let kp = k.div_ceil(2);
    let mut lanes = [0u32; 16];
    for x in 0..width {
        if x >= count {
            for p in 0..kp {
                *out.get_unchecked_mut(p * width + x) = 0;
            }
            continue;
        }
        let line = src.offset(x as isize * x_stride);
        for p0 in (0..kp).step_by(16) {
            let n = (k - 2 * p0).min(32);
            // Masked lanes are neither read nor faulted on, so the pointers may run past the line.
            let lo = _mm512_maskz_loadu_ps(mask16(n), line.wrapping_add(2 * p0));
            let hi = _mm512_maskz_loadu_ps(mask16(n.saturating_sub(16)), line.wrapping_add(2 * p0 + 16));
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(lanes.as_mut_ptr().cast(), v);
            for (q, &lane) in lanes.iter().enumerate().take((kp - p0).min(16)) {
                *out.get_unchecked_mut((p0 + q) * width + x) = lane;
            }
        }
    }
}

/// [`pack`] for lines stored side by side (`x_stride = 1`): each pair is two runs of `count` contiguous
/// elements (`k` rows `2p` and `2p + 1`), converted 16 at a time and interleaved into one contiguous run of
/// lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pack_across(src: *const f32, k_stride: isize, count: usize, width: usize, k: usize, out: &mut [u32]) {
    for (p, lanes) in out.chunks_exact_mut(width).enumerate() {
        let r0 = src.offset(2 * p as isize * k_stride);
        let has_r1 = 2 * p + 1 < k;
        for x0 in (0..width).step_by(16) {
            let m = mask16(count.saturating_sub(x0));
            let lo = _mm512_maskz_loadu_ps(m, r0.wrapping_add(x0));
            let hi = if has_r1 {
                _mm512_maskz_loadu_ps(m, r0.wrapping_offset(k_stride).wrapping_add(x0))
            } else {
                _mm512_setzero_ps()
            };
            let lo: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(lo));
            let hi: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(hi));
            let v = _mm512_or_si512(
                _mm512_cvtepu16_epi32(lo),
                _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(hi)),
            );
            let w = (width - x0).min(16);
            _mm512_mask_storeu_epi32(lanes.as_mut_ptr().add(x0).cast(), mask16(w), v);
        }
    }
}

/// The mask of the first `n` (at most 16) lanes.
#[cfg(target_arch = "x86_64")]
fn mask16(n: usize) -> __mmask16 {
    if n >= 16 {
        0xffff
    } else {
        ((1u32 << n) - 1) as __mmask16
    }
}

/// The first `rows × cols` of `tile` written to (or, with `add`, added to) a destination whose rows are
/// contiguous, `row_stride` apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn store_rows(tile: &[f32; MR * NR], d: *mut f32, row_stride: isize, rows: usize, cols: usize, add: bool) {
    let (m0, m1) = (mask16(cols), mask16(cols.saturating_sub(16)));
    for i in 0..rows {
        let p = d.offset(i as isize * row_stride);
        for (half, m) in [(0, m0), (16, m1)] {
            if m == 0 {
                continue;
            }
            let mut v = _mm512_loadu_ps(tile.as_ptr().add(i * NR + half));
            if add {
                v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, p.add(half)));
            }
            _mm512_mask_storeu_ps(p.add(half), m, v);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn store_rows(_: &[f32; MR * NR], _: *mut f32, _: isize, _: usize, _: usize, _: bool) {
    unreachable!("bf16 products run only where `available`")
}

/// `tile = a · b` over `kp` pairs: `a` is `[kp][MR]`, `b` `[kp][NR]`, `tile` `MR × NR` row-major.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile_kernel(kp: usize, a: *const u32, b: *const u32, tile: &mut [f32; MR * NR]) {
    let mut c = [[_mm512_setzero_ps(); 2]; MR];
    for p in 0..kp {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR).cast()));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16).cast()));
        let ap = a.add(p * MR);
        for (i, ci) in c.iter_mut().enumerate() {
            let ai: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(i) as i32));
            ci[0] = _mm512_dpbf16_ps(ci[0], ai, b0);
            ci[1] = _mm512_dpbf16_ps(ci[1], ai, b1);
        }
    }
    for (i, ci) in c.iter().enumerate() {
        _mm512_storeu_ps(tile.as_mut_ptr().add(i * NR), ci[0]);
        _mm512_storeu_ps(tile.as_mut_ptr().add(i * NR + 16), ci[1]);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile_kernel(_: usize, _: *const u32, _: *const u32, _: &mut [f32; MR * NR]) {
    unreachable!("bf16 products run only where `available`")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// The product of the operands rounded to bf16, summed in f64: what the kernel computes but for the
    /// order and precision of its f32 sums.
    fn reference(m: usize, n: usize, k: usize, a: Strided, b: Strided) -> Vec<f64> {
        let r = |x: f32| from_bf16(to_bf16(x)) as f64;
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|q| unsafe { r(at(a, i, q)) * r(at(b, q, j)) }).sum();
            }
        }
        out
    }

    #[test]
    fn rounding_matches_the_instruction_definition() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2⁻⁸ lies halfway between two bf16 and goes to the even one (1.0); 1 + 3·2⁻⁸ goes up.
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(to_bf16(-2.5), 0xc020);
        assert_eq!(to_bf16(f32::from_bits(1)), 0);
        assert_eq!(to_bf16(-f32::from_bits(1)), 0x8000);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
        assert_eq!(from_bf16(to_bf16(f32::MAX)), f32::INFINITY);
    }

    /// Every layout the fast path uses (row- and column-major operands and destinations), ragged edges in
    /// `m`, `n` and an odd `k`, with and without accumulation: within f32 summation error of the bf16
    /// operands' exact product, and the same bits whichever layout the operands came in.
    #[test]
    fn products_match_the_rounded_reference_in_every_layout() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        let mut rng = Rng::new(7);
        for &(m, n, k) in &[
            (1, 1, 1),
            (13, 33, 7),
            (12, 32, 64),
            (50, 70, 129),
            (25, 3, 300),
            (14, 40, 1100),
            (3, 5, 0),
        ] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.normal() as f32).collect();
            let (at_, bt) = (transpose(&a, m, k), transpose(&b, k, n));
            let want = reference(m, n, k, (a.as_ptr(), k as isize, 1), (b.as_ptr(), n as isize, 1));
            let scale: Vec<f64> = reference_abs(m, n, k, &a, &b);
            // Every other element of a buffer twice as long: the element-by-element route.
            let (a2, b2) = (spaced(&a), spaced(&b));
            let mut first: Option<Vec<f32>> = None;
            for (lhs, rhs) in [
                ((a.as_ptr(), k as isize, 1), (b.as_ptr(), n as isize, 1)),
                ((at_.as_ptr(), 1, m as isize), (bt.as_ptr(), 1, k as isize)),
                ((a2.as_ptr(), 2 * k as isize, 2), (b2.as_ptr(), 2 * n as isize, 2)),
            ] {
                for col_major in [false, true] {
                    let mut got = vec![0.5f32; m * n];
                    let d = if col_major { (1, m as isize) } else { (n as isize, 1) };
                    unsafe { gemm(m, n, k, (got.as_mut_ptr(), d.0, d.1), true, lhs, rhs) };
                    let got: Vec<f32> = (0..m * n)
                        .map(|e| {
                            let (i, j) = (e / n, e % n);
                            got[(i as isize * d.0 + j as isize * d.1) as usize] - 0.5
                        })
                        .collect();
                    for e in 0..m * n {
                        let err = (got[e] as f64 - want[e]).abs();
                        assert!(err <= 1e-6 * (scale[e] + 1.0), "{m}×{n}×{k}: {} vs {}", got[e], want[e]);
                    }
                    let mut fresh = vec![9.0f32; m * n];
                    unsafe { gemm(m, n, k, (fresh.as_mut_ptr(), n as isize, 1), false, lhs, rhs) };
                    match &first {
                        None => first = Some(fresh),
                        Some(f) => assert_eq!(f, &fresh, "{m}×{n}×{k}: the layout changed the bits"),
                    }
                }
            }
        }
    }

    fn spaced(a: &[f32]) -> Vec<f32> {
        a.iter().flat_map(|&x| [x, f32::NAN]).collect()
    }

    fn transpose(a: &[f32], r: usize, c: usize) -> Vec<f32> {
        (0..r * c).map(|e| a[(e % r) * c + e / r]).collect()
    }

    fn reference_abs(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f64> {
        let abs = |v: &[f32]| v.iter().map(|x| x.abs()).collect::<Vec<_>>();
        let (a, b) = (abs(a), abs(b));
        reference(m, n, k, (a.as_ptr(), k as isize, 1), (b.as_ptr(), n as isize, 1))
    }
}

#[cfg(test)]
mod timing_scratch {
    #[test]
    #[ignore]
    fn time_it() {
        use super::super::{gemm_strided, with_precision, Precision};
        for &(m, n, k) in &[
            (4096usize, 256usize, 256usize),
            (25088, 64, 576),
            (576, 64, 25088),
            (784, 64, 576),
        ] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 13) as f32 * 0.1).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 5) % 11) as f32 * 0.1).collect();
            let mut c = vec![0f32; m * n];
            for p in [Precision::F32, Precision::Bf16, Precision::F32, Precision::Bf16] {
                with_precision(p, || {
                    let t = std::time::Instant::now();
                    let reps = 5;
                    for _ in 0..reps {
                        unsafe {
                            gemm_strided(
                                m,
                                n,
                                k,
                                (c.as_mut_ptr(), n as isize, 1),
                                false,
                                (a.as_ptr(), k as isize, 1),
                                (b.as_ptr(), n as isize, 1),
                            )
                        };
                    }
                    let s = t.elapsed().as_secs_f64() / reps as f64;
                    eprintln!(
                        "{m}x{n}x{k} {p}: {:.2} ms, {:.1} GFLOP/s",
                        s * 1e3,
                        2.0 * (m * n * k) as f64 / s / 1e9
                    );
                });
            }
        }
    }
}
