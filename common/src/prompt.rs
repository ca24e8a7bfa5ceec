//! alpaca-lora's prompt templates, byte for byte (`templates/alpaca.json`).

/// Template used when the record has a non-empty `input`.
pub const ALPACA_PROMPT_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n";
/// Template used when `input` is empty.
pub const ALPACA_PROMPT_NO_INPUT: &str =
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n";
/// Marker after which the model's answer starts.
pub const ALPACA_RESPONSE_SPLIT: &str = "### Response:";

/// The Alpaca prompt for an instruction and an optional input (empty means none).
pub fn alpaca_prompt(instruction: &str, input: &str) -> String {
    if input.is_empty() {
        ALPACA_PROMPT_NO_INPUT.replace("{instruction}", instruction)
    } else {
        ALPACA_PROMPT_INPUT.replace("{instruction}", instruction).replace("{input}", input)
    }
}
