//! Metrics. Distribution distances between samples and held-out data (sliced Wasserstein-2, MMD² with a
//! multi-bandwidth RBF kernel, energy distance, and the checkerboard's histogram KL), and errors against
//! the exact solution operator Φ (the flow-map error over `(t, s)` pairs and the semigroup error).
//!
//! Sample sets are row-major `n × d` slices of f64.

use candle_core::{DType, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::cond::Cond;
use crate::data::Toy;
use crate::flow_map::FlowMap;
use crate::kernels::no_grad;
use crate::path::ProbabilityPath;
use crate::{state, Result, Rng};

fn rows(x: &[f64], d: usize) -> impl Iterator<Item = &[f64]> + Clone {
    x.chunks_exact(d)
}

fn dist(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(u, v)| (u - v) * (u - v)).sum::<f64>().sqrt()
}

fn mean_pair<F: Fn(&[f64], &[f64]) -> f64 + Sync>(x: &[f64], y: &[f64], d: usize, same: bool, f: F) -> f64 {
    let ys: Vec<&[f64]> = rows(y, d).collect();
    // Row sums in parallel, then added in row order: rayon's own `sum` reduces in an order that depends on
    // how the work was split and stolen, which moved the last bits from run to run.
    let row_sums: Vec<f64> = x
        .par_chunks_exact(d)
        .enumerate()
        .map(|(i, a)| {
            ys.iter()
                .enumerate()
                .filter(|(j, _)| !same || *j != i)
                .map(|(_, b)| f(a, b))
                .sum::<f64>()
        })
        .collect();
    let total: f64 = row_sums.iter().sum();
    let (n, m) = (x.len() / d, ys.len());
    let pairs = if same { n * (n - 1) } else { n * m };
    total / pairs as f64
}

/// Energy distance `2E‖X − Y‖ − E‖X − X'‖ − E‖Y − Y'‖` (U-statistics within each set). Zero iff the laws agree.
///
/// In one and two dimensions it costs `O(n log n)` per direction instead of `O(n²)` (see
/// [`energy_distance_sorted`]), so that it can resolve the small distances of a good sampler on hundreds of
/// thousands of points; in more dimensions it sums over all pairs.
pub fn energy_distance(x: &[f64], y: &[f64], d: usize) -> f64 {
    if d <= SORTED_ENERGY_DIMS && x.len() >= 2 * d && y.len() >= 2 * d {
        return energy_distance_sorted(x, y, d, ENERGY_DIRECTIONS);
    }
    energy_distance_pairs(x, y, d)
}

/// The energy distance summed over all pairs, `O(n·m)`.
pub fn energy_distance_pairs(x: &[f64], y: &[f64], d: usize) -> f64 {
    let xy = mean_pair(x, y, d, false, dist);
    let xx = mean_pair(x, x, d, true, dist);
    let yy = mean_pair(y, y, d, true, dist);
    2.0 * xy - xx - yy
}

/// `f(&mut buffers, i)` for `i` in `0..n`, in order, across the worker threads: each thread takes a
/// contiguous range of `i` and allocates its buffers once (large buffers allocated per item would spend
/// more time in the kernel's page zeroing than in the work). The results come back in `i` order, so sums
/// over them do not depend on the thread count.
fn map_with_buffers<B, T: Send>(
    n: usize,
    buffers: impl Fn() -> B + Sync,
    f: impl Fn(&mut B, usize) -> T + Sync,
) -> Vec<T> {
    let workers = rayon::current_num_threads().clamp(1, n.max(1));
    (0..workers)
        .into_par_iter()
        .map(|w| {
            let mut buf = buffers();
            (w * n / workers..(w + 1) * n / workers)
                .map(|i| f(&mut buf, i))
                .collect::<Vec<T>>()
        })
        .collect::<Vec<_>>()
        .into_iter()
        .flatten()
        .collect()
}

/// The dimensions up to which [`energy_distance`] sorts projections instead of summing over pairs.
pub const SORTED_ENERGY_DIMS: usize = 2;

/// Directions of the quadrature in [`energy_distance_sorted`].
pub const ENERGY_DIRECTIONS: usize = 180;

/// `Σ_{i<j} |a_i − a_j|` of sorted `a`: `Σ_k a_k (2k − n + 1)`.
fn sorted_pair_sum(a: &[f64]) -> f64 {
    let n = a.len() as f64;
    a.iter().enumerate().map(|(k, v)| v * (2.0 * k as f64 - n + 1.0)).sum()
}

