//! The U-Net's residual block as one graph node on the CPU:
//!
//! ```text
//! c1 = W1 ⋆ silu(GN1(x)) + b1,   h = W2 ⋆ silu(GN2(c1) ⊙ (1 + a) + b) + b2,   y = skip(x) + h
//! ```
//!
//! with `skip` a 1×1 convolution when the channel count changes and the identity otherwise. As separate
//! nodes (two [`norm_conv2d`](super::norm_conv2d)s, a skip convolution and an add), candle keeps `c1`, `h`
//! and `skip(x)` until the backward pass, and in it fills a zero tensor and adds into it for every edge of
//! the graph. This node keeps `c1` alone (the block's input and output are the graph's anyway), recomputes
//! both normalised activations image by image in the backward pass, and hands candle one gradient per input.
//! Images go in blocks of [`conv::IMAGES_PER_BLOCK`] whatever the thread count, and the parameters'
//! per-block partial sums are added in block order: the same bits on any number of threads.

use std::mem::MaybeUninit;
use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::conv::{self, Geometry, IMAGES_PER_BLOCK};
use super::norm::{self, Dims};
use super::scratch::Scratch;
use super::{applies, cpu_slice, map_blocks, sum_in_order};
use crate::Result;

/// One block's parameters: each GroupNorm's `[γ; β]` and each convolution's weight and bias.
pub struct ResBlockParams<'a> {
    pub norm1: &'a Tensor,
    pub conv1: (&'a Tensor, &'a Tensor),
    pub norm2: &'a Tensor,
    pub conv2: (&'a Tensor, &'a Tensor),
    /// The 1×1 skip convolution (`None`: the identity, same channels in and out).
    pub skip: Option<(&'a Tensor, &'a Tensor)>,
}

impl ResBlockParams<'_> {
    /// Whether the fused nodes take these parameters for `c_in` input channels in `groups` groups: both
    /// convolutions `k × k` with `k` odd and their channels chained, the channels dividing into the groups,
    /// and the skip a 1×1 convolution (or, without one, as many channels out as in).
    fn fit(&self, c_in: usize, groups: usize) -> bool {
        let Ok((o, c1_in, k, k2)) = self.conv1.0.dims4() else {
            return false;
        };
        k == k2
            && k % 2 == 1
            && c1_in == c_in
            && self.conv2.0.dims() == [o, o, k, k]
            && groups > 0
            && c_in.is_multiple_of(groups)
            && o.is_multiple_of(groups)
            && match self.skip {
                Some((w, _)) => w.dims() == [o, c_in, 1, 1],
                None => c_in == o,
            }
    }
}

/// `skip(x) + W2 ⋆ silu(GN2(W1 ⋆ silu(GN1(x)) + b1) ⊙ (1 + a) + b) + b2` with `[a, b] = ss` (`B × 2O`), both
/// norms with `groups` groups, both convolutions `k × k` (odd, stride 1, "same" padding). `x` is given as
/// one tensor or as two whose channels it concatenates (the U-Net's upward path and its skip connection:
/// the node reads both, and no concatenated copy is made or kept). Gradients flow to every part of `x`, to
/// `ss` and to every parameter. One node on f32 CPU tensors; elsewhere [`plain`].
pub fn res_block(x: &[&Tensor], ss: &Tensor, p: &ResBlockParams<'_>, groups: usize, eps: f64) -> Result<Tensor> {
    let (xa, xb) = match x {
        [a] => (*a, None),
        [a, b] => (*a, Some(*b)),
        _ => {
            return Err(crate::Error::arg(
                "residual block: the input is one tensor or two to concatenate",
            ))
        }
    };
    let (b, c_a, h, w) = xa.dims4()?;
    let c_in = match xb {
        Some(t) => {
            let (b2, c_b, h2, w2) = t.dims4()?;
            if (b2, h2, w2) != (b, h, w) {
                return Err(crate::Error::arg(format!(
                    "residual block: inputs {:?} and {:?} do not concatenate along channels",
                    xa.dims(),
                    t.dims()
                )));
            }
            c_a + c_b
        }
        None => c_a,
    };
    let (c_out, k) = (p.conv1.0.dim(0)?, p.conv1.0.dim(2)?);
    if !(applies(xa.device(), xa.dtype()) && p.fit(c_in, groups)) {
        return plain(x, ss, p, groups, eps);
    }
    if ss.dims() != [b, 2 * c_out] {
        return Err(crate::Error::arg(format!(
            "residual block: scale-shift {:?} does not fit {b} images of {c_out} channels",
            ss.dims()
        )));
    }
    // The scale-shift and the parameters as one vector, `[ss; γ1; β1; W1; b1; γ2; β2; W2; b2; (Ws; bs)]`:
    // the node takes three inputs.
    let mut parts = vec![
        ss.flatten_all()?,
        p.norm1.clone(),
        p.conv1.0.flatten_all()?,
        p.conv1.1.clone(),
        p.norm2.clone(),
        p.conv2.0.flatten_all()?,
        p.conv2.1.clone(),
    ];
    if let Some((w, b)) = p.skip {
        parts.extend([w.flatten_all()?, b.clone()]);
    }
    let params = Tensor::cat(&parts, 0)?;
    let xa = xa.contiguous()?;
    // With one input, the second slot holds the first again and gets no gradient.
    let xb = match xb {
        Some(t) => t.contiguous()?,
        None => xa.clone(),
    };
    let tracked = super::grad_enabled() && (xa.track_op() || xb.track_op() || params.track_op());
    let op = ResBlockOp {
        groups,
        eps,
        c_out,
        k,
        skip: p.skip.is_some(),
        two: x.len() == 2,
        kept: tracked.then(|| Mutex::new(Kept::default())),
    };
    Ok(if tracked {
        xa.apply_op3(&xb, &params, op)?
    } else {
        xa.apply_op3_no_bwd(&xb, &params, &op)?
    })
}

