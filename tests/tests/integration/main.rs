//! The cross-crate test binary: PEFT/transformers reference checks, model variants and
//! bad input.

mod bad_input;
mod bf16;
mod chat_template;
mod checkpointing;
mod engine;
mod int8;
mod reference;
mod variants;
