//! The training run's configuration: alpaca-lora's field names, defaults from alpaca-lora and
//! the transformers `Trainer`, readable from TOML and overridden field by field from the CLI.

use crate::error::{FormatError, Result};
use crate::peft::{LoraConfig, LoraInit, TargetModules};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// `lora_target_modules`: a list, or one string (`all-linear`, a regex, or `q_proj,v_proj`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetSpec {
    /// `["q_proj", "v_proj"]`.
    List(Vec<String>),
    /// `"all-linear"`, `"q_proj,v_proj"`, `"[q_proj,v_proj]"`.
    Text(String),
}

impl TargetSpec {
    /// Parses the command-line forms `q_proj,v_proj` and alpaca-lora's `[q_proj,v_proj]`.
    pub fn parse_cli(s: &str) -> Self {
        let inner = s.trim().trim_start_matches('[').trim_end_matches(']');
        if inner == "all-linear" {
            return Self::Text(inner.to_owned());
        }
        Self::List(
            inner
                .split(',')
                .map(|p| p.trim().trim_matches(|c| c == '\'' || c == '"').to_owned())
                .filter(|p| !p.is_empty())
                .collect(),
        )
    }

    fn resolve(&self) -> TargetModules {
        match self {
            Self::Text(t) if t == "all-linear" => TargetModules::AllLinear,
            Self::Text(t) if t.contains(',') || t.starts_with('[') => Self::parse_cli(t).resolve(),
            Self::Text(t) if t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.') => {
                TargetModules::Suffixes(vec![t.clone()])
            }
            Self::Text(t) => TargetModules::Regex(t.clone()),
            Self::List(l) => TargetModules::Suffixes(l.clone()),
        }
    }
}

