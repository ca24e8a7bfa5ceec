//! Unusable files get an error that names the file (and the field), never a panic.

use candle_core::{DType, Device, Tensor};
use lorafleet_tests::*;
use lorafleet_worker::adapter_io::{load_adapter, save_adapter};
use lorafleet_worker::Llama;

fn load_err(dir: &std::path::Path) -> String {
    match Llama::load(dir, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("{} loaded although it is broken", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_config_json_is_named() {
    let (_tmp, dir) = copy_fixture("tiny-llama");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let msg = load_err(&dir);
    assert!(msg.contains("config.json") && msg.contains("missing"), "{msg}");
}

#[test]
fn malformed_config_json_gets_line_and_column() {
    let (_tmp, dir) = copy_fixture("tiny-llama");
    std::fs::write(dir.join("config.json"), "{\n  \"model_type\": \"llama\",\n  \"hidden_size\": ,\n}").unwrap();
    let msg = load_err(&dir);
    assert!(msg.contains("config.json:3:"), "{msg}");
}

#[test]
fn unknown_model_type_is_named_with_its_field() {
    let (_tmp, dir) = copy_fixture("tiny-llama");
    edit_json(&dir.join("config.json"), |v| v["model_type"] = "gpt2".into());
    let msg = load_err(&dir);
    assert!(msg.contains("config.json") && msg.contains("model_type") && msg.contains("gpt2"), "{msg}");
}

#[test]
fn wrong_field_type_names_the_field() {
    let (_tmp, dir) = copy_fixture("tiny-llama");
    edit_json(&dir.join("config.json"), |v| v["num_hidden_layers"] = "two".into());
    let msg = load_err(&dir);
    assert!(msg.contains("config.json") && msg.contains("num_hidden_layers"), "{msg}");
}

#[test]
fn truncated_safetensors_is_named() {
    let (_tmp, dir) = copy_fixture("tiny-llama");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let msg = load_err(&dir);
    assert!(msg.contains("model.safetensors"), "{msg}");
}

#[test]
fn weights_that_do_not_fit_the_config_are_named() {
    let (_tmp, dir) = copy_fixture("tiny-llama");
    edit_json(&dir.join("config.json"), |v| v["intermediate_size"] = 96.into());
    let msg = load_err(&dir);
    assert!(msg.contains("model.safetensors") && msg.contains("gate_proj") && msg.contains("shape"), "{msg}");
}

#[test]
fn missing_weights_file_is_named() {
    let (_tmp, dir) = copy_fixture("tiny-llama");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let msg = load_err(&dir);
    assert!(msg.contains("model.safetensors"), "{msg}");
}

#[test]
fn adapter_whose_shapes_do_not_fit_the_base_is_refused() {
    let m = Llama::load(&tiny_llama(), DType::F32, &Device::Cpu).unwrap();
    let (_tmp, dir) = copy_fixture("tiny-llama");
    let adapter = dir.join("lora-peft");
    let path = adapter.join("adapter_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight";
    tensors.insert(key.into(), Tensor::zeros((64, 8), DType::F32, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let msg = load_adapter(&adapter, m.config(), &Device::Cpu).err().expect("must fail").to_string();
    assert!(msg.contains("adapter_model.safetensors") && msg.contains(key) && msg.contains("shape"), "{msg}");
}

#[test]
fn adapter_tensors_without_a_target_are_refused() {
    let m = Llama::load(&tiny_llama(), DType::F32, &Device::Cpu).unwrap();
    let (_tmp, dir) = copy_fixture("tiny-llama");
    let adapter = dir.join("lora-peft");
    edit_json(&adapter.join("adapter_config.json"), |v| v["target_modules"] = serde_json::json!(["q_proj"]));
    let msg = load_adapter(&adapter, m.config(), &Device::Cpu).err().expect("must fail").to_string();
    assert!(msg.contains("adapter_model.safetensors") && msg.contains("v_proj"), "{msg}");
}

#[test]
fn bin_adapter_gets_a_conversion_hint() {
    let m = Llama::load(&tiny_llama(), DType::F32, &Device::Cpu).unwrap();
    let (_tmp, dir) = copy_fixture("tiny-llama");
    let adapter = dir.join("lora-peft");
    std::fs::rename(adapter.join("adapter_model.safetensors"), adapter.join("adapter_model.bin")).unwrap();
    let msg = load_adapter(&adapter, m.config(), &Device::Cpu).err().expect("must fail").to_string();
    assert!(msg.contains("adapter_model.bin") && msg.contains("safetensors"), "{msg}");
}

#[test]
fn unsupported_adapter_features_name_the_field() {
    let m = Llama::load(&tiny_llama(), DType::F32, &Device::Cpu).unwrap();
    for (field, value) in
        [("use_dora", serde_json::json!(true)), ("bias", serde_json::json!("all")), ("r", serde_json::json!(0))]
    {
        let (_tmp, dir) = copy_fixture("tiny-llama");
        let adapter = dir.join("lora-peft");
        edit_json(&adapter.join("adapter_config.json"), |v| v[field] = value.clone());
        let msg = load_adapter(&adapter, m.config(), &Device::Cpu).err().expect("must fail").to_string();
        assert!(msg.contains("adapter_config.json") && msg.contains(field), "{field}: {msg}");
    }
}

#[test]
fn an_adapter_that_disagrees_with_its_config_is_not_written() {
    let m = Llama::load(&tiny_llama(), DType::F32, &Device::Cpu).unwrap();
    let mut a = load_adapter(&tiny_llama().join("lora-peft"), m.config(), &Device::Cpu).unwrap();
    a.config.target_modules = lorafleet_common::TargetModules::AllLinear;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("adapter");
    let msg = save_adapter(&a, m.config(), &out).expect_err("must refuse").to_string();
    assert!(msg.contains("refusing"), "{msg}");
    assert!(!out.exists(), "nothing may be written");
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(leftovers.is_empty(), "no temporary files are left behind");
}

#[test]
fn token_ids_outside_the_vocabulary_are_an_error() {
    let m = Llama::load(&tiny_llama(), DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::from_slice(&[1u32, 600], (1, 2), &Device::Cpu).unwrap();
    let msg = m.forward_logits(&ids, None, None).expect_err("must fail").to_string();
    assert!(msg.contains("600") && msg.contains("vocabulary"), "{msg}");
}
