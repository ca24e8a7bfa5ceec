//! The PyTorch + PEFT side of `coordinator bench`: checks the `--reference-python`
//! interpreter, runs `tools/peft_bench.py` / `tools/peft_demo_train.py` in their own processes,
//! and holds the figures recorded on the development machine for runs without an interpreter.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A PyTorch + PEFT figure recorded on a 2-vCPU machine of our kind.
struct Recorded {
    workload: &'static str,
    batches: &'static str,
    checkpointing: &'static str,
    tokens_per_second: f64,
    peak_rss_mib: Option<f64>,
    source: &'static str,
}

const RECORDED: [Recorded; 3] = [
    Recorded {
        workload: "58m",
        batches: "random",
        checkpointing: "off",
        tokens_per_second: 650.0,
        peak_rss_mib: Some(2330.0),
        source: "../shared/bench/peft_cpu_bench.md, median of 4 runs, sdpa",
    },
    Recorded {
        workload: "58m",
        batches: "random",
        checkpointing: "on",
        tokens_per_second: 560.0,
        peak_rss_mib: Some(1870.0),
        source: "../shared/bench/peft_cpu_bench.md, median of 5 runs, sdpa",
    },
    Recorded {
        workload: "demo",
        batches: "demo",
        checkpointing: "off",
        tokens_per_second: 8737.0,
        peak_rss_mib: None,
        source: "demo/README.md, all 324 steps, wall time of the whole run",
    },
];

/// The recorded figure for a configuration, if any: (tokens/s, peak RSS, source).
pub fn recorded(workload: &str, batches: &str, ckpt: &str) -> Option<(f64, Option<f64>, &'static str)> {
    RECORDED
        .iter()
        .find(|r| r.workload == workload && r.batches == batches && r.checkpointing == ckpt)
        .map(|r| (r.tokens_per_second, r.peak_rss_mib, r.source))
}

/// What one PyTorch step run trains with, beside the model and the batch.
#[derive(Clone, Copy, Debug)]
pub struct StepRun {
    /// Load the model folder's weights (`--same-weights`) instead of a random init.
    pub load: bool,
    /// Activation checkpointing.
    pub ckpt: bool,
    /// LoRA rank, alpha and dropout.
    pub lora: (usize, f64, f64),
}

/// A `--reference-python` interpreter that imports torch, transformers and peft.
pub struct Reference {
    pub python: PathBuf,
    pub threads: usize,
    /// `{"python", "torch", "transformers", "peft"}` versions.
    pub versions: Value,
}

fn tools_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools");
    dir.canonicalize().unwrap_or(dir)
}

impl Reference {
    /// Checks that `python` runs and imports torch, transformers and peft.
    pub fn new(python: &Path, threads: usize) -> Result<Self> {
        let r = Self { python: python.to_path_buf(), threads, versions: Value::Null };
        let probe = "import json, platform, torch, transformers, peft; print(json.dumps({'python': \
                     platform.python_version(), 'torch': torch.__version__, 'transformers': \
                     transformers.__version__, 'peft': peft.__version__}))";
        let out = r
            .command()
            .args(["-c", probe])
            .output()
            .with_context(|| format!("--reference-python {}: cannot run it", python.display()))?;
        if !out.status.success() {
            bail!(
                "--reference-python {}: cannot import torch, transformers and peft (install them into that \
                 environment: pip install torch transformers==5.24.0 peft==0.21.2):\n{}",
                python.display(),
                tail(&String::from_utf8_lossy(&out.stderr), 12)
            );
        }
        let versions = last_json(&out.stdout).with_context(|| format!("--reference-python {}", python.display()))?;
        for script in ["peft_bench.py", "peft_demo_train.py"] {
            let p = tools_dir().join(script);
            anyhow::ensure!(p.is_file(), "the reference script {} is missing", p.display());
        }
        Ok(Self { versions, ..r })
    }

    /// The interpreter with the reference environment: `threads` for OpenMP and MKL, no
    /// OpenBLAS tuning variables (torch uses MKL; they are for our side's machine set-up).
    fn command(&self) -> Command {
        let mut c = Command::new(&self.python);
        c.env("OMP_NUM_THREADS", self.threads.to_string())
            .env("MKL_NUM_THREADS", self.threads.to_string())
            .env("HF_HUB_OFFLINE", "1")
            .env("TRANSFORMERS_VERBOSITY", "error")
            .env("TOKENIZERS_PARALLELISM", "false")
            .env_remove("OPENBLAS_CORETYPE")
            .env_remove("OPENBLAS_L2_SIZE");
        c
    }

    /// `tools/peft_bench.py` on the model shape of `model`'s config.json (its weights too with
    /// `run.load`) and the batch of `batch_file`, on `device` (`cpu`, `cuda[:N]`).
    pub fn step(
        &self,
        model: &Path,
        batch_file: &Path,
        run: StepRun,
        device: &str,
        steps: usize,
        warmup: usize,
    ) -> Result<Value> {
        let StepRun { load, ckpt, lora } = run;
        let mut c = self.command();
        c.arg(tools_dir().join("peft_bench.py"))
            .args(["--json", "--threads", &self.threads.to_string(), "--grad-ckpt", if ckpt { "on" } else { "off" }])
            .args(["--steps", &steps.to_string(), "--warmup", &warmup.to_string(), "--device", device])
            .arg(if load { "--weights" } else { "--config" })
            .arg(if load { model.to_path_buf() } else { model.join("config.json") })
            .arg("--batch-file")
            .arg(batch_file)
            .args(["--lora-r", &lora.0.to_string(), "--lora-alpha", &lora.1.to_string()])
            .args(["--lora-dropout", &lora.2.to_string()]);
        run_json(c, "tools/peft_bench.py")
    }

    /// `tools/peft_demo_train.py` for `steps` optimizer steps.
    pub fn demo(&self, steps: usize, warmup: usize) -> Result<Value> {
        let mut c = self.command();
        c.arg(tools_dir().join("peft_demo_train.py"))
            .arg("--demo-dir")
            .arg(crate::train_args::demo_dir())
            .args(["--json", "--threads", &self.threads.to_string()])
            .args(["--max-steps", &steps.to_string(), "--warmup", &warmup.to_string()]);
        run_json(c, "tools/peft_demo_train.py")
    }
}

/// Runs `c` and returns the last JSON object line of its stdout; a failure shows the end of
/// its output.
pub fn run_json(mut c: Command, what: &str) -> Result<Value> {
    let out = c.output().with_context(|| format!("starting {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}\n{}",
            out.status,
            tail(&String::from_utf8_lossy(&out.stdout), 6),
            tail(&String::from_utf8_lossy(&out.stderr), 20)
        );
    }
    last_json(&out.stdout).with_context(|| {
        format!("{what}: no JSON result line in its output:\n{}", tail(&String::from_utf8_lossy(&out.stdout), 6))
    })
}

fn last_json(stdout: &[u8]) -> Result<Value> {
    let text = String::from_utf8_lossy(stdout);
    let line = text.lines().rev().find(|l| l.trim_start().starts_with('{')).context("no JSON line")?;
    Ok(serde_json::from_str(line)?)
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
