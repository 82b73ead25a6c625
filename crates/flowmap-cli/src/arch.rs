//! The `--arch` flags and the `[arch]` table of a run configuration: which backbone a fresh network gets,
//! and its settings. Precedence: the backbone's defaults, then the `[arch]` table, then the flags.

use anyhow::{bail, Result};
use clap::Args;
use flowmap::backbone::Arch;
use flowmap::pipeline::RunConfig;

/// Backbone flags shared by `teacher`, `distill` (a fresh student) and `train`.
#[derive(Args, Clone, Debug, Default)]
pub struct ArchFlags {
    /// Backbone (default: unet for images, mlp for points).
    #[arg(long, help = format!("Backbone: {} (default: unet for images, mlp for points)", Arch::NAMES.join(", ")))]
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
    /// The architecture of a fresh network on states of `shape` with `classes` (labelled data): the named
    /// backbone's defaults (the flag, else the `[arch]` table's kind, else the library's choice for the
    /// shape), the command's own `defaults` for that backbone by name (the flow-map student's MLP embeds time
    /// with fewer, lower frequencies than a teacher's), the `[arch]` table, then the flags. The library's
    /// backbone registry decides which settings a backbone has; a flag it does not have is an error.
    pub fn build(
        &self,
        shape: &[usize],
        classes: Option<usize>,
        file: &RunConfig,
        defaults: &[(&str, toml::Table)],
    ) -> Result<Arch> {
        let classes = if self.unconditional { None } else { classes };
        let arch = file.base_arch(self.arch.as_deref(), shape, classes, defaults)?;
        let kind = arch.name();
        let settings = self.settings()?;
        let known = arch.setting_names();
        for (key, (flag, _)) in &settings {
            if !known.contains(key) {
                bail!("--{flag} does not apply to the {kind} backbone");
            }
        }
        let table: toml::Table = settings.into_iter().map(|(k, (_, v))| (k, v)).collect();
        let arch = arch.with_settings(&table, "arch flags")?;
        arch.validate()?;
        Ok(arch)
    }

    /// The settings the flags give: `(key, (flag, value))` by the key's name in the architecture.
    fn settings(&self) -> Result<std::collections::BTreeMap<String, (&'static str, toml::Value)>> {
        let mut s = std::collections::BTreeMap::new();
        let mut put = |key: &str, flag: &'static str, v: Option<toml::Value>| {
            if let Some(v) = v {
                s.insert(key.to_string(), (flag, v));
            }
        };
        let int = |v: Option<usize>| v.map(|n| toml::Value::Integer(n as i64));
        let float = |v: Option<f64>| v.map(toml::Value::Float);
        let ints = |v: Vec<usize>| toml::Value::Array(v.into_iter().map(|n| toml::Value::Integer(n as i64)).collect());
        put("hidden", "hidden", int(self.hidden));
        put("depth", "depth", int(self.depth));
        put("time_features", "time-features", int(self.time_features));
        put("max_frequency", "max-frequency", float(self.max_frequency));
        put("channels", "channels", int(self.channels));
        put("blocks", "blocks", int(self.blocks));
        put("heads", "heads", int(self.heads));
        put("groups", "groups", int(self.groups));
        put("dropout", "dropout", float(self.dropout));
        if let Some(m) = &self.channel_mult {
            put("channel_mult", "channel-mult", Some(ints(list(m, "--channel-mult")?)));
        }
        if let Some(a) = &self.attention {
            put(
                "attention_resolutions",
                "attention",
                Some(ints(list(a, "--attention")?)),
            );
        }
        Ok(s)
    }

    /// Whether any setting of a fresh network was given (a network teacher fixes the student's).
    pub fn any(&self) -> bool {
        // A flag that does not parse was given too.
        self.arch.is_some() || self.settings().map_or(true, |s| !s.is_empty())
    }
}
