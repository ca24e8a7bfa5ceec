//! One decoder block's forward and backward, written out op by op (llm.c's style).
//!
//! The forward fills [`Acts`] with exactly what the backward reads; the backward runs the
//! rows of the forward in reverse, turning the gradient of the block's output into the
//! gradient of its input in place and adding the seven LoRA pairs' gradients. The
//! activation and gradient buffers are sized once per batch shape and reused; what still
//! allocates per call is small (attention's per-task block scratch, dropout's list of
//! sequences).

use super::profile::{time, Op};
use super::weights::BlockWeights;
use lorafleet_kernels::fused::attention::{self, AttentionShape};
use lorafleet_kernels::fused::gemm::{MatMut, MatRef};
use lorafleet_kernels::fused::lora_linear::{self, Adapter, PairGrads, Scratch};
use lorafleet_kernels::fused::{rms_norm, rope, swiglu};

/// Module indices (`LINEAR_MODULES` order).
const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const O: usize = 3;
const GATE: usize = 4;
const UP: usize = 5;
const DOWN: usize = 6;

/// Sizes `buf` to `n` values, reusing its allocation.
pub(crate) fn fit(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
    buf.resize(n, 0.0);
    &mut buf[..]
}

/// What the whole micro-batch shares: its packed layout and the model's shape.
pub(crate) struct Ctx<'a> {
    pub cu_seqlens: &'a [usize],
    pub positions: &'a [u32],
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    pub attention: AttentionShape,
    pub hidden: usize,
    pub intermediate: usize,
    pub eps: f64,
}

impl Ctx<'_> {
    fn tokens(&self) -> usize {
        self.positions.len()
    }
    fn q_width(&self) -> usize {
        self.attention.heads * self.attention.head_dim
    }
    fn kv_width(&self) -> usize {
        self.attention.kv_heads * self.attention.head_dim
    }
}

/// The activations one block's backward reads (the block input is kept by the caller).
#[derive(Default)]
pub(crate) struct Acts {
    x1: Vec<f32>,
    rstd1: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    o: Vec<f32>,
    lse: Vec<f32>,
    h1: Vec<f32>,
    x2: Vec<f32>,
    rstd2: Vec<f32>,
    eg: Vec<f32>,
    m: Vec<f32>,
    /// `drop(x)·Aᵀ` of each adapted module.
    u: [Vec<f32>; 7],
}

/// Gradient buffers shared by all blocks of a backward.
#[derive(Default)]
pub(crate) struct GradScratch {
    dx: Vec<f32>,
    dm: Vec<f32>,
    deg: Vec<f32>,
    d_o: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    /// `dq | dk | dv` side by side, for one GEMM through `[q; k; v]`.
    dqkv: Vec<f32>,
    lora: Scratch,
}

/// Forward buffers shared by all blocks: `q | k | v` as the fused GEMM writes them.
#[derive(Default)]
pub(crate) struct FwdScratch {
    qkv: Vec<f32>,
    pub lora: Scratch,
}

/// The LoRA pair of each module of one block and, in the backward, where its gradient
/// sums go.
pub(crate) type BlockAdapters<'a> = [Option<Adapter<'a>>; 7];

