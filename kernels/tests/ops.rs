//! Each op's forward against a plain f64 composition, and its backward against central
//! finite differences of its own forward (in f64, where differences are exact enough).

use candle_core::{DType, Device, Tensor, Var, D};
use lorafleet_kernels::{lm_head_cross_entropy, masked_softmax, FrozenLinear, RmsNorm, Rope};
use rand::{Rng, SeedableRng};

fn random(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let data: Vec<f64> = (0..n).map(|_| rng.random::<f64>() * 2.0 - 1.0).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
    d.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
}

/// Checks d(sum(f(x) ⊙ probe))/dx from autograd against central differences.
fn check_gradient(x: &Tensor, f: impl Fn(&Tensor) -> Tensor) {
    let probe = random(f(x).dims(), 99);
    let var = Var::from_tensor(x).unwrap();
    let out = (f(var.as_tensor()) * &probe).unwrap().sum_all().unwrap();
    let grad = out.backward().unwrap().get(var.as_tensor()).expect("no gradient reached the input").clone();
    let flat: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
    let analytic: Vec<f64> = grad.flatten_all().unwrap().to_vec1().unwrap();
    let h = 1e-6;
    for i in (0..flat.len()).step_by((flat.len() / 23).max(1)) {
        let eval = |delta: f64| {
            let mut v = flat.clone();
            v[i] += delta;
            let xt = Tensor::from_vec(v, x.dims(), &Device::Cpu).unwrap();
            (f(&xt) * &probe).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
        };
        let numeric = (eval(h) - eval(-h)) / (2.0 * h);
        let err = (numeric - analytic[i]).abs() / numeric.abs().max(1.0);
        assert!(err < 1e-6, "element {i}: finite difference {numeric} vs backward {}", analytic[i]);
    }
}

