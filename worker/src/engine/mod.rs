//! The training engine: an explicit forward and backward of the whole LoRA step on the CPU,
//! with no autograd graph, over packed (unpadded) sequences and buffers reused across
//! micro-batches and steps.
//!
//! It computes what the reference model (`model` + candle's autograd, kept for evaluation,
//! generation and as the test oracle) computes, op for op: the same keyed dropout masks, the
//! same f32 arithmetic up to summation order and a vectorized `exp` (within 2 ulp). It covers
//! f32 models on the CPU, with dense or int8 block linears; other configurations (bf16 or f16
//! bases, CUDA) run the reference path until their bodies land.
//!
//! Gradient checkpointing keeps only block inputs and recomputes each block into the same
//! activation buffers in the backward; without it every block keeps its activations.

mod block;
mod packed;
mod profile;
mod weights;

use crate::dropout::{mix, Dropout};
use crate::error::{Error, Result};
use crate::lora::LoraAdapter;
use crate::model::Llama;
use block::{fit, Acts, BlockAdapters, Ctx, FwdScratch, GradScratch};
use lorafleet_common::Batch;
use lorafleet_kernels::fused::attention::AttentionShape;
use lorafleet_kernels::fused::head_loss::HeadScratch;
use lorafleet_kernels::fused::lora_linear::{Adapter, Dropout as KeyedDropout, PairGrads};
use lorafleet_kernels::fused::{head_loss, rms_norm};
use packed::Packed;
use profile::{time, Op};
use weights::{hold_adapter, hold_model, ModelWeights};

/// The engine's buffers and this step's LoRA gradient sums.
pub struct Engine {
    /// Block inputs `[N, hidden]` (index `L` is the last block's output).
    inputs: Vec<Vec<f32>>,
    /// One set of activations per block, or one shared set under checkpointing.
    acts: Vec<Acts>,
    grads: GradScratch,
    fwd: FwdScratch,
    final_x: Vec<f32>,
    final_rstd: Vec<f32>,
    head_h: Vec<f32>,
    head_dh: Vec<f32>,
    head_scratch: HeadScratch,
    dout: Vec<f32>,
    /// Gradient sums in `named_vars` order, one flat bucket (the all-reduce's layout).
    bucket: Vec<f32>,
    /// Whether it ran a training pass (the profile is printed for training engines only).
    trained: bool,
}

/// What one micro-batch reports.
pub struct MicroBatchStats {
    /// Summed token loss.
    pub loss_sum: f64,
    /// Scored tokens.
    pub tokens: usize,
    /// Seconds of the forward (including the head's fused gradient).
    pub forward_seconds: f64,
}

impl Engine {
    /// An engine for `model` and `adapter` (none: evaluation of the base model only), or
    /// `None` when the model is not one the CPU bodies cover (f32 weights, or int8 block
    /// linears, on the CPU). Whether to use it at all is the caller's `train::Path`.
    pub fn new(model: &Llama, adapter: Option<&LoraAdapter>) -> Option<Self> {
        hold_model(model)?;
        if let Some(a) = adapter {
            hold_adapter(a).ok()?;
        }
        let size = adapter.map_or(0, LoraAdapter::num_parameters);
        Some(Self {
            inputs: Vec::new(),
            acts: Vec::new(),
            grads: GradScratch::default(),
            fwd: FwdScratch::default(),
            final_x: Vec::new(),
            final_rstd: Vec::new(),
            head_h: Vec::new(),
            head_dh: Vec::new(),
            head_scratch: HeadScratch::default(),
            dout: Vec::new(),
            bucket: vec![0.0; size],
            trained: false,
        })
    }

    /// Takes this step's gradient sums (`named_vars` order) and zeroes them for the next step.
    pub fn take_bucket(&mut self) -> Vec<f32> {
        let zeros = vec![0.0; self.bucket.len()];
        std::mem::replace(&mut self.bucket, zeros)
    }

    /// Forward and backward of one micro-batch, adding its LoRA gradient sums.
    pub fn micro_batch(
        &mut self,
        model: &Llama,
        adapter: &LoraAdapter,
        batch: &Batch,
        dropout: &Dropout,
        checkpointing: bool,
    ) -> Result<MicroBatchStats> {
        self.trained = true;
        self.run(model, Some(adapter), batch, dropout, Mode::Train { checkpointing })
    }

    /// The summed token loss and scored tokens of `batch` (no dropout, no backward): the
    /// evaluation pass, through the same forward as training.
    pub fn eval_loss(&mut self, model: &Llama, adapter: Option<&LoraAdapter>, batch: &Batch) -> Result<(f64, usize)> {
        let s = self.run(model, adapter, batch, &Dropout::Off, Mode::Eval)?;
        Ok((s.loss_sum, s.tokens))
    }

