//! Rotary frequency tables, computed the way transformers computes them (f32 throughout).

use candle_core::{Device, Result, Tensor};
use lorafleet_common::{ModelConfig, RopeScaling};
use lorafleet_kernels as kernels;

/// Inverse frequencies `1 / theta^(2i/d)` for `i < d/2`, after the configured scaling.
pub fn inv_freq(config: &ModelConfig) -> Vec<f32> {
    let d = config.head_dim;
    let base: Vec<f32> = (0..d / 2).map(|i| 1.0 / (config.rope_theta as f32).powf((2 * i) as f32 / d as f32)).collect();
    match &config.rope_scaling {
        RopeScaling::Default => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / *factor as f32).collect(),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            let orig = *original_max_position_embeddings as f32;
            let (factor, low, high) = (*factor as f32, *low_freq_factor as f32, *high_freq_factor as f32);
            let low_wavelen = orig / low;
            let high_wavelen = orig / high;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (orig / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// `cos` and `sin` tables `[positions, head_dim / 2]` for positions `0..positions`.
pub fn tables(config: &ModelConfig, positions: usize, device: &Device) -> Result<kernels::Rope> {
    let inv = inv_freq(config);
    let half = inv.len();
    let mut cos = Vec::with_capacity(positions * half);
    let mut sin = Vec::with_capacity(positions * half);
    for p in 0..positions {
        for &f in &inv {
            let angle = p as f32 * f;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    kernels::Rope::new(
        Tensor::from_vec(cos, (positions, half), device)?,
        Tensor::from_vec(sin, (positions, half), device)?,
    )
}
