//! Run configurations: TOML files with `[train]` and `[distill]` tables.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::objective::{DistillConfig, Method};
use crate::train::TrainConfig;
use crate::{Error, Result};

/// A TOML run configuration: optional `[train]` and `[distill]` tables (see [`TrainConfig`] and
/// [`DistillConfig`] for the keys). Both may be partial: keys a table leaves out keep their defaults, which
/// for `[distill]` are the method's own ([`RunConfig::distill_config`]).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// The `[train]` table as written; [`RunConfig::train_config_over`] lays it over a run's defaults.
    #[serde(default)]
    pub train: Option<toml::Table>,
    /// The `[distill]` table as written; [`RunConfig::distill_config`] lays it over a method's defaults.
    #[serde(default)]
    pub distill: Option<toml::Table>,
    /// The `[arch]` table as written: `kind = "mlp" | "unet"` and the backbone's settings
    /// ([`crate::backbone::MlpConfig`], [`crate::backbone::UnetConfig`]), laid over its defaults.
    #[serde(default)]
    pub arch: Option<toml::Table>,
}

impl RunConfig {
    pub fn from_toml(text: &str) -> Result<Self> {
        let cfg: Self = toml::from_str(text).map_err(|e| Error::Config(e.message().to_string()))?;
        cfg.checked()
    }

    /// The same configuration as a JSON object (`{"train": {…}, "distill": {…}, "arch": {…}}`), as the
    /// Python package passes it.
    pub fn from_json(text: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        cfg.checked()
    }

    /// Catches a misspelt or ill-typed `[train]` or `[distill]` key now, whichever method it is used with.
    fn checked(self) -> Result<Self> {
        self.train_config()?;
        self.distill_config(Method::Emd)?;
        Ok(self)
    }
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// The backbone the `[arch]` table names with its `kind`, if it names one.
    pub fn arch_kind(&self) -> Result<Option<String>> {
        match self.arch.as_ref().and_then(|t| t.get("kind")) {
            None => Ok(None),
            Some(toml::Value::String(k)) => Ok(Some(k.clone())),
            Some(other) => Err(Error::Config(format!("[arch]: kind must be a string, got {other}"))),
        }
    }

    /// `base` with the `[arch]` table's keys laid over it (a `kind` that differs from `base`'s is an error).
    pub fn arch_over(&self, base: crate::backbone::Arch) -> Result<crate::backbone::Arch> {
        let Some(table) = &self.arch else {
            return Ok(base);
        };
        if let Some(k) = self.arch_kind()? {
            if k != base.name() {
                return Err(Error::Config(format!(
                    "[arch]: kind '{k}', but the run builds a {}",
                    base.name()
                )));
            }
        }
        base.with_settings(table, "[arch]")
    }

    /// The backbone a run starts from, before settings of its own: the `kind` given, else the `[arch]`
    /// table's, else the data's default ([`crate::backbone::Arch::default_kind`]), built for `shape` and
    /// `classes`, with the job's `defaults` for that kind and then the `[arch]` table laid over it.
    pub fn base_arch(
        &self,
        kind: Option<&str>,
        shape: &[usize],
        classes: Option<usize>,
        defaults: &[(&str, toml::Table)],
    ) -> Result<crate::backbone::Arch> {
        use crate::backbone::Arch;
        let kind = match (kind, self.arch_kind()?) {
            (Some(k), _) => k.to_string(),
            (None, Some(k)) => k,
            (None, None) => Arch::default_kind(shape).to_string(),
        };
        let mut base = Arch::for_data(&kind, shape, classes)?;
        if let Some((_, table)) = defaults.iter().find(|(k, _)| *k == kind) {
            base = base.with_settings(table, "defaults")?;
        }
        self.arch_over(base)
    }

    /// [`TrainConfig::default`] with the `[train]` table laid over it.
    pub fn train_config(&self) -> Result<TrainConfig> {
        self.train_config_over(TrainConfig::default())
    }

    /// The `[train]` table laid over `base` (the defaults of a run, such as a recommended recipe's): keys
    /// the table leaves out keep `base`'s values.
    pub fn train_config_over(&self, base: TrainConfig) -> Result<TrainConfig> {
        over(base, self.train.as_ref(), "[train]")
    }

    /// `method`'s defaults ([`DistillConfig::for_method`]) with the `[distill]` table laid over them: a
    /// sub-table such as `[distill.continuous]` changes only the keys it names, while a table with a `kind`
    /// (`weighting = { kind = "adaptive", c = 1e-3, p = 0.5 }`) replaces the setting whole.
    pub fn distill_config(&self, method: Method) -> Result<DistillConfig> {
        self.distill_config_over(DistillConfig::for_method(method))
    }

    /// The `[distill]` table laid over `base` (a method's defaults for its data,
    /// [`DistillConfig::for_data`]), as [`RunConfig::distill_config`] does.
    pub fn distill_config_over(&self, base: DistillConfig) -> Result<DistillConfig> {
        over(base, self.distill.as_ref(), "[distill]")
    }
}

