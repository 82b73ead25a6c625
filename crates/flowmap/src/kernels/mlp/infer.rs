//! The MLP without a graph node: inference, in the training node's blocks and steps (so the same bits), and
//! single-sample inference with each layer's weights split across the threads.

use super::*;

/// Inference (nothing tracked): every block of rows through every layer in per-block scratch buffers (two
/// for the activations in turn, one for σ(z)), reading the parameters in place, with no graph node and
/// nothing kept. The same blocks and per-block
/// steps as the training node, so the same numbers. `None` when a tensor is not contiguous f32 on the CPU.
pub(super) fn infer(h: &Tensor, layers: &[Layer<'_>]) -> Result<Option<Tensor>> {
    let shapes = layer_shapes(h, layers)?;
    let h = h.contiguous()?;
    let b = h.dim(0)?;
    let (Some(hr), Some(params)) = (
        crate::kernels::read(&h),
        layers
            .iter()
            .map(|(w, bias, _)| Some((crate::kernels::read(w)?, crate::kernels::read(bias)?)))
            .collect::<Option<Vec<_>>>(),
    ) else {
        return Ok(None);
    };
    let h0 = hr.slice();
    let n_last = shapes.last().expect("an mlp has layers").n_out;
    let threads = crate::kernels::threads();
    if b <= SKINNY && threads > 1 && shapes.iter().any(|l| l.n_in * l.n_out >= SPLIT_WEIGHTS) {
        let out = infer_few_rows(h0, &shapes, &params, b, threads);
        return Ok(Some(Tensor::from_vec(out, (b, n_last), h.device())?));
    }
    let widest = shapes.iter().map(|l| l.n_out).max().unwrap_or(0);
    let rows = block_rows(b);
    let mut out: Vec<f32> = Vec::with_capacity(b * n_last);
    let wts = transposed_weights(&shapes, params.iter().map(|(w, _)| w.slice()), b);
    {
        let blocks: Vec<_> = row_chunks(&mut out.spare_capacity_mut()[..b * n_last], b, n_last)
            .enumerate()
            .collect();
        crate::kernels::map_blocks(blocks, |(i, oc)| {
            let r0 = i * rows;
            let m = oc.len() / n_last;
            // Ping-pong activations and the SiLU's σ(z), which inference does not keep.
            let (mut a, mut next, mut sig) = (scratch(m * widest), scratch(m * widest), scratch(m * widest));
            let mut oc = Some(oc);
            for (li, (l, (w, bias))) in shapes.iter().zip(&params).enumerate() {
                let input: &[f32] = if li == 0 {
                    &h0[r0 * l.n_in..(r0 + m) * l.n_in]
                } else {
                    // SAFETY: the previous layer wrote its m × n_in output here in full.
                    unsafe { assume_init(&mut a[..m * l.n_in]) }
                };
                let dst: &mut [MaybeUninit<f32>] = if li + 1 == shapes.len() {
                    oc.take().expect("the last layer writes the output once")
                } else {
                    &mut next[..m * l.n_out]
                };
                let skinny = use_dots(b, l.n_out);
                let weight = Weight {
                    w: w.slice(),
                    wt: wts[li].as_deref(),
                };
                match l.act {
                    Activation::Silu => forward_block(
                        input,
                        weight,
                        bias.slice(),
                        l.n_in,
                        &mut sig[..m * l.n_out],
                        Some(dst),
                        skinny,
                    ),
                    Activation::Identity => forward_block(input, weight, bias.slice(), l.n_in, dst, None, skinny),
                }
                std::mem::swap(&mut a, &mut next);
            }
        });
    }
    // SAFETY: the last layer wrote every block of the output in full.
    unsafe { out.set_len(b * n_last) };
    Ok(Some(Tensor::from_vec(out, (b, n_last), h.device())?))
}

/// Layers with at least this many weights split their outputs across the threads in [`infer_few_rows`].
const SPLIT_WEIGHTS: usize = 1 << 15;

/// Inference for at most [`SKINNY`] rows (single-sample generation), where each layer is one dot product
/// per output and row and streaming the weights is the whole cost. Each layer with [`SPLIT_WEIGHTS`] or more
/// weights splits its outputs across the threads, every thread taking the same share at every call
/// ([`crate::kernels::map_blocks_pinned`]), so that its share of the weights stays in its own core's L2 cache from
/// one call to the next (on a Xeon with 2 MB of L2 per core, a width-512 network's 2.1 MB of weights read
/// from L3 took 87% of a sample's time; one sample at width 512 went from 0.069 to 0.046 ms on a 2-core AMD
/// EPYC). Every output is the same dot product as in [`infer`]'s single block: the same bits.
fn infer_few_rows(
    h0: &[f32],
    shapes: &[LayerShape],
    params: &[(crate::kernels::CpuRead<'_>, crate::kernels::CpuRead<'_>)],
    b: usize,
    threads: usize,
) -> Vec<f32> {
    let mut x: Vec<f32> = Vec::new();
    for (li, (l, (w, bias))) in shapes.iter().zip(params).enumerate() {
        let (w, bias, n_in, n_out) = (w.slice(), bias.slice(), l.n_in, l.n_out);
        let input: &[f32] = if li == 0 { h0 } else { &x };
        let parts = if n_in * n_out >= SPLIT_WEIGHTS {
            threads.min(n_out)
        } else {
            1
        };
        let bounds: Vec<usize> = (0..=parts).map(|p| p * n_out / parts).collect();
        let silu = matches!(l.act, Activation::Silu);
        // z (σ(z) after a SiLU) and the SiLU's output y, each part writing its columns of every row.
        let (mut z, mut y) = (scratch(b * n_out), scratch(if silu { b * n_out } else { 0 }));
        let zs = split_columns(&mut z, n_out, &bounds);
        let ys: Vec<Option<Vec<_>>> = if silu {
            split_columns(&mut y, n_out, &bounds).into_iter().map(Some).collect()
        } else {
            (0..parts).map(|_| None).collect()
        };
        let blocks: Vec<_> = zs.into_iter().zip(ys).enumerate().collect();
        crate::kernels::map_blocks_pinned(blocks, |(p, (zp, yp))| {
            let (j0, j1) = (bounds[p], bounds[p + 1]);
            let weight = Weight {
                w: &w[j0 * n_in..j1 * n_in],
                wt: None,
            };
            let mut yp = yp.map(Vec::into_iter);
            for (r, zc) in zp.into_iter().enumerate() {
                let yc = yp.as_mut().map(|it| it.next().expect("a piece of y per row"));
                forward_block(
                    &input[r * n_in..(r + 1) * n_in],
                    weight,
                    &bias[j0..j1],
                    n_in,
                    zc,
                    yc,
                    true,
                );
            }
        });
        // SAFETY: the parts wrote their columns of every row of z and y, so all of both.
        x = unsafe { into_init(if silu { y } else { z }) };
    }
    x
}
