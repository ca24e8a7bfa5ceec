//! Training records as users have them: Alpaca (`instruction`, `input`, `output`), chat
//! records in the OpenAI (`messages` of `role`/`content`) or ShareGPT (`conversations` of
//! `from`/`value`) layout, and plain `text`; from a JSON array, JSON Lines or Parquet.
//!
//! A record that is well-formed JSON but unusable as a conversation (it starts with the
//! assistant, has an empty turn, an unknown role, two turns of one role in a row, ...) is an
//! [`Anomaly`]: skipped and counted by kind with its first locations, or with `strict` an
//! error naming file, line and field. A record of the wrong shape (a missing `output`, a
//! number where text belongs) is always an error: the whole file is probably of another format.

use crate::error::{FormatError, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// One chat turn.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// One training or evaluation example as written by the user.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Record {
    /// alpaca-lora's format; `input` is empty when absent.
    Alpaca {
        /// The task.
        instruction: String,
        /// Optional context.
        input: String,
        /// The expected answer.
        output: String,
    },
    /// A conversation; the loss covers the assistant turns.
    Chat {
        /// The turns in order.
        messages: Vec<Message>,
    },
    /// Plain text; the loss covers every token.
    Text {
        /// The text.
        text: String,
    },
}

/// Why a record was not used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum Anomaly {
    /// A conversation with no turns.
    EmptyConversation,
    /// A turn whose role is none of system, user, assistant (or their aliases).
    UnknownRole,
    /// A turn with no text.
    EmptyTurn,
    /// The first turn after the system prompt is the assistant's.
    StartsWithAssistant,
    /// Two turns of one role in a row.
    RepeatedRole,
    /// No assistant turn: nothing to learn.
    NoAssistantTurn,
    /// Longer than `cutoff_len` (with `truncation = "drop"`).
    TooLong,
}

impl Anomaly {
    /// The name in summaries and `metrics.jsonl`.
    pub fn name(self) -> &'static str {
        match self {
            Self::EmptyConversation => "empty_conversation",
            Self::UnknownRole => "unknown_role",
            Self::EmptyTurn => "empty_turn",
            Self::StartsWithAssistant => "starts_with_assistant",
            Self::RepeatedRole => "repeated_role",
            Self::NoAssistantTurn => "no_assistant_turn",
            Self::TooLong => "too_long",
        }
    }
}

/// How many locations of each anomaly are kept for the report.
const FIRST_LOCATIONS: usize = 5;

/// Records skipped, by kind: count and first `file:line` locations.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Skipped(pub BTreeMap<Anomaly, (usize, Vec<String>)>);

impl Skipped {
    /// Counts one skipped record at `path:line`.
    pub fn add(&mut self, kind: Anomaly, path: &Path, line: usize) {
        let (count, first) = self.0.entry(kind).or_default();
        *count += 1;
        if first.len() < FIRST_LOCATIONS {
            first.push(format!("{}:{line}", path.display()));
        }
    }

    /// Adds another file's counts (keeping the first locations of both, in order).
    pub fn merge(&mut self, other: Skipped) {
        for (kind, (count, first)) in other.0 {
            let (n, mine) = self.0.entry(kind).or_default();
            *n += count;
            mine.extend(first.into_iter().take(FIRST_LOCATIONS.saturating_sub(mine.len())));
        }
    }

    /// Records skipped in all.
    pub fn total(&self) -> usize {
        self.0.values().map(|(n, _)| n).sum()
    }

    /// `kind N (first: f:1, f:7); ...`, or empty.
    pub fn summary(&self) -> String {
        let kinds: Vec<String> =
            self.0.iter().map(|(k, (n, first))| format!("{} {n} (first: {})", k.name(), first.join(", "))).collect();
        kinds.join("; ")
    }

