//! One data-parallel replica: the frozen model, its LoRA adapter, the optimizer state and
//! the collective that ties it to the other replicas. Executes one optimizer step from the
//! micro-batches the coordinator assigns to this rank.

use crate::adamw::{AdamW, AdamWConfig};
use crate::collective::Collective;
use crate::dropout::Dropout;
use crate::error::{Error, Result};
use crate::lora::LoraAdapter;
use crate::model::Llama;
use crate::train::{apply, StepAccumulator, StepStats};
use lorafleet_common::protocol::{Hash, PhaseSeconds};
use lorafleet_common::Batch;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Instant;

/// A model replica with its trainable state.
pub struct Replica {
    model: Arc<Llama>,
    adapter: LoraAdapter,
    optimizer: AdamW,
    collective: Box<dyn Collective>,
    seed: u64,
    checkpointing: bool,
    /// The training engine's buffers, sized by the first micro-batch and kept across steps.
    engine: Option<crate::engine::Engine>,
}

impl Replica {
    /// Wraps a model and a fresh or loaded adapter; `seed` keys the dropout masks and is the
    /// seed a fresh adapter was initialised with (`reset_to_initial` makes it again).
    pub fn new(
        model: Arc<Llama>,
        adapter: LoraAdapter,
        adam: AdamWConfig,
        collective: Box<dyn Collective>,
        seed: u64,
    ) -> Result<Self> {
        let vars: Vec<_> = adapter.named_vars().into_iter().map(|(_, v)| v).collect();
        let optimizer = AdamW::new(adam, &vars, model.device())?;
        Ok(Self { model, adapter, optimizer, collective, seed, checkpointing: false, engine: None })
    }

    /// Recompute blocks in the backward instead of keeping their activations.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.checkpointing = on;
    }

    /// The model.
    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// The adapter being trained.
    pub fn adapter(&self) -> &LoraAdapter {
        &self.adapter
    }

    /// The optimizer state.
    pub fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    /// Runs optimizer step `step` (1-based) over this rank's `micro_batches` at learning rate `lr`.
    /// Every rank must call this with the same number of micro-batches (some may be empty).
    /// Returns the step's statistics and where its time went (`data` is left to the caller).
    pub fn step(
        &mut self,
        micro_batches: &[Batch],
        step: u64,
        lr: f64,
        max_grad_norm: f64,
    ) -> Result<(StepStats, PhaseSeconds)> {
        let mut acc = StepAccumulator::new(&self.adapter).with_engine(self.engine.take());
        for batch in micro_batches.iter().filter(|b| b.rows > 0) {
            let dropout = Dropout::On { seed: self.seed, step, example_ids: batch.example_ids.clone() };
            acc.micro_batch(&self.model, &self.adapter, batch, &dropout, self.checkpointing)?;
        }
        let computed = Instant::now();
        let (forward, backward) = (acc.forward_seconds, acc.backward_seconds);
        let reduced = acc.reduce(&self.adapter, self.collective.as_mut(), step);
        self.engine = acc.into_engine();
        let (grads, stats) = reduced?;
        let reduced = Instant::now();
        apply(&self.adapter, &mut self.optimizer, grads, &stats, lr, max_grad_norm)?;
        let timings = PhaseSeconds {
            data: 0.0,
            forward,
            backward,
            allreduce: (reduced - computed).as_secs_f64(),
            optimizer: reduced.elapsed().as_secs_f64(),
        };
        Ok((stats, timings))
    }

    /// The names of the trainable parameters, in bucket order.
    fn names(&self) -> Vec<String> {
        self.adapter.named_vars().into_iter().map(|(n, _)| n).collect()
    }

    /// SHA-256 over the LoRA weights and the optimizer state (moments and step count), bit
    /// for bit: replicas that agree on it will produce the same adapter from here on.
    pub fn digest(&self) -> Result<Hash> {
        let mut h = Sha256::new();
        let (state, step) = self.optimizer.state_tensors(&self.names());
        h.update(step.to_le_bytes());
        for (name, var) in self.adapter.named_vars() {
            for (key, t) in [
                (name.clone(), var.as_tensor()),
                (format!("exp_avg.{name}"), &state[&format!("exp_avg.{name}")]),
                (format!("exp_avg_sq.{name}"), &state[&format!("exp_avg_sq.{name}")]),
            ] {
                h.update(key.as_bytes());
                for v in t.flatten_all()?.to_vec1::<f32>()? {
                    h.update(v.to_le_bytes());
                }
            }
        }
        Ok(h.finalize().into())
    }

    /// Reduces through another group from now on.
    pub fn set_collective(&mut self, collective: Box<dyn Collective>) {
        self.collective = collective;
    }

    /// Back to the run's initial state: the adapter as `LoraAdapter::init` makes it from the
    /// run's seed, and zeroed optimizer moments.
    pub fn reset_to_initial(&mut self) -> Result<()> {
        let fresh =
            LoraAdapter::init(self.adapter.config.clone(), self.model.config(), self.seed, self.model.device())?;
        self.copy_weights(&fresh)?;
        let vars: Vec<_> = self.adapter.named_vars().into_iter().map(|(_, v)| v).collect();
        self.optimizer = AdamW::new(self.optimizer.config().clone(), &vars, self.model.device())?;
        Ok(())
    }

    /// Sets the adapter's weights to `from`'s (an adapter of the same configuration, so the
    /// same tensors in the same order).
    fn copy_weights(&self, from: &LoraAdapter) -> Result<()> {
        for ((name, var), (_, new)) in self.adapter.named_vars().into_iter().zip(from.named_vars()) {
            if var.shape() != new.shape() {
                return Err(Error::Invalid(format!("{name}: shape {:?}, expected {:?}", new.shape(), var.shape())));
            }
            var.set(new.as_tensor())?;
        }
        Ok(())
    }

    /// Replaces the adapter's weights and the optimizer state with a checkpoint's (the bytes
    /// [`Replica::state_bytes`] made), which must hold state after `step`.
    pub fn restore(&mut self, step: u64, adapter: &[u8], optimizer: &[u8]) -> Result<()> {
        let invalid = |what: &str, e: String| Error::Invalid(format!("checkpoint of step {step}: {what}: {e}"));
        let device = self.model.device().clone();
        let loaded =
            crate::adapter_io::adapter_from_bytes(adapter, self.adapter.config.clone(), self.model.config(), &device)?;
        let optimizer = AdamW::from_bytes(self.optimizer.config().clone(), &self.names(), optimizer, &device)
            .map_err(|e| invalid("optimizer state", e))?;
        if optimizer.steps() != step {
            return Err(invalid("optimizer state", format!("holds {} steps", optimizer.steps())));
        }
        self.copy_weights(&loaded).map_err(|e| invalid("adapter", e.to_string()))?;
        self.optimizer = optimizer;
        Ok(())
    }

    /// The adapter and the optimizer state as safetensors files, for the coordinator to write.
    pub fn state_bytes(&self) -> Result<(Vec<u8>, Vec<u8>)> {
        Ok((crate::adapter_io::adapter_bytes(&self.adapter)?, self.optimizer.to_bytes(&self.names())?))
    }
}
