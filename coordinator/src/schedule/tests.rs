//! The schedule driven by an in-memory cluster on a virtual clock: simulated workers answer
//! commands after a simulated compute time and send heartbeats every second; time only
//! moves when the simulation says so.

use super::*;
use lorafleet_common::data::packing::Packing;
use lorafleet_common::data::schedule::EpochSteps;
use lorafleet_common::protocol::Resources;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

const IDENTITY: (Hash, Hash) = ([1; 32], [2; 32]);

fn plan(world: usize) -> Plan {
    Plan {
        world,
        total_steps: 5,
        epochs: EpochSteps::Uniform(3),
        batch_size: 4,
        micro_batch_size: 1,
        seed: 7,
        group_by_length: false,
        train_lengths: vec![10; 10],
        packing: None,
        eval_examples: 5,
        exact_pairs: 3,
        eval_steps: 2,
        save_steps: 2,
        lr: ("linear".into(), 1e-3, 1),
        expected: Some(IDENTITY),
        heartbeat_timeout: Duration::from_secs(30),
        resume: None,
        rejoin_timeout: Duration::from_secs(20),
        min_workers: None,
        step_timeout: None,
    }
}

/// How a simulated worker behaves.
#[derive(Clone, Default)]
struct Behaviour {
    /// Stops answering and heartbeating at this virtual second.
    silent_after: Option<u64>,
    /// Loads another model.
    other_model: bool,
    /// Reports another digest.
    diverges: bool,
    /// Sends a `Ready` in the middle of training.
    rogue: bool,
    /// Its connection closes at this virtual second (killed); it is silent from then on.
    lost_at: Option<u64>,
    /// Its compute hangs in this step: it answers nothing more, but keeps heartbeating.
    hangs_at_step: Option<u64>,
}

struct Sim {
    schedule: Schedule,
    start: Instant,
    now: Instant,
    queue: BinaryHeap<Reverse<(Duration, u64, u64)>>,
    pending: Vec<Option<Event>>,
    behaviours: Vec<Behaviour>,
    log: Vec<Action>,
    sent: Vec<(WorkerId, Command)>,
}

impl Sim {
    fn new(plan: Plan) -> Self {
        let start = Instant::now();
        Self {
            schedule: Schedule::new(plan),
            start,
            now: start,
            queue: BinaryHeap::new(),
            pending: Vec::new(),
            behaviours: Vec::new(),
            log: Vec::new(),
            sent: Vec::new(),
        }
    }

    fn at(&mut self, after: Duration, event: Event) {
        let when = self.now - self.start + after;
        self.pending.push(Some(event));
        let seq = self.pending.len() as u64 - 1;
        self.queue.push(Reverse((when, seq, seq)));
    }

    fn join(&mut self, after: Duration, mut b: Behaviour) -> WorkerId {
        let id = self.behaviours.len() as WorkerId;
        if let Some(t) = b.lost_at {
            let at = Duration::from_secs(t).saturating_sub(self.now - self.start);
            self.at(at, Event::Lost { id, reason: "connection reset".into() });
            b.silent_after = Some(t);
        }
        self.behaviours.push(b);
        self.at(after, Event::Joined { id, name: format!("w{id}") });
        for s in 1..200 {
            self.at(
                after + Duration::from_secs(s),
                Event::Message { id, msg: ToCoordinator::Heartbeat(Resources::default()) },
            );
        }
        id
    }

    fn silent(&self, id: WorkerId, at: Duration) -> bool {
        self.behaviours[id as usize].silent_after.is_some_and(|s| at >= Duration::from_secs(s))
    }

