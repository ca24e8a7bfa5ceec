//! The fused attention op against its candle reference body: forward `o` (max abs error),
//! `lse` (against an f64 logsumexp), and `dq`, `dk`, `dv` against candle's autograd of
//! `sum(reference(q, k, v) ⊙ dO)` (relative norm), over packed uneven sequences (lengths 0, 1
//! and non-multiples of the block), GQA groups, sliding windows and head_dim 16 and 64; plus
//! bit-identical results for 1 and 2 threads.

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use lorafleet_kernels::fused::attention::{backward, forward, reference, AttentionShape};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn shape(heads: usize, kv_heads: usize, head_dim: usize, window: Option<usize>) -> AttentionShape {
    AttentionShape { heads, kv_heads, head_dim, window, scale: 1.0 / (head_dim as f32).sqrt() }
}

fn cu_seqlens(lens: &[usize]) -> Vec<usize> {
    std::iter::once(0)
        .chain(lens.iter().scan(0, |acc, &l| {
            *acc += l;
            Some(*acc)
        }))
        .collect()
}

/// `q`, `k`, `v` and `dO`, uniform in [-2, 2] (scores of a few units, so softmaxes are peaked).
struct Inputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    d_o: Vec<f32>,
}

fn inputs(sh: &AttentionShape, n: usize, seed: u64) -> Inputs {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut draw = |len: usize| (0..len).map(|_| rng.random::<f32>() * 4.0 - 2.0).collect::<Vec<f32>>();
    let (qw, kw) = (n * sh.heads * sh.head_dim, n * sh.kv_heads * sh.head_dim);
    Inputs { q: draw(qw), k: draw(kw), v: draw(kw), d_o: draw(qw) }
}

/// `[o, lse, dq, dk, dv]` from the fused op.
fn fused(sh: &AttentionShape, cu: &[usize], x: &Inputs) -> [Vec<f32>; 5] {
    let n = cu[cu.len() - 1];
    let (mut o, mut lse) = (vec![f32::NAN; x.q.len()], vec![f32::NAN; sh.heads * n]);
    forward(sh, cu, &x.q, &x.k, &x.v, &mut o, &mut lse);
    let (mut dq, mut dk, mut dv) = (vec![f32::NAN; x.q.len()], vec![f32::NAN; x.k.len()], vec![f32::NAN; x.v.len()]);
    backward(sh, cu, &x.q, &x.k, &x.v, &o, &lse, &x.d_o, &mut dq, &mut dk, &mut dv);
    [o, lse, dq, dk, dv]
}

fn rel_norm(got: &[f32], want: &[f32]) -> f64 {
    let diff: f64 = got.iter().zip(want).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum();
    let norm: f64 = want.iter().map(|&b| (b as f64).powi(2)).sum();
    (diff / norm.max(1e-30)).sqrt()
}

/// The f64 logsumexp of query `i`'s (global index) scaled visible scores for head `h`.
fn naive_lse(sh: &AttentionShape, cu: &[usize], x: &Inputs, h: usize, i: usize) -> f64 {
    let s = cu.partition_point(|&c| c <= i) - 1;
    let (a, li, d) = (cu[s], i - cu[s], sh.head_dim);
    let g = h / (sh.heads / sh.kv_heads);
    let first = sh.window.map_or(0, |w| (li + 1).saturating_sub(w));
    let scores: Vec<f64> = (first..=li)
        .map(|j| {
            let qi = &x.q[i * sh.heads * d + h * d..][..d];
            let kj = &x.k[(a + j) * sh.kv_heads * d + g * d..][..d];
            sh.scale as f64 * qi.iter().zip(kj).map(|(&p, &q)| p as f64 * q as f64).sum::<f64>()
        })
        .collect();
    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    m + scores.iter().map(|s| (s - m).exp()).sum::<f64>().ln()
}

