#!/usr/bin/env bash
# The GPU check, prepared to run in one go on a device machine (the device tool's README), over
# a copy of this checkout and the .gpu/ bundle that tools/gpu-build.sh built here: that machine
# has the NVIDIA driver, CUDA 13.0's libraries and a Python with torch, transformers and peft,
# but no Rust toolchain and no registry.
#
#   bash tools/gpu-build.sh                                   # here first
#   device run, carry [".gpu"], timeout_s 600:  bash tools/gpu-check.sh
#
# In order (each step's output in $OUT/gpu-check.log; about 8 minutes on an H200):
# 1. kernels/tests/cuda.rs: every candle op's CUDA body against its CPU body, the engine's fused
#    ops through their reference bodies on CUDA, and the int8 linear (a tile dequantized to bf16
#    for cuBLAS) beside cuBLAS bf16 on 7B layer shapes (TFLOP/s printed);
# 2. tests/tests/cuda.rs: the PEFT fixture through the model on the GPU, in f32 and in bf16;
# 3. the demo on CUDA in process, then through a real worker process with a one-rank NCCL
#    communicator (two GPUs: two ranks, twice, bit for bit), adapters compared;
# 4. `coordinator bench --device cuda --workload 1b` beside PyTorch + PEFT (both bf16), with the
#    int8 base too: the ~1B-shaped timing.
# Set GPU_CHECK_SKIP_BENCH=1 to stop after step 3.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/gpu-check.out}"
mkdir -p "$out"
exec > >(tee "$out/gpu-check.log") 2>&1
[ -f .gpu/bin.tar.xz ] || { echo "no .gpu/bin.tar.xz here: run tools/gpu-build.sh first and carry .gpu" >&2; exit 2; }
bin="${TMPDIR:-/tmp}/lorafleet-gpu/bin"
rm -rf "$(dirname "$bin")"
python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' .gpu/bin.tar.xz "$(dirname "$bin")"
here="$(git rev-parse HEAD 2>/dev/null || echo '?')"
echo "bundle built from $(cat .gpu/commit), this tree at $here"
if [ "$(head -1 .gpu/commit)" != "$here" ] || [ "$(sed -n 2p .gpu/commit)" != "clean" ]; then
  echo "WARNING: the bundle is not this tree's clean HEAD: rebuild with tools/gpu-build.sh" >&2
fi
# The binaries hold their build checkout's path (the demo's folder, the fixtures, tools/):
# point that path at this copy.
built="$(cat .gpu/build-root)"
if [ "$built" != "$PWD" ]; then
  if [ ! -e "$built" ]; then
    mkdir -p "$(dirname "$built")"
    ln -s "$PWD" "$built"
  elif [ "$(readlink -f "$built")" != "$(readlink -f "$PWD")" ]; then
    echo "$built exists and is not this copy: the binaries would read it" >&2
    exit 2
  fi
fi

nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader || true
# CUDA's libraries as the image's PyTorch wheels hold them (site-packages/nvidia/*/lib).
py="${PYTHON:-python3}"
libs="$("$py" -c 'import nvidia; print("\n".join(nvidia.__path__))' | xargs -I{} find {} -name 'lib*.so*' -printf '%h\n' 2>/dev/null | sort -u | paste -sd:)" || true
[ -n "$libs" ] || echo "warning: no CUDA libraries under $py's nvidia package; relying on the loader's paths" >&2
export LD_LIBRARY_PATH="$(printf '%s' "${CUDA_LIBS:+$CUDA_LIBS:}$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" | sed 's/^://;s/:$//')"
"$py" -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'

step() { printf '\n=== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

step "1. CUDA bodies against CPU bodies; int8 beside cuBLAS bf16"
"$bin/kernels-cuda" --nocapture --test-threads 1
step "2. the PEFT fixture on the GPU"
"$bin/tests-cuda" --nocapture --test-threads 1

step "3. the demo on CUDA: in process, then through NCCL worker processes"
gpus="$(nvidia-smi -L | wc -l)"
run() { "$bin/coordinator" --demo --device cuda --micro_batch_size 8 --max_steps 20 --save_steps 10 \
          --eval_steps 0 --eval_exact_match false "$@"; }
run --workers 1 --output_dir "$out/dp1"
if [ "$gpus" -ge 2 ]; then
  # NCCL refuses two ranks on one device: the equivalence needs two GPUs.
  run --workers 2 --output_dir "$out/dp2-a"
  run --workers 2 --output_dir "$out/dp2-b"
  if ! cmp "$out/dp2-a/adapter_model.safetensors" "$out/dp2-b/adapter_model.safetensors"; then
    echo "2 GPUs: two runs differ" >&2
    exit 1
  fi
  echo "2 GPUs: bit-identical"
else
  # One GPU: a one-rank NCCL communicator through a real worker process and QUIC.
  run --workers 1 --listen 127.0.0.1:7071 --token gpu-check --tls-dir "$out/tls" --output_dir "$out/dp2-a" &
  coord=$!
  # The certificate is written when the coordinator starts listening.
  for _ in $(seq 120); do [ -s "$out/tls/cert.der" ] && break; sleep 1; done
  [ -s "$out/tls/cert.der" ] || { echo "no $out/tls/cert.der after 120 s" >&2; kill "$coord"; exit 1; }
  fingerprint="$(sha256sum "$out/tls/cert.der" | cut -d' ' -f1)"
  "$bin/worker" --join 127.0.0.1:7071 --token gpu-check --fingerprint "$fingerprint" --device cuda:0
  # `wait` alone would also wait for the tee behind this script's output.
  wait "$coord"
fi
"$py" - "$out" <<'PY'
import struct, json, sys, math
def load(p):
    b = open(p, "rb").read(); n = struct.unpack("<Q", b[:8])[0]; h = json.loads(b[8:8 + n]); d = b[8 + n:]
    return {k: struct.unpack(f"<{(v['data_offsets'][1]-v['data_offsets'][0])//4}f", d[v['data_offsets'][0]:v['data_offsets'][1]])
            for k, v in h.items() if k != "__metadata__"}
a, b = load(f"{sys.argv[1]}/dp1/adapter_model.safetensors"), load(f"{sys.argv[1]}/dp2-a/adapter_model.safetensors")
num = sum((x - y) ** 2 for k in a for x, y in zip(a[k], b[k])); den = sum(x * x for k in a for x in a[k])
rel = math.sqrt(num / den)
print(f"in-process vs NCCL worker(s): relative difference {rel:.3e} (limit 1e-4)")
sys.exit(1 if rel > 1e-4 else 0)
PY

[ "${GPU_CHECK_SKIP_BENCH:-0}" = 1 ] && exit 0
step "4. a 1B-shaped model on the GPU beside PyTorch + PEFT (bf16 both; ours also with the int8 base)"
"$bin/coordinator" bench --device cuda --workload 1b --reference-python "$py" --rounds 2 --checkpointing off \
  --batches random --int8 --steps 5 --warmup 2 | tee "$out/bench-1b.md"
