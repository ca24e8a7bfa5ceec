//! `coordinator [train]` flags: every `TrainConfig` field, under alpaca-lora's snake_case
//! name and a kebab-case alias, layered over the defaults and the `--config` TOML file.

use anyhow::{Context, Result};
use clap::Args;
use lorafleet_common::config::{TargetSpec, TrainConfig};
use std::path::{Path, PathBuf};

fn parse_bool(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        other => Err(format!("expected true or false, found {other:?}")),
    }
}

fn parse_targets(s: &str) -> Result<TargetSpec, String> {
    match TargetSpec::parse_cli(s) {
        TargetSpec::List(l) if l.is_empty() => Err("names no module".into()),
        spec => Ok(spec),
    }
}

macro_rules! train_flags {
    ($( $(#[$attr:meta])* $field:ident : $ty:ty = $long:literal $(| $kebab:literal)?, $set:ident; )*) => {
        /// Overrides of the run's configuration.
        #[derive(Args, Debug, Default, Clone)]
        pub struct TrainFlags {
            /// TOML file with any of the settings below (flags override it).
            #[arg(long)]
            pub config: Option<PathBuf>,
            /// Start from the embedded demo's settings (what `coordinator` alone runs); flags
            /// still override them.
            #[arg(long, conflicts_with = "config")]
            pub demo: bool,
            /// Continue from a checkpoint: a `checkpoint-STEP` folder, or `latest` (the default
            /// value: the newest one in output_dir). It is verified against its manifest (a
            /// torn or corrupt one falls back to the previous one) and must come from a run with
            /// the same base model, data and training settings.
            #[arg(
                long = "resume_from_checkpoint",
                visible_alias = "resume",
                value_name = "DIR|latest",
                num_args = 0..=1,
                default_missing_value = "latest"
            )]
            pub resume_from_checkpoint: Option<String>,
            /// Print the effective configuration as TOML and exit.
            #[arg(long = "print-config", alias = "print_config")]
            pub print_config: bool,
            #[command(flatten)]
            pub launch: crate::cluster::LaunchFlags,
            $(
                $(#[$attr])*
                #[arg(long = $long $(, visible_alias = $kebab)?)]
                pub $field: Option<$ty>,
            )*
        }

        impl TrainFlags {
            /// Whether any run setting was given (otherwise `coordinator` runs the demo).
            pub fn any_setting(&self) -> bool {
                self.config.is_some() $(|| self.$field.is_some())*
            }

            fn apply(&self, c: &mut TrainConfig) {
                $( if let Some(v) = &self.$field { train_flags!(@$set c.$field, v); } )*
            }
        }
    };
    (@plain $target:expr, $v:expr) => { $target = $v.clone() };
    (@some $target:expr, $v:expr) => { $target = Some($v.clone()) };
}

train_flags! {
    /// Hugging Face model folder.
    base_model: PathBuf = "base_model" | "base-model", plain;
    /// Training data: JSON, JSON Lines or Parquet; Alpaca, OpenAI messages, ShareGPT or text.
    data_path: PathBuf = "data_path" | "data-path", plain;
    /// Output folder for the adapter, checkpoints, metrics.jsonl and loss.png.
    output_dir: PathBuf = "output_dir" | "output-dir", plain;
    /// Held-out data for eval loss and exact-match accuracy.
    eval_data_path: PathBuf = "eval_data_path" | "eval-data-path", some;
    /// Examples per optimizer step (all workers).
    batch_size: usize = "batch_size" | "batch-size", plain;
    /// Examples per forward/backward.
    micro_batch_size: usize = "micro_batch_size" | "micro-batch-size", plain;
    /// Epochs.
    num_epochs: usize = "num_epochs" | "num-epochs", plain;
    /// Stop after this many optimizer steps.
    max_steps: usize = "max_steps" | "max-steps", some;
    /// Peak learning rate.
    learning_rate: f64 = "learning_rate" | "learning-rate", plain;
    /// Longest example in tokens.
    cutoff_len: usize = "cutoff_len" | "cutoff-len", plain;
    /// A record longer than cutoff_len: `truncate` or `drop`.
    truncation: String = "truncation", plain;
    /// Stop at the first unusable record instead of skipping it.
    #[arg(num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    strict: bool = "strict", plain;
    /// Records held out for eval loss.
    val_set_size: usize = "val_set_size" | "val-set-size", plain;
    /// LoRA rank.
    lora_r: usize = "lora_r" | "lora-r", plain;
    /// LoRA alpha.
    lora_alpha: f64 = "lora_alpha" | "lora-alpha", plain;
    /// LoRA dropout.
    lora_dropout: f64 = "lora_dropout" | "lora-dropout", plain;
    /// Store the frozen block linears as int8.
    #[arg(num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    load_in_8bit: bool = "load_in_8bit" | "load-in-8bit", plain;
    /// `float32`, or `bfloat16` (`bf16`): the frozen base's products in bf16 on the CPU.
    torch_dtype: String = "torch_dtype" | "torch-dtype", plain;
    /// Input features per int8 scale (default: one scale per output row).
    int8_group_size: usize = "int8_group_size" | "int8-group-size", some;
    /// Recompute blocks in the backward (less memory, ~30% more compute).
    #[arg(num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    gradient_checkpointing: bool = "gradient_checkpointing" | "gradient-checkpointing", plain;
    /// `q_proj,v_proj`, `[q_proj,v_proj]` or `all-linear`.
    #[arg(value_parser = parse_targets)]
    lora_target_modules: TargetSpec = "lora_target_modules" | "lora-target-modules", plain;
    /// rsLoRA scaling.
    #[arg(num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    use_rslora: bool = "use_rslora" | "use-rslora", plain;
    /// `true` or `gaussian`.
    init_lora_weights: String = "init_lora_weights" | "init-lora-weights", plain;
    /// Train on prompt tokens too.
    #[arg(num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    train_on_inputs: bool = "train_on_inputs" | "train-on-inputs", plain;
    /// Batch examples of similar length.
    #[arg(num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    group_by_length: bool = "group_by_length" | "group-by-length", plain;
    /// Pack several examples per row of at most cutoff_len tokens (batch sizes then count rows).
    #[arg(num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    sample_packing: bool = "sample_packing" | "sample-packing", plain;
    /// `auto` (the model's chat template, else alpaca), `tokenizer`, `alpaca`, `alpaca_legacy`, `chatml`, `llama3` or a template file.
    prompt_template_name: String = "prompt_template_name" | "prompt-template-name", plain;
    /// Warm-up steps.
    warmup_steps: usize = "warmup_steps" | "warmup-steps", plain;
    /// `linear`, `cosine` or `constant`.
    lr_scheduler: String = "lr_scheduler" | "lr-scheduler", plain;
    /// Decoupled weight decay.
    weight_decay: f64 = "weight_decay" | "weight-decay", plain;
    /// AdamW beta1.
    adam_beta1: f64 = "adam_beta1" | "adam-beta1", plain;
    /// AdamW beta2.
    adam_beta2: f64 = "adam_beta2" | "adam-beta2", plain;
    /// AdamW epsilon.
    adam_epsilon: f64 = "adam_epsilon" | "adam-epsilon", plain;
    /// Gradient-norm clip (0 disables).
    max_grad_norm: f64 = "max_grad_norm" | "max-grad-norm", plain;
    /// Eval loss every N steps.
    eval_steps: usize = "eval_steps" | "eval-steps", plain;
    /// Checkpoint every N steps.
    save_steps: usize = "save_steps" | "save-steps", plain;
    /// Checkpoints kept.
    save_total_limit: usize = "save_total_limit" | "save-total-limit", plain;
    /// Metrics line every N steps.
    logging_steps: usize = "logging_steps" | "logging-steps", plain;
    /// Seed.
    seed: u64 = "seed", plain;
    /// Data-parallel workers (local worker processes, or remote ones with --listen).
    workers: usize = "workers", plain;
    /// Also write the merged model to OUTPUT_DIR/merged once the replicas agree.
    #[arg(num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    merge: bool = "merge", plain;
    /// Exact-match accuracy on the eval data before and after training.
    #[arg(num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    eval_exact_match: bool = "eval_exact_match" | "eval-exact-match", plain;
    /// Longest generated answer for exact match.
    eval_max_new_tokens: usize = "eval_max_new_tokens" | "eval-max-new-tokens", plain;
    /// `cpu`, `cuda`, `cuda:N`.
    device: String = "device", plain;
}

/// The repository's embedded demo folder (resolved at build time).
pub fn demo_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../demo");
    dir.canonicalize().unwrap_or(dir)
}

impl TrainFlags {
    /// Defaults, then the TOML file (or the demo's when nothing is given), then the flags.
    /// Returns the configuration and the name of its origin for messages.
    pub fn resolve(&self) -> Result<(TrainConfig, PathBuf)> {
        let demo = self.demo || !self.any_setting();
        let (mut config, origin) = match (&self.config, demo) {
            (Some(path), _) => (TrainConfig::from_toml_file(path)?, path.clone()),
            (None, true) => {
                let path = demo_dir().join("demo.toml");
                let mut c = TrainConfig::from_toml_file(&path)
                    .with_context(|| "the embedded demo is missing; pass --base_model and --data_path")?;
                let root = demo_dir().join("..");
                for p in [&mut c.base_model, &mut c.data_path] {
                    *p = root.join(&*p);
                }
                c.eval_data_path = c.eval_data_path.map(|p| root.join(p));
                (c, path)
            }
            (None, false) => (TrainConfig::default(), PathBuf::from("command line")),
        };
        self.apply(&mut config);
        Ok((config, origin))
    }
}
