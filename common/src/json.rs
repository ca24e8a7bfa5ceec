//! Typed access to fields of a JSON object, with errors that name the file and the field.
//!
//! Hugging Face and PEFT files have many optional fields whose spelling changed between
//! library versions, so reading them field by field gives better messages than one derive.

use crate::error::{FormatError, Result};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// Reads a JSON file into a value, reporting syntax errors as `file:line:column`.
pub fn read_json_file(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| FormatError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| FormatError::json(path, &e))
}

/// A JSON object together with the file it came from.
pub struct JsonObject<'a> {
    path: PathBuf,
    /// Dotted path of this object inside the file (`rope_parameters.`), empty at the top.
    prefix: String,
    map: &'a Map<String, Value>,
}

impl<'a> JsonObject<'a> {
    /// Wraps `value`, which must be an object.
    pub fn new(path: &Path, value: &'a Value) -> Result<Self> {
        let map =
            value.as_object().ok_or_else(|| FormatError::invalid(path, "expected a JSON object at the top level"))?;
        Ok(Self { path: path.to_path_buf(), prefix: String::new(), map })
    }

    /// The file this object was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The raw value of `key`, treating JSON `null` as absent.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// An error about `field` in this file.
    pub fn error(&self, field: &str, msg: impl Into<String>) -> FormatError {
        FormatError::field(&self.path, format!("{}{field}", self.prefix), msg)
    }

    /// A required non-negative integer.
    pub fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| self.error(key, "missing"))
    }

    /// An optional non-negative integer.
    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.error(key, format!("expected a non-negative integer, found {v}"))),
        }
    }

    /// An optional number.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.error(key, format!("expected a number, found {v}"))),
        }
    }

    /// An optional boolean.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => {
                v.as_bool().map(Some).ok_or_else(|| self.error(key, format!("expected true or false, found {v}")))
            }
        }
    }

    /// An optional string.
    pub fn opt_str(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| self.error(key, format!("expected a string, found {v}"))),
        }
    }

    /// An optional nested object.
    pub fn opt_object(&self, key: &str) -> Result<Option<JsonObject<'a>>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_object() {
                Some(map) => {
                    Ok(Some(JsonObject { path: self.path.clone(), prefix: format!("{}{key}.", self.prefix), map }))
                }
                None => Err(self.error(key, format!("expected an object, found {v}"))),
            },
        }
    }

    /// A token id or a list of token ids (`eos_token_id` is a list in Llama 3.1).
    pub fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
        let bad = || self.error(key, "expected a token id or a list of token ids");
        let one = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(bad);
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items.iter().map(one).collect(),
            Some(v) => Ok(vec![one(v)?]),
        }
    }
}
