//! The U-Net backbone (ADM / EDM style) for image states `B × C × H × W`.
//!
//! ```text
//! emb  = Dense(SiLU(Dense([sin/cos(t), e_c, sin/cos(t − s)])))        E = 4·channels
//! h    = Conv3×3(x)
//! down: per level, `blocks` residual blocks (+ attention where the resolution is listed), then 2×2 mean pool
//! mid:  residual block, attention, residual block
//! up:   per level, `blocks + 1` residual blocks on [h, skip] (+ attention), then nearest 2× upsampling
//! out  = Conv3×3(SiLU(GroupNorm(h)))                                   zero-initialised
//! ```
//!
//! A residual block is `skip(h) + Conv(Dropout(SiLU(GN(Conv(SiLU(GN(h)))) ⊙ (1 + scale) + shift)))`, with
//! `(scale, shift) = Dense(SiLU(emb))` (ADM's scale-shift norm) and its last convolution zero-initialised;
//! attention is single- or multi-head self-attention over the `H·W` positions with a zero-initialised
//! output projection, softmax built from primitive ops. GroupNorm is built from primitive ops too: candle's
//! fused norms have no backward.
//!
//! The network is written once (`Unet::body`) over a value type that is either a tensor (the forward pass,
//! on candle's autograd graph) or a tensor with its tangent (the exact forward-mode JVP): every layer has
//! both rules, and the traversal cannot drift between them.
//!
//! As in the MLP, the gap's embedding enters the embedding network's first layer as its last columns, so a
//! flow map seeded from a teacher (those columns zero) computes `F(x, t, s, c) = v(x, t, c)`.

mod config;

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use super::{class_rows, Arch, Backbone, Role};
use crate::cond::Cond;
use crate::kernels::{self, Activation};
pub use crate::layers::{Attention, Conv2d, GroupNorm};
use crate::layers::{Dense, Jvp, Silu, SinusoidalEmbedding};
use crate::{Error, Result};
pub use config::{seed_params, UnetConfig};

/// A value flowing through the network: a tensor (forward pass) or a tensor and its tangent (JVP).
trait Flow: Sized + Clone {
    fn layer<L: Module + Jvp>(&self, l: &L) -> Result<Self>;
    fn silu(&self) -> Result<Self>;
    fn add(&self, other: &Self) -> Result<Self>;
    fn cat(parts: &[&Self]) -> Result<Self>;
    /// 2 × 2 mean pooling.
    fn pool(&self) -> Result<Self>;
    /// Nearest-neighbour 2× upsampling.
    fn upsample(&self) -> Result<Self>;
    /// `act(GN(h) ⊙ (1 + a) + b)` (SiLU when `silu`; no modulation without `ss`).
    fn norm(&self, n: &GroupNorm, ss: Option<&Self>, silu: bool) -> Result<Self>;
    /// Dropout with the same mask for a value and its tangent.
    fn dropout(&self, mask: Option<&Tensor>) -> Result<Self>;
    /// The residual block `b` of the channels of `parts` concatenated, `SiLU(emb)` being `act_emb`.
    fn res_block(parts: &[&Self], b: &ResBlock, act_emb: &Self, mask: Option<&Tensor>) -> Result<Self> {
        match parts {
            [x] => b.run(x, act_emb, mask),
            _ => b.run(&Self::cat(parts)?, act_emb, mask),
        }
    }
    /// `conv(dropout(SiLU(GN(h) ⊙ (1 + a) + b)))`, the norm-activation-convolution of every block.
    fn norm_conv(&self, n: &GroupNorm, ss: Option<&Self>, mask: Option<&Tensor>, conv: &Conv2d) -> Result<Self> {
        self.norm(n, ss, true)?.dropout(mask)?.layer(conv)
    }
    fn primal(&self) -> &Tensor;
}

