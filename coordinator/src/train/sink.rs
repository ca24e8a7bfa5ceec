//! Where the schedule's results go: the progress bar, `metrics.jsonl`, checkpoints, the
//! final adapter, the loss plot and the summary. Shared by the in-process and the
//! distributed runner, so both write the same files the same way.

use super::{checkpoint, plot, report::Reporter};
use crate::schedule::{Action, Stage};
use anyhow::{Context, Result};
use candle_core::Device;
use lorafleet_common::config::TrainConfig;
use lorafleet_common::protocol::StepReport;
use lorafleet_common::ModelConfig;
use serde_json::json;
use std::time::Instant;

/// What a finished run reports.
pub struct Outcome {
    /// Steps trained.
    pub steps: u64,
    /// Seconds spent in steps.
    pub train_seconds: f64,
    /// Non-padding tokens trained on.
    pub tokens: u64,
    /// Last eval loss.
    pub eval_loss: Option<f64>,
    /// Exact match before and after training.
    pub exact: (Option<f64>, Option<f64>),
    /// Peak resident memory reported by each rank's heartbeats: rank → (name, bytes).
    pub peak_rss: std::collections::BTreeMap<usize, (String, u64)>,
}

/// Consumes the schedule's non-network actions.
pub struct Sink<'a> {
    config: &'a TrainConfig,
    model: ModelConfig,
    identity: checkpoint::RunIdentity,
    reporter: Reporter,
    started: Instant,
    step_started: Option<Instant>,
    outcome: Outcome,
    block: Vec<(f64, Vec<StepReport>)>,
    metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
}

impl<'a> Sink<'a> {
    /// A sink writing into `config.output_dir`, for a run of `identity` that starts after
    /// `resumed` (a checkpoint's step) or from the beginning.
    pub fn new(
        config: &'a TrainConfig,
        model: ModelConfig,
        identity: checkpoint::RunIdentity,
        resumed: Option<u64>,
    ) -> Result<Self> {
        let total = identity.max_steps;
        let reporter = match resumed {
            Some(step) => Reporter::resume(&config.output_dir, total, step)?,
            None => Reporter::new(&config.output_dir, total)?,
        };
        Ok(Self {
            config,
            model,
            identity,
            started: Instant::now(),
            step_started: None,
            outcome: Outcome {
                steps: 0,
                train_seconds: 0.0,
                tokens: 0,
                eval_loss: None,
                exact: (reporter.exact_before, None),
                peak_rss: Default::default(),
            },
            reporter,
            block: Vec::new(),
            metrics: None,
        })
    }

