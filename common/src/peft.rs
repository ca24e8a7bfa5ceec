//! PEFT's LoRA adapter format: `adapter_config.json` and the tensor key names of
//! `adapter_model.safetensors`.
//!
//! We write only the classic config keys so that old PEFT versions (which reject unknown
//! keys) load our adapters, and read every key a current PEFT writes.

use crate::error::{FormatError, Result};
use crate::json::{read_json_file, JsonObject};
use regex::Regex;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// File name of the adapter's configuration.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// File name of the adapter's tensors.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The linear layers of a decoder block that LoRA can target, in PEFT's naming.
pub const LINEAR_MODULES: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// Which modules an adapter applies to (PEFT's `target_modules`).
#[derive(Clone, Debug, PartialEq)]
pub enum TargetModules {
    /// Module-name suffixes: a module matches when its name equals one or ends with `.` + one.
    Suffixes(Vec<String>),
    /// A regular expression that must match the whole module name.
    Regex(String),
    /// Every linear layer except the output head.
    AllLinear,
}

/// How `lora_A` is initialised for a new adapter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraInit {
    /// PEFT's default: Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)).
    KaimingUniform,
    /// `"gaussian"`: N(0, 1/r).
    Gaussian,
}

/// A LoRA adapter's configuration with PEFT semantics.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    /// Rank.
    pub r: usize,
    /// Scale numerator.
    pub lora_alpha: f64,
    /// Dropout on the LoRA branch's input.
    pub lora_dropout: f64,
    /// Targeted modules.
    pub target_modules: TargetModules,
    /// alpha / sqrt(r) instead of alpha / r.
    pub use_rslora: bool,
    /// Initialisation of new adapters.
    pub init: LoraInit,
    /// Only these layer indices are adapted (`layers_to_transform`), all when `None`.
    pub layers_to_transform: Option<Vec<usize>>,
    /// Per-module rank overrides, keyed by a pattern matched against the module name.
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alpha overrides.
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Recorded for the user's benefit; PEFT writes it.
    pub base_model_name_or_path: Option<String>,
}

impl Default for LoraConfig {
    /// alpaca-lora's defaults.
    fn default() -> Self {
        Self {
            r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.05,
            target_modules: TargetModules::Suffixes(vec!["q_proj".into(), "v_proj".into()]),
            use_rslora: false,
            init: LoraInit::KaimingUniform,
            layers_to_transform: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            base_model_name_or_path: None,
        }
    }
}

/// The name transformers gives a linear layer of block `layer` (`model.layers.0.self_attn.q_proj`).
pub fn module_name(layer: usize, module: &str) -> String {
    let group = if matches!(module, "gate_proj" | "up_proj" | "down_proj") { "mlp" } else { "self_attn" };
    format!("model.layers.{layer}.{group}.{module}")
}

/// The key PEFT saves a LoRA matrix under; `which` is `"lora_A"` or `"lora_B"`.
pub fn tensor_key(layer: usize, module: &str, which: &str) -> String {
    format!("base_model.model.{}.{which}.weight", module_name(layer, module))
}

impl LoraConfig {
    /// Whether the adapter applies to `module` of block `layer`.
    pub fn targets(&self, layer: usize, module: &str) -> bool {
        if let Some(layers) = &self.layers_to_transform {
            if !layers.contains(&layer) {
                return false;
            }
        }
        let name = module_name(layer, module);
        match &self.target_modules {
            TargetModules::AllLinear => LINEAR_MODULES.contains(&module),
            TargetModules::Suffixes(s) => s.iter().any(|t| name == *t || name.ends_with(&format!(".{t}"))),
            TargetModules::Regex(re) => Regex::new(&format!("^(?:{re})$")).map(|r| r.is_match(&name)).unwrap_or(false),
        }
    }

    /// Rank of the adapter on `module` of block `layer`, after `rank_pattern`.
    pub fn rank_for(&self, layer: usize, module: &str) -> usize {
        pattern_value(&self.rank_pattern, &module_name(layer, module)).copied().unwrap_or(self.r)
    }

