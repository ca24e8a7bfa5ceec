//! The LoRA linear: `y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ` with a frozen `W`, forward and backward.
//!
//! Everything LoRA-specific stays r wide: the forward saves `u = drop(x)·Aᵀ` (`[N, r]`) for
//! dB, and the backward forms `t = dY·B` once and uses it for both dA and dX, so `B·A` (a
//! weight-sized matrix) is never formed (unsloth's chain order). The dropout mask is not a
//! tensor: it is regenerated from its key (one counter-based stream per sequence, layer and
//! module) wherever it is needed, in the same order as the keyed masks of the reference model
//! (`worker::dropout`), so both paths drop the same elements.

use super::bf16::{Bf16Scratch, Bf16Weight};
use super::gemm::{matmul, MatMut, MatRef, Par};
use super::int8::{Int8Scratch, Int8Weight};
use super::keystream::Keystream;
use candle_core::{Result, Tensor};
use rayon::prelude::*;

/// A frozen `[out, in]` weight as stored: full precision, bf16 (`torch_dtype = bf16`), or
/// int8 (`load_in_8bit`).
#[derive(Clone, Copy, Debug)]
pub enum Weight<'a> {
    /// f32, row-major.
    F32(&'a [f32]),
    /// bf16, packed for both products.
    Bf16(Bf16Weight<'a>),
    /// int8 with one scale per row, packed for the CPU's int8 dot product (activations
    /// quantized per token, outlier columns in f32).
    Int8Packed(Int8Weight<'a>),
    /// `u8 = int8 + 128` row-major, with an f32 absmax scale per `group` inputs of each row
    /// (`[out, in / group]`), as [`crate::Int8Linear`] stores it.
    Int8 {
        /// The quantized values.
        q: &'a [u8],
        /// The scales.
        scales: &'a [f32],
        /// Inputs per scale.
        group: usize,
    },
}

/// Elements of W dequantized per tile (4 MiB of f32), as the int8 op does.
const TILE_ELEMS: usize = 1 << 20;

/// A frozen `[out, in]` weight and optional bias, as transformers stores them.
#[derive(Clone, Copy, Debug)]
pub struct Frozen<'a> {
    /// The weight.
    pub w: Weight<'a>,
    /// `[out]`.
    pub bias: Option<&'a [f32]>,
    /// Output features.
    pub out: usize,
    /// Input features.
    pub inp: usize,
}

/// LoRA dropout of one module: probability `p`, one key per packed sequence.
#[derive(Clone, Copy, Debug)]
pub struct Dropout<'a> {
    /// Probability of dropping an element.
    pub p: f32,
    /// The factor kept elements are scaled by, `1 / (1 − p)` rounded once from the
    /// configured (f64) probability, as the reference model rounds it.
    pub keep: f32,
    /// The key of each sequence's mask stream.
    pub keys: &'a [u64],
    /// Sequence boundaries in tokens (`keys.len() + 1` entries).
    pub cu_seqlens: &'a [usize],
}

/// The r-wide products of the branch run on the calling thread: at small r the pool's
/// dispatch costs more than a second thread gains (measured 68 vs 81 µs for 1250×160·160×8).
const LOW: Par = Par::Seq;

/// Draws per refill of the mask generator: one 16-block keystream pass, converted in a loop
/// the compiler vectorizes.
const DRAWS: usize = 256;

