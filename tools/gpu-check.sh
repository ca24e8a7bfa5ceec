#!/usr/bin/env bash
# The GPU check, prepared to run in one go on a device machine (see the device tool's README):
# builds the kernels' CUDA bodies with a real nvcc and runs tests/cuda.rs (every op's CUDA body
# against its CPU body, and the int8 linear against cuBLAS bf16 on 7B layer shapes).
#
# Expects: the NVIDIA driver; CUDA 13 runtime libraries (cuBLAS, cuRAND, NVRTC) in a Python
# site-packages (the H200 image's PyTorch wheels) or under $CUDA_LIBS; pip for nvcc.
# Output goes to $OUT (device tool) or ./gpu-check.out.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/gpu-check.out}"
mkdir -p "$out"
exec > >(tee "$out/gpu-check.log") 2>&1

nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader || true
cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-$cap}"

venv="${TMPDIR:-/tmp}/lorafleet-nvcc"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q nvidia-cuda-nvcc nvidia-cuda-runtime nvidia-cuda-cccl nvidia-cublas nvidia-curand nvidia-cuda-nvrtc
nv="$("$venv/bin/python" -c 'import nvidia, os; print(list(nvidia.__path__)[0])')"
export NVCC="$nv/cu13/bin/nvcc" PATH="$nv/cu13/bin:$PATH"
libs="$(find "$nv" -name 'lib*.so*' -printf '%h\n' | sort -u | tr '\n' ':')"
export LD_LIBRARY_PATH="${CUDA_LIBS:-}:$libs${LD_LIBRARY_PATH:-}"
# The linker wants unversioned names.
linkdir="$(mktemp -d)"
for lib in cublas cublasLt curand nvrtc cudart; do
  f="$(find "$nv" -name "lib$lib.so.*" | head -1)"; [ -n "$f" ] && ln -sf "$f" "$linkdir/lib$lib.so"
done
export RUSTFLAGS="-L $linkdir ${RUSTFLAGS:-}"

cargo test --release -p lorafleet-kernels --features cuda --test cuda -- --nocapture --test-threads 1
