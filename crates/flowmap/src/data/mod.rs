//! Data sources, named by one spec string: `checkerboard`, `moons`, `8gaussians`, `spirals`, `rings`,
//! `swissroll`, `gmm:SPEC.json`, `FILE.npy`, `FILE.csv`, `mnist` (the embedded subset) or `mnist:FILE`.
//!
//! Points are `x0` in the project's convention: data at `t = 0`.

mod csv_file;
mod gmm;
pub mod mnist;
pub mod npy;
mod toy;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

pub use csv_file::read_csv;
pub use gmm::GaussianMixture;
pub use npy::{read_npy, write_npy_f32, Matrix};
pub use toy::Toy;

use crate::{Error, Result, Rng};

/// Where training and evaluation points come from.
#[derive(Clone, Debug)]
pub enum DataSource {
    /// A 2-D toy distribution, sampled afresh for every batch.
    Toy(Toy),
    /// A Gaussian mixture, sampled afresh for every batch.
    Mixture(GaussianMixture),
    /// A finite set of points, split once (seeded) into training and held-out parts.
    Points {
        name: String,
        train: Matrix,
        heldout: Matrix,
    },
}

/// Fraction of a finite point set kept out of training for evaluation.
pub const HELDOUT_FRACTION: f64 = 0.1;

impl DataSource {
    /// Parses a data spec (see the module docs) and loads what it names.
    pub fn from_spec(spec: &str) -> Result<Self> {
        if let Ok(toy) = spec.parse::<Toy>() {
            return Ok(DataSource::Toy(toy));
        }
        if let Some(path) = spec.strip_prefix("gmm:") {
            return Ok(DataSource::Mixture(GaussianMixture::from_file(Path::new(path))?));
        }
        if spec == "mnist" {
            let m = mnist::Mnist::embedded()?;
            return Self::points("mnist", Matrix::new(m.count, m.dim(), m.to_signed_unit()));
        }
        if let Some(path) = spec.strip_prefix("mnist:") {
            let m = mnist::Mnist::from_file(Path::new(path))?;
            return Self::points(spec, Matrix::new(m.count, m.dim(), m.to_signed_unit()));
        }
        let path = PathBuf::from(spec);
        let matrix = match path.extension().and_then(|e| e.to_str()) {
            Some("npy") => read_npy(&path)?,
            Some("csv") => read_csv(&path)?,
            _ => {
                return Err(Error::data(format!(
                    "unknown data spec '{spec}' (expected one of {}, gmm:SPEC.json, FILE.npy, FILE.csv, mnist)",
                    Toy::ALL.map(Toy::name).join(", ")
                )))
            }
        };
        Self::points(spec, matrix)
    }

    fn points(name: &str, m: Matrix) -> Result<Self> {
        check_finite(&m.data, name)?;
        if m.rows < 10 {
            return Err(Error::data(format!(
                "{name}: {} points is too few (need at least 10)",
                m.rows
            )));
        }
        // A seeded shuffle, then the last 10% held out.
        let mut order: Vec<usize> = (0..m.rows).collect();
        let mut rng = Rng::derive(0, name);
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let n_held = ((m.rows as f64) * HELDOUT_FRACTION).ceil() as usize;
        let take = |idx: &[usize]| {
            let mut d = Vec::with_capacity(idx.len() * m.cols);
            for &i in idx {
                d.extend_from_slice(&m.data[i * m.cols..(i + 1) * m.cols]);
            }
            Matrix::new(idx.len(), m.cols, d)
        };
        let (tr, he) = order.split_at(m.rows - n_held);
        Ok(DataSource::Points {
            name: name.to_string(),
            train: take(tr),
            heldout: take(he),
        })
    }

    /// The spec string this source was made from (the name recorded in checkpoints and reports).
    pub fn name(&self) -> String {
        match self {
            DataSource::Toy(t) => t.name().to_string(),
            DataSource::Mixture(_) => "gmm".to_string(),
            DataSource::Points { name, .. } => name.clone(),
        }
    }

    pub fn dim(&self) -> usize {
        match self {
            DataSource::Toy(_) => 2,
            DataSource::Mixture(g) => g.dim(),
            DataSource::Points { train, .. } => train.cols,
        }
    }

