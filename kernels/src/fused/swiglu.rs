//! The SwiGLU of Llama's MLP, `m = silu(e) ⊙ g`, reading gate and up from one buffer.
//!
//! The engine computes gate and up with one fused GEMM into `[N, 2f]` (gate in columns
//! `0..f`, up in `f..2f`), so the op reads both halves of each row from there, and its
//! backward writes `(de | dg)` in the same layout, ready for the one fused GEMM back.
//! The forward saves nothing beyond that buffer, which the engine keeps.
//!
//! `silu(e) = e / (1 + exp(−e))`: the formula of candle-core 0.11.1's CPU `silu` (op.rs,
//! `UnaryOpT for Silu`), with the vectorizable [`super::math::exp`] (within 2 ulp of libm's)
//! in place of `f32::exp`: the forward equals the reference to a few ulp.

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::simd::vectorized;

/// Rows from which a pass is split over the rayon pool.
const PAR_ROWS: usize = 64;

/// Rows of `eg` (`[N, 2f]`) for an output of `m_len` values (`[N, f]`), checking lengths.
fn rows(eg_len: usize, f: usize, m_len: usize) -> usize {
    assert!(eg_len == 2 * m_len, "swiglu: gate|up buffer of {eg_len} for an output of {m_len}");
    if f == 0 {
        assert!(m_len == 0, "swiglu: f = 0 with {m_len} outputs");
        return 0;
    }
    assert!(m_len.is_multiple_of(f), "swiglu: {m_len} outputs are not rows of {f}");
    m_len / f
}

/// `m = silu(e) ⊙ g`, with `e`, `g` read from one `[N, 2f]` buffer (gate in columns
/// `0..f`, up in `f..2f`) — the layout the fused gate|up GEMM writes; `m` is `[N, f]`.
/// Overwrites `m`.
pub fn forward(eg: &[f32], f: usize, m: &mut [f32]) {
    if rows(eg.len(), f, m.len()) == 0 {
        return;
    }
    let row = |(m, eg): (&mut [f32], &[f32])| {
        let (e, g) = eg.split_at(f);
        vectorized(|| {
            for ((o, &e), &g) in m.iter_mut().zip(e).zip(g) {
                *o = e / (1.0 + super::math::exp(-e)) * g;
            }
        })
    };
    if m.len() / f >= PAR_ROWS {
        m.par_chunks_mut(f).zip(eg.par_chunks(2 * f)).for_each(row);
    } else {
        m.chunks_mut(f).zip(eg.chunks(2 * f)).for_each(row);
    }
}

/// Given `dm` (`[N, f]`), overwrites `deg` (`[N, 2f]`) with `(de | dg)`:
/// `de = dm ⊙ g ⊙ σ(e) ⊙ (1 + e ⊙ (1 − σ(e)))` (the derivative of silu), `dg = dm ⊙ silu(e)`.
/// `σ` and `silu` share one `1 + exp(−e)`; for very negative `e` it is `inf`, and both are 0.
pub fn backward(eg: &[f32], f: usize, dm: &[f32], deg: &mut [f32]) {
    let n = rows(eg.len(), f, dm.len());
    assert!(deg.len() == eg.len(), "swiglu backward: gradient buffer of {} for {}", deg.len(), eg.len());
    if n == 0 {
        return;
    }
    let row = |((deg, eg), dm): ((&mut [f32], &[f32]), &[f32])| {
        let (e, g) = eg.split_at(f);
        let (de, dg) = deg.split_at_mut(f);
        vectorized(|| {
            for ((((de, dg), &e), &g), &d) in de.iter_mut().zip(dg).zip(e).zip(g).zip(dm) {
                let denom = 1.0 + super::math::exp(-e);
                let (sig, silu) = (1.0 / denom, e / denom);
                *de = d * g * sig * (1.0 + e * (1.0 - sig));
                *dg = d * silu;
            }
        })
    };
    if n >= PAR_ROWS {
        deg.par_chunks_mut(2 * f).zip(eg.par_chunks(2 * f)).zip(dm.par_chunks(f)).for_each(row);
    } else {
        deg.chunks_mut(2 * f).zip(eg.chunks(2 * f)).zip(dm.chunks(f)).for_each(row);
    }
}

/// The same maths as candle tensor ops: `silu(e) * g` for `e`, `g` of one shape.
pub fn reference(e: &Tensor, g: &Tensor) -> Result<Tensor> {
    e.silu()? * g
}
