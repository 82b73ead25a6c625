//! `act(x·Wᵀ + b)` as one graph node on the CPU, plain candle ops elsewhere.

use std::mem::MaybeUninit;
use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::simd;
use crate::Result;

/// The activation applied after a dense layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Identity,
    /// `silu(z) = z·σ(z)`.
    Silu,
}

/// `act(x·Wᵀ + b)` for `x`: `B × in`, `W`: `out × in`, `b`: `out`. Gradients flow to all three.
///
/// On the CPU in f32 this is one fused graph node (see [`crate::kernels`]); otherwise it is candle's
/// `matmul`, `broadcast_add` and `silu`, which it agrees with to f32 rounding.
pub fn dense(x: &Tensor, w: &Tensor, b: &Tensor, act: Activation) -> Result<Tensor> {
    if super::applies(x.device(), x.dtype()) && x.rank() == 2 && w.rank() == 2 && b.rank() == 1 {
        let x = x.contiguous()?;
        let tracked = super::grad_enabled() && (x.track_op() || w.track_op() || b.track_op());
        let op = DenseOp {
            act,
            saved: Mutex::new(None),
            save: tracked,
        };
        return Ok(if tracked {
            x.apply_op3(w, b, op)?
        } else {
            x.apply_op3_no_bwd(w, b, &op)?
        });
    }
    plain(x, w, b, act)
}

/// `act(x·Wᵀ + b)` by candle's own ops: the reference the fused node is tested against, and the path every
/// non-CPU or non-f32 tensor takes.
pub fn plain(x: &Tensor, w: &Tensor, b: &Tensor, act: Activation) -> Result<Tensor> {
    let z = super::plain_matmul(x, &w.t()?)?.broadcast_add(b)?;
    Ok(match act {
        Activation::Identity => z,
        Activation::Silu => z.silu()?,
    })
}

struct DenseOp {
    act: Activation,
    /// `σ(x·Wᵀ + b)`, kept by the forward pass of a SiLU layer for its backward pass.
    saved: Mutex<Option<Vec<f32>>>,
    save: bool,
}

/// Layers with at most this many outputs (a flow map's read-out to a 2-D state) skip the GEMM kernels,
/// which idle on them, for dot products and row updates.
pub(super) const SKINNY: usize = 8;

/// Whether a `b`-row product with `n_out` outputs takes the dot-product kernels: few outputs, or so few rows
/// (single-sample generation) that packing `W` for a GEMM would cost more than reading it once.
pub(super) fn use_dots(b: usize, n_out: usize) -> bool {
    n_out <= SKINNY || b <= SKINNY
}

/// Views a block of spare capacity as initialised once a kernel has written all of it.
///
/// # Safety
/// Every element of `v` must have been written.
pub(super) unsafe fn assume_init(v: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    &mut *(v as *mut [MaybeUninit<f32>] as *mut [f32])
}

/// `v` as a destination for a kernel that writes into not-yet-written memory (the kernels take
/// `MaybeUninit` so that fresh outputs need no zero fill first).
///
/// # Safety
/// Only initialised values may be written through the view (every kernel here writes `MaybeUninit::new`).
pub(super) unsafe fn as_uninit(v: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    &mut *(v as *mut [f32] as *mut [MaybeUninit<f32>])
}

/// A layer's weight `W` (`out × in`, row-major) as a forward product reads it: in place, or through its
/// transpose when one was made for the pass ([`forward_weight`]).
#[derive(Clone, Copy)]
pub(super) struct Weight<'a> {
    pub w: &'a [f32],
    pub wt: Option<&'a [f32]>,
}

/// `Wᵀ` (`in × out`, row-major) for the forward product of a `b`-row batch in blocks of `rows`, or `None`
/// where the blocks read `W`.
///
/// The GEMM vectorises along a layer's outputs, so it wants `W` with its output index contiguous; read in
/// place, `W` (`out × in`, row-major) gets repacked by every block's product. Transposed once per pass, the
/// blocks read it directly: a 128-row block of a 256 → 256 layer takes 93 µs instead of 151 µs, a 256-row
/// block of a 512 → 512 layer 875 µs instead of 1,201 µs, and the transpose 23 µs and 150 µs (one core).
/// A single block packs `W` once either way, and skinny layers have no GEMM: both keep `W`.
pub(super) fn forward_weight(w: &[f32], n_out: usize, b: usize, rows: usize) -> Option<Vec<f32>> {
    let several_blocks = b.div_ceil(rows.max(1)) >= 2;
    (several_blocks && !use_dots(b, n_out) && n_out > 0 && !w.is_empty())
        .then(|| simd::transpose(w, n_out, w.len() / n_out))
}

