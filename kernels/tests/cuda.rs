//! Every op's CUDA body against its CPU body (run by `tools/gpu-check.sh` on a GPU machine):
//! the candle custom ops, and the training engine's fused ops through their reference bodies
//! (candle tensor ops: what a non-CPU device runs; `fused_*.rs` prove them equal to the CPU
//! bodies); and the int8 linear's throughput against cuBLAS bf16 on 7B layer shapes (printed).
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor, Var};
use lorafleet_kernels::{lm_head_cross_entropy, masked_softmax, FrozenLinear, Int8Linear, RmsNorm, Rope};
use std::time::Instant;

fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA device")
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_device(&Device::Cpu).unwrap().to_dtype(DType::F64).unwrap();
    let b = b.to_device(&Device::Cpu).unwrap().to_dtype(DType::F64).unwrap();
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
}

/// Forward and input gradient of `f` on the CPU and on the GPU, compared.
fn same_on_both(x: &Tensor, tol: f64, f: impl Fn(&Tensor, &Device) -> Tensor) {
    let run = |dev: &Device| {
        let var = Var::from_tensor(&x.to_device(dev).unwrap()).unwrap();
        let y = f(var.as_tensor(), dev);
        let g = y.sum_all().unwrap().backward().unwrap().get(var.as_tensor()).unwrap().clone();
        (y, g)
    };
    let (yc, gc) = run(&Device::Cpu);
    let (yg, gg) = run(&gpu());
    assert!(max_diff(&yc, &yg) < tol, "forward differs by {}", max_diff(&yc, &yg));
    assert!(max_diff(&gc, &gg) < tol, "backward differs by {}", max_diff(&gc, &gg));
}

#[test]
fn cuda_bodies_equal_cpu_bodies() {
    let x = Tensor::randn(0f32, 1.0, (2, 3, 64), &Device::Cpu).unwrap();
    let w = Tensor::randn(0f32, 0.1, (96, 64), &Device::Cpu).unwrap();
    same_on_both(&x, 1e-4, |x, d| FrozenLinear::new(w.to_device(d).unwrap(), None).unwrap().forward(x).unwrap());
    same_on_both(&x, 1e-3, |x, d| Int8Linear::quantize(&w, Some(32), None, d).unwrap().forward(x).unwrap());
    let norm_w = Tensor::randn(1f32, 0.1, 64, &Device::Cpu).unwrap();
    same_on_both(&x, 1e-4, |x, d| RmsNorm::new(norm_w.to_device(d).unwrap(), 1e-6).unwrap().forward(x).unwrap());
    let heads = Tensor::randn(0f32, 1.0, (2, 4, 5, 16), &Device::Cpu).unwrap();
    let angles = Tensor::arange(0f32, 40.0, &Device::Cpu).unwrap().reshape((5, 8)).unwrap();
    same_on_both(&heads, 1e-4, |x, d| {
        let rope = Rope::new(angles.cos().unwrap().to_device(d).unwrap(), angles.sin().unwrap().to_device(d).unwrap())
            .unwrap();
        rope.forward(x, 0).unwrap()
    });
    let scores = Tensor::randn(0f32, 1.0, (2, 4, 5, 5), &Device::Cpu).unwrap();
    let mask = Tensor::zeros((2, 1, 5, 5), DType::F32, &Device::Cpu).unwrap();
    same_on_both(&scores, 1e-5, |x, d| masked_softmax(x, 0.25, Some(&mask.to_device(d).unwrap())).unwrap());
    let hidden = Tensor::randn(0f32, 1.0, (7, 64), &Device::Cpu).unwrap();
    let head = Tensor::randn(0f32, 0.1, (1000, 64), &Device::Cpu).unwrap();
    let targets = [1u32, 5, 999, 0, 7, 7, 42];
    same_on_both(&hidden, 1e-3, |x, d| lm_head_cross_entropy(x, &head.to_device(d).unwrap(), &targets).unwrap());
}

