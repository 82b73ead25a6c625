//! GroupNorm (with its affine map, the per-sample scale-shift and SiLU) followed by a convolution, as one
//! graph node on the CPU that keeps no normalised activation:
//!
//! ```text
//! n = act(GN(x) ⊙ (1 + a) + b),   y = W ⋆ n + bias
//! ```
//!
//! As two nodes, candle holds `n` from the forward pass until the backward pass is done (it is the
//! convolution's input), one full activation for each norm of the U-Net. This node holds `x`, which the
//! graph holds anyway, and recomputes `n` image by image in the backward pass, where it stays in cache:
//! the convolution's backward gives `∂/∂n`, and GroupNorm's backward takes it to `x`, the scale-shift and
//! the affine parameters. Images go in blocks of [`conv::IMAGES_PER_BLOCK`] whatever the thread count, and
//! the parameters' per-block partial sums are added in block order: the same bits on any number of threads.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::conv::{self, Geometry, IMAGES_PER_BLOCK};
use super::norm::{self, Dims};
use super::scratch::Scratch;
use super::{applies, cpu_slice, map_blocks, sum_in_order};
use crate::Result;

/// `W ⋆ act(GN(x) ⊙ (1 + a) + b) + bias`: [`group_norm`](super::group_norm) (`affine = [γ; β]`, `ss` the
/// per-sample `[a, b]`, `B × 2C`) then [`conv2d`](super::conv2d) (`w`: `O × C × k × k`, `k` odd, stride 1,
/// padding `k / 2`). Gradients flow to all five. One node on f32 CPU tensors; elsewhere the two layers one
/// after the other, each on its own path. It agrees with [`plain`] to f32 rounding.
#[allow(clippy::too_many_arguments)]
pub fn norm_conv2d(
    x: &Tensor,
    groups: usize,
    eps: f64,
    affine: &Tensor,
    ss: &Tensor,
    silu: bool,
    w: &Tensor,
    bias: &Tensor,
) -> Result<Tensor> {
    let (b, c, _, _) = x.dims4()?;
    let (o, c_w, k, k2) = w.dims4()?;
    let fits = k == k2 && k % 2 == 1 && c_w == c && c % groups == 0;
    if !(applies(x.device(), x.dtype()) && fits) {
        return super::conv2d(&super::group_norm(x, groups, eps, affine, ss, silu)?, w, bias);
    }
    if affine.dims() != [2 * c] || ss.dims() != [b, 2 * c] || bias.dims() != [o] {
        return Err(crate::Error::arg(format!(
            "norm + conv: [γ; β] {:?}, scale-shift {:?} and bias {:?} do not fit {c} input and {o} output channels",
            affine.dims(),
            ss.dims(),
            bias.dims()
        )));
    }
    // The parameters as one vector, `[γ; β; W; bias]`: the node takes three inputs.
    let params = Tensor::cat(&[affine, &w.flatten_all()?, bias], 0)?;
    let (x, ss) = (x.contiguous()?, ss.contiguous()?);
    let op = NormConvOp {
        groups,
        eps,
        silu,
        c_out: o,
        k,
    };
    let tracked = super::grad_enabled() && (x.track_op() || ss.track_op() || params.track_op());
    Ok(if tracked {
        x.apply_op3(&ss, &params, op)?
    } else {
        x.apply_op3_no_bwd(&ss, &params, &op)?
    })
}

/// The reference, from candle's primitive ops: [`norm::plain`] then [`conv::plain`].
#[allow(clippy::too_many_arguments)]
pub fn plain(
    x: &Tensor,
    groups: usize,
    eps: f64,
    affine: &Tensor,
    ss: &Tensor,
    silu: bool,
    w: &Tensor,
    bias: &Tensor,
) -> Result<Tensor> {
    conv::plain(&norm::plain(x, groups, eps, affine, ss, silu)?, w, bias)
}

struct NormConvOp {
    groups: usize,
    eps: f64,
    silu: bool,
    c_out: usize,
    k: usize,
}

