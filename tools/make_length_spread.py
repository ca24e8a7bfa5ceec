"""A data set with a realistic spread of lengths for the demo model, for the sample-packing
measurement in docs/perf.md.

The demo's Alpaca records are all short (about 30-60 tokens), so packing them is the best case.
Real instruction sets are long-tailed: most records are short, some run to the cutoff. This
mixes, deterministically, the demo's 1727 Alpaca training records (kept as they are) with 1200
plain `text` records (loss on every token), each the concatenation of k consecutive documents of
the demo's pretraining corpus (`corpus.txt`, the same invented world, so the demo tokenizer
covers it), with k drawn log-normally (median 3, sigma 0.9, at most 16): about 25 to well over
256 tokens, the longest truncated at cutoff_len 256.

    python3 tools/make_length_spread.py ../shared/fixtures/demo /tmp/length-spread.jsonl
"""

import json
import math
import random
import sys


def main(demo, out):
    rng = random.Random(13)
    with open(f"{demo}/data/train.jsonl") as f:
        alpaca = [json.loads(line) for line in f]
    with open(f"{demo}/corpus.txt") as f:
        docs = [line.strip() for line in f if line.strip()]
    texts = []
    for _ in range(1200):
        k = min(16, max(1, round(math.exp(rng.gauss(math.log(3), 0.9)))))
        start = rng.randrange(len(docs) - k)
        texts.append({"text": " ".join(docs[start : start + k])})
    records = alpaca + texts
    rng.shuffle(records)
    with open(out, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    print(f"{out}: {len(alpaca)} Alpaca records + {len(texts)} text records")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