    /// The simulated worker's answer to a command, 100 ms (or 2 s for steps) later.
    fn answer(&mut self, id: WorkerId, cmd: &Command) {
        let b = self.behaviours[id as usize].clone();
        if let (Command::Step { step, .. }, Some(at)) = (cmd, b.hangs_at_step) {
            if *step >= at {
                self.behaviours[id as usize].hangs_at_step = Some(0);
            }
        }
        if self.behaviours[id as usize].hangs_at_step == Some(0) {
            return;
        }
        let (delay, msg) = match cmd {
            Command::Welcome { .. } => {
                let model = if b.other_model { [9; 32] } else { IDENTITY.0 };
                let identity = Identity {
                    model,
                    tokenizer: IDENTITY.1,
                    device: "cpu".into(),
                    ring_addr: format!("127.0.0.1:{}", 9000 + id),
                    nccl_id: None,
                };
                (100, ToCoordinator::Identity(identity))
            }
            Command::Peers { .. } => (100, ToCoordinator::Ready),
            Command::Step { generation, step, micro_batches, .. } => {
                if b.rogue && *step == 2 {
                    self.at(Duration::from_millis(10), Event::Message { id, msg: ToCoordinator::Ready });
                }
                let report = StepReport {
                    generation: *generation,
                    step: *step,
                    loss: 1.0 / *step as f64,
                    tokens: 40,
                    grad_norm: 0.5,
                    local_tokens: micro_batches.iter().flatten().flatten().count() as u64 * 10,
                    local_samples: micro_batches.iter().flatten().flatten().count() as u64,
                    seconds: Default::default(),
                };
                (2000, ToCoordinator::StepDone(report))
            }
            Command::Eval(r) => (100, ToCoordinator::EvalDone { loss_sum: r.len() as f64, tokens: r.len() as u64 }),
            Command::ExactMatch { pairs, with_adapter } => {
                let correct = if *with_adapter { pairs.len() as u64 } else { 0 };
                (100, ToCoordinator::ExactMatchDone { correct, total: pairs.len() as u64 })
            }
            Command::Verify(step) => {
                let digest = if b.diverges { [id as u8 + 1; 32] } else { [0; 32] };
                (100, ToCoordinator::Digest { step: *step, digest })
            }
            Command::Fetch => (100, ToCoordinator::State { adapter: vec![1, 2], optimizer: vec![3] }),
            Command::Restore(state) => {
                let digest = if b.diverges { [id as u8 + 1; 32] } else { state.digest.unwrap_or([5; 32]) };
                (100, ToCoordinator::Restored { step: state.step, digest })
            }
            Command::Regroup { .. } => {
                let identity = Identity {
                    model: IDENTITY.0,
                    tokenizer: IDENTITY.1,
                    device: "cpu".into(),
                    ring_addr: format!("127.0.0.1:{}", 9100 + id),
                    nccl_id: None,
                };
                (100, ToCoordinator::Identity(identity))
            }
            Command::Shutdown(_) => return,
        };
        let at = self.now - self.start + Duration::from_millis(delay);
        if !self.silent(id, at) {
            self.at(Duration::from_millis(delay), Event::Message { id, msg });
        }
    }

    /// Runs until the schedule is over or nothing is left to happen.
    fn run(&mut self) {
        loop {
            while let Some(action) = self.schedule.poll_action() {
                if let Action::Send(id, cmd) = &action {
                    let (id, cmd) = (*id, cmd.clone());
                    self.answer(id, &cmd);
                    self.sent.push((id, cmd));
                }
                self.log.push(action);
            }
            if self.schedule.is_over() {
                return;
            }
            let next_event = self.queue.peek().map(|Reverse((t, _, _))| self.start + *t);
            match (next_event, self.schedule.poll_timeout()) {
                (Some(e), Some(t)) if t < e => {
                    self.now = t;
                    self.schedule.handle_timeout(t);
                }
                (Some(_), _) => {
                    let Reverse((t, seq, _)) = self.queue.pop().expect("peeked");
                    self.now = self.start + t;
                    let event = self.pending[seq as usize].take().expect("each event once");
                    let silenced = match &event {
                        Event::Message { id, .. } => self.silent(*id, t),
                        _ => false,
                    };
                    if !silenced {
                        self.schedule.handle(event, self.now);
                    }
                }
                (None, Some(t)) => {
                    self.now = t;
                    self.schedule.handle_timeout(t);
                }
                (None, None) => return,
            }
        }
    }

    fn abort_reason(&self) -> Option<&str> {
        self.log.iter().find_map(|a| match a {
            Action::Abort(r) => Some(r.as_str()),
            _ => None,
        })
    }
}

