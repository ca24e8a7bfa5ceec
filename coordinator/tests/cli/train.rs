//! `coordinator [train]`: configuration, a short real run, its outputs and its failures.

use super::{coordinator, ok_stdout, s, tiny};
use std::path::Path;

fn tiny_run_args<'a>(data: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "--base_model",
        s_static(),
        "--data_path",
        data,
        "--output_dir",
        out,
        "--batch_size",
        "8",
        "--micro_batch_size",
        "4",
        "--val_set_size",
        "16",
        "--learning_rate",
        "1e-3",
        "--warmup_steps",
        "2",
        "--max_steps",
        "12",
        "--eval_steps",
        "5",
        "--save_steps",
        "4",
        "--save_total_limit",
        "2",
        "--logging_steps",
        "3",
        "--cutoff_len",
        "128",
    ]
}

fn s_static() -> &'static str {
    Box::leak(tiny().to_str().unwrap().to_owned().into_boxed_str())
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn a_short_run_writes_adapter_checkpoints_metrics_and_plot() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let data = tiny().join("data/alpaca_sample.jsonl");
    let stdout = ok_stdout(&tiny_run_args(s(&data), s(&out)));
    assert!(stdout.contains("adapter written to"), "{stdout}");
    // The adapter is a PEFT folder the model loads, and training moved B away from zero.
    let m = lorafleet_worker::Llama::load(&tiny(), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    let a = lorafleet_worker::adapter_io::load_adapter(&out, m.config(), &candle_core::Device::Cpu).unwrap();
    let b = a.named_vars().into_iter().find(|(n, _)| n.contains("lora_B")).unwrap().1.as_tensor().clone();
    assert!(b.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
    // save_steps 4 up to step 12 (exclusive) -> 4, 8; all kept within the limit of 2.
    let mut checkpoints: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().into_string().ok())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    checkpoints.sort();
    assert_eq!(checkpoints, vec!["checkpoint-4", "checkpoint-8"]);
    for f in ["adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", "trainer_state.json"] {
        assert!(out.join("checkpoint-8").join(f).is_file(), "{f}");
    }
    let metrics = lines(&out.join("metrics.jsonl"));
    let train: Vec<_> = metrics.iter().filter(|v| v["type"] == "train").collect();
    let eval: Vec<_> = metrics.iter().filter(|v| v["type"] == "eval").collect();
    assert_eq!(train.iter().map(|v| v["step"].as_u64().unwrap()).collect::<Vec<_>>(), vec![3, 6, 9, 12]);
    assert_eq!(eval.iter().map(|v| v["step"].as_u64().unwrap()).collect::<Vec<_>>(), vec![5, 10, 12]);
    assert!(train
        .iter()
        .all(|v| v["loss"].as_f64().unwrap().is_finite() && v["tokens_per_second"].as_f64().unwrap() > 0.0));
    assert_eq!(train[0]["learning_rate"].as_f64().unwrap(), 1e-3, "step 3 runs at the end of warm-up");
    let png = std::fs::read(out.join("loss.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
}

#[test]
fn alpaca_lora_flags_kebab_case_and_toml_make_one_config() {
    let tmp = tempfile::tempdir().unwrap();
    let toml = tmp.path().join("run.toml");
    std::fs::write(&toml, "lora_r = 4\nnum_epochs = 2\nlearning_rate = 0.01\n").unwrap();
    let out = ok_stdout(&[
        "train",
        "--config",
        s(&toml),
        "--learning-rate",
        "0.02",
        "--lora_target_modules",
        "[q_proj,k_proj]",
        "--train_on_inputs",
        "--group-by-length",
        "true",
        "--sample_packing",
        "--print-config",
    ]);
    let c: toml::Value = toml::from_str(&out).unwrap();
    assert_eq!(c["lora_r"].as_integer(), Some(4));
    assert_eq!(c["num_epochs"].as_integer(), Some(2));
    assert_eq!(c["learning_rate"].as_float(), Some(0.02));
    assert_eq!(c["lora_target_modules"], toml::Value::Array(vec!["q_proj".into(), "k_proj".into()]));
    assert_eq!(c["train_on_inputs"].as_bool(), Some(true));
    assert_eq!(c["group_by_length"].as_bool(), Some(true));
    assert_eq!(c["sample_packing"].as_bool(), Some(true));
    assert_eq!(c["batch_size"].as_integer(), Some(128), "alpaca-lora's default");
}

#[test]
fn invalid_values_stop_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("never");
    let data = tiny().join("data/alpaca_sample.jsonl");
    let mut args = tiny_run_args(s(&data), s(&out));
    args.extend(["--batch_size", "6"]);
    let r = coordinator(&args);
    assert_eq!(r.status.code(), Some(1));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("`batch_size`") && err.contains("micro_batch_size"), "{err}");
    assert!(!out.exists(), "nothing is created for an invalid configuration");
    let r = coordinator(&["--base_model", s(&tiny()), "--data_path", s(&data), "--lora_dropout", "1.5"]);
    assert!(String::from_utf8_lossy(&r.stderr).contains("`lora_dropout`"));
    let r = coordinator(&["--base_model", s(&tiny()), "--data_path", s(&data), "--max_steps", "0"]);
    assert!(String::from_utf8_lossy(&r.stderr).contains("`max_steps`"), "a run of no steps is refused");
    let r = coordinator(&["--lora_r", "many"]);
    assert_eq!(r.status.code(), Some(2), "clap rejects a non-number");
}

#[test]
fn malformed_data_is_reported_with_file_line_and_column() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("bad.jsonl");
    std::fs::write(&data, "{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"a\", \"output\": }\n")
        .unwrap();
    let out = tmp.path().join("run");
    let r = coordinator(&tiny_run_args(s(&data), s(&out)));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && err.contains("bad.jsonl:2:"), "{err}");
    std::fs::write(&data, "{\"instruction\": \"a\", \"input\": \"x\"}\n").unwrap();
    let err = String::from_utf8_lossy(&coordinator(&tiny_run_args(s(&data), s(&out))).stderr).into_owned();
    assert!(err.contains("bad.jsonl:1:") && err.contains("`output`"), "{err}");
}

#[test]
fn a_non_finite_loss_stops_the_run_naming_the_step() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let data = tiny().join("data/alpaca_sample.jsonl");
    let mut args = tiny_run_args(s(&data), s(&out));
    args.extend(["--learning_rate", "1e37", "--warmup_steps", "0", "--max_grad_norm", "0", "--save_steps", "0"]);
    let r = coordinator(&args);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success(), "{err}");
    assert!(err.contains("training stopped at step") && err.contains("non-finite"), "{err}");
    assert!(!out.join("adapter_model.safetensors").exists(), "no adapter is written");
}
