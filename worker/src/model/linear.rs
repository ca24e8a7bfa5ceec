//! A frozen linear layer of a decoder block: full precision, bf16 (`torch_dtype = bf16`) or
//! int8 (`load_in_8bit`).

use crate::error::Result;
use candle_core::{Device, Tensor};
use lorafleet_kernels::fused::bf16::PackedBf16;
use lorafleet_kernels::{Bf16Linear, FrozenLinear, Int8Linear};

/// How block linears are stored; embeddings, norms and the output head always keep the
/// compute dtype, as `prepare_model_for_kbit_training` leaves them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Quantization {
    /// The compute dtype.
    #[default]
    None,
    /// bf16 on the CPU (products with bf16 operands and f32 accumulation).
    Bf16,
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
    /// In bf16 (built by the model loader, which packs concatenated weights once).
    Bf16(Bf16Linear),
    /// In int8.
    Int8(Int8Linear),
}

impl BaseLinear {
    /// Builds the layer from a weight read on the CPU (int8, bf16) or on `device` (dense).
    /// A bf16 layer made here packs its own weight; the loader shares one pack between the
    /// modules of a concatenated weight instead.
    pub fn new(weight: Tensor, bias: Option<Tensor>, quantization: Quantization, device: &Device) -> Result<Self> {
        Ok(match quantization {
            Quantization::None => Self::Dense(FrozenLinear::new(weight, bias)?),
            Quantization::Bf16 => {
                let rows = weight.dims2()?.0;
                Self::Bf16(Bf16Linear::new(pack_bf16(&weight)?, 0, rows, bias)?)
            }
            Quantization::Int8 { group } => Self::Int8(Int8Linear::quantize(&weight, group, bias, device)?),
        })
    }

    /// `x·Wᵀ + b`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Dense(l) => l.forward(x)?,
            Self::Bf16(l) => l.forward(x)?,
            Self::Int8(l) => l.forward(x)?.to_dtype(x.dtype())?,
        })
    }

    /// The tensors it holds (weight, and bias when dense).
    pub fn tensors(&self) -> Vec<&Tensor> {
        match self {
            Self::Dense(l) => std::iter::once(l.weight()).chain(l.bias()).collect(),
            Self::Bf16(l) => l.bias().into_iter().collect(),
            Self::Int8(l) => vec![l.quantized()],
        }
    }
}

/// Packs a `[out, in]` CPU weight (any float dtype) in bf16 for both products.
pub(crate) fn pack_bf16(weight: &Tensor) -> Result<std::sync::Arc<PackedBf16>> {
    let (out, inp) = weight.dims2()?;
    let w: Vec<f32> = weight.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
    Ok(std::sync::Arc::new(PackedBf16::new(&w, out, inp)))
}
