//! The ChaCha8 keystream of the dropout masks, 16 blocks at a time with AVX-512.
//!
//! A mask element is one `u32` of a ChaCha8 stream (`rand_chacha::ChaCha8Rng` seeded by
//! `seed_from_u64(key)`), and the reference model draws it through `rand_chacha` itself. Its
//! generator (ppv-lite86) runs four blocks at a time in 128-bit lanes, about 1 ns a word
//! here: a fifth of the demo's step went to drawing masks. [`Keystream`] produces the same
//! words (the ChaCha block function is fixed: same key, 64-bit block counter, zero stream
//! id) with one block per lane of sixteen 512-bit vectors and a 16 × 16 transpose back to
//! stream order, where the CPU has AVX-512. Elsewhere, under `LORAFLEET_SIMD=baseline`, and for
//! a stream's words before a block boundary or in a short tail, `rand_chacha` itself draws
//! them (a scalar block function ran at 2.5 ns a word, twice its time).
//! `kernels/tests/fused_keystream.rs` checks both paths against `rand_chacha` word for word.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Words per ChaCha block.
const BLOCK: usize = 16;
/// Blocks one AVX-512 pass produces (one per lane).
const WIDE: usize = 16;
/// The fewest words worth a 16-block pass for a stream's tail (a pass costs about as much as
/// 60 words of `rand_chacha`).
const WIDE_MIN: usize = 64;

/// A position in the ChaCha8 stream of one key: [`Keystream::fill`] continues where the
/// previous call stopped, as `rand_chacha`'s `fill` does.
#[derive(Clone, Debug)]
pub struct Keystream {
    key: [u32; 8],
    /// The next word's index in the stream.
    word: u64,
    /// The same stream through `rand_chacha`: what runs without AVX-512, and for the words
    /// before a block boundary and a short tail.
    rng: ChaCha8Rng,
}

