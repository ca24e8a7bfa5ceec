//! Sample packing (`sample_packing`): several training examples laid end to end in one row of
//! at most `cutoff_len` tokens, so a step computes on real tokens instead of padding.
//!
//! axolotl's multipack semantics, as a pure function of (seed, epoch, lengths, cutoff_len,
//! batch_size): each epoch's seeded shuffle ([`epoch_order`]) is cut into windows of
//! [`WINDOW_BATCHES`] × `batch_size` examples, the examples of a window are packed
//! by first-fit decreasing (ties keep the shuffled order), and the window's packs are shuffled
//! with a seed of their own, so a step mixes full packs of long examples with the emptier
//! last ones. Packs are then the schedule's units in place of examples: `batch_size` packs
//! make an optimizer step and `micro_batch_size` packs a micro-batch.
//!
//! The number of packs differs a little between epochs, and the learning-rate schedule and
//! the checkpoints' run identity need every epoch's step count before the first step: so
//! [`Packing::new`] packs every epoch of the run up front (milliseconds per 100k examples).

use super::schedule::{epoch_order, seed_of, EpochSteps};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::cmp::Reverse;

/// Examples per packing window, in multiples of `batch_size`: `group_by_length`'s
/// mega-batch size. A window bounds how far apart in the shuffled order two examples packed
/// together may be, so the packs change from epoch to epoch (one window over the whole epoch
/// would group examples by length alone).
pub const WINDOW_BATCHES: usize = 50;

/// A run's sample packing: each epoch's packs in training order; a pack is a list of indices
/// into the training examples, longest first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packing {
    /// `epochs[e][k]`: the k-th pack of epoch `e`.
    pub epochs: Vec<Vec<Vec<usize>>>,
    /// Packs per optimizer step.
    pub batch_size: usize,
}

impl Packing {
    /// Packs the examples of token `lengths` (indices `0..lengths.len()`) into rows of at
    /// most `cutoff_len` tokens for `num_epochs` epochs, or, with `max_steps`, for as many
    /// epochs as that many steps of `batch_size` packs reach.
    pub fn new(
        lengths: &[usize],
        cutoff_len: usize,
        seed: u64,
        batch_size: usize,
        num_epochs: usize,
        max_steps: Option<u64>,
    ) -> Self {
        let batch_size = batch_size.max(1);
        let all: Vec<usize> = (0..lengths.len()).collect();
        let mut epochs = Vec::new();
        let mut steps = 0u64;
        while match max_steps {
            Some(max) => steps < max && !lengths.is_empty(),
            None => epochs.len() < num_epochs,
        } {
            let epoch = epochs.len() as u64;
            let order = epoch_order(&all, lengths, seed, epoch, false, batch_size);
            let packs = pack_epoch(&order, lengths, cutoff_len, WINDOW_BATCHES * batch_size, seed, epoch);
            steps += packs.len().div_ceil(batch_size) as u64;
            epochs.push(packs);
        }
        Self { epochs, batch_size }
    }

    /// Optimizer steps of each packed epoch.
    pub fn epoch_steps(&self) -> EpochSteps {
        EpochSteps::Each(self.epochs.iter().map(|p| p.len().div_ceil(self.batch_size) as u64).collect())
    }

    /// Real tokens over the packs' capacity (`cutoff_len` each), over the whole run: how
    /// little of a packed row is padding.
    pub fn fill(&self, lengths: &[usize], cutoff_len: usize) -> f64 {
        let packs: usize = self.epochs.iter().map(Vec::len).sum();
        let tokens: usize = self.epochs.iter().flatten().flatten().map(|&i| lengths[i]).sum();
        tokens as f64 / (packs * cutoff_len).max(1) as f64
    }
}

/// One epoch's packs: `order` cut into windows of `window` examples, each packed by
/// [`first_fit_decreasing`] and its packs shuffled (seeded by seed, epoch and window).
pub fn pack_epoch(
    order: &[usize],
    lengths: &[usize],
    cutoff_len: usize,
    window: usize,
    seed: u64,
    epoch: u64,
) -> Vec<Vec<usize>> {
    let mut packs = Vec::new();
    for (w, items) in order.chunks(window.max(1)).enumerate() {
        let mut bins = first_fit_decreasing(items, lengths, cutoff_len);
        bins.shuffle(&mut ChaCha8Rng::seed_from_u64(seed_of(&[seed, epoch, w as u64, 0x9ac4])));
        packs.extend(bins);
    }
    packs
}

/// First-fit decreasing: `items` sorted longest first (a stable sort: equal lengths keep
/// their order in `items`), each put into the first bin with room for it, a new bin when
/// none has; bins in the order they were opened. An item longer than `capacity` gets a bin
/// of its own (examples are truncated or dropped at `cutoff_len` before they get here).
pub fn first_fit_decreasing(items: &[usize], lengths: &[usize], capacity: usize) -> Vec<Vec<usize>> {
    let mut sorted = items.to_vec();
    sorted.sort_by_key(|&i| Reverse(lengths[i]));
    let mut room = RoomTree::new(sorted.len(), capacity);
    let mut bins: Vec<Vec<usize>> = Vec::new();
    for i in sorted {
        let need = lengths[i];
        // Unopened bins have all their room, so the leftmost fit is an open bin or the next one.
        let b = room.first_with(need).unwrap_or(bins.len());
        if b == bins.len() {
            bins.push(Vec::new());
        }
        bins[b].push(i);
        room.set(b, room.get(b).saturating_sub(need));
    }
    bins
}

/// The room left in each bin, in a max segment tree: the first bin with room for `need`
/// tokens in O(log n), so packing a window of n examples costs O(n log n), not O(n²).
struct RoomTree {
    leaves: usize,
    max: Vec<usize>,
}

