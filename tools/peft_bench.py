#!/usr/bin/env python3
"""PyTorch + PEFT side of `coordinator bench --reference-python PY`: LoRA training steps on a
random-init Llama, timed, with peak RSS. Extends ../shared/bench/peft_cpu_bench.py (the
recorded anchor; its defaults are this script's defaults) with the model shape, the batch,
LoRA settings and one JSON result line for the benchmark harness.

Model: LlamaForCausalLM from --config (a config.json; `coordinator bench` passes the one it
wrote for its own model) or the --shape preset, float32, random init (torch.manual_seed(seed));
or, with --weights DIR, that model folder's weights (`coordinator bench --same-weights`: the
harness's own random model, so that both sides' first-step losses must agree).
LoRA: --lora-r/--lora-alpha/--lora-dropout on q_proj, v_proj. AdamW lr 3e-4.
Batch: --batch-file (JSON {"input_ids", "attention_mask", "labels"}, lists of rows; the harness
writes it from the same rows its own side trains on) or generated here: --batch-kind random
(4 x 256 random ids, labels = inputs, as the anchor) or instruction (rows of 256, 201, 143, 97
tokens right padded to 256, attention mask 0 and label -100 on padding, label -100 on the first
40% of each row; ids differ from the harness's, lengths and masking do not).

One training step = zero_grad + forward (with loss) + backward + AdamW step, in train() mode.
--warmup steps run first and are not timed; then --steps timed steps. tokens/s = non-padding
tokens of the batch / median timed step. Peak RSS = resource.getrusage ru_maxrss at the end.
Gradient checkpointing = gradient_checkpointing_enable(use_reentrant=False) before get_peft_model.
--device cuda[:N]: the base model in bf16 on that GPU (the LoRA weights stay float32, PEFT's
autocast_adapter_dtype default), each step timed to a torch.cuda.synchronize(); the JSON adds
gpu_peak_mib (torch.cuda.max_memory_allocated).

Usage: python tools/peft_bench.py --threads 2 --grad-ckpt off --steps 5 --json
"""

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

SHAPES = {
    "58m": dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048, rms_norm_eps=1e-6,
                tie_word_embeddings=False),
    "135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=2048,
                 rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True),
}
INSTRUCTION_LENGTHS = (256, 201, 143, 97)