    /// `{"kind": {"count": N, "first": ["f:1", ...]}, ...}` for `metrics.jsonl`.
    pub fn to_json(&self) -> Value {
        Value::Object(
            self.0
                .iter()
                .map(|(k, (n, first))| (k.name().to_owned(), serde_json::json!({"count": n, "first": first})))
                .collect(),
        )
    }
}

/// The usable records of a file, the line each starts on, and what was skipped.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Dataset {
    /// The records, in file order.
    pub records: Vec<Record>,
    /// The 1-based line each record starts on.
    pub lines: Vec<usize>,
    /// What was left out.
    pub skipped: Skipped,
}

/// Reads every record of `path` (anomalies skipped and counted). Errors name the file, the
/// line and the field.
pub fn read_records(path: &Path) -> Result<Vec<Record>> {
    Ok(read_dataset(path, false)?.records)
}

/// Reads `path`: a JSON array, JSON Lines or Parquet (`data::sources`). With `strict`, the
/// first anomaly is an error instead of a skipped record.
pub fn read_dataset(path: &Path, strict: bool) -> Result<Dataset> {
    let bytes = std::fs::read(path).map_err(|e| FormatError::io(path, e))?;
    read_dataset_bytes(path, bytes, strict)
}

/// [`read_dataset`] of a file already read (`path` names it in errors).
pub fn read_dataset_bytes(path: &Path, bytes: Vec<u8>, strict: bool) -> Result<Dataset> {
    let values = super::sources::read_values(path, bytes)?;
    let mut data = Dataset::default();
    let total = values.len();
    for (line, v) in values {
        match parse_record(path, line, &v)? {
            Ok(record) => {
                data.records.push(record);
                data.lines.push(line);
            }
            Err((kind, field, why)) if strict => {
                return Err(FormatError::Json {
                    path: path.to_path_buf(),
                    line,
                    column: 1,
                    msg: format!("field `{field}`: {why} ({}; --strict)", kind.name()),
                });
            }
            Err((kind, _, _)) => data.skipped.add(kind, path, line),
        }
    }
    if data.records.is_empty() {
        let why = match total {
            0 => "contains no records".to_owned(),
            n => format!("none of its {n} records is usable: {}", data.skipped.summary()),
        };
        return Err(FormatError::invalid(path, why));
    }
    Ok(data)
}

/// An anomaly: its kind, the field it is in, and what is wrong.
type Unusable = (Anomaly, String, String);

/// The role a turn's spelling stands for, across the OpenAI and ShareGPT dumps seen in the
/// wild (FastChat, axolotl and LLaMA-Factory accept the same aliases).
fn canonical_role(role: &str) -> Option<&'static str> {
    match role.to_ascii_lowercase().as_str() {
        "system" => Some("system"),
        "user" | "human" => Some("user"),
        "assistant" | "gpt" | "chatgpt" | "bard" | "bing" | "model" => Some("assistant"),
        _ => None,
    }
}

/// Checks a conversation's turns; the first problem found, if any.
fn check_turns(key: &str, turns: &[Message], raw_roles: &[String]) -> Option<Unusable> {
    if turns.is_empty() {
        return Some((Anomaly::EmptyConversation, key.to_owned(), "the conversation has no turns".into()));
    }
    if let Some(i) = turns.iter().position(|m| m.role.is_empty()) {
        let why = format!("unknown role {:?} (expected system, user or assistant, or an alias)", raw_roles[i]);
        return Some((Anomaly::UnknownRole, format!("{key}[{i}]"), why));
    }
    if let Some(i) = turns.iter().position(|m| m.content.trim().is_empty()) {
        return Some((Anomaly::EmptyTurn, format!("{key}[{i}]"), "the turn has no text".into()));
    }
    let first = turns.iter().position(|m| m.role != "system").unwrap_or(0);
    if turns[first].role == "assistant" {
        let why = "the conversation starts with the assistant, answering nothing".to_owned();
        return Some((Anomaly::StartsWithAssistant, format!("{key}[{first}]"), why));
    }
    if let Some(i) = (1..turns.len()).find(|&i| turns[i].role == turns[i - 1].role) {
        let why = format!("two {} turns in a row", turns[i].role);
        return Some((Anomaly::RepeatedRole, format!("{key}[{i}]"), why));
    }
    if !turns.iter().any(|m| m.role == "assistant") {
        return Some((Anomaly::NoAssistantTurn, key.to_owned(), "no assistant turn to learn from".into()));
    }
    None
}

