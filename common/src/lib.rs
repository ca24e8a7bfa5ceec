//! Formats and configuration shared by every lorafleet role.
//!
//! This crate reads and writes the files users hand us (Hugging Face model folders, PEFT
//! adapters) and knows nothing of tensor maths, processes or sockets: every other crate can
//! depend on it without pulling in a runtime.
#![deny(missing_docs)]

pub mod atomic;
pub mod batch;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod error;
pub mod json;
pub mod model_config;
pub mod peft;
pub mod prompt;
pub mod protocol;
pub mod run_checkpoint;
pub mod special_tokens;

pub use batch::{Batch, IGNORE_INDEX};
pub use error::{FormatError, Result};
pub use model_config::{Architecture, ModelConfig, RopeScaling};
pub use peft::{LoraConfig, LoraInit, TargetModules};
pub use special_tokens::SpecialTokens;
