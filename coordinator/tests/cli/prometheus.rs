//! A real Prometheus server (Debian's `prometheus` package) scraping a real two-worker run
//! on loopback: every query of the Grafana dashboard must return data, and every alert rule
//! of `deploy/prometheus/alerts.yml` must load and evaluate.
//!
//! `.ci/run` installs the server and sets `LORAFLEET_REQUIRE_PROMETHEUS=1`; elsewhere the test
//! says it is skipped when no `prometheus` binary is found.

use super::s;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const RUN_ID: &str = "itest";

fn prometheus_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("LORAFLEET_PROMETHEUS") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).chain([PathBuf::from("/usr/bin")]).map(|d| d.join("prometheus")).find(|p| p.is_file())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Kills the process when the test ends, whatever happens.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// GET on Prometheus' HTTP API; the body as JSON.
fn api(port: u16, path: &str) -> Value {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    serde_json::from_str(body).unwrap_or(Value::Null)
}

fn query(port: u16, expr: &str) -> Value {
    api(port, &format!("/api/v1/query?query={}", encode(expr)))
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Every PromQL expression of the dashboard, with Grafana's variables filled in.
fn dashboard_queries(repo: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo.join("deploy/grafana/dashboards/lorafleet.json")).unwrap();
    let d: Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    for panel in d["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                let expr =
                    expr.replace("$run_id", RUN_ID).replace("$__rate_interval", "1m").replace("$__interval", "1m");
                out.push((panel["title"].as_str().unwrap_or("?").to_owned(), expr));
            }
        }
    }
    out
}

#[test]
fn prometheus_scrapes_a_run_and_every_dashboard_query_and_alert_rule_works() {
    let Some(prometheus) = prometheus_binary() else {
        assert!(
            std::env::var_os("LORAFLEET_REQUIRE_PROMETHEUS").is_none(),
            "LORAFLEET_REQUIRE_PROMETHEUS is set but no prometheus binary was found"
        );
        eprintln!("SKIPPED: no prometheus binary (apt-get install prometheus; .ci/run does)");
        return;
    };
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let tmp = tempfile::tempdir().unwrap();
    let (metrics_port, prom_port) = (free_port(), free_port());
    let config = tmp.path().join("prometheus.yml");
    let rules = repo.join("deploy/prometheus/alerts.yml").canonicalize().unwrap();
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [{rules:?}]\n\
             scrape_configs:\n  - job_name: lorafleet\n    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n"
        ),
    )
    .unwrap();
    let _server = Killed(
        Command::new(&prometheus)
            .arg(format!("--config.file={}", s(&config)))
            .arg(format!("--storage.tsdb.path={}", s(&tmp.path().join("data"))))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(tmp.path().join("prometheus.log")).unwrap())
            .spawn()
            .expect("starting prometheus"),
    );
    let out = tmp.path().join("out");
    let mut coordinator = Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .args(["--demo", "--workers", "2", "--micro_batch_size", "8", "--max_steps", "16", "--eval_steps", "4"])
        .args(["--save_steps", "8", "--eval_exact_match", "false", "--output_dir", s(&out), "--run-id", RUN_ID])
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}"), "--metrics-linger", "300"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(coordinator.stderr.take().unwrap());
    let coordinator = Killed(coordinator);
    let mut log = Vec::new();
    for line in stderr.lines().map_while(Result::ok) {
        let done = line.starts_with("metrics: serving for");
        log.push(line);
        if done {
            break;
        }
    }
    let log = log.join("\n");
    assert!(log.contains("adapter written"), "the run did not finish:\n{log}");

    // The last values were scraped, and the alert rules were evaluated at least once.
    wait_for("the final step in Prometheus", Duration::from_secs(60), || {
        let v = query(prom_port, &format!("lorafleet_steps_total{{run_id=\"{RUN_ID}\"}}"));
        v["data"]["result"][0]["value"][1].as_str() == Some("16")
    });
    wait_for("the alert rules to be evaluated", Duration::from_secs(30), || {
        let v = api(prom_port, "/api/v1/rules");
        let rules: Vec<&Value> =
            v["data"]["groups"].as_array().into_iter().flatten().flat_map(|g| g["rules"].as_array().unwrap()).collect();
        !rules.is_empty() && rules.iter().all(|r| r["health"] == "ok")
    });
    let rules = api(prom_port, "/api/v1/rules");
    let names: Vec<&str> =
        rules["data"]["groups"][0]["rules"].as_array().unwrap().iter().filter_map(|r| r["name"].as_str()).collect();
    for alert in ["LorafleetWorkerDown", "LorafleetLossNaN", "LorafleetNoProgress", "LorafleetDeviceMemoryHigh"] {
        assert!(names.contains(&alert), "{alert} is not loaded: {names:?}");
    }

    let queries = dashboard_queries(&repo);
    assert!(queries.len() >= 20, "the dashboard has {} queries", queries.len());
    // A rate needs two samples in its window: a short run may be over before the second
    // scrape, so the queries get a few scrape intervals (of the lingering endpoint) to fill.
    let start = Instant::now();
    let empty = loop {
        let mut empty = Vec::new();
        for (panel, expr) in &queries {
            let v = query(prom_port, expr);
            assert_eq!(v["status"], "success", "{panel}: {expr}: {v}");
            if v["data"]["result"].as_array().is_none_or(Vec::is_empty) {
                empty.push(format!("{panel}: {expr}"));
            }
        }
        if empty.is_empty() || start.elapsed() > Duration::from_secs(30) {
            break empty;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    assert!(empty.is_empty(), "queries without data:\n{}", empty.join("\n"));
    // Per-worker series carry both workers.
    let per_worker = query(prom_port, &format!("lorafleet_worker_up{{run_id=\"{RUN_ID}\"}}"));
    assert_eq!(per_worker["data"]["result"].as_array().unwrap().len(), 2, "{per_worker}");
    drop(coordinator);
}
