//! Turns the schedule's commands (example indices) into protocol messages (token batches,
//! prompts): the data half of "the coordinator tokenizes once and ships what each rank needs".

use crate::schedule::Command;
use lorafleet_common::data::Example;
use lorafleet_common::protocol::{Hash, Peers, ToWorker};
use lorafleet_common::Batch;
use sha2::{Digest, Sha256};

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
    /// Sample packing: a step's rows are packs (`Batch::from_packed_rows`), else one example
    /// each. Eval batches are never packed.
    pub sample_packing: bool,
    /// Rows per eval batch.
    pub micro: usize,
    /// Generation budget for exact match.
    pub max_new_tokens: u32,
    /// Secret of the ring collective (each generation's ring key is derived from it).
    pub ring_key: Hash,
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
            Command::Peers { ring, nccl_id, generation } => {
                // A rank fenced out of an earlier generation cannot join the new ring.
                let mut h = Sha256::new();
                h.update(self.ring_key);
                h.update(generation.to_le_bytes());
                ToWorker::Peers(Peers { ring, ring_key: h.finalize().into(), nccl_id })
            }
            Command::Regroup { rank, world, generation } => {
                ToWorker::Regroup { rank: rank as u32, world: world as u32, generation }
            }
            Command::Step { generation, step, lr, micro_batches } => ToWorker::Step {
                generation,
                step,
                lr,
                micro_batches: micro_batches.iter().map(|rows| self.train_batch(rows)).collect(),
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
            Command::Restore(state) => ToWorker::Restore {
                step: state.step,
                adapter: state.adapter.to_vec(),
                optimizer: state.optimizer.to_vec(),
            },
            Command::Shutdown(reason) => ToWorker::Shutdown { reason },
        }
    }

    /// A training micro-batch of `rows` (each a list of example indices).
    fn train_batch(&self, rows: &[Vec<usize>]) -> Batch {
        if self.sample_packing {
            let rows: Vec<Vec<&Example>> = rows.iter().map(|r| r.iter().map(|&i| &self.train[i]).collect()).collect();
            Batch::from_packed_rows(&rows, self.pad)
        } else {
            Batch::from_examples(rows.iter().flatten().map(|&i| &self.train[i]), self.pad)
        }
    }
}
