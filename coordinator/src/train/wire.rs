//! Turns the schedule's commands (example indices) into protocol messages (token batches,
//! prompts): the data half of "the coordinator tokenizes once and ships what each rank needs".

use crate::schedule::Command;
use lorafleet_common::data::Example;
use lorafleet_common::protocol::{Hash, Peers, ToWorker};
use lorafleet_common::Batch;

/// The run's data and identity, ready to be cut into commands.
pub struct Wire {
    /// The run's label.
    pub run_id: String,
    /// The resolved configuration, as TOML.
    pub config_toml: String,
    /// Training examples (indices of `Command::Step` point here).
    pub train: Vec<Example>,
    /// Eval examples.
    pub eval: Vec<Example>,
    /// Exact-match (prompt, answer) pairs.
    pub pairs: Vec<(String, String)>,
    /// Padding id.
    pub pad: u32,
    /// Rows per eval batch.
    pub micro: usize,
    /// Generation budget for exact match.
    pub max_new_tokens: u32,
    /// Secret of the ring collective.
    pub ring_key: Hash,
    /// The resume checkpoint's adapter and optimizer bytes.
    pub resume: Option<(Vec<u8>, Vec<u8>)>,
}

impl Wire {
    /// The message for `cmd`.
    pub fn message(&self, cmd: Command) -> ToWorker {
        match cmd {
            Command::Welcome { rank, world } => ToWorker::Welcome {
                rank: rank as u32,
                world: world as u32,
                run_id: self.run_id.clone(),
                config_toml: self.config_toml.clone(),
            },
            Command::Peers { ring, nccl_id } => ToWorker::Peers(Peers { ring, ring_key: self.ring_key, nccl_id }),
            Command::Step { step, lr, micro_batches } => ToWorker::Step {
                step,
                lr,
                micro_batches: micro_batches
                    .iter()
                    .map(|ids| Batch::from_examples(ids.iter().map(|&i| &self.train[i]), self.pad))
                    .collect(),
            },
            Command::Eval(range) => ToWorker::Eval {
                batches: self.eval[range]
                    .chunks(self.micro.max(1))
                    .map(|c| Batch::from_examples(c, self.pad))
                    .collect(),
            },
            Command::ExactMatch { with_adapter, pairs } => ToWorker::ExactMatch {
                with_adapter,
                pairs: self.pairs[pairs].to_vec(),
                max_new_tokens: self.max_new_tokens,
            },
            Command::Verify(step) => ToWorker::Verify { step },
            Command::Fetch => ToWorker::Fetch,
            Command::Restore(step) => {
                let (adapter, optimizer) = self.resume.clone().unwrap_or_default();
                ToWorker::Restore { step, adapter, optimizer }
            }
            Command::Shutdown(reason) => ToWorker::Shutdown { reason },
        }
    }
}
