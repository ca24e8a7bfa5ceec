"""Tokens/s of training with and without --sample_packing, ours only (docs/perf.md).

Runs `coordinator` alternately unpacked and packed, ROUNDS times each, every run in its own
process and output folder, and reads the summary line the run prints ("steps: N, training
time: T s, R tokens/s (non-padding)"): real (non-padding) tokens trained per second of
training steps. Prints each round and the median of the per-round ratios packed / unpacked
(the machine is shared and noisy; ratios taken side by side are what to compare).

    python3 tools/packing_bench.py --rounds 5 --common "--demo --num_epochs 1" \
        --unpacked "" --packed "--sample_packing --batch_size 4 --micro_batch_size 4"
"""

import argparse
import re
import shlex
import statistics
import subprocess
import tempfile

SUMMARY = re.compile(r"steps: (\d+), training time: ([0-9.]+) s, (\d+) tokens/s")


def train(binary, flags, out):
    args = [binary, *flags, "--output_dir", out, "--eval_exact_match", "false", "--eval_steps", "0",
            "--save_steps", "0", "--logging_steps", "1000"]
    run = subprocess.run(args, capture_output=True, text=True, check=True)
    m = SUMMARY.search(run.stdout)
    if not m:
        raise SystemExit(f"no summary line in the output of {args}:\n{run.stdout}\n{run.stderr}")
    rows = re.search(r"sample packing: (\d+) rows of at most \d+ tokens in epoch 1, ([0-9.]+)% filled", run.stderr)
    return int(m.group(1)), float(m.group(2)), float(m.group(3)), rows.groups() if rows else None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--binary", default="target/release/coordinator")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--common", default="--demo")
    p.add_argument("--unpacked", default="")
    p.add_argument("--packed", default="--sample_packing")
    a = p.parse_args()
    common = shlex.split(a.common)
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            u = train(a.binary, common + shlex.split(a.unpacked), f"{tmp}/u{r}")
            k = train(a.binary, common + shlex.split(a.packed), f"{tmp}/p{r}")
            ratios.append(k[2] / u[2])
            print(f"round {r + 1}: unpacked {u[0]} steps {u[1]:.1f} s {u[2]:.0f} tok/s; "
                  f"packed {k[0]} steps {k[1]:.1f} s {k[2]:.0f} tok/s (rows, fill% {k[3]}); ratio {ratios[-1]:.2f}",
                  flush=True)
    print(f"median ratio packed/unpacked over {a.rounds} rounds: {statistics.median(ratios):.2f} "
          f"({', '.join(f'{x:.2f}' for x in ratios)})")


if __name__ == "__main__":
    main()
