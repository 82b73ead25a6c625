//! The 3×3 convolution read straight from its operands, without an im2col matrix: the AVX-512 route of the
//! convolution's forward product and of both its gradients.
//!
//! The im2col route copies each image nine times over (`I·9 × H·W` floats) and then has the GEMM pack that
//! matrix again wherever its pixel count is not a multiple of 16 (the 14 × 14 and 7 × 7 levels); in a
//! 16-channel U-Net training step at batch 128 the copies were 10% of the cycles and the packing 6%. Here:
//! - the forward product (and the input gradient, the same product of the output gradient with the flipped
//!   kernel): a register block of 3 × 16 output pixels and up to 8 output channels reads its inputs at the
//!   nine shifts of the image with masked loads (a mask zeroes the lanes whose source pixel is off the
//!   image, and the lanes past the range), multiplies them by the broadcast weights, and adds into the
//!   output once;
//! - the weight gradient: 16 to 48 input channels in the lanes (the input transposed to pixel-major rows)
//!   times one to three output channels' nine taps broadcast from a copy of the output gradient with a
//!   zero border, pixel after pixel.
//!
//! The arithmetic is the GEMM's to the bit: each output is its sum (over `(c, ky, kx)`, or over pixels) in
//! the GEMM's order, one fused multiply-add at a time from zero, in the depth chunks the `gemm` crate uses
//! for the same product ([`depth_chunk`]), each chunk's sum added to the output in turn. So the two routes
//! (a CPU without AVX-512 takes im2col) give the same results, and the tests check it bit for bit.

use std::cell::RefCell;
use std::ops::Range;

use super::geometry::Geometry;

/// Output channels per register block (8 × 3 accumulators of 16 lanes, plus the three input vectors).
const CHANNELS: usize = 8;
/// Vectors of 16 output pixels per register block.
const VECTORS: usize = 3;
/// Output channels per register block of four vectors (6 × 4 accumulators, plus the four input vectors).
const WIDE_CHANNELS: usize = 6;

/// Whether the direct kernel computes `g`'s product over `pixels` on this CPU: a 3×3 kernel, at least two
/// output channels and two pixels (the GEMM takes other routes, with another summation order, for a single
/// output column or pixel), and AVX-512.
pub(super) fn applies(g: &Geometry, pixels: usize) -> bool {
    g.k == 3 && g.c_out >= 2 && pixels >= 2 && avx512()
}

