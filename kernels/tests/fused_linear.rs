//! The engine's LoRA linear against its reference body (candle tensor ops, differentiated by
//! candle's autograd): forward, dx, dA and dB, with and without dropout and bias, over packed
//! sequences of odd lengths (one token included).

use candle_core::{Device, Tensor, Var};
use lorafleet_kernels::fused::gemm::{MatMut, MatRef};
use lorafleet_kernels::fused::lora_linear::{self, Adapter, Dropout, Frozen, PairGrads, Scratch, Weight};
use lorafleet_kernels::Int8Linear;
use rand::{Rng, SeedableRng};

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

fn t(v: &[f32], shape: (usize, usize)) -> Tensor {
    Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
}

fn check(cu: &[usize], inp: usize, out: usize, rank: usize, p: f32, bias: bool, int8: Option<usize>) {
    let n = *cu.last().unwrap();
    let (x, w, a, b) = (random(n * inp, 1), random(out * inp, 2), random(rank * inp, 3), random(out * rank, 4));
    let bias_v = random(out, 5);
    let keys: Vec<u64> = (0..cu.len() as u64 - 1).map(|s| 1000 + s).collect();
    let dropout =
        (p > 0.0).then_some(Dropout { p, keep: (1.0 / (1.0 - f64::from(p))) as f32, keys: &keys, cu_seqlens: cu });
    // int8: the reference multiplies by the dequantized weight (what the engine's tiles hold).
    let quantized = int8.map(|g| Int8Linear::quantize(&t(&w, (out, inp)), Some(g), None, &Device::Cpu).unwrap());
    let w_ref = quantized.as_ref().map_or_else(|| t(&w, (out, inp)), |q| q.dequantize().unwrap());
    let held = quantized.as_ref().map(|q| {
        let (qt, st, g) = q.quantized_parts();
        (qt.flatten_all().unwrap().to_vec1::<u8>().unwrap(), st.flatten_all().unwrap().to_vec1::<f32>().unwrap(), g)
    });
    let weight = match &held {
        Some((q, s, g)) => Weight::Int8 { q, scales: s, group: *g },
        None => Weight::F32(&w),
    };
    let frozen = Frozen { w: weight, bias: bias.then_some(&bias_v[..]), out, inp };
    let adapter = Adapter { a: &a, b: &b, rank, scale: 0.5, dropout };
    let mut scratch = Scratch::default();

    // Forward.
    let (mut y, mut u) = (vec![f32::NAN; n * out], vec![0f32; n * rank]);
    lora_linear::forward(&x, &frozen, Some(&adapter), MatMut::new(&mut y, n, out), &mut u, &mut scratch);
    let (xv, av, bv) = (
        Var::from_tensor(&t(&x, (n, inp))).unwrap(),
        Var::from_tensor(&t(&a, (rank, inp))).unwrap(),
        Var::from_tensor(&t(&b, (out, rank))).unwrap(),
    );
    let bias_t = t(&bias_v, (1, out)).squeeze(0).unwrap();
    let y_ref = lora_linear::reference(
        xv.as_tensor(),
        &w_ref,
        bias.then_some(&bias_t),
        Some((av.as_tensor(), bv.as_tensor(), 0.5, dropout.as_ref())),
    )
    .unwrap();
    let y_ref_v: Vec<f32> = y_ref.flatten_all().unwrap().to_vec1().unwrap();
    assert!(rel(&y, &y_ref_v) < 1e-6, "forward differs by {}", rel(&y, &y_ref_v));

    // Backward against autograd of sum(y · probe).
    let probe = random(n * out, 6);
    let grads = (y_ref * t(&probe, (n, out))).unwrap().sum_all().unwrap().backward().unwrap();
    let flat = |v: &Var| -> Vec<f32> { grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap() };
    let (mut da, mut db) = (vec![0f32; rank * inp], vec![0f32; out * rank]);
    let mut backward = |da: &mut [f32], db: &mut [f32], dx: Option<&mut [f32]>, accumulate: bool| {
        let g = PairGrads { da, db };
        let dy = MatRef::new(&probe, n, out);
        lora_linear::backward(&x, &frozen, Some((&adapter, g)), dy, &u, dx, accumulate, &mut scratch);
    };
    let mut dx = vec![f32::NAN; n * inp];
    backward(&mut da, &mut db, Some(&mut dx), false);
    for (name, got, want) in [("dx", &dx, flat(&xv)), ("dA", &da, flat(&av)), ("dB", &db, flat(&bv))] {
        let d = rel(got, &want);
        assert!(d < 1e-5, "{name} differs by {d} (cu {cu:?}, p {p})");
    }
    // Accumulation adds; no dx asked leaves dx alone and still adds dA, dB.
    let mut dx2 = dx.clone();
    backward(&mut da, &mut db, Some(&mut dx2), true);
    assert!(rel(&dx2, &dx.iter().map(|v| 2.0 * v).collect::<Vec<_>>()) < 1e-6);
    backward(&mut da, &mut db, None, false);
    assert!(rel(&da, &flat(&av).iter().map(|v| 3.0 * v).collect::<Vec<_>>()) < 1e-5);
}

#[test]
fn lora_linear_equals_its_reference_with_and_without_dropout() {
    check(&[0, 1], 8, 5, 2, 0.0, false, None);
    check(&[0, 1, 8, 21], 24, 40, 4, 0.0, true, None);
    check(&[0, 1, 8, 21], 24, 40, 4, 0.3, true, None);
    check(&[0, 67, 130], 33, 17, 8, 0.05, false, None);
}

#[test]
fn lora_linear_over_an_int8_weight_equals_its_dequantized_reference() {
    check(&[0, 1, 8, 21], 24, 40, 4, 0.3, true, Some(24));
    check(&[0, 3, 50], 32, 9, 4, 0.0, false, Some(8));
    // More output rows than one dequantized tile holds (2^20 elements): several tiles.
    check(&[0, 5], 1024, 1100, 2, 0.1, false, Some(1024));
}

#[test]
fn dropout_masks_are_keyed_per_sequence_and_scaled() {
    let cu = [0, 3, 10];
    let keys = [5, 6];
    let d = Dropout { p: 0.5, keep: 2.0, keys: &keys, cu_seqlens: &cu };
    let mut a = vec![1f32; 10 * 4];
    d.apply(&mut a, 4);
    assert!(a.iter().all(|&v| v == 0.0 || v == 2.0));
    assert!(a.contains(&0.0) && a.contains(&2.0));
    // The same keys give the same mask; the second sequence's mask does not depend on the first's length.
    let mut b = vec![1f32; 10 * 4];
    d.apply(&mut b, 4);
    assert_eq!(a, b);
    let (cu2, keys2) = ([0, 7], [6]);
    let mut c = vec![1f32; 7 * 4];
    Dropout { p: 0.5, keep: 2.0, keys: &keys2, cu_seqlens: &cu2 }.apply(&mut c, 4);
    assert_eq!(&a[12..], &c[..]);
}
