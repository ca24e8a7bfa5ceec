//! Losing a worker after the start, and getting the run back: fencing, waiting for a
//! replacement, regrouping every rank into a new generation and putting them back into the
//! last saved state, from which the same steps are trained again.
//!
//! Why replaying from the last checkpoint is exact: every replica holds the same state after
//! every step, the data order and dropout masks are functions of the seed and the step, so
//! steps trained again give the same bytes; the interrupted step itself may have been applied
//! by some ranks and not by others, so no survivor's state is trusted.

use super::{Action, Command, Phase, Schedule, Stage, StepReport};
use lorafleet_common::protocol::{hex, Hash};
use std::time::{Duration, Instant};

impl Schedule {
    /// No replacement is coming (none joined in time, or the shell has no restarts left):
    /// with `--min_workers` and enough ranks left, go on with fewer (each rank accumulates
    /// more micro-batches of the same global batch); otherwise stop.
    pub fn no_replacement(&mut self, why: String) {
        if !matches!(self.phase, Phase::Recovering(_)) {
            return self.stop(why);
        }
        let left = self.members.len();
        match self.plan.min_workers {
            Some(min) if left >= min.max(1) => {
                self.actions.push_back(Action::Say(format!(
                    "{why}: going on with {left} of {} workers (--min_workers {min}); the global batch stays {}, \
                     so the result equals an undisturbed run's within float rounding, not bit for bit",
                    self.plan.world, self.plan.batch_size
                )));
                self.plan.world = left;
                self.regroup();
            }
            _ => self.stop(why),
        }
    }

    /// Stops the run (the shell cannot go on, e.g. a local worker died with no restarts left).
    pub fn stop(&mut self, reason: String) {
        if !self.is_over() {
            let hint = self.resume_hint();
            self.abort(format!("{reason}; {hint}"));
        }
    }

    /// A worker of a started run is gone: fence it (its connection is dropped; whatever it
    /// sends later is not heard), abandon the step in flight and wait for a replacement. With
    /// no rejoin time the run stops instead.
    pub(super) fn lose(&mut self, r: usize, why: String, now: Instant) {
        let m = self.members.remove(r);
        self.actions.push_back(Action::Drop(m.id, why.clone()));
        self.actions.push_back(Action::WorkerLost { rank: r, name: m.name.clone() });
        self.roster();
        if self.plan.rejoin_timeout.is_zero() {
            return self.abort(format!("{why}; the run cannot continue without it (--rejoin_timeout 0)"));
        }
        self.generation += 1;
        self.actions.push_back(Action::Say(format!(
            "{why}: fenced; waiting up to {:.0} s for a replacement, then every rank restarts from step {} \
             (generation {})",
            self.plan.rejoin_timeout.as_secs_f64(),
            self.last.step,
            self.generation
        )));
        if !matches!(self.phase, Phase::Recovering(_)) {
            self.phase = Phase::Recovering(now);
        }
    }

    pub(super) fn resume_hint(&self) -> String {
        match self.last.step {
            0 => "no checkpoint was written yet".into(),
            s => format!("checkpoint-{s} is intact: run again with --resume_from_checkpoint latest"),
        }
    }

    pub(super) fn lost(&mut self, r: usize, reason: String, now: Instant) {
        if matches!(self.phase, Phase::Gathering) {
            let m = self.members.remove(r);
            self.actions.push_back(Action::Say(format!("worker {} left before the start: {reason}", m.name)));
            self.roster();
        } else {
            let name = self.members[r].name.clone();
            self.lose(r, format!("lost worker {name} (rank {r}): {reason}"), now);
        }
    }

    /// Every rank (re)learns its place: newcomers by `Welcome`, the others by `Regroup`
    /// (which breaks their old group); all answer with a fresh ring address.
    pub(super) fn regroup(&mut self) {
        let (world, generation) = (self.plan.world, self.generation);
        for rank in 0..world {
            let m = &mut self.members[rank];
            let cmd = match m.welcomed {
                true => Command::Regroup { rank, world, generation },
                false => Command::Welcome { rank, world },
            };
            m.regrouping = m.welcomed;
            m.welcomed = true;
            self.send(rank, cmd);
        }
        self.started = self.now;
        self.phase = Phase::Identifying(vec![None; world]);
    }

    /// The step deadline: `--step_timeout`, else 20 times the longest step so far (at least
    /// a minute), and 30 minutes for the first (it sizes every buffer).
    pub(super) fn step_timeout(&self) -> Duration {
        self.plan.step_timeout.unwrap_or_else(|| match self.slowest_step {
            Some(t) => (t * 20).max(Duration::from_secs(60)),
            None => Duration::from_secs(1800),
        })
    }

    /// A step ran past its deadline: some rank is stuck (its compute, or a collective with a
    /// peer that is alive but silent). Regroup every rank: that breaks every ring, and the
    /// stuck one will not answer.
    pub(super) fn step_overdue(&mut self, step: u64, got: Vec<Option<StepReport>>) {
        let missing: Vec<String> = (0..got.len()).filter(|&r| got[r].is_none()).map(|r| r.to_string()).collect();
        self.generation += 1;
        self.actions.push_back(Action::Say(format!(
            "step {step} did not finish within {:.0} s (--step_timeout) on rank(s) {}; regrouping every rank \
             (generation {})",
            self.step_timeout().as_secs_f64(),
            missing.join(", "),
            self.generation
        )));
        self.regroup();
    }

    /// Ranks that did not answer a regroup in time are stuck: fence them and wait for
    /// replacements.
    pub(super) fn regroup_overdue(&mut self, answered: Vec<bool>) {
        let wait = self.step_timeout().as_secs_f64();
        for r in (0..self.members.len()).rev() {
            if self.members[r].regrouping && !answered[r] {
                let name = self.members[r].name.clone();
                self.lose(
                    r,
                    format!("worker {name} (rank {r}) did not answer the regroup within {wait:.0} s"),
                    self.now,
                );
                if self.is_over() {
                    return;
                }
            }
        }
    }

    /// Every rank holds the state after `step` again: train on from there (or score the base
    /// model first, if that had not happened yet).
    pub(super) fn restored(&mut self, step: u64, digest: Hash) {
        let short = hex(&digest[..6]);
        if self.generation > 0 {
            self.actions.push_back(Action::Recovered { step, generation: self.generation });
            self.actions.push_back(Action::Say(format!(
                "recovered: every rank holds the state after step {step} ({short}); generation {} trains on",
                self.generation
            )));
        } else {
            self.actions.push_back(Action::Say(format!(
                "resumed from step {step}: every rank holds the saved state ({short})"
            )));
        }
        if step == 0 && !self.scored_before && self.plan.resume.is_none() {
            self.start_scoring_or(Stage::Before);
        } else {
            self.start_step(step + 1);
        }
    }
}
