//! A small CNN image classifier, the feature network of the image metrics ([`crate::image_metrics`]).
//!
//! ```text
//! x (C × H × W) → [Conv3×3 → SiLU → 2×2 mean pool] per level → flatten → Dense → SiLU = features → Dense = logits
//! ```
//!
//! Trained by cross-entropy (log-softmax from primitive ops) on a labelled image set's training split; its
//! penultimate activations are the features in which the Fréchet distance, precision and recall are
//! measured, and its argmax is the class of a generated image. The project ships one trained on the
//! embedded MNIST digits ([`Classifier::embedded_mnist`]; `flowmap classifier --data mnist` reproduces it).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use crate::data::{DataSource, Scale};
use crate::kernels::{self, Activation};
use crate::layers::Conv2d;
use crate::layers::Dense;
use crate::train::Progress;
use crate::{Error, Result, Rng};

/// The classifier's architecture.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifierConfig {
    /// `[C, H, W]`.
    pub state_shape: Vec<usize>,
    pub num_classes: usize,
    /// Channels of each convolution level (each followed by 2 × 2 pooling).
    pub channels: Vec<usize>,
    /// Width of the feature layer.
    pub features: usize,
}

impl ClassifierConfig {
    pub fn new(state_shape: &[usize], num_classes: usize) -> Self {
        ClassifierConfig {
            state_shape: state_shape.to_vec(),
            num_classes,
            channels: vec![16, 32],
            features: 128,
        }
    }
}

/// Settings of [`train`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassifierTraining {
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub seed: u64,
}

impl Default for ClassifierTraining {
    fn default() -> Self {
        ClassifierTraining {
            steps: 1000,
            batch_size: 128,
            lr: 2e-3,
            seed: 0,
        }
    }
}

/// What a classifier file records besides its weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassifierMeta {
    pub config: ClassifierConfig,
    /// The data spec it was trained on.
    pub data: String,
    /// The value range of that data (images are classified in `[−1, 1]`).
    pub scale: Option<Scale>,
    pub training: ClassifierTraining,
    /// Accuracy on the data's held-out split.
    pub heldout_accuracy: f64,
    pub version: String,
}

/// The trained classifier.
#[derive(Debug)]
pub struct Classifier {
    convs: Vec<Conv2d>,
    features: Dense,
    head: Dense,
    pub meta: ClassifierMeta,
}

const KEY: &str = "flowmap_classifier";

/// The classifier trained on the embedded MNIST digits, shipped with the project.
#[cfg(feature = "mnist-assets")]
const EMBEDDED_MNIST: &[u8] = include_bytes!("../assets/mnist-classifier.safetensors");

impl Classifier {
    fn build(meta: ClassifierMeta, vb: VarBuilder) -> Result<Self> {
        let cfg = &meta.config;
        let [c_img, h, w] = cfg.state_shape[..] else {
            return Err(Error::arg(format!(
                "a classifier takes C × H × W images, not {:?}",
                cfg.state_shape
            )));
        };
        let pools = cfg.channels.len();
        if cfg.channels.is_empty() || h % (1 << pools) != 0 || w % (1 << pools) != 0 {
            return Err(Error::arg(format!("{h} × {w} images do not pool {pools} times")));
        }
        let mut convs = Vec::new();
        let mut c_in = c_img;
        for (i, &c) in cfg.channels.iter().enumerate() {
            convs.push(Conv2d::new(c_in, c, 3, vb.pp(format!("level{i}")))?);
            c_in = c;
        }
        let flat = c_in * (h >> pools) * (w >> pools);
        let features = Dense::new(flat, cfg.features, Activation::Silu, vb.pp("features"))?;
        let head = Dense::new(cfg.features, cfg.num_classes, Activation::Identity, vb.pp("head"))?;
        Ok(Classifier {
            convs,
            features,
            head,
            meta,
        })
    }

    /// The penultimate features `N × F` of images `N × C × H × W` in `[−1, 1]`.
    pub fn features(&self, x: &Tensor) -> Result<Tensor> {
        let shape = &self.meta.config.state_shape;
        if x.rank() != 4 || x.dims()[1..] != shape[..] {
            return Err(Error::arg(format!(
                "images of shape {:?} do not fit the classifier, which was trained on {shape:?}",
                &x.dims()[1..]
            )));
        }
        let mut h = x.clone();
        for conv in &self.convs {
            h = conv.forward(&h)?.silu()?.avg_pool2d(2)?;
        }
        Ok(self.features.forward(&h.flatten_from(1)?)?)
    }

    /// Class logits `N × K` from features.
    pub fn logits_of(&self, features: &Tensor) -> Result<Tensor> {
        Ok(self.head.forward(features)?)
    }

    /// Features and predicted classes of `x`, in batches of 500 (bounded memory), without a graph.
    pub fn embed(&self, x: &Tensor) -> Result<(Tensor, Vec<u32>)> {
        let n = x.dim(0)?;
        let (mut feats, mut classes) = (Vec::new(), Vec::with_capacity(n));
        for start in (0..n).step_by(500) {
            let len = 500.min(n - start);
            let f = kernels::no_grad(|| self.features(&x.narrow(0, start, len)?))?;
            let pred = self.logits_of(&f)?.detach().argmax(D::Minus1)?.to_vec1::<u32>()?;
            classes.extend(pred);
            feats.push(f.detach());
        }
        Ok((Tensor::cat(&feats, 0)?, classes))
    }

