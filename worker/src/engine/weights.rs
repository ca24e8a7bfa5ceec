//! Borrowed host views of the frozen weights and the LoRA parameters, for one step.
//!
//! The engine reads candle's CPU storage in place (no copy of the model): every tensor's
//! read guard is taken once per micro-batch and the slices live as long as the guards.

use crate::error::{Error, Result};
use crate::lora::LoraAdapter;
use crate::model::{BaseLinear, Llama};
use candle_core::{CpuStorage, Storage, Tensor};
use lorafleet_common::peft::LINEAR_MODULES;
use lorafleet_kernels::fused::head_loss::Head;
use lorafleet_kernels::fused::lora_linear::{Frozen, Weight};
use std::ops::Deref;
use std::sync::Arc;

/// A held read guard on one contiguous f32 or u8 CPU tensor.
pub(crate) struct Held<'t> {
    guard: Box<dyn Deref<Target = Storage> + 't>,
    start: usize,
    len: usize,
}

impl<'t> Held<'t> {
    /// Takes the guard; `None` unless the tensor is contiguous f32 or u8 on the CPU.
    pub(crate) fn new(t: &'t Tensor) -> Option<Self> {
        let (guard, layout) = t.storage_and_layout();
        let ok = matches!(&*guard, Storage::Cpu(CpuStorage::F32(_) | CpuStorage::U8(_))) && layout.is_contiguous();
        let (start, len) = (layout.start_offset(), t.elem_count());
        ok.then(|| Self { guard: Box::new(guard), start, len })
    }

    /// The values of an f32 tensor.
    pub(crate) fn slice(&self) -> &[f32] {
        match &**self.guard {
            Storage::Cpu(CpuStorage::F32(v)) => &v[self.start..self.start + self.len],
            _ => panic!("engine: an f32 tensor was expected (walk order out of step)"),
        }
    }

    /// The values of a u8 tensor.
    pub(crate) fn bytes(&self) -> &[u8] {
        match &**self.guard {
            Storage::Cpu(CpuStorage::U8(v)) => &v[self.start..self.start + self.len],
            _ => panic!("engine: a u8 tensor was expected (walk order out of step)"),
        }
    }
}

/// The frozen tensors of the model in a fixed walk order, for [`ModelWeights::new`]: per
/// block linear, its weight (dense) or quantized values and scales (int8), then its bias.
fn frozen_tensors(model: &Llama) -> Vec<&Tensor> {
    let (embed, blocks, norm, head, rope) = model.parts();
    let mut out = vec![embed, norm.weight(), head.weight(), rope.tables().0, rope.tables().1];
    for b in blocks {
        out.extend([b.input_norm.weight(), b.post_norm.weight()]);
        for l in &b.linears {
            match l {
                BaseLinear::Dense(l) => out.extend(std::iter::once(l.weight()).chain(l.bias())),
                // The packed weight is plain memory of the model, borrowed directly.
                BaseLinear::Bf16(l) => out.extend(l.bias()),
                BaseLinear::Int8(l) => {
                    let (q, scales, _) = l.quantized_parts();
                    out.extend([q, scales].into_iter().chain(l.bias()));
                }
            }
        }
        out.extend(b.fused.iter().flatten());
    }
    out
}

/// Guards over every frozen tensor; `None` when the model does not live on the CPU in f32
/// (or int8 block linears): the engine's CPU bodies cover those; others run the reference.
pub(crate) fn hold_model(model: &Llama) -> Option<Vec<Held<'_>>> {
    frozen_tensors(model).into_iter().map(Held::new).collect()
}

/// Guards over every LoRA parameter in `named_vars` order (A then B per module).
pub(crate) fn hold_adapter(adapter: &LoraAdapter) -> Result<Vec<Held<'_>>> {
    adapter
        .named_vars()
        .into_iter()
        .map(|(name, v)| {
            Held::new(v.as_tensor())
                .ok_or_else(|| Error::Invalid(format!("LoRA parameter {name} is not f32 on the CPU")))
        })
        .collect()
}

/// One block's frozen weights.
pub(crate) struct BlockWeights<'a> {
    pub norm1: &'a [f32],
    pub norm2: &'a [f32],
    /// q, k, v, o, gate, up, down.
    pub lin: Vec<Frozen<'a>>,
    /// The concatenated `[q; k; v]` and `[gate; up]` weights (dense models), for one GEMM
    /// per shared input.
    pub qkv: Option<Frozen<'a>>,
    pub gate_up: Option<Frozen<'a>>,
}

