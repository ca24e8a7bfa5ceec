//! `y = x·Wᵀ (+ b)` with a frozen `W`: the backward produces dx only.

use crate::fallback::{via_tensor_ops, DeviceStorage};
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use std::sync::Arc;

/// A frozen linear layer. The weight lives inside the op, so autograd never sees it:
/// no weight gradient is computed and the graph holds no extra reference to it.
#[derive(Clone)]
pub struct FrozenLinear {
    weight: Tensor,
    bias: Option<FrozenBias>,
    matmul: Arc<Box<dyn CustomOp1 + Send + Sync>>,
}

impl FrozenLinear {
    /// `weight` is `[out, in]` as stored by transformers; `bias` is `[out]`. A contiguous
    /// view (rows of a larger matrix, such as q's rows of a concatenated q|k|v) is kept as a
    /// view: the matmul reads it at its offset.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out, _) = weight.dims2()?;
        let weight = if weight.is_contiguous() { weight.detach() } else { weight.force_contiguous()? };
        let bias = bias.map(|b| FrozenBias::new(b, out)).transpose()?;
        let matmul: Arc<Box<dyn CustomOp1 + Send + Sync>> = Arc::new(Box::new(MatmulWt { weight: weight.clone() }));
        Ok(Self { weight, bias, matmul })
    }

    /// The frozen weight `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The frozen bias `[out]`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref().map(FrozenBias::values)
    }

    /// Applies the layer to `x` of shape `[..., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = crate::dense(x)?.apply_op1_arc(self.matmul.clone())?;
        match &self.bias {
            Some(b) => b.forward(&y),
            None => Ok(y),
        }
    }
}

/// `x·Wᵀ (+ b)` for `x` `[..., in]` through `op`, a 2-D product of a frozen `[out, in]`
/// weight: flattens the leading dimensions, applies `op` to the dense `[m, in]` rows and
/// restores them (`what` names the layer in errors).
pub(crate) fn apply_to_rows<C: CustomOp1 + Send + Sync + 'static>(
    what: &str,
    x: &Tensor,
    (out, inp): (usize, usize),
    op: C,
    bias: Option<&FrozenBias>,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let Some((&k_in, lead)) = dims.split_last() else { bail!("{what}: scalar input") };
    if k_in != inp {
        bail!("{what}: input has {k_in} features, weight expects {inp}");
    }
    let m: usize = lead.iter().product();
    let y = crate::dense(&x.reshape((m, inp))?)?.apply_op1(op)?;
    let mut out_dims = lead.to_vec();
    out_dims.push(out);
    let y = y.reshape(out_dims)?;
    match bias {
        Some(b) => b.forward(&y),
        None => Ok(y),
    }
}

/// `y = x + b` with a frozen `b` over the last dimension; the gradient passes through to x.
#[derive(Clone)]
pub struct FrozenBias {
    values: Tensor,
    op: Arc<Box<dyn CustomOp1 + Send + Sync>>,
}

impl FrozenBias {
    /// A bias of `out` values.
    pub fn new(bias: Tensor, out: usize) -> Result<Self> {
        if bias.dims1()? != out {
            bail!("bias of {} values for a linear layer with {out} outputs", bias.dims1()?);
        }
        let values = crate::dense(&bias.detach())?;
        Ok(Self { op: Arc::new(Box::new(AddFrozen { bias: values.clone() })), values })
    }

    /// The frozen values.
    pub fn values(&self) -> &Tensor {
        &self.values
    }

    /// Adds the bias to `y` `[..., out]`.
    pub fn forward(&self, y: &Tensor) -> Result<Tensor> {
        y.apply_op1_arc(self.op.clone())
    }
}

/// `x·Wᵀ` through the backend's own matmul, with W read through a transposed layout.
struct MatmulWt {
    weight: Tensor,
}

impl MatmulWt {
    fn run<S: DeviceStorage>(&self, x: &S, l: &Layout) -> Result<(S, Shape)> {
        let (n, k) = self.weight.dims2()?;
        let dims = l.dims();
        let Some((&k_in, lead)) = dims.split_last() else { bail!("frozen linear: scalar input") };
        if k_in != k {
            bail!("frozen linear: input has {k_in} features, weight expects {k}");
        }
        if !(l.is_contiguous()) {
            bail!("frozen linear: input must be contiguous");
        }
        let m: usize = lead.iter().product();
        let lhs_l = Layout::contiguous_with_offset((1, m, k), l.start_offset());
        let (w_guard, w_l) = self.weight.storage_and_layout();
        let Some(w) = S::unwrap(&w_guard) else { bail!("frozen linear: weight and input are on different devices") };
        let rhs_l = Layout::new(Shape::from((1, k, n)), vec![n * k, 1, k], w_l.start_offset());
        let out = x.matmul(w, (1, m, n, k), &lhs_l, &rhs_l)?;
        let mut out_dims = lead.to_vec();
        out_dims.push(n);
        Ok((out, Shape::from(out_dims)))
    }
}

impl CustomOp1 for MatmulWt {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(s, l)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        self.run(s, l)
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // dx = dy·W, as one 2-D matmul over all leading dimensions.
        let (n, k) = self.weight.dims2()?;
        let mut dims = grad.dims().to_vec();
        let rows = grad.elem_count() / n;
        let dx = grad.reshape((rows, n))?.matmul(&self.weight)?;
        *dims.last_mut().expect("grad has the output's rank") = k;
        Ok(Some(dx.reshape(dims)?))
    }
}

/// `y = x + b` with a frozen `b` broadcast over the last dimension.
struct AddFrozen {
    bias: Tensor,
}

impl CustomOp1 for AddFrozen {
    fn name(&self) -> &'static str {
        "add-frozen-bias"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        via_tensor_ops(s, l, |x| x.broadcast_add(&self.bias))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        via_tensor_ops(s, l, |x| x.broadcast_add(&self.bias))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.clone()))
    }
}