impl RoomTree {
    fn new(bins: usize, capacity: usize) -> Self {
        let leaves = bins.max(1).next_power_of_two();
        Self { leaves, max: vec![capacity; 2 * leaves] }
    }

    fn get(&self, bin: usize) -> usize {
        self.max[self.leaves + bin]
    }

    fn set(&mut self, bin: usize, room: usize) {
        let mut i = self.leaves + bin;
        self.max[i] = room;
        while i > 1 {
            i /= 2;
            self.max[i] = self.max[2 * i].max(self.max[2 * i + 1]);
        }
    }

    fn first_with(&self, need: usize) -> Option<usize> {
        if self.max[1] < need {
            return None;
        }
        let mut i = 1;
        while i < self.leaves {
            i = if self.max[2 * i] >= need { 2 * i } else { 2 * i + 1 };
        }
        Some(i - self.leaves)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// First fit by scanning every bin: what the tree must agree with.
    fn naive(items: &[usize], lengths: &[usize], capacity: usize) -> Vec<Vec<usize>> {
        let mut sorted = items.to_vec();
        sorted.sort_by_key(|&i| Reverse(lengths[i]));
        let mut bins: Vec<(usize, Vec<usize>)> = Vec::new();
        for i in sorted {
            match bins.iter_mut().find(|(used, _)| used + lengths[i] <= capacity) {
                Some((used, bin)) => {
                    *used += lengths[i];
                    bin.push(i);
                }
                None => bins.push((lengths[i], vec![i])),
            }
        }
        bins.into_iter().map(|(_, b)| b).collect()
    }

    fn lengths(n: usize, seed: u64) -> Vec<usize> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rand::Rng::random_range(&mut rng, 1..=256)).collect()
    }

    #[test]
    fn first_fit_decreasing_fills_the_first_bin_with_room() {
        // Sorted: 1 (9), 3 (6), 0 (5), 4 (4), 2 (2), 5 (1); capacity 10.
        let l = [5, 9, 2, 6, 4, 1];
        let bins = first_fit_decreasing(&[0, 1, 2, 3, 4, 5], &l, 10);
        assert_eq!(bins, vec![vec![1, 5], vec![3, 4], vec![0, 2]]);
        // Ties keep the given order; an item over capacity gets a bin of its own.
        assert_eq!(first_fit_decreasing(&[2, 0, 1], &[3, 3, 3], 6), vec![vec![2, 0], vec![1]]);
        assert_eq!(first_fit_decreasing(&[0, 1], &[12, 3], 10), vec![vec![0], vec![1]]);
        for seed in 0..20 {
            let l = lengths(300, seed);
            let items: Vec<usize> = (0..300).rev().collect();
            assert_eq!(first_fit_decreasing(&items, &l, 256), naive(&items, &l, 256), "seed {seed}");
        }
    }

    #[test]
    fn every_example_once_per_epoch_no_pack_over_cutoff_and_windows_respected() {
        let l = lengths(1000, 3);
        let p = Packing::new(&l, 256, 11, 4, 3, None);
        assert_eq!(p.epochs.len(), 3);
        for packs in &p.epochs {
            let mut seen: Vec<usize> = packs.iter().flatten().copied().collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..1000).collect::<Vec<_>>());
            assert!(packs.iter().all(|pack| !pack.is_empty() && pack.iter().map(|&i| l[i]).sum::<usize>() <= 256));
        }
        assert_ne!(p.epochs[0], p.epochs[1], "each epoch is packed from its own shuffle");
        // Windows of 200 examples: every pack holds examples of one window of the order.
        let all: Vec<usize> = (0..1000).collect();
        let order = epoch_order(&all, &l, 11, 0, false, 4);
        let window_of: Vec<usize> = {
            let mut w = vec![0; 1000];
            order.iter().enumerate().for_each(|(k, &i)| w[i] = k / 200);
            w
        };
        let packs = pack_epoch(&order, &l, 256, 200, 11, 0);
        assert!(packs.iter().all(|pack| pack.iter().all(|&i| window_of[i] == window_of[pack[0]])));
        let windows: Vec<usize> = packs.iter().map(|pack| window_of[pack[0]]).collect();
        assert!(windows.windows(2).all(|w| w[0] <= w[1]), "windows follow each other");
        assert_eq!(p.epochs[0], pack_epoch(&order, &l, 256, WINDOW_BATCHES * 4, 11, 0));
        // FFD wastes little: these uniform lengths fill packs to over 90%.
        assert!(p.fill(&l, 256) > 0.9, "fill {}", p.fill(&l, 256));
    }

    #[test]
    fn packing_is_a_pure_function_of_its_inputs_and_covers_max_steps() {
        let l = lengths(500, 5);
        let a = Packing::new(&l, 256, 1, 8, 2, None);
        assert_eq!(a, Packing::new(&l, 256, 1, 8, 2, None));
        assert_ne!(a, Packing::new(&l, 256, 2, 8, 2, None));
        let EpochSteps::Each(steps) = a.epoch_steps() else { panic!("packed epochs list their steps") };
        assert_eq!(steps, a.epochs.iter().map(|p| p.len().div_ceil(8) as u64).collect::<Vec<_>>());
        // max_steps beyond num_epochs: as many epochs as it takes.
        let per_epoch = steps[0];
        let long = Packing::new(&l, 256, 1, 8, 1, Some(3 * per_epoch + 1));
        assert!(long.epochs.len() >= 4);
        assert_eq!(long.epochs[..2], a.epochs[..]);
        assert!(Packing::new(&[], 256, 1, 8, 1, Some(5)).epochs.is_empty());
    }
}
