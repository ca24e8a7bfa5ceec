//! `coordinator bench --scaling`: data-parallel step time on CPU workers, split into each
//! rank's own compute and everything else (all-reduce, waiting for the slowest rank, the
//! coordinator's round trip), for 1, 2 and 4 workers at the same global batch, on the demo
//! model and on the 58M benchmark model.
//!
//! Each configuration is a real `coordinator --workers N` run (worker processes, QUIC, the
//! TCP ring); the figures come from its `metrics.jsonl` (one record per step).

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;
use std::process::Command;

/// One configuration's mean figures over the timed steps.
struct Row {
    model: &'static str,
    workers: usize,
    step: f64,
    compute: f64,
    allreduce: f64,
    tokens_per_second: f64,
}

/// Runs the scaling table with `steps` timed steps after `warmup`.
pub fn run(bench_model: &Path, steps: usize, warmup: usize) -> Result<()> {
    let demo = crate::train_args::demo_dir();
    // The 58M model has no tokenizer of its own: it borrows the demo's (ids < 1024 < 32000).
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        std::fs::copy(demo.join("base").join(f), bench_model.join(f)).with_context(|| format!("copying {f}"))?;
    }
    let mut rows = Vec::new();
    for (model, dir) in [("demo (1.5M)", demo.join("base")), ("bench (58M)", bench_model.to_path_buf())] {
        for workers in [1usize, 2, 4] {
            let row = one(model, &dir, workers, steps, warmup)?;
            eprintln!(
                "{model}, {workers} worker(s): step {:.3} s, compute {:.3} s, all-reduce {:.4} s",
                row.step, row.compute, row.allreduce
            );
            rows.push(row);
        }
    }
    println!("| model | workers | step (s) | compute (s) | all-reduce (s) | comm + sync | tokens/s | speed-up |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in &rows {
        let base = rows.iter().find(|b| b.model == r.model && b.workers == 1).map_or(1.0, |b| b.tokens_per_second);
        println!(
            "| {} | {} | {:.3} | {:.3} | {:.4} | {:.1}% | {:.0} | {:.2}x |",
            r.model,
            r.workers,
            r.step,
            r.compute,
            r.allreduce,
            100.0 * (r.step - r.compute).max(0.0) / r.step,
            r.tokens_per_second,
            r.tokens_per_second / base
        );
    }
    println!("compute = mean over ranks of forward + backward + optimizer; comm + sync = the rest of the step");
    Ok(())
}

fn one(model: &'static str, dir: &Path, workers: usize, steps: usize, warmup: usize) -> Result<Row> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("out");
    let micro = (16 / workers).to_string();
    let status = Command::new(std::env::current_exe()?)
        .args(["--demo", "--base_model", dir.to_str().context("path")?, "--output_dir", out.to_str().context("path")?])
        .args(["--workers", &workers.to_string(), "--micro_batch_size", &micro, "--batch_size", "16"])
        .args(["--max_steps", &(steps + warmup).to_string(), "--logging_steps", "1", "--save_steps", "0"])
        .args(["--eval_steps", "0", "--eval_exact_match", "false", "--gradient_checkpointing", "false"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()?;
    if !status.success() {
        bail!("{model} with {workers} workers failed (rerun the command by hand to see why)");
    }
    let text = std::fs::read_to_string(out.join("metrics.jsonl"))?;
    let train: Vec<Value> =
        text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).filter(|v| v["type"] == "train").collect();
    let step_of = |v: &Value| v["step"].as_u64().unwrap_or(0);
    let tokens_of = |v: &Value| v["tokens"].as_f64().unwrap_or(0.0);
    let records: Vec<&Value> = train.iter().filter(|v| step_of(v) > warmup as u64).collect();
    anyhow::ensure!(!records.is_empty(), "{model}: no timed steps in metrics.jsonl");
    let n = records.len() as f64;
    let mean = |f: &dyn Fn(&Value) -> f64| records.iter().map(|v| f(v)).sum::<f64>() / n;
    let over_ranks = |v: &Value, keys: &[&str]| {
        let ws = v["workers"].as_array().map(Vec::as_slice).unwrap_or_default();
        ws.iter().map(|w| keys.iter().map(|k| w[*k].as_f64().unwrap_or(0.0)).sum::<f64>()).sum::<f64>()
            / ws.len().max(1) as f64
    };
    let step = mean(&|v| v["step_seconds"].as_f64().unwrap_or(0.0));
    // Tokens of the timed steps: the count after the last one minus the count after warm-up.
    let warmed_up = train.iter().find(|v| step_of(v) == warmup as u64).map_or(0.0, tokens_of);
    let timed_tokens = records.last().map_or(0.0, |v| tokens_of(v)) - warmed_up;
    Ok(Row {
        model,
        workers,
        step,
        compute: mean(&|v| over_ranks(v, &["forward_seconds", "backward_seconds", "optimizer_seconds"])),
        allreduce: mean(&|v| over_ranks(v, &["allreduce_seconds"])),
        tokens_per_second: timed_tokens / (step * n),
    })
}
