//! The run's data, ready before the first step: records read and checked, tokenized on every
//! core (or taken from the cache a previous run with the same inputs left), the validation
//! split and the exact-match pairs.

use anyhow::{bail, Context, Result};
use lorafleet_common::config::TrainConfig;
use lorafleet_common::data::schedule::split_validation;
use lorafleet_common::data::{
    read_dataset_bytes, read_records, tokenize_records, tokenize_records_with, Anomaly, Dataset, Example, Skipped,
    Template, TokenizeOptions, TokenizeReport,
};
use lorafleet_common::ModelConfig;
use lorafleet_worker::Tokenizer;

/// Everything loaded before the first step: the coordinator reads the model's configuration
/// and tokenizer, never its weights.
pub struct Prepared {
    pub model: ModelConfig,
    pub tokenizer: Tokenizer,
    pub train: Vec<Example>,
    pub eval: Vec<Example>,
    pub exact_pairs: Vec<(String, String)>,
    /// What the data held and what was left out, for `metrics.jsonl` and the summary.
    pub data_report: serde_json::Value,
    pub skipped: Skipped,
}

/// Reads, checks and tokenizes the data (or takes it from the cache), splits off the
/// validation set and the exact-match pairs. With `[[datasets]]`, each file is read and
/// tokenized with its own template and the examples are laid end to end (example ids, the
/// keys of dropout masks, count across files).
pub fn prepare(config: &TrainConfig) -> Result<Prepared> {
    let model = ModelConfig::from_dir(&config.base_model)?;
    let tokenizer = Tokenizer::from_dir(&config.base_model, &model)?;
    let options = TokenizeOptions {
        cutoff_len: config.cutoff_len,
        train_on_inputs: config.train_on_inputs,
        drop_long: config.truncation == "drop",
    };
    let mut records = Vec::new();
    let mut origin: Vec<usize> = Vec::new();
    let mut templates = Vec::new();
    let mut examples: Vec<Example> = Vec::new();
    let mut skipped = Skipped::default();
    let (mut total, mut truncated, mut dropped) = (0, 0, 0);
    let mut per_file = Vec::new();
    let sources = config.sources();
    for (k, (path, template_name)) in sources.iter().enumerate() {
        let template = Template::resolve(template_name, &config.base_model)?;
        let (mut dataset, file_examples, report) =
            tokenized(config, k, path, template_name, &template, &tokenizer, &options)?;
        if let (true, Some(&first)) = (config.strict, report.too_long.first()) {
            bail!(
                "{}:{}: the record is longer than cutoff_len {} (too_long; --strict, truncation = \"drop\")",
                path.display(),
                dataset.lines[first],
                config.cutoff_len
            );
        }
        let mut file_skipped = std::mem::take(&mut dataset.skipped);
        for &i in &report.too_long {
            file_skipped.add(Anomaly::TooLong, path, dataset.lines[i]);
        }
        let read = dataset.records.len() + file_skipped.total() - report.too_long.len();
        per_file.push(
            serde_json::json!({"path": path, "template": template_name, "records": read, "examples": report.kept}),
        );
        (total, truncated, dropped) = (total + read, truncated + report.truncated, dropped + report.dropped);
        skipped.merge(file_skipped);
        let offset = records.len();
        examples.extend(file_examples.into_iter().map(|e| Example { record: e.record + offset, ..e }));
        origin.extend(std::iter::repeat_n(k, dataset.records.len()));
        records.extend(dataset.records);
        templates.push(template);
    }
    eprintln!(
        "data: {total} records -> {} examples ({truncated} truncated at cutoff_len {}, {dropped} dropped with nothing to learn, {} skipped)",
        examples.len(),
        config.cutoff_len,
        skipped.total()
    );
    if skipped.total() > 0 {
        eprintln!("data: skipped {}", skipped.summary());
    }
    let data_report = serde_json::json!({
        "type": "data", "path": per_file[0]["path"], "datasets": per_file, "records": total,
        "examples": examples.len(), "truncated": truncated, "dropped_no_target": dropped,
        "skipped": skipped.to_json(),
    });
    if config.val_set_size >= examples.len() {
        bail!("val_set_size {} leaves no training examples out of {}", config.val_set_size, examples.len());
    }
    let (train_idx, val_idx) = split_validation(examples.len(), config.val_set_size, config.seed);
    // Eval loss covers answer tokens only, whatever train_on_inputs says.
    let eval_options = TokenizeOptions { train_on_inputs: false, ..options };
    let template = Template::resolve(&config.prompt_template_name, &config.base_model)?;
    let eval = if !val_idx.is_empty() {
        // Each held-out record with its own file's template, runs of one file at a time.
        let mut eval = Vec::new();
        let held: Vec<usize> = val_idx.iter().map(|&i| examples[i].record).collect();
        for run in held.chunk_by(|a, b| origin[*a] == origin[*b]) {
            let k = origin[run[0]];
            let run_records: Vec<_> = run.iter().map(|&r| records[r].clone()).collect();
            eval.extend(tokenize_records(&sources[k].0, &run_records, &templates[k], &tokenizer, &eval_options)?.0);
        }
        eval
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
    Ok(Prepared { model, tokenizer, train, eval, exact_pairs, data_report, skipped })
}

/// The data set and its tokenization: from `output_dir/.lorafleet-cache/` when a run with
/// the same data file, tokenizer, template and settings left it there, else read and
/// tokenized on every core (with a progress bar on a terminal) and cached.
fn tokenized(
    config: &TrainConfig,
    index: usize,
    data: &std::path::Path,
    template_name: &str,
    template: &Template,
    tokenizer: &Tokenizer,
    options: &TokenizeOptions,
) -> Result<(Dataset, Vec<Example>, TokenizeReport)> {
    let bytes = std::fs::read(data).with_context(|| format!("{}", data.display()))?;
    let key = cache_key(config, &bytes, template_name)?;
    let dir = config.output_dir.join(".lorafleet-cache");
    let path = dir.join(format!("data-{index}-{}.bin", &key[..16]));
    let started = std::time::Instant::now();
    if let Ok(bytes) = std::fs::read(&path) {
        match bincode::serde::decode_from_slice::<Cached, _>(&bytes, bincode::config::standard()) {
            Ok((cached, _)) if cached.key == key => {
                eprintln!(
                    "data: tokenized records taken from {} ({:.1} s)",
                    path.display(),
                    started.elapsed().as_secs_f64()
                );
                return Ok((cached.dataset, cached.examples, cached.report));
            }
            _ => eprintln!("warning: {} is stale or unreadable; tokenizing again", path.display()),
        }
    }
    let dataset = read_dataset_bytes(data, bytes, config.strict)?;
    let bar = indicatif::ProgressBar::new(dataset.records.len() as u64);
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_style(indicatif::ProgressStyle::with_template("tokenizing {bar:30} {pos}/{len} [{elapsed_precise}]")?);
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let (examples, report) =
        tokenize_records_with(data, &dataset.records, template, tokenizer, options, &|n| bar.inc(n as u64))?;
    bar.finish_and_clear();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!(
        "data: {} records tokenized in {:.1} s on up to {threads} threads",
        dataset.records.len(),
        started.elapsed().as_secs_f64()
    );
    let cached = Cached { key, dataset, examples, report };
    // A cache that cannot be written costs the next run time, not this one its data.
    let write = || -> Result<()> {
        std::fs::create_dir_all(&dir)?;
        for old in std::fs::read_dir(&dir)?.filter_map(|e| e.ok()) {
            if old.file_name().to_string_lossy().starts_with(&format!("data-{index}-")) {
                let _ = std::fs::remove_file(old.path());
            }
        }
        let bytes = bincode::serde::encode_to_vec(&cached, bincode::config::standard())?;
        Ok(lorafleet_common::atomic::write_file(&path, &bytes)?)
    };
    if let Err(e) = write() {
        eprintln!("warning: could not cache the tokenized data in {}: {e:#}", dir.display());
    }
    Ok((cached.dataset, cached.examples, cached.report))
}

/// What the cache holds, and the key it was made for.
#[derive(serde::Serialize, serde::Deserialize)]
struct Cached {
    key: String,
    dataset: Dataset,
    examples: Vec<Example>,
    report: TokenizeReport,
}

/// SHA-256 of everything the tokenized data depends on: the data file's bytes, the tokenizer
/// files and the model's chat template, the template name (a template file's bytes too) and
/// the settings that shape examples.
fn cache_key(config: &TrainConfig, data: &[u8], template: &str) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"lorafleet-data-cache/1\0");
    h.update(data);
    h.update(lorafleet_worker::identity::tokenizer_digest(&config.base_model)?);
    // The model's chat template, when it is a file of its own (tokenizer_config.json is above).
    if let Ok(jinja) = std::fs::read(config.base_model.join("chat_template.jinja")) {
        h.update(&jinja);
    }
    h.update(template.as_bytes());
    if std::path::Path::new(template).is_file() {
        h.update(std::fs::read(template)?);
    }
    let settings = (config.cutoff_len, config.train_on_inputs, &config.truncation, config.strict);
    h.update(format!("{settings:?}").as_bytes());
    Ok(lorafleet_common::protocol::hex(&h.finalize()))
}
