//! Real models' chat templates (Llama 3, Qwen3's ChatML, Mistral-Nemo's) rendered by minijinja and tokenized
//! as transformers 5.24 does: token ids equal `apply_chat_template`'s, labels on the
//! assistant turns and their end-of-turn tokens (`tools/chat_template_reference.py` wrote the
//! expected values with transformers).

use lorafleet_common::data::{tokenize_records, Message, Record, Template, TokenizeOptions};
use lorafleet_common::ModelConfig;
use lorafleet_worker::Tokenizer;
use std::io::Read;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/chat-templates")
}

/// A model folder for the fixture `name`: its tokenizer files and tiny-llama's config.json.
fn model_dir(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join(name);
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(src.join("tokenizer.json.gz")).unwrap())
        .read_to_end(&mut json)
        .unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), json).unwrap();
    std::fs::copy(src.join("tokenizer_config.json"), dir.path().join("tokenizer_config.json")).unwrap();
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-llama/config.json");
    std::fs::copy(tiny, dir.path().join("config.json")).unwrap();
    dir
}

fn check(name: &str) {
    let dir = model_dir(name);
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join(name).join("expected.json")).unwrap()).unwrap();
    let config = ModelConfig::from_dir(dir.path()).unwrap();
    let tokenizer = Tokenizer::from_dir(dir.path(), &config).unwrap();
    let template = Template::resolve("tokenizer", dir.path()).unwrap();
    let Template::Jinja(jinja) = &template else { panic!("{name}: not the model's template") };
    let records: Vec<Record> = expected["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Record::Chat {
            messages: c
                .as_array()
                .unwrap()
                .iter()
                .map(|m| Message {
                    role: m["role"].as_str().unwrap().into(),
                    content: m["content"].as_str().unwrap().into(),
                })
                .collect(),
        })
        .collect();
    let options = TokenizeOptions { cutoff_len: 4096, train_on_inputs: false, drop_long: false };
    let (examples, _) = tokenize_records(Path::new(name), &records, &template, &tokenizer, &options).unwrap();
    for (i, (ex, want)) in examples.iter().zip(expected["results"].as_array().unwrap()).enumerate() {
        let Record::Chat { messages } = &records[i] else { unreachable!() };
        assert_eq!(jinja.render(messages, false).unwrap(), want["text"].as_str().unwrap(), "{name} #{i}: text");
        let prompt = &messages[..messages.len() - 1];
        assert_eq!(jinja.render(prompt, true).unwrap(), want["prompt_text"].as_str().unwrap(), "{name} #{i}: prompt");
        let ids: Vec<u32> = want["input_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let labels: Vec<i64> = want["labels"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
        assert_eq!(ex.input_ids, ids, "{name} #{i}: token ids");
        assert_eq!(ex.labels, labels, "{name} #{i}: labels");
        assert!(ex.target_tokens() > 0);
    }
    assert_eq!(examples.len(), records.len());
}

#[test]
fn llama3_template_ids_and_labels_equal_transformers() {
    check("llama3");
}

#[test]
fn qwen3_chatml_template_ids_and_labels_equal_transformers() {
    check("qwen3");
}

#[test]
fn mistral_nemo_template_ids_and_labels_equal_transformers() {
    // `[INST]…[/INST]` turns over the Tekken tokenizer; the template raises on roles that do
    // not alternate and puts the system prompt in the last user turn only when that turn is
    // the conversation's last message: training conversations render without it, as
    // transformers renders them, and the generation prompts (`prompt_text`) with it.
    check("mistral-nemo");
}

#[test]
fn auto_takes_the_models_template_and_falls_back_to_alpaca() {
    let dir = model_dir("qwen3");
    assert!(matches!(Template::resolve("auto", dir.path()).unwrap(), Template::Jinja(_)));
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-llama");
    assert!(matches!(Template::resolve("auto", &tiny).unwrap(), Template::Prompt(_)));
    let err = Template::resolve("tokenizer", &tiny).unwrap_err().to_string();
    assert!(err.contains("no chat_template"), "{err}");
    // alpaca-lora's template for Alpaca records, the model's own for chat records.
    let both = Template::resolve("alpaca", dir.path()).unwrap();
    assert!(matches!(both, Template::PromptWithChat(..)));
    let chat = Record::Chat {
        messages: vec![
            Message { role: "user".into(), content: "Hi".into() },
            Message { role: "assistant".into(), content: "Hello".into() },
        ],
    };
    let alpaca = Record::Alpaca { instruction: "Hi".into(), input: String::new(), output: "Hello".into() };
    assert!(both.jinja_for(&chat).is_some() && both.jinja_for(&alpaca).is_none());
    let (prompt, answer) = both.prompt_and_answer(&alpaca).unwrap();
    assert!(prompt.starts_with("Below is an instruction") && answer == "Hello");
    let (prompt, _) = both.prompt_and_answer(&chat).unwrap();
    assert_eq!(prompt, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    // A template minijinja cannot compile is an error when asked for, and ignored otherwise.
    std::fs::write(dir.path().join("chat_template.jinja"), "{% for m in messages %}{{ m.content }").unwrap();
    let err = Template::resolve("tokenizer", dir.path()).unwrap_err().to_string();
    assert!(err.contains("chat_template.jinja") && err.contains("chat template"), "{err}");
    assert!(matches!(Template::resolve("alpaca", dir.path()).unwrap(), Template::Prompt(_)));
}
