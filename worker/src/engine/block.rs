//! One decoder block's forward and backward, written out op by op (llm.c's style).
//!
//! The forward fills [`Acts`] with exactly what the backward reads; the backward runs the
//! rows of the forward in reverse, turning the gradient of the block's output into the
//! gradient of its input in place and adding the seven LoRA pairs' gradients. Nothing here
//! allocates once the buffers have their batch shape.

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
    lora: Scratch,
}

/// The LoRA pair of each module of one block and, in the backward, where its gradient
/// sums go.
pub(crate) type BlockAdapters<'a> = [Option<Adapter<'a>>; 7];

/// Forward of one block: `out = h1 + down(swiglu(gate|up(norm2(h1))))` with
/// `h1 = x + o(attention(rope(q|k|v(norm1(x)))))`. Overwrites `acts` and `out`.
pub(crate) fn forward(
    w: &BlockWeights<'_>,
    lora: &BlockAdapters<'_>,
    ctx: &Ctx<'_>,
    x: &[f32],
    acts: &mut Acts,
    out: &mut [f32],
    scratch: &mut Scratch,
) {
    let (n, d, f) = (ctx.tokens(), ctx.hidden, ctx.intermediate);
    let (qw, kvw) = (ctx.q_width(), ctx.kv_width());
    let a = acts;
    time(Op::Norm, || rms_norm::forward(x, w.norm1, ctx.eps, fit(&mut a.x1, n * d), fit(&mut a.rstd1, n)));
    for (m, buf, width) in [(Q, &mut a.q, qw), (K, &mut a.k, kvw), (V, &mut a.v, kvw)] {
        let rank = lora[m].map_or(0, |l| l.rank);
        let y = MatMut::new(fit(buf, n * width), n, width);
        time(Op::LinearForward, || {
            lora_linear::forward(&a.x1, &w.lin[m], lora[m].as_ref(), y, fit(&mut a.u[m], n * rank), scratch)
        });
    }
    let hd = ctx.attention.head_dim;
    time(Op::Rope, || rope::apply(&mut a.q, qw, 0, ctx.attention.heads, hd, ctx.positions, ctx.cos, ctx.sin, false));
    time(Op::Rope, || {
        rope::apply(&mut a.k, kvw, 0, ctx.attention.kv_heads, hd, ctx.positions, ctx.cos, ctx.sin, false)
    });
    let heads = ctx.attention.heads;
    let (o, lse) = (fit(&mut a.o, n * qw), fit(&mut a.lse, heads * n));
    time(Op::AttentionForward, || attention::forward(&ctx.attention, ctx.cu_seqlens, &a.q, &a.k, &a.v, o, lse));
    let rank = lora[O].map_or(0, |l| l.rank);
    let h1 = fit(&mut a.h1, n * d);
    let (y, u) = (MatMut::new(h1, n, d), fit(&mut a.u[O], n * rank));
    time(Op::LinearForward, || lora_linear::forward(&a.o, &w.lin[O], lora[O].as_ref(), y, u, scratch));
    time(Op::Residual, || add_into(h1, x));
    time(Op::Norm, || rms_norm::forward(h1, w.norm2, ctx.eps, fit(&mut a.x2, n * d), fit(&mut a.rstd2, n)));
    let eg = fit(&mut a.eg, n * 2 * f);
    for (m, c0) in [(GATE, 0), (UP, f)] {
        let rank = lora[m].map_or(0, |l| l.rank);
        let y = MatMut::block(eg, 2 * f, 0, n, c0, f);
        time(Op::LinearForward, || {
            lora_linear::forward(&a.x2, &w.lin[m], lora[m].as_ref(), y, fit(&mut a.u[m], n * rank), scratch)
        });
    }
    time(Op::Swiglu, || swiglu::forward(eg, f, fit(&mut a.m, n * f)));
    let rank = lora[DOWN].map_or(0, |l| l.rank);
    let (y, u) = (MatMut::new(out, n, d), fit(&mut a.u[DOWN], n * rank));
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
    // e|g = gate|up(x2): dx2 = de·W_gate + dg·W_up (+ LoRA)
    let dx2 = fit(&mut g.dx, n * d);
    for (i, (m, c0)) in [(GATE, 0), (UP, f)].into_iter().enumerate() {
        let dy = MatRef::block(&g.deg, 2 * f, 0, n, c0, f);
        time(Op::LinearBackward, || {
            lora_linear::backward(
                &a.x2,
                &w.lin[m],
                pair(lora, grads, m),
                dy,
                &a.u[m],
                Some(&mut *dx2),
                i > 0,
                &mut g.lora,
            )
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
    // q|k|v = lin(x1): dx1 = Σ dY_m·W_m (+ LoRA)
    let dx1 = fit(&mut g.dx, n * d);
    for (i, (m, dy, width)) in [(Q, &g.dq, qw), (K, &g.dk, kvw), (V, &g.dv, kvw)].into_iter().enumerate() {
        let dx = need_dx.then_some(&mut *dx1);
        let dy = MatRef::new(dy, n, width);
        time(Op::LinearBackward, || {
            lora_linear::backward(&a.x1, &w.lin[m], pair(lora, grads, m), dy, &a.u[m], dx, i > 0, &mut g.lora)
        });
    }
    if need_dx {
        // x1 = norm1(x): dx = dh1 + norm1ᵀ(dx1)
        time(Op::Norm, || rms_norm::backward(&g.dx, x, w.norm1, &a.rstd1, dout));
    }
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