impl Dropout<'_> {
    /// Calls `f(chunk, mask_values)` over `buf` (`[N, features]`) in order, with the mask
    /// values (0 or `keep`) of each chunk's elements. Element `(t, f)` of sequence s is draw
    /// `t·features + f` of stream `keys[s]`, as in the reference model's `[rows, seq,
    /// features]` mask for the unpadded prefix of each row: `rng.random::<f32>() < p` drops
    /// (24 high bits of each u32, times 2⁻²⁴), so both draw the same masks.
    fn for_each_chunk(&self, buf: &mut [f32], features: usize, f: impl Fn(&mut [f32], &[f32]) + Sync) {
        assert_eq!(self.keys.len() + 1, self.cu_seqlens.len(), "one dropout key per sequence");
        let (p, keep) = (self.p, self.keep);
        let mut parts = Vec::with_capacity(self.keys.len());
        let mut rest = &mut buf[..];
        for w in self.cu_seqlens.windows(2) {
            let (head, tail) = rest.split_at_mut((w[1] - w[0]) * features);
            parts.push(head);
            rest = tail;
        }
        parts.into_par_iter().zip(self.keys.par_iter()).for_each(|(part, &key)| {
            let mut stream = Keystream::from_u64(key);
            let (mut words, mut mask) = ([0u32; DRAWS], [0f32; DRAWS]);
            for chunk in part.chunks_mut(DRAWS) {
                let words = &mut words[..chunk.len()];
                stream.fill(words);
                super::simd::vectorized(|| {
                    for (m, &w) in mask.iter_mut().zip(words.iter()) {
                        let u = (w >> 8) as f32 * (1.0 / 16_777_216.0);
                        *m = if u < p { 0.0 } else { keep };
                    }
                    f(chunk, &mask[..chunk.len()]);
                });
            }
        });
    }

    /// Multiplies `buf` (`[N, features]`) in place by the mask: 0 with probability `p`, else
    /// `1 / (1 − p)`.
    pub fn apply(&self, buf: &mut [f32], features: usize) {
        self.for_each_chunk(buf, features, |chunk, mask| {
            for (v, &m) in chunk.iter_mut().zip(mask) {
                *v = if m == 0.0 { 0.0 } else { *v * m };
            }
        });
    }

    /// Overwrites `buf` with the mask itself (0 or `keep`).
    pub fn fill(&self, buf: &mut [f32], features: usize) {
        self.for_each_chunk(buf, features, |chunk, mask| chunk.copy_from_slice(mask));
    }
}

/// The trainable side of one module.
#[derive(Clone, Copy, Debug)]
pub struct Adapter<'a> {
    /// `[r, in]`.
    pub a: &'a [f32],
    /// `[out, r]`.
    pub b: &'a [f32],
    /// The rank r.
    pub rank: usize,
    /// alpha / r (or alpha / √r).
    pub scale: f32,
    /// Dropout on the branch input, if any.
    pub dropout: Option<Dropout<'a>>,
}

/// Reused buffers: `drop(x)`, the mask (backward only: drawn once, used twice), the r-wide
/// `t = dY·B`, a dequantized tile of an int8 weight and the bf16 and int8 products' buffers.
#[derive(Default)]
pub struct Scratch {
    dropped: Vec<f32>,
    tile: Vec<f32>,
    mask: Vec<f32>,
    low: Vec<f32>,
    narrow: Bf16Scratch,
    int8: Int8Scratch,
}

fn sized(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if buf.len() < n {
        buf.resize(n, 0.0);
    }
    &mut buf[..n]
}

/// `drop(x)` into `scratch` (a copy with the mask applied), or `x` itself without dropout.
fn dropped<'s>(x: &'s [f32], inp: usize, dropout: Option<&Dropout<'_>>, scratch: &'s mut Vec<f32>) -> &'s [f32] {
    match dropout {
        Some(d) if d.p > 0.0 => {
            let buf = sized(scratch, x.len());
            buf.copy_from_slice(x);
            d.apply(buf, inp);
            buf
        }
        _ => x,
    }
}

impl Frozen<'_> {
    /// `y = x·Wᵀ` (`y` `[N, out]`): one GEMM, or for int8 one per tile of output rows
    /// dequantized into the reused tile buffer, each writing its block of columns.
    pub fn forward(&self, x: MatRef<'_>, mut y: MatMut<'_>, scratch: &mut Scratch) {
        let tile = &mut scratch.tile;
        let (k, n) = (self.inp, x.rows());
        match self.w {
            Weight::F32(w) => matmul(y, x, MatRef::new(w, self.out, k).t(), 1.0, false, Par::Pool),
            Weight::Bf16(w) => w.forward(x, y, &mut scratch.narrow),
            Weight::Int8Packed(w) => w.forward(x, y, &mut scratch.int8),
            Weight::Int8 { q, scales, group } => {
                let rows = (TILE_ELEMS / k.max(1)).clamp(16, self.out.max(16));
                for r0 in (0..self.out).step_by(rows) {
                    let m = rows.min(self.out - r0);
                    let t = dequantize(q, scales, group, k, r0, m, tile);
                    matmul(y.sub(0, n, r0, m), x, MatRef::new(t, m, k).t(), 1.0, false, Par::Pool);
                }
            }
        }
    }

    /// `dx (+)= dY·W` (`dx` `[N, in]`), tile by tile for int8 (each tile accumulates).
    pub fn backward(&self, dy: MatRef<'_>, dx: &mut [f32], accumulate: bool, scratch: &mut Scratch) {
        let tile = &mut scratch.tile;
        let (k, n) = (self.inp, dy.rows());
        match self.w {
            Weight::F32(w) => {
                matmul(MatMut::new(dx, n, k), dy, MatRef::new(w, self.out, k), 1.0, accumulate, Par::Pool)
            }
            Weight::Bf16(w) => w.backward(dy, MatMut::new(dx, n, k), accumulate, &mut scratch.narrow),
            Weight::Int8Packed(w) => w.backward(dy, MatMut::new(dx, n, k), accumulate, &mut scratch.int8),
            Weight::Int8 { q, scales, group } => {
                let rows = (TILE_ELEMS / k.max(1)).clamp(16, self.out.max(16));
                for r0 in (0..self.out).step_by(rows) {
                    let m = rows.min(self.out - r0);
                    let t = dequantize(q, scales, group, k, r0, m, tile);
                    let acc = accumulate || r0 > 0;
                    matmul(MatMut::new(dx, n, k), dy.sub(0, n, r0, m), MatRef::new(t, m, k), 1.0, acc, Par::Pool);
                }
            }
        }
    }
}