/// Every setting of a training run. Field names are alpaca-lora's `finetune.py` arguments
/// where it has one, otherwise transformers `TrainingArguments` names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Hugging Face model folder.
    pub base_model: PathBuf,
    /// Training records: JSON, JSON Lines or Parquet; Alpaca, OpenAI messages, ShareGPT or text.
    pub data_path: PathBuf,
    /// Where the adapter, checkpoints and metrics go.
    pub output_dir: PathBuf,
    /// Held-out records for periodic eval loss (when no `val_set_size` split) and for
    /// exact-match accuracy before and after training.
    pub eval_data_path: Option<PathBuf>,
    /// Examples per optimizer step over all workers.
    pub batch_size: usize,
    /// Examples per forward/backward on one worker.
    pub micro_batch_size: usize,
    /// Passes over the training set.
    pub num_epochs: usize,
    /// Stop after this many optimizer steps (overrides `num_epochs` when set).
    pub max_steps: Option<usize>,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Longest example in tokens.
    pub cutoff_len: usize,
    /// What happens to a record longer than `cutoff_len`: `truncate` (alpaca-lora) or `drop`.
    pub truncation: String,
    /// Stop at the first unusable record (naming file, line and field) instead of skipping it.
    pub strict: bool,
    /// Records held out of training for eval loss.
    pub val_set_size: usize,
    /// LoRA rank.
    pub lora_r: usize,
    /// LoRA alpha.
    pub lora_alpha: f64,
    /// LoRA dropout.
    pub lora_dropout: f64,
    /// Store the frozen block linears as int8 (alpaca-lora's `load_in_8bit`).
    pub load_in_8bit: bool,
    /// The dtype of the frozen block linears' products on the CPU: `float32`, or
    /// `bfloat16` (`bf16`: bf16 operands, f32 accumulation; LoRA, norms and the loss stay
    /// f32). Ignored for int8 block linears.
    pub torch_dtype: String,
    /// Input features per int8 scale (`None`: one scale per output row).
    pub int8_group_size: Option<usize>,
    /// Keep only block inputs in the forward and recompute blocks in the backward.
    pub gradient_checkpointing: bool,
    /// Modules to adapt.
    pub lora_target_modules: TargetSpec,
    /// rsLoRA scaling (alpha / sqrt(r)).
    pub use_rslora: bool,
    /// `true` (Kaiming-uniform A) or `gaussian`.
    pub init_lora_weights: String,
    /// Whether prompt tokens are trained on.
    pub train_on_inputs: bool,
    /// Batch examples of similar length together.
    pub group_by_length: bool,
    /// Sample packing: several examples per row of at most `cutoff_len` tokens, packed by
    /// first-fit decreasing within shuffled windows (axolotl's multipack); `batch_size` and
    /// `micro_batch_size` then count packed rows, not examples. Needs the training engine.
    pub sample_packing: bool,
    /// `auto` (the model's chat template, else `alpaca`), `tokenizer` (the model's), `alpaca`,
    /// `alpaca_legacy`, `chatml`, `llama3`, or a template file.
    pub prompt_template_name: String,
    /// Linear warm-up steps from learning rate 0.
    pub warmup_steps: usize,
    /// `linear`, `cosine` or `constant` decay after warm-up.
    pub lr_scheduler: String,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// AdamW beta1.
    pub adam_beta1: f64,
    /// AdamW beta2.
    pub adam_beta2: f64,
    /// AdamW epsilon.
    pub adam_epsilon: f64,
    /// Global gradient-norm clip (0 disables).
    pub max_grad_norm: f64,
    /// Eval loss every this many steps (0: only at the end).
    pub eval_steps: usize,
    /// Adapter checkpoint every this many steps (0: none).
    pub save_steps: usize,
    /// Checkpoints kept (0: all).
    pub save_total_limit: usize,
    /// One metrics line per this many steps.
    pub logging_steps: usize,
    /// Seed of data order, LoRA init and dropout.
    pub seed: u64,
    /// Data-parallel workers.
    pub workers: usize,
    /// Also write the base model with the adapter folded in, to `output_dir/merged`.
    pub merge: bool,
    /// Exact-match accuracy on `eval_data_path` before and after training.
    pub eval_exact_match: bool,
    /// Longest generated answer in exact-match evaluation.
    pub eval_max_new_tokens: usize,
    /// `cpu`, `cuda`, `cuda:N`.
    pub device: String,
    /// Several data files in one run (TOML `[[datasets]]`), each with its own template;
    /// instead of `data_path`. Last, because TOML writes tables after plain keys.
    pub datasets: Vec<DatasetSpec>,
}

/// One data file of `[[datasets]]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    /// JSON, JSON Lines or Parquet; any record layout (Alpaca, OpenAI, ShareGPT, text).
    pub path: PathBuf,
    /// Its template (default: the run's `prompt_template_name`).
    pub prompt_template_name: Option<String>,
}

impl Default for TrainConfig {
    /// alpaca-lora's defaults, except `train_on_inputs` (false: the loss covers answers).
    fn default() -> Self {
        Self {
            base_model: PathBuf::new(),
            data_path: PathBuf::new(),
            output_dir: PathBuf::from("./lora-alpaca"),
            eval_data_path: None,
            batch_size: 128,
            micro_batch_size: 4,
            num_epochs: 3,
            max_steps: None,
            learning_rate: 3e-4,
            cutoff_len: 256,
            truncation: "truncate".into(),
            strict: false,
            val_set_size: 2000,
            lora_r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.05,
            load_in_8bit: false,
            torch_dtype: "float32".into(),
            int8_group_size: None,
            gradient_checkpointing: true,
            lora_target_modules: TargetSpec::List(vec!["q_proj".into(), "v_proj".into()]),
            use_rslora: false,
            init_lora_weights: "true".into(),
            train_on_inputs: false,
            group_by_length: false,
            sample_packing: false,
            prompt_template_name: "alpaca".into(),
            warmup_steps: 100,
            lr_scheduler: "linear".into(),
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            eval_steps: 200,
            save_steps: 200,
            save_total_limit: 3,
            logging_steps: 10,
            seed: 42,
            workers: 1,
            merge: false,
            eval_exact_match: false,
            eval_max_new_tokens: 32,
            device: "cpu".into(),
            datasets: Vec::new(),
        }
    }
}

