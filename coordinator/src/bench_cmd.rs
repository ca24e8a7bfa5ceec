//! `coordinator bench`: our training speed and peak memory beside PyTorch + PEFT's, measured
//! side by side in one invocation (`--reference-python PY`).
//!
//! Workloads (`--workload`): the 58M Llama of `../shared/bench/peft_cpu_bench.py`, a 135M Llama
//! of SmolLM-135M's shape (both random weights, on random-token or instruction-shaped batches,
//! checkpointing off and on), and the demo's training (`demo`: `--demo-steps` steps of
//! demo/demo.toml beside `tools/peft_demo_train.py`). Each configuration runs `--rounds`
//! times, ours and PyTorch's alternately (who goes first alternates too), each run in its own
//! process so that its peak RSS is its own; the figure of merit is the median over rounds of
//! the ratio ours / theirs within a round, so slow spells of a shared machine hit both sides
//! of a pair. Without `--reference-python`, PyTorch's recorded figures stand in, labelled so.

use crate::bench_ours::{self, Shape};
use crate::bench_reference::{self, Reference};
use crate::cli::{BenchArgs, BenchBatches, BenchWorkload, OffOnBoth};
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Command;

/// The median (the mean of the middle two for an even count); 0 for none.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

/// One configuration: what both sides run.
struct Config {
    workload: &'static str,
    batches: &'static str,
    ckpt: bool,
    /// Model folder (with config.json) and batch file of a step workload; `None` for the demo.
    step: Option<(&'static Shape, PathBuf, PathBuf)>,
}

impl Config {
    fn label(&self) -> String {
        match &self.step {
            Some(_) => format!("{} · {} · checkpointing {}", self.workload, self.batches, on_off(self.ckpt)),
            None => "demo · demo.toml".to_owned(),
        }
    }
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// A configuration's runs: ours per variant (`f32`, `bf16`, `int8`, `int8+bf16`) and theirs,
/// one entry per round.
struct Measured {
    config: Config,
    ours: Vec<(&'static str, Vec<Value>)>,
    theirs: Vec<Value>,
}

pub fn run(args: BenchArgs) -> Result<()> {
    if let Some(only) = &args.only {
        return bench_ours::child(&args, only);
    }
    let tmp = tempfile::tempdir()?;
    if args.scaling {
        let dir = tmp.path().join("bench-58m");
        bench_ours::write_model(&bench_ours::M58, &dir)?;
        return crate::bench_scaling::run(&dir, args.steps, args.warmup.max(1));
    }
    anyhow::ensure!(args.rounds >= 1 && args.steps >= 1, "--rounds and --steps must be at least 1");
    anyhow::ensure!(
        args.demo_steps > args.warmup || !args.workloads.contains(&BenchWorkload::Demo),
        "--demo-steps must be more than --warmup"
    );
    let reference = args.reference_python.as_deref().map(|p| Reference::new(p, args.threads)).transpose()?;
    match &reference {
        Some(r) => eprintln!("reference: {} ({})", r.python.display(), r.versions),
        None => eprintln!(
            "no reference: --reference-python not given; PyTorch + PEFT figures are recorded ones, not measured in \
             this run"
        ),
    }
    let mut workloads = args.workloads.clone();
    if workloads.is_empty() {
        workloads = vec![BenchWorkload::M58, BenchWorkload::M135];
    }
    workloads.dedup();
    if args.device != "cpu" {
        anyhow::ensure!(
            !workloads.contains(&BenchWorkload::Demo),
            "--device {}: the demo workload runs on the CPU (drop --workload demo)",
            args.device
        );
        anyhow::ensure!(
            reference.is_some(),
            "--device {}: no PyTorch figures are recorded for a GPU; give --reference-python",
            args.device
        );
    }
    let ckpts: &[bool] = match args.checkpointing {
        OffOnBoth::Off => &[false],
        OffOnBoth::On => &[true],
        OffOnBoth::Both => &[false, true],
    };
    let kinds: &[BenchBatches] = match args.batches {
        BenchBatches::Both => &[BenchBatches::Random, BenchBatches::Instruction],
        BenchBatches::Random => &[BenchBatches::Random],
        BenchBatches::Instruction => &[BenchBatches::Instruction],
    };
    let mut results = Vec::new();
    for w in workloads {
        let Some(shape) = bench_ours::shape(w) else {
            let config = Config { workload: "demo", batches: "demo", ckpt: false, step: None };
            results.push(measure(&args, reference.as_ref(), config)?);
            continue;
        };
        let dir = tmp.path().join(shape.name);
        bench_ours::write_model(shape, &dir)?;
        eprintln!("random {} model written to {}", shape.name, dir.display());
        for &kind in kinds {
            let batch = bench_ours::batch(kind, (shape.config)()["vocab_size"].as_u64().unwrap_or(0) as usize);
            let name = batch_name(kind);
            let file = dir.join(format!("batch-{name}.json"));
            std::fs::write(&file, bench_ours::batch_json(&batch).to_string())?;
            for &ckpt in ckpts {
                let config = Config {
                    workload: shape.name,
                    batches: name,
                    ckpt,
                    step: Some((shape, dir.clone(), file.clone())),
                };
                results.push(measure(&args, reference.as_ref(), config)?);
            }
        }
    }
    if args.json {
        println!("{}", json_report(&args, reference.as_ref(), &results));
    } else {
        print_report(&args, reference.as_ref(), &results);
    }
    Ok(())
}

fn batch_name(kind: BenchBatches) -> &'static str {
    match kind {
        BenchBatches::Instruction => "instruction",
        _ => "random",
    }
}

/// Runs `config`'s rounds, ours and theirs alternately.
fn measure(args: &BenchArgs, reference: Option<&Reference>, config: Config) -> Result<Measured> {
    let mut variants = vec!["f32"];
    if args.bf16 {
        variants.push("bf16");
    }
    if args.int8 {
        variants.push("int8");
    }
    if args.int8 && args.bf16 {
        // int8 block linears with a bf16 torch_dtype: the head's products in bf16 too.
        variants.push("int8+bf16");
    }
    let mut m = Measured { ours: variants.iter().map(|v| (*v, Vec::new())).collect(), theirs: Vec::new(), config };
    let label = m.config.label();
    for round in 0..args.rounds {
        let theirs_first = round % 2 == 1;
        if theirs_first {
            theirs(args, reference, &mut m, &label, round)?;
        }
        for k in 0..m.ours.len() {
            let variant = m.ours[k].0;
            let v = ours(args, &m.config, variant).with_context(|| format!("{label}: ours ({variant})"))?;
            eprintln!("[{label}] round {}: lorafleet {variant} {}", round + 1, brief(&v));
            m.ours[k].1.push(v);
        }
        if !theirs_first {
            theirs(args, reference, &mut m, &label, round)?;
        }
    }
    Ok(m)
}

fn theirs(args: &BenchArgs, reference: Option<&Reference>, m: &mut Measured, label: &str, round: usize) -> Result<()> {
    let Some(r) = reference else { return Ok(()) };
    let v = match &m.config.step {
        Some((shape, dir, batch)) => {
            let run = bench_reference::StepRun { load: args.same_weights, ckpt: m.config.ckpt, lora: shape.lora };
            r.step(dir, batch, run, &args.device, args.steps, args.warmup)
        }
        None => r.demo(args.demo_steps, args.warmup),
    }
    .with_context(|| format!("{label}: PyTorch + PEFT"))?;
    eprintln!("[{label}] round {}: PyTorch + PEFT {}", round + 1, brief(&v));
    m.theirs.push(v);
    Ok(())
}

fn brief(v: &Value) -> String {
    format!("{:.0} tokens/s, peak RSS {:.0} MiB", tps(v), rss(v))
}

fn tps(v: &Value) -> f64 {
    v["tokens_per_second"].as_f64().unwrap_or(f64::NAN)
}

fn rss(v: &Value) -> f64 {
    v["peak_rss_mib"].as_f64().unwrap_or(f64::NAN)
}

/// This very binary: on Linux `/proc/self/exe`, which still runs it when a rebuild has
/// replaced the file during a long benchmark.
fn this_exe() -> Result<PathBuf> {
    let proc = PathBuf::from("/proc/self/exe");
    Ok(if proc.exists() { proc } else { std::env::current_exe()? })
}

/// One of our runs in a child process (`bench --only VARIANT`).
fn ours(args: &BenchArgs, config: &Config, variant: &str) -> Result<Value> {
    let mut c = Command::new(this_exe()?);
    let demo = if variant == "f32" { "demo".to_string() } else { format!("demo-{variant}") };
    let only = if config.step.is_some() { variant } else { &demo };
    c.args(["bench", "--only", only, "--steps", &args.steps.to_string(), "--warmup", &args.warmup.to_string()])
        .args(["--device", &args.device])
        .env("RAYON_NUM_THREADS", args.threads.to_string());
    match &config.step {
        Some((shape, dir, _)) => {
            c.args(["--workload", shape.name, "--batches", config.batches, "--checkpointing", on_off(config.ckpt)])
                .arg("--model")
                .arg(dir);
        }
        None => {
            c.args(["--workload", "demo", "--demo-steps", &args.demo_steps.to_string()]);
        }
    }
    bench_reference::run_json(c, "coordinator bench --only")
}

/// A configuration's figures for one of our variants against theirs (measured or recorded).
struct Row<'a> {
    m: &'a Measured,
    variant: &'static str,
    ours_tps: Vec<f64>,
    ours_rss: Vec<f64>,
    theirs_tps: Vec<f64>,
    theirs_rss: Vec<f64>,
    recorded: Option<(f64, Option<f64>, &'static str)>,
}

impl Row<'_> {
    fn ratios(&self) -> Vec<f64> {
        self.ours_tps.iter().zip(&self.theirs_tps).map(|(o, t)| o / t).collect()
    }
    fn rss_ratios(&self) -> Vec<f64> {
        self.ours_rss.iter().zip(&self.theirs_rss).map(|(o, t)| o / t).collect()
    }
    /// (theirs tokens/s, ratio, theirs RSS, RSS ratio), measured or else recorded.
    fn against(&self) -> Option<(f64, f64, Option<f64>, Option<f64>)> {
        if !self.theirs_tps.is_empty() {
            let rss = median(&self.theirs_rss);
            return Some((
                median(&self.theirs_tps),
                median(&self.ratios()),
                Some(rss),
                Some(median(&self.rss_ratios())),
            ));
        }
        let (t, r, _) = self.recorded?;
        Some((t, median(&self.ours_tps) / t, r, r.map(|r| median(&self.ours_rss) / r)))
    }
}

fn rows(results: &[Measured]) -> Vec<Row<'_>> {
    let mut out = Vec::new();
    for m in results {
        for (variant, runs) in &m.ours {
            let c = &m.config;
            out.push(Row {
                m,
                variant,
                ours_tps: runs.iter().map(tps).collect(),
                ours_rss: runs.iter().map(rss).collect(),
                theirs_tps: m.theirs.iter().map(tps).collect(),
                theirs_rss: m.theirs.iter().map(rss).collect(),
                recorded: bench_reference::recorded(c.workload, c.batches, on_off(c.ckpt)),
            });
        }
    }
    out
}

