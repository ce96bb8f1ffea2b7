//! [`Mpi`]: a process group over MPI (Open MPI, MPICH) through rsmpi.

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::Tensor;
use half::bf16;
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator, CommunicatorCollectives, Root};
use mpi::Threading;

use crate::error::{DistError, Result};
use crate::group::{as_bytes_mut, check_root, Buffer, ProcessGroup, ReduceOp};
use crate::tensor::with_cpu_buffer;

/// Elements per MPI call: MPI counts are C `int`s.
const MAX_COUNT: usize = 1 << 30;

/// The world of an `mpirun` / `srun` job as a [`ProcessGroup`].
///
/// [`Mpi::init`] initializes MPI once per process; the group lives until the
/// last `Arc` is dropped, which finalizes MPI. rsmpi has no in-place
/// all-reduce, so [`all_reduce`](ProcessGroup::all_reduce) copies the buffer
/// into a send buffer kept by the group (grown once, reused) and receives in
/// place; bf16 is reduced in f32 (MPI has no bf16 type). The
/// [`GradBuckets`](crate::GradBuckets) pack gradients into their own send
/// buffers and skip that copy.
///
/// A panic on any rank, or [`ProcessGroupExt::fail`](crate::ProcessGroupExt::fail),
/// calls `MPI_Abort`: the launcher then ends every rank within seconds,
/// never a hang.
pub struct Mpi {
    scratch: Mutex<Scratch>,
    rank: usize,
    size: usize,
    local_rank: usize,
    local_size: usize,
    world: SimpleCommunicator,
    // dropped last: finalizes MPI
    _universe: Universe,
}

#[derive(Default)]
struct Scratch {
    f32: Vec<f32>,
    f64: Vec<f64>,
    recv_f32: Vec<f32>,
}

// SAFETY: MPI was initialized with at least MPI_THREAD_SERIALIZED (checked in
// `init`), and every MPI call this type makes holds the `scratch` mutex, so
// calls from different threads never run concurrently. The communicator
// handle itself is a plain value that MPI allows any thread to use.
unsafe impl Send for Mpi {}
// SAFETY: as for `Send`: all MPI calls are serialized by the mutex.
unsafe impl Sync for Mpi {}

impl std::fmt::Debug for Mpi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mpi")
            .field("rank", &self.rank)
            .field("world_size", &self.size)
            .field("local_size", &self.local_size)
            .finish()
    }
}

/// Sets Open MPI's MCA variables for the ring all-reduce before `MPI_Init`
/// reads them, unless the user chose otherwise (see [`Mpi::init`]).
fn prefer_ring_allreduce() {
    const DYNAMIC: &str = "OMPI_MCA_coll_tuned_use_dynamic_rules";
    const ALGORITHM: &str = "OMPI_MCA_coll_tuned_allreduce_algorithm";
    let chosen = std::env::var_os(DYNAMIC).is_some() || std::env::var_os(ALGORITHM).is_some();
    let opted_out = std::env::var("MINIBATCH_MPI_ALLREDUCE").is_ok_and(|v| v == "default");
    if !chosen && !opted_out {
        std::env::set_var(DYNAMIC, "1");
        // 4: ring (Open MPI's `coll_tuned` numbering).
        std::env::set_var(ALGORITHM, "4");
    }
}

impl Mpi {
    /// Initializes MPI (once per process: a second call is
    /// [`DistError::Backend`]) and returns the world. Run under `mpirun -np N`
    /// or `srun --mpi=pmix`; started alone, it is a world of one.
    ///
    /// It also installs a panic hook that prints the rank and calls `MPI_Abort`.
    ///
    /// Under Open MPI it asks for the ring all-reduce (reduce-scatter, then
    /// all-gather: each rank sends and adds `2 (N-1)/N` of a bucket) unless
    /// the environment already chooses (`OMPI_MCA_coll_tuned_use_dynamic_rules`
    /// or `OMPI_MCA_coll_tuned_allreduce_algorithm` set) or
    /// `MINIBATCH_MPI_ALLREDUCE=default` leaves it to Open MPI: for the
    /// 25 MB gradient buckets on one node, Open MPI's own pick took 329 ms a
    /// step for the 92 MB of a 23M Llama at 2 ranks, the ring 54 ms
    /// (`benches/ddp.rs`). Open MPI falls back to recursive doubling for
    /// buffers shorter than the world; other MPI libraries ignore these
    /// variables.
    pub fn init() -> Result<Arc<Mpi>> {
        let err = |message: String| DistError::Backend {
            backend: "mpi",
            message,
        };
        prefer_ring_allreduce();
        let (universe, provided) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| err("MPI is already initialized in this process".into()))?;
        if matches!(provided, Threading::Single | Threading::Funneled) {
            return Err(err(format!(
                "the MPI library provides thread level {provided:?}; minibatch-dist needs Serialized"
            )));
        }
        let world = universe.world();
        let rank = world.rank() as usize;
        let size = world.size() as usize;
        let local = world.split_shared(world.rank());
        let (local_rank, local_size) = (local.rank() as usize, local.size() as usize);
        install_abort_on_panic(rank, size);
        Ok(Arc::new(Mpi {
            scratch: Mutex::new(Scratch::default()),
            rank,
            size,
            local_rank,
            local_size,
            world,
            _universe: universe,
        }))
    }

    /// This rank's position among the ranks on its machine (the GPU it takes with NCCL).
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    fn lock(&self) -> MutexGuard<'_, Scratch> {
        // a poisoned lock only means another thread panicked (and aborted the job)
        self.scratch.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sums `send` into `recv` over all ranks, in chunks MPI can count.
    fn sum_into<T: mpi::datatype::Equivalence>(&self, send: &[T], recv: &mut [T]) {
        debug_assert_eq!(send.len(), recv.len());
        for (s, r) in send.chunks(MAX_COUNT).zip(recv.chunks_mut(MAX_COUNT)) {
            self.world.all_reduce_into(s, r, SystemOperation::sum());
        }
    }
}

