//! Alpaca records (`instruction`, `input`, `output`) and chat records (`messages`), from a
//! JSON array or JSON Lines.

use crate::error::{FormatError, Result};
use serde_json::Value;
use std::path::Path;

/// One chat turn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// One training or evaluation example as written by the user.
#[derive(Clone, Debug, PartialEq, Eq)]
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
}

/// Reads every record of `path`: a JSON array (the file starts with `[`) or one JSON object
/// per line. Errors name the file, the line and the field.
pub fn read_records(path: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).map_err(|e| FormatError::io(path, e))?;
    let records = if text.trim_start().starts_with('[') {
        let values: Vec<Value> = serde_json::from_str(&text).map_err(|e| FormatError::json(path, &e))?;
        // serde_json does not report where each element starts; find the lines ourselves so
        // that a record error still points somewhere useful.
        let lines = element_lines(&text);
        values
            .iter()
            .enumerate()
            .map(|(i, v)| parse_record(path, lines.get(i).copied().unwrap_or(1), v))
            .collect::<Result<Vec<_>>>()?
    } else {
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(line).map_err(|e| FormatError::Json {
                path: path.to_path_buf(),
                line: i + 1,
                column: e.column(),
                msg: e.to_string().split(" at line").next().unwrap_or_default().to_owned(),
            })?;
            out.push(parse_record(path, i + 1, &v)?);
        }
        out
    };
    if records.is_empty() {
        return Err(FormatError::invalid(path, "contains no records"));
    }
    Ok(records)
}

fn parse_record(path: &Path, line: usize, v: &Value) -> Result<Record> {
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
    if let Some(messages) = obj.get("messages") {
        let list = messages.as_array().ok_or_else(|| err("field `messages` must be a list".into()))?;
        let mut out = Vec::with_capacity(list.len());
        for (i, m) in list.iter().enumerate() {
            let field = |key: &str| -> Result<String> {
                match m.get(key) {
                    Some(Value::String(s)) => Ok(s.clone()),
                    _ => Err(err(format!("field `messages[{i}].{key}` must be a string"))),
                }
            };
            let role = field("role")?;
            if !matches!(role.as_str(), "system" | "user" | "assistant") {
                return Err(err(format!(
                    "field `messages[{i}].role`: expected system, user or assistant, found {role:?}"
                )));
            }
            out.push(Message { role, content: field("content")? });
        }
        if !out.iter().any(|m| m.role == "assistant") {
            return Err(err("field `messages` has no assistant turn to learn from".into()));
        }
        return Ok(Record::Chat { messages: out });
    }
    Ok(Record::Alpaca {
        instruction: string("instruction", true)?,
        input: string("input", false)?,
        output: string("output", true)?,
    })
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

/// The 1-based line on which each top-level element of a JSON array starts.
fn element_lines(text: &str) -> Vec<usize> {
    let mut lines = Vec::new();
    let (mut depth, mut line, mut in_string, mut escaped) = (0usize, 1usize, false, false);
    let mut expecting = false;
    for c in text.chars() {
        if c == '\n' {
            line += 1;
        }
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        if depth == 1 && expecting && !c.is_whitespace() && c != ',' && c != ']' {
            lines.push(line);
            expecting = false;
        }
        match c {
            '"' => in_string = true,
            '[' | '{' => {
                depth += 1;
                if depth == 1 {
                    expecting = true;
                }
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            ',' if depth == 1 => expecting = true,
            _ => {}
        }
    }
    lines
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
    fn chat_records_are_checked() {
        let (_d, p) = write(
            r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}"#,
            "c.jsonl",
        );
        assert!(matches!(&read_records(&p).unwrap()[0], Record::Chat { messages } if messages.len() == 2));
        let (_d, p) = write(r#"{"messages": [{"role": "robot", "content": "hi"}]}"#, "c.jsonl");
        assert!(read_records(&p).unwrap_err().to_string().contains("messages[0].role"));
    }
}