def parse():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (also OMP/MKL env)")
    ap.add_argument("--grad-ckpt", choices=["on", "off"], default="off",
                    help="activation (gradient) checkpointing, non-reentrant")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (after warmup)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed warmup steps")
    ap.add_argument("--config", help="config.json of the model shape (overrides --shape)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="58m", help="model shape preset")
    ap.add_argument("--weights", help="load this model folder (config.json + safetensors) instead of a random init "
                                      "(overrides --config and --shape)")
    ap.add_argument("--batch-file", help="JSON batch (overrides --batch-kind, --batch, --seq)")
    ap.add_argument("--batch-kind", choices=["random", "instruction"], default="random")
    ap.add_argument("--batch", type=int, default=4, help="rows of a generated random batch")
    ap.add_argument("--seq", type=int, default=256, help="tokens per row of a generated random batch")
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--lora-alpha", type=float, default=8.0)
    ap.add_argument("--lora-dropout", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="attention implementation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda[:N] (the base in bf16 there)")
    ap.add_argument("--json", action="store_true", help="also print one JSON line with the results (last line)")
    return ap.parse_args()


def rss_peak_mib():
    # Linux: ru_maxrss is in KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_batch(args, vocab, torch):
    """(input_ids, attention_mask or None, labels) as int64 tensors."""
    if args.batch_file:
        with open(args.batch_file) as f:
            b = json.load(f)
        ids = torch.tensor(b["input_ids"], dtype=torch.long)
        mask = torch.tensor(b["attention_mask"], dtype=torch.long)
        labels = torch.tensor(b["labels"], dtype=torch.long)
    elif args.batch_kind == "random":
        g = torch.Generator().manual_seed(args.seed + 1)
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
        mask, labels = torch.ones_like(ids), ids.clone()
    else:
        g = torch.Generator().manual_seed(args.seed + 1)
        longest = max(INSTRUCTION_LENGTHS)
        ids = torch.zeros((len(INSTRUCTION_LENGTHS), longest), dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for r, n in enumerate(INSTRUCTION_LENGTHS):
            ids[r, :n] = torch.randint(0, vocab, (n,), generator=g)
            mask[r, :n] = 1
            prompt = n * 2 // 5
            labels[r, prompt:n] = ids[r, prompt:n]
    # An all-ones mask is the same as none; passing none keeps the anchor's exact call.
    return ids, (None if bool(mask.all()) else mask), labels, int(mask.sum())


def main():
    args = parse()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        os.environ.pop(var, None)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import transformers
    import peft
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rss_after_imports = rss_peak_mib()

    if args.weights:
        with open(os.path.join(args.weights, "config.json")) as f:
            shape = json.load(f)
    elif args.config:
        with open(args.config) as f:
            shape = json.load(f)
    else:
        shape = dict(SHAPES[args.shape])
    for k in ("model_type", "architectures", "torch_dtype", "dtype", "transformers_version", "use_cache"):
        shape.pop(k, None)
    shape["max_position_embeddings"] = max(shape.get("max_position_embeddings", 2048), args.seq, 2048)
    cfg = LlamaConfig(**shape, use_cache=False)
    cfg._attn_implementation = args.attn
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    t0 = time.perf_counter()
    if args.weights:
        model = LlamaForCausalLM.from_pretrained(args.weights, config=cfg, dtype=dtype).to(device)
    else:
        with device:
            model = LlamaForCausalLM(cfg)
        model = model.to(dtype)
    if args.grad_ckpt == "on":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lcfg = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    model.train()
    build_s = time.perf_counter() - t0
    n_total = sum(p.numel() for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=args.lr)
    rss_after_build = rss_peak_mib()

    input_ids, attention_mask, labels, tokens = make_batch(args, cfg.vocab_size, torch)
    rows, seq = input_ids.shape
    input_ids, labels = input_ids.to(device), labels.to(device)
    attention_mask = None if attention_mask is None else attention_mask.to(device)

    print(f"python {platform.python_version()}  torch {torch.__version__}  transformers {transformers.__version__}  "
          f"peft {peft.__version__}", flush=True)
    print(f"threads={torch.get_num_threads()} grad_ckpt={args.grad_ckpt} attn={args.attn} batch={rows}x{seq} "
          f"tokens={tokens} warmup={args.warmup} steps={args.steps}", flush=True)
    print(f"params total={n_total} trainable={n_train}  build {build_s:.2f}s  peak RSS after imports "
          f"{rss_after_imports:.0f} MiB, after build {rss_after_build:.0f} MiB", flush=True)

    times, losses = [], []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False)
        out.loss.backward()
        opt.step()
        if gpu:
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t
        loss = out.loss.item()
        tag = "warmup" if i < args.warmup else "timed"
        print(f"step {i} ({tag}): {dt:.3f} s  {tokens / dt:.1f} tok/s  loss {loss:.4f}", flush=True)
        losses.append(loss)
        if i >= args.warmup:
            times.append(dt)

    med = statistics.median(times)
    peak = rss_peak_mib()
    gpu_peak = torch.cuda.max_memory_allocated(device) / 2**20 if gpu else None
    print(f"RESULT tokens/s (median of {len(times)} timed steps) = {tokens / med:.1f}   "
          f"median step = {med:.3f} s   peak RSS = {peak:.0f} MiB", flush=True)
    if args.json:
        print(json.dumps(dict(threads=args.threads, grad_ckpt=args.grad_ckpt, attn=args.attn, rows=rows, seq=seq,
                              tokens=tokens, steps=args.steps, warmup=args.warmup, step_seconds=times,
                              median_step_seconds=med, tokens_per_second=tokens / med, peak_rss_mib=peak,
                              rss_after_build_mib=rss_after_build, rss_after_imports_mib=rss_after_imports,
                              params_total=n_total, params_trainable=n_train, losses=losses,
                              device=args.device, gpu_peak_mib=gpu_peak,
                              torch=torch.__version__, transformers=transformers.__version__,
                              peft=peft.__version__)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
