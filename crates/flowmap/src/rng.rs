//! Seeded randomness. Every random number in flowmap comes from a [`Rng`] built from an explicit seed,
//! so the same seed gives the same numbers on every run.

use candle_core::{DType, Device, Shape, Tensor};
use rand::{Rng as _, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

use crate::Result;

/// The project's random number generator: ChaCha8, portable and reproducible.
#[derive(Clone, Debug)]
pub struct Rng(rand_chacha::ChaCha8Rng);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(rand_chacha::ChaCha8Rng::seed_from_u64(seed))
    }
    /// An independent stream derived from this seed and a label (e.g. "heldout").
    pub fn derive(seed: u64, label: &str) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in label.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        Rng::new(seed ^ h.rotate_left(17))
    }
    pub fn uniform(&mut self) -> f64 {
        self.0.gen::<f64>()
    }
    pub fn normal(&mut self) -> f64 {
        StandardNormal.sample(&mut self.0)
    }
    pub fn below(&mut self, n: usize) -> usize {
        self.0.gen_range(0..n)
    }
    /// Standard normal tensor of the given shape.
    pub fn normal_tensor(&mut self, shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let n = shape.elem_count();
        let v: Vec<f64> = (0..n).map(|_| self.normal()).collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?)
    }
    /// Uniform [0, 1) column of length `n`.
    pub fn uniform_vec(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.uniform()).collect()
    }
}
