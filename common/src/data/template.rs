//! Prompt templates: alpaca-lora's JSON format (built in: `alpaca`, `alpaca_legacy`, or a
//! user file) and chat formats (`chatml`, `llama3`) that render turns with loss masks.

use super::records::{Message, Record};
use crate::error::{FormatError, Result};
use crate::json::{read_json_file, JsonObject};
use crate::prompt::{ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT, ALPACA_RESPONSE_SPLIT};
use std::path::Path;

/// alpaca-lora's template file format (`templates/alpaca.json`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromptTemplate {
    /// Used when `input` is non-empty; holds `{instruction}` and `{input}`.
    pub prompt_input: String,
    /// Used when `input` is empty; holds `{instruction}`.
    pub prompt_no_input: String,
    /// Marks where the response starts in generated text.
    pub response_split: String,
}

impl PromptTemplate {
    /// alpaca-lora's `alpaca` template.
    pub fn alpaca() -> Self {
        Self {
            prompt_input: ALPACA_PROMPT_INPUT.into(),
            prompt_no_input: ALPACA_PROMPT_NO_INPUT.into(),
            response_split: ALPACA_RESPONSE_SPLIT.into(),
        }
    }

    /// alpaca-lora's `alpaca_legacy`: the same without the newline after `### Response:`.
    pub fn alpaca_legacy() -> Self {
        let trim = |s: &str| s.strip_suffix('\n').unwrap_or(s).to_owned();
        Self {
            prompt_input: trim(ALPACA_PROMPT_INPUT),
            prompt_no_input: trim(ALPACA_PROMPT_NO_INPUT),
            ..Self::alpaca()
        }
    }

    /// Reads a template file in alpaca-lora's format.
    pub fn from_file(path: &Path) -> Result<Self> {
        let raw = read_json_file(path)?;
        let obj = JsonObject::new(path, &raw)?;
        let field = |k: &str| obj.opt_str(k)?.map(str::to_owned).ok_or_else(|| obj.error(k, "missing"));
        let t = Self {
            prompt_input: field("prompt_input")?,
            prompt_no_input: field("prompt_no_input")?,
            response_split: field("response_split")?,
        };
        if !t.prompt_input.contains("{instruction}") || !t.prompt_input.contains("{input}") {
            return Err(obj.error("prompt_input", "must contain {instruction} and {input}"));
        }
        if !t.prompt_no_input.contains("{instruction}") {
            return Err(obj.error("prompt_no_input", "must contain {instruction}"));
        }
        Ok(t)
    }

    /// The prompt for an instruction and an optional input.
    pub fn render(&self, instruction: &str, input: &str) -> String {
        if input.is_empty() {
            self.prompt_no_input.replace("{instruction}", instruction)
        } else {
            self.prompt_input.replace("{instruction}", instruction).replace("{input}", input)
        }
    }
}

/// A chat markup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChatFormat {
    /// `<|im_start|>role\n...<|im_end|>\n` (Qwen, many others).
    ChatMl,
    /// `<|start_header_id|>role<|end_header_id|>\n\n...<|eot_id|>` (Llama 3).
    Llama3,
}

impl ChatFormat {
    fn header(self, role: &str) -> String {
        match self {
            Self::ChatMl => format!("<|im_start|>{role}\n"),
            Self::Llama3 => format!("<|start_header_id|>{role}<|end_header_id|>\n\n"),
        }
    }

    fn end(self) -> &'static str {
        match self {
            Self::ChatMl => "<|im_end|>",
            Self::Llama3 => "<|eot_id|>",
        }
    }

    fn separator(self) -> &'static str {
        match self {
            Self::ChatMl => "\n",
            Self::Llama3 => "",
        }
    }

    /// The conversation as text pieces, each marked trainable or not: an assistant turn's
    /// content and end marker are trainable, everything else is prompt.
    pub fn segments(self, messages: &[Message]) -> Vec<(String, bool)> {
        let mut out = Vec::new();
        for m in messages {
            let assistant = m.role == "assistant";
            out.push((self.header(&m.role), false));
            out.push((format!("{}{}", m.content, self.end()), assistant));
            if !self.separator().is_empty() {
                out.push((self.separator().to_owned(), false));
            }
        }
        out
    }

    /// The text that asks for the next assistant turn after `messages`.
    pub fn generation_prompt(self, messages: &[Message]) -> String {
        let mut text: String = self.segments(messages).into_iter().map(|(s, _)| s).collect();
        text.push_str(&self.header("assistant"));
        text
    }
}