/// Writes one block of `x·Wᵀ` (or, for a `skinny` layer, `x·Wᵀ + b`) into `zc`, all of it.
fn project_block(
    xc: &[f32],
    Weight { w, wt }: Weight<'_>,
    bias: &[f32],
    n_in: usize,
    zc: &mut [MaybeUninit<f32>],
    skinny: bool,
) {
    let m = xc.len() / n_in.max(1);
    if skinny {
        zc.iter_mut().for_each(|v| {
            v.write(0.0);
        });
        // SAFETY: zeroed just above.
        simd::skinny_forward(xc, w, bias, unsafe { assume_init(zc) });
    } else if n_in == 0 {
        zc.iter_mut().for_each(|v| {
            v.write(0.0);
        });
    } else {
        let n_out = bias.len();
        // W read as Wᵀ (in × out): strides (1, in) in place, (out, 1) when transposed.
        let rhs = match wt {
            Some(wt) => (wt.as_ptr(), n_out as isize, 1),
            None => (w.as_ptr(), 1, n_in as isize),
        };
        // SAFETY: x is m × in (strides in, 1), rhs is in × out by the strides above, z is m × out; the GEMM
        // overwrites all of z (read_dst = false, k = in ≥ 1).
        unsafe {
            super::gemm(
                m,
                n_out,
                n_in,
                zc.as_mut_ptr().cast(),
                false,
                (xc.as_ptr(), n_in as isize, 1),
                rhs,
            )
        };
    }
}

/// One block of rows of a layer's forward pass, while the block is in cache: `z = x·Wᵀ + b` into `zc`, then,
/// for SiLU (`yc` given), `y = silu(z)` into `yc` and `zc ← σ(z)`. Writes all of `zc` (and `yc`).
pub(super) fn forward_block(
    xc: &[f32],
    weight: Weight<'_>,
    bias: &[f32],
    n_in: usize,
    zc: &mut [MaybeUninit<f32>],
    yc: Option<&mut [MaybeUninit<f32>]>,
    skinny: bool,
) {
    project_block(xc, weight, bias, n_in, zc, skinny);
    // SAFETY: project_block wrote all of zc.
    let zc = unsafe { assume_init(zc) };
    // The skinny kernel adds the bias in the product; otherwise it goes in with the activation.
    match (yc, skinny) {
        (Some(yc), false) => simd::add_bias_silu(zc, yc, bias),
        (Some(yc), true) => simd::add_bias_silu(zc, yc, &vec![0.0f32; bias.len()]),
        (None, false) => simd::add_bias(zc, bias),
        (None, true) => {}
    }
}

/// `z = x·Wᵀ + b`, or for SiLU `y = silu(z)` and `σ(z)`: per block of rows, the product, then the bias
/// and the activation while the block is in cache. Returns `(z, None)` for the identity and `(σ(z), Some(y))`
/// for SiLU.
fn forward(x: &[f32], w: &[f32], bias: &[f32], b: usize, act: Activation) -> (Vec<f32>, Option<Vec<f32>>) {
    let (n_out, n_in) = (bias.len(), w.len() / bias.len());
    let n = b * n_out;
    let rows = super::block_rows(b);
    let mut z: Vec<f32> = Vec::with_capacity(n);
    let mut y: Vec<f32> = Vec::with_capacity(if act == Activation::Silu { n } else { 0 });
    {
        let skinny = use_dots(b, n_out);
        let wt = forward_weight(w, n_out, b, rows);
        let silu = act == Activation::Silu;
        let zs = z.spare_capacity_mut()[..n].chunks_mut(rows * n_out);
        let mut ys = y.spare_capacity_mut()[..if silu { n } else { 0 }].chunks_mut(rows * n_out);
        let blocks: Vec<_> = zs
            .zip(x.chunks(rows * n_in.max(1)).chain(std::iter::repeat(&[][..])))
            .map(|(zc, xc)| (zc, xc, if silu { ys.next() } else { None }))
            .collect();
        super::map_blocks(blocks, |(zc, xc, yc)| {
            forward_block(xc, Weight { w, wt: wt.as_deref() }, bias, n_in, zc, yc, skinny)
        });
    }
    // SAFETY: every block of z (and of y for SiLU) was written in full above.
    unsafe {
        z.set_len(n);
        if act == Activation::Silu {
            y.set_len(n);
        }
    }
    (z, (act == Activation::Silu).then_some(y))
}

