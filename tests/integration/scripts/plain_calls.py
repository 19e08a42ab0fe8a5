"""Score an exported model folder the way every transformers user calls it, importing nothing of lowmem-train.

    python plain_calls.py MODEL_DIR ROWS.parquet [--pipeline] [--limit N]

For each (prompt, response[, case]) row: `tok(prompt, return_tensors="pt")`, `model.generate(**inputs)`,
`tok.decode(..., skip_special_tokens=True)` (a causal model's output starts with its prompt, which is cut off
by length, as any causal-LM user does), no hand-added tokens, no options but what the folder's
generation_config says. With --pipeline, also `pipeline("text-generation")` (causal models; transformers 5 has
no text2text pipeline any more). Prints one JSON line: exact match overall and per case, and which modules of
lowmem_train were imported (must be none).
"""

from __future__ import annotations

import argparse
import json
import sys

import pyarrow.parquet as pq
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, pipeline


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("rows")
    ap.add_argument("--pipeline", action="store_true")
    ap.add_argument("--limit", type=int, default=0)
    args = ap.parse_args()
    table = pq.read_table(args.rows)
    rows = list(zip(*(table[c].to_pylist() for c in table.column_names if c in ("prompt", "response", "case"))))
    rows = rows[: args.limit] if args.limit else rows
    config = AutoConfig.from_pretrained(args.model)
    model_cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = model_cls.from_pretrained(args.model).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    generator = pipeline("text-generation", model=model, tokenizer=tok) if args.pipeline else None
    hits, piped, per_case = 0, 0, {}
    answers = []
    for row in rows:
        prompt, response = row[0], row[1]
        inputs = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs)
        if not config.is_encoder_decoder:
            out = out[:, inputs["input_ids"].shape[1]:]
        answer = tok.decode(out[0], skip_special_tokens=True)
        answers.append(answer)
        hit = answer == response
        hits += hit
        if len(row) > 2:
            c, n = per_case.get(row[2], (0, 0))
            per_case[row[2]] = (c + hit, n + 1)
        if generator is not None:
            piped += generator(prompt, return_full_text=False)[0]["generated_text"] == response
    print(json.dumps({"rows": len(rows), "exact_match": hits / max(len(rows), 1), "hits": hits,
                      "pipeline_hits": piped if generator is not None else None,
                      "by_case": {k: v[0] / v[1] for k, v in per_case.items()}, "answers": answers[:5],
                      "project_modules": sorted(m for m in sys.modules if m.startswith("lowmem_train"))},
                     ensure_ascii=False))


if __name__ == "__main__":
    main()
