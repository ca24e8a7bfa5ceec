//! One rank's share of an optimizer step: micro-batches in, reduced and applied LoRA
//! gradients out.
//!
//! Gradients are accumulated as sums of token losses and divided by the *global* number of
//! target tokens only after the all-reduce, so N ranks with micro-batch m equal one rank
//! with N·m, whatever the padding or the split of tokens across ranks.

use crate::adamw::AdamW;
use crate::collective::Collective;
use crate::dropout::Dropout;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::lora::LoraAdapter;
use crate::model::Llama;
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};
use lorafleet_common::Batch;

/// The summed token loss of `batch` as a scalar f32 tensor attached to the LoRA graph,
/// and the number of target tokens. The lm_head runs on scored positions only.
pub fn loss_sum(
    model: &Llama,
    adapter: Option<&LoraAdapter>,
    batch: &Batch,
    dropout: &Dropout,
) -> Result<(Tensor, usize)> {
    let ids = Tensor::from_slice(&batch.input_ids, (batch.rows, batch.seq_len), model.device())?;
    let hidden = model.hidden_states(&ids, Some(&batch.attention_mask), adapter, dropout)?;
    head_loss(model, &hidden, batch)
}

/// The summed token loss of final hidden states `[rows, seq, hidden]` against `batch`'s labels.
pub fn head_loss(model: &Llama, hidden: &Tensor, batch: &Batch) -> Result<(Tensor, usize)> {
    let device = model.device();
    let (positions, targets) = batch.scored_positions();
    if positions.is_empty() {
        return Ok((Tensor::zeros((), DType::F32, device)?, 0));
    }
    let flat = hidden.reshape((batch.rows * batch.seq_len, model.config().hidden_size))?;
    let picked = flat.index_select(&Tensor::from_slice(&positions, positions.len(), device)?, 0)?;
    let losses = match model.bf16_head() {
        Some(head) => lorafleet_kernels::lm_head_cross_entropy_bf16(&picked, head, &targets)?,
        None => lorafleet_kernels::lm_head_cross_entropy(&picked, model.head_weight(), &targets)?,
    };
    Ok((losses.sum_all()?, positions.len()))
}

/// Which implementation computes a micro-batch's forward and backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// The fused engine where it covers the model (f32, or bf16 or int8 block linears, on the
    /// CPU), else the reference.
    Engine,
    /// The reference model and candle's autograd (the engine's test oracle).
    Reference,
}

impl Path {
    /// The engine unless `LORAFLEET_ENGINE=reference` asks for the reference path (to
    /// compare the two in a benchmark or to rule the engine out when chasing a bug).
    pub fn from_env() -> Self {
        match std::env::var("LORAFLEET_ENGINE").as_deref() {
            Ok("reference") => Self::Reference,
            _ => Self::Engine,
        }
    }
}

/// Gradient sums of one rank for one optimizer step.
pub struct StepAccumulator {
    grads: Vec<Option<Tensor>>,
    path: Path,
    /// The engine (buffers kept across steps by whoever owns the accumulator's engine).
    engine: Option<Engine>,
    /// Whether the engine's bucket holds this step's sums.
    engine_used: bool,
    loss_sum: f64,
    tokens: f64,
    /// Seconds in forward passes so far.
    pub forward_seconds: f64,
    /// Seconds in backward passes (and recomputation) so far.
    pub backward_seconds: f64,
}

/// What a finished step reports.
#[derive(Clone, Debug, PartialEq)]
pub struct StepStats {
    /// Global mean token loss of the step (before the update).
    pub loss: f64,
    /// Global target tokens.
    pub tokens: u64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

impl StepAccumulator {
    /// An empty accumulator for `adapter`'s parameters, computing through `Path::from_env()`.
    pub fn new(adapter: &LoraAdapter) -> Self {
        Self::with_path(adapter, Path::from_env())
    }

    /// An empty accumulator computing through `path`.
    pub fn with_path(adapter: &LoraAdapter, path: Path) -> Self {
        Self {
            grads: adapter.named_vars().iter().map(|_| None).collect(),
            path,
            engine: None,
            engine_used: false,
            loss_sum: 0.0,
            tokens: 0.0,
            forward_seconds: 0.0,
            backward_seconds: 0.0,
        }
    }

    /// Hands in an engine whose buffers an earlier step sized (its bucket must be empty).
    pub fn with_engine(mut self, engine: Option<Engine>) -> Self {
        self.engine = engine;
        self
    }

    /// Whether the engine (not the reference path) computed the micro-batches so far.
    pub fn engine_used(&self) -> bool {
        self.engine_used
    }

    /// The engine, for the next step to reuse its buffers.
    pub fn into_engine(self) -> Option<Engine> {
        self.engine
    }

