#!/usr/bin/env bash
# The GPU check, prepared to run in one go on a device machine (see the device tool's README):
# builds the kernels' CUDA bodies with a real nvcc and runs tests/cuda.rs (every op's CUDA body
# against its CPU body, and the int8 linear against cuBLAS bf16 on 7B layer shapes), then the
# data-parallel equivalence with NCCL (two GPUs) or a one-rank NCCL worker (one GPU).
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

# Data parallelism with NCCL (the `nccl` feature; pip's NCCL wheel provides libnccl).
"$venv/bin/pip" install -q nvidia-nccl-cu13 || "$venv/bin/pip" install -q nvidia-nccl-cu12
f="$(find "$nv" -name 'libnccl.so*' | head -1)"; [ -n "$f" ] && ln -sf "$f" "$linkdir/libnccl.so"
export LD_LIBRARY_PATH="$linkdir:$(dirname "${f:-/}"):$LD_LIBRARY_PATH"
cargo build --release -p lorafleet-coordinator --features cuda,nccl
gpus="$(nvidia-smi -L | wc -l)"
run() { target/release/coordinator --demo --device cuda --micro_batch_size 8 --max_steps 20 --save_steps 10 \
          --eval_steps 0 --eval_exact_match false "$@"; }
run --workers 1 --output_dir "$out/dp1"
if [ "$gpus" -ge 2 ]; then
  # NCCL refuses two ranks on one device: the equivalence needs two GPUs.
  run --workers 2 --output_dir "$out/dp2-a"
  run --workers 2 --output_dir "$out/dp2-b"
  cmp "$out/dp2-a/adapter_model.safetensors" "$out/dp2-b/adapter_model.safetensors" && echo "2 GPUs: bit-identical"
else
  # One GPU: a one-rank NCCL communicator through a real worker process and QUIC.
  run --workers 1 --listen 127.0.0.1:7071 --token gpu-check --tls-dir "$out/tls" --output_dir "$out/dp2-a" &
  sleep 5
  target/release/worker --join 127.0.0.1:7071 --token gpu-check \
    --fingerprint "$(sha256sum "$out/tls/cert.der" | cut -d' ' -f1)" --device cuda:0
  wait
fi
python3 - "$out" <<'PY'
import struct, json, sys, math
def load(p):
    b = open(p, "rb").read(); n = struct.unpack("<Q", b[:8])[0]; h = json.loads(b[8:8 + n]); d = b[8 + n:]
    return {k: struct.unpack(f"<{(v['data_offsets'][1]-v['data_offsets'][0])//4}f", d[v['data_offsets'][0]:v['data_offsets'][1]])
            for k, v in h.items() if k != "__metadata__"}
a, b = load(f"{sys.argv[1]}/dp1/adapter_model.safetensors"), load(f"{sys.argv[1]}/dp2-a/adapter_model.safetensors")
num = sum((x - y) ** 2 for k in a for x, y in zip(a[k], b[k])); den = sum(x * x for k in a for x in a[k])
print(f"in-process vs NCCL worker(s): relative difference {math.sqrt(num / den):.3e} (limit 1e-4)")
PY

# Data-parallel scaling on CPU workers with a core each (the 2-core CI machine oversubscribes
# 4 workers): the table for docs/perf.md.
target/release/coordinator bench --scaling --steps 8 --warmup 2 | tee "$out/scaling.md"
