//! Command-line definitions.

use crate::train_args::TrainFlags;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// Distributed LoRA instruction fine-tuning. Without a subcommand, trains (with no settings
/// at all: the embedded demo).
#[derive(Parser, Debug)]
#[command(name = "coordinator", version, about, args_conflicts_with_subcommands = true, args_override_self = true)]
pub struct Cli {
    /// More log output (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(flatten)]
    pub train: TrainFlags,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// What to do.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train a LoRA adapter (the default).
    #[command(args_override_self = true)]
    Train(Box<TrainFlags>),
    /// Loss, perplexity and exact-match accuracy of a model (and adapter) on a data set.
    Eval(EvalArgs),
    /// Generate text with a base model and optional LoRA adapters.
    Generate(GenerateArgs),
    /// Fold a LoRA adapter into its base model and write a complete model folder.
    Merge(MergeArgs),
    /// Create (or read) the coordinator's certificate in DIR and print its fingerprint, for
    /// `--tls-dir DIR` and workers' `--fingerprint` (Kubernetes secrets, Slurm scripts).
    Keygen {
        /// Folder for `cert.der` and `key.der`.
        dir: PathBuf,
    },
    /// Training speed and peak memory of lorafleet beside PyTorch + PEFT, measured side by side
    /// in one invocation with `--reference-python` (`--scaling`: data-parallel scaling over CPU
    /// workers).
    Bench(BenchArgs),
}

/// A `bench` workload.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchWorkload {
    /// The 58M-parameter Llama of `../shared/bench/peft_cpu_bench.py` (hidden 512, 8 layers).
    #[value(name = "58m")]
    M58,
    /// A 135M-parameter Llama of SmolLM-135M's shape (hidden 576, 30 layers, GQA 9/3, tied).
    #[value(name = "135m")]
    M135,
    /// The demo's training (demo/demo.toml) for `--demo-steps` steps (slow: not in the default).
    Demo,
    /// A 1.2B Llama of Llama 3.2 1B's shape (hidden 2048, 16 layers, GQA 32/8, vocab 128256,
    /// tied): the GPU workload (`--device cuda`; hours on a CPU).
    #[value(name = "1b")]
    B1,
}

/// `off`, `on` or both (in turn).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffOnBoth {
    /// Keep every activation.
    Off,
    /// Recompute each block's activations in the backward.
    On,
    /// Off, then on.
    Both,
}

/// Which batches the step benchmarks train on.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchBatches {
    /// 4 rows × 256 random tokens, no padding, labels = inputs.
    Random,
    /// 4 rows of 256, 201, 143 and 97 tokens, right padded; no loss on padding and on each
    /// row's first 40% (the prompt).
    Instruction,
    /// Both kinds, in turn.
    Both,
}

/// `coordinator bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Timed steps per run of the 58m and 135m workloads (median reported).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Untimed warm-up steps (`demo`: the first steps of its `--demo-steps`, left out of its
    /// tokens/s).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Data-parallel scaling instead: step time split into compute and communication for
    /// 1, 2 and 4 CPU worker processes on the demo and the 58M model.
    #[arg(long)]
    pub scaling: bool,
    /// Python interpreter with torch, transformers and peft: runs PyTorch + PEFT on the same
    /// workloads in this invocation, alternating with ours (without it: PyTorch's recorded
    /// figures, where there are any).
    #[arg(long = "reference-python", value_name = "PY")]
    pub reference_python: Option<PathBuf>,
    /// Rounds per workload; each round runs ours and PyTorch once, each in a fresh process.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Workloads to run (repeat; default: 58m and 135m).
    #[arg(long = "workload", value_enum)]
    pub workloads: Vec<BenchWorkload>,
    /// Activation checkpointing for the step workloads (58m, 135m, 1b; both sides).
    #[arg(long, value_enum, default_value_t = OffOnBoth::Both)]
    pub checkpointing: OffOnBoth,
    /// Batches for the step workloads (58m, 135m, 1b).
    #[arg(long, value_enum, default_value_t = BenchBatches::Both)]
    pub batches: BenchBatches,
    /// Optimizer steps of the `demo` workload, warm-up included (324: the whole demo).
    #[arg(long = "demo-steps", default_value_t = 60)]
    pub demo_steps: usize,
    /// Device of both sides' step workloads: `cpu`, or `cuda[:N]`, where both compute in bf16
    /// (the base, as `compute_dtype` has it; LoRA in f32) and ours needs `--features cuda`.
    /// The demo workload stays on the CPU.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute threads on both sides (RAYON_NUM_THREADS for ours; torch.set_num_threads and
    /// OMP/MKL_NUM_THREADS for PyTorch).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Also run ours with an int8 base model (`--load_in_8bit`; compared with the same
    /// PyTorch f32 runs). With `--bf16` too, also int8 block linears beside a bf16 head
    /// (`int8+bf16`).
    #[arg(long)]
    pub int8: bool,
    /// Also run ours with the base's products in bf16 (`--torch_dtype bf16`; compared with
    /// the same PyTorch f32 runs).
    #[arg(long)]
    pub bf16: bool,
    /// PyTorch loads our random model instead of initialising its own, so that both sides'
    /// first-step losses must agree (a check that both train on the same thing; loading
    /// changes PyTorch's peak RSS).
    #[arg(long = "same-weights")]
    pub same_weights: bool,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Run one of our configurations in this process (`f32`, `bf16`, `int8`, `demo` or
    /// `demo-bf16`; used by the
    /// benchmark itself).
    #[arg(long, hide = true)]
    pub only: Option<String>,
    /// The model folder for `--only`.
    #[arg(long, hide = true)]
    pub model: Option<PathBuf>,
}

