//! The training engine's fused ops: plain functions over `f32` slices in reused buffers.
//!
//! Each file holds one op's forward, its backward and its reference body (candle tensor
//! ops: the test oracle, and the body other devices run until a kernel replaces it), side by
//! side. Conventions shared by all of them:
//! - activations are token-major: `N` tokens of the micro-batch (padding removed, sequences
//!   packed back to back) by features, row-major;
//! - a backward says in its doc whether it overwrites or adds into its outputs;
//! - work is split by who owns an output (rows, heads, sequences), never by atomics, so the
//!   result is the same for any thread count.

pub mod attention;
pub mod bf16;
pub mod gemm;
pub mod head_loss;
pub mod int8;
pub mod keystream;
pub mod lora_linear;
pub mod math;
pub mod narrow;
pub mod rms_norm;
pub mod rope;
pub mod simd;
pub mod swiglu;
