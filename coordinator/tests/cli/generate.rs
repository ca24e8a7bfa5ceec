//! `coordinator generate` and `coordinator merge`.

use super::{coordinator, ok_stdout, s, tiny};

fn expected_text(which: &str) -> String {
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny().join("generation.json")).unwrap()).unwrap();
    format!("{}\n", g["results"][which]["new_text"].as_str().unwrap())
}

#[test]
fn generate_prints_only_the_greedy_continuation() {
    let base = tiny();
    let args = ["generate", "--base", s(&base), "--prompt", "The red apple", "--max-new-tokens", "8"];
    assert_eq!(ok_stdout(&args), expected_text("base"));
    let adapter = base.join("lora-peft");
    let mut with = args.to_vec();
    with.extend(["--adapter", s(&adapter)]);
    assert_eq!(ok_stdout(&with), expected_text("lora-peft"));
}

#[test]
fn several_adapters_share_one_base_and_use_selects_one() {
    let base = tiny();
    let tmp = tempfile::tempdir().unwrap();
    // A second adapter whose B matrices are zero: it must behave exactly like the base.
    let zero = tmp.path().join("zero");
    std::fs::create_dir(&zero).unwrap();
    std::fs::copy(base.join("lora-peft/adapter_config.json"), zero.join("adapter_config.json")).unwrap();
    let st = base.join("lora-peft/adapter_model.safetensors");
    let tensors = candle_core::safetensors::load(&st, &candle_core::Device::Cpu).unwrap();
    let zeroed: std::collections::HashMap<String, candle_core::Tensor> = tensors
        .into_iter()
        .map(|(k, t)| if k.contains("lora_B") { (k, t.zeros_like().unwrap()) } else { (k, t) })
        .collect();
    candle_core::safetensors::save(&zeroed, zero.join("adapter_model.safetensors")).unwrap();
    let peft = format!("peft={}", s(&base.join("lora-peft")));
    let zero_spec = format!("zero={}", s(&zero));
    let common = ["generate", "--base", s(&base), "--prompt", "The red apple", "--max-new-tokens", "8"];
    let run = |name: &str| {
        let mut a = common.to_vec();
        a.extend(["--adapter", &peft, "--adapter", &zero_spec, "--use", name]);
        ok_stdout(&a)
    };
    assert_eq!(run("peft"), expected_text("lora-peft"));
    assert_eq!(run("zero"), expected_text("base"));
    assert_eq!(run("base"), expected_text("base"));
    let mut bad = common.to_vec();
    bad.extend(["--adapter", &peft, "--use", "nope"]);
    let out = coordinator(&bad);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));
}

#[test]
fn instruction_is_wrapped_in_the_alpaca_template() {
    let base = tiny();
    let prompt = "Below is an instruction that describes a task, paired with an input that provides further context. \
                  Write a response that appropriately completes the request.\n\n### Instruction:\nReverse the word.\n\n\
                  ### Input:\nsoft\n\n### Response:\n";
    let common = ["generate", "--base", s(&base), "--max-new-tokens", "6"];
    let mut by_instruction = common.to_vec();
    by_instruction.extend(["--instruction", "Reverse the word.", "--input", "soft"]);
    let mut by_prompt = common.to_vec();
    by_prompt.extend(["--prompt", prompt]);
    assert_eq!(ok_stdout(&by_instruction), ok_stdout(&by_prompt));
}

#[test]
fn sampling_is_seeded() {
    let base = tiny();
    let args = |seed: &'static str| {
        vec!["generate", "--base", s(&base), "--prompt", "The red apple", "--max-new-tokens", "12"]
            .into_iter()
            .chain(["--temperature", "1.5", "--top-p", "0.9", "--seed", seed])
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let run = |seed| {
        let a = args(seed);
        ok_stdout(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    assert_eq!(run("1"), run("1"));
}

#[test]
fn merged_model_generates_like_base_plus_adapter() {
    let base = tiny();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let adapter = base.join("lora-peft");
    let m = coordinator(&["merge", "--base", s(&base), "--adapter", s(&adapter), "--out", s(&out), "--dtype", "f32"]);
    assert!(m.status.success(), "{}", String::from_utf8_lossy(&m.stderr));
    let text = ok_stdout(&["generate", "--base", s(&out), "--prompt", "The red apple", "--max-new-tokens", "8"]);
    assert_eq!(text, expected_text("lora-peft"));
    // A second merge into the same, now non-empty, folder is refused.
    let again = coordinator(&["merge", "--base", s(&base), "--adapter", s(&adapter), "--out", s(&out)]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"));
}

#[test]
fn errors_name_the_file_and_exit_nonzero() {
    let tmp = tempfile::tempdir().unwrap();
    let out = coordinator(&["generate", "--base", s(tmp.path()), "--prompt", "x"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("config.json"), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn chat_renders_the_models_own_template_with_a_system_prompt() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("model");
    std::fs::create_dir(&base).unwrap();
    for e in std::fs::read_dir(tiny()).unwrap().map(|e| e.unwrap()).filter(|e| e.path().is_file()) {
        std::fs::copy(e.path(), base.join(e.file_name())).unwrap();
    }
    std::fs::write(
        base.join("chat_template.jinja"),
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] | trim }}\n{% endfor %}\
         {% if add_generation_prompt %}assistant:{% endif %}",
    )
    .unwrap();
    let common = ["generate", "--base", s(&base), "--max-new-tokens", "8"];
    let chat = ok_stdout(&[&common[..], &["--system", "Be red.", "--chat", "  The red apple "]].concat());
    let raw = ok_stdout(&[&common[..], &["--prompt", "system: Be red.\nuser: The red apple\nassistant:"]].concat());
    assert_eq!(chat, raw);
    let none = coordinator(&["generate", "--base", s(&tiny()), "--chat", "hi"]);
    assert!(String::from_utf8_lossy(&none.stderr).contains("has no chat template"));
}
