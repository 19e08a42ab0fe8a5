"""Score a model folder on a validation file with the trainer's own Evaluator, on 1 process or under
`accelerate launch`; every rank writes what it scored and the (summed) result to `--out`.rank<r>.pt.

Used to check that validation covers the whole split, sharded across ranks and summed: the same figures
whatever the number of processes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lowmem_train.config.loader import build_config
from lowmem_train.model.generate import load_exported
from lowmem_train.model.tokenizer import load_tokenizer
from lowmem_train.trainer import distributed
from lowmem_train.trainer.backend import make_backend
from lowmem_train.trainer.data.encode import Encoder
from lowmem_train.trainer.data.source import ParquetIndex
from lowmem_train.trainer.evaluate import Evaluator


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a model folder (a run's final/)")
    ap.add_argument("--model_type", default="gpt")
    ap.add_argument("--validation_file", required=True)
    ap.add_argument("--tokenizer_dir", required=True)
    ap.add_argument("--batch_size", type=int, required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cfg = build_config(None, {"model.type": args.model_type, "tokenizer_dir": args.tokenizer_dir,
                              "validation_file": args.validation_file, "deepspeed_config": "none"})
    backend = make_backend(cfg, 1, 1)
    tokenizer = load_tokenizer(args.tokenizer_dir)
    model = backend.accelerator.prepare(load_exported(Path(args.model)).model)  # DDP-wrapped on 2 processes
    index = ParquetIndex.build(cfg.validation_file, (cfg.data.prompt_column, cfg.data.response_column),
                               "--validation_file", (cfg.data.case_column,))
    # As Trainer.setup builds it (its evaluate() runs it with 2 x the micro-batch in force as batch size).
    evaluator = Evaluator(backend, index, Encoder(tokenizer, cfg.model.type, cfg.max_seq_len, "truncate"),
                          cfg.data.eval_max_samples, ("exact_match", "bleu", "rouge_l"))
    rows, real, _ = evaluator.rows_of_this_rank()
    answers = []  # (prompt, answer) of every row this rank generated, padding rows included
    generate = evaluator.generate

    def recording(net, pairs):
        out = generate(net, pairs)
        answers.extend(out)
        return out

    evaluator.generate = recording
    result = evaluator.run(model, args.batch_size)
    torch.save({"rank": backend.rank, "world_size": backend.world_size, "real_rows": [r[2] for r in rows[:real]],
                "batches": -(-len(rows) // result.batch_size), "loss": result.loss,
                "exact_match": result.exact_match, "scores": result.scores, "samples": result.samples,
                "answers": list(zip([r[1] for r in rows[:real]], answers[:real])),
                "by_case": result.by_case},
               f"{args.out}.rank{backend.rank}.pt")
    distributed.leave_process_group()  # as the train command does: a rank exiting with gloo alive may abort


if __name__ == "__main__":
    main()
