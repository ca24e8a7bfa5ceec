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
mod messages;
mod plan;
mod recovery;
#[cfg(test)]
mod tests;

pub use messages::{Action, Command, Event, MicroBatches, Stage};
pub use plan::{Plan, SavedState};

use lorafleet_common::data::schedule::{nth_batch, spread, GlobalBatches};
use lorafleet_common::protocol::{brief, hex, Hash, Identity, StepReport, ToCoordinator};
use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

/// A connection, as the shell numbers them.
pub type WorkerId = u64;

/// A joined worker.
#[derive(Debug)]
struct Member {
    id: WorkerId,
    name: String,
    last_heard: Instant,
    /// Told its rank and the configuration (later groups reach it by `Regroup`).
    welcomed: bool,
    /// Sent a `Regroup` it has not answered yet.
    regrouping: bool,
}

/// Where the run stands. `got[rank]` collects one answer per rank.
#[derive(Debug)]
enum Phase {
    Gathering,
    /// A worker was lost at this time; waiting for replacements.
    Recovering(Instant),
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
    /// The global batches without packing (it keeps the current epoch's example order).
    batches: GlobalBatches,
    /// Bumped at every loss; steps carry it, so a report of an abandoned step is ignored.
    generation: u64,
    /// The newest state every rank can be put back into.
    last: SavedState,
    /// Whether the base model's exact match was scored.
    scored_before: bool,
    /// The time of the event being handled.
    now: Instant,
    /// When the step in flight, or the regroup in progress, was started.
    started: Instant,
    /// The longest step so far (the step deadline's measure).
    slowest_step: Option<std::time::Duration>,
}

impl Schedule {
    /// A schedule waiting for `plan.world` workers.
    pub fn new(plan: Plan) -> Self {
        let last = plan.resume.clone().unwrap_or_else(SavedState::initial);
        Self {
            batches: GlobalBatches::new(plan.train_lengths.clone(), plan.seed, plan.group_by_length, plan.batch_size),
            plan,
            members: Vec::new(),
            phase: Phase::Gathering,
            actions: VecDeque::new(),
            generation: 0,
            last,
            scored_before: false,
            now: Instant::now(),
            started: Instant::now(),
            slowest_step: None,
        }
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
        let phase_deadline = match self.phase {
            Phase::Recovering(since) => Some(since + self.plan.rejoin_timeout),
            Phase::Stepping(..) => Some(self.started + self.step_timeout()),
            Phase::Identifying(_) if self.members.iter().any(|m| m.regrouping) => {
                Some(self.started + self.step_timeout())
            }
            _ => None,
        };
        self.members.iter().map(|m| m.last_heard + self.plan.heartbeat_timeout).chain(phase_deadline).min()
    }

