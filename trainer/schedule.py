"""Learning rate as a pure function of the optimizer step: linear warmup, then cosine decay.

Warmup starts at learn_rate / div_factor, as the prior art's OneCycle did. Being a function of the step
alone, the schedule needs no state in checkpoints and resumes exactly.
"""

from __future__ import annotations

import math

from lowmem_train.config.schema import RunConfig


def warmup_steps(cfg: RunConfig, total_steps: int) -> int:
    return math.ceil(cfg.warmup_ratio * total_steps)


def lr_at(step: int, total_steps: int, cfg: RunConfig) -> float:
    """LR for optimizer step `step` (0-based) of `total_steps`."""
    peak, start, end = cfg.learn_rate, cfg.learn_rate / cfg.div_factor, cfg.learn_rate * cfg.final_lr_ratio
    warm = warmup_steps(cfg, total_steps)
    if step < warm:
        return start + (peak - start) * step / warm
    decay = max(total_steps - warm, 1)
    progress = min((step - warm) / decay, 1.0)
    return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
