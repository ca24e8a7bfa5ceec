//! Our side of `coordinator bench`: the workloads' shapes and batches (the single source both
//! sides train on: the PyTorch script reads the same config.json and the same batch file),
//! the random-weight model folders, and the child processes that time one configuration
//! (`bench --only [demo-]f32|bf16|int8|int8+bf16`) and print one JSON line with their tokens/s and peak RSS.

use crate::cli::{BenchArgs, BenchBatches, BenchWorkload, OffOnBoth};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use lorafleet_common::config::BasePrecision;
use lorafleet_common::{Batch, LoraConfig, IGNORE_INDEX};
use lorafleet_worker::adamw::AdamWConfig;
use lorafleet_worker::collective::SingleRank;
use lorafleet_worker::replica::Replica;
use lorafleet_worker::LoraAdapter;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// A random-weight model shape and its LoRA settings (the same on both sides).
pub struct Shape {
    pub name: &'static str,
    /// config.json of the model.
    pub config: fn() -> Value,
    /// LoRA rank, alpha and dropout, on q_proj and v_proj.
    pub lora: (usize, f64, f64),
}

/// The 58M model of `../shared/bench/peft_cpu_bench.py`: hidden 512, 8 layers, 8 heads,
/// intermediate 1376, vocab 32000, untied lm_head; LoRA r 8, alpha 8, dropout 0.05.
pub static M58: Shape = Shape { name: "58m", config: config_58m, lora: (8, 8.0, 0.05) };

/// SmolLM-135M's shape: hidden 576, 30 layers, 9 heads / 3 kv heads (head_dim 64),
/// intermediate 1536, vocab 49152, tied embeddings, rope theta 100000, RMSNorm eps 1e-5;
/// LoRA r 8, alpha 16, dropout 0.05.
pub static M135: Shape = Shape { name: "135m", config: config_135m, lora: (8, 16.0, 0.05) };

/// Llama 3.2 1B's shape (without its RoPE scaling): hidden 2048, 16 layers, 32 heads / 8 kv
/// heads (head_dim 64), intermediate 8192, vocab 128256, tied embeddings, rope theta 500000;
/// LoRA r 16, alpha 32, dropout 0.05. The GPU workload of `tools/gpu-check.sh`.
pub static B1: Shape = Shape { name: "1b", config: config_1b, lora: (16, 32.0, 0.05) };

fn config_58m() -> Value {
    json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "hidden_size": 512,
        "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 8,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": false,
        "torch_dtype": "float32", "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2
    })
}

fn config_135m() -> Value {
    json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "head_dim": 64, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "tie_word_embeddings": true, "torch_dtype": "float32", "hidden_act": "silu", "bos_token_id": 1,
        "eos_token_id": 2
    })
}

fn config_1b() -> Value {
    json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 2048,
        "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 64, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "tie_word_embeddings": true, "torch_dtype": "float32", "hidden_act": "silu", "bos_token_id": 1,
        "eos_token_id": 2
    })
}

/// The shape of a step workload (`None` for `demo`).
pub fn shape(w: BenchWorkload) -> Option<&'static Shape> {
    match w {
        BenchWorkload::M58 => Some(&M58),
        BenchWorkload::M135 => Some(&M135),
        BenchWorkload::B1 => Some(&B1),
        BenchWorkload::Demo => None,
    }
}

/// Rows of the instruction-shaped batch and the share of each row that is prompt.
pub const INSTRUCTION_LENGTHS: [usize; 4] = [256, 201, 143, 97];
const PROMPT_NUM: usize = 2;
const PROMPT_DEN: usize = 5;

/// The batch of a step workload, from fixed seeds: random tokens 4 × 256 with labels = inputs,
/// or the instruction-shaped rows (right padded with id 0 to the longest, attention mask 0 and
/// label −100 on padding, label −100 on the first 40% of each row).
pub fn batch(kind: BenchBatches, vocab: usize) -> Batch {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let vocab = vocab as u32;
    match kind {
        BenchBatches::Instruction => {
            let rows: Vec<(Vec<u32>, Vec<i64>)> = INSTRUCTION_LENGTHS
                .iter()
                .map(|&len| {
                    let ids: Vec<u32> = (0..len).map(|_| rng.random_range(0..vocab)).collect();
                    let prompt = len * PROMPT_NUM / PROMPT_DEN;
                    let labels = ids
                        .iter()
                        .enumerate()
                        .map(|(t, &id)| if t < prompt { IGNORE_INDEX } else { i64::from(id) })
                        .collect();
                    (ids, labels)
                })
                .collect();
            Batch::from_rows(&rows, (0..rows.len() as u64).collect(), 0, 1)
        }
        _ => {
            let (rows, seq) = (4, 256);
            let ids: Vec<u32> = (0..rows * seq).map(|_| rng.random_range(0..vocab)).collect();
            Batch {
                rows,
                seq_len: seq,
                labels: ids.iter().map(|&i| i64::from(i)).collect(),
                input_ids: ids,
                attention_mask: vec![1; rows * seq],
                example_ids: (0..rows as u64).collect(),
                packed: Vec::new(),
            }
        }
    }
}

