//! candle custom ops whose backward passes are exact and never touch frozen weights.
//!
//! candle's built-in autograd computes a gradient for *both* operands of every matmul and
//! binary op, so a frozen weight used directly in the graph costs a weight-sized gradient
//! per step, and several of its fused ops (rms_norm, rope, softmax_last_dim) silently drop
//! the gradient. Each op here keeps its frozen operands (weights, tables, masks) *inside*
//! the op, so the graph only ever sees the activation, and implements `bwd` analytically.
//!
//! Backward bodies detach the saved tensors they read, so the gradient they return carries
//! no graph that would keep their temporaries alive.
//!
//! Every op has a CPU body; on CUDA the body runs the same maths through candle's own GPU
//! kernels ([`fallback`]) until a fused kernel replaces it.
#![deny(missing_docs)]

mod bf16_linear;
mod fallback;
mod frozen_linear;
pub mod fused;
#[cfg(feature = "cuda")]
mod int8_cuda;
mod int8_linear;
mod lm_head_loss;
mod masked_softmax;
mod rms_norm;
mod rope;

pub use bf16_linear::Bf16Linear;
pub use frozen_linear::{FrozenBias, FrozenLinear};
pub use int8_linear::Int8Linear;
pub use lm_head_loss::{lm_head_cross_entropy, lm_head_cross_entropy_bf16};
pub use masked_softmax::masked_softmax;
pub use rms_norm::RmsNorm;
pub use rope::Rope;

/// The precision reductions run in: f32 for f32 and narrower inputs (as transformers does),
/// f64 for f64 inputs (so that finite-difference tests see the op's own maths).
pub(crate) fn accum_dtype(dtype: candle_core::DType) -> candle_core::DType {
    match dtype {
        candle_core::DType::F64 => candle_core::DType::F64,
        _ => candle_core::DType::F32,
    }
}

/// A tensor that an op may hand to a low-level body: contiguous and starting at offset 0.
pub(crate) fn dense(x: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
    if x.is_contiguous() && x.layout().start_offset() == 0 {
        Ok(x.clone())
    } else {
        x.force_contiguous()
    }
}