    /// The LoRA scale on `module` of block `layer`: alpha / r, or alpha / sqrt(r) with rsLoRA.
    pub fn scaling_for(&self, layer: usize, module: &str) -> f64 {
        let r = self.rank_for(layer, module) as f64;
        let alpha = pattern_value(&self.alpha_pattern, &module_name(layer, module)).copied().unwrap_or(self.lora_alpha);
        if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }

    /// Checks values a user can get wrong; `path` names their source in messages.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let err = |field: &str, msg: &str| Err(FormatError::field(path, field, msg));
        if self.r == 0 {
            return err("r", "must be at least 1");
        }
        if !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) {
            return err("lora_alpha", "must be a positive number");
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return err("lora_dropout", "must be in [0, 1)");
        }
        match &self.target_modules {
            TargetModules::Suffixes(s) if s.is_empty() => return err("target_modules", "names no module"),
            TargetModules::Regex(re) => {
                if let Err(e) = Regex::new(re) {
                    return Err(FormatError::field(path, "target_modules", format!("invalid regular expression: {e}")));
                }
            }
            _ => {}
        }
        for key in self.rank_pattern.keys().chain(self.alpha_pattern.keys()) {
            if let Err(e) = Regex::new(key) {
                return Err(FormatError::field(path, "rank_pattern", format!("invalid pattern {key:?}: {e}")));
            }
        }
        Ok(())
    }

    /// Reads `dir/adapter_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join(CONFIG_FILE);
        if !path.is_file() {
            if dir.join("adapter_model.bin").is_file() {
                return Err(FormatError::invalid(dir, "adapter_config.json is missing (and the weights are a .bin)"));
            }
            return Err(FormatError::invalid(&path, "missing: an adapter folder needs adapter_config.json"));
        }
        let raw = read_json_file(&path)?;
        Self::from_value(&path, &raw)
    }

    /// Parses an adapter config already in memory; `path` is only used in messages.
    pub fn from_value(path: &Path, raw: &Value) -> Result<Self> {
        let obj = JsonObject::new(path, raw)?;
        match obj.opt_str("peft_type")? {
            Some("LORA") | None => {}
            Some(other) => {
                return Err(obj.error("peft_type", format!("only LORA adapters are supported, found {other:?}")))
            }
        }
        if obj.opt_bool("use_dora")?.unwrap_or(false) {
            return Err(obj.error("use_dora", "DoRA adapters are not supported"));
        }
        if obj.opt_bool("fan_in_fan_out")?.unwrap_or(false) {
            return Err(obj.error("fan_in_fan_out", "must be false for Llama-family linear layers"));
        }
        match obj.opt_str("bias")? {
            Some("none") | None => {}
            Some(other) => return Err(obj.error("bias", format!("only \"none\" is supported, found {other:?}"))),
        }
        if let Some(m) = obj.get("modules_to_save") {
            if m.as_array().is_none_or(|a| !a.is_empty()) {
                return Err(obj.error("modules_to_save", "fully trained extra modules are not supported"));
            }
        }
        let target_modules = match obj.get("target_modules") {
            None => return Err(obj.error("target_modules", "missing")),
            Some(Value::String(s)) if s == "all-linear" => TargetModules::AllLinear,
            Some(Value::String(s)) => TargetModules::Regex(s.clone()),
            Some(Value::Array(items)) => TargetModules::Suffixes(
                items
                    .iter()
                    .map(|v| {
                        v.as_str().map(str::to_owned).ok_or_else(|| obj.error("target_modules", "expected strings"))
                    })
                    .collect::<Result<_>>()?,
            ),
            Some(v) => return Err(obj.error("target_modules", format!("expected a list or a string, found {v}"))),
        };
        let init = match obj.get("init_lora_weights") {
            None | Some(Value::Bool(true)) => LoraInit::KaimingUniform,
            Some(Value::String(s)) if s == "gaussian" => LoraInit::Gaussian,
            Some(v) => {
                return Err(obj.error("init_lora_weights", format!("supported: true or \"gaussian\", found {v}")))
            }
        };
        let layers_to_transform = match obj.get("layers_to_transform") {
            None => None,
            Some(Value::Number(n)) => Some(vec![n
                .as_u64()
                .ok_or_else(|| obj.error("layers_to_transform", "expected a layer index"))?
                as usize]),
            Some(Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|v| {
                        v.as_u64()
                            .map(|n| n as usize)
                            .ok_or_else(|| obj.error("layers_to_transform", "expected layer indices"))
                    })
                    .collect::<Result<_>>()?,
            ),
            Some(v) => {
                return Err(obj.error("layers_to_transform", format!("expected a list of layer indices, found {v}")))
            }
        };
        let pattern = |key: &str| -> Result<BTreeMap<String, f64>> {
            let Some(value) = obj.get(key) else { return Ok(BTreeMap::new()) };
            let map = value.as_object().ok_or_else(|| obj.error(key, "expected an object"))?;
            map.iter()
                .map(|(k, v)| {
                    v.as_f64()
                        .map(|x| (k.clone(), x))
                        .ok_or_else(|| obj.error(&format!("{key}.{k}"), "expected a number"))
                })
                .collect()
        };
        let rank_pattern = pattern("rank_pattern")?.into_iter().map(|(k, v)| (k, v as usize)).collect();
        let config = Self {
            r: obj.usize("r")?,
            lora_alpha: obj.opt_f64("lora_alpha")?.unwrap_or(8.0),
            lora_dropout: obj.opt_f64("lora_dropout")?.unwrap_or(0.0),
            target_modules,
            use_rslora: obj.opt_bool("use_rslora")?.unwrap_or(false),
            init,
            layers_to_transform,
            rank_pattern,
            alpha_pattern: pattern("alpha_pattern")?,
            base_model_name_or_path: obj.opt_str("base_model_name_or_path")?.map(str::to_owned),
        };
        config.validate(path)?;
        Ok(config)
    }

    /// The classic `adapter_config.json`: sorted keys, two-space indent, as PEFT writes it.
    pub fn to_json(&self) -> String {
        let target = match &self.target_modules {
            TargetModules::AllLinear => json!("all-linear"),
            TargetModules::Regex(r) => json!(r),
            TargetModules::Suffixes(s) => json!(s),
        };
        let alpha = |a: f64| if a.fract() == 0.0 && a.abs() < 1e15 { json!(a as i64) } else { json!(a) };
        let mut m = Map::new();
        m.insert(
            "alpha_pattern".into(),
            Value::Object(self.alpha_pattern.iter().map(|(k, v)| (k.clone(), alpha(*v))).collect()),
        );
        m.insert("base_model_name_or_path".into(), json!(self.base_model_name_or_path));
        m.insert("bias".into(), json!("none"));
        m.insert("fan_in_fan_out".into(), json!(false));
        m.insert("inference_mode".into(), json!(true));
        m.insert(
            "init_lora_weights".into(),
            match self.init {
                LoraInit::KaimingUniform => json!(true),
                LoraInit::Gaussian => json!("gaussian"),
            },
        );
        m.insert("layers_pattern".into(), Value::Null);
        m.insert("layers_to_transform".into(), json!(self.layers_to_transform));
        m.insert("lora_alpha".into(), alpha(self.lora_alpha));
        m.insert("lora_dropout".into(), json!(self.lora_dropout));
        m.insert("modules_to_save".into(), Value::Null);
        m.insert("peft_type".into(), json!("LORA"));
        m.insert("r".into(), json!(self.r));
        m.insert("rank_pattern".into(), json!(self.rank_pattern));
        m.insert("revision".into(), Value::Null);
        m.insert("target_modules".into(), target);
        m.insert("task_type".into(), json!("CAUSAL_LM"));
        m.insert("use_dora".into(), json!(false));
        m.insert("use_rslora".into(), json!(self.use_rslora));
        let mut text = serde_json::to_string_pretty(&Value::Object(m)).expect("a JSON map always serialises");
        text.push('\n');
        text
    }
}

