//! lorafleet against PEFT 0.21.2 / transformers 5.24 on the tiny-llama fixture.

use candle_core::{DType, Device, Tensor};
use lorafleet_common::peft::{LINEAR_MODULES, WEIGHTS_FILE};
use lorafleet_common::ModelConfig;
use lorafleet_tests::*;
use lorafleet_worker::adamw::{AdamW, AdamWConfig};
use lorafleet_worker::adapter_io::{load_adapter, save_adapter};
use lorafleet_worker::collective::SingleRank;
use lorafleet_worker::dropout::Dropout;
use lorafleet_worker::generate::{generate, Sampling};
use lorafleet_worker::train::{loss_sum, StepAccumulator};
use lorafleet_worker::{Llama, LoraAdapter, Tokenizer};

fn model() -> Llama {
    Llama::load(&tiny_llama(), DType::F32, &Device::Cpu).unwrap()
}

fn peft_adapter(model: &Llama) -> LoraAdapter {
    load_adapter(&tiny_llama().join("lora-peft"), model.config(), &Device::Cpu).unwrap()
}

fn ids_tensor(batch: &lorafleet_common::Batch) -> Tensor {
    Tensor::from_slice(&batch.input_ids, (batch.rows, batch.seq_len), &Device::Cpu).unwrap()
}

#[test]
fn base_logits_match_transformers() {
    let r = reference();
    let batch = reference_batch(&r);
    let m = model();
    let logits = m.forward_logits(&ids_tensor(&batch), Some(&batch.attention_mask), None).unwrap();
    let diff = max_abs_diff(&logits, &r["base_logits"]);
    assert!(diff <= 1e-4, "base logits differ by {diff}");
}

#[test]
fn lora_logits_match_peft() {
    let r = reference();
    let batch = reference_batch(&r);
    let m = model();
    let a = peft_adapter(&m);
    let logits = m.forward_logits(&ids_tensor(&batch), Some(&batch.attention_mask), Some(&a)).unwrap();
    let diff = max_abs_diff(&logits, &r["lora_logits"]);
    assert!(diff <= 1e-4, "LoRA logits differ by {diff}");
}

/// Mean loss and mean gradients of the reference batch through the training step's code.
fn reference_step(m: &Llama, a: &LoraAdapter) -> (Vec<Tensor>, f64) {
    let r = reference();
    let batch = reference_batch(&r);
    let mut acc = StepAccumulator::new(a);
    acc.micro_batch(m, a, &batch, &Dropout::Off, false).unwrap();
    let (grads, stats) = acc.reduce(a, &mut SingleRank, 1).unwrap();
    assert_eq!(stats.tokens, 15, "the README counts 15 scored positions");
    (grads, stats.loss)
}

#[test]
fn loss_and_every_lora_gradient_match_peft() {
    let r = reference();
    let m = model();
    let a = peft_adapter(&m);
    let (grads, loss) = reference_step(&m, &a);
    let ref_loss = f64::from(r["lora_loss"].to_scalar::<f32>().unwrap());
    assert!(((loss - ref_loss) / ref_loss).abs() <= 1e-5, "loss {loss} vs {ref_loss}");
    let names = a.named_vars();
    assert_eq!(names.len(), 8);
    for ((name, _), g) in names.iter().zip(&grads) {
        let diff = rel_norm_diff(g, &r[&format!("grad.{name}")]);
        assert!(diff <= 1e-4, "gradient of {name} differs by {diff} (relative norm)");
    }
}

#[test]
fn one_adamw_step_matches_torch() {
    let r = reference();
    let m = model();
    let a = peft_adapter(&m);
    let (grads, _) = reference_step(&m, &a);
    let vars: Vec<_> = a.named_vars().into_iter().map(|(_, v)| v).collect();
    let mut opt = AdamW::new(AdamWConfig { weight_decay: 0.0, ..Default::default() }, &vars, &Device::Cpu).unwrap();
    opt.step(&vars, &grads, 1e-3).unwrap();
    for (name, v) in a.named_vars() {
        let diff = max_abs_diff(v.as_tensor(), &r[&format!("step1.{name}")]);
        assert!(diff <= 1e-6, "{name} after one step differs by {diff}");
    }
    let batch = reference_batch(&r);
    let (loss, tokens) = loss_sum(&m, Some(&a), &batch, &Dropout::Off).unwrap();
    let loss = f64::from(loss.to_scalar::<f32>().unwrap()) / tokens as f64;
    let ref_loss = f64::from(r["step1_lora_loss"].to_scalar::<f32>().unwrap());
    assert!(((loss - ref_loss) / ref_loss).abs() <= 1e-5, "loss after the step {loss} vs {ref_loss}");
}

