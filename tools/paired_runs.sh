#!/usr/bin/env bash
# Paired demo runs: for each seed, lorafleet trains the demo, and PyTorch + PEFT trains it on
# lorafleet's random streams (tests/examples/paired_streams.rs, tools/peft_demo_train.py
# --replay), in f32 and in int8 (--load_in_8bit / PEFT + bitsandbytes). What is left between
# the two sides is arithmetic, so their accuracies can be compared seed by seed.
#
#   bash tools/paired_runs.sh OUT PYTHON SEED...     then   python3 tools/paired_compare.py OUT
#
# PYTHON has torch, transformers, peft and bitsandbytes (docs/perf.md names the versions).
# Needs release builds: cargo build --release -p lorafleet-coordinator and
# cargo build --release -p lorafleet-tests --example paired_streams. Each seed takes about
# 3-5 minutes on 2 cores. Writes OUT/streamsS, OUT/ours-S-MODE/ (the run's output folder) and
# OUT/peft-S-MODE.log (its last line is the JSON result).
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: tools/paired_runs.sh OUT PYTHON SEED..." >&2; exit 2; }
out="$1" py="$2"
shift 2
cd "$(dirname "$0")/.."
mkdir -p "$out"
for s in "$@"; do
  target/release/examples/paired_streams "$out/streams$s" --seed "$s"
  for mode in f32 int8; do
    ours=() theirs=()
    if [ "$mode" = int8 ]; then ours=(--load_in_8bit) theirs=(--load-in-8bit); fi
    rm -rf "$out/ours-$s-$mode"
    target/release/coordinator --demo --seed "$s" "${ours[@]}" --logging_steps 1 \
      --output_dir "$out/ours-$s-$mode" > "$out/ours-$s-$mode.log" 2>&1
    "$py" tools/peft_demo_train.py --replay "$out/streams$s" --eval --json "${theirs[@]}" \
      > "$out/peft-$s-$mode.log" 2>&1
    echo "seed $s $mode done $(date -u +%H:%M:%S)"
  done
done
