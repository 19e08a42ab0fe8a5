"""Run ONE optimizer step of a tiny model on a fixed batch with a given micro-batch x accumulation split,
and save the resulting weights (rank 0). Used to check that the split does not change the update."""

from __future__ import annotations

import argparse

import torch

from lowmem_train.config.loader import build_config
from lowmem_train.model import families
from lowmem_train.model.build import build_model
from lowmem_train.model.tokenizer import load_tokenizer
from lowmem_train.trainer.backend import make_backend, make_optimizer
from lowmem_train.trainer.data.dataset import LowMemDataset
from lowmem_train.trainer.data.encode import Encoder
from lowmem_train.trainer.data.source import ParquetIndex
from lowmem_train.trainer.step import train_step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train_file", required=True)
    ap.add_argument("--tokenizer_dir", required=True)
    ap.add_argument("--model_type", default="t5")
    ap.add_argument("--micro", type=int, required=True)
    ap.add_argument("--accum", type=int, required=True)
    ap.add_argument("--deepspeed_config", default="none")
    ap.add_argument("--out", required=True)
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
    index = ParquetIndex.build(cfg.train_file, ("prompt", "response"))
    data = LowMemDataset(index, Encoder(tokenizer, cfg.model.type, cfg.max_seq_len), tokenizer.pad_token_id,
                         global_batch=args.micro * args.accum * backend.world_size, rank=backend.rank,
                         world_size=backend.world_size, seed=cfg.seed, shuffle_buffer=256)
    batch = next(iter(data))
    result = train_step(backend, model, optimizer, families.get(cfg.model.type), batch, args.micro, args.accum, lr=1e-2,
                        max_grad_norm=0.0)
    state = backend.accelerator.get_state_dict(model)
    if backend.is_main:
        torch.save({"weights": {k: v.float().cpu() for k, v in state.items()}, "loss": result.loss,
                    "grad_norm": result.grad_norm}, args.out)


if __name__ == "__main__":
    main()
