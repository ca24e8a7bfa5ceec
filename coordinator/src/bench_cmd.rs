//! `coordinator bench`: training-step speed and peak memory of the 58M-parameter Llama of
//! `../shared/bench/peft_cpu_bench.py` (random weights, batch 4 × 256, LoRA r=8 on q,v) for
//! {f32, int8} × {checkpointing off, on}, beside PyTorch + PEFT's figures on the same kind of
//! machine. Each configuration runs in its own process so that its peak RSS is its own.

use crate::cli::BenchArgs;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use lorafleet_common::{Batch, LoraConfig};
use lorafleet_worker::adamw::AdamWConfig;
use lorafleet_worker::collective::SingleRank;
use lorafleet_worker::model::Quantization;
use lorafleet_worker::replica::Replica;
use lorafleet_worker::{Llama, LoraAdapter};
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// PyTorch 2.15 + PEFT 0.21.2 on a 2-vCPU machine of our kind, median tokens/s and peak RSS
/// (MiB) from `../shared/bench/peft_cpu_bench.md` (sdpa attention, the requested setting).
const PYTORCH: [(&str, f64, f64); 2] = [("off", 650.0, 2330.0), ("on", 560.0, 1870.0)];

const CONFIGS: [(&str, bool, bool); 4] =
    [("f32", false, false), ("f32", false, true), ("int8", true, false), ("int8", true, true)];

pub fn run(args: BenchArgs) -> Result<()> {
    if let Some(one) = &args.only {
        return one_config(&args, one);
    }
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("bench-58m");
    write_model(&dir)?;
    if args.scaling {
        return crate::bench_scaling::run(&dir, args.steps, args.warmup.max(1));
    }
    eprintln!(
        "random 58M model written to {}; {} timed steps after {} warm-up",
        dir.display(),
        args.steps,
        args.warmup
    );
    let mut rows = Vec::new();
    for (name, _, ckpt) in CONFIGS {
        let label = format!("{name}-{}", if ckpt { "on" } else { "off" });
        let out = std::process::Command::new(std::env::current_exe()?)
            .args(["bench", "--only", &label, "--model", dir.to_str().context("path")?])
            .args(["--steps", &args.steps.to_string(), "--warmup", &args.warmup.to_string()])
            .output()?;
        if !out.status.success() {
            bail!("bench {label} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("bench child output")?;
        eprintln!("{label}: {v}");
        rows.push((label, v["tokens_per_second"].as_f64().unwrap_or(0.0), v["peak_rss_mib"].as_f64().unwrap_or(0.0)));
    }
    print_table(&rows);
    Ok(())
}

fn print_table(rows: &[(String, f64, f64)]) {
    println!("| run | checkpointing | tokens/s | peak RSS (MiB) | tokens/s vs PyTorch | RSS vs PyTorch |");
    println!("| --- | --- | ---: | ---: | ---: | ---: |");
    for (torch_ckpt, tps, rss) in PYTORCH {
        println!("| PyTorch + PEFT (f32) | {torch_ckpt} | {tps:.0} | {rss:.0} | 1.00 | 1.00 |");
    }
    for (label, tps, rss) in rows {
        let (name, ckpt) = label.split_once('-').unwrap_or((label, "off"));
        let (_, ttps, trss) = PYTORCH.iter().find(|p| p.0 == ckpt).copied().unwrap_or(PYTORCH[0]);
        println!("| lorafleet ({name}) | {ckpt} | {tps:.0} | {rss:.0} | {:.2} | {:.2} |", tps / ttps, rss / trss);
    }
    let get = |l: &str| rows.iter().find(|r| r.0 == l).map(|r| (r.1, r.2)).unwrap_or((0.0, 0.0));
    for name in ["f32", "int8"] {
        let (off, on) = (get(&format!("{name}-off")).0, get(&format!("{name}-on")).0);
        println!("checkpointing costs {:.0}% of {name} throughput", 100.0 * (1.0 - on / off.max(1e-9)));
    }
    println!(
        "int8 + checkpointing peak RSS: {:.2}x PyTorch + PEFT with checkpointing",
        get("int8-on").1 / PYTORCH[1].2
    );
}

/// The benchmark model's config.json (`peft_cpu_bench.py`: hidden 512, 8 layers, 8 heads).
fn config() -> serde_json::Value {
    json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "hidden_size": 512,
        "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 8,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": false,
        "torch_dtype": "float32", "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2
    })
}