    /// Workers that went silent for too long: dropped before the start, fenced and replaced
    /// after it; a replacement that does not come in time stops the run.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        if now >= self.started + self.step_timeout() {
            match &self.phase {
                Phase::Stepping(step, got) => return self.step_overdue(*step, got.clone()),
                Phase::Identifying(got) if self.members.iter().any(|m| m.regrouping) => {
                    return self.regroup_overdue(got.iter().map(Option::is_some).collect())
                }
                _ => {}
            }
        }
        if let Phase::Recovering(since) = self.phase {
            if now.duration_since(since) >= self.plan.rejoin_timeout {
                let wait = self.plan.rejoin_timeout.as_secs_f64();
                return self.no_replacement(format!(
                    "no replacement for the lost worker within {wait:.0} s (--rejoin_timeout)"
                ));
            }
        }
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
                self.lose(r, format!("{why} (rank {r})"), now);
                if self.is_over() {
                    return;
                }
            }
        }
    }

    /// Feeds one event observed at `now`.
    pub fn handle(&mut self, event: Event, now: Instant) {
        if self.is_over() {
            return;
        }
        self.now = now;
        match event {
            Event::Joined { id, name } => self.joined(id, name, now),
            Event::Lost { id, reason } => {
                let Some(r) = self.rank_of(id) else { return };
                self.lost(r, reason, now);
            }
            Event::Exited { name, status } => {
                let Some(r) = self.members.iter().position(|m| m.name == name) else { return };
                self.lost(r, format!("its process exited ({status})"), now);
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
        let open = matches!(self.phase, Phase::Gathering | Phase::Recovering(_));
        if !open || self.members.len() >= self.plan.world {
            self.actions.push_back(Action::Drop(id, "the run is full".into()));
            return;
        }
        let role = if matches!(self.phase, Phase::Recovering(_)) { " as a replacement" } else { "" };
        self.actions.push_back(Action::Say(format!(
            "worker {name} joined{role} ({} of {})",
            self.members.len() + 1,
            self.plan.world
        )));
        self.members.push(Member { id, name, last_heard: now, welcomed: false, regrouping: false });
        self.roster();
        if self.members.len() == self.plan.world {
            self.regroup();
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
        // Answers to commands of an abandoned generation: a step report says its generation;
        // the other answers can only come before a regroup completes (one stream per worker
        // keeps them in order).
        let regrouping = matches!(
            self.phase,
            Phase::Recovering(_) | Phase::Identifying(_) | Phase::Connecting(_) | Phase::Restoring(..)
        );
        let stale = match &msg {
            ToCoordinator::StepDone(report) => report.generation != self.generation || regrouping,
            ToCoordinator::EvalDone { .. }
            | ToCoordinator::ExactMatchDone { .. }
            | ToCoordinator::Digest { .. }
            | ToCoordinator::State { .. } => regrouping && self.generation > 0,
            _ => false,
        };
        if stale {
            self.actions.push_back(Action::Fenced(format!("{} from worker {name} (rank {r})", brief(&msg, 40))));
            return;
        }
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
                self.members[r].regrouping = false;
                if got.iter().all(Option::is_some) {
                    let ids: Vec<Identity> = got.iter_mut().filter_map(Option::take).collect();
                    let ring = ids.iter().map(|i| i.ring_addr.clone()).collect::<Vec<_>>();
                    let nccl_id = ids[0].nccl_id.clone();
                    let devices = ids.iter().map(|i| i.device.as_str()).collect::<Vec<_>>().join(", ");
                    self.actions
                        .push_back(Action::Say(format!("all {} workers loaded the model ({devices})", ids.len())));
                    let generation = self.generation;
                    self.broadcast(|_| Command::Peers { ring: ring.clone(), nccl_id: nccl_id.clone(), generation });
                    self.phase = Phase::Connecting(vec![false; self.plan.world]);
                }
            }
            (Phase::Connecting(ready), ToCoordinator::Ready) if !ready[r] => {
                ready[r] = true;
                if ready.iter().all(|&b| b) {
                    if self.generation > 0 || self.plan.resume.is_some() {
                        let state = self.last.clone();
                        self.phase = Phase::Restoring(state.step, vec![None; self.plan.world]);
                        self.broadcast(|_| Command::Restore(state.clone()));
                    } else {
                        self.start_scoring_or(Stage::Before);
                    }
                }
            }
            (Phase::Restoring(step, got), ToCoordinator::Restored { step: s, digest })
                if got[r].is_none() && s == *step =>
            {
                // A checkpoint's digest was recorded; the initial state's must agree across ranks.
                let expected = self.last.digest.or_else(|| got.iter().flatten().next().copied()).unwrap_or(digest);
                if digest != expected {
                    let (got, want) = (hex(&digest[..6]), hex(&expected[..6]));
                    return self.abort(format!(
                        "worker {name} (rank {r}) restored the state of step {s} as {got}, but it was saved as {want}"
                    ));
                }
                got[r] = Some(digest);
                if got.iter().all(Option::is_some) {
                    self.restored(s, expected);
                }
            }
            (Phase::Scoring(stage, got), ToCoordinator::ExactMatchDone { correct, total }) if got[r].is_none() => {
                got[r] = Some((correct, total));
                if got.iter().all(Option::is_some) {
                    let (correct, total) = got.iter().flatten().fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
                    let stage = *stage;
                    self.actions.push_back(Action::Scored { stage, correct, total });
                    match stage {
                        Stage::Before => {
                            self.scored_before = true;
                            self.start_step(self.last.step + 1)
                        }
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
                    let took = self.now.duration_since(self.started);
                    self.slowest_step = Some(self.slowest_step.map_or(took, |t| t.max(took)));
                    let epoch = self.plan.epochs.epochs_done(step);
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
                    let (adapter, optimizer) = (Arc::new(adapter), Arc::new(optimizer));
                    self.last = SavedState { step, digest: Some(digest), adapter, optimizer };
                    let (adapter, optimizer) = (self.last.adapter.to_vec(), self.last.optimizer.to_vec());
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
                Stage::Before => self.start_step(self.last.step + 1),
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

    fn lr(&self, step: u64) -> f64 {
        let (kind, peak, warmup) = &self.plan.lr;
        lr::lr_at(kind, *peak, *warmup, self.plan.total_steps as usize, step as usize - 1)
    }

    /// The global batch of `step` (1-based), spread over the ranks: `plan[rank][k][row]`
    /// lists the examples of a row of rank's k-th micro-batch. Without packing a row is one
    /// example; with it, the units spread are the epoch's packs and a row is a pack.
    pub fn assignment(&mut self, step: u64) -> Vec<MicroBatches> {
        let (epoch, index, _) = self.plan.epochs.locate(step);
        let (b, index) = (self.plan.batch_size, index as usize);
        let (world, micro) = (self.plan.world, self.plan.micro_batch_size);
        if let Some(packing) = &self.plan.packing {
            let packs = packing.epochs.get(epoch as usize).map_or(&[][..], Vec::as_slice);
            let global = nth_batch(packs, index, b);
            let lengths: Vec<usize> =
                global.iter().map(|pack| pack.iter().map(|&i| self.plan.train_lengths[i]).sum()).collect();
            let units: Vec<usize> = (0..global.len()).collect();
            return spread(&units, &lengths, world, micro)
                .into_iter()
                .map(|rank| rank.into_iter().map(|mb| mb.into_iter().map(|u| global[u].clone()).collect()).collect())
                .collect();
        }
        let global = self.batches.get(epoch, index);
        spread(global, &self.plan.train_lengths, world, micro)
            .into_iter()
            .map(|rank| rank.into_iter().map(|mb| mb.into_iter().map(|i| vec![i]).collect()).collect())
            .collect()
    }

    fn start_step(&mut self, step: u64) {
        let lr = self.lr(step);
        let plan = self.assignment(step);
        let generation = self.generation;
        for (rank, micro_batches) in plan.into_iter().enumerate() {
            self.send(rank, Command::Step { generation, step, lr, micro_batches });
        }
        self.started = self.now;
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