/// Where and how the base model runs.
#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// `cpu`, or `cuda` / `cuda:N` in builds with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Store the frozen block linears as int8.
    #[arg(long = "load-in-8bit", alias = "load_in_8bit")]
    pub load_in_8bit: bool,
    /// Input features per int8 scale (default: one scale per output row).
    #[arg(long = "int8-group-size", alias = "int8_group_size")]
    pub int8_group_size: Option<usize>,
    /// `float32`, or `bfloat16` (`bf16`): the frozen base's products in bf16 on the CPU.
    #[arg(long = "torch-dtype", alias = "torch_dtype", default_value = "float32", value_parser = parse_torch_dtype)]
    pub torch_dtype: String,
}

fn parse_torch_dtype(v: &str) -> Result<String, String> {
    match lorafleet_common::config::narrow_bf16(v) {
        Some(_) => Ok(v.to_owned()),
        None => Err(format!("{v:?}: expected float32 or bfloat16 (bf16)")),
    }
}

impl DeviceArgs {
    /// How the frozen base is stored and multiplied.
    pub fn base_precision(&self) -> lorafleet_common::config::BasePrecision {
        lorafleet_common::config::BasePrecision::new(self.load_in_8bit, self.int8_group_size, &self.torch_dtype)
    }
}

/// `coordinator eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Hugging Face model folder.
    #[arg(long)]
    pub base: PathBuf,
    /// PEFT adapter folder.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Records to evaluate (Alpaca JSON/JSONL or chat messages).
    #[arg(long)]
    pub data: PathBuf,
    /// Prompt template: alpaca, alpaca_legacy, chatml, llama3 or a template file.
    #[arg(long, default_value = "alpaca")]
    pub template: String,
    /// Longest example in tokens.
    #[arg(long = "cutoff-len", alias = "cutoff_len", default_value_t = 256)]
    pub cutoff_len: usize,
    /// Also generate greedy answers (up to `--max-new-tokens`) and compare them with the outputs.
    #[arg(long = "exact-match", alias = "exact_match")]
    pub exact_match: bool,
    /// Longest generated answer for `--exact-match`.
    #[arg(long = "max-new-tokens", alias = "max_new_tokens", default_value_t = 32)]
    pub max_new_tokens: usize,
    /// Examples per forward pass for the loss.
    #[arg(long = "batch-size", alias = "batch_size", default_value_t = 16)]
    pub batch_size: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// `coordinator generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Hugging Face model folder (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub base: PathBuf,
    /// PEFT adapter folder, optionally named: `NAME=DIR` (default name: the folder's name).
    /// Repeat to load several; `--use` picks the active one.
    #[arg(long = "adapter", value_name = "[NAME=]DIR")]
    pub adapters: Vec<String>,
    /// Name of the adapter to apply (default: the first one), or `base` for none.
    #[arg(long = "use", value_name = "NAME")]
    pub use_adapter: Option<String>,
    /// Raw prompt text.
    #[arg(long, conflicts_with_all = ["instruction", "input", "chat"], required_unless_present_any = ["instruction", "chat"])]
    pub prompt: Option<String>,
    /// A user message, rendered with the model's own chat template (and `--system`) and
    /// answered as the assistant's next turn.
    #[arg(long, conflicts_with_all = ["instruction", "input"])]
    pub chat: Option<String>,
    /// A system prompt for `--chat`.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// An instruction, wrapped in the Alpaca template.
    #[arg(long)]
    pub instruction: Option<String>,
    /// Optional input for `--instruction`.
    #[arg(long, requires = "instruction")]
    pub input: Option<String>,
    /// Most tokens to generate.
    #[arg(long = "max-new-tokens", alias = "max_new_tokens", default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling mass.
    #[arg(long = "top-p", alias = "top_p", default_value_t = 1.0)]
    pub top_p: f64,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// `coordinator merge`.
#[derive(Args, Debug)]
pub struct MergeArgs {
    /// Base model folder.
    #[arg(long)]
    pub base: PathBuf,
    /// PEFT adapter folder.
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output folder (must not exist or be empty).
    #[arg(long)]
    pub out: PathBuf,
    /// Output dtype: f32, f16 or bf16 (default: the base model's).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Largest shard, e.g. `5GB`, `500MB`; larger models are split with an index file.
    #[arg(long = "max-shard-size", alias = "max_shard_size", default_value = "5GB")]
    pub max_shard_size: String,
}