/// How records become text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Template {
    /// Instruction/input/output records through an alpaca-style prompt.
    Prompt(PromptTemplate),
    /// Conversations (and Alpaca records turned into a user turn and an assistant turn).
    Chat(ChatFormat),
    /// The same through the model's own Jinja chat template (`auto`, `tokenizer`).
    Jinja(std::sync::Arc<super::chat_template::ChatTemplate>),
    /// A prompt template for Alpaca records, and the model's chat template for chat records
    /// (what a prompt template name means when the model has one).
    PromptWithChat(PromptTemplate, std::sync::Arc<super::chat_template::ChatTemplate>),
}

impl Template {
    /// `by_name`, plus `tokenizer` (the chat template of the model folder `model_dir`; an
    /// error if it has none) and `auto` (that template when there is one, else `alpaca`). A
    /// prompt template (`alpaca`, a file) renders chat records with the model's template when
    /// it has one.
    pub fn resolve(name: &str, model_dir: &Path) -> Result<Self> {
        let chat = || super::chat_template::ChatTemplate::from_dir(model_dir).map(|t| t.map(std::sync::Arc::new));
        match name {
            "auto" | "tokenizer" => match chat()? {
                Some(t) => Ok(Self::Jinja(t)),
                None if name == "auto" => Self::by_name("alpaca"),
                None => Err(FormatError::invalid(
                    &model_dir.join("tokenizer_config.json"),
                    "prompt_template_name = \"tokenizer\": the model has no chat_template (nor chat_template.jinja)",
                )),
            },
            // A model template minijinja cannot read must not stop a run of Alpaca records;
            // chat records then ask for a chat template by name.
            other => match (Self::by_name(other)?, chat()) {
                (Self::Prompt(p), Ok(Some(t))) => Ok(Self::PromptWithChat(p, t)),
                (plain, _) => Ok(plain),
            },
        }
    }

    /// The Jinja template `record` is rendered with, if any.
    pub fn jinja_for(&self, record: &Record) -> Option<&super::chat_template::ChatTemplate> {
        match (self, record) {
            (_, Record::Text { .. }) => None,
            (Self::Jinja(t), _) | (Self::PromptWithChat(_, t), Record::Chat { .. }) => Some(t),
            _ => None,
        }
    }

    /// Whether `record` gets an EOS after its answer: Alpaca records under a prompt template
    /// and plain text (chat markups end turns with their own marker).
    pub fn appends_eos(&self, record: &Record) -> bool {
        matches!(
            (self, record),
            (_, Record::Text { .. }) | (Self::Prompt(_), _) | (Self::PromptWithChat(..), Record::Alpaca { .. })
        )
    }

    /// `alpaca`, `alpaca_legacy`, `chatml`, `llama3`, or the path of an alpaca-lora template file.
    pub fn by_name(name: &str) -> Result<Self> {
        Ok(match name {
            "alpaca" => Self::Prompt(PromptTemplate::alpaca()),
            "alpaca_legacy" => Self::Prompt(PromptTemplate::alpaca_legacy()),
            "chatml" => Self::Chat(ChatFormat::ChatMl),
            "llama3" => Self::Chat(ChatFormat::Llama3),
            path if Path::new(path).is_file() => Self::Prompt(PromptTemplate::from_file(Path::new(path))?),
            other => {
                return Err(FormatError::invalid(
                    Path::new(other),
                    "unknown template: expected auto, tokenizer, alpaca, alpaca_legacy, chatml, llama3 or a template .json file",
                ))
            }
        })
    }

    /// The record as (text, trainable) pieces, the answer last; `None` for a chat record under
    /// a prompt template, which has no instruction to fill in.
    pub fn segments(&self, record: &Record) -> Option<Vec<(String, bool)>> {
        match (self, record) {
            (Self::Prompt(t) | Self::PromptWithChat(t, _), Record::Alpaca { instruction, input, output }) => {
                Some(vec![(t.render(instruction, input), false), (output.clone(), true)])
            }
            (Self::Prompt(_) | Self::PromptWithChat(..), Record::Chat { .. }) => None,
            (Self::Chat(f), Record::Chat { messages }) => Some(f.segments(messages)),
            (Self::Chat(f), Record::Alpaca { .. }) => Some(f.segments(&alpaca_as_chat(record))),
            (_, Record::Text { text }) => Some(vec![(text.clone(), true)]),
            // Rendered whole, with token offsets: `tokenize`.
            (Self::Jinja(_), _) => None,
        }
    }

