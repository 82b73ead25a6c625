//! A whole MLP (`h ← act(h·Wᵀ + b)` layer after layer) as one graph node for training on the CPU, and as
//! one pass without a node for inference.
//!
//! Layer by layer, candle's autograd gives every hidden activation's gradient a zero-filled buffer and an
//! addition pass (`or_insert` then `add`), every layer its own parallel region, and every intermediate a
//! fresh tensor. As one node:
//!
//! - each block of rows goes through *all* layers on one core, forward and then backward, while its
//!   activations sit in that core's L2 cache; the forward pass and the backward pass are one parallel
//!   region each;
//! - hidden gradients live in two per-block scratch buffers; only the input's gradient (when asked) and
//!   the parameters' gradient leave the node;
//! - a batch of 128 to 511 rows runs as two blocks, so both cores work on it (a single `dense` layer at
//!   that size is not worth splitting).
//!
//! The node reads the layers' own parameters in place. candle's graph nodes take at most three inputs, so
//! the parameters join the graph through a chain of small link nodes, one per layer, each taking the
//! previous link's one-element output, that layer's `W` and its `b`; the MLP node takes the input and the
//! last link. The backward pass reaches the MLP node first (it is the chain's only consumer), computes
//! every gradient in one sweep and leaves each layer's `dW`, `db` for its link to hand to candle. Each
//! parameter's gradient thus costs candle one accumulation, where a flat copy of the parameters
//! (`cat` of the flattened weights) cost three — the copy, `cat`'s and the reshape's — plus the copy
//! itself, about 8% of a batch-256 step. Per-block partial sums of `dW` and `db` are added in block order,
//! and blocks depend on the batch alone: the same numbers on any thread count.
//!
//! Under [`no_grad`](super::no_grad) (inference, stop-gradient targets) there is no graph node: the same
//! blocks go through the same per-block steps in scratch buffers, reading the parameters in place, and
//! only the output is kept.

mod infer;

use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};

use super::dense::{assume_init, forward_block, forward_weight, use_dots, weight_grads, Activation, Weight, SKINNY};
use super::simd;
use crate::Result;
use infer::infer;

/// The smallest batch that takes the fused node (two blocks of rows; see [`block_rows`]).
const FUSED_ROWS: usize = 128;

/// One layer of an [`mlp`]: weight (`out × in`), bias (`out`), activation.
pub type Layer<'a> = (&'a Tensor, &'a Tensor, Activation);

/// `h ← act(h·Wᵀ + b)` through every layer. Gradients reach `h` and every `W` and `b`.
///
/// On the CPU in f32: with nothing tracked (under [`no_grad`](super::no_grad), or on detached tensors) one
/// pass without a graph node, bit-identical to the training forward; when tracked, for batches of 128 rows
/// or more, one fused node (see the module's doc); for smaller tracked batches, where the flat copy of the
/// parameters would cost more than it saves, and on another device or dtype, [`super::dense`] layer by
/// layer, which it agrees with to f32 rounding.
pub fn mlp(h: &Tensor, layers: &[Layer<'_>]) -> Result<Tensor> {
    let tracked =
        super::grad_enabled() && (h.track_op() || layers.iter().any(|(w, b, _)| w.track_op() || b.track_op()));
    let fits = super::applies(h.device(), h.dtype())
        && h.rank() == 2
        && !layers.is_empty()
        && layers
            .iter()
            .all(|(w, b, _)| w.rank() == 2 && b.rank() == 1 && w.dtype() == h.dtype() && b.dtype() == h.dtype())
        && layers.iter().all(|(w, b, _)| w.is_contiguous() && b.is_contiguous());
    if fits && !tracked {
        if let Some(y) = infer(h, layers)? {
            return Ok(y);
        }
    }
    // Below two blocks of rows one core runs every layer either way, and candle's layer-by-layer nodes
    // cost less than the fused node's gradient sums (single-sample generation: 0.24 ms against 0.08 ms
    // layer by layer when the node copied the parameters).
    if !(tracked && fits && h.dim(0)? >= FUSED_ROWS) {
        return layers
            .iter()
            .try_fold(h.clone(), |h, (w, b, act)| super::dense(&h, w, b, *act));
    }
    let shapes = layer_shapes(h, layers)?;
    let state = Arc::new(Mutex::new(State {
        saved: None,
        grads: vec![None; layers.len()],
    }));
    // The link chain: one node per layer whose parameters want a gradient.
    let mut link = Tensor::zeros(1, DType::F32, h.device())?;
    for (layer, (w, b, _)) in layers.iter().enumerate() {
        if w.track_op() || b.track_op() {
            link = link.apply_op3(
                w,
                b,
                ParamLink {
                    layer,
                    state: state.clone(),
                },
            )?;
        }
    }
    let op = MlpOp {
        layers: shapes,
        params: layers.iter().map(|(w, b, _)| ((*w).clone(), (*b).clone())).collect(),
        state,
    };
    Ok(h.contiguous()?.apply_op2(&link, op)?)
}

/// The layers' shapes, checked against each other and the input, with their offsets in the flat parameters.
fn layer_shapes(h: &Tensor, layers: &[Layer<'_>]) -> Result<Vec<LayerShape>> {
    let mut shapes = Vec::with_capacity(layers.len());
    let mut n_in = h.dim(1)?;
    let mut offset = 0;
    for (w, b, act) in layers {
        let (n_out, w_in) = w.dims2()?;
        if w_in != n_in || b.dim(0)? != n_out || n_out == 0 {
            return Err(crate::Error::arg(format!(
                "mlp: a layer's weight is {n_out}×{w_in} and bias has {} entries after {n_in} features",
                b.dim(0)?
            )));
        }
        shapes.push(LayerShape {
            n_in,
            n_out,
            act: *act,
            offset,
        });
        offset += n_out * n_in + n_out;
        n_in = n_out;
    }
    Ok(shapes)
}

/// Rows of a `width`-wide row-major buffer cut at the column `bounds`: per part, its piece of every row.
fn split_columns<'a, T>(buf: &'a mut [T], width: usize, bounds: &[usize]) -> Vec<Vec<&'a mut [T]>> {
    let mut parts: Vec<Vec<&mut [T]>> = bounds.windows(2).map(|_| Vec::new()).collect();
    for mut row in buf.chunks_exact_mut(width) {
        for (part, cut) in parts.iter_mut().zip(bounds.windows(2)) {
            let (piece, rest) = row.split_at_mut(cut[1] - cut[0]);
            part.push(piece);
            row = rest;
        }
    }
    parts
}

