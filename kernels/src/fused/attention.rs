//! Causal self-attention over packed variable-length sequences, with grouped-query heads
//! (GQA) and an optional sliding window, computed flash-attention style: the `[T, T]` score
//! matrix never exists whole, only `BQ × BK` blocks of it in per-task scratch.
//!
//! Layout (token-major, row-major `f32`): `n_seq` sequences packed back to back, sequence `s`
//! being tokens `cu_seqlens[s]..cu_seqlens[s + 1]` of `N = cu_seqlens[n_seq]`. `q` and `o` are
//! `[N, heads·head_dim]`, `k` and `v` are `[N, kv_heads·head_dim]`; query head `h` reads kv
//! head `h / (heads / kv_heads)` in place (K and V are never repeated per query head). Positions
//! restart in every sequence and no token attends across sequences: with local indices, key `j`
//! is visible to query `i` iff `j <= i` and, with a window `w`, `i - j < w` (transformers'
//! Mistral rule masks `i - j >= w`).
//!
//! Work is split into one task per (sequence, kv head); a task runs the query heads of its
//! group together, their rows packed into one matrix, so each product reads a K or V block
//! once for the group. A task owns, for its sequence, the rows
//! of `o`, `lse` and `dq` of the query heads of its group, and `dk`, `dv` of its kv head: every
//! output element has exactly one owner, each task runs sequentially in a fixed order, so the
//! result is bit-identical for any thread count and needs no atomics.
//!
//! Gradient plan (FlashAttention-2), with `S = scale·Q·Kᵀ`, `P = softmax(S)` (masked),
//! `O = P·V` and the saved `lse = logsumexp(S)` per row:
//! - `D_i = Σ_c dO_ic·O_ic` (the row dot product that the softmax backward needs);
//! - per block: `P = exp(S − lse)` recomputed, `dV += Pᵀ·dO`, `dP = dO·Vᵀ`,
//!   `dS = P∘(dP − D)·scale` (the gradient w.r.t. the raw `q·k`), `dQ += dS·K`, `dK += dSᵀ·Q`.

use std::marker::PhantomData;

use candle_core::{Result, Tensor, D};
use rayon::prelude::*;

use super::gemm::{matmul, MatMut, MatRef, Par};

/// Query rows per block: one block's `BQ × head_dim` accumulator and `BQ × BK` scores stay in
/// L1/L2 while the key blocks stream past.
const BQ: usize = 64;
/// Key rows per block: large enough that the products amortize `gemm`'s per-call cost, small
/// enough that causal blocks above the diagonal are skipped rather than computed and masked.
const BK: usize = 64;

/// Shape of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    /// Query heads (a multiple of `kv_heads`).
    pub heads: usize,
    /// Key/value heads; query head `h` reads kv head `h / (heads / kv_heads)`.
    pub kv_heads: usize,
    /// Features per head.
    pub head_dim: usize,
    /// Sliding window: query `i` sees keys `j` with `i - j < w` (and `j <= i`); `None` is plain causal.
    pub window: Option<usize>,
    /// Factor on `q·k` before the softmax (usually `1/sqrt(head_dim)`).
    pub scale: f32,
}

impl AttentionShape {
    /// Query heads per kv head; panics on an inconsistent shape (an engine bug).
    fn group(&self) -> usize {
        assert!(
            self.kv_heads > 0 && self.heads.is_multiple_of(self.kv_heads),
            "heads {} not a multiple of kv_heads {}",
            self.heads,
            self.kv_heads
        );
        assert!(self.window != Some(0), "a window of 0 hides every key");
        self.heads / self.kv_heads
    }

    /// The first key (local index) that query `i` sees.
    fn first_key(&self, i: usize) -> usize {
        self.window.map_or(0, |w| (i + 1).saturating_sub(w))
    }

    /// Columns `lo..hi` of the key block starting at `j0` (of `nk` keys) visible to query `i`.
    /// Masking is just these two bounds, so only edge blocks pay for it.
    fn visible_cols(&self, i: usize, j0: usize, nk: usize) -> (usize, usize) {
        let hi = (i + 1).saturating_sub(j0).min(nk);
        let lo = self.first_key(i).saturating_sub(j0).min(hi);
        (lo, hi)
    }
}

