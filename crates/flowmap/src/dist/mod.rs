//! Data-parallel training: one process (a rank) per device, the global batch split across ranks.
//!
//! Every rank draws the whole global batch's randomness from the same seeded stream (data, labels and
//! their dropout, noise, the objective's times), so the rows are those of one process with the same seed,
//! and keeps its own contiguous block of rows ([`Shard`]). Each rank's loss is the mean over its rows;
//! after the backward pass the gradients are averaged over the ranks ([`Collective::all_reduce_sum`],
//! in flat buckets), which with equal blocks is the gradient of the global mean. The optimiser, the EMA,
//! the rollback guard and the checkpoint schedule then run identically on every rank: every rank holds
//! the same parameters, bit for bit, and rank 0 writes the files.
//!
//! A 2-rank run matches a 1-rank run to f32 summation order, not to the bit: the global mean's gradient
//! is summed as two half-batch sums instead of one (the forward values of every row are the same bits).
//!
//! The transport is a [`Collective`]: MPI (the `mpi` feature, [`mpi::Mpi`]) across processes and
//! machines on CPUs; NCCL (the `nccl` and `mpi` features, `nccl::Nccl`) between GPUs, the gradients reduced where
//! they are, on the device; or [`Threads`], ranks as threads of one process, for tests.

#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(all(feature = "nccl", feature = "mpi"))]
pub mod nccl;
mod threads;

use std::ops::Range;

use candle_core::Tensor;
pub use threads::Threads;

use crate::{Error, Result};

/// The values in one bucket of a gradient reduction on the host (16 MB of f32).
pub const BUCKET: usize = 1 << 22;

/// The ranks of a data-parallel run and the collective operations between them. Every rank calls the
/// same operations in the same order; each returns the same bits on every rank.
pub trait Collective {
    /// This process's rank, `0..world`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn world(&self) -> usize;
    /// Replaces `buf` by its elementwise sum over the ranks, the same bits on every rank (summed in an
    /// order that depends on the world size alone).
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    /// [`Collective::all_reduce_sum`] in f64 (losses and flags).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Replaces `bytes` on every rank by rank 0's.
    fn broadcast(&self, bytes: &mut Vec<u8>) -> Result<()>;
    /// The mean over the ranks of the f32 vector `flat`, on `flat`'s device, the same bits on every rank.
    /// By default it is averaged on the host in buckets of [`BUCKET`] values ([`all_reduce_mean`]); a
    /// transport that reduces device memory itself (NCCL) overrides this.
    fn all_reduce_mean_tensor(&self, flat: &Tensor) -> Result<Tensor> {
        all_reduce_mean_on_host(self, flat)
    }
}

/// The block of a global batch that one rank holds: rows `rows` of `global`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shard {
    pub rows: Range<usize>,
    pub global: usize,
}

impl Shard {
    /// The whole batch (one process).
    pub fn whole(global: usize) -> Shard {
        Shard {
            rows: 0..global,
            global,
        }
    }

    /// Rank `rank`'s block of a batch of `global` rows split over `world` ranks: equal blocks, so that
    /// the mean of the ranks' means is the global mean.
    pub fn of(rank: usize, world: usize, global: usize) -> Result<Shard> {
        if world == 0 || rank >= world {
            return Err(Error::arg(format!("rank {rank} of {world} ranks")));
        }
        if !global.is_multiple_of(world) {
            return Err(Error::arg(format!(
                "a batch of {global} rows does not split evenly over {world} ranks (make the batch a multiple of {world})"
            )));
        }
        let n = global / world;
        Ok(Shard {
            rows: rank * n..(rank + 1) * n,
            global,
        })
    }

    /// This rank's rows of a batch split by `collective` (the whole batch without one).
    pub fn for_run(collective: Option<&dyn Collective>, global: usize) -> Result<Shard> {
        match collective {
            Some(c) => Shard::of(c.rank(), c.world(), global),
            None => Ok(Shard::whole(global)),
        }
    }

    /// The number of rows this rank holds.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Whether this shard is the whole batch.
    pub fn is_whole(&self) -> bool {
        self.rows.start == 0 && self.rows.end == self.global
    }

