//! 2-D convolution (stride 1, "same" padding, odd square kernels) as one graph node on the CPU: per image,
//! one product forward. Backward, the input gradient is the forward convolution of the output gradient `G`
//! by the flipped, transposed kernel, and the weight gradient is `G`'s shifts times the input. candle's own
//! CPU convolution backward runs a direct transposed convolution that takes most of a U-Net training step.
//!
//! On a CPU with AVX-512 a 3×3 kernel reads its operands in place ([`super::direct`]): the convolution and
//! the input gradient at the nine shifts of the image under masks, the weight gradient from a zero-bordered
//! copy of `G`. Elsewhere (other kernel sizes, other CPUs) each product is an im2col copy and a GEMM, one
//! im2col of `G` serving both gradients. The two routes give the same bits.
//!
//! Images are split into blocks of [`IMAGES_PER_BLOCK`] whatever the thread count, and the weight
//! gradient's per-block partial sums are added in block order: the same bits on any number of threads.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::direct;
pub(super) use super::geometry::Geometry;
use super::scratch::Scratch;
use super::{applies, cpu_slice, map_blocks, sum_in_order};
use crate::Result;

/// Images per parallel block.
pub(super) const IMAGES_PER_BLOCK: usize = 4;

/// `W ⋆ x + b` for `x`: `B × I × H × W`, `w`: `O × I × k × k` (`k` odd), `b`: `O`, stride 1, padding
/// `k / 2`. Gradients flow to all three. The fast node runs on contiguous f32 CPU tensors; elsewhere it is
/// candle's `conv2d` and `broadcast_add` ([`plain`]), which it agrees with to f32 rounding.
pub fn conv2d(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (_, _, kh, kw) = w.dims4()?;
    if applies(x.device(), x.dtype()) && x.rank() == 4 && kh == kw && kh % 2 == 1 {
        let x = x.contiguous()?;
        let tracked = super::grad_enabled() && (x.track_op() || w.track_op() || b.track_op());
        return Ok(if tracked {
            x.apply_op3(&w.contiguous()?, &b.contiguous()?, ConvOp)?
        } else {
            x.apply_op3_no_bwd(&w.contiguous()?, &b.contiguous()?, &ConvOp)?
        });
    }
    plain(x, w, b)
}

/// The reference: candle's `conv2d` plus the bias.
pub fn plain(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let k = w.dim(2)?;
    let y = super::plain_conv2d(x, w, k / 2)?;
    Ok(y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?)
}

/// `cols[(c, ky, kx), (y, x)] = x[c, y + ky − p, x + kx − p]` (zero outside the image).
fn im2col(g: Geometry, x: &[f32], cols: &mut [f32]) {
    im2col_pixels(g, x, cols, 0..g.hw());
}

/// [`im2col`] for the output pixels `pixels` only (in row-major order, not necessarily whole lines):
/// `cols` is `I·k² × |pixels|`.
///
/// Each row of `cols` is its channel shifted by `(ky − p)·W + kx − p` as one flat copy; the entries that
/// copy wrapped across an image edge (whole rows past the top or bottom, one column at the left or right
/// for each pixel of shift) are then set to zero. One long copy per row instead of one per image line.
fn im2col_pixels(g: Geometry, x: &[f32], cols: &mut [f32], pixels: std::ops::Range<usize>) {
    let (h, w, k, p) = (g.h, g.w, g.k as isize, (g.k / 2) as isize);
    let hw = g.hw();
    // The band's pixels are `base..base + n` of the image.
    let (base, n) = (pixels.start, pixels.len());
    let band = |(a, b): (usize, usize)| (a.clamp(base, base + n) - base, b.clamp(base, base + n) - base);
    for c in 0..g.c_in {
        let img = &x[c * hw..(c + 1) * hw];
        for ky in 0..k {
            for kx in 0..k {
                let row = &mut cols[((c * g.k + ky as usize) * g.k + kx as usize) * n..][..n];
                let (dy, dx) = (ky - p, kx - p);
                let off = dy * w as isize + dx;
                let (lo, hi) = band(valid(off, hw));
                row[..lo].fill(0.0);
                row[hi..].fill(0.0);
                if lo < hi {
                    let src = (base + lo) as isize + off;
                    row[lo..hi].copy_from_slice(&img[src as usize..src as usize + (hi - lo)]);
                }
                // Image lines whose source line is above or below the image.
                let (y0, y1) = valid(dy, h);
                let (y0, y1) = band((y0 * w, y1 * w));
                row[..y0].fill(0.0);
                row[y1..].fill(0.0);
                // Columns whose source pixel is left or right of its line. Entry `i` is pixel `base + i`,
                // in column `(base + i) mod W`.
                let (x0, x1) = valid(dx, w);
                // (A strided store per column: a `fill` per line would call memset for one or two floats.)
                let lines = &mut row[y0..y1];
                let first = (base + y0) % w;
                for col in (0..x0).chain(x1..w) {
                    for v in lines.iter_mut().skip((col + w - first) % w).step_by(w) {
                        *v = 0.0;
                    }
                }
            }
        }
    }
}