fn fmt(x: Option<f64>, digits: usize) -> String {
    x.filter(|v| v.is_finite()).map_or("—".into(), |v| format!("{v:.digits$}"))
}

fn print_report(args: &BenchArgs, reference: Option<&Reference>, results: &[Measured]) {
    let rows = rows(results);
    let demo = results.iter().any(|m| m.config.step.is_none());
    let steps = results.iter().any(|m| m.config.step.is_some());
    let mut what = Vec::new();
    if steps {
        what.push(format!("step workloads: median of {} timed steps after {} warm-up", args.steps, args.warmup));
    }
    if demo {
        what.push(format!(
            "demo: {} steps, tokens/s over steps {}..{}",
            args.demo_steps,
            args.warmup + 1,
            args.demo_steps
        ));
    }
    println!("{}; {} thread(s) a side, {} round(s)", what.join("; "), args.threads, args.rounds);
    if args.device != "cpu" {
        println!("device {}: both sides compute the base in bf16 (LoRA in f32); peak RSS is host memory", args.device);
    }
    match reference {
        Some(r) => println!("PyTorch + PEFT measured in this run: {} ({})", r.python.display(), r.versions),
        None => println!(
            "no reference: --reference-python not given; PyTorch + PEFT figures are recorded, not measured in this run"
        ),
    }
    for row in &rows {
        println!("\n{} — lorafleet {}: {}", row.m.config.label(), row.variant, describe(args, row.m));
        println!(
            "| round | lorafleet tok/s | PyTorch tok/s | ratio | lorafleet RSS (MiB) | PyTorch RSS (MiB) | RSS ratio |"
        );
        println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
        for i in 0..row.ours_tps.len() {
            let (t, tr) = (row.theirs_tps.get(i).copied(), row.theirs_rss.get(i).copied());
            println!(
                "| {} | {:.0} | {} | {} | {:.0} | {} | {} |",
                i + 1,
                row.ours_tps[i],
                fmt(t, 0),
                fmt(t.map(|t| row.ours_tps[i] / t), 2),
                row.ours_rss[i],
                fmt(tr, 0),
                fmt(tr.map(|r| row.ours_rss[i] / r), 2)
            );
        }
        match (row.theirs_tps.is_empty(), row.against(), row.recorded) {
            (false, Some((_, ratio, _, rss_ratio)), _) => println!(
                "median of the {} pairwise ratios: {ratio:.2}x PyTorch + PEFT tokens/s, peak RSS {}x",
                row.theirs_tps.len(),
                fmt(rss_ratio, 2)
            ),
            (true, Some((t, ratio, r, rss_ratio)), Some((_, _, source))) => println!(
                "against PyTorch + PEFT recorded, not measured in this run ({source}): {t:.0} tokens/s, peak RSS {} \
                 MiB: {ratio:.2}x tokens/s, {}x RSS",
                fmt(r, 0),
                fmt(rss_ratio, 2)
            ),
            _ => println!(
                "no PyTorch + PEFT figure: none recorded for this workload, none measured (--reference-python)"
            ),
        }
        if let Some(line) = losses(args, row) {
            println!("{line}");
        }
    }
    let note = if reference.is_some() { "" } else { " (recorded, not measured in this run)" };
    println!("\n## Summary: medians over {} round(s){note}\n", args.rounds);
    println!(
        "| workload | batches | checkpointing | lorafleet | lorafleet tok/s | PyTorch + PEFT tok/s{note} | ratio | lorafleet \
         RSS (MiB) | PyTorch RSS (MiB) | RSS ratio |"
    );
    println!("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for row in &rows {
        let c = &row.m.config;
        let a = row.against();
        println!(
            "| {} | {} | {} | {} | {:.0} | {} | {} | {:.0} | {} | {} |",
            c.workload,
            c.batches,
            on_off(c.ckpt),
            row.variant,
            median(&row.ours_tps),
            fmt(a.map(|a| a.0), 0),
            fmt(a.map(|a| a.1), 2),
            median(&row.ours_rss),
            fmt(a.and_then(|a| a.2), 0),
            fmt(a.and_then(|a| a.3), 2)
        );
    }
    println!("\nratio = median over rounds of (ours / PyTorch's) within a round; tokens/s counts non-padding tokens");
    for row in rows.iter().filter(|r| r.m.config.ckpt) {
        let off = rows.iter().find(|o| {
            let (a, b) = (&o.m.config, &row.m.config);
            !a.ckpt && a.workload == b.workload && a.batches == b.batches && o.variant == row.variant
        });
        if let Some(off) = off {
            let (c, cost) = (&row.m.config, |on: &[f64], off: &[f64]| 100.0 * (1.0 - median(on) / median(off)));
            let theirs = if row.theirs_tps.is_empty() {
                String::new()
            } else {
                format!(" (PyTorch + PEFT: {:.0}%)", cost(&row.theirs_tps, &off.theirs_tps))
            };
            println!(
                "checkpointing costs {:.0}% of lorafleet {}'s throughput on {} {}{theirs}",
                cost(&row.ours_tps, &off.ours_tps),
                row.variant,
                c.workload,
                c.batches
            );
        }
    }
}

