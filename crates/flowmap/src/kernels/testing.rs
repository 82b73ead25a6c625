//! Shared checks of the fused nodes against their plain candle references.

use candle_core::{DType, Device, Tensor, Var};

/// Seeded standard-normal f32 values of `shape`.
pub fn rand(shape: &[usize], seed: u64) -> Tensor {
    crate::Rng::new(seed)
        .normal_tensor(shape, DType::F32, &Device::Cpu)
        .unwrap()
}

/// The largest `|t|` of an f32 tensor.
pub fn max_abs(t: &Tensor) -> f32 {
    max_abs_f64(&t.to_dtype(DType::F64).unwrap()) as f32
}

/// The largest `|t|` of an f32 or f64 tensor, in f64.
pub fn max_abs_f64(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// The fused output against the plain one in values (`tol`) and in the gradients of `⟨out, probe⟩` with
/// respect to each of `vars` (`tol` relative to the plain gradient's largest entry, or absolute below 1).
pub fn check_against_plain(fast: &Tensor, slow: &Tensor, vars: &[(&str, &Var)], probe: &Tensor, tol: f32, at: &str) {
    let d = max_abs(&(fast - slow).unwrap());
    assert!(d < tol, "values differ by {d} at {at}");
    let gf = (fast * probe).unwrap().sum_all().unwrap().backward().unwrap();
    let gs = (slow * probe).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, v) in vars {
        let (a, r) = (gf.get(v).unwrap(), gs.get(v).unwrap());
        let d = max_abs(&(a - r).unwrap());
        assert!(d <= tol * max_abs(r).max(1.0), "d{name} differs by {d} at {at}");
    }
}

/// `run`'s output on one thread and on four, which must be the same bits.
pub fn same_on_1_and_4_threads<R: PartialEq + std::fmt::Debug>(run: impl Fn() -> R) {
    let one = super::with_threads(1, &run);
    let four = super::with_threads(4, &run);
    assert_eq!(one, four);
}

/// A tensor's values as a flat vector.
pub fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}