impl Flow for Tensor {
    fn layer<L: Module + Jvp>(&self, l: &L) -> Result<Self> {
        Ok(l.forward(self)?)
    }
    fn silu(&self) -> Result<Self> {
        Ok(Tensor::silu(self)?)
    }
    fn add(&self, o: &Self) -> Result<Self> {
        Ok((self + o)?)
    }
    fn cat(parts: &[&Self]) -> Result<Self> {
        Ok(Tensor::cat(parts, 1)?)
    }
    fn pool(&self) -> Result<Self> {
        kernels::pool2(self)
    }
    fn upsample(&self) -> Result<Self> {
        // Not candle's `upsample_nearest2d`, whose backward overwrites gradients: a fused node on the CPU, a
        // broadcast (its backward sums) elsewhere.
        kernels::upsample2(self)
    }
    fn norm(&self, n: &GroupNorm, ss: Option<&Self>, silu: bool) -> Result<Self> {
        n.forward_modulated(self, ss, silu)
    }
    fn dropout(&self, mask: Option<&Tensor>) -> Result<Self> {
        Ok(match mask {
            Some(m) => (self * m)?,
            None => self.clone(),
        })
    }
    /// Without dropout, the whole block as one node ([`kernels::res_block`]), which reads the parts
    /// without concatenating them.
    fn res_block(parts: &[&Self], b: &ResBlock, act_emb: &Self, mask: Option<&Tensor>) -> Result<Self> {
        if mask.is_some() {
            return b.run(&Tensor::cat(parts, 1)?, act_emb, mask);
        }
        let ss = act_emb.layer(&b.emb)?;
        let (norm1, norm2) = (b.norm1.affine()?, b.norm2.affine()?);
        let (groups, eps) = b.norm1.settings();
        kernels::res_block(parts, &ss, &b.fused_params(&norm1, &norm2), groups, eps)
    }
    /// Without dropout, one node that keeps no normalised activation for the backward pass.
    fn norm_conv(&self, n: &GroupNorm, ss: Option<&Self>, mask: Option<&Tensor>, conv: &Conv2d) -> Result<Self> {
        match mask {
            None => n.forward_modulated_conv(self, ss, true, conv),
            Some(m) => Flow::norm(self, n, ss, true)?.dropout(Some(m))?.layer(conv),
        }
    }
    fn primal(&self) -> &Tensor {
        self
    }
}

/// A value and its tangent, both detached.
#[derive(Clone)]
struct Dual(Tensor, Tensor);

impl Flow for Dual {
    fn layer<L: Module + Jvp>(&self, l: &L) -> Result<Self> {
        let (y, dy) = l.forward_jvp(&self.0, &self.1)?;
        Ok(Dual(y, dy))
    }
    fn silu(&self) -> Result<Self> {
        self.layer(&Silu)
    }
    fn add(&self, o: &Self) -> Result<Self> {
        Ok(Dual((&self.0 + &o.0)?, (&self.1 + &o.1)?))
    }
    fn cat(parts: &[&Self]) -> Result<Self> {
        let p: Vec<&Tensor> = parts.iter().map(|d| &d.0).collect();
        let t: Vec<&Tensor> = parts.iter().map(|d| &d.1).collect();
        Ok(Dual(Tensor::cat(&p, 1)?, Tensor::cat(&t, 1)?))
    }
    fn pool(&self) -> Result<Self> {
        Ok(Dual(kernels::pool2(&self.0)?, kernels::pool2(&self.1)?))
    }
    fn upsample(&self) -> Result<Self> {
        Ok(Dual(kernels::upsample2(&self.0)?, kernels::upsample2(&self.1)?))
    }
    fn norm(&self, n: &GroupNorm, ss: Option<&Self>, silu: bool) -> Result<Self> {
        let (y, dy) = n.forward_modulated_jvp(&self.0, &self.1, ss.map(|s| (&s.0, &s.1)), silu)?;
        Ok(Dual(y, dy))
    }
    fn dropout(&self, mask: Option<&Tensor>) -> Result<Self> {
        Ok(match mask {
            Some(m) => Dual((&self.0 * m)?, (&self.1 * m)?),
            None => self.clone(),
        })
    }
    /// Without dropout, the whole block's value and tangent in one pass per image
    /// ([`kernels::res_block_jvp`], the same bits as the layers one by one) where it applies.
    fn res_block(parts: &[&Self], b: &ResBlock, act_emb: &Self, mask: Option<&Tensor>) -> Result<Self> {
        if mask.is_none() {
            let ss = act_emb.layer(&b.emb)?;
            let (norm1, norm2) = (b.norm1.affine()?, b.norm2.affine()?);
            let (groups, eps) = b.norm1.settings();
            let p = b.fused_params(&norm1, &norm2);
            let x: Vec<&Tensor> = parts.iter().map(|d| &d.0).collect();
            let dx: Vec<&Tensor> = parts.iter().map(|d| &d.1).collect();
            if let Some((y, dy)) = kernels::res_block_jvp(&x, &dx, &ss.0, &ss.1, &p, groups, eps)? {
                return Ok(Dual(y, dy));
            }
        }
        match parts {
            [x] => b.run(x, act_emb, mask),
            _ => b.run(&Self::cat(parts)?, act_emb, mask),
        }
    }
    fn primal(&self) -> &Tensor {
        &self.0
    }
}