#[test]
fn adamw_state_round_trips() {
    let m = model();
    let a = peft_adapter(&m);
    let (grads, _) = reference_step(&m, &a);
    let vars: Vec<_> = a.named_vars().into_iter().map(|(_, v)| v).collect();
    let names: Vec<String> = a.named_vars().into_iter().map(|(n, _)| n).collect();
    let mut opt = AdamW::new(AdamWConfig::default(), &vars, &Device::Cpu).unwrap();
    opt.step(&vars, &grads, 1e-3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optimizer.safetensors");
    opt.save(&names, &path).unwrap();
    let restored = AdamW::load(AdamWConfig::default(), &names, &path, &Device::Cpu).unwrap();
    assert_eq!(restored.steps(), 1);
    let (a_state, _) = opt.state_tensors(&names);
    let (b_state, _) = restored.state_tensors(&names);
    for (k, t) in &a_state {
        assert_eq!(max_abs_diff(t, &b_state[k]), 0.0, "{k}");
    }
}

#[test]
fn every_lora_parameter_gets_a_nonzero_gradient() {
    let m = model();
    let a = peft_adapter(&m);
    let (grads, _) = reference_step(&m, &a);
    for ((name, _), g) in a.named_vars().iter().zip(&grads) {
        let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(norm > 0.0, "{name} received no gradient: the graph is cut somewhere");
    }
}

#[test]
fn no_gradient_is_produced_for_any_base_weight() {
    let r = reference();
    let batch = reference_batch(&r);
    let m = model();
    let a = peft_adapter(&m);
    let (loss, _) = loss_sum(&m, Some(&a), &batch, &Dropout::Off).unwrap();
    let grads = loss.backward().unwrap();
    let lora_ids: Vec<_> = a.named_vars().iter().map(|(_, v)| v.as_tensor().id()).collect();
    let frozen = m.frozen_tensors();
    assert!(frozen.len() > 10);
    for t in &frozen {
        assert!(!t.is_variable(), "a base weight is a trainable variable");
        assert!(grads.get(t).is_none(), "a base weight of shape {:?} received a gradient", t.dims());
    }
    // What remains in the store after backward: the LoRA parameters, plus gradients that
    // candle computes for untracked operands of its own ops (never a weight: checked above).
    let kept: Vec<_> = grads.get_ids().collect();
    for id in &lora_ids {
        assert!(kept.contains(&id));
    }
}

#[test]
fn greedy_generation_matches_transformers_with_and_without_adapter() {
    let gen: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny_llama().join("generation.json")).unwrap()).unwrap();
    let m = model();
    let tok = Tokenizer::from_dir(&tiny_llama(), m.config()).unwrap();
    let prompt = tok.encode(gen["prompt_text"].as_str().unwrap(), true).unwrap();
    let expected_prompt: Vec<u32> = serde_json::from_value(gen["prompt_ids"].clone()).unwrap();
    assert_eq!(prompt, expected_prompt);
    let a = peft_adapter(&m);
    let sampling = Sampling { max_new_tokens: 8, ..Default::default() };
    for (name, adapter) in [("base", None), ("lora-peft", Some(&a))] {
        let out = generate(&m, adapter, &prompt, &tok.eos_ids, &sampling).unwrap();
        let expected: Vec<u32> = serde_json::from_value(gen["results"][name]["new_ids"].clone()).unwrap();
        assert_eq!(out.ids, expected, "{name}");
        assert!(!out.stopped_on_eos);
    }
}