/// The block's value and its tangent along `(ẋ, ṡs)` in one pass per image, as exact forward-mode
/// differentiation of [`res_block`]'s layers: what the U-Net's tangent pass computes layer by layer (a
/// GroupNorm JVP node, two convolutions per layer, the skip, two adds), with the same operations in the
/// same order, so the same bits, but each image's intermediates in scratch memory instead of `B`-image
/// tensors, and one parallel region instead of a dozen. `dx` has the parts of `x`, `dss` the shape of
/// `ss`. Nothing is recorded for a backward pass. `None` where the fused pass does not apply (another
/// device or dtype, or shapes [`res_block`] would take [`plain`] for): the caller runs the layers.
#[allow(clippy::too_many_arguments)]
pub fn res_block_jvp(
    x: &[&Tensor],
    dx: &[&Tensor],
    ss: &Tensor,
    dss: &Tensor,
    p: &ResBlockParams<'_>,
    groups: usize,
    eps: f64,
) -> Result<Option<(Tensor, Tensor)>> {
    if x.is_empty() || x.len() > 2 || dx.len() != x.len() || dss.dims() != ss.dims() {
        return Err(crate::Error::arg(
            "residual block JVP: the input and its tangent come in the same one or two parts, ss and ṡs alike",
        ));
    }
    let (b, c_a, h, w) = x[0].dims4()?;
    let mut c = 0;
    for (part, tangent) in x.iter().zip(dx) {
        let (b2, ci, h2, w2) = part.dims4()?;
        if (b2, h2, w2) != (b, h, w) || tangent.dims() != part.dims() {
            return Err(crate::Error::arg(format!(
                "residual block JVP: parts {:?} and tangents {:?} do not fit",
                x.iter().map(|t| t.dims().to_vec()).collect::<Vec<_>>(),
                dx.iter().map(|t| t.dims().to_vec()).collect::<Vec<_>>()
            )));
        }
        c += ci;
    }
    let (o, k) = (p.conv1.0.dim(0)?, p.conv1.0.dim(2)?);
    if !(applies(x[0].device(), x[0].dtype()) && p.fit(c, groups) && ss.dims() == [b, 2 * o]) {
        return Ok(None);
    }
    let mut tensors = vec![ss, dss, p.norm1, p.conv1.0, p.conv1.1, p.norm2, p.conv2.0, p.conv2.1];
    if let Some((ws, bs)) = p.skip {
        tensors.extend([ws, bs]);
    }
    tensors.extend(x.iter().chain(dx));
    let owned: Vec<Tensor> = tensors
        .iter()
        .map(|t| t.detach().contiguous())
        .collect::<candle_core::Result<_>>()?;
    let reads: Option<Vec<_>> = owned.iter().map(super::read).collect();
    let Some(reads) = reads else {
        return Ok(None);
    };
    let sl: Vec<&[f32]> = reads.iter().map(|r| r.slice()).collect();
    let (ss, dss, norm1, w1, b1, norm2, w2, b2) = (sl[0], sl[1], sl[2], sl[3], sl[4], sl[5], sl[6], sl[7]);
    let (skip, rest) = if p.skip.is_some() {
        (Some((sl[8], sl[9])), &sl[10..])
    } else {
        (None, &sl[8..])
    };
    let (xs, dxs) = rest.split_at(x.len());
    let hw = h * w;
    let sh = Shapes::new(b, c_a, c, o, (h, w), k, groups);
    let (gamma1, beta1) = norm1.split_at(c);
    let (gamma2, beta2) = norm2.split_at(o);
    let zeros = vec![0.0f32; c];
    let n_out = b * o * hw;
    let (mut y, mut dy): (Vec<f32>, Vec<f32>) = (Vec::with_capacity(n_out), Vec::with_capacity(n_out));
    let per = IMAGES_PER_BLOCK * o * hw;
    let blocks: Vec<_> = y.spare_capacity_mut()[..n_out]
        .chunks_mut(per)
        .zip(dy.spare_capacity_mut()[..n_out].chunks_mut(per))
        .enumerate()
        .collect();
    let alone = b == 1;
    map_blocks(blocks, |(i, (yb, dyb))| {
        // Every element of these is written before it is read.
        let two = if x.len() == 2 { c * hw } else { 0 };
        let (mut xcat, mut dxcat) = (Scratch::new(two), Scratch::new(two));
        let (mut n1, mut dn1) = (Scratch::new(c * hw), Scratch::new(c * hw));
        let (mut c1, mut dc1, mut n2, mut dn2) = (
            Scratch::new(o * hw),
            Scratch::new(o * hw),
            Scratch::new(o * hw),
            Scratch::new(o * hw),
        );
        let sk = if skip.is_some() { o * hw } else { 0 };
        let (mut s1, mut ds1) = (Scratch::new(sk), Scratch::new(sk));
        let (mut cols1, mut cols2) = (sh.g1.cols_scratch(), sh.g2.cols_scratch());
        for (j, (yi, dyi)) in yb.chunks_mut(o * hw).zip(dyb.chunks_mut(o * hw)).enumerate() {
            let img = i * IMAGES_PER_BLOCK + j;
            let xi = sh.image(img, xs[0], xs.get(1).copied(), &mut xcat);
            let dxi = sh.image(img, dxs[0], dxs.get(1).copied(), &mut dxcat);
            let z = &zeros[..];
            // SAFETY (each `as_uninit` below): the views are written with initialised values only.
            let (v1, dv1) = unsafe { (super::dense::as_uninit(&mut n1), super::dense::as_uninit(&mut dn1)) };
            norm::jvp_image(xi, dxi, sh.d1, eps, [gamma1, beta1, z, z, z, z], true, v1, dv1);
            // A convolution into `dst`, as `Conv2d`'s JVP computes it: the value from its bias, the tangent
            // (no bias) from zero.
            let conv = |g: Geometry,
                        wt: &[f32],
                        bias: Option<&[f32]>,
                        src: &[f32],
                        cols: &mut [f32],
                        dst: &mut [MaybeUninit<f32>]| {
                let dst = match bias {
                    Some(bias) => conv::fill_bias(dst, bias, hw),
                    None => zeroed(dst),
                };
                conv::forward_image_alone(g, wt, src, cols, dst, alone);
            };
            conv(sh.g1, w1, Some(b1), &n1, &mut cols1, unsafe {
                super::dense::as_uninit(&mut c1)
            });
            conv(sh.g1, w1, None, &dn1, &mut cols1, unsafe {
                super::dense::as_uninit(&mut dc1)
            });
            let (a, shift) = ss[img * 2 * o..(img + 1) * 2 * o].split_at(o);
            let (da, dshift) = dss[img * 2 * o..(img + 1) * 2 * o].split_at(o);
            let (v2, dv2) = unsafe { (super::dense::as_uninit(&mut n2), super::dense::as_uninit(&mut dn2)) };
            norm::jvp_image(
                &c1,
                &dc1,
                sh.d2,
                eps,
                [gamma2, beta2, a, shift, da, dshift],
                true,
                v2,
                dv2,
            );
            conv(sh.g2, w2, Some(b2), &n2, &mut cols2, &mut *yi);
            conv(sh.g2, w2, None, &dn2, &mut cols2, &mut *dyi);
            // SAFETY: both were just written whole.
            let (yi, dyi) = unsafe { (super::dense::assume_init(yi), super::dense::assume_init(dyi)) };
            // y = skip(x) + h, ẏ = skip(ẋ) + ḣ, the skip's value from its bias and its tangent from zero.
            let (sv, sdv): (&[f32], &[f32]) = match skip {
                Some((ws, bs)) => {
                    conv(sh.gs, ws, Some(bs), xi, &mut [], unsafe {
                        super::dense::as_uninit(&mut s1)
                    });
                    conv(sh.gs, ws, None, dxi, &mut [], unsafe {
                        super::dense::as_uninit(&mut ds1)
                    });
                    (&s1, &ds1)
                }
                None => (xi, dxi),
            };
            // (`h + skip` is `skip + h` to the bit: IEEE addition commutes.)
            for (d, &v) in yi.iter_mut().zip(sv) {
                *d += v;
            }
            for (d, &v) in dyi.iter_mut().zip(sdv) {
                *d += v;
            }
        }
    });
    // SAFETY: the blocks cover all `n_out` elements of both, and every image wrote all of its own.
    unsafe {
        y.set_len(n_out);
        dy.set_len(n_out);
    }
    let dev = x[0].device();
    Ok(Some((
        Tensor::from_vec(y, (b, o, h, w), dev)?,
        Tensor::from_vec(dy, (b, o, h, w), dev)?,
    )))
}