/// Runs one case against the reference, prints its errors and checks them.
fn check_case(heads: usize, kv_heads: usize, head_dim: usize, window: Option<usize>, lens: &[usize]) {
    let sh = shape(heads, kv_heads, head_dim, window);
    let cu = cu_seqlens(lens);
    let n = cu[cu.len() - 1];
    let x = inputs(&sh, n, (heads * 1000 + head_dim + window.unwrap_or(0)) as u64);
    let [o, lse, dq, dk, dv] = fused(&sh, &cu, &x);

    let dev = Device::Cpu;
    let qv = Var::from_vec(x.q.clone(), (n, heads * head_dim), &dev).unwrap();
    let kv = Var::from_vec(x.k.clone(), (n, kv_heads * head_dim), &dev).unwrap();
    let vv = Var::from_vec(x.v.clone(), (n, kv_heads * head_dim), &dev).unwrap();
    let out = reference(&sh, &cu, qv.as_tensor(), kv.as_tensor(), vv.as_tensor()).unwrap();
    let o_ref: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
    let probe = Tensor::from_vec(x.d_o.clone(), (n, heads * head_dim), &dev).unwrap();
    let grads = (out * probe).unwrap().sum_all().unwrap().backward().unwrap();
    let grad = |v: &Var| -> Vec<f32> { grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap() };

    let o_max = o_ref.iter().fold(1f32, |m, x| m.max(x.abs())) as f64;
    let o_err = o.iter().zip(&o_ref).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max) / o_max;
    let errs = [rel_norm(&dq, &grad(&qv)), rel_norm(&dk, &grad(&kv)), rel_norm(&dv, &grad(&vv))];
    let mut lse_err = 0f64;
    for (h, i) in [(0, 0), (heads - 1, n - 1), (heads / 2, n / 2), (1, 7)] {
        let want = naive_lse(&sh, &cu, &x, h, i);
        lse_err = lse_err.max((lse[h * n + i] as f64 - want).abs() / want.abs().max(1.0));
    }
    println!("{heads}/{kv_heads} heads, d {head_dim}, window {window:?}, lens {lens:?}: o {o_err:.2e}, lse {lse_err:.2e}, dq {:.2e}, dk {:.2e}, dv {:.2e}", errs[0], errs[1], errs[2]);
    assert!(o_err < 1e-5, "o error {o_err}");
    assert!(lse_err < 1e-5, "lse error {lse_err}");
    for (name, e) in ["dq", "dk", "dv"].iter().zip(errs) {
        assert!(e < 1e-4, "{name} relative error {e}");
    }
}

#[test]
fn gqa_6_over_2_head_dim_16_uneven_lengths() {
    check_case(6, 2, 16, None, &[1, 7, 64, 130]);
}

#[test]
fn mha_4_heads_head_dim_64_with_an_empty_sequence() {
    check_case(4, 4, 64, None, &[1, 0, 7, 64, 130]);
}

#[test]
fn gqa_9_over_3_head_dim_64_like_a_135m_model() {
    check_case(9, 3, 64, None, &[130, 1, 65]);
}

#[test]
fn sliding_window_inside_one_block() {
    check_case(6, 2, 16, Some(5), &[1, 7, 64, 130]);
}

#[test]
fn sliding_window_wider_than_a_block_skips_key_blocks() {
    check_case(9, 3, 64, Some(100), &[1, 7, 200]);
}

#[test]
fn one_and_two_threads_give_identical_bits() {
    for window in [None, Some(70)] {
        let sh = shape(6, 2, 16, window);
        let cu = cu_seqlens(&[1, 7, 64, 130, 3]);
        let x = inputs(&sh, cu[cu.len() - 1], 7);
        let on = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| fused(&sh, &cu, &x))
        };
        let (one, two) = (on(1), on(2));
        for (a, b) in one.iter().zip(&two) {
            assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "window {window:?}");
        }
    }
}

#[test]
#[should_panic(expected = "lse length")]
fn a_wrong_lse_length_is_refused() {
    let sh = shape(2, 1, 4, None);
    let x = inputs(&sh, 3, 1);
    let (mut o, mut lse) = (vec![0f32; x.q.len()], vec![0f32; 5]);
    forward(&sh, &[0, 3], &x.q, &x.k, &x.v, &mut o, &mut lse);
}

/// Forward and backward for 4 sequences × 256 tokens, 8/8 heads, head_dim 64 (run with
/// `--nocapture` to see the best of 5 times); checks only that the results are finite.
#[test]
fn timing_4_by_256_tokens_8_heads_head_dim_64() {
    let sh = shape(8, 8, 64, None);
    let cu = cu_seqlens(&[256; 4]);
    let x = inputs(&sh, cu[4], 3);
    let (mut o, mut lse) = (vec![0f32; x.q.len()], vec![0f32; 8 * cu[4]]);
    let (mut dq, mut dk, mut dv) = (vec![0f32; x.q.len()], vec![0f32; x.k.len()], vec![0f32; x.v.len()]);
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let (mut fwd, mut bwd) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..5 {
            let t0 = Instant::now();
            pool.install(|| forward(&sh, &cu, &x.q, &x.k, &x.v, &mut o, &mut lse));
            let t1 = Instant::now();
            pool.install(|| backward(&sh, &cu, &x.q, &x.k, &x.v, &o, &lse, &x.d_o, &mut dq, &mut dk, &mut dv));
            fwd = fwd.min((t1 - t0).as_secs_f64());
            bwd = bwd.min(t1.elapsed().as_secs_f64());
        }
        assert!([&o, &lse, &dq, &dk, &dv].iter().all(|b| b.iter().all(|v| v.is_finite())));
        println!(
            "4x256 tokens, 8 heads, d 64, {threads} thread(s): forward {:.2} ms, backward {:.2} ms",
            fwd * 1e3,
            bwd * 1e3
        );
    }
}
