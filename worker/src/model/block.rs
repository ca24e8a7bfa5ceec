//! One pre-norm decoder block: attention with GQA and RoPE, then a SwiGLU MLP, each
//! linear layer optionally carrying a LoRA branch.

use super::linear::BaseLinear;
use super::ForwardCtx;
use crate::error::Result;
use candle_core::Tensor;
use lorafleet_kernels::{masked_softmax, RmsNorm, Rope};

/// Indices into `LINEAR_MODULES`, in the order the block uses them.
pub(crate) const Q: usize = 0;
pub(crate) const K: usize = 1;
pub(crate) const V: usize = 2;
pub(crate) const O: usize = 3;
pub(crate) const GATE: usize = 4;
pub(crate) const UP: usize = 5;
pub(crate) const DOWN: usize = 6;

/// Cached keys and values of one block, `[rows, kv_heads, past, head_dim]`, after RoPE.
#[derive(Default)]
pub struct LayerCache {
    kv: Option<(Tensor, Tensor)>,
}

impl LayerCache {
    /// Positions already cached.
    pub fn len(&self) -> usize {
        self.kv.as_ref().map_or(0, |(k, _)| k.dims()[2])
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The frozen weights of one decoder block.
pub struct Block {
    pub(crate) index: usize,
    pub(crate) input_norm: RmsNorm,
    pub(crate) post_norm: RmsNorm,
    /// q, k, v, o, gate, up, down, in `LINEAR_MODULES` order.
    pub(crate) linears: Vec<BaseLinear>,
    /// The concatenated dense weights `[q; k; v]` and `[gate; up]` that the q, k, v and
    /// gate, up weights are views of (`None` for int8 linears).
    pub(crate) fused: [Option<Tensor>; 2],
    pub(crate) heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
}

impl Block {
    /// Applies linear `module` with the active adapter's LoRA branch, if any.
    fn linear(&self, module: usize, x: &Tensor, ctx: &ForwardCtx<'_>) -> Result<Tensor> {
        let y = self.linears[module].forward(x)?;
        match ctx.adapter.and_then(|a| a.get(self.index, module)) {
            Some(pair) => {
                let delta = pair.delta(x, ctx.dropout, self.index, module)?;
                Ok((y + delta.to_dtype(x.dtype())?)?)
            }
            None => Ok(y),
        }
    }

    /// Runs the block on `x` `[rows, seq, hidden]`.
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        ctx: &ForwardCtx<'_>,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let h = self.input_norm.forward(x)?;
        let attn = self.attention(&h, rope, ctx, cache)?;
        let x = (x + attn)?;
        let h = self.post_norm.forward(&x)?;
        let gate = self.linear(GATE, &h, ctx)?;
        let up = self.linear(UP, &h, ctx)?;
        let mlp = self.linear(DOWN, &(gate.silu()? * up)?, ctx)?;
        Ok((x + mlp)?)
    }

    fn attention(
        &self,
        x: &Tensor,
        rope: &Rope,
        ctx: &ForwardCtx<'_>,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let (rows, seq, _) = x.dims3()?;
        let split = |t: Tensor, heads: usize| -> Result<Tensor> {
            Ok(t.reshape((rows, seq, heads, self.head_dim))?.transpose(1, 2)?)
        };
        let offset = cache.as_ref().map_or(0, |c| c.len());
        let q = rope.forward(&split(self.linear(Q, x, ctx)?, self.heads)?, offset)?;
        let mut k = rope.forward(&split(self.linear(K, x, ctx)?, self.kv_heads)?, offset)?;
        let mut v = split(self.linear(V, x, ctx)?, self.kv_heads)?.contiguous()?;
        if let Some(cache) = cache {
            if let Some((pk, pv)) = &cache.kv {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            cache.kv = Some((k.clone(), v.clone()));
        }
        let k = repeat_kv(&k, self.heads / self.kv_heads)?;
        let v = repeat_kv(&v, self.heads / self.kv_heads)?;
        let scores = q.matmul(&k.t()?)?;
        let probs = masked_softmax(&scores, 1.0 / (self.head_dim as f64).sqrt(), ctx.mask.as_ref())?;
        let out = probs.matmul(&v)?;
        let out = out.transpose(1, 2)?.reshape((rows, seq, self.heads * self.head_dim))?;
        self.linear(O, &out, ctx)
    }
}

/// Repeats each key/value head `n` times so that query head `j` meets kv head `j / n`.
fn repeat_kv(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?.broadcast_as((b, kv, n, t, d))?.reshape((b, kv * n, t, d))?)
}
