//! The `--arch` flags and the `[arch]` table of a run configuration: which backbone a fresh network gets,
//! and its settings. Precedence: the backbone's defaults, then the `[arch]` table, then the flags.

use anyhow::{bail, Result};
use clap::Args;
use flowmap::backbone::{Arch, MlpConfig, UnetConfig};
use flowmap::pipeline::RunConfig;

/// Backbone flags shared by `teacher`, `distill` (a fresh student) and `train`.
#[derive(Args, Clone, Debug, Default)]
pub struct ArchFlags {
    /// Backbone: mlp or unet (default: unet for images, mlp for points).
    #[arg(long)]
    pub arch: Option<String>,
    /// Train an unconditional model on labelled data (default: class-conditional when the data has labels).
    #[arg(long)]
    pub unconditional: bool,
    /// MLP: hidden width.
    #[arg(long)]
    pub hidden: Option<usize>,
    /// MLP: hidden layers.
    #[arg(long)]
    pub depth: Option<usize>,
    /// Frequencies of each sinusoidal time embedding.
    #[arg(long)]
    pub time_features: Option<usize>,
    /// Largest time-embedding frequency.
    #[arg(long)]
    pub max_frequency: Option<f64>,
    /// U-Net: channels at the first level.
    #[arg(long)]
    pub channels: Option<usize>,
    /// U-Net: per-level channel multipliers, e.g. 1,2,2 (level i runs at H / 2^i).
    #[arg(long)]
    pub channel_mult: Option<String>,
    /// U-Net: residual blocks per level.
    #[arg(long)]
    pub blocks: Option<usize>,
    /// U-Net: resolutions with self-attention, e.g. 7 or 14,7, or none.
    #[arg(long)]
    pub attention: Option<String>,
    /// U-Net: attention heads.
    #[arg(long)]
    pub heads: Option<usize>,
    /// U-Net: GroupNorm groups.
    #[arg(long)]
    pub groups: Option<usize>,
    /// U-Net: dropout probability in the residual blocks (training only).
    #[arg(long)]
    pub dropout: Option<f64>,
}

fn list(s: &str, flag: &str) -> Result<Vec<usize>> {
    if s.trim() == "none" {
        return Ok(Vec::new());
    }
    s.split(',')
        .map(|x| match x.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => bail!("{flag}: '{}' is not a positive integer", x.trim()),
        })
        .collect()
}

impl ArchFlags {
    /// The architecture of a fresh network on states of `shape` with `classes` (labelled data), starting
    /// from `mlp` for an MLP (commands differ in their MLP defaults).
    pub fn build(&self, shape: &[usize], classes: Option<usize>, file: &RunConfig, mlp: MlpConfig) -> Result<Arch> {
        let image = shape.len() == 3;
        let kind = match (&self.arch, file.arch_kind()?) {
            (Some(k), _) => k.clone(),
            (None, Some(k)) => k,
            (None, None) => (if image { "unet" } else { "mlp" }).to_string(),
        };
        let classes = if self.unconditional { None } else { classes };
        let base = match kind.as_str() {
            "mlp" => Arch::Mlp(MlpConfig {
                num_classes: classes,
                ..mlp
            }),
            "unet" => Arch::Unet(UnetConfig {
                num_classes: classes,
                ..UnetConfig::new(shape)
            }),
            other => bail!("unknown architecture '{other}' (expected mlp or unet)"),
        };
        let mut arch = file.arch_over(base)?;
        match &mut arch {
            Arch::Mlp(c) => {
                self.refuse(
                    &[
                        "channels",
                        "channel-mult",
                        "blocks",
                        "attention",
                        "heads",
                        "groups",
                        "dropout",
                    ],
                    "mlp",
                )?;
                set(&mut c.hidden, self.hidden);
                set(&mut c.depth, self.depth);
                set(&mut c.time_features, self.time_features);
                set(&mut c.max_frequency, self.max_frequency);
            }
            Arch::Unet(c) => {
                self.refuse(&["hidden", "depth"], "unet")?;
                set(&mut c.channels, self.channels);
                set(&mut c.blocks, self.blocks);
                set(&mut c.heads, self.heads);
                set(&mut c.groups, self.groups);
                set(&mut c.dropout, self.dropout);
                set(&mut c.time_features, self.time_features);
                set(&mut c.max_frequency, self.max_frequency);
                if let Some(m) = &self.channel_mult {
                    c.channel_mult = list(m, "--channel-mult")?;
                }
                if let Some(a) = &self.attention {
                    c.attention_resolutions = list(a, "--attention")?;
                }
                c.validate()?;
            }
        }
        Ok(arch)
    }

    /// Errors when a flag of another backbone is given.
    fn refuse(&self, flags: &[&str], kind: &str) -> Result<()> {
        for &f in flags {
            let given = match f {
                "hidden" => self.hidden.is_some(),
                "depth" => self.depth.is_some(),
                "channels" => self.channels.is_some(),
                "channel-mult" => self.channel_mult.is_some(),
                "blocks" => self.blocks.is_some(),
                "attention" => self.attention.is_some(),
                "heads" => self.heads.is_some(),
                "groups" => self.groups.is_some(),
                "dropout" => self.dropout.is_some(),
                _ => false,
            };
            if given {
                bail!("--{f} does not apply to the {kind} backbone");
            }
        }
        Ok(())
    }

    /// Whether any setting of a fresh network was given (a network teacher fixes the student's).
    pub fn any(&self) -> bool {
        self.arch.is_some()
            || self.hidden.is_some()
            || self.depth.is_some()
            || self.time_features.is_some()
            || self.max_frequency.is_some()
            || self.channels.is_some()
            || self.channel_mult.is_some()
            || self.blocks.is_some()
            || self.attention.is_some()
            || self.heads.is_some()
            || self.groups.is_some()
            || self.dropout.is_some()
    }
}

fn set<T>(slot: &mut T, v: Option<T>) {
    if let Some(v) = v {
        *slot = v;
    }
}
