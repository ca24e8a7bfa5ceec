//! The run's schedule as a sans-IO state machine: membership, set-up checks, which examples
//! each rank gets at each step, when to evaluate, verify and save, and what happens when a
//! worker goes silent.
//!
//! Events go in ([`Schedule::handle`], [`Schedule::handle_timeout`]) with the time passed in;
//! actions come out ([`Schedule::poll_action`]); nothing here touches a socket, a file or
//! the clock. The QUIC shell and the in-process runner drive the same machine, and the
//! tests drive it with an in-memory cluster on a virtual clock.
//!
//! Invariants: every rank receives the same commands in the same order (a collective never
//! waits for a rank that was not asked); a step starts only when every rank finished the
//! previous one; nothing is written before every replica reported the same digest.

pub mod lr;
#[cfg(test)]
mod tests;

use lorafleet_common::data::schedule::{epoch_order, spread};
use lorafleet_common::protocol::{brief, hex, Hash, Identity, Resources, StepReport, ToCoordinator};
use std::collections::VecDeque;
use std::ops::Range;
use std::time::{Duration, Instant};

/// A connection, as the shell numbers them.
pub type WorkerId = u64;

/// Everything the schedule needs to know about the run, fixed before the first event.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Ranks to wait for.
    pub world: usize,
    /// Optimizer steps in the run.
    pub total_steps: u64,
    /// Optimizer steps per epoch.
    pub steps_per_epoch: u64,
    /// Examples per optimizer step (all ranks together).
    pub batch_size: usize,
    /// Rows per micro-batch.
    pub micro_batch_size: usize,
    /// Data order seed.
    pub seed: u64,
    /// transformers' `group_by_length`.
    pub group_by_length: bool,
    /// Token length of each training example (for length grouping).
    pub train_lengths: Vec<usize>,
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
    pub resume: Option<ResumePoint>,
}

