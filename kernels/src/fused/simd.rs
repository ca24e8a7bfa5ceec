//! The ops' elementwise loops compiled for the CPU's vector width, chosen at run time.
//!
//! Release builds target baseline x86-64 (SSE2, 4 lanes) so that one binary runs on every
//! machine. The loops of SwiGLU, RMSNorm, RoPE, the dropout masks and attention's softmax
//! are written for the compiler to vectorize; [`vectorized`] compiles the closure it is given
//! again for AVX2 + FMA and for AVX-512 (x86-64-v4: pulp's `Arch::dispatch` with its `x86-v4`
//! feature, the runtime detection the `gemm` crate uses for its own kernels) and runs the
//! widest copy the CPU has.
//! Rust never contracts `a * b + c` into a fused multiply-add and keeps the order of every
//! reduction, so both copies compute the same bits: the choice changes speed only
//! (`kernels/tests/fused_simd.rs` checks it). `LORAFLEET_SIMD=baseline` forces the baseline
//! copy, as [`force_baseline`] does.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

const UNSET: u8 = 0;
const BEST: u8 = 1;
const BASELINE: u8 = 2;

static MODE: AtomicU8 = AtomicU8::new(UNSET);

/// The instruction sets to compile for: the CPU's best, unless forced to the baseline.
fn arch() -> pulp::Arch {
    let mut mode = MODE.load(Ordering::Relaxed);
    if mode == UNSET {
        let baseline = std::env::var_os("LORAFLEET_SIMD").is_some_and(|v| v == "baseline");
        mode = if baseline { BASELINE } else { BEST };
        MODE.store(mode, Ordering::Relaxed);
    }
    if mode == BASELINE {
        pulp::Arch::Scalar
    } else {
        best()
    }
}

/// Whether the baseline instructions are forced (`LORAFLEET_SIMD=baseline` or
/// [`force_baseline`]): hand-written kernels that are not [`vectorized`] closures follow it
/// too (the dropout keystream then draws through `rand_chacha`).
pub(crate) fn baseline_forced() -> bool {
    matches!(arch(), pulp::Arch::Scalar)
}

/// The CPU's best instruction sets, detected once (the calls come once per row).
fn best() -> pulp::Arch {
    static BEST_ARCH: OnceLock<pulp::Arch> = OnceLock::new();
    *BEST_ARCH.get_or_init(pulp::Arch::new)
}

/// Runs every later [`vectorized`] call on the baseline instructions (`true`) or on the
/// CPU's best (`false`), whatever `LORAFLEET_SIMD` says: for tests and benchmarks.
pub fn force_baseline(on: bool) {
    MODE.store(if on { BASELINE } else { BEST }, Ordering::Relaxed);
}

/// Runs `f`, compiled for the widest vector instructions this CPU has. Everything `f` calls
/// must be inlined into it (`#[inline(always)]`, or generic iterator code) to be compiled
/// that way; a call that is not inlined runs the baseline copy.
#[inline(always)]
pub fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    arch().dispatch(f)
}
