//! GroupNorm with its affine map, an optional per-sample scale and shift (`h ⊙ (1 + a) + b`, the U-Net's
//! conditioning) and an optional SiLU, as one graph node on the CPU with its backward:
//!
//! ```text
//! x̂ = (x − μ_g)/σ_g,   n = γ ⊙ x̂ + β,   z = n ⊙ (1 + a) + b,   y = silu(z) or z
//! ```
//!
//! Composed from candle ops this is about a dozen full-size tensors forward and as many backward; fused
//! it reads `x` once per pass. Images are independent; the parameter gradients' per-image partial sums are
//! added in image order, so the result has the same bits on any number of threads.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::{applies, cpu_slice, map_blocks, simd, sum_in_order};
use crate::Result;

/// `silu(z)` or `z` per [`group_norm`]; `affine` is `[γ; β]` (`2C`), `ss` the per-sample `[a, b]`
/// (`B × 2C`, zeros for none). Gradients flow to `x`, `affine` and `ss`.
pub fn group_norm(x: &Tensor, groups: usize, eps: f64, affine: &Tensor, ss: &Tensor, silu: bool) -> Result<Tensor> {
    if applies(x.device(), x.dtype()) && x.rank() == 4 {
        let (x, affine, ss) = (x.contiguous()?, affine.contiguous()?, ss.contiguous()?);
        let op = NormOp { groups, eps, silu };
        let tracked = super::grad_enabled() && (x.track_op() || affine.track_op() || ss.track_op());
        return Ok(if tracked {
            x.apply_op3(&affine, &ss, op)?
        } else {
            x.apply_op3_no_bwd(&affine, &ss, &op)?
        });
    }
    plain(x, groups, eps, affine, ss, silu)
}

/// The reference, from candle's primitive ops.
pub fn plain(x: &Tensor, groups: usize, eps: f64, affine: &Tensor, ss: &Tensor, silu: bool) -> Result<Tensor> {
    let z = Composed::new(x, groups, eps, affine, ss)?.z;
    Ok(if silu { z.silu()? } else { z })
}

/// The pre-activation `z` of [`plain`] and the pieces of it that [`plain_jvp`] differentiates.
struct Composed {
    /// `x̂` grouped as `B × G × (C/G)·H·W`, and `1/σ` as `B × G × 1`.
    xhat: Tensor,
    inv: Tensor,
    /// `γ` as `1 × C × 1 × 1`, `1 + a` as `B × C × 1 × 1`.
    gamma: Tensor,
    one_a: Tensor,
    /// `n = γ ⊙ x̂ + β` and `z = n ⊙ (1 + a) + b`, `B × C × H × W`.
    n: Tensor,
    z: Tensor,
}

impl Composed {
    fn new(x: &Tensor, groups: usize, eps: f64, affine: &Tensor, ss: &Tensor) -> Result<Self> {
        let (b, c, h, w) = x.dims4()?;
        let g = x.reshape((b, groups, (c / groups) * h * w))?;
        let centred = g.broadcast_sub(&g.mean_keepdim(2)?)?;
        let inv = (centred.sqr()?.mean_keepdim(2)? + eps)?.sqrt()?.recip()?;
        let xhat = centred.broadcast_mul(&inv)?;
        let col = |t: &Tensor| t.reshape((1, c, 1, 1));
        let gamma = col(&affine.narrow(0, 0, c)?)?;
        let n = xhat
            .reshape((b, c, h, w))?
            .broadcast_mul(&gamma)?
            .broadcast_add(&col(&affine.narrow(0, c, c)?)?)?;
        let one_a = (ss.narrow(1, 0, c)?.reshape((b, c, 1, 1))? + 1.0)?;
        let sh = ss.narrow(1, c, c)?.reshape((b, c, 1, 1))?;
        let z = n.broadcast_mul(&one_a)?.broadcast_add(&sh)?;
        Ok(Composed {
            xhat,
            inv,
            gamma,
            one_a,
            n,
            z,
        })
    }
}