/// Both sides' first-step loss (demo: the last step's), from the first round.
fn losses(args: &BenchArgs, row: &Row<'_>) -> Option<String> {
    let (ours, theirs) = (row.m.ours.iter().find(|(v, _)| *v == row.variant)?.1.first()?, row.m.theirs.first()?);
    if row.m.config.step.is_none() {
        let last = |v: &Value| v["final_loss"].as_f64().unwrap_or(f64::NAN);
        return Some(format!(
            "loss of the last step: lorafleet {:.4}, PyTorch + PEFT {:.4} (different example orders)",
            last(ours),
            last(theirs)
        ));
    }
    let first = |v: &Value| v["losses"][0].as_f64().unwrap_or(f64::NAN);
    let (a, b) = (first(ours), first(theirs));
    let note = if args.same_weights {
        format!("same weights: |difference| {:.1e}", (a - b).abs())
    } else {
        "each side's own random init; --same-weights makes them comparable".to_owned()
    };
    Some(format!("first-step loss: lorafleet {a:.5}, PyTorch + PEFT {b:.5} ({note})"))
}

/// What a configuration trains on, in words.
fn describe(args: &BenchArgs, m: &Measured) -> String {
    let tokens = m.ours.first().and_then(|(_, r)| r.first()).and_then(|v| v["tokens"].as_f64()).unwrap_or(0.0);
    match (&m.config.step, m.config.batches) {
        (Some((shape, _, _)), batches) => {
            let rows = if batches == "instruction" {
                let l: Vec<String> = bench_ours::INSTRUCTION_LENGTHS.iter().map(|l| l.to_string()).collect();
                format!("rows of {} tokens, right padded, loss on the last 60% of each", l.join("/"))
            } else {
                "4 × 256 random tokens".to_owned()
            };
            let (r, alpha, dropout) = shape.lora;
            format!("{rows} ({tokens:.0} tokens a step), LoRA r {r} alpha {alpha} dropout {dropout} on q,v")
        }
        (None, _) => format!(
            "{} steps of the demo's training ({tokens:.0} non-padding tokens after {} warm-up step(s))",
            args.demo_steps, args.warmup
        ),
    }
}

