//! `config.json` of a Hugging Face causal LM, normalised across architectures and
//! across the transformers-4 and transformers-5 spellings.

use crate::error::{FormatError, Result};
use crate::json::{read_json_file, JsonObject};
use serde_json::Value;
use std::path::Path;

/// The model families whose decoder we implement. They share one block structure
/// (pre-norm RMSNorm, rotary attention with GQA, SwiGLU MLP) and differ in small details.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2, 3, 3.1 and their derivatives (`model_type: llama`).
    Llama,
    /// Mistral (`model_type: mistral`): Llama plus an optional sliding attention window.
    Mistral,
    /// Qwen2 (`model_type: qwen2`): Llama plus biases on the q, k and v projections.
    Qwen2,
}

impl Architecture {
    /// The `model_type` string of this architecture.
    pub fn model_type(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
        }
    }
}

/// How rotary frequencies are derived from `rope_theta`.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Positions divided by `factor` (transformers' `linear`).
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling (transformers' `llama3`).
    Llama3 {
        /// Scale applied to low frequencies.
        factor: f64,
        /// Wavelength threshold (as a fraction of the original context) for low frequencies.
        low_freq_factor: f64,
        /// Wavelength threshold for high frequencies.
        high_freq_factor: f64,
        /// Context length the base model was trained with.
        original_max_position_embeddings: usize,
    },
}

/// The configuration of a decoder-only model, with every spelling resolved.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// Which family; decides the bias and window details.
    pub architecture: Architecture,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of transformer blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Per-head width (may differ from hidden/heads).
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE frequency scaling.
    pub rope_scaling: RopeScaling,
    /// Longest position the rotary tables are built for (they grow on demand).
    pub max_position_embeddings: usize,
    /// Whether `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Biases on q, k, v.
    pub qkv_bias: bool,
    /// Bias on o_proj.
    pub o_bias: bool,
    /// Biases on the MLP projections.
    pub mlp_bias: bool,
    /// Mistral's sliding attention window, if any.
    pub sliding_window: Option<usize>,
    /// `dtype`/`torch_dtype` as stored, if any.
    pub dtype: Option<String>,
    /// `bos_token_id`.
    pub bos_token_id: Option<u32>,
    /// `eos_token_id` (one or several).
    pub eos_token_ids: Vec<u32>,
    /// `pad_token_id`.
    pub pad_token_id: Option<u32>,
    /// The file as read, kept so that a merged model can be written with every field the user had.
    pub raw: Value,
}