impl Keystream {
    /// The stream of `ChaCha8Rng::seed_from_u64(seed)`, from its first word.
    pub fn from_u64(seed: u64) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(seed);
        let bytes = rng.get_seed();
        let key = std::array::from_fn(|i| u32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap()));
        Keystream { key, word: 0, rng }
    }

    /// Moves to word `word` of the stream (as `ChaCha8Rng::set_word_pos`).
    pub fn seek(&mut self, word: u64) {
        self.word = word;
    }

    /// Fills `out` with the next `out.len()` words of the stream.
    pub fn fill(&mut self, out: &mut [u32]) {
        let wide = wide::detected() && !super::simd::baseline_forced();
        let mut done = 0;
        while done < out.len() {
            let rest = &mut out[done..];
            let offset = (self.word % BLOCK as u64) as usize;
            let n = if wide && offset == 0 && rest.len() >= WIDE_MIN {
                let block = self.word / BLOCK as u64;
                let n = rest.len().min(WIDE * BLOCK);
                if n == WIDE * BLOCK {
                    let dst: &mut [u32; WIDE * BLOCK] = (&mut rest[..n]).try_into().unwrap();
                    // SAFETY: `detected()` said the CPU has AVX-512F.
                    unsafe { wide::blocks16(&self.key, block, dst) };
                } else {
                    let mut buf = [0u32; WIDE * BLOCK];
                    // SAFETY: as above.
                    unsafe { wide::blocks16(&self.key, block, &mut buf) };
                    rest[..n].copy_from_slice(&buf[..n]);
                }
                n
            } else {
                // Up to the next block boundary when the wide path can take over there.
                let n = if wide && offset != 0 { (BLOCK - offset).min(rest.len()) } else { rest.len() };
                if self.rng.get_word_pos() != u128::from(self.word) {
                    self.rng.set_word_pos(u128::from(self.word));
                }
                self.rng.fill(&mut rest[..n]);
                n
            };
            done += n;
            self.word += n as u64;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod wide {
    //! Sixteen blocks at once: vector `i` holds state word `i` of blocks `block..block + 16`,
    //! one per lane.

    use super::{BLOCK, WIDE};
    use std::arch::x86_64::*;

    /// "expand 32-byte k".
    const SIGMA: [u32; 4] = [0x6170_7865, 0x3320_646e, 0x7962_2d32, 0x6b20_6574];
    /// Double rounds of ChaCha8.
    const DOUBLE_ROUNDS: usize = 4;
    /// The state words of each quarter round of a double round: the columns, then the
    /// diagonals (RFC 8439).
    const QUARTERS: [(usize, usize, usize, usize); 8] = [
        (0, 4, 8, 12),
        (1, 5, 9, 13),
        (2, 6, 10, 14),
        (3, 7, 11, 15),
        (0, 5, 10, 15),
        (1, 6, 11, 12),
        (2, 7, 8, 13),
        (3, 4, 9, 14),
    ];

    /// The ChaCha state of one block: constants, key, 64-bit block counter, zero stream id.
    fn initial(key: &[u32; 8], block: u64) -> [u32; BLOCK] {
        let mut s = [0u32; BLOCK];
        s[..4].copy_from_slice(&SIGMA);
        s[4..12].copy_from_slice(key);
        s[12] = block as u32;
        s[13] = (block >> 32) as u32;
        s
    }

    pub(super) fn detected() -> bool {
        is_x86_feature_detected!("avx512f")
    }

    #[inline(always)]
    unsafe fn quarter(x: &mut [__m512i; BLOCK], a: usize, b: usize, c: usize, d: usize) {
        x[a] = _mm512_add_epi32(x[a], x[b]);
        x[d] = _mm512_rol_epi32::<16>(_mm512_xor_si512(x[d], x[a]));
        x[c] = _mm512_add_epi32(x[c], x[d]);
        x[b] = _mm512_rol_epi32::<12>(_mm512_xor_si512(x[b], x[c]));
        x[a] = _mm512_add_epi32(x[a], x[b]);
        x[d] = _mm512_rol_epi32::<8>(_mm512_xor_si512(x[d], x[a]));
        x[c] = _mm512_add_epi32(x[c], x[d]);
        x[b] = _mm512_rol_epi32::<7>(_mm512_xor_si512(x[b], x[c]));
    }

    /// Blocks `block..block + 16` of the stream into `out`, in stream order.
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn blocks16(key: &[u32; 8], block: u64, out: &mut [u32; WIDE * BLOCK]) {
        let s = initial(key, block);
        let mut init = [_mm512_setzero_si512(); BLOCK];
        for (v, &w) in init.iter_mut().zip(&s) {
            *v = _mm512_set1_epi32(w as i32);
        }
        // Lane j counts block + j; a carry out of the low word goes into the high one.
        let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let low = _mm512_add_epi32(init[12], lanes);
        let carried = _mm512_cmplt_epu32_mask(low, init[12]);
        init[13] = _mm512_mask_add_epi32(init[13], carried, init[13], _mm512_set1_epi32(1));
        init[12] = low;

        let mut x = init;
        for _ in 0..DOUBLE_ROUNDS {
            for &(a, b, c, d) in &QUARTERS {
                quarter(&mut x, a, b, c, d);
            }
        }
        for (v, i) in x.iter_mut().zip(init) {
            *v = _mm512_add_epi32(*v, i);
        }

        // Transpose: within each 128-bit lane L, words 4k..4k + 4 of block 4L + m end up in
        // `b[4k + m]` after the 32- and 64-bit interleaves.
        let mut a = [_mm512_setzero_si512(); BLOCK];
        for k in 0..8 {
            a[2 * k] = _mm512_unpacklo_epi32(x[2 * k], x[2 * k + 1]);
            a[2 * k + 1] = _mm512_unpackhi_epi32(x[2 * k], x[2 * k + 1]);
        }
        let mut b = [_mm512_setzero_si512(); BLOCK];
        for k in 0..4 {
            b[4 * k] = _mm512_unpacklo_epi64(a[4 * k], a[4 * k + 2]);
            b[4 * k + 1] = _mm512_unpackhi_epi64(a[4 * k], a[4 * k + 2]);
            b[4 * k + 2] = _mm512_unpacklo_epi64(a[4 * k + 1], a[4 * k + 3]);
            b[4 * k + 3] = _mm512_unpackhi_epi64(a[4 * k + 1], a[4 * k + 3]);
        }
        // Then block 4L + m is lane L of b[m], b[4 + m], b[8 + m], b[12 + m]: a 4 × 4
        // transpose of 128-bit lanes.
        let dst = out.as_mut_ptr() as *mut __m512i;
        for m in 0..4 {
            let c0 = _mm512_shuffle_i32x4::<0x44>(b[m], b[4 + m]);
            let c1 = _mm512_shuffle_i32x4::<0xEE>(b[m], b[4 + m]);
            let c2 = _mm512_shuffle_i32x4::<0x44>(b[8 + m], b[12 + m]);
            let c3 = _mm512_shuffle_i32x4::<0xEE>(b[8 + m], b[12 + m]);
            // SAFETY: `out` holds 16 blocks of 16 words; block 4L + m is vector 4L + m.
            _mm512_storeu_si512(dst.add(m), _mm512_shuffle_i32x4::<0x88>(c0, c2));
            _mm512_storeu_si512(dst.add(4 + m), _mm512_shuffle_i32x4::<0xDD>(c0, c2));
            _mm512_storeu_si512(dst.add(8 + m), _mm512_shuffle_i32x4::<0x88>(c1, c3));
            _mm512_storeu_si512(dst.add(12 + m), _mm512_shuffle_i32x4::<0xDD>(c1, c3));
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod wide {
    pub(super) fn detected() -> bool {
        false
    }

    pub(super) unsafe fn blocks16(_: &[u32; 8], _: u64, _: &mut [u32; super::WIDE * super::BLOCK]) {
        unreachable!("no wide keystream on this architecture")
    }
}
