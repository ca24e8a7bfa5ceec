//! Data-parallel runs on the demo with real worker processes: QUIC control channel and the
//! TCP ring on loopback.

use super::s;
use lorafleet_worker::link;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn demo_run(out: &Path, workers: usize, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--demo",
        "--micro_batch_size",
        "8",
        "--max_steps",
        "20",
        "--save_steps",
        "10",
        "--eval_steps",
        "0",
        "--eval_exact_match",
        "false",
        "--workers",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    args.push(workers.to_string());
    args.extend(["--output_dir".to_string(), s(out).to_string()]);
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

fn run_ok(args: &[String]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_coordinator")).args(args).output().expect("running coordinator");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "coordinator {args:?} failed:\n{err}");
    err
}

fn tensors(dir: &Path) -> BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let v = view.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            (name, v)
        })
        .collect()
}

#[test]
fn two_workers_equal_one_worker_with_two_micro_batches_and_repeat_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let (one, two_a, two_b) = (tmp.path().join("one"), tmp.path().join("two-a"), tmp.path().join("two-b"));
    run_ok(&demo_run(&one, 1, &[]));
    let log = run_ok(&demo_run(&two_a, 2, &[]));
    assert!(log.contains("starting 2 local workers") && log.contains("replicas agree"), "{log}");
    run_ok(&demo_run(&two_b, 2, &[]));

    let (a, b) = (tensors(&one), tensors(&two_a));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let (mut num, mut den) = (0f64, 0f64);
    for (k, va) in &a {
        for (x, y) in va.iter().zip(&b[k]) {
            num += f64::from(x - y).powi(2);
            den += f64::from(*x).powi(2);
        }
    }
    let rel = (num / den).sqrt();
    assert!(rel <= 1e-4, "1 worker x 2 micro-batches vs 2 workers: relative difference {rel:e}");
    assert!(den > 0.0);
    let file = |d: &Path| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    assert!(file(&two_a) == file(&two_b), "two 2-worker runs must be bit-identical");
    // The replicas agreed at step 10 and a checkpoint was written from rank 0's state.
    assert!(two_a.join("checkpoint-10/optimizer.safetensors").is_file());
    let metrics = std::fs::read_to_string(two_a.join("metrics.jsonl")).unwrap();
    let last_train = metrics.lines().rfind(|l| l.contains(r#""type":"train""#)).unwrap();
    let v: serde_json::Value = serde_json::from_str(last_train).unwrap();
    let workers = v["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2);
    assert!(workers.iter().all(|w| w["allreduce_seconds"].as_f64().unwrap() > 0.0), "{last_train}");
}

/// A coordinator waiting for remote workers, with its stderr collected line by line.
struct Listening {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    join: String,
    addr: String,
    fingerprint: String,
}

impl Listening {
    fn start(out: &Path, workers: &str, extra: &[&str]) -> Self {
        let mut args = vec![
            "--demo",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            workers,
            "--micro_batch_size",
            "8",
            "--max_steps",
            "2",
            "--eval_exact_match",
            "false",
            "--output_dir",
            s(out),
        ];
        args.extend(extra);
        let mut child = Command::new(env!("CARGO_BIN_EXE_coordinator"))
            .args(&args)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn({
            let log = log.clone();
            move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Some(j) = line.strip_prefix("join string: ") {
                        let _ = tx.send(j.to_owned());
                    }
                    log.lock().unwrap().push(line);
                }
            }
        });
        let join = rx.recv_timeout(Duration::from_secs(60)).expect("the coordinator prints a join string");
        let rest = join.strip_prefix("lorafleet://").unwrap();
        let (_, rest) = rest.split_once('@').unwrap();
        let (addr, fingerprint) = rest.rsplit_once('/').unwrap();
        Self { child, log, addr: addr.into(), fingerprint: fingerprint.into(), join }
    }

    fn worker(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_worker"));
        c.args(args);
        c
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn wait(mut self) -> (bool, String) {
        let status = self.child.wait().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        (status.success(), self.log())
    }
}

/// Opens a QUIC connection that pins the right certificate, sends `bytes` on a stream and
/// returns what came back before the coordinator closed it.
fn quic_garbage(addr: &str, fingerprint: &str, bytes: Vec<u8>) -> Vec<u8> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async move {
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(link::client_config(fingerprint).unwrap());
        let conn = endpoint.connect(addr.parse().unwrap(), link::SERVER_NAME).unwrap().await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&bytes).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(20), recv.read_to_end(1 << 20)).await;
        let got = match got {
            Ok(Ok(data)) => data,
            _ => Vec::new(),
        };
        assert!(
            tokio::time::timeout(Duration::from_secs(20), conn.closed()).await.is_ok(),
            "the coordinator closes the connection"
        );
        got
    })
}

