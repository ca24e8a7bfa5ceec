//! The Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2) as frozen weights.
//!
//! Adapters are not part of the model: every forward takes the adapter to apply (or none),
//! so one loaded base serves several adapters (PEFT's `set_adapter`) and training and
//! evaluation share one code path.

mod block;
mod linear;
pub mod mask;
pub mod rope_tables;

pub use block::{Block, LayerCache};
pub use linear::{BaseLinear, Quantization};

use crate::dropout::Dropout;
use crate::error::{Error, Result};
use crate::lora::LoraAdapter;
use crate::weights::WeightFiles;
use candle_core::{DType, Device, Tensor};
use lorafleet_common::peft::LINEAR_MODULES;
use lorafleet_common::{checkpoint, ModelConfig};
use lorafleet_kernels::{Bf16Linear, FrozenLinear, RmsNorm, Rope};
use std::path::Path;

/// What a forward pass applies besides the frozen weights.
pub struct ForwardCtx<'a> {
    /// The LoRA adapter, if any.
    pub adapter: Option<&'a LoraAdapter>,
    /// LoRA dropout (training) or none (evaluation).
    pub dropout: &'a Dropout,
    /// Additive attention mask `[rows, 1, q, kv]`, if anything is masked.
    pub mask: Option<Tensor>,
}

/// A loaded base model.
pub struct Llama {
    config: ModelConfig,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: FrozenLinear,
    /// The head packed in bf16 (`torch_dtype = bf16`), which then computes every product
    /// with it; `lm_head` keeps the f32 weight (tied embeddings, the engine's walk).
    bf16_head: Option<Bf16Linear>,
    rope: Rope,
    dtype: DType,
    device: Device,
}

