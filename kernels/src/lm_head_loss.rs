//! The output head fused with the cross-entropy: per-row `logsumexp(h·Wᵀ) − (h·Wᵀ)[target]`
//! computed a chunk of rows at a time, forward and backward.
//!
//! The logits of a batch are the largest tensor of a LoRA step (4 × 256 positions × a 32000
//! vocabulary is 524 MB in f32, and the softmax, its one-hot update and the product with the
//! upstream gradient each need as much again). Chunking keeps only one chunk of them alive
//! and recomputes them in the backward, so the head costs a few tens of MB whatever the batch.

use crate::fallback::via_tensor_ops;
use crate::Bf16Linear;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};

/// Bytes of f32 logits per chunk.
const CHUNK_BYTES: usize = 8 << 20;

/// Per-row loss `[rows]` of hidden states `[rows, hidden]` through the frozen head `weight`
/// `[vocab, hidden]` against `targets`. The gradient flows to the hidden states only.
pub fn lm_head_cross_entropy(hidden: &Tensor, weight: &Tensor, targets: &[u32]) -> Result<Tensor> {
    cross_entropy(hidden, HeadWeight::Dense(weight.detach()), weight.dims2()?, targets)
}

/// [`lm_head_cross_entropy`] through a bf16 head (`torch_dtype = bf16`): both products with
/// bf16 operands and f32 accumulation, the training engine's.
pub fn lm_head_cross_entropy_bf16(hidden: &Tensor, head: &Bf16Linear, targets: &[u32]) -> Result<Tensor> {
    cross_entropy(hidden, HeadWeight::Bf16(head.clone()), head.dims(), targets)
}

fn cross_entropy(hidden: &Tensor, head: HeadWeight, (vocab, hw): (usize, usize), targets: &[u32]) -> Result<Tensor> {
    let (rows, h) = hidden.dims2()?;
    if h != hw || targets.len() != rows {
        bail!("lm head loss: hidden {:?}, weight [{vocab}, {hw}], {} targets", hidden.dims(), targets.len());
    }
    if let Some(bad) = targets.iter().find(|&&t| t as usize >= vocab) {
        bail!("lm head loss: target id {bad} outside a vocabulary of {vocab}");
    }
    let chunk = (CHUNK_BYTES / (4 * vocab)).max(1);
    let op = LmHeadLoss { head, targets: targets.to_vec(), chunk };
    crate::dense(hidden)?.apply_op1(op)
}

/// The head as the op holds it.
enum HeadWeight {
    Dense(Tensor),
    Bf16(Bf16Linear),
}

impl HeadWeight {
    /// `h·Wᵀ`.
    fn logits(&self, h: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(w) => h.matmul(&w.t()?),
            Self::Bf16(l) => l.forward(h),
        }
    }

    /// `dz·W`.
    fn input_grad(&self, dz: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(w) => dz.matmul(w),
            Self::Bf16(l) => l.input_grad(dz),
        }
    }
}

struct LmHeadLoss {
    head: HeadWeight,
    targets: Vec<u32>,
    chunk: usize,
}

impl LmHeadLoss {
    /// f32 logits and the target column of rows `r0..r0+n`.
    fn chunk_logits(&self, h: &Tensor, r0: usize, n: usize) -> Result<(Tensor, Tensor)> {
        let logits = self.head.logits(&h.narrow(0, r0, n)?)?.to_dtype(DType::F32)?;
        let idx = Tensor::from_slice(&self.targets[r0..r0 + n], (n, 1), h.device())?;
        Ok((logits, idx))
    }

    fn forward(&self, h: &Tensor) -> Result<Tensor> {
        let rows = h.dims()[0];
        let mut parts = Vec::with_capacity(rows.div_ceil(self.chunk));
        for r0 in (0..rows).step_by(self.chunk) {
            let n = self.chunk.min(rows - r0);
            let (z, idx) = self.chunk_logits(h, r0, n)?;
            let max = z.max_keepdim(D::Minus1)?;
            let lse = (z.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + &max)?;
            parts.push((lse - z.gather(&idx, 1)?)?.squeeze(1)?);
        }
        Tensor::cat(&parts, 0)
    }
}

impl CustomOp1 for LmHeadLoss {
    fn name(&self) -> &'static str {
        "lm-head-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        via_tensor_ops(s, l, |h| self.forward(h))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        via_tensor_ops(s, l, |h| self.forward(h))
    }

    fn bwd(&self, h: &Tensor, _loss: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // d loss_r / d z_r = softmax(z_r) − onehot(target_r); d h_r = g_r · that · W.
        // `h` is a graph node: without detach every chunk's logits would stay referenced by
        // the graph of the returned gradient until candle drops it.
        let h = &h.detach();
        let rows = h.dims()[0];
        let g = grad.to_dtype(DType::F32)?;
        let mut parts = Vec::with_capacity(rows.div_ceil(self.chunk));
        for r0 in (0..rows).step_by(self.chunk) {
            let n = self.chunk.min(rows - r0);
            let (z, idx) = self.chunk_logits(h, r0, n)?;
            let e = z.broadcast_sub(&z.max_keepdim(D::Minus1)?)?.exp()?;
            let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
            let minus_one = Tensor::full(-1f32, (n, 1), h.device())?;
            let dz = p.scatter_add(&idx, &minus_one, 1)?.broadcast_mul(&g.narrow(0, r0, n)?.unsqueeze(1)?)?;
            parts.push(self.head.input_grad(&dz.to_dtype(h.dtype())?)?);
        }
        Ok(Some(Tensor::cat(&parts, 0)?))
    }
}
