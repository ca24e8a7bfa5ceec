//! Records to token ids and labels, with alpaca-lora's semantics made precise.
//!
//! alpaca-lora tokenizes `prompt + output` as one string and masks the first
//! `len(tokenize(prompt))` labels, which silently assumes the prompt's tokens are a prefix of
//! the whole. We tokenize each piece on its own and concatenate, so the mask is exact:
//! - the first piece with the tokenizer's special tokens (BOS where it adds one), the rest
//!   without;
//! - then EOS for prompt templates and plain-text records (chat formats end turns with
//!   their own marker);
//! - truncation to `cutoff_len`; a truncated example keeps no EOS (as alpaca-lora);
//! - labels `-100` on prompt pieces unless `train_on_inputs`.

use super::records::Record;
use super::template::Template;
use crate::batch::IGNORE_INDEX;
use crate::error::{FormatError, Result};
use std::path::Path;

/// What tokenization needs from a tokenizer.
pub trait TextEncoder: Sync {
    /// Ids of `text`, with the tokenizer's special tokens (BOS) when `special` is set.
    fn encode(&self, text: &str, special: bool) -> std::result::Result<Vec<u32>, String>;
    /// The id appended after an answer.
    fn eos_id(&self) -> Option<u32>;
    /// Ids of `text` without added special tokens (special tokens written in the text are
    /// recognised), each with the byte offset where its text starts.
    fn encode_offsets(&self, text: &str) -> std::result::Result<Vec<(u32, usize)>, String>;
    /// Whether `id` is a special token (end-of-turn markers are).
    fn is_special(&self, id: u32) -> bool;
}

/// A record through a model's Jinja chat template: the whole conversation rendered and
/// tokenized at once, tokens trained where their text starts inside an assistant turn's text,
/// and the special token that closes each turn (the first token after it) trained too.
fn jinja_tokens(
    t: &super::chat_template::ChatTemplate,
    record: &Record,
    encoder: &dyn TextEncoder,
    train_all: bool,
) -> std::result::Result<(Vec<u32>, Vec<i64>), String> {
    let messages = match record {
        Record::Chat { messages } => messages.clone(),
        _ => super::template::alpaca_as_chat(record),
    };
    let (text, turns) = t.render_with_turns(&messages)?;
    let tokens = encoder.encode_offsets(&text)?;
    let mut train: Vec<bool> =
        tokens.iter().map(|&(_, at)| train_all || turns.iter().any(|r| r.contains(&at))).collect();
    for turn in &turns {
        if let Some(k) = tokens.iter().position(|&(_, at)| at >= turn.end) {
            train[k] |= encoder.is_special(tokens[k].0);
        }
    }
    let ids: Vec<u32> = tokens.iter().map(|&(id, _)| id).collect();
    let labels = ids.iter().zip(&train).map(|(&id, &t)| if t { i64::from(id) } else { IGNORE_INDEX }).collect();
    Ok((ids, labels))
}

/// Tokenization settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenizeOptions {
    /// Longest example in tokens.
    pub cutoff_len: usize,
    /// Whether prompt tokens count in the loss.
    pub train_on_inputs: bool,
    /// Drop records longer than `cutoff_len` instead of truncating them.
    pub drop_long: bool,
}

/// One tokenized example.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Example {
    /// Index of the record it came from.
    pub record: usize,
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Labels (`-100` where not trained on).
    pub labels: Vec<i64>,
}