    /// This rank's values of `all`, one value per row of the global batch.
    pub fn local<T: Clone>(&self, all: &[T]) -> Vec<T> {
        debug_assert_eq!(all.len(), self.global);
        all[self.rows.clone()].to_vec()
    }

    /// This rank's part of the global rows `from..self.global` (a trailing block, as the off-diagonal
    /// rows of a pair batch), re-based: rows of `from..` that this rank holds, as a shard of them.
    pub fn tail(&self, from: usize) -> Shard {
        let (lo, hi) = (self.rows.start.max(from), self.rows.end.max(from));
        Shard {
            rows: lo - from..hi - from,
            global: self.global - from,
        }
    }

    /// The number of this rank's rows among the global rows `0..n` (a leading block, as the diagonal rows).
    pub fn count_below(&self, n: usize) -> usize {
        n.clamp(self.rows.start, self.rows.end) - self.rows.start
    }
}

/// The number of ranks an MPI launcher started this process among, read from the launcher's environment
/// before MPI is initialised (Open MPI's `OMPI_COMM_WORLD_SIZE`, MPICH's and Intel MPI's `PMI_SIZE`);
/// `None` outside a launch.
pub fn launcher_world_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.parse().ok())
}

/// Rank 0's value of `text` on every rank, compared with this rank's own: `Ok` when every rank agrees,
/// otherwise the same error on every rank, naming `what` and the first rank that differs.
pub fn check_agreement(c: &dyn Collective, what: &str, text: &str) -> Result<()> {
    let mut root = text.as_bytes().to_vec();
    c.broadcast(&mut root)?;
    let differs = root != text.as_bytes();
    let mut flags = vec![0.0; c.world()];
    flags[c.rank()] = if differs { 1.0 } else { 0.0 };
    c.all_reduce_sum_f64(&mut flags)?;
    match flags.iter().position(|&f| f > 0.0) {
        None => Ok(()),
        Some(r) => Err(Error::Ranks(format!(
            "the ranks disagree on {what}: rank {r}'s differs from rank 0's (launch every rank with the same flags and data)"
        ))),
    }
}

/// Averages `buf` over the ranks in buckets of at most `bucket` values: each bucket is summed across the
/// ranks, then scaled by `1/world`.
pub fn all_reduce_mean<C: Collective + ?Sized>(c: &C, buf: &mut [f32], bucket: usize) -> Result<()> {
    let scale = 1.0 / c.world() as f32;
    for chunk in buf.chunks_mut(bucket.max(1)) {
        c.all_reduce_sum(chunk)?;
        for v in chunk.iter_mut() {
            *v *= scale;
        }
    }
    Ok(())
}

/// [`all_reduce_mean`] of the f32 vector `flat` through the host, in buckets of [`BUCKET`] values, back on
/// `flat`'s device.
pub fn all_reduce_mean_on_host<C: Collective + ?Sized>(c: &C, flat: &Tensor) -> Result<Tensor> {
    let mut host = flat.to_vec1::<f32>()?;
    all_reduce_mean(c, &mut host, BUCKET)?;
    Ok(Tensor::from_vec(host, flat.dims1()?, flat.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_split_a_batch_into_equal_blocks_and_their_parts() {
        let s = Shard::of(1, 4, 8).unwrap();
        assert_eq!(s.rows, 2..4);
        assert_eq!(s.local(&[0, 1, 2, 3, 4, 5, 6, 7]), vec![2, 3]);
        // Three leading (diagonal) rows: rank 1 holds one of them, and the first off-diagonal row.
        assert_eq!(s.count_below(3), 1);
        assert_eq!(s.tail(3), Shard { rows: 0..1, global: 5 });
        // A rank whose rows are all below, or all above, the split.
        assert_eq!(Shard::of(0, 4, 8).unwrap().tail(5).rows, 0..0);
        assert_eq!(Shard::of(3, 4, 8).unwrap().tail(2).rows, 4..6);
        assert_eq!(Shard::of(3, 4, 8).unwrap().count_below(2), 0);
        let e = Shard::of(0, 3, 8).unwrap_err().to_string();
        assert!(e.contains("does not split evenly over 3 ranks"), "{e}");
        assert!(Shard::whole(5).is_whole());
    }
}