/// A scratch buffer as initialised floats.
///
/// # Safety
/// Every element must have been written.
unsafe fn into_init(v: Vec<MaybeUninit<f32>>) -> Vec<f32> {
    let mut v = std::mem::ManuallyDrop::new(v);
    Vec::from_raw_parts(v.as_mut_ptr().cast(), v.len(), v.capacity())
}

/// `n` floats of scratch space, left uninitialised: every kernel that reads a scratch buffer reads what
/// a kernel before it wrote (zero-filling the per-block buffers cost a memset per block and layer).
fn scratch(n: usize) -> Vec<MaybeUninit<f32>> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: MaybeUninit<f32> needs no initialisation.
    unsafe { v.set_len(n) };
    v
}

/// A layer's shape and where its `dW` (then `db`) starts in the backward pass's flat gradient.
#[derive(Clone, Copy, Debug)]
struct LayerShape {
    n_in: usize,
    n_out: usize,
    act: Activation,
    offset: usize,
}

/// Every layer's `(W, b)` data.
type Params<'a> = [(&'a [f32], &'a [f32])];

/// One block's chunks of every layer's buffer.
type Chunks<'a, T> = Vec<&'a mut [T]>;

/// A block of rows in the forward pass: its index, and its chunk of each layer's `y` and `σ(z)`.
type ForwardBlock<'a> = (usize, Chunks<'a, MaybeUninit<f32>>, Chunks<'a, MaybeUninit<f32>>);

/// A block of rows in the backward pass: its index, its chunk of each layer's `σ(z)` (overwritten with
/// `dz`), and its chunk of the input's gradient when asked.
type BackwardBlock<'a> = (usize, Chunks<'a, f32>, Option<&'a mut [MaybeUninit<f32>]>);

/// What the forward pass keeps for the backward pass, per layer: its output `y` and, for SiLU, `σ(z)`.
struct Saved {
    y: Vec<Vec<f32>>,
    s: Vec<Vec<f32>>,
}

/// What the MLP node and its links share: the forward pass's activations, and each layer's `(dW, db)`
/// from the backward pass until its link hands them on.
struct State {
    saved: Option<Saved>,
    grads: Vec<Option<(Tensor, Tensor)>>,
}

struct MlpOp {
    layers: Vec<LayerShape>,
    /// Each layer's `W` and `b`, read in place.
    params: Vec<(Tensor, Tensor)>,
    state: Arc<Mutex<State>>,
}

