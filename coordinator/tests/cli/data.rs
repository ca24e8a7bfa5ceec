//! Data sets as users have them: ShareGPT and OpenAI chat layouts, plain text, and a file
//! full of unusable records that still trains, with every kind counted and located.

use super::{coordinator, s, tiny};
use std::path::Path;

const GOOD: usize = 20;

/// A ShareGPT dump with one record of each anomaly among good ShareGPT, OpenAI and text
/// records. Returns the file's lines.
fn write_dump(path: &Path) -> Vec<String> {
    let turn = |from: &str, value: &str| serde_json::json!({"from": from, "value": value});
    let conv = |turns: Vec<serde_json::Value>| serde_json::json!({ "conversations": turns }).to_string();
    let mut lines = vec![
        conv(vec![turn("system", "Be brief."), turn("human", "Say hi."), turn("gpt", "Hi.")]),
        conv(vec![turn("gpt", "Hello!"), turn("human", "Hi.")]),
        conv(vec![]),
        conv(vec![turn("human", "  "), turn("gpt", "What?")]),
        conv(vec![turn("human", "Weather?"), turn("tool", "{\"temp\": 3}"), turn("gpt", "Cold.")]),
        conv(vec![turn("human", "One."), turn("human", "Two."), turn("gpt", "Three.")]),
        serde_json::json!({"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]}).to_string(),
        serde_json::json!({"text": "Plain text is trained on every token."}).to_string(),
        conv(vec![turn("human", "Anyone there?")]),
        conv(vec![turn("human", "Write a lot."), turn("gpt", &"very long answer ".repeat(100))]),
    ];
    for i in 0..GOOD {
        let q = format!("What is {i} plus {i}?");
        let a = format!("{}.", 2 * i);
        lines.push(conv(vec![turn("human", &q), turn("chatgpt", &a)]));
    }
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
    lines
}

fn args<'a>(data: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "--base_model",
        s_tiny(),
        "--data_path",
        data,
        "--output_dir",
        out,
        "--prompt_template_name",
        "chatml",
        "--batch_size",
        "8",
        "--micro_batch_size",
        "4",
        "--val_set_size",
        "0",
        "--max_steps",
        "3",
        "--save_steps",
        "0",
        "--cutoff_len",
        "96",
        "--truncation",
        "drop",
        "--metrics-addr",
        "0",
    ];
    a.extend(extra);
    a
}

fn s_tiny() -> &'static str {
    Box::leak(tiny().to_str().unwrap().to_owned().into_boxed_str())
}

#[test]
fn a_sharegpt_dump_full_of_anomalies_trains_and_reports_each_kind_with_its_first_locations() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, out) = (tmp.path().join("dump.jsonl"), tmp.path().join("run"));
    write_dump(&data);
    let r = coordinator(&args(s(&data), s(&out), &[]));
    let (stdout, stderr) = (String::from_utf8_lossy(&r.stdout), String::from_utf8_lossy(&r.stderr));
    assert!(r.status.success(), "{stderr}");
    let at = |line: usize| format!("{}:{line}", data.display());
    for (kind, line) in [
        ("starts_with_assistant", 2),
        ("empty_conversation", 3),
        ("empty_turn", 4),
        ("unknown_role", 5),
        ("repeated_role", 6),
        ("no_assistant_turn", 9),
        ("too_long", 10),
    ] {
        let entry = format!("{kind} 1 (first: {})", at(line));
        assert!(stderr.contains(&entry) && stdout.contains(&entry), "no `{entry}` in\n{stderr}\n{stdout}");
    }
    assert!(stderr.contains(&format!("data: 30 records -> {} examples", GOOD + 3)), "{stderr}");
    assert!(stdout.contains("adapter written to"), "{stdout}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let data_line: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    assert_eq!(data_line["type"], "data");
    assert_eq!(data_line["examples"], GOOD + 3);
    assert_eq!(data_line["skipped"]["repeated_role"]["count"], 1);
    assert_eq!(data_line["skipped"]["too_long"]["first"][0], at(10));
    assert_eq!(data_line["skipped"].as_object().unwrap().len(), 7);
}

#[test]
fn strict_stops_at_the_first_unusable_record_naming_file_line_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, out) = (tmp.path().join("dump.jsonl"), tmp.path().join("run"));
    write_dump(&data);
    let r = coordinator(&args(s(&data), s(&out), &["--strict"]));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success(), "{err}");
    let expected =
        format!("{}:2:1: field `conversations[0]`: the conversation starts with the assistant", data.display());
    assert!(err.contains(&expected) && err.contains("starts_with_assistant; --strict"), "{err}");
    assert!(!out.join("adapter_model.safetensors").exists());
}

