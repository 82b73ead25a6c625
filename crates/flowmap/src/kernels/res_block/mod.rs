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

mod jvp;
mod op;

use std::mem::MaybeUninit;
use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::conv::{self, Geometry, IMAGES_PER_BLOCK};
use super::norm::{self, Dims};
use super::scratch::Scratch;
use super::{applies, cpu_slice, map_blocks, sum_in_order};
use crate::Result;

pub use jvp::res_block_jvp;

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
/// net's latency 1.58 → 1.52 ms (`flowmap bench speed --nets unet --rows unet-latency-1nfe --unet-channels 32
/// --seconds 3`, four alternating pairs); no other threshold was measured.
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

/// `v` filled with zeros, as initialised floats.
fn zeroed(v: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    v.fill(MaybeUninit::new(0.0));
    // SAFETY: every element was just written.
    unsafe { super::dense::assume_init(v) }
}

#[cfg(test)]
mod tests;
