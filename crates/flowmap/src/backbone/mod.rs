//! Backbones: the networks inside teachers and flow maps.
//!
//! A [`Backbone`] computes `F(x, t[, t − s], c)` on a batch of states of any shape: a velocity network
//! reads `(x, t, c)`, a flow map also the gap `t − s`. Teachers ([`crate::teacher::VelocityNet`]) and flow
//! maps ([`crate::flow_map::FlowMapNet`]) are built over any backbone; which one is data, an [`Arch`], which
//! checkpoints record in their metadata as a tagged value (`{"kind": "mlp", …}`) and loading dispatches on.
//!
//! A backbone may have a forward-mode tangent rule (the MLP does); one without it still trains by every
//! discrete objective, and by the continuous ones with finite-difference tangents.
//!
//! Adding a network is one file (the network implementing [`Backbone`], its configuration implementing
//! [`BackboneConfig`]) and one line of the `backbones!` registry below, which generates [`Arch`].

pub mod mlp;
pub mod unet;

use std::fmt;
use std::sync::Arc;

use candle_core::{Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

pub use mlp::{ConditionedMlp, Mlp, MlpConfig};
pub use unet::{Unet, UnetConfig};

use crate::cond::Cond;
use crate::Result;

/// What a backbone is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A velocity field `v(x, t, c)`.
    Velocity,
    /// A flow map's average velocity `F(x, t, s, c)`, read through the gap `t − s`.
    FlowMap,
}

/// A network on `B × …` states, `B × 1` times and a condition; its output has the state's shape.
pub trait Backbone: fmt::Debug + Send + Sync {
    /// `F(x, t, gap, c)`; `gap = t − s` is given exactly when the backbone was built for [`Role::FlowMap`].
    fn forward(&self, x: &Tensor, t: &Tensor, gap: Option<&Tensor>, cond: &Cond) -> Result<Tensor>;

    /// Whether [`Backbone::forward_jvp`] is implemented.
    fn has_tangent(&self) -> bool {
        false
    }

    /// The output and its derivative along `(ẋ, ṫ, ġap)` (the condition is held fixed), in one pass on
    /// detached tensors.
    fn forward_jvp(
        &self,
        _at: (&Tensor, &Tensor, Option<&Tensor>, &Cond),
        _along: (&Tensor, &Tensor, Option<&Tensor>),
    ) -> Result<(Tensor, Tensor)> {
        Err(crate::Error::arg(format!(
            "the {} backbone has no forward-mode tangent rule (use finite-difference tangents)",
            self.arch().name()
        )))
    }

    /// The architecture the backbone was built from.
    fn arch(&self) -> Arch;

    /// Turns training-time randomness (dropout) on with masks drawn from `seed`, or off with `None`; a
    /// backbone without any ignores it.
    fn set_dropout_seed(&self, _seed: Option<u64>) {}

    /// Whether training draws dropout masks ([`Backbone::set_dropout_seed`]).
    fn uses_dropout(&self) -> bool {
        false
    }
}

/// The class-embedding rows of a `b`-row batch: the labels' rows of `table` (`(C + 1) × E`, row `C` the
/// null class), or the null class's without labels; `None` for an unconditional network.
pub(crate) fn class_rows(table: Option<&Tensor>, cond: &Cond, b: usize) -> Result<Option<Tensor>> {
    let Some(table) = table else {
        return Ok(None);
    };
    let null = table.dim(0)? - 1;
    let labels = match cond.class_labels() {
        Some(l) => {
            cond.check_rows(b)?;
            let max = l.max(0)?.to_scalar::<u32>()? as usize;
            if max > null {
                return Err(crate::Error::arg(format!(
                    "class label {max} is out of range (the network has {null} classes and the null class {null})"
                )));
            }
            l.clone()
        }
        None => Tensor::full(null as u32, b, table.device())?,
    };
    Ok(Some(table.index_select(&labels, 0)?))
}

/// The largest frequency of the guidance-scale embedding, which reads `w / 4`: frequencies from 1/4 to 4 per
/// unit of `w`, smooth over the scales guidance uses.
const GUIDANCE_MAX_FREQUENCY: f64 = 16.0;
const GUIDANCE_INPUT_SCALE: f64 = 0.25;

/// The embedding of a per-row guidance scale `w` (a guidance-distilled flow map's extra input), built when
/// the architecture has a guidance range.
pub(crate) fn guidance_embedding(
    range: Option<[f64; 2]>,
    features: usize,
    vb: &VarBuilder,
) -> Result<Option<(crate::layers::SinusoidalEmbedding, [f64; 2])>> {
    range
        .map(|r| {
            Ok((
                crate::layers::SinusoidalEmbedding::new(features, GUIDANCE_MAX_FREQUENCY, vb)?,
                r,
            ))
        })
        .transpose()
}