/// The indices `i` in `0..n` with `i + shift` in `0..n`, as `lo..hi` (empty when the shift is `n` or more).
fn valid(shift: isize, n: usize) -> (usize, usize) {
    let n = n as isize;
    let lo = (-shift).clamp(0, n);
    (lo as usize, (n - shift).clamp(lo, n) as usize)
}

/// `dst (m × n) = [dst +] lhs · rhs` for row-major contiguous operands, `lhs` given transposed when
/// `lhs_t` (stored `k × m`) and `rhs` when `rhs_t` (stored `n × k`).
#[allow(clippy::too_many_arguments)]
fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    acc: bool,
    lhs: &[f32],
    lhs_t: bool,
    rhs: &[f32],
    rhs_t: bool,
) {
    let l = if lhs_t {
        (lhs.as_ptr(), 1, m as isize)
    } else {
        (lhs.as_ptr(), k as isize, 1)
    };
    let r = if rhs_t {
        (rhs.as_ptr(), 1, k as isize)
    } else {
        (rhs.as_ptr(), n as isize, 1)
    };
    debug_assert!(dst.len() >= m * n && lhs.len() >= m * k && rhs.len() >= k * n);
    // SAFETY: the three buffers hold m × n, m × k and k × n elements under the strides above.
    unsafe { super::gemm(m, n, k, dst.as_mut_ptr(), acc, l, r) };
}

struct ConvOp;

