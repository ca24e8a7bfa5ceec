//! Where the engine's time goes, op by op: wall time per op kind, summed over a run and
//! printed when the engine is dropped, if `LORAFLEET_PROFILE` is set (off otherwise, at the
//! cost of one relaxed load per op): to stderr, or appended to the file it names when its
//! value holds a `/` (for runs whose stderr is not a terminal, such as the bench's children).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// The op kinds timed.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Op {
    Embed,
    Norm,
    LinearForward,
    LinearBackward,
    Rope,
    AttentionForward,
    AttentionBackward,
    Swiglu,
    Residual,
    Head,
}

const NAMES: [&str; 10] = [
    "embedding gather",
    "rms norm (fwd + bwd)",
    "linear + LoRA forward (GEMM)",
    "linear + LoRA backward (GEMM)",
    "rope (fwd + bwd)",
    "attention forward",
    "attention backward",
    "swiglu (fwd + bwd)",
    "residual adds",
    "head + cross-entropy (GEMM)",
];

static NANOS: [AtomicU64; 10] = [const { AtomicU64::new(0) }; 10];

fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("LORAFLEET_PROFILE").is_some())
}

/// Runs `f`, adding its wall time to `op` when profiling is on.
pub(crate) fn time<R>(op: Op, f: impl FnOnce() -> R) -> R {
    if !enabled() {
        return f();
    }
    let start = Instant::now();
    let r = f();
    NANOS[op as usize].fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    r
}

/// Prints the table (seconds and share per op, and the GEMM share) to stderr, when on.
pub(crate) fn report() {
    if !enabled() {
        return;
    }
    use std::fmt::Write;
    let secs: Vec<f64> = NANOS.iter().map(|n| n.load(Ordering::Relaxed) as f64 * 1e-9).collect();
    let total: f64 = secs.iter().sum();
    let mut out = format!("engine profile ({total:.3} s in ops):\n");
    for (name, s) in NAMES.iter().zip(&secs) {
        let _ = writeln!(out, "  {name:<34} {s:>8.3} s {:>6.1}%", 100.0 * s / total.max(1e-12));
    }
    let gemm = secs[Op::LinearForward as usize] + secs[Op::LinearBackward as usize] + secs[Op::Head as usize];
    let _ =
        writeln!(out, "  GEMM-bound ops                     {gemm:>8.3} s {:>6.1}%", 100.0 * gemm / total.max(1e-12));
    match std::env::var("LORAFLEET_PROFILE") {
        Ok(path) if path.contains('/') => {
            let file = std::fs::OpenOptions::new().create(true).append(true).open(&path);
            if let Err(e) = file.and_then(|mut f| std::io::Write::write_all(&mut f, out.as_bytes())) {
                eprintln!("LORAFLEET_PROFILE: cannot write {path}: {e}");
            }
        }
        _ => eprint!("{out}"),
    }
}