    /// The classifier trained on the embedded MNIST digits.
    #[cfg(feature = "mnist-assets")]
    pub fn embedded_mnist(device: &Device) -> Result<Self> {
        Self::from_bytes(EMBEDDED_MNIST, Path::new("<embedded mnist classifier>"), device)
    }

    /// Without the `mnist-assets` feature there is no shipped classifier: an error that says so.
    #[cfg(not(feature = "mnist-assets"))]
    pub fn embedded_mnist(_device: &Device) -> Result<Self> {
        Err(crate::Error::data(
            "the shipped MNIST classifier is in flowmap's `mnist-assets` feature, which this build leaves out; load one with Classifier::load",
        ))
    }

    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(&bytes, path, device)
    }

    fn from_bytes(bytes: &[u8], path: &Path, device: &Device) -> Result<Self> {
        let bad = |m: String| Error::checkpoint(path, m);
        let (raw, tensors) = crate::checkpoint::read_tensors(bytes, path, KEY)?;
        let meta: ClassifierMeta =
            serde_json::from_str(&raw).map_err(|e| bad(format!("bad classifier metadata: {e}")))?;
        let tensors = tensors
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_device(device)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        let n = tensors.len();
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let clf = Self::build(meta, vb).map_err(|e| bad(format!("does not match its architecture: {e}")))?;
        let expected = 2 * (clf.convs.len() + 2);
        if n != expected {
            return Err(bad(format!("{n} tensors, but the architecture has {expected}")));
        }
        Ok(clf)
    }
}

/// `−mean log softmax(logits)[label]`, from primitive ops (every one has a backward).
fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let logp = shifted.broadcast_sub(&lse)?;
    let picked = logp.gather(&labels.unsqueeze(1)?, 1)?;
    Ok(picked.mean_all()?.neg()?)
}

/// The fraction of `predicted` equal to `labels`.
pub fn accuracy(predicted: &[u32], labels: &[u32]) -> f64 {
    let hits = predicted.iter().zip(labels).filter(|(a, b)| a == b).count();
    hits as f64 / labels.len().max(1) as f64
}

/// Trains the classifier on the training split of a labelled image set (AdamW, cosine learning rate,
/// seeded), and measures it on the held-out split.
pub fn train(
    data: &DataSource,
    cfg: &ClassifierTraining,
    device: &Device,
    progress: &dyn Progress,
) -> Result<(Classifier, VarMap)> {
    let shape = data.state_shape();
    let Some(k) = data.num_classes() else {
        return Err(Error::data(format!(
            "{}: a classifier needs labelled images",
            data.name()
        )));
    };
    if shape.len() != 3 {
        return Err(Error::data(format!(
            "{}: a classifier needs images, not states of shape {shape:?}",
            data.name()
        )));
    }
    if cfg.steps == 0 || cfg.batch_size == 0 {
        return Err(Error::arg(
            "classifier training needs at least one step and one image per batch",
        ));
    }
    let meta = ClassifierMeta {
        config: ClassifierConfig::new(&shape, k),
        data: data.name(),
        scale: data.scale(),
        training: cfg.clone(),
        heldout_accuracy: 0.0,
        version: env!("CARGO_PKG_VERSION").into(),
    };
    let vm = VarMap::new();
    let mut clf = Classifier::build(meta, VarBuilder::from_varmap(&vm, DType::F32, device))?;
    crate::backbone::unet::seed_params(&vm, cfg.seed)?;
    let mut opt = crate::optim::AdamW::new(
        crate::backbone::vars_sorted(&vm),
        candle_nn::ParamsAdamW {
            lr: cfg.lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let mut rng = Rng::derive(cfg.seed, "classifier");
    for step in 0..cfg.steps {
        let frac = step as f64 / cfg.steps as f64;
        opt.set_learning_rate(cfg.lr * 0.5 * (1.0 + (std::f64::consts::PI * frac).cos()));
        let batch = data.sample_batch(cfg.batch_size, &mut rng, DType::F32, device)?;
        let labels = batch
            .cond
            .class_labels()
            .ok_or_else(|| Error::data("a labelled batch without labels"))?
            .clone();
        let loss = cross_entropy(&clf.logits_of(&clf.features(&batch.x0)?)?, &labels)?;
        let value = loss.to_scalar::<f32>()? as f64;
        if !value.is_finite() {
            return Err(Error::Diverged {
                step,
                reason: format!("the loss is {value}"),
            });
        }
        opt.backward_step(&loss)?;
        progress.step(step + 1, Some(value));
    }
    let n = data.heldout_len();
    let x = crate::data::to_batch(&data.heldout(n, 0), n, &shape, DType::F32, device)?;
    let labels = data.heldout_labels(n).unwrap_or_default();
    let (_, predicted) = clf.embed(&x)?;
    clf.meta.heldout_accuracy = accuracy(&predicted, &labels);
    Ok((clf, vm))
}

/// Writes the classifier's weights and metadata, atomically.
pub fn save(path: &Path, clf: &Classifier, vars: &VarMap) -> Result<()> {
    let json = serde_json::to_string(&clf.meta).expect("metadata serialises");
    crate::checkpoint::write_tensors(path, vars, KEY, &json)
}
