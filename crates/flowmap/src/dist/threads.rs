//! Ranks as threads of one process: the [`Collective`] that tests data parallelism without MPI.

use std::sync::{Arc, Barrier, Mutex};

use super::Collective;
use crate::{Error, Result};

/// What the ranks of one group share: a barrier and one slot per rank.
struct Shared {
    barrier: Barrier,
    f32s: Mutex<Vec<Vec<f32>>>,
    f64s: Mutex<Vec<Vec<f64>>>,
    bytes: Mutex<Vec<u8>>,
}

/// One rank of a group of threads ([`Threads::group`]); each thread of the run owns one.
///
/// A sum is taken in rank order by every rank from the same slots, so every rank gets the same bits.
pub struct Threads {
    rank: usize,
    world: usize,
    shared: Arc<Shared>,
}

impl Threads {
    /// The `world` ranks of a new group, in rank order: hand rank `r` to the thread that runs rank `r`.
    pub fn group(world: usize) -> Vec<Threads> {
        let world = world.max(1);
        let shared = Arc::new(Shared {
            barrier: Barrier::new(world),
            f32s: Mutex::new(vec![Vec::new(); world]),
            f64s: Mutex::new(vec![Vec::new(); world]),
            bytes: Mutex::new(Vec::new()),
        });
        (0..world)
            .map(|rank| Threads {
                rank,
                world,
                shared: shared.clone(),
            })
            .collect()
    }
}

fn poisoned<T>(_: T) -> Error {
    Error::arg("a rank of the thread group panicked")
}

/// Deposits this rank's `buf`, waits for every rank, sums the slots in rank order into `buf`, and waits
/// again so that no slot is overwritten while another rank still reads it.
fn reduce<T: Copy + std::ops::AddAssign>(
    rank: usize,
    barrier: &Barrier,
    slots: &Mutex<Vec<Vec<T>>>,
    buf: &mut [T],
) -> Result<()> {
    slots.lock().map_err(poisoned)?[rank] = buf.to_vec();
    barrier.wait();
    {
        let slots = slots.lock().map_err(poisoned)?;
        if slots.iter().any(|s| s.len() != buf.len()) {
            return Err(Error::arg("the ranks reduced buffers of different lengths"));
        }
        buf.copy_from_slice(&slots[0]);
        for s in &slots[1..] {
            for (b, v) in buf.iter_mut().zip(s) {
                *b += *v;
            }
        }
    }
    barrier.wait();
    Ok(())
}

impl Collective for Threads {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        reduce(self.rank, &self.shared.barrier, &self.shared.f32s, buf)
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        reduce(self.rank, &self.shared.barrier, &self.shared.f64s, buf)
    }
    fn broadcast(&self, bytes: &mut Vec<u8>) -> Result<()> {
        if self.rank == 0 {
            *self.shared.bytes.lock().map_err(poisoned)? = bytes.clone();
        }
        self.shared.barrier.wait();
        if self.rank != 0 {
            *bytes = self.shared.bytes.lock().map_err(poisoned)?.clone();
        }
        self.shared.barrier.wait();
        Ok(())
    }
}