/// Joins layer `layer`'s `W` and `b` to the graph (see the module's doc): a one-element output, and in the
/// backward pass the layer's gradients, which the MLP node's backward pass left in the shared state.
struct ParamLink {
    layer: usize,
    state: Arc<Mutex<State>>,
}

impl CustomOp3 for ParamLink {
    fn name(&self) -> &'static str {
        "flowmap-mlp-params"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(vec![0.0]), Shape::from(1)))
    }

    fn bwd(
        &self,
        link: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        _grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dw, db) = self.state.lock().expect("mlp: shared state").grads[self.layer]
            .take()
            .ok_or_else(|| candle_core::Error::Msg("mlp: a layer's gradients were not computed".into()))?;
        // A tracked node needs a gradient, even one that carries nothing.
        let dlink = link.track_op().then(|| link.zeros_like()).transpose()?;
        Ok((dlink, w.track_op().then_some(dw), b.track_op().then_some(db)))
    }
}

/// Rows per block of a fused MLP: as [`super::block_rows`], except that 128 to 511 rows make two blocks.
fn block_rows(b: usize) -> usize {
    if (FUSED_ROWS..super::PARALLEL_ROWS).contains(&b) {
        b.div_ceil(2)
    } else {
        super::block_rows(b)
    }
}

/// Each layer's weight transposed once for all the blocks of a `b`-row forward pass, where that pays
/// ([`forward_weight`]); the layers across the threads.
fn transposed_weights<'a>(
    layers: &[LayerShape],
    weights: impl Iterator<Item = &'a [f32]>,
    b: usize,
) -> Vec<Option<Vec<f32>>> {
    let rows = block_rows(b);
    let jobs: Vec<_> = layers.iter().zip(weights).collect();
    let transpose = |(l, w): (&LayerShape, &[f32])| forward_weight(w, l.n_out, b, rows);
    if b <= rows {
        // One block reads `W` itself: nothing to transpose, nothing to hand to other threads.
        return jobs.into_iter().map(transpose).collect();
    }
    super::map_blocks(jobs, transpose)
}

/// Splits `v` (`b` rows of `width`) into the blocks of [`block_rows`].
fn row_chunks<T>(v: &mut [T], b: usize, width: usize) -> std::slice::ChunksMut<'_, T> {
    v.chunks_mut((block_rows(b) * width).max(1))
}

impl MlpOp {
    /// Every layer's output `y` and (SiLU) `σ(z)`, block by block.
    fn forward(&self, h0: &[f32], params: &Params<'_>, b: usize) -> Saved {
        let mut y: Vec<Vec<f32>> = self.layers.iter().map(|l| Vec::with_capacity(b * l.n_out)).collect();
        let mut s: Vec<Vec<f32>> = self
            .layers
            .iter()
            .map(|l| Vec::with_capacity(if l.act == Activation::Silu { b * l.n_out } else { 0 }))
            .collect();
        {
            // Per block: every layer's output chunk and σ chunk.
            let nblocks = b.div_ceil(block_rows(b)).max(1);
            let mut blocks: Vec<ForwardBlock<'_>> = (0..nblocks).map(|i| (i, Vec::new(), Vec::new())).collect();
            for (l, (yl, sl)) in self.layers.iter().zip(y.iter_mut().zip(s.iter_mut())) {
                let silu = l.act == Activation::Silu;
                let ys = row_chunks(&mut yl.spare_capacity_mut()[..b * l.n_out], b, l.n_out);
                let mut ss = row_chunks(
                    &mut sl.spare_capacity_mut()[..if silu { b * l.n_out } else { 0 }],
                    b,
                    l.n_out,
                );
                for (blk, yc) in blocks.iter_mut().zip(ys) {
                    blk.1.push(yc);
                    blk.2.push(if silu {
                        ss.next().expect("σ has every block")
                    } else {
                        &mut []
                    });
                }
            }
            let rows = block_rows(b);
            let wts = transposed_weights(&self.layers, params.iter().map(|(w, _)| *w), b);
            super::map_blocks(blocks, |(i, mut ys, mut ss)| {
                let r0 = i * rows;
                let m = rows.min(b - r0);
                for (li, l) in self.layers.iter().enumerate() {
                    let (done, rest) = ys.split_at_mut(li);
                    let input: &[f32] = if li == 0 {
                        &h0[r0 * l.n_in..(r0 + m) * l.n_in]
                    } else {
                        // SAFETY: the previous layer's chunk was written in full in the previous iteration.
                        unsafe { assume_init(&mut *done[li - 1]) }
                    };
                    let ((w, bias), skinny) = (params[li], use_dots(b, l.n_out));
                    // SiLU computes z into the σ chunk and writes y; the identity writes z as y.
                    let (zc, yc) = match l.act {
                        Activation::Silu => (&mut *ss[li], Some(&mut *rest[0])),
                        Activation::Identity => (&mut *rest[0], None),
                    };
                    forward_block(
                        input,
                        Weight {
                            w,
                            wt: wts[li].as_deref(),
                        },
                        bias,
                        l.n_in,
                        zc,
                        yc,
                        skinny,
                    );
                }
            });
        }
        // SAFETY: every block of every layer's y (and σ for SiLU) was written in full above.
        unsafe {
            for (l, (yl, sl)) in self.layers.iter().zip(y.iter_mut().zip(s.iter_mut())) {
                yl.set_len(b * l.n_out);
                if l.act == Activation::Silu {
                    sl.set_len(b * l.n_out);
                }
            }
        }
        Saved { y, s }
    }