/// The whole model's frozen weights as slices.
pub(crate) struct ModelWeights<'a> {
    pub embed: &'a [f32],
    pub norm: &'a [f32],
    pub head: Head<'a>,
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    pub blocks: Vec<BlockWeights<'a>>,
}

impl<'a> ModelWeights<'a> {
    /// Slices of `held` (from [`hold_model`] on the same model), in its walk order.
    pub(crate) fn new(model: &'a Llama, held: &'a [Held<'_>]) -> Self {
        let mut it = held.iter();
        let mut next = || it.next().expect("hold_model walks the same tensors");
        let (embed, norm, head, cos, sin) =
            (next().slice(), next().slice(), next().slice(), next().slice(), next().slice());
        let head = model.bf16_head().map_or(Head::F32(head), |h| Head::Bf16(h.weight()));
        let c = model.config();
        let blocks = model
            .parts()
            .1
            .iter()
            .map(|b| {
                let (norm1, norm2) = (next().slice(), next().slice());
                let lin = b
                    .linears
                    .iter()
                    .enumerate()
                    .map(|(m, l)| {
                        let (inp, out) = crate::lora::module_shape(c, m);
                        let (w, has_bias) = match l {
                            BaseLinear::Dense(l) => (Weight::F32(next().slice()), l.bias().is_some()),
                            BaseLinear::Bf16(l) => (Weight::Bf16(l.weight()), l.bias().is_some()),
                            BaseLinear::Int8(l) => {
                                let group = l.quantized_parts().2;
                                let (q, scales) = (next().bytes(), next().slice());
                                let w = l.packed().map_or(Weight::Int8 { q, scales, group }, Weight::Int8Packed);
                                (w, l.bias().is_some())
                            }
                        };
                        let bias = has_bias.then(|| next().slice());
                        Frozen { w, bias, out, inp }
                    })
                    .collect();
                debug_assert_eq!(LINEAR_MODULES.len(), b.linears.len());
                let [qkv, gate_up] = [0, 1].map(|i| {
                    b.fused[i].as_ref().map(|t| {
                        let (out, inp) = (t.dims()[0], t.dims()[1]);
                        Frozen { w: Weight::F32(next().slice()), bias: None, out, inp }
                    })
                });
                // q, k, v and gate, up in LINEAR_MODULES order.
                let [qkv, gate_up] = [(qkv, 0..3), (gate_up, 4..6)]
                    .map(|(dense, range)| dense.or_else(|| shared_pack(&b.linears[range])));
                BlockWeights { norm1, norm2, lin, qkv, gate_up }
            })
            .collect();
        Self { embed, norm, head, cos, sin, blocks }
    }
}

/// The one pack that bf16 or int8 modules sharing an input (q|k|v, gate|up) are consecutive
/// views of, as a single weight; `None` when they were packed apart (or are neither).
fn shared_pack(linears: &[BaseLinear]) -> Option<Frozen<'_>> {
    let frozen = |w, (out, inp)| Frozen { w, bias: None, out, inp };
    match linears.first()? {
        BaseLinear::Bf16(_) => {
            let p = consecutive_views(linears, |l| match l {
                BaseLinear::Bf16(l) => Some((l.packed(), l.dims().0)),
                _ => None,
            })?;
            (p.1 == p.0.dims().0).then(|| frozen(Weight::Bf16(p.0.full()), p.0.dims()))
        }
        BaseLinear::Int8(_) => {
            let p = consecutive_views(linears, |l| match l {
                BaseLinear::Int8(l) => Some((l.shared_pack()?, l.dims().0)),
                _ => None,
            })?;
            (p.1 == p.0.dims().0).then(|| frozen(Weight::Int8Packed(p.0.full()), p.0.dims()))
        }
        BaseLinear::Dense(_) => None,
    }
}

/// The pack that `view(l)` (its pack, first row, and rows) makes every linear a consecutive
/// share of, and the rows they cover from its first.
fn consecutive_views<'a, P>(
    linears: &'a [BaseLinear],
    view: impl Fn(&'a BaseLinear) -> Option<((&'a Arc<P>, usize), usize)>,
) -> Option<(&'a P, usize)> {
    let mut next_row = 0;
    let mut pack: Option<&Arc<P>> = None;
    for l in linears {
        let ((p, r0), rows) = view(l)?;
        if r0 != next_row || pack.is_some_and(|q| !Arc::ptr_eq(q, p)) {
            return None;
        }
        pack = Some(p);
        next_row += rows;
    }
    Some((&**pack?, next_row))
}
