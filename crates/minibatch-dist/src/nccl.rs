//! [`Nccl`]: a process group over NCCL for CUDA tensors, set up over MPI.

use std::sync::{Arc, Mutex};

use candle_core::cuda_backend::cudarc::driver::CudaViewMut;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, NcclType, ReduceOp as NcclOp};
use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice};
use candle_core::{CpuStorage, Device, InplaceOp1, Layout, Tensor};

use crate::error::{DistError, Result};
use crate::group::{check_root, Buffer, ProcessGroup, ReduceOp};
use crate::mpi::Mpi;
use crate::tensor::unsupported;

/// NCCL between the GPUs of the ranks, one GPU a rank: CUDA tensors are
/// all-reduced and broadcast by NCCL on the device's stream (in place, in
/// order with candle's own kernels); host slices, barriers and all-gathers go
/// over the [`Mpi`] group that set it up.
///
/// Set up as Horovod does: rank 0 draws the NCCL unique id and broadcasts it
/// over MPI, then every rank joins the communicator with its rank.
pub struct Nccl {
    comm: Mutex<Comm>,
    mpi: Arc<Mpi>,
    device: Device,
}

// SAFETY: the NCCL communicator is only used while holding the `comm`
// mutex, so no two threads call NCCL on it at once (NCCL allows a
// communicator to be used from any thread when calls are serialized);
// `Mpi` is Send + Sync itself.
unsafe impl Send for Nccl {}
// SAFETY: as for `Send`.
unsafe impl Sync for Nccl {}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nccl")
            .field("rank", &self.mpi.rank())
            .field("world_size", &self.mpi.world_size())
            .field("device", &self.device)
            .finish()
    }
}

fn nccl_err(e: impl std::fmt::Debug) -> DistError {
    DistError::Backend {
        backend: "nccl",
        message: format!("{e:?}"),
    }
}

impl Nccl {
    /// NCCL over the GPU `cuda:local_rank` of each rank (one GPU per rank
    /// on each machine).
    pub fn init(mpi: Arc<Mpi>) -> Result<Arc<Nccl>> {
        let device = Device::new_cuda(mpi.local_rank())?;
        Self::with_device(mpi, &device)
    }

    /// NCCL over `device` (a CUDA device; each rank its own).
    pub fn with_device(mpi: Arc<Mpi>, device: &Device) -> Result<Arc<Nccl>> {
        let Device::Cuda(cuda) = device else {
            return Err(DistError::Backend {
                backend: "nccl",
                message: format!("NCCL needs a CUDA device, got {:?}", device.location()),
            });
        };
        let mut id = [0u8; 128];
        if mpi.rank() == 0 {
            let fresh = Id::new().map_err(nccl_err)?;
            for (d, s) in id.iter_mut().zip(fresh.internal()) {
                *d = *s as u8;
            }
        }
        mpi.broadcast_bytes(&mut id, 0)?;
        let id = Id::uninit(id.map(|b| b as std::ffi::c_char));
        let comm = Comm::from_rank(cuda.cuda_stream(), mpi.rank(), mpi.world_size(), id)
            .map_err(nccl_err)?;
        Ok(Arc::new(Nccl {
            comm: Mutex::new(comm),
            mpi,
            device: device.clone(),
        }))
    }

    /// This rank's GPU.
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn run(&self, tensor: &Tensor, what: What) -> Result<()> {
        if tensor.device().is_cpu() {
            return match what {
                What::Reduce(op) => self.mpi.all_reduce_tensor(tensor, op),
                What::Broadcast(root) => self.mpi.broadcast_tensor(tensor, root as usize),
            };
        }
        if !tensor.device().is_cuda() || !tensor.is_contiguous() {
            return Err(unsupported(tensor, "NCCL needs a contiguous CUDA tensor"));
        }
        let comm = self.comm.lock().unwrap_or_else(|p| p.into_inner());
        tensor.inplace_op1(&NcclInPlace { comm: &comm, what })?;
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum What {
    Reduce(ReduceOp),
    Broadcast(i32),
}

struct NcclInPlace<'a> {
    comm: &'a Comm,
    what: What,
}

impl NcclInPlace<'_> {
    fn go<T: NcclType>(&self, view: &mut CudaViewMut<'_, T>) -> candle_core::Result<()> {
        let done = match self.what {
            What::Reduce(ReduceOp::Sum) => self.comm.all_reduce_in_place(view, &NcclOp::Sum),
            What::Reduce(ReduceOp::Mean) => self.comm.all_reduce_in_place(view, &NcclOp::Avg),
            What::Broadcast(root) => self.comm.broadcast_in_place(view, root),
        };
        done.map(|_| ())
            .map_err(|e| candle_core::Error::Msg(format!("NCCL: {e:?}")))
    }
}

impl InplaceOp1 for NcclInPlace<'_> {
    fn name(&self) -> &'static str {
        "minibatch-dist-nccl"
    }
    fn cpu_fwd(&self, _storage: &mut CpuStorage, _layout: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("minibatch-dist: NCCL works on CUDA tensors")
    }
    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> candle_core::Result<()> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("minibatch-dist: the tensor is not contiguous")
        };
        match &mut storage.slice {
            CudaStorageSlice::F32(x) => self.go(&mut x.slice_mut(start..end)),
            CudaStorageSlice::F64(x) => self.go(&mut x.slice_mut(start..end)),
            CudaStorageSlice::BF16(x) => self.go(&mut x.slice_mut(start..end)),
            CudaStorageSlice::F16(x) => self.go(&mut x.slice_mut(start..end)),
            _ => candle_core::bail!("minibatch-dist: NCCL reduces f32, f64, bf16 and f16 tensors"),
        }
    }
}

impl ProcessGroup for Nccl {
    fn rank(&self) -> usize {
        self.mpi.rank()
    }
    fn world_size(&self) -> usize {
        self.mpi.world_size()
    }
    fn local_size(&self) -> usize {
        self.mpi.local_size()
    }
    fn backend(&self) -> &'static str {
        "nccl"
    }
    fn all_reduce(&self, buf: Buffer<'_>, op: ReduceOp) -> Result<()> {
        self.mpi.all_reduce(buf, op)
    }
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        self.mpi.broadcast_bytes(buf, root)
    }
    fn barrier(&self) -> Result<()> {
        self.mpi.barrier()
    }
    fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>> {
        self.mpi.all_gather_u64(value)
    }
    fn all_reduce_tensor(&self, tensor: &Tensor, op: ReduceOp) -> Result<()> {
        self.run(tensor, What::Reduce(op))
    }
    fn broadcast_tensor(&self, tensor: &Tensor, root: usize) -> Result<()> {
        check_root(root, self.world_size())?;
        self.run(tensor, What::Broadcast(root as i32))
    }
    fn abort(&self, code: i32) -> ! {
        self.mpi.abort(code)
    }
}
