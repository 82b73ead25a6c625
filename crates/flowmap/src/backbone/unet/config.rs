//! The U-Net's configuration: its settings with their defaults and checks, its entry in the backbone
//! registry, and how its parameters are first drawn.

use candle_core::Tensor;
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use super::Unet;
use crate::backbone::{vars_sorted, Role};
use crate::{Error, Result};

/// Architecture of the U-Net.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnetConfig {
    /// The shape of one state, `[C, H, W]`.
    pub state_shape: Vec<usize>,
    /// Channels at the first level.
    #[serde(default = "defaults::channels")]
    pub channels: usize,
    /// Per-level channel multipliers; level `i` runs at resolution `H / 2^i`.
    #[serde(default = "defaults::channel_mult")]
    pub channel_mult: Vec<usize>,
    /// Residual blocks per level on the way down (`blocks + 1` on the way up).
    #[serde(default = "defaults::blocks")]
    pub blocks: usize,
    /// Resolutions (`H` of a level) with self-attention after each residual block; the middle block always
    /// has it.
    #[serde(default = "defaults::attention_resolutions")]
    pub attention_resolutions: Vec<usize>,
    /// Attention heads (the channels of an attention layer must divide by it).
    #[serde(default = "defaults::heads")]
    pub heads: usize,
    /// GroupNorm groups (every channel count must divide by it).
    #[serde(default = "defaults::groups")]
    pub groups: usize,
    /// Dropout probability inside residual blocks, active in training only.
    #[serde(default)]
    pub dropout: f64,
    /// Frequencies of each time embedding (a sine and a cosine each).
    #[serde(default = "defaults::time_features")]
    pub time_features: usize,
    /// Largest time-embedding frequency.
    #[serde(default = "defaults::max_frequency")]
    pub max_frequency: f64,
    /// Classes of a class-conditional network: a learned `(C + 1) × E` embedding, row `C` the null class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_classes: Option<usize>,
    /// A guidance-distilled flow map's range of classifier-free guidance scales `[lo, hi]`: the embedding
    /// network then also reads a per-row scale `w`, embedded like the times, as its last columns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance: Option<[f64; 2]>,
}

mod defaults {
    pub fn channels() -> usize {
        32
    }
    pub fn channel_mult() -> Vec<usize> {
        vec![1, 2, 2]
    }
    pub fn blocks() -> usize {
        1
    }
    pub fn attention_resolutions() -> Vec<usize> {
        vec![7]
    }
    pub fn heads() -> usize {
        1
    }
    pub fn groups() -> usize {
        8
    }
    pub fn time_features() -> usize {
        32
    }
    pub fn max_frequency() -> f64 {
        200.0
    }
}

impl UnetConfig {
    /// The default U-Net at `channels` first-level channels for MNIST's class-conditional `1 × 28 × 28`
    /// digits (ten classes): the demo's teacher at 16 channels, the benchmarks' larger net at 32.
    pub fn mnist(channels: usize) -> Self {
        UnetConfig {
            channels,
            num_classes: Some(10),
            ..UnetConfig::new(&[1, 28, 28])
        }
    }

    /// The default (small) U-Net on states of shape `[C, H, W]`: 32 channels, multipliers 1, 2, 2, one block
    /// per level, attention at the lowest resolution of a 28 × 28 image.
    pub fn new(state_shape: &[usize]) -> Self {
        UnetConfig {
            state_shape: state_shape.to_vec(),
            channels: defaults::channels(),
            channel_mult: defaults::channel_mult(),
            blocks: defaults::blocks(),
            attention_resolutions: defaults::attention_resolutions(),
            heads: defaults::heads(),
            groups: defaults::groups(),
            dropout: 0.0,
            time_features: defaults::time_features(),
            max_frequency: defaults::max_frequency(),
            num_classes: None,
            guidance: None,
        }
    }

    /// The width `E` of the embedding of `(t, t − s, c)`.
    pub fn embedding_width(&self) -> usize {
        4 * self.channels
    }

