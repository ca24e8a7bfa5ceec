//! The int8 products against exact arithmetic: on integer operands whose quantization is
//! exact the kernel's rescaled i32 sums must equal the integer product; on real-valued
//! operands they stay within the quantization error bound, outlier columns included.

use lorafleet_kernels::fused::gemm::{MatMut, MatRef};
use lorafleet_kernels::fused::int8::{kernels_available, Int8Scratch, PackedInt8, OUTLIER_THRESHOLD};

/// Deterministic integers in `-lim..=lim`.
fn ints(n: usize, seed: u64, lim: i32) -> Vec<i32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) % (2 * lim as u64 + 1)) as i32 - lim
        })
        .collect()
}

/// An `out × inp` int8 weight (scale 1 per row) and its packing.
fn weight(out: usize, inp: usize) -> (Vec<i32>, PackedInt8) {
    let w = ints(out * inp, 7, 127);
    let q: Vec<u8> = w.iter().map(|&v| (v + 128) as u8).collect();
    (w.clone(), PackedInt8::new(&q, &vec![1.0; out], out, inp))
}

/// `rows × cols` integers times 1/32 (below the outlier threshold) with one ±127/32 per
/// row: per-token quantization is then exact (scale 1/32).
fn activations(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut v: Vec<f32> = ints(rows * cols, seed, 127).into_iter().map(|v| v as f32 / 32.0).collect();
    for i in 0..rows {
        v[i * cols + (i * 7) % cols] = if i % 2 == 0 { 127.0 } else { -127.0 } / 32.0;
    }
    v
}

/// Forward and backward of rows `r0..r0 + rows` of an `out × inp` weight over `n` tokens,
/// against the integer products.
fn exact(n: usize, out: usize, inp: usize, r0: usize, rows: usize) {
    let (w, packed) = weight(out, inp);
    let view = packed.rows(r0, rows).expect("a panel-aligned view");
    let wv = &w[r0 * inp..(r0 + rows) * inp];
    assert_eq!(view.to_f32(), wv.iter().map(|&v| v as f32).collect::<Vec<_>>());
    let mut scratch = Int8Scratch::default();

    let x = activations(n, inp, 3);
    let mut y = vec![f32::NAN; n * rows];
    view.forward(MatRef::new(&x, n, inp), MatMut::new(&mut y, n, rows), &mut scratch);
    for i in 0..n {
        for j in 0..rows {
            let want: i64 = (0..inp).map(|k| (x[i * inp + k] * 32.0) as i64 * wv[j * inp + k] as i64).sum();
            assert_eq!(y[i * rows + j], want as f32 / 32.0, "forward {n}x{inp}->{rows} at ({i}, {j})");
        }
    }

    let dy = activations(n, rows, 5);
    for accumulate in [false, true] {
        let mut dx = vec![if accumulate { 1.0 } else { f32::NAN }; n * inp];
        view.backward(MatRef::new(&dy, n, rows), MatMut::new(&mut dx, n, inp), accumulate, &mut scratch);
        for i in 0..n {
            for c in 0..inp {
                let want: i64 = (0..rows).map(|j| (dy[i * rows + j] * 32.0) as i64 * wv[j * inp + c] as i64).sum();
                let want = want as f32 / 32.0 + if accumulate { 1.0 } else { 0.0 };
                assert_eq!(dx[i * inp + c], want, "backward {n}x{rows}->{inp} at ({i}, {c}), accumulate {accumulate}");
            }
        }
    }
}

#[test]
fn integer_products_are_exact_on_every_edge() {
    if !kernels_available() {
        eprintln!("no AVX512-VNNI here: the int8 kernel is not chosen (tested by fused_bf16_forced)");
        return;
    }
    // Tile edges in N (8-row micro-tiles, 64-row tasks), in the output columns (16-wide
    // panels, 48-wide micro-tiles, 192-wide tasks) and in k (quads), one product with two
    // k-blocks each way (more than 1024 inputs, more than 1024 rows), and sub-views whose
    // last quad reaches into the next module's rows.
    exact(1, 16, 4, 0, 16);
    exact(9, 50, 5, 0, 50);
    exact(70, 200, 67, 0, 200);
    exact(13, 40, 1030, 0, 40);
    exact(5, 1043, 24, 0, 1043);
    exact(11, 64, 33, 16, 22);
    exact(3, 96, 20, 32, 64);
}

