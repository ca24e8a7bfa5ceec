"""Parquet copies of tiny-llama's data for the tests (pyarrow; run from the repository root).

alpaca_sample.parquet: the 200 Alpaca records of alpaca_sample.jsonl, Snappy (pandas' and
pyarrow's default). sharegpt_sample.parquet + .jsonl: the first 50 as ShareGPT conversations
(a list<struct<from, value>> column), Zstandard (polars' default).
"""
import json

import pyarrow as pa
import pyarrow.parquet as pq

DATA = "tests/fixtures/tiny-llama/data"
rows = [json.loads(line) for line in open(f"{DATA}/alpaca_sample.jsonl")]
pq.write_table(pa.Table.from_pylist(rows), f"{DATA}/alpaca_sample.parquet", compression="snappy")
conversations = [
    {
        "conversations": [
            {"from": "human", "value": r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "")},
            {"from": "gpt", "value": r["output"]},
        ]
    }
    for r in rows[:50]
]
pq.write_table(pa.Table.from_pylist(conversations), f"{DATA}/sharegpt_sample.parquet", compression="zstd")
with open(f"{DATA}/sharegpt_sample.jsonl", "w") as f:
    for c in conversations:
        f.write(json.dumps(c) + "\n")
