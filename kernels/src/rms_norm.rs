//! RMSNorm with a frozen weight: `y = w ⊙ x / sqrt(mean(x²) + eps)`, gradient to x only.
//!
//! candle's fused `rms_norm` has no backward, and the differentiable composition hands the
//! frozen weight an activation-sized gradient; this op avoids both.

use crate::fallback::via_tensor_ops;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};
use std::sync::Arc;

/// A frozen RMSNorm layer over the last dimension.
#[derive(Clone)]
pub struct RmsNorm {
    op: Arc<Box<dyn CustomOp1 + Send + Sync>>,
    weight: Tensor,
}

impl RmsNorm {
    /// `weight` has one value per feature.
    pub fn new(weight: Tensor, eps: f64) -> Result<Self> {
        let weight = crate::dense(&weight.detach())?;
        weight.dims1()?;
        let host = match weight.device() {
            candle_core::Device::Cpu => Some(weight.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            _ => None,
        };
        Ok(Self { op: Arc::new(Box::new(RmsNormOp { weight: weight.clone(), host, eps })), weight })
    }

    /// The frozen weight.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Normalises `x` of shape `[..., hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::dense(x)?.apply_op1_arc(self.op.clone())
    }
}

struct RmsNormOp {
    weight: Tensor,
    /// The weight as f32 values when it lives on the CPU, for the loop below.
    host: Option<Vec<f32>>,
    eps: f64,
}

impl RmsNormOp {
    /// The same maths as transformers' `LlamaRMSNorm`: statistics in f32, weight applied
    /// after casting back to the input dtype.
    fn reference(&self, x: &Tensor) -> Result<Tensor> {
        let x32 = x.to_dtype(crate::accum_dtype(x.dtype()))?;
        let ms = x32.sqr()?.mean_keepdim(D::Minus1)?;
        let y = x32.broadcast_div(&(ms + self.eps)?.sqrt()?)?.to_dtype(x.dtype())?;
        y.broadcast_mul(&self.weight.to_dtype(x.dtype())?)
    }
}

impl CustomOp1 for RmsNormOp {
    fn name(&self) -> &'static str {
        "frozen-rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), Some(w)) = (s, &self.host) else {
            return via_tensor_ops(s, l, |x| self.reference(x));
        };
        let h = w.len();
        let x = &x[l.start_offset()..l.start_offset() + l.shape().elem_count()];
        let mut out = vec![0f32; x.len()];
        for (row, out_row) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
            let ss: f64 = row.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
            let inv = (1.0 / (ss / h as f64 + self.eps).sqrt()) as f32;
            for ((o, &v), &wv) in out_row.iter_mut().zip(row).zip(w) {
                *o = wv * (v * inv);
            }
        }
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        via_tensor_ops(s, l, |x| self.reference(x))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // With r = sqrt(mean(x²) + eps) and gw = g ⊙ w:
        // dx = gw / r − x · Σ(gw ⊙ x) / (H · r³)
        let x = &x.detach();
        let h = x.dim(D::Minus1)? as f64;
        let x32 = x.to_dtype(crate::accum_dtype(x.dtype()))?;
        let gw = grad
            .to_dtype(crate::accum_dtype(grad.dtype()))?
            .broadcast_mul(&self.weight.to_dtype(crate::accum_dtype(x.dtype()))?)?;
        let r = (x32.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?;
        let dot = (&gw * &x32)?.sum_keepdim(D::Minus1)?;
        let dx = (gw.broadcast_div(&r)? - x32.broadcast_mul(&dot.broadcast_div(&(r.powf(3.0)? * h)?)?)?)?;
        Ok(Some(dx.to_dtype(grad.dtype())?))
    }
}
