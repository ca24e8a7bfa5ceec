//! LoRA dropout masks that are a pure function of where they apply.
//!
//! A mask depends on (seed, optimizer step, the example's global index, layer, module)
//! and on nothing else: not on the rank, the micro-batch or the wall clock. That is what
//! makes N workers equal one worker, lets checkpointed recomputation replay the exact
//! masks, and makes resumed runs bit-identical.

use candle_core::{Device, Result, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Whether and how dropout is applied in a forward pass.
#[derive(Clone, Debug, Default)]
pub enum Dropout {
    /// Evaluation: no dropout.
    #[default]
    Off,
    /// Training with masks keyed by `seed`, `step` and each row's example id.
    On {
        /// The run's seed.
        seed: u64,
        /// The optimizer step being computed.
        step: u64,
        /// Global example index of each batch row.
        example_ids: Vec<u64>,
    },
}

impl Dropout {
    /// The `[rows, seq, features]` mask for one module, holding 0 or `1 / (1 − p)`, or `None`
    /// when dropout is off or `p` is 0.
    pub fn mask(
        &self,
        p: f64,
        layer: usize,
        module: usize,
        seq: usize,
        features: usize,
        device: &Device,
    ) -> Result<Option<Tensor>> {
        let Dropout::On { seed, step, example_ids } = self else { return Ok(None) };
        if p <= 0.0 {
            return Ok(None);
        }
        let keep = (1.0 / (1.0 - p)) as f32;
        let p = p as f32;
        let per_row = seq * features;
        let mut data = Vec::with_capacity(example_ids.len() * per_row);
        for &example in example_ids {
            let key = mix(&[*seed, *step, example, layer as u64, module as u64]);
            let mut rng = ChaCha8Rng::seed_from_u64(key);
            data.extend((0..per_row).map(|_| if rng.random::<f32>() < p { 0.0 } else { keep }));
        }
        Tensor::from_vec(data, (example_ids.len(), seq, features), device).map(Some)
    }
}

/// SplitMix64 over a sequence of words: a cheap, well-mixed key for a counter-based RNG.
pub fn mix(words: &[u64]) -> u64 {
    let mut h = 0x9E37_79B9_7F4A_7C15u64;
    for &w in words {
        h ^= w.wrapping_add(0x9E37_79B9_7F4A_7C15).wrapping_add(h << 6).wrapping_add(h >> 2);
        h = splitmix(h);
    }
    h
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