/// Rows `r0..r0 + m` of an int8 weight as f32, `(q − 128) · scale`, in `tile`.
fn dequantize<'t>(
    q: &[u8],
    scales: &[f32],
    group: usize,
    k: usize,
    r0: usize,
    m: usize,
    tile: &'t mut Vec<f32>,
) -> &'t [f32] {
    let groups = k / group;
    let t = sized(tile, m * k);
    t.par_chunks_mut(k).enumerate().for_each(|(r, dst)| {
        let row = r0 + r;
        for (g, (d, src)) in dst.chunks_mut(group).zip(q[row * k..(row + 1) * k].chunks(group)).enumerate() {
            let s = scales[row * groups + g];
            for (d, &v) in d.iter_mut().zip(src) {
                *d = (f32::from(v) - 128.0) * s;
            }
        }
    });
    t
}

/// Forward of one module over `x` `[N, in]`: overwrites `y` (`[N, out]`, any strides) with
/// `x·Wᵀ + b + s·u·Bᵀ` and `u` (`[N, r]`) with `drop(x)·Aᵀ`.
pub fn forward(
    x: &[f32],
    w: &Frozen<'_>,
    lora: Option<&Adapter<'_>>,
    mut y: MatMut<'_>,
    u: &mut [f32],
    scratch: &mut Scratch,
) {
    let n = x.len() / w.inp;
    w.forward(MatRef::new(x, n, w.inp), y.rb(), scratch);
    branch_forward(x, w, lora, y, u, scratch);
}

/// The rest of [`forward`] once `y` holds `x·Wᵀ` (from a GEMM shared with other modules):
/// adds the bias and `s·u·Bᵀ`, and overwrites `u` with `drop(x)·Aᵀ`.
pub fn branch_forward(
    x: &[f32],
    w: &Frozen<'_>,
    lora: Option<&Adapter<'_>>,
    mut y: MatMut<'_>,
    u: &mut [f32],
    scratch: &mut Scratch,
) {
    let n = x.len() / w.inp;
    if let Some(b) = w.bias {
        y.add_row_vector(b);
    }
    if let Some(l) = lora {
        branch_input(x, w, l, u, scratch);
        let u = &u[..n * l.rank];
        matmul(y, MatRef::new(u, n, l.rank), MatRef::new(l.b, w.out, l.rank).t(), l.scale, true, LOW);
    }
}

/// Only `u = drop(x)·Aᵀ`: what the backward needs of a module whose output it does not
/// need (the last linear of a block recomputed under checkpointing).
pub fn branch_input(x: &[f32], w: &Frozen<'_>, l: &Adapter<'_>, u: &mut [f32], scratch: &mut Scratch) {
    let n = x.len() / w.inp;
    let xd = dropped(x, w.inp, l.dropout.as_ref(), &mut scratch.dropped);
    let u = MatMut::new(&mut u[..n * l.rank], n, l.rank);
    matmul(u, MatRef::new(xd, n, w.inp), MatRef::new(l.a, l.rank, w.inp).t(), 1.0, false, LOW);
}

/// Gradient sums of one module's LoRA pair, added into by [`backward`].
pub struct PairGrads<'a> {
    /// `[r, in]`.
    pub da: &'a mut [f32],
    /// `[out, r]`.
    pub db: &'a mut [f32],
}

impl PairGrads<'_> {
    /// A shorter-lived handle on the same sums.
    pub fn reborrow(&mut self) -> PairGrads<'_> {
        PairGrads { da: &mut *self.da, db: &mut *self.db }
    }
}

