//! The GPU collective: NCCL through cudarc (feature `nccl`).
//!
//! Rank 0 creates the unique id, the coordinator hands it to every rank, and each rank
//! joins the communicator on its own device's stream. The all-reduce runs as a candle custom
//! op on the bucket tensor, so it is queued on the same stream as the backward pass that
//! produced the bucket and needs no host synchronisation of its own.

use crate::collective::Collective;
use crate::error::{Error, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use std::ffi::c_char;

/// A rank of an NCCL communicator.
pub struct Nccl {
    comm: SendComm,
    device: Device,
}

/// NCCL communicators may be used from any thread, one call at a time; the replica that owns
/// this one makes every call from its own thread.
struct SendComm(Comm);
// SAFETY: see above; the raw communicator pointer is never shared between threads.
unsafe impl Send for SendComm {}

fn nccl(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Collective(format!("NCCL {what}: {e:?}"))
}

/// A fresh unique id (rank 0 calls this), as bytes for the wire.
pub fn new_id() -> Result<Vec<u8>> {
    let id = Id::new().map_err(|e| nccl("unique id", e))?;
    Ok(id.internal().iter().map(|&c| c as u8).collect())
}

impl Nccl {
    /// Joins the communicator identified by `id` as `rank` of `world` on `device`.
    pub fn connect(device: &Device, rank: usize, world: usize, id: &[u8]) -> Result<Self> {
        let bytes: [u8; 128] =
            id.try_into().map_err(|_| Error::Collective(format!("NCCL id of {} bytes, expected 128", id.len())))?;
        let internal: [c_char; 128] = bytes.map(|b| b as c_char);
        let stream = device.as_cuda_device()?.cuda_stream();
        let comm = Comm::from_rank(stream, rank, world, Id::uninit(internal)).map_err(|e| nccl("init", e))?;
        Ok(Self { comm: SendComm(comm), device: device.clone() })
    }
}

/// Sum over ranks as a custom op (forward only: it never sits in a graph that is differentiated).
struct AllReduce<'a>(&'a Comm);

impl CustomOp1 for AllReduce<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL reduces device tensors only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let n = l.shape().elem_count();
        if l.contiguous_offsets() != Some((0, n)) {
            candle_core::bail!("NCCL all-reduce needs a contiguous tensor");
        }
        let dev = s.device().clone();
        macro_rules! reduce {
            ($t:ty) => {{
                let src = s.as_cuda_slice::<$t>()?;
                let mut dst = dev.alloc_zeros::<$t>(n)?;
                self.0
                    .all_reduce(src, &mut dst, &ReduceOp::Sum)
                    .map_err(|e| candle_core::Error::Msg(format!("{e:?}")))?;
                CudaStorage::wrap_cuda_slice(dst, dev)
            }};
        }
        let out = match s.dtype() {
            DType::F32 => reduce!(f32),
            DType::F64 => reduce!(f64),
            other => candle_core::bail!("NCCL all-reduce of {other:?} is not wired"),
        };
        Ok((out, l.shape().clone()))
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.comm.0.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.0.world_size()
    }

    fn all_reduce_grads(&mut self, bucket: Tensor) -> Result<Tensor> {
        Ok(bucket.contiguous()?.apply_op1_no_bwd(&AllReduce(&self.comm.0))?)
    }

    fn all_reduce_stats(&mut self, stats: &mut [f64]) -> Result<()> {
        let t = Tensor::from_slice(stats, stats.len(), &self.device)?;
        let summed = t.apply_op1_no_bwd(&AllReduce(&self.comm.0))?.to_vec1::<f64>()?;
        stats.copy_from_slice(&summed);
        Ok(())
    }
}
