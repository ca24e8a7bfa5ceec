#!/usr/bin/env python3
"""Builds tests/fixtures/variants/: tiny random Qwen2, Mistral and Llama-3.1-style models with
transformers + PEFT references, for the architecture details tiny-llama does not cover
(q/k/v biases, tied embeddings, sliding window, llama3 rope scaling, attention/MLP biases,
the transformers-4 config spelling, all-linear targets, rsLoRA).

Not part of the test suite (torch is not a project dependency). Run once:
    python3 -m venv /tmp/refenv && /tmp/refenv/bin/pip install torch transformers==5.24.0 peft==0.21.2
    /tmp/refenv/bin/python tools/make_variant_fixtures.py
"""
import json
import pathlib

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

ROOT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures"
OUT = ROOT / "variants"
COMMON = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-6,
              bos_token_id=1, eos_token_id=2, pad_token_id=3)

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)


def batch():
    from safetensors.torch import load_file
    r = load_file(str(ROOT / "tiny-llama" / "reference.safetensors"))
    return r["input_ids"], r["attention_mask"], r["labels"]


def build(name, cls, config, lora, legacy_config=None):
    # eager attention, as the tiny-llama fixture: sdpa treats fully masked rows (a padded query
    # whose window holds only padding) differently, and those logits would not be comparable.
    config._attn_implementation = "eager"
    torch.manual_seed(42)
    model = cls(config).eval()
    g = torch.Generator().manual_seed(43)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif n.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    d = OUT / name
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(d)
    (d / "generation_config.json").unlink(missing_ok=True)
    if legacy_config:
        cfg = json.loads((d / "config.json").read_text())
        legacy_config(cfg)
        (d / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    ids, mask, labels = batch()
    out = {"base_logits": model(input_ids=ids, attention_mask=mask).logits.detach().contiguous()}
    torch.manual_seed(7)
    peft_model = get_peft_model(model, lora)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(d / "adapter")
    (d / "adapter" / "README.md").unlink(missing_ok=True)
    res = peft_model(input_ids=ids, attention_mask=mask, labels=labels)
    res.loss.backward()
    out["lora_logits"] = res.logits.detach().contiguous()
    out["lora_loss"] = res.loss.detach().reshape(())
    for n, p in peft_model.named_parameters():
        if p.requires_grad:
            key = n.replace(".default.weight", ".weight")
            out["grad." + key] = p.grad.detach().contiguous()
    save_file(out, str(d / "reference.safetensors"))
    print(name, "loss", float(res.loss), "tensors", len(out))


def main():
    qwen = Qwen2Config(**COMMON, tie_word_embeddings=True, use_sliding_window=False)
    build("qwen2", Qwen2ForCausalLM, qwen,
          LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM"))
    mistral = MistralConfig(**COMMON, sliding_window=5, tie_word_embeddings=False)
    build("mistral", MistralForCausalLM, mistral,
          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], use_rslora=True,
                     lora_dropout=0.0, task_type="CAUSAL_LM"))
    llama3 = LlamaConfig(**COMMON, attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 16})

    def to_transformers4(cfg):
        params = cfg.pop("rope_parameters")
        cfg["rope_theta"] = params.pop("rope_theta")
        cfg["rope_scaling"] = params
        cfg["torch_dtype"] = cfg.pop("dtype")
        cfg["eos_token_id"] = [2, 5]

    build("llama3", LlamaForCausalLM, llama3,
          LoraConfig(r=4, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj", "v_proj"],
                     rank_pattern={"down_proj": 2}, lora_dropout=0.0, task_type="CAUSAL_LM"),
          legacy_config=to_transformers4)


if __name__ == "__main__":
    main()
