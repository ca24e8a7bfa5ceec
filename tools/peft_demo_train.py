#!/usr/bin/env python3
"""The demo's LoRA training (demo/demo.toml) with PyTorch + PEFT, timed: the PyTorch side of
`coordinator bench --workload demo --reference-python PY`, and usable alone.

Settings, all read from demo/demo.toml (as `coordinator --demo` reads them):
- base model demo/base (float32, attention --attn, default sdpa), tokenizer
  PreTrainedTokenizerFast(tokenizer_file=demo/base/tokenizer.json) (it prepends <s>);
- alpaca-lora's `alpaca` template; an example is tokenize(prompt) with <s> + tokenize(output)
  without special tokens + </s>, truncated to cutoff_len (a cut example keeps no </s>), labels
  -100 on the prompt tokens unless train_on_inputs; examples with no target token are dropped
  (lorafleet's common/src/data/tokenize.rs);
- batches of micro_batch_size right padded with <pad> to a multiple of --pad-multiple (8, as
  lorafleet's Batch::from_examples), attention mask 0 and label -100 on padding; gradient
  accumulation batch_size / micro_batch_size;
- LoraConfig(r=lora_r, lora_alpha, lora_dropout, target_modules, bias="none",
  task_type="CAUSAL_LM"); torch.manual_seed(seed) before loading the model;
- AdamW(lr=learning_rate, betas (0.9, 0.999), eps 1e-8, weight_decay) on the LoRA parameters,
  get_linear_schedule_with_warmup(warmup_steps, total steps), gradient clipping max_grad_norm;
- example order: random.Random(seed), one shuffle of the index list per epoch (demo/README.md).
  lorafleet shuffles with its own generator, so the two runs see different batches; per
  batch they are padded the same way.

--load-in-8bit loads the base as transformers + bitsandbytes do for alpaca-lora's `load_8bit`
(BitsAndBytesConfig(load_in_8bit=True), every Linear but lm_head int8 with absmax per output row,
LLM.int8 threshold 6.0; on a CPU bitsandbytes trains through dequantized weights and evaluates
through its int8 matmul). --seed N replaces demo.toml's seed (model init, dropout, example order).
--eval scores the trained adapter on demo.toml's eval_data_path after training, as the demo
README's protocol says: greedy decoding of at most eval_max_new_tokens tokens, stopping at </s>,
exact match after strip, and the pooled eval loss over output tokens + </s>.

--replay DIR trains on lorafleet's random streams instead of torch's and random.Random's: the
folder `cargo run --release -p lorafleet-tests --example paired_streams -- DIR --seed N` writes
(its initial adapter, its batches row for row, its dropout masks bit for bit), so the two runs
differ only in arithmetic and their per-step losses (in the JSON line) compare pairwise.

--max-steps N trains the first N steps (the schedule then spans N steps, as lorafleet's
--max_steps). Tokenization and batching happen before the loop; the timed loop is the steps
only (zero_grad, forward, backward, clipping, AdamW, scheduler). tokens/s counts non-padding
tokens of the steps after --warmup over their time. Peak RSS = ru_maxrss at the end.

Usage: python tools/peft_demo_train.py --threads 2 --max-steps 60 --json
       python tools/peft_demo_train.py --load-in-8bit --seed 43 --eval --json   (needs bitsandbytes)
       python tools/peft_demo_train.py --replay /tmp/streams42 --eval --json
"""

import argparse
import json
import math
import os
import platform
import random
import resource
import sys
import time
import tomllib

PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
                "### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                   "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def parse():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo-dir", default=os.path.join(here, "..", "demo"), help="the demo folder (demo.toml)")
    ap.add_argument("--max-steps", type=int, help="optimizer steps (default: the demo's epochs)")
    ap.add_argument("--warmup", type=int, default=2, help="steps not counted in the timed tokens/s")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (also OMP/MKL env)")
    ap.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="attention implementation")
    ap.add_argument("--pad-multiple", type=int, default=8, help="pad each batch to a multiple of this")
    ap.add_argument("--load-in-8bit", action="store_true", help="an int8 base through bitsandbytes")
    ap.add_argument("--seed", type=int, help="replace demo.toml's seed")
    ap.add_argument("--eval", action="store_true", help="exact match and eval loss on the eval set after training")
    ap.add_argument("--save-adapter", metavar="DIR", help="write the trained adapter here (save_pretrained)")
    ap.add_argument("--adapter", metavar="DIR", help="no training: load this adapter and evaluate it")
    ap.add_argument("--replay", metavar="DIR", help="lorafleet's streams (tests/examples/paired_streams.rs): "
                    "its lora_A init, batches and dropout masks instead of torch's and random.Random's")
    ap.add_argument("--json", action="store_true", help="also print one JSON line with the results (last line)")
    return ap.parse_args()


