"""Fault injection for tests: the one narrow seam through which a CPU test makes a GPU-only failure happen.

A CUDA out-of-memory error cannot happen on a machine without a GPU, so tests set
    LOWMEM_FAULT_OOM="micro_batch_over=4[,rank=1][,times=N]"
and every forward pass of a micro-batch with more than 4 rows (on that rank only, at most N times) raises
torch.OutOfMemoryError, the very exception torch raises on a GPU. Unset (always, outside tests), the
check is a single attribute read.
"""

from __future__ import annotations

import os

import torch

ENV = "LOWMEM_FAULT_OOM"


class OomFault:
    def __init__(self, spec: str | None):
        fields = dict(part.split("=", 1) for part in spec.split(",")) if spec else {}
        self.active = bool(fields)
        self.micro_batch_over = int(fields.get("micro_batch_over", 0))
        self.rank = int(fields["rank"]) if "rank" in fields else None
        self.times = int(fields.get("times", 1_000_000))

    def before_forward(self, rows: int, rank: int) -> None:
        if not self.active or self.times <= 0:
            return
        if rows > self.micro_batch_over and (self.rank is None or self.rank == rank):
            self.times -= 1
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected by {ENV} for a micro-batch of {rows} rows)")


OOM_FAULT = OomFault(os.environ.get(ENV))
