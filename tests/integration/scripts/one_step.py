"""Run ONE optimizer step of a tiny model on a fixed batch with a given micro-batch x accumulation split,
and save the resulting weights (rank 0). Used to check that the split does not change the update.

Runs alone (one process) or under `accelerate launch` (every rank runs it; rank 0 writes `--out`). With
`--grads`, `--out` also holds every parameter's gradient as the optimizer is about to use it (after the
backward passes and the gradient all-reduce, before the step), and each rank's target-token count: how the
same global batch split over 1 or 2 processes must give the same gradient is checked on these.
"""

from __future__ import annotations

import argparse

import torch

from lowmem_train.config.loader import build_config
from lowmem_train.model import families
from lowmem_train.model.build import build_model
from lowmem_train.model.families.base import IGNORE_INDEX
from lowmem_train.model.tokenizer import load_tokenizer
from lowmem_train.trainer import distributed
from lowmem_train.trainer.backend import make_backend, make_optimizer
from lowmem_train.trainer.data.dataset import LowMemDataset
from lowmem_train.trainer.data.encode import Encoder
from lowmem_train.trainer.data.source import ParquetIndex
from lowmem_train.trainer.step import train_step


def capture_gradients_before_the_step(backend, model, optimizer) -> dict:
    """Full gradients of every named parameter, filled in right before the optimizer step.

    Plain Accelerate: trainer/step.py calls `optimizer.step()` after the last (synchronised) backward; the
    gradients are then each parameter's `.grad`. DeepSpeed: accelerate calls `engine.step()` right after the
    boundary backward; ZeRO-2 holds each rank's partition of the reduced fp32 gradients, which
    `deepspeed.utils.safe_get_full_grad` assembles (a collective: every rank calls it, in the same order)."""
    captured: dict = {}
    net = backend.accelerator.unwrap_model(model)
    named = list(net.named_parameters())
    if backend.engine is None:
        step = optimizer.step

        def recording_step(*args, **kwargs):
            captured.update({name: p.grad.detach().float().cpu().clone() for name, p in named})
            return step(*args, **kwargs)

        optimizer.step = recording_step
    else:
        from deepspeed.utils import safe_get_full_grad

        engine = backend.engine
        step = engine.step

        def recording_step(*args, **kwargs):
            captured.update({name: safe_get_full_grad(p).detach().float().cpu().clone() for name, p in named})
            return step(*args, **kwargs)

        engine.step = recording_step
    return captured


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train_file", required=True)
    ap.add_argument("--tokenizer_dir", required=True)
    ap.add_argument("--model_type", default="t5")
    ap.add_argument("--micro", type=int, required=True)
    ap.add_argument("--accum", type=int, required=True)
    ap.add_argument("--deepspeed_config", default="none")
    ap.add_argument("--out", required=True)
    ap.add_argument("--grads", action="store_true", help="also save the gradients before the optimizer step")
    args = ap.parse_args()
    cfg = build_config(None, {
        "train_file": args.train_file, "tokenizer_dir": args.tokenizer_dir, "model.type": args.model_type,
        "model.d_model": "64", "model.d_ff": "128", "model.num_heads": "2", "batch_size_per_gpu": str(args.micro),
        "gradient_accumulation_steps": str(args.accum), "deepspeed_config": args.deepspeed_config,
        "max_grad_norm": "0", "weight_decay": "0",
    })
    backend = make_backend(cfg, args.micro, args.accum)
    tokenizer = load_tokenizer(args.tokenizer_dir)
    model = build_model(cfg, tokenizer)
    model, optimizer = backend.prepare(model, make_optimizer(backend, model, cfg))
    grads = capture_gradients_before_the_step(backend, model, optimizer) if args.grads else None
    index = ParquetIndex.build(cfg.train_file, ("prompt", "response"))
    data = LowMemDataset(index, Encoder(tokenizer, cfg.model.type, cfg.max_seq_len), tokenizer.pad_token_id,
                         global_batch=args.micro * args.accum * backend.world_size, rank=backend.rank,
                         world_size=backend.world_size, seed=cfg.seed, shuffle_buffer=256)
    batch = next(iter(data))
    local = [float((batch["labels"] != IGNORE_INDEX).sum())]  # this rank's target tokens, counted as step.py does
    result = train_step(backend, model, optimizer, families.get(cfg.model.type), batch, args.micro, args.accum, lr=1e-2,
                        max_grad_norm=0.0)
    tokens_per_rank = [int(t[0]) for t in distributed.collect(backend, local)]
    state = backend.accelerator.get_state_dict(model)
    if backend.is_main:
        record = {"weights": {k: v.float().cpu() for k, v in state.items()}, "loss": result.loss,
                  "grad_norm": result.grad_norm}
        if grads is not None:
            record.update(grads=grads, tokens=result.tokens, tokens_per_rank=tokens_per_rank,
                          world_size=backend.world_size, positions=batch["positions"].tolist())
        torch.save(record, args.out)
    distributed.leave_process_group()  # as the train command does: a rank exiting with gloo alive may abort


if __name__ == "__main__":
    main()
