//! With the `cuda` feature, compiles `src/cuda/*.cu` to PTX (embedded with `include_str!`).
//! `NVCC` (or `nvcc` on PATH) and `CUDA_COMPUTE_CAP` (default 80) choose the compiler and
//! the virtual architecture; PTX is JIT-compiled for the actual GPU when first loaded.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=src/cuda/int8.cu");
    println!("cargo::rerun-if-env-changed=NVCC");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let arch = format!("-arch=compute_{}", cap.trim_end_matches(['a', 'f']));
    let status =
        Command::new(&nvcc).args(["--ptx", &arch, "--output-directory"]).arg(&out).arg("src/cuda/int8.cu").status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{nvcc} failed on src/cuda/int8.cu ({s})"),
        Err(e) => panic!("the cuda feature needs nvcc (set NVCC or put it on PATH): {e}"),
    }
}
