//! Which examples form which batch on which rank: pure functions of the seed, the epoch
//! and the example lengths, so every process computes the same plan.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// SplitMix64-style mixing of a few words into one seed.
pub(crate) fn seed_of(words: &[u64]) -> u64 {
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

/// The global batches of a run without packing: epoch `e`'s [`epoch_order`] of all examples,
/// cut into batches of `batch_size` (an epoch's last may be short). It keeps the current
/// epoch's order, so walking the steps in turn shuffles once an epoch. The coordinator's
/// schedule and the paired-streams example both take their batches here, so the batches PEFT
/// replays are the ones training ran.
#[derive(Clone, Debug)]
pub struct GlobalBatches {
    lengths: Vec<usize>,
    seed: u64,
    group_by_length: bool,
    batch_size: usize,
    order: Option<(u64, Vec<usize>)>,
}

impl GlobalBatches {
    /// The batches of the examples whose token counts are `lengths`.
    pub fn new(lengths: Vec<usize>, seed: u64, group_by_length: bool, batch_size: usize) -> Self {
        Self { lengths, seed, group_by_length, batch_size, order: None }
    }

    /// The examples of batch `index` of `epoch` (both 0-based); empty past the epoch's end.
    pub fn get(&mut self, epoch: u64, index: usize) -> &[usize] {
        if self.order.as_ref().map(|(e, _)| *e) != Some(epoch) {
            let all: Vec<usize> = (0..self.lengths.len()).collect();
            let order = epoch_order(&all, &self.lengths, self.seed, epoch, self.group_by_length, self.batch_size);
            self.order = Some((epoch, order));
        }
        let order = &self.order.as_ref().expect("set above").1;
        nth_batch(order, index, self.batch_size)
    }
}

/// Batch `index` (0-based) of `items` cut into batches of `batch_size`: the last may be
/// short, and past the end it is empty.
pub fn nth_batch<T>(items: &[T], index: usize, batch_size: usize) -> &[T] {
    let start = index.saturating_mul(batch_size).min(items.len());
    &items[start..start.saturating_add(batch_size).min(items.len())]
}

/// Optimizer steps in one epoch of `n` examples: the last batch may be smaller, never dropped.
pub fn steps_per_epoch(n: usize, batch_size: usize) -> usize {
    n.div_ceil(batch_size.max(1))
}

/// How many optimizer steps each epoch has: the same for every epoch (`steps_per_epoch`), or
/// each epoch's own count (sample packing: an epoch's packs differ in number a little).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EpochSteps {
    /// Every epoch has this many steps.
    Uniform(u64),
    /// Epoch `e` has `steps[e]` steps; should a step lie beyond them, epochs of the last
    /// count follow.
    Each(Vec<u64>),
}

impl EpochSteps {
    /// The 0-based epoch of 1-based `step`, its 0-based index in that epoch, and the epoch's
    /// number of steps.
    pub fn locate(&self, step: u64) -> (u64, u64, u64) {
        let mut left = step.saturating_sub(1);
        let counts = match self {
            Self::Uniform(n) => &[*n][..],
            Self::Each(counts) => &counts[..],
        };
        let mut epoch = 0;
        for &n in &counts[..counts.len().saturating_sub(1)] {
            if left < n {
                return (epoch, left, n);
            }
            left -= n;
            epoch += 1;
        }
        let n = counts.last().copied().unwrap_or(1).max(1);
        (epoch + left / n, left % n, n)
    }

    /// Epochs done after `step`, as a fraction (transformers' `epoch`).
    pub fn epochs_done(&self, step: u64) -> f64 {
        let (epoch, index, n) = self.locate(step);
        epoch as f64 + (index + 1) as f64 / n as f64
    }

    /// Steps of the first `epochs` epochs.
    pub fn total(&self, epochs: u64) -> u64 {
        match self {
            Self::Uniform(n) => n * epochs,
            Self::Each(counts) => {
                let listed = counts.len().min(epochs as usize);
                let last = counts.last().copied().unwrap_or(1).max(1);
                counts[..listed].iter().sum::<u64>() + (epochs - listed as u64) * last
            }
        }
    }

    /// The first epoch's steps.
    pub fn first(&self) -> u64 {
        self.locate(1).2
    }
}