/// One block of rows of the backward pass.
struct BackBlock<'a> {
    x: &'a [f32],
    g: &'a [f32],
    /// The layer's output `y` (SiLU; empty for the identity).
    y: &'a [f32],
    /// `σ(z)` on entry (SiLU), overwritten with `dz`; empty for the identity.
    z: &'a mut [f32],
    dx: Option<&'a mut [MaybeUninit<f32>]>,
}

/// Per block of rows: `dz = g ⊙ act'(z)`, `db += Σ_rows dz`, `dx = dz·W`, `dW += dzᵀ·x`; the per-thread sums
/// of `db` and `dW` are added at the end. Returns `(dx, dW, db)`.
#[allow(clippy::too_many_arguments)]
fn backward(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    y: &[f32],
    z: Option<Vec<f32>>,
    b: usize,
    n_in: usize,
    n_out: usize,
    need_dx: bool,
) -> (Option<Vec<f32>>, Vec<f32>, Vec<f32>) {
    let rows = super::block_rows(b);
    let mut dx: Vec<f32> = Vec::with_capacity(if need_dx { b * n_in } else { 0 });
    let mut z = z.unwrap_or_default();
    let silu = !z.is_empty();
    let mut blocks: Vec<BackBlock<'_>> = Vec::with_capacity(b.div_ceil(rows));
    {
        let mut dx_chunks =
            dx.spare_capacity_mut()[..if need_dx { b * n_in } else { 0 }].chunks_mut(rows * n_in.max(1));
        let mut z_chunks = z.chunks_mut(rows * n_out);
        for (i, gc) in g.chunks(rows * n_out).enumerate() {
            let r0 = i * rows;
            let r1 = r0 + gc.len() / n_out;
            blocks.push(BackBlock {
                x: &x[r0 * n_in..r1 * n_in],
                g: gc,
                y: if silu { &y[r0 * n_out..r1 * n_out] } else { &[] },
                z: if silu {
                    z_chunks.next().expect("z has every block")
                } else {
                    &mut []
                },
                dx: if need_dx && n_in > 0 { dx_chunks.next() } else { None },
            });
        }
    }
    let skinny = use_dots(b, n_out);
    // Each block's sums go to its own buffers, added in block order afterwards: the result does not depend
    // on which thread ran which block (nor, since blocks depend only on the batch, on the thread count).
    let partials = super::map_blocks(blocks, |blk| {
        let (mut db, mut dw) = (vec![0.0f32; n_out], Vec::with_capacity(n_out * n_in));
        let m = blk.g.len() / n_out;
        let dz: &[f32] = if silu {
            simd::silu_backward(blk.z, blk.y, blk.g, &mut db);
            blk.z
        } else {
            simd::column_sum(blk.g, &mut db);
            blk.g
        };
        let skinny = skinny || use_dots(m, n_out);
        weight_grads(
            dz,
            w,
            blk.x,
            n_in,
            blk.dx,
            &mut dw.spare_capacity_mut()[..n_out * n_in],
            skinny,
        );
        // SAFETY: weight_grads wrote all of dW.
        unsafe { dw.set_len(n_out * n_in) };
        (db, dw)
    });
    let (dbs, dws): (Vec<_>, Vec<_>) = partials.into_iter().unzip();
    let db = super::sum_in_order(dbs).unwrap_or_else(|| vec![0.0f32; n_out]);
    let dw = super::sum_in_order(dws).unwrap_or_else(|| vec![0.0f32; n_out * n_in]);
    if need_dx {
        // SAFETY: every block of dx was written in full above (by the GEMM or the skinny kernel).
        unsafe { dx.set_len(b * n_in) };
    }
    (need_dx.then_some(dx), dw, db)
}

