//! Evaluation: token-weighted loss over answer tokens, and exact-match accuracy of greedy
//! answers.

use crate::dropout::Dropout;
use crate::engine::Engine;
use crate::error::Result;
use crate::generate::{generate, Sampling};
use crate::lora::LoraAdapter;
use crate::model::Llama;
use crate::tokenizer::Tokenizer;
use crate::train::{loss_sum, Path};
use lorafleet_common::data::Example;
use lorafleet_common::Batch;

/// Summed loss and target-token count.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LossSum {
    /// Σ token cross-entropy.
    pub loss_sum: f64,
    /// Target tokens.
    pub tokens: u64,
}

impl LossSum {
    /// Mean token loss (0 without tokens).
    pub fn mean(&self) -> f64 {
        if self.tokens == 0 {
            0.0
        } else {
            self.loss_sum / self.tokens as f64
        }
    }
}

/// Loss over `examples`, `batch_rows` at a time, without dropout.
pub fn eval_loss(
    model: &Llama,
    adapter: Option<&LoraAdapter>,
    examples: &[Example],
    pad_id: u32,
    batch_rows: usize,
) -> Result<LossSum> {
    let batches = examples.chunks(batch_rows.max(1)).map(|chunk| Batch::from_examples(chunk, pad_id));
    eval_batches(model, adapter, batches)
}

/// Loss over ready-made batches, without dropout.
pub fn eval_batches(
    model: &Llama,
    adapter: Option<&LoraAdapter>,
    batches: impl IntoIterator<Item = Batch>,
) -> Result<LossSum> {
    let mut total = LossSum::default();
    // The training engine's forward where it covers the model, so that eval loss and
    // training see the same numbers; the reference model otherwise.
    let mut engine = match Path::from_env() {
        Path::Engine => Engine::new(model, adapter),
        Path::Reference => None,
    };
    for batch in batches {
        let (loss, tokens) = match engine.as_mut() {
            Some(e) => e.eval_loss(model, adapter, &batch)?,
            None => {
                let (loss, tokens) = loss_sum(model, adapter, &batch, &Dropout::Off)?;
                (f64::from(loss.to_scalar::<f32>()?), tokens)
            }
        };
        total.loss_sum += loss;
        total.tokens += tokens as u64;
    }
    Ok(total)
}

/// The fraction of `(prompt, expected)` pairs whose greedy answer equals the expected answer
/// after trimming surrounding whitespace. Prompts are encoded with the tokenizer's special
/// tokens; generation stops at EOS or after `max_new_tokens`.
pub fn exact_match(
    model: &Llama,
    adapter: Option<&LoraAdapter>,
    tokenizer: &Tokenizer,
    pairs: &[(String, String)],
    max_new_tokens: usize,
) -> Result<f64> {
    let hits = exact_match_count(model, adapter, tokenizer, pairs, max_new_tokens)?;
    Ok(hits as f64 / pairs.len().max(1) as f64)
}

/// How many of `pairs` [`exact_match`] counts as right.
pub fn exact_match_count(
    model: &Llama,
    adapter: Option<&LoraAdapter>,
    tokenizer: &Tokenizer,
    pairs: &[(String, String)],
    max_new_tokens: usize,
) -> Result<usize> {
    let sampling = Sampling { max_new_tokens, ..Sampling::default() };
    let mut hits = 0usize;
    for (prompt, expected) in pairs {
        let ids = tokenizer.encode(prompt, true)?;
        let out = generate(model, adapter, &ids, &tokenizer.eos_ids, &sampling)?;
        hits += usize::from(tokenizer.decode(&out.ids)?.trim() == expected.trim());
    }
    Ok(hits)
}
