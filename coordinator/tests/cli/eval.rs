//! `coordinator eval`.

use super::{coordinator, ok_stdout, s, tiny};
use candle_core::{DType, Device, Tensor, D};
use lorafleet_common::data::{read_records, tokenize_records, Template, TokenizeOptions};
use lorafleet_worker::adapter_io::load_adapter;
use lorafleet_worker::{Llama, Tokenizer};

/// The same loss computed the long way: one unpadded example at a time, full logits,
/// log-softmax in f64, summed over the answer positions.
fn by_hand(base: &std::path::Path, adapter: &std::path::Path, data: &std::path::Path) -> (f64, usize) {
    let m = Llama::load(base, DType::F32, &Device::Cpu).unwrap();
    let a = load_adapter(adapter, m.config(), &Device::Cpu).unwrap();
    let tok = Tokenizer::from_dir(base, m.config()).unwrap();
    let records = read_records(data).unwrap();
    let opts = TokenizeOptions { cutoff_len: 256, train_on_inputs: false, drop_long: false };
    let (examples, _) = tokenize_records(data, &records, &Template::by_name("alpaca").unwrap(), &tok, &opts).unwrap();
    let (mut total, mut tokens) = (0.0, 0);
    for e in &examples {
        let ids = Tensor::from_slice(&e.input_ids, (1, e.input_ids.len()), &Device::Cpu).unwrap();
        let logits = m.forward_logits(&ids, None, Some(&a)).unwrap().squeeze(0).unwrap().to_dtype(DType::F64).unwrap();
        let max = logits.max_keepdim(D::Minus1).unwrap();
        let lse = (logits.broadcast_sub(&max).unwrap().exp().unwrap().sum_keepdim(D::Minus1).unwrap().log().unwrap()
            + max)
            .unwrap();
        let logits: Vec<Vec<f64>> = logits.to_vec2().unwrap();
        let lse: Vec<Vec<f64>> = lse.to_vec2().unwrap();
        for t in 1..e.labels.len() {
            if e.labels[t] >= 0 {
                total += lse[t - 1][0] - logits[t - 1][e.labels[t] as usize];
                tokens += 1;
            }
        }
    }
    (total / tokens as f64, tokens)
}

#[test]
fn eval_json_equals_the_hand_computed_and_peft_loss() {
    let base = tiny();
    let adapter = base.join("lora-peft");
    let data = base.join("data/alpaca_eval.jsonl");
    let out = ok_stdout(&["eval", "--base", s(&base), "--adapter", s(&adapter), "--data", s(&data), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let (hand, tokens) = by_hand(&base, &adapter, &data);
    let loss = v["loss"].as_f64().unwrap();
    assert!((loss - hand).abs() <= 1e-5, "eval {loss} vs by hand {hand}");
    assert_eq!(v["tokens"].as_u64().unwrap() as usize, tokens);
    assert_eq!(v["examples"], 50);
    assert!((v["perplexity"].as_f64().unwrap() - loss.exp()).abs() < 1e-9);
    assert!(v["exact_match"].is_null());
    // tools/peft_eval_check.py measured PEFT 0.21.2 on the same files: 7.474156 over 241 tokens.
    assert_eq!(tokens, 241);
    assert!((loss - 7.474156).abs() <= 1e-4, "{loss}");
}

#[test]
fn eval_exact_match_is_a_fraction() {
    let base = tiny();
    let data = base.join("data/alpaca_eval.jsonl");
    let out = ok_stdout(&[
        "eval",
        "--base",
        s(&base),
        "--data",
        s(&data),
        "--exact-match",
        "--max-new-tokens",
        "4",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let em = v["exact_match"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&em));
}

#[test]
fn eval_with_a_cutoff_shorter_than_every_prompt_is_an_error() {
    let base = tiny();
    let data = base.join("data/alpaca_eval.jsonl");
    let out = coordinator(&["eval", "--base", s(&base), "--data", s(&data), "--cutoff-len", "40"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("alpaca_eval.jsonl") && err.contains("cutoff_len 40"), "{err}");
}