    /// Checks that the settings describe a network that can be built.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::arg(format!("U-Net: {m}")));
        let [c, h, w] = self.state_shape[..] else {
            return bad(format!(
                "states must be C × H × W images, got shape {:?}",
                self.state_shape
            ));
        };
        if c == 0 || self.channels == 0 || self.channel_mult.is_empty() || self.channel_mult.contains(&0) {
            return bad("channels, the channel multipliers and the image's channels must be positive".into());
        }
        let down = 1usize << (self.channel_mult.len() - 1);
        if h % down != 0 || w % down != 0 {
            return bad(format!(
                "{h} × {w} images do not divide by 2^{} for {} levels (e.g. 28 → 14 → 7 takes 3)",
                self.channel_mult.len() - 1,
                self.channel_mult.len()
            ));
        }
        if self.groups == 0 || self.channel_mult.iter().any(|m| (m * self.channels) % self.groups != 0) {
            return bad(format!(
                "every level's channels must divide into {} groups",
                self.groups
            ));
        }
        let lowest = h >> (self.channel_mult.len() - 1);
        for &r in &self.attention_resolutions {
            if !(0..self.channel_mult.len()).any(|i| h >> i == r) {
                return bad(format!(
                    "attention resolution {r} is not one of the levels' (lowest {lowest})"
                ));
            }
        }
        if self.heads == 0 || self.channel_mult.iter().any(|m| (m * self.channels) % self.heads != 0) {
            return bad(format!("every level's channels must divide into {} heads", self.heads));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout {} is not in [0, 1)", self.dropout));
        }
        if let Some(r) = self.guidance {
            // Classifier-free guidance needs classes; autoguidance does not.
            crate::backbone::check_guidance_range(r)?;
        }
        if self.num_classes == Some(0) {
            return bad("a class-conditional network needs at least one class".into());
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------------------
// One traversal for both passes.

/// Names of the zero-initialised tensors: each residual branch's last convolution, each attention's output
/// projection and the output convolution (ADM's `zero_module`).
fn zero_initialised(name: &str) -> bool {
    name.contains("conv2.") || name.contains("attn.proj.") || name.starts_with("out.conv.")
}

/// Draws every parameter from the run's `seed`: weights and biases uniform on `±1/√fan_in` (PyTorch's
/// default for convolutions and linear layers; `fan_in = I·k·k`), GroupNorm scales one and shifts zero,
/// the class embedding standard normal, and the zero-initialised layers zero.
pub fn seed_params(vars: &VarMap, seed: u64) -> Result<()> {
    let mut rng = crate::Rng::derive(seed, "init");
    let all = vars_sorted(vars);
    let fan_in_of = |prefix: &str| -> Option<usize> {
        all.iter()
            .find(|(n, _)| n == &format!("{prefix}weight"))
            .map(|(_, w)| w.dims()[1..].iter().product())
    };
    for (name, var) in &all {
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let is_norm = name.contains("norm");
        let values: Vec<f64> = if zero_initialised(name) || (is_norm && name.ends_with("bias")) {
            vec![0.0; n]
        } else if is_norm {
            vec![1.0; n]
        } else if name.starts_with("class_embedding") {
            (0..n).map(|_| rng.normal()).collect()
        } else {
            let prefix = name.trim_end_matches("weight").trim_end_matches("bias");
            let fan_in = fan_in_of(prefix).unwrap_or(n);
            let bound = 1.0 / (fan_in as f64).sqrt();
            (0..n).map(|_| (2.0 * rng.uniform() - 1.0) * bound).collect()
        };
        var.set(&Tensor::from_vec(values, dims, var.device())?.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

impl crate::backbone::BackboneConfig for UnetConfig {
    const NAME: &'static str = "unet";

    fn for_data(shape: &[usize], classes: Option<usize>) -> Self {
        UnetConfig {
            num_classes: classes,
            ..UnetConfig::new(shape)
        }
    }

    fn validate(&self) -> Result<()> {
        UnetConfig::validate(self)
    }

    fn build(&self, role: Role, vb: VarBuilder) -> Result<std::sync::Arc<dyn crate::backbone::Backbone>> {
        Ok(std::sync::Arc::new(Unet::new(self, role, vb)?))
    }

    fn state_shape(&self) -> Vec<usize> {
        self.state_shape.clone()
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

    /// Each residual block keeps about six maps (norm, activation, convolution, twice), down and up paths
    /// each, plus attention's score matrix where there is attention.
    fn activations_per_sample(&self) -> usize {
        let (h, w) = (self.state_shape[1], self.state_shape[2]);
        let mut total = 0;
        for (level, &mult) in self.channel_mult.iter().enumerate() {
            let side = (h >> level) * (w >> level);
            total += self.channels * mult * side * 6 * (2 * self.blocks + 1);
            if self.attention_resolutions.contains(&(h >> level)) {
                total += self.heads * side * side * 2;
            }
        }
        total
    }

    fn seed_params(&self, vars: &VarMap, seed: u64) -> Result<()> {
        seed_params(vars, seed)
    }
}
