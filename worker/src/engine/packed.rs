//! A padded batch turned into packed sequences: the engine never computes on padding.
//!
//! Rows are right-padded (`Batch`), so a row's real tokens are a prefix; they are laid back
//! to back (flash-attention's varlen layout: `cu_seqlens`), positions restart at 0 in each
//! sequence, and the scored positions are re-indexed into the packed tokens. A row whose
//! mask is not a prefix of ones cannot be packed this way and is refused.

use crate::error::{Error, Result};
use lorafleet_common::{Batch, IGNORE_INDEX};

/// The packed form of one micro-batch.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Packed {
    /// Sequence boundaries: sequence s is tokens `cu_seqlens[s]..cu_seqlens[s + 1]`.
    pub cu_seqlens: Vec<usize>,
    /// Token ids, `[N]`.
    pub ids: Vec<u32>,
    /// Position of each token within its sequence (the RoPE angle index).
    pub positions: Vec<u32>,
    /// Packed indices of the tokens whose output is scored.
    pub scored: Vec<usize>,
    /// The target of each scored token.
    pub targets: Vec<u32>,
    /// Each sequence's index in the batch's `example_ids` (its dropout key).
    pub examples: Vec<usize>,
}

impl Packed {
    /// Packs `batch`; rows without any real token are left out. Token ids and targets must
    /// lie in `0..vocab` (targets may be ignored), and no row may be longer than the model's
    /// `positions`: the checks the reference model makes in its embedding and blocks.
    pub(crate) fn new(batch: &Batch, vocab: usize, positions: usize) -> Result<Self> {
        let cells = batch.rows.checked_mul(batch.seq_len);
        let lengths = [batch.input_ids.len(), batch.attention_mask.len(), batch.labels.len()];
        let packed_ok = !batch.is_packed() || batch.packed.len() == batch.rows;
        if cells.is_none_or(|c| lengths.iter().any(|&l| l != c))
            || !packed_ok
            || batch.example_ids.len() != batch.sequences()
        {
            return Err(Error::Invalid(format!(
                "batch of {} × {} with {lengths:?} ids/mask/labels and {} example ids",
                batch.rows,
                batch.seq_len,
                batch.example_ids.len()
            )));
        }
        let mut p = Packed { cu_seqlens: vec![0], ..Default::default() };
        let mut sequence = 0;
        for r in 0..batch.rows {
            let row = r * batch.seq_len..(r + 1) * batch.seq_len;
            let mask = &batch.attention_mask[row.clone()];
            let len = mask.iter().take_while(|&&m| m != 0).count();
            if mask[len..].iter().any(|&m| m != 0) {
                return Err(Error::Invalid(format!("batch row {r}: the attention mask is not right padding")));
            }
            let labels = &batch.labels[row.clone()];
            if let Some(t) = (len..batch.seq_len).find(|&t| t > len && labels[t] != IGNORE_INDEX) {
                return Err(Error::Invalid(format!("batch row {r}: a label at padding position {t}")));
            }
            if let Some(&bad) = labels.iter().find(|&&l| l != IGNORE_INDEX && !(0..vocab as i64).contains(&l)) {
                return Err(Error::Invalid(format!("batch row {r}: label {bad} outside the vocabulary of {vocab}")));
            }
            if len == 0 {
                sequence += batch.packed.get(r).map_or(1, Vec::len);
                continue;
            }
            // The row's sequences: one, or the packed lengths (which must fill its real tokens).
            let lengths = match batch.packed.get(r) {
                Some(l) if batch.is_packed() => l.iter().map(|&n| n as usize).collect(),
                _ => vec![len],
            };
            if lengths.iter().sum::<usize>() != len || lengths.contains(&0) {
                return Err(Error::Invalid(format!("batch row {r}: packed lengths {lengths:?} for {len} tokens")));
            }
            let mut start = 0;
            for n in lengths {
                if n > positions {
                    return Err(Error::Invalid(format!(
                        "sequence of {n} tokens is longer than the model's {positions} positions"
                    )));
                }
                let base = p.ids.len();
                let at = row.start + start;
                p.ids.extend_from_slice(&batch.input_ids[at..at + n]);
                p.positions.extend(0..n as u32);
                // Within the sequence only: a row's padding, or the next sequence, is never a target.
                let limit = if start + n == len { batch.seq_len.saturating_sub(1).min(len) } else { start + n - 1 };
                for t in start..limit {
                    let label = labels[t + 1];
                    if label != IGNORE_INDEX {
                        p.scored.push(base + t - start);
                        p.targets.push(label as u32);
                    }
                }
                p.cu_seqlens.push(p.ids.len());
                p.examples.push(sequence);
                sequence += 1;
                start += n;
            }
        }
        if let Some(&bad) = p.ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(Error::Invalid(format!("token id {bad} outside the model's vocabulary of {vocab}")));
        }
        Ok(p)
    }

    /// Number of real tokens.
    pub(crate) fn tokens(&self) -> usize {
        self.ids.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_is_dropped_and_scored_positions_follow_the_tokens() {
        let rows = vec![(vec![1, 5, 6, 7], vec![-100, -100, 6, 7]), (vec![], vec![]), (vec![1, 9], vec![-100, 9])];
        let b = Batch::from_rows(&rows, vec![10, 11, 12], 3, 8);
        let p = Packed::new(&b, 16, 64).unwrap();
        assert_eq!(p.cu_seqlens, vec![0, 4, 6]);
        assert_eq!(p.ids, vec![1, 5, 6, 7, 1, 9]);
        assert_eq!(p.positions, vec![0, 1, 2, 3, 0, 1]);
        assert_eq!(p.examples, vec![0, 2]);
        // The batch scores rows·seq_len + t for t = 1, 2 (row 0) and t = 0 (row 2).
        assert_eq!(b.scored_positions().1, p.targets);
        assert_eq!(p.scored, vec![1, 2, 4]);
    }

    #[test]
    fn packed_rows_split_into_sequences_and_score_nothing_across_a_boundary() {
        let ex = |record, ids: Vec<u32>, labels: Vec<i64>| lorafleet_common::data::Example {
            record,
            input_ids: ids,
            labels,
        };
        let (a, b, c) =
            (ex(7, vec![1, 5, 6], vec![-100, 5, 6]), ex(8, vec![1, 9], vec![1, 9]), ex(9, vec![1, 4], vec![-100, 4]));
        let batch = Batch::from_packed_rows(&[vec![&a, &b], vec![&c]], 0);
        let p = Packed::new(&batch, 16, 64).unwrap();
        assert_eq!(p.cu_seqlens, vec![0, 3, 5, 7]);
        assert_eq!(p.positions, vec![0, 1, 2, 0, 1, 0, 1]);
        assert_eq!(p.examples, vec![0, 1, 2]);
        // a's last token (packed 2) does not predict b's first; b's 1 predicts 9, c's 1 predicts 4.
        assert_eq!(p.scored, vec![0, 1, 3, 5]);
        assert_eq!(p.targets, vec![5, 6, 9, 4]);
        let mut bad = batch.clone();
        bad.packed[0] = vec![3, 1];
        assert!(Packed::new(&bad, 16, 64).unwrap_err().to_string().contains("packed lengths"));
    }

    #[test]
    fn a_mask_with_a_hole_is_refused() {
        let mut b = Batch::from_rows(&[(vec![1, 2, 3], vec![-100, 2, 3])], vec![0], 0, 4);
        b.attention_mask[1] = 0;
        assert!(Packed::new(&b, 16, 64).is_err());
    }

    #[test]
    fn labels_outside_the_vocabulary_and_inconsistent_lengths_are_refused() {
        let b = Batch::from_rows(&[(vec![1, 2, 3], vec![-100, 2, 30])], vec![0], 0, 4);
        assert!(Packed::new(&b, 16, 64).unwrap_err().to_string().contains("label 30"));
        let b = Batch::from_rows(&[(vec![1, 2, 3], vec![-100, -1, 3])], vec![0], 0, 4);
        assert!(Packed::new(&b, 16, 64).is_err());
        let mut b = Batch::from_rows(&[(vec![1, 2, 3], vec![-100, 2, 3])], vec![0], 0, 4);
        b.labels.pop();
        assert!(Packed::new(&b, 16, 64).is_err());
        b = Batch::from_rows(&[(vec![1, 2, 3], vec![-100, 2, 3])], vec![], 0, 4);
        assert!(Packed::new(&b, 16, 64).is_err());
        // Token ids and lengths are checked as the reference model's embedding and blocks do.
        let b = Batch::from_rows(&[(vec![1, 20, 3], vec![-100, 2, 3])], vec![0], 0, 4);
        assert!(Packed::new(&b, 16, 64).unwrap_err().to_string().contains("token id 20"));
        let b = Batch::from_rows(&[(vec![1, 2, 3], vec![-100, 2, 3])], vec![0], 0, 4);
        assert!(Packed::new(&b, 16, 2).unwrap_err().to_string().contains("longer than"));
    }
}