fn json_report(args: &BenchArgs, reference: Option<&Reference>, results: &[Measured]) -> Value {
    let rows: Vec<Value> = rows(results)
        .iter()
        .map(|row| {
            let c = &row.m.config;
            let a = row.against();
            let source = match (row.theirs_tps.is_empty(), row.recorded) {
                (false, _) => json!("measured"),
                (true, Some((_, _, s))) => json!(format!("recorded: {s}")),
                (true, None) => Value::Null,
            };
            let index = row.m.ours.iter().position(|(v, _)| *v == row.variant).unwrap_or(0);
            json!({
                "workload": c.workload, "batches": c.batches, "checkpointing": c.ckpt, "lorafleet": row.variant,
                "ours_tokens_per_second": median(&row.ours_tps), "ours_peak_rss_mib": median(&row.ours_rss),
                "theirs_tokens_per_second": a.map(|a| a.0), "theirs_peak_rss_mib": a.and_then(|a| a.2),
                "ratio": a.map(|a| a.1), "rss_ratio": a.and_then(|a| a.3), "ratios": row.ratios(),
                "rss_ratios": row.rss_ratios(), "theirs_source": source,
                "ours_runs": row.m.ours[index].1, "theirs_runs": row.m.theirs,
            })
        })
        .collect();
    json!({
        "reference": reference.map(|r| json!({"python": r.python.display().to_string(), "versions": r.versions})),
        "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "threads": args.threads,
        "device": args.device,
        "demo_steps": args.demo_steps, "same_weights": args.same_weights, "results": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[f64::NAN, 5.0]), 5.0);
        assert_eq!(median(&[]), 0.0);
    }
}
