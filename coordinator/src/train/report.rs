//! What a run tells its user: a progress bar (or plain lines when stderr is not a terminal)
//! and `metrics.jsonl`, one JSON object per logged step, eval and accuracy.

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use std::fs::File;
use std::io::{IsTerminal, Write};
use std::path::Path;

/// Progress display plus the metrics file.
pub struct Reporter {
    bar: Option<ProgressBar>,
    metrics: File,
    /// (step, mean loss of the block) for the plot.
    pub train_points: Vec<(f64, f64)>,
    /// (step, eval loss) for the plot.
    pub eval_points: Vec<(f64, f64)>,
    /// The exact-match accuracy before training that a resumed run's first attempt logged.
    pub exact_before: Option<f64>,
    path: std::path::PathBuf,
}

impl Reporter {
    /// Starts a run of `total` steps writing `output_dir/metrics.jsonl`.
    pub fn new(output_dir: &Path, total: u64) -> Result<Self> {
        Self::open(&output_dir.join("metrics.jsonl"), total, false)
    }

    fn open(path: &Path, total: u64, append: bool) -> Result<Self> {
        let metrics = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(path)
            .with_context(|| format!("{}", path.display()))?;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]")
                    .expect("a valid template"),
            );
            bar
        });
        Ok(Self {
            bar,
            metrics,
            train_points: Vec::new(),
            eval_points: Vec::new(),
            exact_before: None,
            path: path.to_path_buf(),
        })
    }

    /// Continues a run resumed after `step` (see [`Reporter::rewind`]).
    pub fn resume(output_dir: &Path, total: u64, step: u64) -> Result<Self> {
        let mut me = Self::open(&output_dir.join("metrics.jsonl"), total, true)?;
        me.rewind(step)?;
        Ok(me)
    }

    /// Training goes on from the state after `step` (a resume, or a recovery after a lost
    /// worker): `metrics.jsonl` keeps the records up to that step (the later ones belong to
    /// an abandoned attempt and will be logged again), and the plot restarts from them.
    pub fn rewind(&mut self, step: u64) -> Result<()> {
        let path = self.path.clone();
        let old = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("{}", path.display())),
        };
        let kept: Vec<Value> = old
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["step"].as_u64().is_none_or(|s| s <= step))
            .collect();
        let text: String = kept.iter().map(|v| format!("{v}\n")).collect();
        lorafleet_common::atomic::write_file(&path, text.as_bytes())?;
        self.metrics =
            std::fs::OpenOptions::new().append(true).open(&path).with_context(|| format!("{}", path.display()))?;
        self.train_points.clear();
        self.eval_points.clear();
        for v in &kept {
            let point = (v["step"].as_f64().unwrap_or(0.0), v["loss"].as_f64().or(v["eval_loss"].as_f64()));
            match (v["type"].as_str(), point) {
                (Some("train"), (s, Some(l))) => self.train_points.push((s, l)),
                (Some("eval"), (s, Some(l))) => self.eval_points.push((s, l)),
                (Some("exact_match"), _) if v["stage"] == "before" => self.exact_before = v["accuracy"].as_f64(),
                _ => {}
            }
        }
        if let Some(bar) = &self.bar {
            bar.set_position(step);
        }
        Ok(())
    }

    /// A line of text above the bar (or on stderr).
    pub fn say(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    /// Appends one record to metrics.jsonl.
    pub fn record(&mut self, value: Value) -> Result<()> {
        writeln!(self.metrics, "{value}")?;
        self.metrics.flush()?;
        Ok(())
    }

    /// After every step: moves the bar.
    pub fn step(&self, step: u64, loss: f64, lr: f64, tokens_per_second: f64) {
        if let Some(bar) = &self.bar {
            bar.set_position(step);
            bar.set_message(format!("loss {loss:.4} lr {lr:.3e} {tokens_per_second:.0} tok/s"));
        }
    }

    /// A logged block of steps (`logging_steps`).
    pub fn log_train(&mut self, fields: Value) -> Result<()> {
        let (step, loss) = (fields["step"].as_f64().unwrap_or(0.0), fields["loss"].as_f64().unwrap_or(f64::NAN));
        self.train_points.push((step, loss));
        if self.bar.is_none() {
            eprintln!(
                "step {step} loss {loss:.4} lr {:.3e} grad_norm {:.3} {:.0} tok/s",
                fields["learning_rate"].as_f64().unwrap_or(0.0),
                fields["grad_norm"].as_f64().unwrap_or(0.0),
                fields["tokens_per_second"].as_f64().unwrap_or(0.0)
            );
        }
        let mut v = json!({"type": "train"});
        merge(&mut v, fields);
        self.record(v)
    }

    /// An eval-loss measurement.
    pub fn log_eval(&mut self, step: u64, loss: f64, tokens: u64) -> Result<()> {
        self.eval_points.push((step as f64, loss));
        self.say(&format!("step {step}: eval loss {loss:.4} over {tokens} tokens"));
        self.record(json!({"type": "eval", "step": step, "eval_loss": loss, "eval_tokens": tokens}))
    }

    /// Ends the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

fn merge(into: &mut Value, from: Value) {
    if let (Some(a), Value::Object(b)) = (into.as_object_mut(), from) {
        a.extend(b);
    }
}
