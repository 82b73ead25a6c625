//! What `sample`, `apply` and `eval` share about the model they were given: its classes under `--class`,
//! its sampler, and its outputs written out.

use std::path::Path;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use flowmap::data;
use flowmap::pipeline::Classes;
use flowmap::Cond;

pub fn write_tensor(path: &Path, x: &Tensor) -> Result<()> {
    let v = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    data::write_npy_f32_shape(path, x.dims(), &v)?;
    Ok(())
}

/// `--class` (`K`, `all` or `null`), parsed.
pub fn parse_class(spec: Option<&str>) -> Result<Option<Classes>> {
    spec.map(|s| s.parse::<Classes>().map_err(|e| anyhow::anyhow!("--class: {e}")))
        .transpose()
}

/// The condition of `n` samples of a model with `classes` under `--class`.
pub fn class_cond(spec: Option<&str>, n: usize, classes: Option<usize>, device: &Device) -> Result<Cond> {
    Classes::cond(parse_class(spec)?.as_ref(), 0, n, classes, device).map_err(|e| anyhow::anyhow!("--class: {e}"))
}
