"""What generating answers costs in an evaluation: the trainer's own Evaluator on the bundled validation split, with
--eval.generate true (loss + greedy answers scored) against false (loss and perplexity only), alternating rounds in
one process, one table of seconds and their ratio.

    python bench/eval_cost.py [--config t5_small] [--model DIR] [--rows 2000] [--rounds 3] [--batch 32]

--model: an exported folder (e.g. out/t5_tiny/final, whose answers stop at their end-of-sequence token); without
it the preset's model with random weights, whose answers run to max_new_tokens: the dearest case.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="t5_small")
    ap.add_argument("--model", default="", help="an exported model folder (default: the preset's, random weights)")
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()

    import torch

    from lowmem_train.config.loader import build_config
    from lowmem_train.model.build import build_model
    from lowmem_train.trainer.backend import make_backend
    from lowmem_train.trainer.data.encode import Encoder
    from lowmem_train.trainer.data.setup import load_datasets
    from lowmem_train.trainer.evaluate import Evaluator

    overrides = {"deepspeed_config": "none", "data.eval_max_samples": str(args.rows)}
    if args.model:
        overrides["model.name_or_path"] = args.model
    cfg = build_config(None if args.model else args.config, overrides)
    backend = make_backend(cfg, 1, 1)
    data = load_datasets(cfg, True, lambda: __import__("contextlib").nullcontext())
    model = build_model(cfg, data.tokenizer)
    if args.model:
        from lowmem_train.model.pretrained import PretrainedFolder, load_weights

        load_weights(model, PretrainedFolder(args.model))
    model = backend.accelerator.prepare(model)
    encoder = Encoder(data.tokenizer, cfg.model.type, cfg.max_seq_len, "truncate")
    evaluators = {generate: Evaluator(backend, data.validation_index, encoder, args.rows, ("exact_match",), generate)
                  for generate in (True, False)}
    times: dict[bool, list[float]] = {True: [], False: []}
    torch.manual_seed(0)
    for _ in range(args.rounds):
        for generate, evaluator in evaluators.items():
            start = time.perf_counter()
            result = evaluator.run(model, args.batch)
            times[generate].append(time.perf_counter() - start)
    with_answers, loss_only = (statistics.median(times[g]) for g in (True, False))
    what = args.model or f"{args.config} (random weights: answers run to max_new_tokens)"
    print(f"| model | rows | loss only (s) | loss + answers (s) | answers / loss only |\n|---|---|---|---|---|\n"
          f"| {what} | {result.samples} | {loss_only:.2f} | {with_answers:.2f} | {with_answers / loss_only:.1f}x |")
    print(f"rounds: loss only {[round(t, 2) for t in times[False]]}, with answers {[round(t, 2) for t in times[True]]}")


if __name__ == "__main__":
    main()
