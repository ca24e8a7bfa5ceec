#!/usr/bin/env python3
"""Cross-checks `coordinator eval --json` against PEFT: the same adapter loaded with
transformers + PEFT, the same tokenization (prompt with BOS, answer without special tokens,
then EOS; loss on answer + EOS only), token-weighted mean loss over the whole set.

Not part of the test suite (torch is not a project dependency):
    python3 -m venv /tmp/refenv && /tmp/refenv/bin/pip install torch transformers==5.24.0 peft==0.21.2
    cargo build --release -p lorafleet-coordinator
    /tmp/refenv/bin/python tools/peft_eval_check.py --base demo/base --adapter lora-demo \
        --data demo/data/eval.jsonl --coordinator target/release/coordinator
"""
import argparse
import json
import subprocess

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
                "### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                   "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--coordinator", required=True, help="path of the coordinator binary")
    ap.add_argument("--cutoff-len", type=int, default=256)
    ap.add_argument("--tolerance", type=float, default=1e-4)
    args = ap.parse_args()

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(args.base)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32, attn_implementation="eager")
    model = PeftModel.from_pretrained(model, args.adapter).eval()
    total, tokens = 0.0, 0
    with open(args.data) as f:
        records = [json.loads(line) for line in f if line.strip()]
    for r in records:
        template = PROMPT_INPUT if r.get("input") else PROMPT_NO_INPUT
        prompt = template.format(instruction=r["instruction"], input=r.get("input", ""))
        p_ids = tok(prompt)["input_ids"]
        a_ids = tok(r["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = (p_ids + a_ids)[: args.cutoff_len]
        labels = ([-100] * len(p_ids) + a_ids)[: args.cutoff_len]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        target = torch.tensor(labels[1:])
        keep = target != -100
        total += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
        tokens += int(keep.sum())
    peft_loss = total / tokens
    out = subprocess.run([args.coordinator, "eval", "--base", args.base, "--adapter", args.adapter, "--data", args.data,
                          "--cutoff-len", str(args.cutoff_len), "--json"], check=True, capture_output=True, text=True)
    ours = json.loads(out.stdout)
    diff = abs(ours["loss"] - peft_loss)
    print(f"PEFT:      loss {peft_loss:.6f} over {tokens} tokens of {len(records)} records")
    print(f"lorafleet: loss {ours['loss']:.6f} over {ours['tokens']} tokens of {ours['examples']} examples")
    print(f"|diff| = {diff:.2e} (tolerance {args.tolerance:g}): {'OK' if diff <= args.tolerance and tokens == ours['tokens'] else 'MISMATCH'}")
    raise SystemExit(0 if diff <= args.tolerance and tokens == ours["tokens"] else 1)


if __name__ == "__main__":
    main()
