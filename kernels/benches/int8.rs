//! Int8 linear (tiled dequantize + gemm) against candle's f32 matmul on the same shapes, CPU.
//! `cargo bench -p lorafleet-kernels --bench int8` prints one table; the ratio is int8 time
//! over f32 time (1.0 = as fast as f32, with a quarter of the weight memory).

use candle_core::{Device, Tensor, Var};
use lorafleet_kernels::{FrozenLinear, Int8Linear};

mod common;
use common::median_seconds;

fn main() {
    let dev = Device::Cpu;
    // (tokens, in, out): the 58M bench model's q/v and MLP layers at 4×256 tokens, and 7B
    // layer shapes at 256 tokens.
    let shapes = [(1024, 512, 512), (1024, 512, 1376), (1024, 1376, 512), (256, 4096, 4096), (256, 4096, 11008)];
    println!("| tokens × in → out | f32 fwd ms | int8 fwd ms | ratio | f32 fwd+bwd ms | int8 fwd+bwd ms | ratio |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (m, k, n) in shapes {
        let w = Tensor::randn(0f32, 0.02, (n, k), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let dense = FrozenLinear::new(w.clone(), None).unwrap();
        let int8 = Int8Linear::quantize(&w, None, None, &dev).unwrap();
        let reps = if k * n > 10_000_000 { 3 } else { 7 };
        let f = median_seconds(|| drop(dense.forward(&x).unwrap()), reps);
        let q = median_seconds(|| drop(int8.forward(&x).unwrap()), reps);
        let var = Var::from_tensor(&x).unwrap();
        let fb = median_seconds(
            || drop(dense.forward(var.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap()),
            reps,
        );
        let qb = median_seconds(
            || drop(int8.forward(var.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap()),
            reps,
        );
        println!(
            "| {m} × {k} → {n} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            f * 1e3,
            q * 1e3,
            q / f,
            fb * 1e3,
            qb * 1e3,
            qb / fb
        );
    }
}
