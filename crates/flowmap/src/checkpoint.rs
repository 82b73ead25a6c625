//! Checkpoints: safetensors files whose metadata holds everything needed to rebuild the model — its kind,
//! architecture (a tagged [`Arch`], `{"kind": "mlp", …}`), probability path, data spec and training
//! configuration — as one JSON value under the `flowmap` key. `sample`, `apply` and `eval` need nothing else.
//!
//! Files written before the architecture was tagged (an untagged MLP config under `model`, and consistency
//! models recorded as flow maps trained by `cm`) load as they are.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};

use crate::backbone::{vars_sorted, Arch, MlpConfig};
use crate::data::GaussianMixture;
use crate::flow_map::FlowMapNet;
use crate::path::ProbabilityPath;
use crate::teacher::VelocityNet;
use crate::{Error, Result};

/// What a checkpoint holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// A velocity network `v_φ(x, t)`.
    Teacher,
    /// A flow map `f_θ(x, t, s)`.
    FlowMap,
    /// A consistency model: a flow map trained on the boundary `s = 0` only, `f_θ(x, t, 0)`.
    ConsistencyModel,
}

impl ModelKind {
    pub fn describe(self) -> &'static str {
        match self {
            ModelKind::Teacher => "a teacher (velocity field)",
            ModelKind::FlowMap => "a flow map",
            ModelKind::ConsistencyModel => "a consistency model (a flow map to s = 0 only)",
        }
    }
    /// Whether the model is a flow-map network (a consistency model is one, valid at `s = 0`).
    pub fn is_map(self) -> bool {
        matches!(self, ModelKind::FlowMap | ModelKind::ConsistencyModel)
    }
    /// Whether the model maps only to `s = 0`.
    pub fn boundary_only(self) -> bool {
        self == ModelKind::ConsistencyModel
    }
}

/// A checkpoint's metadata.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "MetaRepr")]
pub struct CheckpointMeta {
    pub kind: ModelKind,
    /// The backbone's architecture.
    pub arch: Arch,
    /// The probability path's name (`linear`).
    pub path: String,
    /// The data spec the model was trained on.
    pub data: String,
    /// The mixture itself when the data (or teacher) is a Gaussian mixture, so evaluation needs no file.
    pub mixture: Option<GaussianMixture>,
    /// The training configuration(s), as JSON.
    pub training: serde_json::Value,
    /// The flowmap version that wrote the file.
    pub version: String,
    /// How the data's values were mapped to `[−1, 1]` (images), so samples go back to the data's range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<crate::data::Scale>,
}

/// The metadata as stored, today's layout or the earlier one (`model`: an untagged MLP config).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MetaRepr {
    kind: ModelKind,
    #[serde(default)]
    arch: Option<Arch>,
    #[serde(default)]
    model: Option<MlpConfig>,
    path: String,
    data: String,
    mixture: Option<GaussianMixture>,
    training: serde_json::Value,
    version: String,
    #[serde(default)]
    scale: Option<crate::data::Scale>,
}

impl TryFrom<MetaRepr> for CheckpointMeta {
    type Error = String;
    fn try_from(m: MetaRepr) -> std::result::Result<Self, String> {
        let arch = match (m.arch, m.model) {
            (Some(a), None) => a,
            (None, Some(legacy)) => Arch::Mlp(legacy),
            (Some(_), Some(_)) => return Err("both 'arch' and the legacy 'model' are present".into()),
            (None, None) => return Err("no architecture ('arch')".into()),
        };
        // Before the kind was typed, a consistency model was a flow map whose objective was `cm`.
        let trained_by_cm = m.training.get("objective").and_then(|o| o.as_str()) == Some("cm");
        let kind = match m.kind {
            ModelKind::FlowMap if trained_by_cm => ModelKind::ConsistencyModel,
            k => k,
        };
        Ok(CheckpointMeta {
            kind,
            arch,
            path: m.path,
            data: m.data,
            mixture: m.mixture,
            training: m.training,
            version: m.version,
            scale: m.scale,
        })
    }
}

impl CheckpointMeta {
    /// The probability path the model was trained on.
    pub fn probability_path(&self) -> Result<std::sync::Arc<dyn ProbabilityPath>> {
        crate::path::by_name(&self.path).ok_or_else(|| {
            Error::arg(format!(
                "unknown probability path '{}' in checkpoint metadata",
                self.path
            ))
        })
    }
}

/// The safetensors metadata key of a flowmap checkpoint's [`CheckpointMeta`].
pub const KEY: &str = "flowmap";

