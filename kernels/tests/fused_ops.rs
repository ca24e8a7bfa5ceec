//! The fused ops against their candle reference bodies: forwards against the reference run in
//! f64 (and in f32, which they should match to rounding), backwards against candle's autograd
//! of `sum(reference(..) ⊙ probe)` in f64, every op run in a 1- and a 2-thread pool (results
//! must be identical), at odd sizes including a single row.

use candle_core::{DType, Device, Tensor, Var};
use lorafleet_kernels::fused::head_loss::{Head, HeadScratch};
use lorafleet_kernels::fused::{head_loss, rms_norm, rope, swiglu};
use rand::{Rng, SeedableRng};

fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale).collect()
}

fn tensor(data: &[f32], shape: &[usize], dtype: DType) -> Tensor {
    Tensor::from_slice(data, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1().unwrap()
}

/// Max absolute difference, divided by the reference's magnitude when that exceeds 1.
fn max_err(got: &[f32], want: &Tensor) -> f64 {
    let want = values(want);
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(1f64, |m, v| m.max(v.abs()));
    got.iter().zip(&want).map(|(&g, w)| (f64::from(g) - w).abs()).fold(0.0, f64::max) / scale
}

/// ‖got − want‖ / ‖want‖.
fn rel_norm(got: &[f32], want: &Tensor) -> f64 {
    let want = values(want);
    assert_eq!(got.len(), want.len());
    let diff: f64 = got.iter().zip(&want).map(|(&g, w)| (f64::from(g) - w).powi(2)).sum();
    (diff / want.iter().map(|w| w * w).sum::<f64>()).sqrt()
}

/// Gradients of `sum(f(inputs) ⊙ probe)` with respect to each input, by candle's autograd.
fn autograd(inputs: &[Tensor], probe: &Tensor, f: impl Fn(&[Tensor]) -> Tensor) -> Vec<Tensor> {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let grads = (f(&ts) * probe).unwrap().sum_all().unwrap().backward().unwrap();
    ts.iter().map(|t| grads.get(t).expect("no gradient reached an input").clone()).collect()
}

/// Runs `f` in a 1-thread and a 2-thread pool and checks that the results are identical.
fn same_on_1_and_2_threads<T: PartialEq + std::fmt::Debug + Send>(f: impl Fn() -> T + Sync) -> T {
    let run = |n| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap().install(&f);
    let one = run(1);
    assert!(one == run(2), "results differ between 1 and 2 threads");
    one
}

fn check(what: &str, err: f64, tol: f64) {
    eprintln!("{what}: {err:.3e}");
    assert!(err <= tol, "{what}: error {err:e} above {tol:e}");
}

#[test]
fn rms_norm_matches_reference_and_autograd() {
    for (rows, h, seed) in [(1, 7, 1), (67, 33, 2), (130, 64, 3)] {
        let x = random(rows * h, seed, 3.0);
        let w: Vec<f32> = random(h, seed + 10, 0.5).iter().map(|v| 1.0 + v).collect();
        let dy = random(rows * h, seed + 20, 1.0);
        let d0 = random(rows * h, seed + 30, 1.0);
        let eps = 1e-5;
        let (y, rstd, dx) = same_on_1_and_2_threads(|| {
            let (mut y, mut rstd, mut dx) = (vec![f32::NAN; rows * h], vec![f32::NAN; rows], d0.clone());
            rms_norm::forward(&x, &w, eps, &mut y, &mut rstd);
            rms_norm::backward(&dy, &x, &w, &rstd, &mut dx);
            (y, rstd, dx)
        });
        let (x64, w64) = (tensor(&x, &[rows, h], DType::F64), tensor(&w, &[h], DType::F64));
        check(
            &format!("rms_norm y [{rows},{h}] vs f64"),
            max_err(&y, &rms_norm::reference(&x64, &w64, eps).unwrap()),
            1e-5,
        );
        let (x32, w32) = (tensor(&x, &[rows, h], DType::F32), tensor(&w, &[h], DType::F32));
        check("rms_norm y vs f32 reference", max_err(&y, &rms_norm::reference(&x32, &w32, eps).unwrap()), 1e-5);
        let want_rstd = ((x64.sqr().unwrap().mean_keepdim(1).unwrap() + eps).unwrap().sqrt().unwrap().recip()).unwrap();
        check("rms_norm rstd", max_err(&rstd, &want_rstd.flatten_all().unwrap()), 1e-6);
        let probe = tensor(&dy, &[rows, h], DType::F64);
        let g = autograd(&[x64], &probe, |t| rms_norm::reference(&t[0], &w64, eps).unwrap()).remove(0);
        let added: Vec<f32> = dx.iter().zip(&d0).map(|(a, b)| a - b).collect();
        check("rms_norm dx vs autograd", rel_norm(&added, &g), 1e-5);
    }
}

/// transformers' default rotary tables: `θ_i = p / 10000^(2i / head_dim)`.
fn rope_tables(max_pos: usize, head_dim: usize) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let angle = |k: usize| (k / half) as f64 / 10000f64.powf((2 * (k % half)) as f64 / head_dim as f64);
    (
        (0..max_pos * half).map(|k| angle(k).cos() as f32).collect(),
        (0..max_pos * half).map(|k| angle(k).sin() as f32).collect(),
    )
}

