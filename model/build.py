"""Build the configured model with random weights (nothing is ever downloaded); its family does the sizing."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lowmem_train.model import families
from lowmem_train.model.families.base import Specials

if TYPE_CHECKING:
    from lowmem_train.config.schema import RunConfig


def build_model(cfg: "RunConfig", tokenizer) -> torch.nn.Module:
    """The model of `cfg.model.type`, sized by cfg.model, vocabulary and special ids from the tokenizer."""
    family = families.get(cfg.model.type)
    specials = Specials.of(tokenizer)
    torch.manual_seed(cfg.seed)  # same seed, same initial weights on every rank and every run
    model = family.build(cfg, len(tokenizer), specials)
    for key, value in family.generation_defaults(cfg, specials).items():
        setattr(model.generation_config, key, value)
    if cfg.gradient_checkpointing:
        set_gradient_checkpointing(model, True)
    return model


def set_gradient_checkpointing(model: torch.nn.Module, enabled: bool) -> None:
    """Turn activation checkpointing on or off (the memory guard may flip it between epochs)."""
    if enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    else:
        model.gradient_checkpointing_disable()


def gradient_checkpointing_active(model: torch.nn.Module) -> bool:
    # transformers 5 renamed is_gradient_checkpointing (deprecated) to is_activation_checkpointing
    active = getattr(model, "is_activation_checkpointing", None)
    return bool(getattr(model, "is_gradient_checkpointing", False) if active is None else active)
