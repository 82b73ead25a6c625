//! Image metrics in a classifier's feature space ([`crate::classifier`]): the Fréchet distance between
//! two sets of images, improved precision and recall (Kynkäänniemi et al. 2019, *Improved Precision and
//! Recall Metric for Assessing Generative Models*) and the class accuracy of class-conditional samples.
//!
//! The Fréchet distance between Gaussians fitted to the two feature sets is
//! `FD = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2})`; the matrix square roots come from
//! symmetric eigendecompositions (cyclic Jacobi, f64), which keeps the trace real and exact for the
//! positive semi-definite covariances. FID is this distance in Inception features; here the features are
//! the project's own classifier's, so the numbers compare runs of this project, not published FIDs.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::classifier::{accuracy, Classifier};
use crate::{Error, Result};

/// Neighbours defining each sample's manifold ball in precision and recall (the paper's `k = 3`).
pub const PR_NEIGHBOURS: usize = 3;

/// The metrics of one set of generated images against reference images.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageMetrics {
    /// Fréchet distance in the classifier's features.
    pub fd: f64,
    /// Fraction of generated images inside the reference manifold.
    pub precision: f64,
    /// Fraction of reference images inside the generated manifold.
    pub recall: f64,
    /// Fraction of generated images the classifier assigns the class they were asked for (`None` without
    /// labels).
    pub accuracy: Option<f64>,
}

/// Features of a reference set, computed once and compared with many generated sets.
pub struct Reference {
    features: Vec<Vec<f64>>,
    stats: Gaussian,
    radii: Vec<f64>,
}

impl Reference {
    pub fn new(clf: &Classifier, images: &Tensor) -> Result<Self> {
        let (f, _) = clf.embed(images)?;
        Self::from_features(rows(&f)?)
    }

    pub fn from_features(features: Vec<Vec<f64>>) -> Result<Self> {
        if features.len() <= PR_NEIGHBOURS {
            return Err(Error::arg(format!(
                "image metrics need more than {PR_NEIGHBOURS} reference images, got {}",
                features.len()
            )));
        }
        let stats = Gaussian::fit(&features);
        let radii = knn_radii(&features, PR_NEIGHBOURS);
        Ok(Reference { features, stats, radii })
    }

    /// The metrics of `images` (with the classes they were asked for, if any) against this reference.
    pub fn compare(&self, clf: &Classifier, images: &Tensor, labels: Option<&[u32]>) -> Result<ImageMetrics> {
        let (f, predicted) = clf.embed(images)?;
        let mut m = self.compare_features(&rows(&f)?)?;
        m.accuracy = labels.map(|l| accuracy(&predicted, l));
        Ok(m)
    }

    pub fn compare_features(&self, gen: &[Vec<f64>]) -> Result<ImageMetrics> {
        if gen.len() <= PR_NEIGHBOURS {
            return Err(Error::arg(format!(
                "image metrics need more than {PR_NEIGHBOURS} generated images, got {}",
                gen.len()
            )));
        }
        let fd = frechet_distance(&self.stats, &Gaussian::fit(gen));
        let gen_radii = knn_radii(gen, PR_NEIGHBOURS);
        Ok(ImageMetrics {
            fd,
            precision: coverage(gen, &self.features, &self.radii),
            recall: coverage(&self.features, gen, &gen_radii),
            accuracy: None,
        })
    }
}

fn rows(f: &Tensor) -> Result<Vec<Vec<f64>>> {
    Ok(f.to_dtype(candle_core::DType::F64)?.to_vec2::<f64>()?)
}

/// Mean and covariance of a feature set.
pub struct Gaussian {
    pub mean: Vec<f64>,
    /// Row-major `d × d`.
    pub cov: Vec<f64>,
}

