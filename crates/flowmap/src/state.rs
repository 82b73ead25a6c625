//! States of any shape: a batch is a `B × …` tensor (points `B × D`, images `B × C × H × W`) and times are
//! `B × 1` columns. These helpers broadcast a time column over a state and reduce a state per row, over
//! every non-batch axis. On `B × D` points they are the identity and a plain `keepdim(1)` reduction, so
//! the 2-D numbers are the same to the last bit.

use candle_core::Tensor;

use crate::Result;

/// A `B × 1` column (or `B`-vector) reshaped to `B × 1 × … × 1`, to broadcast over states shaped like `like`.
pub fn per_row(col: &Tensor, like: &Tensor) -> Result<Tensor> {
    let rank = like.rank();
    if rank <= 2 && col.rank() == 2 {
        return Ok(col.clone());
    }
    let mut dims = vec![1usize; rank.max(2)];
    dims[0] = col.dim(0)?;
    Ok(col.reshape(dims)?)
}

/// A state flattened to `B × N` (no copy on `B × D` points).
pub fn rows(x: &Tensor) -> Result<Tensor> {
    if x.rank() == 2 {
        return Ok(x.clone());
    }
    Ok(x.flatten_from(1)?)
}

/// The per-row mean over every non-batch axis: `B × 1`.
pub fn row_mean(x: &Tensor) -> Result<Tensor> {
    Ok(rows(x)?.mean_keepdim(1)?)
}

/// The per-row sum over every non-batch axis: `B × 1`.
pub fn row_sum(x: &Tensor) -> Result<Tensor> {
    Ok(rows(x)?.sum_keepdim(1)?)
}

/// The shape of a batch of `n` states of shape `state`: `[n, state…]`.
pub fn batch_shape(n: usize, state: &[usize]) -> Vec<usize> {
    let mut dims = Vec::with_capacity(state.len() + 1);
    dims.push(n);
    dims.extend_from_slice(state);
    dims
}

/// The number of values in one state.
pub fn numel(state: &[usize]) -> usize {
    state.iter().product()
}