fn parse_record(path: &Path, line: usize, v: &Value) -> Result<Result<Record, Unusable>> {
    let err = |msg: String| FormatError::Json { path: path.to_path_buf(), line, column: 1, msg };
    let obj = v.as_object().ok_or_else(|| err(format!("expected a JSON object, found {}", kind(v))))?;
    let string = |key: &str, required: bool| -> Result<String> {
        match obj.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            None | Some(Value::Null) if !required => Ok(String::new()),
            None => Err(err(format!("record is missing field `{key}`"))),
            Some(other) => Err(err(format!("field `{key}` must be a string, found {}", kind(other)))),
        }
    };
    // OpenAI `messages` of role/content; ShareGPT `conversations` of from/value (some dumps
    // use role/content there too).
    let chat = [("messages", "role", "content"), ("conversations", "from", "value")]
        .into_iter()
        .find_map(|(key, role, content)| obj.get(key).map(|list| (key, role, content, list)));
    if let Some((key, role_key, content_key, list)) = chat {
        let list = list.as_array().ok_or_else(|| err(format!("field `{key}` must be a list")))?;
        let (mut turns, mut raw_roles) = (Vec::with_capacity(list.len()), Vec::with_capacity(list.len()));
        for (i, m) in list.iter().enumerate() {
            let field = |keys: [&str; 2]| -> Result<String> {
                match keys.iter().find_map(|k| m.get(*k)) {
                    Some(Value::String(s)) => Ok(s.clone()),
                    Some(Value::Null) => Ok(String::new()),
                    _ => Err(err(format!("field `{key}[{i}].{}` must be a string", keys[0]))),
                }
            };
            let role = field([role_key, if role_key == "role" { "from" } else { "role" }])?;
            let content = field([content_key, if content_key == "content" { "value" } else { "content" }])?;
            turns.push(Message { role: canonical_role(&role).unwrap_or_default().to_owned(), content });
            raw_roles.push(role);
        }
        return Ok(match check_turns(key, &turns, &raw_roles) {
            Some(problem) => Err(problem),
            None => Ok(Record::Chat { messages: turns }),
        });
    }
    if !obj.contains_key("instruction") {
        if let Some(text) = obj.get("text") {
            let Value::String(text) = text else {
                return Err(err(format!("field `text` must be a string, found {}", kind(text))));
            };
            return Ok(Ok(Record::Text { text: text.clone() }));
        }
    }
    Ok(Ok(Record::Alpaca {
        instruction: string("instruction", true)?,
        input: string("input", false)?,
        output: string("output", true)?,
    }))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str, name: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        (dir, p)
    }

    #[test]
    fn jsonl_and_array_give_the_same_records() {
        let (_a, jsonl) = write("{\"instruction\": \"a\", \"input\": \"\", \"output\": \"b\"}\n\n{\"instruction\": \"c\", \"output\": \"d\"}\n", "d.jsonl");
        let (_b, array) = write("[\n {\"instruction\": \"a\", \"input\": \"\", \"output\": \"b\"},\n {\"instruction\": \"c\", \"output\": \"d\"}\n]", "d.json");
        assert_eq!(read_records(&jsonl).unwrap(), read_records(&array).unwrap());
    }

    #[test]
    fn malformed_line_gets_file_line_and_column() {
        let (_d, p) = write(
            "{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"a\" \"output\": \"b\"}\n",
            "bad.jsonl",
        );
        let msg = read_records(&p).unwrap_err().to_string();
        assert!(msg.contains("bad.jsonl:2:21:"), "{msg}");
    }

    #[test]
    fn missing_output_names_line_and_field() {
        let (_d, p) = write(
            "{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"a\", \"input\": \"x\"}\n",
            "d.jsonl",
        );
        let msg = read_records(&p).unwrap_err().to_string();
        assert!(msg.contains("d.jsonl:2:") && msg.contains("`output`"), "{msg}");
        let (_d, p) = write(
            "[\n {\"instruction\": \"a\", \"output\": \"b\"},\n\n {\"instruction\": 5, \"output\": \"b\"}\n]",
            "d.json",
        );
        let msg = read_records(&p).unwrap_err().to_string();
        assert!(msg.contains("d.json:4:") && msg.contains("`instruction`"), "{msg}");
    }

    #[test]
    fn empty_file_is_an_error() {
        let (_d, p) = write("\n\n", "empty.jsonl");
        assert!(read_records(&p).unwrap_err().to_string().contains("no records"));
        let (_d, p) = write("[]", "empty.json");
        assert!(read_records(&p).unwrap_err().to_string().contains("no records"));
    }

    #[test]
    fn sharegpt_openai_and_text_records_read_as_one_model_with_their_aliases() {
        let (_d, p) = write(
            concat!(
                r#"{"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}"#,
                "\n",
                r#"{"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}"#,
                "\n",
                r#"{"messages": [{"role": "Human", "content": "q"}, {"role": "model", "content": "a"}]}"#,
                "\n",
                r#"{"text": "just text"}"#,
                "\n"
            ),
            "mixed.jsonl",
        );
        let data = read_dataset(&p, true).unwrap();
        let chat = |roles: &[&str]| Record::Chat {
            messages: roles
                .iter()
                .map(|r| Message {
                    role: (*r).into(),
                    content: if *r == "system" {
                        "s"
                    } else if *r == "user" {
                        "q"
                    } else {
                        "a"
                    }
                    .into(),
                })
                .collect(),
        };
        assert_eq!(data.records[0], chat(&["system", "user", "assistant"]));
        assert_eq!(data.records[1], chat(&["user", "assistant"]));
        assert_eq!(data.records[2], chat(&["user", "assistant"]));
        assert_eq!(data.records[3], Record::Text { text: "just text".into() });
        assert_eq!(data.lines, vec![1, 2, 3, 4]);
    }

    #[test]
    fn parquet_copies_read_as_their_json_lines_originals() {
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-llama/data");
        for (parquet, jsonl) in
            [("alpaca_sample.parquet", "alpaca_sample.jsonl"), ("sharegpt_sample.parquet", "sharegpt_sample.jsonl")]
        {
            let (a, b) =
                (read_dataset(&data.join(parquet), true).unwrap(), read_dataset(&data.join(jsonl), true).unwrap());
            assert_eq!(a.records, b.records, "{parquet}");
            assert_eq!(a.lines, (1..=a.records.len()).collect::<Vec<_>>(), "rows are numbered from 1");
        }
        let (_d, p) = write("PAR1 but nothing else", "broken.parquet");
        assert!(read_dataset(&p, false).unwrap_err().to_string().contains("broken.parquet: Parquet:"));
    }

    #[test]
    fn chat_records_are_checked() {
        let (_d, p) = write(
            r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}"#,
            "c.jsonl",
        );
        assert!(matches!(&read_records(&p).unwrap()[0], Record::Chat { messages } if messages.len() == 2));
        let (_d, p) = write(r#"{"messages": [{"role": "robot", "content": "hi"}]}"#, "c.jsonl");
        let msg = read_dataset(&p, true).unwrap_err().to_string();
        assert!(msg.contains("c.jsonl:1:") && msg.contains("`messages[0]`") && msg.contains("\"robot\""), "{msg}");
        assert!(read_records(&p).unwrap_err().to_string().contains("unknown_role 1 (first: "));
    }
}