#[test]
fn fused_ops_reference_bodies_run_on_cuda() {
    use lorafleet_kernels::fused::attention::{self, AttentionShape};
    use lorafleet_kernels::fused::{head_loss, lora_linear, rms_norm, rope, swiglu};
    let cpu = Device::Cpu;
    let on = |t: &Tensor, d: &Device| t.to_device(d).unwrap();
    // 37 tokens in sequences of 20 and 17, hidden 64.
    let (n, h) = (37, 64);
    let cu = [0usize, 20, 37];
    let x = Tensor::randn(0f32, 1.0, (n, h), &cpu).unwrap();

    // LoRA linear with bias and keyed dropout (the mask is drawn on the host, applied on the device).
    let w = Tensor::randn(0f32, 0.1, (96, h), &cpu).unwrap();
    let bias = Tensor::randn(0f32, 0.1, 96, &cpu).unwrap();
    let (a, b) = (Tensor::randn(0f32, 0.1, (8, h), &cpu).unwrap(), Tensor::randn(0f32, 0.1, (96, 8), &cpu).unwrap());
    let keys = [3u64, 4];
    let drop = lora_linear::Dropout { p: 0.1, keep: (1.0 / 0.9f64) as f32, keys: &keys, cu_seqlens: &cu };
    same_on_both(&x, 1e-4, |x, d| {
        let lora = Some((&on(&a, d), &on(&b, d), 2.0, Some(&drop)));
        lora_linear::reference(x, &on(&w, d), Some(&on(&bias, d)), lora).unwrap()
    });

    let norm_w = Tensor::randn(1f32, 0.1, h, &cpu).unwrap();
    same_on_both(&x, 1e-4, |x, d| rms_norm::reference(x, &on(&norm_w, d), 1e-6).unwrap());

    // RoPE over 4 heads of 16 at positions restarting per sequence.
    let positions: Vec<u32> = cu.windows(2).flat_map(|s| 0..(s[1] - s[0]) as u32).collect();
    let angles = Tensor::arange(0f32, 64.0 * 8.0, &cpu).unwrap().reshape((64, 8)).unwrap().affine(0.01, 0.0).unwrap();
    let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
    same_on_both(&x, 1e-4, |x, d| rope::reference(x, &positions, &on(&cos, d), &on(&sin, d), 16).unwrap());

    let g = Tensor::randn(0f32, 1.0, (n, h), &cpu).unwrap();
    same_on_both(&x, 1e-4, |x, d| swiglu::reference(x, &on(&g, d)).unwrap());

    // Attention: GQA (4 query heads over 2 kv heads of 16), a sliding window, two sequences.
    let shape = AttentionShape { heads: 4, kv_heads: 2, head_dim: 16, window: Some(9), scale: 0.25 };
    let (k, v) = (Tensor::randn(0f32, 1.0, (n, 32), &cpu).unwrap(), Tensor::randn(0f32, 1.0, (n, 32), &cpu).unwrap());
    same_on_both(&x, 1e-4, |q, d| attention::reference(&shape, &cu, q, &on(&k, d), &on(&v, d)).unwrap());

    let head = Tensor::randn(0f32, 0.1, (1000, h), &cpu).unwrap();
    let targets: Vec<u32> = (0..n as u32).map(|i| (i * 37) % 1000).collect();
    same_on_both(&x, 1e-3, |x, d| head_loss::reference(x, &on(&head, d), &targets).unwrap());
}

#[test]
fn int8_throughput_against_cublas_bf16_on_7b_shapes() {
    let dev = gpu();
    for (m, k, n) in [(2048, 4096, 4096), (2048, 4096, 11008)] {
        let w = Tensor::randn(0f32, 0.02, (n, k), &Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let dense = FrozenLinear::new(w.to_device(&dev).unwrap().to_dtype(DType::BF16).unwrap(), None).unwrap();
        let int8 = Int8Linear::quantize(&w, None, None, &dev).unwrap();
        let time = |f: &dyn Fn() -> Tensor| {
            f();
            dev.synchronize().unwrap();
            let t = Instant::now();
            for _ in 0..10 {
                f();
            }
            dev.synchronize().unwrap();
            t.elapsed().as_secs_f64() / 10.0
        };
        let bf16 = time(&|| dense.forward(&x).unwrap());
        let q = time(&|| int8.forward(&x).unwrap());
        let tflops = |s: f64| 2.0 * (m * k * n) as f64 / s / 1e12;
        println!(
            "{m}x{k}->{n}: cuBLAS bf16 {:.1} TFLOP/s, int8 linear {:.1} TFLOP/s, ratio {:.2}",
            tflops(bf16),
            tflops(q),
            q / bf16
        );
    }
}