/// Where a resumed run picks up: the state after `step`, whose digest the checkpoint recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResumePoint {
    /// The checkpoint's step; training continues at `step + 1`.
    pub step: u64,
    /// [`ToCoordinator::Digest`] of the state when it was saved: every rank must restore it.
    pub digest: Hash,
}

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
    },
    /// Train on these micro-batches of training-example indices.
    Step {
        /// 1-based step.
        step: u64,
        /// Learning rate.
        lr: f64,
        /// This rank's micro-batches.
        micro_batches: Vec<Vec<usize>>,
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
    /// Load the resume checkpoint's state (after this step).
    Restore(u64),
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
    /// A worker was lost after the start (the run stops next).
    WorkerLost {
        /// Its rank.
        rank: usize,
        /// Its name.
        name: String,
    },
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

/// A joined worker.
#[derive(Debug)]
struct Member {
    id: WorkerId,
    name: String,
    last_heard: Instant,
}

/// Where the run stands. `got[rank]` collects one answer per rank.
#[derive(Debug)]
enum Phase {
    Gathering,
    Identifying(Vec<Option<Identity>>),
    Connecting(Vec<bool>),
    Restoring(u64, Vec<Option<Hash>>),
    Scoring(Stage, Vec<Option<(u64, u64)>>),
    Stepping(u64, Vec<Option<StepReport>>),
    Evaluating(u64, Vec<Option<(f64, u64)>>),
    Verifying(u64, Vec<Option<Hash>>),
    Fetching(u64, Hash),
    Over,
}

/// The state machine.
#[derive(Debug)]
pub struct Schedule {
    plan: Plan,
    members: Vec<Member>,
    phase: Phase,
    actions: VecDeque<Action>,
    /// The current epoch's example order.
    order: Option<(u64, Vec<usize>)>,
}

impl Schedule {
    /// A schedule waiting for `plan.world` workers.
    pub fn new(plan: Plan) -> Self {
        Self { plan, members: Vec::new(), phase: Phase::Gathering, actions: VecDeque::new(), order: None }
    }

    /// The next action, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Whether the run is over (done or aborted).
    pub fn is_over(&self) -> bool {
        matches!(self.phase, Phase::Over)
    }

    /// When [`Schedule::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.is_over() {
            return None;
        }
        self.members.iter().map(|m| m.last_heard + self.plan.heartbeat_timeout).min()
    }

    /// Workers that went silent for too long: dropped before the start, fatal after.
    pub fn handle_timeout(&mut self, now: Instant) {
        let timeout = self.plan.heartbeat_timeout;
        let silent: Vec<usize> =
            (0..self.members.len()).filter(|&r| now.duration_since(self.members[r].last_heard) >= timeout).collect();
        for &r in silent.iter().rev() {
            let m = &self.members[r];
            let why = format!("worker {} sent nothing for {:.0} s", m.name, timeout.as_secs_f64());
            if matches!(self.phase, Phase::Gathering) {
                let m = self.members.remove(r);
                self.actions.push_back(Action::Say(format!("{why}; dropped, waiting for another")));
                self.actions.push_back(Action::Drop(m.id, why));
                self.roster();
            } else {
                let name = m.name.clone();
                self.actions.push_back(Action::WorkerLost { rank: r, name });
                return self.abort(format!("{why} (rank {r}); the run cannot continue without it"));
            }
        }
    }

    /// Feeds one event observed at `now`.
    pub fn handle(&mut self, event: Event, now: Instant) {
        if self.is_over() {
            return;
        }
        match event {
            Event::Joined { id, name } => self.joined(id, name, now),
            Event::Lost { id, reason } => {
                let Some(r) = self.rank_of(id) else { return };
                if matches!(self.phase, Phase::Gathering) {
                    let m = self.members.remove(r);
                    self.actions.push_back(Action::Say(format!("worker {} left before the start: {reason}", m.name)));
                    self.roster();
                } else {
                    let name = self.members[r].name.clone();
                    self.actions.push_back(Action::WorkerLost { rank: r, name: name.clone() });
                    self.abort(format!("lost worker {name} (rank {r}): {reason}"));
                }
            }
            Event::Message { id, msg } => {
                let Some(r) = self.rank_of(id) else { return };
                self.members[r].last_heard = now;
                self.message(r, msg);
            }
        }
    }

    fn rank_of(&self, id: WorkerId) -> Option<usize> {
        self.members.iter().position(|m| m.id == id)
    }

    fn joined(&mut self, id: WorkerId, name: String, now: Instant) {
        if !matches!(self.phase, Phase::Gathering) || self.members.len() >= self.plan.world {
            self.actions.push_back(Action::Drop(id, "the run is full".into()));
            return;
        }
        self.actions.push_back(Action::Say(format!(
            "worker {name} joined ({} of {})",
            self.members.len() + 1,
            self.plan.world
        )));
        self.members.push(Member { id, name, last_heard: now });
        self.roster();
        if self.members.len() == self.plan.world {
            let world = self.plan.world;
            for rank in 0..world {
                self.send(rank, Command::Welcome { rank, world });
            }
            self.phase = Phase::Identifying(vec![None; world]);
        }
    }

    fn roster(&mut self) {
        self.actions.push_back(Action::Roster(self.members.iter().map(|m| m.name.clone()).collect()));
    }

    fn send(&mut self, rank: usize, cmd: Command) {
        self.actions.push_back(Action::Send(self.members[rank].id, cmd));
    }

    fn broadcast(&mut self, cmd: impl Fn(usize) -> Command) {
        for rank in 0..self.members.len() {
            let c = cmd(rank);
            self.send(rank, c);
        }
    }

    fn abort(&mut self, reason: String) {
        self.broadcast(|_| Command::Shutdown("the run was stopped by the coordinator".into()));
        self.actions.push_back(Action::Abort(reason));
        self.phase = Phase::Over;
    }

    fn message(&mut self, r: usize, msg: ToCoordinator) {
        let name = self.members[r].name.clone();
        match (&mut self.phase, msg) {
            (_, ToCoordinator::Heartbeat(resources)) => {
                let rank = (!matches!(self.phase, Phase::Gathering)).then_some(r);
                self.actions.push_back(Action::Heartbeat { rank, name, resources });
            }
            (_, ToCoordinator::Failed { message, nonfinite }) => {
                if nonfinite {
                    self.actions.push_back(Action::NonFinite);
                }
                self.abort(format!("worker {name} (rank {r}) failed: {message}"))
            }
            (Phase::Identifying(got), ToCoordinator::Identity(identity)) if got[r].is_none() => {
                if let Some((model, tokenizer)) = self.plan.expected {
                    let what = if identity.model != model {
                        Some("base model (config.json or weight files)")
                    } else if identity.tokenizer != tokenizer {
                        Some("tokenizer")
                    } else {
                        None
                    };
                    if let Some(what) = what {
                        return self.abort(format!(
                            "worker {name} (rank {r}) loaded a different {what} than the coordinator's; \
                             check its base model folder"
                        ));
                    }
                }
                got[r] = Some(identity);
                if got.iter().all(Option::is_some) {
                    let ids: Vec<Identity> = got.iter_mut().filter_map(Option::take).collect();
                    let ring = ids.iter().map(|i| i.ring_addr.clone()).collect::<Vec<_>>();
                    let nccl_id = ids[0].nccl_id.clone();
                    let devices = ids.iter().map(|i| i.device.as_str()).collect::<Vec<_>>().join(", ");
                    self.actions
                        .push_back(Action::Say(format!("all {} workers loaded the model ({devices})", ids.len())));
                    self.broadcast(|_| Command::Peers { ring: ring.clone(), nccl_id: nccl_id.clone() });
                    self.phase = Phase::Connecting(vec![false; self.plan.world]);
                }
            }
            (Phase::Connecting(ready), ToCoordinator::Ready) if !ready[r] => {
                ready[r] = true;
                if ready.iter().all(|&b| b) {
                    match self.plan.resume {
                        Some(at) => {
                            self.broadcast(|_| Command::Restore(at.step));
                            self.phase = Phase::Restoring(at.step, vec![None; self.plan.world]);
                        }
                        None => self.start_scoring_or(Stage::Before),
                    }
                }
            }
            (Phase::Restoring(step, got), ToCoordinator::Restored { step: s, digest })
                if got[r].is_none() && s == *step =>
            {
                let expected = self.plan.resume.map(|at| at.digest).unwrap_or_default();
                if digest != expected {
                    let (got, want) = (hex(&digest[..6]), hex(&expected[..6]));
                    return self.abort(format!(
                        "worker {name} (rank {r}) restored the checkpoint of step {s} as state {got}, \
                         but it was saved as {want}"
                    ));
                }
                got[r] = Some(digest);
                if got.iter().all(Option::is_some) {
                    self.actions.push_back(Action::Say(format!(
                        "resumed from step {s}: every rank holds the saved state ({})",
                        hex(&expected[..6])
                    )));
                    // The base model's score was taken before the interruption.
                    self.start_step(s + 1);
                }
            }
            (Phase::Scoring(stage, got), ToCoordinator::ExactMatchDone { correct, total }) if got[r].is_none() => {
                got[r] = Some((correct, total));
                if got.iter().all(Option::is_some) {
                    let (correct, total) = got.iter().flatten().fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
                    let stage = *stage;
                    self.actions.push_back(Action::Scored { stage, correct, total });
                    match stage {
                        Stage::Before => self.start_step(self.first_step()),
                        Stage::After => self.finish(),
                    }
                }
            }
            (Phase::Stepping(step, got), ToCoordinator::StepDone(report))
                if got[r].is_none() && report.step == *step =>
            {
                got[r] = Some(report);
                if got.iter().all(Option::is_some) {
                    let step = *step;
                    let reports: Vec<_> = got
                        .iter_mut()
                        .enumerate()
                        .filter_map(|(rank, g)| Some((rank, self.members[rank].name.clone(), g.take()?)))
                        .collect();
                    let epoch = step as f64 / self.plan.steps_per_epoch.max(1) as f64;
                    self.actions.push_back(Action::Stepped { epoch, lr: self.lr(step), reports });
                    self.after_step(step);
                }
            }
            (Phase::Evaluating(step, got), ToCoordinator::EvalDone { loss_sum, tokens }) if got[r].is_none() => {
                got[r] = Some((loss_sum, tokens));
                if got.iter().all(Option::is_some) {
                    let step = *step;
                    // Summed in rank order: the same result whichever rank answered first.
                    let (loss_sum, tokens) = got.iter().flatten().fold((0.0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
                    self.actions.push_back(Action::Evaluated { step, loss_sum, tokens });
                    self.after_eval(step);
                }
            }
            (Phase::Verifying(step, got), ToCoordinator::Digest { step: s, digest })
                if got[r].is_none() && s == *step =>
            {
                got[r] = Some(digest);
                if got.iter().all(Option::is_some) {
                    let step = *step;
                    let digests: Vec<Hash> = got.iter().flatten().copied().collect();
                    if let Some(reason) = divergence(&digests) {
                        return self.abort(format!("replicas diverged at step {step}: {reason}"));
                    }
                    self.send(0, Command::Fetch);
                    self.phase = Phase::Fetching(step, digests[0]);
                }
            }
            (Phase::Fetching(step, digest), ToCoordinator::State { adapter, optimizer }) if r == 0 => {
                let (step, digest) = (*step, *digest);
                if step == self.plan.total_steps {
                    self.actions.push_back(Action::Final { step, adapter });
                    self.start_scoring_or(Stage::After);
                } else {
                    self.actions.push_back(Action::Checkpoint { step, adapter, optimizer, digest });
                    self.start_step(step + 1);
                }
            }
            (_, other) => self.abort(format!("worker {name} (rank {r}) sent {} out of turn", brief(&other, 60))),
        }
    }

    fn start_scoring_or(&mut self, stage: Stage) {
        let n = self.plan.exact_pairs;
        if n == 0 {
            return match stage {
                Stage::Before => self.start_step(self.first_step()),
                Stage::After => self.finish(),
            };
        }
        let world = self.plan.world;
        self.broadcast(|r| Command::ExactMatch { with_adapter: stage == Stage::After, pairs: shard(n, world, r) });
        self.phase = Phase::Scoring(stage, vec![None; world]);
    }

    fn finish(&mut self) {
        self.broadcast(|_| Command::Shutdown("training finished".into()));
        self.actions.push_back(Action::Done);
        self.phase = Phase::Over;
    }

    /// Step 1, or the one after the resume checkpoint's.
    fn first_step(&self) -> u64 {
        self.plan.resume.map_or(1, |at| at.step + 1)
    }

    fn lr(&self, step: u64) -> f64 {
        let (kind, peak, warmup) = &self.plan.lr;
        lr::lr_at(kind, *peak, *warmup, self.plan.total_steps as usize, step as usize - 1)
    }

    /// The global batch of `step` (1-based), spread over the ranks.
    pub fn assignment(&mut self, step: u64) -> Vec<Vec<Vec<usize>>> {
        let per_epoch = self.plan.steps_per_epoch.max(1);
        let (epoch, index) = ((step - 1) / per_epoch, ((step - 1) % per_epoch) as usize);
        if self.order.as_ref().map(|(e, _)| *e) != Some(epoch) {
            let all: Vec<usize> = (0..self.plan.train_lengths.len()).collect();
            let p = &self.plan;
            let order = epoch_order(&all, &p.train_lengths, p.seed, epoch, p.group_by_length, p.batch_size);
            self.order = Some((epoch, order));
        }
        let order = &self.order.as_ref().expect("set above").1;
        let b = self.plan.batch_size;
        let global = order.get(index * b..((index + 1) * b).min(order.len())).unwrap_or(&[]);
        spread(global, &self.plan.train_lengths, self.plan.world, self.plan.micro_batch_size)
    }

    fn start_step(&mut self, step: u64) {
        let lr = self.lr(step);
        let plan = self.assignment(step);
        for (rank, micro_batches) in plan.into_iter().enumerate() {
            self.send(rank, Command::Step { step, lr, micro_batches });
        }
        self.phase = Phase::Stepping(step, vec![None; self.plan.world]);
    }

    fn after_step(&mut self, step: u64) {
        let due = |every: u64| every > 0 && step.is_multiple_of(every);
        let n = self.plan.eval_examples;
        if n > 0 && (due(self.plan.eval_steps) || step == self.plan.total_steps) {
            let world = self.plan.world;
            self.broadcast(|r| Command::Eval(shard(n, world, r)));
            self.phase = Phase::Evaluating(step, vec![None; world]);
        } else {
            self.after_eval(step);
        }
    }

    fn after_eval(&mut self, step: u64) {
        let due = self.plan.save_steps > 0 && step.is_multiple_of(self.plan.save_steps);
        if due || step == self.plan.total_steps {
            self.broadcast(|_| Command::Verify(step));
            self.phase = Phase::Verifying(step, vec![None; self.plan.world]);
        } else {
            self.start_step(step + 1);
        }
    }
}

/// Rank `r`'s contiguous share of `n` items.
pub fn shard(n: usize, world: usize, r: usize) -> Range<usize> {
    r * n / world..(r + 1) * n / world
}

/// Names the ranks whose digest differs from rank 0's, if any.
fn divergence(digests: &[Hash]) -> Option<String> {
    let odd: Vec<usize> = (1..digests.len()).filter(|&r| digests[r] != digests[0]).collect();
    if odd.is_empty() {
        return None;
    }
    let short = |h: &Hash| hex(&h[..6]);
    let list = odd.iter().map(|&r| format!("rank {r} has {}", short(&digests[r]))).collect::<Vec<_>>().join(", ");
    Some(format!("rank 0 has {}, {list}", short(&digests[0])))
}
