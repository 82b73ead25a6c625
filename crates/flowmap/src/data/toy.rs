//! Seeded 2-D toy distributions, the standard test beds of flow-matching papers.

use std::fmt;
use std::str::FromStr;

use crate::{Error, Rng};

/// A 2-D toy distribution that can be sampled without limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Toy {
    /// A 4×4 board on [−2, 2]², uniform on the 8 squares whose integer corner sum is even (density 1/8 there).
    Checkerboard,
    /// Two interleaved half circles with Gaussian noise (std 0.05 before scaling).
    Moons,
    /// Eight Gaussians of std 0.1 centred on the circle of radius 2.
    EightGaussians,
    /// Two interleaved Archimedean spirals.
    Spirals,
    /// Four concentric rings of radii 0.5, 1, 1.5 and 2.
    Rings,
    /// The 2-D Swiss roll.
    SwissRoll,
}

impl Toy {
    pub const ALL: [Toy; 6] = [
        Toy::Checkerboard,
        Toy::Moons,
        Toy::EightGaussians,
        Toy::Spirals,
        Toy::Rings,
        Toy::SwissRoll,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Toy::Checkerboard => "checkerboard",
            Toy::Moons => "moons",
            Toy::EightGaussians => "8gaussians",
            Toy::Spirals => "spirals",
            Toy::Rings => "rings",
            Toy::SwissRoll => "swissroll",
        }
    }

    /// One point of the distribution.
    pub fn sample_point(self, rng: &mut Rng) -> [f64; 2] {
        use std::f64::consts::PI;
        match self {
            Toy::Checkerboard => {
                let x = 4.0 * rng.uniform() - 2.0;
                let col = x.floor() as i64; // −2..=1
                                            // rows r in −2..=1 with (col + r) even: two choices.
                let first = if col.rem_euclid(2) == 0 { -2 } else { -1 };
                let row = first + 2 * rng.below(2) as i64;
                [x, row as f64 + rng.uniform()]
            }
            Toy::Moons => {
                let theta = PI * rng.uniform();
                let (x, y) = if rng.below(2) == 0 {
                    (theta.cos(), theta.sin())
                } else {
                    (1.0 - theta.cos(), 0.5 - theta.sin())
                };
                [
                    1.5 * (x - 0.5 + 0.05 * rng.normal()),
                    1.5 * (y - 0.25 + 0.05 * rng.normal()),
                ]
            }
            Toy::EightGaussians => {
                let k = rng.below(8) as f64;
                let a = k * PI / 4.0;
                [2.0 * a.cos() + 0.1 * rng.normal(), 2.0 * a.sin() + 0.1 * rng.normal()]
            }
            Toy::Spirals => {
                let n = rng.uniform().sqrt() * 3.0 * PI;
                let sign = if rng.below(2) == 0 { 1.0 } else { -1.0 };
                let x = sign * (-n.cos() * n) + 0.5 * rng.uniform();
                let y = sign * (n.sin() * n) + 0.5 * rng.uniform();
                [x / 3.0, y / 3.0]
            }
            Toy::Rings => {
                let r = 0.5 * (1 + rng.below(4)) as f64;
                let a = 2.0 * PI * rng.uniform();
                [r * a.cos() + 0.03 * rng.normal(), r * a.sin() + 0.03 * rng.normal()]
            }
            Toy::SwissRoll => {
                let t = 1.5 * PI * (1.0 + 2.0 * rng.uniform());
                [
                    t * t.cos() / 5.0 + 0.05 * rng.normal(),
                    t * t.sin() / 5.0 + 0.05 * rng.normal(),
                ]
            }
        }
    }

    /// `n` points, row-major `n × 2`.
    pub fn sample(self, n: usize, rng: &mut Rng) -> Vec<f64> {
        let mut out = Vec::with_capacity(2 * n);
        for _ in 0..n {
            out.extend_from_slice(&self.sample_point(rng));
        }
        out
    }

    /// The checkerboard's density on [−2, 2]² (1/8 on the filled squares, 0 elsewhere); `None` for the others.
    pub fn checkerboard_density(x: f64, y: f64) -> f64 {
        if !(-2.0..2.0).contains(&x) || !(-2.0..2.0).contains(&y) {
            return 0.0;
        }
        if (x.floor() as i64 + y.floor() as i64).rem_euclid(2) == 0 {
            0.125
        } else {
            0.0
        }
    }
}

impl fmt::Display for Toy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Toy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Toy::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| Error::data(format!("unknown toy distribution '{s}'")))
    }
}