/// The three mean distances of 1-D samples, exactly, by sorting: `(E|X − Y|, E|X − X'|, E|Y − Y'|)`.
/// `u` is scratch space for the merged samples.
fn mean_distances_1d(a: &mut [f64], b: &mut [f64], u: &mut Vec<f64>) -> (f64, f64, f64) {
    a.sort_unstable_by(f64::total_cmp);
    b.sort_unstable_by(f64::total_cmp);
    // The union, merged in order; its pair sum is the within-sums plus the cross sum.
    u.clear();
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        if a[i] <= b[j] {
            u.push(a[i]);
            i += 1;
        } else {
            u.push(b[j]);
            j += 1;
        }
    }
    u.extend_from_slice(&a[i..]);
    u.extend_from_slice(&b[j..]);
    let (sa, sb) = (sorted_pair_sum(a), sorted_pair_sum(b));
    let cross = sorted_pair_sum(u) - sa - sb;
    let (n, m) = (a.len() as f64, b.len() as f64);
    (cross / (n * m), 2.0 * sa / (n * (n - 1.0)), 2.0 * sb / (m * (m - 1.0)))
}

/// The energy distance of 1-D or 2-D samples in `O(directions · n log n)`.
///
/// In one dimension the three mean distances follow exactly from the sorted samples
/// (`Σ_{i<j} |a_i − a_j| = Σ_k a_(k)·(2k − n + 1)`, and the cross sum is the union's minus the two
/// within-sums). In two, `‖z‖ = (π/2)·E_θ |⟨θ, z⟩|` for a direction `θ` uniform on the half circle, so each
/// mean distance is `π/2` times the average over directions of the projections' 1-D mean distance; the
/// average is the midpoint rule over `directions` equally spaced angles. The rule's error for one pair
/// oscillates with the pair's direction (period `π/directions`) and averages out over the pairs: against
/// the `O(n²)` sum it agrees to ~3e-8 with 180 directions (1.6e-7 with 90), far below the statistic's own
/// sampling noise at any size it is used for (tested).
///
/// # Panics
/// If `d` is neither 1 nor 2 ([`energy_distance`] takes any dimension).
pub fn energy_distance_sorted(x: &[f64], y: &[f64], d: usize, directions: usize) -> f64 {
    assert!(d == 1 || d == 2, "sorted energy distance needs 1-D or 2-D samples");
    if d == 1 {
        let (xy, xx, yy) = mean_distances_1d(&mut x.to_vec(), &mut y.to_vec(), &mut vec![]);
        return 2.0 * xy - xx - yy;
    }
    let k = directions.max(1);
    let buffers = || {
        (
            vec![0.0; x.len() / 2],
            vec![0.0; y.len() / 2],
            Vec::with_capacity((x.len() + y.len()) / 2),
        )
    };
    let sums = map_with_buffers(k, buffers, |(px, py, u), i| {
        let phi = (i as f64 + 0.5) * std::f64::consts::PI / k as f64;
        let (c, s) = (phi.cos(), phi.sin());
        let project = |z: &[f64], p: &mut [f64]| {
            for (v, r) in p.iter_mut().zip(z.chunks_exact(2)) {
                *v = c * r[0] + s * r[1];
            }
        };
        project(x, px);
        project(y, py);
        mean_distances_1d(px, py, u)
    });
    // Summed in direction order: the same number on any thread count.
    let (xy, xx, yy) = sums
        .iter()
        .fold((0.0, 0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1, a.2 + b.2));
    let scale = std::f64::consts::FRAC_PI_2 / k as f64;
    scale * (2.0 * xy - xx - yy)
}

/// Unbiased MMD² with the kernel `Σ_b exp(−‖x − y‖² / (2 h_b²))` summed over `bandwidths`.
pub fn mmd2_rbf(x: &[f64], y: &[f64], d: usize, bandwidths: &[f64]) -> f64 {
    let k = |a: &[f64], b: &[f64]| {
        let r2: f64 = a.iter().zip(b).map(|(u, v)| (u - v) * (u - v)).sum();
        bandwidths.iter().map(|h| (-r2 / (2.0 * h * h)).exp()).sum::<f64>()
    };
    mean_pair(x, x, d, true, k) + mean_pair(y, y, d, true, k) - 2.0 * mean_pair(x, y, d, false, k)
}

