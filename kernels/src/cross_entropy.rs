//! Per-row cross-entropy `logsumexp(z) − z[target]` with the analytic gradient
//! `softmax(z) − onehot(target)`, so no log-softmax tensor is kept for the backward.

use crate::fallback::via_tensor_ops;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};

/// Cross-entropy of each row of `logits` `[rows, vocab]` against `targets` (one id per row),
/// computed in f32. Returns `[rows]`.
pub fn cross_entropy_rows(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let (rows, vocab) = logits.dims2()?;
    if targets.len() != rows {
        bail!("cross entropy: {} targets for {rows} rows", targets.len());
    }
    if let Some(bad) = targets.iter().find(|&&t| t as usize >= vocab) {
        bail!("cross entropy: target id {bad} outside a vocabulary of {vocab}");
    }
    let logits = crate::dense(&logits.to_dtype(DType::F32)?)?;
    logits.apply_op1(CrossEntropyOp { targets: targets.to_vec() })
}

struct CrossEntropyOp {
    targets: Vec<u32>,
}

impl CrossEntropyOp {
    fn target_tensor(&self, device: &candle_core::Device) -> Result<Tensor> {
        Tensor::from_slice(&self.targets, (self.targets.len(), 1), device)
    }

    fn reference(&self, z: &Tensor) -> Result<Tensor> {
        let max = z.max_keepdim(D::Minus1)?;
        let lse = (z.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + &max)?;
        let picked = z.gather(&self.target_tensor(z.device())?, 1)?;
        (lse - picked)?.squeeze(1)
    }
}

impl CustomOp1 for CrossEntropyOp {
    fn name(&self) -> &'static str {
        "cross-entropy-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(z) = s else { return via_tensor_ops(s, l, |z| self.reference(z)) };
        let vocab = l.dims()[1];
        let z = &z[l.start_offset()..l.start_offset() + l.shape().elem_count()];
        let out = z
            .chunks_exact(vocab)
            .zip(&self.targets)
            .map(|(row, &t)| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f64 = row.iter().map(|&v| f64::from((v - max).exp())).sum();
                (f64::from(max) + sum.ln() - f64::from(row[t as usize])) as f32
            })
            .collect();
        Ok((CpuStorage::F32(out), Shape::from(self.targets.len())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        via_tensor_ops(s, l, |z| self.reference(z))
    }

    fn bwd(&self, z: &Tensor, _loss: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let max = z.max_keepdim(D::Minus1)?;
        let e = z.broadcast_sub(&max)?.exp()?;
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        let minus_one = Tensor::full(-1f32, (self.targets.len(), 1), z.device())?;
        let d = p.scatter_add(&self.target_tensor(z.device())?, &minus_one, 1)?;
        Ok(Some(d.broadcast_mul(&grad.to_dtype(DType::F32)?.unsqueeze(1)?)?))
    }
}