/// The forward-mode pass of [`group_norm`] in `x` and `ss`, the affine parameters held fixed: `(y, ẏ)` for
/// tangents `ẋ` (`B × C × H × W`) and `ṡs` (`B × 2C`). With `x̂ = (x − μ)/σ` per group and
/// `[a, b] = ss`, `[ȧ, ḃ] = ṡs`:
///
/// ```text
/// dx̂ = (ẋ − mean ẋ − x̂ ⊙ mean(x̂ ⊙ ẋ)) / σ,   ż = γ ⊙ dx̂ ⊙ (1 + a) + (γ ⊙ x̂ + β) ⊙ ȧ + ḃ,
/// ẏ = ż ⊙ silu'(z)  (or ż)
/// ```
///
/// On contiguous f32 CPU tensors one pass per image computes both (images on the kernel threads, the same
/// bits on any count); elsewhere [`plain_jvp`]. Nothing is recorded for a backward pass.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_jvp(
    x: &Tensor,
    dx: &Tensor,
    groups: usize,
    eps: f64,
    affine: &Tensor,
    ss: &Tensor,
    dss: &Tensor,
    silu: bool,
) -> Result<(Tensor, Tensor)> {
    let (b, c, h, w) = x.dims4()?;
    if dx.dims() != x.dims() || ss.dims() != [b, 2 * c] || dss.dims() != [b, 2 * c] || affine.dims() != [2 * c] {
        return Err(crate::Error::arg(
            "group norm JVP: shapes of x, ẋ, [γ; β], ss and ṡs do not agree",
        ));
    }
    if c % groups != 0 {
        return Err(crate::Error::arg(format!(
            "group norm: {c} channels do not divide into {groups} groups"
        )));
    }
    if !applies(x.device(), x.dtype()) {
        return plain_jvp(x, dx, groups, eps, affine, ss, dss, silu);
    }
    let [x, dx, affine, ss, dss] = [x, dx, affine, ss, dss].map(|t| t.detach().contiguous());
    let (x, dx, affine, ss, dss) = (x?, dx?, affine?, ss?, dss?);
    let (Some(xr), Some(dxr), Some(pr), Some(sr), Some(dsr)) = (
        super::read(&x),
        super::read(&dx),
        super::read(&affine),
        super::read(&ss),
        super::read(&dss),
    ) else {
        return plain_jvp(&x, &dx, groups, eps, &affine, &ss, &dss, silu);
    };
    let d = Dims { c, hw: h * w, groups };
    let (xs, dxs, s, ds) = (xr.slice(), dxr.slice(), sr.slice(), dsr.slice());
    let (gamma, beta) = pr.slice().split_at(c);
    let img = c * d.hw;
    let n = xs.len();
    let (mut y, mut dy) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let blocks: Vec<_> = (y.spare_capacity_mut()[..n].chunks_mut(img.max(1)))
        .zip(dy.spare_capacity_mut()[..n].chunks_mut(img.max(1)))
        .enumerate()
        .collect();
    map_blocks(blocks, |(i, (yi, dyi))| {
        let (xi, dxi) = (&xs[i * img..(i + 1) * img], &dxs[i * img..(i + 1) * img]);
        let ((a, sh), (da, dsh)) = (
            s[i * 2 * c..(i + 1) * 2 * c].split_at(c),
            ds[i * 2 * c..(i + 1) * 2 * c].split_at(c),
        );
        jvp_image(xi, dxi, d, eps, [gamma, beta, a, sh, da, dsh], silu, yi, dyi);
    });
    // SAFETY: the blocks cover all `n` elements of both, and every channel's row wrote all of its own.
    unsafe {
        y.set_len(n);
        dy.set_len(n);
    }
    let dev = x.device();
    Ok((
        Tensor::from_vec(y, (b, c, h, w), dev)?,
        Tensor::from_vec(dy, (b, c, h, w), dev)?,
    ))
}

