//! Loading any model file: what a path or spec holds is decided here, once, for every caller.

use std::path::{Path, PathBuf};

use candle_core::Device;

use super::{Teacher, TrainedMap, TrainedTeacher};
use crate::checkpoint::{self, Checkpoint, CheckpointMeta, Foreign, ModelKind};
use crate::data::Scale;
use crate::flow_map::{FlowMap, FlowMapNet};
use crate::teacher::VelocityField;
use crate::Result;

/// A model from a file: a flow map (with the checkpoint it came from, whose metadata says how to sample it),
/// or a teacher (a network, or the analytic Gaussian-mixture velocity of `gmm:SPEC.json`).
pub enum Model {
    Map(FlowMapNet, Checkpoint),
    Teacher(Teacher),
}

impl Model {
    /// The model `spec` names: `gmm:SPEC.json`, or a flowmap checkpoint of a teacher, a flow map or a
    /// consistency model.
    pub fn load(spec: &str, device: &Device) -> Result<Model> {
        if spec.starts_with("gmm:") {
            return Ok(Model::Teacher(Teacher::load(spec, device)?));
        }
        let ck = Checkpoint::load(Path::new(spec))?;
        Ok(match ck.meta.kind {
            ModelKind::FlowMap | ModelKind::ConsistencyModel => {
                let (net, _) = ck.flow_map_net(device)?;
                Model::Map(net, ck)
            }
            ModelKind::Teacher => Model::Teacher(Teacher::from_checkpoint(ck, device)?),
        })
    }

    /// Writes the model as a flowmap checkpoint (the analytic teacher has no weights to write: an error).
    pub fn save(&self, path: &Path) -> Result<()> {
        match self {
            Model::Map(_, ck) => {
                let mut named: Vec<(String, candle_core::Tensor)> =
                    ck.tensors.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                named.sort_by(|a, b| a.0.cmp(&b.0));
                let json = serde_json::to_string(&ck.meta).expect("metadata serialises");
                checkpoint::write_named(path, &named, checkpoint::KEY, &json)
            }
            Model::Teacher(Teacher::Net { vars, meta, .. }) => checkpoint::save(path, vars, meta),
            Model::Teacher(Teacher::Gmm(_)) => Err(crate::Error::arg(
                "the analytic Gaussian-mixture teacher is its SPEC.json; it has no weights to save",
            )),
        }
    }

    /// The checkpoint metadata: kind, architecture, path, data and the training record (none for the
    /// analytic teacher).
    pub fn meta(&self) -> Option<&CheckpointMeta> {
        match self {
            Model::Map(_, ck) => Some(&ck.meta),
            Model::Teacher(Teacher::Net { meta, .. }) => Some(meta),
            Model::Teacher(Teacher::Gmm(_)) => None,
        }
    }

    /// The shape of one state.
    pub fn state_shape(&self) -> Vec<usize> {
        match self {
            Model::Map(net, _) => FlowMap::state_shape(net),
            Model::Teacher(t) => t.state_shape(),
        }
    }

    /// The classes of a class-conditional model.
    pub fn num_classes(&self) -> Option<usize> {
        match self {
            Model::Map(net, _) => net.arch().num_classes(),
            Model::Teacher(t) => t.num_classes(),
        }
    }

    /// How the data's values map to `[−1, 1]`, when the model was trained on images.
    pub fn scale(&self) -> Option<Scale> {
        match self {
            Model::Map(_, ck) => ck.meta.scale,
            Model::Teacher(Teacher::Net { meta, .. }) => meta.scale,
            Model::Teacher(_) => None,
        }
    }
}

impl Teacher {
    /// The teacher `spec` names, as [`Teacher::load`], and also a plain safetensors state dict with no
    /// flowmap metadata (a PyTorch model's, say): `describe` then says what the file's metadata does not,
    /// its architecture and data, or returns the error that asks for them.
    pub fn open(spec: &str, device: &Device, describe: impl FnOnce() -> Result<Foreign>) -> Result<Teacher> {
        let path = Path::new(spec);
        if spec.starts_with("gmm:") || !path.is_file() || Checkpoint::has_metadata(path)? {
            return Teacher::load(spec, device);
        }
        Teacher::from_checkpoint(Checkpoint::load_foreign(path, describe()?)?, device)
    }
}

impl From<TrainedTeacher> for Model {
    fn from(t: TrainedTeacher) -> Self {
        Model::Teacher(t.into_teacher())
    }
}

impl From<TrainedMap> for Model {
    /// The trained EMA map, held as the checkpoint it would be saved as.
    fn from(m: TrainedMap) -> Self {
        let tensors = m
            .vars
            .data()
            .lock()
            .expect("variables lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        let ck = Checkpoint {
            path: PathBuf::new(),
            meta: m.meta,
            tensors,
        };
        Model::Map(m.net, ck)
    }
}