def rss_peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main():
    args = parse()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        os.environ.pop(var, None)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    demo = os.path.abspath(args.demo_dir)
    root = os.path.dirname(demo)  # demo.toml's paths are relative to the repository
    with open(os.path.join(demo, "demo.toml"), "rb") as f:
        c = tomllib.load(f)
    assert c.get("lr_scheduler", "linear") == "linear", "only the linear schedule is implemented here"
    assert c.get("prompt_template_name", "alpaca") == "alpaca", "only the alpaca template is implemented here"
    if args.seed is not None:
        c["seed"] = args.seed

    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import transformers
    import peft
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, get_linear_schedule_with_warmup

    torch.set_num_threads(args.threads)
    base = os.path.join(root, c["base_model"])
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(base, "tokenizer.json"))
    eos, pad = tok.convert_tokens_to_ids("</s>"), tok.convert_tokens_to_ids("<pad>")
    cutoff, train_on_inputs = c["cutoff_len"], c.get("train_on_inputs", False)

    def encode(r):
        """(prompt ids, ids, labels) of one record."""
        template = PROMPT_INPUT if r.get("input") else PROMPT_NO_INPUT
        prompt = template.format(instruction=r["instruction"], input=r.get("input", ""))
        p_ids = tok(prompt)["input_ids"]
        a_ids = tok(r["output"], add_special_tokens=False)["input_ids"] + [eos]
        ids = (p_ids + a_ids)[:cutoff]
        labels = ([l if train_on_inputs else -100 for l in p_ids] + a_ids)[:cutoff]
        return p_ids, ids, labels

    def read(path):
        with open(os.path.join(root, path)) as f:
            return [json.loads(line) for line in f if line.strip()]

    examples, by_record = [], {}
    for k, r in enumerate(read(c["data_path"])):
        _, ids, labels = encode(r)
        if any(l != -100 for l in labels[1:]):
            examples.append((ids, labels))
            by_record[k] = (ids, labels)
    assert tok(PROMPT_NO_INPUT)["input_ids"][0] == tok.convert_tokens_to_ids("<s>"), "the tokenizer adds no <s>"

    batch, micro = c["batch_size"], c["micro_batch_size"]
    accum = batch // micro
    per_epoch = math.ceil(len(examples) / batch)
    total = args.max_steps or per_epoch * c["num_epochs"]
    rng = random.Random(c["seed"])
    steps = []  # each: a list of micro-batches (input_ids, attention_mask, labels) tensors
    if args.replay:
        replayed = read_replay(args.replay, by_record, pad)
        assert len(replayed) >= total, f"steps.jsonl has {len(replayed)} steps, the run {total}"
        steps = replayed[:total]
    while len(steps) < total:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for s in range(per_epoch):
            if len(steps) == total:
                break
            chosen = order[s * batch:(s + 1) * batch]
            micros = []
            for m in range(0, len(chosen), micro):
                rows = [examples[i] for i in chosen[m:m + micro]]
                longest = max(len(ids) for ids, _ in rows)
                micros.append(padded(rows, -(-longest // args.pad_multiple) * args.pad_multiple, pad))
            steps.append(micros)

    torch.manual_seed(c["seed"])
    quant = {}
    if args.load_in_8bit:
        from transformers import BitsAndBytesConfig

        quant = dict(quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation=args.attn, **quant)
    if c.get("gradient_checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lcfg = LoraConfig(r=c["lora_r"], lora_alpha=c["lora_alpha"], lora_dropout=c["lora_dropout"],
                      target_modules=list(c["lora_target_modules"]), bias="none", task_type="CAUSAL_LM")
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
        scores = evaluate(model, tok, [encode(r) + (r["output"],) for r in read(c["eval_data_path"])],
                          c.get("eval_max_new_tokens", 16), eos)
        print(json.dumps(dict(adapter=args.adapter, load_in_8bit=args.load_in_8bit, **scores)), flush=True)
        return
    model = get_peft_model(model, lcfg)
    set_masks = replay_init(model, args.replay, c, replayed) if args.replay else None
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=c["learning_rate"], betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=c.get("weight_decay", 0.0))
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=c.get("warmup_steps", 0), num_training_steps=total)
    clip = c.get("max_grad_norm", 1.0)
    print(f"python {platform.python_version()}  torch {torch.__version__}  transformers {transformers.__version__}  "
          f"peft {peft.__version__}  threads={torch.get_num_threads()} attn={args.attn}", flush=True)
    print(f"{len(examples)} examples, {total} steps of {batch} ({accum} x {micro}), trainable "
          f"{sum(p.numel() for p in trainable)} parameters", flush=True)

    times, tokens, losses = [], [], []
    for i, micros in enumerate(steps):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for k, (ids, mask, lab) in enumerate(micros):
            if set_masks:
                set_masks(i, k)
            out = model(input_ids=ids, attention_mask=mask, labels=lab, use_cache=False)
            (out.loss / len(micros)).backward()
            loss_sum += out.loss.item() / len(micros)
        if clip and clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, clip)
        opt.step()
        sched.step()
        times.append(time.perf_counter() - t)
        tokens.append(sum(int(m.sum()) for _, m, _ in micros))
        losses.append(loss_sum)
        if (i + 1) % 10 == 0 or i + 1 == total:
            print(f"step {i + 1} loss {loss_sum:.4f} {tokens[-1] / times[-1]:.0f} tok/s", flush=True)

    if args.save_adapter:
        model.save_pretrained(args.save_adapter)
    scores = evaluate(model, tok, [encode(r) + (r["output"],) for r in read(c["eval_data_path"])],
                      c.get("eval_max_new_tokens", 16), eos) if args.eval else {}
    if scores:
        print(f"EVAL exact match {scores['exact_match']:.1%} ({scores['correct']} of {scores['examples']}), "
              f"eval loss {scores['eval_loss']:.4f}", flush=True)

    w = min(args.warmup, len(times) - 1)
    tps = sum(tokens[w:]) / sum(times[w:])
    peak = rss_peak_mib()
    print(f"RESULT {sum(tokens[w:])} non-padding tokens in {sum(times[w:]):.2f} s over steps {w + 1}..{total}: "
          f"{tps:.0f} tokens/s; all steps {sum(tokens) / sum(times):.0f} tokens/s; peak RSS {peak:.0f} MiB", flush=True)
    if args.json:
        print(json.dumps(dict(steps=total, timed_steps=total - w, tokens=sum(tokens[w:]), seconds=sum(times[w:]),
                              tokens_per_second=tps, all_steps_tokens_per_second=sum(tokens) / sum(times),
                              final_loss=losses[-1], peak_rss_mib=peak,
                              # A replay's streams are lorafleet's: demo.toml's seed drew none of them.
                              **(dict(losses=losses, replay=args.replay) if args.replay else dict(seed=c["seed"])),
                              load_in_8bit=args.load_in_8bit, **scores, threads=args.threads, attn=args.attn,
                              torch=torch.__version__, transformers=transformers.__version__,
                              peft=peft.__version__)), flush=True)