/// Checks the packing and every slice length against the shape; returns `N`.
fn check(shape: &AttentionShape, cu: &[usize], q: usize, kv: usize) -> usize {
    shape.group();
    assert!(!cu.is_empty() && cu[0] == 0 && cu.windows(2).all(|w| w[0] <= w[1]), "bad cu_seqlens {cu:?}");
    let n = cu[cu.len() - 1];
    assert_eq!(q, n * shape.heads * shape.head_dim, "q-shaped slice length");
    assert_eq!(kv, n * shape.kv_heads * shape.head_dim, "k/v-shaped slice length");
    n
}

/// The (sequence start, length, kv head) tasks, longest sequences first so that the causal
/// `T²` work balances better; empty sequences have no task.
fn tasks(shape: &AttentionShape, cu: &[usize]) -> Vec<(usize, usize, usize)> {
    let mut seqs: Vec<(usize, usize)> = cu.windows(2).map(|w| (w[0], w[1] - w[0])).filter(|s| s.1 > 0).collect();
    seqs.sort_by_key(|s| std::cmp::Reverse(s.1));
    seqs.iter().flat_map(|&(a, t)| (0..shape.kv_heads).map(move |g| (a, t, g))).collect()
}

/// An output buffer that parallel tasks write through a raw pointer, each at its own elements.
///
/// Tasks' regions are strided and interleave (heads are columns of the same rows), so no task
/// can hold a `&mut` sub-slice without overlapping another's; they write disjoint elements
/// through this pointer instead, while the buffer's `&mut` borrow (held by `PhantomData`) keeps
/// every other access away for as long as the view lives.
#[derive(Clone, Copy)]
struct Out<'a> {
    ptr: *mut f32,
    len: usize,
    _buf: PhantomData<&'a mut [f32]>,
}

// SAFETY: the pointer comes from a `&mut [f32]` that this view borrows for `'a`; writes go
// through `Out::write`, whose callers guarantee that no two threads write the same element.
unsafe impl Send for Out<'_> {}
// SAFETY: as above; shared use only ever writes disjoint elements and never reads.
unsafe impl Sync for Out<'_> {}

impl<'a> Out<'a> {
    fn new(buf: &'a mut [f32]) -> Self {
        Self { ptr: buf.as_mut_ptr(), len: buf.len(), _buf: PhantomData }
    }

    /// Copies `src` to elements `at..at + src.len()`.
    ///
    /// # Safety
    /// No other thread may write these elements while the view is shared. Tasks satisfy this
    /// because each writes only the rows of its sequence in the columns of its own heads.
    unsafe fn write(&self, at: usize, src: &[f32]) {
        assert!(at + src.len() <= self.len, "write {at}+{} outside {}", src.len(), self.len);
        // SAFETY: in bounds (checked above); disjoint from other threads' writes (caller).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(at), src.len()) };
    }
}

/// Forward: overwrites `o` (`[N, heads·head_dim]`) and `lse` (`[heads, N]`, the row
/// logsumexp of the scaled, masked scores, kept for [`backward`]).
///
/// Each query block runs an online softmax over the visible key blocks (running max `m` and
/// sum `l`, rescaling the accumulator when the max grows), so the scratch is `O(BQ·BK)` per
/// task whatever the sequence length. Panics on mismatched slice lengths (engine bugs).
pub fn forward(
    shape: &AttentionShape,
    cu_seqlens: &[usize],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &mut [f32],
    lse: &mut [f32],
) {
    let n = check(shape, cu_seqlens, q.len(), k.len());
    assert_eq!(v.len(), k.len(), "v length");
    assert_eq!(o.len(), q.len(), "o length");
    assert_eq!(lse.len(), shape.heads * n, "lse length");
    let (o, lse) = (Out::new(o), Out::new(lse));
    tasks(shape, cu_seqlens).into_par_iter().with_max_len(1).for_each(|(a, t, g)| {
        super::simd::vectorized(|| forward_task(shape, n, a, t, g, q, k, v, o, lse));
    });
}

/// Copies rows `i0..i0 + mq` of the `rep` query heads of kv head `g` (columns of `src`, rows
/// `qld` apart, the sequence starting at row `a`) into `dst` as one `[rep·mq, d]` matrix, head
/// by head: row `j·mq + r` is head `g·rep + j` of query `i0 + r`. One product with a key block
/// then serves the whole group (GQA reads each K/V block once per group, not once per head).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn pack_group(
    src: &[f32],
    qld: usize,
    d: usize,
    rep: usize,
    g: usize,
    a: usize,
    i0: usize,
    mq: usize,
    dst: &mut [f32],
) {
    for (x, row) in dst[..rep * mq * d].chunks_exact_mut(d).enumerate() {
        let (j, r) = (x / mq, x % mq);
        let at = (a + i0 + r) * qld + (g * rep + j) * d;
        row.copy_from_slice(&src[at..at + d]);
    }
}