/// One image of [`group_norm_jvp`]: its value and tangent into `y` and `dy` (`C × H·W` each), from the
/// image `x`, its tangent `dx`, and per channel `[γ, β, a, b, ȧ, ḃ]`.
#[allow(clippy::too_many_arguments)]
pub(super) fn jvp_image(
    x: &[f32],
    dx: &[f32],
    d: Dims,
    eps: f64,
    [gamma, beta, a, sh, da, dsh]: [&[f32]; 6],
    silu: bool,
    y: &mut [MaybeUninit<f32>],
    dy: &mut [MaybeUninit<f32>],
) {
    let per_group = d.c / d.groups;
    for (g, &(mean, inv)) in stats(x, d, eps).iter().enumerate() {
        let range = g * per_group * d.hw..(g + 1) * per_group * d.hw;
        // (mean ẋ, mean ẋ·x̂) over the group.
        let (m1, m2) = simd::norm_group_moments(&x[range.clone()], &dx[range], mean, inv);
        for ch in g * per_group..(g + 1) * per_group {
            let k = gamma[ch] * (1.0 + a[ch]);
            let p = k * inv;
            let channel = simd::NormJvpChannel {
                mean,
                inv,
                m1,
                a: k,
                b: beta[ch] * (1.0 + a[ch]) + sh[ch],
                p,
                q: da[ch] * gamma[ch] - p * m2,
                r: da[ch] * beta[ch] + dsh[ch],
                silu,
            };
            let r = ch * d.hw..(ch + 1) * d.hw;
            simd::norm_jvp_row(&x[r.clone()], &dx[r.clone()], &mut y[r.clone()], &mut dy[r], channel);
        }
    }
}

/// The reference forward-mode pass, from candle's primitive ops on detached tensors.
#[allow(clippy::too_many_arguments)]
pub fn plain_jvp(
    x: &Tensor,
    dx: &Tensor,
    groups: usize,
    eps: f64,
    affine: &Tensor,
    ss: &Tensor,
    dss: &Tensor,
    silu: bool,
) -> Result<(Tensor, Tensor)> {
    let (x, dx, affine, ss, dss) = (x.detach(), dx.detach(), affine.detach(), ss.detach(), dss.detach());
    let (b, c, h, w) = x.dims4()?;
    let Composed {
        xhat,
        inv,
        gamma,
        one_a,
        n,
        z,
    } = Composed::new(&x, groups, eps, &affine, &ss)?;
    let dg = dx.reshape(xhat.shape())?;
    let dc = dg.broadcast_sub(&dg.mean_keepdim(2)?)?;
    let proj = (&xhat * &dc)?.mean_keepdim(2)?;
    let dxhat = (dc - xhat.broadcast_mul(&proj)?)?
        .broadcast_mul(&inv)?
        .reshape((b, c, h, w))?;
    let per_sample = |from: usize| dss.narrow(1, from, c)?.reshape((b, c, 1, 1));
    let (da, dsh) = (per_sample(0)?, per_sample(c)?);
    let dz = dxhat
        .broadcast_mul(&gamma)?
        .broadcast_mul(&one_a)?
        .add(&n.broadcast_mul(&da)?)?
        .broadcast_add(&dsh)?;
    if !silu {
        return Ok((z, dz));
    }
    // silu'(z) = s·(1 + z·(1 − s)), s = σ(z).
    let s = (z.neg()?.exp()? + 1.0)?.recip()?;
    let slope = (&s * ((&z * (1.0 - &s)?)? + 1.0)?)?;
    Ok(((&z * &s)?, (dz * slope)?))
}

struct NormOp {
    groups: usize,
    eps: f64,
    silu: bool,
}

#[derive(Clone, Copy)]
pub(super) struct Dims {
    pub c: usize,
    pub hw: usize,
    pub groups: usize,
}

/// `(μ, 1/σ)` of each group of one image.
pub(super) fn stats(x: &[f32], d: Dims, eps: f64) -> Vec<(f32, f32)> {
    let per = d.c / d.groups * d.hw;
    x.chunks(per)
        .map(|g| {
            let (mean, var) = simd::mean_var(g);
            (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
        })
        .collect()
}

/// The per-channel `(k, m)` of [`forward_image`] for `[γ; β]` and one image's scale-shift `[a, b]`:
/// `k = γ·(1 + a)`, `m = β·(1 + a) + b`.
pub(super) fn modulation<'a>(
    gamma: &'a [f32],
    beta: &'a [f32],
    a: &'a [f32],
    sh: &'a [f32],
) -> impl Fn(usize) -> (f32, f32) + Copy + 'a {
    move |ch| {
        let one_a = 1.0 + a[ch];
        (gamma[ch] * one_a, beta[ch] * one_a + sh[ch])
    }
}