#[test]
fn real_values_stay_within_the_quantization_bound_with_outlier_columns_in_f32() {
    if !kernels_available() {
        return;
    }
    let (n, out, inp) = (37, 80, 96);
    let w: Vec<f32> = (0..out * inp).map(|i| (i as f32 * 0.37).sin() * 0.05).collect();
    // Quantize the weight as `Int8Linear` does: absmax per row.
    let mut q = vec![0u8; out * inp];
    let mut scales = vec![0f32; out];
    for j in 0..out {
        let row = &w[j * inp..(j + 1) * inp];
        let s = row.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
        scales[j] = s;
        for (d, &v) in q[j * inp..(j + 1) * inp].iter_mut().zip(row) {
            *d = ((v / s).round() as i32 + 128) as u8;
        }
    }
    let packed = PackedInt8::new(&q, &scales, out, inp);
    let wd = packed.full().to_f32();
    // Activations of magnitude below 2, with a feature above the threshold in every token and
    // one above it in every other token.
    let mut x: Vec<f32> = (0..n * inp).map(|i| (i as f32 * 0.917).cos() * 1.9).collect();
    for i in 0..n {
        x[i * inp + 3] = if i % 2 == 0 { 90.0 + i as f32 } else { 0.5 };
        x[i * inp + 50] = -(OUTLIER_THRESHOLD + 1.0);
    }
    let mut y = vec![0f32; n * out];
    let mut scratch = Int8Scratch::default();
    packed.full().forward(MatRef::new(&x, n, inp), MatMut::new(&mut y, n, out), &mut scratch);
    for i in 0..n {
        let xi = &x[i * inp..(i + 1) * inp];
        // A token's result depends on its own features only.
        let mut alone = vec![0f32; out];
        packed.full().forward(MatRef::new(xi, 1, inp), MatMut::new(&mut alone, 1, out), &mut scratch);
        assert_eq!(alone, y[i * out..(i + 1) * out], "token {i} alone");
        // The token's scale without its outliers, and each element's half-step bound.
        let step = xi.iter().filter(|v| v.abs() <= OUTLIER_THRESHOLD).fold(0f32, |m, v| m.max(v.abs())) / 127.0;
        for j in 0..out {
            let wj = &wd[j * inp..(j + 1) * inp];
            let want: f64 = xi.iter().zip(wj).map(|(&a, &b)| a as f64 * b as f64).sum();
            let bound: f64 = wj.iter().map(|v| v.abs() as f64).sum::<f64>() * step as f64 / 2.0 + 1e-4;
            let err = (y[i * out + j] as f64 - want).abs();
            assert!(err <= bound, "({i}, {j}): {} vs {want}: error {err} above the bound {bound}", y[i * out + j]);
        }
    }
}

#[test]
fn a_shared_pack_reduces_each_modules_gradient_on_its_own() {
    if !kernels_available() {
        return;
    }
    // q|k|v as one pack: the backward over the whole pack equals the modules' own backwards
    // added in order (each quantizes its share of dY with its own scale per token), and the
    // forward equals each module's.
    let (n, inp, rows) = (21, 40, [32, 16, 48]);
    let out: usize = rows.iter().sum();
    let (_, single) = weight(out, inp);
    let w = single.full().to_f32();
    let q: Vec<u8> = w.iter().map(|&v| (v as i32 + 128) as u8).collect();
    let scales: Vec<f32> = (0..out).map(|j| 0.5 + j as f32 / out as f32).collect();
    let starts = [0, 32, 48];
    let packed = PackedInt8::new(&q, &scales, out, inp).with_modules(&starts);
    // Gradients of very different sizes per module.
    let dy: Vec<f32> =
        (0..n * out).map(|i| ((i as f32 * 0.37).sin()) * if i % out < 32 { 100.0 } else { 0.01 }).collect();
    let mut scratch = Int8Scratch::default();
    let mut whole = vec![0f32; n * inp];
    packed.full().backward(MatRef::new(&dy, n, out), MatMut::new(&mut whole, n, inp), false, &mut scratch);
    let mut parts = vec![0f32; n * inp];
    for (m, (&s, &r)) in starts.iter().zip(&rows).enumerate() {
        let view = packed.rows(s, r).unwrap();
        let dym = MatRef::strided(&dy[s..], n, r, out, 1);
        view.backward(dym, MatMut::new(&mut parts, n, inp), m > 0, &mut scratch);
    }
    assert_eq!(whole, parts);
    let x = activations(n, inp, 9);
    let mut y = vec![0f32; n * out];
    packed.full().forward(MatRef::new(&x, n, inp), MatMut::new(&mut y, n, out), &mut scratch);
    for (&s, &r) in starts.iter().zip(&rows) {
        let mut ym = vec![0f32; n * r];
        packed.rows(s, r).unwrap().forward(MatRef::new(&x, n, inp), MatMut::new(&mut ym, n, r), &mut scratch);
        for i in 0..n {
            assert_eq!(ym[i * r..(i + 1) * r], y[i * out + s..i * out + s + r]);
        }
    }
}

#[test]
fn a_nan_or_an_infinity_makes_its_row_non_finite_as_in_f32() {
    if !kernels_available() {
        return;
    }
    // Forward: a NaN (never an outlier: it compares false) and an infinity (an outlier) in two tokens'
    // features; backward: the same in dY, where nothing is an outlier. Only those rows of
    // the result are non-finite, and all of their elements are, as the f32 product's are.
    let (n, out, inp) = (6, 32, 40);
    let (_, packed) = weight(out, inp);
    let mut scratch = Int8Scratch::default();
    let mut x = activations(n, inp, 11);
    x[inp + 5] = f32::NAN;
    x[3 * inp + 7] = f32::NEG_INFINITY;
    let mut y = vec![0f32; n * out];
    packed.full().forward(MatRef::new(&x, n, inp), MatMut::new(&mut y, n, out), &mut scratch);
    let mut dy = activations(n, out, 13);
    dy[2 * out] = f32::NAN;
    dy[4 * out + 9] = f32::INFINITY;
    let mut dx = vec![0f32; n * inp];
    packed.full().backward(MatRef::new(&dy, n, out), MatMut::new(&mut dx, n, inp), false, &mut scratch);
    for (what, v, cols, bad) in [("forward", &y, out, [1, 3]), ("backward", &dx, inp, [2, 4])] {
        for i in 0..n {
            let row = &v[i * cols..(i + 1) * cols];
            if bad.contains(&i) {
                assert!(row.iter().all(|v| !v.is_finite()), "{what} row {i}: {row:?}");
            } else {
                assert!(row.iter().all(|v| v.is_finite()), "{what} row {i}: {row:?}");
            }
        }
    }
}
