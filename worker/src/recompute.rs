//! Gradient checkpointing: the forward keeps only each block's input; the backward recomputes
//! one block at a time and chains the gradient of its input.
//!
//! Activation memory becomes one block's worth instead of the whole network's. The recompute
//! is exact because every random draw (LoRA dropout) is keyed by (seed, step, example, layer,
//! module), so a block's second forward sees the same masks as its first.

use crate::dropout::Dropout;
use crate::error::{Error, Result};
use crate::lora::LoraAdapter;
use crate::model::Llama;
use crate::train::head_loss;
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use lorafleet_common::Batch;

/// The loss sum, target tokens and LoRA gradient sums of one micro-batch, and the seconds
/// its forward pass took (the rest is backward and recomputation).
pub fn backward(
    model: &Llama,
    adapter: &LoraAdapter,
    batch: &Batch,
    dropout: &Dropout,
) -> Result<(f64, usize, GradStore, f64)> {
    let start = std::time::Instant::now();
    let ids = Tensor::from_slice(&batch.input_ids, (batch.rows, batch.seq_len), model.device())?;
    let ctx = model.context(batch.rows, batch.seq_len, Some(&batch.attention_mask), Some(adapter), dropout)?;
    let mut inputs = Vec::with_capacity(model.num_blocks());
    let mut x = model.embed(&ids)?;
    for i in 0..model.num_blocks() {
        inputs.push(x.clone());
        x = model.block(i, &x, &ctx, None)?.detach();
    }
    let top = Var::from_tensor(&x)?;
    let (loss, tokens) = head_loss(model, &model.final_norm(top.as_tensor())?, batch)?;
    let value = f64::from(loss.to_scalar::<f32>()?);
    let forward_seconds = start.elapsed().as_secs_f64();
    let mut store = GradStore::default();
    if tokens == 0 {
        return Ok((value, 0, store, forward_seconds));
    }
    let lost = || Error::Invalid("gradient checkpointing: the gradient did not reach a block input".into());
    let mut g = loss.backward()?.get(top.as_tensor()).cloned().ok_or_else(lost)?;
    drop(loss);
    for i in (0..model.num_blocks()).rev() {
        let vars = adapter.layer_vars(i);
        // The embedding output needs no gradient: below block 0 nothing is trainable.
        let input = if i > 0 { Some(Var::from_tensor(&inputs[i])?) } else { None };
        if input.is_none() && vars.is_empty() {
            break;
        }
        let x_in = input.as_ref().map_or_else(|| inputs[i].clone(), |v| v.as_tensor().clone());
        let y = model.block(i, &x_in, &ctx, None)?;
        let grads = y.mul(&g)?.sum_all()?.backward()?;
        for var in vars {
            if let Some(gv) = grads.get(var.as_tensor()) {
                store.insert(var.as_tensor(), gv.clone());
            }
        }
        if let Some(v) = input {
            g = grads.get(v.as_tensor()).cloned().ok_or_else(lost)?;
        }
        inputs.truncate(i);
    }
    Ok((value, tokens, store, forward_seconds))
}