/// A residual block with scale-shift conditioning.
#[derive(Clone, Debug)]
struct ResBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    emb: Dense,
    norm2: GroupNorm,
    conv2: Conv2d,
    skip: Option<Conv2d>,
}

impl ResBlock {
    fn new(c_in: usize, c_out: usize, cfg: &UnetConfig, vb: VarBuilder) -> Result<Self> {
        Ok(ResBlock {
            norm1: GroupNorm::new(cfg.groups, c_in, vb.pp("norm1"))?,
            conv1: Conv2d::new(c_in, c_out, 3, vb.pp("conv1"))?,
            emb: Dense::new(cfg.embedding_width(), 2 * c_out, Activation::Identity, vb.pp("emb"))?,
            norm2: GroupNorm::new(cfg.groups, c_out, vb.pp("norm2"))?,
            conv2: Conv2d::new(c_out, c_out, 3, vb.pp("conv2"))?,
            skip: (c_in != c_out)
                .then(|| Conv2d::new(c_in, c_out, 1, vb.pp("skip")))
                .transpose()?,
        })
    }

    /// The parameters as the fused nodes take them, with each norm's `[γ; β]` given.
    fn fused_params<'a>(&'a self, norm1: &'a Tensor, norm2: &'a Tensor) -> kernels::ResBlockParams<'a> {
        kernels::ResBlockParams {
            norm1,
            conv1: self.conv1.params(),
            norm2,
            conv2: self.conv2.params(),
            skip: self.skip.as_ref().map(Conv2d::params),
        }
    }

    /// `act_emb` is `SiLU(emb)`, shared by every block.
    fn run<V: Flow>(&self, x: &V, act_emb: &V, mask: Option<&Tensor>) -> Result<V> {
        let h = x.norm_conv(&self.norm1, None, None, &self.conv1)?;
        let ss = act_emb.layer(&self.emb)?;
        let h = h.norm_conv(&self.norm2, Some(&ss), mask, &self.conv2)?;
        let skip = match &self.skip {
            Some(s) => x.layer(s)?,
            None => x.clone(),
        };
        skip.add(&h)
    }
}

#[derive(Clone, Debug)]
struct Stage {
    block: ResBlock,
    attention: Option<Attention>,
}

impl Stage {
    /// The stage on the channels of `parts` concatenated.
    fn run<V: Flow>(&self, parts: &[&V], act_emb: &V, net: &Unet) -> Result<V> {
        let mask = net.dropout_mask(parts[0].primal(), self.block.conv2.out_channels())?;
        let h = V::res_block(parts, &self.block, act_emb, mask.as_ref())?;
        match &self.attention {
            Some(a) => h.layer(a),
            None => Ok(h),
        }
    }
}

/// The U-Net as a [`Backbone`].
#[derive(Debug)]
pub struct Unet {
    cfg: UnetConfig,
    time: SinusoidalEmbedding,
    classes: Option<Tensor>,
    /// The guidance scale's embedding and the range it was trained on (guidance-distilled flow maps).
    guidance: Option<(SinusoidalEmbedding, [f64; 2])>,
    emb0: Dense,
    emb1: Dense,
    input: Conv2d,
    down: Vec<Vec<Stage>>,
    mid: (ResBlock, Attention, ResBlock),
    up: Vec<Vec<Stage>>,
    out_norm: GroupNorm,
    out_conv: Conv2d,
    with_gap: bool,
    dropout: std::sync::Mutex<Option<crate::Rng>>,
}