impl Gaussian {
    /// The sample mean and the unbiased sample covariance.
    pub fn fit(x: &[Vec<f64>]) -> Self {
        let (n, d) = (x.len(), x.first().map_or(0, |r| r.len()));
        let mut mean = vec![0.0; d];
        for r in x {
            for (m, v) in mean.iter_mut().zip(r) {
                *m += v / n as f64;
            }
        }
        let mut cov = vec![0.0; d * d];
        for r in x {
            for i in 0..d {
                let ci = r[i] - mean[i];
                for j in i..d {
                    cov[i * d + j] += ci * (r[j] - mean[j]);
                }
            }
        }
        let denom = (n.max(2) - 1) as f64;
        for i in 0..d {
            for j in i..d {
                let v = cov[i * d + j] / denom;
                cov[i * d + j] = v;
                cov[j * d + i] = v;
            }
        }
        Gaussian { mean, cov }
    }
}

/// The Fréchet distance between two Gaussians.
pub fn frechet_distance(a: &Gaussian, b: &Gaussian) -> f64 {
    let d = a.mean.len();
    let dm: f64 = a.mean.iter().zip(&b.mean).map(|(x, y)| (x - y) * (x - y)).sum();
    let tr = |m: &[f64]| (0..d).map(|i| m[i * d + i]).sum::<f64>();
    // Tr (Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2} = Σ √λ of the symmetric PSD matrix S Σ₂ S, S = Σ₁^{1/2}.
    let s = sym_sqrt(&a.cov, d);
    let inner = matmul(&matmul(&s, &b.cov, d), &s, d);
    let (vals, _) = sym_eigen(&inner, d);
    let cross: f64 = vals.iter().map(|&l| l.max(0.0).sqrt()).sum();
    (dm + tr(&a.cov) + tr(&b.cov) - 2.0 * cross).max(0.0)
}

fn matmul(a: &[f64], b: &[f64], d: usize) -> Vec<f64> {
    let mut c = vec![0.0; d * d];
    for i in 0..d {
        for k in 0..d {
            let aik = a[i * d + k];
            if aik == 0.0 {
                continue;
            }
            for j in 0..d {
                c[i * d + j] += aik * b[k * d + j];
            }
        }
    }
    c
}

/// The PSD square root `V diag(√max(λ, 0)) Vᵀ` of a symmetric matrix.
pub fn sym_sqrt(m: &[f64], d: usize) -> Vec<f64> {
    let (vals, vecs) = sym_eigen(m, d);
    let mut out = vec![0.0; d * d];
    for (k, &l) in vals.iter().enumerate() {
        let r = l.max(0.0).sqrt();
        for i in 0..d {
            let vik = vecs[i * d + k] * r;
            for j in 0..d {
                out[i * d + j] += vik * vecs[j * d + k];
            }
        }
    }
    out
}

