//! What the narrow micro-kernels ([`super::bf16`], [`super::int8`]) share: the switch that
//! forces their f32 fallbacks, and the loop nest that hands them micro-tiles of C.
//!
//! The loop nest splits C into `MC × NC` tasks for the pool; each task walks its k-blocks in
//! order, so every element of C sums its blocks in the same order whatever the thread count
//! (deterministic results), and within a block it visits micro-tiles of `MR` rows by up to
//! `NP` panels of 16 columns: 8 × 3 vector accumulators, 3 B vectors and one broadcast fit in
//! the 32 vector registers of AVX-512.

use rayon::prelude::*;
use std::sync::atomic::{AtomicU8, Ordering};

/// Output columns per panel (one 512-bit vector of 32-bit lanes).
pub(crate) const PANEL: usize = 16;
/// Rows of C per micro-tile.
pub(crate) const MR: usize = 8;
/// Panels per micro-tile.
pub(crate) const NP: usize = 3;
/// Rows and columns of C per task.
const MC: usize = 64;
const NC: usize = NP * PANEL * 4;

const AUTO: u8 = 0;
const NARROW: u8 = 1;
const FALLBACK: u8 = 2;
static MODE: AtomicU8 = AtomicU8::new(AUTO);

/// Whether the f32 fallbacks are forced: `LORAFLEET_NARROW=f32` (read once) or
/// [`force_fallback`].
pub fn forced() -> bool {
    let mut mode = MODE.load(Ordering::Relaxed);
    if mode == AUTO {
        let f32_only = std::env::var_os("LORAFLEET_NARROW").is_some_and(|v| v == "f32");
        mode = if f32_only { FALLBACK } else { NARROW };
        MODE.store(mode, Ordering::Relaxed);
    }
    mode == FALLBACK
}

/// Makes later products of every narrow kind use their f32 fallbacks (`true`) or the CPU's
/// best (`false`), whatever `LORAFLEET_NARROW` says: for tests and benchmarks.
pub fn force_fallback(on: bool) {
    MODE.store(if on { FALLBACK } else { NARROW }, Ordering::Relaxed);
}

/// One micro-tile of C: rows `i..i + rows` (`rows ≤ MR`), columns `j..j + cols`
/// (`cols ≤ NP·16`), over reduction units `k0..k0 + kn` (pairs for bf16, quads for int8).
#[derive(Clone, Copy, Debug)]
pub(crate) struct MicroTile {
    pub i: usize,
    pub rows: usize,
    pub j: usize,
    pub cols: usize,
    pub k0: usize,
    pub kn: usize,
}

impl MicroTile {
    /// Panels of 16 columns the tile covers (1 to `NP`).
    pub fn panels(&self) -> usize {
        self.cols.div_ceil(PANEL)
    }
}

/// Calls `f` on every micro-tile of an `m × n` C over `units` reduction units taken `kc` at
/// a time; tasks run on the pool, each tile's k-blocks in increasing order.
pub(crate) fn for_each_micro_tile(m: usize, n: usize, units: usize, kc: usize, f: impl Fn(MicroTile) + Sync) {
    let (tm, tn) = (m.div_ceil(MC), n.div_ceil(NC));
    (0..tm * tn).into_par_iter().for_each(|t| {
        let (i0, j0) = ((t / tn) * MC, (t % tn) * NC);
        let (mi, nj) = (MC.min(m - i0), NC.min(n - j0));
        for k0 in (0..units).step_by(kc) {
            let kn = kc.min(units - k0);
            for jj in (0..nj).step_by(NP * PANEL) {
                let cols = (NP * PANEL).min(nj - jj);
                for ii in (0..mi).step_by(MR) {
                    f(MicroTile { i: i0 + ii, rows: MR.min(mi - ii), j: j0 + jj, cols, k0, kn });
                }
            }
        }
    });
}

/// C's pointer, for the pool's threads (each writes its own tiles: see
/// [`for_each_micro_tile`]).
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub *mut f32);
// SAFETY: tasks write disjoint tiles of C.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The pointer moved by `offset` elements (a method, so that closures capture the
    /// `Sync` wrapper, not the field).
    pub fn at(&self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// The mask of the first `valid` of 16 lanes.
pub(crate) fn lanes(valid: usize) -> u16 {
    if valid >= PANEL {
        u16::MAX
    } else {
        (1u16 << valid) - 1
    }
}