#[test]
fn strangers_are_refused_get_nothing_and_the_run_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let c = Listening::start(&out, "2", &["--token", "open-sesame"]);

    let wrong_token =
        c.worker(&["--join", &c.addr, "--token", "guess", "--fingerprint", &c.fingerprint]).output().unwrap();
    let err = String::from_utf8_lossy(&wrong_token.stderr);
    assert!(!wrong_token.status.success() && err.contains("refused"), "{err}");

    let other_cert = "ab".repeat(32);
    let wrong_fp =
        c.worker(&["--join", &c.addr, "--token", "open-sesame", "--fingerprint", &other_cert]).output().unwrap();
    let err = String::from_utf8_lossy(&wrong_fp.stderr);
    assert!(!wrong_fp.status.success() && err.contains("fingerprint"), "{err}");

    // Not QUIC at all.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.send_to(b"\x00garbage datagram that is not QUIC", &c.addr).unwrap();
    // QUIC with the right certificate, then: a frame claiming 2 GB, a malformed body, a
    // frame of another protocol version. None of them gets a byte back.
    assert!(quic_garbage(&c.addr, &c.fingerprint, vec![0xff, 0xff, 0xff, 0x7f, 1, 2, 3]).is_empty());
    let [v0, v1] = lorafleet_common::protocol::PROTOCOL_VERSION.to_le_bytes();
    assert!(quic_garbage(&c.addr, &c.fingerprint, vec![6, 0, 0, 0, v0, v1, 0xde, 0xad, 0xbe, 0xef]).is_empty());
    assert!(quic_garbage(&c.addr, &c.fingerprint, vec![3, 0, 0, 0, 99, 0, 0]).is_empty());

    let mut workers: Vec<Child> = (0..2)
        .map(|i| c.worker(&["--join", &c.join, "--name", &format!("good-{i}")]).stderr(Stdio::null()).spawn().unwrap())
        .collect();
    let (ok, log) = c.wait();
    assert!(ok, "{log}");
    for w in &mut workers {
        assert!(w.wait().unwrap().success());
    }
    assert!(out.join("adapter_model.safetensors").is_file(), "{log}");
    for reason in ["wrong join token", "over the 4096-byte limit", "malformed frame", "protocol version 99"] {
        assert!(log.contains(reason), "no `{reason}` in the log:\n{log}");
    }
    assert!(log.contains("worker good-0 joined") && log.contains("worker good-1 joined"), "{log}");
}

#[test]
fn a_worker_with_another_base_model_stops_the_run_before_step_one() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    std::fs::create_dir(&base).unwrap();
    let demo: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../demo/base");
    for entry in std::fs::read_dir(&demo).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, base.join(p.file_name().unwrap())).unwrap();
    }
    let cfg = base.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["rms_norm_eps"] = serde_json::json!(v["rms_norm_eps"].as_f64().unwrap() * 2.0);
    std::fs::write(&cfg, v.to_string()).unwrap();

    let out = tmp.path().join("out");
    let c = Listening::start(&out, "2", &[]);
    let mut good = c.worker(&["--join", &c.join, "--name", "same"]).stderr(Stdio::null()).spawn().unwrap();
    let mut odd = c
        .worker(&["--join", &c.join, "--name", "odd", "--base-model", s(&base)])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (ok, log) = c.wait();
    assert!(!ok, "{log}");
    assert!(log.contains("worker odd (rank") && log.contains("different base model"), "{log}");
    assert!(!out.join("adapter_model.safetensors").exists());
    let _ = (good.wait(), odd.wait());
}

#[test]
fn keygen_makes_a_certificate_whose_fingerprint_is_stable() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tls");
    let first = super::ok_stdout(&["keygen", s(&dir)]);
    let again = super::ok_stdout(&["keygen", s(&dir)]);
    let cert = std::fs::read(dir.join("cert.der")).unwrap();
    assert_eq!(first.trim(), lorafleet_common::protocol::sha256_hex(&cert));
    assert_eq!(first, again);
}

#[test]
fn a_local_worker_that_keeps_dying_before_joining_stops_the_run_once_its_restarts_are_used_up() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .args(demo_run(&tmp.path().join("out"), 2, &["--metrics-addr", "0"]))
        .env("LORAFLEET_WORKER_BIN", "false")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("local worker") && err.contains("exited") && err.contains("started local-"), "{err}");
    assert!(err.contains("the 3 restarts of --max_restarts are used up"), "{err}");
}