/// The guidance features of a `b`-row batch, `[sin/cos(ω w/4)]`, when the network has a guidance input;
/// an error when the network and the condition disagree about having one.
pub(crate) fn guidance_rows(
    embedding: Option<&(crate::layers::SinusoidalEmbedding, [f64; 2])>,
    cond: &Cond,
    x: &Tensor,
) -> Result<Option<Tensor>> {
    match (embedding, cond.guidance()) {
        (None, None) => Ok(None),
        (Some((e, _)), Some(w)) => {
            cond.check_rows(x.dim(0)?)?;
            Ok(Some(e.forward(&(w.to_dtype(x.dtype())? * GUIDANCE_INPUT_SCALE)?)?))
        }
        (Some((_, [lo, hi])), None) => Err(crate::Error::arg(format!(
            "this flow map has classifier-free guidance distilled into it (w in [{lo}, {hi}]): give it a guidance scale w"
        ))),
        (None, Some(_)) => Err(crate::Error::arg(
            "this network has no guidance input: it was not distilled with a guidance range",
        )),
    }
}

/// Errors unless a guidance range `[lo, hi]` has `0 ≤ lo ≤ hi`, both finite.
pub fn check_guidance_range([lo, hi]: [f64; 2]) -> Result<()> {
    if !(lo.is_finite() && hi.is_finite() && lo >= 0.0) {
        return Err(crate::Error::arg(format!(
            "guidance range {lo},{hi}: scales must be finite numbers ≥ 0"
        )));
    }
    if lo > hi {
        return Err(crate::Error::arg(format!("guidance range {lo},{hi}: lo > hi")));
    }
    Ok(())
}

/// What every backbone's configuration provides: a backbone is its file, holding its network and its
/// configuration type implementing this trait, and one line of the `backbones!` registry below.
pub trait BackboneConfig {
    /// The name recorded in checkpoints (the `kind` of [`Arch`]'s tagged value) and on the command line.
    const NAME: &'static str;
    /// The default network for states of `shape`, class-conditional with `classes`.
    fn for_data(shape: &[usize], classes: Option<usize>) -> Self
    where
        Self: Sized;
    /// Errors when the settings do not describe a network that can be built.
    fn validate(&self) -> Result<()> {
        Ok(())
    }
    /// Builds the network for `role` with its parameters in `vb`.
    fn build(&self, role: Role, vb: VarBuilder) -> Result<Arc<dyn Backbone>>;
    /// The shape of one state, e.g. `[D]` or `[C, H, W]`.
    fn state_shape(&self) -> Vec<usize>;
    /// The number of classes of a class-conditional network (labels `0..C`, `C` the null class).
    fn num_classes(&self) -> Option<usize>;
    /// The range of guidance scales a guidance-distilled flow map was trained on.
    fn guidance(&self) -> Option<[f64; 2]>;
    /// Sets the guidance input's range (its columns come last in the first layer that reads the
    /// conditioning, so [`BackboneConfig::init_from_teacher`] starts them at zero).
    fn set_guidance(&mut self, range: Option<[f64; 2]>);
    /// A lower bound on the f32 values one training step keeps per sample for the backward pass, for the
    /// model (the loop doubles it for the target).
    fn activations_per_sample(&self) -> usize;
    /// Draws every parameter in `vars` from the run's `seed` (candle's initialisers are unseeded).
    fn seed_params(&self, vars: &VarMap, seed: u64) -> Result<()>;
    /// Sets a flow map's parameters from a teacher's of the same architecture so that the flow map starts
    /// as one Euler step of the teacher, `F(x, t, s, c) = v(x, t, c)`. The default is the rule every
    /// backbone here follows ([`mlp::init_from_teacher`]): the gap's (and guidance's) columns come last in
    /// the first layer that reads the conditioning and start at zero; every other tensor is the teacher's.
    fn init_from_teacher(&self, student: &VarMap, teacher: &VarMap) -> Result<()> {
        mlp::init_from_teacher(student, teacher)
    }
}