#[test]
fn frozen_linear_forward_backward_and_no_weight_gradient() {
    let w = random(&[5, 7], 1);
    let b = random(&[5], 2);
    let x = random(&[2, 3, 7], 3);
    let lin = FrozenLinear::new(w.clone(), Some(b.clone())).unwrap();
    let reference = x.broadcast_matmul(&w.t().unwrap()).unwrap().broadcast_add(&b).unwrap();
    assert!(max_diff(&lin.forward(&x).unwrap(), &reference) < 1e-12);
    let x32 = x.to_dtype(DType::F32).unwrap();
    let lin32 = FrozenLinear::new(w.to_dtype(DType::F32).unwrap(), Some(b.to_dtype(DType::F32).unwrap())).unwrap();
    assert!(max_diff(&lin32.forward(&x32).unwrap(), &reference) < 1e-5);
    check_gradient(&x, |x| lin.forward(x).unwrap());
    let var = Var::from_tensor(&x).unwrap();
    let grads = lin.forward(var.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(grads.get(lin.weight()).is_none());
    assert_eq!(grads.get_ids().count(), 1, "only the input may hold a gradient");
}

#[test]
fn frozen_linear_accepts_non_contiguous_and_offset_inputs() {
    let w = random(&[4, 6], 4);
    let lin = FrozenLinear::new(w.clone(), None).unwrap();
    let big = random(&[3, 6, 5], 5);
    let x = big.transpose(1, 2).unwrap().narrow(0, 1, 2).unwrap();
    let reference = x.contiguous().unwrap().broadcast_matmul(&w.t().unwrap()).unwrap();
    assert!(max_diff(&lin.forward(&x).unwrap(), &reference) < 1e-12);
}

#[test]
fn rms_norm_matches_reference_and_finite_differences() {
    let w = random(&[8], 6);
    let x = random(&[2, 3, 8], 7);
    let norm = RmsNorm::new(w.clone(), 1e-6).unwrap();
    let ms = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    let reference = x.broadcast_div(&(ms + 1e-6).unwrap().sqrt().unwrap()).unwrap().broadcast_mul(&w).unwrap();
    let norm32 = RmsNorm::new(w.to_dtype(DType::F32).unwrap(), 1e-6).unwrap();
    assert!(max_diff(&norm32.forward(&x.to_dtype(DType::F32).unwrap()).unwrap(), &reference) < 1e-5);
    check_gradient(&x, |x| norm.forward(x).unwrap());
}

#[test]
fn rope_matches_rotate_half_and_finite_differences() {
    let (t, d) = (5, 8);
    let angles: Vec<f64> = (0..t * d / 2).map(|i| 0.3 * i as f64).collect();
    let cos = Tensor::from_vec(angles.iter().map(|a| a.cos()).collect::<Vec<_>>(), (t, d / 2), &Device::Cpu).unwrap();
    let sin = Tensor::from_vec(angles.iter().map(|a| a.sin()).collect::<Vec<_>>(), (t, d / 2), &Device::Cpu).unwrap();
    let rope = Rope::new(cos, sin).unwrap();
    let x = random(&[2, 3, 3, d], 8);
    let out = rope.forward(&x.to_dtype(DType::F32).unwrap(), 2).unwrap();
    // Position p, pair i rotates (x_i, x_{i+d/2}) by angle[p][i].
    let xv: Vec<Vec<Vec<Vec<f64>>>> = (0..2).map(|b| x.get(b).unwrap().to_vec3().unwrap()).collect();
    let ov: Vec<Vec<Vec<Vec<f32>>>> = (0..2).map(|b| out.get(b).unwrap().to_vec3().unwrap()).collect();
    for b in 0..2 {
        for h in 0..3 {
            for s in 0..3 {
                let p = s + 2;
                for i in 0..d / 2 {
                    let a = angles[p * d / 2 + i];
                    let (x1, x2) = (xv[b][h][s][i], xv[b][h][s][i + d / 2]);
                    assert!((ov[b][h][s][i] as f64 - (x1 * a.cos() - x2 * a.sin())).abs() < 1e-5);
                    assert!((ov[b][h][s][i + d / 2] as f64 - (x2 * a.cos() + x1 * a.sin())).abs() < 1e-5);
                }
            }
        }
    }
    check_gradient(&x, |x| rope.forward(x, 2).unwrap());
}

#[test]
fn masked_softmax_matches_reference_and_finite_differences() {
    let x = random(&[2, 3, 4, 4], 9);
    let mut mask = vec![0f64; 2 * 16];
    for q in 0..4 {
        for k in q + 1..4 {
            mask[q * 4 + k] = f64::from(f32::MIN);
            mask[16 + q * 4 + k] = f64::from(f32::MIN);
        }
    }
    mask[16 + 3 * 4 + 2] = f64::from(f32::MIN);
    let mask = Tensor::from_vec(mask, (2, 1, 4, 4), &Device::Cpu).unwrap();
    let scale = 0.7;
    let z = (x.clone() * scale).unwrap().broadcast_add(&mask).unwrap();
    let e = z.broadcast_sub(&z.max_keepdim(D::Minus1).unwrap()).unwrap().exp().unwrap();
    let reference = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
    let out32 = masked_softmax(&x.to_dtype(DType::F32).unwrap(), scale, Some(&mask)).unwrap();
    assert!(max_diff(&out32, &reference) < 1e-6);
    check_gradient(&x, |x| masked_softmax(x, scale, Some(&mask)).unwrap());
}

#[test]
fn lm_head_loss_matches_log_softmax_and_finite_differences() {
    let h = random(&[5, 6], 10);
    let w = random(&[9, 6], 11);
    let targets = [0u32, 8, 3, 3, 5];
    let z = h.matmul(&w.t().unwrap()).unwrap();
    let max = z.max_keepdim(D::Minus1).unwrap();
    let shifted = z.broadcast_sub(&max).unwrap();
    let ls = shifted.broadcast_sub(&shifted.exp().unwrap().sum_keepdim(D::Minus1).unwrap().log().unwrap()).unwrap();
    let idx = Tensor::from_slice(&targets, (5, 1), &Device::Cpu).unwrap();
    let reference = ls.gather(&idx, 1).unwrap().squeeze(1).unwrap().neg().unwrap();
    let (h32, w32) = (h.to_dtype(DType::F32).unwrap(), w.to_dtype(DType::F32).unwrap());
    assert!(max_diff(&lm_head_cross_entropy(&h32, &w32, &targets).unwrap(), &reference) < 1e-5);
    // The op computes logits in f32; its gradient on f32 inputs against f64 differences of
    // the reference composition.
    let var = Var::from_tensor(&h32).unwrap();
    let g = lm_head_cross_entropy(var.as_tensor(), &w32, &targets).unwrap().sum_all().unwrap().backward().unwrap();
    let flat: Vec<f64> = h.flatten_all().unwrap().to_vec1().unwrap();
    let analytic: Vec<f32> = g.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    for i in 0..flat.len() {
        let eval = |d: f64| {
            let mut v = flat.clone();
            v[i] += d;
            let ht = Tensor::from_vec(v, (5, 6), &Device::Cpu).unwrap();
            let z = ht.matmul(&w.t().unwrap()).unwrap();
            let lse = z.exp().unwrap().sum_keepdim(D::Minus1).unwrap().log().unwrap();
            (lse - z.gather(&idx, 1).unwrap()).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
        };
        let numeric = (eval(1e-6) - eval(-1e-6)) / 2e-6;
        assert!((numeric - f64::from(analytic[i])).abs() < 1e-5, "{i}: {numeric} vs {}", analytic[i]);
    }
    assert!(lm_head_cross_entropy(&h32, &w32, &[0, 9, 0, 0, 0]).is_err(), "out-of-vocabulary targets are rejected");
}

#[test]
fn lm_head_loss_over_several_chunks_equals_one_pass() {
    // 32 MiB of logits per chunk: a 40000-word vocabulary takes 209 rows per chunk.
    let h = random(&[300, 4], 12).to_dtype(DType::F32).unwrap();
    let w = random(&[40000, 4], 13).to_dtype(DType::F32).unwrap();
    let targets: Vec<u32> = (0..300).map(|i| (i * 131) % 40000).collect();
    let var = Var::from_tensor(&h).unwrap();
    let loss = lm_head_cross_entropy(var.as_tensor(), &w, &targets).unwrap();
    let z = h.matmul(&w.t().unwrap()).unwrap();
    let max = z.max_keepdim(D::Minus1).unwrap();
    let lse =
        (z.broadcast_sub(&max).unwrap().exp().unwrap().sum_keepdim(D::Minus1).unwrap().log().unwrap() + max).unwrap();
    let idx = Tensor::from_slice(&targets, (300, 1), &Device::Cpu).unwrap();
    let direct = (lse - z.gather(&idx, 1).unwrap()).unwrap().squeeze(1).unwrap();
    assert!(max_diff(&loss, &direct) < 1e-4);
    let g = loss.sum_all().unwrap().backward().unwrap();
    let p = candle_core::Tensor::exp(&z.broadcast_sub(&z.max_keepdim(D::Minus1).unwrap()).unwrap()).unwrap();
    let p = p.broadcast_div(&p.sum_keepdim(D::Minus1).unwrap()).unwrap();
    let dz = p.scatter_add(&idx, &Tensor::full(-1f32, (300, 1), &Device::Cpu).unwrap(), 1).unwrap();
    assert!(max_diff(g.get(var.as_tensor()).unwrap(), &dz.matmul(&w).unwrap()) < 1e-4);
}
