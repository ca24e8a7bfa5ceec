//! The additive attention mask: causal, key padding and (Mistral) sliding window.

use candle_core::{Device, Result, Tensor};

/// Added to a masked score. transformers uses the dtype's lowest value rather than −∞, so
/// a row with every key masked stays finite; we do the same.
const MASKED: f32 = f32::MIN;

/// The mask for `q_len` queries at absolute positions `kv_len - q_len ..` over `kv_len` keys.
/// `key_mask` is `rows × kv_len` (1 = real token). Returns `None` when nothing is masked.
pub fn attention_mask(
    rows: usize,
    q_len: usize,
    kv_len: usize,
    key_mask: Option<&[u8]>,
    window: Option<usize>,
    device: &Device,
) -> Result<Option<Tensor>> {
    let offset = kv_len - q_len;
    let mut data = vec![0f32; rows * q_len * kv_len];
    let mut any = false;
    for r in 0..rows {
        for i in 0..q_len {
            let q = offset + i;
            for k in 0..kv_len {
                let padded = key_mask.is_some_and(|m| m[r * kv_len + k] == 0);
                let outside = k > q || window.is_some_and(|w| q - k >= w);
                if padded || outside {
                    data[(r * q_len + i) * kv_len + k] = MASKED;
                    any = true;
                }
            }
        }
    }
    if !any {
        return Ok(None);
    }
    Tensor::from_vec(data, (rows, 1, q_len, kv_len), device).map(Some)
}
