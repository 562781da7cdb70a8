//! The GPU transport of a sharded target: one NCCL communicator per GPU, behind
//! [`Communicator`]. (The CPU transport is [`super::shard::LocalComm`].)
//!
//! One process drives every GPU, one thread per rank (`shard.rs`), so the group is made with
//! `ncclCommInitAll` over the ranks' candle devices; each rank's all-reduce is enqueued on the
//! stream its own forward runs on, so it orders after the partial sum it reduces without a host
//! synchronisation. Multi-node would make each process's communicator with
//! `ncclCommInitRank` from one `ncclUniqueId` handed out by the launcher (NCCL's own bootstrap);
//! verdict does not start processes on other nodes.
//!
//! The communicators are shared by every sequence of the model, and NCCL needs every rank to
//! issue the same collectives in the same order: [`NcclGroup::turn`] lets one sharded forward
//! run at a time. A failed rank aborts the whole group (`ncclCommAbort` ends the collectives
//! its peers wait in); later forwards then fail with a clear error instead of hanging.
//!
//! NCCL is loaded at run time like every CUDA library here: `libnccl.so` must be on the library
//! path (the `nvidia-nccl-cu12` / `-cu13` Python packages ship `libnccl.so.2`: link it as
//! `libnccl.so`, which is the name cudarc looks for).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use cudarc::nccl::safe::{Comm, ReduceOp};

use super::error::{ModelError, Result};
use super::shard::Communicator;

/// A rank's NCCL communicator.
struct RankComm(Comm);

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it do not
// overlap; each rank's communicator is only used by the thread running that rank's forward, and
// forwards take turns through `NcclGroup::turn`. cudarc leaves it !Send only because it holds a
// raw pointer.
unsafe impl Send for RankComm {}

/// The communicators of one sharded model, rank r on `devices[r]`.
pub struct NcclGroup {
    comms: Vec<Mutex<Option<RankComm>>>,
    aborted: AtomicBool,
    turn: Mutex<()>,
}

impl std::fmt::Debug for NcclGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclGroup")
            .field("world", &self.comms.len())
            .field("aborted", &self.aborted.load(Ordering::Relaxed))
            .finish()
    }
}

/// Whether NCCL can be loaded here, with its version, or why not (never panics: cudarc panics
/// when a library it needs is missing, so look first).
pub fn available() -> std::result::Result<String, String> {
    // SAFETY: only tries to dlopen the library by its usual names.
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        return Err(
            "the NCCL library (libnccl.so) is not on the library path: install the \
                    nvidia-nccl-cu12 Python package (or NCCL itself) and put a `libnccl.so` \
                    link to its libnccl.so.2 on LD_LIBRARY_PATH"
                .into(),
        );
    }
    let v = cudarc::nccl::result::get_nccl_version()
        .map_err(|e| format!("NCCL did not report its version: {e:?}"))?;
    Ok(format!("{}.{}.{}", v / 10000, v / 100 % 100, v % 100))
}

/// `n` GPUs for the ranks of a sharded model: `first` (rank 0, where the rest of the model
/// runs) and the next ordinals after it.
pub fn rank_devices(first: &Device, n: usize) -> std::result::Result<Vec<Device>, String> {
    let Device::Cuda(c) = first else {
        return Err(format!("{first:?} is not a CUDA device"));
    };
    let o = c.cuda_stream().context().ordinal();
    let count = cudarc::driver::CudaContext::device_count()
        .map_err(|e| format!("counting the GPUs: {e:?}"))? as usize;
    if o + n > count {
        return Err(format!(
            "{n} shards from GPU {o} need GPUs {o}..{}, this machine has {count}",
            o + n
        ));
    }
    let mut out = vec![first.clone()];
    for r in o + 1..o + n {
        out.push(Device::new_cuda(r).map_err(|e| format!("GPU {r}: {e}"))?);
    }
    Ok(out)
}