/// The reference, from candle's primitive ops: the block's layers one after the other.
pub fn plain(x: &[&Tensor], ss: &Tensor, p: &ResBlockParams<'_>, groups: usize, eps: f64) -> Result<Tensor> {
    let x = &Tensor::cat(x, 1)?;
    let zeros = Tensor::zeros((x.dim(0)?, 2 * x.dim(1)?), x.dtype(), x.device())?;
    let n1 = norm::plain(x, groups, eps, p.norm1, &zeros, true)?;
    let c1 = conv::plain(&n1, p.conv1.0, p.conv1.1)?;
    let h = conv::plain(&norm::plain(&c1, groups, eps, p.norm2, ss, true)?, p.conv2.0, p.conv2.1)?;
    let skip = match p.skip {
        Some((w, b)) => conv::plain(x, w, b)?,
        None => x.clone(),
    };
    Ok((skip + h)?)
}

struct ResBlockOp {
    groups: usize,
    eps: f64,
    c_out: usize,
    k: usize,
    skip: bool,
    /// Whether the input comes as two tensors to concatenate (else the second slot repeats the first).
    two: bool,
    /// What the forward pass keeps for the backward one (`None` when no backward pass will run).
    kept: Option<Mutex<Kept>>,
}

/// `c1` of every image, and both norms' group statistics `(μ, 1/σ)` (`B × G` each).
#[derive(Default)]
struct Kept {
    c1: Vec<f32>,
    stats1: Vec<(f32, f32)>,
    stats2: Vec<(f32, f32)>,
}

/// The shapes of one block: its norms' and convolutions' geometry.
#[derive(Clone, Copy)]
struct Shapes {
    b: usize,
    /// Channels of the first input (all of them unless the input comes in two parts).
    c_a: usize,
    d1: Dims,
    d2: Dims,
    g1: Geometry,
    g2: Geometry,
    gs: Geometry,
}

impl Shapes {
    /// `b` images of `c` channels (`c_a` of them in the first part) in `groups` groups, into `o` channels by
    /// `k × k` convolutions, each image `h × w`.
    fn new(b: usize, c_a: usize, c: usize, o: usize, (h, w): (usize, usize), k: usize, groups: usize) -> Shapes {
        let dims = |c| Dims { c, hw: h * w, groups };
        let geometry = |c_in, k| Geometry {
            c_in,
            c_out: o,
            h,
            w,
            k,
        };
        Shapes {
            b,
            c_a,
            d1: dims(c),
            d2: dims(o),
            g1: geometry(c, k),
            g2: geometry(o, k),
            gs: geometry(c, 1),
        }
    }

    /// Image `n` of the input: in `xa` when it is one tensor, else its two parts copied into `buf`.
    fn image<'a>(&self, n: usize, xa: &'a [f32], xb: Option<&[f32]>, buf: &'a mut [f32]) -> &'a [f32] {
        let (hw, c, c_a) = (self.hw(), self.c_in(), self.c_a);
        match xb {
            None => &xa[n * c * hw..(n + 1) * c * hw],
            Some(xb) => {
                let c_b = c - c_a;
                buf[..c_a * hw].copy_from_slice(&xa[n * c_a * hw..(n + 1) * c_a * hw]);
                buf[c_a * hw..].copy_from_slice(&xb[n * c_b * hw..(n + 1) * c_b * hw]);
                buf
            }
        }
    }