/// The default MMD bandwidths for data of unit scale.
pub const MMD_BANDWIDTHS: [f64; 5] = [0.05, 0.1, 0.2, 0.5, 1.0];

/// Sliced Wasserstein-2: `sqrt(E_θ W2²(θ·X, θ·Y))` over `projections` random unit directions. Sets of
/// unequal size are compared through their empirical quantile functions.
pub fn sliced_w2(x: &[f64], y: &[f64], d: usize, projections: usize, seed: u64) -> f64 {
    let mut rng = Rng::derive(seed, "sliced-w2");
    let dirs: Vec<Vec<f64>> = (0..projections)
        .map(|_| {
            let v: Vec<f64> = (0..d).map(|_| rng.normal()).collect();
            let n = v.iter().map(|a| a * a).sum::<f64>().sqrt().max(1e-300);
            v.into_iter().map(|a| a / n).collect()
        })
        .collect();
    let (n, m) = (x.len() / d, y.len() / d);
    let per_direction = map_with_buffers(
        projections,
        || (vec![0.0; n], vec![0.0; m]),
        |(px, py), i| {
            let dir = &dirs[i];
            let project = |z: &[f64], p: &mut [f64]| {
                for (v, r) in p.iter_mut().zip(rows(z, d)) {
                    *v = r.iter().zip(dir).map(|(a, b)| a * b).sum();
                }
                p.sort_unstable_by(f64::total_cmp);
            };
            project(x, px);
            project(y, py);
            let k = n.max(m);
            let q = |p: &[f64], u: f64| p[((u * p.len() as f64) as usize).min(p.len() - 1)];
            (0..k)
                .map(|i| {
                    let u = (i as f64 + 0.5) / k as f64;
                    let diff = q(px, u) - q(py, u);
                    diff * diff
                })
                .sum::<f64>()
                / k as f64
        },
    );
    let w2 = per_direction.iter().sum::<f64>() / projections as f64;
    w2.sqrt()
}

/// KL(p ‖ q) between the checkerboard's density `p` and a histogram `q` of 2-D samples on a `bins × bins`
/// grid over [−2, 2]² (add-½ smoothing; samples outside the square count towards the normaliser only).
pub fn checkerboard_kl(samples: &[f64], bins: usize) -> f64 {
    let n = samples.len() / 2;
    let mut counts = vec![0.0f64; bins * bins];
    let w = 4.0 / bins as f64;
    for p in samples.chunks_exact(2) {
        let (i, j) = (((p[0] + 2.0) / w).floor(), ((p[1] + 2.0) / w).floor());
        if i >= 0.0 && j >= 0.0 && (i as usize) < bins && (j as usize) < bins {
            counts[i as usize * bins + j as usize] += 1.0;
        }
    }
    let total = n as f64 + 0.5 * (bins * bins) as f64;
    let mut kl = 0.0;
    for i in 0..bins {
        for j in 0..bins {
            // p's mass in the cell, by the density at its centre (cells never straddle squares when 4 | bins).
            let (cx, cy) = (-2.0 + (i as f64 + 0.5) * w, -2.0 + (j as f64 + 0.5) * w);
            let p = Toy::checkerboard_density(cx, cy) * w * w;
            if p > 0.0 {
                let q = (counts[i * bins + j] + 0.5) / total;
                kl += p * (p / q).ln();
            }
        }
    }
    kl
}

/// Distances of a sample set to reference data.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Distances {
    pub energy: f64,
    pub sliced_w2: f64,
    pub mmd2: f64,
    /// Only for checkerboard data.
    pub kl: Option<f64>,
}

/// All distances between `samples` and `reference`, on at most `max_points` of each for the O(n²) ones
/// (the energy distance in more than two dimensions).
pub fn distances(samples: &[f64], reference: &[f64], d: usize, checkerboard: bool, max_points: usize) -> Distances {
    let cap = |z: &'_ [f64]| -> Vec<f64> { z[..(max_points * d).min(z.len())].to_vec() };
    let (s, r) = (cap(samples), cap(reference));
    let mmd_cap = 4000 * d;
    Distances {
        // Sorting makes the energy distance cheap in one and two dimensions: there it takes every point.
        energy: if d <= SORTED_ENERGY_DIMS {
            energy_distance(samples, reference, d)
        } else {
            energy_distance(&s, &r, d)
        },
        sliced_w2: sliced_w2(samples, reference, d, 128, 0),
        mmd2: mmd2_rbf(
            &s[..mmd_cap.min(s.len())],
            &r[..mmd_cap.min(r.len())],
            d,
            &MMD_BANDWIDTHS,
        ),
        kl: checkerboard.then(|| checkerboard_kl(samples, 32)),
    }
}