impl CustomOp3 for ConvOp {
    fn name(&self) -> &'static str {
        "flowmap-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, g) = Geometry::of(xl, wl)?;
        let (x, w, bias) = (
            cpu_slice(xs, xl, "x")?,
            cpu_slice(ws, wl, "w")?,
            cpu_slice(bs, bl, "b")?,
        );
        let y = forward_batch(g, b, w, bias, x, None);
        Ok((CpuStorage::F32(y), Shape::from((b, g.c_out, g.h, g.w))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (x, w) = (x.contiguous()?, w.contiguous()?);
        let (bsz, c_in, h, wd) = x.dims4()?;
        let (o, _, k, _) = w.dims4()?;
        let g = Geometry {
            c_in,
            c_out: o,
            h,
            w: wd,
            k,
        };
        let hw = g.hw();
        let (Some(xr), Some(wr), Some(gr)) = (super::read(&x), super::read(&w), super::read(&grad)) else {
            candle_core::bail!("conv2d backward needs f32 CPU tensors");
        };
        let (xs, ws, gs) = (xr.slice(), wr.slice(), gr.slice());
        let back = Backward::new(g, ws);
        let mut dx = vec![0.0f32; bsz * c_in * hw];
        let blocks: Vec<(usize, &mut [f32])> = dx.chunks_mut(IMAGES_PER_BLOCK * c_in * hw).enumerate().collect();
        // Per block: the input gradient of its images, and its partial weight and bias gradients.
        let partials = map_blocks(blocks, |(i, dxb)| {
            let mut cols_g = g.g_cols_scratch();
            let mut dwb = back.partial();
            for (j, dxi) in dxb.chunks_mut(c_in * hw).enumerate() {
                let n = i * IMAGES_PER_BLOCK + j;
                let xi = &xs[n * c_in * hw..(n + 1) * c_in * hw];
                let gi = &gs[n * o * hw..(n + 1) * o * hw];
                back.image(xi, gi, &mut cols_g, dxi, &mut dwb, j > 0);
            }
            dwb
        });
        let (dw, db) = back.finish(partials);
        let dev = x.device();
        let dx = Tensor::from_vec(dx, (bsz, c_in, h, wd), dev)?;
        let db = Tensor::from_vec(db, o, dev)?;
        let dw = Tensor::from_vec(dw, (o, c_in, k, k), dev)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// What a fused node computes from image `n`'s input (`I × H·W`) before the convolution, written into a
/// buffer of the same size.
pub(super) type Prepare<'a> = &'a (dyn Fn(usize, &[f32], &mut [f32]) + Sync);

/// The forward pass over `b` images `x` (`b × I × H·W`), each first through `prepare` when given:
/// `y = W ⋆ prepare(x) + bias` (`b × O × H·W`). Blocks of [`IMAGES_PER_BLOCK`] images go to the threads.
/// (Splitting a single image's product over output channels instead, for sampling latency, measured
/// slower: 0.84 → 1.2 ms for one image through the 16-channel U-Net, the hand-offs costing more than the
/// second core saves.)
pub(super) fn forward_batch(
    g: Geometry,
    b: usize,
    w: &[f32],
    bias: &[f32],
    x: &[f32],
    prepare: Option<Prepare<'_>>,
) -> Vec<f32> {
    let (hw, o, img) = (g.hw(), g.c_out, g.c_in * g.hw());
    let n_out = b * o * hw;
    let mut y: Vec<f32> = Vec::with_capacity(n_out);
    // Image `n`'s input: in `x`, or prepared into `buf`.
    fn image<'a>(x: &'a [f32], n: usize, img: usize, prepare: Option<Prepare<'_>>, buf: &'a mut Vec<f32>) -> &'a [f32] {
        let xi = &x[n * img..(n + 1) * img];
        match prepare {
            Some(p) => {
                buf.resize(img, 0.0);
                p(n, xi, buf);
                buf
            }
            None => xi,
        }
    }
    let blocks: Vec<(usize, &mut [MaybeUninit<f32>])> = y.spare_capacity_mut()[..n_out]
        .chunks_mut(IMAGES_PER_BLOCK * o * hw)
        .enumerate()
        .collect();
    map_blocks(blocks, |(i, yb)| {
        let yb = fill_bias(yb, bias, hw);
        let (mut buf, mut cols) = (Vec::new(), g.cols_scratch());
        for (j, yi) in yb.chunks_mut(o * hw).enumerate() {
            let xi = image(x, i * IMAGES_PER_BLOCK + j, img, prepare, &mut buf);
            forward_image_alone(g, w, xi, &mut cols, yi, b == 1);
        }
    });
    // SAFETY: the blocks cover all `n_out` elements and each wrote all of its own.
    unsafe { y.set_len(n_out) };
    y
}

/// A block of whole `O × H·W` outputs, each channel set to its bias (one pass, instead of zeros and then
/// the bias, on the block's own thread).
pub(super) fn fill_bias<'a>(yb: &'a mut [MaybeUninit<f32>], bias: &[f32], hw: usize) -> &'a mut [f32] {
    for (dst, &bv) in yb.chunks_mut(hw).zip(bias.iter().cycle()) {
        dst.fill(MaybeUninit::new(bv));
    }
    // SAFETY: every element of the block was just written.
    unsafe { super::dense::assume_init(yb) }
}

impl Geometry {
    /// The im2col matrix of one image (`I·k² × H·W`; empty for `k = 1`, whose im2col is the image
    /// itself), from the thread's scratch memory: im2col overwrites it whole.
    pub fn cols_scratch(&self) -> Scratch {
        Scratch::new(if self.k == 1 || direct::applies(self, self.hw()) {
            0
        } else {
            self.rows() * self.hw()
        })
    }
    /// The im2col matrix of one image's output gradient (`O·k² × H·W`), likewise.
    pub fn g_cols_scratch(&self) -> Scratch {
        Scratch::new(if self.k == 1 {
            0
        } else if direct::applies_weight_grad(self) {
            direct::weight_grad_scratch(self)
        } else {
            self.g_rows() * self.hw()
        })
    }
}