    /// `n` training points (with replacement for finite sets), row-major `n × dim`.
    pub fn sample(&self, n: usize, rng: &mut Rng) -> Vec<f64> {
        match self {
            DataSource::Toy(t) => t.sample(n, rng),
            DataSource::Mixture(g) => g.sample(n, rng),
            DataSource::Points { train, .. } => gather(train, n, rng),
        }
    }

    /// `n` held-out points for evaluation: fresh samples under a separate seed stream for generators,
    /// the held-out split (all of it when `n` exceeds it) for finite sets.
    pub fn heldout(&self, n: usize, seed: u64) -> Vec<f64> {
        let mut rng = Rng::derive(seed, "heldout");
        match self {
            DataSource::Points { heldout, .. } => {
                let n = n.min(heldout.rows);
                heldout.data[..n * heldout.cols].to_vec()
            }
            _ => self.sample(n, &mut rng),
        }
    }

    /// `n` training points as an `n × dim` tensor.
    pub fn sample_tensor(&self, n: usize, rng: &mut Rng, dtype: DType, device: &Device) -> Result<Tensor> {
        to_tensor(&self.sample(n, rng), n, self.dim(), dtype, device)
    }
}

fn gather(m: &Matrix, n: usize, rng: &mut Rng) -> Vec<f64> {
    let mut out = Vec::with_capacity(n * m.cols);
    for _ in 0..n {
        let i = rng.below(m.rows);
        out.extend_from_slice(&m.data[i * m.cols..(i + 1) * m.cols]);
    }
    out
}

/// Errors when `data` holds NaN or ±Inf, naming the first offending entry.
pub fn check_finite(data: &[f64], what: &str) -> Result<()> {
    if let Some(i) = data.iter().position(|v| !v.is_finite()) {
        return Err(Error::data(format!(
            "{what}: value {} at flat index {i} is not finite",
            data[i]
        )));
    }
    Ok(())
}

/// A row-major buffer as an `rows × cols` tensor.
pub fn to_tensor(data: &[f64], rows: usize, cols: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_slice(data, (rows, cols), &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)?)
}

/// Reads `N × D` points from a `.npy` or `.csv` file and checks that they are finite.
pub fn read_points(path: &Path) -> Result<Matrix> {
    let m = match path.extension().and_then(|e| e.to_str()) {
        Some("csv") => read_csv(path)?,
        _ => read_npy(path)?,
    };
    check_finite(&m.data, &path.display().to_string())?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toys_are_seeded_and_checkerboard_is_on_its_squares() {
        for toy in Toy::ALL {
            let a = toy.sample(100, &mut Rng::new(3));
            let b = toy.sample(100, &mut Rng::new(3));
            assert_eq!(a, b, "{toy} is not reproducible");
            assert!(a.iter().all(|v| v.is_finite() && v.abs() < 5.0), "{toy} out of range");
        }
        let pts = Toy::Checkerboard.sample(5000, &mut Rng::new(1));
        for p in pts.chunks(2) {
            assert_eq!(Toy::checkerboard_density(p[0], p[1]), 0.125, "{p:?} is off the board");
        }
    }

    #[test]
    fn spec_errors_name_the_problem() {
        let e = DataSource::from_spec("checkers").unwrap_err().to_string();
        assert!(e.contains("unknown data spec 'checkers'"), "{e}");
        let e = DataSource::from_spec("/nonexistent/x.npy").unwrap_err().to_string();
        assert!(e.contains("/nonexistent/x.npy"), "{e}");
    }

    #[test]
    fn mixture_moments() {
        let g = GaussianMixture::new(vec![vec![2.0, 0.0], vec![-2.0, 0.0]], vec![0.5, 1.0], vec![1.0, 3.0]).unwrap();
        let n = 200_000;
        let x = g.sample(n, &mut Rng::new(5));
        let mean0 = x.chunks(2).map(|p| p[0]).sum::<f64>() / n as f64;
        // E[x] = 0.25·2 + 0.75·(−2) = −1
        assert!((mean0 + 1.0).abs() < 0.02, "mean {mean0}");
        let var1 = x.chunks(2).map(|p| p[1] * p[1]).sum::<f64>() / n as f64;
        // Var of the second coordinate: 0.25·0.25 + 0.75·1 = 0.8125
        assert!((var1 - 0.8125).abs() < 0.01, "var {var1}");
        assert!(GaussianMixture::from_json(r#"{"means": [[0,0]], "stds": [-1], "weights": [1]}"#).is_err());
    }
}
