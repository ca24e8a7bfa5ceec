//! The dropout keystream equals `rand_chacha`'s ChaCha8 stream word for word, with AVX-512
//! and without (`simd::force_baseline`), whatever the pieces it is drawn in (whole 16-block
//! passes, partial ones for tails, `rand_chacha` up to a block boundary), and across the block
//! counter's 32-bit carry.
//!
//! One test in its own binary, because the baseline switch is process-wide.

use lorafleet_kernels::fused::keystream::Keystream;
use lorafleet_kernels::fused::simd;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn reference(seed: u64, word: u64, n: usize) -> Vec<u32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_word_pos(word as u128);
    (0..n).map(|_| rng.next_u32()).collect()
}

/// Draws `n` words from `word` on in pieces of the given sizes (cycled).
fn ours(seed: u64, word: u64, n: usize, pieces: &[usize]) -> Vec<u32> {
    let mut stream = Keystream::from_u64(seed);
    stream.seek(word);
    let mut out = vec![0u32; n];
    let (mut done, mut i) = (0, 0);
    while done < n {
        let len = pieces[i % pieces.len()].min(n - done);
        stream.fill(&mut out[done..done + len]);
        done += len;
        i += 1;
    }
    out
}

#[test]
fn keystream_equals_rand_chacha_on_both_paths() {
    let carry = ((1u64 << 32) - 5) * 16; // 5 blocks before the counter's low word wraps
    let cases: &[(u64, u64, usize, &[usize])] = &[
        (0, 0, 0, &[1]),
        (1, 0, 1, &[1]),
        (42, 0, 256, &[256]),
        (7, 0, 4096 + 37, &[256]),
        (7, 0, 1000, &[1, 255, 256, 17, 512]),
        (u64::MAX, 3, 777, &[300, 5]),
        (5, 0, 2000, &[100, 3, 200, 64, 63]),
        (9, 16 * 1000 + 9, 513, &[513]),
        (11, carry, 16 * 40 + 3, &[256]),
        (11, carry + 1, 600, &[7, 256]),
    ];
    for baseline in [false, true] {
        simd::force_baseline(baseline);
        for &(seed, word, n, pieces) in cases {
            assert_eq!(
                ours(seed, word, n, pieces),
                reference(seed, word, n),
                "seed {seed}, from word {word}, {n} words in pieces {pieces:?}, baseline {baseline}"
            );
        }
    }
    simd::force_baseline(false);
}