/// For one block of `m` rows of a layer's backward pass (`dz`: `m × out`, its input `x`: `m × in`):
/// `dx = dz·W` when `dx` is given and `dW = dzᵀ·x`, every element of both written, by the dot-product
/// kernels when `skinny`, by GEMM otherwise.
pub(super) fn weight_grads(
    dz: &[f32],
    w: &[f32],
    x: &[f32],
    n_in: usize,
    dx: Option<&mut [MaybeUninit<f32>]>,
    dw: &mut [MaybeUninit<f32>],
    skinny: bool,
) {
    // An empty block (k = 0 for dW's product) goes through the zeroing dot-product path as well.
    if skinny || dz.is_empty() {
        dw.iter_mut().for_each(|v| {
            v.write(0.0);
        });
        // SAFETY: zeroed just above.
        simd::skinny_backward(dz, w, x, n_in, dx, unsafe { assume_init(dw) });
    } else if let Some(n_out) = dw.len().checked_div(n_in) {
        let m = dz.len() / n_out;
        // SAFETY: dz is m × out (strides out, 1); W is out × in (strides in, 1); x is m × in; dx is m × in
        // and dW is out × in, both fully overwritten (read_dst = false; k = out ≥ 1 and k = m ≥ 1), dW
        // reading dz with strides (1, out).
        unsafe {
            if let Some(dx) = dx {
                super::gemm(
                    m,
                    n_in,
                    n_out,
                    dx.as_mut_ptr().cast(),
                    false,
                    (dz.as_ptr(), n_out as isize, 1),
                    (w.as_ptr(), n_in as isize, 1),
                );
            }
            super::gemm(
                n_out,
                n_in,
                m,
                dw.as_mut_ptr().cast(),
                false,
                (dz.as_ptr(), 1, n_out as isize),
                (x.as_ptr(), n_in as isize, 1),
            );
        }
    }
}