impl ModelConfig {
    /// Reads `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        if !path.is_file() {
            return Err(FormatError::invalid(&path, "missing: a model folder needs config.json"));
        }
        let raw = read_json_file(&path)?;
        Self::from_value(&path, raw)
    }

    /// Parses a `config.json` already in memory; `path` is only used in messages.
    pub fn from_value(path: &Path, raw: Value) -> Result<Self> {
        let obj = JsonObject::new(path, &raw)?;
        let model_type = obj.opt_str("model_type")?.ok_or_else(|| obj.error("model_type", "missing"))?;
        let architecture = match model_type {
            "llama" => Architecture::Llama,
            "mistral" => Architecture::Mistral,
            "qwen2" => Architecture::Qwen2,
            other => {
                return Err(obj.error(
                    "model_type",
                    format!("unsupported model type {other:?}; supported: llama, mistral, qwen2"),
                ))
            }
        };
        let hidden_act = obj.opt_str("hidden_act")?.unwrap_or("silu");
        if hidden_act != "silu" {
            return Err(obj.error("hidden_act", format!("only silu is supported, found {hidden_act:?}")));
        }
        let hidden_size = obj.usize("hidden_size")?;
        let num_attention_heads = obj.usize("num_attention_heads")?;
        let num_key_value_heads = obj.opt_usize("num_key_value_heads")?.unwrap_or(num_attention_heads);
        if num_attention_heads == 0 || num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(obj.error(
                "num_key_value_heads",
                format!("{num_key_value_heads} key/value heads do not divide {num_attention_heads} attention heads"),
            ));
        }
        let head_dim = match obj.opt_usize("head_dim")? {
            Some(d) => d,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => {
                return Err(obj.error("head_dim", "missing and hidden_size is not a multiple of num_attention_heads"))
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(
                obj.error("head_dim", format!("rotary embeddings need an even, non-zero head_dim, found {head_dim}"))
            );
        }
        let (rope_theta, rope_scaling) = rope(&obj)?;
        let attention_bias = obj.opt_bool("attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias) = match architecture {
            Architecture::Qwen2 => (true, false),
            _ => (attention_bias, attention_bias),
        };
        let sliding_window = match architecture {
            Architecture::Mistral => match obj.opt_usize("sliding_window")? {
                Some(0) => return Err(obj.error("sliding_window", "a window of 0 tokens hides every key")),
                w => w,
            },
            Architecture::Qwen2 if obj.opt_bool("use_sliding_window")?.unwrap_or(false) => {
                return Err(obj.error("use_sliding_window", "Qwen2's per-layer sliding window is not supported"))
            }
            _ => None,
        };
        let config = Self {
            architecture,
            vocab_size: obj.usize("vocab_size")?,
            hidden_size,
            intermediate_size: obj.usize("intermediate_size")?,
            num_hidden_layers: obj.usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: obj.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: obj.opt_usize("max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings: obj.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: obj.opt_bool("mlp_bias")?.unwrap_or(false),
            sliding_window,
            dtype: obj.opt_str("dtype")?.or(obj.opt_str("torch_dtype")?).map(str::to_owned),
            bos_token_id: obj.token_ids("bos_token_id")?.first().copied(),
            eos_token_ids: obj.token_ids("eos_token_id")?,
            pad_token_id: obj.token_ids("pad_token_id")?.first().copied(),
            raw: raw.clone(),
        };
        for (name, v) in [
            ("vocab_size", config.vocab_size),
            ("hidden_size", hidden_size),
            ("num_hidden_layers", config.num_hidden_layers),
        ] {
            if v == 0 {
                return Err(obj.error(name, "must be positive"));
            }
        }
        Ok(config)
    }

    /// The config as written into a merged model: the user's fields, with the dtype replaced
    /// under whichever spelling the file used.
    pub fn with_dtype(&self, dtype: &str) -> Value {
        let mut raw = self.raw.clone();
        if let Some(map) = raw.as_object_mut() {
            let key =
                if map.contains_key("torch_dtype") && !map.contains_key("dtype") { "torch_dtype" } else { "dtype" };
            map.insert(key.to_owned(), Value::String(dtype.to_owned()));
        }
        raw
    }
}

