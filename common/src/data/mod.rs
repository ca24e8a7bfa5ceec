//! Instruction data: records on disk, prompt templates, tokenization with loss masks, and
//! the seeded order in which examples become batches.

pub mod chat_template;
pub mod packing;
pub mod records;
pub mod schedule;
mod sources;
pub mod template;
pub mod tokenize;

pub use records::{read_dataset, read_dataset_bytes, read_records, Anomaly, Dataset, Message, Record, Skipped};
pub use template::{ChatFormat, PromptTemplate, Template};
pub use tokenize::{tokenize_records, tokenize_records_with, Example, TextEncoder, TokenizeOptions, TokenizeReport};
