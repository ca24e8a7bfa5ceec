//! Checkpoint folders under the failures they must survive: a writer process killed with
//! SIGKILL at random moments, flipped and truncated bytes, a full file system.
//!
//! The writer is this test binary run again with `LORAFLEET_CHECKPOINT_WRITER` set (the
//! `writer` test below), so each kill hits a real process in the middle of real writes.

use lorafleet_common::run_checkpoint::{list, resolve, verify, write};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const WRITER_ENV: &str = "LORAFLEET_CHECKPOINT_WRITER";
const KEEP: usize = 2;

/// The files of checkpoint `step`: big enough that a write takes a while, and each byte a
/// function of the step, so a reader can tell whose content a file holds.
fn files_of(step: u64) -> Vec<(&'static str, Vec<u8>)> {
    let body = |salt: u64, len: usize| -> Vec<u8> {
        (0..len as u64).map(|i| (i.wrapping_mul(31) ^ step.wrapping_mul(0x9e37) ^ salt) as u8).collect()
    };
    vec![
        ("adapter_model.safetensors", body(1, 1 << 20)),
        ("optimizer.safetensors", body(2, 2 << 20)),
        ("trainer_state.json", format!("{{\"global_step\": {step}}}").into_bytes()),
    ]
}

fn write_step(dir: &Path, step: u64, keep: usize) -> lorafleet_common::Result<()> {
    let files = files_of(step);
    let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (*n, b.as_slice())).collect();
    write(dir, step, &refs, keep).map(|_| ())
}

/// Only does something when run as the writer: writes checkpoints after the newest one it
/// finds, announcing each completed one, until killed (or, with a full disk, until a write
/// fails: then it checks what is left and reports).
#[test]
fn writer() {
    let Some(dir) = std::env::var_os(WRITER_ENV) else { return };
    let dir = Path::new(&dir);
    let keep = std::env::var("LORAFLEET_CHECKPOINT_KEEP").map_or(KEEP, |k| k.parse().unwrap());
    let start = resolve("latest", dir).unwrap().map_or(0, |r| r.manifest.step);
    for step in start + 1.. {
        if let Err(e) = write_step(dir, step, keep) {
            println!("error {e}");
            let all = list(dir).unwrap();
            let intact = all.iter().filter(|(_, d)| verify(d).is_ok()).count();
            let hidden = std::fs::read_dir(dir)
                .unwrap()
                .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with('.'))
                .count();
            println!("after {} visible {} intact {} hidden {hidden}", step - 1, all.len(), intact);
            return;
        }
        println!("done {step}");
        std::io::Write::flush(&mut std::io::stdout()).unwrap();
    }
}

fn writer_command(dir: &Path) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "writer", "--nocapture", "--test-threads=1"]).env(WRITER_ENV, dir);
    cmd
}

#[test]
fn fifty_kills_during_writes_leave_the_new_checkpoint_or_the_previous_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let (mut mid_write, mut unannounced) = (0, 0);
    for kill in 0..50 {
        let before = resolve("latest", dir).unwrap().map_or(0, |r| r.manifest.step);
        let mut child = writer_command(dir).stdout(Stdio::piped()).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut last = None;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // libtest's "test writer ... " precedes the first one on its line.
                if let Some(at) = line.find("done ") {
                    last = Some(line[at + 5..].trim().parse::<u64>().unwrap());
                }
            }
            last
        });
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(20 + rng % 60));
        child.kill().unwrap();
        child.wait().unwrap();
        let announced = reader.join().unwrap().unwrap_or(before);
        // Every visible folder is complete and verifies; the newest is the last announced
        // one or the one being written when the kill came (complete but not announced).
        for (_, d) in list(dir).unwrap() {
            verify(&d).unwrap_or_else(|e| panic!("kill {kill}: a visible checkpoint is torn: {e}"));
        }
        let latest = resolve("latest", dir).unwrap().expect("a checkpoint survives");
        let step = latest.manifest.step;
        assert!(step == announced || step == announced + 1, "kill {kill}: latest {step}, announced {announced}");
        assert!(list(dir).unwrap().len() <= KEEP + 1, "pruning keeps at most save_total_limit (+1 mid-prune)");
        for (name, bytes) in files_of(step) {
            assert_eq!(std::fs::read(latest.dir.join(name)).unwrap(), bytes, "kill {kill}: {name} of step {step}");
        }
        unannounced += usize::from(step == announced + 1);
        mid_write += std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with(".checkpoint-"))
            .count()
            .min(1);
    }
    eprintln!("50 kills: {mid_write} left a staging or hidden folder, {unannounced} came after a rename");
    assert!(mid_write > 0, "no kill landed inside a write: the test did not test anything");
}

