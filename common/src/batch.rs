//! A padded batch of token rows as the model consumes it: plain vectors, no tensors.

/// Label value that excludes a position from the loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// `rows × seq_len` tokens, row-major, right-padded.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Batch {
    /// Number of rows.
    pub rows: usize,
    /// Tokens per row (padding included).
    pub seq_len: usize,
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Vec<u8>,
    /// Target ids, or [`IGNORE_INDEX`]. Position `t` is predicted from positions `..t`,
    /// i.e. the model's output at `t - 1` (the Hugging Face causal-LM shift).
    pub labels: Vec<i64>,
    /// Global index of each example in the data set: the key of its dropout masks, so that
    /// an example gets the same masks whichever rank, micro-batch or row it lands in. One
    /// per row, or, with `packed`, one per sequence in row order.
    pub example_ids: Vec<u64>,
    /// Sample packing: the lengths of the sequences laid end to end in each row (empty: one
    /// sequence per row). Positions restart and attention stops at each boundary; only the
    /// training engine reads packed rows.
    pub packed: Vec<Vec<u32>>,
}

impl Batch {
    /// Pads `rows` of `(input_ids, labels)` on the right to a common length (rounded up to a
    /// multiple of `multiple`), with `pad_id` and [`IGNORE_INDEX`].
    pub fn from_rows(rows: &[(Vec<u32>, Vec<i64>)], example_ids: Vec<u64>, pad_id: u32, multiple: usize) -> Self {
        let longest = rows.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0);
        let m = multiple.max(1);
        let seq_len = longest.div_ceil(m) * m;
        let mut batch = Batch {
            rows: rows.len(),
            seq_len,
            input_ids: Vec::with_capacity(rows.len() * seq_len),
            attention_mask: Vec::with_capacity(rows.len() * seq_len),
            labels: Vec::with_capacity(rows.len() * seq_len),
            example_ids,
            packed: Vec::new(),
        };
        for (ids, labels) in rows {
            let pad = seq_len - ids.len();
            batch.input_ids.extend(ids.iter().copied().chain(std::iter::repeat_n(pad_id, pad)));
            batch.attention_mask.extend(std::iter::repeat_n(1, ids.len()).chain(std::iter::repeat_n(0, pad)));
            batch.labels.extend(labels.iter().copied().chain(std::iter::repeat_n(IGNORE_INDEX, pad)));
        }
        batch
    }

    /// A batch of tokenized examples, keyed by their record indices, right-padded to a
    /// multiple of 8 (as alpaca-lora's collator).
    pub fn from_examples<'a>(examples: impl IntoIterator<Item = &'a crate::data::Example>, pad_id: u32) -> Self {
        let (rows, ids): (Vec<_>, Vec<_>) =
            examples.into_iter().map(|e| ((e.input_ids.clone(), e.labels.clone()), e.record as u64)).unzip();
        Self::from_rows(&rows, ids, pad_id, 8)
    }

    /// Rows that each hold several examples end to end (sample packing), right-padded to a
    /// multiple of 8. No label is scored across a boundary: a sequence's first label is not
    /// predicted from the one before it.
    pub fn from_packed_rows(rows: &[Vec<&crate::data::Example>], pad_id: u32) -> Self {
        let joined: Vec<(Vec<u32>, Vec<i64>)> = rows
            .iter()
            .map(|row| {
                let ids = row.iter().flat_map(|e| e.input_ids.iter().copied()).collect();
                let labels = row.iter().flat_map(|e| e.labels.iter().copied()).collect();
                (ids, labels)
            })
            .collect();
        let ids = rows.iter().flatten().map(|e| e.record as u64).collect();
        let mut batch = Self::from_rows(&joined, ids, pad_id, 8);
        batch.packed = rows.iter().map(|row| row.iter().map(|e| e.input_ids.len() as u32).collect()).collect();
        batch
    }

    /// Whether rows hold several sequences (sample packing).
    pub fn is_packed(&self) -> bool {
        !self.packed.is_empty()
    }

    /// Sequences in the batch: one per row, or the packed ones.
    pub fn sequences(&self) -> usize {
        if self.is_packed() {
            self.packed.iter().map(Vec::len).sum()
        } else {
            self.rows
        }
    }

    /// Non-padding tokens: what throughput counts.
    pub fn real_tokens(&self) -> u64 {
        self.attention_mask.iter().map(|&m| u64::from(m)).sum()
    }

    /// Positions whose output is scored: `(row · seq_len + t, target)` for every `t` whose
    /// next label is not ignored and, in a packed row, belongs to the same sequence.
    pub fn scored_positions(&self) -> (Vec<u32>, Vec<u32>) {
        let mut positions = Vec::new();
        let mut targets = Vec::new();
        for r in 0..self.rows {
            // Where each packed sequence ends: the next one's first label is not predicted.
            let ends: Vec<usize> = self.packed.get(r).map_or_else(Vec::new, |lengths| {
                lengths
                    .iter()
                    .scan(0, |at, &n| {
                        *at += n as usize;
                        Some(*at)
                    })
                    .collect()
            });
            for t in 0..self.seq_len.saturating_sub(1) {
                let label = self.labels[r * self.seq_len + t + 1];
                if label != IGNORE_INDEX && !ends.contains(&(t + 1)) {
                    positions.push((r * self.seq_len + t) as u32);
                    targets.push(label as u32);
                }
            }
        }
        (positions, targets)
    }

    /// Number of scored target tokens (the loss's denominator for this batch).
    pub fn target_tokens(&self) -> usize {
        self.scored_positions().0.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn right_padding_to_a_multiple_and_scored_positions() {
        let rows = vec![(vec![1, 5, 6, 7], vec![-100, -100, 6, 7]), (vec![1, 9], vec![-100, 9])];
        let b = Batch::from_rows(&rows, vec![10, 11], 3, 8);
        assert_eq!((b.rows, b.seq_len), (2, 8));
        assert_eq!(&b.input_ids[8..], &[1, 9, 3, 3, 3, 3, 3, 3]);
        assert_eq!(&b.attention_mask[..8], &[1, 1, 1, 1, 0, 0, 0, 0]);
        assert_eq!(b.labels[12], IGNORE_INDEX);
        let (positions, targets) = b.scored_positions();
        assert_eq!(positions, vec![1, 2, 8]);
        assert_eq!(targets, vec![6, 7, 9]);
        assert_eq!(b.target_tokens(), 3);
    }

    #[test]
    fn packed_rows_score_nothing_across_a_boundary() {
        use crate::data::Example;
        let ex = |record, input_ids: Vec<u32>, labels: Vec<i64>| Example { record, input_ids, labels };
        let (a, b) = (ex(4, vec![1, 5, 6], vec![-100, 5, 6]), ex(9, vec![1, 7], vec![1, 7]));
        let p = Batch::from_packed_rows(&[vec![&a, &b], vec![&b]], 0);
        assert_eq!((p.rows, p.seq_len, p.sequences(), p.example_ids.clone()), (2, 8, 3, vec![4, 9, 9]));
        assert_eq!(p.packed, vec![vec![3, 2], vec![2]]);
        // b's first label (1, at position 3) is not predicted from a's last token.
        assert_eq!(p.scored_positions(), (vec![0, 1, 3, 8], vec![5, 6, 7, 7]));
        assert_eq!(p.target_tokens(), 4);
        assert_eq!(p.real_tokens(), 7);
    }
}
