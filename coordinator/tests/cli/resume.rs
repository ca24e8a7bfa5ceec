//! `--resume_from_checkpoint` after the coordinator is killed with SIGKILL mid-run: the final
//! adapter is byte-identical to an uninterrupted run's, a corrupt newest checkpoint is passed
//! over for the previous one, and a checkpoint of another run is refused naming what differs.

use super::{coordinator, s, tiny};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// 60 steps over 184 examples in batches of 8 (23 steps per epoch), a checkpoint every 5.
fn args(out: &Path, extra: &[&str]) -> Vec<String> {
    let data = tiny().join("data/alpaca_sample.jsonl");
    let mut a: Vec<String> = [
        "--base_model",
        s(&tiny()),
        "--data_path",
        s(&data),
        "--output_dir",
        s(out),
        "--batch_size",
        "8",
        "--micro_batch_size",
        "4",
        "--val_set_size",
        "16",
        "--learning_rate",
        "1e-3",
        "--warmup_steps",
        "4",
        "--max_steps",
        "60",
        "--eval_steps",
        "20",
        "--save_steps",
        "5",
        "--save_total_limit",
        "0",
        "--cutoff_len",
        "128",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

fn run(args: &[String]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_coordinator")).args(args).output().expect("running coordinator");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn adapter(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("adapter_model.safetensors")).unwrap()
}

/// Starts a run (its stderr to `stderr`) and returns it, still running, once
/// `checkpoint-STEP` is complete.
pub fn start_until_checkpoint(args: &[String], out: &Path, step: u64, stderr: Stdio) -> std::process::Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("running coordinator");
    let manifest = out.join(format!("checkpoint-{step}")).join("manifest.json");
    let started = Instant::now();
    while !manifest.exists() {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before checkpoint-{step}");
        assert!(started.elapsed() < Duration::from_secs(300), "no checkpoint-{step} after 300 s");
        std::thread::sleep(Duration::from_millis(2));
    }
    child
}

/// Kills a running coordinator with SIGKILL, before it wrote its final adapter.
fn kill(mut child: std::process::Child, out: &Path) {
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!out.join("adapter_model.safetensors").exists(), "killed before the end of the run");
}

/// The steps of `metrics.jsonl`'s train records, in file order.
pub fn logged_steps(out: &Path) -> Vec<u64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["type"] == "train")
        .map(|v| v["step"].as_u64().unwrap())
        .collect()
}

fn latest_checkpoint(out: &Path) -> u64 {
    lorafleet_common::run_checkpoint::list(out).unwrap().last().expect("a checkpoint").0
}

#[test]
fn a_run_killed_mid_epoch_resumes_to_the_same_bytes_even_past_a_corrupt_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let (whole, cut, again) = (tmp.path().join("whole"), tmp.path().join("cut"), tmp.path().join("again"));
    let (ok, log) = run(&args(&whole, &[]));
    assert!(ok, "{log}");

    kill(start_until_checkpoint(&args(&cut, &[]), &cut, 10, Stdio::null()), &cut);
    let newest = latest_checkpoint(&cut);
    eprintln!("killed with checkpoint-{newest} the newest");
    // The newest checkpoint gets a flipped bit in the middle of its optimizer state: the
    // manifest catches it and the resume takes the one before.
    let corrupt = cut.join(format!("checkpoint-{newest}/optimizer.safetensors"));
    let mut bytes = std::fs::read(&corrupt).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&corrupt, &bytes).unwrap();
    let (ok, log) = run(&args(&cut, &["--resume_from_checkpoint"]));
    assert!(ok, "{log}");
    assert!(log.contains(&format!("skipping checkpoint {}", corrupt.parent().unwrap().display())), "{log}");
    let from = cut.join(format!("checkpoint-{}", newest - 5));
    assert!(log.contains(&format!("resuming from {}", from.display())), "{log}");
    assert!(adapter(&cut) == adapter(&whole), "resumed after a kill: the adapter differs from the uninterrupted run's");
    assert_eq!(logged_steps(&cut), (1..=6).map(|i| i * 10).collect::<Vec<_>>(), "each step is logged once");

    // Step 5 is mid-epoch (23 steps per epoch): resume from it explicitly into another folder.
    let from: PathBuf = cut.join("checkpoint-5");
    let (ok, log) = run(&args(&again, &["--resume_from_checkpoint", s(&from)]));
    assert!(ok && log.contains("(step 5 of 60)"), "{log}");
    assert!(adapter(&again) == adapter(&whole), "resumed from step 5: the adapter differs");
}