#[test]
fn a_full_run_steps_evaluates_verifies_and_saves_on_time() {
    let mut sim = Sim::new(plan(2));
    sim.join(Duration::ZERO, Behaviour::default());
    sim.join(Duration::from_secs(3), Behaviour::default());
    sim.run();
    assert!(sim.abort_reason().is_none(), "{:?}", sim.abort_reason());
    let steps: Vec<u64> = sim.log.iter().filter_map(|a| matches!(a, Action::Stepped { .. }).then_some(0)).collect();
    assert_eq!(steps.len(), 5);
    let evals: Vec<u64> = sim
        .log
        .iter()
        .filter_map(|a| if let Action::Evaluated { step, .. } = a { Some(*step) } else { None })
        .collect();
    assert_eq!(evals, [2, 4, 5]);
    let saves: Vec<u64> = sim
        .log
        .iter()
        .filter_map(|a| if let Action::Checkpoint { step, .. } = a { Some(*step) } else { None })
        .collect();
    assert_eq!(saves, [2, 4]);
    assert!(matches!(sim.log.last(), Some(Action::Done)));
    assert!(sim.log.iter().any(|a| matches!(a, Action::Final { step: 5, .. })));
    let scores: Vec<(Stage, u64, u64)> = sim
        .log
        .iter()
        .filter_map(|a| {
            if let Action::Scored { stage, correct, total } = a {
                Some((*stage, *correct, *total))
            } else {
                None
            }
        })
        .collect();
    assert_eq!(scores, [(Stage::Before, 0, 3), (Stage::After, 3, 3)]);
    // Eval shards cover the eval set once.
    let evaluated: u64 =
        sim.log.iter().map(|a| if let Action::Evaluated { tokens, .. } = a { *tokens } else { 0 }).sum();
    assert_eq!(evaluated, 15);
    // Every step sends both ranks the same number of micro-batches, and each epoch covers
    // every example exactly once.
    let mut epoch0 = Vec::new();
    for (_, cmd) in &sim.sent {
        if let Command::Step { step, micro_batches, .. } = cmd {
            // Batch 4 over 2 ranks of micro 1; an epoch's last batch holds the 2 left over.
            let expected = if step % 3 == 0 { 1 } else { 2 };
            assert_eq!(micro_batches.len(), expected, "step {step}");
            if *step <= 3 {
                epoch0.extend(micro_batches.iter().flatten().flatten().copied());
            }
        }
    }
    epoch0.sort_unstable();
    assert_eq!(epoch0, (0..10).collect::<Vec<_>>());
    // Three steps of 2 s each, plus set-up: the virtual clock moved, no real time passed.
    assert!(sim.now - sim.start > Duration::from_secs(10));
}

#[test]
fn lr_and_data_order_follow_the_plan() {
    let mut s = Schedule::new(plan(2));
    let a = s.assignment(1);
    let again = Schedule::new(plan(2)).assignment(1);
    assert_eq!(a, again, "seeded");
    // Step 4 is the first of epoch 1: a different permutation.
    assert_ne!(s.assignment(4), a);
    assert_eq!(s.lr(1), 0.0, "warm-up starts at 0 as transformers does");
}

#[test]
fn packed_steps_spread_packs_and_each_packed_epoch_covers_every_example_once() {
    // 30 examples of 3..=12 tokens in rows of 16: packs of 1 to 5 examples, 4 per step.
    let lengths: Vec<usize> = (0..30).map(|i| 3 + (i * 7) % 10).collect();
    let packing = Packing::new(&lengths, 16, 7, 4, 2, None);
    let mut plan = plan(2);
    plan.epochs = packing.epoch_steps();
    plan.total_steps = plan.epochs.total(2);
    (plan.train_lengths, plan.packing) = (lengths.clone(), Some(Arc::new(packing.clone())));
    let mut s = Schedule::new(plan.clone());
    let mut step = 1;
    for packs in &packing.epochs {
        let mut seen: Vec<usize> = Vec::new();
        for _ in 0..packs.len().div_ceil(4) {
            let ranks = s.assignment(step);
            assert_eq!(ranks[0].len(), ranks[1].len(), "step {step}: the same number of micro-batches");
            for rows in ranks.iter().flatten() {
                assert!(rows.len() <= 1, "micro_batch_size 1 is one packed row");
                for row in rows {
                    assert!(packs.contains(row) && row.iter().map(|&i| lengths[i]).sum::<usize>() <= 16);
                    seen.extend(row);
                }
            }
            step += 1;
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..30).collect::<Vec<_>>());
    }
    // The simulated run trains every step and restores a resumed run to the same packs.
    let mut sim = Sim::new(plan.clone());
    sim.join(Duration::ZERO, Behaviour::default());
    sim.join(Duration::ZERO, Behaviour::default());
    sim.run();
    assert!(sim.log.iter().any(|a| matches!(a, Action::Final { step, .. } if *step == plan.total_steps)));
    assert_eq!(Schedule::new(plan).assignment(step - 1), s.assignment(step - 1));
}

