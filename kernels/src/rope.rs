//! Rotary position embedding in the non-interleaved ("rotate_half") layout of transformers.
//!
//! Rotation is orthogonal, so the backward is the same rotation by the opposite angle:
//! the op needs no saved activations at all.

use crate::fallback::via_tensor_ops;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};

/// Cos/sin tables for positions `0..len`, each `[len, head_dim / 2]` in f32.
#[derive(Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Tables of shape `[positions, head_dim / 2]`.
    pub fn new(cos: Tensor, sin: Tensor) -> Result<Self> {
        if cos.dims() != sin.dims() || cos.rank() != 2 {
            bail!("rope: cos {:?} and sin {:?} must be equal 2-D tables", cos.dims(), sin.dims());
        }
        Ok(Self { cos: cos.to_dtype(DType::F32)?, sin: sin.to_dtype(DType::F32)? })
    }

    /// The `cos` and `sin` tables `[positions, head_dim / 2]` (f32).
    pub fn tables(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.sin)
    }

    /// Positions the tables cover.
    pub fn len(&self) -> usize {
        self.cos.dims()[0]
    }

    /// Whether the tables are empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rotates `x` of shape `[batch, heads, seq, head_dim]` whose rows sit at positions
    /// `offset..offset + seq`.
    pub fn forward(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let (_, _, t, d) = x.dims4()?;
        if offset + t > self.len() {
            bail!("rope: positions up to {} but tables cover {}", offset + t, self.len());
        }
        if d != 2 * self.cos.dims()[1] {
            bail!("rope: head_dim {d} does not match tables of width {}", self.cos.dims()[1]);
        }
        let cos = crate::dense(&self.cos.narrow(0, offset, t)?)?;
        let sin = crate::dense(&self.sin.narrow(0, offset, t)?)?;
        crate::dense(x)?.apply_op1(RopeOp { cos, sin })
    }
}

struct RopeOp {
    cos: Tensor,
    sin: Tensor,
}

impl RopeOp {
    fn reference(&self, x: &Tensor) -> Result<Tensor> {
        let half = x.dim(D::Minus1)? / 2;
        let cos = Tensor::cat(&[&self.cos, &self.cos], D::Minus1)?.to_dtype(x.dtype())?;
        let sin = Tensor::cat(&[&self.sin, &self.sin], D::Minus1)?.to_dtype(x.dtype())?;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
    }
}

impl CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(x) = s else { return via_tensor_ops(s, l, |x| self.reference(x)) };
        let (cos, sin) = (self.cos.to_vec2::<f32>()?, self.sin.to_vec2::<f32>()?);
        let dims = l.dims();
        let (t, d) = (dims[2], dims[3]);
        let half = d / 2;
        let x = &x[l.start_offset()..l.start_offset() + l.shape().elem_count()];
        let mut out = vec![0f32; x.len()];
        for (i, (row, o)) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)).enumerate() {
            let (c, s) = (&cos[i % t], &sin[i % t]);
            for j in 0..half {
                let (a, b) = (row[j], row[j + half]);
                o[j] = a * c[j] - b * s[j];
                o[j + half] = b * c[j] + a * s[j];
            }
        }
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        via_tensor_ops(s, l, |x| self.reference(x))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let inverse = RopeOp { cos: self.cos.clone(), sin: self.sin.neg()? };
        Ok(Some(crate::dense(grad)?.apply_op1(inverse)?))
    }
}
