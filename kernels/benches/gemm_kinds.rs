//! The frozen base's products by kind (f32 through `gemm`, bf16 and int8 through the packed
//! kernels; int8 includes quantizing the activations and finding outlier columns, of which
//! these inputs have none) on the bench models' shapes, CPU, the pool's threads
//! (RAYON_NUM_THREADS).
//! `cargo bench -p lorafleet-kernels --bench gemm_kinds` prints one table of GFLOP/s, each
//! figure with its share of the kind's peak as measured here (`peak`), not as worked out from
//! a nominal clock: a VM's reported clock is not the clock under load.

use lorafleet_kernels::fused::bf16::{self, Bf16Scratch, PackedBf16};
use lorafleet_kernels::fused::gemm::{matmul, MatMut, MatRef, Par};
use lorafleet_kernels::fused::int8::{self, Int8Scratch, PackedInt8};

mod common;
use common::median_seconds;

/// Each kind's peak on this CPU, measured: every pool thread runs the kind's multiply-add
/// instruction on 12 independent accumulators, so nothing but the execution ports limits it
/// (on this machine's Zen 5, 8 were too few for `vdpbf16ps`: 581 GFLOP/s against 12's 798;
/// with 16, LLVM rotated the accumulators through registers and the stack and measured that).
mod peak {
    #[cfg(target_arch = "x86_64")]
    use std::arch::x86_64::*;

    /// Accumulator chains per thread and iterations per call.
    const CHAINS: usize = 12;
    const ITERS: usize = 50_000_000;

    /// GFLOP/s (GOP/s for int8) of the pool's threads, or `None` without the instruction.
    /// Only AVX-512's instructions are measured: they are the ones the kernels use where
    /// they are fastest; elsewhere the table has no shares.
    #[cfg(target_arch = "x86_64")]
    pub fn all() -> [Option<f64>; 3] {
        [
            measure(is_x86_feature_detected!("avx512f"), 32, || unsafe { fma() }),
            measure(lorafleet_kernels::fused::bf16::kernels_available(), 64, || unsafe { dpbf16() }),
            measure(lorafleet_kernels::fused::int8::kernels_available(), 128, || unsafe { dpbusd() }),
        ]
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub fn all() -> [Option<f64>; 3] {
        [None; 3]
    }

    /// `ops` is one instruction's work: 16 lanes × 2 for an FMA, 32 bf16 pairs × 2, 64 byte
    /// pairs × 2.
    #[cfg(target_arch = "x86_64")]
    fn measure(available: bool, ops: usize, body: impl Fn() -> f32 + Sync) -> Option<f64> {
        if !available {
            return None;
        }
        let threads = rayon::current_num_threads();
        // The fastest of a few calls: a peak is what the CPU can do, and a noisy neighbour
        // only ever slows a call down.
        let seconds = (0..7)
            .map(|_| {
                let start = std::time::Instant::now();
                std::hint::black_box(rayon::broadcast(|_| body()));
                start.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min);
        Some((threads * CHAINS * ITERS * ops) as f64 / seconds / 1e9)
    }

    /// `CHAINS` accumulators, each stepped `ITERS` times; inlined into the callers below, so
    /// `step`'s instruction is compiled with their target features.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn chains<T: Copy>(zero: T, step: impl Fn(T) -> T) -> [T; CHAINS] {
        let mut acc = [zero; CHAINS];
        for _ in 0..ITERS {
            for r in &mut acc {
                *r = step(*r);
            }
        }
        acc
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn fma() -> f32 {
        let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
        chains(_mm512_setzero_ps(), |r| _mm512_fmadd_ps(r, a, b)).iter().map(|&r| _mm512_reduce_add_ps(r)).sum()
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bf16")]
    fn dpbf16() -> f32 {
        let v = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3), _mm512_set1_ps(-1e-3));
        chains(_mm512_setzero_ps(), |r| _mm512_dpbf16_ps(r, v, v)).iter().map(|&r| _mm512_reduce_add_ps(r)).sum()
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vnni")]
    fn dpbusd() -> f32 {
        let (a, b) = (_mm512_set1_epi8(1), _mm512_set1_epi8(-1));
        let acc = chains(_mm512_setzero_si512(), |r| _mm512_dpbusd_epi32(r, a, b));
        acc.iter().map(|&r| _mm512_reduce_add_epi32(r) as f32).sum()
    }
}

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
    let peaks = peak::all();
    let show = |p: Option<f64>| p.map_or("n/a".to_string(), |p| format!("{p:.0}"));
    println!(
        "measured peaks, {} threads: f32 FMA {} GFLOP/s, bf16 dot {} GFLOP/s, int8 dot {} GOP/s",
        rayon::current_num_threads(),
        show(peaks[0]),
        show(peaks[1]),
        show(peaks[2])
    );
    // A figure and its share of its kind's measured peak.
    let cell = |rate: f64, kind: usize| match peaks[kind] {
        Some(p) if rate.is_finite() => format!("{rate:.0} ({:.0}%)", 100.0 * rate / p),
        _ => format!("{rate:.0}"),
    };
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
            "| {name} | {m} × {k} → {n} | {} | {} | {} | {} | {} | {} |",
            cell(flops / f32_fwd, 0),
            cell(flops / bf_fwd, 1),
            cell(flops / i8_fwd, 2),
            cell(flops / f32_bwd, 0),
            cell(flops / bf_bwd, 1),
            cell(flops / i8_bwd, 2),
        );
    }
}
