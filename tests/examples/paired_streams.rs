//! The random streams of one lorafleet training run, written out so that a PEFT run can replay
//! them: `tools/peft_demo_train.py --replay DIR` then trains from the same lora_A
//! initialisation, on the same batches in the same order, under the same dropout masks. What
//! is left between the two runs is arithmetic (and, in int8, how each side quantizes), so their
//! loss curves and accuracies can be compared pairwise instead of over seeds.
//!
//! It reads the run's settings from a TOML file (`demo/demo.toml` by default, paths relative to
//! the current folder) and computes the streams with the functions training itself calls:
//! `LoraAdapter::init`, `GlobalBatches` and `spread` (one worker), `Dropout::mask`.
//!
//! Usage: `cargo run --release -p lorafleet-tests --example paired_streams -- [CONFIG] OUT [--seed N]`
//!
//! Writes into OUT:
//! - `initial/`: the adapter before the first step (PEFT format);
//! - `steps.jsonl`: one line per micro-batch, `{"step", "records", "lengths", "seq_len"}`, with
//!   the record index and token count of each row, in row order;
//! - `masks.bin`: for each line of `steps.jsonl`, then each layer, then each targeted module in
//!   `LINEAR_MODULES` order, the `[rows, seq_len, in_features]` keep mask, one bit per element
//!   (`numpy.packbits` order: most significant bit first), each block padded to whole bytes.

use candle_core::Device;
use lorafleet_common::config::TrainConfig;
use lorafleet_common::data::schedule::{spread, steps_per_epoch, EpochSteps, GlobalBatches};
use lorafleet_common::data::{read_records, tokenize_records, Template, TokenizeOptions};
use lorafleet_common::peft::LINEAR_MODULES;
use lorafleet_common::{Batch, ModelConfig};
use lorafleet_worker::adapter_io::save_adapter;
use lorafleet_worker::dropout::Dropout;
use lorafleet_worker::lora::module_shape;
use lorafleet_worker::{LoraAdapter, Tokenizer};
use std::error::Error;
use std::io::Write;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn Error>> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let seed = match args.iter().position(|a| a == "--seed") {
        Some(i) => {
            let value = args.get(i + 1).ok_or("--seed needs a value")?.parse::<u64>()?;
            args.drain(i..i + 2);
            Some(value)
        }
        None => None,
    };
    let (config_path, out) = match args.as_slice() {
        [out] => (PathBuf::from("demo/demo.toml"), PathBuf::from(out)),
        [config, out] => (PathBuf::from(config), PathBuf::from(out)),
        _ => return Err("usage: paired_streams [CONFIG] OUT [--seed N]".into()),
    };
    let mut config = TrainConfig::from_toml_file(&config_path)?;
    if let Some(seed) = seed {
        config.seed = seed;
    }
    if config.sample_packing || config.val_set_size > 0 || !config.datasets.is_empty() {
        return Err("paired_streams replays one data file, no validation split and no packing".into());
    }
    std::fs::create_dir_all(&out)?;

    let model = ModelConfig::from_dir(&config.base_model)?;
    let tokenizer = Tokenizer::from_dir(&config.base_model, &model)?;
    let template = Template::resolve(&config.prompt_template_name, &config.base_model)?;
    let options = TokenizeOptions {
        cutoff_len: config.cutoff_len,
        train_on_inputs: config.train_on_inputs,
        drop_long: config.truncation == "drop",
    };
    let records = read_records(&config.data_path)?;
    let (examples, _) = tokenize_records(&config.data_path, &records, &template, &tokenizer, &options)?;
    let lengths: Vec<usize> = examples.iter().map(|e| e.input_ids.len()).collect();

    let lora = config.lora();
    let adapter = LoraAdapter::init(lora.clone(), &model, config.seed, &Device::Cpu)?;
    save_adapter(&adapter, &model, &out.join("initial"))?;

    let epochs = EpochSteps::Uniform(steps_per_epoch(examples.len(), config.batch_size) as u64);
    let total = config.max_steps.map_or(epochs.total(config.num_epochs as u64), |m| m as u64);
    let mut batches = GlobalBatches::new(lengths.clone(), config.seed, config.group_by_length, config.batch_size);
    let mut steps = std::io::BufWriter::new(std::fs::File::create(out.join("steps.jsonl"))?);
    let mut masks = std::io::BufWriter::new(std::fs::File::create(out.join("masks.bin"))?);
    for step in 1..=total {
        let (epoch, index, _) = epochs.locate(step);
        let global = batches.get(epoch, index as usize);
        for micro in spread(global, &lengths, 1, config.micro_batch_size).remove(0) {
            if micro.is_empty() {
                continue;
            }
            // The micro-batch as training builds it: its padded length and dropout keys.
            let batch = Batch::from_examples(micro.iter().map(|&i| &examples[i]), tokenizer.pad_id);
            let seq_len = batch.seq_len;
            let line = serde_json::json!({
                "step": step,
                "records": batch.example_ids,
                "lengths": micro.iter().map(|&i| examples[i].input_ids.len()).collect::<Vec<_>>(),
                "seq_len": seq_len,
            });
            writeln!(steps, "{line}")?;
            let dropout = Dropout::On { seed: config.seed, step, example_ids: batch.example_ids };
            for layer in 0..model.num_hidden_layers {
                for (m, name) in LINEAR_MODULES.iter().enumerate() {
                    if !lora.targets(layer, name) {
                        continue;
                    }
                    let features = module_shape(&model, m).0;
                    let Some(mask) = dropout.mask(lora.lora_dropout, layer, m, seq_len, features, &Device::Cpu)? else {
                        continue;
                    };
                    masks.write_all(&pack_bits(&mask.flatten_all()?.to_vec1::<f32>()?))?;
                }
            }
        }
    }
    steps.flush()?;
    masks.flush()?;
    eprintln!("{total} steps of seed {} written to {}", config.seed, out.display());
    Ok(())
}

/// One bit per element (1 = kept), most significant bit first, as `numpy.packbits`.
fn pack_bits(mask: &[f32]) -> Vec<u8> {
    mask.chunks(8)
        .map(|chunk| chunk.iter().enumerate().fold(0u8, |byte, (k, &v)| byte | (u8::from(v != 0.0) << (7 - k))))
        .collect()
}
