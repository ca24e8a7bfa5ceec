//! The trainable side of lorafleet: a Llama-family model with LoRA in candle, the optimizer
//! and the rank-aware training step, plus generation and merging on top of the same model.
//!
//! The base model is frozen data: its linear layers, norms and tables live inside custom
//! ops (`lorafleet-kernels`), so autograd only ever tracks LoRA parameters and activations.
#![deny(missing_docs)]

pub mod adamw;
pub mod adapter_io;
pub mod collective;
pub mod device;
pub mod dropout;
pub mod engine;
pub mod error;
pub mod eval;
pub mod executor;
pub mod generate;
pub mod identity;
pub mod link;
pub mod lora;
pub mod merge;
pub mod model;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod node;
pub mod recompute;
pub mod replica;
pub mod ring;
pub mod tokenizer;
pub mod train;
pub mod weights;

pub use error::{Error, Result};
pub use lora::LoraAdapter;
pub use model::Llama;
pub use tokenizer::Tokenizer;
