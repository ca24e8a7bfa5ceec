//! A frozen linear layer whose weight is stored in bf16 (`torch_dtype = bf16`), as a candle
//! op for the model's own forward (eval, generation, the reference path): the products are
//! the training engine's ([`crate::fused::bf16`]), so both paths compute the same values.

use crate::fused::bf16::{Bf16Scratch, Bf16Weight, PackedBf16};
use crate::fused::gemm::{MatMut, MatRef};
use crate::FrozenBias;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use std::sync::Arc;

/// Rows `r0..r0 + rows` of a packed bf16 weight, with an optional bias (gradient to the
/// input only).
#[derive(Clone)]
pub struct Bf16Linear {
    packed: Arc<PackedBf16>,
    r0: usize,
    rows: usize,
    bias: Option<FrozenBias>,
}

impl Bf16Linear {
    /// Rows `r0..r0 + rows` of `packed` (a module's share of a concatenated weight);
    /// `r0` must start a panel of 16 rows.
    pub fn new(packed: Arc<PackedBf16>, r0: usize, rows: usize, bias: Option<Tensor>) -> Result<Self> {
        if packed.rows(r0, rows).is_none() {
            bail!(
                "bf16 linear: rows {r0}..{} of a {}-row weight do not start a 16-row panel",
                r0 + rows,
                packed.dims().0
            );
        }
        let bias = bias.map(|b| FrozenBias::new(b, rows)).transpose()?;
        Ok(Self { packed, r0, rows, bias })
    }

    /// The packed weight this layer is a share of, and where its rows start.
    pub fn packed(&self) -> (&Arc<PackedBf16>, usize) {
        (&self.packed, self.r0)
    }

    /// The weight, for the training engine.
    pub fn weight(&self) -> Bf16Weight<'_> {
        self.packed.rows(self.r0, self.rows).expect("checked when built")
    }

    /// `[out, in]`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.packed.dims().1)
    }

    /// The frozen bias `[out]`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref().map(FrozenBias::values)
    }

    /// `dy·W` for `dy` `[m, out]` (f32 on the CPU): the product the layer's backward takes,
    /// for a caller that forms the output gradient itself (the head's fused loss).
    pub fn input_grad(&self, dy: &Tensor) -> Result<Tensor> {
        crate::dense(dy)?.apply_op1(Bf16Matmul { layer: self.clone(), transpose: false })
    }

    /// Applies the layer to `x` `[..., in]` (f32 on the CPU).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let op = Bf16Matmul { layer: self.clone(), transpose: true };
        crate::frozen_linear::apply_to_rows("bf16 linear", x, self.dims(), op, self.bias.as_ref())
    }
}

/// `x·Wᵀ` (`transpose`) or `x·W` over a dense 2-D f32 input.
struct Bf16Matmul {
    layer: Bf16Linear,
    transpose: bool,
}

impl CustomOp1 for Bf16Matmul {
    fn name(&self) -> &'static str {
        "bf16-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(x) = s else { bail!("bf16 linear: the input must be f32") };
        let (n, k) = self.layer.dims();
        let m = l.dims()[0];
        let x = &x[l.start_offset()..l.start_offset() + l.shape().elem_count()];
        let (inp, out) = if self.transpose { (k, n) } else { (n, k) };
        let mut y = vec![0f32; m * out];
        let (w, mut scratch) = (self.layer.weight(), Bf16Scratch::default());
        if self.transpose {
            w.forward(MatRef::new(x, m, inp), MatMut::new(&mut y, m, out), &mut scratch);
        } else {
            w.backward(MatRef::new(x, m, inp), MatMut::new(&mut y, m, out), false, &mut scratch);
        }
        Ok((CpuStorage::F32(y), Shape::from((m, out))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: &candle_core::CudaStorage, _: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        bail!("bf16 linear: the packed bf16 weight lives on the CPU")
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let back = Bf16Matmul { layer: self.layer.clone(), transpose: !self.transpose };
        Ok(Some(crate::dense(grad)?.apply_op1(back)?))
    }
}