/// Eigenvalues and eigenvectors (columns of the row-major `V`) of a symmetric matrix by cyclic Jacobi
/// rotations, to a relative off-diagonal norm of 1e-14.
pub fn sym_eigen(m: &[f64], d: usize) -> (Vec<f64>, Vec<f64>) {
    let mut a = m.to_vec();
    let mut v = vec![0.0; d * d];
    for i in 0..d {
        v[i * d + i] = 1.0;
    }
    let norm: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    for _sweep in 0..100 {
        let off: f64 = (0..d)
            .flat_map(|i| (0..d).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * d + j] * a[i * d + j])
            .sum::<f64>()
            .sqrt();
        if off <= 1e-14 * norm.max(f64::MIN_POSITIVE) {
            break;
        }
        for p in 0..d {
            for q in p + 1..d {
                let apq = a[p * d + q];
                if apq.abs() < f64::MIN_POSITIVE {
                    continue;
                }
                let theta = (a[q * d + q] - a[p * d + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..d {
                    let (akp, akq) = (a[k * d + p], a[k * d + q]);
                    a[k * d + p] = c * akp - s * akq;
                    a[k * d + q] = s * akp + c * akq;
                }
                for k in 0..d {
                    let (apk, aqk) = (a[p * d + k], a[q * d + k]);
                    a[p * d + k] = c * apk - s * aqk;
                    a[q * d + k] = s * apk + c * aqk;
                }
                for k in 0..d {
                    let (vkp, vkq) = (v[k * d + p], v[k * d + q]);
                    v[k * d + p] = c * vkp - s * vkq;
                    v[k * d + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..d).map(|i| a[i * d + i]).collect(), v)
}

fn dist2(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// Each point's squared distance to its `k`-th nearest other point.
fn knn_radii(x: &[Vec<f64>], k: usize) -> Vec<f64> {
    use rayon::prelude::*;
    x.par_iter()
        .enumerate()
        .map(|(i, xi)| {
            let mut d: Vec<f64> = x
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .map(|(_, xj)| dist2(xi, xj))
                .collect();
            let kth = (k - 1).min(d.len() - 1);
            *d.select_nth_unstable_by(kth, |a, b| a.total_cmp(b)).1
        })
        .collect()
}

/// The fraction of `queries` inside at least one ball `‖q − m_j‖² ≤ r_j` of the manifold `(m, r)`.
fn coverage(queries: &[Vec<f64>], manifold: &[Vec<f64>], radii: &[f64]) -> f64 {
    use rayon::prelude::*;
    let inside = queries
        .par_iter()
        .filter(|q| manifold.iter().zip(radii).any(|(m, &r)| dist2(q, m) <= r))
        .count();
    inside as f64 / queries.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Rng;

    fn gaussian_set(n: usize, d: usize, shift: f64, scale: f64, seed: u64) -> Vec<Vec<f64>> {
        let mut rng = Rng::new(seed);
        (0..n)
            .map(|_| (0..d).map(|_| shift + scale * rng.normal()).collect())
            .collect()
    }

    #[test]
    fn eigen_reconstructs_a_symmetric_matrix() {
        let d = 6;
        let x = gaussian_set(20, d, 0.0, 1.0, 1);
        let m = Gaussian::fit(&x).cov;
        let (vals, v) = sym_eigen(&m, d);
        let mut back = vec![0.0; d * d];
        for k in 0..d {
            for i in 0..d {
                for j in 0..d {
                    back[i * d + j] += v[i * d + k] * vals[k] * v[j * d + k];
                }
            }
        }
        let err = m.iter().zip(&back).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(err < 1e-12, "{err}");
        let s = sym_sqrt(&m, d);
        let ss = matmul(&s, &s, d);
        let err = m.iter().zip(&ss).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(err < 1e-10, "{err}");
    }

    /// Closed form: between `N(μ₁, a²I)` and `N(μ₂, b²I)` in `d` dimensions, `FD = ‖μ₁ − μ₂‖² + d(a − b)²`.
    #[test]
    fn frechet_distance_of_isotropic_gaussians() {
        let d = 4;
        let diag = |s: f64| {
            (0..d * d)
                .map(|i| if i % (d + 1) == 0 { s * s } else { 0.0 })
                .collect::<Vec<_>>()
        };
        let a = Gaussian {
            mean: vec![0.0; d],
            cov: diag(1.0),
        };
        let b = Gaussian {
            mean: vec![1.0, 0.0, 2.0, 0.0],
            cov: diag(3.0),
        };
        let fd = frechet_distance(&a, &b);
        assert!((fd - (5.0 + 4.0 * 4.0)).abs() < 1e-10, "{fd}");
        assert!(frechet_distance(&a, &a).abs() < 1e-10);
    }

    #[test]
    fn precision_and_recall_see_coverage() {
        let real = gaussian_set(400, 3, 0.0, 1.0, 2);
        let r = Reference::from_features(real).unwrap();
        let same = r.compare_features(&gaussian_set(400, 3, 0.0, 1.0, 3)).unwrap();
        assert!(same.precision > 0.9 && same.recall > 0.9, "{same:?}");
        // A collapsed generator: precise, with poor recall.
        let collapsed = r.compare_features(&gaussian_set(400, 3, 0.0, 0.1, 4)).unwrap();
        assert!(collapsed.precision > 0.95 && collapsed.recall < 0.3, "{collapsed:?}");
        // Far away: neither.
        let far = r.compare_features(&gaussian_set(400, 3, 10.0, 1.0, 5)).unwrap();
        assert!(far.precision < 0.01 && far.recall < 0.01 && far.fd > 250.0, "{far:?}");
    }
}