    fn hw(&self) -> usize {
        self.d1.hw
    }
    fn c_in(&self) -> usize {
        self.d1.c
    }
    fn c_out(&self) -> usize {
        self.d2.c
    }
}

/// The vector `[ss; γ1; β1; W1; b1; γ2; β2; W2; b2; (Ws; bs)]` cut into its parts.
struct Parts<'a> {
    ss: &'a [f32],
    gamma1: &'a [f32],
    beta1: &'a [f32],
    w1: &'a [f32],
    b1: &'a [f32],
    gamma2: &'a [f32],
    beta2: &'a [f32],
    w2: &'a [f32],
    b2: &'a [f32],
    ws: &'a [f32],
    bs: &'a [f32],
}

impl ResBlockOp {
    fn shapes(&self, xa: &Layout, xb: &Layout, n_params: usize) -> candle_core::Result<Shapes> {
        let (b, c_a, h, w) = xa.shape().dims4()?;
        let c = if self.two { c_a + xb.shape().dims4()?.1 } else { c_a };
        let (o, k) = (self.c_out, self.k);
        let want =
            b * 2 * o + 2 * c + o * c * k * k + o + 2 * o + o * o * k * k + o + if self.skip { o * c + o } else { 0 };
        if n_params != want {
            candle_core::bail!("residual block: {n_params} parameters do not fit {c} → {o} channels, k = {k}");
        }
        Ok(Shapes::new(b, c_a, c, o, (h, w), k, self.groups))
    }

    fn parts<'a>(&self, p: &'a [f32], s: &Shapes) -> Parts<'a> {
        let (c, o) = (s.c_in(), s.c_out());
        let mut rest = p;
        let mut take = |n: usize| {
            let (a, b) = rest.split_at(n);
            rest = b;
            a
        };
        Parts {
            ss: take(s.b * 2 * o),
            gamma1: take(c),
            beta1: take(c),
            w1: take(o * s.g1.rows()),
            b1: take(o),
            gamma2: take(o),
            beta2: take(o),
            w2: take(o * s.g2.rows()),
            b2: take(o),
            ws: take(if self.skip { o * c } else { 0 }),
            bs: take(if self.skip { o } else { 0 }),
        }
    }
}

/// `silu(GN(x) ⊙ (1 + a) + b)` of one image into `n`, with its groups' statistics `st`.
#[allow(clippy::too_many_arguments)]
fn normalise(x: &[f32], d: Dims, st: &[(f32, f32)], gamma: &[f32], beta: &[f32], a: &[f32], sh: &[f32], n: &mut [f32]) {
    norm::forward_image_into(x, d, st, norm::modulation(gamma, beta, a, sh), true, n);
}

/// Elements of one image at or above which an image that is the whole batch splits its GroupNorm between
/// two blocks of the pool: a 32-channel U-Net's 28 × 28 level (25 K) splits, its 14 × 14 one (12.5 K) and
/// the 16-channel net's norms do not. Set by judgement, not swept: splitting the 32-channel level took that
/// net's latency 1.58 → 1.52 ms (`flowmap-cli/examples/latency_probe -- 32 3`, four alternating pairs); no other
/// threshold was measured.
const SPLIT_NORM: usize = 16 << 10;

/// The groups' statistics `st` of one image and its [`normalise`]d activation `n`. An image that is the
/// whole batch (`alone`) and large enough ([`SPLIT_NORM`]) splits its groups between two blocks of the
/// pool; each group's arithmetic is the same either way, and so are the bits.
fn stats_normalise(
    x: &[f32],
    d: Dims,
    eps: f64,
    (gamma, beta, a, sh): (&[f32], &[f32], &[f32], &[f32]),
    st: &mut [(f32, f32)],
    n: &mut [f32],
    alone: bool,
) {
    let per = d.c / d.groups;
    let run = |g: std::ops::Range<usize>, st: &mut [(f32, f32)], n: &mut [f32]| {
        let part = Dims {
            c: g.len() * per,
            hw: d.hw,
            groups: g.len(),
        };
        let ch = g.start * per..g.end * per;
        let x = &x[ch.start * d.hw..ch.end * d.hw];
        st.copy_from_slice(&norm::stats(x, part, eps));
        normalise(
            x,
            part,
            st,
            &gamma[ch.clone()],
            &beta[ch.clone()],
            &a[ch.clone()],
            &sh[ch],
            n,
        );
    };
    if !alone || d.c * d.hw < SPLIT_NORM || d.groups < 2 {
        return run(0..d.groups, st, n);
    }
    let half = d.groups / 2;
    let (st0, st1) = st.split_at_mut(half);
    let (n0, n1) = n.split_at_mut(half * per * d.hw);
    map_blocks(vec![(0..half, st0, n0), (half..d.groups, st1, n1)], |(g, st, n)| {
        run(g, st, n)
    });
}