#[test]
fn rope_rotates_q_and_k_in_place_and_inverts() {
    let (hq, hkv, hd, max_pos) = (3, 2, 8, 48);
    let stride = (hq + 2 * hkv) * hd;
    let (cos, sin) = rope_tables(max_pos, hd);
    let (cos_t, sin_t) = (tensor(&cos, &[max_pos, hd / 2], DType::F64), tensor(&sin, &[max_pos, hd / 2], DType::F64));
    // Packed sequences restart at 0: a short batch, and one long enough to run in parallel.
    let short: Vec<u32> = vec![0, 1, 2, 0, 1];
    let long: Vec<u32> = (0..30).chain(0..41).collect();
    for (positions, seed) in [(vec![5u32], 40), (short, 41), (long, 42)] {
        let n = positions.len();
        let mut qkv = random(n * stride, seed, 2.0);
        if n == 5 {
            // Rows 3 and 4 repeat rows 0 and 1 at the same positions.
            qkv.copy_within(0..2 * stride, 3 * stride);
        }
        let rotated = same_on_1_and_2_threads(|| {
            let mut buf = qkv.clone();
            rope::apply(&mut buf, stride, 0, hq, hd, &positions, &cos, &sin, false);
            rope::apply(&mut buf, stride, hq * hd, hkv, hd, &positions, &cos, &sin, false);
            buf
        });
        let all = tensor(&qkv, &[n, stride], DType::F64);
        for (name, c0, heads) in [("q", 0, hq), ("k", hq * hd, hkv)] {
            let part = all.narrow(1, c0, heads * hd).unwrap();
            let want = rope::reference(&part, &positions, &cos_t, &sin_t, hd).unwrap();
            let got: Vec<f32> = rotated.chunks(stride).flat_map(|r| r[c0..c0 + heads * hd].to_vec()).collect();
            check(&format!("rope {name} ({n} rows) vs f64"), max_err(&got, &want), 1e-5);
        }
        let v = (hq + hkv) * hd;
        assert!(rotated.chunks(stride).zip(qkv.chunks(stride)).all(|(a, b)| a[v..] == b[v..]), "v was touched");
        for (i, &p) in positions.iter().enumerate() {
            if p == 0 {
                assert_eq!(
                    rotated[i * stride..(i + 1) * stride],
                    qkv[i * stride..(i + 1) * stride],
                    "position 0 moved"
                );
            }
        }
        if n == 5 {
            assert_eq!(rotated[..2 * stride], rotated[3 * stride..]);
        }
        // Inverse after forward is the identity (to rounding).
        let mut back = rotated.clone();
        rope::apply(&mut back, stride, 0, hq + hkv, hd, &positions, &cos, &sin, true);
        check("rope inverse(apply(x)) - x", max_err(&back, &all), 1e-6);
        // The backward is the inverse rotation of the upstream gradient.
        let q = tensor(&qkv[..], &[n, stride], DType::F64).narrow(1, 0, hq * hd).unwrap();
        let probe_data = random(n * hq * hd, seed + 100, 1.0);
        let probe = tensor(&probe_data, &[n, hq * hd], DType::F64);
        let g = autograd(&[q], &probe, |t| rope::reference(&t[0], &positions, &cos_t, &sin_t, hd).unwrap()).remove(0);
        let mut dq = probe_data.clone();
        rope::apply(&mut dq, hq * hd, 0, hq, hd, &positions, &cos, &sin, true);
        check("rope dq vs autograd", rel_norm(&dq, &g), 1e-5);
    }
}

