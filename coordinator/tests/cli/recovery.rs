//! A lost worker does not end the run: a 3-worker demo run whose workers are killed with
//! SIGKILL, or stopped with SIGSTOP past the heartbeat timeout, at a random moment, finishes
//! with an adapter byte-identical to an undisturbed run's.

use super::resume::{children, logged_steps, running, start_until_checkpoint};
use super::s;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn demo(out: &Path, extra: &[&str]) -> Vec<String> {
    let a = ["--demo", "--workers", "3", "--batch_size", "24", "--micro_batch_size", "8", "--max_steps", "20"];
    let b = ["--save_steps", "5", "--eval_steps", "0", "--eval_exact_match", "false", "--output_dir", s(out)];
    a.iter().chain(&b).chain(extra).map(|x| x.to_string()).collect()
}

fn adapter(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("adapter_model.safetensors")).unwrap()
}

/// A seed from the clock, printed so that a failure can be replayed by hand.
fn random_below(n: u64) -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64;
    let pick = nanos.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 33;
    pick % n
}

/// Runs the disturbed run: `disturb` gets the worker pids once checkpoint-5 exists, then the
/// run must finish by itself. Returns its stderr.
fn disturbed(out: &Path, extra: &[&str], disturb: impl FnOnce(&[u32])) -> String {
    let log_path = out.with_extension("log");
    let stderr = std::fs::File::create(&log_path).unwrap();
    let mut child = start_until_checkpoint(&demo(out, extra), out, 5, stderr.into());
    let workers = children(child.id());
    assert_eq!(workers.len(), 3, "three local workers");
    disturb(&workers);
    let status = child.wait().unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(status.success(), "the disturbed run failed:\n{log}");
    log
}

/// The run the disturbed ones are compared with, into `out`.
fn undisturbed(out: &Path) {
    let r = Command::new(env!("CARGO_BIN_EXE_coordinator")).args(demo(out, &[])).output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
}

fn signal(sig: &str, pid: u32) {
    assert!(Command::new("kill").args([sig, &pid.to_string()]).status().unwrap().success());
}

#[test]
fn a_worker_killed_at_a_random_moment_is_replaced_and_the_run_ends_in_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let (whole, cut) = (tmp.path().join("whole"), tmp.path().join("cut"));
    undisturbed(&whole);

    let (victim, delay) = (random_below(3) as usize, random_below(1500));
    eprintln!("killing worker {victim} {delay} ms after checkpoint-5");
    let log = disturbed(&cut, &[], |workers| {
        std::thread::sleep(Duration::from_millis(delay));
        signal("-KILL", workers[victim]);
    });
    assert!(log.contains("exited") && log.contains("started local-"), "{log}");
    assert!(log.contains("recovered: every rank holds the state after step"), "{log}");
    assert!(adapter(&cut) == adapter(&whole), "worker {victim} killed after {delay} ms: the adapter differs:\n{log}");
    // Every step is logged once: the replayed ones replaced their first attempt's records.
    assert_eq!(logged_steps(&cut), [10, 20]);
}

#[test]
fn a_stopped_worker_is_fenced_after_the_heartbeat_timeout_and_the_run_ends_in_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let (whole, cut) = (tmp.path().join("whole"), tmp.path().join("cut"));
    undisturbed(&whole);

    let victim = random_below(3) as usize;
    eprintln!("stopping worker {victim}");
    let log = disturbed(&cut, &["--heartbeat-timeout", "3"], |workers| {
        signal("-STOP", workers[victim]);
        // Fenced after 3 s of silence: its coordinator kills it (a stopped process too).
        let deadline = Instant::now() + Duration::from_secs(30);
        while running(workers[victim]) {
            assert!(Instant::now() < deadline, "the stopped worker was not fenced and killed");
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    assert!(log.contains("sent nothing for 3 s") && log.contains("fenced"), "{log}");
    assert!(adapter(&cut) == adapter(&whole), "worker {victim} stopped: the adapter differs:\n{log}");
}

/// ‖a − b‖ / ‖a‖ over every tensor of two adapter files.
fn relative_difference(a: &[u8], b: &[u8]) -> f64 {
    let (a, b) = (safetensors::SafeTensors::deserialize(a).unwrap(), safetensors::SafeTensors::deserialize(b).unwrap());
    let (mut num, mut den) = (0f64, 0f64);
    for (name, va) in a.tensors() {
        let vb = b.tensor(&name).unwrap();
        for (x, y) in va.data().chunks_exact(4).zip(vb.data().chunks_exact(4)) {
            let (x, y) = (f32::from_le_bytes(x.try_into().unwrap()), f32::from_le_bytes(y.try_into().unwrap()));
            num += f64::from(x - y).powi(2);
            den += f64::from(x).powi(2);
        }
    }
    (num / den).sqrt()
}

#[test]
fn with_min_workers_a_run_without_restarts_goes_on_with_two_workers_and_the_same_global_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let (whole, cut) = (tmp.path().join("whole"), tmp.path().join("cut"));
    undisturbed(&whole);

    let victim = random_below(3) as usize;
    let log = disturbed(&cut, &["--max_restarts", "0", "--min_workers", "2"], |workers| {
        signal("-KILL", workers[victim]);
    });
    assert!(log.contains("going on with 2 of 3 workers (--min_workers 2)"), "{log}");
    let rel = relative_difference(&adapter(&whole), &adapter(&cut));
    assert!(rel > 0.0 && rel <= 1e-4, "3 workers, then 2 after a loss: relative difference {rel:e}");
}