thread_local! {
    /// The attention tasks' scratch on each thread of the pool, grown to the largest task and
    /// kept: allocated per task, it came back from the allocator as fresh pages for the
    /// kernel to zero (15% of the demo's time in `clear_page`).
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on zeroed buffers of `sizes` carved from this thread's scratch. Tasks must not
/// nest (their products run on the calling thread, `Par::Seq`).
#[inline(always)]
fn with_scratch<const K: usize, R>(sizes: [usize; K], f: impl FnOnce([&mut [f32]; K]) -> R) -> R {
    SCRATCH.with_borrow_mut(|buf| {
        let total = sizes.iter().sum();
        if buf.len() < total {
            buf.resize(total, 0.0);
        }
        let mut rest = &mut buf[..total];
        let parts = sizes.map(|n| {
            let (part, tail) = std::mem::take(&mut rest).split_at_mut(n);
            rest = tail;
            part.fill(0.0);
            part
        });
        f(parts)
    })
}

/// One (sequence, kv head) task of [`forward`]: the sequence is tokens `a..a + t`. Each block
/// of `BQ` queries runs for all `rep` heads of the group at once, as `rep·mq` packed rows.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn forward_task(
    shape: &AttentionShape,
    n: usize,
    a: usize,
    t: usize,
    g: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: Out,
    lse: Out,
) {
    let (d, rep) = (shape.head_dim, shape.group());
    let (qld, kld) = (shape.heads * d, shape.kv_heads * d);
    // Scratch for the whole task, reused by every block.
    let rows_max = rep * BQ.min(t);
    let sizes = [rows_max * d, rows_max * BK, rows_max * d, rows_max, rows_max];
    with_scratch(sizes, |[qp, s, acc, m, l]| {
        for i0 in (0..t).step_by(BQ) {
            let i1 = (i0 + BQ).min(t);
            let mq = i1 - i0;
            let rows = rep * mq;
            pack_group(q, qld, d, rep, g, a, i0, mq, qp);
            let qb = MatRef::new(&qp[..rows * d], rows, d);
            let (acc, m, l) = (&mut acc[..rows * d], &mut m[..rows], &mut l[..rows]);
            acc.fill(0.0);
            m.fill(f32::NEG_INFINITY);
            l.fill(0.0);
            // Key blocks from the first key the block's first query sees up to its last query's
            // diagonal: blocks wholly outside the causal window are never visited.
            for j0 in (shape.first_key(i0)..i1).step_by(BK) {
                let nk = (j0 + BK).min(i1) - j0;
                let s = &mut s[..rows * nk];
                let kb = MatRef::block(k, kld, a + j0, nk, g * d, d);
                matmul(MatMut::new(s, rows, nk), qb, kb.t(), shape.scale, false, Par::Seq);
                for (x, row) in s.chunks_exact_mut(nk).enumerate() {
                    let (lo, hi) = shape.visible_cols(i0 + x % mq, j0, nk);
                    row[..lo].fill(0.0);
                    row[hi..].fill(0.0);
                    let seen = &mut row[lo..hi];
                    if seen.is_empty() {
                        continue; // nothing visible here: the row's running state is unchanged
                    }
                    let m_new = seen.iter().fold(m[x], |x, &y| x.max(y));
                    super::math::exp_shifted(seen, m_new);
                    let sum: f32 = seen.iter().sum();
                    let alpha = super::math::exp(m[x] - m_new); // 0 for the first visible block (m = -inf)
                    if alpha != 1.0 {
                        acc[x * d..(x + 1) * d].iter_mut().for_each(|y| *y *= alpha);
                    }
                    l[x] = l[x] * alpha + sum;
                    m[x] = m_new;
                }
                let vb = MatRef::block(v, kld, a + j0, nk, g * d, d);
                matmul(MatMut::new(acc, rows, d), MatRef::new(s, rows, nk), vb, 1.0, true, Par::Seq);
            }
            // Every row sees at least its own key, so l > 0 and m is finite.
            for (x, row) in acc.chunks_exact_mut(d).enumerate() {
                let (h, r) = (g * rep + x / mq, x % mq);
                let inv = 1.0 / l[x];
                row.iter_mut().for_each(|y| *y *= inv);
                m[x] += l[x].ln();
                // SAFETY: row a+i0+r, columns of head h (of this task's group): its own elements of `o`.
                unsafe { o.write((a + i0 + r) * qld + h * d, row) };
            }
            for (j, m) in m.chunks_exact(mq).enumerate() {
                // SAFETY: lse row g·rep+j, tokens a+i0..a+i1 of this task's sequence.
                unsafe { lse.write((g * rep + j) * n + a + i0, m) };
            }
        }
    })
}

