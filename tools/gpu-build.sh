#!/usr/bin/env bash
# Builds what tools/gpu-check.sh runs, on a machine without a GPU: the device machine has the
# NVIDIA driver, CUDA 13.0's libraries and a Python with torch, transformers and peft, but no
# Rust toolchain and no registry to fetch from (../shared/notes/gpu-build.md, the device tool's
# README). So the binaries are built here, against CUDA 13.0 from PyPI (the driver's version:
# PTX from a newer nvcc would not load) with a link-only stub of libcuda, stripped, and packed
# into .gpu/ (ignored by git) for the device tool to carry:
#
#   bash tools/gpu-build.sh            # here, about 15 minutes on 2 cores cold
#   device run, carry [".gpu"]:  bash tools/gpu-check.sh
#
# .gpu/bin.tar.xz holds coordinator and worker (features cuda, nccl) and the two CUDA test
# binaries: about 220 MB stripped (each embeds candle's PTX), 12 MB packed together, which with
# the working tree stays under the device tool's 64 MiB. .gpu/build-root records this
# checkout's path, which the binaries hold at compile time (the demo's and the fixtures'
# folders), so that gpu-check.sh can link it to the copy it runs in.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
bundle="$root/.gpu"
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude

venv="${TMPDIR:-/tmp}/lorafleet-cuda-13.0"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 \
  nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 nvidia-cublas==13.0.2.14 'nvidia-curand>=10.4,<10.5' \
  nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nccl-cu13
nv="$("$venv/bin/python" -c 'import nvidia; print(list(nvidia.__path__)[0])')"
export NVCC="$nv/cu13/bin/nvcc" PATH="$nv/cu13/bin:$PATH" CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
"$NVCC" --version | tail -1

# The linker wants unversioned names; libcuda (the driver) is not on PyPI: a stub that defines
# every driver symbol cudarc declares, with the real library's SONAME, so the binaries ask for
# the real libcuda.so.1 at run time.
# A fixed folder: its path is part of RUSTFLAGS, which cargo's fingerprints include.
export CARGO_TARGET_DIR="${GPU_TARGET_DIR:-$root/target/gpu}"
link="$CARGO_TARGET_DIR/cuda-link"
mkdir -p "$link"
for lib in cublas cublasLt curand nvrtc cudart nccl; do
  f="$(find "$nv" -name "lib$lib.so.*" | sort | head -1)"
  [ -n "$f" ] || { echo "lib$lib not found under $nv" >&2; exit 1; }
  ln -sf "$f" "$link/lib$lib.so"
done
sys="$(cargo metadata --format-version 1 --all-features | python3 -c '
import json, sys
pkg = next(p for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc")
print(pkg["manifest_path"].rsplit("/", 1)[0] + "/src/driver/sys/mod.rs")')"
grep -o 'fn cu[A-Za-z0-9_]*(' "$sys" | sort -u | sed 's/^fn \(.*\)($/void \1(void) {}/' >"$link/cuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$link/libcuda.so" "$link/cuda_stub.c"
export RUSTFLAGS="-L $link ${RUSTFLAGS:-}"
# (A target folder of its own, above: the cuda features would otherwise rebuild the CPU
# build's crates.)

rm -rf "$bundle"
stage="$(mktemp -d)"
mkdir -p "$bundle" "$stage/bin"
cargo build --release -p lorafleet-coordinator --features cuda,nccl
for b in coordinator worker; do
  strip -o "$stage/bin/$b" "$CARGO_TARGET_DIR/release/$b"
done
# The CUDA test binaries (their paths come from cargo's JSON messages).
tests() {
  cargo test --release --no-run --message-format=json "$@" | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cuda":
        print(m["executable"])'
}
strip -o "$stage/bin/kernels-cuda" "$(tests -p lorafleet-kernels --features cuda --test cuda)"
strip -o "$stage/bin/tests-cuda" "$(tests -p lorafleet-tests --features cuda --test cuda)"
du -sh "$stage"/bin/*
# One archive: the binaries share most of their bytes (the PTX), which xz's 64 MiB window finds.
tar -C "$stage" -cf - bin | xz -9 -T1 >"$bundle/bin.tar.xz"
echo "$root" >"$bundle/build-root"
{ git rev-parse HEAD; if [ -z "$(git status --porcelain --untracked-files=no)" ]; then echo clean; else echo modified; fi; } >"$bundle/commit"
rm -rf "$stage"
echo "carry .gpu: $(du -sh "$bundle" | cut -f1), the working tree $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) bytes (the device tool's limit: 64 MiB together)"
