//! Attention probabilities: `softmax(scale · scores + mask)` over the last dimension,
//! computed in f32 as transformers' eager attention does.
//!
//! The additive mask is frozen data held inside the op, so it gets no gradient; the
//! backward uses the saved output only: `dx = scale · y ⊙ (g − Σ g ⊙ y)`.

use crate::fallback::via_tensor_ops;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};

/// Softmax of `scale · scores + mask` for `scores` of shape `[batch, heads, q, k]` and an
/// optional additive `mask` of shape `[batch, 1, q, k]` (0 = allowed, a large negative
/// value = masked).
pub fn masked_softmax(scores: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    let (b, _, q, k) = scores.dims4()?;
    let mask = match mask {
        Some(m) => {
            if m.dims() != [b, 1, q, k] {
                bail!("masked softmax: mask {:?} does not fit scores {:?}", m.dims(), scores.dims());
            }
            Some(crate::dense(&m.detach().to_dtype(DType::F32)?)?)
        }
        None => None,
    };
    crate::dense(scores)?.apply_op1(MaskedSoftmaxOp { scale, mask })
}

struct MaskedSoftmaxOp {
    scale: f64,
    mask: Option<Tensor>,
}

impl MaskedSoftmaxOp {
    fn reference(&self, x: &Tensor) -> Result<Tensor> {
        let mut z = (x.to_dtype(crate::accum_dtype(x.dtype()))? * self.scale)?;
        if let Some(m) = &self.mask {
            z = z.broadcast_add(&m.to_dtype(z.dtype())?)?;
        }
        let max = z.max_keepdim(D::Minus1)?;
        let e = z.broadcast_sub(&max)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?.to_dtype(x.dtype())
    }
}

impl CustomOp1 for MaskedSoftmaxOp {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(x) = s else { return via_tensor_ops(s, l, |x| self.reference(x)) };
        let dims = l.dims();
        let (h, q, k) = (dims[1], dims[2], dims[3]);
        let mask = match &self.mask {
            Some(m) => Some(m.flatten_all()?.to_vec1::<f32>()?),
            None => None,
        };
        let x = &x[l.start_offset()..l.start_offset() + l.shape().elem_count()];
        let scale = self.scale as f32;
        let mut out = vec![0f32; x.len()];
        for (r, (row, o)) in x.chunks_exact(k).zip(out.chunks_exact_mut(k)).enumerate() {
            let (bi, qi) = (r / (h * q), r % q);
            let mrow = mask.as_ref().map(|m| &m[(bi * q + qi) * k..(bi * q + qi + 1) * k]);
            let mut max = f32::NEG_INFINITY;
            for (j, (oj, &v)) in o.iter_mut().zip(row).enumerate() {
                *oj = v * scale + mrow.map_or(0.0, |m| m[j]);
                max = max.max(*oj);
            }
            let mut sum = 0f32;
            for oj in o.iter_mut() {
                *oj = (*oj - max).exp();
                sum += *oj;
            }
            for oj in o.iter_mut() {
                *oj /= sum;
            }
        }
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        via_tensor_ops(s, l, |x| self.reference(x))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let y = &y.detach();
        let y32 = y.to_dtype(crate::accum_dtype(y.dtype()))?;
        let g32 = grad.to_dtype(crate::accum_dtype(grad.dtype()))?;
        let dot = (&g32 * &y32)?.sum_keepdim(D::Minus1)?;
        let dx = ((y32 * g32.broadcast_sub(&dot)?)? * self.scale)?;
        Ok(Some(dx.to_dtype(grad.dtype())?))
    }
}