/// Forward of one block: `out = h1 + down(swiglu(gate|up(norm2(h1))))` with
/// `h1 = x + o(attention(rope(q|k|v(norm1(x)))))`. Overwrites `acts` and `out`; without
/// `out` (a checkpointing recompute, whose output nobody reads) the down GEMM is skipped and
/// only its LoRA input is kept.
pub(crate) fn forward(
    w: &BlockWeights<'_>,
    lora: &BlockAdapters<'_>,
    ctx: &Ctx<'_>,
    x: &[f32],
    acts: &mut Acts,
    out: Option<&mut [f32]>,
    fs: &mut FwdScratch,
) {
    let (n, d, f) = (ctx.tokens(), ctx.hidden, ctx.intermediate);
    let (qw, kvw) = (ctx.q_width(), ctx.kv_width());
    let a = acts;
    let scratch = &mut fs.lora;
    time(Op::Norm, || rms_norm::forward(x, w.norm1, ctx.eps, fit(&mut a.x1, n * d), fit(&mut a.rstd1, n)));
    // q|k|v = lin(x1): one GEMM over [q; k; v] when the weights are stored side by side.
    let qkv_cols = [(Q, 0, qw), (K, qw, kvw), (V, qw + kvw, kvw)];
    let (x1, width) = (&a.x1[..], qw + 2 * kvw);
    if let Some(fw) = &w.qkv {
        let qkv = fit(&mut fs.qkv, n * width);
        time(Op::LinearForward, || fw.forward(MatRef::new(x1, n, d), MatMut::new(qkv, n, width), scratch));
        for (m, c0, cols) in qkv_cols {
            let (y, u) = (MatMut::block(qkv, width, 0, n, c0, cols), fit(&mut a.u[m], n * rank(lora, m)));
            time(Op::LinearForward, || lora_linear::branch_forward(x1, &w.lin[m], lora[m].as_ref(), y, u, scratch));
        }
        for (buf, (_, c0, cols)) in [&mut a.q, &mut a.k, &mut a.v].into_iter().zip(qkv_cols) {
            let dst = fit(buf, n * cols);
            for (row, src) in dst.chunks_exact_mut(cols).zip(qkv.chunks_exact(width)) {
                row.copy_from_slice(&src[c0..c0 + cols]);
            }
        }
    } else {
        for (buf, (m, _, cols)) in [&mut a.q, &mut a.k, &mut a.v].into_iter().zip(qkv_cols) {
            let (y, u) = (MatMut::new(fit(buf, n * cols), n, cols), fit(&mut a.u[m], n * rank(lora, m)));
            time(Op::LinearForward, || lora_linear::forward(x1, &w.lin[m], lora[m].as_ref(), y, u, scratch));
        }
    }
    let hd = ctx.attention.head_dim;
    time(Op::Rope, || rope::apply(&mut a.q, qw, 0, ctx.attention.heads, hd, ctx.positions, ctx.cos, ctx.sin, false));
    time(Op::Rope, || {
        rope::apply(&mut a.k, kvw, 0, ctx.attention.kv_heads, hd, ctx.positions, ctx.cos, ctx.sin, false)
    });
    let heads = ctx.attention.heads;
    let (o, lse) = (fit(&mut a.o, n * qw), fit(&mut a.lse, heads * n));
    time(Op::AttentionForward, || attention::forward(&ctx.attention, ctx.cu_seqlens, &a.q, &a.k, &a.v, o, lse));
    let h1 = fit(&mut a.h1, n * d);
    let (y, u) = (MatMut::new(h1, n, d), fit(&mut a.u[O], n * rank(lora, O)));
    time(Op::LinearForward, || lora_linear::forward(&a.o, &w.lin[O], lora[O].as_ref(), y, u, scratch));
    time(Op::Residual, || add_into(h1, x));
    time(Op::Norm, || rms_norm::forward(h1, w.norm2, ctx.eps, fit(&mut a.x2, n * d), fit(&mut a.rstd2, n)));
    // e|g = gate|up(x2), written side by side into one [N, 2f] buffer.
    let (x2, eg) = (&a.x2[..], fit(&mut a.eg, n * 2 * f));
    if let Some(fw) = &w.gate_up {
        time(Op::LinearForward, || fw.forward(MatRef::new(x2, n, d), MatMut::new(eg, n, 2 * f), scratch));
    }
    for (m, c0) in [(GATE, 0), (UP, f)] {
        let (y, u) = (MatMut::block(eg, 2 * f, 0, n, c0, f), fit(&mut a.u[m], n * rank(lora, m)));
        let (wm, l) = (&w.lin[m], lora[m].as_ref());
        match w.gate_up {
            Some(_) => time(Op::LinearForward, || lora_linear::branch_forward(x2, wm, l, y, u, scratch)),
            None => time(Op::LinearForward, || lora_linear::forward(x2, wm, l, y, u, scratch)),
        }
    }
    time(Op::Swiglu, || swiglu::forward(eg, f, fit(&mut a.m, n * f)));
    let u = fit(&mut a.u[DOWN], n * rank(lora, DOWN));
    let Some(out) = out else {
        if let Some(l) = &lora[DOWN] {
            time(Op::LinearForward, || lora_linear::branch_input(&a.m, &w.lin[DOWN], l, u, scratch));
        }
        return;
    };
    let y = MatMut::new(out, n, d);
    time(Op::LinearForward, || lora_linear::forward(&a.m, &w.lin[DOWN], lora[DOWN].as_ref(), y, u, scratch));
    time(Op::Residual, || add_into(out, &a.h1));
}