/// Resolves `rope_theta` and the scaling from either `rope_parameters` (transformers 5)
/// or top-level `rope_theta` + `rope_scaling` (transformers 4).
fn rope(obj: &JsonObject<'_>) -> Result<(f64, RopeScaling)> {
    let params = obj.opt_object("rope_parameters")?;
    let legacy = obj.opt_object("rope_scaling")?;
    let theta = match params.as_ref().map(|p| p.opt_f64("rope_theta")).transpose()?.flatten() {
        Some(t) => t,
        None => obj.opt_f64("rope_theta")?.unwrap_or(10000.0),
    };
    let source = params.as_ref().or(legacy.as_ref());
    let Some(src) = source else { return Ok((theta, RopeScaling::Default)) };
    let kind = match src.opt_str("rope_type")? {
        Some(k) => k,
        None => src.opt_str("type")?.unwrap_or("default"),
    };
    let factor = |src: &JsonObject<'_>| src.opt_f64("factor")?.ok_or_else(|| src.error("factor", "missing"));
    let scaling = match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: factor(src)? },
        "llama3" => RopeScaling::Llama3 {
            factor: factor(src)?,
            low_freq_factor: src.opt_f64("low_freq_factor")?.ok_or_else(|| src.error("low_freq_factor", "missing"))?,
            high_freq_factor: src
                .opt_f64("high_freq_factor")?
                .ok_or_else(|| src.error("high_freq_factor", "missing"))?,
            original_max_position_embeddings: src
                .opt_usize("original_max_position_embeddings")?
                .ok_or_else(|| src.error("original_max_position_embeddings", "missing"))?,
        },
        other => {
            return Err(
                src.error("rope_type", format!("unsupported rope type {other:?}; supported: default, linear, llama3"))
            )
        }
    };
    Ok((theta, scaling))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<ModelConfig> {
        ModelConfig::from_value(Path::new("config.json"), v)
    }

    fn llama() -> Value {
        json!({"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
               "num_hidden_layers": 2, "num_attention_heads": 4})
    }

    #[test]
    fn transformers4_and_5_spellings_agree() {
        let mut v4 = llama();
        v4["rope_theta"] = json!(500000.0);
        v4["torch_dtype"] = json!("bfloat16");
        v4["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let mut v5 = llama();
        v5["dtype"] = json!("bfloat16");
        v5["rope_parameters"] = json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let (a, b) = (parse(v4).unwrap(), parse(v5).unwrap());
        assert_eq!(a.rope_theta, 500000.0);
        assert_eq!(a.rope_theta, b.rope_theta);
        assert_eq!(a.rope_scaling, b.rope_scaling);
        assert!(matches!(a.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        assert_eq!(a.dtype.as_deref(), Some("bfloat16"));
        assert_eq!(b.dtype.as_deref(), Some("bfloat16"));
        assert_eq!(a.with_dtype("float16")["torch_dtype"], "float16");
        assert_eq!(b.with_dtype("float16")["dtype"], "float16");
    }

    #[test]
    fn legacy_type_key_and_defaults() {
        let mut v = llama();
        v["rope_scaling"] = json!({"type": "linear", "factor": 2.0});
        let c = parse(v).unwrap();
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 2.0 });
        assert_eq!(c.num_key_value_heads, 4);
        assert_eq!(c.head_dim, 4);
        assert_eq!(c.rope_theta, 10000.0);
        assert!(!c.tie_word_embeddings);
    }

    #[test]
    fn architectures_differ_in_biases_and_window() {
        let mut q = llama();
        q["model_type"] = json!("qwen2");
        q["num_key_value_heads"] = json!(2);
        q["tie_word_embeddings"] = json!(true);
        let q = parse(q).unwrap();
        assert_eq!(
            (q.architecture, q.qkv_bias, q.o_bias, q.tie_word_embeddings),
            (Architecture::Qwen2, true, false, true)
        );
        let mut m = llama();
        m["model_type"] = json!("mistral");
        m["sliding_window"] = json!(4096);
        let m = parse(m).unwrap();
        assert_eq!((m.architecture, m.sliding_window, m.qkv_bias), (Architecture::Mistral, Some(4096), false));
        let mut l = llama();
        l["attention_bias"] = json!(true);
        l["head_dim"] = json!(8);
        l["eos_token_id"] = json!([128001, 128008, 128009]);
        let l = parse(l).unwrap();
        assert_eq!((l.qkv_bias, l.o_bias, l.head_dim), (true, true, 8));
        assert_eq!(l.eos_token_ids, vec![128001, 128008, 128009]);
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            ("model_type", json!("gpt2"), "model_type"),
            ("hidden_size", json!("big"), "hidden_size"),
            ("num_key_value_heads", json!(3), "num_key_value_heads"),
            ("hidden_act", json!("gelu"), "hidden_act"),
            ("rope_scaling", json!({"rope_type": "yarn", "factor": 4.0}), "rope_scaling.rope_type"),
            ("rope_parameters", json!({"rope_type": "linear"}), "rope_parameters.factor"),
        ];
        for (key, value, field) in cases {
            let mut v = llama();
            v[key] = value;
            let msg = parse(v).unwrap_err().to_string();
            assert!(msg.starts_with("config.json: field `") && msg.contains(&format!("`{field}`")), "{key}: {msg}");
        }
        let mut v = llama();
        v.as_object_mut().unwrap().remove("vocab_size");
        assert!(parse(v).unwrap_err().to_string().contains("`vocab_size`: missing"));
    }
}
