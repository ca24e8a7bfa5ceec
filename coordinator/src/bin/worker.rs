//! `worker`: one data-parallel replica, joining a coordinator (`worker --join ...`).
//!
//! The logic lives in `lorafleet_worker::node`; the binary ships from the coordinator's
//! package so that one build gives both halves and the coordinator finds its workers beside
//! itself.

use clap::Parser;
use std::process::ExitCode;

#[path = "../alloc.rs"]
mod alloc;

fn main() -> ExitCode {
    alloc::keep_freed_memory();
    let filter = tracing_subscriber::EnvFilter::try_from_env("LORAFLEET_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
    match lorafleet_worker::node::run(lorafleet_worker::node::Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("worker: error: {e}");
            ExitCode::FAILURE
        }
    }
}