/// Saves the parameters in `vars` with `meta`, atomically.
pub fn save(path: &Path, vars: &VarMap, meta: &CheckpointMeta) -> Result<()> {
    write_tensors(
        path,
        vars,
        KEY,
        &serde_json::to_string(meta).expect("metadata serialises"),
    )
}

/// Writes every variable of `vars` as f32 safetensors with one metadata entry `key: json`, atomically.
pub fn write_tensors(path: &Path, vars: &VarMap, key: &str, json: &str) -> Result<()> {
    let named: Vec<(String, Tensor)> = vars_sorted(vars)
        .into_iter()
        .map(|(name, var)| (name, var.as_tensor().clone()))
        .collect();
    write_named(path, &named, key, json)
}

/// Writes named tensors (in the order given) as f32 safetensors with one metadata entry `key: json`,
/// atomically.
pub fn write_named(path: &Path, tensors: &[(String, Tensor)], key: &str, json: &str) -> Result<()> {
    let owned: Vec<(&str, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            let flat = t.to_dtype(DType::F32)?.flatten_all()?;
            let bytes: Vec<u8> = flat.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect();
            Ok((name.as_str(), t.dims().to_vec(), bytes))
        })
        .collect::<Result<_>>()?;
    let views = owned
        .iter()
        .map(|(n, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|v| (n.to_string(), v))
                .map_err(|e| Error::checkpoint(path, e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let md = HashMap::from([(key.to_string(), json.to_string())]);
    let bytes = safetensors::serialize(views, Some(md)).map_err(|e| Error::checkpoint(path, e.to_string()))?;
    crate::io::write_atomic(path, |w| w.write_all(&bytes))
}

/// The metadata entry `key` and the f32 tensors of safetensors `bytes` (read from `path`, for errors).
pub fn read_tensors(bytes: &[u8], path: &Path, key: &str) -> Result<(String, HashMap<String, Tensor>)> {
    let (raw, tensors) = read_any_tensors(bytes, path, key)?;
    let raw = raw.ok_or_else(|| Error::checkpoint(path, format!("no {key} metadata (not written by flowmap)")))?;
    Ok((raw, tensors))
}

/// The metadata entry `key`, if the file has one, and the f32 tensors of safetensors `bytes`.
fn read_any_tensors(bytes: &[u8], path: &Path, key: &str) -> Result<(Option<String>, HashMap<String, Tensor>)> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| Error::checkpoint(path, format!("not a safetensors file ({e})")))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::checkpoint(path, format!("not a safetensors file ({e})")))?;
    let raw = header.metadata().as_ref().and_then(|m| m.get(key)).cloned();
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(Error::checkpoint(
                path,
                format!("tensor '{name}' is {:?}, expected F32", view.dtype()),
            ));
        }
        let data: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        tensors.insert(name, Tensor::from_vec(data, view.shape(), &Device::Cpu)?);
    }
    Ok((raw, tensors))
}

/// A loaded checkpoint.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub path: PathBuf,
    pub meta: CheckpointMeta,
    pub tensors: HashMap<String, Tensor>,
}

/// What a safetensors file that flowmap did not write lacks: its metadata, given by the caller (a PyTorch
/// `state_dict` saved with `safetensors.torch.save_file`, its architecture from a TOML `[arch]` table).
#[derive(Clone, Debug)]
pub struct Foreign {
    pub kind: ModelKind,
    pub arch: Arch,
    /// The data spec the model was trained on (for `x_t` and the metrics).
    pub data: String,
    pub scale: Option<crate::data::Scale>,
}

impl Checkpoint {
    /// Whether `path` is a safetensors file with flowmap's metadata entry (`false` for a plain state dict).
    /// Reads the header alone: an 8-byte length, then that much JSON.
    pub fn has_metadata(path: &Path) -> Result<bool> {
        use std::io::Read;
        let bad = |why: String| Error::checkpoint(path, format!("not a safetensors file ({why})"));
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let mut len = [0u8; 8];
        file.read_exact(&mut len).map_err(|e| bad(e.to_string()))?;
        let len = u64::from_le_bytes(len);
        // safetensors' own bound on a header.
        if len > 100_000_000 {
            return Err(bad(format!("a header of {len} bytes")));
        }
        let mut header = vec![0u8; len as usize];
        file.read_exact(&mut header).map_err(|e| bad(e.to_string()))?;
        let header: serde_json::Value = serde_json::from_slice(&header).map_err(|e| bad(e.to_string()))?;
        Ok(header.get("__metadata__").and_then(|m| m.get(KEY)).is_some())
    }

