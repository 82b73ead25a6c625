//! What `sample`, `apply` and `eval` share about the model they were given: its classes under `--class`,
//! its sampler and solver, and its outputs in the data's own range.

use std::path::Path;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use flowmap::checkpoint::Checkpoint;
use flowmap::data;
use flowmap::ode::{self, Solver};
use flowmap::sample::Sampler;
use flowmap::Cond;

pub fn write_tensor(path: &Path, x: &Tensor) -> Result<()> {
    let v = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    data::write_npy_f32_shape(path, x.dims(), &v)?;
    Ok(())
}

/// The condition of `n` samples of a model with `classes` under `--class` (`K`, `all` or `null`), and the
/// number of grid rows it asks for (one per class for `all`).
pub fn class_cond(spec: Option<&str>, n: usize, classes: Option<usize>, device: &Device) -> Result<(Cond, usize)> {
    class_cond_from(spec, 0, n, classes, device)
}

/// [`class_cond`] for samples `start..start + n` (with `all`, sample `i` has class `i mod C`).
pub fn class_cond_from(
    spec: Option<&str>,
    start: usize,
    n: usize,
    classes: Option<usize>,
    device: &Device,
) -> Result<(Cond, usize)> {
    let Some(c) = classes else {
        if spec.is_some_and(|s| s != "null") {
            bail!(
                "--class {}: the model is unconditional (it was trained without labels)",
                spec.unwrap_or("")
            );
        }
        return Ok((Cond::none(), 0));
    };
    let labels: Vec<u32> = match spec.unwrap_or("all") {
        "all" => (start..start + n).map(|i| (i % c) as u32).collect(),
        "null" => vec![c as u32; n],
        k => match k.parse::<usize>() {
            Ok(k) if k < c => vec![k as u32; n],
            Ok(k) => bail!("--class {k} is out of range: the model has classes 0..{}", c - 1),
            Err(_) => bail!("--class '{k}' is not a class number, all or null"),
        },
    };
    let rows = if spec.unwrap_or("all") == "all" { c } else { 0 };
    Ok((Cond::from_classes(&labels, c, device)?, rows))
}

/// `x` in the data's own value range (images), as the model's checkpoint records it.
pub fn to_data_range(x: &Tensor, scale: Option<flowmap::data::Scale>) -> Result<Tensor> {
    Ok(match scale {
        Some(s) => x.affine(0.5 * (s.hi - s.lo), s.lo + 0.5 * (s.hi - s.lo))?,
        None => x.clone(),
    })
}

/// Whether the checkpoint holds a map trained only for `s = 0` (a consistency model).
/// The sampler named on the command line, or the map's own: a consistency model is defined at `s = 0` only,
/// so its multi-step samples re-noise between jumps (and a sampler that would evaluate it at `s > 0` is an
/// error); every other map walks its grid deterministically.
pub fn map_sampler(name: Option<&str>, ck: &Checkpoint, multi_step: bool) -> Result<Sampler> {
    let boundary = ck.meta.kind.boundary_only();
    let sampler = match (name, boundary) {
        (Some(name), _) => Sampler::parse(name)?,
        (None, true) => Sampler::Consistency,
        (None, false) => Sampler::Deterministic,
    };
    if boundary && !sampler.boundary_only() && multi_step {
        bail!("a consistency model maps only to s = 0: sample it with --sampler consistency (or gamma:1), or with --nfe 1");
    }
    Ok(sampler)
}

/// A solver within an NFE budget: as many steps as the budget buys.
pub fn teacher_solver(name: &str, nfe: usize) -> Result<Solver> {
    if name == "dopri5" {
        return Ok(Solver::dopri5(1e-5));
    }
    let scheme: ode::Scheme = name.parse()?;
    let steps = nfe / scheme.evals_per_step();
    if steps == 0 {
        bail!(
            "{name} needs at least {} evaluations per step; --nfe {nfe} buys none",
            scheme.evals_per_step()
        );
    }
    Ok(Solver::fixed(scheme, steps))
}