#[test]
fn swiglu_matches_reference_and_autograd() {
    for (rows, f, seed) in [(1, 5, 50), (71, 37, 51)] {
        let mut eg = random(rows * 2 * f, seed, 6.0);
        // Saturated gates: exp(−e) overflows to inf, silu and its derivative are 0.
        eg[0] = -100.0;
        eg[1] = 100.0;
        let dm = random(rows * f, seed + 1, 1.0);
        let (m, deg) = same_on_1_and_2_threads(|| {
            let (mut m, mut deg) = (vec![f32::NAN; rows * f], vec![f32::NAN; rows * 2 * f]);
            swiglu::forward(&eg, f, &mut m);
            swiglu::backward(&eg, f, &dm, &mut deg);
            (m, deg)
        });
        assert!(m.iter().chain(&deg).all(|v| v.is_finite()));
        let split = |data: &[f32], dtype| {
            let all = tensor(data, &[rows, 2 * f], dtype);
            (all.narrow(1, 0, f).unwrap().contiguous().unwrap(), all.narrow(1, f, f).unwrap().contiguous().unwrap())
        };
        let (e32, g32) = split(&eg, DType::F32);
        let m32 = values(&swiglu::reference(&e32, &g32).unwrap());
        let bitwise = m.iter().zip(&m32).all(|(&a, &b)| f64::from(a) == b);
        eprintln!("swiglu m bit-identical to the f32 reference: {bitwise}");
        let (e, g) = split(&eg, DType::F64);
        check(&format!("swiglu m [{rows},{f}] vs f64"), max_err(&m, &swiglu::reference(&e, &g).unwrap()), 1e-5);
        let probe = tensor(&dm, &[rows, f], DType::F64);
        let grads = autograd(&[e, g], &probe, |t| swiglu::reference(&t[0], &t[1]).unwrap());
        let half = |c0: usize| -> Vec<f32> { deg.chunks(2 * f).flat_map(|r| r[c0..c0 + f].to_vec()).collect() };
        check("swiglu de vs autograd", rel_norm(&half(0), &grads[0]), 1e-5);
        check("swiglu dg vs autograd", rel_norm(&half(f), &grads[1]), 1e-5);
    }
}

#[test]
fn head_loss_matches_reference_and_autograd_across_chunks() {
    // 30011 is prime: 279 rows a chunk, so 700 rows are two full chunks and a partial one.
    let (vocab, d) = (30011, 16);
    assert_eq!(head_loss::chunk_rows(vocab), 279);
    let w = random(vocab * d, 60, 1.0);
    for (n, seed) in [(1, 61), (700, 62)] {
        let h = random(n * d, seed, 2.0);
        let mut targets: Vec<u32> =
            random(n, seed + 1, 1.0).iter().map(|v| ((v + 1.0) / 2.0 * vocab as f32) as u32).collect();
        targets[0] = vocab as u32 - 1;
        if n > 1 {
            targets[n - 1] = 0;
        }
        let (loss, dh) = same_on_1_and_2_threads(|| {
            let (mut dh, mut scratch) = (vec![f32::NAN; n * d], HeadScratch::default());
            let loss = head_loss::forward_backward(&h, Head::F32(&w), vocab, &targets, Some(&mut dh), &mut scratch);
            // A second call reuses the scratch without growing it and gives the same result.
            let len = scratch.logit_values();
            let mut dh2 = vec![f32::NAN; n * d];
            assert_eq!(
                head_loss::forward_backward(&h, Head::F32(&w), vocab, &targets, Some(&mut dh2), &mut scratch),
                loss
            );
            // The loss alone (evaluation) is the same sum.
            assert_eq!(head_loss::forward_backward(&h, Head::F32(&w), vocab, &targets, None, &mut scratch), loss);
            assert_eq!((dh2 == dh, scratch.logit_values()), (true, len));
            (loss, dh)
        });
        let (h64, w64) = (tensor(&h, &[n, d], DType::F64), tensor(&w, &[vocab, d], DType::F64));
        let want: f64 = values(&head_loss::reference(&h64, &w64, &targets).unwrap()).iter().sum();
        check(&format!("head loss sum ({n} rows) vs f64, relative"), (loss - want).abs() / want.abs(), 1e-5);
        let (h32, w32) = (tensor(&h, &[n, d], DType::F32), tensor(&w, &[vocab, d], DType::F32));
        let want32: f64 = values(&head_loss::reference(&h32, &w32, &targets).unwrap()).iter().sum();
        check("head loss sum vs f32 reference, relative", (loss - want32).abs() / want32.abs(), 1e-5);
        let ones = Tensor::ones(n, DType::F64, &Device::Cpu).unwrap();
        let g = autograd(&[h64], &ones, |t| head_loss::reference(&t[0], &w64, &targets).unwrap()).remove(0);
        check("head loss dh vs autograd", rel_norm(&dh, &g), 1e-5);
    }
}

#[test]
#[should_panic(expected = "outside a vocabulary")]
fn head_loss_refuses_a_target_outside_the_vocabulary() {
    let (mut dh, mut scratch) = (vec![0f32; 4], HeadScratch::default());
    head_loss::forward_backward(&[1.0; 4], Head::F32(&[1.0; 6]), 3, &[1, 3], Some(&mut dh), &mut scratch);
}