impl TrainConfig {
    /// Reads a TOML file; unknown keys are errors (a misspelt key must not be ignored).
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| FormatError::io(path, e))?;
        Self::from_toml_str(&text, path)
    }

    /// Parses TOML text; errors name `origin` (a file, or where the text came from).
    pub fn from_toml_str(text: &str, path: &Path) -> Result<Self> {
        toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            FormatError::Json { path: path.to_path_buf(), line, column, msg: e.message().to_owned() }
        })
    }

    /// The effective configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("the config always serialises")
    }

    /// The data files and their templates: `[[datasets]]`, or `data_path` with
    /// `prompt_template_name`.
    pub fn sources(&self) -> Vec<(PathBuf, String)> {
        if self.datasets.is_empty() {
            return vec![(self.data_path.clone(), self.prompt_template_name.clone())];
        }
        let name =
            |d: &DatasetSpec| d.prompt_template_name.clone().unwrap_or_else(|| self.prompt_template_name.clone());
        self.datasets.iter().map(|d| (d.path.clone(), name(d))).collect()
    }

    /// Gradient-accumulation steps: `batch_size / micro_batch_size / workers`.
    pub fn gradient_accumulation_steps(&self) -> usize {
        self.batch_size / (self.micro_batch_size * self.workers).max(1)
    }

    /// The adapter configuration these settings describe.
    pub fn lora(&self) -> LoraConfig {
        LoraConfig {
            r: self.lora_r,
            lora_alpha: self.lora_alpha,
            lora_dropout: self.lora_dropout,
            target_modules: self.lora_target_modules.resolve(),
            use_rslora: self.use_rslora,
            init: if self.init_lora_weights == "gaussian" { LoraInit::Gaussian } else { LoraInit::KaimingUniform },
            base_model_name_or_path: Some(self.base_model.display().to_string()),
            ..LoraConfig::default()
        }
    }

    /// Checks every value before any work starts; `origin` names where they came from.
    pub fn validate(&self, origin: &Path) -> Result<()> {
        let bad = |field: &str, msg: String| Err(FormatError::field(origin, field, msg));
        if self.base_model.as_os_str().is_empty() {
            return bad("base_model", "is required".into());
        }
        if !self.base_model.join("config.json").is_file() {
            return bad("base_model", format!("{} is not a model folder (no config.json)", self.base_model.display()));
        }
        match (self.datasets.is_empty(), self.data_path.as_os_str().is_empty()) {
            (true, _) if !self.data_path.is_file() => {
                return bad("data_path", format!("{} does not exist", self.data_path.display()));
            }
            (false, false) => return bad("datasets", "give data_path or [[datasets]], not both".into()),
            _ => {}
        }
        for (i, d) in self.datasets.iter().enumerate() {
            if !d.path.is_file() {
                return bad(&format!("datasets[{i}].path"), format!("{} does not exist", d.path.display()));
            }
            if let Some(name) = &d.prompt_template_name {
                crate::data::Template::resolve(name, &self.base_model).map_err(|e| {
                    FormatError::field(origin, format!("datasets[{i}].prompt_template_name"), e.to_string())
                })?;
            }
        }
        if let Some(p) = &self.eval_data_path {
            if !p.is_file() {
                return bad("eval_data_path", format!("{} does not exist", p.display()));
            }
        }
        if self.eval_exact_match && self.eval_data_path.is_none() {
            return bad("eval_exact_match", "needs eval_data_path".into());
        }
        for (field, v) in [
            ("micro_batch_size", self.micro_batch_size),
            ("batch_size", self.batch_size),
            ("workers", self.workers),
            ("cutoff_len", self.cutoff_len),
        ] {
            if v == 0 {
                return bad(field, "must be at least 1".into());
            }
        }
        if !self.batch_size.is_multiple_of(self.micro_batch_size * self.workers) {
            return bad(
                "batch_size",
                format!(
                    "{} is not a multiple of micro_batch_size {} × workers {}",
                    self.batch_size, self.micro_batch_size, self.workers
                ),
            );
        }
        if self.max_steps == Some(0) {
            return bad("max_steps", "must be at least 1 (leave it out to train num_epochs)".into());
        }
        if self.num_epochs == 0 && self.max_steps.is_none() {
            return bad("num_epochs", "must be at least 1 (or set max_steps)".into());
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad("learning_rate", format!("{} must be a positive number", self.learning_rate));
        }
        if !matches!(self.truncation.as_str(), "truncate" | "drop") {
            return bad("truncation", format!("{:?}: expected truncate or drop", self.truncation));
        }
        if !matches!(self.lr_scheduler.as_str(), "linear" | "cosine" | "constant") {
            return bad("lr_scheduler", format!("{:?}: expected linear, cosine or constant", self.lr_scheduler));
        }
        if !matches!(self.init_lora_weights.as_str(), "true" | "gaussian") {
            return bad("init_lora_weights", format!("{:?}: expected true or gaussian", self.init_lora_weights));
        }
        for (field, v) in [("adam_beta1", self.adam_beta1), ("adam_beta2", self.adam_beta2)] {
            if !(0.0..1.0).contains(&v) {
                return bad(field, format!("{v} must be in [0, 1)"));
            }
        }
        if self.weight_decay < 0.0 || self.max_grad_norm < 0.0 || self.adam_epsilon <= 0.0 {
            return bad("weight_decay", "weight_decay and max_grad_norm must be >= 0, adam_epsilon > 0".into());
        }
        if crate::config::narrow_bf16(&self.torch_dtype).is_none() {
            return bad("torch_dtype", format!("{:?}: expected float32 or bfloat16 (bf16)", self.torch_dtype));
        }
        if self.int8_group_size == Some(0) {
            return bad("int8_group_size", "must be at least 1".into());
        }
        if self.sample_packing && self.group_by_length {
            return bad(
                "sample_packing",
                "and group_by_length both fight padding; choose one (packing leaves none)".into(),
            );
        }
        if self.sample_packing && self.device != "cpu" {
            return bad(
                "sample_packing",
                format!(
                    "needs the training engine, which runs on device cpu (not {}); packed rows have no reference path",
                    self.device
                ),
            );
        }
        if self.logging_steps == 0 {
            return bad("logging_steps", "must be at least 1".into());
        }
        crate::data::Template::resolve(&self.prompt_template_name, &self.base_model)
            .map_err(|e| FormatError::field(origin, "prompt_template_name", e.to_string()))?;
        self.lora().validate(origin).map_err(|e| match e {
            FormatError::Field { field, msg, .. } => {
                FormatError::field(origin, format!("lora_{}", field.trim_start_matches("lora_")), msg)
            }
            other => other,
        })
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(before.len(), |i| before.len() - i - 1) + 1;
    (line, column)
}