impl Unet {
    pub fn new(cfg: &UnetConfig, role: Role, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let with_gap = role == Role::FlowMap;
        let e = cfg.embedding_width();
        let time = SinusoidalEmbedding::new(cfg.time_features, cfg.max_frequency, &vb)?;
        let mut emb_in = time.width() * if with_gap { 2 } else { 1 };
        let classes = match cfg.num_classes {
            Some(c) => {
                emb_in += e;
                Some(vb.pp("class_embedding").get_with_hints(
                    (c + 1, e),
                    "weight",
                    candle_nn::Init::Randn { mean: 0.0, stdev: 1.0 },
                )?)
            }
            None => None,
        };
        let guidance = super::guidance_embedding(cfg.guidance, cfg.time_features, &vb)?;
        if let Some((g, _)) = &guidance {
            emb_in += g.width();
        }
        let emb0 = Dense::new(emb_in, e, Activation::Silu, vb.pp("emb.0"))?;
        let emb1 = Dense::new(e, e, Activation::Identity, vb.pp("emb.1"))?;
        let [c_img, h, _] = cfg.state_shape[..] else {
            unreachable!("validated")
        };
        let input = Conv2d::new(c_img, cfg.channels, 3, vb.pp("input"))?;
        let attends = |level: usize| cfg.attention_resolutions.contains(&(h >> level));
        let stage = |c_in: usize, c_out: usize, level: usize, vb: VarBuilder| -> Result<Stage> {
            Ok(Stage {
                block: ResBlock::new(c_in, c_out, cfg, vb.pp("res"))?,
                attention: attends(level)
                    .then(|| Attention::new(c_out, cfg.heads, cfg.groups, vb.pp("attn")))
                    .transpose()?,
            })
        };
        let levels = cfg.channel_mult.len();
        let mut skips = vec![cfg.channels];
        let mut ch = cfg.channels;
        let mut down = Vec::with_capacity(levels);
        for (level, m) in cfg.channel_mult.iter().enumerate() {
            let mut stages = Vec::new();
            for i in 0..cfg.blocks {
                let out = m * cfg.channels;
                stages.push(stage(ch, out, level, vb.pp(format!("down.{level}.{i}")))?);
                ch = out;
                skips.push(ch);
            }
            if level + 1 < levels {
                skips.push(ch);
            }
            down.push(stages);
        }
        let mid = (
            ResBlock::new(ch, ch, cfg, vb.pp("mid.res0"))?,
            Attention::new(ch, cfg.heads, cfg.groups, vb.pp("mid.attn"))?,
            ResBlock::new(ch, ch, cfg, vb.pp("mid.res1"))?,
        );
        let mut up = Vec::with_capacity(levels);
        for (level, m) in cfg.channel_mult.iter().enumerate().rev() {
            let mut stages = Vec::new();
            for i in 0..=cfg.blocks {
                let out = m * cfg.channels;
                let skip = skips.pop().expect("one skip per block");
                stages.push(stage(ch + skip, out, level, vb.pp(format!("up.{level}.{i}")))?);
                ch = out;
            }
            up.push(stages);
        }
        let out_norm = GroupNorm::new(cfg.groups, ch, vb.pp("out.norm"))?;
        let out_conv = Conv2d::new(ch, c_img, 3, vb.pp("out.conv"))?;
        Ok(Unet {
            cfg: cfg.clone(),
            time,
            classes,
            guidance,
            emb0,
            emb1,
            input,
            down,
            mid,
            up,
            out_norm,
            out_conv,
            with_gap,
            dropout: std::sync::Mutex::new(None),
        })
    }

    /// Turns dropout on, with masks drawn from `seed` (reproducible), or off (`None`, the default: sampling
    /// and evaluation).
    pub fn set_dropout_seed(&self, seed: Option<u64>) {
        *self.dropout.lock().expect("dropout") = seed.map(|s| crate::Rng::derive(s, "dropout"));
    }

    /// An inverted-dropout mask `B × C × H × W` (values `0` or `1/(1 − p)`), or `None` when dropout is off.
    fn dropout_mask(&self, x: &Tensor, channels: usize) -> Result<Option<Tensor>> {
        let p = self.cfg.dropout;
        let mut guard = self.dropout.lock().expect("dropout");
        let Some(rng) = guard.as_mut().filter(|_| p > 0.0) else {
            return Ok(None);
        };
        let (b, _, h, w) = x.dims4()?;
        let keep = (1.0 / (1.0 - p)) as f32;
        let m: Vec<f32> = (0..b * channels * h * w)
            .map(|_| if rng.uniform() < p { 0.0 } else { keep })
            .collect();
        Ok(Some(
            Tensor::from_vec(m, (b, channels, h, w), x.device())?.to_dtype(x.dtype())?,
        ))
    }

    fn check(&self, x: &Tensor, gap: Option<&Tensor>) -> Result<()> {
        if gap.is_some() != self.with_gap {
            return Err(Error::arg("network conditioning does not match its inputs"));
        }
        if x.rank() != 4 || x.dims()[1..] != self.cfg.state_shape[..] {
            return Err(Error::arg(format!(
                "a state of shape {:?} does not fit the U-Net, which was built for {:?}",
                &x.dims()[1..],
                self.cfg.state_shape
            )));
        }
        Ok(())
    }

