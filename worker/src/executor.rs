//! A replica that executes the coordinator's commands: the same code serves a worker process
//! (commands from the network) and the coordinator's in-process single worker.

use crate::adamw::AdamWConfig;
use crate::collective::Collective;
use crate::error::{Error, Result};
use crate::eval::{eval_batches, exact_match_count};
use crate::replica::Replica;
use crate::{Llama, LoraAdapter, Tokenizer};
use lorafleet_common::config::TrainConfig;
use lorafleet_common::protocol::{PhaseSeconds, StepReport, ToCoordinator, ToWorker};
use lorafleet_common::Batch;
use std::sync::Arc;

/// The model, its tokenizer and the trainable replica.
pub struct Executor {
    model: Arc<Llama>,
    tokenizer: Tokenizer,
    replica: Replica,
    max_grad_norm: f64,
}

impl Executor {
    /// A fresh adapter (seeded by the run) on `model`, reducing through `collective`.
    pub fn new(
        config: &TrainConfig,
        model: Arc<Llama>,
        tokenizer: Tokenizer,
        collective: Box<dyn Collective>,
    ) -> Result<Self> {
        let adapter = LoraAdapter::init(config.lora(), model.config(), config.seed, model.device())?;
        let adam = AdamWConfig {
            beta1: config.adam_beta1,
            beta2: config.adam_beta2,
            eps: config.adam_epsilon,
            weight_decay: config.weight_decay,
        };
        let mut replica = Replica::new(model.clone(), adapter, adam, collective, config.seed)?;
        replica.set_gradient_checkpointing(config.gradient_checkpointing);
        Ok(Self { model, tokenizer, replica, max_grad_norm: config.max_grad_norm })
    }

    /// Reduces through another group from now on (the coordinator regrouped the ranks).
    pub fn set_collective(&mut self, collective: Box<dyn Collective>) {
        self.replica.set_collective(collective);
    }

    /// Runs one command and returns its answer. Set-up messages are refused.
    pub fn execute(&mut self, cmd: ToWorker) -> Result<ToCoordinator> {
        Ok(match cmd {
            ToWorker::Step { generation, step, lr, micro_batches } => {
                let unpacked = std::time::Instant::now();
                micro_batches.iter().try_for_each(check_batch)?;
                let data = unpacked.elapsed().as_secs_f64();
                let (stats, seconds) = self.replica.step(&micro_batches, step, lr, self.max_grad_norm)?;
                ToCoordinator::StepDone(StepReport {
                    generation,
                    step,
                    loss: stats.loss,
                    tokens: stats.tokens,
                    grad_norm: stats.grad_norm,
                    local_tokens: micro_batches.iter().map(Batch::real_tokens).sum(),
                    local_samples: micro_batches.iter().map(|b| b.sequences() as u64).sum(),
                    seconds: PhaseSeconds { data, ..seconds },
                })
            }
            ToWorker::Eval { batches } => {
                batches.iter().try_for_each(check_batch)?;
                let l = eval_batches(&self.model, Some(self.replica.adapter()), batches)?;
                ToCoordinator::EvalDone { loss_sum: l.loss_sum, tokens: l.tokens }
            }
            ToWorker::ExactMatch { with_adapter, pairs, max_new_tokens } => {
                let adapter = with_adapter.then(|| self.replica.adapter());
                let correct =
                    exact_match_count(&self.model, adapter, &self.tokenizer, &pairs, max_new_tokens as usize)?;
                ToCoordinator::ExactMatchDone { correct: correct as u64, total: pairs.len() as u64 }
            }
            ToWorker::Verify { step } => ToCoordinator::Digest { step, digest: self.replica.digest()? },
            ToWorker::Restore { step: 0, adapter, optimizer } if adapter.is_empty() && optimizer.is_empty() => {
                self.replica.reset_to_initial()?;
                ToCoordinator::Restored { step: 0, digest: self.replica.digest()? }
            }
            ToWorker::Restore { step, adapter, optimizer } => {
                self.replica.restore(step, &adapter, &optimizer)?;
                ToCoordinator::Restored { step, digest: self.replica.digest()? }
            }
            ToWorker::Fetch => {
                let (adapter, optimizer) = self.replica.state_bytes()?;
                ToCoordinator::State { adapter, optimizer }
            }
            other => return Err(unexpected(&other)),
        })
    }
}

/// A batch from the wire must be self-consistent before it reaches the model.
fn check_batch(b: &Batch) -> Result<()> {
    let n = b.rows * b.seq_len;
    let shape = b.input_ids.len() != n || b.attention_mask.len() != n || b.labels.len() != n;
    if shape || b.example_ids.len() != b.sequences() || (b.is_packed() && b.packed.len() != b.rows) {
        return Err(Error::Invalid(format!("malformed batch of {} x {} from the coordinator", b.rows, b.seq_len)));
    }
    Ok(())
}

/// The error for a message that has no place at this point of the protocol.
pub(crate) fn unexpected(msg: &ToWorker) -> Error {
    Error::Invalid(format!("unexpected command {}", lorafleet_common::protocol::brief(msg, 80)))
}
