//! The frozen output head fused with the cross-entropy at scored positions, with the
//! gradient to the hidden states computed during the forward (Liger-Kernel / llm.c style).
//!
//! The loss is a sum of per-row terms and the last op of the step, so `d(loss sum)/dz` is
//! known as soon as a row's logits are: `softmax(z) − onehot(target)`. Each chunk of rows
//! therefore computes its logits once into a reused scratch buffer, reads the loss off them,
//! overwrites them with their gradient and multiplies that by the head into `dh`; no logits
//! outlive their chunk and none are recomputed (the candle op in [`crate::lm_head_cross_entropy`]
//! recomputes them in its backward). The gradient is for a loss scale of 1: a mean or an
//! all-reduce normalisation is applied to `dh` afterwards.
//!
//! The per-row maths is that of the candle op, `lse = ln Σ exp(z − max) + max` and
//! `loss = lse − z[target]` with f32 logits and exponentials, except that the sum of the
//! exponentials (and the log of it) is taken in f64, in column order.

use super::gemm::{matmul, MatMut, MatRef, Par};
use candle_core::{Result, Tensor, D};
use rayon::prelude::*;

/// Bytes of f32 logits per chunk. The head weight is streamed through the cache once per
/// chunk (twice: logits and dH), so chunks must be tall: with 8 MiB (65 rows of a 32k
/// vocabulary) the head of the 58M bench took 826 ms a step, with 32 MiB (262 rows) 506 ms.
const CHUNK_BYTES: usize = 32 << 20;

/// Logit values from which a chunk's row pass is split over the rayon pool.
const PAR_VALUES: usize = 1 << 15;

/// Rows per chunk for a vocabulary: 32 MiB of f32 logits, at least 1.
pub fn chunk_rows(vocab: usize) -> usize {
    (CHUNK_BYTES / (4 * vocab.max(1))).max(1)
}

/// One row of logits `z` against `target`: returns its loss and overwrites `z` with
/// `softmax(z) − onehot(target)`.
///
/// The exponentials are f32 (`exp(z − max)`, as the candle op) but their sum runs in f64: a
/// sequential f32 sum over a 32k vocabulary is off by ~1e-5 relative (candle's vectorised
/// sum by less), which scales every probability of the row and showed up as a 1e-5 error
/// in `dh`; in f64 the row's error is that of its f32 terms.
fn row_loss_and_grad(z: &mut [f32], target: usize) -> f32 {
    super::simd::vectorized(|| row_body(z, target))
}

/// The body of [`row_loss_and_grad`], compiled for the CPU's vector width there.
#[inline(always)]
fn row_body(z: &mut [f32], target: usize) -> f32 {
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let zt = z[target];
    let mut sum = 0f64;
    super::math::exp_shifted(z, max);
    for v in z.iter() {
        sum += f64::from(*v);
    }
    let inv = (1.0 / sum) as f32;
    for v in z.iter_mut() {
        *v *= inv;
    }
    z[target] -= 1.0;
    (sum.ln() + f64::from(max) - f64::from(zt)) as f32
}

/// Loss sum over the rows of hidden states `h` (`[n, d]`, `n = targets.len()`) through the
/// frozen head `w` (`[vocab, d]`) against `targets`; overwrites `dh` (`[n, d]`) with
/// `d(loss sum)/dh` (none: evaluation, the loss alone). Rows are processed in chunks of [`chunk_rows`]`(vocab)` whose logits
/// live in `scratch` (grown once to the largest chunk, plus one loss per row, and reused
/// across calls); the logits of a step are computed once and never kept.
///
/// The per-row f32 losses are added into the f64 sum in row order, so the result does not
/// depend on the thread count. Panics on inconsistent lengths or a target `≥ vocab` (engine
/// bugs: the engine checks every target against the vocabulary when it packs a batch).
pub fn forward_backward(
    h: &[f32],
    w: &[f32],
    vocab: usize,
    targets: &[u32],
    mut dh: Option<&mut [f32]>,
    scratch: &mut Vec<f32>,
) -> f64 {
    assert!(vocab > 0 && w.len().is_multiple_of(vocab), "head loss: head of {} values is not {vocab} rows", w.len());
    let d = w.len() / vocab;
    let n = targets.len();
    let dh_len = dh.as_ref().map_or(h.len(), |dh| dh.len());
    assert!(h.len() == n * d && dh_len == h.len(), "head loss: h {} / dh {dh_len} for {n} rows of {d}", h.len());
    if let Some(bad) = targets.iter().find(|&&t| t as usize >= vocab) {
        panic!("head loss: target {bad} outside a vocabulary of {vocab}");
    }
    let chunk = chunk_rows(vocab).min(n);
    let need = chunk * (vocab + 1);
    if scratch.len() < need {
        scratch.resize(need, 0.0);
    }
    let wt = MatRef::new(w, vocab, d);
    let mut total = 0f64;
    for r0 in (0..n).step_by(chunk.max(1)) {
        let m = chunk.min(n - r0);
        let (logits, losses) = scratch.split_at_mut(chunk * vocab);
        let (logits, losses) = (&mut logits[..m * vocab], &mut losses[..m]);
        matmul(
            MatMut::new(logits, m, vocab),
            MatRef::new(&h[r0 * d..(r0 + m) * d], m, d),
            wt.t(),
            1.0,
            false,
            Par::Pool,
        );
        let rows = &targets[r0..r0 + m];
        let row = |((z, loss), &t): ((&mut [f32], &mut f32), &u32)| *loss = row_loss_and_grad(z, t as usize);
        if m > 1 && m * vocab >= PAR_VALUES {
            logits.par_chunks_mut(vocab).zip(losses.par_iter_mut()).zip(rows.par_iter()).for_each(row);
        } else {
            logits.chunks_mut(vocab).zip(losses.iter_mut()).zip(rows.iter()).for_each(row);
        }
        for &l in losses.iter() {
            total += f64::from(l);
        }
        if let Some(dh) = dh.as_deref_mut() {
            let dh = MatMut::new(&mut dh[r0 * d..(r0 + m) * d], m, d);
            matmul(dh, MatRef::new(logits, m, vocab), wt, 1.0, false, Par::Pool);
        }
    }
    total
}

/// Per-row losses `[n]` of hidden states `h` (`[n, d]`) through the head `w` (`[vocab, d]`)
/// against `targets`, as candle tensor ops in one piece (no chunking): logits in f32 for
/// f32 and narrower inputs (f64 for f64), `ln Σ exp(z − max) + max − z[target]`. The max is
/// detached: it is a constant shift whose gradient is identically zero.
pub fn reference(h: &Tensor, w: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let z = h.matmul(&w.t()?)?.to_dtype(crate::accum_dtype(h.dtype()))?;
    let idx = Tensor::from_slice(targets, (targets.len(), 1), h.device())?;
    let max = z.max_keepdim(D::Minus1)?.detach();
    let lse = (z.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + &max)?;
    (lse - z.gather(&idx, 1)?)?.squeeze(1)
}
