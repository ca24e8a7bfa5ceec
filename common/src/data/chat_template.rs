//! A model's own chat template: the Jinja `chat_template` of `tokenizer_config.json` (or the
//! `chat_template.jinja` transformers 5 writes), rendered with minijinja the way transformers
//! renders it: `trim_blocks` and `lstrip_blocks`, loop controls, `raise_exception`,
//! `strftime_now`, a `tojson` that keeps non-ASCII text, Python's string methods, and the
//! variables `messages`, `bos_token`, `eos_token`, `add_generation_prompt`.
//!
//! Which tokens are trained on: each assistant turn's text as the template renders it, found
//! in the rendered conversation in order (templates may trim it, so the trimmed text is
//! searched), plus the special token the template puts right after it (`<|im_end|>`,
//! `<|eot_id|>`, `</s>`): see `tokenize`. Real templates rarely carry transformers'
//! `{% generation %}` marks, and growing prefixes break on templates that render a turn
//! differently once it is not the last (Qwen3's thinking block), so neither is relied on;
//! `{% generation %}` tags are accepted and ignored.

use super::records::Message;
use crate::error::{FormatError, Result};
use crate::json::read_json_file;
use minijinja::{Environment, Error, ErrorKind, Value};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// A compiled chat template with the special tokens it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
    /// Where it came from, for messages.
    pub origin: PathBuf,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChatTemplate({})", self.origin.display())
    }
}

impl PartialEq for ChatTemplate {
    fn eq(&self, other: &Self) -> bool {
        self.origin == other.origin
    }
}

impl Eq for ChatTemplate {}

/// A special token as `tokenizer_config.json` writes it: a string or `{"content": ...}`.
fn token_text(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Object(o)) => o.get("content").and_then(|c| c.as_str()).unwrap_or_default().to_owned(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// The template of the model folder `dir`: `chat_template.jinja`, else
    /// `tokenizer_config.json`'s `chat_template` (a string, or a list of named templates of
    /// which `default` is taken). `None` when the model has none.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let config_path = dir.join("tokenizer_config.json");
        let config = match config_path.is_file() {
            true => read_json_file(&config_path)?,
            false => serde_json::Value::Null,
        };
        let (bos, eos) = (token_text(config.get("bos_token")), token_text(config.get("eos_token")));
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            let source = std::fs::read_to_string(&jinja).map_err(|e| FormatError::io(&jinja, e))?;
            return Self::compile(source, jinja, bos, eos).map(Some);
        }
        let source = match config.get("chat_template") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(list)) => {
                let named = |n: &str| {
                    list.iter()
                        .find(|t| t.get("name").and_then(|v| v.as_str()) == Some(n))
                        .and_then(|t| t.get("template"))
                };
                match named("default").and_then(|t| t.as_str()) {
                    Some(s) => s.to_owned(),
                    None => {
                        return Err(FormatError::field(
                            &config_path,
                            "chat_template",
                            "a list without a `default` template",
                        ))
                    }
                }
            }
            None | Some(serde_json::Value::Null) => return Ok(None),
            Some(_) => return Err(FormatError::field(&config_path, "chat_template", "must be a string or a list")),
        };
        Self::compile(source, config_path, bos, eos).map(Some)
    }

    fn compile(source: String, origin: PathBuf, bos: String, eos: String) -> Result<Self> {
        // transformers' AssistantTracker tags; the turn spans are found another way.
        let source = ["{% generation %}", "{%- generation %}", "{% generation -%}", "{%- generation -%}"]
            .iter()
            .chain(&["{% endgeneration %}", "{%- endgeneration %}", "{% endgeneration -%}", "{%- endgeneration -%}"])
            .fold(source, |s, tag| s.replace(tag, ""));
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |format: String| -> String {
            let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            strftime_utc(&format, secs)
        });
        env.add_filter("tojson", |v: Value, indent: Option<usize>| -> std::result::Result<String, Error> {
            let json = serde_json::to_value(&v).map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
            let out = match indent {
                Some(n) => {
                    let mut buf = Vec::new();
                    let pad = " ".repeat(n);
                    let fmt = serde_json::ser::PrettyFormatter::with_indent(pad.as_bytes());
                    let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
                    serde::Serialize::serialize(&json, &mut ser)
                        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
                    String::from_utf8(buf).unwrap_or_default()
                }
                // Python's json.dumps separators: ", " and ": ".
                None => python_json(&json),
            };
            Ok(out)
        });
        env.add_template_owned("chat", source)
            .map_err(|e| FormatError::invalid(&origin, format!("chat template: {e:#}")))?;
        Ok(Self { env, bos, eos, origin })
    }

    /// The conversation as text; with `add_generation_prompt`, followed by what asks the model
    /// for the next assistant turn.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> std::result::Result<String, String> {
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| Value::from_serialize(serde_json::json!({"role": m.role, "content": m.content})))
            .collect();
        let template = self.env.get_template("chat").map_err(|e| e.to_string())?;
        template
            .render(minijinja::context! {
                messages => messages,
                bos_token => self.bos,
                eos_token => self.eos,
                add_generation_prompt => add_generation_prompt,
            })
            .map_err(|e| format!("chat template {}: {e:#}", self.origin.display()))
    }

    /// The conversation as text and the byte range of each assistant turn's text in it.
    pub fn render_with_turns(&self, messages: &[Message]) -> std::result::Result<(String, Vec<Range<usize>>), String> {
        let text = self.render(messages, false)?;
        let mut spans = Vec::new();
        let mut cursor = 0;
        for m in messages.iter().filter(|m| m.role == "assistant") {
            let needle = m.content.trim();
            let at = text[cursor..].find(needle).ok_or_else(|| {
                format!("the chat template does not render an assistant turn's text as written ({needle:.40?}…)")
            })?;
            spans.push(cursor + at..cursor + at + needle.len());
            cursor += at + needle.len();
        }
        Ok((text, spans))
    }
}

/// `json.dumps(v)` with Python's default separators (transformers' `tojson` without indent).
fn python_json(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Array(items) => {
            format!("[{}]", items.iter().map(python_json).collect::<Vec<_>>().join(", "))
        }
        serde_json::Value::Object(map) => {
            let fields: Vec<String> =
                map.iter().map(|(k, v)| format!("{}: {}", python_json(&k.clone().into()), python_json(v))).collect();
            format!("{{{}}}", fields.join(", "))
        }
        other => other.to_string(),
    }
}

/// A UTC `strftime` for the formats templates use (`%d %B %Y`, `%Y-%m-%d`, ...).
fn strftime_utc(format: &str, secs: u64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = (secs / 86_400) as i64;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('Y') => out.push_str(&y.to_string()),
            Some('B') => out.push_str(MONTHS[(m - 1) as usize]),
            Some('b') => out.push_str(&MONTHS[(m - 1) as usize][..3]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}