fn write_model(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let cfg = config();
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
    let c = lorafleet_common::ModelConfig::from_value(&dir.join("config.json"), cfg)?;
    let (h, i, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let randn = |shape: (usize, usize)| Tensor::randn(0f32, 0.02, shape, &Device::Cpu);
    tensors.push(("model.embed_tokens.weight".into(), randn((v, h))?));
    tensors.push(("lm_head.weight".into(), randn((v, h))?));
    tensors.push(("model.norm.weight".into(), Tensor::ones(h, DType::F32, &Device::Cpu)?));
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for (name, shape) in [
            ("self_attn.q_proj", (h, h)),
            ("self_attn.k_proj", (h, h)),
            ("self_attn.v_proj", (h, h)),
            ("self_attn.o_proj", (h, h)),
            ("mlp.gate_proj", (i, h)),
            ("mlp.up_proj", (i, h)),
            ("mlp.down_proj", (h, i)),
        ] {
            tensors.push((format!("{p}.{name}.weight"), randn(shape)?));
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            tensors.push((format!("{p}.{norm}.weight"), Tensor::ones(h, DType::F32, &Device::Cpu)?));
        }
    }
    let bytes = safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), None)?;
    std::fs::write(dir.join("model.safetensors"), bytes)?;
    Ok(())
}

/// One configuration, in this process: prints `{"tokens_per_second", "peak_rss_mib", ...}`.
fn one_config(args: &BenchArgs, label: &str) -> Result<()> {
    let (_, int8, ckpt) = CONFIGS
        .iter()
        .copied()
        .find(|(n, _, c)| format!("{n}-{}", if *c { "on" } else { "off" }) == label)
        .with_context(|| format!("--only {label}: expected f32-off, f32-on, int8-off or int8-on"))?;
    let dir = args.model.as_deref().context("--only needs --model")?;
    let quant = if int8 { Quantization::Int8 { group: None } } else { Quantization::None };
    let model = Arc::new(Llama::load_quantized(dir, DType::F32, &Device::Cpu, quant)?);
    let lora = LoraConfig { r: 8, lora_alpha: 8.0, lora_dropout: 0.05, ..LoraConfig::default() };
    let adapter = LoraAdapter::init(lora, model.config(), 0, &Device::Cpu)?;
    let mut replica = Replica::new(model.clone(), adapter, AdamWConfig::default(), Box::new(SingleRank), 0)?;
    replica.set_gradient_checkpointing(ckpt);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let (rows, seq) = (4, 256);
    let ids: Vec<u32> = (0..rows * seq).map(|_| rng.random_range(0..32000)).collect();
    let batch = Batch {
        rows,
        seq_len: seq,
        labels: ids.iter().map(|&i| i64::from(i)).collect(),
        input_ids: ids,
        attention_mask: vec![1; rows * seq],
        example_ids: (0..rows as u64).collect(),
    };
    let mut times = Vec::new();
    let mut losses = Vec::new();
    for step in 1..=(args.warmup + args.steps) {
        let t = Instant::now();
        let (stats, _) = replica.step(std::slice::from_ref(&batch), step as u64, 3e-4, 1.0)?;
        if step > args.warmup {
            times.push(t.elapsed().as_secs_f64());
        }
        losses.push(stats.loss);
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let v = json!({
        "config": label, "median_step_seconds": median, "tokens_per_second": (rows * seq) as f64 / median,
        "peak_rss_mib": peak_rss_mib()?, "losses": losses,
    });
    println!("{v}");
    Ok(())
}

/// The process's peak resident set (VmHWM), in MiB.
fn peak_rss_mib() -> Result<f64> {
    let bytes = lorafleet_worker::node::process_status_bytes("VmHWM").context("no VmHWM in /proc/self/status")?;
    Ok(bytes as f64 / (1 << 20) as f64)
}
