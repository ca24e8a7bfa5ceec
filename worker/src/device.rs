//! Where a replica computes: device names as users write them, and the dtype and loading
//! that go with each device.

use crate::error::{Error, Result};
use crate::model::{Llama, Quantization};
use candle_core::{DType, Device};
use lorafleet_common::config::BasePrecision;
use std::path::Path;

/// `cpu`, `cuda` or `cuda:N`.
pub fn parse(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = match s.strip_prefix("cuda:") {
                Some(n) => n.parse().map_err(|_| Error::Invalid(format!("--device {s}: expected cuda:N")))?,
                None => 0,
            };
            if !cfg!(feature = "cuda") {
                return Err(Error::Invalid(format!(
                    "--device {s}: this build has no CUDA support (build with --features cuda)"
                )));
            }
            Ok(Device::new_cuda(ordinal)?)
        }
        other => Err(Error::Invalid(format!("--device {other}: expected cpu, cuda or cuda:N"))),
    }
}

/// The dtype the base weights are computed in: f32 on CPU (candle's CPU matmul has no fast
/// half-precision path), bf16 on GPUs.
pub fn compute_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    }
}

/// Loads a base model on `device` in its compute dtype, int8 when asked, else with bf16
/// block linears when `precision.bf16`; `bf16` also puts the output head's products in bf16,
/// beside int8 block linears too. On a GPU the base computes in bf16 whatever `bf16` says
/// ([`compute_dtype`]; int8 there dequantizes to bf16 for cuBLAS), so `torch_dtype = bf16`
/// asks for nothing more, as in transformers.
pub fn load_model(dir: &Path, device: &Device, precision: BasePrecision) -> Result<Llama> {
    let BasePrecision { load_in_8bit, int8_group_size: group, bf16 } = precision;
    let bf16 = bf16 && device.is_cpu();
    let quantization = match (load_in_8bit, bf16) {
        (true, _) => Quantization::Int8 { group },
        (false, true) => Quantization::Bf16,
        (false, false) => Quantization::None,
    };
    let model = Llama::load_quantized(dir, compute_dtype(device), device, quantization)?;
    match (load_in_8bit, bf16) {
        (true, true) => model.with_bf16_head(),
        _ => Ok(model),
    }
}
