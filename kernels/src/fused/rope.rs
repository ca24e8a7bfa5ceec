//! Rotary position embedding in transformers' non-interleaved ("rotate_half") layout,
//! applied in place to heads inside a wider token-major buffer.
//!
//! The engine keeps q | k | v side by side in one `[N, (H + 2·Hkv) · head_dim]` buffer (the
//! layout the fused projection writes) and rotates q and k where they lie, so a call names
//! the row stride and the first column of its heads. Each token carries its own position,
//! so packed sequences simply restart theirs at 0. Rotation is orthogonal: the backward is
//! the same call with `inverse` set (rotation by −θ), and the op saves nothing.
//!
//! The arithmetic is that of [`crate::Rope`]: `o[j] = a·c[j] − b·s[j]`,
//! `o[j + half] = b·c[j] + a·s[j]` with `a = x[j]`, `b = x[j + half]`; the inverse uses
//! `−s`, which rounds identically to swapping the signs.

use candle_core::{Result, Tensor, D};
use rayon::prelude::*;

/// Rows from which the rotation is split over the rayon pool.
const PAR_ROWS: usize = 64;

/// Rotates, in place, `heads` heads of `head_dim` values per token of `x` (`[N, row_stride]`:
/// the heads occupy columns `col0..col0 + heads·head_dim` of each row), token `i` at position
/// `positions[i]`. `cos`/`sin` are `[max_pos, head_dim / 2]` tables; `inverse` rotates by −θ
/// (the backward: the gradient of the rotated values, rotated back, is that of the input).
///
/// Panics on inconsistent lengths, an odd `head_dim` or a position outside the tables.
#[allow(clippy::too_many_arguments)] // the engine's call sites name every one of these.
pub fn apply(
    x: &mut [f32],
    row_stride: usize,
    col0: usize,
    heads: usize,
    head_dim: usize,
    positions: &[u32],
    cos: &[f32],
    sin: &[f32],
    inverse: bool,
) {
    assert!(head_dim.is_multiple_of(2), "rope: odd head_dim {head_dim}");
    let half = head_dim / 2;
    let width = heads * head_dim;
    assert!(col0 + width <= row_stride, "rope: columns {col0}..{} outside rows of {row_stride}", col0 + width);
    assert!(
        x.len() == positions.len() * row_stride,
        "rope: {} values for {} rows of {row_stride}",
        x.len(),
        positions.len()
    );
    assert!(cos.len() == sin.len(), "rope: cos {} and sin {} tables differ", cos.len(), sin.len());
    if width == 0 || positions.is_empty() {
        return;
    }
    assert!(cos.len().is_multiple_of(half), "rope: tables of {} values are not rows of {half}", cos.len());
    let max_pos = cos.len() / half;
    let row = |(row, &p): (&mut [f32], &u32)| {
        let p = p as usize;
        assert!(p < max_pos, "rope: position {p} outside tables of {max_pos}");
        let (c, s) = (&cos[p * half..(p + 1) * half], &sin[p * half..(p + 1) * half]);
        super::simd::vectorized(|| {
            for head in row[col0..col0 + width].chunks_exact_mut(head_dim) {
                let (lo, hi) = head.split_at_mut(half);
                for (((a, b), &c), &s) in lo.iter_mut().zip(hi.iter_mut()).zip(c).zip(s) {
                    let s = if inverse { -s } else { s };
                    let (x1, x2) = (*a, *b);
                    *a = x1 * c - x2 * s;
                    *b = x2 * c + x1 * s;
                }
            }
        })
    };
    if positions.len() >= PAR_ROWS {
        x.par_chunks_mut(row_stride).zip(positions.par_iter()).for_each(row);
    } else {
        x.chunks_mut(row_stride).zip(positions.iter()).for_each(row);
    }
}

/// The same rotation as candle tensor ops: `x` is `[N, heads · head_dim]`, `cos`/`sin` the
/// `[max_pos, head_dim / 2]` tables, token `i` at `positions[i]`:
/// `x · [c, c] + rotate_half(x) · [s, s]` per head, in the dtype of `x`.
pub fn reference(x: &Tensor, positions: &[u32], cos: &Tensor, sin: &Tensor, head_dim: usize) -> Result<Tensor> {
    let (n, width) = x.dims2()?;
    let half = head_dim / 2;
    let idx = Tensor::new(positions, x.device())?;
    let table = |t: &Tensor| -> Result<Tensor> {
        let t = t.index_select(&idx, 0)?.to_dtype(x.dtype())?;
        Tensor::cat(&[&t, &t], D::Minus1)?.unsqueeze(1)
    };
    let (c, s) = (table(cos)?, table(sin)?);
    let x = x.reshape((n, width / head_dim, head_dim))?;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    (x.broadcast_mul(&c)? + rotated.broadcast_mul(&s)?)?.reshape((n, width))
}
