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

use super::bf16::{Bf16Scratch, Bf16Weight};
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

/// The frozen output head `[vocab, d]`: f32, or bf16 (`torch_dtype = bf16`: both products
/// through the bf16 kernel, logits and their gradient still f32).
#[derive(Clone, Copy, Debug)]
pub enum Head<'a> {
    /// f32, row-major.
    F32(&'a [f32]),
    /// bf16, packed for both products.
    Bf16(Bf16Weight<'a>),
}

impl Head<'_> {
    /// `[vocab, d]`; panics when an f32 head is not a whole number of `vocab` rows.
    fn dims(&self, vocab: usize) -> (usize, usize) {
        match self {
            Head::F32(w) => {
                assert!(
                    vocab > 0 && w.len().is_multiple_of(vocab),
                    "head loss: head of {} values is not {vocab} rows",
                    w.len()
                );
                (vocab, w.len() / vocab)
            }
            Head::Bf16(w) => w.dims(),
        }
    }

    /// `z = h·Wᵀ`.
    fn logits(&self, h: MatRef<'_>, z: MatMut<'_>, narrow: &mut Bf16Scratch) {
        match self {
            Head::F32(w) => {
                let (vocab, d) = (z.cols(), h.cols());
                matmul(z, h, MatRef::new(w, vocab, d).t(), 1.0, false, Par::Pool)
            }
            Head::Bf16(w) => w.forward(h, z, narrow),
        }
    }

    /// `dh = dz·W`.
    fn input_grad(&self, dz: MatRef<'_>, dh: MatMut<'_>, narrow: &mut Bf16Scratch) {
        match self {
            Head::F32(w) => {
                let (vocab, d) = (dz.cols(), dh.cols());
                matmul(dh, dz, MatRef::new(w, vocab, d), 1.0, false, Par::Pool)
            }
            Head::Bf16(w) => w.backward(dz, dh, false, narrow),
        }
    }
}

/// Reused buffers: one chunk of logits and its rows' losses, and the bf16 products' operands.
#[derive(Default, Debug)]
pub struct HeadScratch {
    logits: Vec<f32>,
    narrow: Bf16Scratch,
}

impl HeadScratch {
    /// f32 values held for logits and losses (they grow to the largest chunk, then stay).
    pub fn logit_values(&self) -> usize {
        self.logits.len()
    }
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
/// frozen head `head` (`[vocab, d]`) against `targets`; overwrites `dh` (`[n, d]`) with
/// `d(loss sum)/dh` (none: evaluation, the loss alone). Rows are processed in chunks of [`chunk_rows`]`(vocab)` whose logits
/// live in `scratch` (grown once to the largest chunk, plus one loss per row, and reused
/// across calls); the logits of a step are computed once and never kept.
///
/// The per-row f32 losses are added into the f64 sum in row order, so the result does not
/// depend on the thread count. Panics on inconsistent lengths or a target `≥ vocab` (engine
/// bugs: the engine checks every target against the vocabulary when it packs a batch).
pub fn forward_backward(
    h: &[f32],
    head: Head<'_>,
    vocab: usize,
    targets: &[u32],
    mut dh: Option<&mut [f32]>,
    scratch: &mut HeadScratch,
) -> f64 {
    let (rows, d) = head.dims(vocab);
    assert_eq!(rows, vocab, "head loss: a head of {rows} rows for a vocabulary of {vocab}");
    let n = targets.len();
    let dh_len = dh.as_ref().map_or(h.len(), |dh| dh.len());
    assert!(h.len() == n * d && dh_len == h.len(), "head loss: h {} / dh {dh_len} for {n} rows of {d}", h.len());
    if let Some(bad) = targets.iter().find(|&&t| t as usize >= vocab) {
        panic!("head loss: target {bad} outside a vocabulary of {vocab}");
    }
    let chunk = chunk_rows(vocab).min(n);
    let need = chunk * (vocab + 1);
    if scratch.logits.len() < need {
        scratch.logits.resize(need, 0.0);
    }
    let mut total = 0f64;
    for r0 in (0..n).step_by(chunk.max(1)) {
        let m = chunk.min(n - r0);
        let (logits, losses) = scratch.logits.split_at_mut(chunk * vocab);
        let (logits, losses) = (&mut logits[..m * vocab], &mut losses[..m]);
        let hm = MatRef::new(&h[r0 * d..(r0 + m) * d], m, d);
        head.logits(hm, MatMut::new(logits, m, vocab), &mut scratch.narrow);
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
            head.input_grad(MatRef::new(logits, m, vocab), dh, &mut scratch.narrow);
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
