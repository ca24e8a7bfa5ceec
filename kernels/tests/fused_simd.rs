//! The ops' loops give the same bits whether they run compiled for the CPU's vector width
//! (AVX2 + FMA or AVX-512 where it has them) or for the baseline instructions (`LORAFLEET_SIMD=baseline`,
//! `simd::force_baseline`): the choice made at run time changes speed, never results.
//!
//! One test in its own binary, because the choice is process-wide.

use lorafleet_kernels::fused::attention::{self, AttentionShape};
use lorafleet_kernels::fused::head_loss::{Head, HeadScratch};
use lorafleet_kernels::fused::lora_linear::Dropout;
use lorafleet_kernels::fused::{head_loss, rms_norm, rope, simd, swiglu};
use rand::{Rng, SeedableRng};

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random::<f32>() * 4.0 - 2.0).collect()
}

/// Every op's outputs, flattened, for fixed inputs (odd sizes: 37 tokens in sequences of
/// 1, 17 and 19, hidden 24, 3 query heads over 1 kv head of 8, intermediate 13, vocab 29).
fn all_outputs() -> Vec<Vec<f32>> {
    let (n, h, f, vocab) = (37, 24, 13, 29);
    let cu = [0, 1, 18, 37];
    let positions: Vec<u32> = cu.windows(2).flat_map(|w| 0..(w[1] - w[0]) as u32).collect();
    let x = random(n * h, 1);
    let w = random(h, 2);
    let mut out = Vec::new();

    let (mut y, mut rstd) = (vec![0f32; n * h], vec![0f32; n]);
    rms_norm::forward(&x, &w, 1e-6, &mut y, &mut rstd);
    let mut dx = vec![0f32; n * h];
    rms_norm::backward(&random(n * h, 3), &x, &w, &rstd, &mut dx);
    out.extend([y, rstd, dx]);

    let eg = random(n * 2 * f, 4);
    let mut m = vec![0f32; n * f];
    swiglu::forward(&eg, f, &mut m);
    let mut deg = vec![0f32; n * 2 * f];
    swiglu::backward(&eg, f, &random(n * f, 5), &mut deg);
    out.extend([m, deg]);

    let shape = AttentionShape { heads: 3, kv_heads: 1, head_dim: 8, window: Some(11), scale: 0.35 };
    let (mut q, mut k, v) = (random(n * 24, 6), random(n * 8, 7), random(n * 8, 8));
    let (cos, sin) = (random(64 * 4, 9), random(64 * 4, 10));
    rope::apply(&mut q, 24, 0, 3, 8, &positions, &cos, &sin, false);
    rope::apply(&mut k, 8, 0, 1, 8, &positions, &cos, &sin, true);
    let (mut o, mut lse) = (vec![0f32; n * 24], vec![0f32; 3 * n]);
    attention::forward(&shape, &cu, &q, &k, &v, &mut o, &mut lse);
    let (mut dq, mut dk, mut dv) = (vec![0f32; n * 24], vec![0f32; n * 8], vec![0f32; n * 8]);
    let d_o = random(n * 24, 11);
    attention::backward(&shape, &cu, &q, &k, &v, &o, &lse, &d_o, &mut dq, &mut dk, &mut dv);
    out.extend([q, k, o, lse, dq, dk, dv]);

    let mut dropped = x.clone();
    let keys = [5u64, 6, 7];
    Dropout { p: 0.3, keep: 1.0 / 0.7, keys: &keys, cu_seqlens: &cu }.apply(&mut dropped, h);
    out.push(dropped);

    let targets: Vec<u32> = (0..n as u32).map(|i| (i * 7) % vocab as u32).collect();
    let head = random(vocab * h, 12);
    let mut dh = vec![0f32; n * h];
    let mut scratch = HeadScratch::default();
    let loss = head_loss::forward_backward(&x, Head::F32(&head), vocab, &targets, Some(&mut dh), &mut scratch);
    out.extend([vec![loss as f32, (loss - f64::from(loss as f32)) as f32], dh]);
    out
}

#[test]
fn vectorized_and_baseline_loops_give_identical_bits() {
    simd::force_baseline(false);
    let best = all_outputs();
    simd::force_baseline(true);
    let baseline = all_outputs();
    for (i, (a, b)) in best.iter().zip(&baseline).enumerate() {
        let same = a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "output {i} differs between the vectorized and the baseline build of the loops");
    }
    assert!(best.iter().all(|o| o.iter().all(|v| v.is_finite())), "non-finite output");
}