/// The flow-map error at one `(t, s)` pair.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MapError {
    pub t: f64,
    pub s: f64,
    /// `E‖f(x_t, t, s) − Φ_{t→s}(x_t)‖²`.
    pub abs: f64,
    /// `E‖f − Φ‖² / E‖Φ − x_t‖²`.
    pub rel: f64,
}

fn sq_norm_mean(a: &Tensor) -> Result<f64> {
    Ok(state::row_sum(&a.sqr()?)?
        .mean_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?)
}

/// The pairs `t_i > s_j` of an `n`-point uniform grid on [0, 1] (`n ≥ 2`).
pub fn triangle_grid(n: usize) -> Vec<(f64, f64)> {
    let g: Vec<f64> = (0..n).map(|i| i as f64 / (n - 1) as f64).collect();
    let mut out = vec![];
    for &t in &g {
        for &s in &g {
            if s < t {
                out.push((t, s));
            }
        }
    }
    out
}

/// Where maps are compared: states `x_t = α_t·x0 + σ_t·x1` on `path` for data `x0` and noise `x1`
/// (`B × …` tensors of one shape), under the condition `cond`.
#[derive(Clone, Copy)]
pub struct PathPoints<'a> {
    pub x0: &'a Tensor,
    pub x1: &'a Tensor,
    pub cond: &'a Cond,
    pub path: &'a dyn ProbabilityPath,
}

impl PathPoints<'_> {
    /// `x_t` at the time column `t`.
    pub fn at(&self, t: &Tensor) -> Result<Tensor> {
        self.path.interpolate(self.x0, self.x1, t)
    }
}

/// The flow-map error of `map` against `exact` at each `(t, s)` pair, at the states `p.at(t)`.
pub fn flow_map_errors(
    map: &dyn FlowMap,
    exact: &dyn FlowMap,
    p: &PathPoints<'_>,
    pairs: &[(f64, f64)],
) -> Result<Vec<MapError>> {
    let (x0, c) = (p.x0, p.cond);
    let b = x0.dim(0)?;
    pairs
        .iter()
        .map(|&(t, s)| {
            let tt = Tensor::full(t, (b, 1), x0.device())?.to_dtype(x0.dtype())?;
            let ss = Tensor::full(s, (b, 1), x0.device())?.to_dtype(x0.dtype())?;
            let xt = p.at(&tt)?;
            let phi = no_grad(|| exact.map(&xt, &tt, &ss, c))?;
            let f = no_grad(|| map.map(&xt, &tt, &ss, c))?;
            let abs = sq_norm_mean(&(f - &phi)?)?;
            let scale = sq_norm_mean(&(phi - &xt)?)?;
            Ok(MapError {
                t,
                s,
                abs,
                rel: abs / scale.max(1e-12),
            })
        })
        .collect()
}

/// Mean relative flow-map error over pairs.
pub fn mean_relative(errors: &[MapError]) -> f64 {
    errors.iter().map(|e| e.rel).sum::<f64>() / errors.len().max(1) as f64
}

/// The semigroup error `E‖f(f(x, t, u), u, s) − f(x, t, s)‖²` averaged over triples `(t, u, s)` of the
/// `n`-point grid with `t > u > s`, with `x = x_t` on the path.
pub fn semigroup_error(map: &dyn FlowMap, p: &PathPoints<'_>, n: usize) -> Result<f64> {
    let (x0, c) = (p.x0, p.cond);
    let g: Vec<f64> = (0..n).map(|i| i as f64 / (n - 1) as f64).collect();
    let b = x0.dim(0)?;
    let col = |v: f64| -> Result<Tensor> { Ok(Tensor::full(v, (b, 1), x0.device())?.to_dtype(x0.dtype())?) };
    let (mut total, mut count) = (0.0, 0);
    for (i, &t) in g.iter().enumerate() {
        for (j, &u) in g.iter().enumerate().take(i) {
            for &s in g.iter().take(j) {
                let (tt, uu, ss) = (col(t)?, col(u)?, col(s)?);
                let xt = p.at(&tt)?;
                let two = no_grad(|| map.map(&map.map(&xt, &tt, &uu, c)?, &uu, &ss, c))?;
                let one = no_grad(|| map.map(&xt, &tt, &ss, c))?;
                total += sq_norm_mean(&(two - one)?)?;
                count += 1;
            }
        }
    }
    Ok(total / count.max(1) as f64)
}

