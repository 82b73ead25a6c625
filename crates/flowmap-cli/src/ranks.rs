//! Data-parallel launches: `mpirun -np N flowmap teacher|distill|train …` runs one rank per process (a
//! build with `--features mpi`). Every rank trains its block of each batch ([`flowmap::dist`]); rank 0
//! shows progress, prints and writes every file.

use anyhow::Result;
use flowmap::dist::Collective;

/// The MPI ranks this process was launched among.
pub struct Ranks {
    #[cfg(feature = "mpi")]
    mpi: flowmap::dist::mpi::Mpi,
    #[cfg(not(feature = "mpi"))]
    never: std::convert::Infallible,
}

/// An error that every rank of a data-parallel run returned together: rank 0 prints it, the others end
/// quietly with a failure status.
#[derive(Debug)]
pub struct Quiet;

impl std::fmt::Display for Quiet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("(reported by rank 0)")
    }
}

impl std::error::Error for Quiet {}

impl Ranks {
    /// The ranks of this launch: `None` for a single process (no launcher, or a launcher's one rank).
    pub fn from_launch() -> Result<Option<Ranks>> {
        let Some(n) = flowmap::dist::launcher_world_size().filter(|&n| n > 1) else {
            return Ok(None);
        };
        #[cfg(feature = "mpi")]
        {
            let _ = n;
            Ok(Some(Ranks {
                mpi: flowmap::dist::mpi::Mpi::init()?,
            }))
        }
        #[cfg(not(feature = "mpi"))]
        anyhow::bail!(
            "this flowmap was started as one of {n} MPI ranks, but it was built without MPI (build it with `cargo build --release --features mpi`)"
        )
    }

    pub fn collective(&self) -> &dyn Collective {
        #[cfg(feature = "mpi")]
        return &self.mpi;
        #[cfg(not(feature = "mpi"))]
        match self.never {}
    }

    pub fn rank(&self) -> usize {
        self.collective().rank()
    }

    /// Ends every rank of the job, after this rank's own error (the others may be waiting for it).
    pub fn abort(&self, code: i32) -> ! {
        #[cfg(feature = "mpi")]
        self.mpi.abort(code);
        #[cfg(not(feature = "mpi"))]
        {
            let _ = code;
            match self.never {}
        }
    }
}

/// The rank of `ranks` (0 for a single process).
pub fn rank_of(ranks: Option<&Ranks>) -> usize {
    ranks.map_or(0, Ranks::rank)
}

/// Whether `e` is one every rank returns at the same point (so that rank 0's message is the job's).
pub fn is_collective(e: &anyhow::Error) -> bool {
    e.is::<Quiet>()
        || e.is::<crate::supervise::Interrupted>()
        || matches!(
            e.downcast_ref::<flowmap::Error>(),
            Some(flowmap::Error::Ranks(_) | flowmap::Error::Diverged { .. })
        )
}