impl CustomOp3 for ResBlockOp {
    fn name(&self) -> &'static str {
        "flowmap-res-block"
    }

    fn cpu_fwd(
        &self,
        xas: &CpuStorage,
        xal: &Layout,
        xbs: &CpuStorage,
        xbl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (xa, p) = (cpu_slice(xas, xal, "x")?, cpu_slice(ps, pl, "params")?);
        let xb = if self.two {
            Some(cpu_slice(xbs, xbl, "x")?)
        } else {
            None
        };
        let sh = self.shapes(xal, xbl, p.len())?;
        let pp = self.parts(p, &sh);
        let s = pp.ss;
        let (hw, c, o) = (sh.hw(), sh.c_in(), sh.c_out());
        let zeros = vec![0.0f32; c];
        let (n_out, groups) = (sh.b * o * hw, self.groups);
        let keep = self.kept.is_some();
        // The output, and what the backward pass will need: c1 and both norms' group statistics.
        let mut y: Vec<f32> = Vec::with_capacity(n_out);
        let mut c1_all: Vec<f32> = Vec::with_capacity(if keep { n_out } else { 0 });
        let (mut st1_all, mut st2_all) = (
            vec![(0.0f32, 0.0f32); sh.b * groups],
            vec![(0.0f32, 0.0f32); sh.b * groups],
        );
        let per = IMAGES_PER_BLOCK * o * hw;
        let c1_blocks: Vec<Option<&mut [MaybeUninit<f32>]>> = if keep {
            c1_all.spare_capacity_mut()[..n_out].chunks_mut(per).map(Some).collect()
        } else {
            (0..sh.b.div_ceil(IMAGES_PER_BLOCK)).map(|_| None).collect()
        };
        let blocks: Vec<_> = y.spare_capacity_mut()[..n_out]
            .chunks_mut(per)
            .zip(c1_blocks)
            .zip(
                st1_all
                    .chunks_mut(IMAGES_PER_BLOCK * groups)
                    .zip(st2_all.chunks_mut(IMAGES_PER_BLOCK * groups)),
            )
            .enumerate()
            .collect();
        map_blocks(blocks, |(i, ((yb, mut c1b), (st1b, st2b)))| {
            // Every element of these is written before it is read.
            let (mut n1, mut xcat) = (Scratch::new(c * hw), Scratch::new(if self.two { c * hw } else { 0 }));
            let (mut n2, mut c1_own) = (Scratch::new(o * hw), Scratch::new(if keep { 0 } else { o * hw }));
            let (mut cols1, mut cols2) = (sh.g1.cols_scratch(), sh.g2.cols_scratch());
            let alone = sh.b == 1;
            for (j, yi) in yb.chunks_mut(o * hw).enumerate() {
                let img = i * IMAGES_PER_BLOCK + j;
                let xi = sh.image(img, xa, xb, &mut xcat);
                let (a, shift) = s[img * 2 * o..(img + 1) * 2 * o].split_at(o);
                let st1 = &mut st1b[j * groups..(j + 1) * groups];
                let m1 = (pp.gamma1, pp.beta1, &zeros[..], &zeros[..]);
                stats_normalise(xi, sh.d1, self.eps, m1, st1, &mut n1, alone);
                let c1 = match c1b.as_deref_mut() {
                    Some(all) => conv::fill_bias(&mut all[j * o * hw..(j + 1) * o * hw], pp.b1, hw),
                    // SAFETY: `fill_bias` writes only initialised values.
                    None => conv::fill_bias(unsafe { super::dense::as_uninit(&mut c1_own) }, pp.b1, hw),
                };
                conv::forward_image_alone(sh.g1, pp.w1, &n1, &mut cols1, c1, alone);
                let st2 = &mut st2b[j * groups..(j + 1) * groups];
                stats_normalise(
                    c1,
                    sh.d2,
                    self.eps,
                    (pp.gamma2, pp.beta2, a, shift),
                    st2,
                    &mut n2,
                    alone,
                );
                // y = skip(x) + b2 + W2 ⋆ n2, each row started at its bias (and at x for the identity).
                for (ch, row) in yi.chunks_mut(hw).enumerate() {
                    if self.skip {
                        row.fill(MaybeUninit::new(pp.bs[ch] + pp.b2[ch]));
                    } else {
                        for (d, &v) in row.iter_mut().zip(&xi[ch * hw..(ch + 1) * hw]) {
                            *d = MaybeUninit::new(v + pp.b2[ch]);
                        }
                    }
                }
                // SAFETY: every element of the image's output was just written.
                let yi = unsafe { super::dense::assume_init(yi) };
                if self.skip {
                    conv::forward_image_alone(sh.gs, pp.ws, xi, &mut [], yi, alone);
                }
                conv::forward_image_alone(sh.g2, pp.w2, &n2, &mut cols2, yi, alone);
            }
        });
        // SAFETY: the blocks cover all `n_out` elements of both, and every image wrote all of its own.
        unsafe {
            y.set_len(n_out);
            if keep {
                c1_all.set_len(n_out);
            }
        }
        if let Some(kept) = &self.kept {
            *kept.lock().expect("kept activation") = Kept {
                c1: c1_all,
                stats1: st1_all,
                stats2: st2_all,
            };
        }
        Ok((CpuStorage::F32(y), Shape::from((sh.b, o, sh.g1.h, sh.g1.w))))
    }

    fn bwd(
        &self,
        xa: &Tensor,
        xb: &Tensor,
        params: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (Some(xar), Some(xbr), Some(pr), Some(gr)) = (
            super::read(xa),
            super::read(xb),
            super::read(params),
            super::read(&grad),
        ) else {
            candle_core::bail!("residual block backward needs contiguous f32 CPU tensors");
        };
        let (xas, p, gs) = (xar.slice(), pr.slice(), gr.slice());
        let xbs = if self.two { Some(xbr.slice()) } else { None };
        let sh = self.shapes(xa.layout(), xb.layout(), p.len())?;
        let pp = self.parts(p, &sh);
        let s = pp.ss;
        let (hw, c, o) = (sh.hw(), sh.c_in(), sh.c_out());
        let Some(kept) = &self.kept else {
            candle_core::bail!("residual block backward: the forward pass kept no activation");
        };
        let kept = kept.lock().expect("kept activation");
        let (c1_all, stats1, stats2) = (&kept.c1[..], &kept.stats1[..], &kept.stats2[..]);
        let groups = self.groups;
        if c1_all.len() != sh.b * o * hw || stats1.len() != sh.b * groups {
            candle_core::bail!("residual block backward: the kept activation does not fit the input");
        }
        let zeros = vec![0.0f32; c];
        let (back1, back2, backs) = (
            conv::Backward::new(sh.g1, pp.w1),
            conv::Backward::new(sh.g2, pp.w2),
            conv::Backward::new(sh.gs, pp.ws),
        );
        // The input gradient, per input tensor, and the scale-shift's.
        let (c_a, c_b) = (sh.c_a, c - sh.c_a);
        // Every element of the input gradients is written before it is read (GroupNorm's backward writes
        // `dx`, the two-part case copies into both); they are zeroed only to be initialised memory, and
        // block by block on the workers: a `vec![0.0; n]` here was a serial memset of the whole batch (0.75%
        // of a 32-channel teacher step at batch 128).
        let (n_a, n_b) = (sh.b * c_a * hw, if self.two { sh.b * c_b * hw } else { 0 });
        let (mut dxa, mut dxb) = (Vec::<f32>::with_capacity(n_a), Vec::<f32>::with_capacity(n_b));
        let mut dss = vec![0.0f32; sh.b * 2 * o];
        let dxb_blocks: Vec<&mut [MaybeUninit<f32>]> = if self.two {
            dxb.spare_capacity_mut()[..n_b]
                .chunks_mut(IMAGES_PER_BLOCK * c_b * hw)
                .collect()
        } else {
            (0..sh.b.div_ceil(IMAGES_PER_BLOCK))
                .map(|_| Default::default())
                .collect()
        };
        let blocks: Vec<_> = dxa.spare_capacity_mut()[..n_a]
            .chunks_mut(IMAGES_PER_BLOCK * c_a * hw)
            .zip(dxb_blocks)
            .zip(dss.chunks_mut(IMAGES_PER_BLOCK * 2 * o))
            .enumerate()
            .collect();
        struct Partial {
            conv1: Vec<f32>,
            conv2: Vec<f32>,
            skip: Vec<f32>,
            norm1: Vec<f32>,
            norm2: Vec<f32>,
        }
        let partials = map_blocks(blocks, |(i, ((dxab, dxbb), dssb))| {
            let (dxab, dxbb) = (zeroed(dxab), zeroed(dxbb));
            let mut part = Partial {
                conv1: back1.partial(),
                conv2: back2.partial(),
                skip: if self.skip { backs.partial() } else { Vec::new() },
                norm1: vec![0.0f32; 2 * c],
                norm2: vec![0.0f32; 2 * o],
            };
            // Scratch: every element is written before it is read (the norms and the convolutions'
            // backward passes overwrite their outputs).
            let (mut n1, mut dn1, mut gx1) = (Scratch::new(c * hw), Scratch::new(c * hw), Scratch::new(c * hw));
            let (mut n2, mut dn2, mut dc1, mut gx2) = (
                Scratch::new(o * hw),
                Scratch::new(o * hw),
                Scratch::new(o * hw),
                Scratch::new(o * hw),
            );
            let mut dskip = Scratch::new(if self.skip { c * hw } else { 0 });
            let two = if self.two { c * hw } else { 0 };
            let (mut xcat, mut dxcat) = (Scratch::new(two), Scratch::new(two));
            let (mut cols1, mut cols2) = (sh.g1.g_cols_scratch(), sh.g2.g_cols_scratch());
            for (j, dssi) in dssb.chunks_mut(2 * o).enumerate() {
                let img = i * IMAGES_PER_BLOCK + j;
                let xi = sh.image(img, xas, xbs, &mut xcat);
                // ∂/∂x of the concatenated image: straight into the one input's gradient, or into `dxcat`.
                let dxi: &mut [f32] = if self.two {
                    &mut dxcat
                } else {
                    &mut dxab[j * c * hw..(j + 1) * c * hw]
                };
                let c1 = &c1_all[img * o * hw..(img + 1) * o * hw];
                let gi = &gs[img * o * hw..(img + 1) * o * hw];
                let (a, shift) = s[img * 2 * o..(img + 1) * 2 * o].split_at(o);
                let acc = j > 0;
                // h = W2 ⋆ n2 + b2: ∂/∂n2, then through GN2 to c1 and the scale-shift.
                let st2 = &stats2[img * groups..(img + 1) * groups];
                normalise(c1, sh.d2, st2, pp.gamma2, pp.beta2, a, shift, &mut n2);
                back2.image(&n2, gi, &mut cols2, &mut dn2, &mut part.conv2, acc);
                let sums2 = |ch: usize, [g_a, g_sh, g_gamma, g_beta]: [f32; 4]| {
                    dssi[ch] = g_a;
                    dssi[o + ch] = g_sh;
                    part.norm2[ch] += g_gamma;
                    part.norm2[o + ch] += g_beta;
                };
                let channel2 = norm::backward_channel(pp.gamma2, pp.beta2, a, shift);
                norm::backward_image(c1, &dn2, sh.d2, st2, true, channel2, sums2, &mut gx2, &mut dc1);
                // c1 = W1 ⋆ n1 + b1: ∂/∂n1, then through GN1 to x.
                let st1 = &stats1[img * groups..(img + 1) * groups];
                normalise(xi, sh.d1, st1, pp.gamma1, pp.beta1, &zeros, &zeros, &mut n1);
                back1.image(&n1, &dc1, &mut cols1, &mut dn1, &mut part.conv1, acc);
                let sums1 = |ch: usize, [_, _, g_gamma, g_beta]: [f32; 4]| {
                    part.norm1[ch] += g_gamma;
                    part.norm1[c + ch] += g_beta;
                };
                let channel1 = norm::backward_channel(pp.gamma1, pp.beta1, &zeros, &zeros);
                norm::backward_image(xi, &dn1, sh.d1, st1, true, channel1, sums1, &mut gx1, dxi);
                // The skip path: ∂/∂x += Wsᵀ·g (or g itself).
                if self.skip {
                    backs.image(xi, gi, &mut [], &mut dskip, &mut part.skip, acc);
                    super::simd::add_assign(dxi, &dskip);
                } else {
                    super::simd::add_assign(dxi, gi);
                }
                if self.two {
                    let (da, db) = dxcat.split_at(c_a * hw);
                    dxab[j * c_a * hw..(j + 1) * c_a * hw].copy_from_slice(da);
                    dxbb[j * c_b * hw..(j + 1) * c_b * hw].copy_from_slice(db);
                }
            }
            part
        });
        // One field of every block's partial sums, in block order.
        let mut partials = partials;
        let mut field = |f: fn(&mut Partial) -> &mut Vec<f32>| -> Vec<Vec<f32>> {
            partials.iter_mut().map(|p| std::mem::take(f(p))).collect()
        };
        let (conv1, conv2, skip) = (field(|p| &mut p.conv1), field(|p| &mut p.conv2), field(|p| &mut p.skip));
        let (norm1, norm2) = (field(|p| &mut p.norm1), field(|p| &mut p.norm2));
        let (dw1, db1) = back1.finish(conv1);
        let (dw2, db2) = back2.finish(conv2);
        let sum = |v| sum_in_order(v).unwrap_or_default();
        let mut dp = dss;
        dp.extend(sum(norm1));
        dp.extend(dw1.iter().chain(&db1));
        dp.extend(sum(norm2));
        dp.extend(dw2.iter().chain(&db2));
        if self.skip {
            let (dws, dbs) = backs.finish(skip);
            dp.extend(dws.iter().chain(&dbs));
        }
        // SAFETY: every block zeroed its part of the spare capacity (`zeroed`), and the blocks cover it.
        unsafe {
            dxa.set_len(n_a);
            dxb.set_len(n_b);
        }
        let (dev, (b, _, h, w)) = (xa.device(), xa.dims4()?);
        Ok((
            Some(Tensor::from_vec(dxa, (b, c_a, h, w), dev)?),
            self.two
                .then(|| Tensor::from_vec(dxb, (b, c_b, h, w), dev))
                .transpose()?,
            Some(Tensor::from_vec(dp, params.shape(), dev)?),
        ))
    }
}

