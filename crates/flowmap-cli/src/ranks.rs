//! Data-parallel launches: `mpirun -np N flowmap teacher|distill|train …` runs one rank per process (a
//! build with `--features mpi`; on GPUs, `--features nccl,mpi` and `--device cuda`). Every rank trains its
//! block of each batch ([`flowmap::dist`]); rank 0 shows progress, prints and writes every file.

use anyhow::Result;
use candle_core::Device;
use flowmap::dist::Collective;

/// The MPI ranks this process was launched among, and the transport its gradients are averaged by: MPI
/// on CPUs, NCCL on GPUs (a build with `--features nccl,mpi`).
pub struct Ranks {
    #[cfg(feature = "mpi")]
    mpi: flowmap::dist::mpi::Mpi,
    #[cfg(all(feature = "nccl", feature = "mpi"))]
    nccl: Option<flowmap::dist::nccl::Nccl>,
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
                #[cfg(all(feature = "nccl", feature = "mpi"))]
                nccl: None,
            }))
        }
        #[cfg(not(feature = "mpi"))]
        anyhow::bail!(
            "this flowmap was started as one of {n} MPI ranks, but it was built without MPI (build it with `cargo build --release --features mpi`)"
        )
    }

    /// This rank's device for `--device spec`: the CPU, or with `cuda` the GPU numbered by this rank's
    /// place on its machine (every rank its own), joined to the others by NCCL. The same error on every
    /// rank where the launch cannot run.
    pub fn device(&mut self, spec: &str) -> Result<Device> {
        let refuse = |why: String| -> Result<Device> { Err(flowmap::Error::Ranks(why).into()) };
        match spec.split_once(':').map_or(spec, |(kind, _)| kind) {
            "cpu" => Ok(flowmap::parse_device(spec)?),
            "cuda" if spec != "cuda" => refuse(format!(
                "--device {spec} names one GPU for every rank; under mpirun name `--device cuda`, and each rank takes the GPU numbered by its place on its machine"
            )),
            "cuda" => self.join_gpus(),
            _ => refuse(format!(
                "data-parallel runs take --device cpu or cuda, not '{spec}'"
            )),
        }
    }

    #[cfg(all(feature = "nccl", feature = "mpi"))]
    fn join_gpus(&mut self) -> Result<Device> {
        let device = flowmap::parse_device(&format!("cuda:{}", self.mpi.local_rank()))?;
        self.nccl = Some(flowmap::dist::nccl::Nccl::init(&self.mpi, &device)?);
        Ok(device)
    }

    #[cfg(not(all(feature = "nccl", feature = "mpi")))]
    fn join_gpus(&mut self) -> Result<Device> {
        Err(flowmap::Error::Ranks(
            "this flowmap has no NCCL, which data-parallel runs on GPUs take (build it with `cargo build --release --features nccl,mpi`)".into(),
        )
        .into())
    }

    pub fn collective(&self) -> &dyn Collective {
        #[cfg(all(feature = "nccl", feature = "mpi"))]
        if let Some(n) = &self.nccl {
            return n;
        }
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
