//! Seeded randomness. Every random number in flowmap comes from a [`Rng`] built from an explicit seed,
//! so the same seed gives the same numbers on every run.

use candle_core::{DType, Device, Shape, Tensor};
use rand::{Rng as _, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

use crate::Result;

/// The exact position of an [`Rng`]: its 32-byte seed (hex), stream and position in 32-bit words.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RngState {
    pub seed: String,
    pub stream: u64,
    /// A `u128`, as decimal text.
    pub word_pos: String,
}

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
    /// Where the stream stands, to be restored exactly by [`Rng::from_state`].
    pub fn state(&self) -> RngState {
        let seed = self.0.get_seed().iter().map(|b| format!("{b:02x}")).collect();
        RngState {
            seed,
            stream: self.0.get_stream(),
            word_pos: self.0.get_word_pos().to_string(),
        }
    }

    /// The stream at the position `state` recorded.
    pub fn from_state(state: &RngState) -> Result<Self> {
        let bad = || crate::Error::data(format!("malformed random-number state {state:?}"));
        let hex = state.seed.as_bytes();
        if hex.len() != 64 {
            return Err(bad());
        }
        let mut seed = [0u8; 32];
        for (i, pair) in hex.chunks_exact(2).enumerate() {
            let text = std::str::from_utf8(pair).map_err(|_| bad())?;
            seed[i] = u8::from_str_radix(text, 16).map_err(|_| bad())?;
        }
        let word_pos: u128 = state.word_pos.parse().map_err(|_| bad())?;
        let mut rng = rand_chacha::ChaCha8Rng::from_seed(seed);
        rng.set_stream(state.stream);
        rng.set_word_pos(word_pos);
        Ok(Rng(rng))
    }

    /// Uniform [0, 1) column of length `n`.
    pub fn uniform_vec(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.uniform()).collect()
    }
}
