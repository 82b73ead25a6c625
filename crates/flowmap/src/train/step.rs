//! One optimisation step's parts: the condition a batch trains under, and the batch's loss.

use candle_core::{DType, Device, Tensor};

use super::{TrainConfig, Trainable};
use crate::cond::Cond;
use crate::data::DataSource;
use crate::dist::{Collective, Shard};
use crate::objective::{Objective, StepContext};
use crate::{Result, Rng};

/// The condition a batch of `n` rows trains under: a class-conditional model's labels, each dropped to the
/// null class with probability `cfg.label_dropout` (so one network is conditional and unconditional), and,
/// when guidance is distilled into the map, a scale per row drawn uniformly from `cfg.guidance_range`. An
/// unconditional model's batches carry no labels.
pub(super) fn condition(
    labels: Cond,
    classes: Option<usize>,
    cfg: &TrainConfig,
    n: usize,
    rng: &mut Rng,
    device: &Device,
) -> Result<Cond> {
    let cond = match classes {
        Some(c) if cfg.label_dropout > 0.0 => labels.drop_labels(cfg.label_dropout, c, rng)?,
        Some(_) => labels,
        None => Cond::none(),
    };
    Ok(match cfg.guidance_range {
        Some([lo, hi]) => {
            let w: Vec<f32> = (0..n).map(|_| (lo + (hi - lo) * rng.uniform()) as f32).collect();
            cond.with_guidance(&Tensor::from_vec(w, (n, 1), device)?)?
        }
        None => cond,
    })
}

/// Where a step is: its number and the training progress in `[0, 1]` its schedules read.
#[derive(Clone, Copy)]
pub(super) struct At {
    pub step: usize,
    pub progress: f64,
}

/// One batch's loss under `objective`: data and their condition, noise, then the objective. Returns the
/// tensor to differentiate and its value. Every random draw comes from `rng`, in this order. Under a
/// `collective`, the draws are the whole batch's and the loss is this rank's rows' ([`crate::dist`]).
#[allow(clippy::too_many_arguments)]
pub(super) fn batch_loss<O: Objective>(
    objective: &O,
    trainable: &Trainable<'_, O::Model>,
    target: &O::Model,
    data: &DataSource,
    cfg: &TrainConfig,
    at: At,
    rng: &mut Rng,
    device: &Device,
    collective: Option<&dyn Collective>,
) -> Result<(Tensor, f64)> {
    let batch = data.sample_batch(cfg.batch_size, rng, DType::F32, device)?;
    let n = batch.x0.dim(0)?;
    let cond = condition(batch.cond, trainable.classes, cfg, n, rng, device)?;
    let x1 = rng.normal_tensor(batch.x0.shape(), DType::F32, device)?;
    // A data-parallel rank keeps its block of the rows drawn for the whole batch.
    let shard = Shard::for_run(collective, n)?;
    let (x0, x1, cond) = if shard.is_whole() {
        (batch.x0.clone(), x1, cond)
    } else {
        let (lo, len) = (shard.rows.start, shard.len());
        (
            batch.x0.narrow(0, lo, len)?,
            x1.narrow(0, lo, len)?,
            cond.narrow(lo, len)?,
        )
    };
    let mut cx = StepContext {
        model: trainable.model,
        target,
        x0: &x0,
        batch_x0: &batch.x0,
        shard,
        x1: &x1,
        cond: &cond,
        classes: trainable.classes,
        path: trainable.path,
        progress: at.progress,
        step: at.step,
        rng,
    };
    let loss = objective.loss(&mut cx)?;
    let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    Ok((loss, value))
}
