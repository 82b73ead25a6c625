//! NCCL between GPUs (the `nccl` and `mpi` features; candle-core's `nccl`, through cudarc): one process per GPU,
//! launched by `mpirun` as for CPUs. MPI starts the job, carries NCCL's unique id from rank 0 to the
//! others and does the small host-side collectives (losses, flags, the launch checks); the gradients are
//! averaged by NCCL in device memory, where the backward pass left them.

use candle_core::cuda::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use super::mpi::Mpi;
use super::{all_reduce_mean_on_host, Collective};
use crate::{Error, Result};

/// The ranks of a multi-GPU job: MPI for the job and the host, an NCCL communicator for the devices.
pub struct Nccl {
    // Dropped first: the communicator is aborted before MPI is finalised.
    comm: Comm,
    device: Device,
    mpi: Mpi,
}

impl Nccl {
    /// Joins every rank of `mpi` in an NCCL communicator on `device`, this rank's GPU (each rank its own).
    /// Every rank calls it together.
    pub fn init(mpi: &Mpi, device: &Device) -> Result<Nccl> {
        let mpi = mpi.duplicate();
        let cuda = device
            .as_cuda_device()
            .map_err(|_| Error::arg(format!("NCCL needs a CUDA device, not {device:?}")))?;
        let id = if mpi.rank() == 0 {
            Some(Id::new().map_err(|e| Error::Transport(format!("NCCL could not make its unique id: {e:?}")))?)
        } else {
            None
        };
        let mut bytes: Vec<u8> = id.map_or_else(Vec::new, |id| id.internal().iter().map(|&c| c as u8).collect());
        mpi.broadcast(&mut bytes)?;
        let internal: [std::ffi::c_char; 128] = bytes
            .iter()
            .map(|&b| b as std::ffi::c_char)
            .collect::<Vec<_>>()
            .try_into()
            .map_err(|_| Error::Transport(format!("NCCL's unique id came as {} bytes, not 128", bytes.len())))?;
        let comm = Comm::from_rank(cuda.cuda_stream(), mpi.rank(), mpi.world(), Id::uninit(internal)).map_err(|e| {
            Error::Transport(format!(
                "NCCL could not join rank {} of {}: {e:?}",
                mpi.rank(),
                mpi.world()
            ))
        })?;
        Ok(Nccl {
            comm,
            device: device.clone(),
            mpi,
        })
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.mpi.rank()
    }
    fn world(&self) -> usize {
        self.mpi.world()
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        self.mpi.all_reduce_sum(buf)
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.mpi.all_reduce_sum_f64(buf)
    }
    fn broadcast(&self, bytes: &mut Vec<u8>) -> Result<()> {
        self.mpi.broadcast(bytes)
    }

    /// On this rank's GPU, one NCCL all-reduce (sum) and a scale by `1/world`. NCCL leaves identical
    /// copies of the sum on every rank, so every rank steps its optimiser on the same bits; the order of
    /// the sum follows NCCL's algorithm and the topology, so two different machines may round differently.
    fn all_reduce_mean_tensor(&self, flat: &Tensor) -> Result<Tensor> {
        if !flat.device().same_device(&self.device) {
            return all_reduce_mean_on_host(self, flat);
        }
        // Whatever fails inside the op (NCCL, or the allocation it writes to) is this rank's transport failing.
        let sum = flat
            .to_dtype(DType::F32)?
            .contiguous()?
            .apply_op1_no_bwd(&SumOp(&self.comm))
            .map_err(|e| Error::Transport(format!("NCCL's all-reduce failed on rank {}: {e}", self.rank())))?;
        Ok(sum.affine(1.0 / self.world() as f64, 0.0)?)
    }
}

/// An NCCL sum over the ranks as a candle op on a contiguous f32 vector.
struct SumOp<'a>(&'a Comm);

impl CustomOp1 for SumOp<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce-sum"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the NCCL all-reduce runs on CUDA tensors only")
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let n = layout.shape().elem_count();
        let src = storage.as_cuda_slice::<f32>()?;
        let src = match layout.contiguous_offsets() {
            Some((lo, hi)) if hi - lo == n => src.slice(lo..hi),
            _ => candle_core::bail!("the NCCL all-reduce takes a contiguous vector"),
        };
        let device = storage.device.clone();
        // SAFETY: every element of `dst` is written by the all-reduce before it is read.
        let mut dst = unsafe { device.alloc::<f32>(n)? };
        self.0
            .all_reduce(&src, &mut dst, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::Msg(format!("{e:?}")))?;
        Ok((CudaStorage::wrap_cuda_slice(dst, device), layout.shape().clone()))
    }
}