/// `y += W ⋆ x` for one image: `x` is `I × H·W`, `y` the `O × H·W` output (holding the bias), `cols` a
/// [`Geometry::cols_scratch`]. A 3×3 kernel on a CPU with AVX-512 reads the image in place
/// ([`direct::conv3x3`], the same bits); otherwise im2col and a GEMM.
pub(super) fn forward_image(g: Geometry, w: &[f32], x: &[f32], cols: &mut [f32], y: &mut [f32]) {
    let hw = g.hw();
    if direct::applies(&g, hw) {
        assert!(y.len() >= g.c_out * hw);
        // SAFETY: `applies` holds and `y` is the `O × H·W` output.
        return unsafe { direct::conv3x3(g, w, x, y.as_mut_ptr(), hw, 0..hw, true) };
    }
    forward_image_gemm(g, w, x, cols, y)
}

/// [`forward_image`] by im2col and a GEMM (`cols` is `I·k² × H·W` for `k > 1`).
fn forward_image_gemm(g: Geometry, w: &[f32], x: &[f32], cols: &mut [f32], y: &mut [f32]) {
    let cols: &[f32] = if g.k == 1 {
        x
    } else {
        im2col(g, x, cols);
        cols
    };
    matmul(g.c_out, g.hw(), g.rows(), y, true, w, false, cols, false);
}

/// Multiply-adds of one image's product at or above which a batch of one image splits it into
/// [`BANDS`] bands of output pixels, one per block of the pool. A batch of one image is one block, so one
/// core would otherwise do all of it while the other waits (sampling latency). Every 3×3 product of the
/// 16- and 32-channel U-Nets splits, down to the 16-channel 7 × 7 level (0.45 M), and so do the larger
/// 1×1 skips. Measured with `flowmap bench speed --rows unet-latency-1nfe`, alternating binaries: a 4 M
/// threshold (the 32-channel net's first two levels only) → 1.5 M took the 32-channel latency 1.53 → 1.39
/// ms and the 16-channel one 0.72 → 0.60 ms; 256 K took the 16-channel one on to 0.57 ms, the 32-channel
/// one unchanged. (An earlier 1.5 M split, before the scratch memory and the aligned bands, measured no
/// better than noise.)
const SPLIT_MACS: usize = 1 << 18;

/// The bands of a split image product. A constant, not the thread count, so that the products (and
/// their bits) are the same on any number of threads.
const BANDS: usize = 2;

/// Band edges fall on multiples of this many pixels: a band whose pixel count is a multiple of the GEMM's
/// 16-float column blocks has its im2col matrix read in place, where a ragged one (half a 28 × 28 image is
/// 392 pixels) has the GEMM repack all of it first.
const BAND_ALIGN: usize = 16;

/// The pixels of band `i` of `hw`, its edges rounded to [`BAND_ALIGN`] where that leaves the bands within
/// a few percent of each other (not at 7 × 7, where it would split 49 pixels 32 / 17).
fn band_pixels(i: usize, hw: usize) -> std::ops::Range<usize> {
    let align = if hw >= 8 * BAND_ALIGN { BAND_ALIGN } else { 1 };
    let edge = |i: usize| {
        if i == BANDS {
            hw
        } else {
            ((i * hw / BANDS + align / 2) / align * align).min(hw)
        }
    };
    edge(i)..edge(i + 1)
}

