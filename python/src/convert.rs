//! Arrays between NumPy and candle: states in (checked against the model's shape, images mapped from the
//! data's range), results out (the buffer moved into NumPy, not copied).

use candle_core::{Device, Tensor};
use numpy::{PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArray1, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::errors::{arg_err, to_py};

/// A NumPy array of shape `dims` that owns `v` (no copy).
pub fn array_out<'py>(py: Python<'py>, v: Vec<f32>, dims: &[usize]) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    PyArray1::from_vec(py, v).reshape(dims.to_vec())
}

/// A batch `B × state shape` from `x`, whose shape must be `B ×` the model's state shape (points: `B × D`),
/// mapped to the model's `[−1, 1]` where the model was trained on images of another range.
pub fn batch_in(
    x: &PyReadonlyArrayDyn<'_, f32>,
    shape: &[usize],
    scale: Option<flowmap::data::Scale>,
    device: &Device,
) -> PyResult<Tensor> {
    let dims = x.shape();
    if dims.len() != shape.len() + 1 || dims[1..] != shape[..] {
        return Err(arg_err(format!(
            "an array of shape {dims:?}, but the model takes N × {shape:?} states"
        )));
    }
    let view = x.as_array();
    let values: Vec<f32> = match view.as_slice() {
        Some(s) => s.to_vec(),
        None => view.iter().copied().collect(),
    };
    if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
        return Err(arg_err(format!("the states hold a non-finite value ({bad})")));
    }
    let t = Tensor::from_vec(values, dims.to_vec(), device).map_err(|e| to_py(e.into()))?;
    flowmap::pipeline::to_model_range(&t, scale).map_err(to_py)
}

/// A column of `rows` times from `v` (one value, broadcast, or one per row): the values, and the `rows × 1`
/// tensor of them.
pub fn column(v: &PyReadonlyArray1<'_, f32>, rows: usize, what: &str, device: &Device) -> PyResult<(Vec<f32>, Tensor)> {
    let v = v.as_array().to_vec();
    let col = match v.len() {
        1 => vec![v[0]; rows],
        n if n == rows => v,
        n => return Err(arg_err(format!("{n} values of {what} for {rows} states"))),
    };
    if let Some(bad) = col.iter().find(|x| !x.is_finite()) {
        return Err(arg_err(format!("{what} holds a non-finite value ({bad})")));
    }
    let t = Tensor::from_slice(&col, (rows, 1), device).map_err(|e| to_py(e.into()))?;
    Ok((col, t))
}
