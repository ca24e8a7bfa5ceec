//! `coordinator [train]`: plan the run, then drive it with one in-process replica
//! (`--workers 1`) or with worker processes over QUIC (`--workers N`, `--listen`).
//!
//! The coordinator owns the plan (data order, batches, learning rate, when to evaluate,
//! verify and save: `crate::schedule`); replicas own the maths. Both runners feed the same
//! schedule and write through the same `Sink`.

mod checkpoint;
mod data;
pub mod local;
mod plot;
mod report;
pub mod sink;
pub mod wire;

use crate::metrics::Metrics;
use crate::schedule::{Plan, Schedule};
use crate::train_args::TrainFlags;
use anyhow::{Context, Result};
use lorafleet_common::data::packing::Packing;
use lorafleet_common::data::schedule::{steps_per_epoch, EpochSteps};
use sink::Sink;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use wire::Wire;

pub fn run(flags: TrainFlags) -> Result<()> {
    let (config, origin) = flags.resolve()?;
    if flags.print_config {
        print!("{}", config.to_toml());
        return Ok(());
    }
    config.validate(&origin)?;
    if !flags.any_setting() {
        eprintln!("no settings given: training the embedded demo ({})", origin.display());
    } else if flags.demo {
        eprintln!("training the embedded demo ({}) with the flags given on top", origin.display());
    }
    if config.sample_packing && lorafleet_worker::train::Path::from_env() == lorafleet_worker::train::Path::Reference {
        anyhow::bail!("sample_packing needs the training engine, and LORAFLEET_ENGINE=reference asks for the reference path, which cannot train packed rows");
    }
    let mut prepared = data::prepare(&config)?;
    std::fs::create_dir_all(&config.output_dir).with_context(|| format!("creating {}", config.output_dir.display()))?;
    let distributed = config.workers > 1 || flags.launch.listen.is_some();
    let train_lengths: Vec<usize> = prepared.train.iter().map(|e| e.input_ids.len()).collect();
    let packing = config.sample_packing.then(|| {
        let max_steps = config.max_steps.map(|m| m as u64);
        Packing::new(&train_lengths, config.cutoff_len, config.seed, config.batch_size, config.num_epochs, max_steps)
    });
    let epochs = packing.as_ref().map_or(
        EpochSteps::Uniform(steps_per_epoch(prepared.train.len(), config.batch_size) as u64),
        Packing::epoch_steps,
    );
    let total = config.max_steps.map_or(epochs.total(config.num_epochs as u64), |m| m as u64);
    let digests = (
        lorafleet_worker::identity::model_digest(&config.base_model)?,
        lorafleet_worker::identity::tokenizer_digest(&config.base_model)?,
    );
    let identity = checkpoint::RunIdentity::new(digests, &prepared.train, &epochs, total);
    let resume = match &flags.resume_from_checkpoint {
        Some(spec) => {
            let r = checkpoint::resume(spec, &config, &identity, |w| eprintln!("{w}"))?;
            eprintln!("resuming from {} (step {} of {total})", r.dir.display(), r.state.step);
            Some(r)
        }
        None => None,
    };
    let plan = Plan {
        world: config.workers,
        total_steps: total,
        epochs: epochs.clone(),
        batch_size: config.batch_size,
        micro_batch_size: config.micro_batch_size,
        seed: config.seed,
        group_by_length: config.group_by_length,
        packing: packing.map(Arc::new),
        train_lengths,
        eval_examples: prepared.eval.len(),
        exact_pairs: prepared.exact_pairs.len(),
        eval_steps: config.eval_steps as u64,
        save_steps: config.save_steps as u64,
        lr: (config.lr_scheduler.clone(), config.learning_rate, config.warmup_steps),
        expected: distributed.then_some(digests),
        heartbeat_timeout: Duration::from_secs(flags.launch.heartbeat_timeout),
        resume: resume.map(|r| r.state),
        rejoin_timeout: Duration::from_secs(flags.launch.rejoin_timeout),
        min_workers: flags.launch.min_workers,
        step_timeout: flags.launch.step_timeout.filter(|&s| s > 0).map(Duration::from_secs),
    };
    let (units, per_epoch) = match &plan.packing {
        Some(p) => {
            let fill = 100.0 * p.fill(&plan.train_lengths, config.cutoff_len);
            let packs = p.epochs.first().map_or(0, Vec::len);
            eprintln!(
                "sample packing: {packs} rows of at most {} tokens in epoch 1, {fill:.1}% filled",
                config.cutoff_len
            );
            let packs: Vec<usize> = p.epochs.iter().map(Vec::len).collect();
            prepared.data_report["packing"] = serde_json::json!({"rows_per_epoch": packs, "fill": fill / 100.0});
            let EpochSteps::Each(steps) = &epochs else { unreachable!("packed epochs list their steps") };
            ("packed rows", format!("{steps:?} per epoch"))
        }
        None => ("examples", format!("{} per epoch", epochs.first())),
    };
    eprintln!(
        "training LoRA on {} examples: {total} steps ({per_epoch}), batch {} {units} = {} worker(s) x {} x {} micro-batches",
        prepared.train.len(),
        config.batch_size,
        config.workers,
        config.gradient_accumulation_steps(),
        config.micro_batch_size
    );
    let wire = Wire {
        run_id: flags
            .launch
            .run_id
            .clone()
            .unwrap_or_else(|| lorafleet_common::protocol::hex(&rand::random::<[u8; 6]>())),
        config_toml: config.to_toml(),
        pad: prepared.tokenizer.pad_id,
        sample_packing: config.sample_packing,
        train: prepared.train,
        eval: prepared.eval,
        pairs: prepared.exact_pairs,
        micro: config.micro_batch_size,
        max_new_tokens: config.eval_max_new_tokens as u32,
        ring_key: rand::random(),
    };
    let launch = &flags.launch;
    let metrics = Arc::new(Metrics::new(&wire.run_id, config.workers, total, plan.heartbeat_timeout)?);
    if let Some(addr) = crate::metrics::serve(&launch.metrics_addr, metrics.clone())? {
        eprintln!("metrics: http://{addr}/metrics (run_id {})", wire.run_id);
    }
    let resumed = plan.resume.as_ref().map(|r| r.step);
    let mut sink = Sink::new(&config, prepared.model, identity, resumed)?.with_metrics(metrics);
    if resumed.is_none() {
        sink.record(prepared.data_report)?;
    }
    let skipped = prepared.skipped;
    let schedule = Schedule::new(plan);
    let result = if distributed {
        crate::cluster::run(&config, launch, schedule, &wire, &mut sink)
    } else {
        local::run(&config, schedule, &wire, &mut sink)
    };
    if launch.metrics_linger > 0 {
        eprintln!("metrics: serving for {} more seconds", launch.metrics_linger);
        std::thread::sleep(Duration::from_secs(launch.metrics_linger));
    }
    result?;
    let o = sink.outcome();
    summary(&config.output_dir, o.steps, o.train_seconds, o.tokens, o.eval_loss, o.exact.0, o.exact.1);
    if skipped.total() > 0 {
        println!("records skipped: {}", skipped.summary());
    }
    for (rank, (name, bytes)) in &o.peak_rss {
        println!("worker {name} (rank {rank}): peak resident memory {:.0} MiB", *bytes as f64 / (1 << 20) as f64);
    }
    Ok(())
}

fn summary(
    out: &Path,
    steps: u64,
    seconds: f64,
    tokens: u64,
    eval: Option<f64>,
    before: Option<f64>,
    after: Option<f64>,
) {
    println!("adapter written to {}", out.display());
    println!(
        "steps: {steps}, training time: {seconds:.1} s, {:.0} tokens/s (non-padding)",
        tokens as f64 / seconds.max(1e-9)
    );
    if let Some(l) = eval {
        println!("final eval loss: {l:.4}");
    }
    if let (Some(b), Some(a)) = (before, after) {
        println!("exact-match accuracy: {:.1}% before -> {:.1}% after", 100.0 * b, 100.0 * a);
    }
}