    /// The prompt a model is asked to continue, and the expected answer, for exact-match
    /// evaluation. Chat records are asked for their last assistant turn.
    pub fn prompt_and_answer(&self, record: &Record) -> Option<(String, String)> {
        match (self, record) {
            (Self::Prompt(t) | Self::PromptWithChat(t, _), Record::Alpaca { instruction, input, output }) => {
                Some((t.render(instruction, input), output.clone()))
            }
            (Self::Prompt(_), Record::Chat { .. }) => None,
            (Self::Chat(f), Record::Alpaca { output, .. }) => {
                let chat = alpaca_as_chat(record);
                Some((f.generation_prompt(&chat[..1]), output.clone()))
            }
            (Self::Chat(f), Record::Chat { messages }) => {
                let last = messages.iter().rposition(|m| m.role == "assistant")?;
                Some((f.generation_prompt(&messages[..last]), messages[last].content.clone()))
            }
            (_, Record::Text { .. }) => None,
            (Self::Jinja(t), Record::Alpaca { output, .. }) => {
                Some((t.render(&alpaca_as_chat(record)[..1], true).ok()?, output.clone()))
            }
            (Self::Jinja(t) | Self::PromptWithChat(_, t), Record::Chat { messages }) => {
                let last = messages.iter().rposition(|m| m.role == "assistant")?;
                Some((t.render(&messages[..last], true).ok()?, messages[last].content.clone()))
            }
        }
    }
}

/// An Alpaca record as a user turn (instruction, a blank line, input) and an assistant turn.
pub(super) fn alpaca_as_chat(record: &Record) -> Vec<Message> {
    let Record::Alpaca { instruction, input, output } = record else { return Vec::new() };
    let user = if input.is_empty() { instruction.clone() } else { format!("{instruction}\n\n{input}") };
    vec![Message { role: "user".into(), content: user }, Message { role: "assistant".into(), content: output.clone() }]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpaca_strings_are_byte_exact() {
        let t = PromptTemplate::alpaca();
        assert_eq!(
            t.render("Add 2 and 3.", ""),
            "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
        );
        assert_eq!(
            t.render("Reverse the word.", "soft"),
            "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\nReverse the word.\n\n### Input:\nsoft\n\n### Response:\n"
        );
        assert_eq!(t.response_split, "### Response:");
        assert!(PromptTemplate::alpaca_legacy().render("x", "").ends_with("### Response:"));
    }

    #[test]
    fn template_file_in_alpaca_lora_format() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("mine.json");
        std::fs::write(&p, r#"{"description": "t", "prompt_input": "Q: {instruction} ({input})\nA: ", "prompt_no_input": "Q: {instruction}\nA: ", "response_split": "A:"}"#).unwrap();
        let t = Template::by_name(p.to_str().unwrap()).unwrap();
        let rec = Record::Alpaca { instruction: "hi".into(), input: "x".into(), output: "yo".into() };
        assert_eq!(t.segments(&rec).unwrap(), vec![("Q: hi (x)\nA: ".into(), false), ("yo".into(), true)]);
        std::fs::write(
            &p,
            r#"{"prompt_input": "no slots", "prompt_no_input": "{instruction}", "response_split": "A:"}"#,
        )
        .unwrap();
        assert!(Template::by_name(p.to_str().unwrap()).unwrap_err().to_string().contains("prompt_input"));
        assert!(Template::by_name("nonesuch").is_err());
    }

    #[test]
    fn chat_formats_mask_everything_but_assistant_turns() {
        let msgs = vec![
            Message { role: "system".into(), content: "Be brief.".into() },
            Message { role: "user".into(), content: "Hi".into() },
            Message { role: "assistant".into(), content: "Hello".into() },
        ];
        let segs = ChatFormat::ChatMl.segments(&msgs);
        let text: String = segs.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(text, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n");
        let trained: Vec<&str> = segs.iter().filter(|(_, t)| *t).map(|(s, _)| s.as_str()).collect();
        assert_eq!(trained, vec!["Hello<|im_end|>"]);
        let l3: String = ChatFormat::Llama3.segments(&msgs[1..]).iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(l3, "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>");
        let (prompt, answer) =
            Template::Chat(ChatFormat::ChatMl).prompt_and_answer(&Record::Chat { messages: msgs }).unwrap();
        assert!(prompt.ends_with("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"));
        assert_eq!(answer, "Hello");
    }
}
