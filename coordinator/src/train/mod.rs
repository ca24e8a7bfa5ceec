//! `coordinator [train]`: the single-process training run (one worker, in this process).
//!
//! The coordinator owns the plan (data order, batches, learning rate, when to evaluate and
//! save); the `Replica` owns the maths. The distributed runtime will put replicas in worker
//! processes behind the same `Replica::step` call.

mod checkpoint;
mod lr;
mod plot;
mod report;

use crate::runtime;
use crate::train_args::TrainFlags;
use anyhow::{bail, Context, Result};
use lorafleet_common::config::TrainConfig;
use lorafleet_common::data::schedule::{epoch_order, split_validation, spread, steps_per_epoch};
use lorafleet_common::data::{read_records, tokenize_records, Example, Template, TokenizeOptions};
use lorafleet_common::Batch;
use lorafleet_worker::adamw::AdamWConfig;
use lorafleet_worker::collective::SingleRank;
use lorafleet_worker::eval::{eval_loss, exact_match};
use lorafleet_worker::replica::Replica;
use lorafleet_worker::{Llama, LoraAdapter, Tokenizer};
use report::Reporter;
use serde_json::json;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// Everything loaded before the first step.
struct Prepared {
    model: Arc<Llama>,
    tokenizer: Tokenizer,
    train: Vec<Example>,
    eval: Vec<Example>,
    exact_pairs: Vec<(String, String)>,
}

pub fn run(flags: TrainFlags) -> Result<()> {
    let (config, origin) = flags.resolve()?;
    if flags.print_config {
        print!("{}", config.to_toml());
        return Ok(());
    }
    config.validate(&origin)?;
    if config.workers != 1 {
        bail!(
            "--workers {}: this build trains with one in-process worker; data-parallel workers are not available yet",
            config.workers
        );
    }
    if flags.demo || !flags.any_setting() {
        eprintln!("no settings given: training the embedded demo ({})", origin.display());
    }
    let prepared = prepare(&config)?;
    std::fs::create_dir_all(&config.output_dir).with_context(|| format!("creating {}", config.output_dir.display()))?;
    train(&config, prepared)
}

fn prepare(config: &TrainConfig) -> Result<Prepared> {
    let device = runtime::device(&config.device)?;
    let model =
        Arc::new(runtime::load_model(&config.base_model, &device, config.load_in_8bit, config.int8_group_size)?);
    let tokenizer = Tokenizer::from_dir(&config.base_model, model.config())?;
    let template = Template::by_name(&config.prompt_template_name)?;
    let options = TokenizeOptions { cutoff_len: config.cutoff_len, train_on_inputs: config.train_on_inputs };
    let records = read_records(&config.data_path)?;
    let (examples, report) = tokenize_records(&config.data_path, &records, &template, &tokenizer, &options)?;
    eprintln!(
        "data: {} records -> {} examples ({} truncated at cutoff_len {}, {} dropped with nothing to learn)",
        report.records, report.kept, report.truncated, config.cutoff_len, report.dropped
    );
    if config.val_set_size >= examples.len() {
        bail!("val_set_size {} leaves no training examples out of {}", config.val_set_size, examples.len());
    }
    let (train_idx, val_idx) = split_validation(examples.len(), config.val_set_size, config.seed);
    // Eval loss covers answer tokens only, whatever train_on_inputs says.
    let eval_options = TokenizeOptions { train_on_inputs: false, ..options };
    let eval = if !val_idx.is_empty() {
        let val_records: Vec<_> = val_idx.iter().map(|&i| records[examples[i].record].clone()).collect();
        tokenize_records(&config.data_path, &val_records, &template, &tokenizer, &eval_options)?.0
    } else if let Some(path) = &config.eval_data_path {
        tokenize_records(path, &read_records(path)?, &template, &tokenizer, &eval_options)?.0
    } else {
        Vec::new()
    };
    let exact_pairs = match (&config.eval_data_path, config.eval_exact_match) {
        (Some(path), true) => read_records(path)?.iter().filter_map(|r| template.prompt_and_answer(r)).collect(),
        _ => Vec::new(),
    };
    let mut train: Vec<Example> = Vec::with_capacity(train_idx.len());
    let mut examples: Vec<Option<Example>> = examples.into_iter().map(Some).collect();
    for i in train_idx {
        train.extend(examples[i].take());
    }
    Ok(Prepared { model, tokenizer, train, eval, exact_pairs })
}