    /// A checkpoint from a safetensors file of f32 tensors named as flowmap names them, with the metadata
    /// `foreign` supplies (any metadata in the file is ignored). Building its network checks the tensors
    /// against the architecture, name by name and shape by shape.
    pub fn load_foreign(path: &Path, foreign: Foreign) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let (_, tensors) = read_any_tensors(&bytes, path, KEY)?;
        Ok(Checkpoint {
            path: path.to_path_buf(),
            meta: CheckpointMeta {
                kind: foreign.kind,
                arch: foreign.arch,
                path: "linear".into(),
                data: foreign.data,
                mixture: None,
                training: serde_json::json!({ "imported_from": path.display().to_string() }),
                version: env!("CARGO_PKG_VERSION").into(),
                scale: foreign.scale,
            },
            tensors,
        })
    }

    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let (raw, tensors) = read_tensors(&bytes, path, KEY)?;
        let meta: CheckpointMeta =
            serde_json::from_str(&raw).map_err(|e| Error::checkpoint(path, format!("bad flowmap metadata: {e}")))?;
        Ok(Checkpoint {
            path: path.to_path_buf(),
            meta,
            tensors,
        })
    }

    /// Errors unless the checkpoint holds `kind`.
    pub fn expect_kind(&self, kind: ModelKind) -> Result<()> {
        let ok = self.meta.kind == kind || (kind == ModelKind::FlowMap && self.meta.kind.is_map());
        if !ok {
            return Err(Error::checkpoint(
                &self.path,
                format!(
                    "holds {}, but {} is needed here",
                    self.meta.kind.describe(),
                    kind.describe()
                ),
            ));
        }
        Ok(())
    }

    /// The parameters as trainable variables.
    pub fn varmap(&self, device: &Device) -> Result<VarMap> {
        let vm = VarMap::new();
        {
            let mut data = vm.data().lock().expect("vars");
            for (name, t) in &self.tensors {
                data.insert(name.clone(), Var::from_tensor(&t.to_device(device)?)?);
            }
        }
        Ok(vm)
    }

    /// The parameters as variables and a builder over them. The file's tensors are first matched against
    /// the recorded architecture (names and shapes) without creating anything, so metadata that claims a
    /// larger network than the file holds is an error, not an allocation.
    fn builder(
        &self,
        device: &Device,
        build: impl Fn(VarBuilder<'static>) -> Result<()>,
    ) -> Result<(VarMap, VarBuilder<'static>)> {
        let probe = VarBuilder::from_tensors(self.tensors.clone(), DType::F32, &Device::Cpu);
        build(probe).map_err(|e| Error::checkpoint(&self.path, format!("does not match its architecture: {e}")))?;
        let vm = self.varmap(device)?;
        let vb = VarBuilder::from_varmap(&vm, DType::F32, device);
        Ok((vm, vb))
    }

    fn check_all_used(&self, vm: &VarMap) -> Result<()> {
        let n = vm.all_vars().len();
        if n != self.tensors.len() {
            return Err(Error::checkpoint(
                &self.path,
                "tensors do not match the recorded architecture",
            ));
        }
        Ok(())
    }

    /// Rebuilds the teacher network (with its parameters as variables).
    pub fn velocity_net(&self, device: &Device) -> Result<(VelocityNet, VarMap)> {
        self.expect_kind(ModelKind::Teacher)?;
        let (vm, vb) = self.builder(device, |vb| VelocityNet::new(&self.meta.arch, vb).map(|_| ()))?;
        let net = VelocityNet::new(&self.meta.arch, vb)
            .map_err(|e| Error::checkpoint(&self.path, format!("does not match its architecture: {e}")))?;
        self.check_all_used(&vm)?;
        Ok((net, vm))
    }

    /// Rebuilds the flow-map network.
    pub fn flow_map_net(&self, device: &Device) -> Result<(FlowMapNet, VarMap)> {
        self.expect_kind(ModelKind::FlowMap)?;
        let (vm, vb) = self.builder(device, |vb| FlowMapNet::new(&self.meta.arch, vb).map(|_| ()))?;
        let net = FlowMapNet::new(&self.meta.arch, vb)
            .map_err(|e| Error::checkpoint(&self.path, format!("does not match its architecture: {e}")))?;
        self.check_all_used(&vm)?;
        Ok((net, vm))
    }
}