/// `base` with `table` (the table `name` of a file) laid over it ([`overlay`]).
fn over<T: Serialize + serde::de::DeserializeOwned>(base: T, table: Option<&toml::Table>, name: &str) -> Result<T> {
    let Some(table) = table else {
        return Ok(base);
    };
    let mut merged = toml::Value::try_from(base).map_err(|e| Error::Config(e.to_string()))?;
    overlay(&mut merged, table);
    merged
        .try_into()
        .map_err(|e: toml::de::Error| Error::Config(format!("{name}: {}", e.message())))
}

/// Lays `over` onto `base` key by key, recursing into sub-tables; a table with a `kind` key (a tagged
/// choice such as the weighting) replaces its counterpart instead of merging with it.
fn overlay(base: &mut toml::Value, over: &toml::Table) {
    match base {
        toml::Value::Table(b) if !over.contains_key("kind") => {
            for (k, v) in over {
                match (b.get_mut(k), v) {
                    (Some(slot @ toml::Value::Table(_)), toml::Value::Table(t)) => overlay(slot, t),
                    _ => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        _ => *base = toml::Value::Table(over.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objective::{EpsSchedule, Weighting};

    #[test]
    fn partial_config_tables_keep_the_methods_defaults() {
        let cfg = RunConfig::from_toml(
            "[train]\nsteps = 7\n[distill]\neps = { kind = \"fixed\", eps = 0.1 }\n[distill.continuous]\ncm_intervals = 128\n",
        )
        .unwrap();
        assert_eq!(cfg.train_config().unwrap().steps, 7);
        assert_eq!(cfg.train_config().unwrap().lr, TrainConfig::default().lr);
        // Over another base (a recipe's), the keys the table leaves out keep that base's values.
        let base = TrainConfig {
            batch_size: 64,
            lr: 5e-4,
            ..TrainConfig::default()
        };
        let over = cfg.train_config_over(base.clone()).unwrap();
        assert_eq!(over, TrainConfig { steps: 7, ..base });
        assert!(RunConfig::from_toml("[train]\nbatch = 3\n")
            .unwrap_err()
            .to_string()
            .contains("unknown field `batch`"));
        // MeanFlow's own default weighting survives a table that does not mention it.
        let mf = cfg.distill_config(Method::Meanflow).unwrap();
        let mut want = DistillConfig::for_method(Method::Meanflow);
        want.eps = EpsSchedule::Fixed { eps: 0.1 };
        want.continuous.cm_intervals = 128;
        assert_eq!(mf, want);
        assert_eq!(
            RunConfig::default().distill_config(Method::Cm).unwrap(),
            DistillConfig::for_method(Method::Cm)
        );
        // A tagged choice is replaced whole, not merged with the default's fields.
        let cfg = RunConfig::from_toml("[distill]\nweighting = { kind = \"adaptive\", c = 0.01, p = 0.5 }\n").unwrap();
        let w = cfg.distill_config(Method::Meanflow).unwrap().weighting;
        assert_eq!(w, Weighting::Adaptive { c: 0.01, p: 0.5 });
        let cfg = RunConfig::from_toml("[distill]\nweighting = { kind = \"constant\" }\n").unwrap();
        assert_eq!(cfg.distill_config(Method::Emd).unwrap().weighting, Weighting::Constant);
    }

    #[test]
    fn arch_tables_lay_over_the_backbones_defaults() {
        use crate::backbone::{Arch, UnetConfig};
        let base = Arch::Unet(UnetConfig::new(&[1, 28, 28]));
        let cfg = RunConfig::from_toml("[arch]\nkind = \"unet\"\nchannels = 64\nchannel_mult = [1, 2]\n").unwrap();
        assert_eq!(cfg.arch_kind().unwrap().as_deref(), Some("unet"));
        let Arch::Unet(u) = cfg.arch_over(base.clone()).unwrap() else {
            panic!("a U-Net")
        };
        assert_eq!((u.channels, u.channel_mult.clone(), u.blocks), (64, vec![1, 2], 1));
        let typo = RunConfig::from_toml("[arch]\nchanels = 64\n").unwrap();
        assert!(typo
            .arch_over(base.clone())
            .unwrap_err()
            .to_string()
            .contains("chanels"));
        let other = RunConfig::from_toml("[arch]\nkind = \"mlp\"\n").unwrap();
        assert!(other.arch_over(base).unwrap_err().to_string().contains("kind 'mlp'"));
    }

    #[test]
    fn misspelt_or_ill_typed_config_keys_are_errors() {
        for (text, needle) in [
            ("[distill.continuous]\ncm_interval = 128\n", "cm_interval"),
            ("[distill]\ntimes = { diagonal_fractio = 0.5 }\n", "diagonal_fractio"),
            ("[distill.continuous]\ncm_intervals = \"many\"\n", "invalid type"),
            ("[train]\nstep = 7\n", "step"),
            ("[trian]\nsteps = 7\n", "trian"),
        ] {
            let err = RunConfig::from_toml(text).unwrap_err().to_string();
            assert!(err.contains(needle), "'{err}' does not name '{needle}'");
        }
    }
}

/// The backbone defaults of a fresh flow-map student, by backbone: an MLP student embeds time with 8
/// frequencies up to 4 (a teacher's MLP: 16 up to 64).
pub fn student_defaults() -> Vec<(&'static str, toml::Table)> {
    let mlp = toml::toml! {
        time_features = 8
        max_frequency = 4.0
    };
    vec![("mlp", mlp)]
}