fn train(config: &TrainConfig, p: Prepared) -> Result<()> {
    let model = p.model.clone();
    let device = model.device().clone();
    let pad = p.tokenizer.pad_id;
    let out = &config.output_dir;
    let per_epoch = steps_per_epoch(p.train.len(), config.batch_size);
    let total = config.max_steps.unwrap_or(per_epoch * config.num_epochs);
    let adapter = LoraAdapter::init(config.lora(), model.config(), config.seed, &device)?;
    eprintln!(
        "training {} LoRA parameters on {} examples: {total} steps ({per_epoch} per epoch), batch {} = {} x {} micro-batches",
        adapter.num_parameters(),
        p.train.len(),
        config.batch_size,
        config.gradient_accumulation_steps(),
        config.micro_batch_size
    );
    let mut reporter = Reporter::new(out, total as u64)?;
    let before = if p.exact_pairs.is_empty() {
        None
    } else {
        let acc = exact_match(&model, None, &p.tokenizer, &p.exact_pairs, config.eval_max_new_tokens)?;
        reporter.say(&format!("exact match before training: {:.1}% of {}", 100.0 * acc, p.exact_pairs.len()));
        reporter.record(
            json!({"type": "exact_match", "stage": "before", "accuracy": acc, "examples": p.exact_pairs.len()}),
        )?;
        Some(acc)
    };
    let adam = AdamWConfig {
        beta1: config.adam_beta1,
        beta2: config.adam_beta2,
        eps: config.adam_epsilon,
        weight_decay: config.weight_decay,
    };
    let mut replica = Replica::new(model.clone(), adapter, adam, Box::new(SingleRank), config.seed)?;
    replica.set_gradient_checkpointing(config.gradient_checkpointing);
    let lengths: Vec<usize> = p.train.iter().map(|e| e.input_ids.len()).collect();
    let all: Vec<usize> = (0..p.train.len()).collect();
    let started = Instant::now();
    let mut train_seconds = 0.0;
    let mut tokens_seen = 0u64;
    let mut block = (0.0, 0usize);
    let mut last_eval = None;
    let mut step = 0usize;
    'epochs: for epoch in 0.. {
        let order = epoch_order(&all, &lengths, config.seed, epoch, config.group_by_length, config.batch_size);
        for global in order.chunks(config.batch_size) {
            if step >= total {
                break 'epochs;
            }
            let t0 = Instant::now();
            let plan = spread(global, 1, config.micro_batch_size);
            let micro: Vec<Batch> =
                plan[0].iter().map(|ids| Batch::from_examples(ids.iter().map(|&i| &p.train[i]), pad)).collect();
            tokens_seen +=
                micro.iter().map(|b| b.attention_mask.iter().map(|&m| u64::from(m)).sum::<u64>()).sum::<u64>();
            let lr = lr::lr_at(&config.lr_scheduler, config.learning_rate, config.warmup_steps, total, step);
            step += 1;
            let (stats, _timings) = replica.step(&micro, step as u64, lr, config.max_grad_norm).map_err(|e| {
                anyhow::anyhow!("training stopped at step {step}: {e}; no adapter was written for this step")
            })?;
            train_seconds += t0.elapsed().as_secs_f64();
            let tps = tokens_seen as f64 / train_seconds.max(1e-9);
            reporter.step(step as u64, stats.loss, lr, tps);
            block = (block.0 + stats.loss, block.1 + 1);
            if step.is_multiple_of(config.logging_steps) || step == total {
                let epoch_f = step as f64 / per_epoch as f64;
                reporter.log_train(json!({
                    "step": step, "epoch": epoch_f, "loss": block.0 / block.1 as f64, "learning_rate": lr,
                    "grad_norm": stats.grad_norm, "tokens": tokens_seen, "tokens_per_second": tps,
                    "elapsed_seconds": started.elapsed().as_secs_f64(),
                }))?;
                block = (0.0, 0);
            }
            let due = |every: usize| every > 0 && step.is_multiple_of(every);
            if !p.eval.is_empty() && (due(config.eval_steps) || step == total) {
                let l = eval_loss(&model, Some(replica.adapter()), &p.eval, pad, config.micro_batch_size)?;
                reporter.log_eval(step as u64, l.mean(), l.tokens)?;
                last_eval = Some(l.mean());
            }
            if due(config.save_steps) && step < total {
                checkpoint::save(config, &replica, step, epoch)?;
                reporter.say(&format!("step {step}: checkpoint written"));
            }
        }
    }
    reporter.finish();
    lorafleet_worker::adapter_io::save_adapter(replica.adapter(), model.config(), out)?;
    plot::loss_curve(&out.join("loss.png"), &reporter.train_points, &reporter.eval_points)?;
    let after = if p.exact_pairs.is_empty() {
        None
    } else {
        let acc =
            exact_match(&model, Some(replica.adapter()), &p.tokenizer, &p.exact_pairs, config.eval_max_new_tokens)?;
        reporter.record(
            json!({"type": "exact_match", "stage": "after", "accuracy": acc, "examples": p.exact_pairs.len()}),
        )?;
        Some(acc)
    };
    summary(out, step, train_seconds, tokens_seen, last_eval, before, after);
    Ok(())
}

fn summary(
    out: &Path,
    steps: usize,
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