#[test]
fn a_checkpoint_of_another_run_is_refused_naming_the_difference() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let mut first = args(&out, &[]);
    first.extend(["--max_steps".into(), "6".into()]);
    let (ok, log) = run(&first);
    assert!(ok, "{log}");
    let before = std::fs::read(out.join("metrics.jsonl")).unwrap();
    let mut other = first.clone();
    other.extend(["--learning_rate".into(), "2e-3".into(), "--lora_r".into(), "4".into(), "--resume".into()]);
    let r = coordinator(&other.iter().map(String::as_str).collect::<Vec<_>>());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success(), "{err}");
    assert!(err.contains("checkpoint-5 belongs to another run"), "{err}");
    assert!(
        err.contains("learning_rate: checkpoint 0.001, now 0.002") && err.contains("lora_r: checkpoint 8, now 4"),
        "{err}"
    );
    let mut longer = first.clone();
    longer.extend(["--max_steps".into(), "8".into(), "--resume".into()]);
    let err = run(&longer).1;
    assert!(err.contains("total steps: checkpoint 6, now 8"), "{err}");
    assert_eq!(std::fs::read(out.join("metrics.jsonl")).unwrap(), before, "a refused resume writes nothing");
    let (ok, err) = run(&args(&tmp.path().join("empty"), &["--resume"]));
    assert!(!ok && err.contains("no checkpoint to resume from"), "{err}");
}

/// Processes whose parent is `pid` (from /proc).
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
        let Ok(child) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        let after = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
        if after.split(' ').nth(1).and_then(|p| p.parse::<u32>().ok()) == Some(pid) {
            out.push(child);
        }
    }
    out
}

/// Whether `pid` still runs (a zombie nobody reaped has ended).
pub fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !matches!(s[s.rfind(')').map_or(0, |i| i + 2)..].chars().next(), Some('Z' | 'X')))
}

#[test]
fn local_workers_end_with_their_killed_coordinator_and_the_resumed_run_ends_in_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = |out: &Path| -> Vec<String> {
        let a = ["--demo", "--workers", "2", "--micro_batch_size", "8", "--max_steps", "20", "--save_steps", "5"];
        let b = ["--eval_steps", "0", "--eval_exact_match", "false", "--output_dir", s(out)];
        a.iter().chain(&b).map(|x| x.to_string()).collect()
    };
    let (whole, cut) = (tmp.path().join("whole"), tmp.path().join("cut"));
    let (ok, log) = run(&demo(&whole));
    assert!(ok, "{log}");

    let child = start_until_checkpoint(&demo(&cut), &cut, 10, Stdio::null());
    let workers = children(child.id());
    kill(child, &cut);
    assert_eq!(workers.len(), 2, "two local worker processes");
    let deadline = Instant::now() + Duration::from_secs(10);
    while workers.iter().any(|&w| running(w)) {
        assert!(Instant::now() < deadline, "local workers outlived their coordinator by 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut again = demo(&cut);
    again.push("--resume_from_checkpoint".into());
    let (ok, log) = run(&again);
    assert!(ok && log.contains("every rank holds the saved state"), "{log}");
    assert!(adapter(&cut) == adapter(&whole), "2 workers resumed after a kill: the adapter differs");
}