/// Backward of one block. On entry `dout` holds the gradient of the block's output; on
/// return, the gradient of its input `x` (unless `need_dx` is false: below the lowest
/// trainable block nothing needs it). LoRA gradients are added into `grads`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    w: &BlockWeights<'_>,
    lora: &BlockAdapters<'_>,
    grads: &mut [Option<PairGrads<'_>>; 7],
    ctx: &Ctx<'_>,
    x: &[f32],
    a: &Acts,
    dout: &mut [f32],
    need_dx: bool,
    g: &mut GradScratch,
) {
    let (n, d, f) = (ctx.tokens(), ctx.hidden, ctx.intermediate);
    let (qw, kvw) = (ctx.q_width(), ctx.kv_width());
    // out = h1 + down(m): the residual passes dout to h1 unchanged; down gets dy = dout.
    let dm = fit(&mut g.dm, n * f);
    let dy = MatRef::new(dout, n, d);
    time(Op::LinearBackward, || {
        lora_linear::backward(&a.m, &w.lin[DOWN], pair(lora, grads, DOWN), dy, &a.u[DOWN], Some(dm), false, &mut g.lora)
    });
    // m = silu(e)·g
    time(Op::Swiglu, || swiglu::backward(&a.eg, f, &g.dm, fit(&mut g.deg, n * 2 * f)));
    // e|g = gate|up(x2): dx2 = de·W_gate + dg·W_up (+ LoRA), one GEMM through [gate; up].
    let dx2 = fit(&mut g.dx, n * d);
    if let Some(fw) = &w.gate_up {
        let deg = MatRef::new(&g.deg, n, 2 * f);
        time(Op::LinearBackward, || fw.backward(deg, dx2, false, &mut g.lora));
    }
    for (i, (m, c0)) in [(GATE, 0), (UP, f)].into_iter().enumerate() {
        let dy = MatRef::block(&g.deg, 2 * f, 0, n, c0, f);
        let (x2, wm, u) = (&a.x2[..], &w.lin[m], &a.u[m][..]);
        time(Op::LinearBackward, || match w.gate_up {
            Some(_) => lora_linear::branch_backward(x2, wm, pair(lora, grads, m), dy, u, Some(&mut *dx2), &mut g.lora),
            None => lora_linear::backward(x2, wm, pair(lora, grads, m), dy, u, Some(&mut *dx2), i > 0, &mut g.lora),
        });
    }
    // x2 = norm2(h1): dh1 = dout + norm2ᵀ(dx2)
    time(Op::Norm, || rms_norm::backward(&g.dx, &a.h1, w.norm2, &a.rstd2, dout));
    // h1 = x + o(attn): dx gets dh1 through the residual (dout already holds it); o gets dy = dh1.
    let d_o = fit(&mut g.d_o, n * qw);
    let dy = MatRef::new(dout, n, d);
    time(Op::LinearBackward, || {
        lora_linear::backward(&a.o, &w.lin[O], pair(lora, grads, O), dy, &a.u[O], Some(d_o), false, &mut g.lora)
    });
    let (dq, dk, dv) = (fit(&mut g.dq, n * qw), fit(&mut g.dk, n * kvw), fit(&mut g.dv, n * kvw));
    time(Op::AttentionBackward, || {
        attention::backward(&ctx.attention, ctx.cu_seqlens, &a.q, &a.k, &a.v, &a.o, &a.lse, &g.d_o, dq, dk, dv)
    });
    // q, k were rotated in place: the backward rotates their gradients back.
    let hd = ctx.attention.head_dim;
    time(Op::Rope, || rope::apply(dq, qw, 0, ctx.attention.heads, hd, ctx.positions, ctx.cos, ctx.sin, true));
    time(Op::Rope, || rope::apply(dk, kvw, 0, ctx.attention.kv_heads, hd, ctx.positions, ctx.cos, ctx.sin, true));
    // q|k|v = lin(x1): dx1 = Σ dY_m·W_m (+ LoRA), one GEMM through [q; k; v].
    let dx1 = fit(&mut g.dx, n * d);
    let width = qw + 2 * kvw;
    let fused = match (&w.qkv, need_dx) {
        (Some(fw), true) => {
            let dqkv = fit(&mut g.dqkv, n * width);
            for (src, (c0, cols)) in [&g.dq, &g.dk, &g.dv].into_iter().zip([(0, qw), (qw, kvw), (qw + kvw, kvw)]) {
                for (row, s) in dqkv.chunks_exact_mut(width).zip(src.chunks_exact(cols)) {
                    row[c0..c0 + cols].copy_from_slice(s);
                }
            }
            time(Op::LinearBackward, || fw.backward(MatRef::new(dqkv, n, width), dx1, false, &mut g.lora));
            true
        }
        _ => false,
    };
    for (i, (m, dy, cols)) in [(Q, &g.dq, qw), (K, &g.dk, kvw), (V, &g.dv, kvw)].into_iter().enumerate() {
        let dx = need_dx.then_some(&mut *dx1);
        let (dy, wm, u) = (MatRef::new(dy, n, cols), &w.lin[m], &a.u[m][..]);
        time(Op::LinearBackward, || match fused {
            true => lora_linear::branch_backward(&a.x1, wm, pair(lora, grads, m), dy, u, dx, &mut g.lora),
            false => lora_linear::backward(&a.x1, wm, pair(lora, grads, m), dy, u, dx, i > 0, &mut g.lora),
        });
    }
    if need_dx {
        // x1 = norm1(x): dx = dh1 + norm1ᵀ(dx1)
        time(Op::Norm, || rms_norm::backward(&g.dx, x, w.norm1, &a.rstd1, dout));
    }
}

/// The rank of module `m`'s LoRA pair (0 when it has none).
fn rank(lora: &BlockAdapters<'_>, m: usize) -> usize {
    lora[m].map_or(0, |l| l.rank)
}

/// Module `m`'s adapter with a reborrow of its gradient sums, if it is adapted.
fn pair<'s, 'a, 'g>(
    lora: &'s BlockAdapters<'a>,
    grads: &'s mut [Option<PairGrads<'g>>; 7],
    m: usize,
) -> Option<(&'s Adapter<'a>, PairGrads<'s>)> {
    lora[m].as_ref().zip(grads[m].as_mut().map(PairGrads::reborrow))
}

/// `acc += x`, element by element.
pub(crate) fn add_into(acc: &mut [f32], x: &[f32]) {
    for (a, b) in acc.iter_mut().zip(x) {
        *a += b;
    }
}