/// The batch as the PyTorch script reads it: `{"input_ids", "attention_mask", "labels"}`,
/// each a list of rows.
pub fn batch_json(b: &Batch) -> Value {
    let rows = |v: Vec<Value>| -> Vec<Value> { v.chunks(b.seq_len).map(|r| Value::from(r.to_vec())).collect() };
    json!({
        "input_ids": rows(b.input_ids.iter().map(|&x| json!(x)).collect()),
        "attention_mask": rows(b.attention_mask.iter().map(|&x| json!(x)).collect()),
        "labels": rows(b.labels.iter().map(|&x| json!(x)).collect()),
    })
}

/// Writes `shape`'s config.json and N(0, 0.02) weights (norms 1) into `dir`.
pub fn write_model(shape: &Shape, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let cfg = (shape.config)();
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
    let c = lorafleet_common::ModelConfig::from_value(&dir.join("config.json"), cfg)?;
    let (h, i, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let (q, kv) = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let randn = |shape: (usize, usize)| Tensor::randn(0f32, 0.02, shape, &Device::Cpu);
    let ones = |n: usize| Tensor::ones(n, DType::F32, &Device::Cpu);
    tensors.push(("model.embed_tokens.weight".into(), randn((v, h))?));
    if !c.tie_word_embeddings {
        tensors.push(("lm_head.weight".into(), randn((v, h))?));
    }
    tensors.push(("model.norm.weight".into(), ones(h)?));
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for (name, shape) in [
            ("self_attn.q_proj", (q, h)),
            ("self_attn.k_proj", (kv, h)),
            ("self_attn.v_proj", (kv, h)),
            ("self_attn.o_proj", (h, q)),
            ("mlp.gate_proj", (i, h)),
            ("mlp.up_proj", (i, h)),
            ("mlp.down_proj", (h, i)),
        ] {
            tensors.push((format!("{p}.{name}.weight"), randn(shape)?));
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            tensors.push((format!("{p}.{norm}.weight"), ones(h)?));
        }
    }
    safetensors::serialize_to_file(tensors.iter().map(|(k, t)| (k.as_str(), t)), None, &dir.join("model.safetensors"))?;
    Ok(())
}

/// `bench --only [demo-]VARIANT` (`demo` alone: f32): one of our runs, in this process; prints one JSON line with
/// `tokens_per_second` (non-padding tokens) and `peak_rss_mib` (VmHWM).
pub fn child(args: &BenchArgs, only: &str) -> Result<()> {
    let (is_demo, variant) = match only.strip_prefix("demo") {
        Some("") => (true, "f32"),
        Some(rest) => (true, rest.strip_prefix('-').unwrap_or(rest)),
        None => (false, only),
    };
    let (int8, bf16) = match variant {
        "f32" => (false, false),
        "bf16" => (false, true),
        "int8" => (true, false),
        "int8+bf16" => (true, true),
        _ => anyhow::bail!("--only {only}: expected f32, bf16, int8 or int8+bf16, optionally after demo-"),
    };
    let v = if is_demo { demo(args, int8, bf16)? } else { step(args, int8, bf16)? };
    println!("{v}");
    Ok(())
}

/// Steps of a bench model with int8 block linears (`load_in_8bit`) and/or bf16 products
/// (`torch_dtype = bf16`: the block linears unless int8, and the head).
fn step(args: &BenchArgs, int8: bool, bf16: bool) -> Result<Value> {
    let workload = *args.workloads.first().context("--only needs --workload")?;
    let shape = shape(workload).context("--only f32/int8 needs a step workload (58m, 135m, 1b)")?;
    let dir = args.model.as_deref().context("--only needs --model")?;
    let ckpt = match args.checkpointing {
        OffOnBoth::Off => false,
        OffOnBoth::On => true,
        OffOnBoth::Both => anyhow::bail!("--only needs --checkpointing off or on"),
    };
    anyhow::ensure!(args.batches != BenchBatches::Both, "--only needs --batches random or instruction");
    anyhow::ensure!(args.steps > 0, "--steps must be at least 1");
    let device = lorafleet_worker::device::parse(&args.device)?;
    let precision = BasePrecision { load_in_8bit: int8, int8_group_size: None, bf16 };
    let model = Arc::new(lorafleet_worker::device::load_model(dir, &device, precision)?);
    let (r, alpha, dropout) = shape.lora;
    let lora = LoraConfig { r, lora_alpha: alpha, lora_dropout: dropout, ..LoraConfig::default() };
    let adapter = LoraAdapter::init(lora, model.config(), 0, &device)?;
    let mut replica = Replica::new(model.clone(), adapter, AdamWConfig::default(), Box::new(SingleRank), 0)?;
    replica.set_gradient_checkpointing(ckpt);
    let batch = batch(args.batches, model.config().vocab_size);
    let tokens = batch.real_tokens() as f64;
    let mut times = Vec::new();
    let mut losses = Vec::new();
    for step in 1..=(args.warmup + args.steps) {
        let t = Instant::now();
        let (stats, _) = replica.step(std::slice::from_ref(&batch), step as u64, 3e-4, 1.0)?;
        // A GPU may still be running the optimizer's kernels: they belong to this step (the
        // PyTorch side synchronizes too).
        device.synchronize()?;
        if step > args.warmup {
            times.push(t.elapsed().as_secs_f64());
        }
        losses.push(stats.loss);
    }
    let median = crate::bench_cmd::median(&times);
    Ok(json!({
        "tokens": tokens, "step_seconds": times, "median_step_seconds": median,
        "tokens_per_second": tokens / median, "peak_rss_mib": peak_rss_mib()?, "losses": losses,
    }))
}