/// The per-channel `(γ, β, 1 + a, b)` that [`backward_image`] takes, for `[γ; β]` and one image's
/// scale-shift `[a, b]`.
pub(super) fn backward_channel<'a>(
    gamma: &'a [f32],
    beta: &'a [f32],
    a: &'a [f32],
    sh: &'a [f32],
) -> impl Fn(usize) -> (f32, f32, f32, f32) + Copy + 'a {
    move |ch| (gamma[ch], beta[ch], 1.0 + a[ch], sh[ch])
}

/// One image of the forward pass, with its groups' [`stats`]: `y = act(x̂·k + m)` per channel,
/// `(k, m) = channel(c)`.
pub(super) fn forward_image(
    x: &[f32],
    d: Dims,
    st: &[(f32, f32)],
    channel: impl Fn(usize) -> (f32, f32),
    silu: bool,
    y: &mut [MaybeUninit<f32>],
) {
    for ch in 0..d.c {
        let (mean, inv) = st[ch / (d.c / d.groups)];
        let (k, m) = channel(ch);
        let scale = inv * k;
        let offset = m - mean * scale;
        let r = ch * d.hw..(ch + 1) * d.hw;
        simd::norm_row(&x[r.clone()], &mut y[r], scale, offset, silu);
    }
}

/// [`forward_image`] into a buffer that already holds values (a scratch buffer reused image after image).
pub(super) fn forward_image_into(
    x: &[f32],
    d: Dims,
    st: &[(f32, f32)],
    channel: impl Fn(usize) -> (f32, f32),
    silu: bool,
    y: &mut [f32],
) {
    // SAFETY: `forward_image` writes only initialised values.
    forward_image(x, d, st, channel, silu, unsafe { super::dense::as_uninit(y) })
}

/// One image of the backward pass from the output gradient `g`, with its groups' [`stats`]: writes `dx`, and hands each channel's
/// `(Σ g_z·n, Σ g_z, Σ g_n·x̂, Σ g_n)` (the gradients of `a`, `shift`, `γ` and `β`) to `sums`, for the
/// channel's `(γ, β, 1 + a, shift) = channel(c)`. `gxhat` is scratch of the image's size.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward_image(
    x: &[f32],
    g: &[f32],
    d: Dims,
    st: &[(f32, f32)],
    silu: bool,
    channel: impl Fn(usize) -> (f32, f32, f32, f32),
    mut sums: impl FnMut(usize, [f32; 4]),
    gxhat: &mut [f32],
    dx: &mut [f32],
) {
    let per_group = d.c / d.groups;
    // g_x̂ for the whole image, then the per-group projection.
    for ch in 0..d.c {
        let (mean, inv) = st[ch / per_group];
        let (gamma, beta, one_a, shift) = channel(ch);
        let c = simd::NormChannel {
            mean,
            inv,
            gamma,
            beta,
            one_a,
            shift,
            silu,
        };
        let r = ch * d.hw..(ch + 1) * d.hw;
        sums(
            ch,
            simd::norm_backward_row(&x[r.clone()], &g[r.clone()], &mut gxhat[r], c),
        );
    }
    let per = per_group * d.hw;
    for (grp, &(mean, inv)) in st.iter().enumerate() {
        let r = grp * per..(grp + 1) * per;
        let (m1, m2) = simd::norm_group_moments(&x[r.clone()], &gxhat[r.clone()], mean, inv);
        simd::norm_group_dx(&x[r.clone()], &gxhat[r.clone()], &mut dx[r], mean, inv, m1, m2);
    }
}

