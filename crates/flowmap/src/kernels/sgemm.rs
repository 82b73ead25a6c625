//! Single-precision GEMM for the CPU fast path: `C (+)= A·B`, row-major `C`, with an AVX-512 micro-kernel.
//!
//! The layout follows Goto's GEMM (as in BLIS), specialised to flowmap's shapes — a few hundred columns and
//! a few hundred of depth, blocks of up to 256 rows:
//!
//! - `B` (`k × n`) is packed once per product into strips of [`NR`] = 64 columns, each strip `k × 64`
//!   contiguous, aligned to cache lines and zero-padded ([`PackedB`]). A layer packs its weight once per
//!   call and every block of rows reuses it, where the `gemm` crate packs it again for every block (at
//!   width 512 that is a megabyte per block and layer).
//! - `A` is read in place, any strides: the kernel broadcasts one element of each of its [`MR`] = 6 rows
//!   per step. Only a ragged last panel (fewer than 6 rows) is copied, into a zero-padded panel.
//! - The micro-kernel holds a `6 × 64` tile of `C` in 24 of the 32 `zmm` registers and, per step of the
//!   depth, loads four vectors of `B` and broadcasts six scalars of `A` for 24 fused multiply-adds, the
//!   depth loop unrolled by four. Depth is blocked by [`KC`] = 128.
//! - Edges (columns beyond a multiple of 64) use masked loads and stores.
//!
//! Each element of `C` is summed in the same order (depth blocks in order, sequentially within a block)
//! whatever the thread count, so splitting the columns across threads ([`gemm_packed`]'s `split`) gives
//! the same bits as one thread.
//!
//! On a CPU without AVX-512, [`available`] is false and callers use the `gemm` crate instead.

use std::cell::RefCell;

/// Rows of `C` per micro-tile.
pub(crate) const MR: usize = 6;
/// Columns of `C` per micro-tile ([`NV`] 16-lane vectors).
pub(crate) const NR: usize = 16 * NV;
/// Vectors per row of a micro-tile.
const NV: usize = 4;
/// Depth per block: the kernel runs over at most this many steps before adding into `C`.
const KC: usize = 128;

/// Whether this CPU runs the AVX-512 kernel.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| std::is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A strided matrix: `ptr[i·rs + j·cs]` is element `(i, j)`.
#[derive(Clone, Copy)]
pub(crate) struct View {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

// SAFETY: a view is read-only; callers of the unsafe functions that take one vouch for its extent.
unsafe impl Send for View {}
unsafe impl Sync for View {}

impl View {
    /// # Safety
    /// `(i, j)` must lie inside the matrix the view was made for.
    #[inline(always)]
    unsafe fn at(&self, i: usize, j: usize) -> f32 {
        *self.ptr.offset(i as isize * self.rs + j as isize * self.cs)
    }
}

/// `B` (`k × n`) packed into `⌈n / 64⌉` strips, strip `s` holding columns `64s..64s + 64` as `k` rows of 64
/// (zero beyond column `n`).
pub(crate) struct PackedB {
    k: usize,
    n: usize,
    data: Aligned,
}

/// One cache line of floats: the unit of [`Aligned`].
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// A float buffer aligned to cache lines, so that no vector load of a packed strip straddles two lines.
#[derive(Default)]
struct Aligned(Vec<Line>);

impl Aligned {
    /// Resizes to at least `len` floats, all zero, and returns the first `len`.
    fn zeroed(&mut self, len: usize) -> &mut [f32] {
        self.0.clear();
        self.0.resize(len.div_ceil(16), Line([0.0; 16]));
        &mut self.as_mut_slice()[..len]
    }

    fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: `Line` is 16 floats with no padding (repr(C), size 64).
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<f32>(), self.0.len() * 16) }
    }

    fn as_slice(&self) -> &[f32] {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast::<f32>(), self.0.len() * 16) }
    }
}

impl PackedB {
    /// Packs the `k × n` matrix `b`.
    ///
    /// # Safety
    /// Every element `(i, j)`, `i < k`, `j < n`, of `b` must be readable.
    pub(crate) unsafe fn new(k: usize, n: usize, b: View) -> Self {
        let strips = n.div_ceil(NR);
        let mut data = Aligned::default();
        for (s, strip) in data.zeroed(strips * k * NR).chunks_mut(k * NR).enumerate() {
            let (j0, nr) = (s * NR, NR.min(n - s * NR));
            if b.cs == 1 {
                for (p, row) in strip.chunks_mut(NR).enumerate() {
                    let src = std::slice::from_raw_parts(b.ptr.offset(p as isize * b.rs + j0 as isize), nr);
                    row[..nr].copy_from_slice(src);
                }
            } else {
                // Row by row of the strip (contiguous writes); the strip's columns are read along their
                // own stride, each of their cache lines serving several consecutive rows.
                for (p, row) in strip.chunks_mut(NR).enumerate() {
                    for (j, v) in row[..nr].iter_mut().enumerate() {
                        *v = b.at(p, j0 + j);
                    }
                }
            }
        }
        PackedB { k, n, data }
    }