#[test]
fn a_worker_with_another_model_stops_the_run_before_step_one() {
    let mut sim = Sim::new(plan(2));
    sim.join(Duration::ZERO, Behaviour::default());
    sim.join(Duration::ZERO, Behaviour { other_model: true, ..Default::default() });
    sim.run();
    let reason = sim.abort_reason().expect("aborted");
    assert!(reason.contains("worker w1 (rank 1)") && reason.contains("base model"), "{reason}");
    assert!(!sim.sent.iter().any(|(_, c)| matches!(c, Command::Step { .. })));
}

#[test]
fn a_worker_that_goes_silent_mid_run_stops_it_after_the_timeout() {
    let mut plan = plan(2);
    plan.rejoin_timeout = Duration::ZERO;
    let mut sim = Sim::new(plan);
    sim.join(Duration::ZERO, Behaviour::default());
    sim.join(Duration::ZERO, Behaviour { silent_after: Some(4), ..Default::default() });
    sim.run();
    let reason = sim.abort_reason().expect("aborted");
    assert!(reason.contains("worker w1 sent nothing for 30 s") && reason.contains("rank 1"), "{reason}");
    // Last heard at 3 s (heartbeat), aborted exactly 30 s later on the virtual clock.
    assert_eq!(sim.now - sim.start, Duration::from_secs(33));
    assert!(!sim.log.iter().any(|a| matches!(a, Action::Final { .. })));
    // The silent one is dropped (fenced), the other told to shut down.
    assert!(sim.log.iter().any(|a| matches!(a, Action::Drop(1, _))));
    assert!(sim.sent.iter().filter(|(_, c)| matches!(c, Command::Shutdown(_))).count() == 1);
}

#[test]
fn a_worker_silent_before_the_start_is_replaced() {
    let mut sim = Sim::new(plan(2));
    sim.join(Duration::ZERO, Behaviour { silent_after: Some(0), ..Default::default() });
    sim.join(Duration::from_secs(40), Behaviour::default());
    sim.join(Duration::from_secs(41), Behaviour::default());
    sim.run();
    assert!(sim.abort_reason().is_none(), "{:?}", sim.abort_reason());
    assert!(sim.log.iter().any(|a| matches!(a, Action::Drop(0, _))));
    assert!(matches!(sim.log.last(), Some(Action::Done)));
}

#[test]
fn diverged_replicas_stop_the_run_naming_the_ranks_and_nothing_is_written() {
    let mut sim = Sim::new(plan(3));
    sim.join(Duration::ZERO, Behaviour::default());
    sim.join(Duration::ZERO, Behaviour::default());
    sim.join(Duration::ZERO, Behaviour { diverges: true, ..Default::default() });
    sim.run();
    let reason = sim.abort_reason().expect("aborted");
    assert!(reason.starts_with("replicas diverged at step 2") && reason.contains("rank 2 has"), "{reason}");
    assert!(!reason.contains("rank 1 has"), "{reason}");
    assert!(!sim.log.iter().any(|a| matches!(a, Action::Checkpoint { .. } | Action::Final { .. })));
}

#[test]
fn messages_out_of_turn_and_extra_workers_are_refused() {
    let mut sim = Sim::new(plan(2));
    sim.join(Duration::ZERO, Behaviour::default());
    sim.join(Duration::ZERO, Behaviour { rogue: true, ..Default::default() });
    let extra = sim.join(Duration::from_secs(1), Behaviour::default());
    sim.run();
    assert!(sim.log.iter().any(|a| matches!(a, Action::Drop(id, r) if *id == extra && r.contains("full"))));
    let reason = sim.abort_reason().expect("aborted");
    assert!(reason.contains("worker w1 (rank 1) sent Ready out of turn"), "{reason}");
}

#[test]
fn shards_cover_everything_once() {
    for (n, world) in [(0, 2), (5, 2), (7, 3), (2, 4)] {
        let all: Vec<usize> = (0..world).flat_map(|r| shard(n, world, r)).collect();
        assert_eq!(all, (0..n).collect::<Vec<_>>());
    }
}