    fn run(
        &mut self,
        model: &Llama,
        adapter: Option<&LoraAdapter>,
        batch: &Batch,
        dropout: &Dropout,
        mode: Mode,
    ) -> Result<MicroBatchStats> {
        // Evaluation keeps no activations for a backward: one block's buffers serve all.
        let checkpointing = match mode {
            Mode::Train { checkpointing } => checkpointing,
            Mode::Eval => true,
        };
        let start = std::time::Instant::now();
        let c = model.config();
        let packed = Packed::new(batch, c.vocab_size, model.parts().4.len())?;
        let held = hold_model(model)
            .ok_or_else(|| Error::Invalid("engine: the model is not f32 (or int8 block linears) on the CPU".into()))?;
        let weights = ModelWeights::new(model, &held);
        let lora_held = adapter.map(hold_adapter).transpose()?.unwrap_or_default();
        let (n, d, layers) = (packed.tokens(), c.hidden_size, c.num_hidden_layers);
        let keys = DropoutKeys::new(dropout, &packed, layers)?;
        let ctx = Ctx {
            cu_seqlens: &packed.cu_seqlens,
            positions: &packed.positions,
            cos: weights.cos,
            sin: weights.sin,
            attention: AttentionShape {
                heads: c.num_attention_heads,
                kv_heads: c.num_key_value_heads,
                head_dim: c.head_dim,
                window: c.sliding_window,
                scale: (1.0 / (c.head_dim as f64).sqrt()) as f32,
            },
            hidden: d,
            intermediate: c.intermediate_size,
            eps: c.rms_norm_eps,
        };
        // Adapters and gradient sums of each block, carved from the held parameters and the bucket.
        let slots = adapter.map_or_else(|| vec![[None; 7]; layers], |a| adapter_slots(a, layers));
        let params: Vec<&[f32]> = lora_held.iter().map(|h| h.slice()).collect();
        let adapters: Vec<BlockAdapters<'_>> = (0..layers)
            .map(|l| {
                std::array::from_fn(|m| {
                    slots[l][m].map(|(i, rank, scale, p, keep)| Adapter {
                        a: params[i],
                        b: params[i + 1],
                        rank,
                        scale,
                        dropout: keys.get(l, m, p, keep),
                    })
                })
            })
            .collect();

        // Forward: embeddings, blocks, final norm, head + loss with its gradient.
        self.inputs.resize_with(layers + 1, Vec::new);
        self.acts.resize_with(if checkpointing { 1 } else { layers }, Acts::default);
        let x0 = fit(&mut self.inputs[0], n * d);
        time(Op::Embed, || {
            for (row, &id) in x0.chunks_exact_mut(d).zip(&packed.ids) {
                row.copy_from_slice(&weights.embed[id as usize * d..(id as usize + 1) * d]);
            }
        });
        for l in 0..layers {
            let (done, rest) = self.inputs.split_at_mut(l + 1);
            let acts = &mut self.acts[if checkpointing { 0 } else { l }];
            let out = Some(fit(&mut rest[0], n * d));
            block::forward(&weights.blocks[l], &adapters[l], &ctx, &done[l], acts, out, &mut self.fwd);
        }
        let top = &self.inputs[layers];
        let (final_x, final_rstd) = (fit(&mut self.final_x, n * d), fit(&mut self.final_rstd, n));
        time(Op::Norm, || rms_norm::forward(top, weights.norm, c.rms_norm_eps, final_x, final_rstd));
        let scored = packed.scored.len();
        let h = fit(&mut self.head_h, scored * d);
        for (row, &i) in h.chunks_exact_mut(d).zip(&packed.scored) {
            row.copy_from_slice(&self.final_x[i * d..(i + 1) * d]);
        }
        let dh = match mode {
            Mode::Train { .. } => Some(fit(&mut self.head_dh, scored * d)),
            Mode::Eval => None,
        };
        let head_scratch = &mut self.head_scratch;
        let loss_sum = time(Op::Head, || {
            head_loss::forward_backward(h, weights.head, c.vocab_size, &packed.targets, dh, head_scratch)
        });
        let forward_seconds = start.elapsed().as_secs_f64();
        if scored == 0 || mode == Mode::Eval {
            return Ok(MicroBatchStats { loss_sum, tokens: scored, forward_seconds });
        }

        // Backward: head → final norm → blocks in reverse.
        let dfinal = fit(&mut self.final_x, n * d);
        dfinal.fill(0.0);
        for (row, &i) in self.head_dh.chunks_exact(d).zip(&packed.scored) {
            dfinal[i * d..(i + 1) * d].copy_from_slice(row);
        }
        let dout = fit(&mut self.dout, n * d);
        dout.fill(0.0);
        let (dfinal, top, rstd) = (&self.final_x, &self.inputs[layers], &self.final_rstd);
        time(Op::Norm, || rms_norm::backward(dfinal, top, weights.norm, rstd, dout));
        let mut grads = pair_grads(&mut self.bucket, &slots, &params);
        let lowest = (0..layers).find(|&l| slots[l].iter().any(Option::is_some)).unwrap_or(layers);
        for l in (lowest..layers).rev() {
            let acts = &mut self.acts[if checkpointing { 0 } else { l }];
            if checkpointing && l + 1 < layers {
                // Recompute the block into the shared buffers (its output is not needed again);
                // the top block's activations are still there from the forward.
                block::forward(&weights.blocks[l], &adapters[l], &ctx, &self.inputs[l], acts, None, &mut self.fwd);
            }
            let x = &self.inputs[l];
            block::backward(
                &weights.blocks[l],
                &adapters[l],
                &mut grads[l],
                &ctx,
                x,
                acts,
                &mut self.dout,
                l > lowest,
                &mut self.grads,
            );
        }
        Ok(MicroBatchStats { loss_sum, tokens: scored, forward_seconds })
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if self.trained {
            profile::report();
        }
    }
}