/// Backward: overwrites `dq`, `dk`, `dv` (the shapes of `q`, `k`, `v`) from `d_o`, recomputing
/// the probabilities block by block from the saved `lse` (see the plan in the module doc).
///
/// A task accumulates `dk`/`dv` of its kv head over all query heads of its group in
/// task-local `[T, head_dim]` buffers, and `dq` of one query block in a `BQ × head_dim` buffer,
/// always in the same order, then copies them out. Panics on mismatched slice lengths.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    shape: &AttentionShape,
    cu_seqlens: &[usize],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    lse: &[f32],
    d_o: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let n = check(shape, cu_seqlens, q.len(), k.len());
    assert_eq!(v.len(), k.len(), "v length");
    assert!(o.len() == q.len() && d_o.len() == q.len() && dq.len() == q.len(), "o / d_o / dq length");
    assert!(dk.len() == k.len() && dv.len() == k.len(), "dk / dv length");
    assert_eq!(lse.len(), shape.heads * n, "lse length");
    let (dq, dk, dv) = (Out::new(dq), Out::new(dk), Out::new(dv));
    tasks(shape, cu_seqlens).into_par_iter().with_max_len(1).for_each(|(a, t, g)| {
        let ins = [q, k, v, o, lse, d_o];
        super::simd::vectorized(|| backward_task(shape, n, a, t, g, ins, [dq, dk, dv]));
    });
}

/// One (sequence, kv head) task of [`backward`]; `ins` is `[q, k, v, o, lse, d_o]`. As in the
/// forward, a query block runs for the group's `rep` heads at once (packed rows), so the
/// products `Pᵀ·dO` and `dSᵀ·Q` sum the heads' contributions to `dv`, `dk` inside one GEMM.
#[inline(always)]
fn backward_task(shape: &AttentionShape, n: usize, a: usize, t: usize, g: usize, ins: [&[f32]; 6], outs: [Out; 3]) {
    let [q, k, v, o, lse, d_o] = ins;
    let [dq, dk, dv] = outs;
    let (d, rep) = (shape.head_dim, shape.group());
    let (qld, kld) = (shape.heads * d, shape.kv_heads * d);
    // Scratch for the whole task, reused by every block.
    let rows_max = rep * BQ.min(t);
    let (blk, scores) = (rows_max * d, rows_max * BK);
    let sizes = [blk, blk, scores, scores, blk, t * d, t * d, rows_max, rows_max];
    with_scratch(sizes, |[qp, dop, p, ds, dq_blk, dk_loc, dv_loc, delta, lse_p]| {
        for i0 in (0..t).step_by(BQ) {
            let i1 = (i0 + BQ).min(t);
            let mq = i1 - i0;
            let rows = rep * mq;
            pack_group(q, qld, d, rep, g, a, i0, mq, qp);
            pack_group(d_o, qld, d, rep, g, a, i0, mq, dop);
            let (qb, dob) = (MatRef::new(&qp[..rows * d], rows, d), MatRef::new(&dop[..rows * d], rows, d));
            for (x, (dl, ls)) in delta[..rows].iter_mut().zip(&mut lse_p[..rows]).enumerate() {
                let (h, r) = (g * rep + x / mq, x % mq);
                let at = (a + i0 + r) * qld + h * d;
                *dl = dop[x * d..(x + 1) * d].iter().zip(&o[at..at + d]).map(|(x, y)| x * y).sum();
                *ls = lse[h * n + a + i0 + r];
            }
            let dq_blk = &mut dq_blk[..rows * d];
            let mut first = true;
            for j0 in (shape.first_key(i0)..i1).step_by(BK) {
                let nk = (j0 + BK).min(i1) - j0;
                let (p, ds) = (&mut p[..rows * nk], &mut ds[..rows * nk]);
                let kb = MatRef::block(k, kld, a + j0, nk, g * d, d);
                let vb = MatRef::block(v, kld, a + j0, nk, g * d, d);
                // P = exp(scale·Q·Kᵀ − lse), zero where masked.
                matmul(MatMut::new(p, rows, nk), qb, kb.t(), shape.scale, false, Par::Seq);
                for (x, row) in p.chunks_exact_mut(nk).enumerate() {
                    let (lo, hi) = shape.visible_cols(i0 + x % mq, j0, nk);
                    row[..lo].fill(0.0);
                    row[hi..].fill(0.0);
                    super::math::exp_shifted(&mut row[lo..hi], lse_p[x]);
                }
                // dV += Pᵀ·dO (over the group's heads)
                let dvb = MatMut::block(dv_loc, d, j0, nk, 0, d);
                matmul(dvb, MatRef::new(p, rows, nk).t(), dob, 1.0, true, Par::Seq);
                // dP = dO·Vᵀ, then dS = P∘(dP − D)·scale in place.
                matmul(MatMut::new(ds, rows, nk), dob, vb.t(), 1.0, false, Par::Seq);
                for (x, (dsr, pr)) in ds.chunks_exact_mut(nk).zip(p.chunks_exact(nk)).enumerate() {
                    dsr.iter_mut().zip(pr).for_each(|(y, &p)| *y = p * (*y - delta[x]) * shape.scale);
                }
                // dQ += dS·K (the first block overwrites), dK += dSᵀ·Q (over the group's heads).
                let dsm = MatRef::new(ds, rows, nk);
                matmul(MatMut::new(dq_blk, rows, d), dsm, kb, 1.0, !first, Par::Seq);
                matmul(MatMut::block(dk_loc, d, j0, nk, 0, d), dsm.t(), qb, 1.0, true, Par::Seq);
                first = false;
            }
            // The key range is never empty (a query sees itself), so dq_blk was overwritten.
            for (x, row) in dq_blk.chunks_exact(d).enumerate() {
                let (h, r) = (g * rep + x / mq, x % mq);
                // SAFETY: row a+i0+r, columns of head h (of this task's group): its own elements of `dq`.
                unsafe { dq.write((a + i0 + r) * qld + h * d, row) };
            }
        }
        for (r, (dkr, dvr)) in dk_loc.chunks_exact(d).zip(dv_loc.chunks_exact(d)).enumerate() {
            // SAFETY: row a+r, columns of kv head g: this task's own elements of `dk` and `dv`.
            unsafe {
                dk.write((a + r) * kld + g * d, dkr);
                dv.write((a + r) * kld + g * d, dvr);
            }
        }
    })
}