#[test]
fn a_resumed_run_restores_every_rank_then_continues_after_the_checkpoint_with_the_same_batches() {
    let sent_steps = |sim: &Sim| -> Vec<(u64, MicroBatches)> {
        let mut steps: Vec<_> = sim
            .sent
            .iter()
            .filter_map(|(id, c)| match c {
                Command::Step { step, micro_batches, .. } if *id == 0 => Some((*step, micro_batches.clone())),
                _ => None,
            })
            .collect();
        steps.sort();
        steps
    };
    let mut whole = Sim::new(plan(2));
    whole.join(Duration::ZERO, Behaviour::default());
    whole.join(Duration::ZERO, Behaviour::default());
    whole.run();

    let mut plan = plan(2);
    plan.resume =
        Some(SavedState { step: 2, digest: Some([0; 32]), adapter: Arc::new(vec![1]), optimizer: Arc::new(vec![2]) });
    let mut sim = Sim::new(plan.clone());
    sim.join(Duration::ZERO, Behaviour::default());
    sim.join(Duration::ZERO, Behaviour::default());
    sim.run();
    assert!(sim.abort_reason().is_none(), "{:?}", sim.abort_reason());
    let restores = sim.sent.iter().filter(|(_, c)| matches!(c, Command::Restore(s) if s.step == 2)).count();
    assert_eq!(restores, 2, "every rank restores");
    // Steps 3..=5, each with the batches the uninterrupted run gave it (epoch 1 included).
    assert_eq!(sent_steps(&sim), sent_steps(&whole)[2..].to_vec());
    // The base model was scored before the interruption; only the trained adapter is.
    let stages: Vec<Stage> =
        sim.log.iter().filter_map(|a| if let Action::Scored { stage, .. } = a { Some(*stage) } else { None }).collect();
    assert_eq!(stages, [Stage::After]);
    assert!(sim.log.iter().any(|a| matches!(a, Action::Final { step: 5, .. })));

    // A rank whose restored state has another digest stops the run before any step.
    let mut sim = Sim::new(plan);
    sim.join(Duration::ZERO, Behaviour::default());
    sim.join(Duration::ZERO, Behaviour { diverges: true, ..Default::default() });
    sim.run();
    let reason = sim.abort_reason().expect("aborted");
    assert!(reason.contains("rank 1") && reason.contains("step 2"), "{reason}");
    assert!(!sim.sent.iter().any(|(_, c)| matches!(c, Command::Step { .. })));
}