impl TrainConfig {
    /// How the frozen base is stored and multiplied.
    pub fn base_precision(&self) -> BasePrecision {
        BasePrecision::new(self.load_in_8bit, self.int8_group_size, &self.torch_dtype)
    }
}

/// How the frozen base is stored and multiplied: the three settings that every command loading
/// a model takes (`load_in_8bit`, `int8_group_size`, `torch_dtype`), kept together so that train,
/// eval, generate and the workers cannot load the same folder two different ways.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BasePrecision {
    /// int8 block linears, absmax per output row (or per `int8_group_size` input features).
    pub load_in_8bit: bool,
    /// Input features per int8 scale; `None`: one scale per row.
    pub int8_group_size: Option<usize>,
    /// bf16 products for the frozen base (and the head).
    pub bf16: bool,
}

impl BasePrecision {
    /// From the settings as a user writes them; a `torch_dtype` other than bf16 means f32
    /// (the config's validation names an unknown one).
    pub fn new(load_in_8bit: bool, int8_group_size: Option<usize>, torch_dtype: &str) -> Self {
        Self { load_in_8bit, int8_group_size, bf16: narrow_bf16(torch_dtype) == Some(true) }
    }
}

/// Whether a `torch_dtype` asks for bf16 products (`Some(true)`), f32 (`Some(false)`), or is
/// not one this trainer knows (`None`).
pub fn narrow_bf16(torch_dtype: &str) -> Option<bool> {
    match torch_dtype {
        "float32" | "fp32" | "f32" => Some(false),
        "bfloat16" | "bf16" => Some(true),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_with_unknown_key_names_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run.toml");
        std::fs::write(&p, "lora_r = 4\nlearning_rte = 0.1\n").unwrap();
        let msg = TrainConfig::from_toml_file(&p).unwrap_err().to_string();
        assert!(msg.contains("run.toml:2:1") && msg.contains("learning_rte"), "{msg}");
        std::fs::write(&p, "lora_r = 4\nlora_target_modules = [\"q_proj\", \"k_proj\"]\nnum_epochs = 1\n").unwrap();
        let c = TrainConfig::from_toml_file(&p).unwrap();
        assert_eq!((c.lora_r, c.num_epochs, c.batch_size), (4, 1, 128));
        assert_eq!(c.lora().target_modules, TargetModules::Suffixes(vec!["q_proj".into(), "k_proj".into()]));
        assert_eq!(TrainConfig::from_toml_file(&p).unwrap(), toml::from_str(&c.to_toml()).unwrap());
    }

    #[test]
    fn target_module_spellings() {
        let want = TargetModules::Suffixes(vec!["q_proj".into(), "v_proj".into()]);
        assert_eq!(TargetSpec::parse_cli("q_proj,v_proj").resolve(), want);
        assert_eq!(TargetSpec::parse_cli("[q_proj,v_proj]").resolve(), want);
        assert_eq!(TargetSpec::parse_cli("['q_proj', 'v_proj']").resolve(), want);
        assert_eq!(TargetSpec::Text("[q_proj,v_proj]".into()).resolve(), want);
        assert_eq!(TargetSpec::parse_cli("all-linear").resolve(), TargetModules::AllLinear);
        assert_eq!(TargetSpec::Text(".*\\.q_proj".into()).resolve(), TargetModules::Regex(".*\\.q_proj".into()));
    }

    #[test]
    fn validation_names_the_field() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        let data = dir.path().join("d.jsonl");
        std::fs::write(&data, "{}").unwrap();
        let ok = TrainConfig {
            base_model: dir.path().into(),
            data_path: data,
            batch_size: 8,
            micro_batch_size: 2,
            ..Default::default()
        };
        ok.validate(Path::new("run.toml")).unwrap();
        let cases: Vec<(TrainConfig, &str)> = vec![
            (TrainConfig { batch_size: 7, ..ok.clone() }, "batch_size"),
            (TrainConfig { learning_rate: -1.0, ..ok.clone() }, "learning_rate"),
            (TrainConfig { lr_scheduler: "step".into(), ..ok.clone() }, "lr_scheduler"),
            (TrainConfig { lora_r: 0, ..ok.clone() }, "lora_r"),
            (TrainConfig { lora_dropout: 1.0, ..ok.clone() }, "lora_dropout"),
            (TrainConfig { prompt_template_name: "nope".into(), ..ok.clone() }, "prompt_template_name"),
            (TrainConfig { data_path: "/nonexistent".into(), ..ok.clone() }, "data_path"),
            (TrainConfig { sample_packing: true, group_by_length: true, ..ok.clone() }, "sample_packing"),
            (TrainConfig { sample_packing: true, device: "cuda".into(), ..ok.clone() }, "sample_packing"),
        ];
        for (c, field) in cases {
            let msg = c.validate(Path::new("run.toml")).unwrap_err().to_string();
            assert!(msg.contains(&format!("`{field}`")), "{field}: {msg}");
        }
    }
}