/// [`forward_image`] for an image that is the whole batch (`alone`): split into bands of output pixels
/// across the pool when its product is large enough ([`SPLIT_MACS`]), else the same call. The bands' im2col
/// matrices (`I·k² × |band|` each) share the image's `cols` buffer between them.
pub(super) fn forward_image_alone(g: Geometry, w: &[f32], x: &[f32], cols: &mut [f32], y: &mut [f32], alone: bool) {
    if !alone || g.c_out * g.rows() * g.hw() < SPLIT_MACS || g.hw() < BANDS * BAND_ALIGN {
        return forward_image(g, w, x, cols, y);
    }
    struct Out(*mut f32);
    // SAFETY: the bands write disjoint columns (pixels) of `y` and nothing else touches it meanwhile.
    unsafe impl Sync for Out {}
    let (hw, rows, out) = (g.hw(), g.rows(), Out(y.as_mut_ptr()));
    let mut rest = cols;
    let bands: Vec<(std::ops::Range<usize>, &mut [f32])> = (0..BANDS)
        .map(|i| {
            let pixels = band_pixels(i, hw);
            // No im2col for a 1×1 kernel or the direct 3×3 one: their `cols` is empty and the band reads
            // the image in place.
            let len = if g.k == 1 || direct::applies(&g, hw) {
                0
            } else {
                rows * pixels.len()
            };
            let (own, tail) = std::mem::take(&mut rest).split_at_mut(len);
            rest = tail;
            (pixels, own)
        })
        .collect();
    map_blocks(bands, |(pixels, own)| {
        let (p0, n) = (pixels.start, pixels.len());
        let out = &out;
        if direct::applies(&g, hw) {
            debug_assert!(direct::applies(&g, n));
            // SAFETY: as below; the band writes only its own pixels of `y`.
            return unsafe { direct::conv3x3(g, w, x, out.0, hw, pixels, true) };
        }
        let rhs = if g.k == 1 {
            (x[p0..].as_ptr(), hw as isize, 1)
        } else {
            im2col_pixels(g, x, own, pixels);
            (own.as_ptr(), n as isize, 1)
        };
        // SAFETY: `dst` is the `O × n` block of columns `p0..p0 + n` of `y` (`O × H·W`), which only this
        // band writes; `w` is `O × rows` and `rhs` `rows × n` under its strides.
        unsafe {
            super::gemm_strided(
                g.c_out,
                n,
                rows,
                (out.0.add(p0), hw as isize, 1),
                true,
                (w.as_ptr(), rows as isize, 1),
                rhs,
            )
        };
    });
}

/// The sum of each `len`-long row of `rows`, handed to `out` with the row's index: each row added in order
/// from its first element as `Iterator::sum` adds it (the same bits), eight rows at a time so that their
/// additions overlap instead of each waiting on the one before (`Backward::image`'s own cycles, mostly
/// these sums' 784-long chains, went from 3.7% to 1.5% of a 16-channel teacher step in `perf`).
fn row_sums(rows: &[f32], len: usize, mut out: impl FnMut(usize, f32)) {
    let n = rows.len() / len;
    let zero: f32 = std::iter::empty::<f32>().sum();
    let mut r = 0;
    while r + 8 <= n {
        let lines: [&[f32]; 8] = std::array::from_fn(|j| &rows[(r + j) * len..(r + j + 1) * len]);
        let mut s = [zero; 8];
        for p in 0..len {
            for (s, line) in s.iter_mut().zip(&lines) {
                *s += line[p];
            }
        }
        for (j, s) in s.into_iter().enumerate() {
            out(r + j, s);
        }
        r += 8;
    }
    for r in r..n {
        out(r, rows[r * len..(r + 1) * len].iter().sum());
    }
}

/// The backward pass of one image at a time, with the kernel prepared once.
///
/// The input gradient is the forward convolution of `G` by the flipped, transposed kernel
/// `W'[c, (o, a, b)] = W[o, c, k−1−a, k−1−b]` (stride 1, padding k/2), and the weight gradient comes from
/// `G`'s shifts: `D[(o, a, b), c] = Σ_p cols_G[(o, a, b), p] · x[c, p]` is `dW[o, c, k−1−a, k−1−b]`. Both
/// products have a contraction of `O·k²` or `H·W` and need no col2im scatter; on the GEMM route one im2col
/// of `G` serves both, on the direct route neither needs one.
pub(super) struct Backward<'a> {
    g: Geometry,
    /// The kernel as given (for `k = 1`).
    w: &'a [f32],
    /// `W'` (`I × O·k²`, for `k > 1`).
    w_flip: Vec<f32>,
}

impl<'a> Backward<'a> {
    pub fn new(g: Geometry, w: &'a [f32]) -> Self {
        let kk = g.k * g.k;
        let w_flip = if g.k == 1 {
            Vec::new()
        } else {
            let g_rows = g.g_rows();
            let mut f = vec![0.0f32; g.c_in * g_rows];
            for oc in 0..g.c_out {
                for c in 0..g.c_in {
                    let src = &w[(oc * g.c_in + c) * kk..][..kk];
                    let dst = &mut f[c * g_rows + oc * kk..][..kk];
                    for (d, v) in dst.iter_mut().zip(src.iter().rev()) {
                        *d = *v;
                    }
                }
            }
            f
        };
        Backward { g, w, w_flip }
    }