impl CustomOp3 for NormOp {
    fn name(&self) -> &'static str {
        "flowmap-group-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, c, h, w) = xl.shape().dims4()?;
        if c % self.groups != 0 {
            candle_core::bail!("group norm: {c} channels do not divide into {} groups", self.groups);
        }
        let d = Dims {
            c,
            hw: h * w,
            groups: self.groups,
        };
        let (x, p, s) = (
            cpu_slice(xs, xl, "x")?,
            cpu_slice(ps, pl, "affine")?,
            cpu_slice(ss, sl, "ss")?,
        );
        let (gamma, beta) = p.split_at(c);
        let (n, img) = (x.len(), c * d.hw);
        let mut y = Vec::with_capacity(n);
        let blocks: Vec<_> = y.spare_capacity_mut()[..n].chunks_mut(img.max(1)).enumerate().collect();
        map_blocks(blocks, |(i, yi)| {
            let (a, sh) = s[i * 2 * c..(i + 1) * 2 * c].split_at(c);
            let xi = &x[i * img..(i + 1) * img];
            forward_image(
                xi,
                d,
                &stats(xi, d, self.eps),
                modulation(gamma, beta, a, sh),
                self.silu,
                yi,
            );
        });
        // SAFETY: the blocks cover all `n` elements, and every channel's row wrote all of its own.
        unsafe { y.set_len(n) };
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        affine: &Tensor,
        ss: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (b, c, h, w) = x.dims4()?;
        let d = Dims {
            c,
            hw: h * w,
            groups: self.groups,
        };
        let (Some(xr), Some(pr), Some(sr), Some(gr)) =
            (super::read(x), super::read(affine), super::read(ss), super::read(&grad))
        else {
            candle_core::bail!("group norm backward needs contiguous f32 CPU tensors");
        };
        let (xs, p, s, gs) = (xr.slice(), pr.slice(), sr.slice(), gr.slice());
        let (gamma, beta) = p.split_at(c);
        let img = c * d.hw;
        let mut dx = vec![0.0f32; xs.len()];
        let mut dss = vec![0.0f32; b * 2 * c];
        let blocks: Vec<super::GradBlock<'_>> = dx.chunks_mut(img).enumerate().zip(dss.chunks_mut(2 * c)).collect();
        // Per image: its dx and d[a, b], and its partial dγ, dβ.
        let partials = map_blocks(blocks, |((i, dxi), dssi)| {
            let (a, sh) = s[i * 2 * c..(i + 1) * 2 * c].split_at(c);
            let mut dp = vec![0.0f32; 2 * c];
            let mut gxhat = vec![0.0f32; img];
            let channel = backward_channel(gamma, beta, a, sh);
            let sums = |ch: usize, [g_a, g_sh, g_gamma, g_beta]: [f32; 4]| {
                dssi[ch] = g_a;
                dssi[c + ch] = g_sh;
                dp[ch] = g_gamma;
                dp[c + ch] = g_beta;
            };
            let (xi, gi) = (&xs[i * img..(i + 1) * img], &gs[i * img..(i + 1) * img]);
            let st = stats(xi, d, self.eps);
            backward_image(xi, gi, d, &st, self.silu, channel, sums, &mut gxhat, dxi);
            dp
        });
        let dp = sum_in_order(partials).unwrap_or_else(|| vec![0.0; 2 * c]);
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, (b, c, h, w), dev)?),
            Some(Tensor::from_vec(dp, 2 * c, dev)?),
            Some(Tensor::from_vec(dss, (b, 2 * c), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{check_against_plain, flat, rand, same_on_1_and_4_threads};
    use candle_core::Var;

    #[test]
    fn matches_the_composed_ops_in_values_and_gradients() {
        for (b, c, h, w, g, silu) in [(3, 8, 5, 4, 4, true), (2, 6, 3, 3, 3, false), (1, 4, 7, 7, 1, true)] {
            let x = Var::from_tensor(&rand(&[b, c, h, w], 1).affine(2.0, 0.5).unwrap()).unwrap();
            let p = Var::from_tensor(&rand(&[2 * c], 2)).unwrap();
            let s = Var::from_tensor(&(rand(&[b, 2 * c], 3) * 0.5).unwrap()).unwrap();
            let fast = group_norm(&x, g, 1e-5, &p, &s, silu).unwrap();
            let slow = plain(&x, g, 1e-5, &p, &s, silu).unwrap();
            let vars = [("x", &x), ("affine", &p), ("ss", &s)];
            check_against_plain(
                &fast,
                &slow,
                &vars,
                &rand(&[b, c, h, w], 4),
                1e-4,
                &format!("{b} {c} {h} {w} {g}"),
            );
        }
    }

    /// The fused forward-mode pass against the composed one, and the composed tangent against a central
    /// difference of the forward pass in f64.
    #[test]
    fn jvp_matches_the_composed_ops_and_f64_differences() {
        use candle_core::DType;
        for (b, c, h, w, g, silu) in [(3, 8, 5, 4, 4, true), (2, 6, 3, 3, 3, false), (1, 4, 7, 7, 1, true)] {
            let x = rand(&[b, c, h, w], 1).affine(2.0, 0.5).unwrap();
            let dx = rand(&[b, c, h, w], 2);
            let p = rand(&[2 * c], 3);
            let s = (rand(&[b, 2 * c], 4) * 0.5).unwrap();
            let ds = rand(&[b, 2 * c], 5);
            let at = format!("{b} {c} {h} {w} {g} {silu}");
            let (y, dy) = group_norm_jvp(&x, &dx, g, 1e-5, &p, &s, &ds, silu).unwrap();
            let (y_ref, dy_ref) = plain_jvp(&x, &dx, g, 1e-5, &p, &s, &ds, silu).unwrap();
            let err = |a: &Tensor, b: &Tensor| crate::kernels::testing::max_abs(&(a - b).unwrap());
            assert!(err(&y, &y_ref) < 1e-5, "{at}: y off by {}", err(&y, &y_ref));
            assert!(err(&dy, &dy_ref) < 1e-4, "{at}: ẏ off by {}", err(&dy, &dy_ref));
            // f64: the composed tangent against (f(x + εẋ) − f(x − εẋ)) / 2ε.
            let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let (x, dx, p, s, ds) = (f64s(&x), f64s(&dx), f64s(&p), f64s(&s), f64s(&ds));
            let eps = 1e-5;
            let at_shift = |sign: f64| {
                let xe = (&x + (&dx * (sign * eps)).unwrap()).unwrap();
                let se = (&s + (&ds * (sign * eps)).unwrap()).unwrap();
                plain(&xe, g, 1e-5, &p, &se, silu).unwrap()
            };
            let fd = ((at_shift(1.0) - at_shift(-1.0)).unwrap() / (2.0 * eps)).unwrap();
            let (_, dy64) = plain_jvp(&x, &dx, g, 1e-5, &p, &s, &ds, silu).unwrap();
            let gap = crate::kernels::testing::max_abs_f64(&(dy64 - fd).unwrap());
            assert!(gap < 1e-6, "{at}: composed tangent off the f64 difference by {gap}");
        }
    }

    #[test]
    fn jvp_rejects_mismatched_tangents() {
        let x = rand(&[2, 4, 3, 3], 1);
        let (p, s) = (rand(&[8], 2), rand(&[2, 8], 3));
        let err = group_norm_jvp(&x, &rand(&[2, 4, 3, 2], 4), 2, 1e-5, &p, &s, &s, true).unwrap_err();
        assert!(err.to_string().contains("shapes"), "{err}");
    }

    #[test]
    fn bit_identical_across_thread_counts() {
        let x = Var::from_tensor(&rand(&[6, 8, 4, 4], 5)).unwrap();
        let p = Var::from_tensor(&rand(&[16], 6)).unwrap();
        let s = Var::from_tensor(&rand(&[6, 16], 7)).unwrap();
        same_on_1_and_4_threads(|| {
            let y = group_norm(&x, 4, 1e-5, &p, &s, true).unwrap();
            let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            (flat(&y), flat(g.get(&x).unwrap()), flat(g.get(&p).unwrap()))
        });
        let dx = rand(&[6, 8, 4, 4], 8);
        same_on_1_and_4_threads(|| {
            let (y, dy) = group_norm_jvp(&x, &dx, 4, 1e-5, &p, &s, &s, true).unwrap();
            (flat(&y), flat(&dy))
        });
    }
}