    /// The embedding network's input `[sin/cos(t), e_c, sin/cos(t − s)]` (with tangents for the JVP).
    fn embedding_input(&self, t: &Tensor, gap: Option<&Tensor>, cond: &Cond, b: usize) -> Result<Tensor> {
        let mut parts = vec![self.time.forward(t)?];
        parts.extend(class_rows(self.classes.as_ref(), cond, b)?);
        if let Some(g) = gap {
            parts.push(self.time.forward(g)?);
        }
        parts.extend(super::guidance_rows(self.guidance.as_ref(), cond, t)?);
        Ok(Tensor::cat(&parts, 1)?)
    }

    /// The network body after the embedding input: shared by the forward pass and the JVP.
    fn body<V: Flow>(&self, x: &V, emb_in: &V) -> Result<V> {
        let act_emb = emb_in.layer(&self.emb0)?.layer(&self.emb1)?.silu()?;
        let mut h = x.layer(&self.input)?;
        let mut skips = vec![h.clone()];
        let levels = self.down.len();
        for (level, stages) in self.down.iter().enumerate() {
            for s in stages {
                h = s.run(&[&h], &act_emb, self)?;
                skips.push(h.clone());
            }
            if level + 1 < levels {
                h = h.pool()?;
                skips.push(h.clone());
            }
        }
        let mask = self.dropout_mask(h.primal(), self.mid.0.conv2.out_channels())?;
        h = V::res_block(&[&h], &self.mid.0, &act_emb, mask.as_ref())?;
        h = h.layer(&self.mid.1)?;
        let mask = self.dropout_mask(h.primal(), self.mid.2.conv2.out_channels())?;
        h = V::res_block(&[&h], &self.mid.2, &act_emb, mask.as_ref())?;
        for (i, stages) in self.up.iter().enumerate() {
            for s in stages {
                let skip = skips.pop().expect("one skip per block");
                h = s.run(&[&h, &skip], &act_emb, self)?;
            }
            if i + 1 < levels {
                h = h.upsample()?;
            }
        }
        h.norm_conv(&self.out_norm, None, None, &self.out_conv)
    }
}

impl Backbone for Unet {
    fn forward(&self, x: &Tensor, t: &Tensor, gap: Option<&Tensor>, cond: &Cond) -> Result<Tensor> {
        self.check(x, gap)?;
        let emb_in = self.embedding_input(t, gap, cond, x.dim(0)?)?;
        self.body(x, &emb_in)
    }

    fn has_tangent(&self) -> bool {
        true
    }

    fn forward_jvp(
        &self,
        (x, t, gap, cond): (&Tensor, &Tensor, Option<&Tensor>, &Cond),
        (dx, dt, dgap): (&Tensor, &Tensor, Option<&Tensor>),
    ) -> Result<(Tensor, Tensor)> {
        self.check(x, gap)?;
        let (et, det) = self.time.forward_jvp(t, dt)?;
        let mut parts = vec![et];
        let mut tangents = vec![det];
        if let Some(e) = class_rows(self.classes.as_ref(), cond, x.dim(0)?)? {
            tangents.push(e.zeros_like()?);
            parts.push(e.detach());
        }
        match (gap, dgap) {
            (Some(g), Some(dg)) => {
                let (eg, deg) = self.time.forward_jvp(g, dg)?;
                parts.push(eg);
                tangents.push(deg);
            }
            (None, None) => {}
            _ => return Err(Error::arg("a gap and its tangent come together")),
        }
        if let Some(g) = super::guidance_rows(self.guidance.as_ref(), cond, x)? {
            tangents.push(g.zeros_like()?);
            parts.push(g);
        }
        let emb_in = Dual(Tensor::cat(&parts, 1)?, Tensor::cat(&tangents, 1)?);
        let out = self.body(&Dual(x.detach(), dx.detach()), &emb_in)?;
        Ok((out.0, out.1))
    }

    fn arch(&self) -> Arch {
        Arch::Unet(self.cfg.clone())
    }

    fn set_dropout_seed(&self, seed: Option<u64>) {
        Unet::set_dropout_seed(self, seed)
    }

    fn uses_dropout(&self) -> bool {
        self.cfg.dropout > 0.0
    }
}
