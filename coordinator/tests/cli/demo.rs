//! The README's first command: `coordinator` with no arguments trains the embedded demo with
//! the PEFT reference run's hyperparameters (demo/README.md) and must reach its accuracy.
//! This is the slowest test of the suite (a few minutes on two cores).

use std::process::Command;

#[test]
fn the_demo_reaches_the_peft_reference_accuracy() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_coordinator")).current_dir(tmp.path()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let line = stdout.lines().find(|l| l.starts_with("exact-match accuracy:")).expect("an accuracy line");
    let pct: Vec<f64> =
        line.split_whitespace().filter_map(|w| w.strip_suffix('%')).map(|p| p.parse().unwrap()).collect();
    assert_eq!(pct.len(), 2, "{line}");
    assert_eq!(pct[0], 0.0, "the base model has never seen the prompt format");
    // PEFT reached 88.5% (86.0-88.5% over seeds and learning rates); the issue allows 3 points.
    assert!(pct[1] >= 85.5, "{line}");
    let eval: f64 = stdout.lines().find_map(|l| l.strip_prefix("final eval loss: ")).unwrap().parse().unwrap();
    assert!(eval < 0.3, "eval loss {eval} (PEFT: 0.2116, range 0.17-0.23)");
    let adapter = tmp.path().join("lora-demo");
    assert!(adapter.join("adapter_model.safetensors").is_file() && adapter.join("loss.png").is_file());
}
