"""The table of tools/paired_runs.sh's output folder: for each seed and mode, lorafleet's and
PEFT's exact match and eval loss on the same random streams, and how far their per-step losses
drift apart (|ours - PEFT| / PEFT, median over the steps of each span).

    python3 tools/paired_compare.py OUT
"""
import glob
import json
import os
import re
import statistics
import sys

SPANS = [(1, 10), (11, 50), (51, 108), (109, 216), (217, 324)]


def ours(folder):
    losses, result = {}, {}
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        for line in f:
            d = json.loads(line)
            if d.get("type") == "train":
                losses[d["step"]] = d["loss"]
            elif d.get("type") == "eval":
                result["eval_loss"] = d["eval_loss"]
            elif d.get("type") == "exact_match" and d.get("stage") == "after":
                result["exact_match"] = d["accuracy"]
    return losses, result


def theirs(log):
    last = None
    with open(log) as f:
        for line in f:
            if line.startswith("{"):
                last = json.loads(line)
    return last


def main():
    out = sys.argv[1]
    runs = sorted((int(m.group(1)), m.group(2)) for p in glob.glob(os.path.join(out, "ours-*-*"))
                  if os.path.isdir(p) and (m := re.fullmatch(r"ours-(\d+)-(f32|int8)", os.path.basename(p))))
    print("| seed | mode | exact match ours / PEFT | eval loss ours / PEFT | "
          + " | ".join(f"steps {a}-{b}" for a, b in SPANS) + " |")
    print("| ---: | --- | ---: | ---: | " + " | ".join("---:" for _ in SPANS) + " |")
    diffs = {}
    for seed, mode in runs:
        peft_log = os.path.join(out, f"peft-{seed}-{mode}.log")
        peft = theirs(peft_log) if os.path.exists(peft_log) else None
        if peft is None:
            print(f"seed {seed} {mode}: no PEFT result in {peft_log} (still running, or it failed)", file=sys.stderr)
            continue
        losses, mine = ours(os.path.join(out, f"ours-{seed}-{mode}"))
        p = peft["losses"]
        rel = [abs(losses[i + 1] - p[i]) / abs(p[i]) for i in range(len(p))]
        spans = [statistics.median(rel[a - 1:b]) for a, b in SPANS if b <= len(rel)]
        a, b = 100 * mine["exact_match"], 100 * peft["exact_match"]
        diffs.setdefault(mode, []).append((a, b))
        print(f"| {seed} | {mode} | {a:.1f} / {b:.1f} | {mine['eval_loss']:.4f} / {peft['eval_loss']:.4f} | "
              + " | ".join(f"{x:.1e}" for x in spans) + " |")
    for mode, pairs in diffs.items():
        d = [a - b for a, b in pairs]
        se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else float("nan")
        print(f"{mode}: {len(d)} seeds, mean ours {statistics.mean(a for a, _ in pairs):.2f} / PEFT "
              f"{statistics.mean(b for _, b in pairs):.2f}; ours - PEFT {statistics.mean(d):+.2f} points "
              f"(standard error {se:.2f}), {sum(x == 0 for x in d)} equal, range {min(d):+.1f}..{max(d):+.1f}; "
              f"runs >= 87.5: ours {sum(a >= 87.5 for a, _ in pairs)}, PEFT {sum(b >= 87.5 for _, b in pairs)}")


if __name__ == "__main__":
    main()