impl NormConvOp {
    fn shapes(&self, x: &Layout, params: usize) -> candle_core::Result<(usize, Dims, Geometry)> {
        let (b, c, h, w) = x.shape().dims4()?;
        let (o, k) = (self.c_out, self.k);
        if params != 2 * c + o * c * k * k + o {
            candle_core::bail!("norm + conv: {params} parameters do not fit {c} → {o} channels, k = {k}");
        }
        let d = Dims {
            c,
            hw: h * w,
            groups: self.groups,
        };
        let g = Geometry {
            c_in: c,
            c_out: o,
            h,
            w,
            k,
        };
        Ok((b, d, g))
    }
}

/// `[γ; β; W; bias]` split into its four parts for input `C`, output `O` and kernel `k`.
fn split(p: &[f32], g: Geometry) -> (&[f32], &[f32], &[f32], &[f32]) {
    let (gamma, rest) = p.split_at(g.c_in);
    let (beta, rest) = rest.split_at(g.c_in);
    let (w, bias) = rest.split_at(g.c_out * g.rows());
    (gamma, beta, w, bias)
}

impl CustomOp3 for NormConvOp {
    fn name(&self) -> &'static str {
        "flowmap-norm-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, s, p) = (
            cpu_slice(xs, xl, "x")?,
            cpu_slice(ss, sl, "ss")?,
            cpu_slice(ps, pl, "params")?,
        );
        let (b, d, g) = self.shapes(xl, p.len())?;
        let (gamma, beta, w, bias) = split(p, g);
        let c = d.c;
        let norm = |img: usize, xi: &[f32], n: &mut [f32]| {
            let (a, sh) = s[img * 2 * c..(img + 1) * 2 * c].split_at(c);
            let st = norm::stats(xi, d, self.eps);
            norm::forward_image_into(xi, d, &st, norm::modulation(gamma, beta, a, sh), self.silu, n);
        };
        let y = conv::forward_batch(g, b, w, bias, x, Some(&norm));
        Ok((CpuStorage::F32(y), Shape::from((b, g.c_out, g.h, g.w))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        ss: &Tensor,
        params: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (Some(xr), Some(sr), Some(pr), Some(gr)) =
            (super::read(x), super::read(ss), super::read(params), super::read(&grad))
        else {
            candle_core::bail!("norm + conv backward needs contiguous f32 CPU tensors");
        };
        let (xs, s, p, gs) = (xr.slice(), sr.slice(), pr.slice(), gr.slice());
        let (b, d, g) = self.shapes(x.layout(), p.len())?;
        let (gamma, beta, w, _) = split(p, g);
        let (c, hw, o) = (d.c, d.hw, g.c_out);
        let back = conv::Backward::new(g, w);
        let mut dx = vec![0.0f32; b * c * hw];
        let mut dss = vec![0.0f32; b * 2 * c];
        let blocks: Vec<super::GradBlock<'_>> = dx
            .chunks_mut(IMAGES_PER_BLOCK * c * hw)
            .enumerate()
            .zip(dss.chunks_mut(IMAGES_PER_BLOCK * 2 * c))
            .collect();
        // Per block: its images' dx and d[a, b], and its partial gradients of the convolution's `W` and
        // bias and of `[γ; β]`.
        let partials = map_blocks(blocks, |((i, dxb), dssb)| {
            // Scratch, written before it is read.
            let (mut n, mut dn, mut gxhat) = (Scratch::new(c * hw), Scratch::new(c * hw), Scratch::new(c * hw));
            let mut cols_g = g.g_cols_scratch();
            let mut dwb = back.partial();
            let mut dp = vec![0.0f32; 2 * c];
            for (j, (dxi, dssi)) in dxb.chunks_mut(c * hw).zip(dssb.chunks_mut(2 * c)).enumerate() {
                let img = i * IMAGES_PER_BLOCK + j;
                let (a, sh) = s[img * 2 * c..(img + 1) * 2 * c].split_at(c);
                let xi = &xs[img * c * hw..(img + 1) * c * hw];
                let gi = &gs[img * o * hw..(img + 1) * o * hw];
                // n again, then ∂/∂n through the convolution, then through the norm.
                let st = norm::stats(xi, d, self.eps);
                norm::forward_image_into(xi, d, &st, norm::modulation(gamma, beta, a, sh), self.silu, &mut n);
                back.image(&n, gi, &mut cols_g, &mut dn, &mut dwb, j > 0);
                let channel = norm::backward_channel(gamma, beta, a, sh);
                let sums = |ch: usize, [g_a, g_sh, g_gamma, g_beta]: [f32; 4]| {
                    dssi[ch] = g_a;
                    dssi[c + ch] = g_sh;
                    dp[ch] += g_gamma;
                    dp[c + ch] += g_beta;
                };
                norm::backward_image(xi, &dn, d, &st, self.silu, channel, sums, &mut gxhat, dxi);
            }
            (dwb, dp)
        });
        let (conv_parts, norm_parts): (Vec<_>, Vec<_>) = partials.into_iter().unzip();
        let (dw, db) = back.finish(conv_parts);
        let mut dparams = sum_in_order(norm_parts).unwrap_or_else(|| vec![0.0; 2 * c]);
        dparams.extend_from_slice(&dw);
        dparams.extend_from_slice(&db);
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dss, (b, 2 * c), dev)?),
            Some(Tensor::from_vec(dparams, params.shape(), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{check_against_plain, flat, rand, same_on_1_and_4_threads};
    use candle_core::Var;

    /// The fused node against the two nodes it replaces, in values and in all five gradients: kernels of
    /// 1 and 3, with and without SiLU, one and several groups, batches that are not a multiple of the block.
    #[test]
    fn matches_norm_then_conv_in_values_and_gradients() {
        for (b, c, o, h, w, k, groups, silu) in [
            (5, 4, 6, 5, 4, 3, 2, true),
            (3, 6, 3, 3, 3, 1, 3, false),
            (1, 2, 2, 7, 5, 3, 1, true),
            (9, 4, 4, 4, 4, 3, 4, true),
        ] {
            let x = Var::from_tensor(&rand(&[b, c, h, w], 1).affine(2.0, 0.5).unwrap()).unwrap();
            let p = Var::from_tensor(&rand(&[2 * c], 2)).unwrap();
            let s = Var::from_tensor(&(rand(&[b, 2 * c], 3) * 0.5).unwrap()).unwrap();
            let wt = Var::from_tensor(&rand(&[o, c, k, k], 4)).unwrap();
            let bias = Var::from_tensor(&rand(&[o], 5)).unwrap();
            let fast = norm_conv2d(&x, groups, 1e-5, &p, &s, silu, &wt, &bias).unwrap();
            let slow = plain(&x, groups, 1e-5, &p, &s, silu, &wt, &bias).unwrap();
            let vars = [("x", &x), ("affine", &p), ("ss", &s), ("w", &wt), ("bias", &bias)];
            check_against_plain(
                &fast,
                &slow,
                &vars,
                &rand(&[b, o, h, w], 6),
                1e-4,
                &format!("{b} {c} {o} {h} {w} {k} {groups} {silu}"),
            );
        }
    }

    #[test]
    fn rejects_parameters_that_do_not_fit() {
        let x = rand(&[2, 4, 3, 3], 1);
        let (wt, bias) = (rand(&[3, 4, 3, 3], 2), rand(&[3], 3));
        let err = norm_conv2d(&x, 2, 1e-5, &rand(&[6], 4), &rand(&[2, 8], 5), true, &wt, &bias).unwrap_err();
        assert!(err.to_string().contains("do not fit"), "{err}");
    }

    #[test]
    fn bit_identical_across_thread_counts() {
        let x = Var::from_tensor(&rand(&[11, 4, 5, 5], 5)).unwrap();
        let p = Var::from_tensor(&rand(&[8], 6)).unwrap();
        let s = Var::from_tensor(&rand(&[11, 8], 7)).unwrap();
        let wt = Var::from_tensor(&rand(&[3, 4, 3, 3], 8)).unwrap();
        let bias = Var::from_tensor(&rand(&[3], 9)).unwrap();
        same_on_1_and_4_threads(|| {
            let y = norm_conv2d(&x, 2, 1e-5, &p, &s, true, &wt, &bias).unwrap();
            let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            (
                flat(&y),
                flat(g.get(&x).unwrap()),
                [
                    flat(g.get(&p).unwrap()),
                    flat(g.get(&s).unwrap()),
                    flat(g.get(&wt).unwrap()),
                ]
                .concat(),
            )
        });
    }
}
