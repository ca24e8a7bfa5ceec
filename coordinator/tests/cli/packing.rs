//! `--sample_packing` as a user runs it: packed training with real worker processes, the
//! loss of a packed step against the unpacked step of the same examples, and packing as part
//! of a checkpoint's run identity.

use super::{s, tiny};
use std::path::Path;
use std::process::Command;

fn run(args: &[String]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_coordinator")).args(args).output().expect("running coordinator");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn run_ok(args: &[String]) -> String {
    let (ok, err) = run(args);
    assert!(ok, "coordinator {args:?} failed:\n{err}");
    err
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

/// `metrics.jsonl`'s records of `kind`.
fn records(out: &Path, kind: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).filter(|v| v["type"] == kind).collect()
}

fn adapter_values(dir: &Path) -> Vec<f32> {
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_owned).collect();
    names.sort();
    names
        .iter()
        .flat_map(|n| {
            let t = st.tensor(n).unwrap();
            t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect::<Vec<_>>()
        })
        .collect()
}

fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let den: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum();
    assert!(den > 0.0);
    (num / den).sqrt()
}

/// The demo packed into rows of 256 tokens, 4 rows a step, 8 steps, a checkpoint every 4.
fn demo_packed(out: &Path, workers: &str, extra: &[&str]) -> Vec<String> {
    let flags = "--demo --sample_packing --batch_size 4 --micro_batch_size 2 --max_steps 8 --save_steps 4 \
                 --eval_steps 0 --logging_steps 1 --eval_exact_match false";
    let mut a: Vec<String> = flags.split_whitespace().map(str::to_owned).collect();
    a.extend(strings(&["--workers", workers, "--output_dir", s(out)]));
    a.extend(strings(extra));
    a
}

#[test]
fn packed_training_with_two_workers_equals_one_and_packing_is_part_of_the_run_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    let log = run_ok(&demo_packed(&two, "2", &[]));
    assert!(log.contains("starting 2 local workers") && log.contains("sample packing:"), "{log}");
    assert!(log.contains("batch 4 packed rows"), "{log}");
    run_ok(&demo_packed(&one, "1", &[]));
    let d = rel_diff(&adapter_values(&one), &adapter_values(&two));
    assert!(d <= 1e-4, "1 worker vs 2 workers, packed: relative difference {d:e}");

    // The demo's examples are short: a packed row holds several, and little of it is padding.
    let data = &records(&two, "data")[0];
    let fill = data["packing"]["fill"].as_f64().unwrap();
    assert!(fill > 0.9, "packed rows {fill} full");
    let rows = data["packing"]["rows_per_epoch"][0].as_u64().unwrap();
    let examples = data["examples"].as_u64().unwrap();
    assert!(rows * 3 < examples, "{rows} rows for {examples} examples");
    let train = records(&two, "train");
    assert_eq!(train.len(), 8);
    for t in &train {
        let tokens = t["tokens"].as_u64().unwrap_or(0);
        assert!(t["loss"].as_f64().unwrap().is_finite() && tokens > 0, "{t}");
    }

    // A checkpoint made with packing belongs to a packed run.
    let (ok, err) = run(&demo_packed(&two, "1", &["--sample_packing", "false", "--resume_from_checkpoint"]));
    assert!(
        !ok && err.contains("belongs to another run") && err.contains("sample_packing: checkpoint true, now false")
    );
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(two.join("checkpoint-4/trainer_state.json")).unwrap()).unwrap();
    assert_eq!((state["epoch_index"].as_u64(), state["step_in_epoch"].as_u64()), (Some(0), Some(4)));
    assert!(state["epoch_steps"].as_array().is_some_and(|s| !s.is_empty()), "{state}");
}

