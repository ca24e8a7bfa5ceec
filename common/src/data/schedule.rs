//! Which examples form which batch on which rank: pure functions of the seed, the epoch
//! and the example lengths, so every process computes the same plan.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// SplitMix64-style mixing of a few words into one seed.
fn seed_of(words: &[u64]) -> u64 {
    let mut h = 0x243F_6A88_85A3_08D3u64;
    for &w in words {
        h = (h ^ w).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        h ^= h >> 29;
        h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        h ^= h >> 32;
    }
    h
}

/// Splits `n` examples into (train, validation) index lists; the validation set holds
/// `val_size` examples drawn with `seed`. Both lists are sorted.
pub fn split_validation(n: usize, val_size: usize, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut idx: Vec<usize> = (0..n).collect();
    if val_size == 0 {
        return (idx, Vec::new());
    }
    idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed_of(&[seed, 0x5e7])));
    let mut val = idx[..val_size.min(n)].to_vec();
    let mut train = idx[val_size.min(n)..].to_vec();
    val.sort_unstable();
    train.sort_unstable();
    (train, val)
}

/// The order of `examples` in `epoch`: a seeded permutation; with `group_by_length`, each
/// run of 50 global batches is then sorted longest first (transformers'
/// `LengthGroupedSampler`), so batches waste little padding but stay shuffled.
pub fn epoch_order(
    examples: &[usize],
    lengths: &[usize],
    seed: u64,
    epoch: u64,
    group_by_length: bool,
    batch_size: usize,
) -> Vec<usize> {
    let mut order = examples.to_vec();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed_of(&[seed, epoch])));
    if group_by_length {
        for mega in order.chunks_mut((50 * batch_size).max(1)) {
            mega.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        }
    }
    order
}

/// Optimizer steps in one epoch of `n` examples: the last batch may be smaller, never dropped.
pub fn steps_per_epoch(n: usize, batch_size: usize) -> usize {
    n.div_ceil(batch_size.max(1))
}

/// How one global batch is spread: `plan[rank][k]` is rank's k-th micro-batch. Every rank
/// gets the same number of micro-batches (a rank with no examples left gets empty ones), so
/// no rank ever skips a collective.
pub fn spread(global: &[usize], world: usize, micro: usize) -> Vec<Vec<Vec<usize>>> {
    let per_rank = global.len().div_ceil(world.max(1));
    let micros = per_rank.div_ceil(micro.max(1)).max(1);
    (0..world)
        .map(|r| {
            let mine = global.get(r * per_rank..((r + 1) * per_rank).min(global.len())).unwrap_or(&[]);
            (0..micros)
                .map(|k| mine.get(k * micro..((k + 1) * micro).min(mine.len())).unwrap_or(&[]).to_vec())
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_seeded_and_disjoint() {
        let (t, v) = split_validation(10, 3, 42);
        assert_eq!((t.len(), v.len()), (7, 3));
        assert!(v.iter().all(|i| !t.contains(i)));
        assert_eq!(split_validation(10, 3, 42), (t, v.clone()));
        assert_ne!(split_validation(10, 3, 43).1, v);
    }

    #[test]
    fn epochs_are_distinct_permutations_and_grouping_sorts_within_megabatches() {
        let ex: Vec<usize> = (0..100).collect();
        let lengths: Vec<usize> = (0..100).map(|i| (i * 37) % 11).collect();
        let a = epoch_order(&ex, &lengths, 1, 0, false, 4);
        let b = epoch_order(&ex, &lengths, 1, 1, false, 4);
        assert_ne!(a, b);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, ex);
        let g = epoch_order(&ex, &lengths, 1, 0, true, 1);
        assert!(g[..50].windows(2).all(|w| lengths[w[0]] >= lengths[w[1]]));
    }

    #[test]
    fn spread_gives_every_rank_the_same_number_of_micro_batches() {
        let plan = spread(&[0, 1, 2, 3, 4], 2, 2);
        assert_eq!(plan, vec![vec![vec![0, 1], vec![2]], vec![vec![3, 4], vec![]]]);
        let plan = spread(&[7], 3, 4);
        assert!(plan.iter().all(|r| r.len() == 1));
        assert_eq!(plan[0][0], vec![7]);
        assert_eq!(steps_per_epoch(1727, 16), 108);
    }
}