/// Step commands sent to the worker now holding `rank` (by connection), per step, in order.
fn steps_of(sim: &Sim, ids: &[WorkerId]) -> Vec<(u64, u64, MicroBatches)> {
    sim.sent
        .iter()
        .filter_map(|(id, c)| match c {
            Command::Step { generation, step, micro_batches, .. } if ids.contains(id) => {
                Some((*generation, *step, micro_batches.clone()))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn a_lost_worker_is_fenced_replaced_and_the_run_replays_from_the_last_checkpoint() {
    let mut whole = Sim::new(plan(2));
    whole.join(Duration::ZERO, Behaviour::default());
    whole.join(Duration::ZERO, Behaviour::default());
    whole.run();

    let mut sim = Sim::new(plan(2));
    sim.join(Duration::ZERO, Behaviour::default());
    sim.join(Duration::ZERO, Behaviour { lost_at: Some(7), ..Default::default() });
    sim.join(Duration::from_secs(12), Behaviour::default());
    sim.run();
    assert!(sim.abort_reason().is_none(), "{:?}", sim.abort_reason());
    assert!(sim.log.iter().any(|a| matches!(a, Action::WorkerLost { rank: 1, .. })));
    assert!(sim.log.iter().any(|a| matches!(a, Action::Drop(1, _))));
    // The survivor is regrouped, the newcomer welcomed; both restore the step-2 checkpoint.
    assert!(sim
        .sent
        .iter()
        .any(|(id, c)| *id == 0 && matches!(c, Command::Regroup { rank: 0, world: 2, generation: 1 })));
    assert!(sim.sent.iter().any(|(id, c)| *id == 2 && matches!(c, Command::Welcome { rank: 1, world: 2 })));
    let restored: Vec<(WorkerId, u64)> = sim
        .sent
        .iter()
        .filter_map(|(id, c)| if let Command::Restore(s) = c { Some((*id, s.step)) } else { None })
        .collect();
    assert_eq!(restored, [(0, 2), (2, 2)]);
    assert!(sim.log.iter().any(|a| matches!(a, Action::Recovered { step: 2, generation: 1 })));
    // Generation 1 trains steps 3..=5 with exactly the batches the undisturbed run had.
    let replay: Vec<_> = steps_of(&sim, &[0, 2]).into_iter().filter(|(g, _, _)| *g == 1).collect();
    let expected: Vec<_> =
        steps_of(&whole, &[0, 1]).into_iter().filter(|(_, s, _)| *s >= 3).map(|(_, s, b)| (1, s, b)).collect();
    assert_eq!(replay, expected);
    // The step of generation 0 the survivor finished after the loss was not counted.
    assert!(sim.log.iter().any(|a| matches!(a, Action::Fenced(m) if m.contains("StepDone"))), "{:?}", sim.log);
    let stepped: Vec<u64> = sim
        .log
        .iter()
        .filter_map(|a| if let Action::Stepped { reports, .. } = a { Some(reports[0].2.step) } else { None })
        .collect();
    assert_eq!(stepped, [1, 2, 3, 3, 4, 5], "step 3 finished once before the loss... and again after");
    assert!(sim.log.iter().any(|a| matches!(a, Action::Final { step: 5, .. })));
    assert!(matches!(sim.log.last(), Some(Action::Done)));
}

#[test]
fn no_replacement_within_the_rejoin_timeout_stops_the_run_saying_how_to_resume() {
    let mut sim = Sim::new(plan(2));
    sim.join(Duration::ZERO, Behaviour::default());
    sim.join(Duration::ZERO, Behaviour { lost_at: Some(7), ..Default::default() });
    sim.run();
    let reason = sim.abort_reason().expect("aborted");
    assert!(
        reason.contains("no replacement") && reason.contains("checkpoint-2") && reason.contains("--resume"),
        "{reason}"
    );
    assert_eq!(sim.now - sim.start, Duration::from_secs(27), "20 s after the loss");
    // A worker that shows up once the run is over is not let in; one of a running run is.
    assert!(!sim.log.iter().any(|a| matches!(a, Action::Final { .. })));
}

#[test]
fn a_rank_stuck_in_a_step_is_regrouped_then_fenced_and_replaced() {
    let mut plan = plan(2);
    plan.step_timeout = Some(Duration::from_secs(30));
    plan.rejoin_timeout = Duration::from_secs(120);
    let mut sim = Sim::new(plan);
    sim.join(Duration::ZERO, Behaviour::default());
    sim.join(Duration::ZERO, Behaviour { hangs_at_step: Some(3), ..Default::default() });
    sim.join(Duration::from_secs(100), Behaviour::default());
    sim.run();
    assert!(sim.abort_reason().is_none(), "{:?}", sim.abort_reason());
    let says: Vec<&str> =
        sim.log.iter().filter_map(|a| if let Action::Say(t) = a { Some(t.as_str()) } else { None }).collect();
    assert!(
        says.iter().any(|t| t.contains("step 3 did not finish within 30 s") && t.contains("rank(s) 1;")),
        "{says:?}"
    );
    // Both were asked to regroup; only the stuck one stayed silent and was fenced.
    assert_eq!(sim.sent.iter().filter(|(_, c)| matches!(c, Command::Regroup { generation: 1, .. })).count(), 2);
    assert!(says.iter().any(|t| t.contains("worker w1 (rank 1) did not answer the regroup within 30 s")), "{says:?}");
    assert!(sim.log.iter().any(|a| matches!(a, Action::Drop(1, _))));
    assert!(sim.log.iter().any(|a| matches!(a, Action::Recovered { step: 2, generation: 2 })));
    assert!(sim.log.iter().any(|a| matches!(a, Action::Final { step: 5, .. })));
}

#[test]
fn with_min_workers_the_run_goes_on_with_fewer_ranks_and_the_same_global_batch() {
    let mut plan = plan(2);
    plan.min_workers = Some(1);
    let mut sim = Sim::new(plan);
    sim.join(Duration::ZERO, Behaviour::default());
    sim.join(Duration::ZERO, Behaviour { lost_at: Some(7), ..Default::default() });
    sim.run();
    assert!(sim.abort_reason().is_none(), "{:?}", sim.abort_reason());
    assert!(sim.sent.iter().any(|(id, c)| *id == 0 && matches!(c, Command::Regroup { rank: 0, world: 1, .. })));
    // Steps 3..=5 again on one rank: the whole global batch (4, or the 2 left at an epoch's
    // end) in micro-batches of 1.
    let replay: Vec<(u64, usize, usize)> = steps_of(&sim, &[0])
        .into_iter()
        .filter(|(g, _, _)| *g == 1)
        .map(|(_, s, b)| (s, b.len(), b.iter().map(Vec::len).sum()))
        .collect();
    assert_eq!(replay, [(3, 2, 2), (4, 4, 4), (5, 4, 4)]);
    assert!(sim.log.iter().any(|a| matches!(a, Action::Final { step: 5, .. })));
}