/// `v` filled with zeros, as initialised floats.
fn zeroed(v: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    v.fill(MaybeUninit::new(0.0));
    // SAFETY: every element was just written.
    unsafe { super::dense::assume_init(v) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{check_against_plain, flat, rand, same_on_1_and_4_threads};
    use candle_core::Var;

    struct Vars {
        x: Var,
        ss: Var,
        norm1: Var,
        w1: Var,
        b1: Var,
        norm2: Var,
        w2: Var,
        b2: Var,
        skip: Option<(Var, Var)>,
    }

    fn vars(b: usize, c: usize, o: usize, hw: usize, k: usize, seed: u64) -> Vars {
        let v = |shape: &[usize], i: u64, scale: f64| {
            Var::from_tensor(&(rand(shape, seed * 16 + i) * scale).unwrap()).unwrap()
        };
        Vars {
            x: v(&[b, c, hw, hw + 1], 1, 1.5),
            ss: v(&[b, 2 * o], 2, 0.5),
            norm1: v(&[2 * c], 3, 1.0),
            w1: v(&[o, c, k, k], 4, 0.5),
            b1: v(&[o], 5, 1.0),
            norm2: v(&[2 * o], 6, 1.0),
            w2: v(&[o, o, k, k], 7, 0.5),
            b2: v(&[o], 8, 1.0),
            skip: (c != o).then(|| (v(&[o, c, 1, 1], 9, 0.5), v(&[o], 10, 1.0))),
        }
    }

    fn params(v: &Vars) -> ResBlockParams<'_> {
        ResBlockParams {
            norm1: v.norm1.as_tensor(),
            conv1: (v.w1.as_tensor(), v.b1.as_tensor()),
            norm2: v.norm2.as_tensor(),
            conv2: (v.w2.as_tensor(), v.b2.as_tensor()),
            skip: v.skip.as_ref().map(|(w, b)| (w.as_tensor(), b.as_tensor())),
        }
    }

    /// The fused node against the block's layers from candle's primitive ops, in values and in the
    /// gradients of the input, the scale-shift and every parameter: with and without the skip convolution,
    /// the input as one tensor and as two (split at a group boundary and inside a group), one and several
    /// groups, batches that are not a multiple of the block, and single images large enough that their
    /// convolutions split into bands of pixels (`conv::forward_image_alone`: a band edge inside a line,
    /// the skip convolution, a 7 × 8 image's unaligned bands) and their norms into halves of the groups.
    #[test]
    fn matches_the_layers_in_values_and_gradients() {
        let cases = [
            (1, 32, 32, 27, 3, 4, None),
            (1, 48, 32, 20, 3, 4, None),
            (1, 64, 64, 7, 3, 4, None),
            (5, 4, 6, 5, 3, 2, None),
            (3, 4, 4, 4, 3, 4, None),
            (9, 6, 3, 3, 1, 3, None),
            (1, 2, 2, 6, 3, 1, None),
            (6, 8, 4, 4, 3, 2, Some(4)),
            (5, 6, 4, 3, 3, 2, Some(1)),
        ];
        for (b, c, o, hw, k, groups, split) in cases {
            let v = vars(b, c, o, hw, k, b as u64);
            let p = params(&v);
            let at = format!("{b} {c} {o} {hw} {k} {groups} {split:?}");
            let probe = rand(&[b, o, hw, hw + 1], 99);
            let mut named = vec![
                ("ss", &v.ss),
                ("norm1", &v.norm1),
                ("w1", &v.w1),
                ("b1", &v.b1),
                ("norm2", &v.norm2),
                ("w2", &v.w2),
                ("b2", &v.b2),
            ];
            if let Some((w, bias)) = &v.skip {
                named.extend([("skip w", w), ("skip b", bias)]);
            }
            match split {
                None => {
                    let fast = res_block(&[&v.x], &v.ss, &p, groups, 1e-5).unwrap();
                    let slow = plain(&[&v.x], &v.ss, &p, groups, 1e-5).unwrap();
                    named.push(("x", &v.x));
                    check_against_plain(&fast, &slow, &named, &probe, 1e-4, &at);
                }
                Some(c_a) => {
                    let part = |from: usize, n: usize| Var::from_tensor(&v.x.narrow(1, from, n).unwrap()).unwrap();
                    let (xa, xb) = (part(0, c_a), part(c_a, c - c_a));
                    let fast = res_block(&[&xa, &xb], &v.ss, &p, groups, 1e-5).unwrap();
                    let slow = plain(&[&xa, &xb], &v.ss, &p, groups, 1e-5).unwrap();
                    named.extend([("x first part", &xa), ("x second part", &xb)]);
                    check_against_plain(&fast, &slow, &named, &probe, 1e-4, &at);
                }
            }
        }
    }

    /// The layers' forward-mode pass as the U-Net's tangent path runs it (`GroupNorm` and `Conv2d` JVPs,
    /// the skip, the adds), from the same kernels, one tensor at a time.
    fn layered_jvp(
        x: &Tensor,
        dx: &Tensor,
        ss: &Tensor,
        dss: &Tensor,
        p: &ResBlockParams<'_>,
        groups: usize,
    ) -> (Tensor, Tensor) {
        let conv = |x: &Tensor, (w, b): (&Tensor, &Tensor)| conv::conv2d(x, w, b).unwrap();
        let tangent = |dx: &Tensor, (w, b): (&Tensor, &Tensor)| conv::conv2d(dx, w, &b.zeros_like().unwrap()).unwrap();
        let z = Tensor::zeros((x.dim(0).unwrap(), 2 * x.dim(1).unwrap()), x.dtype(), x.device()).unwrap();
        let (n1, dn1) = norm::group_norm_jvp(x, dx, groups, 1e-5, p.norm1, &z, &z, true).unwrap();
        let (c1, dc1) = (conv(&n1, p.conv1), tangent(&dn1, p.conv1));
        let (n2, dn2) = norm::group_norm_jvp(&c1, &dc1, groups, 1e-5, p.norm2, ss, dss, true).unwrap();
        let (h, dh) = (conv(&n2, p.conv2), tangent(&dn2, p.conv2));
        let (s, ds) = match p.skip {
            Some(sk) => (conv(x, sk), tangent(dx, sk)),
            None => (x.clone(), dx.clone()),
        };
        ((s + h).unwrap(), (ds + dh).unwrap())
    }

    /// The fused forward-mode pass is the layers' one bit for bit (value and tangent): with and without
    /// the skip convolution, the input in one part and in two, batches on and off the block, and single
    /// images whose convolutions split into bands.
    #[test]
    fn jvp_is_the_layers_jvp_bit_for_bit() {
        for (b, c, o, hw, groups, split) in [
            (5, 4, 6, 5, 2, None),
            (3, 4, 4, 4, 4, None),
            (6, 8, 4, 4, 2, Some(4)),
            (1, 32, 32, 27, 4, None),
            (1, 48, 32, 20, 4, Some(16)),
            (9, 16, 16, 7, 4, Some(8)),
        ] {
            let v = vars(b, c, o, hw, 3, 3);
            let p = params(&v);
            let x = v.x.as_tensor();
            let dx = rand(x.dims(), 41);
            let dss = rand(v.ss.dims(), 42);
            let (want, dwant) = layered_jvp(x, &dx, v.ss.as_tensor(), &dss, &p, groups);
            let (parts, tangents): (Vec<Tensor>, Vec<Tensor>) = match split {
                None => (vec![x.clone()], vec![dx.clone()]),
                Some(c_a) => {
                    let cut = |t: &Tensor| vec![t.narrow(1, 0, c_a).unwrap(), t.narrow(1, c_a, c - c_a).unwrap()];
                    (cut(x), cut(&dx))
                }
            };
            let (pr, tr): (Vec<&Tensor>, Vec<&Tensor>) = (parts.iter().collect(), tangents.iter().collect());
            let (y, dy) = res_block_jvp(&pr, &tr, v.ss.as_tensor(), &dss, &p, groups, 1e-5)
                .unwrap()
                .expect("fused");
            let bits = |t: &Tensor| flat(t).iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            let at = format!("{b} {c} {o} {hw} {groups} {split:?}");
            assert!(bits(&y) == bits(&want), "value differs at {at}");
            assert!(bits(&dy) == bits(&dwant), "tangent differs at {at}");
        }
    }

    #[test]
    fn rejects_a_scale_shift_that_does_not_fit() {
        let v = vars(2, 4, 6, 3, 3, 1);
        let err = res_block(&[&v.x], &rand(&[2, 8], 3), &params(&v), 2, 1e-5).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
    }

    #[test]
    fn bit_identical_across_thread_counts() {
        for (b, c, o, hw, split) in [
            (11, 4, 6, 4, None),
            (11, 4, 4, 4, None),
            (11, 8, 4, 4, Some(2)),
            (1, 32, 32, 27, None),
            (1, 48, 32, 20, Some(16)),
        ] {
            let v = vars(b, c, o, hw, 3, 7);
            let parts: Vec<Var> = match split {
                None => vec![v.x.clone()],
                Some(c_a) => vec![
                    Var::from_tensor(&v.x.narrow(1, 0, c_a).unwrap()).unwrap(),
                    Var::from_tensor(&v.x.narrow(1, c_a, c - c_a).unwrap()).unwrap(),
                ],
            };
            let refs: Vec<&Tensor> = parts.iter().map(|p| p.as_tensor()).collect();
            same_on_1_and_4_threads(|| {
                let y = res_block(&refs, &v.ss, &params(&v), 2, 1e-5).unwrap();
                let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                let dx: Vec<f32> = parts.iter().flat_map(|p| flat(g.get(p).unwrap())).collect();
                (
                    flat(&y),
                    dx,
                    [
                        flat(g.get(&v.ss).unwrap()),
                        flat(g.get(&v.w1).unwrap()),
                        flat(g.get(&v.norm1).unwrap()),
                    ]
                    .concat(),
                )
            });
        }
    }
}