/// Reference body in candle tensor ops (the test oracle and the non-CPU body): returns `o` as
/// a `[N, heads·head_dim]` tensor.
///
/// Per sequence and head it builds the whole `[T, T]` score matrix, as transformers' eager
/// attention does: `scores = scale·q·kᵀ + mask` (`f32::MIN` on hidden keys), a softmax in f32
/// (f64 for f64 inputs), cast back to the input dtype, times `v`. Only differentiable candle
/// ops are used, so candle's autograd gives the reference gradients. The row max is detached:
/// subtracting a constant does not change the softmax or its gradient.
pub fn reference(shape: &AttentionShape, cu_seqlens: &[usize], q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (d, rep) = (shape.head_dim, shape.group());
    let acc = crate::accum_dtype(q.dtype());
    let mut seqs = Vec::with_capacity(cu_seqlens.len());
    for w in cu_seqlens.windows(2) {
        let (a, t) = (w[0], w[1] - w[0]);
        if t == 0 {
            continue;
        }
        let mask: Vec<f32> = (0..t * t)
            .map(|x| {
                let (i, j) = (x / t, x % t);
                if j <= i && j >= shape.first_key(i) {
                    0.0
                } else {
                    f32::MIN
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), q.device())?.to_dtype(acc)?;
        let mut heads = Vec::with_capacity(shape.heads);
        for g in 0..shape.kv_heads {
            let kg = k.narrow(0, a, t)?.narrow(1, g * d, d)?.contiguous()?;
            let vg = v.narrow(0, a, t)?.narrow(1, g * d, d)?.contiguous()?;
            for h in g * rep..(g + 1) * rep {
                let qh = q.narrow(0, a, t)?.narrow(1, h * d, d)?.contiguous()?;
                let scores = (qh.matmul(&kg.t()?)? * shape.scale as f64)?.to_dtype(acc)?.broadcast_add(&mask)?;
                let max = scores.max_keepdim(D::Minus1)?.detach();
                let e = scores.broadcast_sub(&max)?.exp()?;
                let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?.to_dtype(v.dtype())?;
                heads.push(p.matmul(&vg)?);
            }
        }
        seqs.push(Tensor::cat(&heads, 1)?);
    }
    if seqs.is_empty() {
        return Tensor::zeros((0, shape.heads * d), q.dtype(), q.device());
    }
    Tensor::cat(&seqs, 0)
}