impl Example {
    /// Tokens that count in the loss (every non-ignored label after the first position).
    pub fn target_tokens(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// What happened to the records.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenizeReport {
    /// Records read.
    pub records: usize,
    /// Examples kept.
    pub kept: usize,
    /// Kept examples that were cut at `cutoff_len` (and so lost their EOS).
    pub truncated: usize,
    /// Records dropped because nothing trainable was left within `cutoff_len`.
    pub dropped: usize,
    /// Records dropped for their length (`drop_long`), by index.
    pub too_long: Vec<usize>,
}

/// Tokenizes every record of `source` (named in errors).
pub fn tokenize_records(
    source: &Path,
    records: &[Record],
    template: &Template,
    encoder: &dyn TextEncoder,
    options: &TokenizeOptions,
) -> Result<(Vec<Example>, TokenizeReport)> {
    tokenize_records_with(source, records, template, encoder, options, &|_| {})
}

/// What one record became.
enum Outcome {
    Kept(Example, bool),
    TooLong,
    NothingToLearn,
}

impl Outcome {
    /// A tokenized record against `cutoff_len`: dropped (`drop_long`) or truncated when
    /// longer, dropped when no target token is left.
    fn of(mut example: Example, options: &TokenizeOptions) -> Self {
        if example.input_ids.len() > options.cutoff_len && options.drop_long {
            return Self::TooLong;
        }
        let truncated = example.input_ids.len() > options.cutoff_len;
        example.input_ids.truncate(options.cutoff_len);
        example.labels.truncate(options.cutoff_len);
        match example.target_tokens() {
            0 => Self::NothingToLearn,
            _ => Self::Kept(example, truncated),
        }
    }
}

/// [`tokenize_records`] on every core, calling `progress(n)` as each block of `n` records is
/// done. The records are cut into contiguous blocks and the results put back in order, so
/// the examples are the same whatever the number of threads.
pub fn tokenize_records_with(
    source: &Path,
    records: &[Record],
    template: &Template,
    encoder: &dyn TextEncoder,
    options: &TokenizeOptions,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<(Vec<Example>, TokenizeReport)> {
    if options.cutoff_len < 2 {
        return Err(FormatError::invalid(
            source,
            format!("cutoff_len {} leaves no room for a target", options.cutoff_len),
        ));
    }
    let needs_eos = |r: &Record| template.appends_eos(r);
    let eos = match records.iter().any(needs_eos) {
        true => {
            Some(encoder.eos_id().ok_or_else(|| FormatError::invalid(source, "the tokenizer defines no eos token"))?)
        }
        false => None,
    };
    let one = |i: usize, record: &Record| -> Result<Outcome> {
        if let Some(t) = template.jinja_for(record) {
            let (ids, labels) = jinja_tokens(t, record, encoder, options.train_on_inputs)
                .map_err(|e| FormatError::invalid(source, format!("record {}: {e}", i + 1)))?;
            return Ok(Outcome::of(Example { record: i, input_ids: ids, labels }, options));
        }
        let segments = template.segments(record).ok_or_else(|| {
            FormatError::invalid(
                source,
                format!("record {} is a chat record; use a chat template (auto, chatml or llama3)", i + 1),
            )
        })?;
        let mut ids = Vec::new();
        let mut labels = Vec::new();
        for (k, (text, trainable)) in segments.iter().enumerate() {
            let piece = encoder
                .encode(text, k == 0)
                .map_err(|e| FormatError::invalid(source, format!("record {}: {e}", i + 1)))?;
            let train = *trainable || options.train_on_inputs;
            labels.extend(piece.iter().map(|&t| if train { i64::from(t) } else { IGNORE_INDEX }));
            ids.extend(piece);
        }
        if let Some(eos) = eos.filter(|_| needs_eos(record)) {
            ids.push(eos);
            labels.push(i64::from(eos));
        }
        Ok(Outcome::of(Example { record: i, input_ids: ids, labels }, options))
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(records.len().div_ceil(256)).max(1);
    let block = records.len().div_ceil(threads).max(1);
    let blocks: Vec<Result<Vec<Outcome>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = records
            .chunks(block)
            .enumerate()
            .map(|(b, chunk)| {
                scope.spawn(move || {
                    let mut out = Vec::with_capacity(chunk.len());
                    for (k, sub) in chunk.chunks(64).enumerate() {
                        for (j, r) in sub.iter().enumerate() {
                            out.push(one(b * block + k * 64 + j, r)?);
                        }
                        progress(sub.len());
                    }
                    Ok(out)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
    });
    let mut report = TokenizeReport { records: records.len(), ..Default::default() };
    let mut examples = Vec::with_capacity(records.len());
    for (i, outcome) in blocks.into_iter().collect::<Result<Vec<_>>>()?.into_iter().flatten().enumerate() {
        match outcome {
            Outcome::Kept(example, truncated) => {
                report.truncated += usize::from(truncated);
                examples.push(example);
            }
            Outcome::TooLong => report.too_long.push(i),
            Outcome::NothingToLearn => report.dropped += 1,
        }
    }
    report.kept = examples.len();
    if examples.is_empty() {
        return Err(FormatError::invalid(
            source,
            format!(
                "no example has a target token within cutoff_len {}: every prompt is at least that long",
                options.cutoff_len
            ),
        ));
    }
    Ok((examples, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::template::PromptTemplate;

    /// One id per character (its code point), BOS 1 with special tokens, EOS 2.
    struct Chars;

    impl TextEncoder for Chars {
        fn encode(&self, text: &str, special: bool) -> std::result::Result<Vec<u32>, String> {
            let mut v: Vec<u32> = if special { vec![1] } else { Vec::new() };
            v.extend(text.chars().map(|c| c as u32));
            Ok(v)
        }
        fn eos_id(&self) -> Option<u32> {
            Some(2)
        }
        fn encode_offsets(&self, text: &str) -> std::result::Result<Vec<(u32, usize)>, String> {
            Ok(text.char_indices().map(|(at, c)| (c as u32, at)).collect())
        }
        fn is_special(&self, _: u32) -> bool {
            false
        }
    }

    fn template() -> Template {
        Template::Prompt(PromptTemplate {
            prompt_input: "{instruction}|{input}>".into(),
            prompt_no_input: "{instruction}>".into(),
            response_split: ">".into(),
        })
    }

    fn rec(instruction: &str, input: &str, output: &str) -> Record {
        Record::Alpaca { instruction: instruction.into(), input: input.into(), output: output.into() }
    }

    fn run(records: &[Record], cutoff: usize, train_on_inputs: bool) -> Result<(Vec<Example>, TokenizeReport)> {
        tokenize_records(
            Path::new("d.jsonl"),
            records,
            &template(),
            &Chars,
            &TokenizeOptions { cutoff_len: cutoff, train_on_inputs, drop_long: false },
        )
    }

    #[test]
    fn prompt_is_masked_answer_and_eos_are_trained() {
        let (ex, report) = run(&[rec("ab", "", "xy")], 16, false).unwrap();
        // <s> a b > x y </s>
        assert_eq!(ex[0].input_ids, vec![1, 97, 98, 62, 120, 121, 2]);
        assert_eq!(ex[0].labels, vec![-100, -100, -100, -100, 120, 121, 2]);
        assert_eq!(ex[0].target_tokens(), 3);
        assert_eq!(report, TokenizeReport { records: 1, kept: 1, truncated: 0, dropped: 0, too_long: vec![] });
        let (ex, _) = run(&[rec("ab", "c", "x")], 16, true).unwrap();
        assert_eq!(ex[0].input_ids, vec![1, 97, 98, 124, 99, 62, 120, 2]);
        assert_eq!(ex[0].labels, vec![1, 97, 98, 124, 99, 62, 120, 2]);
    }

    #[test]
    fn truncation_drops_the_eos_and_prompt_only_examples_are_dropped() {
        let records = [rec("ab", "", "xyz"), rec("abcdef", "", "x"), rec("a", "", "")];
        let (ex, report) = run(&records, 6, false).unwrap();
        // Record 0: <s> a b > x y | z </s> cut off: no EOS.
        assert_eq!(ex[0].input_ids, vec![1, 97, 98, 62, 120, 121]);
        assert_eq!(ex[0].labels, vec![-100, -100, -100, -100, 120, 121]);
        // Record 1's prompt fills the cutoff: nothing to learn, dropped.
        // Record 2 (empty output) still learns its EOS.
        assert_eq!(ex[1].record, 2);
        assert_eq!(ex[1].labels, vec![-100, -100, -100, 2]);
        assert_eq!(report, TokenizeReport { records: 3, kept: 2, truncated: 1, dropped: 1, too_long: vec![] });
    }

    #[test]
    fn text_records_learn_every_token_and_long_records_can_be_dropped() {
        let records = [Record::Text { text: "hey".into() }, rec("ab", "", "xyz")];
        let (ex, report) = run(&records, 16, false).unwrap();
        assert_eq!(ex[0].input_ids, vec![1, 104, 101, 121, 2]);
        assert_eq!(ex[0].labels, vec![1, 104, 101, 121, 2]);
        let opts = TokenizeOptions { cutoff_len: 6, train_on_inputs: false, drop_long: true };
        let (ex, report2) = tokenize_records(Path::new("d.jsonl"), &records, &template(), &Chars, &opts).unwrap();
        assert_eq!((ex.len(), report2.too_long.clone(), report2.truncated), (1, vec![1], 0));
        assert_eq!(report.too_long, Vec::<usize>::new());
    }

    #[test]
    fn many_records_split_over_threads_come_back_in_order() {
        let records: Vec<Record> = (0..1000).map(|i| rec(&format!("q{i}"), "", &"y".repeat(i % 7))).collect();
        let (all, report) = run(&records, 16, false).unwrap();
        let one_by_one: Vec<Example> = records
            .iter()
            .enumerate()
            .map(|(i, r)| Example { record: i, ..run(std::slice::from_ref(r), 16, false).unwrap().0.remove(0) })
            .collect();
        assert_eq!(all, one_by_one);
        assert_eq!(report.kept, 1000);
    }

    #[test]
    fn a_cutoff_shorter_than_every_prompt_is_an_error() {
        let msg = run(&[rec("abcdef", "", "x"), rec("abcdefg", "", "y")], 4, false).unwrap_err().to_string();
        assert!(msg.starts_with("d.jsonl:") && msg.contains("cutoff_len 4"), "{msg}");
    }
}
