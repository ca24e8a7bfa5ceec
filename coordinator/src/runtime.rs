//! Process-level helpers shared by the subcommands: logging, dtype and size parsing (devices
//! and model loading are `lorafleet_worker::device`).

use anyhow::{bail, Context, Result};
use candle_core::DType;

/// Logs go to stderr so that stdout carries only results (generated text, JSON).
pub fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("LORAFLEET_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
}

/// `f32`, `f16`, `bf16` (and transformers' long names).
pub fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s {
        "f32" | "float32" => DType::F32,
        "f16" | "float16" => DType::F16,
        "bf16" | "bfloat16" => DType::BF16,
        other => bail!("dtype {other:?}: expected f32, f16 or bf16"),
    })
}

/// `5GB`, `500MB`, `1024` (bytes); decimal units as transformers' `max_shard_size`.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let (num, mult) = [("GB", 1_000_000_000u64), ("MB", 1_000_000), ("KB", 1_000), ("B", 1)]
        .iter()
        .find_map(|(suffix, m)| t.strip_suffix(suffix).map(|n| (n, *m)))
        .unwrap_or((t, 1));
    let n: f64 = num.trim().parse().with_context(|| format!("size {s:?}: expected e.g. 5GB, 500MB or a byte count"))?;
    if n.is_nan() || n <= 0.0 {
        bail!("size {s:?} must be positive");
    }
    Ok((n * mult as f64) as u64)
}
