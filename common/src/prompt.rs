//! alpaca-lora's prompt templates, byte for byte (`templates/alpaca.json`).

/// Template used when the record has a non-empty `input`.
pub const ALPACA_PROMPT_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n";
/// Template used when `input` is empty.
pub const ALPACA_PROMPT_NO_INPUT: &str =
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n";
/// Marker after which the model's answer starts.
pub const ALPACA_RESPONSE_SPLIT: &str = "### Response:";