    pub(crate) fn n(&self) -> usize {
        self.n
    }

    fn strip(&self, s: usize) -> *const f32 {
        self.data.as_slice()[s * self.k * NR..].as_ptr()
    }
}

thread_local! {
    /// Each thread's buffer for a ragged last panel of `A`, reused across calls.
    static A_TAIL: RefCell<Aligned> = const { RefCell::new(Aligned(Vec::new())) };
}

/// Copies rows `i0..i0 + mr` (`mr < MR`), depth `0..k`, of `a` into `out` as a full panel (zero rows below),
/// returned as a view.
///
/// # Safety
/// Every element in that range must be readable.
unsafe fn pack_tail(a: View, i0: usize, mr: usize, k: usize, out: &mut Aligned) -> View {
    let panel = out.zeroed(k * MR);
    for p in 0..k {
        for i in 0..mr {
            panel[p * MR + i] = a.at(i0 + i, p);
        }
    }
    View {
        ptr: panel.as_ptr(),
        rs: 1,
        cs: MR as isize,
    }
}

/// A pointer that may cross to the other half of a split product (each half writes its own columns).
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// `C = A·B` (or `C += A·B` with `read_dst`) for `A`: `m × k` (any strides), `B` packed, `C`: `m × n`
/// row-major with row stride `ldc`. With `split`, the strips of columns are shared between two threads of
/// the fast path's pool (when it has two); the result is bitwise the same either way.
///
/// # Safety
/// [`available`] must be true; `a` must address an `m × b.k()` matrix and `c` an `m × b.n()` one with row
/// stride `ldc`, not overlapping `a`.
pub(crate) unsafe fn gemm_packed(m: usize, c: *mut f32, ldc: usize, read_dst: bool, a: View, b: &PackedB, split: bool) {
    let (k, n) = (b.k, b.n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !read_dst {
            for i in 0..m {
                std::slice::from_raw_parts_mut(c.add(i * ldc), n).fill(0.0);
            }
        }
        return;
    }
    let strips = n.div_ceil(NR);
    let (full, tail) = (m / MR, m % MR);
    A_TAIL.with(|buf| {
        let mut buf = buf.borrow_mut();
        // Full panels of A are read in place; a ragged last one is copied into a zero-padded panel.
        let tail_view = (tail > 0).then(|| pack_tail(a, full * MR, tail, k, &mut buf));
        let cp = SendPtr(c);
        let run = |s0: usize, s1: usize| {
            // Whole values, not their raw-pointer fields, are captured (the views are Sync, pointers not).
            let (cp, a) = (cp, a);
            let mut p0 = 0;
            while p0 < k {
                let kc = KC.min(k - p0);
                let acc = read_dst || p0 > 0;
                for s in s0..s1 {
                    let bp = b.strip(s).add(p0 * NR);
                    let nr = NR.min(n - s * NR);
                    for ip in 0..full + usize::from(tail > 0) {
                        let (panel, mr) = match tail_view {
                            Some(t) if ip == full => (t, tail),
                            _ => (
                                View {
                                    ptr: a.ptr.offset((ip * MR) as isize * a.rs),
                                    ..a
                                },
                                MR,
                            ),
                        };
                        let ap = panel.ptr.offset(p0 as isize * panel.cs);
                        let tile = cp.0.add(ip * MR * ldc + s * NR);
                        #[cfg(target_arch = "x86_64")]
                        kernel(kc, ap, panel.rs, panel.cs, bp, tile, ldc, mr, nr, acc);
                    }
                }
                p0 += kc;
            }
        };
        if split && strips >= 2 && super::threads() >= 2 {
            let half = strips / 2;
            rayon::join(|| run(0, half), || run(half, strips));
        } else {
            run(0, strips);
        }
    });
}

