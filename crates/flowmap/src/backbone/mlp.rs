//! The MLP backbone: `F(x, emb(t)[, emb(c)][, emb(t − s)])` on the flattened state, SiLU activations.

use candle_core::Tensor;
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use super::{vars_sorted, Arch, Backbone, Role};
use crate::cond::Cond;
use crate::kernels::{self, Activation};
use crate::layers::Jvp;
use crate::layers::{Dense, SinusoidalEmbedding};
use crate::{state, Error, Result};

/// Architecture of the time-conditioned MLP.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlpConfig {
    /// Data dimension `D` (the number of values in one state).
    pub dim: usize,
    /// Width of each hidden layer.
    pub hidden: usize,
    /// Number of hidden layers.
    pub depth: usize,
    /// Number of frequencies per time embedding (each gives a sine and a cosine feature).
    pub time_features: usize,
    /// Largest embedding frequency.
    pub max_frequency: f64,
    /// Classes of a class-conditional network: a learned embedding of `C + 1` rows, the last the null class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_classes: Option<usize>,
    /// The shape of one state when it is not a flat `D`-vector (e.g. `[1, 28, 28]`); the MLP reads it flattened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_shape: Option<Vec<usize>>,
    /// A guidance-distilled flow map's range of classifier-free guidance scales `[lo, hi]`: the network then
    /// reads a per-row scale `w` ([`Cond::guidance`]), embedded like the times, after every other input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance: Option<[f64; 2]>,
}

impl MlpConfig {
    pub fn new(dim: usize) -> Self {
        MlpConfig {
            dim,
            hidden: 256,
            depth: 3,
            time_features: 16,
            max_frequency: 64.0,
            num_classes: None,
            state_shape: None,
            guidance: None,
        }
    }

    /// An MLP on states of shape `shape` (flattened to `D = ∏ shape`).
    pub fn for_shape(shape: &[usize]) -> Self {
        MlpConfig {
            state_shape: (shape.len() != 1).then(|| shape.to_vec()),
            ..MlpConfig::new(state::numel(shape))
        }
    }

    /// The shape of one state.
    pub fn state_shape(&self) -> Vec<usize> {
        self.state_shape.clone().unwrap_or_else(|| vec![self.dim])
    }
}

/// An MLP on `[x, emb(t)]` (a velocity field) or `[x, emb(t), emb(t − s)]` (a flow map), SiLU activations;
/// a class-conditional one reads `[x, emb(t), e_c]` and `[x, emb(t), e_c, emb(t − s)]`, `e_c` a learned
/// class embedding (the null class for rows without a label).
///
/// The gap's embedding comes last in the input, so a flow-map network extends a velocity network's first
/// layer by extra columns: copying the teacher's weights and zeroing those columns makes the two agree.
#[derive(Clone, Debug)]
pub struct ConditionedMlp {
    time: SinusoidalEmbedding,
    /// `(C + 1) × E`, row `C` the null class.
    classes: Option<Tensor>,
    /// The guidance scale's embedding and the range it was trained on (guidance-distilled flow maps).
    guidance: Option<(SinusoidalEmbedding, [f64; 2])>,
    layers: Vec<Dense>,
    with_gap: bool,
}

impl ConditionedMlp {
    pub fn new(cfg: &MlpConfig, with_gap: bool, vb: VarBuilder) -> Result<Self> {
        let time = SinusoidalEmbedding::new(cfg.time_features, cfg.max_frequency, &vb)?;
        let conds = if with_gap { 2 } else { 1 };
        let mut in_dim = cfg.dim + conds * time.width();
        let classes = match cfg.num_classes {
            None => None,
            Some(0) => return Err(Error::arg("a class-conditional MLP needs at least one class")),
            Some(c) => {
                let e = time.width();
                in_dim += e;
                Some(vb.pp("class_embedding").get_with_hints(
                    (c + 1, e),
                    "weight",
                    candle_nn::Init::Randn { mean: 0.0, stdev: 1.0 },
                )?)
            }
        };
        if let Some(r) = cfg.guidance {
            // Classifier-free guidance needs classes; autoguidance does not.
            super::check_guidance_range(r)?;
        }
        let guidance = super::guidance_embedding(cfg.guidance, cfg.time_features, &vb)?;
        if let Some((g, _)) = &guidance {
            in_dim += g.width();
        }
        let mut layers = Vec::with_capacity(cfg.depth + 1);
        for i in 0..cfg.depth {
            layers.push(Dense::new(
                in_dim,
                cfg.hidden,
                Activation::Silu,
                vb.pp(format!("layer{i}")),
            )?);
            in_dim = cfg.hidden;
        }
        layers.push(Dense::new(
            in_dim,
            cfg.dim,
            Activation::Identity,
            vb.pp(format!("layer{}", cfg.depth)),
        )?);
        Ok(ConditionedMlp {
            time,
            classes,
            guidance,
            layers,
            with_gap,
        })
    }

