//! Where records come from: a JSON array (the file starts with `[`), JSON Lines, or a Parquet
//! file (it starts with `PAR1`), each record as a JSON value with the line it starts on (for
//! Parquet, its 1-based row number).
//!
//! Parquet is read with the `parquet` crate's row API, without Arrow (a 25 s cold build on
//! two cores with its Snappy and Zstandard codecs, the two that pandas, pyarrow, polars and
//! the Hugging Face hub write): each row becomes the JSON object `Row::to_json_value` makes,
//! so list-of-struct columns (`messages`, `conversations`) arrive as the same JSON a JSON
//! Lines copy holds, and one parser serves every source.

use crate::error::{FormatError, Result};
use serde_json::Value;
use std::path::Path;

/// Every record of the file `path` holds as `bytes`, with the line (or row) it starts on.
pub(super) fn read_values(path: &Path, bytes: Vec<u8>) -> Result<Vec<(usize, Value)>> {
    if bytes.starts_with(b"PAR1") {
        return parquet_rows(path, bytes);
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        let line = e.as_bytes()[..e.utf8_error().valid_up_to()].iter().filter(|&&b| b == b'\n').count() + 1;
        FormatError::Json { path: path.to_path_buf(), line, column: 1, msg: "the file is not UTF-8 text".into() }
    })?;
    let mut values = Vec::new();
    if text.trim_start().starts_with('[') {
        let all: Vec<Value> = serde_json::from_str(&text).map_err(|e| FormatError::json(path, &e))?;
        // serde_json does not report where each element starts; find the lines ourselves so
        // that a record error still points somewhere useful.
        let lines = element_lines(&text);
        values.extend(all.into_iter().enumerate().map(|(i, v)| (lines.get(i).copied().unwrap_or(1), v)));
    } else {
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
            values.push((i + 1, v));
        }
    }
    Ok(values)
}

fn parquet_rows(path: &Path, bytes: Vec<u8>) -> Result<Vec<(usize, Value)>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let bad = |e: parquet::errors::ParquetError| FormatError::invalid(path, format!("Parquet: {e}"));
    let reader = SerializedFileReader::new(bytes::Bytes::from(bytes)).map_err(bad)?;
    let mut out = Vec::new();
    for (i, row) in reader.get_row_iter(None).map_err(bad)?.enumerate() {
        let row = row.map_err(|e| FormatError::Json {
            path: path.to_path_buf(),
            line: i + 1,
            column: 1,
            msg: format!("Parquet row {}: {e}", i + 1),
        })?;
        out.push((i + 1, row.to_json_value()));
    }
    Ok(out)
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
