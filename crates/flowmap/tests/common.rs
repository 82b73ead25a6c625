//! Shared fixtures: the analytic three-component mixture in f64, small image networks, error measures.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use flowmap::backbone::{Arch, UnetConfig};
use flowmap::data::{self, GaussianMixture};
use flowmap::teacher::GmmVelocity;
use flowmap::Rng;

pub fn mixture() -> GaussianMixture {
    GaussianMixture::three_widths()
}

pub fn teacher() -> GmmVelocity {
    GmmVelocity::new(mixture())
}

/// A `rows × cols` tensor uniform on `[lo, hi)` in `dtype`, drawn from the seeded stream `seed` (the tests never
/// take candle's unseeded `Tensor::rand`: a draw that fails must fail again).
pub fn uniform(lo: f64, hi: f64, (rows, cols): (usize, usize), seed: u64, dtype: DType) -> Tensor {
    let v: Vec<f64> = Rng::new(seed)
        .uniform_vec(rows * cols)
        .iter()
        .map(|u| lo + (hi - lo) * u)
        .collect();
    Tensor::from_vec(v, (rows, cols), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
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

/// A small U-Net over `shape` (two levels, attention at 4 × 4, four groups): the tests' image network.
pub fn small_unet(shape: &[usize], channels: usize, time_features: usize, classes: Option<usize>) -> Arch {
    Arch::Unet(UnetConfig {
        channels,
        channel_mult: vec![1, 2],
        attention_resolutions: vec![4],
        groups: 4,
        time_features,
        num_classes: classes,
        ..UnetConfig::new(shape)
    })
}

/// `max |a − b| / max |b|`, read on the host (from any device and dtype): the error relative to the
/// largest value.
pub fn rel_to_largest(a: &Tensor, b: &Tensor) -> f32 {
    let host = |t: &Tensor| -> Vec<f32> {
        let t = t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
        t.flatten_all().unwrap().to_vec1().unwrap()
    };
    let (a, b) = (host(a), host(b));
    assert_eq!(a.len(), b.len(), "the two tensors differ in size");
    let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    d / b.iter().map(|y| y.abs()).fold(0f32, f32::max).max(1e-12)
}