/// PEFT's pattern lookup: the first key `k` for which `(^|.*\.)k$` matches the module name.
fn pattern_value<'m, V>(patterns: &'m BTreeMap<String, V>, name: &str) -> Option<&'m V> {
    patterns
        .iter()
        .find_map(|(k, v)| Regex::new(&format!(r"^(?:.*\.)?(?:{k})$")).ok().filter(|re| re.is_match(name)).map(|_| v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<LoraConfig> {
        LoraConfig::from_value(Path::new("adapter_config.json"), &v)
    }

    #[test]
    fn target_matching_follows_peft() {
        let c = LoraConfig::default();
        assert!(c.targets(0, "q_proj") && c.targets(3, "v_proj") && !c.targets(0, "k_proj"));
        let c = LoraConfig { target_modules: TargetModules::Suffixes(vec!["self_attn.o_proj".into()]), ..c };
        assert!(c.targets(1, "o_proj") && !c.targets(1, "q_proj"));
        let c = LoraConfig { target_modules: TargetModules::Regex(r".*\.1\..*proj".into()), ..c };
        assert!(c.targets(1, "down_proj") && !c.targets(0, "down_proj"));
        let c = LoraConfig { target_modules: TargetModules::AllLinear, layers_to_transform: Some(vec![2]), ..c };
        assert!(c.targets(2, "gate_proj") && !c.targets(1, "gate_proj"));
    }

    #[test]
    fn scaling_with_rslora_and_patterns() {
        let mut c = LoraConfig { r: 16, lora_alpha: 32.0, ..LoraConfig::default() };
        assert_eq!(c.scaling_for(0, "q_proj"), 2.0);
        c.use_rslora = true;
        assert_eq!(c.scaling_for(0, "q_proj"), 8.0);
        c.use_rslora = false;
        c.rank_pattern.insert("v_proj".into(), 4);
        c.alpha_pattern.insert(r"layers\.1\.self_attn\.q_proj".into(), 8.0);
        assert_eq!((c.rank_for(0, "v_proj"), c.scaling_for(0, "v_proj")), (4, 8.0));
        assert_eq!((c.rank_for(1, "q_proj"), c.scaling_for(1, "q_proj")), (16, 0.5));
        assert_eq!(c.scaling_for(0, "q_proj"), 2.0);
    }

    #[test]
    fn written_config_reads_back_and_keeps_only_classic_keys() {
        let c = LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            lora_dropout: 0.1,
            target_modules: TargetModules::AllLinear,
            init: LoraInit::Gaussian,
            ..Default::default()
        };
        let text = c.to_json();
        let v: Value = serde_json::from_str(&text).unwrap();
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted, "keys are sorted as PEFT writes them");
        assert!(keys.iter().all(|k| !["peft_version", "lora_bias", "target_parameters"].contains(&k.as_str())));
        assert_eq!(parse(v).unwrap(), c);
        assert!(text.starts_with("{\n  \"alpha_pattern\""));
    }

    #[test]
    fn a_current_peft_config_parses() {
        let v: Value = serde_json::from_str(
            r#"{"alora_invocation_tokens": null, "alpha_pattern": {}, "bias": "none", "fan_in_fan_out": false,
                "init_lora_weights": true, "lora_alpha": 16, "lora_dropout": 0.0, "modules_to_save": null,
                "peft_type": "LORA", "peft_version": "0.21.2", "r": 8, "rank_pattern": {},
                "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM", "use_dora": false, "use_rslora": false}"#,
        )
        .unwrap();
        let c = parse(v).unwrap();
        assert_eq!((c.r, c.lora_alpha, c.lora_dropout), (8, 16.0, 0.0));
    }

    #[test]
    fn unsupported_settings_are_refused_by_field() {
        for (field, value) in [
            ("peft_type", serde_json::json!("IA3")),
            ("use_dora", serde_json::json!(true)),
            ("modules_to_save", serde_json::json!(["lm_head"])),
            ("target_modules", serde_json::json!(7)),
            ("init_lora_weights", serde_json::json!("pissa")),
            ("lora_dropout", serde_json::json!(1.5)),
        ] {
            let mut v = serde_json::json!({"r": 8, "target_modules": ["q_proj"]});
            v[field] = value;
            let msg = parse(v).unwrap_err().to_string();
            assert!(msg.contains(&format!("`{field}`")), "{field}: {msg}");
        }
    }
}