    /// Runs forward and backward on one micro-batch and adds its gradient sums; with
    /// `checkpointing`, only block inputs are kept and blocks are recomputed in the backward.
    /// Returns the micro-batch's loss sum and token count.
    pub fn micro_batch(
        &mut self,
        model: &Llama,
        adapter: &LoraAdapter,
        batch: &Batch,
        dropout: &Dropout,
        checkpointing: bool,
    ) -> Result<(f64, usize)> {
        let start = std::time::Instant::now();
        if self.path == Path::Engine && self.engine.is_none() {
            self.engine = Engine::new(model, Some(adapter));
            if self.engine.is_none() {
                // The engine does not cover this model: the reference path, for good.
                self.path = Path::Reference;
            }
        }
        if let Some(engine) = self.engine.as_mut().filter(|_| self.path == Path::Engine) {
            let s = engine.micro_batch(model, adapter, batch, dropout, checkpointing)?;
            self.engine_used = true;
            self.forward_seconds += s.forward_seconds;
            self.backward_seconds += start.elapsed().as_secs_f64() - s.forward_seconds;
            self.loss_sum += s.loss_sum;
            self.tokens += s.tokens as f64;
            return Ok((s.loss_sum, s.tokens));
        }
        if batch.is_packed() {
            return Err(crate::error::Error::Invalid(
                "packed rows (sample packing) need the training engine (f32 or int8 weights on the CPU)".into(),
            ));
        }
        let (value, tokens, grads, forward) = if checkpointing {
            crate::recompute::backward(model, adapter, batch, dropout)?
        } else {
            let (loss, tokens) = loss_sum(model, Some(adapter), batch, dropout)?;
            let value = f64::from(loss.to_scalar::<f32>()?);
            let forward = start.elapsed().as_secs_f64();
            let grads = if tokens > 0 { loss.backward()? } else { GradStore::default() };
            (value, tokens, grads, forward)
        };
        self.forward_seconds += forward;
        self.backward_seconds += start.elapsed().as_secs_f64() - forward;
        for (slot, (_, var)) in self.grads.iter_mut().zip(adapter.named_vars()) {
            if let Some(g) = grads.get(var.as_tensor()) {
                *slot = Some(match slot.take() {
                    Some(acc) => (acc + g)?,
                    None => g.clone(),
                });
            }
        }
        self.loss_sum += value;
        self.tokens += tokens as f64;
        Ok((value, tokens))
    }

    /// All-reduces the sums, divides by the global token count and returns the mean
    /// gradients (in `named_vars` order) with the step's statistics; `step` is only used to
    /// name a non-finite value.
    pub fn reduce(
        &mut self,
        adapter: &LoraAdapter,
        collective: &mut dyn Collective,
        step: u64,
    ) -> Result<(Vec<Tensor>, StepStats)> {
        let vars = adapter.named_vars();
        let device = vars
            .first()
            .map(|(_, v)| v.device().clone())
            .ok_or_else(|| Error::Invalid("adapter has no parameters".into()))?;
        if self.engine_used && self.grads.iter().any(Option::is_some) {
            return Err(Error::Invalid("a step's micro-batches ran on both the engine and the reference path".into()));
        }
        let local = match self.engine.as_mut() {
            Some(engine) if self.engine_used => {
                let flat = engine.take_bucket();
                let n = flat.len();
                Tensor::from_vec(flat, n, &device)?
            }
            _ => {
                let flat: Vec<Tensor> = std::mem::take(&mut self.grads)
                    .into_iter()
                    .zip(&vars)
                    .map(|(g, (_, v))| match g {
                        Some(g) => g.flatten_all(),
                        None => Tensor::zeros(v.elem_count(), DType::F32, &device),
                    })
                    .collect::<candle_core::Result<_>>()?;
                Tensor::cat(&flat, 0)?
            }
        };
        self.engine_used = false;
        let bucket = collective.all_reduce_grads(local)?;
        let mut stats = [self.loss_sum, self.tokens];
        collective.all_reduce_stats(&mut stats)?;
        let [loss_sum, tokens] = stats;
        if !loss_sum.is_finite() {
            return Err(Error::NonFinite { what: "loss", step });
        }
        let scale = if tokens > 0.0 { 1.0 / tokens } else { 0.0 };
        let bucket = (bucket * scale)?;
        let sq = bucket.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !sq.is_finite() {
            return Err(Error::NonFinite { what: "gradient", step });
        }
        let mut grads = Vec::with_capacity(vars.len());
        let mut at = 0;
        for (_, v) in &vars {
            let n = v.elem_count();
            grads.push(bucket.narrow(0, at, n)?.reshape(v.shape())?);
            at += n;
        }
        let loss = if tokens > 0.0 { loss_sum / tokens } else { 0.0 };
        Ok((grads, StepStats { loss, tokens: tokens as u64, grad_norm: sq.sqrt() }))
    }
}

/// Scales `grads` so their global norm is at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_` does (`max_norm <= 0` disables clipping).
pub fn clip_grad_norm(grads: Vec<Tensor>, norm: f64, max_norm: f64) -> Result<Vec<Tensor>> {
    if max_norm <= 0.0 {
        return Ok(grads);
    }
    let coef = (max_norm / (norm + 1e-6)).min(1.0);
    if coef >= 1.0 {
        return Ok(grads);
    }
    Ok(grads.into_iter().map(|g| g * coef).collect::<candle_core::Result<_>>()?)
}

/// Clips and applies mean gradients to the adapter.
pub fn apply(
    adapter: &LoraAdapter,
    opt: &mut AdamW,
    grads: Vec<Tensor>,
    stats: &StepStats,
    lr: f64,
    max_grad_norm: f64,
) -> Result<()> {
    let grads = clip_grad_norm(grads, stats.grad_norm, max_grad_norm)?;
    let vars: Vec<_> = adapter.named_vars().into_iter().map(|(_, v)| v).collect();
    opt.step(&vars, &grads, lr)
}