impl Llama {
    /// Loads the model in `dir` (config.json + safetensors) as `dtype` on `device`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_quantized(dir, dtype, device, Quantization::None)
    }

    /// Loads the model with its block linears stored as `quantization` says. Quantization
    /// streams: each weight is read, quantized and dropped before the next is read, so the
    /// full-precision model is never in memory.
    pub fn load_quantized(dir: &Path, dtype: DType, device: &Device, quantization: Quantization) -> Result<Self> {
        let config = ModelConfig::from_dir(dir)?;
        let files = WeightFiles::open(&checkpoint::weight_files(dir)?)?;
        Self::from_weights(config, &files, dtype, device, quantization)
    }

    /// Builds the model from already opened weight files.
    pub fn from_weights(
        config: ModelConfig,
        files: &WeightFiles,
        dtype: DType,
        device: &Device,
        quantization: Quantization,
    ) -> Result<Self> {
        let c = &config;
        let (h, v) = (c.hidden_size, c.vocab_size);
        let load = |name: &str, shape: &[usize]| files.load(name, Some(shape), dtype, device);
        // int8 weights are quantized on the host and only their int8 form goes to the device.
        let linear_device = match quantization {
            Quantization::None => device.clone(),
            Quantization::Int8 { .. } => Device::Cpu,
            Quantization::Bf16 if !device.is_cpu() => {
                return Err(Error::Invalid(
                    "torch_dtype bf16 is the CPU's narrow compute; on a GPU the base already runs in bf16".into(),
                ))
            }
            Quantization::Bf16 => Device::Cpu,
        };
        let load_linear = |name: &str, shape: &[usize]| files.load(name, Some(shape), dtype, &linear_device);
        if let Quantization::Int8 { group: Some(g) } = quantization {
            for (m, name) in LINEAR_MODULES.iter().enumerate() {
                let fan_in = crate::lora::module_shape(c, m).0;
                if g == 0 || !fan_in.is_multiple_of(g) {
                    return Err(Error::Invalid(format!(
                        "int8 group size {g} does not divide the {fan_in} input features of {name}"
                    )));
                }
            }
        }
        let embed = load("model.embed_tokens.weight", &[v, h])?;
        let mut blocks = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let mut weights = Vec::with_capacity(LINEAR_MODULES.len());
            let mut biases = Vec::with_capacity(LINEAR_MODULES.len());
            for (m, name) in LINEAR_MODULES.iter().enumerate() {
                let group = if m >= block::GATE { "mlp" } else { "self_attn" };
                let (fan_in, fan_out) = crate::lora::module_shape(c, m);
                weights.push(load_linear(&format!("{p}.{group}.{name}.weight"), &[fan_out, fan_in])?);
                let has_bias = match m {
                    block::Q | block::K | block::V => c.qkv_bias,
                    block::O => c.o_bias,
                    _ => c.mlp_bias,
                };
                biases.push(if has_bias { Some(load(&format!("{p}.{group}.{name}.bias"), &[fan_out])?) } else { None });
            }
            // Dense modules that share an input are stored as one concatenated weight
            // (q|k|v, gate|up) and each module's weight is a view of it: the training engine
            // runs one GEMM over each, the reference model is unchanged.
            let mut fused = [None, None];
            if quantization == Quantization::None {
                for (slot, range) in fused.iter_mut().zip([block::Q..block::O, block::GATE..block::DOWN]) {
                    let cat = Tensor::cat(&weights[range.clone()], 0)?;
                    let mut row = 0;
                    for m in range {
                        let rows = weights[m].dims()[0];
                        weights[m] = cat.narrow(0, row, rows)?;
                        row += rows;
                    }
                    *slot = Some(cat);
                }
            }
            let linears = match quantization {
                // (int8 is quantized on the host for any device: only a CPU model shares packs.)
                Quantization::Bf16 | Quantization::Int8 { group: None } if device.is_cpu() => {
                    shared_linears(weights, biases, quantization)?
                }
                _ => weights
                    .into_iter()
                    .zip(biases)
                    .map(|(w, b)| BaseLinear::new(w, b, quantization, device))
                    .collect::<Result<Vec<_>>>()?,
            };
            blocks.push(Block {
                index: i,
                input_norm: RmsNorm::new(load(&format!("{p}.input_layernorm.weight"), &[h])?, c.rms_norm_eps)?,
                post_norm: RmsNorm::new(load(&format!("{p}.post_attention_layernorm.weight"), &[h])?, c.rms_norm_eps)?,
                linears,
                fused,
                heads: c.num_attention_heads,
                kv_heads: c.num_key_value_heads,
                head_dim: c.head_dim,
            });
        }
        let norm = RmsNorm::new(load("model.norm.weight", &[h])?, c.rms_norm_eps)?;
        let head_weight = if c.tie_word_embeddings { embed.clone() } else { load("lm_head.weight", &[v, h])? };
        let lm_head = FrozenLinear::new(head_weight, None)?;
        let rope = rope_tables::tables(c, c.max_position_embeddings.max(1), device)?;
        let model = Self { config, embed, blocks, norm, lm_head, bf16_head: None, rope, dtype, device: device.clone() };
        if quantization == Quantization::Bf16 {
            return model.with_bf16_head();
        }
        Ok(model)
    }

    /// The same model with its output head's products in bf16 (what `torch_dtype = bf16`
    /// gives: with bf16 block linears, or beside int8 ones as `load_in_8bit` with a bf16
    /// `torch_dtype` does in transformers). CPU only.
    pub fn with_bf16_head(mut self) -> Result<Self> {
        if !self.device.is_cpu() {
            return Err(Error::Invalid(
                "torch_dtype bf16 is the CPU's narrow compute; on a GPU the base already runs in bf16".into(),
            ));
        }
        let w = self.lm_head.weight();
        let rows = w.dims2()?.0;
        self.bf16_head = Some(Bf16Linear::new(linear::pack_bf16(w)?, 0, rows, None)?);
        Ok(self)
    }

    /// The bf16 head, when the model has one ([`Llama::with_bf16_head`]).
    pub fn bf16_head(&self) -> Option<&Bf16Linear> {
        self.bf16_head.as_ref()
    }

    /// The frozen parts the training engine reads: embeddings, blocks, final norm, output
    /// head and rotary tables.
    pub(crate) fn parts(&self) -> (&Tensor, &[Block], &RmsNorm, &FrozenLinear, &Rope) {
        (&self.embed, &self.blocks, &self.norm, &self.lm_head, &self.rope)
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The compute dtype of the frozen weights.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device holding the weights.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Number of decoder blocks.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Every frozen tensor of the model (for tests that prove none of them gets a gradient).
    pub fn frozen_tensors(&self) -> Vec<&Tensor> {
        let mut out = vec![&self.embed, self.norm.weight(), self.lm_head.weight()];
        for b in &self.blocks {
            out.extend([b.input_norm.weight(), b.post_norm.weight()]);
            for l in &b.linears {
                out.extend(l.tensors());
            }
        }
        out
    }

    /// Token embeddings of `ids` `[rows, seq]`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (rows, seq) = ids.dims2()?;
        if let Some(bad) =
            ids.flatten_all()?.to_vec1::<u32>()?.into_iter().find(|&i| i as usize >= self.config.vocab_size)
        {
            return Err(Error::Invalid(format!(
                "token id {bad} outside the model's vocabulary of {}",
                self.config.vocab_size
            )));
        }
        Ok(self.embed.index_select(&ids.flatten_all()?, 0)?.reshape((rows, seq, self.config.hidden_size))?)
    }

    /// Runs block `i`.
    pub fn block(&self, i: usize, x: &Tensor, ctx: &ForwardCtx<'_>, cache: Option<&mut LayerCache>) -> Result<Tensor> {
        let needed = cache.as_ref().map_or(0, |c| c.len()) + x.dims()[1];
        if needed > self.rope.len() {
            return Err(Error::Invalid(format!(
                "sequence of {needed} tokens is longer than the model's {} positions",
                self.rope.len()
            )));
        }
        self.blocks[i].forward(x, &self.rope, ctx, cache)
    }

    /// The final norm.
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.norm.forward(x)?)
    }

    /// The output head's weight `[vocab, hidden]`.
    pub fn head_weight(&self) -> &Tensor {
        self.lm_head.weight()
    }

    /// Output-head logits in f32 for hidden states `[..., hidden]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        if let Some(head) = &self.bf16_head {
            return Ok(head.forward(&hidden.to_dtype(DType::F32)?)?);
        }
        Ok(self.lm_head.forward(hidden)?.to_dtype(DType::F32)?)
    }

    /// The context of a full, uncached forward pass over `rows × seq` tokens.
    pub fn context<'a>(
        &self,
        rows: usize,
        seq: usize,
        attention_mask: Option<&[u8]>,
        adapter: Option<&'a LoraAdapter>,
        dropout: &'a Dropout,
    ) -> Result<ForwardCtx<'a>> {
        let mask = mask::attention_mask(rows, seq, seq, attention_mask, self.config.sliding_window, &self.device)?;
        Ok(ForwardCtx { adapter, dropout, mask })
    }

    /// Final hidden states (after the last norm) for a full, uncached forward pass.
    pub fn hidden_states(
        &self,
        ids: &Tensor,
        attention_mask: Option<&[u8]>,
        adapter: Option<&LoraAdapter>,
        dropout: &Dropout,
    ) -> Result<Tensor> {
        let (rows, seq) = ids.dims2()?;
        let ctx = self.context(rows, seq, attention_mask, adapter, dropout)?;
        let mut x = self.embed(ids)?;
        for i in 0..self.blocks.len() {
            x = self.block(i, &x, &ctx, None)?;
        }
        self.final_norm(&x)
    }

    /// Logits `[rows, seq, vocab]` of every position (evaluation mode, no dropout).
    pub fn forward_logits(
        &self,
        ids: &Tensor,
        attention_mask: Option<&[u8]>,
        adapter: Option<&LoraAdapter>,
    ) -> Result<Tensor> {
        let hidden = self.hidden_states(ids, attention_mask, adapter, &Dropout::Off)?;
        self.logits(&hidden)
    }

    /// Logits of the last position after feeding `ids` `[1, n]` through the KV cache.
    pub fn forward_cached(
        &self,
        ids: &Tensor,
        cache: &mut [LayerCache],
        adapter: Option<&LoraAdapter>,
    ) -> Result<Tensor> {
        let (rows, seq) = ids.dims2()?;
        let past = cache.first().map_or(0, LayerCache::len);
        let mask = mask::attention_mask(rows, seq, past + seq, None, self.config.sliding_window, &self.device)?;
        let ctx = ForwardCtx { adapter, dropout: &Dropout::Off, mask };
        let mut x = self.embed(ids)?;
        for (i, c) in cache.iter_mut().enumerate() {
            x = self.block(i, &x, &ctx, Some(c))?;
        }
        let last = self.final_norm(&x.narrow(1, seq - 1, 1)?)?;
        Ok(self.logits(&last)?.flatten_all()?)
    }

    /// An empty KV cache, one entry per block.
    pub fn new_cache(&self) -> Vec<LayerCache> {
        self.blocks.iter().map(|_| LayerCache::default()).collect()
    }
}

