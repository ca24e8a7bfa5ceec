//! Autoregressive decoding with a KV cache: greedy or temperature + top-p sampling.

use crate::error::{Error, Result};
use crate::lora::LoraAdapter;
use crate::model::Llama;
use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Decoding settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    /// Upper bound on generated tokens.
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    /// Nucleus mass kept when sampling (1 keeps everything).
    pub top_p: f64,
    /// Seed of the sampling RNG.
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self { max_new_tokens: 128, temperature: 0.0, top_p: 1.0, seed: 0 }
    }
}

/// Generated ids and whether an end-of-sequence token stopped generation (the eos itself
/// is not included in `ids`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generation {
    /// New tokens.
    pub ids: Vec<u32>,
    /// Whether generation ended on an eos id.
    pub stopped_on_eos: bool,
}

/// Continues `prompt` (with its BOS, if any) until an id in `eos_ids` or `max_new_tokens`.
pub fn generate(
    model: &Llama,
    adapter: Option<&LoraAdapter>,
    prompt: &[u32],
    eos_ids: &[u32],
    sampling: &Sampling,
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(Error::Invalid("cannot generate from an empty prompt".into()));
    }
    if !(sampling.temperature >= 0.0 && sampling.top_p > 0.0 && sampling.top_p <= 1.0) {
        return Err(Error::Invalid("temperature must be >= 0 and top_p in (0, 1]".into()));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(sampling.seed);
    let mut cache = model.new_cache();
    let mut input = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..sampling.max_new_tokens {
        let ids = Tensor::from_slice(&input, (1, input.len()), model.device())?;
        let logits: Vec<f32> = model.forward_cached(&ids, &mut cache, adapter)?.to_vec1()?;
        let next = if sampling.temperature == 0.0 { argmax(&logits) } else { sample(&logits, sampling, &mut rng) };
        if eos_ids.contains(&next) {
            return Ok(Generation { ids: out, stopped_on_eos: true });
        }
        out.push(next);
        input = vec![next];
    }
    Ok(Generation { ids: out, stopped_on_eos: false })
}

/// Index of the largest logit; the first one on ties, as `torch.argmax`.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Samples from softmax(logits / T) restricted to the smallest set of top tokens whose mass
/// reaches `top_p` (transformers' `TopPLogitsWarper` keeps at least one token).
fn sample(logits: &[f32], s: &Sampling, rng: &mut ChaCha8Rng) -> u32 {
    let t = s.temperature;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(u32, f64)> =
        logits.iter().enumerate().map(|(i, &v)| (i as u32, ((v as f64 - max) / t).exp())).collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut kept = 0;
    let mut mass = 0.0;
    for p in &probs {
        kept += 1;
        mass += p.1 / total;
        if mass >= s.top_p {
            break;
        }
    }
    probs.truncate(kept.max(1));
    let kept_total: f64 = probs.iter().map(|p| p.1).sum();
    let mut u = rng.random::<f64>() * kept_total;
    for (id, p) in &probs {
        if u < *p {
            return *id;
        }
        u -= p;
    }
    probs.last().map_or(0, |p| p.0)
}