impl CustomOp3 for DenseOp {
    fn name(&self) -> &'static str {
        "flowmap-dense"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w, bias) = (
            super::cpu_slice(s1, l1, "dense: x")?,
            super::cpu_slice(s2, l2, "dense: W")?,
            super::cpu_slice(s3, l3, "dense: b")?,
        );
        let (b, n_in) = l1.shape().dims2()?;
        let (n_out, w_in) = l2.shape().dims2()?;
        if w_in != n_in || bias.len() != n_out || n_out == 0 {
            candle_core::bail!(
                "dense: x is {b}×{n_in}, W is {n_out}×{w_in}, b has {} entries",
                bias.len()
            );
        }
        let (z, y) = forward(x, w, bias, b, self.act);
        let out = match y {
            Some(y) => {
                if self.save {
                    *self.saved.lock().expect("dense: saved activations") = Some(z);
                }
                y
            }
            None => z,
        };
        Ok((CpuStorage::F32(out), Shape::from((b, n_out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (b, n_in) = x.dims2()?;
        let n_out = w.dim(0)?;
        let dev = x.device();
        let missing = || candle_core::Error::Msg("dense backward: inputs are not contiguous f32 on the CPU".into());
        let (need_dx, need_dw) = (x.track_op(), w.track_op());
        let res = res.contiguous()?;
        let (xr, wr, br, gr, yr) = (
            super::read(x).ok_or_else(missing)?,
            super::read(w).ok_or_else(missing)?,
            super::read(bias).ok_or_else(missing)?,
            super::read(&grad).ok_or_else(missing)?,
            super::read(&res).ok_or_else(missing)?,
        );
        let (xs, ws) = (xr.slice(), wr.slice());
        let s = match self.act {
            Activation::Identity => None,
            // A second backward through the same graph recomputes σ(z).
            Activation::Silu => Some(
                self.saved
                    .lock()
                    .expect("dense: saved activations")
                    .take()
                    .unwrap_or_else(|| forward(xs, ws, br.slice(), b, Activation::Silu).0),
            ),
        };
        let (dx, dw, db) = backward(xs, ws, gr.slice(), yr.slice(), s, b, n_in, n_out, need_dx);
        let dx = dx.map(|v| Tensor::from_vec(v, (b, n_in), dev)).transpose()?;
        let dw = need_dw.then(|| Tensor::from_vec(dw, (n_out, n_in), dev)).transpose()?;
        let db = Tensor::from_vec(db, n_out, dev)?;
        Ok((dx, dw, Some(db)))
    }
}

/// The forward-mode pass of [`dense`] on detached tensors: `(y, ẏ)` with `y = act(x·Wᵀ + b)` and
/// `ẏ = act'(x·Wᵀ + b) ⊙ (ẋ·Wᵀ)`. On the CPU in f32 both products and the activation run per block of rows
/// in one pass; elsewhere `None` (the caller uses candle's ops).
pub fn dense_jvp(x: &Tensor, dx: &Tensor, w: &Tensor, b: &Tensor, act: Activation) -> Result<Option<(Tensor, Tensor)>> {
    if !(super::applies(x.device(), x.dtype()) && x.rank() == 2 && w.rank() == 2 && b.rank() == 1) {
        return Ok(None);
    }
    let (x, dx) = (x.detach().contiguous()?, dx.detach().contiguous()?);
    let (rows_b, n_in) = x.dims2()?;
    let n_out = w.dim(0)?;
    if dx.dims() != x.dims() || w.dim(1)? != n_in || b.dim(0)? != n_out {
        return Err(crate::Error::arg("dense JVP: shapes of x, ẋ, W and b do not agree"));
    }
    let (Some(xr), Some(dxr), Some(wr), Some(br)) = (super::read(&x), super::read(&dx), super::read(w), super::read(b))
    else {
        return Ok(None);
    };
    let (y, dy) = jvp_slices(xr.slice(), dxr.slice(), wr.slice(), br.slice(), rows_b, act);
    let dev = x.device();
    Ok(Some((
        Tensor::from_vec(y, (rows_b, n_out), dev)?,
        Tensor::from_vec(dy, (rows_b, n_out), dev)?,
    )))
}

fn jvp_slices(x: &[f32], dx: &[f32], w: &[f32], bias: &[f32], b: usize, act: Activation) -> (Vec<f32>, Vec<f32>) {
    let (n_out, n_in) = (bias.len(), w.len() / bias.len());
    let n = b * n_out;
    let rows = super::block_rows(b);
    let skinny = use_dots(b, n_out);
    let wt = forward_weight(w, n_out, b, rows);
    let zero = vec![0.0f32; n_out];
    let mut y: Vec<f32> = Vec::with_capacity(n);
    let mut dy: Vec<f32> = Vec::with_capacity(n);
    let blocks: Vec<_> = y.spare_capacity_mut()[..n]
        .chunks_mut(rows * n_out)
        .zip(dy.spare_capacity_mut()[..n].chunks_mut(rows * n_out))
        .zip(
            x.chunks(rows * n_in.max(1))
                .zip(dx.chunks(rows * n_in.max(1)))
                .chain(std::iter::repeat((&[][..], &[][..]))),
        )
        .collect();
    super::map_blocks(blocks, |((yc, dyc), (xc, dxc))| {
        // Without the bias for the tangent; for the skinny kernel the primal's bias is added in the product.
        let weight = Weight { w, wt: wt.as_deref() };
        project_block(xc, weight, bias, n_in, yc, skinny);
        project_block(dxc, weight, &zero, n_in, dyc, skinny);
        // SAFETY: project_block wrote all of both blocks.
        let (yc, dyc) = unsafe { (assume_init(yc), assume_init(dyc)) };
        let b_here = if skinny { &zero[..] } else { bias };
        match act {
            Activation::Identity => simd::add_bias(yc, b_here),
            Activation::Silu => simd::silu_jvp(yc, dyc, b_here),
        }
    });
    // SAFETY: every block of both was written above.
    unsafe {
        y.set_len(n);
        dy.set_len(n);
    }
    (y, dy)
}