    /// Per block, from the last layer down: `dz = g ⊙ act'(z)`, `db += Σ_rows dz`, `dW += dzᵀ·input`, and
    /// `g ← dz·W` for the layer below (for the first layer only when `need_dx`). Returns `(dx, dflat)`.
    fn backward(
        &self,
        h0: &[f32],
        params: &Params<'_>,
        g: &[f32],
        mut saved: Saved,
        b: usize,
        need_dx: bool,
    ) -> (Option<Vec<f32>>, Vec<f32>) {
        let rows = block_rows(b);
        let first_in = self.layers[0].n_in;
        let widest = self.layers.iter().map(|l| l.n_in.max(l.n_out)).max().unwrap_or(0);
        let mut dx: Vec<f32> = Vec::with_capacity(if need_dx { b * first_in } else { 0 });
        let nblocks = b.div_ceil(rows).max(1);
        let partials = {
            let mut blocks: Vec<BackwardBlock<'_>> = (0..nblocks).map(|i| (i, Vec::new(), None)).collect();
            for (l, sl) in self.layers.iter().zip(saved.s.iter_mut()) {
                if l.act == Activation::Silu {
                    for (blk, sc) in blocks.iter_mut().zip(row_chunks(sl, b, l.n_out)) {
                        blk.1.push(sc);
                    }
                } else {
                    blocks.iter_mut().for_each(|blk| blk.1.push(&mut []));
                }
            }
            if need_dx {
                for (blk, dc) in
                    blocks
                        .iter_mut()
                        .zip(row_chunks(&mut dx.spare_capacity_mut()[..b * first_in], b, first_in))
                {
                    blk.2 = Some(dc);
                }
            }
            let ys = &saved.y;
            let total = self.param_count();
            super::map_blocks(blocks, |(i, mut ss, mut dxc)| {
                let r0 = i * rows;
                let m = rows.min(b - r0);
                // Every element is written below: each layer's dW by its product, its db zeroed then summed.
                let mut part: Vec<f32> = Vec::with_capacity(total);
                let (mut cur, mut next) = (scratch(m * widest), scratch(m * widest));
                let n_last = self.layers[self.layers.len() - 1].n_out;
                for (c, v) in cur.iter_mut().zip(&g[r0 * n_last..][..m * n_last]) {
                    c.write(*v);
                }
                for (li, l) in self.layers.iter().enumerate().rev() {
                    let (n_in, n_out) = (l.n_in, l.n_out);
                    // SAFETY: written in full by the copy above (last layer) or by the layer above's `dz·W`.
                    let grad: &[f32] = unsafe { assume_init(&mut cur[..m * n_out]) };
                    let (dw, db) =
                        part.spare_capacity_mut()[l.offset..l.offset + n_out * n_in + n_out].split_at_mut(n_out * n_in);
                    db.iter_mut().for_each(|v| {
                        v.write(0.0);
                    });
                    // SAFETY: zeroed just above.
                    let db = unsafe { assume_init(db) };
                    let dz: &[f32] = match l.act {
                        Activation::Silu => {
                            let sc = &mut *ss[li];
                            simd::silu_backward(sc, &ys[li][r0 * n_out..(r0 + m) * n_out], grad, db);
                            sc
                        }
                        Activation::Identity => {
                            simd::column_sum(grad, db);
                            grad
                        }
                    };
                    let input: &[f32] = if li == 0 {
                        &h0[r0 * n_in..(r0 + m) * n_in]
                    } else {
                        &ys[li - 1][r0 * n_in..(r0 + m) * n_in]
                    };
                    let w = params[li].0;
                    // Where dz·W goes: the next (lower) layer's gradient, or the input's.
                    let out: Option<&mut [MaybeUninit<f32>]> = if li > 0 {
                        Some(&mut next[..m * n_in])
                    } else {
                        dxc.take()
                    };
                    let skinny = use_dots(m, n_out);
                    weight_grads(dz, w, input, n_in, out, dw, skinny);
                    std::mem::swap(&mut cur, &mut next);
                }
                // SAFETY: the layers' dW and db tile the flat parameters, and each was written above.
                unsafe { part.set_len(total) };
                part
            })
        };
        let dflat = super::sum_in_order(partials).unwrap_or_else(|| vec![0.0f32; self.param_count()]);
        if need_dx {
            // SAFETY: every block of dx was written in full by the first layer's backward step.
            unsafe { dx.set_len(b * first_in) };
        }
        (need_dx.then_some(dx), dflat)
    }

