//! `LORAFLEET_NARROW=f32` is read at run time: set before the first product, it selects the
//! f32 fallbacks even on a CPU that has the bf16 and int8 instructions (its own process: the
//! choice is made once).

use lorafleet_kernels::fused::bf16::{kernels_available, Bf16Scratch, PackedBf16};
use lorafleet_kernels::fused::gemm::{MatMut, MatRef};
use lorafleet_kernels::fused::int8;
use lorafleet_kernels::Int8Linear;

#[test]
fn the_environment_variable_forces_the_fallback() {
    std::env::set_var("LORAFLEET_NARROW", "f32");
    assert!(!kernels_available());
    // The fallback keeps activations in f32: with bf16-exact weights (small integers) and an
    // activation that bf16 cannot hold, the product shows which path ran.
    let w = vec![1.0f32; 16 * 2];
    let packed = PackedBf16::new(&w, 16, 2);
    let x = [1.0f32 + 1.0 / 1024.0, 0.0];
    let mut y = vec![0f32; 16];
    packed.full().forward(MatRef::new(&x, 1, 2), MatMut::new(&mut y, 1, 16), &mut Bf16Scratch::default());
    assert!(y.iter().all(|&v| v == x[0]), "{y:?}");
}

#[test]
fn the_environment_variable_sends_int8_to_the_dequantizing_path() {
    std::env::set_var("LORAFLEET_NARROW", "f32");
    assert!(!int8::kernels_available());
    // The dequantizing path keeps activations in f32: an int8-exact weight (scale 1) and an
    // activation the per-token quantization cannot hold show which path ran.
    let dev = candle_core::Device::Cpu;
    let w = candle_core::Tensor::from_vec(vec![127f32, 1.0, 0.0, 0.0], (2, 2), &dev).unwrap();
    let layer = Int8Linear::quantize(&w, None, None, &dev).unwrap();
    assert!(layer.packed().is_none(), "no packed weight is offered to the engine");
    let x = candle_core::Tensor::from_vec(vec![1.0f32, 0.001], (1, 2), &dev).unwrap();
    let y: Vec<f32> = layer.forward(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(y, [127.0 + 0.001, 0.0], "the f32 path ran");
}