fn wait_until(what: &str, secs: u64, mut ready: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while !ready() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_remote_worker_stopped_past_the_timeout_is_fenced_replaced_by_a_new_one_and_refused_when_it_wakes() {
    let tmp = tempfile::tempdir().unwrap();
    let (whole, out) = (tmp.path().join("whole"), tmp.path().join("remote"));
    let settings = ["--max_steps", "20", "--save_steps", "5", "--batch_size", "24", "--eval_steps", "0"];
    let mut local = demo_run(&whole, 3, &settings);
    local.extend(["--metrics-addr".into(), "0".into()]);
    let r =
        Command::new(env!("CARGO_BIN_EXE_coordinator")).args(&local).env("RAYON_NUM_THREADS", "1").output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));

    let mut extra = settings.to_vec();
    extra.extend(["--heartbeat-timeout", "3", "--metrics-addr", "0"]);
    let c = Listening::start(&out, "3", &extra);
    let start = |name: &str| {
        c.worker(&["--join", &c.join, "--name", name])
            .env("RAYON_NUM_THREADS", "1")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut workers: Vec<Child> = ["w0", "w1", "w2"].iter().map(|n| start(n)).collect();
    wait_until("checkpoint-5", 300, || out.join("checkpoint-5/manifest.json").exists());
    let stopped = workers[1].id().to_string();
    assert!(Command::new("kill").args(["-STOP", &stopped]).status().unwrap().success());
    wait_until("the stopped worker to be fenced", 60, || c.log().contains("fenced"));
    let mut spare = start("spare");
    wait_until("the recovery", 120, || c.log().contains("recovered: every rank holds the state"));
    assert!(Command::new("kill").args(["-CONT", &stopped]).status().unwrap().success());
    let (ok, log) = c.wait();
    assert!(ok, "{log}");
    // Woken up, the fenced worker finds its connection closed by the coordinator and stops;
    // nothing it sent after its fence was counted.
    let woken = workers.remove(1).wait_with_output().unwrap();
    assert!(!woken.status.success(), "a fenced worker must not finish the run as a member");
    for w in workers.iter_mut().chain([&mut spare]) {
        assert!(w.wait().unwrap().success());
    }
    assert!(
        log.contains("worker w1 sent nothing for 3 s") && log.contains("worker spare joined as a replacement"),
        "{log}"
    );
    let file = |d: &Path| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    assert!(file(&out) == file(&whole), "the recovered remote run differs from the undisturbed local one:\n{log}");
}

#[test]
fn a_listening_coordinator_killed_mid_run_resumes_with_remote_workers_joining_again() {
    let tmp = tempfile::tempdir().unwrap();
    let (whole, out, tls) = (tmp.path().join("whole"), tmp.path().join("remote"), tmp.path().join("tls"));
    let settings = ["--max_steps", "20", "--save_steps", "5", "--eval_steps", "0", "--metrics-addr", "0"];
    let r = Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .args(demo_run(&whole, 2, &settings))
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));

    let mut extra = settings.to_vec();
    extra.extend(["--tls-dir", s(&tls), "--token", "open-sesame"]);
    let join = |c: &Listening| -> Vec<Child> {
        (0..2)
            .map(|i| {
                c.worker(&["--join", &c.join, "--name", &format!("w{i}")])
                    .env("RAYON_NUM_THREADS", "1")
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect()
    };
    let first = Listening::start(&out, "2", &extra);
    let fingerprint = first.fingerprint.clone();
    let mut workers = join(&first);
    wait_until("checkpoint-5", 300, || out.join("checkpoint-5/manifest.json").exists());
    first.kill();
    // Remote workers notice a lost coordinator only by the connection's idle timeout; their
    // supervisor (systemd, Kubernetes, Slurm) starts them again with the same command.
    for w in &mut workers {
        w.kill().unwrap();
        w.wait().unwrap();
    }
    assert!(!out.join("adapter_model.safetensors").exists());

    extra.push("--resume_from_checkpoint");
    let second = Listening::start(&out, "2", &extra);
    assert_eq!(second.fingerprint, fingerprint, "--tls-dir keeps the certificate: the same join works");
    let mut workers = join(&second);
    let (ok, log) = second.wait();
    assert!(ok && log.contains("resumed from step"), "{log}");
    for w in &mut workers {
        assert!(w.wait().unwrap().success());
    }
    let file = |d: &Path| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    assert!(file(&out) == file(&whole), "resumed with remote workers: the adapter differs:\n{log}");
}