    /// The number of parameters, every layer's `W` and `b`.
    fn param_count(&self) -> usize {
        let last = self.layers.last().expect("an mlp has layers");
        last.offset + last.n_out * last.n_in + last.n_out
    }

    /// Read access to every layer's `W` and `b`.
    fn read_params(&self) -> candle_core::Result<Vec<(super::CpuRead<'_>, super::CpuRead<'_>)>> {
        self.params
            .iter()
            .map(|(w, b)| match (super::read(w), super::read(b)) {
                (Some(w), Some(b)) => Ok((w, b)),
                _ => candle_core::bail!("mlp: parameters must be contiguous f32 on the CPU"),
            })
            .collect()
    }
}

/// Slices of the read parameters.
fn slices<'a>(reads: &'a [(super::CpuRead<'_>, super::CpuRead<'_>)]) -> Vec<(&'a [f32], &'a [f32])> {
    reads.iter().map(|(w, b)| (w.slice(), b.slice())).collect()
}

impl CustomOp2 for MlpOp {
    fn name(&self) -> &'static str {
        "flowmap-mlp"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let h0 = super::cpu_slice(s1, l1, "mlp: input")?;
        let (b, n_in) = l1.shape().dims2()?;
        if n_in != self.layers[0].n_in {
            candle_core::bail!(
                "mlp: input has {n_in} features, the first layer takes {}",
                self.layers[0].n_in
            );
        }
        let reads = self.read_params()?;
        let saved = self.forward(h0, &slices(&reads), b);
        let out = saved.y.last().expect("an mlp has layers").clone();
        self.state.lock().expect("mlp: shared state").saved = Some(saved);
        let n_out = self.layers.last().expect("an mlp has layers").n_out;
        Ok((CpuStorage::F32(out), Shape::from((b, n_out))))
    }

    /// Returns the input's gradient, and leaves every layer's `(dW, db)` for its link (views of one buffer).
    fn bwd(
        &self,
        h0: &Tensor,
        link: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (b, n_in) = h0.dims2()?;
        let missing = || candle_core::Error::Msg("mlp backward: inputs are not contiguous f32 on the CPU".into());
        let (hr, gr) = (
            super::read(h0).ok_or_else(missing)?,
            super::read(&grad).ok_or_else(missing)?,
        );
        let reads = self.read_params()?;
        let params = slices(&reads);
        // A second backward through the same graph recomputes the forward pass.
        let saved = self.state.lock().expect("mlp: shared state").saved.take();
        let saved = saved.unwrap_or_else(|| self.forward(hr.slice(), &params, b));
        let (dx, dflat) = self.backward(hr.slice(), &params, gr.slice(), saved, b, h0.track_op());
        let dev = h0.device();
        let dx = dx.map(|v| Tensor::from_vec(v, (b, n_in), dev)).transpose()?;
        if link.track_op() {
            let dflat = Tensor::from_vec(dflat, self.param_count(), dev)?;
            let mut state = self.state.lock().expect("mlp: shared state");
            for (slot, l) in state.grads.iter_mut().zip(&self.layers) {
                let dw = dflat
                    .narrow(0, l.offset, l.n_out * l.n_in)?
                    .reshape((l.n_out, l.n_in))?;
                let db = dflat.narrow(0, l.offset + l.n_out * l.n_in, l.n_out)?;
                *slot = Some((dw, db));
            }
        }
        let dlink = link.track_op().then(|| link.zeros_like()).transpose()?;
        Ok((dx, dlink))
    }
}