#[test]
fn a_packed_run_resumed_in_its_second_epoch_ends_with_the_bytes_of_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (whole, again) = (tmp.path().join("whole"), tmp.path().join("again"));
    // Under 80 packs of 256 tokens an epoch, 16 a step: step 9 lies past the first epoch.
    let args = |out: &Path, extra: &[&str]| {
        let mut a = one_step(out, true);
        a.extend(strings(&["--batch_size", "16", "--micro_batch_size", "4", "--max_steps", "12", "--save_steps", "3"]));
        a.extend(strings(extra));
        a
    };
    run_ok(&args(&whole, &[]));
    let from = whole.join("checkpoint-9");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(from.join("trainer_state.json")).unwrap()).unwrap();
    let steps: Vec<u64> = state["epoch_steps"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    let (mut epoch, mut left) = (0, 9);
    while left > steps[epoch] {
        (left, epoch) = (left - steps[epoch], epoch + 1);
    }
    assert!(epoch >= 1, "{steps:?}: step 9 must lie past the first epoch");
    let cursor = (state["epoch_index"].as_u64(), state["step_in_epoch"].as_u64());
    assert_eq!(cursor, (Some(epoch as u64), Some(left)), "{steps:?}");
    let log = run_ok(&args(&again, &["--resume_from_checkpoint", s(&from)]));
    assert!(log.contains("(step 9 of 12)"), "{log}");
    let read = |d: &Path| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    assert!(read(&whole) == read(&again), "the resumed packed run must end bit for bit like the uninterrupted one");
}

/// The 200 tiny-llama Alpaca records in one step: every example, unpacked (200 rows) or
/// packed (fewer rows of 256 tokens).
fn one_step(out: &Path, packed: bool) -> Vec<String> {
    let data = tiny().join("data/alpaca_sample.jsonl");
    let mut a = strings(&["--base_model", s(&tiny()), "--data_path", s(&data), "--output_dir", s(out)]);
    // No warm-up (the step updates), dropout on (keyed by example, packed or not).
    let flags = "--val_set_size 0 --cutoff_len 256 --learning_rate 1e-3 --warmup_steps 0 --lr_scheduler constant \
                 --max_steps 1 --logging_steps 1 --save_steps 0 --eval_steps 0 --lora_dropout 0.1 \
                 --micro_batch_size 8 --batch_size 200";
    a.extend(flags.split_whitespace().map(str::to_owned));
    a.extend(strings(if packed { &["--sample_packing", "true"][..] } else { &[] }));
    a
}

#[test]
fn a_packed_step_gives_the_loss_and_update_of_the_unpacked_step_of_the_same_examples() {
    let tmp = tempfile::tempdir().unwrap();
    let (plain, packed) = (tmp.path().join("plain"), tmp.path().join("packed"));
    run_ok(&one_step(&plain, false));
    run_ok(&one_step(&packed, true));
    let rows = records(&packed, "data")[0]["packing"]["rows_per_epoch"][0].as_u64().unwrap();
    assert!(rows < 200, "{rows} packs: the step must hold every example");
    let (a, b) = (&records(&plain, "train")[0], &records(&packed, "train")[0]);
    assert_eq!(a["tokens"], b["tokens"], "the same real tokens: every example, once");
    let (la, lb) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
    assert!(((la - lb) / la).abs() <= 1e-5, "loss {lb} packed vs {la} unpacked");
    let d = rel_diff(&adapter_values(&plain), &adapter_values(&packed));
    assert!(d <= 1e-4, "adapters after the step differ by {d:e}");
}

#[test]
fn packing_without_the_training_engine_is_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("never");
    let o = Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .args(demo_packed(&out, "1", &[]))
        .env("LORAFLEET_ENGINE", "reference")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("LORAFLEET_ENGINE=reference"), "{err}");
    let (ok, err) = run(&demo_packed(&out, "1", &["--device", "cuda"]));
    assert!(!ok && err.contains("`sample_packing`") && err.contains("device cpu"), "{err}");
    let (ok, err) = run(&demo_packed(&out, "1", &["--group_by_length"]));
    assert!(!ok && err.contains("group_by_length"), "{err}");
    assert!(!out.exists(), "nothing is created for a refused run");
}
