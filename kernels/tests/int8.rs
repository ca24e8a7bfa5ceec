//! The int8 linear op: quantization within its derived bound, the tiled CPU body equal to a
//! dense reference on the dequantized weight, and the backward against finite differences.
//! These are the dequantize-and-f32 path's (every test here forces it; the int8 kernel, which
//! also quantizes the activations, is `fused_int8.rs`'s).

use candle_core::{DType, Device, Tensor, Var};
use lorafleet_kernels::fused::narrow::force_fallback;
use lorafleet_kernels::Int8Linear;
use rand::{Rng, SeedableRng};

fn random(shape: &[usize], seed: u64, scale: f64) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let data: Vec<f64> = (0..n).map(|_| (rng.random::<f64>() * 2.0 - 1.0) * scale).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
    d.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
}

#[test]
fn quantization_error_is_within_half_a_step() {
    force_fallback(true);
    // 150 output rows: two full tiles of 64 and a partial one.
    let w = random(&[150, 96], 1, 0.5);
    for group in [None, Some(32)] {
        let lin = Int8Linear::quantize(&w, group, None, &Device::Cpu).unwrap();
        let dq: Vec<Vec<f64>> = lin.dequantize().unwrap().to_dtype(DType::F64).unwrap().to_vec2().unwrap();
        let wv: Vec<Vec<f64>> = w.to_vec2().unwrap();
        let g = group.unwrap_or(96);
        for (r, (dr, wr)) in dq.iter().zip(&wv).enumerate() {
            for (c, (d, x)) in dr.iter().zip(wr).enumerate() {
                let absmax = wr[c / g * g..(c / g + 1) * g].iter().fold(0f64, |m, v| m.max(v.abs()));
                assert!((d - x).abs() <= absmax / 254.0 + 1e-7, "row {r} col {c}: {d} vs {x} (group {group:?})");
            }
        }
    }
}

#[test]
fn forward_equals_dense_on_dequantized_weights_and_stays_within_the_bound() {
    force_fallback(true);
    let w = random(&[150, 96], 2, 0.5);
    let b = random(&[150], 3, 0.1);
    let x = random(&[2, 5, 96], 4, 1.0);
    let lin = Int8Linear::quantize(&w, None, Some(b.to_dtype(DType::F32).unwrap()), &Device::Cpu).unwrap();
    let y = lin.forward(&x.to_dtype(DType::F32).unwrap()).unwrap();
    assert_eq!(y.dims(), &[2, 5, 150]);
    let dq = lin.dequantize().unwrap().to_dtype(DType::F64).unwrap();
    let dense = x.broadcast_matmul(&dq.t().unwrap()).unwrap().broadcast_add(&b).unwrap();
    assert!(max_diff(&y, &dense) < 1e-4, "tiled CPU body vs dense reference");
    // Against the full-precision layer: |Δy_j| ≤ ‖x‖₁ · absmax_j / 254 (module docs).
    let exact = x.broadcast_matmul(&w.t().unwrap()).unwrap().broadcast_add(&b).unwrap();
    let xs: Vec<Vec<Vec<f64>>> = x.to_vec3().unwrap();
    let ws: Vec<Vec<f64>> = w.to_vec2().unwrap();
    let diff: Vec<Vec<Vec<f64>>> = (y.to_dtype(DType::F64).unwrap() - exact).unwrap().abs().unwrap().to_vec3().unwrap();
    for (bi, rows) in diff.iter().enumerate() {
        for (t, row) in rows.iter().enumerate() {
            let l1: f64 = xs[bi][t].iter().map(|v| v.abs()).sum();
            for (j, d) in row.iter().enumerate() {
                let absmax = ws[j].iter().fold(0f64, |m, v| m.max(v.abs()));
                assert!(*d <= l1 * absmax / 254.0 + 1e-5, "output {j}: error {d} over the bound");
            }
        }
    }
}

#[test]
fn backward_matches_finite_differences_and_leaves_the_weight_alone() {
    force_fallback(true);
    let w = random(&[70, 24], 5, 0.5);
    let lin = Int8Linear::quantize(&w, Some(8), None, &Device::Cpu).unwrap();
    // f64 inputs take the tensor-op body; f32 inputs the tiled gemm body. Both are checked.
    let x = random(&[3, 24], 6, 1.0);
    let probe = random(&[3, 70], 7, 1.0);
    let var = Var::from_tensor(&x).unwrap();
    let loss = (lin.forward(var.as_tensor()).unwrap() * &probe).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let g = grads.get(var.as_tensor()).unwrap().clone();
    assert!(grads.get(lin.quantized()).is_none());
    for id in grads.get_ids() {
        let shape = grads.get_id(*id).unwrap().dims().to_vec();
        assert!(shape == [3, 24] || shape == [3, 70], "a weight-shaped gradient {shape:?} was allocated");
    }
    let flat: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
    let analytic: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
    for i in 0..flat.len() {
        let eval = |delta: f64| {
            let mut v = flat.clone();
            v[i] += delta;
            let xt = Tensor::from_vec(v, (3, 24), &Device::Cpu).unwrap();
            (lin.forward(&xt).unwrap() * &probe).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
        };
        let numeric = (eval(1e-6) - eval(-1e-6)) / 2e-6;
        assert!((numeric - analytic[i]).abs() < 1e-6 * numeric.abs().max(1.0), "{i}: {numeric} vs {}", analytic[i]);
    }
    let var32 = Var::from_tensor(&x.to_dtype(DType::F32).unwrap()).unwrap();
    let probe32 = probe.to_dtype(DType::F32).unwrap();
    let g32 = (lin.forward(var32.as_tensor()).unwrap() * &probe32).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(max_diff(g32.get(var32.as_tensor()).unwrap(), &g) < 1e-5, "tiled gemm backward vs tensor-op backward");
}

#[test]
fn group_size_must_divide_the_input() {
    let w = random(&[4, 10], 8, 1.0);
    assert!(Int8Linear::quantize(&w, Some(3), None, &Device::Cpu).is_err());
}

#[test]
fn several_tiles_give_the_same_product_as_one() {
    force_fallback(true);
    // 2^20 elements per tile: a 65536-wide layer is cut into tiles of 16 rows (3 tiles here).
    let w = random(&[40, 65536], 9, 0.5);
    let lin = Int8Linear::quantize(&w, None, None, &Device::Cpu).unwrap();
    let x = random(&[2, 65536], 10, 1.0).to_dtype(DType::F32).unwrap();
    let dq = lin.dequantize().unwrap();
    let y = lin.forward(&x).unwrap();
    let dense = x.matmul(&dq.t().unwrap()).unwrap();
    assert!(max_diff(&y, &dense) < 1e-3);
    let var = Var::from_tensor(&x).unwrap();
    let g = lin.forward(var.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
    let expected = Tensor::ones((2, 40), DType::F32, &Device::Cpu).unwrap().matmul(&dq).unwrap();
    assert!(max_diff(g.get(var.as_tensor()).unwrap(), &expected) < 1e-4);
}