    /// `x`: `B × D`, `t` and `gap`: `B × 1`. `gap` is required exactly when the network was built with it.
    pub fn forward(&self, x: &Tensor, t: &Tensor, gap: Option<&Tensor>, cond: &Cond) -> Result<Tensor> {
        if gap.is_some() != self.with_gap {
            return Err(Error::arg("network conditioning does not match its inputs"));
        }
        let class = super::class_rows(self.classes.as_ref(), cond, x.dim(0)?)?;
        let guidance = super::guidance_rows(self.guidance.as_ref(), cond, x)?;
        let h = match class {
            None if guidance.is_none() && kernels::applies(x.device(), x.dtype()) => {
                let tg = match gap {
                    Some(g) => Tensor::cat(&[t, g], 1)?,
                    None => t.clone(),
                };
                kernels::conditioning(x, &tg, &self.time.freqs_f32)?
            }
            _ => {
                let mut parts = vec![x.clone(), self.time.forward(t)?];
                parts.extend(class);
                if let Some(g) = gap {
                    parts.push(self.time.forward(g)?);
                }
                parts.extend(guidance);
                Tensor::cat(&parts, 1)?
            }
        };
        let layers: Vec<kernels::Layer<'_>> = self.layers.iter().map(|l| l.as_layer()).collect();
        kernels::mlp(&h, &layers)
    }

    /// The network and its tangent along `(ẋ, ṫ, ġap)` in one pass, on detached tensors (the class
    /// embedding is constant along the tangent).
    pub fn forward_jvp(
        &self,
        (x, t, gap, cond): (&Tensor, &Tensor, Option<&Tensor>, &Cond),
        (dx, dt, dgap): (&Tensor, &Tensor, Option<&Tensor>),
    ) -> Result<(Tensor, Tensor)> {
        let (et, det) = self.time.forward_jvp(t, dt)?;
        let mut parts = vec![x.detach(), et];
        let mut tangents = vec![dx.detach(), det];
        if let Some(e) = super::class_rows(self.classes.as_ref(), cond, x.dim(0)?)? {
            tangents.push(e.zeros_like()?);
            parts.push(e.detach());
        }
        match (gap, dgap, self.with_gap) {
            (Some(g), Some(dg), true) => {
                let (eg, deg) = self.time.forward_jvp(g, dg)?;
                parts.push(eg);
                tangents.push(deg);
            }
            (None, None, false) => {}
            _ => return Err(Error::arg("network conditioning does not match its inputs")),
        }
        if let Some(g) = super::guidance_rows(self.guidance.as_ref(), cond, x)? {
            tangents.push(g.zeros_like()?);
            parts.push(g);
        }
        let mut h = Tensor::cat(&parts, 1)?;
        let mut dh = Tensor::cat(&tangents, 1)?;
        for layer in &self.layers {
            (h, dh) = layer.forward_jvp(&h, &dh)?;
        }
        Ok((h, dh))
    }
}

/// The MLP as a [`Backbone`]: states of any shape are flattened to `B × D` and the output reshaped back.
#[derive(Clone, Debug)]
pub struct Mlp {
    cfg: MlpConfig,
    net: ConditionedMlp,
}

impl Mlp {
    pub fn new(cfg: &MlpConfig, role: Role, vb: VarBuilder) -> Result<Self> {
        Ok(Mlp {
            cfg: cfg.clone(),
            net: ConditionedMlp::new(cfg, role == Role::FlowMap, vb)?,
        })
    }

    fn flat(&self, x: &Tensor) -> Result<Tensor> {
        let flat = state::rows(x)?;
        if flat.dim(1)? != self.cfg.dim {
            return Err(Error::arg(format!(
                "a state of shape {:?} has {} values, but the MLP was built for {}",
                &x.dims()[1..],
                flat.dim(1)?,
                self.cfg.dim
            )));
        }
        Ok(flat)
    }
}

impl Backbone for Mlp {
    fn forward(&self, x: &Tensor, t: &Tensor, gap: Option<&Tensor>, cond: &Cond) -> Result<Tensor> {
        let y = self.net.forward(&self.flat(x)?, t, gap, cond)?;
        if x.rank() == 2 {
            return Ok(y);
        }
        Ok(y.reshape(x.shape())?)
    }