/// The demo's training for `--demo-steps` steps (no evaluation, no checkpoints), timed from
/// its metrics.jsonl: non-padding tokens of the steps after the warm-up over their step time.
fn demo(args: &BenchArgs, int8: bool, bf16: bool) -> Result<Value> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("out");
    let n = args.demo_steps.to_string();
    let mut argv = vec![
        "coordinator",
        "--demo",
        "--output_dir",
        out.to_str().context("path")?,
        "--max_steps",
        &n,
        "--logging_steps",
        "1",
        "--save_steps",
        "0",
        "--eval_steps",
        "0",
        "--eval_exact_match",
        "false",
        "--metrics-addr",
        "0",
        "--torch_dtype",
        if bf16 { "bf16" } else { "float32" },
    ];
    if int8 {
        argv.push("--load_in_8bit");
    }
    let cli = <crate::cli::Cli as clap::Parser>::try_parse_from(argv)?;
    crate::train::run(cli.train)?;
    let text = std::fs::read_to_string(out.join("metrics.jsonl"))?;
    let train: Vec<Value> =
        text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).filter(|v| v["type"] == "train").collect();
    let num = |v: &Value, k: &str| v[k].as_f64().unwrap_or(0.0);
    let warm = args.warmup as f64;
    let timed: Vec<&Value> = train.iter().filter(|v| num(v, "step") > warm).collect();
    anyhow::ensure!(!timed.is_empty(), "demo: no steps after the {} warm-up steps in metrics.jsonl", args.warmup);
    let warmed = train.iter().find(|v| num(v, "step") == warm).map_or(0.0, |v| num(v, "tokens"));
    let tokens = timed.last().map_or(0.0, |v| num(v, "tokens")) - warmed;
    let seconds: f64 = timed.iter().map(|v| num(v, "step_seconds")).sum();
    let all_tokens = train.last().map_or(0.0, |v| num(v, "tokens"));
    let all_seconds: f64 = train.iter().map(|v| num(v, "step_seconds")).sum();
    Ok(json!({
        "steps": train.len(), "timed_steps": timed.len(), "tokens": tokens, "seconds": seconds,
        "tokens_per_second": tokens / seconds.max(1e-9),
        "all_steps_tokens_per_second": all_tokens / all_seconds.max(1e-9),
        "final_loss": train.last().map(|v| num(v, "loss")), "peak_rss_mib": peak_rss_mib()?,
    }))
}

/// The process's peak resident set (VmHWM), in MiB.
fn peak_rss_mib() -> Result<f64> {
    let bytes = lorafleet_worker::node::process_status_bytes("VmHWM").context("no VmHWM in /proc/self/status")?;
    Ok(bytes as f64 / (1 << 20) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instruction_rows_are_padded_and_masked_and_both_kinds_are_fixed() {
        let b = batch(BenchBatches::Instruction, 32000);
        assert_eq!((b.rows, b.seq_len, b.real_tokens()), (4, 256, 697));
        for (r, &len) in INSTRUCTION_LENGTHS.iter().enumerate() {
            let (mask, labels) = (&b.attention_mask[r * 256..][..256], &b.labels[r * 256..][..256]);
            assert!(mask[..len].iter().all(|&m| m == 1) && mask[len..].iter().all(|&m| m == 0));
            let prompt = len * 2 / 5;
            assert!(labels[..prompt].iter().chain(&labels[len..]).all(|&l| l == IGNORE_INDEX));
            assert!(labels[prompt..len].iter().zip(&b.input_ids[r * 256 + prompt..]).all(|(&l, &i)| l == i64::from(i)));
        }
        assert_eq!(batch(BenchBatches::Instruction, 32000), b);
        let r = batch(BenchBatches::Random, 49152);
        assert_eq!((r.real_tokens(), r.target_tokens()), (1024, 1020));
        assert!(r.input_ids.iter().all(|&i| i < 49152));
        let j = batch_json(&b);
        assert_eq!(j["labels"].as_array().map(Vec::len), Some(4));
        assert_eq!(j["attention_mask"][3].as_array().map(|r| r.iter().filter(|&m| m == 1).count()), Some(97));
    }
}
