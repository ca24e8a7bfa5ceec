#!/usr/bin/env python3
"""Checks that `coordinator merge` writes folders transformers loads and that they compute
what PEFT computes for base + adapter (f32: to float noise; f16/bf16: to their rounding).

Not part of the test suite (torch is not a project dependency):
    /tmp/refenv/bin/python tools/merge_check.py --coordinator target/release/coordinator
"""
import argparse
import pathlib
import subprocess
import tempfile

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "tiny-llama"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--coordinator", required=True)
    args = ap.parse_args()
    ref = load_file(str(TINY / "reference.safetensors"))
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for dtype, shard, tol in [("f32", "5GB", 1e-4), ("bf16", "100KB", 0.15), ("f16", "5GB", 0.02)]:
            out = pathlib.Path(tmp) / f"merged-{dtype}"
            subprocess.run([args.coordinator, "merge", "--base", str(TINY), "--adapter", str(TINY / "lora-peft"),
                            "--out", str(out), "--dtype", dtype, "--max-shard-size", shard], check=True)
            model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()
            with torch.no_grad():
                logits = model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"]).logits
            diff = (logits - ref["lora_logits"]).abs().max().item()
            files = sorted(p.name for p in out.iterdir())
            good = diff <= tol
            ok &= good
            print(f"{dtype}: loaded by transformers ({len([f for f in files if f.endswith('.safetensors')])} shard(s)), "
                  f"max |logits - PEFT lora_logits| = {diff:.2e} (tolerance {tol}) {'OK' if good else 'MISMATCH'}")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