impl ProcessGroup for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.size
    }
    fn local_size(&self) -> usize {
        self.local_size
    }
    fn backend(&self) -> &'static str {
        "mpi"
    }
    fn all_reduce(&self, mut buf: Buffer<'_>, op: ReduceOp) -> Result<()> {
        let mut s = self.lock();
        let s = &mut *s;
        match &mut buf {
            Buffer::F32(x) => {
                s.f32.clear();
                s.f32.extend_from_slice(x);
                self.sum_into(&s.f32, x);
            }
            Buffer::F64(x) => {
                s.f64.clear();
                s.f64.extend_from_slice(x);
                self.sum_into(&s.f64, x);
            }
            Buffer::BF16(x) => {
                s.f32.clear();
                s.f32.extend(x.iter().map(|v| v.to_f32()));
                s.recv_f32.clear();
                s.recv_f32.resize(x.len(), 0.0);
                self.sum_into(&s.f32, &mut s.recv_f32);
                let w = if op == ReduceOp::Mean {
                    self.size as f32
                } else {
                    1.0
                };
                for (d, v) in x.iter_mut().zip(&s.recv_f32) {
                    *d = bf16::from_f32(v / w);
                }
                return Ok(());
            }
        }
        if op == ReduceOp::Mean {
            buf.divide(self.size);
        }
        Ok(())
    }
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        check_root(root, self.size)?;
        let _guard = self.lock();
        let process = self.world.process_at_rank(root as i32);
        for chunk in buf.chunks_mut(MAX_COUNT) {
            process.broadcast_into(chunk);
        }
        Ok(())
    }
    fn sum_f32_into(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        let _guard = self.lock();
        self.sum_into(send, recv);
        Ok(())
    }
    fn sum_f64_into(&self, send: &[f64], recv: &mut [f64]) -> Result<()> {
        let _guard = self.lock();
        self.sum_into(send, recv);
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        let _guard = self.lock();
        self.world.barrier();
        Ok(())
    }
    fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>> {
        let _guard = self.lock();
        let mut out = vec![0u64; self.size];
        self.world.all_gather_into(&value, &mut out[..]);
        Ok(out)
    }
    fn all_reduce_tensor(&self, tensor: &Tensor, op: ReduceOp) -> Result<()> {
        with_cpu_buffer(tensor, &mut |b| self.all_reduce(b, op))
    }
    fn broadcast_tensor(&self, tensor: &Tensor, root: usize) -> Result<()> {
        check_root(root, self.size)?;
        with_cpu_buffer(tensor, &mut |b| match b {
            Buffer::F32(x) => self.broadcast_bytes(as_bytes_mut(x), root),
            Buffer::F64(x) => self.broadcast_bytes(as_bytes_mut(x), root),
            Buffer::BF16(x) => self.broadcast_bytes(as_bytes_mut(x), root),
        })
    }
    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}

/// A panic on this rank prints the rank and aborts the whole job.
fn install_abort_on_panic(rank: usize, size: usize) {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        eprintln!("minibatch-dist: rank {rank} of {size} panicked; aborting all ranks");
        default(info);
        // SAFETY: MPI is initialized (the hook is installed after init) and
        // MPI_Abort may be called from any thread; it does not return.
        unsafe {
            mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, 1);
        }
        std::process::abort();
    }));
}