#[test]
fn a_flipped_byte_or_a_truncated_file_is_caught_and_resume_takes_the_previous_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for step in [4, 8, 12] {
        write_step(dir, step, 0).unwrap();
    }
    let newest = dir.join("checkpoint-12/optimizer.safetensors");
    let mut bytes = std::fs::read(&newest).unwrap();
    bytes[1000] ^= 0x10;
    std::fs::write(&newest, &bytes).unwrap();
    let err = verify(&dir.join("checkpoint-12")).unwrap_err().to_string();
    assert!(err.contains("optimizer.safetensors") && err.contains("SHA-256"), "{err}");

    let middle = dir.join("checkpoint-8/adapter_model.safetensors");
    let len = std::fs::metadata(&middle).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&middle).unwrap().set_len(len - 7).unwrap();
    let r = resolve("latest", dir).unwrap().unwrap();
    assert_eq!(r.manifest.step, 4);
    let skipped: Vec<String> = r.skipped.iter().map(|(d, e)| format!("{} {e}", d.display())).collect();
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    assert!(skipped[0].contains("checkpoint-12") && skipped[1].contains("truncated"), "{skipped:?}");

    // A folder named explicitly falls back to the verified ones older than it.
    let explicit = resolve(dir.join("checkpoint-8").to_str().unwrap(), dir).unwrap().unwrap();
    assert_eq!((explicit.manifest.step, explicit.skipped.len()), (4, 1));
    // A missing manifest (a folder copied by hand, or from an older build) is refused too.
    std::fs::remove_file(dir.join("checkpoint-4/manifest.json")).unwrap();
    assert!(resolve("latest", dir).unwrap().is_none());
    assert!(resolve(dir.join("checkpoint-99").to_str().unwrap(), dir).unwrap_err().to_string().contains("no such"));
    assert!(resolve(dir.to_str().unwrap(), dir).unwrap_err().to_string().contains("checkpoint-STEP"));
}

#[test]
fn rewriting_a_step_replaces_it_and_pruning_keeps_the_newest() {
    let tmp = tempfile::tempdir().unwrap();
    for step in 1..=5 {
        write_step(tmp.path(), step, 3).unwrap();
    }
    write_step(tmp.path(), 4, 3).unwrap();
    let steps: Vec<u64> = list(tmp.path()).unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, vec![3, 4, 5]);
    let names: Vec<String> =
        std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().all(|n| n.starts_with("checkpoint-")), "{names:?}");
}

/// A file system that fills up mid-save: a 5 MiB tmpfs mounted in a private mount namespace
/// (`unshare`, as an unprivileged user too), holding at most one 3 MiB checkpoint beside a
/// second one being written.
#[test]
fn a_full_disk_fails_the_save_with_a_clear_error_and_keeps_the_previous_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let writer = writer_command(&mnt);
    let args: Vec<String> = writer.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
    let script = format!(
        "mount -t tmpfs -o size=5m tmpfs '{}' && exec '{}' {}",
        mnt.display(),
        writer.get_program().to_string_lossy(),
        args.join(" ")
    );
    let out = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "sh", "-c", &script])
        .env(WRITER_ENV, &mnt)
        .env("LORAFLEET_CHECKPOINT_KEEP", "0")
        .output()
        .expect("unshare (util-linux) runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let error = stdout.lines().find(|l| l.starts_with("error ")).unwrap_or_else(|| panic!("{stdout}"));
    assert!(error.contains("No space left on device") && error.contains("checkpoint-2"), "{error}");
    assert!(stdout.contains("after 1 visible 1 intact 1 hidden 0"), "{stdout}");
}