/// `E‖f − Φ‖² / E‖Φ − x‖²` with an independent `(t, s)` uniform on the triangle for each row.
pub fn relative_error_uniform(map: &dyn FlowMap, exact: &dyn FlowMap, p: &PathPoints<'_>, seed: u64) -> Result<f64> {
    relative_error_drawn(map, exact, p, seed, false)
}

/// [`relative_error_uniform`] on the boundary `s = 0` (the same draws of `t`): the error of a consistency
/// model, which maps only there.
pub fn relative_error_to_data(map: &dyn FlowMap, exact: &dyn FlowMap, p: &PathPoints<'_>, seed: u64) -> Result<f64> {
    relative_error_drawn(map, exact, p, seed, true)
}

/// The relative error at one `(t, s)` pair per row: `t ≥ s` from two uniform draws, or `s = 0`.
fn relative_error_drawn(
    map: &dyn FlowMap,
    exact: &dyn FlowMap,
    p: &PathPoints<'_>,
    seed: u64,
    to_data: bool,
) -> Result<f64> {
    let (x0, c) = (p.x0, p.cond);
    let n = x0.dim(0)?;
    let mut rng = Rng::derive(seed, "pairs");
    let (mut t, mut s) = (vec![], vec![]);
    for _ in 0..n {
        let (a, b) = (rng.uniform(), rng.uniform());
        t.push(a.max(b));
        s.push(if to_data { 0.0 } else { a.min(b) });
    }
    let tt = crate::data::to_tensor(&t, n, 1, x0.dtype(), x0.device())?;
    let ss = crate::data::to_tensor(&s, n, 1, x0.dtype(), x0.device())?;
    let xt = p.at(&tt)?;
    let phi = no_grad(|| exact.map(&xt, &tt, &ss, c))?;
    let f = no_grad(|| map.map(&xt, &tt, &ss, c))?;
    let num = (f - &phi)?.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let den = (phi - &xt)?
        .sqr()?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    Ok(num / den.max(1e-30))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gaussian(n: usize, d: usize, mean: f64, seed: u64) -> Vec<f64> {
        let mut rng = Rng::new(seed);
        (0..n * d)
            .map(|i| rng.normal() + if i % d == 0 { mean } else { 0.0 })
            .collect()
    }

    fn phi(x: f64) -> f64 {
        // Standard normal CDF via erfc (Abramowitz–Stegun 7.1.26 is not accurate enough; use a series).
        0.5 * libm_erfc(-x / std::f64::consts::SQRT_2)
    }

    fn libm_erfc(x: f64) -> f64 {
        // Numerical Recipes erfc (fractional error < 1.2e-7).
        let z = x.abs();
        let t = 1.0 / (1.0 + 0.5 * z);
        let r = t
            * (-z * z - 1.26551223
                + t * (1.00002368
                    + t * (0.37409196
                        + t * (0.09678418
                            + t * (-0.18628806
                                + t * (0.27886807
                                    + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))))
                .exp();
        if x >= 0.0 {
            r
        } else {
            2.0 - r
        }
    }

    #[test]
    fn energy_distance_matches_closed_form_in_1d() {
        // X ~ N(0, 1), Y ~ N(1, 1): X − Y ~ N(−1, 2). E|Z| for Z ~ N(μ, σ²) = σ√(2/π)e^{−μ²/2σ²} + μ(1 − 2Φ(−μ/σ)).
        let (mu, sd) = (1.0f64, 2f64.sqrt());
        let e_xy = sd * (2.0 / std::f64::consts::PI).sqrt() * (-mu * mu / (2.0 * sd * sd)).exp()
            + mu * (1.0 - 2.0 * phi(-mu / sd));
        let e_xx = 2.0 / std::f64::consts::PI.sqrt();
        let exact = 2.0 * e_xy - 2.0 * e_xx;
        let est = energy_distance(&gaussian(3000, 1, 0.0, 1), &gaussian(3000, 1, 1.0, 2), 1);
        assert!((est - exact).abs() < 0.03, "energy distance {est}, exact {exact}");
        let same = energy_distance(&gaussian(3000, 2, 0.0, 3), &gaussian(3000, 2, 0.0, 4), 2);
        assert!(same.abs() < 0.01, "same law gives {same}");
    }

    #[test]
    fn sorted_energy_distance_agrees_with_the_pair_sum() {
        let mix = |n: usize, seed: u64| -> Vec<f64> {
            crate::data::GaussianMixture::three_widths().sample(n, &mut Rng::new(seed))
        };
        let (a, b) = (mix(3000, 1), mix(2500, 2));
        let shifted: Vec<f64> = mix(2500, 3).iter().map(|v| v + 0.05).collect();
        for (y, what) in [(&b, "same law"), (&shifted, "shifted")] {
            let exact = energy_distance_pairs(&a, y, 2);
            let fast = energy_distance_sorted(&a, y, 2, ENERGY_DIRECTIONS);
            assert!((exact - fast).abs() < 2e-7, "{what}: pairs {exact}, sorted {fast}");
        }
        // One dimension is exact up to rounding.
        let (p, q) = (gaussian(2000, 1, 0.0, 9), gaussian(1500, 1, 0.3, 10));
        let (exact, fast) = (energy_distance_pairs(&p, &q, 1), energy_distance(&p, &q, 1));
        assert!((exact - fast).abs() < 1e-12, "1-D: pairs {exact}, sorted {fast}");
    }

    #[test]
    fn mmd_is_the_same_bits_at_any_thread_count_and_on_every_run() {
        let d = 2;
        let (x, y) = (gaussian(700, d, 0.0, 11), gaussian(600, d, 0.5, 12));
        let at = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| mmd2_rbf(&x, &y, d, &MMD_BANDWIDTHS))
        };
        let one = at(1);
        for threads in [2, 3, 4, 2, 3, 4] {
            assert_eq!(at(threads).to_bits(), one.to_bits(), "{threads} threads");
        }
    }

    #[test]
    fn mmd_matches_closed_form_for_gaussians() {
        // For N(μ_x, I) and N(μ_y, I) in d dims and kernel exp(−r²/2h²):
        // E k(X, Y) = (h²/(h² + 2))^{d/2} exp(−‖Δ‖²/(2(h² + 2))).
        let (d, h) = (2usize, 1.0f64);
        let ek = |delta2: f64| (h * h / (h * h + 2.0)).powf(d as f64 / 2.0) * (-delta2 / (2.0 * (h * h + 2.0))).exp();
        let exact = 2.0 * ek(0.0) - 2.0 * ek(1.0);
        let est = mmd2_rbf(&gaussian(3000, d, 0.0, 5), &gaussian(3000, d, 1.0, 6), d, &[h]);
        assert!((est - exact).abs() < 0.01, "mmd² {est}, exact {exact}");
        let same = mmd2_rbf(
            &gaussian(2000, d, 0.0, 7),
            &gaussian(2000, d, 0.0, 8),
            d,
            &MMD_BANDWIDTHS,
        );
        assert!(same.abs() < 5e-3, "same law gives {same}");
    }

    #[test]
    fn sliced_w2_matches_mean_shift() {
        // Shifting N(0, I) by Δ: W2²(θ·X, θ·Y) = (θ·Δ)², averaged over the sphere: ‖Δ‖²/d.
        let d = 2;
        let x = gaussian(20_000, d, 0.0, 9);
        let y: Vec<f64> = x
            .iter()
            .enumerate()
            .map(|(i, v)| v + if i % d == 0 { 2.0 } else { 0.0 })
            .collect();
        let est = sliced_w2(&x, &y, d, 512, 1);
        let exact = (4.0f64 / d as f64).sqrt();
        assert!((est - exact).abs() < 0.05, "sliced W2 {est}, exact {exact}");
    }

    #[test]
    fn checkerboard_kl_is_small_on_the_board_and_large_off_it() {
        let on = Toy::Checkerboard.sample(50_000, &mut Rng::new(1));
        let kl_on = checkerboard_kl(&on, 32);
        assert!(kl_on < 0.02, "KL of true samples {kl_on}");
        let off = gaussian(50_000, 2, 0.0, 2);
        let kl_off = checkerboard_kl(&off, 32);
        assert!(kl_off > 0.3, "KL of a Gaussian {kl_off}");
    }
}
