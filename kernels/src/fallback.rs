//! Runs an op's forward as ordinary candle tensor ops on whatever device holds the input.
//!
//! A custom op's device body only receives raw storage. Wrapping that storage back into a
//! detached tensor lets the body reuse candle's kernels (at the cost of one copy in and one
//! out), so every op works on every device before it gets a hand-written kernel.

use crate::dense;
use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{bail, CpuStorage, Layout, Result, Shape, Storage, Tensor};

/// A storage type that can round-trip through [`Storage`].
pub(crate) trait DeviceStorage: BackendStorage + Sized {
    fn wrap(self) -> Storage;
    fn unwrap(storage: &Storage) -> Option<&Self>;
}

impl DeviceStorage for CpuStorage {
    fn wrap(self) -> Storage {
        Storage::Cpu(self)
    }
    fn unwrap(storage: &Storage) -> Option<&Self> {
        match storage {
            Storage::Cpu(s) => Some(s),
            _ => None,
        }
    }
}

#[cfg(feature = "cuda")]
impl DeviceStorage for candle_core::CudaStorage {
    fn wrap(self) -> Storage {
        Storage::Cuda(self)
    }
    fn unwrap(storage: &Storage) -> Option<&Self> {
        match storage {
            Storage::Cuda(s) => Some(s),
            _ => None,
        }
    }
}

/// Applies `f` to the tensor held by (`storage`, `layout`) and returns the result's storage.
/// The layout must be contiguous from offset 0 (the public wrappers ensure it via [`crate::dense`]).
pub(crate) fn via_tensor_ops<S: DeviceStorage>(
    storage: &S,
    layout: &Layout,
    f: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<(S, Shape)> {
    if !(layout.is_contiguous() && layout.start_offset() == 0) {
        bail!("custom op input must be contiguous from offset 0");
    }
    let input =
        Tensor::from_storage(storage.try_clone(layout)?.wrap(), layout.shape().clone(), BackpropOp::none(), false);
    let out = dense(&f(&input)?)?;
    storage_of(&out)
}

/// The owned storage of a dense tensor of the same device kind as `S`.
pub(crate) fn storage_of<S: DeviceStorage>(t: &Tensor) -> Result<(S, Shape)> {
    let (guard, layout) = t.storage_and_layout();
    match S::unwrap(&guard) {
        Some(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
        None => bail!("custom op: operand is on another device than its input"),
    }
}
