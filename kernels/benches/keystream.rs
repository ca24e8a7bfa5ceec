//! The dropout masks' ChaCha8 keystream: `Keystream` (16 blocks per AVX-512 pass) beside
//! `rand_chacha`'s generator, which draws the same words. `cargo bench -p lorafleet-kernels
//! --bench keystream` prints nanoseconds per word: the two alternate three times (each time
//! the median of 3 runs of 4M words), and the median of the three is reported.

mod common;

use common::median_seconds;
use lorafleet_kernels::fused::keystream::Keystream;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn main() {
    const WORDS: usize = 1 << 22;
    let mut out = vec![0u32; 256];
    let mut ours = || {
        let mut stream = Keystream::from_u64(7);
        for _ in 0..WORDS / 256 {
            stream.fill(&mut out);
        }
        std::hint::black_box(&out);
    };
    let mut out2 = vec![0u32; 256];
    let mut theirs = || {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for _ in 0..WORDS / 256 {
            rng.fill(&mut out2[..]);
        }
        std::hint::black_box(&out2);
    };
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        a.push(median_seconds(&mut ours, 3));
        b.push(median_seconds(&mut theirs, 3));
    }
    a.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    let ns = |s: f64| s / WORDS as f64 * 1e9;
    println!("keystream: {:.3} ns/word; rand_chacha ChaCha8Rng: {:.3} ns/word", ns(a[1]), ns(b[1]));
}
