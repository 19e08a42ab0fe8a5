"""Placeholder guard: holds the plan; the real guard (sampling, agreement, OOM retry) replaces it."""

from __future__ import annotations

from dataclasses import dataclass, asdict


@dataclass(frozen=True)
class Plan:
    micro_batch: int
    grad_accum: int
    num_workers: int
    pin_memory: bool
    prefetch_factor: int
    gradient_checkpointing: bool

    def global_batch(self, world_size: int) -> int:
        return self.micro_batch * self.grad_accum * world_size


class MemoryGuard:
    def __init__(self, plan):
        self.plan = plan

    @classmethod
    def from_config(cls, cfg, saved):
        return cls(Plan(cfg.batch_size_per_gpu, cfg.gradient_accumulation_steps, cfg.data.num_workers,
                        cfg.data.pin_memory, cfg.data.prefetch_factor, cfg.gradient_checkpointing))

    def attach(self, backend):
        self.backend = backend

    def attach_model(self, model):
        self.model = model

    def run_step(self, fn):
        return fn(self.plan)

    def after_step(self, step):
        pass

    def at_epoch_end(self, epoch):
        return None

    def state_dict(self):
        return asdict(self.plan)