/// The `MR × NR` micro-kernel: `C[..mr, ..nr] (+)= Σ_p a[p]·b[p]` over `kc` packed steps.
///
/// # Safety
/// The CPU must have AVX-512F; `a` addresses an `MR × kc` matrix with strides `(rs, cs)`, `b` holds
/// `kc × NR` floats aligned to 64 bytes; `c` addresses `mr ≤ MR` rows of `nr ≤ NR` floats with row stride
/// `ldc`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel(
    kc: usize,
    a: *const f32,
    rs: isize,
    cs: isize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    acc: bool,
) {
    use std::arch::x86_64::*;
    let mut r = [[_mm512_setzero_ps(); NV]; MR];
    // One step of the depth: NV vectors of B, MR broadcasts of A, MR·NV fused multiply-adds.
    macro_rules! step {
        ($a:expr, $b:expr) => {{
            let (a, b) = ($a, $b);
            let mut bv = [_mm512_setzero_ps(); NV];
            for (v, bv) in bv.iter_mut().enumerate() {
                *bv = _mm512_load_ps(b.add(16 * v));
            }
            for (i, ri) in r.iter_mut().enumerate() {
                let ai = _mm512_set1_ps(*a.offset(i as isize * rs));
                for v in 0..NV {
                    ri[v] = _mm512_fmadd_ps(ai, bv[v], ri[v]);
                }
            }
        }};
    }
    let (mut a, mut b) = (a, b);
    for _ in 0..kc / 4 {
        step!(a, b);
        step!(a.offset(cs), b.add(NR));
        step!(a.offset(2 * cs), b.add(2 * NR));
        step!(a.offset(3 * cs), b.add(3 * NR));
        a = a.offset(4 * cs);
        b = b.add(4 * NR);
    }
    for _ in 0..kc % 4 {
        step!(a, b);
        a = a.offset(cs);
        b = b.add(NR);
    }
    let bits = |w: usize| -> __mmask16 {
        if w >= 16 {
            0xffff
        } else {
            ((1u32 << w) - 1) as __mmask16
        }
    };
    let full = nr == NR;
    for (i, ri) in r.iter().enumerate().take(mr) {
        let row = c.add(i * ldc);
        for (v, &rv) in ri.iter().enumerate() {
            let p = row.add(16 * v);
            if full {
                let x = if acc { _mm512_add_ps(rv, _mm512_loadu_ps(p)) } else { rv };
                _mm512_storeu_ps(p, x);
            } else {
                let mask = bits(nr.saturating_sub(16 * v));
                let x = if acc {
                    _mm512_add_ps(rv, _mm512_maskz_loadu_ps(mask, p))
                } else {
                    rv
                };
                _mm512_mask_storeu_ps(p, mask, x);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The f64 reference product of strided views.
    fn reference(m: usize, k: usize, n: usize, a: &[f32], ars: usize, acs: usize, b: &[f32]) -> Vec<f64> {
        let mut c = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * ars + p * acs] as f64 * b[p * n + j] as f64).sum();
            }
        }
        c
    }

    #[test]
    fn matches_an_f64_product_on_every_edge_case_and_is_the_same_split_or_not() {
        if !available() {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        }
        let mut rng = crate::Rng::new(3);
        // Shapes with partial panels (m mod 6), partial strips (n mod 64), depth beyond one block (k > 128),
        // and A read both row-major and transposed.
        for &(m, k, n) in &[
            (1, 1, 1),
            (13, 7, 33),
            (24, 256, 64),
            (37, 300, 70),
            (256, 34, 256),
            (5, 513, 17),
        ] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.normal() as f32).collect();
            let c0: Vec<f32> = (0..m * n).map(|_| rng.normal() as f32).collect();
            let packed = unsafe {
                PackedB::new(
                    k,
                    n,
                    View {
                        ptr: b.as_ptr(),
                        rs: n as isize,
                        cs: 1,
                    },
                )
            };
            let at: Vec<f32> = (0..k * m).map(|idx| a[(idx % m) * k + idx / m]).collect();
            for (transposed, split, read_dst) in [(false, false, false), (true, true, true), (false, true, true)] {
                let view = if transposed {
                    View {
                        ptr: at.as_ptr(),
                        rs: 1,
                        cs: m as isize,
                    }
                } else {
                    View {
                        ptr: a.as_ptr(),
                        rs: k as isize,
                        cs: 1,
                    }
                };
                let mut c = c0.clone();
                unsafe { gemm_packed(m, c.as_mut_ptr(), n, read_dst, view, &packed, split) };
                let want = reference(m, k, n, &a, k, 1, &b);
                for idx in 0..m * n {
                    let expect = want[idx] + if read_dst { c0[idx] as f64 } else { 0.0 };
                    let tol = 1e-5 * (k as f64).sqrt() * 4.0;
                    assert!(
                        (c[idx] as f64 - expect).abs() <= tol,
                        "{m}×{k}×{n} (transposed {transposed}): element {idx} is {} not {expect}",
                        c[idx]
                    );
                }
            }
            // Split or not, the same bits.
            let (mut one, mut two) = (vec![0.0f32; m * n], vec![0.0f32; m * n]);
            let view = View {
                ptr: a.as_ptr(),
                rs: k as isize,
                cs: 1,
            };
            unsafe {
                gemm_packed(m, one.as_mut_ptr(), n, false, view, &packed, false);
                gemm_packed(m, two.as_mut_ptr(), n, false, view, &packed, true);
            }
            assert!(one.iter().zip(&two).all(|(x, y)| x.to_bits() == y.to_bits()));
        }
    }
}
