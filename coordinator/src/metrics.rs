//! `/metrics` for Prometheus: the run's figures, per run and per worker, fed by the
//! schedule's actions (the same ones that drive the progress bar and `metrics.jsonl`).
//!
//! Workers push nothing of their own over HTTP: their step reports and heartbeats reach the
//! coordinator over the control channel, so Prometheus scrapes one target per run. Every
//! series carries the `run_id` label (a constant label of the registry); per-worker series
//! add `rank` and `worker`. Series exist from the start at 0 so that dashboards and alert
//! rules see a value, not an absence.

use crate::schedule::Action;
use anyhow::{Context, Result};
use lorafleet_common::protocol::{Resources, StepReport};
use prometheus::{Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, Opts, Registry, TextEncoder};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The address the coordinator serves on unless told otherwise.
pub const DEFAULT_ADDR: &str = "127.0.0.1:9400";
/// Per-worker labels.
const WORKER: &[&str] = &["rank", "worker"];
/// Step phases, as the histogram's `phase` label.
const PHASES: [&str; 5] = ["data", "forward", "backward", "allreduce", "optimizer"];

/// One run's metrics.
pub struct Metrics {
    registry: Registry,
    step: Gauge,
    epoch: Gauge,
    train_loss: Gauge,
    eval_loss: Gauge,
    learning_rate: Gauge,
    grad_norm: Gauge,
    tokens_per_second: Gauge,
    samples_per_second: Gauge,
    workers_joined: Gauge,
    workers_alive: Gauge,
    tokens_total: IntCounter,
    samples_total: IntCounter,
    steps_total: IntCounter,
    checkpoints_total: IntCounter,
    nonfinite_total: IntCounter,
    workers_lost_total: IntCounter,
    recoveries_total: IntCounter,
    fenced_total: IntCounter,
    replayed_steps_total: IntCounter,
    recovery_seconds_total: Gauge,
    generation: Gauge,
    /// When the loss that the next recovery answers happened.
    lost_at: Mutex<Option<Instant>>,
    worker_tokens_per_second: GaugeVec,
    worker_samples_per_second: GaugeVec,
    heartbeat_age: GaugeVec,
    worker_up: GaugeVec,
    rss: GaugeVec,
    device_used: GaugeVec,
    device_peak: GaugeVec,
    device_total: GaugeVec,
    phase_seconds: HistogramVec,
    /// (rank, name) → when the worker was last heard from, and whether it is still in.
    heard: Mutex<HashMap<(String, String), (Instant, bool)>>,
    heartbeat_timeout: Duration,
}

