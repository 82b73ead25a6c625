//! MPI ranks (the `mpi` feature, through the `mpi` crate): one process per rank, launched by `mpirun`.

use mpi::collective::{Root, SystemOperation};
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::Equivalence;

use super::Collective;
use crate::{Error, Result};

/// The MPI world of this process. Created once per process ([`Mpi::init`]); dropping it finalises MPI.
///
/// A sum is reduced to rank 0 and broadcast from there, so every rank gets rank 0's bits (an
/// all-reduce may sum in a different order on each rank); for a fixed world size the library's
/// reduction order is fixed, so a run repeats itself bit for bit.
pub struct Mpi {
    world: SimpleCommunicator,
    // Shared by the copies ([`Mpi::duplicate`]): MPI is finalised when the last one is dropped.
    _universe: std::rc::Rc<mpi::environment::Universe>,
}

impl Mpi {
    /// Initialises MPI for this process.
    pub fn init() -> Result<Mpi> {
        let universe = mpi::initialize().ok_or_else(|| Error::arg("MPI was initialised twice in this process"))?;
        Ok(Mpi {
            world: universe.world(),
            _universe: std::rc::Rc::new(universe),
        })
    }

    /// A second handle on the same ranks with a communicator of its own (MPI_Comm_dup: every rank calls
    /// it together), so that a transport built over MPI keeps its traffic apart.
    pub fn duplicate(&self) -> Mpi {
        Mpi {
            world: self.world.duplicate(),
            _universe: self._universe.clone(),
        }
    }

    /// This rank's number among the ranks on its own machine (0, 1, … on each node): the GPU it takes.
    pub fn local_rank(&self) -> usize {
        self.world.split_shared(self.world.rank()).rank() as usize
    }

    /// Ends every rank of the job at once with `code` (MPI_Abort): what a rank that failed calls, so that
    /// the others do not wait for it in a collective operation.
    pub fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }

    fn sum<T: Equivalence + Copy + Default>(&self, buf: &mut [T]) -> Result<()> {
        let root = self.world.process_at_rank(0);
        if self.world.rank() == 0 {
            let mut out = vec![T::default(); buf.len()];
            root.reduce_into_root(&*buf, &mut out[..], SystemOperation::sum());
            buf.copy_from_slice(&out);
        } else {
            root.reduce_into(&*buf, SystemOperation::sum());
        }
        root.broadcast_into(buf);
        Ok(())
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }
    fn world(&self) -> usize {
        self.world.size() as usize
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        self.sum(buf)
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.sum(buf)
    }
    fn broadcast(&self, bytes: &mut Vec<u8>) -> Result<()> {
        let root = self.world.process_at_rank(0);
        let mut len = [bytes.len() as u64];
        root.broadcast_into(&mut len[..]);
        bytes.resize(len[0] as usize, 0);
        root.broadcast_into(&mut bytes[..]);
        Ok(())
    }
}
