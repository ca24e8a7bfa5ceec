//! The `coordinator` binary as a user runs it, on the fixtures in `tests/fixtures/` and the
//! embedded demo.

mod data;
mod demo;
mod distributed;
mod eval;
mod generate;
mod packing;
mod prometheus;
mod recovery;
mod resume;
mod train;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-llama")
}

pub fn coordinator(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_coordinator")).args(args).output().expect("running coordinator")
}

pub fn ok_stdout(args: &[&str]) -> String {
    let out = coordinator(args);
    assert!(out.status.success(), "coordinator {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
