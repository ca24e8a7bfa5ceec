//! What the schedule is told before the first event: the run's shape, and the states its
//! ranks can be put back into.

use lorafleet_common::data::packing::Packing;
use lorafleet_common::data::schedule::EpochSteps;
use lorafleet_common::protocol::Hash;
use std::sync::Arc;
use std::time::Duration;

/// Everything the schedule needs to know about the run, fixed before the first event.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Ranks to wait for.
    pub world: usize,
    /// Optimizer steps in the run.
    pub total_steps: u64,
    /// Optimizer steps of each epoch.
    pub epochs: EpochSteps,
    /// Examples per optimizer step (all ranks together); with `packing`, packs.
    pub batch_size: usize,
    /// Rows per micro-batch: examples, or with `packing`, packs.
    pub micro_batch_size: usize,
    /// Data order seed.
    pub seed: u64,
    /// transformers' `group_by_length`.
    pub group_by_length: bool,
    /// Token length of each training example (for length grouping and the spread).
    pub train_lengths: Vec<usize>,
    /// Sample packing: every epoch's packs, the units of the steps in place of examples.
    pub packing: Option<Arc<Packing>>,
    /// Eval examples (0: no eval loss).
    pub eval_examples: usize,
    /// Exact-match pairs (0: no accuracy before/after).
    pub exact_pairs: usize,
    /// Evaluate every this many steps (0: only at the end).
    pub eval_steps: u64,
    /// Verify and save every this many steps (0: only at the end).
    pub save_steps: u64,
    /// Learning-rate schedule name, peak and warm-up.
    pub lr: (String, f64, usize),
    /// What every worker must have loaded.
    pub expected: Option<(Hash, Hash)>,
    /// A worker that sends nothing (not even a heartbeat) for this long is lost.
    pub heartbeat_timeout: Duration,
    /// Continue from a checkpoint instead of step 1.
    pub resume: Option<SavedState>,
    /// How long to wait for a replacement when a worker is lost after the start (zero: a
    /// lost worker stops the run).
    pub rejoin_timeout: Duration,
    /// Go on with this many workers or more when no replacement comes (`None`: stop).
    pub min_workers: Option<usize>,
    /// A step (or a regroup) running longer than this has a stuck rank (`None`: derived from
    /// the measured step time).
    pub step_timeout: Option<Duration>,
}

/// A state every rank can be put back into: the run's initial state (step 0, no bytes: each
/// rank re-creates it from the seed) or a checkpoint's.
#[derive(Clone, PartialEq, Eq)]
pub struct SavedState {
    /// The step it is after; training continues at `step + 1`.
    pub step: u64,
    /// [`ToCoordinator::Digest`] of the state when it was saved (unknown for step 0).
    pub digest: Option<Hash>,
    /// `adapter_model.safetensors` bytes.
    pub adapter: Arc<Vec<u8>>,
    /// `optimizer.safetensors` bytes.
    pub optimizer: Arc<Vec<u8>>,
}

impl SavedState {
    pub(super) fn initial() -> Self {
        Self { step: 0, digest: None, adapter: Arc::default(), optimizer: Arc::default() }
    }
}

impl std::fmt::Debug for SavedState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SavedState(step {}, {} + {} bytes)", self.step, self.adapter.len(), self.optimizer.len())
    }
}
