//! What goes into the schedule (events from the shell) and what comes out (commands for the
//! ranks, actions for the shell).

use super::{SavedState, WorkerId};
use lorafleet_common::protocol::{Hash, Resources, StepReport, ToCoordinator};
use std::ops::Range;

/// One rank's share of a step: `micro_batches[k][row]` lists the examples of a row of its
/// k-th micro-batch (one example, or with sample packing, a pack's).
pub type MicroBatches = Vec<Vec<Vec<usize>>>;

/// What the shell reports.
#[derive(Debug)]
pub enum Event {
    /// A worker passed the handshake (token proved).
    Joined {
        /// Its connection.
        id: WorkerId,
        /// Its name.
        name: String,
    },
    /// A message from a joined worker.
    Message {
        /// Its connection.
        id: WorkerId,
        /// The message.
        msg: ToCoordinator,
    },
    /// A joined worker's connection closed.
    Lost {
        /// Its connection.
        id: WorkerId,
        /// Why.
        reason: String,
    },
    /// A local worker process ended (faster news than its connection's idle timeout).
    Exited {
        /// The name it joined under.
        name: String,
        /// How it ended.
        status: String,
    },
}

/// What the schedule asks a rank to do; the shell adds the data (token ids, prompts).
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// You are `rank` of `world`.
    Welcome {
        /// Rank.
        rank: usize,
        /// Ranks.
        world: usize,
    },
    /// Connect to the other ranks.
    Peers {
        /// Ring addresses in rank order.
        ring: Vec<String>,
        /// Rank 0's NCCL id.
        nccl_id: Option<Vec<u8>>,
        /// The group's generation (each one's ring has a key of its own).
        generation: u64,
    },
    /// Abandon the current group and join the re-formed one as `rank`.
    Regroup {
        /// New rank.
        rank: usize,
        /// Ranks.
        world: usize,
        /// New generation.
        generation: u64,
    },
    /// Train on these micro-batches of rows of training-example indices (one example per
    /// row, or with sample packing, a pack's).
    Step {
        /// The run's generation.
        generation: u64,
        /// 1-based step.
        step: u64,
        /// Learning rate.
        lr: f64,
        /// This rank's micro-batches: `micro_batches[k][row]` lists the examples of a row.
        micro_batches: MicroBatches,
    },
    /// Eval loss over these eval examples.
    Eval(Range<usize>),
    /// Exact match over these pairs.
    ExactMatch {
        /// With the trained adapter.
        with_adapter: bool,
        /// Which pairs.
        pairs: Range<usize>,
    },
    /// Report the state digest.
    Verify(u64),
    /// Send the trainable state.
    Fetch,
    /// Load this state.
    Restore(SavedState),
    /// Exit.
    Shutdown(String),
}

/// When in the run an exact-match score was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Base model.
    Before,
    /// Trained adapter.
    After,
}

/// What the shell must do.
#[derive(Debug)]
pub enum Action {
    /// Send a command to a worker.
    Send(WorkerId, Command),
    /// Close a connection that has no place in the run (lost before the start).
    Drop(WorkerId, String),
    /// A line for the user.
    Say(String),
    /// All ranks finished a step.
    Stepped {
        /// Epoch as a fraction.
        epoch: f64,
        /// Learning rate used.
        lr: f64,
        /// (rank, name, report) of every rank, in rank order.
        reports: Vec<(usize, String, StepReport)>,
    },
    /// Who is in the run, in rank order (after every join or departure).
    Roster(Vec<String>),
    /// A worker was lost after the start and fenced (its connection is dropped; a local one
    /// is to be killed if it still runs).
    WorkerLost {
        /// Its rank.
        rank: usize,
        /// Its name.
        name: String,
    },
    /// Every rank is back in the state after `step`, in generation `generation`, after a
    /// loss (steps after `step` are trained again).
    Recovered {
        /// The state's step.
        step: u64,
        /// The new generation.
        generation: u64,
    },
    /// A message of an abandoned generation was ignored.
    Fenced(String),
    /// A rank met a NaN or infinite loss or gradient (the run stops next).
    NonFinite,
    /// A worker's heartbeat.
    Heartbeat {
        /// Rank (None before the run starts).
        rank: Option<usize>,
        /// Name.
        name: String,
        /// Its resource use.
        resources: Resources,
    },
    /// Eval loss summed over ranks.
    Evaluated {
        /// After this step.
        step: u64,
        /// Σ token loss.
        loss_sum: f64,
        /// Target tokens.
        tokens: u64,
    },
    /// Exact-match score summed over ranks.
    Scored {
        /// Before or after training.
        stage: Stage,
        /// Right answers.
        correct: u64,
        /// Pairs.
        total: u64,
    },
    /// Write `checkpoint-STEP` (replicas agreed).
    Checkpoint {
        /// The step.
        step: u64,
        /// Adapter safetensors bytes.
        adapter: Vec<u8>,
        /// Optimizer safetensors bytes.
        optimizer: Vec<u8>,
        /// The replicas' agreed state digest (a resume checks the restored state against it).
        digest: Hash,
    },
    /// Write the final adapter (replicas agreed).
    Final {
        /// Steps trained.
        step: u64,
        /// Adapter safetensors bytes.
        adapter: Vec<u8>,
    },
    /// The run is complete; every worker was told to shut down.
    Done,
    /// The run stops; every worker was told to shut down.
    Abort(String),
}
