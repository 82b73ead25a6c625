//! The backward pass flowmap builds on: candle-core with the patch in `vendor/candle-core` (the first
//! gradient reaching a node is stored, later ones are added to it). The sums over fan-in, gradients that
//! reach a node through a strided view, and nodes reached twice through different ops.

use candle_core::{Device, Tensor, Var};

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn gradients_sum_over_every_consumer_and_come_back_contiguous() {
    let dev = Device::Cpu;
    let (xs, ws) = ([[1f32, -2., 3.], [0.5, 4., -1.]], [[2f32, 3.], [-1., 5.], [7., 0.25]]);
    let x = Var::from_tensor(&Tensor::new(&xs, &dev).unwrap()).unwrap();
    let w = Tensor::new(&ws, &dev).unwrap();
    // One consumer through a transpose (a strided gradient), one elementwise, one through a sum of rows:
    // d/dx [Σ xᵀ ⊙ w + Σ 2x + Σ_j (Σ_i x_ij)²] = wᵀ + 2 + 2·colsum(x).
    let a = (x.t().unwrap() * &w).unwrap().sum_all().unwrap();
    let b = (x.as_tensor() * 2.0).unwrap().sum_all().unwrap();
    let c = x.sum(0).unwrap().sqr().unwrap().sum_all().unwrap();
    let loss = ((a + b).unwrap() + c).unwrap();
    let grads = loss.backward().unwrap();
    let g = grads.get(&x).expect("a gradient for x");
    assert!(g.is_contiguous());
    let colsum = |j: usize| xs[0][j] + xs[1][j];
    let want: Vec<f32> = (0..2)
        .flat_map(|i| (0..3).map(move |j| (i, j)))
        .map(|(i, j)| ws[j][i] + 2.0 + 2.0 * colsum(j))
        .collect();
    assert_eq!(values(g), want);
}

#[test]
fn a_single_consumer_gets_exactly_its_gradient() {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::new(&[0.5f32, -1.5, 2.0, -0.0], &dev).unwrap()).unwrap();
    // y = 3x: the gradient 3 everywhere.
    let loss = (x.as_tensor() * 3.0).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    assert_eq!(values(grads.get(&x).unwrap()), vec![3.0; 4]);
    // Reached twice by the same add: both sides of `x + x` count.
    let loss = (x.as_tensor() + x.as_tensor()).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    assert_eq!(values(grads.get(&x).unwrap()), vec![2.0; 4]);
}

/// What the patch changes, and so what shows it is in the build: a first gradient of `−0.0` is stored as it
/// came, where adding it into a tensor of zeros gave `+0.0` (`0 + (−0) = +0`).
#[test]
fn a_first_gradient_is_stored_not_added_into_zeros() {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::new(&[1f32, 2.0], &dev).unwrap()).unwrap();
    let c = Tensor::new(&[-0.0f32, 3.0], &dev).unwrap();
    let grads = (x.as_tensor() * &c).unwrap().sum_all().unwrap().backward().unwrap();
    let g = values(grads.get(&x).unwrap());
    assert_eq!(g, vec![0.0, 3.0]);
    assert!(g[0].is_sign_negative(), "the gradient ∂(x·c)/∂x = c keeps c's −0.0");
}