fn gauge(r: &Registry, name: &str, help: &str) -> Result<Gauge> {
    let g = Gauge::new(name, help)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn counter(r: &Registry, name: &str, help: &str) -> Result<IntCounter> {
    let c = IntCounter::new(name, help)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn per_worker(r: &Registry, name: &str, help: &str) -> Result<GaugeVec> {
    let g = GaugeVec::new(Opts::new(name, help), WORKER)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

impl Metrics {
    /// The registry of run `run_id` with `world` workers expected and `total` steps planned.
    pub fn new(run_id: &str, world: usize, total: u64, heartbeat_timeout: Duration) -> Result<Self> {
        let labels = HashMap::from([("run_id".to_owned(), run_id.to_owned())]);
        let r = Registry::new_custom(None, Some(labels))?;
        let build = GaugeVec::new(
            Opts::new("lorafleet_build_info", "Always 1; the labels say which build is running."),
            &["version", "features"],
        )?;
        r.register(Box::new(build.clone()))?;
        let features = [cfg!(feature = "cuda").then_some("cuda"), cfg!(feature = "nccl").then_some("nccl")];
        let features = features.into_iter().flatten().collect::<Vec<_>>().join(",");
        build.with_label_values(&[env!("CARGO_PKG_VERSION"), &features]).set(1.0);
        gauge(&r, "lorafleet_total_steps", "Optimizer steps planned for the run.")?.set(total as f64);
        gauge(&r, "lorafleet_workers_expected", "Workers the run waits for.")?.set(world as f64);
        let mut buckets = prometheus::exponential_buckets(0.001, 2.0, 18)?;
        buckets.insert(0, 0.0001);
        let phase_seconds = HistogramVec::new(
            HistogramOpts::new(
                "lorafleet_step_phase_seconds",
                "Seconds of each optimizer step spent per phase, per worker.",
            )
            .buckets(buckets),
            &["rank", "worker", "phase"],
        )?;
        r.register(Box::new(phase_seconds.clone()))?;
        let m = Self {
            step: gauge(&r, "lorafleet_step", "Last finished optimizer step.")?,
            epoch: gauge(&r, "lorafleet_epoch", "Epochs done, as a fraction.")?,
            train_loss: gauge(&r, "lorafleet_train_loss", "Mean token loss of the last step.")?,
            eval_loss: gauge(&r, "lorafleet_eval_loss", "Mean token loss on the eval set at the last evaluation.")?,
            learning_rate: gauge(&r, "lorafleet_learning_rate", "Learning rate of the last step.")?,
            grad_norm: gauge(&r, "lorafleet_grad_norm", "Global gradient norm of the last step, before clipping.")?,
            tokens_per_second: gauge(&r, "lorafleet_tokens_per_second", "Non-padding tokens per second, all workers.")?,
            samples_per_second: gauge(&r, "lorafleet_samples_per_second", "Examples per second, all workers.")?,
            workers_joined: gauge(&r, "lorafleet_workers_joined", "Workers that proved the token and are in the run.")?,
            workers_alive: gauge(
                &r,
                "lorafleet_workers_alive",
                "Joined workers heard from within the heartbeat timeout.",
            )?,
            tokens_total: counter(&r, "lorafleet_tokens_total", "Non-padding tokens trained on.")?,
            samples_total: counter(&r, "lorafleet_samples_total", "Examples trained on.")?,
            steps_total: counter(&r, "lorafleet_steps_total", "Optimizer steps finished.")?,
            checkpoints_total: counter(&r, "lorafleet_checkpoints_written_total", "Checkpoints written.")?,
            nonfinite_total: counter(&r, "lorafleet_nonfinite_total", "NaN or infinite losses or gradients met.")?,
            workers_lost_total: counter(
                &r,
                "lorafleet_workers_lost_total",
                "Workers lost after the start and fenced.",
            )?,
            recoveries_total: counter(
                &r,
                "lorafleet_recoveries_total",
                "Times every rank was put back into the last saved state after a loss.",
            )?,
            fenced_total: counter(
                &r,
                "lorafleet_fenced_messages_total",
                "Messages of an abandoned generation ignored.",
            )?,
            replayed_steps_total: counter(
                &r,
                "lorafleet_replayed_steps_total",
                "Steps trained again after recoveries (done before the loss, after the last checkpoint).",
            )?,
            recovery_seconds_total: gauge(
                &r,
                "lorafleet_recovery_seconds_total",
                "Seconds from each loss to the restored state, summed (replayed steps not included).",
            )?,
            generation: gauge(&r, "lorafleet_generation", "The run's generation: recoveries so far.")?,
            lost_at: Mutex::new(None),
            worker_tokens_per_second: per_worker(
                &r,
                "lorafleet_worker_tokens_per_second",
                "Tokens per second of one worker in the last step.",
            )?,
            worker_samples_per_second: per_worker(
                &r,
                "lorafleet_worker_samples_per_second",
                "Examples per second of one worker in the last step.",
            )?,
            heartbeat_age: per_worker(
                &r,
                "lorafleet_worker_heartbeat_age_seconds",
                "Seconds since the worker was last heard from.",
            )?,
            worker_up: per_worker(&r, "lorafleet_worker_up", "1 while the worker is in the run, 0 once it is lost.")?,
            rss: per_worker(&r, "lorafleet_worker_resident_memory_bytes", "Resident memory of the worker process.")?,
            device_used: per_worker(
                &r,
                "lorafleet_worker_device_memory_used_bytes",
                "Device memory in use (0 on CPU).",
            )?,
            device_peak: per_worker(
                &r,
                "lorafleet_worker_device_memory_peak_bytes",
                "Peak device memory in use (0 on CPU).",
            )?,
            device_total: per_worker(
                &r,
                "lorafleet_worker_device_memory_total_bytes",
                "Device memory of the worker's card (0 on CPU).",
            )?,
            phase_seconds,
            heard: Mutex::new(HashMap::new()),
            heartbeat_timeout,
            registry: r,
        };
        // lorafleet never skips a step (a non-finite one stops the run); the counter says so.
        counter(
            &m.registry,
            "lorafleet_skipped_steps_total",
            "Optimizer steps skipped (a non-finite step stops the run instead).",
        )?;
        Ok(m)
    }

    /// A joined worker's series, created at 0 so that dashboards see a value, not an absence.
    fn joined(&self, rank: usize, name: &str) {
        let rank_label = rank.to_string();
        let labels = [rank_label.as_str(), name];
        for g in [
            &self.rss,
            &self.device_used,
            &self.device_peak,
            &self.device_total,
            &self.heartbeat_age,
            &self.worker_tokens_per_second,
            &self.worker_samples_per_second,
        ] {
            g.with_label_values(&labels);
        }
        for phase in PHASES {
            self.phase_seconds.with_label_values(&[labels[0], labels[1], phase]);
        }
        self.heard(rank, name, true);
    }

    /// The worker was heard from (`up`), or is lost (`!up`: its last-heard time stays).
    fn heard(&self, rank: usize, name: &str, up: bool) {
        let key = (rank.to_string(), name.to_owned());
        self.worker_up.with_label_values(&[key.0.as_str(), key.1.as_str()]).set(if up { 1.0 } else { 0.0 });
        let mut heard = self.heard.lock().unwrap_or_else(|e| e.into_inner());
        let entry = heard.entry(key).or_insert((Instant::now(), up));
        *entry = (if up { Instant::now() } else { entry.0 }, up);
    }

    /// Updates from one schedule action; `step_seconds` is the wall time of a finished step.
    pub fn observe(&self, action: &Action, step_seconds: f64) {
        match action {
            Action::Roster(names) => {
                self.workers_joined.set(names.len() as f64);
                for (rank, name) in names.iter().enumerate() {
                    self.joined(rank, name);
                }
            }
            Action::WorkerLost { rank, name } => {
                self.heard(*rank, name, false);
                self.workers_lost_total.inc();
                self.lost_at.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(Instant::now);
            }
            Action::Recovered { step, generation } => {
                self.recoveries_total.inc();
                self.generation.set(*generation as f64);
                self.replayed_steps_total.inc_by((self.step.get() as u64).saturating_sub(*step));
                if let Some(t) = self.lost_at.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    self.recovery_seconds_total.add(t.elapsed().as_secs_f64());
                }
            }
            Action::Fenced(what) => {
                self.fenced_total.inc();
                tracing::debug!("fenced: {what}");
            }
            Action::NonFinite => self.nonfinite_total.inc(),
            Action::Heartbeat { rank: Some(rank), name, resources } => {
                self.heard(*rank, name, true);
                self.resources(*rank, name, resources);
            }
            Action::Stepped { epoch, lr, reports } => self.stepped(*epoch, *lr, reports, step_seconds),
            Action::Evaluated { loss_sum, tokens, .. } if *tokens > 0 => self.eval_loss.set(loss_sum / *tokens as f64),
            Action::Checkpoint { .. } => self.checkpoints_total.inc(),
            _ => {}
        }
    }

    fn resources(&self, rank: usize, name: &str, r: &Resources) {
        let rank = rank.to_string();
        let labels = [rank.as_str(), name];
        self.rss.with_label_values(&labels).set(r.rss_bytes as f64);
        self.device_used.with_label_values(&labels).set(r.device_used_bytes as f64);
        self.device_peak.with_label_values(&labels).set(r.device_peak_bytes as f64);
        self.device_total.with_label_values(&labels).set(r.device_total_bytes as f64);
    }

    fn stepped(&self, epoch: f64, lr: f64, reports: &[(usize, String, StepReport)], seconds: f64) {
        let Some((_, _, first)) = reports.first() else { return };
        self.step.set(first.step as f64);
        self.epoch.set(epoch);
        self.train_loss.set(first.loss);
        self.learning_rate.set(lr);
        self.grad_norm.set(first.grad_norm);
        self.steps_total.inc();
        let per_second = |n: u64| if seconds > 0.0 { n as f64 / seconds } else { 0.0 };
        let (mut tokens, mut samples) = (0, 0);
        for (rank, name, r) in reports {
            self.heard(*rank, name, true);
            let rank = rank.to_string();
            let labels = [rank.as_str(), name.as_str()];
            self.worker_tokens_per_second.with_label_values(&labels).set(per_second(r.local_tokens));
            self.worker_samples_per_second.with_label_values(&labels).set(per_second(r.local_samples));
            let s = &r.seconds;
            for (phase, v) in PHASES.iter().zip([s.data, s.forward, s.backward, s.allreduce, s.optimizer]) {
                self.phase_seconds.with_label_values(&[labels[0], labels[1], phase]).observe(v);
            }
            tokens += r.local_tokens;
            samples += r.local_samples;
        }
        self.tokens_total.inc_by(tokens);
        self.samples_total.inc_by(samples);
        self.tokens_per_second.set(per_second(tokens));
        self.samples_per_second.set(per_second(samples));
    }

    /// The text exposition, with heartbeat ages as of now.
    pub fn render(&self) -> Vec<u8> {
        let heard = self.heard.lock().unwrap_or_else(|e| e.into_inner());
        let mut alive = 0;
        for ((rank, name), (at, up)) in heard.iter() {
            let age = at.elapsed();
            self.heartbeat_age.with_label_values(&[rank.as_str(), name.as_str()]).set(age.as_secs_f64());
            alive += usize::from(*up && age < self.heartbeat_timeout);
        }
        self.workers_alive.set(alive as f64);
        drop(heard);
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

/// Serves `metrics` on `addr` (`0` disables) from a background thread. The default address
/// being taken is a warning (another run may hold it); an address the user chose is an error.
pub fn serve(addr: &str, metrics: Arc<Metrics>) -> Result<Option<SocketAddr>> {
    if addr == "0" {
        return Ok(None);
    }
    let server = match tiny_http::Server::http(addr) {
        Ok(s) => s,
        Err(e) if addr == DEFAULT_ADDR => {
            eprintln!("metrics: {addr} is not available ({e}); /metrics is off for this run (--metrics-addr)");
            return Ok(None);
        }
        Err(e) => return Err(anyhow::anyhow!("--metrics-addr {addr}: {e}")),
    };
    let bound = server.server_addr().to_ip().context("metrics listener address")?;
    std::thread::Builder::new().name("metrics".into()).spawn(move || {
        for request in server.incoming_requests() {
            let response = if request.url() == "/metrics" {
                let header =
                    tiny_http::Header::from_bytes("Content-Type", "text/plain; version=0.0.4").expect("a valid header");
                tiny_http::Response::from_data(metrics.render()).with_header(header)
            } else {
                tiny_http::Response::from_data(b"lorafleet: see /metrics\n".to_vec()).with_status_code(404)
            };
            let _ = request.respond(response);
        }
    })?;
    Ok(Some(bound))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lorafleet_common::protocol::PhaseSeconds;

    fn text(m: &Metrics) -> String {
        String::from_utf8(m.render()).unwrap()
    }

    #[test]
    fn series_exist_from_the_start_and_follow_the_actions() {
        let m = Metrics::new("r1", 2, 10, Duration::from_secs(60)).unwrap();
        let t = text(&m);
        for name in [
            "lorafleet_nonfinite_total",
            "lorafleet_checkpoints_written_total",
            "lorafleet_skipped_steps_total",
            "lorafleet_workers_lost_total",
            "lorafleet_recoveries_total",
        ] {
            assert!(
                t.contains(&format!("# HELP {name} ")) && t.contains(&format!("{name}{{run_id=\"r1\"}} 0")),
                "{name}"
            );
        }
        m.observe(&Action::Roster(vec!["a".into(), "b".into()]), 0.0);
        let t = text(&m);
        assert!(t.contains(r#"lorafleet_worker_device_memory_used_bytes{rank="1",worker="b",run_id="r1"} 0"#), "{t}");
        assert!(t.contains(r#"lorafleet_workers_alive{run_id="r1"} 2"#));
        let report = |rank: u64| StepReport {
            generation: 0,
            step: 1,
            loss: 2.5,
            tokens: 100,
            grad_norm: 0.5,
            local_tokens: 40 + rank,
            local_samples: 4,
            seconds: PhaseSeconds { forward: 0.2, backward: 0.3, allreduce: 0.01, ..Default::default() },
        };
        let reports = vec![(0, "a".to_string(), report(0)), (1, "b".to_string(), report(1))];
        m.observe(&Action::Stepped { epoch: 0.1, lr: 1e-3, reports }, 2.0);
        m.observe(&Action::NonFinite, 0.0);
        m.observe(&Action::WorkerLost { rank: 1, name: "b".into() }, 0.0);
        m.observe(&Action::Fenced("StepDone".into()), 0.0);
        m.observe(&Action::Recovered { step: 0, generation: 1 }, 0.0);
        let t = text(&m);
        for line in [
            r#"lorafleet_tokens_total{run_id="r1"} 81"#,
            r#"lorafleet_tokens_per_second{run_id="r1"} 40.5"#,
            r#"lorafleet_worker_tokens_per_second{rank="1",worker="b",run_id="r1"} 20.5"#,
            r#"lorafleet_step_phase_seconds_count{phase="backward",rank="0",worker="a",run_id="r1"} 1"#,
            r#"lorafleet_nonfinite_total{run_id="r1"} 1"#,
            r#"lorafleet_worker_up{rank="1",worker="b",run_id="r1"} 0"#,
            r#"lorafleet_workers_alive{run_id="r1"} 1"#,
            r#"lorafleet_train_loss{run_id="r1"} 2.5"#,
            r#"lorafleet_workers_lost_total{run_id="r1"} 1"#,
            r#"lorafleet_fenced_messages_total{run_id="r1"} 1"#,
            r#"lorafleet_recoveries_total{run_id="r1"} 1"#,
            r#"lorafleet_replayed_steps_total{run_id="r1"} 1"#,
            r#"lorafleet_generation{run_id="r1"} 1"#,
        ] {
            assert!(t.contains(line), "missing {line} in\n{t}");
        }
    }
}
