//! LoRA parameters with PEFT semantics: one `(A, B)` pair per targeted linear layer, kept
//! in f32 whatever the base dtype.

use crate::dropout::Dropout;
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use lorafleet_common::peft::{tensor_key, LINEAR_MODULES};
use lorafleet_common::{LoraConfig, LoraInit, ModelConfig};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, Uniform};

/// One adapted linear layer: `delta = scaling · dropout(x) · Aᵀ · Bᵀ`.
pub struct LoraPair {
    /// `[r, in]`.
    pub a: Var,
    /// `[out, r]`.
    pub b: Var,
    /// alpha / r (or alpha / sqrt(r)).
    pub scaling: f64,
    /// Dropout probability on the branch input.
    pub dropout: f64,
}

impl LoraPair {
    /// The LoRA branch's contribution for `x` of shape `[rows, seq, in]`, in f32.
    pub fn delta(&self, x: &Tensor, dropout: &Dropout, layer: usize, module: usize) -> Result<Tensor> {
        let (rows, seq, features) = x.dims3()?;
        let mut x = x.to_dtype(DType::F32)?;
        if let Some(mask) = dropout.mask(self.dropout, layer, module, seq, features, x.device())? {
            x = (x * mask)?;
        }
        let x2 = x.reshape((rows * seq, features))?;
        let low = x2.matmul(&self.a.as_tensor().t()?)?;
        let out = low.matmul(&self.b.as_tensor().t()?)?;
        let out = (out * self.scaling)?;
        Ok(out.reshape((rows, seq, self.b.dims()[0]))?)
    }
}

/// The input and output widths of linear module `module` (index into `LINEAR_MODULES`).
pub fn module_shape(config: &ModelConfig, module: usize) -> (usize, usize) {
    let h = config.hidden_size;
    let q = config.num_attention_heads * config.head_dim;
    let kv = config.num_key_value_heads * config.head_dim;
    let i = config.intermediate_size;
    match LINEAR_MODULES[module] {
        "q_proj" => (h, q),
        "k_proj" | "v_proj" => (h, kv),
        "o_proj" => (q, h),
        "gate_proj" | "up_proj" => (h, i),
        _ => (i, h),
    }
}

/// A named LoRA adapter over a whole model.
pub struct LoraAdapter {
    /// Its configuration.
    pub config: LoraConfig,
    /// `layers[l][m]` is the pair on module `LINEAR_MODULES[m]` of block `l`, if targeted.
    layers: Vec<Vec<Option<LoraPair>>>,
}

impl LoraAdapter {
    /// A fresh adapter initialised as PEFT does (A random, B zero), from a seeded RNG.
    pub fn init(config: LoraConfig, model: &ModelConfig, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let init = config.init;
        let adapter = Self::from_tensors(config, model, |_, _, which, (rows, cols)| {
            if which == "lora_B" {
                return Ok(Tensor::zeros((rows, cols), DType::F32, device)?);
            }
            // A is [r, in]: Kaiming-uniform bound 1/sqrt(in), or N(0, 1/r).
            let a: Vec<f32> = match init {
                LoraInit::KaimingUniform => {
                    let bound = 1.0 / (cols as f32).sqrt();
                    let dist = Uniform::new(-bound, bound).map_err(|e| Error::Invalid(e.to_string()))?;
                    (0..rows * cols).map(|_| dist.sample(&mut rng)).collect()
                }
                LoraInit::Gaussian => {
                    let dist = Normal::new(0.0, 1.0 / rows as f32).map_err(|e| Error::Invalid(e.to_string()))?;
                    (0..rows * cols).map(|_| dist.sample(&mut rng)).collect()
                }
            };
            Ok(Tensor::from_vec(a, (rows, cols), device)?)
        })?;
        if adapter.named_vars().is_empty() {
            return Err(Error::Invalid(format!(
                "target_modules {:?} match no linear layer of this model",
                adapter.config.target_modules
            )));
        }
        Ok(adapter)
    }

    /// Builds an adapter from explicit tensors; `get(layer, module, which)` returns the
    /// `lora_A`/`lora_B` tensor of a targeted module.
    pub fn from_tensors(
        config: LoraConfig,
        model: &ModelConfig,
        mut get: impl FnMut(usize, usize, &str, (usize, usize)) -> Result<Tensor>,
    ) -> Result<Self> {
        let mut layers = Vec::with_capacity(model.num_hidden_layers);
        for l in 0..model.num_hidden_layers {
            let mut row = Vec::with_capacity(LINEAR_MODULES.len());
            for (m, name) in LINEAR_MODULES.iter().enumerate() {
                if !config.targets(l, name) {
                    row.push(None);
                    continue;
                }
                let (fan_in, fan_out) = module_shape(model, m);
                let r = config.rank_for(l, name);
                let a = get(l, m, "lora_A", (r, fan_in))?;
                let b = get(l, m, "lora_B", (fan_out, r))?;
                row.push(Some(Self::pair(&config, l, name, a, b)?));
            }
            layers.push(row);
        }
        Ok(Self { config, layers })
    }

    fn pair(config: &LoraConfig, layer: usize, name: &str, a: Tensor, b: Tensor) -> Result<LoraPair> {
        Ok(LoraPair {
            a: Var::from_tensor(&a.to_dtype(DType::F32)?)?,
            b: Var::from_tensor(&b.to_dtype(DType::F32)?)?,
            scaling: config.scaling_for(layer, name),
            dropout: config.lora_dropout,
        })
    }

    /// The pair on module `module` of block `layer`.
    pub fn get(&self, layer: usize, module: usize) -> Option<&LoraPair> {
        self.layers.get(layer).and_then(|row| row[module].as_ref())
    }

    /// Every parameter with its PEFT key, in a fixed order (layer, module, A before B).
    /// This order is the layout of gradient buckets and optimizer state.
    pub fn named_vars(&self) -> Vec<(String, &Var)> {
        let mut out = Vec::new();
        for (l, row) in self.layers.iter().enumerate() {
            for (m, pair) in row.iter().enumerate() {
                if let Some(p) = pair {
                    out.push((tensor_key(l, LINEAR_MODULES[m], "lora_A"), &p.a));
                    out.push((tensor_key(l, LINEAR_MODULES[m], "lora_B"), &p.b));
                }
            }
        }
        out
    }

    /// The parameters of block `layer`.
    pub fn layer_vars(&self, layer: usize) -> Vec<&Var> {
        self.layers.get(layer).into_iter().flatten().flatten().flat_map(|p| [&p.a, &p.b]).collect()
    }

    /// Number of trainable values.
    pub fn num_parameters(&self) -> usize {
        self.named_vars().iter().map(|(_, v)| v.elem_count()).sum()
    }
}
