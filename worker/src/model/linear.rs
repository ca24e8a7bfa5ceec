//! A frozen linear layer of a decoder block: full precision, or int8 (`load_in_8bit`).

use crate::error::Result;
use candle_core::{Device, Tensor};
use lorafleet_kernels::{FrozenLinear, Int8Linear};

/// How block linears are stored; embeddings, norms and the output head always keep the
/// compute dtype, as `prepare_model_for_kbit_training` leaves them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Quantization {
    /// The compute dtype.
    #[default]
    None,
    /// int8 with absmax scales per output row, or per `group` input features.
    Int8 {
        /// Input features per scale; `None` = one scale per row.
        group: Option<usize>,
    },
}

/// One frozen block linear.
#[derive(Clone)]
pub enum BaseLinear {
    /// In the compute dtype.
    Dense(FrozenLinear),
    /// In int8.
    Int8(Int8Linear),
}

impl BaseLinear {
    /// Builds the layer from a weight read on the CPU (int8) or on `device` (dense).
    pub fn new(weight: Tensor, bias: Option<Tensor>, quantization: Quantization, device: &Device) -> Result<Self> {
        Ok(match quantization {
            Quantization::None => Self::Dense(FrozenLinear::new(weight, bias)?),
            Quantization::Int8 { group } => Self::Int8(Int8Linear::quantize(&weight, group, bias, device)?),
        })
    }

    /// `x·Wᵀ + b`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Dense(l) => l.forward(x)?,
            Self::Int8(l) => l.forward(x)?.to_dtype(x.dtype())?,
        })
    }

    /// The tensors it holds (weight, and bias when dense).
    pub fn tensors(&self) -> Vec<&Tensor> {
        match self {
            Self::Dense(l) => std::iter::once(l.weight()).chain(l.bias()).collect(),
            Self::Int8(l) => vec![l.quantized()],
        }
    }
}