/// How one global batch is spread: `plan[rank][k]` is rank's k-th micro-batch. Every rank
/// gets the same number of micro-batches (a rank with no examples left gets empty ones), so
/// no rank ever skips a collective.
///
/// Examples are sorted longest first and dealt to the ranks in snake order (0, 1, …, n−1,
/// n−1, …, 0, …): every rank gets about the same number of tokens, so no rank waits long for
/// a straggler at the all-reduce, and each micro-batch holds examples of similar length, so
/// little of it is padding. The set of examples of a step, hence its gradient, is the same
/// whatever the world size.
pub fn spread(global: &[usize], lengths: &[usize], world: usize, micro: usize) -> Vec<Vec<Vec<usize>>> {
    let world = world.max(1);
    let mut sorted = global.to_vec();
    sorted.sort_by_key(|&i| std::cmp::Reverse(lengths.get(i).copied().unwrap_or(0)));
    let mut ranks: Vec<Vec<usize>> = vec![Vec::new(); world];
    for (k, i) in sorted.into_iter().enumerate() {
        let (round, pos) = (k / world, k % world);
        let rank = if round % 2 == 0 { pos } else { world - 1 - pos };
        ranks[rank].push(i);
    }
    let micros = ranks.iter().map(Vec::len).max().unwrap_or(0).div_ceil(micro.max(1)).max(1);
    ranks
        .into_iter()
        .map(|mine| {
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
    fn global_batches_cut_each_epochs_order_and_reshuffle_per_epoch() {
        let lengths: Vec<usize> = (0..10).map(|i| 3 + i % 4).collect();
        let mut batches = GlobalBatches::new(lengths.clone(), 7, false, 4);
        let all: Vec<usize> = (0..10).collect();
        for epoch in [0, 1, 0] {
            let order = epoch_order(&all, &lengths, 7, epoch, false, 4);
            let cut: Vec<Vec<usize>> = (0..4).map(|i| batches.get(epoch, i).to_vec()).collect();
            assert_eq!(cut, vec![order[..4].to_vec(), order[4..8].to_vec(), order[8..].to_vec(), vec![]]);
        }
        assert_ne!(batches.get(0, 0).to_vec(), batches.get(1, 0).to_vec());
        assert_eq!(nth_batch(&all, usize::MAX, 4), &[] as &[usize]);
    }

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
        // Lengths 10, 50, 30, 20, 40: sorted 1, 4, 2, 3, 0; dealt 0→r0, 1→r1, 2→r1, 3→r0, 4→r0.
        let lengths = [10, 50, 30, 20, 40];
        let plan = spread(&[0, 1, 2, 3, 4], &lengths, 2, 2);
        assert_eq!(plan, vec![vec![vec![1, 3], vec![0]], vec![vec![4, 2], vec![]]]);
        let plan = spread(&[7], &[0; 8], 3, 4);
        assert!(plan.iter().all(|r| r.len() == 1));
        assert_eq!(plan[0][0], vec![7]);
        // One rank: the whole batch, longest first, in micro-batches.
        assert_eq!(spread(&[0, 1, 2, 3, 4], &lengths, 1, 2), vec![vec![vec![1, 4], vec![2, 3], vec![0]]]);
        assert_eq!(steps_per_epoch(1727, 16), 108);
    }

    #[test]
    fn epoch_steps_locate_steps_in_uniform_and_listed_epochs() {
        let u = EpochSteps::Uniform(3);
        assert_eq!([1, 3, 4, 7].map(|s| u.locate(s)), [(0, 0, 3), (0, 2, 3), (1, 0, 3), (2, 0, 3)]);
        assert_eq!((u.epochs_done(4), u.total(2), u.first()), (4.0 / 3.0, 6, 3));
        let e = EpochSteps::Each(vec![2, 3]);
        assert_eq!(
            [1, 2, 3, 5, 6, 8].map(|s| e.locate(s)),
            [(0, 0, 2), (0, 1, 2), (1, 0, 3), (1, 2, 3), (2, 0, 3), (2, 2, 3)]
        );
        assert_eq!(
            (e.epochs_done(3), e.epochs_done(5), e.total(2), e.total(3), e.first()),
            (1.0 + 1.0 / 3.0, 2.0, 5, 8, 2)
        );
    }
}
