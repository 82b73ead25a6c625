//! Shared fixtures: the analytic three-component mixture in f64.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use flowmap::data::{self, GaussianMixture};
use flowmap::teacher::GmmVelocity;
use flowmap::Rng;

pub fn mixture() -> GaussianMixture {
    GaussianMixture::three_widths()
}

pub fn teacher() -> GmmVelocity {
    GmmVelocity::new(mixture())
}

pub fn col(v: f64, n: usize) -> Tensor {
    Tensor::full(v, (n, 1), &Device::Cpu).unwrap()
}

/// `n` data points `x0` and noise `x1`, f64.
pub fn pairs(n: usize, seed: u64) -> (Tensor, Tensor) {
    let g = mixture();
    let mut rng = Rng::new(seed);
    let x0 = data::to_tensor(&g.sample(n, &mut rng), n, 2, DType::F64, &Device::Cpu).unwrap();
    let x1 = rng.normal_tensor((n, 2), DType::F64, &Device::Cpu).unwrap();
    (x0, x1)
}

pub fn max_abs(a: &Tensor) -> f64 {
    a.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

pub fn mean_sq(a: &Tensor) -> f64 {
    a.sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

pub fn scalar(a: &Tensor) -> f64 {
    a.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// `(F, dF)` of `map` at `(x, t, s)`, unconditional, along `(dx, dt, ds)`.
pub fn jvp_at(
    map: &dyn flowmap::flow_map::TangentMap,
    (x, t, s): (&Tensor, &Tensor, &Tensor),
    (dx, dt, ds): (&Tensor, &Tensor, &Tensor),
) -> (Tensor, Tensor) {
    let at = flowmap::flow_map::Point {
        x,
        t,
        s,
        cond: flowmap::Cond::none_ref(),
    };
    let along = flowmap::flow_map::Tangent {
        x: dx.clone(),
        t: dt.clone(),
        s: ds.clone(),
    };
    map.average_velocity_jvp(&at, &along).unwrap()
}

/// A `.npy` file of `descr` (`|u1`, `<f4`, `<i8`) with `shape` and raw little-endian `body`.
pub fn write_npy(path: &std::path::Path, descr: &str, shape: &[usize], body: &[u8]) {
    let mut out = flowmap::data::npy::npy_header(descr, shape);
    out.extend_from_slice(body);
    std::fs::write(path, out).unwrap();
}

pub fn labels_npy(path: &std::path::Path, labels: &[i64]) {
    let body: Vec<u8> = labels.iter().flat_map(|v| v.to_le_bytes()).collect();
    write_npy(path, "<i8", &[labels.len()], &body);
}
