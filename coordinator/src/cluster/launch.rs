//! `--workers N` without `--listen`: N worker processes on this machine, on loopback.

use anyhow::{Context, Result};
use std::path::PathBuf;
use tokio::process::{Child, Command};

/// The `worker` binary: `LORAFLEET_WORKER_BIN`, else the one beside this executable.
fn worker_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("LORAFLEET_WORKER_BIN") {
        return Ok(PathBuf::from(p));
    }
    let me = std::env::current_exe().context("locating the coordinator executable")?;
    let path = me.with_file_name(format!("worker{}", std::env::consts::EXE_SUFFIX));
    anyhow::ensure!(
        path.is_file(),
        "{} not found: build it with `cargo build -p lorafleet-coordinator` (or set LORAFLEET_WORKER_BIN)",
        path.display()
    );
    Ok(path)
}

/// Starts local worker `i` of `n` under `name`, joining `join` (a join string). On CPU each
/// gets an equal share of the cores (rayon and gemm threads); with a CUDA device worker i
/// takes GPU i. Its standard input is a pipe the caller must keep open for as long as the
/// worker may live (`worker --exit-with-stdin`).
pub fn spawn(i: usize, n: usize, name: &str, join: &str, device: &str) -> Result<Child> {
    let bin = worker_binary()?;
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let mut cmd = Command::new(&bin);
    cmd.arg("--join").arg(join).arg("--name").arg(name).kill_on_drop(true);
    cmd.arg("--exit-with-stdin").stdin(std::process::Stdio::piped());
    if device.starts_with("cuda") {
        cmd.arg("--device").arg(format!("cuda:{i}"));
    } else if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        cmd.env("RAYON_NUM_THREADS", (cores / n).max(1).to_string());
    }
    cmd.spawn().with_context(|| format!("starting {}", bin.display()))
}
