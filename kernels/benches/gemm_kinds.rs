//! The frozen base's products by kind (f32 through `gemm`, bf16 and int8 through the packed
//! kernels; int8 includes quantizing the activations and finding outlier columns, of which
//! these inputs have none) on the bench models' shapes, CPU, the pool's threads
//! (RAYON_NUM_THREADS).
//! `cargo bench -p lorafleet-kernels --bench gemm_kinds` prints one table of GFLOP/s.

use lorafleet_kernels::fused::bf16::{self, Bf16Scratch, PackedBf16};
use lorafleet_kernels::fused::gemm::{matmul, MatMut, MatRef, Par};
use lorafleet_kernels::fused::int8::{self, Int8Scratch, PackedInt8};

mod common;
use common::median_seconds;

fn values(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|i| (i as f32 * 0.7311 + seed).sin()).collect()
}

fn main() {
    println!("bf16 kernel: {}", if bf16::kernels_available() { "AVX512-BF16" } else { "f32 fallback" });
    if !int8::kernels_available() {
        println!("no AVX512-VNNI: the int8 columns are left out");
    }
    // (name, tokens, in, out): the 58M model's fused q|k|v, o, gate|up and down at 4 × 256
    // tokens, the 135M model's at the same tokens, and the demo's at its 1250-token batches.
    let shapes = [
        ("58m qkv", 1024, 512, 1536),
        ("58m gate|up", 1024, 512, 2752),
        ("58m down", 1024, 1376, 512),
        ("135m qkv", 1024, 576, 960),
        ("135m gate|up", 1024, 576, 3072),
        ("135m down", 1024, 1536, 576),
    ];
    println!("| product | tokens × in → out | f32 fwd | bf16 fwd | int8 fwd | f32 bwd (dY·W) | bf16 bwd | int8 bwd |");
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (name, m, k, n) in shapes {
        let w = values(n * k, 0.1);
        let x = values(m * k, 0.2);
        let dy = values(m * n, 0.3);
        let packed = PackedBf16::new(&w, n, k);
        let q: Vec<u8> = w.iter().map(|&v| ((v * 127.0).round() as i32 + 128) as u8).collect();
        let packed8 = PackedInt8::new(&q, &vec![1.0 / 127.0; n], n, k);
        let mut s8 = Int8Scratch::default();
        let (mut y, mut dx, mut s) = (vec![0f32; m * n], vec![0f32; m * k], Bf16Scratch::default());
        let flops = 2.0 * (m * k * n) as f64 / 1e9;
        let reps = 9;
        let f32_fwd = median_seconds(
            || {
                matmul(
                    MatMut::new(&mut y, m, n),
                    MatRef::new(&x, m, k),
                    MatRef::new(&w, n, k).t(),
                    1.0,
                    false,
                    Par::Pool,
                )
            },
            reps,
        );
        let bf_fwd =
            median_seconds(|| packed.full().forward(MatRef::new(&x, m, k), MatMut::new(&mut y, m, n), &mut s), reps);
        let f32_bwd = median_seconds(
            || matmul(MatMut::new(&mut dx, m, k), MatRef::new(&dy, m, n), MatRef::new(&w, n, k), 1.0, false, Par::Pool),
            reps,
        );
        let bf_bwd = median_seconds(
            || packed.full().backward(MatRef::new(&dy, m, n), MatMut::new(&mut dx, m, k), false, &mut s),
            reps,
        );
        let (i8_fwd, i8_bwd) = if int8::kernels_available() {
            let w8 = packed8.full();
            (
                median_seconds(|| w8.forward(MatRef::new(&x, m, k), MatMut::new(&mut y, m, n), &mut s8), reps),
                median_seconds(
                    || w8.backward(MatRef::new(&dy, m, n), MatMut::new(&mut dx, m, k), false, &mut s8),
                    reps,
                ),
            )
        } else {
            (f64::NAN, f64::NAN)
        };
        println!(
            "| {name} | {m} × {k} → {n} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            flops / f32_fwd,
            flops / bf_fwd,
            flops / i8_fwd,
            flops / f32_bwd,
            flops / bf_bwd,
            flops / i8_bwd,
        );
    }
}