impl NcclGroup {
    /// One communicator per device; the devices must be distinct CUDA devices.
    pub fn new(devices: &[Device]) -> Result<Arc<NcclGroup>> {
        available().map_err(ModelError::Invalid)?;
        let mut streams = Vec::with_capacity(devices.len());
        let mut ordinals = Vec::with_capacity(devices.len());
        for d in devices {
            let Device::Cuda(c) = d else {
                return Err(ModelError::Invalid(format!(
                    "NCCL ranks must be CUDA devices, got {d:?}"
                )));
            };
            let s = c.cuda_stream();
            let o = s.context().ordinal();
            if ordinals.contains(&o) {
                // NCCL refuses two ranks on one GPU ("Duplicate GPU detected").
                return Err(ModelError::Invalid(format!(
                    "two shards on GPU {o}: each shard needs a GPU of its own"
                )));
            }
            ordinals.push(o);
            streams.push(s);
        }
        let comms = Comm::from_devices(streams).map_err(|e| {
            ModelError::Invalid(format!("NCCL could not join GPUs {ordinals:?}: {e:?}"))
        })?;
        Ok(Arc::new(NcclGroup {
            comms: comms
                .into_iter()
                .map(|c| Mutex::new(Some(RankComm(c))))
                .collect(),
            aborted: AtomicBool::new(false),
            turn: Mutex::new(()),
        }))
    }

    pub fn world(&self) -> usize {
        self.comms.len()
    }

    /// Rank `r`'s handle.
    pub fn rank(self: &Arc<Self>, r: usize) -> NcclComm {
        NcclComm {
            group: self.clone(),
            rank: r,
        }
    }

    /// Held for a whole sharded forward (every rank's collectives), so that forwards of
    /// different sequences never interleave theirs.
    pub(crate) fn turn(&self) -> MutexGuard<'_, ()> {
        self.turn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
        for c in &self.comms {
            let taken = c.lock().unwrap_or_else(|p| p.into_inner()).take();
            // Dropping a communicator calls ncclCommAbort (cudarc panics if that fails: the
            // group is being torn down either way, so contain it).
            if let Some(c) = taken {
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(c)));
            }
        }
    }
}

/// One rank of an [`NcclGroup`].
#[derive(Debug, Clone)]
pub struct NcclComm {
    group: Arc<NcclGroup>,
    rank: usize,
}

/// The sum over the ranks of a contiguous f32 tensor, as a candle op on the rank's device.
struct AllReduce<'a>(&'a NcclComm);

impl CustomOp1 for AllReduce<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("NCCL all-reduce: the tensor is on the CPU, not on the rank's GPU")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let n = l.shape().elem_count();
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("NCCL all-reduce: the tensor is not contiguous");
        };
        let src = s.as_cuda_slice::<f32>()?.slice(a..b);
        let dev = s.device.clone();
        let mut dst = dev
            .cuda_stream()
            .alloc_zeros::<f32>(n)
            .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}")))?;
        let g = &self.0.group;
        let slot = g.comms[self.0.rank]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let Some(comm) = slot.as_ref() else {
            candle_core::bail!("NCCL all-reduce: the group was aborted after a rank failed");
        };
        comm.0
            .all_reduce(&src, &mut dst, &ReduceOp::Sum)
            .map_err(|e| {
                candle_core::Error::Msg(format!("NCCL all-reduce on rank {}: {e:?}", self.0.rank))
            })?;
        Ok((CudaStorage::wrap_cuda_slice(dst, dev), l.shape().clone()))
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.group.world()
    }

    fn all_reduce_sum(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.group.aborted.load(Ordering::SeqCst) {
            candle_core::bail!("NCCL all-reduce: another rank failed, the group is aborted");
        }
        let f = x.to_dtype(DType::F32)?.contiguous()?;
        f.apply_op1_no_bwd(&AllReduce(self))?.to_dtype(x.dtype())
    }

    fn abort(&self) {
        self.group.abort();
    }
}