    /// Also feed `/metrics`.
    pub fn with_metrics(mut self, metrics: std::sync::Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Appends one record to `metrics.jsonl`.
    pub fn record(&mut self, value: serde_json::Value) -> Result<()> {
        self.reporter.record(value)
    }

    /// A line for the user.
    pub fn say(&self, text: &str) {
        self.reporter.say(text);
    }

    /// The shell sent a step's commands: its wall time starts now.
    pub fn step_sent(&mut self, now: Instant) {
        self.step_started.get_or_insert(now);
    }

    /// Handles one action. Returns `Some(result)` when the run is over.
    pub fn handle(&mut self, action: &Action) -> Option<Result<()>> {
        let step_seconds = match action {
            Action::Stepped { .. } => self.step_started.take().map_or(0.0, |t| t.elapsed().as_secs_f64()),
            _ => 0.0,
        };
        if let Some(m) = &self.metrics {
            m.observe(action, step_seconds);
        }
        let result = match action {
            Action::Say(text) => {
                self.say(text);
                Ok(())
            }
            Action::Stepped { epoch, lr, reports } => self.stepped(*epoch, *lr, reports, step_seconds),
            Action::Evaluated { step, loss_sum, tokens } => {
                let mean = if *tokens > 0 { loss_sum / *tokens as f64 } else { 0.0 };
                self.outcome.eval_loss = Some(mean);
                self.reporter.log_eval(*step, mean, *tokens)
            }
            Action::Scored { stage, correct, total } => {
                let acc = *correct as f64 / (*total).max(1) as f64;
                let name = match stage {
                    Stage::Before => {
                        self.outcome.exact.0 = Some(acc);
                        self.say(&format!("exact match before training: {:.1}% of {total}", 100.0 * acc));
                        "before"
                    }
                    Stage::After => {
                        self.outcome.exact.1 = Some(acc);
                        "after"
                    }
                };
                self.reporter.record(json!({"type": "exact_match", "stage": name, "accuracy": acc, "examples": total}))
            }
            Action::Checkpoint { step, adapter, optimizer, digest } => {
                let written = self.adapter(adapter).and_then(|a| {
                    let saved = checkpoint::Saved {
                        step: *step,
                        adapter_config: a.config.to_json(),
                        adapter,
                        optimizer,
                        digest: *digest,
                    };
                    checkpoint::save(self.config, &self.identity, &saved)
                });
                written.map(|dir| self.say(&format!("step {step}: replicas agree; {} written", dir.display())))
            }
            Action::Final { step, adapter } => self.write_final(*step, adapter),
            Action::Recovered { step, .. } => {
                self.block.clear();
                self.reporter.rewind(*step)
            }
            Action::Done => return Some(Ok(())),
            Action::Abort(reason) => {
                self.reporter.finish();
                return Some(Err(anyhow::anyhow!("{reason}; no final adapter was written")));
            }
            Action::Heartbeat { rank: Some(rank), name, resources } => {
                let peak = self.outcome.peak_rss.entry(*rank).or_insert((name.clone(), 0));
                peak.1 = peak.1.max(resources.rss_bytes);
                Ok(())
            }
            Action::Send(..)
            | Action::Drop(..)
            | Action::Heartbeat { .. }
            | Action::Roster(_)
            | Action::WorkerLost { .. }
            | Action::Fenced(_)
            | Action::NonFinite => Ok(()),
        };
        result.err().map(Err)
    }

    fn adapter(&self, bytes: &[u8]) -> Result<lorafleet_worker::LoraAdapter> {
        Ok(lorafleet_worker::adapter_io::adapter_from_bytes(bytes, self.config.lora(), &self.model, &Device::Cpu)?)
    }

    fn stepped(&mut self, epoch: f64, lr: f64, reports: &[(usize, String, StepReport)], seconds: f64) -> Result<()> {
        let Some((_, _, first)) = reports.first() else { return Ok(()) };
        let step = first.step;
        self.outcome.steps = step;
        self.outcome.train_seconds += seconds;
        self.outcome.tokens += reports.iter().map(|(_, _, r)| r.local_tokens).sum::<u64>();
        let tps = self.outcome.tokens as f64 / self.outcome.train_seconds.max(1e-9);
        self.reporter.step(step, first.loss, lr, tps);
        self.block.push((seconds, reports.iter().map(|(_, _, r)| r.clone()).collect()));
        if step.is_multiple_of(self.config.logging_steps as u64) || step == self.identity.max_steps {
            let n = self.block.len() as f64;
            let loss = self.block.iter().map(|(_, r)| r[0].loss).sum::<f64>() / n;
            let step_seconds = self.block.iter().map(|(s, _)| s).sum::<f64>() / n;
            let workers: Vec<_> = reports
                .iter()
                .enumerate()
                .map(|(i, (rank, name, _))| {
                    let mean = |f: fn(&StepReport) -> f64| self.block.iter().map(|(_, r)| f(&r[i])).sum::<f64>() / n;
                    json!({
                        "rank": rank, "name": name,
                        "forward_seconds": mean(|r| r.seconds.forward),
                        "backward_seconds": mean(|r| r.seconds.backward),
                        "allreduce_seconds": mean(|r| r.seconds.allreduce),
                        "optimizer_seconds": mean(|r| r.seconds.optimizer),
                    })
                })
                .collect();
            self.reporter.log_train(json!({
                "step": step, "epoch": epoch, "loss": loss, "learning_rate": lr,
                "grad_norm": first.grad_norm, "tokens": self.outcome.tokens, "tokens_per_second": tps,
                "step_seconds": step_seconds, "workers": workers,
                "elapsed_seconds": self.started.elapsed().as_secs_f64(),
            }))?;
            self.block.clear();
        }
        Ok(())
    }

    fn write_final(&mut self, step: u64, bytes: &[u8]) -> Result<()> {
        self.reporter.finish();
        let out = &self.config.output_dir;
        let adapter = self.adapter(bytes)?;
        lorafleet_worker::adapter_io::save_adapter(&adapter, &self.model, out)
            .with_context(|| format!("writing the adapter to {}", out.display()))?;
        plot::loss_curve(&out.join("loss.png"), &self.reporter.train_points, &self.reporter.eval_points)?;
        self.say(&format!("step {step}: all replicas agree; adapter written to {}", out.display()));
        if self.config.merge {
            let merged = out.join("merged");
            crate::merge_cmd::merge_with_defaults(&self.config.base_model, out, &merged)?;
            self.say(&format!("merged model written to {}", merged.display()));
        }
        Ok(())
    }

    /// The figures of the finished run.
    pub fn outcome(&self) -> &Outcome {
        &self.outcome
    }
}