def padded(rows, seq, pad):
    """(input_ids, attention_mask, labels) of `rows` right-padded to `seq`: <pad>, mask 0 and
    label -100 on padding."""
    import torch

    ids = torch.full((len(rows), seq), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), seq), dtype=torch.long)
    lab = torch.full((len(rows), seq), -100, dtype=torch.long)
    for k, (x, y) in enumerate(rows):
        ids[k, :len(x)] = torch.tensor(x)
        mask[k, :len(x)] = 1
        lab[k, :len(y)] = torch.tensor(y)
    return ids, mask, lab


def read_replay(folder, by_record, pad):
    """The batches of lorafleet's run as steps.jsonl lists them: rows in its order, padded to
    its seq_len."""
    steps = []
    for line in map(json.loads, open(os.path.join(folder, "steps.jsonl"))):
        n = line["step"]
        assert n == len(steps) or n == len(steps) + 1, f"steps.jsonl: step {n} out of order"
        if n == len(steps) + 1:
            steps.append([])
        rows = [by_record[r] for r in line["records"]]
        assert [len(x) for x, _ in rows] == line["lengths"], f"step {n}: our token counts differ from lorafleet's"
        steps[-1].append(padded(rows, line["seq_len"], pad))
    return steps


LINEAR_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def replay_init(model, folder, c, steps):
    """lorafleet's initial adapter into the PEFT model, and its dropout: each LoRA module's
    nn.Dropout replaced by one that multiplies by the replayed mask (0 or 1/(1-p), in float32
    as lorafleet computes it), in masks.bin's order (layer, then LINEAR_MODULES). Returns
    set_masks(step, micro), which hands every replaying module its block of masks.bin."""
    import numpy as np
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    init = load_file(os.path.join(folder, "initial", "adapter_model.safetensors"))
    set_peft_model_state_dict(model, init)
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(init), f"{len(init)} tensors in the initial adapter, {len(loaded)} in the model"
    for k, v in init.items():
        got = loaded[k.replace(".weight", ".default.weight")]
        assert torch.equal(got, v), f"{k} was not loaded"

    class Replayed(torch.nn.Module):
        def __init__(self, features, keep):
            super().__init__()
            self.features, self.keep, self.mask = features, keep, None

        def forward(self, x):
            if not self.training:
                return x
            assert self.mask is not None and self.mask.shape == x.shape, "replayed mask shape"
            out, self.mask = x * self.mask, None
            return out

    keep = np.float32(1.0 / (1.0 - c["lora_dropout"]))
    found = []
    for name, module in model.named_modules():
        if hasattr(module, "lora_dropout") and "default" in module.lora_dropout:
            parts = name.split(".")
            layer = int(parts[parts.index("layers") + 1])
            replayed = Replayed(module.in_features, keep)
            module.lora_dropout["default"] = replayed
            found.append(((layer, LINEAR_MODULES.index(parts[-1])), replayed))
    modules = [m for _, m in sorted(found, key=lambda f: f[0])]
    bits = np.fromfile(os.path.join(folder, "masks.bin"), dtype=np.uint8)
    # Each micro-batch's blocks, one per module, follow each other in file order.
    at, blocks = 0, []
    for micros in steps:
        blocks.append([])
        for ids, _, _ in micros:
            rows, seq = ids.shape
            blocks[-1].append([])
            for m in modules:
                n = rows * seq * m.features
                blocks[-1][-1].append((at, n))
                at += (n + 7) // 8
    assert at == len(bits), f"masks.bin holds {len(bits)} bytes, the batches need {at}"

    def set_masks(step, micro):
        rows, seq = steps[step][micro][0].shape
        for m, (start, n) in zip(modules, blocks[step][micro]):
            block = np.unpackbits(bits[start:start + (n + 7) // 8], count=n).astype(np.float32)
            m.mask = torch.from_numpy(block.reshape(rows, seq, m.features) * m.keep)

    return set_masks


def evaluate(model, tok, records, max_new, eos):
    """The demo README's protocol: exact match of greedy answers, and the eval loss pooled over
    every output token + </s> (adapter in eval mode, so no dropout)."""
    import torch

    model.eval()
    correct, loss_sum, loss_n = 0, 0.0, 0
    with torch.no_grad():
        for p_ids, ids, labels, want in records:
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, :-1]
            lab = torch.tensor(labels[1:])
            keep = lab != -100
            loss_sum += float(torch.nn.functional.cross_entropy(logits[keep], lab[keep], reduction="sum"))
            loss_n += int(keep.sum())
            seq = list(p_ids)
            for _ in range(max_new):
                nxt = int(model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].argmax())
                if nxt == eos:
                    break
                seq.append(nxt)
            got = tok.decode(seq[len(p_ids):], skip_special_tokens=True).strip()
            correct += got == want
    return dict(exact_match=correct / len(records), correct=correct, examples=len(records),
                eval_loss=loss_sum / loss_n)


if __name__ == "__main__":
    sys.exit(main())
