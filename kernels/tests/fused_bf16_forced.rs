//! `LORAFLEET_NARROW=f32` is read at run time: set before the first product, it selects the
//! f32 fallback even on a CPU that has the bf16 instructions (its own process: the choice is
//! made once).

use lorafleet_kernels::fused::bf16::{kernels_available, Bf16Scratch, PackedBf16};
use lorafleet_kernels::fused::gemm::{MatMut, MatRef};

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