/// What a pass is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Forward and backward; `checkpointing` keeps block inputs only and recomputes.
    Train { checkpointing: bool },
    /// Forward and loss only.
    Eval,
}

/// Per block and module: the index of its A in `named_vars`, its rank, scale, dropout
/// probability (f32, as the reference compares) and kept-element factor.
type Slot = Option<(usize, usize, f32, f32, f32)>;

fn adapter_slots(adapter: &LoraAdapter, layers: usize) -> Vec<[Slot; 7]> {
    let mut next = 0;
    (0..layers)
        .map(|l| {
            std::array::from_fn(|m| {
                adapter.get(l, m).map(|p| {
                    let i = next;
                    next += 2;
                    let rank = p.a.dims()[0];
                    (i, rank, p.scaling as f32, p.dropout as f32, (1.0 / (1.0 - p.dropout)) as f32)
                })
            })
        })
        .collect()
}

/// The gradient sums of each block's pairs as disjoint slices of the bucket.
fn pair_grads<'b>(bucket: &'b mut [f32], slots: &[[Slot; 7]], params: &[&[f32]]) -> Vec<[Option<PairGrads<'b>>; 7]> {
    let mut rest = bucket;
    slots
        .iter()
        .map(|row| {
            let mut out: [Option<PairGrads<'b>>; 7] = Default::default();
            for (m, slot) in row.iter().enumerate() {
                if let Some((i, ..)) = slot {
                    let (da, tail) = std::mem::take(&mut rest).split_at_mut(params[*i].len());
                    let (db, tail) = tail.split_at_mut(params[*i + 1].len());
                    rest = tail;
                    out[m] = Some(PairGrads { da, db });
                }
            }
            out
        })
        .collect()
}

/// The dropout keys of every (block, module, sequence): the reference model's
/// `mix(seed, step, example, layer, module)`, so both paths draw the same masks.
struct DropoutKeys<'p> {
    keys: Vec<u64>,
    sequences: usize,
    cu_seqlens: &'p [usize],
}

impl<'p> DropoutKeys<'p> {
    /// The keys of `dropout` (each row's example id, as the reference model reads them), or
    /// none when dropout is off.
    fn new(dropout: &Dropout, packed: &'p Packed, layers: usize) -> Result<Option<Self>> {
        let Dropout::On { seed, step, example_ids } = dropout else { return Ok(None) };
        let examples = packed.examples.iter().map(|&i| example_ids.get(i).copied()).collect::<Option<Vec<u64>>>();
        let examples = examples.ok_or_else(|| Error::Invalid("dropout: fewer example ids than sequences".into()))?;
        let sequences = examples.len();
        let mut keys = Vec::with_capacity(layers * 7 * sequences);
        for l in 0..layers {
            for m in 0..7 {
                keys.extend(examples.iter().map(|&e| mix(&[*seed, *step, e, l as u64, m as u64])));
            }
        }
        Ok(Some(Self { keys, sequences, cu_seqlens: &packed.cu_seqlens }))
    }
}

trait KeysFor {
    fn get(&self, layer: usize, module: usize, p: f32, keep: f32) -> Option<KeyedDropout<'_>>;
}

impl KeysFor for Option<DropoutKeys<'_>> {
    fn get(&self, layer: usize, module: usize, p: f32, keep: f32) -> Option<KeyedDropout<'_>> {
        let k = self.as_ref().filter(|_| p > 0.0)?;
        let at = (layer * 7 + module) * k.sequences;
        Some(KeyedDropout { p, keep, keys: &k.keys[at..at + k.sequences], cu_seqlens: k.cu_seqlens })
    }
}