    fn has_tangent(&self) -> bool {
        true
    }

    fn forward_jvp(
        &self,
        (x, t, gap, cond): (&Tensor, &Tensor, Option<&Tensor>, &Cond),
        (dx, dt, dgap): (&Tensor, &Tensor, Option<&Tensor>),
    ) -> Result<(Tensor, Tensor)> {
        let (y, dy) = self
            .net
            .forward_jvp((&self.flat(x)?, t, gap, cond), (&state::rows(dx)?, dt, dgap))?;
        if x.rank() == 2 {
            return Ok((y, dy));
        }
        Ok((y.reshape(x.shape())?, dy.reshape(x.shape())?))
    }

    fn arch(&self) -> Arch {
        Arch::Mlp(self.cfg.clone())
    }
}

/// Re-initialises every parameter from the run's seed (candle's own initialisers draw from an unseeded
/// generator), keeping candle's scale: uniform on ±1/√fan_in for weights and biases (a class embedding's
/// fan-in is its width).
pub fn seed_params(vars: &VarMap, seed: u64) -> Result<()> {
    let mut rng = crate::Rng::derive(seed, "init");
    for (name, var) in vars_sorted(vars) {
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let fan_in = if name.ends_with("bias") {
            // candle's Linear bias init uses the layer's fan-in; recover it from the weight's shape.
            let w = vars
                .data()
                .lock()
                .expect("vars")
                .get(&name.replace("bias", "weight"))
                .map(|w| w.dims()[1]);
            w.unwrap_or(n)
        } else {
            *dims.last().unwrap_or(&1)
        };
        let bound = 1.0 / (fan_in as f64).sqrt();
        let v: Vec<f32> = (0..n).map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32).collect();
        var.set(&Tensor::from_vec(v, dims, var.device())?.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// The MLP's rule for seeding a flow map from a velocity network: tensors of equal shape are copied; a
/// student tensor that extends the teacher's along its input (last) axis gets the teacher's values in the
/// leading columns and zeros in the rest. With [`ConditionedMlp`]'s input layout (the gap's embedding last)
/// the student then computes `F(x, t, s) = v(x, t)`: one Euler step of the teacher.
pub fn init_from_teacher(student: &VarMap, teacher: &VarMap) -> Result<()> {
    let teacher_vars = teacher.data().lock().expect("teacher vars");
    let student_vars = student.data().lock().expect("student vars");
    for (name, sv) in student_vars.iter() {
        let Some(tv) = teacher_vars.get(name) else {
            return Err(Error::arg(format!("teacher has no parameter '{name}'")));
        };
        let (ss, ts) = (sv.dims().to_vec(), tv.dims().to_vec());
        let value = if ss == ts {
            tv.as_tensor().clone()
        } else if ss.len() == 2 && ts.len() == 2 && ss[0] == ts[0] && ss[1] > ts[1] {
            let zeros = Tensor::zeros((ss[0], ss[1] - ts[1]), tv.dtype(), tv.device())?;
            Tensor::cat(&[tv.as_tensor(), &zeros], 1)?
        } else {
            return Err(Error::arg(format!(
                "parameter '{name}': teacher shape {ts:?} cannot seed student shape {ss:?}"
            )));
        };
        sv.set(&value)?;
    }
    Ok(())
}

impl super::BackboneConfig for MlpConfig {
    const NAME: &'static str = "mlp";

    fn for_data(shape: &[usize], classes: Option<usize>) -> Self {
        MlpConfig {
            num_classes: classes,
            ..MlpConfig::for_shape(shape)
        }
    }

    fn build(&self, role: Role, vb: VarBuilder) -> Result<std::sync::Arc<dyn super::Backbone>> {
        Ok(std::sync::Arc::new(Mlp::new(self, role, vb)?))
    }

    fn state_shape(&self) -> Vec<usize> {
        MlpConfig::state_shape(self)
    }

    fn num_classes(&self) -> Option<usize> {
        self.num_classes
    }

    fn guidance(&self) -> Option<[f64; 2]> {
        self.guidance
    }

    fn set_guidance(&mut self, range: Option<[f64; 2]>) {
        self.guidance = range;
    }

    fn activations_per_sample(&self) -> usize {
        self.hidden * self.depth * 6 + self.dim * 4
    }

    fn seed_params(&self, vars: &VarMap, seed: u64) -> Result<()> {
        seed_params(vars, seed)
    }
}