#[test]
fn parquet_and_json_lines_copies_of_a_data_set_train_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tiny().join("data");
    for (stem, template, val) in [("alpaca_sample", "alpaca", "16"), ("sharegpt_sample", "chatml", "0")] {
        let mut adapters = Vec::new();
        for ext in ["jsonl", "parquet"] {
            let (file, out) = (data.join(format!("{stem}.{ext}")), tmp.path().join(format!("{stem}-{ext}")));
            let mut a = args(s(&file), s(&out), &["--prompt_template_name", template, "--val_set_size", val]);
            a.extend(["--max_steps", "4", "--truncation", "truncate"]);
            let r = coordinator(&a);
            assert!(r.status.success(), "{ext}: {}", String::from_utf8_lossy(&r.stderr));
            adapters.push(std::fs::read(out.join("adapter_model.safetensors")).unwrap());
        }
        assert!(adapters[0] == adapters[1], "{stem}: the Parquet copy trained to other bytes");
    }
}

#[test]
fn a_repeated_run_takes_the_tokenized_data_from_the_cache_and_trains_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, out) = (tmp.path().join("dump.jsonl"), tmp.path().join("run"));
    write_dump(&data);
    let first = coordinator(&args(s(&data), s(&out), &[]));
    let log = String::from_utf8_lossy(&first.stderr).into_owned();
    assert!(first.status.success() && log.contains("records tokenized in"), "{log}");
    let adapter = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let again = coordinator(&args(s(&data), s(&out), &[]));
    let log = String::from_utf8_lossy(&again.stderr).into_owned();
    assert!(again.status.success() && log.contains("tokenized records taken from"), "{log}");
    // The skipped-record report comes from the cache as well.
    assert!(log.contains("repeated_role 1 (first: "), "{log}");
    assert!(std::fs::read(out.join("adapter_model.safetensors")).unwrap() == adapter);
    // Another cutoff is another tokenization.
    let other = coordinator(&args(s(&data), s(&out), &["--cutoff_len", "80"]));
    let log = String::from_utf8_lossy(&other.stderr).into_owned();
    assert!(other.status.success() && log.contains("records tokenized in"), "{log}");
}

#[test]
fn datasets_in_toml_train_several_files_each_with_its_template() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tiny().join("data");
    let toml = |name: &str, datasets: &[(&str, Option<&str>)]| {
        let mut text = format!(
            "base_model = {:?}\noutput_dir = {:?}\nbatch_size = 8\nmicro_batch_size = 4\nval_set_size = 8\n\
             max_steps = 3\nsave_steps = 0\ncutoff_len = 96\n",
            s(&tiny()),
            s(&tmp.path().join(name))
        );
        for (file, template) in datasets {
            text += &format!("[[datasets]]\npath = {:?}\n", s(&data.join(file)));
            if let Some(t) = template {
                text += &format!("prompt_template_name = {t:?}\n");
            }
        }
        let path = tmp.path().join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    };
    let two = toml("two", &[("alpaca_sample.jsonl", None), ("sharegpt_sample.parquet", Some("chatml"))]);
    let r = coordinator(&["--config", s(&two), "--metrics-addr", "0"]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{err}");
    assert!(err.contains("data: 250 records -> 250 examples"), "{err}");
    let metrics = std::fs::read_to_string(tmp.path().join("two/metrics.jsonl")).unwrap();
    let report: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    let per_file: Vec<(String, u64)> = report["datasets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["template"].as_str().unwrap().to_owned(), d["examples"].as_u64().unwrap()))
        .collect();
    assert_eq!(per_file, [("alpaca".to_owned(), 200), ("chatml".to_owned(), 50)]);

    // One file under [[datasets]] is the same run as data_path.
    let one = toml("one", &[("alpaca_sample.jsonl", None)]);
    assert!(coordinator(&["--config", s(&one), "--metrics-addr", "0"]).status.success());
    let plain = tmp.path().join("plain");
    let r = coordinator(&[
        "--config",
        s(&one),
        "--metrics-addr",
        "0",
        "--output_dir",
        s(&plain),
        "--data_path",
        s(&data.join("alpaca_sample.jsonl")),
    ]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && err.contains("`datasets`: give data_path or [[datasets]], not both"), "{err}");
    let flat = toml("flat", &[]);
    let r = coordinator(&[
        "--config",
        s(&flat),
        "--metrics-addr",
        "0",
        "--data_path",
        s(&data.join("alpaca_sample.jsonl")),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let adapter = |name: &str| std::fs::read(tmp.path().join(name).join("adapter_model.safetensors")).unwrap();
    assert!(adapter("one") == adapter("flat"), "one [[datasets]] entry trains like data_path");
}
