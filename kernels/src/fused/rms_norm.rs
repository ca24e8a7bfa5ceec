//! RMSNorm with a frozen weight over `[rows, hidden]` token-major activations:
//! `y = w ⊙ (x · rstd)`, `rstd = 1 / sqrt(mean(x²) + eps)`, gradient to x only.
//!
//! The arithmetic is that of [`crate::RmsNorm`] (matched against transformers'
//! `LlamaRMSNorm`): the sum of squares runs in f64, `rstd` is rounded to f32 once, and the
//! weight multiplies the normalised value (`w * (x * rstd)`, in that order). The forward saves
//! `rstd` (one f32 per row) so that the backward never recomputes the statistics.

use candle_core::{Result, Tensor, D};
use rayon::prelude::*;

use super::simd::vectorized;

/// Rows from which a pass is split over the rayon pool (below, one thread is cheaper).
const PAR_ROWS: usize = 64;

/// Hidden size of `x` for the weight `w`, checking the slice lengths (engine bugs).
fn hidden(x_len: usize, w: &[f32]) -> usize {
    let h = w.len();
    assert!(h > 0 && x_len.is_multiple_of(h), "rms_norm: {x_len} values are not rows of {h}");
    h
}

/// `y = w ⊙ x · rstd` per row, with `rstd` saved for [`backward`]. Overwrites `y`
/// (`[rows, hidden]`, like `x`) and `rstd` (`[rows]`); `hidden = w.len()`.
pub fn forward(x: &[f32], w: &[f32], eps: f64, y: &mut [f32], rstd: &mut [f32]) {
    let h = hidden(x.len(), w);
    let rows = x.len() / h;
    assert!(
        y.len() == x.len() && rstd.len() == rows,
        "rms_norm: y {} / rstd {} for x [{rows}, {h}]",
        y.len(),
        rstd.len()
    );
    let row = |((y, x), r): ((&mut [f32], &[f32]), &mut f32)| {
        let ss: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        let inv = (1.0 / (ss / h as f64 + eps).sqrt()) as f32;
        vectorized(|| {
            for ((o, &v), &wv) in y.iter_mut().zip(x).zip(w) {
                *o = wv * (v * inv);
            }
        });
        *r = inv;
    };
    if rows >= PAR_ROWS {
        y.par_chunks_mut(h).zip(x.par_chunks(h)).zip(rstd.par_iter_mut()).for_each(row);
    } else {
        y.chunks_mut(h).zip(x.chunks(h)).zip(rstd.iter_mut()).for_each(row);
    }
}

/// `dx += dL/dx` for the upstream gradient `dy`, given the forward's input `x` and saved
/// `rstd` (the weight is frozen, so x is the only gradient). Adds, so that the residual
/// stream's gradient can be accumulated in place.
///
/// With `gw = dy ⊙ w` and `r = rstd`: `dx = gw · r − x · r³ · Σ(gw ⊙ x) / H`. The dot
/// product `Σ(gw ⊙ x)` is accumulated in f64 (the same precision as the forward's sum of
/// squares; it costs nothing next to memory traffic), and the per-row coefficient
/// `r³ · dot / H` is rounded to f32 once.
pub fn backward(dy: &[f32], x: &[f32], w: &[f32], rstd: &[f32], dx: &mut [f32]) {
    let h = hidden(x.len(), w);
    let rows = x.len() / h;
    assert!(
        dy.len() == x.len() && dx.len() == x.len() && rstd.len() == rows,
        "rms_norm backward: dy {} / dx {} / rstd {} for x [{rows}, {h}]",
        dy.len(),
        dx.len(),
        rstd.len()
    );
    if rows >= PAR_ROWS {
        let it = dx.par_chunks_mut(h).zip(dy.par_chunks(h)).zip(x.par_chunks(h)).zip(rstd.par_iter());
        it.for_each(|(((dx, dy), x), &r)| backward_row(dx, dy, x, w, r));
    } else {
        let it = dx.chunks_mut(h).zip(dy.chunks(h)).zip(x.chunks(h)).zip(rstd.iter());
        it.for_each(|(((dx, dy), x), &r)| backward_row(dx, dy, x, w, r));
    }
}

/// [`backward`] for one row.
fn backward_row(dx: &mut [f32], dy: &[f32], x: &[f32], w: &[f32], r: f32) {
    let dot: f64 = dy.iter().zip(w).zip(x).map(|((&g, &wv), &v)| f64::from(g * wv) * f64::from(v)).sum();
    let r64 = f64::from(r);
    let coef = (r64 * r64 * r64 * dot / w.len() as f64) as f32;
    vectorized(|| {
        for (((d, &g), &wv), &v) in dx.iter_mut().zip(dy).zip(w).zip(x) {
            *d += g * wv * r - v * coef;
        }
    });
}

/// The same maths as candle tensor ops over the last dimension of `x` (`[..., hidden]`):
/// statistics in f32 for f32 and narrower inputs (f64 for f64), `x · rsqrt(mean(x²) + eps)`
/// cast back to the input dtype, then times the weight — transformers' `LlamaRMSNorm`.
pub fn reference(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let x32 = x.to_dtype(crate::accum_dtype(x.dtype()))?;
    let ms = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let y = x32.broadcast_mul(&(ms + eps)?.sqrt()?.recip()?)?.to_dtype(x.dtype())?;
    y.broadcast_mul(&w.to_dtype(x.dtype())?)
}