/// The registry of backbones: each line is the [`Arch`] variant, its configuration type, and what the
/// variant says of itself. It generates [`Arch`] (a tagged value in every checkpoint) and its dispatch.
macro_rules! backbones {
    ($($(#[$doc:meta])* $variant:ident($config:ty),)+) => {
        /// A backbone's architecture: which network, and its settings.
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "kind", rename_all = "snake_case")]
        pub enum Arch {
            $($(#[$doc])* $variant($config),)+
        }

        $(impl From<$config> for Arch {
            fn from(c: $config) -> Self {
                Arch::$variant(c)
            }
        })+

        /// Calls `$f` with the configuration inside an [`Arch`], whatever its backbone.
        macro_rules! with_config {
            ($arch:expr, $c:ident => $body:expr) => {
                match $arch {
                    $(Arch::$variant($c) => $body,)+
                }
            };
        }

        impl Arch {
            /// The names of every backbone, in the registry's order.
            pub const NAMES: &'static [&'static str] = &[$(<$config as BackboneConfig>::NAME),+];

            /// The backbone named `kind` with its defaults for states of `shape`, class-conditional with
            /// `classes`.
            pub fn for_data(kind: &str, shape: &[usize], classes: Option<usize>) -> Result<Arch> {
                $(if kind == <$config as BackboneConfig>::NAME {
                    return Ok(Arch::$variant(<$config as BackboneConfig>::for_data(shape, classes)));
                })+
                Err(crate::Error::arg(format!(
                    "unknown architecture '{kind}' (expected {})",
                    Arch::NAMES.join(" or ")
                )))
            }
        }
    };
}

backbones! {
    /// A time-conditioned MLP on the flattened state.
    Mlp(MlpConfig),
    /// A U-Net on `C × H × W` images.
    Unet(UnetConfig),
}

impl From<&MlpConfig> for Arch {
    fn from(c: &MlpConfig) -> Self {
        Arch::Mlp(c.clone())
    }
}

impl From<&Arch> for Arch {
    fn from(a: &Arch) -> Self {
        a.clone()
    }
}

impl Arch {
    /// The backbone a network on states of `shape` gets when none is named: a U-Net for images
    /// (`C × H × W`), an MLP otherwise.
    pub fn default_kind(shape: &[usize]) -> &'static str {
        if shape.len() == 3 {
            UnetConfig::NAME
        } else {
            MlpConfig::NAME
        }
    }

    /// The names of the settings this architecture has (its keys in a checkpoint and an `[arch]` table).
    pub fn setting_names(&self) -> Vec<String> {
        match toml::Value::try_from(self) {
            Ok(toml::Value::Table(t)) => t.keys().filter(|k| *k != "kind").cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// This architecture with `settings` laid over it, key by key (an unknown key or a value of the wrong
    /// type is an error that names it, prefixed by `what`). Not validated: settings laid on in turn may
    /// only make sense together ([`Arch::validate`]).
    pub fn with_settings(&self, settings: &toml::Table, what: &str) -> Result<Arch> {
        let mut merged = toml::Value::try_from(self).map_err(|e| crate::Error::Config(e.to_string()))?;
        if let toml::Value::Table(m) = &mut merged {
            for (k, v) in settings {
                m.insert(k.clone(), v.clone());
            }
        }
        merged
            .try_into()
            .map_err(|e: toml::de::Error| crate::Error::Config(format!("{what}: {}", e.message())))
    }

    /// Errors when the settings do not describe a network that can be built.
    pub fn validate(&self) -> Result<()> {
        with_config!(self, c => c.validate())
    }

    /// A lower bound on the bytes one training step holds per sample (f32 activations kept for the
    /// backward pass, for the model and its target); the training loop refuses a batch whose total
    /// clearly exceeds the memory available.
    pub fn train_bytes_per_sample(&self) -> usize {
        with_config!(self, c => c.activations_per_sample()) * 4 * 2
    }

    /// The name recorded in checkpoints (`mlp`, `unet`).
    pub fn name(&self) -> &'static str {
        fn name_of<C: BackboneConfig>(_: &C) -> &'static str {
            C::NAME
        }
        with_config!(self, c => name_of(c))
    }

    /// Builds the backbone for `role` with its parameters in `vb`.
    pub fn build(&self, role: Role, vb: VarBuilder) -> Result<Arc<dyn Backbone>> {
        with_config!(self, c => c.build(role, vb))
    }

    /// The shape of one state, e.g. `[D]` or `[C, H, W]`.
    pub fn state_shape(&self) -> Vec<usize> {
        with_config!(self, c => c.state_shape())
    }

    /// The number of classes of a class-conditional backbone (labels `0..C`, and `C` for the null class).
    pub fn num_classes(&self) -> Option<usize> {
        with_config!(self, c => c.num_classes())
    }

    /// The range of guidance scales a guidance-distilled flow map was trained on (its extra input `w`).
    pub fn guidance(&self) -> Option<[f64; 2]> {
        with_config!(self, c => c.guidance())
    }

    /// The same architecture with a guidance input trained on `range` (the input's columns come last in
    /// the first layer that reads the conditioning, so [`Arch::init_from_teacher`] starts them at zero).
    pub fn with_guidance(&self, range: [f64; 2]) -> Self {
        let mut a = self.clone();
        with_config!(&mut a, c => c.set_guidance(Some(range)));
        a
    }

    /// Draws every parameter in `vars` from the run's `seed` (candle's initialisers are unseeded).
    pub fn seed_params(&self, vars: &VarMap, seed: u64) -> Result<()> {
        with_config!(self, c => c.seed_params(vars, seed))
    }

    /// Sets a flow map's parameters from a teacher's of the same architecture so that the flow map starts
    /// as one Euler step of the teacher, `F(x, t, s, c) = v(x, t, c)`.
    pub fn init_from_teacher(&self, student: &VarMap, teacher: &VarMap) -> Result<()> {
        with_config!(self, c => c.init_from_teacher(student, teacher))
    }
}

/// Every variable of a `VarMap`, sorted by name (for checkpoints, snapshots and tests).
pub fn vars_sorted(vm: &VarMap) -> Vec<(String, Var)> {
    let data = vm.data().lock().expect("vars");
    let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}