#[test]
fn merged_weights_match_peft_merge_and_unload() {
    let r = reference();
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("merged");
    let report =
        lorafleet_worker::merge::merge(&tiny_llama(), &tiny_llama().join("lora-peft"), &dir, DType::F32, 5_000_000_000)
            .unwrap();
    assert_eq!(report.merged, 4);
    let merged = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    for name in ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"] {
        let diff = max_abs_diff(&merged[name], &r[&format!("merged.{name}")]);
        assert!(diff <= 1e-6, "{name} differs by {diff}");
    }
    // The merged folder is a complete model: it loads and equals base + adapter.
    let merged_model = Llama::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let batch = reference_batch(&r);
    let logits = merged_model.forward_logits(&ids_tensor(&batch), Some(&batch.attention_mask), None).unwrap();
    assert!(max_abs_diff(&logits, &r["lora_logits"]) <= 1e-4);
    assert!(dir.join("tokenizer.json").is_file() && dir.join("tokenizer_config.json").is_file());
}

#[test]
fn merge_shards_large_models_with_an_index() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("merged");
    let report =
        lorafleet_worker::merge::merge(&tiny_llama(), &tiny_llama().join("lora-peft"), &dir, DType::BF16, 100_000)
            .unwrap();
    assert!(report.shards > 1);
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap()).unwrap();
    assert_eq!(index["weight_map"].as_object().unwrap().len(), report.tensors);
    let config = ModelConfig::from_dir(&dir).unwrap();
    assert_eq!(config.dtype.as_deref(), Some("bfloat16"));
    let m = Llama::load(&dir, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(m.num_blocks(), 2);
}

#[test]
fn written_adapter_reads_back_identical_and_in_peft_layout() {
    let m = model();
    let a = peft_adapter(&m);
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("adapter");
    save_adapter(&a, m.config(), &dir).unwrap();
    let b = load_adapter(&dir, m.config(), &Device::Cpu).unwrap();
    for ((na, va), (nb, vb)) in a.named_vars().iter().zip(b.named_vars()) {
        assert_eq!(*na, nb);
        assert_eq!(max_abs_diff(va.as_tensor(), vb.as_tensor()), 0.0, "{na}");
    }
    // Same key set and shapes as the PEFT-written file.
    let ours = candle_core::safetensors::load(dir.join(WEIGHTS_FILE), &Device::Cpu).unwrap();
    let theirs =
        candle_core::safetensors::load(tiny_llama().join("lora-peft").join(WEIGHTS_FILE), &Device::Cpu).unwrap();
    let mut ours_keys: Vec<_> = ours.iter().map(|(k, t)| (k.clone(), t.dims().to_vec())).collect();
    let mut theirs_keys: Vec<_> = theirs.iter().map(|(k, t)| (k.clone(), t.dims().to_vec())).collect();
    ours_keys.sort();
    theirs_keys.sort();
    assert_eq!(ours_keys, theirs_keys);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["r"], 8);
    assert_eq!(config["lora_alpha"], 16);
    assert_eq!(config["target_modules"], serde_json::json!(["q_proj", "v_proj"]));
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["task_type"], "CAUSAL_LM");
}

#[test]
fn fresh_adapter_follows_peft_init_and_changes_nothing() {
    let r = reference();
    let batch = reference_batch(&r);
    let m = model();
    let config = lorafleet_common::LoraConfig {
        target_modules: lorafleet_common::TargetModules::AllLinear,
        ..Default::default()
    };
    let a = LoraAdapter::init(config, m.config(), 7, &Device::Cpu).unwrap();
    assert_eq!(a.named_vars().len(), 2 * LINEAR_MODULES.len() * 2);
    for (name, v) in a.named_vars() {
        let vals: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        if name.contains("lora_B") {
            assert!(vals.iter().all(|&x| x == 0.0), "{name} must start at zero");
        } else {
            let bound = 1.0 / (v.dims()[1] as f32).sqrt();
            assert!(vals.iter().all(|x| x.abs() <= bound) && vals.iter().any(|&x| x != 0.0), "{name}");
        }
    }
    let logits = m.forward_logits(&ids_tensor(&batch), Some(&batch.attention_mask), Some(&a)).unwrap();
    assert!(max_abs_diff(&logits, &r["base_logits"]) <= 1e-4);
}