/// The direct kernels sum in f32; under bf16 products ([`super::Precision`]) convolutions take im2col and
/// the bf16 GEMM instead.
fn avx512() -> bool {
    if super::precision() != super::Precision::F32 {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The depth (`k`) chunk the `gemm` crate uses for a product `dst (m × n) = lhs (m × k) · rhs (k × n)`
/// whose destination is column-major (as ours are, once it transposes a row-major one): sums over
/// `kc`-long runs of `k`, each added to the destination in turn. Its AVX-512 f32 micro-kernel is 64 × 6.
fn depth_chunk(m: usize, n: usize, k: usize) -> usize {
    if m <= 64 && n <= 64 {
        k.min(512)
    } else {
        gemm_common::cache::kernel_params(m, n, k, 64, 6, std::mem::size_of::<f32>()).kc
    }
}

/// `0..n` cut into consecutive runs of `size`, the last one shorter: register blocks and depth chunks.
fn runs(n: usize, size: usize) -> impl Iterator<Item = Range<usize>> {
    (0..n).step_by(size).map(move |a| a..(a + size).min(n))
}

/// `n` vectors of pixels cut into register blocks of [`VECTORS`], except that where that would leave one
/// vector alone at the end (28 × 28: 49 vectors, 14 × 14: 13, 7 × 7: 4) the first block takes four. A lone
/// vector's block does eight multiply-adds per vector load and eight weight loads. The 64-channel forward
/// products at batch 128 went 9.8 → 9.5 ms at 14 × 14 and 2.6 → 2.4 ms at 7 × 7 (`flowmap-cli/examples/conv_probe --
/// 128 10 32 1`, four alternating runs of each binary). The blocks' shapes do not touch the arithmetic:
/// each output is still its own sum in the same order.
fn vector_runs(n: usize) -> impl Iterator<Item = Range<usize>> {
    let first = if n >= 4 && n % VECTORS == 1 { 4 } else { n.min(VECTORS) };
    std::iter::once(0..first).chain(runs(n - first, VECTORS).map(move |r| r.start + first..r.end + first))
}

/// `y[o, p] (+)= Σ_{c, ky, kx} w[o, c, ky, kx] · x[c, p + (ky − 1)·W + kx − 1]` (zero off the image) for
/// the output pixels `p` in `pixels` of one image: `x` is `I × H·W`, `w` is `O × I·9`, and `y` points at
/// pixel 0 of output channel 0 with channel stride `y_cs`. With `acc` the products are added to `y`, else
/// they overwrite it; either way `y` is read or written only at `pixels` of its `O` channels.
///
/// Bit-identical to `im2col` of those pixels followed by the GEMM `y (+)= w · cols`.
///
/// # Safety
/// [`applies`] holds for `g` and `pixels`, `pixels` lies in `0..H·W`, `w` and `x` hold at least `O·I·9`
/// and `I·H·W` floats, and `y` is valid for reads and writes at `y + o·y_cs + p` for every output channel
/// `o` and pixel `p` in `pixels`.
pub(super) unsafe fn conv3x3(
    g: Geometry,
    w: &[f32],
    x: &[f32],
    y: *mut f32,
    y_cs: usize,
    pixels: Range<usize>,
    acc: bool,
) {
    let hw = g.hw();
    let k = g.rows();
    debug_assert!(applies(&g, pixels.len()) && pixels.end <= hw);
    debug_assert!(w.len() >= g.c_out * k && x.len() >= g.c_in * hw);
    let kc = depth_chunk(pixels.len(), g.c_out, k);
    MASKS.with(|m| {
        let mut cache = m.borrow_mut();
        let masks = cache.get(g.h, g.w, pixels.clone());
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `applies` checked AVX-512; the caller vouches for `y`.
        unsafe {
            avx512::conv(g, w, x, y, y_cs, pixels, acc, kc, masks)
        };
    });
}

/// Whether [`weight_grad`] computes `g`'s weight gradient on this CPU: a 3×3 kernel, at least two input
/// channels and three pixels, a product of more than 256 outputs (the GEMM takes other routes below
/// those), and AVX-512.
pub(super) fn applies_weight_grad(g: &Geometry) -> bool {
    g.k == 3 && g.c_in >= 2 && g.hw() >= 3 && g.c_in * g.c_out * 9 > 256 && avx512()
}

/// Floats of scratch memory [`weight_grad`] takes: the output gradient padded by a zero border
/// (`O × (H+2)·(W+2)`) and the input transposed to pixel-major rows of `I` rounded up to 16.
pub(super) fn weight_grad_scratch(g: &Geometry) -> usize {
    g.c_out * (g.h + 2) * (g.w + 2) + g.hw() * g.c_in.next_multiple_of(16)
}

/// `D[(o, ky, kx), c] (+)= Σ_p G[o, p + (ky − 1)·W + kx − 1] · x[c, p]` (zero off the image) for one image:
/// `x` is `I × H·W`, `gi` the output gradient `O × H·W`, `d` the `O·9 × I` matrix stored column-major
/// (`d[j·I + c]`), added to when `acc`. `scratch` holds [`weight_grad_scratch`] floats (overwritten).
///
/// Bit-identical to the GEMM `D (+)= cols_G · xᵀ` over `im2col(G)`: per output, the sum over pixels in
/// order from zero in the GEMM's depth chunks, the shifts past the image multiplying a stored `+0`.
pub(super) fn weight_grad(g: Geometry, x: &[f32], gi: &[f32], scratch: &mut [f32], d: &mut [f32], acc: bool) {
    assert!(applies_weight_grad(&g));
    let (hw, o, c_in) = (g.hw(), g.c_out, g.c_in);
    assert!(x.len() >= c_in * hw && gi.len() >= o * hw && d.len() >= o * 9 * c_in);
    let (wp, lp, cs) = (g.w + 2, (g.h + 2) * (g.w + 2), c_in.next_multiple_of(16));
    let (gpad, rest) = scratch.split_at_mut(o * lp);
    let xt = &mut rest[..hw * cs];
    for (dst, src) in gpad.chunks_mut(lp).zip(gi.chunks(hw)) {
        dst[..wp].fill(0.0);
        dst[lp - wp..].fill(0.0);
        for (line, row) in dst[wp..lp - wp].chunks_mut(wp).zip(src.chunks(g.w)) {
            line[0] = 0.0;
            line[1..=g.w].copy_from_slice(row);
            line[wp - 1] = 0.0;
        }
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `applies_weight_grad` checked AVX-512; `x` is `I × H·W` and `xt` `H·W × cs`.
    unsafe {
        avx512::transpose(&x[..c_in * hw], c_in, hw, xt)
    };
    let kc = depth_chunk(c_in, o * 9, hw);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `applies_weight_grad` checked AVX-512; the buffers have the sizes asserted above.
    unsafe {
        avx512::weight_grad(g, gpad, xt, d, acc, kc)
    };
}

/// Per vector of 16 output pixels, for each of the nine taps `(ky, kx)`, the lanes whose source pixel is
/// on the image (and whose output pixel is in the range), as a 16-bit mask.
struct MaskCache {
    entries: Vec<(MaskKey, Vec<u16>)>,
}

/// An image's height and width, and the pixel range.
type MaskKey = (usize, usize, Range<usize>);

thread_local! {
    static MASKS: RefCell<MaskCache> = const { RefCell::new(MaskCache { entries: Vec::new() }) };
}

impl MaskCache {
    /// The masks of the `h × w` image's pixels `pixels`, computed once per thread.
    fn get(&mut self, h: usize, w: usize, pixels: Range<usize>) -> &[u16] {
        let key = (h, w, pixels.clone());
        let i = match self.entries.iter().position(|e| e.0 == key) {
            Some(i) => i,
            None => {
                if self.entries.len() == 32 {
                    self.entries.clear();
                }
                self.entries.push((key, masks(h, w, pixels)));
                self.entries.len() - 1
            }
        };
        &self.entries[i].1
    }
}

fn masks(h: usize, w: usize, pixels: Range<usize>) -> Vec<u16> {
    let vectors = pixels.len().div_ceil(16);
    let mut out = vec![0u16; vectors * 9];
    for v in 0..vectors {
        for lane in 0..16 {
            let p = pixels.start + 16 * v + lane;
            if p >= pixels.end {
                break;
            }
            let (r, c) = ((p / w) as isize, (p % w) as isize);
            for tap in 0..9 {
                let (dy, dx) = ((tap / 3) as isize - 1, (tap % 3) as isize - 1);
                let (sr, sc) = (r + dy, c + dx);
                if (0..h as isize).contains(&sr) && (0..w as isize).contains(&sc) {
                    out[v * 9 + tap] |= 1 << lane;
                }
            }
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{runs, vector_runs, Geometry, CHANNELS, WIDE_CHANNELS};

    /// The whole product, register block by register block: pixel blocks of three or four vectors
    /// ([`vector_runs`]), each through every block of [`CHANNELS`] (four vectors: [`WIDE_CHANNELS`]) output
    /// channels (the last one narrower), each through the depth chunks.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn conv(
        g: Geometry,
        w: &[f32],
        x: &[f32],
        y: *mut f32,
        y_cs: usize,
        pixels: Range<usize>,
        acc: bool,
        kc: usize,
        masks: &[u16],
    ) {
        let (hw, k, o) = (g.hw(), g.rows(), g.c_out);
        // Tap `(ky, kx)` reads pixel `p + (ky − 1)·W + kx − 1`.
        let mut shifts = [0isize; 9];
        for (t, s) in shifts.iter_mut().enumerate() {
            *s = ((t / 3) as isize - 1) * g.w as isize + (t % 3) as isize - 1;
        }
        for vs in vector_runs(pixels.len().div_ceil(16)) {
            let channels = if vs.len() == 4 { WIDE_CHANNELS } else { CHANNELS };
            for os in runs(o, channels) {
                let block = Block {
                    x: x.as_ptr(),
                    hw,
                    w: w.as_ptr().add(os.start * k),
                    k,
                    y: y.add(os.start * y_cs),
                    y_cs,
                    p0: pixels.start + 16 * vs.start,
                    masks: masks.as_ptr().add(9 * vs.start),
                    shifts: &shifts,
                };
                for depth in runs(k, kc) {
                    let acc = acc || depth.start > 0;
                    dispatch(&block, vs.len(), os.len(), depth, acc);
                }
            }
        }
    }

    /// One register block's operands: `nv` vectors of pixels from `p0`, `no` output channels from the
    /// block's first (`w` and `y` already offset to it).
    struct Block<'a> {
        x: *const f32,
        hw: usize,
        w: *const f32,
        k: usize,
        y: *mut f32,
        y_cs: usize,
        p0: usize,
        masks: *const u16,
        shifts: &'a [isize; 9],
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn dispatch(b: &Block<'_>, nv: usize, no: usize, depth: Range<usize>, acc: bool) {
        macro_rules! by_channels {
            ($nv:literal, $($no:literal),*; $last:literal) => {
                match no {
                    $($no => block::<$nv, $no>(b, depth, acc),)*
                    _ => block::<$nv, $last>(b, depth, acc),
                }
            };
        }
        match nv {
            1 => by_channels!(1, 1, 2, 3, 4, 5, 6, 7; 8),
            2 => by_channels!(2, 1, 2, 3, 4, 5, 6, 7; 8),
            3 => by_channels!(3, 1, 2, 3, 4, 5, 6, 7; 8),
            _ => by_channels!(4, 1, 2, 3, 4, 5; 6),
        }
    }

    /// `NV × NO` accumulators from zero over the depth range (`(c, tap)` = `(d / 9, d mod 9)`), then added
    /// to (`acc`) or written over the output, lanes past the pixel range left alone.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn block<const NV: usize, const NO: usize>(b: &Block<'_>, depth: Range<usize>, acc: bool) {
        let mut sum = [[_mm512_setzero_ps(); NV]; NO];
        let mut d = depth.start;
        while d < depth.end {
            let (c, t0) = (d / 9, d % 9);
            let t1 = (t0 + depth.end - d).min(9);
            let xc = b.x.wrapping_add(c * b.hw + b.p0);
            for t in t0..t1 {
                let src = xc.wrapping_offset(b.shifts[t]);
                let mut xv = [_mm512_setzero_ps(); NV];
                for (v, xv) in xv.iter_mut().enumerate() {
                    // Masked-off lanes are not read, so a shift past either end of the image is harmless.
                    *xv = _mm512_maskz_loadu_ps(*b.masks.add(9 * v + t), src.wrapping_add(16 * v));
                }
                let wd = b.w.add(c * 9 + t);
                for (j, row) in sum.iter_mut().enumerate() {
                    let wv = _mm512_set1_ps(*wd.add(j * b.k));
                    for (s, xv) in row.iter_mut().zip(&xv) {
                        *s = _mm512_fmadd_ps(*xv, wv, *s);
                    }
                }
            }
            d += t1 - t0;
        }
        for (j, row) in sum.iter().enumerate() {
            let yj = b.y.add(j * b.y_cs + b.p0);
            for (v, s) in row.iter().enumerate() {
                // The centre tap's mask is the lanes inside the pixel range (only those are touched).
                let m = *b.masks.add(9 * v + 4);
                let dst = yj.wrapping_add(16 * v);
                let out = if acc {
                    _mm512_add_ps(_mm512_maskz_loadu_ps(m, dst), *s)
                } else {
                    *s
                };
                _mm512_mask_storeu_ps(dst, m, out);
            }
        }
    }

    /// The weight gradient's blocks: `NV` vectors of 16 input channels by `NO` output channels' nine taps,
    /// each summed over the pixels of every depth chunk in order.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn weight_grad(g: Geometry, gpad: &[f32], xt: &[f32], d: &mut [f32], acc: bool, kc: usize) {
        let (hw, o, c_in) = (g.hw(), g.c_out, g.c_in);
        let cs = c_in.next_multiple_of(16);
        for vs in runs(cs / 16, 3) {
            // One input vector: three output channels at a time (27 accumulators); more: one.
            let per = if vs.len() == 1 { 3 } else { 1 };
            for os in runs(o, per) {
                for pixels in runs(hw, kc) {
                    let b = GradBlock {
                        g,
                        gpad: gpad.as_ptr(),
                        xt: xt.as_ptr().add(16 * vs.start),
                        d: d.as_mut_ptr(),
                        c0: 16 * vs.start,
                        o0: os.start,
                        acc: acc || pixels.start > 0,
                        pixels,
                    };
                    match (vs.len(), os.len()) {
                        (1, 1) => grad_block::<1, 1>(&b),
                        (1, 2) => grad_block::<1, 2>(&b),
                        (1, _) => grad_block::<1, 3>(&b),
                        (2, _) => grad_block::<2, 1>(&b),
                        _ => grad_block::<3, 1>(&b),
                    }
                }
            }
        }
    }

    struct GradBlock {
        g: Geometry,
        gpad: *const f32,
        /// The transposed input at the block's first channel.
        xt: *const f32,
        d: *mut f32,
        c0: usize,
        o0: usize,
        pixels: Range<usize>,
        acc: bool,
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn grad_block<const NV: usize, const NO: usize>(b: &GradBlock) {
        let g = b.g;
        let (wp, lp, cs) = (g.w + 2, (g.h + 2) * (g.w + 2), g.c_in.next_multiple_of(16));
        let mut sum = [[[_mm512_setzero_ps(); NV]; 9]; NO];
        let (mut r, mut col) = (b.pixels.start / g.w, b.pixels.start % g.w);
        for p in b.pixels.clone() {
            let mut xv = [_mm512_setzero_ps(); NV];
            for (v, xv) in xv.iter_mut().enumerate() {
                *xv = _mm512_loadu_ps(b.xt.add(p * cs + 16 * v));
            }
            // Tap (ky, kx) of pixel (r, col) is G[r + ky − 1, col + kx − 1]: padded row r + ky, column col + kx.
            let base = r * wp + col;
            for (j, taps) in sum.iter_mut().enumerate() {
                let gp = b.gpad.add((b.o0 + j) * lp + base);
                for (t, s) in taps.iter_mut().enumerate() {
                    let gv = _mm512_set1_ps(*gp.add((t / 3) * wp + t % 3));
                    for (s, xv) in s.iter_mut().zip(&xv) {
                        *s = _mm512_fmadd_ps(*xv, gv, *s);
                    }
                }
            }
            col += 1;
            if col == g.w {
                col = 0;
                r += 1;
            }
        }
        // D[j, c] at j·I + c, channels past I left alone.
        for (j, taps) in sum.iter().enumerate() {
            for (t, s) in taps.iter().enumerate() {
                let row = b.d.add(((b.o0 + j) * 9 + t) * g.c_in);
                for (v, s) in s.iter().enumerate() {
                    let c = b.c0 + 16 * v;
                    let m: __mmask16 = if c + 16 <= g.c_in {
                        0xffff
                    } else {
                        (1u16 << (g.c_in - c)) - 1
                    };
                    let dst = row.wrapping_add(c);
                    let out = if b.acc {
                        _mm512_add_ps(_mm512_maskz_loadu_ps(m, dst), *s)
                    } else {
                        *s
                    };
                    _mm512_mask_storeu_ps(dst, m, out);
                }
            }
        }
    }

    /// `xt[p, c] = x[c, p]` for `x`: `I × H·W`, `xt`: `H·W × I'` with `I'` = `I` rounded up to 16 (the
    /// channels past `I` zero), by 16 × 16 tiles transposed in registers.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transpose(x: &[f32], c_in: usize, hw: usize, xt: &mut [f32]) {
        let cs = c_in.next_multiple_of(16);
        assert!(x.len() >= c_in * hw && xt.len() >= hw * cs);
        let whole = hw / 16 * 16;
        for c0 in (0..cs).step_by(16) {
            let nc = (c_in - c0).min(16);
            for p0 in (0..whole).step_by(16) {
                let mut r = [_mm512_setzero_ps(); 16];
                for (i, r) in r.iter_mut().take(nc).enumerate() {
                    *r = _mm512_loadu_ps(x.as_ptr().add((c0 + i) * hw + p0));
                }
                transpose16(&mut r);
                for (j, r) in r.iter().enumerate() {
                    _mm512_storeu_ps(xt.as_mut_ptr().add((p0 + j) * cs + c0), *r);
                }
            }
            for p in whole..hw {
                for i in 0..16 {
                    xt[p * cs + c0 + i] = if i < nc { x[(c0 + i) * hw + p] } else { 0.0 };
                }
            }
        }
    }

    /// Transposes the 16 × 16 matrix whose rows are `r`: interleave pairs of rows by single lanes, then by
    /// pairs of lanes, then swap 128-bit quarters twice.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn transpose16(r: &mut [__m512; 16]) {
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        let pd = _mm512_castps_pd;
        let ps = _mm512_castpd_ps;
        for i in 0..4 {
            let (a, b, c, d) = (t[4 * i], t[4 * i + 1], t[4 * i + 2], t[4 * i + 3]);
            r[4 * i] = ps(_mm512_unpacklo_pd(pd(a), pd(c)));
            r[4 * i + 1] = ps(_mm512_unpackhi_pd(pd(a), pd(c)));
            r[4 * i + 2] = ps(_mm512_unpacklo_pd(pd(b), pd(d)));
            r[4 * i + 3] = ps(_mm512_unpackhi_pd(pd(b), pd(d)));
        }
        for h in 0..2 {
            for i in 0..4 {
                t[8 * h + i] = _mm512_shuffle_f32x4::<0x88>(r[8 * h + i], r[8 * h + 4 + i]);
                t[8 * h + 4 + i] = _mm512_shuffle_f32x4::<0xdd>(r[8 * h + i], r[8 * h + 4 + i]);
            }
        }
        for i in 0..8 {
            r[i] = _mm512_shuffle_f32x4::<0x88>(t[i], t[8 + i]);
            r[8 + i] = _mm512_shuffle_f32x4::<0xdd>(t[i], t[8 + i]);
        }
    }
}

#[cfg(test)]
mod tests {
    /// The register transpose against the plain one, at channel counts on and off the 16-lane tiles and
    /// pixel counts with and without a tail.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn transpose_matches_the_plain_one() {
        if !super::avx512() {
            return;
        }
        for (c_in, hw) in [(16usize, 784usize), (32, 49), (3, 37), (20, 16), (48, 5)] {
            let x: Vec<f32> = (0..c_in * hw).map(|i| i as f32).collect();
            let cs = c_in.next_multiple_of(16);
            let mut xt = vec![f32::NAN; hw * cs];
            // SAFETY: AVX-512 checked above; the sizes are the function's.
            unsafe { super::avx512::transpose(&x, c_in, hw, &mut xt) };
            for p in 0..hw {
                for c in 0..cs {
                    let want = if c < c_in { x[c * hw + p] } else { 0.0 };
                    assert_eq!(xt[p * cs + c], want, "{c_in} × {hw}: pixel {p}, channel {c}");
                }
            }
        }
    }
}