/// A block's seven linears in bf16, or in int8 with one scale per row (on the CPU). Modules
/// that share an input (q|k|v, gate|up) share one pack of their concatenated weight, each a
/// view of its rows, so the training engine runs one product per shared input as it does in
/// f32; where a module's rows would not start a 16-row panel, every module is packed on its
/// own.
fn shared_linears(
    weights: Vec<Tensor>,
    biases: Vec<Option<Tensor>>,
    quantization: Quantization,
) -> Result<Vec<BaseLinear>> {
    use lorafleet_kernels::{Bf16Linear, Int8Linear};
    let mut out = Vec::with_capacity(weights.len());
    let mut biases = biases.into_iter();
    for range in [block::Q..block::O, block::O..block::GATE, block::GATE..block::DOWN, block::DOWN..block::DOWN + 1] {
        let bias: Vec<Option<Tensor>> = range.clone().map(|_| biases.next().flatten()).collect();
        let weights = &weights[range];
        if quantization != Quantization::Bf16 {
            out.extend(Int8Linear::quantize_shared(weights, bias)?.into_iter().map(BaseLinear::Int8));
            continue;
        }
        let rows: Vec<usize> = weights.iter().map(|w| w.dims()[0]).collect();
        let starts: Vec<usize> = rows.iter().scan(0, |r, &n| Some(std::mem::replace(r, *r + n))).collect();
        let shared = starts.iter().all(|s| s.is_multiple_of(16));
        let packed = if shared { Some(linear::pack_bf16(&Tensor::cat(weights, 0)?)?) } else { None };
        for (i, (w, bias)) in weights.iter().zip(bias).enumerate() {
            out.push(match &packed {
                Some(p) => BaseLinear::Bf16(Bf16Linear::new(p.clone(), starts[i], rows[i], bias)?),
                None => BaseLinear::new(w.clone(), bias, Quantization::Bf16, &Device::Cpu)?,
            });
        }
    }
    Ok(out)
}
