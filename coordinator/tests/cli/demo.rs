//! The README's first command: `coordinator` with no arguments trains the embedded demo with
//! the PEFT reference run's hyperparameters (demo/README.md) and must reach its accuracy; the
//! same run on an int8 base must stay within 2 points of it, and the int8 base's eval loss
//! within 1% of the f32 base's. The slowest test of the suite (minutes on two cores).

use super::{ok_stdout, s};
use std::path::Path;
use std::process::{Command, Output};

fn demo(dir: &Path, extra: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .args(extra)
        .current_dir(dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// (accuracy before, accuracy after, final eval loss) from a run's stdout.
fn figures(out: &Output) -> (f64, f64, f64) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let line = stdout.lines().find(|l| l.starts_with("exact-match accuracy:")).expect("an accuracy line");
    let pct: Vec<f64> =
        line.split_whitespace().filter_map(|w| w.strip_suffix('%')).map(|p| p.parse().unwrap()).collect();
    let eval = stdout.lines().find_map(|l| l.strip_prefix("final eval loss: ")).unwrap().parse().unwrap();
    (pct[0], pct[1], eval)
}

#[test]
fn the_demo_reaches_the_peft_reference_accuracy_in_f32_and_int8() {
    let tmp = tempfile::tempdir().unwrap();
    let f32_run = demo(tmp.path(), &[]);
    let int8_run = demo(tmp.path(), &["--demo", "--load_in_8bit", "--output_dir", "lora-demo-int8"]);
    let (f32_out, int8_out) = (f32_run.wait_with_output().unwrap(), int8_run.wait_with_output().unwrap());
    let (before, after, eval) = figures(&f32_out);
    assert_eq!(before, 0.0, "the base model has never seen the prompt format");
    // PEFT reached 88.5% (86.0-88.5% over seeds and learning rates); the issue allows 3 points.
    assert!(after >= 85.5, "f32 accuracy {after}%");
    assert!(eval < 0.3, "eval loss {eval} (PEFT: 0.2116, range 0.17-0.23)");
    assert!(tmp.path().join("lora-demo/adapter_model.safetensors").is_file());
    assert!(tmp.path().join("lora-demo/loss.png").is_file());
    let (_, after8, _) = figures(&int8_out);
    assert!((after8 - after).abs() <= 2.0, "int8 accuracy {after8}% vs f32 {after}%");
}

#[test]
fn the_int8_demo_base_loses_less_than_one_percent() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let (base, data) = (repo.join("demo/base"), repo.join("demo/data/eval.jsonl"));
    let loss = |extra: &[&str]| -> f64 {
        let mut args = vec!["eval", "--base", s(&base), "--data", s(&data), "--json"];
        args.extend(extra);
        serde_json::from_str::<serde_json::Value>(&ok_stdout(&args)).unwrap()["loss"].as_f64().unwrap()
    };
    let (f32_loss, int8_loss) = (loss(&[]), loss(&["--load-in-8bit"]));
    assert!(((int8_loss - f32_loss) / f32_loss).abs() < 0.01, "int8 {int8_loss} vs f32 {f32_loss}");
}