/// Backward of one module: `dx (+)= dY·W + s·((dY·B)·A)∘mask` (overwritten unless
/// `accumulate`; skipped when `dx` is `None`, below the lowest trainable block),
/// `dA += s·(dY·B)ᵀ·drop(x)`, `dB += s·dYᵀ·u`. No gradient for `W` or `b`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    x: &[f32],
    w: &Frozen<'_>,
    lora: Option<(&Adapter<'_>, PairGrads<'_>)>,
    dy: MatRef<'_>,
    u: &[f32],
    mut dx: Option<&mut [f32]>,
    accumulate: bool,
    scratch: &mut Scratch,
) {
    if let Some(dx) = dx.as_deref_mut() {
        w.backward(dy, dx, accumulate, scratch);
    }
    branch_backward(x, w, lora, dy, u, dx, scratch);
}

/// The LoRA part of [`backward`] (for a module whose `dY·W` a GEMM shared with other modules
/// computed): `dA`, `dB` and, when `dx` is given, `dx += s·((dY·B)·A)∘mask`.
pub fn branch_backward(
    x: &[f32],
    w: &Frozen<'_>,
    lora: Option<(&Adapter<'_>, PairGrads<'_>)>,
    dy: MatRef<'_>,
    u: &[f32],
    dx: Option<&mut [f32]>,
    scratch: &mut Scratch,
) {
    let n = x.len() / w.inp;
    let Some((l, g)) = lora else { return };
    let r = l.rank;
    let low = sized(&mut scratch.low, n * r);
    // t = dY·B, [N, r]
    matmul(MatMut::new(low, n, r), dy, MatRef::new(l.b, w.out, r), 1.0, false, LOW);
    // dB += s·dYᵀ·u
    matmul(MatMut::new(g.db, w.out, r), dy.t(), MatRef::new(&u[..n * r], n, r), l.scale, true, LOW);
    let low = &scratch.low[..n * r];
    let dropout = l.dropout.as_ref().filter(|d| d.p > 0.0);
    // drop(x) from one draw of the mask, kept for dx below.
    let xd = match dropout {
        Some(d) => {
            let mask = sized(&mut scratch.mask, n * w.inp);
            d.fill(mask, w.inp);
            let xd = sized(&mut scratch.dropped, n * w.inp);
            for ((o, &v), &m) in xd.iter_mut().zip(x).zip(mask.iter()) {
                *o = if m == 0.0 { 0.0 } else { v * m };
            }
            &scratch.dropped[..n * w.inp]
        }
        None => x,
    };
    // dA += s·tᵀ·drop(x)
    matmul(MatMut::new(g.da, r, w.inp), MatRef::new(low, n, r).t(), MatRef::new(xd, n, w.inp), l.scale, true, LOW);
    let Some(dx) = dx else { return };
    match dropout {
        // dx += s·(t·A)∘mask: the product goes through the dropped buffer (free again).
        Some(_) => {
            let z = sized(&mut scratch.dropped, n * w.inp);
            matmul(MatMut::new(z, n, w.inp), MatRef::new(low, n, r), MatRef::new(l.a, r, w.inp), l.scale, false, LOW);
            let mask = &scratch.mask[..n * w.inp];
            let rows = w.inp.max(1) * 64;
            dx.par_chunks_mut(rows).zip(z.par_chunks(rows)).zip(mask.par_chunks(rows)).for_each(|((o, z), m)| {
                for ((o, &z), &m) in o.iter_mut().zip(z).zip(m) {
                    *o += if m == 0.0 { 0.0 } else { z * m };
                }
            });
        }
        None => {
            matmul(MatMut::new(dx, n, w.inp), MatRef::new(low, n, r), MatRef::new(l.a, r, w.inp), l.scale, true, LOW)
        }
    }
}

/// Reference body: the same maths in candle tensor ops, with the mask materialised from the
/// same keyed streams. `x` `[N, in]`, `w` `[out, in]`, `a` `[r, in]`, `b` `[out, r]`.
pub fn reference(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    lora: Option<(&Tensor, &Tensor, f64, Option<&Dropout<'_>>)>,
) -> Result<Tensor> {
    let mut y = x.matmul(&w.t()?)?;
    if let Some(b) = bias {
        y = y.broadcast_add(b)?;
    }
    if let Some((a, b, scale, dropout)) = lora {
        let (n, inp) = x.dims2()?;
        let xd = match dropout {
            Some(d) if d.p > 0.0 => {
                let mut mask = vec![1f32; n * inp];
                d.apply(&mut mask, inp);
                (x * Tensor::from_vec(mask, (n, inp), x.device())?)?
            }
            _ => x.clone(),
        };
        y = (y + (xd.matmul(&a.t()?)?.matmul(&b.t()?)? * scale)?)?;
    }
    Ok(y)
}
