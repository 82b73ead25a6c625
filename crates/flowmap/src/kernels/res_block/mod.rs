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
mod tests;