    /// A zeroed partial weight-and-bias gradient: `dW` (as `D`, `O·k² × I`, for `k > 1`), then `db`.
    pub fn partial(&self) -> Vec<f32> {
        vec![0.0f32; self.g.c_out * self.g.rows() + self.g.c_out]
    }

    /// One image: `dx = ∂/∂x` of `⟨G, W ⋆ x⟩` written into `dx` (`I × H·W`), and the weight and bias
    /// gradients added to `dwb` (overwritten when `!acc`). `cols_g` is a [`Geometry::g_cols_scratch`].
    pub fn image(&self, x: &[f32], gi: &[f32], cols_g: &mut [f32], dx: &mut [f32], dwb: &mut [f32], acc: bool) {
        let g = self.g;
        let (o, c_in, hw) = (g.c_out, g.c_in, g.hw());
        let (dwm, db) = dwb.split_at_mut(o * g.rows());
        row_sums(&gi[..o * hw], hw, |ch, s| db[ch] = if acc { db[ch] + s } else { s });
        if g.k == 1 {
            // dW += G · xᵀ   (O × HW)·(HW × I);   dx = Wᵀ · G   (I × O)·(O × HW)
            matmul(o, c_in, hw, dwm, acc, gi, false, x, true);
            matmul(c_in, hw, o, dx, false, self.w, true, gi, false);
            return;
        }
        let g_rows = g.g_rows();
        let gt = Geometry {
            c_in: o,
            c_out: c_in,
            ..g
        };
        if direct::applies_weight_grad(&g) {
            // Both products read `G` in place: the input gradient by the direct kernel (it applies
            // whenever this one does), the weight gradient from a zero-bordered copy of `G`.
            debug_assert!(direct::applies(&gt, hw));
            assert!(dx.len() >= c_in * hw);
            // SAFETY: `applies` holds and `dx` is `I × H·W`.
            unsafe { direct::conv3x3(gt, &self.w_flip, gi, dx.as_mut_ptr(), hw, 0..hw, false) };
            direct::weight_grad(g, x, gi, cols_g, dwm, acc);
            return;
        }
        im2col(gt, gi, cols_g);
        // dx = W' · cols_G   (I × O k²)·(O k² × HW)
        matmul(c_in, hw, g_rows, dx, false, &self.w_flip, false, cols_g, false);
        // D += cols_G · xᵀ, written as its transpose `x · cols_Gᵀ` (I × HW)·(HW × O k²) into a
        // column-major I × O k², so that the packed operand is the small `x`, not `cols_G`.
        // SAFETY: `dwm` holds I × O k² elements, `x` I × HW and `cols_g` O k² × HW.
        unsafe {
            super::gemm_strided(
                c_in,
                g_rows,
                hw,
                (dwm.as_mut_ptr(), 1, c_in as isize),
                acc,
                (x.as_ptr(), hw as isize, 1),
                (cols_g.as_ptr(), 1, hw as isize),
            )
        };
    }

    /// The blocks' partial sums added in block order, as `(dW` in `O × I × k × k`, `db)`.
    pub fn finish(&self, partials: Vec<Vec<f32>>) -> (Vec<f32>, Vec<f32>) {
        let g = self.g;
        let (o, c_in, kk) = (g.c_out, g.c_in, g.k * g.k);
        let rows = g.rows();
        let sums = sum_in_order(partials).unwrap_or_else(|| self.partial());
        let dw: Vec<f32> = if g.k == 1 {
            sums[..o * rows].to_vec()
        } else {
            // dW[o, c, ky, kx] = D[(o, k−1−ky, k−1−kx), c]
            let mut dw = vec![0.0f32; o * rows];
            for oc in 0..o {
                for c in 0..c_in {
                    let dst = &mut dw[(oc * c_in + c) * kk..][..kk];
                    for (t, d) in dst.iter_mut().enumerate() {
                        *d = sums[(oc * kk + kk - 1 - t) * c_in + c];
                    }
                }
            }
            dw
        };
        (dw, sums[o * rows..].to_vec())
    }
}

#[cfg(test)]
mod tests;
